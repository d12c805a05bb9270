"""`bench/gpu_suite.py`: its FLOP/byte model against hand counts and torch's FLOP counter, its CPU dry run (every
section, table and JSON), and its real path on a GPU when there is one."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.run_if import RunIf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cf.memory import MemoryConfig
from cf.models.attention import block_causal_mask
from cf.models.kv_cache import GrowingKVCache
from cf.models.wan import CausalWanDiT, WanConfig, WanDiT, count_parameters
from cf.rollout import RolloutConfig, make_memory, stream, train_rollout

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
fm = importlib.import_module("flop_model")

# dim 8, 2 heads of 4, FFN 16, one layer, 4 latent channels, 2 text tokens of 4: small enough to count by hand
HAND = WanConfig(dim=8, ffn_dim=16, freq_dim=4, text_dim=4, text_len=2, in_dim=4, out_dim=4, num_heads=2,
                 num_layers=1)


# ---------------------------------------------------------------------------------------------------- FLOP model
def test_dit_call_matches_a_hand_count():
    """One 1-frame chunk of 2 tokens (2 x 4 latents, 2 x 2 patches) attending to 2 cached frames + itself."""
    shape = fm.DiTShape.of(HAND)
    patch = 2 * 2 * (4 * 4) * 8  # 2 tokens x (4 channels x 2 x 2 patch) x dim 8
    time = 2 * (4 * 8 + 8 * 8 + 8 * 48)  # sinusoid 4 -> 8 -> 8, projection 8 -> 48, one timestep row
    projections = 12 * 2 * 8 * 8  # q, k, v, o and the cross-attention's q, o on 2 tokens
    ffn = 2 * (2 * 2 * 8 * 16)  # 8 -> 16 -> 8
    self_attention = 4 * 2 * 4 * (2 * 6)  # QK^T and PV: 2 heads x 4 dims x (2 queries x 6 keys)
    cross_attention = 4 * 2 * 2 * 8  # 2 queries x 2 text keys x dim 8
    head = 2 * 2 * 8 * (4 * 4)
    assert patch + time + projections + ffn + self_attention + cross_attention + head == 5056
    work = fm.dit_call_work(shape, frames=1, tokens_per_frame_=2, key_frames=3)
    assert work.flops == 5056
    parameters = 1904  # patch 136, text MLP 112, time 544, block 952, head 160
    assert fm.dit_parameters(shape) == count_parameters(WanDiT(HAND)) == parameters
    kv_bytes = 2 * 8 * (2 * 2 + 2 + 2) * 2  # keys and values of 2 cached frames, the chunk and the text, bf16
    assert work.bytes == 2 * parameters + kv_bytes


def test_dit_flops_match_torch_flop_counter():
    """The model's count equals FlopCounterMode on the real modules (math SDPA, so attention is counted too)."""
    torch.manual_seed(0)
    shape = fm.DiTShape.of(HAND)
    model = CausalWanDiT(HAND, frames_per_chunk=1).eval()
    cache = GrowingKVCache(HAND.num_layers)
    text = torch.randn(1, 2, 4)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        text_kv = model.text_kv(text)
        for start in range(4):
            with FlopCounterMode(display=False) as counter:
                model.forward_chunk(torch.randn(1, 4, 1, 2, 4), torch.tensor([500.0]), text_kv, cache, start)
            assert counter.get_total_flops() == fm.dit_call_work(shape, 1, 2, start + 1).flops
        with FlopCounterMode(display=False) as counter:
            WanDiT(HAND)(torch.randn(2, 4, 3, 2, 4), torch.tensor([500.0, 20.0]), torch.randn(2, 2, 4))
        assert counter.get_total_flops() == fm.dit_call_work(shape, 3, 2, 3, batch=2, text_kv=True).flops


def test_wan_chunk_is_the_issue_figure():
    """Wan2.1-1.3B at 480 x 832: a 3-frame chunk over a full slow-fast memory (18 cached + 3 own frames), 4 steps +
    the commit pass: about 202 TFLOP, 46.9 FPS of DiT at 790 TFLOP/s (issue 18)."""
    shape = fm.DiTShape.of(WanConfig.wan2_1_1_3b())
    assert fm.tokens_per_frame(shape, (60, 104)) == 1560
    tokens, keys, dim, ffn = 3 * 1560, 21 * 1560, 1536, 8960
    per_layer = 12 * tokens * dim ** 2 + 4 * tokens * dim * ffn + 4 * tokens * keys * dim + 4 * tokens * 512 * dim
    call = 30 * per_layer + 2 * tokens * 64 * dim + 2 * (256 * dim + dim ** 2 + 6 * dim ** 2) + 2 * tokens * dim * 64
    chunk = fm.stream_chunk_work(shape, 1560, context_frames=18)
    assert chunk.flops == 5 * call
    assert chunk.flops / 1e12 == pytest.approx(202.03, abs=0.01)
    assert 12 / chunk.floor_s() == pytest.approx(46.9, abs=0.05)  # compute-bound: 12 pixel frames per chunk
    with torch.device("meta"):
        assert fm.dit_parameters(shape) == count_parameters(WanDiT(WanConfig.wan2_1_1_3b())) == 1_418_996_800


def test_work_floor_is_the_slower_of_arithmetic_and_memory():
    assert fm.Work(2e12, 1e9).floor_s(1e12, 1e12) == 2.0
    assert fm.Work(1e9, 3e12).floor_s(1e12, 1e12) == 3.0
    assert (fm.Work(1, 2) + fm.Work(3, 4)) * 2 == fm.Work(8, 12)


@pytest.mark.parametrize("frames, tokens, chunk", [(6, 4, 3), (7, 3, 3), (21, 2, 3), (5, 5, 1)])
def test_block_causal_pairs_count_the_projects_mask(frames, tokens, chunk):
    assert fm.block_causal_pairs(frames, tokens, chunk) == int(block_causal_mask(frames, tokens, chunk).sum())


@pytest.mark.parametrize("preset", ["slow_fast", "sliding", "full"])
def test_chunk_context_follows_the_memory(preset):
    """The context the model assumes per chunk is the window each memory preset really returns."""
    model = CausalWanDiT(WanConfig.tiny()).eval()
    memory = make_memory(model, preset)
    seen = []
    update = memory.update

    def record(layer, keys, values):
        window = update(layer, keys, values)
        if layer == 0:
            seen.append(window.keys.shape[1] // 4)  # frames (4 x 4 latents: 4 tokens per frame)
        return window

    memory.update = record
    list(stream(model, torch.randn(1, 8, 32), 45, (4, 4), memory=memory))
    capacity = MemoryConfig.preset(preset).capacity
    calls_per_chunk = 5
    expected = [fm.chunk_context_frames(start, 3, capacity) for start in range(0, 45, 3)]
    assert seen[::calls_per_chunk] == expected


def test_rollout_calls_are_the_training_rollouts():
    """`rollout_calls` lists the DiT calls `train_rollout` makes: start, context and which ones record autograd."""
    torch.manual_seed(0)
    model = CausalWanDiT(WanConfig.tiny())
    step = fm.CdmdStep(rollout_frames=24, context_window=6, target_window=6, grad_window=6, capacity=21)
    memory = make_memory(model, "slow_fast")
    calls, windows = [], []
    forward_chunk, update = model.forward_chunk, memory.update

    def record_call(x, t, context, cache, start_frame, commit=False):
        calls.append((start_frame, torch.is_grad_enabled()))
        return forward_chunk(x, t, context, cache, start_frame, commit)

    def record_window(layer, keys, values):
        window = update(layer, keys, values)
        if layer == 0:
            windows.append(window.keys.shape[1] // 4)
        return window

    model.forward_chunk, memory.update = record_call, record_window
    text_kv = model.text_kv(torch.randn(1, 8, 32))
    train_rollout(model, text_kv, 24, (4, 4), 1, memory, exit_index=1, config=RolloutConfig(grad_window_frames=6))
    expected = fm.rollout_calls(step, exit_index=1, grad=True)
    assert [(start, context, grad) for (start, grad), context in zip(calls, windows)] == expected
    assert sum(grad for _, _, grad in expected) == 2  # the chunks at frames 18 and 21


def test_vae_count_on_meta_matches_counting_a_real_decode():
    """`count_vae` (meta device, first + per-latent model) against FlopCounterMode on real tensors."""
    from diffusers import AutoencoderKLWan

    from cf.encoders import WanVideoAutoencoder

    gpu_suite = importlib.import_module("gpu_suite")
    cost = fm.count_vae(gpu_suite.TINY_VAE, (2, 4))
    torch.manual_seed(0)
    decoder = WanVideoAutoencoder(AutoencoderKLWan(**gpu_suite.TINY_VAE)).stream_decoder()
    for start in (0, 3, 6):
        with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):  # count the mid attention
            decoder(torch.randn(1, 4, 3, 2, 4))
        assert counter.get_total_flops() == cost.decode_flops(3, start) > 0
    assert len(set(cost.latent_flops)) > 1  # the first latents differ: the causal cache fills
    assert cost.encode_frame > 0


def test_stage2_step_parts_and_state():
    shape = fm.DiTShape.of(WanConfig.wan2_1_1_3b())
    vae = fm.VaeCost(latent_flops=(1e12, 2e12), encode_frame=5e11, decoder_parameters=1)
    parts = fm.cdmd_step_work(shape, 1560, fm.CdmdStep(), vae)
    window = fm.dit_call_work(shape, 42, 1560, 42, text_kv=True)
    assert parts["critic_score"] == window
    assert parts["critic_train"] == window * 4  # forward, recompute, backward 2x
    assert parts["teacher_cfg"].flops == pytest.approx(2 * window.flops, rel=1e-3)  # batch 2 (CFG), shared weights
    assert parts["generator_window"].flops == 1e12 + 2e12 * (84 - 42) + 5e11  # decode 43 latents, encode 1 frame
    assert parts["generator_rollout"].flops > parts["critic_rollout"].flops  # backward through the grad window
    assert fm.cdmd_state_bytes(100, deepspeed=False) == 100 * (12 * 2 + 4 + 2)
    assert fm.cdmd_state_bytes(100, deepspeed=True) == 100 * (16 * 2 + 2)


# ------------------------------------------------------------------------------------------------------- dry run
def check_results(results: dict, table: str, mode: str) -> None:
    """Every section present; what ran is finite and correct; what cannot run here says why."""
    assert results["meta"]["sizes"] == mode
    for section in ("ceilings", "kernels", "streaming", "training"):
        assert results[section]["status"] == "ok", (section, results[section])
    assert results["ceilings"]["matmul_flops_per_s"] > 0 and results["ceilings"]["copy_bytes_per_s"] > 0
    kernels = results["kernels"]
    assert {(row["shape"], row["backend"]) for row in kernels["rows"]} >= {
        ("chunk", "sdpa_flash"), ("chunk", "sdpa_cudnn"), ("chunk", "sdpa_efficient"), ("chunk", "sdpa_math"),
        ("chunk", "flash_attn_2"), ("chunk", "flash_attn_3"), ("chunk", "auto"), ("block_causal", "flex"),
        ("teacher", "auto")}
    for row in kernels["rows"]:
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), row
        if row["status"] == "ok":
            assert row["check"] == "pass" and row["all_finite"], row
            assert 0 <= row["rel_error"] < kernels["tolerance"] and row["ms"] > 0 and row["floor_ms"] > 0, row
    assert set(kernels["attention_picks"]) == {"chunk", "block_causal", "teacher"}
    assert all(pick["picked"] != "unrecognised" for pick in kernels["attention_picks"].values())
    runs = results["streaming"]["runs"]
    compiled = set(results["meta"]["config"]["compiled_presets"])
    assert {(run["preset"], run["compiled"]) for run in runs} == {
        (preset, False) for preset in ("slow_fast", "sliding", "full")} | {(preset, True) for preset in compiled}
    assert "slow_fast" in compiled
    assert results["streaming"]["includes_decode"]
    for run in runs:
        assert run["status"] == "ok", run
        for key in ("pixel_fps", "first_chunk_latency_s", "chunk_ms_early", "chunk_ms_late", "peak_memory_mib",
                    "floor_fps", "floor_latency_s", "floor_chunk_ms_last"):
            assert math.isfinite(run[key]) and run[key] > 0, (key, run)
    breakdown = results["streaming"]["breakdown"]
    assert breakdown["status"] == "ok", breakdown
    for key in ("dit_chunk_ms_late", "dit_floor_ms", "decode_chunk_ms", "decode_floor_ms"):
        assert math.isfinite(breakdown[key]) and breakdown[key] > 0, (key, breakdown)
    for part in ("dit_top_ops", "decode_top_ops"):
        ops = breakdown[part]
        assert ops and all(op["ms"] > 0 and op["calls"] > 0 for op in ops), (part, ops)
        assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
    assert any("conv" in op["op"] for op in breakdown["decode_top_ops"])  # the VAE decoder is convolutions
    training = results["training"]
    assert training["step_s"] > 0 and training["peak_memory_gib"] > 0 and training["floor_s"] > 0
    assert math.isfinite(training["metrics"]["generator_loss"]) and math.isfinite(training["metrics"]["critic_loss"])
    assert training["metrics"]["generator_updates"] == training["metrics"]["critic_updates"] == 1
    assert training["step_model_from_logs"]  # the floor uses the step's logged rollout length and exit indices
    lines = table.splitlines()
    assert lines[0].startswith(f"GPU suite ({mode})")
    for header in ("ceilings:", "kernels:", "streaming (", "training:"):
        assert sum(line.startswith(header) for line in lines) == 1, header
    assert "attention() picks: chunk -> " in table
    assert "slow_fast chunk breakdown (eager, each part alone): DiT " in table


def test_dry_run_writes_every_section(tmp_path, capsys):
    """The CPU dry run: tiny model, VAE and shapes through every section (CUDA kernels reported as skipped)."""
    gpu_suite = importlib.import_module("gpu_suite")
    results = gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--train-strategy", "plain"])
    table = (tmp_path / "table.txt").read_text()
    assert capsys.readouterr().out.rstrip().endswith(table.rstrip())  # the table is printed last
    check_results(json.loads((tmp_path / "results.json").read_text()), table, "dry_run")
    skipped = {row["backend"]: row["status"] for row in results["kernels"]["rows"] if row["shape"] == "chunk"}
    assert skipped["sdpa_flash"] == skipped["flash_attn_2"] == "skipped: no CUDA"
    assert results["training"]["strategy"] == "plain PyTorch"


@pytest.mark.slow
@RunIf(deepspeed=True)
def test_dry_run_training_under_deepspeed(tmp_path):
    """The stage-2 step through `cf.strategies.DeepSpeedStrategy` (ZeRO-3, one CPU process)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--dry-run", "--out", str(tmp_path), "--sections",
                    "training", "--train-strategy", "deepspeed"], check=True, env=env, timeout=600,
                   capture_output=True)
    training = json.loads((tmp_path / "results.json").read_text())["training"]
    assert training["status"] == "ok", training
    assert training["strategy"].startswith("deepspeed")
    assert training["metrics"]["generator_updates"] == training["metrics"]["critic_updates"] == 1


@pytest.mark.gpu
@RunIf(min_cuda_gpus=1, diffusers=True)
def test_small_run_on_a_gpu(tmp_path):
    """The real path (CUDA kernels, bf16, inductor compile, CUDA memory) at tiny sizes."""
    subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--small", "--out", str(tmp_path)], check=True,
                   timeout=900)
    results = json.loads((tmp_path / "results.json").read_text())
    check_results(results, (tmp_path / "table.txt").read_text(), "small")
    ran = {row["backend"] for row in results["kernels"]["rows"] if row["status"] == "ok"}
    assert {"sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "auto"} <= ran
    assert results["streaming"]["runs"][0]["memory_kind"] == "cuda_max_allocated"


def test_top_operators_ranks_by_time_per_repeat():
    """The profiler summary: a function doing 3 large matrix products and one small addition per repeat reports
    the product first, with 3 calls per repeat."""
    from suite_streaming import top_operators

    a = torch.randn(256, 256)

    def work() -> None:
        for _ in range(2):  # two repeats
            for _ in range(3):
                a @ a
            a[:2, :2] + 1

    ops = top_operators(work, torch.device("cpu"), per=2)
    assert ops[0]["op"] in ("aten::mm", "aten::matmul") and ops[0]["calls"] == 3
    assert any(op["op"] == "aten::add" and op["calls"] == 1 for op in ops)

