"""`ZeroSpawnLauncher`: the spawn launcher `cf.strategies.DeepSpeedStrategy` uses for ZeRO runs started from a
host process (pytest, a notebook): gathered weights back to the host, a free port per launch, and a timeout."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Literal, Optional

import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn

from cf.zero import gathered_parameters

__all__ = ["ZeroSpawnLauncher", "resolve_start_method"]


def resolve_start_method(start_method: str) -> str:
    """``"auto"``: spawn inside pytest (workers must send results back), else launch a script per process."""
    if start_method != "auto":
        return start_method
    return "spawn" if "pytest" in sys.modules else "popen"



class ZeroSpawnLauncher(_MultiProcessingLauncher):
    """Spawn launcher for ZeRO runs started from pytest or a notebook-like host process.

    * Sends back the *gathered* weights of rank 0 (the stock launcher sends its empty ZeRO-3 partitions, which then
      fail to load in the main process).
    * Picks a free port for every launch unless ``MASTER_PORT`` was set by the user, and leaves the host's
      environment as it found it (the stock launcher leaves ``MASTER_PORT`` behind, so later Trainers reuse it).
    * With ``timeout`` (seconds), kills the worker processes and raises ``TimeoutError`` when they run longer.
    """

    def __init__(
        self,
        strategy: ParallelStrategy,
        start_method: Literal["spawn", "fork", "forkserver"] = "spawn",
        timeout: Optional[float] = None,
    ) -> None:
        super().__init__(strategy, start_method=start_method)
        self._timeout = timeout

    def launch(self, function: Callable, *args: Any, trainer: Optional[Trainer] = None, **kwargs: Any) -> Any:
        environment = self._strategy.cluster_environment
        port_chosen_here = "MASTER_PORT" not in os.environ
        if port_chosen_here and isinstance(environment, LightningEnvironment):
            environment._main_port = find_free_network_port()  # the environment caches its first port otherwise
        timed_out = threading.Event()
        timer = None
        if self._timeout is not None:
            timer = threading.Timer(self._timeout, self._kill_on_timeout, args=(timed_out,))
            timer.daemon = True
            timer.start()
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except Exception as error:
            if timed_out.is_set():
                raise TimeoutError(
                    f"The {self._strategy.num_processes} worker processes did not finish within {self._timeout} s and"
                    " were killed (a rank probably waits in a collective for a rank that died or diverged). Raise"
                    " `process_timeout` if the job is just long."
                ) from error
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if port_chosen_here:
                os.environ.pop("MASTER_PORT", None)

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        # Leave together, then skip the interpreter's teardown: a C++ thread still joinable during static destruction
        # (seen with gloo on CPU) aborts the worker with "terminate called without an active exception" after its
        # work is done and its results are sent.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def _kill_on_timeout(self, timed_out: threading.Event) -> None:
        timed_out.set()
        self.kill(signal.SIGKILL)

    def _collect_rank_zero_results(self, trainer: Trainer, results: Any) -> Optional[_WorkerOutput]:
        checkpoint_callback = trainer.checkpoint_callback
        best_model_path = getattr(checkpoint_callback, "best_model_path", None) if checkpoint_callback else None
        module = trainer.lightning_module
        is_rank_zero = self._strategy.local_rank == 0
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            with gathered_parameters(module.parameters()):  # every rank takes part in the gather
                state_dict = module.state_dict()
                if is_rank_zero:
                    state_dict = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
            if is_rank_zero:
                weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
                self._strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        else:
            module.state_dict()  # metrics may sync inside state_dict() on every rank
        if not is_rank_zero:
            return None
        extra = self.get_extra_results(trainer)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, extra)
