"""Helpers of tests/test_resume_exact.py that run in the training subprocesses: a callback that SIGKILLs the run,
and the entry point of the 2-process ZeRO-3 student run (``python tests/resume_toys.py student ROOT ...``)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the test helpers beside it


class KillAtStep(pl.Callback):
    """SIGKILLs the whole process group (every rank and data worker) once ``trainer.global_step`` reaches ``step``,
    at the end of that training batch: nothing is saved, nothing is cleaned up."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def student_zero3(root: str, max_steps: int, save_every: int, kill_at: int, ckpt_path: str, teacher: str,
                  prompts: str) -> None:
    """The tiny stage-2 student of tests/test_zero3_modules.py on 2 CPU ranks under ZeRO-3, on the endless prompt
    stream (one data worker per rank), recording its final state per rank (`zero3_module_toys.StudentRecorder`)."""
    import torch

    import test_zero3_modules as zero3
    import zero3_module_toys as toys
    from callbacks.ema import EMA
    from data import VideoDataModule
    from resume_toys import KillAtStep as Kill  # by module name: the spawned ranks unpickle it

    torch.manual_seed(0)
    callbacks = [EMA(decay=0.5, start_step=zero3.EMA_START), toys.StudentRecorder(str(Path(root) / "records"))]
    if kill_at:
        callbacks.append(Kill(kill_at))
    engine = {"gradient_clipping": zero3.CLIP}
    trainer = zero3.zero3_trainer(Path(root), max_steps, callbacks, save_every,
                                  engine_configs={"generator": engine, "critic": engine})
    data = VideoDataModule(mode="prompts", prompt_file=prompts, batch_size=1, num_workers=1, seed=0)
    trainer.fit(zero3.student_module(teacher), datamodule=data, ckpt_path=ckpt_path or None)


if __name__ == "__main__":
    if sys.argv[1] != "student":
        raise SystemExit(f"usage: {sys.argv[0]} student ROOT MAX_STEPS SAVE_EVERY KILL_AT CKPT TEACHER PROMPTS")
    args = sys.argv[2:]
    student_zero3(args[0], int(args[1]), int(args[2]), int(args[3]), args[4], args[5], args[6])
