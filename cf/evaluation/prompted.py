"""Prompt fidelity of a video of the synthetic sprite world: does it show what its caption names?

Measured from pixels against the clip's ground-truth json (docs/interfaces.md), for the attributes its caption names
(``caption.names`` in the json; all of them when the json has no ``caption``):

- **background coverage** (background colour named): per frame, the fraction of pixels within ``tolerance`` (0–255
  RGB distance) of the segment between the background's ``color`` and ``texture_color``. That segment holds every
  texture's pixels (flat, stripes, checker, gradient rows) and their blurred mixtures, so a blurry autoencoder does
  not lower the score; the texture's period is never named and is not checked. Sprites cover the rest of a frame.
- **sprite presence** (sprite colours named): per frame and named sprite, the sprite's colour mass (Σ α over the
  pixels that unmix as background + α·(sprite colour − background), see
  :func:`cf.evaluation.ground_truth.colour_mass_map`; the background is taken as the best of a few points on the
  background's colour segment, so no temporal median is needed and a clip of a second works) inside the best
  square of twice the smallest sprite's side whose other pixels are mostly background (so scattered or blocky
  noise of that colour is no sprite), compared with ``min_area_fraction`` of the area of the smallest sprite the
  dataset draws of that shape. Sizes and positions are not named, so neither is checked; sprites that leave the
  frame lower the score, for the dataset's own clips too.

Compare a model with the dataset's own clips scored the same way (the ratio is the figure of merit).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cf.evaluation.ground_truth import (
    ColourMatching,
    _as_colour,
    _distance_to_segment,
    colour_mass_map,
    expected_sprite_area,
    frames_to_rgb255,
)

__all__ = ["measured_attributes", "background_coverage", "sprite_colour_mass", "prompt_fidelity"]

_CHUNK = 64


def measured_attributes(gt: Mapping[str, Any]) -> set[str]:
    """Which of ``"background_color"`` and ``"sprite_colors"`` a clip's caption names (``caption.names`` of the
    json, see `data.synthetic.CAPTION_NAMES`; both when the json records no caption)."""
    caption = gt.get("caption")
    names = caption.get("names") if isinstance(caption, Mapping) else None
    measured = {"background_color", "sprite_colors"}
    return measured if names is None else measured & set(names)


def _background_segment(background: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    base = _as_colour(background["color"], "background color")
    if background.get("texture", "flat") == "flat":
        return base, base
    return base, _as_colour(background.get("texture_color", background["color"]), "background texture_color")


def _background_mask(rgb: Tensor, base: Tensor, second: Tensor, tolerance: float) -> Tensor:
    """``[..., H, W]`` pixels of ``rgb`` ``[..., H, W, 3]`` within ``tolerance`` of the segment [base, second]."""
    return _distance_to_segment(rgb.reshape(-1, 3), base, second).reshape(rgb.shape[:-1]) <= tolerance


def background_coverage(frames: Tensor | np.ndarray, background: Mapping[str, Any],
                        tolerance: float = 30.0) -> Tensor:
    """``[T]`` fraction of each frame's pixels within ``tolerance`` of the background's colour segment.

    ``frames``: uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [0, 1]; ``background``: the json's background.
    """
    base, second = _background_segment(background)
    out = []
    for start in range(0, int(frames.shape[0]), _CHUNK):
        rgb = frames_to_rgb255(frames[start : start + _CHUNK])
        out.append(_background_mask(rgb, base, second, tolerance).float().mean(dim=(1, 2)))
    return torch.cat(out)


def _box_sum(values: Tensor, side: int) -> Tensor:
    """``[t, H, W]`` -> ``[t, H - side + 1, W - side + 1]`` sums over every side × side square (integral image)."""
    integral = F.pad(values.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
    return (integral[:, side:, side:] - integral[:, :-side, side:] - integral[:, side:, :-side]
            + integral[:, :-side, :-side]).float()


def sprite_colour_mass(frames: Tensor | np.ndarray, colour: Any, background: Mapping[str, Any], window: int,
                       tolerance: float = 30.0, num_background_points: int = 5,
                       matching: ColourMatching = ColourMatching()) -> Tensor:
    """``[T]`` per frame, the largest colour mass (pixels' worth) of ``colour`` inside a ``window`` × ``window``
    square whose other pixels are at least half background.

    Pixels are unmixed against the best of ``num_background_points`` evenly spaced points of the background's
    colour segment (one for a flat one); background pixels (within ``tolerance`` of the segment) carry no mass,
    since a texture colour can itself lie on the line from the base colour to a sprite colour (white). The square
    and its background condition keep scattered or blocky noise of that colour from counting as a sprite.
    """
    base, second = _background_segment(background)
    points = 1 if torch.equal(base, second) else max(2, int(num_background_points))
    candidates = torch.stack([base + (second - base) * i / max(points - 1, 1) for i in range(points)])
    target = _as_colour(colour, "sprite color")
    out = []
    for start in range(0, int(frames.shape[0]), _CHUNK):
        rgb = frames_to_rgb255(frames[start : start + _CHUNK])
        backdrop_pixels = _background_mask(rgb, base, second, tolerance)
        mass = torch.stack([colour_mass_map(rgb, target, b, matching) for b in candidates]).amax(dim=0)
        mass = torch.where(backdrop_pixels, torch.zeros_like(mass), mass)
        side = max(1, min(int(window), mass.shape[1], mass.shape[2]))
        in_square = _box_sum(mass, side)
        others = side * side - _box_sum(mass > 0, side)
        backdrop = _box_sum(backdrop_pixels, side)
        valid = backdrop >= 0.5 * others
        out.append(torch.where(valid, in_square, torch.zeros_like(in_square)).flatten(1).amax(dim=1))
    return torch.cat(out)


def prompt_fidelity(frames: Tensor | np.ndarray, gt: Mapping[str, Any], tolerance: float = 30.0,
                    min_area_fraction: float = 0.5, min_sprite_size: float | None = None,
                    window_factor: float = 2.0, matching: ColourMatching = ColourMatching()) -> dict[str, Any]:
    """Background coverage and named-sprite presence of ``frames`` (uint8 ``[T, H, W, 3]`` or float
    ``[T, 3, H, W]`` in [0, 1]) against a clip's ground truth ``gt``.

    A sprite is present in a frame when its colour mass inside some square of side ``window_factor`` ×
    ``min_sprite_size`` is at least ``min_area_fraction`` × the area of a sprite of its shape and size
    ``min_sprite_size`` (default: the dataset's smallest, 12 px at 64 px frames, scaled with the frame).
    Returns ``background_coverage`` (mean over frames; None when the background colour is not named),
    ``sprite_presence`` (mean over named sprites and frames; None when no sprite colour is named), the per-sprite
    presences and the per-frame curves.
    """
    if int(frames.shape[0]) == 0:
        raise ValueError("the video has no frames")
    names = measured_attributes(gt)
    height = frames.shape[1] if frames.shape[-1] == 3 else frames.shape[2]
    width = frames.shape[2] if frames.shape[-1] == 3 else frames.shape[3]
    scale = min(int(height), int(width)) / 64.0
    size = 12.0 * scale if min_sprite_size is None else float(min_sprite_size)
    result: dict[str, Any] = {"background_coverage": None, "background_coverage_curve": None,
                              "sprite_presence": None, "sprite_presence_curve": None, "sprites": []}
    if "background_color" in names:
        curve = background_coverage(frames, gt["background"], tolerance)
        result["background_coverage"] = float(curve.mean())
        result["background_coverage_curve"] = curve.tolist()
    if "sprite_colors" in names and gt.get("sprites"):
        present = []
        for sprite in gt["sprites"]:
            mass = sprite_colour_mass(frames, sprite["color"], gt["background"], round(window_factor * size),
                                      tolerance, matching=matching)
            needed = min_area_fraction * expected_sprite_area(sprite["shape"], size)
            present.append((mass >= needed).float())
            result["sprites"].append({"id": int(sprite["id"]), "color": list(sprite["color"]),
                                      "presence": float(present[-1].mean()), "mean_mass": float(mass.mean())})
        curve = torch.stack(present).mean(dim=0)
        result["sprite_presence"] = float(curve.mean())
        result["sprite_presence_curve"] = curve.tolist()
    return result
