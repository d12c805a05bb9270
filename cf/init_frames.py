"""Given frames to continue from (`cf generate --init-video / --init-image`).

The frames are read as uint8 ``[T, H, W, 3]``, cut to whole chunks of latents (an autoencoder maps 1 + 4(k − 1)
pixel frames to k latents, so m chunks of n latents take 1 + 4(mn − 1) pixel frames) and encoded with the
generator's autoencoder. A clip keeps its *last* such frames, so the generation continues from the clip's end; an
image is held still for one chunk (1 + 4(n − 1) equal frames). The uint8 frames kept are what the output video starts
with, exactly; their latents go into the memory through clean commit passes (`cf.rollout.stream`, ``init_latents``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cf.encoder_base import VideoAutoencoder
from cf.video_io import read_video

__all__ = ["chunk_pixel_frames", "read_init_frames", "encode_init_frames"]


def chunk_pixel_frames(num_pixel_frames: int, frames_per_chunk: int, temporal_factor: int = 4) -> int:
    """The most pixel frames ≤ `num_pixel_frames` that encode to whole chunks: 1 + f(mn − 1), m ≥ 1 (or 0)."""
    chunks = (num_pixel_frames - 1 + temporal_factor) // (temporal_factor * frames_per_chunk)
    return 1 + temporal_factor * (chunks * frames_per_chunk - 1) if chunks >= 1 else 0


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_init_frames(path: str | Path, frame_size: tuple[int, int], frames_per_chunk: int, image: bool = False,
                     temporal_factor: int = 4) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` to start a video with: a video's last whole-chunk frames, or an image repeated for
    one chunk. `frame_size` (H, W) is the generator's; other sizes, and clips shorter than one chunk, are refused
    with a message naming the fix."""
    path = Path(path)
    flag = "--init-image" if image else "--init-video"
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    try:
        frames = _read_image(path)[None] if image else read_video(path)[0]
    except (OSError, ValueError) as err:  # PIL / PyAV: not an image or video they can read
        kind = "an image (PNG, JPEG, ...)" if image else "a video (mp4, ...)"
        raise ValueError(f"{flag} {path} cannot be read as {kind} ({' '.join(str(err).split())[:160]})") from None
    height, width = frames.shape[1:3]
    if (height, width) != tuple(frame_size):
        h, w = frame_size
        fix = (f"ffmpeg -i {path.name} -vf scale={w}:{h} resized{path.suffix}" if not image else
               f"resize it to {w}x{h} pixels")
        raise ValueError(f"{flag} {path} is {width}x{height} but the generator makes {w}x{h} videos; {fix}")
    needed = 1 + temporal_factor * (frames_per_chunk - 1)
    if image:
        return np.repeat(frames, needed, axis=0)
    keep = chunk_pixel_frames(len(frames), frames_per_chunk, temporal_factor)
    if keep == 0:
        raise ValueError(f"{flag} {path} has {len(frames)} frames, fewer than one chunk ({needed}); pass a longer "
                         "clip, or its last frame as --init-image")
    return frames[len(frames) - keep:]


@torch.no_grad()
def encode_init_frames(autoencoder: VideoAutoencoder, frames: np.ndarray, batch_size: int = 1,
                       device: torch.device | str = "cpu") -> Tensor:
    """uint8 ``[T, H, W, 3]`` -> normalised latents ``[batch_size, C, 1 + (T − 1)/4, h, w]`` (float32)."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    latents = autoencoder.encode(pixels).float()
    return latents.expand(batch_size, *latents.shape[1:])
