"""Long-video evaluation: feature extractors, windowed / VBench metrics, flashback detector, pixel-level
ground-truth metrics for the synthetic dataset, and the `cf evaluate` report."""

from cf.evaluation.features import ClipFeatures, DinoFeatures, FrameFeatures
from cf.evaluation.flashback import FlashbackEvent, detect_flashbacks
from cf.evaluation.ground_truth import ColourMatching, ground_truth_metrics, reference_free_metrics
from cf.evaluation.metrics import (
    DEFAULT_TIMESTAMPS,
    VBenchConsistency,
    WindowedScore,
    clip_text_score,
    consecutive_frame_similarity,
    similarity_to_first_frame,
    vbench_consistency,
    vbench_frame_scores,
    window_frame_indices,
    windowed_clip_t_score,
    windowed_consecutive_frame_score,
    windowed_first_frame_score,
    windowed_mean,
)
from cf.evaluation.reentry import reentry_consistency
from cf.evaluation.report import EvaluationConfig, evaluate_folders, evaluate_video

__all__ = [
    "ClipFeatures", "DinoFeatures", "FrameFeatures", "FlashbackEvent", "detect_flashbacks", "ColourMatching",
    "ground_truth_metrics", "reference_free_metrics", "DEFAULT_TIMESTAMPS", "VBenchConsistency", "WindowedScore",
    "clip_text_score", "consecutive_frame_similarity", "similarity_to_first_frame", "vbench_consistency",
    "vbench_frame_scores", "window_frame_indices", "windowed_clip_t_score", "windowed_consecutive_frame_score",
    "windowed_first_frame_score", "windowed_mean", "reentry_consistency", "EvaluationConfig", "evaluate_folders",
    "evaluate_video",
]
