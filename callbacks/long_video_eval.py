"""Long-video evaluation during training: stream videos with the student, score them, log curves and a sample.

Protocol of :class:`LongVideoEval` (reference.md §3.4, the Context Forcing windowed metrics, on a small prompt set):

1. Every ``every_n_steps`` trainer steps (and at the end of fit when ``at_fit_end``), the generator runs in eval mode,
   without gradients and with the global RNG state forked (training continues exactly as without the callback). It
   uses the **EMA weights** when an `callbacks.ema.EMA` callback on ``generator`` has started, else the training
   weights; the log says which (and ``<prefix>/uses_ema`` is 1 or 0). The training weights and every submodule's
   train/eval mode are restored afterwards.
2. Each (prompt, seed) pair gives one video of ``seconds`` s (rounded up to whole chunks): `cf.rollout.stream` with
   the module's memory (or the ``memory`` preset / fields), keyframe policy and sampling, batch 1, seeded by the seed,
   decoded chunk by chunk by the autoencoder's streaming decoder. Only the decoded uint8 frames of the current video
   are kept. With several ranks the pairs are split round-robin (under ZeRO-3 every rank runs the same number of
   rollouts, padding with discarded repeats, since forwards are collective).
3. `cf.evaluation.evaluate_video` scores each video: pixel similarity to the first frame and the ground-truth-free
   identity / background curves always; with ``dino`` the windowed DINOv2 score and VBench subject consistency; with
   ``clip`` CLIP-F (first-frame and consecutive), CLIP-T and VBench background consistency. Windowed metrics average
   over the videos that reach a timestamp; VBench consistencies are frame-weighted; the torchmetrics states are
   summed over ranks.
4. Rank 0 logs ``<prefix>/<metric>@<t>s`` per timestamp, ``<prefix>/<metric>@avg`` (mean over the timestamps),
   per-video scalar means (``<prefix>/identity_presence_mean`` …), VBench consistencies and flashbacks per minute to
   every Lightning logger; writes ``<out_dir>/step_<step>.json`` and a metric-vs-time PNG (also a TensorBoard image
   ``<prefix>/metrics_vs_time``); and logs the first (prompt, seed) video with `callbacks.video_logger.log_video`
   (``<prefix>/video``: GIF image summary + mp4 under ``<log_dir>/videos``). Undefined values (no window, no identity
   colour found) are left out of the scalars and written as null in the JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.aggregation import MeanMetric, SumMetric
from tqdm.auto import tqdm

from callbacks.video_logger import log_video
from cf.evaluation.metrics import VBenchConsistency, WindowedScore
from cf.evaluation.report import EvaluationConfig, evaluate_video
from cf.generate import latent_frames_for
from cf.lit.student import find_started_ema
from cf.memory import MemoryConfig
from cf.rollout import SamplingConfig, stream
from cf.video_io import encode_mp4, to_uint8_frames
from cf.zero import is_zero_partitioned

__all__ = ["LongVideoEval", "PeriodicGeneration", "StudentGeneration", "default_timestamps", "find_started_ema",
           "generation_mode", "log_scalars", "plot_metrics_vs_time", "read_prompt_list", "resolve_memory"]

_NOT_METRICS = ("num_frames", "fps", "duration_s")  # per-video scalars of evaluate_video that describe the video


# ----------------------------------------------------------------------------------------------------------------------
# Shared by the generation callbacks (this one and callbacks.throughput.StreamThroughputMonitor)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StudentGeneration:
    """What `cf.rollout.stream` needs from a `CDMDStudent`-like module, with an optional memory override."""

    generator: nn.Module
    memory: MemoryConfig
    sampling: SamplingConfig
    latent_size: tuple[int, int]
    fps: int
    frames_per_chunk: int

    @classmethod
    def from_module(cls, pl_module: nn.Module, memory: str | Mapping[str, Any] | None = None) -> "StudentGeneration":
        """Read the generator and its settings from ``pl_module``; ``memory``: a preset name or `MemoryConfig`
        fields replacing the module's memory (a preset brings its own keyframe rule)."""
        required = ("generator", "generator_spec", "embed", "autoencoder")
        missing = [name for name in required if not hasattr(pl_module, name)]
        if missing:
            raise TypeError(f"{type(pl_module).__name__} lacks {missing}: the generation callbacks need a "
                            "cf.lit.student.CDMDStudent (or a module with the same generator interface)")
        if getattr(pl_module, "built", True) is False:
            raise RuntimeError("the student's networks are not built yet (configure_model has not run)")
        spec = pl_module.generator_spec()
        fpc = int(spec.frames_per_chunk)
        config = spec.memory_config() if memory is None else resolve_memory(memory, fpc)
        return cls(generator=pl_module.generator, memory=config, sampling=SamplingConfig(**spec.sampling),
                   latent_size=tuple(int(s) for s in spec.latent_size), fps=int(spec.fps), frames_per_chunk=fpc)

    def num_latent_frames(self, seconds: float) -> int:
        """Latent frames of a ``seconds`` video, whole chunks (``1 + 4(n − 1)`` pixel frames)."""
        return latent_frames_for(seconds, self.fps, self.frames_per_chunk)


def resolve_memory(memory: str | Mapping[str, Any], frames_per_chunk: int) -> MemoryConfig:
    """A memory preset name or `MemoryConfig` fields -> `MemoryConfig` for ``frames_per_chunk``."""
    if isinstance(memory, str):
        return MemoryConfig.preset(memory, frames_per_chunk=frames_per_chunk)
    fields = {"frames_per_chunk": frames_per_chunk, **dict(memory)}
    try:
        return MemoryConfig(**fields)
    except TypeError as error:
        raise ValueError(f"memory override {dict(memory)}: {error}; give a preset name (slow_fast, sliding, "
                         "self_forcing, full, released_code) or MemoryConfig fields") from error


@contextlib.contextmanager
def generation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and a forked RNG state for the body; every submodule's mode is restored on exit."""
    modes = {name: sub.training for name, sub in module.named_modules()}
    device = next(iter(module.parameters()), torch.empty(0)).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for name, sub in module.named_modules():
            if name in modes:
                sub.training = modes[name]


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send scalars to every Lightning logger at ``trainer.global_step`` (works in hooks where `log` cannot)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def _tensorboard(trainer: pl.Trainer) -> Any | None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class PeriodicGeneration(Callback):
    """Runs `run` every ``every_n_steps`` trainer steps (``trainer.global_step``) and/or once at the end of fit
    (``on_train_end``, while the strategy is still set up), in `generation_mode`, on every rank."""

    def __init__(self, every_n_steps: int | None = None, at_fit_end: bool = True) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 (or null to run only at the end of fit), got "
                             f"{every_n_steps}")
        self.every_n_steps = every_n_steps
        self.at_fit_end = at_fit_end
        self._last_step: int | None = None

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        with generation_mode(pl_module):
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self._run(trainer, pl_module)


# ----------------------------------------------------------------------------------------------------------------------
# Plain helpers
# ----------------------------------------------------------------------------------------------------------------------


def read_prompt_list(prompts: Sequence[str] | str) -> list[str]:
    """A list of prompts as is, or a text file path (one prompt per line; blank lines skipped)."""
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"LongVideoEval prompt file {str(path)!r} not found; pass a text file with one "
                                    "prompt per line, or a list of prompts (a single prompt too: [\"...\"])")
        out = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = f"prompt file {str(path)!r}"
    else:
        out = [str(p).strip() for p in prompts if str(p).strip()]
        where = "the prompt list"
    if not out:
        raise ValueError(f"LongVideoEval: {where} holds no prompts")
    return out


def default_timestamps(seconds: float) -> tuple[float, ...]:
    """Every 10 s up to ``seconds`` (the paper's 10, 20, …, 60 s); every second for videos shorter than 10 s."""
    step = 10.0 if seconds >= 10 else 1.0
    count = int(math.floor(seconds / step + 1e-9))
    if count < 1:
        raise ValueError(f"a {seconds:g} s video has no whole-second timestamp; set seconds >= 1 or give timestamps")
    return tuple(step * k for k in range(1, count + 1))


def plot_metrics_vs_time(windowed: Mapping[str, Mapping[float, float | None]], title: str = "") -> Any:
    """A matplotlib ``Figure`` with one panel per windowed metric (value vs time in s); no pyplot state."""
    from matplotlib.figure import Figure

    names = list(windowed)
    columns = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(4.0 * columns, 2.8 * rows + 0.4))
    for i, name in enumerate(names):
        ax = figure.add_subplot(rows, columns, i + 1)
        times = list(windowed[name])
        values = [np.nan if v is None else v for v in windowed[name].values()]
        ax.plot(times, values, marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("time (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _figure_rgb(figure: Any) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class _Scores:
    """Per-rank torchmetrics states of one evaluation; `compute` sums them over ranks (collective)."""

    VBENCH_SCALARS = ("vbench_subject_consistency", "vbench_background_consistency")

    def __init__(self, timestamps: Sequence[float], device: torch.device) -> None:
        self.timestamps = tuple(timestamps)
        self.device = device
        self.windowed: dict[str, WindowedScore] = {}
        self.means: dict[str, MeanMetric] = {}
        self.sums: dict[str, SumMetric] = {}
        self.vbench: dict[str, VBenchConsistency] = {}

    def _make(self, kind: str) -> Any:
        if kind == "windowed":
            metric = WindowedScore(self.timestamps)
        elif kind == "means":
            metric = MeanMetric(nan_strategy="ignore")
        elif kind == "sums":
            metric = SumMetric(nan_strategy="ignore")
        else:
            metric = VBenchConsistency()
        return metric.to(self.device)

    def _get(self, kind: str, name: str) -> Any:
        table = getattr(self, kind)
        if name not in table:
            table[name] = self._make(kind)
        return table[name]

    def add(self, result: Mapping[str, Any]) -> None:
        """One `evaluate_video` result."""
        for name, scores in result["windowed"].items():
            self._get("windowed", name).update(scores)
        for name, value in result["scalars"].items():
            if name in self.VBENCH_SCALARS:  # per-video VBench scores: aggregated frame-weighted below
                continue
            if name not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._get("means", name).update(float(value))
        features = result["features"]
        if "vbench_dino" in features:
            self._get("vbench", "vbench_subject_consistency").update(features["vbench_dino"])
        if "vbench_clip" in features:
            self._get("vbench", "vbench_background_consistency").update(features["vbench_clip"])
        for curve, events in result["flashbacks"].items():
            self._get("sums", f"flashbacks_{curve}").update(float(len(events)))
        self._get("sums", "seconds").update(float(result["scalars"]["duration_s"]))
        self._get("sums", "videos").update(1.0)

    def compute(self, trainer: pl.Trainer) -> dict[str, Any]:
        """``{"windowed": {name: {t: v}}, "scalars": {name: v}}`` over all ranks (every rank must call it)."""
        names = {kind: sorted(getattr(self, kind)) for kind in ("windowed", "means", "sums", "vbench")}
        names = trainer.strategy.broadcast(names, src=0)  # the same metrics, in the same order, on every rank
        windowed = {name: self._get("windowed", name).compute_dict() for name in names["windowed"]}
        scalars = {name: float(self._get("means", name).compute()) for name in names["means"]}
        scalars.update({name: float(self._get("vbench", name).compute()) for name in names["vbench"]})
        sums = {name: float(self._get("sums", name).compute()) for name in names["sums"]}
        seconds = sums.pop("seconds", 0.0)
        scalars["num_videos"] = sums.pop("videos", 0.0)
        for name, count in sums.items():
            curve = name[len("flashbacks_"):]
            scalars[f"flashbacks_per_minute_{curve}"] = 60.0 * count / seconds if seconds > 0 else float("nan")
        return {"windowed": windowed, "scalars": scalars}


# ----------------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------------


class LongVideoEval(PeriodicGeneration):
    """Generate long videos during training and log the long-video consistency metrics (protocol: module docstring).

    Args:
        prompts: a list of prompts, or a text file with one prompt per line.
        seeds: one video per (prompt, seed); the paper uses 5 seeds per prompt.
        seconds: video length (rounded up to whole chunks).
        timestamps: windowed-metric timestamps in s (default: every 10 s up to ``seconds``; every 1 s below 10 s).
        every_n_steps: evaluate every this many trainer steps (None: only at the end of fit).
        at_fit_end: also evaluate at the end of fit (skipped if the last step was just evaluated).
        memory: memory preset name or `MemoryConfig` fields instead of the module's memory (e.g. ``sliding``).
        use_ema: generate with the EMA weights when an EMA callback on ``generator`` has started.
        dino / clip: local DINOv2 / CLIP model folders (`cf.evaluation.features`); None skips those metrics.
        feature_batch_size / dino_image_size: feature-extraction settings.
        evaluation_args: other `cf.evaluation.EvaluationConfig` fields (half_width, min_coverage, reference_s, …).
        log_sample_video: log the first (prompt, seed) video (GIF preview in TensorBoard + mp4).
        video_max_side / video_max_frames: size of the GIF preview (`log_video`).
        out_dir: folder for the JSON results, plots and (without TensorBoard) the mp4; default
            ``<log_dir>/long_video_eval``.
        prefix: metric name prefix.
        progress: show a progress bar over the videos on rank 0.
    """

    def __init__(
        self,
        prompts: list[str] | str,
        seeds: list[int] | None = None,
        seconds: float = 60.0,
        timestamps: list[float] | None = None,
        every_n_steps: int | None = 500,
        at_fit_end: bool = True,
        memory: str | dict[str, Any] | None = None,
        use_ema: bool = True,
        dino: str | None = None,
        clip: str | None = None,
        feature_batch_size: int = 32,
        dino_image_size: int = 224,
        evaluation_args: dict[str, Any] | None = None,
        log_sample_video: bool = True,
        video_max_side: int = 256,
        video_max_frames: int | None = 160,
        out_dir: str | None = None,
        prefix: str = "eval",
        progress: bool = True,
    ) -> None:
        super().__init__(every_n_steps, at_fit_end)
        self.prompts = read_prompt_list(prompts)
        self.seeds = [0] if seeds is None else [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("LongVideoEval: seeds is empty; give at least one seed, e.g. [0]")
        if seconds <= 0:
            raise ValueError(f"LongVideoEval: seconds must be positive, got {seconds}")
        self.seconds = float(seconds)
        self.timestamps = default_timestamps(self.seconds) if timestamps is None else \
            tuple(float(t) for t in timestamps)
        late = [t for t in self.timestamps if t > self.seconds]
        if not self.timestamps or late:
            raise ValueError(f"LongVideoEval: timestamps {list(self.timestamps)} must be non-empty and within the "
                             f"{self.seconds:g} s video; raise seconds or drop {late}")
        fields = set(EvaluationConfig.__dataclass_fields__) - {"timestamps", "fps"}
        unknown = sorted(set(evaluation_args or {}) - fields)
        if unknown:
            raise ValueError(f"LongVideoEval: unknown evaluation_args {unknown}; valid: {sorted(fields)}")
        self.evaluation_args = dict(evaluation_args or {})
        for name, folder in (("dino", dino), ("clip", clip)):
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"LongVideoEval: {name} model folder {folder!r} does not exist; pass a local "
                                        f"folder (see cf.evaluation.features) or {name}: null to skip its metrics")
        if isinstance(memory, str):
            MemoryConfig.preset(memory)  # unknown names fail now, not at the first evaluation
        self.memory = memory
        self.use_ema = use_ema
        self.dino, self.clip = dino, clip
        self.feature_batch_size = feature_batch_size
        self.dino_image_size = dino_image_size
        self.log_sample_video = log_sample_video
        self.video_max_side = video_max_side
        self.video_max_frames = video_max_frames
        self.out_dir = out_dir
        self.prefix = prefix
        self.progress = progress
        self._features: dict[str, Any] | None = None
        self._warned_no_tensorboard = False
        self.last_metrics: dict[str, float] = {}  # what the last evaluation logged (rank 0)

    # ------------------------------------------------------------------------------------------------ pieces
    def items(self) -> list[tuple[str, int]]:
        """Every (prompt, seed) pair, prompt-major."""
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]

    def evaluation_config(self, fps: float) -> EvaluationConfig:
        """The `cf.evaluation` protocol settings of this callback for videos at ``fps``."""
        return EvaluationConfig(timestamps=self.timestamps, fps=fps, **self.evaluation_args)

    def _feature_models(self, device: torch.device) -> dict[str, Any]:
        """DINOv2 (+ its VBench preprocessing) and CLIP feature extractors, loaded once, moved to ``device``."""
        from cf.evaluation.features import ClipFeatures, DinoFeatures

        if self._features is None:
            self._features = {}
            if self.dino is not None:
                dino = DinoFeatures.from_pretrained(self.dino, image_size=self.dino_image_size,
                                                    batch_size=self.feature_batch_size)
                self._features["dino"] = dino
                self._features["vbench_dino"] = DinoFeatures(dino.model, image_size=self.dino_image_size,
                                                             preprocessing="shorter_side",
                                                             batch_size=self.feature_batch_size)
            if self.clip is not None:
                self._features["clip"] = ClipFeatures.from_pretrained(self.clip, batch_size=self.feature_batch_size)
        for extractor in self._features.values():
            extractor.model.to(device)
        return self._features

    def _release_feature_models(self) -> None:
        for extractor in (self._features or {}).values():
            extractor.model.to("cpu")

    @staticmethod
    def generate(pl_module: pl.LightningModule, setup: StudentGeneration, prompt: str, seed: int,
                 num_frames: int) -> np.ndarray:
        """One video, decoded chunk by chunk: uint8 ``[1 + 4(num_frames − 1), H, W, 3]``."""
        text = pl_module.embed([prompt])
        decoder = pl_module.autoencoder.stream_decoder()
        chunks = []
        for latents in stream(setup.generator, text, num_frames, setup.latent_size, memory=setup.memory,
                              sampling=setup.sampling, seed=seed):
            chunks.append(to_uint8_frames(decoder(latents.float())[0]))
        return np.concatenate(chunks)

    def _resolve_out_dir(self, trainer: pl.Trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "long_video_eval"  # log_dir is collective

    # ------------------------------------------------------------------------------------------------ run
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Generate this rank's share of the videos, score them, reduce over ranks and report from rank 0."""
        step = trainer.global_step
        setup = StudentGeneration.from_module(pl_module, self.memory)
        out_dir = self._resolve_out_dir(trainer)
        ema = find_started_ema(trainer) if self.use_ema else None
        if ema is not None:
            weights = "EMA"
        elif self.use_ema:
            weights = "training (no started EMA callback on 'generator')"
        else:
            weights = "training (use_ema=False)"
        rank, world = trainer.global_rank, trainer.world_size
        items = self.items()
        mine = [(prompt, seed, True) for prompt, seed in items[rank::world]]
        partitioned = is_zero_partitioned(setup.generator.parameters())
        share = math.ceil(len(items) / world)
        if partitioned and len(mine) < share:  # ZeRO-3 forwards are collective: same number of rollouts everywhere
            mine += [(items[0][0], items[0][1], False)] * (share - len(mine))
        num_frames = setup.num_latent_frames(self.seconds)
        rank_zero_info(f"LongVideoEval at step {step}: {len(items)} video(s) of {self.seconds:g} s "
                       f"({num_frames} latent frames) with the {weights} weights")
        config = self.evaluation_config(setup.fps)
        scores = _Scores(self.timestamps, pl_module.device)
        sample = None
        start = time.perf_counter()
        ema_weights = ema.use_ema_weights(pl_module) if ema is not None else contextlib.nullcontext()
        try:
            features = self._feature_models(pl_module.device)
            with ema_weights:
                bar = tqdm(mine, desc=f"LongVideoEval step {step}", unit="video", leave=False,
                           disable=not (self.progress and trainer.is_global_zero))
                for prompt, seed, counted in bar:
                    frames = self.generate(pl_module, setup, prompt, seed, num_frames)
                    if not counted:
                        continue
                    result = evaluate_video(frames, float(setup.fps), config, prompt=prompt,
                                            dino=features.get("dino"), vbench_dino=features.get("vbench_dino"),
                                            clip=features.get("clip"))
                    scores.add(result)
                    if sample is None and rank == 0:
                        sample = (prompt, seed, frames)
        finally:
            self._release_feature_models()
        summary = scores.compute(trainer)
        wall = time.perf_counter() - start
        if trainer.is_global_zero:
            self._report(trainer, step, summary, sample, setup, out_dir, ema is not None, weights, wall)

    def _report(self, trainer: pl.Trainer, step: int, summary: Mapping[str, Any],
                sample: tuple[str, int, np.ndarray] | None, setup: StudentGeneration, out_dir: Path, uses_ema: bool,
                weights: str, wall: float) -> None:
        """Rank 0: scalars to the loggers, JSON + PNG to ``out_dir``, plot and sample video to TensorBoard."""
        p = self.prefix
        metrics: dict[str, float] = {}
        for name, scores in summary["windowed"].items():
            reached = [v for v in scores.values() if v is not None and math.isfinite(v)]
            for t, value in scores.items():
                if value is not None and math.isfinite(value):
                    metrics[f"{p}/{name}@{t:g}s"] = value
            if reached:
                metrics[f"{p}/{name}@avg"] = sum(reached) / len(reached)
        metrics.update({f"{p}/{name}": v for name, v in summary["scalars"].items() if math.isfinite(v)})
        metrics[f"{p}/uses_ema"] = float(uses_ema)
        metrics[f"{p}/wall_s"] = wall
        log_scalars(trainer, metrics)
        self.last_metrics = metrics

        out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "step": step, "weights": weights, "seconds": self.seconds, "num_prompts": len(self.prompts),
            "seeds": self.seeds, "memory": asdict(setup.memory), "wall_s": wall,
            "evaluation": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in asdict(self.evaluation_config(setup.fps)).items()},
            "dino": self.dino, "clip": self.clip,
            "windowed": {name: {f"{t:g}": (None if v is None else _finite_or_none(v)) for t, v in scores.items()}
                         for name, scores in summary["windowed"].items()},
            "scalars": {name: _finite_or_none(v) for name, v in summary["scalars"].items()},
        }
        (out_dir / f"step_{step:08d}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        title = f"step {step}: {int(summary['scalars'].get('num_videos', 0))} video(s), {weights.split(' ')[0]} weights"
        figure = plot_metrics_vs_time(summary["windowed"], title)
        figure.savefig(out_dir / f"metrics_vs_time_step_{step:08d}.png", dpi=90)
        experiment = _tensorboard(trainer)
        if experiment is not None:
            experiment.add_image(f"{p}/metrics_vs_time", _figure_rgb(figure), step, dataformats="HWC")
        elif not self._warned_no_tensorboard:
            rank_zero_warn(f"LongVideoEval: no TensorBoardLogger; the plot and sample video are only written to "
                           f"{out_dir}")
            self._warned_no_tensorboard = True
        if self.log_sample_video and sample is not None:
            prompt, seed, frames = sample
            if experiment is not None:
                log_video(experiment, f"{p}/video", frames, step, fps=setup.fps, max_side=self.video_max_side,
                          max_frames=self.video_max_frames)
                experiment.add_text(f"{p}/video_prompt", f"{prompt} (seed {seed})", step)
            else:
                (out_dir / "videos").mkdir(parents=True, exist_ok=True)
                (out_dir / "videos" / f"sample_step{step:08d}.mp4").write_bytes(encode_mp4(frames, fps=setup.fps))
