"""Prove the CUDA path on one GPU in a few minutes, and measure memory and speed there.

    python scripts/gpu_check.py                      # writes out/gpu_check/results.json and results.md
    python scripts/gpu_check.py --out DIR --layers 4 8 --only logits train memory speed passkey

Needs one CUDA GPU (H100 / H200 class: the memory section wants about 45 GB at --layers 4 8), PyTorch with CUDA,
transformers, sentencepiece, safetensors and tqdm; no network. flash-attn is used when it is installed. Without CUDA
it prints one line and exits 0. It exits 1 when a check fails. Every section is a function that takes a device, so
the same code runs on the CPU at tiny sizes in tests/test_gpu_check.py.

Sections (each prints its progress on stderr and adds rows to one table):
  1. logits    our model in bf16 on CUDA (SDPA, and flash-attn when importable) against fp32 CPU logits of the same
               weights: GQA, rope types none / linear / yarn / llama3 / dynamic, PoSE's skipped positions up to 8x the
               window. Relative error within LOGITS_TOL (the why is beside the constant).
  2. train     `torchrun --nproc_per_node 1 train.py`: FSDP2 over NCCL, bf16, activation checkpointing, on the bundled
               tiny model and books. Its losses against the same run in fp32 on the CPU (GPU hidden); then the same
               run killed with SIGKILL after a checkpoint and resumed: log losses and final weights against the
               uninterrupted run.
  3. memory    `bench.py memory` at LLaMA-7B's layer shape with two layer counts: train.py's own FSDP2 model, batches
               and optimizer steps (bf16, activation checkpointing, 2048 tokens per example), and evaluation windows
               of 32k and 128k tokens through evaluate.perplexity. The weights, gradients and AdamW state, counted
               tensor by tensor and read from the allocator, against memory.py's plan of the same run (train.py
               --dry-run); the step's peak beside the plan; a straight line through the two layer counts gives each
               quantity at 32 layers, and LLaMA-7B per GPU at 8 GPUs beside `train.py --dry-run --world 8`.
  4. speed     `bench.py speed` at the larger layer count: tokens/s and model FLOPs utilization of train.py's optimizer
               step, PoSE (2048 tokens, positions up to 16k) vs full-length (16k tokens), and forward + backward of
               our model vs transformers' LlamaForCausalLM (sdpa) on the same weights, timed alternately.
  5. passkey   passkey retrieval at 16k and 32k tokens on CUDA in bf16 with the KV cache against re-reading the whole
               sequence at each step: the same answers, and the same logits within LOGITS_TOL at every answer step.

Memory and speed run `python bench.py SECTION --device cuda --layers ... --json OUT/bench_SECTION.json` and turn
its JSON into rows; bench.py measures each model size in a fresh process, so that it starts from an empty CUDA
allocator. This script defines no model setup, batch or training step of its own.
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import memory  # noqa: E402
import passkey  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import LLaMA, ModelConfig  # noqa: E402
from pose import skip_positions  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
BENCH = os.path.join(ROOT, "bench.py")
GB = memory.GB  # decimal gigabytes, as train.py --dry-run's plan

# bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3) and every matrix product, norm and residual add
# rounds its output once; the errors grow through the layers, more so where attention is sharp. On the CPU in bf16 the
# check model below (4 layers, dim 512, head_dim 128, init std 0.05) measures 1.7-2.2e-2 against fp32 for the five
# rope types, and cuBLAS / flash kernels (bf16 inputs, fp32 accumulation) follow the same error model. 5e-2 leaves a
# factor 2 for kernel differences and stays 20x below what a real mistake gives on the same model: the logits of a
# wrong rope type or factor are 1.0-1.3 away (relative); on the tests' smaller model, attention without the causal
# mask or with query heads mapped to the wrong key/value heads are 1.1-1.2 away.
LOGITS_TOL = 5e-2
FP32_TOL = 1e-4  # fp32 rounds at 6e-8; summation order differs between kernels, TF32 (1e-3) would not pass
INIT_STD = 0.05  # weights this large make attention peaked, so that position (rope) mistakes show in the logits
# Training losses, bf16 GPU vs fp32 CPU: the forward error above averages over the 4096 tokens of a step, and the
# weights drift apart by bf16-rounded gradients step after step; tests/test_train.py holds the CPU bf16 run to 2e-2.
TRAIN_LOSS_RTOL = 2e-2
TRAIN_COMPARE_STEPS = 8  # the first steps, where the two runs' weights have not yet drifted apart by rounding
# Resume: the resumed run repeats the uninterrupted one's computation, so any difference is run-to-run kernel
# nondeterminism (atomic adds in attention backward), far below 1e-4; a lost optimizer state or a wrong data order
# changes losses and weights by 1e-3 or more.
RESUME_RTOL = 1e-4
MEMORY_EXACT_RTOL = 0.02  # fp32 weights, gradients and AdamW state are bytes x parameters: nothing else may hide there
PLAN_WORLD = 8  # the README's setting: LLaMA-7B on 8 GPUs


def log(message):
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def row(section, check, value, reference="", status="info", **data):
    """One line of the result table; status is pass, FAIL, info or skip."""
    return dict(section=section, check=check, value=value, reference=reference, status=status, data=data)


def rel_error(got, ref):
    """||got - ref|| / ||ref|| over all elements, in fp64."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------------------------------
# 1. logits: bf16 on the device against fp32 on the CPU

ROPE_CASES = {  # the rope types transformers knows, each at factor 8 over a 1024-token original window
    "none": None,
    "linear": {"rope_type": "linear", "factor": 8.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024},
    "dynamic": {"rope_type": "dynamic", "factor": 8.0, "original_max_position_embeddings": 1024},
}


def logits_config(scaling, vocab=4096, dim=512, n_layers=4, n_heads=4, n_kv_heads=2, window=1024):
    """A LLaMA-shaped model: GQA (2 query heads per key/value head), head_dim 128 as LLaMA's, SwiGLU 8/3 x dim."""
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       intermediate_size=dim * 8 // 3 // 64 * 64 + 64, max_position_embeddings=window,
                       rope_scaling=scaling)


def random_model(cfg, std=INIT_STD, seed=0):
    """Fresh fp32 weights on the CPU, rounded to bf16-representable values: the bf16 copy then holds exactly the same
    weights, and a comparison measures arithmetic, not the rounding of the weights."""
    torch.manual_seed(seed)
    model = LLaMA(cfg)
    model.init_weights(std)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model.eval()


def logits_inputs(cfg, seq_len, target, seed=0):
    """Random tokens at PoSE positions: two chunks with a random skip, positions up to `target` (beyond the window)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen)
    positions = torch.from_numpy(skip_positions(seq_len, target, chunks=2, rng=np.random.default_rng(seed)))[None]
    return tokens, positions


@torch.no_grad()
def logits_check(device, dtype=torch.bfloat16, scaling=None, attn_impl="sdpa", cfg=None, seq_len=1024, target=8192,
                 reference=None, seed=0):
    """Our logits on `device` in `dtype` against fp32 CPU logits of the same weights.

    Returns {"rel_err", "max_err" (max |diff| / max |ref|), "argmax" (fraction of positions whose top token agrees)}.
    `reference` (cfg -> fp32 CPU model) lets a test compare against a different model on purpose."""
    cfg = cfg or logits_config(scaling)
    tokens, positions = logits_inputs(cfg, seq_len, target, seed)
    ref_model = (reference or random_model)(cfg)
    ref = ref_model(tokens, positions)
    model = random_model(cfg).to(device=device, dtype=dtype)
    model.set_attn_impl(attn_impl)
    got = model(tokens.to(device), positions.to(device)).float().cpu()
    diff = (got - ref).abs()
    return dict(rel_err=rel_error(got, ref), max_err=(diff.max() / ref.abs().max()).item(),
                argmax=(got.argmax(-1) == ref.argmax(-1)).float().mean().item())


def fused_attention_check(device, dtype, backends=None, seq_len=1024, n_heads=4, n_kv_heads=2, head_dim=128):
    """Whether causal GQA attention (model.py's SDPA call) runs on a fused kernel (flash, memory-efficient or cuDNN)
    on `device` in `dtype`, i.e. without falling back to the math kernel, whose T x T scores make long contexts run
    out of memory. Returns {"ok", "error"}."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = backends or [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    q = torch.randn(1, n_heads, seq_len, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, n_kv_heads, seq_len, head_dim, device=device, dtype=dtype) for _ in range(2))
    try:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_heads != n_heads)
    except RuntimeError as e:
        return dict(ok=False, error=" ".join(str(e).split())[:300])
    return dict(ok=True, error="")


def flash_attn_available():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def section_logits(device, config=logits_config, seq_len=1024, target=8192):
    """Rows of section 1; config(scaling) -> ModelConfig and the sizes are for tests (tiny, on the CPU)."""
    sizes = dict(seq_len=seq_len, target=target)
    rows = []
    impls = ["sdpa"] + (["flash"] if flash_attn_available() else [])
    if "flash" not in impls:
        rows.append(row("1 logits", "flash-attn", "not installed", status="skip"))
    # fp32 on the GPU: the same arithmetic as the CPU up to summation order (TF32, if something enabled it, fails)
    r = logits_check(device, torch.float32, cfg=config(ROPE_CASES["yarn"]), **sizes)
    rows.append(row("1 logits", "fp32 sdpa, rope yarn, GQA 4q/2kv", f"rel err {r['rel_err']:.2e}", f"<= {FP32_TOL:g}",
                    "pass" if r["rel_err"] <= FP32_TOL else "FAIL", **r))
    # without a fused kernel, SDPA computes T x T scores: training and evaluation at long context run out of memory
    for dtype, needed in ((torch.bfloat16, True), (torch.float32, False)):
        f = fused_attention_check(device, dtype)
        name = str(dtype).removeprefix("torch.")
        rows.append(row("1 logits", f"fused SDPA kernel for causal GQA in {name} (no T x T math fallback)",
                        "yes" if f["ok"] else f"no: {f['error']}",
                        "needed: training and evaluation run in bf16" if needed else
                        "fp32 long-context evaluation of GQA models needs it",
                        ("pass" if f["ok"] else "FAIL") if needed else "info", **f))
    for name, scaling in ROPE_CASES.items():
        # the same model in bf16 on the CPU: the size of a bf16 error on this model, for context
        cpu_bf16 = logits_check("cpu", torch.bfloat16, cfg=config(scaling), **sizes)
        for impl in impls:
            r = logits_check(device, torch.bfloat16, cfg=config(scaling), attn_impl=impl, **sizes)
            ok = r["rel_err"] <= LOGITS_TOL
            log(f"logits rope={name} attn={impl}: rel err {r['rel_err']:.2e} (CPU bf16 {cpu_bf16['rel_err']:.2e})")
            rows.append(row("1 logits", f"bf16 {impl}, rope {name}, GQA 4q/2kv, positions to 8x window",
                            f"rel err {r['rel_err']:.2e} (max {r['max_err']:.1e}, argmax {r['argmax']:.3f})",
                            f"<= {LOGITS_TOL:g} (CPU bf16: {cpu_bf16['rel_err']:.2e})",
                            "pass" if ok else "FAIL", **r, cpu_bf16=cpu_bf16))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 2. train.py under torchrun: bf16 on the GPU vs fp32 on the CPU, and kill -9 + --resume

def train_command(out, model=cli.BUNDLED_MODEL, data=cli.BUNDLED_TRAIN, precision="bf16", checkpointing=True, steps=24,
                  save_every=4, train_len=256, target=1024, batch=16, micro_batch=8, lr=2e-4, resume=False):
    """torchrun with one process running train.py. Every recipe flag is given, so that defaults do not matter:
    PoSE 256 -> 1024 with YaRN, 2 micro-steps of accumulation per step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", TRAIN,
           "--model", model, "--data", data, "--out", out, "--target", target, "--train-len", train_len,
           "--method", "pose", "--rope", "yarn", "--steps", steps, "--batch-size", batch,
           "--micro-batch-size", micro_batch, "--lr", lr, "--warmup", 2, "--seed", 0, "--save-every", save_every,
           "--precision", precision, "--grad-checkpointing" if checkpointing else "--no-grad-checkpointing"]
    return [str(c) for c in cmd + (["--resume"] if resume else [])]


def train_env(device, cache):
    """The environment of a train.py run: CUDA_VISIBLE_DEVICES="" hides the GPU for the CPU runs."""
    env = dict(os.environ, POSE_CACHE=cache)
    if torch.device(device).type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_command(cmd, env, what, timeout=600):
    log(f"{what}: {' '.join(cmd[3:])}")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{what} failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}")
    return out


def read_train_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare_losses(reference, other, rtol):
    """Step-by-step loss comparison of two train.py logs (lists of dicts): same steps, |a - b| <= rtol |a|."""
    steps_ref, steps_other = [e["step"] for e in reference], [e["step"] for e in other]
    if steps_ref != steps_other:
        return dict(ok=False, reason=f"steps differ: {steps_ref} vs {steps_other}", max_rel=math.inf,
                    identical=False)
    rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(reference, other)]
    max_rel = max(rel, default=0.0)
    lr_ok = all(a["lr"] == b["lr"] and a["tokens"] == b["tokens"] for a, b in zip(reference, other))
    return dict(ok=max_rel <= rtol and lr_ok and len(rel) > 0, max_rel=max_rel, steps=len(rel), identical=max_rel == 0,
                reason="" if lr_ok else "lr or token counts differ")


def compare_weights(dir_a, dir_b, rtol):
    """Final HF weights of two runs: max over tensors of ||a - b|| / ||a||."""
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (dir_a, dir_b))
    if a.keys() != b.keys():
        return dict(ok=False, max_rel=math.inf, identical=False, reason="tensor names differ")
    rel = {k: rel_error(b[k], a[k]) for k in a}
    worst = max(rel, key=rel.get)
    identical = all(torch.equal(a[k], b[k]) for k in a)
    return dict(ok=rel[worst] <= rtol, max_rel=rel[worst], worst=worst, identical=identical, reason="")


def process_tree(pid):
    """pid and all its descendants (from /proc): torchrun starts its workers in their own sessions, so killing the
    launcher's process group would leave the training process running."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_tree(pid):
    """SIGKILL the training process first (the crash), then its launcher."""
    for p in reversed(process_tree(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def completed_checkpoints(out):
    """Steps of the complete checkpoints in a train.py --out (train.py renames step_N.tmp to step_N when done)."""
    root = os.path.join(out, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())


def last_logged_step(out):
    try:
        return read_train_log(out)[-1]["step"]
    except (OSError, IndexError, ValueError):  # no log yet, or a line being written
        return 0


def run_and_kill(cmd, env, out, steps, timeout=600, poll=0.002):
    """Start cmd; SIGKILL it and its workers once a checkpoint is complete and a later step is logged, before the
    last step. Returns the last step logged before the kill; raises if the run ended first."""
    log(f"run to kill: {' '.join(cmd[3:])}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "..", os.path.basename(out) + ".stderr.txt"), "w+") as stderr:
        # a file, not a pipe: nobody reads a pipe while we poll, and a full pipe would block the run
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and proc.poll() is None:
                done, step = completed_checkpoints(out), last_logged_step(out)
                if done and done[0] < step < steps:
                    kill_tree(proc.pid)
                    proc.wait()
                    return step
                time.sleep(poll)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
        stderr.seek(0)
        tail = stderr.read().strip()[-500:]
    raise RuntimeError(f"the run ended (exit {proc.returncode}) before it could be killed after a checkpoint: "
                       f"give it more steps. {tail}")


def train_check(device, out, model=cli.BUNDLED_MODEL, data=cli.BUNDLED_TRAIN, steps=24, save_every=4,
                compare_steps=TRAIN_COMPARE_STEPS, **recipe):
    """bf16 + activation checkpointing on `device` against fp32 on the CPU (the first compare_steps steps), then
    kill -9 + --resume on `device` against the uninterrupted run. Returns result rows. The steps leave time to kill
    the run between its first checkpoint and its end."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cache = os.path.join(out, "cache")
    dev = torch.device(device)
    kw = dict(model=model, data=data, steps=steps, save_every=save_every, **recipe)
    runs = {name: os.path.join(out, name) for name in ("straight", "cpu_fp32", "killed")}

    run_command(train_command(runs["straight"], precision="bf16", checkpointing=True, **kw), train_env(dev, cache),
                f"train.py on {dev.type}, bf16 + checkpointing")
    run_command(train_command(runs["cpu_fp32"], precision="fp32", checkpointing=False, **kw),
                train_env("cpu", cache), "train.py on the CPU, fp32 (GPU hidden)")
    env = train_env(dev, cache)
    killed_at = run_and_kill(train_command(runs["killed"], **kw), env, runs["killed"], steps)
    log(f"killed after step {killed_at}; resuming")
    run_command(train_command(runs["killed"], resume=True, **kw), env, "train.py --resume")

    straight, cpu, resumed = (read_train_log(runs[n]) for n in ("straight", "cpu_fp32", "killed"))
    with open(os.path.join(runs["straight"], "args.json")) as f:
        ran = json.load(f)
    rows = []
    backend = "NCCL" if dev.type == "cuda" else "gloo"
    path_ok = ran["precision"] == "bf16" and ran["grad_checkpointing"] is True
    rows.append(row("2 train", f"torchrun train.py on {dev.type}: FSDP2 over {backend}, precision / checkpointing",
                    f"{ran['precision']} / {ran['grad_checkpointing']}, peak {straight[-1].get('peak_mem_gb')} GB",
                    "bf16 / True", "pass" if path_ok else "FAIL"))
    c = compare_losses(cpu[:compare_steps], straight[:compare_steps], TRAIN_LOSS_RTOL)
    every = compare_losses(cpu, straight, math.inf)["max_rel"]
    rows.append(row("2 train", f"losses of the first {c.get('steps', 0)} steps: bf16 {dev.type} vs fp32 CPU",
                    f"max rel diff {c['max_rel']:.2e} (all {len(straight)} steps: {every:.2e})",
                    f"<= {TRAIN_LOSS_RTOL:g}", "pass" if c["ok"] else "FAIL", **c, all_steps_max_rel=every,
                    cpu=[e["loss"] for e in cpu], device=[e["loss"] for e in straight]))
    c = compare_losses(straight, resumed, RESUME_RTOL)
    rows.append(row("2 train", f"kill -9 after step {killed_at}, --resume: log losses vs uninterrupted",
                    f"max rel diff {c['max_rel']:.2e}{' (identical)' if c['identical'] else ''}",
                    f"<= {RESUME_RTOL:g}", "pass" if c["ok"] else "FAIL", killed_at=killed_at, **c))
    w = compare_weights(runs["straight"], runs["killed"], RESUME_RTOL)
    rows.append(row("2 train", "kill -9, --resume: final weights vs uninterrupted",
                    f"max rel diff {w['max_rel']:.2e}{' (identical)' if w['identical'] else ''}",
                    f"<= {RESUME_RTOL:g}", "pass" if w["ok"] else "FAIL", **w))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 3./4. memory and speed at LLaMA-7B's layer shape: bench.py's sections of those names, turned into rows

STATE = {"weights": "fp32 weights", "gradients": "fp32 gradients", "adamw": "AdamW state"}  # bytes x parameters
ALLOCATED = dict(STATE, working="forward + backward peak above weights, gradients and AdamW state",
                 peak="peak of the step")


def run_bench(section, out, device, layers, flags=()):
    """`python bench.py SECTION --device DEVICE --layers ... --json OUT/bench_SECTION.json FLAGS`, which measures
    each layer count in a fresh process (an empty CUDA allocator); returns its JSON. flags: more of bench.py's (the
    tests' tiny sizes)."""
    path = os.path.join(out, f"bench_{section}.json")
    cmd = [sys.executable, BENCH, section, "--device", str(device), "--layers", *map(str, layers), "--json", path,
           *flags]
    run_command(cmd, dict(os.environ), f"bench.py {section}", timeout=1800)
    with open(path) as f:
        return json.load(f)


def ktokens(n):
    """32768 -> "32k"; counts that are not whole multiples of 1024 as they are."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def extrapolate(points, n):
    """The value at n of the straight line through two (layers, value) points: per-layer cost plus a fixed part."""
    (x1, y1), (x2, y2) = sorted(points)[:1] + sorted(points)[-1:]
    slope = (y2 - y1) / (x2 - x1)
    return y2 + slope * (n - x2), slope


def plan_at(run, layers, world):
    """memory.py's plan (Plan.parts, bytes) of a bench.py memory run's model and settings with `layers` layers on
    `world` GPUs, accumulating gradients over micro-steps as the paper's recipe does (64 examples per step)."""
    s = run["settings"]
    cfg = ModelConfig(**dict(run["config"], n_layers=layers))
    return memory.plan(cfg, world, s["micro_batch_size"], s["seq_len"], s["precision"], s["grad_checkpointing"]).parts()


def memory_rows(result, layers=32, world=PLAN_WORLD):
    """Rows from bench.py memory's JSON (two or more layer counts): the weights, gradients and AdamW state counted
    tensor by tensor, which must equal memory.py's plan to the byte; on a GPU, the same three read from the allocator
    (within MEMORY_EXACT_RTOL), what a step adds to them and its peak (beside the plan, for information), each at
    every layer count and on the straight line through them at `layers` (LLaMA-7B's 32), LLaMA-7B per GPU on `world`
    GPUs, and the evaluation windows."""
    runs = sorted(result["runs"], key=lambda r: r["layers"])
    rows = []
    for key, name in STATE.items():
        points = [(r["layers"], r["counted"][key], r["plan"][key]) for r in runs]
        rows.append(row("3 memory", f"{name}, counted tensor by tensor",
                        ", ".join(f"{n} layers {counted / GB:.3f} GB" for n, counted, _ in points),
                        "memory.py's plan, to the byte", "pass" if all(c == p for _, c, p in points) else "FAIL",
                        points=points))
    if runs[0]["allocated"] is None:  # the CPU: no allocator counters
        return rows + eval_rows(runs, layers)
    planned, at = plan_at(runs[-1], layers, 1), {}
    for key, name in ALLOCATED.items():
        points = [(r["layers"], r["allocated"][key] / GB) for r in runs]
        ratios = [r["allocated"][key] / r["plan"][key] for r in runs]
        at[key], slope = extrapolate(points, layers)
        status = "info"
        if key in STATE:  # 4 bytes per parameter for the weights and for the gradients, 8 for AdamW's two moments
            status = "pass" if all(abs(q - 1) <= MEMORY_EXACT_RTOL for q in ratios) else "FAIL"
        rows.append(row("3 memory", f"{name}, allocator",
                        ", ".join(f"{n} layers {v:.2f}" for n, v in points) + f"; {slope:.3f}/layer; {layers} layers "
                        f"{at[key]:.1f} GB", f"plan: ratio {', '.join(f'{q:.2f}' for q in ratios)}; {layers} layers "
                        f"{planned[key] / GB:.1f} GB, ratio {at[key] * GB / planned[key]:.2f}", status, points=points,
                        ratios=ratios, per_layer=slope, extrapolated=at[key], planned_gb=planned[key] / GB))
    # per GPU of `world`: FSDP divides the fp32 state by world, the rest stays whole
    optimizer, _ = extrapolate([(r["layers"], r["allocated"]["optimizer"] / GB) for r in runs], layers)
    per_gpu = max((at["weights"] + at["gradients"] + at["adamw"]) / world + at["working"], optimizer / world)
    plan_world = plan_at(runs[-1], layers, world)["peak"] / GB
    rows.append(row("3 memory", f"LLaMA-7B per GPU at {world} GPUs, from the {layers}-layer values (fp32 state / "
                    f"{world} + the rest)", f"{per_gpu:.1f} GB", f"plan (train.py --dry-run --world {world}) "
                    f"{plan_world:.1f} GB, ratio {per_gpu / plan_world:.2f}", per_gpu_gb=per_gpu, planned_gb=plan_world))
    return rows + eval_rows(runs, layers)


def eval_rows(runs, layers):
    """Rows of the evaluation windows: a window that ran out of memory fails; the peaks are reported, with the
    straight-line value at `layers` and the weights' share of it."""
    rows = []
    for ctx in sorted({w["ctx"] for r in runs for w in r["eval"]}):
        windows = [(r["layers"], w) for r in runs for w in r["eval"] if w["ctx"] == ctx]
        what = f"eval window of {ktokens(ctx)} tokens, {windows[0][1]['dtype']}"
        rows += [row("3 memory", f"{what}, {n} layers", "out of memory", "fits", "FAIL", **w)
                 for n, w in windows if "error" in w]
        measured = [(n, w) for n, w in windows if w["peak"] is not None]
        if len(measured) >= 2:
            points = [(n, w["peak"] / GB) for n, w in measured]
            value, slope = extrapolate(points, layers)
            weights, _ = extrapolate([(n, w["weights"] / GB) for n, w in measured], layers)
            rows.append(row("3 memory", f"{what}: peak", ", ".join(f"{n} layers {v:.2f}" for n, v in points)
                            + f"; {slope:.3f}/layer; {layers} layers {value:.1f} GB",
                            f"of which the weights: {weights:.1f} GB", points=points, extrapolated=value))
    return rows


def speed_rows(result):
    """Rows from bench.py speed's JSON: each training step's time, tokens/s and MFU (above 1 is impossible: a FLOP
    count or timing mistake), full-length / PoSE, and ours vs transformers (their losses must agree)."""
    peak, rows = result["peak_tflops"], []
    for r in result["runs"]:
        setup = f"{r['precision']} FSDP2" + (" + checkpointing" if r["grad_checkpointing"] else "")
        for method, m in r["steps"].items():
            what = f"PoSE {ktokens(m['seq_len'])} tokens, positions to {ktokens(r['target'])}" if method == "pose" \
                else f"full-length {ktokens(m['seq_len'])} tokens"
            u = m["mfu"]
            rows.append(row("4 speed", f"train.py's optimizer step, {r['layers']} layers of LLaMA-7B, {setup}: {what}",
                            f"{m['seconds']:.3f} s, {m['tokens_per_s']:.0f} tokens/s, "
                            f"{m['flops'] / m['seconds'] / 1e12:.0f} TFLOP/s" + (f", MFU {u:.2f}" if u else ""),
                            f"peak {peak:g} TFLOP/s" if peak else "unknown GPU peak (--peak-tflops)",
                            "FAIL" if u and u > 1 else "info", **m))
        pose, full = r["steps"]["pose"], r["steps"]["full"]
        rows.append(row("4 speed", f"full-length {ktokens(full['seq_len'])} / PoSE {ktokens(pose['seq_len'])}: time "
                        "per example", f"{full['seconds'] / pose['seconds']:.1f}x",
                        f"{full['seq_len'] // pose['seq_len']}x tokens; attention grows with T^2"))
        v = r["versus"]
        loss_rel = abs(v["loss_ours"] - v["loss_transformers"]) / abs(v["loss_transformers"])
        rows.append(row("4 speed", f"ours / transformers sdpa: forward + backward, {v['seq_len']} tokens, "
                        f"{v['dtype']}, {r['layers']} layers, same weights", f"{v['ratio']:.2f} "
                        f"({v['ours_s'] * 1e3:.0f} ms vs {v['transformers_s'] * 1e3:.0f} ms)",
                        f"losses agree: rel diff {loss_rel:.1e} <= {TRAIN_LOSS_RTOL}",
                        "pass" if loss_rel <= TRAIN_LOSS_RTOL else "FAIL", **v))
    return rows


def section_memory(out, layer_counts, device="cuda", flags=()):
    result = run_bench("memory", out, device, layer_counts, flags)
    return memory_rows(result), result


def section_speed(out, layers, peak_tflops=None, device="cuda", flags=()):
    flags = [*flags, *(["--peak-tflops", str(peak_tflops)] if peak_tflops else [])]
    result = run_bench("speed", out, device, [layers], flags)
    return speed_rows(result), result


# ----------------------------------------------------------------------------------------------------------------------
# 5. passkey: KV cache against re-reading the sequence

def passkey_config(vocab=4096, window=2048, factor=16.0, dim=256):
    """A small random GQA model whose YaRN scaling covers 32k tokens."""
    return logits_config({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": window},
                         vocab=vocab, dim=dim, n_layers=4, n_heads=4, n_kv_heads=2, window=window)


class RecordingDecoder:
    """A passkey.Decoder that records the (ids read so far, next-token logits) of every step."""

    def __init__(self, decoder):
        self.decoder, self.ids, self.steps = decoder, [], []

    def start(self, ids):
        self.ids = list(ids)
        return self._record(self.decoder.start(ids))

    def step(self, token):
        self.ids.append(int(token))
        return self._record(self.decoder.step(token))

    def _record(self, logits):
        self.steps.append((list(self.ids), logits.float().cpu()))
        return logits


def decode_recorded(model, prompt_ids, tokenizer, use_cache, max_new_tokens=8):
    """passkey.greedy_answer through passkey.Decoder, with or without the KV cache; returns (answer, steps)."""
    decoder = RecordingDecoder(passkey.Decoder(model, use_cache=use_cache, max_new_tokens=max_new_tokens))
    answer = passkey.greedy_answer(decoder, prompt_ids, tokenizer, max_new_tokens)
    return answer, decoder.steps


def compare_decodes(cached, full, tol=LOGITS_TOL):
    """Two greedy decodes of one prompt, each a list of (ids, logits) steps. Returns (same answer, near tie, max rel
    logits error). They read the same ids until their first different choice. A different choice is a near tie when
    the re-read's logits of the two tokens are closer than the tolerated error of a typical logit (tol x their rms):
    then rounding, not a cache mistake, decided it; a broken cache shows as a logits error above tol anyway."""
    errors, near_tie = [], False
    for (ids_c, lc), (ids_f, lf) in zip(cached, full):
        if ids_c != ids_f:
            break
        errors.append(rel_error(lc, lf))
        a_c, a_f = int(lc.argmax()), int(lf.argmax())
        if a_c != a_f:
            near_tie = bool(lf[a_f] - lf[a_c] <= tol * lf.double().pow(2).mean().sqrt())
            break
    same = [ids for ids, _ in cached] == [ids for ids, _ in full]
    return same, near_tie, max(errors, default=0.0)


def passkey_check(device, model, tokenizer, lengths, trials=3, seed=0, tol=LOGITS_TOL, max_new_tokens=8):
    """Passkey decoding with the KV cache vs without, per length. Prompts as passkey.run_passkey draws them."""
    model = model.to(device)
    model_calls = []
    hidden_states = model.hidden_states

    def counting(tokens, positions=None, cache=None):  # records how many tokens each forward pass reads
        model_calls.append((tokens.shape[1], cache is not None))
        return hidden_states(tokens, positions, cache)

    model.hidden_states = counting
    rng = np.random.default_rng(seed)
    results = []
    try:
        for length in lengths:
            r = dict(length=length, trials=trials, same=0, near_ties=0, max_rel_err=0.0, cache_steps=0,
                     answers=[])
            for _ in range(trials):
                key = int(rng.integers(10000, 100000))
                prompt = passkey.make_prompt(tokenizer, length, key, depth=rng.random())
                model_calls.clear()
                answer_c, cached = decode_recorded(model, prompt.ids, tokenizer, True, max_new_tokens)
                # with the cache, the prompt is read once and every later step reads one token
                r["cache_steps"] += sum(1 for n, c in model_calls[1:] if n == 1 and c)
                cache_ok = len(model_calls) == len(cached) and all(n == 1 and c for n, c in model_calls[1:])
                answer_f, full = decode_recorded(model, prompt.ids, tokenizer, False, max_new_tokens)
                same, near_tie, err = compare_decodes(cached, full, tol)
                r["same"] += int(same and answer_c == answer_f)
                r["near_ties"] += int(not same and near_tie)
                r["max_rel_err"] = max(r["max_rel_err"], err)
                r["cache_used"] = r.get("cache_used", True) and cache_ok
                r["answers"].append(dict(key=key, prompt_tokens=len(prompt.ids), cached=answer_c, full=answer_f))
            r["ok"] = (r["same"] + r["near_ties"] == trials and r["max_rel_err"] <= tol and r["cache_used"])
            results.append(r)
    finally:
        del model.hidden_states  # the class's method again
    return results


def section_passkey(device, lengths=(16384, 32768), trials=3):
    tokenizer = Tokenizer(os.path.join(cli.BUNDLED_MODEL, "tokenizer.model"))
    model = random_model(passkey_config(vocab=tokenizer.vocab_size)).to(device=device, dtype=torch.bfloat16)
    rows = []
    for r in passkey_check(device, model, tokenizer, lengths, trials):
        log(f"passkey {r['length']}: {r['same']}/{r['trials']} same answers, {r['near_ties']} near ties, "
            f"logits rel err {r['max_rel_err']:.1e}")
        rows.append(row("5 passkey", f"{r['length']} tokens, bf16, GQA: KV cache vs re-reading, {r['trials']} trials",
                        f"{r['same']}/{r['trials']} same answers ({r['near_ties']} near ties), logits rel err "
                        f"{r['max_rel_err']:.1e}", f"all same or near ties; <= {LOGITS_TOL:g}",
                        "pass" if r["ok"] else "FAIL", **r))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# output and main

def markdown(rows, header):
    lines = [header, "", "| section | check | measured | reference / limit | status |",
             "| --- | --- | --- | --- | --- |"]

    def cell(text):  # an error message may hold newlines or pipes
        return " ".join(str(text).split()).replace("|", "\\|")

    for r in rows:
        lines.append("| " + " | ".join(cell(r[k]) for k in ("section", "check", "value", "reference", "status")) + " |")
    return "\n".join(lines) + "\n"


def write_results(out, rows, meta):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2, default=float)
    header = (f"# gpu_check on {meta['device']} (torch {meta['torch']}, CUDA {meta['cuda']}, flash-attn "
              f"{'yes' if meta['flash_attn'] else 'no'}), {meta['seconds']:.0f} s")
    text = markdown(rows, header)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


SECTIONS = {"logits": "1 logits", "train": "2 train", "memory": "3 memory", "speed": "4 speed", "passkey": "5 passkey"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("out", "gpu_check"), help="output directory (default out/gpu_check)")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8],
                   help="layer counts of the LLaMA-7B-shaped models for memory (two or more) and speed (the largest)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run these sections only")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's bf16 dense peak, if not in bench.py's PEAK_TFLOPS")
    args = p.parse_args(argv)
    if "memory" in args.only and len(set(args.layers)) < 2:
        p.error("--layers needs two different layer counts (a straight line through them gives 32 layers)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing checked (run it on a machine with a GPU)")
        return 0
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = torch.device("cuda")
    t_start = time.time()
    rows, raw, seconds = [], {}, {}
    steps = {
        "logits": lambda: section_logits(device),
        "train": lambda: train_check(device, os.path.join(out, "train")),
        "memory": lambda: section_memory(out, sorted(set(args.layers))),
        "speed": lambda: section_speed(out, max(args.layers), args.peak_tflops),
        "passkey": lambda: section_passkey(device),
    }
    for name in SECTIONS:
        if name not in args.only:
            continue
        t0 = time.time()
        log(f"section {name}")
        try:
            result = steps[name]()
            if isinstance(result, tuple):
                result, raw[name] = result
            rows += result
        except Exception as e:  # a section that cannot finish is a failed check; the others still run
            rows.append(row(SECTIONS[name], "section ran", f"{type(e).__name__}: {str(e).strip()[-600:]}",
                            status="FAIL"))
        seconds[name] = round(time.time() - t0, 1)
        log(f"section {name}: {seconds[name]:.0f} s")
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
                flash_attn=flash_attn_available(), seconds=time.time() - t_start, section_seconds=seconds,
                layers=args.layers, raw=raw)
    print(write_results(out, rows, meta))
    failed = [r for r in rows if r["status"] == "FAIL"]
    print(f"{len(failed)} failed check(s); results in {out}/results.md" if failed else
          f"all checks passed; results in {out}/results.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
