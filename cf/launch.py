"""This process's part of a job started by torchrun (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``): which items it does and which GPU it uses. No process group is needed: the tools that split work
this way (`cf data encode`, `cf data ode-pairs`) decide everything from the global item index and the rank."""

from __future__ import annotations

import os

__all__ = ["launch_rank_and_world", "process_device", "process_share"]


def launch_rank_and_world() -> tuple[int, int]:
    """(``RANK``, ``WORLD_SIZE``) from the environment; (0, 1) outside a launcher. ValueError when they disagree."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE must be integers ({err}); launch with torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    return rank, world


def process_share(count: int) -> list[int]:
    """The item indices this process takes: all of ``range(count)``, or every ``WORLD_SIZE``-th one from ``RANK``."""
    rank, world = launch_rank_and_world()
    return list(range(rank, count, world))


def process_device(device: str) -> str:
    """``device`` for this process: plain ``"cuda"`` becomes ``cuda:<LOCAL_RANK>`` under a launcher (one GPU per
    process); anything else is returned as given."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device
