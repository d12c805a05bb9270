"""Writing WebDataset video shards: ``{key}.mp4`` (bytes as given), ``{key}.txt`` (caption), ``{key}.json`` (metadata).

``out_pattern`` is a printf pattern with one integer field, e.g. ``shards/train-%06d.tar``; the writers return the
brace-notation URL of what they wrote (``shards/train-{000000..000003}.tar``) for the datamodule's ``train_urls``.
Keys are running numbers (``000000000``, ...); the source path is kept in the json. Pairs that cannot be used (no
caption, unreadable video) are skipped, counted in the report and named in a warning.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import webdataset as wds
from tqdm.auto import tqdm

from cf.video_io import probe_mp4

__all__ = ["ShardWriteReport", "ShardSink", "write_shards_from_folder", "write_shards_from_csv", "brace_url",
           "shard_urls"]

VIDEO_EXTENSIONS = (".mp4",)


@dataclass
class ShardWriteReport:
    """What a shard writer produced."""

    urls: str
    num_samples: int
    num_shards: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, str] = field(default_factory=dict)


def _check_pattern(out_pattern: str) -> None:
    if len(re.findall(r"%0?\d*d", out_pattern)) != 1 or out_pattern.count("%") != 1:
        raise ValueError(
            f"out_pattern must contain exactly one integer field like %06d, got {out_pattern!r} "
            "(e.g. 'shards/train-%06d.tar')"
        )


def brace_url(out_pattern: str, num_shards: int) -> str:
    """Brace-notation URL of shards 0 .. num_shards - 1 written with ``out_pattern``."""
    _check_pattern(out_pattern)
    if num_shards == 1:
        return out_pattern % 0
    match = re.search(r"%0?(\d*)d", out_pattern)
    width = int(match.group(1) or 0)
    first, last = f"{0:0{width}d}", f"{num_shards - 1:0{width}d}"
    return out_pattern[: match.start()] + "{" + first + ".." + last + "}" + out_pattern[match.end():]


def shard_urls(out_pattern: str, numbers: list[int]) -> str:
    """URL of the shards ``numbers`` written with ``out_pattern``: brace notation for 0 .. n - 1, else the paths
    joined with ``::`` (which the datamodules also expand)."""
    if not numbers:
        return ""
    if numbers == list(range(len(numbers))):
        return brace_url(out_pattern, len(numbers))
    return "::".join(out_pattern % n for n in numbers)


class ShardSink:
    """Writes samples into tar shards of at most ``maxcount`` samples (or ``maxsize`` bytes) with
    ``webdataset.TarWriter``, creating the output folder, and reports the URL of what it wrote.

    ``mtime`` (seconds since the epoch) stamps every tar member; a fixed value makes the same samples give the same
    shard bytes (default: the time of writing). Shard j gets the number ``first_shard + j * shard_stride``: with
    ``first_shard=rank`` and ``shard_stride=world_size``, processes that write parts of one dataset into one pattern
    never write the same file.
    """

    def __init__(self, out_pattern: str, maxcount: int = 1000, maxsize: float = 3e9,
                 mtime: float | None = None, first_shard: int = 0, shard_stride: int = 1) -> None:
        _check_pattern(out_pattern)
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        if first_shard < 0 or shard_stride < 1:
            raise ValueError(f"first_shard must be >= 0 and shard_stride >= 1, got {first_shard}, {shard_stride}")
        folder = os.path.dirname(os.path.abspath(out_pattern))
        os.makedirs(folder, exist_ok=True)
        self.out_pattern = out_pattern
        self._tar: wds.TarWriter | None = None  # opened by the first sample: no empty shard for no data
        self._maxcount, self._maxsize, self._mtime = maxcount, maxsize, mtime
        self._first, self._stride = first_shard, shard_stride
        self._count = self._size = 0
        self.shard_numbers: list[int] = []
        self.num_samples = 0

    @property
    def num_shards(self) -> int:
        return len(self.shard_numbers)

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None or self._count >= self._maxcount or self._size >= self._maxsize:
            self._finish_shard()
            number = self._first + self.num_shards * self._stride
            self._tar = wds.TarWriter(self.out_pattern % number, mtime=self._mtime)
            self.shard_numbers.append(number)
            self._count = self._size = 0
        self._size += self._tar.write(sample)
        self._count += 1
        self.num_samples += 1

    @property
    def urls(self) -> str:
        return shard_urls(self.out_pattern, self.shard_numbers)

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_caption(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _write_pairs(pairs: Iterable[tuple[str, str | None]], total: int, out_pattern: str, maxcount: int,
                 desc: str) -> ShardWriteReport:
    """Write (video path, caption) pairs; a None caption or an unreadable video is skipped and counted."""
    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def skip(reason: str, path: str) -> None:
        skipped[reason] += 1
        examples.setdefault(reason, path)

    with ShardSink(out_pattern, maxcount=maxcount) as sink:
        for video_path, caption in tqdm(pairs, total=total, desc=desc, unit="video"):
            if caption is None:
                skip("missing_caption", video_path)
                continue
            try:
                with open(video_path, "rb") as handle:
                    data = handle.read()
                info = probe_mp4(data)
            except FileNotFoundError:
                skip("missing_video", video_path)
                continue
            except Exception:  # PyAV raises many error types for broken files
                skip("corrupt_video", video_path)
                continue
            sink.write({
                "__key__": f"{sink.num_samples:09d}",
                "mp4": data,
                "txt": caption,
                "json": {"fps": float(info.fps), "frames": info.num_frames, "width": info.width,
                         "height": info.height, "source": video_path},
            })
        report = ShardWriteReport(sink.urls, sink.num_samples, sink.num_shards, dict(skipped), examples)
    if skipped:
        detail = ", ".join(f"{reason}: {count} (e.g. {examples[reason]})" for reason, count in skipped.items())
        warnings.warn(f"skipped {sum(skipped.values())} videos while writing {out_pattern}: {detail}", stacklevel=3)
    if report.num_samples == 0:
        raise ValueError(f"no usable videos: nothing was written to {out_pattern} (skipped: {dict(skipped)})")
    return report


def write_shards_from_folder(folder: str, out_pattern: str, maxcount: int = 1000, recursive: bool = True
                             ) -> ShardWriteReport:
    """Shard every ``x.mp4`` of ``folder`` with the caption in ``x.txt`` next to it (sorted by path)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"video folder not found: {folder!r}")
    videos: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        videos += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(VIDEO_EXTENSIONS)]
        if not recursive:
            break
    if not videos:
        raise ValueError(f"no .mp4 files in {folder!r}")

    def pairs() -> Iterator[tuple[str, str | None]]:
        for video in videos:
            yield video, _read_caption(os.path.splitext(video)[0] + ".txt")

    return _write_pairs(pairs(), len(videos), out_pattern, maxcount, desc=f"shards from {folder}")


def write_shards_from_csv(csv_path: str, out_pattern: str, maxcount: int = 1000, video_root: str | None = None,
                          video_column: str = "videoFile", caption_column: str = "caption") -> ShardWriteReport:
    """Shard the videos listed in a CSV with columns ``videoFile, caption``.

    Relative video paths are resolved against ``video_root`` (default: the CSV's folder).
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file not found: {csv_path!r}")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for column in (video_column, caption_column):
            if column not in columns:
                raise ValueError(f"{csv_path}: no column {column!r} (columns: {columns}); expected videoFile, caption")
        rows = list(reader)
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(csv_path))

    def pairs() -> Iterator[tuple[str, str | None]]:
        for row in rows:
            path = row[video_column] or ""
            caption = (row[caption_column] or "").strip() or None
            yield (path if os.path.isabs(path) else os.path.join(root, path)), caption

    return _write_pairs(pairs(), len(rows), out_pattern, maxcount, desc=f"shards from {os.path.basename(csv_path)}")
