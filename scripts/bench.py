"""Speed and memory benchmarks. Ratios are measured within one run (alternating contenders), since a shared machine
is noisy; absolute numbers are only comparable on the same machine.

    python scripts/bench.py model          # training step (fwd + bwd) of our LLaMA vs transformers' LlamaForCausalLM (sdpa)
    python scripts/bench.py loss           # peak memory of model.loss vs full logits as T grows (32k vocabulary)
    python scripts/bench.py pose           # one optimizer step: PoSE at train_len vs full-length at 2x, 4x, 8x (Figure 3)
    python scripts/bench.py eval           # peak memory of evaluate.py at 8k and 32k tokens (32k vocabulary)
    python scripts/bench.py all            # the four above, on the CPU
    python scripts/bench.py pose --threads 1   # beside another busy process: one thread each (see cli.add_threads)
    python scripts/bench.py memory --layers 4 8 --json memory.json   # on a GPU: train.py's steps at LLaMA-7B's layer shape
    python scripts/bench.py speed --layers 8 --json speed.json       # on a GPU: tokens/s and MFU of train.py's step
    python scripts/bench.py memory --device cpu --layers 1 2 --train-len 32 --target 128 --eval-ctx 64 \\
        --shape '{"dim": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 128, "vocab_size": 4096}'  # tiny

The training sections (pose, memory, speed) run train.py's own code in one process: the Settings of a train.py
command line (lib/settings.py, with train.py's defaults for the device: bf16 and activation checkpointing on CUDA, fp32
without on the CPU), its FSDP2 model (train.sharded_model, here with fresh weights), its optimizer (train.adamw) and
its optimizer step (train.optimizer_step: the step's examples by train.batch_for, then train.update), on one
document of random tokens. The model is a config.json beside the bundled tokenizer, which is all train.py reads of
--model before the weights: --shape (ModelConfig fields over its defaults, LLaMA-7B's) with --layers layers.

  memory  for each --layers, in a fresh process (an empty CUDA allocator): evaluate.perplexity over one window of
          each --eval-ctx (weights in evaluate.py's dtype), then --steps optimizer steps of --batch-size PoSE
          examples of --train-len tokens, positions up to --target, in micro-batches of --micro-batch-size (by
          default 2 micro-steps of one example: the gradients accumulate, as in the paper's recipe). The weights,
          the gradients (when the optimizer step starts) and AdamW's state, counted tensor by tensor and, on CUDA,
          read from the allocator, and the last step's peak and what it adds to the three, each beside lib/memory.py's
          plan of the same run (what `train.py --dry-run` prints).
  speed   for each --layers: seconds per optimizer step of PoSE (--train-len tokens, positions up to --target) and of
          full-length fine-tuning (--target tokens), tokens/s, model FLOPs and their utilization of the GPU's peak;
          then forward + backward of our LLaMA against transformers' on the same weights, timed alternately.
--json writes what memory and speed measured (scripts/gpu_check.py reads it).

Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU, the growth of the process's peak resident set
(ru_maxrss) over its size before the measured work, each measurement in a fresh subprocess (the memory section
counts tensors there).
"""
import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_measure import Memory, peak_rss_mb, rss_mb, tensor_bytes, time_steps  # noqa: E402
from lib import cli  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
from lib import hf  # noqa: E402
from lib import memory  # noqa: E402
import pose  # noqa: E402
from lib import settings  # noqa: E402
import train  # noqa: E402
from model import BACKENDS, LLaMA, ModelConfig, attention_backend  # noqa: E402

# bf16 dense (no sparsity) tensor-core peaks, TFLOP/s per GPU, from NVIDIA's data sheets; the first match wins.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))
GB = memory.GB  # decimal gigabytes, as train.py --dry-run's plan


def measure_in_subprocess(section, threads=None, device="cpu", **kw):
    """Run `bench.py _worker` for one measurement in a fresh process (with --threads `threads`; the GPU hidden unless
    device is cuda); returns its JSON result."""
    env = dict(os.environ) if device == "cuda" else dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, __file__, "_worker", section, json.dumps(dict(kw, threads=threads))],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        raise ChildProcessError(f"worker {section} {kw} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# train.py's run at a model shape, with fresh weights and random tokens

def bench_config(shape, layers, window):
    """ModelConfig of `shape` (fields over ModelConfig's defaults: LLaMA-7B) with `layers` layers and a `window`-token
    original context: the training length, as PoSE trains at the original window."""
    return ModelConfig(**dict(shape, n_layers=layers, max_position_embeddings=window))


def run_settings(cfg, folder, device, method, train_len, target, batch_size=1, micro_batch_size=1):
    """The Settings of `train.py --model FOLDER --method M --train-len L --target T --batch-size B --micro-batch-size
    m --replay none` in one process on `device` (the paper's recipe; train.py's precision and checkpointing there).
    FOLDER gets cfg's config.json and the bundled tokenizer."""
    hf.write_json(os.path.join(folder, "config.json"), hf.config_to_hf(dataclasses.asdict(cfg)))
    shutil.copy(os.path.join(cli.BUNDLED_MODEL, "tokenizer.model"), folder)
    argv = ["--model", folder, "--method", method, "--train-len", train_len, "--target", target,
            "--batch-size", batch_size, "--micro-batch-size", micro_batch_size, "--replay", "none"]
    return settings.from_command_line([str(a) for a in argv], world=1, device=device.type)


def random_corpus(vocab, tokens, seed=0):
    """One document of `tokens` random token ids, a data.Corpus that train.batch_for cuts examples from."""
    return data.Corpus(np.random.default_rng(seed).integers(0, vocab, tokens), [0, tokens])


def fresh_model(cfg, s, device, mesh):
    """The model of the run of Settings s as train.build shards it (train.sharded_model: the run's rope scaling,
    precision, offload and checkpointing), with fresh weights (seed 0) instead of a checkpoint's."""
    model = train.sharded_model(dataclasses.replace(cfg, rope_scaling=s.rope_scaling), device, mesh, s.precision,
                                s.cpu_offload, s.grad_checkpointing)
    torch.manual_seed(0)
    model.init_weights()
    return model


def step(model, optimizer, s, corpus, device, index):
    """Optimizer step `index` of the run as train.train's loop takes it (train.optimizer_step, at train.lr_at's
    learning rate); returns its loss."""
    lr = train.lr_at(index, s.lr, s.warmup, s.steps)
    return train.optimizer_step(model, optimizer, lr, index, s, corpus, None, device,
                                s.batch_size // s.micro_batch_size)[0]


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------------------------------------------------
# ours vs transformers

def ours_vs_transformers(cfg, device, seq_len, repeats, warmup, dtype):
    """Forward + backward of the loss on one sequence, our LLaMA vs transformers' LlamaForCausalLM (sdpa) loaded from
    our save_pretrained, same weights in `dtype`, no checkpointing for either, timed alternately (so that clock or
    load changes hit both alike). Returns medians in seconds, ratio ours / transformers, both losses and our attention
    backend (flash-attn on CUDA in bf16 when it is installed, else SDPA)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = LLaMA(cfg).to(dtype)
    ours.to_empty(device=device)
    ours.init_weights()
    ours.train()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp, state_dict={k: v.cpu() for k, v in ours.state_dict().items()})
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
    theirs = theirs.to(device=device, dtype=dtype).train()  # dtype again: transformers 4 reads torch_dtype
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len), device=device)
    targets = torch.full_like(tokens, -100)
    targets[:, :-1] = tokens[:, 1:]
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

    for _ in range(warmup):
        step_ours(), step_theirs()
    times = {"ours": [], "transformers": []}
    for _ in range(repeats):
        for name, fn in (("ours", step_ours), ("transformers", step_theirs)):
            times[name].append(time_steps(fn, device, 1, warmup=0))
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    return dict(seq_len=seq_len, dtype=str(dtype).removeprefix("torch."), ours_s=ours_s, transformers_s=theirs_s,
                ratio=ours_s / theirs_s, loss_ours=losses["ours"].item(),
                loss_transformers=losses["transformers"].item(),
                attention=BACKENDS[attention_backend(ours.layers[0].self_attn.attn_impl, dtype, device)[0]])


def bench_model(args):
    print(f"# training step, B=1 T={args.seq_len}, 4 layers, dim 256, vocab 8192, fp32, "
          f"{torch.get_num_threads()} threads")
    for kv_heads in (4, 2):
        cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=kv_heads, intermediate_size=704)
        r = ours_vs_transformers(cfg, torch.device("cpu"), args.seq_len, args.repeats, args.warmup, torch.float32)
        print(f"kv_heads={kv_heads}: ours {r['ours_s'] * 1000:.0f} ms, transformers {r['transformers_s'] * 1000:.0f} "
              f"ms, ratio ours/transformers = {r['ratio']:.2f} (median of {args.repeats})")


# ----------------------------------------------------------------------------------------------------------------------
# chunked loss memory

def worker_loss(seq_len, full, vocab=32000):
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=vocab, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=128))
    tokens = torch.randint(0, vocab, (1, seq_len))
    targets = torch.roll(tokens, -1, 1)
    base = rss_mb()
    with torch.no_grad():
        if full:
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        else:
            loss = model.loss(tokens, targets)
    return {"seq_len": seq_len, "full": full, "peak_mb": peak_rss_mb() - base, "loss": loss.item()}


def bench_loss(args):
    print("# peak memory of the loss at vocabulary 32000 (tiny model, no grad), MB above the pre-forward RSS")
    print("| T | full logits (B,T,V) fp32 | model.loss (chunked) |")
    print("|---|---|---|")
    for T in (2048, 8192, 32768):
        full = measure_in_subprocess("loss", seq_len=T, full=True, threads=args.threads)
        ours = measure_in_subprocess("loss", seq_len=T, full=False, threads=args.threads)
        assert abs(full["loss"] - ours["loss"]) < 1e-3 * full["loss"]
        print(f"| {T} | {full['peak_mb']:.0f} | {ours['peak_mb']:.0f} |")


# ----------------------------------------------------------------------------------------------------------------------
# PoSE vs full-length: cost of one optimizer step (the paper's Figure 3)

def worker_step(train_len, target, method, device, mesh, repeats=3):
    """One optimizer step of train.py on one example of `method` (train_len tokens; target for full-length) with
    positions up to target, at the bundled tiny model's shape (untied, fresh weights)."""
    cfg = ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, intermediate_size=704,
                      max_position_embeddings=train_len)
    with tempfile.TemporaryDirectory() as folder:
        s = run_settings(cfg, folder, device, method, train_len, target)
    model = fresh_model(cfg, s, device, mesh)
    optimizer = train.adamw(model, s)
    corpus = random_corpus(cfg.vocab_size, 2 * pose.window_length(method, train_len, target))
    base = rss_mb()
    times = []
    for index in range(repeats + 1):
        t0 = time.perf_counter()
        step(model, optimizer, s, corpus, device, index)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times[1:]), "peak_mb": peak_rss_mb() - base, "tokens": s.seq_len}


def bench_pose(args):
    L = args.train_len or 512
    print(f"# one optimizer step, 1 example, 4 layers, dim 256, vocab 4096, fp32, train_len {L}: PoSE trains on "
          f"{L} tokens whatever the target, full-length on target tokens")
    print("| target | PoSE s/step | full s/step | full / PoSE time | PoSE peak MB | full peak MB | full / PoSE memory "
          "|")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for mult in (2, 4, 8):
        target = L * mult
        pose_, full = (measure_in_subprocess("step", args.threads, train_len=L, target=target, method=method)
                       for method in ("pose", "full"))
        rows.append({"target": target, "pose": pose_, "full": full})
        print(f"| {target} | {pose_['seconds']:.2f} | {full['seconds']:.2f} | "
              f"{full['seconds'] / pose_['seconds']:.1f}x | {pose_['peak_mb']:.0f} | {full['peak_mb']:.0f} | "
              f"{full['peak_mb'] / pose_['peak_mb']:.1f}x |")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# evaluate.py's peak memory at a long context

def worker_eval(ctx, vocab=32000):
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, intermediate_size=128,
                              max_position_embeddings=ctx)).eval()
    docs = [np.concatenate([[1], np.random.default_rng(0).integers(3, vocab, ctx + ctx // 2)])]
    base = rss_mb()
    r = evaluate.perplexity(model, docs, ctx, stride=ctx // 2)
    return {"peak_mb": peak_rss_mb() - base, "windows": r["windows"], "tokens": r["tokens"]}


def bench_eval(args):
    print("# evaluate.perplexity at a long context, vocabulary 32000 (tiny model): peak MB above the pre-run RSS")
    print("| ctx | evaluate.py peak MB | full fp32 logits of one window, MB |")
    print("|---|---|---|")
    for ctx in (8192, 32768):
        r = measure_in_subprocess("eval", ctx=ctx, threads=args.threads)
        print(f"| {ctx} | {r['peak_mb']:.0f} | {ctx * 32000 * 4 / 2**20:.0f} |")


# ----------------------------------------------------------------------------------------------------------------------
# memory of train.py's steps and of evaluation windows, against lib/memory.py's plan

def eval_window(cfg, ctx, device):
    """evaluate.perplexity over one window of ctx random tokens, the weights in evaluate.py's dtype for the device
    (bf16 on CUDA): {"ctx", "dtype", "weights" and "peak" (allocator bytes), "seconds"}; "error" if it ran out of
    memory."""
    mem, dtype = Memory(device), cli.torch_dtype(None, device.type)
    with torch.device("meta"):
        model = LLaMA(cfg).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    model.eval()
    doc = np.concatenate([[1], np.random.default_rng(0).integers(3, cfg.vocab_size, ctx - 1)])  # BOS, then ctx - 1
    weights = mem.allocated()
    mem.reset_peak()
    window = dict(ctx=ctx, dtype=str(dtype).removeprefix("torch."), weights=weights)
    t0 = time.perf_counter()
    try:
        evaluate.perplexity(model, [doc], ctx, stride=ctx)
    except torch.OutOfMemoryError as e:  # a finding, not a crash of the section
        return dict(window, peak=None, error=str(e).splitlines()[0])
    return dict(window, peak=mem.peak(), seconds=time.perf_counter() - t0)


def step_readings(model, optimizer, s, corpus, device, steps):
    """`steps` optimizer steps (step), read at their start, when train.update's gradients are complete (the
    optimizer's step pre-hook, after clipping) and at their end. Per step: the allocator's bytes there and its peaks
    over forward + backward and over the optimizer step (None on the CPU), the gradients' bytes counted tensor by
    tensor, and the loss."""
    mem, readings = Memory(device), []

    def gradients_complete(*_):
        readings[-1].update(gradients=mem.allocated(), peak_forward_backward=mem.peak(),
                            gradient_bytes=tensor_bytes(p.grad for p in model.parameters()))
        mem.reset_peak()

    optimizer.register_step_pre_hook(gradients_complete)
    for index in range(steps):
        mem.reset_peak()
        readings.append(dict(start=mem.allocated()))
        loss = step(model, optimizer, s, corpus, device, index)
        readings[-1].update(end=mem.allocated(), peak_optimizer=mem.peak(), loss=loss)
    return readings


def worker_memory(shape, layers, train_len, target, batch_size, micro_batch_size, steps, eval_ctx, device, mesh):
    """One layer count of the memory section, in a fresh process: the evaluation windows first (their model is freed
    on return), then train.py's steps. "counted" and "allocated" (None on the CPU) hold the quantities of
    memory.Plan.parts: the weights, gradients and AdamW state as the first step leaves them, what a step adds to them
    and its peak as the last step (one with AdamW's state from its start) reaches them."""
    cfg = bench_config(shape, layers, train_len)
    with tempfile.TemporaryDirectory() as folder:
        s = run_settings(cfg, folder, device, "pose", train_len, target, batch_size, micro_batch_size)
        plan = memory.plan_of(s)
    windows = [eval_window(cfg, ctx, device) for ctx in eval_ctx]
    model = fresh_model(cfg, s, device, mesh)
    optimizer = train.adamw(model, s)
    weights = Memory(device).allocated()
    counted = dict(weights=tensor_bytes(model.parameters()))
    readings = step_readings(model, optimizer, s, random_corpus(cfg.vocab_size, 2 * pose.window_length(
        s.method, s.train_len, s.target)), device, steps)
    counted.update(gradients=readings[0]["gradient_bytes"],
                   adamw=tensor_bytes(t for state in optimizer.state.values() for t in state.values()))
    first, last = readings[0], readings[-1]
    allocated = None
    if weights is not None:
        gradients = first["gradients"] - first["start"]  # the first step starts without AdamW's state
        allocated = dict(weights=weights, gradients=gradients, adamw=first["end"] - weights,
                         working=last["peak_forward_backward"] - last["start"] - gradients,
                         forward_backward=last["peak_forward_backward"], optimizer=last["peak_optimizer"],
                         peak=max(last["peak_forward_backward"], last["peak_optimizer"]))
    return dict(layers=layers, params=plan.params, device=device_name(device), config=dataclasses.asdict(cfg),
                settings={k: getattr(s, k) for k in ("method", "train_len", "target", "seq_len", "batch_size",
                                                     "micro_batch_size", "precision", "grad_checkpointing")},
                plan=plan.parts(), counted=counted, allocated=allocated, steps=readings, eval=windows)


MEMORY_ROWS = {"weights": "fp32 master weights", "gradients": "fp32 gradients", "adamw": "AdamW state",
               "working": "what a step adds to them: peak of forward + backward above the three",
               "peak": "peak of the step"}


def bench_memory(args):
    runs = [measure_in_subprocess("memory", args.threads, args.device, shape=args.shape, layers=n,
                                  train_len=args.train_len or 2048, target=args.target, batch_size=args.batch_size,
                                  micro_batch_size=args.micro_batch_size, steps=args.steps, eval_ctx=args.eval_ctx)
            for n in args.layers]
    for r in runs:
        s = r["settings"]
        print(f"# memory of train.py on one {r['device']} process, GB: {r['layers']} layers ({r['params']:,} "
              f"parameters), {s['method']} {s['seq_len']} tokens per example, positions up to {s['target']}, "
              f"{s['batch_size']} per step in micro-batches of {s['micro_batch_size']}, {s['precision']}, "
              f"activation checkpointing {'on' if s['grad_checkpointing'] else 'off'}; the plan: train.py --dry-run")
        print("| what | counted tensor by tensor | allocator | lib/memory.py's plan | allocator / plan |")
        print("|---|---|---|---|---|")
        for key, what in MEMORY_ROWS.items():
            counted, allocated, planned = r["counted"].get(key), (r["allocated"] or {}).get(key), r["plan"][key]
            print(f"| {what} | {gb(counted)} | {gb(allocated)} | {gb(planned)} | "
                  f"{'-' if allocated is None else f'{allocated / planned:.2f}'} |")
        for w in r["eval"]:
            peak = w.get("error") or ("-" if w["peak"] is None else f"{gb(w['peak'])} ({gb(w['weights'])})")
            print(f"| evaluation, one window of {w['ctx']} tokens: peak (of which weights) | - | {peak} | - | - |")
    return dict(section="memory", runs=runs)


def gb(n):
    return "-" if n is None else f"{n / GB:.3f}"


# ----------------------------------------------------------------------------------------------------------------------
# speed of train.py's steps, PoSE vs full-length, and ours vs transformers

def train_flops(cfg, batch, seq_len):
    """Model FLOPs of one training step (forward + backward, no recomputation counted): 6 x the parameters that enter
    a matrix product (all but the input embedding, a lookup) x tokens, plus causal attention: per layer and sequence
    QK^T and PV are 2 x 2 T^2 d in the forward pass, halved by the causal mask, times 3 for forward + backward."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    matmul = sum(p.numel() for name, p in model.named_parameters()
                 if cfg.tie_embeddings or name != "embed_tokens.weight")
    return 6 * matmul * batch * seq_len + 6 * cfg.n_layers * batch * seq_len ** 2 * cfg.n_heads * cfg.head_dim


def peak_tflops(name, override=None):
    """The bf16 dense peak of a GPU model (TFLOP/s): `override`, else PEAK_TFLOPS; None when unknown."""
    return override or next((value for key, value in PEAK_TFLOPS if key.lower() in name.lower()), None)


def step_speeds(cfg, runs, repeats, warmup, device, mesh):
    """Seconds per optimizer step of each run of `runs` ({method: Settings}, the same model), one example per step,
    on one model of the first run; with tokens/s and model FLOPs. Returns (speeds, parameter count)."""
    first = next(iter(runs.values()))
    model = fresh_model(cfg, first, device, mesh)
    optimizer = train.adamw(model, first)
    longest = max(pose.window_length(method, s.train_len, s.target) for method, s in runs.items())
    corpus = random_corpus(cfg.vocab_size, 2 * longest)
    speeds = {}
    for method, s in runs.items():
        seconds = time_steps(lambda s=s: step(model, optimizer, s, corpus, device, 0), device, repeats, warmup)
        speeds[method] = dict(seq_len=s.seq_len, seconds=seconds, tokens_per_s=s.seq_len / seconds,
                              flops=train_flops(cfg, 1, s.seq_len))
    return speeds, sum(p.numel() for p in model.parameters())


def worker_speed(shape, layers, train_len, target, repeats, warmup, device, mesh):
    """One layer count of the speed section, in a fresh process: PoSE and full-length steps on the same model (the
    two runs differ only in --method), then ours vs transformers once that model is freed."""
    cfg = bench_config(shape, layers, train_len)
    with tempfile.TemporaryDirectory() as folder:
        runs = {method: run_settings(cfg, folder, device, method, train_len, target) for method in ("pose", "full")}
    steps, params = step_speeds(cfg, runs, repeats, warmup, device, mesh)
    gc.collect()  # FSDP's hooks hold the model in reference cycles
    versus = ours_vs_transformers(cfg, device, train_len, repeats, warmup, cli.torch_dtype(None, device.type))
    s = runs["pose"]
    return dict(layers=layers, params=params, device=device_name(device), target=target, precision=s.precision,
                grad_checkpointing=s.grad_checkpointing, steps=steps, versus=versus)


def bench_speed(args):
    runs = [measure_in_subprocess("speed", args.threads, args.device, shape=args.shape, layers=n,
                                  train_len=args.train_len or 2048, target=args.target, repeats=args.repeats,
                                  warmup=args.warmup) for n in args.layers]
    peak = peak_tflops(runs[0]["device"], args.peak_tflops)
    for r in runs:
        print(f"# one optimizer step of train.py on one {r['device']} process: {r['layers']} layers ({r['params']:,} "
              f"parameters), one example, {r['precision']}, activation checkpointing "
              f"{'on' if r['grad_checkpointing'] else 'off'}; MFU against {peak or 'an unknown'} TFLOP/s "
              "(--peak-tflops)")
        print("| method | tokens | s/step | tokens/s | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
        for method, m in r["steps"].items():
            m["mfu"] = m["flops"] / m["seconds"] / (peak * 1e12) if peak else None
            what = f"PoSE, positions up to {r['target']}" if method == "pose" else "full-length"
            mfu = "-" if m["mfu"] is None else f"{m['mfu']:.2f}"
            print(f"| {what} | {m['seq_len']} | {m['seconds']:.3f} | {m['tokens_per_s']:.0f} | "
                  f"{m['flops'] / m['seconds'] / 1e12:.1f} | {mfu} |")
        v = r["versus"]
        print(f"ours ({v['attention']}) / transformers (sdpa), forward + backward of {v['seq_len']} tokens in "
              f"{v['dtype']}, same weights: {v['ratio']:.2f} ({v['ours_s'] * 1e3:.0f} ms vs "
              f"{v['transformers_s'] * 1e3:.0f} ms; losses {v['loss_ours']:.4f} and {v['loss_transformers']:.4f})")
    return dict(section="speed", peak_tflops=peak, runs=runs)


WORKERS = {"loss": worker_loss, "step": worker_step, "eval": worker_eval, "memory": worker_memory,
           "speed": worker_speed}
TRAINING_WORKERS = ("step", "memory", "speed")  # train.py's code, in its process group of one process
SECTIONS = {"model": bench_model, "loss": bench_loss, "pose": bench_pose, "eval": bench_eval, "memory": bench_memory,
            "speed": bench_speed}
ALL = ("model", "loss", "pose", "eval")  # `all`: the CPU sections


def worker(name, kw):
    """`scripts/bench.py _worker NAME JSON`: one measurement, its JSON result on the last line of stdout."""
    cli.set_threads(kw.pop("threads"))
    if name in TRAINING_WORKERS:  # NCCL on CUDA (when visible, see measure_in_subprocess), gloo on the CPU
        kw["device"], kw["mesh"] = train.setup_distributed()
    print(json.dumps(WORKERS[name](**kw)))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def model_shape(text):
    """--shape: a JSON object of ModelConfig fields."""
    try:
        shape = json.loads(text)
        ModelConfig(**shape)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"not a JSON object of ModelConfig fields: {text} ({e})") from None
    return shape


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", nargs="?", choices=[*SECTIONS, "all"], help="what to measure (required)")
    parser.add_argument("--seq-len", type=int, default=2048, help="model: sequence length")
    parser.add_argument("--train-len", type=int, default=None,
                        help="tokens per training example: pose 512, memory and speed 2048 (LLaMA-7B's window)")
    parser.add_argument("--target", type=int, default=16384, help="memory and speed: positions up to (default 16384)")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8], help="memory and speed: layer counts")
    parser.add_argument("--shape", type=model_shape, default={},
                        help="memory and speed: ModelConfig fields as JSON over its defaults (LLaMA-7B's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=cli.default_device(),
                        help="memory and speed (default: cuda when this machine has it)")
    parser.add_argument("--batch-size", type=int, default=2, help="memory: examples per optimizer step (default 2)")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="memory: examples per forward pass (default 1: 2 micro-steps, gradients accumulate)")
    parser.add_argument("--steps", type=int, default=3, help="memory: optimizer steps, >= 2 (default 3)")
    parser.add_argument("--eval-ctx", type=int, nargs="*", default=[32768, 131072],
                        help="memory: evaluation windows (tokens; none: no evaluation)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="speed: the GPU's bf16 dense peak (TFLOP/s), if not in PEAK_TFLOPS")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="memory and speed: write what they measured to this file")
    cli.add_threads(parser)
    args = parser.parse_args(argv)
    if args.section is None:  # the one-line form of every script's errors, not argparse's usage and exit 2
        parser.error(f"name a section: {', '.join([*SECTIONS, 'all'])} (scripts/bench.py --help says what each measures)")
    if args.json and args.section not in ("memory", "speed"):
        parser.error("--json is for the memory and speed sections")
    if args.section in ("memory", "speed") and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    for flag in ("layers", "eval_ctx"):
        for n in getattr(args, flag):
            cli.positive(f"--{flag.replace('_', '-')}", n)
    cli.positive("--steps", args.steps, 2)  # the last step is one with AdamW's state
    if args.json:
        cli.check_out_path("--json", args.json)
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.set_threads(args.threads)
    for name in ALL if args.section == "all" else [args.section]:
        result = SECTIONS[name](args)
    if args.json:
        hf.write_json(args.json, result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        cli.run(lambda: worker(sys.argv[2], json.loads(sys.argv[3])))
    else:
        cli.run(main)
