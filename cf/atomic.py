"""Atomic file replacement: write a temporary file beside the target, flush it to disk, then ``os.replace`` it over
the target. The target therefore always holds either its previous content or the complete new one, on any local
filesystem (the temporary file is in the same folder, so the rename never crosses filesystems).

Temporary names are ``.<name>.tmp-<host>-<pid>-<random>``. A failed or interrupted write removes its temporary file;
one left by a killed process (SIGKILL, power loss) is removed by the next atomic write into the same folder from
the same host once that process is gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "commit_temporary", "discard_temporary", "remove_stale_temporaries",
           "temporary_name", "staged_folder", "staged_backup", "recover_staged_folder"]

_MARK = ".tmp-"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary path in ``path``'s folder (hidden, unique per host, process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}{_MARK}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files in ``folder`` left by processes of this host that no longer run. Returns them."""
    folder = Path(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host = _host()
    for name in names:
        if not name.startswith(".") or _MARK not in name:
            continue
        parts = name.rsplit(_MARK, 1)[1].split("-")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            (folder / name).unlink()
            removed.append(folder / name)
        except OSError:
            pass
    return removed


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write the whole file to; on a clean exit it replaces ``path`` atomically.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is left as it was.
    The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    temp = temporary_name(path)
    try:
        yield temp
        commit_temporary(temp, path)
    except BaseException:
        discard_temporary(temp)
        raise


def commit_temporary(temp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Flush the complete file ``temp`` to disk and rename it over ``path`` (same folder). Returns ``path``."""
    temp, path = Path(temp), Path(path)
    if not temp.is_file():
        raise FileNotFoundError(f"nothing was written to the temporary file {temp} for {path}")
    _fsync(temp)
    os.replace(temp, path)
    _fsync(path.parent, directory=True)
    return path


def discard_temporary(temp: str | os.PathLike) -> None:
    """Remove ``temp`` if it exists."""
    try:
        Path(temp).unlink()
    except FileNotFoundError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (`atomic_path`). Returns the path."""
    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_text(text, encoding=encoding)
    return path


@contextmanager
def staged_folder(path: str | os.PathLike, is_writer: bool = True,
                  barrier: Callable[[str], None] = lambda name: None) -> Iterator[Path]:
    """A checkpoint folder written by several ranks, swapped in only when every rank has finished.

    Every rank writes into the yielded staging folder ``.<name>.staging`` beside ``path`` (the same name on every
    rank). After the block, once all ranks pass ``barrier``, the writer (global rank 0) renames an existing ``path``
    to ``.<name>.old``, renames the staging folder to ``path`` and removes the old one. A write that fails or is
    killed leaves ``path`` as it was (its staging folder is cleared by the next save); only a kill between the two
    renames leaves the previous complete folder under ``.<name>.old`` instead of ``path``, which
    `recover_staged_folder` puts back.
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.staging")
    if is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        recover_staged_folder(path)
    barrier("staged_folder_cleared")
    yield staging
    barrier("staged_folder_written")
    if is_writer:
        old = staged_backup(path)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        _fsync(path.parent, directory=True)
        shutil.rmtree(old, ignore_errors=True)
    barrier("staged_folder_swapped")


def staged_backup(path: str | os.PathLike) -> Path:
    """Where a `staged_folder` save keeps the previous folder between its two renames: ``.<name>.old``."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def recover_staged_folder(path: str | os.PathLike) -> bool:
    """Put back the previous complete folder of a `staged_folder` save killed between its two renames (``path``
    missing, its `staged_backup` present). Returns whether it did."""
    path = Path(path)
    old = staged_backup(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
        return True
    return False

