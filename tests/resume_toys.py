"""Helpers of the SIGKILL resume tests (tests/test_resume_exact.py, tests/test_zero3_modules.py): the runner that
starts a training subprocess in its own process group, a callback that SIGKILLs that group, and the entry point of
the 2-process ZeRO-3 student run (``python tests/resume_toys.py student ROOT ...``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the test helpers beside it

REPO = Path(__file__).resolve().parents[1]


def run_in_own_group(argv: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> int:
    """Run ``argv`` in its own process group (so that a SIGKILL of the group reaches only this run); its exit code
    (negative: killed by that signal)."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    process = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{argv[:4]} exited with {process.returncode}:\n{output[-4000:]}")
    return process.returncode


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
    """`test_zero3_modules.fit_student` (the tiny stage-2 student on 2 CPU ranks under ZeRO-3), SIGKILLed at step
    ``kill_at`` when it is not 0."""
    import test_zero3_modules as zero3
    from resume_toys import KillAtStep as Kill  # by module name: the spawned ranks unpickle it

    zero3.fit_student(Path(root), max_steps, save_every, Path(ckpt_path) if ckpt_path else None, teacher, prompts,
                      extra_callbacks=[Kill(kill_at)] if kill_at else [])


if __name__ == "__main__":
    if sys.argv[1] != "student":
        raise SystemExit(f"usage: {sys.argv[0]} student ROOT MAX_STEPS SAVE_EVERY KILL_AT CKPT TEACHER PROMPTS")
    args = sys.argv[2:]
    student_zero3(args[0], int(args[1]), int(args[2]), int(args[3]), args[4], args[5], args[6])
