"""`measure_stream_throughput` arithmetic on a virtual clock (no wall-clock assertion), and `StreamThroughputMonitor` inputs.

The fake DiT and decoder advance a fake clock by set amounts ("controlled sleeps" in virtual time), so the expected
latency, FPS and per-chunk times follow by hand from the §4.1 definitions.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from callbacks.throughput import StreamThroughputMonitor, format_throughput, measure_stream_throughput
from cf.encoders import ToyAutoencoder
from cf.memory import MemoryConfig

SETUP_S = 0.5  # text K/V: paid once per video, inside the first chunk
DECODE_S = 0.02  # per decoded chunk
STEPS = 4  # denoising calls per chunk (SamplingConfig default), plus one commit call


def call_s(start_frame: int) -> float:
    """Seconds of one DiT call of the chunk starting at ``start_frame``: grows with the chunk index."""
    return 0.01 * (1 + start_frame // 3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class TimedDiT(nn.Module):
    """What `cf.rollout.stream` uses of a `CausalWanDiT`; flow 0, every call advances the clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(in_dim=4, num_layers=1)
        self.frames_per_chunk = 3
        self.calls: list[tuple[int, bool]] = []

    def text_kv(self, text: torch.Tensor) -> list:
        self.clock.sleep(SETUP_S)
        return []

    def forward_chunk(self, x, t, text_kv, cache, start_frame, commit=False):
        self.calls.append((start_frame, commit))
        self.clock.sleep(call_s(start_frame))
        return torch.zeros_like(x)


class TimedAutoencoder:
    """The exact toy autoencoder's streaming decoder, plus a fixed decode time per chunk."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.toy = ToyAutoencoder(latent_channels=4, spatial_factor=2)
        self.decoded_frames: list[int] = []

    def stream_decoder(self):
        decoder = self.toy.stream_decoder()

        def decode(latents: torch.Tensor) -> torch.Tensor:
            pixels = decoder(latents)
            self.clock.sleep(DECODE_S)
            self.decoded_frames.append(pixels.shape[2])
            return pixels

        return decode


def chunk_seconds(k: int) -> float:
    """Virtual time of chunk k (4 denoising calls + commit + decode); chunk 0 also pays the text K/V."""
    return (STEPS + 1) * 0.01 * (1 + k) + DECODE_S + (SETUP_S if k == 0 else 0.0)


@pytest.mark.parametrize("batch", [1, 2])
def test_pixel_frames_latency_and_steady_state_follow_the_definitions(batch):
    clock = FakeClock()
    model, autoencoder = TimedDiT(clock), TimedAutoencoder(clock)
    chunks, warmup = 6, 2
    result = measure_stream_throughput(model, torch.zeros(batch, 8, 32), 3 * chunks, (2, 2), MemoryConfig(),
                                       autoencoder, warmup_chunks=warmup, clock=clock)

    # n latent frames -> 1 + 4(n - 1) pixel frames per video; the first chunk gives 4·3 − 3, later ones 4·3
    assert result["latent_frames"] == 18 and result["chunks"] == chunks
    assert result["pixel_frames"] == batch * (1 + 4 * (18 - 1))
    assert autoencoder.decoded_frames == [9, 12] + [9] + [12] * 5  # warm-up video (2 chunks), then the timed one
    # the warm-up is a separate video before the clock starts: its chunks restart at frame 0
    starts = [start for start, commit in model.calls if commit]
    assert starts == [0, 3] + [0, 3, 6, 9, 12, 15]
    assert len(model.calls) == (warmup + chunks) * (STEPS + 1)

    times = [chunk_seconds(k) for k in range(chunks)]
    assert result["first_chunk_latency_s"] == pytest.approx(times[0])
    assert result["chunk_ms"] == pytest.approx([1000 * t for t in times])
    steady = times[1:]
    assert result["pixel_fps"] == pytest.approx(batch * 12 * (chunks - 1) / sum(steady))
    assert result["pixel_fps_overall"] == pytest.approx(result["pixel_frames"] / sum(times))
    assert result["total_s"] == pytest.approx(sum(times))
    assert result["chunk_ms_mean"] == pytest.approx(1000 * sum(steady) / len(steady))
    # 5 steady chunks: the first and last quarter are one chunk each
    assert result["chunk_ms_early"] == pytest.approx(1000 * steady[0])
    assert result["chunk_ms_late"] == pytest.approx(1000 * steady[-1])
    assert result["includes_decode"] and result["batch_size"] == batch and result["warmup_chunks"] == warmup
    assert result["memory_kind"] in ("process_rss_sampled", "process_max_rss")
    assert math.isfinite(result["peak_memory_mib"]) and result["peak_memory_mib"] > 0
    line = format_throughput(result, fps=16)
    assert "FPS" in line and "first chunk" in line


def test_quarters_average_several_chunks_and_latents_only_counts_by_formula():
    clock = FakeClock()
    model = TimedDiT(clock)
    chunks = 10
    result = measure_stream_throughput(model, torch.zeros(1, 8, 32), 3 * chunks, (2, 2), MemoryConfig(),
                                       autoencoder=None, warmup_chunks=0, clock=clock)
    assert not result["includes_decode"]
    assert result["pixel_frames"] == 1 + 4 * (3 * chunks - 1)
    assert len(model.calls) == chunks * (STEPS + 1)
    call_time = [(STEPS + 1) * 0.01 * (1 + k) for k in range(chunks)]
    steady = call_time[1:]  # 9 steady chunks: quarters of 2
    assert result["first_chunk_latency_s"] == pytest.approx(SETUP_S + call_time[0])
    assert result["chunk_ms_early"] == pytest.approx(1000 * (steady[0] + steady[1]) / 2)
    assert result["chunk_ms_late"] == pytest.approx(1000 * (steady[-2] + steady[-1]) / 2)
    assert result["pixel_fps"] == pytest.approx(12 * (chunks - 1) / sum(steady))


def test_needs_two_chunks_and_a_valid_warmup():
    clock = FakeClock()
    with pytest.raises(ValueError, match="at least 2"):
        measure_stream_throughput(TimedDiT(clock), torch.zeros(1, 8, 32), 3, (2, 2), MemoryConfig(), clock=clock)
    with pytest.raises(ValueError, match="whole number of chunks"):
        measure_stream_throughput(TimedDiT(clock), torch.zeros(1, 8, 32), 7, (2, 2), MemoryConfig(), clock=clock)
    with pytest.raises(ValueError, match="warmup_chunks"):
        measure_stream_throughput(TimedDiT(clock), torch.zeros(1, 8, 32), 6, (2, 2), MemoryConfig(),
                                  warmup_chunks=-1, clock=clock)


def test_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        StreamThroughputMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="seconds"):
        StreamThroughputMonitor(seconds=0)
    with pytest.raises(ValueError, match="unknown memory preset"):
        StreamThroughputMonitor(memory="sliding_window")
