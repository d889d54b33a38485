"""Sliding-window perplexity over several context sizes (PoSE paper section 4.2, Table 1; Press et al. 2021).

    python evaluate.py --model pose-2k-16k --data govreport_long.jsonl --ctx 2048 4096 8192 16384 32768
    python evaluate.py --model llama-7b --rope none linear:8 yarn:8 --data data/proofpile \\
        --ctx 2048 4096 8192 16384 --json table6.json             # Original and PI-only rows of Table 6
    python evaluate.py --model llama-7b --model pose-2k-16k --data proofpile.jsonl --ctx 2048 16384
    # tiny CPU run (seconds): the bundled tiny model (scripts/pretrain_tiny.sh, a 256-token window) on two plays;
    # ctx 512 is beyond its window: a warning, and the perplexity shows it
    python evaluate.py --model assets/tiny --data assets/books/eval --ctx 128 256 512 --stride 64 --docs 2
    python evaluate.py --model pose-2k-16k --ctx 32768 --device cuda --gpu-memory 24 --dry-run   # will it fit?

The protocol. A document is stored as BOS x_0 .. x_{n-1} (data.py). For a context size `ctx` and a `stride`,
window k = 0, 1, ... covers the document tokens [b_k, e_k) with

    b_k = k * stride,   e_k = min(b_k + ctx - 1, n),   the last window being the first with e_k = n,

and the model reads [BOS] + x[b_k:e_k] at positions 0 .. e_k - b_k (at most ctx tokens). Input position i predicts
x[b_k + i]: the BOS predicts x[b_k], and the last token's prediction (of x[e_k], next window's business) is unused.
Window k scores the tokens x_t with max(b_k, e_{k-1}) <= t < e_k (e_{-1} = 0), i.e. exactly those that no earlier
window scored, each with all the context the window has before it. Then

    perplexity = exp( sum over documents and scored tokens of -log p(x_t | window) / number of scored tokens ),

token-weighted over all documents (not a mean of per-document perplexities). A tokenizer with no BOS (Qwen2: its
tokenizer_config.json adds none) stores and starts every window with its EOS in the BOS's place (data.Tokenizer's
start_id): such models read the EOS between documents in pretraining, so a window reads as the start of a document,
and x_0 is scored as with a BOS (lm-evaluation-harness's rolling log-likelihood does the same). The other choice,
no start token, would leave x_0 unscored and change which tokens a window scores; this one keeps the protocol
identical for every tokenizer. Cases:
  - stride < ctx - 1 (the paper: ctx >= 2048, stride 1024): windows overlap, every x_t is scored exactly once, the
    first ctx - 1 of them by the first window (x_0 from the BOS alone), later ones with >= ctx - 1 - stride tokens
    of context. This equals the official PoSE code (src/eval_ppl.py) and Hugging Face's recipe.
  - stride == ctx - 1: windows tile the document, every token scored once.
  - stride >= ctx: the tokens between windows (x[e_{k-1}:b_k], stride - ctx + 1 of them) and those after the last
    window (when the next b_k would be >= n) are never scored, and not counted; each window's first token is
    predicted from the BOS alone. (The official code counts the skipped tokens anyway; we count what is scored.)
  - n <= ctx - 1 (a document shorter than the window): one window, the whole document.

Data: the first --docs documents of --data (a prepared dataset or raw .jsonl/.txt/.gz/directory, tokenized with
each model's tokenizer by data.load_corpus) that have at least --min-tokens tokens, BOS included (default: the
largest ctx, as the paper's "documents of more than 32,768 tokens"), each truncated to its first --max-tokens tokens
(default: the largest ctx, as the official code's max_input_tokens; 0 keeps whole documents). So by default every
context size scores the same tokens, and the largest ctx reads each document in one window. --docs defaults to up
to 50 (the paper's count) without a word when there are fewer (the six bundled plays); given, a shortfall warns.

Output: stdout holds the results only, a header line and the table; progress, cache messages and warnings go to
stderr.

--rope SPEC replaces the checkpoint's rotary scaling (rope.scaling_from_spec: none, linear:8, ntk:8, yarn:8,
yarn-revised:8, dynamic:8, llama3:8), several specs give several rows. The original window that YaRN, dynamic and
llama3 scaling are built on is --original-len if given, else the checkpoint's (rope.original_window). A ctx beyond
the window the scaling supports (original * factor; the original window without scaling) is a warning, not an error:
that is where the Original rows of Table 1 are > 10^3.

Memory (memory.eval_plan): one forward pass per window of the largest ctx, no KV cache. On CUDA the plan is checked
against the free memory before any weight is loaded.
--dry-run prints the plan (weights, KV cache, the forward's largest temporaries, the peak); it reads config.json alone.
--gpu-memory GB states a GPU's free memory for a dry run; a CUDA run measures it (torch.cuda.mem_get_info).

In code (scripts/bench.py): `evaluate.perplexity(model, docs, ctx, stride)` -> {"ppl", "nll", "tokens", "windows", ...}.
"""
import json
import math
import os

import numpy as np
import torch

from lib import cli
import data
from lib import evaluation
from lib import hf
from lib import memory
from model import ModelConfig
from rope import CHECKPOINT, describe_rope

DEFAULT_DOCS = 50  # the paper's 50 documents of GovReport / Proof-pile (section 4.2)


# ----------------------------------------------------------------------------------------------------------------
# the protocol

def windows(n, ctx, stride):
    """The sliding windows over a document of n tokens after its BOS: (begin, end, first_scored) triples.

    The window reads [BOS] + x[begin:end] and scores x[first_scored:end] (see the module docstring)."""
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2 (a BOS and at least one document token), got {ctx}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    begin, prev_end = 0, 0
    while begin < n:
        end = min(begin + ctx - 1, n)
        yield begin, end, max(begin, prev_end)
        if end == n:
            return
        begin, prev_end = begin + stride, end


@torch.no_grad()
def perplexity(model, docs, ctx, stride=1024, progress=False):
    """Sliding-window perplexity of `model` over `docs` at context size `ctx` (the module docstring's protocol).

    docs: 1-D integer arrays, each a document as data.Corpus stores it, BOS first (that token starts every window).
    progress: False, True or a description for a tqdm bar over the windows.
    Returns {"ctx", "stride", "ppl", "nll" (summed, nats), "tokens" (scored), "windows", "docs"}. Each window goes
    through model.loss with -100 on unscored targets: one window at a time, never the full (T, vocab) logits.
    """
    device = next(model.parameters()).device
    docs = [torch.as_tensor(np.asarray(doc, dtype=np.int64)) for doc in docs]
    plans = [list(windows(len(doc) - 1, ctx, stride)) for doc in docs]
    nll, scored = 0.0, 0  # summed in float64 (Python floats), over millions of tokens
    bar = cli.progress(sum(map(len, plans)), desc=progress if isinstance(progress, str) else None, unit="win",
                       enabled=bool(progress))
    with bar:
        for doc, plan in zip(docs, plans):
            bos, x = doc[:1], doc[1:]
            for begin, end, first in plan:
                tokens = torch.cat([bos, x[begin:end]])  # (T,), T = end - begin + 1 <= ctx
                targets = torch.full_like(tokens, -100)
                # input position i predicts x[begin + i]; only x[first:end] is scored
                targets[first - begin:end - begin] = x[first:end]
                n = end - first
                loss = model.loss(tokens[None].to(device), targets[None].to(device))  # mean over the n targets
                nll += loss.item() * n
                scored += n
                bar.update()
                bar.set_postfix(ppl=f"{math.exp(nll / scored):.3f}", refresh=False)
    if scored == 0:
        raise ValueError("no token to score: every document is empty after its BOS")
    return dict(ctx=ctx, stride=stride, ppl=math.exp(nll / scored), nll=nll, tokens=scored,
                windows=sum(map(len, plans)), docs=len(docs))


# ----------------------------------------------------------------------------------------------------------------
# CLI

def format_ppl(ppl):
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:.3g}"


def format_table(rows, ctxs):
    """Table 1 of the paper: one row per model and rope, one column per context size."""
    lines = ["| model | rope | " + " | ".join(str(c) for c in ctxs) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in ctxs) + " |"]
    for row in rows:
        rope = describe_rope(row["rope_scaling"]) + (" (checkpoint)" if row["rope"] == CHECKPOINT else "")
        cells = [format_ppl(r["ppl"]) for r in row["results"]]
        lines.append(f"| {os.path.basename(os.path.normpath(row['model']))} | {rope} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Sliding-window perplexity at several context sizes (PoSE section 4.2).")
    p.add_argument("--model", action="append", metavar="DIR",
                   help=f"Hugging Face model directory (with its tokenizer); repeat for several rows (default: the "
                        f"bundled tiny base, {os.path.relpath(cli.BUNDLED_MODEL)})")
    p.add_argument("--data", default=cli.BUNDLED_EVAL,
                   help="prepared dataset (data.py --out) or raw .jsonl/.txt/.gz/directory (default: the bundled "
                        "held-out plays)")
    p.add_argument("--ctx", type=int, nargs="+", required=True, help="context sizes (window = BOS + ctx-1 tokens)")
    p.add_argument("--stride", type=int, default=1024, help="window advance in tokens (default 1024, as the paper)")
    p.add_argument("--docs", type=int, default=None,
                   help="number of documents (default: up to 50, as the paper; fewer only warns when given)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="use documents of at least this many tokens, BOS included (default: the largest ctx)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="truncate documents to this many tokens, BOS included (default: the largest ctx; 0: keep all)")
    cli.add_model_options(p, CHECKPOINT)
    cli.add_memory_options(p)
    p.add_argument("--json", metavar="FILE", help="write every number printed, and more, to FILE")
    cli.add_threads(p)
    args = p.parse_args(argv)
    args.model = args.model or [cli.BUNDLED_MODEL]  # the one place a default model comes in

    for c in args.ctx:
        if c < 2:
            p.error(f"--ctx must be >= 2 (a BOS and at least one document token), got {c}")
    if args.stride < 1:
        p.error(f"--stride must be >= 1, got {args.stride}")
    if args.docs is not None and args.docs < 1:
        p.error(f"--docs must be >= 1, got {args.docs}")
    args.min_tokens = max(args.ctx) if args.min_tokens is None else args.min_tokens
    args.max_tokens = max(args.ctx) if args.max_tokens is None else args.max_tokens
    if args.min_tokens < 0 or args.max_tokens < 0:
        p.error("--min-tokens and --max-tokens must be >= 0")
    return cli.check_evaluation_args(p, args, args.rope)


def load_docs(path, tokenizer, n_docs, min_tokens, max_tokens, threads=None):
    """The first n_docs documents of >= min_tokens tokens, truncated to max_tokens (0: whole); n_docs None: up to
    DEFAULT_DOCS, and fewer is no surprise (the six bundled plays), so no warning."""
    corpus = data.load_corpus(path, tokenizer=tokenizer, threads=threads)  # its errors name the file
    try:
        corpus = corpus.filter(min_tokens)  # after the cache: one cache for every min_tokens
    except data.DataError as e:
        raise data.DataError(f"{path}: {e}") from None
    if n_docs is not None and len(corpus) < n_docs:
        cli.warn(f"only {cli.plural(len(corpus), 'document')} of {path} "
                 f"{'has' if len(corpus) == 1 else 'have'} >= {min_tokens} tokens; evaluating those")
    n_docs = DEFAULT_DOCS if n_docs is None else n_docs
    return [corpus[i][:max_tokens or None] for i in range(min(n_docs, len(corpus)))]


def plan_memory(args):
    """The memory plan of every model's rows, from its config.json alone (memory.evaluation_path): one forward pass
    per window of the largest ctx, no KV cache, the loss's logits a chunk of rows at a time."""
    for path in args.model:
        plan = memory.eval_plan(ModelConfig(**hf.read_config(path)), max(args.ctx),
                                cli.torch_dtype(args.dtype, args.device), logit_rows=None,
                                no_cache="each window scored in one forward pass")
        what = f"perplexity of {os.path.basename(os.path.normpath(path))} at ctx {max(args.ctx)}"
        memory.evaluation_path(args, what, [("one forward pass per window", plan)], "give a smaller --ctx")


def main(argv=None):
    args = parse_args(argv)
    cli.set_threads(args.threads)
    plan_memory(args)  # printed by --dry-run; checked on CUDA before any weight is loaded
    if args.dry_run:
        return
    # 1) everything that can fail on bad input, for every model, before any long computation
    docs, by_tokenizer = {}, {}  # models that share a tokenizer share the documents
    for path in args.model:
        hf.read_config(path)
        tok = data.Tokenizer(path)
        if tok.path not in by_tokenizer:
            by_tokenizer[tok.path] = load_docs(args.data, tok, args.docs, args.min_tokens, args.max_tokens,
                                               args.threads)
        docs[path] = by_tokenizer[tok.path]
    dtype = cli.torch_dtype(args.dtype, args.device)
    # 2) one row per model and rope
    rows = []
    for m in evaluation.load(args.model, args.rope, dtype, args.device, args.original_len):
        m.warn_beyond(args.ctx, "ctx")
        results = [perplexity(m.model, docs[m.path], ctx, args.stride, progress=f"{m.name} {m.rope} ctx={ctx}")
                   for ctx in args.ctx]
        rows.append(dict(model=m.path, rope=m.spec, rope_scaling=m.rope_scaling, original_window=m.original,
                         supported_window=m.supported, dtype=str(dtype).removeprefix("torch."), device=args.device,
                         results=results))
    n_docs = cli.plural(len(docs[args.model[0]]), "document")
    print(f"perplexity, sliding window with stride {args.stride}, {n_docs} "
          f"of >= {args.min_tokens} tokens" + (f" truncated to {args.max_tokens}" if args.max_tokens else "")
          + f" from {args.data}")
    print(format_table(rows, args.ctx))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(data=args.data, stride=args.stride, docs_requested=args.docs or DEFAULT_DOCS,
                           min_tokens=args.min_tokens, max_tokens=args.max_tokens, ctx=args.ctx, rows=rows),
                      f, indent=2)


if __name__ == "__main__":
    cli.run(main)
