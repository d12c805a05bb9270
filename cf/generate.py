"""`cf generate`: stream long videos from a trained causal student, chunk by chunk, straight into mp4 files.

A generator is described by a `GeneratorSpec` (`config.json` beside the weights, written by the student's export):
the DiT config, chunk size, the autoencoder and text encoder (names like "toy"/"hashed" or local folders), the
latent size and fps. Latents are decoded as chunks arrive and appended to the mp4, so neither memory nor time per
chunk grows with the length of the video (with a bounded memory preset).

A video can change its prompt on the way (``--prompt-schedule``, `cf.prompt_schedule`; ``--recache`` re-caches the
memory under the new prompt at each switch, `cf.recache`) and can continue given frames (``--init-video`` /
``--init-image``, `cf.init_frames`): they start the mp4 exactly as given and fill the memory before generation.

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

import numpy as np
import torch
from tqdm.auto import tqdm

from cf.atomic import atomic_write_text
from cf.encoders import build_autoencoder, build_text_encoder, resolve_dtype
from cf.export import GeneratorSpec, is_training_checkpoint, read_generator_weights
from cf.init_frames import encode_init_frames, read_init_frames
from cf.launch import process_share
from cf.models.wan import CausalWanDiT
from cf.prompt_schedule import PromptSchedule, latent_frames_for, parse_prompt_schedule  # noqa: F401 (re-exported)
from cf.recache import parse_regions
from cf.rollout import SamplingConfig, stream
from cf.video_io import Mp4Writer
from cf.weights import NonFiniteWeightsError, check_finite_weights, load_into


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


def load_generator(spec: GeneratorSpec, weights: str | Path | None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, use_ema: bool = True) -> CausalWanDiT:
    """The causal student with `weights` loaded strictly (`cf.export.read_generator_weights`: an export or a training
    checkpoint, EMA weights first when ``use_ema``); random weights when None, the same on every call (drawn from
    seed 0, the global random state untouched). Weights holding NaN/inf are refused
    (`cf.weights.NonFiniteWeightsError`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
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


def plan_video(spec: GeneratorSpec, item: str | PromptSchedule, seconds: float,
               init_frames: np.ndarray | None = None) -> tuple[PromptSchedule, list[int], int]:
    """(schedule, start latent frame of each segment, latent frames) of one video: a plain prompt lasts `seconds`,
    a schedule the sum of its durations. ValueError naming the fix for a segment shorter than a chunk or a video
    not longer than the given frames."""
    schedule = item if isinstance(item, PromptSchedule) else PromptSchedule.single(item, seconds)
    n = spec.frames_per_chunk
    starts = schedule.start_frames(spec.fps, n)
    num_frames = schedule.num_frames(spec.fps, n)
    if init_frames is not None:
        given = (len(init_frames) - 1) // 4 + 1
        if num_frames <= given:
            raise ValueError(f"the video ({schedule.seconds:g} s, {num_frames} latent frames) is not longer than the "
                             f"given frames ({len(init_frames)} frames, {given} latent frames); ask for more seconds "
                             "(they count from the start of the given frames)")
    return schedule, starts, num_frames


def _batches(plans: list[tuple[PromptSchedule, list[int], int]], batch_size: int) -> list[range]:
    """Consecutive videos of at most `batch_size` that share their switch frames and length (one `stream` each)."""
    batches: list[range] = []
    for i, (_, starts, frames) in enumerate(plans):
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and (plans[last.start][1], plans[last.start][2]) == \
                (starts, frames):
            batches[-1] = range(last.start, i + 1)
        else:
            batches.append(range(i, i + 1))
    return batches


@torch.no_grad()
def generate_videos(
    spec: GeneratorSpec,
    model: CausalWanDiT,
    prompts: list[str | PromptSchedule],
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
    recache: str = "none",
    init_frames: np.ndarray | None = None,
    lossless: bool = False,
) -> list[Path]:
    """Generate one video per prompt into `out_dir` (`<name>.mp4` + `<name>.txt` with the prompt).

    A prompt is a string (the video lasts `seconds`) or a `PromptSchedule` (its segments' prompts in turn, the video
    lasting the sum of their durations; the memory's `recache` regions are re-cached at each switch, `cf.recache`).
    `init_frames` (uint8 [T, H, W, 3], T = 1 + 4(mn − 1), `cf.init_frames.read_init_frames`) start every video: they
    are written as they are, and their latents committed to the memory; generation continues after them.
    Prompts are batched `batch_size` at a time (videos with the same switch frames); prompt i draws its noise from
    its own generator seeded with ``seeds[i]`` (default ``seed + i``), so a video does not depend on the batch or
    the process it is made in. Returns the paths.
    The encoders run in ``encoder_dtype`` (default: the spec's); with ``offload_text_encoder`` every prompt is
    embedded first and the text encoder then moves to the CPU (umT5-XXL is ~11 GB in bf16). ``lossless`` stores the
    frames exactly (`cf.video_io.Mp4Writer`).
    A video made from a schedule of two or more prompts also gets ``<name>.segments.json``, the pixel frames each
    prompt conditions (`cf.evaluation.segments`; `cf evaluate` scores each segment against its own prompt).
    Repeated names get a ``_2``, ``_3`` suffix; existing files are an error (FileExistsError, before anything is
    generated) unless ``overwrite``. Each mp4 appears under its name only when complete. On SIGINT / SIGTERM the
    current chunk is finished, the videos of the batch in progress are closed as playable mp4s of the chunks done,
    and `GenerationInterrupted` is raised.
    """
    check_generation_arguments(seconds, batch_size)
    out_dir = Path(out_dir)
    plans = [plan_video(spec, p, seconds, init_frames) for p in prompts]
    texts = [p if isinstance(p, str) else p.describe() for p in prompts]
    names = unique_names(names or [f"{i:03d}_{slug(plan[0].prompts[0])}" for i, plan in enumerate(plans)])
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    if len(names) != len(prompts) or len(seeds) != len(prompts):
        raise ValueError(f"{len(names)} names and {len(seeds)} seeds for {len(prompts)} prompts")
    existing = [out_dir / f"{n}{suffix}" for n in names for suffix in (".mp4", ".txt", ".segments.json")
                if (out_dir / f"{n}{suffix}").exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} of the output files do); pass "
                              "--overwrite to replace them, or choose another --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_dtype = encoder_dtype or spec.encoder_dtype
    autoencoder = build_autoencoder(spec.autoencoder, dtype=encoder_dtype, **spec.autoencoder_kwargs).to(device)
    text_encoder = build_text_encoder(spec.text_encoder, dtype=encoder_dtype, **spec.text_encoder_kwargs).to(device)
    batches = _batches(plans, batch_size)

    def segment_prompts(batch: range, segment: int) -> list[str]:
        return [plans[i][0].segments[segment].prompt for i in batch]

    embedded: dict[tuple[int, int], torch.Tensor] = {}
    if offload_text_encoder:
        for batch in batches:
            for k in range(len(plans[batch.start][1])):
                embedded[batch.start, k] = text_encoder(segment_prompts(batch, k)).to(device)
        text_encoder.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    init_latents = None if init_frames is None else encode_init_frames(autoencoder, init_frames, 1, device)
    memory_config = spec.memory_config(memory, keyframes)
    sampling = SamplingConfig(**spec.sampling)
    paths: list[Path] = []
    with _StopOnSignal() as stop:
        for batch in batches:
            batch_texts = [texts[i] for i in batch]
            batch_names = [names[i] for i in batch]
            _, starts, num_frames = plans[batch.start]
            total_chunks = num_frames // spec.frames_per_chunk
            writers = [Mp4Writer(out_dir / f"{name}.mp4", fps=spec.fps, lossless=lossless) for name in batch_names]
            done = seen = written = 0
            try:
                if stop.received is None:
                    embeddings = [embedded[batch.start, k] if (batch.start, k) in embedded else
                                  text_encoder(segment_prompts(batch, k)).to(device) for k in range(len(starts))]
                    decoder = autoencoder.stream_decoder()
                    chunks = stream(model, embeddings[0], num_frames, tuple(spec.latent_size), memory=memory_config,
                                    sampling=sampling, generator=[torch.Generator(device=device).manual_seed(seeds[i])
                                                                  for i in batch],
                                    text_schedule=list(zip(starts[1:], embeddings[1:])), recache=recache,
                                    init_latents=init_latents)
                    bar = tqdm(chunks, total=total_chunks, unit="chunk", disable=not progress,
                               desc=f"generating {batch.start + 1}-{batch.stop}/{len(prompts)}")
                    for latents in bar:
                        pixels = decoder(latents.float())  # [B, 3, t, H, W] in [-1, 1]
                        given = init_latents is not None and seen < init_latents.shape[2]
                        for i, writer in enumerate(writers):  # given frames: written as they are
                            writer.write(init_frames[written : written + pixels.shape[2]] if given else pixels[i])
                        seen, written = seen + latents.shape[2], written + pixels.shape[2]
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
                kept = _keep_partial(writers, batch_texts, batch_names, out_dir)
                seconds_kept = max((w.frames_written for w in writers), default=0) / spec.fps
                raise GenerationInterrupted(stop.received, kept, paths, done, total_chunks, seconds_kept,
                                            plans[batch.start][0].seconds,
                                            len(prompts) - batch.start - (len(batch) if kept else 0))
            for writer, text, name in zip(writers, batch_texts, batch_names):
                writer.close()
                atomic_write_text(out_dir / f"{name}.txt", text + "\n")
                _write_segments(out_dir / f"{name}.segments.json", plans[batch.start], spec)
                paths.append(out_dir / f"{name}.mp4")
    return paths


def _write_segments(path: Path, plan: tuple[PromptSchedule, list[int], int], spec: GeneratorSpec) -> None:
    """The pixel frames each prompt of a schedule conditions (`cf.evaluation.segments`), for `cf evaluate`; a
    one-prompt video has none (a stale file of that name is removed)."""
    schedule, starts, num_frames = plan
    if len(schedule.segments) < 2:
        path.unlink(missing_ok=True)
        return
    from cf.evaluation.segments import schedule_segments, write_segments

    segments = schedule_segments(schedule.prompts, starts, num_frames, [s.ground_truth for s in schedule.segments])
    write_segments(path, segments, spec.fps)


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


def frame_size(spec: GeneratorSpec) -> tuple[int, int]:
    """(H, W) of the generator's videos: the latent size times the autoencoder's spatial factor (8 for the Wan2.1
    VAE and the toy default; a toy's `spatial_factor` from its kwargs)."""
    factor = int(spec.autoencoder_kwargs.get("spatial_factor", 8))
    return spec.latent_size[0] * factor, spec.latent_size[1] * factor


def resolve_video_arguments(args: argparse.Namespace) -> tuple[list[str | PromptSchedule], float]:
    """The videos (prompts, or the one `--prompt-schedule`) and `--seconds` of a `cf generate` call; ValueError
    naming the fix for flags that do not go together."""
    if args.prompt_schedule is None:
        if args.recache != "none":
            raise ValueError("--recache acts at prompt switches; pass a --prompt-schedule with two or more prompts, "
                             "or drop --recache")
        seconds = 10.0 if args.seconds is None else args.seconds
        check_generation_arguments(seconds, args.batch_size)
        return list(read_prompts(args.prompt, args.prompts)), seconds
    if args.prompt or args.prompts:
        raise ValueError("--prompt-schedule makes one video from its own prompts; drop --prompt / --prompts, or the "
                         "schedule")
    schedule = parse_prompt_schedule(args.prompt_schedule)
    if args.seconds is not None:
        raise ValueError(f"--prompt-schedule sets the video's length (the sum of its durations, {schedule.seconds:g} "
                         "s); drop --seconds")
    parse_regions(args.recache)
    check_generation_arguments(schedule.seconds, args.batch_size)
    return [schedule], schedule.seconds


def run(args: argparse.Namespace) -> None:
    weights = Path(args.weights) if args.weights else None
    try:
        videos, seconds = resolve_video_arguments(args)
        spec = resolve_spec(weights, args.config)
        init_frames = None
        if args.init_video or args.init_image:
            init_frames = read_init_frames(args.init_video or args.init_image, frame_size(spec), spec.frames_per_chunk,
                                           image=bool(args.init_image))
        for video in videos:
            plan_video(spec, video, seconds, init_frames)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"cf generate: {err}") from None
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    first_prompts = [v if isinstance(v, str) else v.prompts[0] for v in videos]
    names = unique_names([f"{i:03d}_{slug(p)}" for i, p in enumerate(first_prompts)])
    mine = process_share(len(videos))
    dtype, encoder_dtype = generation_dtypes(device, args.dtype, args.encoder_dtype, spec)
    try:
        model = load_generator(spec, weights, device, dtype, use_ema=not args.no_ema)
    except NonFiniteWeightsError as err:
        raise SystemExit(f"cf generate: {err}") from None
    start = time.perf_counter()
    try:
        paths = generate_videos(spec, model, [videos[i] for i in mine], args.out, seconds=seconds,
                                memory=args.memory, keyframes=args.keyframes, batch_size=args.batch_size,
                                device=device, overwrite=args.overwrite, encoder_dtype=encoder_dtype,
                                offload_text_encoder=args.offload_text_encoder, names=[names[i] for i in mine],
                                seeds=[args.seed + i for i in mine], recache=args.recache, init_frames=init_frames,
                                lossless=args.lossless)
    except FileExistsError as err:
        raise SystemExit(f"cf generate: {err}") from None
    except GenerationInterrupted as stopped:
        print(f"cf generate: {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(stopped.exit_code) from None
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} video(s) of {seconds:g} s to {args.out} in {elapsed:.1f} s")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="stream long videos from a trained student into mp4 files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="student weights: a Wan-layout .safetensors (with its config.json), or a "
                   "Lightning checkpoint of the student (EMA weights; pass --config); omit for random toy weights")
    p.add_argument("--no-ema", action="store_true", help="with a checkpoint: use the training weights, not the EMA")
    p.add_argument("--config", help="generator config.json (default: the one next to --weights)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--prompt-schedule", metavar="SCHEDULE",
                   help='one video whose prompt changes: a JSONL file ({"prompt": "...", "seconds": 10} a line) or '
                   '"prompt one[10s] | prompt two[20s]"; it lasts the sum of the durations, and each switch takes '
                   "effect at the first chunk boundary at or after its time")
    p.add_argument("--recache", default="none", metavar="REGIONS",
                   help="memory regions re-cached under the new prompt at each switch: none (default), fast, slow, "
                   "sink, all, or joined by + (e.g. slow+fast)")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init-video", metavar="CLIP", help="continue this clip (the generator's frame size): its last "
                      "whole-chunk frames start the video as they are and fill the memory, then generation goes on")
    init.add_argument("--init-image", metavar="IMAGE", help="continue from this image, held still for one chunk")
    p.add_argument("--seconds", type=float, default=None, help="video length in seconds, given frames included "
                   "(default 10; with --prompt-schedule, the schedule's)")
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
    p.add_argument("--lossless", action="store_true", help="store the frames exactly (PNG frames in the mp4; "
                   "ffmpeg-based players only)")
    p.add_argument("--overwrite", action="store_true", help="replace videos of the same name in --out (default: "
                   "refuse)")
    p.set_defaults(func=run)
    return p
