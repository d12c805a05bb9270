"""Stage-0 data (method §F.9): ODE trajectories of a bidirectional teacher, in WebDataset shards.

For each prompt the teacher integrates the probability-flow ODE from noise with Euler steps over the shifted grid
(48 steps, shift 8) under standard CFG ``uncond + g·(cond − uncond)`` (g = 6) and keeps the states at a few steps
(0, 12, 24, 36) plus the final clean latent. The causal student regresses onto them (`cf.lit.ode_init`).

One sample: ``{key}.ode.pth`` ``[K + 1, C, T, h, w]`` (the K stored states, then the final latent),
``{key}.text.pth`` ``[L', D]`` (the prompt embedding without its trailing zero padding), ``{key}.txt`` (the prompt),
``{key}.json`` (``stored_steps``, their ``timesteps`` t = 1000·σ, ``num_steps``, ``shift``, ``guidance_scale``,
``seed``, ``latent_shape``, ``text_length``).

`cf data ode-pairs` (`data.cli`) writes them with `write_ode_pairs`; `ODEPairDataModule` reads them back as batches
``{"ode": [B, K + 1, C, T, h, w], "text": [B, L, D], "caption", "key"}``.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from webdataset.tariterators import tarfile_samples
from webdataset.utils import pytorch_worker_info

from cf.diffusion import sampling_sigmas
from cf.sampling import sample_flow
from data.datamodule import check_shards_exist
from data.pipeline import buffered_shuffle
from data.shards import ShardSink, ShardWriteReport

__all__ = [
    "ODEPairConfig",
    "ODEPairDataModule",
    "ODEPairStream",
    "WAN_NEGATIVE_PROMPT",
    "ode_trajectory",
    "write_ode_pairs",
]

# Wan2.1's default (Chinese) negative prompt, used by the Self-Forcing ODE recipe (§F.9).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass
class ODEPairConfig:
    """How the trajectories are made: Euler over ``num_steps`` σ's of the shift-``shift`` grid, CFG
    ``guidance_scale``, states kept at ``stored_steps`` (indices into the steps, before each step) and at the end."""

    num_frames: int = 21
    latent_size: tuple[int, int] = (60, 104)
    num_steps: int = 48
    shift: float = 8.0
    guidance_scale: float = 6.0
    stored_steps: tuple[int, ...] = (0, 12, 24, 36)
    negative_prompt: str = WAN_NEGATIVE_PROMPT

    def __post_init__(self) -> None:
        self.latent_size = tuple(self.latent_size)
        self.stored_steps = tuple(int(s) for s in self.stored_steps)
        problems = []
        if self.num_frames < 1:
            problems.append(f"num_frames must be >= 1, got {self.num_frames}")
        if self.num_steps < 1:
            problems.append(f"num_steps must be >= 1, got {self.num_steps}")
        if self.shift <= 0:
            problems.append(f"shift must be > 0, got {self.shift}")
        if not self.stored_steps or list(self.stored_steps) != sorted(set(self.stored_steps)):
            problems.append(f"stored_steps must be increasing and non-empty, got {list(self.stored_steps)}")
        elif self.stored_steps[0] < 0 or self.stored_steps[-1] >= self.num_steps:
            problems.append(f"stored_steps must lie in [0, num_steps) = [0, {self.num_steps}), got "
                            f"{list(self.stored_steps)}")
        if len(self.latent_size) != 2:
            problems.append(f"latent_size must be (h, w), got {self.latent_size}")
        if problems:
            raise ValueError("invalid ODE pair settings: " + "; ".join(problems))

    def sigmas(self) -> Tensor:
        """The Euler σ's, float64 ``[num_steps + 1]`` (`cf.diffusion.sampling_sigmas`)."""
        return sampling_sigmas(self.num_steps, self.shift)


@torch.no_grad()
def ode_trajectory(
    teacher: nn.Module,
    noise: Tensor,
    text: Tensor,
    negative_text: Tensor,
    sigmas: Tensor,
    guidance_scale: float,
    stored_steps: Sequence[int],
    progress: bool = False,
) -> Tensor:
    """Euler integration ``x ← x + (σ_{i+1} − σ_i)·v̂`` from ``noise`` ``[B, C, T, h, w]`` (`cf.sampling.sample_flow`
    without context, in the teacher's dtype).

    v̂ = ``uncond + g·(cond − uncond)`` (conditional and unconditional in one batch of 2B); text ``[B, L, D]``,
    negative_text ``[1 or B, L, D]``. Returns float32 ``[B, K + 1, C, T, h, w]``: the state before each of the K
    ``stored_steps``, then the final latent.
    """
    dtype = teacher.patch_embedding.weight.dtype
    bar = lambda steps: tqdm(steps, desc="ODE steps", leave=False, disable=not progress)  # noqa: E731
    sample = sample_flow(teacher, noise, text.to(dtype), sigmas, dtype=dtype, guidance_scale=guidance_scale,
                         negative_text=negative_text.to(text).to(dtype), stored_steps=stored_steps, progress=bar)
    final = sample.latents.unsqueeze(1)
    return final if sample.states is None else torch.cat([sample.states, final], dim=1)


def _trim_padding(embedding: Tensor) -> Tensor:
    nonzero = (embedding != 0).any(dim=-1).nonzero()
    return embedding[: int(nonzero[-1]) + 1 if len(nonzero) else 1]


def write_ode_pairs(
    teacher: nn.Module,
    text_encoder: nn.Module,
    prompts: Sequence[str],
    out_pattern: str,
    config: ODEPairConfig | None = None,
    seed: int = 0,
    batch_size: int = 1,
    maxcount: int = 1000,
    storage_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
    first_shard: int = 0,
    shard_stride: int = 1,
) -> ShardWriteReport:
    """Integrate one trajectory per prompt with ``teacher`` (a bidirectional `WanDiT`) and write the samples to
    ``out_pattern`` (``%06d`` shards). Prompt i's noise is drawn from a generator seeded with ``seed + i`` and its
    key is ``ode-<i>``, where i is its global index ``indices[k]`` (default: its position), so a pair does not
    depend on the batch or the process that makes it. ``first_shard`` / ``shard_stride``: the shard numbering
    (`data.shards.ShardSink`; rank and world size when several processes share the prompts)."""
    config = config or ODEPairConfig()
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    kept = [(i, p) for i, p in zip(indices, prompts) if p.strip()]
    indices, prompts = [i for i, _ in kept], [p for _, p in kept]
    if not prompts:
        raise ValueError("no prompts to make ODE pairs from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    teacher = teacher.to(device).eval()
    text_encoder = text_encoder.to(device)
    channels = teacher.config.in_dim
    sigmas = config.sigmas()
    timesteps = [float(1000.0 * sigmas[s]) for s in config.stored_steps]
    with torch.no_grad():
        negative = text_encoder([config.negative_prompt]).to(device)
    with ShardSink(out_pattern, maxcount=maxcount, first_shard=first_shard, shard_stride=shard_stride) as sink:
        bar = tqdm(range(0, len(prompts), batch_size), desc="ODE pairs", unit="batch")
        for start in bar:
            batch = list(prompts[start:start + batch_size])
            numbers = indices[start:start + batch_size]
            with torch.no_grad():
                text = text_encoder(batch).to(device)
            noise = torch.stack([
                torch.randn((channels, config.num_frames, *config.latent_size),
                            generator=torch.Generator().manual_seed(seed + number))
                for number in numbers]).to(device)
            trajectory = ode_trajectory(teacher, noise, text, negative, sigmas, config.guidance_scale,
                                        config.stored_steps).cpu()
            for i, (prompt, number) in enumerate(zip(batch, numbers)):
                embedding = _trim_padding(text[i].float().cpu())
                sink.write({
                    "__key__": f"ode-{number:09d}",
                    "ode.pth": trajectory[i].to(storage_dtype).clone(),
                    "text.pth": embedding.to(storage_dtype).clone(),
                    "txt": prompt,
                    "json": {"stored_steps": list(config.stored_steps), "timesteps": timesteps,
                             "num_steps": config.num_steps, "shift": config.shift,
                             "guidance_scale": config.guidance_scale, "seed": seed + number,
                             "latent_shape": list(trajectory[i].shape[1:]), "text_length": int(text.shape[1])},
                })
            bar.set_postfix(written=sink.num_samples)
        return ShardWriteReport(sink.urls, sink.num_samples, sink.num_shards)


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def _load_tensor(raw: bytes, what: str, key: str) -> Tensor:
    value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(value, Tensor):
        raise ValueError(f"ODE pair {key}: {what} is not a tensor")
    return value


class ODEPairStream(IterableDataset):
    """Batches of ODE pairs from shards: ``{"ode" float32 [B, K+1, C, T, h, w], "text" [B, L, D], "caption",
    "key", "timesteps" [B, K]}``.

    ``resampled=True``: endless, shards drawn with replacement per rank and worker (bound epochs with
    ``batches_per_epoch``); otherwise each shard is read once, split by rank and worker. Text embeddings are
    zero-padded to ``text_length`` (the DiT's ``text_len``) or to the stored length. A sample that lacks a member
    or does not load raises (the pairs are generated, not collected: a broken one means a broken file).
    """

    def __init__(self, urls: str | list[str], batch_size: int = 1, text_length: int | None = None,
                 resampled: bool = True, shuffle_buffer: int = 64, seed: int = 0,
                 batches_per_epoch: int | None = None, drop_last: bool = True) -> None:
        super().__init__()
        self.urls = check_shards_exist(urls, what="ODE pair shard")
        self.batch_size, self.text_length, self.resampled = batch_size, text_length, resampled
        self.shuffle_buffer, self.seed, self.batches_per_epoch, self.drop_last = (
            shuffle_buffer, seed, batches_per_epoch, drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shards(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
        if self.resampled:
            while True:
                yield {"url": rng.choice(self.urls)}
        for url in self.urls[rank::world][worker::workers]:
            yield {"url": url}

    def _decode(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        missing = [m for m in ("ode.pth", "text.pth") if m not in sample]
        if missing:
            raise ValueError(f"ODE pair {key} in {sample.get('__url__')} lacks {missing}; regenerate the shards "
                             "with `cf data ode-pairs`")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        ode = _load_tensor(sample["ode.pth"], "ode.pth", key).float()
        text = _load_tensor(sample["text.pth"], "text.pth", key).float()
        caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
        return {"ode": ode, "text": text, "key": key, "caption": caption,
                "timesteps": torch.tensor(meta.get("timesteps", []), dtype=torch.float32),
                "text_length": meta.get("text_length")}

    def _collate(self, items: list[dict]) -> dict:
        shapes = {tuple(item["ode"].shape) for item in items}
        if len(shapes) > 1:
            raise ValueError(f"ODE pairs of different shapes {sorted(shapes)} in one batch; write one shard set per "
                             "latent size / number of frames")
        length = self.text_length
        if length is None:
            length = max([item["text"].shape[0] for item in items] +
                         [item["text_length"] for item in items if isinstance(item["text_length"], int)])
        longest = max(item["text"].shape[0] for item in items)
        if longest > length:
            raise ValueError(f"a stored text embedding has {longest} tokens, more than text_length={length}")
        text = torch.zeros(len(items), length, items[0]["text"].shape[1])
        for i, item in enumerate(items):
            text[i, : item["text"].shape[0]] = item["text"]
        return {"ode": torch.stack([item["ode"] for item in items]), "text": text,
                "timesteps": torch.stack([item["timesteps"] for item in items]),
                "caption": [item["caption"] for item in items], "key": [item["key"] for item in items]}

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = pytorch_worker_info()
        samples = tarfile_samples(self._shards(rank, world, worker, workers))
        rng = random.Random(f"{self.seed}-samples-{self.epoch}-{rank}-{worker}")
        items = buffered_shuffle(map(self._decode, samples), self.shuffle_buffer, rng)
        limit = None if self.batches_per_epoch is None else -(-self.batches_per_epoch // max(1, workers))
        pending: list[dict] = []
        produced = 0
        for item in items:
            pending.append(item)
            if len(pending) < self.batch_size:
                continue
            yield self._collate(pending)
            pending = []
            produced += 1
            if limit is not None and produced >= limit:
                return
        if pending and not self.drop_last:
            yield self._collate(pending)


class ODEPairDataModule(pl.LightningDataModule):
    """ODE pairs for `cf.lit.ode_init.ODEInitStudent`: training stream (resampled, shuffled) and an optional
    validation stream (each pair once, in order)."""

    def __init__(self, train_urls: str, val_urls: str | None = None, batch_size: int = 1, num_workers: int = 0,
                 text_length: int | None = None, shuffle_buffer: int = 64, resampled: bool = True, seed: int = 0,
                 batches_per_epoch: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.train_dataset: ODEPairStream | None = None
        self.val_dataset: ODEPairStream | None = None
        self._epochs = 0

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit"):
            self.train_dataset = ODEPairStream(hp.train_urls, hp.batch_size, hp.text_length, hp.resampled,
                                               hp.shuffle_buffer, hp.seed, hp.batches_per_epoch, drop_last=True)
        if hp.val_urls is not None and stage in (None, "fit", "validate"):
            self.val_dataset = ODEPairStream(hp.val_urls, hp.batch_size, hp.text_length, resampled=False,
                                             shuffle_buffer=0, seed=hp.seed, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        self.train_dataset.set_epoch(self._epochs)
        self._epochs += 1
        return DataLoader(self.train_dataset, batch_size=None, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_urls is None:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return DataLoader(self.val_dataset, batch_size=None, num_workers=self.hparams.num_workers)
