"""Bad input and interruptions: every script answers with one line, `error: ...` (exit 1) or `interrupted...`
(exit 130), never a traceback, and writes or changes nothing. The commands of each group run in parallel."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from helpers import ROOT



def start(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", POSE_CACHE=os.path.join(cwd, "cache"))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=plain_sigint)


def plain_sigint():
    """In the child before it starts: SIGINT unblocked and at its default, as a shell gives it, whatever the test
    process inherited or set (a blocked or ignored SIGINT is passed on to children, and train.py would never see
    Ctrl-C)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    return {os.path.relpath(os.path.join(d, f), folder): (os.path.getsize(os.path.join(d, f)),
                                                           os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files if "cache" not in d}


def one_line_error(proc, match):
    out, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, (proc.args, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (proc.args, err)
    assert match in lines[0], (match, lines[0])


def with_weights(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(os.path.join(dst, "model.safetensors"))
    edit(state)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def with_config(src, dst, config):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir):
    """Broken copies of the tiny model, and other bad files."""
    root = tmp_path_factory.mktemp("bad")
    base = tiny_model_dir
    cfg = json.load(open(os.path.join(base, "config.json")))
    with_weights(base, root / "nan", lambda s: s["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    with_weights(base, root / "shape", lambda s: s.__setitem__("model.norm.weight", torch.ones(7)))
    with_config(base, root / "listed", "[1, 2]")
    with_config(base, root / "abc", dict(cfg, hidden_size="abc"))
    shutil.copytree(base, root / "badtok")
    (root / "badtok" / "tokenizer.model").write_text("not a sentencepiece model")
    shutil.copytree(base, root / "model-copy")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    (root / "afile").write_text("x")
    (root / "object.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    (root / "docs").mkdir()  # a directory of raw input whose fourth line has a raw tab inside a string
    (root / "docs" / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n{"text": "a\tb"}\n')
    shutil.copytree(base, root / "truncated")
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    return root


TRAIN_CASES = [  # (arguments over the defaults of test_train_bad_input, the line's text)
    (["--out", "{bad}/model-copy", "--model", "{bad}/model-copy"], "is the --model directory"),
    (["--out", "{bad}/foreign"], "not made by train.py"),
    (["--out", "{bad}/afile"], "is not a directory"),
    (["--chunks", 65], "--chunks 65 is more than --train-len 64"),
    (["--chunks", 3, "--split", "official"], "--split official"),
    (["--grad-clip", -1], "--grad-clip must be >= 0"),
    (["--keep", 0], "--keep must be >= 1"),
    (["--save-every", -2], "--save-every must be >= 0"),
    (["--warmup", -5], "--warmup must be >= 0"),
    (["--lr", 0], "--lr must be > 0"),
    (["--batch-size", 3, "--micro-batch-size", 2], "not divisible"),
    (["--target", 32], "--target 32 is below the training length 64"),
    (["--model", "{bad}/nan"], "'layers.1.mlp.up_proj.weight' holds NaN"),
    (["--model", "{bad}/shape"], "'norm.weight' has shape (7,)"),
    (["--model", "{bad}/listed"], "expected a JSON object"),
    (["--model", "{bad}/abc"], "hidden_size must be a non-negative integer"),
    (["--model", "{bad}/badtok"], "cannot load tokenizer"),
    (["--data", "{bad}/object.jsonl"], 'object.jsonl:2: no "text"'),
    (["--data", "{bad}/nothing.jsonl"], "not found"),
]


@pytest.mark.parametrize("over,match", TRAIN_CASES, ids=[m for _, m in TRAIN_CASES])
def test_train_bad_input(over, match, tmp_path, bad, tiny_model_dir, text_corpus, monkeypatch, capsys):
    """train.main in this process (a fresh one-process gloo group per case): exit 1, one line, nothing written."""
    import train
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = {"--model": tiny_model_dir, "--data": text_corpus, "--target": 128, "--steps": 2, "--batch-size": 2,
            "--out": "out"}
    args.update(zip(over[::2], over[1::2]))
    before = snapshot(bad)
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(x).format(bad=bad) for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert match in err, err
    assert snapshot(bad) == before and not os.path.exists(tmp_path / "out")


def test_bad_input_from_the_command_line(tmp_path, bad, tiny_model_dir, text_corpus):
    """Each script's command line, run as users run it: exit 1, one line, nothing written."""
    import data
    prepared = str(tmp_path / "prepared")  # a prepared dataset: no preparation message before the error
    data.prepare(text_corpus, data.Tokenizer(tiny_model_dir), prepared, verbose=False)
    prepared_files = {ext: os.stat(prepared + ext).st_mtime_ns for ext in (".bin", ".idx.npy", ".json")}
    cases = [
        ("train.py", ["--model", bad / "nan", "--data", text_corpus, "--target", 128, "--out", "o"], "holds NaN"),
        ("evaluate.py", ["--model", bad / "nan", "--data", prepared, "--ctx", 32, "--docs", 3], "holds NaN"),
        ("passkey.py", ["--model", bad / "nan", "--lengths", 300], "holds NaN"),
        ("passkey.py", ["--model", tiny_model_dir, "--json", tmp_path / "no" / "x.json"], "does not exist"),
        ("data.py", ["--input", text_corpus, "--tokenizer", bad / "badtok", "--out", "d/x"], "cannot load tokenizer"),
        ("data.py", ["--input", text_corpus, "--tokenizer", tiny_model_dir, "--out", bad / "nan" / "config.json" / "x"],
         "File exists"),
        ("coverage.py", ["--chunks", 0], "--chunks values must be in"),
        ("coverage.py", ["--no-such-flag"], "unrecognized arguments"),
        # a jsonl line that is not JSON: the reason complete, its column, the file named once
        ("data.py", ["--input", bad / "docs", "--tokenizer", tiny_model_dir, "--out", "d/x"],
         f"error: {bad / 'docs' / 'a.jsonl'}:4: malformed JSON (Invalid control character at column 12)"),
        ("evaluate.py", ["--model", tiny_model_dir, "--data", bad / "docs", "--ctx", 32],
         f"error: {bad / 'docs' / 'a.jsonl'}:4: malformed JSON (Invalid control character at column 12)"),
        ("data.py", ["--input", text_corpus, "--tokenizer", os.path.join(tiny_model_dir, "config.json"),
                     "--out", "d/x"],
         "config.json is not a tokenizer: expected a sentencepiece tokenizer.model, a Hugging Face tokenizer.json"),
        ("data.py", ["--input", text_corpus, "--tokenizer", tiny_model_dir, "--out", prepared],
         "already holds a prepared dataset (" + prepared + ".json); --overwrite replaces it"),
        ("passkey.py", ["--model", bad / "truncated"], "model.safetensors: cannot read safetensors file (truncated: "),
        ("scripts/bench.py", [], "name a section: model, loss, pose, eval, memory, speed, all"),
        *[(script, ["--threads", 0], "argument --threads: must be >= 1, got 0")
          for script in ("evaluate.py", "passkey.py", "data.py", "scripts/bench.py")],
    ]
    before = snapshot(bad)
    procs = []
    for i, (script, args, match) in enumerate(cases):
        (tmp_path / f"cwd{i}").mkdir()
        procs.append((start(script, *args, cwd=str(tmp_path / f"cwd{i}")), match))
    for proc, match in procs:
        one_line_error(proc, match)
    assert snapshot(bad) == before
    assert {ext: os.stat(prepared + ext).st_mtime_ns for ext in prepared_files} == prepared_files
    assert all(set(os.listdir(tmp_path / f"cwd{i}")) <= {"cache"} for i in range(len(cases)))


def train_args(model, data, out, **over):
    args = {"--model": model, "--data": data, "--out": out, "--target": 128, "--steps": 4, "--batch-size": 2,
            "--lr": 1e-3, "--warmup": 1, "--save-every": 2, "--rope": "yarn"}
    args.update(over)
    return [x for k, v in args.items() for x in ((k,) if v is True else (k, v))]


def test_resume_checks_its_arguments_and_extension_composes(tmp_path, tiny_model_dir, text_corpus):
    out = tmp_path / "run"
    first = start("train.py", *train_args(tiny_model_dir, text_corpus, out), cwd=str(tmp_path))
    assert first.wait(timeout=120) == 0, first.communicate()[1]
    assert os.path.isfile(out / ".pose-run")
    # a fresh run into a finished run directory, and a resume that would change the run: refused
    before = snapshot(out)
    procs = [(start("train.py", *train_args(tiny_model_dir, text_corpus, out), cwd=str(tmp_path)), "already holds a run"),
             (start("train.py", *train_args(tiny_model_dir, text_corpus, out, **{"--target": 256, "--batch-size": 4,
                                                                            "--resume": True}), cwd=str(tmp_path)),
              "--resume: these would change the run, refused: --target 128 -> 256; --batch-size 2 -> 4"),
             # an extended checkpoint (yarn x2 over 64) cannot take another interpolation
             (start("train.py", *train_args(out, text_corpus, tmp_path / "ext", **{"--rope": "linear"}),
                    cwd=str(tmp_path)), "already extended with yarn:2 over 64 tokens: --rope linear cannot compose")]
    for proc, match in procs:
        one_line_error(proc, match)
    assert snapshot(out) == before
    # what may change on --resume does, and the log says so; a temporary file of a killed command is removed
    (out / ".config.12345.tmp.json").write_text("{")
    resumed = start("train.py", *train_args(tiny_model_dir, text_corpus, out, **{"--steps": 6, "--keep": 1,
                                                                            "--resume": True}), cwd=str(tmp_path))
    assert resumed.wait(timeout=120) == 0, resumed.communicate()[1]
    # extending the extended model keeps its geometry: yarn x2 over 64 -> yarn x4 over 64
    extended = start("train.py", *train_args(out, text_corpus, tmp_path / "ext", **{"--target": 256, "--steps": 1}),
                     cwd=str(tmp_path))
    assert extended.wait(timeout=120) == 0, extended.communicate()[1]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert log[4]["resumed_with"] == {"keep": [2, 1], "steps": [4, 6]}  # from the last step's checkpoint
    assert not (out / ".config.12345.tmp.json").exists()
    config = json.load(open(tmp_path / "ext" / "config.json"))
    assert config["rope_scaling"]["factor"] == 4.0 and config["rope_scaling"]["original_max_position_embeddings"] == 64
    assert config["max_position_embeddings"] == 256


def test_ctrl_c(tmp_path, tiny_model_dir, text_corpus):
    """Ctrl-C: one line naming the last checkpoint and the resuming command, exit 130; passkey.py: one line, 130."""
    out = tmp_path / "run"
    run = start("train.py", *train_args(tiny_model_dir, text_corpus, out, **{"--steps": 4000, "--save-every": 2}),
                cwd=str(tmp_path))
    pk = start("passkey.py", "--lengths", 256, "--trials", 100000, cwd=str(tmp_path))  # the bundled model
    deadline = time.time() + 120
    # any complete checkpoint: with --keep 2 the first ones are gone again a few steps later, so a loaded machine
    # that polls too slowly would miss a fixed one and signal a finished run
    while time.time() < deadline and not any(not p.name.endswith(".tmp") for p in (out / "checkpoints").glob("step_*")):
        time.sleep(0.1)
    time.sleep(0.5)
    pk.send_signal(signal.SIGINT)
    # In full-suite runs the children used to inherit a blocked or ignored SIGINT from the test process and never see
    # Ctrl-C (plain_sigint now resets it); should a signal still be missed, it is sent again while the run goes on
    for _ in range(5):
        run.send_signal(signal.SIGINT)
        try:
            run.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            pass
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "last complete checkpoint is step" in lines[0] and lines[0].endswith("--resume"), lines[0]
    _, err = pk.communicate(timeout=60)
    assert pk.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
