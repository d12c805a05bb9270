"""The training rollout (§F.4) and the teacher window (§F.5)."""

import pytest
import torch

from cf.encoders import ToyAutoencoder
from cf.memory import MemoryConfig, SlowFastMemory
from cf.models.wan import CausalWanDiT, WanConfig
from cf.rollout import (
    RolloutConfig,
    rollout_block_cap,
    sample_exit_index,
    sample_num_blocks,
    teacher_window,
    train_rollout,
)


def test_linear_cap_schedule_matches_formula():
    # ⌊28 + min(1, step/600)·7⌋ from §F.4
    for step, expected in [(0, 28), (85, 28), (86, 29), (300, 31), (599, 34), (600, 35), (5000, 35)]:
        assert rollout_block_cap(step, 28, 35, 600) == expected
    assert rollout_block_cap(0, 7, 7, 0) == 7


def test_block_and_exit_draws_are_uniform_over_the_spec_ranges():
    """b ~ U{b_min … cap(step)} and r ~ U{0 … K − 1} (§F.4): every value drawn about equally often, none outside."""
    cfg = RolloutConfig(min_blocks=28, max_blocks=35, decay_steps=600)
    generator = torch.Generator().manual_seed(0)
    for step, values in [(600, range(28, 36)), (300, range(28, 32)), (0, range(28, 29))]:
        counts = torch.bincount(torch.tensor([sample_num_blocks(step, cfg, generator) for _ in range(4000)]))
        assert set(torch.nonzero(counts).flatten().tolist()) == set(values)
        expected = 4000 / len(values)
        assert all(abs(int(counts[v]) - expected) < 0.15 * expected for v in values)
    exits = torch.bincount(torch.tensor([sample_exit_index(4, generator) for _ in range(4000)]), minlength=4)
    assert len(exits) == 4 and all(abs(int(c) - 1000) < 150 for c in exits)


@pytest.mark.parametrize("window", [6, None])
def test_only_grad_window_frames_carry_gradient(window):
    torch.manual_seed(0)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3)
    text_kv = model.text_kv(torch.randn(1, 8, 32))
    cache = SlowFastMemory(MemoryConfig(), model.config.num_layers)
    cfg = RolloutConfig(min_blocks=5, max_blocks=5, grad_window_frames=window)
    frames = train_rollout(model, text_kv, 15, (4, 4), 1, cache, exit_index=1, config=cfg,
                           generator=torch.Generator().manual_seed(0))
    assert frames.shape == (1, 4, 15, 4, 4)
    grads = []
    for f in range(15):
        model.zero_grad()
        frames[:, :, f].sum().backward(retain_graph=True)
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()):
            grads.append(f)
    expected = list(range(9, 15)) if window == 6 else list(range(15))
    assert grads == expected
    assert all(not s.keys.requires_grad for s in cache.layers)


def test_exit_index_and_full_denoising_count_calls():
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3)
    text_kv = model.text_kv(torch.randn(1, 8, 32))
    calls = []
    original = model.forward_chunk

    def counting(x, t, ctx, cache, start, commit=False):
        calls.append((start, float(t[0]), commit))
        return original(x, t, ctx, cache, start, commit)

    model.forward_chunk = counting
    cache = SlowFastMemory(MemoryConfig(), model.config.num_layers)
    train_rollout(model, text_kv, 27, (4, 4), 1, cache, exit_index=1, config=RolloutConfig(9, 9),
                  generator=torch.Generator().manual_seed(0))
    per_chunk = {}
    for start, t, commit in calls:
        per_chunk.setdefault(start, []).append((round(t, 2), commit))
    # g0 = 27 − 18 = 9: chunks 0, 3, 6, 9 fully denoised (4 steps), later chunks exit at step 1; each then commits
    for start, seq in per_chunk.items():
        steps = 4 if start <= 9 else 2
        assert seq == [(t, False) for t in [1000.0, 937.5, 833.33, 625.0][:steps]] + [(0.0, True)]


def test_teacher_window_reencodes_the_last_prefix_frame():
    frames = torch.randn(1, 4, 45, 8, 8)
    context, target = teacher_window(frames, 21, 21, autoencoder=None)
    assert context.shape[2] == 21 and target.shape[2] == 21
    assert torch.equal(context[:, :, 0], frames[:, :, 3])  # prefix = frames[:45-41]: its last latent is frame 3
    assert torch.equal(target, frames[:, :, 24:])
    ae = ToyAutoencoder()
    z = ae.encode(ae.decode(0.05 * frames))  # exact toy round trip: re-encoding the last pixel frame gives the latent
    context2, _ = teacher_window(z, 21, 21, autoencoder=ae)
    torch.testing.assert_close(context2[:, :, 0], z[:, :, 3], rtol=1e-4, atol=1e-4)
    none, short = teacher_window(frames[:, :, :21], 0, 21)
    assert none is None and torch.equal(short, frames[:, :, :21])
    with pytest.raises(ValueError, match="shorter than the teacher window"):
        teacher_window(frames[:, :, :30], 21, 21)
