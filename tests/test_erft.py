"""ERFT: error banks, injection, harvest and teacher layouts (method §E, §J.3, §J.4 item 10)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from cf.erft import ErrorInjector, InjectionFlags, fit_error_frames
from cf.error_bank import ErrorBank, ErrorBanks, bucket_timesteps, harvest_errors
from cf.teacher_layout import (
    LongLayoutConfig,
    dense_layout,
    long_layout,
    long_layout_from_latents,
    long_layout_plan,
)

ENTRY_SHAPE = (2, 3, 2, 2)  # [C, T, h, w]
TOY_GRID = [1000.0, 1000 * 4 / 4.2, 1000 * 3 / 3.4, 1000 * 2 / 2.6, 1000 * 1 / 1.8]  # 5 buckets, shift 5, closed form


def const(value: float, shape: tuple[int, ...] = ENTRY_SHAPE) -> torch.Tensor:
    return torch.full(shape, float(value))


def bank_values(bank: ErrorBank, bucket: int) -> list[float]:
    return [float(e.flatten()[0]) for e in bank.bucket_entries(bucket)]


def toy_bank(**kwargs) -> ErrorBank:
    settings = dict(num_buckets=5, capacity=3, warmup_steps=0)
    settings.update(kwargs)
    return ErrorBank(**settings)


# ----------------------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------------------


def naive_bucket(t: float, n: int = 50, shift: float = 5.0) -> int:
    grid = []
    for i in range(n):
        sigma = 1 - i / n
        grid.append(1000 * shift * sigma / (1 + (shift - 1) * sigma))
    return min(range(n), key=lambda i: abs(grid[i] - t))


def test_bucket_timesteps_closed_form():
    torch.testing.assert_close(bucket_timesteps(5, 5.0), torch.tensor(TOY_GRID, dtype=torch.float64))
    grid = bucket_timesteps(50, 5.0)
    assert grid.shape == (50,) and grid[0] == 1000 and bool((grid[1:] < grid[:-1]).all())
    assert abs(float(grid[-1]) - 1000 * 5 * 0.02 / (1 + 4 * 0.02)) < 1e-9


def test_bucket_assignment_matches_naive_nearest():
    bank = ErrorBank()
    t = torch.cat([torch.rand(500, generator=torch.Generator().manual_seed(0)) * 1000, bucket_timesteps(50, 5.0)])
    got = bank.bucket_index(t).tolist()
    assert got == [naive_bucket(float(x)) for x in t]
    assert got[-50:] == list(range(50))


# ----------------------------------------------------------------------------------------------------------------------
# Replacement policies, sampling, caps
# ----------------------------------------------------------------------------------------------------------------------


def test_l2_batch_replaces_nearest_entry():
    bank = toy_bank(policy="l2_batch")
    for value in (0, 10, 20):
        bank.store(const(value)[None], torch.tensor([900.0]))
    bank.store(const(11)[None], torch.tensor([900.0]))
    bucket = naive_bucket(900, 5)
    assert sorted(bank_values(bank, bucket)) == [0, 11, 20]
    bank.store(const(-4)[None], torch.tensor([900.0]))
    assert sorted(bank_values(bank, bucket)) == [-4, 11, 20]
    assert bank.bucket_counts()[bucket] == 3 and len(bank) == 3


def test_fifo_replaces_oldest_entry():
    bank = toy_bank(policy="fifo")
    bucket = naive_bucket(900, 5)
    for value in (0, 1, 2, 3):
        bank.store(const(value)[None], torch.tensor([900.0]))
    assert sorted(bank_values(bank, bucket)) == [1, 2, 3]
    bank.store(const(4)[None], torch.tensor([900.0]))
    assert sorted(bank_values(bank, bucket)) == [2, 3, 4]


def test_random_replacement_follows_seeded_generator():
    for seed in range(4):
        bank = toy_bank(policy="random", seed=seed)
        for value in (0, 1, 2, 3):
            bank.store(const(value)[None], torch.tensor([900.0]))
        victim = int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(seed)))
        expected = [v for v in (0, 1, 2) if v != victim] + [3]
        assert bank_values(bank, naive_bucket(900, 5)) == expected


def test_sample_from_bucket_and_union():
    bank = toy_bank(capacity=10)
    assert bank.sample(900.0) is None and bank.sample_any() is None
    bank.store(const(1)[None], torch.tensor([999.0]))
    bank.store(torch.stack([const(v) for v in (5, 6, 7)]), torch.tensor([560.0, 560.0, 560.0]))
    g = torch.Generator().manual_seed(0)
    assert bank.sample(900.0, g) is None  # the bucket of 882 is empty
    from_bucket = {float(bank.sample(560.0, g)[0, 0, 0, 0]) for _ in range(50)}
    assert from_bucket == {5.0, 6.0, 7.0}
    draws = [float(bank.sample_any(g)[0, 0, 0, 0]) for _ in range(4000)]
    assert abs(draws.count(1.0) / len(draws) - 0.25) < 0.03
    sample = bank.sample(999.0, g)
    assert sample.dtype == torch.float32 and sample.shape == ENTRY_SHAPE


def test_entry_cap_evicts_from_fullest_bucket():
    bank = toy_bank(capacity=10, policy="fifo", max_total_entries=5)
    for value in (0, 1, 2):
        bank.store(const(value)[None], torch.tensor([1000.0]))
    for value in (10, 11):
        bank.store(const(value)[None], torch.tensor([560.0]))
    assert len(bank) == 5
    bank.store(const(12)[None], torch.tensor([560.0]))
    assert len(bank) == 5
    assert bank_values(bank, 0) == [1, 2] and bank_values(bank, 4) == [10, 11, 12]

    stress = toy_bank(capacity=4, policy="l2_batch", max_total_entries=7)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        stress.store(torch.randn(1, *ENTRY_SHAPE, generator=g), torch.rand(1, generator=g) * 1000)
        assert len(stress) <= 7 and max(stress.bucket_counts()) <= 4


def test_byte_cap_and_fp16_storage():
    entry_bytes = 2 * torch.Size(ENTRY_SHAPE).numel()
    bank = toy_bank(capacity=10, policy="random", max_total_bytes=4 * entry_bytes + 10)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        errors = torch.randn(2, *ENTRY_SHAPE, generator=g, dtype=torch.float64)
        bank.store(errors, torch.rand(2, generator=g) * 1000)
        assert len(bank) <= 4 and bank.nbytes == len(bank) * entry_bytes <= 4 * entry_bytes + 10
    for bucket in range(5):
        for entry in bank.bucket_entries(bucket):
            assert entry.dtype == torch.float16 and entry.device.type == "cpu"
    values = torch.randn(1, *ENTRY_SHAPE, generator=g)
    exact = toy_bank()
    exact.store(values, torch.tensor([1000.0]))
    assert torch.equal(exact.bucket_entries(0)[0], values[0].half())
    with pytest.raises(ValueError, match="max_total_bytes"):
        toy_bank(max_total_bytes=entry_bytes - 1).store(values, torch.tensor([1000.0]))


# ----------------------------------------------------------------------------------------------------------------------
# Warm-up gather
# ----------------------------------------------------------------------------------------------------------------------


class TwoRankGather:
    """Simulates all_gather over 2 ranks: the remote rank's errors are the local ones + 100."""

    def __init__(self, remote_clean: bool | None = None) -> None:
        self.calls = 0
        self.remote_clean = remote_clean

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.dim() == 5:
            return torch.cat([x, x + 100])
        remote = x.clone()
        if self.remote_clean is not None:
            remote[:, 1] = float(self.remote_clean)
        return torch.cat([x, remote])


def all_values(bank: ErrorBank) -> list[float]:
    return sorted(v for b in range(bank.num_buckets) for v in bank_values(bank, b))


def test_warmup_gathers_all_ranks_then_only_local():
    gather = TwoRankGather()
    bank = toy_bank(capacity=10, warmup_steps=2, gather=gather)
    t = torch.tensor([900.0])
    assert bank.insert(const(1)[None], t, clean_step=False) == 2
    assert bank.insert(const(2)[None], t, clean_step=False) == 2
    assert all_values(bank) == [1, 2, 101, 102] and gather.calls == 4
    assert not bank.in_warmup
    assert bank.insert(const(3)[None], t, clean_step=False) == 1
    assert all_values(bank) == [1, 2, 3, 101, 102] and gather.calls == 4


@pytest.mark.parametrize("prob, expected_warm", [(0.0, []), (1.0, [1, 101])])
def test_clean_step_insert_probability(prob, expected_warm):
    bank = toy_bank(capacity=10, warmup_steps=1, gather=TwoRankGather(), clean_insert_prob=prob)
    t = torch.tensor([900.0])
    bank.insert(const(1)[None], t, clean_step=True)
    assert all_values(bank) == expected_warm
    bank.insert(const(2)[None], t, clean_step=True)  # after warm-up: local, every step, also clean ones
    assert all_values(bank) == sorted(expected_warm + [2])


def test_clean_flag_is_per_source_rank():
    bank = toy_bank(capacity=10, warmup_steps=1, gather=TwoRankGather(remote_clean=False), clean_insert_prob=0.0)
    bank.insert(const(1)[None], torch.tensor([900.0]), clean_step=True)
    assert all_values(bank) == [101]


# ----------------------------------------------------------------------------------------------------------------------
# Harvest
# ----------------------------------------------------------------------------------------------------------------------


def test_harvest_error_formulas_are_endpoint_residuals():
    g = torch.Generator().manual_seed(3)
    shape = (2, *ENTRY_SHAPE)
    x0, eps, delta = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.3, 0.85], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    v_star = eps - x0
    v_hat = v_star + delta
    noise_error, latent_error = harvest_errors(v_hat, v_star, sigma)
    torch.testing.assert_close(noise_error, (x_t + (1 - s) * v_hat) - (x_t + (1 - s) * v_star))
    torch.testing.assert_close(latent_error, (x_t - s * v_hat) - (x_t - s * v_star))
    torch.testing.assert_close(noise_error, (1 - s) * delta)
    torch.testing.assert_close(latent_error, -s * delta)

    banks = ErrorBanks(num_buckets=5, capacity=3, warmup_steps=0)
    t = sigma * 1000
    assert banks.harvest(v_hat, v_star, t, clean_step=False) == (2, 2)
    for row in range(2):
        bucket = naive_bucket(float(t[row]), 5)
        assert torch.equal(banks.noise.bucket_entries(bucket)[0], ((1 - s) * delta)[row].half())
        assert torch.equal(banks.latent.bucket_entries(bucket)[0], (-s * delta)[row].half())


# ----------------------------------------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------------------------------------


def test_draw_flags_forced_branches_and_clean_switch():
    names = ("noise", "context", "latent")
    for on in names:
        probs = {f"{n}_prob": float(n == on) for n in names}
        flags = ErrorInjector(**probs, clean_prob=0.0).draw_flags(torch.Generator().manual_seed(0))
        assert (flags.noise, flags.context, flags.latent, flags.clean_step) == tuple(n == on for n in names) + (False,)
    flags = ErrorInjector(noise_prob=1, context_prob=1, latent_prob=1, clean_prob=1).draw_flags()
    assert (flags.noise, flags.context, flags.latent, flags.clean_step) == (False, False, False, True)


def test_draw_flags_frequencies():
    injector = ErrorInjector(noise_prob=0.2, context_prob=0.9, latent_prob=0.6, clean_prob=0.5)
    g = torch.Generator().manual_seed(4)
    draws = [injector.draw_flags(g) for _ in range(10000)]
    freq = {name: sum(getattr(d, name) for d in draws) / len(draws) for name in ("noise", "context", "latent",
                                                                                 "clean_step")}
    expected = {"noise": 0.1, "context": 0.45, "latent": 0.3, "clean_step": 0.5}
    for name, value in expected.items():
        assert abs(freq[name] - value) < 0.02, (name, freq[name])


def injection_setup(context_frames: int = 6):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 2, 3, 2, 2, generator=g)
    noise = torch.randn(1, 2, 3, 2, 2, generator=g)
    context = torch.randn(1, 2, context_frames, 2, 2, generator=g)
    banks = ErrorBanks(num_buckets=5, capacity=3, warmup_steps=0)
    return x0, noise, context, banks


def flags(noise=False, latent=False, context=False) -> InjectionFlags:
    return InjectionFlags(noise=noise, latent=latent, context=context, clean_step=False)


def test_inject_noise_error_only():
    x0, noise, context, banks = injection_setup()
    e_noise, e_latent = const(0.25, (2, 3, 2, 2)), const(-0.5, (2, 3, 2, 2))
    banks.noise.store(e_noise[None], torch.tensor([900.0]))
    banks.latent.store(e_latent[None], torch.tensor([900.0]))
    out = ErrorInjector().inject(x0, noise, context, 900.0, banks, flags(noise=True))
    sigma = 0.9
    torch.testing.assert_close(out.noise, noise + e_noise)
    torch.testing.assert_close(out.noisy_target, (1 - sigma) * x0 + sigma * (noise + e_noise))
    assert torch.equal(out.context, context)
    assert out.info.noise_applied.tolist() == [True] and not out.info.latent_applied.any()


def test_inject_latent_error_keeps_self_correcting_target():
    x0, noise, context, banks = injection_setup()
    e_latent = const(-0.5, (2, 3, 2, 2))
    banks.noise.store(const(0.25, (2, 3, 2, 2))[None], torch.tensor([900.0]))
    banks.latent.store(e_latent[None], torch.tensor([900.0]))
    out = ErrorInjector().inject(x0, noise, context, torch.tensor([900.0]), banks, flags(latent=True))
    torch.testing.assert_close(out.noisy_target, 0.1 * (x0 + e_latent) + 0.9 * noise)
    assert torch.equal(out.noise, noise)  # so the target noise − x0 uses the clean latent and the original noise
    assert torch.equal(out.context, context)
    assert out.info.latent_applied.tolist() == [True] and not out.info.noise_applied.any()


def test_inject_context_from_any_bucket_and_empty_buckets_skip():
    x0, noise, context, banks = injection_setup()
    e_context = const(0.75, (2, 6, 2, 2))
    banks.latent.store(e_context[None], torch.tensor([560.0]))  # a bucket other than the target's
    out = ErrorInjector().inject(x0, noise, context, 900.0, banks, flags(noise=True, latent=True, context=True))
    torch.testing.assert_close(out.context, context + e_context)
    torch.testing.assert_close(out.noisy_target, 0.1 * x0 + 0.9 * noise)  # target buckets are empty
    assert out.info.context_applied.tolist() == [True]
    assert not out.info.noise_applied.any() and not out.info.latent_applied.any()


def test_inject_long_layout_crops_error_onto_motion_only():
    x0, noise, context, banks = injection_setup(context_frames=3 + 2 + 6)
    error = torch.arange(21.0).view(1, 21, 1, 1).expand(2, 21, 2, 2).clone()
    banks.latent.store(error[None], torch.tensor([300.0]))
    motion = slice(5, 11)
    for seed in range(5):
        out = ErrorInjector().inject(x0, noise, context, 900.0, banks, flags(context=True),
                                     torch.Generator().manual_seed(seed), context_error_slice=motion)
        diff = out.context - context
        assert torch.equal(diff[:, :, :5], torch.zeros_like(diff[:, :, :5]))
        offsets = diff[0, 0, motion, 0, 0]
        start = float(offsets[0])
        torch.testing.assert_close(offsets, torch.arange(start, start + 6))
        assert 0 <= start <= 15 and start == round(start)
        torch.testing.assert_close(diff[:, :, motion], error[None, :, int(start):int(start) + 6])


def test_inject_clean_step_changes_nothing():
    x0, noise, context, banks = injection_setup()
    for bank in (banks.noise, banks.latent):
        bank.store(const(0.25, (2, 3, 2, 2))[None], torch.tensor([900.0]))
    injector = ErrorInjector(noise_prob=1, context_prob=1, latent_prob=1, clean_prob=1)
    step_flags = injector.draw_flags()
    out = injector.inject(x0, noise, context, 900.0, banks, step_flags)
    assert torch.equal(out.noise, noise) and torch.equal(out.context, context)
    torch.testing.assert_close(out.noisy_target, 0.1 * x0 + 0.9 * noise)
    assert out.info.clean_step


def test_inject_per_sample_buckets_and_modulation():
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(2, 2, 3, 2, 2, generator=g), torch.randn(2, 2, 3, 2, 2, generator=g)
    banks = ErrorBanks(num_buckets=5, capacity=3, warmup_steps=0)
    e = torch.randn(2, 3, 2, 2, generator=g).half().float()
    banks.noise.store(e[None], torch.tensor([900.0]))
    t = torch.tensor([900.0, 560.0])
    out = ErrorInjector(error_modulate=0.5).inject(x0, noise, None, t, banks, flags(noise=True), g)
    assert out.info.noise_applied.tolist() == [True, False] and out.context is None
    assert torch.equal(out.noise[1], noise[1])
    scale = (out.noise[0] - noise[0]) / e
    assert 0.5 <= float(scale.mean()) <= 1.5 and float(scale.std()) < 1e-4 and abs(float(scale.mean()) - 1) > 1e-6
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(out.noisy_target, (1 - sigma) * x0 + sigma * out.noise)


def test_fit_error_frames_crop_and_tile():
    error = torch.arange(5.0).view(1, 5, 1, 1)
    crops = {tuple(fit_error_frames(error, 3, torch.Generator().manual_seed(s)).flatten().tolist()) for s in range(40)}
    assert crops == {(0, 1, 2), (1, 2, 3), (2, 3, 4)}
    assert fit_error_frames(error[:, :2], 5).flatten().tolist() == [0, 1, 0, 1, 0]
    assert fit_error_frames(error, 5) is error


# ----------------------------------------------------------------------------------------------------------------------
# Training state
# ----------------------------------------------------------------------------------------------------------------------


def fill(bank: ErrorBank, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        errors = torch.randn(2, *ENTRY_SHAPE, generator=g)
        bank.insert(errors, torch.rand(2, generator=g) * 1000, clean_step=bool(torch.rand(1, generator=g) < 0.5))


def assert_same_bank(a: ErrorBank, b: ErrorBank) -> None:
    assert a.bucket_counts() == b.bucket_counts() and a.steps_seen == b.steps_seen and a.nbytes == b.nbytes
    for bucket in range(a.num_buckets):
        for x, y in zip(a.bucket_entries(bucket), b.bucket_entries(bucket)):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_state_dict_round_trip_is_exact_and_resumes_identically():
    settings = dict(num_buckets=5, capacity=2, policy="random", warmup_steps=3, clean_insert_prob=0.5,
                    max_total_entries=7, gather=TwoRankGather())
    bank = ErrorBank(**settings, seed=11)
    fill(bank, 8, seed=0)
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = ErrorBank(**settings, seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert_same_bank(bank, restored)
    fill(bank, 6, seed=1)
    fill(restored, 6, seed=1)
    assert_same_bank(bank, restored)

    banks = ErrorBanks(num_buckets=5, capacity=2, warmup_steps=0)
    banks.insert(torch.randn(3, *ENTRY_SHAPE), torch.randn(3, *ENTRY_SHAPE), torch.tensor([10.0, 500.0, 990.0]), False)
    other = ErrorBanks(num_buckets=5, capacity=2, warmup_steps=0)
    other.load_state_dict(banks.state_dict())
    assert_same_bank(banks.noise, other.noise) and assert_same_bank(banks.latent, other.latent)
    with pytest.raises(ValueError, match="buckets"):
        ErrorBank(num_buckets=6).load_state_dict(bank.state_dict())


def test_bank_and_injector_reject_bad_settings():
    with pytest.raises(ValueError, match="unknown replacement policy"):
        ErrorBank(policy="lru")
    with pytest.raises(NotImplementedError, match="l2_similarity"):
        ErrorBank(policy="l2_similarity")
    with pytest.raises(ValueError, match=r"\[N, C, T, h, w\]"):
        toy_bank().insert(torch.zeros(2, 3, 2, 2), torch.tensor([1.0, 2.0]), clean_step=False)
    with pytest.raises(ValueError, match="one timestep per error"):
        toy_bank().store(torch.zeros(2, *ENTRY_SHAPE), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="latent_prob"):
        ErrorInjector(latent_prob=1.5)
    x0, noise, context, banks = injection_setup()
    banks.noise.store(torch.zeros(1, 3, 3, 2, 2), torch.tensor([900.0]))
    with pytest.raises(ValueError, match="channels and spatial size"):
        ErrorInjector().inject(x0, noise, context, 900.0, banks, flags(noise=True))


# ----------------------------------------------------------------------------------------------------------------------
# Disk storage
# ----------------------------------------------------------------------------------------------------------------------


def disk_bank(directory: Path, **kwargs) -> ErrorBank:
    return toy_bank(storage="disk", storage_dir=directory, **kwargs)


def contents(bank: ErrorBank) -> list[list[tuple[int, torch.Tensor]]]:
    """(entry id, entry) of every bucket, oldest slot first, as independent copies."""
    return [[(i, e.clone()) for i, e in zip(bank._entry_ids[b], bank.bucket_entries(b))]
            for b in range(bank.num_buckets)]


def assert_same_contents(a: list, b: list) -> None:
    assert [[i for i, _ in bucket] for bucket in a] == [[i for i, _ in bucket] for bucket in b]
    for bucket_a, bucket_b in zip(a, b):
        for (_, x), (_, y) in zip(bucket_a, bucket_b):
            assert x.dtype == y.dtype and torch.equal(x.view(torch.int16), y.view(torch.int16))  # bit for bit


def feed(banks: list[ErrorBank], steps: int, seed: int, rows: int = 2) -> None:
    """The same stream of steps into every bank: float64 errors, random timesteps, random clean flags."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        errors = torch.randn(rows, *ENTRY_SHAPE, generator=g, dtype=torch.float64)
        t = torch.rand(rows, generator=g) * 1000
        clean = bool(torch.rand(1, generator=g) < 0.5)
        for bank in banks:
            bank.insert(errors, t, clean_step=clean)


@pytest.mark.parametrize("policy, caps", [("l2_batch", {}), ("random", {"max_total_entries": 9}),
                                          ("fifo", {"max_total_bytes": 11 * 48}),
                                          ("l2_batch", {"max_total_entries": 7})])
def test_disk_bank_evolves_exactly_like_the_ram_bank(tmp_path, policy, caps):
    settings = dict(capacity=3, policy=policy, warmup_steps=3, clean_insert_prob=0.5, seed=5, **caps)
    ram = toy_bank(gather=TwoRankGather(), **settings)
    disk = disk_bank(tmp_path, gather=TwoRankGather(), **settings)
    for step in range(25):
        feed([ram, disk], 1, seed=step)
        assert_same_contents(contents(ram), contents(disk))
        assert ram.nbytes == disk.nbytes and ram.bucket_counts() == disk.bucket_counts()
    assert ram._next_entry_id > len(ram) + 10  # many evictions: the policy and the caps chose victims
    g_ram, g_disk = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in (999.0, 700.0, 300.0, 20.0):
        a, b = ram.sample(t, g_ram), disk.sample(t, g_disk)
        assert (a is None and b is None) or torch.equal(a, b)
        assert torch.equal(ram.sample_any(g_ram), disk.sample_any(g_disk))
    assert disk.storage == "disk" and disk.path.parent == tmp_path.absolute()


def test_fp16_rounding_is_the_same_in_ram_and_on_disk(tmp_path):
    g = torch.Generator().manual_seed(8)
    errors = torch.randn(2, *ENTRY_SHAPE, generator=g) * torch.logspace(-6, 2, 24).view(1, *ENTRY_SHAPE)
    ram, disk = toy_bank(), disk_bank(tmp_path)
    for bank in (ram, disk):
        bank.store(errors, torch.tensor([1000.0, 1000.0]))
    # harvested errors are float32: one round-to-nearest-even to fp16, as numpy does it
    expected = errors.numpy().astype(np.float16)
    for row in range(2):
        for bank in (ram, disk):
            assert bank.bucket_entries(0)[row].numpy().view(np.int16).tolist() == expected[row].view(np.int16).tolist()
    on_disk = np.fromfile(disk.path, dtype=np.float16)[: expected.size]  # the file itself, read by numpy
    assert on_disk.view(np.int16).tolist() == expected.reshape(-1).view(np.int16).tolist()

    # float64 input: 1 + 2^-11 + 2^-40 rounds to 1 + 2^-10 directly but to 1 through float32 (a tie, to even); both
    # storages apply the same conversion, torch's
    wide = torch.randn(1, *ENTRY_SHAPE, generator=g, dtype=torch.float64)
    wide[0, 0, 0, 0, 0] = 1 + 2**-11 + 2**-40
    for bank in (ram, disk):
        bank.store(wide, torch.tensor([20.0]))
    stored = [bank.bucket_entries(4)[0] for bank in (ram, disk)]
    assert torch.equal(stored[0].view(torch.int16), stored[1].view(torch.int16))
    assert torch.equal(stored[1].view(torch.int16), wide[0].to(torch.float16).view(torch.int16))


def test_disk_bank_files_are_per_rank_reserved_and_locked(tmp_path, monkeypatch):
    banks = ErrorBanks(num_buckets=5, capacity=4, warmup_steps=0, storage="disk", storage_dir=tmp_path / "b",
                       max_total_bytes=10 * 48 + 5, rank=3)
    assert not (tmp_path / "b").exists()  # nothing touches the disk before the first insert
    banks.insert(torch.randn(1, *ENTRY_SHAPE), torch.randn(1, *ENTRY_SHAPE), torch.tensor([500.0]), False)
    entry_bytes = 2 * torch.Size(ENTRY_SHAPE).numel()
    for name in ("noise", "latent"):
        path = tmp_path / "b" / f"{name}-rank3.bank"
        assert getattr(banks, name).path == path.absolute()
        assert path.stat().st_size == 10 * entry_bytes  # min(5 buckets x 4, byte cap // 48 bytes) entries
    capped = disk_bank(tmp_path / "c", capacity=4, max_total_entries=6, rank=0)
    capped.store(torch.randn(1, *ENTRY_SHAPE), torch.tensor([10.0]))
    assert capped.path.stat().st_size == 6 * entry_bytes

    twin = ErrorBank(num_buckets=5, storage="disk", storage_dir=tmp_path / "b", name="noise", rank=3)
    with pytest.raises(RuntimeError, match="in use by another process"):
        twin.store(torch.randn(1, *ENTRY_SHAPE), torch.tensor([10.0]))
    assert len(twin) == 0

    with pytest.raises(ValueError, match="storage_dir"):
        ErrorBank(storage="disk")
    with pytest.raises(ValueError, match="'memory' or 'disk'"):
        ErrorBank(storage="ssd")
    with pytest.raises(ValueError, match="entries of shape"):
        capped.store(torch.randn(1, 2, 4, 2, 2), torch.tensor([10.0]))
    assert len(capped) == 1

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 6)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    assert disk_bank(tmp_path).path == (tmp_path / "bank-rank6.bank").absolute()  # the global rank by default


def test_disk_bank_resumes_exactly_from_its_latest_state(tmp_path):
    settings = dict(capacity=3, policy="random", warmup_steps=4, clean_insert_prob=0.5, max_total_entries=12,
                    seed=3)
    run = disk_bank(tmp_path, gather=TwoRankGather(), **settings)
    ram = toy_bank(gather=TwoRankGather(), **settings)
    feed([run, ram], 10, seed=0)
    saved_contents = contents(run)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    ram_state = copy.deepcopy(ram.state_dict())
    reserved = run.path.stat().st_size

    feed([run], 30, seed=1)  # the run goes on (evicting and inserting), then dies
    assert run.path.stat().st_size > reserved  # the slots of the saved state were kept, so the file grew
    path = run.path
    run.close()

    buffer.seek(0)
    resumed = disk_bank(tmp_path, gather=TwoRankGather(), **settings)  # a fresh object, as in a new process
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.path == path
    assert_same_contents(contents(resumed), saved_contents)
    assert resumed.steps_seen == 10 and resumed.nbytes == ram.nbytes
    reference = toy_bank(gather=TwoRankGather(), **settings)
    reference.load_state_dict(ram_state)
    for step in range(20):
        feed([resumed, reference], 1, seed=100 + step)
        assert_same_contents(contents(resumed), contents(reference))
    assert torch.equal(resumed.generator.get_state(), reference.generator.get_state())


def test_disk_state_whose_entries_were_overwritten_fails_the_check(tmp_path):
    bank = disk_bank(tmp_path, capacity=2, warmup_steps=0, policy="fifo")
    feed([bank], 6, seed=0)
    old = bank.state_dict()
    feed([bank], 6, seed=1)
    bank.state_dict()  # a newer checkpoint: the slots of the old one may now be reused ...
    feed([bank], 6, seed=2)  # ... and are
    bank.close()
    with pytest.raises(ValueError, match="no longer holds"):
        disk_bank(tmp_path, capacity=2).load_state_dict(old)
    with pytest.raises(ValueError, match="no longer holds"):
        toy_bank(capacity=2).load_state_dict(old)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        disk_bank(tmp_path / "elsewhere", capacity=2).load_state_dict(dict(old, path=str(tmp_path / "gone.bank")))


def test_disk_state_moves_to_another_rank_file_and_to_ram_and_back(tmp_path):
    settings = dict(capacity=3, policy="l2_batch", warmup_steps=0)
    source = disk_bank(tmp_path, rank=0, **settings)
    feed([source], 8, seed=4)
    state = source.state_dict()
    expected = contents(source)
    source_bytes = source.path.read_bytes()

    other_rank = disk_bank(tmp_path, rank=1, **settings)  # e.g. a resume with another world size
    other_rank.load_state_dict(state)
    assert other_rank.path.name == "bank-rank1.bank"
    assert_same_contents(contents(other_rank), expected)
    in_ram = toy_bank(**settings)
    in_ram.load_state_dict(state)
    assert_same_contents(contents(in_ram), expected)
    back_to_disk = disk_bank(tmp_path, rank=2, **settings)
    back_to_disk.load_state_dict(in_ram.state_dict())
    assert_same_contents(contents(back_to_disk), expected)

    feed([other_rank, in_ram, back_to_disk], 5, seed=5)
    assert source.path.read_bytes() == source_bytes  # copies never write to the source file
    assert_same_contents(contents(other_rank), contents(in_ram))
    assert_same_contents(contents(back_to_disk), contents(in_ram))

    banks = ErrorBanks(num_buckets=5, capacity=2, warmup_steps=0, storage="disk", storage_dir=tmp_path / "pair")
    banks.insert(torch.randn(3, *ENTRY_SHAPE), torch.randn(3, *ENTRY_SHAPE), torch.tensor([10.0, 500.0, 990.0]), False)
    pair = {name: contents(getattr(banks, name)) for name in ("noise", "latent")}
    pair_state = banks.state_dict()
    banks.close()
    fresh = ErrorBanks(num_buckets=5, capacity=2, warmup_steps=0, storage="disk", storage_dir=tmp_path / "pair")
    fresh.load_state_dict(pair_state)
    for name in ("noise", "latent"):
        assert getattr(fresh, name).path.name == f"{name}-rank0.bank" and len(getattr(fresh, name)) == 3
        assert_same_contents(contents(getattr(fresh, name)), pair[name])
    assert not torch.equal(fresh.noise.bucket_entries(0)[0], fresh.latent.bucket_entries(0)[0])


# ----------------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------------


class FrameIndexAutoencoder:
    """Stand-in autoencoder whose latents name their source frames: channels (first, last, mean) of the pixel values
    of each [1, 4, 4, ...] frame group; spatial 2x downsampling. Records the length of every encoded clip."""

    temporal_factor = 4

    def __init__(self) -> None:
        self.encoded_lengths: list[int] = []

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        batch, _, frames, height, width = video.shape
        assert (frames - 1) % 4 == 0
        self.encoded_lengths.append(frames)
        value = video[:, 0].mean(dim=(-2, -1))  # [B, T]
        groups = [[0]] + [list(range(1 + 4 * k, 5 + 4 * k)) for k in range((frames - 1) // 4)]
        latents = torch.stack([torch.stack([value[:, g[0]], value[:, g[-1]], value[:, g].mean(1)], 1)
                               for g in groups], dim=2)
        return latents[..., None, None].expand(batch, 3, len(groups), height // 2, width // 2).clone()


def frame_index_video(num_frames: int, batch: int = 2) -> torch.Tensor:
    """Pixel value = frame index + 1000·batch row."""
    values = torch.arange(num_frames, dtype=torch.float32).view(1, 1, -1, 1, 1) \
        + 1000 * torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1, 1)
    return values.expand(batch, 3, num_frames, 4, 4).clone()


def assert_latents_name_frames(latents: torch.Tensor, frames: list[tuple[int, ...]]) -> None:
    assert latents.shape[2] == len(frames)
    for b in range(latents.shape[0]):
        for i, source in enumerate(frames):
            got = latents[b, :, i, 0, 0].tolist()
            want = [source[0] + 1000 * b, source[-1] + 1000 * b, sum(source) / len(source) + 1000 * b]
            assert got == pytest.approx(want), (b, i, source)


def paper_expected_frames(n: int) -> dict[str, list[tuple[int, ...]]]:
    """§E.2 in words: sink = frames 0–8; target = last 84 frames; motion = the 24 frames before the target (encoded
    after one extra leading frame); sparse = from the last 288 frames before that leading frame, a 5-frame snippet
    every 24 frames, keeping its second latent."""
    target_start = n - 84
    motion_start = target_start - 24
    region_end = motion_start - 1
    region_start = max(9, region_end - 288)
    four = lambda start: tuple(range(start, start + 4))  # noqa: E731
    return {
        "sink": [(0,), four(1), four(5)],
        "sparse": [four(s + 1) for s in range(region_start, region_end - 4, 24)],
        "motion": [four(motion_start + 4 * i) for i in range(6)],
        "target": [four(target_start + 4 * i) for i in range(21)],
    }


@pytest.mark.parametrize("num_frames, num_sparse", [(160, 2), (400, 12), (600, 12)])
def test_long_layout_paper_numbers(num_frames, num_sparse):
    autoencoder = FrameIndexAutoencoder()
    layout = long_layout(frame_index_video(num_frames), autoencoder)
    expected = paper_expected_frames(num_frames)
    assert len(expected["sparse"]) == num_sparse
    assert {k: s.stop - s.start for k, s in layout.segments.items()} == {
        "sink": 3, "sparse": num_sparse, "motion": 6, "target": 21}
    order = expected["sink"] + expected["sparse"] + expected["motion"] + expected["target"]
    assert list(layout.source_pixel_frames) == order
    assert_latents_name_frames(layout.latents, order)
    assert autoencoder.encoded_lengths == [9] + [5] * num_sparse + [109]
    assert layout.positions.tolist() == list(range(30 + num_sparse))
    assert layout.context_error_slice == slice(3 + num_sparse, 9 + num_sparse)
    assert torch.equal(layout.target, layout.latents[:, :, -21:])


def test_long_layout_160_frames_by_hand():
    layout = long_layout(frame_index_video(160, batch=1), FrameIndexAutoencoder())
    frames = layout.source_pixel_frames
    assert frames[3] == (10, 11, 12, 13) and frames[4] == (34, 35, 36, 37)  # snippets 9–13 and 33–37
    assert frames[5] == (52, 53, 54, 55) and frames[10] == (72, 73, 74, 75)  # motion 52–75 (51 dropped)
    assert frames[11] == (76, 77, 78, 79) and frames[-1] == (156, 157, 158, 159)


def test_long_layout_toy_counts_and_minimum_length():
    config = LongLayoutConfig(sink_latents=3, motion_latents=6, target_latents=6, sparse_stride=8,
                              sparse_window_frames=16)
    for num_frames in (71, 100):
        layout = long_layout(frame_index_video(num_frames), FrameIndexAutoencoder(), config)
        assert [s.stop - s.start for s in layout.segments.values()] == [3, 2, 6, 6]
        assert layout.latents.shape == (2, 3, 17, 2, 2)
        motion_target_start = num_frames - 49
        region_start = max(9, motion_target_start - 16)
        sparse = [tuple(range(s + 1, s + 5)) for s in (region_start, region_start + 8)]
        assert list(layout.source_pixel_frames[3:5]) == sparse
        assert_latents_name_frames(layout.latents, list(layout.source_pixel_frames))
    with pytest.raises(ValueError, match="at least 71"):
        long_layout(frame_index_video(70), FrameIndexAutoencoder(), config)
    with pytest.raises(ValueError, match="at least 147"):
        long_layout_plan(146)
    with pytest.raises(ValueError, match=r"\[B, 3, N, H, W\]"):
        long_layout(torch.zeros(1, 4, 160, 4, 4), FrameIndexAutoencoder())


def test_long_layout_from_latents_index_mapping():
    num_latents = 100
    num_frames = 1 + 4 * (num_latents - 1)
    video = frame_index_video(num_frames)
    clip_latents = FrameIndexAutoencoder().encode(video)
    from_latents = long_layout_from_latents(clip_latents)
    from_pixels = long_layout(video, FrameIndexAutoencoder())
    for name in ("sink", "motion", "target"):
        assert torch.equal(from_latents.segment(name), from_pixels.segment(name))
    sparse_index = list(range(3, 73, 6))  # region [3, 73) of latents, every 24 / 4 = 6
    assert from_latents.segment("sparse").shape[2] == 12
    sparse_frames = [tuple(range(4 * j - 3, 4 * j + 1)) for j in sparse_index]
    assert list(from_latents.source_pixel_frames[3:15]) == sparse_frames
    assert_latents_name_frames(from_latents.latents, list(from_latents.source_pixel_frames))
    with pytest.raises(ValueError, match="multiples of the temporal factor"):
        long_layout_from_latents(clip_latents, LongLayoutConfig(sparse_stride=10))
    with pytest.raises(ValueError, match="too short"):
        long_layout_from_latents(clip_latents[:, :, :33])


def test_dense_layout_split():
    latents = torch.randn(2, 4, 12, 2, 2)
    layout = dense_layout(latents, 6)
    assert torch.equal(layout.context, latents[:, :, :6]) and torch.equal(layout.target, latents[:, :, 6:])
    assert layout.context_error_slice == slice(0, 6) and layout.positions.tolist() == list(range(12))
    assert layout.source_pixel_frames[0] == (0,) and layout.source_pixel_frames[6] == (21, 22, 23, 24)
    assert dense_layout(latents).num_context_frames == 6
    with pytest.raises(ValueError, match="num_context"):
        dense_layout(latents, 12)


def test_long_layout_with_project_toy_autoencoder():
    from cf.encoders import ToyAutoencoder

    autoencoder = ToyAutoencoder(latent_channels=4, spatial_factor=2)
    config = LongLayoutConfig(sink_latents=3, motion_latents=6, target_latents=6, sparse_stride=8,
                              sparse_window_frames=16)
    video = torch.rand(1, 3, 1 + 4 * 30, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    layout = long_layout(video, autoencoder, config)
    clip_latents = autoencoder.encode(video)
    assert layout.latents.shape == (1, 4, 17, 4, 4)
    by_index = long_layout_from_latents(clip_latents, config)
    for name in ("sink", "motion", "target"):  # the toy encoder has no temporal context across latents
        torch.testing.assert_close(layout.segment(name), by_index.segment(name))
    snippet = layout.source_pixel_frames[3]
    snippet_latents = autoencoder.encode(video[:, :, snippet[0] - 1:snippet[-1] + 1])
    torch.testing.assert_close(layout.latents[:, :, 3], snippet_latents[:, :, 1])
