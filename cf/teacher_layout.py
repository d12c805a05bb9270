"""The long-context teacher's input layouts (method §E.2; positions contiguous, §D.3).

`dense_layout` splits a latent clip into ``[context | target]`` (the context may be empty: a plain target);
`long_layout` builds ``[sink | sparse | motion | target]`` from a pixel clip (or from only the pixel frames it reads,
`LongLayoutPlan.pixel_frames`) through the autoencoder; `long_layout_from_latents` is its latent-index
approximation for pre-encoded clips. Latents are ``[B, C, T, h, w]``, pixels ``[B, 3, T, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import Tensor

__all__ = [
    "LongLayoutConfig",
    "LongLayoutPlan",
    "TeacherLayout",
    "VideoEncoder",
    "dense_layout",
    "long_layout",
    "long_layout_from_latents",
    "long_layout_plan",
]


# ----------------------------------------------------------------------------------------------------------------------
# Teacher layouts
# ----------------------------------------------------------------------------------------------------------------------


class VideoEncoder(Protocol):
    """What the layouts need from an autoencoder (see cf.encoders.VideoAutoencoder)."""

    temporal_factor: int

    def encode(self, video: Tensor) -> Tensor: ...


def _clip_latent_frames(index: int, temporal_factor: int, offset: int = 0) -> tuple[int, ...]:
    """Pixel frames of latent ``index`` of a clip starting at pixel frame ``offset`` (latent 0 is one frame)."""
    if index == 0:
        return (offset,)
    first = offset + temporal_factor * (index - 1) + 1
    return tuple(range(first, first + temporal_factor))


@dataclass
class TeacherLayout:
    """One teacher input sequence.

    latents: ``[B, C, T_total, h, w]``; segments: ordered name → frame slice, the target last; source_pixel_frames:
    per latent frame, the pixel frames of the clip it encodes; context_error_segment: the context segment that
    receives context errors. Positions are contiguous ``0 … T_total − 1`` (§D.3).
    """

    latents: Tensor
    segments: dict[str, slice]
    source_pixel_frames: tuple[tuple[int, ...], ...]
    context_error_segment: str

    def segment(self, name: str) -> Tensor:
        """Latents ``[B, C, n, h, w]`` of one segment."""
        return self.latents[:, :, self.segments[name]]

    @property
    def num_context_frames(self) -> int:
        return self.segments["target"].start

    @property
    def context(self) -> Tensor:
        """Everything before the target, ``[B, C, T_c, h, w]``."""
        return self.latents[:, :, : self.num_context_frames]

    @property
    def target(self) -> Tensor:
        """``[B, C, T_target, h, w]``."""
        return self.segment("target")

    @property
    def context_error_slice(self) -> slice:
        """Frames of `context` that receive context errors (for `ErrorInjector.inject`)."""
        return self.segments[self.context_error_segment]

    @property
    def positions(self) -> Tensor:
        """Temporal positions ``[T_total]``: 0 … T_total − 1."""
        return torch.arange(self.latents.shape[2], device=self.latents.device)


def _segments(lengths: Sequence[tuple[str, int]]) -> dict[str, slice]:
    segments, start = {}, 0
    for name, length in lengths:
        segments[name] = slice(start, start + length)
        start += length
    return segments


def dense_layout(latents: Tensor, num_context: int | None = None, temporal_factor: int = 4,
                 first_frame: int = 0) -> TeacherLayout:
    """``[context | target]`` from a latent clip ``[B, C, T, h, w]`` split at ``num_context`` (default T // 2).

    ``num_context = 0`` gives a plain target without context (what a stage-1 student asks the teacher to score).
    Source pixel frames assume the clip was encoded from pixel frame ``first_frame`` of its video. Context errors go
    to the whole context.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, C, T, h, w], got shape {tuple(latents.shape)}")
    total = latents.shape[2]
    num_context = total // 2 if num_context is None else num_context
    if not 0 <= num_context < total:
        raise ValueError(f"num_context must lie in [0, {total - 1}] for a {total}-frame latent clip, got {num_context}")
    return TeacherLayout(
        latents=latents,
        segments=_segments([("context", num_context), ("target", total - num_context)]),
        source_pixel_frames=tuple(_clip_latent_frames(i, temporal_factor, first_frame) for i in range(total)),
        context_error_segment="context",
    )


@dataclass(frozen=True)
class LongLayoutConfig:
    """Counts of the long layout ``[sink | sparse | motion | target]`` (§E.2; defaults are the paper's).

    sink_latents, motion_latents, target_latents: latent frames per segment; sparse_stride: pixel frames between
    sparse snippet starts; sparse_window_frames: sparse snippets come from the last this-many pixel frames before
    the motion clip; min_sparse_latents: fewer sparse latents than this makes the clip too short.
    The toy (§J.3, sink 3 | sparse 2 | motion 6 | target 6) is e.g. ``LongLayoutConfig(3, 6, 6, 8, 16)``.
    """

    sink_latents: int = 3
    motion_latents: int = 6
    target_latents: int = 21
    sparse_stride: int = 24
    sparse_window_frames: int = 288
    min_sparse_latents: int = 2

    def __post_init__(self) -> None:
        for name in ("sink_latents", "motion_latents", "target_latents", "sparse_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sparse_window_frames", "min_sparse_latents"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class LongLayoutPlan:
    """Pixel-frame arithmetic of the long layout for one clip length.

    sink_frames: encoded alone; sparse_snippets: 1 + f frames each, encoded alone, latent 1 kept;
    motion_target_frames: 1 + f·(motion + target) frames encoded together, latent 0 dropped.
    """

    num_pixel_frames: int
    temporal_factor: int
    sink_frames: range
    sparse_snippets: tuple[range, ...]
    motion_target_frames: range
    config: LongLayoutConfig = field(repr=False)

    def source_pixel_frames(self) -> tuple[tuple[int, ...], ...]:
        """Pixel frames of every latent of the layout, in layout order."""
        f, c = self.temporal_factor, self.config
        sink = [_clip_latent_frames(i, f, self.sink_frames.start) for i in range(c.sink_latents)]
        sparse = [_clip_latent_frames(1, f, snippet.start) for snippet in self.sparse_snippets]
        motion_target = [_clip_latent_frames(i, f, self.motion_target_frames.start)
                         for i in range(1, 1 + c.motion_latents + c.target_latents)]
        return tuple(sink + sparse + motion_target)

    def pixel_frames(self) -> tuple[int, ...]:
        """Every pixel frame the layout reads, ascending (sink, snippets, motion + target with its leading frame)."""
        frames = {*self.sink_frames, *self.motion_target_frames}
        for snippet in self.sparse_snippets:
            frames.update(snippet)
        return tuple(sorted(frames))


def _long_min_pixel_frames(config: LongLayoutConfig, temporal_factor: int) -> int:
    f = temporal_factor
    sink = 1 + f * (config.sink_latents - 1)
    motion_target = 1 + f * (config.motion_latents + config.target_latents)
    sparse = 0 if config.min_sparse_latents == 0 else (1 + f) + config.sparse_stride * (config.min_sparse_latents - 1)
    return sink + sparse + motion_target


def long_layout_plan(num_pixel_frames: int, config: LongLayoutConfig | None = None,
                     temporal_factor: int = 4) -> LongLayoutPlan:
    """Which pixel frames feed which segment (§E.2), for a clip of ``num_pixel_frames``.

    Sink = frames ``0 … f(sink − 1)``. Motion + target = the last ``f·(motion + target)`` frames plus one leading
    frame. The sparse region lies between the sink and that leading frame, limited to its last
    ``sparse_window_frames``; snippets of ``1 + f`` frames start at the region start and every ``sparse_stride``
    frames after it while they fit. With the paper's counts a 160-frame clip gives 2 sparse latents and clips of
    ≥ 387 frames give 12; the shortest valid clip has 147 frames.
    """
    config = config or LongLayoutConfig()
    f = temporal_factor
    sink_len = 1 + f * (config.sink_latents - 1)
    motion_target_len = 1 + f * (config.motion_latents + config.target_latents)
    snippet_len = 1 + f
    window_capacity = 0 if config.sparse_window_frames < snippet_len else \
        (config.sparse_window_frames - snippet_len) // config.sparse_stride + 1
    if config.min_sparse_latents > window_capacity:
        raise ValueError(
            f"min_sparse_latents={config.min_sparse_latents} cannot be reached: a window of "
            f"{config.sparse_window_frames} pixel frames holds at most {window_capacity} snippets of {snippet_len} "
            f"frames at stride {config.sparse_stride}; enlarge sparse_window_frames or lower min_sparse_latents"
        )
    minimum = _long_min_pixel_frames(config, f)
    if num_pixel_frames < minimum:
        raise ValueError(
            f"a clip of {num_pixel_frames} pixel frames is too short for the long teacher layout: it needs at least "
            f"{minimum} ({sink_len} sink + {minimum - sink_len - motion_target_len} for {config.min_sparse_latents} "
            f"sparse latents + {motion_target_len} motion/target); filter shorter clips out or lower the counts"
        )
    motion_target_start = num_pixel_frames - motion_target_len
    region_start = max(sink_len, motion_target_start - config.sparse_window_frames)
    snippet_starts = range(region_start, motion_target_start - snippet_len + 1, config.sparse_stride)
    return LongLayoutPlan(
        num_pixel_frames=num_pixel_frames,
        temporal_factor=f,
        sink_frames=range(0, sink_len),
        sparse_snippets=tuple(range(s, s + snippet_len) for s in snippet_starts),
        motion_target_frames=range(motion_target_start, num_pixel_frames),
        config=config,
    )


def _encode_checked(autoencoder: VideoEncoder, video: Tensor, expected_latents: int, what: str) -> Tensor:
    latents = autoencoder.encode(video)
    if latents.dim() != 5 or latents.shape[2] != expected_latents:
        raise ValueError(
            f"encoding the {what} ({video.shape[2]} pixel frames) gave latents of shape {tuple(latents.shape)}, "
            f"expected {expected_latents} latent frames; the autoencoder must map 1 + 4k frames to 1 + k latents"
        )
    return latents


def long_layout(video: Tensor, autoencoder: VideoEncoder, config: LongLayoutConfig | None = None,
                frame_index: Sequence[int] | Tensor | None = None) -> TeacherLayout:
    """``[sink | sparse | motion | target]`` from a pixel clip ``[B, 3, N, H, W]`` (§E.2, `long_layout_plan`).

    Without ``frame_index`` the video is the whole clip, pixel frames ``0 … N − 1``. With it (``[N]`` ascending
    pixel-frame numbers of the clip, the last one being its last frame) the video holds only those frames, which
    must be exactly the plan's `LongLayoutPlan.pixel_frames` for a clip ending there (what a data pipeline decodes
    to avoid reading the whole clip). Each part is encoded on its own (no grad); context errors go to the motion
    latents only.
    """
    config = config or LongLayoutConfig()
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be pixels [B, 3, N, H, W], got shape {tuple(video.shape)}")
    temporal_factor = int(getattr(autoencoder, "temporal_factor", 4))
    if frame_index is None:
        plan = long_layout_plan(video.shape[2], config, temporal_factor)
        position = None
    else:
        held = [int(i) for i in torch.as_tensor(frame_index).reshape(-1).tolist()]
        if len(held) != video.shape[2]:
            raise ValueError(f"frame_index names {len(held)} pixel frames but the video holds {video.shape[2]}")
        plan = long_layout_plan(held[-1] + 1, config, temporal_factor)
        needed = list(plan.pixel_frames())
        if held != needed:
            raise ValueError(
                f"the clip holds pixel frames {_frame_ranges(held)} but the long layout {config} of a clip ending at "
                f"frame {held[-1]} reads {_frame_ranges(needed)}; the data's long_layout (data.teacher_clips) must "
                "equal the model's long_layout"
            )
        position = {frame: i for i, frame in enumerate(held)}

    def frames(r: range) -> Tensor:
        if position is None:
            return video[:, :, r.start:r.stop]
        start = position[r.start]
        return video[:, :, start:start + len(r)]  # held frames are ascending and hold all of r

    with torch.no_grad():
        sink = _encode_checked(autoencoder, frames(plan.sink_frames), config.sink_latents, "sink")
        sparse = [_encode_checked(autoencoder, frames(snippet), 2, "sparse snippet")[:, :, 1:2]
                  for snippet in plan.sparse_snippets]
        motion_target = _encode_checked(autoencoder, frames(plan.motion_target_frames),
                                        1 + config.motion_latents + config.target_latents, "motion + target clip")
    latents = torch.cat([sink, *sparse, motion_target[:, :, 1:]], dim=2)
    return TeacherLayout(
        latents=latents,
        segments=_segments([("sink", config.sink_latents), ("sparse", len(sparse)),
                            ("motion", config.motion_latents), ("target", config.target_latents)]),
        source_pixel_frames=plan.source_pixel_frames(),
        context_error_segment="motion",
    )


def _frame_ranges(frames: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0-2, 5-6"`` for error messages."""
    parts, start = [], None
    for i, frame in enumerate(frames):
        if start is None:
            start = frame
        if i + 1 == len(frames) or frames[i + 1] != frame + 1:
            parts.append(f"{start}" if start == frame else f"{start}-{frame}")
            start = None
    return ", ".join(parts) or "none"


def long_layout_from_latents(latents: Tensor, config: LongLayoutConfig | None = None,
                             temporal_factor: int = 4) -> TeacherLayout:
    """The long layout from a pre-encoded clip ``[B, C, n, h, w]`` (encoded from pixel frame 0) by latent indices.

    Sink = latents ``0 … sink − 1``; motion and target = the last ``motion + target`` latents; sparse = every
    ``sparse_stride / f``-th latent of the region between them, from its start, limited to the last
    ``sparse_window_frames / f`` latents. It approximates `long_layout`: sink, motion and target cover the same
    pixel frames (identical for encoders without temporal context across latents, such as the toy; a causal VAE
    like Wan's encodes motion/target with the clip's history instead of a fresh start), while each sparse latent
    covers the four frames one earlier than a pixel snippet's kept latent would (``f(j − 1) + 1 … f·j``), because
    snippet starts are not latent-aligned.
    """
    config = config or LongLayoutConfig()
    f = temporal_factor
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, C, n, h, w], got shape {tuple(latents.shape)}")
    if config.sparse_stride % f or config.sparse_window_frames % f:
        raise ValueError(
            f"sparse_stride ({config.sparse_stride}) and sparse_window_frames ({config.sparse_window_frames}) must "
            f"be multiples of the temporal factor {f} to pick sparse context from latents; use long_layout on pixels"
        )
    stride, window = config.sparse_stride // f, config.sparse_window_frames // f
    if config.min_sparse_latents > window:
        raise ValueError(f"min_sparse_latents={config.min_sparse_latents} exceeds the {window}-latent sparse window; "
                         "enlarge sparse_window_frames or lower min_sparse_latents")
    total = latents.shape[2]
    minimum = config.sink_latents + config.motion_latents + config.target_latents + (
        0 if config.min_sparse_latents == 0 else 1 + stride * (config.min_sparse_latents - 1))
    if total < minimum:
        raise ValueError(
            f"a clip of {total} latent frames is too short for the long teacher layout: it needs at least {minimum} "
            f"latent frames ({1 + f * (minimum - 1)} pixel frames); filter shorter clips out or lower the counts"
        )
    region_end = total - config.motion_latents - config.target_latents
    region_start = max(config.sink_latents, region_end - window)
    sparse_index = list(range(region_start, region_end, stride))
    index = [*range(config.sink_latents), *sparse_index, *range(region_end, total)]
    return TeacherLayout(
        latents=latents[:, :, index],
        segments=_segments([("sink", config.sink_latents), ("sparse", len(sparse_index)),
                            ("motion", config.motion_latents), ("target", config.target_latents)]),
        source_pixel_frames=tuple(_clip_latent_frames(i, f) for i in index),
        context_error_segment="motion",
    )
