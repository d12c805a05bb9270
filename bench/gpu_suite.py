"""The GPU path in one call: attention kernels, streaming speed at 480x832 and one stage-2 CDMD step, each figure
beside its arithmetic floor (`bench/flop_model.py`).

Sections (each failure is recorded in the results and the suite goes on):
- ceilings: a bf16 matrix product and a device-to-device copy, the rates the floors use;
- kernels: every attention backend the project can pick (`cf.models.attention`: torch SDPA flash / cuDNN /
  efficient / math, FlexAttention with the block-causal BlockMask, flash-attn 2 / 3) on fresh random inputs of the
  real shapes against a float64 reference (relative error, time), and which backend `attention()` picks (read
  from the profiler's op names);
- streaming: random-init Wan2.1-1.3B and Wan VAE in bf16, `callbacks.throughput.measure_stream_throughput` per
  memory preset, eager and with `torch.compile` of the DiT blocks (FPS including decode, first-chunk latency,
  per-chunk time early vs late, peak memory), and a slow_fast chunk split into DiT and decode with their top
  operators (`bench/suite_breakdown.py`);
- training: one trainer step of `cf.lit.student.CDMDStudent` configured as configs/wan1.3b/student_stage2.yaml (one
  prompt per update), under `cf.strategies.DeepSpeedStrategy` when deepspeed imports, else plain PyTorch.

Writes ``results.json`` and ``table.txt`` to ``--out`` and prints the table last.

    python bench/gpu_suite.py --out runs/gpu_suite             # real sizes on one CUDA GPU (a 420 s budget)
    python bench/gpu_suite.py --dry-run --out /tmp/gpu_suite   # CPU, tiny sizes, every code path, seconds
    python bench/gpu_suite.py --small --out /tmp/gpu_suite     # CUDA, tiny sizes (the GPU test)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # the project and flop_model, installed or not

import torch  # noqa: E402

import flop_model as fm  # noqa: E402
from suite_streaming import num_latent_frames, run_streaming  # noqa: E402
from suite_table import format_floors, format_table  # noqa: E402
from suite_timing import free_memory, guarded, peak_memory_gib, synchronize, time_call  # noqa: E402

TINY_VAE = {"base_dim": 4, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_scales": [],
            "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
STAGE2_CONFIG = ROOT / "configs" / "wan1.3b" / "student_stage2.yaml"
# the stage-2 step at tiny sizes: a 15-frame rollout, a 6 + 6 teacher window, 3 frames with grad
TINY_STEP = {"window": {"context_frames": 6, "target_frames": 6},
             "rollout": {"min_blocks": 5, "max_blocks": 5, "decay_steps": 0, "grad_window_frames": 3}}
@dataclasses.dataclass
class Sizes:
    """What the suite runs; `real` is the default, `small` the GPU test, `dry_run` the CPU check."""

    name: str = "real"
    device: str = "cuda"
    dtype: str = "bfloat16"
    model: str = "wan1.3b"  # or "tiny"
    vae: str = "wan"  # or "tiny"
    latent_hw: tuple[int, int] = (60, 104)
    chunk_key_frames: int = 21  # frames a slow-fast chunk attends to: 18 cached + its own 3 (21 slots)
    reference_rows: int = 4096  # query rows compared against float64 (all rows when fewer)
    stream_seconds: tuple[tuple[str, float], ...] = (("slow_fast", 60.0), ("sliding", 60.0), ("full", 20.0))
    compiled_presets: tuple[str, ...] = ("slow_fast", "sliding", "full")
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs per block)
    eager_warmup_chunks: int = 1
    compiled_warmup_chunks: int = 3
    matmul_n: int = 8192
    copy_mib: int = 2048
    timing_s: float = 0.5  # per kernel timing loop
    budget_s: float = 420.0
    training_reserve_s: float = 150.0
    step_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # over the stage-2 YAML's model args

    @classmethod
    def real(cls) -> "Sizes":
        return cls()

    @classmethod
    def small(cls) -> "Sizes":
        return cls(name="small", model="tiny", vae="tiny", latent_hw=(8, 8), reference_rows=10 ** 9,
                   stream_seconds=(("slow_fast", 4.0), ("sliding", 4.0), ("full", 4.0)), matmul_n=2048,
                   copy_mib=256, budget_s=600.0, training_reserve_s=0.0, step_overrides=TINY_STEP)

    @classmethod
    def dry_run(cls) -> "Sizes":
        return cls(name="dry_run", device="cpu", dtype="float32", model="tiny", vae="tiny", latent_hw=(2, 4),
                   reference_rows=10 ** 9, stream_seconds=(("slow_fast", 1.0), ("sliding", 1.0), ("full", 1.0)),
                   compile_backend="eager", compiled_presets=("slow_fast",), compiled_warmup_chunks=2,
                   matmul_n=256, copy_mib=16, timing_s=0.02,
                   budget_s=600.0, training_reserve_s=0.0, step_overrides=TINY_STEP)

    def wan_config(self) -> Any:
        from cf.models.wan import WanConfig

        return WanConfig.wan2_1_1_3b() if self.model == "wan1.3b" else WanConfig.tiny()

    def vae_kwargs(self) -> dict[str, Any]:
        return {} if self.vae == "wan" else dict(TINY_VAE)

    def vae_cost(self) -> fm.VaeCost:
        """The VAE's FLOPs at these sizes (counted once)."""
        key = (self.vae, tuple(self.latent_hw))
        if key not in _VAE_COSTS:
            _VAE_COSTS[key] = fm.count_vae(self.vae_kwargs(), self.latent_hw)
        return _VAE_COSTS[key]


_VAE_COSTS: dict[tuple[str, tuple[int, int]], fm.VaeCost] = {}


# -------------------------------------------------------------------------------------------------------- ceilings
def measure_ceilings(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """bf16 (or the run's dtype) matmul rate and device copy bandwidth on random data."""
    n = sizes.matmul_n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul = time_call(lambda: a @ b, device, warmup=3, budget_s=0.3)
    x = torch.rand(sizes.copy_mib * 2 ** 18, device=device)
    y = torch.empty_like(x)
    copy = time_call(lambda: y.copy_(x), device, warmup=3, budget_s=0.3)
    return {"matmul_flops_per_s": 2.0 * n ** 3 / (matmul["ms"] / 1e3), "matmul_n": n,
            "copy_bytes_per_s": 2.0 * x.numel() * 4 / (copy["ms"] / 1e3), "copy_mib": sizes.copy_mib}


# --------------------------------------------------------------------------------------------------------- kernels
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
PICK_LABELS = (("flash_attn", "flash-attn"), ("flex", "flex_attention"), ("triton_tem", "flex_attention"),
               ("_scaled_dot_product_flash_attention_for_cpu", "sdpa: cpu flash"),
               ("_scaled_dot_product_cudnn_attention", "sdpa: cudnn"),
               ("_scaled_dot_product_efficient_attention", "sdpa: efficient"),
               ("_scaled_dot_product_flash_attention", "sdpa: flash"),
               ("_scaled_dot_product_attention_math", "sdpa: math"))


def flash_attn_function(version: int) -> Callable | None:
    try:
        if version == 3:
            from flash_attn_interface import flash_attn_func
        else:
            from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def skip_reason(backend: str, device: torch.device, dtype: torch.dtype, score_gib: float) -> str | None:
    """Why ``backend`` cannot run here (None: it can)."""
    cuda_only = backend in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_efficient_dense_mask",
                            "flash_attn_2", "flash_attn_3")
    if cuda_only and device.type != "cuda":
        return "skipped: no CUDA"
    if backend.startswith("flash_attn"):
        version = int(backend[-1])
        if version == 3 and torch.cuda.get_device_capability(device)[0] < 9:
            return "skipped: flash-attn 3 needs compute capability >= 9"
        if flash_attn_function(version) is None:
            module = "flash_attn_interface" if version == 3 else "flash_attn"
            return f"skipped: {module} not installed"
        if dtype not in (torch.float16, torch.bfloat16):
            return "skipped: flash-attn needs fp16/bf16"
    if backend.startswith("sdpa_math") and score_gib > 16:
        return f"skipped: would materialise {score_gib:.0f} GiB of scores"
    return None


def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                   allowed: torch.Tensor | None) -> torch.Tensor:
    """Float64 softmax(q k^T / sqrt(D)) v for the query ``rows``; q, k, v [1, L, H, D]; allowed [R, Lk] or None."""
    out = torch.empty(len(rows), q.shape[2], q.shape[3], dtype=torch.float64, device=q.device)
    scale = q.shape[3] ** -0.5
    for h in range(q.shape[2]):
        scores = (q[0, rows, h].double() @ k[0, :, h].double().T) * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[0, :, h].double()
    return out


def kernel_function(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, p: int,
                    masked: bool) -> Callable[[], torch.Tensor]:
    """The call that ``backend`` names, through the project's `attention()` where it has one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cf.models.attention import attention, block_causal_block_mask, block_causal_mask

    dense = block_causal_mask(frames, p, 3, device=q.device) if masked else None
    if backend == "auto":  # what the model passes: a BlockMask on CUDA, a dense mask elsewhere
        mask = (block_causal_block_mask(frames, p, 3, device=q.device) if q.is_cuda else dense) if masked else None
        return lambda: attention(q, k, v, mask)
    if backend == "flex":
        block_mask = block_causal_block_mask(frames, p, 3, device=q.device)
        return lambda: attention(q, k, v, block_mask)
    if backend.startswith("flash_attn"):
        fn = flash_attn_function(int(backend[-1]))

        def call() -> torch.Tensor:
            out = fn(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        return call
    sdpa = getattr(SDPBackend, SDPA_BACKENDS[backend.removesuffix("_dense_mask")])

    def call() -> torch.Tensor:
        with sdpa_kernel([sdpa]):
            return attention(q, k, v, dense, backend="sdpa")

    return call


def attention_pick(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, p: int, masked: bool
                   ) -> dict[str, Any]:
    """The backend `attention()` runs for these inputs, read from the op and kernel names the profiler records."""
    from torch.profiler import ProfilerActivity, profile

    fn = kernel_function("auto", q, k, v, frames, p, masked)
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(q.device)
    names = sorted({e.name for e in prof.events()})
    keys = ("attention", "flash", "flex", "fmha", "cudnn", "triton")
    relevant = [n[:100] for n in names if any(key in n.lower() for key in keys)]
    label = next((text for key, text in PICK_LABELS if any(key in n for n in relevant)), "unrecognised")
    return {"picked": label, "ops": relevant[:10]}


def run_kernels(sizes: Sizes, device: torch.device, dtype: torch.dtype, rates: dict[str, float]
                ) -> dict[str, Any]:
    config = sizes.wan_config()
    heads, head_dim = config.num_heads, config.head_dim
    p = fm.tokens_per_frame(fm.DiTShape.of(config), sizes.latent_hw)
    shapes = (("chunk", 3, sizes.chunk_key_frames, False), ("block_causal", 21, 21, True), ("teacher", 42, 42, False))
    unmasked = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn_2", "flash_attn_3", "auto")
    masked = ("flex", "sdpa_efficient_dense_mask", "sdpa_math_dense_mask", "auto")
    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    rows_out, picks = [], {}
    seed = 0
    for name, q_frames, k_frames, is_masked in shapes:
        q_len, k_len = q_frames * p, k_frames * p
        pairs = fm.block_causal_pairs(q_frames, p, 3) if is_masked else None
        work = fm.attention_work(q_len, k_len, heads, head_dim, pairs=pairs, element_bytes=dtype.itemsize)
        score_gib = heads * q_len * k_len * 4 * 2 / 2 ** 30
        for backend in masked if is_masked else unmasked:
            row = {"shape": name, "backend": backend, "q_len": q_len, "k_len": k_len, "heads": heads,
                   "head_dim": head_dim, "flops": work.flops, "floor_ms": 1e3 * work.floor_s(**rates)}
            reason = skip_reason(backend, device, dtype, score_gib)
            if reason:
                rows_out.append({**row, "status": reason})
                continue
            seed += 1

            def measure() -> dict[str, Any]:
                gen = torch.Generator(device=device).manual_seed(seed)
                q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, generator=gen)
                           for n in (q_len, k_len, k_len))
                fn = kernel_function(backend, q, k, v, q_frames, p, is_masked)
                start = time.perf_counter()
                out = fn()
                synchronize(device)
                first_s = time.perf_counter() - start
                rows = torch.randperm(q_len, generator=torch.Generator().manual_seed(seed))[:sizes.reference_rows]
                rows = rows.sort().values.to(device)
                from cf.models.attention import block_causal_mask

                allowed = block_causal_mask(q_frames, p, 3, device=device)[rows] if is_masked else None
                ref = reference_rows(q, k, v, rows, allowed)
                error = float((out[0, rows].double() - ref).norm() / ref.norm())
                finite = bool(torch.isfinite(out).all())
                timing = time_call(fn, device, budget_s=sizes.timing_s)
                return {"rel_error": error, "all_finite": finite, "compared_rows": len(rows),
                        "check": "pass" if finite and error < tolerance else "FAIL", "first_call_s": first_s,
                        **timing, "tflops": work.flops / (timing["ms"] / 1e3) / 1e12}

            rows_out.append({**row, **guarded(measure)})
            free_memory(device)

        def pick() -> dict[str, Any]:
            gen = torch.Generator(device=device).manual_seed(10_000)
            q, k, v = (torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, generator=gen)
                       for n in (q_len, k_len, k_len))
            return attention_pick(q, k, v, q_frames, p, is_masked)

        picks[name] = guarded(pick)
        free_memory(device)
    return {"tokens_per_frame": p, "tolerance": tolerance, "rows": rows_out, "attention_picks": picks}


# -------------------------------------------------------------------------------------------------------- training
def stage2_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(STAGE2_CONFIG.read_text())


def stage2_model_args(sizes: Sizes) -> dict[str, Any]:
    """The model arguments of configs/wan1.3b/student_stage2.yaml with the sizes' step overrides."""
    init = dict(stage2_config()["model"]["init_args"])
    for key, value in sizes.step_overrides.items():
        init[key] = {**init[key], **value} if isinstance(value, dict) else value
    return init


def stage2_step(init: dict[str, Any], rollout_frames: int | None = None, generator_exit: int = 3,
                critic_exit: int = 3) -> fm.CdmdStep:
    """The FLOP model's view of one update of these model arguments (rollout: the shortest; exits: the last)."""
    from cf.memory import MemoryConfig

    rollout = init["rollout"]
    return fm.CdmdStep(rollout_frames=rollout_frames or 3 * rollout["min_blocks"],
                       context_window=init["window"]["context_frames"],
                       target_window=init["window"]["target_frames"],
                       grad_window=rollout["grad_window_frames"], capacity=MemoryConfig(**init["memory"]).capacity,
                       frames_per_chunk=init["frames_per_chunk"], steps=len(rollout["sampling"]["denoising_steps"]),
                       generator_exit=generator_exit, critic_exit=critic_exit, guidance=True,
                       reencode_image_latent=init["window"]["reencode_image_latent"],
                       checkpointing=init["gradient_checkpointing"])


def model_floors(sizes: Sizes, rates: dict[str, float]) -> dict[str, Any]:
    """The floor of every figure at these sizes and rates (`flop_model.figure_floors`)."""
    from cf.memory import MemoryConfig

    frames = {preset: num_latent_frames(seconds) for preset, seconds in sizes.stream_seconds}
    capacities = {preset: MemoryConfig.preset(preset).capacity for preset in frames}
    return fm.figure_floors(fm.DiTShape.of(sizes.wan_config()), sizes.latent_hw, sizes.vae_cost(), frames,
                            capacities, stage2_step(stage2_model_args(sizes)), **rates)


def run_training(sizes: Sizes, device: torch.device, dtype: torch.dtype, rates: dict[str, float],
                 strategy_choice: str, workdir: Path) -> dict[str, Any]:
    """One trainer step (generator and critic update) of the stage-2 student, one prompt per update."""
    import importlib.util

    use_deepspeed = strategy_choice == "deepspeed" or (
        strategy_choice == "auto" and device.type == "cuda" and importlib.util.find_spec("deepspeed") is not None)
    if use_deepspeed:
        os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from cf.lit.student import CDMDStudent
    from cf.models.wan import WanDiT
    from cf.weights import save_wan_weights

    stage2 = stage2_config()
    init = stage2_model_args(sizes)
    config = sizes.wan_config()
    torch.manual_seed(0)
    with torch.device(device):
        teacher = WanDiT(config)
    teacher_path = save_wan_weights(teacher, workdir / "teacher.safetensors", dtype=dtype)
    del teacher
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan(**sizes.vae_kwargs()).save_pretrained(workdir / "vae")
    init.update(network=dataclasses.asdict(config), teacher_weights=str(teacher_path), generator_weights=None,
                critic_weights=None, autoencoder=str(workdir / "vae"), autoencoder_args=None, text_encoder="hashed",
                text_encoder_args={"dim": config.text_dim, "max_length": config.text_len}, encoder_dtype=sizes.dtype,
                latent_size=list(sizes.latent_hw), export_path=None,
                optimization={**init["optimization"], "gradient_accumulation": 1})
    strategy: Any = "auto"
    if use_deepspeed:
        from cf.strategies import DeepSpeedStrategy

        strategy_args = stage2["trainer"]["strategy"]["init_args"]
        ds_config = strategy_args["config"]  # the YAML names configs/deepspeed/*.json (or gives the mapping)
        ds_config = dict(json.loads((ROOT / ds_config).read_text()) if isinstance(ds_config, str) else ds_config)
        ds_config.setdefault("train_micro_batch_size_per_gpu", int(strategy_args.get("logging_batch_size_per_gpu", 1)))
        if device.type != "cuda":
            ds_config.pop("bf16", None)
        engines = {name: {"gradient_accumulation_steps": 1,
                          "gradient_clipping": init["optimization"][f"{name}_grad_clip"]}
                   for name in ("generator", "critic")}
        strategy = DeepSpeedStrategy(config=ds_config, frozen_modules=strategy_args["frozen_modules"],
                                     exclude_frozen_parameters=strategy_args["exclude_frozen_parameters"],
                                     engine_configs=engines, start_method="popen")

    class StepTimer(Callback):
        fit_start = time.perf_counter()

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self.start = time.perf_counter()
            self.setup_s = self.start - self.fit_start

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            synchronize(device)
            self.step_s = time.perf_counter() - self.start
            self.peak_gib, self.memory_kind = peak_memory_gib(device)

    timer = StepTimer()
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=1,
                         precision=stage2["trainer"]["precision"] if device.type == "cuda" else "32-true",
                         strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=str(workdir), callbacks=[timer])
    prompts = torch.utils.data.DataLoader(["a timing run"], batch_size=1, collate_fn=lambda b: {"caption": list(b)})
    module = CDMDStudent(**init)
    timer.fit_start = time.perf_counter()  # set-up: building and loading the networks, strategy initialisation
    trainer.fit(module, train_dataloaders=prompts)
    metrics = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("train/")}

    shape = fm.DiTShape.of(config)
    logged = [metrics.get(name) for name in ("generator_rollout_frames", "generator_exit_index",
                                             "critic_exit_index")]
    step = stage2_step(init, *(int(value) for value in logged)) if None not in logged else stage2_step(init)
    parts = fm.cdmd_step_work(shape, fm.tokens_per_frame(shape, sizes.latent_hw), step,
                              sizes.vae_cost())
    return {"strategy": "deepspeed (cf.strategies.DeepSpeedStrategy, ZeRO-3)" if use_deepspeed else "plain PyTorch",
            "precision": stage2["trainer"]["precision"] if device.type == "cuda" else "32-true",
            "step_s": timer.step_s, "setup_s": timer.setup_s, "peak_memory_gib": timer.peak_gib,
            "memory_kind": timer.memory_kind, "metrics": metrics, "step_model": dataclasses.asdict(step),
            "step_model_from_logs": None not in logged,
            "pflop": sum(w.flops for w in parts.values()) / 1e15,
            "floor_s": sum(w.floor_s(**rates) for w in parts.values()),
            "floor_parts_s": {name: w.floor_s(**rates) for name, w in parts.items()},
            "floor_state_gib": fm.cdmd_state_bytes(fm.dit_parameters(shape), use_deepspeed) / 2 ** 30}


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for results.json and table.txt (required unless --floors)")
    parser.add_argument("--floors", action="store_true",
                        help="print the floor of every figure at the nominal H100/H200 rates and exit (no device)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="CPU, tiny model and VAE, tiny shapes")
    mode.add_argument("--small", action="store_true", help="CUDA, tiny model and VAE, tiny shapes")
    parser.add_argument("--sections", default="kernels,streaming,training")
    parser.add_argument("--train-strategy", choices=["auto", "deepspeed", "plain"], default="auto",
                        help="auto: DeepSpeed on CUDA when it imports, else plain PyTorch")
    parser.add_argument("--no-compile", action="store_true", help="streaming runs without torch.compile only")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        default="default", help="torch.compile mode of the compiled streaming runs")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget of the whole suite (default by mode)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    sizes = Sizes.dry_run() if args.dry_run else Sizes.small() if args.small else Sizes.real()
    nominal = {"flops_per_s": fm.NOMINAL_MATMUL_FLOPS, "bytes_per_s": fm.NOMINAL_COPY_BYTES_PER_S}
    if args.floors:
        floors = model_floors(sizes, nominal)
        print(format_floors(floors))
        return {"model_floors": floors}
    if args.out is None:
        parser.error("--out is required")
    if args.budget_s is not None:
        sizes.budget_s = args.budget_s
    if args.compile_mode != "default":
        sizes.compile_mode = args.compile_mode
    if sizes.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run to check the suite on a CPU")
    device, dtype = torch.device(sizes.device), getattr(torch, sizes.dtype)
    sections = set(args.sections.split(","))
    unknown = sections - {"kernels", "streaming", "training"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from kernels, streaming, training")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "sizes": sizes.name, "argv": sys.argv,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "config": dataclasses.asdict(sizes)}}
    deadline = started + sizes.budget_s

    def save_partial() -> None:  # what is measured so far survives a killed run
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")

    results["model_floors"] = guarded(lambda: model_floors(sizes, nominal))  # at the nominal rates
    results["ceilings"] = guarded(lambda: measure_ceilings(sizes, device, dtype))
    rates = dict(nominal)
    if results["ceilings"]["status"] == "ok":
        rates = {"flops_per_s": results["ceilings"]["matmul_flops_per_s"],
                 "bytes_per_s": results["ceilings"]["copy_bytes_per_s"]}
    if "kernels" in sections:
        results["kernels"] = guarded(lambda: run_kernels(sizes, device, dtype, rates))
        save_partial()
        free_memory(device)
    if "streaming" in sections:
        stream_deadline = deadline - (sizes.training_reserve_s if "training" in sections else 0.0)
        results["streaming"] = guarded(lambda: run_streaming(sizes, device, dtype, rates, stream_deadline,
                                                             not args.no_compile))
        save_partial()
        free_memory(device)
    if "training" in sections:
        with tempfile.TemporaryDirectory(prefix="gpu_suite_") as workdir:
            results["training"] = guarded(lambda: run_training(sizes, device, dtype, rates, args.train_strategy,
                                                               Path(workdir)))
    results["meta"]["wall_s"] = time.perf_counter() - started
    table = format_table(results)
    save_partial()
    (out / "table.txt").write_text(table + "\n")
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
