"""settings.py: the resolved settings of train.py's command line, what they refuse and warn about, and the summary
printed from them. No training here (tests/test_train.py runs train.py)."""
import dataclasses
import json
import os
import shutil

import pytest

from lib import rundir
from lib import settings
import train
from lib.cli import UsageError
from helpers import ROOT


def resolve(*argv, **kw):
    return settings.from_command_line([str(a) for a in argv], world=kw.get("world", 1), device="cpu")


def test_the_bundled_recipe_resolves_to_its_args_json():
    s = resolve("--target", 2048)
    assert (s.recipe, s.steps, s.batch_size, s.micro_batch_size, s.lr, s.seq_len) == ("tiny", 100, 16, 16, 2e-4, 256)
    assert s.replay == settings.BUNDLED_REPLAY and (s.replay_batch, s.replay_weight) == (4, 0.2)
    assert s.rope_scaling == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                              "beta_fast": 4.0, "beta_slow": 1.0}
    record = s.record()  # args.json: the run's settings in their order, not where or how it runs
    assert list(record)[:4] == ["model", "data", "out", "target"] and list(record)[-1] == "rope_scaling"
    assert not {"world", "device", "threads"} & set(record)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 5
    assert resolve("--target", 2048, world=2).micro_batch_size == 8
    assert resolve("--target", 2048, "--threads", 1).threads == 1


@pytest.mark.parametrize("argv", [("--replay", "none"), ("--replay-batch", 0), ("--replay", "none", "--replay-batch", 0)])
def test_no_replay(argv):
    s = resolve("--target", 2048, *argv)
    assert (s.replay, s.replay_batch, s.replay_weight) == (None, 0, 0.0)


@pytest.mark.parametrize("argv,match", [
    (("--replay", "none", "--replay-batch", 4), "--replay and --replay-batch go together"),
    (("--replay", settings.BUNDLED_REPLAY, "--replay-batch", 0), "--replay and --replay-batch go together"),
    (("--rope", "linear:8", "--target", 1024), r"factor 8 is not --target 1024 / the model's 256-token window = 4; leave the "
                                                 r"factor out \(--rope linear\)"),
    (("--target", 256), "--target 256 is not beyond the model's 256-token window: nothing to extend"),
    (("--target", 200), "below the training length 256"),
])
def test_refused(argv, match):
    argv = argv if "--target" in argv else ("--target", 2048) + argv
    with pytest.raises(UsageError, match=match):
        resolve(*argv)


def test_what_is_accepted_at_the_window_and_with_a_matching_factor():
    assert resolve("--target", 256, "--rope", "none", "--method", "pi").rope_scaling is None  # plain fine-tuning
    assert resolve("--target", 1024, "--rope", "linear:4").rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_a_run_shorter_than_its_warmup_is_warned_about():
    assert settings.warnings(resolve("--target", 2048)) == []
    lines = settings.warnings(resolve("--target", 2048, "--steps", 5))
    assert len(lines) == 1 and "--steps 5 ends inside the --warmup of 10 steps" in lines[0]
    assert "never reaches --lr 0.0002" in lines[0]


def test_summary_next_commands_and_the_bundled_replay_note(tmp_path, capsys, text_corpus):
    train.summary(resolve("--target", 1000, "--out", tmp_path / "a"))
    out = capsys.readouterr().out
    assert "--ctx 256 512 1000" in out and "--lengths 256 512 1000" in out and "note:" not in out
    train.summary(resolve("--target", 1024, "--out", tmp_path / "b", "--data", text_corpus))
    out = capsys.readouterr().out
    assert "--ctx 256 512 1024 --stride 128 --max-tokens 4096\n" in out and "YOUR" not in out
    note = [line for line in out.splitlines() if line.startswith("note: the bundled passkey replay")]
    assert len(note) == 1 and "4 windows per step, weight 0.2" in note[0] and "--replay none" in note[0]
    assert os.path.relpath(settings.BUNDLED_REPLAY) in note[0]


def test_factor_over_the_checkpoint_window_not_the_training_window():
    """A training window shorter than the checkpoint's (PoSE needs none longer) leaves the interpolation as it is:
    target / the checkpoint's window, over that window."""
    short = resolve("--target", 2048, "--train-len", 128, "--replay", "none")
    default = resolve("--target", 2048, "--replay", "none")
    assert short.train_len == 128 and short.rope_scaling == default.rope_scaling
    assert short.rope_scaling["factor"] == 8.0 and short.rope_scaling["original_max_position_embeddings"] == 256


def test_the_bundled_runs_next_commands_are_the_readmes(capsys):
    """Pasted, they print the README's table (its evaluation flags, not evaluate.py's defaults)."""
    train.summary(resolve("--target", 2048, "--out", "out/pose-2048"))
    printed = [line.removeprefix("next:").strip() for line in capsys.readouterr().out.splitlines()]
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = [c for c in printed if c.startswith(("python evaluate.py", "python passkey.py"))]
    assert len(commands) == 2 and all(f"\n{c}\n" in readme for c in commands), commands


def test_extending_a_tiny_runs_model_keeps_the_tiny_recipe(tmp_path):
    """The recipe follows the run that made --model (its args.json), not the model's name; the tiny recipe trains at
    the base's original window, the length of its replay windows."""
    model = tmp_path / "pose-2048"
    shutil.copytree(os.path.join(ROOT, "assets", "tiny"), model)
    with open(model / "config.json") as f:
        config = json.load(f)
    config.update(max_position_embeddings=2048, rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                              "original_max_position_embeddings": 256,
                                                              "beta_fast": 4.0, "beta_slow": 1.0})
    (model / "config.json").write_text(json.dumps(config))
    (model / "args.json").write_text(json.dumps({"recipe": "tiny"}))
    s = resolve("--model", model, "--target", 4096, "--out", tmp_path / "out")
    assert (s.recipe, s.steps, s.batch_size, s.train_len) == ("tiny", 100, 16, 256)
    assert "the recipe of the run that made --model" in s.why[0]
    (model / "args.json").unlink()
    assert resolve("--model", model, "--target", 4096, "--out", tmp_path / "out", "--replay", "none").recipe == "paper"


def test_resume_with_more_steps_says_what_the_learning_rate_does():
    s = resolve("--target", 2048, "--steps", 200)
    start = rundir.Start(step=100, checkpoint="x", resumed_with={"steps": [100, 200]})
    (line,) = train.resume_note(s, start)
    assert "--steps 100 -> 200" in line and "stretched to end at step 200" in line
    assert f"{train.lr_at(99, 2e-4, 10, 100):.2e} at step 100" in line and "x higher" in line
    assert train.resume_note(s, rundir.Start()) == ()


def test_a_diverged_run_is_named():
    assert train.divergence([3.0, 3.1, 2.9, 2.8]) is None
    line = train.divergence([3.07] + [5.0] * 8 + [401247.0])
    assert "rose from 3.07 at step 1 to 4.012e+05" in line and "diverged" in line
