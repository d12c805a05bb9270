"""The streaming section of `bench/gpu_suite.py`: random-init Wan2.1-1.3B and Wan VAE streamed per memory preset,
eager and compiled (FPS including decode, first-chunk latency, per-chunk time early vs late, peak memory), and
where a steady slow_fast chunk's time goes: the DiT alone, the VAE decode alone, and the top operators of each by
device time (torch profiler), so a gap to the floor can be attributed."""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

import flop_model as fm
from suite_timing import guarded, synchronize

if TYPE_CHECKING:
    from gpu_suite import Sizes

FPS = 16


def num_latent_frames(seconds: float, frames_per_chunk: int = 3) -> int:
    """Whole chunks covering ``seconds`` of 16 fps video (pixel frames = 1 + 4(n - 1))."""
    n = (max(1, round(seconds * FPS)) - 1 + 3) // 4 + 1
    return max(2, math.ceil(n / frames_per_chunk)) * frames_per_chunk



def build_autoencoder(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Any:
    """A random-init Wan VAE (diffusers `AutoencoderKLWan` from its config, nothing downloaded)."""
    from diffusers import AutoencoderKLWan

    from cf.encoders import WanVideoAutoencoder

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(**sizes.vae_kwargs())
    return WanVideoAutoencoder(vae.to(dtype)).to(device)


def window_ms(chunk_ms: list[float], start_s: float, end_s: float) -> float | None:
    """Median ms of the chunks whose last pixel frame falls in [start_s, end_s) of video."""
    picked = [ms for i, ms in enumerate(chunk_ms) if start_s <= (1 + 4 * (3 * i + 2)) / FPS < end_s]
    return statistics.median(picked) if picked else None


def run_streaming(sizes: Sizes, device: torch.device, dtype: torch.dtype, rates: dict[str, float],
                  deadline: float, compile_runs: bool) -> dict[str, Any]:
    from torch import nn

    from callbacks.throughput import measure_stream_throughput
    from cf.memory import MemoryConfig
    from cf.models.wan import CausalWanDiT

    config = sizes.wan_config()
    shape = fm.DiTShape.of(config)
    p = fm.tokens_per_frame(shape, sizes.latent_hw)
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanDiT(config).to(dtype).eval()
    text = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    notes: list[str] = []
    try:
        autoencoder = build_autoencoder(sizes, device, dtype)
        vae_cost = sizes.vae_cost()
    except Exception as error:  # noqa: BLE001 - measure the DiT alone and say so
        autoencoder, vae_cost = None, None
        notes.append(f"no VAE ({type(error).__name__}: {error}); FPS excludes decode")
    eager_blocks = model.blocks
    compiled_blocks = None
    runs = []
    for compiled in (False, True) if compile_runs else (False,):
        runs += [(preset, seconds, compiled) for preset, seconds in sizes.stream_seconds
                 if not compiled or preset in sizes.compiled_presets]
    runs.sort(key=lambda r: (r[0] != "slow_fast", r[2]))  # slow_fast eager, slow_fast compiled, then the others
    results, last_chunk_s, extra = [], {}, {}
    for preset, seconds, compiled in runs:
        frames = num_latent_frames(seconds)
        base = {"preset": preset, "compiled": compiled, "seconds": (1 + 4 * (frames - 1)) / FPS,
                "latent_frames": frames}
        estimate = frames / 3 * last_chunk_s.get(compiled, last_chunk_s.get(False, 0.0)) * 1.3 + \
            (60.0 if compiled and compiled_blocks is None and device.type == "cuda" else 0.0)
        left = deadline - time.perf_counter()
        if estimate > left:
            results.append({**base, "status": f"skipped: time budget ({left:.0f} s left, about {estimate:.0f} s "
                                              "needed)"})
            continue
        if compiled and compiled_blocks is None:
            compiled_blocks = nn.ModuleList([torch.compile(b, backend=sizes.compile_backend, mode=sizes.compile_mode)
                                             for b in eager_blocks])
        model.blocks = compiled_blocks if compiled else eager_blocks
        warmup = sizes.compiled_warmup_chunks if compiled else sizes.eager_warmup_chunks

        def measure() -> dict[str, Any]:
            started = time.perf_counter()
            result = measure_stream_throughput(model, text, frames, sizes.latent_hw, preset, autoencoder, warmup)
            capacity = MemoryConfig.preset(preset).capacity
            floor = fm.stream_floor(shape, p, frames, capacity, vae=vae_cost, element_bytes=dtype.itemsize)
            chunk_ms = result["chunk_ms"]
            return {**result, "wall_s": time.perf_counter() - started,
                    "ms_10_20s": window_ms(chunk_ms, 10.0, 20.0),
                    "ms_last_10s": window_ms(chunk_ms, result["pixel_frames"] / FPS - 10.0, math.inf),
                    "floor_fps": floor.steady_fps(**rates), "floor_latency_s": floor.first_chunk_latency_s(**rates),
                    "floor_chunk_ms_last": 1e3 * floor.chunk_s(len(floor.chunk_work) - 1, **rates),
                    "dit_tflop_last_chunk": floor.chunk_work[-1].flops / 1e12,
                    "vae_tflop_steady_chunk": floor.decode_flops[-1] / 1e12}

        out = {**base, **guarded(measure)}
        if out["status"] == "ok":
            last_chunk_s[compiled] = out["chunk_ms_mean"] / 1e3 * (1.5 if preset == "full" else 1.0)
        results.append(out)
        if preset == "slow_fast" and not compiled and out["status"] == "ok" and "breakdown" not in extra:
            enough = deadline - time.perf_counter() > 40 * out["chunk_ms_mean"] / 1e3  # about 25 chunks' work
            extra["breakdown"] = guarded(lambda: chunk_breakdown(model, text, autoencoder, sizes.latent_hw, device,
                                                                 out, rates)) if enough else {"status": "skipped"}
    model.blocks = eager_blocks
    return {"tokens_per_frame": p, "includes_decode": vae_cost is not None, "notes": notes, "runs": results,
            "compile_backend": sizes.compile_backend + (f" ({sizes.compile_mode})" if sizes.compile_mode else ""),
            **extra}


def top_operators(fn: Any, device: torch.device, per: int, limit: int = 12) -> list[dict[str, Any]]:
    """Run ``fn`` once under the profiler; the ``limit`` operators with the most self device time (CPU time without
    CUDA), in ms per ``per`` (e.g. per chunk), with their call counts per ``per``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if self_us > 0:
            rows.append({"op": event.key[:90], "ms": self_us / 1e3 / per, "calls": event.count / per})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:limit]


def decode_chunk_ms(autoencoder: Any, z_dim: int, latent_hw: tuple[int, int], chunks: int, device: torch.device,
                    frames_per_chunk: int = 3) -> list[float]:
    """Host-clock ms of the streaming decoder on ``chunks`` random chunks of ``[1, z_dim, 3, H, W]`` latents (the
    first chunk of a video decodes fewer pixel frames)."""
    decoder = autoencoder.stream_decoder()
    generator = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(chunks):
        latents = torch.randn(1, z_dim, frames_per_chunk, *latent_hw, generator=generator).to(device)
        synchronize(device)
        start = time.perf_counter()
        decoder(latents)
        synchronize(device)
        out.append(1e3 * (time.perf_counter() - start))
    return out


def chunk_breakdown(model: Any, text: torch.Tensor, autoencoder: Any | None, latent_hw: tuple[int, int],
                    device: torch.device, run: dict[str, Any], rates: dict[str, float], chunks: int = 12,
                    profiled_chunks: int = 4) -> dict[str, Any]:
    """Split a steady slow_fast chunk into the DiT's share (4 denoising calls + the commit, no decode) and the
    decoder's, each timed alone, with the top operators of each from the profiler; ``run`` is the suite's slow_fast
    result (its TFLOP per chunk give the floors at ``rates``)."""
    from callbacks.throughput import measure_stream_throughput

    n = int(model.frames_per_chunk)
    dit = measure_stream_throughput(model, text, chunks * n, latent_hw, "slow_fast", None, 1)
    out: dict[str, Any] = {
        "chunks": chunks,
        "dit_floor_ms": 1e3 * run["dit_tflop_last_chunk"] * 1e12 / rates["flops_per_s"],
        "decode_floor_ms": 1e3 * run["vae_tflop_steady_chunk"] * 1e12 / rates["flops_per_s"],
        "dit_chunk_ms_late": dit["chunk_ms_late"],
        "dit_first_chunk_ms": 1e3 * dit["first_chunk_latency_s"],
        "dit_top_ops": top_operators(
            lambda: measure_stream_throughput(model, text, profiled_chunks * n, latent_hw, "slow_fast", None, 0),
            device, profiled_chunks),
    }
    if autoencoder is not None:
        z_dim = int(model.config.in_dim)
        decode_ms = decode_chunk_ms(autoencoder, z_dim, latent_hw, 1 + chunks // 2, device)
        out["decode_first_chunk_ms"] = decode_ms[0]
        out["decode_chunk_ms"] = statistics.median(decode_ms[2:] or decode_ms[1:])
        out["decode_top_ops"] = top_operators(
            lambda: decode_chunk_ms(autoencoder, z_dim, latent_hw, profiled_chunks, device), device, profiled_chunks)
    return out
