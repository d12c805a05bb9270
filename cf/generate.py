"""`cf generate`: stream long videos from a trained causal student, chunk by chunk, straight into mp4 files.

A generator is described by a `GeneratorSpec` (`config.json` beside the weights, written by the student's export):
the DiT config, chunk size, the autoencoder and text encoder (names like "toy"/"hashed" or local folders), the
latent size and fps. Latents are decoded as chunks arrive and appended to the mp4, so neither memory nor time per
chunk grows with the length of the video (with a bounded memory preset).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cf.encoders import build_autoencoder, build_text_encoder
from cf.export import GeneratorSpec, read_generator_weights
from cf.models.wan import CausalWanDiT
from cf.rollout import SamplingConfig, stream
from cf.video_io import Mp4Writer
from cf.weights import load_into


def latent_frames_for(seconds: float, fps: int, frames_per_chunk: int) -> int:
    """Latent frames covering `seconds` of video (1 + 4(n−1) pixel frames), rounded up to whole chunks."""
    pixel = max(1, round(seconds * fps))
    latent = (pixel - 1 + 3) // 4 + 1
    return math.ceil(latent / frames_per_chunk) * frames_per_chunk


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


def load_generator(spec: GeneratorSpec, weights: str | Path | None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, use_ema: bool = True) -> CausalWanDiT:
    """The causal student with `weights` loaded strictly (`cf.export.read_generator_weights`: an export or a training
    checkpoint, EMA weights first when ``use_ema``); random weights when None."""
    model = CausalWanDiT(spec.model_config(), frames_per_chunk=spec.frames_per_chunk)
    if weights is not None:
        load_into(model, read_generator_weights(weights, use_ema), strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def generate_videos(
    spec: GeneratorSpec,
    model: CausalWanDiT,
    prompts: list[str],
    out_dir: str | Path,
    seconds: float = 10.0,
    seed: int = 0,
    memory: str | None = None,
    keyframes: str | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    names: list[str] | None = None,
) -> list[Path]:
    """Generate one video per prompt into `out_dir` (`<name>.mp4` + `<name>.txt` with the prompt).

    Prompts are batched `batch_size` at a time; each batch is seeded with `seed + batch index`. Returns the paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    autoencoder = build_autoencoder(spec.autoencoder, **spec.autoencoder_kwargs).to(device)
    text_encoder = build_text_encoder(spec.text_encoder, **spec.text_encoder_kwargs).to(device)
    memory_config = spec.memory_config(memory, keyframes)
    sampling = SamplingConfig(**spec.sampling)
    num_frames = latent_frames_for(seconds, spec.fps, spec.frames_per_chunk)
    names = names or [f"{i:03d}_{slug(p)}" for i, p in enumerate(prompts)]
    paths = []
    for b0 in range(0, len(prompts), batch_size):
        batch_prompts = prompts[b0 : b0 + batch_size]
        text = text_encoder(batch_prompts).to(device)
        decoder = autoencoder.stream_decoder()
        writers = [Mp4Writer(out_dir / f"{names[b0 + i]}.mp4", fps=spec.fps) for i in range(len(batch_prompts))]
        chunks = stream(model, text, num_frames, tuple(spec.latent_size), memory=memory_config,
                        sampling=sampling, seed=seed + b0 // batch_size)
        bar = tqdm(chunks, total=num_frames // spec.frames_per_chunk, unit="chunk", disable=not progress,
                   desc=f"generating {b0 + 1}-{b0 + len(batch_prompts)}/{len(prompts)}")
        for latents in bar:
            pixels = decoder(latents.float())  # [B, 3, t, H, W] in [-1, 1]
            for i, writer in enumerate(writers):
                writer.write(pixels[i])
        for i, writer in enumerate(writers):
            writer.close()
            (out_dir / f"{names[b0 + i]}.txt").write_text(batch_prompts[i] + "\n")
            paths.append(out_dir / f"{names[b0 + i]}.mp4")
    return paths


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    out = list(prompts or [])
    if prompt_file:
        path = Path(prompt_file)
        if not path.exists():
            raise FileNotFoundError(f"prompt file {path} not found (one prompt per line)")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return out


def run(args: argparse.Namespace) -> None:
    weights = Path(args.weights) if args.weights else None
    if args.config:
        spec = GeneratorSpec.load(args.config)
    elif weights is not None and (weights.parent / "config.json").exists():
        spec = GeneratorSpec.load(weights.parent / "config.json")
    elif weights is not None and weights.suffix == ".ckpt" and (stored := GeneratorSpec.from_checkpoint(weights)):
        spec = stored
    elif weights is None:
        spec = GeneratorSpec()  # the toy default with random weights (a smoke test of the pipeline)
    else:
        raise FileNotFoundError(
            f"no config.json next to {weights}; pass --config with the generator's config.json (the student's "
            "export writes one next to generator.safetensors)"
        )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_generator(spec, weights, args.device, dtype, use_ema=not args.no_ema)
    prompts = read_prompts(args.prompt, args.prompts)
    start = time.perf_counter()
    paths = generate_videos(spec, model, prompts, args.out, seconds=args.seconds, seed=args.seed,
                            memory=args.memory, keyframes=args.keyframes, batch_size=args.batch_size,
                            device=args.device)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} video(s) of {args.seconds:g} s to {args.out} in {elapsed:.1f} s")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="stream long videos from a trained student into mp4 files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="student weights: a Wan-layout .safetensors (with its config.json), or a "
                   "Lightning checkpoint of the student (EMA weights; pass --config); omit for random toy weights")
    p.add_argument("--no-ema", action="store_true", help="with a checkpoint: use the training weights, not the EMA")
    p.add_argument("--config", help="generator config.json (default: the one next to --weights)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--seconds", type=float, default=10.0, help="video length in seconds (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", choices=["slow_fast", "sliding", "self_forcing", "full", "released_code"],
                   help="memory preset (default: the generator's own memory config)")
    p.add_argument("--keyframes", choices=["similarity", "uniform", "always", "never"],
                   help="keyframe policy (default: the generator's own)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="runs/generate", help="output folder (default runs/generate)")
    p.set_defaults(func=run)
    return p
