"""Pixel-level ground-truth metrics on clips rendered from a ground-truth spec (docs/interfaces.md)."""

import math

import numpy as np
import pytest
import torch

from cf.evaluation.ground_truth import (
    colour_mass_map,
    estimate_background,
    expected_sprite_area,
    find_reentries,
    ground_truth_metrics,
    reference_free_metrics,
    unmix,
    visible_sprite_areas,
)

FPS = 16
NUM_FRAMES = 96
SIZE = 64


def render_background(spec, height, width):
    base = np.array(spec["color"], float)
    other = np.array(spec.get("texture_color", spec["color"]), float)
    period = spec.get("period", 8)
    yy, xx = np.mgrid[0:height, 0:width]
    mix = {"flat": np.zeros((height, width)),
           "stripes": ((xx % period) < period / 2).astype(float),
           "checker": (((xx // (period // 2)) + (yy // (period // 2))) % 2).astype(float),
           "gradient": xx / (width - 1)}[spec.get("texture", "flat")]
    return base * (1 - mix[..., None]) + other * mix[..., None]


def sprite_mask(shape, cx, cy, size, height, width):
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    dx, dy, r = xx - cx, yy - cy, size / 2
    return {"circle": dx**2 + dy**2 <= r**2, "square": (abs(dx) <= r) & (abs(dy) <= r),
            "diamond": abs(dx) + abs(dy) <= r, "triangle": (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2)}[shape]


def render_clip(spec, colour_at=None):
    """Test renderer: uint8 [T, H, W, 3]; ``colour_at(sprite_id, frame)`` overrides sprite colours."""
    height, width = spec["height"], spec["width"]
    background = render_background(spec["background"], height, width)
    frames = np.empty((spec["num_frames"], height, width, 3), np.uint8)
    for k in range(spec["num_frames"]):
        frame = background.copy()
        for sprite in spec["sprites"]:
            track = sprite["track"]
            if track["visible"][k]:
                colour = sprite["color"] if colour_at is None else colour_at(sprite["id"], k)
                frame[sprite_mask(sprite["shape"], track["x"][k], track["y"][k], sprite["size"], height,
                                  width)] = colour
        frames[k] = np.round(frame).astype(np.uint8)
    return frames


def leave_and_return(y, size, exit_at, back_at):
    """Moves right out of the frame, waits off-screen, re-enters from the left."""
    xs = []
    for k in range(NUM_FRAMES):
        if k < exit_at:
            x = 20 + k / exit_at * (SIZE + size - 20)
        elif k < back_at:
            x = SIZE + size
        else:
            x = -size / 2 + (k - back_at) * 1.5
        xs.append(float(x))
    visible = [bool(x + size / 2 > 0 and x - size / 2 < SIZE) for x in xs]
    return {"x": xs, "y": [float(y)] * NUM_FRAMES, "visible": visible}


def bouncing(y, size, speed):
    """Moves left and right between the edges, always fully visible."""
    low, high = size / 2, SIZE - size / 2
    span = high - low
    xs = []
    for k in range(NUM_FRAMES):
        phase = (k * speed) % (2 * span)
        xs.append(float(low + (phase if phase <= span else 2 * span - phase)))
    return {"x": xs, "y": [float(y)] * NUM_FRAMES, "visible": [True] * NUM_FRAMES}


def make_spec(texture="stripes"):
    return {
        "source": "synthetic", "fps": FPS, "num_frames": NUM_FRAMES, "height": SIZE, "width": SIZE, "seed": 0,
        "background": {"color": [40, 60, 90], "texture": texture, "texture_color": [70, 90, 120], "period": 8},
        "sprites": [
            {"id": 0, "shape": "circle", "color": [230, 40, 40], "size": 12, "track": leave_and_return(16, 12, 20, 50)},
            {"id": 1, "shape": "square", "color": [40, 220, 60], "size": 12, "track": leave_and_return(46, 12, 25, 55)},
        ],
    }


def pool_patches(frames, patch=8):
    """What the toy autoencoder does to detail: average 8x8 patches."""
    t, h, w, _ = frames.shape
    pooled = frames.reshape(t, h // patch, patch, w // patch, patch, 3).astype(float).mean((2, 4))
    return np.round(np.repeat(np.repeat(pooled, patch, 1), patch, 2)).astype(np.uint8)


def test_unmixing_recovers_mixture_fraction():
    base, texture = torch.tensor([40.0, 60.0, 90.0]), torch.tensor([70.0, 90.0, 120.0])
    target = torch.tensor([230.0, 40.0, 40.0])
    background = torch.stack([base, texture, texture, base])  # a per-pixel background [4, 3]
    pixels = torch.stack([0.25 * target + 0.75 * base, texture, target, torch.tensor([40.0, 220.0, 60.0])])
    alpha, residual = unmix(pixels, target, background)
    assert alpha[:3].tolist() == pytest.approx([0.25, 0.0, 1.0], abs=1e-4)
    assert residual[:3].max() < 1e-3 and residual[3] > 100
    mass = colour_mass_map(pixels, target, background)
    assert mass.tolist() == pytest.approx([0.25, 0.0, 1.0, 0.0], abs=1e-4)  # the green pixel is rejected


def test_reentry_events_from_tracks():
    events = find_reentries(make_spec(), window_s=0.5)
    assert [(e.sprite_id, e.exit_frame, e.reentry_frame) for e in events] == [(0, 18, 51), (1, 23, 56)]
    assert len(events[0].frames) == 8 and events[0].frames[0] > 51  # only fully visible frames count


@pytest.mark.parametrize("texture", ["flat", "stripes", "checker", "gradient"])
def test_recall_is_one_on_rendered_clip(texture):
    spec = make_spec(texture)
    result = ground_truth_metrics(render_clip(spec), spec, fps=FPS)
    assert result["identity_recall_anywhere"] == 1.0
    assert result["identity_recall_at_track"] == 1.0
    assert len(result["reentry_events"]) == 2 and not result["reentry_events_skipped"]
    assert result["background_spec_error"]["max"] < 3.0


def test_recall_survives_patch_pooling():
    spec = make_spec()
    result = ground_truth_metrics(pool_patches(render_clip(spec)), spec)
    assert result["identity_recall_anywhere"] == 1.0 and result["identity_recall_at_track"] == 1.0


def test_recall_drops_when_identities_are_swapped_after_reentry():
    spec = make_spec()
    colours = {s["id"]: s["color"] for s in spec["sprites"]}
    reentry = {0: 51, 1: 56}
    swapped = render_clip(spec, lambda i, k: colours[1 - i] if k >= reentry[i] else colours[i])
    result = ground_truth_metrics(swapped, spec)
    assert result["identity_recall_at_track"] == 0.0  # each sprite now wears the other's colour
    assert result["identity_recall_anywhere"] == 1.0  # both colours are still in the video
    recoloured = render_clip(spec, lambda i, k: [200, 200, 40] if k >= reentry[i] else colours[i])
    result = ground_truth_metrics(recoloured, spec)
    assert result["identity_recall_anywhere"] == 0.0 and result["identity_recall_at_track"] == 0.0


def test_background_drift_equals_planted_shift():
    spec = make_spec("flat")
    frames = render_clip(spec).astype(np.int16)
    shift = np.array([12, -16, 0])
    frames[48:] += shift
    result = ground_truth_metrics(np.clip(frames, 0, 255).astype(np.uint8), spec, timestamps=(1.0, 5.0))
    drift = result["background_colour_drift"]
    assert drift["windowed"][1.0] == pytest.approx(0.0, abs=0.5)
    assert drift["windowed"][5.0] == pytest.approx(20.0, abs=0.5)  # |(12, -16, 0)|
    assert result["background_spec_error"]["windowed"][5.0] == pytest.approx(20.0, abs=0.5)


def test_expected_area_and_input_errors():
    assert expected_sprite_area("circle", 12) == pytest.approx(math.pi * 36)
    assert expected_sprite_area("square", 12) == 144
    spec = make_spec()
    with pytest.raises(ValueError, match="fps"):
        ground_truth_metrics(render_clip(spec), spec, fps=24)
    with pytest.raises(ValueError, match="track"):
        broken = make_spec()
        broken["sprites"][0]["track"]["x"] = [0.0]
        ground_truth_metrics(render_clip(spec), broken)


@pytest.mark.parametrize("texture", ["stripes", "gradient"])
def test_background_image_is_the_temporal_median(texture):
    spec = make_spec(texture)
    expected = torch.from_numpy(np.round(render_background(spec["background"], SIZE, SIZE))).float()
    assert torch.equal(estimate_background(render_clip(spec)), expected)


@pytest.mark.parametrize("pooled", [False, True])
def test_reference_free_identity_presence_and_loss(pooled):
    spec = make_spec()
    for sprite in spec["sprites"]:  # both sprites bounce left and right, always in view
        sprite["track"] = bouncing(sprite["track"]["y"][0], sprite["size"], speed=3.0 + sprite["id"])
    frames = render_clip(spec, lambda i, k: spec["background"]["color"] if (i == 0 and k >= 48) else
                         spec["sprites"][i]["color"])
    frames = pool_patches(frames) if pooled else frames
    result = reference_free_metrics(frames, FPS, timestamps=(1.0, 2.0, 5.0))
    assert len(result["identity_colours"]) == 2
    presence = result["identity_presence"]["windowed"]
    assert presence[1.0] == 1.0
    assert presence[5.0] == 0.5  # sprite 0 vanished into the background at 3 s
    assert presence[2.0] is not None
    retained = result["identity_mass_retained"]["windowed"]
    assert retained[1.0] == pytest.approx(1.0, abs=0.05) and retained[5.0] == pytest.approx(0.5, abs=0.05)
    assert presence.get(10.0) is None


def test_reference_free_background_drift():
    spec = make_spec("flat")
    frames = render_clip(spec).astype(np.int16)
    frames[48:] += np.array([0, 0, 30])
    result = reference_free_metrics(np.clip(frames, 0, 255).astype(np.uint8), FPS, timestamps=(0.5, 5.0))
    assert result["background_colour_drift"]["windowed"][0.5] == pytest.approx(0.0, abs=0.5)
    assert result["background_colour_drift"]["windowed"][5.0] == pytest.approx(30.0, abs=1.0)


def test_recall_on_dataset_clips_sharp_and_pooled():
    synthetic = pytest.importorskip("data.synthetic")
    spec = synthetic.make_clip_spec(22, fps=8, min_seconds=8.0, max_seconds=8.0, num_sprites=2)  # has re-entries
    frames = synthetic.render_clip(spec)
    for video in (frames, pool_patches(frames)):
        result = ground_truth_metrics(video, spec)
        assert len(result["reentry_events"]) >= 1
        assert result["identity_recall_anywhere"] == 1.0 and result["identity_recall_at_track"] == 1.0


def test_visible_areas_match_the_dataset_renderer():
    synthetic = pytest.importorskip("data.synthetic")
    spec = synthetic.make_clip_spec(24, min_seconds=6.0, max_seconds=6.0, num_sprites=3)
    frames = synthetic.render_clip(spec)
    areas = visible_sprite_areas(spec)
    for column, sprite in enumerate(spec["sprites"]):
        counted = (frames == np.array(sprite["color"], np.uint8)).all(-1).sum(axis=(1, 2))
        assert np.array_equal(counted, areas[:, column].numpy().astype(int))
    assert (areas > 0).any()


def test_visible_areas_account_for_occlusion_by_later_sprites():
    spec = make_spec("flat")
    for sprite in spec["sprites"]:  # both squares at the same place: the later one hides the earlier one
        sprite["shape"] = "square"
        sprite["track"] = {"x": [32.0] * NUM_FRAMES, "y": [32.0] * NUM_FRAMES, "visible": [True] * NUM_FRAMES}
    areas = visible_sprite_areas(spec)
    assert areas[:, 0].eq(0).all() and areas[:, 1].eq(144).all()
