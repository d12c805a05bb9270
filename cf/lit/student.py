"""`CDMDStudent`: Contextual DMD distillation of the causal student (method §F), stages 1 and 2 by config.

Each trainer step (one batch of prompts) updates the critic; every `critic_steps_per_generator_step`-th step (the
first one included) also updates the generator, before the critic (§F.3). Every micro-batch of an update rolls the
student out afresh through its memory (`cf.rollout.train_rollout`), cuts the teacher window (`teacher_window`, §F.5)
and scores it:

- generator: the frozen teacher (real score, CFG with the negative prompt) and the critic (fake score) see the same
  ``[context | noisy target]``; `cf.losses.dmd_generator_loss` pushes the target frames (gradient only through the
  last ``grad_window_frames``) along the normalised score difference (§F.6);
- critic: flow-matching loss on a no-grad rollout's target frames, the context reset to clean (§F.7).

The network not being updated is frozen during each phase, so its gradients stay None. Rollout length and exit
index are drawn from generators seeded by (seed, trainer step, phase, micro-batch), identical on every rank without
communication; the noise additionally by the rank. So a resumed run continues exactly.

``trainer.global_step`` counts trainer steps (critic updates): the generator's optimizer steps are not counted.
Under `cf.strategies.DeepSpeedStrategy` each network has its own engine, which accumulates the micro-batches and
clips (its ``gradient_accumulation_steps`` / ``gradient_clipping`` must equal this module's settings).
Shapes: latents ``[B, C, T, h, w]``; text ``[B, L, D]``; timesteps ``[B]``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from cf.diffusion import sample_dmd_timesteps
from cf.encoders import FrozenEncoders, TextEncoder, VideoAutoencoder, resolve_dtype
from cf.export import GENERATOR_SPEC_KEY, GeneratorSpec, read_generator_weights, write_generator_export
from cf.lit.arguments import as_dataclass, check_resumed_settings, stable_seed, stamp_checkpoint
from cf.lit.student_settings import OptimizationConfig, ScoreConfig, TeacherWindowConfig
from cf.losses import cdmd_critic_loss, cdmd_generator_loss, network_dtype
from cf.memory import MemoryConfig
from cf.models.wan import CausalWanDiT, WanConfig, WanDiT
from cf.optim import lr_lambda
from cf.rollout import (
    RolloutConfig,
    SamplingConfig,
    make_memory,
    memory_teacher_window,
    sample_exit_index,
    sample_num_blocks,
    stream,
    teacher_window,
    train_rollout,
)
from cf.weights import normalize_state_dict, read_state_dict
from cf.zero import gathered_parameters, load_network_weights, rank_and_world

__all__ = ["CDMDStudent", "NEGATIVE_PROMPT", "find_started_ema"]

# The English negative prompt of the CF stage configs (§F.2); used for the teacher's CFG only.
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
COUNTERS_KEY = "cdmd_counters"
TEACHER_PREFIX = "real_score."


# ----------------------------------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------------------------------


def find_started_ema(trainer: Any, attribute: str = "generator") -> Any | None:
    """The trainer's EMA callback on ``attribute`` whose shadow exists (`callbacks.ema.EMA`, found by its interface:
    ``attribute``, ``started``, ``ema_state_dict``), else None."""
    for callback in trainer.callbacks:
        if getattr(callback, "attribute", None) == attribute and getattr(callback, "started", False) \
                and callable(getattr(callback, "ema_state_dict", None)):
            return callback
    return None


class CDMDStudent(pl.LightningModule):
    """Contextual DMD training of the causal student (§F); stage 1 and stage 2 differ only by configuration.

    Args:
        network: `WanConfig` shared by the generator, critic and teacher (YAML: ``network: {dim: 64, ...}`` or a preset name such as ``wan2.1-1.3b``);
            default Wan2.1-T2V-1.3B. The networks are built in `configure_model` (sharded under ZeRO-3).
        frames_per_chunk: latent frames the student generates at once (3).
        teacher_weights: the long-context teacher (``cf convert teacher`` output, or any Wan-layout DiT): the real
            score, frozen; it also initialises the critic and, when ``generator_weights`` is None, the generator.
        generator_weights: the student's initialisation: stage-0 / stage-1 export or ``.ckpt``, or Wan weights.
        critic_weights: the critic's initialisation (default: ``teacher_weights``, §F.1).
        teacher_dtype: dtype of the frozen teacher ("bfloat16" at scale).
        autoencoder / text_encoder: ``"toy"`` / ``"hashed"`` or local folders (frozen, kept out of checkpoints).
        autoencoder_args / text_encoder_args: keyword arguments of the toy encoders (or of the umT5 loader).
        encoder_dtype: dtype of the real encoders.
        latent_size: (h, w) of the latents the student generates; fps: frame rate of the decoded videos.
        negative_prompt: the unconditional prompt of the teacher's CFG (embedded once, cached).
        memory: the student's K/V memory, keyframe rule included (`MemoryConfig` fields or a preset name; default
            ``slow_fast``).
        rollout: rollout length (blocks, linear cap over ``decay_steps`` trainer steps), grad window and the
            few-step sampling (`RolloutConfig`; default: 7 blocks = 21 frames, last 18 with grad).
        window: the teacher window (`TeacherWindowConfig`: context / target frames, which scores see the context,
            contiguous or memory context, re-encoded first frame).
        scores: CFG scale, DMD timestep draw, critic weighting (`ScoreConfig`).
        optimization: the two AdamW optimisers, clipping, accumulation, update ratio, lr schedule
            (`OptimizationConfig`).
        gradient_checkpointing: recompute DiT blocks in backward (generator and critic).
        seed: base seed of every random draw of training.
        val_num_frames / val_seed: latent frames of each validation video and the validation seed.
        export_path: if set, the generator (EMA weights when available) is exported there at the end of fit.
    """

    def __init__(
        self,
        network: WanConfig | str | None = None,
        frames_per_chunk: int = 3,
        teacher_weights: str | None = None,
        generator_weights: str | None = None,
        critic_weights: str | None = None,
        teacher_dtype: str = "float32",
        autoencoder: str = "toy",
        autoencoder_args: dict[str, Any] | None = None,
        text_encoder: str = "hashed",
        text_encoder_args: dict[str, Any] | None = None,
        encoder_dtype: str = "float32",
        latent_size: tuple[int, int] = (60, 104),
        fps: int = 16,
        negative_prompt: str = NEGATIVE_PROMPT,
        memory: MemoryConfig | str = "slow_fast",
        rollout: RolloutConfig | None = None,
        window: TeacherWindowConfig | None = None,
        scores: ScoreConfig | None = None,
        optimization: OptimizationConfig | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 1646,
        val_num_frames: int = 21,
        val_seed: int = 0,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.network_config = WanConfig.wan2_1_1_3b() if network is None else as_dataclass(network, WanConfig,
                                                                                            "network")
        if isinstance(memory, str):
            memory = MemoryConfig.preset(memory, frames_per_chunk=frames_per_chunk)
        self.memory_config = as_dataclass(memory, MemoryConfig, "memory")
        self.window = TeacherWindowConfig() if window is None else as_dataclass(window, TeacherWindowConfig, "window")
        self.scores = ScoreConfig() if scores is None else as_dataclass(scores, ScoreConfig, "scores")
        self.optimization = OptimizationConfig() if optimization is None else \
            as_dataclass(optimization, OptimizationConfig, "optimization")
        self.rollout_config = RolloutConfig() if rollout is None else as_dataclass(rollout, RolloutConfig, "rollout")
        if isinstance(self.rollout_config.sampling, Mapping):
            self.rollout_config.sampling = SamplingConfig(**self.rollout_config.sampling)
        self._check_arguments(locals())
        self.save_hyperparameters(logger=False)  # the CLI saves the full config; avoids clashes with the data hparams
        # plain values in the checkpoint, so that it loads with torch.load(weights_only=True)
        self.hparams.update(network=dataclasses.asdict(self.network_config),
                            memory=dataclasses.asdict(self.memory_config),
                            rollout=dataclasses.asdict(self.rollout_config),
                            window=dataclasses.asdict(self.window), scores=dataclasses.asdict(self.scores),
                            optimization=dataclasses.asdict(self.optimization), latent_size=list(latent_size))
        # placeholders until `configure_model` (callbacks such as EMA look the generator up in their `setup`)
        self.generator: CausalWanDiT | nn.Module = nn.Module()
        self.critic: WanDiT | nn.Module = nn.Module()
        self.real_score: WanDiT | nn.Module = nn.Module()
        # encoders are frozen and stay out of the module tree: no checkpoint weights, no ZeRO partitioning
        self.encoders = FrozenEncoders(autoencoder, text_encoder, encoder_dtype, autoencoder_args, text_encoder_args,
                                       in_dim=self.network_config.in_dim, text_dim=self.network_config.text_dim)
        self.trainer_step = 0  # completed trainer steps (critic updates); read by the EMA callback
        self.generator_updates = 0
        self.critic_updates = 0
        self.generator_stepped = False  # True in a batch that updated the generator; read by the EMA callback
        self.validation_videos: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ arguments
    def _check_arguments(self, args: Mapping[str, Any]) -> None:
        """Reject bad configurations before any network is built."""
        problems = []
        n = args["frames_per_chunk"]
        rollout = self.rollout_config
        if n < 1:
            problems.append(f"frames_per_chunk must be >= 1, got {n}")
        if self.memory_config.frames_per_chunk != n:
            problems.append(f"memory.frames_per_chunk ({self.memory_config.frames_per_chunk}) differs from "
                            f"frames_per_chunk ({n})")
        if args["teacher_weights"] is None:
            problems.append("teacher_weights is required: the real score's (and by default the critic's) weights, "
                            "e.g. the output of `cf convert teacher`")
        for name in ("teacher_weights", "generator_weights", "critic_weights"):
            path = args[name]
            if path is not None and not os.path.exists(path):
                problems.append(f"{name} {path!r} does not exist; point it to a Wan-layout .safetensors file or "
                                "folder (or a student .ckpt for generator_weights)")
        for name, builtin in (("autoencoder", ("toy",)), ("text_encoder", ("hashed", "toy"))):
            value = args[name]
            if value not in builtin and not os.path.isdir(value):
                problems.append(f"{name} {value!r} is neither {' / '.join(repr(b) for b in builtin)} nor an "
                                "existing folder; point it to the local weights folder")
        window, mc = self.window, self.memory_config
        if window.source == "memory" and (mc.fast is None or mc.slow == 0):
            problems.append("window.source='memory' needs a slow-fast memory (slow > 0, bounded fast); use "
                            "source: contiguous with this memory")
        elif window.source == "memory" and window.context_frames != mc.sink + mc.slow + mc.fast:
            problems.append(f"window.source='memory' gives the teacher sink + slow + fast = "
                            f"{mc.sink + mc.slow + mc.fast} context frames; set window.context_frames to that "
                            f"(got {window.context_frames})")
        min_frames = rollout.min_blocks * n
        if min_frames < window.frames:
            problems.append(f"the shortest rollout ({rollout.min_blocks} blocks = {min_frames} frames) is shorter "
                            f"than the teacher window ({window.context_frames} + {window.target_frames}); raise "
                            "rollout.min_blocks")
        if rollout.grad_window_frames is not None and rollout.grad_window_frames > window.target_frames:
            problems.append(f"rollout.grad_window_frames ({rollout.grad_window_frames}) exceeds "
                            f"window.target_frames ({window.target_frames}): gradient would reach frames the scores "
                            "never see")
        if args["val_num_frames"] < n or args["val_num_frames"] % n:
            problems.append(f"val_num_frames must be a positive multiple of frames_per_chunk ({n})")
        try:
            resolve_dtype(args["teacher_dtype"])
        except ValueError as error:
            problems.append(f"teacher_dtype: {error}")
        if len(args["latent_size"]) != 2:
            problems.append(f"latent_size must be (h, w), got {args['latent_size']}")
        if problems:
            raise ValueError("invalid CDMDStudent configuration: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Build the teacher (frozen), the critic and the generator and load their weights; idempotent."""
        if self.built:
            return
        hp = self.hparams
        cfg = self.network_config
        teacher_state = normalize_state_dict(read_state_dict(hp.teacher_weights))
        real_score = WanDiT(cfg)
        load_network_weights(real_score, teacher_state, "teacher", hp.teacher_weights)
        real_score.requires_grad_(False)
        self.real_score = real_score.to(resolve_dtype(hp.teacher_dtype))
        critic = WanDiT(cfg)
        critic_state = teacher_state if hp.critic_weights is None else \
            normalize_state_dict(read_state_dict(hp.critic_weights))
        load_network_weights(critic, critic_state, "critic", hp.critic_weights or hp.teacher_weights)
        generator = CausalWanDiT(cfg, frames_per_chunk=hp.frames_per_chunk)
        generator_state = teacher_state if hp.generator_weights is None else \
            read_generator_weights(hp.generator_weights, use_ema=False)
        load_network_weights(generator, generator_state, "generator", hp.generator_weights or hp.teacher_weights)
        if hp.gradient_checkpointing:
            generator.enable_gradient_checkpointing(True)
            critic.enable_gradient_checkpointing(True)
        self.critic, self.generator = critic, generator

    def deepspeed_submodules(self) -> dict[str, nn.Module]:
        """One DeepSpeed engine each, in the order of `configure_optimizers` (`cf.strategies.DeepSpeedStrategy`)."""
        return {"generator": self.generator, "critic": self.critic}

    def setup(self, stage: str) -> None:
        self.encoders.build()

    @property
    def autoencoder(self) -> VideoAutoencoder:
        """The frozen autoencoder, on this module's device."""
        return self.encoders.get("autoencoder", self.device, "encode and decode videos")

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen text encoder, on this module's device."""
        return self.encoders.get("text_encoder", self.device, "embed prompts")

    @property
    def built(self) -> bool:
        """Whether `configure_model` has built the networks."""
        return isinstance(self.generator, CausalWanDiT)

    def _networks(self) -> tuple[CausalWanDiT, WanDiT, WanDiT]:
        if not self.built:
            raise RuntimeError("the networks are not built yet: call configure_model() (the Trainer does this)")
        return self.generator, self.critic, self.real_score

    # ------------------------------------------------------------------------------------------------ inputs
    def embed(self, captions: list[str]) -> Tensor:
        """Prompt embeddings ``[B, L, D]`` (no grad)."""
        with torch.no_grad():
            return self.text_encoder(list(captions)).to(self.device)

    def negative_embedding(self) -> Tensor:
        """The negative prompt's embedding ``[1, L, D]``, computed once and cached by the text encoder."""
        return self.text_encoder.embed_cached([self.hparams.negative_prompt]).to(self.device)

    def _micro_batches(self, batch: Mapping[str, Any]) -> list[list[str]]:
        if "caption" not in batch:
            raise KeyError(f"CDMDStudent needs batches with 'caption' (data.VideoDataModule mode 'prompts'); got keys "
                           f"{sorted(batch)}")
        captions = list(batch["caption"])
        k = self.optimization.gradient_accumulation
        if len(captions) % k:
            raise ValueError(f"a batch of {len(captions)} prompts does not split into gradient_accumulation={k} "
                             f"micro-batches; set the data batch_size to a multiple of {k}")
        size = len(captions) // k
        return [captions[i * size:(i + 1) * size] for i in range(k)]

    def _shared_generator(self, step: int, phase: str, micro: int) -> torch.Generator:
        """Same on every rank: rollout length and exit index."""
        return torch.Generator().manual_seed(stable_seed(self.hparams.seed, "shared", step, phase, micro))

    def _rank_generator(self, step: int, phase: str, micro: int) -> torch.Generator:
        """Per rank: noise and timesteps."""
        generator = torch.Generator(device=self.device)
        return generator.manual_seed(stable_seed(self.hparams.seed, "rank", step, phase, micro, self.global_rank))

    # ------------------------------------------------------------------------------------------------ rollouts
    def rollout(self, captions: list[str], step: int, phase: str, micro: int = 0, grad: bool = True
                ) -> tuple[Tensor | None, Tensor, Tensor, dict[str, int]]:
        """Roll the student out for one micro-batch and cut the teacher window.

        Returns (context ``[B, C, Tc, h, w]`` detached or None, target ``[B, C, Tt, h, w]``, text ``[B, L, D]``,
        info {"frames", "exit_index"}). With ``grad`` the target's last ``grad_window_frames`` carry gradient.
        """
        hp = self.hparams
        generator, _, _ = self._networks()
        shared = self._shared_generator(step, phase, micro)
        blocks = sample_num_blocks(step, self.rollout_config, shared)
        exit_index = sample_exit_index(len(self.rollout_config.sampling.denoising_steps), shared)
        num_frames = blocks * hp.frames_per_chunk
        text = self.embed(captions)
        noise = self._rank_generator(step, phase, micro)
        cache = make_memory(generator, self.memory_config)
        memory_slots: list[list[int]] = []

        def remember_slots(end_frame: int, memory: Any) -> None:  # the memory as the target window starts
            if end_frame == num_frames - self.window.target_frames:
                memory_slots[:] = [memory.consensus_slot_frames(b) for b in range(len(captions))]

        use_memory = self.window.source == "memory"
        with torch.set_grad_enabled(grad):
            text_kv = generator.text_kv(text.to(network_dtype(generator)))
            frames = train_rollout(generator, text_kv, num_frames, tuple(hp.latent_size), len(captions), cache,
                                   exit_index, self.rollout_config, generator=noise, grad=grad,
                                   on_chunk_end=remember_slots if use_memory else None)
        if use_memory:
            mc = self.memory_config
            context, target = memory_teacher_window(frames, memory_slots, mc.sink, mc.slow, mc.fast,
                                                    self.window.target_frames)
        else:
            autoencoder = self.autoencoder if self.window.reencode_image_latent else None
            context, target = teacher_window(frames, self.window.context_frames, self.window.target_frames,
                                             autoencoder)
        return context, target, text, {"frames": num_frames, "exit_index": exit_index}

    # ------------------------------------------------------------------------------------------------ losses
    def generator_loss(self, captions: list[str], step: int, micro: int = 0) -> tuple[Tensor, dict[str, Any]]:
        """CDMD generator loss of one micro-batch (fresh rollout with grad); (loss, logged values)."""
        scores = self.scores
        _, critic, real_score = self._networks()
        context, target, text, info = self.rollout(captions, step, "generator", micro, grad=True)
        draws = self._rank_generator(step, "generator_score", micro)
        t = sample_dmd_timesteps(target.shape[0], scores.timestep_shift, scores.min_timestep, scores.max_timestep,
                                 generator=draws, device=self.device)
        noise = torch.randn(target.shape, generator=draws, device=self.device, dtype=torch.float32)
        loss, stats = cdmd_generator_loss(target, context, real_score, critic, text, self.negative_embedding(), t,
                                          noise, scores.guidance_scale, self.window.context_teacher,
                                          self.window.context_fake)
        return loss, {**stats, **info}

    def critic_loss(self, captions: list[str], step: int, micro: int = 0) -> tuple[Tensor, dict[str, Any]]:
        """Critic loss of one micro-batch (fresh rollout without grad); (loss, logged values)."""
        scores = self.scores
        _, critic, _ = self._networks()
        with torch.no_grad():
            context, target, text, info = self.rollout(captions, step, "critic", micro, grad=False)
        if not self.window.context_fake:
            context = None
        draws = self._rank_generator(step, "critic_score", micro)
        t = sample_dmd_timesteps(target.shape[0], scores.timestep_shift, scores.min_timestep, scores.max_timestep,
                                 generator=draws, device=self.device)
        frames = target.shape[2] + (0 if context is None else context.shape[2])
        noise = torch.randn((*target.shape[:2], frames, *target.shape[3:]), generator=draws, device=self.device)
        loss = cdmd_critic_loss(critic, target.float(), None if context is None else context.float(), text, t,
                                noise, scores.critic_time_weighting, scores.timestep_shift)
        return loss, info

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        micro_batches = self._micro_batches(batch)
        step = self.trainer_step
        self.generator_stepped = step % self.optimization.critic_steps_per_generator_step == 0
        logged: dict[str, Any] = {}
        if self.generator_stepped:
            logged.update(self._update("generator", micro_batches, step))
        logged.update(self._update("critic", micro_batches, step))
        self.trainer_step = step + 1
        logged.update({"train/trainer_step": float(self.trainer_step),
                       "train/generator_updates": float(self.generator_updates),
                       "train/critic_updates": float(self.critic_updates),
                       "train/generator_lr": self.lr_schedulers().get_last_lr()[0],
                       "train/critic_lr": self.optimizers()[1].param_groups[0]["lr"]})
        losses = {k: float(logged.pop(k)) for k in ("train/generator_loss", "train/critic_loss") if k in logged}
        size = len(batch["caption"])
        self.log_dict(losses, on_step=True, prog_bar=True, batch_size=size)
        self.log_dict({k: float(v) for k, v in logged.items()}, on_step=True, batch_size=size)

    def _update(self, phase: Literal["generator", "critic"], micro_batches: list[list[str]], step: int
                ) -> dict[str, float]:
        """One accumulated update of the generator or the critic; the other network is frozen meanwhile.

        Without DeepSpeed engines the micro-batch gradients are summed (each loss divided by their number), clipped
        and applied once. A DeepSpeed engine accumulates itself: it scales each loss by its
        ``gradient_accumulation_steps`` (= ``gradient_accumulation``), is stepped after every micro-batch and
        updates (and clips) at its boundary.
        """
        generator, critic, _ = self._networks()
        optimizer = self.optimizers()[0 if phase == "generator" else 1]
        engine_accumulates = self._engine(phase) is not None
        active, idle = (generator, critic) if phase == "generator" else (critic, generator)
        idle.requires_grad_(False)
        active.requires_grad_(True)
        loss_fn = self.generator_loss if phase == "generator" else self.critic_loss
        count = len(micro_batches)
        if not engine_accumulates:
            optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro, captions in enumerate(micro_batches):
            loss, stats = loss_fn(captions, step, micro)
            self.manual_backward(loss if engine_accumulates else loss / count)
            if engine_accumulates and micro < count - 1:
                self._optimizer_step(optimizer, counted=False)
            for key, value in (("loss", loss.detach()), *stats.items()):
                totals[key] = totals.get(key, 0.0) + float(value) / count
        grad_norm = None
        if not engine_accumulates:
            grad_norm = _grad_norm(active)
            opt = self.optimization
            clip = opt.generator_grad_clip if phase == "generator" else opt.critic_grad_clip
            if clip is not None:
                self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        idle.requires_grad_(True)  # both trainable between phases (checkpoints may leave frozen weights out)
        self._optimizer_step(optimizer, counted=phase == "critic")  # global_step counts trainer steps
        if phase == "critic":
            self.critic_updates += 1
        else:
            self.lr_schedulers().step()
            self.generator_updates += 1
        if not engine_accumulates:
            optimizer.zero_grad(set_to_none=True)  # the next phase starts without this network's gradients
        logged = {f"train/{phase}_loss": totals.pop("loss"),
                  f"train/{phase}_rollout_frames": totals.pop("frames"),
                  f"train/{phase}_exit_index": totals.pop("exit_index")}
        logged.update({f"train/{key}": value for key, value in totals.items()})  # the DMD statistics
        if grad_norm is not None:
            logged[f"train/{phase}_grad_norm"] = grad_norm
        return logged

    def _optimizer_step(self, optimizer: Any, counted: bool) -> None:
        """Step through Lightning; ``counted=False`` leaves ``trainer.global_step`` alone."""
        if counted:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def _engine(self, name: str) -> Any | None:
        """The DeepSpeed engine of ``name`` under `cf.strategies.DeepSpeedStrategy`, else None."""
        engines = getattr(self.trainer.strategy, "engines", None) or {}
        return engines.get(name)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        opt = self.optimization
        generator, critic, _ = self._networks()
        generator_optimizer = torch.optim.AdamW(generator.parameters(), lr=opt.generator_lr,
                                                betas=tuple(opt.generator_betas), weight_decay=opt.weight_decay)
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=opt.critic_lr, betas=tuple(opt.critic_betas),
                                             weight_decay=opt.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(generator_optimizer, lr_lambda(opt.lr_total_steps, opt.lr_floor))
        return [generator_optimizer, critic_optimizer], [{"scheduler": schedule, "interval": "step"}]

    def on_fit_start(self) -> None:
        self._check_engines()

    def _check_engines(self) -> None:
        """Under a multi-engine DeepSpeed strategy the engines accumulate and clip; their settings must match."""
        opt = self.optimization
        for name, clip in (("generator", opt.generator_grad_clip), ("critic", opt.critic_grad_clip)):
            engine = self._engine(name)
            if engine is None:
                continue
            if engine.gradient_accumulation_steps() != opt.gradient_accumulation:
                steps = opt.gradient_accumulation
                raise ValueError(f"the DeepSpeed engine {name!r} accumulates {engine.gradient_accumulation_steps()} "
                                 f"micro-batches but optimization.gradient_accumulation is {steps}; set strategy "
                                 f"engine_configs: {{{name}: {{gradient_accumulation_steps: {steps}}}}}")
            if float(engine.gradient_clipping() or 0.0) != float(clip or 0.0):
                raise ValueError(f"the DeepSpeed engine {name!r} clips at {engine.gradient_clipping()} but "
                                 f"optimization.{name}_grad_clip is {clip}; set strategy engine_configs: {{{name}: "
                                 f"{{gradient_clipping: {clip}}}}}")

    # ------------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Stream one video per prompt with the current generator (EMA weights under the EMA callback) and decode
        it. Returns ``{"videos": [B, 3, T, H, W] in [-1, 1]}`` (what `callbacks.video_logger.VideoLogger` logs) and
        keeps every video in `validation_videos` ({"caption", "key", "video" [3, T, H, W], "fps"})."""
        hp = self.hparams
        generator, _, _ = self._networks()
        captions = list(batch["caption"])
        keys = list(batch.get("key", [f"val-{batch_idx}-{i}" for i in range(len(captions))]))
        text = self.embed(captions)
        sampling = self.rollout_config.sampling
        latents = torch.cat(list(stream(generator, text, hp.val_num_frames, tuple(hp.latent_size),
                                        memory=self.memory_config, sampling=sampling,
                                        seed=stable_seed(hp.val_seed, batch_idx) % (1 << 31))), dim=2)
        with torch.no_grad():
            videos = self.autoencoder.decode(latents.float()).cpu()
        self.log("val/latent_std", latents.float().std(), batch_size=len(captions), sync_dist=True)
        for caption, key, video in zip(captions, keys, videos):
            self.validation_videos.append({"caption": caption, "key": key, "video": video, "fps": hp.fps})
        return {"videos": videos}

    def on_validation_epoch_start(self) -> None:
        self.validation_videos = []

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the step counters and the generator spec (so `cf generate` can use the checkpoint directly); leave
        the frozen teacher out (it is rebuilt from ``teacher_weights``)."""
        stamp_checkpoint(self, checkpoint)
        checkpoint[COUNTERS_KEY] = {"trainer_step": self.trainer_step, "generator_updates": self.generator_updates,
                                    "critic_updates": self.critic_updates}
        checkpoint[GENERATOR_SPEC_KEY] = dataclasses.asdict(self.generator_spec())
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_resumed_settings(self, checkpoint)
        counters = checkpoint.get(COUNTERS_KEY)
        if counters is None:
            rank_zero_warn("the checkpoint has no CDMD step counters; counting restarts from its global_step")
            counters = {"trainer_step": int(checkpoint.get("global_step", 0))}
        self.trainer_step = int(counters["trainer_step"])
        self.generator_updates = int(counters.get("generator_updates", 0))
        self.critic_updates = int(counters.get("critic_updates", self.trainer_step))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Like `nn.Module.load_state_dict`; the teacher's weights, absent from checkpoints, are kept as built."""
        state = dict(state_dict)
        if self.built and not any(k.startswith(TEACHER_PREFIX) for k in state):
            state.update({TEACHER_PREFIX + k: v for k, v in self.real_score.state_dict().items()})
        return super().load_state_dict(state, strict=strict, assign=assign)

    # ------------------------------------------------------------------------------------------------ export
    def generator_spec(self) -> GeneratorSpec:
        """What rebuilds this generator for `cf generate` (written as ``config.json`` by the export, and into
        checkpoints)."""
        hp = self.hparams
        return GeneratorSpec(
            wan_config=dataclasses.asdict(self.network_config), frames_per_chunk=int(hp.frames_per_chunk),
            autoencoder=hp.autoencoder, autoencoder_kwargs=dict(hp.autoencoder_args or {}),
            text_encoder=hp.text_encoder, text_encoder_kwargs=dict(hp.text_encoder_args or {}),
            encoder_dtype=str(hp.encoder_dtype), latent_size=tuple(hp.latent_size), fps=int(hp.fps),
            memory=dataclasses.asdict(self.memory_config), sampling=dataclasses.asdict(self.rollout_config.sampling),
        )

    def _ema_callback(self) -> Any | None:
        return None if self._trainer is None else find_started_ema(self._trainer, "generator")

    def export_generator(self, path: str | os.PathLike, use_ema: bool = True,
                         dtype: torch.dtype | None = None) -> Path:
        """Write the generator (its EMA weights when ``use_ema`` and the EMA callback has started) as a Wan-layout
        ``.safetensors`` plus ``config.json`` beside it. Collective under ZeRO-3; rank 0 writes."""
        generator, _, _ = self._networks()
        ema = self._ema_callback() if use_ema else None
        if use_ema and ema is None:
            rank_zero_warn("no started EMA callback on the generator: exporting the training weights")
        if ema is not None:
            state = ema.ema_state_dict()
        else:
            with gathered_parameters(generator.parameters()):
                state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
        spec = {**dataclasses.asdict(self.generator_spec()), "ema": ema is not None, "trainer_step": self.trainer_step}
        if rank_and_world()[0] == 0:
            write_generator_export(path, state, spec, dtype)
        return Path(path)

    def on_train_end(self) -> None:
        if self.hparams.export_path:
            self.export_generator(self.hparams.export_path)


def _grad_norm(module: nn.Module) -> float | None:
    """L2 norm of the module's gradients (None when they live elsewhere, e.g. in ZeRO partitions)."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
