"""Resuming: `--ckpt_path last` finds the run's newest checkpoint across version folders (or fails clearly), and a
checkpoint resumes only into the module and settings that wrote it."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch
from test_configs_student import SHRINK, toy_env  # noqa: F401  (fixture)

from cf.lit.arguments import MODULE_KEY, check_resumed_settings
from cf.lightning_cli import find_last_checkpoint, run_lightning_cli


def test_find_last_checkpoint_picks_the_newest_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="no last.ckpt below"):
        find_last_checkpoint(tmp_path)
    old = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "version_3" / "checkpoints" / "last.ckpt"
    for path, age in ((new, 10), (old, 100)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))
    (tmp_path / "version_4" / "checkpoints").mkdir(parents=True)  # a newer run that saved nothing yet
    assert find_last_checkpoint(tmp_path) == new


def test_settings_and_module_class_must_match():
    class Student:
        hparams = {"scores": {"guidance_scale": 5.0}, "lr": (1, 2)}

    module = Student()
    check_resumed_settings(module, {"hyper_parameters": {"scores": {"guidance_scale": 5.0}, "lr": [1, 2]}})
    with pytest.raises(ValueError, match=r"scores: checkpoint \{'guidance_scale': 5.0\} vs config "
                                         r"\{'guidance_scale': 1.5\}"):
        module.hparams = {"scores": {"guidance_scale": 1.5}, "lr": (1, 2)}
        check_resumed_settings(module, {"hyper_parameters": {"scores": {"guidance_scale": 5.0}, "lr": [1, 2]}})
    with pytest.raises(ValueError, match="written by TeacherERFT, but the config builds Student"):
        check_resumed_settings(module, {MODULE_KEY: "TeacherERFT", "hyper_parameters": {}})


def test_ckpt_path_last_resumes_across_versions_and_changed_settings_are_refused(toy_env):  # noqa: F811
    base = ["--config", "configs/toy/student_stage1.yaml", *SHRINK, "--model.init_args.val_num_frames=6",
            "--model.init_args.generator_weights=null",
            "--trainer.val_check_interval=2"]
    first = run_lightning_cli(["fit", *base, "--trainer.max_steps=2"])
    assert first.trainer.global_step == 2
    checkpoint = torch.load(next((toy_env["CF_RUNS"]).glob("**/last.ckpt")), weights_only=False)
    assert checkpoint[MODULE_KEY] == "CDMDStudent"
    second = run_lightning_cli(["fit", *base, "--trainer.max_steps=3", "--ckpt_path=last"])
    assert str(second.trainer.ckpt_path).endswith("version_0/checkpoints/last.ckpt")  # continued, not restarted
    assert second.trainer.global_step == 3 and second.model.trainer_step == 3
    assert "version_1" in str(second.trainer.log_dir)
    with pytest.raises(ValueError, match="scores: checkpoint"):
        run_lightning_cli(["fit", *base, "--trainer.max_steps=4", "--ckpt_path=last",
                           "--model.init_args.scores.guidance_scale=1.5"])
