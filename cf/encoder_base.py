"""The interfaces of the frozen encoders (`cf.encoders` has the implementations, the factories and the holder):
`VideoAutoencoder` (pixels <-> normalised latents, with a `StreamingDecoder` per video), `TextEncoder` (prompts ->
zero-padded embeddings), the `FrozenByDefault` module they share, and `resolve_dtype` for dtype names in configs.

Shapes: pixels `[B, 3, T, H, W]` in [-1, 1] with `T = 1 + 4k`; latents `[B, C, 1 + k, H/s, W/s]`, normalised per
channel; text embeddings `[B, max_length, dim]` with the positions past the true token count exactly 0.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = ["FrozenByDefault", "StreamingDecoder", "TextEncoder", "VideoAutoencoder", "resolve_dtype"]

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
