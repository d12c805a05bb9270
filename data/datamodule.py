"""``VideoDataModule``: WebDataset video / latent / prompt batches for Lightning.

Use it with ``Trainer(use_distributed_sampler=False)``: the streams split shards by rank and worker themselves
(or resample shards independently per rank and worker).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from webdataset.shardlists import expand_urls
from webdataset.utils import pytorch_worker_info

from data.clips import TeacherClipMix, check_num_frames
from data.loader import EpochDataLoader
from data.pipeline import PromptFileStream, ShardStream, StreamConfig, read_prompt_file
from data.remote import ShardRetry

__all__ = ["VideoDataModule", "expand_shard_urls", "check_shards_exist"]

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://")


def _expand_glob(url: str) -> list[str]:
    """A local path with ``*`` / ``?`` / ``[...]``: the matching files, sorted (unchanged when none match, so the
    existence check names it); any other URL unchanged."""
    if url.startswith(_REMOTE_PREFIXES) or not any(c in url for c in "*?["):
        return [url]
    return sorted(glob.glob(url[len("file:"):] if url.startswith("file:") else url)) or [url]


def expand_shard_urls(urls: str | list[str]) -> list[str]:
    """Expand brace notation (``shards-{000..009}.tar``, several patterns joined by ``::``) and local wildcards
    (``out/lat-*.tar``, e.g. the shards several processes of `cf data encode` wrote) into a list of URLs."""
    expanded: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls:
        for item in expand_urls(url):
            expanded.extend(_expand_glob(item))
    return expanded


def check_shards_exist(urls: str | list[str], what: str = "shard") -> list[str]:
    """Expand ``urls`` and check that every local path exists (remote URLs are left to WebDataset).

    Raises FileNotFoundError naming the first missing path (and how many are missing).
    """
    expanded = expand_shard_urls(urls)
    if not expanded:
        raise ValueError(f"no {what} URLs in {urls!r}")
    missing = []
    for url in expanded:
        if url.startswith(_REMOTE_PREFIXES):
            continue
        path = url[len("file:"):] if url.startswith("file:") else url
        if not os.path.isfile(path):
            missing.append(path)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(expanded)} {what} file(s) not found, first: {missing[0]!r} "
            f"(from {urls!r}); check the path and the brace range, e.g. 'data/train/shard-{{000000..000009}}.tar'"
        )
    return expanded


class VideoDataModule(pl.LightningDataModule):
    """Batches from WebDataset shards for teacher / student training.

    Modes:
      * ``video``: ``{key}.mp4`` + ``{key}.txt`` -> ``{"video": float [B,3,T,H,W] in [-1,1], "caption", "key"}``.
        Frames are resampled to ``fps`` (nearest frame on the source timeline), cover-resized and center-cropped to
        (``height``, ``width``) (rules in :mod:`data.clips`); a clip of ``num_frames`` (1 + 4k) starts at a seeded
        random frame (``clip_start="random"``) or at 0 (``"start"``; always for validation). Videos shorter than
        ``max(num_frames, min_frames)`` after resampling are skipped (the long teacher needs ``min_frames >= 160``).
        ``num_frames=None`` takes whole videos of any length (at most ``max_frames``, placed like a clip), one per
        batch. With ``teacher_clips`` (needs ``num_frames=None``; :class:`data.clips.TeacherClipMix` as a mapping:
        ``{kinds: [{layout: long, weight: 0.5}, {layout: dense, weight: 0.5, context_latents: 21,
        target_latents: 21}], long_layout: {...}}``) each sample is one teacher clip drawn from the mix (the video
        truncated to ``max_frames``): only the frames its layout reads are decoded, and the batch also carries
        ``"frame_index"`` (long ``[1, N]``: their pixel-frame numbers in the video), ``"layout"`` and
        ``"context_latents"`` for ``TeacherERFT(layout="batch")``. Sequence lengths differ from sample to sample,
        so batches hold one clip (batch 1 per GPU, as the paper); more clips per step come from more GPUs or
        gradient accumulation.
      * ``latents``: ``{key}.latent.pth`` ``[C,T,h,w]`` + ``{key}.text.pth`` ``[L,D]`` + ``{key}.txt`` ->
        ``{"latents": [B,C,T,h,w], "text": [B,L,D] zero-padded, "caption", "key"}``; ``latent_frames`` crops T.
        Text embeddings are zero-padded to ``text_length``, else to the ``text_length`` stored in ``{key}.json``,
        else to the longest in the batch.
      * ``prompts``: captions from shards, or from ``prompt_file`` (one prompt per line) -> ``{"caption", "key"}``;
        the training prompt stream is endless (bound an epoch with ``batches_per_epoch``).

    Every batch also carries ``batch["skipped"]`` (reason -> samples skipped since the worker's previous batch,
    see :data:`data.pipeline.SKIP_REASONS`); ``callbacks.SkippedSamplesLogger`` logs them.

    Training streams shuffle with a buffer of ``shuffle_buffer`` raw samples and either resample shards with
    replacement (``resampled=True``: endless, independent per rank and worker; bound epochs with
    ``batches_per_epoch``) or read each shard once per epoch split by rank (``split_by_node``) and DataLoader worker
    (``split_by_worker``). ``batches_per_epoch`` counts batches per rank. Validation streams read each sample once,
    in order, split by rank and worker, keeping a last partial batch.

    A remote shard (``http(s)://``, ``pipe:`` command, ...) that cannot be read is tried ``1 + shard_retries`` times,
    ``shard_retry_delay`` seconds apart (curl gives up on a connection or transfer stalled for ``shard_timeout``
    seconds), then the stream stops with an error naming the URL (:mod:`data.remote`).
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        mode: Literal["video", "latents", "prompts"] = "video",
        prompt_file: str | None = None,
        val_prompt_file: str | None = None,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        num_frames: int | None = 81,
        min_frames: int = 0,
        max_frames: int | None = None,
        height: int = 480,
        width: int = 832,
        fps: float = 16.0,
        clip_start: Literal["random", "start"] = "random",
        max_upscale: float | None = None,
        latent_frames: int | None = None,
        latent_size: tuple[int, int] | None = None,
        text_length: int | None = None,
        shuffle_buffer: int = 256,
        resampled: bool = True,
        batches_per_epoch: int | None = None,
        split_by_node: bool = True,
        split_by_worker: bool = True,
        seed: int = 0,
        teacher_clips: dict[str, Any] | None = None,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        shard_retries: int = 3,
        shard_retry_delay: float = 5.0,
        shard_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        if mode not in ("video", "latents", "prompts"):
            raise ValueError(f"mode must be 'video', 'latents' or 'prompts', got {mode!r}")
        if clip_start not in ("random", "start"):
            raise ValueError(f"clip_start must be 'random' or 'start', got {clip_start!r}")
        for name, value in (("batch_size", batch_size), ("height", height), ("width", width)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        if latent_frames is not None and latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1 or None, got {latent_frames}")
        if max_upscale is not None and max_upscale <= 0:
            raise ValueError(f"max_upscale must be positive or None, got {max_upscale}")
        if prompt_file is not None and mode != "prompts":
            raise ValueError(f"prompt_file is only used with mode='prompts' (mode is {mode!r})")
        if val_prompt_file is not None and mode != "prompts":
            raise ValueError(f"val_prompt_file is only used with mode='prompts' (mode is {mode!r})")
        if prompt_file is not None and train_urls is not None:
            raise ValueError("give either train_urls or prompt_file for training prompts, not both")
        if mode == "video" and num_frames is not None:
            check_num_frames(num_frames)
        if mode == "video" and num_frames is None and (batch_size != 1 or (val_batch_size or 1) != 1):
            raise ValueError("num_frames=None (whole videos of varying length) needs batch_size=1 and val_batch_size=1")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        clip_mix = None if teacher_clips is None else TeacherClipMix.from_config(teacher_clips)
        if clip_mix is not None and (mode != "video" or num_frames is not None):
            raise ValueError(f"teacher_clips needs mode='video' and num_frames=None (each clip's length comes from "
                             f"its layout), got mode={mode!r}, num_frames={num_frames}")
        self.save_hyperparameters()
        self.train_urls, self.val_urls = train_urls, val_urls
        self.mode, self.prompt_file, self.val_prompt_file = mode, prompt_file, val_prompt_file
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.num_workers, self.persistent_workers, self.pin_memory = num_workers, persistent_workers, pin_memory
        self._common = dict(
            mode=mode, num_frames=None if num_frames is None else int(num_frames), min_frames=int(min_frames),
            max_frames=max_frames, height=int(height), width=int(width),
            fps=float(fps), max_upscale=max_upscale, latent_frames=latent_frames,
            latent_size=tuple(latent_size) if latent_size is not None else None, text_length=text_length,
            split_by_node=split_by_node, split_by_worker=split_by_worker, seed=int(seed), teacher_clips=clip_mix,
            shard_retry=ShardRetry(int(shard_retries), float(shard_retry_delay), float(shard_timeout)),
        )
        self.train_config = StreamConfig(
            batch_size=self.batch_size, drop_last=True, clip_start=clip_start, shuffle_buffer=int(shuffle_buffer),
            resampled=resampled, batches_per_epoch=batches_per_epoch, **self._common,
        )
        self.val_config = StreamConfig(
            batch_size=self.val_batch_size, drop_last=False, clip_start="start", shuffle_buffer=0, resampled=False,
            batches_per_epoch=None, **self._common,
        )
        self.train_dataset: ShardStream | PromptFileStream | None = None
        self.val_dataset: ShardStream | PromptFileStream | None = None

    # ------------------------------------------------------------------ setup
    def _build(self, urls: str | list[str] | None, prompt_file: str | None, train: bool, what: str):
        config = self.train_config if train else self.val_config
        if prompt_file is not None:
            if not os.path.isfile(prompt_file):
                raise FileNotFoundError(f"{what} prompt file not found: {prompt_file!r}")
            return PromptFileStream(
                read_prompt_file(prompt_file), config.batch_size, endless=train, seed=config.seed,
                batches_per_epoch=config.batches_per_epoch, drop_last=config.drop_last,
            )
        if urls is None:
            return None
        expanded = check_shards_exist(urls, what=f"{what} shard")
        if train and not config.resampled:
            _, world, _, _ = pytorch_worker_info()
            readers = max(1, self.num_workers) * (world if config.split_by_node else 1)
            if len(expanded) < readers:
                rank_zero_warn(
                    f"{len(expanded)} training shards for {readers} readers (ranks x workers): some readers get no "
                    "data; write more, smaller shards or set resampled=True"
                )
        return ShardStream(expanded, config)

    def setup(self, stage: str | None = None) -> None:
        """Build the streams of the stage; a missing local shard or prompt file raises with its path."""
        if stage in (None, "fit"):
            self.train_dataset = self._build(self.train_urls, self.prompt_file, train=True, what="training")
            if self.train_dataset is None:
                raise ValueError(
                    "no training data: set train_urls (shards)"
                    + (" or prompt_file (one prompt per line)" if self.mode == "prompts" else "")
                )
        if stage in (None, "fit", "validate"):
            self.val_dataset = self._build(self.val_urls, self.val_prompt_file, train=False, what="validation")
            if self.val_dataset is None and stage == "validate":
                raise ValueError("no validation data: set val_urls" +
                                 (" or val_prompt_file" if self.mode == "prompts" else ""))

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, consumed: Any = None) -> EpochDataLoader:
        return EpochDataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0, consumed=consumed,
        )

    def _training_batches_consumed(self) -> tuple[int, bool] | None:
        """(batches of the current epoch the fit loop has handed to training, whether the epoch is over), or None
        outside a fit. The loop fetches one batch ahead when the loader has no length, so the loader's own count
        would be one too many in a mid-epoch checkpoint."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        count = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        return count, count >= trainer.num_training_batches

    def train_dataloader(self) -> EpochDataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, consumed=self._training_batches_consumed)

    def val_dataloader(self) -> EpochDataLoader | list:
        if self.val_dataset is None:
            if self.val_urls is None and self.val_prompt_file is None:
                return []
            self.setup("validate")
        return self._loader(self.val_dataset)
