"""Exports and conversions never replace a good file with a bad or partial one: non-finite weights are refused
before anything is written, a failing write leaves the previous file and no temporary behind (cf.atomic,
cf.weights.write_safetensors, cf.export.write_generator_export, cf convert)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import safetensors.torch
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors.torch import load_file, save_file

from cf.atomic import atomic_path, atomic_write_text, temporary_name
from cf.checkpoint_io import AtomicCheckpointIO
from cf.cli import main as cf_main
from cf.export import write_generator_export
from cf.models.wan import WanConfig, WanDiT
from cf.weights import NonFiniteWeightsError, save_wan_weights

REPO = Path(__file__).resolve().parents[1]


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return WanDiT(WanConfig.tiny()).state_dict()


def temporaries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".tmp-" in name)


def test_nan_export_is_refused_and_the_previous_export_kept(tmp_path: Path) -> None:
    target = tmp_path / "export" / "generator.safetensors"
    write_generator_export(target, tiny_state(0), {"trainer_step": 1})
    weights, config = target.read_bytes(), (target.parent / "config.json").read_text()

    poisoned = {k: torch.full_like(v, float("nan")) for k, v in tiny_state(1).items()}
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to write .*generator\.safetensors: tensor "
                                                    r"'[\w.]+' holds \d+ NaN/inf values .*earlier checkpoint"):
        write_generator_export(target, poisoned, {"trainer_step": 2})
    assert target.read_bytes() == weights
    assert (target.parent / "config.json").read_text() == config
    assert temporaries(target.parent) == []

    one_bad = tiny_state(1)
    one_bad["blocks.1.ffn.2.bias"][3] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"'blocks\.1\.ffn\.2\.bias' holds 1 NaN/inf values of 64\."):
        save_wan_weights(one_bad, target)
    assert target.read_bytes() == weights


def test_a_cast_that_overflows_is_refused(tmp_path: Path) -> None:
    state = {"patch_embedding.weight": torch.full((2, 2), 1e6)}
    with pytest.raises(NonFiniteWeightsError, match="lower-precision cast"):
        save_wan_weights(state, tmp_path / "w.safetensors", dtype=torch.float16)
    assert not (tmp_path / "w.safetensors").exists()


def test_a_failing_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "teacher.safetensors"
    save_wan_weights(tiny_state(0), target)
    before = target.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_wan_weights(tiny_state(1), target)
    assert target.read_bytes() == before
    assert temporaries(tmp_path) == []


def test_an_interrupted_text_write_keeps_the_old_text(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert temporaries(tmp_path) == []


def test_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    mine = temporary_name(tmp_path / "last.ckpt")
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    stale.write_bytes(b"orphan of a killed write")
    live = temporary_name(tmp_path / "other.ckpt")
    live.write_bytes(b"a write in progress in this process")
    atomic_write_text(tmp_path / "notes.txt", "x")
    assert not stale.exists()
    assert live.exists()


def test_cf_convert_refuses_non_finite_weights(tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in tiny_state(0).items()}
    state["head.head.weight"][0, 0] = float("nan")
    source = tmp_path / "nan.safetensors"
    save_file(state, str(source))
    out = tmp_path / "out" / "diffusers.safetensors"
    with pytest.raises(NonFiniteWeightsError, match=r"tensor 'proj_out\.weight' holds 1 NaN/inf values"):
        cf_main(["convert", "diffusers", str(source), str(out)])
    assert not out.exists()
    good = tiny_state(0)
    save_file(good, str(source))
    cf_main(["convert", "diffusers", str(source), str(out)])
    assert len(load_file(str(out))) == len(good)
    assert sorted(os.listdir(out.parent)) == ["diffusers.safetensors"]


# ----------------------------------------------------------------------------------------------------------------------
# Lightning checkpoints (cf.checkpoint_io.AtomicCheckpointIO)
# ----------------------------------------------------------------------------------------------------------------------


def checkpointing_trainer(root: Path, max_steps: int) -> pl.Trainer:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1,
                                               save_top_k=-1, save_last=True)
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoints],
                      plugins=[AtomicCheckpointIO()], limit_val_batches=0, num_sanity_val_steps=0)


def test_a_failing_checkpoint_write_keeps_the_previous_last_ckpt(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    written: list[str] = []

    def disk_full_at_the_sixth_file(obj, f, *args, **kwargs):  # step 3 writes step=3.ckpt, then last.ckpt
        written.append(str(f))
        if len(written) == 6:
            Path(f).write_bytes(b"PK\x03\x04 part of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_the_sixth_file)
    torch.manual_seed(0)
    with pytest.raises(OSError, match="No space left"):
        checkpointing_trainer(tmp_path, max_steps=5).fit(BoringModel())
    assert all(Path(f).parent == tmp_path and Path(f).name.startswith(".") for f in written)  # beside the target
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    good = torch.load(tmp_path / "step=2.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    for key, value in good["state_dict"].items():
        assert torch.equal(last["state_dict"][key], value), key


def test_toy_configs_write_checkpoints_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setenv("CF_RUNS", str(tmp_path))
    configs = [p for p in sorted((REPO / "configs" / "toy").glob("*.yaml")) if "callbacks:" in p.read_text()]
    assert len(configs) >= 5
    for config in configs:
        assert "cf.checkpoint_io.AtomicCheckpointIO" in config.read_text(), config
    cli = LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=["--config", str(REPO / "configs" / "toy" / "teacher_erft.yaml")],
                       parser_kwargs={"parser_mode": "omegaconf"}, auto_configure_optimizers=False,
                       save_config_callback=None)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------------------- checkpoint folders (ZeRO)
def write_folder(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    for name in ("a", "b"):
        (folder / name).write_text(f"{text}-{name}")


def folder_text(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_staged_folder_replaces_the_folder_only_when_complete(tmp_path: Path) -> None:
    from cf.atomic import staged_folder

    target = tmp_path / "last.ckpt"
    calls = []
    with staged_folder(target, barrier=calls.append) as staging:
        assert not target.exists() and staging.parent == tmp_path
        write_folder(staging, "first")
    assert folder_text(target) == {"a": "first-a", "b": "first-b"}
    assert calls == ["staged_folder_cleared", "staged_folder_written", "staged_folder_swapped"]
    with pytest.raises(OSError, match="disk full"):  # a save that dies half way: the previous folder stays whole
        with staged_folder(target) as staging:
            staging.mkdir()
            (staging / "a").write_text("second-a")
            raise OSError(errno.ENOSPC, "disk full")
    assert folder_text(target) == {"a": "first-a", "b": "first-b"}
    with staged_folder(target) as staging:  # the next save clears the half-written staging folder
        assert not staging.exists()
        write_folder(staging, "third")
    assert folder_text(target) == {"a": "third-a", "b": "third-b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_save_killed_between_the_renames_is_put_back(tmp_path: Path) -> None:
    from cf.atomic import staged_folder
    from cf.lightning_cli import find_last_checkpoint

    run = tmp_path / "run" / "version_0" / "checkpoints"
    write_folder(run / ".last.ckpt.old", "previous")  # the state a kill after the first rename leaves
    assert find_last_checkpoint(tmp_path / "run") == run / "last.ckpt"
    assert folder_text(run / "last.ckpt") == {"a": "previous-a", "b": "previous-b"}
    (run / "last.ckpt").rename(run / ".last.ckpt.old")
    with staged_folder(run / "last.ckpt") as staging:  # a new save puts it back first, then replaces it
        assert (run / "last.ckpt").is_dir()
        write_folder(staging, "new")
    assert folder_text(run / "last.ckpt") == {"a": "new-a", "b": "new-b"}
