"""Slow-Fast Memory: exact slot timelines (§C.5, §J.2), bounded positions (§D), detachment, batching, streaming."""

import pytest
import torch

from cf.memory import (
    AlwaysKeyframes,
    MemoryConfig,
    NeverKeyframes,
    ScheduledKeyframes,
    SimilarityKeyframes,
    SlowFastMemory,
    simulate_slots,
)
from cf.models.kv_cache import GrowingKVCache
from cf.models.wan import CausalWanDiT, WanConfig
from cf.rollout import SamplingConfig, commit_chunk, denoise_chunk, stream

# §C.5 (sink | slow 3–14 | fast 15–20), consolidation at every chunk from chunk 2 on, released-code options.
ALWAYS_C5 = {
    2: [0, 1, 2, 6, 4, 5, 6, 7, 8] + [-1] * 12,
    6: [0, 1, 2, 6, 9, 12, 15, 18, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    7: [0, 1, 2, 6, 9, 12, 15, 18, 21, 9, 10, 11, 12, 13, 14, 18, 19, 20, 21, 22, 23],
    13: [0, 1, 2, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 36, 37, 38, 39, 40, 41],
    15: [0, 1, 2, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 42, 43, 44, 45, 46, 47],
}
UNIFORM6_C5_CHUNK19 = [0, 1, 2, 6, 12, 18, 24, 30, 36, 42, 48, 54, 12, 13, 14, 54, 55, 56, 57, 58, 59]
TOY_B = dict(sink=1, slow=2, fast=2, frames_per_chunk=1, rope_length=5)


@pytest.mark.parametrize("source", ["first_firing_call", "commit_pass"])
def test_simulated_timelines_match_spec_tables(source):
    cfg = MemoryConfig.released_code(consolidation_source=source)
    always = simulate_slots(cfg, 60, lambda c: True)
    for chunk, expected in ALWAYS_C5.items():
        assert always[chunk] == expected, chunk
    uniform = simulate_slots(cfg, 60, lambda c: (3 * c) % 6 == 0)
    assert uniform[19] == UNIFORM6_C5_CHUNK19
    never = simulate_slots(cfg, 60, lambda c: False)
    assert never[-1][3:15] == list(range(3, 15))  # slots 3–14 freeze with frames 3–14 (§C.5)

    toy_b = MemoryConfig.released_code(consolidation_source=source, **TOY_B)
    tl = simulate_slots(toy_b, 12, lambda c: True)
    assert tl[4] == [0, 3, 4, 3, 4] and tl[8] == [0, 7, 8, 7, 8]
    assert simulate_slots(toy_b, 12, lambda c: c % 2 == 0)[8] == [0, 6, 8, 7, 8]


def test_similarity_stride_two_makes_every_other_chunk_a_candidate():
    cfg = MemoryConfig(consolidation_stride_chunks=2)
    tl = simulate_slots(cfg, 60)  # the similarity rule with no reference: every candidate fires
    assert tl[19][3:12] == [6, 12, 18, 24, 30, 36, 42, 48, 54]


def _invariants(frames, cfg, chunk_end):
    fast = frames[cfg.sink + cfg.slow:]
    filled = [f for f in fast if f >= 0]
    if chunk_end >= cfg.capacity:
        assert fast == list(range(chunk_end - cfg.fast, chunk_end))  # the last N_l frames, in order
    else:
        assert filled == sorted(filled)


@pytest.mark.parametrize("policy", ["always", "never", "uniform"])
def test_memory_object_reproduces_the_bookkeeping_with_five_calls_per_chunk(policy):
    torch.manual_seed(0)
    cfg = MemoryConfig.released_code()
    schedule = {"always": lambda c: True, "never": lambda c: False, "uniform": lambda c: (3 * c) % 6 == 0}[policy]
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).eval()
    memory = SlowFastMemory(cfg, model.config.num_layers, ScheduledKeyframes(schedule))
    expected = simulate_slots(cfg, 48, schedule)
    ctx = model.text_kv(torch.randn(1, 8, 32))
    timesteps = SamplingConfig().timesteps()
    positions = []
    original_update = memory.update

    def spy(layer, k, v):
        window = original_update(layer, k, v)
        positions.append((window.key_positions.clone(), window.query_positions.clone()))
        return window

    memory.update = spy
    with torch.no_grad():
        for chunk, start in enumerate(range(0, 48, 3)):
            x0 = denoise_chunk(model, torch.randn(1, 4, 3, 4, 4), ctx, memory, start, timesteps)
            commit_chunk(model, x0, ctx, memory, start)
            for layer in range(model.config.num_layers):
                assert memory.slot_frames(layer) == expected[chunk]
            _invariants(memory.slot_frames(), cfg, start + 3)
            assert memory.layers[0].layouts[0].slow_count <= cfg.slow
    assert memory.calls == 16 * 5
    for keys, queries in positions:
        assert (keys.numel() == 0 or int(keys.max()) <= cfg.rope_length - 1) and int(queries.max()) < cfg.rope_length
        # bounded PE: pos(slot) = slot, queries take the top slots once the cache is full
        assert keys[0].tolist() == list(range(keys.shape[1]))
        assert queries[0].tolist() == list(range(keys.shape[1], keys.shape[1] + 3))


def test_short_video_with_absolute_or_bounded_positions_equals_growing_cache():
    torch.manual_seed(1)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).eval()
    text = torch.randn(2, 8, 32)
    runs = {}
    for name, cache_fn in {
        "growing": lambda: GrowingKVCache(model.config.num_layers),
        "bounded": lambda: SlowFastMemory(MemoryConfig(), model.config.num_layers, NeverKeyframes()),
        "absolute": lambda: SlowFastMemory(MemoryConfig(position_mode="absolute", rope_length=1024),
                                           model.config.num_layers, NeverKeyframes()),
    }.items():
        runs[name] = torch.cat(list(stream(model, text, 18, (4, 4), memory=cache_fn(), seed=3)), dim=2)
    torch.testing.assert_close(runs["bounded"], runs["growing"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs["absolute"], runs["growing"], rtol=1e-5, atol=1e-6)


def test_commit_pass_overwrites_chunk_kv_and_slow_copy_is_the_commit_kv():
    torch.manual_seed(2)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).eval()
    cfg = MemoryConfig(consolidation_stride_chunks=1)
    memory = SlowFastMemory(cfg, model.config.num_layers, AlwaysKeyframes())
    ctx = model.text_kv(torch.randn(1, 8, 32))
    captured = {}
    original_update = memory.update

    def spy(layer, k, v):
        captured[(memory._call[0], memory._call[2], layer)] = k.unflatten(1, (3, -1)).clone()
        return original_update(layer, k, v)

    memory.update = spy
    timesteps = SamplingConfig().timesteps()
    with torch.no_grad():
        for start in range(0, 9, 3):
            x0 = denoise_chunk(model, torch.randn(1, 4, 3, 4, 4), ctx, memory, start, timesteps)
            commit_chunk(model, x0, ctx, memory, start)
    state = memory.layers[1]
    # chunk 2 (frames 6–8) sits in slots 6–8 with the commit pass's keys; its first frame was copied to slot 3
    commit_keys = captured[(6, True, 1)]
    torch.testing.assert_close(state.keys[:, 6:9], commit_keys)
    torch.testing.assert_close(state.keys[:, 3], commit_keys[:, 0])
    assert memory.slot_frames(1)[:9] == [0, 1, 2, 6, 4, 5, 6, 7, 8]


def test_cache_contents_carry_no_gradient():
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3)
    memory = SlowFastMemory(MemoryConfig(), model.config.num_layers)
    ctx = torch.randn(1, 8, 32)
    x = torch.randn(1, 4, 3, 4, 4, requires_grad=True)
    out = model.forward_chunk(x, torch.full((1,), 500.0), ctx, memory, 0)
    out.sum().backward()
    assert x.grad is not None
    assert all(not s.keys.requires_grad and not s.values.requires_grad for s in memory.layers)


def test_batch_of_two_equals_two_single_runs_with_per_sample_decisions():
    torch.manual_seed(4)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).eval()
    cfg = MemoryConfig(consolidation_stride_chunks=1, slow=3, fast=6, sink=3, rope_length=12)
    text = torch.randn(2, 8, 32)
    noise = torch.randn(2, 4, 30, 4, 4)
    timesteps = SamplingConfig(denoising_steps=(1000,)).timesteps()  # one step: no re-noising randomness

    def run(idx, policy):
        memory = SlowFastMemory(cfg, model.config.num_layers, policy)
        text_kv = model.text_kv(text[idx])
        outs = []
        with torch.no_grad():
            for start in range(0, 30, 3):
                x0 = denoise_chunk(model, noise[idx, :, start:start + 3], text_kv, memory, start, timesteps)
                commit_chunk(model, x0, text_kv, memory, start)
                outs.append(x0)
        return torch.cat(outs, dim=2), memory

    class DescriptorSign:  # a per-sample, data-dependent decision that differs between the two samples
        def decide(self, start_frame, chunk_index, descriptor, reference):
            if reference is None:
                return torch.ones(descriptor.shape[0], dtype=torch.bool)
            return (descriptor - reference).sum(-1).cpu() > 0

    policy = DescriptorSign()
    both, mem2 = run(slice(0, 2), policy)
    one, mem_a = run(slice(0, 1), policy)
    two, mem_b = run(slice(1, 2), policy)
    assert mem2.slot_frames(0, 0) == mem_a.slot_frames(0, 0)
    assert mem2.slot_frames(0, 1) == mem_b.slot_frames(0, 0)
    assert any(mem2.slot_frames(layer, 0) != mem2.slot_frames(layer, 1) for layer in range(2))  # decisions split
    torch.testing.assert_close(both, torch.cat([one, two]), rtol=1e-5, atol=1e-5)


def test_stream_is_seeded_and_memory_is_bounded():
    torch.manual_seed(5)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).eval()
    text = torch.randn(1, 8, 32)
    a = torch.cat(list(stream(model, text, 30, (4, 4), seed=7)), dim=2)
    b = torch.cat(list(stream(model, text, 30, (4, 4), seed=7)), dim=2)
    c = torch.cat(list(stream(model, text, 30, (4, 4), seed=8)), dim=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # bounded: a chunk's context never exceeds the 18 frames before it, however long the video (§G)
    for preset, bound in (("slow_fast", 18), ("full", None)):
        memory = SlowFastMemory(MemoryConfig.preset(preset), model.config.num_layers)
        context_frames = []
        original = memory.update

        def spy(layer, k, v, original=original, context_frames=context_frames):
            window = original(layer, k, v)
            context_frames.append(window.keys.shape[1] // 4)  # 4 tokens per frame (2x2 grid)
            return window

        memory.update = spy
        list(stream(model, text, 90, (4, 4), memory=memory))
        per_chunk = context_frames[:: 5 * model.config.num_layers]
        grown = [min(start, bound) if bound else start for start in range(0, 90, 3)]
        assert per_chunk == grown


def test_presets_and_validation():
    assert MemoryConfig.sliding().capacity == 15
    assert MemoryConfig.self_forcing().position_mode == "absolute"
    assert MemoryConfig.full().capacity is None
    with pytest.raises(ValueError, match="rope_length"):
        MemoryConfig(rope_length=10)
    with pytest.raises(ValueError, match="unknown memory preset"):
        MemoryConfig.preset("nope")
    with pytest.raises(ValueError, match="interval_frames > 0"):
        from cf.memory import UniformKeyframes

        UniformKeyframes(0)


def test_sliding_window_keeps_sink_and_last_frames():
    tl = simulate_slots(MemoryConfig.sliding(sink=3, window=12), 45, lambda c: True)
    assert tl[-1] == [0, 1, 2] + list(range(33, 45))


def test_full_cache_grows_without_eviction():
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).eval()
    memory = SlowFastMemory(MemoryConfig.full(), model.config.num_layers)
    list(stream(model, torch.randn(1, 8, 32), 30, (4, 4), memory=memory))
    assert memory.slot_frames()[:30] == list(range(30))


@pytest.mark.parametrize("preset", ["slow_fast", "no_bounded_pe", "self_forcing", "sliding"])
def test_windows_with_equal_positions_keys_have_equal_positions(preset):
    """The model computes RoPE tables once per `positions_key` and call: every window that shares a key must hold
    exactly the same key and query positions (checked over a 60-frame stream, two samples with different
    keyframe decisions)."""
    torch.manual_seed(0)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).eval()
    seen: dict = {}
    distinct_positions = set()

    class Recording(SlowFastMemory):
        def update(self, layer, keys, values):
            window = super().update(layer, keys, values)
            assert window.positions_key is not None
            pair = (window.key_positions.clone(), window.query_positions.clone())
            if window.positions_key in seen:
                assert torch.equal(seen[window.positions_key][0], pair[0])
                assert torch.equal(seen[window.positions_key][1], pair[1])
            seen[window.positions_key] = pair
            distinct_positions.add((tuple(pair[0].flatten().tolist()), tuple(pair[1].flatten().tolist())))
            return window

    memory = Recording(MemoryConfig.preset(preset), model.config.num_layers)
    text = torch.randn(2, model.config.text_len, model.config.text_dim)
    with torch.no_grad():
        list(stream(model, text, 60, (2, 2), memory=memory, sampling=SamplingConfig(denoising_steps=(1000, 500))))
    assert len(seen) == len(distinct_positions)  # and different positions never share a key
