"""Exact resume at any step, mid-epoch included: a run SIGKILLed after its checkpoint at step k and resumed from it
reaches step N with exactly the weights, optimizer states (and error banks / EMA) of an uninterrupted run.

Each run is a real subprocess; `resume_toys.KillAtStep` SIGKILLs its whole process group (ranks and data workers)
at the end of step k + 1, after the checkpoint of step k was written. The checkpoints fall inside an epoch, so the
data position (batches already consumed of the epoch) has to be restored, not only the epoch. The same test of the
student on 2 ZeRO-3 ranks is in tests/test_zero3_modules.py, beside the uninterrupted run it is compared with.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_configs_student import SHRINK
from resume_toys import run_in_own_group
from test_zero3_modules import assert_same
from data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
TEACHER_TOY = REPO / "configs" / "toy" / "teacher_erft.yaml"
NETWORK = next(arg for arg in SHRINK if arg.startswith("--model.init_args.network="))


def trained_state(path: Path) -> dict:
    """What must be equal after resuming: weights, optimizer states, loop counters and the module's own state."""
    checkpoint = torch.load(path, weights_only=False)
    keep = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "erft_state", "cdmd_counters",
            "callbacks")
    state = {key: checkpoint[key] for key in keep if key in checkpoint}
    state["data_position"] = checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader")  # a later resume
    # callback states (the EMA shadow) without the checkpoint callback's own, which names its run's folder
    state["callbacks"] = {k: v for k, v in state.get("callbacks", {}).items() if not k.startswith("ModelCheckpoint")}
    return state


# ----------------------------------------------------------------------------------------------------------------------
# the loader alone: stopped after any batch and restored, it continues with the batches an unstopped loader yields
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers,resampled", [(0, False), (2, True), (2, False)])
def test_loader_restored_mid_epoch_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     num_workers: int, resampled: bool) -> None:
    from test_zero3_modules import write_latent_shards
    from data.loader import EpochDataLoader
    from data.pipeline import ShardStream, StreamConfig

    decoded: list[str] = []  # samples decoded in this process (all of them without workers)
    decode = ShardStream._decode_latents
    monkeypatch.setattr(ShardStream, "_decode_latents",
                        lambda self, sample, *args: decoded.append(sample["__key__"]) or decode(self, sample, *args))

    urls = write_latent_shards(tmp_path, num_shards=4, per_shard=3)
    # 5 batches per epoch (uneven worker shares) with resampling, whole shards once per epoch without
    config = StreamConfig(mode="latents", batch_size=2, shuffle_buffer=3, resampled=resampled,
                          batches_per_epoch=5 if resampled else None, seed=1)

    def loader(consumed=None) -> EpochDataLoader:
        return EpochDataLoader(ShardStream(urls, config), batch_size=None, num_workers=num_workers, consumed=consumed)

    def keys(batch: dict) -> tuple:
        assert "_stream_position" not in batch
        return tuple(batch["key"]) + (float(batch["latents"].sum()),)

    reference = loader()
    epochs = [[keys(b) for b in reference] for _ in range(2)]
    decoded_per_epoch = len(decoded) // 2
    assert epochs[0] != epochs[1] and len(epochs[0]) >= 4
    for stop in range(1, len(epochs[0])):
        # training has taken `stop` batches while the loader already handed out one more (Lightning's prefetch)
        first = loader(consumed=lambda: (stop, False))
        iterator = iter(first)
        seen = [keys(next(iterator)) for _ in range(stop + 1)][:stop]
        state = first.state_dict()
        assert state["batches"] == stop and state["epochs_started"] == 1
        # positions per worker when the workers' batches come strictly in turn: no decoding of what was read
        assert ("workers" in state) == (resampled or num_workers == 0)
        resumed = loader()
        resumed.load_state_dict(state)
        decoded.clear()
        rest = [keys(b) for b in resumed]
        assert seen + rest == epochs[0], f"resumed after batch {stop}"
        if num_workers == 0:  # only the samples of the batches still to come were decoded
            assert 0 < len(decoded) <= decoded_per_epoch - 2 * stop
        assert [keys(b) for b in resumed] == epochs[1]
        end = resumed.state_dict()
        assert end == {"epochs_started": 2, "batches": 0}


# ----------------------------------------------------------------------------------------------------------------------
# the teacher: the toy config (video shards, teacher clip mix, a data worker), 1 process
# ----------------------------------------------------------------------------------------------------------------------

TEACHER_EPOCH = 4  # batches per epoch
TEACHER_K, TEACHER_N = 3, 6  # checkpoints at steps 3 (epoch 0, batch 3 of 4) and 6 (epoch 1, batch 2 of 4)


def teacher_fit(root: Path, data: Path, shards: str, kill_at: int | None, ckpt_path: Path | None,
                num_workers: int) -> int:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "ckpt"), "filename": "{step}", "save_last": True,
                                "every_n_train_steps": TEACHER_K, "save_top_k": -1}}]
    if kill_at is not None:
        callbacks.append({"class_path": "resume_toys.KillAtStep", "init_args": {"step": kill_at}})
    overrides = root / "overrides.yaml"
    root.mkdir(parents=True, exist_ok=True)
    overrides.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "logger": False}}))
    argv = [sys.executable, "-m", "cf", "fit", "--config", str(TEACHER_TOY), "--config", str(overrides), NETWORK,
            "--model.init_args.init_weights=null", f"--data.init_args.train_urls={shards}",
            f"--data.init_args.num_workers={num_workers}", f"--data.init_args.batches_per_epoch={TEACHER_EPOCH}",
            f"--trainer.max_steps={TEACHER_N}", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
            # errors injected from the first step on, caption dropout drawn: every random stream is exercised
            "--model.init_args.erft.warmup_steps=1", "--model.init_args.caption_dropout=0.3"]
    if ckpt_path is not None:
        argv.append(f"--ckpt_path={ckpt_path}")
    return run_in_own_group(argv, REPO, timeout=400, env={"CF_DATA": str(data), "CF_RUNS": str(root / "runs")})


@pytest.fixture(scope="module")
def teacher_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    data = tmp_path_factory.mktemp("teacher_data")
    shards = write_synthetic_shards(str(data), num_clips=3, seed=5, splits={"train": 2, "val": 1}, maxcount=1,
                                    min_seconds=10.0, max_seconds=10.5, num_workers=1)
    return data, shards["train"]["urls"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("num_workers", [2])
def test_teacher_killed_mid_epoch_resumes_bit_exact(teacher_shards: tuple[Path, str], tmp_path: Path,
                                                    num_workers: int) -> None:
    data, shards = teacher_shards
    assert teacher_fit(tmp_path / "straight", data, shards, None, None, num_workers) == 0
    assert teacher_fit(tmp_path / "killed", data, shards, TEACHER_K + 1, None, num_workers) == -signal.SIGKILL
    ckpt = tmp_path / "killed" / "ckpt" / f"step={TEACHER_K}.ckpt"
    assert ckpt.is_file() and not (tmp_path / "killed" / "ckpt" / f"step={TEACHER_N}.ckpt").exists()
    assert teacher_fit(tmp_path / "resumed", data, shards, None, ckpt, num_workers) == 0

    name = f"step={TEACHER_N}.ckpt"
    straight = trained_state(tmp_path / "straight" / "ckpt" / name)
    resumed = trained_state(tmp_path / "resumed" / "ckpt" / name)
    assert straight["global_step"] == TEACHER_N
    assert_same(resumed, straight, "resumed vs uninterrupted")
    start = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(not torch.equal(v, straight["state_dict"][k]) for k, v in start.items()), "no training after step k"
    loader = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader[0]["epochs_started"] == 1 and loader[0]["batches"] == TEACHER_K  # epoch 0, 3 batches consumed
    # where each worker's stream stood: the resumed workers skipped those samples without decoding them
    assert sorted(loader[0]["workers"]) == list(range(num_workers))


# ----------------------------------------------------------------------------------------------------------------------
# the student: stage 2 on the endless prompt stream (one epoch that never ends: every checkpoint is mid-epoch)
# ----------------------------------------------------------------------------------------------------------------------

STUDENT_TOY = REPO / "configs" / "toy" / "student_stage2.yaml"
STUDENT_K, STUDENT_N = 3, 6
PROMPTS = ["a red circle moves left", "a blue square falls", "a green star spins", "two yellow dots bounce",
           "a purple line grows"]


@pytest.fixture(scope="module")
def student_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny teacher weights and prompt files (``<data>/{train,val}/prompts.txt``, as the toy configs read)."""
    from cf.models.wan import WanConfig, WanDiT
    from cf.weights import save_wan_weights

    root = tmp_path_factory.mktemp("student_inputs")
    torch.manual_seed(0)
    network = json.loads(NETWORK.split("=", 1)[1])
    save_wan_weights(WanDiT(WanConfig(**network)), root / "teacher.safetensors")
    for split in ("train", "val"):
        (root / "data" / split).mkdir(parents=True)
        (root / "data" / split / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"CF_TEACHER": str(root / "teacher.safetensors"), "CF_DATA": str(root / "data")}


def student_fit(root: Path, inputs: dict[str, str], kill_at: int | None, ckpt_path: Path | None,
                num_workers: int) -> int:
    callbacks = [{"class_path": "callbacks.ema.EMA", "init_args": {"decay": 0.5, "start_step": 2}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "ckpt"), "filename": "{step}", "save_last": True,
                                "every_n_train_steps": STUDENT_K, "save_top_k": -1}}]
    if kill_at is not None:
        callbacks.append({"class_path": "resume_toys.KillAtStep", "init_args": {"step": kill_at}})
    root.mkdir(parents=True, exist_ok=True)
    overrides = root / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "logger": False}}))
    argv = [sys.executable, "-m", "cf", "fit", "--config", str(STUDENT_TOY), "--config", str(overrides), NETWORK,
            "--model.init_args.latent_size=[4, 4]", "--model.init_args.generator_weights=null",
            "--model.init_args.optimization.critic_steps_per_generator_step=2",
            f"--data.init_args.num_workers={num_workers}", f"--trainer.max_steps={STUDENT_N}",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}"]
    if ckpt_path is not None:
        argv.append(f"--ckpt_path={ckpt_path}")
    return run_in_own_group(argv, REPO, timeout=400, env={**inputs, "CF_RUNS": str(root / "runs")})


@pytest.mark.timeout(900)
def test_student_killed_mid_epoch_resumes_bit_exact(student_inputs: dict[str, str], tmp_path: Path) -> None:
    assert student_fit(tmp_path / "straight", student_inputs, None, None, 1) == 0
    assert student_fit(tmp_path / "killed", student_inputs, STUDENT_K + 1, None, 1) == -signal.SIGKILL
    ckpt = tmp_path / "killed" / "ckpt" / f"step={STUDENT_K}.ckpt"
    assert ckpt.is_file() and not (tmp_path / "killed" / "ckpt" / f"step={STUDENT_N}.ckpt").exists()
    assert student_fit(tmp_path / "resumed", student_inputs, None, ckpt, 1) == 0

    name = f"step={STUDENT_N}.ckpt"
    straight = trained_state(tmp_path / "straight" / "ckpt" / name)
    resumed = trained_state(tmp_path / "resumed" / "ckpt" / name)
    assert straight["global_step"] == STUDENT_N and straight["cdmd_counters"]["generator_updates"] == 3
    assert_same(resumed, straight, "resumed vs uninterrupted")
    (ema,) = [v for k, v in straight["callbacks"].items() if k.startswith("EMA")]
    assert ema, "the EMA must be in the compared state"
    loader = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == [{"epochs_started": 1, "batches": STUDENT_K}]  # the fit loop fetched batch 4 ahead already
