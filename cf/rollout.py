"""Chunk-by-chunk generation with the causal student: streaming inference (method.md §B.3, §G).

Per chunk: start from fresh noise, run the warped few-step list (t = 1000, 937.5, 833.3, 625 at shift 5) with fresh
re-noising between steps, then a commit pass at t = 0 on the clean output that fixes the chunk's K/V in the cache.
The text cross-attention K/V are computed once per video. With a bounded memory (`cf.memory`) the cost and memory
of a chunk do not depend on how long the video already is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cf.diffusion import add_noise, flow_to_x0, warp_timesteps
from cf.memory import KeyframePolicy, MemoryConfig, SlowFastMemory
from cf.models.kv_cache import KVCache
from cf.models.wan import CausalWanDiT


@dataclass
class SamplingConfig:
    """Few-step sampling of one chunk."""

    denoising_steps: Sequence[int] = (1000, 750, 500, 250)
    shift: float = 5.0
    warp: bool = True
    commit_noise_sigma: float = 0.0  # §I.11: the released training rollout commits with σ ≈ 0.005

    def timesteps(self) -> Tensor:
        steps = [float(s) for s in self.denoising_steps]
        return warp_timesteps(self.denoising_steps, self.shift) if self.warp else torch.tensor(steps)


def denoise_chunk(
    model: CausalWanDiT,
    noise: Tensor,
    text_kv: list,
    cache: KVCache,
    start_frame: int,
    timesteps: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Few-step denoising of one chunk from `noise` [B, C, n, H, W]; returns x̂0 of the last step.

    Every call writes the chunk's K/V into `cache` (repeated calls rewrite the chunk's own slots)."""
    batch = noise.shape[0]
    x = noise
    x0 = noise
    for k, t in enumerate(timesteps.tolist()):
        sigma = t / 1000.0
        flow = model.forward_chunk(x, torch.full((batch,), t, device=x.device), text_kv, cache, start_frame)
        x0 = flow_to_x0(x, flow, sigma)
        if k + 1 < len(timesteps):
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = add_noise(x0, fresh, float(timesteps[k + 1]) / 1000.0)
    return x0


def commit_chunk(model: CausalWanDiT, x0: Tensor, text_kv: list, cache: KVCache, start_frame: int,
                 noise_sigma: float = 0.0, generator: torch.Generator | None = None) -> None:
    """The t = 0 pass on the clean chunk that writes its final K/V into the cache (output discarded)."""
    x = x0
    if noise_sigma > 0:
        fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = add_noise(x0, fresh, noise_sigma)
    zeros = torch.zeros(x0.shape[0], device=x0.device)
    model.forward_chunk(x, zeros, text_kv, cache, start_frame, commit=True)


def make_memory(model: CausalWanDiT, memory: MemoryConfig | KVCache | str,
                keyframes: KeyframePolicy | None = None) -> KVCache:
    """A fresh cache for one video: from a `MemoryConfig`, a preset name, or an existing cache object."""
    if isinstance(memory, str):
        memory = MemoryConfig.preset(memory, frames_per_chunk=model.frames_per_chunk)
    if isinstance(memory, MemoryConfig):
        if memory.frames_per_chunk != model.frames_per_chunk:
            raise ValueError(f"memory chunk size {memory.frames_per_chunk} differs from the model's "
                             f"frames_per_chunk {model.frames_per_chunk}")
        return SlowFastMemory(memory, model.config.num_layers, keyframes)
    return memory


@torch.no_grad()
def stream(
    model: CausalWanDiT,
    text: Tensor,
    num_frames: int,
    latent_size: tuple[int, int],
    memory: MemoryConfig | KVCache | str = "slow_fast",
    sampling: SamplingConfig | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    keyframes: KeyframePolicy | None = None,
) -> Iterator[Tensor]:
    """Generate `num_frames` latent frames chunk by chunk, yielding each chunk [B, C, n, h, w] as it is done.

    text: prompt embeddings [B, L, text_dim]; latent_size: (h, w); memory: a `MemoryConfig`, a preset name
    (slow_fast | sliding | self_forcing | full | released_code) or a cache object. Seeded: the same seed gives the same
    video. Pass a `generator` instead of `seed` to control the random stream yourself.
    """
    n = model.frames_per_chunk
    if num_frames <= 0 or num_frames % n:
        raise ValueError(f"num_frames must be a positive multiple of frames_per_chunk ({n}), got {num_frames}")
    sampling = sampling or SamplingConfig()
    device = text.device
    dtype = next(model.parameters()).dtype
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    cache = make_memory(model, memory, keyframes)
    text_kv = model.text_kv(text.to(dtype))
    timesteps = sampling.timesteps()
    shape = (text.shape[0], model.config.in_dim, n, *latent_size)
    for start in range(0, num_frames, n):
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        x0 = denoise_chunk(model, noise, text_kv, cache, start, timesteps, generator)
        commit_chunk(model, x0, text_kv, cache, start, sampling.commit_noise_sigma, generator)
        yield x0
