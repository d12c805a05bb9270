"""Turning a decoded video into a training clip: frame-rate resampling, clip choice, cover resize and center crop.

Frame-rate rule (nearest frame on the source timeline): a source of N frames at ``fs`` fps spans [0, N/fs). Target
frame j sits at time j/ft; it takes the source frame i whose timestamp i/fs is nearest (ties go to the earlier frame),
clamped to the last frame. The resampled video covers the source duration: M = ceil(N * ft / fs) frames. Equal rates
give the identity, 32 -> 16 fps takes every second frame, 8 -> 16 fps repeats every frame twice.

Spatial rule ("cover"): scale by s = max(H / h, W / w) so the frame covers the target, to (max(H, round(h s)),
max(W, round(w s))) with antialiased bicubic interpolation (skipped when the size already matches), then crop the
centre: top = (h' - H) // 2, left = (w' - W) // 2.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from cf.video_io import as_fraction

__all__ = ["resample_indices", "cover_size", "cover_scale", "resize_cover_crop", "check_num_frames"]


def check_num_frames(num_frames: int) -> int:
    """Validate a pixel clip length of the form 1 + 4k (what the video autoencoders take)."""
    if int(num_frames) != num_frames or num_frames < 1 or (num_frames - 1) % 4 != 0:
        raise ValueError(
            f"num_frames must be 1 + 4k (1, 5, 9, ..., 81, ...) so it encodes to 1 + k latent frames, got {num_frames}"
        )
    return int(num_frames)


def resample_indices(num_source_frames: int, source_fps: float | Fraction, target_fps: float | Fraction) -> np.ndarray:
    """Source frame index for each target frame (int64 ``[M]``), by the nearest-frame rule of the module docstring."""
    if num_source_frames < 0:
        raise ValueError(f"num_source_frames must be >= 0, got {num_source_frames}")
    ratio = as_fraction(source_fps) / as_fraction(target_fps)  # source frames per target frame
    p, q = ratio.numerator, ratio.denominator
    num_target = -((-num_source_frames * q) // p)  # ceil(N / ratio)
    j = np.arange(num_target, dtype=np.int64)
    # nearest with ties to the earlier frame: ceil(j * p / q - 1/2) == floor((2 j p + q - 1) / (2 q))
    indices = (2 * j * p + q - 1) // (2 * q)
    return np.minimum(indices, max(num_source_frames - 1, 0))


def cover_scale(height: int, width: int, target_height: int, target_width: int) -> float:
    """Scale factor that makes an ``height x width`` frame cover the target."""
    return max(target_height / height, target_width / width)


def cover_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """Size ``(h', w')`` after the cover resize, before the center crop."""
    scale = cover_scale(height, width, target_height, target_width)
    return max(target_height, round(height * scale)), max(target_width, round(width * scale))


def resize_cover_crop(frames: np.ndarray | torch.Tensor, height: int, width: int, chunk: int = 32) -> torch.Tensor:
    """uint8 frames ``[T, h, w, 3]`` -> float ``[3, T, height, width]`` in [-1, 1] (cover resize + center crop).

    Frames are resized ``chunk`` at a time so peak memory stays close to the output's.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    num_frames, src_h, src_w = frames.shape[:3]
    new_h, new_w = cover_size(src_h, src_w, height, width)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = torch.empty(3, num_frames, height, width, dtype=torch.float32)
    for start in range(0, num_frames, chunk):
        part = frames[start : start + chunk].permute(0, 3, 1, 2).float()  # [t, 3, h, w]
        if (new_h, new_w) != (src_h, src_w):
            part = F.interpolate(part, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            part = part.clamp(0, 255)
        part = part[:, :, top : top + height, left : left + width]
        out[:, start : start + chunk] = part.permute(1, 0, 2, 3) / 127.5 - 1
    return out

