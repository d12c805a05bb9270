"""Attention backends agree on CPU; RoPE split and rotation against a naive complex-number implementation."""

import pytest
import torch

from cf.models.attention import attention, block_causal_block_mask, block_causal_mask
from cf.models.rope import RotaryEmbedding3D, apply_rotary, rope_pair_split


def _naive_attention(q, k, v, mask=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_sdpa_matches_naive_with_and_without_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 24, 3, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), _naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
    mask = block_causal_mask(num_frames=6, frame_seqlen=4, frames_per_chunk=2)
    torch.testing.assert_close(attention(q, k, v, mask), _naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_flex_block_mask_forward_matches_dense_mask_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))  # 40 tokens: padded to 128 inside
    dense = block_causal_mask(num_frames=10, frame_seqlen=4, frames_per_chunk=3, local_window_frames=6)
    block = block_causal_block_mask(10, 4, 3, local_window_frames=6, device="cpu", block_size=128)
    torch.testing.assert_close(attention(q, k, v, block), attention(q, k, v, dense), rtol=1e-5, atol=1e-5)


def test_flash_backend_refuses_cpu_tensors_clearly():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="flash"):
        attention(q, q, q, backend="flash")


def test_rope_split_of_wan_head_dim():
    assert rope_pair_split(128) == (22, 21, 21)
    assert rope_pair_split(32) == (6, 5, 5)


def test_rope_rotation_matches_complex_multiplication():
    torch.manual_seed(2)
    head_dim, theta = 32, 10000.0
    rope = RotaryEmbedding3D(head_dim, max_positions=64, theta=theta)
    positions = torch.tensor([[0, 5, 20], [7, 7, 63]])
    grid = (2, 3)
    x = torch.randn(2, 3 * 6, 2, head_dim)
    got = apply_rotary(x, *rope.tables(positions, grid))
    # naive: per token (f, y, x) the angle of pair j is pos_axis * theta^(-2j'/D_axis) for its axis
    nt, nh, nw = rope_pair_split(head_dim)
    expected = torch.empty_like(x)
    for b in range(2):
        for token in range(18):
            f, rem = divmod(token, 6)
            y, xx = divmod(rem, 3)
            pos = [int(positions[b, f])] * nt + [y] * nh + [xx] * nw
            idx = list(range(nt)) + list(range(nh)) + list(range(nw))
            dims = [2 * nt] * nt + [2 * nh] * nh + [2 * nw] * nw
            angle = torch.tensor([p * theta ** (-2 * j / d) for p, j, d in zip(pos, idx, dims)], dtype=torch.float64)
            z = torch.view_as_complex(x[b, token].double().reshape(2, -1, 2).contiguous())
            rotated = z * torch.polar(torch.ones_like(angle), angle)
            expected[b, token] = torch.view_as_real(rotated).reshape(2, head_dim).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_rejects_positions_outside_the_table():
    rope = RotaryEmbedding3D(32, max_positions=21)
    with pytest.raises(ValueError, match="bounded positions"):
        rope.tables(torch.tensor([[21]]), (1, 1))
