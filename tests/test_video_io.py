"""cf.video_io: PyAV mp4 encode / decode / streaming writer."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from cf.video_io import (
    Mp4Writer,
    as_fraction,
    decode_mp4,
    encode_mp4,
    pad_to_even,
    probe_mp4,
    read_video,
    to_uint8_frames,
)


def flat_frames(levels, height=16, width=16):
    """uint8 [T, H, W, 3]: frame i is a flat colour (level, 255 - level, level // 2)."""
    levels = np.asarray(levels, dtype=np.int64)
    colours = np.stack([levels, 255 - levels, levels // 2], axis=-1).astype(np.uint8)  # [T, 3]
    return np.broadcast_to(colours[:, None, None, :], (len(levels), height, width, 3)).copy()


def test_round_trip_keeps_frames_fps_and_size():
    frames = flat_frames(np.arange(12) * 20)
    data = encode_mp4(frames, fps=16)
    decoded, fps = decode_mp4(data)
    assert fps == 16.0
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # flat colours survive H.264 + yuv420p up to colour-conversion rounding
    assert np.abs(decoded.astype(int) - frames.astype(int)).max() <= 6


def test_lossless_mode_keeps_every_value_and_repeats_its_bytes():
    frames = np.random.default_rng(0).integers(0, 256, size=(9, 16, 24, 3), dtype=np.uint8)  # no smooth structure
    data = encode_mp4(frames, fps=16, lossless=True)
    decoded, fps = decode_mp4(data)
    assert fps == 16.0 and np.array_equal(decoded, frames)
    assert encode_mp4(frames, fps=16, lossless=True) == data
    lossy, _ = decode_mp4(encode_mp4(frames, fps=16))
    assert not np.array_equal(lossy, frames)  # the default (yuv420p) path does lose information


def test_fractional_frame_rate_is_kept():
    assert as_fraction(30000 / 1001) == Fraction(30000, 1001)
    assert as_fraction(29.97) == Fraction(2997, 100)
    data = encode_mp4(flat_frames([0, 50, 100]), fps=Fraction(30000, 1001))
    assert probe_mp4(data).fps == Fraction(30000, 1001)
    assert decode_mp4(data)[1] == pytest.approx(30000 / 1001)
    with pytest.raises(ValueError, match="positive"):
        as_fraction(0)


def test_probe_matches_decoded_video():
    frames = flat_frames(np.arange(9) * 25, height=24, width=40)
    data = encode_mp4(frames, fps=8)
    info = probe_mp4(data)
    decoded, _ = decode_mp4(data)
    assert (info.num_frames, info.height, info.width) == decoded.shape[:3] == (9, 24, 40)
    assert info.fps == 8


def test_odd_sizes_are_padded_by_repeating_the_last_row_and_column():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    padded = pad_to_even(frames)
    assert padded.shape == (2, 6, 8, 3)
    assert np.array_equal(padded[:, :5, :7], frames)
    assert np.array_equal(padded[:, 5, :7], frames[:, 4])
    assert np.array_equal(padded[:, :5, 7], frames[:, :, 6])
    assert np.array_equal(padded[:, 5, 7], frames[:, 4, 6])
    decoded, _ = decode_mp4(encode_mp4(flat_frames([10, 200], height=33, width=35), fps=16))
    assert decoded.shape == (2, 34, 36, 3)


def test_float_tensor_maps_minus_one_to_one_onto_0_to_255():
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # exactly the level k for k = 0..255
    video = levels.view(1, 256, 1, 1).expand(3, 256, 2, 2)
    frames = to_uint8_frames(video)
    assert frames.shape == (256, 2, 2, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[:, 0, 0, 0], np.arange(256))
    clamped = to_uint8_frames(torch.tensor([-3.0, 3.0]).view(1, 2, 1, 1).expand(3, 2, 2, 2))
    assert clamped[0].max() == 0 and clamped[1].min() == 255


def test_writer_streams_chunks_of_both_input_kinds(tmp_path):
    path = tmp_path / "video.mp4"
    first = flat_frames([0, 40, 80])
    second_uint8 = flat_frames([120, 160])
    second = torch.from_numpy(second_uint8).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, T, H, W]
    with Mp4Writer(path, fps=16) as writer:
        writer.write(first)
        writer.write(second)
        assert writer.frames_written == 5
    decoded, fps = read_video(path)
    expected = np.concatenate([first, second_uint8])
    assert decoded.shape == expected.shape and fps == 16
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 6


def test_writer_writes_to_disk_before_close(tmp_path):
    path = tmp_path / "long.mp4"
    rng = np.random.default_rng(0)
    writer = Mp4Writer(path, fps=16, preset="ultrafast")
    for _ in range(4):
        writer.write(rng.integers(0, 256, size=(25, 96, 96, 3), dtype=np.uint8))
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".long.mp4.tmp-")]
    assert temp.stat().st_size > 0  # packets were muxed as they came, not kept until the end
    assert not path.exists()  # the final name only ever holds a finished video
    writer.close()
    assert probe_mp4(str(path)).num_frames == 100
    assert sorted(tmp_path.iterdir()) == [path]


def test_an_aborted_writer_leaves_nothing_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "clip.mp4"
    frames = np.zeros((9, 16, 16, 3), np.uint8)
    with Mp4Writer(path, fps=16) as writer:
        writer.write(frames)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(path, fps=16) as writer:
            writer.write(frames + 100)
            raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]


def test_decode_selected_indices_matches_full_decode():
    frames = flat_frames(np.arange(20) * 12)
    data = encode_mp4(frames, fps=16)
    full, _ = decode_mp4(data)
    indices = [7, 0, 3, 3, 12]
    picked, _ = decode_mp4(data, frame_indices=indices)
    assert np.array_equal(picked, full[indices])
    with pytest.raises(ValueError, match="ended before frame 20"):
        decode_mp4(data, frame_indices=[0, 20])


def test_user_errors_have_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        encode_mp4(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        encode_mp4(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        Mp4Writer(tmp_path / "no_such_folder" / "x.mp4").write(flat_frames([1]))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    writer = Mp4Writer(tmp_path / "x.mp4")
    writer.write(flat_frames([1], height=8, width=8))
    with pytest.raises(ValueError, match="frame size changed"):
        writer.write(flat_frames([1], height=16, width=8))
    writer.close()
    with pytest.raises(ValueError, match="no frames"):
        Mp4Writer(tmp_path / "empty.mp4").close()


def test_corrupt_and_truncated_bytes_raise():
    data = encode_mp4(flat_frames(np.arange(10) * 20), fps=16)
    with pytest.raises(Exception):
        decode_mp4(b"this is not an mp4 file" * 10)
    with pytest.raises(Exception):
        decode_mp4(data[: len(data) // 2])


def moving_frames(num_frames: int, height: int = 32, width: int = 48) -> np.ndarray:
    """uint8 [T, H, W, 3]: gradients that move by a different step per channel, so every frame differs."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(5 * x + 3 * t) % 256, (7 * y + t) % 256, np.full_like(x, 11 * t % 256)], axis=-1)
                     for t in range(num_frames)]).astype(np.uint8)


class CountingContainer:
    """A PyAV input container that counts the frames it decodes and the seeks it makes."""

    def __init__(self, container) -> None:
        self.container, self.decoded, self.seeks = container, 0, []

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()

    def seek(self, offset, **kwargs) -> None:
        self.seeks.append(offset)
        self.container.seek(offset, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.decoded += 1
            yield frame


def test_clip_late_in_a_long_video_is_reached_by_seeking(monkeypatch):
    """600 H.264 frames (x264: keyframes every 250, B-frames, so decode order differs from display order): clips
    that start late equal the same frames of a full decode, and are decoded from the keyframe before them."""
    import cf.video_io as video_io

    data = encode_mp4(moving_frames(600), fps=16)
    full, _ = decode_mp4(data)
    assert len(full) == 600
    opened: list[CountingContainer] = []
    open_input = video_io._open_input
    monkeypatch.setattr(video_io, "_open_input", lambda source: opened.append(CountingContainer(open_input(source)))
                        or opened[-1])
    for start, length in [(400, 21), (250, 5), (249, 3), (590, 10), (1, 8)]:
        opened.clear()
        indices = list(range(start, start + length))
        clip, fps = decode_mp4(data, indices)
        assert fps == 16 and np.array_equal(clip, full[indices])
        (container,) = opened  # one pass, no fall back to a decode from frame 0
        keyframe = max(k for k in (0, 250, 500) if k <= start)
        assert container.decoded <= start + length - keyframe + 3  # from the keyframe (+ the B-frame delay)
    opened.clear()
    scattered = [599, 2, 300, 300, 0, 301, 12]  # a teacher-clip layout: start frames, then frames far later
    clip, _ = decode_mp4(data, scattered)
    assert np.array_equal(clip, full[scattered])
    assert len(opened[0].seeks) == 3 and opened[0].decoded <= 13 + 52 + 100 + 3  # frames 0-12, 250-301, 500-599


def test_seeking_keeps_the_errors_of_short_and_truncated_videos():
    data = encode_mp4(moving_frames(30), fps=16)
    full, _ = decode_mp4(data)
    assert np.array_equal(decode_mp4(data, [29, 10])[0], full[[29, 10]])
    with pytest.raises(ValueError, match="ended before frame 30"):
        decode_mp4(data, [5, 30])
    with pytest.raises(Exception):
        decode_mp4(data[: len(data) // 2], [20, 21])


def test_lossless_videos_seek_straight_to_the_frame():
    """Lossless mp4s store every frame as a PNG keyframe: the seek lands on the first wanted frame."""
    frames = moving_frames(40, 16, 16)
    data = encode_mp4(frames, fps=16, lossless=True)
    assert np.array_equal(decode_mp4(data, [33, 30, 31])[0], frames[[33, 30, 31]])
