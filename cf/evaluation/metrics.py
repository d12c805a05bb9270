"""Long-video consistency metrics on per-frame feature tensors (reference.md §3, method.md §H).

All functions take L2-normalised features ``[T, D]`` (they re-normalise to be safe) and return scores ×100.

- Windowed protocol (Context Forcing): at each timestamp t (default 10, 20, …, 60 s), average over the frames k with
  ``t − h ≤ k / fps < t + h`` (h = 0.5 s: 16 frames at 16 fps). A window that falls outside the video, or whose part
  inside the video is shorter than ``min_coverage`` of the full window, is reported as missing (``None``), never 0.
  - DINOv2 score and CLIP-F (first frame): ``cos(f_0, f_k)``, no clipping.
  - CLIP-F (consecutive frames, the video-editing definition): ``cos(f_{k−1}, f_k)``.
  - CLIP-T: ``100 · max(cos(h_k, e(prompt)), 0)`` (torchmetrics' CLIPScore definition).
- VBench subject / background consistency: per frame t ≥ 2 (1-based),
  ``s_t = ½[max(0, cos(f_1, f_t)) + max(0, cos(f_{t−1}, f_t))]``; per video (VBench's ``video_results``)
  ``Σ_t s_t / (T_v − 1)``; over videos frame-weighted (VBench's dimension score): ``Σ_v Σ_t s_t / Σ_v (T_v − 1)``,
  which is the mean of the per-video scores weighted by ``T_v − 1`` (the plain mean when all videos have the same
  length). A video with a single frame has no score (VBench reports 1.0 for it; it adds nothing to the aggregate).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

DEFAULT_TIMESTAMPS: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
DEFAULT_HALF_WIDTH = 0.5
DEFAULT_MIN_COVERAGE = 0.5


def _check_features(features: Tensor, name: str = "features") -> Tensor:
    if not torch.is_tensor(features) or features.ndim != 2:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"{name} must be a [T, D] tensor, got {shape}")
    return F.normalize(features.float(), dim=-1)


def window_frame_indices(timestamp: float, fps: float, num_frames: int, half_width: float = DEFAULT_HALF_WIDTH,
                         min_coverage: float = DEFAULT_MIN_COVERAGE) -> range | None:
    """Frames k with ``timestamp − half_width ≤ k / fps < timestamp + half_width``, clipped to the video.

    Returns None when fewer than ``min_coverage`` of the full window's frames (and at least one) lie in the video.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if half_width <= 0:
        raise ValueError(f"window half-width must be positive (seconds), got {half_width}")
    eps = 1e-9
    start = math.ceil((timestamp - half_width) * fps - eps)
    stop = math.ceil((timestamp + half_width) * fps - eps)
    full = stop - start
    first, last = max(start, 0), min(stop, num_frames)
    inside = last - first
    if inside <= 0 or inside < min_coverage * full:
        return None
    return range(first, last)


def windowed_mean(values: Tensor, fps: float, timestamps: Sequence[float] = DEFAULT_TIMESTAMPS,
                  half_width: float = DEFAULT_HALF_WIDTH,
                  min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict[float, float | None]:
    """Mean of a per-frame curve ``[T]`` over each timestamp's window; NaN entries are skipped; None = missing."""
    out: dict[float, float | None] = {}
    for t in timestamps:
        window = window_frame_indices(float(t), fps, values.shape[0], half_width, min_coverage)
        if window is None:
            out[float(t)] = None
            continue
        chunk = values[window.start : window.stop]
        chunk = chunk[~torch.isnan(chunk)]
        out[float(t)] = float(chunk.mean()) if chunk.numel() else None
    return out


def similarity_to_first_frame(features: Tensor) -> Tensor:
    """``[T, D]`` -> ``[T]``: ``cos(f_0, f_k)`` (1 at k = 0)."""
    f = _check_features(features)
    return f @ f[0] if f.shape[0] else f.new_zeros(0)


def consecutive_frame_similarity(features: Tensor) -> Tensor:
    """``[T, D]`` -> ``[T]``: ``cos(f_{k−1}, f_k)``, NaN at k = 0."""
    f = _check_features(features)
    out = torch.full((f.shape[0],), float("nan"))
    if f.shape[0] > 1:
        out[1:] = (f[1:] * f[:-1]).sum(-1)
    return out


def clip_text_score(image_features: Tensor, text_feature: Tensor) -> Tensor:
    """``[T, D]`` image features and one ``[D]`` (or ``[1, D]``) text feature -> ``[T]``: ``100 · max(cos, 0)``."""
    f = _check_features(image_features, "image_features")
    text = F.normalize(text_feature.float().reshape(-1), dim=0)
    if text.shape[0] != f.shape[1]:
        raise ValueError(f"text feature dim {text.shape[0]} does not match image feature dim {f.shape[1]}")
    return 100.0 * (f @ text).clamp(min=0.0)


def _scale(scores: dict[float, float | None], factor: float) -> dict[float, float | None]:
    return {t: None if v is None else factor * v for t, v in scores.items()}


def windowed_first_frame_score(features: Tensor, fps: float, timestamps: Sequence[float] = DEFAULT_TIMESTAMPS,
                               half_width: float = DEFAULT_HALF_WIDTH,
                               min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict[float, float | None]:
    """DINOv2 score (DINOv2 features) or CLIP-F first-frame (CLIP features): ``100 · mean_{k∈W(t)} cos(f_0, f_k)``."""
    return _scale(windowed_mean(similarity_to_first_frame(features), fps, timestamps, half_width, min_coverage), 100)


def windowed_consecutive_frame_score(features: Tensor, fps: float,
                                     timestamps: Sequence[float] = DEFAULT_TIMESTAMPS,
                                     half_width: float = DEFAULT_HALF_WIDTH,
                                     min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict[float, float | None]:
    """CLIP-F, consecutive-frame variant: ``100 · mean_{k∈W(t), k≥1} cos(f_{k−1}, f_k)``."""
    return _scale(windowed_mean(consecutive_frame_similarity(features), fps, timestamps, half_width, min_coverage),
                  100)


def windowed_clip_t_score(image_features: Tensor, text_feature: Tensor, fps: float,
                          timestamps: Sequence[float] = DEFAULT_TIMESTAMPS, half_width: float = DEFAULT_HALF_WIDTH,
                          min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict[float, float | None]:
    """CLIP-T: ``mean_{k∈W(t)} 100 · max(cos(h_k, e(prompt)), 0)``."""
    return windowed_mean(clip_text_score(image_features, text_feature), fps, timestamps, half_width, min_coverage)


def vbench_frame_scores(features: Tensor) -> Tensor:
    """``[T, D]`` -> ``[T − 1]``: ``s_t = ½[max(0, cos(f_1, f_t)) + max(0, cos(f_{t−1}, f_t))]`` for t = 2..T."""
    f = _check_features(features)
    if f.shape[0] < 2:
        return f.new_zeros(0)
    to_first = (f[1:] @ f[0]).clamp(min=0.0)
    to_previous = (f[1:] * f[:-1]).sum(-1).clamp(min=0.0)
    return 0.5 * (to_first + to_previous)


def vbench_video_consistency(features: Tensor) -> float:
    """One video's VBench consistency ×100 from ``[T, D]``: ``100 · mean_t s_t``; NaN when ``T < 2``."""
    scores = vbench_frame_scores(features)
    return 100.0 * float(scores.double().mean()) if scores.numel() else float("nan")


def vbench_consistency(videos: Iterable[Tensor]) -> float:
    """Frame-weighted VBench consistency ×100 over videos (each ``[T_v, D]``): ``Σ_v Σ_t s_t / Σ_v (T_v − 1)``."""
    metric = VBenchConsistency()
    for features in videos:
        metric.update(features)
    return float(metric.compute())


class VBenchConsistency(Metric):
    """VBench subject (DINO) / background (CLIP) consistency ×100, frame-weighted; sums reduce across ranks."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pair_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        """Add one video's features ``[T, D]``."""
        scores = vbench_frame_scores(features)
        self.score_sum += scores.double().sum().to(self.score_sum.device)
        self.pair_count += scores.shape[0]

    def compute(self) -> Tensor:
        if int(self.pair_count) == 0:
            return torch.tensor(float("nan"))
        return (100.0 * self.score_sum / self.pair_count).float()


class WindowedScore(Metric):
    """Mean over videos of a per-video windowed score; missing timestamps are not counted (state: sums, counts)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, timestamps: Sequence[float] = DEFAULT_TIMESTAMPS, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if len(timestamps) == 0:
            raise ValueError("WindowedScore needs at least one timestamp")
        self.timestamps = tuple(float(t) for t in timestamps)
        n = len(self.timestamps)
        self.add_state("score_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("video_count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Mapping[float, float | None]) -> None:
        """Add one video's ``{timestamp: score or None}``."""
        for i, t in enumerate(self.timestamps):
            value = scores.get(t)
            if value is not None and not math.isnan(value):
                self.score_sum[i] += value
                self.video_count[i] += 1

    def compute(self) -> Tensor:
        """``[len(timestamps)]`` means; NaN where no video reached the timestamp."""
        mean = self.score_sum / self.video_count.clamp(min=1)
        return torch.where(self.video_count > 0, mean, torch.full_like(mean, float("nan"))).float()

    def compute_dict(self) -> dict[float, float | None]:
        """``{timestamp: mean or None}``."""
        values = self.compute().tolist()
        return {t: None if math.isnan(v) else v for t, v in zip(self.timestamps, values)}


def pixel_similarity_to_first_frame(frames: Tensor) -> Tensor:
    """Feature-free curve for the flashback detector: ``1 − mean|x_k − x_0|`` on float ``[T, 3, H, W]`` in [0, 1]."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be float [T, 3, H, W] in [0, 1], got {tuple(frames.shape)}")
    x = frames.float()
    return 1.0 - (x - x[:1]).abs().mean(dim=(1, 2, 3))
