"""Per-segment evaluation of a video generated from a prompt schedule (`cf generate --prompt-schedule`).

`cf generate` writes ``<name>.segments.json`` beside such a video: for each segment its prompt and the pixel frames
it conditions, ``[start_frame, end_frame)``. A segment that starts at latent frame f (a chunk boundary) starts at
pixel frame ``1 + 4(f − 1)`` (latent 0 decodes to one pixel frame, every later latent to 4), so the segments tile
the video exactly. Optionally a segment names the ground-truth json of a clip its prompt describes (the synthetic
sprite world), for prompt fidelity from pixels.

Each segment is scored as a video of its own (`segment_metrics`):

- windowed curves at segment-relative timestamps (``step_s``, 2 ``step_s``, … seconds after the segment starts;
  the usual window ``[t − h, t + h)`` and coverage rule, clipped to the segment): pixel similarity to the
  segment's first frame, the reference-free identity presence and background drift against the segment's own
  first second; with CLIP features, CLIP-F (to the segment's first frame) and **CLIP-T against the segment's own
  prompt** and, from the second segment on, against the previous segment's prompt (a switch that took effect
  scores higher on its own prompt); with DINOv2 features, the DINOv2 score; with a ground truth, background
  coverage and named-sprite presence (`cf.evaluation.prompted`);
- the mean of every curve over the segment's frames.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from cf.encoder_base import VideoAutoencoder
from cf.evaluation.ground_truth import _curve_summaries, reference_free_metrics
from cf.evaluation.metrics import (
    DEFAULT_HALF_WIDTH,
    DEFAULT_MIN_COVERAGE,
    clip_text_score,
    pixel_similarity_to_first_frame,
    similarity_to_first_frame,
)

__all__ = ["VideoSegment", "schedule_segments", "write_segments", "read_segments", "segment_timestamps",
           "segment_metrics", "summarize_segments", "SEGMENTS_SUFFIX"]

SEGMENTS_SUFFIX = ".segments.json"


@dataclass(frozen=True)
class VideoSegment:
    """Pixel frames ``[start_frame, end_frame)`` conditioned by ``prompt``; ``ground_truth``: optional path of a
    clip's ground-truth json that the prompt describes."""

    prompt: str
    start_frame: int
    end_frame: int
    ground_truth: str | None = None

    def to_dict(self, fps: float) -> dict[str, Any]:
        out = {"prompt": self.prompt, "start_frame": self.start_frame, "end_frame": self.end_frame,
               "start_s": self.start_frame / fps, "end_s": self.end_frame / fps}
        if self.ground_truth is not None:
            out["ground_truth"] = self.ground_truth
        return out


def _first_pixel_frame(latent_frame: int, temporal_factor: int = 4) -> int:
    """The first pixel frame latent ``latent_frame`` decodes to: the pixel frames of the latents before it."""
    return 0 if latent_frame == 0 else VideoAutoencoder.num_pixel_frames(latent_frame, temporal_factor)


def schedule_segments(prompts: Sequence[str], start_latents: Sequence[int], num_latent_frames: int,
                      ground_truths: Sequence[str | None] | None = None,
                      temporal_factor: int = 4) -> list[VideoSegment]:
    """Pixel-frame segments of a video of ``num_latent_frames`` latents whose segment i starts at latent
    ``start_latents[i]`` (0 first, increasing)."""
    if len(prompts) != len(start_latents) or not prompts:
        raise ValueError(f"need one start per prompt, got {len(prompts)} prompts and {len(start_latents)} starts")
    if start_latents[0] != 0 or any(b <= a for a, b in zip(start_latents, start_latents[1:])) or \
            start_latents[-1] >= num_latent_frames:
        raise ValueError(f"segment starts must begin at 0, increase and stay below {num_latent_frames} latent "
                         f"frames, got {list(start_latents)}")
    truths = list(ground_truths) if ground_truths is not None else [None] * len(prompts)
    bounds = [_first_pixel_frame(f, temporal_factor) for f in start_latents]
    bounds.append(_first_pixel_frame(num_latent_frames, temporal_factor))
    return [VideoSegment(p, bounds[i], bounds[i + 1], truths[i]) for i, p in enumerate(prompts)]


def write_segments(path: str | Path, segments: Sequence[VideoSegment], fps: float) -> None:
    """``<name>.segments.json``: ``{"fps": ..., "segments": [{prompt, start_frame, end_frame, start_s, end_s}]}``."""
    from cf.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps({"fps": fps, "segments": [s.to_dict(fps) for s in segments]},
                                             indent=1) + "\n")


def read_segments(path: str | Path) -> list[VideoSegment]:
    """The segments of a ``.segments.json`` file; a relative ``ground_truth`` is resolved against its folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["segments"]
        segments = [VideoSegment(str(r["prompt"]), int(r["start_frame"]), int(r["end_frame"]), r.get("ground_truth"))
                    for r in rows]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a segments file ({type(err).__name__}: {err}); it should hold "
                         '{"fps": 16, "segments": [{"prompt": ..., "start_frame": 0, "end_frame": 81}, ...]} as '
                         "`cf generate --prompt-schedule` writes it; regenerate it or delete it") from None
    if not segments or segments[0].start_frame != 0 or any(
            s.end_frame <= s.start_frame or s.start_frame != prev.end_frame
            for prev, s in zip([VideoSegment("", 0, 0)] + segments, segments)):
        raise ValueError(f"{path}: segments must start at frame 0 and tile the video without gaps, got "
                         f"{[(s.start_frame, s.end_frame) for s in segments]}")
    out = []
    for s in segments:
        truth = s.ground_truth
        if truth is not None and not Path(truth).is_absolute():
            truth = str(path.parent / truth)
        out.append(VideoSegment(s.prompt, s.start_frame, s.end_frame, truth))
    return out


def segment_timestamps(duration_s: float, step_s: float) -> tuple[float, ...]:
    """``step_s, 2 step_s, …`` up to the segment's duration (the last window is half inside, which the default
    coverage rule accepts)."""
    if step_s <= 0:
        raise ValueError(f"segment step must be positive seconds, got {step_s}")
    return tuple(step_s * k for k in range(1, int(math.floor(duration_s / step_s + 1e-9)) + 1))


def segment_metrics(frames: Tensor, fps: float, segments: Sequence[VideoSegment], step_s: float = 1.0,
                    half_width: float = DEFAULT_HALF_WIDTH, min_coverage: float = DEFAULT_MIN_COVERAGE,
                    features: Mapping[str, Tensor] | None = None,
                    text_features: Callable[[Sequence[str]], Tensor] | None = None,
                    load_ground_truth: Callable[[str], Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Scores of each segment of a video, the segment taken as a video of its own (module docstring).

    frames: float ``[T, 3, H, W]`` in [0, 1] (the pixel metrics' downscaled frames) or uint8 ``[T, H, W, 3]``;
    features: per-frame unit features ``[T, D]`` of the whole video by name (``"clip"``, ``"dino"``);
    text_features: the CLIP text encoder (prompts -> ``[P, D]``), needed for CLIP-T. A segment that runs past the
    video's end is clipped to it (a video cut short by an interrupt); one that starts past it is reported as such.
    Returns one dict per segment: prompt, frames, seconds, ``curves`` {name: {"windowed": {t: v}, "mean": v}}.
    """
    if frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == torch.uint8:
        frames = frames.permute(0, 3, 1, 2).float() / 255.0
    num_frames = int(frames.shape[0])
    features = dict(features or {})
    prompt_features = {}
    if "clip" in features and text_features is not None:
        prompts = sorted({s.prompt for s in segments})
        prompt_features = dict(zip(prompts, text_features(prompts)))
    out = []
    for index, segment in enumerate(segments):
        start, end = segment.start_frame, min(segment.end_frame, num_frames)
        row: dict[str, Any] = {"index": index, "prompt": segment.prompt, "start_frame": start, "end_frame": end,
                               "start_s": start / fps, "end_s": end / fps, "curves": {}}
        if end - start < 2:
            row["status"] = f"skipped: the video has {num_frames} frames, the segment starts at frame {start}"
            out.append(row)
            continue
        part = frames[start:end]
        timestamps = segment_timestamps((end - start) / fps, step_s)
        row["timestamps"] = list(timestamps)
        curves = {"pixel_first_frame": 100 * pixel_similarity_to_first_frame(part)}
        free = reference_free_metrics(part, fps, timestamps=timestamps)
        for name in ("identity_presence", "background_colour_drift"):
            curves[name] = torch.tensor([math.nan if v is None else v for v in free[name]["curve"]])
        if "dino" in features:
            curves["dinov2"] = 100 * similarity_to_first_frame(features["dino"][start:end])
        if "clip" in features:
            clip = features["clip"][start:end]
            curves["clip_f_first_frame"] = 100 * similarity_to_first_frame(clip)
            if segment.prompt in prompt_features:
                curves["clip_t"] = clip_text_score(clip, prompt_features[segment.prompt])
                if index > 0 and segments[index - 1].prompt in prompt_features:
                    curves["clip_t_previous_prompt"] = clip_text_score(clip,
                                                                       prompt_features[segments[index - 1].prompt])
        if segment.ground_truth is not None:
            from cf.evaluation.prompted import prompt_fidelity

            fidelity = prompt_fidelity(part, (load_ground_truth or _load_json)(segment.ground_truth))
            for name in ("background_coverage", "sprite_presence"):
                if fidelity[f"{name}_curve"] is not None:
                    curves[name] = torch.tensor(fidelity[f"{name}_curve"], dtype=torch.float32)
        summaries = _curve_summaries(curves, fps, timestamps, half_width, min_coverage)
        row["curves"] = {name: {"windowed": v["windowed"], "mean": v["mean"]} for name, v in summaries.items()}
        row["status"] = "ok"
        out.append(row)
    return out


def _load_json(path: str) -> Mapping[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"segment ground truth {path} not found; fix the path in the .segments.json file")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def summarize_segments(per_video: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Folder summary: for segment index i, the mean over the videos that have it of each curve's segment mean."""
    longest = max((len(v) for v in per_video), default=0)
    out = []
    for i in range(longest):
        rows = [v[i] for v in per_video if len(v) > i and v[i].get("status") == "ok"]
        names = sorted({name for r in rows for name in r["curves"]})
        means = {}
        for name in names:
            values = [r["curves"][name]["mean"] for r in rows if name in r["curves"]]
            values = [v for v in values if v is not None]
            means[name] = float(np.mean(values)) if values else None
        out.append({"index": i, "videos": len(rows), "means": means})
    return out
