"""Recording callbacks for tests/test_zero3_modules.py; importable by the spawned worker processes.

The recorders write, per rank, what a resumed run must reproduce: the per-step losses and batches, and at train
start and end the gathered parameters, each engine's ZeRO-3 optimizer state (this rank's fp32 master partition and
Adam moments, padding left out), and the module's own state (error banks, EMA shadow, step counters). Each run
writes ``<out_dir>/rank<r>.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from strategy_toys import zero_optimizer_snapshot

from callbacks.ema import EMA
from cf.zero import gathered_parameters


def gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of ``module.state_dict()`` (a collective under ZeRO-3)."""
    with gathered_parameters(module.parameters()):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Recorder(pl.Callback):
    """Base: collects ``self.record`` and writes it to ``<out_dir>/rank<r>.pt`` at the end of training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record: dict[str, Any] = {"steps": []}

    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["start"] = self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["end"] = self.snapshot(trainer, pl_module)
        self.record["global_step"] = trainer.global_step
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(self.record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class TeacherRecorder(Recorder):
    """`cf.lit.teacher.TeacherERFT` (one engine, automatic optimization)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.record["steps"].append({"step": trainer.global_step, "keys": list(batch["key"]),
                                     "loss": outputs["loss"].detach().clone()})

    def snapshot(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        return {
            "network": gathered_state(pl_module.network),
            "optimizer": zero_optimizer_snapshot(trainer.strategy.deepspeed_engine),
            "banks": pl_module.banks.state_dict(),
            "generator": pl_module.random_stream().get_state(),
        }


class StudentRecorder(Recorder):
    """`cf.lit.student.CDMDStudent` (two engines, manual optimization) with a `callbacks.ema.EMA` on the generator;
    list it after the EMA, which attaches to the generator (built in ``configure_model``) at train start."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        step = {"step": pl_module.trainer_step - 1, "captions": list(batch["caption"]),
                "critic_loss": metrics["train/critic_loss"].clone(), "generator_stepped": pl_module.generator_stepped}
        if pl_module.generator_stepped:
            step["generator_loss"] = metrics["train/generator_loss"].clone()
        self.record["steps"].append(step)

    def snapshot(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        (ema,) = [c for c in trainer.callbacks if isinstance(c, EMA)]
        scheduler = pl_module.lr_schedulers()
        return {
            "generator": gathered_state(pl_module.generator),
            "critic": gathered_state(pl_module.critic),
            "optimizer": {name: zero_optimizer_snapshot(e) for name, e in trainer.strategy.engines.items()},
            "ema": ema.ema_state_dict() if ema.started else None,
            "ema_updates": ema.num_updates,
            "counters": (pl_module.trainer_step, pl_module.generator_updates, pl_module.critic_updates,
                         trainer.global_step),
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        }
