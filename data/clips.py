"""Turning a decoded video into a training clip: frame-rate resampling, clip choice, cover resize and center crop.

Teacher clips (`TeacherClipMix`, method §E.2): per sample one layout kind is drawn by weight among those the video is
long enough for, and only the pixel frames that layout reads are decoded. ``long``: the clip starts at the video's
first frame (the sink is pixel frames 0…8 of the video) and its end e is drawn so that the history varies: first a
sparse-context count k uniformly among the counts some end e ≤ video length gives, then e uniformly among the ends
giving k (every end from the one where the count saturates up to the video's end, for the largest count).
``dense``: ``1 + f·(context + target − 1)`` contiguous frames from a uniform start, encoded together into
``[context | target]`` latents (context 0: a plain target).

Frame-rate rule (nearest frame on the source timeline): a source of N frames at ``fs`` fps spans [0, N/fs). Target
frame j sits at time j/ft; it takes the source frame i whose timestamp i/fs is nearest (ties go to the earlier frame),
clamped to the last frame. The resampled video covers the source duration: M = ceil(N * ft / fs) frames. Equal rates
give the identity, 32 -> 16 fps takes every second frame, 8 -> 16 fps repeats every frame twice.

Spatial rule ("cover"): scale by s = max(H / h, W / w) so the frame covers the target, to (max(H, round(h s)),
max(W, round(w s))) with antialiased bicubic interpolation (skipped when the size already matches), then crop the
centre: top = (h' - H) // 2, left = (w' - W) // 2.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cf.teacher_layout import LongLayoutConfig, long_layout_plan
from cf.video_io import as_fraction

__all__ = [
    "resample_indices",
    "cover_size",
    "cover_scale",
    "resize_cover_crop",
    "check_num_frames",
    "TeacherClip",
    "TeacherClipKind",
    "TeacherClipMix",
]


def check_num_frames(num_frames: int) -> int:
    """Validate a pixel clip length of the form 1 + 4k (what the video autoencoders take)."""
    if int(num_frames) != num_frames or num_frames < 1 or (num_frames - 1) % 4 != 0:
        raise ValueError(
            f"num_frames must be 1 + 4k (1, 5, 9, ..., 81, ...) so it encodes to 1 + k latent frames, got {num_frames}"
        )
    return int(num_frames)


def resample_indices(num_source_frames: int, source_fps: float | Fraction, target_fps: float | Fraction) -> np.ndarray:
    """Source frame index for each target frame (int64 ``[M]``), by the nearest-frame rule of the module docstring."""
    if num_source_frames < 0:
        raise ValueError(f"num_source_frames must be >= 0, got {num_source_frames}")
    ratio = as_fraction(source_fps) / as_fraction(target_fps)  # source frames per target frame
    p, q = ratio.numerator, ratio.denominator
    num_target = -((-num_source_frames * q) // p)  # ceil(N / ratio)
    j = np.arange(num_target, dtype=np.int64)
    # nearest with ties to the earlier frame: ceil(j * p / q - 1/2) == floor((2 j p + q - 1) / (2 q))
    indices = (2 * j * p + q - 1) // (2 * q)
    return np.minimum(indices, max(num_source_frames - 1, 0))


def cover_scale(height: int, width: int, target_height: int, target_width: int) -> float:
    """Scale factor that makes an ``height x width`` frame cover the target."""
    return max(target_height / height, target_width / width)


def cover_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """Size ``(h', w')`` after the cover resize, before the center crop."""
    scale = cover_scale(height, width, target_height, target_width)
    return max(target_height, round(height * scale)), max(target_width, round(width * scale))


def resize_cover_crop(frames: np.ndarray | torch.Tensor, height: int, width: int, chunk: int = 32) -> torch.Tensor:
    """uint8 frames ``[T, h, w, 3]`` -> float ``[3, T, height, width]`` in [-1, 1] (cover resize + center crop).

    Frames are resized ``chunk`` at a time so peak memory stays close to the output's.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    num_frames, src_h, src_w = frames.shape[:3]
    new_h, new_w = cover_size(src_h, src_w, height, width)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = torch.empty(3, num_frames, height, width, dtype=torch.float32)
    for start in range(0, num_frames, chunk):
        part = frames[start : start + chunk].permute(0, 3, 1, 2).float()  # [t, 3, h, w]
        if (new_h, new_w) != (src_h, src_w):
            part = F.interpolate(part, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            part = part.clamp(0, 255)
        part = part[:, :, top : top + height, left : left + width]
        out[:, start : start + chunk] = part.permute(1, 0, 2, 3) / 127.5 - 1
    return out



# ----------------------------------------------------------------------------------------------------------------------
# Teacher clips
# ----------------------------------------------------------------------------------------------------------------------

TEACHER_LAYOUTS = ("long", "dense")


@dataclass(frozen=True)
class TeacherClipKind:
    """One kind of teacher training clip and its draw weight.

    layout: ``"long"`` (``[sink | sparse | motion | target]``, counts from `TeacherClipMix.long_layout`) or
    ``"dense"`` (``[context_latents | target_latents]`` from contiguous frames; ``context_latents = 0``: a plain
    target). context_latents / target_latents are only read for ``dense``.
    """

    layout: str
    weight: float = 1.0
    context_latents: int = 21
    target_latents: int = 21

    def __post_init__(self) -> None:
        if self.layout not in TEACHER_LAYOUTS:
            raise ValueError(f"teacher clip layout must be one of {TEACHER_LAYOUTS}, got {self.layout!r}")
        if not self.weight >= 0:
            raise ValueError(f"teacher clip weight must be >= 0, got {self.weight}")
        if self.layout == "dense" and (self.context_latents < 0 or self.target_latents < 1):
            raise ValueError(f"a dense teacher clip needs context_latents >= 0 and target_latents >= 1, got "
                             f"{self.context_latents} and {self.target_latents}")


@dataclass(frozen=True)
class TeacherClip:
    """A drawn teacher clip: its layout, the pixel frames to read (ascending, at the training fps, numbered from
    the video's first frame) and the layout's latent counts."""

    layout: str
    frame_index: tuple[int, ...]
    context_latents: int
    target_latents: int

    @property
    def sequence_latents(self) -> int:
        return self.context_latents + self.target_latents


@dataclass(frozen=True)
class TeacherClipMix:
    """The teacher's training clips: kinds drawn by weight (see the module docstring for the rules).

    kinds: at least one with weight > 0; long_layout: counts of the long layout (must equal the model's);
    temporal_factor: pixel frames per latent of the autoencoder (1 + f·k frames encode to 1 + k latents).
    """

    kinds: tuple[TeacherClipKind, ...]
    long_layout: LongLayoutConfig = LongLayoutConfig()
    temporal_factor: int = 4

    def __post_init__(self) -> None:
        if not self.kinds or sum(kind.weight for kind in self.kinds) <= 0:
            raise ValueError("teacher_clips needs at least one kind with weight > 0, e.g. "
                             "kinds: [{layout: long, weight: 1.0}]")
        if self.temporal_factor < 1:
            raise ValueError(f"temporal_factor must be >= 1, got {self.temporal_factor}")
        if any(kind.layout == "long" for kind in self.kinds):
            long_layout_plan(self._long_minimum(), self.long_layout, self.temporal_factor)  # validates the counts

    @classmethod
    def from_config(cls, value: "TeacherClipMix | Mapping[str, Any]") -> "TeacherClipMix":
        """From a mapping (YAML): ``{kinds: [{layout, weight, ...}, ...], long_layout: {...}, temporal_factor}``."""
        if isinstance(value, TeacherClipMix):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"teacher_clips must be a mapping or a TeacherClipMix, got {type(value).__name__}")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown teacher_clips keys {sorted(unknown)}; expected kinds, long_layout, "
                             "temporal_factor")
        kinds = tuple(k if isinstance(k, TeacherClipKind) else TeacherClipKind(**k) for k in value.get("kinds", ()))
        long_layout = value.get("long_layout") or LongLayoutConfig()
        if isinstance(long_layout, Mapping):
            long_layout = LongLayoutConfig(**long_layout)
        return cls(kinds=kinds, long_layout=long_layout, temporal_factor=int(value.get("temporal_factor", 4)))

    # ------------------------------------------------------------------------------------------------ lengths
    def _long_minimum(self) -> int:
        c, f = self.long_layout, self.temporal_factor
        snippets = 0 if c.min_sparse_latents == 0 else (1 + f) + c.sparse_stride * (c.min_sparse_latents - 1)
        return (1 + f * (c.sink_latents - 1)) + snippets + (1 + f * (c.motion_latents + c.target_latents))

    def min_frames(self, kind: TeacherClipKind) -> int:
        """Pixel frames a video needs for a clip of ``kind``."""
        if kind.layout == "long":
            return self._long_minimum()
        return 1 + self.temporal_factor * (kind.context_latents + kind.target_latents - 1)

    def long_ends(self, num_frames: int) -> dict[int, range]:
        """Sparse count → the clip ends (exclusive last frame + 1) giving it, for a video of ``num_frames``.

        Empty when the video is too short for the long layout. The largest count's ends run to the video's end.
        """
        return dict(_long_ends(self, int(num_frames)))

    def _long_ends(self, num_frames: int) -> dict[int, range]:
        def count(end: int) -> int:
            return len(long_layout_plan(end, self.long_layout, self.temporal_factor).sparse_snippets)

        c, f = self.long_layout, self.temporal_factor
        saturated = count(self._long_minimum() + c.sparse_window_frames + f * (c.sink_latents + 1))
        first: dict[int, int] = {}
        end = self._long_minimum()
        while end <= num_frames:
            k = count(end)  # nondecreasing in end
            first.setdefault(k, end)
            if k == saturated:  # every later end gives it too
                break
            end += 1
        counts = sorted(first)
        return {k: range(first[k], first[counts[i + 1]] if i + 1 < len(counts) else num_frames + 1)
                for i, k in enumerate(counts)}

    # ------------------------------------------------------------------------------------------------ clips
    def long_clip(self, end: int) -> TeacherClip:
        """The long-layout clip of the video's frames ``0 … end − 1``."""
        plan = long_layout_plan(end, self.long_layout, self.temporal_factor)
        c = self.long_layout
        return TeacherClip("long", plan.pixel_frames(),
                           c.sink_latents + len(plan.sparse_snippets) + c.motion_latents, c.target_latents)

    def dense_clip(self, kind: TeacherClipKind, start: int) -> TeacherClip:
        """The dense clip of ``kind`` starting at the video's pixel frame ``start``."""
        length = self.min_frames(kind)
        return TeacherClip("dense", tuple(range(start, start + length)), kind.context_latents, kind.target_latents)

    def draw(self, num_frames: int, rng: random.Random) -> TeacherClip | None:
        """One clip for a video of ``num_frames`` frames (None when it is too short for every kind)."""
        kinds = [k for k in self.kinds if k.weight > 0 and self.min_frames(k) <= num_frames]
        if not kinds:
            return None
        kind = rng.choices(kinds, weights=[k.weight for k in kinds])[0]
        if kind.layout == "long":
            ends = self.long_ends(num_frames)
            count = rng.choice(sorted(ends))
            return self.long_clip(rng.choice(ends[count]))
        return self.dense_clip(kind, rng.randint(0, num_frames - self.min_frames(kind)))

    def possible_clips(self, num_frames: int | None = None) -> list[TeacherClip]:
        """One clip per distinct layout shape `draw` can give for videos of up to ``num_frames`` frames (default:
        any length): every kind with weight > 0, and for ``long`` every sparse count."""
        longest = max(self.min_frames(k) for k in self.kinds)
        if num_frames is None:  # long enough for every kind and for the saturated sparse count
            num_frames = longest + self._long_minimum() + self.long_layout.sparse_window_frames
        clips = []
        for kind in self.kinds:
            if kind.weight <= 0 or self.min_frames(kind) > num_frames:
                continue
            if kind.layout == "long":
                clips += [self.long_clip(ends[0]) for _, ends in sorted(self.long_ends(num_frames).items())]
            else:
                clips.append(self.dense_clip(kind, 0))
        return clips


@functools.lru_cache(maxsize=1024)
def _long_ends(mix: TeacherClipMix, num_frames: int) -> dict[int, range]:
    return mix._long_ends(num_frames)
