"""Prove the CUDA path on one GPU (or several) in under 10 minutes, and measure memory and speed there.

    python scripts/gpu_check.py                      # writes out/gpu_check/results.json and results.md
    python scripts/gpu_check.py --out DIR --layers 4 8 --only logits train memory speed passkey compile
    python scripts/gpu_check.py --rehearse --out /tmp/rehearsal    # every section on the CPU at tiny sizes

Needs one CUDA GPU (H100 / H200 class: the memory section wants about 45 GB at --layers 4 8), PyTorch with CUDA,
transformers, sentencepiece, safetensors and tqdm; no network. flash-attn is used when it is installed. Without CUDA
it prints one line and exits 0; --rehearse runs every section on the CPU at tiny sizes instead (the GPU hidden), the
same functions and train.py / scripts/bench.py commands as the GPU run (about 3 minutes on a busy 2-core CPU). It exits 1
when a check fails. Every section is a function that takes a device, so tests/test_gpu_check.py runs the same code on
the CPU.

Sections (each prints its progress on stderr and adds rows to one table; each measured section has a row naming the
attention backend it used):
  1. logits    our model in bf16 on CUDA (SDPA, and flash-attn when importable) against fp32 CPU logits of the same
               weights: GQA, rope types none / linear / yarn / llama3 / dynamic, PoSE's skipped positions up to 8x the
               window. Relative error within LOGITS_TOL (the why is beside the constant).
  2. train     `torchrun train.py` on the bundled tiny model and books, bf16 with activation checkpointing, --replay
               none: FSDP2 over NCCL (gloo on the CPU). Its losses against the same run in fp32 on the CPU (GPU
               hidden). A second straight run of the same command measures the noise floor (kernel nondeterminism).
               The same run killed with SIGKILL after a checkpoint and resumed: log losses and final weights against
               the uninterrupted run, within NOISE_MULTIPLE x the floor. With N >= 2 GPUs (2 gloo processes on the
               CPU): N processes against 1, losses and final weights. A --cpu-offload run (N processes, else 1)
               against the plain run of the same processes. With one GPU the N-process rows say skipped, and why.
  3. memory    `scripts/bench.py memory` at LLaMA-7B's layer shape with two layer counts: train.py's own FSDP2 model, batches
               and optimizer steps (bf16, activation checkpointing, 2048 tokens per example), and evaluation windows
               of 32k and 128k tokens through evaluate.perplexity. The weights, gradients and AdamW state, counted
               tensor by tensor and read from the allocator, against lib/memory.py's plan of the same run (train.py
               --dry-run); the step's peak beside the plan; a straight line through the two layer counts gives each
               quantity at 32 layers, and LLaMA-7B per GPU at 8 GPUs beside `train.py --dry-run --world 8`.
  4. speed     `scripts/bench.py speed` at the larger layer count: tokens/s and model FLOPs utilization of train.py's optimizer
               step, PoSE (2048 tokens, positions up to 16k) vs full-length (16k tokens), and forward + backward of
               our model (its attention backend named) vs transformers' LlamaForCausalLM (sdpa) on the same weights,
               timed alternately.
  5. passkey   passkey retrieval at 16k and 32k tokens on CUDA in bf16 with the KV cache against re-reading the whole
               sequence at each step: the same answers, and the same logits within LOGITS_TOL at every answer step.
  6. compile   `train.py --compile` against eager, the same command otherwise: tokens/s of train.py's own step (from
               its log), the losses of the first steps (bf16, within TRAIN_LOSS_RTOL), the recompilations that
               TORCH_LOGS=recompiles reports. Twice: the bundled tiny model with activation checkpointing, and 2
               layers of LLaMA-7B's shape (fresh weights, 2048 tokens, no checkpointing, as the plan chooses for
               LLaMA-7B on 8 x 80 GB).

Memory and speed run `python scripts/bench.py SECTION --device cuda --layers ... --json OUT/bench_SECTION.json` and turn
its JSON into rows; scripts/bench.py measures each model size in a fresh process, so that it starts from an empty CUDA
allocator. This script defines no model setup, batch or training step of its own.

Time on one H100, estimated from the sizes (a train.py run of the tiny model costs about 15 s: two Python and CUDA
starts under torchrun, 24 steps of 4096 tokens, 7 small checkpoints; a first compilation of a block's forward and
backward about 30 s, twice per compiled run as the rope cache's first fill recompiles it):
  logits   20 s   5 rope types x (CPU fp32 and bf16 references of a 4-layer model, 1-2 GPU runs)
  train   130 s   6 train.py runs on the GPU (7 with 2+ GPUs) and one on the host's CPU
  memory   60 s   two scripts/bench.py processes (4 and 8 layers of LLaMA-7B, 3 steps, 32k and 128k windows)
  speed    80 s   one scripts/bench.py process: 12 steps of 2k and 16k tokens, writing and loading 8 layers for transformers
  passkey  20 s   2 lengths x 3 trials x 2 ways on a 4-layer model
  compile 170 s   4 train.py runs, two of them compiling; writing a 0.9 GB checkpoint
  total   about 8 minutes.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib import cli  # noqa: E402
from lib import memory  # noqa: E402
import passkey  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import BACKENDS, LLaMA, ModelConfig, attention_backend  # noqa: E402
from pose import skip_positions  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
BENCH = os.path.join(ROOT, "scripts", "bench.py")
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
# Noise floor: a second straight run of the same command. On a GPU the two differ by kernel nondeterminism (atomic adds
# in attention's backward, flash-attn's and SDPA's alike); on the CPU they are identical. bf16 amplifies any such
# difference: a master weight that moves by one fp32 rounding can round to another bf16 value, and the runs drift
# apart step by step. A resumed run repeats the uninterrupted one's computation, so it differs by the same noise.
# Two samples of one noise (the largest of 24 step losses, a norm over all weights) differ by a small factor; 10
# leaves room for that. A wrong data order changes a step's loss by the spread between batches, 1e-2 here.
NOISE_MULTIPLE = 10
LOG_RTOL = 1e-6  # the log keeps 6 decimals of losses of about 3: smaller differences do not show
# N processes against 1, --cpu-offload against none: the same products on the same micro-batches (--replay none, the
# micro-batch batch / N in both runs, N a power of two so that 1/N scales the loss exactly), summed in another order
# (gradients across ranks; AdamW and the gradient norm on the CPU). That is an fp32-level difference, which bf16
# amplifies as above. Measured on the CPU at this section's recipe, 2 gloo processes against 1: losses 2.1e-4 (max
# over 24 steps), final weights 4.5e-4. The tolerances are about 5x those, or NOISE_MULTIPLE x the floor if larger.
# Step 1 reads the same weights and examples in both runs: its loss agrees to LOG_RTOL, or an example was lost or
# read twice.
REORDER_LOSS_RTOL = 1e-3
REORDER_WEIGHT_RTOL = 2e-3
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
                    "pass" if r["rel_err"] <= FP32_TOL else "FAIL", **r, attention=BACKENDS["sdpa"]))
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
                            "pass" if ok else "FAIL", **r, cpu_bf16=cpu_bf16, attention=BACKENDS[impl]))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 2. train.py under torchrun: bf16 on the GPU vs fp32 on the CPU, the noise floor, kill -9 + --resume, N processes
# against 1, --cpu-offload

RECIPE = dict(steps=24, save_every=4, train_len=256, target=1024, batch=16, micro_batch=8, lr=2e-4)


def train_command(out, model=cli.BUNDLED_MODEL, data=cli.BUNDLED_TRAIN, precision="bf16", checkpointing=True,
                  resume=False, nproc=1, extra=(), threads=None, export_dtype="fp32", **recipe):
    """torchrun with `nproc` processes running train.py. Every recipe flag is given, so that defaults do not matter:
    PoSE 256 -> 1024 with YaRN, 2 micro-steps of accumulation per step (RECIPE, which `recipe` overrides), no replay.
    The fp32 export keeps the master weights' every bit for the comparisons. extra: more train.py flags."""
    r = dict(RECIPE, **recipe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, TRAIN,
           "--model", model, "--data", data, "--out", out, "--target", r["target"], "--train-len", r["train_len"],
           "--method", "pose", "--rope", "yarn", "--steps", r["steps"], "--batch-size", r["batch"],
           "--micro-batch-size", r["micro_batch"], "--lr", r["lr"], "--warmup", 2, "--seed", 0,
           "--save-every", r["save_every"], "--replay", "none", "--export-dtype", export_dtype,
           "--precision", precision, "--grad-checkpointing" if checkpointing else "--no-grad-checkpointing"]
    cmd += ["--resume"] if resume else []
    cmd += [*extra, *(["--threads", threads] if threads else [])]
    return [str(c) for c in cmd]


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
        raise RuntimeError(f"{what} failed (exit {out.returncode}): {error_line(out.stderr)}; the end of its stderr: "
                           f"{out.stderr.strip()[-1500:]}")
    return out


def error_line(stderr):
    """The error a failed run stated: train.py's one-line "error: ..." or the last exception's first line, from a
    worker's lines (torchrun prefixes them with [rankN]:) rather than the launcher's ChildFailedError."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in stderr.splitlines()]
    errors = [line for line in lines if re.match(r"(error: |[\w.]+(Error|Exception): )", line)
              and "ChildFailedError" not in line]
    return errors[-1] if errors else "no error line"


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


def process_count(device, batch):
    """N of the N-against-1 runs: 2 gloo processes on the CPU; on CUDA one per visible GPU, rounded down to a power of
    two that divides `batch` (1/N then scales the loss exactly); 1 means there is nothing to compare."""
    available = torch.cuda.device_count() if torch.device(device).type == "cuda" else 2
    n = 1
    while 2 * n <= available and batch % (2 * n) == 0:
        n *= 2
    return n


ATTENTION_LINE = re.compile(r"attention: (flash-attn|SDPA) \(([^)]*)\)")  # model.note_backend's line


def logged_backend(stderr, device):
    """The attention backend that train.py's processes named on stderr (one line per process), e.g. "SDPA (flash-attn
    is not installed), 2 processes". On the CPU SDPA is the only backend, and model.py does not name it."""
    found = [f"{name} ({reason})" for name, reason in ATTENTION_LINE.findall(stderr)]
    if not found:
        return "SDPA (the CPU's only backend)" if torch.device(device).type == "cpu" else "not named in the log"
    counts = {name: found.count(name) for name in sorted(set(found))}
    return ", ".join(f"{name}, {k} process{'es' * (k > 1)}" for name, k in counts.items())


def rule_backend(device, dtype):
    """The attention backend model.attention_backend picks for the default attn_impl ("auto") in `dtype` on `device`,
    with its reason: what a section's processes use when their log is not at hand (scripts/bench.py's workers)."""
    backend, reason = attention_backend("auto", dtype, torch.device(device))
    return f"{BACKENDS[backend]} ({reason})"


def noise_tolerance(floor, minimum=LOG_RTOL, multiple=NOISE_MULTIPLE):
    """The relative tolerance of two runs that may differ by the measured noise floor: multiple x floor, at least
    `minimum` (a floor of 0, as on the CPU, leaves the minimum); inf when there is no floor (its runs differ in
    their steps or tensors), which no check passes."""
    return max(multiple * floor, minimum) if math.isfinite(floor) else math.inf


def agreement_rows(what, reference, other, floors, minimums=(REORDER_LOSS_RTOL, REORDER_WEIGHT_RTOL), **data):
    """Rows of two train.py runs (their --out) that compute the same products in another order: step 1's loss to
    LOG_RTOL, every step's loss and the final weights to noise_tolerance(floor, minimum)."""
    a, b = read_train_log(reference), read_train_log(other)
    first = compare_losses(a[:1], b[:1], LOG_RTOL)
    tol = [noise_tolerance(f, m) for f, m in zip(floors, minimums)]
    c = compare_losses(a, b, tol[0])
    ok = first["ok"] and c["ok"] and math.isfinite(tol[0])
    rows = [row("2 train", f"{what}: losses", f"step 1 rel diff {first['max_rel']:.1e}, all {c.get('steps', 0)} "
                f"steps max {c['max_rel']:.2e}", f"step 1 <= {LOG_RTOL:g}, all <= {tol[0]:.1e}",
                "pass" if ok else "FAIL", **c, first_step=first["max_rel"], rtol=tol[0], **data)]
    w = compare_weights(reference, other, tol[1])
    rows.append(row("2 train", f"{what}: final weights", f"max rel diff {w['max_rel']:.2e}", f"<= {tol[1]:.1e}",
                    "pass" if w["ok"] and math.isfinite(tol[1]) else "FAIL", **w, rtol=tol[1]))
    return rows


def skipped(what, reason):
    return row("2 train", what, "skipped", reason, "skip")


def train_check(device, out, model=cli.BUNDLED_MODEL, data=cli.BUNDLED_TRAIN, compare_steps=TRAIN_COMPARE_STEPS,
                processes=None, threads=None, **recipe):
    """Section 2 on `device`: bf16 + activation checkpointing against fp32 on the CPU (the first compare_steps steps);
    a second straight run, the noise floor; kill -9 + --resume against the uninterrupted run; `processes` (default
    process_count) processes against 1 and a --cpu-offload run against the plain run of as many processes. Returns
    result rows. recipe: RECIPE's sizes; its steps leave time to kill the run between its first checkpoint and its
    end. threads: train.py's --threads."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cache = os.path.join(out, "cache")
    dev = torch.device(device)
    r = dict(RECIPE, **recipe)
    n = process_count(dev, r["batch"]) if processes is None else processes
    if n > 1:  # the same micro-batches in every run: process k of N reads micro-step k of the one process
        r["micro_batch"] = r["batch"] // n
    kw = dict(model=model, data=data, threads=threads, **r)
    runs = {name: os.path.join(out, name) for name in ("straight", "again", "cpu_fp32", "killed", "processes",
                                                       "offload")}
    env = train_env(dev, cache)
    what = f"train.py on {dev.type}, bf16 + checkpointing"
    straight = run_command(train_command(runs["straight"], **kw), env, what)
    run_command(train_command(runs["again"], **kw), env, f"{what}, again (noise floor)")
    run_command(train_command(runs["cpu_fp32"], precision="fp32", checkpointing=False, **kw),
                train_env("cpu", cache), "train.py on the CPU, fp32 (GPU hidden)")
    killed_at = run_and_kill(train_command(runs["killed"], **kw), env, runs["killed"], r["steps"])
    log(f"killed after step {killed_at}; resuming")
    run_command(train_command(runs["killed"], resume=True, **kw), env, "train.py --resume")

    logs = {name: read_train_log(runs[name]) for name in ("straight", "again", "cpu_fp32", "killed")}
    with open(os.path.join(runs["straight"], "args.json")) as f:
        ran = json.load(f)
    rows = []
    backend = "NCCL" if dev.type == "cuda" else "gloo"
    attention = logged_backend(straight.stderr, dev)
    path_ok = ran["precision"] == "bf16" and ran["grad_checkpointing"] is True
    rows.append(row("2 train", f"torchrun train.py on {dev.type}: FSDP2 over {backend}, precision / checkpointing",
                    f"{ran['precision']} / {ran['grad_checkpointing']}, peak {logs['straight'][-1].get('peak_mem_gb')} "
                    "GB", "bf16 / True", "pass" if path_ok else "FAIL"))
    rows.append(row("2 train", "attention backend of the train.py runs", attention, attention=attention))
    cpu, device_log = logs["cpu_fp32"], logs["straight"]
    c = compare_losses(cpu[:compare_steps], device_log[:compare_steps], TRAIN_LOSS_RTOL)
    every = compare_losses(cpu, device_log, math.inf)["max_rel"]
    rows.append(row("2 train", f"losses of the first {c.get('steps', 0)} steps: bf16 {dev.type} vs fp32 CPU",
                    f"max rel diff {c['max_rel']:.2e} (all {len(device_log)} steps: {every:.2e})",
                    f"<= {TRAIN_LOSS_RTOL:g}", "pass" if c["ok"] else "FAIL", **c, all_steps_max_rel=every,
                    cpu=[e["loss"] for e in cpu], device=[e["loss"] for e in device_log]))
    # the noise floor: the same command twice
    floors = (compare_losses(device_log, logs["again"], math.inf)["max_rel"],
              compare_weights(runs["straight"], runs["again"], math.inf)["max_rel"])
    rows.append(row("2 train", "noise floor: the same command run twice, max rel diff",
                    f"losses {floors[0]:.2e}, final weights {floors[1]:.2e}",
                    f"tolerances below: {NOISE_MULTIPLE} x these, at least a minimum",
                    "info" if all(map(math.isfinite, floors)) else "FAIL", losses=floors[0], weights=floors[1]))
    tol = [noise_tolerance(f) for f in floors]
    c = compare_losses(device_log, logs["killed"], tol[0])
    rows.append(row("2 train", f"kill -9 after step {killed_at}, --resume: log losses vs uninterrupted",
                    f"max rel diff {c['max_rel']:.2e}{' (identical)' if c['identical'] else ''}",
                    f"<= {tol[0]:.1e} ({NOISE_MULTIPLE} x floor, at least {LOG_RTOL:g})",
                    "pass" if c["ok"] and math.isfinite(tol[0]) else "FAIL", killed_at=killed_at, rtol=tol[0], **c))
    w = compare_weights(runs["straight"], runs["killed"], tol[1])
    rows.append(row("2 train", "kill -9, --resume: final weights vs uninterrupted",
                    f"max rel diff {w['max_rel']:.2e}{' (identical)' if w['identical'] else ''}",
                    f"<= {tol[1]:.1e} ({NOISE_MULTIPLE} x floor, at least {LOG_RTOL:g})",
                    "pass" if w["ok"] and math.isfinite(tol[1]) else "FAIL", rtol=tol[1], **w))
    return rows + parallel_rows(dev, n, runs, kw, env, floors)


def parallel_rows(dev, n, runs, kw, env, floors):
    """n processes against 1 (runs["straight"]), then --cpu-offload against the plain run of as many processes (of 1
    when n < 2 or the n-process run failed). kw: train_command's arguments; floors: the noise floor (losses, weights).
    A run that fails is a failed row; n < 2 is a skipped row that says why."""
    rows, label, plain, world = [], f"{n} processes vs 1", runs["straight"], 1
    if n < 2:
        rows.append(skipped("N processes vs 1 (losses, final weights)", f"needs 2 or more GPUs; "
                            f"{torch.cuda.device_count() if dev.type == 'cuda' else 1} visible"))
    else:
        try:
            run = run_command(train_command(runs["processes"], nproc=n, **kw), env, f"train.py, {n} processes")
            rows += agreement_rows(label, runs["straight"], runs["processes"], floors,
                                   attention=logged_backend(run.stderr, dev))
            plain, world = runs["processes"], n
        except RuntimeError as e:
            rows.append(row("2 train", f"{label}: ran", str(e)[:600], "runs", "FAIL"))
    what = f"--cpu-offload vs without, {world} process{'es' * (world > 1)}"
    try:
        run_command(train_command(runs["offload"], nproc=world, extra=["--cpu-offload"], **kw), env,
                    f"train.py --cpu-offload, {world} process(es)")
        rows += agreement_rows(what, plain, runs["offload"], floors)
    except RuntimeError as e:
        rows.append(row("2 train", f"{what}: ran", str(e)[:600], "runs", "FAIL"))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 3./4. memory and speed at LLaMA-7B's layer shape: scripts/bench.py's sections of those names, turned into rows

STATE = {"weights": "fp32 weights", "gradients": "fp32 gradients", "adamw": "AdamW state"}  # bytes x parameters
ALLOCATED = dict(STATE, working="forward + backward peak above weights, gradients and AdamW state",
                 peak="peak of the step")


def run_bench(section, out, device, layers, flags=()):
    """`python scripts/bench.py SECTION --device DEVICE --layers ... --json OUT/bench_SECTION.json FLAGS`, which measures
    each layer count in a fresh process (an empty CUDA allocator); returns its JSON. flags: more of scripts/bench.py's (the
    tests' tiny sizes)."""
    path = os.path.join(out, f"bench_{section}.json")
    cmd = [sys.executable, BENCH, section, "--device", str(device), "--layers", *map(str, layers), "--json", path,
           *flags]
    run_command(cmd, dict(os.environ), f"scripts/bench.py {section}", timeout=1800)
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
    """lib/memory.py's plan (Plan.parts, bytes) of a scripts/bench.py memory run's model and settings with `layers` layers on
    `world` GPUs, accumulating gradients over micro-steps as the paper's recipe does (64 examples per step)."""
    s = run["settings"]
    cfg = ModelConfig(**dict(run["config"], n_layers=layers))
    return memory.plan(cfg, world, s["micro_batch_size"], s["seq_len"], s["precision"], s["grad_checkpointing"]).parts()


def memory_rows(result, layers=32, world=PLAN_WORLD):
    """Rows from scripts/bench.py memory's JSON (two or more layer counts): the weights, gradients and AdamW state counted
    tensor by tensor, which must equal lib/memory.py's plan to the byte; on a GPU, the same three read from the allocator
    (within MEMORY_EXACT_RTOL), what a step adds to them and its peak (beside the plan, for information), each at
    every layer count and on the straight line through them at `layers` (LLaMA-7B's 32), LLaMA-7B per GPU on `world`
    GPUs, and the evaluation windows."""
    runs = sorted(result["runs"], key=lambda r: r["layers"])
    rows = []
    for key, name in STATE.items():
        points = [(r["layers"], r["counted"][key], r["plan"][key]) for r in runs]
        rows.append(row("3 memory", f"{name}, counted tensor by tensor",
                        ", ".join(f"{n} layers {counted / GB:.3f} GB" for n, counted, _ in points),
                        "lib/memory.py's plan, to the byte", "pass" if all(c == p for _, c, p in points) else "FAIL",
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
    """Rows from scripts/bench.py speed's JSON: each training step's time, tokens/s and MFU (above 1 is impossible: a FLOP
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
        rows.append(row("4 speed", f"ours ({v['attention']}) / transformers sdpa: forward + backward, "
                        f"{v['seq_len']} tokens, {v['dtype']}, {r['layers']} layers, same weights", f"{v['ratio']:.2f} "
                        f"({v['ours_s'] * 1e3:.0f} ms vs {v['transformers_s'] * 1e3:.0f} ms)",
                        f"losses agree: rel diff {loss_rel:.1e} <= {TRAIN_LOSS_RTOL}",
                        "pass" if loss_rel <= TRAIN_LOSS_RTOL else "FAIL", **v))
    return rows


def section_memory(out, layer_counts, device="cuda", flags=()):
    result = run_bench("memory", out, device, layer_counts, flags)
    # scripts/bench.py's workers keep their stderr: the backend is the one its rule gives for their dtype (bf16 on CUDA)
    attention = rule_backend(device, cli.torch_dtype(None, torch.device(device).type))
    return [row("3 memory", "attention backend of scripts/bench.py's steps and windows", attention, attention=attention),
            *memory_rows(result)], result


def section_speed(out, layers, peak_tflops=None, device="cuda", flags=()):
    flags = [*flags, *(["--peak-tflops", str(peak_tflops)] if peak_tflops else [])]
    result = run_bench("speed", out, device, [layers], flags)
    attention = result["runs"][0]["versus"]["attention"]  # scripts/bench.py's model, as train.py's steps in its dtype
    return [row("4 speed", "attention backend of scripts/bench.py's steps and of ours", attention, attention=attention),
            *speed_rows(result)], result


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
    attention = rule_backend(device, torch.bfloat16)
    rows = [row("5 passkey", "attention backend", attention, attention=attention)]
    for r in passkey_check(device, model, tokenizer, lengths, trials):
        log(f"passkey {r['length']}: {r['same']}/{r['trials']} same answers, {r['near_ties']} near ties, "
            f"logits rel err {r['max_rel_err']:.1e}")
        rows.append(row("5 passkey", f"{r['length']} tokens, bf16, GQA: KV cache vs re-reading, {r['trials']} trials",
                        f"{r['same']}/{r['trials']} same answers ({r['near_ties']} near ties), logits rel err "
                        f"{r['max_rel_err']:.1e}", f"all same or near ties; <= {LOGITS_TOL:g}",
                        "pass" if r["ok"] else "FAIL", **r))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 6. compile: train.py --compile against eager

LLAMA_7B_LAYER = dict(dim=4096, n_heads=32, n_kv_heads=32, intermediate_size=11008)  # ModelConfig fields
LLAMA_7B_RECIPE = dict(train_len=2048, target=16384, batch=8, micro_batch=4, lr=2e-5)  # 2 micro-steps of 4 x 2048
RECOMPILE = "Recompiling function"  # the first words of each recompilation TORCH_LOGS=recompiles reports


def write_random_checkpoint(folder, shape, layers, window, device):
    """A --model for train.py: a LLaMA of `shape` (ModelConfig fields) with `layers` layers and a `window`-token
    context, fresh bf16 weights drawn on `device` (seed 0), the bundled tokenizer and its vocabulary."""
    tokenizer = Tokenizer(os.path.join(cli.BUNDLED_MODEL, "tokenizer.model"))
    cfg = ModelConfig(**dict(shape, n_layers=layers, vocab_size=tokenizer.vocab_size, max_position_embeddings=window))
    with torch.device("meta"):
        model = LLaMA(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    state = {name: t.to(torch.bfloat16).cpu() for name, t in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state, tokenizer_dir=cli.BUNDLED_MODEL)
    return cfg


def compile_pair(device, out, name, checkpointing, threads=None, **recipe):
    """The same train.py command without and with --compile, TORCH_LOGS=recompiles on both: {"eager" | "compiled":
    (log entries, stderr)}. Their checkpoints are deleted once read (a 2-layer LLaMA-7B run writes 7 GB)."""
    env = dict(train_env(device, os.path.join(out, "cache")), TORCH_LOGS="recompiles")
    runs = {}
    for mode, extra in (("eager", ()), ("compiled", ("--compile",))):
        folder = os.path.join(out, f"{name}-{mode}")
        done = run_command(train_command(folder, checkpointing=checkpointing, extra=extra, threads=threads,
                                         **recipe), env, f"train.py {name}, {mode}")
        runs[mode] = (read_train_log(folder), done.stderr)
        shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)
    return runs


def guard_failures(stderr):
    """The distinct guard failures that TORCH_LOGS=recompiles names: why each recompilation happened."""
    found = re.findall(r"- \d+/\d+: (.*)", stderr)
    return sorted(set(" ".join(f.split()) for f in found))


def compile_rows(what, runs, device, compare_steps=TRAIN_COMPARE_STEPS):
    """Rows of one compile_pair: the step's tokens/s (median over the second half of the steps, after compilation),
    the first step's seconds (compilation), the losses of the first steps, the recompilations and their reasons."""
    (eager, eager_err), (compiled, compiled_err) = runs["eager"], runs["compiled"]
    half = len(eager) // 2
    speed = [statistics.median(e["tokens_per_s"] for e in log[half:]) for log in (eager, compiled)]
    attention = logged_backend(compiled_err, device)
    rows = [row("6 compile", f"{what}: tokens/s of train.py's step (median of steps {half + 1}-{len(eager)}), "
                f"attention {attention}", f"compiled / eager {speed[1] / speed[0]:.2f} ({speed[1]:.0f} vs "
                f"{speed[0]:.0f} tokens/s)", f"first step {compiled[0]['seconds']:.1f} s compiled, "
                f"{eager[0]['seconds']:.1f} s eager (compilation)", eager=speed[0], compiled=speed[1],
                ratio=speed[1] / speed[0], first_step=[compiled[0]["seconds"], eager[0]["seconds"]],
                attention=attention, attention_eager=logged_backend(eager_err, device))]
    c = compare_losses(eager[:compare_steps], compiled[:compare_steps], TRAIN_LOSS_RTOL)
    rows.append(row("6 compile", f"{what}: losses of the first {c.get('steps', 0)} steps, compiled vs eager (bf16)",
                    f"max rel diff {c['max_rel']:.2e}", f"<= {TRAIN_LOSS_RTOL:g}", "pass" if c["ok"] else "FAIL",
                    **c, eager=[e["loss"] for e in eager], compiled=[e["loss"] for e in compiled]))
    reasons = guard_failures(compiled_err)
    rows.append(row("6 compile", f"{what}: recompilations (TORCH_LOGS=recompiles)",
                    f"{compiled_err.count(RECOMPILE)}" + (f": {reasons[0][:200]}" if reasons else ""),
                    "new positions each step must not recompile: a recompilation per step would show here",
                    count=compiled_err.count(RECOMPILE), reasons=reasons))
    return rows


def section_compile(device, out, shape=LLAMA_7B_LAYER, layers=2, steps=12, tiny=None, large=None, threads=None):
    """Section 6: train.py --compile against eager on the bundled tiny model (section 2's recipe, activation
    checkpointing) and on `layers` layers of `shape` (LLAMA_7B_RECIPE, no checkpointing), `steps` steps each.
    tiny, large: recipe sizes over those (the tests' tiny sizes). A pair that fails is a failed row; the other runs."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    dev = torch.device(device)
    tiny, large = dict(RECIPE, **(tiny or {})), dict(LLAMA_7B_RECIPE, **(large or {}))
    folder = os.path.join(out, "model")
    pairs = [(f"bundled tiny model, PoSE {tiny['train_len']} -> {tiny['target']}, checkpointing", "tiny", True, tiny),
             (f"{layers} layers of dim {shape['dim']}, PoSE {ktokens(large['train_len'])} -> "
              f"{ktokens(large['target'])}, no checkpointing", "large", False,
              dict(large, model=folder, export_dtype="bf16"))]
    rows = []
    for what, name, checkpointing, recipe in pairs:
        try:
            if name == "large":
                write_random_checkpoint(folder, shape, layers, large["train_len"], dev)
            runs = compile_pair(dev, out, name, checkpointing, threads, **dict(recipe, steps=steps, save_every=0))
            rows += compile_rows(what, runs, dev)
        except RuntimeError as e:
            rows.append(row("6 compile", f"{what}: ran", str(e)[:600], "runs", "FAIL"))
    shutil.rmtree(folder, ignore_errors=True)
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
    if meta.get("attention"):
        header += "\n\nAttention backend by section: " + "; ".join(
            f"{section}: {', '.join(names)}" for section, names in meta["attention"].items() if names) + "."
    text = markdown(rows, header)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


SECTIONS = {"logits": "1 logits", "train": "2 train", "memory": "3 memory", "speed": "4 speed", "passkey": "5 passkey",
            "compile": "6 compile"}


def rehearsal_config(scaling):
    """--rehearse: the logits section's model at the tests' size (2 layers, dim 128, a 64-token window)."""
    return logits_config(scaling, vocab=512, dim=128, n_layers=2, window=64)


TINY = dict(train_len=64, target=512, batch=4, micro_batch=2)  # 4 examples of 64 tokens per step
REHEARSAL = {  # --rehearse: each section's arguments on the CPU, at sizes that take seconds to a minute
    "layers": [1, 2],
    "logits": dict(config=rehearsal_config, seq_len=64, target=512),
    "train": dict(TINY, steps=8, save_every=3, threads=1),
    "bench": ["--train-len", "32", "--target", "128", "--eval-ctx", "64", "--repeats", "1", "--warmup", "0",
              "--threads", "1", "--shape", json.dumps({"dim": 64, "n_heads": 4, "n_kv_heads": 2,
                                                       "intermediate_size": 128, "vocab_size": 4096})],
    "passkey": dict(lengths=(160, 320), trials=1),
    "compile": dict(shape=dict(dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128), steps=6, tiny=TINY,
                    large=TINY, threads=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("out", "gpu_check"), help="output directory (default out/gpu_check)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layer counts of the LLaMA-7B-shaped models for memory (two or more) and speed (the largest); "
                        "default 4 8 (--rehearse: 1 2)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run these sections only")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's bf16 dense peak, if not in scripts/bench.py's PEAK_TFLOPS")
    p.add_argument("--rehearse", action="store_true",
                   help="run every section on the CPU at tiny sizes (the GPU hidden): the GPU run's code paths")
    args = p.parse_args(argv)
    args.layers = args.layers or (REHEARSAL["layers"] if args.rehearse else [4, 8])
    if "memory" in args.only and len(set(args.layers)) < 2:
        p.error("--layers needs two different layer counts (a straight line through them gives 32 layers)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.rehearse:
        print("gpu_check: no CUDA device on this machine; nothing checked (run it on a machine with a GPU, or "
              "rehearse it on the CPU with --rehearse)")
        return 0
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = torch.device("cpu" if args.rehearse else "cuda")
    tiny = REHEARSAL if args.rehearse else {}
    bench = dict(device=device.type, flags=tiny.get("bench", ()))
    t_start = time.time()
    rows, raw, seconds = [], {}, {}
    steps = {
        "logits": lambda: section_logits(device, **tiny.get("logits", {})),
        "train": lambda: train_check(device, os.path.join(out, "train"), **tiny.get("train", {})),
        "memory": lambda: section_memory(out, sorted(set(args.layers)), **bench),
        "speed": lambda: section_speed(out, max(args.layers), args.peak_tflops, **bench),
        "passkey": lambda: section_passkey(device, **tiny.get("passkey", {})),
        "compile": lambda: section_compile(device, os.path.join(out, "compile"), **tiny.get("compile", {})),
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
        if device.type == "cuda":
            torch.cuda.empty_cache()
    attention = {}  # the attention backends of each section, as its rows name them
    for r in rows:
        if "attention" in r["data"] and r["data"]["attention"] not in attention.setdefault(r["section"], []):
            attention[r["section"]].append(r["data"]["attention"])
    meta = dict(device="cpu (--rehearse)" if args.rehearse else torch.cuda.get_device_name(device),
                torch=torch.__version__, cuda=torch.version.cuda, flash_attn=flash_attn_available(),
                seconds=time.time() - t_start, section_seconds=seconds, layers=args.layers, attention=attention,
                raw=raw)
    print(write_results(out, rows, meta))
    failed = [r for r in rows if r["status"] == "FAIL"]
    print(f"{len(failed)} failed check(s); results in {out}/results.md" if failed else
          f"all checks passed; results in {out}/results.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
