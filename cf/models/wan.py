"""Wan2.1 text-to-video DiT: the bidirectional model (teacher, critic) and the causal chunked model (student).

Parameter names are exactly those of the original Wan2.1 checkpoints (method.md §A.7), so a released
`diffusion_pytorch_model.safetensors` loads with `strict=True`; `cf.weights` converts the diffusers layout.
The forward pass follows §A.4. Sequences are never padded to a fixed length (§I.30).

Numerics (§A.6) follow the original Wan2.1 code under bf16: the residual stream between and inside the blocks, the
time embedding (sinusoid → MLP → projection), the modulation arithmetic and the norms stay in fp32; each sub-layer
(self-attention, cross-attention, FFN, head projection) gets its input cast to the dtype of its weights and its
output is upcast before the gated fp32 residual add. With fp32 weights all these casts are no-ops.

Shapes: latents x [B, C, T, H, W]; timesteps t [B] (one per sample) or [B, T] (one per latent frame), t = 1000·σ;
text context [B, L, text_dim]. The output is the flow (velocity) prediction v ≈ noise − x0, shaped like x.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cf.models.attention import attention, block_causal_block_mask, block_causal_mask
from cf.models.kv_cache import KVCache, KVWindow
from cf.models.rope import RotaryEmbedding3D, apply_rotary


@dataclass
class WanConfig:
    """Wan2.1 DiT hyper-parameters, with the field names of Wan's own config."""

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_positions: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        minimum = {"dim": 1, "ffn_dim": 1, "freq_dim": 2, "text_dim": 1, "text_len": 1, "in_dim": 1, "out_dim": 1,
                   "num_heads": 1, "num_layers": 1, "rope_max_positions": 1}
        for name, least in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"network.{name} must be an integer >= {least}, got {value!r}; fix network.{name} "
                                 "in the config (Wan2.1-T2V-1.3B: WanConfig.wan2_1_1_3b())")
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ValueError(f"network.patch_size must be three integers >= 1 (t, h, w), got {self.patch_size}")
        if not (self.eps > 0 and self.rope_theta > 0):
            raise ValueError(f"network.eps and network.rope_theta must be > 0, got {self.eps} and {self.rope_theta}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head_dim = dim / num_heads = {self.dim // self.num_heads} must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def wan2_1_1_3b(cls) -> "WanConfig":
        """Wan2.1-T2V-1.3B (§A.3)."""
        return cls()

    @classmethod
    def tiny(cls) -> "WanConfig":
        """The toy DiT of §J.1: 2 layers, dim 64, 2 heads (head_dim 32), 4 latent channels."""
        return cls(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=8, in_dim=4, out_dim=4, num_heads=2,
                   num_layers=2)

    @classmethod
    def toy_base(cls) -> "WanConfig":
        """The embedded toy's base DiT (configs/toy/base.yaml, weights in configs/toy/base/): 4 layers, dim 128,
        2 heads, 16 text tokens; 1.07 M parameters, 16 tokens per 8x8 latent frame."""
        return cls(dim=128, ffn_dim=384, freq_dim=32, text_dim=32, text_len=16, in_dim=4, out_dim=4, num_heads=2,
                   num_layers=4)

    PRESETS = ("wan2.1-1.3b", "tiny", "toy-base")

    @classmethod
    def preset(cls, name: str) -> "WanConfig":
        """A config by name (YAML ``network: wan2.1-1.3b``): wan2.1-1.3b | tiny | toy-base."""
        presets = {"wan2.1-1.3b": cls.wan2_1_1_3b, "tiny": cls.tiny, "toy-base": cls.toy_base}
        if name not in presets:
            raise ValueError(f"unknown WanConfig preset {name!r}; choose one of {sorted(presets)} or give the fields")
        return presets[name]()

    def to_dict(self) -> dict:
        return asdict(self)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width, computed in fp32 (weight key: `weight`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine parameters included) and cast back."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def _without_autocast(x: Tensor) -> Any:
    """A context that switches off an active autocast on x's device (it would lower fp32 matmuls to bf16)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return nullcontext()


class WanFp32Linear(nn.Linear):
    """nn.Linear computed in fp32 whatever its parameters' dtype or an active autocast (the time embedding)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.float() if self.bias is not None else None
        with _without_autocast(x):
            return F.linear(x.float(), self.weight.float(), bias)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[cos, sin] features of timesteps t (any shape) with frequencies 10000^(-i/(dim/2)), in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, L, D] * (1 + scale) + shift with shift/scale [B, Tm, D] broadcast over the L/Tm tokens of each frame."""
    b, length, d = x.shape
    tm = shift.shape[1]
    out = x.view(b, tm, length // tm, d) * (1 + scale[:, :, None]) + shift[:, :, None]
    return out.view(b, length, d)


def gate(x: Tensor, g: Tensor) -> Tensor:
    """x [B, L, D] * g [B, Tm, D] per frame."""
    b, length, d = x.shape
    tm = g.shape[1]
    return (x.view(b, tm, length // tm, d) * g[:, :, None]).view(b, length, d)


class WanAttentionProjections(nn.Module):
    """q, k, v, o projections with RMSNorm on the full-width q and k (key names of Wan2.1's attention modules)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def key_value(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Un-rotated keys and values [B, L, H, Dh] of h [B, L, D]."""
        return self._heads(self.norm_k(self.k(h))), self._heads(self.v(h))


class WanSelfAttention(WanAttentionProjections):
    def forward(
        self,
        h: Tensor,
        rope: tuple[Tensor, Tensor],
        context: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """h [B, L, D]; rope: cos/sin tables of h's tokens; context: extra (rotated keys, values) [B, Lc, H, Dh]
        attended besides h's own; kv: h's own un-rotated (keys, values) when already computed."""
        q = apply_rotary(self._heads(self.norm_q(self.q(h))), *rope)
        k, v = kv if kv is not None else self.key_value(h)
        k = apply_rotary(k, *rope)
        if context is not None:
            k = torch.cat([context[0].to(k.dtype), k], dim=1)
            v = torch.cat([context[1].to(v.dtype), v], dim=1)
        return self.o(attention(q, k, v, mask).flatten(2))


class WanCrossAttention(WanAttentionProjections):
    def text_key_value(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, L_text, H, Dh] of the embedded text [B, L_text, D] (cacheable per video)."""
        return self.key_value(text)

    def forward(self, x: Tensor, text_kv: tuple[Tensor, Tensor]) -> Tensor:
        return self.o(attention(self._heads(self.norm_q(self.q(x))), *text_kv).flatten(2))


class WanBlock(nn.Module):
    """One DiT block (§A.4 step 4). norm1/norm2 carry no parameters; norm3 is the cross-attention input norm."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = WanLayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(d, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def modulation_terms(self, e0: Tensor) -> tuple[Tensor, ...]:
        """(shift1, scale1, gate1, shift2, scale2, gate2), each [B, Tm, D] in fp32, from e0 [B, Tm, 6, D]."""
        return tuple((self.modulation.float()[:, None] + e0.float()).unbind(2))

    def self_attn_input(self, x: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """LN(x)·(1 + scale1) + shift1 in fp32, cast to the self-attention's weight dtype."""
        return modulate(self.norm1(x).float(), mods[0], mods[1]).to(self.self_attn.q.weight.dtype)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        text_kv: tuple[Tensor, Tensor],
        rope: tuple[Tensor, Tensor],
        context: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        key_value_only: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x [B, L, D] -> x in fp32 (the residual stream); with `key_value_only` the self-attention's own
        un-rotated (keys, values) instead, in its weight dtype.

        Everything goes through this forward so that sharded parameters (ZeRO-3) are gathered by its hooks."""
        x = x.float()
        mods = self.modulation_terms(e0)
        if key_value_only:
            return self.self_attn.key_value(self.self_attn_input(x, mods))
        y = self.self_attn(self.self_attn_input(x, mods), rope, context, mask, kv)
        x = x + gate(y.float(), mods[2])
        x = x + self.cross_attn(self.norm3(x).to(self.cross_attn.q.weight.dtype), text_kv).float()
        y = self.ffn(modulate(self.norm2(x).float(), mods[3], mods[4]).to(self.ffn[0].weight.dtype))
        return x + gate(y.float(), mods[5])


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, D] (fp32 residual stream); e [B, Tm, D] the pre-projection time embedding.
        Returns [B, L, pt·ph·pw·C] in the projection's weight dtype."""
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).unbind(2)
        return self.head(modulate(self.norm(x).float(), shift, scale).to(self.head.weight.dtype))


class WanDiT(nn.Module):
    """Bidirectional Wan2.1 DiT (teacher and critic): full attention over all frames, contiguous positions."""

    def __init__(self, config: WanConfig | None = None) -> None:
        super().__init__()
        cfg = config or WanConfig()
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(WanFp32Linear(cfg.freq_dim, d), nn.SiLU(), WanFp32Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), WanFp32Linear(d, 6 * d))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg)
        self.rope = RotaryEmbedding3D(cfg.head_dim, cfg.rope_max_positions, cfg.rope_theta)
        self.gradient_checkpointing = False

    # ----------------------------------------------------------------------------------------------- helpers
    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (activation memory O(1) in depth)."""
        self.gradient_checkpointing = enabled

    def _check_latents(self, x: Tensor) -> tuple[int, int, int]:
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be latents [B, {cfg.in_dim}, T, H, W], got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if t % pt or h % ph or w % pw:
            raise ValueError(
                f"latent size (T, H, W) = {(t, h, w)} must be divisible by the patch size {cfg.patch_size}"
            )
        return t // pt, h // ph, w // pw

    def _check_context(self, context: Tensor, batch: int) -> None:
        cfg = self.config
        if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be text embeddings [B={batch}, L, {cfg.text_dim}], got shape {tuple(context.shape)}"
            )

    def _frame_timesteps(self, t: Tensor, batch: int, frames: int) -> Tensor:
        """Timesteps as [B, 1] (one per sample) or [B, frames] (one per latent frame)."""
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1 and t.shape[0] == batch:
            return t[:, None]
        if t.dim() == 2 and t.shape[0] == batch and t.shape[1] == frames:
            if self.config.patch_size[0] != 1:
                raise ValueError("per-frame timesteps need a temporal patch size of 1")
            return t
        raise ValueError(f"t must have shape [B={batch}] or [B={batch}, T={frames}], got {tuple(t.shape)}")

    def time_embeddings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """e [B, Tm, D] (for the head) and e0 [B, Tm, 6, D] (block modulation) from timesteps [B, Tm], in fp32."""
        e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim).float())
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0

    def text_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer cross-attention keys/values of text embeddings [B, L, text_dim]; compute once per video."""
        text = self.text_embedding(context)
        return [block.cross_attn.text_key_value(text) for block in self.blocks]

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> tokens [B, T'·h·w, D] in (t, h, w) row-major order, in fp32 (the residual stream)."""
        return self.patch_embedding(x).flatten(2).transpose(1, 2).float()

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Head output [B, L, pt·ph·pw·C] -> [B, C, T, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        b = tokens.shape[0]
        out = tokens.view(b, f, h, w, pt, ph, pw, self.config.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.config.out_dim, f * pt, h * ph, w * pw)

    def _run_block(self, block: WanBlock, *args) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _text_kv_list(self, context: Tensor | list, batch: int) -> list[tuple[Tensor, Tensor]]:
        if isinstance(context, Tensor):
            self._check_context(context, batch)
            return self.text_kv(context)
        return context

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor, context: Tensor, frame_positions: Tensor | None = None) -> Tensor:
        """Flow prediction for all frames with full attention.

        x [B, C, T, H, W]; t [B] or [B, T]; context [B, L, text_dim] (or precomputed `text_kv`);
        frame_positions: optional [B, T] temporal RoPE positions (default 0 … T−1, contiguous, §D.3).
        """
        return self._forward_sequence(x, t, context, frame_positions)

    def _forward_sequence(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | list,
        frame_positions: Tensor | None = None,
        attention_mask: Callable[[tuple[int, int, int]], Any] | None = None,
    ) -> Tensor:
        """All frames in one pass; `attention_mask(grid)` builds the self-attention mask (None: full attention)."""
        grid = self._check_latents(x)
        b = x.shape[0]
        tt = self._frame_timesteps(t, b, grid[0])
        text_kv = self._text_kv_list(context, b)
        if frame_positions is None:
            frame_positions = torch.arange(grid[0], device=x.device).expand(b, grid[0])
        rope = self.rope.tables(frame_positions, grid[1:])
        mask = attention_mask(grid) if attention_mask is not None else None
        e, e0 = self.time_embeddings(tt)
        tokens = self.patchify(x)
        for block, kv in zip(self.blocks, text_kv):
            tokens = self._run_block(block, tokens, e0, kv, rope, None, mask)
        return self.unpatchify(self.head(tokens, e), grid)


class CausalWanDiT(WanDiT):
    """The causal student: same parameters as `WanDiT`, per-frame timesteps, chunk-by-chunk generation.

    - `forward_block_causal`: the whole sequence at once with the block-causal mask of §B.1 (training without a
      cache, e.g. the ODE initialisation).
    - `forward_chunk`: one chunk through an external K/V cache (`cf.models.kv_cache.KVCache`), which decides what
      the chunk attends to and at which temporal positions (growing cache, Slow-Fast Memory, sliding window, …).
    """

    def __init__(self, config: WanConfig | None = None, frames_per_chunk: int = 3) -> None:
        super().__init__(config)
        if frames_per_chunk <= 0:
            raise ValueError(f"frames_per_chunk must be positive, got {frames_per_chunk}")
        self.frames_per_chunk = frames_per_chunk

    def forward(self, x: Tensor, t: Tensor, context: Tensor, frame_positions: Tensor | None = None) -> Tensor:
        """Block-causal full-sequence forward (see `forward_block_causal`)."""
        return self.forward_block_causal(x, t, context)

    def forward_block_causal(
        self, x: Tensor, t: Tensor, context: Tensor, local_window_frames: int | None = None
    ) -> Tensor:
        """x [B, C, T, H, W]; t [B] or [B, T]; each chunk of `frames_per_chunk` frames sees itself and the chunks
        before it (and only the last `local_window_frames` frames when given). Absolute positions 0 … T−1."""

        def block_causal(grid: tuple[int, int, int]) -> Any:
            build = block_causal_block_mask if x.is_cuda else block_causal_mask
            return build(grid[0], grid[1] * grid[2], self.frames_per_chunk, local_window_frames, x.device)

        return self._forward_sequence(x, t, context, attention_mask=block_causal)

    def forward_chunk(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | list[tuple[Tensor, Tensor]],
        cache: KVCache,
        start_frame: int,
        commit: bool = False,
    ) -> Tensor:
        """Flow prediction for one chunk x [B, C, n, H, W] starting at latent frame `start_frame`.

        t: [B] or [B, n]; context: text embeddings or `text_kv(context)`; the chunk's keys/values are written to
        `cache` (detached, un-rotated) and it attends to the context window the cache returns plus itself.
        `commit=True` marks the clean pass that fixes the chunk's final K/V (the cache may consolidate on it).
        """
        grid = self._check_latents(x)
        b = x.shape[0]
        n = grid[0]
        tt = self._frame_timesteps(t, b, n)
        text_kv = self._text_kv_list(context, b)
        e, e0 = self.time_embeddings(tt)
        tokens = self.patchify(x)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        tables: dict[Any, tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]] = {}  # RoPE tables per positions_key

        def rope_tables(window: KVWindow) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
            """(key tables, query tables) of a window, computed once per call for windows with equal positions."""
            key = window.positions_key
            if key is None or key not in tables:
                with torch.no_grad():
                    made = (self.rope.tables(window.key_positions, grid[1:]),
                            self.rope.tables(window.query_positions, grid[1:]))
                if key is None:
                    return made
                tables[key] = made
            return tables[key]

        cache.begin_call(start_frame, n, commit=commit)
        for i, (block, tkv) in enumerate(zip(self.blocks, text_kv)):
            # The cache write happens here, outside any checkpointed region (§I.17); with checkpointing the
            # block recomputes its own keys/values with grad inside.
            with torch.no_grad() if checkpointing else nullcontext():
                own_kv = block(tokens, e0, tkv, None, key_value_only=True)
            window = cache.update(i, own_kv[0].detach(), own_kv[1].detach())
            ctx_rope, rope = rope_tables(window)
            with torch.no_grad():
                # a checkpointed block recomputes its forward from these tensors during backward, after later
                # chunks have overwritten the cache: give it a copy, not a view (rotation already copies the keys)
                values = window.values.clone() if checkpointing else window.values
                ctx = (apply_rotary(window.keys, *ctx_rope), values)
            if checkpointing:
                tokens = checkpoint(block, tokens, e0, tkv, rope, ctx, None, None, use_reentrant=False)
            else:
                tokens = block(tokens, e0, tkv, rope, ctx, None, own_kv)
        cache.end_call()
        return self.unpatchify(self.head(tokens, e), grid)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["WanConfig", "WanDiT", "CausalWanDiT", "WanBlock", "sinusoidal_embedding", "count_parameters"]
