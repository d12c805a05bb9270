"""Losses of Contextual DMD (method §F.6–F.7) and of the teacher's flow-matching fine-tuning (§E.3), and the guided
score predictions they use.

Two levels: the maths on tensors (`dmd_generator_loss`, `critic_flow_loss`, `flow_matching_loss`,
`classifier_free_guidance`), and the CDMD losses of one micro-batch given the networks (`cdmd_generator_loss`,
`cdmd_critic_loss`, with `predict_x0` / `guided_x0` for the scores). Latents are ``[B, C, T, H, W]``; timesteps
``t`` are per-sample ``[B]`` values in [0, 1000].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cf.diffusion import add_noise, flow_to_x0, training_weight

__all__ = ["cdmd_critic_loss", "cdmd_generator_loss", "classifier_free_guidance", "critic_flow_loss",
           "dmd_generator_loss", "flow_matching_loss", "guided_x0", "predict_x0"]


def _check_batched_same_shape(**tensors: Tensor) -> None:
    """All tensors share one shape, batched as [B, ...]."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{', '.join(shapes)} must have the same shape, got "
                         + ", ".join(str(shape) for shape in shapes.values()))
    first = next(iter(shapes.values()))
    if len(first) < 2:
        raise ValueError(f"inputs must be batched as [B, ...] with at least 2 dims, got shape {first}")


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """``cond + scale·(cond − uncond)``: the real-score guidance of §F.6, effective CFG scale ``1 + scale``."""
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    return cond + scale * (cond - uncond)


def dmd_generator_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Distribution-matching generator loss (§F.6 steps 5–6).

    Args:
        x: generator output ``[B, ...]`` (the target window; only the parts that carry grad receive gradient).
        x0_real: real-score (teacher, guided) clean estimate of the re-noised ``x``, same shape.
        x0_fake: fake-score (critic) clean estimate, same shape.

    Returns:
        ``(loss, stats)``. The loss is ``½·mean((x − stopgrad(x − Δ))²)`` evaluated in float64 and cast to x's dtype,
        with ``Δ = (x0_fake − x0_real) / mean_{C,T,H,W}|x − x0_real|`` per sample (nan_to_num, detached), so
        ``dL/dx = Δ / x.numel()``. The mean runs over every element of ``x``, including frames without grad
        (§I.28: this only rescales the step). ``stats`` holds detached scalars for logging.
    """
    _check_batched_same_shape(x=x, x0_real=x0_real, x0_fake=x0_fake)
    with torch.no_grad():
        x64 = x.detach().to(torch.float64)
        real64 = x0_real.detach().to(torch.float64)
        reduce_dims = tuple(range(1, x.ndim))
        normalizer = (x64 - real64).abs().mean(dim=reduce_dims, keepdim=True)
        raw_delta = x0_fake.detach().to(torch.float64) - real64
        delta = torch.nan_to_num(raw_delta / normalizer)
    x_grad64 = x.to(torch.float64)
    loss = 0.5 * ((x_grad64 - (x_grad64 - delta).detach()) ** 2).mean()
    stats = {
        "dmd_gradient_abs_mean": delta.abs().mean().to(torch.float32),
        "dmd_raw_delta_abs_mean": raw_delta.abs().mean().to(torch.float32),
        "dmd_normalizer_mean": normalizer.mean().to(torch.float32),
    }
    return loss.to(x.dtype), stats


def _select_frames(tensor: Tensor, frames: slice | None, name: str) -> Tensor:
    if frames is None:
        return tensor
    if not isinstance(frames, slice):
        raise TypeError(f"{name} must be a slice over the frame axis (e.g. slice(21, None)) or None, got {frames!r}")
    if tensor.ndim != 5:
        raise ValueError(f"frame selection needs tensors of shape [B, C, T, H, W], got {tuple(tensor.shape)}")
    selected = tensor[:, :, frames]
    if selected.shape[2] == 0:
        raise ValueError(f"{name}={frames} selects no frames out of T={tensor.shape[2]}")
    return selected


def _weighted_velocity_mse(
    flow_pred: Tensor,
    noise: Tensor,
    clean: Tensor,
    t: Tensor | None,
    weighting: bool,
    frames: slice | None,
    frames_name: str,
    shift: float,
) -> Tensor:
    _check_batched_same_shape(flow_pred=flow_pred, noise=noise, clean=clean)
    dtype = torch.promote_types(flow_pred.dtype, torch.float32)
    pred = _select_frames(flow_pred, frames, frames_name).to(dtype)
    target = (_select_frames(noise, frames, frames_name) - _select_frames(clean, frames, frames_name)).to(dtype)
    per_sample = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    if weighting:
        if t is None:
            raise ValueError("weighting=True needs the per-sample timesteps t ([B])")
        t_tensor = torch.as_tensor(t, device=pred.device)
        if t_tensor.ndim == 0:
            t_tensor = t_tensor.expand(pred.shape[0])
        if t_tensor.shape != (pred.shape[0],):
            raise ValueError(f"t must have shape [B] = [{pred.shape[0]}], got {tuple(t_tensor.shape)}")
        per_sample = per_sample * training_weight(t_tensor, shift=shift).to(device=pred.device, dtype=dtype)
    return per_sample.mean().to(flow_pred.dtype)


def critic_flow_loss(
    flow_pred: Tensor,
    noise: Tensor,
    clean: Tensor,
    t: Tensor | None = None,
    weighting: bool = False,
    target_frames: slice | None = None,
    shift: float = 5.0,
) -> Tensor:
    """Fake-score (critic) denoising loss (§F.7).

    ``mean((v̂ − (ε − y))²)`` over the target frames (``target_frames`` along T, all frames if None), per sample
    times w(t) when ``weighting`` (context critic, stage 2) and then averaged over the batch. Context frames do not
    enter the loss. Shapes: ``flow_pred``, ``noise``, ``clean`` ``[B, C, T, H, W]``; ``t`` ``[B]``.
    """
    return _weighted_velocity_mse(flow_pred, noise, clean, t, weighting, target_frames, "target_frames", shift)


def flow_matching_loss(
    flow_pred: Tensor,
    noise: Tensor,
    x0: Tensor,
    t: Tensor,
    weighting: bool = True,
    frames: slice | None = None,
    shift: float = 5.0,
) -> Tensor:
    """Teacher (ERFT) loss of §E.3 step 6: ``MSE(v̂, ε − x0)`` on the selected frames, times w(t) per sample.

    ``noise`` is the (possibly error-injected) noise that built ``x_t``, ``x0`` the clean target latent.
    """
    return _weighted_velocity_mse(flow_pred, noise, x0, t, weighting, frames, "frames", shift)


# ------------------------------------------------------------------------------------------- scores and CDMD losses

def network_dtype(network: nn.Module) -> torch.dtype:
    """The dtype a Wan DiT computes in (its patch embedding's weights)."""
    return network.patch_embedding.weight.dtype


def predict_x0(network: nn.Module, noisy_target: Tensor, t: Tensor, text: Tensor,
               context: Tensor | None = None) -> Tensor:
    """x̂0 of the target frames from a bidirectional DiT that sees ``[context | noisy target]`` at one timestep.

    noisy_target ``[B, C, Tt, h, w]``; t ``[B]``; text ``[B, L, D]``; context ``[B, C, Tc, h, w]`` (clean) or None.
    The velocity is converted to x0 on the target part only (§F.6 step 3). Returns float32 ``[B, C, Tt, h, w]``.
    """
    dtype = network_dtype(network)
    inputs = noisy_target if context is None else torch.cat([context.to(noisy_target.dtype), noisy_target], dim=2)
    flow = network(inputs.to(dtype), t, text.to(dtype))[:, :, -noisy_target.shape[2]:]
    return flow_to_x0(noisy_target.float(), flow.float(), t.float() / 1000.0)


def guided_x0(teacher: nn.Module, noisy_target: Tensor, t: Tensor, text: Tensor, negative_text: Tensor,
              guidance_scale: float, context: Tensor | None = None) -> Tensor:
    """Real score with CFG, ``cond + g·(cond − uncond)`` (effective scale 1 + g), uncond = the negative prompt.

    Conditional and unconditional predictions run as one batch of 2B. negative_text: ``[1 or B, L, D]``.
    """
    b = noisy_target.shape[0]
    if negative_text.shape[0] == 1 and b > 1:
        negative_text = negative_text.expand(b, *negative_text.shape[1:])
    if negative_text.shape != text.shape:
        raise ValueError(f"the negative prompt embedding {tuple(negative_text.shape)} does not match the prompt "
                         f"embeddings {tuple(text.shape)}; both must come from the same text encoder")
    both_context = None if context is None else torch.cat([context, context])
    x0 = predict_x0(teacher, torch.cat([noisy_target, noisy_target]), torch.cat([t, t]),
                    torch.cat([text, negative_text.to(text)]), both_context)
    cond, uncond = x0.chunk(2)
    return classifier_free_guidance(cond, uncond, guidance_scale)


def cdmd_generator_loss(
    target: Tensor,
    context: Tensor | None,
    teacher: nn.Module,
    critic: nn.Module,
    text: Tensor,
    negative_text: Tensor,
    t: Tensor,
    noise: Tensor,
    guidance_scale: float,
    context_teacher: bool,
    context_fake: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CDMD generator loss (§F.6) on the student's target window ``[B, C, Tt, h, w]`` (carrying grad).

    The target is re-noised at t with ``noise`` (no grad); the teacher (CFG) and the critic (no CFG) predict x0 of
    it, each with the clean context in front when its switch is on. Returns `dmd_generator_loss`'s (loss, stats).
    """
    noisy = add_noise(target.detach(), noise.to(target.dtype), t.float() / 1000.0)
    with torch.no_grad():
        x0_real = guided_x0(teacher, noisy, t, text, negative_text, guidance_scale,
                            context if context_teacher else None)
        x0_fake = predict_x0(critic, noisy, t, text, context if context_fake else None)
    return dmd_generator_loss(target, x0_real.to(target.dtype), x0_fake.to(target.dtype))


def cdmd_critic_loss(critic: nn.Module, target: Tensor, context: Tensor | None, text: Tensor, t: Tensor,
                          noise: Tensor, time_weighting: bool, shift: float = 5.0) -> Tensor:
    """Critic (fake score) loss (§F.7): flow matching on ``[context | target]`` noised at t with the context reset
    to clean, the loss on the target frames only (times w(t) when ``time_weighting``).

    target ``[B, C, Tt, h, w]``, context ``[B, C, Tc, h, w]`` or None (no-context critic); noise has the shape of
    ``[context | target]``.
    """
    clean = target if context is None else torch.cat([context, target], dim=2)
    if noise.shape != clean.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the shape of [context | target] {tuple(clean.shape)}")
    noisy = add_noise(clean, noise.to(clean.dtype), t.float() / 1000.0)
    num_context = 0 if context is None else context.shape[2]
    if num_context:
        noisy = torch.cat([context, noisy[:, :, num_context:]], dim=2)
    dtype = network_dtype(critic)
    flow = critic(noisy.to(dtype), t, text.to(dtype))
    frames = slice(num_context, None) if num_context else None
    return critic_flow_loss(flow.float(), noise.float(), clean.float(), t, weighting=time_weighting,
                            target_frames=frames, shift=shift)
