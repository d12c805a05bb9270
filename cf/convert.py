"""``cf convert``: export trained DiTs as Wan-layout safetensors and convert between weight layouts.

- ``cf convert teacher CKPT OUT.safetensors``: a `TeacherERFT` Lightning checkpoint (file, or ZeRO directory) ->
  the merged DiT (LoRA folded in) with the original Wan2.1 names, loadable ``strict=True`` by `WanDiT`; a
  ``config.json`` with the `WanConfig` fields is written beside it. This file is the student's real-score and critic
  initialisation.
- ``cf convert diffusers IN OUT`` / ``cf convert original IN OUT``: layout conversion of a DiT weights file.
- ``cf convert zero CKPT_DIR OUT_DIR``: a sharded DeepSpeed checkpoint -> one Wan-layout safetensors per DiT found
  in each engine (training prefixes stripped, LoRA merged).

LoRA merging is plain maths on state dicts (`cf.lora.merge_lora_state_dict`), so no model has to be built to export.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cf.atomic import atomic_write_text
from cf.encoder_base import resolve_dtype
from cf.lora import EXPORT_KEY, has_lora, merge_lora_state_dict, strip_peft_prefix
from cf.weights import (
    from_diffusers,
    is_diffusers_layout,
    read_state_dict,
    strip_training_prefixes,
    to_diffusers,
    write_safetensors,
)

__all__ = [
    "checkpoint_dit_state_dict",
    "dit_state_dicts",
    "export_teacher",
    "read_lightning_checkpoint",
    "register",
    "write_state_dict",
]

_WAN_MARKER = "patch_embedding.weight"


# ----------------------------------------------------------------------------------------------------------------------
# State-dict plumbing
# ----------------------------------------------------------------------------------------------------------------------


def _submodule_name(prefix: str) -> str:
    """``"model.network."`` -> ``"network"``: the prefix without training wrappers and the final dot."""
    (stripped,) = strip_training_prefixes({prefix: None})
    return stripped.rstrip(".")


def dit_state_dicts(state_dict: Mapping[str, Tensor], alpha: float | None = None) -> dict[str, dict[str, Tensor]]:
    """Every DiT inside a module's state dict, as ``{submodule prefix without the dot: Wan-layout state dict}``.

    A DiT is recognised by its ``patch_embedding.weight``; its keys lose the prefix (``network.``, ``generator.``,
    peft's ``base_model.model.``, training wrappers), LoRA is merged with ``alpha`` (`merge_lora_state_dict`) and
    diffusers names become the original Wan names. A bare DiT state dict gives the prefix ``""``.
    """
    sd = {strip_peft_prefix(k): v for k, v in state_dict.items()}
    prefixes = sorted({k[: -len(_WAN_MARKER)] for k in sd if k.endswith(_WAN_MARKER)}, key=len)  # both layouts
    if not prefixes:
        raise ValueError(
            "no DiT in this state dict (no key ends in 'patch_embedding.weight'); first keys: "
            + ", ".join(list(sd)[:5])
        )
    out: dict[str, dict[str, Tensor]] = {}
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        sub = strip_training_prefixes(merge_lora_state_dict(sub, alpha) if has_lora(sub) else sub)
        if is_diffusers_layout(sub):
            sub = from_diffusers(sub)
        out[_submodule_name(prefix)] = sub
    return out


def write_state_dict(state_dict: Mapping[str, Tensor], path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write tensors (detached, contiguous, on CPU; floats cast to ``dtype`` when given) to a safetensors file;
    atomic, and refused when a tensor holds NaN/inf (`cf.weights.write_safetensors`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"output {path} must end in .safetensors")
    return write_safetensors(state_dict, path, dtype)


def _find_export_meta(obj: Any) -> dict[str, Any] | None:
    if isinstance(obj, Mapping):
        if EXPORT_KEY in obj and isinstance(obj[EXPORT_KEY], Mapping):
            return dict(obj[EXPORT_KEY])
    return None


def _zero_export_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """Export metadata stored with Lightning's state in a DeepSpeed checkpoint directory, if any."""
    candidates = [ckpt_dir / "lightning_state.pt", *sorted(ckpt_dir.glob("**/*mp_rank_00_model_states.pt"))]
    for candidate in candidates:
        if candidate.is_file():
            try:
                meta = _find_export_meta(torch.load(candidate, map_location="cpu", weights_only=False))
            except Exception:  # an unreadable side file only means no metadata
                continue
            if meta is not None:
                return meta
    return None


def read_lightning_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(module state dict, export metadata or None) of a Lightning checkpoint file or ZeRO checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        from cf.zero import load_zero_checkpoint_state_dict

        return load_zero_checkpoint_state_dict(path), _zero_export_meta(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .ckpt file written by `cf fit` (or its "
                                "ZeRO checkpoint directory)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry); for a plain weights file "
                         "use `cf convert original` or `cf convert diffusers`")
    return dict(checkpoint["state_dict"]), _find_export_meta(checkpoint)


def checkpoint_dit_state_dict(state_dict: Mapping[str, Tensor], meta: Mapping[str, Any] | None,
                              prefix: str | None = None) -> dict[str, Tensor]:
    """The merged Wan-layout DiT of a checkpoint's state dict (prefix and LoRA α from ``meta`` unless given)."""
    meta = dict(meta or {})
    alpha = meta.get("lora_alpha")
    found = dit_state_dicts(state_dict, alpha=alpha)
    wanted = (prefix if prefix is not None else meta.get("network_prefix", "network")).rstrip(".")
    if wanted in found:
        return found[wanted]
    if len(found) == 1:
        return next(iter(found.values()))
    raise ValueError(f"the checkpoint holds DiTs under {sorted(found)}, none named {wanted!r}; pass --prefix")


def _check_loads_strict(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> None:
    """Raise if ``state_dict`` would not load with strict=True into ``WanDiT(WanConfig(**config))``."""
    from cf.models.wan import WanConfig, WanDiT

    with torch.device("meta"):
        reference = WanDiT(WanConfig(**config)).state_dict()
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    mismatched = [k for k in set(reference) & set(state_dict)
                  if tuple(reference[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(
            "the exported weights do not match WanDiT with the checkpoint's config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {sorted(mismatched)[:5]}"
        )


def export_teacher(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                   prefix: str | None = None) -> tuple[Path, Path | None]:
    """`TeacherERFT` checkpoint -> merged Wan-layout safetensors (+ ``config.json`` beside it when the checkpoint
    records its `WanConfig`). Returns the two paths (config None when unknown)."""
    state_dict, meta = read_lightning_checkpoint(checkpoint)
    dit = checkpoint_dit_state_dict(state_dict, meta, prefix)
    config = (meta or {}).get("wan_config")
    if config is not None:
        _check_loads_strict(dit, config)
    out = write_state_dict(dit, out, dtype)
    config_path = None
    if config is not None:
        config_path = out.parent / "config.json"
        atomic_write_text(config_path, json.dumps(dict(config), indent=2) + "\n")
    return out, config_path


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------

_DTYPES = ("keep", "bfloat16", "float16", "float32")


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    return None if args.dtype == "keep" else resolve_dtype(args.dtype)


def run_teacher(args: argparse.Namespace) -> None:
    """``cf convert teacher``."""
    out, config = export_teacher(args.checkpoint, args.out, _dtype(args), args.prefix)
    print(f"wrote {out}" + (f" and {config}" if config else " (the checkpoint records no WanConfig: no config.json)"))


def _read_weights(path: str) -> dict[str, Tensor]:
    sd = strip_training_prefixes(read_state_dict(path))
    if has_lora(sd):
        sd = merge_lora_state_dict(sd)
    return sd


def run_diffusers(args: argparse.Namespace) -> None:
    """``cf convert diffusers``: any DiT weights -> diffusers `WanTransformer3DModel` names."""
    sd = _read_weights(args.input)
    sd = to_diffusers(from_diffusers(sd) if is_diffusers_layout(sd) else sd)
    print(f"wrote {write_state_dict(sd, args.out, _dtype(args))}")


def run_original(args: argparse.Namespace) -> None:
    """``cf convert original``: any DiT weights -> original Wan2.1 names."""
    sd = _read_weights(args.input)
    sd = from_diffusers(sd) if is_diffusers_layout(sd) else sd
    print(f"wrote {write_state_dict(sd, args.out, _dtype(args))}")


def run_zero(args: argparse.Namespace) -> None:
    """``cf convert zero``: one safetensors file per DiT and engine of a sharded DeepSpeed checkpoint."""
    from cf.zero import checkpoint_engine_names, load_zero_checkpoint_state_dict

    ckpt_dir = Path(args.checkpoint)
    if not ckpt_dir.is_dir():
        raise SystemExit(f"cf convert zero: {ckpt_dir} is not a directory; pass the ZeRO checkpoint directory "
                         "that ModelCheckpoint wrote (e.g. .../epoch=0-step=100.ckpt/)")
    meta = _zero_export_meta(ckpt_dir) or {}
    alpha = args.lora_alpha if args.lora_alpha is not None else meta.get("lora_alpha")
    engines = args.engine or checkpoint_engine_names(ckpt_dir) or [None]
    out_dir = Path(args.out_dir)
    bar = tqdm(engines, desc="cf convert zero", unit="engine")
    for engine in bar:
        bar.set_postfix_str(f"gathering {engine or 'the'} shards")
        found = dit_state_dicts(load_zero_checkpoint_state_dict(ckpt_dir, engine), alpha=alpha)
        for prefix, sd in found.items():
            name = ".".join(part for part in (engine, prefix) if part) or "dit"
            bar.set_postfix_str(f"writing {name}.safetensors")
            path = write_state_dict(sd, out_dir / f"{name}.safetensors", _dtype(args))
            bar.write(f"wrote {path} ({len(sd)} tensors)", file=sys.stdout)
            if meta.get("wan_config") is not None and prefix == meta.get("network_prefix", "network").rstrip("."):
                atomic_write_text(out_dir / f"{name}.config.json", json.dumps(meta["wan_config"], indent=2) + "\n")
    bar.close()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cf convert`` with sub-commands ``teacher``, ``diffusers``, ``original`` and ``zero``."""
    parser = subparsers.add_parser("convert", help="export trained DiTs and convert weight layouts",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="convert_command", metavar="convert_command", required=True)
    dtype_help = "dtype of the written floats (default: keep the stored dtype)"

    teacher = commands.add_parser("teacher", help="TeacherERFT checkpoint -> merged Wan-layout safetensors")
    teacher.add_argument("checkpoint", help="Lightning .ckpt file (or ZeRO checkpoint directory) of `cf fit`")
    teacher.add_argument("out", help="output .safetensors (config.json is written beside it)")
    teacher.add_argument("--dtype", choices=_DTYPES, default="keep", help=dtype_help)
    teacher.add_argument("--prefix", default=None, help="submodule holding the DiT (default: the recorded one, "
                         "'network')")
    teacher.set_defaults(func=run_teacher)

    for name, help_text, func in (
        ("diffusers", "DiT weights -> diffusers WanTransformer3DModel layout", run_diffusers),
        ("original", "DiT weights -> original Wan2.1 layout", run_original),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("input", help="weights file or folder (.safetensors, sharded index, .pt, diffusers "
                             "transformer/ folder)")
        command.add_argument("out", help="output .safetensors")
        command.add_argument("--dtype", choices=_DTYPES, default="keep", help=dtype_help)
        command.set_defaults(func=func)

    zero = commands.add_parser("zero", help="sharded DeepSpeed checkpoint -> Wan-layout safetensors per engine")
    zero.add_argument("checkpoint", help="ZeRO checkpoint directory (…/epoch=0-step=100.ckpt/)")
    zero.add_argument("out_dir", help="output folder: <engine>[.<submodule>].safetensors")
    zero.add_argument("--engine", action="append", default=None,
                      help="engine(s) to export (default: all engines of the checkpoint)")
    zero.add_argument("--lora-alpha", type=float, default=None,
                      help="LoRA alpha for merging (default: recorded in the checkpoint, else the rank: scale 1)")
    zero.add_argument("--dtype", choices=_DTYPES, default="keep", help=dtype_help)
    zero.set_defaults(func=run_zero)
    return parser
