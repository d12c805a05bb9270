"""The many-step Euler sampler of the bidirectional teacher, with classifier-free guidance (method §E.4, §F.9,
§I.22).

One loop, `sample_flow`, serves the teacher's continuations (`continue_latents`: `TeacherERFT.continue_video`, its
validation videos, the toy base videos) and the stage-0 ODE trajectories (`data.ode_pairs.ode_trajectory`). The
σ schedule is `cf.diffusion.sampling_sigmas`. Latents ``[B, C, T, h, w]``, text embeddings ``[B, L, D]``; the
network is called as ``network(sequence [B', C, T', h, w], t [B'], text [B', L, D]) -> flow like sequence``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from cf.losses import classifier_free_guidance

__all__ = ["FlowSample", "continue_latents", "sample_flow"]

Network = Callable[[Tensor, Tensor, Tensor], Tensor]


class FlowSample(NamedTuple):
    """What `sample_flow` returns: the final latents float32 ``[B, C, T, h, w]`` and, when steps were stored, the
    states before those steps float32 ``[B, K, C, T, h, w]`` (else None)."""

    latents: Tensor
    states: Tensor | None


@torch.no_grad()
def sample_flow(
    network: Network,
    noise: Tensor,
    text: Tensor,
    sigmas: Tensor,
    *,
    context: Tensor | None = None,
    dtype: torch.dtype | None = None,
    guidance_scale: float | None = None,
    negative_text: Tensor | None = None,
    stored_steps: Sequence[int] = (),
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> FlowSample:
    """Integrate the flow ODE from ``noise`` ``[B, C, T, h, w]`` with Euler steps ``x ← x + (σ_{i+1} − σ_i)·v̂`` over
    ``sigmas`` (descending to 0; `cf.diffusion.sampling_sigmas`), keeping x in float32.

    At every step the network sees ``[context | x]`` (frames concatenated) at the one timestep ``1000·σ_i``: the
    clean ``context`` ``[B, C, T_c, h, w]`` is imposed again at each step and only the last T frames of the
    prediction are integrated, so the context never drifts. Without context the network sees x alone.

    Guidance: ``guidance_scale`` None makes one conditional call per step. A number g makes one batched call on
    ``[text; negative_text]`` (2B rows; ``negative_text`` ``[1 or B, L, D]``, zeros if None) and
    ``v̂ = classifier_free_guidance(cond, uncond, g − 1) = cond + (g − 1)·(cond − uncond)``, which is standard CFG
    ``uncond + g·(cond − uncond)`` computed in that order (g = 1 then still makes the 2B-row call).

    ``dtype`` is the dtype of the latents fed to the network (default: the context's, float32 without context);
    the text goes in as given, so pass it in the network's dtype. ``stored_steps`` (indices into the steps) keep
    the state before those steps. ``progress`` wraps the step range (e.g. a tqdm bar).
    """
    num_steps = len(sigmas) - 1
    stored = {int(s) for s in stored_steps}
    if any(not 0 <= s < num_steps for s in stored):
        raise ValueError(f"stored_steps must lie in [0, {num_steps}), got {sorted(stored)}")
    b, _, num_frames = noise.shape[:3]
    device = context.device if context is not None else noise.device
    if dtype is None:
        dtype = context.dtype if context is not None else torch.float32
    guided = guidance_scale is not None
    if guided:
        negative = torch.zeros_like(text) if negative_text is None else negative_text.to(text)
        if negative.shape[0] == 1 and b > 1:
            negative = negative.expand(b, *negative.shape[1:])
        texts = torch.cat([text, negative])
        ctx = None if context is None else torch.cat([context, context]).to(dtype)
    else:
        texts, ctx = text, None if context is None else context.to(dtype)
    x = noise.to(device=device, dtype=torch.float32)
    states = []
    steps = range(num_steps)
    for i in progress(steps) if progress is not None else steps:
        if i in stored:
            states.append(x.clone())
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_in = (torch.cat([x, x]) if guided else x).to(dtype)
        sequence = x_in if ctx is None else torch.cat([ctx, x_in], dim=2)
        t = torch.full((sequence.shape[0],), 1000.0 * sigma, device=device)
        flow = network(sequence, t, texts)[:, :, -num_frames:].float()
        if guided:
            cond, uncond = flow.chunk(2)
            flow = classifier_free_guidance(cond, uncond, float(guidance_scale) - 1.0)
        x = x + (sigma_next - sigma) * flow
    return FlowSample(x, torch.stack(states, dim=1) if states else None)


def continue_latents(
    network: Network,
    context: Tensor,
    text: Tensor,
    num_target_frames: int,
    sigmas: Tensor,
    guidance_scale: float = 5.0,
    negative_text: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> Tensor:
    """Sample ``num_target_frames`` latents that continue ``context`` ``[B, C, T_c, h, w]`` (§E.4, §I.22; T_c may
    be 0) with `sample_flow`, starting from ``noise`` (drawn with ``generator`` if None). The network sees the
    context in its dtype. With ``guidance_scale`` g ≠ 1 the prediction is ``v_u + g·(v_c − v_u)`` with
    ``negative_text`` (zeros if None) as the unconditional prompt; g = 1 makes one conditional call per step.
    Returns the target latents ``[B, C, num_target_frames, h, w]`` in the context's dtype.
    """
    if context.dim() != 5:
        raise ValueError(f"context latents must be [B, C, T, h, w], got shape {tuple(context.shape)}")
    if num_target_frames < 1:
        raise ValueError(f"num_target_frames must be >= 1, got {num_target_frames}")
    b, c, _, h, w = context.shape
    shape = (b, c, num_target_frames, h, w)
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else context.device)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    scale = None if float(guidance_scale) == 1.0 else float(guidance_scale)
    sample = sample_flow(network, noise, text, sigmas, context=context, guidance_scale=scale,
                         negative_text=negative_text, progress=progress)
    return sample.latents.to(context.dtype)
