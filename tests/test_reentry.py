"""Re-entry consistency measured from pixels, against clips of the synthetic dataset whose tracks are known."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cf.evaluation.reentry import reentry_consistency
from data.synthetic import SPRITE_COLORS, make_clip_spec, render_background, render_clip, sprite_masks

# clips of 6-10 s with 1 or 2 sprites, all in view during the first second, each coming back once in full view
REENTRY_SEEDS = (3, 7, 8, 24, 32)


def clip_spec(seed: int) -> dict:
    return make_clip_spec(seed, min_seconds=6, max_seconds=10, num_sprites=1 + seed % 2)


def true_reentries(spec: dict) -> list[tuple[int, int, int]]:
    """(sprite id, first invisible frame, first visible frame again) from the spec's visible flags, for re-entries
    at least a second before the clip ends."""
    events = []
    for sprite in spec["sprites"]:
        visible = sprite["track"]["visible"]
        seen, gone = False, None
        for k, vis in enumerate(visible):
            if vis and gone is not None:
                if k <= spec["num_frames"] - spec["fps"]:
                    events.append((sprite["id"], gone, k))
                gone = None
            elif not vis and seen and gone is None:
                gone = k
            seen |= vis
    return events


def unused_colour(spec: dict) -> list[int]:
    """The dataset's sprite colour farthest from every colour the clip uses."""
    used = np.array([s["color"] for s in spec["sprites"]], float)
    return list(max(SPRITE_COLORS.values(), key=lambda c: np.linalg.norm(used - np.array(c), axis=1).min()))


def nearest_identity(result: dict, colour) -> int:
    colours = np.array(result["identity_colours"], float)
    return int(np.linalg.norm(colours - np.array(colour, float), axis=1).argmin())


@pytest.mark.parametrize("seed", REENTRY_SEEDS)
def test_dataset_clip_comes_back_in_its_colour(seed):
    spec = clip_spec(seed)
    result = reentry_consistency(render_clip(spec), spec["fps"])
    truth = true_reentries(spec)
    assert len(truth) >= 1
    assert len(result["identity_colours"]) == len(spec["sprites"])
    assert result["num_reentries"] == len(truth)
    fps = spec["fps"]
    for sprite_id, gone, back in truth:
        identity = nearest_identity(result, spec["sprites"][sprite_id]["color"])
        matches = [e for e in result["events"] if e["identity"] == identity]
        assert len(matches) == 1
        event = matches[0]
        # exit: when most of the sprite is out, up to a second before it is fully gone; re-entry: within a second
        assert gone - fps <= event["exit_frame"] <= gone
        assert back <= event["reentry_frame"] <= back + fps
        assert event["explained"] == pytest.approx(1.0, abs=0.02)
    assert result["explained_after_reentry"] == pytest.approx(1.0, abs=0.02)
    assert result["explained_before_exit"] == pytest.approx(1.0, abs=0.02)
    json.dumps(result, allow_nan=False)


def recolour_after_exit(spec: dict, sprite_id: int) -> np.ndarray:
    """The clip's frames with sprite ``sprite_id`` in a colour no sprite has, from its first exit on."""
    gone = next(g for s, g, _ in true_reentries(spec) if s == sprite_id)
    recoloured = copy.deepcopy(spec)
    recoloured["sprites"][sprite_id]["color"] = unused_colour(spec)
    frames = render_clip(spec)
    frames[gone:] = render_clip(recoloured)[gone:]
    return frames


@pytest.mark.parametrize("seed", (3, 8))
def test_sprite_that_comes_back_in_a_new_colour_scores_zero(seed):
    spec = clip_spec(seed)
    sprite_id = true_reentries(spec)[0][0]
    result = reentry_consistency(recolour_after_exit(spec, sprite_id), spec["fps"])
    assert result["num_reentries"] == reentry_consistency(render_clip(spec), spec["fps"])["num_reentries"] >= 1
    assert result["explained_after_reentry"] == pytest.approx(0.0, abs=0.02)
    assert result["explained_before_exit"] == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("same_size", (False, True))
@pytest.mark.parametrize("changed", (0, 1))
def test_two_sprites_away_together_one_comes_back_recoloured(changed, same_size):
    # both sprites are out at once; each comes back, one of them in a new colour: that one scores 0, the other 1,
    # whichever of them returns first, and also when their sizes cannot tell them apart
    spec = make_clip_spec(2, min_seconds=8, max_seconds=12)
    if same_size:
        first, second = spec["sprites"]
        second["shape"], second["size"] = first["shape"], first["size"]
        track = second["track"]
        track["visible"] = sprite_masks(second["shape"], second["size"], np.array(track["x"]), np.array(track["y"]),
                                        spec["height"], spec["width"]).any(axis=(1, 2)).tolist()
    truth = true_reentries(spec)
    assert len(spec["sprites"]) == 2 and sorted(s for s, _, _ in truth) == [0, 1]
    assert max(g for _, g, _ in truth) < min(b for _, _, b in truth)  # away together
    result = reentry_consistency(recolour_after_exit(spec, changed), spec["fps"])
    assert result["num_reentries"] == 2
    for sprite in spec["sprites"]:
        identity = nearest_identity(result, sprite["color"])
        (event,) = [e for e in result["events"] if e["identity"] == identity]
        if sprite["id"] == changed:
            assert event["explained"] == pytest.approx(0.0, abs=0.02)
        else:
            assert event["explained"] > 0.85  # a bit of the other, overlapping sprite counts against it


def keyframed_sprite(sprite_id: int, colour: str, keyframes: list[tuple[int, float, float]], num_frames: int) -> dict:
    """A 14-pixel square moving linearly between ``(frame, x, y)`` keyframes on a 64x64 frame."""
    frames, xs, ys = zip(*keyframes)
    x = np.interp(np.arange(num_frames), frames, xs)
    y = np.interp(np.arange(num_frames), frames, ys)
    visible = sprite_masks("square", 14, x, y, 64, 64).any(axis=(1, 2))
    return {"id": sprite_id, "shape": "square", "color": list(SPRITE_COLORS[colour]), "size": 14,
            "track": {"x": x.tolist(), "y": y.tolist(), "visible": visible.tolist()}}


def test_arrival_taken_by_the_wrong_identity_is_handed_over_when_its_colour_comes_back():
    # A leaves first, then B; B comes back in a new colour (the slot of A, which left first, takes it: both are the
    # same size); seconds later A comes back in its colour: the new-colour arrival was B's
    n = 180
    a = keyframed_sprite(0, "red", [(0, 20, 20), (16, 20, 20), (40, 90, 20), (130, 90, 20), (160, 40, 20)], n)
    b = keyframed_sprite(1, "blue", [(0, 40, 45), (18, 40, 45), (45, -30, 45), (70, -30, 45), (90, 20, 45)], n)
    spec = {"fps": 16, "num_frames": n, "height": 64, "width": 64, "sprites": [a, b],
            "background": {"color": [15, 15, 15], "texture": "flat", "texture_color": [87, 87, 87], "period": 8}}
    (_, gone_a, back_a), (_, gone_b, back_b) = true_reentries(spec)
    assert gone_a < gone_b < back_b < back_a - 2 * spec["fps"]
    result = reentry_consistency(recolour_after_exit(spec, 1), spec["fps"])
    assert result["num_reentries"] == 2
    by_identity = {e["identity"]: e for e in result["events"]}
    event_a = by_identity[nearest_identity(result, a["color"])]
    event_b = by_identity[nearest_identity(result, b["color"])]
    assert event_a["explained"] == pytest.approx(1.0, abs=0.02) and back_a <= event_a["reentry_frame"]
    assert event_b["explained"] == pytest.approx(0.0, abs=0.02) and back_b <= event_b["reentry_frame"] < back_a
    assert gone_b - spec["fps"] <= event_b["exit_frame"] <= gone_b


def test_big_and_small_sprite_both_back_in_new_colours_are_two_reentries():
    # the big sprite comes back first and reaches the small sprite's threshold first; the small one follows within
    # the big one's window: each is still one re-entry, both in a new colour
    spec = make_clip_spec(100, min_seconds=60, max_seconds=60)
    spec["num_frames"] = 200
    for sprite in spec["sprites"]:
        sprite["track"] = {key: values[:200] for key, values in sprite["track"].items()}
    truth = true_reentries(spec)
    assert [s for s, _, _ in truth] == [0, 1] and truth[1][2] - truth[0][2] < 2 * spec["fps"]
    assert spec["sprites"][0]["size"] > 1.5 * spec["sprites"][1]["size"]
    assert {tuple(s["color"]) for s in spec["sprites"]} == {SPRITE_COLORS["blue"], SPRITE_COLORS["red"]}
    frames = render_clip(spec)
    for sprite_id, gone, _ in truth:
        recoloured = copy.deepcopy(spec)
        recoloured["sprites"][sprite_id]["color"] = list(SPRITE_COLORS[("yellow", "green")[sprite_id]])
        changed = (render_clip(recoloured) != render_clip(spec)).any(axis=-1)
        changed[:gone] = False
        frames[changed] = render_clip(recoloured)[changed]
    # the big sprite moves slowly at first: a median over the whole clip, not 4 s, shows the background behind it
    result = reentry_consistency(frames, spec["fps"], background_s=spec["num_frames"] / spec["fps"])
    assert len(result["identity_colours"]) == 2
    assert result["num_reentries"] == 2
    assert all(e["explained"] == pytest.approx(0.0, abs=0.02) for e in result["events"])


def blur_like_patch_autoencoder(frames: np.ndarray) -> np.ndarray:
    """8x8 average pooling, bilinear upsampling back: sprites smeared over the background like a decoded latent."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="bilinear", align_corners=False)
    return x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("seed", (8, 24))
def test_blurred_clip_still_tells_same_colour_from_new_colour(seed):
    spec = clip_spec(seed)
    same = reentry_consistency(blur_like_patch_autoencoder(render_clip(spec)), spec["fps"])
    new = reentry_consistency(blur_like_patch_autoencoder(recolour_after_exit(spec, 0)), spec["fps"])
    assert same["num_reentries"] == new["num_reentries"] == len(true_reentries(spec)) == 1
    assert same["explained_after_reentry"] > 0.95 and new["explained_after_reentry"] < 0.05
    assert same["explained_before_exit"] > 0.95 and new["explained_before_exit"] > 0.95


def test_half_recoloured_sprite_scores_the_fraction_of_its_pixels_in_the_old_colour():
    spec = clip_spec(8)  # one sprite on a flat background: every foreground pixel is the sprite's
    (sprite,) = spec["sprites"]
    _, gone, _ = true_reentries(spec)[0]
    x, y = np.array(sprite["track"]["x"]), np.array(sprite["track"]["y"])
    masks = sprite_masks(sprite["shape"], sprite["size"], x, y, spec["height"], spec["width"])  # [T, H, W]
    right = (np.arange(spec["width"]) + 0.5)[None, None, :] > x[:, None, None]
    new_part = masks & right
    new_part[:gone] = False
    frames = render_clip(spec)
    frames[new_part] = unused_colour(spec)
    result = reentry_consistency(frames, spec["fps"], window_s=1.0)

    (event,) = result["events"]
    window = slice(event["reentry_frame"], event["reentry_frame"] + event["window_frames"])
    expected = 1 - new_part[window].sum() / masks[window].sum()
    assert 0.3 < expected < 0.7
    assert event["window_frames"] == spec["fps"]
    assert event["explained"] == pytest.approx(expected, abs=0.01)


def test_sprite_that_never_comes_back_gives_no_event():
    spec = clip_spec(8)
    _, gone, _ = true_reentries(spec)[0]
    track = spec["sprites"][0]["track"]
    for k in range(gone, spec["num_frames"]):
        track["x"][k], track["visible"][k] = -100.0, False
    result = reentry_consistency(render_clip(spec), spec["fps"])
    assert result["num_reentries"] == 0 and result["events"] == []
    assert result["explained_after_reentry"] is None
    assert result["num_exits"] == 1
    assert gone - spec["fps"] <= result["exits_without_reentry"][0]["exit_frame"] <= gone
    assert result["explained_before_exit"] == pytest.approx(1.0, abs=0.02)
    seconds_out = [v for v in result["explained_per_second"][gone // spec["fps"] + 1 :]]
    assert seconds_out and all(v is None for v in seconds_out)  # no foreground once the sprite is gone
    json.dumps(result, allow_nan=False)


def test_pure_background_has_no_identities():
    spec = clip_spec(24)
    background = render_background(spec["background"], spec["height"], spec["width"])
    frames = torch.from_numpy(np.broadcast_to(background, (48, *background.shape)).copy())
    result = reentry_consistency(frames, spec["fps"])
    assert result["identity_colours"] == [] and result["reference_mass"] == []
    assert result["num_exits"] == 0 and result["num_reentries"] == 0
    assert result["explained_before_exit"] is None and result["explained_after_reentry"] is None
    assert result["explained_per_second"] == [None, None, None]
    assert result["foreground_per_second"] == [0.0, 0.0, 0.0]
    json.dumps(result, allow_nan=False)


def test_torch_and_numpy_frames_agree_and_bad_arguments_are_named():
    spec = clip_spec(24)
    frames = render_clip(spec)
    assert reentry_consistency(torch.from_numpy(frames), spec["fps"]) == reentry_consistency(frames, spec["fps"])
    with pytest.raises(ValueError, match="fps"):
        reentry_consistency(frames, 0)
    with pytest.raises(ValueError, match="exit_fraction"):
        reentry_consistency(frames, spec["fps"], exit_fraction=0.6, reentry_fraction=0.5)
    with pytest.raises(ValueError, match="no frames"):
        reentry_consistency(frames[:0], spec["fps"])
