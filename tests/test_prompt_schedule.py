"""Prompt schedules: `stream()` switching its text conditioning at a chunk boundary, re-caching the memory under the
new prompt (`cf.recache`), and the `--prompt-schedule` formats of `cf generate`."""

import json
import re
from dataclasses import replace

import pytest
import torch

from cf.cli import main
from cf.memory import MemoryConfig, SlowFastMemory
from cf.models.kv_cache import GrowingKVCache
from cf.models.wan import CausalWanDiT, WanConfig
from cf.prompt_schedule import PromptSchedule, PromptSegment, latent_frames_for, parse_prompt_schedule
from cf.recache import parse_regions, recache_memory, region_slots, replay_groups
from cf.rollout import SamplingConfig, commit_chunk, denoise_chunk, draw_noise, make_memory, stream
from cf.video_io import probe_mp4

SIZE = (4, 4)
SAMPLING = SamplingConfig(denoising_steps=(1000, 500))  # two steps: fast, and still re-noises between them


def tiny_model(num_layers: int = 2, seed: int = 0) -> CausalWanDiT:
    torch.manual_seed(seed)
    return CausalWanDiT(replace(WanConfig.tiny(), num_layers=num_layers), frames_per_chunk=3).eval()


def texts(model: CausalWanDiT, batch: int = 2, count: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    return [torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g) for _ in range(count)]


def run(model, text, frames, **kwargs) -> list[torch.Tensor]:
    return list(stream(model, text, frames, SIZE, sampling=SAMPLING, seed=3, **kwargs))


# ------------------------------------------------------------------------------------------------ stream switching
@pytest.mark.parametrize("memory", ["slow_fast", "sliding"])
def test_a_one_prompt_schedule_is_todays_stream_bit_for_bit(memory):
    model = tiny_model()
    (text,) = texts(model, count=1)
    plain = run(model, text, 24, memory=memory)
    for kwargs in ({"text_schedule": []}, {"text_schedule": [(0, text.clone())]},
                   {"text_schedule": [(0, text.clone())], "recache": "all"}):
        scheduled = run(model, text, 24, memory=memory, **kwargs)
        assert len(scheduled) == len(plain) == 8
        assert all(torch.equal(a, b) for a, b in zip(plain, scheduled)), kwargs


def test_a_switch_conditions_the_chunks_from_the_switch_on_and_never_before():
    model = tiny_model()
    first, second = texts(model)
    one = run(model, first, 24)
    switched = run(model, first, 24, text_schedule=[(9, second)])
    assert all(torch.equal(a, b) for a, b in zip(one[:3], switched[:3]))  # chunks 0-2: the first prompt's, exactly
    assert not torch.equal(one[3], switched[3])  # the switch chunk
    assert all(not torch.equal(a, b) for a, b in zip(one[3:], switched[3:]))

    # against a naive re-implementation from the primitives: the second prompt's text K/V from frame 9 on
    cache = make_memory(model, "slow_fast")
    g = torch.Generator().manual_seed(3)
    kv = [model.text_kv(first), model.text_kv(second)]
    steps = SAMPLING.timesteps()
    for chunk, start in enumerate(range(0, 24, 3)):
        text_kv = kv[start >= 9]
        noise = draw_noise((2, 4, 3, *SIZE), g, "cpu", torch.float32)
        x0 = denoise_chunk(model, noise, text_kv, cache, start, steps, g)
        commit_chunk(model, x0, text_kv, cache, start)
        assert torch.equal(x0, switched[chunk]), chunk


def test_an_endless_stream_asking_a_callable_schedule_equals_the_listed_schedule():
    model = tiny_model()
    first, second = texts(model)
    listed = run(model, first, 24, text_schedule=[(9, second)], recache="fast")
    asked = []

    def schedule(start):
        asked.append(start)
        return second if start == 9 else None

    endless = stream(model, first, None, SIZE, sampling=SAMPLING, seed=3, text_schedule=schedule, recache="fast")
    chunks = [next(endless) for _ in range(8)]
    assert asked == list(range(0, 24, 3))  # asked once per chunk, before generating it
    assert all(torch.equal(a, b) for a, b in zip(listed, chunks))


def test_the_text_kv_is_computed_once_per_prompt():
    model = tiny_model()
    first, second, third = texts(model, count=3)
    calls = []
    original = model.text_kv
    model.text_kv = lambda text: calls.append(text) or original(text)
    run(model, first, 24, text_schedule=[(6, second), (15, third)])
    assert len(calls) == 3 and torch.equal(calls[1], second) and torch.equal(calls[2], third)


@pytest.mark.parametrize("schedule, message", [
    ([(4, "second")], r"increasing multiples of frames_per_chunk \(3\) below num_frames \(24\)"),
    ([(9, "second"), (9, "second")], r"increasing multiples"),
    ([(24, "second")], r"below num_frames"),
    ([(9, "short")], r"the text at frame 9 has shape \(1, 8, 32\); it must match"),
])
def test_bad_switches_are_refused(schedule, message):
    model = tiny_model()
    first, second = texts(model)
    named = {"second": second, "short": second[:1]}
    with pytest.raises(ValueError, match=message):
        run(model, first, 24, text_schedule=[(s, named[t]) for s, t in schedule])
    with pytest.raises(ValueError, match=r"re-caching fast needs the Slow-Fast Memory, not GrowingKVCache"):
        run(model, first, 24, memory=GrowingKVCache(2), text_schedule=[(9, second)], recache="fast")


# ---------------------------------------------------------------------------------------------------- re-caching
def filled_memory(model, text, frames=30, keyframes=None, config=None):
    """A Slow-Fast Memory after `frames` frames of `text`, and the clean latents of every frame."""
    memory = SlowFastMemory(config or MemoryConfig.uniform_every_chunk(), model.config.num_layers, keyframes)
    chunks = run(model, text, frames, memory=memory)
    video = torch.cat(chunks, dim=2)
    return memory, {f: video[:, :, f] for f in range(frames)}


def snapshot(memory):
    return [(s.keys.clone(), s.values.clone()) for s in memory.layers]


def reference_recache(model, memory, before, latents, text_kv, groups):
    """Naive re-cache: each group's frames through a `GrowingKVCache` holding (a copy of) the slots before it; its
    absolute positions are the slot indices, which is what a full bounded memory with rope_length = capacity gives.
    Returns per-layer keys/values [B, slots, S, H, D]."""
    keys = [k.clone() for k, _ in before]
    values = [v.clone() for _, v in before]
    tables = [[list(lay.frames) for lay in state.layouts] for state in memory.layers]
    for group in groups:
        a, k = group.start, len(group)
        variants = {}
        for layer, per_sample in enumerate(tables):
            variants.setdefault(tuple(tuple(t[a : a + k]) for t in per_sample), []).append(layer)
        for frames, layers in variants.items():
            growing = GrowingKVCache(len(keys))
            growing.keys = [kk[:, :a].flatten(1, 2) for kk in keys]
            growing.values = [vv[:, :a].flatten(1, 2) for vv in values]
            growing.num_frames = a
            tokens = keys[0].shape[2]
            x = torch.stack([torch.stack([latents[f][b] for f in s], dim=1) for b, s in enumerate(frames)])
            model.forward_chunk(x, torch.zeros(x.shape[0]), text_kv, growing, a, commit=True)
            for layer in layers:
                own = slice(a * tokens, (a + k) * tokens)
                keys[layer][:, a : a + k] = growing.keys[layer][:, own].unflatten(1, (k, tokens))
                values[layer][:, a : a + k] = growing.values[layer][:, own].unflatten(1, (k, tokens))
    return keys, values


@pytest.mark.parametrize("regions", ["none", "sink", "slow", "fast", "slow+fast", "all"])
def test_recache_rewrites_exactly_the_chosen_slots(regions):
    model = tiny_model(num_layers=3)
    first, second = texts(model)
    memory, latents = filled_memory(model, first)
    tables = [memory.slot_frames(layer) for layer in range(3)]
    assert memory.layers[0].layouts[0].length == 21  # full
    slots = region_slots(memory)
    assert (slots["sink"], slots["slow"], slots["fast"]) == (range(0, 3), range(3, 15), range(15, 21))
    before = snapshot(memory)
    text_kv = model.text_kv(second)
    with torch.no_grad():
        groups = recache_memory(model, memory, latents, text_kv, regions)
    chosen = {s for r in parse_regions(regions) for s in slots[r]}
    assert {s for g in groups for s in g} == chosen
    assert [memory.slot_frames(layer) for layer in range(3)] == tables  # the slot table is unchanged
    with torch.no_grad():
        ref_k, ref_v = reference_recache(model, memory, before, latents, text_kv, groups)
    for layer, (state, (k0, v0)) in enumerate(zip(memory.layers, before)):
        for s in range(21):
            if s in chosen:
                torch.testing.assert_close(state.keys[:, s], ref_k[layer][:, s], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(state.values[:, s], ref_v[layer][:, s], rtol=1e-5, atol=1e-6)
                if layer > 0:  # layer 0's keys/values come before any cross-attention: the text cannot change them
                    assert not torch.equal(state.keys[:, s], k0[:, s]), (layer, s)
            else:
                assert torch.equal(state.keys[:, s], k0[:, s]) and torch.equal(state.values[:, s], v0[:, s])


def test_recache_groups_follow_chunks_and_the_sink_under_the_same_prompt_is_unchanged():
    model = tiny_model()
    first, _ = texts(model)
    memory, latents = filled_memory(model, first)
    # keyframes 6 ... 27 in slots 3-10, then frames 11-14 left there before the memory filled (§C.6)
    assert memory.slot_frames() == [0, 1, 2, 6, 9, 12, 15, 18, 21, 24, 27, 11, 12, 13, 14, 24, 25, 26, 27, 28, 29]
    groups = replay_groups(memory, ("sink", "slow", "fast"))
    assert groups == [range(0, 3)] + [range(s, s + 1) for s in range(3, 12)] + [range(12, 15), range(15, 18),
                                                                                 range(18, 21)]
    before = snapshot(memory)
    with torch.no_grad():  # the sink's chunk saw nothing but itself when committed: same prompt, same K/V
        recache_memory(model, memory, latents, model.text_kv(first), "sink")
    for state, (k0, v0) in zip(memory.layers, before):
        torch.testing.assert_close(state.keys, k0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.values, v0, rtol=1e-5, atol=1e-6)


class LayerZeroOnly:
    """Keyframes for layer 0 only (layers decide in order, once per commit): the layers' slow memories differ."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers, self.calls = num_layers, 0

    def decide(self, start_frame, chunk_index, descriptor, reference):
        layer, self.calls = self.calls % self.num_layers, self.calls + 1
        return torch.full((descriptor.shape[0],), layer == 0)


def test_layers_holding_different_frames_are_each_recached_with_their_own():
    model = tiny_model(num_layers=3)
    first, second = texts(model)
    memory, latents = filled_memory(model, first, keyframes=LayerZeroOnly(3), config=MemoryConfig())
    assert memory.slot_frames(0)[3:15] != memory.slot_frames(1)[3:15]
    assert memory.slot_frames(1) == memory.slot_frames(2)
    before = snapshot(memory)
    text_kv = model.text_kv(second)
    with torch.no_grad():
        groups = recache_memory(model, memory, latents, text_kv, "all")
        ref_k, ref_v = reference_recache(model, memory, before, latents, text_kv, groups)
    for layer, state in enumerate(memory.layers):
        torch.testing.assert_close(state.keys[:, :21], ref_k[layer][:, :21], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.values[:, :21], ref_v[layer][:, :21], rtol=1e-5, atol=1e-6)


def test_recache_before_the_memory_is_full_and_at_the_switch_of_a_stream():
    model = tiny_model()
    first, second = texts(model)
    memory, latents = filled_memory(model, first, frames=9)
    slots = region_slots(memory)
    assert (slots["sink"], slots["slow"], slots["fast"]) == (range(0, 3), range(3, 3), range(3, 9))
    plain = run(model, first, 24, text_schedule=[(6, second)])
    recached = run(model, first, 24, text_schedule=[(6, second)], recache="fast")
    assert all(torch.equal(a, b) for a, b in zip(plain[:2], recached[:2]))
    assert not torch.equal(plain[2], recached[2])


def test_region_names():
    assert parse_regions("none") == parse_regions(None) == parse_regions("") == ()
    assert parse_regions("all") == ("sink", "slow", "fast")
    assert parse_regions("fast+sink") == parse_regions(["sink", "fast"]) == parse_regions("sink,fast") == \
        ("sink", "fast")
    with pytest.raises(ValueError, match=r"unknown memory region\(s\) 'recent' to re-cache; choose none, all"):
        parse_regions("recent")


# ---------------------------------------------------------------------------------------------- schedule formats
def test_inline_and_jsonl_schedules_parse_to_the_same_segments(tmp_path):
    inline = parse_prompt_schedule("a red circle[10s] | a blue square [20] |a [x] cat[2.5s]")
    expected = (PromptSegment("a red circle", 10.0), PromptSegment("a blue square", 20.0),
                PromptSegment("a [x] cat", 2.5))
    assert inline.segments == expected and inline.seconds == 32.5
    path = tmp_path / "schedule.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": s.prompt, "seconds": s.seconds}) for s in expected) + "\n\n")
    assert parse_prompt_schedule(str(path)) == inline
    assert inline.describe() == "a red circle[10s] | a blue square[20s] | a [x] cat[2.5s]"
    assert parse_prompt_schedule(inline.describe()) == inline
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "c.json").write_text("{}")
    path.write_text('{"prompt": "a", "seconds": 1, "ground_truth": "clips/c.json"}\n')
    assert parse_prompt_schedule(str(path)).segments[0].ground_truth == str((tmp_path / "clips" / "c.json").resolve())


def test_switch_frames_are_the_first_chunk_boundary_at_or_after_the_switch_time():
    schedule = parse_prompt_schedule("a[10s] | b[20s] | c[0.75s]")
    # 10 s at 16 fps is pixel frame 160, in latent 40 (pixels 157-160): the next chunk boundary is latent 42;
    # 30 s is pixel 480, in latent 120: boundary 123; 30.75 s is pixel 492, in latent 123: the video has 126
    assert schedule.start_frames(16, 3) == [0, 42, 123]
    assert schedule.num_frames(16, 3) == latent_frames_for(30.75, 16, 3) == 126
    with pytest.raises(ValueError, match=r'segment 2 \("b", 0.1 s\) is shorter than one chunk \(0.75 s\) at its '
                                         r"place in the video; lengthen it or merge it"):
        parse_prompt_schedule("a[1s] | b[0.1s] | c[2s]").start_frames(16, 3)
    assert PromptSchedule.single("x", 3).start_frames(16, 3) == [0]


@pytest.mark.parametrize("value, message", [
    ("a red circle | b[2s]", r'segment 1 \("a red circle"\) has no duration; end it with one in brackets, e\.g\. '
                             r"a red circle\[10s\]"),
    ("a[10s] | ", r"segment 2 is empty; write segments as"),
    ("a[ten]", r"segment 1 \(\"a\"\) has duration \[ten\]; write a positive number of seconds"),
    ("a[0s]", r"has duration \[0s\]; write a positive number"),
    ("[3s]", r"segment 1 \(\[3s\]\) has no prompt"),
    ("{dir}/missing.jsonl", r"prompt schedule file \S+missing\.jsonl not found; pass an existing JSONL file"),
    ("{dir}/notjson.jsonl", r"notjson\.jsonl line 2 is not JSON \(Expecting value\); write one object per line"),
    ("{dir}/noseconds.jsonl", r'noseconds\.jsonl line 1 has no "seconds"; give every segment its duration'),
    ("{dir}/badseconds.jsonl", r'badseconds\.jsonl line 1: "seconds" must be a positive number, got -2'),
    ("{dir}/extra.jsonl", r"extra\.jsonl line 1 has unknown key\(s\) 'secs'; only \"prompt\", \"seconds\" and "
                          r"\"ground_truth\" are read"),
    ("{dir}/truth.jsonl", r'truth\.jsonl line 1: "ground_truth" must name an existing json file'),
    ("{dir}/empty.jsonl", r"empty\.jsonl holds no segments"),
])
def test_schedule_errors_are_one_line_naming_the_fix(tmp_path, value, message):
    (tmp_path / "notjson.jsonl").write_text('{"prompt": "a", "seconds": 1}\nnot json\n')
    (tmp_path / "noseconds.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "badseconds.jsonl").write_text('{"prompt": "a", "seconds": -2}\n')
    (tmp_path / "extra.jsonl").write_text('{"prompt": "a", "secs": 2}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "truth.jsonl").write_text('{"prompt": "a", "seconds": 1, "ground_truth": "nowhere.json"}\n')
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        parse_prompt_schedule(value.format(dir=tmp_path))
    assert re.search(message, str(err.value)) and "\n" not in str(err.value), str(err.value)


def test_generate_cli_makes_one_video_from_a_schedule(tmp_path):
    out = tmp_path / "videos"
    main(["generate", "--prompt-schedule", "a red circle[1s] | a blue square[1s]", "--recache", "fast", "--out",
          str(out), "--device", "cpu"])
    assert sorted(p.name for p in out.iterdir()) == ["000_a_red_circle.mp4", "000_a_red_circle.segments.json",
                                                     "000_a_red_circle.txt"]
    assert (out / "000_a_red_circle.txt").read_text() == "a red circle[1s] | a blue square[1s]\n"
    assert probe_mp4(out / "000_a_red_circle.mp4").num_frames == 1 + 4 * (latent_frames_for(2, 16, 3) - 1)


@pytest.mark.parametrize("arguments, message", [
    (["--prompt-schedule", "a[1s] | b"], r'prompt schedule segment 2 \("b"\) has no duration'),
    (["--prompt-schedule", "a[1s]", "--prompt", "x"], r"--prompt-schedule makes one video from its own prompts; "
                                                       r"drop --prompt / --prompts"),
    (["--prompt-schedule", "a[1s]", "--seconds", "3"], r"--prompt-schedule sets the video's length \(the sum of "
                                                        r"its durations, 1 s\); drop --seconds"),
    (["--prompt", "x", "--recache", "fast"], r"--recache acts at prompt switches; pass a --prompt-schedule"),
    (["--prompt-schedule", "a[1s]|b[1s]", "--recache", "recent"], r"unknown memory region\(s\) 'recent'"),
    (["--prompt-schedule", "a[1s]|b[0.1s]|c[1s]"], r"prompt schedule segment 2 \(\"b\", 0\.1 s\) is shorter than "
                                                    r"one chunk"),
])
def test_generate_cli_schedule_errors_are_one_line(tmp_path, arguments, message):
    out = tmp_path / "videos"
    with pytest.raises(SystemExit) as stopped:
        main(["generate", "--out", str(out), "--device", "cpu", *arguments])
    text = str(stopped.value.code)
    assert re.match(r"^cf generate: " + message, text) and "\n" not in text, text
    assert not out.exists()
