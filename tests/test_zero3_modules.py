"""Exact ZeRO-3 resume of the project's LightningModules: 2 CPU processes (gloo), sharded checkpoints.

For `TeacherERFT` (one engine) and `CDMDStudent` (two engines, EMA callback) three runs are made from the same seed:
"straight" runs N steps; "first" runs k steps and saves a sharded checkpoint; "resumed" continues it with
``ckpt_path`` to N steps. The first and resumed runs must replay the straight run bit for bit: per-step batches and
losses, and at the end the gathered parameters, every engine's per-rank fp32 master partition and Adam moments, and
the module's own state (both ranks' error banks, the EMA shadow, the step counters). As in the project's configs,
training is bounded by ``max_steps``, checkpoints are written every k steps, and the data come from
`data.VideoDataModule` streams. The teacher's k is one epoch (the epoch-dependent order is restored); the student's
k falls inside its endless prompt stream (the per-worker stream position is restored). The student is also SIGKILLed
right after its checkpoint, in a subprocess, and resumed from it to the straight run's end. Its checkpoint is then
exported with ``cf convert zero`` and generates a video.
"""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from webdataset import TarWriter

import zero3_module_toys as toys
from resume_toys import run_in_own_group
from callbacks.ema import EMA
from cf.cli import main as cf_main
from cf.generate import GeneratorSpec, generate_videos, load_generator
from cf.lit.student import CDMDStudent
from cf.lit.teacher import TeacherERFT
from cf.memory import MemoryConfig
from cf.models.wan import CausalWanDiT, WanConfig, WanDiT
from cf.rollout import RolloutConfig
from cf.strategies import DeepSpeedStrategy
from cf.zero import checkpoint_engine_names, checkpoint_world_size
from cf.video_io import decode_mp4
from cf.weights import save_wan_weights
from helpers.student_args import student_args
from data import VideoDataModule

REPO = Path(__file__).resolve().parents[1]
CPU_TEST_CONFIG = REPO / "configs" / "deepspeed" / "zero3_cpu_test.json"
WORLD = 2
TINY = WanConfig.tiny()
TEXT = {"dim": 32, "max_length": 8}

TEACHER_STEPS_PER_EPOCH = 3
STUDENT_K = 3  # the student's checkpoint step: generator updates at trainer steps 0, 2 (first segment) and 4
GENERATOR_EVERY = 2
EMA_START = 2
CLIP = 1.0
PROMPTS = ["a red circle moves left", "a blue square falls", "a green star spins", "two yellow dots bounce",
           "a purple line grows"]


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact equality of nested tensors / lists / dicts / scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ (max |diff| {float((a.double() - b.double()).abs().max())})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same(a: Any, b: Any) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


def zero3_trainer(root: Path, max_steps: int, callbacks: list[pl.Callback], save_every: Optional[int] = None,
                  devices: int = WORLD, engine_configs: Optional[dict[str, Any]] = None, **kwargs: Any) -> pl.Trainer:
    config = {**json.loads(CPU_TEST_CONFIG.read_text()), "train_micro_batch_size_per_gpu": 1}
    strategy = DeepSpeedStrategy(config=config, engine_configs=engine_configs, start_method="spawn",
                                 process_timeout=240, timeout=120)
    if save_every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root / "ckpt", filename="{step}",
                                                 every_n_train_steps=save_every, save_top_k=-1)]
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=devices, strategy=strategy,
                      max_steps=max_steps, logger=False, enable_checkpointing=bool(save_every), callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, use_distributed_sampler=False, **kwargs)


def three_runs(root: Path, k: int, fit: Callable[[Path, int, Optional[int], Optional[Path]], None]) -> dict[str, Any]:
    """straight: 2k steps; first: k steps, saved; resumed: from first's checkpoint to 2k steps, saved every k."""
    fit(root / "straight", 2 * k, None, None)
    fit(root / "first", k, k, None)
    ckpt = root / "first" / "ckpt" / f"step={k}.ckpt"
    fit(root / "resumed", 2 * k, k, ckpt)
    runs = {name: [torch.load(root / name / "records" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
            for name in ("straight", "first", "resumed")}
    return {**runs, "ckpt": ckpt, "final_ckpt": root / "resumed" / "ckpt" / f"step={2 * k}.ckpt"}


def assert_resume_exact(runs: dict[str, Any], k: int) -> None:
    """first + resumed == straight on every rank: steps, the state at the checkpoint and at the end."""
    for rank in range(WORLD):
        straight, first, resumed = (runs[name][rank] for name in ("straight", "first", "resumed"))
        assert len(straight["steps"]) == 2 * k and len(first["steps"]) == len(resumed["steps"]) == k
        assert_same(first["steps"], straight["steps"][:k], f"rank {rank} steps before the checkpoint")
        assert_same(resumed["steps"], straight["steps"][k:], f"rank {rank} steps after resuming")
        assert_same(resumed["start"], first["end"], f"rank {rank} state restored from the checkpoint")
        assert_same(resumed["end"], straight["end"], f"rank {rank} final state")
        assert resumed["global_step"] == straight["global_step"] == 2 * k


# ----------------------------------------------------------------------------------------------------------------------
# the teacher
# ----------------------------------------------------------------------------------------------------------------------


def teacher_module() -> TeacherERFT:
    """Tiny LoRA teacher on pre-encoded latents; errors are injected on every step and the banks are small."""
    return TeacherERFT(network=TINY, finetune="lora", lora_rank=4, lora_alpha=8.0, autoencoder=None, text_encoder=None,
                       layout="dense", lr=1e-2, erft={"num_buckets": 5, "capacity": 4, "warmup_steps": 1,
                                                      "clean_prob": 0.0, "noise_prob": 0.5})


def write_latent_shards(root: Path, num_shards: int = 3, per_shard: int = 2) -> str:
    """Latent-mode shards (``.latent.pth`` [4, 6, 4, 4], ``.text.pth`` [8, 32], ``.txt``); returns their URLs."""
    g = torch.Generator().manual_seed(0)
    for shard in range(num_shards):
        with TarWriter(str(root / f"latents-{shard:06d}.tar")) as sink:
            for item in range(per_shard):
                sample = {"__key__": f"clip{shard}{item}", "txt": f"clip {shard} {item}"}
                for member, shape in (("latent.pth", (4, 6, 4, 4)), ("text.pth", (8, 32))):
                    buffer = io.BytesIO()
                    torch.save(torch.randn(shape, generator=g), buffer)
                    sample[member] = buffer.getvalue()
                sink.write(sample)
    return str(root / f"latents-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    urls = write_latent_shards(tmp_path_factory.mktemp("latent_shards"))

    def fit(root: Path, max_steps: int, save_every: Optional[int], ckpt_path: Optional[Path]) -> None:
        torch.manual_seed(0)  # the spawned workers start from this process's random state (LoRA factors drawn from it)
        trainer = zero3_trainer(root, max_steps, [toys.TeacherRecorder(str(root / "records"))], save_every,
                                gradient_clip_val=CLIP)
        # as configs/toy/teacher_erft.yaml: shards resampled per rank and epoch, shuffled, fixed-length epochs
        data = VideoDataModule(train_urls=urls, mode="latents", batch_size=1, num_workers=0, resampled=True,
                               shuffle_buffer=4, batches_per_epoch=TEACHER_STEPS_PER_EPOCH, seed=0)
        trainer.fit(teacher_module(), datamodule=data, ckpt_path=ckpt_path)

    runs = three_runs(tmp_path_factory.mktemp("teacher"), TEACHER_STEPS_PER_EPOCH, fit)
    return {**runs, "urls": urls}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_teacher_resume_is_bit_exact(teacher_runs: dict[str, Any]) -> None:
    k = TEACHER_STEPS_PER_EPOCH
    assert_resume_exact(teacher_runs, k)
    assert checkpoint_world_size(teacher_runs["ckpt"]) == WORLD and checkpoint_engine_names(teacher_runs["ckpt"]) == []

    # the comparisons are not trivial
    straight = teacher_runs["straight"]
    for record in straight:
        start, end = record["start"], record["end"]
        moved = [key for key, value in start["network"].items()
                 if ".lora_B." in key and not torch.equal(value, end["network"][key])]
        assert len(moved) == 2 * 10, "training must move every LoRA B factor"
        inner = end["optimizer"]["inner"][0]
        assert int(inner["step"]) == 2 * k and float(inner["exp_avg_sq"].abs().max()) > 0
        assert len(end["banks"]["noise"]["entry_ids"]) == 5 and end["banks"]["noise"]["steps_seen"] == 2 * k
    banks = [record["end"]["banks"] for record in straight]
    assert not same(banks[0], banks[1]), "each rank keeps its own error banks"
    # the ranks read different samples, in an order that changes with the epoch (restored on resume)
    orders = [[step["keys"][0] for step in record["steps"]] for record in straight]
    assert orders[0] != orders[1]
    assert any(order[:k] != order[k:] for order in orders)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_teacher_checkpoint_refuses_another_world_size(teacher_runs: dict[str, Any], tmp_path: Path) -> None:
    trainer = zero3_trainer(tmp_path, 2 * TEACHER_STEPS_PER_EPOCH, [], devices=1, gradient_clip_val=CLIP)
    data = VideoDataModule(train_urls=teacher_runs["urls"], mode="latents", batch_size=1, num_workers=0)
    with pytest.raises(Exception) as error:
        trainer.fit(teacher_module(), datamodule=data, ckpt_path=teacher_runs["ckpt"])
    message = str(error.value)
    assert "world size 2" in message and "world size 1" in message and "cf convert zero" in message


# ----------------------------------------------------------------------------------------------------------------------
# the student
# ----------------------------------------------------------------------------------------------------------------------


def student_module(teacher_file: str) -> CDMDStudent:
    """Tiny stage-2 student: 5-block (15-frame) rollouts, 6 context + 6 target frames seen by teacher and critic."""
    return CDMDStudent(**student_args(
        network=TINY, teacher_weights=teacher_file, latent_size=(4, 4), text_encoder_args=TEXT, memory=MemoryConfig(),
        rollout=RolloutConfig(min_blocks=5, max_blocks=5, grad_window_frames=3), context_window=6, target_window=6,
        context_teacher=True, context_fake=True, guidance_scale=5.0, critic_time_weighting=True,
        reencode_image_latent=True, critic_steps_per_generator_step=GENERATOR_EVERY, generator_lr=1e-3,
        critic_lr=1e-3, generator_grad_clip=CLIP, critic_grad_clip=CLIP, val_num_frames=6))


@pytest.fixture(scope="module")
def student_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("student_inputs")
    torch.manual_seed(0)
    save_wan_weights(WanDiT(TINY), root / "teacher.safetensors")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"teacher": str(root / "teacher.safetensors"), "prompts": str(root / "prompts.txt")}


def fit_student(root: Path, max_steps: int, save_every: Optional[int], ckpt_path: Optional[Path], teacher: str,
                prompts: str, extra_callbacks: Sequence[pl.Callback] = ()) -> None:
    """The tiny stage-2 student on 2 ranks, recording every rank's steps and final state under ``root/records``; the
    same run in-process (the fixture) and in a subprocess that is SIGKILLed (``tests/resume_toys.py``)."""
    torch.manual_seed(0)
    engine = {"gradient_clipping": CLIP}
    # the recorder after the EMA: at train start the EMA attaches to the generator built in configure_model
    callbacks = [EMA(decay=0.5, start_step=EMA_START), toys.StudentRecorder(str(root / "records")), *extra_callbacks]
    trainer = zero3_trainer(root, max_steps, callbacks, save_every,
                            engine_configs={"generator": engine, "critic": engine})
    # the real prompt stream: endless per-rank permutations, read by one data worker per rank
    data = VideoDataModule(mode="prompts", prompt_file=prompts, batch_size=1, num_workers=1, seed=0)
    trainer.fit(student_module(teacher), datamodule=data, ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def student_runs(tmp_path_factory: pytest.TempPathFactory, student_files: dict[str, str]) -> dict[str, Any]:
    def fit(root: Path, max_steps: int, save_every: Optional[int], ckpt_path: Optional[Path]) -> None:
        fit_student(root, max_steps, save_every, ckpt_path, student_files["teacher"], student_files["prompts"])

    return three_runs(tmp_path_factory.mktemp("student"), STUDENT_K, fit)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_student_resume_is_bit_exact(student_runs: dict[str, Any]) -> None:
    k = STUDENT_K
    assert_resume_exact(student_runs, k)
    assert checkpoint_engine_names(student_runs["ckpt"]) == ["generator", "critic"]

    straight, first = student_runs["straight"], student_runs["first"]
    for record in straight:
        stepped = [step["generator_stepped"] for step in record["steps"]]
        assert stepped == [i % GENERATOR_EVERY == 0 for i in range(2 * k)]
        assert record["end"]["counters"] == (2 * k, 3, 2 * k, 2 * k)
        assert record["end"]["scheduler"]["last_epoch"] == 3  # one LR-schedule step per generator update
        for name in ("generator", "critic"):
            assert not same(record["start"][name], record["end"][name]), f"{name} did not train"
        optimizer = record["end"]["optimizer"]
        assert int(optimizer["generator"]["inner"][0]["step"]) == 3
        assert int(optimizer["critic"]["inner"][0]["step"]) == 2 * k
    for record in first:
        # the EMA started inside the first segment and was updated once there (generator update of step 2) ...
        assert record["start"]["ema"] is None and record["end"]["ema"] is not None
        assert record["end"]["ema_updates"] == 1
    for record in straight:
        # ... and once more after the checkpoint (step 4); it differs from the training weights
        assert record["end"]["ema_updates"] == 2
        assert not same(record["end"]["ema"], record["end"]["generator"])
    # the ranks draw different prompts; the checkpoint falls inside the stream, whose position is restored
    captions = [[step["captions"][0] for step in record["steps"]] for record in straight]
    assert captions[0] != captions[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_student_killed_after_its_checkpoint_resumes_bit_exact(student_runs: dict[str, Any],
                                                               student_files: dict[str, str], tmp_path: Path) -> None:
    """SIGKILL every rank and data worker one step after the checkpoint of step k (nothing saved, nothing cleaned up);
    resumed from that checkpoint in a new process, the run ends exactly where the uninterrupted straight run ended."""
    k = STUDENT_K

    def fit(name: str, kill_at: int, ckpt: Optional[Path]) -> int:
        argv = [sys.executable, str(REPO / "tests" / "resume_toys.py"), "student", str(tmp_path / name),
                str(2 * k), str(k), str(kill_at), str(ckpt or ""), student_files["teacher"], student_files["prompts"]]
        return run_in_own_group(argv, REPO, timeout=420)

    assert fit("killed", k + 1, None) == -signal.SIGKILL
    ckpt = tmp_path / "killed" / "ckpt" / f"step={k}.ckpt"
    assert ckpt.is_dir() and not (tmp_path / "killed" / "records").exists()
    assert fit("resumed", 0, ckpt) == 0
    for rank in range(WORLD):
        straight = student_runs["straight"][rank]
        resumed = torch.load(tmp_path / "resumed" / "records" / f"rank{rank}.pt", weights_only=False)
        assert_same(resumed["steps"], straight["steps"][k:], f"rank {rank} steps after resuming")
        assert_same(resumed["end"], straight["end"], f"rank {rank} final state")
        assert straight["end"]["ema"] is not None and resumed["global_step"] == 2 * k


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_student_checkpoint_exports_and_generates(student_runs: dict[str, Any], student_files: dict[str, str],
                                                  tmp_path: Path) -> None:
    ckpt = student_runs["final_ckpt"]
    final = student_runs["straight"][0]["end"]  # gathered weights, equal on both ranks and to the resumed run's
    out = tmp_path / "export"
    cf_main(["convert", "zero", str(ckpt), str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["critic.safetensors", "generator.safetensors"]

    generator_sd, critic_sd = load_file(out / "generator.safetensors"), load_file(out / "critic.safetensors")
    CausalWanDiT(TINY, frames_per_chunk=3).load_state_dict(generator_sd, strict=True)
    WanDiT(TINY).load_state_dict(critic_sd, strict=True)
    assert_same(generator_sd, final["generator"], "exported generator")
    assert_same(critic_sd, final["critic"], "exported critic")

    # `cf convert zero` exports the engines only; the EMA weights are read from the same checkpoint directory
    # (each rank's shadow partition is stored with that rank's ZeRO shard)
    assert_same(EMA.read_ema_weights(ckpt, attribute="generator"), final["ema"], "EMA weights of the checkpoint")

    spec_fields = student_module(student_files["teacher"]).generator_spec()
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(spec_fields)))
    spec = GeneratorSpec.load(out / "config.json")
    # the DeepSpeed checkpoint folder carries the same spec: `cf generate --weights <folder>` needs no --config
    from cf.generate import resolve_spec

    same = json.dumps(dataclasses.asdict(resolve_spec(ckpt, None)), sort_keys=True)
    assert same == json.dumps(dataclasses.asdict(spec), sort_keys=True)
    model = load_generator(spec, out / "generator.safetensors")
    assert_same(dict(model.state_dict()), final["generator"], "generator loaded for generation")
    assert_same(dict(load_generator(spec, ckpt).state_dict()), final["ema"], "generator loaded from the checkpoint")
    (video,) = generate_videos(spec, model, [PROMPTS[0]], tmp_path / "videos", seconds=1.0, progress=False)
    frames, fps = decode_mp4(video)
    assert frames.shape == (1 + 4 * 5, 32, 32, 3) and fps == 16  # 6 latent frames of 4x4 -> 21 frames of 32x32
    assert frames.std() > 0

    # each checkpoint form generates the same video as its export: the DeepSpeed folder (EMA) and a Wan-layout
    # export of the same EMA weights, same prompt and seed
    ema_export = save_wan_weights(load_generator(spec, ckpt), tmp_path / "ema_export" / "generator.safetensors")
    videos = {}
    for name, source in (("folder", ckpt), ("export", ema_export)):
        (path,) = generate_videos(spec, load_generator(spec, source), [PROMPTS[0]], tmp_path / name, seconds=1.0,
                                  progress=False, seed=3, lossless=True)
        videos[name] = decode_mp4(path)[0]
    assert videos["folder"].std() > 0 and np.array_equal(videos["folder"], videos["export"])
