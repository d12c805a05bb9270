"""data.remote: an unreachable remote shard fails after a bounded number of attempts with an error naming the URL;
a readable one streams exactly what the local file holds, and a transient failure is retried."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data import VideoDataModule
from data.remote import ShardRetry, ShardUnreachableError, open_shard


def latent_shard(path: Path, count: int = 6) -> Path:
    g = torch.Generator().manual_seed(0)
    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            latent, text = io.BytesIO(), io.BytesIO()
            torch.save(torch.randn(4, 3, 2, 2, generator=g), latent)
            torch.save(torch.randn(3, 5, generator=g), text)
            writer.write({"__key__": f"s{i}", "latent.pth": latent.getvalue(), "text.pth": text.getvalue(),
                          "txt": f"caption {i}"})
    return path


def batches(url: str, **kwargs) -> list[dict]:
    dm = VideoDataModule(train_urls=url, mode="latents", batch_size=2, num_workers=0, resampled=False,
                         shuffle_buffer=0, shard_retry_delay=0.01, **kwargs)
    dm.setup("fit")
    return list(dm.train_dataloader())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_pipe_shard_stops_after_the_retries_naming_the_url(tmp_path: Path) -> None:
    attempts = tmp_path / "attempts"
    url = f"pipe:echo attempt >> {attempts}; exit 7"
    start = time.monotonic()
    with pytest.raises(ShardUnreachableError, match=r"shard pipe:echo attempt .* could not be read after 3 "
                                                    r"attempts 0\.01 s apart .*exit 7"):
        batches(url, shard_retries=2)
    assert attempts.read_text().count("attempt") == 3
    assert time.monotonic() - start < 30


def test_an_unreachable_http_shard_stops_after_the_retries(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/shard-000000.tar"
    start = time.monotonic()
    with pytest.raises(ShardUnreachableError, match=f"shard {url} could not be read after 2 attempts"):
        batches(url, shard_retries=1, shard_timeout=5)
    assert time.monotonic() - start < 30


def test_a_pipe_shard_streams_what_the_file_holds_and_a_transient_failure_is_retried(tmp_path: Path) -> None:
    shard = latent_shard(tmp_path / "shard.tar")
    local = batches(str(shard))
    assert [k for b in local for k in b["key"]] == [f"s{i}" for i in range(6)]
    marker = tmp_path / "failed_once"
    flaky = f"pipe:if [ -e {marker} ]; then cat {shard}; else touch {marker}; exit 1; fi"
    for url in (f"pipe:cat {shard}", flaky):
        remote = batches(url, shard_retries=1)
        assert [b["key"] for b in remote] == [b["key"] for b in local]
        for a, b in zip(remote, local):
            assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
    assert marker.exists()


def test_local_shards_are_opened_once_and_settings_are_checked(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with pytest.raises(FileNotFoundError):
        open_shard(str(tmp_path / "missing.tar"), ShardRetry(retries=5), sleep=sleeps.append)
    assert sleeps == []
    with pytest.raises(ValueError, match="shard retries"):
        ShardRetry(retries=-1)
