"""The toy base model: configs/toy/base.yaml (plain flow-matching text-to-video through TeacherERFT with ERFT off and
caption dropout) and the shipped weights in configs/toy/base/ with their recorded recipe and quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from callbacks.ema import EMA
from cf.lit.teacher import TeacherERFT
from data import VideoDataModule

REPO = Path(__file__).resolve().parents[1]
BASE_YAML = REPO / "configs" / "toy" / "base.yaml"


def parse(*overrides: str) -> LightningCLI:
    return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, run=False, args=["--config", str(BASE_YAML), *overrides],
                        parser_kwargs={"parser_mode": "omegaconf"}, auto_configure_optimizers=False,
                        save_config_callback=None)


@pytest.fixture(scope="module")
def base_cli(tmp_path_factory: pytest.TempPathFactory) -> LightningCLI:
    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CF_RUNS", str(root / "runs"))
        mp.setenv("CF_DATA", str(root / "data"))
        cli = parse()
    cli.model.setup("fit")
    cli.model.configure_model()
    return cli


def caption_batch(num_frames: int, captions: list[str], seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.rand(len(captions), 3, num_frames, 64, 64, generator=g) * 2 - 1, "caption": captions}


def test_base_config_is_text_to_video_flow_matching_without_erft(base_cli: LightningCLI) -> None:
    model, data, trainer = base_cli.model, base_cli.datamodule, base_cli.trainer
    assert isinstance(model, TeacherERFT) and isinstance(data, VideoDataModule)
    assert model.hparams.layout == "dense" and model.hparams.dense_context_frames == 0
    assert model.hparams.finetune == "full" and model.hparams.init_weights is None
    assert model.hparams.caption_dropout > 0
    ema = [c for c in trainer.callbacks if isinstance(c, EMA)]
    assert len(ema) == 1 and ema[0].attribute == "network"
    assert model.text_encoder.max_length >= 16  # the longest caption (three sprites, 'dark green') has 16 words
    assert model.sampling_config.shift == model.hparams.shift
    batch = caption_batch(data.train_config.num_frames, ["a red circle on a navy striped background"] * 2)
    layout, text = model.teacher_inputs(batch)
    assert layout.num_context_frames == 0 and layout.target.shape[2] == layout.latents.shape[2]
    for _ in range(3):  # nothing is ever injected, whatever the banks hold
        out = model.erft_step(layout, text)
        info = out.injection.info
        assert not (info.noise_applied.any() or info.latent_applied.any() or info.context_applied.any())
        # plain flow matching: x_t = (1 - σ) x0 + σ ε on the clean target
        sigma = (out.t / 1000).view(-1, 1, 1, 1, 1)
        expected = (1 - sigma) * layout.target + sigma * out.injection.noise
        torch.testing.assert_close(out.injection.noisy_target, expected)


def test_caption_dropout_replaces_whole_rows_by_the_negative_prompt(base_cli: LightningCLI) -> None:
    model = base_cli.model
    p = model.hparams.caption_dropout
    text = torch.randn(4000, model.text_encoder.max_length, model.text_encoder.dim)
    dropped = model.drop_captions(text)
    negative = model.negative_embeddings(1, text)[0]
    is_negative = (dropped == negative).all(dim=(1, 2))
    kept = (dropped == text).all(dim=(1, 2))
    assert bool((is_negative ^ kept).all())  # each row is either untouched or entirely the negative prompt
    assert abs(is_negative.float().mean().item() - p) < 4 * (p * (1 - p) / 4000) ** 0.5
    assert torch.equal(negative, torch.zeros_like(negative))  # the hashed '' prompt: the zero embedding
    # no dropout: the input itself, and the module's generator is not advanced
    model.hparams.caption_dropout = 0.0
    try:
        state = model.random_stream().get_state()
        assert model.drop_captions(text) is text and torch.equal(model.random_stream().get_state(), state)
    finally:
        model.hparams.caption_dropout = p


def test_training_step_trains_on_dropped_captions(base_cli: LightningCLI, monkeypatch: pytest.MonkeyPatch) -> None:
    model = base_cli.model
    seen: list[torch.Tensor] = []

    def record(layout: Any, text: torch.Tensor) -> None:
        seen.append(text)
        raise StopIteration

    monkeypatch.setattr(model, "erft_step", record)
    monkeypatch.setattr(model.hparams, "caption_dropout", 0.999)
    with pytest.raises(StopIteration):
        model.training_step(caption_batch(5, ["a red circle on a navy striped background"] * 3), 0)
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))
    with pytest.raises(ValueError, match="caption_dropout"):
        TeacherERFT(network={"dim": 32, "ffn_dim": 32, "num_heads": 2, "num_layers": 1}, caption_dropout=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# The shipped weights (configs/toy/base/)
# ----------------------------------------------------------------------------------------------------------------------

WEIGHTS = REPO / "configs" / "toy" / "base"


def test_shipped_base_loads_strict_and_records_its_recipe_and_quality() -> None:
    import yaml

    from cf.models.wan import WanConfig, WanDiT
    from cf.weights import load_wan_weights

    files = {p.name for p in WEIGHTS.iterdir()}
    assert {"base.safetensors", "config.json", "base.json", "README.md", "frame_strip.png"} <= files
    assert sum(p.stat().st_size for p in WEIGHTS.iterdir()) <= 20 * 2**20
    config = WanConfig(**json.loads((WEIGHTS / "config.json").read_text()))
    assert yaml.safe_load(BASE_YAML.read_text())["model"]["init_args"]["network"] == "toy-base"
    assert config == WanConfig.preset("toy-base")
    load_wan_weights(WanDiT(config), WEIGHTS / "base.safetensors")  # strict
    record = json.loads((WEIGHTS / "base.json").read_text())
    assert record["command"].startswith("cf toy-base") and record["seed"] == 0 and record["train_wall_seconds"] > 0
    quality = record["quality"]
    assert quality["ratio_to_dataset"]["background_coverage"] >= 0.7
    assert quality["ratio_to_dataset"]["sprite_presence"] >= 0.7


def test_shipped_base_draws_the_named_background_and_sprites() -> None:
    from cf.evaluation.prompted import prompt_fidelity
    from cf.toy_base import load_base, sample_base
    from data.synthetic import caption_for, clip_seed, make_clip_spec

    network, autoencoder, text_encoder, args = load_base(WEIGHTS, BASE_YAML)
    specs = [make_clip_spec(clip_seed(7, i), min_seconds=2, max_seconds=2) for i in range(6)]  # unseen prompts
    clips = sample_base(network, autoencoder, text_encoder, [caption_for(s) for s in specs], 6, (8, 8),
                        args["sampling"], seed=0)
    scores = [prompt_fidelity(clip, spec) for clip, spec in zip(clips, specs)]
    assert clips[0].shape == (21, 64, 64, 3)
    background = sum(s["background_coverage"] for s in scores) / len(scores)
    sprites = sum(s["sprite_presence"] for s in scores) / len(scores)
    # the dataset's own clips reach about 0.94 and 0.74 (configs/toy/base/base.json)
    assert background >= 0.6 and sprites >= 0.3, (background, sprites)
    # the prompt matters: a clip scored against another prompt's background matches far less
    swapped = [prompt_fidelity(clip, spec)["background_coverage"] for clip, spec in zip(clips, specs[1:] + specs[:1])]
    assert sum(swapped) / len(swapped) < background - 0.3
