"""The one Euler / CFG sampler (`cf.sampling`): it reproduces, bit for bit, the two loops it replaced (the teacher's
`continue_latents` and the stage-0 `ode_trajectory`), re-imposes the clean context at every step and stores the
states it is asked for."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from cf.diffusion import sampling_sigmas
from cf.losses import classifier_free_guidance
from cf.models.wan import WanConfig, WanDiT
from cf.sampling import continue_latents, sample_flow
from data.ode_pairs import ode_trajectory

TINY = WanConfig.tiny()


# ----------------------------------------------------------------------------------------------------------------------
# The replaced loops, as they were written, as naive references
# ----------------------------------------------------------------------------------------------------------------------


def old_teacher_loop(network, context, text, num_target_frames, sigmas, guidance_scale=5.0, negative_text=None,
                     noise=None, generator=None) -> Tensor:
    """The teacher's former sampler (`cf.lit.teacher.continue_latents` before `cf.sampling`)."""
    b, c, _, h, w = context.shape
    shape = (b, c, num_target_frames, h, w)
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else context.device)
    x = noise.to(device=context.device, dtype=torch.float32)
    guided = float(guidance_scale) != 1.0
    if guided:
        negative = torch.zeros_like(text) if negative_text is None else negative_text.to(text)
        if negative.shape[0] == 1 and b > 1:
            negative = negative.expand(b, *negative.shape[1:])
        texts = torch.cat([text, negative])
        ctx = torch.cat([context, context])
    else:
        texts, ctx = text, context
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_in = x if not guided else torch.cat([x, x])
        sequence = torch.cat([ctx, x_in.to(ctx.dtype)], dim=2)
        t = torch.full((sequence.shape[0],), 1000.0 * sigma, device=context.device)
        flow = network(sequence, t, texts)[:, :, -num_target_frames:].float()
        if guided:
            cond, uncond = flow.chunk(2)
            flow = classifier_free_guidance(cond, uncond, float(guidance_scale) - 1.0)
        x = x + (sigma_next - sigma) * flow
    return x.to(context.dtype)


def old_ode_loop(teacher, noise, text, negative_text, sigmas, guidance_scale, stored_steps) -> Tensor:
    """The former `data.ode_pairs.ode_trajectory` loop."""
    b = noise.shape[0]
    if negative_text.shape[0] == 1 and b > 1:
        negative_text = negative_text.expand(b, *negative_text.shape[1:])
    dtype = teacher.patch_embedding.weight.dtype
    texts = torch.cat([text, negative_text.to(text)]).to(dtype)
    stored = set(int(s) for s in stored_steps)
    x = noise.float()
    states = []
    for i in range(len(sigmas) - 1):
        if i in stored:
            states.append(x.clone())
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((2 * b,), 1000.0 * sigma, device=noise.device)
        flow = teacher(torch.cat([x, x]).to(dtype), t, texts).float()
        cond, uncond = flow.chunk(2)
        x = x + (sigma_next - sigma) * classifier_free_guidance(cond, uncond, guidance_scale - 1.0)
    states.append(x)
    return torch.stack(states, dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------------


def tiny_dit(dtype: torch.dtype) -> WanDiT:
    torch.manual_seed(0)
    network = WanDiT(TINY).eval()
    # non-zero output heads, so that every step moves the latents
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return network.to(dtype)


def inputs(batch: int, context_frames: int, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, TINY.in_dim, context_frames, 4, 4, generator=g)
    text = torch.randn(batch, TINY.text_len, TINY.text_dim, generator=g)
    negative = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g)
    return context, text, negative


# ----------------------------------------------------------------------------------------------------------------------
# Same numbers as the replaced loops
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance_scale,with_negative", [(5.0, True), (3.0, False), (1.0, True)])
def test_continue_latents_reproduces_the_old_teacher_sampler(dtype, guidance_scale, with_negative) -> None:
    network = tiny_dit(dtype)
    context, text, negative = inputs(batch=2, context_frames=3)
    context, text, negative = context.to(dtype), text.to(dtype), negative.to(dtype)
    sigmas = sampling_sigmas(4, 5.0)
    negative = negative if with_negative else None
    ours = continue_latents(network, context, text, 3, sigmas, guidance_scale, negative,
                            generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = old_teacher_loop(network, context, text, 3, sigmas, guidance_scale, negative,
                                     generator=torch.Generator().manual_seed(7))
    assert ours.dtype == dtype and ours.shape == (2, TINY.in_dim, 3, 4, 4)
    assert torch.equal(ours, reference)


def test_continue_latents_without_context_reproduces_the_old_teacher_sampler() -> None:
    network = tiny_dit(torch.float32)
    _, text, negative = inputs(batch=1, context_frames=0)
    context = torch.zeros(1, TINY.in_dim, 0, 4, 4)  # the toy base draws whole clips this way
    noise = torch.randn(1, TINY.in_dim, 5, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = sampling_sigmas(3, 3.0)
    ours = continue_latents(network, context, text, 5, sigmas, 4.0, negative, noise=noise)
    with torch.no_grad():
        reference = old_teacher_loop(network, context, text, 5, sigmas, 4.0, negative, noise=noise)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
def test_ode_trajectory_reproduces_the_old_ode_loop(dtype, guidance_scale) -> None:
    teacher = tiny_dit(dtype)
    _, text, negative = inputs(batch=2, context_frames=0)
    noise = torch.randn(2, TINY.in_dim, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    sigmas = sampling_sigmas(6, 8.0)
    ours = ode_trajectory(teacher, noise, text, negative, sigmas, guidance_scale, (0, 2, 5))
    with torch.no_grad():
        reference = old_ode_loop(teacher, noise, text, negative, sigmas, guidance_scale, (0, 2, 5))
    assert ours.dtype == torch.float32 and ours.shape == (2, 4, TINY.in_dim, 4, 4, 4)
    assert torch.equal(ours, reference)


def test_teacher_and_ode_callers_agree_on_the_same_problem() -> None:
    """Without context, in float32 and with the same guidance, the two callers integrate the same ODE: the final
    ODE state is the teacher's continuation of an empty context."""
    network = tiny_dit(torch.float32)
    _, text, negative = inputs(batch=2, context_frames=0)
    noise = torch.randn(2, TINY.in_dim, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    sigmas = sampling_sigmas(5, 5.0)
    trajectory = ode_trajectory(network, noise, text, negative, sigmas, 5.0, (0,))
    continued = continue_latents(network, torch.zeros(2, TINY.in_dim, 0, 4, 4), text, 3, sigmas, 5.0, negative,
                                 noise=noise)
    assert torch.equal(trajectory[:, -1], continued)
    assert torch.equal(trajectory[:, 0], noise)


# ----------------------------------------------------------------------------------------------------------------------
# Context, stored states, arguments
# ----------------------------------------------------------------------------------------------------------------------


class RecordingField(nn.Module):
    """Records its inputs; predicts a flow that depends on every frame and is large on the context frames, so a
    sampler that integrated the context (or let it drift) would be caught."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, sequence: Tensor, t: Tensor, text: Tensor) -> Tensor:
        self.calls.append((sequence.clone(), t.clone(), text.clone()))
        mixed = sequence.mean(dim=2, keepdim=True)
        return 10.0 * sequence + mixed + text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + (t / 1000).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("guidance_scale", [None, 4.0])
def test_clean_context_is_re_imposed_at_every_step_and_states_are_stored(guidance_scale) -> None:
    context, text, negative = inputs(batch=2, context_frames=3)
    noise = torch.randn(2, TINY.in_dim, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    sigmas = sampling_sigmas(5, 5.0)
    field = RecordingField()
    sample = sample_flow(field, noise, text, sigmas, context=context, guidance_scale=guidance_scale,
                         negative_text=negative, stored_steps=(0, 1, 3))
    rows = 4 if guidance_scale is not None else 2
    assert len(field.calls) == 5
    xs = []
    for i, (sequence, t, texts) in enumerate(field.calls):
        assert sequence.shape == (rows, TINY.in_dim, 5, 4, 4)
        for half in range(rows // 2):  # every row (conditional and unconditional) sees the exact clean context
            assert torch.equal(sequence[2 * half:2 * half + 2, :, :3], context)
        assert torch.equal(sequence[:2, :, 3:], sequence[rows - 2:, :, 3:])
        assert torch.equal(t, torch.full((rows,), 1000.0 * float(sigmas[i])))
        if guidance_scale is not None:
            assert torch.equal(texts, torch.cat([text, negative.expand(2, -1, -1)]))
        xs.append(sequence[:2, :, 3:])
    assert torch.equal(xs[0], noise)
    assert sample.states.shape == (2, 3, TINY.in_dim, 2, 4, 4)
    for slot, step in enumerate((0, 1, 3)):
        assert torch.equal(sample.states[:, slot], xs[step])
    # the last Euler step, recomputed from the recorded input and the field's own prediction
    sequence, t, texts = field.calls[-1]
    flow = RecordingField()(sequence, t, texts)[:, :, 3:]
    if guidance_scale is not None:
        cond, uncond = flow.chunk(2)
        flow = uncond + guidance_scale * (cond - uncond)
    expected = xs[-1] + (float(sigmas[5]) - float(sigmas[4])) * flow
    torch.testing.assert_close(sample.latents, expected, rtol=1e-5, atol=1e-5)


def test_sample_flow_without_stored_steps_and_bad_steps() -> None:
    noise = torch.randn(1, TINY.in_dim, 2, 4, 4)
    _, text, _ = inputs(batch=1, context_frames=0)
    sample = sample_flow(RecordingField(), noise, text, sampling_sigmas(3))
    assert sample.states is None and sample.latents.dtype == torch.float32
    with pytest.raises(ValueError, match="stored_steps"):
        sample_flow(RecordingField(), noise, text, sampling_sigmas(3), stored_steps=(3,))


def test_old_reference_loops_are_not_trivially_equal() -> None:
    """The references are sensitive: a different guidance scale or dtype changes the numbers."""
    network = tiny_dit(torch.float32)
    context, text, negative = inputs(batch=1, context_frames=2)
    sigmas = sampling_sigmas(3)
    a = continue_latents(network, context, text, 2, sigmas, 5.0, negative, generator=torch.Generator().manual_seed(1))
    b = continue_latents(network, context, text, 2, sigmas, 4.0, negative, generator=torch.Generator().manual_seed(1))
    c = continue_latents(copy.deepcopy(network).to(torch.bfloat16), context.bfloat16(), text.bfloat16(), 2, sigmas,
                         5.0, negative.bfloat16(), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b) and not torch.equal(a, c.float())
