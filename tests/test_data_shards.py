"""data.shards, data.encode and the `cf data` sub-commands."""

import argparse
import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from cf.encoders import HashedTextEncoder, ToyAutoencoder
from cf.video_io import encode_mp4
from data import VideoDataModule, write_shards_from_csv, write_shards_from_folder
from data.cli import register
from data.encode import encode_shards, trim_text_padding
from data.shards import brace_url


def make_video(path, num_frames=9, fps=16, size=(16, 24), level=0):
    frames = np.full((num_frames, *size, 3), 40 + level, np.uint8)
    frames[:, :, : size[1] // 2] = 200  # a left half and a right half
    path.write_bytes(encode_mp4(frames, fps=fps))
    return path


def read_tars(pattern_glob_root, pattern):
    samples = {}
    for shard in sorted(pattern_glob_root.glob(pattern)):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__shard__": shard.name})[ext] = tar.extractfile(member).read()
    return samples


def cli(*argv):
    parser = argparse.ArgumentParser(prog="cf")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    args.func(args)


@pytest.fixture
def video_folder(tmp_path):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    for name, level in (("a", 0), ("b", 10), ("sub/e", 20)):
        make_video(folder / f"{name}.mp4", level=level)
        (folder / f"{name}.txt").write_text(f"  caption {name}\n")
    make_video(folder / "c.mp4")  # no caption
    (folder / "d.mp4").write_bytes(b"broken" * 100)
    (folder / "d.txt").write_text("caption d")
    return folder


def test_brace_url_and_pattern_checks():
    assert brace_url("out/train-%06d.tar", 3) == "out/train-{000000..000002}.tar"
    assert brace_url("out/train-%06d.tar", 1) == "out/train-000000.tar"
    assert brace_url("x-%d.tar", 12) == "x-{0..11}.tar"
    with pytest.raises(ValueError, match="one integer field"):
        brace_url("out/train.tar", 2)


def test_write_shards_from_folder(video_folder, tmp_path):
    with pytest.warns(UserWarning, match="skipped 2 videos"):
        report = write_shards_from_folder(str(video_folder), str(tmp_path / "out" / "s-%04d.tar"), maxcount=2)
    assert report.num_samples == 3 and report.num_shards == 2
    assert report.skipped == {"missing_caption": 1, "corrupt_video": 1}
    assert report.urls == str(tmp_path / "out" / "s-{0000..0001}.tar")
    samples = read_tars(tmp_path / "out", "s-*.tar")
    assert sorted(samples) == ["000000000", "000000001", "000000002"]
    assert [samples[k]["__shard__"] for k in sorted(samples)] == ["s-0000.tar", "s-0000.tar", "s-0001.tar"]
    for key, name in zip(sorted(samples), ["a", "b", "sub/e"]):
        sample = samples[key]
        assert set(sample) == {"__shard__", "mp4", "txt", "json"}
        assert sample["mp4"] == (video_folder / f"{name}.mp4").read_bytes()  # stored as given
        assert sample["txt"].decode() == f"caption {name}"
        meta = json.loads(sample["json"])
        source = str(video_folder / f"{name}.mp4")
        assert meta == {"fps": 16.0, "frames": 9, "width": 24, "height": 16, "source": source}
    # the shards feed the datamodule
    dm = VideoDataModule(val_urls=report.urls, num_frames=9, height=16, width=16, num_workers=0, batch_size=3)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["video"].shape == (3, 3, 9, 16, 16) and batch["caption"] == ["caption a", "caption b", "caption sub/e"]


def test_write_shards_from_csv(video_folder, tmp_path):
    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["videoFile", "caption", "score"])
        writer.writerow(["videos/a.mp4", "first, with a comma", "1"])
        writer.writerow([str(video_folder / "b.mp4"), "second", "2"])
        writer.writerow(["videos/missing.mp4", "third", "3"])
        writer.writerow(["videos/c.mp4", "", "4"])
    with pytest.warns(UserWarning, match="missing_video: 1"):
        report = write_shards_from_csv(str(table), str(tmp_path / "csv-%03d.tar"))
    assert report.num_samples == 2 and report.skipped == {"missing_video": 1, "missing_caption": 1}
    samples = read_tars(tmp_path, "csv-*.tar")
    assert [samples[k]["txt"].decode() for k in sorted(samples)] == ["first, with a comma", "second"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx.mp4,hello\n")
    with pytest.raises(ValueError, match="videoFile"):
        write_shards_from_csv(str(bad), str(tmp_path / "x-%03d.tar"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        write_shards_from_csv(str(tmp_path / "nope.csv"), str(tmp_path / "x-%03d.tar"))
    with pytest.raises(FileNotFoundError, match="no_folder"):
        write_shards_from_folder(str(tmp_path / "no_folder"), str(tmp_path / "x-%03d.tar"))


def test_trim_text_padding():
    embedding = torch.zeros(6, 3)
    embedding[:4] = torch.randn(4, 3)
    embedding[2] = 0  # an interior zero row is kept
    assert torch.equal(trim_text_padding(embedding), embedding[:4])
    assert trim_text_padding(torch.zeros(5, 3)).shape == (1, 3)


def test_encode_shards_with_the_toy_encoders(video_folder, tmp_path):
    with pytest.warns(UserWarning):
        videos = write_shards_from_folder(str(video_folder), str(tmp_path / "v-%03d.tar"))
    autoencoder = ToyAutoencoder(latent_channels=4, spatial_factor=8)
    text_encoder = HashedTextEncoder(dim=8, max_length=6)
    report = encode_shards(videos.urls, str(tmp_path / "lat-%03d.tar"), autoencoder, text_encoder, num_frames=9,
                           height=16, width=16, batch_size=2, maxcount=2)
    assert report.num_samples == 3 and report.num_shards == 2
    samples = read_tars(tmp_path, "lat-*.tar")
    video_dm = VideoDataModule(val_urls=videos.urls, num_frames=9, height=16, width=16, batch_size=3, num_workers=0)
    video_dm.setup("validate")
    (video_batch,) = list(video_dm.val_dataloader())
    expected_latents = autoencoder.encode(video_batch["video"])
    expected_text = text_encoder(video_batch["caption"])
    for i, key in enumerate(video_batch["key"]):
        latent = torch.load(io.BytesIO(samples[key]["latent.pth"]), weights_only=True)
        text = torch.load(io.BytesIO(samples[key]["text.pth"]), weights_only=True)
        assert torch.allclose(latent, expected_latents[i], atol=1e-6)
        n = len(text_encoder.token_ids(video_batch["caption"][i]))
        assert torch.equal(text, expected_text[i, :n])
        meta = json.loads(samples[key]["json"])
        assert meta["text_length"] == 6 and meta["latent_shape"] == [4, 3, 2, 2]
    # latent shards feed the datamodule and give back the encoders' exact outputs
    dm = VideoDataModule(val_urls=report.urls, mode="latents", batch_size=3, num_workers=0)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["key"] == video_batch["key"]
    assert torch.allclose(batch["latents"], expected_latents, atol=1e-6)
    assert torch.equal(batch["text"], expected_text)  # zero padding restored to max_length


def test_cli_commands(video_folder, tmp_path, capsys):
    with pytest.warns(UserWarning):
        cli("data", "shards", "--folder", str(video_folder), "--out", str(tmp_path / "f-%03d.tar"))
    assert "wrote 3 samples in 1 shard(s)" in capsys.readouterr().out
    table = tmp_path / "t.csv"
    table.write_text(f"videoFile,caption\n{video_folder / 'a.mp4'},hello\n")
    cli("data", "shards", "--csv", str(table), "--out", str(tmp_path / "c-%03d.tar"), "--maxcount", "5")
    assert "wrote 1 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli("data", "shards", "--out", str(tmp_path / "x-%03d.tar"))

    cli("data", "synth", "--out", str(tmp_path / "synth"), "--num-clips", "3", "--val-clips", "1",
        "--min-seconds", "1", "--max-seconds", "1.5", "--workers", "1")
    out = capsys.readouterr().out
    assert "train: 2 clips" in out and "val: 1 clips" in out
    assert len((tmp_path / "synth" / "train" / "prompts.txt").read_text().splitlines()) == 2

    cli("data", "encode", str(tmp_path / "synth" / "train" / "shard-000000.tar"), "--out",
        str(tmp_path / "lat-%03d.tar"), "--num-frames", "9", "--height", "64", "--width", "64",
        "--autoencoder-args", '{"latent_channels": 4}', "--text-encoder-args", '{"dim": 8, "max_length": 16}')
    assert "wrote 2 samples" in capsys.readouterr().out
    dm = VideoDataModule(val_urls=str(tmp_path / "lat-000.tar"), mode="latents", batch_size=2, num_workers=0)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["latents"].shape == (2, 4, 3, 8, 8) and batch["text"].shape == (2, 16, 8)
    with pytest.raises(SystemExit):
        cli("data", "encode", "x.tar", "--out", "y-%03d.tar", "--autoencoder-args", "[1, 2]")
