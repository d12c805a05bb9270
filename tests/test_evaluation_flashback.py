"""Flashback detector: planted resets are found at the right frame; declines and noise stay quiet."""

import pytest
import torch

from cf.evaluation.flashback import detect_flashbacks, moving_average

FPS = 16


def declining(num_frames, start=1.0, end=0.7):
    return torch.linspace(start, end, num_frames)


def test_moving_average_matches_naive_window():
    x = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0])
    expected = [(1 + 4) / 2, (1 + 4 + 2) / 3, (4 + 2 + 8) / 3, (2 + 8 + 5) / 3, (8 + 5) / 2]
    assert torch.allclose(moving_average(x, 3).float(), torch.tensor(expected))
    expected4 = [(1 + 4) / 2, (1 + 4 + 2) / 3, (1 + 4 + 2 + 8) / 4, (4 + 2 + 8 + 5) / 4, (2 + 8 + 5) / 3]  # [k-2, k+1]
    assert torch.allclose(moving_average(x, 4).float(), torch.tensor(expected4))


def test_planted_reset_is_found_at_its_frame():
    reset = 400
    curve = torch.cat([declining(reset), declining(480, 0.97, 0.8)])
    events = detect_flashbacks(curve, FPS)
    assert len(events) == 1
    event = events[0]
    assert event.frame == reset
    assert event.time_s == pytest.approx(reset / FPS)
    assert event.strength == pytest.approx(0.97 - 0.7, abs=0.02)
    assert event.prior_decline == pytest.approx(0.3, abs=0.02)
    assert event.recovery == pytest.approx(0.9, abs=0.1)
    assert event.start_frame < reset <= event.end_frame


def test_two_resets_in_noise():
    generator = torch.Generator().manual_seed(1)
    curve = torch.cat([declining(300), declining(300, 1.0, 0.75), declining(300, 0.98, 0.8)])
    curve = curve + 0.01 * torch.randn(curve.shape[0], generator=generator)
    frames = [e.frame for e in detect_flashbacks(curve, FPS)]
    assert len(frames) == 2
    assert abs(frames[0] - 300) <= 1 and abs(frames[1] - 600) <= 1


@pytest.mark.parametrize("shape", ["linear", "exponential"])
def test_quiet_on_smooth_monotone_decline(shape):
    t = torch.arange(960, dtype=torch.float32)
    curve = 1 - 0.4 * t / 960 if shape == "linear" else 0.6 + 0.4 * torch.exp(-t / 200)
    assert detect_flashbacks(curve, FPS) == []


def test_quiet_on_noise():
    generator = torch.Generator().manual_seed(0)
    flat = 0.85 + 0.02 * torch.randn(960, generator=generator)
    drifting = declining(960, 1.0, 0.6) + 0.02 * torch.randn(960, generator=generator)
    assert detect_flashbacks(flat, FPS) == []
    assert detect_flashbacks(drifting, FPS) == []


def test_slow_return_is_not_sudden():
    curve = torch.cat([declining(320, 1.0, 0.7), declining(160, 0.7, 0.95)])  # back up over 10 s
    assert detect_flashbacks(curve, FPS) == []
    assert len(detect_flashbacks(curve, FPS, max_rise_s=12.0)) == 1


def test_invalid_parameters_are_explained():
    with pytest.raises(ValueError, match="smoothing window"):
        detect_flashbacks(declining(100), FPS, smoothing_s=1.0, max_rise_s=0.5)
    with pytest.raises(ValueError, match=r"\[T\]"):
        detect_flashbacks(torch.zeros(3, 2), FPS)
