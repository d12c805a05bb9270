"""The interface between the causal DiT and its self-attention K/V cache.

For every forward call on a chunk the model calls `begin_call` once, then `update` once per layer with the chunk's
un-rotated, detached keys and values, then `end_call`. `update` stores them and returns the *context*: the cached
keys/values the chunk attends to besides its own, with the temporal RoPE position of every context frame and of the
chunk's own frames. Keys are rotated by the model on read, so a cache may move, copy or drop frames freely and
choose positions (absolute, or bounded slot indices as in the Slow-Fast Memory of `cf.memory`).

The chunk's own keys/values are not part of the returned context: the model concatenates the live (grad-carrying)
tensors itself, which is what lets gradient flow through the current chunk while every cache write stays detached.

The window contract (every cache honours it):
- A window returned by `update(layer, ...)` may be a view of the cache's storage. From that `update` until
  `end_call()` the cache must not write into the storage that window covers: every layer of one call reads the
  cache as it was when that call's own writes (the chunk's own slots, an eviction on its first call) were made.
- A change the current call must not see (a consolidation decided on the commit pass, say) is queued and applied
  in `end_call()`, after every layer has read its window. So every call on one chunk (the denoising steps and the
  commit pass) reads the same context, except for what the cache deliberately changes on a call's own behalf
  before the read (the released code's first-firing-call consolidation).
- After `end_call()` an old window may change: a consumer that keeps one past the call (a checkpointed block
  recomputed in backward) must copy it first (the model does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class KVWindow:
    """What one layer attends to besides the current chunk.

    keys, values: [B, Fc * S, H, D] (un-rotated keys), S = tokens per frame;
    key_positions: [B, Fc] temporal positions of the context frames; query_positions: [B, n] of the chunk's frames.
    positions_key: optional hashable value that determines both position tensors (equal keys, equal positions), so
    the model computes the RoPE tables once per call for all layers that share it; None: computed per layer.
    """

    keys: Tensor
    values: Tensor
    key_positions: Tensor
    query_positions: Tensor
    positions_key: Hashable | None = None


@runtime_checkable
class KVCache(Protocol):
    def begin_call(self, start_frame: int, num_frames: int, commit: bool = False) -> None:
        """Announce a forward call on latent frames [start_frame, start_frame + num_frames)."""

    def update(self, layer: int, keys: Tensor, values: Tensor) -> KVWindow:
        """Store the chunk's keys/values [B, n*S, H, D] for `layer` and return its context window."""

    def end_call(self) -> None:
        """Finish the call (bookkeeping shared by all layers)."""


class GrowingKVCache:
    """A cache that keeps every frame, with absolute temporal positions (no eviction).

    A call on a chunk that is already stored (a further denoising step, or the commit pass) overwrites that chunk's
    frames; a call on the next chunk appends. The context of a chunk is every frame before it.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.num_frames = 0
        self._call: tuple[int, int] | None = None

    def begin_call(self, start_frame: int, num_frames: int, commit: bool = False) -> None:
        if start_frame > self.num_frames:
            raise ValueError(
                f"chunk starts at frame {start_frame} but the cache holds only {self.num_frames} frames; "
                "generate chunks in order"
            )
        self._call = (start_frame, num_frames)

    def update(self, layer: int, keys: Tensor, values: Tensor) -> KVWindow:
        if self._call is None:
            raise RuntimeError("KV cache update outside a call: call begin_call() first")
        start, n = self._call
        seqlen = keys.shape[1] // n
        keys, values = keys.detach(), values.detach()
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is None:
            ctx_k, ctx_v = keys[:, :0], values[:, :0]
        else:
            ctx_k, ctx_v = old_k[:, : start * seqlen], old_v[:, : start * seqlen]
        tail_k = old_k[:, (start + n) * seqlen :] if old_k is not None else keys[:, :0]
        tail_v = old_v[:, (start + n) * seqlen :] if old_v is not None else values[:, :0]
        self.keys[layer] = torch.cat([ctx_k, keys, tail_k], dim=1)
        self.values[layer] = torch.cat([ctx_v, values, tail_v], dim=1)
        batch = keys.shape[0]
        device = keys.device
        return KVWindow(
            keys=ctx_k,
            values=ctx_v,
            key_positions=torch.arange(start, device=device).expand(batch, start),
            query_positions=torch.arange(start, start + n, device=device).expand(batch, n),
            positions_key=("growing", batch, start, n),
        )

    def end_call(self) -> None:
        start, n = self._call
        self.num_frames = max(self.num_frames, start + n)
        self._call = None
