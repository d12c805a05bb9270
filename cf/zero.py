"""ZeRO helpers that need no Trainer and no Lightning: partition checks, gathering, rank/world, and readers of the
sharded checkpoints `cf.strategies.DeepSpeedStrategy` writes (one ZeRO shard set per engine).

The model, memory and tool modules use these instead of importing the strategy.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch.distributed as dist
from torch import Tensor, nn

from cf.weights import WeightLoadError, load_into

__all__ = [
    "ENGINES_FILE",
    "check_resume_world_size",
    "checkpoint_engine_names",
    "checkpoint_world_size",
    "engines_in_graph",
    "gathered_parameters",
    "is_zero_partitioned",
    "load_network_weights",
    "load_zero_checkpoint_state_dict",
    "merge_engine_config",
    "modules_outside",
    "rank_and_world",
    "replicate_zero_parameters",
    "skip_shm_comm_op_build",
]

ENGINES_FILE = "zero_engines.json"
_OPTIM_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def is_partitioned_parameter(param: Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (DeepSpeed gives each one a ``ds_id``; its data lives in
    flat shards across ranks, this rank's in ``ds_tensor``)."""
    return hasattr(param, "ds_id")


def is_zero_partitioned(params: Iterable[nn.Parameter]) -> bool:
    """Whether any of ``params`` is a ZeRO-3 partitioned parameter."""
    return any(is_partitioned_parameter(p) for p in params)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def skip_shm_comm_op_build() -> None:
    """Stop DeepSpeed from JIT-compiling its shared-memory comm op (35-40 s with g++; only CPU inference uses it).

    ``deepspeed.comm.torch`` must be fetched with importlib: inside ``deepspeed.comm`` the name ``torch`` is PyTorch.
    """
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


@contextmanager
def gathered_parameters(params: Iterable[nn.Parameter], modifier_rank: Optional[int] = None) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned parameters hold their full data on every rank.

    A collective: every rank must enter it with the same parameters. A no-op for plain parameters. With
    ``modifier_rank`` set, that rank's in-place changes are broadcast and re-partitioned on exit.
    """
    params = list(params)
    if not is_zero_partitioned(params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def load_network_weights(network: nn.Module, state: Mapping[str, Tensor], what: str, path: str) -> None:
    """Load a Wan-named state dict strictly into ``network`` (gathering ZeRO-3 partitions: a collective), naming
    ``what`` and the file ``path`` on error."""
    try:
        with gathered_parameters(network.parameters(), modifier_rank=0):
            load_into(network, state, strict=True)
    except WeightLoadError as error:
        raise WeightLoadError(f"{what} weights {path}: {error}") from error


def checkpoint_engine_names(ckpt_dir: Union[str, Path]) -> list[str]:
    """Engine names of a multi-engine checkpoint directory, in saving order; ``[]`` for a single-engine one."""
    layout = Path(ckpt_dir) / ENGINES_FILE
    if not layout.is_file():
        return []
    return list(json.loads(layout.read_text())["engines"])


def _read_tag(ds_dir: Path) -> str:
    latest = ds_dir / "latest"
    if not latest.is_file():
        raise FileNotFoundError(
            f"{ds_dir} is not a DeepSpeed checkpoint directory: it has no 'latest' file. Pass the directory that"
            " ModelCheckpoint wrote (e.g. '.../epoch=0-step=10.ckpt'), not a file or subfolder inside it."
        )
    return latest.read_text().strip()


def _zero_shard_world_size(ds_dir: Path) -> Optional[int]:
    """Data-parallel world size that wrote the ZeRO shards under ``ds_dir/<tag>``; None if it has no ZeRO shards."""
    tag_dir = ds_dir / _read_tag(ds_dir)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint {ds_dir} names tag {tag_dir.name!r}, but {tag_dir} is missing.")
    ranks = {int(m.group(1)) for f in os.listdir(tag_dir) if (m := _OPTIM_SHARD.match(f))}
    return len(ranks) if ranks else None


def checkpoint_world_size(ckpt_dir: Union[str, Path], engine: Optional[str] = None) -> Optional[int]:
    """World size a sharded checkpoint was written with (from its ZeRO shard files); None without ZeRO shards.

    ``engine`` selects one engine of a multi-engine checkpoint; by default all engines are read and must agree.
    """
    root = Path(ckpt_dir)
    names = checkpoint_engine_names(root)
    if not names:
        return _zero_shard_world_size(root)
    sizes = {name: _zero_shard_world_size(root / name) for name in ([engine] if engine else names)}
    distinct = set(sizes.values())
    if len(distinct) != 1:
        raise RuntimeError(f"Checkpoint {root} is inconsistent: its engines were written by world sizes {sizes}.")
    return distinct.pop()


def check_resume_world_size(checkpoint_path: Union[str, Path], world_size: int) -> None:
    """Raise a clear error when a sharded checkpoint was written by another world size than ``world_size``."""
    saved = checkpoint_world_size(checkpoint_path)
    if saved is not None and saved != world_size:
        raise RuntimeError(
            f"Checkpoint {checkpoint_path} was written by a run of world size {saved} (ZeRO shards of {saved}"
            f" processes), but this run has world size {world_size}. A sharded ZeRO checkpoint resumes only"
            f" with the world size that wrote it: resume with {saved} processes (devices x num_nodes), or"
            f" consolidate its weights with `cf convert zero {checkpoint_path} <out>` and start a new run from"
            " those weights (optimizer and scheduler state are not carried over)."
        )


def load_zero_checkpoint_state_dict(ckpt_dir: Union[str, Path], engine: Optional[str] = None) -> dict[str, Tensor]:
    """Gather the fp32 weights of one engine from a sharded ZeRO checkpoint directory, on CPU.

    Args:
        ckpt_dir: the checkpoint directory Lightning wrote (``.../epoch=0-step=10.ckpt``).
        engine: the engine name for a multi-engine checkpoint (a key of ``deepspeed_submodules()``); None for a
            single-engine checkpoint.

    Returns:
        A state dict keyed as the engine's module ``state_dict()`` (the LightningModule for a single engine).
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"ZeRO checkpoint directory {root} does not exist (a ZeRO checkpoint is a directory such as"
            " '.../epoch=0-step=10.ckpt/')."
        )
    names = checkpoint_engine_names(root)
    if names:
        if engine is None:
            raise ValueError(f"Checkpoint {root} holds one ZeRO shard set per engine {names}: pass engine=<name>.")
        if engine not in names:
            raise ValueError(f"Checkpoint {root} has no engine {engine!r}; it holds {names}.")
        ds_dir = root / engine
    else:
        if engine is not None:
            raise ValueError(f"Checkpoint {root} holds a single engine; pass engine=None instead of {engine!r}.")
        ds_dir = root
    tag = _read_tag(ds_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    # Lightning < 2.1 wrapped the module in `_forward_module`.
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------- multi-engine helpers


def merge_engine_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy of ``base`` with ``override`` merged in (nested dicts merged key by key)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_engine_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def engines_in_graph(loss: Tensor, owner_of_param: Mapping[int, str]) -> set[str]:
    """Names of the engines whose trainable parameters are leaves of ``loss``'s autograd graph."""
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf tensor
        if variable is not None:
            name = owner_of_param.get(id(variable))
            if name is not None:
                found.add(name)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return found


def modules_outside(root: nn.Module, excluded: set[int]) -> list[nn.Module]:
    """Modules of ``root`` (root included) that are not inside an excluded module, in a rank-independent order."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in excluded or id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        stack.extend(reversed(list(module.children())))
    return out


def replicate_zero_parameters(modules: Iterable[nn.Module]) -> int:
    """Replace ZeRO-3 partitioned parameters owned by ``modules`` by plain full ones on every rank (a collective)."""
    import deepspeed

    replaced: dict[int, nn.Parameter] = {}
    for module in modules:
        for name, param in list(module._parameters.items()):
            if param is None or not is_zero_partitioned([param]):
                continue
            if id(param) not in replaced:  # tied weights stay tied
                with deepspeed.zero.GatheredParameters([param]):
                    full = param.data.detach().clone()
                replaced[id(param)] = nn.Parameter(full, requires_grad=param.requires_grad)
            module._parameters[name] = replaced[id(param)]
    return len(replaced)
