"""Evaluate folders of generated videos and write ``metrics.json``, ``metrics.csv`` and metric-vs-time PNGs.

Each folder is one model. Per video (``*.mp4``, prompt from a same-stem ``.txt`` or a prompts file, optional
same-stem ground-truth ``.json``):

- always (pixels only): identity presence / retained colour mass and background drift against the video's own first
  second (:func:`cf.evaluation.ground_truth.reference_free_metrics`), a pixel similarity-to-first-frame curve and
  its flashback events;
- with a ground-truth JSON: identity recall after re-entry and background drift / spec error;
- with ``dino``: windowed DINOv2 score, VBench subject consistency, flashbacks on the DINOv2 curve;
- with ``clip``: windowed CLIP-F (first frame and consecutive), CLIP-T (needs a prompt), VBench background
  consistency (the CLIP model run again with VBench's own preprocessing, see :mod:`cf.evaluation.features`),
  flashbacks on the CLIP curve.

A video made from a prompt schedule (a same-stem ``.segments.json`` written by `cf generate --prompt-schedule`)
is also scored segment by segment, each segment as a video of its own and CLIP-T against its own prompt
(:mod:`cf.evaluation.segments`), under ``segments``; the folder summary averages each segment index.

Per video, ``scalars`` holds the VBench scores ``vbench_subject_consistency`` / ``vbench_background_consistency``
(×100, VBench's per-video ``video_results``). Folder summaries: windowed metrics are means over the videos that reach
each timestamp; VBench consistencies are frame-weighted over all videos like VBench's dimension score, i.e. the
per-video scores averaged with weights ``num_frames − 1`` (the plain mean when all videos have the same length);
identity recall is over all re-entry events of the folder.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cf.evaluation.features import ClipFeatures, DinoFeatures, FrameFeatures, frames_to_float
from cf.evaluation.flashback import detect_flashbacks
from cf.evaluation.ground_truth import ground_truth_metrics, reference_free_metrics
from cf.evaluation.metrics import (
    DEFAULT_TIMESTAMPS,
    VBenchConsistency,
    WindowedScore,
    pixel_similarity_to_first_frame,
    similarity_to_first_frame,
    vbench_video_consistency,
    windowed_clip_t_score,
    windowed_consecutive_frame_score,
    windowed_first_frame_score,
    windowed_mean,
)
from cf.evaluation.segments import SEGMENTS_SUFFIX, VideoSegment, read_segments, segment_metrics, summarize_segments
from cf.video_io import read_video

PIXEL_CURVES = ("identity_presence", "identity_mass_retained", "background_colour_drift",
                "background_contrast_drift")
GROUND_TRUTH_CURVES = ("background_colour_drift", "background_contrast_drift", "background_spec_error")


@dataclass
class EvaluationConfig:
    """Protocol knobs; stored in metrics.json so a table can say how it was made."""

    timestamps: tuple[float, ...] = DEFAULT_TIMESTAMPS
    half_width: float = 0.5  # window [t − h, t + h) seconds
    min_coverage: float = 0.5  # fraction of a window that must lie inside the video
    fps: float | None = None  # override the container's frame rate
    reference_s: float = 1.0  # identity reference span of the ground-truth-free pixel metrics
    background_s: float = 4.0  # background-image span of the ground-truth-free pixel metrics
    pixel_max_side: int = 128  # frames are area-downscaled to this longer side for the pixel metrics
    flashback_smoothing_s: float = 0.5
    flashback_min_decline: float = 0.1
    flashback_min_rise: float = 0.1
    flashback_max_rise_s: float = 1.0
    max_videos: int | None = None  # per folder, for quick looks
    segment_step_s: float = 1.0  # spacing of the segment-relative windows of prompt-schedule segments
    extras: dict[str, Any] = field(default_factory=dict)


def load_prompts(path: str | Path) -> dict[str, str]:
    """Prompts file: a JSON object ``{stem: prompt}``, or text lines ``stem<TAB>prompt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: a JSON prompts file must be an object mapping video stem to prompt")
        return {str(k): v for k, v in data.items()}
    prompts = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected 'stem<TAB>prompt' (or use a .json file {{stem: prompt}})")
        stem, prompt = line.split("\t", 1)
        prompts[stem.strip()] = prompt.strip()
    return prompts


def downscale_frames(frames: np.ndarray, max_side: int, chunk: int = 64) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[T, 3, h, w]`` in [0, 1], area-averaged so the longer side is ≤ max_side."""
    height, width = frames.shape[1:3]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    out = []
    for start in range(0, frames.shape[0], chunk):
        x = frames_to_float(frames[start : start + chunk])
        out.append(x if scale == 1.0 else F.interpolate(x, size=size, mode="area"))
    return torch.cat(out)


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, tuples -> lists, float dict keys kept as numbers in strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _drop_curves(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "curve"} if isinstance(v, dict) else v)
            for k, v in result.items()}


def evaluate_video(frames: np.ndarray, fps: float, config: EvaluationConfig, prompt: str | None = None,
                   ground_truth: Mapping[str, Any] | None = None, dino: FrameFeatures | None = None,
                   vbench_dino: FrameFeatures | None = None, clip: FrameFeatures | None = None,
                   vbench_clip: FrameFeatures | None = None,
                   segments: Sequence[VideoSegment] | None = None) -> dict[str, Any]:
    """All metrics of one video (uint8 ``[T, H, W, 3]`` at ``fps``).

    ``segments``: the prompt-schedule segments of the video (``<name>.segments.json``); each is also scored as a
    video of its own, CLIP-T against its own prompt (`cf.evaluation.segments`), under ``"segments"``.

    ``vbench_dino`` / ``vbench_clip`` are the extractors of VBench subject / background consistency; by default the
    ``dino`` extractor, and the ``clip`` model with VBench's preprocessing (``ClipFeatures.with_preprocessing``).
    Returns ``{"windowed": {metric: {t: value}}, "scalars": {...}, "flashbacks": {curve: [...]}, "features": {...},
    "ground_truth": {...} or None}``; ``features`` holds the ``[T, D]`` tensors the folder summary needs
    (``dino``, ``vbench_dino``, ``clip``, ``vbench_clip``).
    """
    window = dict(timestamps=config.timestamps, half_width=config.half_width, min_coverage=config.min_coverage)
    flash = dict(smoothing_s=config.flashback_smoothing_s, min_decline=config.flashback_min_decline,
                 min_rise=config.flashback_min_rise, max_rise_s=config.flashback_max_rise_s)
    small = downscale_frames(frames, config.pixel_max_side)
    windowed: dict[str, dict[float, float | None]] = {}
    scalars: dict[str, Any] = {"num_frames": int(frames.shape[0]), "fps": fps, "duration_s": frames.shape[0] / fps}
    flashbacks: dict[str, list[dict[str, Any]]] = {}
    features: dict[str, torch.Tensor] = {}

    pixel_curve = pixel_similarity_to_first_frame(small)
    windowed["pixel_first_frame"] = windowed_mean(100 * pixel_curve, fps, **window)
    flashbacks["pixel"] = [e.to_dict() for e in detect_flashbacks(pixel_curve, fps, **flash)]
    reference_free = reference_free_metrics(small, fps, reference_s=config.reference_s,
                                            background_s=config.background_s, **window)
    for name in PIXEL_CURVES:
        windowed[name] = reference_free[name]["windowed"]
        scalars[f"{name}_mean"] = reference_free[name]["mean"]
    scalars["identity_colours"] = reference_free["identity_colours"]

    gt_result = None
    if ground_truth is not None:
        gt_result = _drop_curves(ground_truth_metrics(small, ground_truth, fps=fps, **window))
        for name in GROUND_TRUTH_CURVES:
            windowed[f"gt_{name}"] = gt_result[name]["windowed"]
        for name in ("identity_recall_anywhere", "identity_recall_at_track"):
            scalars[f"gt_{name}"] = gt_result[name]

    if dino is not None:
        f = dino.image_features(frames)
        features["dino"] = f
        windowed["dinov2"] = windowed_first_frame_score(f, fps, **window)
        flashbacks["dinov2"] = [e.to_dict() for e in detect_flashbacks(similarity_to_first_frame(f), fps, **flash)]
        features["vbench_dino"] = vbench_dino.image_features(frames) if vbench_dino is not None else f
        scalars["vbench_subject_consistency"] = vbench_video_consistency(features["vbench_dino"])
    if clip is not None:
        f = clip.image_features(frames)
        features["clip"] = f
        windowed["clip_f_first_frame"] = windowed_first_frame_score(f, fps, **window)
        windowed["clip_f_consecutive"] = windowed_consecutive_frame_score(f, fps, **window)
        flashbacks["clip"] = [e.to_dict() for e in detect_flashbacks(similarity_to_first_frame(f), fps, **flash)]
        if prompt is not None:
            windowed["clip_t"] = windowed_clip_t_score(f, clip.text_features([prompt])[0], fps, **window)
        if vbench_clip is None:
            if not isinstance(clip, ClipFeatures):
                raise TypeError(f"cannot derive VBench's CLIP preprocessing from a {type(clip).__name__}; "
                                f"pass vbench_clip= (e.g. ClipFeatures(..., preprocessing='vbench'))")
            vbench_clip = clip.with_preprocessing("vbench")
        features["vbench_clip"] = vbench_clip.image_features(frames)
        scalars["vbench_background_consistency"] = vbench_video_consistency(features["vbench_clip"])
    result = {"windowed": windowed, "scalars": scalars, "flashbacks": flashbacks, "features": features,
              "ground_truth": gt_result}
    if segments is not None:
        result["segments"] = segment_metrics(small, fps, segments, config.segment_step_s, config.half_width,
                                             config.min_coverage, features,
                                             clip.text_features if clip is not None else None)
    return result


def _unique_labels(folders: Sequence[Path]) -> list[str]:
    labels = [f.name or str(f) for f in folders]
    if len(set(labels)) == len(labels):
        return labels
    return [str(f) for f in folders]


def _evaluate_folder(folder: Path, config: EvaluationConfig, prompts: Mapping[str, str],
                     dino: FrameFeatures | None, vbench_dino: FrameFeatures | None, clip: FrameFeatures | None,
                     vbench_clip: FrameFeatures | None, notes: list[str], label: str) -> dict[str, Any]:
    videos = sorted(folder.glob("*.mp4"))
    if config.max_videos is not None:
        videos = videos[: config.max_videos]
    if not videos:
        raise FileNotFoundError(f"no *.mp4 files in {folder}")
    windowed_metrics: dict[str, WindowedScore] = {}
    subject, background = VBenchConsistency(), VBenchConsistency()
    per_video: dict[str, Any] = {}
    recalled = {"anywhere": 0, "at_track": 0}
    events = 0
    flashback_count: dict[str, int] = {}
    total_seconds = 0.0
    missing_prompts = 0
    unreadable: dict[str, str] = {}
    for path in tqdm(videos, desc=f"evaluate {label}", unit="video"):
        try:
            frames, container_fps = read_video(path)
        except Exception as err:  # PyAV raises many error types for broken files
            unreadable[path.name] = f"{type(err).__name__}: {str(err)[:200]}"
            continue
        fps = float(config.fps or container_fps)
        prompt_file = path.with_suffix(".txt")
        prompt = prompt_file.read_text(encoding="utf-8").strip() if prompt_file.is_file() else prompts.get(path.stem)
        missing_prompts += prompt is None
        gt_file = path.with_suffix(".json")
        ground_truth = json.loads(gt_file.read_text(encoding="utf-8")) if gt_file.is_file() else None
        segments_file = path.with_name(path.stem + SEGMENTS_SUFFIX)
        segments = read_segments(segments_file) if segments_file.is_file() else None
        result = evaluate_video(frames, fps, config, prompt, ground_truth, dino, vbench_dino, clip, vbench_clip,
                                segments)
        features = result.pop("features")
        if "vbench_dino" in features:
            subject.update(features["vbench_dino"])
        if "vbench_clip" in features:
            background.update(features["vbench_clip"])
        for name, scores in result["windowed"].items():
            windowed_metrics.setdefault(name, WindowedScore(config.timestamps)).update(scores)
        if result["ground_truth"] is not None:
            for row in result["ground_truth"]["reentry_events"]:
                events += 1
                recalled["anywhere"] += row["recalled_anywhere"]
                recalled["at_track"] += row["recalled_at_track"]
        for curve, found in result["flashbacks"].items():
            flashback_count[curve] = flashback_count.get(curve, 0) + len(found)
        total_seconds += result["scalars"]["duration_s"]
        per_video[path.stem] = result
    if unreadable:
        listed = "; ".join(f"{name} ({reason})" for name, reason in list(unreadable.items())[:5])
        notes.append(f"{label}: {len(unreadable)} of {len(videos)} videos are unreadable and were skipped: {listed}"
                     + (" ..." if len(unreadable) > 5 else ""))
    if not per_video:
        raise ValueError(f"no readable video in {folder}: all {len(videos)} *.mp4 files failed to decode (first: "
                         f"{next(iter(unreadable.items()))}); regenerate them or point to another folder")
    if clip is not None and missing_prompts:
        notes.append(f"{label}: {missing_prompts} of {len(per_video)} videos have no prompt; CLIP-T skipped for them")
    summary: dict[str, Any] = {
        "windowed": {name: metric.compute_dict() for name, metric in windowed_metrics.items()},
        "num_videos": len(per_video),
        "num_unreadable": len(unreadable),
        "unreadable_videos": unreadable,
        "total_seconds": total_seconds,
        "flashbacks_per_minute": {k: 60.0 * v / total_seconds for k, v in flashback_count.items()},
        "flashback_count": flashback_count,
    }
    if dino is not None:
        summary["vbench_subject_consistency"] = float(subject.compute())
    if clip is not None:
        summary["vbench_background_consistency"] = float(background.compute())
    scheduled = [v["segments"] for v in per_video.values() if "segments" in v]
    if scheduled:
        summary["segments"] = summarize_segments(scheduled)
    if events:
        summary["gt_identity_recall_anywhere"] = recalled["anywhere"] / events
        summary["gt_identity_recall_at_track"] = recalled["at_track"] / events
        summary["gt_reentry_events"] = events
    return {"folder": str(folder), "summary": summary, "videos": per_video}


def _write_csv(path: Path, models: Mapping[str, Any]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "video", "metric", "time_s", "value"])

        def rows(model: str, video: str, windowed: Mapping, scalars: Mapping) -> None:
            for metric, scores in windowed.items():
                for t, value in scores.items():
                    writer.writerow([model, video, metric, f"{t:g}", "" if value is None else f"{value:.6g}"])
            for metric, value in scalars.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.writerow([model, video, metric, "", f"{value:.6g}" if math.isfinite(value) else ""])

        for model, data in models.items():
            summary = data["summary"]
            rows(model, "ALL", summary["windowed"], {k: v for k, v in summary.items() if k != "windowed"})
            for stem, result in data["videos"].items():
                flash = {f"flashbacks_{k}": len(v) for k, v in result["flashbacks"].items()}
                rows(model, stem, result["windowed"], {**result["scalars"], **flash})


def _plot(out_dir: Path, models: Mapping[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for data in models.values() for name in data["summary"]["windowed"]})
    written = []
    for name in names:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for model, data in models.items():
            scores = data["summary"]["windowed"].get(name)
            if not scores:
                continue
            times = list(scores)
            values = [np.nan if v is None else v for v in scores.values()]
            ax.plot(times, values, marker="o", label=model)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(name)
        ax.set_title(f"{name} vs time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}_vs_time.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def evaluate_folders(folders: Sequence[str | Path], out_dir: str | Path, *, prompts_file: str | Path | None = None,
                     dino: str | Path | None = None, vbench_dino: str | Path | None = None,
                     clip: str | Path | None = None, config: EvaluationConfig | None = None,
                     device: str = "cpu", batch_size: int = 32, dino_image_size: int = 224) -> dict[str, Any]:
    """Evaluate each folder of ``*.mp4`` (one model per folder) and write metrics.json / metrics.csv / PNGs.

    ``dino`` / ``vbench_dino`` / ``clip`` are local model folders (optional). Returns the metrics.json content.
    """
    config = config or EvaluationConfig()
    folder_paths = [Path(f) for f in folders]
    if not folder_paths:
        raise ValueError("give at least one folder of *.mp4 videos")
    for folder in folder_paths:
        if not folder.is_dir():
            raise FileNotFoundError(f"video folder not found: {folder}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(prompts_file) if prompts_file is not None else {}
    notes = []
    dino_model = vbench_model = clip_model = vbench_clip_model = None
    if dino is not None:
        dino_model = DinoFeatures.from_pretrained(dino, image_size=dino_image_size, batch_size=batch_size,
                                                  device=device)
        source = DinoFeatures.from_pretrained(vbench_dino, batch_size=batch_size, device=device).model \
            if vbench_dino is not None else dino_model.model
        vbench_model = DinoFeatures(source, image_size=dino_image_size, preprocessing="shorter_side",
                                    batch_size=batch_size)
        if vbench_dino is None:
            notes.append("VBench subject consistency uses the --dino model (VBench itself uses DINO ViT-B/16; "
                         "pass --vbench-dino to match it)")
    else:
        notes.append("no --dino model folder: DINOv2 score and VBench subject consistency were not computed")
    if clip is not None:
        clip_model = ClipFeatures.from_pretrained(clip, batch_size=batch_size, device=device)
        vbench_clip_model = clip_model.with_preprocessing("vbench")
    else:
        notes.append("no --clip model folder: CLIP-F, CLIP-T and VBench background consistency were not computed")
    labels = _unique_labels(folder_paths)
    models = {}
    for label, folder in zip(labels, folder_paths):
        models[label] = _evaluate_folder(folder, config, prompts, dino_model, vbench_model, clip_model,
                                         vbench_clip_model, notes, label)
    settings = asdict(config)
    settings.update(dino=str(dino) if dino else None, vbench_dino=str(vbench_dino) if vbench_dino else None,
                    clip=str(clip) if clip else None, dino_image_size=dino_image_size)
    report = _finite({"settings": settings, "notes": notes, "models": models})
    (out / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _write_csv(out / "metrics.csv", models)
    plots = _plot(out, models)
    report["files"] = [str(out / "metrics.json"), str(out / "metrics.csv"), *map(str, plots)]
    return report
