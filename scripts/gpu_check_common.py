"""What the sections of scripts/gpu_check.py share: the tolerances, a result row, running a command, the attention
backend's name.

Each tolerance stands beside the reason for its size. Importing this module puts the repository root on sys.path.
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model import BACKENDS, attention_backend  # noqa: E402

# bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3) and every matrix product, norm and residual add
# rounds its output once; the errors grow through the layers, more so where attention is sharp. On the CPU in bf16 the
# logits check's model (4 layers, dim 512, head_dim 128, init std 0.05) measures 1.7-2.2e-2 against fp32 for the five
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
# amplifies as above. Measured on the CPU at section 2's recipe, 2 gloo processes against 1: losses 2.1e-4 (max
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


def ktokens(n):
    """32768 -> "32k"; counts that are not whole multiples of 1024 as they are."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)
