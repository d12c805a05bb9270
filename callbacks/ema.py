"""Exponential moving average of one submodule's weights (method §F.3, §F.8): the weights used for generation.

The shadow copy is fp32 (on CPU unless ``keep_on_device``). It is created, as a copy of the current weights, when the
module's step counter first reaches ``start_step``; after that every batch in which the submodule was stepped applies
``θ_ema ← d·θ_ema + (1 − d)·θ``. Validation and test run with the EMA weights swapped in.

DeepSpeed ZeRO-3 (`cf.zero.is_partitioned_parameter`): each rank averages its own partition, so updates need no
communication and each rank's checkpoint holds its partition. Swapping in, ``ema_state_dict()`` and
``read_ema_weights`` reassemble full tensors; the first two are collective calls on partitioned models.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from cf.export import read_ema_weights
from cf.zero import is_partitioned_parameter, rank_and_world

__all__ = ["EMA"]

_STATE_VERSION = 1


def _local_data(param: Tensor) -> Tensor:
    """The part of a parameter this rank owns: the flat ZeRO-3 partition, or the whole tensor."""
    if not is_partitioned_parameter(param):
        return param.detach()
    local = param.ds_tensor.detach()
    if local.numel() == 0 and param.ds_numel > 0:
        raise NotImplementedError(
            "EMA cannot read a ZeRO-3 parameter whose partition is swapped out (offload_param to NVMe); "
            "use CPU or GPU parameter placement"
        )
    return local.reshape(-1)


def _shadow_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _gather_partition(param: Tensor, local: Tensor) -> Tensor:
    """Reassemble a full ZeRO-3 tensor from every rank's flat partition (collective over the param's group)."""
    group = getattr(param, "ds_process_group", None)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    local = local.to(param.ds_tensor.device).contiguous()
    if world == 1:
        parts = [local]
    else:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
    return torch.cat(parts)[: param.ds_numel].view(tuple(param.ds_shape))


def _write_partitioned(param: Tensor, local_value: Tensor) -> None:
    """Set a ZeRO-3 parameter from this rank's flat partition of the new value (collective)."""
    import deepspeed

    full = _gather_partition(param, local_value)
    group = getattr(param, "ds_process_group", None)
    source_rank = dist.get_global_rank(group, 0) if (dist.is_initialized() and group is not None) else 0
    with deepspeed.zero.GatheredParameters([param], modifier_rank=source_rank):
        param.data.copy_(full.to(dtype=param.dtype, device=param.data.device))


class EMA(Callback):
    """Keeps an fp32 exponential moving average of ``pl_module.<attribute>``.

    Args:
        decay: d in ``θ_ema ← d·θ_ema + (1 − d)·θ``.
        start_step: the shadow is created when the step counter first reaches this value.
        attribute: dotted path of the tracked submodule on the LightningModule (e.g. ``"generator"``).
        keep_on_device: keep the shadow on the parameters' device instead of CPU.
        step_attribute: LightningModule attribute with the step counter; ``trainer.global_step`` if absent.
        stepped_attribute: LightningModule attribute, True when the submodule was stepped in this batch; if absent,
            a batch counts as stepped when ``trainer.global_step`` advanced.
        swap_for_evaluation: run validation and test with the EMA weights (restored afterwards).
    """

    def __init__(
        self,
        decay: float = 0.99,
        start_step: int = 200,
        attribute: str = "generator",
        keep_on_device: bool = False,
        step_attribute: str = "trainer_step",
        stepped_attribute: str = "generator_stepped",
        swap_for_evaluation: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        if not attribute:
            raise ValueError("EMA attribute must name the tracked submodule, e.g. 'generator'")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.attribute = attribute
        self.keep_on_device = keep_on_device
        self.step_attribute = step_attribute
        self.stepped_attribute = stepped_attribute
        self.swap_for_evaluation = swap_for_evaluation
        self._shadow: dict[str, Tensor] | None = None
        self._layout: dict[str, dict] = {}
        self._module: nn.Module | None = None
        self._backup: dict[str, Tensor] | None = None
        self._last_global_step: int | None = None
        self.num_updates = 0

    # ------------------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)

    @property
    def started(self) -> bool:
        """Whether the shadow copy exists (the step counter has reached ``start_step``)."""
        return self._shadow is not None

    def tracked_module(self, pl_module: nn.Module) -> nn.Module:
        """The submodule ``pl_module.<attribute>``."""
        target: Any = pl_module
        for part in self.attribute.split("."):
            if not hasattr(target, part):
                children = [name for name, _ in pl_module.named_children()]
                raise AttributeError(
                    f"EMA(attribute={self.attribute!r}): {type(pl_module).__name__} has no attribute path "
                    f"{self.attribute!r}; its child modules are {children}. Set `attribute` to the module to average."
                )
            target = getattr(target, part)
        if not isinstance(target, nn.Module):
            raise TypeError(f"EMA(attribute={self.attribute!r}) must name an nn.Module, got {type(target).__name__}")
        return target

    def ema_state_dict(self) -> dict[str, Tensor]:
        """EMA weights keyed like ``module.state_dict()`` (fp32 CPU tensors; buffers copied from the module).

        Collective (every rank must call it) when the module is ZeRO-3 partitioned.
        """
        module = self._require_module()
        shadow = self._require_shadow()
        primary_names = self._primary_names(module)
        state = {}
        for key, value in module.state_dict(keep_vars=True).items():
            name = primary_names.get(id(value))
            if name is not None and name in shadow:
                if self._layout[name]["partitioned"]:
                    state[key] = _gather_partition(value, shadow[name]).detach().cpu().clone()
                else:
                    state[key] = shadow[name].detach().cpu().clone()
            else:
                state[key] = value.detach().cpu().clone()
        return state

    @contextlib.contextmanager
    def use_ema_weights(self, pl_module: nn.Module) -> Iterator[None]:
        """Run the body with the EMA weights in the tracked submodule; training weights are restored on exit."""
        self._swap_in(pl_module)
        try:
            yield
        finally:
            self._swap_out(pl_module)

    read_ema_weights = staticmethod(read_ema_weights)  # EMA weights of a saved checkpoint (`cf.export`)

    # ------------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the tracked submodule may only be built later, in `configure_model`; it is looked up again when used
        self._module = getattr(pl_module, self.attribute, None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = self.tracked_module(pl_module)
        self._module = module
        self._last_global_step = trainer.global_step
        if self._shadow is not None:
            self._check_layout_matches(module)
            self._place_shadow(module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(getattr(pl_module, self.step_attribute, trainer.global_step))
        if hasattr(pl_module, self.stepped_attribute):
            stepped = bool(getattr(pl_module, self.stepped_attribute))
        else:
            stepped = self._last_global_step is None or trainer.global_step != self._last_global_step
        self._last_global_step = trainer.global_step
        module = self.tracked_module(pl_module)
        if self._shadow is None:
            if step >= self.start_step:
                self._initialise(module)
        elif stepped:
            self._update(module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.swap_for_evaluation and self._shadow is not None:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._backup is not None:
            self._swap_out(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        rank, world = rank_and_world()
        buffers, aliases, key_order = {}, {}, []
        if self._module is not None:
            primary_names = self._primary_names(self._module)
            for key, value in self._module.state_dict(keep_vars=True).items():
                key_order.append(key)
                name = primary_names.get(id(value))
                if name is None:
                    buffers[key] = value.detach().cpu().clone()
                elif name != key:
                    aliases[key] = name
        shadow = None
        if self._shadow is not None:
            shadow = {name: tensor.detach().cpu() for name, tensor in self._shadow.items()}
            if not key_order:
                key_order = list(shadow)
        return {
            "version": _STATE_VERSION,
            "attribute": self.attribute,
            "decay": self.decay,
            "start_step": self.start_step,
            "num_updates": self.num_updates,
            "shadow": shadow,
            "layout": dict(self._layout),
            "buffers": buffers,
            "aliases": aliases,
            "key_order": key_order,
            "rank": rank,
            "world_size": world,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown EMA checkpoint state version {state_dict.get('version')!r}")
        self.num_updates = int(state_dict["num_updates"])
        self._layout = dict(state_dict["layout"])
        shadow = state_dict["shadow"]
        self._shadow = None if shadow is None else {name: tensor.clone() for name, tensor in shadow.items()}
        if self._shadow is not None and any(info["partitioned"] for info in self._layout.values()):
            rank, world = rank_and_world()
            if (rank, world) != (state_dict["rank"], state_dict["world_size"]):
                raise RuntimeError(
                    f"the EMA state was saved by rank {state_dict['rank']} of {state_dict['world_size']} ZeRO-3 ranks "
                    f"but is loaded on rank {rank} of {world}; resume with the same number of ranks, or read the "
                    "merged weights with EMA.read_ema_weights(checkpoint_dir)"
                )

    # ------------------------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _primary_names(module: nn.Module) -> dict[int, str]:
        """id(parameter) -> the name under which it is tracked (the first of tied aliases)."""
        return {id(p): name for name, p in reversed(list(module.named_parameters(remove_duplicate=False)))}

    @staticmethod
    def _tracked_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in module.named_parameters() if p.is_floating_point()]

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise RuntimeError("EMA is not attached to a module yet; it attaches when a Trainer run starts")
        return self._module

    def _require_shadow(self) -> dict[str, Tensor]:
        if self._shadow is None:
            raise RuntimeError(
                f"EMA has not started yet: the step counter has not reached start_step={self.start_step}"
            )
        return self._shadow

    def _shadow_device(self, param: Tensor) -> torch.device:
        return _local_data(param).device if self.keep_on_device else torch.device("cpu")

    def _initialise(self, module: nn.Module) -> None:
        self._module = module
        shadow, layout = {}, {}
        with torch.no_grad():
            for name, p in self._tracked_parameters(module):
                local = _local_data(p)
                shadow[name] = local.to(device=self._shadow_device(p), dtype=_shadow_dtype(p), copy=True)
                partitioned = is_partitioned_parameter(p)
                layout[name] = {
                    "partitioned": partitioned,
                    "shape": list(p.ds_shape) if partitioned else list(p.shape),
                    "numel": int(p.ds_numel) if partitioned else p.numel(),
                }
        self._shadow, self._layout = shadow, layout

    def _update(self, module: nn.Module) -> None:
        shadow = self._require_shadow()
        weight = 1.0 - self.decay
        with torch.no_grad():
            for name, p in self._tracked_parameters(module):
                average = shadow[name]
                average.lerp_(_local_data(p).to(device=average.device, dtype=average.dtype), weight)
        self.num_updates += 1

    def _check_layout_matches(self, module: nn.Module) -> None:
        params = dict(self._tracked_parameters(module))
        if set(params) != set(self._layout):
            missing, extra = sorted(set(self._layout) - set(params)), sorted(set(params) - set(self._layout))
            raise ValueError(
                f"EMA state does not match module {self.attribute!r}: parameters only in the checkpoint {missing[:5]}, "
                f"only in the module {extra[:5]}; resume with the model the checkpoint was trained with"
            )
        for name, p in params.items():
            shape = list(p.ds_shape) if is_partitioned_parameter(p) else list(p.shape)
            if shape != self._layout[name]["shape"]:
                raise ValueError(
                    f"EMA state for {self.attribute}.{name} has shape {self._layout[name]['shape']} but the module's "
                    f"parameter has shape {shape}; resume with the model the checkpoint was trained with"
                )

    def _place_shadow(self, module: nn.Module) -> None:
        shadow = self._require_shadow()
        for name, p in self._tracked_parameters(module):
            shadow[name] = shadow[name].to(self._shadow_device(p))

    def _swap_in(self, pl_module: nn.Module) -> None:
        module = self.tracked_module(pl_module)
        self._module = module
        shadow = self._require_shadow()
        if self._backup is not None:
            raise RuntimeError("EMA weights are already swapped in")
        self._check_layout_matches(module)
        params = self._tracked_parameters(module)
        with torch.no_grad():
            self._backup = {
                name: _local_data(p).to(device=self._shadow_device(p), copy=True) for name, p in params
            }
            self._write(params, shadow)

    def _swap_out(self, pl_module: nn.Module) -> None:
        if self._backup is None:
            return
        module = self.tracked_module(pl_module)
        with torch.no_grad():
            self._write(self._tracked_parameters(module), self._backup)
        self._backup = None

    @staticmethod
    def _write(params: list[tuple[str, nn.Parameter]], values: dict[str, Tensor]) -> None:
        for name, p in params:
            if is_partitioned_parameter(p):
                _write_partitioned(p, values[name])
            else:
                p.data.copy_(values[name].to(device=p.device, dtype=p.dtype))
