"""`cf data encode` and `cf data ode-pairs` under torchrun: two processes (RANK 0 / 1, WORLD_SIZE 2 in the
environment, as torchrun sets them) write the same samples as one process, into files that never collide."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cf.cli import main
from cf.launch import launch_rank_and_world, process_device, process_share
from cf.video_io import encode_mp4
from data import VideoDataModule, write_shards_from_folder
from data.shards import ShardSink, shard_urls

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def single_process(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def run_two_ranks(argv: list[str], monkeypatch, capsys) -> list[str]:
    """``cf argv`` as two processes of one launch (RANK=0/1, WORLD_SIZE=2), running at the same time: rank 1 in a
    subprocess, rank 0 in this one; returns their stdout."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES} | {"OMP_NUM_THREADS": "1"}
    other = subprocess.Popen([sys.executable, "-m", "cf", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=base | {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    try:
        capsys.readouterr()
        with monkeypatch.context() as env:
            for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
                env.setenv(name, value)
            main(argv)
        first = capsys.readouterr().out
        out, err = other.communicate(timeout=600)
    finally:
        other.kill()
    assert other.returncode == 0, err[-3000:]
    return [first, out]


def read_shards(folder: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """{shard file name: {sample key: {member extension: bytes}}} of every tar in ``folder``."""
    shards = {}
    for path in sorted(folder.glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        shards[path.name] = samples
    return shards


def union(shards: dict[str, dict[str, dict[str, bytes]]]) -> dict[str, dict[str, bytes]]:
    """All samples of all shards; a key in two shards is a failure (a sample written twice)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards.values():
        assert not set(shard) & set(samples), "a sample is in two shards"
        samples.update(shard)
    return samples


def assert_same_samples(one: dict[str, dict[str, bytes]], two: dict[str, dict[str, bytes]]) -> None:
    """Same keys and members; tensors equal exactly, other members byte for byte."""
    assert sorted(one) == sorted(two)
    for key in one:
        assert sorted(one[key]) == sorted(two[key]), key
        for ext, raw in one[key].items():
            if ext.endswith(".pth"):
                a = torch.load(io.BytesIO(raw), weights_only=True)
                b = torch.load(io.BytesIO(two[key][ext]), weights_only=True)
                assert a.dtype == b.dtype and torch.equal(a, b), (key, ext)
            else:
                assert raw == two[key][ext], (key, ext)


def test_launch_share_and_device(monkeypatch, single_process):
    assert launch_rank_and_world() == (0, 1) and process_share(3) == [0, 1, 2]
    assert process_device("cuda") == "cuda"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_share(8) == [1, 4, 7] and process_share(1) == []
    assert process_device("cuda") == "cuda:1" and process_device("cpu") == "cpu"
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 is outside WORLD_SIZE=3; launch with torchrun"):
        process_share(8)


def test_shard_sink_numbering(tmp_path):
    with ShardSink(str(tmp_path / "s-%03d.tar"), maxcount=2, first_shard=1, shard_stride=3) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:03d}", "txt": str(i)})
    assert sink.shard_numbers == [1, 4, 7] and sink.num_shards == 3 and sink.num_samples == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-001.tar", "s-004.tar", "s-007.tar"]
    assert [sorted(s) for s in read_shards(tmp_path).values()] == [["000", "001"], ["002", "003"], ["004"]]
    assert sink.urls == "::".join(str(tmp_path / f"s-{n:03d}.tar") for n in (1, 4, 7))
    assert shard_urls("s-%03d.tar", [0, 1, 2]) == "s-{000..002}.tar" and shard_urls("s-%03d.tar", []) == ""


def test_ode_pairs_two_processes_equal_one(teacher_file, tmp_path, single_process, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(5)))
    common = ["data", "ode-pairs", "--teacher", teacher_file, "--network", "tiny", "--prompts", str(prompts),
              "--num-frames", "3", "--latent-size", "4", "4", "--num-steps", "4", "--stored-steps", "0", "2",
              "--text-encoder-args", json.dumps({"dim": 32, "max_length": 16}), "--batch-size", "2",
              "--maxcount", "2", "--seed", "7"]
    main([*common, "--out", str(tmp_path / "one" / "ode-%06d.tar")])
    outputs = run_two_ranks([*common, "--out", str(tmp_path / "two" / "ode-%06d.tar")], monkeypatch, capsys)
    assert "process 0 of 2 wrote 3 ODE pairs in 2 shard(s)" in outputs[0]
    assert "process 1 of 2 wrote 2 ODE pairs in 1 shard(s)" in outputs[1]
    one, two = read_shards(tmp_path / "one"), read_shards(tmp_path / "two")
    # rank 0: prompts 0, 2, 4 in shards 0 and 2; rank 1: prompts 1, 3 in shard 1
    assert sorted(two) == sorted(one) == ["ode-000000.tar", "ode-000001.tar", "ode-000002.tar"]
    assert sorted(two["ode-000001.tar"]) == ["ode-000000001", "ode-000000003"]
    samples = union(two)
    assert_same_samples(union(one), samples)
    assert [json.loads(samples[f"ode-{i:09d}"]["json"])["seed"] for i in range(5)] == [7, 8, 9, 10, 11]


def test_encode_two_processes_equal_one(tmp_path, single_process, monkeypatch, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        frames = np.full((9, 16, 24, 3), 30 * i, np.uint8)
        frames[:, :, :12] = 200 - 20 * i
        (videos / f"v{i}.mp4").write_bytes(encode_mp4(frames, fps=16))
        (videos / f"v{i}.txt").write_text(f"video {i}")
    inputs = write_shards_from_folder(str(videos), str(tmp_path / "in" / "v-%03d.tar"), maxcount=2).urls
    assert inputs.endswith("v-{000..002}.tar")  # 3 input shards: rank 0 gets 0 and 2, rank 1 gets 1
    common = ["data", "encode", inputs, "--num-frames", "9", "--height", "16", "--width", "16",
              "--autoencoder-args", json.dumps({"latent_channels": 4, "spatial_factor": 8}),
              "--text-encoder-args", json.dumps({"dim": 8, "max_length": 6}), "--batch-size", "2",
              "--maxcount", "2"]
    main([*common, "--out", str(tmp_path / "one" / "lat-%03d.tar")])
    outputs = run_two_ranks([*common, "--out", str(tmp_path / "two" / "lat-%03d.tar")], monkeypatch, capsys)
    assert "process 0 of 2 wrote 3 samples in 2 shard(s)" in outputs[0]
    assert f"read the shards of all of them as {tmp_path / 'two' / 'lat-*.tar'}" in outputs[0]
    assert "process 1 of 2 wrote 2 samples in 1 shard(s)" in outputs[1]
    one, two = read_shards(tmp_path / "one"), read_shards(tmp_path / "two")
    assert sorted(two) == ["lat-000.tar", "lat-001.tar", "lat-002.tar"]  # rank 0: 0, 2; rank 1: 1
    assert_same_samples(union(one), union(two))
    # the datamodule reads the shards of every process through the wildcard
    data = VideoDataModule(val_urls=str(tmp_path / "two" / "lat-*.tar"), mode="latents", batch_size=5,
                           num_workers=0)
    data.setup("validate")
    (batch,) = list(data.val_dataloader())
    assert sorted(batch["key"]) == sorted(union(one))
