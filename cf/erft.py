"""Error-Recycling Fine-Tuning (ERFT) of the long-context teacher (method §E): error injection.

The teacher is a bidirectional DiT fed ``[context | noisy target]`` at one timestep. ERFT makes it robust to its own
drift: residuals of past predictions are harvested into banks bucketed by timestep (`cf.error_bank`) and recycled
as perturbations of the target noise, the target latent and the context (`ErrorInjector`). The training target stays
``noise_used − clean x0`` ("self-correcting"). The teacher's input layouts are in `cf.teacher_layout`.

Latents are ``[B, C, T, h, w]``; σ = t / 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from cf.error_bank import NUM_TRAIN_TIMESTEPS, ErrorBank, ErrorBanks, broadcast_sigma

__all__ = [
    "ErrorInjector",
    "Injection",
    "InjectionFlags",
    "InjectionInfo",
    "fit_error_frames",
]

# ----------------------------------------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------------------------------------


def fit_error_frames(error: Tensor, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
    """Match an error ``[C, T_e, h, w]`` to ``num_frames`` frames.

    Longer errors give a random contiguous crop (offset uniform in [0, T_e − num_frames]); shorter ones are tiled
    cyclically along time from frame 0 (``e[k mod T_e]``); equal lengths pass through without drawing.
    """
    if error.dim() != 4:
        raise ValueError(f"an error entry must be [C, T, h, w], got shape {tuple(error.shape)}")
    length = error.shape[1]
    if length == num_frames:
        return error
    if length > num_frames:
        start = int(torch.randint(length - num_frames + 1, (1,), generator=generator))
        return error[:, start:start + num_frames]
    return error[:, torch.arange(num_frames, device=error.device) % length]


@dataclass
class InjectionFlags:
    """Which error kinds a step tries to inject (§E.3 step 3); a clean step has all three off."""

    noise: bool
    latent: bool
    context: bool
    clean_step: bool


@dataclass
class InjectionInfo:
    """What was actually injected, per sample (``[B]`` bool; false where the flag was off or the bucket empty)."""

    noise_applied: Tensor
    latent_applied: Tensor
    context_applied: Tensor
    clean_step: bool


class Injection(NamedTuple):
    """Result of `ErrorInjector.inject`; the training target is ``noise − target_x0`` (clean x0)."""

    noisy_target: Tensor
    noise: Tensor
    context: Tensor | None
    info: InjectionInfo


@dataclass
class ErrorInjector:
    """Bernoulli error injection of ERFT (§E.3 steps 3–5); probabilities and the intensity range m.

    Each injected error is scaled by U(1 − m, 1 + m), m = ``error_modulate`` (0: exactly ×1).
    """

    noise_prob: float = 0.01
    context_prob: float = 0.9
    latent_prob: float = 0.9
    clean_prob: float = 0.5
    error_modulate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("noise_prob", "context_prob", "latent_prob", "clean_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if not 0.0 <= self.error_modulate <= 1.0:
            raise ValueError(f"error_modulate must lie in [0, 1] (scale drawn from U(1 − m, 1 + m)), "
                             f"got {self.error_modulate}")

    def draw_flags(self, generator: torch.Generator | None = None) -> InjectionFlags:
        """Independent Bernoullis for noise, context and latent errors, then a clean-step switch that turns all off.

        Always consumes four uniforms from ``generator``.
        """
        u = torch.rand(4, generator=generator).tolist()
        clean = u[3] < self.clean_prob
        return InjectionFlags(noise=not clean and u[0] < self.noise_prob, latent=not clean and u[2] < self.latent_prob,
                              context=not clean and u[1] < self.context_prob, clean_step=clean)

    def inject(self, target_x0: Tensor, noise: Tensor, context: Tensor | None, t: float | Tensor, banks: ErrorBanks,
               flags: InjectionFlags, generator: torch.Generator | None = None,
               context_error_slice: slice | None = None) -> Injection:
        """Perturb one batch and build the noisy target (§E.3 steps 4–5).

        target_x0, noise: ``[B, C, T, h, w]`` clean target latents and their noise; context ``[B, C, T_c, h, w]`` or
        None; t: scalar or ``[B]``. Per sample: noise += e from ``banks.noise[g(t)]``, x0 += e from
        ``banks.latent[g(t)]``, and ``context[:, :, context_error_slice]`` (default: all of it; the motion latents
        in the long layout) += e from the union of all ``banks.latent`` buckets. Errors are fitted to the frame count
        by `fit_error_frames`. Returns ``x_t = (1 − σ)·x0_in + σ·noise_used`` with σ = t/1000.
        """
        if target_x0.dim() != 5 or noise.shape != target_x0.shape:
            raise ValueError(f"target_x0 must be [B, C, T, h, w] and noise the same shape, got "
                             f"{tuple(target_x0.shape)} and {tuple(noise.shape)}")
        batch = target_x0.shape[0]
        t_rows = torch.as_tensor(t).detach().to("cpu", torch.float64)
        if t_rows.dim() == 0:
            t_rows = t_rows.expand(batch)
        if t_rows.shape != (batch,):
            raise ValueError(f"t must be a scalar or [B] = [{batch}], got shape {tuple(t_rows.shape)}")

        def draw(bank: ErrorBank, t_value: float | None, num_frames: int, like: Tensor) -> Tensor | None:
            error = bank.sample_any(generator) if t_value is None else bank.sample(t_value, generator)
            if error is None:
                return None
            if error.shape[0] != like.shape[1] or error.shape[2:] != like.shape[3:]:
                raise ValueError(
                    f"bank errors have shape [C, T, h, w] = {tuple(error.shape)} but the latents are "
                    f"{tuple(like.shape)}; channels and spatial size must match (reset the banks after changing "
                    "the resolution)"
                )
            error = fit_error_frames(error, num_frames, generator)
            if self.error_modulate > 0:
                scale = 1 + self.error_modulate * (2 * float(torch.rand(1, generator=generator)) - 1)
                error = error * scale
            return error.to(device=like.device, dtype=like.dtype)

        def perturb(x: Tensor, bank: ErrorBank, enabled: bool, frames: slice, from_all: bool) -> tuple[Tensor, Tensor]:
            applied = torch.zeros(batch, dtype=torch.bool)
            num_frames = len(range(*frames.indices(x.shape[2])))
            if not enabled or num_frames == 0:
                return x, applied
            out = x.clone()
            for b in range(batch):
                error = draw(bank, None if from_all else float(t_rows[b]), num_frames, x)
                if error is not None:
                    out[b, :, frames] += error
                    applied[b] = True
            return (out if applied.any() else x), applied

        every_frame = slice(None)
        noise_used, noise_applied = perturb(noise, banks.noise, flags.noise, every_frame, from_all=False)
        x0_in, latent_applied = perturb(target_x0, banks.latent, flags.latent, every_frame, from_all=False)
        context_used, context_applied = context, torch.zeros(batch, dtype=torch.bool)
        if context is not None:
            if context.dim() != 5 or context.shape[0] != batch or context.shape[1] != target_x0.shape[1] \
                    or context.shape[3:] != target_x0.shape[3:]:
                raise ValueError(f"context must be [B, C, T_c, h, w] like the target {tuple(target_x0.shape)}, "
                                 f"got {tuple(context.shape)}")
            frames = context_error_slice if context_error_slice is not None else every_frame
            context_used, context_applied = perturb(context, banks.latent, flags.context, frames, from_all=True)

        s = broadcast_sigma(t_rows.to(target_x0.device) / NUM_TRAIN_TIMESTEPS, target_x0)
        noisy = ((1 - s) * x0_in + s * noise_used).to(target_x0.dtype)
        info = InjectionInfo(noise_applied=noise_applied, latent_applied=latent_applied,
                             context_applied=context_applied, clean_step=flags.clean_step)
        return Injection(noisy, noise_used, context_used, info)
