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
  3. memory    torch.cuda.max_memory_allocated of training steps (train.py's FSDP2 + bf16 + checkpointing setup,
               2048 tokens) and of evaluation windows (bf16, model.loss under no_grad, 32k and 128k tokens) for
               models with LLaMA-7B's layer shape and two layer counts; a straight line through the two gives each
               quantity at 32 layers, compared row by row with memory.py's plan for one GPU (train.py --dry-run).
  4. speed     tokens/s and model FLOPs utilization of a training step, PoSE (2048 tokens, positions up to 16k) vs
               full-length (16k tokens), and our training step vs transformers' LlamaForCausalLM (sdpa) on the same
               weights, timed alternately.
  5. passkey   passkey retrieval at 16k and 32k tokens on CUDA in bf16 with the KV cache against re-reading the whole
               sequence at each step: the same answers, and the same logits within LOGITS_TOL at every answer step.

Memory and speed run in fresh worker processes (this script with --worker), one per model size, so that each
measurement starts from an empty CUDA allocator.
"""
import argparse
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import memory  # noqa: E402
import passkey  # noqa: E402
import train  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import LLaMA, ModelConfig  # noqa: E402
from pose import skip_positions  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
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

# bf16 dense (no sparsity) tensor-core peaks, TFLOP/s per GPU, from NVIDIA's data sheets; the first match wins.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))

PLAN_WORLD = 8  # the README's setting: LLaMA-7B on 8 GPUs
README_EVAL_GB = {32768: 13.5 + 2.2 + 0.27, 131072: 25.0}  # "Evaluation of a 7B model in bf16 on one 80 GB GPU"


def log(message):
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def row(section, check, value, reference="", status="info", **data):
    """One line of the result table; status is pass, FAIL, info or skip."""
    return dict(section=section, check=check, value=value, reference=reference, status=status, data=data)


def rel_error(got, ref):
    """||got - ref|| / ||ref|| over all elements, in fp64."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
# 3./4. memory and speed at LLaMA-7B's layer shape (run in worker processes)

def seven_b_config(n_layers, scaling=None, vocab=32000):
    """LLaMA-7B's shape (dim 4096, 32 heads, SwiGLU 11008, vocab 32000, untied) with n_layers layers."""
    return ModelConfig(vocab_size=vocab, dim=4096, n_layers=n_layers, n_heads=32, n_kv_heads=32,
                       intermediate_size=11008, max_position_embeddings=2048, rope_scaling=scaling)


def param_count(cfg):
    """Parameters of a ModelConfig, by arithmetic (LLaMA-7B: 6,738,415,616)."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.dim * cfg.intermediate_size
    block = attn + mlp + 2 * cfg.dim
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * block + embeddings + cfg.dim


def train_flops(cfg, batch, seq_len):
    """Model FLOPs of one training step (forward + backward, no recomputation counted): 6 x the parameters that enter
    a matrix product (all but the input embedding, a lookup) x tokens, plus causal attention: per layer and sequence
    QK^T and PV are 2 x 2 T^2 d in the forward pass, halved by the causal mask, times 3 for forward + backward."""
    matmul_params = param_count(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    dense = 6 * matmul_params * batch * seq_len
    attention = 6 * cfg.n_layers * batch * seq_len ** 2 * cfg.n_heads * cfg.head_dim
    return dense + attention


def peak_tflops(device_name, override=None):
    """The bf16 dense peak assumed for a GPU model (TFLOP/s), or None when unknown."""
    if override:
        return override
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(flops, seconds, peak):
    """Model FLOPs utilization: achieved FLOP/s over the peak (TFLOP/s)."""
    return None if not peak else flops / seconds / (peak * 1e12)


def ktokens(n):
    """32768 -> "32k"; counts that are not whole multiples of 1024 as they are."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def extrapolate(points, n):
    """The value at n of the straight line through two (layers, value) points: per-layer cost plus a fixed part."""
    (x1, y1), (x2, y2) = sorted(points)[:1] + sorted(points)[-1:]
    slope = (y2 - y1) / (x2 - x1)
    return y2 + slope * (n - x2), slope


class Memory:
    """torch.cuda's allocator counters on a GPU; zeros on the CPU (where the code paths still run in tests)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def allocated(self):
        synchronize(self.device)
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def peak(self):
        synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def reset_peak(self):
        if self.cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)


def fsdp_model(cfg, device, precision="bf16", std=0.02):
    """The model as train.py builds it (train.shard_model on a meta-device skeleton: FSDP2 per block then the root,
    fp32 master weights, compute in `precision`), with fresh weights and activation checkpointing, in a one-process
    group (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # NCCL binds to the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    with torch.device("meta"):
        model = LLaMA(cfg)
    train.shard_model(model, init_device_mesh(device.type, (1,)), device, precision)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights(std)
    model.gradient_checkpointing = True
    return model.train()


def training_batch(cfg, batch, seq_len, target, method, device, seed=0):
    """Random tokens; PoSE positions (2 chunks, skips up to target) or plain 0..T-1 for full-length."""
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch, seq_len)))
    if method == "pose":
        positions = torch.from_numpy(np.stack([skip_positions(seq_len, target, 2, rng=rng) for _ in range(batch)]))
    else:
        positions = torch.arange(seq_len).expand(batch, seq_len)
    targets = torch.full_like(tokens, -100)
    targets[:, :-1] = tokens[:, 1:]
    return tokens.to(device), targets.to(device), positions.to(device)


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def train_step(model, optimizer, batch):
    """One optimizer step of train.py (train.update) on one micro-batch: loss, backward, clip at 1.0, AdamW."""
    return train.update(model, optimizer, 1e-5, [batch], 1, None, 0.0, 1.0, batch[0].device)[0]


def measure_training(device, cfg, seq_len=2048, micro_batch=1, steps=3, precision="bf16"):
    """Allocator readings (bytes) through `steps` training steps of train.py's setup at seq_len tokens.

    weights: after the model is built; per step: at its start, after forward, after backward (gradients complete),
    after AdamW (its state exists), after zero_grad, and the peaks of forward+backward and of the optimizer step."""
    mem = Memory(device)
    model = fsdp_model(cfg, device, precision)
    optimizer = optimizer_for(model)
    weights = mem.allocated()
    batch = training_batch(cfg, micro_batch, seq_len, seq_len * 8, "pose", device)
    records = []
    for _ in range(steps):
        mem.reset_peak()
        start = mem.allocated()
        loss = model.loss(*batch[:2], batch[2])
        after_forward = mem.allocated()
        loss.backward()
        after_backward = mem.allocated()
        peak_forward_backward = mem.peak()
        mem.reset_peak()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        after_optimizer = mem.allocated()
        optimizer.zero_grad(set_to_none=True)
        records.append(dict(start=start, after_forward=after_forward, after_backward=after_backward,
                            after_optimizer=after_optimizer, after_zero_grad=mem.allocated(),
                            peak_forward_backward=peak_forward_backward, peak_optimizer=mem.peak(),
                            loss=loss.item()))
    params = sum(p.numel() for p in model.parameters())
    del model, optimizer
    return dict(layers=cfg.n_layers, params=params, weights=weights, steps=records)


@torch.no_grad()
def measure_eval(device, cfg, ctxs, dtype=torch.bfloat16):
    """Peak memory (bytes) of model.loss over one window of each length in ctxs, weights in dtype, under no_grad,
    as evaluate.py computes a window."""
    mem = Memory(device)
    with torch.device("meta"):
        model = LLaMA(cfg).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights(0.02)
    model.eval()
    weights = mem.allocated()
    windows = []
    for ctx in ctxs:
        tokens, targets, _ = training_batch(cfg, 1, ctx, ctx, "full", device)
        mem.reset_peak()
        t0 = time.perf_counter()
        try:
            loss = model.loss(tokens, targets).item()
            synchronize(device)
            windows.append(dict(ctx=ctx, peak=mem.peak(), seconds=time.perf_counter() - t0, loss=loss))
        except torch.OutOfMemoryError as e:  # a finding (the README says it fits), not a crash of the section
            windows.append(dict(ctx=ctx, peak=None, error=str(e).splitlines()[0]))
        del tokens, targets
    del model
    return dict(layers=cfg.n_layers, weights=weights, windows=windows)


def time_steps(step, device, repeats, warmup=1):
    """Median wall time of step() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_pose_vs_full(device, cfg, train_len=2048, target=16384, repeats=3, precision="bf16"):
    """Seconds per optimizer step (train.py's setup) on one example: PoSE's train_len tokens with positions up to
    target, and full-length fine-tuning on target tokens."""
    model = fsdp_model(cfg, device, precision)
    optimizer = optimizer_for(model)
    out = {}
    for method, seq_len in (("pose", train_len), ("full", target)):
        batch = training_batch(cfg, 1, seq_len, target, method, device)
        seconds = time_steps(lambda: train_step(model, optimizer, batch), device, repeats)
        out[method] = dict(seq_len=seq_len, seconds=seconds, tokens_per_s=seq_len / seconds,
                           flops=train_flops(cfg, 1, seq_len))
        log(f"{cfg.n_layers} layers, {method} {seq_len} tokens: {seconds:.3f} s/step")
    del model, optimizer
    return out


def ours_vs_transformers(device, cfg, seq_len=2048, repeats=5, dtype=torch.bfloat16, workdir=None):
    """Forward + backward of the loss on one sequence, our LLaMA vs transformers' LlamaForCausalLM (sdpa) loaded from
    our save_pretrained, same weights in `dtype`, no checkpointing for either, timed alternately (so that clock or
    load changes hit both alike). Returns seconds, ratio ours / transformers and both losses (same computation)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = LLaMA(cfg).to(dtype)
    ours.to_empty(device=device)
    ours.init_weights(0.02)
    ours.train()
    tmp = tempfile.mkdtemp(dir=workdir)
    try:
        ours.save_pretrained(tmp, state_dict={k: v.cpu() for k, v in ours.state_dict().items()})
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        theirs = theirs.to(device=device, dtype=dtype).train()  # dtype again: transformers 4 reads torch_dtype
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens, targets, _ = training_batch(cfg, 1, seq_len, seq_len, "full", device)
    losses = {}

    def step_ours():
        loss = ours.loss(tokens, targets)
        loss.backward()
        ours.zero_grad(set_to_none=True)
        losses["ours"] = loss.detach()

    def step_theirs():
        loss = theirs(input_ids=tokens, labels=tokens, use_cache=False).loss  # shifts labels itself: same targets
        loss.backward()
        theirs.zero_grad(set_to_none=True)
        losses["transformers"] = loss.detach()

    for _ in range(2):
        step_ours(), step_theirs()
    times = {"ours": [], "transformers": []}
    for _ in range(repeats):
        for name, fn in (("ours", step_ours), ("transformers", step_theirs)):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    result = dict(seq_len=seq_len, ours_s=ours_s, transformers_s=theirs_s, ratio=ours_s / theirs_s,
                  loss_ours=losses["ours"].item(), loss_transformers=losses["transformers"].item())
    del ours, theirs
    return result


def release(device):
    """Free what the previous measurement left (FSDP's hooks form reference cycles) before the next one."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def worker(kind, layers, out_path, device="cuda", shape=seven_b_config, train_len=2048, target=16384,
           eval_ctxs=(32768, 131072)):
    """One measurement in this fresh process (a clean CUDA allocator); writes JSON to out_path. shape(n_layers,
    scaling) gives the model; the other arguments are the sizes (tests use tiny ones on the CPU)."""
    device = torch.device(device)
    factor = target / train_len
    if kind == "memory":
        # evaluation first: its plain bf16 model is freed at once, the FSDP training model needs the collector
        eval_factor = max(eval_ctxs) / train_len
        result = dict(eval=measure_eval(device, shape(layers, {"rope_type": "linear", "factor": eval_factor}),
                                        list(eval_ctxs)))
        release(device)
        result["train"] = measure_training(device, shape(layers, {"rope_type": "linear", "factor": factor}),
                                           seq_len=train_len)
    else:
        cfg = shape(layers, {"rope_type": "linear", "factor": factor})
        result = dict(steps=speed_pose_vs_full(device, cfg, train_len, target))
        release(device)
        result["versus"] = ours_vs_transformers(device, cfg, train_len, workdir=os.path.dirname(out_path),
                                                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_worker(kind, layers, out, timeout=600):
    path = os.path.join(out, f"worker_{kind}_{layers}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--layers", str(layers), "--out", path]
    t0 = time.time()
    log(f"{kind} worker, LLaMA-7B layer shape, {layers} layers")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"{kind} worker with {layers} layers failed: {res.stderr.strip()[-1500:]}")
    log(f"{kind} worker, {layers} layers: {time.time() - t0:.0f} s")
    with open(path) as f:
        return json.load(f)


def planned_train(micro_batch=1, world=1):
    """memory.py's plan of LLaMA-7B training at 2048 tokens per example on `world` GPUs (bf16, checkpointing,
    accumulating): what `train.py --dry-run` prints."""
    return memory.plan(seven_b_config(32, {"rope_type": "linear", "factor": 8.0}), world, micro_batch, 2048)


def planned_train_gb(micro_batch=1, world=1):
    """The plan's parts in GB, by the first words of their rows, and its "peak"."""
    plan = planned_train(micro_batch, world)
    parts = {key: plan.part(key) / GB for key in ("fp32 master", "fp32 gradients", "AdamW", "bf16 weights gathered",
                                                   "activations", "the loss")}
    return dict(parts, peak=plan.peak / GB)


def memory_rows(measured, micro_batch=1):
    """Result rows from memory worker results at two or more layer counts: each quantity at those counts, its cost per
    layer and the straight-line value at 32 layers, next to memory.py's plan of one GPU (train.py --dry-run)."""
    plan = planned_train_gb(micro_batch)
    series, oom = {}, []  # quantity -> [(layers, GB)]; windows that did not fit

    def add(name, layers, value):
        series.setdefault(name, []).append((layers, value / GB))

    for m in measured:
        t, L = m["train"], m["train"]["layers"]
        first, steady = t["steps"][0], t["steps"][-1]
        add("fp32 weights", L, t["weights"])
        add("fp32 gradients", L, first["after_backward"] - first["start"])
        add("AdamW state", L, first["after_zero_grad"] - t["weights"])
        add("held from forward to backward", L, steady["after_forward"] - steady["start"])
        add("peak of forward + backward", L, steady["peak_forward_backward"])
        add("peak of the optimizer step", L, steady["peak_optimizer"])
        add("forward + backward peak above weights, gradients and AdamW state", L, steady["peak_forward_backward"]
            - (steady["start"] + first["after_backward"] - first["start"]))
        for w in m["eval"]["windows"]:
            if w["peak"] is None:
                oom.append(row("3 memory", f"eval window of {ktokens(w['ctx'])} tokens, {m['eval']['layers']} layers",
                               "out of memory", "fits (README)", "FAIL", **w))
            else:
                add(f"eval window of {ktokens(w['ctx'])} tokens, bf16: peak", m["eval"]["layers"], w["peak"])
    sharded = plan["fp32 master"] + plan["fp32 gradients"] + plan["AdamW"]
    references = {  # (GB, what it is): the plan's rows, and the README's evaluation figures
        "fp32 weights": (plan["fp32 master"], "plan: fp32 master weights"),
        "fp32 gradients": (plan["fp32 gradients"], "plan: fp32 gradients"),
        "AdamW state": (plan["AdamW"], "plan: AdamW moments"),
        "held from forward to backward": (plan["activations"] + plan["bf16 weights gathered"],
                                          "plan: activations kept + gathered weights"),
        "peak of forward + backward": (plan["peak"], "plan: peak"),
        "peak of the optimizer step": (sharded + plan["fp32 master"], "plan: weights, gradients, AdamW, a copy"),
        "forward + backward peak above weights, gradients and AdamW state": (
            plan["peak"] - sharded, "plan: gathered weights, activations, loss"),
        "eval window of 32k tokens, bf16: peak": (README_EVAL_GB[32768], "README 13.5 + 2.2 + 0.27"),
        "eval window of 128k tokens, bf16: peak": (README_EVAL_GB[131072], "README about 25"),
    }
    rows, at32 = [], {}
    params = {m["train"]["layers"]: m["train"]["params"] for m in measured}
    for name, points in series.items():
        if len(points) < 2:
            continue
        value, slope = extrapolate(points, 32)
        at32[name] = value
        ref, ref_name = references.get(name, (None, ""))
        ratio = value / ref if ref else None
        status = "info"
        if name in ("fp32 weights", "fp32 gradients", "AdamW state"):
            # bytes per parameter are exact: 4 for the master weights and for the gradients, 8 for the two moments
            per_param = {"fp32 weights": 4, "fp32 gradients": 4, "AdamW state": 8}[name]
            want = [per_param * params[layers] / GB for layers, _ in points]
            ok = all(abs(v - w) <= MEMORY_EXACT_RTOL * w for (_, v), w in zip(points, want))
            status = "pass" if ok else "FAIL"
        shown = ", ".join(f"{layers} layers {v:.2f}" for layers, v in points)
        rows.append(row("3 memory", name, f"{shown}; {slope:.3f}/layer; 32 layers {value:.1f} GB",
                        f"{ref_name} {ref:.1f} GB, ratio {ratio:.2f}" if ref else "", status,
                        points=points, per_layer=slope, at_32_layers=value, planned_gb=ref))
    # the plan's per-GPU peak at 8 GPUs: FSDP divides the fp32 state by 8, the rest stays whole
    state = at32["fp32 weights"] + at32["fp32 gradients"] + at32["AdamW state"]
    per_gpu = max(state / PLAN_WORLD + at32["forward + backward peak above weights, gradients and AdamW state"],
                  at32["peak of the optimizer step"] / PLAN_WORLD)
    planned = planned_train_gb(micro_batch, PLAN_WORLD)["peak"]
    rows.append(row("3 memory", "LLaMA-7B per GPU at 8 GPUs, from the 32-layer values (fp32 state / 8 + the rest)",
                    f"{per_gpu:.1f} GB", f"plan (train.py --dry-run --world 8) {planned:.1f} GB, ratio "
                    f"{per_gpu / planned:.2f}", per_gpu_gb=per_gpu, planned_gb=planned))
    return rows + oom


def speed_rows(result, layers, peak):
    rows = []
    for method, r in result["steps"].items():
        u = mfu(r["flops"], r["seconds"], peak)
        what = "PoSE 2048 tokens, positions to 16k" if method == "pose" else "full-length 16384 tokens"
        rows.append(row("4 speed", f"training step, {layers} layers of LLaMA-7B, bf16 FSDP2 + checkpointing: {what}",
                        f"{r['seconds']:.3f} s, {r['tokens_per_s']:.0f} tokens/s, "
                        f"{r['flops'] / r['seconds'] / 1e12:.0f} TFLOP/s" + (f", MFU {u:.2f}" if u else ""),
                        f"peak {peak:g} TFLOP/s" if peak else "unknown GPU peak (--peak-tflops)",
                        "FAIL" if u and u > 1 else "info", mfu=u, **r))
    pose, full = result["steps"]["pose"], result["steps"]["full"]
    rows.append(row("4 speed", "full-length 16k / PoSE 2k: time per example",
                    f"{full['seconds'] / pose['seconds']:.1f}x", "8x tokens; attention grows with T^2"))
    v = result["versus"]
    loss_rel = abs(v["loss_ours"] - v["loss_transformers"]) / abs(v["loss_transformers"])
    rows.append(row("4 speed", f"ours / transformers sdpa: forward + backward, {v['seq_len']} tokens, bf16, "
                    f"{layers} layers, same weights", f"{v['ratio']:.2f} ({v['ours_s'] * 1e3:.0f} ms vs "
                    f"{v['transformers_s'] * 1e3:.0f} ms)",
                    f"losses agree: rel diff {loss_rel:.1e} <= {TRAIN_LOSS_RTOL}",
                    "pass" if loss_rel <= TRAIN_LOSS_RTOL else "FAIL", **v))
    return rows


def section_memory(out, layer_counts):
    measured = [run_worker("memory", n, out) for n in layer_counts]
    return memory_rows(measured), measured


def section_speed(out, layers, peak_override):
    result = run_worker("speed", layers, out)
    peak = peak_tflops(result["device"], peak_override)
    return speed_rows(result, layers, peak), result


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
    decoder = RecordingDecoder(passkey.Decoder(model, use_cache=use_cache))
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
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak, if not in the list")
    p.add_argument("--worker", choices=("memory", "speed"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and "memory" in args.only and len(set(args.layers)) < 2:
        p.error("--layers needs two different layer counts (a straight line through them gives 32 layers)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.layers[0], args.out)
        return 0
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
