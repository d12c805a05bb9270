"""Surface the samples the data pipeline skipped (corrupt videos, missing captions, short clips, ...)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from data.pipeline import SKIP_REASONS

__all__ = ["SkippedSamplesLogger"]

_OTHER = "other"


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(counts.items()) if count)


class SkippedSamplesLogger(pl.Callback):
    """Logs ``batch["skipped"]`` (reason -> count since the previous batch) as cumulative metrics.

    Training counts are logged every step as ``<prefix>/skipped_<reason>`` (this rank's running total since the fit
    began, every known reason, zeros included); validation counts as ``<prefix>/val_skipped_<reason>`` once per
    validation run. At the end of each training epoch and of the fit, one warning summarises the skips of all ranks
    (summed with ``trainer.strategy.reduce`` when ``sync_ranks``) if there were any. Totals are kept in checkpoints.
    """

    def __init__(self, prefix: str = "data", sync_ranks: bool = True) -> None:
        super().__init__()
        self.prefix = prefix
        self.sync_ranks = sync_ranks
        self.train_total: Counter[str] = Counter()
        self.epoch_total: Counter[str] = Counter()
        self.val_run: Counter[str] = Counter()
        self.val_total: Counter[str] = Counter()

    @staticmethod
    def _skipped(batch: Any) -> dict[str, int]:
        if isinstance(batch, Mapping) and isinstance(batch.get("skipped"), Mapping):
            return {str(k): int(v) for k, v in batch["skipped"].items()}
        return {}

    def _reduce(self, trainer: pl.Trainer, counts: Counter[str]) -> dict[str, int]:
        """Sum per-reason counts over ranks (reasons outside SKIP_REASONS are pooled as 'other')."""
        reasons = list(SKIP_REASONS) + [_OTHER]
        vector = torch.tensor(
            [counts.get(r, 0) for r in SKIP_REASONS] + [sum(v for k, v in counts.items() if k not in SKIP_REASONS)],
            dtype=torch.float64,
        )
        if self.sync_ranks and trainer.world_size > 1:
            vector = trainer.strategy.reduce(vector.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        return {reason: int(round(value)) for reason, value in zip(reasons, vector.tolist())}

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        skipped = self._skipped(batch)
        self.train_total.update(skipped)
        self.epoch_total.update(skipped)
        for reason in sorted(set(SKIP_REASONS) | set(self.train_total)):
            pl_module.log(f"{self.prefix}/skipped_{reason}", float(self.train_total[reason]), on_step=True,
                          on_epoch=False, batch_size=1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_total.clear()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = self._reduce(trainer, self.epoch_total)
        if sum(counts.values()):
            rank_zero_warn(
                f"data: {sum(counts.values())} training samples skipped in epoch {trainer.current_epoch} "
                f"(all ranks): {_summary(counts)}; see the {self.prefix}/skipped_* metrics and the data log warnings"
            )

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_run.clear()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.val_run.update(self._skipped(batch))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_total.update(self.val_run)
        for reason in sorted(set(SKIP_REASONS) | set(self.val_total)):
            pl_module.log(f"{self.prefix}/val_skipped_{reason}", float(self.val_total[reason]), batch_size=1)

    # ------------------------------------------------------------------ fit summary
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train = self._reduce(trainer, self.train_total)
        val = self._reduce(trainer, self.val_total)
        if sum(train.values()) or sum(val.values()):
            rank_zero_warn(
                f"data: skipped samples over the whole fit (all ranks): training {sum(train.values())} "
                f"[{_summary(train)}], validation {sum(val.values())} [{_summary(val)}]"
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"train_total": dict(self.train_total), "val_total": dict(self.val_total)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_total = Counter(state_dict.get("train_total", {}))
        self.val_total = Counter(state_dict.get("val_total", {}))
