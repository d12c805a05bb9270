"""Continuation from given frames: `stream(init_latents=...)` commits them to the memory and never regenerates them;
`cf generate --init-video / --init-image` starts the video with them exactly."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from cf.cli import main
from cf.encoders import ToyAutoencoder
from cf.init_frames import chunk_pixel_frames, encode_init_frames, read_init_frames
from cf.memory import MemoryConfig, SlowFastMemory
from cf.models.kv_cache import GrowingKVCache
from cf.models.wan import CausalWanDiT, WanConfig
from cf.prompt_schedule import latent_frames_for
from cf.rollout import SamplingConfig, draw_noise, stream
from cf.video_io import Mp4Writer, decode_mp4

SIZE = (4, 4)
SAMPLING = SamplingConfig(denoising_steps=(1000, 500))


def tiny_model() -> CausalWanDiT:
    torch.manual_seed(0)
    return CausalWanDiT(replace(WanConfig.tiny(), num_layers=3), frames_per_chunk=3).eval()


def prompt(model: CausalWanDiT, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.config.text_len, model.config.text_dim, generator=torch.Generator().manual_seed(1))


def flat_clip(num_frames: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """uint8 [T, size, size, 3]: one random colour per 8x8 patch, held over each latent's frames (frame 0 alone, then
    groups of 4): what the toy autoencoder reproduces exactly."""
    rng = np.random.default_rng(seed)
    latents = (num_frames - 1) // 4 + 1
    colours = rng.integers(0, 256, (latents, size // 8, size // 8, 3), dtype=np.uint8)
    per_frame = np.concatenate([colours[:1], np.repeat(colours[1:], 4, axis=0)])[:num_frames]
    return per_frame.repeat(8, axis=1).repeat(8, axis=2)


# ---------------------------------------------------------------------------------------------------------- stream
def test_given_latents_come_out_as_they_are_and_their_commit_kv_fill_the_sink():
    model = tiny_model()
    text = prompt(model)
    given = torch.randn(1, 4, 6, *SIZE, generator=torch.Generator().manual_seed(2))
    memory = SlowFastMemory(MemoryConfig(), model.config.num_layers)
    chunks = list(stream(model, text, 36, SIZE, memory=memory, sampling=SAMPLING, init_latents=given))
    video = torch.cat(chunks, dim=2)
    assert video.shape == (2, 4, 36, *SIZE)
    assert torch.equal(video[:, :, :6], given.expand(2, -1, -1, -1, -1))
    assert not torch.equal(video[0, :, 6:], video[1, :, 6:])  # each sample continues with its own noise stream
    # the sink holds frames 0-2 with the K/V of a clean commit pass on the given chunk, seeing nothing else
    assert memory.slot_frames()[:3] == [0, 1, 2]
    reference = GrowingKVCache(model.config.num_layers)
    model.forward_chunk(given[:, :, :3].expand(2, -1, -1, -1, -1), torch.zeros(2), model.text_kv(text), reference, 0,
                        commit=True)
    for layer, state in enumerate(memory.layers):
        torch.testing.assert_close(state.keys[:, :3].flatten(1, 2), reference.keys[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.values[:, :3].flatten(1, 2), reference.values[layer], rtol=1e-5, atol=1e-6)


def test_continuing_a_videos_own_first_chunks_reproduces_the_rest_of_it():
    """Given the first two chunks of a generated video and the random stream it had after them, the continuation
    is the video itself, bit for bit: given chunks go into the memory exactly as generated ones do."""
    model = tiny_model()
    text = prompt(model)
    original = torch.cat(list(stream(model, text, 24, SIZE, sampling=SAMPLING, seed=5)), dim=2)
    g = torch.Generator().manual_seed(5)
    for _ in range(2 * len(SAMPLING.denoising_steps)):  # the noise the two chunks drew: start + re-noise per step
        draw_noise((2, 4, 3, *SIZE), g, "cpu", torch.float32)
    continued = torch.cat(list(stream(model, text, 24, SIZE, sampling=SAMPLING, generator=g,
                                      init_latents=original[:, :, :6])), dim=2)
    assert torch.equal(continued, original)


@pytest.mark.parametrize("frames, message", [
    (5, r"init_latents hold 5 frames: give a positive multiple of frames_per_chunk \(3\) of at most num_frames"),
    (27, r"init_latents hold 27 frames"),
])
def test_given_latents_must_be_whole_chunks_of_the_video(frames, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        list(stream(model, prompt(model), 24, SIZE, sampling=SAMPLING, init_latents=torch.zeros(1, 4, frames, *SIZE)))
    with pytest.raises(ValueError, match=r"init_latents must be \[1 or 2, 4, F, 4, 4\], got \(1, 4, 3, 8, 8\)"):
        list(stream(model, prompt(model), 24, SIZE, sampling=SAMPLING, init_latents=torch.zeros(1, 4, 3, 8, 8)))


# ------------------------------------------------------------------------------------------------- frames and CLI
def test_whole_chunk_frame_counts():
    # m chunks of 3 latents take 1 + 4(3m - 1) pixel frames: 9, 21, 33, ...
    assert [chunk_pixel_frames(t, 3) for t in (1, 8, 9, 20, 21, 32, 33)] == [0, 0, 9, 9, 21, 21, 33]


def test_toy_autoencoder_round_trip_of_read_frames_is_exact(tmp_path):
    clip = flat_clip(25)
    with Mp4Writer(tmp_path / "clip.mp4", fps=16, lossless=True) as writer:
        writer.write(clip)
    frames = read_init_frames(tmp_path / "clip.mp4", (64, 64), 3)
    assert np.array_equal(frames, clip[4:])  # the last 21 frames: 6 latents, two chunks
    ae = ToyAutoencoder()
    latents = encode_init_frames(ae, frames, batch_size=2)
    assert latents.shape == (2, 4, 6, 8, 8)
    decoded = ((ae.decode(latents[:1])[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    assert np.array_equal(decoded.numpy(), frames)


def test_generate_continues_a_clip_starting_with_its_frames_exactly(tmp_path):
    clip = flat_clip(25)
    with Mp4Writer(tmp_path / "clip.mp4", fps=16, lossless=True) as writer:
        writer.write(clip)
    out = tmp_path / "videos"
    main(["generate", "--init-video", str(tmp_path / "clip.mp4"), "--prompt", "a red circle", "--prompt",
          "a blue square", "--seconds", "3", "--lossless", "--out", str(out), "--device", "cpu"])
    expected = 1 + 4 * (latent_frames_for(3, 16, 3) - 1)
    for name in ("000_a_red_circle.mp4", "001_a_blue_square.mp4"):
        video, _ = decode_mp4(out / name)
        assert len(video) == expected
        assert np.array_equal(video[:21], clip[4:]), name  # the clip's last 21 frames, exactly
        assert not np.array_equal(video[21:33], np.repeat(clip[-1:], 12, axis=0))  # then new frames


def test_generate_continues_an_image_held_for_one_chunk_with_a_schedule(tmp_path):
    from PIL import Image

    image = flat_clip(1, seed=3)[0]
    Image.fromarray(image).save(tmp_path / "frame.png")
    out = tmp_path / "videos"
    main(["generate", "--init-image", str(tmp_path / "frame.png"), "--prompt-schedule", "a red circle[1s] | a blue "
          "square[1s]", "--recache", "all", "--lossless", "--out", str(out), "--device", "cpu"])
    video, _ = decode_mp4(out / "000_a_red_circle.mp4")
    assert len(video) == 1 + 4 * (latent_frames_for(2, 16, 3) - 1)
    assert all(np.array_equal(frame, image) for frame in video[:9])


@pytest.mark.parametrize("make, arguments, message", [
    ("small", ["--init-video", "{dir}/small.mp4"], r"--init-video \S+small\.mp4 is 32x32 but the generator makes "
                                                   r"64x64 videos; ffmpeg -i small\.mp4 -vf scale=64:64"),
    ("short", ["--init-video", "{dir}/short.mp4"], r"--init-video \S+short\.mp4 has 5 frames, fewer than one chunk "
                                                   r"\(9\); pass a longer clip, or its last frame as --init-image"),
    ("long", ["--init-video", "{dir}/long.mp4", "--seconds", "1"],
     r"the video \(1 s, 6 latent frames\) is not longer than the given frames \(21 frames, 6 latent frames\); ask "
     r"for more seconds"),
    ("none", ["--init-image", "{dir}/missing.png"], r"--init-image \S+missing\.png: file not found"),
    ("text", ["--init-image", "{dir}/text.png"], r"--init-image \S+text\.png cannot be read as an image"),
])
def test_bad_given_frames_fail_with_one_line_naming_the_fix(tmp_path, make, arguments, message):
    clips = {"small": flat_clip(9, size=32), "short": flat_clip(5), "long": flat_clip(21)}
    if make in clips:
        with Mp4Writer(tmp_path / f"{make}.mp4", fps=16, lossless=True) as writer:
            writer.write(clips[make])
    (tmp_path / "text.png").write_text("not an image")
    out = tmp_path / "videos"
    with pytest.raises(SystemExit) as stopped:
        main(["generate", "--prompt", "x", "--out", str(out), "--device", "cpu",
              *[a.format(dir=tmp_path) for a in arguments]])
    text = str(stopped.value.code)
    assert re.match(r"^cf generate: " + message, text) and "\n" not in text, text
    assert not out.exists()


def test_generate_continues_given_frames_through_the_wan_vae(tmp_path):
    """The same continuation with the Wan VAE (a tiny random diffusers `AutoencoderKLWan`): the given frames open the
    video exactly, and the rest is generated conditioned on their latents (it differs from a video without them)."""
    from diffusers import AutoencoderKLWan

    from cf.export import GeneratorSpec
    from cf.generate import generate_videos, load_generator

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(tmp_path / "vae")
    spec = GeneratorSpec(autoencoder=str(tmp_path / "vae"), latent_size=(2, 2))  # 16 x 16 frames
    model = load_generator(spec, None)
    given = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)  # 3 latents: one chunk
    generate_videos(spec, model, ["a red circle"], tmp_path / "continued", seconds=2, init_frames=given,
                    lossless=True, progress=False)
    generate_videos(spec, model, ["a red circle"], tmp_path / "fresh", seconds=2, lossless=True, progress=False)
    continued, _ = decode_mp4(next((tmp_path / "continued").glob("*.mp4")))
    fresh, _ = decode_mp4(next((tmp_path / "fresh").glob("*.mp4")))
    assert len(continued) == len(fresh) == 1 + 4 * (latent_frames_for(2, 16, 3) - 1)
    assert np.array_equal(continued[:9], given)
    assert not np.array_equal(continued[9:], fresh[9:])
