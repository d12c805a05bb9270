"""Typed arguments of the LightningModules from YAML values, and the seeds of their random draws.

LightningCLI hands a dataclass-typed argument over either as the dataclass or as a mapping of its fields; the
modules accept both. Random draws of training come from generators seeded by a stable hash of (seed, step, phase,
micro-batch[, rank]), so every rank and every resumed run draws the same values without communication.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["as_dataclass", "stable_seed"]


def as_dataclass(value: Any, cls: type[T], name: str) -> T:
    """``value`` if it is a ``cls``, else ``cls(**value)`` for a mapping; a TypeError naming ``name`` otherwise."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
