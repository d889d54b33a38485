"""Speed and memory benchmarks. Ratios are measured within one run (alternating contenders), since a shared machine
is noisy; absolute numbers are only comparable on the same machine.

    python bench.py model          # training step (fwd + bwd) of our LLaMA vs transformers' LlamaForCausalLM (sdpa)
    python bench.py loss           # peak memory of model.loss vs full logits as T grows (32k vocabulary)
    python bench.py pose           # one optimizer step: PoSE at train_len vs full-length at 2x, 4x, 8x (Figure 3)
    python bench.py eval           # peak memory of evaluate.py at 8k and 32k tokens (32k vocabulary)
    python bench.py all
    python bench.py pose --threads 1   # beside another busy process: one thread each (see cli.add_threads)

Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU, the growth of the process's peak resident set
(ru_maxrss) over its size before the measured work, each measurement in a fresh subprocess.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import cli


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_in_subprocess(section, threads=None, **kw):
    """Run `bench.py _worker` for one measurement (with --threads `threads`); returns its JSON result."""
    out = subprocess.run([sys.executable, __file__, "_worker", section, json.dumps(dict(kw, threads=threads))],
                         capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"worker {section} {kw} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# ours vs transformers

def tiny_checkpoint(path, layers=4, dim=256, vocab=8192, heads=4, kv_heads=4, ctx=2048):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=int(dim * 8 / 3 // 64 * 64 + 64),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=ctx)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def bench_model(args):
    from transformers import LlamaForCausalLM

    from model import LLaMA
    torch.manual_seed(0)
    print(f"# training step, B=1 T={args.seq_len}, 4 layers, dim 256, vocab 8192, fp32, "
          f"{torch.get_num_threads()} threads")
    for kv_heads in (4, 2):
        with tempfile.TemporaryDirectory() as d:
            tiny_checkpoint(d, kv_heads=kv_heads)
            ours = LLaMA.from_pretrained(d).train()
            theirs = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
        tokens = torch.randint(0, 8192, (1, args.seq_len))
        targets = torch.roll(tokens, -1, 1)

        def step_ours():
            ours.loss(tokens, targets).backward()

        def step_theirs():
            # transformers shifts labels itself; give it the same number of scored tokens
            theirs(tokens, labels=tokens).loss.backward()

        times = {"ours": [], "transformers": []}
        for _ in range(args.warmup):
            step_ours(), step_theirs()
        for _ in range(args.repeats):  # alternate, so that load changes hit both alike
            for name, fn in (("ours", step_ours), ("transformers", step_theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
        print(f"kv_heads={kv_heads}: ours {ours_s * 1000:.0f} ms, transformers {theirs_s * 1000:.0f} ms, "
              f"ratio ours/transformers = {ours_s / theirs_s:.2f} (median of {args.repeats})")


# ----------------------------------------------------------------------------------------------------------------------
# chunked loss memory

def worker_loss(seq_len, full, vocab=32000):
    from model import LLaMA, ModelConfig
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

def worker_step(seq_len, target, method, repeats=3):
    """One optimizer step (forward, backward, AdamW) on one example of seq_len tokens, with positions up to target."""
    import numpy as np

    from model import LLaMA, ModelConfig
    from pose import make_example
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, intermediate_size=704,
                              max_position_embeddings=seq_len, rope_scaling={"rope_type": "linear",
                                                                             "factor": target / seq_len}))
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    doc = np.arange(max(seq_len, target) * 2) % 4096
    ids, pos = make_example(method, doc, seq_len, target, rng=np.random.default_rng(0))
    ids, pos = torch.from_numpy(ids)[None], torch.from_numpy(pos)[None]
    targets = torch.roll(ids, -1, 1)
    base = rss_mb()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.loss(ids, targets, pos).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times[1:]), "peak_mb": peak_rss_mb() - base, "tokens": ids.shape[1]}


def bench_pose(args):
    L = args.train_len
    print(f"# one optimizer step, 1 example, 4 layers, dim 256, vocab 4096, fp32, train_len {L}: PoSE trains on "
          f"{L} tokens whatever the target, full-length on target tokens")
    print("| target | PoSE s/step | full s/step | full / PoSE time | PoSE peak MB | full peak MB | full / PoSE memory "
          "|")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for mult in (2, 4, 8):
        target = L * mult
        pose = measure_in_subprocess("step", seq_len=L, target=target, method="pose", threads=args.threads)
        full = measure_in_subprocess("step", seq_len=target, target=target, method="full", threads=args.threads)
        rows.append({"target": target, "pose": pose, "full": full})
        print(f"| {target} | {pose['seconds']:.2f} | {full['seconds']:.2f} | {full['seconds'] / pose['seconds']:.1f}x "
              f"| {pose['peak_mb']:.0f} | {full['peak_mb']:.0f} | {full['peak_mb'] / pose['peak_mb']:.1f}x |")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# evaluate.py's peak memory at a long context

def worker_eval(ctx, vocab=32000):
    import numpy as np

    import evaluate
    from model import LLaMA, ModelConfig
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


WORKERS = {"loss": worker_loss, "step": worker_step, "eval": worker_eval}
SECTIONS = {"model": bench_model, "loss": bench_loss, "pose": bench_pose, "eval": bench_eval}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kw = json.loads(sys.argv[3])
        cli.set_threads(kw.pop("threads"))
        print(json.dumps(WORKERS[sys.argv[2]](**kw)))
        return
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", nargs="?", choices=[*SECTIONS, "all"], help="what to measure (required)")
    parser.add_argument("--seq-len", type=int, default=2048, help="model: sequence length")
    parser.add_argument("--train-len", type=int, default=512, help="pose: the training window")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    cli.add_threads(parser)
    args = parser.parse_args()
    if args.section is None:  # the one-line form of every script's errors, not argparse's usage and exit 2
        parser.error(f"name a section: {', '.join([*SECTIONS, 'all'])} (bench.py --help says what each measures)")
    cli.set_threads(args.threads)
    for name, fn in SECTIONS.items():
        if args.section in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
