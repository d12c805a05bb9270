"""`cf generate`: stream long videos from a trained causal student, chunk by chunk, straight into mp4 files.

A generator is described by a `GeneratorSpec` (`config.json` beside the weights, written by the student's export):
the DiT config, chunk size, the autoencoder and text encoder (names like "toy"/"hashed" or local folders), the
latent size and fps. Latents are decoded as chunks arrive and appended to the mp4, so neither memory nor time per
chunk grows with the length of the video (with a bounded memory preset).

Each mp4 is written beside its final name and renamed when complete. Ctrl-C (SIGINT) or SIGTERM finishes the current
chunk and closes the videos in progress as playable mp4s of the chunks done, says so, and exits with 128 + the
signal number. Existing videos are never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cf.atomic import atomic_write_text
from cf.encoders import build_autoencoder, build_text_encoder, resolve_dtype
from cf.export import GeneratorSpec, is_training_checkpoint, read_generator_weights
from cf.models.wan import CausalWanDiT
from cf.rollout import SamplingConfig, stream
from cf.video_io import Mp4Writer
from cf.weights import NonFiniteWeightsError, check_finite_weights, load_into


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
    checkpoint, EMA weights first when ``use_ema``); random weights when None. Weights holding NaN/inf are refused
    (`cf.weights.NonFiniteWeightsError`)."""
    model = CausalWanDiT(spec.model_config(), frames_per_chunk=spec.frames_per_chunk)
    if weights is not None:
        state = read_generator_weights(weights, use_ema)
        check_finite_weights(state, weights, action="generate from")
        load_into(model, state, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def check_generation_arguments(seconds: float, batch_size: int) -> None:
    """Raise ValueError naming the fix for a video length that is not a positive finite number of seconds or a
    batch size below 1."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ValueError(f"--seconds must be a positive, finite number of seconds, got {seconds!r}; e.g. --seconds 10")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}; e.g. --batch-size 4")


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats made distinct by a ``_2``, ``_3``, ... suffix (first occurrence unchanged)."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


class GenerationInterrupted(Exception):
    """SIGINT / SIGTERM stopped `generate_videos`; the videos of the batch in progress were closed as playable mp4s
    of the chunks done. ``kept``: their paths; ``finished``: the complete videos of earlier batches."""

    def __init__(self, signal_name: str, kept: list[Path], finished: list[Path], chunks_done: int,
                 chunks_total: int, seconds_kept: float, seconds: float, not_started: int) -> None:
        self.signal_name, self.kept, self.finished = signal_name, kept, finished
        kept_text = ", ".join(map(str, kept)) or "none (no chunk was done)"
        super().__init__(
            f"interrupted by {signal_name} after {chunks_done} of {chunks_total} chunks: kept {len(kept)} playable "
            f"video(s) of {seconds_kept:.2f} s (of {seconds:g} s asked): {kept_text}; {len(finished)} video(s) "
            f"finished before; {not_started} prompt(s) not started"
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process stopped by that signal."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


class _StopOnSignal:
    """Inside the block, the first SIGINT / SIGTERM asks the generation to stop after the current chunk
    (``received`` names it); a second one raises KeyboardInterrupt at once. Only in the main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: finishing the current chunk, then closing the videos as playable mp4s "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
    overwrite: bool = False,
    encoder_dtype: str | None = None,
    offload_text_encoder: bool = False,
    seeds: list[int] | None = None,
) -> list[Path]:
    """Generate one video per prompt into `out_dir` (`<name>.mp4` + `<name>.txt` with the prompt).

    Prompts are batched `batch_size` at a time; prompt i draws its noise from its own generator seeded with
    ``seeds[i]`` (default ``seed + i``), so a video does not depend on the batch or the process it is made in.
    Returns the paths.
    The encoders run in ``encoder_dtype`` (default: the spec's); with ``offload_text_encoder`` every prompt is
    embedded first and the text encoder then moves to the CPU (umT5-XXL is ~11 GB in bf16).
    Repeated names get a ``_2``, ``_3`` suffix; existing files are an error (FileExistsError, before anything is
    generated) unless ``overwrite``. Each mp4 appears under its name only when complete. On SIGINT / SIGTERM the
    current chunk is finished, the videos of the batch in progress are closed as playable mp4s of the chunks done,
    and `GenerationInterrupted` is raised.
    """
    check_generation_arguments(seconds, batch_size)
    out_dir = Path(out_dir)
    names = unique_names(names or [f"{i:03d}_{slug(p)}" for i, p in enumerate(prompts)])
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    if len(names) != len(prompts) or len(seeds) != len(prompts):
        raise ValueError(f"{len(names)} names and {len(seeds)} seeds for {len(prompts)} prompts")
    existing = [out_dir / f"{n}{suffix}" for n in names for suffix in (".mp4", ".txt")
                if (out_dir / f"{n}{suffix}").exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} of the output files do); pass "
                              "--overwrite to replace them, or choose another --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_dtype = encoder_dtype or spec.encoder_dtype
    autoencoder = build_autoencoder(spec.autoencoder, dtype=encoder_dtype, **spec.autoencoder_kwargs).to(device)
    text_encoder = build_text_encoder(spec.text_encoder, dtype=encoder_dtype, **spec.text_encoder_kwargs).to(device)
    embedded: dict[int, torch.Tensor] = {}
    if offload_text_encoder:
        for b0 in range(0, len(prompts), batch_size):
            embedded[b0] = text_encoder(prompts[b0 : b0 + batch_size]).to(device)
        text_encoder.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    memory_config = spec.memory_config(memory, keyframes)
    sampling = SamplingConfig(**spec.sampling)
    num_frames = latent_frames_for(seconds, spec.fps, spec.frames_per_chunk)
    total_chunks = num_frames // spec.frames_per_chunk
    paths: list[Path] = []
    with _StopOnSignal() as stop:
        for b0 in range(0, len(prompts), batch_size):
            batch_prompts = prompts[b0 : b0 + batch_size]
            batch_names = names[b0 : b0 + len(batch_prompts)]
            writers = [Mp4Writer(out_dir / f"{name}.mp4", fps=spec.fps) for name in batch_names]
            done = 0
            try:
                if stop.received is None:
                    text = embedded[b0] if b0 in embedded else text_encoder(batch_prompts).to(device)
                    decoder = autoencoder.stream_decoder()
                    chunks = stream(model, text, num_frames, tuple(spec.latent_size), memory=memory_config,
                                    sampling=sampling, generator=[
                                        torch.Generator(device=device).manual_seed(s)
                                        for s in seeds[b0 : b0 + len(batch_prompts)]])
                    bar = tqdm(chunks, total=total_chunks, unit="chunk", disable=not progress,
                               desc=f"generating {b0 + 1}-{b0 + len(batch_prompts)}/{len(prompts)}")
                    for latents in bar:
                        pixels = decoder(latents.float())  # [B, 3, t, H, W] in [-1, 1]
                        for i, writer in enumerate(writers):
                            writer.write(pixels[i])
                        done += 1
                        if stop.received is not None:
                            break
                    bar.close()
            except KeyboardInterrupt:  # a second signal, or Ctrl-C outside the main thread's handler
                stop.received = stop.received or "SIGINT"
            except BaseException:
                for writer in writers:
                    writer.abort()
                raise
            if stop.received is not None:
                kept = _keep_partial(writers, batch_prompts, batch_names, out_dir)
                seconds_kept = max((w.frames_written for w in writers), default=0) / spec.fps
                raise GenerationInterrupted(stop.received, kept, paths, done, total_chunks, seconds_kept, seconds,
                                            len(prompts) - b0 - (len(batch_prompts) if kept else 0))
            for writer, prompt, name in zip(writers, batch_prompts, batch_names):
                writer.close()
                atomic_write_text(out_dir / f"{name}.txt", prompt + "\n")
                paths.append(out_dir / f"{name}.mp4")
    return paths


def _keep_partial(writers: list[Mp4Writer], prompts: list[str], names: list[str], out_dir: Path) -> list[Path]:
    """Close the writers that hold frames as playable mp4s (with their prompt files); drop the others."""
    kept = []
    for writer, prompt, name in zip(writers, prompts, names):
        if writer.frames_written == 0:
            writer.abort()
            continue
        writer.close()
        atomic_write_text(out_dir / f"{name}.txt", prompt + "\n")
        kept.append(out_dir / f"{name}.mp4")
    return kept


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


def resolve_spec(weights: Path | None, config: str | Path | None) -> GeneratorSpec:
    """The `GeneratorSpec` for ``--weights`` / ``--config``: the given config, else the ``config.json`` beside the
    weights, else the spec a student ``.ckpt`` stores, else (no weights) the toy default. Errors name the fix."""
    if weights is not None:
        if not weights.exists():
            raise FileNotFoundError(f"--weights {weights}: file not found; pass the generator.safetensors written by "
                                    "the student's export (config.json beside it) or a student .ckpt")
        if weights.is_file() and weights.stat().st_size == 0:
            raise ValueError(f"--weights {weights} is empty (0 bytes), a write that did not finish; pass an earlier "
                             "checkpoint or export")
    if config:
        return GeneratorSpec.load(config)
    if weights is None:
        return GeneratorSpec()  # the toy default with random weights (a smoke test of the pipeline)
    if (weights.parent / "config.json").exists():
        return GeneratorSpec.load(weights.parent / "config.json")
    if weights.suffix == ".ckpt" or is_training_checkpoint(weights):
        try:
            stored = GeneratorSpec.from_checkpoint(weights)
        except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
            raise ValueError(f"--weights {weights} cannot be read as a checkpoint ({str(err)[:200]}); it may be "
                             "truncated: pass an earlier checkpoint") from err
        if stored:
            return stored
    raise FileNotFoundError(
        f"no config.json next to {weights}; pass --config with the generator's config.json (the student's "
        "export writes one next to generator.safetensors)"
    )


def generation_dtypes(device: str | torch.device, dtype: str, encoder_dtype: str, spec: GeneratorSpec
                      ) -> tuple[torch.dtype, str]:
    """(DiT dtype, encoder dtype name) for ``cf generate``: ``"auto"`` is bfloat16 on CUDA, and on other devices
    float32 for the DiT and the generator's training dtype for the encoders."""
    cuda = torch.device(device).type == "cuda"
    dit = resolve_dtype("bfloat16" if dtype == "auto" and cuda else "float32" if dtype == "auto" else dtype)
    encoders = ("bfloat16" if cuda else spec.encoder_dtype) if encoder_dtype == "auto" else encoder_dtype
    return dit, encoders


def process_share(count: int) -> list[int]:
    """The prompt indices this process generates: all of them, or under torchrun (``RANK`` / ``WORLD_SIZE``) every
    ``WORLD_SIZE``-th one from ``RANK``. Names and seeds follow the global index, so no two processes write the
    same file and the videos equal a single process's."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    return list(range(rank, count, world))


def run(args: argparse.Namespace) -> None:
    weights = Path(args.weights) if args.weights else None
    try:
        check_generation_arguments(args.seconds, args.batch_size)
        spec = resolve_spec(weights, args.config)
        prompts = read_prompts(args.prompt, args.prompts)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"cf generate: {err}") from None
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    names = unique_names([f"{i:03d}_{slug(p)}" for i, p in enumerate(prompts)])
    mine = process_share(len(prompts))
    dtype, encoder_dtype = generation_dtypes(device, args.dtype, args.encoder_dtype, spec)
    try:
        model = load_generator(spec, weights, device, dtype, use_ema=not args.no_ema)
    except NonFiniteWeightsError as err:
        raise SystemExit(f"cf generate: {err}") from None
    start = time.perf_counter()
    try:
        paths = generate_videos(spec, model, [prompts[i] for i in mine], args.out, seconds=args.seconds,
                                memory=args.memory, keyframes=args.keyframes, batch_size=args.batch_size,
                                device=device, overwrite=args.overwrite, encoder_dtype=encoder_dtype,
                                offload_text_encoder=args.offload_text_encoder, names=[names[i] for i in mine],
                                seeds=[args.seed + i for i in mine])
    except FileExistsError as err:
        raise SystemExit(f"cf generate: {err}") from None
    except GenerationInterrupted as stopped:
        print(f"cf generate: {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(stopped.exit_code) from None
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
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the DiT's dtype (auto: bfloat16 on CUDA, which takes the flash-attn path; float32 on CPU)")
    p.add_argument("--encoder-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the VAE's and text encoder's dtype (auto: bfloat16 on CUDA, else the generator's own)")
    p.add_argument("--offload-text-encoder", action="store_true",
                   help="embed every prompt first, then move the text encoder to the CPU (frees ~11 GB for umT5)")
    p.add_argument("--out", default="runs/generate", help="output folder (default runs/generate)")
    p.add_argument("--overwrite", action="store_true", help="replace videos of the same name in --out (default: "
                   "refuse)")
    p.set_defaults(func=run)
    return p
