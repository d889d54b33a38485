"""Check a converted SmolLM2 (scripts/get_smollm2.py) against transformers: perplexity, tokenizer, weights.

    python scripts/get_smollm2.py && python scripts/check_smollm2.py            # ~1 min on one CPU thread
    python scripts/check_smollm2.py --model out/smollm2-135m --ctx 2048 --json out/smollm2-check.json

  1. perplexity: `python evaluate.py --model M --data assets/books/eval --ctx C --docs 1 --stride C --json F` (the
     command as users run it) against transformers' LlamaForCausalLM on the same tokens: the first held-out play
     with >= C tokens, read here with transformers' AutoTokenizer, its first C tokens (start token included), one
     window, every token after the first scored. They must agree to 1e-4 relative (both fp32; what differs is the
     order of floating-point sums). The documents evaluate.load_docs gives must be those very tokens.
  2. tokenizer: data.Tokenizer(M), the `tokenizers` library on M/tokenizer.json and AutoTokenizer(M) give the same
     ids on every line of the held-out plays, on whole plays and on edge cases (spaces, newlines, unicode, digits,
     chat markup); reported beside them, for information: how often transformers' own GGUF tokenizer
     (AutoTokenizer.from_pretrained(dir, gguf_file=...)) agrees; it does not split digits as llama.cpp's "smollm"
     pre-tokenizer (and SmolLM2's tokenizer.json) does.
  3. weights (with --gguf, default the get_smollm2.py cache): the safetensors equal transformers' own GGUF reader's
     tensors (dequantized and un-permuted by its code, not ours).
Exits 1 when a check fails. Nothing is downloaded.
"""
import glob
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from lib import cli  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "out", "smollm2-135m")
DEFAULT_GGUF = os.path.join(os.path.expanduser("~"), ".cache", "pose", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
PPL_RTOL = 1e-4
EDGE = ["Hello world! 123", "two spaces  42 and 3.14159", "  multiple   spaces", "tab\tand\nnewline\n\n\n",
        "\u00dcn\u00efcode caf\u00e9 d\u00e9j\u00e0 \u65e5\u672c\u8a9e \U0001F600", "it's we'll they'd I'M",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", " ", "\n", ""]


def plays():
    """The held-out plays' texts, in the order data.py reads a directory (sorted paths)."""
    texts = []
    for path in sorted(glob.glob(os.path.join(cli.BUNDLED_EVAL, "**", "*.txt.gz"), recursive=True)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.append(f.read())
    return texts


def check_perplexity(model_dir, ctx, threads):
    import transformers
    auto = transformers.AutoTokenizer.from_pretrained(model_dir)
    adds_bos = len(auto("a")["input_ids"]) > len(auto("a", add_special_tokens=False)["input_ids"])
    start = auto.bos_token_id if adds_bos else auto.eos_token_id  # evaluate.py's window start (data.Tokenizer)
    doc = next(ids for ids in ([start] + auto(t, add_special_tokens=False)["input_ids"] for t in plays())
               if len(ids) >= ctx)[:ctx]
    # our loader of the same documents (evaluate.py's): the same tokens, or the comparison compares nothing
    ours = evaluate.load_docs(cli.BUNDLED_EVAL, data.Tokenizer(model_dir), 1, ctx, ctx)
    same_tokens = [int(t) for t in ours[0]] == doc

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        out = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", model_dir,
                              "--data", cli.BUNDLED_EVAL, "--ctx", str(ctx), "--stride", str(ctx), "--docs", "1",
                              "--json", os.path.join(tmp, "ppl.json")], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        evaluate_s = time.time() - t0
        if out.returncode != 0:
            raise RuntimeError(f"evaluate.py failed: {out.stderr.strip().splitlines()[-1]}")
        with open(os.path.join(tmp, "ppl.json")) as f:
            ours_result = json.load(f)["rows"][0]["results"][0]

    t0 = time.time()
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.tensor([doc])
    with torch.no_grad():
        logits = model(tokens).logits[0, :-1].double()  # position i predicts token i + 1; the last is unused
    nll = -torch.log_softmax(logits, -1).gather(1, tokens[0, 1:, None]).sum().item()
    transformers_s = time.time() - t0
    theirs = math.exp(nll / (ctx - 1))
    rel = abs(ours_result["ppl"] - theirs) / theirs
    return dict(ctx=ctx, document_tokens=len(doc), same_tokens=same_tokens, scored_ours=ours_result["tokens"],
                scored_transformers=ctx - 1, ppl_evaluate=ours_result["ppl"], ppl_transformers=theirs, rel_diff=rel,
                evaluate_seconds=round(evaluate_s, 1), transformers_seconds=round(transformers_s, 1),
                ok=same_tokens and ours_result["tokens"] == ctx - 1 and rel <= PPL_RTOL)


def check_tokenizer(model_dir, gguf):
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    texts = plays()
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    cases = EDGE + lines + texts
    ours = data.Tokenizer(model_dir)
    library = HFTokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(model_dir)
    mismatches = 0
    for text in cases:
        ids = ours.encode(text, bos=False)
        start = [] if ours.bos_id is None else [ours.bos_id]
        if ids != library.encode(text, add_special_tokens=False).ids or start + ids != auto(text)["input_ids"]:
            mismatches += 1
    result = dict(texts=len(cases), lines=len(lines), tokens=sum(len(ours.encode(t, bos=False)) for t in texts),
                  mismatches=mismatches, bos_id=ours.bos_id, eos_id=ours.eos_id, start_id=ours.start_id,
                  edge_ids={t: ours.encode(t, bos=False) for t in EDGE[:3]}, ok=mismatches == 0)
    if gguf and os.path.isfile(gguf):
        from_gguf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        differ = [t for t in EDGE + lines if from_gguf(t)["input_ids"] != ours.encode(t, bos=False)]
        result["transformers_gguf_tokenizer"] = dict(
            texts=len(EDGE + lines), differ=len(differ),
            differ_without_digits=sum(not any(c.isdigit() for c in t) for t in differ),
            example=differ[0] if differ else None)
    return result


def check_weights(model_dir, gguf):
    """Our safetensors against transformers' GGUF reader (its dequantization and its un-permute of q and k)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = load_gguf_checkpoint(gguf, return_tensors=False)["config"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    theirs = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(os.path.join(model_dir, "model.safetensors"))
    names_match = set(ours) == set(theirs)
    diff = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours if k in theirs)
    return dict(tensors=len(ours), names_match=names_match, max_abs_diff=diff, ok=names_match and diff == 0.0)


def main():
    p = cli.ArgumentParser(description="Check a converted SmolLM2 against transformers (perplexity, tokenizer, "
                                       "weights).")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the converted directory (default out/smollm2-135m)")
    p.add_argument("--gguf", default=DEFAULT_GGUF, help="the GGUF it came from, for the weights check (default: "
                                                        "get_smollm2.py's cache; skipped when absent)")
    p.add_argument("--ctx", type=int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--json", metavar="FILE", help="write the results to FILE")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise cli.UsageError(f"{args.model}: no converted model; run scripts/get_smollm2.py first")
    if args.json:
        cli.check_out_path("--json", args.json)
    cli.positive("--ctx", args.ctx, 2)
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()  # "sequence longer than 8192": whole plays are tokenized, not run
    transformers.logging.disable_progress_bar()
    results = {}
    for name, check in (("perplexity", lambda: check_perplexity(args.model, args.ctx, args.threads)),
                        ("tokenizer", lambda: check_tokenizer(args.model, args.gguf)),
                        ("weights", lambda: check_weights(args.model, args.gguf) if os.path.isfile(args.gguf)
                         else None)):
        t0 = time.time()
        results[name] = check()
        if results[name] is None:
            print(f"{name}: skipped (no {args.gguf})")
            continue
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"{name}: {'pass' if results[name]['ok'] else 'FAIL'} {json.dumps(results[name])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not all(r["ok"] for r in results.values() if r):
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
