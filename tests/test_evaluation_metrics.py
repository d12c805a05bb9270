"""Metric formulas against hand-computed values on fixed 2-D feature vectors, and naive re-implementations."""

import math

import pytest
import torch

from cf.evaluation.metrics import (
    VBenchConsistency,
    WindowedScore,
    clip_text_score,
    pixel_similarity_to_first_frame,
    vbench_consistency,
    vbench_frame_scores,
    vbench_video_consistency,
    window_frame_indices,
    windowed_clip_t_score,
    windowed_consecutive_frame_score,
    windowed_first_frame_score,
)


def unit(angles):
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=-1).float()


def with_first_frame_cosines(cosines):
    c = torch.tensor(cosines)
    return torch.stack([c, (1 - c**2).sqrt()], dim=-1)


def test_window_indices_at_16_fps_and_edges():
    assert window_frame_indices(10.0, 16, 2000) == range(152, 168)  # 16 frames, [9.5 s, 10.5 s)
    assert window_frame_indices(10.0, 16, 160) == range(152, 160)  # half the window inside: kept
    assert window_frame_indices(10.0, 16, 159) is None  # less than half inside: missing
    assert window_frame_indices(10.0, 16, 159, min_coverage=0.25) == range(152, 159)
    assert window_frame_indices(20.0, 16, 160) is None  # beyond the video
    assert window_frame_indices(0.0, 16, 100) == range(0, 8)
    with pytest.raises(ValueError, match="fps"):
        window_frame_indices(1.0, 0, 10)


def test_first_frame_score_by_hand_without_clipping():
    features = with_first_frame_cosines([1.0, 0.8, 0.6, -0.2, 0.4])  # fps 2: frame k at k/2 s
    scores = windowed_first_frame_score(features, fps=2, timestamps=(1.0, 2.0, 2.5, 5.0))
    assert scores[1.0] == pytest.approx(70.0, abs=1e-4)  # frames 1, 2
    assert scores[2.0] == pytest.approx(10.0, abs=1e-4)  # frames 3, 4: the negative cosine is kept
    assert scores[2.5] == pytest.approx(40.0, abs=1e-4)  # frames 4, (5): half inside
    assert scores[5.0] is None  # missing, not zero
    assert windowed_first_frame_score(features, 2, (2.5,), min_coverage=0.75)[2.5] is None


def test_consecutive_frame_variant_by_hand():
    angles = [0.0, 0.3, 0.5, 1.2, 1.0]
    scores = windowed_consecutive_frame_score(unit(angles), fps=2, timestamps=(0.25, 1.0, 2.0))
    assert scores[1.0] == pytest.approx(50 * (math.cos(0.3) + math.cos(0.2)), abs=1e-4)
    assert scores[2.0] == pytest.approx(50 * (math.cos(0.7) + math.cos(0.2)), abs=1e-4)
    assert scores[0.25] == pytest.approx(100 * math.cos(0.3), abs=1e-4)  # frame 0 has no predecessor


def test_clip_t_clamps_negative_cosines():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([2.0, 0.0])  # not normalised on purpose
    assert torch.allclose(clip_text_score(image, text), torch.tensor([100.0, 0.0, 0.0, 60.0]))
    scores = windowed_clip_t_score(image, text, fps=1, timestamps=(1.0, 2.5), half_width=1.0)
    assert scores[1.0] == pytest.approx(50.0)  # frames 0, 1: (100 + 0) / 2
    assert scores[2.5] == pytest.approx(30.0)  # frames 2, 3: (0 + 60) / 2
    with pytest.raises(ValueError, match="dim"):
        clip_text_score(image, torch.ones(3))


def test_vbench_clipping_and_frame_weighting_over_two_videos():
    video_a = unit([0.0, math.pi / 3, math.pi])  # s_2 = 0.5; s_3 = 0 (both cosines negative, clipped)
    video_b = unit([0.0, 0.0])  # s_2 = 1
    assert torch.allclose(vbench_frame_scores(video_a), torch.tensor([0.5, 0.0]), atol=1e-6)
    assert vbench_consistency([video_a, video_b]) == pytest.approx(100 * 1.5 / 3, abs=1e-4)  # not (25 + 100) / 2

    rank0, rank1 = VBenchConsistency(), VBenchConsistency()
    rank0.update(video_a)
    rank1.update(video_b)
    rank0.merge_state(rank1)  # what the cross-rank sum reduction does
    assert float(rank0.compute()) == pytest.approx(50.0, abs=1e-4)
    assert vbench_video_consistency(video_a) == pytest.approx(25.0, abs=1e-4)
    assert vbench_video_consistency(video_b) == pytest.approx(100.0, abs=1e-4)
    assert math.isnan(vbench_video_consistency(unit([0.3])))  # no frame pair: no score


def test_vbench_matches_naive_loop_on_random_features():
    generator = torch.Generator().manual_seed(0)
    videos = [torch.randn(n, 8, generator=generator) for n in (4, 9, 2)]
    total, pairs, per_video = 0.0, 0, []
    for f in videos:
        f = f / f.norm(dim=-1, keepdim=True)
        video_total = 0.0
        for t in range(1, f.shape[0]):
            video_total += 0.5 * (max(0.0, float(f[0] @ f[t])) + max(0.0, float(f[t - 1] @ f[t])))
        per_video.append(100 * video_total / (f.shape[0] - 1))
        total, pairs = total + video_total, pairs + f.shape[0] - 1
    assert vbench_consistency(videos) == pytest.approx(100 * total / pairs, rel=1e-5)
    assert [vbench_video_consistency(f) for f in videos] == pytest.approx(per_video, rel=1e-5)
    # the folder score is the mean of the per-video scores weighted by their frame pairs
    weights = [f.shape[0] - 1 for f in videos]
    weighted = sum(w * s for w, s in zip(weights, per_video)) / sum(weights)
    assert vbench_consistency(videos) == pytest.approx(weighted, rel=1e-5)


def test_windowed_score_averages_videos_that_reach_the_timestamp():
    metric = WindowedScore(timestamps=(10.0, 20.0, 30.0))
    metric.update({10.0: 90.0, 20.0: 80.0, 30.0: None})
    metric.update({10.0: 70.0, 20.0: None, 30.0: None})
    assert metric.compute_dict() == {10.0: pytest.approx(80.0), 20.0: pytest.approx(80.0), 30.0: None}


def test_pixel_similarity_curve():
    frames = torch.zeros(3, 3, 4, 4)
    frames[1] = 0.5
    frames[2, 0] = 1.0
    assert torch.allclose(pixel_similarity_to_first_frame(frames), torch.tensor([1.0, 0.5, 2 / 3]))
