"""`cf generate`: streaming generation into mp4 files through the CLI."""

import torch

from cf.cli import main
from cf.generate import GeneratorSpec, latent_frames_for, load_generator
from cf.models.wan import CausalWanDiT, WanConfig
from cf.video_io import probe_mp4
from cf.weights import save_wan_weights


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
