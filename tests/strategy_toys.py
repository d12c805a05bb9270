"""Toy LightningModules for tests/test_strategies.py; importable by the spawned worker processes.

Each module records, per rank, its losses, the gathered parameters, a snapshot of every engine's ZeRO optimizer state
and a few invariants, and writes them to ``<out_dir>/rank<r>.pt`` at the end of training.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cf.zero import gathered_parameters

IN_DIM, HIDDEN, OUT_DIM = 4, 8, 3
BATCH_PER_RANK = 2


class TinyMLP(nn.Module):
    """``[B, d_in] -> [B, d_out]``."""

    def __init__(self, d_in: int, d_out: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def toy_dataset(num_items: int, seed: int = 0) -> TensorDataset:
    """Pairs ``(z [IN_DIM], x [OUT_DIM])``; x depends on z so the losses fall."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_items, IN_DIM, generator=g)
    x = torch.sin(z[:, :OUT_DIM] * 2.0) + 0.1 * torch.randn(num_items, OUT_DIM, generator=g)
    return TensorDataset(z, x)


def toy_loader(num_items: int) -> DataLoader:
    return DataLoader(toy_dataset(num_items), batch_size=BATCH_PER_RANK, shuffle=False)


def regression_loss(net: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    return ((net(z) - x) ** 2).mean()


def critic_loss(critic: nn.Module, teacher: nn.Module, fake: Tensor, real: Tensor) -> Tensor:
    return ((critic(fake) - teacher(fake)) ** 2).mean() + (critic(real) ** 2).mean()


def generator_loss(critic: nn.Module, teacher: nn.Module, fake: Tensor, real: Tensor) -> Tensor:
    return (critic(fake) - teacher(fake)).mean() + ((fake - real) ** 2).mean()


def real_shard_numel(p: nn.Parameter, rank: int) -> int:
    """Elements of ``rank``'s ZeRO-3 shard of ``p`` that hold values; the rest is padding (uninitialised memory)."""
    shard = p.partition_numel()
    return max(0, min(shard, p.ds_numel - rank * shard))


def local_shards(module: nn.Module) -> list[Tensor]:
    """This rank's partition of each parameter without padding (the full tensor for a plain parameter)."""
    rank = torch.distributed.get_rank()
    return [
        p.ds_tensor[: real_shard_numel(p, rank)].detach().clone() if hasattr(p, "ds_tensor") else p.detach().clone()
        for p in module.parameters()
    ]


def partition_padding_mask(params: list[nn.Parameter], rank: int) -> Tensor:
    """Which elements of a ZeRO-3 flat partition (this rank's shards of ``params``, concatenated) hold real values.

    Each parameter's shard is padded to the same length on every rank; the padding holds uninitialised memory.
    """
    return torch.cat([torch.arange(p.partition_numel()) < real_shard_numel(p, rank) for p in params])


def zero_optimizer_snapshot(engine: Any) -> dict[str, Any]:
    """This rank's fp32 master partitions and inner optimizer state of a ZeRO-3 engine (padding left out)."""
    zero_optimizer = engine.optimizer
    flat = zero_optimizer.fp32_partitioned_groups_flat
    rank = torch.distributed.get_rank()
    masks = [partition_padding_mask(group, rank) for group in zero_optimizer.fp16_groups]
    inner_state = zero_optimizer.optimizer.state

    def real(value: Any, mask: Tensor) -> Any:
        if isinstance(value, Tensor) and value.shape == mask.shape:
            return value.detach()[mask].clone()
        return copy.deepcopy(value)

    return {
        "fp32": [real(t, m) for t, m in zip(flat, masks)],
        "inner": [{k: real(v, m) for k, v in inner_state[t].items()} for t, m in zip(flat, masks)],
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in zero_optimizer.optimizer.param_groups],
    }


def is_partitioned(module: nn.Module) -> bool:
    return all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in module.parameters())


class RecordingModule(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.record: dict[str, Any] = {"losses": [], "idle_unchanged": [], "active_changed": []}

    def on_fit_start(self) -> None:
        with gathered_parameters(self.parameters()):
            self.record["initial"] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def snapshot_engines(self) -> dict[str, Any]:
        raise NotImplementedError

    def on_train_epoch_end(self) -> None:
        with gathered_parameters(self.parameters()):
            params = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self.record.setdefault("epoch_end", []).append(params)

    def on_train_end(self) -> None:
        with gathered_parameters(self.parameters()):
            self.record["final"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self.record["optimizer"] = self.snapshot_engines()
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(self.record, Path(self.out_dir) / f"rank{self.global_rank}.pt")


class SingleEngineToy(RecordingModule):
    """Automatic optimization, one engine over the whole module."""

    def __init__(self, out_dir: str, lr: float = 1e-2) -> None:
        super().__init__(out_dir)
        self.lr = lr

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            torch.manual_seed(1)
            self.net = TinyMLP(IN_DIM, OUT_DIM)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if "partitioned" not in self.record:
            self.record["partitioned"] = is_partitioned(self.net)
        z, x = batch
        loss = regression_loss(self.net, z, x)
        self.record["losses"].append(loss.detach().clone())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, betas=(0.9, 0.99), weight_decay=0.01)

    def snapshot_engines(self) -> dict[str, Any]:
        return {"model": zero_optimizer_snapshot(self.trainer.strategy.deepspeed_engine)}


class DeclaredEngineToy(SingleEngineToy):
    """Automatic optimization with the network declared as the one engine (the module itself stays outside)."""

    def deepspeed_submodules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def snapshot_engines(self) -> dict[str, Any]:
        return {"net": zero_optimizer_snapshot(self.trainer.strategy.engines["net"])}


class DyingToy(SingleEngineToy):
    """Rank 1 raises on its second batch while rank 0 goes on into the next collective."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.global_rank == 1 and batch_idx == 1:
            raise RuntimeError("rank 1 died on purpose")
        return super().training_step(batch, batch_idx)


def sleep_forever() -> None:
    """A worker that never finishes."""
    time.sleep(3600)


GEN_OPT = {"lr": 2e-2, "betas": (0.9, 0.999), "weight_decay": 0.01}
CRITIC_OPT = {"lr": 1e-2, "betas": (0.5, 0.95), "weight_decay": 0.01}


class TwoEngineToy(RecordingModule):
    """Generator and critic in their own engines (manual optimization), with a frozen teacher outside both.

    The critic steps on every batch, the generator on every second one (through the frozen critic). With
    ``zero_grad=False`` the optimizers' gradients are left to DeepSpeed, which clears them after each update (needed
    when an engine accumulates gradients over several ``opt.step()`` calls).
    """

    def __init__(self, out_dir: str, zero_grad: bool = True) -> None:
        super().__init__(out_dir)
        self.automatic_optimization = False
        self.zero_grad_before_backward = zero_grad

    def configure_model(self) -> None:
        if not hasattr(self, "generator"):
            torch.manual_seed(2)
            self.generator = TinyMLP(IN_DIM, OUT_DIM)
            self.critic = TinyMLP(OUT_DIM, 1)
            self.teacher = TinyMLP(OUT_DIM, 1)

    def deepspeed_submodules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.critic}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.AdamW(self.generator.parameters(), **GEN_OPT),
            torch.optim.AdamW(self.critic.parameters(), **CRITIC_OPT),
        ]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if "partitioned" not in self.record:
            self.record["partitioned"] = is_partitioned(self.generator) and is_partitioned(self.critic)
            self.record["teacher"] = [
                (p.shape, p.dtype, p.requires_grad, hasattr(p, "ds_id")) for p in self.teacher.parameters()
            ]
        opt_g, opt_c = self.optimizers()
        z, x = batch

        with torch.no_grad():
            fake = self.generator(z)
        generator_before, critic_before = local_shards(self.generator), local_shards(self.critic)
        loss_c = critic_loss(self.critic, self.teacher, fake, x)
        if self.zero_grad_before_backward:
            opt_c.zero_grad()
        self.manual_backward(loss_c)
        opt_c.step()
        self._check_step(self.generator, generator_before, self.critic, critic_before)
        self.record["losses"].append(("critic", loss_c.detach().clone()))

        if batch_idx % 2 == 1:
            generator_before, critic_before = local_shards(self.generator), local_shards(self.critic)
            self.critic.requires_grad_(False)
            loss_g = generator_loss(self.critic, self.teacher, self.generator(z), x)
            if self.zero_grad_before_backward:
                opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
            self.critic.requires_grad_(True)
            self._check_step(self.critic, critic_before, self.generator, generator_before)
            self.record["losses"].append(("generator", loss_g.detach().clone()))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        z, x = batch
        self.log("val_loss", generator_loss(self.critic, self.teacher, self.generator(z), x), batch_size=z.shape[0])

    def _check_step(
        self, idle: nn.Module, idle_before: list[Tensor], active: nn.Module, active_before: list[Tensor]
    ) -> None:
        self.record["idle_unchanged"].append(all(torch.equal(a, b) for a, b in zip(local_shards(idle), idle_before)))
        moved = any(not torch.equal(a, b) for a, b in zip(local_shards(active), active_before))
        self.record["active_changed"].append(moved)

    def snapshot_engines(self) -> dict[str, Any]:
        return {name: zero_optimizer_snapshot(e) for name, e in self.trainer.strategy.engines.items()}
