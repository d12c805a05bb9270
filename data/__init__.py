"""Data for Context Forcing: WebDataset video/latent/prompt datamodule, shard writers, synthetic long-video dataset."""

from data.datamodule import VideoDataModule, check_shards_exist, expand_shard_urls
from data.pipeline import SKIP_REASONS
from data.shards import ShardWriteReport, write_shards_from_csv, write_shards_from_folder
from data.synthetic import caption_for, make_clip_spec, render_clip, write_synthetic_shards

__all__ = [
    "VideoDataModule",
    "SKIP_REASONS",
    "check_shards_exist",
    "expand_shard_urls",
    "ShardWriteReport",
    "write_shards_from_folder",
    "write_shards_from_csv",
    "make_clip_spec",
    "render_clip",
    "caption_for",
    "write_synthetic_shards",
]
