"""One attention entry point and the block-causal training masks (method.md §A.6, §B.1).

Backends, chosen per call:
- flash-attn (FA3 through `flash_attn_interface` on compute capability >= 9, else FA2) for CUDA fp16/bf16 tensors
  without a mask, when installed (`pip install .[flash]`);
- FlexAttention for a block-causal `BlockMask` (CUDA);
- torch SDPA otherwise (CPU, fp32, dense boolean masks).
The backend used is logged once per backend.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)
_announced: set[str] = set()


def _announce(backend: str) -> None:
    if backend not in _announced:
        _announced.add(backend)
        log.info("attention backend: %s", backend)


@lru_cache(maxsize=None)
def _flash_attention_function(major_capability: int) -> tuple[str, Any] | None:
    """The flash-attn function for this GPU generation, or None when flash-attn is not installed."""
    if major_capability >= 9:
        try:
            from flash_attn_interface import flash_attn_func  # FA3 (Hopper)

            return "flash-attn-3", flash_attn_func
        except ImportError:
            pass
    try:
        from flash_attn import flash_attn_func  # FA2

        return "flash-attn-2", flash_attn_func
    except ImportError:
        return None


def flash_attention_available(device: torch.device) -> bool:
    """True when flash-attn can run on `device`."""
    if device.type != "cuda":
        return False
    return _flash_attention_function(torch.cuda.get_device_capability(device)[0]) is not None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | Any | None = None, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; mask: None, a boolean [Lq, Lk] / [B, 1, Lq, Lk] tensor (True = attend),
    or a FlexAttention BlockMask. backend: "auto", "sdpa", "flash" or "flex". Returns [B, Lq, H, D].
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, L, H, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    is_block_mask = mask is not None and not isinstance(mask, Tensor)
    if backend == "flex" or is_block_mask:
        if not is_block_mask:
            raise ValueError("backend='flex' needs a BlockMask (see block_causal_block_mask)")
        _announce("flex_attention")
        return _flex(q, k, v, mask)
    use_flash = (
        backend in ("auto", "flash")
        and mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and flash_attention_available(q.device)
    )
    if backend == "flash" and not use_flash:
        raise RuntimeError(
            "flash attention was requested but cannot run here: it needs CUDA fp16/bf16 tensors, no mask, "
            "and flash-attn installed (pip install '.[flash]')"
        )
    if use_flash:
        name, fn = _flash_attention_function(torch.cuda.get_device_capability(q.device)[0])
        _announce(name)
        out = fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # FA2 may return (out, lse), FA3 a tensor
    _announce("sdpa")
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    length = q.shape[1]
    padded = block_mask.seq_lengths[0]
    if padded != length:  # FlexAttention masks are built for sequences padded to a block multiple
        pad = (0, 0, 0, 0, 0, padded - length)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)[:, :length]


def chunk_ends(num_frames: int, frame_seqlen: int, frames_per_chunk: int, device: Any = None) -> Tensor:
    """For every token, the token index just past the end of its chunk: [num_frames * frame_seqlen]."""
    frame = torch.arange(num_frames * frame_seqlen, device=device) // frame_seqlen
    return (frame // frames_per_chunk + 1) * frames_per_chunk * frame_seqlen


def block_causal_mask(
    num_frames: int,
    frame_seqlen: int,
    frames_per_chunk: int,
    local_window_frames: int | None = None,
    device: Any = None,
) -> Tensor:
    """Dense boolean mask [L, L] of §B.1: query q sees key k iff k < ends[q] (and, with a local window of N frames,
    k >= ends[q] - N*frame_seqlen), or k == q. True = attend."""
    if frames_per_chunk <= 0:
        raise ValueError(f"frames_per_chunk must be positive, got {frames_per_chunk}")
    ends = chunk_ends(num_frames, frame_seqlen, frames_per_chunk, device)
    idx = torch.arange(ends.numel(), device=device)
    allowed = idx[None, :] < ends[:, None]
    if local_window_frames is not None and local_window_frames > 0:
        allowed &= idx[None, :] >= (ends[:, None] - local_window_frames * frame_seqlen)
    return allowed | (idx[None, :] == idx[:, None])


def block_causal_block_mask(
    num_frames: int,
    frame_seqlen: int,
    frames_per_chunk: int,
    local_window_frames: int | None = None,
    device: Any = "cuda",
    block_size: int = 128,
) -> Any:
    """The same mask as `block_causal_mask` as a FlexAttention BlockMask, over the sequence right-padded to a
    multiple of `block_size` (padded tokens attend only to themselves)."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = num_frames * frame_seqlen
    padded = -(-length // block_size) * block_size
    ends = torch.full((padded,), 0, dtype=torch.long, device=device)
    ends[:length] = chunk_ends(num_frames, frame_seqlen, frames_per_chunk, device)
    window = (local_window_frames or 0) * frame_seqlen

    def mask_mod(b, h, q_idx, kv_idx):
        end = ends[q_idx]
        allowed = (kv_idx < end) & (kv_idx < length)
        if window > 0:
            allowed = allowed & (kv_idx >= end - window)
        return allowed | (q_idx == kv_idx)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=padded, KV_LEN=padded, device=device,
                             BLOCK_SIZE=block_size)
