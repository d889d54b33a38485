"""scripts/gpu_check.py's checks on the CPU at tiny sizes: the same functions the GPU run calls, with a device argument.

Each test asserts what the check decides (pass on a correct path, fail on a broken one), not only that it runs."""
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

import gpu_check_bench  # noqa: E402
import gpu_check_common  # noqa: E402
import gpu_check_model  # noqa: E402
import gpu_check_train  # noqa: E402
from lib import memory  # noqa: E402
from model import KVCache, ModelConfig  # noqa: E402

LLAMA_7B_PARAMS = 6_738_415_616  # Meta's LLaMA-7B / Llama-2-7B checkpoints


def tiny_cfg(scaling=None, window=64, vocab=512, n_layers=2):
    return check.logits_config(scaling, vocab=vocab, dim=128, n_layers=n_layers, n_heads=4, n_kv_heads=2, window=window)


def test_without_cuda_one_line_and_exit_0(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1 and "no CUDA" in out.stdout and out.stderr == ""
    assert not (tmp_path / "o").exists()


# 1. logits

@pytest.mark.parametrize("name", list(gpu_check_model.ROPE_CASES))
def test_logits_check_bf16_within_tolerance(name, one_thread):
    scaling = gpu_check_model.ROPE_CASES[name]
    if scaling and "original_max_position_embeddings" in scaling:
        scaling = dict(scaling, original_max_position_embeddings=64)
    cfg = tiny_cfg(scaling)
    fp32 = gpu_check_model.logits_check("cpu", torch.float32, cfg=cfg, seq_len=64, target=512)
    bf16 = gpu_check_model.logits_check("cpu", torch.bfloat16, cfg=cfg, seq_len=64, target=512)
    assert fp32["rel_err"] < 1e-5 and fp32["argmax"] == 1.0
    assert 1e-3 < bf16["rel_err"] < gpu_check_common.LOGITS_TOL  # bf16 really rounded, and within the tolerance


def test_logits_check_fails_on_a_rope_mistake(one_thread):
    """The tolerance has power: the same weights with another rope factor, or with plain RoPE, are far outside it."""
    cfg = tiny_cfg({"rope_type": "linear", "factor": 8.0})
    for wrong in ({"rope_type": "linear", "factor": 4.0}, None):
        r = gpu_check_model.logits_check("cpu", torch.float32, cfg=cfg, seq_len=64, target=512,
                                         reference=lambda c, w=wrong: gpu_check_model.random_model(tiny_cfg(w)))
        assert r["rel_err"] > 3 * gpu_check_common.LOGITS_TOL, (wrong, r)


@pytest.mark.parametrize("mistake", ["not causal", "GQA heads tiled instead of grouped"])
def test_logits_check_fails_on_an_attention_mistake(mistake, one_thread):
    """Attention computed wrongly in the reference (as a broken kernel path would): far outside the tolerance."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def wrong(q, k, v, is_causal=False, enable_gqa=False, **kw):
        if mistake == "not causal":
            return sdpa(q, k, v, is_causal=False, enable_gqa=enable_gqa, **kw)
        groups = q.shape[1] // k.shape[1]  # query head h should use key/value head h // groups, not h % n_kv
        return sdpa(q, k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1), is_causal=is_causal, **kw)

    def reference(cfg):
        model = gpu_check_model.random_model(cfg)

        def forward(tokens, positions):
            torch.nn.functional.scaled_dot_product_attention = wrong
            try:
                return model(tokens, positions)
            finally:
                torch.nn.functional.scaled_dot_product_attention = sdpa
        return forward

    r = gpu_check_model.logits_check("cpu", torch.float32, cfg=tiny_cfg(), seq_len=64, target=512, reference=reference)
    assert r["rel_err"] > 3 * gpu_check_common.LOGITS_TOL, r


def test_section_logits_rows(one_thread):
    rows = check.section_logits("cpu", config=tiny_cfg, seq_len=64, target=512)
    statuses = {r["check"]: r["status"] for r in rows}
    assert statuses.pop("fp32 sdpa, rope yarn, GQA 4q/2kv") == "pass"
    assert statuses.pop("fused SDPA kernel for causal GQA in bfloat16 (no T x T math fallback)") == "pass"
    bf16 = [c for c in statuses if c.startswith("bf16 sdpa")]
    assert len(bf16) == len(gpu_check_model.ROPE_CASES) and all(statuses[c] == "pass" for c in bf16)


def test_fused_attention_check():
    from torch.nn.attention import SDPBackend
    assert gpu_check_model.fused_attention_check("cpu", torch.float32, seq_len=64,
                                                 head_dim=32)["ok"]  # the CPU flash kernel
    # a backend that cannot run here: reported, not raised
    r = gpu_check_model.fused_attention_check("cpu", torch.float32, [SDPBackend.EFFICIENT_ATTENTION], seq_len=64,
                                              head_dim=32)
    assert not r["ok"] and r["error"]


# 2. train.py logs: losses, weights, kill and resume

def entries(losses, lr=1e-3):
    return [dict(step=i + 1, loss=x, lr=lr, tokens=(i + 1) * 64) for i, x in enumerate(losses)]


def test_compare_losses():
    ref = entries([5.0, 4.0, 3.0])
    same = gpu_check_train.compare_losses(ref, entries([5.0, 4.0, 3.0]), 1e-4)
    assert same["ok"] and same["identical"] and same["steps"] == 3
    close = gpu_check_train.compare_losses(ref, entries([5.0, 4.0 * (1 + 5e-3), 3.0]), 2e-2)
    assert close["ok"] and not close["identical"] and close["max_rel"] == pytest.approx(5e-3)
    assert not gpu_check_train.compare_losses(ref, entries([5.0, 4.0 * (1 + 5e-3), 3.0]), 1e-4)["ok"]
    assert not gpu_check_train.compare_losses(ref, entries([5.0, 4.0]), 1.0)["ok"]  # a missing step
    assert not gpu_check_train.compare_losses(ref, entries([5.0, 4.0, 3.0], lr=2e-3), 1.0)["ok"]  # another schedule
    assert not gpu_check_train.compare_losses([], [], 1.0)["ok"]


def test_compare_weights(tmp_path):
    a = {"w": torch.randn(8, 8), "b": torch.randn(8)}
    for name, state in (("a", a), ("same", {k: v.clone() for k, v in a.items()}),
                        ("near", {"w": a["w"] * (1 + 1e-6), "b": a["b"]}),
                        ("far", {"w": a["w"] + 1e-2, "b": a["b"]}), ("other", {"w": a["w"]})):
        os.makedirs(tmp_path / name)
        save_file(state, str(tmp_path / name / "model.safetensors"))
    assert gpu_check_train.compare_weights(tmp_path / "a", tmp_path / "same", 1e-4)["identical"]
    near = gpu_check_train.compare_weights(tmp_path / "a", tmp_path / "near", 1e-4)
    assert near["ok"] and not near["identical"]
    far = gpu_check_train.compare_weights(tmp_path / "a", tmp_path / "far", 1e-4)
    assert not far["ok"] and far["worst"] == "w"
    assert not gpu_check_train.compare_weights(tmp_path / "a", tmp_path / "other", 1.0)["ok"]


def test_noise_tolerance():
    """NOISE_MULTIPLE x the measured floor, never below the minimum; a floor of 0 (the CPU's) leaves the minimum; a
    floor that could not be measured (inf) is a tolerance no check passes."""
    assert gpu_check_common.NOISE_MULTIPLE == 10
    assert gpu_check_train.noise_tolerance(0.0) == gpu_check_common.LOG_RTOL == 1e-6
    assert gpu_check_train.noise_tolerance(1e-8) == 1e-6
    assert gpu_check_train.noise_tolerance(2e-5) == pytest.approx(2e-4)
    assert gpu_check_train.noise_tolerance(2e-5, minimum=gpu_check_common.REORDER_LOSS_RTOL) == \
        gpu_check_common.REORDER_LOSS_RTOL
    assert gpu_check_train.noise_tolerance(3e-4, minimum=gpu_check_common.REORDER_LOSS_RTOL) == pytest.approx(3e-3)
    assert gpu_check_train.noise_tolerance(math.inf) == math.inf


def test_process_count(monkeypatch):
    """2 gloo processes on the CPU; on CUDA the visible GPUs rounded down to a power of two dividing the batch."""
    assert gpu_check_train.process_count("cpu", 16) == 2
    for gpus, n in ((1, 1), (2, 2), (3, 2), (6, 4), (8, 8)):
        monkeypatch.setattr(check.torch.cuda, "device_count", lambda gpus=gpus: gpus)
        assert gpu_check_train.process_count("cuda", 16) == n
    assert gpu_check_train.process_count("cuda", 4) == 4  # 8 GPUs, 4 examples per step


def test_logged_backend_reads_model_py_lines(capsys, monkeypatch):
    """The line model.py prints once per process (here as two CUDA processes would), read back per backend."""
    import model
    monkeypatch.setattr(model, "backends_used", set())
    model.note_backend(*model.attention_backend("sdpa", torch.bfloat16, torch.device("cuda")), torch.device("cuda"))
    line = capsys.readouterr().err
    assert gpu_check_common.logged_backend("[rank0]:" + line + "noise\n[rank1]:" + line, "cuda") == \
        "SDPA (attn_impl='sdpa'), 2 processes"
    assert gpu_check_common.logged_backend(line, "cuda") == "SDPA (attn_impl='sdpa'), 1 process"
    assert gpu_check_common.logged_backend("", "cpu") == "SDPA (the CPU's only backend)"  # the CPU names none
    assert gpu_check_common.logged_backend("", "cuda") == "not named in the log"


def fake_run(folder, losses, weights):
    """A train.py --out: log.jsonl with these losses, model.safetensors with these tensors."""
    os.makedirs(folder)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries(losses))
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return str(folder)


def test_agreement_rows(tmp_path):
    """Runs that sum in another order: step 1 to the log's resolution, later steps and weights to the reorder
    tolerance or NOISE_MULTIPLE x the floor, whichever is larger."""
    losses, w = [3.0, 2.9, 2.8, 2.7], {"w": torch.randn(64, 64)}
    ref = fake_run(tmp_path / "ref", losses, w)

    def rows(name, other_losses, scale=0.0, floors=(0.0, 0.0)):
        noise = scale * w["w"].norm() / 64 * torch.randn(64, 64)  # relative norm about `scale`
        other = fake_run(tmp_path / name, other_losses, {"w": w["w"] + noise})
        return [r["status"] for r in gpu_check_train.agreement_rows("x", ref, other, floors)]

    assert rows("same", losses) == ["pass", "pass"]
    assert rows("reordered", [3.0, 2.9 * (1 + 5e-4), 2.8, 2.7 * (1 - 8e-4)], 1e-3) == ["pass", "pass"]
    assert rows("first", [3.0 * (1 + 1e-5)] + losses[1:]) == ["FAIL", "pass"]  # step 1 reads the same examples
    assert rows("later", [3.0, 2.9 * (1 + 2e-3), 2.8, 2.7], 5e-3) == ["FAIL", "FAIL"]
    assert rows("noisy", [3.0, 2.9 * (1 + 2e-3), 2.8, 2.7], 5e-3, floors=(3e-4, 6e-4)) == ["pass", "pass"]
    assert rows("no floor", losses, floors=(math.inf, math.inf)) == ["FAIL", "FAIL"]


def test_parallel_rows_skipped_with_a_reason_and_offload_still_run(tmp_path, monkeypatch):
    """With one GPU the N-process rows say skipped and why, and --cpu-offload runs in one process against the plain
    run; an N-process run that fails is a failed row, and offload then runs in one process too."""
    straight = fake_run(tmp_path / "straight", [3.0, 2.9], {"w": torch.ones(4)})
    commands = []

    def run_command(cmd, env, what, timeout=600):
        commands.append(cmd)
        nproc = int(cmd[cmd.index("--nproc_per_node") + 1])
        if nproc > 1 and "--cpu-offload" not in cmd and fail:
            raise RuntimeError("train.py, 2 processes failed (exit 1): NCCL error")
        shutil.copytree(straight, cmd[cmd.index("--out") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "attention: SDPA (x)\n" * nproc)

    monkeypatch.setattr(gpu_check_train, "run_command", run_command)
    monkeypatch.setattr(check.torch.cuda, "device_count", lambda: 1)
    for n, fail in ((1, False), (2, True)):
        commands.clear()
        runs = {"straight": straight, **{k: str(tmp_path / f"{k}{n}") for k in ("processes", "offload")}}
        rows = gpu_check_train.parallel_rows(torch.device("cuda"), n, runs, {}, {}, (0.0, 0.0))
        offload = commands[-1]
        assert "--cpu-offload" in offload and offload[offload.index("--nproc_per_node") + 1] == "1"
        assert [r["status"] for r in rows[1:]] == ["pass", "pass"]
        assert rows[1]["check"] == "--cpu-offload vs without, 1 process: losses"
        if n == 1:
            assert (rows[0]["status"], rows[0]["value"]) == ("skip", "skipped")
            assert rows[0]["reference"] == "needs 2 or more GPUs; 1 visible" and len(commands) == 1
        else:
            assert rows[0]["status"] == "FAIL" and "NCCL error" in rows[0]["value"]


def test_a_failed_run_states_its_error_first():
    """A failed torchrun run's row starts with its worker's error, not with the launcher's ChildFailedError."""
    stderr = ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"train.py\", line 1\n"
              "[rank0]: torch.utils.checkpoint.CheckpointError: torch.utils.checkpoint: Recomputed values differ\n"
              "[rank0]: Tip: pass debug=True\nTraceback (most recent call last):\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\ntrain.py FAILED\n")
    assert gpu_check_common.error_line(stderr) == \
        "torch.utils.checkpoint.CheckpointError: torch.utils.checkpoint: Recomputed values differ"
    code = "import sys; print('error: --rope: bad', file=sys.stderr); sys.exit(1)"
    with pytest.raises(RuntimeError, match=r"^run failed \(exit 1\): error: --rope: bad; the end"):
        gpu_check_common.run_command([sys.executable, "-c", code], dict(os.environ), "run")


def test_two_processes_against_one_on_the_cpu(tmp_path, tiny_model_dir, text_corpus):
    """train.py in 2 gloo processes against 1, bf16 with checkpointing, as section 2 runs them: the same micro-batches
    in both, step 1's loss to the log's resolution, later losses and the final weights within the reorder
    tolerances."""
    kw = dict(model=tiny_model_dir, data=text_corpus, steps=3, save_every=0, train_len=32, target=128, batch=4,
              micro_batch=2, threads=1)
    env = gpu_check_train.train_env("cpu", str(tmp_path / "cache"))
    for name, nproc in (("one", 1), ("two", 2)):
        gpu_check_common.run_command(gpu_check_train.train_command(str(tmp_path / name), nproc=nproc, **kw), env, name)
    rows = gpu_check_train.agreement_rows("2 processes vs 1", str(tmp_path / "one"), str(tmp_path / "two"), (0.0, 0.0))
    assert [r["status"] for r in rows] == ["pass", "pass"], rows
    assert rows[0]["data"]["first_step"] <= gpu_check_common.LOG_RTOL and rows[0]["data"]["steps"] == 3


def test_kill_tree_reaches_workers_in_their_own_session():
    """torchrun starts its workers with start_new_session: killing the launcher alone would leave them training."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 30
    while len(gpu_check_train.process_tree(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    tree = gpu_check_train.process_tree(proc.pid)
    assert len(tree) == 2
    gpu_check_train.kill_tree(proc.pid)
    proc.wait(timeout=10)
    for pid in tree[1:]:  # the grandchild is reaped by init: wait until it is gone
        while time.time() < deadline and os.path.exists(f"/proc/{pid}") and \
                open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


FAKE_TORCHRUN = """
import json, os, subprocess, sys, time
out, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "launcher":  # like torchrun: the worker in its own session, then wait for it
    sys.exit(subprocess.Popen([sys.executable, __file__, out, str(steps), "worker"], start_new_session=True).wait())
os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
for step in range(1, steps + 1):  # like train.py: a log line per step, step_N.tmp renamed to step_N every 3 steps
    time.sleep(0.03)
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0}) + "\\n")
    if step % 3 == 0:
        tmp = os.path.join(out, "checkpoints", f"step_{step:06d}.tmp")
        os.makedirs(tmp)
        os.replace(tmp, tmp[:-4])
open(os.path.join(out, "model.safetensors"), "w").close()
"""


def test_run_and_kill_after_a_checkpoint(tmp_path):
    script = tmp_path / "fake_torchrun.py"
    script.write_text(FAKE_TORCHRUN)
    out = tmp_path / "run"
    killed_at = gpu_check_train.run_and_kill([sys.executable, str(script), str(out), "40", "launcher"],
                                             dict(os.environ), str(out), steps=40)
    assert 3 < killed_at < 40 and gpu_check_train.completed_checkpoints(str(out))[0] == 3
    time.sleep(0.3)  # a worker that survived would go on logging
    assert gpu_check_train.last_logged_step(str(out)) <= killed_at + 1 and not (out / "model.safetensors").exists()
    with pytest.raises(RuntimeError, match="before it could be killed"):  # no checkpoint before the end
        gpu_check_train.run_and_kill([sys.executable, str(script), str(tmp_path / "short"), "2", "launcher"],
                                     dict(os.environ), str(tmp_path / "short"), steps=2)


def test_train_commands_parse_in_train_py(tiny_model_dir, text_corpus):
    """Every flag gpu_check gives train.py exists and means what gpu_check assumes."""
    from lib import settings
    cmd = gpu_check_train.train_command("out/x", model=tiny_model_dir, data=text_corpus, precision="fp32",
                                        checkpointing=False, resume=True)
    args = settings.parser().parse_args(cmd[cmd.index(gpu_check_train.TRAIN) + 1:])
    assert (args.precision, args.grad_checkpointing, args.resume, args.steps, args.save_every) == (
        "fp32", False, True, 24, 4)
    assert (args.batch_size, args.micro_batch_size, args.lr, args.rope, args.method) == (16, 8, 2e-4, "yarn", "pose")
    assert (args.replay, args.export_dtype, args.cpu_offload, args.compile) == ("none", "fp32", False, False)
    default = gpu_check_train.train_command("o")
    assert settings.parser().parse_args(default[default.index(gpu_check_train.TRAIN) + 1:]).grad_checkpointing is True
    more = gpu_check_train.train_command("o", nproc=4, extra=["--cpu-offload", "--compile"], threads=1, micro_batch=4)
    assert more[more.index("--nproc_per_node") + 1] == "4"
    args = settings.parser().parse_args(more[more.index(gpu_check_train.TRAIN) + 1:])
    assert (args.cpu_offload, args.compile, args.threads, args.micro_batch_size) == (True, True, 1, 4)


@pytest.mark.skipif(not os.environ.get("POSE_SLOW_TESTS"), reason="about a minute on 2 cores (8 train.py runs); "
                    "set POSE_SLOW_TESTS=1")
def test_train_check_end_to_end_on_cpu(tmp_path, tiny_model_dir, text_corpus):
    """The whole section 2 on the CPU: torchrun train.py in bf16 with checkpointing vs fp32, a second straight run,
    kill -9 after a checkpoint, --resume, 2 gloo processes vs 1, --cpu-offload in 2 processes; every row passes, and
    the resumed run is the uninterrupted one exactly (CPU kernels are deterministic: the noise floor is 0)."""
    rows = check.train_check("cpu", str(tmp_path / "train"), model=tiny_model_dir, data=text_corpus, steps=12,
                             save_every=3, train_len=32, target=128, batch=4, micro_batch=2, threads=1)
    status = {r["check"]: r["status"] for r in rows}
    assert set(status.values()) == {"pass", "info"}, rows
    floor = next(r for r in rows if r["check"].startswith("noise floor"))["data"]
    assert floor["losses"] == floor["weights"] == 0
    killed = next(r for r in rows if r["check"].startswith("kill -9 after"))["data"]
    assert 3 < killed["killed_at"] < 12 and killed["identical"]
    assert "2 processes vs 1: losses" in status and "--cpu-offload vs without, 2 processes: losses" in status
    assert 0 < rows[2]["data"]["max_rel"] < gpu_check_common.TRAIN_LOSS_RTOL  # bf16 vs fp32: different, close


# 3./4. memory and speed: bench.py's sections, their JSON turned into rows

TINY_BENCH = ["--train-len", "32", "--target", "128", "--eval-ctx", "64", "--repeats", "1", "--warmup", "0",
              "--threads", "1", "--shape", json.dumps({"dim": 64, "n_heads": 4, "n_kv_heads": 2,
                                                       "intermediate_size": 128, "vocab_size": 4096})]


def test_gpu_check_has_no_training_code_of_its_own():
    """gpu_check has no FSDP wrapping, optimizer, training step or batch of its own: bench.py runs train.py's."""
    modules = (gpu_check_bench, gpu_check_common, gpu_check_model, gpu_check_train)
    source = open(SCRIPT).read() + "".join(open(m.__file__).read() for m in modules)
    for name in ("import train", "fully_shard", "shard_model", "torch.optim", ".backward(", "batch_for", "update("):
        assert name not in source, name


def test_memory_section_runs_bench_py(tmp_path):
    """The section as the GPU run calls it, on the CPU at tiny sizes: bench.py in a subprocess, its JSON kept in
    OUT/bench_memory.json, rows from it. The CPU has no allocator counters: the rows are the counted ones."""
    rows, result = check.section_memory(str(tmp_path), [1, 2], device="cpu", flags=TINY_BENCH)
    attention, rows = rows[0], rows[1:]
    assert attention["data"]["attention"].startswith("SDPA (")  # the CPU's only backend, with the rule's reason
    assert [r["check"] for r in rows] == [f"{name}, counted tensor by tensor"
                                          for name in gpu_check_bench.STATE.values()]
    assert [r["status"] for r in rows] == ["pass"] * 3 and (tmp_path / "bench_memory.json").exists()
    assert [r["layers"] for r in result["runs"]] == [1, 2]


def test_speed_section_runs_bench_py(tmp_path):
    rows, result = check.section_speed(str(tmp_path), 2, peak_tflops=1.0, device="cpu", flags=TINY_BENCH)
    assert [r["status"] for r in rows] == ["info", "info", "info", "info", "pass"], rows  # transformers' loss
    assert result["peak_tflops"] == 1.0 and 0 < rows[1]["data"]["mfu"] < 1
    assert rows[0]["value"] == "SDPA" and rows[4]["check"].startswith("ours (SDPA) / transformers sdpa")


def bench_memory_run(layers, gradient_bytes=4, working_per_layer=2048 * 4096 * 2):
    """One run of bench.py memory's JSON at LLaMA-7B's layer shape as an exact FSDP2 run on a GPU gives it: the
    plan's weights and AdamW state, gradients of `gradient_bytes` per parameter, a step's working memory of one bf16
    block input per layer and a fixed 1 GB, and the optimizer step's peak one parameter-sized temporary above it all."""
    settings = dict(method="pose", train_len=2048, target=16384, seq_len=2048, batch_size=2, micro_batch_size=1,
                    precision="bf16", grad_checkpointing=True)
    run = dict(layers=layers, config=dataclasses.asdict(ModelConfig(n_layers=layers)), settings=settings)
    plan = gpu_check_bench.plan_at(run, layers, 1)
    n = memory.plan(ModelConfig(n_layers=layers)).params
    counted = {key: plan[key] for key in gpu_check_bench.STATE}
    state = plan["weights"] + plan["adamw"] + gradient_bytes * n
    working = layers * working_per_layer + 1e9
    allocated = dict(counted, gradients=gradient_bytes * n, working=working, forward_backward=state + working,
                     optimizer=state + 4 * n, peak=max(state + working, state + 4 * n))
    windows = [dict(ctx=c, dtype="bfloat16", weights=2 * n, peak=2 * n + c * 11008 * 6) for c in (32768, 131072)]
    return dict(run, params=n, plan=plan, counted=counted, allocated=allocated, eval=windows)


def test_memory_rows_scale_to_32_layers():
    assert gpu_check_bench.extrapolate([(4, 10.0), (8, 18.0)], 32) == (66.0, 2.0)
    rows = {r["check"]: r for r in gpu_check_bench.memory_rows(dict(runs=[bench_memory_run(4), bench_memory_run(8)]))}
    for name in gpu_check_bench.STATE.values():
        assert rows[f"{name}, counted tensor by tensor"]["status"] == rows[f"{name}, allocator"]["status"] == "pass"
    assert rows["fp32 weights, allocator"]["data"]["extrapolated"] == pytest.approx(4 * LLAMA_7B_PARAMS / 1e9)
    assert rows["AdamW state, allocator"]["data"]["extrapolated"] == pytest.approx(8 * LLAMA_7B_PARAMS / 1e9, rel=1e-6)
    working = rows[gpu_check_bench.ALLOCATED["working"] + ", allocator"]["data"]
    assert working["per_layer"] == pytest.approx(2048 * 4096 * 2 / 1e9) and working["extrapolated"] == pytest.approx(
        32 * 2048 * 4096 * 2 / 1e9 + 1.0)
    assert rows["eval window of 32k tokens, bfloat16: peak"]["data"]["extrapolated"] == pytest.approx(
        (2 * LLAMA_7B_PARAMS + 32768 * 11008 * 6) / 1e9)
    per_gpu = [r for c, r in rows.items() if c.startswith("LLaMA-7B per GPU at 8 GPUs")][0]["data"]
    forward_backward = 16 * LLAMA_7B_PARAMS / 8 / 1e9 + 32 * 2048 * 4096 * 2 / 1e9 + 1.0
    optimizer = 20 * LLAMA_7B_PARAMS / 8 / 1e9  # weights, gradients, moments and one parameter-sized temporary
    assert per_gpu["per_gpu_gb"] == pytest.approx(max(forward_backward, optimizer), rel=1e-6)
    assert per_gpu["planned_gb"] == pytest.approx(memory.plan(ModelConfig(), world=8).peak / 1e9)  # --dry-run --world 8
    # a copy too many (bf16 gradients kept beside the fp32 ones: 6 B per parameter) is a failed check
    bad = {r["check"]: r
           for r in gpu_check_bench.memory_rows(dict(runs=[bench_memory_run(4, 6), bench_memory_run(8, 6)]))}
    assert bad["fp32 gradients, allocator"]["status"] == "FAIL"
    # counted bytes that are not the plan's, and an evaluation window that ran out of memory: failed rows; the
    # other rows still come
    broken = [bench_memory_run(4), bench_memory_run(8)]
    broken[1]["counted"]["adamw"] += 4
    broken[1]["eval"][1] = dict(ctx=131072, dtype="bfloat16", weights=1, peak=None, error="CUDA out of memory")
    rows = gpu_check_bench.memory_rows(dict(runs=broken))
    assert [r["status"] for r in rows if r["check"].startswith("AdamW state")] == ["FAIL", "pass"]
    assert [r["status"] for r in rows if "128k" in r["check"]] == ["FAIL"]
    assert any(r["check"] == "eval window of 32k tokens, bfloat16: peak" for r in rows)


def test_speed_rows_flag_impossible_mfu():
    step = dict(seq_len=2048, seconds=1.0, tokens_per_s=2048.0, flops=2e15, mfu=2e15 / 989e12)
    run = dict(layers=8, target=16384, precision="bf16", grad_checkpointing=True,
               steps=dict(pose=step, full=dict(step, seq_len=16384, seconds=9.0, mfu=2e15 / 9.0 / 989e12)),
               versus=dict(seq_len=2048, dtype="bfloat16", ours_s=1.0, transformers_s=1.1, ratio=1 / 1.1,
                           loss_ours=10.0, loss_transformers=10.01, attention="flash-attn"))
    rows = gpu_check_bench.speed_rows(dict(peak_tflops=989.0, runs=[run]))
    assert rows[0]["status"] == "FAIL"  # 2 PFLOP in one second is more than the GPU can do: wrong accounting
    assert rows[1]["status"] == "info" and rows[2]["value"] == "9.0x" and rows[3]["status"] == "pass"
    assert rows[3]["check"].startswith("ours (flash-attn) / transformers sdpa")  # the backend bench.py measured
    run["versus"]["loss_transformers"] = 11.0  # the two models did not compute the same thing
    assert gpu_check_bench.speed_rows(dict(peak_tflops=989.0, runs=[run]))[3]["status"] == "FAIL"


# 6. compile: train.py --compile against eager, from the two runs' logs and stderr

RECOMPILE_LOG = """\
[rank0]:V1206 05:56:49.511000 4492 torch/_dynamo/guards.py:5396] [0/1] [__recompiles] Recompiling function forward in \
/work/main/model.py:197
[rank0]:V1206 05:56:49.511000 4492 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     triggered by the \
following guard failure(s):
[rank0]:V1206 05:56:49.511000 4492 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     - 0/0: not \
___dict_contains(device(type='cpu'), self._modules['self_attn'].rope._cache)  # if positions.device not in self._cache:
[rank0]:V1206 05:56:49.511000 4492 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     - User stack trace:
"""


def test_compile_rows():
    """tokens/s after compilation (the median of the second half of the steps), the first step's seconds, the losses
    of the first steps within TRAIN_LOSS_RTOL, and the recompilations with their guard failures."""
    def run(losses, tokens_per_s, first):
        return [dict(e, tokens_per_s=tokens_per_s * (0.1 if i == 0 else 1), seconds=first if i == 0 else 0.1)
                for i, e in enumerate(entries(losses))]

    losses = [3.3, 3.2, 3.1, 3.0, 2.9, 2.8]
    eager = (run(losses, 100.0, 1.0), "attention: SDPA (installed, CUDA)\n")
    compiled = (run([x * (1 + 1e-4) for x in losses], 150.0, 30.0), RECOMPILE_LOG)
    rows = gpu_check_train.compile_rows("tiny", dict(eager=eager, compiled=compiled), torch.device("cuda"))
    assert [r["status"] for r in rows] == ["info", "pass", "info"], rows
    assert rows[0]["data"]["ratio"] == pytest.approx(1.5) and rows[0]["data"]["first_step"] == [30.0, 1.0]
    assert rows[0]["data"]["attention_eager"] == "SDPA (installed, CUDA), 1 process"
    assert rows[2]["data"]["count"] == 1 and "rope._cache" in rows[2]["data"]["reasons"][0]
    assert gpu_check_train.guard_failures(RECOMPILE_LOG) == [rows[2]["data"]["reasons"][0]]
    compiled = (run([x * 1.05 for x in losses], 150.0, 30.0), "")  # another computation, not another rounding
    rows = gpu_check_train.compile_rows("tiny", dict(eager=eager, compiled=compiled), torch.device("cpu"))
    assert rows[1]["status"] == "FAIL"


# 5. passkey: KV cache vs re-reading

@pytest.fixture(scope="module")
def passkey_setup():
    tokenizer = gpu_check_model.Tokenizer(os.path.join(gpu_check_model.cli.BUNDLED_MODEL, "tokenizer.model"))
    cfg = gpu_check_model.passkey_config(vocab=tokenizer.vocab_size, window=128, factor=4.0, dim=64)
    return gpu_check_model.random_model(cfg), tokenizer


def test_passkey_cache_matches_rereading(passkey_setup, one_thread):
    model, tokenizer = passkey_setup
    results = gpu_check_model.passkey_check("cpu", model, tokenizer, [160, 320], trials=2, max_new_tokens=4)
    for r in results:
        assert r["ok"] and r["same"] == 2 and r["cache_used"] and r["max_rel_err"] < 1e-4, r
        assert r["cache_steps"] > 0


def test_passkey_check_fails_on_a_broken_cache(passkey_setup, one_thread, monkeypatch):
    """A cache that forgets the prompt (returns only the new token's keys and values) is caught."""
    model, tokenizer = passkey_setup

    def forgetful(self, layer, k, v):
        self.keys[layer], self.values[layer] = k, v
        return k, v

    monkeypatch.setattr(KVCache, "update", forgetful)
    r = gpu_check_model.passkey_check("cpu", model, tokenizer, [160], trials=2, max_new_tokens=4)[0]
    assert not r["ok"] and r["max_rel_err"] > gpu_check_common.LOGITS_TOL


def test_section_passkey_bf16_rows(one_thread):
    """The section as the GPU runs it (bf16, the bundled tokenizer, the random GQA model), at short lengths."""
    rows = check.section_passkey("cpu", lengths=(160, 320), trials=1)
    assert rows.pop(0)["data"]["attention"].startswith("SDPA (")
    assert [r["status"] for r in rows] == ["pass", "pass"], rows
    assert all(r["data"]["cache_used"] and 0 < r["data"]["max_rel_err"] < gpu_check_common.LOGITS_TOL for r in rows)


def test_compare_decodes_near_ties():
    ids = [1, 2, 3]
    base = torch.tensor([0.0, 1.0, 0.999, -1.0])
    # the same choices and nearly the same logits
    same, tie, err = gpu_check_model.compare_decodes([(ids, base)], [(ids, base + 1e-4)])
    assert same and not tie and err < 1e-3
    # a different choice where the two tokens' logits are closer than the paths' difference: a near tie
    flipped = base.clone()
    flipped[2] += 0.002
    cached, full = [(ids, flipped), (ids + [2], base)], [(ids, base), (ids + [1], base)]
    same, tie, _ = gpu_check_model.compare_decodes(cached, full)
    assert not same and tie
    # a different choice with a clear winner in the re-read: a real difference
    wrong = base.clone()
    wrong[3] += 2.5
    same, tie, _ = gpu_check_model.compare_decodes([(ids, wrong), (ids + [3], base)], full)
    assert not same and not tie


def test_results_written_as_json_and_markdown(tmp_path):
    rows = [check.row("1 logits", "x", "rel err 1e-3", "<= 0.03", "pass", rel_err=1e-3),
            check.row("2 train", "y", "z", status="FAIL")]
    meta = dict(device="cpu", torch=torch.__version__, cuda=None, flash_attn=False, seconds=1.0)
    text = check.write_results(str(tmp_path), rows, meta)
    assert json.load(open(tmp_path / "results.json"))["rows"][0]["data"]["rel_err"] == 1e-3
    lines = open(tmp_path / "results.md").read().splitlines()
    assert lines[4] == "| 1 logits | x | rel err 1e-3 | <= 0.03 | pass |" and text.endswith("| FAIL |\n")


def test_main_runs_every_section_and_fails_on_a_failed_row(tmp_path, monkeypatch):
    """The command's flow with the GPU sections stubbed: every section runs, one that raises becomes a FAIL row and
    the others still run, the table is written, and the exit code says whether a check failed."""
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    ran = []

    def section(name, status="pass"):
        def run(*args, **kw):
            ran.append(name)
            return [check.row(name, "c", "v", status=status)]
        return run

    def broken(*args, **kw):
        ran.append("speed")
        raise RuntimeError("worker failed")

    monkeypatch.setattr(check, "section_logits", section("logits"))
    monkeypatch.setattr(check, "train_check", section("train"))
    monkeypatch.setattr(check, "section_memory", lambda *a, **k: (section("memory")(), {"raw": 1}))
    monkeypatch.setattr(check, "section_speed", broken)
    monkeypatch.setattr(check, "section_passkey", section("passkey", "info"))
    monkeypatch.setattr(check, "section_compile", section("compile", "skip"))
    assert check.main(["--out", str(tmp_path)]) == 1
    assert ran == ["logits", "train", "memory", "speed", "passkey", "compile"]
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    assert [r["status"] for r in rows] == ["pass", "pass", "pass", "FAIL", "info", "skip"]
    assert rows[3]["section"] == "4 speed" and "worker failed" in rows[3]["value"]
    monkeypatch.setattr(check, "section_speed", lambda *a, **k: ([], {}))
    assert check.main(["--out", str(tmp_path), "--only", "logits", "speed"]) == 0


def test_rehearse_runs_every_section_on_the_cpu(tmp_path, monkeypatch):
    """--rehearse without CUDA: every section runs, on the CPU, with the rehearsal's tiny sizes; the sections' own
    attention rows are gathered into the JSON's meta and the markdown's header."""
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: False)
    calls = {}

    def section(name):
        def run(*args, **kw):
            calls[name] = (args, kw)
            rows = [check.row(check.SECTIONS[name], "c", "v", "pass", attention="SDPA")]
            return (rows, {}) if name in ("memory", "speed") else rows
        return run

    for name, function in (("logits", "section_logits"), ("train", "train_check"), ("memory", "section_memory"),
                           ("speed", "section_speed"), ("passkey", "section_passkey"),
                           ("compile", "section_compile")):
        monkeypatch.setattr(check, function, section(name))
    assert check.main(["--rehearse", "--out", str(tmp_path)]) == 0
    assert list(calls) == list(check.SECTIONS)
    for name in ("logits", "train", "passkey", "compile"):
        assert calls[name][0][0] == torch.device("cpu")
    assert calls["train"][1] == check.REHEARSAL["train"] and calls["passkey"][1] == check.REHEARSAL["passkey"]
    assert calls["memory"][0][1] == [1, 2] and calls["speed"][0][1] == 2
    assert calls["memory"][1] == dict(device="cpu", flags=check.REHEARSAL["bench"])
    results = json.load(open(tmp_path / "results.json"))
    assert results["meta"]["device"] == "cpu (--rehearse)" and results["meta"]["attention"]["2 train"] == ["SDPA"]
    assert "Attention backend by section: 1 logits: SDPA; 2 train: SDPA;" in open(tmp_path / "results.md").read()
