"""The grouped settings of `cf.lit.student.CDMDStudent`: the teacher window, the scores, the optimisation.

Each group checks itself on construction, so a bad configuration fails before any network is built. In YAML each
group is a mapping under the module's ``init_args`` (``window:``, ``scores:``, ``optimization:``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["OptimizationConfig", "ScoreConfig", "TeacherWindowConfig"]


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"invalid {what}: " + "; ".join(problems))


@dataclass
class TeacherWindowConfig:
    """The window the teacher and the critic score (§F.5, §I.4, §I.10).

    context_frames / target_frames: stage 1 0 / 21, stage 2 21 / 21. context_teacher / context_fake: whether the
    real / fake score sees the context. source: ``"contiguous"`` (the frames before the target, §I.4 default) or
    ``"memory"`` (the student's memory when the target starts: the sink and slow slots of the memory's consensus slot
    table, then the last ``memory.fast`` frames; context_frames must equal sink + slow + fast).
    reencode_image_latent: make the window's first frame by decoding the prefix and re-encoding its last pixel frame
    (§F.5); False uses the prefix's last latent as is (exact for the toy autoencoder).
    """

    context_frames: int = 0
    target_frames: int = 21
    context_teacher: bool = False
    context_fake: bool = False
    source: Literal["contiguous", "memory"] = "contiguous"
    reencode_image_latent: bool = True

    def __post_init__(self) -> None:
        problems = []
        uses_context = self.context_teacher or self.context_fake
        if self.target_frames < 1 or self.context_frames < 0:
            problems.append(f"need target_frames >= 1 and context_frames >= 0, got {self.target_frames} and "
                            f"{self.context_frames}")
        if self.context_frames > 0 and not uses_context:
            problems.append(f"context_frames={self.context_frames} but neither context_teacher nor context_fake is "
                            "set; set one of them, or context_frames: 0")
        if self.context_frames == 0 and uses_context:
            problems.append("context_teacher / context_fake need a context: set context_frames > 0 (21 in stage 2)")
        if self.source not in ("contiguous", "memory"):
            problems.append(f"source must be 'contiguous' or 'memory', got {self.source!r}")
        _raise_if(problems, "teacher window")

    @property
    def frames(self) -> int:
        return self.context_frames + self.target_frames


@dataclass
class ScoreConfig:
    """The DMD scores (§F.6–F.7): the real score's CFG ``cond + g·(cond − uncond)`` (g = 3.0 stage 1, 5.0 stage 2),
    the timestep draw (shift 5, clamp [20, 980]) and the critic's w(t) weighting (§I.12: stage 1 off, stage 2 on)."""

    guidance_scale: float = 3.0
    timestep_shift: float = 5.0
    min_timestep: float = 20.0
    max_timestep: float = 980.0
    critic_time_weighting: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.min_timestep <= self.max_timestep <= 1000:
            problems.append("need 0 <= min_timestep <= max_timestep <= 1000")
        if self.timestep_shift <= 0:
            problems.append(f"timestep_shift must be > 0, got {self.timestep_shift}")
        _raise_if(problems, "scores")


@dataclass
class OptimizationConfig:
    """The two AdamW optimisers and the update schedule (§F.3, §F.8).

    critic_steps_per_generator_step: trainer steps per generator update (5). gradient_accumulation: micro-batches
    per update; a batch holds that many micro-batches (under DeepSpeed the engines' ``gradient_accumulation_steps``
    must equal it). Grad clips: 2.0 (None: none; under DeepSpeed the engines clip, and their ``gradient_clipping``
    must equal these). lr_total_steps / lr_floor: the generator's cosine-with-floor schedule over generator updates.
    """

    critic_steps_per_generator_step: int = 5
    gradient_accumulation: int = 1
    generator_lr: float = 2e-6
    generator_betas: tuple[float, float] = (0.9, 0.999)
    critic_lr: float = 4e-7
    critic_betas: tuple[float, float] = (0.5, 0.95)
    weight_decay: float = 0.01
    generator_grad_clip: float | None = 2.0
    critic_grad_clip: float | None = 2.0
    lr_total_steps: int = 2001
    lr_floor: float = 0.2

    def __post_init__(self) -> None:
        self.generator_betas = tuple(self.generator_betas)
        self.critic_betas = tuple(self.critic_betas)
        problems = []
        if self.critic_steps_per_generator_step < 1:
            problems.append("critic_steps_per_generator_step must be >= 1")
        if self.gradient_accumulation < 1:
            problems.append("gradient_accumulation must be >= 1")
        for name in ("generator_lr", "critic_lr"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("generator_grad_clip", "critic_grad_clip"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0 (or null for no clipping), got {value}")
        _raise_if(problems, "optimization")
