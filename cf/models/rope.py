"""3D rotary position embedding of Wan2.1 (method.md §A.5), with explicit temporal positions per frame.

The head dimension's complex pairs are split t : h : w = (c - 2*(c//3)) : c//3 : c//3 with c = head_dim / 2
(22 : 21 : 21 for head_dim 128). A pair is two *adjacent* real elements (x[2j], x[2j+1]). Only the temporal position
is free: bounded positions (§D) give every frame an explicit index instead of its absolute time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs for the (t, h, w) axes."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_frequencies(num_pairs: int, theta: float) -> Tensor:
    """ω_j = θ^(-2j / D_axis), D_axis = 2 * num_pairs, in float64."""
    d_axis = 2 * num_pairs
    return theta ** (-torch.arange(0, d_axis, 2, dtype=torch.float64) / d_axis)


class RotaryEmbedding3D(nn.Module):
    """Angle tables for the three axes; `rotate` applies them to q or k laid out [B, L, H, head_dim].

    The tables are non-persistent buffers (they are not part of Wan checkpoints).
    """

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.pairs = rope_pair_split(head_dim)
        positions = torch.arange(max_positions, dtype=torch.float64)
        for name, n in zip("thw", self.pairs):
            angles = torch.outer(positions, _axis_frequencies(n, theta))  # [P, n] float64
            self.register_buffer(f"cos_{name}", angles.cos().float(), persistent=False)
            self.register_buffer(f"sin_{name}", angles.sin().float(), persistent=False)

    def tables(self, frame_positions: Tensor, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """cos/sin for every token of frames at `frame_positions`.

        frame_positions: [B, F] integer temporal positions; tokens are ordered (frame, y, x) row-major.
        Returns cos, sin of shape [B, F*h*w, 1, head_dim/2].
        """
        if frame_positions.dim() != 2:
            raise ValueError(f"frame_positions must be [B, F], got shape {tuple(frame_positions.shape)}")
        h, w = grid_hw
        pos = frame_positions.long()
        if pos.numel() and pos.device.type == "cpu":
            if int(pos.min()) < 0 or int(pos.max()) >= self.max_positions:
                raise ValueError(
                    f"temporal RoPE positions must lie in [0, {self.max_positions - 1}], got "
                    f"[{int(pos.min())}, {int(pos.max())}]; use bounded positions for long videos"
                )
        elif pos.numel():  # checked on the device, without a host sync in every layer of every call
            torch._assert_async(((pos >= 0) & (pos < self.max_positions)).all(),
                                f"temporal RoPE positions must lie in [0, {self.max_positions - 1}]; use bounded "
                                "positions for long videos")
        if h > self.max_positions or w > self.max_positions:
            raise ValueError(f"latent grid {h}x{w} exceeds the RoPE table size {self.max_positions}")
        b, f = pos.shape
        parts_cos, parts_sin = [], []
        t_cos, t_sin = self.cos_t[pos], self.sin_t[pos]  # [B, F, nt]
        parts_cos.append(t_cos[:, :, None, None].expand(b, f, h, w, -1))
        parts_sin.append(t_sin[:, :, None, None].expand(b, f, h, w, -1))
        parts_cos.append(self.cos_h[:h][None, None, :, None].expand(b, f, h, w, -1))
        parts_sin.append(self.sin_h[:h][None, None, :, None].expand(b, f, h, w, -1))
        parts_cos.append(self.cos_w[:w][None, None, None, :].expand(b, f, h, w, -1))
        parts_sin.append(self.sin_w[:w][None, None, None, :].expand(b, f, h, w, -1))
        cos = torch.cat(parts_cos, dim=-1).reshape(b, f * h * w, 1, sum(self.pairs))
        sin = torch.cat(parts_sin, dim=-1).reshape(b, f * h * w, 1, sum(self.pairs))
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x [B, L, H, D] by angle tables [B, L, 1, D/2]; computed in fp32, cast back."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
