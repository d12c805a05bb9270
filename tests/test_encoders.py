"""Video autoencoders and text encoders: tiny real models saved to disk, and the exact toys."""

import math
import subprocess
import sys
import zlib

import pytest
import torch

from cf.encoders import (
    HashedTextEncoder,
    ToyAutoencoder,
    UMT5TextEncoder,
    VideoAutoencoder,
    WanVideoAutoencoder,
    build_autoencoder,
    build_text_encoder,
    toy_patch_basis,
)

LATENTS_MEAN = [0.1, -0.2, 0.3, -0.4]
LATENTS_STD = [0.5, 1.5, 2.0, 0.8]


# --------------------------------------------------------------------------------------------------------------------
# Wan VAE (tiny diffusers AutoencoderKLWan)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_root(tmp_path_factory):
    """A Wan-Diffusers-like root with a tiny random VAE in vae/."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                           latents_std=LATENTS_STD)
    root = tmp_path_factory.mktemp("wan")
    vae.save_pretrained(root / "vae")
    return root


def test_wan_encode_matches_diffusers_mode_normalised(wan_root):
    from diffusers import AutoencoderKLWan

    ae = WanVideoAutoencoder.from_pretrained(wan_root / "vae")
    reference = AutoencoderKLWan.from_pretrained(wan_root / "vae").eval()
    torch.manual_seed(1)
    video = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    latents = ae.encode(video)
    assert latents.shape == (2, 4, 3, 2, 3)
    with torch.no_grad():
        mode = reference.encode(video).latent_dist.mode()
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (mode - mean) / std, rtol=1e-5, atol=1e-5)
    assert not latents.requires_grad
    # deterministic (distribution mode, not a sample)
    torch.testing.assert_close(ae.encode(video), latents, rtol=0, atol=0)


def test_wan_decode_shapes_denormalises_and_clamps(wan_root):
    from diffusers import AutoencoderKLWan

    ae = WanVideoAutoencoder.from_pretrained(wan_root)  # the repository root with vae/
    reference = AutoencoderKLWan.from_pretrained(wan_root / "vae").eval()
    assert (ae.latent_channels, ae.temporal_factor, ae.spatial_factor) == (4, 4, 8)
    torch.manual_seed(2)
    latents = torch.randn(1, 4, 4, 2, 2)
    pixels = ae.decode(latents)
    assert pixels.shape == (1, 3, 13, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        expected = reference.decode(latents * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(pixels, expected, rtol=1e-5, atol=1e-5)


def test_wan_stream_decode_equals_full_decode(wan_root):
    ae = WanVideoAutoencoder.from_pretrained(wan_root / "vae")
    torch.manual_seed(3)
    latents = torch.randn(2, 4, 7, 2, 3)
    full = ae.decode(latents)
    assert full.shape == (2, 3, 25, 16, 24)
    stream = ae.stream_decoder()
    pieces = [stream(chunk) for chunk in latents.split(3, dim=2)]
    assert [p.shape[2] for p in pieces] == [9, 12, 4]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=1e-5, atol=1e-5)
    # a reset decoder starts a new video
    stream.reset()
    torch.testing.assert_close(stream(latents[:, :, :2]), full[:, :, :5], rtol=1e-5, atol=1e-5)


def test_wan_stream_cache_matters(wan_root):
    """Decoding a later chunk without the history must differ: the streaming decoder really carries state."""
    ae = WanVideoAutoencoder.from_pretrained(wan_root / "vae")
    torch.manual_seed(4)
    latents = torch.randn(1, 4, 6, 2, 2)
    stream = ae.stream_decoder()
    stream(latents[:, :, :3])
    with_history = stream(latents[:, :, 3:])
    without_history = ae.stream_decoder()(latents[:, :, 3:])
    assert with_history.shape[2] == 12 and without_history.shape[2] == 9
    assert not torch.allclose(with_history[:, :, -9:], without_history, atol=1e-4)


def test_wan_frozen_and_eval(wan_root):
    ae = WanVideoAutoencoder.from_pretrained(wan_root / "vae")
    assert all(not p.requires_grad for p in ae.parameters())
    ae.train()
    assert not ae.training and not ae.vae.training
    latents = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    assert not ae.decode(latents).requires_grad


def test_wan_default_statistics_for_z16_without_config_values():
    from diffusers import AutoencoderKLWan

    from cf.encoders import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True])
    vae.register_to_config(latents_mean=None, latents_std=None)
    ae = WanVideoAutoencoder(vae)
    assert ae.latents_mean.flatten().tolist() == pytest.approx(list(WAN21_LATENTS_MEAN))
    assert ae.latents_std.flatten().tolist() == pytest.approx(list(WAN21_LATENTS_STD))
    assert ae.latents_mean.flatten()[7].item() == pytest.approx(1.5508)  # §A.1


def test_wan_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*vae/"):
        WanVideoAutoencoder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"only_config.*lacks .*safetensors.*Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        WanVideoAutoencoder.from_pretrained(tmp_path / "only_config")


def test_build_autoencoder(wan_root):
    assert isinstance(build_autoencoder("toy", latent_channels=6), ToyAutoencoder)
    assert build_autoencoder("toy", latent_channels=6).latent_channels == 6
    ae = build_autoencoder(str(wan_root), dtype="bfloat16")
    assert isinstance(ae, WanVideoAutoencoder) and ae.vae_dtype == torch.bfloat16
    assert ae.encode(torch.zeros(1, 3, 5, 8, 8)).dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Toy autoencoder
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size", [(4, 8), (12, 4), (48, 4)])
def test_toy_basis_orthonormal(channels, size):
    basis = toy_patch_basis(channels, size).double().reshape(channels, -1)
    torch.testing.assert_close(basis @ basis.T, torch.eye(channels, dtype=torch.float64), atol=1e-6, rtol=0)
    # channels 0-2 are the unit-norm constant patch of one colour; the others have zero mean in every colour
    for c in range(3):
        expected = torch.zeros(3, size, size, dtype=torch.float64)
        expected[c] = 1.0 / size
        torch.testing.assert_close(basis[c].reshape(3, size, size), expected, atol=1e-7, rtol=0)
    assert basis[3:].reshape(channels - 3, 3, -1).sum(-1).abs().max() < 1e-6


def test_toy_basis_rejects_too_many_channels():
    with pytest.raises(ValueError, match="latent_channels"):
        toy_patch_basis(3 * 4 * 4 + 1, 4)


def _naive_toy_encode(video, s):
    """Independent reference for the unnormalised colour channels and the first pattern channel."""
    b, _, t, height, width = video.shape
    groups = [[0]] + [list(range(1 + 4 * j, 5 + 4 * j)) for j in range((t - 1) // 4)]
    out = torch.zeros(b, 4, len(groups), height // s, width // s, dtype=torch.float64)
    cos = torch.tensor([math.sqrt(2 / s) * math.cos(math.pi * (2 * x + 1) / (2 * s)) for x in range(s)],
                       dtype=torch.float64)
    for n, frames in enumerate(groups):
        frame = video[:, :, frames].double().mean(dim=2)
        for i in range(height // s):
            for j in range(width // s):
                patch = frame[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s]
                out[:, :3, n, i, j] = patch.mean(dim=(-1, -2)) * s
                luminance = patch.sum(dim=1) / math.sqrt(3)
                out[:, 3, n, i, j] = (luminance * cos[None, None, :]).sum(dim=(-1, -2)) / math.sqrt(s)
    return out


def test_toy_encode_matches_naive_reference():
    torch.manual_seed(5)
    ae = ToyAutoencoder(latent_channels=4, spatial_factor=8, normalization="none")
    video = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    latents = ae.encode(video)
    assert latents.shape == (2, 4, 3, 2, 3)
    torch.testing.assert_close(latents.double(), _naive_toy_encode(video, 8), atol=1e-5, rtol=1e-5)


def test_toy_synthetic_normalisation():
    ae = ToyAutoencoder(latent_channels=5, spatial_factor=8)
    raw = ToyAutoencoder(latent_channels=5, spatial_factor=8, normalization="none")
    torch.manual_seed(6)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    expected_std = torch.tensor([8 / math.sqrt(3)] * 3 + [1.0, 1.0]).view(1, 5, 1, 1, 1)
    torch.testing.assert_close(ae.encode(video), raw.encode(video) / expected_std)
    # a uniformly random flat colour gives colour channels of unit variance
    colours = torch.rand(20000, 3) * 2 - 1
    flat = colours.view(20000, 3, 1, 1, 1).expand(20000, 3, 1, 8, 8)
    assert ae.encode(flat)[:, :3].std().item() == pytest.approx(1.0, abs=0.02)
    custom = ToyAutoencoder(latent_channels=4, latents_mean=[1, 0, 0, 0], latents_std=[2, 1, 1, 1])
    torch.testing.assert_close(custom.encode(video)[:, 0], (raw.encode(video)[:, 0] - 1) / 2)


@pytest.mark.parametrize("clamp_output", [True, False])
def test_toy_encode_decode_is_identity_on_latents(clamp_output):
    torch.manual_seed(7)
    ae = ToyAutoencoder(latent_channels=6, spatial_factor=4, clamp_output=clamp_output)
    scale = 1.0 if clamp_output else 10.0  # with clamping, stay where decoded pixels lie inside [-1, 1]
    latents = (torch.rand(2, 6, 4, 3, 2) * 2 - 1) * scale
    pixels = ae.decode(latents)
    assert pixels.shape == (2, 3, 13, 12, 8)
    if clamp_output:
        assert pixels.abs().max() < 1
    torch.testing.assert_close(ae.encode(pixels), latents, atol=1e-5, rtol=1e-5)


def test_toy_decode_clamps():
    ae = ToyAutoencoder()
    pixels = ae.decode(torch.full((1, 4, 2, 1, 1), 10.0))
    assert pixels.max() == 1.0


def test_toy_preserves_colours():
    """Patch-wise flat colours, constant within each temporal group, survive decode(encode(.)) exactly."""
    torch.manual_seed(8)
    colours = torch.rand(1, 3, 3, 2, 2) * 2 - 1  # one colour per (latent frame, 8x8 patch)
    frames = torch.cat([colours[:, :, :1], colours[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    video = frames.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
    ae = ToyAutoencoder()
    latents = ae.encode(video)
    torch.testing.assert_close(ae.decode(latents), video, atol=1e-5, rtol=1e-5)
    # only the colour channels are used for flat patches
    assert latents[:, 3:].abs().max() < 1e-5


def test_toy_temporal_average_and_repeat():
    ae = ToyAutoencoder(normalization="none")
    values = torch.arange(9, dtype=torch.float32) / 10  # frame i has grey level i/10
    video = values.view(1, 1, 9, 1, 1).expand(1, 3, 9, 8, 8)
    latents = ae.encode(video)
    grey = latents[0, 0, :, 0, 0] / 8  # channel 0 carries s * red mean
    torch.testing.assert_close(grey, torch.tensor([0.0, 0.25, 0.65]))
    decoded = ae.decode(latents)[0, 0, :, 0, 0]
    torch.testing.assert_close(decoded, torch.tensor([0.0] + [0.25] * 4 + [0.65] * 4))


def test_frame_count_arithmetic():
    assert VideoAutoencoder.num_latent_frames(81) == 21
    assert VideoAutoencoder.num_pixel_frames(21) == 81
    assert ToyAutoencoder.num_latent_frames(1) == 1 and ToyAutoencoder.num_pixel_frames(1) == 1
    for n in range(1, 30):
        assert VideoAutoencoder.num_latent_frames(VideoAutoencoder.num_pixel_frames(n)) == n
    with pytest.raises(ValueError, match=r"80 pixel frames.*1 \+ 4k.*77.*81"):
        VideoAutoencoder.num_latent_frames(80)
    with pytest.raises(ValueError):
        VideoAutoencoder.num_latent_frames(0)
    with pytest.raises(ValueError):
        VideoAutoencoder.num_pixel_frames(0)


def test_toy_stream_equals_full_decode():
    torch.manual_seed(9)
    ae = ToyAutoencoder()
    latents = torch.randn(2, 4, 8, 2, 2)
    full = ae.decode(latents)
    stream = ae.stream_decoder()
    pieces = [stream(chunk) for chunk in latents.split(3, dim=2)]
    assert [p.shape[2] for p in pieces] == [9, 12, 8]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=0, atol=0)


def test_toy_shape_errors():
    ae = ToyAutoencoder()
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        ae.encode(torch.zeros(1, 5, 3, 8, 8))
    with pytest.raises(ValueError, match="multiples of the spatial factor 8"):
        ae.encode(torch.zeros(1, 3, 5, 12, 8))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ae.encode(torch.zeros(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 4, n, h, w\]"):
        ae.decode(torch.zeros(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="normalization"):
        ToyAutoencoder(normalization="imagenet")


def test_toy_frozen_no_grad_then_unfrozen_grad():
    ae = ToyAutoencoder()
    assert list(ae.parameters()) == [] and ae.state_dict() == {}
    latents = torch.randn(1, 4, 2, 1, 1, requires_grad=True)
    assert not ae.decode(latents).requires_grad
    ae.unfreeze()
    ae.decode(latents * 0.1).sum().backward()
    assert latents.grad is not None


# --------------------------------------------------------------------------------------------------------------------
# umT5 text encoder (tiny)
# --------------------------------------------------------------------------------------------------------------------

VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "cat": 5, "runs": 6, "blue": 7, "dog": 8, "sits": 9}


@pytest.fixture(scope="module")
def umt5_root(tmp_path_factory):
    """A Wan-Diffusers-like root: tiny UMT5 in text_encoder/, a word-level tokenizer in tokenizer/."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(VOCAB), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                        relative_attention_num_buckets=8, dropout_rate=0.5, pad_token_id=0, eos_token_id=1)
    root = tmp_path_factory.mktemp("umt5")
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    return root


def test_umt5_matches_direct_model_call(umt5_root):
    from transformers import UMT5EncoderModel

    encoder = UMT5TextEncoder.from_pretrained(umt5_root, max_length=8)
    assert (encoder.dim, encoder.max_length) == (16, 8)
    prompts = ["  a   red\tcat runs ", "blue dog"]
    out = encoder(prompts)
    assert out.shape == (2, 8, 16)

    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[0, :5] = torch.tensor([3, 4, 5, 6, 1])  # whitespace cleaned, </s> appended
    ids[1, :3] = torch.tensor([7, 8, 1])
    mask = (torch.arange(8) < torch.tensor([[5], [3]])).long()
    model = UMT5EncoderModel.from_pretrained(umt5_root / "text_encoder").eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0, :5], hidden[0, :5])
    torch.testing.assert_close(out[1, :3], hidden[1, :3])
    assert (out[0, 5:] == 0).all() and (out[1, 3:] == 0).all()
    assert (out[0, :5].abs().sum(-1) > 0).all()


def test_umt5_frozen_deterministic_and_cached(umt5_root, monkeypatch):
    encoder = UMT5TextEncoder.from_pretrained(umt5_root / "text_encoder", max_length=6,
                                              tokenizer_folder=umt5_root / "tokenizer")
    encoder.train()  # dropout 0.5 in the config: must stay off
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.parameters())
    first = encoder(["a cat sits"])
    torch.testing.assert_close(encoder(["a cat sits"]), first, rtol=0, atol=0)

    calls = []
    original = encoder._embed
    monkeypatch.setattr(encoder, "_embed", lambda prompts: calls.append(list(prompts)) or original(prompts))
    cached = encoder.embed_cached(["a cat sits", "red dog", "a cat sits"])
    again = encoder.embed_cached(["red dog"])
    assert calls == [["a cat sits", "red dog"]]
    torch.testing.assert_close(cached[0], first[0])
    torch.testing.assert_close(cached[2], first[0])
    torch.testing.assert_close(again[0], cached[1])


def test_umt5_missing_folders(tmp_path, umt5_root):
    with pytest.raises(FileNotFoundError, match=r"absent.*does not exist.*text_encoder/.*tokenizer/"):
        UMT5TextEncoder.from_pretrained(tmp_path / "absent")
    (tmp_path / "model_only" / "text_encoder").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"text_encoder.*lacks config.json"):
        UMT5TextEncoder.from_pretrained(tmp_path / "model_only")
    with pytest.raises(FileNotFoundError, match=r"Tokenizer folder .*text_encoder.*umt5-xxl"):
        UMT5TextEncoder.from_pretrained(umt5_root / "text_encoder")


def test_build_text_encoder(umt5_root):
    encoder = build_text_encoder(str(umt5_root), max_length=4)
    assert isinstance(encoder, UMT5TextEncoder) and encoder(["a"]).shape == (1, 4, 16)
    hashed = build_text_encoder("hashed", dim=16, max_length=4)
    assert isinstance(hashed, HashedTextEncoder) and hashed(["a"]).shape == (1, 4, 16)


# --------------------------------------------------------------------------------------------------------------------
# Hashed toy text encoder
# --------------------------------------------------------------------------------------------------------------------


def test_hashed_rows_follow_crc32():
    encoder = HashedTextEncoder(dim=32, max_length=8, vocab_size=1024, seed=0)
    out = encoder(["Red  CAT, runs!"])
    assert out.shape == (1, 8, 32)
    for position, word in enumerate(["red", "cat", "runs"]):
        row = zlib.crc32(word.encode()) % 1024
        torch.testing.assert_close(out[0, position], encoder.table[row], rtol=0, atol=0)
    assert (out[0, 3:] == 0).all()
    assert (out[0, :3].abs().sum(-1) > 0).all()


def test_hashed_deterministic_across_instances_and_prompts_differ():
    a, b = HashedTextEncoder(seed=3), HashedTextEncoder(seed=3)
    prompts = ["a red cat runs", "A Red Cat Runs", "a blue dog sits", ""]
    out_a, out_b = a(prompts), b(prompts)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(out_a[0], out_a[1], rtol=0, atol=0)  # case-insensitive
    assert not torch.equal(out_a[0], out_a[2])
    assert (out_a[3] == 0).all()
    assert not torch.equal(HashedTextEncoder(seed=4)(prompts[:1]), out_a[:1])


def test_hashed_truncates_to_max_length():
    encoder = HashedTextEncoder(dim=8, max_length=4)
    long = encoder(["one two three four five six"])
    torch.testing.assert_close(long, encoder(["one two three four"]), rtol=0, atol=0)
    assert (long.abs().sum(-1) > 0).all()


def test_hashed_identical_in_another_process():
    """crc32 (not Python's salted hash()) and a seeded table: a fresh interpreter gives the same numbers."""
    script = ("import torch; from cf.encoders import HashedTextEncoder; "
              "e = HashedTextEncoder(dim=16, max_length=6, seed=11); "
              "print(repr(e(['a red cat runs', 'blue dog']).double().sum().item()))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={"PYTHONHASHSEED": "12345", "PATH": ""}, cwd=str(__import__("pathlib").Path(
                                __file__).resolve().parents[1]))
    here = HashedTextEncoder(dim=16, max_length=6, seed=11)(["a red cat runs", "blue dog"]).double().sum().item()
    assert float(result.stdout.strip()) == here


def test_hashed_cache_computes_repeated_prompts_once(monkeypatch):
    encoder = HashedTextEncoder(cache_size=2)
    calls = []
    original = encoder._embed
    monkeypatch.setattr(encoder, "_embed", lambda prompts: calls.append(list(prompts)) or original(prompts))
    negative = "bright tones, overexposed"
    for _ in range(3):
        out = encoder.embed_cached([negative, negative])
    assert calls == [[negative]]
    torch.testing.assert_close(out[0], HashedTextEncoder()([negative])[0])
    encoder.embed_cached(["x", "y"])  # evicts the least recently used entry
    encoder.embed_cached([negative])
    assert calls[-1] == [negative]
    with pytest.raises(TypeError, match="list of prompts"):
        encoder("a single string")


def test_toy_other_temporal_factor():
    ae = ToyAutoencoder(temporal_factor=2, normalization="none")
    video = torch.arange(5, dtype=torch.float32).div(10).view(1, 1, 5, 1, 1).expand(1, 3, 5, 8, 8)
    latents = ae.encode(video)
    assert latents.shape[2] == ToyAutoencoder.num_latent_frames(5, temporal_factor=2) == 3
    torch.testing.assert_close(latents[0, 0, :, 0, 0] / 8, torch.tensor([0.0, 0.15, 0.35]))
    assert ae.decode(latents).shape[2] == ToyAutoencoder.num_pixel_frames(3, temporal_factor=2) == 5
    with pytest.raises(ValueError, match=r"1 \+ 2k"):
        ae.encode(torch.zeros(1, 3, 4, 8, 8))
