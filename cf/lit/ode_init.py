"""`ODEInitStudent`: stage 0, the causal student regressed onto teacher ODE trajectories (method §F.9, §I.20–21).

Every chunk of a stored trajectory gets its own random step index k: the chunk's input is the state stored at
step k with the student's warped timestep t_k (1000, 937.5, 833.3, 625 at shift 5), and the whole sequence goes
through the block-causal forward at once (full history, no local window: §I.20). The loss is the MSE between the
predicted x0 and the trajectory's final latent. Pairs come from `data.ode_pairs` (`cf data ode-pairs`).
Shapes: trajectories ``[B, K + 1, C, T, h, w]``; text ``[B, L, D]``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from cf.diffusion import flow_to_x0, warp_timesteps
from cf.export import read_generator_weights, write_generator_export
from cf.lit.arguments import as_dataclass, check_resumed_settings, stable_seed, stamp_checkpoint
from cf.zero import gathered_parameters, load_network_weights
from cf.models.wan import CausalWanDiT, WanConfig

__all__ = ["ODEInitStudent", "ode_regression_inputs", "ode_regression_loss"]


def _check_clean_context_prob(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"clean_context_prob must be in [0, 1) (the last chunk always carries the loss), got {p}")


def ode_regression_inputs(trajectory: Tensor, timesteps: Tensor, frames_per_chunk: int,
                          generator: torch.Generator | None = None,
                          clean_context_prob: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-chunk random step indices and the matching inputs.

    trajectory ``[B, K + 1, C, T, h, w]`` (K stored states, then the clean latent); timesteps ``[K]`` (the
    student's timestep for each stored state). With ``clean_context_prob`` p > 0, each chunk but the last is
    replaced, with probability p, by the clean latent at t = 0 (index K): the chunks after it then see a clean
    history, as they do at inference after the commit pass. Returns (x ``[B, C, T, h, w]``, t ``[B, T]``,
    index ``[B, T]``); frames with index K carry no loss.
    """
    if trajectory.dim() != 6:
        raise ValueError(f"trajectory must be [B, K + 1, C, T, h, w], got shape {tuple(trajectory.shape)}")
    b, states, c, frames, h, w = trajectory.shape
    k = states - 1
    if k != len(timesteps):
        raise ValueError(f"the trajectories hold {k} stored states but the student has {len(timesteps)} denoising "
                         "steps; regenerate the pairs with as many --stored-steps as denoising_steps")
    if frames % frames_per_chunk:
        raise ValueError(f"{frames} frames do not split into chunks of {frames_per_chunk}")
    chunks = frames // frames_per_chunk
    draw_device = generator.device if generator is not None else trajectory.device
    _check_clean_context_prob(clean_context_prob)
    index = torch.randint(0, k, (b, chunks), generator=generator, device=draw_device)
    if clean_context_prob > 0:
        clean = torch.rand((b, chunks), generator=generator, device=draw_device) < clean_context_prob
        clean[:, -1] = False  # the last chunk always carries the loss
        index = index.masked_fill(clean, k)
    index = index.to(trajectory.device).repeat_interleave(frames_per_chunk, dim=1)  # [B, T]
    per_frame = trajectory.permute(0, 3, 1, 2, 4, 5)  # [B, T, K + 1, C, h, w]
    gathered = torch.take_along_dim(per_frame, index[:, :, None, None, None, None], dim=2)[:, :, 0]
    x = gathered.permute(0, 2, 1, 3, 4)  # [B, C, T, h, w]
    with_clean = torch.cat([timesteps.float(), timesteps.new_zeros(1, dtype=torch.float32)])  # [K + 1], t = 0 last
    t = with_clean.to(trajectory.device)[index]
    return x, t, index


def ode_regression_loss(generator: CausalWanDiT, trajectory: Tensor, text: Tensor, timesteps: Tensor,
                        rng: torch.Generator | None = None, local_window_frames: int | None = None,
                        clean_context_prob: float = 0.0) -> Tensor:
    """MSE between the student's x̂0 (block-causal forward on the per-chunk inputs) and the final latent, over
    the frames that are not clean context (`ode_regression_inputs`)."""
    x, t, index = ode_regression_inputs(trajectory, timesteps, generator.frames_per_chunk, rng, clean_context_prob)
    dtype = generator.patch_embedding.weight.dtype
    flow = generator.forward_block_causal(x.to(dtype), t, text.to(dtype), local_window_frames)
    x0 = flow_to_x0(x.float(), flow.float(), t / 1000.0)
    if clean_context_prob == 0:
        return F.mse_loss(x0, trajectory[:, -1].float())
    noisy = (index < len(timesteps)).float()[:, None, :, None, None]  # [B, 1, T, 1, 1]
    error = (x0 - trajectory[:, -1].float()).square() * noisy
    return error.sum() / noisy.expand_as(error).sum()


class ODEInitStudent(pl.LightningModule):
    """Stage-0 ODE regression of the causal student.

    Args:
        network: the DiT's `WanConfig` (default Wan2.1-T2V-1.3B); built in `configure_model`.
        frames_per_chunk: latent frames per chunk (3).
        init_weights: initial weights (bidirectional Wan2.1 or teacher weights; or a student export / .ckpt).
        denoising_steps / timestep_shift / warp_denoising_steps: the student's few-step list (§B.3); the k-th
            stored state of a trajectory is paired with its k-th (warped) timestep.
        local_window_frames: attention window of the block-causal mask (None: full history, §I.20).
        clean_context_prob: probability that a chunk (not the last) is given clean at t = 0 as context for the
            chunks after it, as the inference commit pass gives it (0: Self-Forcing's recipe, all chunks noisy).
        lr / betas / weight_decay: AdamW (clip with the Trainer's ``gradient_clip_val``).
        gradient_checkpointing: recompute DiT blocks in backward.
        seed: seed of the step-index draws.
        autoencoder / autoencoder_args / text_encoder / text_encoder_args / latent_size / fps: recorded in the
            export's ``config.json`` so `cf generate` can run the initialised student (no encoder is built here).
        export_path: if set, the generator is exported there (Wan-layout safetensors + config.json) after fit.
    """

    def __init__(
        self,
        network: WanConfig | str | None = None,
        frames_per_chunk: int = 3,
        init_weights: str | None = None,
        denoising_steps: Sequence[int] = (1000, 750, 500, 250),
        timestep_shift: float = 5.0,
        warp_denoising_steps: bool = True,
        local_window_frames: int | None = None,
        clean_context_prob: float = 0.0,
        lr: float = 2e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        autoencoder: str = "toy",
        autoencoder_args: dict[str, Any] | None = None,
        text_encoder: str = "hashed",
        text_encoder_args: dict[str, Any] | None = None,
        latent_size: tuple[int, int] = (60, 104),
        fps: int = 16,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.network_config = WanConfig.wan2_1_1_3b() if network is None else as_dataclass(network, WanConfig,
                                                                                            "network")
        if frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
        if init_weights is not None and not os.path.exists(init_weights):
            raise FileNotFoundError(f"init_weights {init_weights!r} does not exist; point it to Wan2.1 / teacher "
                                    "weights (.safetensors file or folder) or set it to null")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if local_window_frames is not None and local_window_frames < frames_per_chunk:
            raise ValueError(f"local_window_frames must be >= frames_per_chunk ({frames_per_chunk}) or null")
        _check_clean_context_prob(clean_context_prob)
        steps = [float(s) for s in denoising_steps]
        self.timesteps = warp_timesteps(denoising_steps, timestep_shift).float() if warp_denoising_steps \
            else torch.tensor(steps)
        self.save_hyperparameters(logger=False)  # the CLI saves the full config; avoids clashes with the data hparams
        self.hparams.update(network=dataclasses.asdict(self.network_config), denoising_steps=list(denoising_steps),
                            betas=list(betas), latent_size=list(latent_size))
        self.generator: CausalWanDiT | torch.nn.Module = torch.nn.Module()  # built in configure_model

    def configure_model(self) -> None:
        if isinstance(self.generator, CausalWanDiT):
            return
        generator = CausalWanDiT(self.network_config, frames_per_chunk=self.hparams.frames_per_chunk)
        if self.hparams.init_weights is not None:
            load_network_weights(generator, read_generator_weights(self.hparams.init_weights, use_ema=False), "init",
                                 self.hparams.init_weights)
        if self.hparams.gradient_checkpointing:
            generator.enable_gradient_checkpointing(True)
        self.generator = generator

    def _loss(self, batch: Mapping[str, Any], rng: torch.Generator) -> Tensor:
        return ode_regression_loss(self.generator, batch["ode"].to(self.device), batch["text"].to(self.device),
                                   self.timesteps, rng, self.hparams.local_window_frames,
                                   self.hparams.clean_context_prob)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        rng = torch.Generator(device=self.device).manual_seed(
            stable_seed(self.hparams.seed, self.global_step, self.global_rank))
        loss = self._loss(batch, rng)
        self.log("train/ode_loss", loss, prog_bar=True, batch_size=batch["ode"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        rng = torch.Generator(device=self.device).manual_seed(stable_seed(self.hparams.seed, "val", batch_idx))
        loss = self._loss(batch, rng)
        self.log("val/ode_loss", loss, prog_bar=True, batch_size=batch["ode"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                 weight_decay=hp.weight_decay)

    def export_generator(self, path: str | os.PathLike) -> Path:
        """Write the generator as Wan-layout safetensors + ``config.json`` (for stage 1's ``generator_weights``
        and for `cf generate`). Collective under ZeRO-3; rank 0 writes."""
        hp = self.hparams
        with gathered_parameters(self.generator.parameters()):
            state = {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()}
        spec = {
            "wan_config": dataclasses.asdict(self.network_config), "frames_per_chunk": int(hp.frames_per_chunk),
            "autoencoder": hp.autoencoder, "autoencoder_kwargs": dict(hp.autoencoder_args or {}),
            "text_encoder": hp.text_encoder, "text_encoder_kwargs": dict(hp.text_encoder_args or {}),
            "latent_size": list(hp.latent_size), "fps": int(hp.fps),
            "sampling": {"denoising_steps": list(hp.denoising_steps), "shift": hp.timestep_shift,
                         "warp": hp.warp_denoising_steps},
            "stage": "ode_init", "global_step": int(self.global_step),
        }
        if self.global_rank == 0:
            write_generator_export(path, state, spec)
        return Path(path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stamp_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_resumed_settings(self, checkpoint)

    def on_train_end(self) -> None:
        if self.hparams.export_path:
            self.export_generator(self.hparams.export_path)
