"""callbacks.finite_guard.FiniteGuard: a NaN/inf loss or gradient norm stops the fit with the step and the quantity
named, before the optimizer applies it and before any checkpoint of the bad state is written."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from callbacks.finite_guard import FiniteGuard, NonFiniteTrainingError
from cf.lit.ode_init import ODEInitStudent
from cf.lit.student import CDMDStudent
from cf.lit.teacher import TeacherERFT
from cf.memory import MemoryConfig
from cf.models.wan import WanConfig
from cf.rollout import RolloutConfig
from helpers.student_args import student_args
from data import VideoDataModule

REPO = Path(__file__).resolve().parents[1]
TINY = WanConfig.tiny()


def latent_batches(num: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"latents": torch.randn(1, 4, 6, 4, 4, generator=g), "text": torch.randn(1, 8, 32, generator=g)}
            for _ in range(num)]


class PoisonedTeacher(TeacherERFT):
    """The toy teacher whose loss becomes NaN at training step ``nan_step`` (1-based, like checkpoint names)."""

    nan_step = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step + 1 == self.nan_step else loss


def teacher(cls: type = TeacherERFT, **overrides) -> TeacherERFT:
    args = dict(network=TINY, finetune="full", autoencoder=None, text_encoder=None, layout="dense", lr=1e-3,
                erft={"num_buckets": 2, "capacity": 2, "warmup_steps": 0})
    args.update(overrides)
    torch.manual_seed(0)
    return cls(**args)


def guarded_trainer(root: Path, max_steps: int, extra: list | None = None) -> pl.Trainer:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1,
                                               save_top_k=-1, save_last=True)
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[FiniteGuard(), checkpoints, *(extra or [])])


def assert_last_is_step(root: Path, step: int, module: pl.LightningModule) -> None:
    """last.ckpt holds exactly the step-``step`` checkpoint, nothing later was saved, and the module still holds
    those weights (the bad update was never applied)."""
    names = sorted(p.name for p in root.glob("*.ckpt"))
    assert names == sorted(["last.ckpt", *(f"step={s}.ckpt" for s in range(1, step + 1))])
    last = torch.load(root / "last.ckpt", map_location="cpu", weights_only=False)
    good = torch.load(root / f"step={step}.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == good["global_step"] == step
    assert last["state_dict"].keys() == good["state_dict"].keys()
    for key, value in good["state_dict"].items():
        assert torch.equal(last["state_dict"][key], value), key
        assert torch.equal(module.state_dict()[key], value), key
    for a, b in zip(last["optimizer_states"], good["optimizer_states"]):
        for index, state in b["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(a["state"][index][name]), torch.as_tensor(value))


def test_nan_loss_at_step_k_stops_with_the_step_and_last_ckpt_at_k_minus_1(tmp_path: Path) -> None:
    module = teacher(PoisonedTeacher)
    trainer = guarded_trainer(tmp_path, max_steps=6)
    with pytest.raises(NonFiniteTrainingError, match=r"the loss of the network is nan at training step 3 \(epoch 0, "
                                                     r"batch 2\)\. The fit stops before the optimizer applies it"):
        trainer.fit(module, train_dataloaders=DataLoader(latent_batches(6), batch_size=None))
    assert_last_is_step(tmp_path, 2, module)


def test_a_diverging_learning_rate_stops_the_fit_at_the_first_bad_step(tmp_path: Path) -> None:
    module = teacher(lr=1e30)
    trainer = guarded_trainer(tmp_path, max_steps=20)
    with pytest.raises(NonFiniteTrainingError) as error:
        trainer.fit(module, train_dataloaders=DataLoader(latent_batches(20), batch_size=None))
    message = str(error.value)
    step = int(re.search(r"at training step (\d+) ", message).group(1))
    assert 1 < step < 20, message
    assert re.search(r"the (loss|gradient norm) of the network is (nan|inf|-inf)", message), message
    assert_last_is_step(tmp_path, step - 1, module)


# ----------------------------------------------------------------------------------------------------------------------
# The student (manual optimisation): the network is named
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle moves left\n")
    return str(path)


def student(teacher_file: str) -> CDMDStudent:
    module = CDMDStudent(**student_args(
        network=TINY, teacher_weights=teacher_file, latent_size=(4, 4), text_encoder_args={"dim": 32, "max_length": 8},
        memory=MemoryConfig(), critic_steps_per_generator_step=2, val_num_frames=6, generator_lr=1e-3, critic_lr=1e-3,
        rollout=RolloutConfig(min_blocks=2, max_blocks=2, grad_window_frames=3), target_window=6))
    module.configure_model()
    return module


def poison(module: CDMDStudent, phase: str, step: int, where: str) -> None:
    """Make the ``phase`` loss NaN (``where="loss"``), or only its gradients (``"grad"``), at trainer step ``step``
    (1-based)."""
    original = getattr(module, f"{phase}_loss")

    def poisoned(captions, trainer_step, micro=0):
        loss, stats = original(captions, trainer_step, micro)
        if trainer_step + 1 == step:
            if where == "loss":
                loss = loss * float("nan")
            else:
                loss.register_hook(lambda grad: grad * float("nan"))
        return loss, stats

    setattr(module, f"{phase}_loss", poisoned)


@pytest.mark.parametrize("phase, where, step, match", [
    ("critic", "grad", 2, r"the gradient norm of the critic is nan at training step 2"),
    ("generator", "loss", 3, r"the loss of the generator is nan at training step 3"),
])
def test_student_names_the_network(teacher_file: str, prompt_file: str, tmp_path: Path, phase: str, where: str,
                                   step: int, match: str) -> None:
    module = student(teacher_file)
    poison(module, phase, step, where)
    trainer = guarded_trainer(tmp_path, max_steps=5)
    with pytest.raises(NonFiniteTrainingError, match=match):
        trainer.fit(module, VideoDataModule(mode="prompts", prompt_file=prompt_file, batch_size=1, num_workers=0))
    assert_last_is_step(tmp_path, step - 1, module)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed engines and logged values (checked at the end of the batch)
# ----------------------------------------------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self, norm: float | None, fp16: bool = False) -> None:
        self.norm, self.fp16 = norm, fp16

    def get_global_grad_norm(self) -> float | None:
        return self.norm

    def fp16_enabled(self) -> bool:
        return self.fp16


def fake_trainer(engines: dict, metrics: dict) -> SimpleNamespace:
    strategy = SimpleNamespace(engines=engines, reduce_boolean_decision=lambda decision, all=True: decision)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=6))
    return SimpleNamespace(strategy=strategy, callback_metrics=metrics, global_step=7, current_epoch=0,
                           fit_loop=loop)


def test_engine_and_logged_values_are_checked_at_batch_end() -> None:
    guard = FiniteGuard()
    fine = fake_trainer({"generator": FakeEngine(1.5), "critic": FakeEngine(None)},
                        {"train/critic_loss": torch.tensor(0.3), "val/flow_loss": torch.tensor(float("nan"))})
    guard.on_train_batch_end(fine, None, None, {}, 6)
    skipped = fake_trainer({"critic": FakeEngine(float("inf"))}, {})
    with pytest.raises(NonFiniteTrainingError, match=r"the gradient norm of the DeepSpeed engine 'critic' is inf "
                                                     r"\(the engine skipped the step\) at training step 7"):
        guard.on_train_batch_end(skipped, None, None, {}, 6)
    guard.on_train_batch_end(fake_trainer({"critic": FakeEngine(float("inf"), fp16=True)}, {}), None, None, {}, 6)
    logged = fake_trainer({}, {"train/generator_grad_norm": torch.tensor(float("inf"))})
    with pytest.raises(NonFiniteTrainingError, match=r"the logged train/generator_grad_norm is inf at training step 7"
                                                     r" \(epoch 0, batch 6\)"):
        guard.on_train_batch_end(logged, None, None, {}, 6)


def test_every_training_config_has_the_guard() -> None:
    configs = sorted((REPO / "configs").glob("*/*.yaml"))
    full = [path for path in configs if "callbacks" in (yaml.safe_load(path.read_text()).get("trainer") or {})]
    assert len(full) >= 9
    for path in full:
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        assert "callbacks.finite_guard.FiniteGuard" in [c["class_path"] for c in callbacks], path


class PoisonedODEInit(ODEInitStudent):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + float("inf") if self.global_step + 1 == 2 else loss


def test_ode_init_student_stops_naming_the_generator(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    pairs = [{"ode": torch.randn(1, 5, 4, 6, 4, 4, generator=g), "text": torch.randn(1, 8, 32, generator=g)}
             for _ in range(4)]
    torch.manual_seed(0)
    module = PoisonedODEInit(network=TINY, lr=1e-3)
    with pytest.raises(NonFiniteTrainingError, match=r"the loss of the generator is inf at training step 2"):
        guarded_trainer(tmp_path, max_steps=4).fit(module, train_dataloaders=DataLoader(pairs, batch_size=None))
    assert_last_is_step(tmp_path, 1, module)
