"""CDMD generator loss, critic loss, teacher loss and CFG (method §F.6–F.7, §E.3 step 6, §I.12, §I.28)."""

import pytest
import torch
import torch.nn.functional as F

from cf.diffusion import training_weight
from cf.losses import classifier_free_guidance, critic_flow_loss, dmd_generator_loss, flow_matching_loss


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive_normalised_delta(x, real, fake):
    """Per-sample loop: (fake − real) / mean|x − real| over that sample's elements."""
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        scale = (x[b].double() - real[b].double()).abs().mean()
        out[b] = (fake[b].double() - real[b].double()) / scale
    return out


# ----------------------------------------------------------------------------------------------------------------------
# CFG
# ----------------------------------------------------------------------------------------------------------------------


def test_cfg_formula_and_effective_scale():
    cond, uncond = randn(2, 4, 3, 2, 2, seed=1), randn(2, 4, 3, 2, 2, seed=2)
    guided = classifier_free_guidance(cond, uncond, 5.0)
    torch.testing.assert_close(guided, cond + 5.0 * (cond - uncond))
    torch.testing.assert_close(guided, uncond + 6.0 * (cond - uncond))  # effective scale 1 + g
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), cond)
    with pytest.raises(ValueError, match="same shape"):
        classifier_free_guidance(cond, uncond[:, :, :2], 3.0)


# ----------------------------------------------------------------------------------------------------------------------
# DMD generator loss
# ----------------------------------------------------------------------------------------------------------------------


def test_dmd_gradient_equals_normalised_delta_over_numel():
    x = randn(2, 4, 6, 3, 3, seed=0).requires_grad_()
    real, fake = randn(2, 4, 6, 3, 3, seed=1), randn(2, 4, 6, 3, 3, seed=2)
    loss, stats = dmd_generator_loss(x, real, fake)
    loss.backward()
    delta = naive_normalised_delta(x.detach(), real, fake)
    torch.testing.assert_close(x.grad.double(), delta / x.numel(), rtol=1e-5, atol=1e-12)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5 * (delta**2).mean().item(), rel=1e-6)
    assert stats["dmd_gradient_abs_mean"].item() == pytest.approx(delta.abs().mean().item(), rel=1e-5)
    assert all(not value.requires_grad for value in stats.values())


def test_dmd_normaliser_is_per_sample():
    base_x, base_real, base_fake = (randn(1, 4, 3, 2, 2, seed=s) for s in (3, 4, 5))
    # sample 1 is sample 0 at 10x the scale: its normalised update must be the same
    x = torch.cat([base_x, 10 * base_x]).requires_grad_()
    real = torch.cat([base_real, 10 * base_real])
    fake = torch.cat([base_fake, 10 * base_fake])
    loss, _ = dmd_generator_loss(x, real, fake)
    loss.backward()
    torch.testing.assert_close(x.grad[0], x.grad[1], rtol=1e-5, atol=1e-10)
    # a single normaliser over the whole batch would make sample 1's step 10x sample 0's
    global_scale = (x.detach() - real).abs().mean()
    global_grad = (fake - real) / global_scale / x.numel()
    assert not torch.allclose(x.grad, global_grad, rtol=1e-3)


def test_dmd_no_gradient_to_scores_or_no_grad_frames():
    generator_out = randn(1, 4, 3, 2, 2, seed=6).requires_grad_()
    context_frames = randn(1, 4, 2, 2, 2, seed=7)  # stands for the no-grad frames of the target window
    x = torch.cat([context_frames, generator_out * 1.0], dim=2)
    real_net_out = randn(1, 4, 5, 2, 2, seed=8).requires_grad_()
    fake_net_out = randn(1, 4, 5, 2, 2, seed=9).requires_grad_()
    loss, _ = dmd_generator_loss(x, real_net_out * 2.0, fake_net_out * 2.0)
    loss.backward()
    assert real_net_out.grad is None and fake_net_out.grad is None
    # the mean runs over all 5 frames (§I.28), gradient lands only on the 3 frames that carry it
    delta = naive_normalised_delta(x.detach(), real_net_out.detach() * 2.0, fake_net_out.detach() * 2.0)
    torch.testing.assert_close(generator_out.grad.double(), delta[:, :, 2:] / x.numel(), rtol=1e-5, atol=1e-12)


def test_dmd_keeps_dtype_and_handles_zero_normaliser():
    x = randn(2, 2, 2, 2, 2, seed=10).to(torch.bfloat16).requires_grad_()
    loss, _ = dmd_generator_loss(x, x.detach().clone(), x.detach().clone())  # 0/0 -> 0
    assert loss.dtype == torch.bfloat16 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_dmd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        dmd_generator_loss(torch.zeros(1, 2, 3, 1, 1), torch.zeros(1, 2, 3, 1, 1), torch.zeros(1, 2, 2, 1, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Critic loss
# ----------------------------------------------------------------------------------------------------------------------


def critic_inputs(frames=6, batch=2, seed=20):
    flow = randn(batch, 4, frames, 2, 2, seed=seed).requires_grad_()
    noise, clean = randn(batch, 4, frames, 2, 2, seed=seed + 1), randn(batch, 4, frames, 2, 2, seed=seed + 2)
    return flow, noise, clean


def test_critic_target_is_noise_minus_clean_on_target_frames():
    flow, noise, clean = critic_inputs()
    target = slice(3, None)
    loss = critic_flow_loss(flow, noise, clean, target_frames=target)
    expected = F.mse_loss(flow[:, :, 3:], noise[:, :, 3:] - clean[:, :, 3:])
    torch.testing.assert_close(loss, expected)
    full = critic_flow_loss(flow, noise, clean)
    torch.testing.assert_close(full, F.mse_loss(flow, noise - clean))


def test_critic_context_frames_have_no_influence():
    flow, noise, clean = critic_inputs()
    target = slice(3, None)
    loss = critic_flow_loss(flow, noise, clean, target_frames=target)
    loss.backward()
    assert torch.equal(flow.grad[:, :, :3], torch.zeros_like(flow.grad[:, :, :3]))
    assert flow.grad[:, :, 3:].abs().sum() > 0
    changed = [t.detach().clone() for t in (flow, noise, clean)]
    for t in changed:
        t[:, :, :3] = torch.randn_like(t[:, :, :3]) * 100
    torch.testing.assert_close(critic_flow_loss(*changed, target_frames=target), loss.detach())


def test_critic_time_weighting_per_sample():
    flow, noise, clean = critic_inputs()
    t = torch.tensor([500.0, 20.0])
    weighted = critic_flow_loss(flow, noise, clean, t=t, weighting=True, target_frames=slice(3, None))
    per_sample = [F.mse_loss(flow[b, :, 3:], noise[b, :, 3:] - clean[b, :, 3:]) for b in range(2)]
    w = [training_weight(500.0).item(), training_weight(20.0).item()]
    expected = (w[0] * per_sample[0] + w[1] * per_sample[1]) / 2
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    unweighted = critic_flow_loss(flow, noise, clean, t=t, weighting=False, target_frames=slice(3, None))
    assert unweighted.item() == pytest.approx(((per_sample[0] + per_sample[1]) / 2).item(), rel=1e-5)
    assert weighted.item() != pytest.approx(unweighted.item(), rel=1e-3)


def test_critic_errors():
    flow, noise, clean = critic_inputs()
    with pytest.raises(ValueError, match="weighting=True needs"):
        critic_flow_loss(flow, noise, clean, weighting=True)
    with pytest.raises(TypeError, match="slice"):
        critic_flow_loss(flow, noise, clean, target_frames=[3, 4])
    with pytest.raises(ValueError, match="selects no frames"):
        critic_flow_loss(flow, noise, clean, target_frames=slice(10, None))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        critic_flow_loss(flow, noise, clean, t=torch.tensor([1.0, 2.0, 3.0]), weighting=True)


# ----------------------------------------------------------------------------------------------------------------------
# Teacher flow-matching loss
# ----------------------------------------------------------------------------------------------------------------------


def test_flow_matching_loss_is_weighted_mse_on_selected_frames():
    flow, noise, x0 = critic_inputs(frames=5, seed=30)
    t = torch.tensor([937.5, 250.0])
    loss = flow_matching_loss(flow, noise, x0, t, frames=slice(2, None))
    expected = sum(
        training_weight(t[b]).item() * F.mse_loss(flow[b, :, 2:], noise[b, :, 2:] - x0[b, :, 2:]) for b in range(2)
    ) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = flow_matching_loss(flow, noise, x0, t, weighting=False)
    torch.testing.assert_close(plain, F.mse_loss(flow, noise - x0))
    # the loss is minimised (zero) by the exact velocity
    exact = flow_matching_loss(noise - x0, noise, x0, t, frames=slice(2, None))
    assert exact.item() == 0.0
