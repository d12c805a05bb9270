"""Slow-Fast Memory: the student's K/V cache (method.md §C) with bounded positional encoding (§D).

The cache has `sink | slow | fast` slots of latent frames (3 / 12 / 6 by default, 21 in all):
- sink: the first frames of the video, never evicted;
- fast: a FIFO of the most recent frames (the previous chunk and the current one);
- slow: keyframes consolidated from the stream when a chunk's key descriptor differs from the previous one
  (cosine < τ), oldest evicted first.

Keys are stored un-rotated; the model rotates them on read with the positions this object returns. In `bounded`
mode the temporal position of a key is its slot index (queries take the slots they were written to), so positions
never exceed `rope_length − 1` however long the video; in `absolute` mode a key keeps its source frame index.
Position mode and memory policy are independent switches (§I.13).

The bookkeeping rules reproduce the released code exactly (the slot timelines of §C.5/§J.2), including its
early-phase quirks (§C.6): before the cache fills, a keyframe overwrites the slot after the last keyframe instead
of using a free slot. Options cover the spec's recommended defaults and the released code's behaviour:

| option                      | default            | released code        |
|-----------------------------|--------------------|----------------------|
| consolidation_source        | "commit_pass"      | "first_firing_call"  |
| similarity_reference        | "previous_chunk"   | "previous_call"      |
| consolidation_stride_chunks | 2                  | 1                    |

The keyframe rule is part of the config (`keyframes`, `threshold`, `keyframe_interval_frames`): the similarity
rule of Eq. 7 (candidates every `consolidation_stride_chunks` chunks, §I.5), the uniform ablation (every
`keyframe_interval_frames` frames, the stride does not apply), or always / never (tests). With
`consolidation_source="commit_pass"` a consolidation decided on the commit pass is applied when the call ends
(`cf.models.kv_cache` window contract), so every call on a chunk reads the same memory.

The same object, configured, gives the baselines and the paper's Table 3 ablations, by preset name:
`full` (no eviction), `sliding` (sink + sliding window, LongLive 3 + 12), `self_forcing` (sink + 18-frame rolling
window, absolute positions), `uniform_every_chunk`, `uniform_every_2_chunks`, `no_bounded_pe` (absolute positions
with the slow memory kept, §I.13).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cf.models.kv_cache import KVWindow

PositionMode = Literal["bounded", "absolute"]
KeyframeRule = Literal["similarity", "uniform", "always", "never"]


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class MemoryConfig:
    """Sizes are in latent frames. `fast=None` means an unbounded cache (no eviction at all)."""

    sink: int = 3
    slow: int = 12
    fast: int | None = 6
    frames_per_chunk: int = 3
    rope_length: int = 21
    position_mode: PositionMode = "bounded"
    consolidation_source: Literal["commit_pass", "first_firing_call"] = "commit_pass"
    similarity_reference: Literal["previous_chunk", "previous_call"] = "previous_chunk"
    consolidation_stride_chunks: int = 2
    warmup_frames: int | None = None  # None: the fast size (§I.6)
    frames_per_consolidation: int = 1
    per_sample_decisions: bool = True  # False: one decision per batch from the batch-mean cosine (released code)
    keyframes: KeyframeRule = "similarity"
    threshold: float = 0.95  # τ of the similarity rule
    keyframe_interval_frames: int = 6  # the uniform rule's period in frames (3: every chunk, 6: every 2 chunks)

    def __post_init__(self) -> None:
        n = self.frames_per_chunk
        problems = []
        if n <= 0:
            problems.append(f"frames_per_chunk must be positive (got {n})")
        if self.sink < 0 or self.slow < 0:
            problems.append(f"sink and slow must be >= 0 (got {self.sink}, {self.slow})")
        if self.fast is not None and self.fast < n:
            problems.append(f"fast ({self.fast}) must hold at least one chunk (frames_per_chunk = {n})")
        if self.fast is None and self.slow:
            problems.append("an unbounded cache (fast=None) has no slow memory: set slow=0")
        if self.position_mode not in ("bounded", "absolute"):
            problems.append(f"position_mode must be 'bounded' or 'absolute' (got {self.position_mode!r})")
        if self.position_mode == "bounded":
            if self.fast is None:
                problems.append("bounded positions need a bounded cache: use position_mode='absolute' with fast=None")
            elif self.rope_length < self.capacity:
                problems.append(f"rope_length ({self.rope_length}) must be >= the cache size ({self.capacity})")
        if not 1 <= self.frames_per_consolidation <= n:
            problems.append(f"frames_per_consolidation must be in [1, {n}] (got {self.frames_per_consolidation})")
        if self.consolidation_stride_chunks < 1:
            problems.append(f"consolidation_stride_chunks must be >= 1 (got {self.consolidation_stride_chunks})")
        if self.consolidation_source not in ("commit_pass", "first_firing_call"):
            problems.append(f"unknown consolidation_source {self.consolidation_source!r}")
        if self.similarity_reference not in ("previous_chunk", "previous_call"):
            problems.append(f"unknown similarity_reference {self.similarity_reference!r}")
        if self.keyframes not in ("similarity", "uniform", "always", "never"):
            problems.append(f"unknown keyframes rule {self.keyframes!r}; choose similarity, uniform, always or never")
        if self.keyframes == "uniform" and self.keyframe_interval_frames <= 0:
            problems.append(f"the uniform keyframe rule needs keyframe_interval_frames > 0 "
                            f"(got {self.keyframe_interval_frames}; §I.8)")
        if problems:
            raise ValueError("invalid MemoryConfig: " + "; ".join(problems))

    @property
    def capacity(self) -> int | None:
        """Total slots, or None for an unbounded cache."""
        return None if self.fast is None else self.sink + self.slow + self.fast

    @property
    def warmup(self) -> int:
        return self.fast if self.warmup_frames is None and self.fast is not None else (self.warmup_frames or 0)

    def keyframe_policy(self) -> "KeyframePolicy":
        """The keyframe rule these settings name (`keyframes`, `threshold`, `keyframe_interval_frames`, stride)."""
        return keyframe_policy(self.keyframes, self.threshold, self.keyframe_interval_frames,
                               self.per_sample_decisions, self.consolidation_stride_chunks)

    @classmethod
    def slow_fast(cls, **overrides) -> "MemoryConfig":
        """Context Forcing's memory with the paper's sizes (3 / 12 / 6, τ = 0.95) and recommended options."""
        return cls(**overrides)

    @classmethod
    def released_code(cls, **overrides) -> "MemoryConfig":
        """The slow-fast memory exactly as the released code runs it (for parity)."""
        base = dict(consolidation_source="first_firing_call", similarity_reference="previous_call",
                    consolidation_stride_chunks=1, per_sample_decisions=False)
        return cls(**{**base, **overrides})

    @classmethod
    def sliding(cls, sink: int = 3, window: int = 12, frames_per_chunk: int = 3,
                position_mode: PositionMode = "bounded", **overrides) -> "MemoryConfig":
        """Sink + sliding window (LongLive: 3 + 12), no slow memory."""
        return cls(sink=sink, slow=0, fast=window, frames_per_chunk=frames_per_chunk, rope_length=sink + window,
                   position_mode=position_mode, **overrides)

    @classmethod
    def self_forcing(cls, frames_per_chunk: int = 3, **overrides) -> "MemoryConfig":
        """Self-Forcing's rolling cache (the `rope_length = 0` path of §D.2): 3 sink + 18 window, absolute positions."""
        return cls.sliding(sink=3, window=18, frames_per_chunk=frames_per_chunk, position_mode="absolute",
                           **overrides)

    @classmethod
    def full(cls, frames_per_chunk: int = 3, **overrides) -> "MemoryConfig":
        """Keep every frame (no eviction), absolute positions."""
        return cls(sink=0, slow=0, fast=None, frames_per_chunk=frames_per_chunk, position_mode="absolute",
                   **overrides)

    @classmethod
    def uniform_every_chunk(cls, frames_per_chunk: int = 3, **overrides) -> "MemoryConfig":
        """Table 3 ablation "uniform slow sampling, interval 1": every chunk past warm-up is a keyframe."""
        return cls(keyframes="uniform", keyframe_interval_frames=frames_per_chunk, frames_per_chunk=frames_per_chunk,
                   **overrides)

    @classmethod
    def uniform_every_2_chunks(cls, frames_per_chunk: int = 3, **overrides) -> "MemoryConfig":
        """Table 3 ablation "uniform slow sampling, interval 2": every other chunk past warm-up is a keyframe."""
        return cls(keyframes="uniform", keyframe_interval_frames=2 * frames_per_chunk,
                   frames_per_chunk=frames_per_chunk, **overrides)

    @classmethod
    def no_bounded_pe(cls, frames_per_chunk: int = 3, **overrides) -> "MemoryConfig":
        """Table 3 ablation "without bounded PE" with the slow memory kept (§I.13): keys at their source frame's
        absolute position (the RoPE table's 1024 positions bound the video length)."""
        return cls(position_mode="absolute", rope_length=1024, frames_per_chunk=frames_per_chunk, **overrides)

    @classmethod
    def preset(cls, name: str, frames_per_chunk: int = 3) -> "MemoryConfig":
        """By name: slow_fast | released_code | sliding | self_forcing | full | uniform_every_chunk |
        uniform_every_2_chunks | no_bounded_pe."""
        presets = {"slow_fast": cls.slow_fast, "released_code": cls.released_code, "sliding": cls.sliding,
                   "self_forcing": cls.self_forcing, "full": cls.full,
                   "uniform_every_chunk": cls.uniform_every_chunk, "uniform_every_2_chunks": cls.uniform_every_2_chunks,
                   "no_bounded_pe": cls.no_bounded_pe}
        if name not in presets:
            raise ValueError(f"unknown memory preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](frames_per_chunk=frames_per_chunk)


# ---------------------------------------------------------------------------------------------- keyframe policy
class KeyframePolicy(Protocol):
    """Decides, for a chunk past warm-up, whether its first frame(s) enter the slow memory."""

    def decide(self, start_frame: int, chunk_index: int, descriptor: Tensor, reference: Tensor | None) -> Tensor:
        """descriptor, reference: [B, D] mean un-rotated keys; returns a bool tensor [B]."""


@dataclass
class SimilarityKeyframes:
    """Consolidate when cos(descriptor, reference) < threshold (Eq. 7); no reference yet -> consolidate.

    Only every `stride_chunks`-th chunk is a candidate (§I.5: the paper consolidates at 2-chunk intervals); the
    others are never keyframes. `per_sample=False` takes one decision per batch from the batch-mean cosine."""

    threshold: float = 0.95
    per_sample: bool = True
    stride_chunks: int = 1

    def decide(self, start_frame: int, chunk_index: int, descriptor: Tensor, reference: Tensor | None) -> Tensor:
        batch = descriptor.shape[0]
        if chunk_index % self.stride_chunks:
            return torch.zeros(batch, dtype=torch.bool)
        if reference is None:
            return torch.ones(batch, dtype=torch.bool)
        sim = F.cosine_similarity(descriptor.float(), reference.float(), dim=-1)  # stays on the device: no sync
        if not self.per_sample:
            sim = sim.mean().expand(batch)
        return sim < self.threshold


@dataclass
class UniformKeyframes:
    """Consolidate chunks whose start frame is a multiple of `interval_frames` (ablation, §C.4)."""

    interval_frames: int = 6

    def __post_init__(self) -> None:
        if self.interval_frames <= 0:
            raise ValueError(f"uniform keyframe policy needs interval_frames > 0 (got {self.interval_frames})")

    def decide(self, start_frame: int, chunk_index: int, descriptor: Tensor, reference: Tensor | None) -> Tensor:
        return torch.full((descriptor.shape[0],), start_frame % self.interval_frames == 0)


class AlwaysKeyframes:
    def decide(self, start_frame: int, chunk_index: int, descriptor: Tensor, reference: Tensor | None) -> Tensor:
        return torch.ones(descriptor.shape[0], dtype=torch.bool)


class NeverKeyframes:
    def decide(self, start_frame: int, chunk_index: int, descriptor: Tensor, reference: Tensor | None) -> Tensor:
        return torch.zeros(descriptor.shape[0], dtype=torch.bool)


@dataclass
class ScheduledKeyframes:
    """Decisions from a function of the chunk index (tests, notebooks, `simulate_slots`)."""

    schedule: Callable[[int], bool]

    def decide(self, start_frame: int, chunk_index: int, descriptor: Tensor, reference: Tensor | None) -> Tensor:
        return torch.full((descriptor.shape[0],), bool(self.schedule(chunk_index)))


def keyframe_policy(name: str = "similarity", threshold: float = 0.95, interval_frames: int = 6,
                    per_sample: bool = True, stride_chunks: int = 1) -> KeyframePolicy:
    """Policy by name: similarity (candidates every `stride_chunks` chunks) | uniform | always | never."""
    if name == "similarity":
        return SimilarityKeyframes(threshold, per_sample, stride_chunks)
    if name == "uniform":
        return UniformKeyframes(interval_frames)
    if name == "always":
        return AlwaysKeyframes()
    if name == "never":
        return NeverKeyframes()
    raise ValueError(f"unknown keyframe policy {name!r}; choose similarity, uniform, always or never")


# ------------------------------------------------------------------------------------------------ bookkeeping
# Slot operations, applied identically to the slot table and to the K/V tensors:
#   ("move", dst, src, count): slots [src, src+count) -> [dst, dst+count)
#   ("write", slot, offset, count): frames [offset, offset+count) of the current chunk -> slots [slot, slot+count)
SlotOp = tuple[str, int, int, int]


class SlotLayout:
    """Which source frame each slot holds, for one layer and one sample, and the rules that change it (§C.3)."""

    def __init__(self, config: MemoryConfig) -> None:
        self.cfg = config
        self.frames: list[int] = [-1] * (config.capacity or 0)
        self.length = 0  # slots in use (L)
        self.written = 0  # frames ever written (G)
        self.slow_count = 0  # c
        self.consolidated_start = -1

    def _apply(self, ops: list[SlotOp], start: int) -> list[SlotOp]:
        for kind, a, b, count in ops:
            if kind == "move":
                self.frames[a : a + count] = self.frames[b : b + count]
            else:
                self.frames[a : a + count] = [start + b + i for i in range(count)]
        return ops

    def can_consolidate(self, start: int) -> bool:
        """Past warm-up, with a slow memory, and not yet consolidated for this chunk (the keyframe policy decides
        the rest, the similarity rule's stride included)."""
        cfg = self.cfg
        return cfg.slow > 0 and self.consolidated_start != start and start >= cfg.warmup

    def consolidate(self, start: int) -> list[SlotOp]:
        """Copy the chunk's first frame(s) into the slow memory: fill slot sink + c, or roll out the oldest."""
        cfg = self.cfg
        ops: list[SlotOp] = []
        for offset in range(cfg.frames_per_consolidation):
            if self.slow_count < cfg.slow:
                step: list[SlotOp] = [("write", cfg.sink + self.slow_count, offset, 1)]
                self.slow_count += 1
            else:
                step = [("move", cfg.sink, cfg.sink + 1, cfg.slow - 1)] if cfg.slow > 1 else []
                step.append(("write", cfg.sink + cfg.slow - 1, offset, 1))
            ops += self._apply(step, start)
        self.consolidated_start = start
        return ops

    def write_chunk(self, start: int, num_frames: int) -> list[SlotOp]:
        """Place the chunk in the fast region: roll it on the first call of a new chunk when full, else append or
        rewrite the chunk's own slots."""
        end = start + num_frames
        if start > self.written:
            raise ValueError(f"chunk starts at frame {start} but only {self.written} frames were generated; "
                             "generate chunks in order")
        if end < self.written:
            raise ValueError(f"chunk [{start}, {end}) is older than the last chunk; it cannot be rewritten")
        cap = self.cfg.capacity
        new_chunk = end > self.written
        ops: list[SlotOp] = []
        if new_chunk and cap is not None and num_frames + self.length > cap:
            fast_start = cap - self.cfg.fast
            keep = self.cfg.fast - num_frames
            if keep:
                ops.append(("move", fast_start, fast_start + num_frames, keep))
            ops.append(("write", cap - num_frames, 0, num_frames))
            self.length = cap
        else:
            self.length += end - self.written
            if cap is None and self.length > len(self.frames):
                self.frames.extend([-1] * (self.length - len(self.frames)))
            ops.append(("write", self.length - num_frames, 0, num_frames))
        self.written = max(self.written, end)
        return self._apply(ops, start)


def simulate_slots(config: MemoryConfig, num_frames: int, keyframe: Callable[[int], bool] | None = None,
                   calls_per_chunk: int = 5) -> list[list[int]]:
    """The slot bookkeeping alone: each slot's source frame (−1 empty) after every chunk.

    `keyframe(chunk_index)` forces the keyframe decision in place of the config's rule; warm-up and the
    once-per-chunk guard still apply. Without it the config's rule decides as it would with no similarity
    reference, i.e. the similarity rule fires on every candidate chunk (its upper bound). Each chunk gets
    `calls_per_chunk` forward calls (4 denoising steps + the commit pass); with `consolidation_source="commit_pass"`
    the decision is taken on the last one.
    """
    n = config.frames_per_chunk
    if num_frames % n:
        raise ValueError(f"num_frames ({num_frames}) must be a multiple of frames_per_chunk ({n})")
    if keyframe is None:
        policy = config.keyframe_policy()
        keyframe = lambda chunk: bool(policy.decide(chunk * n, chunk, torch.zeros(1, 1), None)[0])  # noqa: E731
    layout = SlotLayout(config)
    timeline = []
    for chunk, start in enumerate(range(0, num_frames, n)):
        for call in range(calls_per_chunk):
            commit = call == calls_per_chunk - 1
            decide_now = commit if config.consolidation_source == "commit_pass" else True
            if config.consolidation_source == "first_firing_call" and decide_now:
                if layout.can_consolidate(start) and keyframe(chunk):
                    layout.consolidate(start)
            layout.write_chunk(start, n)
            if config.consolidation_source == "commit_pass" and decide_now:
                if layout.can_consolidate(start) and keyframe(chunk):
                    layout.consolidate(start)
        timeline.append(list(layout.frames))
    return timeline


# --------------------------------------------------------------------------------------------------- the cache
@dataclass
class _LayerState:
    layouts: list[SlotLayout]
    keys: Tensor | None = None  # [B, slots, S, H, D]
    values: Tensor | None = None
    reference: Tensor | None = None  # [B, H*D] descriptor to compare the next decision with
    # commit-pass source: this call's keyframe decision [B] (bool, on the keys' device) and which samples may
    # consolidate; resolved in end_call for every layer with one device-to-host copy
    pending: tuple[Tensor, list[bool]] | None = None


class SlowFastMemory:
    """The per-layer K/V slots of a causal DiT, implementing `cf.models.kv_cache.KVCache`.

    Create one per video (or rollout); `reset()` empties it. Every write is detached. `keyframes` replaces the
    config's keyframe rule (tests, notebooks).
    """

    def __init__(self, config: MemoryConfig, num_layers: int, keyframes: KeyframePolicy | None = None) -> None:
        self.config = config
        self.num_layers = num_layers
        self.keyframes = keyframes or config.keyframe_policy()
        self.reset()

    def reset(self) -> None:
        self.layers: list[_LayerState] | None = None
        self._call: tuple[int, int, bool] | None = None
        self.calls = 0

    # -- KVCache protocol -------------------------------------------------------------------------------
    def begin_call(self, start_frame: int, num_frames: int, commit: bool = False) -> None:
        if num_frames != self.config.frames_per_chunk:
            raise ValueError(f"the memory is configured for chunks of {self.config.frames_per_chunk} frames, "
                             f"got a call with {num_frames}")
        self._call = (start_frame, num_frames, commit)

    def update(self, layer: int, keys: Tensor, values: Tensor) -> KVWindow:
        if self._call is None:
            raise RuntimeError("memory update outside a call: call begin_call() first")
        start, n, commit = self._call
        cfg = self.config
        batch = keys.shape[0]
        seqlen = keys.shape[1] // n
        keys = keys.detach().unflatten(1, (n, seqlen))
        values = values.detach().unflatten(1, (n, seqlen))
        state = self._layer(layer, keys)
        descriptor = keys.float().mean(dim=(1, 2)).flatten(1)  # [B, H*D] mean un-rotated key of the chunk

        decide_now = commit if cfg.consolidation_source == "commit_pass" else True
        allowed = [lay.can_consolidate(start) for lay in state.layouts]
        decision = None
        if decide_now and any(allowed):
            decision = self.keyframes.decide(start, start // n, descriptor, state.reference)
        if cfg.consolidation_source == "first_firing_call" and decision is not None:
            for b, fire in enumerate(decision.tolist()):
                if fire and allowed[b]:
                    self._apply(state, b, state.layouts[b].consolidate(start), keys[b], values[b])
        for b in range(batch):
            self._apply(state, b, state.layouts[b].write_chunk(start, n), keys[b], values[b])

        window = self._window(state, start, n, keys)
        if cfg.consolidation_source == "commit_pass":
            # applied in end_call, after every layer has read its window: the chunk never attends to its own copy
            state.pending = None if decision is None else (decision, allowed)
        if cfg.similarity_reference == "previous_call" or commit:
            state.reference = descriptor
        return window

    def end_call(self) -> None:
        """Apply the consolidations this call decided (commit-pass source): copied from the chunk's own slots,
        which hold this call's keys/values."""
        if self._call is None:
            raise RuntimeError("end_call() without begin_call()")
        start, n, _ = self._call
        decided = [state for state in self.layers or [] if state.pending is not None]
        device = decided[0].pending[0].device if decided else None
        fired = torch.stack([state.pending[0].to(device).bool() for state in decided]).tolist() if decided else []
        for state, fire in zip(decided, fired):
            for b, allowed in enumerate(state.pending[1]):
                if not (fire[b] and allowed):
                    continue
                layout = state.layouts[b]
                own = slice(layout.length - n, layout.length)  # the chunk's slots, written by this call
                keys, values = state.keys[b, own].clone(), state.values[b, own].clone()
                self._apply(state, b, layout.consolidate(start), keys, values)
            state.pending = None
        self._call = None
        self.calls += 1

    # -- internals --------------------------------------------------------------------------------------
    def _layer(self, layer: int, keys: Tensor) -> _LayerState:
        batch, _, seqlen, heads, dim = keys.shape
        if self.layers is None:
            self.layers = [_LayerState([SlotLayout(self.config) for _ in range(batch)])
                           for _ in range(self.num_layers)]
        state = self.layers[layer]
        if len(state.layouts) != batch:
            raise ValueError(f"batch size changed from {len(state.layouts)} to {batch} within one video; "
                             "call reset() between videos")
        slots = self.config.capacity or 0
        if state.keys is None:
            shape = (batch, slots, seqlen, heads, dim)
            state.keys = keys.new_zeros(shape)
            state.values = keys.new_zeros(shape)
        needed = state.layouts[0].length + keys.shape[1]
        if self.config.capacity is None and state.keys.shape[1] < needed:  # unbounded: grow geometrically
            grow = max(needed, 2 * state.keys.shape[1]) - state.keys.shape[1]
            pad = state.keys.new_zeros((batch, grow, seqlen, heads, dim))
            state.keys = torch.cat([state.keys, pad], dim=1)
            state.values = torch.cat([state.values, pad.clone()], dim=1)
        return state

    @staticmethod
    def _apply(state: _LayerState, b: int, ops: list[SlotOp], keys: Tensor, values: Tensor) -> None:
        """Apply slot operations to sample b's storage; keys/values [n, S, H, D]: the current chunk's frames."""
        for kind, a, src, count in ops:
            if kind == "move":
                state.keys[b, a : a + count] = state.keys[b, src : src + count].clone()
                state.values[b, a : a + count] = state.values[b, src : src + count].clone()
            else:
                state.keys[b, a : a + count] = keys[src : src + count]
                state.values[b, a : a + count] = values[src : src + count]

    def _window(self, state: _LayerState, start: int, n: int, keys: Tensor) -> KVWindow:
        """Context = slots [0, L − n) (the chunk's own slots are the last n); positions per §D."""
        cfg = self.config
        batch = keys.shape[0]
        length = state.layouts[0].length
        ctx = length - n
        device = keys.device
        if cfg.position_mode == "bounded":
            anchor = min(start + n - 1, cfg.rope_length - 1)
            offset = anchor - (length - 1)
            slots = torch.arange(ctx, device=device)
            positions = torch.where(slots < cfg.sink, slots, slots + offset).expand(batch, ctx)
            query = torch.arange(anchor - n + 1, anchor + 1, device=device).expand(batch, n)
            key = ("bounded", batch, ctx, cfg.sink, offset, anchor, n)
        else:
            frames = tuple(tuple(lay.frames[:ctx]) for lay in state.layouts)
            positions = torch.tensor(frames, device=device, dtype=torch.long).view(batch, ctx)
            query = torch.arange(start, start + n, device=device).expand(batch, n)
            key = ("absolute", frames, start, n)
        return KVWindow(
            keys=state.keys[:, :ctx].flatten(1, 2),
            values=state.values[:, :ctx].flatten(1, 2),
            key_positions=positions,
            query_positions=query,
            positions_key=key,
        )

    # -- inspection --------------------------------------------------------------------------------------
    def slot_frames(self, layer: int = 0, sample: int = 0) -> list[int]:
        """Source frame of every slot (−1 empty) for one layer and sample."""
        if self.layers is None:
            return [-1] * (self.config.capacity or 0)
        return list(self.layers[layer].layouts[sample].frames)

    def consensus_slot_frames(self, sample: int = 0) -> list[int]:
        """Per slot, the source frame held there by the most layers (ties: the newest frame), for one sample.

        Layers take keyframe decisions on their own keys, so their slow memories can differ; a reader that needs
        one sequence of frames for all layers (the `teacher_context="memory"` teacher, §I.4) uses this table. It
        equals every layer's table when the layers agree."""
        if self.layers is None:
            return [-1] * (self.config.capacity or 0)
        tables = [state.layouts[sample].frames for state in self.layers]
        consensus = []
        for held in zip(*tables):
            counts: dict[int, int] = {}
            for frame in held:
                counts[frame] = counts.get(frame, 0) + 1
            consensus.append(max(counts, key=lambda frame: (counts[frame], frame)))
        return consensus

    def nbytes(self) -> int:
        """Bytes held by the K/V tensors of all layers."""
        if self.layers is None:
            return 0
        return sum(s.keys.numel() * s.keys.element_size() * 2 for s in self.layers if s.keys is not None)

    def used_bytes(self) -> int:
        """Bytes of the slots in use (what attention reads)."""
        if self.layers is None:
            return 0
        total = 0
        for s in self.layers:
            if s.keys is not None:
                per_slot = s.keys[:, :1].numel() * s.keys.element_size() * 2
                total += per_slot * s.layouts[0].length
        return total
