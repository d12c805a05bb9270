"""Per-chunk cost of streaming generation vs. video length, for the memory presets.

Time per chunk (4 denoising calls + the commit pass; on a CPU the CPU time of this process, on CUDA the elapsed time)
and K/V cache bytes in use at the early, middle and late chunks of a long video, for slow_fast, sliding and full
caches. Built to give the same answer on a shared machine:

1. each preset's video is generated once, keeping a copy of its cache at the start of every phase;
2. then, for ``--rounds`` rounds, every (preset, phase) pair is timed once, round-robin (presets in a rotating order,
   each preset's three phases back to back, also rotating), so load on the machine falls on all presets and phases
   alike: each sample restores its cache copy and times ``--chunks-per-sample`` consecutive chunks, starting at an
   even chunk in every phase (with 2-chunk consolidation strides, §I.5, every phase starts on a candidate chunk);
3. per (preset, phase): the median ms per chunk and its interquartile range over rounds; per preset: the late/early
   ratio of each round (paired: both timed within one round), their median and a bootstrap 95% interval of it.

The last line is ``ratio_late_over_early=<x>`` for slow_fast: ≈ 1.0 means constant cost per chunk (the full cache
grows).

    python bench/chunk_cost.py                         # 2-layer dim-128 DiT, 8 x 8 latents, 60 s of 16 fps video
    python bench/chunk_cost.py --model wan1.3b --height 60 --width 104 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections.abc import Callable

import torch

from cf.memory import MemoryConfig, SlowFastMemory
from cf.models.wan import CausalWanDiT, WanConfig
from cf.rollout import SamplingConfig, commit_chunk, denoise_chunk

PHASES = ("early", "middle", "late")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stream:
    """One preset's video: the model, its text K/V and a cache, advanced chunk by chunk."""

    def __init__(self, model: CausalWanDiT, preset: str, latent_hw: tuple[int, int], seed: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        config = model.config
        param = next(model.parameters())
        self.model, self.latent_hw = model, latent_hw
        self.device, self.dtype = param.device, param.dtype
        self.memory = SlowFastMemory(MemoryConfig.preset(preset), config.num_layers)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        text = torch.randn(1, config.text_len, config.text_dim, device=self.device, dtype=self.dtype,
                           generator=self.generator)
        self.text_kv = model.text_kv(text)
        self.timesteps = SamplingConfig().timesteps()
        self.clock = clock

    def clone(self) -> "Stream":
        """A copy with its own cache and noise generator, sharing the model and the text K/V."""
        other = copy.copy(self)
        other.memory = copy.deepcopy(self.memory)
        other.generator = torch.Generator(device=self.device)
        other.generator.set_state(self.generator.get_state())
        return other

    @torch.no_grad()
    def run(self, first_chunk: int, count: int) -> float:
        """Generate chunks ``first_chunk ... first_chunk + count - 1`` through the cache; seconds of compute."""
        n = self.model.frames_per_chunk
        seconds = 0.0
        for chunk in range(first_chunk, first_chunk + count):
            noise = torch.randn(1, self.model.config.in_dim, n, *self.latent_hw, device=self.device,
                                dtype=self.dtype, generator=self.generator)
            synchronize(self.device)
            start = self.clock()
            x0 = denoise_chunk(self.model, noise, self.text_kv, self.memory, chunk * n, self.timesteps,
                               self.generator)
            commit_chunk(self.model, x0, self.text_kv, self.memory, chunk * n)
            synchronize(self.device)
            seconds += self.clock() - start
        return seconds


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def bootstrap_median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bench", "tiny", "wan1.3b"], default="bench")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--height", type=int, default=8, help="latent height")
    parser.add_argument("--width", type=int, default=8, help="latent width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--presets", default="slow_fast,sliding,full")
    parser.add_argument("--rounds", type=int, default=100, help="timed samples per preset and phase")
    parser.add_argument("--chunks-per-sample", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="cpu: this process's CPU time (what a chunk costs, whatever else the machine runs); "
                             "wall: elapsed time; auto: cpu on a CPU device, wall on CUDA")
    parser.add_argument("--samples-out", help="write every sample (ms per chunk) to this JSON file")
    args = parser.parse_args()
    if args.rounds < 2 or args.chunks_per_sample < 1:
        parser.error("need --rounds >= 2 and --chunks-per-sample >= 1")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = {"bench": WanConfig(dim=128, ffn_dim=256, freq_dim=32, text_dim=32, text_len=8, in_dim=4, out_dim=4,
                                 num_heads=4, num_layers=2),
              "tiny": WanConfig.tiny(), "wan1.3b": WanConfig.wan2_1_1_3b()}[args.model]
    with torch.device(device):
        model = CausalWanDiT(config).to(dtype).eval()
    latent_hw = (args.height, args.width)
    presets = args.presets.split(",")
    k = args.chunks_per_sample
    latent_frames = (round(args.seconds * 16) - 1 + 3) // 4 + 1
    num_chunks = max(12 + k, latent_frames // 3)
    starts = {"early": 8}  # the slow-fast memory is full from chunk 6 on
    starts["middle"] = max(starts["early"] + 2, num_chunks // 4 * 2)
    starts["late"] = max(starts["middle"] + 2, (num_chunks - k) // 2 * 2)
    tokens = (args.height // 2) * (args.width // 2)
    print(f"model={args.model} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"chunks={num_chunks} ({num_chunks * 3} latent frames, {args.seconds:g} s) tokens/frame={tokens}")
    clock_name = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    print(f"clock={clock_name}; {args.rounds} rounds of {k} chunk(s) per sample, presets and phases interleaved "
          "round-robin, each sample from a copy of its cache at the phase start")
    Stream(model, presets[0], latent_hw, seed=1).run(0, 3)  # warm-up
    snapshots: dict[tuple[str, str], Stream] = {}
    for index, preset in enumerate(presets):
        stream = Stream(model, preset, latent_hw, seed=100 + index, clock=clock)
        done = 0
        for phase in PHASES:
            stream.run(done, starts[phase] - done)
            done = starts[phase]
            snapshots[preset, phase] = stream.clone()

    samples: dict[tuple[str, str], list[float]] = {key: [] for key in snapshots}
    cache_mib: dict[tuple[str, str], float] = {}
    for round_index in range(args.rounds):
        for i in range(len(presets)):
            preset = presets[(round_index + i) % len(presets)]
            for j in range(len(PHASES)):
                phase = PHASES[(round_index + j) % len(PHASES)]
                stream = snapshots[preset, phase].clone()
                samples[preset, phase].append(1000.0 * stream.run(starts[phase], k) / k)
                cache_mib[preset, phase] = stream.memory.used_bytes() / 2 ** 20

    print(f"{'memory':<10} {'phase':<7} {'chunk':>6} {'ms/chunk':>9} {'IQR':>17} {'cache MiB':>10}")
    for preset, phase in snapshots:
        q1, median, q3 = quartiles(samples[preset, phase])
        print(f"{preset:<10} {phase:<7} {starts[phase]:>6} {median:>9.2f} {f'[{q1:.2f}, {q3:.2f}]':>17} "
              f"{cache_mib[preset, phase]:>10.2f}")
    print("late/early per round (both timed in the same round): median [95% bootstrap interval]")
    ratios = {}
    for preset in presets:
        per_round = [late / early for late, early in zip(samples[preset, "late"], samples[preset, "early"])]
        low, high = bootstrap_median_interval(per_round)
        ratios[preset] = statistics.median(per_round)
        print(f"{preset}: late/early = {ratios[preset]:.3f} [{low:.3f}, {high:.3f}]")
    if args.samples_out:
        with open(args.samples_out, "w") as f:
            json.dump({f"{preset}/{phase}": values for (preset, phase), values in samples.items()}, f)
    if "slow_fast" in ratios:
        print(f"ratio_late_over_early={ratios['slow_fast']:.3f}")


if __name__ == "__main__":
    main()
