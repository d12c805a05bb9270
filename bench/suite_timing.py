"""Timing and memory readings of `bench/gpu_suite.py`: CUDA events or the host clock, guarded measurements."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 2, budget_s: float = 0.5,
              max_reps: int = 30) -> dict[str, Any]:
    """Median and quartiles (ms) of ``fn`` after ``warmup`` calls; CUDA events on a GPU, the host clock else."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    reps = int(min(max_reps, max(3, budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1000.0 * (time.perf_counter() - start))
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {"ms": statistics.median(times), "ms_q1": q1, "ms_q3": q3, "reps": reps}


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; an exception becomes ``status: "error: ..."`` with its traceback tail."""
    started = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
        out.setdefault("wall_s", time.perf_counter() - started)
        return out
    except Exception as error:  # noqa: BLE001 - the suite reports and goes on
        return {"status": f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300],
                "traceback": traceback.format_exc()[-3000:]}


def free_memory(device: torch.device) -> None:
    """Give cached CUDA memory back between measurements (nothing to do on a CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process_max_rss"
