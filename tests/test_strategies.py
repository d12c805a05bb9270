"""cf.strategies: ZeRO-3 on CPU with 2 spawned processes (gloo), one engine per optimizer, sharded checkpoints.

The distributed tests share two runs per toy (module-scoped fixtures): a straight run of 2 epochs that saves a
checkpoint after epoch 1 (A), and a run resumed from that checkpoint to 2 epochs (C). C must reproduce A's second
epoch bit for bit; A must also match a plain single-process PyTorch replay of the same optimization on the global
batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DistributedSampler

import strategy_toys as toys
from cf.strategies import DeepSpeedStrategy
from cf.zero import (
    checkpoint_engine_names,
    checkpoint_world_size,
    engines_in_graph,
    load_zero_checkpoint_state_dict,
    merge_engine_config,
)
from cf.zero_launcher import ZeroSpawnLauncher

REPO = Path(__file__).resolve().parents[1]
CPU_TEST_CONFIG = REPO / "configs" / "deepspeed" / "zero3_cpu_test.json"
WORLD = 2
SINGLE_STEPS_PER_EPOCH = 3
TWO_STEPS_PER_EPOCH = 4
SINGLE_CLIP = 0.5
ENGINE_CLIPS = {"generator": 0.1, "critic": 0.05}


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def make_trainer(
    root: Path,
    max_epochs: int,
    save: bool = False,
    devices: int = WORLD,
    engine_configs: Optional[dict[str, Any]] = None,
    gradient_clip_val: Optional[float] = None,
) -> Trainer:
    strategy = DeepSpeedStrategy(
        config=str(CPU_TEST_CONFIG),
        engine_configs=engine_configs,
        start_method="spawn",
        process_timeout=240,
        timeout=120,
    )
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)] if save else []
    return Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=save,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=gradient_clip_val,
        num_sanity_val_steps=0,
    )


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact equality of nested tensors / lists / dicts / scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


def rank_batches(num_items: int, epoch: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step of ``epoch``, each rank's batch as Lightning deals them (a shuffling DistributedSampler, seed 0)."""
    z, x = toys.toy_dataset(num_items).tensors
    orders = []
    for rank in range(WORLD):
        sampler = DistributedSampler(range(num_items), num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    b = toys.BATCH_PER_RANK
    steps = num_items // (WORLD * b)
    return [[(z[o[s * b:(s + 1) * b]], x[o[s * b:(s + 1) * b]]) for o in orders] for s in range(steps)]


def submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------------------------------
# runs shared by the distributed tests
# ----------------------------------------------------------------------------------------------------------------------


def run_straight_and_resumed(root: Path, make_module, num_items: int, **trainer_kwargs: Any) -> dict[str, Any]:
    straight, resumed = root / "A", root / "C"
    make_trainer(straight, 2, save=True, **trainer_kwargs).fit(make_module(straight), toys.toy_loader(num_items))
    ckpt = straight / "ckpt" / "epoch=0.ckpt"
    make_trainer(resumed, 2, **trainer_kwargs).fit(make_module(resumed), toys.toy_loader(num_items), ckpt_path=ckpt)
    return {"A": load_records(straight), "C": load_records(resumed), "ckpt": ckpt}


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_straight_and_resumed(
        tmp_path_factory.mktemp("single"),
        lambda out: toys.SingleEngineToy(str(out)),
        WORLD * toys.BATCH_PER_RANK * SINGLE_STEPS_PER_EPOCH,
        gradient_clip_val=SINGLE_CLIP,
    )


@pytest.fixture(scope="module")
def two_engine_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_straight_and_resumed(
        tmp_path_factory.mktemp("two"),
        lambda out: toys.TwoEngineToy(str(out)),
        WORLD * toys.BATCH_PER_RANK * TWO_STEPS_PER_EPOCH,
        engine_configs={name: {"gradient_clipping": clip} for name, clip in ENGINE_CLIPS.items()},
    )


# ----------------------------------------------------------------------------------------------------------------------
# plain PyTorch replays (independent references)
# ----------------------------------------------------------------------------------------------------------------------


def replay_single(initial: dict[str, torch.Tensor], epochs: int) -> tuple[list[list[torch.Tensor]], nn.Module, int]:
    net = toys.TinyMLP(toys.IN_DIM, toys.OUT_DIM)
    net.load_state_dict(submodule_state(initial, "net."))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    losses, clipped = [[] for _ in range(WORLD)], 0
    num_items = WORLD * toys.BATCH_PER_RANK * SINGLE_STEPS_PER_EPOCH
    for epoch in range(epochs):
        for per_rank in rank_batches(num_items, epoch):
            rank_losses = [toys.regression_loss(net, z, x) for z, x in per_rank]
            for rank, loss in enumerate(rank_losses):
                losses[rank].append(loss.detach())
            optimizer.zero_grad()
            (sum(rank_losses) / WORLD).backward()  # ZeRO averages the ranks' gradients
            clipped += int(torch.nn.utils.clip_grad_norm_(net.parameters(), SINGLE_CLIP) > SINGLE_CLIP)
            optimizer.step()
    return losses, net, clipped


def replay_two_engines(initial: dict[str, torch.Tensor], epochs: int) -> tuple[list[list[torch.Tensor]], dict, dict]:
    nets = {
        "generator": toys.TinyMLP(toys.IN_DIM, toys.OUT_DIM),
        "critic": toys.TinyMLP(toys.OUT_DIM, 1),
        "teacher": toys.TinyMLP(toys.OUT_DIM, 1),
    }
    for name, net in nets.items():
        net.load_state_dict(submodule_state(initial, name + "."))
    gen, critic, teacher = nets["generator"], nets["critic"], nets["teacher"]
    teacher.requires_grad_(False)
    opt_g = torch.optim.AdamW(gen.parameters(), **toys.GEN_OPT)
    opt_c = torch.optim.AdamW(critic.parameters(), **toys.CRITIC_OPT)
    losses: list[list[torch.Tensor]] = [[] for _ in range(WORLD)]
    clipped = {"generator": 0, "critic": 0}
    num_items = WORLD * toys.BATCH_PER_RANK * TWO_STEPS_PER_EPOCH
    for epoch in range(epochs):
        for step, per_rank in enumerate(rank_batches(num_items, epoch)):
            with torch.no_grad():
                fakes = [gen(z) for z, _ in per_rank]
            rank_losses = [toys.critic_loss(critic, teacher, f, x) for f, (_, x) in zip(fakes, per_rank)]
            opt_c.zero_grad()
            (sum(rank_losses) / WORLD).backward()
            norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), ENGINE_CLIPS["critic"])
            clipped["critic"] += int(norm > ENGINE_CLIPS["critic"])
            opt_c.step()
            for rank, loss in enumerate(rank_losses):
                losses[rank].append(loss.detach())
            if step % 2 == 1:
                critic.requires_grad_(False)
                rank_losses = [toys.generator_loss(critic, teacher, gen(z), x) for z, x in per_rank]
                opt_g.zero_grad()
                (sum(rank_losses) / WORLD).backward()
                norm = torch.nn.utils.clip_grad_norm_(gen.parameters(), ENGINE_CLIPS["generator"])
                clipped["generator"] += int(norm > ENGINE_CLIPS["generator"])
                opt_g.step()
                critic.requires_grad_(True)
                for rank, loss in enumerate(rank_losses):
                    losses[rank].append(loss.detach())
    final = {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
    return losses, final, clipped


# ----------------------------------------------------------------------------------------------------------------------
# distributed tests (2 spawned processes, ZeRO-3, gloo)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_engine_resume_is_bit_exact(single_runs: dict[str, Any]) -> None:
    for rank in range(WORLD):
        a, c = single_runs["A"][rank], single_runs["C"][rank]
        assert a["partitioned"] and c["partitioned"], "configure_model() modules must be created ZeRO-3 partitioned"
        assert len(a["losses"]) == 2 * SINGLE_STEPS_PER_EPOCH
        assert_same(a["losses"][SINGLE_STEPS_PER_EPOCH:], c["losses"], f"rank{rank}/losses")
        assert_same(a["final"], c["final"], f"rank{rank}/params")
        assert_same(a["optimizer"], c["optimizer"], f"rank{rank}/optimizer")
        assert int(a["optimizer"]["model"]["inner"][0]["step"]) == 2 * SINGLE_STEPS_PER_EPOCH
    assert_same(single_runs["A"][0]["final"], single_runs["A"][1]["final"], "ranks disagree")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_engine_matches_plain_pytorch(single_runs: dict[str, Any]) -> None:
    a = single_runs["A"]
    losses, net, clipped = replay_single(a[0]["initial"], epochs=2)
    assert clipped > 0, "the reference never clipped: the test would not see gradient clipping"
    for rank in range(WORLD):
        torch.testing.assert_close(torch.stack(a[rank]["losses"]), torch.stack(losses[rank]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(submodule_state(a[0]["final"], "net."), net.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_engines_resume_is_bit_exact_and_idle_engine_stays(two_engine_runs: dict[str, Any]) -> None:
    for rank in range(WORLD):
        a, c = two_engine_runs["A"][rank], two_engine_runs["C"][rank]
        assert a["partitioned"], "generator and critic must be created ZeRO-3 partitioned"
        for shape, dtype, requires_grad, partitioned in a["teacher"]:
            assert shape.numel() > 0 and dtype == torch.float32 and not requires_grad and not partitioned
        kinds = [kind for kind, _ in a["losses"]]
        assert kinds.count("critic") == 2 * TWO_STEPS_PER_EPOCH and kinds.count("generator") == TWO_STEPS_PER_EPOCH
        per_epoch = len(a["losses"]) // 2
        assert_same(a["losses"][per_epoch:], c["losses"], f"rank{rank}/losses")
        assert_same(a["final"], c["final"], f"rank{rank}/params")
        assert_same(a["optimizer"], c["optimizer"], f"rank{rank}/optimizer")
        assert all(a["idle_unchanged"]) and all(c["idle_unchanged"]), "an idle engine moved on the other's step"
        assert all(a["active_changed"]), "a stepping engine did not move"
        steps = {name: int(snap["inner"][0]["step"]) for name, snap in a["optimizer"].items()}
        assert steps == {"generator": TWO_STEPS_PER_EPOCH, "critic": 2 * TWO_STEPS_PER_EPOCH}
        groups = a["optimizer"]
        assert groups["generator"]["param_groups"][0]["betas"] == toys.GEN_OPT["betas"]
        assert groups["critic"]["param_groups"][0]["betas"] == toys.CRITIC_OPT["betas"]
    initial_teacher = submodule_state(two_engine_runs["A"][0]["initial"], "teacher.")
    assert_same(submodule_state(two_engine_runs["C"][0]["final"], "teacher."), initial_teacher, "teacher moved")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_engines_match_plain_pytorch(two_engine_runs: dict[str, Any]) -> None:
    a = two_engine_runs["A"]
    losses, final, clipped = replay_two_engines(a[0]["initial"], epochs=2)
    assert clipped["critic"] > 0 and clipped["generator"] > 0, "per-engine clipping must be exercised"
    for rank in range(WORLD):
        got = torch.stack([loss for _, loss in a[rank]["losses"]])
        torch.testing.assert_close(got, torch.stack(losses[rank]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[0]["final"], final, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_declared_engine_with_automatic_optimization_matches_plain_pytorch(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 2, engine_configs={"net": {"gradient_clipping": SINGLE_CLIP}})
    num_items = WORLD * toys.BATCH_PER_RANK * SINGLE_STEPS_PER_EPOCH
    trainer.fit(toys.DeclaredEngineToy(str(tmp_path)), toys.toy_loader(num_items))
    records = load_records(tmp_path)
    assert records[0]["partitioned"]
    losses, net, _ = replay_single(records[0]["initial"], epochs=2)
    for rank in range(WORLD):
        got = torch.stack(records[rank]["losses"])
        torch.testing.assert_close(got, torch.stack(losses[rank]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(submodule_state(records[0]["final"], "net."), net.state_dict(), rtol=1e-5, atol=1e-6)
    assert int(records[0]["optimizer"]["net"]["inner"][0]["step"]) == 2 * SINGLE_STEPS_PER_EPOCH


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_zero_checkpoint_state_dict_single_engine(single_runs: dict[str, Any]) -> None:
    ckpt = single_runs["ckpt"]
    state = load_zero_checkpoint_state_dict(ckpt)
    saved = single_runs["A"][0]["epoch_end"][0]
    assert_same(state, saved)
    module = toys.SingleEngineToy("unused")
    module.configure_model()
    module.load_state_dict(state, strict=True)
    assert checkpoint_world_size(ckpt) == WORLD and checkpoint_engine_names(ckpt) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_zero_checkpoint_state_dict_two_engines(two_engine_runs: dict[str, Any]) -> None:
    ckpt = two_engine_runs["ckpt"]
    assert checkpoint_engine_names(ckpt) == ["generator", "critic"]
    assert checkpoint_world_size(ckpt) == WORLD
    saved = two_engine_runs["A"][0]["epoch_end"][0]
    nets = {"generator": toys.TinyMLP(toys.IN_DIM, toys.OUT_DIM), "critic": toys.TinyMLP(toys.OUT_DIM, 1)}
    for name, net in nets.items():
        state = load_zero_checkpoint_state_dict(ckpt, name)
        net.load_state_dict(state, strict=True)
        assert_same(state, submodule_state(saved, name + "."))
    with pytest.raises(ValueError, match="pass engine="):
        load_zero_checkpoint_state_dict(ckpt)
    with pytest.raises(ValueError, match="no engine 'teacher'"):
        load_zero_checkpoint_state_dict(ckpt, "teacher")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_other_world_size_cannot_resume_but_can_validate(two_engine_runs: dict[str, Any], tmp_path: Path) -> None:
    ckpt = two_engine_runs["ckpt"]
    with pytest.raises(Exception) as error:
        make_trainer(tmp_path, 2, devices=1).fit(toys.TwoEngineToy(str(tmp_path)), toys.toy_loader(8), ckpt_path=ckpt)
    message = str(error.value)
    assert "world size 2" in message and "world size 1" in message and "cf convert zero" in message

    # Validation gathers each engine's shards, so it does not depend on the world size that wrote them.
    trainer = make_trainer(tmp_path, 1, devices=1)
    trainer.validate(toys.TwoEngineToy(str(tmp_path)), toys.toy_loader(8), ckpt_path=ckpt)
    weights = two_engine_runs["A"][0]["epoch_end"][0]
    nets = {"generator": toys.TinyMLP(toys.IN_DIM, toys.OUT_DIM), "critic": toys.TinyMLP(toys.OUT_DIM, 1)}
    nets["teacher"] = toys.TinyMLP(toys.OUT_DIM, 1)
    for name, net in nets.items():
        net.load_state_dict(submodule_state(weights, name + "."))
    z, x = toys.toy_dataset(8).tensors
    with torch.no_grad():
        expected = torch.stack([
            toys.generator_loss(nets["critic"], nets["teacher"], nets["generator"](z[i:i + 2]), x[i:i + 2])
            for i in range(0, 8, 2)
        ]).mean()
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_gradient_accumulation_matches_plain_pytorch(tmp_path: Path) -> None:
    """The critic engine accumulates over 2 opt.step() calls; modules are called directly, not through the engine."""
    num_items = WORLD * toys.BATCH_PER_RANK * TWO_STEPS_PER_EPOCH
    trainer = make_trainer(tmp_path, 1, engine_configs={"critic": {"gradient_accumulation_steps": 2}})
    trainer.fit(toys.TwoEngineToy(str(tmp_path), zero_grad=False), toys.toy_loader(num_items))
    records = load_records(tmp_path)

    nets = {
        "generator": toys.TinyMLP(toys.IN_DIM, toys.OUT_DIM),
        "critic": toys.TinyMLP(toys.OUT_DIM, 1),
        "teacher": toys.TinyMLP(toys.OUT_DIM, 1),
    }
    for name, net in nets.items():
        net.load_state_dict(submodule_state(records[0]["initial"], name + "."))
    gen, critic, teacher = nets["generator"], nets["critic"], nets["teacher"]
    teacher.requires_grad_(False)
    opt_g = torch.optim.AdamW(gen.parameters(), **toys.GEN_OPT)
    opt_c = torch.optim.AdamW(critic.parameters(), **toys.CRITIC_OPT)
    losses: list[list[torch.Tensor]] = [[] for _ in range(WORLD)]
    opt_c.zero_grad()
    for step, per_rank in enumerate(rank_batches(num_items, 0)):
        with torch.no_grad():
            fakes = [gen(z) for z, _ in per_rank]
        rank_losses = [toys.critic_loss(critic, teacher, f, x) for f, (_, x) in zip(fakes, per_rank)]
        (sum(rank_losses) / WORLD / 2).backward()  # DeepSpeed divides by its accumulation steps
        losses = [acc + [loss.detach()] for acc, loss in zip(losses, rank_losses)]
        if step % 2 == 1:
            opt_c.step()
            opt_c.zero_grad()
            critic.requires_grad_(False)
            rank_losses = [toys.generator_loss(critic, teacher, gen(z), x) for z, x in per_rank]
            opt_g.zero_grad()
            (sum(rank_losses) / WORLD).backward()
            opt_g.step()
            critic.requires_grad_(True)
            losses = [acc + [loss.detach()] for acc, loss in zip(losses, rank_losses)]
    for rank in range(WORLD):
        got = torch.stack([loss for _, loss in records[rank]["losses"]])
        torch.testing.assert_close(got, torch.stack(losses[rank]), rtol=1e-5, atol=1e-6)
    final = {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
    torch.testing.assert_close(records[0]["final"], final, rtol=1e-5, atol=1e-6)
    assert int(records[0]["optimizer"]["critic"]["inner"][0]["step"]) == TWO_STEPS_PER_EPOCH // 2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_dying_rank_fails_the_fit_instead_of_hanging(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="rank 1 died on purpose"):
        make_trainer(tmp_path, 1).fit(toys.DyingToy(str(tmp_path)), toys.toy_loader(12))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hung_workers_are_killed_after_the_process_timeout() -> None:
    port_before = os.environ.get("MASTER_PORT")
    strategy = DeepSpeedStrategy(
        parallel_devices=[torch.device("cpu")] * WORLD, cluster_environment=LightningEnvironment(), start_method="spawn"
    )
    launcher = ZeroSpawnLauncher(strategy, timeout=5)
    with pytest.raises(TimeoutError, match="did not finish within 5"):
        launcher.launch(toys.sleep_forever)
    assert all(not p.is_alive() for p in launcher.procs)
    assert os.environ.get("MASTER_PORT") == port_before, "the launcher must leave MASTER_PORT as it found it"


# ----------------------------------------------------------------------------------------------------------------------
# fast tests (no processes)
# ----------------------------------------------------------------------------------------------------------------------


def test_registry_and_spawn_launcher_under_pytest() -> None:
    assert "cf_deepspeed_stage_3" in StrategyRegistry
    trainer = Trainer(strategy="cf_deepspeed_stage_3", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3
    assert isinstance(trainer.strategy.launcher, ZeroSpawnLauncher)


def test_engine_of_a_loss_is_read_from_its_graph() -> None:
    gen, critic, frozen = nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 1)
    frozen.requires_grad_(False)
    owner = {id(p): "gen" for p in gen.parameters()} | {id(p): "critic" for p in critic.parameters()}
    z = torch.randn(4, 3)
    assert engines_in_graph(critic(gen(z).detach()).mean() + frozen(z).mean(), owner) == {"critic"}
    critic.requires_grad_(False)
    assert engines_in_graph((critic(gen(z)) - frozen(gen(z))).mean(), owner) == {"gen"}
    critic.requires_grad_(True)
    assert engines_in_graph(critic(gen(z)).mean(), owner) == {"gen", "critic"}


def test_merge_config_is_deep_and_leaves_base_alone() -> None:
    base = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 10}, "gradient_clipping": 1.0}
    merged = merge_engine_config(base, {"zero_optimization": {"reduce_bucket_size": 5}, "gradient_clipping": 2.0})
    assert merged == {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5}, "gradient_clipping": 2.0}
    assert base["zero_optimization"]["reduce_bucket_size"] == 10 and base["gradient_clipping"] == 1.0


class _Declaring(LightningModule):
    def __init__(self, declared: dict[str, Any]) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))
        self.declared = declared

    def deepspeed_submodules(self) -> dict[str, nn.Module]:
        return {k: getattr(self, v) if isinstance(v, str) else v for k, v in self.declared.items()}


@pytest.mark.parametrize(
    ("declared", "engine_configs", "match"),
    [
        ({}, None, "non-empty dict"),
        ({"a/b": "a"}, None, "directory name"),
        ({"x": nn.Linear(2, 2)}, None, "must be a submodule"),
        ({"x": "b", "y": "b"}, None, "overlap"),
        ({"a": "a"}, {"critic": {}}, "engine_configs names"),
    ],
)
def test_bad_deepspeed_submodules_are_refused_clearly(
    declared: dict, engine_configs: Optional[dict], match: str
) -> None:
    strategy = DeepSpeedStrategy(stage=3, engine_configs=engine_configs)
    with pytest.raises(MisconfigurationException, match=match):
        strategy._declared_submodules(_Declaring(declared))


def test_modules_outside_the_engines_are_frozen_and_cast_to_the_compute_dtype() -> None:
    strategy = DeepSpeedStrategy(
        config={"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
        parallel_devices=[torch.device("cpu")],
    )
    module = _Declaring({"a": "a"})
    teacher_before = [p.detach().clone() for p in module.b.parameters()]
    strategy._prepare_modules_outside_engines(module, strategy._declared_submodules(module))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in module.a.parameters())
    for p, before in zip(module.b.parameters(), teacher_before):
        assert p.dtype == torch.bfloat16 and not p.requires_grad
        torch.testing.assert_close(p, before.to(torch.bfloat16), rtol=0, atol=0)
    partitioning = DeepSpeedStrategy(stage=3, frozen_modules="partition", parallel_devices=[torch.device("cpu")])
    with pytest.raises(NotImplementedError, match="frozen_modules='replicate'"):
        partitioning._prepare_modules_outside_engines(module, {"a": module.a})


def test_bad_options_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frozen_modules"):
        DeepSpeedStrategy(frozen_modules="shard")
    with pytest.raises(ValueError, match="start_method"):
        DeepSpeedStrategy(start_method="thread")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_zero_checkpoint_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        load_zero_checkpoint_state_dict(tmp_path)


def test_checkpoint_world_size_reads_the_shard_files(tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch=0.ckpt"
    for name in ("gen", "critic"):
        (ckpt / name / "checkpoint").mkdir(parents=True)
        (ckpt / name / "latest").write_text("checkpoint")
        for rank in range(3):
            (ckpt / name / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
            (ckpt / name / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
    (ckpt / "zero_engines.json").write_text(json.dumps({"engines": ["gen", "critic"]}))
    assert checkpoint_engine_names(ckpt) == ["gen", "critic"]
    assert checkpoint_world_size(ckpt) == 3
    os.remove(ckpt / "critic" / "checkpoint" / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    assert checkpoint_world_size(ckpt, "critic") == 2
    with pytest.raises(RuntimeError, match="inconsistent"):
        checkpoint_world_size(ckpt)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json_configs_build_a_zero3_strategy(path: Path) -> None:
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == 3
    strategy = DeepSpeedStrategy(config=str(path))
    assert strategy.zero_stage_3 and strategy.config == config


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.yaml")), ids=lambda p: p.name)
def test_strategy_yamls_instantiate(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from jsonargparse import ArgumentParser

    monkeypatch.chdir(REPO)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": yaml.safe_load(path.read_text())})).strategy
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
