"""Frame strips: a few frames of each video side by side in one PNG, one row per video, to see at a glance what a
model draws."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["strip_frame_indices", "frame_strip", "save_png"]


def strip_frame_indices(num_frames: int, columns: int) -> list[int]:
    """``columns`` frame indices spread evenly from the first to the last frame (fewer if the video is shorter)."""
    if num_frames < 1 or columns < 1:
        raise ValueError(f"need at least one frame and one column, got {num_frames} frames, {columns} columns")
    return sorted(set(np.linspace(0, num_frames - 1, min(columns, num_frames)).round().astype(int).tolist()))


def _uint8_frames(video: np.ndarray | torch.Tensor) -> np.ndarray:
    frames = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return frames


def frame_strip(rows: Sequence[Sequence[np.ndarray | torch.Tensor]], columns: int = 6, gap: int = 2,
                group_gap: int = 8, scale: int = 2) -> np.ndarray:
    """One image ``[H', W', 3]`` uint8: row r shows, for each video of ``rows[r]`` (uint8 ``[T, H, W, 3]``, all of
    one frame size), ``columns`` evenly spaced frames, ``gap`` white pixels apart; the videos of a row are
    ``group_gap`` apart (e.g. generated | dataset). Everything is enlarged ``scale`` times (nearest neighbour)."""
    if not rows or not all(rows):
        raise ValueError("frame_strip needs at least one row with at least one video")
    rendered = []
    for videos in rows:
        parts = []
        for v, video in enumerate(videos):
            frames = _uint8_frames(video)
            height = frames.shape[1]
            for i, index in enumerate(strip_frame_indices(frames.shape[0], columns)):
                if parts:
                    parts.append(np.full((height, group_gap if i == 0 else gap, 3), 255, np.uint8))
                parts.append(frames[index])
        rendered.append(np.concatenate(parts, axis=1))
    width = max(r.shape[1] for r in rendered)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rendered]
    separated = []
    for r, row in enumerate(padded):
        if r:
            separated.append(np.full((gap, width, 3), 255, np.uint8))
        separated.append(row)
    image = np.concatenate(separated, axis=0)
    return image.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else image


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 ``[H, W, 3]`` image as PNG (folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)
    return path
