"""Frame feature extractors for the long-video metrics: DINOv2 (CLS token) and CLIP (image and text).

Weights are read from local folders only (``from_pretrained(folder, local_files_only=True)``); nothing is
downloaded. Preprocessing is done with torch ops on whole batches of frames (reference.md §3):

- DINOv2, ``"center_crop"``: bicubic resize of the shorter side to ``image_size`` + center crop, ImageNet mean/std.
- DINO, ``"shorter_side"`` (VBench subject consistency): bilinear resize of the shorter side, no crop, no antialias,
  ImageNet mean/std.
- CLIP, ``"clip"`` (CLIP-F and CLIP-T): antialiased bicubic resize of the shorter side, clamped to [0, 1], + center
  crop to the vision tower's size, CLIP mean/std; close to the PIL resize of ``CLIPImageProcessor`` (which
  torchmetrics' CLIPScore uses), without its rounding to uint8.
- CLIP, ``"vbench"`` (VBench background consistency): VBench's ``clip_transform`` on its float frames in [0, 255],
  i.e. torchvision ``Resize(size, BICUBIC)`` on a tensor as of torchvision < 0.17 (no antialias, no clamp: bicubic
  overshoot is kept), ``CenterCrop(size)``, ``/ 255``, CLIP mean/std. Done here in [0, 1], which differs only by
  float32 rounding (~1e-7).

Shorter-side resizes follow torchvision: the short side becomes ``size`` and the long side
``int(size * long / short)`` (truncated); frames that already have that size are returned unchanged. Center-crop
offsets are ``int(round((side - size) / 2))``.

Frames are uint8 ``[T, H, W, 3]`` (numpy or torch) or float ``[T, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DinoPreprocessing = Literal["center_crop", "shorter_side"]
ClipPreprocessing = Literal["clip", "vbench"]


def frames_to_float(frames: Tensor | np.ndarray) -> Tensor:
    """uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [0, 1] -> float32 ``[T, 3, H, W]`` in [0, 1]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not torch.is_tensor(frames):
        raise TypeError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")
    if frames.dtype == torch.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must have shape [T, H, W, 3], got {tuple(frames.shape)}")
        return frames.permute(0, 3, 1, 2).float() / 255.0
    if not frames.is_floating_point():
        raise TypeError(f"frames must be uint8 or floating point, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"float frames must have shape [T, 3, H, W], got {tuple(frames.shape)}")
    if frames.numel() and (frames.min() < -1e-3 or frames.max() > 1 + 1e-3):
        raise ValueError(
            "float frames must lie in [0, 1]; convert pixels in [-1, 1] with (x + 1) / 2, "
            "or pass uint8 [T, H, W, 3] frames"
        )
    return frames.float()


def resize_shorter_side(frames: Tensor, size: int, mode: str = "bicubic", antialias: bool = True,
                        clamp: bool = True) -> Tensor:
    """Resize ``[T, 3, H, W]`` so that the shorter side is ``size`` (the longer one is truncated like torchvision).

    ``clamp`` clips bicubic overshoot back to [0, 1] (bilinear cannot overshoot and is never clipped).
    """
    height, width = frames.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_h, new_w) == (height, width):
        return frames
    out = F.interpolate(frames, size=(new_h, new_w), mode=mode, align_corners=False, antialias=antialias)
    return out.clamp(0.0, 1.0) if clamp and mode == "bicubic" else out


def center_crop(frames: Tensor, size: int) -> Tensor:
    """Center crop ``[T, 3, H, W]`` to ``[T, 3, size, size]`` (offsets rounded like torchvision)."""
    height, width = frames.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot center-crop {height}x{width} frames to {size}x{size}; resize first")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return frames[..., top : top + size, left : left + size]


def normalize_channels(frames: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel on ``[T, 3, H, W]``."""
    mean_t = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return (frames - mean_t) / std_t


def preprocess_dino(frames: Tensor, image_size: int = 224, mode: DinoPreprocessing = "center_crop") -> Tensor:
    """Float ``[T, 3, H, W]`` in [0, 1] -> DINO input (``center_crop``: ``[T, 3, S, S]``; ``shorter_side``: no crop)."""
    if mode == "center_crop":
        return normalize_channels(center_crop(resize_shorter_side(frames, image_size), image_size),
                                  IMAGENET_MEAN, IMAGENET_STD)
    if mode == "shorter_side":
        resized = resize_shorter_side(frames, image_size, mode="bilinear", antialias=False)
        return normalize_channels(resized, IMAGENET_MEAN, IMAGENET_STD)
    raise ValueError(f"unknown DINO preprocessing {mode!r}; use 'center_crop' or 'shorter_side'")


def preprocess_clip(frames: Tensor, image_size: int = 224, mode: ClipPreprocessing = "clip") -> Tensor:
    """Float ``[T, 3, H, W]`` in [0, 1] -> CLIP input ``[T, 3, S, S]`` (bicubic, center crop, CLIP mean/std).

    ``mode="clip"``: antialiased and clamped (CLIP-F / CLIP-T); ``mode="vbench"``: VBench's ``clip_transform``,
    no antialias and no clamp (background consistency). See the module docstring.
    """
    if mode == "clip":
        resized = resize_shorter_side(frames, image_size, antialias=True, clamp=True)
    elif mode == "vbench":
        resized = resize_shorter_side(frames, image_size, antialias=False, clamp=False)
    else:
        raise ValueError(f"unknown CLIP preprocessing {mode!r}; use 'clip' (CLIP-F / CLIP-T) or 'vbench'")
    return normalize_channels(center_crop(resized, image_size), CLIP_MEAN, CLIP_STD)


def _pooled(output: Tensor | object) -> Tensor:
    """transformers 4 returns a tensor from ``get_*_features``; transformers 5 a ``BaseModelOutputWithPooling``."""
    return output if torch.is_tensor(output) else output.pooler_output


def _check_model_folder(folder: str | Path, what: str, download_hint: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} weights not found at '{path}' (expected a folder with config.json and model weights). "
            f"Nothing is downloaded automatically: on a machine with internet run "
            f"`huggingface-cli download {download_hint} --local-dir {path}`, copy the folder here, and pass its path."
        )
    return path


class FrameFeatures(ABC):
    """Common interface: L2-normalised image features per frame (and text features where the model has them)."""

    dim: int
    batch_size: int

    @abstractmethod
    def _embed_images(self, pixel_values: Tensor) -> Tensor:
        """Preprocessed ``[B, 3, h, w]`` -> raw features ``[B, D]``."""

    @abstractmethod
    def preprocess(self, frames: Tensor) -> Tensor:
        """Float ``[B, 3, H, W]`` in [0, 1] -> model input."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @torch.no_grad()
    def image_features(self, frames: Tensor | np.ndarray) -> Tensor:
        """uint8 ``[T, H, W, 3]`` or float ``[T, 3, H, W]`` in [0, 1] -> ``[T, D]`` float32 on CPU, unit norm."""
        frames_to_float(frames[:1])  # validates shape and range before any model work
        chunks = []
        for start in range(0, frames.shape[0], self.batch_size):  # convert per batch: long videos stay uint8
            batch = frames_to_float(frames[start : start + self.batch_size]).to(self.device)
            chunks.append(F.normalize(self._embed_images(self.preprocess(batch)).float(), dim=-1).cpu())
        if not chunks:
            return torch.zeros(0, self.dim)
        return torch.cat(chunks)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> ``[N, D]`` unit-norm text features."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower; use ClipFeatures for text features")


class DinoFeatures(FrameFeatures):
    """DINOv2 (``Dinov2Model``) or DINO ViT (``ViTModel``) CLS token of the last layer (after the final LayerNorm)."""

    def __init__(self, model: torch.nn.Module, image_size: int = 224, preprocessing: DinoPreprocessing = "center_crop",
                 batch_size: int = 32) -> None:
        if preprocessing not in ("center_crop", "shorter_side"):
            raise ValueError(f"unknown DINO preprocessing {preprocessing!r}; use 'center_crop' or 'shorter_side'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.image_size = image_size
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_size: int = 224,
                        preprocessing: DinoPreprocessing = "center_crop", batch_size: int = 32,
                        device: str | torch.device = "cpu") -> "DinoFeatures":
        """Load a DINOv2 / DINO folder saved by ``save_pretrained`` (e.g. facebook/dinov2-base)."""
        from transformers import AutoModel

        path = _check_model_folder(folder, "DINOv2", "facebook/dinov2-base")
        model = AutoModel.from_pretrained(path, local_files_only=True)
        return cls(model.to(device), image_size=image_size, preprocessing=preprocessing, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, frames: Tensor) -> Tensor:
        return preprocess_dino(frames, self.image_size, self.preprocessing)

    def _embed_images(self, pixel_values: Tensor) -> Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.model(pixel_values=pixel_values, **kwargs).last_hidden_state[:, 0]


class ClipFeatures(FrameFeatures):
    """CLIP projected image and text embeddings (``CLIPModel.get_image_features`` / ``get_text_features``).

    ``preprocessing``: ``"clip"`` for CLIP-F / CLIP-T, ``"vbench"`` for VBench background consistency.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: object, batch_size: int = 32,
                 preprocessing: ClipPreprocessing = "clip") -> None:
        if preprocessing not in ("clip", "vbench"):
            raise ValueError(f"unknown CLIP preprocessing {preprocessing!r}; use 'clip' (CLIP-F / CLIP-T) or 'vbench'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.image_size = int(model.config.vision_config.image_size)
        self.dim = int(model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, folder: str | Path, batch_size: int = 32, device: str | torch.device = "cpu",
                        preprocessing: ClipPreprocessing = "clip") -> "ClipFeatures":
        """Load a folder with a ``CLIPModel`` and its ``CLIPProcessor`` (e.g. openai/clip-vit-base-patch32)."""
        from transformers import CLIPModel, CLIPProcessor

        path = _check_model_folder(folder, "CLIP", "openai/clip-vit-base-patch32")
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        try:
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(
                f"CLIP processor files (tokenizer + preprocessor_config.json) missing or unreadable in '{path}': "
                f"{err}. Download the whole repository folder, not just the weights."
            ) from err
        return cls(model.to(device), processor.tokenizer, batch_size=batch_size, preprocessing=preprocessing)

    def with_preprocessing(self, preprocessing: ClipPreprocessing) -> "ClipFeatures":
        """The same model and tokenizer (shared, not copied) with another image preprocessing."""
        return ClipFeatures(self.model, self.tokenizer, batch_size=self.batch_size, preprocessing=preprocessing)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, frames: Tensor) -> Tensor:
        return preprocess_clip(frames, self.image_size, self.preprocessing)

    def _embed_images(self, pixel_values: Tensor) -> Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> ``[N, D]`` unit-norm CLIP text features (truncated to the text tower's length)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                                max_length=int(self.model.config.text_config.max_position_embeddings))
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1).cpu()
