"""Typed arguments of the LightningModules from YAML values, the seeds of their random draws, and the check that a
resumed checkpoint continues the same run.

LightningCLI hands a dataclass-typed argument over either as the dataclass or as a mapping of its fields; the
modules accept both. Random draws of training come from generators seeded by a stable hash of (seed, step, phase,
micro-batch[, rank]), so every rank and every resumed run draws the same values without communication.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["MODULE_KEY", "as_dataclass", "check_resumed_settings", "stable_seed", "stamp_checkpoint"]


def as_dataclass(value: Any, cls: type[T], name: str) -> T:
    """``value`` if it is a ``cls``, else ``cls(**value)`` for a mapping, or ``cls.preset(value)`` for a preset name
    (classes that have presets); a TypeError naming ``name`` otherwise."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and hasattr(cls, "preset"):
        return cls.preset(value)
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


MODULE_KEY = "cf_module"  # the LightningModule class that wrote a checkpoint


def _plain(value: Any) -> Any:
    """Settings as plain JSON values, so that tuples and lists, or dataclasses and dicts, compare equal."""
    import dataclasses
    import json

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def stamp_checkpoint(module: Any, checkpoint: dict[str, Any]) -> None:
    """Record which LightningModule class wrote ``checkpoint`` (read back by `check_resumed_settings`)."""
    checkpoint[MODULE_KEY] = type(module).__name__


def check_resumed_settings(module: Any, checkpoint: Mapping[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` into ``module`` when it was written by another module class, or when the
    module's settings (``hparams``) differ from the stored ones; the error lists every difference."""
    stored_class = checkpoint.get(MODULE_KEY)
    if stored_class is not None and stored_class != type(module).__name__:
        raise ValueError(f"this checkpoint was written by {stored_class}, but the config builds "
                         f"{type(module).__name__}; resume it with the config of its own stage (its run folder's "
                         "config.yaml), or start this stage from its exported weights instead of --ckpt_path")
    stored = checkpoint.get("hyper_parameters")
    if stored is None:
        return
    stored, current = _plain(dict(stored)), _plain(dict(module.hparams))
    differences = [f"{key}: checkpoint {stored.get(key, '<absent>')!r} vs config {current.get(key, '<absent>')!r}"
                   for key in sorted(set(stored) | set(current)) if stored.get(key) != current.get(key)]
    if differences:
        raise ValueError(f"the settings differ from the checkpoint's ({type(module).__name__}), so resuming would not "
                         "continue the same run: " + "; ".join(differences) + ". Resume with the run's own "
                         "config.yaml and no overrides, or start a new run from the checkpoint's exported weights "
                         "(e.g. generator_weights / init_weights) with the new settings")
