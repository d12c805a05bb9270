"""What the demo reports: windows, ratios to the dataset, the claim table's statistics, teacher-continuation PSNR,
and the scores of the synthetic world's own clips (the level a perfect generator reaches)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from cf.demo_report import DemoPrompt, _windowed, claim_table, demo_prompts, score_video, summarize_models
from cf.evaluation.continuation import all_attributes, continuation_psnr
from data.synthetic import caption_for, make_clip_spec, render_clip


def test_windows_average_consecutive_seconds_and_drop_a_short_tail() -> None:
    curve = list(range(33))  # 33 frames at 16 fps, 1 s windows: [0..15], [16..31], and 1 frame (dropped)
    assert _windowed(curve, fps=16, seconds=1.0) == [7.5, 23.5]
    assert _windowed([1.0, float("nan"), 3.0, float("nan")], fps=1, seconds=2.0) == [1.0, 3.0]
    assert _windowed([float("nan")] * 4, fps=1, seconds=2.0) == [None, None]


def test_continuation_psnr_is_the_closed_form() -> None:
    truth = np.zeros((2, 4, 4, 3), np.uint8)
    generated = truth.copy()
    generated[0, 0, 0, 0] = 96  # MSE = 96^2 / 96 values = 96
    assert continuation_psnr(generated, truth) == pytest.approx(10 * np.log10(255**2 / 96))
    assert continuation_psnr(truth, truth) == float("inf")


def _row(kind: str, **values) -> dict:
    reentry = {"explained_after_reentry": values.pop("after", None), "explained_before_exit": values.pop("before", None),
               "num_reentries": 1, "num_exits": 1, "explained_per_second": [0.5, 1.0]}
    return {"kind": kind, "reentry": reentry, **values}


def test_summary_ratios_divide_by_the_dataset() -> None:
    scores = {
        "dataset": [_row("named", background_coverage=0.8, sprite_presence=0.5), _row("unnamed", after=1.0)],
        "model": [_row("named", background_coverage=0.6, sprite_presence=0.1),
                  _row("named", background_coverage=0.2, sprite_presence=0.3), _row("unnamed", after=0.25),
                  _row("unnamed", after=None, background_drift_late=4.0)],
    }
    summary = summarize_models(scores)
    assert summary["model"]["named_background"] == pytest.approx(0.4)
    assert summary["model"]["named_background_ratio"] == pytest.approx(0.5)
    assert summary["model"]["named_sprite_ratio"] == pytest.approx(0.4)
    assert summary["model"]["unnamed_explained_after_reentry"] == pytest.approx(0.25)  # None is no event, not 0
    assert summary["model"]["unnamed_background_drift_late"] == pytest.approx(4.0)
    assert summary["dataset"]["named_background_ratio"] == pytest.approx(1.0)


def test_claim_table_reports_mean_and_sample_std_and_the_paired_difference() -> None:
    after = {"context_forcing": [0.9, 0.8, 0.7], "sliding_window": [0.2, 0.4, 0.3]}
    runs = {seed: {m: {"unnamed_explained_after_reentry": v[i]} for m, v in after.items()} for i, seed in
            enumerate((0, 1, 2))}
    table = claim_table(runs, ["context_forcing", "sliding_window"])
    row = next(line for line in table.splitlines() if "after re-entry" in line)
    cf, sw = after["context_forcing"], after["sliding_window"]
    assert f"{statistics.mean(cf):.3f} ± {statistics.stdev(cf):.3f} (n=3)" in row
    assert f"{statistics.mean(sw):.3f} ± {statistics.stdev(sw):.3f} (n=3)" in row
    assert "+0.700, +0.400, +0.400 (mean +0.500)" in row
    assert f"yes: |0.500| vs {max(statistics.stdev(cf), statistics.stdev(sw)):.3f}" in row
    close = {s: {"context_forcing": {"unnamed_explained_after_reentry": 0.5 + d},
                 "sliding_window": {"unnamed_explained_after_reentry": 0.5}} for s, d in ((0, 0.1), (1, -0.1), (2, 0.05))}
    assert "| no: " in next(line for line in claim_table(close, ["context_forcing", "sliding_window"]).splitlines()
                            if "after re-entry" in line)


def test_each_held_out_clip_gives_its_named_and_its_unnamed_prompt() -> None:
    spec = make_clip_spec(3, min_seconds=2, max_seconds=2)
    prompts = demo_prompts([{"gt": {**spec, "caption": {"names": []}}, "frames": None}])
    assert [(p.kind, p.text, p.name) for p in prompts] == [("named", caption_for(spec), "c00_named"),
                                                           ("unnamed", caption_for(spec, named=False), "c00_unnamed")]
    assert prompts[0].gt == all_attributes(spec)  # scored against every attribute, whatever the clip's caption named


def test_the_worlds_own_clip_scores_at_the_top_and_a_recoloured_one_drifts() -> None:
    spec = make_clip_spec(11, min_seconds=12, max_seconds=12)
    frames = render_clip(spec)
    named = DemoPrompt(0, "named", caption_for(spec), all_attributes(spec), "c00_named")
    own = score_video(frames, named, fps=16)
    assert own["background_coverage"] > 0.85
    assert own["background_drift_late"] < 10  # RGB distance: the background never changes
    assert len(own["background_coverage_windows"]) == 1  # 12 s: one full window, the 2 s tail dropped
    shifted = frames.copy()
    shifted[16 * 6 :] = np.clip(shifted[16 * 6 :].astype(int) + 60, 0, 255).astype(np.uint8)  # after 6 s: brighter
    moved = score_video(shifted, DemoPrompt(0, "unnamed", caption_for(spec, False), all_attributes(spec), "x"), 16)
    assert moved["background_drift_late"] > 60  # every background pixel moved by (60, 60, 60): about 104 in RGB
    assert "background_coverage" not in moved  # unnamed prompts name no colour


def test_a_reset_to_the_first_frames_counts_as_one_flashback() -> None:
    spec = make_clip_spec(11, min_seconds=12, max_seconds=12)
    frames = render_clip(spec)
    prompt = DemoPrompt(0, "named", caption_for(spec), all_attributes(spec), "c00_named")
    assert score_video(frames, prompt, fps=16)["flashbacks"] == 0  # sprites wander; nothing resets
    reset = frames.copy().astype(int)
    ramp = np.linspace(0, 90, 16 * 4)[:, None, None, None]  # 2-6 s: the picture brightens steadily ...
    reset[32:96] = reset[32:96] + ramp
    reset[96:] = frames[:len(frames) - 96]  # ... and at 6 s the video jumps back to its first frames
    result = score_video(np.clip(reset, 0, 255).astype(np.uint8), prompt, fps=16)
    assert result["flashbacks"] == 1


def test_the_autoencoded_reference_is_the_clip_through_the_toy_autoencoder() -> None:
    """Flat 8x8 colour patches held over each latent's frames survive the toy autoencoder exactly; detail inside a
    patch (a one-pixel dot) is averaged away; the length is cut to 1 + 4k frames."""
    from cf.demo_report import autoencoded
    from cf.encoders import ToyAutoencoder

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8)  # 4 latents of 4 x 4 patches
    per_frame = np.concatenate([colours[:1], np.repeat(colours[1:], 4, axis=0)])  # 13 frames
    clip = per_frame.repeat(8, axis=1).repeat(8, axis=2)
    ae = ToyAutoencoder()
    assert np.array_equal(autoencoded(np.concatenate([clip, clip[-2:]]), ae), clip)  # 15 frames -> 13
    dotted = clip.copy()
    dotted[:, 3, 3] = 255 - dotted[:, 3, 3]
    assert not np.array_equal(autoencoded(dotted, ae)[:, 3, 3], dotted[:, 3, 3])


def test_settled_drift_skips_a_first_second_unlike_the_rest_and_counts_a_later_change() -> None:
    """A generator's first chunk may differ from the background it then keeps: the drift from the first second
    counts that, the drift from the background at 5 s does not; a change after 10 s counts in both."""
    spec = make_clip_spec(11, min_seconds=20, max_seconds=20)
    frames = render_clip(spec)
    prompt = DemoPrompt(0, "unnamed", caption_for(spec, False), all_attributes(spec), "c00_unnamed")
    steady = score_video(frames, prompt, fps=16)
    assert steady["background_drift_late"] < 10 and steady["background_drift_settled"] < 10
    odd_start = frames.copy()
    odd_start[:16] = 255 - odd_start[:16]  # the first second in negative colours, then the clip as it was
    first = score_video(odd_start, prompt, fps=16)
    assert first["background_drift_late"] > 60 and first["background_drift_settled"] < 10
    later = frames.copy()
    later[16 * 12:] = np.clip(later[16 * 12:].astype(int) + 60, 0, 255).astype(np.uint8)  # brighter after 12 s
    moved = score_video(later, prompt, fps=16)
    assert moved["background_drift_late"] > 60 and moved["background_drift_settled"] > 60
    assert score_video(frames[: 16 * 9], prompt, fps=16)["background_drift_settled"] is None  # ends before 10 s
