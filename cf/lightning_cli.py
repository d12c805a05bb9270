"""`cf fit|validate|test|predict`: LightningCLI with the project's conventions.

Any LightningModule / LightningDataModule is selected by ``class_path`` in the YAML (subclass mode), YAML values may
use omegaconf interpolation (``${oc.env:CF_RUNS,runs}``), and the resolved config is saved beside the logs.
``--ckpt_path last`` resumes the newest ``last.ckpt`` of the run (any ``version_*`` folder of its logger), and fails
with a clear message when the run has none, instead of silently starting over.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import cf.strategies  # noqa: F401,E402  registers the short strategy names (cf_deepspeed_stage_3, ...)
from cf.atomic import recover_staged_folder, staged_backup

__all__ = ["ProjectCLI", "find_last_checkpoint", "run_lightning_cli"]


def find_last_checkpoint(root: str | Path) -> Path:
    """The newest ``last.ckpt`` (file, or DeepSpeed checkpoint folder) below ``root``, e.g. ``runs/<name>``."""
    root = Path(root)
    for old in root.glob(f"**/{staged_backup('last.ckpt').name}"):  # a folder save killed between its renames
        _recover(old.with_name("last.ckpt"))
    found = [p for p in root.glob("**/last.ckpt") if p.is_file() or (p / "latest").exists() or p.is_dir()]
    if not found:
        raise FileNotFoundError(f"--ckpt_path last: no last.ckpt below {root} (the run's log folders); pass the path "
                                "of a checkpoint, or drop --ckpt_path to start a new run")
    return max(found, key=lambda p: p.stat().st_mtime)


def _recover(path: Path) -> None:
    try:
        recover_staged_folder(path)
    except OSError:  # another rank of the same launch put it back first
        pass


def _run_root(trainer: pl.Trainer) -> Path:
    """The folder holding every version of this run: the logger's ``<save_dir>/<name>``, else the root dir."""
    logger = trainer.logger
    if logger is not None and getattr(logger, "root_dir", None):
        return Path(logger.root_dir)
    return Path(trainer.default_root_dir)


class ProjectCLI(LightningCLI):
    """LightningCLI whose ``--ckpt_path last`` finds the run's newest checkpoint across version folders."""

    def _resolve_last(self) -> None:
        config: Any = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            path = find_last_checkpoint(_run_root(self.trainer))
            print(f"--ckpt_path last: resuming {path}")
            config["ckpt_path"] = str(path)
        elif config.get("ckpt_path"):
            _recover(Path(config["ckpt_path"]))

    def before_fit(self) -> None:
        self._resolve_last()

    def before_validate(self) -> None:
        self._resolve_last()

    def before_test(self) -> None:
        self._resolve_last()


def run_lightning_cli(args: list[str], run: bool = True) -> ProjectCLI:
    """`cf fit|validate|test|predict ...` (subclass mode for model and data, omegaconf interpolation in YAML).

    ``args`` are handed to LightningCLI as the command line: ``sys.argv[1:]`` is set to them while it runs (and
    restored after), so the CLI reads one consistent command line, and a launcher that restarts this script on
    other ranks (``sys.argv``) passes them the same arguments.
    """
    saved = sys.argv
    sys.argv = [*saved[:1], *args] if saved else ["cf", *args]
    try:
        with warnings.catch_warnings():
            # The students optimise manually and their checkpoints are meant to hold the state after the step:
            # resuming from one continues bit-exactly (tests/test_resume_exact.py), so Lightning's advice to save
            # the state from before the step does not apply.
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization",
                                    category=UserWarning)
            return ProjectCLI(
                pl.LightningModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=None,
                run=run,
                parser_kwargs={"parser_mode": "omegaconf"},
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
            )
    finally:
        sys.argv = saved
