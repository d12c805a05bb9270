"""Flow-matching schedule and conversions (method §B.2–B.3, §E.3 step 1, §F.6 step 1)."""

import math

import pytest
import torch

from cf.diffusion import (
    FlowMatchSchedule,
    add_noise,
    broadcast_sigma,
    flow_target,
    flow_to_noise,
    flow_to_x0,
    nearest_grid_index,
    sample_dmd_timesteps,
    sample_grid_timesteps,
    shift_sigma,
    timestep_grid,
    training_weight,
    warp_timesteps,
    x0_to_flow,
)


def naive_shifted_t(i: int, shift: float = 5.0, n: int = 1000) -> float:
    """t_i of the §B.2 grid, written out with plain floats."""
    sigma = 1.0 - i / n
    return n * shift * sigma / (1.0 + (shift - 1.0) * sigma)


# ----------------------------------------------------------------------------------------------------------------------
# shift, grid, warp, lookup
# ----------------------------------------------------------------------------------------------------------------------


def test_shift_formula_on_floats_and_tensors():
    assert shift_sigma(0.5, 5.0) == pytest.approx(2.5 / 3.0)
    assert shift_sigma(0.75, 5.0) == pytest.approx(0.9375)
    sigmas = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = shift_sigma(sigmas, 3.0)
    expected = torch.tensor([3 * s / (1 + 2 * s) for s in sigmas.tolist()], dtype=torch.float64)
    torch.testing.assert_close(shifted, expected)
    assert shifted[0] == 0 and shifted[-1] == 1
    torch.testing.assert_close(shift_sigma(sigmas, 1.0), sigmas)
    assert (shifted >= sigmas).all()  # shift > 1 pushes towards high noise


def test_shift_rejects_non_positive():
    with pytest.raises(ValueError, match="shift"):
        shift_sigma(0.5, 0.0)


def test_grid_matches_naive_and_endpoints():
    grid = timestep_grid(shift=5.0)
    assert grid.dtype == torch.float64 and grid.shape == (1000,)
    assert grid[0].item() == pytest.approx(1000.0)
    assert grid[-1].item() == pytest.approx(1000 * 0.005 / 1.004)
    assert grid[-1].item() == pytest.approx(4.98, abs=0.005)
    assert (grid[1:] < grid[:-1]).all()
    for i in (0, 1, 250, 500, 999):
        assert grid[i].item() == pytest.approx(naive_shifted_t(i))
    grid8 = timestep_grid(shift=8.0)
    assert grid8[500].item() == pytest.approx(naive_shifted_t(500, shift=8.0))


def test_grid_returns_a_copy():
    grid = timestep_grid()
    grid.zero_()
    assert timestep_grid()[0].item() == pytest.approx(1000.0)


def test_warp_default_list():
    warped = warp_timesteps((1000, 750, 500, 250), shift=5.0)
    torch.testing.assert_close(
        warped, torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0], dtype=torch.float64), rtol=0, atol=1e-9
    )
    assert warp_timesteps([0]).item() == 0.0
    assert warp_timesteps([1000, 750], shift=1.0).tolist() == pytest.approx([1000.0, 750.0])


@pytest.mark.parametrize("bad", [[1001], [-1], [500.5]])
def test_warp_rejects_out_of_range_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        warp_timesteps(bad)


def test_nearest_grid_index_against_brute_force():
    grid = timestep_grid()
    generator = torch.Generator().manual_seed(1)
    queries = torch.rand(50, generator=generator, dtype=torch.float64) * 1000
    index = nearest_grid_index(queries, grid)
    assert index.shape == queries.shape and index.dtype == torch.long
    for q, i in zip(queries.tolist(), index.tolist()):
        best = min(range(1000), key=lambda j: abs(grid[j].item() - q))
        assert abs(grid[i].item() - q) == pytest.approx(abs(grid[best].item() - q))
    assert nearest_grid_index(grid[123].item(), grid).item() == 123
    assert nearest_grid_index(torch.tensor([[1000.0, 0.0]]), grid).tolist() == [[0, 999]]


# ----------------------------------------------------------------------------------------------------------------------
# loss weight
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, w",
    [(20, 0.13), (100, 0.64), (250, 1.46), (500, 2.08), (625, 1.91), (833, 1.03), (937.5, 0.40), (980, 0.13)],
)
def test_training_weight_listed_values(t, w):
    assert training_weight(t, shift=5.0).item() == pytest.approx(w, abs=0.01)


def test_training_weight_against_naive_definition():
    grid = [naive_shifted_t(i) for i in range(1000)]
    bump = [math.exp(-2 * ((g - 500) / 1000) ** 2) for g in grid]
    low = min(bump)
    total = sum(b - low for b in bump)
    naive = [(b - low) * 1000 / total for b in bump]
    t = torch.tensor([[3.0, 333.3], [777.7, 999.0]])
    weights = training_weight(t)
    assert weights.shape == t.shape and weights.dtype == torch.float32
    for q, w in zip(t.flatten().tolist(), weights.flatten().tolist()):
        j = min(range(1000), key=lambda k: abs(grid[k] - q))
        assert w == pytest.approx(naive[j], rel=1e-5)
    assert training_weight(torch.tensor(grid)).double().sum().item() == pytest.approx(1000.0, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# timestep sampling
# ----------------------------------------------------------------------------------------------------------------------


def test_dmd_timesteps_clamp_and_quantiles():
    t = sample_dmd_timesteps(200_000, shift=5.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min().item() == 20.0 and t.max().item() == 980.0
    q05, q50, q95 = torch.quantile(t.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    assert q05 == pytest.approx(208, abs=6)
    assert q50 == pytest.approx(833, abs=5)
    assert q95 == 980.0
    # t_raw >= 908 maps above 980 (9.2 %), t_raw <= 4 below 20 (0.5 %)
    assert (t == 980.0).double().mean().item() == pytest.approx(0.092, abs=0.004)
    assert (t == 20.0).double().mean().item() == pytest.approx(0.005, abs=0.001)
    inside = t[(t > 20) & (t < 980)].double()
    raw = 1000 * inside / (5000 - 4 * inside)  # inverse shift: u = t' / (s − (s − 1) t')
    torch.testing.assert_close(raw, raw.round(), atol=1e-3, rtol=0)


def test_dmd_timesteps_seeded_and_validated():
    a = sample_dmd_timesteps(8, generator=torch.Generator().manual_seed(3))
    b = sample_dmd_timesteps(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="min_t"):
        sample_dmd_timesteps(2, min_t=990, max_t=980)
    with pytest.raises(ValueError, match="batch_size"):
        sample_dmd_timesteps(0)


def test_grid_timesteps_are_uniform_over_grid():
    grid = timestep_grid()
    t = sample_grid_timesteps(50_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (50_000,)
    index = nearest_grid_index(t.double(), grid)
    torch.testing.assert_close(t.double(), grid[index], atol=1e-4, rtol=0)
    assert index.double().mean().item() == pytest.approx(499.5, abs=5)
    counts = torch.bincount(index // 100, minlength=10).double()
    assert (counts / counts.sum() - 0.1).abs().max().item() < 0.01


# ----------------------------------------------------------------------------------------------------------------------
# noising and conversions
# ----------------------------------------------------------------------------------------------------------------------


def test_broadcast_sigma_shapes_and_errors():
    x = torch.zeros(2, 4, 3, 5, 6)
    assert broadcast_sigma(0.3, x).shape == ()
    assert broadcast_sigma(torch.tensor([0.1, 0.2]), x).shape == (2, 1, 1, 1, 1)
    per_frame = broadcast_sigma(torch.rand(2, 3), x)
    assert per_frame.shape == (2, 1, 3, 1, 1)
    with pytest.raises(ValueError, match="per-sample"):
        broadcast_sigma(torch.rand(3), x)
    with pytest.raises(ValueError, match="per-frame"):
        broadcast_sigma(torch.rand(2, 4), x)
    with pytest.raises(ValueError, match="scalar"):
        broadcast_sigma(torch.rand(2, 3, 1), x)


def test_add_noise_per_frame_matches_loop():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=generator), torch.randn(2, 4, 3, 2, 2, generator=generator)
    sigma = torch.rand(2, 3, generator=generator)
    noisy = add_noise(x0, noise, sigma)
    for b in range(2):
        for f in range(3):
            s = sigma[b, f]
            torch.testing.assert_close(noisy[b, :, f], (1 - s) * x0[b, :, f] + s * noise[b, :, f])
    torch.testing.assert_close(add_noise(x0, noise, 0.0), x0)
    torch.testing.assert_close(add_noise(x0, noise, 1.0), noise)


@pytest.mark.parametrize("sigma", [0.37, torch.tensor([0.9, 0.2]), torch.tensor([[0.1, 0.5, 0.99], [0.3, 0.6, 0.8]])])
def test_conversions_round_trip(sigma):
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=generator), torch.randn(2, 4, 3, 2, 2, generator=generator)
    x_t = add_noise(x0, noise, sigma)
    flow = flow_target(x0, noise)
    torch.testing.assert_close(flow, noise - x0)
    torch.testing.assert_close(flow_to_x0(x_t, flow, sigma), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow_to_noise(x_t, flow, sigma), noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_to_flow(x_t, x0, sigma), flow, atol=1e-4, rtol=1e-4)


def test_conversions_keep_low_precision_dtype():
    x0 = torch.randn(1, 2, 2, 2, 2).to(torch.bfloat16)
    noise = torch.randn(1, 2, 2, 2, 2).to(torch.bfloat16)
    x_t = add_noise(x0, noise, torch.tensor([0.25]))
    assert x_t.dtype == torch.bfloat16
    assert flow_to_x0(x_t, noise - x0, torch.tensor([0.25])).dtype == torch.bfloat16


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="shapes must match"):
        add_noise(torch.zeros(1, 2, 3, 1, 1), torch.zeros(1, 2, 4, 1, 1), 0.5)


def test_schedule_bundle_agrees_with_functions():
    schedule = FlowMatchSchedule(shift=5.0)
    torch.testing.assert_close(schedule.timesteps, timestep_grid(5.0))
    torch.testing.assert_close(schedule.warp(), warp_timesteps())
    assert schedule.weight(500.0).item() == pytest.approx(training_weight(500.0).item())
    assert schedule.sigma(625.0) == pytest.approx(0.625)
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(schedule.sample_dmd(4, generator=generator),
                       sample_dmd_timesteps(4, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        FlowMatchSchedule(num_train_timesteps=1)
