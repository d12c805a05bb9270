"""The CDMD student module (method §F; §J.4 items 5–9 and 11 at the module level)."""

from __future__ import annotations

import dataclasses
import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import cf.lit.student as student_module
from callbacks.ema import EMA
from cf.diffusion import training_weight
from cf.encoders import HashedTextEncoder
from cf.generate import GeneratorSpec, load_generator
from cf.export import read_generator_weights
from cf.lit.student import NEGATIVE_PROMPT, CDMDStudent
from cf.losses import predict_x0
from helpers.student_args import student_args
from cf.memory import MemoryConfig
from cf.models.wan import WanConfig
from cf.rollout import RolloutConfig
from cf.weights import read_state_dict
from data import VideoDataModule

TINY = WanConfig.tiny()
TEXT = {"dim": 32, "max_length": 8}






@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle moves left\n")  # one prompt: every batch is the same, so runs compare exactly
    return str(path)


def make_student(teacher_file: str, stage: int = 1, build: bool = True, **overrides) -> CDMDStudent:
    """A tiny student: stage 1 = 2-block (6-frame) rollouts, no context; stage 2 = 5-block rollouts, 6 + 6 window."""
    args = dict(network=TINY, teacher_weights=teacher_file, latent_size=(4, 4), text_encoder_args=TEXT,
                memory=MemoryConfig(), critic_steps_per_generator_step=2, val_num_frames=6,
                generator_lr=1e-3, critic_lr=1e-3)
    if stage == 1:
        args.update(rollout=RolloutConfig(min_blocks=2, max_blocks=2, grad_window_frames=3), target_window=6)
    else:
        args.update(rollout=RolloutConfig(min_blocks=5, max_blocks=5, grad_window_frames=3), context_window=6,
                    target_window=6, context_teacher=True, context_fake=True, reencode_image_latent=True,
                    guidance_scale=5.0, critic_time_weighting=True)
    args.update(overrides)
    module = CDMDStudent(**student_args(**args))
    if build:
        module.configure_model()
    return module


def make_trainer(root, max_steps: int, callbacks=(), checkpoint: bool = False) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=list(callbacks),
                      enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root)


def prompts(prompt_file: str, batch_size: int = 1) -> VideoDataModule:
    return VideoDataModule(mode="prompts", prompt_file=prompt_file, batch_size=batch_size, num_workers=0)


# ----------------------------------------------------------------------------------------------------------------------
# Losses at the module level
# ----------------------------------------------------------------------------------------------------------------------


def test_generator_loss_reaches_only_the_grad_window(teacher_file, monkeypatch):
    module = make_student(teacher_file, stage=2)
    captured = {}
    real_rollout = student_module.train_rollout

    def spy(*args, **kwargs):
        frames = real_rollout(*args, **kwargs)
        frames.retain_grad()
        captured["frames"] = frames
        return frames

    monkeypatch.setattr(student_module, "train_rollout", spy)
    loss, stats = module.generator_loss(["a red circle"], step=0)
    loss.backward(retain_graph=True)
    frames = captured["frames"]
    assert frames.shape[2] == stats["frames"] == 15
    per_frame = frames.grad.abs().sum(dim=(0, 1, 3, 4))
    # window = [re-encoded frame 3 | frames 4..14]; context = its first 6 (detached), target = frames 9..14
    assert torch.all(per_frame[:9] == 0)
    assert torch.all(per_frame[9:] > 0)
    generator = module.generator
    params = [p for p in generator.parameters()]
    through_window = torch.autograd.grad(frames[:, :, 12:], params, frames.grad[:, :, 12:], allow_unused=True)
    for p, g in zip(params, through_window):
        expected = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-9)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0
    assert all(p.grad is None for p in module.critic.parameters())
    assert all(p.grad is None for p in module.real_score.parameters())


def test_real_score_uses_cfg_with_the_negative_prompt(teacher_file, monkeypatch):
    module = make_student(teacher_file, stage=2, guidance_scale=4.0)
    captured, calls = {}, []

    def spy_loss(x, x0_real, x0_fake):
        captured.update(x=x.detach(), real=x0_real, fake=x0_fake)
        return real_loss(x, x0_real, x0_fake)

    import cf.losses as losses_module

    real_loss = losses_module.dmd_generator_loss
    monkeypatch.setattr(losses_module, "dmd_generator_loss", spy_loss)
    teacher_forward = module.real_score.forward
    critic_forward = module.critic.forward

    def record(name, forward):
        def wrapped(x, t, context, *rest):
            calls.append((name, x.detach().clone(), t.clone(), context.detach().clone()))
            return forward(x, t, context, *rest)
        return wrapped

    monkeypatch.setattr(module.real_score, "forward", record("teacher", teacher_forward))
    monkeypatch.setattr(module.critic, "forward", record("critic", critic_forward))
    module.generator_loss(["a red circle"], step=3)

    (_, x, t, text), = [c for c in calls if c[0] == "teacher"]
    prompt = HashedTextEncoder(**TEXT)(["a red circle"])
    negative = HashedTextEncoder(**TEXT)([NEGATIVE_PROMPT])
    assert not torch.equal(prompt, negative)
    torch.testing.assert_close(text, torch.cat([prompt, negative]))
    # independent reference: two separate teacher calls and the (1 + g) CFG formula on the target part
    context, noisy = x[:1, :, :6], x[:1, :, 6:]
    t1 = t[:1]
    with torch.no_grad():
        cond = predict_x0(module.real_score, noisy, t1, prompt, context)
        uncond = predict_x0(module.real_score, noisy, t1, negative, context)
    torch.testing.assert_close(captured["real"], cond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    # the critic sees the same [context | noisy target] with the prompt only (no CFG)
    (_, critic_x, _, critic_text), = [c for c in calls if c[0] == "critic"]
    torch.testing.assert_close(critic_x, x[:1])
    torch.testing.assert_close(critic_text, prompt)
    # the noisy target is the student's target re-noised at t: x_t = (1 − σ)x + σε for some ε
    sigma = float(t1) / 1000
    implied_noise = (noisy - (1 - sigma) * captured["x"]) / sigma
    assert 0.5 < float(implied_noise.std()) < 1.5


def test_critic_loss_resets_the_context_to_clean_and_scores_the_target(teacher_file, monkeypatch):
    module = make_student(teacher_file, stage=2)
    calls = []
    critic_forward = module.critic.forward

    def wrapped(x, t, context, *rest):
        out = critic_forward(x, t, context, *rest)
        calls.append((x.detach().clone(), t.clone(), out))
        return out

    monkeypatch.setattr(module.critic, "forward", wrapped)
    captured = {}
    real_window = student_module.teacher_window

    def spy_window(*args, **kwargs):
        context, target = real_window(*args, **kwargs)
        captured.update(context=context, target=target)
        return context, target

    monkeypatch.setattr(student_module, "teacher_window", spy_window)
    loss, _ = module.critic_loss(["a red circle"], step=1)
    (x, t, flow), = calls
    torch.testing.assert_close(x[:, :, :6], captured["context"])  # clean context
    sigma = float(t) / 1000
    noise = (x[:, :, 6:] - (1 - sigma) * captured["target"]) / sigma
    target = noise - captured["target"]
    weight = float(training_weight(t))
    expected = ((flow[:, :, 6:] - target) ** 2).mean() * weight
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in module.generator.parameters())
    assert any(p.grad is not None for p in module.critic.parameters())


def test_gradient_checkpointing_gives_identical_generator_grads(teacher_file):
    grads = []
    for checkpointing in (False, True):
        module = make_student(teacher_file, stage=2, gradient_checkpointing=checkpointing)
        loss, _ = module.generator_loss(["a red circle"], step=2)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in module.generator.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        # identical up to float32 rounding of sums, which is relative to the largest gradient entry
        scale = float(grads[0][name].abs().max())
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_draws_are_a_function_of_seed_and_step(teacher_file):
    module = make_student(teacher_file, stage=1)
    a, _ = module.critic_loss(["a red circle"], step=4)
    b, _ = module.critic_loss(["a red circle"], step=4)
    c, _ = module.critic_loss(["a red circle"], step=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------------


class GradientRecorder(Callback):
    """Before each optimizer step: which networks hold gradients."""

    def __init__(self) -> None:
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        name = "generator" if optimizer is pl_module.optimizers()[0].optimizer else "critic"
        has = {net: any(p.grad is not None for p in getattr(pl_module, net).parameters())
               for net in ("generator", "critic", "real_score")}
        self.steps.append((pl_module.trainer_step, name, has))


def test_update_ratio_frozen_networks_and_ema_start(teacher_file, prompt_file, tmp_path):
    module = make_student(teacher_file, stage=1, critic_steps_per_generator_step=5)
    recorder, ema = GradientRecorder(), EMA(decay=0.5, start_step=3)
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[recorder, ema])
    trainer.fit(module, prompts(prompt_file))
    assert (module.trainer_step, module.generator_updates, module.critic_updates) == (10, 2, 10)
    assert trainer.global_step == 10
    generator_steps = [step for step, name, _ in recorder.steps if name == "generator"]
    assert generator_steps == [0, 5]
    for _, name, has in recorder.steps:
        other = "critic" if name == "generator" else "generator"
        assert has[name] and not has[other] and not has["real_score"]
    # EMA created after trainer step 3, then updated once: after the generator update of step 5
    assert ema.started and ema.num_updates == 1
    metrics = trainer.logged_metrics
    assert torch.isfinite(metrics["train/generator_loss"]) and torch.isfinite(metrics["train/critic_loss"])
    assert metrics["train/generator_updates"] == 2
    expected_lr = 1e-3 * (0.2 + 0.4 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 2001))))
    torch.testing.assert_close(metrics["train/generator_lr"], expected_lr.float())
    assert all(p.requires_grad for p in module.generator.parameters())
    assert all(p.requires_grad for p in module.critic.parameters())
    assert not any(p.requires_grad for p in module.real_score.parameters())


def _state(module: CDMDStudent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resumed_run_continues_identically(teacher_file, prompt_file, tmp_path):
    full_ema = EMA(decay=0.5, start_step=1)
    full = make_student(teacher_file, stage=2)
    make_trainer(tmp_path / "full", 4, [full_ema]).fit(full, prompts(prompt_file))

    first_ema = EMA(decay=0.5, start_step=1)
    first = make_student(teacher_file, stage=2)
    trainer = make_trainer(tmp_path / "a", 2, [first_ema])
    trainer.fit(first, prompts(prompt_file))
    checkpoint = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert not any(k.startswith("real_score.") for k in saved["state_dict"])
    assert saved["cdmd_counters"] == {"trainer_step": 2, "generator_updates": 1, "critic_updates": 2}

    resumed_ema = EMA(decay=0.5, start_step=1)
    resumed = make_student(teacher_file, stage=2)
    make_trainer(tmp_path / "b", 4, [resumed_ema]).fit(resumed, prompts(prompt_file), ckpt_path=checkpoint)

    assert (resumed.trainer_step, resumed.generator_updates, resumed.critic_updates) == (4, 2, 4)
    expected, got = _state(full), _state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    for key, value in full_ema.ema_state_dict().items():
        torch.testing.assert_close(resumed_ema.ema_state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(expected["generator.head.head.weight"], _state(make_student(teacher_file))[
        "generator.head.head.weight"])


def test_validation_streams_videos_and_export_rebuilds_the_generator(teacher_file, prompt_file, tmp_path):
    module = make_student(teacher_file, stage=1)
    ema = EMA(decay=0.5, start_step=1)
    data = VideoDataModule(mode="prompts", prompt_file=prompt_file, val_prompt_file=prompt_file, batch_size=1,
                           num_workers=0)
    outputs = []

    class Outputs(Callback):
        def on_validation_batch_end(self, trainer, pl_module, output, batch, batch_idx, dataloader_idx=0):
            outputs.append(output)

    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ema, Outputs()],
                         val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    (output,) = outputs  # what callbacks.video_logger.VideoLogger reads
    (video,) = module.validation_videos
    torch.testing.assert_close(output["videos"][0], video["video"])
    assert video["caption"] == "a red circle moves left"
    assert video["video"].shape == (3, 1 + 4 * 5, 32, 32)  # 6 latents -> 21 frames of 4x4 latents x 8
    assert video["video"].abs().max() <= 1

    path = module.export_generator(tmp_path / "export" / "generator.safetensors")
    spec = json.loads((path.parent / "config.json").read_text())
    assert spec["ema"] is True and spec["latent_size"] == [4, 4] and spec["frames_per_chunk"] == 3
    weights = read_state_dict(path)
    for key, value in ema.ema_state_dict().items():
        torch.testing.assert_close(weights[key], value)
    rebuilt = load_generator(GeneratorSpec.load(path.parent / "config.json"), path)
    for key, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, weights[key])
    # a Lightning checkpoint of the student also initialises a generator
    checkpoint = tmp_path / "student.ckpt"
    trainer.save_checkpoint(checkpoint)
    from_checkpoint = read_generator_weights(checkpoint, use_ema=False)
    for key, value in module.generator.state_dict().items():
        torch.testing.assert_close(from_checkpoint[key], value)
    # ... and carries its generator spec, so `cf generate` needs nothing else (EMA weights first)
    as_json = lambda spec: json.loads(json.dumps(dataclasses.asdict(spec)))  # noqa: E731  tuples become lists
    exported_spec = GeneratorSpec.load(path.parent / "config.json")
    assert as_json(GeneratorSpec.from_checkpoint(checkpoint)) == as_json(exported_spec)
    from cf.cli import main

    main(["generate", "--weights", str(checkpoint), "--prompt", "a red circle", "--seconds", "1",
          "--out", str(tmp_path / "videos")])
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1


class SaveWeights(Callback):
    """Writes the trained networks at the end of fit (from inside a spawned worker too)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
                    if not k.startswith("real_score.")}, self.path)


def test_deepspeed_engines_accumulate_like_the_plain_loop(teacher_file, prompt_file, tmp_path):
    """Two DeepSpeed engines (ZeRO-2, one process) with engine-side accumulation and clipping give the same
    updates as the plain accumulate-clip-step loop."""
    from cf.strategies import DeepSpeedStrategy

    overrides = dict(gradient_accumulation=2, generator_grad_clip=0.05, critic_grad_clip=0.05)
    runs = {}
    for name in ("plain", "deepspeed"):
        kwargs = {}
        if name == "deepspeed":
            config = {"zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 1,
                      "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
            engine = {"gradient_accumulation_steps": 2, "gradient_clipping": 0.05}
            kwargs["strategy"] = DeepSpeedStrategy(config=config, start_method="spawn", process_timeout=300,
                                                   engine_configs={"generator": engine, "critic": engine})
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, default_root_dir=tmp_path / name,
                             callbacks=[SaveWeights(tmp_path / f"{name}.pt")], **kwargs)
        trainer.fit(make_student(teacher_file, build=name == "plain", **overrides), prompts(prompt_file, 2))
        runs[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    initial = _state(make_student(teacher_file))
    for key, value in runs["plain"].items():
        torch.testing.assert_close(runs["deepspeed"][key], value, rtol=0, atol=2e-5, msg=key)
    moved = max(float((value - initial[key]).abs().max()) for key, value in runs["plain"].items())
    assert moved > 1e-3  # both networks moved, by far more than the tolerance


# ----------------------------------------------------------------------------------------------------------------------
# Configuration errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"teacher_weights": "missing/teacher.safetensors"}, ValueError, "teacher_weights .* does not exist"),
        ({"teacher_weights": None}, ValueError, "teacher_weights is required"),
        ({"context_window": 6}, ValueError, "neither context_teacher nor context_fake"),
        ({"context_teacher": True}, ValueError, "need a context"),
        ({"target_window": 21}, ValueError, "shorter than the teacher window"),
        ({"text_encoder": "no/such/folder"}, ValueError, "text_encoder"),
        ({"memory": MemoryConfig(frames_per_chunk=1, fast=2, slow=2, rope_length=21)}, ValueError,
         "frames_per_chunk"),
        ({"teacher_context": "memory"}, ValueError, "set window.context_frames to that"),
    ],
)
def test_bad_configurations_fail_before_training(teacher_file, overrides, error, match):
    args = dict(network=TINY, teacher_weights=teacher_file, latent_size=(4, 4), text_encoder_args=TEXT,
                rollout=RolloutConfig(min_blocks=2, max_blocks=2, grad_window_frames=3), target_window=6,
                val_num_frames=6)
    args.update(overrides)
    with pytest.raises(error, match=match):
        CDMDStudent(**student_args(**args))


def test_memory_teacher_context_is_the_students_memory_at_the_target(teacher_file):
    """§I.4 option: the teacher's context = the memory's sink and slow slots when the target starts + the last
    `fast` frames, read from the rollout itself (every chunk a keyframe: the slot table is predictable)."""
    from cf.memory import simulate_slots

    memory = MemoryConfig(sink=1, slow=2, fast=3, frames_per_chunk=3, rope_length=6, keyframes="always")
    module = make_student(teacher_file, stage=2, memory=memory, teacher_context="memory",
                          context_window=6, rollout=RolloutConfig(min_blocks=6, max_blocks=6, grad_window_frames=3))
    module.setup("fit")
    frames = {}
    import cf.lit.student as student_module

    real_rollout = student_module.train_rollout

    def capture(*args, **kwargs):
        out = real_rollout(*args, **kwargs)
        frames["all"] = out
        return out

    student_module.train_rollout = capture
    try:
        context, target, _, info = module.rollout(["a red circle"], step=0, phase="critic", grad=False)
    finally:
        student_module.train_rollout = real_rollout
    assert info["frames"] == 18
    slots = simulate_slots(memory, 12, lambda c: True)[-1]  # the table when the target (frames 12-17) starts
    expected = [f for f in slots[:3] if f >= 0] + [9, 10, 11]
    assert context.shape[2] == 6 and not context.requires_grad
    assert torch.equal(context, frames["all"][:, :, expected])
    assert torch.equal(target, frames["all"][:, :, 12:])


def test_batch_must_split_into_micro_batches(teacher_file):
    module = make_student(teacher_file, gradient_accumulation=2)
    with pytest.raises(ValueError, match="gradient_accumulation=2"):
        module._micro_batches({"caption": ["a", "b", "c"]})
    assert module._micro_batches({"caption": ["a", "b", "c", "d"]}) == [["a", "b"], ["c", "d"]]


def test_mismatched_encoder_is_named(teacher_file):
    module = make_student(teacher_file, text_encoder_args={"dim": 16, "max_length": 8})
    with pytest.raises(ValueError, match="text_dim"):
        module.setup("fit")
