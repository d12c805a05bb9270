"""Flow-matching maths shared by the student, the teacher and the critic (method §B.2–B.3).

Forward process ``x_σ = (1 − σ)·x0 + σ·ε`` with σ ∈ [0, 1] and the network predicting the velocity ``v = ε − x0``.
The timestep fed to the networks is ``t = 1000·σ``; σ is always the continuous ``t / 1000`` (§I.24): the discrete,
shifted grid is only used to sample timesteps, to warp the few-step list and to look up the loss weight w(t).

Latents are ``[B, C, T, H, W]``. A noise level is a scalar, a per-sample ``[B]`` or a per-frame ``[B, T]`` tensor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

SigmaLike = Union[float, Tensor]

__all__ = [
    "FlowMatchSchedule",
    "add_noise",
    "broadcast_sigma",
    "flow_target",
    "flow_to_noise",
    "flow_to_x0",
    "nearest_grid_index",
    "sample_dmd_timesteps",
    "sample_grid_timesteps",
    "sampling_sigmas",
    "shift_sigma",
    "sigma_from_timestep",
    "timestep_from_sigma",
    "timestep_grid",
    "training_weight",
    "warp_timesteps",
    "x0_to_flow",
]


# ----------------------------------------------------------------------------------------------------------------------
# Timesteps, shift and the discrete grid
# ----------------------------------------------------------------------------------------------------------------------


def shift_sigma(sigma: SigmaLike, shift: float) -> SigmaLike:
    """SD3-style shift ``s·σ / (1 + (s − 1)·σ)``; works on floats and tensors of any shape."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_from_timestep(t: SigmaLike, num_train_timesteps: int = 1000) -> SigmaLike:
    """σ = t / num_train_timesteps (the continuous convention of §I.24)."""
    return t / num_train_timesteps


def timestep_from_sigma(sigma: SigmaLike, num_train_timesteps: int = 1000) -> SigmaLike:
    """t = num_train_timesteps·σ."""
    return sigma * num_train_timesteps


def _check_grid_args(shift: float, num_train_timesteps: int) -> None:
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps}")


@functools.lru_cache(maxsize=16)
def _cached_grid(shift: float, num_train_timesteps: int) -> Tensor:
    n = num_train_timesteps
    sigmas = 1.0 - torch.arange(n, dtype=torch.float64) / n
    return shift_sigma(sigmas, shift) * n


def timestep_grid(shift: float = 5.0, num_train_timesteps: int = 1000) -> Tensor:
    """The discrete training grid of §B.2, float64 ``[num_train_timesteps]``, descending.

    σ_i = 1 − i/N for i = 0…N−1, shifted, t_i = N·σ'_i: from 1000 down to ≈ 4.98 at shift 5.
    """
    _check_grid_args(shift, num_train_timesteps)
    return _cached_grid(float(shift), int(num_train_timesteps)).clone()


def warp_timesteps(
    steps: Sequence[float] = (1000, 750, 500, 250), shift: float = 5.0, num_train_timesteps: int = 1000
) -> Tensor:
    """Warp a nominal few-step list onto the shifted grid (§B.3), float64 ``[len(steps)]``.

    The grid is extended by a final 0 and indexed with ``N − step``, so step N maps to t = N and step 0 to t = 0.
    At shift 5, [1000, 750, 500, 250] becomes [1000, 937.5, 833.33, 625.0].
    """
    _check_grid_args(shift, num_train_timesteps)
    n = int(num_train_timesteps)
    steps_t = torch.as_tensor(list(steps), dtype=torch.float64)
    if steps_t.ndim != 1 or steps_t.numel() == 0:
        raise ValueError(f"steps must be a non-empty list of timesteps, got {list(steps)}")
    if (steps_t != steps_t.round()).any() or (steps_t < 0).any() or (steps_t > n).any():
        raise ValueError(f"steps must be integers in [0, {n}] (e.g. [1000, 750, 500, 250]), got {list(steps)}")
    extended = torch.cat([timestep_grid(shift, n), torch.zeros(1, dtype=torch.float64)])
    return extended[n - steps_t.long()]


def sampling_sigmas(num_steps: int, shift: float = 5.0) -> Tensor:
    """σ's of the many-step Euler sampler (`cf.sampling`), float64 ``[num_steps + 1]``: the shift-``shift`` grid of
    ``num_steps`` points, σ_i = `shift_sigma`(1 − i/n, shift) for i = 0…n−1, then 0."""
    return torch.cat([timestep_grid(shift, num_steps) / num_steps, torch.zeros(1, dtype=torch.float64)])


def nearest_grid_index(t: SigmaLike, grid: Tensor) -> Tensor:
    """Index of the grid point nearest to each t; long tensor with the shape of ``t``."""
    t_tensor = torch.as_tensor(t, dtype=torch.float64, device=grid.device)
    distance = (t_tensor.unsqueeze(-1) - grid.to(torch.float64)).abs()
    return distance.argmin(dim=-1)


@functools.lru_cache(maxsize=16)
def _cached_weights(shift: float, num_train_timesteps: int) -> Tensor:
    n = num_train_timesteps
    grid = _cached_grid(shift, n)
    bump = torch.exp(-2.0 * ((grid - n / 2) / n) ** 2)
    bump = bump - bump.min()
    return bump * (n / bump.sum())


def training_weight(t: SigmaLike, shift: float = 5.0, num_train_timesteps: int = 1000) -> Tensor:
    """Loss weight w(t) of §B.2 (same shape as ``t``; float32 unless t is a wider float).

    Over the shifted grid, ``y = exp(−2((t − 500)/1000)²)``, ``w = (y − min y)·1000/Σ(y − min y)``, looked up at the
    nearest grid point: w(500) ≈ 2.08, w(20) ≈ 0.13 at shift 5.
    """
    _check_grid_args(shift, num_train_timesteps)
    weights = _cached_weights(float(shift), int(num_train_timesteps))
    grid = _cached_grid(float(shift), int(num_train_timesteps))
    t_tensor = torch.as_tensor(t)
    index = nearest_grid_index(t_tensor.detach().cpu(), grid)
    dtype = t_tensor.dtype if t_tensor.is_floating_point() and t_tensor.dtype == torch.float64 else torch.float32
    return weights[index].to(device=t_tensor.device, dtype=dtype)


def _random_indices(
    batch_size: int, high: int, generator: torch.Generator | None, device: torch.device | str | None
) -> Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    draw_device = generator.device if generator is not None else device
    return torch.randint(0, high, (batch_size,), generator=generator, device=draw_device).to(device=device)


def sample_dmd_timesteps(
    batch_size: int,
    shift: float = 5.0,
    min_t: float = 20.0,
    max_t: float = 980.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Per-sample DMD/critic timesteps, float32 ``[B]`` (§F.6 step 1).

    ``t_raw ~ U{0…N−1}``, shifted as ``N·shift(t_raw/N)`` and clamped to ``[min_t, max_t]``.
    At shift 5 the 5 % quantile is ≈ 208, the median ≈ 833 and the top ~10 % are clamped at 980.
    """
    _check_grid_args(shift, num_train_timesteps)
    if not 0 <= min_t <= max_t <= num_train_timesteps:
        raise ValueError(f"need 0 <= min_t <= max_t <= {num_train_timesteps}, got min_t={min_t}, max_t={max_t}")
    n = int(num_train_timesteps)
    t_raw = _random_indices(batch_size, n, generator, device).to(torch.float64)
    t = shift_sigma(t_raw / n, shift) * n
    return t.clamp(min_t, max_t).to(torch.float32)


def sample_grid_timesteps(
    batch_size: int,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Per-sample teacher timesteps, float32 ``[B]``: a uniform draw from the shifted grid (§E.3 step 1)."""
    grid = timestep_grid(shift, num_train_timesteps)
    index = _random_indices(batch_size, grid.numel(), generator, None).cpu()
    return grid[index].to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Noising and conversions between parameterisations
# ----------------------------------------------------------------------------------------------------------------------


def broadcast_sigma(sigma: SigmaLike, x: Tensor) -> Tensor:
    """Reshape σ (``[]``, ``[B]`` or ``[B, T]``) to broadcast against ``x`` ``[B, C, T, H, W]``.

    A ``[B]`` σ is accepted for any ``x`` with batch first; a ``[B, T]`` σ needs a 5-D ``x``.
    The result has x's device and a float dtype at least float32.
    """
    dtype = _compute_dtype(x)
    sigma_t = torch.as_tensor(sigma, device=x.device).to(dtype)
    if sigma_t.ndim == 0:
        return sigma_t
    if sigma_t.ndim == 1:
        if x.ndim < 1 or sigma_t.shape[0] != x.shape[0]:
            raise ValueError(
                f"per-sample sigma has shape {tuple(sigma_t.shape)} but x has shape {tuple(x.shape)}; "
                "pass one sigma per batch element ([B])"
            )
        return sigma_t.view(-1, *([1] * (x.ndim - 1)))
    if sigma_t.ndim == 2:
        if x.ndim != 5 or sigma_t.shape != (x.shape[0], x.shape[2]):
            raise ValueError(
                f"per-frame sigma has shape {tuple(sigma_t.shape)} but x has shape {tuple(x.shape)}; "
                "a per-frame sigma must be [B, T] for x of shape [B, C, T, H, W]"
            )
        return sigma_t.view(sigma_t.shape[0], 1, sigma_t.shape[1], 1, 1)
    raise ValueError(f"sigma must be a scalar, [B] or [B, T]; got shape {tuple(sigma_t.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"tensor shapes must match, got {shapes}")


def add_noise(x0: Tensor, noise: Tensor, sigma: SigmaLike) -> Tensor:
    """``x_σ = (1 − σ)·x0 + σ·ε``; same shape and dtype as ``x0``."""
    _check_same_shape(x0=x0, noise=noise)
    s = broadcast_sigma(sigma, x0)
    dtype = _compute_dtype(x0)
    return ((1 - s) * x0.to(dtype) + s * noise.to(dtype)).to(x0.dtype)


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity the network is trained to predict, ``ε − x0``."""
    _check_same_shape(x0=x0, noise=noise)
    return noise - x0


def flow_to_x0(x_t: Tensor, flow: Tensor, sigma: SigmaLike) -> Tensor:
    """Clean estimate ``x̂0 = x_σ − σ·v̂`` (computed in at least float32, returned in x_t's dtype)."""
    _check_same_shape(x_t=x_t, flow=flow)
    s = broadcast_sigma(sigma, x_t)
    dtype = _compute_dtype(x_t)
    return (x_t.to(dtype) - s * flow.to(dtype)).to(x_t.dtype)


def flow_to_noise(x_t: Tensor, flow: Tensor, sigma: SigmaLike) -> Tensor:
    """Noise estimate ``ε̂ = x_σ + (1 − σ)·v̂``."""
    _check_same_shape(x_t=x_t, flow=flow)
    s = broadcast_sigma(sigma, x_t)
    dtype = _compute_dtype(x_t)
    return (x_t.to(dtype) + (1 - s) * flow.to(dtype)).to(x_t.dtype)


def x0_to_flow(x_t: Tensor, x0: Tensor, sigma: SigmaLike) -> Tensor:
    """Velocity from a clean estimate, ``v = (x_σ − x0)/σ``; undefined (inf/nan) where σ = 0."""
    _check_same_shape(x_t=x_t, x0=x0)
    s = broadcast_sigma(sigma, x_t)
    dtype = _compute_dtype(x_t)
    return ((x_t.to(dtype) - x0.to(dtype)) / s).to(x_t.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# A bundle for call sites that carry one schedule around
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Shift and grid size of one network's schedule, with the grid-dependent helpers bound to them."""

    shift: float = 5.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        _check_grid_args(self.shift, self.num_train_timesteps)

    @property
    def timesteps(self) -> Tensor:
        """The shifted grid, float64 ``[N]``."""
        return timestep_grid(self.shift, self.num_train_timesteps)

    def sigma(self, t: SigmaLike) -> SigmaLike:
        """σ = t / N."""
        return sigma_from_timestep(t, self.num_train_timesteps)

    def weight(self, t: SigmaLike) -> Tensor:
        """Loss weight w(t) (§B.2)."""
        return training_weight(t, self.shift, self.num_train_timesteps)

    def warp(self, steps: Sequence[float] = (1000, 750, 500, 250)) -> Tensor:
        """Warped few-step list (§B.3)."""
        return warp_timesteps(steps, self.shift, self.num_train_timesteps)

    def sample_grid(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Uniform draw from the grid, ``[B]``."""
        return sample_grid_timesteps(batch_size, self.shift, generator, device, self.num_train_timesteps)

    def sample_dmd(
        self,
        batch_size: int,
        min_t: float = 20.0,
        max_t: float = 980.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Shifted, clamped DMD draw, ``[B]``."""
        return sample_dmd_timesteps(batch_size, self.shift, min_t, max_t, generator, device, self.num_train_timesteps)
