"""Per-segment evaluation of prompt-schedule videos (`cf.evaluation.segments`): the segments' pixel frames follow
the decode timeline, each segment is scored as a video of its own against its own prompt, and `cf evaluate` picks
up the ``.segments.json`` that `cf generate` writes."""

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cf.cli import main  # noqa: E402
from cf.evaluation.features import ClipFeatures  # noqa: E402
from cf.evaluation.metrics import clip_text_score  # noqa: E402
from cf.evaluation.prompted import prompt_fidelity  # noqa: E402
from cf.evaluation.report import EvaluationConfig, evaluate_folders  # noqa: E402
from cf.evaluation.segments import (  # noqa: E402
    VideoSegment,
    read_segments,
    schedule_segments,
    segment_metrics,
    segment_timestamps,
    write_segments,
)
from cf.video_io import encode_mp4, read_video  # noqa: E402
from data.synthetic import make_clip_spec, render_clip  # noqa: E402
from test_evaluation_features import build_tiny_clip  # noqa: E402

FPS = 16


def test_segments_follow_the_decode_timeline():
    # latents 0 | 42 | 123 of 126: latent f > 0 starts at pixel 1 + 4 (f - 1); the video has 1 + 4 * 125 frames
    segments = schedule_segments(["a", "b", "c"], [0, 42, 123], 126)
    assert [(s.start_frame, s.end_frame) for s in segments] == [(0, 165), (165, 489), (489, 501)]
    with pytest.raises(ValueError, match="segment starts must begin at 0, increase"):
        schedule_segments(["a", "b"], [0, 0], 6)


def test_segments_file_round_trip_and_errors(tmp_path):
    (tmp_path / "truth.json").write_text("{}")
    segments = [VideoSegment("a", 0, 33), VideoSegment("b", 33, 65, "truth.json")]
    write_segments(tmp_path / "v.segments.json", segments, FPS)
    data = json.loads((tmp_path / "v.segments.json").read_text())
    assert data["segments"][1]["start_s"] == 33 / FPS and data["fps"] == FPS
    back = read_segments(tmp_path / "v.segments.json")
    assert back[0] == segments[0] and back[1].ground_truth == str(tmp_path / "truth.json")
    (tmp_path / "gap.segments.json").write_text(json.dumps({"segments": [
        {"prompt": "a", "start_frame": 0, "end_frame": 10}, {"prompt": "b", "start_frame": 12, "end_frame": 20}]}))
    with pytest.raises(ValueError, match=r"tile the video without gaps, got \[\(0, 10\), \(12, 20\)\]"):
        read_segments(tmp_path / "gap.segments.json")
    (tmp_path / "bad.segments.json").write_text('{"segs": []}')
    with pytest.raises(ValueError, match="is not a segments file"):
        read_segments(tmp_path / "bad.segments.json")


def test_segment_timestamps():
    assert segment_timestamps(3.0, 1.0) == (1.0, 2.0, 3.0)
    assert segment_timestamps(2.5, 1.0) == (1.0, 2.0)
    with pytest.raises(ValueError, match="positive"):
        segment_timestamps(2.0, 0.0)


def two_colour_video(frames_each: int = 3 * FPS) -> torch.Tensor:
    """Float [T, 3, 8, 8]: a red segment, then a blue one, each with a little per-frame noise."""
    g = torch.Generator().manual_seed(0)
    red = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1).expand(frames_each, 3, 8, 8)
    blue = torch.tensor([0.1, 0.1, 0.9]).view(1, 3, 1, 1).expand(frames_each, 3, 8, 8)
    return (torch.cat([red, blue]) + 0.01 * torch.rand(2 * frames_each, 3, 8, 8, generator=g)).clamp(0, 1)


def test_each_segment_is_scored_against_its_own_first_frame_and_prompt():
    video = two_colour_video()
    n = video.shape[0] // 2
    segments = [VideoSegment("red", 0, n), VideoSegment("blue", n, 2 * n)]
    # a colour "feature" per frame and a colour per prompt: CLIP-T is 100 max(cos, 0) by hand
    features = {"clip": torch.nn.functional.normalize(video.mean(dim=(2, 3)), dim=-1)}
    words = {"red": torch.tensor([1.0, 0.0, 0.0]), "blue": torch.tensor([0.0, 0.0, 1.0])}
    rows = segment_metrics(video, FPS, segments, features=features,
                           text_features=lambda prompts: torch.stack([words[p] for p in prompts]))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[1]["start_s"] == 3.0 and rows[1]["timestamps"] == [1.0, 2.0, 3.0]
    for row, start in zip(rows, (0, n)):
        part = video[start:start + n]
        by_hand = 100 * (1 - (part - part[:1]).abs().mean(dim=(1, 2, 3)))
        assert row["curves"]["pixel_first_frame"]["mean"] == pytest.approx(float(by_hand.mean()), abs=1e-4)
        # the window at 1 s is frames 8..23 of the segment
        assert row["curves"]["pixel_first_frame"]["windowed"][1.0] == pytest.approx(float(by_hand[8:24].mean()),
                                                                                     abs=1e-4)
        own = words[row["prompt"]]
        expected = 100 * (features["clip"][start:start + n] @ own).clamp(min=0)
        assert row["curves"]["clip_t"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-3)
    # the blue segment matches its own prompt far better than the previous one; the red one has no previous
    assert rows[1]["curves"]["clip_t"]["mean"] > 90 > 20 > rows[1]["curves"]["clip_t_previous_prompt"]["mean"]
    assert "clip_t_previous_prompt" not in rows[0]["curves"]
    # against the first frame of the whole video, the blue part would score far lower: segments are separate
    whole = 100 * (1 - (video[n:] - video[:1]).abs().mean(dim=(1, 2, 3)))
    assert float(whole.mean()) < 60 < rows[1]["curves"]["pixel_first_frame"]["mean"]


def test_a_segment_past_the_end_of_a_cut_video_is_reported_not_scored():
    video = two_colour_video()
    rows = segment_metrics(video[:40], FPS, [VideoSegment("red", 0, 48), VideoSegment("blue", 48, 96)])
    assert rows[0]["status"] == "ok" and rows[0]["end_frame"] == 40
    assert rows[1]["status"].startswith("skipped: the video has 40 frames")


def test_prompt_fidelity_per_segment_uses_each_segments_ground_truth(tmp_path):
    specs = [make_clip_spec(seed, fps=FPS, min_seconds=2.0, max_seconds=2.0, num_sprites=1) for seed in (3, 11)]
    clips = [render_clip(spec) for spec in specs]
    for index, spec in enumerate(specs):
        (tmp_path / f"gt{index}.json").write_text(json.dumps(spec))
    video = torch.from_numpy(np.concatenate(clips)).permute(0, 3, 1, 2).float() / 255
    n = clips[0].shape[0]
    own = [VideoSegment("a", 0, n, str(tmp_path / "gt0.json")), VideoSegment("b", n, 2 * n, str(tmp_path / "gt1.json"))]
    swapped = [VideoSegment("a", 0, n, str(tmp_path / "gt1.json")), VideoSegment("b", n, 2 * n, str(tmp_path / "gt0.json"))]
    rows = segment_metrics(video, FPS, own)
    for row, clip, spec in zip(rows, clips, specs):
        alone = prompt_fidelity(clip, spec)
        assert row["curves"]["background_coverage"]["mean"] == pytest.approx(alone["background_coverage"], abs=1e-5)
        assert row["curves"]["background_coverage"]["mean"] > 0.8
    wrong = segment_metrics(video, FPS, swapped)
    assert all(r["curves"]["background_coverage"]["mean"] < 0.2 for r in wrong)


def test_cf_evaluate_scores_the_segments_of_a_scheduled_video(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    video = (two_colour_video(2 * FPS).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    video = np.ascontiguousarray(np.repeat(np.repeat(video, 4, axis=1), 4, axis=2))  # 32 x 32 frames
    (folder / "v.mp4").write_bytes(encode_mp4(video, fps=FPS, lossless=True))
    (folder / "v.txt").write_text("a red square[2s] | a blue square[2s]\n")
    write_segments(folder / "v.segments.json", [VideoSegment("a red square", 0, 2 * FPS),
                                                VideoSegment("a blue square", 2 * FPS, 4 * FPS)], FPS)
    (folder / "plain.mp4").write_bytes(encode_mp4(video, fps=FPS, lossless=True))
    clip_folder = build_tiny_clip(tmp_path / "clip")
    results = evaluate_folders([folder], tmp_path / "out", config=EvaluationConfig(timestamps=(1.0, 3.0)),
                               clip=clip_folder, batch_size=8)
    clip = ClipFeatures.from_pretrained(clip_folder, batch_size=8)
    model = results["models"]["model"]
    assert "segments" not in model["videos"]["plain"]
    rows = model["videos"]["v"]["segments"]
    decoded, _ = read_video(folder / "v.mp4")
    features = clip.image_features(decoded)
    for row, prompt, start in zip(rows, ("a red square", "a blue square"), (0, 2 * FPS)):
        expected = clip_text_score(features[start:start + 2 * FPS], clip.text_features([prompt])[0]).mean()
        assert row["curves"]["clip_t"]["mean"] == pytest.approx(float(expected), abs=1e-3)
    summary = model["summary"]["segments"]
    assert [s["videos"] for s in summary] == [1, 1]
    assert summary[1]["means"]["clip_t"] == pytest.approx(rows[1]["curves"]["clip_t"]["mean"])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["models"]["model"]["videos"]["v"]["segments"][1]["prompt"] == "a blue square"


def test_cf_generate_writes_segments_where_the_video_changes(tmp_path):
    """The schedule's second segment starts exactly at the first frame that differs from the one-prompt video."""
    common = ["--device", "cpu", "--seed", "0", "--lossless"]
    main(["generate", "--prompt", "a red circle", "--seconds", "2", "--out", str(tmp_path / "plain"), *common])
    main(["generate", "--prompt-schedule", "a red circle[1s] | a blue square[1s]", "--out", str(tmp_path / "switch"),
          *common])
    plain, _ = read_video(next((tmp_path / "plain").glob("*.mp4")))
    switch, _ = read_video(next((tmp_path / "switch").glob("*.mp4")))
    assert not list((tmp_path / "plain").glob("*.segments.json"))
    segments = read_segments(next((tmp_path / "switch").glob("*.segments.json")))
    assert [s.prompt for s in segments] == ["a red circle", "a blue square"]
    assert segments[-1].end_frame == switch.shape[0] == plain.shape[0]
    differs = np.flatnonzero([(a != b).any() for a, b in zip(plain, switch)])
    assert differs.size and differs[0] == segments[1].start_frame
