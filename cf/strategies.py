"""DeepSpeed ZeRO under Lightning: runs on CPU (gloo) as well as CUDA, and gives each optimizer its own engine.

`DeepSpeedStrategy` extends Lightning's stock strategy in three ways:

* **CPU.** With the CPU accelerator (and ``DS_ACCELERATOR=cpu``) it initialises DeepSpeed over gloo, so ZeRO-3 runs
  for real in CI. DeepSpeed's shared-memory comm op (a C++ JIT build, unused by ZeRO over gloo) is not built.
* **One engine per optimizer.** A LightningModule that defines ``deepspeed_submodules() -> dict[str, nn.Module]``
  (in the order ``configure_optimizers()`` returns its optimizers) gets one DeepSpeed engine per submodule, each with
  its own optimizer and config (``engine_configs``), so alternating updates (generator / critic) keep their exact
  semantics. Backward and ``opt.step()`` are routed to the right engine. Everything outside the submodules (a frozen
  teacher, say) is frozen and replicated on every rank in the compute dtype.
* **Checkpoints.** Each engine is saved as its own ZeRO shard set in ``<ckpt>/<name>/``; Lightning's own state
  (loops, callbacks, schedulers, the weights outside the engines) goes to ``<ckpt>/lightning_state.pt``. Callback
  states can differ between ranks (an EMA of ZeRO-3 partitions), so each rank's are also stored with its shard of the
  first engine and restored to that rank. Resuming with another world size fails with a message naming both sizes
  and the fix.

Without ``deepspeed_submodules()`` the strategy behaves like the stock single-engine strategy.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.core.optimizer import LightningOptimizer, _init_optimizers_and_lr_schedulers
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from cf.atomic import staged_folder
from cf.zero import (
    ENGINES_FILE,
    checkpoint_engine_names,
    check_resume_world_size,
    engines_in_graph,
    load_zero_checkpoint_state_dict,
    merge_engine_config,
    modules_outside,
    replicate_zero_parameters,
    skip_shm_comm_op_build,
)
from cf.zero_launcher import ZeroSpawnLauncher, resolve_start_method

__all__ = ["DeepSpeedStrategy"]

LIGHTNING_STATE_FILE = "lightning_state.pt"
RANK_CALLBACKS_KEY = "callbacks"  # per-rank callback states in the first engine's client state (as stock Lightning)
DEEPSPEED_TAG = "checkpoint"
_ENGINE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------------------------------
# Strategy
# ----------------------------------------------------------------------------------------------------------------------


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, extended to CPU (gloo) and to one DeepSpeed engine per optimizer.

    Multi-engine mode is switched on by the LightningModule defining ``deepspeed_submodules()``:

    .. code-block:: python

        def deepspeed_submodules(self) -> dict[str, nn.Module]:
            return {"generator": self.generator, "critic": self.critic}   # order of configure_optimizers()

    Then, in manual optimization, ``self.manual_backward(loss)`` backpropagates through the engine whose trainable
    parameters the loss depends on (or ``self.manual_backward(loss, engine="critic")``), and ``opt.step()`` steps
    the engine that owns ``opt``. With DeepSpeed's gradient accumulation (``gradient_accumulation_steps`` in an
    engine config) call ``opt.step()`` after every backward: the engine updates at its boundaries and clears the
    gradients itself, and ``opt.zero_grad()`` between micro-steps would discard what it accumulated. Gradient
    clipping is per engine (``gradient_clipping`` in ``engine_configs``). LR schedulers are Lightning's (step them in
    manual optimization as usual). Modules outside the submodules are frozen and replicated on every rank, their
    parameters cast to the compute dtype (``frozen_modules="replicate"``). Standalone validate/test/predict replicate
    the whole module and load a checkpoint by gathering each engine's shards, so any world size can read it.

    Args:
        config: DeepSpeed config, a mapping or a JSON path (mapping first, so a saved CLI config holds a mapping).
        frozen_modules: how modules outside ``deepspeed_submodules()`` are held: ``"replicate"`` (plain module on
            every rank, parameters in the compute dtype). ``"partition"`` is not implemented.
        engine_configs: per-engine DeepSpeed config overrides merged into the main config, e.g.
            ``{"critic": {"gradient_clipping": 2.0}}``.
        start_method: ``"popen"`` re-runs the script per rank (CLI, torchrun), ``"spawn"`` starts fresh worker
            processes from this one (pytest), ``"fork"`` forks them (notebooks); ``"auto"`` picks spawn under pytest
            and popen otherwise.
        process_timeout: with spawn, seconds after which hung worker processes are killed (None: no limit).
        build_shm_comm_op: let DeepSpeed JIT-build its shared-memory comm op on CPU (unused by ZeRO training).
        exclude_frozen_parameters: leave parameters with ``requires_grad=False`` out of checkpoints (they must then
            be rebuilt identically by ``configure_model``, e.g. from pretrained weights).
        logging_batch_size_per_gpu: also sets ``train_micro_batch_size_per_gpu`` of a ``config`` file lacking it
            (Lightning applies it to its default config only), so a YAML names a JSON and the micro-batch size.
        **kwargs: the arguments of Lightning's ``DeepSpeedStrategy`` (``stage``, ``config``, ``offload_*``, ...).
    """

    strategy_name = "cf_deepspeed"

    def __init__(
        self, *, config: Optional[Union[dict[str, Any], str, Path]] = None,
        frozen_modules: Literal["replicate", "partition"] = "replicate",
        engine_configs: Optional[dict[str, dict[str, Any]]] = None,
        start_method: Literal["auto", "popen", "spawn", "fork"] = "auto",
        process_timeout: Optional[float] = None,
        build_shm_comm_op: bool = False,
        exclude_frozen_parameters: bool = False,
        **kwargs: Any,
    ) -> None:
        if frozen_modules not in ("replicate", "partition"):
            raise ValueError(f"frozen_modules must be 'replicate' or 'partition', got {frozen_modules!r}.")
        if start_method not in ("auto", "popen", "spawn", "fork"):
            raise ValueError(f"start_method must be 'auto', 'popen', 'spawn' or 'fork', got {start_method!r}.")
        if engine_configs is not None and not all(isinstance(v, Mapping) for v in engine_configs.values()):
            raise ValueError("engine_configs must map engine names to DeepSpeed config dicts, e.g. {'critic': {...}}.")
        if isinstance(kwargs.get("timeout"), (int, float)):
            kwargs["timeout"] = timedelta(seconds=kwargs["timeout"])
        super().__init__(config=config, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        micro_batch = kwargs.get("logging_batch_size_per_gpu", "auto")
        if micro_batch != "auto" and isinstance(self.config, dict):
            self.config.setdefault("train_micro_batch_size_per_gpu", int(micro_batch))
        self.frozen_modules = frozen_modules
        self.engine_configs = dict(engine_configs or {})
        self.process_timeout = process_timeout
        self.build_shm_comm_op = build_shm_comm_op
        self._start_method = resolve_start_method(start_method)
        self._submodules: dict[str, nn.Module] = {}  # set in multi-engine mode (training and inference)
        self._engines: dict[str, Any] = {}  # set in multi-engine training
        self._engine_prefixes: dict[str, str] = {}

    # ---------------------------------------------------------------- engines

    @property
    def engines(self) -> dict[str, Any]:
        """The DeepSpeed engines by name in multi-engine mode; empty in single-engine mode."""
        return dict(self._engines)

    @property
    def deepspeed_engine(self) -> Any:
        if self._engines:
            raise AttributeError(
                "This run has one DeepSpeed engine per submodule; use `strategy.engines[name]` instead of"
                " `strategy.deepspeed_engine`."
            )
        return self.model

    # ---------------------------------------------------------------- launching and distributed setup

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen" or self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = ZeroSpawnLauncher(self, start_method=self._start_method, timeout=self.process_timeout)

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
            return
        if not isinstance(self.accelerator, CPUAccelerator):
            raise RuntimeError(
                f"{type(self).__name__} runs on CUDA or CPU accelerators, not {type(self.accelerator).__name__}."
            )
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                "Trainer(accelerator='cpu') was asked for, but DeepSpeed selected its"
                f" {get_accelerator().device_name()!r} accelerator. Set the environment variable DS_ACCELERATOR=cpu"
                " before starting Python."
            )
        DDPStrategy.setup_environment(self)  # skips the stock CUDA-only check

    def setup_distributed(self) -> None:
        if self.root_device.type != "cpu":
            super().setup_distributed()  # keeps the CUDA device-index validation
            return
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _init_deepspeed_distributed(self) -> None:
        if self.root_device.type == "cpu" and not self.build_shm_comm_op:
            skip_shm_comm_op_build()
        super()._init_deepspeed_distributed()

    def _device_rank(self) -> int:
        index = self.root_device.index
        return self.local_rank if index is None else index

    def _setup_model_and_optimizer(
        self,
        model: nn.Module,
        optimizer: Optional[Optimizer],
        lr_scheduler: Optional[Any] = None,
        config: Optional[dict[str, Any]] = None,
    ) -> tuple[Any, Optimizer]:
        """``deepspeed.initialize`` one module with one optimizer (and scheduler) under ``config`` (default: main)."""
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=config if config is not None else self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    # ---------------------------------------------------------------- engine construction

    def _declared_submodules(self, module: LightningModule) -> Optional[dict[str, nn.Module]]:
        declare = getattr(module, "deepspeed_submodules", None)
        if declare is None:
            return None
        submodules = declare()
        if not isinstance(submodules, Mapping) or not submodules:
            raise MisconfigurationException(
                f"{type(module).__name__}.deepspeed_submodules() must return a non-empty dict[str, nn.Module],"
                f" got {submodules!r}."
            )
        names_of = {id(m): name for name, m in module.named_modules()}
        inner: dict[int, str] = {}
        for name, sub in submodules.items():
            reserved = (DEEPSPEED_TAG, LIGHTNING_STATE_FILE, ENGINES_FILE)
            if not isinstance(name, str) or not _ENGINE_NAME.match(name) or name in reserved:
                raise MisconfigurationException(
                    f"Engine name {name!r} from deepspeed_submodules() is not usable as a directory name; use letters,"
                    f" digits, '_', '-' or '.' (and not {DEEPSPEED_TAG!r})."
                )
            if not isinstance(sub, nn.Module) or id(sub) not in names_of or sub is module:
                raise MisconfigurationException(
                    f"deepspeed_submodules()[{name!r}] must be a submodule of {type(module).__name__}"
                    " (an nn.Module assigned as an attribute), not the module itself or a free-standing object."
                )
            for child in sub.modules():
                if id(child) in inner:
                    raise MisconfigurationException(
                        f"deepspeed_submodules() entries {inner[id(child)]!r} and {name!r} overlap; each module may"
                        " belong to one engine only."
                    )
                inner[id(child)] = name
        unknown = set(self.engine_configs) - set(submodules)
        if unknown:
            raise MisconfigurationException(
                f"engine_configs names {sorted(unknown)}, but deepspeed_submodules() declares {list(submodules)}."
            )
        self._engine_prefixes = {name: names_of[id(sub)] + "." for name, sub in submodules.items()}
        self._submodules = dict(submodules)
        return self._submodules

    def _engine_config(self, name: str) -> dict[str, Any]:
        assert isinstance(self.config, dict)
        return merge_engine_config(self.config, self.engine_configs.get(name, {}))

    def _compute_dtype(self) -> torch.dtype:
        assert isinstance(self.config, dict)
        if self.config.get("bf16", {}).get("enabled"):
            return torch.bfloat16
        if self.config.get("fp16", {}).get("enabled"):
            return torch.float16
        return torch.float32

    def _prepare_modules_outside_engines(self, module: LightningModule, submodules: Mapping[str, nn.Module]) -> None:
        """Freeze and replicate every parameter outside ``submodules``; move it to this rank's device and dtype."""
        if self.frozen_modules == "partition":
            raise NotImplementedError(
                "frozen_modules='partition' (a ZeRO-3 inference engine for modules outside deepspeed_submodules())"
                " is not implemented; use frozen_modules='replicate'."
            )
        excluded = {id(m) for sub in submodules.values() for m in sub.modules()}
        outside = modules_outside(module, excluded)
        replicate_zero_parameters(outside)
        dtype = self._compute_dtype()
        frozen = 0
        for owner in outside:
            for param in owner.parameters(recurse=False):
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += 1
                target = dtype if param.is_floating_point() else param.dtype
                param.data = param.data.to(device=self.root_device, dtype=target)
            for name, buffer in owner.named_buffers(recurse=False):
                owner._buffers[name] = buffer.to(self.root_device)
        if frozen and submodules:
            rank_zero_info(
                f"{frozen} parameter tensors outside deepspeed_submodules() {list(submodules)} were trainable; they are"
                " frozen (requires_grad=False) and replicated on every rank."
            )

    def _initialize_deepspeed_train(self, model: nn.Module) -> None:
        assert isinstance(model, LightningModule)
        submodules = self._declared_submodules(model)
        if submodules is None:
            super()._initialize_deepspeed_train(model)
            return
        assert isinstance(self.config, dict)
        if "optimizer" in self.config or "scheduler" in self.config:
            raise MisconfigurationException(
                "With deepspeed_submodules(), optimizers and schedulers come from configure_optimizers(); remove"
                " 'optimizer'/'scheduler' from the DeepSpeed config."
            )
        self._prepare_modules_outside_engines(model, submodules)

        optimizers, scheduler_configs = _init_optimizers_and_lr_schedulers(model)
        if len(optimizers) != len(submodules):
            raise MisconfigurationException(
                f"deepspeed_submodules() declares {len(submodules)} engines {list(submodules)}, but"
                f" configure_optimizers() returned {len(optimizers)} optimizers; return one optimizer per engine,"
                " in the same order."
            )
        scheduler_of: dict[int, Any] = {}
        for scheduler_config in scheduler_configs:
            key = id(scheduler_config.scheduler.optimizer)
            if key in scheduler_of:
                raise MisconfigurationException("DeepSpeed engines take at most one LR scheduler per optimizer.")
            scheduler_of[key] = scheduler_config.scheduler

        engines: dict[str, Any] = {}
        deepspeed_optimizers = []
        for (name, submodule), optimizer in zip(submodules.items(), optimizers):
            own = {id(p) for p in submodule.parameters()}
            foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
            if foreign:
                raise MisconfigurationException(
                    f"Optimizer {len(engines)} of configure_optimizers() holds {len(foreign)} parameter tensors that"
                    f" are not in deepspeed_submodules()[{name!r}]; return the optimizers in the order"
                    f" {list(submodules)}, each over its own submodule's parameters."
                )
            engine, deepspeed_optimizer = self._setup_model_and_optimizer(
                submodule, optimizer, scheduler_of.get(id(optimizer)), config=self._engine_config(name)
            )
            engine.lr_scheduler = None  # Lightning steps the schedulers
            engines[name] = engine
            deepspeed_optimizers.append(deepspeed_optimizer)
        self._engines = engines
        self._set_deepspeed_activation_checkpointing()
        self.optimizers = deepspeed_optimizers
        self.lr_scheduler_configs = scheduler_configs
        self.model = model

    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:
        assert isinstance(model, LightningModule)
        submodules = self._declared_submodules(model)
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        if submodules is not None:
            # Inference replicates the whole module; checkpoints are loaded by gathering each engine's shards.
            self._prepare_modules_outside_engines(model, {})
            remove_module_hooks(model)  # ZeRO-3 hooks of engines from an earlier fit in this process
            self.model = model
            return
        import deepspeed

        assert isinstance(self.config, dict)
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config.get("zero_allow_untested_optimizer", True)
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )
        self.model = engine

    # ---------------------------------------------------------------- backward and step

    def _engine_for_backward(self, loss: Tensor, optimizer: Optional[Optimizer], engine: Optional[str]) -> Any:
        if engine is not None:
            if engine not in self._engines:
                raise ValueError(f"manual_backward(engine={engine!r}): the engines are {list(self._engines)}.")
            return self._engines[engine]
        if optimizer is not None:
            return self._engine_of_optimizer(optimizer)
        if len(self._engines) == 1:
            return next(iter(self._engines.values()))
        if not loss.requires_grad:
            raise RuntimeError("manual_backward() got a loss that does not require grad.")
        owner = {id(p): name for name, e in self._engines.items() for p in e.module.parameters() if p.requires_grad}
        found = engines_in_graph(loss, owner)
        if not found:
            found = {name for name, e in self._engines.items() if any(p.requires_grad for p in e.module.parameters())}
        if len(found) != 1:
            raise RuntimeError(
                "Cannot tell which DeepSpeed engine this loss belongs to (candidates:"
                f" {sorted(found) or 'none'}). Freeze the other networks for this step (`net.requires_grad_(False)`),"
                " detach their outputs, or name the engine: `self.manual_backward(loss, engine='<name>')`."
            )
        return self._engines[found.pop()]

    def _engine_of_optimizer(self, optimizer: Optimizer) -> Any:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        for engine in self._engines.values():
            if engine.optimizer is optimizer:
                return engine
        raise RuntimeError(
            "This optimizer belongs to none of the DeepSpeed engines; step the optimizers from self.optimizers()."
        )

    def backward(
        self,
        closure_loss: Tensor,
        optimizer: Optional[Optimizer],
        *args: Any,
        engine: Optional[str] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Backpropagate ``closure_loss`` through one engine (``engine=`` name, the optimizer's, or inferred)."""
        if not self._engines:
            if engine is not None:
                raise ValueError("manual_backward(engine=...) needs deepspeed_submodules() on the LightningModule.")
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        target = self._engine_for_backward(closure_loss, optimizer, engine)
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        zero_optimizer = target.optimizer
        # What engine.forward() would have done at the start of this micro-step (the modules are called directly).
        if hasattr(zero_optimizer, "clear_backward_seen_flag"):
            zero_optimizer.clear_backward_seen_flag()
        if hasattr(zero_optimizer, "set_gradient_accumulation_boundary"):
            zero_optimizer.set_gradient_accumulation_boundary(target.is_gradient_accumulation_boundary())
        target.backward(closure_loss, *args, **kwargs)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[LightningModule, nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        if not self._engines:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        engine = self._engine_of_optimizer(optimizer)
        module = model if isinstance(model, LightningModule) else self.lightning_module
        assert module is not None
        closure_result = closure()
        self.precision_plugin._after_closure(module, optimizer)
        if module.automatic_optimization and closure_result is None:
            raise MisconfigurationException(
                "Skipping backward by returning None from training_step is not supported with DeepSpeed."
            )
        return engine.step(**kwargs)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        return {}  # the ZeRO shards hold it

    # ---------------------------------------------------------------- checkpoints

    def _outside_state(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        prefixes = tuple(self._engine_prefixes.values())
        state = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
        if self.exclude_frozen_parameters:
            module = self.lightning_module
            assert module is not None
            frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        return state

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Union[str, Path], storage_options: Optional[Any] = None
    ) -> None:
        """Write the checkpoint folder atomically (`cf.atomic.staged_folder`): a killed or failed save leaves the
        previous folder of that name complete."""
        filepath = Path(self.broadcast(str(filepath)))
        with staged_folder(filepath, self.is_global_zero, self.barrier) as staging:
            if not self._engines:
                super().save_checkpoint(checkpoint, staging, storage_options)
                return
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (no CheckpointIO).")
            # this rank's callback states go into its own shard file of the first engine (ZeRO-3 writes one per rank)
            rank_state = {RANK_CALLBACKS_KEY: checkpoint.get("callbacks", {})}
            for index, (name, engine) in enumerate(self._engines.items()):
                engine.save_checkpoint(str(staging / name), tag=DEEPSPEED_TAG,
                                       client_state=rank_state if index == 0 else {},
                                       exclude_frozen_parameters=self.exclude_frozen_parameters)
            if self.is_global_zero:
                state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
                state["state_dict"] = self._outside_state(checkpoint["state_dict"])
                torch.save(state, staging / LIGHTNING_STATE_FILE)
                layout = {"engines": list(self._engines), "world_size": self.world_size, "tag": DEEPSPEED_TAG}
                (staging / ENGINES_FILE).write_text(json.dumps(layout, indent=1))

    def load_checkpoint(self, checkpoint_path: Union[str, Path], weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        module = self.lightning_module
        assert module is not None
        names = checkpoint_engine_names(path) if path.is_dir() else []
        declared = self._submodules
        if not declared:
            if names:
                raise MisconfigurationException(
                    f"Checkpoint {path} holds one engine per submodule {names}, but {type(module).__name__} defines no"
                    " deepspeed_submodules(); load it with the module that wrote it."
                )
            if not self.load_full_weights and path.is_dir():
                check_resume_world_size(path, self.world_size)
            return super().load_checkpoint(checkpoint_path, weights_only)

        if not path.is_dir() or not names:
            raise FileNotFoundError(
                f"{path} is not a multi-engine DeepSpeed checkpoint directory (it should hold {ENGINES_FILE},"
                f" {LIGHTNING_STATE_FILE} and one folder per engine)."
            )
        if set(names) != set(declared):
            raise MisconfigurationException(
                f"Checkpoint {path} holds engines {names}, but deepspeed_submodules() declares {list(declared)}."
            )
        state = torch.load(path / LIGHTNING_STATE_FILE, map_location="cpu", weights_only=False)
        is_fitting = module.trainer.state.fn == TrainerFn.FITTING
        if is_fitting:
            check_resume_world_size(path, self.world_size)
            for name, engine in self._engines.items():
                loaded, client_state = engine.load_checkpoint(
                    str(path / name),
                    tag=DEEPSPEED_TAG,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    load_module_strict=module.strict_loading,
                )
                if loaded is None:
                    raise RuntimeError(f"DeepSpeed could not load engine {name!r} from {path / name}.")
                if client_state and RANK_CALLBACKS_KEY in client_state:
                    state["callbacks"] = client_state[RANK_CALLBACKS_KEY]  # this rank's own callback states
        else:
            for name, submodule in declared.items():
                weights = load_zero_checkpoint_state_dict(path, name)
                reference = submodule.state_dict()
                weights = {k: v.to(reference[k].dtype) if k in reference else v for k, v in weights.items()}
                submodule.load_state_dict(weights, strict=module.strict_loading)
        return state

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self._submodules:
            super().load_model_state_dict(checkpoint, strict)
            return
        module = self.lightning_module
        assert module is not None
        state = checkpoint.get("state_dict", {})
        result = module.load_state_dict(state, strict=False)
        prefixes = tuple(self._engine_prefixes.values())
        missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
        if self.exclude_frozen_parameters:
            frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
            missing = [k for k in missing if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Checkpoint state outside the DeepSpeed engines does not match {type(module).__name__}: missing"
                f" {missing}, unexpected {result.unexpected_keys}. Set `strict_loading = False` on the module to"
                " ignore this."
            )

    # ---------------------------------------------------------------- registry

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = {
            "cf_deepspeed": ("cf DeepSpeed (CPU-capable, one engine per optimizer), ZeRO stage 2", {"stage": 2}),
            "cf_deepspeed_stage_2": ("cf DeepSpeed, ZeRO stage 2", {"stage": 2}),
            "cf_deepspeed_stage_3": ("cf DeepSpeed, ZeRO stage 3", {"stage": 3}),
            "cf_deepspeed_stage_3_offload": (
                "cf DeepSpeed, ZeRO stage 3 with CPU offload",
                {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
            ),
        }
        for name, (description, init_params) in entries.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **init_params)


DeepSpeedStrategy.register_strategies(StrategyRegistry)
