"""memory.py's plan against a CPU run of train.py's own build and step, and `train.py --dry-run`.

The weights, gradients and AdamW state are counted tensor by tensor and must equal the plan to the byte. The rest
(gathered weights, activations, the loss) is measured as the growth of the process's peak resident set over one
optimizer step, in a fresh process whose allocator returns every freed block of 64 KB or more to the system
(MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live tensors. The plan counts what is allocated, the
resident set only the pages written (torch.empty's grad_h is written chunk by chunk), so the plan may be above the
measurement but not below it, and by at most ACTIVATION_TOL.
"""
import json
import os
import subprocess
import sys

import pytest

from lib import cli
from helpers import ROOT

ACTIVATION_TOL = 0.2  # measured: 3 % above without checkpointing, 9 % with


def status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def worker(argv):
    """One step of the bundled model through train.py's build and optimizer_step; prints what it measured."""
    import torch

    import data
    from lib import memory
    from lib import settings
    import train
    s = settings.from_command_line(argv, world=1, device="cpu")
    device, mesh = train.setup_distributed()
    model, corpus = train.build(s, device, mesh, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pool = data.ReplayPool(s.replay) if s.replay else None
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (FSDP2: DTensor shards)
    nbytes = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    weights = nbytes(model.parameters())
    ids, targets, positions = train.batch_for(0, 0, 0, 1, s, corpus)
    model(ids, positions, targets=targets).backward()
    grads = nbytes(p.grad for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    train.optimizer_step(model, optimizer, 1e-5, 0, s, corpus, pool, device, 1)  # AdamW's state exists from here
    adam = nbytes(t for state in optimizer.state.values() for t in state.values())
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM)
    train.optimizer_step(model, optimizer, 1e-5, 1, s, corpus, pool, device, 1)
    step = status_bytes("VmHWM") - before
    plan = memory.plan_of(s)
    print(json.dumps(dict(weights=weights, grads=grads, adam=adam, step=step, plan_weights=plan.part("fp32 master"),
                          plan_grads=plan.part("fp32 gradients"), plan_adam=plan.part("AdamW"),
                          plan_step=plan.peak - plan.part("fp32 master") - plan.part("AdamW"))))


@pytest.mark.parametrize("checkpointing", ["--no-grad-checkpointing", "--grad-checkpointing"])
def test_plan_against_a_cpu_step(checkpointing):
    """Full-length examples of 2048 tokens through the bundled model: the step's growth is mostly activations."""
    argv = ["--target", "2048", "--method", "full", "--batch-size", "1", "--replay", "none", checkpointing]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT,
               POSE_CACHE=os.environ.get("POSE_CACHE", "/tmp/pose-test-cache"))
    res = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert (m["weights"], m["grads"], m["adam"]) == (m["plan_weights"], m["plan_grads"], m["plan_adam"])
    assert m["step"] <= m["plan_step"] <= (1 + ACTIVATION_TOL) * m["step"], m


def test_dry_run_of_llama_7b_needs_no_weights(tmp_path):
    """A directory with LLaMA-7B's config.json and a tokenizer (the bundled one: the plan needs no real vocabulary):
    every setting, the first examples and the plan of 8 GPUs; nothing written, exit 0."""
    import shutil

    from lib import memory
    from model import ModelConfig
    model = tmp_path / "llama-7b"
    model.mkdir()
    shutil.copy(os.path.join(cli.BUNDLED_MODEL, "tokenizer.model"), model)
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048, "torch_dtype": "float16"}))
    env = dict(os.environ, OMP_NUM_THREADS="1", POSE_CACHE=os.environ.get("POSE_CACHE", "/tmp/pose-test-cache"))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--target", "16384", "--model", model,
                          "--dry-run", "--world", "8", "--device", "cuda", "--out", out], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["llama-7b"]
    lines = res.stdout.splitlines()
    assert "  micro_batch_size    1" in lines and "  precision           bf16" in lines
    assert "  rope_scaling        {'rope_type': 'linear', 'factor': 8.0}" in lines
    examples = [line for line in lines if line.startswith("  example ")]
    assert len(examples) == 3 and all(line.split(": ")[1].startswith("0-") for line in examples)  # 2 chunks
    assert "| fp32 master weights, sharded | 6,738,415,616 x 4 B / 8 | 3.37 |" in lines
    plan = memory.plan(ModelConfig(rope_scaling={"rope_type": "linear", "factor": 8.0}), world=8)
    assert f"| **peak per process** | the rows above | **{plan.peak / memory.GB:.1f}** |" in lines
    assert 15e9 < plan.peak < 20e9 and plan.params == 6_738_415_616  # LLaMA-7B's parameters


def test_a_run_that_does_not_fit_is_refused_in_one_line():
    """What train.py does on CUDA before any weight goes to the GPU (free memory: the least over the ranks)."""
    from lib import memory
    from lib.cli import UsageError
    from model import ModelConfig
    plan = memory.plan(ModelConfig(), world=8)
    memory.check_fits(plan, {"cuda:0": 80e9, "cuda:1": 79e9})
    with pytest.raises(UsageError, match=r"needs about 17.1 GB per process .* and cuda:1 has 12.0 GB free: lower "
                                         r"--micro-batch-size, or use --grad-checkpointing or --cpu-offload"):
        memory.check_fits(plan, {"cuda:0": 80e9, "cuda:1": 12e9})


def test_world_and_device_plan_a_dry_run_only():
    from lib import settings
    from lib.cli import UsageError
    with pytest.raises(UsageError, match="--world, --device and --gpu-memory plan a --dry-run"):
        settings.from_command_line(["--target", "2048", "--world", "8"])


# ----------------------------------------------------------------------------------------------------------------------
# evaluation

def forward_worker(tokens=4096):
    """Forward passes of the bundled model without gradients, as the evaluation tools run them: passkey's without and
    with a KV cache in bf16, evaluate's chunked loss in fp32. Prints, for each, the growth of the peak resident set
    and the plan's peak less the weights."""
    import torch

    from lib import memory
    from model import KVCache, LLaMA
    out = {}
    for name, dtype in (("no cache", torch.bfloat16), ("cache", torch.bfloat16), ("loss", torch.float32)):
        model = LLaMA.from_pretrained(cli.BUNDLED_MODEL, dtype=dtype)
        ids = torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model.loss(ids, ids)  # at full size first: BLAS and allocator buffers that stay are not the forward's
        before = status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM)
        with torch.inference_mode():
            if name == "loss":
                model.loss(ids, ids)
                plan = memory.eval_plan(model.cfg, tokens, dtype, logit_rows=None)
            else:
                cache = KVCache.for_model(model, tokens + 8) if name == "cache" else None
                for t in cache.keys + cache.values if cache else []:
                    t.zero_()  # resident, as a GPU allocation is from the start
                model.lm_head(model.hidden_states(ids, cache=cache)[:, -1]).float()  # passkey.Decoder.start
                plan = memory.eval_plan(model.cfg, tokens, dtype, cache_tokens=tokens + 8 if cache else 0)
        out[name] = dict(measured=status_bytes("VmHWM") - before, planned=plan.peak - plan.rows[0].bytes,
                         largest=plan.rows[2].what)
    print(json.dumps(out))


def test_evaluation_plan_against_cpu_forward_passes():
    """The plan counts what model.py holds at once; the resident set follows it (as above) to within RSS noise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    res = subprocess.run([sys.executable, "-c", "import test_memory; test_memory.forward_worker()"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["no cache"]["largest"].endswith("RoPE on k") and m["loss"]["largest"].endswith("output layer"), m
    for name, r in m.items():
        assert r["measured"] <= 1.01 * r["planned"] <= 1.04 * r["measured"], (name, r)


LLAMA_7B_128K = dict(max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 64.0})


def test_evaluation_planner_chooses_no_cache_at_128k_on_80_gb():
    """LLaMA-7B in bf16: the KV cache of a 131072-token prompt and 8 answer tokens is 68.7 GB, beside 13.5 GB of
    weights; the planner takes the path without a cache, and the cache at 4096 tokens."""
    import argparse

    import torch

    from lib import memory
    from lib.cli import UsageError
    from model import ModelConfig
    cfg = ModelConfig(**LLAMA_7B_128K)
    args = argparse.Namespace(device="cuda", gpu_memory=80, dry_run=False)

    def path(tokens, free=80):
        paths = [("cached decoding", memory.eval_plan(cfg, tokens, torch.bfloat16, cache_tokens=tokens + 8)),
                 ("no cache", memory.eval_plan(cfg, tokens + 8, torch.bfloat16))]
        return memory.evaluation_path(argparse.Namespace(**{**vars(args), "gpu_memory": free}), "passkey", paths,
                                      "give shorter --lengths"), paths

    chosen, paths = path(131072)
    cached, uncached = paths[0][1], paths[1][1]
    assert chosen == "no cache" and cached.peak > 80e9 >= uncached.peak
    assert cached.part("KV cache") == 32 * 2 * 131080 * 32 * 128 * 2 and round(cached.part("KV cache") / 1e9, 1) == 68.7
    assert uncached.part("bf16 weights") == 6_738_415_616 * 2 and uncached.part("KV cache") == 0
    assert path(4096)[0] == "cached decoding"
    with pytest.raises(UsageError, match=r"^passkey needs about 30.8 GB \(no cache; --dry-run shows the plan\) and "
                                         r"a GPU of 20 GB \(--gpu-memory\) has 20.0 GB free: give shorter --lengths$"):
        path(131072, free=20)


if __name__ == "__main__":
    worker(sys.argv[1:])
