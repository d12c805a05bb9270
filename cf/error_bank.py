"""ERFT error banks (method §E.3, §E.5, §I.23): residuals of the teacher's own predictions, bucketed by timestep.

`harvest_errors` turns a prediction's residual into the two errors of §E.3 step 7; `ErrorBank` stores them per
timestep bucket up to a capacity (replacement policies: nearest-L2, random, FIFO), in RAM or in a memory-mapped
file on local disk (`cf.error_storage`); `ErrorBanks` holds the noise and latent banks of one rank.
Latents are ``[B, C, T, h, w]``; σ = t / 1000.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from cf.diffusion import nearest_grid_index, timestep_grid
from cf.error_storage import DiskEntryStore, RamEntryStore

__all__ = [
    "ErrorBank",
    "ErrorBanks",
    "FifoReplacement",
    "NUM_TRAIN_TIMESTEPS",
    "NearestL2Replacement",
    "RandomReplacement",
    "ReplacementPolicy",
    "all_gather_concat",
    "broadcast_sigma",
    "bucket_timesteps",
    "harvest_errors",
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
# Harvest
# ----------------------------------------------------------------------------------------------------------------------


def broadcast_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
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
        s = broadcast_sigma(sigma, delta)
        return (1 - s) * delta, -s * delta
