"""Frozen video autoencoders and text encoders: the real ones (Wan2.1 VAE, umT5) and exact toys, the factories that
build them from config names, and `FrozenEncoders`, the pair a LightningModule holds outside its module tree.
Their interfaces (`VideoAutoencoder`, `TextEncoder`, `StreamingDecoder`, `FrozenByDefault`) and `resolve_dtype`
live in `cf.encoder_base` and are importable from here.

Shapes: pixels `[B, 3, T, H, W]` in [-1, 1] with `T = 1 + 4k`; latents `[B, C, 1 + k, H/s, W/s]`, normalised per
channel; text embeddings `[B, max_length, dim]` with the positions past the true token count exactly 0.
"""

from __future__ import annotations

import inspect
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cf.encoder_base import FrozenByDefault, StreamingDecoder, TextEncoder, VideoAutoencoder, resolve_dtype

__all__ = [
    "FrozenByDefault",
    "FrozenEncoders",
    "HashedTextEncoder",
    "StreamingDecoder",
    "TextEncoder",
    "ToyAutoencoder",
    "UMT5TextEncoder",
    "VideoAutoencoder",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WanVideoAutoencoder",
    "build_autoencoder",
    "build_text_encoder",
    "clean_whitespace",
    "resolve_dtype",
    "toy_patch_basis",
]

# Wan2.1 VAE latent statistics (z_dim = 16), applied as (z - mean) / std (method §A.1).
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

WAN_DIFFUSERS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


# --------------------------------------------------------------------------------------------------------------------
# Video autoencoders
# --------------------------------------------------------------------------------------------------------------------


def _require_files(folder: Path, what: str, fix: str, *patterns: str) -> None:
    """Raise FileNotFoundError unless `folder` exists and holds a config.json and a file matching any pattern."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist. {fix}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if patterns and not any(any(folder.glob(p)) for p in patterns):
        missing.append(" or ".join(patterns))
    if missing:
        raise FileNotFoundError(f"{what} folder {str(folder)!r} lacks {', '.join(missing)}. {fix}")


def _vae_folder(folder: str | Path) -> Path:
    root = Path(folder).expanduser()
    if (root / "vae").is_dir() and not (root / "config.json").is_file():
        root = root / "vae"
    _require_files(
        root, "Wan VAE",
        f"Download {WAN_DIFFUSERS_REPO} and pass its vae/ folder (config.json + diffusion_pytorch_model.safetensors) "
        "or the repository root.",
        "*.safetensors", "*.bin",
    )
    return root


class WanVideoAutoencoder(VideoAutoencoder):
    """The Wan2.1 causal 3D VAE (diffusers `AutoencoderKLWan`), with latent normalisation `(z - mean_c) / std_c`."""

    def __init__(self, vae: nn.Module, latents_mean: Sequence[float] | None = None,
                 latents_std: Sequence[float] | None = None) -> None:
        super().__init__()
        config = vae.config
        self.vae = vae
        self.latent_channels = int(config.z_dim)
        self.temporal_factor = int(getattr(config, "scale_factor_temporal", None) or 4)
        self.spatial_factor = int(getattr(config, "scale_factor_spatial", None) or 8)
        if self.temporal_factor != 4:
            raise NotImplementedError(
                f"Only temporal factor 4 (Wan2.1) is supported, the VAE config has {self.temporal_factor}.")
        mean = latents_mean if latents_mean is not None else getattr(config, "latents_mean", None)
        std = latents_std if latents_std is not None else getattr(config, "latents_std", None)
        if mean is None or std is None:
            if self.latent_channels != 16:
                raise ValueError(
                    f"The VAE has z_dim = {self.latent_channels} and no latents_mean/latents_std in its config; "
                    "pass latents_mean= and latents_std= (one value per latent channel).")
            mean, std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
        if len(mean) != self.latent_channels or len(std) != self.latent_channels:
            raise ValueError(
                f"latents_mean/latents_std have {len(mean)}/{len(std)} entries but the VAE has z_dim = "
                f"{self.latent_channels}; give one value per latent channel.")
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)
        self._decoder_takes_first_chunk = "first_chunk" in inspect.signature(vae.decoder.forward).parameters
        self.freeze()

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str | torch.dtype = torch.float32) -> "WanVideoAutoencoder":
        """Load from a local diffusers folder (`config.json` + weights) or a Wan-Diffusers root with `vae/`."""
        from diffusers import AutoencoderKLWan

        root = _vae_folder(folder)
        vae = AutoencoderKLWan.from_pretrained(str(root), torch_dtype=resolve_dtype(dtype), local_files_only=True)
        return cls(vae)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def normalise(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> normalised latents, per channel (float32)."""
        return (z.float() - self.latents_mean) / self.latents_std

    def denormalise(self, latents: Tensor) -> Tensor:
        """Normalised latents -> raw VAE latents (float32)."""
        return latents.float() * self.latents_std + self.latents_mean

    def _encode(self, video: Tensor) -> Tensor:
        x = video.to(device=self.vae_device, dtype=self.vae_dtype)
        z = self.vae.encode(x).latent_dist.mode()
        return self.normalise(z)

    def _decode(self, latents: Tensor) -> Tensor:
        z = self.denormalise(latents).to(device=self.vae_device, dtype=self.vae_dtype)
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)

    def stream_decoder(self) -> StreamingDecoder:
        return WanStreamingDecoder(self)


class WanStreamingDecoder(StreamingDecoder):
    """Chunked Wan VAE decoding that carries the causal convolutions' temporal cache between chunks.

    The diffusers decoder processes one latent frame per call and keeps, per causal conv, the last input frames in a
    list (`feat_cache`); this object owns such a list for its video, so chunked decoding is exact.
    """

    def __init__(self, autoencoder: WanVideoAutoencoder) -> None:
        super().__init__(autoencoder)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.num_causal_convs = sum(isinstance(m, WanCausalConv3d) for m in autoencoder.vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.feature_cache: list = [None] * self.num_causal_convs

    def _decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        ae: WanVideoAutoencoder = self.autoencoder
        vae = ae.vae
        z = ae.denormalise(latents).to(device=ae.vae_device, dtype=ae.vae_dtype)
        x = vae.post_quant_conv(z)  # kernel size 1: no temporal state
        frames = []
        for i in range(x.shape[2]):
            kwargs = {"first_chunk": True} if (first and i == 0 and ae._decoder_takes_first_chunk) else {}
            frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self.feature_cache, feat_idx=[0], **kwargs))
        out = torch.cat(frames, dim=2)
        patch_size = getattr(vae.config, "patch_size", None)
        if patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=patch_size)
        return out.float().clamp(-1.0, 1.0)


def _dct_matrix(size: int) -> Tensor:
    """Orthonormal DCT-II basis `[size (frequency), size (position)]`."""
    n = torch.arange(size, dtype=torch.float64)
    rows = []
    for u in range(size):
        scale = math.sqrt((1.0 if u == 0 else 2.0) / size)
        rows.append(scale * torch.cos(math.pi * (2 * n + 1) * u / (2 * size)))
    return torch.stack(rows)


def toy_patch_basis(latent_channels: int, patch_size: int) -> Tensor:
    """Orthonormal projection basis `[latent_channels, 3, s, s]` for the toy autoencoder.

    Channels 0-2: the constant patch of one colour (R, G, B), scaled to unit norm, so they carry `s * patch mean`.
    Further channels: zero-mean 2D DCT patterns in zig-zag order (low frequencies first), first on the luminance
    direction (1, 1, 1)/sqrt(3), then on the chroma directions (1, -1, 0)/sqrt(2) and (1, 1, -2)/sqrt(6).
    """
    s = patch_size
    if not 3 <= latent_channels <= 3 * s * s:
        raise ValueError(
            f"ToyAutoencoder needs 3 <= latent_channels <= 3 * spatial_factor**2 = {3 * s * s}, got {latent_channels}.")
    dct = _dct_matrix(s)
    frequencies = sorted(((u, v) for u in range(s) for v in range(s) if (u, v) != (0, 0)),
                         key=lambda uv: (uv[0] + uv[1], uv[0]))
    colour_directions = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    colour_directions = colour_directions / colour_directions.norm(dim=1, keepdim=True)
    constant = torch.outer(dct[0], dct[0])
    basis = [torch.eye(3, dtype=torch.float64)[c][:, None, None] * constant for c in range(3)]
    for direction in colour_directions:
        for u, v in frequencies:
            if len(basis) == latent_channels:
                break
            basis.append(direction[:, None, None] * torch.outer(dct[u], dct[v]))
    return torch.stack(basis[:latent_channels]).float()


class ToyAutoencoder(VideoAutoencoder):
    """Exact, parameter-free autoencoder for CPU runs: `encode(decode(z)) == z`.

    Spatially each s x s x 3 patch is projected onto `toy_patch_basis` (decode = transpose). Temporally, encode averages
    pixel-frame groups [1, 4, 4, ...] and decode maps latent 0 to one frame and every later latent to 4 equal frames.
    `encode(decode(z)) == z` holds up to float rounding whenever `decode(z)` lies inside [-1, 1] (decode clamps), and
    always with `clamp_output=False`. Patch-wise flat colours, constant over each group of frames, survive
    `decode(encode(video))` exactly.

    Normalisation `(z - mean_c) / std_c`. `normalization="synthetic"` uses mean 0, std `s / sqrt(3)` for the colour
    channels (exactly unit variance for patches of a uniformly random colour: 4.619 at s = 8) and std `s / 8` for
    the pattern channels (1.0 at s = 8; edges and period-8 textures give pattern coefficients of order 0.2-1.5);
    `"none"` uses mean 0, std 1. Explicit `latents_mean`/`latents_std` override either.
    With `temporal_factor != 4` pass it to the static `num_latent_frames`/`num_pixel_frames` (their default is 4).
    """

    def __init__(self, latent_channels: int = 4, spatial_factor: int = 8, temporal_factor: int = 4,
                 normalization: str = "synthetic", latents_mean: Sequence[float] | None = None,
                 latents_std: Sequence[float] | None = None, clamp_output: bool = True) -> None:
        super().__init__()
        if spatial_factor < 1 or temporal_factor < 1:
            raise ValueError(
                f"spatial_factor and temporal_factor must be >= 1, got {spatial_factor} and {temporal_factor}.")
        self.latent_channels = latent_channels
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.clamp_output = clamp_output
        self.register_buffer("basis", toy_patch_basis(latent_channels, spatial_factor), persistent=False)

        if normalization == "synthetic":
            std = [spatial_factor / math.sqrt(3.0)] * 3 + [spatial_factor / 8.0] * (latent_channels - 3)
        elif normalization == "none":
            std = [1.0] * latent_channels
        else:
            raise ValueError(f"normalization must be 'synthetic' or 'none', got {normalization!r}.")
        mean = [0.0] * latent_channels
        mean = list(latents_mean) if latents_mean is not None else mean
        std = list(latents_std) if latents_std is not None else std
        if len(mean) != latent_channels or len(std) != latent_channels:
            raise ValueError(
                f"latents_mean/latents_std need {latent_channels} entries (one per latent channel), "
                f"got {len(mean)}/{len(std)}.")
        if any(v <= 0 for v in std):
            raise ValueError(f"latents_std must be positive, got {std}.")
        shape = (1, latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)
        self.freeze()

    def _temporal_pool(self, video: Tensor) -> Tensor:
        """`[B, 3, 1 + f*k, H, W]` -> `[B, 3, 1 + k, H, W]`: frame 0 alone, then means over groups of f frames."""
        b, c, t, h, w = video.shape
        f = self.temporal_factor
        rest = video[:, :, 1:].reshape(b, c, (t - 1) // f, f, h, w).mean(dim=3)
        return torch.cat([video[:, :, :1], rest], dim=2)

    def _temporal_repeat(self, frames: Tensor, first: bool) -> Tensor:
        """`[B, 3, n, H, W]` -> `[B, 3, 1 + f(n-1) or f*n, H, W]`: the first latent of a video gives one frame."""
        repeated = frames.repeat_interleave(self.temporal_factor, dim=2)
        return repeated[:, :, self.temporal_factor - 1:] if first else repeated

    def _encode(self, video: Tensor) -> Tensor:
        pooled = self._temporal_pool(video.float())
        b, _, n, height, width = pooled.shape
        s = self.spatial_factor
        patches = pooled.reshape(b, 3, n, height // s, s, width // s, s)
        z = torch.einsum("bcnhywx,kcyx->bknhw", patches, self.basis.to(patches.device))
        return (z - self.latents_mean.to(z.device)) / self.latents_std.to(z.device)

    def decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        """Decode latents `[B, C, n, h, w]`; `first` says whether they start the video (its 1-frame latent)."""
        z = latents.float() * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        b, _, n, h, w = z.shape
        s = self.spatial_factor
        patches = torch.einsum("bknhw,kcyx->bcnhywx", z, self.basis.to(z.device))
        frames = self._temporal_repeat(patches.reshape(b, 3, n, h * s, w * s), first)
        return frames.clamp(-1.0, 1.0) if self.clamp_output else frames

    def _decode(self, latents: Tensor) -> Tensor:
        return self.decode_chunk(latents, first=True)

    def stream_decoder(self) -> StreamingDecoder:
        return ToyStreamingDecoder(self)


class ToyStreamingDecoder(StreamingDecoder):
    """Chunked decoding for `ToyAutoencoder` (stateless apart from whether the first latent was seen)."""

    def _decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        return self.autoencoder.decode_chunk(latents, first=first)


# --------------------------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------------------------


def clean_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends (Wan's prompt cleaning)."""
    return re.sub(r"\s+", " ", text).strip()


def _text_encoder_folders(folder: str | Path, tokenizer_folder: str | Path | None) -> tuple[Path, Path]:
    root = Path(folder).expanduser()
    fix = (f"Download {WAN_DIFFUSERS_REPO} and pass its root (with text_encoder/ and tokenizer/), or a folder with a "
           "UMT5 encoder (config.json + *.safetensors) and its tokenizer files.")
    if not root.is_dir():
        raise FileNotFoundError(f"Text encoder folder {str(root)!r} does not exist. {fix}")
    model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    if tokenizer_folder is not None:
        tokenizer_dir = Path(tokenizer_folder).expanduser()
    else:
        tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
    _require_files(model_dir, "UMT5 text encoder", fix, "*.safetensors", "*.bin", "*.safetensors.index.json")
    tokenizer_files = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
    if not tokenizer_dir.is_dir() or not any((tokenizer_dir / f).is_file() for f in tokenizer_files):
        raise FileNotFoundError(
            f"Tokenizer folder {str(tokenizer_dir)!r} is missing or holds none of {', '.join(tokenizer_files)}. "
            f"Put the google/umt5-xxl tokenizer there (the tokenizer/ folder of {WAN_DIFFUSERS_REPO}).")
    return model_dir, tokenizer_dir


class UMT5TextEncoder(TextEncoder):
    """umT5 encoder (transformers `UMT5EncoderModel`): whitespace-cleaned prompts, special tokens added, padded to
    `max_length`, and the hidden states of padded positions set to 0 (method §A.2)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 512, cache_size: int = 64) -> None:
        super().__init__(cache_size=cache_size)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.d_model)
        self.freeze()

    @classmethod
    def from_pretrained(cls, folder: str | Path, max_length: int = 512, dtype: str | torch.dtype = torch.float32,
                        tokenizer_folder: str | Path | None = None, cache_size: int = 64) -> "UMT5TextEncoder":
        """Load from a local folder: a Wan-Diffusers root (`text_encoder/` + `tokenizer/`) or a model folder."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir, tokenizer_dir = _text_encoder_folders(folder, tokenizer_folder)
        model = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=resolve_dtype(dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        return cls(model, tokenizer, max_length=max_length, cache_size=cache_size)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> (input_ids `[B, max_length]`, attention_mask `[B, max_length]`), on the model's device."""
        batch = self.tokenizer(
            [clean_whitespace(p) for p in prompts], padding="max_length", truncation=True,
            max_length=self.max_length, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def _embed(self, prompts: list[str]) -> Tensor:
        input_ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)


class HashedTextEncoder(TextEncoder):
    """Toy text encoder: lower-cased words, hashed with CRC32 into a fixed seeded random table `[vocab_size, dim]`.

    Word i of a prompt gives row `crc32(word) % vocab_size` at position i; words past `max_length` are dropped and
    padding positions are 0. Identical across processes and runs (no Python `hash()`, table from a seeded generator).
    """

    def __init__(self, dim: int = 32, max_length: int = 8, vocab_size: int = 1024, seed: int = 0,
                 cache_size: int = 64) -> None:
        super().__init__(cache_size=cache_size)
        if dim < 1 or max_length < 1 or vocab_size < 1:
            raise ValueError(f"dim, max_length and vocab_size must be >= 1, got {dim}, {max_length}, {vocab_size}.")
        self.dim = dim
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(vocab_size, dim, generator=generator), persistent=False)
        self.freeze()

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of the first `max_length` lower-cased words of prompt."""
        words = re.findall(r"\w+", prompt.lower())[: self.max_length]
        return [zlib.crc32(word.encode("utf-8")) % self.vocab_size for word in words]

    def _embed(self, prompts: list[str]) -> Tensor:
        out = self.table.new_zeros(len(prompts), self.max_length, self.dim)
        for i, prompt in enumerate(prompts):
            ids = self.token_ids(prompt)
            if ids:
                out[i, : len(ids)] = self.table[torch.tensor(ids, device=self.table.device)]
        return out


# --------------------------------------------------------------------------------------------------------------------
# Factories (for YAML configs)
# --------------------------------------------------------------------------------------------------------------------


def build_autoencoder(name_or_folder: str, dtype: str = "float32", **kwargs) -> VideoAutoencoder:
    """"toy" -> `ToyAutoencoder(**kwargs)`; any other value is a local Wan VAE folder (see `WanVideoAutoencoder`)."""
    if name_or_folder == "toy":
        return ToyAutoencoder(**kwargs)
    if kwargs:
        raise ValueError(f"Unexpected arguments {sorted(kwargs)} for the Wan VAE; only dtype is accepted.")
    return WanVideoAutoencoder.from_pretrained(name_or_folder, dtype=dtype)


def build_text_encoder(name_or_folder: str, dtype: str = "float32", **kwargs) -> TextEncoder:
    """"hashed" (or "toy") -> `HashedTextEncoder(**kwargs)`; any other value is a local umT5 folder
    (see `UMT5TextEncoder.from_pretrained`; kwargs: max_length, tokenizer_folder, cache_size)."""
    if name_or_folder in ("hashed", "toy"):
        return HashedTextEncoder(**kwargs)
    return UMT5TextEncoder.from_pretrained(name_or_folder, dtype=dtype, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# The frozen pair a LightningModule uses
# --------------------------------------------------------------------------------------------------------------------


class FrozenEncoders:
    """The frozen autoencoder and text encoder of a training module, built on first use from their config values
    (``"toy"`` / ``"hashed"`` or local folders; None: not configured, e.g. for pre-encoded batches).

    Not an `nn.Module`: held as a plain attribute, the encoders stay out of the module tree, so they are neither in
    checkpoints nor trained nor partitioned by ZeRO. ``in_dim`` / ``text_dim`` are the DiT's: the encoders must
    give that many latent channels / embedding dims. ``built`` maps the names to the encoders built (or given) so far.
    """

    def __init__(self, autoencoder: str | None, text_encoder: str | None, dtype: str = "float32",
                 autoencoder_args: Mapping[str, Any] | None = None, text_encoder_args: Mapping[str, Any] | None = None,
                 in_dim: int | None = None, text_dim: int | None = None) -> None:
        self.sources = {"autoencoder": autoencoder, "text_encoder": text_encoder}
        self.args = {"autoencoder": dict(autoencoder_args or {}), "text_encoder": dict(text_encoder_args or {})}
        self.dtype, self.in_dim, self.text_dim = dtype, in_dim, text_dim
        self.built: dict[str, nn.Module] = {}

    def build(self) -> None:
        """Build every configured encoder that is not built yet, then `check_fit`."""
        for name, factory in (("autoencoder", build_autoencoder), ("text_encoder", build_text_encoder)):
            if name not in self.built and self.sources[name] is not None:
                self.built[name] = factory(self.sources[name], dtype=self.dtype, **self.args[name])
        self.check_fit()

    def check_fit(self) -> None:
        """Raise if a built encoder does not fit the DiT's ``in_dim`` / ``text_dim``."""
        ae, te = self.built.get("autoencoder"), self.built.get("text_encoder")
        if ae is not None and self.in_dim is not None and ae.latent_channels != self.in_dim:
            raise ValueError(f"the autoencoder has {ae.latent_channels} latent channels but the DiT takes "
                             f"in_dim={self.in_dim}; make network.in_dim/out_dim match the autoencoder")
        if te is not None and self.text_dim is not None and te.dim != self.text_dim:
            raise ValueError(f"the text encoder gives {te.dim}-dim embeddings but the DiT has text_dim="
                             f"{self.text_dim}; make network.text_dim match the text encoder")

    def get(self, name: str, device: torch.device | str, purpose: str) -> nn.Module:
        """The encoder ``name`` (``"autoencoder"`` / ``"text_encoder"``), built if needed and moved to ``device``;
        ``purpose`` says what needs it in the error raised when it is not configured."""
        self.build()
        encoder = self.built.get(name)
        if encoder is None:
            raise ValueError(f"no {name} configured, but one is needed to {purpose}; set model.{name} "
                             "(e.g. 'toy'/'hashed' or a local folder)")
        reference = next(iter([*encoder.parameters(), *encoder.buffers()]), None)
        if reference is not None and reference.device != torch.device(device):
            encoder.to(device)
        return encoder
