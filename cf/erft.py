"""Error-Recycling Fine-Tuning (ERFT) of the long-context teacher (method §E): error banks, error injection and
the teacher's context layouts.

The teacher is a bidirectional DiT fed ``[context | noisy target]`` at one timestep. ERFT makes it robust to its own
drift: residuals of past predictions are harvested into banks bucketed by timestep (`harvest_errors`, `ErrorBanks`)
and recycled as perturbations of the target noise, the target latent and the context (`ErrorInjector`). The training
target stays ``noise_used − clean x0`` ("self-correcting").

Layouts (§E.2, positions contiguous §D.3): `dense_layout` splits a latent clip into ``[context | target]`` (the
context may be empty: a plain target); `long_layout` builds ``[sink | sparse | motion | target]`` from a pixel clip
(or from only the pixel frames it reads, `LongLayoutPlan.pixel_frames`) through the autoencoder;
`long_layout_from_latents` is its latent-index approximation for pre-encoded clips.

Latents are ``[B, C, T, h, w]``, pixels ``[B, 3, T, H, W]``; σ = t / 1000.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from cf.diffusion import nearest_grid_index, timestep_grid
from cf.error_storage import DiskEntryStore, RamEntryStore

__all__ = [
    "ErrorBank",
    "ErrorBanks",
    "ErrorInjector",
    "FifoReplacement",
    "Injection",
    "InjectionFlags",
    "InjectionInfo",
    "LongLayoutConfig",
    "LongLayoutPlan",
    "NearestL2Replacement",
    "RandomReplacement",
    "ReplacementPolicy",
    "TeacherLayout",
    "all_gather_concat",
    "bucket_timesteps",
    "dense_layout",
    "fit_error_frames",
    "harvest_errors",
    "long_layout",
    "long_layout_from_latents",
    "long_layout_plan",
    "make_replacement_policy",
]

NUM_TRAIN_TIMESTEPS = 1000

_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------------------


def bucket_timesteps(num_buckets: int = 50, shift: float = 5.0) -> Tensor:
    """Timesteps of the bank buckets, float64 ``[num_buckets]``, descending from 1000.

    ``get_timesteps(n, shift)`` semantics: σ_i = 1 − i/n for i = 0…n−1, shifted ``sσ/(1 + (s−1)σ)``, t_i = 1000·σ'_i.
    """
    if int(num_buckets) != num_buckets or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive integer (50 in the paper), got {num_buckets}")
    if num_buckets == 1:
        return torch.full((1,), float(NUM_TRAIN_TIMESTEPS), dtype=torch.float64)
    return timestep_grid(shift, int(num_buckets)) * (NUM_TRAIN_TIMESTEPS / num_buckets)


def all_gather_concat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (identity without an initialised process group).

    Every rank must pass the same shape; with NCCL the tensor must be on the rank's GPU.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------------------------------------------------------
# Replacement policies
# ----------------------------------------------------------------------------------------------------------------------


class ReplacementPolicy:
    """Chooses which stored entry of a bucket gives way to a new entry."""

    name: str = ""

    def choose(self, entries: Sequence[Tensor], entry_ids: Sequence[int], new: Tensor,
               generator: torch.Generator | None) -> int:
        """Index into ``entries`` (non-empty) of the entry to remove; ``entry_ids`` grow with insertion time."""
        raise NotImplementedError(f"{type(self).__name__} must implement choose()")


class NearestL2Replacement(ReplacementPolicy):
    """``l2_batch``: remove the stored entry nearest in L2 to the new one (entries of another shape never match;
    if no entry has the new shape, the oldest goes)."""

    name = "l2_batch"

    def choose(self, entries: Sequence[Tensor], entry_ids: Sequence[int], new: Tensor,
               generator: torch.Generator | None) -> int:
        reference = new.float()
        best_index, best_distance = -1, float("inf")
        for index, entry in enumerate(entries):
            if entry.shape != new.shape:
                continue
            distance = float(torch.sum((entry.float() - reference) ** 2))
            if distance < best_distance:
                best_index, best_distance = index, distance
        if best_index < 0:
            return FifoReplacement().choose(entries, entry_ids, new, generator)
        return best_index


class RandomReplacement(ReplacementPolicy):
    """``random``: remove a uniformly drawn entry."""

    name = "random"

    def choose(self, entries: Sequence[Tensor], entry_ids: Sequence[int], new: Tensor,
               generator: torch.Generator | None) -> int:
        return int(torch.randint(len(entries), (1,), generator=generator))


class FifoReplacement(ReplacementPolicy):
    """``fifo``: remove the oldest entry."""

    name = "fifo"

    def choose(self, entries: Sequence[Tensor], entry_ids: Sequence[int], new: Tensor,
               generator: torch.Generator | None) -> int:
        return min(range(len(entry_ids)), key=entry_ids.__getitem__)


_POLICIES: dict[str, type[ReplacementPolicy]] = {
    cls.name: cls for cls in (NearestL2Replacement, RandomReplacement, FifoReplacement)
}


def make_replacement_policy(policy: str | ReplacementPolicy) -> ReplacementPolicy:
    """A policy object from its name (``l2_batch``, ``random``, ``fifo``) or the object itself."""
    if isinstance(policy, ReplacementPolicy):
        return policy
    if policy == "l2_similarity":
        raise NotImplementedError(
            "replacement policy 'l2_similarity' is not implemented (its rule is not specified); "
            f"use one of {sorted(_POLICIES)}"
        )
    if policy not in _POLICIES:
        raise ValueError(f"unknown replacement policy {policy!r}; choose one of {sorted(_POLICIES)}")
    return _POLICIES[policy]()


# ----------------------------------------------------------------------------------------------------------------------
# Error bank
# ----------------------------------------------------------------------------------------------------------------------


class _BucketView(Sequence[Tensor]):
    """The entries of one bucket, read from the store on access (what the replacement policies see)."""

    def __init__(self, store: RamEntryStore | DiskEntryStore, slots: list[int]) -> None:
        self._store, self._slots = store, slots

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        return self._store.read(self._slots[index])


class ErrorBank:
    """Errors ``[C, T, h, w]`` stored on CPU (fp16 by default), bucketed by the nearest of ``num_buckets`` shifted
    timesteps (§E.3 step 2, step 8).

    Call `insert` once per training step, on every rank (the warm-up all-gather is collective): during the first
    ``warmup_steps`` calls the errors of all ranks are gathered and inserted, those of clean steps only with
    probability ``clean_insert_prob``; afterwards the local errors are inserted every step. A full bucket makes room
    by ``policy``; when the total cap (``max_total_entries`` / ``max_total_bytes``) is reached, an entry chosen by
    ``policy`` leaves the fullest bucket (the first one on ties).

    ``storage="memory"`` keeps the entries in RAM (any shapes). ``storage="disk"`` keeps them, all of one shape, in
    a memory-mapped file ``<storage_dir>/<name>-rank<r>.bank`` on local disk, reserved at the first insert for the
    most entries the caps allow (`cf.error_storage.DiskEntryStore`); its `state_dict` then refers to the file
    instead of carrying the entries (§E.5, §I.23). Both round an error to ``storage_dtype`` by the same conversion
    and evolve identically.

    The bank's own generator (seeded by ``seed``, part of `state_dict`) draws the clean-step insertions and random
    replacements, so a resumed bank continues exactly like the original one.
    """

    def __init__(
        self,
        num_buckets: int = 50,
        capacity: int = 500,
        shift: float = 5.0,
        policy: str | ReplacementPolicy = "l2_batch",
        max_total_entries: int | None = None,
        max_total_bytes: int | None = None,
        warmup_steps: int = 50,
        clean_insert_prob: float = 0.1,
        storage_dtype: str = "float16",
        gather: Callable[[Tensor], Tensor] | None = None,
        seed: int = 0,
        storage: str = "memory",
        storage_dir: str | os.PathLike[str] | None = None,
        name: str = "bank",
        rank: int | None = None,
    ) -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity (entries per bucket) must be a positive integer (500 nominal), got {capacity}")
        if max_total_entries is not None and max_total_entries < 1:
            raise ValueError(f"max_total_entries must be >= 1 or None (no cap), got {max_total_entries}")
        if max_total_bytes is not None and max_total_bytes < 1:
            raise ValueError(f"max_total_bytes must be >= 1 or None (no cap), got {max_total_bytes}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= clean_insert_prob <= 1.0:
            raise ValueError(f"clean_insert_prob must lie in [0, 1], got {clean_insert_prob}")
        if storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(_STORAGE_DTYPES)}, got {storage_dtype!r}")
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
        if storage == "disk" and not storage_dir:
            raise ValueError("storage='disk' needs storage_dir, a folder on local disk for the bank files "
                             "(e.g. $CF_ERROR_BANKS)")
        self.timesteps = bucket_timesteps(num_buckets, shift)
        self.num_buckets = int(num_buckets)
        self.capacity = int(capacity)
        self.shift = float(shift)
        self.policy = make_replacement_policy(policy)
        self.max_total_entries = max_total_entries
        self.max_total_bytes = max_total_bytes
        self.warmup_steps = int(warmup_steps)
        self.clean_insert_prob = float(clean_insert_prob)
        self.storage_dtype = _STORAGE_DTYPES[storage_dtype]
        self.gather = gather if gather is not None else all_gather_concat
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.steps_seen = 0
        most_entries = self.num_buckets * self.capacity
        if max_total_entries is not None:
            most_entries = min(most_entries, int(max_total_entries))
        self._store: RamEntryStore | DiskEntryStore = RamEntryStore()
        if storage == "disk":
            assert storage_dir is not None
            self._store = DiskEntryStore(storage_dir, name, self.storage_dtype, most_entries, max_total_bytes, rank)
        self._slots: list[list[int]] = [[] for _ in range(self.num_buckets)]
        self._entry_ids: list[list[int]] = [[] for _ in range(self.num_buckets)]
        self._next_entry_id = 0
        self._nbytes = 0

    # -- inspection ----------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._slots)

    @property
    def storage(self) -> str:
        """``"memory"`` or ``"disk"``."""
        return self._store.kind

    @property
    def path(self) -> Path | None:
        """The bank file of disk storage (None in RAM)."""
        return self._store.path if isinstance(self._store, DiskEntryStore) else None

    def bucket_counts(self) -> list[int]:
        """Number of entries in every bucket."""
        return [len(bucket) for bucket in self._slots]

    def bucket_entries(self, bucket: int) -> tuple[Tensor, ...]:
        """The stored entries of one bucket, oldest slot first (RAM: the stored tensors, not to be modified; disk:
        copies)."""
        entries = _BucketView(self._store, self._slots[bucket])
        return tuple(e.clone() for e in entries) if self._store.volatile_views else tuple(entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored entries."""
        return self._nbytes

    @property
    def in_warmup(self) -> bool:
        """Whether the next `insert` gathers across ranks."""
        return self.steps_seen < self.warmup_steps

    def stats(self) -> dict[str, float]:
        """Scalars for logging."""
        counts = self.bucket_counts()
        return {
            "entries": float(sum(counts)),
            "megabytes": self._nbytes / 2**20,
            "nonempty_buckets": float(sum(c > 0 for c in counts)),
            "fullest_bucket": float(max(counts)),
        }

    def bucket_index(self, t: float | Tensor) -> Tensor:
        """Bucket of each timestep: the nearest bucket timestep; long tensor with the shape of ``t`` (on CPU)."""
        t_cpu = torch.as_tensor(t).detach().to("cpu", torch.float64)
        return nearest_grid_index(t_cpu, self.timesteps)

    # -- writing -------------------------------------------------------------------------------------------------------

    def insert(self, errors: Tensor, t: Tensor, clean_step: bool, generator: torch.Generator | None = None) -> int:
        """One training step's update with errors ``[N, C, T, h, w]`` at timesteps ``t`` ``[N]``.

        Returns the number of entries stored. ``generator`` (CPU) replaces the bank's own for this call.
        """
        errors, t = self._check_errors(errors, t)
        generator = generator if generator is not None else self.generator
        warm = self.in_warmup
        self.steps_seen += 1
        if not warm:
            self.store(errors, t, generator)
            return errors.shape[0]
        meta = torch.stack([t.to(torch.float32), torch.full_like(t, float(clean_step), dtype=torch.float32)], dim=1)
        errors = self.gather(errors.detach())
        meta = self.gather(meta)
        if errors.shape[0] != meta.shape[0]:
            raise RuntimeError(
                f"the gather returned {errors.shape[0]} errors but {meta.shape[0]} timesteps; it must concatenate "
                "every rank's tensor along dim 0"
            )
        meta = meta.cpu()
        is_clean = meta[:, 1] > 0.5
        keep = ~is_clean | (torch.rand(meta.shape[0], generator=generator) < self.clean_insert_prob)
        keep_index = keep.nonzero().flatten()
        self.store(errors[keep_index.to(errors.device)], meta[keep_index, 0], generator)
        return int(keep_index.numel())

    def store(self, errors: Tensor, t: Tensor, generator: torch.Generator | None = None) -> None:
        """Put errors ``[N, C, T, h, w]`` into the buckets of ``t`` ``[N]`` (no warm-up logic, no gather)."""
        errors, t = self._check_errors(errors, t)
        generator = generator if generator is not None else self.generator
        buckets = self.bucket_index(t).tolist()
        stored = errors.detach().to("cpu", self.storage_dtype)  # the one rounding, for either storage
        for bucket, entry in zip(buckets, stored):
            self._store_one(bucket, entry, generator)

    def _store_one(self, bucket: int, entry: Tensor, generator: torch.Generator) -> None:
        entry_bytes = entry.numel() * entry.element_size()
        if self.max_total_bytes is not None and entry_bytes > self.max_total_bytes:
            raise ValueError(
                f"one error entry takes {entry_bytes} bytes, more than max_total_bytes={self.max_total_bytes}; "
                "raise max_total_bytes"
            )
        self._store.check(entry)
        if len(self._slots[bucket]) >= self.capacity:
            self._remove(bucket, self._choose(bucket, entry, generator))
        while self._over_cap(1, entry_bytes):
            counts = self.bucket_counts()
            fullest = counts.index(max(counts))
            self._remove(fullest, self._choose(fullest, entry, generator))
        self._slots[bucket].append(self._store.write(entry))
        self._entry_ids[bucket].append(self._next_entry_id)
        self._next_entry_id += 1
        self._nbytes += entry_bytes

    def _choose(self, bucket: int, new: Tensor, generator: torch.Generator | None) -> int:
        entries = _BucketView(self._store, self._slots[bucket])
        return self.policy.choose(entries, self._entry_ids[bucket], new, generator)

    def _over_cap(self, extra_entries: int, extra_bytes: int) -> bool:
        if len(self) == 0:
            return False
        if self.max_total_entries is not None and len(self) + extra_entries > self.max_total_entries:
            return True
        return self.max_total_bytes is not None and self._nbytes + extra_bytes > self.max_total_bytes

    def _remove(self, bucket: int, index: int) -> None:
        slot = self._slots[bucket].pop(index)
        self._entry_ids[bucket].pop(index)
        entry = self._store.read(slot)
        self._nbytes -= entry.numel() * entry.element_size()
        self._store.release(slot)

    def _check_errors(self, errors: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        if errors.dim() != 5:
            raise ValueError(f"errors must be [N, C, T, h, w], got shape {tuple(errors.shape)}")
        t = torch.as_tensor(t, device=errors.device)
        if t.dim() == 0:
            t = t.expand(errors.shape[0])
        if t.shape != (errors.shape[0],):
            raise ValueError(f"t must hold one timestep per error ([{errors.shape[0]}]), got shape {tuple(t.shape)}")
        return errors, t.to(torch.float32)

    # -- reading -------------------------------------------------------------------------------------------------------

    def sample(self, t: float | Tensor, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """A uniformly drawn entry ``[C, T, h, w]`` (a copy) of the bucket of the scalar ``t`` (None if the bucket is
        empty)."""
        t = torch.as_tensor(t)
        if t.numel() != 1:
            raise ValueError(f"sample() takes one timestep, got shape {tuple(t.shape)}; call it once per sample")
        slots = self._slots[int(self.bucket_index(t.reshape(())))]
        if not slots:
            return None
        index = int(torch.randint(len(slots), (1,), generator=generator))
        return self._store.read(slots[index]).to(device=device, dtype=dtype, copy=True)

    def sample_any(self, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor | None:
        """A uniformly drawn entry (a copy) of the union of all buckets, or None if the bank is empty."""
        total = len(self)
        if total == 0:
            return None
        index = int(torch.randint(total, (1,), generator=generator))
        for slots in self._slots:
            if index < len(slots):
                return self._store.read(slots[index]).to(device=device, dtype=dtype, copy=True)
            index -= len(slots)
        raise AssertionError("unreachable: index within the bank's size")

    # -- training state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: entries in order (disk storage: a reference to them in the bank
        file, with a CRC-32 per entry), their ages, the step counter and the RNG.

        With disk storage the file is flushed, and the slots this state refers to are not rewritten before the next
        `state_dict` call, so the latest state stays loadable however long the bank is used after it.
        """
        return {
            "num_buckets": self.num_buckets,
            "shift": self.shift,
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            **self._store.export(self._slots),
            "entry_ids": [list(ids) for ids in self._entry_ids],
            "next_entry_id": self._next_entry_id,
            "steps_seen": self.steps_seen,
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` of either storage (a disk state of another file is copied into this bank's own
        file or into RAM); bucket layout and storage dtype must match this bank's settings. Entries read from a bank
        file are checked against their CRC-32."""
        if state["num_buckets"] != self.num_buckets or float(state["shift"]) != self.shift:
            raise ValueError(
                f"error-bank state has {state['num_buckets']} buckets at shift {state['shift']} but this bank has "
                f"{self.num_buckets} at shift {self.shift}; build the bank with the checkpoint's settings"
            )
        if _STORAGE_DTYPES.get(state["storage_dtype"]) != self.storage_dtype:
            raise ValueError(
                f"error-bank state is stored as {state['storage_dtype']} but this bank uses {self.storage_dtype}; "
                "build the bank with the checkpoint's storage_dtype"
            )
        counts = [len(bucket) for bucket in (state["slots"] if state.get("storage") == "disk" else state["entries"])]
        if max(counts, default=0) > self.capacity:
            raise ValueError(
                f"error-bank state has a bucket with {max(counts)} entries, more than capacity={self.capacity}; "
                "build the bank with the checkpoint's capacity"
            )
        try:
            self._slots = self._store.restore(state, self.storage_dtype)
        except Exception:
            self.close()
            raise
        self._entry_ids = [[int(i) for i in ids] for ids in state["entry_ids"]]
        self._next_entry_id = int(state["next_entry_id"])
        self.steps_seen = int(state["steps_seen"])
        self.generator.set_state(state["generator_state"].clone())
        self._nbytes = sum(e.numel() * e.element_size() for bucket in self._slots
                           for e in _BucketView(self._store, bucket))

    def close(self) -> None:
        """Release the storage (disk: unmap and unlock the file, which stays on disk); the bank is empty afterwards."""
        self._store.close()
        self._slots = [[] for _ in range(self.num_buckets)]
        self._entry_ids = [[] for _ in range(self.num_buckets)]
        self._nbytes = 0


class ErrorBanks:
    """The teacher's two banks: ``noise`` holds noise errors ``(1 − σ)Δ`` and ``latent`` holds y errors ``−σΔ``.

    Both are built with the same settings (each bank gets its own caps and, on disk, its own file ``noise-rank<r>``
    / ``latent-rank<r>``) and seeds ``seed`` and ``seed + 1``.
    """

    def __init__(self, num_buckets: int = 50, capacity: int = 500, shift: float = 5.0,
                 policy: str = "l2_batch", max_total_entries: int | None = None,
                 max_total_bytes: int | None = None, warmup_steps: int = 50, clean_insert_prob: float = 0.1,
                 storage_dtype: str = "float16", gather: Callable[[Tensor], Tensor] | None = None,
                 seed: int = 0, storage: str = "memory", storage_dir: str | os.PathLike[str] | None = None,
                 rank: int | None = None) -> None:
        settings = dict(num_buckets=num_buckets, capacity=capacity, shift=shift, policy=policy,
                        max_total_entries=max_total_entries, max_total_bytes=max_total_bytes,
                        warmup_steps=warmup_steps, clean_insert_prob=clean_insert_prob, storage_dtype=storage_dtype,
                        gather=gather, storage=storage, storage_dir=storage_dir, rank=rank)
        self.noise = ErrorBank(**settings, seed=seed, name="noise")
        self.latent = ErrorBank(**settings, seed=seed + 1, name="latent")

    def insert(self, noise_errors: Tensor, latent_errors: Tensor, t: Tensor, clean_step: bool) -> tuple[int, int]:
        """One step's update of both banks (call on every rank, every step); returns the entries stored in each."""
        return (self.noise.insert(noise_errors, t, clean_step), self.latent.insert(latent_errors, t, clean_step))

    def harvest(self, flow_pred: Tensor, flow_target: Tensor, t: Tensor, clean_step: bool) -> tuple[int, int]:
        """`harvest_errors` at σ = t/1000 on the target frames ``[B, C, T, h, w]``, then `insert`."""
        noise_errors, latent_errors = harvest_errors(flow_pred, flow_target, torch.as_tensor(t) / NUM_TRAIN_TIMESTEPS)
        return self.insert(noise_errors, latent_errors, t, clean_step)

    def stats(self) -> dict[str, float]:
        """Scalars for logging, prefixed ``noise/`` and ``latent/``."""
        return {f"{name}/{key}": value for name, bank in (("noise", self.noise), ("latent", self.latent))
                for key, value in bank.stats().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise.state_dict(), "latent": self.latent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.load_state_dict(state["noise"])
        self.latent.load_state_dict(state["latent"])

    def close(self) -> None:
        """Release both banks' storage (see `ErrorBank.close`)."""
        self.noise.close()
        self.latent.close()


# ----------------------------------------------------------------------------------------------------------------------
# Harvest and injection
# ----------------------------------------------------------------------------------------------------------------------


def _sigma_like(sigma: float | Tensor, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if sigma.dim() == 0:
        return sigma
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or one value per sample ([{x.shape[0]}]), got {tuple(sigma.shape)}")
    return sigma.view(-1, *([1] * (x.dim() - 1)))


def harvest_errors(flow_pred: Tensor, flow_target: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
    """Residuals of one prediction (§E.3 step 7), detached, with Δ = v̂ − v* on the target frames ``[B, C, T, h, w]``.

    Returns (noise error ``(1 − σ)·Δ`` = ε̂ − ε*, latent (y) error ``−σ·Δ`` = x̂0 − x0*), at least float32;
    σ is a scalar or ``[B]``.
    """
    if flow_pred.shape != flow_target.shape:
        raise ValueError(f"flow_pred {tuple(flow_pred.shape)} and flow_target {tuple(flow_target.shape)} must match")
    with torch.no_grad():
        dtype = torch.promote_types(flow_pred.dtype, torch.float32)
        delta = flow_pred.detach().to(dtype) - flow_target.detach().to(dtype)
        s = _sigma_like(sigma, delta)
        return (1 - s) * delta, -s * delta


def fit_error_frames(error: Tensor, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
    """Match an error ``[C, T_e, h, w]`` to ``num_frames`` frames.

    Longer errors give a random contiguous crop (offset uniform in [0, T_e − num_frames]); shorter ones are tiled
    cyclically along time from frame 0 (``e[k mod T_e]``); equal lengths pass through without drawing.
    """
    if error.dim() != 4:
        raise ValueError(f"an error entry must be [C, T, h, w], got shape {tuple(error.shape)}")
    length = error.shape[1]
    if length == num_frames:
        return error
    if length > num_frames:
        start = int(torch.randint(length - num_frames + 1, (1,), generator=generator))
        return error[:, start:start + num_frames]
    return error[:, torch.arange(num_frames, device=error.device) % length]


@dataclass
class InjectionFlags:
    """Which error kinds a step tries to inject (§E.3 step 3); a clean step has all three off."""

    noise: bool
    latent: bool
    context: bool
    clean_step: bool


@dataclass
class InjectionInfo:
    """What was actually injected, per sample (``[B]`` bool; false where the flag was off or the bucket empty)."""

    noise_applied: Tensor
    latent_applied: Tensor
    context_applied: Tensor
    clean_step: bool


class Injection(NamedTuple):
    """Result of `ErrorInjector.inject`; the training target is ``noise − target_x0`` (clean x0)."""

    noisy_target: Tensor
    noise: Tensor
    context: Tensor | None
    info: InjectionInfo


@dataclass
class ErrorInjector:
    """Bernoulli error injection of ERFT (§E.3 steps 3–5); probabilities and the intensity range m.

    Each injected error is scaled by U(1 − m, 1 + m), m = ``error_modulate`` (0: exactly ×1).
    """

    noise_prob: float = 0.01
    context_prob: float = 0.9
    latent_prob: float = 0.9
    clean_prob: float = 0.5
    error_modulate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("noise_prob", "context_prob", "latent_prob", "clean_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if not 0.0 <= self.error_modulate <= 1.0:
            raise ValueError(f"error_modulate must lie in [0, 1] (scale drawn from U(1 − m, 1 + m)), "
                             f"got {self.error_modulate}")

    def draw_flags(self, generator: torch.Generator | None = None) -> InjectionFlags:
        """Independent Bernoullis for noise, context and latent errors, then a clean-step switch that turns all off.

        Always consumes four uniforms from ``generator``.
        """
        u = torch.rand(4, generator=generator).tolist()
        clean = u[3] < self.clean_prob
        return InjectionFlags(noise=not clean and u[0] < self.noise_prob, latent=not clean and u[2] < self.latent_prob,
                              context=not clean and u[1] < self.context_prob, clean_step=clean)

    def inject(self, target_x0: Tensor, noise: Tensor, context: Tensor | None, t: float | Tensor, banks: ErrorBanks,
               flags: InjectionFlags, generator: torch.Generator | None = None,
               context_error_slice: slice | None = None) -> Injection:
        """Perturb one batch and build the noisy target (§E.3 steps 4–5).

        target_x0, noise: ``[B, C, T, h, w]`` clean target latents and their noise; context ``[B, C, T_c, h, w]`` or
        None; t: scalar or ``[B]``. Per sample: noise += e from ``banks.noise[g(t)]``, x0 += e from
        ``banks.latent[g(t)]``, and ``context[:, :, context_error_slice]`` (default: all of it; the motion latents
        in the long layout) += e from the union of all ``banks.latent`` buckets. Errors are fitted to the frame count
        by `fit_error_frames`. Returns ``x_t = (1 − σ)·x0_in + σ·noise_used`` with σ = t/1000.
        """
        if target_x0.dim() != 5 or noise.shape != target_x0.shape:
            raise ValueError(f"target_x0 must be [B, C, T, h, w] and noise the same shape, got "
                             f"{tuple(target_x0.shape)} and {tuple(noise.shape)}")
        batch = target_x0.shape[0]
        t_rows = torch.as_tensor(t).detach().to("cpu", torch.float64)
        if t_rows.dim() == 0:
            t_rows = t_rows.expand(batch)
        if t_rows.shape != (batch,):
            raise ValueError(f"t must be a scalar or [B] = [{batch}], got shape {tuple(t_rows.shape)}")

        def draw(bank: ErrorBank, t_value: float | None, num_frames: int, like: Tensor) -> Tensor | None:
            error = bank.sample_any(generator) if t_value is None else bank.sample(t_value, generator)
            if error is None:
                return None
            if error.shape[0] != like.shape[1] or error.shape[2:] != like.shape[3:]:
                raise ValueError(
                    f"bank errors have shape [C, T, h, w] = {tuple(error.shape)} but the latents are "
                    f"{tuple(like.shape)}; channels and spatial size must match (reset the banks after changing "
                    "the resolution)"
                )
            error = fit_error_frames(error, num_frames, generator)
            if self.error_modulate > 0:
                scale = 1 + self.error_modulate * (2 * float(torch.rand(1, generator=generator)) - 1)
                error = error * scale
            return error.to(device=like.device, dtype=like.dtype)

        def perturb(x: Tensor, bank: ErrorBank, enabled: bool, frames: slice, from_all: bool) -> tuple[Tensor, Tensor]:
            applied = torch.zeros(batch, dtype=torch.bool)
            num_frames = len(range(*frames.indices(x.shape[2])))
            if not enabled or num_frames == 0:
                return x, applied
            out = x.clone()
            for b in range(batch):
                error = draw(bank, None if from_all else float(t_rows[b]), num_frames, x)
                if error is not None:
                    out[b, :, frames] += error
                    applied[b] = True
            return (out if applied.any() else x), applied

        every_frame = slice(None)
        noise_used, noise_applied = perturb(noise, banks.noise, flags.noise, every_frame, from_all=False)
        x0_in, latent_applied = perturb(target_x0, banks.latent, flags.latent, every_frame, from_all=False)
        context_used, context_applied = context, torch.zeros(batch, dtype=torch.bool)
        if context is not None:
            if context.dim() != 5 or context.shape[0] != batch or context.shape[1] != target_x0.shape[1] \
                    or context.shape[3:] != target_x0.shape[3:]:
                raise ValueError(f"context must be [B, C, T_c, h, w] like the target {tuple(target_x0.shape)}, "
                                 f"got {tuple(context.shape)}")
            frames = context_error_slice if context_error_slice is not None else every_frame
            context_used, context_applied = perturb(context, banks.latent, flags.context, frames, from_all=True)

        s = _sigma_like(t_rows.to(target_x0.device) / NUM_TRAIN_TIMESTEPS, target_x0)
        noisy = ((1 - s) * x0_in + s * noise_used).to(target_x0.dtype)
        info = InjectionInfo(noise_applied=noise_applied, latent_applied=latent_applied,
                             context_applied=context_applied, clean_step=flags.clean_step)
        return Injection(noisy, noise_used, context_used, info)


# ----------------------------------------------------------------------------------------------------------------------
# Teacher layouts
# ----------------------------------------------------------------------------------------------------------------------


class VideoEncoder(Protocol):
    """What the layouts need from an autoencoder (see cf.encoders.VideoAutoencoder)."""

    temporal_factor: int

    def encode(self, video: Tensor) -> Tensor: ...


def _clip_latent_frames(index: int, temporal_factor: int, offset: int = 0) -> tuple[int, ...]:
    """Pixel frames of latent ``index`` of a clip starting at pixel frame ``offset`` (latent 0 is one frame)."""
    if index == 0:
        return (offset,)
    first = offset + temporal_factor * (index - 1) + 1
    return tuple(range(first, first + temporal_factor))


@dataclass
class TeacherLayout:
    """One teacher input sequence.

    latents: ``[B, C, T_total, h, w]``; segments: ordered name → frame slice, the target last; source_pixel_frames:
    per latent frame, the pixel frames of the clip it encodes; context_error_segment: the context segment that
    receives context errors. Positions are contiguous ``0 … T_total − 1`` (§D.3).
    """

    latents: Tensor
    segments: dict[str, slice]
    source_pixel_frames: tuple[tuple[int, ...], ...]
    context_error_segment: str

    def segment(self, name: str) -> Tensor:
        """Latents ``[B, C, n, h, w]`` of one segment."""
        return self.latents[:, :, self.segments[name]]

    @property
    def num_context_frames(self) -> int:
        return self.segments["target"].start

    @property
    def context(self) -> Tensor:
        """Everything before the target, ``[B, C, T_c, h, w]``."""
        return self.latents[:, :, : self.num_context_frames]

    @property
    def target(self) -> Tensor:
        """``[B, C, T_target, h, w]``."""
        return self.segment("target")

    @property
    def context_error_slice(self) -> slice:
        """Frames of `context` that receive context errors (for `ErrorInjector.inject`)."""
        return self.segments[self.context_error_segment]

    @property
    def positions(self) -> Tensor:
        """Temporal positions ``[T_total]``: 0 … T_total − 1."""
        return torch.arange(self.latents.shape[2], device=self.latents.device)


def _segments(lengths: Sequence[tuple[str, int]]) -> dict[str, slice]:
    segments, start = {}, 0
    for name, length in lengths:
        segments[name] = slice(start, start + length)
        start += length
    return segments


def dense_layout(latents: Tensor, num_context: int | None = None, temporal_factor: int = 4,
                 first_frame: int = 0) -> TeacherLayout:
    """``[context | target]`` from a latent clip ``[B, C, T, h, w]`` split at ``num_context`` (default T // 2).

    ``num_context = 0`` gives a plain target without context (what a stage-1 student asks the teacher to score).
    Source pixel frames assume the clip was encoded from pixel frame ``first_frame`` of its video. Context errors go
    to the whole context.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, C, T, h, w], got shape {tuple(latents.shape)}")
    total = latents.shape[2]
    num_context = total // 2 if num_context is None else num_context
    if not 0 <= num_context < total:
        raise ValueError(f"num_context must lie in [0, {total - 1}] for a {total}-frame latent clip, got {num_context}")
    return TeacherLayout(
        latents=latents,
        segments=_segments([("context", num_context), ("target", total - num_context)]),
        source_pixel_frames=tuple(_clip_latent_frames(i, temporal_factor, first_frame) for i in range(total)),
        context_error_segment="context",
    )


@dataclass(frozen=True)
class LongLayoutConfig:
    """Counts of the long layout ``[sink | sparse | motion | target]`` (§E.2; defaults are the paper's).

    sink_latents, motion_latents, target_latents: latent frames per segment; sparse_stride: pixel frames between
    sparse snippet starts; sparse_window_frames: sparse snippets come from the last this-many pixel frames before
    the motion clip; min_sparse_latents: fewer sparse latents than this makes the clip too short.
    The toy (§J.3, sink 3 | sparse 2 | motion 6 | target 6) is e.g. ``LongLayoutConfig(3, 6, 6, 8, 16)``.
    """

    sink_latents: int = 3
    motion_latents: int = 6
    target_latents: int = 21
    sparse_stride: int = 24
    sparse_window_frames: int = 288
    min_sparse_latents: int = 2

    def __post_init__(self) -> None:
        for name in ("sink_latents", "motion_latents", "target_latents", "sparse_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sparse_window_frames", "min_sparse_latents"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class LongLayoutPlan:
    """Pixel-frame arithmetic of the long layout for one clip length.

    sink_frames: encoded alone; sparse_snippets: 1 + f frames each, encoded alone, latent 1 kept;
    motion_target_frames: 1 + f·(motion + target) frames encoded together, latent 0 dropped.
    """

    num_pixel_frames: int
    temporal_factor: int
    sink_frames: range
    sparse_snippets: tuple[range, ...]
    motion_target_frames: range
    config: LongLayoutConfig = field(repr=False)

    def source_pixel_frames(self) -> tuple[tuple[int, ...], ...]:
        """Pixel frames of every latent of the layout, in layout order."""
        f, c = self.temporal_factor, self.config
        sink = [_clip_latent_frames(i, f, self.sink_frames.start) for i in range(c.sink_latents)]
        sparse = [_clip_latent_frames(1, f, snippet.start) for snippet in self.sparse_snippets]
        motion_target = [_clip_latent_frames(i, f, self.motion_target_frames.start)
                         for i in range(1, 1 + c.motion_latents + c.target_latents)]
        return tuple(sink + sparse + motion_target)

    def pixel_frames(self) -> tuple[int, ...]:
        """Every pixel frame the layout reads, ascending (sink, snippets, motion + target with its leading frame)."""
        frames = {*self.sink_frames, *self.motion_target_frames}
        for snippet in self.sparse_snippets:
            frames.update(snippet)
        return tuple(sorted(frames))


def _long_min_pixel_frames(config: LongLayoutConfig, temporal_factor: int) -> int:
    f = temporal_factor
    sink = 1 + f * (config.sink_latents - 1)
    motion_target = 1 + f * (config.motion_latents + config.target_latents)
    sparse = 0 if config.min_sparse_latents == 0 else (1 + f) + config.sparse_stride * (config.min_sparse_latents - 1)
    return sink + sparse + motion_target


def long_layout_plan(num_pixel_frames: int, config: LongLayoutConfig | None = None,
                     temporal_factor: int = 4) -> LongLayoutPlan:
    """Which pixel frames feed which segment (§E.2), for a clip of ``num_pixel_frames``.

    Sink = frames ``0 … f(sink − 1)``. Motion + target = the last ``f·(motion + target)`` frames plus one leading
    frame. The sparse region lies between the sink and that leading frame, limited to its last
    ``sparse_window_frames``; snippets of ``1 + f`` frames start at the region start and every ``sparse_stride``
    frames after it while they fit. With the paper's counts a 160-frame clip gives 2 sparse latents and clips of
    ≥ 387 frames give 12; the shortest valid clip has 147 frames.
    """
    config = config or LongLayoutConfig()
    f = temporal_factor
    sink_len = 1 + f * (config.sink_latents - 1)
    motion_target_len = 1 + f * (config.motion_latents + config.target_latents)
    snippet_len = 1 + f
    window_capacity = 0 if config.sparse_window_frames < snippet_len else \
        (config.sparse_window_frames - snippet_len) // config.sparse_stride + 1
    if config.min_sparse_latents > window_capacity:
        raise ValueError(
            f"min_sparse_latents={config.min_sparse_latents} cannot be reached: a window of "
            f"{config.sparse_window_frames} pixel frames holds at most {window_capacity} snippets of {snippet_len} "
            f"frames at stride {config.sparse_stride}; enlarge sparse_window_frames or lower min_sparse_latents"
        )
    minimum = _long_min_pixel_frames(config, f)
    if num_pixel_frames < minimum:
        raise ValueError(
            f"a clip of {num_pixel_frames} pixel frames is too short for the long teacher layout: it needs at least "
            f"{minimum} ({sink_len} sink + {minimum - sink_len - motion_target_len} for {config.min_sparse_latents} "
            f"sparse latents + {motion_target_len} motion/target); filter shorter clips out or lower the counts"
        )
    motion_target_start = num_pixel_frames - motion_target_len
    region_start = max(sink_len, motion_target_start - config.sparse_window_frames)
    snippet_starts = range(region_start, motion_target_start - snippet_len + 1, config.sparse_stride)
    return LongLayoutPlan(
        num_pixel_frames=num_pixel_frames,
        temporal_factor=f,
        sink_frames=range(0, sink_len),
        sparse_snippets=tuple(range(s, s + snippet_len) for s in snippet_starts),
        motion_target_frames=range(motion_target_start, num_pixel_frames),
        config=config,
    )


def _encode_checked(autoencoder: VideoEncoder, video: Tensor, expected_latents: int, what: str) -> Tensor:
    latents = autoencoder.encode(video)
    if latents.dim() != 5 or latents.shape[2] != expected_latents:
        raise ValueError(
            f"encoding the {what} ({video.shape[2]} pixel frames) gave latents of shape {tuple(latents.shape)}, "
            f"expected {expected_latents} latent frames; the autoencoder must map 1 + 4k frames to 1 + k latents"
        )
    return latents


def long_layout(video: Tensor, autoencoder: VideoEncoder, config: LongLayoutConfig | None = None,
                frame_index: Sequence[int] | Tensor | None = None) -> TeacherLayout:
    """``[sink | sparse | motion | target]`` from a pixel clip ``[B, 3, N, H, W]`` (§E.2, `long_layout_plan`).

    Without ``frame_index`` the video is the whole clip, pixel frames ``0 … N − 1``. With it (``[N]`` ascending
    pixel-frame numbers of the clip, the last one being its last frame) the video holds only those frames, which
    must be exactly the plan's `LongLayoutPlan.pixel_frames` for a clip ending there (what a data pipeline decodes
    to avoid reading the whole clip). Each part is encoded on its own (no grad); context errors go to the motion
    latents only.
    """
    config = config or LongLayoutConfig()
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be pixels [B, 3, N, H, W], got shape {tuple(video.shape)}")
    temporal_factor = int(getattr(autoencoder, "temporal_factor", 4))
    if frame_index is None:
        plan = long_layout_plan(video.shape[2], config, temporal_factor)
        position = None
    else:
        held = [int(i) for i in torch.as_tensor(frame_index).reshape(-1).tolist()]
        if len(held) != video.shape[2]:
            raise ValueError(f"frame_index names {len(held)} pixel frames but the video holds {video.shape[2]}")
        plan = long_layout_plan(held[-1] + 1, config, temporal_factor)
        needed = list(plan.pixel_frames())
        if held != needed:
            raise ValueError(
                f"the clip holds pixel frames {_frame_ranges(held)} but the long layout {config} of a clip ending at "
                f"frame {held[-1]} reads {_frame_ranges(needed)}; the data's long_layout (data.teacher_clips) must "
                "equal the model's long_layout"
            )
        position = {frame: i for i, frame in enumerate(held)}

    def frames(r: range) -> Tensor:
        if position is None:
            return video[:, :, r.start:r.stop]
        start = position[r.start]
        return video[:, :, start:start + len(r)]  # held frames are ascending and hold all of r

    with torch.no_grad():
        sink = _encode_checked(autoencoder, frames(plan.sink_frames), config.sink_latents, "sink")
        sparse = [_encode_checked(autoencoder, frames(snippet), 2, "sparse snippet")[:, :, 1:2]
                  for snippet in plan.sparse_snippets]
        motion_target = _encode_checked(autoencoder, frames(plan.motion_target_frames),
                                        1 + config.motion_latents + config.target_latents, "motion + target clip")
    latents = torch.cat([sink, *sparse, motion_target[:, :, 1:]], dim=2)
    return TeacherLayout(
        latents=latents,
        segments=_segments([("sink", config.sink_latents), ("sparse", len(sparse)),
                            ("motion", config.motion_latents), ("target", config.target_latents)]),
        source_pixel_frames=plan.source_pixel_frames(),
        context_error_segment="motion",
    )


def _frame_ranges(frames: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0-2, 5-6"`` for error messages."""
    parts, start = [], None
    for i, frame in enumerate(frames):
        if start is None:
            start = frame
        if i + 1 == len(frames) or frames[i + 1] != frame + 1:
            parts.append(f"{start}" if start == frame else f"{start}-{frame}")
            start = None
    return ", ".join(parts) or "none"


def long_layout_from_latents(latents: Tensor, config: LongLayoutConfig | None = None,
                             temporal_factor: int = 4) -> TeacherLayout:
    """The long layout from a pre-encoded clip ``[B, C, n, h, w]`` (encoded from pixel frame 0) by latent indices.

    Sink = latents ``0 … sink − 1``; motion and target = the last ``motion + target`` latents; sparse = every
    ``sparse_stride / f``-th latent of the region between them, from its start, limited to the last
    ``sparse_window_frames / f`` latents. It approximates `long_layout`: sink, motion and target cover the same
    pixel frames (identical for encoders without temporal context across latents, such as the toy; a causal VAE
    like Wan's encodes motion/target with the clip's history instead of a fresh start), while each sparse latent
    covers the four frames one earlier than a pixel snippet's kept latent would (``f(j − 1) + 1 … f·j``), because
    snippet starts are not latent-aligned.
    """
    config = config or LongLayoutConfig()
    f = temporal_factor
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, C, n, h, w], got shape {tuple(latents.shape)}")
    if config.sparse_stride % f or config.sparse_window_frames % f:
        raise ValueError(
            f"sparse_stride ({config.sparse_stride}) and sparse_window_frames ({config.sparse_window_frames}) must "
            f"be multiples of the temporal factor {f} to pick sparse context from latents; use long_layout on pixels"
        )
    stride, window = config.sparse_stride // f, config.sparse_window_frames // f
    if config.min_sparse_latents > window:
        raise ValueError(f"min_sparse_latents={config.min_sparse_latents} exceeds the {window}-latent sparse window; "
                         "enlarge sparse_window_frames or lower min_sparse_latents")
    total = latents.shape[2]
    minimum = config.sink_latents + config.motion_latents + config.target_latents + (
        0 if config.min_sparse_latents == 0 else 1 + stride * (config.min_sparse_latents - 1))
    if total < minimum:
        raise ValueError(
            f"a clip of {total} latent frames is too short for the long teacher layout: it needs at least {minimum} "
            f"latent frames ({1 + f * (minimum - 1)} pixel frames); filter shorter clips out or lower the counts"
        )
    region_end = total - config.motion_latents - config.target_latents
    region_start = max(config.sink_latents, region_end - window)
    sparse_index = list(range(region_start, region_end, stride))
    index = [*range(config.sink_latents), *sparse_index, *range(region_end, total)]
    return TeacherLayout(
        latents=latents[:, :, index],
        segments=_segments([("sink", config.sink_latents), ("sparse", len(sparse_index)),
                            ("motion", config.motion_latents), ("target", config.target_latents)]),
        source_pixel_frames=tuple(_clip_latent_frames(i, f) for i in index),
        context_error_segment="motion",
    )
