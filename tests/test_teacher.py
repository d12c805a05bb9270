"""TeacherERFT (method §E): layouts from pixel batches, one timestep, target-only loss, harvesting, the teacher's
sampler, per-rank checkpoint state, and a toy run whose loss falls and that resumes identically."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import Tensor

import cf.lit.teacher as teacher_module
from cf.diffusion import sampling_sigmas
from cf.encoders import ToyAutoencoder
from cf.error_bank import NUM_TRAIN_TIMESTEPS
from cf.teacher_layout import dense_layout, long_layout
from cf.lit.teacher import ERFT_STATE_KEY, TeacherERFT
from cf.models.wan import WanConfig
from cf.sampling import continue_latents
from data import VideoDataModule
from data.clips import TeacherClip, TeacherClipMix
from data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
TOY_YAML = REPO / "configs" / "toy" / "teacher_erft.yaml"
TOY_SEGMENTS = {"sink": 3, "sparse": 2, "motion": 6, "target": 6}


def toy_config() -> dict[str, Any]:
    """The toy teacher YAML as these tests use it: training from scratch (random initial weights, lr 1e-3, shift 5)
    of a 3-layer DiT on whole-clip long layouts (the YAML itself fine-tunes the shipped toy base on a clip mix,
    which tests/test_configs_teacher.py covers)."""
    config = yaml.safe_load(TOY_YAML.read_text())
    config["model"]["init_args"].update(
        init_weights=None, layout="long", text_encoder_args={"dim": 32, "max_length": 8}, lr=1.0e-3, shift=5.0,
        network={"dim": 96, "ffn_dim": 256, "freq_dim": 32, "text_dim": 32, "text_len": 8, "in_dim": 4, "out_dim": 4,
                 "num_heads": 2, "num_layers": 3})
    return config


def toy_teacher(**overrides: Any) -> TeacherERFT:
    """The toy config's TeacherERFT (its model init_args), built and ready."""
    args = copy.deepcopy(toy_config()["model"]["init_args"])
    args.update(overrides)
    module = TeacherERFT(**args)
    module.setup("fit")
    module.configure_model()
    return module


def pixel_batch(num_frames: int = 157, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, 3, num_frames, 64, 64, generator=g) * 2 - 1
    return {"video": video, "caption": ["a red circle on a navy striped background"] * batch}


def reset_state(module: TeacherERFT, banks: dict, generator: Tensor) -> None:
    module.banks.load_state_dict(copy.deepcopy(banks))
    module.random_stream().set_state(generator.clone())


# ----------------------------------------------------------------------------------------------------------------------
# Inputs, timestep, loss, harvest
# ----------------------------------------------------------------------------------------------------------------------


def test_long_layout_from_pixel_batch_has_toy_segment_sizes() -> None:
    module = toy_teacher()
    batch = pixel_batch()
    layout, text = module.teacher_inputs(batch)
    sizes = {name: s.stop - s.start for name, s in layout.segments.items()}
    assert sizes == TOY_SEGMENTS
    assert list(layout.segments) == ["sink", "sparse", "motion", "target"]
    assert tuple(layout.latents.shape) == (1, 4, 17, 8, 8) and tuple(text.shape) == (1, 8, 32)
    assert torch.equal(layout.positions, torch.arange(17))
    # independent reference: the toy autoencoder is frame-local, so the target is the last 24 pixel frames averaged
    # in groups of 4 and the sink the first 9 frames as [1, 4, 4]
    ae = ToyAutoencoder(latent_channels=4, spatial_factor=8)
    video = batch["video"]
    torch.testing.assert_close(layout.target, ae.encode(video[:, :, -25:])[:, :, 1:])
    torch.testing.assert_close(layout.segment("sink"), ae.encode(video[:, :, :9]))
    assert layout.context_error_segment == "motion"


def test_dense_layout_and_latents_batches() -> None:
    module = toy_teacher(layout="dense", dense_context_frames=4)
    layout, _ = module.teacher_inputs(pixel_batch(num_frames=41))
    assert {k: v.stop - v.start for k, v in layout.segments.items()} == {"context": 4, "target": 7}
    latents = torch.randn(2, 4, 40, 8, 8)  # a pre-encoded 157-frame clip
    long_module = toy_teacher()
    layout, text = long_module.teacher_inputs({"latents": latents, "text": torch.randn(2, 8, 32), "caption": ["a"] * 2})
    assert {k: v.stop - v.start for k, v in layout.segments.items()} == TOY_SEGMENTS
    assert torch.equal(layout.target, latents[:, :, -6:]) and text.shape == (2, 8, 32)
    with pytest.raises(ValueError, match="'video'.*'latents'"):
        module.teacher_inputs({"caption": ["a"]})


TOY_LONG = toy_config()["model"]["init_args"]["long_layout"]


def clip_batch(video: Tensor, clip: TeacherClip) -> dict[str, Any]:
    """A batch as data.VideoDataModule(teacher_clips=...) makes it from ``video`` (the whole video)."""
    return {"video": video[:, :, list(clip.frame_index)], "frame_index": torch.tensor([clip.frame_index]),
            "layout": [clip.layout], "context_latents": [clip.context_latents], "caption": ["a"]}


def test_batch_layouts_follow_the_clip_and_match_whole_clip_layouts() -> None:
    module = toy_teacher(layout="batch")
    ae = ToyAutoencoder(latent_channels=4, spatial_factor=8)
    mix = TeacherClipMix.from_config({"long_layout": TOY_LONG, "kinds": [
        {"layout": "long"}, {"layout": "dense", "context_latents": 6, "target_latents": 6},
        {"layout": "dense", "context_latents": 0, "target_latents": 6}]})
    video = pixel_batch(num_frames=190)["video"]
    shapes = set()
    for clip in mix.possible_clips(190) + [mix.long_clip(190), mix.dense_clip(mix.kinds[1], 100)]:
        layout, _ = module.teacher_inputs(clip_batch(video, clip))
        end = clip.frame_index[-1] + 1
        if clip.layout == "long":  # reference: the long layout of the whole clip, frames 0 … end − 1
            reference = long_layout(video[:, :, :end], ae, module.long_layout_config)
        else:  # reference: the contiguous clip encoded at once, split after the context
            reference = dense_layout(ae.encode(video[:, :, clip.frame_index[0]:end]), clip.context_latents)
        assert layout.segments == reference.segments
        torch.testing.assert_close(layout.latents, reference.latents)
        assert layout.num_context_frames == clip.context_latents
        assert torch.equal(layout.positions, torch.arange(clip.sequence_latents))
        shapes.add((clip.layout, layout.latents.shape[2], layout.num_context_frames))
    assert layout.source_pixel_frames[0] == (100,)  # the dense clip started at pixel frame 100
    # the toy long layout (sink 3 | sparse 2 | motion 6 | target 6), [context 6 | target 6] and a plain target 6
    assert shapes == {("long", 17, 11), ("dense", 12, 6), ("dense", 6, 0)}


def test_batch_layout_errors_name_the_fix() -> None:
    module = toy_teacher(layout="batch")
    with pytest.raises(ValueError, match="teacher_clips"):
        module.teacher_inputs(pixel_batch())
    with pytest.raises(ValueError, match="latent batches"):
        module.teacher_inputs({"latents": torch.randn(1, 4, 40, 8, 8), "text": torch.randn(1, 8, 32)})
    other = TeacherClipMix.from_config({"long_layout": {**TOY_LONG, "sparse_stride": 24}, "kinds": [{"layout": "long"}]})
    video = pixel_batch(num_frames=190)["video"]
    with pytest.raises(ValueError, match="must equal the model's long_layout"):
        module.teacher_inputs(clip_batch(video, other.long_clip(190)))


def test_erft_step_on_a_plain_target_without_context() -> None:
    module = toy_teacher(layout="batch", erft={"clean_prob": 0.0, "context_prob": 1.0, "num_buckets": 1,
                                               "capacity": 4, "warmup_steps": 0})
    mix = TeacherClipMix.from_config({"long_layout": TOY_LONG,
                                      "kinds": [{"layout": "dense", "context_latents": 0, "target_latents": 6}]})
    (clip,) = mix.possible_clips()
    layout, text = module.teacher_inputs(clip_batch(pixel_batch(num_frames=21)["video"], clip))
    assert layout.num_context_frames == 0 and layout.target.shape[2] == 6
    for _ in range(2):  # the second step finds errors in the banks
        out = module.erft_step(layout, text)
    assert torch.isfinite(out.loss) and not out.injection.info.context_applied.any()
    assert out.injection.info.latent_applied.all()


def test_one_timestep_for_all_frames_and_target_only_loss() -> None:
    module = toy_teacher(erft={"clean_prob": 0.0, "latent_prob": 1.0, "context_prob": 1.0, "noise_prob": 1.0,
                               "num_buckets": 1, "capacity": 4, "warmup_steps": 0})
    layout, text = module.teacher_inputs(pixel_batch(batch=2))
    for _ in range(3):  # fill the banks so that every error kind is injected
        module.erft_step(layout, text)
    banks, generator = copy.deepcopy(module.banks.state_dict()), module.random_stream().get_state()

    seen: list[tuple[Tensor, Tensor]] = []
    handle = module.network.register_forward_pre_hook(lambda mod, args: seen.append((args[0], args[1])))
    reset_state(module, banks, generator)
    reference = module.erft_step(layout, text, harvest=False)
    handle.remove()
    (sequence, t), = seen
    assert tuple(t.shape) == (2,) and torch.equal(t, reference.t)  # one timestep per sample, used by every frame
    assert sequence.shape[2] == 17
    info = reference.injection.info
    assert info.context_applied.all() and info.latent_applied.all() and info.noise_applied.all()

    def perturbed_loss(frames: slice) -> Tensor:
        def hook(mod, args, output):
            output = output.clone()
            output[:, :, frames] += 100.0
            return output

        reset_state(module, banks, generator)
        h = module.network.register_forward_hook(hook)
        try:
            return module.erft_step(layout, text, harvest=False).loss
        finally:
            h.remove()

    assert torch.equal(perturbed_loss(slice(0, 11)), reference.loss)  # context outputs are ignored
    assert not torch.allclose(perturbed_loss(slice(11, 17)), reference.loss)  # the target's are not


def test_errors_are_harvested_every_step_even_on_clean_steps() -> None:
    module = toy_teacher(erft={"clean_prob": 1.0, "num_buckets": 5, "capacity": 50, "warmup_steps": 0})
    layout, text = module.teacher_inputs(pixel_batch())
    for step in range(1, 4):
        out = module.erft_step(layout, text)
        assert out.flags.clean_step
        assert len(module.banks.noise) == len(module.banks.latent) == step
    sigma = float(out.t) / NUM_TRAIN_TIMESTEPS
    delta = (out.flow_pred - out.flow_target).detach()[0]
    bucket = int(module.banks.noise.bucket_index(out.t)[0])
    newest = max(range(len(module.banks.noise.bucket_entries(bucket))),
                 key=lambda i: module.banks.noise._entry_ids[bucket][i])
    torch.testing.assert_close(module.banks.noise.bucket_entries(bucket)[newest].float(), (1 - sigma) * delta,
                               rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(module.banks.latent.bucket_entries(bucket)[newest].float(), -sigma * delta,
                               rtol=2e-3, atol=2e-3)


def test_lora_wraps_attention_and_ffn_only_in_fp32() -> None:
    module = toy_teacher(finetune="lora", lora_rank=4, lora_alpha=4.0)
    trainable = [n for n, p in module.network.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = {n.rsplit(".lora_A.", 1)[0] for n in trainable if ".lora_A." in n}
    per_block = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"}
    assert wrapped == {f"blocks.{i}.{name}" for i in range(3) for name in per_block}
    assert all(p.dtype == torch.float32 for n, p in module.network.named_parameters() if p.requires_grad)
    b = [p for n, p in module.network.named_parameters() if ".lora_B." in n]
    assert all(float(p.detach().abs().max()) == 0.0 for p in b)  # B = 0: the wrapped DiT starts as the base DiT
    optimizer = module.configure_optimizers()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        module.network.get_parameter(n).numel() for n in trainable)


@pytest.mark.parametrize("overrides,error,match", [
    ({"finetune": "half"}, ValueError, "finetune"),
    ({"layout": "sparse"}, ValueError, "layout"),
    ({"init_weights": "/nonexistent/wan.safetensors"}, FileNotFoundError, "init_weights"),
    ({"init_weights": "/nonexistent/wan.safetensors", "network": {"dim": 64}}, ValueError, "num_heads"),
    ({"text_encoder_args": {"dim": 16, "max_length": 8}}, ValueError, "text_dim"),
    ({"autoencoder_args": {"latent_channels": 8}}, ValueError, "latent channels"),
    ({"finetune": "lora", "lora_targets": r".*\.nothing"}, ValueError, "lora_targets"),
    ({"erft": {"clean_prob": 2.0}}, ValueError, "clean_prob"),
    ({"val_timesteps": [0.0]}, ValueError, "val_timesteps"),
])
def test_bad_config_values_fail_before_training(overrides: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        toy_teacher(**overrides)


# ----------------------------------------------------------------------------------------------------------------------
# The teacher's sampler
# ----------------------------------------------------------------------------------------------------------------------


def shifted_sigmas(n: int, shift: float) -> list[float]:
    out = []
    for i in range(n):
        s = 1 - i / n
        out.append(shift * s / (1 + (shift - 1) * s))
    return out + [0.0]


def test_sampling_sigmas_are_the_shifted_grid() -> None:
    torch.testing.assert_close(sampling_sigmas(7, 5.0), torch.tensor(shifted_sigmas(7, 5.0), dtype=torch.float64))


def test_continue_latents_euler_steps_context_and_cfg() -> None:
    g = torch.Generator().manual_seed(0)
    context, noise = torch.randn(2, 4, 5, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    text = torch.randn(2, 8, 32, generator=g)
    calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def network(sequence: Tensor, t: Tensor, texts: Tensor) -> Tensor:
        calls.append((sequence.clone(), t.clone(), texts.clone()))
        conditional = (texts.abs().sum(dim=(1, 2)) > 0).float().view(-1, 1, 1, 1, 1)
        # v = σ for the conditional rows, 2 + σ for the unconditional ones (a σ-dependent field)
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        return sigma + 2.0 * (1 - conditional) + 0 * sequence

    n, shift, scale = 6, 5.0, 4.0
    out = continue_latents(network, context, text, 3, sampling_sigmas(n, shift), scale, noise=noise)
    sig = shifted_sigmas(n, shift)
    expected = noise.clone()
    for i in range(n):
        v_cond, v_uncond = sig[i], 2.0 + sig[i]
        expected = expected + (sig[i + 1] - sig[i]) * (v_uncond + scale * (v_cond - v_uncond))
    torch.testing.assert_close(out, expected)
    assert len(calls) == n  # conditional and unconditional rows go through one batched call per step
    for i, (sequence, t, texts) in enumerate(calls):
        assert sequence.shape[0] == 4 and torch.equal(sequence[:2, :, :5], context)  # clean context every step
        torch.testing.assert_close(t, torch.full((4,), 1000 * sig[i]))
        assert torch.equal(texts[2:], torch.zeros_like(text))  # default negative prompt: zeros


def test_continue_latents_point_mass_lands_on_the_data() -> None:
    c = torch.full((1, 4, 2, 2, 2), 0.7)

    def exact_flow(sequence: Tensor, t: Tensor, texts: Tensor) -> Tensor:
        x = sequence[:, :, -2:]
        return torch.cat([torch.zeros_like(sequence[:, :, :-2]), (x - c) / (t / 1000).view(-1, 1, 1, 1, 1)], dim=2)

    out = continue_latents(exact_flow, torch.zeros(1, 4, 3, 2, 2), torch.ones(1, 8, 32), 2, sampling_sigmas(8),
                           guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, c)


def test_continue_video_method_uses_the_network_and_configured_prompt() -> None:
    module = toy_teacher()
    layout, text = module.teacher_inputs(pixel_batch())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = module.continue_video(layout.context, text, 6, num_inference_steps=3, generator=g1)
    negative = module.text_encoder([module.sampling_config.negative_prompt])
    b = continue_latents(module.network, layout.context, text, 6, sampling_sigmas(3, module.sampling_config.shift),
                         module.sampling_config.guidance_scale, negative, generator=g2)
    assert a.shape == (1, 4, 6, 8, 8)
    torch.testing.assert_close(a, b)
    assert module.network.training  # left as it was


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint state
# ----------------------------------------------------------------------------------------------------------------------


def test_error_banks_are_checkpointed_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    states = []
    for rank in range(2):
        module = toy_teacher(erft={"warmup_steps": 0, "num_buckets": 5, "capacity": 8}, seed=rank)
        layout, text = module.teacher_inputs(pixel_batch(seed=rank))
        for _ in range(rank + 2):
            module.erft_step(layout, text)
        states.append({"banks": module.banks.state_dict(), "generator": module.random_stream().get_state()})

    def fake_gather_object(obj: Any, out: list | None, dst: int, group: Any) -> None:
        assert dst == 0 and out is not None and len(out) == 2
        out[:] = copy.deepcopy(states)

    monkeypatch.setattr(teacher_module, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(teacher_module.dist, "gather_object", fake_gather_object)
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint[ERFT_STATE_KEY]
    assert saved["world_size"] == 2 and sorted(saved["ranks"]) == [0, 1]
    export = checkpoint["dit_export"]
    assert WanConfig(**export["wan_config"]) == WanConfig(**toy_config()["model"]["init_args"]["network"])
    assert (export["finetune"], export["network_prefix"]) == ("full", "network")

    for rank, world in ((0, 2), (1, 2), (2, 3)):
        fresh = toy_teacher(erft={"warmup_steps": 0, "num_buckets": 5, "capacity": 8})
        monkeypatch.setattr(teacher_module, "rank_and_world", lambda r=rank, w=world: (r, w))
        fresh.on_load_checkpoint(checkpoint)
        source = states[rank % 2]
        assert len(fresh.banks.noise) == sum(len(b) for b in source["banks"]["noise"]["entries"])
        assert fresh.banks.noise.steps_seen == source["banks"]["noise"]["steps_seen"]
        assert torch.equal(fresh.random_stream().get_state(), source["generator"])


# ----------------------------------------------------------------------------------------------------------------------
# A toy run: the loss falls, and a resumed run continues identically
# ----------------------------------------------------------------------------------------------------------------------


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_shards(str(root), num_clips=4, seed=3, splits={"train": 3, "val": 1}, maxcount=8,
                                  min_seconds=10.0, max_seconds=10.5, num_workers=1)


def toy_datamodule(shards: dict[str, Any]) -> VideoDataModule:
    # every epoch yields the same 3 clips in the same order, so a run resumed at an epoch boundary sees the same data
    return VideoDataModule(train_urls=shards["train"]["urls"], num_frames=157, height=64, width=64, fps=16,
                           batch_size=1, num_workers=0, resampled=False, shuffle_buffer=0, clip_start="start")


def toy_trainer(root: Path, max_epochs: int, recorder: LossRecorder, save: bool) -> pl.Trainer:
    callbacks: list[pl.Callback] = [recorder]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1,
                                                      every_n_epochs=1))
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
                      gradient_clip_val=1.0, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=save, callbacks=callbacks, limit_val_batches=0,
                      use_distributed_sampler=False)


def fit_measure(module: TeacherERFT, shards: dict[str, Any]) -> float:
    """Fixed-noise weighted flow loss of the teacher on the training clips."""
    datamodule = toy_datamodule(shards)
    datamodule.setup("fit")
    with torch.no_grad():
        values = [float(module.held_out_loss(*module.teacher_inputs(batch), torch.Generator().manual_seed(i)))
                  for i, batch in enumerate(datamodule.train_dataloader())]
    return sum(values) / len(values)


def test_toy_run_loss_falls_and_resume_is_identical(synthetic_shards: dict[str, Any], tmp_path: Path) -> None:
    epochs, resume_epoch = 10, 4  # 3 steps per epoch
    torch.manual_seed(0)
    straight = toy_teacher()
    before = fit_measure(straight, synthetic_shards)
    recorder = LossRecorder()
    toy_trainer(tmp_path / "a", epochs, recorder, save=True).fit(straight, datamodule=toy_datamodule(synthetic_shards))
    after = fit_measure(straight, synthetic_shards)
    assert len(recorder.losses) == 3 * epochs
    assert after < 0.5 * before, f"fit loss {before:.3f} -> {after:.3f}"

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = TeacherERFT(**toy_config()["model"]["init_args"])
    resumed_recorder = LossRecorder()
    ckpt = tmp_path / "a" / f"epoch={resume_epoch}.ckpt"
    toy_trainer(tmp_path / "b", epochs, resumed_recorder, save=False).fit(
        resumed, datamodule=toy_datamodule(synthetic_shards), ckpt_path=str(ckpt))
    later = {step: loss for step, loss in recorder.losses.items() if step > 3 * (resume_epoch + 1)}
    assert resumed_recorder.losses == later
    for (name, a), (_, b) in zip(straight.network.state_dict().items(), resumed.network.state_dict().items()):
        assert torch.equal(a, b), name
    for bank in ("noise", "latent"):
        a, b = getattr(straight.banks, bank).state_dict(), getattr(resumed.banks, bank).state_dict()
        assert a["steps_seen"] == b["steps_seen"] == 3 * epochs
        assert a["entry_ids"] == b["entry_ids"] and torch.equal(a["generator_state"], b["generator_state"])
        assert all(torch.equal(x, y) for bx, by in zip(a["entries"], b["entries"]) for x, y in zip(bx, by))
    assert torch.equal(straight.random_stream().get_state(), resumed.random_stream().get_state())


# ----------------------------------------------------------------------------------------------------------------------
# Two processes: every rank's banks go into the checkpoint and come back to the same rank
# ----------------------------------------------------------------------------------------------------------------------


class RankStateDump(pl.Callback):
    """Writes each rank's error banks and generator state at train start and end to ``<out>/<when>_rank<r>.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def _dump(self, trainer: pl.Trainer, module: TeacherERFT, when: str) -> None:
        state = {"banks": module.banks.state_dict(), "generator": module.random_stream().get_state()}
        torch.save(state, Path(self.out_dir) / f"{when}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: TeacherERFT) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: TeacherERFT) -> None:
        self._dump(trainer, pl_module, "end")


class LatentBatches(pl.LightningDataModule):
    """Eight fixed latent batches (made inside each process: tensors are not sent to the spawned workers)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(0)
        batches = [{"latents": torch.randn(1, 4, 6, 4, 4, generator=g), "text": torch.randn(1, 8, 32, generator=g)}
                   for _ in range(8)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


def spawn_fit(root: Path, max_steps: int, ckpt_path: Path | None = None) -> None:
    module = TeacherERFT(network=WanConfig.tiny(), finetune="full", autoencoder=None, text_encoder=None,
                         layout="dense", lr=1e-3, erft={"num_buckets": 5, "capacity": 8, "warmup_steps": 1,
                                                        "clean_prob": 0.0})
    (root / "dumps").mkdir(parents=True, exist_ok=True)
    callbacks = [RankStateDump(str(root / "dumps"))]
    if ckpt_path is None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="last"))
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp_spawn",
                         max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=ckpt_path is None, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(module, datamodule=LatentBatches(), ckpt_path=str(ckpt_path) if ckpt_path else None)


def same_bank_state(a: dict, b: dict) -> bool:
    return (a["steps_seen"] == b["steps_seen"] and a["entry_ids"] == b["entry_ids"]
            and all(torch.equal(x, y) for bx, by in zip(a["entries"], b["entries"]) for x, y in zip(bx, by)))


@pytest.mark.slow
def test_each_rank_banks_are_checkpointed_and_restored_to_that_rank(tmp_path: Path) -> None:
    spawn_fit(tmp_path / "first", max_steps=3)
    checkpoint = torch.load(tmp_path / "first" / "ckpt" / "last.ckpt", weights_only=True)
    saved = checkpoint[ERFT_STATE_KEY]
    assert saved["world_size"] == 2 and sorted(saved["ranks"]) == [0, 1]
    ends = [torch.load(tmp_path / "first" / "dumps" / f"end_rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in range(2):
        for bank in ("noise", "latent"):
            assert same_bank_state(saved["ranks"][rank]["banks"][bank], ends[rank]["banks"][bank])
        assert torch.equal(saved["ranks"][rank]["generator"], ends[rank]["generator"])
    # the warm-up step gathered both ranks' errors into every bank; afterwards each rank stored its own
    assert len(ends[0]["banks"]["noise"]["entry_ids"]) == 5
    assert [sum(map(len, end["banks"]["noise"]["entries"])) for end in ends] == [4, 4]
    assert not same_bank_state(ends[0]["banks"]["noise"], ends[1]["banks"]["noise"])

    spawn_fit(tmp_path / "resumed", max_steps=4, ckpt_path=tmp_path / "first" / "ckpt" / "last.ckpt")
    for rank in range(2):
        start = torch.load(tmp_path / "resumed" / "dumps" / f"start_rank{rank}.pt", weights_only=True)
        for bank in ("noise", "latent"):
            assert same_bank_state(start["banks"][bank], saved["ranks"][rank]["banks"][bank])
        assert torch.equal(start["generator"], saved["ranks"][rank]["generator"])
