"""Every student YAML parses and instantiates; the toy ones run stage 0 -> 1 -> 2 end to end on a CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from cf.encoders import HashedTextEncoder
from cf.lit.ode_init import ODEInitStudent
from cf.lit.student import CDMDStudent
from cf.models.wan import WanConfig, WanDiT
from cf.weights import read_state_dict, save_wan_weights
from data.ode_pairs import ODEPairConfig, write_ode_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY = WanConfig.tiny()
TOY_NETWORK = WanConfig.toy_base()
# CLI overrides that shrink the toy runs to a few seconds: the tiny DiT (with the toy configs' 16 text tokens), 4x4
# latents, a few steps
SHRINK = ['--model.init_args.network={"dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "text_len": 16, '
          '"in_dim": 4, "out_dim": 4, "num_heads": 2, "num_layers": 2}', "--model.init_args.latent_size=[4, 4]",
          "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false"]




def cli(args: list[str], run: bool) -> LightningCLI:
    """The `cf fit` LightningCLI (same arguments as `cf.cli.run_lightning_cli`)."""
    return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, args=args, run=run, parser_kwargs={"parser_mode": "omegaconf"},
                        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


@pytest.fixture
def toy_env(tmp_path, monkeypatch):
    """Tiny teacher weights, prompt files and every path variable the toy configs read, under tmp_path."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["cf"])
    torch.manual_seed(0)
    teacher = tmp_path / "teacher" / "teacher.safetensors"
    save_wan_weights(WanDiT(TINY), teacher)
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / "prompts.txt").write_text("a red circle moves left\na blue square on stripes\n")
    paths = {"CF_TEACHER": teacher, "CF_DATA": tmp_path / "data", "CF_RUNS": tmp_path / "runs",
             "CF_ODE_PAIRS": tmp_path / "pairs" / "ode-000000.tar",
             "CF_STUDENT_INIT": tmp_path / "stage0" / "generator.safetensors",
             "CF_STUDENT_STAGE1": tmp_path / "stage1" / "generator.safetensors",
             "CF_STUDENT": tmp_path / "stage2" / "generator.safetensors"}
    for name, value in paths.items():
        monkeypatch.setenv(name, str(value))
    return paths


def test_toy_configs_run_stage0_to_stage2(toy_env):
    teacher = WanDiT(TINY)
    teacher.load_state_dict(read_state_dict(toy_env["CF_TEACHER"]))
    write_ode_pairs(teacher, HashedTextEncoder(dim=32, max_length=8), ["a red circle", "a blue square"],
                    str(toy_env["CF_ODE_PAIRS"]).replace("000000", "%06d"),
                    ODEPairConfig(num_frames=6, latent_size=(4, 4), num_steps=8, stored_steps=(0, 2, 4, 6)))

    stage0 = cli(["fit", "--config", "configs/toy/student_stage0.yaml", *SHRINK, "--data.init_args.batch_size=2"],
                 run=True)
    assert isinstance(stage0.model, ODEInitStudent) and stage0.trainer.global_step == 3
    assert math.isfinite(float(stage0.trainer.logged_metrics["train/ode_loss"]))
    assert toy_env["CF_STUDENT_INIT"].is_file()

    stage1 = cli(["fit", "--config", "configs/toy/student_stage1.yaml", *SHRINK,
                  "--model.init_args.val_num_frames=6"], run=True)
    model = stage1.model
    assert isinstance(model, CDMDStudent) and stage1.trainer.global_step == 3
    assert (model.trainer_step, model.generator_updates, model.critic_updates) == (3, 1, 3)  # ratio 5: step 0
    metrics = stage1.trainer.logged_metrics
    for key in ("train/generator_loss", "train/critic_loss", "train/dmd_gradient_abs_mean"):
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["train/generator_rollout_frames"]) == 6
    assert len(model.validation_videos) == 2
    assert list(Path(stage1.trainer.log_dir, "videos").glob("*.mp4"))  # the VideoLogger wrote the validation video
    assert toy_env["CF_STUDENT_STAGE1"].is_file()
    spec = json.loads((toy_env["CF_STUDENT_STAGE1"].parent / "config.json").read_text())
    assert spec["memory"]["slow"] == 12 and spec["latent_size"] == [4, 4]
    # the Lightning checkpoint generates the same video as the export written at the end of fit (the EMA has not
    # started in 3 steps, so both hold the training weights)
    from cf.generate import GeneratorSpec, generate_videos, load_generator
    from cf.video_io import decode_mp4

    generator_spec = GeneratorSpec.load(toy_env["CF_STUDENT_STAGE1"].parent / "config.json")
    (checkpoint,) = Path(stage1.trainer.log_dir, "checkpoints").glob("last*.ckpt")
    videos = []
    for source in (checkpoint, toy_env["CF_STUDENT_STAGE1"]):
        (path,) = generate_videos(generator_spec, load_generator(generator_spec, source), ["a red circle"],
                                  toy_env["CF_RUNS"] / f"videos_{Path(source).suffix[1:]}", seconds=1.0,
                                  progress=False, seed=3, lossless=True)
        videos.append(decode_mp4(path)[0])
    assert videos[0].std() > 0 and (videos[0] == videos[1]).all()

    stage2 = cli(["fit", "--config", "configs/toy/student_stage2.yaml", *SHRINK,
                  "--model.init_args.rollout.min_blocks=4", "--model.init_args.rollout.max_blocks=5",
                  "--model.init_args.rollout.decay_steps=2", "--model.init_args.rollout.grad_window_frames=6",
                  "--model.init_args.window.context_frames=6", "--model.init_args.window.target_frames=6",
                  "--model.init_args.val_num_frames=6"], run=True)
    model = stage2.model
    stage1_weights = read_state_dict(toy_env["CF_STUDENT_STAGE1"])
    assert model.window.context_teacher and model.window.context_fake and model.scores.guidance_scale == 5.0
    metrics = stage2.trainer.logged_metrics
    assert math.isfinite(float(metrics["train/generator_loss"])) and math.isfinite(float(metrics["train/critic_loss"]))
    assert 12 <= float(metrics["train/critic_rollout_frames"]) <= 15
    exported = read_state_dict(toy_env["CF_STUDENT"])
    assert exported.keys() == stage1_weights.keys()
    assert not torch.equal(exported["head.head.weight"], stage1_weights["head.head.weight"])  # stage 2 trained it


@pytest.mark.parametrize("name", ["student_stage0", "student_stage1", "student_stage2"])
def test_toy_configs_instantiate_with_their_own_sizes(toy_env, name):
    for key in ("CF_TEACHER", "CF_STUDENT_INIT", "CF_STUDENT_STAGE1"):
        save_wan_weights(WanDiT(TOY_NETWORK), toy_env[key])
    toy_env["CF_ODE_PAIRS"].parent.mkdir(parents=True, exist_ok=True)
    toy_env["CF_ODE_PAIRS"].touch()
    loaded = cli([f"--config=configs/toy/{name}.yaml"], run=False)
    model = loaded.model
    assert model.network_config == TOY_NETWORK
    assert model.hparams.latent_size == [8, 8]
    if name == "student_stage0":
        assert model.hparams.local_window_frames is None  # §I.20
        assert model.timesteps.tolist() == pytest.approx([1000.0, 750.0, 500.0, 250.0])  # the toy base's shift 1
        return
    assert model.memory_config.sink == 3 and model.memory_config.slow == 12 and model.memory_config.fast == 6
    assert model.memory_config.rope_length == 21
    rollout = model.rollout_config
    if name == "student_stage1":
        assert (rollout.min_blocks, rollout.max_blocks, model.window.context_frames) == (2, 2, 0)
        assert model.window.target_frames == 6  # the toy teacher's target length
    else:
        assert (rollout.min_blocks * 3, rollout.max_blocks * 3) == (27, 36)
        assert (model.window.context_frames, model.window.target_frames) == (21, 6)
    model.configure_model()  # builds and loads the networks at the toy size
    assert model.generator.config == TOY_NETWORK


@pytest.fixture
def wan_env(tmp_path, monkeypatch):
    """Placeholder files for every path variable the wan1.3b configs read (no weights are loaded)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["cf"])
    wan = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    wan.mkdir()
    paths = {"CF_WAN": wan, "CF_RUNS": tmp_path / "runs"}
    for name in ("CF_TEACHER", "CF_STUDENT_INIT", "CF_STUDENT_STAGE1", "CF_PROMPTS", "CF_VAL_PROMPTS",
                 "CF_ODE_PAIRS", "CF_VAL_ODE_PAIRS"):
        paths[name] = tmp_path / f"{name.lower()}.file"
        paths[name].write_text("placeholder\n")
    for name, path in paths.items():
        monkeypatch.setenv(name, str(path))
    return paths


def test_wan_stage0_config_instantiates_with_the_ode_recipe(wan_env):
    # no GPU here: the trainer is instantiated on the CPU, everything else as written
    loaded = cli(["--config=configs/wan1.3b/student_stage0.yaml", "--trainer.accelerator=cpu",
                  "--trainer.devices=1"], run=False)
    model, hp = loaded.model, loaded.model.hparams
    assert isinstance(model, ODEInitStudent) and model.network_config == WanConfig.wan2_1_1_3b()
    assert hp.init_weights == str(wan_env["CF_WAN"]) and hp.export_path == str(wan_env["CF_STUDENT_INIT"])
    assert hp.frames_per_chunk == 3 and hp.local_window_frames is None  # full block-causal history (§I.20)
    assert model.timesteps.tolist() == pytest.approx([1000.0, 937.5, 833.33, 625.0], abs=0.01)
    assert (hp.lr, tuple(hp.betas), hp.weight_decay) == (2e-6, (0.9, 0.999), 0.01)  # CF student values (§I.21)
    assert hp.gradient_checkpointing and hp.latent_size == [60, 104]
    assert hp.autoencoder == hp.text_encoder == str(wan_env["CF_WAN"])
    # the pairs `cf data ode-pairs` writes by default are §F.9's, one stored state per student timestep
    pairs = ODEPairConfig()
    assert (pairs.num_steps, pairs.shift, pairs.guidance_scale, pairs.num_frames) == (48, 8.0, 6.0, 21)
    assert pairs.stored_steps == (0, 12, 24, 36) and len(pairs.stored_steps) == len(model.timesteps)
    assert list(pairs.latent_size) == hp.latent_size
    data = loaded.datamodule
    assert (data.hparams.train_urls, data.hparams.val_urls) == (str(wan_env["CF_ODE_PAIRS"]),
                                                                str(wan_env["CF_VAL_ODE_PAIRS"]))
    assert data.hparams.text_length == WanConfig.wan2_1_1_3b().text_len and data.hparams.batch_size == 1
    trainer = loaded.trainer
    assert (trainer.accumulate_grad_batches, trainer.gradient_clip_val) == (8, 2.0)  # batch 64 on 8 GPUs, clip 2.0
    strategy = trainer.strategy
    assert type(strategy).__name__ == "DeepSpeedStrategy"
    assert strategy.zero_stage_3 and strategy.config["bf16"]["enabled"]


@pytest.mark.parametrize("stage", [1, 2])
def test_wan_configs_instantiate_with_the_paper_values(wan_env, stage):
    # no GPU here: the trainer is instantiated on the CPU, everything else as written
    loaded = cli([f"--config=configs/wan1.3b/student_stage{stage}.yaml", "--trainer.accelerator=cpu",
                  "--trainer.devices=1"], run=False)
    hp = loaded.model.hparams
    opt, scores, window = loaded.model.optimization, loaded.model.scores, loaded.model.window
    assert loaded.model.network_config == WanConfig.wan2_1_1_3b()
    assert (opt.generator_lr, opt.generator_betas, opt.critic_lr, opt.critic_betas, opt.weight_decay) == \
        (2e-6, (0.9, 0.999), 4e-7, (0.5, 0.95), 0.01)
    assert (opt.critic_steps_per_generator_step, opt.gradient_accumulation) == (5, 8)
    assert (opt.generator_grad_clip, opt.critic_grad_clip, hp.teacher_dtype) == (2.0, 2.0, "bfloat16")
    assert hp.gradient_checkpointing and hp.latent_size == [60, 104]
    rollout = loaded.model.rollout_config
    assert rollout.sampling.timesteps().tolist() == pytest.approx([1000.0, 937.5, 833.33, 625.0], abs=0.01)
    strategy = loaded.trainer.strategy
    assert type(strategy).__name__ == "DeepSpeedStrategy"
    engine = {"gradient_accumulation_steps": 8, "gradient_clipping": 2.0}
    assert strategy.engine_configs == {"generator": engine, "critic": engine}
    assert strategy.zero_stage_3 and strategy.config["bf16"]["enabled"]
    assert strategy.config["train_micro_batch_size_per_gpu"] == 1  # from logging_batch_size_per_gpu, on the json
    assert strategy.config["zero_optimization"] == json.loads((ROOT / "configs/deepspeed/zero3_bf16.json").read_text(
        ))["zero_optimization"]
    assert loaded.datamodule.batch_size == 8
    ema = [c for c in loaded.trainer.callbacks if type(c).__name__ == "EMA"][0]
    assert (ema.decay, ema.start_step) == (0.99, 200)
    if stage == 1:
        assert (rollout.min_blocks, rollout.max_blocks, scores.guidance_scale) == (7, 7, 3.0)
        assert not (window.context_teacher or window.context_fake or scores.critic_time_weighting)
        assert loaded.trainer.max_steps == 600
    else:
        assert (rollout.min_blocks, rollout.max_blocks, rollout.decay_steps, scores.guidance_scale) == \
            (28, 35, 600, 5.0)
        assert window.context_teacher and window.context_fake and scores.critic_time_weighting
        assert (window.context_frames, window.target_frames) == (21, 21)
        assert loaded.trainer.max_steps == 500
