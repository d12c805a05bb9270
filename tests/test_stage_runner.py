"""The pipeline runner's stage log: kept on disk across a resumed run, wall time counts side-by-side stages once,
and parallel stages run independently with their own logs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cf.stage_runner import StageLog, run_stages_parallel


def test_stage_log_survives_a_restart_and_replaces_a_rerun_stage(tmp_path) -> None:
    log = StageLog(tmp_path / "stages.json")
    log.append({"stage": "teacher", "seconds": 5.0, "command": "cf fit a"})
    log.append({"stage": "student", "seconds": 3.0, "command": "cf fit b"})
    resumed = StageLog(tmp_path / "stages.json")
    assert [r["stage"] for r in resumed] == ["teacher", "student"]
    resumed.append({"stage": "student", "seconds": 4.0, "command": "cf fit b"})
    assert [(r["stage"], r["seconds"]) for r in StageLog(tmp_path / "stages.json")] == [("teacher", 5.0),
                                                                                       ("student", 4.0)]


def test_wall_seconds_is_the_length_of_the_union_of_the_stage_intervals(tmp_path) -> None:
    log = StageLog(tmp_path / "stages.json")
    for stage, start, seconds in (("a", 0, 10), ("b", 10, 5), ("c", 15, 20), ("d", 15, 12), ("e", 27, 10),
                                  ("f", 100, 1)):
        log.append({"stage": stage, "seconds": float(seconds), "command": "", "started_at": float(start)})
    # [0, 10] + [10, 15] + [15, 37] (c, d and e overlap) + [100, 101]
    assert log.wall_seconds() == pytest.approx(10 + 5 + 22 + 1)


def test_parallel_stages_all_run_and_a_failure_is_raised_after_the_others(tmp_path) -> None:
    log = StageLog(tmp_path / "stages.json")
    ok = [sys.executable, "-c", "import time; time.sleep(1.0); print('fine')"]  # ends after `bad` fails
    bad = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(subprocess.CalledProcessError):
        run_stages_parallel([(ok, "one"), (bad, "two"), (ok, "three")], {"CF_RUNS": str(tmp_path)}, log, workers=2)
    assert {r["stage"] for r in log} == {"one"}  # "three" never started after "two" failed; "one" finished
    assert (tmp_path / "one.log").read_text().strip() == "fine"
    run_stages_parallel([(ok, "a (x)"), (ok, "b")], {"CF_RUNS": str(tmp_path)}, log, workers=2)
    assert {r["stage"] for r in log} == {"one", "a (x)", "b"}
