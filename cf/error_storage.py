"""Where the ERFT error banks keep their entries (method §E.3 step 8, §E.5, §I.23).

`RamEntryStore` keeps every entry as its own CPU tensor. `DiskEntryStore` keeps entries of one shape ``[C, T, h, w]``
in a memory-mapped file on local disk, one file per bank and rank (``<storage_dir>/<name>-rank<r>.bank``),
preallocated at the first write for the most entries the bank can hold (its entry and byte caps) and grown only
when needed. The stores receive entries already converted to the storage dtype, so an error is rounded once, by the
same conversion, wherever it is kept.

Checkpoints: a RAM store's state carries the entries. A disk store's state carries a reference: the file, the slot of
every entry and the CRC-32 of every entry's bytes; restoring checks every CRC, so a resumed bank holds exactly the
saved entries or the load fails. A slot that the latest exported state refers to is not rewritten before the next
export (freed slots wait), so the latest checkpoint of a run stays consistent however far the run went on after it.
Older checkpoints stay loadable while none of their slots were reused; the CRC check tells.
"""

from __future__ import annotations

import fcntl
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from cf.zero import rank_and_world

__all__ = ["DiskEntryStore", "RamEntryStore", "entry_checksum", "state_entries"]

GROW_BYTES = 2**30  # a disk store that must grow beyond its reservation adds about this much at a time


def entry_checksum(entry: Tensor) -> int:
    """CRC-32 of the bytes of a CPU tensor (any dtype), as stored."""
    return zlib.crc32(entry.contiguous().reshape(-1).view(torch.uint8).numpy())


def _storage_kind(state: dict[str, Any]) -> str:
    return str(state.get("storage", "memory"))


def state_entries(state: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """``(bucket, entry)`` for every entry of a bank state of either storage, bucket by bucket, oldest slot first.

    Entries of a disk state are read from its file (views of a private mapping, valid while referenced) and checked
    against their CRC-32.
    """
    if _storage_kind(state) == "memory":
        for bucket, entries in enumerate(state["entries"]):
            for entry in entries:
                yield bucket, entry.detach().to("cpu", dtype)
        return
    slots, checksums = state["slots"], state["checksums"]
    if not any(slots):
        return
    path = Path(state["path"])
    shape = tuple(int(d) for d in state["entry_shape"])
    source = _map_file(path, max(max(b) for b in slots if b) + 1, shape, dtype, shared=False)
    for bucket, (bucket_slots, bucket_checksums) in enumerate(zip(slots, checksums)):
        for slot, checksum in zip(bucket_slots, bucket_checksums):
            entry = source[slot]
            if entry_checksum(entry) != int(checksum):
                raise ValueError(_stale_message(path, slot, bucket))
            yield bucket, entry


def _stale_message(path: Path, slot: int, bucket: int) -> str:
    return (f"the error-bank file {path} no longer holds the entries this state refers to (slot {slot} of bucket "
            f"{bucket} changed since the state was saved). Only a run's latest checkpoint is kept consistent with its "
            "bank files, and a new run in the same storage_dir overwrites them: resume from the latest checkpoint of "
            "the run that wrote the files")


def _map_file(path: Path, num_slots: int, shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> Tensor:
    """The first ``num_slots`` entries of a bank file as a tensor ``[num_slots, *shape]`` mapped onto the file."""
    numel = math.prod(shape)
    needed = num_slots * numel * torch.empty((), dtype=dtype).element_size()
    if not path.is_file():
        raise FileNotFoundError(
            f"the error-bank file {path} does not exist. Disk-stored banks live outside the checkpoint, on the local "
            "disk of the rank that wrote them: resume on the same machines with the same storage_dir "
            "(CF_ERROR_BANKS), or copy the files there"
        )
    if path.stat().st_size < needed:
        raise ValueError(f"the error-bank file {path} has {path.stat().st_size} bytes but the state refers to "
                         f"{num_slots} entries of {list(shape)} ({needed} bytes); it is not the file that state was "
                         "saved with")
    return torch.from_file(str(path), shared=shared, size=num_slots * numel, dtype=dtype).view(num_slots, *shape)


class RamEntryStore:
    """Entries as separate CPU tensors (any shapes); a slot is an id that is never reused."""

    kind = "memory"
    volatile_views = False  # `read` returns the stored tensor, which is never written again

    def __init__(self) -> None:
        self._entries: dict[int, Tensor] = {}
        self._next_slot = 0

    def check(self, entry: Tensor) -> None:
        """Raise if ``entry`` cannot be stored (never for RAM)."""

    def write(self, entry: Tensor) -> int:
        """Store a copy of ``entry`` (already in the storage dtype); returns its slot."""
        slot = self._next_slot
        self._next_slot += 1
        self._entries[slot] = entry.clone()
        return slot

    def read(self, slot: int) -> Tensor:
        return self._entries[slot]

    def release(self, slot: int) -> None:
        del self._entries[slot]

    def export(self, slots: Sequence[Sequence[int]]) -> dict[str, Any]:
        """State of the entries at ``slots`` (per bucket): the tensors themselves."""
        return {"storage": self.kind, "entries": [[self._entries[s] for s in bucket] for bucket in slots]}

    def restore(self, state: dict[str, Any], dtype: torch.dtype) -> list[list[int]]:
        """Replace the contents with the entries of a state of either storage; returns the slots per bucket."""
        self.close()
        slots: list[list[int]] = [[] for _ in range(_num_buckets(state))]
        for bucket, entry in state_entries(state, dtype):
            slots[bucket].append(self.write(entry))
        return slots

    def close(self) -> None:
        """Drop every entry."""
        self._entries = {}


def _num_buckets(state: dict[str, Any]) -> int:
    return len(state["entries"] if _storage_kind(state) == "memory" else state["slots"])


class DiskEntryStore:
    """Entries of one shape in a memory-mapped file ``<directory>/<name>-rank<r>.bank`` (see the module notes).

    Nothing touches the disk before the first write or restore. The file is then reserved (``posix_fallocate``) for
    ``min(max_entries, max_bytes // entry bytes)`` entries, so a disk that is too small fails at once with an error
    rather than mid-run, and it is locked (``flock``) against a second writer. ``rank`` defaults to the global rank
    of the initialised process group (0 without one), resolved when the file is first opened.
    """

    kind = "disk"
    volatile_views = True  # `read` returns a view of the file, rewritten when its slot is reused

    def __init__(self, directory: str | os.PathLike[str], name: str, dtype: torch.dtype, max_entries: int,
                 max_bytes: int | None = None, rank: int | None = None) -> None:
        if not name or os.sep in name:
            raise ValueError(f"the bank name must be a plain file-name part, got {name!r}")
        self.directory = Path(directory)
        self.name = name
        self.dtype = dtype
        self.max_entries = int(max_entries)
        self.max_bytes = max_bytes
        self._rank = rank
        self._path: Path | None = None
        self._file: IO[bytes] | None = None
        self._data: Tensor | None = None  # [num_slots, *entry_shape] mapped onto the file
        self.entry_shape: tuple[int, ...] | None = None
        self._checksums: dict[int, int] = {}
        self._free: list[int] = []  # reusable now (popped from the end: lowest slot first)
        self._waiting: list[int] = []  # freed, but referenced by the latest exported state
        self._protected: set[int] = set()

    # -- file ----------------------------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """This store's file (absolute)."""
        if self._path is not None:
            return self._path
        rank = self._rank
        if rank is None:
            rank = rank_and_world()[0]
        return (self.directory / f"{self.name}-rank{rank}.bank").absolute()

    @property
    def num_slots(self) -> int:
        """Entries the file has room for."""
        return 0 if self._data is None else self._data.shape[0]

    @property
    def file_bytes(self) -> int:
        """Bytes reserved by the file (0 before the first write)."""
        return self.num_slots * self._entry_bytes()

    def _entry_bytes(self) -> int:
        if self.entry_shape is None:
            return 0
        return math.prod(self.entry_shape) * torch.empty((), dtype=self.dtype).element_size()

    def reserved_slots(self, entry_bytes: int) -> int:
        """Entries reserved at the first write: the most the bank can hold under its caps."""
        limit = self.max_entries
        if self.max_bytes is not None:
            limit = min(limit, self.max_bytes // entry_bytes)
        return max(1, limit)

    def _open(self, truncate: bool) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise RuntimeError(f"the error-bank file {path} is in use by another process or bank: two runs or ranks "
                               "write the same file; give each run its own storage_dir (CF_ERROR_BANKS) and every "
                               "bank its own name") from None
        if truncate:
            os.ftruncate(file.fileno(), 0)
        self._file, self._path = file, path

    def _reserve(self, num_slots: int) -> None:
        assert self._file is not None and self.entry_shape is not None
        nbytes = num_slots * self._entry_bytes()
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file.fileno(), 0, nbytes)
            else:
                os.ftruncate(self._file.fileno(), max(nbytes, os.fstat(self._file.fileno()).st_size))
        except OSError as error:
            raise OSError(error.errno, f"cannot reserve {nbytes / 2**30:.2f} GiB for the error-bank file "
                                       f"{self.path} ({error.strerror}); free space there, point storage_dir "
                                       "(CF_ERROR_BANKS) to a larger local disk, or lower max_total_bytes") from error
        self._data = _map_file(self.path, num_slots, self.entry_shape, self.dtype, shared=True)

    def _create(self, shape: tuple[int, ...]) -> None:
        self.close()
        self._open(truncate=True)
        self.entry_shape = shape
        num_slots = self.reserved_slots(self._entry_bytes())
        self._reserve(num_slots)
        self._free = list(range(num_slots - 1, -1, -1))

    def _grow(self) -> None:
        old = self.num_slots
        entry_bytes = self._entry_bytes()
        step = max(1, min(self.reserved_slots(entry_bytes), math.ceil(GROW_BYTES / entry_bytes)))
        self._data = None
        self._reserve(old + step)
        self._free = list(range(old + step - 1, old - 1, -1))

    def close(self) -> None:
        """Unmap and unlock the file (it stays on disk) and forget every entry."""
        self._data = None
        if self._file is not None:
            self._file.close()
        self._file, self._path, self.entry_shape = None, None, None
        self._checksums, self._free, self._waiting, self._protected = {}, [], [], set()

    # -- entries -------------------------------------------------------------------------------------------------------

    def check(self, entry: Tensor) -> None:
        """Raise if ``entry`` does not fit the file's entry shape."""
        if entry.numel() == 0:
            raise ValueError(f"cannot store an empty error entry (shape {tuple(entry.shape)})")
        if self.entry_shape is not None and tuple(entry.shape) != self.entry_shape:
            raise ValueError(
                f"this disk-stored bank holds entries of shape {list(self.entry_shape)}, got {list(entry.shape)}; "
                "errors must keep one shape (start with empty banks after changing the latent size), or use "
                "storage='memory'"
            )

    def write(self, entry: Tensor) -> int:
        """Copy ``entry`` (already in the storage dtype) into a free slot; returns the slot."""
        self.check(entry)
        if self._data is None:
            self._create(tuple(entry.shape))
        if not self._free:
            self._grow()
        slot = self._free.pop()
        assert self._data is not None
        self._data[slot].copy_(entry)
        self._checksums[slot] = entry_checksum(entry)
        return slot

    def read(self, slot: int) -> Tensor:
        assert self._data is not None
        return self._data[slot]

    def release(self, slot: int) -> None:
        del self._checksums[slot]
        (self._waiting if slot in self._protected else self._free).append(slot)

    # -- state ---------------------------------------------------------------------------------------------------------

    def export(self, slots: Sequence[Sequence[int]]) -> dict[str, Any]:
        """A reference to the entries at ``slots`` (per bucket), flushed to disk; those slots are not rewritten
        before the next export."""
        if self._file is not None:
            os.fsync(self._file.fileno())
        self._free.extend(sorted(self._waiting, reverse=True))
        self._waiting = []
        self._protected = {s for bucket in slots for s in bucket}
        return {
            "storage": self.kind,
            "path": str(self.path),
            "entry_shape": None if self.entry_shape is None else list(self.entry_shape),
            "slots": [list(bucket) for bucket in slots],
            "checksums": [[self._checksums[s] for s in bucket] for bucket in slots],
        }

    def restore(self, state: dict[str, Any], dtype: torch.dtype) -> list[list[int]]:
        """Replace the contents with those of a state of either storage; returns the slots per bucket.

        A disk state of this very file is adopted in place (after the CRC check); any other state is copied into a
        freshly reserved file.
        """
        if _storage_kind(state) == "disk" and any(state["slots"]) and self._is_own_file(Path(state["path"])):
            return self._adopt(state)
        if _storage_kind(state) == "memory":
            shapes = {tuple(e.shape) for bucket in state["entries"] for e in bucket}
            if len(shapes) > 1:
                raise ValueError(f"a disk-stored bank holds entries of one shape; the state has {sorted(shapes)}: "
                                 "load it into a bank with storage='memory'")
        self.close()
        slots: list[list[int]] = [[] for _ in range(_num_buckets(state))]
        for bucket, entry in state_entries(state, dtype):
            slots[bucket].append(self.write(entry))
        return slots

    def _is_own_file(self, path: Path) -> bool:
        try:
            return os.path.samefile(path, self.path)
        except FileNotFoundError:
            return False

    def _adopt(self, state: dict[str, Any]) -> list[list[int]]:
        shape = tuple(int(d) for d in state["entry_shape"])
        if self._file is None or self.entry_shape != shape:
            self.close()
            self._open(truncate=False)
            self.entry_shape = shape
            num_slots = os.fstat(self._file.fileno()).st_size // self._entry_bytes()  # type: ignore[union-attr]
            self._data = _map_file(self.path, num_slots, shape, self.dtype, shared=True)
        slots = [[int(s) for s in bucket] for bucket in state["slots"]]
        live = [s for bucket in slots for s in bucket]
        if max(live) >= self.num_slots or len(set(live)) != len(live):
            raise ValueError(f"the error-bank state refers to slots {min(live)}..{max(live)} (each once) but the file "
                             f"{self.path} holds {self.num_slots} entries; it is not the file that state was saved "
                             "with")
        checksums: dict[int, int] = {}
        for bucket, (bucket_slots, bucket_checksums) in enumerate(zip(slots, state["checksums"])):
            for slot, checksum in zip(bucket_slots, bucket_checksums):
                if entry_checksum(self.read(slot)) != int(checksum):
                    self.close()
                    raise ValueError(_stale_message(Path(state["path"]), slot, bucket))
                checksums[slot] = int(checksum)
        self._checksums = checksums
        self._protected = set(live)
        self._waiting = []
        self._free = [s for s in range(self.num_slots - 1, -1, -1) if s not in self._protected]
        return slots
