"""`cf demo` re-run after a change: which stages run again (`cf.demo._StaleStages` on the pipeline's stages.json)."""

from pathlib import Path

from cf.demo import _StaleStages
from cf.stage_runner import StageLog, config_fingerprint


def _made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("weights")
    return path


def _recorded(log: StageLog, name: str, command: list[str]) -> None:
    """A record of a stage that started after every stage recorded before it had finished."""
    started = max((r["started_at"] + r["seconds"] for r in log), default=0.0) + 1.0
    log.append({"stage": name, "seconds": 1.0, "command": " ".join(command), "started_at": started})


def test_a_stage_runs_again_when_its_command_changed_and_so_does_every_stage_after_it(tmp_path, capsys):
    log = StageLog(tmp_path / "stages.json")
    teacher, stage0, stage1 = (_made(tmp_path / f"{n}.safetensors") for n in ("teacher", "stage0", "stage1"))
    _recorded(log, "teacher", ["fit", "teacher.yaml", "--trainer.max_steps", "600"])
    _recorded(log, "stage 0", ["fit", "stage0.yaml", "--trainer.max_steps", "300"])
    _recorded(log, "stage 1", ["fit", "stage1.yaml", "--trainer.max_steps", "200"])

    # read back from the file, as a later `cf demo` does
    unchanged = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert not unchanged.needs(teacher, "teacher", ["fit", "teacher.yaml", "--trainer.max_steps", "600"])
    assert not unchanged.needs(stage0, "stage 0", ["fit", "stage0.yaml", "--trainer.max_steps", "300"])
    assert not unchanged.needs(stage1, "stage 1", ["fit", "stage1.yaml", "--trainer.max_steps", "200"])

    changed = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert not changed.needs(teacher, "teacher", ["fit", "teacher.yaml", "--trainer.max_steps", "600"])
    assert changed.needs(stage0, "stage 0", ["fit", "stage0.yaml", "--trainer.max_steps", "1200"])
    # stage 1's own command is unchanged, but it starts from the new stage-0 weights
    assert changed.needs(stage1, "stage 1", ["fit", "stage1.yaml", "--trainer.max_steps", "200"])
    assert "stage 0: its command changed" in capsys.readouterr().out


def test_a_missing_output_runs_its_stage_even_with_the_same_command(tmp_path):
    log = StageLog(tmp_path / "stages.json")
    _recorded(log, "teacher", ["fit", "teacher.yaml"])
    _recorded(log, "stage 0", ["fit", "stage0.yaml"])
    stale = _StaleStages(log)
    assert stale.needs(tmp_path / "teacher.safetensors", "teacher", ["fit", "teacher.yaml"])
    assert stale.needs(_made(tmp_path / "stage0.safetensors"), "stage 0", ["fit", "stage0.yaml"])


def test_an_output_without_a_record_is_kept(tmp_path, capsys):
    """Weights put in place by hand (no stages.json record) are used as they are, as are the stages after them."""
    stale = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert not stale.needs(_made(tmp_path / "stage1.safetensors"), "stage 1", ["fit", "stage1.yaml"])
    assert "stage 1: kept" in capsys.readouterr().out
    assert stale.needs(tmp_path / "stage2.safetensors", "stage 2", ["fit", "stage2.yaml"])


def test_side_by_side_stages_run_only_where_needed(tmp_path):
    log = StageLog(tmp_path / "stages.json")
    stage1 = _made(tmp_path / "stage1.safetensors")
    _recorded(log, "stage 1", ["fit", "stage1.yaml"])
    done = _made(tmp_path / "cf" / "generator.safetensors")
    _recorded(log, "context forcing", ["fit", "stage2.yaml"])
    _recorded(log, "baseline", ["fit", "stage2.yaml", "baseline.yaml", "--trainer.max_steps", "100"])
    baseline = _made(tmp_path / "baseline" / "generator.safetensors")
    stages = [(done, "context forcing", ["fit", "stage2.yaml"]),
              (baseline, "baseline", ["fit", "stage2.yaml", "baseline.yaml", "--trainer.max_steps", "150"]),
              (tmp_path / "ablation" / "generator.safetensors", "ablation", ["fit", "stage2.yaml", "ablation.yaml"])]

    stale = _StaleStages(log)
    assert not stale.needs(stage1, "stage 1", ["fit", "stage1.yaml"])
    # the baseline's steps changed and the ablation was never made; Context Forcing stays as it is
    assert [name for _, name in stale.needed_side_by_side(stages)] == ["baseline", "ablation"]

    after_upstream = _StaleStages(log)
    assert after_upstream.needs(stage1, "stage 1", ["fit", "stage1.yaml", "--trainer.max_steps", "400"])
    assert [name for _, name in after_upstream.needed_side_by_side(stages)] == ["context forcing", "baseline",
                                                                                  "ablation"]


def test_an_edited_config_file_runs_its_stage_again_with_the_same_command(tmp_path, capsys):
    """The command names the config file; its contents are what changed (e.g. a new default in the yaml)."""
    stage0_yaml, stage1_yaml = tmp_path / "stage0.yaml", tmp_path / "stage1.yaml"
    stage0_yaml.write_text("model:\n  lr: 1.0e-4\n")
    stage1_yaml.write_text("model:\n  critic_steps_per_generator_step: 2\n")
    stage0, stage1 = _made(tmp_path / "stage0.safetensors"), _made(tmp_path / "stage1.safetensors")
    stage0_cmd = ["fit", "--config", str(stage0_yaml)]
    stage1_cmd = ["fit", "--config", str(stage1_yaml), "--trainer.max_steps", "200"]
    log = StageLog(tmp_path / "stages.json")
    for started, name, cmd in ((0.0, "stage 0", stage0_cmd), (10.0, "stage 1", stage1_cmd)):
        log.append({"stage": name, "seconds": 1.0, "command": " ".join(cmd), "configs": config_fingerprint(cmd),
                    "started_at": started})

    unchanged = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert not unchanged.needs(stage0, "stage 0", stage0_cmd)
    assert not unchanged.needs(stage1, "stage 1", stage1_cmd)

    stage1_yaml.write_text("model:\n  critic_steps_per_generator_step: 5\n")
    edited = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert not edited.needs(stage0, "stage 0", stage0_cmd)
    assert edited.needs(stage1, "stage 1", stage1_cmd)
    assert "stage 1: its config files were edited" in capsys.readouterr().out
    # a record from before config fingerprints were kept is judged by its command alone
    log.append({"stage": "stage 1", "seconds": 1.0, "command": " ".join(stage1_cmd), "started_at": 10.0})
    assert not _StaleStages(StageLog(tmp_path / "stages.json")).needs(stage1, "stage 1", stage1_cmd)


def test_run_stage_records_the_fingerprint_of_every_config_file(tmp_path):
    import sys

    from cf.stage_runner import run_stage

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("a: 1\n")
    second.write_text("b: 2\n")
    cmd = [sys.executable, "-c", "pass", "--config", str(first), "--config", str(second)]
    log = StageLog(tmp_path / "stages.json")
    run_stage(cmd, {}, log, "noop")
    recorded = StageLog(tmp_path / "stages.json").record_of("noop")["configs"]
    assert recorded == config_fingerprint(cmd)
    second.write_text("b: 3\n")  # either file's contents move the fingerprint
    assert config_fingerprint(cmd) != recorded
    assert config_fingerprint([sys.executable, "-c", "pass"]) is None


def test_a_stage_made_before_its_upstream_last_ran_runs_again(tmp_path, capsys):
    """A re-run that stopped after stage 1 but before stage 2 finished: stage 2's old output is still there with its
    old (unchanged) command, but it was made from the previous stage-1 weights."""
    stage1, stage2 = _made(tmp_path / "stage1.safetensors"), _made(tmp_path / "stage2.safetensors")
    stage3 = _made(tmp_path / "stage3.safetensors")
    log = StageLog(tmp_path / "stages.json")
    log.append({"stage": "stage 2", "seconds": 5.0, "command": "fit stage2.yaml", "started_at": 1000.0})
    log.append({"stage": "stage 3", "seconds": 5.0, "command": "fit stage3.yaml", "started_at": 1010.0})
    log.append({"stage": "stage 1", "seconds": 5.0, "command": "fit stage1.yaml", "started_at": 2000.0})

    stale = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert not stale.needs(stage1, "stage 1", ["fit", "stage1.yaml"])
    assert stale.needs(stage2, "stage 2", ["fit", "stage2.yaml"])
    assert "stage 2: " + str(stage2) + " was made before stage 1 last ran" in capsys.readouterr().out
    assert stale.needs(stage3, "stage 3", ["fit", "stage3.yaml"])  # after one that runs

    # the same ordering, but stage 2 started after stage 1 finished: nothing to do
    log.append({"stage": "stage 2", "seconds": 5.0, "command": "fit stage2.yaml", "started_at": 2006.0})
    log.append({"stage": "stage 3", "seconds": 5.0, "command": "fit stage3.yaml", "started_at": 2012.0})
    fresh = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert [fresh.needs(p, n, ["fit", f"{n.replace(' ', '')}.yaml"]) for p, n in
            ((stage1, "stage 1"), (stage2, "stage 2"), (stage3, "stage 3"))] == [False, False, False]
    # side-by-side stages compare with the same upstream, and the latest of them feeds what comes next
    side = _StaleStages(StageLog(tmp_path / "stages.json"))
    assert not side.needs(stage1, "stage 1", ["fit", "stage1.yaml"])
    assert side.needed_side_by_side([(stage2, "stage 2", ["fit", "stage2.yaml"])]) == []
    assert side.upstream_finished == ("stage 2", 2011.0)


def test_videos_are_made_again_when_the_generator_weights_change(tmp_path, monkeypatch):
    import types

    import cf.generate
    from cf.demo import DemoConfig, _generate

    made = []

    def fake_generate_videos(spec, model, texts, folder, names, **kwargs):
        made.append(list(names))
        for name in names:
            _made(Path(folder) / f"{name}.mp4")

    monkeypatch.setattr(cf.generate, "generate_videos", fake_generate_videos)
    monkeypatch.setattr(cf.generate, "load_generator", lambda spec, weights: None)
    monkeypatch.setattr(cf.generate.GeneratorSpec, "load", staticmethod(lambda path: None))
    weights = _made(tmp_path / "student" / "generator.safetensors")
    prompts = [types.SimpleNamespace(name="clip0_named", text="a red circle")]
    log = StageLog(tmp_path / "stages.json")
    cfg = DemoConfig()

    _generate(weights, prompts, tmp_path / "videos", cfg, "context_forcing", log)
    _generate(weights, prompts, tmp_path / "videos", cfg, "context_forcing", StageLog(tmp_path / "stages.json"))
    assert len(made) == 1  # same weights, same command: the videos are kept
    weights.write_text("re-trained weights")
    _generate(weights, prompts, tmp_path / "videos", cfg, "context_forcing", StageLog(tmp_path / "stages.json"))
    assert len(made) == 2
    _generate(weights, prompts, tmp_path / "videos", cfg, "sliding_window", StageLog(tmp_path / "stages.json"))
    assert len(made) == 3  # another memory, another command
