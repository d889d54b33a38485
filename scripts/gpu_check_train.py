"""Sections 2 and 6 of scripts/gpu_check.py: train.py runs under torchrun, compared by their logs and final weights.

Section 2 runs bf16 on the device against fp32 on the CPU, measures the noise floor, kills a run and resumes it,
and compares N processes against 1 and --cpu-offload against none.
Section 6 runs train.py --compile against eager.
"""
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

import torch

# gpu_check_common puts the repository root on sys.path: it comes before lib and the top level
from gpu_check_common import (LOG_RTOL, NOISE_MULTIPLE, REORDER_LOSS_RTOL, REORDER_WEIGHT_RTOL, ROOT,
                              TRAIN_COMPARE_STEPS, TRAIN_LOSS_RTOL, ktokens, log, logged_backend, rel_error, row,
                              run_command)
from lib import cli
from data import Tokenizer
from model import LLaMA, ModelConfig

TRAIN = os.path.join(ROOT, "train.py")


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
