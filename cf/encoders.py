"""Frozen video autoencoders and text encoders: the real ones (Wan2.1 VAE, umT5) and exact toys.

Shapes: pixels `[B, 3, T, H, W]` in [-1, 1] with `T = 1 + 4k`; latents `[B, C, 1 + k, H/s, W/s]`, normalised per
channel; text embeddings `[B, max_length, dim]` with the positions past the true token count exactly 0.
"""

from __future__ import annotations

import inspect
import math
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

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

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn "bfloat16"/"bf16"/"float32"/... (as written in YAML configs) or a torch.dtype into a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or a torch.dtype.")
    return _DTYPES[name]


class FrozenByDefault(nn.Module):
    """A module that starts frozen: no trainable parameters, always in eval mode, computing without autograd.

    `train()` called by a parent (e.g. a LightningModule) leaves a frozen module in eval mode, so dropout stays off.
    `unfreeze()` restores normal behaviour (gradients, train/eval switching).
    """

    def __init__(self) -> None:
        super().__init__()
        self.frozen = True

    def freeze(self) -> "FrozenByDefault":
        """Disable gradients and keep the module in eval mode."""
        self.frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> "FrozenByDefault":
        """Enable gradients for all parameters and allow train/eval switching."""
        self.frozen = False
        self.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> "FrozenByDefault":
        return super().train(False if self.frozen else mode)

    def _grad_context(self) -> torch.set_grad_enabled:
        """Autograd on only when it is on outside and the module is not frozen."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)


# --------------------------------------------------------------------------------------------------------------------
# Video autoencoders
# --------------------------------------------------------------------------------------------------------------------


class StreamingDecoder:
    """Decodes a latent sequence chunk by chunk; each call returns only the new pixel frames.

    The first chunk of n latents gives `1 + 4(n - 1)` pixel frames, every later chunk `4n`. The concatenation over
    all chunks equals `VideoAutoencoder.decode` of the whole sequence.
    """

    def __init__(self, autoencoder: "VideoAutoencoder") -> None:
        self.autoencoder = autoencoder
        self.num_latents_seen = 0

    def reset(self) -> None:
        """Forget the decoded history: the next call starts a new video."""
        self.num_latents_seen = 0

    def __call__(self, latents: Tensor) -> Tensor:
        """latents `[B, C, n, h, w]` (normalised) -> new pixel frames `[B, 3, 1 + 4(n-1) or 4n, h*s, w*s]`."""
        self.autoencoder.check_latents(latents)
        with self.autoencoder._grad_context():
            pixels = self._decode_chunk(latents, first=self.num_latents_seen == 0)
        self.num_latents_seen += latents.shape[2]
        return pixels

    def _decode_chunk(self, latents: Tensor, first: bool) -> Tensor:
        raise NotImplementedError


class VideoAutoencoder(FrozenByDefault):
    """Base class: 1 + 4k pixel frames <-> 1 + k normalised latent frames (the first latent covers one frame)."""

    latent_channels: int
    temporal_factor: int = 4
    spatial_factor: int

    @staticmethod
    def num_latent_frames(num_pixel_frames: int, temporal_factor: int = 4) -> int:
        """Latent frames for `T = 1 + 4k` pixel frames: `(T - 1) // 4 + 1`."""
        if num_pixel_frames < 1 or (num_pixel_frames - 1) % temporal_factor != 0:
            lower = max(1, 1 + (num_pixel_frames - 1) // temporal_factor * temporal_factor)
            raise ValueError(
                f"A video of {num_pixel_frames} pixel frames cannot be encoded: the frame count must be "
                f"1 + {temporal_factor}k (e.g. 81). Trim the clip to {lower} or pad it to "
                f"{lower + temporal_factor} frames."
            )
        return (num_pixel_frames - 1) // temporal_factor + 1

    @staticmethod
    def num_pixel_frames(num_latent_frames: int, temporal_factor: int = 4) -> int:
        """Pixel frames decoded from n latent frames: `1 + 4(n - 1)`."""
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}.")
        return 1 + temporal_factor * (num_latent_frames - 1)

    def check_video(self, video: Tensor) -> None:
        """Raise a clear error unless video is `[B, 3, 1 + 4k, H, W]` with H, W multiples of the spatial factor."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(
                f"Expected a video of shape [B, 3, T, H, W] (channels second), got {tuple(video.shape)}. "
                "Permute [B, T, 3, H, W] inputs with video.transpose(1, 2)."
            )
        self.num_latent_frames(video.shape[2], self.temporal_factor)
        height, width = video.shape[-2:]
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(
                f"Video height and width ({height}x{width}) must be multiples of the spatial factor {s}; "
                f"resize or crop to {height // s * s}x{width // s * s}."
            )

    def check_latents(self, latents: Tensor) -> None:
        """Raise a clear error unless latents are `[B, latent_channels, n, h, w]`."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"Expected latents of shape [B, {self.latent_channels}, n, h, w] (channels second), got "
                f"{tuple(latents.shape)}. Permute [B, n, C, h, w] latents with latents.transpose(1, 2)."
            )
        if latents.shape[2] < 1:
            raise ValueError("Cannot decode an empty latent sequence (n = 0).")

    def encode(self, video: Tensor) -> Tensor:
        """video `[B, 3, 1+4k, H, W]` in [-1, 1] -> normalised latents `[B, C, 1+k, H/s, W/s]` (float32)."""
        self.check_video(video)
        with self._grad_context():
            return self._encode(video)

    def decode(self, latents: Tensor) -> Tensor:
        """normalised latents `[B, C, n, h, w]` -> pixels `[B, 3, 1+4(n-1), h*s, w*s]` in [-1, 1] (float32)."""
        self.check_latents(latents)
        with self._grad_context():
            return self._decode(latents)

    def stream_decoder(self) -> StreamingDecoder:
        """A fresh decoder for one video, to be called with successive latent chunks."""
        raise NotImplementedError(f"{type(self).__name__} does not implement stream_decoder().")

    def _encode(self, video: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement encoding.")

    def _decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement decoding.")


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


class TextEncoder(FrozenByDefault):
    """Base class: prompts -> `[B, max_length, dim]` embeddings, positions past the true token count exactly 0."""

    dim: int
    max_length: int

    def __init__(self, cache_size: int = 64) -> None:
        super().__init__()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def forward(self, prompts: list[str]) -> Tensor:
        """prompts (B strings) -> embeddings `[B, max_length, dim]`."""
        if isinstance(prompts, str):
            raise TypeError("TextEncoder expects a list of prompts; wrap a single prompt as [prompt].")
        with self._grad_context():
            return self._embed(list(prompts))

    def embed_cached(self, prompts: list[str]) -> Tensor:
        """Like `forward` but remembers the last `cache_size` distinct prompts (e.g. the negative prompt).

        Cached embeddings are detached; use `forward` when gradients through the encoder are needed.
        """
        if isinstance(prompts, str):
            raise TypeError("embed_cached expects a list of prompts; wrap a single prompt as [prompt].")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            with torch.no_grad():
                new = self._embed(missing)
            for prompt, embedding in zip(missing, new):
                self._cache[prompt] = embedding
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        result = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        """Drop all cached prompt embeddings."""
        self._cache.clear()

    def _apply(self, fn, recurse: bool = True):  # moving or casting the module invalidates cached embeddings
        self._cache.clear()
        return super()._apply(fn, recurse)

    def _embed(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement text encoding.")


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
