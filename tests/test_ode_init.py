"""Stage 0 (method §F.9, §I.20): teacher ODE pairs in shards and the causal student's ODE regression."""

from __future__ import annotations

import argparse
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from cf.diffusion import sampling_sigmas, shift_sigma
from cf.encoders import HashedTextEncoder
from cf.lit.ode_init import ODEInitStudent, ode_regression_inputs, ode_regression_loss
from cf.models.kv_cache import GrowingKVCache
from cf.models.wan import CausalWanDiT, WanConfig, WanDiT
from cf.weights import read_state_dict
from data.cli import register_ode_pairs
from data.ode_pairs import (
    ODEPairConfig,
    ODEPairDataModule,
    ODEPairStream,
    ode_trajectory,
    write_ode_pairs,
)

TINY = WanConfig.tiny()
TEXT = {"dim": 32, "max_length": 8}


class LinearFlow(nn.Module):
    """v̂ = a·x with a = 1 for a non-zero prompt embedding and b for an all-zero one (the unconditional)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(1, 1, 1)
        self.a, self.b = a, b

    def forward(self, x, t, text):
        conditional = (text.abs().sum(dim=(1, 2)) > 0).float().view(-1, 1, 1, 1, 1)
        return x * (conditional * self.a + (1 - conditional) * self.b)


def test_sampling_sigmas_follow_the_shifted_grid():
    sigmas = sampling_sigmas(48, 8.0)
    assert sigmas.shape == (49,)
    for i in (0, 12, 24, 47):
        assert float(sigmas[i]) == pytest.approx(float(shift_sigma(1 - i / 48, 8.0)))
    assert float(sigmas[-1]) == 0
    assert float(sigmas[12]) == pytest.approx(0.96, abs=0.001)  # §F.9: step 12 of the shift-8 grid


def test_ode_trajectory_matches_closed_form_euler_with_standard_cfg():
    a, b, g = -0.7, 0.4, 6.0
    sigmas = sampling_sigmas(10, 8.0)
    noise = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.ones(2, 8, 32)
    negative = torch.zeros(1, 8, 32)
    states = ode_trajectory(LinearFlow(a, b), noise, text, negative, sigmas, g, stored_steps=(0, 3, 7))
    rate = b + g * (a - b)  # uncond + g(cond − uncond)
    factors = [1.0]
    for i in range(10):
        factors.append(factors[-1] * (1 + (float(sigmas[i + 1]) - float(sigmas[i])) * rate))
    assert states.shape == (2, 4, 4, 3, 4, 4)
    for slot, step in enumerate((0, 3, 7, 10)):
        torch.testing.assert_close(states[:, slot], noise * factors[step], rtol=1e-5, atol=1e-6)


def test_pairs_round_trip_through_shards(teacher_file, tmp_path):
    teacher = WanDiT(TINY)
    teacher.load_state_dict(read_state_dict(teacher_file))
    encoder = HashedTextEncoder(**TEXT)
    config = ODEPairConfig(num_frames=6, latent_size=(4, 4), num_steps=8, stored_steps=(0, 2, 4, 6))
    prompts = ["a red circle", "a blue square on stripes", "a green triangle"]
    report = write_ode_pairs(teacher, encoder, prompts, str(tmp_path / "ode-%06d.tar"), config, seed=5,
                             batch_size=2, maxcount=2)
    assert report.num_samples == 3 and report.num_shards == 2
    stream = ODEPairStream(report.urls, batch_size=1, text_length=8, resampled=False, shuffle_buffer=0)
    batches = list(stream)
    assert [batch["caption"][0] for batch in batches] == prompts
    sigmas = config.sigmas()
    for i, batch in enumerate(batches):
        assert batch["ode"].shape == (1, 5, 4, 6, 4, 4)
        assert batch["text"].shape == (1, 8, 32)
        torch.testing.assert_close(batch["text"][0], encoder([prompts[i]])[0])
        torch.testing.assert_close(batch["timesteps"][0], torch.tensor([1000 * float(sigmas[s]) for s in (0, 2, 4, 6)]))
        noise = torch.randn((4, 6, 4, 4), generator=torch.Generator().manual_seed(5 + i))
        torch.testing.assert_close(batch["ode"][0, 0], noise)  # the state before step 0 is the noise
        expected = ode_trajectory(teacher, noise[None], encoder([prompts[i]]), encoder([config.negative_prompt]),
                                  sigmas, 6.0, (0, 2, 4, 6))
        torch.testing.assert_close(batch["ode"], expected, rtol=1e-4, atol=1e-5)


def test_regression_inputs_pick_one_stored_state_per_chunk():
    b, k, c, frames = 3, 4, 2, 9
    trajectory = torch.arange(k + 1, dtype=torch.float32).view(1, k + 1, 1, 1, 1, 1)
    trajectory = trajectory + 10 * torch.arange(frames, dtype=torch.float32).view(1, 1, 1, frames, 1, 1)
    trajectory = trajectory.expand(b, k + 1, c, frames, 2, 2).clone()
    timesteps = torch.tensor([1000.0, 937.5, 833.3, 625.0])
    x, t, index = ode_regression_inputs(trajectory, timesteps, 3, torch.Generator().manual_seed(0))
    assert x.shape == (b, c, frames, 2, 2) and t.shape == (b, frames)
    assert torch.all(index.view(b, 3, 3) == index.view(b, 3, 3)[:, :, :1])  # constant within a chunk
    assert int(index.max()) < k  # never the clean latent
    expected = index.float() + 10 * torch.arange(frames).float()
    torch.testing.assert_close(x[:, 0, :, 0, 0], expected)
    torch.testing.assert_close(t, timesteps[index])
    with pytest.raises(ValueError, match="denoising steps"):
        ode_regression_inputs(trajectory, timesteps[:3], 3)


def test_clean_context_chunks_are_the_clean_latent_at_t0_and_never_the_last():
    b, k, c, frames = 4000, 4, 1, 9
    trajectory = torch.arange(k + 1, dtype=torch.float32).view(1, k + 1, 1, 1, 1, 1).expand(b, k + 1, c, frames, 1, 1)
    timesteps = torch.tensor([1000.0, 937.5, 833.3, 625.0])
    plain = ode_regression_inputs(trajectory, timesteps, 3, torch.Generator().manual_seed(5))
    same = ode_regression_inputs(trajectory, timesteps, 3, torch.Generator().manual_seed(5), clean_context_prob=0.0)
    assert torch.equal(plain[2], same[2])  # p = 0 draws exactly what the plain recipe draws
    x, t, index = ode_regression_inputs(trajectory, timesteps, 3, torch.Generator().manual_seed(5),
                                        clean_context_prob=0.4)
    per_chunk = index[:, ::3]
    clean = per_chunk == k
    assert not clean[:, -1].any()
    assert abs(clean[:, :-1].float().mean().item() - 0.4) < 0.03
    # a clean chunk holds the final latent at t = 0; the other chunks hold a stored state at its timestep
    torch.testing.assert_close(x[:, 0, :, 0, 0], index.float())
    torch.testing.assert_close(t[index == k], torch.zeros(int((index == k).sum())))
    torch.testing.assert_close(t[index < k], timesteps[index[index < k]])
    with pytest.raises(ValueError, match="clean_context_prob"):
        ode_regression_inputs(trajectory, timesteps, 3, clean_context_prob=1.0)


def test_clean_context_loss_equals_the_chunk_by_chunk_inference_path():
    """The block-causal loss with clean context chunks equals a reference run through the KV cache chunk by chunk
    (a clean chunk is a commit pass at t = 0, as at inference), with the error averaged over the noisy chunks."""
    torch.manual_seed(6)
    student = CausalWanDiT(TINY, frames_per_chunk=3).eval()
    trajectory = torch.randn(3, 5, TINY.in_dim, 9, 4, 4)
    text = torch.randn(3, 8, TINY.text_dim)
    timesteps = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    with torch.no_grad():
        loss = ode_regression_loss(student, trajectory, text, timesteps, torch.Generator().manual_seed(7),
                                   clean_context_prob=0.5)
        x, t, index = ode_regression_inputs(trajectory, timesteps, 3, torch.Generator().manual_seed(7), 0.5)
        assert (index == 4).any() and (index < 4).any()
        total, count = 0.0, 0
        for i in range(3):
            cache = GrowingKVCache(TINY.num_layers)
            text_kv = student.text_kv(text[i:i + 1])
            for s in range(0, 9, 3):
                chunk_t = t[i:i + 1, s]
                flow = student.forward_chunk(x[i:i + 1, :, s:s + 3], chunk_t, text_kv, cache, s,
                                             commit=bool(chunk_t == 0))
                if chunk_t.item() > 0:
                    x0 = x[i:i + 1, :, s:s + 3] - chunk_t.view(1, 1, 1, 1, 1) / 1000.0 * flow
                    total += (x0 - trajectory[i:i + 1, -1, :, s:s + 3]).square().sum().item()
                    count += x0.numel()
    assert abs(loss.item() - total / count) <= 1e-4 * total / count


def test_regression_loss_falls(teacher_file, tmp_path):
    teacher = WanDiT(TINY)
    teacher.load_state_dict(read_state_dict(teacher_file))
    config = ODEPairConfig(num_frames=6, latent_size=(4, 4), num_steps=8, stored_steps=(0, 2, 4, 6))
    report = write_ode_pairs(teacher, HashedTextEncoder(**TEXT), ["a red circle", "a blue square"],
                             str(tmp_path / "ode-%06d.tar"), config)
    data = ODEPairDataModule(report.urls, val_urls=report.urls, batch_size=2, text_length=8, shuffle_buffer=0)
    module = ODEInitStudent(network=TINY, init_weights=str(teacher_file), lr=3e-3, latent_size=(4, 4),
                            export_path=str(tmp_path / "stage0" / "generator.safetensors"))
    module.configure_model()
    batch = next(iter(ODEPairStream(report.urls, batch_size=2, text_length=8, resampled=False, shuffle_buffer=0)))

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(ode_regression_loss(module.generator, batch["ode"], batch["text"], module.timesteps,
                                             torch.Generator().manual_seed(1)))

    before = fixed_loss()
    trainer = pl.Trainer(accelerator="cpu", max_steps=25, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         val_check_interval=25, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    after = fixed_loss()
    assert math.isfinite(before) and after < 0.5 * before
    assert "val/ode_loss" in trainer.logged_metrics
    exported = read_state_dict(tmp_path / "stage0" / "generator.safetensors")
    for key, value in module.generator.state_dict().items():
        torch.testing.assert_close(exported[key], value)
    spec = json.loads((tmp_path / "stage0" / "config.json").read_text())
    assert spec["wan_config"]["dim"] == TINY.dim and spec["latent_size"] == [4, 4]


def test_ode_pairs_command(teacher_file, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    parser = argparse.ArgumentParser()
    register_ode_pairs(parser.add_subparsers())
    args = parser.parse_args([
        "ode-pairs", "--teacher", str(teacher_file), "--network", "tiny", "--prompts", str(tmp_path / "prompts.txt"),
        "--out", str(tmp_path / "pairs" / "ode-%06d.tar"), "--num-frames", "3", "--latent-size", "4", "4",
        "--num-steps", "4", "--stored-steps", "0", "1", "2", "3", "--text-encoder-args", json.dumps(TEXT)])
    args.func(args)
    batches = list(ODEPairStream(str(tmp_path / "pairs" / "ode-000000.tar"), resampled=False, shuffle_buffer=0))
    assert [b["caption"][0] for b in batches] == ["a red circle", "a blue square"]
    assert batches[0]["ode"].shape == (1, 5, 4, 3, 4, 4)
    bad = parser.parse_args(["ode-pairs", "--teacher", str(tmp_path / "missing.safetensors"), "--prompts",
                             str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "x-%06d.tar")])
    with pytest.raises(FileNotFoundError, match="teacher weights"):
        bad.func(bad)


def test_ode_pairs_several_trajectories_per_prompt(teacher_file, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    parser = argparse.ArgumentParser()
    register_ode_pairs(parser.add_subparsers())

    def pairs(name: str, *extra: str) -> list[dict]:
        args = parser.parse_args([
            "ode-pairs", "--teacher", str(teacher_file), "--network", "tiny", "--prompts",
            str(tmp_path / "prompts.txt"), "--out", str(tmp_path / name / "ode-%06d.tar"), "--num-frames", "3",
            "--latent-size", "4", "4", "--num-steps", "4", "--stored-steps", "0", "1", "2", "3",
            "--text-encoder-args", json.dumps(TEXT), *extra])
        args.func(args)
        return list(ODEPairStream(str(tmp_path / name / "ode-000000.tar"), resampled=False, shuffle_buffer=0))

    one, three = pairs("one"), pairs("three", "--samples-per-prompt", "3")
    assert [b["caption"][0] for b in three] == ["a red circle"] * 3 + ["a blue square"] * 3
    starts = [b["ode"][0, 0] for b in three]  # the noise each trajectory starts from
    assert all(not torch.equal(starts[i], starts[j]) for i in range(6) for j in range(i))
    torch.testing.assert_close(three[0]["ode"], one[0]["ode"])  # trajectory 0 of prompt 0 keeps its noise seed
    with pytest.raises(ValueError, match="samples-per-prompt"):
        pairs("none", "--samples-per-prompt", "0")


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="stored_steps"):
        ODEPairConfig(num_steps=10, stored_steps=(0, 12))
    with pytest.raises(FileNotFoundError, match="ODE pair shard"):
        ODEPairStream(str(tmp_path / "none-000000.tar"))
    with pytest.raises(FileNotFoundError, match="init_weights"):
        ODEInitStudent(network=TINY, init_weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="clean_context_prob"):
        ODEInitStudent(network=TINY, clean_context_prob=1.0)
