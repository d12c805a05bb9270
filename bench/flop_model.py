"""Arithmetic floors of the figures `bench/gpu_suite.py` measures: FLOPs and bytes of attention, the Wan DiT, the Wan
VAE decode and one stage-2 CDMD step.

A floor is ``max(FLOPs / matmul rate, bytes / copy bandwidth)`` (METHOD.md of the device docs): no implementation
runs much faster. FLOPs count multiply-adds as 2 and only the matrix products (linear layers, convolutions, the two
attention products), as `torch.utils.flop_counter.FlopCounterMode` does; elementwise work (norms, RoPE, modulation,
softmax) is left out. Bytes count each weight read once per call and the K/V cache read and written; activations that
a fused implementation keeps on chip are left out. Backward costs 2x the forward FLOPs; gradient checkpointing adds
one more forward (the recompute).

Shapes: a DiT call on ``frames`` latent frames of ``tokens_per_frame`` tokens (60 x 104 latents / 2 x 2 patches =
1,560 at 480 x 832) attending to ``key_frames`` frames (its own included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

NOMINAL_MATMUL_FLOPS = 790e12  # bf16 dense matmul on random data, measured on the H200s lent here (H100: same chip)
NOMINAL_COPY_BYTES_PER_S = 4.3e12  # device-to-device copy, bytes read + written, same machines


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes of some computation; ``+`` adds, ``*`` scales by a count."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, count: float) -> "Work":
        return Work(self.flops * count, self.bytes * count)

    __rmul__ = __mul__

    def floor_s(self, flops_per_s: float = NOMINAL_MATMUL_FLOPS,
                bytes_per_s: float = NOMINAL_COPY_BYTES_PER_S) -> float:
        """Seconds at the given rates: the larger of the arithmetic and the memory time."""
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)


@dataclass(frozen=True)
class DiTShape:
    """The sizes of a Wan DiT the model needs (the fields of `cf.models.wan.WanConfig` of the same names)."""

    dim: int
    ffn_dim: int
    freq_dim: int
    text_dim: int
    text_len: int
    in_dim: int
    out_dim: int
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True

    @classmethod
    def of(cls, config: Any) -> "DiTShape":
        """From a `WanConfig` (or anything with its field names)."""
        names = [f for f in cls.__dataclass_fields__]
        return cls(**{name: getattr(config, name) for name in names})

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)


def tokens_per_frame(shape: DiTShape, latent_hw: tuple[int, int]) -> int:
    """Tokens of one latent frame: (h / ph) * (w / pw)."""
    _, ph, pw = shape.patch_size
    return (latent_hw[0] // ph) * (latent_hw[1] // pw)


# ------------------------------------------------------------------------------------------------------- attention
def attention_flops(pairs: float, heads: int, head_dim: int, batch: int = 1) -> float:
    """QK^T and PV over ``pairs`` attended (query, key) pairs: 4 * B * H * Dh * pairs."""
    return 4.0 * batch * heads * head_dim * pairs


def attention_bytes(q_len: int, k_len: int, heads: int, head_dim: int, batch: int = 1, element_bytes: int = 2
                    ) -> float:
    """Q, K, V read once and O written once."""
    return float((2 * q_len + 2 * k_len) * heads * head_dim * batch * element_bytes)


def block_causal_pairs(num_frames: int, tokens_per_frame_: int, frames_per_chunk: int) -> int:
    """(query, key) pairs the block-causal mask of `cf.models.attention.block_causal_mask` allows (no local window):
    a query in chunk j sees every key before the end of chunk j."""
    length = num_frames * tokens_per_frame_
    chunk = frames_per_chunk * tokens_per_frame_
    pairs = 0
    for start in range(0, length, chunk):
        queries = min(chunk, length - start)
        pairs += queries * min(start + chunk, length)
    return pairs


def attention_work(q_len: int, k_len: int, heads: int, head_dim: int, batch: int = 1, pairs: int | None = None,
                   element_bytes: int = 2) -> Work:
    """One attention call: ``pairs`` defaults to all q_len * k_len pairs (no mask)."""
    pairs = q_len * k_len if pairs is None else pairs
    return Work(attention_flops(pairs, heads, head_dim, batch),
                attention_bytes(q_len, k_len, heads, head_dim, batch, element_bytes))


# ------------------------------------------------------------------------------------------------------------- DiT
def dit_parameters(shape: DiTShape) -> int:
    """Parameters of `cf.models.wan.WanDiT` (the causal student has the same)."""
    d, f = shape.dim, shape.ffn_dim
    patch = shape.in_dim * shape.patch_volume * d + d
    text = shape.text_dim * d + d + d * d + d
    time = shape.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
    attention = 4 * (d * d + d) + (2 * d if shape.qk_norm else 0)
    block = 2 * attention + (2 * d if shape.cross_attn_norm else 0) + d * f + f + f * d + d + 6 * d
    head = d * shape.out_dim * shape.patch_volume + shape.out_dim * shape.patch_volume + 2 * d
    return patch + text + time + shape.num_layers * block + head


def text_kv_work(shape: DiTShape, batch: int = 1, element_bytes: int = 2) -> Work:
    """`WanDiT.text_kv`: the text embedding MLP and every layer's cross-attention keys and values."""
    d, t = shape.dim, shape.text_len
    flops = 2.0 * batch * t * (shape.text_dim * d + d * d) + shape.num_layers * 2 * (2.0 * batch * t * d * d)
    weights = (shape.text_dim * d + d * d) + shape.num_layers * 2 * d * d
    written = shape.num_layers * 2 * batch * t * d
    return Work(flops, float((weights + written) * element_bytes))


def dit_call_work(shape: DiTShape, frames: int, tokens_per_frame_: int, key_frames: int, batch: int = 1,
                  self_pairs: int | None = None, text_kv: bool = False, timestep_rows: int = 1,
                  element_bytes: int = 2) -> Work:
    """One DiT forward on ``frames`` frames attending to ``key_frames`` frames of keys (its own included).

    ``self_pairs``: attended pairs per sample and head (default frames*P x key_frames*P, no mask); ``text_kv``: the
    call also embeds the text and projects its keys/values (`WanDiT.forward` with raw text; a streaming call reuses
    them); ``timestep_rows``: rows of the time embedding per sample (1: one timestep per sample).
    Bytes: the weights once, the context keys/values read and the call's own keys/values written.
    """
    d, f, layers = shape.dim, shape.ffn_dim, shape.num_layers
    p = tokens_per_frame_
    tokens = batch * frames * p
    pairs = frames * p * key_frames * p if self_pairs is None else self_pairs
    per_layer = (12.0 * tokens * d * d  # self q, k, v, o and cross q, o projections
                 + 4.0 * tokens * d * f  # FFN
                 + attention_flops(pairs, shape.num_heads, d // shape.num_heads, batch)
                 + 4.0 * tokens * shape.text_len * d)  # cross-attention over the text tokens
    flops = (2.0 * tokens * shape.in_dim * shape.patch_volume * d  # patch embedding
             + 2.0 * batch * timestep_rows * (shape.freq_dim * d + d * d + 6 * d * d)  # time embedding
             + layers * per_layer
             + 2.0 * tokens * d * shape.out_dim * shape.patch_volume)  # head
    context_frames = key_frames - frames
    kv = layers * 2 * d * (batch * max(context_frames, 0) * p + tokens + batch * shape.text_len)
    work = Work(flops, float((dit_parameters(shape) + kv) * element_bytes))
    return work + text_kv_work(shape, batch, element_bytes) if text_kv else work


def kv_projection_flops(shape: DiTShape, tokens: int) -> float:
    """The self-attention key and value projections of every layer for ``tokens`` tokens."""
    return shape.num_layers * 2 * 2.0 * tokens * shape.dim * shape.dim


def chunk_context_frames(start_frame: int, frames_per_chunk: int, capacity: int | None) -> int:
    """Cached frames a chunk starting at ``start_frame`` attends to besides itself: `cf.memory.SlowFastMemory`
    holds ``capacity`` slots including the chunk's own (None: unbounded, every earlier frame)."""
    if capacity is None:
        return start_frame
    return min(start_frame, capacity - frames_per_chunk)


def stream_chunk_work(shape: DiTShape, tokens_per_frame_: int, context_frames: int, frames_per_chunk: int = 3,
                      steps: int = 4, element_bytes: int = 2) -> Work:
    """One streamed chunk: ``steps`` denoising calls and the commit pass, each over the same context."""
    call = dit_call_work(shape, frames_per_chunk, tokens_per_frame_, context_frames + frames_per_chunk,
                         element_bytes=element_bytes)
    return call * (steps + 1)


# ------------------------------------------------------------------------------------------------------------- VAE
@dataclass(frozen=True)
class VaeCost:
    """Wan VAE FLOPs (counted). The decoder runs latent by latent with a causal cache, so the i-th latent of a
    video costs ``latent_flops[i]`` (the last entry from then on: the cache is full); ``encode_frame``: encoding one
    pixel frame (the re-encoded image latent of §F.5)."""

    latent_flops: tuple[float, ...]
    encode_frame: float
    decoder_parameters: int

    def decode_flops(self, num_latents: int, start_latent: int = 0) -> float:
        """FLOPs of decoding latents ``start_latent ... start_latent + num_latents - 1`` of one video."""
        last = len(self.latent_flops) - 1
        return float(sum(self.latent_flops[min(i, last)] for i in range(start_latent, start_latent + num_latents)))


def count_vae(vae_kwargs: dict[str, Any] | None, latent_hw: tuple[int, int], latents: int = 4) -> VaeCost:
    """Count the FLOPs of the Wan VAE (diffusers `AutoencoderKLWan(**vae_kwargs)`, the project's
    `WanVideoAutoencoder` around it) with `FlopCounterMode` on the meta device (no memory, no arithmetic): the
    streaming decoder on the first ``latents`` latents one at a time (the last two must cost the same), and the
    encoder on one pixel frame."""
    import torch
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    from cf.encoders import WanVideoAutoencoder

    with torch.device("meta"):
        autoencoder = WanVideoAutoencoder(AutoencoderKLWan(**(vae_kwargs or {})))
    decoder = autoencoder.stream_decoder()
    counts = []
    for _ in range(latents):
        with FlopCounterMode(display=False) as counter:
            decoder(torch.zeros(1, autoencoder.latent_channels, 1, *latent_hw, device="meta"))
        counts.append(float(counter.get_total_flops()))
    if counts[-1] != counts[-2]:
        raise ValueError(f"the VAE decoder's cost per latent has not settled after {latents} latents ({counts}); "
                         "count more latents")
    s = autoencoder.spatial_factor
    with FlopCounterMode(display=False) as counter:
        autoencoder.encode(torch.zeros(1, 3, 1, latent_hw[0] * s, latent_hw[1] * s, device="meta"))
    vae = autoencoder.vae
    parameters = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters())
    return VaeCost(tuple(counts[:-1]), float(counter.get_total_flops()), parameters)


# --------------------------------------------------------------------------------------------------- streaming
@dataclass
class StreamFloor:
    """Floors of one streamed video (`callbacks.throughput.measure_stream_throughput` figures)."""

    chunk_work: list[Work] = field(default_factory=list)  # DiT, per chunk
    decode_flops: list[float] = field(default_factory=list)  # VAE, per chunk
    pixel_frames: list[int] = field(default_factory=list)
    text_kv: Work = Work()

    def chunk_s(self, index: int, flops_per_s: float = NOMINAL_MATMUL_FLOPS,
                bytes_per_s: float = NOMINAL_COPY_BYTES_PER_S) -> float:
        return (self.chunk_work[index] + Work(self.decode_flops[index])).floor_s(flops_per_s, bytes_per_s)

    def first_chunk_latency_s(self, flops_per_s: float = NOMINAL_MATMUL_FLOPS,
                              bytes_per_s: float = NOMINAL_COPY_BYTES_PER_S) -> float:
        return self.text_kv.floor_s(flops_per_s, bytes_per_s) + self.chunk_s(0, flops_per_s, bytes_per_s)

    def steady_fps(self, flops_per_s: float = NOMINAL_MATMUL_FLOPS,
                   bytes_per_s: float = NOMINAL_COPY_BYTES_PER_S) -> float:
        """Pixel frames per second of the chunks after the first (the steady-state FPS of §4.1)."""
        seconds = sum(self.chunk_s(i, flops_per_s, bytes_per_s) for i in range(1, len(self.chunk_work)))
        return sum(self.pixel_frames[1:]) / seconds


def stream_floor(shape: DiTShape, tokens_per_frame_: int, num_frames: int, capacity: int | None,
                 frames_per_chunk: int = 3, steps: int = 4, vae: VaeCost | None = None,
                 element_bytes: int = 2) -> StreamFloor:
    """Per-chunk work of streaming ``num_frames`` latent frames through a memory of ``capacity`` slots."""
    floor = StreamFloor(text_kv=text_kv_work(shape, 1, element_bytes))
    for start in range(0, num_frames, frames_per_chunk):
        context = chunk_context_frames(start, frames_per_chunk, capacity)
        floor.chunk_work.append(stream_chunk_work(shape, tokens_per_frame_, context, frames_per_chunk, steps,
                                                  element_bytes))
        floor.decode_flops.append(vae.decode_flops(frames_per_chunk, start) if vae is not None else 0.0)
        floor.pixel_frames.append(4 * frames_per_chunk - (3 if start == 0 else 0))
    return floor


# ------------------------------------------------------------------------------------------- stage-2 CDMD step
@dataclass(frozen=True)
class CdmdStep:
    """The sizes of one CDMD update of `cf.lit.student.CDMDStudent` (one micro-batch of one prompt)."""

    rollout_frames: int = 84
    context_window: int = 21
    target_window: int = 21
    grad_window: int = 18
    capacity: int | None = 21
    frames_per_chunk: int = 3
    steps: int = 4
    generator_exit: int = 3  # exit index of the generator's rollout (0 ... steps - 1)
    critic_exit: int = 3
    guidance: bool = True  # the teacher runs conditional and unconditional as one batch of 2
    reencode_image_latent: bool = True  # the window's first latent: decode the prefix, re-encode one pixel frame
    checkpointing: bool = True


def rollout_calls(step: CdmdStep, exit_index: int, grad: bool) -> list[tuple[int, int, bool]]:
    """The DiT calls of `cf.rollout.train_rollout` in order, as (start frame, context frames, with grad): chunks up
    to the grad window's start fully denoised, the later ones exit at ``exit_index``, each followed by its commit
    pass; with ``grad`` the exit call of every chunk in the grad window records autograd."""
    n = step.frames_per_chunk
    grad_start = max(0, step.rollout_frames - step.grad_window)
    calls = []
    for start in range(0, step.rollout_frames, n):
        context = chunk_context_frames(start, n, step.capacity)
        last = step.steps - 1 if start <= grad_start else exit_index
        calls += [(start, context, grad and start >= grad_start and k == last) for k in range(last + 1)]
        calls.append((start, context, False))  # commit pass
    return calls


def rollout_work(shape: DiTShape, p: int, step: CdmdStep, exit_index: int, grad: bool) -> Work:
    """Forward (and, with ``grad``, backward) work of the `rollout_calls`."""
    n = step.frames_per_chunk
    total = text_kv_work(shape) * (3 if grad else 1)  # with grad the text keys/values are backpropagated
    for _, context, with_grad in rollout_calls(step, exit_index, grad):
        call = dit_call_work(shape, n, p, context + n)
        total = total + call
        if with_grad:
            # backward 2x; with checkpointing the block computes its own K/V once more in the forward (the cache
            # write runs outside it) and the whole block again in the backward (recompute)
            kv = Work(kv_projection_flops(shape, n * p))
            total = total + call * 2 + ((call + kv) if step.checkpointing else Work())
    return total


def window_work(step: CdmdStep, vae: VaeCost | None) -> Work:
    """`cf.rollout.teacher_window`: decode the prefix and re-encode its last pixel frame (when re-encoding)."""
    if not step.reencode_image_latent or vae is None:
        return Work()
    window = step.context_window + step.target_window
    prefix = step.rollout_frames - window + 1
    return Work(vae.decode_flops(prefix) + vae.encode_frame)


def cdmd_step_work(shape: DiTShape, p: int, step: CdmdStep, vae: VaeCost | None = None) -> dict[str, Work]:
    """Work of one trainer step that updates the generator and then the critic, by part."""
    window = step.context_window + step.target_window
    scored = dit_call_work(shape, window, p, window, text_kv=True)  # teacher / critic on [context | target]
    teacher = dit_call_work(shape, window, p, window, batch=2 if step.guidance else 1, text_kv=True)
    params = dit_parameters(shape)
    adam = Work(0.0, 28.0 * params)  # fp32 AdamW: read weight, grad, m, v; write weight, m, v
    critic_train = scored * (4 if step.checkpointing else 3)  # forward, (recompute), backward 2x
    return {
        "generator_rollout": rollout_work(shape, p, step, step.generator_exit, grad=True),
        "generator_window": window_work(step, vae),
        "teacher_cfg": teacher,
        "critic_score": scored,
        "generator_adam": adam,
        "critic_rollout": rollout_work(shape, p, step, step.critic_exit, grad=False),
        "critic_window": window_work(step, vae),
        "critic_train": critic_train,
        "critic_adam": adam,
    }


def cdmd_state_bytes(parameters: int, deepspeed: bool) -> float:
    """Least memory a one-GPU stage-2 step holds: generator and critic with AdamW, the frozen bf16 teacher.

    Plain PyTorch (bf16 autocast): fp32 weights 4 + Adam moments 8 bytes per trainable parameter, fp32 gradients 4
    for the network being updated, teacher 2. DeepSpeed bf16 (ZeRO on one GPU): 16 per trainable parameter (bf16
    weights and gradients 2 + 2, fp32 master weights and moments 12), teacher 2."""
    trainable = 16 * 2 if deepspeed else 12 * 2 + 4
    return float(parameters * (trainable + 2))


def kv_cache_bytes(shape: DiTShape, tokens_per_frame_: int, frames: int, element_bytes: int = 2) -> float:
    """Keys and values of ``frames`` frames in every layer."""
    return float(shape.num_layers * 2 * frames * tokens_per_frame_ * shape.dim * element_bytes)


# ---------------------------------------------------------------------------------------------------- summary
def figure_floors(shape: DiTShape, latent_hw: tuple[int, int], vae: VaeCost | None, stream_frames: dict[str, int],
                  capacities: dict[str, int | None], step: CdmdStep, flops_per_s: float = NOMINAL_MATMUL_FLOPS,
                  bytes_per_s: float = NOMINAL_COPY_BYTES_PER_S) -> dict[str, Any]:
    """The floor of every figure `bench/gpu_suite.py` reports, at the given rates.

    stream_frames / capacities: latent frames of each streaming preset's video and its memory slots (None: full).
    """
    rates = {"flops_per_s": flops_per_s, "bytes_per_s": bytes_per_s}
    p = tokens_per_frame(shape, latent_hw)
    heads, head_dim = shape.num_heads, shape.dim // shape.num_heads
    n = step.frames_per_chunk
    chunk_keys = (capacities.get("slow_fast") or 7 * n)
    kernels = {
        "chunk": attention_work(n * p, chunk_keys * p, heads, head_dim),
        "block_causal": attention_work(21 * p, 21 * p, heads, head_dim, pairs=block_causal_pairs(21, p, n)),
        "teacher": attention_work(42 * p, 42 * p, heads, head_dim),
    }
    out: dict[str, Any] = {
        "rates": rates, "tokens_per_frame": p, "dit_parameters": dit_parameters(shape),
        "kernels": {name: {"tflop": w.flops / 1e12, "gb": w.bytes / 1e9, "floor_ms": 1e3 * w.floor_s(**rates)}
                    for name, w in kernels.items()},
        "streaming": {}}
    for preset, frames in stream_frames.items():
        floor = stream_floor(shape, p, frames, capacities[preset], n, step.steps, vae)
        last = len(floor.chunk_work) - 1
        held = frames if capacities[preset] is None else capacities[preset]
        out["streaming"][preset] = {
            "latent_frames": frames, "dit_tflop_last_chunk": floor.chunk_work[last].flops / 1e12,
            "dit_gb_last_chunk": floor.chunk_work[last].bytes / 1e9,
            "vae_tflop_steady_chunk": floor.decode_flops[last] / 1e12,
            "chunk_ms_last": 1e3 * floor.chunk_s(last, **rates), "fps_steady": floor.steady_fps(**rates),
            "fps_last_chunk": floor.pixel_frames[last] / floor.chunk_s(last, **rates),
            "first_chunk_s": floor.first_chunk_latency_s(**rates),
            "kv_cache_gib": kv_cache_bytes(shape, p, held) / 2 ** 30,
            "weights_gib": dit_parameters(shape) * 2 / 2 ** 30}
    parts = cdmd_step_work(shape, p, step, vae)
    out["training"] = {
        "step": asdict(step), "pflop": sum(w.flops for w in parts.values()) / 1e15,
        "floor_s": sum(w.floor_s(**rates) for w in parts.values()),
        "parts_s": {name: w.floor_s(**rates) for name, w in parts.items()},
        "state_gib_plain": cdmd_state_bytes(dit_parameters(shape), deepspeed=False) / 2 ** 30,
        "state_gib_deepspeed": cdmd_state_bytes(dit_parameters(shape), deepspeed=True) / 2 ** 30}
    return out
