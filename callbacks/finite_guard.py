"""Stop a fit at the first NaN/inf loss or gradient norm, before the optimizer applies it and before any checkpoint
of the bad state is written.

Checks, on every rank (a problem on any rank stops all of them):

- ``on_before_backward``: the loss about to be backpropagated (automatic and manual optimisation; in manual
  optimisation, e.g. `cf.lit.student.CDMDStudent`, the network being trained is named: the top-level submodules
  whose parameters require grad);
- ``on_before_optimizer_step``: the L2 norm of the gradients the optimizer is about to apply, named by the network
  that owns its parameters (gradients held by ZeRO partitions are not visible here and are skipped);
- ``on_train_batch_end``: the loss the module returned, every logged ``train/*`` value whose name contains ``loss``
  or ``grad_norm`` (e.g. ``train/generator_loss``, ``train/critic_grad_norm``), and the gradient norm each
  DeepSpeed engine computed (an engine skips a step whose gradients are not finite and records an infinite norm).

Lightning runs `ModelCheckpoint` after the other callbacks, so raising here leaves the last checkpoint at the
previous step. Steps are counted like the checkpoint names: step k is the k-th optimizer step (``step=k`` in
``epoch=0-step=k.ckpt``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = ["FiniteGuard", "NonFiniteTrainingError"]


class NonFiniteTrainingError(RuntimeError):
    """A loss or gradient norm became NaN or inf during training."""


def _is_finite(value: Any) -> bool:
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value.detach()).all())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(float(value))
    return True


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        value = value.detach().float()
        return f"{value.item():g}" if value.numel() == 1 else f"a tensor with {int((~torch.isfinite(value)).sum())} " \
                                                              "non-finite values"
    return f"{float(value):g}"


def _owners(module: nn.Module) -> dict[int, str]:
    """Parameter id -> name of the top-level submodule holding it ("generator", "critic", "network", ...)."""
    owners: dict[int, str] = {}
    for name, child in module.named_children():
        for param in child.parameters():
            owners.setdefault(id(param), name)
    return owners


def _grad_norm(params: Iterable[Tensor]) -> Tensor | None:
    """L2 norm of the visible gradients (None when no parameter holds one, e.g. under ZeRO partitioning)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


def _engines(trainer: pl.Trainer) -> dict[str, Any]:
    """The DeepSpeed engines of the strategy by name (`cf.strategies.DeepSpeedStrategy` engines, or Lightning's one
    ``deepspeed_engine``); empty otherwise."""
    strategy = trainer.strategy
    engines = getattr(strategy, "engines", None)
    if isinstance(engines, Mapping) and engines:
        return dict(engines)
    if type(strategy).__name__.endswith("DeepSpeedStrategy"):
        engine = getattr(strategy, "model", None)
        if engine is not None and callable(getattr(engine, "get_global_grad_norm", None)):
            return {"model": engine}
    return {}


class FiniteGuard(pl.Callback):
    """Raise `NonFiniteTrainingError` naming the step and the quantity at the first NaN/inf loss or gradient norm.

    Args:
        check_gradients: also check gradient norms before each optimizer step (one norm over the gradients the
            optimizer is about to apply).
        logged_keys: substrings of logged ``train/*`` names that are checked at the end of every batch.
    """

    def __init__(self, check_gradients: bool = True, logged_keys: tuple[str, ...] = ("loss", "grad_norm")) -> None:
        super().__init__()
        self.check_gradients = check_gradients
        self.logged_keys = tuple(logged_keys)
        self._owners: dict[int, str] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._owners = {}

    # ------------------------------------------------------------------ reporting
    @staticmethod
    def _where(trainer: pl.Trainer, completed: bool) -> tuple[str, int]:
        """(description, step): the step being computed, or the one just completed."""
        step = trainer.global_step if completed else trainer.global_step + 1
        batch = trainer.fit_loop.epoch_loop.batch_idx
        return f"training step {step} (epoch {trainer.current_epoch}, batch {batch})", step

    def _stop(self, trainer: pl.Trainer, local_problem: str | None, what: str, completed: bool) -> None:
        """Raise on every rank when any rank found a problem; ``local_problem`` describes this rank's."""
        found = trainer.strategy.reduce_boolean_decision(local_problem is not None, all=False)
        if not found:
            return
        where, step = self._where(trainer, completed)
        problem = local_problem or f"{what} is not finite on another rank"
        if completed:
            state = f"The fit stops before ModelCheckpoint saves step {step}"
        else:
            state = f"The fit stops before the optimizer applies it, so no checkpoint of step {step} is written"
        raise NonFiniteTrainingError(
            f"FiniteGuard: {problem} at {where}. {state}; the last checkpoint (step {step - 1} or earlier) is intact. "
            "Lower the learning rate or raise the gradient clipping, check the data (data/skipped_* metrics), then "
            "resume from that checkpoint"
        )

    def _active_networks(self, pl_module: pl.LightningModule) -> str:
        names = [name for name, child in pl_module.named_children()
                 if any(p.requires_grad for p in child.parameters())]
        return " and ".join(names) if names else "the module"

    # ------------------------------------------------------------------ hooks
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        what = f"the loss of the {self._active_networks(pl_module)}"
        problem = None if _is_finite(loss) else f"{what} is {_describe(loss)}"
        self._stop(trainer, problem, what, completed=False)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.check_gradients:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self._owners:
            self._owners = _owners(pl_module)
        names = sorted({self._owners.get(id(p), "module") for p in params})
        what = f"the gradient norm of the {' and '.join(names)}"
        norm = _grad_norm(params)
        problem = None if norm is None or _is_finite(norm) else f"{what} is {_describe(norm)}"
        self._stop(trainer, problem, what, completed=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        problems = []
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and not _is_finite(loss):
            problems.append(f"the training loss is {_describe(loss)}")
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/") and any(k in key for k in self.logged_keys) and not _is_finite(value):
                problems.append(f"the logged {key} is {_describe(value)}")
        for name, engine in _engines(trainer).items():
            fp16 = getattr(engine, "fp16_enabled", None)
            if callable(fp16) and fp16():  # fp16 loss scaling skips overflowing steps by design
                continue
            norm = engine.get_global_grad_norm()
            if norm is not None and not _is_finite(norm):
                problems.append(f"the gradient norm of the DeepSpeed engine {name!r} is {_describe(norm)} (the "
                                "engine skipped the step)")
        self._stop(trainer, "; ".join(problems) or None, "a training loss or gradient norm", completed=True)
