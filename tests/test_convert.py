"""cf.convert: LoRA merging against peft, the teacher export, layout conversion and the ZeRO export logic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import cf.strategies
import cf.zero
from cf.cli import main as cf_main
from cf.convert import dit_state_dicts
from cf.lit.teacher import TeacherERFT
from cf.lora import LORA_TARGETS, has_lora, merge_lora_state_dict
from cf.models.wan import WanConfig, WanDiT
from cf.weights import to_diffusers

TINY = WanConfig.tiny()


def randomize_lora_b(module: torch.nn.Module, seed: int = 0) -> None:
    """peft initialises B = 0 (the merge would be trivial); give every lora_B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))


def peft_dit(rank: int = 4, alpha: float = 8.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    dit = WanDiT(TINY)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS), dit)
    randomize_lora_b(dit, seed)
    return dit


def peft_merged(dit: torch.nn.Module, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Reference: peft's own merge of a copy of ``dit``'s weights."""
    torch.manual_seed(123)
    fresh = WanDiT(TINY)
    wrapped = get_peft_model(fresh, LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS))
    wrapped.base_model.model.load_state_dict(dit.state_dict())
    return wrapped.merge_and_unload().state_dict()


# ----------------------------------------------------------------------------------------------------------------------
# merge_lora_state_dict
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,alpha", [(4, 8.0), (3, 3.0)])
def test_merge_matches_peft_merge_and_unload(rank: int, alpha: float) -> None:
    dit = peft_dit(rank, alpha)
    assert has_lora(dit.state_dict())
    ours = merge_lora_state_dict(dit.state_dict(), alpha=alpha)
    reference = peft_merged(dit, rank, alpha)
    assert set(ours) == set(reference) == set(WanDiT(TINY).state_dict())
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    base = dit.state_dict()  # the merge is not trivial: the wrapped weights moved
    assert not torch.equal(reference["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.base_layer.weight"])
    assert not torch.equal(reference["blocks.1.ffn.2.weight"], base["blocks.1.ffn.2.base_layer.weight"])


def test_merge_by_formula_with_peft_model_prefix_and_default_rank() -> None:
    dit = peft_dit(rank=4, alpha=8.0)
    wrapped_sd = {f"base_model.model.{k}": v for k, v in dit.state_dict().items()}
    merged = merge_lora_state_dict(wrapped_sd, alpha=8.0)
    sd = dit.state_dict()
    w = sd["blocks.1.cross_attn.o.base_layer.weight"]
    a = sd["blocks.1.cross_attn.o.lora_A.default.weight"]
    b = sd["blocks.1.cross_attn.o.lora_B.default.weight"]
    torch.testing.assert_close(merged["blocks.1.cross_attn.o.weight"], w + 2.0 * b @ a)
    torch.testing.assert_close(merged["blocks.1.cross_attn.o.bias"], sd["blocks.1.cross_attn.o.base_layer.bias"])
    # alpha defaults to the rank: scale 1
    torch.testing.assert_close(merge_lora_state_dict(sd)["blocks.1.cross_attn.o.weight"], w + b @ a)


def test_merged_dit_forward_equals_unmerged_forward() -> None:
    dit = peft_dit(rank=4, alpha=16.0).eval()
    plain = WanDiT(TINY).eval()
    plain.load_state_dict(merge_lora_state_dict(dit.state_dict(), alpha=16.0), strict=True)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    t = torch.tensor([640.0])
    torch.testing.assert_close(plain(x, t, context), dit(x, t, context), rtol=1e-4, atol=1e-5)


def test_merge_refuses_bad_inputs() -> None:
    sd = peft_dit().state_dict()
    no_b = {k: v for k, v in sd.items() if "blocks.0.self_attn.q.lora_B" not in k}
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        merge_lora_state_dict(no_b)
    with pytest.raises(ValueError, match="rank"):
        merge_lora_state_dict(sd, rank=7)
    two = dict(sd)
    two["blocks.0.ffn.0.lora_A.other.weight"] = sd["blocks.0.ffn.0.lora_A.default.weight"]
    two["blocks.0.ffn.0.lora_B.other.weight"] = sd["blocks.0.ffn.0.lora_B.default.weight"]
    with pytest.raises(ValueError, match="several LoRA adapters"):
        merge_lora_state_dict(two)
    assert "blocks.0.ffn.0.weight" in merge_lora_state_dict(two, adapter="other")
    dora = dict(sd, **{"blocks.0.ffn.0.lora_magnitude_vector.default.weight": torch.ones(128)})
    with pytest.raises(NotImplementedError, match="DoRA"):
        merge_lora_state_dict(dora)


def test_dit_state_dicts_finds_prefixed_dits() -> None:
    dit, other = peft_dit(), WanDiT(TINY)
    module_sd = {**{f"network.{k}": v for k, v in dit.state_dict().items()},
                 **{f"critic.{k}": v for k, v in other.state_dict().items()}, "step": torch.tensor(3)}
    found = dit_state_dicts(module_sd, alpha=8.0)
    assert set(found) == {"network", "critic"}
    reference = peft_merged(dit, 4, 8.0)
    for key, value in reference.items():
        torch.testing.assert_close(found["network"][key], value, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(found["critic"][k], v) for k, v in other.state_dict().items())
    diffusers_named = {f"model.transformer.{k}": v for k, v in to_diffusers(other.state_dict()).items()}
    (name, converted), = dit_state_dicts(diffusers_named).items()
    assert name == "transformer" and set(converted) == set(other.state_dict())
    with pytest.raises(ValueError, match="no DiT"):
        dit_state_dicts({"a.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------------------
# cf convert teacher
# ----------------------------------------------------------------------------------------------------------------------


def latent_batches(num: int, frames: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"latents": torch.randn(1, 4, frames, 4, 4, generator=g), "text": torch.randn(1, 8, 32, generator=g),
             "caption": ["x"]} for _ in range(num)]


def fit_lora_teacher(root: Path) -> tuple[TeacherERFT, Path]:
    module = TeacherERFT(network=TINY, finetune="lora", lora_rank=4, lora_alpha=8.0, autoencoder=None,
                         text_encoder=None, layout="dense", lr=1e-2, erft={"num_buckets": 5, "capacity": 3,
                                                                          "warmup_steps": 1})
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_steps=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="last")])
    trainer.fit(module, train_dataloaders=DataLoader(latent_batches(3), batch_size=None))
    return module, root / "ckpt" / "last.ckpt"


def test_convert_teacher_exports_strict_loadable_merged_weights(tmp_path: Path) -> None:
    module, ckpt = fit_lora_teacher(tmp_path)
    lora_b = [p for n, p in module.network.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().max()) > 0 for p in lora_b), "training must move the LoRA factors off B = 0"
    out = tmp_path / "export" / "teacher.safetensors"
    cf_main(["convert", "teacher", str(ckpt), str(out)])
    exported = load_file(out)
    config = json.loads((out.parent / "config.json").read_text())
    assert WanConfig(**config) == TINY
    dit = WanDiT(WanConfig(**config))
    dit.load_state_dict(exported, strict=True)
    reference = peft_merged(module.network, rank=4, alpha=8.0)
    for key, value in reference.items():
        torch.testing.assert_close(exported[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in module.merged_state_dict().items():
        torch.testing.assert_close(exported[key], value)
    # the exported DiT computes what the LoRA-wrapped teacher computes
    g = torch.Generator().manual_seed(2)
    x, text, t = torch.randn(1, 4, 5, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g), torch.tensor([300.0])
    torch.testing.assert_close(dit.eval()(x, t, text), module.network.eval()(x, t, text), rtol=1e-4, atol=1e-5)


def test_convert_teacher_bfloat16_and_bad_checkpoint(tmp_path: Path) -> None:
    _, ckpt = fit_lora_teacher(tmp_path)
    out = tmp_path / "teacher_bf16.safetensors"
    cf_main(["convert", "teacher", str(ckpt), str(out), "--dtype", "bfloat16"])
    assert all(v.dtype == torch.bfloat16 for v in load_file(out).values())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cf_main(["convert", "teacher", str(tmp_path / "missing.ckpt"), str(out)])
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        cf_main(["convert", "teacher", str(plain), str(out)])


# ----------------------------------------------------------------------------------------------------------------------
# cf convert diffusers / original
# ----------------------------------------------------------------------------------------------------------------------


def test_convert_layouts_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dit = WanDiT(TINY)
    original = tmp_path / "original.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(original))
    cf_main(["convert", "diffusers", str(original), str(tmp_path / "diffusers.safetensors")])
    diffusers_sd = load_file(tmp_path / "diffusers.safetensors")
    assert "condition_embedder.time_embedder.linear_1.weight" in diffusers_sd and "scale_shift_table" in diffusers_sd
    assert "blocks.0.attn1.to_q.weight" in diffusers_sd
    assert not any(k.startswith("time_embedding") for k in diffusers_sd)
    torch.testing.assert_close(diffusers_sd["blocks.1.attn2.to_out.0.weight"],
                               dit.state_dict()["blocks.1.cross_attn.o.weight"])
    cf_main(["convert", "original", str(tmp_path / "diffusers.safetensors"), str(tmp_path / "back.safetensors")])
    back = load_file(tmp_path / "back.safetensors")
    fresh = WanDiT(TINY)
    fresh.load_state_dict(back, strict=True)
    assert all(torch.equal(back[k], v) for k, v in dit.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------------
# cf convert zero (the DeepSpeed consolidation itself is cf.zero's and tested in test_strategies)
# ----------------------------------------------------------------------------------------------------------------------


def test_convert_zero_writes_one_merged_file_per_dit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, critic = peft_dit(rank=4, alpha=8.0), WanDiT(TINY)
    engines = {"generator": {k: v for k, v in critic.state_dict().items()},
               "critic": {f"fake_score.{k}": v for k, v in teacher.state_dict().items()}}
    calls = []

    def fake_load(ckpt_dir, engine=None):
        calls.append((Path(ckpt_dir), engine))
        return engines[engine]

    monkeypatch.setattr(cf.zero, "load_zero_checkpoint_state_dict", fake_load)
    monkeypatch.setattr(cf.zero, "checkpoint_engine_names", lambda ckpt_dir: list(engines))
    ckpt_dir = tmp_path / "epoch=0-step=4.ckpt"
    ckpt_dir.mkdir()
    cf_main(["convert", "zero", str(ckpt_dir), str(tmp_path / "out"), "--lora-alpha", "8"])
    assert calls == [(ckpt_dir, "generator"), (ckpt_dir, "critic")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["critic.fake_score.safetensors",
                                                                     "generator.safetensors"]
    generator_sd = load_file(tmp_path / "out" / "generator.safetensors")
    assert all(torch.equal(generator_sd[k], v) for k, v in critic.state_dict().items())
    merged = load_file(tmp_path / "out" / "critic.fake_score.safetensors")
    reference = peft_merged(teacher, 4, 8.0)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit, match="not a directory"):
        cf_main(["convert", "zero", str(tmp_path / "nothing"), str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------------------------------
# ZeRO-3 for real (2 CPU processes): LoRA teacher built sharded, checkpointed as a directory, exported
# ----------------------------------------------------------------------------------------------------------------------


class InitialWeightsDump(pl.Callback):
    """Rank 0 writes the gathered DiT state at the start of training to ``<path>``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: TeacherERFT) -> None:
        params = list(pl_module.network.parameters())
        with cf.zero.gathered_parameters(params):
            state = {k: v.detach().clone() for k, v in pl_module.network.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save(state, self.path)


class SpawnLatents(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(latent_batches(8), batch_size=None)


def low_rank(delta: torch.Tensor, rank: int) -> bool:
    singular = torch.linalg.svdvals(delta.double())
    return bool(singular[rank:].max() <= 1e-6 * singular[0])


@pytest.mark.slow
def test_zero3_lora_teacher_checkpoint_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = WanDiT(TINY)
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_file))
    module = TeacherERFT(network=TINY, init_weights=str(base_file), finetune="lora", lora_rank=4, lora_alpha=8.0,
                         autoencoder=None, text_encoder=None, layout="dense", lr=1e-2,
                         erft={"num_buckets": 5, "capacity": 8, "warmup_steps": 1})
    strategy = cf.strategies.DeepSpeedStrategy(stage=3, logging_batch_size_per_gpu=1, start_method="spawn",
                                               process_timeout=400, timeout=120)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy=strategy, max_steps=3,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         callbacks=[InitialWeightsDump(str(tmp_path / "initial.pt")),
                                    pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")])
    trainer.fit(module, datamodule=SpawnLatents())

    # built sharded: the base weights were loaded and the LoRA factors start at B = 0 on every layer
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    assert all(float(v.abs().max()) == 0 for k, v in initial.items() if ".lora_B." in k)
    torch.testing.assert_close(merge_lora_state_dict(initial, alpha=8.0), base.state_dict(), rtol=0, atol=0)

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and cf.zero.checkpoint_world_size(ckpt) == 2
    out = tmp_path / "teacher.safetensors"
    cf_main(["convert", "teacher", str(ckpt), str(out)])
    exported = load_file(out)
    WanDiT(WanConfig(**json.loads((tmp_path / "config.json").read_text()))).load_state_dict(exported, strict=True)
    moved = 0
    for key, value in base.state_dict().items():
        delta = exported[key] - value
        if any(f".{name}.weight" in key for name in ("q", "k", "v", "o", "ffn.0", "ffn.2")) and "norm" not in key:
            moved += int(float(delta.abs().max()) > 0)
            assert low_rank(delta, 4), f"{key}: the trained change is not rank <= 4"
        else:
            assert torch.equal(exported[key], value), f"{key} is frozen and must equal the base"
    assert moved == 2 * 10

    cf_main(["convert", "zero", str(ckpt), str(tmp_path / "zero_out")])
    assert sorted(p.name for p in (tmp_path / "zero_out").iterdir()) == ["network.config.json",
                                                                          "network.safetensors"]
    zero_export = load_file(tmp_path / "zero_out" / "network.safetensors")
    assert all(torch.equal(zero_export[k], v) for k, v in exported.items())


def test_convert_zero_shows_progress_per_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Two engines (the gathering replaced by fixed state dicts): a progress bar on stderr that reaches 2/2
    engines, one 'wrote' line per DiT on stdout, and the files hold the given weights."""
    weights = {name: {f"{name}.{k}": v for k, v in WanDiT(TINY).state_dict().items()}
               for name in ("generator", "fake_score")}
    engines = {"generator": weights["generator"], "critic": weights["fake_score"]}
    monkeypatch.setattr(cf.zero, "checkpoint_engine_names", lambda ckpt_dir: list(engines))
    monkeypatch.setattr(cf.zero, "load_zero_checkpoint_state_dict", lambda ckpt_dir, engine: engines[engine])
    (tmp_path / "ckpt").mkdir()
    cf_main(["convert", "zero", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "cf convert zero" in captured.err and "2/2" in captured.err and "engine" in captured.err
    assert captured.out.count("wrote ") == 2
    written = load_file(tmp_path / "out" / "critic.fake_score.safetensors")
    for key, value in weights["fake_score"].items():
        assert torch.equal(written[key.removeprefix("fake_score.")], value)
