"""MP4 video reading and writing with PyAV (H.264, yuv420p; or lossless PNG frames with ``lossless=True``).

Frames are uint8 RGB arrays ``[T, H, W, 3]``. H.264 with yuv420p needs even sizes: an odd height or width is padded
by repeating the last row or column (never cropped), so a ``[T, 63, 65, 3]`` clip is stored as ``[T, 64, 66, 3]``.
The streaming :class:`Mp4Writer` also accepts generator output directly: float tensors ``[3, T, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import bisect
import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Sequence

import av
import numpy as np
import torch

from cf.atomic import commit_temporary, discard_temporary, remove_stale_temporaries, temporary_name

__all__ = [
    "VideoInfo",
    "Mp4Writer",
    "encode_mp4",
    "decode_mp4",
    "probe_mp4",
    "read_video",
    "to_uint8_frames",
    "pad_to_even",
    "as_fraction",
]

VideoSource = bytes | str | os.PathLike


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata of an mp4: frame count, frame rate and frame size."""

    num_frames: int
    fps: Fraction
    height: int
    width: int


def as_fraction(fps: float | int | Fraction) -> Fraction:
    """A frame rate as an exact fraction (floats: nearest with denominator <= 1001, so 30000/1001 survives)."""
    if isinstance(fps, Fraction):
        rate = fps
    elif isinstance(fps, int):
        rate = Fraction(fps)
    else:
        rate = Fraction(float(fps)).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return rate


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``[T, H, W, 3]`` to even H and W by repeating the last row / column (yuv420p needs even sizes)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h == 0 and pad_w == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def to_uint8_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Normalise writer input to uint8 ``[T, H, W, 3]``.

    Accepts uint8 ``[T, H, W, 3]`` (numpy or torch) or a float tensor ``[3, T, H, W]`` in [-1, 1]
    (values outside are clamped; mapped by ``round((x + 1) * 127.5)``).
    """
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            frames = frames.detach().cpu().numpy()
        elif frames.is_floating_point():
            if frames.ndim != 4 or frames.shape[0] != 3:
                raise ValueError(
                    f"float video tensors must be [3, T, H, W] in [-1, 1], got shape {tuple(frames.shape)}; "
                    "pass one video of a batch (video[i]) or uint8 frames [T, H, W, 3]"
                )
            pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return np.ascontiguousarray(pixels.permute(1, 2, 3, 0).cpu().numpy())
        else:
            raise ValueError(f"unsupported tensor dtype {frames.dtype}: use uint8 [T,H,W,3] or float [3,T,H,W]")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(
            f"numpy frames must be uint8 [T, H, W, 3], got dtype {frames.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) or pass a float torch tensor [3, T, H, W] in [-1, 1]"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
    return np.ascontiguousarray(frames)


class Mp4Writer:
    """Streaming H.264 mp4 writer: frames are encoded as they arrive, so a long video never sits in memory.

    Usage::

        with Mp4Writer("out.mp4", fps=16) as writer:
            for chunk in chunks:          # uint8 [T, H, W, 3] or float tensor [3, T, H, W] in [-1, 1]
                writer.write(chunk)

    The frame size is fixed by the first chunk (odd sizes padded to even, see the module docstring).
    A file path is written through a hidden temporary file beside it (`cf.atomic`), renamed to ``path`` by
    `close` once the mp4 is complete: the path never holds an unfinished video. `abort` (or leaving the ``with``
    block by an exception) removes the temporary file; `close` after an interruption keeps the frames written so
    far as a playable mp4.
    ``crf`` is x264's constant rate factor (0 = lossless luma, 18 = visually lossless, 23 = x264 default).
    ``lossless=True`` stores the RGB frames exactly instead (every frame a PNG image in the mp4; ``crf`` and
    ``preset`` are ignored): the same frames always give the same bytes, and decoding is exact and several times
    faster than H.264's. ffmpeg-based tools (PyAV, ffplay, VLC) play such files; browsers do not.
    """

    def __init__(
        self,
        path: str | os.PathLike | BinaryIO,
        fps: float | Fraction = 16,
        crf: int = 18,
        preset: str = "medium",
        lossless: bool = False,
    ) -> None:
        self.path = path
        self.fps = as_fraction(fps)
        self.crf = int(crf)
        self.preset = preset
        self.lossless = bool(lossless)
        self.frames_written = 0
        self._container: av.container.OutputContainer | None = None
        self._stream = None
        self._size: tuple[int, int] | None = None
        self._closed = False
        self._temp: str | None = None  # the file being written when `path` is a file path

    def _open(self, height: int, width: int) -> None:
        target = self.path if not isinstance(self.path, os.PathLike) else os.fspath(self.path)
        if isinstance(target, str):
            parent = os.path.dirname(os.path.abspath(target))
            if not os.path.isdir(parent):
                raise FileNotFoundError(f"cannot write {target}: folder {parent} does not exist")
            remove_stale_temporaries(parent)
            target = self._temp = os.fspath(temporary_name(target))
        self._container = av.open(target, mode="w", format="mp4")
        if self.lossless:
            stream = self._container.add_stream("png", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        else:
            stream = self._container.add_stream(
                "libx264", rate=self.fps, options={"crf": str(self.crf), "preset": self.preset}
            )
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        self._stream = stream
        self._size = (height, width)

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append frames: uint8 ``[T, H, W, 3]`` or float tensor ``[3, T, H, W]`` in [-1, 1]."""
        if self._closed:
            raise RuntimeError("Mp4Writer is closed; open a new writer to write more frames")
        frames = pad_to_even(to_uint8_frames(frames))
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != self._size:
            raise ValueError(
                f"frame size changed within one video: first chunk was {self._size} (after even padding), "
                f"this chunk is {frames.shape[1:3]}"
            )
        for frame in frames:
            packet = self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
            self._container.mux(packet)
        self.frames_written += len(frames)

    def close(self) -> None:
        """Flush the encoder and finish the file (renamed to ``path`` when it is a file path). Writing no frames at
        all is an error."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            raise ValueError(f"no frames were written to {self.path!r}; an mp4 needs at least one frame")
        try:
            self._container.mux(self._stream.encode())
            self._container.close()
        except BaseException:
            if self._temp is not None:
                discard_temporary(self._temp)
            raise
        if self._temp is not None:
            commit_temporary(self._temp, self.path)

    def abort(self) -> None:
        """Stop without keeping anything: close the container and remove the temporary file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._container is not None:
                self._container.close()
        finally:
            if self._temp is not None:
                discard_temporary(self._temp)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encode_mp4(frames_uint8: np.ndarray | torch.Tensor, fps: float | Fraction = 16, crf: int = 18,
               preset: str = "medium", lossless: bool = False) -> bytes:
    """Encode a whole clip to mp4 bytes. ``frames_uint8``: ``[T, H, W, 3]`` uint8 (or float ``[3, T, H, W]``);
    ``lossless`` as in :class:`Mp4Writer`."""
    buffer = io.BytesIO()
    with Mp4Writer(buffer, fps=fps, crf=crf, preset=preset, lossless=lossless) as writer:
        writer.write(frames_uint8)
    return buffer.getvalue()


def _open_input(source: VideoSource) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(source)), mode="r")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    return av.open(path, mode="r")


def _stream_fps(stream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def _video_stream(container: av.container.InputContainer):
    """The first video stream, decoded with frame threads; ValueError when the file has none."""
    if not container.streams.video:
        raise ValueError("no video stream in the file")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def probe_mp4(source: VideoSource) -> VideoInfo:
    """Frame count, fps and size without decoding pixels (counts demuxed packets when the header has no count)."""
    with _open_input(source) as container:
        if not container.streams.video:
            raise ValueError("no video stream in the file")
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        if fps is None:
            raise ValueError("the video stream has no frame rate")
        num_frames = stream.frames
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        return VideoInfo(num_frames=int(num_frames), fps=fps, height=stream.height, width=stream.width)


class _SeekMiss(Exception):
    """The seek-and-decode path met a frame it cannot place; decode from the first frame instead."""


def _frame_table(container: av.container.InputContainer, stream) -> tuple[list[int], list[int]]:
    """(pts of every frame in presentation order, indices of the keyframes among them), from the packets alone
    (demuxed, not decoded). Raises `_SeekMiss` when a packet has no pts."""
    pts, keyframe_pts = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream flush packet
            continue
        if packet.pts is None:
            raise _SeekMiss("a packet without pts")
        pts.append(int(packet.pts))
        if packet.is_keyframe:
            keyframe_pts.append(int(packet.pts))
    pts.sort()
    index_of = {p: i for i, p in enumerate(pts)}
    return pts, sorted(index_of[p] for p in keyframe_pts)


def _decode_by_seeking(container: av.container.InputContainer, stream, wanted: dict[int, np.ndarray | None]
                       ) -> None:
    """Fill ``wanted`` (frame index -> None) with the frames, decoding from the last keyframe at or before each
    wanted frame whenever that keyframe lies beyond the frames decoded so far (PyAV seek, then decode forward).
    Frames are placed by their pts in the packet table, so they are the frames a decode from frame 0 gives."""
    pts, keyframes = _frame_table(container, stream)
    index_of = {p: i for i, p in enumerate(pts)}
    frames = None
    position = -1  # index of the last frame decoded
    for target in sorted(wanted):
        if wanted[target] is not None:
            continue
        if target >= len(pts):
            raise _SeekMiss("index beyond the packet table")
        keyframe = keyframes[bisect.bisect_right(keyframes, target) - 1] if keyframes and keyframes[0] <= target \
            else 0
        if frames is None or keyframe > position + 1:
            container.seek(pts[keyframe], backward=True, any_frame=False, stream=stream)
            frames = container.decode(stream)
            position = -1
        for frame in frames:
            index = index_of.get(frame.pts)
            if index is None:
                raise _SeekMiss("a decoded frame whose pts is not in the packet table")
            if index in wanted and wanted[index] is None:
                wanted[index] = frame.to_ndarray(format="rgb24")
            position = index
            if index >= target:
                break
        if wanted[target] is None:  # the seek landed after the frame, or the decoder dropped it
            raise _SeekMiss(f"frame {target} not reached after seeking")


def decode_mp4(data: VideoSource, frame_indices: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Decode mp4 bytes (or a path) to ``(frames uint8 [T, H, W, 3], fps)``.

    With ``frame_indices`` (indices into the decoded frame sequence, any order, repeats allowed) only those frames are
    decoded and kept: a clip that starts late in a long video is reached by seeking to the keyframe before it (and
    after a gap, to the keyframe before the next wanted frame) and decoding from there, never from frame 0; the
    frames equal those of a full decode. Raises ValueError if the stream ends before an index is reached (a
    truncated file) or holds no frames.
    """
    wanted: dict[int, np.ndarray] | None = None
    last = -1
    if frame_indices is not None:
        indices = [int(i) for i in frame_indices]
        if not indices:
            raise ValueError("frame_indices is empty")
        if min(indices) < 0:
            raise ValueError(f"frame indices must be >= 0, got {min(indices)}")
        wanted, last = {i: None for i in indices}, max(indices)
    targets = sorted(wanted or ())
    seek = bool(targets) and not (targets[0] == 0 and targets[-1] == len(targets) - 1)  # not frames 0..n-1
    if seek:
        with _open_input(data) as container:
            stream = _video_stream(container)
            fps = _stream_fps(stream)
            try:
                _decode_by_seeking(container, stream, wanted)
            except (_SeekMiss, av.error.FFmpegError):  # decode from frame 0 instead (a truncated file fails there)
                wanted = {i: None for i in wanted}
                seek = False
    frames: list[np.ndarray] = []
    if not seek:
        with _open_input(data) as container:
            stream = _video_stream(container)
            fps = _stream_fps(stream)
            for index, frame in enumerate(container.decode(stream)):
                if wanted is None:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    continue
                if index in wanted:
                    wanted[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    if fps is None:
        raise ValueError("the video stream has no frame rate")
    if wanted is None:
        if not frames:
            raise ValueError("the video holds no decodable frames")
        return np.stack(frames), float(fps)
    missing = [i for i, frame in wanted.items() if frame is None]
    if missing:
        raise ValueError(f"video ended before frame {min(missing)} (truncated or fewer frames than its header says)")
    return np.stack([wanted[int(i)] for i in frame_indices]), float(fps)


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a video file to ``(frames uint8 [T, H, W, 3], fps)``."""
    return decode_mp4(path)
