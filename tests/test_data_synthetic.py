"""data.synthetic: ground truth that matches the pixels, determinism, shards and prompts."""

import json
import math
import tarfile

import numpy as np
import pytest

from cf.video_io import decode_mp4
from data.synthetic import (
    BACKGROUND_COLORS,
    SHAPES,
    SPRITE_COLORS,
    CAPTION_NAMES,
    caption_for,
    caption_is_named,
    caption_record,
    clip_seed,
    make_clip_spec,
    render_clip,
    write_synthetic_shards,
)

CONTRACT_KEYS = {"source", "fps", "num_frames", "height", "width", "seed", "background", "sprites"}


# ------------------------------------------------------------------ independent, per-pixel reference renderer


def inside_shape(shape, size, cx, cy, px, py):
    """Is the pixel centre (px, py) inside a sprite? Written with geometry, independently of the library."""
    h = size / 2
    if shape == "circle":
        return math.hypot(px - cx, py - cy) <= h
    if shape == "square":
        return cx - h <= px <= cx + h and cy - h <= py <= cy + h
    if shape == "diamond":
        return abs(px - cx) + abs(py - cy) <= h
    if shape == "triangle":  # apex (cx, cy - h), base corners (cx -+ h, cy + h): inside all three half-planes
        (ax, ay), (bx, by), (qx, qy) = (cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)

        def side(x0, y0, x1, y1):
            return (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)

        return side(ax, ay, bx, by) >= -1e-4 and side(bx, by, qx, qy) >= -1e-4 and side(qx, qy, ax, ay) >= -1e-4
    raise AssertionError(shape)


def reference_background(bg, row, col, height):
    half = bg["period"] // 2
    color, texture_color = np.array(bg["color"]), np.array(bg["texture_color"])
    if bg["texture"] == "flat":
        return color
    if bg["texture"] == "stripes":
        return texture_color if (col // half) % 2 else color
    if bg["texture"] == "checker":
        return texture_color if (row // half + col // half) % 2 else color
    w = row / (height - 1)
    return np.floor(color + (texture_color - color) * w + 0.5)  # gradient, halves never occur at these values


def reference_frame(spec, t):
    height, width = spec["height"], spec["width"]
    frame = np.zeros((height, width, 3), np.int64)
    for r in range(height):
        for c in range(width):
            value = reference_background(spec["background"], r, c, height)
            for sprite in spec["sprites"]:  # id order, later ones on top
                x, y = sprite["track"]["x"][t], sprite["track"]["y"][t]
                if inside_shape(sprite["shape"], sprite["size"], np.float32(x), np.float32(y), c + 0.5, r + 0.5):
                    value = np.array(sprite["color"])
            frame[r, c] = value
    return frame


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("seed", [0, 5, 11])
def test_rendered_frames_equal_a_per_pixel_reference(seed):
    spec = make_clip_spec(seed, min_seconds=2, max_seconds=3)
    frames = render_clip(spec)
    for t in np.linspace(0, spec["num_frames"] - 1, 4).astype(int):
        mismatch = np.abs(frames[t].astype(np.int64) - reference_frame(spec, t)).max(axis=-1) > 0
        assert mismatch.sum() <= 2, f"frame {t}: {mismatch.sum()} pixels differ"  # float32 edge rounding only


def test_ground_truth_matches_the_pixels():
    textures_seen = set()
    for seed in range(6):
        spec = make_clip_spec(seed)
        frames = render_clip(spec).astype(np.int64)
        height, width = spec["height"], spec["width"]
        textures_seen.add(spec["background"]["texture"])
        background_values = {tuple(spec["background"]["color"]), tuple(spec["background"]["texture_color"])}
        for sprite in spec["sprites"]:
            colour = np.array(sprite["color"])
            has_colour = (frames == colour).all(axis=-1).any(axis=(1, 2))  # [T]
            visible = np.array(sprite["track"]["visible"])
            later = [s for s in spec["sprites"] if s["id"] > sprite["id"]]
            for t in range(spec["num_frames"]):
                x, y = sprite["track"]["x"][t], sprite["track"]["y"][t]
                if not visible[t]:
                    assert not has_colour[t], f"seed {seed} sprite {sprite['id']} frame {t}: invisible but shown"
                    continue
                col, row = int(math.floor(x)), int(math.floor(y))
                covered = any(math.hypot(s["track"]["x"][t] - x, s["track"]["y"][t] - y) < (s["size"] + sprite["size"])
                              and s["track"]["visible"][t] for s in later)
                if 0 <= col < width and 0 <= row < height and not covered:
                    assert (frames[t, row, col] == colour).all(), f"seed {seed} sprite {sprite['id']} frame {t}"
        # far from every visible sprite, the pixel is the background of the json
        rows, cols = np.mgrid[0:height, 0:width]
        for t in range(0, spec["num_frames"], 37):
            free = np.ones((height, width), bool)
            for s in spec["sprites"]:
                d = np.hypot(cols + 0.5 - s["track"]["x"][t], rows + 0.5 - s["track"]["y"][t])
                free &= d > s["size"]
            for r, c in zip(rows[free][::17], cols[free][::17]):
                expected = reference_background(spec["background"], r, c, height)
                assert (frames[t, r, c] == expected).all()
                if spec["background"]["texture"] != "gradient":
                    assert tuple(frames[t, r, c]) in background_values
    assert len(textures_seen) >= 2


def test_spec_follows_the_contract_and_the_content_rules():
    reentries = total = 0
    for seed in range(30):
        spec = make_clip_spec(seed)
        assert set(spec) == CONTRACT_KEYS
        assert spec["source"] == "synthetic" and spec["fps"] == 16 and (spec["height"], spec["width"]) == (64, 64)
        assert 10 * 16 <= spec["num_frames"] <= 30 * 16
        bg = spec["background"]
        assert set(bg) == {"color", "texture", "texture_color", "period"}
        assert tuple(bg["color"]) in BACKGROUND_COLORS.values() and bg["period"] % 2 == 0
        assert 1 <= len(spec["sprites"]) <= 3
        assert len({tuple(s["color"]) for s in spec["sprites"]}) == len(spec["sprites"])
        assert len({s["shape"] for s in spec["sprites"]}) == len(spec["sprites"])
        for index, sprite in enumerate(spec["sprites"]):
            assert set(sprite) == {"id", "shape", "color", "size", "track"} and sprite["id"] == index
            assert sprite["shape"] in SHAPES and tuple(sprite["color"]) in SPRITE_COLORS.values()
            assert 12 <= sprite["size"] <= 20
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in sprite["color"])
            track = sprite["track"]
            assert set(track) == {"x", "y", "visible"}
            assert all(len(track[k]) == spec["num_frames"] for k in track)
            assert all(isinstance(v, bool) for v in track["visible"])
            visible = np.array(track["visible"], int)
            leaves, enters = np.where(np.diff(visible) == -1)[0], np.where(np.diff(visible) == 1)[0]
            total += 1
            reentries += any((enters > leave).any() and enters[enters > leave][0] - leave >= spec["fps"]
                             for leave in leaves)
        json.dumps(spec)  # serialisable as is
    assert reentries >= 0.8 * total  # most sprites leave for at least a second and come back


def test_sprite_colours_stay_separable_after_8x8_pooling():
    # the toy autoencoder averages 8x8 patches: a patch mostly covered by a sprite must stay nearest to its colour
    palette = np.array(list(SPRITE_COLORS.values()) + list(BACKGROUND_COLORS.values()), float)
    colours = np.array(list(SPRITE_COLORS.values()), float)
    distances = np.linalg.norm(colours[:, None] - palette[None], axis=-1)
    distances[np.arange(len(colours)), np.arange(len(colours))] = np.inf
    assert distances.min() > 90  # saturated and far apart
    checked = 0
    for seed in range(4):
        spec = make_clip_spec(seed, min_seconds=2, max_seconds=2)
        frames = render_clip(spec).astype(float)
        pooled = frames.reshape(-1, 8, 8, 8, 8, 3).mean(axis=(2, 4))  # [T, 8, 8, 3]
        candidates = np.concatenate([colours, [spec["background"]["color"], spec["background"]["texture_color"]]])
        nearest = np.linalg.norm(pooled[..., None, :] - candidates, axis=-1).argmin(-1)  # [T, 8, 8]
        for sprite in spec["sprites"]:
            covered = (frames == sprite["color"]).all(-1).reshape(-1, 8, 8, 8, 8).mean(axis=(2, 4))
            mostly = covered >= 0.75
            index = [tuple(c) for c in colours.astype(int)].index(tuple(sprite["color"]))
            assert (nearest[mostly] == index).all()
            checked += mostly.sum()
    assert checked > 100


def test_same_seed_gives_the_same_bytes_and_different_seeds_differ():
    a, b = render_clip(make_clip_spec(42)), render_clip(make_clip_spec(42))
    assert a.tobytes() == b.tobytes()
    assert make_clip_spec(42) == make_clip_spec(42)
    c = render_clip(make_clip_spec(43))
    assert a.shape != c.shape or a.tobytes() != c.tobytes()
    assert clip_seed(0, 1) != clip_seed(0, 2) and clip_seed(0, 1) == clip_seed(0, 1)


def test_caption_names_the_content():
    spec = make_clip_spec(0)
    spec["sprites"] = spec["sprites"][:1]
    spec["sprites"][0].update(color=list(SPRITE_COLORS["red"]), shape="circle")
    spec["background"].update(color=list(BACKGROUND_COLORS["dark green"]), texture="stripes")
    assert caption_for(spec) == "a red circle on a dark green striped background"
    second = dict(spec["sprites"][0], id=1, color=list(SPRITE_COLORS["orange"]), shape="square")
    third = dict(spec["sprites"][0], id=2, color=list(SPRITE_COLORS["blue"]), shape="diamond")
    spec["sprites"] += [second, third]
    assert caption_for(spec) == ("a red circle, an orange square and a blue diamond "
                                 "on a dark green striped background")
    assert caption_for(spec, named=False) == "three shapes on a striped background"
    spec["sprites"] = spec["sprites"][:1]
    spec["background"]["texture"] = "checker"
    assert caption_for(spec, named=False) == "a shape on a checkered background"
    record = caption_record(spec, named=False)
    assert record == {"text": "a shape on a checkered background", "names": ["background_texture", "sprite_count"],
                      "named": "a red circle on a dark green checkered background"}
    assert caption_record(spec)["names"] == list(CAPTION_NAMES)


def test_unnamed_captions_follow_their_fraction_per_clip():
    seeds = [clip_seed(0, i) for i in range(2000)]
    assert all(caption_is_named(s, 0.0) for s in seeds) and not any(caption_is_named(s, 1.0) for s in seeds)
    named = np.array([caption_is_named(s, 0.3) for s in seeds])
    assert abs((~named).mean() - 0.3) < 0.04  # binomial sd 0.01
    # nested: a clip unnamed at fraction 0.3 stays unnamed at 0.6 (one uniform draw per clip)
    assert all(not caption_is_named(s, 0.6) for s, n in zip(seeds, named) if not n)


def test_write_synthetic_shards_round_trip(tmp_path, capsys):
    result = write_synthetic_shards(str(tmp_path), num_clips=6, seed=7, splits={"train": 4, "val": 2}, maxcount=3,
                                    min_seconds=1.0, max_seconds=2.0, unnamed_fraction=0.5, num_workers=2)
    assert "clips" in capsys.readouterr().out  # the timing line
    assert result["train"]["num_clips"] == 4 and result["val"]["num_clips"] == 2
    assert result["train"]["urls"] == str(tmp_path / "train" / "shard-{000000..000001}.tar")
    index, captions_seen = 0, set()
    for split in ("train", "val"):
        prompts = (tmp_path / split / "prompts.txt").read_text().splitlines()
        members = {}
        for shard in sorted((tmp_path / split).glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    members[member.name] = tar.extractfile(member).read()
        keys = sorted({name.split(".")[0] for name in members})
        assert len(keys) == len(prompts) == result[split]["num_clips"]
        for key, prompt in zip(keys, prompts):
            assert key == f"{split}-{index:06d}"
            stored = json.loads(members[f"{key}.json"])
            caption = stored.pop("caption")
            spec = make_clip_spec(clip_seed(7, index), min_seconds=1.0, max_seconds=2.0)
            assert stored == spec
            named = caption_is_named(clip_seed(7, index), 0.5)
            captions_seen.add(named)
            assert caption == caption_record(spec, named)
            assert members[f"{key}.txt"].decode() == prompt == caption["text"] == caption_for(spec, named)
            frames, fps = decode_mp4(members[f"{key}.mp4"])
            assert fps == 16 and np.array_equal(frames, render_clip(spec))  # stored losslessly
            index += 1
    assert captions_seen == {True, False}  # this seed draws both kinds


def test_same_seed_gives_byte_identical_shards(tmp_path):
    options = dict(num_clips=3, seed=3, splits={"train": 2, "val": 1}, min_seconds=1.0, max_seconds=1.5,
                   unnamed_fraction=0.5)
    write_synthetic_shards(str(tmp_path / "a"), num_workers=1, **options)
    write_synthetic_shards(str(tmp_path / "b"), num_workers=2, **options)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["train/prompts.txt", "train/shard-000000.tar", "val/prompts.txt",
                                       "val/shard-000000.tar"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
