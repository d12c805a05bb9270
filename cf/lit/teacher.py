"""`TeacherERFT`: fine-tunes a bidirectional Wan DiT into the long-context teacher with Error-Recycling Fine-Tuning
(method §E).

One step: a clip becomes a teacher layout (``[sink | sparse | motion | target]`` from pixels, or ``[context |
target]``; contiguous positions, §D.3); one grid timestep is drawn for the whole sequence (§E.1); recycled errors
perturb the target noise, the target latent and the context (§E.3); the DiT sees ``[context | x_t]`` and the
flow-matching loss, weighted by w(t), looks at the target frames only; the prediction's residuals go back into the
error banks on every rank. The banks and the module's random stream are part of the checkpoint, so a resumed
run continues exactly.

Maths lives in `cf.erft`, `cf.error_bank`, `cf.teacher_layout`, `cf.diffusion` and `cf.losses`; the teacher's sampler
is `cf.sampling.continue_latents`.
Shapes: pixels ``[B, 3, N, H, W]`` in [-1, 1]; latents ``[B, C, T, h, w]``; text ``[B, L, D]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from cf.diffusion import flow_target, sample_grid_timesteps, sampling_sigmas
from cf.encoders import FrozenEncoders, TextEncoder, VideoAutoencoder
from cf.erft import ErrorInjector, Injection, InjectionFlags
from cf.error_bank import ErrorBanks
from cf.teacher_layout import (
    LongLayoutConfig,
    TeacherLayout,
    dense_layout,
    long_layout,
    long_layout_from_latents,
)
from cf.lit.arguments import as_dataclass, check_resumed_settings, stamp_checkpoint
from cf.lora import EXPORT_KEY, LORA_TARGETS, apply_lora, export_state_dict
from cf.losses import flow_matching_loss
from cf.models.wan import WanConfig, WanDiT
from cf.sampling import continue_latents
from cf.weights import load_wan_weights
from cf.zero import gathered_parameters, is_zero_partitioned, rank_and_world

log = logging.getLogger(__name__)

__all__ = [
    "ERFTConfig",
    "ERFT_STATE_KEY",
    "ERFTStepOutput",
    "TeacherERFT",
    "TeacherSamplingConfig",
]

ERFT_STATE_KEY = "erft_state"


@dataclass
class ERFTConfig(ErrorInjector):
    """Error-Recycling Fine-Tuning settings (§E.3; defaults are the paper's, §J.3 has the toy values): the
    injection settings of `cf.erft.ErrorInjector` (declared and checked there) and the error banks'.

    Injection: per step, noise / context / latent errors are tried with their probabilities, then ``clean_prob``
    switches all off; ``error_modulate`` m scales each error by U(1 − m, 1 + m). Banks: ``num_buckets`` timestep
    buckets of ``capacity`` entries each, replacement ``policy``, total caps ``max_total_entries`` /
    ``max_total_bytes`` per bank (§I.23), all-gather warm-up of ``warmup_steps`` during which clean-step errors are
    kept with ``clean_insert_prob``; entries stored as ``storage_dtype`` in RAM (``storage="memory"``) or in one
    memory-mapped file per bank and rank under ``storage_dir`` on local disk (``storage="disk"``,
    `cf.error_bank.ErrorBank`).
    """

    num_buckets: int = 50
    capacity: int = 500
    policy: str = "l2_batch"
    max_total_entries: int | None = None
    max_total_bytes: int | None = None
    warmup_steps: int = 50
    clean_insert_prob: float = 0.1
    storage_dtype: str = "float16"
    storage: str = "memory"
    storage_dir: str | None = None

    def injector(self) -> ErrorInjector:
        return ErrorInjector(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ErrorInjector)})

    def banks(self, shift: float, seed: int) -> ErrorBanks:
        return ErrorBanks(num_buckets=self.num_buckets, capacity=self.capacity, shift=shift, policy=self.policy,
                          max_total_entries=self.max_total_entries, max_total_bytes=self.max_total_bytes,
                          warmup_steps=self.warmup_steps, clean_insert_prob=self.clean_insert_prob,
                          storage_dtype=self.storage_dtype, seed=seed, storage=self.storage,
                          storage_dir=self.storage_dir)


@dataclass
class TeacherSamplingConfig:
    """The teacher's own sampler (§E.4): Euler over the shifted grid, CFG ``uncond + g·(cond − uncond)``."""

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 5.0
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.shift <= 0:
            raise ValueError(f"sampling shift must be > 0, got {self.shift}")


class ERFTStepOutput(NamedTuple):
    """What one ERFT step computed: the loss, the timesteps ``[B]``, the target prediction and its flow target
    ``[B, C, T_target, h, w]``, the injection and the injection flags."""

    loss: Tensor
    t: Tensor
    flow_pred: Tensor
    flow_target: Tensor
    injection: Injection
    flags: InjectionFlags


def _state_bytes(state: Tensor) -> bytes:
    return state.numpy().tobytes()


def _state_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------------------------------


class TeacherERFT(pl.LightningModule):
    """Long-context teacher fine-tuning with ERFT (§E).

    Args:
        network: the DiT's `WanConfig` (YAML: ``network: {dim: 64, num_layers: 2, ...}``); default Wan2.1-T2V-1.3B.
            The DiT is built in `configure_model` (created sharded under ZeRO-3).
        init_weights: Wan2.1 DiT weights (original or diffusers layout; file or folder) loaded into the base model.
        finetune: ``"lora"`` (rank/alpha on ``lora_targets``, base frozen; §E.1) or ``"full"``.
        gradient_checkpointing: recompute DiT blocks in backward.
        autoencoder / text_encoder: ``"toy"`` / ``"hashed"`` or local folders (frozen, kept out of checkpoints);
            None when batches are pre-encoded (``latents`` mode; the negative prompt is then all zeros).
        autoencoder_args / text_encoder_args: keyword arguments of the toy encoders (e.g. ``{dim: 32}``).
        encoder_dtype: dtype of the real encoders.
        layout: ``"long"`` = ``[sink | sparse | motion | target]`` (`long_layout` on pixels,
            `long_layout_from_latents` on latents), ``"dense"`` = ``[context | target]``, or ``"batch"``: each
            video batch names its layout (``data.VideoDataModule(teacher_clips=...)``: ``"long"`` from the clip's
            ``frame_index``, or ``"dense"`` split at its ``context_latents``), so one run trains on a mix of
            sequence lengths.
        long_layout: segment counts of the long layout (default: the paper's 3 | ≤ 12 | 6 | 21).
        dense_context_frames: context length of the dense layout (default: half the clip).
        shift: shift of the training timestep grid and of w(t) (§E.3: 5).
        erft: injection probabilities and bank settings.
        sampling: the teacher's own sampler (validation videos, `continue_video`).
        caption_dropout: probability that a training sample's caption is replaced by the sampler's negative prompt,
            which trains the unconditional branch that classifier-free guidance uses (0: never).
        lr, betas, weight_decay: AdamW (§E.4). Clip gradients with the Trainer's ``gradient_clip_val``.
        seed: seed of the module's `random_stream` (timesteps, noise, injection draws; rank r uses seed + r).
        val_timesteps: timesteps of the held-out flow loss (fixed noise per batch).
        val_sample_batches: validation batches per epoch continued with the sampler; the decoded videos (truth |
            teacher) go to ``videos_to_log`` for ``callbacks.video_logger.VideoLogger``.
    """

    def __init__(
        self,
        network: WanConfig | str | None = None,
        init_weights: str | None = None,
        finetune: Literal["lora", "full"] = "lora",
        lora_rank: int = 128,
        lora_alpha: float = 128.0,
        lora_targets: str = LORA_TARGETS,
        gradient_checkpointing: bool = False,
        autoencoder: str | None = "toy",
        autoencoder_args: dict[str, Any] | None = None,
        text_encoder: str | None = "hashed",
        text_encoder_args: dict[str, Any] | None = None,
        encoder_dtype: str = "float32",
        layout: Literal["long", "dense", "batch"] = "long",
        long_layout: LongLayoutConfig | None = None,
        dense_context_frames: int | None = None,
        shift: float = 5.0,
        erft: ERFTConfig | None = None,
        sampling: TeacherSamplingConfig | None = None,
        caption_dropout: float = 0.0,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        seed: int = 0,
        val_timesteps: list[float] | None = None,
        val_sample_batches: int = 1,
    ) -> None:
        super().__init__()
        self.network_config = WanConfig.wan2_1_1_3b() if network is None else as_dataclass(network, WanConfig,
                                                                                            "network")
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        if layout not in ("long", "dense", "batch"):
            raise ValueError(f"layout must be 'long', 'dense' or 'batch', got {layout!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {caption_dropout}")
        self.long_layout_config = LongLayoutConfig() if long_layout is None else \
            as_dataclass(long_layout, LongLayoutConfig, "long_layout")
        self.erft_config = ERFTConfig() if erft is None else as_dataclass(erft, ERFTConfig, "erft")
        self.sampling_config = TeacherSamplingConfig() if sampling is None else \
            as_dataclass(sampling, TeacherSamplingConfig, "sampling")
        self.val_timesteps = [float(t) for t in (val_timesteps if val_timesteps is not None else (250, 500, 750))]
        if any(not 0 < t <= 1000 for t in self.val_timesteps):
            raise ValueError(f"val_timesteps must lie in (0, 1000], got {self.val_timesteps}")
        self.save_hyperparameters()
        # plain dicts in the checkpoint, so that it loads with torch.load(weights_only=True)
        self.hparams.update(network=dataclasses.asdict(self.network_config),
                            long_layout=dataclasses.asdict(self.long_layout_config),
                            erft=dataclasses.asdict(self.erft_config),
                            sampling=dataclasses.asdict(self.sampling_config))
        self.injector = self.erft_config.injector()
        self.banks = self.erft_config.banks(shift, seed)
        self.network: WanDiT | None = None
        # encoders are frozen and stay out of the module tree: no checkpoint weights, no ZeRO partitioning
        self.encoders = FrozenEncoders(autoencoder, text_encoder, encoder_dtype, autoencoder_args, text_encoder_args,
                                       in_dim=self.network_config.in_dim, text_dim=self.network_config.text_dim)
        self.__dict__["_object_group"] = None
        self._random_stream: torch.Generator | None = None
        self.videos_to_log: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Build the DiT (load ``init_weights``, wrap LoRA); idempotent. Checks the encoders fit it."""
        if self.network is not None:
            return
        init_weights = self.hparams.init_weights
        if init_weights is not None and not os.path.exists(init_weights):
            raise FileNotFoundError(f"init_weights {init_weights!r} does not exist; point it to a Wan2.1 "
                                    "diffusion_pytorch_model.safetensors (or its folder) or set it to null")
        network = WanDiT(self.network_config)
        if init_weights is not None:
            self._load_base_weights(network, init_weights)
        if self.hparams.gradient_checkpointing:
            network.enable_gradient_checkpointing(True)
        if self.hparams.finetune == "lora":
            apply_lora(network, self.hparams.lora_rank, self.hparams.lora_alpha, self.hparams.lora_targets)
        self.network = network
        self.encoders.check_fit()

    @staticmethod
    def _load_base_weights(network: WanDiT, path: str) -> None:
        """Load ``path`` into ``network``; under ZeRO-3 rank 0 reads the file into the gathered parameters and its
        values are broadcast (a collective)."""
        params = list(network.parameters())
        if not is_zero_partitioned(params):
            load_wan_weights(network, path)
            return
        with gathered_parameters(params, modifier_rank=0):
            if rank_and_world()[0] == 0:
                load_wan_weights(network, path)

    def setup(self, stage: str) -> None:
        self.encoders.build()
        if dist.is_available() and dist.is_initialized() and self._object_group is None \
                and dist.get_backend() != "gloo":
            # checkpointing gathers every rank's error banks on rank 0 through host memory, not GPU memory
            self.__dict__["_object_group"] = dist.new_group(backend="gloo")

    @property
    def autoencoder(self) -> VideoAutoencoder:
        """The frozen autoencoder, on this module's device."""
        return self.encoders.get("autoencoder", self.device, "encode pixel clips and decode videos")

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen text encoder, on this module's device."""
        return self.encoders.get("text_encoder", self.device, "embed captions")

    def random_stream(self) -> torch.Generator:
        """The module's CPU random generator (seed + global rank) for timesteps, noise, injection draws and caption
        dropout; its state is checkpointed."""
        if self._random_stream is None:
            self._random_stream = torch.Generator().manual_seed(int(self.hparams.seed) + self.global_rank)
        return self._random_stream

    def _require_network(self) -> WanDiT:
        if self.network is None:
            raise RuntimeError("the DiT is not built yet: call configure_model() (the Trainer does this)")
        return self.network

    def _network_dtype(self) -> torch.dtype:
        return self._require_network().patch_embedding.weight.dtype

    # ------------------------------------------------------------------------------------------------ inputs
    def teacher_inputs(self, batch: Mapping[str, Any]) -> tuple[TeacherLayout, Tensor]:
        """(layout, text embeddings ``[B, L, D]``) of a ``video`` or ``latents`` batch of `data.VideoDataModule`."""
        hp = self.hparams
        if "video" in batch:
            video = batch["video"]
            autoencoder = self.autoencoder
            video = video.to(self.device, torch.float32)
            kind, num_context, frame_index = self._video_layout(batch)
            if kind == "long":
                layout = long_layout(video, autoencoder, self.long_layout_config, frame_index)
            else:
                with torch.no_grad():
                    latents = autoencoder.encode(video)
                first = 0 if frame_index is None else int(frame_index[0])
                layout = dense_layout(latents, num_context, autoencoder.temporal_factor, first)
        elif "latents" in batch:
            if hp.layout == "batch":
                raise ValueError("layout='batch' reads the layout of video batches (data teacher_clips); latent "
                                 "batches need layout='long' or 'dense'")
            latents = batch["latents"].to(self.device)
            factor = int(getattr(self.encoders.built.get("autoencoder"), "temporal_factor", 4))
            if hp.layout == "long":
                layout = long_layout_from_latents(latents, self.long_layout_config, factor)
            else:
                layout = dense_layout(latents, hp.dense_context_frames, factor)
        else:
            raise ValueError(f"a teacher batch needs 'video' (data mode 'video') or 'latents' (mode 'latents'); "
                             f"got keys {sorted(batch)}")
        if layout.latents.shape[1] != self.network_config.in_dim:
            raise ValueError(f"latents have {layout.latents.shape[1]} channels but the DiT takes "
                             f"{self.network_config.in_dim}; check the autoencoder / latent shards")
        if "text" in batch:
            text = batch["text"].to(self.device)
        else:
            text = self.text_encoder(list(batch["caption"]))
        return layout, text

    def _video_layout(self, batch: Mapping[str, Any]) -> tuple[str, int | None, Tensor | None]:
        """(layout kind, dense context latents, frame_index ``[N]`` or None) of a video batch."""
        hp = self.hparams
        if hp.layout != "batch":
            return hp.layout, hp.dense_context_frames, None
        missing = [k for k in ("layout", "frame_index", "context_latents") if k not in batch]
        if missing:
            raise ValueError(f"layout='batch' needs video batches that name their layout, but {missing} are missing; "
                             "set data.teacher_clips (data.VideoDataModule) or model.layout='long' / 'dense'")
        kinds, contexts, frame_index = list(batch["layout"]), list(batch["context_latents"]), batch["frame_index"]
        rows = torch.as_tensor(frame_index)
        if len(set(kinds)) != 1 or len(set(contexts)) != 1 or not bool((rows == rows[:1]).all()):
            raise ValueError(f"the samples of a batch have different layouts ({kinds}, context {contexts}); "
                             "teacher clips come one per batch (batch_size 1)")
        if kinds[0] not in ("long", "dense"):
            raise ValueError(f"a batch names layout {kinds[0]!r}; expected 'long' or 'dense'")
        return kinds[0], int(contexts[0]), rows[0].cpu()

    def negative_embeddings(self, batch_size: int, like: Tensor) -> Tensor:
        """Embeddings ``[B, L, D]`` of the sampler's negative prompt (zeros without a text encoder)."""
        if self.hparams.text_encoder is None:
            return torch.zeros_like(like)
        negative = self.text_encoder.embed_cached([self.sampling_config.negative_prompt])
        return negative.to(like).expand(batch_size, *negative.shape[1:])

    # ------------------------------------------------------------------------------------------------ training
    def drop_captions(self, text: Tensor) -> Tensor:
        """``text`` ``[B, L, D]`` with each row replaced by the negative prompt's embedding with probability
        ``caption_dropout`` (drawn from `random_stream`; no draw at all when it is 0)."""
        p = float(self.hparams.caption_dropout)
        if p == 0.0:
            return text
        dropped = (torch.rand(text.shape[0], generator=self.random_stream()) < p).to(text.device)
        negative = self.negative_embeddings(text.shape[0], text)
        return torch.where(dropped[:, None, None], negative, text)

    def erft_step(self, layout: TeacherLayout, text: Tensor, harvest: bool = True) -> ERFTStepOutput:
        """One ERFT step on a layout (§E.3): draw t and noise, inject, predict, weighted flow loss on the target,
        harvest the residuals into the banks (``harvest``; a collective during the bank warm-up)."""
        network = self._require_network()
        generator = self.random_stream()
        target = layout.target.float()
        batch = target.shape[0]
        t = sample_grid_timesteps(batch, self.hparams.shift, generator=generator).to(self.device)
        noise = torch.randn(target.shape, generator=generator).to(self.device)
        flags = self.injector.draw_flags(generator)
        injection = self.injector.inject(target, noise, layout.context.float(), t, self.banks, flags, generator,
                                         context_error_slice=layout.context_error_slice)
        sequence = torch.cat([injection.context, injection.noisy_target], dim=2).to(self._network_dtype())
        flow = network(sequence, t, text.to(self._network_dtype()))
        flow_pred = flow[:, :, layout.num_context_frames:]
        loss = flow_matching_loss(flow_pred.float(), injection.noise, target, t, weighting=True,
                                  shift=self.hparams.shift)
        v_star = flow_target(target, injection.noise)
        if harvest:
            self.banks.harvest(flow_pred.detach().float(), v_star, t, flags.clean_step)
        return ERFTStepOutput(loss, t, flow_pred, v_star, injection, flags)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        layout, text = self.teacher_inputs(batch)
        out = self.erft_step(layout, self.drop_captions(text))
        info = out.injection.info
        batch_size = layout.latents.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({
            "train/t": out.t.float().mean(),
            "train/sequence_frames": float(layout.latents.shape[2]),
            "train/context_frames": float(layout.num_context_frames),
            "erft/clean_step": float(out.flags.clean_step),
            "erft/noise_injected": info.noise_applied.float().mean(),
            "erft/latent_injected": info.latent_applied.float().mean(),
            "erft/context_injected": info.context_applied.float().mean(),
            **{f"erft/{k}": v for k, v in self.banks.stats().items()},
        }, batch_size=batch_size)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self._require_network().parameters() if p.requires_grad]
        if not params:
            raise ValueError("the DiT has no trainable parameters; check finetune / lora_targets")
        return torch.optim.AdamW(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                 weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def continue_video(
        self,
        context_latents: Tensor,
        prompt_embeddings: Tensor,
        num_target_frames: int,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_embeddings: Tensor | None = None,
        shift: float | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Continue ``context_latents`` ``[B, C, T_c, h, w]`` by ``num_target_frames`` latents with the teacher's
        sampler (defaults from ``sampling``); ``prompt_embeddings`` ``[B, L, D]``; the negative prompt defaults to
        the configured one. Returns ``[B, C, num_target_frames, h, w]``."""
        network = self._require_network()
        cfg = self.sampling_config
        steps = num_inference_steps or cfg.num_inference_steps
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        text = prompt_embeddings.to(self.device, self._network_dtype())
        if negative_embeddings is None and scale != 1.0:
            negative_embeddings = self.negative_embeddings(text.shape[0], text)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = lambda it: tqdm(it, desc="teacher sampling", unit="step", leave=False)  # noqa: E731
        was_training = network.training
        network.eval()
        try:
            return continue_latents(
                network, context_latents.to(self.device, self._network_dtype()), text, num_target_frames,
                sampling_sigmas(steps, cfg.shift if shift is None else shift), scale, negative_embeddings,
                noise=noise, generator=generator, progress=bar,
            )
        finally:
            network.train(was_training)

    # ------------------------------------------------------------------------------------------------ validation
    def held_out_loss(self, layout: TeacherLayout, text: Tensor, generator: torch.Generator) -> Tensor:
        """Weighted flow loss on the target without error injection, averaged over ``val_timesteps`` (one noise
        draw from ``generator`` per timestep): a deterministic measure of the teacher's fit."""
        network = self._require_network()
        target = layout.target.float()
        losses = []
        for t_value in self.val_timesteps:
            noise = torch.randn(target.shape, generator=generator).to(self.device)
            t = torch.full((target.shape[0],), t_value, device=self.device)
            s = t_value / 1000.0
            sequence = torch.cat([layout.context.float(), (1 - s) * target + s * noise], dim=2)
            flow = network(sequence.to(self._network_dtype()), t, text.to(self._network_dtype()))
            losses.append(flow_matching_loss(flow[:, :, layout.num_context_frames:].float(), noise, target, t,
                                             weighting=True, shift=self.hparams.shift))
        return torch.stack(losses).mean()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        layout, text = self.teacher_inputs(batch)
        generator = torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + batch_idx)
        loss = self.held_out_loss(layout, text, generator)
        self.log("val/flow_loss", loss, prog_bar=True, sync_dist=True, batch_size=layout.latents.shape[0])
        if batch_idx < self.hparams.val_sample_batches:
            self._sample_validation_video(layout, text, generator, batch_idx)
        return loss

    def _sample_validation_video(self, layout: TeacherLayout, text: Tensor, generator: torch.Generator,
                                 batch_idx: int) -> None:
        target = layout.target
        generated = self.continue_video(layout.context[:1], text[:1], target.shape[2], generator=generator)
        if self.hparams.autoencoder is None:
            return
        autoencoder = self.autoencoder
        with torch.no_grad():
            real = autoencoder.decode(target[:1].float())
            fake = autoencoder.decode(generated.float())
        # [3, T, H, 2W]: truth | teacher, for callbacks.video_logger.VideoLogger
        self.videos_to_log[f"val/continuation_truth_vs_teacher/batch{batch_idx}"] = \
            torch.cat([real, fake], dim=-1)[0].cpu()

    def on_validation_epoch_start(self) -> None:
        self.videos_to_log = {}

    # ------------------------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the error banks and the random stream of every rank (keyed by rank, gathered on rank 0, which writes
        the checkpoint) and the export metadata."""
        stamp_checkpoint(self, checkpoint)
        state = {"banks": self.banks.state_dict(), "generator": self.random_stream().get_state()}
        rank, world = rank_and_world()
        if world > 1:
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(state, gathered, dst=0, group=self._object_group)
            per_rank = dict(enumerate(gathered)) if gathered is not None else {rank: state}
        else:
            per_rank = {0: state}
        checkpoint[ERFT_STATE_KEY] = {"world_size": world, "ranks": per_rank}
        checkpoint[EXPORT_KEY] = {
            "wan_config": dataclasses.asdict(self.network_config),
            "finetune": self.hparams.finetune,
            "lora_rank": int(self.hparams.lora_rank),
            "lora_alpha": float(self.hparams.lora_alpha),
            "network_prefix": "network",
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's error banks and random stream (rank r of a run with another world size gets the state
        of rank r mod saved world size). Refuses a checkpoint of another module or with other settings."""
        check_resumed_settings(self, checkpoint)
        saved = checkpoint.get(ERFT_STATE_KEY)
        if saved is None:
            log.warning("the checkpoint has no ERFT state: the error banks start empty")
            return
        rank, world = rank_and_world()
        ranks = saved["ranks"]
        if saved["world_size"] != world:
            log.warning(f"the checkpoint was written by {saved['world_size']} ranks and this run has {world}; "
                        "rank r restores the error banks of saved rank r mod the saved world size")
        # rank 0's checkpoint holds every rank's state; under DeepSpeed ZeRO-3 every other rank reads its own shard
        # file, which holds only its own state
        state = ranks[rank % int(saved["world_size"])]
        self.banks.load_state_dict(state["banks"])
        self.random_stream().set_state(state["generator"])

    # Spawned worker processes get pickled copies. torch.Generator objects do not survive that trip, and tensors
    # made while pickling would be freed before the workers map them: send generator states as bytes.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["banks"] = {name: dict(bank, generator_state=_state_bytes(bank["generator_state"]))
                          for name, bank in self.banks.state_dict().items()}
        stream = self._random_stream
        state["_random_stream"] = None if stream is None else _state_bytes(stream.get_state())
        state["_object_group"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        banks_state, generator_state = state.pop("banks"), state.pop("_random_stream")
        super().__setstate__(state)
        self.banks = self.erft_config.banks(self.hparams.shift, self.hparams.seed)
        self.banks.load_state_dict({name: dict(bank, generator_state=_state_tensor(bank["generator_state"]))
                                    for name, bank in banks_state.items()})
        self._random_stream = None
        if generator_state is not None:
            self._random_stream = torch.Generator()
            self._random_stream.set_state(_state_tensor(generator_state))

    # ------------------------------------------------------------------------------------------------ export
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The DiT weights with LoRA merged, original Wan names (loads strict into `WanDiT`), on CPU."""
        return export_state_dict(self._require_network(), alpha=self.hparams.lora_alpha)
