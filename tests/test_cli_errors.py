"""The `cf` program's handling of user mistakes (one line ``cf: error: ...``, status 2, traceback with --debug) and
its LightningCLI hand-off (no "args and sys.argv" warning)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from cf.cli import error_line, main
from cf.lightning_cli import run_lightning_cli  # imported here: Lightning's log handler binds to the session's stderr
from cf.models.wan import WanConfig, WanDiT
from cf.weights import save_wan_weights

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = "configs/toy/student_stage1.yaml"


@pytest.fixture
def fit_env(tmp_path, monkeypatch):
    """The toy student configs' path variables pointing at files that exist (their content is never read)."""
    monkeypatch.chdir(ROOT)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x")
    for name in ("CF_TEACHER", "CF_STUDENT_INIT"):
        monkeypatch.setenv(name, str(weights))
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("CF_DEBUG", raising=False)
    return tmp_path


def one_error_line(capsys, argv: list[str]) -> str:
    """Run ``cf argv`` as the program does; assert status 2 and exactly one line on stderr besides Lightning's
    INFO log lines ("Seed set to ..."); return that line."""
    with pytest.raises(SystemExit) as stop:
        main(argv, handle_errors=True)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("INFO: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_weights_file_for_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CF_DEBUG", raising=False)
    missing = tmp_path / "student" / "generator.safetensors"
    line = one_error_line(capsys, ["generate", "--weights", str(missing), "--prompt", "a red circle",
                                   "--out", str(tmp_path / "videos")])
    assert line.startswith("cf generate: --weights ") and str(missing) in line
    assert "file not found; pass the generator.safetensors" in line
    assert not (tmp_path / "videos").exists()


def test_bad_memory_preset_in_fit(fit_env, capsys):
    line = one_error_line(capsys, ["fit", "--config", STAGE1, "--model.init_args.memory", "bogus"])
    assert line.startswith("cf: error: unknown memory preset 'bogus'; choose one of [")
    assert "'slow_fast'" in line and "Union" not in line  # our message, not jsonargparse's wrapper


def test_bad_config_value_in_fit(fit_env, capsys):
    line = one_error_line(capsys, ["fit", "--config", STAGE1, "--model.init_args.val_num_frames", "5"])
    assert line == ("cf: error: invalid CDMDStudent configuration: val_num_frames must be a positive multiple of "
                    "frames_per_chunk (3)")


def test_missing_weights_file_in_fit(fit_env, capsys, monkeypatch):
    monkeypatch.setenv("CF_TEACHER", str(fit_env / "nowhere" / "teacher.safetensors"))
    line = one_error_line(capsys, ["fit", "--config", STAGE1])
    assert line.startswith("cf: error: invalid CDMDStudent configuration: teacher_weights ")
    assert "does not exist; point it to a Wan-layout .safetensors file" in line


def test_missing_prompts_file_for_ode_pairs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CF_DEBUG", raising=False)
    teacher = tmp_path / "teacher.safetensors"
    save_wan_weights(WanDiT(WanConfig.tiny()), teacher)
    missing = tmp_path / "prompts.txt"
    line = one_error_line(capsys, ["data", "ode-pairs", "--teacher", str(teacher), "--network", "tiny",
                                   "--prompts", str(missing), "--out", str(tmp_path / "ode-%06d.tar")])
    assert line == (f"cf: error: prompt file {missing} does not exist; pass a text file with one prompt per line "
                    "(`cf data synth` writes <out>/<split>/prompts.txt)")


def test_called_from_python_errors_propagate(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file"):
        main(["data", "ode-pairs", "--teacher", str(tmp_path), "--network", "tiny", "--prompts",
              str(tmp_path / "none.txt"), "--out", str(tmp_path / "ode-%06d.tar")])


def test_error_line_folds_lines_and_unquotes_key_errors():
    assert error_line(KeyError("no engine 'critic'")) == "no engine 'critic'"
    assert error_line(KeyError(3)) == "3"
    assert error_line(ValueError("first\n  second")) == "first second"
    assert error_line(ValueError()) == "ValueError"


def test_program_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    """The installed program's path (`python -m cf`, argv from sys.argv): status 2 and one line; with --debug the
    exception escapes with its traceback."""
    argv = ["data", "ode-pairs", "--teacher", str(tmp_path), "--prompts", str(tmp_path / "none.txt"),
            "--out", str(tmp_path / "ode-%06d.tar")]
    env = {k: v for k, v in os.environ.items() if k != "CF_DEBUG"} | {"OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-m", "cf", *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.splitlines() == [f"cf: error: prompt file {tmp_path / 'none.txt'} does not exist; pass a "
                                         "text file with one prompt per line (`cf data synth` writes "
                                         "<out>/<split>/prompts.txt)"]
    debug = subprocess.run([sys.executable, "-m", "cf", "--debug", *argv], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=300)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("FileNotFoundError: prompt file ")


def test_lightning_cli_gets_the_command_line_without_the_args_warning(fit_env, monkeypatch):
    """`cf fit` from the shell: sys.argv holds the command line; LightningCLI must not warn that it got both
    ``args`` and ``sys.argv``, and sys.argv is as before afterwards."""
    args = ["--config", STAGE1, "--trainer.enable_progress_bar=false"]
    command_line = ["/usr/bin/cf", "fit", *args]
    monkeypatch.setattr(sys, "argv", list(command_line))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_lightning_cli(args, run=False)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "args parameter is intended" in m], messages
    assert sys.argv == command_line
    assert cli.config["model"]["init_args"]["memory"]["sink"] == 3  # the YAML was read


class ManualStepToy(pl.LightningModule):
    """One linear layer trained with manual optimisation, as the students are."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.layer(batch).square().mean())
        optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PointsData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(8, 2), batch_size=2)


MANUAL_WARNING = "Using ModelCheckpoint with manual optimization"


def test_fit_of_a_manually_optimised_module_skips_the_pre_step_checkpoint_warning(tmp_path, monkeypatch):
    """Lightning warns that a manual-optimisation checkpoint holds the state after the step; `cf fit` means it to
    (resume continues bit-exactly from it), so the warning is not shown there, and only there."""
    trainer_args = {"max_steps": 2, "enable_progress_bar": False, "logger": False, "default_root_dir": str(tmp_path)}

    def checkpoint() -> pl.callbacks.ModelCheckpoint:
        return pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)

    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        pl.Trainer(**trainer_args, callbacks=[checkpoint()]).fit(ManualStepToy(), PointsData())
    assert [w for w in plain if MANUAL_WARNING in str(w.message)]  # what Lightning itself does
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": f"{__name__}.ManualStepToy"}, "data": {"class_path": f"{__name__}.PointsData"},
        "trainer": {**trainer_args, "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                  "init_args": {"dirpath": str(tmp_path / "cli"),
                                                                "every_n_train_steps": 1}}]}}))
    monkeypatch.setattr(sys, "argv", ["cf"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_lightning_cli(["fit", "--config", str(config)])
    assert not [w for w in caught if MANUAL_WARNING in str(w.message)]
    assert [p.name for p in (tmp_path / "cli").iterdir()] == ["epoch=0-step=2.ckpt"]  # the checkpoint was written
