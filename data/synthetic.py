"""Synthetic videos with long-range structure and exact ground truth.

Each clip has a persistent background (a dark colour with a texture) and 1-3 sprites whose identities (shape and
saturated colour, both distinct within a clip) stay fixed while they wander, leave the frame, stay away for seconds
and re-enter, possibly from another side. A model that forgets what left the frame brings it back wrong, which the
evaluation can measure against the ground truth. Defaults: 64x64 pixels, 16 fps, 10-30 s.

The ground truth is the json of ``docs/interfaces.md``; :func:`render_clip` turns it back into the exact frames.
Captions name every sprite and the background, or (a chosen fraction of clips) only the sprite count and the texture
("two shapes on a striped background"): then what a sprite looked like before it left the frame can only come from
the video itself. Shards store the frames losslessly, so a dataset is the same bytes whenever it is rebuilt.
Rendering rules (pixel (row r, column c) has its centre at (x, y) = (c + 0.5, r + 0.5); a sprite of ``size`` s at
(x0, y0) with d = (x - x0, y - y0) and h = s / 2 covers):
  circle: |d| <= h;  square: max(|dx|, |dy|) <= h;  diamond: |dx| + |dy| <= h;
  triangle (apex up): -h <= dy <= h and |dx| <= (dy + h) / 2.
Sprites are drawn in id order (a later id covers an earlier one). Background textures with p = period (even):
  flat: color;  stripes: vertical, texture_color where (c // (p/2)) is odd;
  checker: texture_color where (r // (p/2) + c // (p/2)) is odd;
  gradient: rows blend linearly from color (top row) to texture_color (bottom row), rounded.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from typing import Any, Iterator, Mapping

import numpy as np
from tqdm.auto import tqdm

from cf.video_io import encode_mp4

__all__ = [
    "SPRITE_COLORS",
    "BACKGROUND_COLORS",
    "SHAPES",
    "TEXTURES",
    "make_clip_spec",
    "render_clip",
    "render_background",
    "sprite_masks",
    "CAPTION_NAMES",
    "caption_for",
    "caption_is_named",
    "caption_record",
    "clip_seed",
    "write_synthetic_shards",
]

# saturated, well separated colours (they must stay recognisable after 8x8 average pooling)
SPRITE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 205, 40),
    "blue": (40, 80, 245),
    "yellow": (245, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 220, 230),
    "orange": (250, 125, 10),
    "white": (245, 245, 245),
}
# dark colours, far from every sprite colour; the texture colour is the background colour lightened by 30 %
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (80, 80, 80),
    "navy": (20, 25, 90),
    "dark green": (20, 80, 35),
    "brown": (95, 60, 25),
    "maroon": (100, 20, 35),
    "purple": (75, 30, 100),
    "teal": (20, 85, 90),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
TEXTURES: tuple[str, ...] = ("flat", "stripes", "checker", "gradient")
_TEXTURE_WORDS = {"flat": "plain", "stripes": "striped", "checker": "checkered", "gradient": "gradient"}
_COUNT_WORDS = {1: "a shape", 2: "two shapes", 3: "three shapes", 4: "four shapes"}
# what a caption can name (json "caption": {"names": [...]}); an unnamed caption names only the last two
CAPTION_NAMES: tuple[str, ...] = ("background_color", "sprite_colors", "sprite_shapes", "background_texture",
                                  "sprite_count")
_UNNAMED_NAMES = CAPTION_NAMES[3:]


def clip_seed(seed: int, index: int) -> int:
    """Seed of clip ``index`` of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _wander_track(rng: np.random.Generator, num_frames: int, fps: int, height: int, width: int,
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame sprite centres: wander inside, leave through an edge, stay away 1-4 s, re-enter; repeat."""
    half = size / 2
    away = half + 1.0  # centre this far beyond an edge puts every pixel of the sprite outside
    speed = rng.uniform(0.15, 0.35) * min(height, width) / fps  # pixels per frame
    lo_x, hi_x, lo_y, hi_y = half, width - half, half, height - half

    def inside_point() -> np.ndarray:
        return np.array([rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)])

    def outside_point() -> np.ndarray:
        edge = rng.integers(4)
        along_x, along_y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        return np.array([(-away, along_y), (width + away, along_y), (along_x, -away), (along_x, height + away)][edge])

    pieces: list[np.ndarray] = []
    count = 0

    def move(start: np.ndarray, end: np.ndarray) -> None:
        nonlocal count
        steps = max(1, math.ceil(np.linalg.norm(end - start) / speed))
        fractions = np.arange(1, steps + 1)[:, None] / steps
        pieces.append(start + (end - start) * fractions)
        count += steps

    def stay(point: np.ndarray, frames: int) -> None:
        nonlocal count
        pieces.append(np.repeat(point[None], frames, axis=0))
        count += frames

    position = inside_point()
    stay(position, 1)
    while count < num_frames:
        inside_until = count + int(rng.uniform(2.0, 5.0) * fps)
        while count < inside_until:
            target = inside_point()
            move(position, target)
            position = target
        exit_point = outside_point()
        move(position, exit_point)
        entry_point = outside_point()
        stay(entry_point, int(rng.uniform(1.0, 4.0) * fps))
        position = inside_point()
        move(entry_point, position)
    track = np.concatenate(pieces)[:num_frames]
    return track[:, 0], track[:, 1]


def sprite_masks(shape: str, size: float, x: np.ndarray, y: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean ``[T, height, width]``: pixels covered by a sprite at centres ``x, y`` (``[T]``), rules above."""
    half = size / 2
    dx = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - np.asarray(x, np.float32)[:, None, None]
    dy = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - np.asarray(y, np.float32)[:, None, None]
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    if shape == "triangle":
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown sprite shape {shape!r}; expected one of {SHAPES}")


def render_background(background: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width, 3]`` background of a clip spec (texture rules in the module docstring)."""
    color = np.asarray(background["color"], np.float64)
    texture_color = np.asarray(background["texture_color"], np.float64)
    texture, period = background["texture"], int(background["period"])
    if texture != "gradient" and texture != "flat" and (period < 2 or period % 2):
        raise ValueError(f"background period must be an even number >= 2, got {period}")
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    if texture == "flat":
        use_texture = np.zeros((height, width), bool)
    elif texture == "stripes":
        use_texture = np.broadcast_to((cols // (period // 2)) % 2 == 1, (height, width))
    elif texture == "checker":
        use_texture = (rows // (period // 2) + cols // (period // 2)) % 2 == 1
    elif texture == "gradient":
        weight = (rows / max(height - 1, 1))[..., None]  # [H, 1, 1]
        image = np.rint(color + (texture_color - color) * weight)
        return np.broadcast_to(image, (height, width, 3)).astype(np.uint8)
    else:
        raise ValueError(f"unknown background texture {texture!r}; expected one of {TEXTURES}")
    return np.where(use_texture[..., None], texture_color, color).astype(np.uint8)


def render_clip(spec: Mapping[str, Any]) -> np.ndarray:
    """uint8 frames ``[T, H, W, 3]`` of a clip spec (the ground-truth json); pure and deterministic."""
    num_frames, height, width = int(spec["num_frames"]), int(spec["height"]), int(spec["width"])
    background = render_background(spec["background"], height, width)
    frames = np.broadcast_to(background, (num_frames, height, width, 3)).copy()
    for sprite in sorted(spec["sprites"], key=lambda s: s["id"]):
        track = sprite["track"]
        x, y = np.asarray(track["x"], np.float64), np.asarray(track["y"], np.float64)
        if len(x) != num_frames or len(y) != num_frames:
            raise ValueError(f"sprite {sprite['id']}: track has {len(x)} positions for {num_frames} frames")
        mask = sprite_masks(sprite["shape"], sprite["size"], x, y, height, width)
        frames[mask] = np.asarray(sprite["color"], np.uint8)
    return frames


def _color_name(color: Any, palette: Mapping[str, tuple[int, int, int]]) -> str:
    for name, value in palette.items():
        if tuple(value) == tuple(color):
            return name
    return "rgb({}, {}, {})".format(*color)


def caption_for(spec: Mapping[str, Any], named: bool = True) -> str:
    """Caption of a clip. Named: every sprite and the background, e.g. 'a red circle and a blue square on a navy
    striped background'. Unnamed (``named=False``): only the sprite count and the texture, e.g. 'two shapes on a
    striped background', so what each sprite and the background look like is not in the text."""
    background = spec["background"]
    texture = _TEXTURE_WORDS[background["texture"]]
    if not named:
        count = len(spec["sprites"])
        return f"{_COUNT_WORDS.get(count, f'{count} shapes')} on a {texture} background"
    names = [_color_name(s["color"], SPRITE_COLORS) for s in spec["sprites"]]
    things = [f"{'an' if name[0] in 'aeiou' else 'a'} {name} {s['shape']}" for name, s in zip(names, spec["sprites"])]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return f"{listed} on a {_color_name(background['color'], BACKGROUND_COLORS)} {texture} background"


def caption_record(spec: Mapping[str, Any], named: bool = True) -> dict[str, Any]:
    """The json's ``caption``: the caption ``text``, the attributes it ``names`` (of :data:`CAPTION_NAMES`) and the
    ``named`` caption that names every attribute (the same text when ``named``)."""
    return {"text": caption_for(spec, named), "names": list(CAPTION_NAMES if named else _UNNAMED_NAMES),
            "named": caption_for(spec, True)}


def make_clip_spec(seed: int, height: int = 64, width: int = 64, fps: int = 16, min_seconds: float = 10.0,
                   max_seconds: float = 30.0, num_sprites: int | None = None) -> dict[str, Any]:
    """Ground-truth json of one clip (format of docs/interfaces.md), fully determined by its arguments."""
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    if height < 16 or width < 16:
        raise ValueError(f"frames must be at least 16x16 pixels, got {height}x{width}")
    if num_sprites is not None and not 1 <= num_sprites <= len(SHAPES):
        raise ValueError(f"num_sprites must be in 1..{len(SHAPES)}, got {num_sprites}")
    rng = np.random.default_rng(int(seed))
    num_frames = int(rng.integers(round(min_seconds * fps), round(max_seconds * fps) + 1))
    background_name = list(BACKGROUND_COLORS)[rng.integers(len(BACKGROUND_COLORS))]
    color = np.array(BACKGROUND_COLORS[background_name])
    texture_color = np.rint(color + 0.3 * (255 - color)).astype(int)
    background = {
        "color": [int(c) for c in color],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "texture_color": [int(c) for c in texture_color],
        "period": int(rng.choice([8, 12, 16])),
    }
    count = int(num_sprites if num_sprites is not None else rng.integers(1, 4))
    color_names = rng.choice(list(SPRITE_COLORS), size=count, replace=False)
    shapes = rng.choice(list(SHAPES), size=count, replace=False)
    scale = min(height, width) / 64
    sprites = []
    for index in range(count):
        size = int(round(rng.integers(12, 21) * scale))
        x, y = _wander_track(rng, num_frames, fps, height, width, size)
        x, y = np.round(x, 3), np.round(y, 3)  # what the json stores is what gets rendered
        visible = sprite_masks(str(shapes[index]), size, x, y, height, width).any(axis=(1, 2))
        sprites.append({
            "id": index,
            "shape": str(shapes[index]),
            "color": list(SPRITE_COLORS[str(color_names[index])]),
            "size": size,
            "track": {"x": x.tolist(), "y": y.tolist(), "visible": visible.tolist()},
        })
    return {"source": "synthetic", "fps": int(fps), "num_frames": num_frames, "height": int(height),
            "width": int(width), "seed": int(seed), "background": background, "sprites": sprites}


def caption_is_named(seed: int, unnamed_fraction: float) -> bool:
    """Whether the clip of seed ``seed`` gets the named caption (else the unnamed one, with probability
    ``unnamed_fraction``); drawn from its own stream, so the clip itself does not change."""
    return not float(np.random.default_rng([int(seed), 1]).random()) < unnamed_fraction


def _synthesize(job: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
    key, seed, options = job
    crf, unnamed_fraction = options.pop("crf"), options.pop("unnamed_fraction")
    spec = make_clip_spec(seed, **options)
    named = caption_is_named(seed, unnamed_fraction)
    frames = render_clip(spec)
    video = encode_mp4(frames, fps=spec["fps"], crf=18 if crf is None else crf, lossless=crf is None)
    return {"__key__": key, "mp4": video, "txt": caption_for(spec, named),
            "json": json.dumps({**spec, "caption": caption_record(spec, named)})}


def _parallel_map(function, jobs: list, num_workers: int) -> Iterator:
    if num_workers <= 1 or len(jobs) < 2:
        yield from map(function, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_workers) as pool:
        yield from pool.imap(function, jobs, chunksize=4)


def write_synthetic_shards(
    out_dir: str,
    num_clips: int = 256,
    seed: int = 0,
    splits: Mapping[str, int] | None = None,
    maxcount: int = 64,
    height: int = 64,
    width: int = 64,
    fps: int = 16,
    min_seconds: float = 10.0,
    max_seconds: float = 30.0,
    crf: int | None = None,
    unnamed_fraction: float = 0.0,
    num_workers: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Render ``num_clips`` clips into ``out_dir/<split>/shard-%06d.tar`` plus ``out_dir/<split>/prompts.txt``.

    ``splits`` maps split names to clip counts summing to ``num_clips``; default: 10 % (at least 1) for "val", the
    rest for "train". Clip i (counted over all splits in order) has seed ``clip_seed(seed, i)`` and key
    ``<split>-<i:06d>``. Videos are stored losslessly (``crf=None``; :func:`cf.video_io.encode_mp4` with
    ``lossless=True``) and tar members carry a fixed time, so the same arguments give byte-identical shards;
    ``crf`` stores lossy H.264 instead. A fraction ``unnamed_fraction`` of the clips (drawn per clip, see
    :func:`caption_is_named`) get the unnamed caption; the json keeps the full ground truth and its ``caption``
    record (:func:`caption_record`). Returns, per split, ``{"urls": brace URL, "prompts": path, "num_clips": n}``.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if not 0.0 <= unnamed_fraction <= 1.0:
        raise ValueError(f"unnamed_fraction must lie in [0, 1], got {unnamed_fraction}")
    if splits is None:
        num_val = max(1, round(0.1 * num_clips)) if num_clips > 1 else 0
        splits = {"train": num_clips - num_val, "val": num_val}
    splits = {name: int(n) for name, n in splits.items() if int(n) > 0}
    if sum(splits.values()) != num_clips:
        raise ValueError(f"split sizes {splits} sum to {sum(splits.values())}, not num_clips={num_clips}")
    from data.shards import ShardSink  # webdataset is only needed when writing

    num_workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
    options = dict(height=height, width=width, fps=fps, min_seconds=min_seconds, max_seconds=max_seconds, crf=crf,
                   unnamed_fraction=float(unnamed_fraction))
    jobs, index = [], 0
    for name, count in splits.items():
        for _ in range(count):
            jobs.append((name, (f"{name}-{index:06d}", clip_seed(seed, index), dict(options))))
            index += 1
    sinks, captions = {}, {name: [] for name in splits}
    start, total_frames = time.perf_counter(), 0
    try:
        for name in splits:
            sinks[name] = ShardSink(os.path.join(out_dir, name, "shard-%06d.tar"), maxcount=maxcount, mtime=0)
        samples = _parallel_map(_synthesize, [job for _, job in jobs], num_workers)
        for (name, _), sample in zip(jobs, tqdm(samples, total=len(jobs), desc="synthetic clips", unit="clip")):
            sinks[name].write(sample)
            captions[name].append(sample["txt"])
            total_frames += json.loads(sample["json"])["num_frames"]
    finally:
        for sink in sinks.values():
            sink.close()
    elapsed = time.perf_counter() - start
    result = {}
    for name in splits:
        prompts = os.path.join(out_dir, name, "prompts.txt")
        with open(prompts, "w", encoding="utf-8") as handle:
            handle.write("\n".join(captions[name]) + "\n")
        result[name] = {"urls": sinks[name].urls, "prompts": prompts, "num_clips": splits[name]}
    print(f"synthetic: {num_clips} clips, {total_frames / fps / 60:.1f} min of video at {width}x{height}, "
          f"{fps} fps, in {elapsed:.1f} s with {max(1, num_workers)} process(es) "
          f"({num_clips / max(elapsed, 1e-9):.1f} clips/s)")
    return result
