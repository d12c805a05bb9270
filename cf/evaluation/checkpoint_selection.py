"""Choosing a training checkpoint by a measured validation score.

`continuation_fidelity` scores a teacher's continuations of held-out clips (a `continuation_quality` summary) as the
lower of two ratios to the true continuations: background coverage and sprite presence. A teacher that trades its
sprites for cleaner backgrounds (or the reverse) scores by the attribute it has lost. `select_checkpoint` measures
each candidate with a given function and keeps the best (the earliest among equals), with the table of what it
measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["continuation_fidelity", "CheckpointChoice", "select_checkpoint"]


def continuation_fidelity(summary: Mapping[str, Any]) -> float:
    """``min(background_coverage / truth_background_coverage, sprite_presence / truth_sprite_presence)`` of a
    `cf.evaluation.continuation.continuation_quality` summary (its ``"all"`` entry or one like it)."""
    ratios = []
    for key in ("background_coverage", "sprite_presence"):
        truth = float(summary[f"truth_{key}"])
        if truth <= 0:
            raise ValueError(f"the true continuations have {key} {truth}: no level to compare with")
        ratios.append(float(summary[key]) / truth)
    return min(ratios)


@dataclass
class CheckpointChoice:
    """The chosen candidate, its score, and one row per candidate: ``{"candidate", "score", **measured}``."""

    best: Any
    score: float
    rows: list[dict[str, Any]] = field(default_factory=list)


def select_checkpoint(candidates: Sequence[Any], measure: Callable[[Any], Mapping[str, Any]],
                      score: Callable[[Mapping[str, Any]], float] = continuation_fidelity) -> CheckpointChoice:
    """Measure every candidate (``measure(candidate)`` -> summary, ``score(summary)`` -> float, higher is better)
    and return the best; ties go to the earlier candidate."""
    if not candidates:
        raise ValueError("no checkpoint to choose from; does the training save step checkpoints?")
    rows, best = [], None
    for candidate in candidates:
        measured = dict(measure(candidate))
        value = float(score(measured))
        rows.append({"candidate": candidate, "score": value, **measured})
        if best is None or value > best[1]:
            best = (candidate, value)
    return CheckpointChoice(best[0], best[1], rows)
