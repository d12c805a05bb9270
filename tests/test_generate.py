"""`cf generate`: streaming generation into mp4 files through the CLI; interruption keeps a playable mp4, names
never overwrite, bad arguments fail with one line."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from cf.cli import main
from cf.generate import GeneratorSpec, generate_videos, latent_frames_for, load_generator
from cf.models.wan import CausalWanDiT, WanConfig, WanDiT
from cf.video_io import decode_mp4, probe_mp4
from cf.weights import save_wan_weights

REPO = Path(__file__).resolve().parents[1]


def test_latent_frame_arithmetic():
    # 60 s at 16 fps = 960 pixel frames -> 1 + 240 latents, rounded up to whole chunks of 3
    assert latent_frames_for(60, 16, 3) == 243
    assert latent_frames_for(5.0625, 16, 3) == 21  # 81 pixel frames


def test_generate_cli_writes_videos_from_exported_weights(tmp_path):
    torch.manual_seed(0)
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3)
    weights = save_wan_weights(model, tmp_path / "student" / "generator.safetensors")
    GeneratorSpec().save(tmp_path / "student" / "config.json")
    out = tmp_path / "videos"
    main(["generate", "--weights", str(weights), "--prompt", "a red circle", "--prompt", "a blue square",
          "--seconds", "3", "--out", str(out), "--memory", "slow_fast"])
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2 and sorted(out.glob("*.txt"))
    info = probe_mp4(videos[0])
    expected_latents = latent_frames_for(3, 16, 3)
    assert info.num_frames == 1 + 4 * (expected_latents - 1)
    assert (info.height, info.width) == (64, 64)
    loaded = load_generator(GeneratorSpec.load(tmp_path / "student" / "config.json"), weights)
    assert torch.equal(loaded.blocks[0].ffn[0].weight, model.blocks[0].ffn[0].weight)


def test_student_checkpoint_without_ema_falls_back_to_generator_weights(tmp_path, capsys):
    from cf.export import read_generator_weights

    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3)
    state = {f"generator.{k}": v for k, v in model.state_dict().items()}
    state["critic.head.head.bias"] = torch.zeros(1)
    torch.save({"state_dict": state, "callbacks": {}}, tmp_path / "last.ckpt")
    loaded = read_generator_weights(tmp_path / "last.ckpt")
    assert loaded.keys() == model.state_dict().keys()
    assert "no EMA callback state" in capsys.readouterr().out


def test_spec_reads_the_keyframe_rule_of_older_exports_into_the_memory():
    old = {"frames_per_chunk": 3, "memory": {"sink": 3, "slow": 12, "fast": 6},
           "keyframes": {"policy": "uniform", "threshold": 0.9, "interval_frames": 3}}
    config = GeneratorSpec.from_dict(old).memory_config()
    assert (config.keyframes, config.threshold, config.keyframe_interval_frames) == ("uniform", 0.9, 3)
    assert GeneratorSpec.from_dict(old).memory_config(keyframes="never").keyframes == "never"
    assert GeneratorSpec.from_dict(old).memory_config("sliding").slow == 0


# ----------------------------------------------------------------------------------------------------------------------
# Interruption, names, argument errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_generate_leaves_a_playable_mp4_of_the_chunks_done(tmp_path, signum):
    out = tmp_path / "videos"
    command = [sys.executable, "-m", "cf", "generate", "--prompt", "a red circle", "--seconds", "600",
               "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".000_a_red_circle.mp4.tmp-") and p.stat().st_size > 0
                  for p in (out.iterdir() if out.exists() else [])):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    total = latent_frames_for(600, 16, 3) // 3
    found = re.search(rf"cf generate: interrupted by {name} after (\d+) of {total} chunks: kept 1 playable video\(s\) "
                      rf"of ([\d.]+) s \(of 600 s asked\): \S+000_a_red_circle\.mp4", stderr)
    assert found, stderr
    chunks, seconds = int(found.group(1)), float(found.group(2))
    assert 1 <= chunks < total
    frames, fps = decode_mp4(out / "000_a_red_circle.mp4")  # the project's own decoder
    assert len(frames) == 9 + 12 * (chunks - 1)  # first chunk: 1 + 4 * 2 pixel frames, then 4 * 3 per chunk
    assert fps == 16 and abs(len(frames) / fps - seconds) < 0.01
    assert (out / "000_a_red_circle.txt").read_text() == "a red circle\n"
    assert sorted(p.name for p in out.iterdir()) == ["000_a_red_circle.mp4", "000_a_red_circle.txt"]


def test_same_names_never_overwrite(tmp_path, capsys):
    out = tmp_path / "videos"
    main(["generate", "--prompt", "A red circle!", "--seconds", "0.5", "--out", str(out), "--device", "cpu"])
    first = (out / "000_a_red_circle.mp4").read_bytes()
    with pytest.raises(SystemExit, match=r"^cf generate: \S+000_a_red_circle\.mp4 already exists \(2 of the output "
                                         r"files do\); pass --overwrite to replace them, or choose another --out"):
        main(["generate", "--prompt", "a red circle?", "--seed", "1", "--seconds", "0.5", "--out", str(out),
              "--device", "cpu"])
    assert (out / "000_a_red_circle.mp4").read_bytes() == first
    assert (out / "000_a_red_circle.txt").read_text() == "A red circle!\n"
    main(["generate", "--prompt", "a red circle?", "--seed", "1", "--seconds", "0.5", "--out", str(out),
          "--device", "cpu", "--overwrite"])
    assert (out / "000_a_red_circle.txt").read_text() == "a red circle?\n"

    spec = GeneratorSpec()
    model = load_generator(spec, None)
    paths = generate_videos(spec, model, ["one", "two", "three"], tmp_path / "named", seconds=0.5, progress=False,
                            names=["same", "same", "same"])
    assert [p.name for p in paths] == ["same.mp4", "same_2.mp4", "same_3.mp4"]
    assert [(tmp_path / "named" / f"{n}.txt").read_text() for n in ("same", "same_2", "same_3")] == \
        ["one\n", "two\n", "three\n"]


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    save_wan_weights(WanDiT(WanConfig.tiny()), teacher / "teacher.safetensors")
    (teacher / "config.json").write_text(json.dumps(asdict(WanConfig.tiny())))
    return tmp_path


@pytest.mark.parametrize("arguments, message", [
    (["--seconds", "0"], r"--seconds must be a positive, finite number of seconds, got 0\.0; e\.g\. --seconds 10"),
    (["--seconds", "-1"], r"--seconds must be a positive, finite number of seconds, got -1\.0"),
    (["--seconds", "nan"], r"--seconds must be a positive, finite number of seconds, got nan"),
    (["--seconds", "inf"], r"--seconds must be a positive, finite number of seconds, got inf"),
    (["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0; e\.g\. --batch-size 4"),
    (["--weights", "{tmp}/missing/generator.safetensors"], r"--weights \S+generator\.safetensors: file not found; "
                                                           r"pass the generator\.safetensors"),
    (["--weights", "{tmp}/empty.ckpt"], r"--weights \S+empty\.ckpt is empty \(0 bytes\), a write that did not "
                                        r"finish; pass an earlier checkpoint or export"),
    (["--weights", "{tmp}/teacher/teacher.safetensors"], r"\S+config\.json is a teacher's config\.json \(a bare "
                                                         r"WanConfig, as `cf convert teacher` writes\)"),
])
def test_bad_arguments_fail_with_one_line_naming_the_fix(bad_inputs, arguments, message):
    out = bad_inputs / "videos"
    argv = ["generate", "--prompt", "x", "--out", str(out), *[a.format(tmp=bad_inputs) for a in arguments]]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    text = str(stopped.value.code)
    assert re.match(r"^cf generate: " + message, text) and "\n" not in text, text
    assert not out.exists()


def test_non_finite_weights_are_refused(tmp_path):
    model = CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3)
    state = {f"generator.{k}": v.clone() for k, v in model.state_dict().items()}
    state["generator.blocks.0.ffn.0.weight"][0, 0] = float("nan")
    torch.save({"state_dict": state, "callbacks": {}}, tmp_path / "last.ckpt")
    GeneratorSpec().save(tmp_path / "config.json")
    out = tmp_path / "videos"
    with pytest.raises(SystemExit, match=r"^cf generate: refusing to generate from \S+last\.ckpt: tensor "
                                         r"'blocks\.0\.ffn\.0\.weight' holds 1 NaN/inf values"):
        main(["generate", "--weights", str(tmp_path / "last.ckpt"), "--prompt", "x", "--out", str(out)])
    assert not out.exists()


def test_generate_defaults_to_bf16_on_cuda_and_the_spec_keeps_the_encoder_dtype(monkeypatch):
    from cf.generate import generation_dtypes

    spec = GeneratorSpec.from_dict({"encoder_dtype": "bfloat16"})
    assert spec.encoder_dtype == "bfloat16"
    assert generation_dtypes("cuda", "auto", "auto", spec) == (torch.bfloat16, "bfloat16")
    assert generation_dtypes("cpu", "auto", "auto", GeneratorSpec()) == (torch.float32, "float32")
    assert generation_dtypes("cuda:1", "float32", "float16", spec) == (torch.float32, "float16")
    # the CLI's device default follows CUDA availability (mocked), and then auto means bf16
    import argparse

    from cf import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    args = parser.parse_args(["generate", "--prompt", "a cat"])
    assert args.device == "cuda"
    assert generation_dtypes(args.device, args.dtype, args.encoder_dtype, spec)[0] == torch.bfloat16


def test_offloaded_text_encoder_gives_the_same_video(tmp_path):
    model = load_generator(GeneratorSpec(), None)
    spec = GeneratorSpec()
    from cf.generate import generate_videos
    from cf.video_io import decode_mp4

    kwargs = dict(seconds=1.0, batch_size=1, progress=False)
    plain = generate_videos(spec, model, ["a red circle", "a blue square"], tmp_path / "a", **kwargs)
    offloaded = generate_videos(spec, model, ["a red circle", "a blue square"], tmp_path / "b",
                                offload_text_encoder=True, **kwargs)
    for a, b in zip(plain, offloaded):  # the same frames, up to the video codec's own noise
        frames_a, frames_b = decode_mp4(a)[0].astype(int), decode_mp4(b)[0].astype(int)
        assert frames_a.shape == frames_b.shape and abs(frames_a - frames_b).mean() < 1.0


def test_two_torchrun_ranks_write_what_one_process_writes(tmp_path):
    """RANK / WORLD_SIZE (as torchrun sets them) split the prompts; names and seeds follow the global prompt index,
    so two concurrent processes write disjoint files whose videos equal a single process's (any batching)."""
    import os
    import subprocess
    import sys

    from cf.video_io import decode_mp4

    torch.manual_seed(0)
    weights = tmp_path / "student" / "generator.safetensors"
    save_wan_weights(CausalWanDiT(WanConfig.tiny(), frames_per_chunk=3).state_dict(), weights)
    GeneratorSpec().save(weights.parent / "config.json")
    prompts = ["--prompt", "a red circle", "--prompt", "a red circle", "--prompt", "a blue square"]
    base = [sys.executable, "-m", "cf", "generate", *prompts, "--seconds", "1", "--device", "cpu", "--weights",
            str(weights)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*base, "--out", str(tmp_path / "one"), "--batch-size", "3"], env=env, check=True,
                   capture_output=True)
    ranks = [subprocess.Popen([*base, "--out", str(tmp_path / "two"), "--batch-size", "1"],
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for r in range(2)]
    for process in ranks:
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert one == ["000_a_red_circle.mp4", "000_a_red_circle.txt", "001_a_red_circle.mp4", "001_a_red_circle.txt",
                   "002_a_blue_square.mp4", "002_a_blue_square.txt"]
    for name in one[::2]:
        a = decode_mp4(tmp_path / "one" / name)[0].astype(int)
        b = decode_mp4(tmp_path / "two" / name)[0].astype(int)
        assert a.shape == b.shape and abs(a - b).mean() < 1.0, name
    red, red_again = (decode_mp4(tmp_path / "one" / n)[0].astype(int) for n in one[0:4:2])
    assert abs(red - red_again).mean() > 5.0  # same prompt, another seed: another video
