"""The README's main command, in its quick form: the whole toy pipeline runs and writes a complete report."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_writes_report_with_tables_strips_plots_and_videos(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "cf", "demo", "--quick", "--ablation", "--out", str(out)],
                            capture_output=True, text=True, timeout=1500, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out / "report.md"
    assert f"report: {report}" in result.stdout
    text = report.read_text()
    assert "| model | videos | background / dataset |" in text
    assert "before and after ERFT" in text and "| base |" in text and "| teacher |" in text
    selection = json.loads((out / "teacher" / "selection.json").read_text())
    assert f"The teacher is the ERFT checkpoint of step {selection['step']}" in text
    assert selection["step"] == 20 and [row["step"] for row in selection["rows"]] == [20]  # --quick: 20 steps
    for png in [*(out / "plots").glob("*.png"), *(out / "strips").glob("*.png")]:
        assert png.relative_to(out).as_posix() in text
    assert {p.stem for p in (out / "strips").glob("*.png")} == {"dataset", "dataset_autoencoded", "context_forcing",
                                                               "sliding_window", "no_contextual_dmd"}
    for model in ("context_forcing", "sliding_window", "no_contextual_dmd"):
        videos = sorted((out / "videos" / model).glob("*.mp4"))
        assert [v.stem for v in videos] == ["c00_named", "c00_unnamed"] and all(v.name in text for v in videos)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["dataset"]["named_background_ratio"] == pytest.approx(1.0)
    assert summary["models"]["dataset_autoencoded"]["videos"] == summary["models"]["dataset"]["videos"]
    for weights in ("teacher/teacher.safetensors", "student_stage0/generator.safetensors",
                    "student_stage1/generator.safetensors", "student_stage2/generator.safetensors",
                    "baseline_stage2/generator.safetensors"):
        assert (out / weights).exists(), weights
