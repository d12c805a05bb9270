"""Learning-rate schedule of the CDMD generator (method §F.3): cosine decay to a floor, optional linear warm-up."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CosineWithFloor", "cosine_with_floor", "lr_lambda"]


def _check_schedule_args(total_steps: int, floor: float, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1] (a fraction of the base lr), got {floor}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps) = [0, {total_steps}), got {warmup_steps}")


def cosine_with_floor(step: int, total_steps: int, floor: float = 0.2, warmup_steps: int = 0) -> float:
    """LR multiplier at optimizer step ``step``.

    Warm-up (if any): ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. Then, with
    ``k = step − warmup_steps`` and ``K = total_steps − warmup_steps``:
    ``floor + (1 − floor)·½(1 + cos(π·min(k, K)/K))``, i.e. ``0.2 + 0.4(1 + cos(πk/K))`` at floor 0.2;
    1 at k = 0, ``(1 + floor)/2`` at k = K/2 and ``floor`` from k = K on.
    """
    _check_schedule_args(total_steps, floor, warmup_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    k = min(step - warmup_steps, decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * k / decay_steps))


@dataclass(frozen=True)
class CosineWithFloor:
    """Picklable ``step -> multiplier`` callable for ``torch.optim.lr_scheduler.LambdaLR``."""

    total_steps: int
    floor: float = 0.2
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check_schedule_args(self.total_steps, self.floor, self.warmup_steps)

    def __call__(self, step: int) -> float:
        return cosine_with_floor(step, self.total_steps, self.floor, self.warmup_steps)


def lr_lambda(total_steps: int, floor: float = 0.2, warmup_steps: int = 0) -> CosineWithFloor:
    """The schedule as a ``LambdaLR`` lambda: ``LambdaLR(opt, lr_lambda(2001))`` (k counts generator steps)."""
    return CosineWithFloor(total_steps, floor, warmup_steps)
