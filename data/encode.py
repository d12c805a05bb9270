"""Pre-encoding video shards into latent shards (``cf data encode``).

Each output sample holds ``{key}.latent.pth`` (normalised latents ``[C, n, h, w]``), ``{key}.text.pth`` (the text
embedding ``[L, D]`` with its trailing all-zero padding rows removed; the datamodule pads it back with zeros),
``{key}.txt`` (caption) and ``{key}.json`` (clip and encoder metadata, including ``text_length``, the encoder's padded
length, so the datamodule restores the exact ``[max_length, D]`` shape).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cf.encoders import resolve_dtype
from data.clips import check_num_frames
from data.datamodule import check_shards_exist
from data.pipeline import ShardStream, StreamConfig
from data.shards import ShardSink, ShardWriteReport

if TYPE_CHECKING:
    from cf.encoders import TextEncoder, VideoAutoencoder

__all__ = ["encode_shards", "trim_text_padding"]


def trim_text_padding(embedding: torch.Tensor) -> torch.Tensor:
    """``[L, D]`` -> ``[L', D]`` without the trailing rows that are exactly zero (at least one row is kept)."""
    nonzero = (embedding != 0).any(dim=-1).nonzero()
    length = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return embedding[:length]


@torch.no_grad()
def encode_shards(
    in_urls: str | list[str],
    out_pattern: str,
    autoencoder: "VideoAutoencoder",
    text_encoder: "TextEncoder",
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    fps: float = 16.0,
    min_frames: int = 0,
    batch_size: int = 1,
    maxcount: int = 1000,
    latent_dtype: str = "float32",
    device: str = "cpu",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> ShardWriteReport:
    """Read video shards, encode the first ``num_frames`` frames of every clip (after resampling to ``fps`` and
    cover-crop to ``height`` x ``width``) and its caption, and write latent shards to ``out_pattern`` (``%06d``).

    Bad samples are skipped as in training and counted in the report's ``skipped``. With ``world_size`` processes
    (torchrun), process ``rank`` encodes the input shards ``rank, rank + world_size, ...`` and numbers its output
    shards the same way, so processes never write the same file; a sample's latents and key do not depend on the
    process (no randomness: clips start at frame 0).
    """
    check_num_frames(num_frames)
    urls = check_shards_exist(in_urls, what="input shard")[rank::world_size]
    if not urls:
        return ShardWriteReport("", 0, 0)
    dtype = resolve_dtype(latent_dtype)
    config = StreamConfig(mode="video", batch_size=batch_size, drop_last=False, num_frames=num_frames,
                          min_frames=min_frames, height=height, width=width, fps=fps, clip_start="start",
                          shuffle_buffer=0, resampled=False, split_by_node=False, split_by_worker=True)
    loader = DataLoader(ShardStream(urls, config), batch_size=None, num_workers=num_workers)
    autoencoder = autoencoder.to(device)
    text_encoder = text_encoder.to(device)
    skipped: Counter[str] = Counter()
    with ShardSink(out_pattern, maxcount=maxcount, first_shard=rank, shard_stride=world_size) as sink:
        progress = tqdm(loader, desc="encoding clips" if world_size == 1 else f"encoding clips (rank {rank})",
                        unit="batch")
        for batch in progress:
            skipped.update(batch["skipped"])
            latents = autoencoder.encode(batch["video"].to(device)).float().cpu()
            text = text_encoder(batch["caption"]).float().cpu()
            for i, key in enumerate(batch["key"]):
                latent = latents[i].to(dtype).clone()
                embedding = trim_text_padding(text[i]).to(dtype).clone()
                sink.write({
                    "__key__": key,
                    "latent.pth": latent,
                    "text.pth": embedding,
                    "txt": batch["caption"][i],
                    "json": {"source_key": key, "fps": fps, "num_frames": num_frames, "height": height,
                             "width": width, "latent_shape": list(latent.shape),
                             "text_length": int(text.shape[1]), "latent_dtype": str(dtype).replace("torch.", "")},
                })
            progress.set_postfix(written=sink.num_samples, skipped=sum(skipped.values()))
        report = ShardWriteReport(sink.urls, sink.num_samples, sink.num_shards, dict(skipped))
    if report.num_samples == 0:
        source = in_urls if world_size == 1 else urls  # this process's shards
        raise ValueError(f"no clip of {source!r} could be encoded (skipped: {dict(skipped)}); "
                         f"check num_frames={num_frames}, min_frames={min_frames} and fps={fps} against the videos")
    return report
