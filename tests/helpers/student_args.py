"""Tiny-student arguments for tests: flat keyword overrides sorted into `CDMDStudent`'s setting groups."""

from __future__ import annotations

from typing import Any

from cf.lit.student_settings import OptimizationConfig, ScoreConfig, TeacherWindowConfig

_WINDOW_NAMES = {"context_window": "context_frames", "target_window": "target_frames",
                 "teacher_context": "source", "context_teacher": "context_teacher", "context_fake": "context_fake",
                 "reencode_image_latent": "reencode_image_latent"}
_GROUPS = {"window": (TeacherWindowConfig, _WINDOW_NAMES),
           "scores": (ScoreConfig, {f: f for f in ScoreConfig.__dataclass_fields__}),
           "optimization": (OptimizationConfig, {f: f for f in OptimizationConfig.__dataclass_fields__})}


def student_args(**flat: Any) -> dict[str, Any]:
    """`CDMDStudent` keyword arguments from flat ones: e.g. ``target_window=6, generator_lr=1e-3`` become
    ``window=TeacherWindowConfig(target_frames=6), optimization=OptimizationConfig(generator_lr=1e-3)``."""
    out: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
    for key, value in flat.items():
        for group, (_, names) in _GROUPS.items():
            if key in names:
                grouped[group][names[key]] = value
                break
        else:
            out[key] = value
    for group, (cls, _) in _GROUPS.items():
        if grouped[group]:
            out[group] = cls(**grouped[group])
    return out
