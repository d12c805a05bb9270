"""How well a teacher continues held-out clips of the synthetic sprite world, against their ground truth.

Each held-out clip is cut into the teacher's long layout (`cf.teacher_layout.long_layout`: sink | sparse | motion |
target, §E.2); the teacher samples the target latents from noise given the clean context (`cf.sampling.
continue_latents`: Euler over the shifted σ grid, classifier-free guidance against the empty prompt); the sampled
and the true target latents are decoded by the same autoencoder and compared:

- **attribute fidelity**: `cf.evaluation.prompted.prompt_fidelity` of the continuation against *all* the clip's
  attributes (background colour and sprite colours), named by its caption or not: with an unnamed caption ("two
  shapes on a striped background") only the context tells what the sprites and the background look like, so this
  measures what the teacher takes from its context. Reported next to the same score of the true continuation;
- **PSNR** of the continuation against the true continuation (both through the autoencoder), in dB over the
  target's frames: the sprites' motion is random but continues smoothly, so the first frames are predictable.

The demo (`cf demo`) scores the toy base (no context training) and the ERFT teacher on the same clips and noise.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from cf.evaluation.prompted import measured_attributes, prompt_fidelity

__all__ = ["continuation_psnr", "all_attributes", "continuation_quality"]


def continuation_psnr(generated: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of uint8 ``[T, H, W, 3]`` frames against ``truth`` (same shape): 10·log10(255² / MSE)."""
    if generated.shape != truth.shape:
        raise ValueError(f"shapes differ: {generated.shape} vs {truth.shape}")
    mse = float(np.mean((generated.astype(np.float64) - truth.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def all_attributes(gt: Mapping[str, Any]) -> dict[str, Any]:
    """The ground truth with its caption record removed, so `prompt_fidelity` checks every attribute."""
    return {k: v for k, v in gt.items() if k != "caption"}


def _decode(autoencoder, latents: Tensor) -> np.ndarray:
    from cf.video_io import to_uint8_frames

    with torch.no_grad():
        pixels = autoencoder.decode(latents.float())  # [1, 3, T, H, W]
    return to_uint8_frames(pixels[0])


def continuation_quality(network, autoencoder, text_encoder, clips: Sequence[Mapping[str, Any]],
                         layout_config, sampling: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Score ``network``'s continuations of ``clips`` (each ``{"caption", "gt", "frames" uint8 [T, H, W, 3]}``,
    as `cf.toy_base.held_out_clips` returns them; the last frames of each clip are the target) under the long
    layout ``layout_config`` (`LongLayoutConfig`) with ``sampling`` (``num_inference_steps``, ``shift``,
    ``guidance_scale``). Returns the mean scores of the continuations and of the true continuations (``truth_*``)
    over all clips and over those whose caption leaves the colours unnamed, and per-clip rows; the noise of clip i
    is drawn from ``seed + i`` so two networks are compared on the same noise."""
    from cf.diffusion import sampling_sigmas
    from cf.sampling import continue_latents
    from cf.teacher_layout import long_layout

    sigmas = sampling_sigmas(int(sampling["num_inference_steps"]), float(sampling["shift"]))
    negative = text_encoder([str(sampling.get("negative_prompt", ""))])
    rows = []
    network.eval()
    for i, clip in enumerate(clips):
        video = torch.from_numpy(np.ascontiguousarray(clip["frames"])).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        layout = long_layout(video, autoencoder, layout_config)
        text = text_encoder([clip["caption"]])
        generator = torch.Generator().manual_seed(int(seed) + i)
        target = layout.target
        sampled = continue_latents(network, layout.context, text, target.shape[2], sigmas,
                                   float(sampling["guidance_scale"]), negative, generator=generator)
        generated, truth = _decode(autoencoder, sampled), _decode(autoencoder, target)
        gt = all_attributes(clip["gt"])
        score, reference = prompt_fidelity(generated, gt), prompt_fidelity(truth, gt)
        names_colours = measured_attributes(clip["gt"]) == {"background_color", "sprite_colors"}
        rows.append({"caption": clip["caption"], "caption_names_colours": names_colours,
                     "psnr_db": continuation_psnr(generated, truth),
                     "background_coverage": score["background_coverage"], "sprite_presence": score["sprite_presence"],
                     "truth_background_coverage": reference["background_coverage"],
                     "truth_sprite_presence": reference["sprite_presence"]})

    def mean(key: str, subset: list[dict]) -> float | None:
        values = [r[key] for r in subset if r[key] is not None]
        return float(np.mean(values)) if values else None

    summary: dict[str, Any] = {"clips": len(rows), "sampling": dict(sampling), "rows": rows}
    for name, subset in (("all", rows), ("unnamed_captions", [r for r in rows if not r["caption_names_colours"]])):
        part = {key: mean(key, subset) for key in ("psnr_db", "background_coverage", "sprite_presence",
                                                   "truth_background_coverage", "truth_sprite_presence")}
        part["clips"] = len(subset)
        summary[name] = part
    return summary
