"""Re-caching the Slow-Fast Memory at a prompt switch (LongLive-style KV re-cache).

At a switch the frames the memory keeps were committed under the old prompt: their keys/values carry its text
conditioning. Re-caching re-runs the kept frames' commit passes (t = 0, clean latents, no commit noise) with the
new prompt's text K/V and writes the results into the same slots, in slot order: each re-run group attends to the
slots before it (already refreshed ones as refreshed, the others as stored) and to itself, at the positions the
memory gives those slots. Only the chosen regions are rewritten; every other slot keeps its K/V bit for bit, and the
slot table (which frame each slot holds) does not change.

Regions of a memory with L slots in use: sink = slots [0, min(sink, L)); fast = the last `fast` slots in use (the
FIFO of the most recent frames); slow = the slots between. Once the memory is full these are the sink | slow | fast
slots of `cf.memory`. A re-run group is a run of consecutive slots of one region holding consecutive frames of one
chunk (the same in every layer and sample): the sink's and the fast region's chunks re-run whole, slow keyframes
one by one. Layers whose slots hold different frames (their keyframe decisions differ) are re-run separately, each
layer rewritten only by the pass that fed it its own frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cf.memory import SlowFastMemory
from cf.models.kv_cache import KVCache, KVWindow
from cf.models.wan import CausalWanDiT

__all__ = ["REGIONS", "parse_regions", "region_slots", "replay_groups", "recache_memory", "held_frames"]

REGIONS = ("sink", "slow", "fast")


def parse_regions(recache: str | Sequence[str] | None) -> tuple[str, ...]:
    """Memory regions to refresh: "none" (or None / empty), "all", one region name, or several joined by "+" or
    "," (or given as a sequence), from sink | slow | fast. Returned in slot order."""
    if recache is None:
        return ()
    names = recache.replace(",", "+").split("+") if isinstance(recache, str) else list(recache)
    names = [str(n).strip() for n in names if str(n).strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return REGIONS
    unknown = [n for n in names if n not in REGIONS]
    if unknown:
        raise ValueError(f"unknown memory region(s) {', '.join(map(repr, unknown))} to re-cache; choose none, all, "
                         "or any of sink, slow, fast (joined by '+', e.g. slow+fast)")
    return tuple(r for r in REGIONS if r in names)


def region_slots(memory: SlowFastMemory) -> dict[str, range]:
    """The slots of each region among those in use (see the module docstring)."""
    cfg = memory.config
    length = 0 if memory.layers is None else memory.layers[0].layouts[0].length
    sink_end = min(cfg.sink, length)
    fast_start = sink_end if cfg.fast is None else max(sink_end, length - cfg.fast)
    return {"sink": range(0, sink_end), "slow": range(sink_end, fast_start), "fast": range(fast_start, length)}


def _tables(memory: SlowFastMemory) -> list[list[list[int]]]:
    """tables[layer][sample] = the source frame of every slot."""
    return [[list(lay.frames) for lay in state.layouts] for state in memory.layers]


def replay_groups(memory: SlowFastMemory, regions: Sequence[str]) -> list[range]:
    """The slot runs re-run together, in slot order, for `regions`."""
    n = memory.config.frames_per_chunk
    tables = _tables(memory)
    slots = region_slots(memory)
    groups: list[range] = []
    for region in REGIONS:
        if region not in regions:
            continue
        start = None
        for s in slots[region]:
            if start is not None:
                continues = s - start < n and all(
                    t[s] == t[s - 1] + 1 and t[s] // n == t[start] // n for layer in tables for t in layer)
                if continues:
                    continue
                groups.append(range(start, s))
            start = s
        if start is not None:
            groups.append(range(start, slots[region].stop))
    return groups


def _slot_positions(memory: SlowFastMemory, layer: int, device: torch.device) -> Tensor:
    """[B, L] temporal positions of the slots in use, as the memory gave them to the last call."""
    cfg = memory.config
    layouts = memory.layers[layer].layouts
    length, written = layouts[0].length, layouts[0].written
    if cfg.position_mode == "bounded":
        offset = min(written - 1, cfg.rope_length - 1) - (length - 1)
        slots = torch.arange(length, device=device)
        positions = torch.where(slots < cfg.sink, slots, slots + offset)
        return positions.expand(len(layouts), length)
    return torch.tensor([lay.frames[:length] for lay in layouts], device=device, dtype=torch.long)


class _SlotReplay:
    """A `KVCache` for one re-run group: slots [first, first + count) of `memory` attend to the slots before them;
    the layers in `write_layers` store the group's new keys/values in those slots."""

    def __init__(self, memory: SlowFastMemory, group: range, write_layers: set[int], device: torch.device) -> None:
        self.memory, self.group, self.write_layers, self.device = memory, group, write_layers, device

    def begin_call(self, start_frame: int, num_frames: int, commit: bool = False) -> None:
        if num_frames != len(self.group):
            raise ValueError(f"re-cache call with {num_frames} frames for a group of {len(self.group)} slots")

    def update(self, layer: int, keys: Tensor, values: Tensor) -> KVWindow:
        state = self.memory.layers[layer]
        first, stop = self.group.start, self.group.stop
        positions = _slot_positions(self.memory, layer, self.device)
        window = KVWindow(keys=state.keys[:, :first].flatten(1, 2), values=state.values[:, :first].flatten(1, 2),
                          key_positions=positions[:, :first], query_positions=positions[:, first:stop])
        if layer in self.write_layers:  # slots after the window: the window contract holds
            count = len(self.group)
            state.keys[:, first:stop] = keys.detach().unflatten(1, (count, -1)).to(state.keys.dtype)
            state.values[:, first:stop] = values.detach().unflatten(1, (count, -1)).to(state.values.dtype)
        return window

    def end_call(self) -> None:
        pass


@torch.no_grad()
def recache_memory(model: CausalWanDiT, memory: KVCache, latents: Mapping[int, Tensor], text_kv: list,
                   regions: str | Sequence[str]) -> list[range]:
    """Rewrite the K/V of the chosen `regions` of `memory` with commit passes under `text_kv` (the new prompt's
    `model.text_kv`); `latents[frame]` [B, C, h, w] are the clean latents of (at least) every frame the memory
    holds. Returns the slot groups re-run. Empty memory or no region: nothing happens."""
    if not isinstance(memory, SlowFastMemory):
        raise ValueError(f"re-caching needs the Slow-Fast Memory (cf.memory.SlowFastMemory), got "
                         f"{type(memory).__name__}; pass memory as a MemoryConfig or preset name, or re-cache 'none'")
    regions = parse_regions(regions)
    if memory.layers is None or not regions:
        return []
    tables = _tables(memory)
    groups = replay_groups(memory, regions)
    for group in groups:
        variants: dict[tuple, set[int]] = {}
        for layer, per_sample in enumerate(tables):
            key = tuple(tuple(t[group.start : group.stop]) for t in per_sample)
            variants.setdefault(key, set()).add(layer)
        for frames, layers in variants.items():
            missing = sorted({f for sample in frames for f in sample if f not in latents})
            if missing:
                raise ValueError(f"re-cache needs the latents of frame(s) {missing} that the memory holds; keep "
                                 "every committed chunk's latents until its frames leave the memory")
            x = torch.stack([torch.stack([latents[f][b] for f in sample], dim=1)
                             for b, sample in enumerate(frames)])  # [B, C, k, h, w]
            x = x.to(next(model.parameters()).dtype)
            replay = _SlotReplay(memory, group, layers, x.device)
            zeros = torch.zeros(x.shape[0], device=x.device)
            model.forward_chunk(x, zeros, text_kv, replay, group.start, commit=True)
    return groups


def held_frames(memory: KVCache) -> set[int] | None:
    """Every source frame some slot of some layer and sample holds (None: not a Slow-Fast Memory)."""
    if not isinstance(memory, SlowFastMemory):
        return None
    if memory.layers is None:
        return set()
    return {f for state in memory.layers for lay in state.layouts for f in lay.frames if f >= 0}
