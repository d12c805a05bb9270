"""The Wan2.1 DiT against diffusers' implementation, the causal paths against each other, bf16 numerics, and the
weight layouts."""

import copy
import math
from dataclasses import asdict

import pytest
import torch

from cf import weights
from cf.models.kv_cache import GrowingKVCache
from cf.models.wan import CausalWanDiT, WanConfig, WanDiT, count_parameters

CFG = WanConfig(dim=48, ffn_dim=96, freq_dim=16, text_dim=24, text_len=6, in_dim=4, out_dim=4, num_heads=4,
                num_layers=2)


def _diffusers_model(cfg: WanConfig):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=1024,
    ).eval()
    with torch.no_grad():  # make every parameter non-trivial (norm weights start at 1, biases at 0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _ours_from(diff_model, cls=WanDiT):
    model = cls(CFG).eval()
    weights.load_into(model, weights.from_diffusers(diff_model.state_dict()), strict=True)
    return model


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_matches_diffusers_scalar_timesteps():
    ref = _diffusers_model(CFG)
    ours = _ours_from(ref)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 6, 8)
    t = torch.tensor([937.5, 20.0])
    ctx = torch.randn(2, 7, CFG.text_dim)
    with torch.no_grad():
        expected = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert got.shape == x.shape
    assert _rel_err(got, expected) <= 1e-5


def test_matches_diffusers_per_frame_timesteps():
    ref = _diffusers_model(CFG)
    ours = _ours_from(ref)
    torch.manual_seed(2)
    x = torch.randn(2, 4, 4, 6, 8)
    t = torch.tensor([[1000.0, 750.0, 500.0, 0.0], [10.0, 20.0, 30.0, 40.0]])
    ctx = torch.randn(2, 5, CFG.text_dim)
    tokens_per_frame = (6 // 2) * (8 // 2)
    with torch.no_grad():
        expected = ref(x, t.repeat_interleave(tokens_per_frame, dim=1), ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert _rel_err(got, expected) <= 1e-5


def test_chunked_cache_forward_equals_block_causal_forward():
    torch.manual_seed(3)
    model = CausalWanDiT(CFG, frames_per_chunk=3).eval()
    x = torch.randn(2, 4, 9, 4, 6)
    t = torch.rand(2, 9) * 1000
    ctx = torch.randn(2, 5, CFG.text_dim)
    with torch.no_grad():
        full = model.forward_block_causal(x, t, ctx)
        cache = GrowingKVCache(CFG.num_layers)
        text_kv = model.text_kv(ctx)
        chunks = [model.forward_chunk(x[:, :, s:s + 3], t[:, s:s + 3], text_kv, cache, s) for s in range(0, 9, 3)]
    assert _rel_err(torch.cat(chunks, dim=2), full) <= 1e-5


def test_repeated_calls_on_a_chunk_overwrite_its_cache_slots():
    """Several denoising calls on the same chunk leave exactly the last call's K/V (as the commit pass needs)."""
    torch.manual_seed(4)
    model = CausalWanDiT(CFG, frames_per_chunk=3).eval()
    ctx = torch.randn(1, 5, CFG.text_dim)
    first, second = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        cache_a = GrowingKVCache(CFG.num_layers)
        model.forward_chunk(torch.randn(1, 4, 3, 4, 4), torch.full((1,), 900.0), ctx, cache_a, 0)
        model.forward_chunk(first, torch.zeros(1), ctx, cache_a, 0, commit=True)
        out_a = model.forward_chunk(second, torch.full((1,), 500.0), ctx, cache_a, 3)
        cache_b = GrowingKVCache(CFG.num_layers)
        model.forward_chunk(first, torch.zeros(1), ctx, cache_b, 0, commit=True)
        out_b = model.forward_chunk(second, torch.full((1,), 500.0), ctx, cache_b, 3)
    assert cache_a.num_frames == 6
    assert torch.allclose(out_a, out_b, atol=1e-6)


def test_local_window_block_causal_mask_limits_context():
    from cf.models.attention import block_causal_mask

    mask = block_causal_mask(num_frames=6, frame_seqlen=2, frames_per_chunk=2, local_window_frames=3)
    # a naive reading of §B.1: token q (frame fq, chunk c) sees key k iff end_c - 3 frames <= frame(k) < end_c
    for q in range(12):
        end = (q // 2 // 2 + 1) * 2 * 2
        for k in range(12):
            assert bool(mask[q, k]) == ((end - 6 <= k < end) or k == q)


def test_cache_writes_carry_no_gradient_and_grads_match_with_checkpointing():
    """§I.17: the cache is mutated by later chunks before backward runs; checkpointed recomputation must still
    see the K/V each chunk attended to."""
    from cf.memory import MemoryConfig, SlowFastMemory

    torch.manual_seed(5)
    model = CausalWanDiT(CFG, frames_per_chunk=3)
    x = torch.randn(1, 4, 15, 4, 4)
    ctx = torch.randn(1, 5, CFG.text_dim)

    def run(checkpointing: bool, cache):
        model.zero_grad()
        model.enable_gradient_checkpointing(checkpointing)
        outs = []
        for start in range(0, 15, 3):
            outs.append(model.forward_chunk(x[:, :, start:start + 3], torch.full((1,), 700.0), ctx, cache, start))
            with torch.no_grad():
                model.forward_chunk(x[:, :, start:start + 3], torch.zeros(1), ctx, cache, start, commit=True)
        torch.cat(outs, dim=2).square().mean().backward()
        keys = cache.keys if isinstance(cache, GrowingKVCache) else [s.keys for s in cache.layers]
        assert all(not k.requires_grad for k in keys)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for make_cache in (lambda: GrowingKVCache(CFG.num_layers),
                       lambda: SlowFastMemory(MemoryConfig(sink=1, slow=1, fast=3, rope_length=5,
                                                           consolidation_stride_chunks=1), CFG.num_layers)):
        plain, ckpt = run(False, make_cache()), run(True, make_cache())
        assert plain.keys() == ckpt.keys() and len(plain) > 0
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bfloat16_forward_runs_with_fp32_norms():
    model = WanDiT(CFG).to(torch.bfloat16)
    out = model(torch.randn(1, 4, 2, 4, 4, dtype=torch.bfloat16), torch.full((1,), 500.0),
                torch.randn(1, 5, CFG.text_dim, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------------------ bf16 numerics

DEEP = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=8, in_dim=4, out_dim=4, num_heads=2,
                 num_layers=8)


def _fp32_and_bf16_models(cls, seed: int):
    """An fp32 model with bf16-representable weights and its bf16 copy: their outputs differ only by the precision
    of the computation, not by the weights."""
    torch.manual_seed(seed)
    ref = cls(DEEP).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_((p + 0.1 * torch.randn_like(p)).to(torch.bfloat16).float())
    return ref, copy.deepcopy(ref).to(torch.bfloat16)


def _bf16_inputs():
    torch.manual_seed(100)
    x = torch.randn(2, 4, 6, 8, 8).to(torch.bfloat16)
    ctx = torch.randn(2, 5, DEEP.text_dim).to(torch.bfloat16)
    t = torch.tensor([[990.0] * 3 + [515.0] * 3, [731.0] * 3 + [37.0] * 3])
    return x, t, ctx


def _chunked(model, x, t, ctx):
    cache = GrowingKVCache(model.config.num_layers)
    text_kv = model.text_kv(ctx)
    return torch.cat([model.forward_chunk(x[:, :, s:s + 3], t[:, s:s + 3], text_kv, cache, s) for s in (0, 3)], 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("path", ["bidirectional", "block_causal", "chunked"])
def test_bf16_forward_is_close_to_the_fp32_reference(path, seed):
    """With an fp32 residual stream and time embedding (as in the original Wan2.1) the bf16 output of an 8-layer
    model stays within 0.7% of the fp32 output; bf16 residual adds and a bf16 time MLP gave 0.86–0.95%."""
    cls = WanDiT if path == "bidirectional" else CausalWanDiT
    ref, low = _fp32_and_bf16_models(cls, seed)
    x, t, ctx = _bf16_inputs()
    run = {"bidirectional": lambda m, *a: m(a[0], a[1][:, 0], a[2]),
           "block_causal": lambda m, *a: m(*a),
           "chunked": _chunked}[path]
    with torch.no_grad():
        expected = run(ref, x.float(), t, ctx.float())
        got = run(low, x, t, ctx)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert _rel_err(got.float(), expected) < 0.007


def test_bf16_model_keeps_time_embedding_and_residual_stream_in_fp32():
    ref, low = _fp32_and_bf16_models(CausalWanDiT, 0)
    x, t, ctx = _bf16_inputs()
    # the time MLP computes in fp32 from bf16 weights and under an active bf16 autocast alike
    e_ref, e0_ref = ref.time_embeddings(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e_ac, e0_ac = ref.time_embeddings(t)
    for e, e0 in (low.time_embeddings(t), (e_ac, e0_ac)):
        assert e.dtype == e0.dtype == torch.float32
        assert torch.equal(e, e_ref) and torch.equal(e0, e0_ref)
    # between blocks the hidden state is fp32; inside, each sub-layer computes in bf16
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(out.dtype)) for b in low.blocks]
    hooks += [m.register_forward_hook(lambda m, args, out: seen.append((type(m).__name__, args[0].dtype)))
              for m in (low.blocks[0].self_attn, low.blocks[0].cross_attn, low.blocks[0].ffn, low.head.head)]
    with torch.no_grad():
        low(x, t, ctx)
    for h in hooks:
        h.remove()
    assert seen.count(torch.float32) == DEEP.num_layers
    assert {s for s in seen if isinstance(s, tuple)} == {
        ("WanSelfAttention", torch.bfloat16), ("WanCrossAttention", torch.bfloat16),
        ("Sequential", torch.bfloat16), ("Linear", torch.bfloat16)}


def test_bf16_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(6)
    model = CausalWanDiT(CFG, frames_per_chunk=3).to(torch.bfloat16)
    x = torch.randn(1, 4, 6, 4, 4, dtype=torch.bfloat16)
    ctx = torch.randn(1, 5, CFG.text_dim, dtype=torch.bfloat16)
    t = torch.rand(1, 6) * 1000
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(checkpointing)
        model.forward_block_causal(x, t, ctx).float().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------ weight layouts

# Shapes of the released Wan2.1-T2V-1.3B checkpoint (§A.7), written out independently of the model code.
def _expected_1_3b_shapes():
    d, f, L = 1536, 8960, 30
    shapes = {
        "patch_embedding.weight": (d, 16, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, 4096), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (64, d), "head.head.bias": (64,),
    }
    for i in range(L):
        p = f"blocks.{i}."
        shapes[p + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{p}{attn}.{proj}.weight"] = (d, d)
                shapes[f"{p}{attn}.{proj}.bias"] = (d,)
            shapes[f"{p}{attn}.norm_q.weight"] = (d,)
            shapes[f"{p}{attn}.norm_k.weight"] = (d,)
        shapes[p + "norm3.weight"] = (d,)
        shapes[p + "norm3.bias"] = (d,)
        shapes[p + "ffn.0.weight"] = (f, d)
        shapes[p + "ffn.0.bias"] = (f,)
        shapes[p + "ffn.2.weight"] = (d, f)
        shapes[p + "ffn.2.bias"] = (d,)
    return shapes


def test_1_3b_preset_has_exactly_the_released_shapes():
    with torch.device("meta"):
        model = CausalWanDiT(WanConfig.wan2_1_1_3b())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_1_3b_shapes()
    assert math.isclose(count_parameters(model) / 1e9, 1.42, abs_tol=0.005)


def test_layout_round_trips():
    ref = _diffusers_model(CFG)
    diff_sd = ref.state_dict()
    original = weights.from_diffusers(diff_sd)
    assert set(original) == set(WanDiT(CFG).state_dict())
    back = weights.to_diffusers(original)
    assert set(back) == set(diff_sd)
    assert all(torch.equal(back[k], diff_sd[k]) for k in diff_sd)


def test_prefix_stripping_and_safetensors_round_trip(tmp_path):
    model = WanDiT(CFG)
    wrapped = {f"model._fsdp_wrapped_module.{k}": v for k, v in model.state_dict().items()}
    assert weights.strip_training_prefixes(wrapped).keys() == model.state_dict().keys()
    path = weights.save_wan_weights(wrapped, tmp_path / "dit.safetensors")
    other = WanDiT(CFG)
    weights.load_wan_weights(other, path, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    # a diffusers-layout file loads into the same names
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.to_diffusers(model.state_dict()).items()},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    third = WanDiT(CFG)
    weights.load_wan_weights(third, tmp_path, strict=True)
    assert torch.equal(third.blocks[1].cross_attn.k.weight, model.blocks[1].cross_attn.k.weight)


def test_sharded_index_is_read(tmp_path):
    from safetensors.torch import save_file
    import json

    sd = WanDiT(CFG).state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = weights.read_state_dict(tmp_path)
    assert loaded.keys() == sd.keys()


def test_mismatched_weights_name_the_problem():
    sd = WanDiT(CFG).state_dict()
    sd.pop("head.head.bias")
    sd["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(weights.WeightLoadError) as err:
        weights.load_into(WanDiT(CFG), sd)
    message = str(err.value)
    assert "head.head.bias" in message and "extra.weight" in message and "blocks.0.ffn.0.weight" in message


def test_wrong_input_shapes_raise_value_errors():
    model = WanDiT(CFG)
    ctx = torch.randn(1, 5, CFG.text_dim)
    with pytest.raises(ValueError, match=r"\[B, 4, T, H, W\]"):
        model(torch.randn(1, 3, 2, 4, 4), torch.zeros(1), ctx)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 4, 2, 5, 4), torch.zeros(1), ctx)
    with pytest.raises(ValueError, match=r"\[B=1\] or \[B=1, T=2\]"):
        model(torch.randn(1, 4, 2, 4, 4), torch.zeros(1, 3), ctx)
    with pytest.raises(ValueError, match=f"text embeddings \\[B=1, L, {CFG.text_dim}\\]"):
        model(torch.randn(1, 4, 2, 4, 4), torch.zeros(1), torch.randn(1, 5, 7))


@pytest.mark.parametrize("field, value, match", [
    ("num_layers", -3, r"network\.num_layers must be an integer >= 1, got -3"),
    ("num_layers", 0, r"network\.num_layers must be an integer >= 1, got 0"),
    ("dim", -64, r"network\.dim must be an integer >= 1, got -64"),
    ("num_heads", 0, r"network\.num_heads must be an integer >= 1, got 0"),
    ("ffn_dim", 0, r"network\.ffn_dim must be an integer >= 1"),
    ("patch_size", (1, 0, 2), r"network\.patch_size must be three integers >= 1"),
])
def test_bad_config_values_are_named(field, value, match):
    fields = {**asdict(WanConfig.tiny()), field: value}
    with pytest.raises(ValueError, match=match):
        WanConfig(**fields)


def test_wan_config_presets_by_name():
    from cf.lit.arguments import as_dataclass

    assert WanConfig.preset("wan2.1-1.3b") == WanConfig.wan2_1_1_3b()
    assert as_dataclass("tiny", WanConfig, "network") == WanConfig.tiny()
    with pytest.raises(ValueError, match="unknown WanConfig preset 'wan2.2'"):
        WanConfig.preset("wan2.2")
