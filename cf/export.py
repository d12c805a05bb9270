"""The student's generator as it leaves training: its `GeneratorSpec` (the ``config.json`` that rebuilds it), the
export writer, and one reader of its weights from every form training writes (a Wan-layout export, a Lightning
``.ckpt`` of `CDMDStudent` / `ODEInitStudent`, a sharded DeepSpeed checkpoint folder; EMA weights first).

Nothing here imports Lightning, the LightningModules or the callbacks: `cf generate` and the notebooks read
checkpoints with this module alone.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cf.atomic import atomic_write_text
from cf.memory import MemoryConfig
from cf.models.wan import WanConfig
from cf.weights import WeightLoadError, normalize_state_dict, read_state_dict, save_wan_weights

__all__ = ["GENERATOR_SPEC_KEY", "GeneratorSpec", "is_training_checkpoint", "read_ema_weights",
           "read_generator_weights", "write_generator_export"]

GENERATOR_SPEC_KEY = "cdmd_generator_spec"  # where a student's Lightning checkpoint stores its GeneratorSpec


@dataclass
class GeneratorSpec:
    """Everything needed to rebuild a generator besides its weights."""

    wan_config: dict = field(default_factory=lambda: asdict(WanConfig.tiny()))
    frames_per_chunk: int = 3
    autoencoder: str = "toy"
    autoencoder_kwargs: dict = field(default_factory=dict)
    text_encoder: str = "hashed"
    text_encoder_kwargs: dict = field(default_factory=dict)
    encoder_dtype: str = "float32"  # the real encoders' dtype in training (bf16 at scale)
    latent_size: tuple[int, int] = (8, 8)
    fps: int = 16
    memory: dict = field(default_factory=dict)  # MemoryConfig fields, keyframe rule included; empty: slow_fast
    sampling: dict = field(default_factory=dict)  # SamplingConfig fields

    @classmethod
    def from_dict(cls, raw: dict) -> "GeneratorSpec":
        raw = dict(raw)
        legacy = raw.pop("keyframes", None)  # exports that stored the keyframe rule beside the memory
        if legacy:
            raw["memory"] = {"keyframes": legacy.get("policy", "similarity"),
                             "threshold": legacy.get("threshold", 0.95),
                             "keyframe_interval_frames": legacy.get("interval_frames") or 6,
                             **raw.get("memory", {})}
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "GeneratorSpec | None":
        """The spec a `CDMDStudent` stores in its checkpoints (None when absent): a Lightning ``.ckpt`` file
        (memory-mapped: its tensors are not read), or a DeepSpeed checkpoint folder (its Lightning state file)."""
        path = Path(path)
        if path.is_dir():
            state_file = path / "lightning_state.pt"
            if not state_file.is_file():
                return None
            checkpoint = torch.load(state_file, map_location="cpu", weights_only=False)  # written by cf.strategies
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        raw = checkpoint.get(GENERATOR_SPEC_KEY) if isinstance(checkpoint, dict) else None
        return cls.from_dict(raw) if raw else None

    @classmethod
    def load(cls, path: str | Path) -> "GeneratorSpec":
        """Read a generator ``config.json``; a teacher's config (a bare `WanConfig`) or a file that is not a
        generator spec is refused with a ValueError that says so."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"generator config {path} not found: pass --config, or place the config.json written by the "
                "student's export next to the weights"
            )
        try:
            raw = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"generator config {path} is not valid JSON ({err})") from err
        fields = set(cls.__dataclass_fields__) | {"keyframes"}
        if isinstance(raw, dict) and "wan_config" not in raw and {"dim", "num_layers", "num_heads"} <= set(raw):
            raise ValueError(
                f"{path} is a teacher's config.json (a bare WanConfig, as `cf convert teacher` writes), not a "
                "generator spec; cf generate runs a student: pass the student's export (generator.safetensors with "
                "its config.json) or a student .ckpt"
            )
        if not isinstance(raw, dict) or not fields & set(raw):
            raise ValueError(f"{path} is not a generator config (none of the fields {sorted(fields)}); pass the "
                             "config.json written by the student's export")
        return cls.from_dict(raw)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=2))

    def model_config(self) -> WanConfig:
        return WanConfig(**self.wan_config)

    def memory_config(self, preset: str | None = None, keyframes: str | None = None) -> MemoryConfig:
        """The memory this generator was trained with, or the `preset` instead; `keyframes` replaces its rule."""
        if preset:
            config = MemoryConfig.preset(preset, frames_per_chunk=self.frames_per_chunk)
        else:
            config = MemoryConfig(**{"frames_per_chunk": self.frames_per_chunk, **self.memory})
        return replace(config, keyframes=keyframes) if keyframes else config


def write_generator_export(path: str | os.PathLike, state_dict: Mapping[str, Tensor], spec: Mapping[str, Any],
                           dtype: torch.dtype | None = None) -> Path:
    """Write the generator as a Wan-layout ``.safetensors`` at ``path`` and ``config.json`` beside it (``spec``:
    the `GeneratorSpec` fields, plus provenance). Returns the weights path.

    Nothing is written when a tensor holds NaN/inf (`cf.weights.NonFiniteWeightsError`, raised before config.json
    is touched); each file is written beside its target and swapped in only when complete, so a failed export
    leaves the previous one in place."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {str(path)!r}")
    save_wan_weights(dict(state_dict), path, dtype=dtype)
    atomic_write_text(path.parent / "config.json", json.dumps(dict(spec), indent=2) + "\n")
    return path


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """A Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder (as opposed to a Wan-layout export)."""
    path = Path(path)
    return path.suffix == ".ckpt" or (path.is_dir() and any(path.rglob("*model_states.pt")))


def read_generator_weights(path: str | os.PathLike, use_ema: bool = True) -> dict[str, Tensor]:
    """Causal-student weights, original Wan names, from any form training writes.

    A Wan-layout file or folder (original or diffusers; a bidirectional Wan/teacher file works too) is read as is.
    A Lightning ``.ckpt`` or DeepSpeed checkpoint folder of `CDMDStudent` / `ODEInitStudent` gives its EMA weights
    when ``use_ema`` and it has them, else the generator's training weights (``generator.*``, or the gathered
    ``generator`` engine of a sharded checkpoint)."""
    path = Path(path)
    if not is_training_checkpoint(path):
        return normalize_state_dict(read_state_dict(path))
    if use_ema:
        try:
            return normalize_state_dict(read_ema_weights(path, attribute="generator"))
        except ValueError as err:  # no EMA in the checkpoint (or not started yet)
            print(f"{err}; using the training weights of the generator")
    if path.is_dir():  # a sharded DeepSpeed checkpoint: gather the generator engine
        from cf.zero import load_zero_checkpoint_state_dict

        return normalize_state_dict(load_zero_checkpoint_state_dict(path, "generator"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, Mapping) else {}
    generator = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    if not generator:
        raise WeightLoadError(f"checkpoint {path} holds no 'generator.*' weights; pass a CDMDStudent or "
                              "ODEInitStudent checkpoint, or a Wan-layout .safetensors file")
    return normalize_state_dict(generator)


# ------------------------------------------------------------------------------------------- EMA in checkpoints
def _merge_partitions(per_rank_shadows: list[dict[str, Tensor]], layout: dict[str, dict]) -> dict[str, Tensor]:
    merged = {}
    for name, info in layout.items():
        if info["partitioned"]:
            flat = torch.cat([shadow[name].reshape(-1) for shadow in per_rank_shadows])
            merged[name] = flat[: info["numel"]].view(tuple(info["shape"])).clone()
        else:
            merged[name] = per_rank_shadows[0][name]
    return merged


def _find_ema_state(checkpoint: dict, attribute: str | None, path: Path) -> dict | None:
    callbacks = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    found = [
        state
        for key, state in callbacks.items()
        if isinstance(key, str) and key.startswith("EMA") and isinstance(state, dict) and "shadow" in state
    ]
    if attribute is not None:
        found = [state for state in found if state["attribute"] == attribute]
    if len(found) > 1:
        names = sorted(state["attribute"] for state in found)
        raise ValueError(f"checkpoint {path} holds several EMA states ({names}); pass attribute= to pick one")
    return found[0] if found else None


def read_ema_weights(checkpoint_path: str | os.PathLike, attribute: str | None = None) -> dict[str, Tensor]:
    """EMA weights from a saved Lightning checkpoint, keyed like the tracked module's ``state_dict()``.

    ``checkpoint_path`` is a ``.ckpt`` file, or a DeepSpeed checkpoint directory (its per-rank
    ``*model_states.pt`` files are merged). ``attribute`` picks one EMA when the checkpoint holds several.
    Checkpoints are unpickled (``weights_only=False``): read only files you trust.
    """
    path = Path(checkpoint_path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass a .ckpt file or a DeepSpeed checkpoint directory"
        )
    if path.is_dir():
        files = sorted(glob.glob(str(path / "**" / "*model_states.pt"), recursive=True))
        if not files:
            raise FileNotFoundError(
                f"{path} is a directory without DeepSpeed '*model_states.pt' files; pass a Lightning .ckpt file "
                "or a DeepSpeed checkpoint directory"
            )
        checkpoints = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    else:
        checkpoints = [torch.load(path, map_location="cpu", weights_only=False)]

    states = [_find_ema_state(ckpt, attribute, path) for ckpt in checkpoints]
    states = [s for s in states if s is not None]
    if not states:
        raise ValueError(
            f"checkpoint {path} holds no EMA callback state"
            + (f" for attribute {attribute!r}" if attribute else "")
            + "; was it saved by a Trainer with the EMA callback?"
        )
    first = states[0]
    if first["shadow"] is None:
        raise ValueError(
            f"the EMA in {path} had not started when it was saved (start_step={first['start_step']} not reached)"
        )
    by_rank = {}
    for state in states:
        by_rank.setdefault(state["rank"], state)
    layout = first["layout"]
    if any(info["partitioned"] for info in layout.values()):
        world = first["world_size"]
        missing = [r for r in range(world) if r not in by_rank]
        if missing:
            raise ValueError(
                f"the EMA in {path} is ZeRO-3 partitioned over {world} ranks but the states of ranks {missing} "
                "are missing; pass the whole DeepSpeed checkpoint directory"
            )
        params = _merge_partitions([by_rank[r]["shadow"] for r in range(world)], layout)
    else:
        params = {name: tensor.clone() for name, tensor in first["shadow"].items()}
    weights = dict(first["buffers"])
    weights.update(params)
    for alias, name in first.get("aliases", {}).items():
        weights[alias] = params[name]
    return {key: weights[key] for key in first["key_order"] if key in weights}
