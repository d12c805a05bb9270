"""Chunk-by-chunk generation with the causal student: streaming inference (method.md §B.3, §G).

Per chunk: start from fresh noise, run the warped few-step list (t = 1000, 937.5, 833.3, 625 at shift 5) with fresh
re-noising between steps, then a commit pass at t = 0 on the clean output that fixes the chunk's K/V in the cache.
The text cross-attention K/V are computed once per video, and once more at every prompt switch of a schedule (where
the memory can be re-cached under the new prompt, `cf.recache`). Given latents (a continuation) are committed as
they are, never denoised. With a bounded memory (`cf.memory`) the cost and memory of a chunk do not depend on how
long the video already is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from cf.diffusion import add_noise, flow_to_x0, warp_timesteps
from cf.memory import KeyframePolicy, MemoryConfig, SlowFastMemory
from cf.models.kv_cache import KVCache
from cf.models.wan import CausalWanDiT
from cf.recache import held_frames, parse_regions, recache_memory


Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` [B, ...]: from one generator for the batch, or from one generator per
    sample (so a sample's noise does not depend on the batch it is generated in)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


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
    generator: Generators = None,
    exit_index: int | None = None,
    grad_at_exit: bool | None = None,
) -> Tensor:
    """Few-step denoising of one chunk from `noise` [B, C, n, H, W]; returns x̂0 of the exit step.

    Runs steps 0 … `exit_index` (all by default), re-noising with fresh noise in between. Every call writes the
    chunk's K/V into `cache` (repeated calls rewrite the chunk's own slots). With `grad_at_exit` given, autograd
    records only the exit step's call, and only when it is True (the training rollout); None keeps the caller's
    grad mode."""
    batch = noise.shape[0]
    last = len(timesteps) - 1 if exit_index is None else exit_index
    x = x0 = noise
    for k in range(last + 1):
        t = float(timesteps[k])
        grad_mode = nullcontext() if grad_at_exit is None else torch.set_grad_enabled(grad_at_exit and k == last)
        with grad_mode:
            flow = model.forward_chunk(x, torch.full((batch,), t, device=x.device), text_kv, cache, start_frame)
            x0 = flow_to_x0(x, flow, t / 1000.0)
        if k < last:
            fresh = draw_noise(x.shape, generator, x.device, x.dtype)
            x = add_noise(x0.detach(), fresh, float(timesteps[k + 1]) / 1000.0)
    return x0


def commit_chunk(model: CausalWanDiT, x0: Tensor, text_kv: list, cache: KVCache, start_frame: int,
                 noise_sigma: float = 0.0, generator: Generators = None) -> None:
    """The t = 0 pass on the clean chunk that writes its final K/V into the cache (output discarded)."""
    x = x0
    if noise_sigma > 0:
        fresh = draw_noise(x0.shape, generator, x0.device, x0.dtype)
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


def _check_stream_extras(model: CausalWanDiT, text: Tensor, num_frames: int | None, latent_size: tuple[int, int],
                         text_schedule: Sequence[tuple[int, Tensor]], init_latents: Tensor | None) -> Tensor | None:
    """Validate a schedule and given latents for `stream`; returns the given latents expanded to the batch."""
    n, batch = model.frames_per_chunk, text.shape[0]
    previous = -1
    for start, embedding in text_schedule:
        if start % n or not previous < start < (math.inf if num_frames is None else num_frames):
            raise ValueError(f"prompt switch at latent frame {start}: switches must be increasing multiples of "
                             f"frames_per_chunk ({n}) below num_frames ({num_frames})")
        if embedding.shape[0] != batch or embedding.shape[2:] != text.shape[2:]:
            raise ValueError(f"the text at frame {start} has shape {tuple(embedding.shape)}; it must match the "
                             f"first prompt's [B={batch}, L, {text.shape[-1]}]")
        previous = start
    if init_latents is None:
        return None
    frames = init_latents.shape[2] if init_latents.ndim == 5 else -1
    expected = (model.config.in_dim, *latent_size)
    if init_latents.ndim != 5 or init_latents.shape[0] not in (1, batch) or \
            (init_latents.shape[1], *init_latents.shape[3:]) != expected:
        raise ValueError(f"init_latents must be [1 or {batch}, {expected[0]}, F, {expected[1]}, {expected[2]}], got "
                         f"{tuple(init_latents.shape)}")
    if frames <= 0 or frames % n or (num_frames is not None and frames > num_frames):
        raise ValueError(f"init_latents hold {frames} frames: give a positive multiple of frames_per_chunk ({n}) "
                         f"of at most num_frames ({num_frames})")
    return init_latents.expand(batch, *init_latents.shape[1:])


@torch.no_grad()
def stream(
    model: CausalWanDiT,
    text: Tensor,
    num_frames: int | None,
    latent_size: tuple[int, int],
    memory: MemoryConfig | KVCache | str = "slow_fast",
    sampling: SamplingConfig | None = None,
    seed: int | None = 0,
    generator: Generators = None,
    keyframes: KeyframePolicy | None = None,
    *,
    text_schedule: Sequence[tuple[int, Tensor]] | Callable[[int], Tensor | None] = (),
    recache: str | Sequence[str] = "none",
    init_latents: Tensor | None = None,
) -> Iterator[Tensor]:
    """Generate `num_frames` latent frames chunk by chunk, yielding each chunk [B, C, n, h, w] as it is done
    (`num_frames=None`: without end, for a consumer that stops when it likes, e.g. `cf serve`).

    text: prompt embeddings [B, L, text_dim]; latent_size: (h, w); memory: a `MemoryConfig`, a preset name
    (slow_fast | sliding | self_forcing | full | released_code) or a cache object. Seeded: the same seed gives the same
    video. Pass a `generator` instead of `seed` to control the random stream yourself, or one generator per sample
    (then a sample's video does not depend on the batch it is generated in).

    text_schedule: (start_frame, embeddings [B, L, text_dim]) pairs, start frames increasing multiples of the chunk
    size: from `start_frame` on the chunks are conditioned on that text (its cross-attention K/V computed once, at
    the switch); `text` conditions the chunks before the first switch. A callable schedule is asked at each chunk
    ``schedule(start_frame)`` for new embeddings (None: keep the current text), for prompts decided while the
    video streams. recache: memory regions re-cached under the
    new text at each switch (`cf.recache.parse_regions`: none | all | sink, slow, fast joined by "+"; needs a
    Slow-Fast Memory). init_latents [1 or B, C, F0, h, w] (F0 a multiple of the chunk size): the video's first F0
    frames, committed to the memory with the commit pass of a generated chunk and yielded as they are; generation
    continues from frame F0 (no noise is drawn for them).
    """
    n = model.frames_per_chunk
    if num_frames is not None and (num_frames <= 0 or num_frames % n):
        raise ValueError(f"num_frames must be a positive multiple of frames_per_chunk ({n}), got {num_frames}")
    sampling = sampling or SamplingConfig()
    device = text.device
    dtype = next(model.parameters()).dtype
    given = _check_stream_extras(model, text, num_frames, latent_size,
                                 () if callable(text_schedule) else text_schedule, init_latents)
    regions = parse_regions(recache)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    cache = make_memory(model, memory, keyframes)
    if regions and held_frames(cache) is None:
        raise ValueError(f"re-caching {'+'.join(regions)} needs the Slow-Fast Memory, not {type(cache).__name__}; "
                         "pass memory as a MemoryConfig or preset name, or recache='none'")
    switch_at = text_schedule if callable(text_schedule) else dict(text_schedule).get
    text_kv = model.text_kv(text.to(dtype))
    timesteps = sampling.timesteps()
    shape = (text.shape[0], model.config.in_dim, n, *latent_size)
    track = bool(regions and (callable(text_schedule) or text_schedule))
    kept: dict[int, Tensor] = {}  # clean latents [B, C, h, w] of the frames the memory holds (for re-caching)
    for start in itertools.count(0, n) if num_frames is None else range(0, num_frames, n):
        switch = switch_at(start)
        if switch is not None:
            text_kv = model.text_kv(switch.to(device=device, dtype=dtype))
            if regions:
                recache_memory(model, cache, kept, text_kv, regions)
        if given is not None and start < given.shape[2]:
            x0 = given[:, :, start : start + n].to(device=device, dtype=dtype).clone()
        else:
            noise = draw_noise(shape, generator, device, dtype)
            x0 = denoise_chunk(model, noise, text_kv, cache, start, timesteps, generator)
        commit_chunk(model, x0, text_kv, cache, start, sampling.commit_noise_sigma, generator)
        if track:
            kept.update({start + i: x0[:, :, i] for i in range(n)})
            held = held_frames(cache)
            kept = {f: z for f, z in kept.items() if f in held}
        yield x0


# ------------------------------------------------------------------------------------------------ training rollout
@dataclass
class RolloutConfig:
    """The student's own rollout inside a training step (§F.4).

    Length N = frames_per_chunk · b with b ~ U{min_blocks … cap(step)}, cap growing linearly from min_blocks to
    max_blocks over `decay_steps` trainer steps (0: the cap is max_blocks at once). Gradient flows only through the
    exit step of the chunks in the last `grad_window_frames` frames (18 by default: the final 21-frame target window
    minus its first chunk, which is fully denoised); `grad_window_frames=None` gives Algorithm 1's every-chunk
    variant. Chunks before the window are fully denoised (clean context); the others exit at the shared index r.
    """

    min_blocks: int = 7
    max_blocks: int = 7
    decay_steps: int = 0
    grad_window_frames: int | None = 18
    sampling: SamplingConfig | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise ValueError(f"need 1 <= min_blocks <= max_blocks, got {self.min_blocks}, {self.max_blocks}")
        if self.decay_steps < 0:
            raise ValueError(f"decay_steps must be >= 0, got {self.decay_steps}")
        self.sampling = self.sampling or SamplingConfig()


def rollout_block_cap(step: int, min_blocks: int, max_blocks: int, decay_steps: int) -> int:
    """⌊b_min + min(1, step / decay_steps)·(b_max − b_min)⌋ (§F.4 step 1)."""
    progress = 1.0 if decay_steps <= 0 else min(1.0, step / decay_steps)
    return int(min_blocks + progress * (max_blocks - min_blocks))


def sample_num_blocks(step: int, config: RolloutConfig, generator: torch.Generator | None = None) -> int:
    """b ~ U{b_min … cap(step)}; draw with a generator seeded identically on all ranks to share it."""
    cap = rollout_block_cap(step, config.min_blocks, config.max_blocks, config.decay_steps)
    return int(torch.randint(config.min_blocks, cap + 1, (1,), generator=generator))


def sample_exit_index(num_steps: int, generator: torch.Generator | None = None) -> int:
    """r ~ U{0 … num_steps − 1}, one per rollout, shared by all chunks (and all ranks, via a shared seed)."""
    return int(torch.randint(0, num_steps, (1,), generator=generator))


def train_rollout(
    model: CausalWanDiT,
    text_kv: list,
    num_frames: int,
    latent_size: tuple[int, int],
    batch_size: int,
    cache: KVCache,
    exit_index: int,
    config: RolloutConfig,
    generator: torch.Generator | None = None,
    grad: bool = True,
    on_chunk_end: Callable[[int, KVCache], None] | None = None,
) -> Tensor:
    """Roll the student out for `num_frames` latent frames through `cache`; returns [B, C, N, h, w].

    Only the exit-step outputs of the grad-window chunks carry gradient (when `grad`); every cache write and every
    commit pass is detached. `exit_index` indexes the sampling steps (0 … K−1). `on_chunk_end(end_frame, cache)` is
    called after each chunk's commit pass (e.g. to read the memory's slot table at a given frame).
    """
    n = model.frames_per_chunk
    if num_frames % n:
        raise ValueError(f"num_frames must be a multiple of frames_per_chunk ({n}), got {num_frames}")
    sampling = config.sampling
    timesteps = sampling.timesteps()
    steps = len(timesteps)
    if not 0 <= exit_index < steps:
        raise ValueError(f"exit_index must be in [0, {steps - 1}], got {exit_index}")
    window = num_frames if config.grad_window_frames is None else config.grad_window_frames
    grad_start = max(0, num_frames - window)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    shape = (batch_size, model.config.in_dim, n, *latent_size)
    outputs = []
    for start in range(0, num_frames, n):
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        x0 = denoise_chunk(model, noise, text_kv, cache, start, timesteps, generator,
                           exit_index=steps - 1 if start <= grad_start else exit_index,
                           grad_at_exit=grad and start >= grad_start)
        outputs.append(x0)
        with torch.no_grad():
            commit_chunk(model, x0.detach(), text_kv, cache, start, sampling.commit_noise_sigma, generator)
        if on_chunk_end is not None:
            on_chunk_end(start + n, cache)
    return torch.cat(outputs, dim=2)


def teacher_window(
    frames: Tensor,
    context_frames: int = 21,
    target_frames: int = 21,
    autoencoder=None,
) -> tuple[Tensor | None, Tensor]:
    """The window the teacher and critic score (§F.5): (context [B,C,Tc,h,w] detached or None, target [B,C,Tt,h,w]).

    With N = context + target frames exactly (or N = target and no context) the frames are used as they are. With
    more, the window starts with a 1-frame "image latent": the last pixel frame of the prefix, decoded and encoded
    alone with `autoencoder` (pass None to use the prefix's last latent as is, e.g. for the exact toy autoencoder),
    followed by the last (window − 1) frames.
    """
    total = frames.shape[2]
    window = context_frames + target_frames
    if total < window:
        raise ValueError(f"a rollout of {total} frames is shorter than the teacher window ({context_frames} context + "
                         f"{target_frames} target); lengthen the rollout or shorten the window")
    if total > window:
        prefix = frames[:, :, : total - window + 1]
        if autoencoder is None:
            first = prefix[:, :, -1:].detach()
        else:
            with torch.no_grad():
                last_pixel = autoencoder.decode(prefix.detach().float())[:, :, -1:]
                first = autoencoder.encode(last_pixel).to(frames.dtype)
        frames = torch.cat([first, frames[:, :, total - window + 1 :]], dim=2)
    if context_frames == 0:
        return None, frames
    return frames[:, :, :context_frames].detach(), frames[:, :, context_frames:]


def memory_context_frames(slot_frames: Sequence[int], sink: int, slow: int, recent: int, target_start: int
                          ) -> list[int]:
    """The frames a `teacher_context="memory"` teacher sees (§I.4): the student memory's sink and slow slots (their
    source frames, as the slot table holds them when the target window starts), then the `recent` frames right
    before the target."""
    remembered = [int(f) for f in slot_frames[: sink + slow] if f >= 0]
    return remembered + list(range(target_start - recent, target_start))


def memory_teacher_window(frames: Tensor, slot_frames: Sequence[Sequence[int]], sink: int, slow: int, recent: int,
                          target_frames: int) -> tuple[Tensor, Tensor]:
    """(context [B,C,Tc,h,w] detached, target [B,C,Tt,h,w]) with the context taken from the student's memory.

    `slot_frames[b]` is sample b's slot table when the target window starts (frame N − target_frames); every sample
    must hold the same number of frames (true once the cache has filled)."""
    total = frames.shape[2]
    target_start = total - target_frames
    indices = [memory_context_frames(slots, sink, slow, recent, target_start) for slots in slot_frames]
    if len({len(i) for i in indices}) != 1:
        raise ValueError(f"the samples' memories hold different numbers of frames ({[len(i) for i in indices]}); "
                         "the target window must start after the cache has filled")
    index = torch.tensor(indices, device=frames.device)  # [B, Tc]
    context = torch.stack([frames[b, :, index[b]] for b in range(frames.shape[0])]).detach()
    return context, frames[:, :, target_start:]
