"""The README's main command, in its quick form: the whole toy pipeline runs and writes a complete report."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_writes_report_with_tables_plots_and_videos(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "cf", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=1500, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out / "report.md"
    assert f"report: {report}" in result.stdout
    text = report.read_text()
    assert "| model |" in text and "identity_presence" in text
    plots = sorted((out / "evaluation").glob("*.png"))
    assert plots and all(f"evaluation/{p.name}" in text for p in plots)
    for folder in ("context_forcing", "sliding"):
        videos = sorted((out / "videos" / folder).glob("*.mp4"))
        assert len(videos) == 2 and all(v.name in text for v in videos)
    for weights in ("teacher/teacher.safetensors", "student_stage1/generator.safetensors",
                    "student_stage2/generator.safetensors", "baseline_stage2/generator.safetensors"):
        assert (out / weights).exists(), weights
