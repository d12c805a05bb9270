"""LoRA on the Wan DiT (method §E.1): apply it for fine-tuning, merge it into plain weights, export the merged DiT.

- `apply_lora` wraps the target Linears of a network with peft adapters (base frozen, fp32 factors; ZeRO-3 aware).
- `merge_lora_state_dict` folds peft factors into their base weights on a state dict, ``W ← W + (α / r)·B @ A``:
  plain maths, so exporting a checkpoint needs no model.
- `export_state_dict` is the export of a live network: its weights (ZeRO-3 partitions gathered) with LoRA merged.

`EXPORT_KEY` names the metadata a fine-tuned teacher's checkpoint carries for `cf convert` (its `WanConfig`, the
fine-tuning mode, the LoRA rank and α, the submodule holding the DiT).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cf.zero import gathered_parameters, is_zero_partitioned

__all__ = [
    "EXPORT_KEY",
    "LORA_TARGETS",
    "apply_lora",
    "export_state_dict",
    "has_lora",
    "merge_lora_state_dict",
    "strip_peft_prefix",
]

# Every Linear named q, k, v, o (self- and cross-attention) and ffn.0 / ffn.2 (§E.1); a full-match regex for peft.
LORA_TARGETS = r".*\.(self_attn|cross_attn)\.(q|k|v|o)|.*\.ffn\.(0|2)"

# Key of the export metadata a `TeacherERFT` checkpoint carries: {"wan_config": dict, "finetune": str,
# "lora_rank": int, "lora_alpha": float, "network_prefix": str}.
EXPORT_KEY = "dit_export"

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED_LORA = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


# ----------------------------------------------------------------------------------------------------------------------
# Apply
# ----------------------------------------------------------------------------------------------------------------------


def apply_lora(network: nn.Module, rank: int = 128, alpha: float = 128.0, targets: str = LORA_TARGETS) -> nn.Module:
    """Wrap the target Linears of ``network`` with peft LoRA in place (A Kaiming-uniform, B = 0, fp32 factors) and
    freeze everything else. Returns the same module; its state-dict keys gain ``base_layer`` / ``lora_A.default``.

    Under DeepSpeed ZeRO-3 (parameters created partitioned) peft's initialisation only sees empty partitions, so the
    factors are initialised again on the gathered parameters (rank 0's values are broadcast).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=True, bias="none")
    try:
        inject_adapter_in_model(config, network)
    except ValueError as exn:
        raise ValueError(f"lora_targets {targets!r} matched no Linear layer of the DiT: {exn}") from exn
    factors = []
    for name, param in network.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(is_lora)
        if is_lora:
            factors.append((name, param))
    if is_zero_partitioned(p for _, p in factors):
        with gathered_parameters([p for _, p in factors], modifier_rank=0), torch.no_grad():
            for name, param in factors:
                if ".lora_A." in name:
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                else:
                    nn.init.zeros_(param)
    else:
        for _, param in factors:
            if param.dtype != torch.float32:
                param.data = param.data.float()
    return network


# ----------------------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------------------


def strip_peft_prefix(key: str) -> str:
    """``key`` without peft's ``base_model.model.`` wrapper prefix."""
    return key.replace(_PEFT_PREFIX, "")


def has_lora(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys carry peft LoRA factors (``….lora_A[.<adapter>].weight``)."""
    return any(_LORA_KEY.match(k) for k in state_dict)


def merge_lora_state_dict(state_dict: Mapping[str, Tensor], alpha: float | None = None, rank: int | None = None,
                          adapter: str | None = None) -> dict[str, Tensor]:
    """Fold peft LoRA factors into their base Linear weights: ``W ← W + (α / r)·B @ A``.

    ``state_dict`` is a peft-wrapped module's state dict: ``X.base_layer.weight`` ``[out, in]`` (+ bias),
    ``X.lora_A.<adapter>.weight`` ``[r, in]`` and ``X.lora_B.<adapter>.weight`` ``[out, r]`` (the adapter name may be
    absent, and a ``base_model.model.`` prefix is removed). The result has plain names (``X.weight``, ``X.bias``),
    the base dtype, and keys without LoRA pass through. ``rank`` defaults to each module's ``lora_A`` rows (when
    given, it must match them); ``alpha`` defaults to the rank (scale 1). The sum is computed in float32.
    """
    sd = {strip_peft_prefix(k): v for k, v in state_dict.items()}
    unsupported = sorted({k for k in sd for name in _UNSUPPORTED_LORA if f".{name}" in k})
    if unsupported:
        raise NotImplementedError(
            f"merging {unsupported[0]!r} is not implemented: only LoRA on Linear layers (lora_A/lora_B) is supported, "
            "not embedding LoRA or DoRA"
        )
    factors: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    for key, value in sd.items():
        match = _LORA_KEY.match(key)
        if match:
            name = match["adapter"] or ""
            if adapter is not None and name != adapter:
                continue
            adapters.add(name)
            factors.setdefault(match["module"], {})[match["kind"]] = value
    if len(adapters) > 1:
        raise ValueError(f"the state dict holds several LoRA adapters {sorted(adapters)}; pass adapter=<one of them>")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if _LORA_KEY.match(key):
            continue
        module, _, leaf = key.rpartition(".base_layer.")
        out[f"{module}.{leaf}" if module else key] = value
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        weight_key = f"{module}.weight"
        if weight_key not in out:
            raise KeyError(f"LoRA factors for {module!r} but no base weight {module}.base_layer.weight")
        base = out[weight_key]
        if base.dim() != 2 or a.dim() != 2 or b.dim() != 2:
            raise NotImplementedError(f"LoRA merging supports Linear layers only; {module!r} has a "
                                      f"{base.dim()}-D weight")
        r = a.shape[0]
        if rank is not None and rank != r:
            raise ValueError(f"rank={rank} was given but {module!r} has LoRA rank {r}")
        if b.shape != (base.shape[0], r) or a.shape[1] != base.shape[1]:
            raise ValueError(f"LoRA shapes of {module!r} do not fit: W {tuple(base.shape)}, A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}")
        scale = (float(alpha) if alpha is not None else float(r)) / r
        out[weight_key] = (base.float() + scale * (b.float() @ a.float())).to(base.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------------


def export_state_dict(network: nn.Module, alpha: float | None = None) -> dict[str, Tensor]:
    """The weights of ``network`` on CPU with any LoRA merged (`merge_lora_state_dict` with ``alpha``): plain names
    that load strictly into the unwrapped network. ZeRO-3 partitions are gathered first (a collective)."""
    with gathered_parameters(network.parameters()):
        state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return merge_lora_state_dict(state, alpha=alpha) if has_lora(state) else state
