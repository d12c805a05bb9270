"""data.VideoDataModule: WebDataset streams, frame-rate / crop / clip rules, splitting, seeding, skip counting."""

import io
import logging
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
import webdataset as wds

from cf.video_io import encode_mp4
from data import SKIP_REASONS, VideoDataModule
from data.clips import TeacherClipMix, cover_size, resample_indices, resize_cover_crop

LEVEL0, LEVEL_STEP = 20, 3  # frame i of a test video is a flat gray of level 20 + 3 i


def level_video(num_frames, height=16, width=16):
    levels = LEVEL0 + LEVEL_STEP * np.arange(num_frames)
    assert levels.max() < 256
    return np.broadcast_to(levels.astype(np.uint8)[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_numbers(video):
    """Source frame number of each frame of a batch video [B, 3, T, H, W] made from level_video."""
    level = ((video + 1) * 127.5).mean(dim=(1, 3, 4))  # [B, T]
    return torch.round((level - LEVEL0) / LEVEL_STEP).long()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def video_sample(key, num_frames=5, fps=16, height=16, width=16, caption=None):
    return {"__key__": key, "mp4": encode_mp4(level_video(num_frames, height, width), fps=fps),
            "txt": caption if caption is not None else f"caption of {key}"}


def pth(tensor):
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def collect(loader):
    return [batch for batch in loader]


# ---------------------------------------------------------------------------------------------------- clip rules


def naive_nearest_indices(num_source, source_fps, target_fps):
    """Reference: every target time j / ft below the source duration N / fs takes the source frame i minimising
    |i / fs - j / ft| (ties -> smaller i), clamped to the last frame."""
    fs, ft = Fraction(source_fps), Fraction(target_fps)
    out, j = [], 0
    while Fraction(j) / ft < Fraction(num_source) / fs:
        t = Fraction(j) / ft
        best = min(range(num_source + 1), key=lambda i: (abs(Fraction(i) / fs - t), i))
        out.append(min(best, num_source - 1))
        j += 1
    return out


@pytest.mark.parametrize("num_source", [1, 7, 40])
@pytest.mark.parametrize("source_fps,target_fps", [
    (16, 16), (32, 16), (8, 16), (24, 16), (25, 16), (Fraction(30000, 1001), 16), (60, 16), (10, 16), (16, 30),
])
def test_resample_indices_match_the_naive_nearest_frame_rule(num_source, source_fps, target_fps):
    got = resample_indices(num_source, source_fps, target_fps)
    assert got.tolist() == naive_nearest_indices(num_source, source_fps, target_fps)


def test_resample_indices_closed_forms():
    assert resample_indices(10, 16, 16).tolist() == list(range(10))
    assert resample_indices(10, 32, 16).tolist() == [0, 2, 4, 6, 8]
    assert resample_indices(4, 8, 16).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(resample_indices(300, Fraction(30000, 1001), 16)) == 161  # ceil(300 * 16 * 1001 / 30000)


def test_cover_crop_without_resize_is_an_exact_center_crop():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 32, 48, 3), dtype=np.uint8)
    assert cover_size(32, 48, 32, 32) == (32, 48)
    out = resize_cover_crop(frames, 32, 32)
    expected = torch.from_numpy(frames[:, :, 8:40]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert out.shape == (3, 3, 32, 32)
    assert torch.equal(out, expected)


def test_cover_resize_then_center_crop_keeps_the_middle():
    # a horizontal ramp (value = column) and a vertical ramp (value = row), 60 x 120 -> cover 30 x 30:
    # scale 0.5 -> 30 x 60, crop columns 15..45 of the resized frame = source columns 30..90
    height, width = 60, 120
    cols = np.broadcast_to(np.arange(width)[None, :], (height, width))
    rows = np.broadcast_to(np.arange(height)[:, None], (height, width))
    frame = np.stack([cols, rows * 2, np.full_like(cols, 100)], axis=-1).astype(np.uint8)[None]
    assert cover_size(height, width, 30, 30) == (30, 60)
    out = (resize_cover_crop(frame, 30, 30)[:, 0] + 1) * 127.5  # [3, 30, 30]
    c = torch.arange(30, dtype=torch.float32)
    source_col = (c + 15 + 0.5) * 2 - 0.5  # centre of output column c in source coordinates
    inner = slice(4, 26)  # away from the borders, where the kernel is cut
    assert torch.allclose(out[0, 15, inner], source_col[inner], atol=0.6)
    assert torch.allclose(out[1, inner, 15], 2 * ((c[inner] + 0.5) * 2 - 0.5), atol=1.2)
    assert torch.allclose(out[2], torch.full((30, 30), 100.0), atol=0.01)
    assert resize_cover_crop(np.zeros((2, 8, 8, 3), np.uint8), 16, 24).shape == (3, 2, 16, 24)  # upscaling works


def test_video_batches_follow_fps_crop_and_clip_rules(tmp_path):
    # 32 fps source of 64 frames (2 s) -> 32 frames at 16 fps = source frames 0, 2, 4, ...
    url = write_tar(tmp_path / "s.tar", [video_sample(f"k{i}", num_frames=64, fps=32, height=24, width=40)
                                         for i in range(3)])
    dm = VideoDataModule(val_urls=url, num_frames=17, height=16, width=16, batch_size=2, num_workers=0)
    dm.setup("validate")
    batches = collect(dm.val_dataloader())
    assert [b["key"] for b in batches] == [["k0", "k1"], ["k2"]]
    video = torch.cat([b["video"] for b in batches])
    assert video.shape == (3, 3, 17, 16, 16) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert (frame_numbers(video) == 2 * torch.arange(17)).all()
    assert batches[0]["caption"] == ["caption of k0", "caption of k1"]


def test_random_clip_starts_are_seeded_and_valid(tmp_path):
    url = write_tar(tmp_path / "s.tar", [video_sample(f"k{i}", num_frames=48, fps=16) for i in range(8)])

    def run(seed):
        dm = VideoDataModule(train_urls=url, num_frames=9, height=16, width=16, batch_size=4, num_workers=0,
                             resampled=False, shuffle_buffer=4, seed=seed)
        dm.setup("fit")
        return collect(dm.train_dataloader())

    first, again, other = run(0), run(0), run(1)
    for a, b in zip(first, again):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])
    starts = {}
    for batch in first:
        numbers = frame_numbers(batch["video"])
        for key, row in zip(batch["key"], numbers):
            start = int(row[0])
            assert row.tolist() == list(range(start, start + 9))  # contiguous clip
            assert 0 <= start <= 48 - 9
            starts[key] = start
    assert len(set(starts.values())) > 1
    other_starts = {k: int(n[0]) for b in other for k, n in zip(b["key"], frame_numbers(b["video"]))}
    assert other_starts != starts


def test_the_same_shards_in_another_folder_draw_the_same_clips(tmp_path):
    """Clip starts and teacher clips are seeded by the shard's file name, not its full path: a dataset copied to
    another folder (another run directory, another machine) trains on the same frames."""
    samples = [numbered_sample(f"k{i}", 12 + 3 * i) for i in range(4)]
    here, there = tmp_path / "a", tmp_path / "b" / "deeper" / "copy"
    for folder in (here, there):
        folder.mkdir(parents=True)
        write_tar(folder / "shard-000000.tar", samples)

    def draws(folder, **kwargs):
        dm = VideoDataModule(train_urls=str(folder / "shard-000000.tar"), height=32, width=16, num_workers=0,
                             resampled=False, shuffle_buffer=0, seed=3, **kwargs)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [(b["key"], numbered_frames(b["video"])[0].tolist()) for _ in range(3) for b in collect(loader)]

    for kwargs in ({"num_frames": 17}, {"num_frames": None, "min_frames": 160, "teacher_clips": PAPER_LONG}):
        first, copied = draws(here, **kwargs), draws(there, **kwargs)
        assert first == copied and len(first) >= 9
        assert len({frames[-1] for _, frames in first}) > 1  # the draws do vary (clip starts, clip ends)


# ---------------------------------------------------------------------------------------------------- splitting


@pytest.fixture
def eight_shards(tmp_path):
    for shard in range(8):
        write_tar(tmp_path / f"shard-{shard:02d}.tar", [video_sample(f"s{shard}-{i}") for i in range(5)])
    return str(tmp_path / "shard-{00..07}.tar"), {f"s{s}-{i}" for s in range(8) for i in range(5)}


def test_two_ranks_two_workers_see_every_sample_exactly_once_per_epoch(eight_shards, monkeypatch):
    urls, all_keys = eight_shards
    train, val = {}, {}  # (rank, epoch) -> keys
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = VideoDataModule(train_urls=urls, val_urls=urls, num_frames=5, height=16, width=16, batch_size=2,
                             num_workers=2, resampled=False, shuffle_buffer=8, seed=3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        for epoch in range(2):
            train[rank, epoch] = [k for b in collect(loader) for k in b["key"]]
        val[rank] = [k for b in collect(dm.val_dataloader()) for k in b["key"]]
    for keys in list(train.values()) + list(val.values()):
        assert len(keys) == len(set(keys)) == 20
    for epoch in range(2):
        assert set(train[0, epoch]).isdisjoint(train[1, epoch])
        assert set(train[0, epoch]) | set(train[1, epoch]) == all_keys
    assert set(val[0]).isdisjoint(val[1]) and set(val[0]) | set(val[1]) == all_keys
    assert train[0, 0] != train[0, 1]  # reshuffled each epoch


def test_resampled_epochs_have_the_requested_length_and_repeat_with_the_seed(eight_shards):
    urls, all_keys = eight_shards

    def epochs(seed):
        dm = VideoDataModule(train_urls=urls, num_frames=5, height=16, width=16, batch_size=2, num_workers=2,
                             resampled=True, batches_per_epoch=5, shuffle_buffer=4, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert len(loader) == 5
        return [[k for b in collect(loader) for k in b["key"]] for _ in range(2)]

    first, again = epochs(0), epochs(0)
    assert first == again
    assert all(len(keys) == 10 and set(keys) <= all_keys for keys in first)
    assert first[0] != first[1]


# ---------------------------------------------------------------------------------------------------- bad data


def test_bad_samples_are_skipped_counted_and_iteration_continues(tmp_path):
    good = video_sample("good0")
    truncated = dict(video_sample("truncated"))
    truncated["mp4"] = truncated["mp4"][: len(truncated["mp4"]) // 2]
    no_caption = video_sample("no_caption")
    del no_caption["txt"]
    samples = [
        good,
        {"__key__": "corrupt", "mp4": b"not a video" * 50, "txt": "x"},
        truncated,
        no_caption,
        video_sample("empty_caption", caption="   "),
        video_sample("good1"),
        video_sample("short", num_frames=3),  # 3 frames < num_frames = 5
        {"__key__": "no_video", "txt": "caption without video"},
        video_sample("tiny", height=8, width=8),  # would need x2 upscaling, max_upscale = 1.5
        video_sample("good2"),
        video_sample("good3"),
    ]
    urls = [write_tar(tmp_path / "a.tar", samples), str(tmp_path / "broken.tar")]
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 200)
    urls.append(write_tar(tmp_path / "c.tar", [video_sample("good4")]))
    dm = VideoDataModule(val_urls=urls, num_frames=5, height=16, width=16, batch_size=2, num_workers=0,
                         max_upscale=1.5)
    dm.setup("validate")
    batches = collect(dm.val_dataloader())
    assert [k for b in batches for k in b["key"]] == ["good0", "good1", "good2", "good3", "good4"]
    total = {}
    for batch in batches:
        for reason, count in batch["skipped"].items():
            total[reason] = total.get(reason, 0) + count
    assert total == {"corrupt_video": 2, "missing_caption": 2, "too_short": 1, "missing_video": 1,
                     "wrong_size": 1, "unreadable_shard": 1}
    assert set(total) <= set(SKIP_REASONS)
    # each batch reports what was skipped since the previous one
    assert batches[0]["skipped"] == {"corrupt_video": 2, "missing_caption": 2}
    assert batches[1]["skipped"] == {"too_short": 1, "missing_video": 1, "wrong_size": 1}
    assert batches[2]["skipped"] == {"unreadable_shard": 1}


def test_skips_after_the_last_batch_are_logged(tmp_path, caplog):
    url = write_tar(tmp_path / "a.tar", [video_sample("good0"), video_sample("good1"),
                                         video_sample("short", num_frames=1)])
    dm = VideoDataModule(val_urls=url, num_frames=5, height=16, width=16, batch_size=2, num_workers=0)
    dm.setup("validate")
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        batches = collect(dm.val_dataloader())
    assert [b["skipped"] for b in batches] == [{}]
    assert "after this worker's last batch" in caplog.text and "too_short" in caplog.text


# ---------------------------------------------------------------------------------------------------- other modes


def test_latents_mode_pads_text_crops_latents_and_skips_bad_members(tmp_path):
    rng = torch.Generator().manual_seed(0)
    latents = {k: torch.randn(4, 6, 2, 3, generator=rng) for k in "abcd"}
    texts = {"a": torch.randn(3, 5, generator=rng), "b": torch.randn(5, 5, generator=rng),
             "c": torch.randn(2, 5, generator=rng), "d": torch.randn(4, 5, generator=rng)}
    samples = [{"__key__": k, "latent.pth": pth(latents[k]), "text.pth": pth(texts[k]), "txt": f"cap {k}"}
               for k in "abcd"]
    samples.insert(1, {"__key__": "bad_shape", "latent.pth": pth(torch.zeros(4, 6, 5, 5)),
                       "text.pth": pth(texts["a"]), "txt": "x"})
    samples.insert(2, {"__key__": "no_text", "latent.pth": pth(latents["a"]), "txt": "x"})
    samples.insert(3, {"__key__": "corrupt", "latent.pth": b"garbage", "text.pth": pth(texts["a"]), "txt": "x"})
    samples.insert(4, {"__key__": "short", "latent.pth": pth(torch.zeros(4, 2, 2, 3)),
                       "text.pth": pth(texts["a"]), "txt": "x"})
    url = write_tar(tmp_path / "lat.tar", samples)
    dm = VideoDataModule(val_urls=url, mode="latents", latent_frames=4, text_length=6, batch_size=2,
                         num_workers=0)
    dm.setup("validate")
    batches = collect(dm.val_dataloader())
    assert [b["key"] for b in batches] == [["a", "b"], ["c", "d"]]
    assert batches[0]["skipped"] == {"wrong_size": 1, "missing_text": 1, "corrupt_latent": 1, "too_short": 1}
    assert batches[1]["skipped"] == {}
    for batch in batches:
        assert batch["latents"].shape == (2, 4, 4, 2, 3) and batch["text"].shape == (2, 6, 5)
        for i, key in enumerate(batch["key"]):
            assert torch.equal(batch["latents"][i], latents[key][:, :4])  # validation starts at latent 0
            n = texts[key].shape[0]
            assert torch.equal(batch["text"][i, :n], texts[key])
            assert (batch["text"][i, n:] == 0).all()
        assert batch["caption"] == [f"cap {k}" for k in batch["key"]]
    # training: random seeded latent crop of the right length, text padded to the batch's longest
    dm = VideoDataModule(train_urls=url, mode="latents", latent_frames=4, batch_size=2, num_workers=0,
                         resampled=False, shuffle_buffer=0)
    dm.setup("fit")
    for batch in collect(dm.train_dataloader()):
        assert batch["text"].shape[1] == max(texts[k].shape[0] for k in batch["key"])
        for i, key in enumerate(batch["key"]):
            full = latents[key]
            assert any(torch.equal(batch["latents"][i], full[:, s:s + 4]) for s in range(3))


def test_prompt_modes(tmp_path, monkeypatch):
    prompts = [f"prompt number {i}" for i in range(10)]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts[:5]) + "\n\n" + "\n".join(prompts[5:]) + "\n")
    # training prompts: endless, bounded by batches_per_epoch
    dm = VideoDataModule(mode="prompts", prompt_file=str(prompt_file), val_prompt_file=str(prompt_file),
                         batch_size=3, num_workers=0, batches_per_epoch=7)
    dm.setup("fit")
    train = collect(dm.train_dataloader())
    assert len(train) == 7 and all(len(b["caption"]) == 3 for b in train)
    assert all(c in prompts for b in train for c in b["caption"])
    seen = [c for b in train for c in b["caption"]]
    assert sorted(seen[:10]) == sorted(prompts)  # a full permutation before any repeat
    # validation prompts: each exactly once over 2 ranks x 2 workers
    got = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = VideoDataModule(mode="prompts", val_prompt_file=str(prompt_file), train_urls=None, batch_size=2,
                             num_workers=2)
        dm.setup("validate")
        got += [(k, c) for b in collect(dm.val_dataloader()) for k, c in zip(b["key"], b["caption"])]
    assert sorted(got) == sorted((f"prompt-{i}", p) for i, p in enumerate(prompts))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # captions from shards
    url = write_tar(tmp_path / "p.tar", [{"__key__": f"k{i}", "txt": p} for i, p in enumerate(prompts[:3])]
                    + [{"__key__": "k9", "json": b"{}"}])
    dm = VideoDataModule(mode="prompts", val_urls=url, batch_size=2, num_workers=0)
    dm.setup("validate")
    batches = collect(dm.val_dataloader())
    assert [b["caption"] for b in batches] == [prompts[:2], prompts[2:3]]
    assert batches[1]["skipped"] == {"missing_caption": 1} and "video" not in batches[0]


# ---------------------------------------------------------------------------------------------------- user errors


def test_misspelled_paths_fail_at_setup_with_the_path(tmp_path):
    write_tar(tmp_path / "shard-000.tar", [video_sample("a")])
    write_tar(tmp_path / "shard-001.tar", [video_sample("b")])
    wrong = str(tmp_path / "shrad-{000..001}.tar")
    dm = VideoDataModule(train_urls=wrong, num_frames=5, height=16, width=16)
    with pytest.raises(FileNotFoundError, match="shrad-000.tar"):
        dm.setup("fit")
    dm = VideoDataModule(train_urls=str(tmp_path / "shard-{000..002}.tar"), num_frames=5, height=16, width=16)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 .*shard-002\.tar"):
        dm.setup("fit")
    dm = VideoDataModule(mode="prompts", prompt_file=str(tmp_path / "promtps.txt"))
    with pytest.raises(FileNotFoundError, match="promtps.txt"):
        dm.setup("fit")
    ok = VideoDataModule(train_urls=str(tmp_path / "shard-{000..001}.tar"), num_frames=5, height=16, width=16)
    ok.setup("fit")


def test_bad_configuration_values_are_named():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        VideoDataModule(train_urls="x.tar", num_frames=16)
    with pytest.raises(ValueError, match="mode"):
        VideoDataModule(train_urls="x.tar", mode="frames")
    with pytest.raises(ValueError, match="clip_start"):
        VideoDataModule(train_urls="x.tar", clip_start="middle")
    with pytest.raises(ValueError, match="prompt_file"):
        VideoDataModule(train_urls="x.tar", prompt_file="p.txt")
    with pytest.raises(ValueError, match="no training data"):
        VideoDataModule().setup("fit")


def test_whole_videos_of_varying_length(tmp_path):
    url = write_tar(tmp_path / "s.tar", [video_sample("long", num_frames=40), video_sample("mid", num_frames=23),
                                         video_sample("short", num_frames=11)])
    dm = VideoDataModule(val_urls=url, num_frames=None, min_frames=12, max_frames=30, height=16, width=16,
                         num_workers=0)
    dm.setup("validate")
    batches = collect(dm.val_dataloader())
    assert [b["key"] for b in batches] == [["long"], ["mid"]]
    assert (frame_numbers(batches[0]["video"])[0] == torch.arange(30)).all()  # capped at max_frames
    assert (frame_numbers(batches[1]["video"])[0] == torch.arange(23)).all()  # whole video
    assert batches[1]["skipped"] == {} and sum(b["skipped"].get("too_short", 0) for b in batches) == 0
    with pytest.raises(ValueError, match="batch_size=1"):
        VideoDataModule(train_urls=url, num_frames=None, batch_size=2)


def test_configurable_from_yaml_through_jsonargparse(tmp_path):
    from jsonargparse import ArgumentParser

    url = write_tar(tmp_path / "s.tar", [video_sample("a")])
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        f"  train_urls: {url}\n"
        "  mode: video\n  num_frames: 5\n  height: 16\n  width: 16\n  fps: 16\n  batch_size: 1\n"
        "  num_workers: 0\n  resampled: false\n  latent_size: [2, 3]\n  clip_start: start\n"
    )
    parser = ArgumentParser()
    parser.add_class_arguments(VideoDataModule, "data")
    parser.add_argument("--config", action="config")
    dm = parser.instantiate_classes(parser.parse_args(["--config", str(config)])).data
    assert isinstance(dm, VideoDataModule) and dm.train_config.latent_size == (2, 3)
    dm.setup("fit")
    (batch,) = collect(dm.train_dataloader())
    assert batch["key"] == ["a"] and batch["video"].shape == (1, 3, 5, 16, 16)


# ---------------------------------------------------------------------------------------------------- teacher clips

BASE, STEP = 48, 4  # frame i of a numbered video: top half 20 + 4 (i % 48), bottom half 20 + 4 (i // 48)
PAPER_LONG = {"kinds": [{"layout": "long", "weight": 1.0}]}  # the §E.2 counts are LongLayoutConfig's defaults


def numbered_video(num_frames, height=32, width=16):
    """Long test videos (hundreds of frames): the frame number is written in two flat halves."""
    i = np.arange(num_frames)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:, : height // 2] = (20 + STEP * (i % BASE))[:, None, None, None]
    frames[:, height // 2:] = (20 + STEP * (i // BASE))[:, None, None, None]
    return frames


def numbered_frames(video):
    """Frame numbers ``[B, T]`` of a batch video ``[B, 3, T, H, W]`` made from numbered_video."""
    pixels = (video + 1) * 127.5
    height = video.shape[3]
    top = pixels[:, :, :, 2: height // 2 - 2].mean(dim=(1, 3, 4))
    bottom = pixels[:, :, :, height // 2 + 2: -2].mean(dim=(1, 3, 4))
    return (torch.round((top - 20) / STEP) + BASE * torch.round((bottom - 20) / STEP)).long()


def numbered_sample(key, seconds, fps=16):
    return {"__key__": key, "mp4": encode_mp4(numbered_video(int(seconds * fps)), fps=fps, crf=0),
            "txt": f"caption of {key}"}


def paper_long_clip(end):
    """§E.2 in words for a clip of the video's frames 0 … end − 1: sink = frames 0–8, target = the last 84 frames,
    motion = the 24 before (+1 leading frame), sparse = from the last 288 frames between sink and that leading frame,
    a 5-frame snippet every 24 frames. Returns (frames read, number of sparse snippets)."""
    leading = end - 84 - 24 - 1
    region_start = max(9, leading - 288)
    snippets = [list(range(s, s + 5)) for s in range(region_start, leading - 5 + 1, 24)]
    frames = list(range(9)) + [f for s in snippets for f in s] + list(range(leading, end))
    return frames, len(snippets)


def test_teacher_clip_draws_follow_the_paper_rule():
    mix = TeacherClipMix.from_config(PAPER_LONG)
    rng = random.Random(0)
    counts = {}
    for seconds in (10, 15, 30, 60):
        num_frames = 16 * seconds
        counts[seconds] = Counter()
        ends = []
        for _ in range(1100):
            clip = mix.draw(num_frames, rng)
            end = clip.frame_index[-1] + 1
            frames, sparse = paper_long_clip(end)
            assert list(clip.frame_index) == frames and clip.layout == "long"
            assert clip.context_latents == 3 + sparse + 6 and clip.target_latents == 21
            counts[seconds][sparse] += 1
            ends.append(end)
        assert max(ends) <= num_frames and min(ends) >= 147  # 147 = the shortest clip with 2 sparse latents
        if seconds == 60:
            assert max(ends) > 900  # for the largest count every end up to the video's end can be drawn
    assert set(counts[10]) == {2}  # 160 frames: only room for 2 snippets
    assert set(counts[15]) == {2, 3, 4, 5}  # 240 frames: up to 5
    assert set(counts[30]) == set(counts[60]) == set(range(2, 13))  # long enough for the 12 of §E.2
    for seconds in (15, 30):  # every reachable count about equally often
        share = 1 / len(counts[seconds])
        assert all(abs(c / 1100 - share) < 0.05 for c in counts[seconds].values())
    assert mix.draw(146, rng) is None


def test_teacher_clip_mix_kinds_fit_the_video():
    mix = TeacherClipMix.from_config({"kinds": [
        {"layout": "long", "weight": 1.0},
        {"layout": "dense", "weight": 1.0, "context_latents": 21, "target_latents": 21},
        {"layout": "dense", "weight": 1.0, "context_latents": 0, "target_latents": 21}]})
    rng = random.Random(1)
    seen = Counter()
    for num_frames in (100, 160, 200):
        for _ in range(300):
            clip = mix.draw(num_frames, rng)
            seen[num_frames, clip.layout, clip.context_latents if clip.layout == "dense" else None] += 1
            if clip.layout == "dense":
                length = 1 + 4 * (clip.context_latents + clip.target_latents - 1)  # 165 or 81
                start = clip.frame_index[0]
                assert list(clip.frame_index) == list(range(start, start + length)) and start + length <= num_frames
    assert {k[1:] for k in seen if k[0] == 100} == {("dense", 0)}  # 81 frames only
    assert {k[1:] for k in seen if k[0] == 160} == {("long", None), ("dense", 0)}  # 165 > 160
    assert {k[1:] for k in seen if k[0] == 200} == {("long", None), ("dense", 0), ("dense", 21)}
    assert mix.draw(80, rng) is None
    assert [(c.layout, c.context_latents, c.target_latents) for c in mix.possible_clips()] == \
        [("long", 3 + k + 6, 21) for k in range(2, 13)] + [("dense", 21, 21), ("dense", 0, 21)]
    with pytest.raises(ValueError, match="layout must be one of"):
        TeacherClipMix.from_config({"kinds": [{"layout": "sparse"}]})
    with pytest.raises(ValueError, match="weight > 0"):
        TeacherClipMix.from_config({"kinds": [{"layout": "long", "weight": 0.0}]})
    with pytest.raises(ValueError, match="unknown teacher_clips keys"):
        TeacherClipMix.from_config({"kinds": [{"layout": "long"}], "long": {}})


def test_teacher_clips_from_videos_sink_from_the_start_and_short_videos_skipped(tmp_path):
    url = write_tar(tmp_path / "t.tar", [numbered_sample("s09", 9), numbered_sample("s10", 10),
                                         numbered_sample("s15", 15), numbered_sample("s30", 30)])
    dm = VideoDataModule(train_urls=url, val_urls=url, num_frames=None, min_frames=160, height=32, width=16,
                         num_workers=0, resampled=False, shuffle_buffer=0, teacher_clips=PAPER_LONG, seed=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    sparse_by_video, skipped = {}, Counter()
    for _ in range(6):  # epochs: a new draw per video each time
        for batch in collect(loader):
            skipped.update(batch["skipped"])
            (key,) = batch["key"]
            index = batch["frame_index"][0]
            assert batch["layout"] == ["long"] and batch["video"].shape[2] == len(index)
            assert torch.equal(numbered_frames(batch["video"])[0], index)  # the decoded pixels are those frames
            assert index[:9].tolist() == list(range(9))  # the sink: the video's first frames
            frames, sparse = paper_long_clip(int(index[-1]) + 1)
            assert index.tolist() == frames and batch["context_latents"] == [3 + sparse + 6]
            sparse_by_video.setdefault(key, []).append((int(index[-1]) + 1, sparse))
    assert skipped == {"too_short": 6}  # the 9 s video, once per epoch
    assert set(sparse_by_video) == {"s10", "s15", "s30"}
    for key, draws in sparse_by_video.items():
        draws.sort()
        assert [s for _, s in draws] == sorted(s for _, s in draws)  # more history, more sparse latents
        assert all(2 <= s <= 12 for _, s in draws)
    assert {s for _, s in sparse_by_video["s10"]} == {2}
    assert max(s for _, s in sparse_by_video["s15"]) <= 5
    assert max(s for _, s in sparse_by_video["s30"]) > 5
    assert len({e for e, _ in sparse_by_video["s30"]}) > 1  # the clip end varies
    # validation draws are fixed per video: every pass reads the same clips
    passes = [[b["frame_index"][0].tolist() for b in collect(dm.val_dataloader())] for _ in range(2)]
    assert passes[0] == passes[1] and len(passes[0]) == 3


def test_teacher_clips_configuration_errors():
    with pytest.raises(ValueError, match="num_frames=None"):
        VideoDataModule(train_urls="x.tar", num_frames=81, teacher_clips=PAPER_LONG)
    with pytest.raises(ValueError, match="batch_size=1"):
        VideoDataModule(train_urls="x.tar", num_frames=None, batch_size=2, teacher_clips=PAPER_LONG)
    with pytest.raises(ValueError, match="mode='video'"):
        VideoDataModule(train_urls="x.tar", mode="latents", num_frames=None, teacher_clips=PAPER_LONG)


def test_non_finite_latents_or_text_are_skipped_and_counted(tmp_path):
    rng = torch.Generator().manual_seed(0)
    samples = [{"__key__": f"s{i:02d}", "latent.pth": pth(torch.randn(4, 3, 2, 2, generator=rng)),
                "text.pth": pth(torch.randn(3, 5, generator=rng)), "txt": f"cap {i}"} for i in range(24)]
    poisoned = torch.randn(4, 3, 2, 2, generator=rng)
    poisoned[1, 2, 0, 1] = float("nan")
    samples[13]["latent.pth"] = pth(poisoned)
    text = torch.randn(3, 5, generator=rng)
    text[0, 0] = float("inf")
    samples[5]["text.pth"] = pth(text)
    url = write_tar(tmp_path / "nan.tar", samples)
    dm = VideoDataModule(val_urls=url, mode="latents", batch_size=2, num_workers=0)
    dm.setup("validate")
    batches = collect(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"s{i:02d}" for i in range(24) if i not in (5, 13)]
    assert sum((Counter(b["skipped"]) for b in batches), Counter()) == {"non_finite": 2}
    assert all(bool(torch.isfinite(b["latents"]).all() and torch.isfinite(b["text"]).all()) for b in batches)
    assert "non_finite" in SKIP_REASONS
