"""Lightning callbacks of the project, importable as ``callbacks.<Name>`` (e.g. ``callbacks.LongVideoEval`` in a
YAML ``class_path``). Each is imported on first use, so ``import callbacks`` stays light."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EMA": "callbacks.ema",
    "FiniteGuard": "callbacks.finite_guard",
    "VideoLogger": "callbacks.video_logger",
    "SkippedSamplesLogger": "callbacks.data_health",
    "LongVideoEval": "callbacks.long_video_eval",
    "StreamThroughputMonitor": "callbacks.throughput",
    "measure_stream_throughput": "callbacks.throughput",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
