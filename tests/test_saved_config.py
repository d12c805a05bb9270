"""The config `cf fit` saves beside the logs (LightningCLI's ``parser.dump``) is readable YAML that runs again."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cf.lightning_cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": False},
             "zero_allow_untested_optimizer": True}


@pytest.fixture
def fit_env(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x")  # the toy config's paths must exist; nothing is read before fit
    for name in ("CF_TEACHER", "CF_STUDENT_INIT"):
        monkeypatch.setenv(name, str(weights))
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    return tmp_path


def test_inline_deepspeed_config_is_saved_as_a_mapping_and_reloads(fit_env):
    strategy = {"class_path": "cf.strategies.DeepSpeedStrategy", "init_args": {"config": DEEPSPEED}}
    args = ["--config", "configs/toy/student_stage1.yaml", "--trainer.strategy", yaml.safe_dump(strategy)]
    cli = run_lightning_cli(args, run=False)
    assert cli.trainer.strategy.config["zero_optimization"] == DEEPSPEED["zero_optimization"]
    saved = cli.parser.dump(cli.config, skip_none=False)  # what SaveConfigCallback writes to config.yaml
    config = yaml.safe_load(saved)["trainer"]["strategy"]["init_args"]["config"]
    assert config == DEEPSPEED  # a mapping, not the string "{'zero_optimization': ...}"
    path = fit_env / "config.yaml"
    path.write_text(saved)
    again = run_lightning_cli(["--config", str(path)], run=False)  # resuming from the saved config
    assert again.trainer.strategy.config["zero_optimization"] == DEEPSPEED["zero_optimization"]


def test_deepspeed_config_file_stays_a_path(fit_env):
    strategy = {"class_path": "cf.strategies.DeepSpeedStrategy",
                "init_args": {"config": "configs/deepspeed/zero3_cpu_test.json"}}
    cli = run_lightning_cli(["--config", "configs/toy/student_stage1.yaml", "--trainer.strategy",
                             yaml.safe_dump(strategy)], run=False)
    saved = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    assert saved["trainer"]["strategy"]["init_args"]["config"] == "configs/deepspeed/zero3_cpu_test.json"
    assert isinstance(cli.trainer.strategy.config, dict)  # Lightning read the JSON file
