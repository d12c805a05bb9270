"""cf.evaluation.prompted (does a video show what its caption names?) and cf.evaluation.frame_strip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cf.encoders import ToyAutoencoder
from cf.evaluation.frame_strip import frame_strip, save_png, strip_frame_indices
from cf.evaluation.prompted import background_coverage, measured_attributes, prompt_fidelity
from data.synthetic import caption_record, make_clip_spec, render_clip, sprite_masks


def far_from_background(spec: dict, tolerance: float = 30.0) -> bool:
    """Every sprite colour lies farther than ``tolerance`` from the background's colour segment (naive check)."""
    a, b = np.array(spec["background"]["color"], float), np.array(spec["background"]["texture_color"], float)
    for sprite in spec["sprites"]:
        c = np.array(sprite["color"], float)
        s = np.clip(np.dot(c - a, b - a) / np.dot(b - a, b - a), 0, 1)
        if np.linalg.norm(c - a - s * (b - a)) <= tolerance:
            return False
    return True


def autoencoded(frames: np.ndarray) -> np.ndarray:
    ae = ToyAutoencoder(latent_channels=4, spatial_factor=8)
    video = torch.from_numpy(frames[: 1 + 4 * ((len(frames) - 1) // 4)]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    pixels = ae.decode(ae.encode(video))[0].permute(1, 2, 3, 0)
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def test_background_coverage_is_the_pixels_no_sprite_covers() -> None:
    checked = 0
    for seed in range(12):
        spec = make_clip_spec(seed, min_seconds=1, max_seconds=1)
        if not far_from_background(spec):
            continue
        frames = render_clip(spec)
        covered = np.zeros(frames.shape[:3], bool)
        for sprite in spec["sprites"]:
            covered |= sprite_masks(sprite["shape"], sprite["size"], sprite["track"]["x"], sprite["track"]["y"],
                                    spec["height"], spec["width"])
        expected = 1 - covered.mean(axis=(1, 2))
        np.testing.assert_allclose(background_coverage(frames, spec["background"]).numpy(), expected, atol=1e-6)
        checked += 1
    assert checked >= 6


def test_sprite_presence_follows_visibility_and_survives_8x8_pooling() -> None:
    spec = make_clip_spec(3)
    spec["sprites"] = spec["sprites"][:1]
    sprite = spec["sprites"][0]
    frames = render_clip(spec)
    visible = np.array(sprite["track"]["visible"])
    size, height = sprite["size"], spec["height"]
    inside = np.array([size / 2 <= x <= height - size / 2 and size / 2 <= y <= height - size / 2
                       for x, y in zip(sprite["track"]["x"], sprite["track"]["y"])])
    assert inside.any() and (~visible).any()
    for video in (frames, autoencoded(frames)):
        result = prompt_fidelity(video, spec)
        present = np.array(result["sprite_presence_curve"][: len(video)]) > 0
        assert present[inside[: len(video)]].mean() >= 0.95  # whole sprite in the frame: found
        assert not present[~visible[: len(video)]].any()  # out of the frame: never found
        assert result["sprites"][0]["presence"] == pytest.approx(result["sprite_presence"])


def test_noise_and_empty_backgrounds_show_no_sprite() -> None:
    spec = make_clip_spec(1, min_seconds=1, max_seconds=1)
    frames = render_clip(spec)
    g = torch.Generator().manual_seed(0)
    ae = ToyAutoencoder(latent_channels=4, spatial_factor=8)
    blocky = ae.decode(torch.randn(1, 4, 5, 8, 8, generator=g))[0].permute(1, 2, 3, 0)  # 8x8 blocks of any colour
    blocky = ((blocky + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pixel_noise = torch.randint(0, 256, (17, 64, 64, 3), generator=g, dtype=torch.uint8)
    background_only = render_clip(dict(spec, sprites=[]))
    for video in (blocky, pixel_noise, background_only):
        assert prompt_fidelity(video, spec)["sprite_presence"] == 0.0
    assert prompt_fidelity(background_only, spec)["background_coverage"] == 1.0
    assert prompt_fidelity(pixel_noise, spec)["background_coverage"] < 0.1
    assert prompt_fidelity(frames, spec)["sprite_presence"] > 0.5


def test_only_named_attributes_are_measured() -> None:
    spec = make_clip_spec(2, min_seconds=1, max_seconds=1)
    frames = render_clip(spec)
    assert measured_attributes(spec) == {"background_color", "sprite_colors"}  # no caption record: all named
    unnamed = copy.deepcopy(spec)
    unnamed["caption"] = caption_record(spec, named=False)
    assert measured_attributes(unnamed) == set()
    result = prompt_fidelity(frames, unnamed)
    assert result["background_coverage"] is None and result["sprite_presence"] is None
    named = dict(spec, caption=caption_record(spec))
    assert prompt_fidelity(frames, named)["background_coverage"] == prompt_fidelity(frames, spec)["background_coverage"]
    with pytest.raises(ValueError, match="no frames"):
        prompt_fidelity(frames[:0], spec)


def test_frame_strip_places_evenly_spaced_frames(tmp_path) -> None:
    assert strip_frame_indices(21, 6) == [0, 4, 8, 12, 16, 20]
    assert strip_frame_indices(3, 6) == [0, 1, 2]
    a = np.stack([np.full((4, 5, 3), i, np.uint8) for i in range(21)])  # frame i is flat value i
    b = np.full((9, 4, 5, 3), 200, np.uint8)
    image = frame_strip([[a, b], [a]], columns=3, gap=1, group_gap=2, scale=1)
    # row 0: frames 0, 10, 20 of a (1 px gaps), 2 px, then frames 0, 4, 8 of b
    assert image.shape == (4 + 1 + 4, 3 * 5 + 2 + 2 + 3 * 5 + 2, 3)
    assert [int(image[0, x, 0]) for x in (0, 6, 12, 19, 25, 31)] == [0, 10, 20, 200, 200, 200]
    assert (image[4] == 255).all() and (image[5:, 17:] == 255).all()  # row gap; short row padded white
    assert frame_strip([[a]], columns=2, scale=3).shape == (12, 3 * (2 * 5 + 2), 3)
    path = save_png(image, tmp_path / "strips" / "s.png")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), image)
    with pytest.raises(ValueError, match="uint8"):
        frame_strip([[a.astype(np.float32)]])
