"""The teacher YAMLs parse and instantiate; the toy one trains a couple of steps through `cf fit` and exports."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from safetensors.torch import load_file

from callbacks.data_health import SkippedSamplesLogger
from callbacks.video_logger import VideoLogger
from cf.cli import main as cf_main
from cf.erft import LongLayoutConfig
from cf.lit.teacher import TeacherERFT
from cf.models.wan import WanConfig, WanDiT
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
    assert model.network_config == WanConfig(dim=96, ffn_dim=256, freq_dim=32, text_dim=32, text_len=8, in_dim=4,
                                             out_dim=4, num_heads=2, num_layers=3)
    assert model.long_layout_config == LongLayoutConfig(3, 6, 6, 48, 96, 2)
    assert model.hparams.layout == "long" and model.hparams.autoencoder == "toy"
    assert data.train_urls == f"{tmp_path}/data/train/shard-{{000000..000003}}.tar"
    assert data.train_config.num_frames == 157 and data.train_config.height == 64
    assert trainer.gradient_clip_val == 1.0 and trainer.max_steps == 400
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
    config: dict[str, Any] = yaml.safe_load((out.parent / "config.json").read_text())
    dit = WanDiT(WanConfig(**config))
    dit.load_state_dict(load_file(out), strict=True)
    trained = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()}
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in trained.items())  # full fine-tuning: no merge
