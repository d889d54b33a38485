"""Passkey retrieval: can the model fetch a 5-digit key from anywhere in a long prompt? (PoSE section 4.3, Figure 2)

    python passkey.py --model pose-2k-16k --lengths 2048 4096 8192 16384 --json passkey.json --plot passkey.png
    python passkey.py --model llama-7b --rope linear:8 --lengths 2048 4096 8192 16384      # the PI-only baseline
    # tiny CPU run (seconds): the bundled tiny model (scripts/pretrain_tiny.sh, a 256-token window)
    python passkey.py --model assets/tiny --lengths 128 256 512 --trials 10 --plot passkey.png
    python passkey.py --model pose-2k-128k --lengths 131072 --device cuda --gpu-memory 80 --dry-run  # will it fit?

The prompt is the one of Mohtashami & Jaggi (2023) that the paper shows in Figure 2a, one part per line:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you
    about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass is ...
    The pass key is 71432. Remember it. 71432 is the pass key.
    ... The sun is yellow. Here we go. There and back again. The grass is green. The sky is blue.
    What is the pass key? The pass key is

The filler is the cycle of those five sentences, and the key line is spliced in after a uniformly random number of
them: its depth, recorded as (filler sentences before the key) / (all filler sentences), 0 = right after the task,
1 = right before the question. The Figure's unit is a whole repetition of the five sentences; we count single
sentences so that the prompt length can be matched to within one sentence (about 5 tokens for LLaMA), with the same
text. For a requested length L the prompt is the longest of <= L tokens (BOS included); its real token count is
recorded as prompt_tokens. Keys are uniform in 10000..99999; keys and depths come from numpy's default_rng(--seed)
alone, so every model sees the same prompts. The prompt starts with the BOS; a tokenizer with no BOS (Qwen2) starts
it with its EOS instead, the token such models read before a new document (data.Tokenizer.start_id), as evaluate.py
starts its windows: the model reads the prompt as the start of a document, not as the middle of one.

The answer is greedy: the model reads the prompt and up to --max-new-tokens (8) tokens are appended one at a time,
stopping at EOS or as soon as a run of digits is followed by a non-digit. The prompt is read once into a KV cache
and each new token attends to it; --no-cache re-reads the whole sequence at each step instead (the same answer, about
7 prompt-length forward passes per trial, and no cache memory: 16 GB at 32k tokens for LLaMA-7B in bf16). Only the
last position's logits are computed (Decoder: model.hidden_states, then model.lm_head on the last row). A trial is
correct when the first run of digits in the answer is exactly the key (as the official PoSE code,
src/eval_passkey.py: "123456" is wrong for 12345).

Memory (memory.eval_plan): on CUDA the KV cache is used where the plan with it fits the free memory, else the run
decodes without it and says so; where neither fits, it stops before loading the weights.
--dry-run prints the plan (weights, KV cache, the forward's largest temporaries, the peak) and the path; it reads
config.json alone.
--gpu-memory GB states a GPU's free memory for a dry run; a CUDA run measures it (torch.cuda.mem_get_info).

Default lengths: the original window times 1, 2, 4, ... up to the window the rotary scaling supports (at least 2x
the original, so that even an unscaled model shows where it breaks). A length beyond the supported window is a
warning: that is the point of the test.
"""
import json
import os
import re
from typing import NamedTuple

import numpy as np
import torch

from lib import cli
from lib import hf
from lib import memory
from lib import evaluation
from data import Tokenizer
from model import KVCache, ModelConfig
from lib.prompts import FILLER, KEY_LINE, QUESTION, TASK, prompt_text  # noqa: F401 (scripts read them here)
from rope import CHECKPOINT, rope_type



# ----------------------------------------------------------------------------------------------------------------
# prompts

class Prompt(NamedTuple):
    ids: list  # token ids, BOS (the tokenizer's start_id) first
    text: str
    n_filler: int  # filler sentences in all
    n_before: int  # filler sentences before the key line

    @property
    def depth(self):
        return self.n_before / self.n_filler if self.n_filler else 0.0


def make_prompt(tokenizer, length, key, depth):
    """The longest prompt of <= `length` tokens (BOS included) with the key at fraction `depth` of its filler.

    Token counts are measured, not assumed: an estimate from the measured tokens per filler sentence, then single
    sentences added or removed until one more would exceed `length`."""
    def make(n):
        before = round(depth * n)
        text = prompt_text(key, n, before)
        return Prompt(tokenizer.encode(text, bos=True), text, n, before)

    shortest = make(0)
    if len(shortest.ids) > length:
        raise ValueError(f"length {length} is too short: the passkey prompt without filler has "
                         f"{len(shortest.ids)} tokens")
    probe = 20 * len(FILLER)
    per_sentence = (len(make(probe).ids) - len(shortest.ids)) / probe
    n = int((length - len(shortest.ids)) / per_sentence)
    prompt = make(n)
    n = max(0, n + int((length - len(prompt.ids)) / per_sentence))  # one correction step from the measured count
    prompt = make(n)
    while len(prompt.ids) > length and n > 0:
        n -= 1
        prompt = make(n)
    while len((longer := make(n + 1)).ids) <= length:
        n, prompt = n + 1, longer
    return prompt


# ----------------------------------------------------------------------------------------------------------------
# decoding and scoring

class Decoder:
    """Greedy decoding with a LLaMA: `start(ids)` reads a prompt, then `step(token)` reads one more token; each
    returns the logits (vocab,) of the token after, computed for the last position only (never (T, vocab)).

    With use_cache the prompt's keys and values go into a KVCache once and each step reads one token against it.
    Dynamic NTK rescales with the sequence length, so cached keys would be stale: it re-reads the whole sequence at
    every step, as use_cache=False does (no cache memory: 16 GB at 32k tokens for LLaMA-7B in bf16)."""

    def __init__(self, model, use_cache=True, max_new_tokens=8):
        self.model, self.device = model, next(model.parameters()).device
        self.use_cache = use_cache and rope_type(model.cfg.rope_scaling) != "dynamic"
        self.max_new_tokens = max_new_tokens  # the cache holds the prompt and this many more tokens
        self.ids, self.cache = [], None

    def start(self, ids):
        self.ids = list(ids)
        self.cache = None  # frees the previous prompt's before the next one is allocated
        if self.use_cache:
            self.cache = KVCache.for_model(self.model, len(self.ids) + self.max_new_tokens)
        return self._logits(self.ids)

    def step(self, token):
        self.ids.append(int(token))
        return self._logits(self.ids[-1:] if self.use_cache else self.ids)

    @torch.inference_mode()
    def _logits(self, ids):
        tokens = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, T)
        h = self.model.hidden_states(tokens, cache=self.cache)[:, -1]  # (1, dim): the last position only
        return self.model.lm_head(h)[0].float()  # (vocab,)


def greedy_answer(decoder, prompt_ids, tokenizer, max_new_tokens=8):
    """The greedy continuation of prompt_ids, decoded: at most max_new_tokens tokens, stopping at EOS or once a run
    of digits has ended (a digit followed by a non-digit). `decoder` has start(ids) and step(token), as Decoder."""
    logits, new = decoder.start(prompt_ids), []
    for i in range(max_new_tokens):
        token = int(logits.argmax())
        if token == tokenizer.eos_id:
            break
        new.append(token)
        if re.search(r"\d\D", tokenizer.decode(new)) or i == max_new_tokens - 1:
            break
        logits = decoder.step(token)
    return tokenizer.decode(new)


def first_number(text):
    """The first run of digits in `text`, or None."""
    match = re.search(r"\d+", text)
    return match.group() if match else None


def run_passkey(model, tokenizer, lengths, trials=50, seed=0, max_new_tokens=8, progress=False, use_cache=True):
    """One record per trial: length, trial, depth, passkey, prompt_tokens, answer, predicted, correct.

    model: a LLaMA, or a decoder (start/step, as Decoder) standing for one."""
    decoder = Decoder(model, use_cache, max_new_tokens) if isinstance(model, torch.nn.Module) else model
    rng = np.random.default_rng(seed)
    records = []
    with cli.progress(len(lengths) * trials, desc="passkey", unit="trial", enabled=progress) as bar:
        for length in lengths:
            correct = 0
            for trial in range(trials):
                key = int(rng.integers(10000, 100000))  # uniform 5-digit key
                prompt = make_prompt(tokenizer, length, key, depth=rng.random())
                answer = greedy_answer(decoder, prompt.ids, tokenizer, max_new_tokens)
                predicted = first_number(answer)
                records.append(dict(length=length, trial=trial, depth=prompt.depth, passkey=key,
                                    prompt_tokens=len(prompt.ids), n_filler=prompt.n_filler, answer=answer,
                                    predicted=predicted, correct=predicted == str(key)))
                correct += records[-1]["correct"]
                bar.update()
                bar.set_postfix(length=length, acc=f"{correct / (trial + 1):.2f}", refresh=False)
    return records


def accuracy_by_length(records):
    rows = []
    for length in dict.fromkeys(r["length"] for r in records):
        rs = [r for r in records if r["length"] == length]
        tokens = [r["prompt_tokens"] for r in rs]
        correct = sum(r["correct"] for r in rs)
        rows.append(dict(length=length, trials=len(rs), correct=correct, accuracy=correct / len(rs),
                         prompt_tokens_min=min(tokens), prompt_tokens_max=max(tokens)))
    return rows


def accuracy_counts(records, lengths, bins):
    """(hits, trials), each (len(lengths), bins): correct answers and trials over length x depth bins
    [i/bins, (i+1)/bins) (depth 1 in the last)."""
    hits, counts = np.zeros((len(lengths), bins), dtype=np.int64), np.zeros((len(lengths), bins), dtype=np.int64)
    for r in records:
        i, j = lengths.index(r["length"]), min(int(r["depth"] * bins), bins - 1)
        hits[i, j] += r["correct"]
        counts[i, j] += 1
    return hits, counts


def accuracy_grid(records, lengths, bins):
    """(len(lengths), bins) accuracy over length x depth bins (accuracy_counts); NaN where no trial fell."""
    hits, counts = accuracy_counts(records, lengths, bins)
    with np.errstate(invalid="ignore"):
        return hits / counts


# ----------------------------------------------------------------------------------------------------------------
# output

def format_table(rows):
    lines = ["| length | prompt tokens | trials | correct | accuracy |", "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        span = str(r["prompt_tokens_min"]) if r["prompt_tokens_min"] == r["prompt_tokens_max"] else \
            f"{r['prompt_tokens_min']}-{r['prompt_tokens_max']}"
        lines.append(f"| {r['length']} | {span} | {r['trials']} | {r['correct']} | {r['accuracy']:.2f} |")
    return "\n".join(lines)


EMPTY_BIN = "0.8"  # light grey, hatched: no colour of the RdYlGn scale


def draw_accuracy_grid(ax, records, lengths, bins, fontsize=7):
    """The accuracy heatmap of `records` on a matplotlib axis: length (rows) x depth bin (columns), each cell annotated
    with its accuracy and its count ("0.50\n(1/2)"); a bin without a trial is hatched grey, "(0/0)" (empty_bin_legend
    says so in a legend). Returns the image (for a colorbar)."""
    from matplotlib.patches import Rectangle

    hits, counts = accuracy_counts(records, lengths, bins)
    with np.errstate(invalid="ignore"):
        grid = hits / counts
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(lengths)):
        for j in range(bins):
            if counts[i, j]:
                text = f"{grid[i, j]:.2f}\n({hits[i, j]}/{counts[i, j]})"
            else:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=EMPTY_BIN, hatch="///", edgecolor="0.6",
                                       linewidth=0))
                text = "(0/0)"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, linespacing=1.1)
    ax.set_xticks(range(bins), [f"{j / bins:.1f}" for j in range(bins)], fontsize=fontsize + 1)
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=fontsize + 1)
    return image


def empty_bin_legend(fig, fontsize=7):
    """The legend entry of draw_accuracy_grid's empty bins, in the figure's lower right corner."""
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(facecolor=EMPTY_BIN, hatch="///", edgecolor="0.6", label="no trial in this bin")],
               loc="lower right", fontsize=fontsize, frameon=False)


def write_plot(path, records, lengths, bins, title):
    """Accuracy heatmap, length (rows) x depth bin (columns), each cell annotated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * bins, 1.2 + 0.55 * len(lengths)))  # two text lines a cell
    image = draw_accuracy_grid(ax, records, lengths, bins)
    ax.set_xlabel("depth of the key (bin start, fraction of the filler)")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    empty = 0.0
    if not accuracy_counts(records, lengths, bins)[1].all():
        empty_bin_legend(fig)
        empty = 0.25 / fig.get_figheight()  # a strip of 0.25 inch at the bottom for it
    fig.tight_layout(rect=(0, empty, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def default_lengths(original, supported):
    """original, 2 original, 4 original, ... up to max(supported, 2 original)."""
    lengths = [original]
    while lengths[-1] * 2 <= max(supported, 2 * original):
        lengths.append(lengths[-1] * 2)
    return lengths


# ----------------------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    p = cli.ArgumentParser(description="Passkey retrieval accuracy over prompt lengths and key depths (PoSE "
                                       "section 4.3).")
    p.add_argument("--model", default=cli.BUNDLED_MODEL, metavar="DIR",
                   help=f"Hugging Face model directory with its tokenizer (default: the bundled tiny base, "
                        f"{os.path.relpath(cli.BUNDLED_MODEL)})")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="prompt lengths in tokens (default: original window x 1, 2, 4, ... up to the supported one)")
    p.add_argument("--trials", type=int, default=50, help="trials per length (default 50, as the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys and depths (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer tokens at most (default 8)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="re-read the whole sequence for each answer token instead of using a KV cache (default: "
                        "cache)")
    cli.add_model_options(p, CHECKPOINT, rows=False)
    cli.add_memory_options(p)
    p.add_argument("--json", metavar="FILE", help="write one record per trial and the accuracy per length "
                                                  "(default: none)")
    p.add_argument("--plot", metavar="FILE", help="write an accuracy heatmap over length x depth (.png, .pdf, ...; "
                                                  "default: none)")
    p.add_argument("--depth-bins", type=int, default=10, help="depth bins of the heatmap (default 10)")
    cli.add_threads(p)
    args = p.parse_args(argv)
    try:
        for n in args.lengths or []:
            cli.positive("--lengths", n)
        for flag in ("trials", "max_new_tokens", "depth_bins"):
            cli.positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
    except ValueError as e:
        p.error(str(e))
    return cli.check_evaluation_args(p, args, [args.rope])


def plan_memory(args):
    """The decoding path, from config.json alone (memory.evaluation_path): a KV cache for the longest prompt and its
    answer where it fits, else none (the prompt and answer re-read at every step)."""
    cfg = ModelConfig(**hf.read_config(args.model))
    scaling, original, supported = memory.rope_windows(cfg, args.rope, args.original_len)
    longest = max(args.lengths or default_lengths(original, supported))
    tokens, dtype = longest + args.max_new_tokens, cli.torch_dtype(args.dtype, args.device)
    paths = [("no cache", memory.eval_plan(cfg, tokens, dtype, no_cache="the prompt and answer re-read per token"))]
    if args.cache and rope_type(scaling) != "dynamic":  # Decoder re-reads under dynamic NTK anyway
        paths.insert(0, ("cached decoding", memory.eval_plan(cfg, longest, dtype, cache_tokens=tokens)))
    what = f"passkey on {os.path.basename(os.path.normpath(args.model))} with prompts up to {longest} tokens"
    return memory.evaluation_path(args, what, paths, "give shorter --lengths")


def main(argv=None):
    args = parse_args(argv)
    cli.set_threads(args.threads)
    use_cache = plan_memory(args) == "cached decoding"  # printed by --dry-run; checked on CUDA before any weight
    if args.dry_run:
        return
    # 1) bad input first: the model directory, its tokenizer, lengths too short for the prompt
    hf.read_config(args.model)
    tok = Tokenizer(args.model)
    for length in args.lengths or []:
        make_prompt(tok, length, 10000, 0.0)
    m = next(evaluation.load([args.model], [args.rope], cli.torch_dtype(args.dtype, args.device), args.device,
                             args.original_len))
    model, scaling, original, supported, name, rope = m.model, m.rope_scaling, m.original, m.supported, m.name, m.rope
    lengths = args.lengths or default_lengths(original, supported)
    m.warn_beyond(lengths, "length")
    # 2) the trials
    records = run_passkey(model, tok, lengths, args.trials, args.seed, args.max_new_tokens, progress=True,
                          use_cache=use_cache)
    rows = accuracy_by_length(records)
    print(f"passkey retrieval, {name}, rope {rope}, {cli.plural(args.trials, 'trial')} per length, seed {args.seed}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, rope=args.rope, rope_scaling=scaling, original_window=original,
                           supported_window=supported, dtype=str(model.lm_head.weight.dtype).removeprefix("torch."),
                           device=args.device, lengths=lengths, trials=args.trials, seed=args.seed,
                           max_new_tokens=args.max_new_tokens, accuracy=rows, records=records), f, indent=2)
    if args.plot:
        write_plot(args.plot, records, lengths, args.depth_bins,
                   f"passkey retrieval: {name}, rope {rope}, {cli.plural(args.trials, 'trial')} per length")


if __name__ == "__main__":
    cli.run(main)
