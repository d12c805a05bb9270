"""`cf toy-base`: the embedded toy's pretrained base model, what Wan2.1-T2V-1.3B is for the real run.

The base is a plain flow-matching text-to-video DiT trained from scratch on the synthetic sprite dataset by
`configs/toy/base.yaml` (`TeacherERFT` with ERFT off, a target-only layout and caption dropout). The command

1. writes the dataset (`cf data synth`, lossless, so it is the same bytes every time),
2. trains the base (`cf fit --config configs/toy/base.yaml`),
3. exports its EMA weights in the Wan layout with `config.json` (the `WanConfig`) and `base.json` (the recipe, the
   command, seed, wall time and the measured quality) into the weights folder,
4. measures it: the base's own sampler (Euler steps over the shifted σ grid, classifier-free guidance) draws clips
   for held-out prompts; `cf.evaluation.prompted.prompt_fidelity` scores them against the held-out clips' ground
   truth, next to the same score of the held-out clips themselves; a frame strip (generated | dataset through the
   autoencoder | dataset) goes beside.

    cf toy-base                          # retrain and replace configs/toy/base/ (hours on 2 CPU cores)
    cf toy-base --evaluate-only          # measure the shipped weights again

The teacher starts from these weights (``init_weights``) the way the real teacher starts from Wan2.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "toy" / "base.yaml"
WEIGHTS_DIR = REPO / "configs" / "toy" / "base"
WEIGHTS_NAME = "base.safetensors"

__all__ = ["BaseMeasureConfig", "held_out_clips", "load_base", "load_dit", "model_init_args", "sample_base",
           "measure_base", "run_toy_base"]


@dataclass
class BaseMeasureConfig:
    """How the base is measured: ``num_prompts`` held-out clips with named captions, ``samples_per_prompt`` draws
    for each, ``windows_per_clip`` dataset windows of the generated length per clip as the reference, sampler
    settings from the base's own config."""

    num_prompts: int = 32
    samples_per_prompt: int = 2
    windows_per_clip: int = 4
    seed: int = 0
    strip_rows: int = 8


def model_init_args(config_path: str | Path) -> dict[str, Any]:
    """``model.init_args`` of a LightningCLI YAML config."""
    import yaml

    return yaml.safe_load(Path(config_path).read_text())["model"]["init_args"]


def _data_args(config_path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(config_path.read_text())["data"]["init_args"]


def held_out_clips(val_dir: str | Path, limit: int, named_only: bool = True) -> list[dict[str, Any]]:
    """Up to ``limit`` clips of the shards in ``val_dir`` (sorted), each ``{"key", "caption", "gt", "frames"}``
    (frames uint8 ``[T, H, W, 3]`` decoded from the shard); with ``named_only`` only clips whose caption names the
    background colour and the sprite colours."""
    from cf.evaluation.prompted import measured_attributes
    from cf.video_io import decode_mp4

    shards = sorted(Path(val_dir).glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar in {val_dir}; write the dataset with `cf data synth` first")
    clips: list[dict[str, Any]] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(members):
            sample = members[key]
            gt = json.loads(sample["json"])
            if named_only and measured_attributes(gt) != {"background_color", "sprite_colors"}:
                continue
            frames, _ = decode_mp4(sample["mp4"])
            clips.append({"key": key, "caption": sample["txt"].decode("utf-8").strip(), "gt": gt, "frames": frames})
            if len(clips) == limit:
                return clips
    return clips


def load_dit(weights: str | Path):
    """A frozen `WanDiT` in eval mode with the Wan-layout ``weights``, built from the ``config.json`` beside them
    (the toy base, an exported toy teacher)."""
    from cf.models.wan import WanConfig, WanDiT
    from cf.weights import load_wan_weights

    weights = Path(weights)
    network = WanDiT(WanConfig(**json.loads((weights.parent / "config.json").read_text())))
    load_wan_weights(network, weights)
    return network.eval().requires_grad_(False)


def load_base(weights_dir: str | Path = WEIGHTS_DIR, config_path: str | Path = CONFIG):
    """(DiT with the base weights, autoencoder, text encoder, model args of the config) for sampling."""
    from cf.encoders import build_autoencoder, build_text_encoder

    weights = Path(weights_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no base weights at {weights}; train them with `cf toy-base`")
    args = model_init_args(config_path)
    autoencoder = build_autoencoder(args["autoencoder"], **(args.get("autoencoder_args") or {}))
    text_encoder = build_text_encoder(args["text_encoder"], **(args.get("text_encoder_args") or {}))
    return load_dit(weights), autoencoder, text_encoder, args


@torch.no_grad()
def sample_base(network, autoencoder, text_encoder, prompts: list[str], num_latents: int,
                latent_size: tuple[int, int], sampling: dict[str, Any], seed: int = 0,
                batch_size: int = 16) -> list[np.ndarray]:
    """uint8 ``[T, H, W, 3]`` clips of ``num_latents`` latent frames (``latent_size`` = (h, w)) for ``prompts``,
    drawn from noise with the teacher's sampler (`cf.sampling.continue_latents` with an empty context: Euler
    over ``sampling_sigmas(num_inference_steps, shift)``, CFG against the negative prompt) and decoded."""
    from cf.diffusion import sampling_sigmas
    from cf.sampling import continue_latents
    from cf.video_io import to_uint8_frames

    sigmas = sampling_sigmas(int(sampling["num_inference_steps"]), float(sampling["shift"]))
    negative = text_encoder.embed_cached([sampling.get("negative_prompt", "")])
    generator = torch.Generator().manual_seed(int(seed))
    out: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        context = torch.zeros(len(chunk), autoencoder.latent_channels, 0, *latent_size)
        latents = continue_latents(network, context, text_encoder(chunk), num_latents, sigmas,
                                   float(sampling["guidance_scale"]), negative.expand(len(chunk), *negative.shape[1:]),
                                   generator=generator)
        out += [to_uint8_frames(video) for video in autoencoder.decode(latents)]
    return out


def _autoencoded(autoencoder, frames: np.ndarray) -> np.ndarray:
    from cf.video_io import to_uint8_frames

    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    return to_uint8_frames(autoencoder.decode(autoencoder.encode(video))[0])


def _mean_scores(frames: list[np.ndarray], gts: list[dict]) -> dict[str, float]:
    """Means over clips of background coverage and sprite presence, and their standard errors (``*_sem``)."""
    from cf.evaluation.prompted import prompt_fidelity

    scores = [prompt_fidelity(f, gt) for f, gt in zip(frames, gts)]
    out = {}
    for key in ("background_coverage", "sprite_presence"):
        values = np.array([s[key] for s in scores], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_sem"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return out


def measure_base(weights_dir: str | Path, data_dir: str | Path, config_path: str | Path = CONFIG,
                 cfg: BaseMeasureConfig = BaseMeasureConfig(), strip_path: str | Path | None = None,
                 sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prompt fidelity of the base's samples for held-out prompts, of the held-out clips themselves (evenly spaced
    windows of the same length, as stored and through the autoencoder) and their ratios; writes the frame strip
    (rows: generated | the clip's first window through the autoencoder | as stored) to ``strip_path`` when given.
    ``sampling`` overrides fields of the config's sampler (e.g. ``{"guidance_scale": 2.0}``)."""
    from cf.encoders import VideoAutoencoder
    from cf.evaluation.frame_strip import frame_strip, save_png

    network, autoencoder, text_encoder, args = load_base(weights_dir, config_path)
    sampler = {**args["sampling"], **(sampling or {})}
    data = _data_args(Path(config_path))
    num_frames = int(data["num_frames"])
    num_latents = VideoAutoencoder.num_latent_frames(num_frames, autoencoder.temporal_factor)
    latent_size = (int(data["height"]) // autoencoder.spatial_factor, int(data["width"]) // autoencoder.spatial_factor)
    clips = held_out_clips(Path(data_dir) / "val", cfg.num_prompts)
    if not clips:
        raise ValueError(f"no held-out clip with a named caption in {data_dir}/val")
    start = time.perf_counter()
    draws = max(1, int(cfg.samples_per_prompt))
    generated = sample_base(network, autoencoder, text_encoder, [c["caption"] for c in clips] * draws, num_latents,
                            latent_size, sampler, cfg.seed)
    sampling_s = time.perf_counter() - start
    windows, window_gts = [], []
    for clip in clips:
        total = clip["frames"].shape[0]
        for first in np.linspace(0, total - num_frames, cfg.windows_per_clip).round().astype(int):
            windows.append(clip["frames"][first : first + num_frames])
            window_gts.append(clip["gt"])
    result = {
        "prompts": len(clips), "samples_per_prompt": draws, "num_pixel_frames": num_frames, "sampling": sampler,
        "sampling_seconds": round(sampling_s, 1),
        "generated": _mean_scores(generated, [c["gt"] for c in clips] * draws),
        "dataset": _mean_scores(windows, window_gts),
        "dataset_autoencoded": _mean_scores([_autoencoded(autoencoder, w) for w in windows], window_gts),
    }
    result["ratio_to_dataset"] = {k: result["generated"][k] / max(result["dataset"][k], 1e-9)
                                  for k in ("background_coverage", "sprite_presence")}
    if strip_path is not None:
        rows = [[g, _autoencoded(autoencoder, c["frames"][:num_frames]), c["frames"][:num_frames]]
                for g, c in zip(generated[: cfg.strip_rows], clips)]
        save_png(frame_strip(rows, columns=4), strip_path)
        result["strip"] = str(strip_path)
    return result


@dataclass
class ToyBaseConfig:
    """What `cf toy-base` does (see the module docstring)."""

    out: str = "runs/toy_base"
    weights: str = str(WEIGHTS_DIR)
    num_clips: int = 1024
    val_clips: int = 32
    unnamed_fraction: float = 0.25
    seed: int = 0
    max_steps: int | None = None
    resume: bool = False
    evaluate_only: bool = False


def run_toy_base(cfg: ToyBaseConfig) -> dict[str, Any]:
    """Dataset -> training -> export -> measurement (or only the measurement); returns what base.json records."""
    from callbacks.ema import EMA
    from cf.convert import export_teacher, write_state_dict
    from cf.stage_runner import newest_file, run_stage, shard_urls

    out, weights = Path(cfg.out).resolve(), Path(cfg.weights).resolve()
    data = out / "data"
    cf = [sys.executable, "-m", "cf"]
    env = {"CF_DATA": str(data), "CF_RUNS": str(out / "logs"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log: list[dict] = []
    if not (data / "val" / "prompts.txt").exists():
        run_stage(cf + ["data", "synth", "--out", str(data), "--num-clips", str(cfg.num_clips), "--val-clips",
                        str(cfg.val_clips), "--unnamed-fraction", str(cfg.unnamed_fraction), "--seed", str(cfg.seed)],
                  env, log, "dataset")
    record: dict[str, Any] = json.loads((weights / "base.json").read_text()) if (weights / "base.json").is_file() \
        else {}
    if not cfg.evaluate_only:
        fit = cf + ["fit", "--config", str(CONFIG), "--seed_everything", str(cfg.seed),
                    "--data.init_args.train_urls", shard_urls(data / "train"),
                    "--data.init_args.val_urls", shard_urls(data / "val")]
        if cfg.max_steps is not None:
            fit += ["--trainer.max_steps", str(cfg.max_steps)]
        if cfg.resume:  # an interrupted training continues from its newest last.ckpt; the time before is kept
            fit += ["--ckpt_path", "last"]
        seconds = run_stage(fit, env, log, "train the base") + (record.get("train_wall_seconds", 0.0) if cfg.resume
                                                               else 0.0)
        checkpoint = newest_file("toy_base/version_*/checkpoints/last.ckpt", out / "logs")
        export_teacher(checkpoint, weights / WEIGHTS_NAME)  # config.json (WanConfig) and the training weights
        write_state_dict(EMA.read_ema_weights(checkpoint, attribute="network"), weights / WEIGHTS_NAME)
        defaults = asdict(ToyBaseConfig())
        flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
                 if k not in ("evaluate_only", "resume", "max_steps") and (v != defaults[k] or k == "seed")]
        if cfg.max_steps is not None:
            flags.append(f"--max-steps {cfg.max_steps}")
        record = {"command": " ".join(["cf toy-base", *flags]),
                  "config": str(CONFIG.relative_to(REPO)), "seed": cfg.seed, "dataset": {
                      "num_clips": cfg.num_clips, "val_clips": cfg.val_clips,
                      "unnamed_fraction": cfg.unnamed_fraction, "seed": cfg.seed},
                  "train_wall_seconds": round(seconds, 1), "checkpoint": str(checkpoint),
                  "stages": log}
    strip = weights / "frame_strip.png"
    record["quality"] = measure_base(weights, data, CONFIG, BaseMeasureConfig(seed=cfg.seed), strip)
    record["quality"]["strip"] = str(strip.relative_to(REPO)) if strip.is_relative_to(REPO) else str(strip)
    (weights / "base.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["quality"], indent=2))
    return record


def run(args: argparse.Namespace) -> None:
    run_toy_base(ToyBaseConfig(out=args.out, weights=args.weights, num_clips=args.num_clips,
                               val_clips=args.val_clips, unnamed_fraction=args.unnamed_fraction, seed=args.seed,
                               max_steps=args.max_steps, resume=args.resume, evaluate_only=args.evaluate_only))


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    defaults = ToyBaseConfig()
    p = subparsers.add_parser("toy-base", help="train, export and measure the toy base model (configs/toy/base)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=defaults.out, help="dataset and training logs (default runs/toy_base)")
    p.add_argument("--weights", default=defaults.weights, help="weights folder (default configs/toy/base)")
    p.add_argument("--num-clips", type=int, default=defaults.num_clips)
    p.add_argument("--val-clips", type=int, default=defaults.val_clips)
    p.add_argument("--unnamed-fraction", type=float, default=defaults.unnamed_fraction)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-steps", type=int, default=None, help="override the config's trainer.max_steps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its last.ckpt")
    p.add_argument("--evaluate-only", action="store_true", help="only measure the weights in --weights")
    p.set_defaults(func=run)
    return p
