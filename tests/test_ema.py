"""EMA callback (method §F.3, §F.8) and the generator LR schedule (§F.3); §J.4 item 11."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import callbacks.ema as ema_module
from callbacks.ema import EMA
from cf.optim import CosineWithFloor, cosine_with_floor, lr_lambda

# ----------------------------------------------------------------------------------------------------------------------
# LR schedule
# ----------------------------------------------------------------------------------------------------------------------


def test_lr_multiplier_values():
    total = 2001
    assert cosine_with_floor(0, total) == pytest.approx(1.0)
    assert cosine_with_floor(total / 2, total) == pytest.approx(0.6)
    assert cosine_with_floor(total, total) == pytest.approx(0.2)
    assert cosine_with_floor(total + 500, total) == pytest.approx(0.2)
    k = 400
    assert cosine_with_floor(k, total) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi * k / total)))
    assert cosine_with_floor(k, total) > 0.92
    assert cosine_with_floor(25, 100, floor=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_lr_warmup_then_cosine():
    values = [cosine_with_floor(step, 14, floor=0.5, warmup_steps=4) for step in range(20)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.75)  # halfway through the 10 decay steps
    assert values[14:] == pytest.approx([0.5] * 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"total_steps": 0}, "total_steps"), ({"total_steps": 10, "floor": 1.5}, "floor"),
     ({"total_steps": 10, "warmup_steps": 10}, "warmup_steps")],
)
def test_lr_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_lambda(**kwargs)


def test_lr_lambda_drives_lambdalr_and_survives_state_dict(tmp_path):
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10))
    for k in range(1, 6):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-6 * cosine_with_floor(k, 10))
    torch.save(scheduler.state_dict(), tmp_path / "sched.pt")
    fresh_optimizer = torch.optim.AdamW([param], lr=2e-6)
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lr_lambda(10))
    fresh.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=False))
    fresh_optimizer.step()
    fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(2e-6 * cosine_with_floor(6, 10))
    assert isinstance(lr_lambda(10), CosineWithFloor)


# ----------------------------------------------------------------------------------------------------------------------
# EMA: update rule with hand-driven hooks
# ----------------------------------------------------------------------------------------------------------------------


class Holder(nn.Module):
    """Stands for a LightningModule: a tracked generator plus the step counter and the stepped flag."""

    def __init__(self, with_counters: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        self.other = nn.Linear(2, 2)
        if with_counters:
            self.trainer_step = 0
            self.generator_stepped = False


def perturb(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator))


def params_of(module: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_ema_start_step_and_update_formula():
    holder, trainer = Holder(), SimpleNamespace(global_step=0)
    ema = EMA(decay=0.9, start_step=3)
    ema.setup(trainer, holder, "fit")
    ema.on_train_start(trainer, holder)
    reference = None
    for batch in range(10):
        stepped = batch % 2 == 0
        if stepped:
            perturb(holder.generator, seed=batch)
        holder.generator_stepped = stepped
        holder.trainer_step = batch + 1  # counter after the batch, as the CDMD module reports it
        trainer.global_step += 2  # two optimizers: global_step is not the counter the EMA must use
        ema.on_train_batch_end(trainer, holder, None, None, batch)
        current = params_of(holder.generator)
        if reference is None:
            if holder.trainer_step >= 3:
                reference = current
        elif stepped:
            reference = {k: 0.9 * reference[k] + 0.1 * current[k] for k in reference}
        assert ema.started == (reference is not None)
    state = ema.ema_state_dict()
    assert list(state) == list(holder.generator.state_dict())
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-7)
        assert state[name].dtype == torch.float32 and state[name].device.type == "cpu"
    assert ema.num_updates == 3  # stepped batches 4, 6, 8 after creation at batch 2
    torch.testing.assert_close(state["1.running_mean"], holder.generator[1].running_mean)


def test_ema_falls_back_to_global_step():
    holder, trainer = Holder(with_counters=False), SimpleNamespace(global_step=0)
    ema = EMA(decay=0.5, start_step=2)
    ema.setup(trainer, holder, "fit")
    ema.on_train_start(trainer, holder)
    trainer.global_step = 1
    ema.on_train_batch_end(trainer, holder, None, None, 0)
    assert not ema.started
    trainer.global_step = 2
    ema.on_train_batch_end(trainer, holder, None, None, 1)
    created = params_of(holder.generator)
    perturb(holder.generator, seed=1)
    ema.on_train_batch_end(trainer, holder, None, None, 2)  # global_step did not advance: no update
    torch.testing.assert_close(ema.ema_state_dict()["0.weight"], created["0.weight"])
    trainer.global_step = 3
    ema.on_train_batch_end(trainer, holder, None, None, 3)
    expected = 0.5 * created["0.weight"] + 0.5 * holder.generator[0].weight.detach()
    torch.testing.assert_close(ema.ema_state_dict()["0.weight"], expected)


def test_ema_tied_weights_and_swap_context():
    holder, trainer = Holder(), SimpleNamespace(global_step=0)
    holder.generator.tied = holder.generator[0]  # the same Linear under a second name
    ema = EMA(decay=0.5, start_step=0)
    ema.setup(trainer, holder, "fit")
    ema.on_train_batch_end(trainer, holder, None, None, 0)
    training = params_of(holder.generator)
    perturb(holder.generator, seed=3)
    holder.generator_stepped = True
    ema.on_train_batch_end(trainer, holder, None, None, 1)
    after_step = params_of(holder.generator)
    state = ema.ema_state_dict()
    assert set(state) == set(holder.generator.state_dict())
    torch.testing.assert_close(state["tied.weight"], state["0.weight"])
    torch.testing.assert_close(state["0.weight"], 0.5 * training["0.weight"] + 0.5 * after_step["0.weight"])
    with ema.use_ema_weights(holder):
        torch.testing.assert_close(holder.generator[0].weight.detach(), state["0.weight"])
    for name, value in params_of(holder.generator).items():
        assert torch.equal(value, after_step[name])


def test_ema_reports_user_errors():
    holder, trainer = Holder(), SimpleNamespace(global_step=0)
    with pytest.raises(AttributeError, match="child modules are"):  # checked once configure_model has run
        misspelled = EMA(attribute="student")
        misspelled.setup(trainer, holder, "fit")
        misspelled.on_train_start(trainer, holder)
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)
    ema = EMA(start_step=5)
    ema.setup(trainer, holder, "fit")
    with pytest.raises(RuntimeError, match="start_step=5"):
        ema.ema_state_dict()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EMA.read_ema_weights("/nonexistent/file.ckpt")


# ----------------------------------------------------------------------------------------------------------------------
# EMA inside a Trainer: checkpoint round trip and validation swap
# ----------------------------------------------------------------------------------------------------------------------


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.validation_weights: list[dict] = []
        self.training_weights: dict | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.generator(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.training_weights = params_of(self.generator)

    def validation_step(self, batch, batch_idx):
        self.validation_weights.append(params_of(self.generator))
        x, y = batch
        return F.mse_loss(self.generator(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loaders():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=4, shuffle=False), DataLoader(data, batch_size=8, shuffle=False)


def make_trainer(tmp_path: Path, ema: EMA, max_epochs: int, validate: bool = False) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=[ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1 if validate else 0,
        num_sanity_val_steps=1 if validate else 0,
        default_root_dir=tmp_path,
    )


def test_ema_checkpoint_resume_equals_uninterrupted(tmp_path):
    train, val = loaders()
    full_ema = EMA(decay=0.7, start_step=2)
    full_model = TinyModule()
    make_trainer(tmp_path / "full", full_ema, max_epochs=3).fit(full_model, train)

    first_ema = EMA(decay=0.7, start_step=2)
    first_trainer = make_trainer(tmp_path / "a", first_ema, max_epochs=1)
    first_trainer.fit(TinyModule(), train)
    checkpoint = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(checkpoint)
    saved = first_ema.ema_state_dict()

    from_file = EMA.read_ema_weights(checkpoint)
    assert list(from_file) == list(saved)
    for key in saved:
        assert torch.equal(from_file[key], saved[key])
    TinyModule().generator.load_state_dict(from_file, strict=True)

    evaluated = TinyModule()
    make_trainer(tmp_path / "v", EMA(decay=0.7, start_step=2), max_epochs=1, validate=True).validate(
        evaluated, val, ckpt_path=checkpoint, verbose=False
    )
    for name, value in evaluated.validation_weights[0].items():
        assert torch.equal(value, saved[name]), name

    resumed_ema = EMA(decay=0.7, start_step=2)
    resumed_model = TinyModule()
    make_trainer(tmp_path / "b", resumed_ema, max_epochs=3).fit(resumed_model, train, ckpt_path=checkpoint)

    full, resumed = full_ema.ema_state_dict(), resumed_ema.ema_state_dict()
    assert full_ema.num_updates == resumed_ema.num_updates == 10  # created at step 2 of 12
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    for key, value in full_model.generator.state_dict().items():
        assert torch.equal(value, resumed_model.generator.state_dict()[key]), key
    assert not torch.equal(full["0.weight"], full_model.generator[0].weight.detach())


def test_validation_sees_ema_weights_and_training_weights_return(tmp_path):
    train, val = loaders()
    ema = EMA(decay=0.5, start_step=1)
    model = TinyModule()
    make_trainer(tmp_path, ema, max_epochs=1, validate=True).fit(model, train, val)
    assert len(model.validation_weights) == 2  # sanity check (EMA not started) + end of epoch
    for name, value in model.validation_weights[0].items():
        assert torch.equal(value, params_of(TinyModule().generator)[name])  # initial weights, no swap
    state = ema.ema_state_dict()
    for name, value in model.validation_weights[1].items():
        assert torch.equal(value, state[name]), name
    for name, value in params_of(model.generator).items():
        assert torch.equal(value, model.training_weights[name]), name
    assert not torch.equal(state["0.weight"], model.generator[0].weight.detach())


class AlternatingModule(pl.LightningModule):
    """Manual optimization with a generator step every second batch, as in the CDMD loop."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Linear(4, 1)
        self.critic = nn.Linear(4, 1)
        self.trainer_step = 0
        self.generator_stepped = False
        self.generator_history: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        generator_optimizer, critic_optimizer = self.optimizers()
        self.generator_stepped = self.trainer_step % 2 == 0
        if self.generator_stepped:
            generator_optimizer.zero_grad()
            self.manual_backward(F.mse_loss(self.generator(x), y))
            generator_optimizer.step()
        critic_optimizer.zero_grad()
        self.manual_backward(F.mse_loss(self.critic(x), y))
        critic_optimizer.step()
        self.trainer_step += 1

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.generator_history.append(params_of(self.generator))

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.1), torch.optim.SGD(self.critic.parameters(), lr=0.1)]


def test_ema_uses_module_step_counter_and_stepped_flag(tmp_path):
    train, _ = loaders()
    ema = EMA(decay=0.5, start_step=1)
    model = AlternatingModule()
    make_trainer(tmp_path, ema, max_epochs=2).fit(model, train)
    history = model.generator_history
    reference = dict(history[0])  # counter reaches 1 after the first batch
    for batch in range(1, len(history)):
        if batch % 2 == 0:
            reference = {k: 0.5 * reference[k] + 0.5 * history[batch][k] for k in reference}
    state = ema.ema_state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 3


# ----------------------------------------------------------------------------------------------------------------------
# ZeRO-3 partitioned parameters
# ----------------------------------------------------------------------------------------------------------------------


def partition(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """DeepSpeed ZeRO-3 layout: the flattened tensor padded to a multiple of world, split evenly."""
    flat = full.detach().reshape(-1)
    size = math.ceil(flat.numel() / world)
    padded = torch.cat([flat, flat.new_zeros(size * world - flat.numel())])
    return padded[rank * size : (rank + 1) * size].clone()


def test_partitioned_states_merge_into_full_weights(tmp_path, monkeypatch):
    """Fake two-rank ZeRO-3 partitions: each rank averages its slice; read_ema_weights reassembles them."""
    reference_holder, trainer = Holder(), SimpleNamespace(global_step=0)
    reference = EMA(decay=0.8, start_step=0)
    reference.setup(trainer, reference_holder, "fit")
    ranks = [Holder() for _ in range(2)]
    emas = [EMA(decay=0.8, start_step=0) for _ in range(2)]

    def sync_partitions():
        for rank, holder in enumerate(ranks):
            pairs = zip(holder.generator.parameters(), reference_holder.generator.parameters())
            for index, (p, q) in enumerate(pairs):
                p.ds_id, p.ds_tensor = index, partition(q, rank, 2)
                p.ds_numel, p.ds_shape = q.numel(), tuple(q.shape)

    for batch in range(4):
        perturb(reference_holder.generator, seed=10 + batch)
        reference_holder.generator_stepped = True
        reference.on_train_batch_end(trainer, reference_holder, None, None, batch)
        sync_partitions()
        for holder, ema in zip(ranks, emas):
            holder.generator_stepped = True
            ema.setup(trainer, holder, "fit")
            ema.on_train_batch_end(trainer, holder, None, None, batch)

    folder = tmp_path / "ckpt.ckpt" / "checkpoint"
    folder.mkdir(parents=True)
    saved_states = []
    for rank, ema in enumerate(emas):
        monkeypatch.setattr(ema_module, "rank_and_world", lambda rank=rank: (rank, 2))
        saved_states.append(ema.state_dict())
        torch.save({"callbacks": {ema.state_key: saved_states[-1]}},
                   folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    monkeypatch.setattr(ema_module, "rank_and_world", lambda: (0, 1))
    with pytest.raises(RuntimeError, match="same number of ranks"):
        EMA(decay=0.8, start_step=0).load_state_dict(saved_states[1])
    merged = EMA.read_ema_weights(tmp_path / "ckpt.ckpt")
    expected = reference.ema_state_dict()
    assert list(merged) == list(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0)

    (tmp_path / "ckpt.ckpt" / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match=r"ranks \[1\] are missing"):
        EMA.read_ema_weights(tmp_path / "ckpt.ckpt")


ZERO3_WORKER = textwrap.dedent(
    """
    import importlib, os, sys
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from torch import nn

    def run(rank, world, port, out_dir):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed
        from callbacks.ema import EMA
        deepspeed.init_distributed(dist_backend="gloo")
        config = {"train_micro_batch_size_per_gpu": 2,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True}
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=config):
            net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                          config=config)
        holder = nn.Module()
        holder.generator = net
        holder.generator_stepped = True
        trainer = SimpleNamespace(global_step=0)
        ema = EMA(decay=0.6, start_step=0)
        ema.setup(trainer, holder, "fit")
        assert all(p.numel() == 0 for p in net.parameters()), "parameters are not partitioned"

        def gathered():
            with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
                return {name: p.detach().clone().float() for name, p in net.named_parameters()}

        reference = None
        x = torch.randn(2, 5, generator=torch.Generator().manual_seed(rank))
        for step in range(4):
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            trainer.global_step += 1
            ema.on_train_batch_end(trainer, holder, None, None, step)
            current = gathered()
            reference = current if reference is None else {k: 0.6 * reference[k] + 0.4 * current[k] for k in current}
        state = ema.ema_state_dict()
        for name in reference:
            assert torch.allclose(state[name], reference[name], atol=1e-6), name
        training = gathered()
        probe = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))
        with ema.use_ema_weights(holder):
            swapped = gathered()
            out = net(probe)
        for name in reference:
            assert torch.allclose(swapped[name], state[name], atol=1e-6), name
        expected = torch.func.functional_call(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), state,
                                              (probe,))
        assert torch.allclose(out, expected, atol=1e-5)
        restored = gathered()
        for name in training:
            assert torch.equal(restored[name], training[name]), name
        folder = os.path.join(out_dir, "ckpt", "checkpoint")
        os.makedirs(folder, exist_ok=True)
        torch.save({"callbacks": {ema.state_key: ema.state_dict()}},
                   os.path.join(folder, f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"))
        fresh = EMA(decay=0.6, start_step=0)
        fresh.load_state_dict(ema.state_dict())
        dist.barrier()
        if rank == 0:
            merged = EMA.read_ema_weights(os.path.join(out_dir, "ckpt"))
            for name in reference:
                assert torch.allclose(merged[name], reference[name], atol=1e-6), name
            open(os.path.join(out_dir, "ok"), "w").close()
        dist.destroy_process_group()

    if __name__ == "__main__":
        import torch.multiprocessing as mp
        world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        mp.spawn(run, args=(world, port, out_dir), nprocs=world)
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ema_under_deepspeed_zero3_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_ema_worker.py"
    script.write_text(ZERO3_WORKER)
    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, str(script), "2", str(free_port()), str(tmp_path)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (tmp_path / "ok").exists()
