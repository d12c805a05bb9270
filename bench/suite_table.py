"""The table `bench/gpu_suite.py` prints last and writes to ``table.txt``: each figure beside its floor."""

from __future__ import annotations

import math
from typing import Any


def _num(value: Any, width: int, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-".rjust(width)
    return f"{value:{width}.{digits}f}"


def _kernels(kernels: dict[str, Any]) -> list[str]:
    if "rows" not in kernels:
        return [f"kernels: {kernels.get('status')}"]
    first = kernels["rows"][0]
    lines = [f"kernels: fresh random inputs vs float64 (tolerance {kernels['tolerance']:g}), {first['heads']} heads x "
             f"{first['head_dim']}, {kernels['tokens_per_frame']} tokens per frame",
             f"  {'shape (q x k tokens)':<21} {'backend':<26} {'rel.err':>8} check {'ms':>8} {'TFLOP/s':>8} "
             f"{'floor ms':>8} {'x floor':>7}"]
    for row in kernels["rows"]:
        label = f"  {row['shape'] + ' ' + str(row['q_len']) + 'x' + str(row['k_len']):<21} {row['backend']:<26}"
        if row["status"] != "ok":
            lines.append(f"{label} {row['status']}")
            continue
        lines.append(f"{label} {row['rel_error']:8.1e} {row['check']:<5} {row['ms']:8.3f} {row['tflops']:8.1f} "
                     f"{row['floor_ms']:8.3f} {row['ms'] / row['floor_ms']:7.2f}")
    picks = [f"{name} -> {pick.get('picked', pick['status'])}" for name, pick in kernels["attention_picks"].items()]
    lines.append("  attention() picks: " + "; ".join(picks))
    return lines


def _streaming(streaming: dict[str, Any]) -> list[str]:
    if "runs" not in streaming:
        return [f"streaming: {streaming.get('status')}"]
    decode = "VAE decode included" if streaming["includes_decode"] else "DiT only, no decode"
    lines = [f"streaming ({decode}, compile backend {streaming['compile_backend']}): steady FPS, first-chunk latency, "
             "ms per chunk at 10-20 s and in the last 10 s (early / late quarter of the chunks when shorter)",
             f"  {'memory':<9} {'mode':<8} {'video':>7} {'FPS':>7} {'floor':>7} | {'first s':>7} {'floor':>6} | "
             f"{'early ms':>9} {'late ms':>9} {'floor':>7} | {'peak GiB':>8}"]
    for run in streaming["runs"]:
        label = f"  {run['preset']:<9} {'compiled' if run['compiled'] else 'eager':<8} {run['seconds']:6.1f}s"
        if run["status"] != "ok":
            lines.append(f"{label} {run['status']}")
            continue
        early = run["ms_10_20s"] if run["ms_10_20s"] is not None else run["chunk_ms_early"]
        late = run["ms_last_10s"] if run["ms_10_20s"] is not None else run["chunk_ms_late"]
        lines.append(f"{label} {run['pixel_fps']:7.2f} {run['floor_fps']:7.1f} | {run['first_chunk_latency_s']:7.3f} "
                     f"{run['floor_latency_s']:6.3f} | {_num(early, 9, 1)} {_num(late, 9, 1)} "
                     f"{run['floor_chunk_ms_last']:7.1f} | {run['peak_memory_mib'] / 1024:8.2f}")
    lines.extend(_breakdown(streaming.get("breakdown")))
    lines.extend(f"  note: {note}" for note in streaming["notes"])
    return lines


def _breakdown(breakdown: dict[str, Any] | None) -> list[str]:
    if breakdown is None:
        return []
    if breakdown.get("status") != "ok":
        return [f"  slow_fast chunk breakdown: {breakdown.get('status')}"]
    line = (f"  slow_fast chunk breakdown (eager, each part alone): DiT {breakdown['dit_chunk_ms_late']:.1f} ms "
            f"(floor {breakdown['dit_floor_ms']:.1f})")
    if "decode_chunk_ms" in breakdown:
        line += f", decode {breakdown['decode_chunk_ms']:.1f} ms (floor {breakdown['decode_floor_ms']:.1f})"
    lines = [line]
    for part in ("dit", "decode"):
        ops = breakdown.get(f"{part}_top_ops")
        if ops:
            top = ", ".join(f"{op['op']} {op['ms']:.1f}" for op in ops[:5])
            lines.append(f"    top {part} ops, ms per chunk: {top}")
    return lines


def _training(training: dict[str, Any]) -> list[str]:
    if training.get("status") != "ok":
        return [f"training: {training.get('status')}"]
    step = training["step_model"]
    return [f"training: one stage-2 CDMD step (generator + critic update, one prompt, {step['rollout_frames']}-frame "
            f"rollout, {step['context_window']} + {step['target_window']} window), {training['strategy']}, "
            f"{training['precision']}",
            f"  step {training['step_s']:.2f} s (floor {training['floor_s']:.2f} s = {training['pflop']:.2f} PFLOP), "
            f"peak {training['peak_memory_gib']:.2f} GiB (floor {training['floor_state_gib']:.2f} GiB: weights and "
            f"optimizer state), set-up {training['setup_s']:.1f} s"]


def format_table(results: dict[str, Any]) -> str:
    """The short table of a `bench/gpu_suite.py` results dict."""
    meta = results["meta"]
    lines = [f"GPU suite ({meta['sizes']}) on {meta['device_name']}, torch {meta['torch']}, {meta['date']}, "
             f"{meta['wall_s']:.0f} s"]
    ceilings = results["ceilings"]
    if ceilings.get("status") == "ok":
        lines.append(f"ceilings: matmul {ceilings['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({ceilings['matmul_n']}^3),"
                     f" copy {ceilings['copy_bytes_per_s'] / 1e12:.3f} TB/s; every floor below uses these")
    else:
        lines.append(f"ceilings: {ceilings.get('status')}; floors use the nominal 790 TFLOP/s and 4.3 TB/s")
    for name, section in (("kernels", _kernels), ("streaming", _streaming), ("training", _training)):
        if name in results:
            lines.extend(section(results[name]))
    return "\n".join(lines)


def format_floors(floors: dict[str, Any]) -> str:
    """The floors of `flop_model.figure_floors` as text (what `bench/gpu_suite.py --floors` prints)."""
    rates = floors["rates"]
    lines = [f"floors at {rates['flops_per_s'] / 1e12:.0f} TFLOP/s and {rates['bytes_per_s'] / 1e12:.1f} TB/s; "
             f"DiT {floors['dit_parameters'] / 1e9:.3f} B parameters, {floors['tokens_per_frame']} tokens per frame",
             "attention (one call, all heads)   TFLOP      GB  floor ms"]
    for name, kernel in floors["kernels"].items():
        lines.append(f"  {name:<30} {kernel['tflop']:7.3f} {kernel['gb']:7.3f} {kernel['floor_ms']:9.3f}")
    lines.append("streaming (per chunk of 3 latents = 12 frames)  DiT TFLOP  DiT GB  VAE TFLOP  chunk ms  FPS last  "
                 "FPS video  first s  K/V GiB")
    for preset, run in floors["streaming"].items():
        lines.append(f"  {preset:<9} {run['latent_frames']:4d} latent frames {run['dit_tflop_last_chunk']:15.2f} "
                     f"{run['dit_gb_last_chunk']:7.2f} {run['vae_tflop_steady_chunk']:10.2f} "
                     f"{run['chunk_ms_last']:9.1f} {run['fps_last_chunk']:9.1f} {run['fps_steady']:10.1f} "
                     f"{run['first_chunk_s']:8.3f} {run['kv_cache_gib']:8.2f}")
    training = floors["training"]
    step = training["step"]
    lines.append(f"stage-2 step ({step['rollout_frames']}-frame rollout, exit index {step['generator_exit']} / "
                 f"{step['critic_exit']}, {step['context_window']} + {step['target_window']} window): "
                 f"{training['pflop']:.2f} PFLOP, floor {training['floor_s']:.2f} s; weights and optimizer state "
                 f"{training['state_gib_plain']:.1f} GiB (plain) / {training['state_gib_deepspeed']:.1f} GiB "
                 "(DeepSpeed)")
    lines.append("  " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in training["parts_s"].items()))
    return "\n".join(lines)
