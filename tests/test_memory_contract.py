"""The cache window contract (cf.models.kv_cache), slot contents, the surprisal rule and the Table 3 ablations.

References are independent of `cf.memory`'s bookkeeping: a naive list simulation of the spec's slot rules (§C.3),
the keys/values captured at the cache interface on the call the spec names (§I.1), hand-made descriptors with known
cosines (§C.4), and the spec's own slot tables (§C.5).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from cf.memory import MemoryConfig, SimilarityKeyframes, SlowFastMemory
from cf.models.wan import CausalWanDiT, WanConfig
from cf.rollout import SamplingConfig, commit_chunk, denoise_chunk

N = 3  # frames per chunk
SINK, SLOW, FAST = 3, 12, 6
ALWAYS_C5_15 = [0, 1, 2, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 42, 43, 44, 45, 46, 47]
UNIFORM6_C5_19 = [0, 1, 2, 6, 12, 18, 24, 30, 36, 42, 48, 54, 12, 13, 14, 54, 55, 56, 57, 58, 59]


def naive_table(fires: list[bool], sink: int = SINK, slow: int = SLOW, fast: int = FAST, warmup: int = FAST
                ) -> tuple[list[int], int]:
    """The slot table after len(fires) chunks and the slow count, by the spec's rules written as list edits."""
    cap = sink + slow + fast
    table: list[int] = []
    count = 0
    for k, fire in enumerate(fires):
        s = k * N
        if fire and s >= warmup:
            if count < slow:
                table[sink + count] = s  # overwrites whatever sequential frame sat there (§C.6 property 1)
                count += 1
            else:
                table[sink : sink + slow] = table[sink + 1 : sink + slow] + [s]
        chunk = list(range(s, s + N))
        table = table[: sink + slow] + table[sink + slow + N :] + chunk if len(table) + N > cap else table + chunk
    return table, count


class PerSampleSchedule:
    """Fires for sample b on chunk k when schedule[b](k); ignores descriptors."""

    def __init__(self, *schedules):
        self.schedules = schedules

    def decide(self, start_frame, chunk_index, descriptor, reference):
        return torch.tensor([bool(s(chunk_index)) for s in self.schedules])


class Recorder:
    """Wraps a SlowFastMemory: records every call's inputs and returned windows, and checks that no window changes
    between the `update` that returned it and `end_call` (the contract)."""

    def __init__(self, memory: SlowFastMemory):
        self.memory = memory
        self.calls: list[dict] = []

    def begin_call(self, start_frame, num_frames, commit=False):
        self.calls.append({"start": start_frame, "commit": commit, "keys": {}, "values": {}, "windows": {},
                           "views": {}})
        self.memory.begin_call(start_frame, num_frames, commit)

    def update(self, layer, keys, values):
        call = self.calls[-1]
        call["keys"][layer], call["values"][layer] = keys.clone(), values.clone()
        window = self.memory.update(layer, keys, values)
        call["views"][layer] = window
        call["windows"][layer] = tuple(t.clone() for t in (window.keys, window.values, window.key_positions,
                                                             window.query_positions))
        return window

    def end_call(self):
        for layer, window in self.calls[-1]["views"].items():
            assert torch.equal(window.keys, self.calls[-1]["windows"][layer][0]), "window keys changed mid-call"
            assert torch.equal(window.values, self.calls[-1]["windows"][layer][1]), "window values changed mid-call"
        self.calls[-1]["views"] = {}
        self.memory.end_call()


def run_video(memory: SlowFastMemory, num_frames: int, batch: int = 2, seed: int = 0, after_chunk=None):
    torch.manual_seed(seed)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=N).eval()
    recorder = Recorder(memory)
    text_kv = model.text_kv(torch.randn(batch, 8, 32))
    timesteps = SamplingConfig().timesteps()
    with torch.no_grad():
        for start in range(0, num_frames, N):
            x0 = denoise_chunk(model, torch.randn(batch, 4, N, 4, 4), text_kv, recorder, start, timesteps)
            commit_chunk(model, x0, text_kv, recorder, start)
            if after_chunk is not None:
                after_chunk(start, recorder)
    return model, recorder


def descriptor(keys: torch.Tensor) -> torch.Tensor:
    """Mean un-rotated key of a chunk: [B, n*S, H, D] -> [B, H*D] (§C.3 step 2)."""
    return keys.float().mean(dim=1).flatten(1)


# ------------------------------------------------------------------------------------------------ the contract
@pytest.mark.parametrize("source", ["commit_pass", "first_firing_call"])
def test_every_call_on_a_chunk_reads_the_same_context(source):
    """Denoising calls and the commit pass of one chunk attend to identical context on every layer (B = 2,
    per-sample decisions), through the fill phase, the fast rolls and the slow rolls."""
    cfg = MemoryConfig(consolidation_source=source)
    policy = PerSampleSchedule(lambda k: True, lambda k: k % 3 != 1)
    memory = SlowFastMemory(cfg, 2, policy)
    _, recorder = run_video(memory, 66)
    by_chunk = defaultdict(list)
    for call in recorder.calls:
        by_chunk[call["start"]].append(call)
    assert len(by_chunk) == 22 and all(len(calls) == 5 for calls in by_chunk.values())
    assert memory.slot_frames(0, 0) != memory.slot_frames(0, 1)  # the samples' memories differ
    for start, calls in by_chunk.items():
        for layer in range(2):
            first = calls[0]["windows"][layer]
            for call in calls[1:]:
                for a, b in zip(first, call["windows"][layer]):
                    assert torch.equal(a, b), (source, start, layer)


@pytest.mark.parametrize("source", ["commit_pass", "first_firing_call"])
def test_slot_contents_are_the_keys_of_the_call_the_spec_names(source):
    """After every chunk each slot holds the K/V captured for its source frame: the commit pass for sequential
    frames and (default) for keyframe copies; the first firing call for keyframe copies in released mode (§I.1)."""
    cfg = MemoryConfig(consolidation_source=source)
    schedules = (lambda k: True, lambda k: k % 3 != 1)
    memory = SlowFastMemory(cfg, 2, PerSampleSchedule(*schedules))
    commit_kv: dict = {}
    first_kv: dict = {}
    checked = []

    def check(start: int, recorder: Recorder) -> None:
        calls = [c for c in recorder.calls if c["start"] == start]
        for layer in range(2):
            for name, store, call in (("commit", commit_kv, calls[-1]), ("first", first_kv, calls[0])):
                k = call["keys"][layer].unflatten(1, (N, -1))
                v = call["values"][layer].unflatten(1, (N, -1))
                for i in range(N):
                    store[(layer, start + i)] = (k[:, i], v[:, i])
        chunks = start // N + 1
        for b, schedule in enumerate(schedules):
            table, count = naive_table([schedule(k) for k in range(chunks)])
            for layer in range(2):
                state = memory.layers[layer]
                assert memory.slot_frames(layer, b)[: len(table)] == table
                for slot, frame in enumerate(table):
                    keyframe_copy = SINK <= slot < SINK + count
                    store = first_kv if keyframe_copy and source == "first_firing_call" else commit_kv
                    k, v = store[(layer, frame)]
                    assert torch.equal(state.keys[b, slot], k[b]), (source, start, layer, b, slot, frame)
                    assert torch.equal(state.values[b, slot], v[b]), (source, start, layer, b, slot, frame)
        checked.append(start)

    run_video(memory, 66, after_chunk=check)
    assert len(checked) == 22
    # the two sources really store different keys for a keyframe copy (noisy first call vs clean commit pass)
    layer0 = memory.layers[0]
    assert not torch.equal(first_kv[(0, 60)][0][0], commit_kv[(0, 60)][0][0])
    assert memory.slot_frames(0, 0)[SINK + SLOW - 1] == 63 and layer0.keys.shape[1] == 21


# ------------------------------------------------------------------------------------------- the surprisal rule
def test_similarity_direction_per_sample_and_batch_mean():
    ref = torch.zeros(2, 4)
    ref[:, 0] = 1.0

    def at_cosine(*cosines):
        d = torch.zeros(len(cosines), 4)
        for b, c in enumerate(cosines):
            d[b, 0], d[b, 1] = c, (1 - c * c) ** 0.5
        return 3.0 * d  # the scale does not matter

    rule = SimilarityKeyframes(threshold=0.95)
    assert rule.decide(6, 2, at_cosine(0.9, 0.99), ref).tolist() == [True, False]  # consolidate when sim < τ
    assert rule.decide(6, 2, at_cosine(0.95, 0.96), ref).tolist() == [False, False]
    assert rule.decide(6, 2, at_cosine(0.5, 0.5), None).tolist() == [True, True]  # no reference yet
    batch_mean = SimilarityKeyframes(threshold=0.95, per_sample=False)
    assert batch_mean.decide(6, 2, at_cosine(0.9, 0.98), ref).tolist() == [True, True]  # mean 0.94
    assert batch_mean.decide(6, 2, at_cosine(0.9, 1.0), ref).tolist() == [False, False]  # mean 0.95
    strided = SimilarityKeyframes(threshold=0.95, stride_chunks=2)
    assert strided.decide(9, 3, at_cosine(0.1, 0.1), ref).tolist() == [False, False]  # not a candidate
    assert strided.decide(12, 4, at_cosine(0.1, 0.1), ref).tolist() == [True, True]


class Spy:
    """Records the arguments of every decision of the wrapped rule."""

    def __init__(self, rule):
        self.rule, self.seen, self.memory = rule, [], None

    def decide(self, start_frame, chunk_index, descriptor, reference):
        call = None if self.memory is None else self.memory.calls  # index of the call being made
        self.seen.append((start_frame, descriptor.clone(), None if reference is None else reference.clone(), call))
        return self.rule.decide(start_frame, chunk_index, descriptor, reference)


def test_default_rule_compares_commit_descriptors_of_consecutive_chunks():
    """Default: decided on the commit pass, on the mean un-rotated key of the chunk per layer, against the previous
    chunk's commit descriptor (Eq. 7); warm-up chunks take no decision but leave their descriptor."""
    spy = Spy(SimilarityKeyframes(threshold=0.95, stride_chunks=1))
    memory = SlowFastMemory(MemoryConfig(consolidation_stride_chunks=1), 2, spy)
    _, recorder = run_video(memory, 30)
    commits = {c["start"]: c for c in recorder.calls if c["commit"]}
    starts = [s for s, _, _, _ in spy.seen]
    assert starts == [s for s in range(6, 30, 3) for _ in range(2)]  # once per layer per chunk, after warm-up
    for i, (start, desc, ref, _) in enumerate(spy.seen):
        layer = i % 2
        torch.testing.assert_close(desc, descriptor(commits[start]["keys"][layer]))
        torch.testing.assert_close(ref, descriptor(commits[start - 3]["keys"][layer]))


def test_released_rule_compares_with_the_previous_call():
    """Released mode: decided on every call until the chunk consolidates, against the previous call's descriptor
    (the same chunk's previous step, or the previous chunk's commit pass) of the same layer (§I.2)."""
    spy = Spy(SimilarityKeyframes(threshold=0.95, per_sample=False))
    memory = SlowFastMemory(MemoryConfig.released_code(), 2, spy)
    spy.memory = memory
    _, recorder = run_video(memory, 21, batch=1)
    assert len(spy.seen) >= 2 * 5  # at least the first call of chunks 2-6 on both layers
    for start, desc, ref, call_index in spy.seen:
        call, before = recorder.calls[call_index], recorder.calls[call_index - 1]
        assert call["start"] == start
        layer = next(l for l in range(2) if torch.allclose(descriptor(call["keys"][l]), desc))
        torch.testing.assert_close(ref, descriptor(before["keys"][layer]))


def test_stride_gates_only_the_similarity_rule_and_warmup_still_stores_the_reference():
    always_dissimilar = 1.1  # cosine is never >= 1.1: every candidate consolidates
    spy = Spy(SimilarityKeyframes(threshold=always_dissimilar, stride_chunks=2))
    memory = SlowFastMemory(MemoryConfig(), 2, spy)
    _, recorder = run_video(memory, 60, batch=1)
    fires = [k % 2 == 0 for k in range(20)]
    assert memory.slot_frames(0) == naive_table(fires)[0] == UNIFORM6_C5_19
    assert spy.seen[0][2] is not None  # the first candidate (chunk 2) compares with chunk 1's descriptor
    commits = {c["start"]: c for c in recorder.calls if c["commit"]}
    torch.testing.assert_close(spy.seen[0][2], descriptor(commits[3]["keys"][0]))


# ---------------------------------------------------------------------------------------------- per-layer memories
def test_consensus_table_is_the_per_slot_majority_over_layers():
    class SignOfFirstKey:  # layer-dependent: each layer decides on its own keys
        def decide(self, start_frame, chunk_index, descriptor, reference):
            return descriptor[:, 0].cpu() > 0

    cfg = MemoryConfig(consolidation_stride_chunks=1)
    memory = SlowFastMemory(cfg, 3, SignOfFirstKey())
    torch.manual_seed(3)
    model = CausalWanDiT(WanConfig(**{**WanConfig.tiny().__dict__, "num_layers": 3}), frames_per_chunk=N).eval()
    text_kv = model.text_kv(torch.randn(1, 8, 32))
    with torch.no_grad():
        for start in range(0, 60, N):
            x0 = denoise_chunk(model, torch.randn(1, 4, N, 4, 4), text_kv, memory, start,
                               SamplingConfig().timesteps())
            commit_chunk(model, x0, text_kv, memory, start)
    tables = [memory.slot_frames(layer) for layer in range(3)]
    assert len({tuple(t) for t in tables}) > 1, "layers should disagree for this check to mean anything"
    expected = []
    for held in zip(*tables):
        best = sorted(set(held), key=lambda f: (-held.count(f), -f))[0]
        expected.append(best)
    assert memory.consensus_slot_frames(0) == expected


# --------------------------------------------------------------------------------------------- Table 3 ablations
@pytest.mark.parametrize("preset, chunk, table", [
    ("uniform_every_chunk", 15, ALWAYS_C5_15),
    ("uniform_every_2_chunks", 19, UNIFORM6_C5_19),
])
def test_uniform_ablations_do_what_their_names_say(preset, chunk, table):
    cfg = MemoryConfig.preset(preset)
    assert cfg.consolidation_stride_chunks == 2  # the similarity stride must not gate the uniform rule
    memory = SlowFastMemory(cfg, 2)
    tables = []
    run_video(memory, 3 * (chunk + 1), batch=1, after_chunk=lambda s, r: tables.append(memory.slot_frames(1)))
    assert tables[chunk] == table


def test_no_bounded_pe_keeps_the_slow_memory_with_absolute_positions():
    spy_tables = []
    memory = SlowFastMemory(MemoryConfig.preset("no_bounded_pe"), 2, PerSampleSchedule(lambda k: True))
    _, recorder = run_video(memory, 48, batch=1, after_chunk=lambda s, r: spy_tables.append(memory.slot_frames(0)))
    assert spy_tables[-1] == naive_table([True] * 16)[0]  # the slow memory is there
    last = recorder.calls[-1]["windows"][0]  # read before the last chunk's own consolidation applies
    context_frames = naive_table([True] * 15 + [False])[0][:-N]
    assert last[2][0].tolist() == context_frames  # keys at their source frame's absolute position
    assert last[3][0].tolist() == [45, 46, 47]
    assert max(context_frames) > 20  # beyond what bounded positions allow


def test_ablation_configs_compose_with_both_stage2_configs():
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    for scale in ("toy", "wan1.3b"):
        base = OmegaConf.load(root / f"configs/{scale}/student_stage2.yaml")
        for name in ("uniform_every_chunk", "uniform_every_2_chunks", "no_bounded_pe", "no_contextual_dmd"):
            merged = OmegaConf.merge(base, OmegaConf.load(root / f"configs/ablations/{name}.yaml"))
            args = OmegaConf.to_container(merged.model.init_args, resolve=False)
            memory = MemoryConfig(**args["memory"])
            reference = MemoryConfig(**OmegaConf.to_container(base.model.init_args.memory))
            if name == "no_contextual_dmd":
                window = args["window"]
                assert memory == reference and not window["context_teacher"] and window["context_frames"] == 0
            elif name == "no_bounded_pe":
                assert memory.position_mode == "absolute" and memory.slow == reference.slow > 0
            else:
                assert memory.keyframes == "uniform" and memory.slow == reference.slow
                assert memory.keyframe_interval_frames == (3 if name == "uniform_every_chunk" else 6)
            assert "ablations" in args["export_path"]  # never overwrites the main run's export
