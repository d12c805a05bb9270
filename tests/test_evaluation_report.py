"""`cf evaluate` on two folders of tiny mp4s writes metrics.json, metrics.csv and PNG plots."""

import csv
import json
import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cf.cli import main as cf_main  # noqa: E402
from cf.evaluation.report import EvaluationConfig, evaluate_folders, load_prompts  # noqa: E402
from cf.video_io import encode_mp4, read_video  # noqa: E402
from data.synthetic import make_clip_spec, render_clip  # noqa: E402
from test_evaluation_features import build_tiny_clip, build_tiny_dino, vbench_clip_transform_reference  # noqa: E402

FPS = 8


def write_folder(folder, specs, lose_identities_after=None):
    """One mp4 (+ prompt .txt and ground-truth .json) per spec; optionally paint the sprites over with background."""
    folder.mkdir(parents=True)
    for index, spec in enumerate(specs):
        frames = render_clip(spec)
        if lose_identities_after is not None:
            background = render_clip({**spec, "sprites": []})
            frames[lose_identities_after:] = background[lose_identities_after:]
        (folder / f"clip{index}.mp4").write_bytes(encode_mp4(frames, fps=FPS))
        (folder / f"clip{index}.json").write_text(json.dumps(spec))
        (folder / f"clip{index}.txt").write_text(f"clip number {index}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    # seeds whose sprites leave and come back within the 8 s
    specs = [make_clip_spec(seed, fps=FPS, min_seconds=8.0, max_seconds=8.0, num_sprites=2) for seed in (22, 9)]
    write_folder(root / "model_a", specs)
    write_folder(root / "model_b", specs, lose_identities_after=2 * FPS)
    return root


def naive_vbench_video_score(features: torch.Tensor) -> float:
    """VBench's per-video loop: mean over t >= 1 of (max(0, cos(f_{t-1}, f_t)) + max(0, cos(f_0, f_t))) / 2, x100."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    pairs = [(max(0.0, float(f[t - 1] @ f[t])) + max(0.0, float(f[0] @ f[t]))) / 2 for t in range(1, len(f))]
    return 100 * sum(pairs) / len(pairs)


def clip_image_features(clip_dir, pixel_values: torch.Tensor) -> torch.Tensor:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values.float())
    return out if torch.is_tensor(out) else out.pooler_output


def test_cf_evaluate_writes_json_csv_and_plots(folders, tmp_path):
    dino = build_tiny_dino(tmp_path / "dino")
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "out"
    cf_main(["evaluate", str(folders / "model_a"), str(folders / "model_b"), "--out", str(out), "--dino", str(dino),
             "--clip", str(clip), "--timestamps", "0.5,1,3,3.5,20", "--dino-image-size", "32", "--batch-size", "8"])
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["models"]) == {"model_a", "model_b"}
    summary_a, summary_b = (report["models"][m]["summary"] for m in ("model_a", "model_b"))
    for name in ("dinov2", "clip_f_first_frame", "clip_f_consecutive", "clip_t", "identity_presence",
                 "pixel_first_frame", "gt_background_colour_drift"):
        assert summary_a["windowed"][name]["20"] is None  # beyond the 8 s videos: missing, not 0
        assert summary_a["windowed"][name]["1"] is not None
    assert 0 < summary_a["vbench_subject_consistency"] <= 100
    assert 0 < summary_a["vbench_background_consistency"] <= 100
    # per-video VBench scores; the videos have the same length, so their mean is the folder score
    for model in ("model_a", "model_b"):
        videos = report["models"][model]["videos"]
        summary = report["models"][model]["summary"]
        for name in ("vbench_subject_consistency", "vbench_background_consistency"):
            scores = [videos[stem]["scalars"][name] for stem in ("clip0", "clip1")]
            assert all(0 < score <= 100 for score in scores)
            assert sum(scores) / 2 == pytest.approx(summary[name], abs=1e-4)
    # background consistency = VBench's clip_transform (written out independently) + CLIP + VBench's loop
    frames, _ = read_video(folders / "model_b" / "clip1.mp4")
    reference = naive_vbench_video_score(
        clip_image_features(clip, torch.from_numpy(vbench_clip_transform_reference(frames, 32))))
    background = report["models"]["model_b"]["videos"]["clip1"]["scalars"]["vbench_background_consistency"]
    assert background == pytest.approx(reference, abs=1e-4)
    # model_b loses its sprites at 2 s: identities vanish, ground-truth recall drops
    assert summary_a["windowed"]["identity_presence"]["3.5"] > 0.5  # sprites wander out of view now and then
    assert summary_b["windowed"]["identity_presence"]["3.5"] == pytest.approx(0.0)
    assert summary_b["windowed"]["identity_presence"]["0.5"] == summary_a["windowed"]["identity_presence"]["0.5"]
    assert summary_a["gt_reentry_events"] == summary_b["gt_reentry_events"] == 3
    assert summary_a["gt_identity_recall_anywhere"] == 1.0 and summary_a["gt_identity_recall_at_track"] == 1.0
    assert summary_b["gt_identity_recall_anywhere"] == 0.0
    video = report["models"]["model_a"]["videos"]["clip0"]
    assert set(video["flashbacks"]) == {"pixel", "dinov2", "clip"}
    assert video["scalars"]["num_frames"] == 8 * FPS

    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"model", "video", "metric", "time_s", "value"}
    dino_rows = [r for r in rows if r["model"] == "model_b" and r["video"] == "ALL" and r["metric"] == "dinov2"]
    assert {r["time_s"] for r in dino_rows} == {"0.5", "1", "3", "3.5", "20"}
    assert [r["value"] for r in dino_rows if r["time_s"] == "20"] == [""]
    per_video = [r for r in rows if r["model"] == "model_b" and r["video"] == "clip1"
                 and r["metric"] == "vbench_background_consistency"]
    assert len(per_video) == 1 and float(per_video[0]["value"]) == pytest.approx(background, rel=1e-5)
    plot = out / "identity_presence_vs_time.png"
    assert plot.is_file() and (out / "dinov2_vs_time.png").is_file()
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_without_feature_models_only_pixel_metrics_run(folders, tmp_path):
    config = EvaluationConfig(timestamps=(1.0, 3.0), max_videos=1)
    report = evaluate_folders([folders / "model_a"], tmp_path / "out", config=config)
    assert any("--dino" in note for note in report["notes"]) and any("--clip" in note for note in report["notes"])
    windowed = report["models"]["model_a"]["summary"]["windowed"]
    assert "dinov2" not in windowed and "clip_t" not in windowed
    assert "identity_presence" in windowed and "gt_background_spec_error" in windowed
    assert (tmp_path / "out" / "metrics.csv").is_file()


def test_user_errors_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        evaluate_folders([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.mp4"):
        evaluate_folders([tmp_path / "empty"], tmp_path / "out")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("clip0\ta red square\nbroken line\n")
    with pytest.raises(ValueError, match="stem<TAB>prompt"):
        load_prompts(prompts)
    prompts.write_text("clip0\ta red square\n")
    assert load_prompts(prompts) == {"clip0": "a red square"}


def test_unreadable_videos_are_skipped_counted_and_reported(folders, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("clip0", "clip1"):
        for suffix in (".mp4", ".json", ".txt"):
            (folder / f"{name}{suffix}").write_bytes((folders / "model_a" / f"{name}{suffix}").read_bytes())
    whole = (folder / "clip0.mp4").read_bytes()
    (folder / "clip2.mp4").write_bytes(whole[: len(whole) // 3])  # a write that stopped part way
    (folder / "clip3.mp4").write_bytes(b"not an mp4 at all")
    config = EvaluationConfig(timestamps=(1.0, 3.0))
    report = evaluate_folders([folder], tmp_path / "out", config=config)
    summary = report["models"]["mixed"]["summary"]
    assert summary["num_videos"] == 2 and summary["num_unreadable"] == 2
    assert sorted(summary["unreadable_videos"]) == ["clip2.mp4", "clip3.mp4"]
    assert sorted(report["models"]["mixed"]["videos"]) == ["clip0", "clip1"]
    assert any("2 of 4 videos are unreadable and were skipped: clip2.mp4" in note for note in report["notes"])
    alone = evaluate_folders([folders / "model_a"], tmp_path / "alone", config=config)
    assert summary["windowed"] == alone["models"]["model_a"]["summary"]["windowed"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["models"]["mixed"]["summary"]["num_unreadable"] == 2

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.mp4").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"no readable video in .*broken: all 1 \*\.mp4 files failed to decode"):
        evaluate_folders([broken], tmp_path / "out2", config=config)
