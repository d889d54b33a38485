"""bench.py's training sections on the CPU at tiny sizes: the same worker functions its GPU run calls, in this process.

They run train.py's own code (settings, train.sharded_model, train.optimizer_step), so the tests check what the
sections report against what that code and memory.py's plan say: bytes to the byte, steps that train."""
import json
import math

import pytest
import torch

import bench
from lib import cli
from lib import memory
import train
from model import ModelConfig

LLAMA_7B_PARAMS = 6_738_415_616  # Meta's LLaMA-7B / Llama-2-7B checkpoints
TINY = {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 128, "vocab_size": 4096}  # the bundled vocab
CPU = torch.device("cpu")


def tiny_run(tmp_path, method="pose", train_len=32, target=128, batch_size=2, micro_batch_size=1):
    cfg = bench.bench_config(TINY, 2, train_len)
    return cfg, bench.run_settings(cfg, str(tmp_path), CPU, method, train_len, target, batch_size, micro_batch_size)


def test_run_settings_are_train_py_settings(tmp_path):
    """The settings of the train.py command line for the shape: its paper recipe and CPU defaults, and the plan that
    `train.py --dry-run` prints for them."""
    cfg, s = tiny_run(tmp_path)
    assert (s.method, s.train_len, s.target, s.seq_len, s.batch_size, s.micro_batch_size) == ("pose", 32, 128, 32, 2, 1)
    assert (s.precision, s.grad_checkpointing, s.replay, s.recipe) == ("fp32", False, None, "paper")
    assert s.rope_scaling == {"rope_type": "linear", "factor": 4.0}  # target / the shape's window
    assert memory.plan_of(s).params == memory.plan(cfg).params


def test_a_step_is_train_py_step_and_changes_the_weights(tmp_path, mesh, one_thread):
    cfg, s = tiny_run(tmp_path)
    model = bench.fresh_model(cfg, s, CPU, mesh)
    assert all(hasattr(p, "to_local") for p in model.parameters())  # FSDP2's DTensors: train.sharded_model
    assert model.rope.scaling == s.rope_scaling and model.training
    optimizer = train.adamw(model, s)
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    corpus = bench.random_corpus(cfg.vocab_size, 2 * 5 * s.train_len)
    loss = bench.step(model, optimizer, s, corpus, CPU, 0)
    assert math.isfinite(loss) and abs(loss - math.log(cfg.vocab_size)) < 0.5  # fresh weights: about uniform
    assert all(not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["lr"] == train.lr_at(0, s.lr, s.warmup, s.steps)


def test_memory_worker_counts_what_the_plan_plans(mesh, one_thread):
    """Weights, gradients (when each optimizer step starts) and AdamW's state, counted tensor by tensor, equal
    memory.py's plan of the same run to the byte."""
    r = bench.worker_memory(TINY, 2, 32, 128, 2, 1, 3, [64, 128], CPU, mesh)
    assert r["counted"] == {k: r["plan"][k] for k in ("weights", "gradients", "adamw")}
    assert r["counted"]["weights"] == 4 * r["params"] == 4 * memory.plan(bench.bench_config(TINY, 2, 32)).params
    assert len(r["steps"]) == 3 and all(math.isfinite(x["loss"]) for x in r["steps"])
    assert all(x["gradient_bytes"] == r["plan"]["gradients"] for x in r["steps"])
    assert r["allocated"] is None  # the CPU has no allocator counters
    assert [w["ctx"] for w in r["eval"]] == [64, 128] and all(w["dtype"] == "float32" for w in r["eval"])
    json.dumps(r)  # what --json writes


def test_step_readings_are_taken_where_train_update_passes(tmp_path, mesh, one_thread, monkeypatch):
    """With a clock for an allocator: each step is read at its start, when its gradients are complete (before AdamW)
    and at its end, in that order, and each peak just before it is reset."""
    clock = iter(range(10**6))

    class Clock:
        def __init__(self, device):
            pass

        def allocated(self):
            return next(clock)

        peak = allocated

        def reset_peak(self):
            pass

    monkeypatch.setattr(bench, "Memory", Clock)
    cfg, s = tiny_run(tmp_path)
    model = bench.fresh_model(cfg, s, CPU, mesh)
    optimizer = train.adamw(model, s)
    readings = bench.step_readings(model, optimizer, s, bench.random_corpus(cfg.vocab_size, 400), CPU, 2)
    for r in readings:
        assert r["start"] < r["gradients"] < r["peak_forward_backward"] < r["end"] < r["peak_optimizer"], r
    assert readings[0]["peak_optimizer"] < readings[1]["start"]


def test_speed_worker_times_both_methods_on_one_model(mesh, one_thread):
    r = bench.worker_speed(TINY, 1, 32, 128, 1, 0, CPU, mesh)
    pose, full = r["steps"]["pose"], r["steps"]["full"]
    assert (pose["seq_len"], full["seq_len"]) == (32, 128) and pose["seconds"] > 0 and full["seconds"] > 0
    assert full["flops"] == bench.train_flops(bench.bench_config(TINY, 1, 32), 1, 128)
    assert r["params"] == memory.plan(bench.bench_config(TINY, 1, 32)).params
    v = r["versus"]
    assert v["loss_ours"] == pytest.approx(v["loss_transformers"], rel=1e-5) and v["dtype"] == "float32"


def test_pose_worker_steps_train_len_or_target_tokens(mesh, one_thread):
    for method, tokens in (("pose", 32), ("full", 64)):
        r = bench.worker_step(32, 64, method, CPU, mesh, repeats=1)
        assert r["tokens"] == tokens and r["seconds"] > 0


def test_flops_and_peaks():
    cfg = ModelConfig()  # LLaMA-7B
    dense = 6 * (LLAMA_7B_PARAMS - 32000 * 4096) * 2048
    attention = 6 * 32 * 2048 ** 2 * 4096  # causal: half of the 12 L T^2 d of a full attention matrix
    assert bench.train_flops(cfg, 1, 2048) == dense + attention
    assert bench.train_flops(cfg, 8, 2048) == 8 * bench.train_flops(cfg, 1, 2048)
    assert bench.train_flops(cfg, 1, 16384) > 8 * bench.train_flops(cfg, 1, 2048)  # attention grows with T^2
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989 and bench.peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench.peak_tflops("NVIDIA H200") == 989 and bench.peak_tflops("Some GPU") is None
    assert bench.peak_tflops("Some GPU", 123.0) == 123.0


@pytest.mark.parametrize("argv,match", [
    (["memory", "--shape", "[4]"], "argument --shape: not a JSON object of ModelConfig fields"),
    (["memory", "--shape", '{"heads": 4}'], "argument --shape: not a JSON object of ModelConfig fields"),
    (["memory", "--device", "cpu", "--steps", "1"], "--steps must be >= 2, got 1"),
    (["loss", "--json", "x.json"], "--json is for the memory and speed sections"),
    (["speed", "--device", "cpu", "--json", "/no/such/folder/x.json"], "--json: folder /no/such/folder does not exist"),
])
def test_bad_input_is_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: bench.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and match in err
