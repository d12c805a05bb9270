"""`cf demo`: the whole toy pipeline on a CPU, end to end, with a report.

It starts from the shipped toy base model (configs/toy/base/, what Wan2.1 is for the real run) and

1. synthesises the sprite dataset (train / held-out val; a quarter of the captions leave every colour unnamed);
2. fine-tunes the base with ERFT into the long-context teacher, keeps the step checkpoint whose continuations of
   held-out clips (not those it prompts with) score best (`cf.evaluation.checkpoint_selection`) and scores the
   base's and the teacher's continuations against their ground truth (`cf.evaluation.continuation`);
3. distils the student: stage 0 (ODE regression onto the teacher's trajectories) and stage 1 (DMD, 6-frame
   rollouts), then stage 2 with Context Forcing (contextual DMD on long rollouts through the Slow-Fast Memory); the
   baseline of the paper's argument, the same stage 2 with a memoryless short-window teacher and a sliding-window
   student (LongLive-style), trained at the same time on the second core; and, with ``--ablation``, stage 2
   without contextual DMD (configs/ablations/no_contextual_dmd.yaml);
4. generates 60 s videos for the named and the unnamed prompt of held-out clips with every student;
5. scores them from pixels against the clips' ground truth (`cf.demo_report`: prompted attributes, unprompted
   background and sprite colours, flashbacks) and writes `report.md` with tables, plots and a frame strip per model.

Each training stage runs `cf fit` with the toy configs in a subprocess (progress bars show), so every stage can be
re-run or inspected on its own: the commands are printed and listed in the report. ``--seed`` changes the training
and generation seeds of every stage (the dataset stays the one of seed 0); ``--pipeline-seeds 0 1 2`` runs the
whole pipeline once per seed into ``<out>/seed_<k>`` and writes ``<out>/claim.md`` (mean ± spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cf.stage_runner import (StageLog, config_fingerprint, file_fingerprint, newest_file, run_stage,
                             run_stages_parallel, shard_urls)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "toy"
BASE_WEIGHTS = CONFIGS / "base" / "base.safetensors"
FPS = 16


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    num_clips: int = 160
    num_val_clips: int = 16
    unnamed_fraction: float = 0.25
    teacher_steps: int = 300
    stage0_steps: int = 1200
    stage1_steps: int = 200
    stage2_steps: int = 150
    ablation: bool = False
    seconds: float = 60.0
    num_prompt_clips: int = 4       # held-out clips; each gives a named and an unnamed prompt
    teacher_eval_clips: int = 16
    seed: int = 0
    base: str = str(BASE_WEIGHTS)
    workers: int = 2                # stage-2 runs at a time (independent single-threaded processes)
    fresh: bool = False


MODELS = {  # name -> (weights path relative to out, memory used at generation)
    "context_forcing": ("student_stage2/generator.safetensors", "slow_fast"),
    "sliding_window": ("baseline_stage2/generator.safetensors", "sliding"),
    "no_contextual_dmd": ("logs/ablations/no_contextual_dmd/generator.safetensors", "slow_fast"),
}


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage and return the report path. A stage is skipped when its output exists and its recorded
    command (``stages.json``) is the one it would run now; once a stage runs, every stage after it runs again."""
    out = Path(cfg.out).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(cfg.base).is_file():
        raise FileNotFoundError(f"no toy base weights at {cfg.base}; they ship in configs/toy/base/ (or retrain them "
                                "with `cf toy-base`)")
    cf = [sys.executable, "-m", "cf"]
    log = StageLog(out / "stages.json")  # kept across a resumed run
    paths = {"data": out / "data", "teacher": out / "teacher" / "teacher.safetensors",
             "ode_pairs": out / "ode_pairs" / "ode-000000.tar",
             "stage0": out / "student_stage0" / "generator.safetensors",
             "stage1": out / "student_stage1" / "generator.safetensors",
             **{name: out / rel for name, (rel, _) in MODELS.items()}}
    env = {
        "CF_DATA": str(paths["data"]),
        "CF_RUNS": str(out / "logs"),
        "CF_BASE": str(Path(cfg.base).resolve()),
        "CF_TEACHER": str(paths["teacher"]),
        "CF_ODE_PAIRS": str(paths["ode_pairs"]),
        "CF_STUDENT_INIT": str(paths["stage0"]),  # stage 1 starts from the stage-0 student (§F.9)
        "CF_STUDENT_STAGE1": str(paths["stage1"]),
        "CF_STUDENT": str(paths["context_forcing"]),
        "CF_BASELINE": str(paths["sliding_window"]),
        # the toy networks are far too small for intra-op threads to pay off; one thread per process is fastest
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    eval_prompts = out / "eval_prompts.txt"  # the stage-2 fit-end evaluation callback's prompts: the demo scores
    env["CF_EVAL_PROMPTS"] = str(eval_prompts)  # the students itself, so two are enough there
    seeded = ["--seed_everything", str(cfg.seed), "--model.init_args.seed", str(cfg.seed),
              "--data.init_args.seed", str(cfg.seed)]  # the data's order (its content is the seed-0 dataset)

    stale = _StaleStages(log)
    command = cf + ["data", "synth", "--out", str(paths["data"]), "--num-clips", str(cfg.num_clips),
                    "--val-clips", str(cfg.num_val_clips), "--unnamed-fraction", str(cfg.unnamed_fraction),
                    "--seed", "0"]
    if stale.needs(paths["data"] / "val" / "prompts.txt", "dataset", command):
        shutil.rmtree(paths["data"], ignore_errors=True)  # no shard of an earlier, larger dataset stays behind
        run_stage(command, env, log, "dataset")

    name = "teacher ERFT (from the toy base)"
    command = cf + ["fit", "--config", str(CONFIGS / "teacher_erft.yaml"), *seeded,
                    "--data.init_args.train_urls", shard_urls(paths["data"] / "train"),
                    "--data.init_args.val_urls", shard_urls(paths["data"] / "val"),
                    "--trainer.max_steps", str(cfg.teacher_steps)]
    if stale.needs(paths["teacher"], name, command):
        for measured in ("continuations.json", "selection.json"):  # measured on the old teacher
            (paths["teacher"].parent / measured).unlink(missing_ok=True)
        run_stage(command, env, log, name)
        _select_teacher(cfg, paths, out, log)
    teacher_quality = _teacher_quality(cfg, paths, out, log)

    # the ERFT teacher's trajectories (the real run uses Wan2.1's, §F.9; on the toy the base's gave fewer sprites)
    name = "stage 0 data (teacher ODE pairs)"
    command = cf + ["data", "ode-pairs", "--teacher", str(paths["teacher"]),
                    "--prompts", str(paths["data"] / "train" / "prompts.txt"),
                    "--out", str(paths["ode_pairs"].parent / "ode-%06d.tar"), *_ode_pair_arguments(),
                    "--batch-size", "16", "--seed", str(cfg.seed)]
    if stale.needs(paths["ode_pairs"], name, command):
        shutil.rmtree(paths["ode_pairs"].parent, ignore_errors=True)
        run_stage(command, env, log, name)
    if not eval_prompts.exists():
        val_prompts = (paths["data"] / "val" / "prompts.txt").read_text().splitlines()
        eval_prompts.write_text("\n".join(val_prompts[:2]) + "\n")
    for key, name, config, steps in (("stage0", "student stage 0 (ODE regression)", "student_stage0.yaml",
                                       cfg.stage0_steps),
                                      ("stage1", "student stage 1 (DMD)", "student_stage1.yaml", cfg.stage1_steps)):
        command = cf + ["fit", "--config", str(CONFIGS / config), *seeded, "--trainer.max_steps", str(steps)]
        if stale.needs(paths[key], name, command):
            run_stage(command, env, log, name)
    variants = [("context_forcing", "student stage 2 (Context Forcing)", []),
                ("sliding_window", "baseline stage 2 (memoryless teacher, sliding window)",
                 [CONFIGS / "baseline_sliding_window.yaml"])]
    if cfg.ablation:
        variants.append(("no_contextual_dmd", "ablation stage 2 (no contextual DMD)",
                         [REPO / "configs" / "ablations" / "no_contextual_dmd.yaml"]))
    jobs = stale.needed_side_by_side([
        (paths[key], name, cf + ["fit", "--config", str(CONFIGS / "student_stage2.yaml"),
                                 *[a for c in extra for a in ("--config", str(c))], *seeded,
                                 "--trainer.max_steps", str(cfg.stage2_steps)])
        for key, name, extra in variants])
    run_stages_parallel(jobs, env, log, workers=cfg.workers)  # independent runs, one core each

    from cf.demo_report import demo_prompts
    from cf.toy_base import held_out_clips

    clips = held_out_clips(paths["data"] / "val", cfg.num_prompt_clips, named_only=False)
    prompts = demo_prompts(clips)
    videos = {}
    for model, (_, memory) in MODELS.items():
        if model == "no_contextual_dmd" and not cfg.ablation:
            continue
        videos[model] = out / "videos" / model
        _generate(paths[model], prompts, videos[model], cfg, memory, log)
    from cf.encoders import build_autoencoder
    from cf.generate import GeneratorSpec

    spec = GeneratorSpec.load(paths["context_forcing"].parent / "config.json")
    autoencoder = build_autoencoder(spec.autoencoder, **spec.autoencoder_kwargs)
    report = _evaluate_and_report(videos, clips, prompts, out, cfg, log, teacher_quality, autoencoder)
    print(f"\nreport: {report}")
    return report


def _toy_init_args(name: str) -> dict:
    """``model.init_args`` of the toy config ``configs/toy/<name>``."""
    from cf.toy_base import model_init_args

    return model_init_args(CONFIGS / name)


def _ode_pair_arguments() -> list[str]:
    """`cf data ode-pairs` settings read from the toy configs: the stage-0 student's latent size, text encoder and
    timestep shift (48 Euler steps, so the stored steps 0 12 24 36 land on its denoising steps), the stage-1
    window's target length (the toy base's clip length), the teacher's guidance scale and negative prompt."""
    stage0, stage1 = _toy_init_args("student_stage0.yaml"), _toy_init_args("student_stage1.yaml")
    sampling = _toy_init_args("teacher_erft.yaml")["sampling"]
    return ["--num-frames", str(stage1["window"]["target_frames"]),
            "--latent-size", *map(str, stage0["latent_size"]), "--num-steps", "48",
            "--shift", str(stage0["timestep_shift"]), "--guidance", str(sampling["guidance_scale"]),
            "--negative-prompt", str(sampling["negative_prompt"]),
            "--text-encoder-args", json.dumps(stage0["text_encoder_args"])]


STAGE_CLOCK_SLACK_S = 1.0  # a record's start is known to ~0.1 s (older records: start = end - rounded seconds)


class _StaleStages:
    """Which stages of a resumed pipeline must run: a stage whose output is missing, whose recorded command differs
    from the one it would run now (other steps, other arguments, another output folder), whose config files were
    edited since it ran, or that started before the stage feeding it last finished (an interrupted re-run), and
    every stage after one that runs. An output without a record (made by hand) is kept."""

    def __init__(self, log: StageLog) -> None:
        self.log, self.upstream_ran = log, False
        self.upstream_finished: tuple[str, float] | None = None  # the last checked stage with a record, its end

    def _needs(self, output: Path, name: str, command: list[str]) -> bool:
        if self.upstream_ran:
            return True
        if not output.exists():
            return True
        record = self.log.record_of(name)
        if record is None:
            print(f"\n=== {name}: kept {output} (no record of the command that made it)", flush=True)
            return False
        if record.get("command") != " ".join(command):
            print(f"\n=== {name}: its command changed since {output} was made; running it again, and every "
                  "stage after it", flush=True)
            return True
        if "configs" in record and record["configs"] != config_fingerprint(command):
            print(f"\n=== {name}: its config files were edited since {output} was made; running it again, and "
                  "every stage after it", flush=True)
            return True
        if (self.upstream_finished is not None
                and record.get("started_at", 0.0) < self.upstream_finished[1] - STAGE_CLOCK_SLACK_S):
            print(f"\n=== {name}: {output} was made before {self.upstream_finished[0]} last ran; running it again, "
                  "and every stage after it", flush=True)
            return True
        print(f"\n=== {name}: up to date ({output})", flush=True)
        return False

    def _kept(self, names: list[str]) -> None:
        ends = [(n, r["started_at"] + r.get("seconds", 0.0)) for n in names
                if (r := self.log.record_of(n)) is not None and "started_at" in r]
        if ends:
            self.upstream_finished = max(ends, key=lambda end: end[1])

    def needs(self, output: Path, name: str, command: list[str]) -> bool:
        return bool(self.needed_side_by_side([(output, name, command)]))

    def needed_side_by_side(self, stages: list[tuple[Path, str, list[str]]]) -> list[tuple[list[str], str]]:
        """The stages among independent ones (same inputs, none reads another's output) that must run."""
        needed = [(command, name) for output, name, command in stages if self._needs(output, name, command)]
        self.upstream_ran = self.upstream_ran or bool(needed)
        if not needed:
            self._kept([name for _, name, _ in stages])
        return needed


def _continuations(cfg: DemoConfig, paths: dict[str, Path]):
    """(measure(network, clips) -> `continuation_quality` result, the toy base, the held-out clips): continuations
    with the teacher config's long layout and sampler, the same noise for every network."""
    from cf.evaluation.continuation import continuation_quality
    from cf.teacher_layout import LongLayoutConfig
    from cf.toy_base import held_out_clips, load_base

    args = _toy_init_args("teacher_erft.yaml")
    layout = LongLayoutConfig(**args["long_layout"])
    base, autoencoder, text_encoder, _ = load_base(Path(cfg.base).parent)
    clips = held_out_clips(paths["data"] / "val", cfg.teacher_eval_clips, named_only=False)

    def measure(network, some_clips):
        return continuation_quality(network, autoencoder, text_encoder, some_clips, layout, args["sampling"],
                                    seed=cfg.seed)

    return measure, base, clips, {"target_latents": layout.target_latents, "sampling": args["sampling"]}


def _select_teacher(cfg: DemoConfig, paths: dict[str, Path], out: Path, log: StageLog) -> dict:
    """Export every step checkpoint of the newest ERFT run, score each one's continuations of the held-out clips
    the demo does not prompt with (`continuation_fidelity`: the lower of its background and sprite levels as
    ratios to the true continuations') and keep the best as the teacher; ``teacher/selection.json`` records it."""
    import re

    import torch

    from cf.atomic import atomic_path, atomic_write_text
    from cf.convert import export_teacher
    from cf.evaluation.checkpoint_selection import continuation_fidelity, select_checkpoint
    from cf.toy_base import load_dit

    start = time.perf_counter()
    last = newest_file("teacher_erft_toy/version_*/checkpoints/last.ckpt", out / "logs")
    steps = {int(m.group(1)): p for p in last.parent.glob("*.ckpt") if (m := re.search(r"step=(\d+)", p.name))}
    steps.setdefault(int(torch.load(last, map_location="cpu", weights_only=True)["global_step"]), last)
    candidates = out / "teacher" / "candidates"
    shutil.rmtree(candidates, ignore_errors=True)
    measure, _, clips, _ = _continuations(cfg, paths)
    selection_clips = clips[cfg.num_prompt_clips:]  # the demo's prompts come from the first clips
    if not selection_clips:
        raise ValueError(f"no held-out clip left to choose the teacher with: teacher_eval_clips "
                         f"({cfg.teacher_eval_clips}) must exceed num_prompt_clips ({cfg.num_prompt_clips})")

    def measure_step(step: int) -> dict:
        weights, _ = export_teacher(steps[step], candidates / f"step_{step:06d}.safetensors")
        summary = measure(load_dit(weights), selection_clips)["all"]
        print(f"teacher step {step}: continuations at {continuation_fidelity(summary):.2f} of the truth "
              f"(background {summary['background_coverage']:.2f}, sprites {summary['sprite_presence']:.2f}; truth "
              f"{summary['truth_background_coverage']:.2f}, {summary['truth_sprite_presence']:.2f})", flush=True)
        return summary

    choice = select_checkpoint(sorted(steps), measure_step, continuation_fidelity)
    chosen = candidates / f"step_{choice.best:06d}.safetensors"
    paths["teacher"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["teacher"].parent / "config.json", (candidates / "config.json").read_text())
    record = {"step": choice.best, "score": choice.score, "clips": len(selection_clips),
              "rows": [{("step" if k == "candidate" else k): v for k, v in row.items()} for row in choice.rows]}
    atomic_write_text(paths["teacher"].parent / "selection.json", json.dumps(record, indent=2))
    with atomic_path(paths["teacher"]) as temporary:  # written last: the stage's output, never half-copied
        shutil.copyfile(chosen, temporary)
    log.append({"stage": "teacher checkpoint selection", "seconds": round(time.perf_counter() - start, 1),
                "command": f"cf.evaluation.checkpoint_selection.select_checkpoint: step {choice.best} of "
                           f"{sorted(steps)}"})
    return record


def _teacher_quality(cfg: DemoConfig, paths: dict[str, Path], out: Path, log: list) -> dict:
    """Continuations of held-out clips by the toy base and the ERFT teacher (same clips, same noise), with the
    checkpoint selection's record."""
    from cf.toy_base import load_dit

    cached = out / "teacher" / "continuations.json"
    selection = out / "teacher" / "selection.json"
    if cached.exists():
        result = json.loads(cached.read_text())
    else:
        start = time.perf_counter()
        measure, base, clips, result = _continuations(cfg, paths)
        for name, network in (("base", base), ("teacher", load_dit(paths["teacher"]))):
            result[name] = measure(network, clips)
        cached.write_text(json.dumps(result, indent=2))
        log.append({"stage": "teacher continuations (base vs ERFT)", "seconds": round(time.perf_counter() - start, 1),
                    "command": "cf.evaluation.continuation.continuation_quality"})
    if selection.exists():
        result["selection"] = json.loads(selection.read_text())
    return result


def _generate(weights: Path, prompts: list, folder: Path, cfg: DemoConfig, memory: str, log: StageLog) -> None:
    """60 s videos of ``prompts`` by the generator ``weights`` into ``folder``; videos made by the same command from
    the same weights (by SHA-256) are kept, so a re-trained generator always gets new videos."""
    from cf.generate import GeneratorSpec, generate_videos, load_generator

    names = [p.name for p in prompts]
    stage = f"generate {folder.name}"
    command = f"cf generate --weights {weights} --memory {memory} --seconds {cfg.seconds:g} --seed {cfg.seed}"
    digest = file_fingerprint(weights)
    record = log.record_of(stage)
    videos = [folder / f"{n}.mp4" for n in names]
    if all(v.exists() for v in videos) and record is not None and record.get("command") == command:
        if record.get("weights") == digest:
            return
        if "weights" not in record and min(v.stat().st_mtime for v in videos) > weights.stat().st_mtime:
            return  # recorded before weight fingerprints were kept: the videos are newer than the weights
    start = time.perf_counter()
    spec = GeneratorSpec.load(weights.parent / "config.json")
    model = load_generator(spec, weights)
    generate_videos(spec, model, [p.text for p in prompts], folder, seconds=cfg.seconds, seed=cfg.seed,
                    memory=memory, batch_size=len(prompts), names=names, overwrite=True)
    log.append({"stage": stage, "seconds": round(time.perf_counter() - start, 1), "command": command,
                "weights": digest})


def _evaluate_and_report(videos: dict[str, Path], clips: list, prompts: list, out: Path, cfg: DemoConfig,
                         log: StageLog, teacher_quality: dict, autoencoder: Any) -> Path:
    """Score every video and the held-out clips (as they are, and through the students' autoencoder: the best a
    model of that latent space can draw), write the frame strips and the report."""
    from tqdm.auto import tqdm

    from cf.demo_report import STRIP_COLUMNS, autoencoded, score_video, summarize_models, write_report
    from cf.evaluation.frame_strip import frame_strip, save_png
    from cf.video_io import decode_mp4

    start = time.perf_counter()
    scores: dict[str, list] = {"dataset": [], "dataset_autoencoded": []}
    through = [autoencoded(c["frames"], autoencoder) for c in clips]
    for prompt in prompts:  # the held-out clip itself, scored as its named and as its unnamed prompt
        scores["dataset"].append(score_video(clips[prompt.clip]["frames"], prompt, FPS))
        scores["dataset_autoencoded"].append(score_video(through[prompt.clip], prompt, FPS))
    strips = {}
    todo = [(model, prompt) for model in videos for prompt in prompts]
    frames_of: dict[str, list] = {model: [] for model in videos}
    for model, prompt in tqdm(todo, desc="scoring videos", unit="video"):
        frames, fps = decode_mp4(videos[model] / f"{prompt.name}.mp4")
        scores.setdefault(model, []).append(score_video(frames, prompt, fps))
        frames_of[model].append(frames)
    for model, rows in {"dataset": [c["frames"] for c in clips for _ in (0, 1)],
                        "dataset_autoencoded": [f for f in through for _ in (0, 1)], **frames_of}.items():
        path = out / "strips" / f"{model}.png"
        save_png(frame_strip([[f] for f in rows], columns=STRIP_COLUMNS, scale=1), path)
        strips[model] = str(path.relative_to(out))
    summary = summarize_models(scores)
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    log.append({"stage": "score videos", "seconds": round(time.perf_counter() - start, 1),
                "command": "cf.demo_report.score_video (prompt fidelity, re-entry consistency)"})
    return write_report(out, summary, strips, teacher_quality, log, log.wall_seconds(), asdict(cfg), videos)


def run_pipeline_seeds(cfg: DemoConfig, seeds: list[int]) -> Path:
    """The whole pipeline once per seed into ``<out>/seed_<k>``, then ``<out>/claim.md``."""
    from cf.demo_report import claim_table

    root = Path(cfg.out)
    runs = {}
    for seed in seeds:
        one = DemoConfig(**{**asdict(cfg), "out": str(root / f"seed_{seed}"), "seed": seed})
        run_demo(one)
        runs[seed] = json.loads((root / f"seed_{seed}" / "summary.json").read_text())["models"]
    models = [m for m in ("dataset", *MODELS) if any(m in r for r in runs.values())]
    claim = root / "claim.md"
    claim.write_text("# The claim over seeds of the whole pipeline\n\n" + claim_table(runs, models) + "\n")
    print(f"\nclaim: {claim}")
    return claim


def run(args: argparse.Namespace) -> None:
    cfg = DemoConfig(out=args.out, num_clips=args.num_clips, teacher_steps=args.teacher_steps,
                     stage0_steps=args.stage0_steps, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                     ablation=args.ablation,
                     seconds=args.seconds, num_prompt_clips=args.num_prompt_clips, seed=args.seed, base=args.base,
                     fresh=args.fresh)
    if args.quick:
        cfg.num_clips, cfg.num_val_clips, cfg.teacher_steps = 24, 4, 20
        cfg.stage0_steps = cfg.stage1_steps = cfg.stage2_steps = 6
        cfg.seconds, cfg.num_prompt_clips, cfg.teacher_eval_clips = 10.0, 1, 2
    if args.pipeline_seeds:
        run_pipeline_seeds(cfg, args.pipeline_seeds)
    else:
        run_demo(cfg)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run the whole toy pipeline on a CPU and write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoConfig()
    p.add_argument("--out", default=defaults.out, help="output folder (default runs/demo)")
    p.add_argument("--num-clips", type=int, default=defaults.num_clips, help="training clips to synthesise")
    p.add_argument("--teacher-steps", type=int, default=defaults.teacher_steps, help="ERFT steps of the teacher")
    p.add_argument("--stage0-steps", type=int, default=defaults.stage0_steps, help="steps of the ODE regression")
    p.add_argument("--stage1-steps", type=int, default=defaults.stage1_steps, help="critic steps of stage 1")
    p.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps,
                   help="critic steps of each stage-2 run (Context Forcing, baseline, ablation)")
    p.add_argument("--ablation", action="store_true",
                   help="also train and evaluate stage 2 without contextual DMD (about 5 more minutes)")
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="length of the generated videos")
    p.add_argument("--num-prompt-clips", type=int, default=defaults.num_prompt_clips,
                   help="held-out clips to generate for (each gives a named and an unnamed prompt)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="training and generation seed of every stage")
    p.add_argument("--pipeline-seeds", type=int, nargs="+", default=None,
                   help="run the whole pipeline once per seed into <out>/seed_<k> and write <out>/claim.md")
    p.add_argument("--base", default=defaults.base, help="toy base weights (default: the shipped configs/toy/base)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the pipeline in minutes")
    p.set_defaults(func=run)
    return p
