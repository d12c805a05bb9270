"""Per-chunk cost of streaming generation vs. video length, for the memory presets.

Prints a table of wall time per chunk (4 denoising calls + commit pass) and K/V cache bytes in use at early, middle
and late chunks of a long video, for slow_fast, sliding and full caches. The last line is
`ratio_late_over_early=<x>` for slow_fast: ≈ 1.0 means constant cost per chunk (the full cache grows).

    python bench/chunk_cost.py                         # CPU-sized DiT, 60 s of 16 fps video
    python bench/chunk_cost.py --model wan1.3b --height 60 --width 104 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cf.memory import MemoryConfig, SlowFastMemory
from cf.models.wan import CausalWanDiT, WanConfig
from cf.rollout import SamplingConfig, commit_chunk, denoise_chunk


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model: CausalWanDiT, preset: str, num_chunks: int, latent_hw: tuple[int, int], device: torch.device,
            dtype: torch.dtype) -> list[tuple[float, int]]:
    """(seconds, cache bytes in use) for every chunk of one video."""
    memory = SlowFastMemory(MemoryConfig.preset(preset), model.config.num_layers)
    text_kv = model.text_kv(torch.randn(1, model.config.text_len, model.config.text_dim, device=device, dtype=dtype))
    timesteps = SamplingConfig().timesteps()
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for chunk in range(num_chunks):
        start = chunk * model.frames_per_chunk
        noise = torch.randn(1, model.config.in_dim, model.frames_per_chunk, *latent_hw, device=device, dtype=dtype,
                            generator=gen)
        synchronize(device)
        t0 = time.perf_counter()
        x0 = denoise_chunk(model, noise, text_kv, memory, start, timesteps, gen)
        commit_chunk(model, x0, text_kv, memory, start)
        synchronize(device)
        out.append((time.perf_counter() - t0, memory.used_bytes()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bench", "tiny", "wan1.3b"], default="bench")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--height", type=int, default=16, help="latent height")
    parser.add_argument("--width", type=int, default=16, help="latent width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--presets", default="slow_fast,sliding,full")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = {"bench": WanConfig(dim=128, ffn_dim=256, freq_dim=32, text_dim=32, text_len=8, in_dim=4, out_dim=4,
                                 num_heads=4, num_layers=4),
              "tiny": WanConfig.tiny(), "wan1.3b": WanConfig.wan2_1_1_3b()}[args.model]
    with torch.device(device):
        model = CausalWanDiT(config).to(dtype).eval()
    latent_frames = (round(args.seconds * 16) - 1 + 3) // 4 + 1
    num_chunks = max(12, latent_frames // 3)
    picks = {"early": range(8, 11), "middle": range(num_chunks // 2 - 1, num_chunks // 2 + 2),
             "late": range(num_chunks - 3, num_chunks)}
    tokens = (args.height // 2) * (args.width // 2)
    print(f"model={args.model} device={args.device} dtype={args.dtype} chunks={num_chunks} "
          f"({num_chunks * 3} latent frames, {args.seconds:g} s) tokens/frame={tokens}")
    print(f"{'memory':<10} {'phase':<7} {'chunk':>7} {'ms/chunk':>10} {'cache MiB':>10}")
    ratios = {}
    for preset in args.presets.split(","):
        measure(model, preset, 3, (args.height, args.width), device, dtype)  # warm-up
        results = measure(model, preset, num_chunks, (args.height, args.width), device, dtype)
        medians = {}
        for phase, idx in picks.items():
            ms = statistics.median(results[i][0] for i in idx) * 1000
            mib = results[idx[-1]][1] / 2**20
            medians[phase] = ms
            print(f"{preset:<10} {phase:<7} {idx[1]:>7} {ms:>10.2f} {mib:>10.2f}")
        ratios[preset] = medians["late"] / medians["early"]
    for preset, ratio in ratios.items():
        if preset != "slow_fast":
            print(f"{preset}: late/early = {ratio:.2f}")
    if "slow_fast" in ratios:
        print(f"ratio_late_over_early={ratios['slow_fast']:.2f}")


if __name__ == "__main__":
    main()
