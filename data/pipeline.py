"""WebDataset streams of batches for the three data modes, with bad samples skipped and counted.

Each DataLoader worker builds its own stream: shard list -> (node / worker split or resampling) -> tar samples
(webdataset) -> shuffle buffer of raw samples -> decode -> batch. Batches are built inside the workers (use the
DataLoader with ``batch_size=None``). Every batch carries ``batch["skipped"]``: reason -> number of samples this worker
skipped since its previous batch. Skips after a worker's last batch are reported by a log warning instead. Batches of a
`ShardStream` also carry ``batch[POSITION_KEY]``, where their worker's stream stands, which `EpochDataLoader` takes
out and checkpoints so that a resumed run continues inside an epoch without decoding what was already consumed.

Randomness is a pure function of (seed, epoch, rank, worker) and, for clip starts, of (seed, epoch, shard, key), so
seeded runs repeat exactly and each epoch differs. Teacher clips (``teacher_clips``, :class:`data.clips.TeacherClipMix`)
are drawn per (seed, epoch, shard, key) too; with ``clip_start="start"`` (validation) per (seed, shard, key) only, so
every validation pass reads the same clips. The epoch comes from :meth:`set_epoch` (called by
:class:`data.loader.EpochDataLoader` at every new iteration) plus the number of iterations a persistent worker has run.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, TypeVar

import torch
from torch.utils.data import IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from cf.video_io import decode_mp4, probe_mp4
from data.clips import TeacherClipMix, cover_scale, resample_indices, resize_cover_crop
from data.remote import ShardRetry, open_shards

__all__ = [
    "SKIP_REASONS",
    "SkipCounter",
    "StreamConfig",
    "ShardStream",
    "PromptFileStream",
    "read_prompt_file",
    "buffered_shuffle",
    "POSITION_KEY",
]

log = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "unreadable_shard",  # a shard (or part of it) could not be opened or read as tar
    "missing_video",  # no {key}.mp4
    "corrupt_video",  # the mp4 does not decode, or ends early
    "missing_caption",  # no {key}.txt, or it is empty / not UTF-8
    "too_short",  # fewer frames (after fps resampling) than num_frames / min_frames / any teacher clip needs, or
    #               fewer latents than latent_frames
    "wrong_size",  # frame or latent / text-embedding shape not usable for the configured batch
    "missing_latent",  # no {key}.latent.pth
    "missing_text",  # no {key}.text.pth
    "corrupt_latent",  # a .pth member that does not load as a tensor
    "non_finite",  # a latent or text-embedding tensor holding NaN / inf (decoded mp4 frames are uint8: always finite)
)

Mode = Literal["video", "latents", "prompts"]

# Key of a ShardStream batch holding where its worker's stream stands (worker, raw samples read, batches made, latent
# shape); EpochDataLoader removes it and keeps it for its checkpoint state.
POSITION_KEY = "_stream_position"


class SkipCounter:
    """Counts skipped samples per reason; warns once per reason and worker with the first offending sample."""

    def __init__(self, max_read_errors_in_a_row: int = 1000) -> None:
        self.counts: Counter[str] = Counter()
        self._warned: set[str] = set()
        self.read_errors_in_a_row = 0
        self.max_read_errors_in_a_row = max_read_errors_in_a_row

    def skip(self, reason: str, sample: dict[str, Any] | None = None, detail: str = "") -> None:
        self.counts[reason] += 1
        if sample is None:
            message = f"shard read error, skipping what follows in that shard: {reason}"
        else:
            message = f"skipping sample {sample.get('__key__', '?')} from {sample.get('__url__', '?')}: {reason}"
        message += f" ({detail})" if detail else ""
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(message + " [further skips of this kind are only counted]")
        else:
            log.debug(message)

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler: count the read error and keep going (unless nothing is readable)."""
        self.skip("unreadable_shard", None, repr(exn)[:300])
        self.read_errors_in_a_row += 1
        if self.read_errors_in_a_row > self.max_read_errors_in_a_row:
            raise RuntimeError(
                f"{self.read_errors_in_a_row} shard read errors in a row without a single sample; last: {exn!r}. "
                "Check that the shard URLs point to readable WebDataset tar files."
            ) from exn
        return True

    def take(self) -> dict[str, int]:
        """Counts since the previous call."""
        counts = dict(self.counts)
        self.counts.clear()
        return counts


@dataclass
class StreamConfig:
    """What one stream produces; see :class:`data.VideoDataModule` for the meaning of each field."""

    mode: Mode = "video"
    batch_size: int = 1
    drop_last: bool = True
    num_frames: int | None = 81
    min_frames: int = 0
    max_frames: int | None = None
    height: int = 480
    width: int = 832
    fps: float = 16.0
    clip_start: Literal["random", "start"] = "random"
    max_upscale: float | None = None
    latent_frames: int | None = None
    latent_size: tuple[int, int] | None = None
    text_length: int | None = None
    shuffle_buffer: int = 0
    resampled: bool = False
    batches_per_epoch: int | None = None
    split_by_node: bool = True
    split_by_worker: bool = True
    seed: int = 0
    teacher_clips: TeacherClipMix | None = None
    shard_retry: ShardRetry = ShardRetry()


T = TypeVar("T")


def buffered_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """``items`` in a shuffled order, holding at most ``size`` of them: the first ``size`` fill a buffer, then each
    new item takes the place of a uniformly drawn buffered one, which is yielded; at the end the rest of the buffer
    comes out in a random order. An item moves at most ``size`` places earlier. ``size <= 1``: unchanged order.
    The order is a function of the items and ``rng``'s state."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _sample_rng(seed: int, kind: str, epoch: Any, sample: dict) -> random.Random:
    """The random draws of one sample's clip, seeded by its shard's file name and its key: the same dataset draws
    the same clips wherever its folder lies (the full URL would tie a run's data to the path it was written to)."""
    url = sample.get("__url__")
    shard = None if url is None else str(url).rstrip("/").rsplit("/", 1)[-1]
    return random.Random(_stream_seed(seed, kind, epoch, shard, sample["__key__"]))


def _stream_seed(*parts: Any) -> str:
    # random.Random hashes str seeds with SHA-512: stable across processes and Python runs
    return ":".join(str(p) for p in parts)


def _worker_share(total: int, worker: int, num_workers: int) -> int:
    return total // num_workers + (1 if worker < total % num_workers else 0)


def _caption(sample: dict[str, Any]) -> str | None:
    raw = sample.get("txt")
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError:
        return None
    text = text.strip()
    return text or None


def _json(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _load_tensor(raw: bytes) -> torch.Tensor:
    value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return value


class _EpochAware:
    """Epoch = value given by set_epoch + iterations run since (so persistent workers advance on their own)."""

    def __init__(self) -> None:
        self._base_epoch = 0
        self._iterations = 0

    def set_epoch(self, epoch: int) -> None:
        self._base_epoch, self._iterations = int(epoch), 0

    def _next_epoch(self) -> int:
        epoch = self._base_epoch + self._iterations
        self._iterations += 1
        return epoch


class ShardStream(_EpochAware, IterableDataset):
    """Batches from WebDataset shards (``urls``: brace notation string or list of URLs WebDataset can open)."""

    def __init__(self, urls: str | list[str], config: StreamConfig) -> None:
        super().__init__()
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError(f"no shard URLs in {urls!r}")
        self.config = config
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        if self.config.batches_per_epoch is None:
            raise TypeError("this stream has no fixed length (set batches_per_epoch)")
        return self.config.batches_per_epoch

    # ---------------------------------------------------------------- resuming inside an epoch
    def skips_exactly(self, num_workers: int) -> bool:
        """Whether `resume_from` continues an epoch exactly with ``num_workers`` DataLoader workers: the workers'
        batches then come strictly in turn (one worker, or endless resampled streams, which only run out at their
        ``batches_per_epoch`` share, in worker order)."""
        return self.config.resampled or num_workers <= 1

    def resume_from(self, position: dict[str, Any] | None) -> None:
        """Make the next iteration continue an epoch without decoding what was already consumed.

        ``position``: ``{"rotate": r, "workers": {w: (samples, batches, latent_shape)}}``: DataLoader worker ``i``
        continues the stream of worker ``(i + r) % num_workers`` (the worker whose batch comes next is then asked
        first), after skipping the ``samples`` shuffled raw samples that stream had read (no decoding) and counting
        its ``batches`` already made. None: start the epoch from its beginning."""
        self._resume = position

    def _shard_urls(self, epoch: int, rank: int, world: int, worker: int, num_workers: int) -> Iterator[dict]:
        cfg = self.config
        if cfg.resampled:
            rng = random.Random(_stream_seed(cfg.seed, "shards", epoch, rank, worker))
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        if cfg.shuffle_buffer > 1:
            random.Random(_stream_seed(cfg.seed, "shard-order", epoch)).shuffle(urls)  # same order on every rank
        if cfg.split_by_node:
            urls = urls[rank::world]
        if cfg.split_by_worker:
            urls = urls[worker::num_workers]
        for url in urls:
            yield {"url": url}

    # ---------------------------------------------------------------- decoding
    def _decode_video(self, sample: dict, counter: SkipCounter, epoch: int) -> dict | None:
        cfg = self.config
        data = sample.get("mp4")
        if data is None:
            counter.skip("missing_video", sample)
            return None
        try:
            info = probe_mp4(data)
        except Exception as exn:  # PyAV raises many error types for broken files
            counter.skip("corrupt_video", sample, repr(exn)[:200])
            return None
        indices = resample_indices(info.num_frames, info.fps, cfg.fps)
        needed = max(cfg.num_frames or 1, cfg.min_frames)
        if len(indices) < needed:
            counter.skip("too_short", sample, f"{len(indices)} frames at {cfg.fps:g} fps, need {needed}")
            return None
        if cfg.max_upscale is not None:
            scale = cover_scale(info.height, info.width, cfg.height, cfg.width)
            if scale > cfg.max_upscale:
                counter.skip("wrong_size", sample, f"{info.height}x{info.width} needs upscaling x{scale:.2f}")
                return None
        extra: dict[str, Any] = {}
        if cfg.teacher_clips is not None:
            usable = min(len(indices), cfg.max_frames or len(indices))
            draw_epoch = epoch if cfg.clip_start == "random" else "fixed"
            rng = _sample_rng(cfg.seed, "teacher-clip", draw_epoch, sample)
            clip = cfg.teacher_clips.draw(usable, rng)
            if clip is None:
                needed = min(cfg.teacher_clips.min_frames(k) for k in cfg.teacher_clips.kinds if k.weight > 0)
                counter.skip("too_short", sample, f"{usable} frames at {cfg.fps:g} fps, the teacher clips need "
                                                  f">= {needed}")
                return None
            chosen = indices[list(clip.frame_index)]
            extra = {"frame_index": clip.frame_index, "layout": clip.layout, "context_latents": clip.context_latents}
        else:
            length = cfg.num_frames or min(len(indices), cfg.max_frames or len(indices))
            start = 0
            if cfg.clip_start == "random":
                rng = _sample_rng(cfg.seed, "clip", epoch, sample)
                start = rng.randint(0, len(indices) - length)
            chosen = indices[start : start + length]
        try:
            frames, _ = decode_mp4(data, chosen)
        except Exception as exn:
            counter.skip("corrupt_video", sample, repr(exn)[:200])
            return None
        return {"video": resize_cover_crop(frames, cfg.height, cfg.width), **extra}

    def _decode_latents(self, sample: dict, counter: SkipCounter, epoch: int) -> dict | None:
        cfg = self.config
        tensors = {}
        members = (("latent.pth", "latents", "missing_latent"), ("text.pth", "text", "missing_text"))
        for member, name, missing in members:
            if sample.get(member) is None:
                counter.skip(missing, sample)
                return None
            try:
                tensors[name] = _load_tensor(sample[member])
            except Exception as exn:
                counter.skip("corrupt_latent", sample, f"{member}: {repr(exn)[:200]}")
                return None
        latents, text = tensors["latents"], tensors["text"]
        for name, tensor in (("latent", latents), ("text", text)):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                counter.skip("non_finite", sample, f"{name} tensor holds {bad} NaN/inf values of {tensor.numel()}")
                return None
        if latents.ndim != 4 or text.ndim != 2:
            counter.skip("wrong_size", sample, f"latent {tuple(latents.shape)} / text {tuple(text.shape)}, "
                         "expected [C, T, h, w] / [L, D]")
            return None
        if cfg.latent_size is not None and tuple(latents.shape[2:]) != tuple(cfg.latent_size):
            counter.skip("wrong_size", sample, f"latent size {tuple(latents.shape[2:])} != {tuple(cfg.latent_size)}")
            return None
        if cfg.text_length is not None and text.shape[0] > cfg.text_length:
            counter.skip("wrong_size", sample, f"text length {text.shape[0]} > text_length {cfg.text_length}")
            return None
        if cfg.latent_frames is not None:
            available = latents.shape[1]
            if available < cfg.latent_frames:
                counter.skip("too_short", sample, f"{available} latent frames, need {cfg.latent_frames}")
                return None
            start = 0
            if cfg.clip_start == "random":
                rng = _sample_rng(cfg.seed, "clip", epoch, sample)
                start = rng.randint(0, available - cfg.latent_frames)
            latents = latents[:, start : start + cfg.latent_frames]
        return {"latents": latents.contiguous(), "text": text, "text_length": _json(sample).get("text_length")}

    def _decode(self, samples: Iterable[dict], counter: SkipCounter, epoch: int, taken: list[int]) -> Iterator[dict]:
        mode = self.config.mode
        for sample in samples:
            taken[0] += 1  # shuffled raw samples this stream has read, decoded or not
            counter.read_errors_in_a_row = 0
            caption = _caption(sample)
            if caption is None:
                counter.skip("missing_caption", sample)
                continue
            if mode == "video":
                decoded = self._decode_video(sample, counter, epoch)
            elif mode == "latents":
                decoded = self._decode_latents(sample, counter, epoch)
            else:
                decoded = {}
            if decoded is None:
                continue
            decoded.update(caption=caption, key=sample["__key__"], url=sample.get("__url__"))
            yield decoded

    # ---------------------------------------------------------------- batching
    def _batches(self, decoded: Iterator[dict], counter: SkipCounter, worker: int, taken: list[int],
                 made: int, reference_shape: tuple[int, ...] | None) -> Iterator[dict]:
        cfg = self.config
        pending: list[dict] = []

        def position() -> tuple[int, int, int, tuple[int, ...] | None]:
            return worker, taken[0], made, reference_shape

        for item in decoded:
            if cfg.mode == "latents":
                shape = tuple(item["latents"].shape)
                if reference_shape is None:
                    reference_shape = shape
                elif shape != reference_shape:
                    counter.skip("wrong_size", {"__key__": item["key"], "__url__": item["url"]},
                                 f"latent {shape} differs from this stream's {reference_shape}; "
                                 "set latent_frames / latent_size to fix the shape")
                    continue
            pending.append(item)
            if len(pending) == cfg.batch_size:
                made += 1
                yield {**self._collate(pending, counter.take()), POSITION_KEY: position()}
                pending = []
        if pending and not cfg.drop_last:
            made += 1
            yield {**self._collate(pending, counter.take()), POSITION_KEY: position()}
        leftover = counter.take()
        if leftover:
            log.warning(f"samples skipped after this worker's last batch (not in any batch['skipped']): {leftover}")

    def _collate(self, items: list[dict], skipped: dict[str, int]) -> dict:
        batch: dict[str, Any] = {
            "caption": [item["caption"] for item in items],
            "key": [item["key"] for item in items],
            "skipped": skipped,
        }
        if self.config.mode == "video":
            batch["video"] = torch.stack([item["video"] for item in items])
            if self.config.teacher_clips is not None:  # one clip per batch (the module enforces batch_size 1)
                batch["frame_index"] = torch.tensor([item["frame_index"] for item in items], dtype=torch.long)
                batch["layout"] = [item["layout"] for item in items]
                batch["context_latents"] = [item["context_latents"] for item in items]
        elif self.config.mode == "latents":
            batch["latents"] = torch.stack([item["latents"] for item in items])
            length = self.config.text_length
            if length is None:
                stored = [item["text_length"] for item in items if isinstance(item["text_length"], int)]
                length = max([item["text"].shape[0] for item in items] + stored)
            text = torch.zeros(len(items), length, items[0]["text"].shape[1], dtype=items[0]["text"].dtype)
            for i, item in enumerate(items):
                text[i, : item["text"].shape[0]] = item["text"]
            batch["text"] = text
        return batch

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        cfg = self.config
        epoch = self._next_epoch()
        rank, world, worker, num_workers = pytorch_worker_info()
        resume, self._resume = self._resume, None  # a worker process consumes its own copy
        skip, made, shape = 0, 0, None
        if resume is not None:
            worker = (worker + int(resume["rotate"])) % num_workers
            skip, made, shape = resume["workers"].get(worker, (0, 0, None))
            shape = None if shape is None else tuple(shape)
        counter = SkipCounter()
        shards = self._shard_urls(epoch, rank, world, worker, num_workers)
        streams = open_shards(shards, cfg.shard_retry, counter.handler)  # remote shards: bounded retries
        samples = group_by_keys(tar_file_expander(streams, handler=counter.handler), handler=counter.handler)
        if cfg.shuffle_buffer > 1:
            rng = random.Random(_stream_seed(cfg.seed, "samples", epoch, rank, worker))
            samples = buffered_shuffle(samples, cfg.shuffle_buffer, rng)
        if skip:
            samples = itertools.islice(samples, skip, None)  # read and shuffled, never decoded
        taken = [skip]
        batches = self._batches(self._decode(samples, counter, epoch, taken), counter, worker, taken, made, shape)
        if cfg.batches_per_epoch is not None:
            batches = itertools.islice(batches, _worker_share(cfg.batches_per_epoch, worker, num_workers) - made)
        return batches


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a text file, one per line; blank lines are ignored."""
    try:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle]
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {path} does not exist; pass a text file with one prompt per line "
                                "(`cf data synth` writes <out>/<split>/prompts.txt)") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (expected one prompt per line)")
    return prompts


class PromptFileStream(_EpochAware, IterableDataset):
    """Batches of prompts from a list (one per line of a prompt file).

    ``endless=True`` (training): every rank and worker draws its own seeded permutations, pass after pass.
    ``endless=False``: one pass in file order, split across ranks and workers, so each prompt appears exactly once.
    Keys are ``prompt-<line index among non-blank lines>``.
    """

    def __init__(self, prompts: list[str], batch_size: int, endless: bool, seed: int = 0,
                 batches_per_epoch: int | None = None, drop_last: bool = False) -> None:
        super().__init__()
        if not prompts:
            raise ValueError("no prompts given")
        self.prompts, self.batch_size, self.endless = list(prompts), batch_size, endless
        self.seed, self.batches_per_epoch, self.drop_last = seed, batches_per_epoch, drop_last

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("this stream has no fixed length (set batches_per_epoch)")
        return self.batches_per_epoch

    def _indices(self, epoch: int, rank: int, world: int, worker: int, num_workers: int) -> Iterator[int]:
        if not self.endless:
            yield from range(len(self.prompts))[rank::world][worker::num_workers]
            return
        rng = random.Random(_stream_seed(self.seed, "prompts", epoch, rank, worker))
        order = list(range(len(self.prompts)))
        while True:
            rng.shuffle(order)
            yield from order

    def __iter__(self) -> Iterator[dict]:
        epoch = self._next_epoch()
        rank, world, worker, num_workers = pytorch_worker_info()
        indices = self._indices(epoch, rank, world, worker, num_workers)

        def batches() -> Iterator[dict]:
            while True:
                chunk = list(itertools.islice(indices, self.batch_size))
                if not chunk or (len(chunk) < self.batch_size and self.drop_last):
                    return
                yield {"caption": [self.prompts[i] for i in chunk], "key": [f"prompt-{i}" for i in chunk],
                       "skipped": {}}

        if self.batches_per_epoch is not None:
            return itertools.islice(batches(), _worker_share(self.batches_per_epoch, worker, num_workers))
        return batches()
