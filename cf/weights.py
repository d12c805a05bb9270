"""Loading and saving DiT weights: original Wan2.1 layout (§A.7), diffusers `WanTransformer3DModel` layout,
training-checkpoint prefixes (`model.`, `_fsdp_wrapped_module.`, `module.`), single or sharded safetensors files.

The project's `WanDiT`/`CausalWanDiT` use the original Wan2.1 names, so original files load unchanged; diffusers
files go through `from_diffusers`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

_TRAINING_PREFIXES = ("model.", "_fsdp_wrapped_module.", "module.", "_orig_mod.")

# (original Wan2.1 name, diffusers name) for everything outside the blocks.
_TOP_LEVEL = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("patch_embedding.", "patch_embedding."),
]
# Inside `blocks.{i}.`.
_IN_BLOCK = [
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("norm3.", "norm2."),  # the cross-attention input norm
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


class WeightLoadError(RuntimeError):
    """A state dict does not match the model."""


def strip_training_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove wrapper prefixes (`model.`, `_fsdp_wrapped_module.`, `module.`, `_orig_mod.`) from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _TRAINING_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def _rename(key: str, pairs: list[tuple[str, str]], block_pairs: list[tuple[str, str]]) -> str:
    match = _BLOCK.match(key)
    if match:
        index, rest = match.groups()
        for src, dst in block_pairs:
            if rest.startswith(src):
                return f"blocks.{index}.{dst}{rest[len(src):]}"
        raise KeyError(f"unknown block parameter {key!r}")
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src) :]
    raise KeyError(f"unknown parameter {key!r}")


def to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original Wan2.1 names -> diffusers `WanTransformer3DModel` names (a new dict, tensors shared)."""
    return {_rename(k, _TOP_LEVEL, _IN_BLOCK): v for k, v in state_dict.items()}


def from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `WanTransformer3DModel` names -> original Wan2.1 names (a new dict, tensors shared)."""
    top = [(b, a) for a, b in _TOP_LEVEL]
    inner = [(b, a) for a, b in _IN_BLOCK]
    return {_rename(k, top, inner): v for k, v in state_dict.items()}


def is_diffusers_layout(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in state_dict)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file or folder: `.safetensors`, a sharded `*.safetensors.index.json`, `.pt`/`.pth`/`.bin`,
    or a folder holding one of `diffusion_pytorch_model.safetensors[.index.json]` / `model.safetensors`."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                     "model.safetensors.index.json", "model.safetensors"):
            if (path / name).exists():
                return read_state_dict(path / name)
        sub = path / "transformer"
        if sub.is_dir():
            return read_state_dict(sub)
        raise FileNotFoundError(
            f"no DiT weights in {path}: expected diffusion_pytorch_model.safetensors (original Wan2.1 folder), "
            "its sharded .index.json, or a diffusers folder with transformer/"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"weights file {path} does not exist; point to a Wan2.1 diffusion_pytorch_model.safetensors, a "
            "diffusers transformer/ folder, or a file written by `cf convert`"
        )
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out: dict[str, Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_file(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return dict(obj)


def normalize_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip training prefixes and convert the diffusers layout, giving original Wan2.1 names."""
    sd = strip_training_prefixes(state_dict)
    return from_diffusers(sd) if is_diffusers_layout(sd) else sd


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a (normalised) state dict, raising `WeightLoadError` that lists missing/unexpected keys and shape
    mismatches instead of torch's first-error message."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(mismatched[:20]))
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: " + ", ".join(missing[:20]))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected[:20]))
    if problems:
        raise WeightLoadError(
            "weights do not match the model (check that the model config matches the checkpoint, e.g. "
            "WanConfig.wan2_1_1_3b() for Wan2.1-T2V-1.3B):\n" + "\n".join(problems)
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=strict)


def load_wan_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load Wan2.1 DiT weights from a file or folder (original or diffusers layout) into `model`."""
    load_into(model, normalize_state_dict(read_state_dict(path)), strict=strict)


class NonFiniteWeightsError(ValueError):
    """Weights about to be written hold NaN or inf values."""


def check_finite_weights(state_dict: Mapping[str, Tensor], target: str | Path, action: str = "write") -> None:
    """Raise `NonFiniteWeightsError` naming the first floating tensor of ``state_dict`` that holds NaN/inf (and how
    many more do), with the fix; ``target`` is the file about to be written (or read: ``action``)."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in state_dict.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    name, count = bad[0]
    numel = state_dict[name].numel()
    more = f" (and {len(bad) - 1} more of the {len(state_dict)} tensors)" if len(bad) > 1 else ""
    raise NonFiniteWeightsError(
        f"refusing to {action} {target}: tensor {name!r} holds {count} NaN/inf values of {numel}{more}. The weights "
        "diverged (or overflowed in a lower-precision cast): export an earlier checkpoint, one saved before the "
        "loss became NaN, or keep the stored dtype; the previous file, if any, is left as it was"
    )


def write_safetensors(tensors: Mapping[str, Tensor], path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write tensors (detached, contiguous, on CPU; floats cast to ``dtype`` when given) to a safetensors file,
    atomically (`cf.atomic.atomic_path`) and only if every floating tensor is finite (`check_finite_weights`)."""
    from safetensors.torch import save_file

    from cf.atomic import atomic_path

    path = Path(path)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in tensors.items()}
    check_finite_weights(sd, path)
    with atomic_path(path) as temp:
        save_file(sd, str(temp))
    return path


def save_wan_weights(model_or_state: nn.Module | Mapping[str, Tensor], path: str | Path,
                     dtype: torch.dtype | None = None) -> Path:
    """Write a Wan-layout `.safetensors` file (original names) loadable strict by `WanDiT`/`CausalWanDiT`; atomic,
    and refused when a tensor holds NaN/inf (`write_safetensors`)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    return write_safetensors(normalize_state_dict(sd), path, dtype)
