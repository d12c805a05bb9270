"""Closed-form check that the DMD update moves a generator to the target distribution (no video code involved).

Target: a 2-D Gaussian with diagonal covariance. Generator: ``x = μ_g + σ_g·z``. Under the flow noising
``x_σ = (1 − σ)x0 + σε`` the x0-predictor of a Gaussian N(μ, v) is the posterior mean
``E[x0 | x_σ] = μ + k(x_σ − (1 − σ)μ)`` with ``k = (1 − σ)v / ((1 − σ)²v + σ²)``.
"""

import torch

from cf.diffusion import add_noise, sample_dmd_timesteps
from cf.losses import critic_flow_loss, dmd_generator_loss

DTYPE = torch.float64
TARGET_MEAN = torch.tensor([1.5, -0.5], dtype=DTYPE)
TARGET_STD = torch.tensor([0.5, 1.2], dtype=DTYPE)
NUM_PARTICLES = 256


def gaussian_x0_predictor(x_t, sigma, mean, var):
    """Posterior mean E[x0 | x_t] for x0 ~ N(mean, diag(var))."""
    alpha = 1 - sigma
    gain = alpha * var / (alpha**2 * var + sigma**2)
    return mean + gain * (x_t - alpha * mean)


def kl_to_target(mean, std):
    """KL(N(mean, std²) || target), summed over the independent dimensions."""
    std = std.abs()
    return (
        torch.log(TARGET_STD / std) + (std**2 + (mean - TARGET_MEAN) ** 2) / (2 * TARGET_STD**2) - 0.5
    ).sum().item()


def noised_batch(sample, generator):
    """One DMD timestep for the whole particle set (one 'video'), fresh noise; returns x_t and σ."""
    t = sample_dmd_timesteps(1, generator=generator).to(DTYPE)
    noise = torch.randn(sample.shape, generator=generator, dtype=DTYPE)
    sigma = t / 1000
    return add_noise(sample.detach(), noise, sigma), sigma.view(1, 1, 1), noise, t


def generator_step(mean, std, optimizer, fake_mean, fake_var, generator, swap_scores=False):
    z = torch.randn(1, NUM_PARTICLES, 2, generator=generator, dtype=DTYPE)
    x = mean + std * z  # one batch element holding all particles: one normaliser, as for one video
    x_t, sigma, _, _ = noised_batch(x, generator)
    real = gaussian_x0_predictor(x_t, sigma, TARGET_MEAN, TARGET_STD**2)
    fake = gaussian_x0_predictor(x_t, sigma, fake_mean, fake_var)
    if swap_scores:
        real, fake = fake, real
    loss, _ = dmd_generator_loss(x, real, fake)
    optimizer.zero_grad()
    # dL/dx_i = Δ_i / numel; rescale so the step per particle does not depend on the particle count
    (loss * x.numel() / NUM_PARTICLES).backward()
    optimizer.step()


def test_dmd_with_exact_fake_score_converges_to_target():
    generator = torch.Generator().manual_seed(0)
    mean = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    std = torch.ones(2, dtype=DTYPE, requires_grad=True)
    optimizer = torch.optim.SGD([mean, std], lr=0.1)
    initial_kl = kl_to_target(mean.detach(), std.detach())
    kl_midway = None
    for step in range(300):
        generator_step(mean, std, optimizer, mean.detach(), std.detach() ** 2, generator)
        if step == 99:
            kl_midway = kl_to_target(mean.detach(), std.detach())
    final_kl = kl_to_target(mean.detach(), std.detach())
    assert kl_midway < 0.1 * initial_kl
    assert final_kl < kl_midway and final_kl < 1e-3 * initial_kl
    torch.testing.assert_close(mean.detach(), TARGET_MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(std.detach().abs(), TARGET_STD, atol=0.02, rtol=0)


def test_dmd_with_swapped_scores_moves_away_from_target():
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, 0.0], dtype=DTYPE, requires_grad=True)
    std = torch.tensor([0.7, 1.0], dtype=DTYPE, requires_grad=True)
    optimizer = torch.optim.SGD([mean, std], lr=0.1)
    initial_kl = kl_to_target(mean.detach(), std.detach())
    for _ in range(30):
        generator_step(mean, std, optimizer, mean.detach(), std.detach() ** 2, generator, swap_scores=True)
    assert kl_to_target(mean.detach(), std.detach()) > 2 * initial_kl


def test_dmd_with_a_critic_trained_by_critic_flow_loss():
    """The full alternation of §F.3: a Gaussian-family critic fitted to generator samples, then a DMD step."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    std = torch.ones(2, dtype=DTYPE, requires_grad=True)
    critic_mean = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    critic_log_var = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    generator_optimizer = torch.optim.SGD([mean, std], lr=0.05)
    critic_optimizer = torch.optim.Adam([critic_mean, critic_log_var], lr=0.05)
    initial_kl = kl_to_target(mean.detach(), std.detach())
    for _ in range(400):
        for _ in range(5):
            with torch.no_grad():
                y = mean + std * torch.randn(1, NUM_PARTICLES, 2, generator=generator, dtype=DTYPE)
            y_t, sigma, noise, t = noised_batch(y, generator)
            x0_hat = gaussian_x0_predictor(y_t, sigma, critic_mean, critic_log_var.exp())
            flow_pred = (y_t - x0_hat) / sigma
            loss = critic_flow_loss(flow_pred, noise, y, t=t, weighting=True)
            critic_optimizer.zero_grad()
            loss.backward()
            critic_optimizer.step()
        generator_step(
            mean, std, generator_optimizer, critic_mean.detach(), critic_log_var.detach().exp(), generator
        )
    final_kl = kl_to_target(mean.detach(), std.detach())
    assert final_kl < 0.01 * initial_kl
    torch.testing.assert_close(mean.detach(), TARGET_MEAN, atol=0.1, rtol=0)
    torch.testing.assert_close(std.detach().abs(), TARGET_STD, atol=0.1, rtol=0)
    # the critic has learnt the generator's distribution, which is now the target's
    torch.testing.assert_close(critic_log_var.detach().exp().sqrt(), TARGET_STD, atol=0.15, rtol=0)
