"""Interpolation without fine-tuning on the bundled base: does the toy behave like LLaMA-7B's "PI-only" rows?

    python scripts/interpolation_only.py --out out/interpolation-only          # ~40 min on one CPU thread
    python scripts/interpolation_only.py --out /tmp/io --trials 5 --ctx 256 512 --rows original,yarn-relative
    # the committed numbers of results/toy/DESIGN.md (every row; the first command cached them in --out):
    python scripts/interpolation_only.py --out out/interpolation-only --json results/toy/interpolation_only.json \
        --plot results/toy/interpolation_only_passkey.png

Each row gives the base model (assets/tiny, a 256-token window) one rotary scaling of factor 8 and measures, with
no training at all, the two numbers the toy reproduction reports for every model:

  perplexity  evaluate.perplexity on the 6 held-out plays (first 4096 tokens each), sliding window, stride 128, at
              ctx 256 (inside the original window) and 512 / 1024 / 2048 (beyond it)
  passkey     passkey.run_passkey, --trials prompts per length (the same prompts for every row: one seed), greedy
              exact match; every trial's depth is kept in the JSON

The rows are the interpolations of the PoSE paper's Table 6 (linear, fixed NTK, YaRN) plus dynamic NTK, and YaRN
with three ramps (scripts/rope_spectrum.py explains them):
  yarn-standard   beta_fast 32, beta_slow 1 (YaRN paper, chosen for LLaMA's 2048 window)
  yarn-relative   beta_fast 4, beta_slow 1/8: both bounds x 256 / 2048, LLaMA's fractions of kept / interpolated pairs
  yarn-fast4      beta_fast 4, beta_slow 1: LLaMA's fraction of kept pairs, and every pair that does not complete a
                  turn inside the window is interpolated like PI (YaRN's rule that no pair sees an unseen angle)
What LLaMA-7B does in the same situation (PoSE paper Table 6, GovReport, 2k -> 16k) is in results/toy/DESIGN.md.

Resumable: each row is written to --out/ROW.json when done and skipped when present. One CPU thread by default
(the machine is shared); --threads to change it.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from lib import cli  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import passkey  # noqa: E402
from model import LLaMA  # noqa: E402

from data import Tokenizer  # noqa: E402

FACTOR = 8.0
ORIGINAL = 256  # the base model's window


def yarn(beta_fast, beta_slow):
    return {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL,
            "beta_fast": beta_fast, "beta_slow": beta_slow}


# row name -> rope_scaling dict (None: plain RoPE)
ROWS = {
    "original": None,
    "linear": {"rope_type": "linear", "factor": FACTOR},
    "ntk": {"rope_type": "ntk", "factor": FACTOR},
    "yarn-standard": yarn(32.0, 1.0),
    "yarn-relative": yarn(32.0 * ORIGINAL / 2048, 1.0 * ORIGINAL / 2048),
    "yarn-fast4": yarn(32.0 * ORIGINAL / 2048, 1.0),
    "dynamic": {"rope_type": "dynamic", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL},
}


def measure(model, scaling, docs, tokenizer, args):
    model.set_rope_scaling(scaling)
    ppl = {}
    for ctx in args.ctx:
        t0 = time.perf_counter()
        ppl[str(ctx)] = evaluate.perplexity(model, docs, ctx, args.stride)["ppl"]
        print(f"  ppl@{ctx} = {ppl[str(ctx)]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    records = passkey.run_passkey(model, tokenizer, args.ctx, trials=args.trials, seed=args.seed)
    acc = {str(r["length"]): r["accuracy"] for r in passkey.accuracy_by_length(records)}
    print(f"  passkey {acc} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return dict(rope_scaling=scaling, ppl=ppl, passkey=acc,
                records=[{k: r[k] for k in ("length", "trial", "depth", "passkey", "prompt_tokens", "predicted",
                                            "correct")} for r in records])


def table(results, ctx):
    head = " | ".join(f"ppl {c}" for c in ctx) + " | " + " | ".join(f"passkey {c}" for c in ctx)
    lines = [f"| row | {head} |", "|---" * (2 * len(ctx) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r['ppl'][str(c)]:.2f}" for c in ctx] + [f"{r['passkey'][str(c)]:.2f}" for c in ctx]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, ctx, path, bins=5):
    """One depth x length heatmap of passkey accuracy per row (passkey.accuracy_grid), side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(2.3 * len(results) + 1, 2.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        grid = passkey.accuracy_grid(r["records"], ctx, bins)  # (lengths, bins)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(ctx)):
            for j in range(bins):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(bins), [f"{j / bins:.1f}" for j in range(bins)], fontsize=6)
        ax.set_yticks(range(len(ctx)), [str(c) for c in ctx] if ax is axes[0][0] else [], fontsize=6)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("key depth (bin start)", fontsize=6)
    axes[0][0].set_ylabel("prompt tokens", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--ctx", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", help="a PNG of depth x length passkey heatmaps, one per row")
    p.add_argument("--json", help="every row (records included) in one JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    tokenizer = Tokenizer(cli.BUNDLED_MODEL)
    corpus = data.load_corpus(cli.BUNDLED_EVAL, tokenizer, min_tokens=max(args.ctx))
    docs = [corpus[i][:args.max_tokens] for i in range(min(args.docs, len(corpus)))]
    model = LLaMA.from_pretrained(cli.BUNDLED_MODEL)
    results = {}
    for name in args.rows.split(","):
        path = os.path.join(args.out, f"{name}.json")
        if not os.path.isfile(path):
            print(f"[{name}] {ROWS[name]}", flush=True)
            result = measure(model, ROWS[name], docs, tokenizer, args)
            result["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "rows", "threads")}
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)
        results[name] = json.load(open(path))
    print(table(results, args.ctx))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, separators=(",", ":"))
    if args.plot:
        plot(results, args.ctx, args.plot)


if __name__ == "__main__":
    main()
