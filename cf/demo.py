"""`cf demo`: the whole toy pipeline on a CPU, end to end, with a report.

1. synthesise the long-range sprite dataset (train / held-out val);
2. fine-tune the long-context teacher with ERFT and export it;
3. distil the student: stage 1 (DMD, 21 frames) from the teacher weights, then stage 2 (contextual DMD on long
   rollouts through the Slow-Fast Memory) — and, as the baseline, the same stage 2 with a memoryless short-window
   teacher and a sliding-window cache (LongLive-style);
4. generate 60 s videos for the held-out prompts with both students;
5. evaluate them (ground-truth-free identity recall and background drift, windowed pixel consistency, flashbacks)
   and write `runs/demo/report.md` with tables, metric-vs-time plots and the mp4s.

Each training stage runs `cf fit` with the toy configs in a subprocess (the Lightning progress bar shows), so every
stage can also be re-run or inspected on its own: the commands are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "toy"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    num_clips: int = 160
    num_val_clips: int = 8
    teacher_steps: int = 1500
    stage1_steps: int = 300
    stage2_steps: int = 300
    seconds: float = 60.0
    num_prompts: int = 4
    seeds: int = 2
    fresh: bool = False


def _run(cmd: list[str], env: dict[str, str], log: list[dict], name: str) -> float:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, **env}, check=True)
    seconds = time.perf_counter() - start
    log.append({"stage": name, "seconds": round(seconds, 1), "command": " ".join(cmd)})
    print(f"=== {name} done in {seconds:.0f} s", flush=True)
    return seconds


def shard_urls(folder: Path) -> str:
    """Brace notation covering the `shard-NNNNNN.tar` files of a split folder."""
    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar in {folder}; run `cf data synth --out {folder.parent}` first")
    first, last = shards[0].stem.split("-")[1], shards[-1].stem.split("-")[1]
    return str(folder / (f"shard-{first}.tar" if first == last else f"shard-{{{first}..{last}}}.tar"))


def _newest(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"nothing matches {root}/{pattern}; did the previous stage finish?")
    return found[-1]


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage (skipping those whose outputs exist unless `fresh`) and return the report path."""
    out = Path(cfg.out).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cf = [sys.executable, "-m", "cf"]
    log: list[dict] = []
    total_start = time.perf_counter()
    paths = {
        "data": out / "data",
        "teacher": out / "teacher" / "teacher.safetensors",
        "stage1": out / "student_stage1" / "generator.safetensors",
        "stage2": out / "student_stage2" / "generator.safetensors",
        "baseline": out / "baseline_stage2" / "generator.safetensors",
    }
    env = {
        "CF_DATA": str(paths["data"]),
        "CF_RUNS": str(out / "logs"),
        "CF_TEACHER": str(paths["teacher"]),
        "CF_STUDENT_INIT": str(paths["teacher"]),  # stage 1 starts from the teacher's weights (§F.1)
        "CF_STUDENT_STAGE1": str(paths["stage1"]),
        "CF_STUDENT": str(paths["stage2"]),
        "CF_BASELINE": str(paths["baseline"]),
        # the toy networks are far too small for intra-op threads to pay off; one thread per process is fastest
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }

    if not (paths["data"] / "val" / "prompts.txt").exists():
        _run(cf + ["data", "synth", "--out", str(paths["data"]), "--num-clips", str(cfg.num_clips),
                   "--val-clips", str(cfg.num_val_clips), "--seed", "0"], env, log, "dataset")

    if not paths["teacher"].exists():
        _run(cf + ["fit", "--config", str(CONFIGS / "teacher_erft.yaml"),
                   "--data.init_args.train_urls", shard_urls(paths["data"] / "train"),
                   "--data.init_args.val_urls", shard_urls(paths["data"] / "val"),
                   "--trainer.max_steps", str(cfg.teacher_steps)], env, log, "teacher ERFT")
        ckpt = _newest("teacher_erft_toy/version_*/checkpoints/last.ckpt", out / "logs")
        _run(cf + ["convert", "teacher", str(ckpt), str(paths["teacher"])], env, log, "export teacher")

    if not paths["stage1"].exists():
        _run(cf + ["fit", "--config", str(CONFIGS / "student_stage1.yaml"),
                   "--trainer.max_steps", str(cfg.stage1_steps)], env, log, "student stage 1")

    if not paths["stage2"].exists():
        _run(cf + ["fit", "--config", str(CONFIGS / "student_stage2.yaml"),
                   "--trainer.max_steps", str(cfg.stage2_steps)], env, log, "student stage 2 (Context Forcing)")

    if not paths["baseline"].exists():
        _run(cf + ["fit", "--config", str(CONFIGS / "student_stage2.yaml"),
                   "--config", str(CONFIGS / "baseline_sliding_window.yaml"),
                   "--trainer.max_steps", str(cfg.stage2_steps)], env, log, "baseline stage 2 (sliding)")

    prompts = [p for p in (paths["data"] / "val" / "prompts.txt").read_text().splitlines() if p.strip()]
    prompts = prompts[: cfg.num_prompts]
    videos = {"context_forcing": out / "videos" / "context_forcing", "sliding_window": out / "videos" / "sliding"}
    for name, weights, memory in [("context_forcing", paths["stage2"], "slow_fast"),
                                  ("sliding_window", paths["baseline"], "sliding")]:
        folder = videos[name]
        if folder.exists() and len(list(folder.glob("*.mp4"))) == len(prompts) * cfg.seeds:
            continue
        _generate(weights, prompts, folder, cfg, memory, log)

    report = _evaluate_and_report(videos, out, cfg, log, time.perf_counter() - total_start)
    print(f"\nreport: {report}")
    return report


def _generate(weights: Path, prompts: list[str], folder: Path, cfg: DemoConfig, memory: str, log: list) -> None:
    from cf.generate import GeneratorSpec, generate_videos, load_generator, slug

    start = time.perf_counter()
    spec = GeneratorSpec.load(weights.parent / "config.json")
    model = load_generator(spec, weights)
    for seed in range(cfg.seeds):
        names = [f"p{i:02d}_s{seed}_{slug(p, 30)}" for i, p in enumerate(prompts)]
        generate_videos(spec, model, prompts, folder, seconds=cfg.seconds, seed=seed, memory=memory,
                        batch_size=len(prompts), names=names, overwrite=True)
    log.append({"stage": f"generate {folder.name}", "seconds": round(time.perf_counter() - start, 1),
                "command": f"cf generate --weights {weights} --memory {memory} --seconds {cfg.seconds:g}"})


def _evaluate_and_report(videos: dict[str, Path], out: Path, cfg: DemoConfig, log: list, elapsed: float) -> Path:
    from cf.evaluation.report import evaluate_folders

    start = time.perf_counter()
    results = evaluate_folders([videos["context_forcing"], videos["sliding_window"]], out / "evaluation")
    log.append({"stage": "evaluate", "seconds": round(time.perf_counter() - start, 1),
                "command": f"cf evaluate {videos['context_forcing']} {videos['sliding_window']}"})
    (out / "stages.json").write_text(json.dumps({"config": asdict(cfg), "stages": log}, indent=2))
    return write_report(out, results, log, elapsed, videos)


def markdown_tables(results: dict) -> str:
    """One table per windowed metric (models × timestamps) and one of the scalar summaries (models × metrics)."""
    models = results.get("models", results)
    lines: list[str] = []
    metrics = sorted({m for data in models.values() for m in data["summary"]["windowed"]})
    for metric in metrics:
        times = sorted({float(t) for data in models.values() for t in data["summary"]["windowed"].get(metric, {})})
        lines += [f"**{metric}**", "", "| model | " + " | ".join(f"{t:g} s" for t in times) + " |",
                  "|---|" + "---|" * len(times)]
        for model, data in models.items():
            scores = {float(t): v for t, v in data["summary"]["windowed"].get(metric, {}).items()}
            lines.append(f"| {model} | " + " | ".join("–" if scores.get(t) is None else f"{scores[t]:.2f}"
                                                      for t in times) + " |")
        lines.append("")
    scalar_names = sorted({k for data in models.values() for k, v in data["summary"].items()
                           if k != "windowed" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if scalar_names:
        lines += ["| model | " + " | ".join(scalar_names) + " |", "|---|" + "---|" * len(scalar_names)]
        for model, data in models.items():
            values = [data["summary"].get(k) for k in scalar_names]
            lines.append(f"| {model} | " + " | ".join("–" if v is None else f"{v:.3g}" for v in values) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict, log: list, elapsed: float, videos: dict[str, Path]) -> Path:
    lines = ["# Context Forcing toy demo", "",
             f"Whole pipeline: {elapsed / 60:.1f} min on this machine ({os.cpu_count()} CPU cores).", "",
             "## Stages", "", "| stage | seconds | command |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']} | `{s['command']}` |" for s in log]
    lines += ["", "## Metrics on held-out prompts", "",
              "Ground-truth-free pixel metrics (cf.evaluation.ground_truth.reference_free_metrics): identity colours "
              "and background of each video's first seconds, tracked over time; `–` = beyond the video.", "",
              markdown_tables(results), "",
              "## Plots", ""]
    for png in sorted((out / "evaluation").glob("*.png")):
        lines.append(f"![{png.stem}](evaluation/{png.name})")
    lines += ["", "## Videos", ""]
    for name, folder in videos.items():
        lines.append(f"- {name}: " + ", ".join(f"[{p.name}](videos/{folder.name}/{p.name})"
                                              for p in sorted(folder.glob("*.mp4"))))
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def run(args: argparse.Namespace) -> None:
    cfg = DemoConfig(out=args.out, num_clips=args.num_clips, teacher_steps=args.teacher_steps,
                     stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, seconds=args.seconds,
                     num_prompts=args.num_prompts, seeds=args.seeds, fresh=args.fresh)
    if args.quick:
        cfg.num_clips, cfg.num_val_clips, cfg.teacher_steps = 24, 4, 20
        cfg.stage1_steps = cfg.stage2_steps = 6
        cfg.seconds, cfg.num_prompts, cfg.seeds = 10.0, 2, 1
    run_demo(cfg)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run the whole toy pipeline on a CPU and write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoConfig()
    p.add_argument("--out", default=defaults.out)
    p.add_argument("--num-clips", type=int, default=defaults.num_clips)
    p.add_argument("--teacher-steps", type=int, default=defaults.teacher_steps)
    p.add_argument("--stage1-steps", type=int, default=defaults.stage1_steps)
    p.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps)
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="length of the generated videos")
    p.add_argument("--num-prompts", type=int, default=defaults.num_prompts)
    p.add_argument("--seeds", type=int, default=defaults.seeds)
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the pipeline in minutes")
    p.set_defaults(func=run)
    return p
