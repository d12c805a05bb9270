"""`callbacks.LongVideoEval` (and `StreamThroughputMonitor`) inside toy fits of the CDMD student, on a CPU."""

from __future__ import annotations

import json
import math
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import callbacks.long_video_eval as lve  # noqa: E402
from callbacks import EMA, LongVideoEval, StreamThroughputMonitor  # noqa: E402
from callbacks.long_video_eval import StudentGeneration, default_timestamps  # noqa: E402
from cf.lit.student import CDMDStudent  # noqa: E402
from cf.memory import MemoryConfig  # noqa: E402
from cf.models.wan import CausalWanDiT, WanConfig  # noqa: E402
from cf.rollout import RolloutConfig, SamplingConfig, stream  # noqa: E402
from data import VideoDataModule  # noqa: E402
from helpers.student_args import student_args  # noqa: E402
from test_evaluation_features import build_tiny_clip, build_tiny_dino  # noqa: E402

TINY = WanConfig.tiny()
PROMPTS = ["a red circle moves left", "a blue square on stripes"]
FPS = 16
SECONDS = 2.0  # 32 frames -> 9 latent frames (3 chunks) -> 33 pixel frames of 32 x 32






@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return str(path)


@pytest.fixture(scope="module")
def feature_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    return str(build_tiny_dino(root / "dino")), str(build_tiny_clip(root / "clip"))


def make_student(teacher_file: str, **overrides) -> CDMDStudent:
    """A tiny stage-1 student: 2-block (6-frame) rollouts of 4 x 4 latents, a generator update every 2 steps."""
    args = dict(network=TINY, teacher_weights=teacher_file, latent_size=(4, 4),
                text_encoder_args={"dim": 32, "max_length": 8}, memory=MemoryConfig(),
                rollout=RolloutConfig(min_blocks=2, max_blocks=2, grad_window_frames=3), target_window=6,
                critic_steps_per_generator_step=2, val_num_frames=6, generator_lr=1e-2, critic_lr=1e-3, fps=FPS)
    args.update(overrides)
    return CDMDStudent(**student_args(**args))


def fit(module: CDMDStudent, prompt_file: str, root, steps: int, callbacks, logger=False) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, callbacks=list(callbacks),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(module, VideoDataModule(mode="prompts", prompt_file=prompt_file, batch_size=1, num_workers=0))
    return trainer


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def reference_video(weights: dict[str, torch.Tensor], module: CDMDStudent, prompt: str, seed: int) -> np.ndarray:
    """The video the protocol asks for, made without the callback: a fresh causal DiT with ``weights``, the whole
    latent sequence decoded at once."""
    model = CausalWanDiT(TINY, frames_per_chunk=3)
    model.load_state_dict(weights)
    model.eval()
    latents = torch.cat(list(stream(model, module.embed([prompt]), 9, (4, 4), memory=MemoryConfig(),
                                    sampling=SamplingConfig(), seed=seed)), dim=2)
    with torch.no_grad():
        return to_uint8(module.autoencoder.decode(latents)[0])


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


# ----------------------------------------------------------------------------------------------------------------------
# Logging inside a fit
# ----------------------------------------------------------------------------------------------------------------------


def test_fit_logs_windowed_scalars_plot_video_and_throughput(teacher_file, prompt_file, feature_dirs, tmp_path):
    dino, clip = feature_dirs
    evaluation = LongVideoEval(prompt_file, seeds=[0, 1], seconds=SECONDS, every_n_steps=2, dino=dino, clip=clip,
                               progress=False)
    throughput = StreamThroughputMonitor(every_n_steps=2, seconds=1.0, warmup_chunks=1)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = fit(make_student(teacher_file), prompt_file, tmp_path, 4,
                  [EMA(decay=0.5, start_step=1), evaluation, throughput], logger)

    events = read_events(logger.log_dir)
    scalars = set(events.Tags()["scalars"])
    windowed = ["pixel_first_frame", "dinov2", "clip_f_first_frame", "clip_f_consecutive", "clip_t"]
    expected = {f"eval/{name}@{t}s" for name in windowed for t in (1, 2)} | {f"eval/{n}@avg" for n in windowed}
    expected |= {"eval/vbench_subject_consistency", "eval/vbench_background_consistency", "eval/num_videos",
                 "eval/uses_ema", "eval/identity_presence_mean"}
    expected |= {f"throughput/{name}" for name in ("pixel_fps", "first_chunk_latency_s", "chunk_ms_early",
                                                   "chunk_ms_late", "peak_memory_mib")}
    assert expected <= scalars, sorted(expected - scalars)
    for tag in sorted(t for t in scalars if t.startswith(("eval/", "throughput/"))):
        values = events.Scalars(tag)
        assert [v.step for v in values] == [2, 4], tag  # every 2 steps; the end of fit is step 4, not repeated
        assert all(math.isfinite(v.value) for v in values), tag
    last = {tag: events.Scalars(tag)[-1].value for tag in expected}
    assert last["eval/num_videos"] == 4 and last["eval/uses_ema"] == 1  # 2 prompts x 2 seeds, EMA from step 1
    assert 0 < last["eval/vbench_subject_consistency"] <= 100
    for name in windowed:
        values = [last[f"eval/{name}@{t}s"] for t in (1, 2)]
        assert last[f"eval/{name}@avg"] == pytest.approx(sum(values) / 2, rel=1e-5)
    assert throughput.last_result["pixel_frames"] == 1 + 4 * (6 - 1)  # 1 s -> 16 frames -> 2 chunks of 3 latents

    images = set(events.Tags()["images"])
    assert {"eval/metrics_vs_time", "eval/video"} <= images
    plot = events.Images("eval/metrics_vs_time")[-1]
    assert plot.encoded_image_string[:4] == b"\x89PNG" and plot.width > 100
    assert events.Images("eval/video")[-1].encoded_image_string[:3] == b"GIF"
    out = os.path.join(logger.log_dir, "long_video_eval")
    for step in (2, 4):
        with open(os.path.join(out, f"metrics_vs_time_step_{step:08d}.png"), "rb") as handle:
            assert handle.read(4) == b"\x89PNG"
        record = json.loads(open(os.path.join(out, f"step_{step:08d}.json")).read())
        assert record["weights"] == "EMA" and record["scalars"]["num_videos"] == 4
        assert record["evaluation"]["timestamps"] == [1.0, 2.0]
        assert record["windowed"]["dinov2"]["2"] == pytest.approx(
            events.Scalars("eval/dinov2@2s")[step // 2 - 1].value, rel=1e-5)
        assert os.path.getsize(os.path.join(logger.log_dir, "videos", f"eval_video_step{step:08d}.mp4")) > 0
    assert trainer.global_step == 4


# ----------------------------------------------------------------------------------------------------------------------
# EMA weights, restoration, the protocol against an independent generation
# ----------------------------------------------------------------------------------------------------------------------


class Snapshot(Callback):
    """At one trainer step: the generator weights, the EMA weights and every submodule's mode (optionally putting
    the frozen teacher in eval mode first, so that the modes are mixed)."""

    def __init__(self, step: int, ema: EMA | None = None, mix_modes: bool = False) -> None:
        self.step, self.ema, self.mix_modes = step, ema, mix_modes
        self.taken: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.mix_modes:
            pl_module.real_score.eval()
        self.taken = {"weights": {k: v.clone() for k, v in pl_module.generator.state_dict().items()},
                      "modes": {name: m.training for name, m in pl_module.named_modules()},
                      "grad": [p.requires_grad for p in pl_module.parameters()]}
        if self.ema is not None:
            self.taken["ema"] = self.ema.ema_state_dict()


def test_generates_with_the_ema_weights_and_restores_the_training_state(teacher_file, prompt_file, tmp_path,
                                                                        monkeypatch):
    used = []
    real_stream = lve.stream

    def spy_stream(model, *args, **kwargs):
        used.append({"weights": {k: v.clone() for k, v in model.state_dict().items()}, "training": model.training,
                     "grad": torch.is_grad_enabled(), "seed": kwargs["seed"]})
        return real_stream(model, *args, **kwargs)

    videos = []
    real_generate = LongVideoEval.generate

    def spy_generate(pl_module, setup, prompt, seed, num_frames):
        frames = real_generate(pl_module, setup, prompt, seed, num_frames)
        videos.append(frames)
        return frames

    monkeypatch.setattr(lve, "stream", spy_stream)
    monkeypatch.setattr(LongVideoEval, "generate", staticmethod(spy_generate))
    ema = EMA(decay=0.5, start_step=1)
    before, after = Snapshot(3, ema, mix_modes=True), Snapshot(3)
    evaluation = LongVideoEval([PROMPTS[0]], seeds=[0, 3], seconds=SECONDS, every_n_steps=3, at_fit_end=False,
                               out_dir=str(tmp_path / "eval"), progress=False)
    module = make_student(teacher_file)
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):  # files only: JSON, PNG and the mp4
        fit(module, prompt_file, tmp_path, 3, [ema, before, evaluation, after])
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "metrics_vs_time_step_00000003.png", "step_00000003.json", "videos"]

    assert [u["seed"] for u in used] == [0, 3]
    for call in used:
        assert not call["training"] and not call["grad"]
        for key, value in before.taken["ema"].items():
            torch.testing.assert_close(call["weights"][key], value, rtol=0, atol=0, msg=key)
    moved = [k for k, v in before.taken["weights"].items() if not torch.equal(v, before.taken["ema"][k])]
    assert moved, "the EMA shadow should differ from the training weights after two generator updates"
    for key, value in before.taken["weights"].items():  # training weights back after the evaluation
        torch.testing.assert_close(after.taken["weights"][key], value, rtol=0, atol=0, msg=key)
    assert after.taken["modes"] == before.taken["modes"]
    assert before.taken["modes"]["real_score"] is False and before.taken["modes"]["generator"] is True
    assert after.taken["grad"] == before.taken["grad"]

    # independent generations: EMA weights reproduce the logged videos, the training weights do not
    for seed, video in zip((0, 3), videos):
        with_ema = reference_video(before.taken["ema"], module, PROMPTS[0], seed)
        with_training = reference_video(before.taken["weights"], module, PROMPTS[0], seed)
        assert video.shape == (33, 32, 32, 3)
        assert np.abs(video.astype(int) - with_ema.astype(int)).max() <= 1
        assert np.abs(video.astype(int) - with_training.astype(int)).max() > 1
    expected = [pixel_score_at_1s(video) for video in videos]  # averaged over the two seeds below
    metrics = evaluation.last_metrics
    assert metrics["eval/uses_ema"] == 1 and metrics["eval/num_videos"] == 2
    assert metrics["eval/pixel_first_frame@1s"] == pytest.approx(sum(expected) / 2, abs=1e-3)


@pytest.mark.filterwarnings("ignore:LongVideoEval. no TensorBoardLogger")
def test_training_is_unchanged_and_training_weights_are_used_before_the_ema_starts(teacher_file, prompt_file,
                                                                                   tmp_path):
    states = []
    for name, extra in (("plain", []), ("monitored", [
            LongVideoEval(PROMPTS, seconds=SECONDS, every_n_steps=2, out_dir=str(tmp_path / "eval"), progress=False),
            StreamThroughputMonitor(every_n_steps=2, seconds=1.0)])):
        ema = EMA(decay=0.5, start_step=3)
        module = make_student(teacher_file)
        fit(module, prompt_file, tmp_path / name, 4, [ema, *extra])
        states.append(({k: v.clone() for k, v in module.state_dict().items()}, ema.ema_state_dict()))
    (plain, plain_ema), (monitored, monitored_ema) = states
    assert plain.keys() == monitored.keys()
    for key in plain:
        torch.testing.assert_close(monitored[key], plain[key], rtol=0, atol=0, msg=key)
    for key in plain_ema:
        torch.testing.assert_close(monitored_ema[key], plain_ema[key], rtol=0, atol=0, msg=key)
    first = json.loads((tmp_path / "eval" / "step_00000002.json").read_text())
    second = json.loads((tmp_path / "eval" / "step_00000004.json").read_text())
    assert first["weights"].startswith("training (no started EMA") and first["scalars"]["num_videos"] == 2
    assert second["weights"] == "EMA"
    assert (tmp_path / "eval" / "videos" / "sample_step00000004.mp4").stat().st_size > 0  # no TensorBoard logger


class DumpingEval(LongVideoEval):
    """Saves every video it generates as ``<dump>/step<step>_rank<rank>_<prompt index>_<seed>.npy``."""

    def __init__(self, dump: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dump = dump

    def generate(self, pl_module, setup, prompt, seed, num_frames):
        frames = super().generate(pl_module, setup, prompt, seed, num_frames)
        name = f"step{pl_module.trainer.global_step}_rank{pl_module.global_rank}_{self.prompts.index(prompt)}_{seed}"
        np.save(os.path.join(self.dump, name + ".npy"), frames)
        return frames


def pixel_score_at_1s(video: np.ndarray) -> float:
    """100 · mean over frames [0.5 s, 1.5 s) = 8..23 of 1 − mean|x_k − x_0| (pixels in [0, 1]), by hand."""
    x = torch.from_numpy(video).double() / 255
    return 100 * float((1 - (x[8:24] - x[:1]).abs().mean(dim=(1, 2, 3))).mean())


@pytest.mark.slow
def test_two_zero3_ranks_split_the_videos_and_sum_the_scores(teacher_file, prompt_file, tmp_path):
    """Two spawned ZeRO-3 ranks (gloo): 3 prompts are split 2 + 1, the short rank runs one discarded padding video
    (forwards are collective), the EMA swap gathers partitions, and rank 0 logs the mean over all 3 videos."""
    from cf.strategies import DeepSpeedStrategy

    config = json.loads(open(os.path.join(os.path.dirname(__file__), "..", "configs", "deepspeed",
                                          "zero3_cpu_test.json")).read())
    config["train_micro_batch_size_per_gpu"] = 1
    strategy = DeepSpeedStrategy(config=config, frozen_modules="replicate", start_method="spawn",
                                 process_timeout=600)
    dump = tmp_path / "videos"
    dump.mkdir()
    prompts = PROMPTS + ["a green triangle"]
    evaluation = DumpingEval(str(dump), prompts=prompts, seconds=SECONDS, every_n_steps=2, progress=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3,
                         logger=TensorBoardLogger(str(tmp_path), name="run"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, use_distributed_sampler=False,
                         callbacks=[EMA(decay=0.5, start_step=1), evaluation, StreamThroughputMonitor(every_n_steps=2,
                                                                                                seconds=1.0)])
    trainer.fit(make_student(teacher_file, generator_grad_clip=None, critic_grad_clip=None),
                VideoDataModule(mode="prompts", prompt_file=prompt_file, batch_size=1, num_workers=0))

    for step in (2, 3):  # every 2 steps, then the end of fit
        files = sorted(p.stem for p in dump.glob(f"step{step}_*.npy"))
        assert files == [f"step{step}_rank0_0_0", f"step{step}_rank0_2_0",  # items 0 and 2
                         f"step{step}_rank1_0_0", f"step{step}_rank1_1_0"]  # item 1 + padding (item 0, not counted)
        # the padding video is the same video: the EMA weights were swapped in identically on both ranks
        np.testing.assert_array_equal(np.load(dump / f"step{step}_rank1_0_0.npy"),
                                      np.load(dump / f"step{step}_rank0_0_0.npy"))
        counted = [np.load(dump / f"step{step}_{name}.npy") for name in ("rank0_0_0", "rank1_1_0", "rank0_2_0")]
        record = json.loads((tmp_path / "run" / "version_0" / "long_video_eval" / f"step_{step:08d}.json").read_text())
        assert record["weights"] == "EMA" and record["scalars"]["num_videos"] == 3
        expected = sum(pixel_score_at_1s(v) for v in counted) / 3
        assert record["windowed"]["pixel_first_frame"]["1"] == pytest.approx(expected, abs=1e-3)
    events = read_events(tmp_path / "run" / "version_0")
    assert [e.step for e in events.Scalars("throughput/pixel_fps")] == [2, 3]
    assert [e.step for e in events.Scalars("eval/pixel_first_frame@2s")] == [2, 3]


# ----------------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------------


def test_prompts_from_a_list_or_a_file(prompt_file, tmp_path):
    assert LongVideoEval(prompt_file).prompts == PROMPTS
    assert LongVideoEval([" a cat ", "", "a dog"], seeds=[1, 2]).items() == [("a cat", 1), ("a cat", 2),
                                                                           ("a dog", 1), ("a dog", 2)]
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        LongVideoEval(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        LongVideoEval(str(empty))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seconds": 5, "timestamps": [2, 6]}, ValueError, r"within the 5 s video"),
    ({"seeds": []}, ValueError, "seeds is empty"),
    ({"evaluation_args": {"half_widht": 1}}, ValueError, "unknown evaluation_args"),
    ({"dino": "/no/such/folder"}, FileNotFoundError, "dino: null"),
    ({"memory": "rolling"}, ValueError, "unknown memory preset"),
    ({"every_n_steps": 0}, ValueError, "every_n_steps"),
])
def test_bad_settings_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LongVideoEval(["a cat"], **kwargs)


def test_default_timestamps_follow_the_paper_grid():
    assert default_timestamps(60) == (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
    assert default_timestamps(35) == (10.0, 20.0, 30.0)
    assert default_timestamps(2.5) == (1.0, 2.0)
    with pytest.raises(ValueError, match="seconds >= 1"):
        default_timestamps(0.5)
    assert LongVideoEval(["a cat"], seconds=30).timestamps == (10.0, 20.0, 30.0)


def test_memory_override_and_module_check(teacher_file):
    module = make_student(teacher_file)
    module.configure_model()
    assert StudentGeneration.from_module(module).memory == module.memory_config
    assert StudentGeneration.from_module(module, "sliding").memory == MemoryConfig.sliding(frames_per_chunk=3)
    custom = StudentGeneration.from_module(module, {"sink": 3, "slow": 0, "fast": 9})
    assert (custom.memory.slow, custom.memory.fast, custom.memory.frames_per_chunk) == (0, 9, 3)
    assert custom.memory.keyframes == "similarity" and custom.memory.threshold == 0.95
    assert StudentGeneration.from_module(module).num_latent_frames(SECONDS) == 9
    with pytest.raises(ValueError, match="MemoryConfig fields"):
        StudentGeneration.from_module(module, {"slots": 3})
    with pytest.raises(TypeError, match="CDMDStudent"):
        StudentGeneration.from_module(torch.nn.Linear(2, 2))


# The snippet proposed for configs/toy/student_stage2.yaml (trainer.callbacks); it must build from YAML.
STAGE2_CALLBACKS = """
- class_path: callbacks.LongVideoEval       # windowed metrics vs time, plot and a sample video (EMA weights)
  init_args:
    prompts: ${oc.env:CF_DATA,runs/demo/data}/val/prompts.txt
    seeds: [0, 1]
    seconds: 20
    every_n_steps: 50
    at_fit_end: true
- class_path: callbacks.StreamThroughputMonitor    # pixel FPS (decode included), first-chunk latency, chunk ms, memory
  init_args:
    every_n_steps: 50
    seconds: 5
    warmup_chunks: 1
"""


def test_stage2_callback_snippet_builds_from_yaml(prompt_file, monkeypatch):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback as LightningCallback

    monkeypatch.setenv("CF_DATA", os.path.dirname(os.path.dirname(prompt_file)))
    os.makedirs(os.path.join(os.path.dirname(os.path.dirname(prompt_file)), "val"), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.dirname(prompt_file)), "val", "prompts.txt"), "w") as handle:
        handle.write("\n".join(PROMPTS) + "\n")
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--callbacks", type=list[LightningCallback])
    config = parser.parse_string("callbacks:\n" + "\n".join("  " + line for line in STAGE2_CALLBACKS.splitlines()))
    built = parser.instantiate_classes(config).callbacks
    assert [type(c) for c in built] == [LongVideoEval, StreamThroughputMonitor]
    assert built[0].prompts == PROMPTS and built[0].timestamps == (10.0, 20.0) and built[0].every_n_steps == 50
    assert built[1].seconds == 5.0
