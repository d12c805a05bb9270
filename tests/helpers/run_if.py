"""`RunIf`: skip a test unless the machine has what it needs (CUDA GPUs, GPU memory, optional packages).

    @pytest.mark.gpu
    @RunIf(min_cuda_gpus=1, min_gpu_memory_gib=20)
    def test_on_a_gpu(): ...

Every unmet condition is named in the skip reason, so a CPU run says why the test did not run.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch


def RunIf(min_cuda_gpus: int = 0, min_gpu_memory_gib: float | None = None, flash_attn: bool = False,
          deepspeed: bool = False, diffusers: bool = False) -> pytest.MarkDecorator:
    """A ``pytest.mark.skipif`` that skips unless every given condition holds.

    Args:
        min_cuda_gpus: at least this many CUDA devices.
        min_gpu_memory_gib: the first CUDA device has at least this much memory.
        flash_attn / deepspeed / diffusers: the package imports (flash-attn: ``flash_attn``).
    """
    reasons = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < min_cuda_gpus:
        reasons.append(f"needs {min_cuda_gpus} CUDA GPU(s), found {gpus}")
    if min_gpu_memory_gib is not None:
        memory = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if gpus else 0.0
        if memory < min_gpu_memory_gib:
            reasons.append(f"needs {min_gpu_memory_gib:g} GiB of GPU memory, found {memory:.1f}")
    for wanted, module in ((flash_attn, "flash_attn"), (deepspeed, "deepspeed"), (diffusers, "diffusers")):
        if wanted and importlib.util.find_spec(module) is None:
            reasons.append(f"needs {module} installed")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "all conditions met")
