"""Sample videos in TensorBoard without moviepy (``add_video`` needs moviepy < 2, reference.md §6.4).

:func:`log_video` encodes an animated GIF with Pillow and writes it as an *image* summary (TensorBoard's Images tab
plays animated GIFs), downscaled to keep event files small; the full-size mp4 goes to ``<log_dir>/videos/``.

:class:`VideoLogger` logs the videos a LightningModule exposes during validation, through either of:

- ``validation_step`` returns a dict with ``"videos"``: a float tensor ``[B, 3, T, H, W]`` in [-1, 1]; logged as
  ``<prefix>/batch<i>`` for the first ``max_batches`` batches (the batch is tiled side by side);
- the module sets ``self.videos_to_log = {tag: video}`` (``[3, T, H, W]`` or ``[B, 3, T, H, W]`` in [-1, 1]);
  logged and cleared at the end of the validation epoch.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary

from cf.video_io import encode_mp4

__all__ = ["VideoLogger", "log_video", "video_to_frames", "encode_gif"]


def video_to_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames from uint8 ``[T, H, W, 3]`` or float ``[3, T, H, W]`` / ``[B, 3, T, H, W]`` in
    [-1, 1] (a batch is tiled left to right)."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be [T, H, W, 3], got {tuple(video.shape)}")
        return video.cpu().numpy()
    if not video.is_floating_point():
        raise ValueError(f"videos must be uint8 [T, H, W, 3] or float in [-1, 1], got dtype {video.dtype}")
    if video.ndim == 5:
        if video.shape[1] != 3:
            raise ValueError(f"batched videos must be [B, 3, T, H, W], got {tuple(video.shape)}")
        video = torch.cat(list(video), dim=-1)  # tile along the width
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"float videos must be [3, T, H, W] or [B, 3, T, H, W] in [-1, 1], got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def _downscale(frames: np.ndarray, max_side: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    scale = max_side / max(height, width)
    if scale >= 1:
        return frames
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """Animated, looping GIF of uint8 ``[T, H, W, 3]`` frames (GIF timing is in 10 ms steps)."""
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"need at least one frame [T, H, W, 3], got {frames.shape}")
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    duration = max(20, int(round(100.0 / fps)) * 10)
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buffer.getvalue()


def _file_writer(experiment: Any) -> Any:
    for name in ("_get_file_writer", "get_file_writer"):
        if hasattr(experiment, name):
            return getattr(experiment, name)()
    if hasattr(experiment, "file_writer"):
        return experiment.file_writer
    raise TypeError(f"expected a TensorBoard SummaryWriter (TensorBoardLogger.experiment), got {type(experiment)}")


def log_video(experiment: Any, tag: str, video: torch.Tensor | np.ndarray, step: int, fps: float = 8.0,
              max_side: int = 256, max_frames: int | None = 160, mp4_dir: str | Path | None = None,
              write_mp4: bool = True) -> Path | None:
    """Write ``video`` to TensorBoard as an animated-GIF image summary and (optionally) the full video as an mp4.

    ``experiment``: a ``SummaryWriter``. The GIF is downscaled to ``max_side`` and, beyond ``max_frames``, temporally
    strided. The mp4 goes to ``mp4_dir`` (default ``<experiment.log_dir>/videos``); returns its path.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = video_to_frames(video)
    preview = frames
    gif_fps = fps
    if max_frames is not None and frames.shape[0] > max_frames:
        stride = -(-frames.shape[0] // max_frames)
        preview, gif_fps = frames[::stride], fps / stride
    preview = _downscale(preview, max_side)
    image = Summary.Image(height=preview.shape[1], width=preview.shape[2], colorspace=3,
                          encoded_image_string=encode_gif(preview, gif_fps))
    writer = _file_writer(experiment)
    writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), global_step=step)
    if not write_mp4:
        return None
    folder = Path(mp4_dir) if mp4_dir is not None else Path(experiment.log_dir) / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}_step{int(step):08d}.mp4"
    path.write_bytes(encode_mp4(frames, fps=fps))
    return path


class VideoLogger(Callback):
    """Log validation sample videos to TensorBoard (GIF previews) and mp4 files next to the logs.

    Args:
        fps: frame rate of the videos.
        max_batches: log the ``"videos"`` output of the first this-many validation batches.
        max_videos_per_batch: videos of a batch to tile side by side.
        prefix: tag prefix for batch outputs.
        max_side: longer side of the GIF preview.
        log_during_sanity_check: also log during Lightning's sanity-check validation.
    """

    def __init__(self, fps: float = 8.0, max_batches: int = 1, max_videos_per_batch: int = 4, prefix: str = "val/video",
                 max_side: int = 256, log_during_sanity_check: bool = False) -> None:
        super().__init__()
        self.fps = fps
        self.max_batches = max_batches
        self.max_videos_per_batch = max_videos_per_batch
        self.prefix = prefix
        self.max_side = max_side
        self.log_during_sanity_check = log_during_sanity_check
        self._warned = False

    def _experiment(self, trainer: pl.Trainer) -> Any | None:
        if not trainer.is_global_zero or (trainer.sanity_checking and not self.log_during_sanity_check):
            return None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if not self._warned:
            rank_zero_warn("VideoLogger needs a TensorBoardLogger among the trainer's loggers; videos are not logged")
            self._warned = True
        return None

    def _log(self, trainer: pl.Trainer, tag: str, video: torch.Tensor) -> None:
        experiment = self._experiment(trainer)
        if experiment is not None:
            log_video(experiment, tag, video, trainer.global_step, fps=self.fps, max_side=self.max_side)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx >= self.max_batches or not isinstance(outputs, Mapping) or "videos" not in outputs:
            return
        videos = outputs["videos"]
        if videos.ndim == 5:
            videos = videos[: self.max_videos_per_batch]
        suffix = f"_dl{dataloader_idx}" if dataloader_idx else ""
        self._log(trainer, f"{self.prefix}/batch{batch_idx}{suffix}", videos)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = getattr(pl_module, "videos_to_log", None)
        if not pending:
            return
        for tag, video in pending.items():
            self._log(trainer, tag, video)
        pending.clear()
