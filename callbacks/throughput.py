"""Streaming-generation throughput as reference.md §4.1 defines it, as a plain function and as a training callback.

FPS = pixel frames produced ÷ wall time *including* the decode, after a warm-up, in steady state; the first-chunk
latency is reported separately. :func:`measure_stream_throughput`:

1. warm-up: the first ``warmup_chunks`` chunks of a separate, discarded video, decoded (compilation, autotuning,
   allocator growth);
2. one timed video through `cf.rollout.stream`, each chunk decoded by the autoencoder's streaming decoder as it
   arrives (CUDA synchronised before every clock reading);
3. ``first_chunk_latency_s``: from the call (text K/V, fresh memory) to the first chunk's decoded frames;
   ``pixel_fps``: pixel frames of the later chunks ÷ their wall time (steady state); ``pixel_fps_overall``: all pixel
   frames ÷ the whole time; per-chunk times of the steady chunks: mean, first quarter (``chunk_ms_early``) and last
   quarter (``chunk_ms_late``): equal when the cost per chunk is constant (a bounded memory);
4. peak memory: CUDA ``max_memory_allocated`` over the timed video on a GPU; on a CPU the process RSS sampled at chunk
   boundaries (psutil), or the lifetime peak RSS (``resource``) without psutil.

n latent frames decode to ``1 + 4(n − 1)`` pixel frames per video (4n per chunk after the first). The §4.1 protocol
is batch 1; a larger batch counts the frames of every video.
"""

from __future__ import annotations

import math
import sys
import time
from statistics import fmean
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from callbacks.long_video_eval import PeriodicGeneration, StudentGeneration, log_scalars
from cf.memory import KeyframePolicy, MemoryConfig
from cf.rollout import SamplingConfig, stream

__all__ = ["StreamThroughputMonitor", "measure_stream_throughput", "format_throughput"]

_MIB = 1024.0 * 1024.0


class _PeakMemory:
    """Peak memory over a measured span: CUDA max allocated, else sampled process RSS, else lifetime max RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0.0
        self._process = None
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            import psutil
        except ImportError:
            self.kind = "process_max_rss"
        else:
            self.kind = "process_rss_sampled"
            self._process = psutil.Process()
        self.sample()

    def sample(self) -> None:
        if self._process is not None:
            self.peak_bytes = max(self.peak_bytes, float(self._process.memory_info().rss))

    def peak_mib(self) -> float:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / _MIB
        if self.kind == "process_max_rss":
            import resource

            peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            return peak / _MIB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux
        return self.peak_bytes / _MIB


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_stream_throughput(
    model: nn.Module,
    text: Tensor,
    num_frames: int,
    latent_size: tuple[int, int],
    memory: MemoryConfig | str = "slow_fast",
    autoencoder: Any | None = None,
    warmup_chunks: int = 1,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    keyframes: KeyframePolicy | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Time one streamed video of ``num_frames`` latent frames (protocol: module docstring).

    model: a `CausalWanDiT`; text: ``[B, L, D]`` prompt embeddings (B = 1 for §4.1 numbers); autoencoder: a
    `VideoAutoencoder` whose streaming decoder runs inside the timing (None: latents only, frames counted by the
    formula and ``includes_decode`` False); clock: seconds (injectable for tests). Returns a flat dict: pixel_fps,
    pixel_fps_overall, first_chunk_latency_s, chunk_ms (every chunk, the first one included), chunk_ms_mean /
    _early / _late (steady chunks), peak_memory_mib, memory_kind, pixel_frames, latent_frames, chunks, total_s, …
    """
    n = int(model.frames_per_chunk)
    if num_frames % n or num_frames // n < 2:
        raise ValueError(f"measure_stream_throughput needs a whole number of chunks, at least 2 (one for the latency, "
                         f"one or more for the steady state): got {num_frames} latent frames with {n} per chunk; "
                         "generate a longer video")
    if warmup_chunks < 0:
        raise ValueError(f"warmup_chunks must be >= 0, got {warmup_chunks}")
    device = text.device
    batch = int(text.shape[0])

    def video(length: int) -> Any:
        return stream(model, text, length, latent_size, memory=memory, sampling=sampling, seed=seed,
                      keyframes=keyframes)

    if warmup_chunks:
        decoder = autoencoder.stream_decoder() if autoencoder is not None else None
        for latents in video(warmup_chunks * n):
            if decoder is not None:
                decoder(latents.float())
        _synchronize(device)

    memory_peak = _PeakMemory(device)
    decoder = autoencoder.stream_decoder() if autoencoder is not None else None
    pixel_counts, finished = [], []
    latent_frames = 0
    _synchronize(device)
    start = clock()
    for latents in video(num_frames):
        if decoder is not None:
            pixels = decoder(latents.float())
            count = int(pixels.shape[2])
        else:
            count = 4 * latents.shape[2] - (3 if latent_frames == 0 else 0)
        _synchronize(device)
        finished.append(clock())
        memory_peak.sample()
        latent_frames += int(latents.shape[2])
        pixel_counts.append(count * batch)

    chunk_s = [finished[0] - start] + [b - a for a, b in zip(finished, finished[1:])]
    steady_s = chunk_s[1:]
    quarter = max(1, len(steady_s) // 4)
    total_s = finished[-1] - start
    steady_time = finished[-1] - finished[0]
    pixel_frames = sum(pixel_counts)
    return {
        "pixel_fps": sum(pixel_counts[1:]) / steady_time if steady_time > 0 else math.inf,
        "pixel_fps_overall": pixel_frames / total_s if total_s > 0 else math.inf,
        "first_chunk_latency_s": chunk_s[0],
        "chunk_ms": [1000.0 * s for s in chunk_s],
        "chunk_ms_mean": 1000.0 * fmean(steady_s),
        "chunk_ms_early": 1000.0 * fmean(steady_s[:quarter]),
        "chunk_ms_late": 1000.0 * fmean(steady_s[-quarter:]),
        "total_s": total_s,
        "pixel_frames": pixel_frames,
        "latent_frames": latent_frames,
        "chunks": len(chunk_s),
        "batch_size": batch,
        "warmup_chunks": warmup_chunks,
        "includes_decode": decoder is not None,
        "peak_memory_mib": memory_peak.peak_mib(),
        "memory_kind": memory_peak.kind,
        "device": _device_name(device),
    }


def format_throughput(result: dict[str, Any], fps: float | None = None) -> str:
    """One line for logs and bench tables."""
    length = f"{result['pixel_frames'] / result['batch_size'] / fps:.1f} s" if fps else \
        f"{result['pixel_frames'] // result['batch_size']} frames"
    return (f"{result['pixel_fps']:.2f} FPS steady ({result['pixel_fps_overall']:.2f} overall), first chunk "
            f"{result['first_chunk_latency_s']:.3f} s, chunk {result['chunk_ms_early']:.1f} -> "
            f"{result['chunk_ms_late']:.1f} ms (early -> late), peak {result['peak_memory_mib']:.0f} MiB "
            f"({result['memory_kind']}); {length}, batch {result['batch_size']}, {result['device']}"
            + ("" if result["includes_decode"] else ", decode not included"))


class StreamThroughputMonitor(PeriodicGeneration):
    """Measure the student's streaming throughput during training (`measure_stream_throughput`, batch 1).

    Logs ``<prefix>/pixel_fps``, ``pixel_fps_overall``, ``first_chunk_latency_s``, ``chunk_ms_mean``,
    ``chunk_ms_early``, ``chunk_ms_late`` and ``peak_memory_mib`` from rank 0. Speed does not depend on the weights'
    values, so the training weights are used. Every rank measures (ZeRO-3 forwards are collective and include the
    parameter gathers); the numbers are rank 0's. Timings share the machine with training: compare runs, not
    absolute values, unless the machine is otherwise idle.

    Args:
        every_n_steps: measure every this many trainer steps (None: only at the end of fit).
        at_fit_end: also measure at the end of fit.
        seconds: length of the timed video (whole chunks; at least two).
        prompt: the prompt (its content does not matter for speed).
        seed: noise seed.
        warmup_chunks: chunks of a discarded video generated first.
        memory: memory preset name or `MemoryConfig` fields instead of the module's memory.
        prefix: metric name prefix.
    """

    def __init__(self, every_n_steps: int | None = 500, at_fit_end: bool = True, seconds: float = 10.0,
                 prompt: str = "a timing run", seed: int = 0, warmup_chunks: int = 1,
                 memory: str | dict[str, Any] | None = None, prefix: str = "throughput") -> None:
        super().__init__(every_n_steps, at_fit_end)
        if seconds <= 0:
            raise ValueError(f"StreamThroughputMonitor: seconds must be positive, got {seconds}")
        if warmup_chunks < 0:
            raise ValueError(f"StreamThroughputMonitor: warmup_chunks must be >= 0, got {warmup_chunks}")
        if isinstance(memory, str):
            MemoryConfig.preset(memory)  # unknown names fail now
        self.seconds = float(seconds)
        self.prompt = prompt
        self.seed = seed
        self.warmup_chunks = warmup_chunks
        self.memory = memory
        self.prefix = prefix
        self.last_result: dict[str, Any] | None = None

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        setup = StudentGeneration.from_module(pl_module, self.memory)
        num_frames = max(2 * setup.frames_per_chunk, setup.num_latent_frames(self.seconds))
        result = measure_stream_throughput(setup.generator, pl_module.embed([self.prompt]), num_frames,
                                           setup.latent_size, setup.memory, pl_module.autoencoder,
                                           self.warmup_chunks, sampling=setup.sampling, seed=self.seed)
        self.last_result = result
        if not trainer.is_global_zero:
            return
        names = ("pixel_fps", "pixel_fps_overall", "first_chunk_latency_s", "chunk_ms_mean", "chunk_ms_early",
                 "chunk_ms_late", "peak_memory_mib")
        log_scalars(trainer, {f"{self.prefix}/{name}": float(result[name]) for name in names
                               if math.isfinite(result[name])})
        rank_zero_info(f"StreamThroughputMonitor at step {trainer.global_step}: {format_throughput(result, setup.fps)}")
