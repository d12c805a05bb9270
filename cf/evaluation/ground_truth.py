"""Pixel-level identity and background metrics for the synthetic sprite dataset (no learned features).

Colours are the identity signal. Frames may be blurry (the toy autoencoder pools 8×8 patches) and mp4-compressed,
so pure sprite colours may not survive. Instead every pixel is *unmixed* against a per-pixel background image B
(the per-pixel temporal median of the frames: the dataset's camera is static and its sprites keep moving):

    x ≈ B(p) + α·(c − B(p))        (least squares in α; residual = distance of x from that line)

α is the fraction of the target colour c in the pixel. Blurring and pooling are linear and the background is static,
so the **colour mass** Σα over the accepted pixels (α ≥ ``min_alpha``, residual ≤ ``max_residual``) estimates the
target's area in pixels whether the sprite is sharp or smeared over patches, on any texture.

With ground truth (the dataset's ``{key}.json``, see docs/interfaces.md):

- **Sprite identity recall after re-entry**: for every sprite that leaves the frame and comes back, take the first
  ``reentry_window_s`` seconds' worth of frames after its re-entry in which the ground truth shows at least
  ``min_visible_fraction`` of it (inside the frame and not covered by a later sprite; masks follow the dataset's
  rendering rules, see :func:`sprite_mask`). The sprite is *present* in a frame when its colour mass is at least
  ``min_area_fraction`` of its visible area there. The event is *recalled* when the sprite is present in at least
  ``recall_threshold`` of those frames. Two variants: ``anywhere`` (mass over the whole frame: is the identity still
  in the video?) and ``at_track`` (mass within ``size/2 + search_margin`` pixels of the ground-truth centre: is it
  where it should be?). Recall = recalled events / evaluated events. Shapes are not checked (colour only).
- **Background drift**: per frame, the mean colour and the contrast (mean per-channel standard deviation) of the
  background pixels (pixels not claimed by any sprite colour); drift is the distance of these statistics from the
  first frame's, and ``background_spec_error`` the distance of the mean colour from the specification's background
  (the segment between ``color`` and ``texture_color``, which holds every texture's mean, pooled or not).

Without ground truth (generated videos): the first ``background_s`` seconds give the background image; the first
``reference_s`` seconds give the identity colours (greedy: the most saturated remaining pixel seeds an identity;
every pixel explained as a mixture of its background and that colour joins it; identities close to the typical
background colour or smaller than ``min_area_fraction`` of the frame are dropped). Per frame, an identity is present
when its colour mass is at least ``presence_threshold`` of its mean mass over the reference. Curves: fraction of
identities present, mean retained mass (ratio clamped to [0, 1]), and background colour / contrast drift from the
reference. A sprite that legitimately leaves the frame lowers the presence curve too, so compare models on the same
prompts. A sprite that hardly moves during the background window becomes part of the background image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from cf.evaluation.metrics import DEFAULT_HALF_WIDTH, DEFAULT_MIN_COVERAGE, DEFAULT_TIMESTAMPS, windowed_mean

SHAPE_AREA_FACTOR = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5, "diamond": 0.5}
_FRAME_CHUNK = 32


@dataclass(frozen=True)
class ColourMatching:
    """Thresholds of the per-pixel unmixing (colours on the 0–255 scale)."""

    max_residual: float = 30.0  # a pixel farther than this from the background–target line is something else
    min_alpha: float = 0.15  # ignore faint fractions (compression noise would otherwise add up over the frame)
    max_alpha: float = 1.5  # clamp: a reference colour may itself be a mixture, so allow a bit above 1


def frames_to_rgb255(frames: Tensor | np.ndarray) -> Tensor:
    """uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [0, 1] -> float32 ``[T, H, W, 3]`` on the 0–255 scale."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dtype == torch.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must have shape [T, H, W, 3], got {tuple(frames.shape)}")
        return frames.float()
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"float frames must have shape [T, 3, H, W] in [0, 1], got {tuple(frames.shape)}")
    return frames.permute(0, 2, 3, 1).float().contiguous() * 255.0  # channels-last, contiguous: much faster below


def _as_colour(value: Any, what: str) -> Tensor:
    colour = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if colour.shape[0] != 3:
        raise ValueError(f"{what} must be an RGB triple, got {value!r}")
    return colour


def estimate_background(frames: Tensor | np.ndarray, max_frames: int = 256) -> Tensor:
    """Per-pixel temporal median ``[H, W, 3]`` (0–255) of up to ``max_frames`` evenly spaced frames."""
    num_frames = int(frames.shape[0])
    if num_frames == 0:
        raise ValueError("cannot estimate a background from zero frames")
    index = torch.linspace(0, num_frames - 1, min(num_frames, max_frames)).round().long().unique()
    return frames_to_rgb255(frames[index.numpy()] if isinstance(frames, np.ndarray) else frames[index]) \
        .median(dim=0).values


def unmix(pixels: Tensor, target: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Target fraction α and distance from the line B → target, per pixel.

    ``pixels`` ``[..., H, W, 3]``, ``background`` ``[H, W, 3]`` (or ``[3]``), ``target`` ``[3]``; 0–255 scale.
    Where the target equals the background (no line), α = 0 and the residual is infinite.
    """
    toward = target - background
    length2 = (toward * toward).sum(-1)
    offset = pixels - background
    alpha = (offset * toward).sum(-1) / length2.clamp(min=1e-6)
    residual = (offset - alpha[..., None] * toward).norm(dim=-1)
    degenerate = length2 < 1e-6
    alpha = torch.where(degenerate, torch.zeros_like(alpha), alpha)
    return alpha, torch.where(degenerate, torch.full_like(residual, float("inf")), residual)


def colour_mass_map(pixels: Tensor, target: Tensor, background: Tensor,
                    matching: ColourMatching = ColourMatching()) -> Tensor:
    """``[..., H, W, 3]`` pixels -> ``[..., H, W]`` accepted target fractions (0 where rejected)."""
    alpha, residual = unmix(pixels, target, background)
    toward = (target - background).norm(dim=-1)
    accepted = (alpha >= matching.min_alpha) & (residual <= matching.max_residual) & (toward > matching.max_residual)
    return torch.where(accepted, alpha.clamp(max=matching.max_alpha), torch.zeros_like(alpha))


def colour_separable(target: Tensor, background: Tensor, matching: ColourMatching = ColourMatching()) -> bool:
    """Whether ``target`` differs from the background by more than ``max_residual`` on most pixels."""
    distance = (target - background.reshape(-1, 3)).norm(dim=-1)
    return float(distance.median()) > matching.max_residual


def colours_confusable(a: Tensor, b: Tensor, background: Tensor, matching: ColourMatching = ColourMatching()) -> bool:
    """Whether a pure pixel of colour ``b`` would count as at least half of colour ``a`` (typical background)."""
    typical = background.reshape(-1, 3).median(dim=0).values
    alpha, residual = unmix(b, a, typical)
    return bool(alpha >= 0.5 and residual <= matching.max_residual)


@dataclass
class _FrameStatistics:
    mass: Tensor  # [T, K] colour mass per identity (whole frame)
    mass_near: Tensor | None  # [T, K] colour mass within the search disc (NaN where no centre)
    background_mean: Tensor  # [T, 3]
    background_contrast: Tensor  # [T]


def _frame_statistics(frames: Tensor | np.ndarray, identities: Tensor, background: Tensor,
                      matching: ColourMatching, centres: Tensor | None = None,
                      radii: Tensor | None = None) -> _FrameStatistics:
    """One pass over the frames in chunks. ``identities`` ``[K, 3]``; ``centres`` ``[T, K, 2]`` (x, y) or NaN."""
    num_frames = frames.shape[0]
    k = identities.shape[0]
    mass = torch.zeros(num_frames, k)
    mass_near = torch.full((num_frames, k), float("nan")) if centres is not None else None
    bg_mean = torch.full((num_frames, 3), float("nan"))
    bg_contrast = torch.full((num_frames,), float("nan"))
    height, width = background.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    for start in range(0, num_frames, _FRAME_CHUNK):
        chunk = frames_to_rgb255(frames[start : start + _FRAME_CHUNK])
        if chunk.shape[1:3] != (height, width):
            raise ValueError(f"frames are {tuple(chunk.shape[1:3])} but the background is {(height, width)}")
        t = chunk.shape[0]
        claimed = torch.zeros(t, height, width, dtype=torch.bool)
        for i in range(k):
            fractions = colour_mass_map(chunk, identities[i], background, matching)  # [t, H, W]
            claimed |= fractions > 0
            mass[start : start + t, i] = fractions.sum(dim=(1, 2))
            if centres is not None:
                c = centres[start : start + t, i]  # [t, 2]
                dist2 = (xs[None] - c[:, 0, None, None]) ** 2 + (ys[None] - c[:, 1, None, None]) ** 2
                near = (fractions * (dist2 <= float(radii[i]) ** 2)).sum(dim=(1, 2))
                mass_near[start : start + t, i] = torch.where(torch.isnan(c[:, 0]), float("nan"), near)
        weight = (~claimed).to(chunk.dtype)[..., None]  # [t, H, W, 1]
        count = weight.sum(dim=(1, 2))  # [t, 1]
        mean = (chunk * weight).sum(dim=(1, 2)) / count.clamp(min=1)
        variance = (((chunk - mean[:, None, None]) ** 2) * weight).sum(dim=(1, 2)) / (count - 1).clamp(min=1)
        enough = count[:, 0] >= 2
        bg_mean[start : start + t] = torch.where(enough[:, None], mean, float("nan"))
        bg_contrast[start : start + t] = torch.where(enough, variance.sqrt().mean(-1), float("nan"))
    return _FrameStatistics(mass, mass_near, bg_mean, bg_contrast)


def _distance_to_segment(points: Tensor, a: Tensor, b: Tensor | None) -> Tensor:
    """``[T, 3]`` -> ``[T]`` Euclidean distance to the segment [a, b] (to the point a when b is None)."""
    if b is None or float((b - a).norm()) == 0:
        return (points - a).norm(dim=-1)
    direction = b - a
    s = ((points - a) @ direction / (direction @ direction)).clamp(0, 1)
    return (points - a - s[:, None] * direction).norm(dim=-1)


def _curve_summaries(curves: Mapping[str, Tensor], fps: float, timestamps: Sequence[float], half_width: float,
                     min_coverage: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, curve in curves.items():
        valid = curve[~torch.isnan(curve)]
        out[name] = {
            "windowed": windowed_mean(curve.float(), fps, timestamps, half_width, min_coverage),
            "mean": float(valid.mean()) if valid.numel() else None,
            "max": float(valid.max()) if valid.numel() else None,
            "curve": [None if math.isnan(v) else v for v in curve.tolist()],
        }
    return out


def _validate_ground_truth(gt: Mapping[str, Any]) -> None:
    for key in ("fps", "num_frames", "height", "width", "background", "sprites"):
        if key not in gt:
            raise ValueError(f"ground-truth JSON lacks '{key}'; expected the synthetic dataset's format "
                             f"(docs/interfaces.md)")
    for sprite in gt["sprites"]:
        for key in ("id", "shape", "color", "size", "track"):
            if key not in sprite:
                raise ValueError(f"ground-truth sprite {sprite.get('id', '?')} lacks '{key}'")
        track = sprite["track"]
        for key in ("x", "y", "visible"):
            if len(track.get(key, ())) != gt["num_frames"]:
                raise ValueError(f"ground-truth sprite {sprite['id']}: track['{key}'] must have num_frames "
                                 f"({gt['num_frames']}) entries")


def sprite_mask(shape: str, size: float, x: Tensor | float, y: Tensor | float, height: int, width: int) -> Tensor:
    """Boolean ``[..., height, width]`` pixels covered by a sprite centred at (x, y) (scalars or ``[T]``), by the
    dataset's rendering rules: pixel (row r, column c) has its centre at (c + 0.5, r + 0.5); with d = offset from the
    centre and h = size / 2, circle |d| ≤ h, square max(|dx|, |dy|) ≤ h, diamond |dx| + |dy| ≤ h, triangle (apex up)
    −h ≤ dy ≤ h and |dx| ≤ (dy + h) / 2."""
    x = torch.as_tensor(x, dtype=torch.float32)[..., None, None]
    y = torch.as_tensor(y, dtype=torch.float32)[..., None, None]
    dx = (torch.arange(width, dtype=torch.float32) + 0.5)[None, :] - x
    dy = (torch.arange(height, dtype=torch.float32) + 0.5)[:, None] - y
    half = float(size) / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= half
    if shape == "triangle":
        return (dy >= -half) & (dy <= half) & (dx.abs() <= (dy + half) / 2)
    raise ValueError(f"unknown sprite shape {shape!r}; expected circle, square, triangle or diamond")


def visible_sprite_areas(gt: Mapping[str, Any]) -> Tensor:
    """``[T, K]`` pixels of each sprite inside the frame and not covered by a later sprite (drawn in id order)."""
    _validate_ground_truth(gt)
    height, width, num_frames = int(gt["height"]), int(gt["width"]), int(gt["num_frames"])
    areas = torch.zeros(num_frames, len(gt["sprites"]))
    topmost_first = sorted(range(len(gt["sprites"])), key=lambda i: -int(gt["sprites"][i]["id"]))
    for start in range(0, num_frames, _FRAME_CHUNK):
        stop = min(num_frames, start + _FRAME_CHUNK)
        covered = torch.zeros(stop - start, height, width, dtype=torch.bool)
        for i in topmost_first:
            sprite = gt["sprites"][i]
            track = sprite["track"]
            visible = torch.tensor([bool(v) for v in track["visible"][start:stop]])
            mask = sprite_mask(sprite["shape"], sprite["size"], torch.tensor(track["x"][start:stop]),
                               torch.tensor(track["y"][start:stop]), height, width) & visible[:, None, None]
            areas[start:stop, i] = (mask & ~covered).sum(dim=(1, 2)).float()
            covered |= mask
    return areas


def expected_sprite_area(shape: str, size: float) -> float:
    """Area in pixels of a fully visible sprite: ``factor(shape) × size²`` (unknown shapes count as ½)."""
    return SHAPE_AREA_FACTOR.get(shape, 0.5) * float(size) ** 2


@dataclass(frozen=True)
class ReentryEvent:
    """A sprite coming back into the frame; ``frames`` are the fully-visible frames evaluated after it."""

    sprite_id: int
    exit_frame: int  # first frame the sprite is invisible
    reentry_frame: int  # first frame it is visible again
    frames: tuple[int, ...]


def find_reentries(gt: Mapping[str, Any], window_s: float = 2.0, eligible: Tensor | None = None) -> list[ReentryEvent]:
    """Re-entry events of every sprite, each with its first ``window_s·fps`` eligible frames after re-entry (up to
    the next exit). ``eligible`` ``[T, K]`` (sprites in JSON order); default: the sprite is fully inside the frame."""
    _validate_ground_truth(gt)
    height, width, fps = gt["height"], gt["width"], float(gt["fps"])
    limit = max(1, round(window_s * fps))
    events = []
    for column, sprite in enumerate(gt["sprites"]):
        track = sprite["track"]
        visible = [bool(v) for v in track["visible"]]
        if eligible is None:
            half = float(sprite["size"]) / 2
            usable = [vis and half <= x <= width - half and half <= y <= height - half
                      for vis, x, y in zip(visible, track["x"], track["y"])]
        else:
            usable = [bool(v) for v in eligible[:, column].tolist()]
        seen, exit_frame = False, None
        for k, vis in enumerate(visible):
            if vis and not seen:
                seen = True
            elif not vis and seen and exit_frame is None:
                exit_frame = k
            elif vis and exit_frame is not None:
                frames = []
                for m in range(k, len(visible)):
                    if not visible[m] or len(frames) == limit:
                        break
                    if usable[m]:
                        frames.append(m)
                events.append(ReentryEvent(int(sprite["id"]), exit_frame, k, tuple(frames)))
                exit_frame = None
    return events


def ground_truth_metrics(frames: Tensor | np.ndarray, gt: Mapping[str, Any], fps: float | None = None,
                         timestamps: Sequence[float] = DEFAULT_TIMESTAMPS,
                         reentry_window_s: float = 2.0, min_area_fraction: float = 0.5,
                         min_visible_fraction: float = 0.75, recall_threshold: float = 0.5,
                         search_margin: float = 8.0,
                         matching: ColourMatching = ColourMatching(), half_width: float = DEFAULT_HALF_WIDTH,
                         min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict[str, Any]:
    """Identity recall after re-entry and background drift of generated ``frames`` against a clip's ground truth.

    ``frames``: uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [0, 1], frame k at time k / fps. Frames beyond
    the ground truth's ``num_frames`` are ignored; positions and sizes are scaled if the frame size differs from the
    spec's. The background image is the per-pixel median over the evaluated frames.
    """
    _validate_ground_truth(gt)
    gt_fps = float(gt["fps"])
    if fps is not None and abs(float(fps) - gt_fps) > 1e-6:
        raise ValueError(f"video fps {fps} differs from the ground truth's fps {gt_fps}; "
                         "evaluate videos at the dataset's frame rate")
    num_frames = min(int(frames.shape[0]), int(gt["num_frames"]))
    if num_frames == 0:
        raise ValueError("the video has no frames")
    frames = frames[:num_frames]
    background = estimate_background(frames)
    height, width = background.shape[:2]
    sx, sy = width / float(gt["width"]), height / float(gt["height"])
    sprites = list(gt["sprites"])
    colours = torch.stack([_as_colour(s["color"], f"sprite {s['id']} color") for s in sprites]) if sprites \
        else torch.zeros(0, 3)
    separable = [colour_separable(c, background, matching) for c in colours]
    usable = [i for i, ok in enumerate(separable) if ok]
    centres = torch.full((num_frames, len(usable), 2), float("nan"))
    radii = torch.zeros(len(usable))
    for col, i in enumerate(usable):
        track = sprites[i]["track"]
        visible = torch.tensor([bool(v) for v in track["visible"][:num_frames]])
        xs = torch.tensor(track["x"][:num_frames], dtype=torch.float32) * sx
        ys = torch.tensor(track["y"][:num_frames], dtype=torch.float32) * sy
        centres[:, col, 0] = torch.where(visible, xs, float("nan"))
        centres[:, col, 1] = torch.where(visible, ys, float("nan"))
        radii[col] = float(sprites[i]["size"]) * max(sx, sy) / 2 + search_margin
    stats = _frame_statistics(frames, colours[usable], background, matching, centres, radii)

    visible_area = visible_sprite_areas(gt)  # [T_gt, K] at the spec's resolution
    full_area = torch.tensor([expected_sprite_area(s["shape"], s["size"]) for s in sprites])
    eligible = visible_area >= min_visible_fraction * full_area
    by_id = {int(s["id"]): i for i, s in enumerate(sprites)}
    event_rows, skipped = [], []
    for event in find_reentries(gt, reentry_window_s, eligible):
        i = by_id[event.sprite_id]
        row: dict[str, Any] = {"sprite_id": event.sprite_id, "exit_frame": event.exit_frame,
                               "reentry_frame": event.reentry_frame}
        frames_in_video = [m for m in event.frames if m < num_frames]
        if not separable[i]:
            skipped.append({**row, "reason": "sprite colour is too close to the background"})
            continue
        if not frames_in_video:
            skipped.append({**row, "reason": "no frame after re-entry (inside the video) shows at least "
                                             f"{min_visible_fraction:.0%} of the sprite"})
            continue
        col = usable.index(i)
        idx = torch.tensor(frames_in_video)
        needed = min_area_fraction * visible_area[idx, i] * sx * sy  # [n]
        presence_anywhere = float((stats.mass[idx, col] >= needed).float().mean())
        presence_at_track = float((stats.mass_near[idx, col] >= needed).float().mean())
        shared = any(j != i and colours_confusable(colours[i], colours[j], background, matching)
                     for j in range(len(sprites)))
        event_rows.append({**row, "frames_evaluated": len(frames_in_video),
                           "mean_visible_area": float(visible_area[idx, i].mean()) * sx * sy,
                           "presence_anywhere": presence_anywhere, "presence_at_track": presence_at_track,
                           "recalled_anywhere": presence_anywhere >= recall_threshold,
                           "recalled_at_track": presence_at_track >= recall_threshold,
                           "colour_shared_with_another_sprite": shared})

    def recall(key: str) -> float | None:
        return sum(r[key] for r in event_rows) / len(event_rows) if event_rows else None

    spec_background = gt["background"]
    spec_base = _as_colour(spec_background["color"], "background color")
    spec_second = None if spec_background.get("texture", "flat") == "flat" else \
        _as_colour(spec_background.get("texture_color", spec_background["color"]), "background texture_color")
    curves = {
        "background_colour_drift": (stats.background_mean - stats.background_mean[0]).norm(dim=-1),
        "background_contrast_drift": (stats.background_contrast - stats.background_contrast[0]).abs(),
        "background_spec_error": _distance_to_segment(stats.background_mean, spec_base, spec_second),
    }
    return {
        "identity_recall_anywhere": recall("recalled_anywhere"),
        "identity_recall_at_track": recall("recalled_at_track"),
        "reentry_events": event_rows,
        "reentry_events_skipped": skipped,
        **_curve_summaries(curves, gt_fps, timestamps, half_width, min_coverage),
    }


def _is_two_colour_mixture(colour: Tensor, a: Tensor, b: Tensor, background: Tensor, max_residual: float) -> bool:
    """Whether ``colour`` ≈ B + s·(a − B) + t·(b − B) with s, t ≥ 0 and s + t ≤ 1 (B: the typical background)."""
    basis = torch.stack([a - background, b - background], dim=1)  # [3, 2]
    coeffs = torch.linalg.lstsq(basis, (colour - background)[:, None]).solution[:, 0]
    residual = float((basis @ coeffs - (colour - background)).norm())
    return bool((coeffs >= -0.05).all() and coeffs.sum() <= 1.05 and residual <= max_residual)


def _candidate_scores(pixels: Tensor, pixel_bg: Tensor, candidates: Tensor, remaining: Tensor,
                      matching: ColourMatching, batch: int = 16) -> Tensor:
    """Σ α·|c − B| over the remaining pixels each candidate colour explains, for all candidates ``[C]``."""
    scores = []
    offset = pixels - pixel_bg  # [N, 3]
    for chunk in candidates.split(batch):
        toward = chunk[:, None, :] - pixel_bg[None]  # [c, N, 3]
        length2 = (toward * toward).sum(-1)
        alpha = (offset[None] * toward).sum(-1) / length2.clamp(min=1e-6)
        residual = (offset[None] - alpha[..., None] * toward).norm(dim=-1)
        accepted = remaining[None] & (length2 >= 1e-6) & (alpha >= matching.min_alpha) & \
            (residual <= matching.max_residual)
        scores.append(torch.where(accepted, alpha * length2.sqrt(), torch.zeros_like(alpha)).sum(-1))
    return torch.cat(scores) if scores else torch.zeros(0)


def identity_colours(frames: Tensor | np.ndarray, background: Tensor, min_contrast: float = 40.0,
                     max_identities: int = 8, min_area_fraction: float = 0.005,
                     matching: ColourMatching = ColourMatching(), max_candidates: int = 64) -> Tensor:
    """Identity colours ``[K, 3]`` in reference frames, the strongest first.

    Candidate colours are the off-background pixels (at least ``min_contrast`` from their background), merged in
    16-level colour bins. Greedily, the candidate whose background–colour line explains the most off-background
    signal (Σ α·|c − B| over accepted pixels: the same for a pure colour and its blurred mixtures with the background,
    small for two sprites blurred into one patch) becomes an identity; its colour is the mean of its 10 % most
    saturated members; its pixels are removed. Colours that are background colours (within ``max_residual`` of 2 %
    of the background image), or mixtures of the background and two stronger identities (two sprites blurred into
    one patch), or confusable with a stronger identity are not kept; the search stops when an identity's mean colour
    mass per reference frame is below ``min_area_fraction`` of the frame.
    """
    rgb = frames_to_rgb255(frames)
    min_area = min_area_fraction * rgb.shape[1] * rgb.shape[2]
    background_pixels = background.reshape(-1, 3)
    typical = background_pixels.median(dim=0).values
    contrast = (rgb - background).norm(dim=-1)
    off = contrast >= min_contrast
    pixels, pixel_bg, pixel_contrast = rgb[off], background.expand_as(rgb)[off], contrast[off]  # [N, 3], [N]
    bins = (pixels // 16).long()
    keys, inverse = torch.unique(bins[:, 0] * 256 + bins[:, 1] * 16 + bins[:, 2], return_inverse=True)
    counts = torch.bincount(inverse, minlength=keys.shape[0]).float()
    candidates = torch.zeros(keys.shape[0], 3).index_add_(0, inverse, pixels) / counts[:, None]
    candidates = candidates[counts.argsort(descending=True)[:max_candidates]]
    near_background = torch.stack([((background_pixels - c).norm(dim=-1) <= matching.max_residual).float().mean()
                                   for c in candidates]) if candidates.shape[0] else torch.zeros(0)
    candidates = candidates[near_background < 0.02]
    remaining = torch.ones(pixels.shape[0], dtype=torch.bool)
    found: list[Tensor] = []
    while remaining.any() and candidates.shape[0] and len(found) < max_identities:
        scores = _candidate_scores(pixels, pixel_bg, candidates, remaining, matching)
        best = candidates[int(scores.argmax())]
        alpha, residual = unmix(pixels, best, pixel_bg)
        members = remaining & (alpha >= matching.min_alpha) & (residual <= matching.max_residual)
        if not members.any():
            break
        member_contrast = pixel_contrast[members]
        purest = member_contrast >= torch.quantile(member_contrast, 0.9)
        colour = pixels[members][purest].mean(0)
        remaining &= ~members
        mass = float(colour_mass_map(rgb, colour, background, matching).sum(dim=(1, 2)).mean())
        if mass < min_area:
            break
        is_background = ((background_pixels - colour).norm(dim=-1) <= matching.max_residual).float().mean() >= 0.02
        is_mixture = any(_is_two_colour_mixture(colour, a, b, typical, matching.max_residual)
                         for i, a in enumerate(found) for b in found[i + 1 :])
        if not (is_background or is_mixture or
                any(colours_confusable(colour, other, background, matching) for other in found)):
            found.append(colour)
        keep = torch.tensor([not colours_confusable(c, colour, background, matching) for c in candidates],
                            dtype=torch.bool)
        candidates = candidates[keep]
    return torch.stack(found) if found else torch.zeros(0, 3)


def reference_identities(frames: Tensor | np.ndarray, fps: float, reference_s: float, background_s: float,
                         min_contrast: float = 40.0,
                         matching: ColourMatching = ColourMatching()) -> tuple[int, int, Tensor, Tensor]:
    """What a video starts with: ``(num_reference, num_background, background [H, W, 3], identities [K, 3])`` —
    the frames of its first ``reference_s`` and ``background_s`` seconds, the per-pixel median background of the
    latter (`estimate_background`) and the sprite colours of the former (`identity_colours`)."""
    num_frames = int(frames.shape[0])
    if num_frames == 0:
        raise ValueError("the video has no frames")
    num_reference = max(1, min(num_frames, round(reference_s * fps)))
    num_background = max(num_reference, min(num_frames, round(background_s * fps)))
    background = estimate_background(frames[:num_background])
    colours = identity_colours(frames[:num_reference], background, min_contrast=min_contrast, matching=matching)
    return num_reference, num_background, background, colours


def reference_free_metrics(frames: Tensor | np.ndarray, fps: float, reference_s: float = 1.0,
                           background_s: float = 4.0, timestamps: Sequence[float] = DEFAULT_TIMESTAMPS,
                           presence_threshold: float = 0.5, min_contrast: float = 40.0,
                           matching: ColourMatching = ColourMatching(), half_width: float = DEFAULT_HALF_WIDTH,
                           min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict[str, Any]:
    """Identity retention and background drift of a video against its own first ``reference_s`` seconds
    (background image from the first ``background_s`` seconds)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    num_frames = int(frames.shape[0])
    num_reference, num_background, background, colours = reference_identities(frames, fps, reference_s,
                                                                              background_s, min_contrast, matching)
    stats = _frame_statistics(frames, colours, background, matching)
    reference_mass = stats.mass[:num_reference].mean(0)  # [K]
    ratio = stats.mass / reference_mass.clamp(min=1e-6)  # [T, K]
    if colours.shape[0]:
        presence = (ratio >= presence_threshold).float().mean(1)
        retained = ratio.clamp(0, 1).mean(1)
    else:
        presence = retained = torch.full((num_frames,), float("nan"))
    ref_mean = stats.background_mean[:num_reference].nanmean(0)
    ref_contrast = stats.background_contrast[:num_reference].nanmean()
    curves = {
        "identity_presence": presence,
        "identity_mass_retained": retained,
        "background_colour_drift": (stats.background_mean - ref_mean).norm(dim=-1),
        "background_contrast_drift": (stats.background_contrast - ref_contrast).abs(),
    }
    return {
        "reference_frames": num_reference,
        "background_frames": num_background,
        "identity_colours": colours.round().tolist(),
        **_curve_summaries(curves, fps, timestamps, half_width, min_coverage),
    }
