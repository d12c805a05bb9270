"""Running the stages of a pipeline (`cf demo`, `cf toy-base`) as subprocesses: each stage is a `cf ...` command
that can also be run by hand, printed before it starts and logged with its wall time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

__all__ = ["StageLog", "config_fingerprint", "file_fingerprint", "run_stage", "run_stages_parallel", "shard_urls",
           "newest_file"]


class StageLog(list):
    """The records ``{"stage", "seconds", "command", "started_at"}`` of a pipeline's stages, kept in a json file as
    they are appended, so a pipeline resumed after a crash still reports the stages an earlier run did (a record
    replaces an older one of the same stage)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        super().__init__(json.loads(self.path.read_text()) if self.path.is_file() else [])

    def append(self, record: dict) -> None:
        record = {"started_at": time.time() - float(record.get("seconds", 0.0)), **record}
        for i, old in enumerate(self):
            if old.get("stage") == record["stage"]:
                del self[i]
                break
        super().append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(list(self), indent=1))

    def record_of(self, name: str) -> dict | None:
        """The record of stage ``name`` (None when it has none)."""
        return next((r for r in self if r.get("stage") == name), None)

    def wall_seconds(self) -> float:
        """Seconds covered by at least one stage (stages that ran side by side count once)."""
        spans = sorted((r["started_at"], r["started_at"] + r["seconds"]) for r in self if "started_at" in r)
        total, end = 0.0, float("-inf")
        for start, stop in spans:
            if stop > end:
                total += stop - max(start, end)
                end = stop
        return total


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a file's contents (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_fingerprint(cmd: list[str]) -> str | None:
    """SHA-256 over the contents of the files that follow ``--config`` in ``cmd`` (None when there are none), so a
    record tells whether a stage's config files were edited since it ran."""
    files = [Path(arg) for flag, arg in zip(cmd, cmd[1:]) if flag == "--config" and Path(arg).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def run_stage(cmd: list[str], env: dict[str, str], log: list[dict], name: str) -> float:
    """Run ``cmd`` with ``env`` added to the environment (raises CalledProcessError if it fails); append
    ``{"stage", "seconds", "command", "configs"}`` to ``log`` and return the seconds it took."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    configs, started_at = config_fingerprint(cmd), time.time()
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, **env}, check=True)
    seconds = time.perf_counter() - start
    _record(log, name, cmd, configs, started_at, seconds)
    return seconds


def _record(log: list[dict], name: str, cmd: list[str], configs: str | None, started_at: float,
            seconds: float) -> None:
    record = {"stage": name, "seconds": round(seconds, 1), "command": " ".join(cmd), "started_at": started_at}
    if configs is not None:
        record["configs"] = configs
    log.append(record)
    print(f"=== {name} done in {seconds:.0f} s", flush=True)


def shard_urls(folder: Path) -> str:
    """Brace notation covering the `shard-NNNNNN.tar` files of a split folder."""
    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar in {folder}; run `cf data synth --out {folder.parent}` first")
    first, last = shards[0].stem.split("-")[1], shards[-1].stem.split("-")[1]
    return str(folder / (f"shard-{first}.tar" if first == last else f"shard-{{{first}..{last}}}.tar"))


def newest_file(pattern: str, root: Path) -> Path:
    """The most recently modified path matching ``root/pattern`` (e.g. a run's ``last.ckpt``)."""
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"nothing matches {root}/{pattern}; did the previous stage finish?")
    return found[-1]


def run_stages_parallel(jobs: list[tuple[list[str], str]], env: dict[str, str], log: list[dict],
                        workers: int = 2) -> None:
    """Run independent stages ``[(cmd, name), ...]``, ``workers`` at a time (e.g. single-threaded processes, one
    per core). Each stage's output goes to a log file named after it in ``env["CF_RUNS"]`` (default: the current
    folder); a line is printed when a stage starts and when it ends. Raises CalledProcessError for the first stage
    that fails, once the stages already running have ended (no new one starts)."""
    logs_dir = Path(env.get("CF_RUNS", "."))
    logs_dir.mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, str, list[str], float, object]] = []
    failed: subprocess.CalledProcessError | None = None
    while pending or running:
        while pending and len(running) < workers and failed is None:
            cmd, name = pending.pop(0)
            path = logs_dir / (name.split(" (")[0].replace(" ", "_") + ".log")
            print(f"\n=== {name} (output: {path}): {' '.join(cmd)}", flush=True)
            handle = open(path, "w")
            proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT)
            running.append((proc, name, cmd, config_fingerprint(cmd), time.time(), time.perf_counter(), handle))
        if failed is not None:
            pending.clear()
        for entry in list(running):
            proc, name, cmd, configs, started_at, start, handle = entry
            if proc.poll() is None:
                continue
            handle.close()
            running.remove(entry)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                failed = failed or subprocess.CalledProcessError(proc.returncode, cmd)
                print(f"=== {name} FAILED (exit {proc.returncode}) after {seconds:.0f} s", flush=True)
                continue
            _record(log, name, cmd, configs, started_at, seconds)
        time.sleep(1.0)
    if failed is not None:
        raise failed
