"""Feature extractors: tiny random DINOv2 / CLIP models saved to and loaded from tmp_path, offline."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cf.evaluation.features import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    ClipFeatures,
    DinoFeatures,
    center_crop,
    frames_to_float,
    preprocess_clip,
    preprocess_dino,
    resize_shorter_side,
)


def build_tiny_dino(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def smooth_frames(num_frames: int = 5, height: int = 40, width: int = 56) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [np.stack([127 + 100 * np.sin(xx / 7 + c + t) * np.cos(yy / 5) for c in range(3)], -1)
              for t in range(num_frames)]
    return np.stack(frames).astype(np.uint8)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_tiny_dino(root / "dino"), build_tiny_clip(root / "clip")


def test_resize_and_crop_sizes_follow_torchvision_rules():
    x = torch.rand(2, 3, 40, 56)
    resized = resize_shorter_side(x, 32)
    assert resized.shape[-2:] == (32, int(32 * 56 / 40))  # 44: the long side is truncated
    tall = resize_shorter_side(torch.rand(1, 3, 50, 30), 24)
    assert tall.shape[-2:] == (40, 24)
    cropped = center_crop(torch.arange(5 * 7.0).view(1, 1, 5, 7).expand(1, 3, 5, 7), 3)
    assert cropped[0, 0].tolist() == [[9.0, 10.0, 11.0], [16.0, 17.0, 18.0], [23.0, 24.0, 25.0]]
    with pytest.raises(ValueError, match="resize first"):
        center_crop(x, 64)


def test_clip_preprocessing_matches_transformers_image_processor():
    from transformers import CLIPImageProcessor

    frame = smooth_frames(1)[0]
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    reference = processor(images=[frame], return_tensors="pt")["pixel_values"]
    ours = preprocess_clip(frames_to_float(frame[None]), 32)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=0.03)  # PIL rounds to uint8 after resizing


def keys_cubic(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.75: PyTorch's non-antialiased bicubic)."""
    x = np.abs(distance)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def naive_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of a half-pixel-centred bicubic resize, taps clamped at the borders.

    The source coordinate ``scale * (i + 0.5) - 0.5`` uses the float32 ``scale = in / out`` and is rounded once to
    float32, as PyTorch's CPU kernel does for float32 images (float64 coordinates are off by up to ~5e-5 of a pixel on
    noise); the rest is float64.
    """
    scale = float(np.float32(in_size) / np.float32(out_size))
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        source = float(np.float32(scale * (i + 0.5) - 0.5))
        base = int(np.floor(source))
        for tap in range(base - 1, base + 3):
            matrix[i, min(max(tap, 0), in_size - 1)] += keys_cubic(np.array(source - tap))
    return matrix


def vbench_clip_transform_reference(frames: np.ndarray, n_px: int) -> np.ndarray:
    """VBench's ``clip_transform(n_px)`` on ``load_video`` output, written out in float64.

    ``load_video`` gives float32 ``[T, 3, H, W]`` in [0, 255] (``torch.Tensor`` of the uint8 buffer); torchvision
    < 0.17 ``Resize(n_px, BICUBIC)`` on a float tensor: short side -> n_px, long side int(n_px * long / short), no
    antialias, no clamp; ``CenterCrop``: offsets int(round(d / 2)); then / 255 and CLIP mean / std.
    """
    x = frames.astype(np.float64).transpose(0, 3, 1, 2)
    h, w = x.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = n_px, int(n_px * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        x = naive_bicubic_matrix(h, new_h) @ x @ naive_bicubic_matrix(w, new_w).T
    top, left = int(round((new_h - n_px) / 2.0)), int(round((new_w - n_px) / 2.0))
    x = x[..., top : top + n_px, left : left + n_px] / 255.0
    mean, std = np.array(CLIP_MEAN).reshape(1, 3, 1, 1), np.array(CLIP_STD).reshape(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("height, width", [(60, 104), (480, 832), (61, 104), (833, 480)])
def test_vbench_clip_preprocessing_equals_vbench_clip_transform(height, width):
    frames = np.random.default_rng(height + width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    reference = torch.from_numpy(vbench_clip_transform_reference(frames, 224))
    ours = preprocess_clip(frames_to_float(frames), 224, "vbench")
    assert ours.shape == reference.shape == (2, 3, 224, 224)
    pixel_error = (ours.double() - reference) * torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert pixel_error.abs().max() < 2e-6  # in [0, 1] pixel units
    # the CLIP-F / CLIP-T path (antialiased, clamped) is a different image: the switch matters
    assert (preprocess_clip(frames_to_float(frames), 224, "clip").double() - reference).abs().max() > 0.1
    with pytest.raises(ValueError, match="vbench"):
        preprocess_clip(frames_to_float(frames), 224, "bogus")


def test_dino_preprocessing_modes():
    frames = frames_to_float(smooth_frames(2))
    assert preprocess_dino(frames, 32, "center_crop").shape == (2, 3, 32, 32)
    no_crop = preprocess_dino(frames, 32, "shorter_side")
    assert no_crop.shape == (2, 3, 32, 44)
    channel0 = torch.nn.functional.interpolate(frames, size=(32, 44), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(no_crop[:, 0], (channel0 - 0.485) / 0.229, atol=1e-5)
    with pytest.raises(ValueError, match="center_crop"):
        preprocess_dino(frames, 32, "bogus")


def test_frame_input_validation():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        frames_to_float(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        frames_to_float(torch.full((1, 3, 4, 4), -1.0))
    u8 = smooth_frames(2)
    assert torch.allclose(frames_to_float(u8), torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)


def test_dino_features_offline_shape_norm_and_cls(model_dirs):
    from transformers import Dinov2Model

    dino_dir, _ = model_dirs
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    extractor = DinoFeatures.from_pretrained(dino_dir, image_size=32, batch_size=2)
    frames = smooth_frames(5)
    features = extractor.image_features(frames)
    assert features.shape == (5, 32)
    assert torch.allclose(features.norm(dim=-1), torch.ones(5), atol=1e-5)
    # CLS after the final LayerNorm == the library's pooler_output
    model = Dinov2Model.from_pretrained(dino_dir, local_files_only=True).eval()
    with torch.no_grad():
        pooled = model(pixel_values=preprocess_dino(frames_to_float(frames), 32)).pooler_output
    assert torch.allclose(features, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5)
    # float input and another batch size give the same features
    as_float = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(DinoFeatures.from_pretrained(dino_dir, image_size=32, batch_size=5)
                          .image_features(as_float), features, atol=1e-5)
    with pytest.raises(NotImplementedError, match="text"):
        extractor.text_features(["a cat"])


def test_clip_features_offline(model_dirs):
    from transformers import CLIPModel

    _, clip_dir = model_dirs
    extractor = ClipFeatures.from_pretrained(clip_dir, batch_size=3)
    frames = smooth_frames(4)
    image = extractor.image_features(frames)
    text = extractor.text_features(["a cat runs", "dog"])
    assert image.shape == (4, 16) and text.shape == (2, 16)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=preprocess_clip(frames_to_float(frames), 32))
    out = out if torch.is_tensor(out) else out.pooler_output
    assert torch.allclose(image, torch.nn.functional.normalize(out, dim=-1), atol=1e-5)
    # VBench preprocessing: the same model and tokenizer, another image pipeline
    vbench = extractor.with_preprocessing("vbench")
    assert vbench.model is extractor.model and vbench.tokenizer is extractor.tokenizer
    vbench_image = vbench.image_features(frames)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=preprocess_clip(frames_to_float(frames), 32, "vbench"))
    out = out if torch.is_tensor(out) else out.pooler_output
    assert torch.allclose(vbench_image, torch.nn.functional.normalize(out, dim=-1), atol=1e-5)
    assert not torch.allclose(vbench_image, image, atol=1e-4)
    assert torch.allclose(ClipFeatures.from_pretrained(clip_dir, preprocessing="vbench").image_features(frames),
                          vbench_image, atol=1e-5)
    with pytest.raises(ValueError, match="'clip'"):
        ClipFeatures(model, extractor.tokenizer, preprocessing="pil")


def test_missing_folder_names_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="facebook/dinov2-base"):
        DinoFeatures.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="clip-vit-base-patch32"):
        ClipFeatures.from_pretrained(tmp_path)
