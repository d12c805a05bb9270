"""Fixtures shared by the test files."""

import os

import pytest
import torch

from cf.models.wan import WanConfig, WanDiT
from cf.weights import save_wan_weights


@pytest.fixture(autouse=True)
def one_thread():
    """The test networks are tiny: one intra-op thread is fastest and avoids contention on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def lightning_environment_restored():
    """In-process `cf fit` runs (LightningCLI's seed_everything) set PL_GLOBAL_SEED and friends, which later spawned
    DeepSpeed workers would read and re-seed from: every test leaves the PL_* variables as it found them."""
    before = {key: value for key, value in os.environ.items() if key.startswith("PL_")}
    yield
    for key in [key for key in os.environ if key.startswith("PL_") and key not in before]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory) -> str:
    """A random bidirectional `WanDiT(WanConfig.tiny())` saved in the Wan layout (teacher / critic / student init)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_wan_weights(WanDiT(WanConfig.tiny()), path)
    return str(path)
