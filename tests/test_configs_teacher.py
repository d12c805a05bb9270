"""The teacher YAMLs parse and instantiate; the real-scale one trains on every sequence the student stages ask the
teacher to score; the toy one trains a couple of steps through `cf fit` and exports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from lightning.pytorch.cli import LightningCLI
from safetensors.torch import load_file

from callbacks.data_health import SkippedSamplesLogger
from callbacks.video_logger import VideoLogger
from cf.cli import main as cf_main
from cf.encoders import HashedTextEncoder, ToyAutoencoder
from cf.teacher_layout import LongLayoutConfig, TeacherLayout
from cf.lit.teacher import TeacherERFT
from cf.models.wan import WanConfig, WanDiT
from cf.rollout import teacher_window
from cf.video_io import encode_mp4
from data import VideoDataModule
from data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "teacher_erft.yaml"
WAN = REPO / "configs" / "wan1.3b" / "teacher_erft.yaml"


def parse(config: Path, *overrides: str) -> LightningCLI:
    """The `cf fit` parser (cf.cli) without running: model, datamodule and trainer instantiated."""
    return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, run=False, args=["--config", str(config), *overrides],
                        parser_kwargs={"parser_mode": "omegaconf"}, auto_configure_optimizers=False,
                        save_config_callback=None)


def test_toy_config_instantiates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CF_DATA", str(tmp_path / "data"))
    cli = parse(TOY)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(model, TeacherERFT) and isinstance(data, VideoDataModule)
    assert model.network_config == WanConfig.toy_base()
    assert model.hparams.init_weights == "configs/toy/base/base.safetensors"  # fine-tuned from the shipped base
    assert model.long_layout_config == LongLayoutConfig(3, 6, 6, 48, 96, 2)
    assert model.hparams.layout == "batch" and model.hparams.autoencoder == "toy"
    assert data.train_urls == f"{tmp_path}/data/train/shard-{{000000..000003}}.tar"
    assert data.train_config.num_frames is None and data.train_config.height == 64
    assert trainer.gradient_clip_val == 1.0 and trainer.max_steps == 300
    assert any(isinstance(c, SkippedSamplesLogger) for c in trainer.callbacks)
    assert any(isinstance(c, VideoLogger) for c in trainer.callbacks)
    assert isinstance(trainer.logger, pl.loggers.TensorBoardLogger)
    model.setup("fit")
    model.configure_model()  # toy sizes: cheap to build
    assert isinstance(model.network, WanDiT)


def test_wan_config_parses_with_paper_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CF_WAN", str(tmp_path / "wan"))
    # the hardware of the YAML (8 GPUs, DeepSpeed) is swapped for this machine's; everything else is as written
    cli = parse(WAN, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto")
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(model, TeacherERFT) and model.network is None  # the 1.3B DiT is only built by configure_model
    assert model.network_config == WanConfig.wan2_1_1_3b()
    hp = model.hparams
    assert (hp.finetune, hp.lora_rank, hp.lora_alpha, hp.gradient_checkpointing) == ("lora", 128, 128.0, True)
    assert (hp.lr, tuple(hp.betas), hp.weight_decay) == (1e-4, (0.9, 0.999), 0.01)
    assert hp.init_weights == hp.autoencoder == hp.text_encoder == str(tmp_path / "wan")
    assert model.long_layout_config == LongLayoutConfig()  # the paper's counts are the defaults
    erft = model.erft_config
    assert (erft.noise_prob, erft.context_prob, erft.latent_prob, erft.clean_prob) == (0.01, 0.9, 0.9, 0.5)
    assert (erft.num_buckets, erft.capacity, erft.warmup_steps, erft.clean_insert_prob) == (50, 500, 50, 0.1)
    assert erft.policy == "l2_batch" and erft.max_total_bytes is not None
    assert model.banks.noise.num_buckets == 50 and model.injector.context_prob == 0.9
    sampling = model.sampling_config
    assert (sampling.num_inference_steps, sampling.guidance_scale, sampling.shift) == (50, 5.0, 5.0)
    assert sampling.negative_prompt
    assert isinstance(data, VideoDataModule) and data.mode == "video"
    assert (data.train_config.height, data.train_config.width, data.train_config.fps) == (480, 832, 16.0)
    assert trainer.gradient_clip_val == 1.0 and trainer.max_steps == 8000
    assert trainer.precision == "bf16-mixed"


def test_wan_config_strategy_instantiates() -> None:
    if importlib.util.find_spec("cf.strategies") is None:
        pytest.skip("cf.strategies is not available")
    from cf.strategies import DeepSpeedStrategy

    spec = yaml.safe_load(WAN.read_text())["trainer"]["strategy"]
    assert spec["class_path"] == "cf.strategies.DeepSpeedStrategy"
    strategy = DeepSpeedStrategy(**spec["init_args"])
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.config["train_micro_batch_size_per_gpu"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# The real-scale teacher is trained on the sequences the student stages ask it to score
# ----------------------------------------------------------------------------------------------------------------------

STUDENT_WAN = {stage: REPO / "configs" / "wan1.3b" / f"student_stage{stage}.yaml" for stage in (1, 2)}
STUDENT_TOY = {stage: REPO / "configs" / "toy" / f"student_stage{stage}.yaml" for stage in (1, 2)}


def signature(kind: str, layout: TeacherLayout) -> tuple[str, int, tuple[int, int], int]:
    """(context structure, sequence length, first and last position, context length) of one teacher input."""
    positions = layout.positions.tolist()
    assert positions == list(range(positions[0], positions[-1] + 1))  # contiguous (§D.3)
    return kind, len(positions), (positions[0], positions[-1]), layout.num_context_frames


def wan_teacher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *overrides: str) -> LightningCLI:
    """The real-scale teacher YAML on this machine's hardware, with tiny stand-in encoders (no Wan weights here):
    layouts only depend on the encoders' frame counts, which the toy autoencoder shares (4 frames per latent)."""
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CF_WAN", str(tmp_path / "wan"))
    monkeypatch.setattr("sys.argv", ["cf"])
    cli = parse(WAN, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                *overrides)
    cli.model.encoders.built.update(autoencoder=ToyAutoencoder(latent_channels=16, spatial_factor=8),
                                    text_encoder=HashedTextEncoder(dim=4096, max_length=4, vocab_size=8))
    return cli


def trained_teacher_inputs(cli: LightningCLI) -> set[tuple]:
    """Every (structure, length, positions, context) the YAML's data mix feeds the YAML's teacher: one clip per
    reachable layout shape (`TeacherClipMix.possible_clips`), laid out by `TeacherERFT.teacher_inputs`."""
    mix = cli.datamodule.train_config.teacher_clips
    assert mix is not None, "the teacher YAML must draw its clips from data.teacher_clips"
    seen = set()
    for clip in mix.possible_clips():
        batch = {"video": torch.zeros(1, 3, len(clip.frame_index), 8, 8), "frame_index": torch.tensor([clip.frame_index]),
                 "layout": [clip.layout], "context_latents": [clip.context_latents], "caption": ["a"]}
        layout, _ = cli.model.teacher_inputs(batch)
        seen.add(signature(clip.layout, layout))
    return seen


def student_teacher_call(config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple:
    """What the stage's YAML asks the teacher (real score) to score: the window `teacher_window` cuts from its longest
    rollout, with the context only when ``window.context_teacher`` is on; the sequence is ``[context | target]``."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cf"])
    for name in ("CF_TEACHER", "CF_STUDENT_INIT", "CF_STUDENT_STAGE1", "CF_PROMPTS", "CF_VAL_PROMPTS"):
        path = tmp_path / f"{name.lower()}.file"
        path.write_text("placeholder\n")
        monkeypatch.setenv(name, str(path))
    (tmp_path / "wan").mkdir(exist_ok=True)
    monkeypatch.setenv("CF_WAN", str(tmp_path / "wan"))
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    model = parse(config, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                  "--trainer.strategy", "auto").model
    hp, window = model.hparams, model.window
    assert window.source == "contiguous", "only the contiguous teacher context maps to the dense layout"
    rollout = hp.rollout
    frames = torch.zeros(1, 16, rollout["max_blocks"] * hp.frames_per_chunk, 1, 1)
    context, target = teacher_window(frames, window.context_frames, window.target_frames)
    num_context = context.shape[2] if (context is not None and window.context_teacher) else 0
    length = num_context + target.shape[2]
    return "dense", length, (0, length - 1), num_context


def test_wan_teacher_is_trained_on_what_the_student_stages_score(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    trained = trained_teacher_inputs(wan_teacher(monkeypatch, tmp_path))
    stage1 = student_teacher_call(STUDENT_WAN[1], monkeypatch, tmp_path)
    stage2 = student_teacher_call(STUDENT_WAN[2], monkeypatch, tmp_path)
    assert stage1 == ("dense", 21, (0, 20), 0)  # §F.2: stage 1 scores 21 frames without context
    assert stage2 == ("dense", 42, (0, 41), 21)  # §F.5: [21 context | 21 target], positions 0…41
    assert {stage1, stage2} <= trained
    # and §E.2's long layout with every sparse count 2…12: [3 | k | 6 | 21]
    assert {s for s in trained if s[0] == "long"} == {("long", 30 + k, (0, 29 + k), 9 + k) for k in range(2, 13)}


def test_toy_teacher_is_trained_on_what_the_toy_student_stages_score(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CF_DATA", str(tmp_path / "data"))
    (tmp_path / "data" / "val").mkdir(parents=True)
    (tmp_path / "data" / "val" / "prompts.txt").write_text("a red circle\n")  # the stage-2 evaluation callback's
    trained = trained_teacher_inputs(parse(TOY))
    stage1 = student_teacher_call(STUDENT_TOY[1], monkeypatch, tmp_path)
    stage2 = student_teacher_call(STUDENT_TOY[2], monkeypatch, tmp_path)
    assert stage1 == ("dense", 6, (0, 5), 0)  # the toy base's clip length, no context
    assert stage2 == ("dense", 27, (0, 26), 21)  # [21 context | 6 target]
    assert {stage1, stage2} <= trained
    assert {s for s in trained if s[0] == "long"} == {("long", 17, (0, 16), 11)}  # [3 | 2 | 6 | 6]


def numbered_video_sample(key: str, seconds: float) -> dict[str, Any]:
    frames = np.broadcast_to(np.arange(int(16 * seconds), dtype=np.uint8)[:, None, None, None] % 200,
                             (int(16 * seconds), 16, 16, 3)).copy()
    return {"__key__": key, "mp4": encode_mp4(frames, fps=16), "txt": f"caption of {key}"}


def test_wan_teacher_data_pipeline_gives_only_those_inputs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = str(tmp_path / "videos.tar")
    with wds.TarWriter(url) as writer:
        for key, seconds in (("short", 9), ("ten", 10), ("fifteen", 15), ("thirty", 30)):
            writer.write(numbered_video_sample(key, seconds))
    cli = wan_teacher(monkeypatch, tmp_path, "--data.init_args.train_urls", url, "--data.init_args.val_urls", url,
                      "--data.init_args.height", "8", "--data.init_args.width", "8",
                      "--data.init_args.num_workers", "0", "--data.init_args.batches_per_epoch", "40")
    trained = trained_teacher_inputs(cli)
    data = cli.datamodule
    assert (data.train_config.min_frames, data.train_config.num_frames) == (160, None)
    data.setup("fit")
    skipped = 0
    for batch in data.train_dataloader():
        skipped += batch["skipped"].get("too_short", 0)
        layout, _ = cli.model.teacher_inputs(batch)
        assert signature(batch["layout"][0], layout) in trained
        if batch["layout"] == ["long"]:
            assert batch["frame_index"][0, :9].tolist() == list(range(9))  # the sink: the video's first frames
    assert skipped >= 1  # the 9 s video (a quarter of the draws: 40 batches see it for any shuffle order)


# ----------------------------------------------------------------------------------------------------------------------
# A couple of steps of the toy config through `cf fit`, then `cf convert teacher`
# ----------------------------------------------------------------------------------------------------------------------


def test_toy_config_fits_validates_and_exports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shards = write_synthetic_shards(str(tmp_path / "data"), num_clips=3, seed=5, splits={"train": 2, "val": 1},
                                    maxcount=4, min_seconds=10.0, max_seconds=10.5, num_workers=1)
    monkeypatch.setenv("CF_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CF_RUNS", str(tmp_path / "runs"))
    cf_main(["fit", "--config", str(TOY),
             "--data.init_args.train_urls", shards["train"]["urls"],
             "--data.init_args.num_workers", "0",
             "--data.init_args.batches_per_epoch", "2",
             "--trainer.max_steps", "2",
             "--trainer.check_val_every_n_epoch", "1",
             "--trainer.limit_val_batches", "1",
             "--trainer.log_every_n_steps", "1",
             "--trainer.enable_progress_bar", "false",
             "--model.init_args.sampling.num_inference_steps", "2"])
    run = tmp_path / "runs" / "teacher_erft_toy" / "version_0"
    assert (run / "config.yaml").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["sampling"]["num_inference_steps"] == 2
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == 2 and "erft_state" in checkpoint
    assert sorted(p.suffix for p in (run / "videos").iterdir()) == [".mp4"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    assert "val/flow_loss" in events.Tags()["scalars"] and "train/loss" in events.Tags()["scalars"]
    assert "val/continuation_truth_vs_teacher/batch0" in events.Tags()["images"]

    out = tmp_path / "export" / "teacher.safetensors"
    cf_main(["convert", "teacher", str(ckpt), str(out)])
    config: dict[str, Any] = json.loads((out.parent / "config.json").read_text())
    dit = WanDiT(WanConfig(**config))
    dit.load_state_dict(load_file(out), strict=True)
    trained = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()}
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in trained.items())  # full fine-tuning: no merge
