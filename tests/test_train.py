"""train.py end to end on the CPU: 1 vs 2 gloo processes, kill -9 and resume, the exported checkpoint, learning on
real text, mixed precision / checkpointing / offload, and bad input."""
import glob
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lib import checkpoints
from lib import hf
from lib import settings
import train
from model import LLaMA, ModelConfig
from helpers import ROOT, TRAIN, run_train



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, spm_tokenizer):
    """A random tiny LLaMA with a 32-token window and the test tokenizer, in HF format."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                              max_position_embeddings=32))
    model.init_weights()
    model.save_pretrained(path)
    shutil.copy(spm_tokenizer, path / "tokenizer.model")
    return str(path)


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    """Real text: the sources of some Python standard library modules, one document each."""
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    import argparse, csv, difflib, json as json_mod, textwrap, heapq  # noqa: E401
    with open(path, "w") as f:
        for module in (argparse, csv, difflib, json_mod.decoder, textwrap, heapq):
            f.write(json.dumps({"text": open(module.__file__).read()}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def replay_pool(tmp_path_factory):
    """A --replay pool of 32-token windows (the tiny model's), each padded (targets -100) from a random length on, so
    that the ranks' shares of a step hold different numbers of targets."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 320, size=(16, 32))
    targets = np.concatenate([ids[:, 1:], np.full((16, 1), -100)], axis=1)
    for row, length in zip(targets, rng.integers(4, 32, size=16)):
        row[length:] = -100
    path = tmp_path_factory.mktemp("replay") / "pool.npz"
    np.savez(path, input_ids=ids, targets=targets)
    return str(path)


def common(model, data, out, **over):
    args = {"--model": model, "--data": data, "--out": out, "--target": 128, "--steps": 6, "--batch-size": 4,
            "--micro-batch-size": 1, "--lr": 3e-3, "--warmup": 2, "--save-every": 0}
    args.update(over)
    return [x for k, v in args.items() for x in ((k,) if v is True else (k, v))]


def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def test_one_process_equals_two(tmp_path, tiny_model, stdlib_corpus, replay_pool):
    """With replay, whose windows hold different numbers of targets: its loss is the mean over all of them."""
    replay = {"--replay": replay_pool, "--replay-batch": 4}
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "one", **replay))
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "two", **replay), nproc=2)
    one, two = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [e["step"] for e in one] == [e["step"] for e in two] == list(range(1, 7))
    for a, b in zip(one, two):
        for key in ("loss", "replay_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
        assert a["lr"] == b["lr"] and a["tokens"] == b["tokens"]
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:  # per tensor: AdamW turns the rounding of a near-zero gradient entry into a visible step
        assert ((w1[k] - w2[k]).norm() / w1[k].norm()).item() < 1e-5, k
    assert any((w1[k] - load_file(os.path.join(tiny_model, "model.safetensors"))[k]).abs().max() > 1e-3 for k in w1)


def test_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path, tiny_model, stdlib_corpus):
    args = dict(**{"--steps": 24, "--save-every": 4, "--batch-size": 8})
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "straight", **args))
    out = tmp_path / "killed"
    env = dict(os.environ, POSE_CACHE="/tmp/pose-test-cache", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN] + [str(a) for a in common(tiny_model, stdlib_corpus, out, **args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        log = os.path.join(out, "log.jsonl")
        steps = [json.loads(x)["step"] for x in open(log)] if os.path.exists(log) else []
        if steps and steps[-1] >= 10 and steps[-1] % 4:  # past a checkpoint, mid-interval
            proc.send_signal(signal.SIGKILL)
            killed_at = steps[-1]
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    run_train(common(tiny_model, stdlib_corpus, out, **args) + ["--resume"])
    straight, resumed = log_of(tmp_path / "straight"), log_of(out)
    strip = lambda log: [(e["step"], e["loss"], e["lr"], e["tokens"]) for e in log]  # noqa: E731
    assert strip(resumed) == strip(straight)
    w1, w2 = weights(tmp_path / "straight"), weights(out)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert len(glob.glob(os.path.join(out, "checkpoints", "step_*"))) <= 2  # --keep 2

    # a checkpoint's weights read into an unsharded model in this process (scripts/reproduce.py evaluates steps so):
    # the last one is the export (to the export's dtype), the one before differs
    final, root = LLaMA.from_pretrained(str(tmp_path / "straight")), tmp_path / "straight" / "checkpoints"
    exported = {k: v.clone() for k, v in final.state_dict().items()}
    dtype = next(iter(w1.values())).dtype
    checkpoints.load_weights(final, str(root / "step_000024"))
    assert all(torch.equal(v.to(dtype), exported[k].to(dtype)) for k, v in final.state_dict().items())
    checkpoints.load_weights(final, str(root / "step_000020"))
    assert not torch.equal(final.state_dict()["embed_tokens.weight"].to(dtype), exported["embed_tokens.weight"])
    with pytest.raises(hf.CheckpointError, match="cannot load checkpoint"):
        checkpoints.load_weights(final, str(tmp_path / "no-such-checkpoint"))


def test_a_finished_run_continues_with_more_steps(tmp_path):
    """The last step is checkpointed (and kept): --resume with a larger --steps continues a finished run."""
    out = tmp_path / "run"
    short = ["--target", 1024, "--steps", 3, "--batch-size", 2, "--out", out]
    run_train(short)
    assert os.path.isdir(out / "checkpoints" / "step_000003")
    run_train(short[:3] + [5] + short[4:] + ["--resume"])
    log = log_of(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5] and log[3]["resumed_with"] == {"steps": [3, 5]}
    assert os.path.isfile(out / "model.safetensors")


def test_export_loads_in_transformers_with_the_rope_scaling(tmp_path, tiny_model, stdlib_corpus):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    run_train(common(tiny_model, stdlib_corpus, out, **{"--steps": 2, "--rope": "yarn"}))
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rope = hf.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["original_max_position_embeddings"] == 32
    assert hf.config.max_position_embeddings == 128
    ours = LLaMA.from_pretrained(out)
    tokens = torch.randint(0, 320, (1, 100))
    with torch.no_grad():
        want = hf(tokens).logits
        assert ((ours(tokens) - want).abs().max() / want.abs().max()) < 1e-5
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))


def test_loss_goes_down_on_real_text(tmp_path, tiny_model, stdlib_corpus):
    out = tmp_path / "out"
    run_train(common(tiny_model, stdlib_corpus, out, **{"--steps": 30, "--lr": 1e-2, "--warmup": 3, "--method": "pi"}))
    losses = [e["loss"] for e in log_of(out)]
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


@pytest.mark.parametrize("method", ["full", "randpos", "pose"])
def test_methods_run(tmp_path, tiny_model, stdlib_corpus, method):
    out = tmp_path / method
    run_train(common(tiny_model, stdlib_corpus, out, **{"--steps": 2, "--method": method, "--chunks": 3}))
    log = log_of(out)
    assert log[-1]["tokens"] == 2 * 4 * (128 if method == "full" else 32)


def test_bf16_checkpointing_and_offload_paths(tmp_path, tiny_model, stdlib_corpus):
    """The CUDA configuration's code paths on the CPU: bf16 MixedPrecisionPolicy, activation checkpointing and
    CPUOffloadPolicy give the fp32 run's losses (exactly for checkpointing/offload, loosely for bf16)."""
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "plain"))
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "ckpt",
                     **{"--grad-checkpointing": True, "--cpu-offload": True}))
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "bf16", **{"--precision": "bf16"}))
    plain, ckpt, bf16 = (log_of(tmp_path / n) for n in ("plain", "ckpt", "bf16"))
    for a, b, c in zip(plain, ckpt, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert c["loss"] == pytest.approx(a["loss"], rel=2e-2)
    assert bf16[0]["loss"] != plain[0]["loss"]  # bf16 really computed in bf16


def test_examples_do_not_depend_on_the_world_size(stdlib_corpus, tiny_model):
    import data
    from data import Tokenizer
    corpus = data.load_corpus(stdlib_corpus, Tokenizer(tiny_model), min_tokens=32)
    args = settings.from_command_line(["--model", tiny_model, "--data", stdlib_corpus, "--target", "128", "--seed", "3",
                                       "--batch-size", "8", "--micro-batch-size", "2"], world=1, device="cpu")

    def step_examples(world):
        rows = []
        for micro in range(8 // (2 * world)):
            for rank in range(world):
                ids, targets, pos = train.batch_for(5, micro, rank, world, args, corpus)
                rows += [(i.tolist(), p.tolist()) for i, p in zip(ids, pos)]
                assert torch.equal(targets[:, :-1], ids[:, 1:]) and (targets[:, -1] == -100).all()
        return sorted(rows)

    assert step_examples(1) == step_examples(2) == step_examples(4)
    assert step_examples(1) != sorted((i, p) for i, p in step_examples(1)[:1]) * 8


def test_lr_schedule():
    lrs = [train.lr_at(s, 2e-5, 10, 1000) for s in range(1000)]
    assert lrs[0] == pytest.approx(2e-6) and lrs[9] == pytest.approx(2e-5) and lrs[10] == pytest.approx(2e-5)
    assert lrs[505] == pytest.approx(1e-5) and 0 < lrs[-1] < 1e-7
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize("case,match", [
    ("missing-model", "model directory not found"),
    ("missing-data", "not found"),
    ("short-docs", "no document"),
    ("target-below", "below"),
    ("batch", "not divisible by world size 1 x --micro-batch-size 3"),
    ("malformed-jsonl", "bad.jsonl:2: malformed JSON"),
    ("corrupt-weights", "cannot read safetensors"),
    ("corrupt-resume", "cannot load checkpoint"),
])
def test_bad_input_one_line_error(tmp_path, tiny_model, stdlib_corpus, case, match):
    model, data_path, out = tiny_model, stdlib_corpus, tmp_path / "out"
    extra = {}
    if case == "missing-model":
        model = tmp_path / "nope"
    elif case == "missing-data":
        data_path = tmp_path / "nope.jsonl"
    elif case == "short-docs":
        extra = {"--train-len": 100000, "--target": 200000}
    elif case == "target-below":
        extra = {"--train-len": 64, "--target": 48}
    elif case == "batch":
        extra = {"--micro-batch-size": 3}
    elif case == "malformed-jsonl":
        data_path = tmp_path / "bad.jsonl"
        data_path.write_text('{"text": "fine"}\n{"text": broken\n')
    elif case == "corrupt-weights":
        model = tmp_path / "model"
        shutil.copytree(tiny_model, model)
        raw = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    elif case == "corrupt-resume":
        run_train(common(model, data_path, out, **{"--steps": 4, "--save-every": 2}))
        ckpt = sorted(glob.glob(os.path.join(out, "checkpoints", "step_*")))[-1]  # the one --resume reads
        open(os.path.join(ckpt, ".metadata"), "wb").write(b"garbage")
        extra = {"--resume": True}
    before = set(os.listdir(out)) if os.path.exists(out) else None
    res = run_train(common(model, data_path, out, **extra), check=False)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr, res.stderr
    assert re.search(match, lines[0]), lines[0]
    after = set(os.listdir(out)) if os.path.exists(out) else None
    assert after == before  # nothing written


def test_replay_stream(tmp_path, tiny_model, stdlib_corpus):
    """--replay: the windows of a step depend on the seed and the step only; weight 0 leaves the method's training
    as it was, any other weight changes it, and the log records the replay's loss."""
    import data
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 320, size=(12, 32))
    targets = np.concatenate([ids[:, 1:], np.full((12, 1), -100)], axis=1)
    targets[:, 20:] = -100  # padding
    pool_path = tmp_path / "pool.npz"
    np.savez(pool_path, input_ids=ids, targets=targets)
    pool = data.ReplayPool(str(pool_path))

    def resolved(*argv):
        return settings.from_command_line(["--model", tiny_model, "--data", stdlib_corpus, "--target", "128",
                                           "--replay", str(pool_path), "--replay-batch", "3", *argv], world=1,
                                          device="cpu")

    a = resolved("--seed", "1", "--method", "pose", "--chunks", "2", "--batch-size", "4")
    b = resolved("--seed", "1", "--method", "full", "--chunks", "3", "--batch-size", "16")
    for step in range(5):
        assert all(np.array_equal(x, y) for x, y in zip(train.replay_windows(step, a, pool),
                                                        train.replay_windows(step, b, pool)))
    assert not np.array_equal(train.replay_windows(0, a, pool)[0], train.replay_windows(1, a, pool)[0])
    a = resolved("--seed", "2", "--method", "pose", "--chunks", "2", "--batch-size", "4")
    assert not np.array_equal(train.replay_windows(0, a, pool)[0], train.replay_windows(0, b, pool)[0])

    replay = {"--replay": pool_path, "--replay-batch": 2}
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "plain", **{"--steps": 3}))
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "w0", **{"--steps": 3, "--replay-weight": 0}, **replay))
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "w", **{"--steps": 3}, **replay))
    plain, w0, w = (log_of(tmp_path / n) for n in ("plain", "w0", "w"))
    assert [e["loss"] for e in w0] == [e["loss"] for e in plain]
    assert w[0]["loss"] == plain[0]["loss"] and w[-1]["loss"] != plain[-1]["loss"]
    assert all(e["replay_loss"] > 0 for e in w) and "replay_loss" not in plain[0]
    assert json.load(open(tmp_path / "w" / "args.json"))["replay_weight"] == pytest.approx(2 / 6)
    bad = run_train(common(tiny_model, stdlib_corpus, tmp_path / "bad", **{"--train-len": 16}, **replay), check=False)
    assert bad.returncode == 1 and "holds windows of 32 tokens, not --train-len 16" in bad.stderr


def test_one_writer_per_run_directory(tmp_path, tiny_model, stdlib_corpus):
    """Two train.py on one --out, started together: one runs to the end, the other is refused at once in one line
    that names the holder, and the log has every step once. A lock left by a killed run is taken over."""
    out = tmp_path / "dup"
    args = [sys.executable, TRAIN] + [str(a) for a in common(tiny_model, stdlib_corpus, out, **{"--steps": 6})]
    env = dict(os.environ, OMP_NUM_THREADS="1", POSE_CACHE=str(tmp_path / "cache"))
    run_train(common(tiny_model, stdlib_corpus, tmp_path / "warm", **{"--steps": 1}),
              cache=str(tmp_path / "cache"))  # the corpus prepared once, so that both start at once
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    t0 = time.monotonic()
    done = [None, None]
    while None in done:
        for i, p in enumerate(procs):
            if done[i] is None and p.poll() is not None:
                done[i] = (p.returncode, time.monotonic() - t0, p.stderr.read())
        time.sleep(0.1)
    (_,), (refused,) = [d for d in done if d[0] == 0], [d for d in done if d[0] != 0]
    assert refused[1] < 30, refused
    lines = refused[2].strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"error: --out {re.escape(str(out))} is in use by another train.py "
                                            r"\(pid \d+ on .+\): wait for it to end or use another --out", lines[0])
    assert [e["step"] for e in log_of(out)] == list(range(1, 7))
    assert open(out / ".pose-run.lock").read() == ""  # released at the end
    # a killed run's lock: its line is left, its flock is gone; the next run (a resume) takes it over and says so
    (out / ".pose-run.lock").write_text("pid 999999 on elsewhere\n")
    resumed = run_train(common(tiny_model, stdlib_corpus, out, **{"--steps": 7, "--resume": True}),
                        cache=str(tmp_path / "cache"))
    assert "took over the lock of a run that ended without releasing it (pid 999999 on elsewhere)" in resumed.stderr
    assert [e["step"] for e in log_of(out)] == list(range(1, 8))


def test_log_file_progress_is_plain_lines(tmp_path, tiny_model, stdlib_corpus):
    """train.py's progress in a log file: lines, no carriage returns."""
    result = run_train(common(tiny_model, stdlib_corpus, tmp_path / "run", **{"--steps": 3}))
    assert "\r" not in result.stderr and max(map(len, result.stderr.splitlines())) < 1000
    assert "budget: 3 steps x 4 examples x 32 tokens = 384 tokens" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# the CUDA paths, on the CPU: what train.py asks of torch when it finds a GPU

def test_a_cuda_process_group_has_gloo_beside_nccl_and_an_explicit_timeout(monkeypatch):
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw["timeout"])))
    monkeypatch.setattr(train, "init_device_mesh", lambda *a: None)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setenv("RANK", "0")
    device, _ = train.setup_distributed(settings.from_command_line(["--target", "2048"], device="cpu").dist_timeout)
    assert device.type == "cuda"
    backend, timeout = calls[0]
    assert backend == "cuda:nccl,cpu:gloo"  # CPU tensors (--cpu-offload's gradient norm) need gloo
    assert timeout.total_seconds() >= 3600  # NCCL's default is 10 minutes


def test_cpu_offload_materializes_the_model_on_the_cpu_for_a_cuda_run(mesh, monkeypatch):
    """FSDP2 refuses CPU offload of parameters materialized on the GPU: a CUDA run's offloaded shards live on the
    CPU from the start, pinned (the pinning itself needs a GPU: recorded here, not done)."""
    pinned = []
    real = train.CPUOffloadPolicy
    monkeypatch.setattr(train, "CPUOffloadPolicy", lambda pin_memory: pinned.append(pin_memory) or real(False))
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, intermediate_size=32,
                      max_position_embeddings=32)
    model = train.sharded_model(cfg, torch.device("cuda"), mesh, cpu_offload=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and pinned == [True]


def test_cuda_defaults_come_from_the_memory_plan(tmp_path):
    """Activation checkpointing only where the plan without it does not fit; the micro-batch as large as fits."""
    def plan(gb, *extra):
        s = settings.from_command_line(["--model", os.path.join(ROOT, "assets", "configs", "llama-7b"), "--target",
                                        "16384", "--world", "8", "--device", "cuda", "--gpu-memory", str(gb),
                                        "--dry-run", "--out", str(tmp_path / "x"), *extra])
        return s.grad_checkpointing, s.micro_batch_size, s.why
    checkpointing, micro, why = plan(80)
    assert not checkpointing and micro >= 4, why
    assert any(line.startswith("activation checkpointing off") for line in why)
    assert plan(24)[0]
    assert plan(80, "--grad-checkpointing")[:2] == (True, 8)  # given flags stay; the other follows the plan
    assert plan(80, "--micro-batch-size", "1")[:2] == (False, 1)
    cpu = settings.from_command_line(["--model", os.path.join(ROOT, "assets", "configs", "llama-7b"), "--target",
                                      "16384", "--dry-run", "--device", "cpu"])
    assert (cpu.micro_batch_size, cpu.grad_checkpointing, cpu.recipe) == (1, False, "paper")  # CPU: as before


def test_dry_run_on_a_config_only_directory(tmp_path, capsys):
    """The must-hold of a first 8-GPU plan: a directory with only LLaMA-7B's config.json is enough."""
    model = tmp_path / "llama-7b"
    model.mkdir()
    shutil.copy(os.path.join(ROOT, "assets", "configs", "llama-7b", "config.json"), model)
    train.main(["--model", str(model), "--target", "16384", "--world", "8", "--device", "cuda", "--dry-run",
                "--gpu-memory", "80", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "activation checkpointing off" in out and "micro-batch 4" in out and "fits:" in out
    assert "budget: 1000 steps x 64 examples x 2048 tokens" in out and "compute:" in out
    assert "example 0: 0-" in out and not os.path.exists(tmp_path / "out")


def test_finished_two_process_runs_exit_0(tmp_path, tiny_model, stdlib_corpus):
    """A finished multi-process run exits 0 every time: every rank leaves the last collective together before the
    process group is closed (a race there once failed 1 run in ~40). A handful in a row, each with its export."""
    for i in range(4):
        out = tmp_path / f"run{i}"
        result = run_train(common(tiny_model, stdlib_corpus, out, **{"--steps": 2}), nproc=2, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        assert os.path.isfile(out / "model.safetensors") and "Traceback" not in result.stderr
