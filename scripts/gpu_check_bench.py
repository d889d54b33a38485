"""Sections 3 and 4 of scripts/gpu_check.py: memory and speed at LLaMA-7B's layer shape.

Each runs scripts/bench.py's section of the same name in a subprocess and turns its JSON into rows.
"""
import json
import os
import sys

import torch

# gpu_check_common puts the repository root on sys.path: it comes before lib and the top level
from gpu_check_common import (MEMORY_EXACT_RTOL, PLAN_WORLD, ROOT, TRAIN_LOSS_RTOL, ktokens, row,
                              rule_backend, run_command)
from lib import cli
from lib import memory
from model import ModelConfig

BENCH = os.path.join(ROOT, "scripts", "bench.py")
GB = memory.GB  # decimal gigabytes, as train.py --dry-run's plan


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
