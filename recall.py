"""Recall by distance: how far back can a model use its context? Copy recall on natural text, the passkey at a fixed
distance, and several labelled keys with one asked for.

    python recall.py --model out/pose-16k --distances 1024 2048 4096 8192 16384 --json recall.json --plot recall.png
    python recall.py --model llama-7b --rope none linear:8 --distances 1024 4096 16384     # the same weights, 2 rows
    # tiny CPU run (a minute or two): the bundled base (a 256-token window) and its extension
    python recall.py --model assets/tiny --model out/pose-2048 --distances 64 128 192 512 1024 1536
    python recall.py --model out/pose-16k --device cuda --gpu-memory 24 --dry-run              # will it fit?

Why. Perplexity beyond the window says whether a model is broken more than whether it uses what it read, and the
passkey at a random depth saturates: a method can pass both and still not read far back. Each task here puts the
thing to recall exactly d tokens before the point where it is needed, so accuracy is a function of distance.

The tasks (every construction is a pure function of --seed, the distances and the tokenizer: models that share a
tokenizer read identical sequences):
  - copy: natural held-out filler (--data, default the bundled plays) in which a passage of --passage tokens, taken
    from elsewhere in the held-out text, appears twice, the second time starting exactly d tokens after the first.
    Scored: the NLL (and top-1 accuracy) of the passage's tokens 2..P at the second occurrence (`copy_nll`) against
    the same tokens at the first (`first_nll`); their first token is not scored, as nothing announces the passage.
    A model that copies has copy_nll far below first_nll; one that cannot see d tokens back has them equal. Each
    sequence holds one probe per distance of its length group (below), at random non-overlapping places: one
    forward pass scores them all. --sequences sequences per group.
  - passkey: the paper's passkey prompt (passkey.py, lib/prompts.py) whose key line starts exactly d positions before
    the position that generates the answer, the filler before the key sized to the group's length. Filler after
    the key is whole sentences, the last one cut to the token so that the distance is exact.
  - multikey: --keys labelled keys ("The pass key of the river is ...") in the same filler, the asked one exactly d
    before the answer, the others (distractors) at random sentence boundaries before and after it; a model that
    reads the most recent key instead of the asked one fails.
Passkey and multikey are scored by teacher forcing in one forward pass over the prompt and its answer: a trial is
correct when, at every answer token up to the key's last digit, the model's top-1 token is the answer's (its greedy
answer starts with the key) and the token it predicts next does not start with a digit; the key's mean NLL is kept as
a graded measure. That equals passkey.py's greedy exact match except when the model spells the key with another
tokenization of the same digits, which then counts as wrong here.

Lengths. A distance is measured in sequences of the shortest length of the ladder window x 1, 2, 4, ... that holds it
(d + 2 passages for copy): distances inside the window are measured in window-long sequences, where the base model is
on home ground, so the in-window rows say what the model can do at all before any row beyond it is read as failing at
length. Each record keeps the length it was measured at.

Effective distance: per task, the largest tested distance d such that every tested distance up to d meets a
threshold: passkey and multikey accuracy >= 0.5, copy NLL at most half the first-sight NLL (KEY_THRESHOLD,
COPY_THRESHOLD). It is 0 when even the shortest distance fails.

Output: a table per model on stdout and its effective distances, one line per task (progress on stderr, a line
every 30 s in a log file); --json with, per model, `distances` and the per-distance means
`first_nll`, `copy_nll`, `copy_ratio`, `copy_accuracy`, `passkey_accuracy`, `passkey_nll`, `multikey_accuracy` (lists
aligned with `distances`, null where a task was skipped), `effective_distance` ({task: d}), and every probe (with its
`sequence`) and trial; --plot draws each metric against distance, the original window and the supported window
marked.

Memory (memory.eval_plan): one forward pass per sequence, no KV cache, planned for the longest sequence from the
distances alone. On CUDA the plan is checked against the free memory before any weight is loaded.
--dry-run prints the plan (weights, KV cache, the forward's largest temporaries, the peak); it reads config.json alone.
--gpu-memory GB states a GPU's free memory for a dry run; a CUDA run measures it (torch.cuda.mem_get_info).
"""
import json
import os
from typing import NamedTuple

import numpy as np
import torch

from lib import cli
import data
from lib import hf
from lib import memory
from lib import evaluation
from model import ModelConfig
from lib.prompts import FILLER, KEY_LINE, QUESTION, TASK
from rope import CHECKPOINT

TASKS = ("copy", "passkey", "multikey")
LABELS = ("river", "apple", "castle", "violin", "garden", "rocket", "candle", "forest", "mirror", "tiger", "harbor",
          "lantern")  # multikey: what each key belongs to
MULTI_KEY_LINE = "The pass key of the {label} is {key}. Remember it. {key} is the pass key of the {label}."
MULTI_QUESTION = "What is the pass key of the {label}? The pass key of the {label} is"


def group_length(need, window):
    """The shortest of window x 1, 2, 4, ... that holds `need` tokens."""
    length = window
    while length < need:
        length *= 2
    return length


# ----------------------------------------------------------------------------------------------------------------
# copy recall

class Probe(NamedTuple):
    distance: int
    first: int  # position of the passage's first token at its first occurrence; the second starts at first + distance
    source: int  # where the passage was taken from, in the held-out stream


class CopySequence(NamedTuple):
    ids: np.ndarray  # (length,) int64, the start token first
    probes: list
    filler: int  # where the filler was taken from, in the held-out stream
    name: str = ""  # "LENGTH/DRAW/K": copy_sequences' draw DRAW of that length, K > 0 for its further sequences


def held_out_stream(corpus):
    """The held-out documents back to back, without their start tokens: one stream of natural text."""
    return np.concatenate([np.asarray(corpus[i][1:], dtype=np.int64) for i in range(len(corpus))])


def copy_sequence(stream, start_id, length, distances, passage, rng, name=""):
    """One sequence of `length` tokens, called `name`: the start token, then filler from a random place of `stream`,
    with as many of `distances` as fit (in random order) each as a probe: a passage of `passage` tokens from elsewhere
    in the stream written over the filler at `first` and again at `first + distance`. The first occurrence has at least
    `passage` tokens of filler before it; no two occurrences overlap or touch. Returns the sequence and the
    distances that did not fit."""
    if len(stream) < length + 4 * passage:
        raise ValueError(f"the held-out text has {len(stream)} tokens, too few for sequences of {length} and passages "
                         f"from outside them")
    filler = int(rng.integers(0, len(stream) - length + 2))
    ids = np.concatenate([[start_id], stream[filler:filler + length - 1]]).astype(np.int64)
    taken, probes, left = [], [], []  # taken: [begin, end) of every occurrence so far
    for d in map(int, rng.permutation(distances)):
        for _ in range(100):
            first = int(rng.integers(passage, length - d - passage + 1))
            spans = [(first, first + passage), (first + d, first + d + passage)]
            if all(e < b0 or b > e0 for b, e in spans for b0, e0 in taken):  # a gap of >= 1 token between spans
                break
        else:
            left.append(d)
            continue
        # the passage: anywhere in the stream but inside (or next to) this sequence's filler
        source = int(rng.integers(0, len(stream) - length - 3 * passage))
        if source > filler - 2 * passage:
            source += length + 2 * passage
        ids[first:first + passage] = ids[first + d:first + d + passage] = stream[source:source + passage]
        taken += spans
        probes.append(Probe(d, first, source))
    return CopySequence(ids, sorted(probes), filler, name), sorted(left)


def copy_sequences(stream, start_id, distances, window, passage, sequences, seed, skip=0):
    """Every copy sequence: `sequences` probes per distance, each in a sequence of its length group (group_length);
    the distances of a group share sequences as far as they fit. Draw s of a group is one sequence holding every
    distance of the group, or, when they do not all fit, further sequences holding the rest. The first `skip` draws
    of each group are left out (a later call adds draws to those scored before); the places of every probe depend
    on the seed, the distances and the lengths only, not on the text."""
    groups = {}
    for d in distances:
        groups.setdefault(group_length(d + 2 * passage + 1, window), []).append(d)
    out = []
    for length, ds in sorted(groups.items()):
        for s in range(skip, sequences):
            left, k = ds, 0
            while left:
                rng = np.random.default_rng([seed, 0x434F5059, length, s, k])  # "COPY"
                seq, rest = copy_sequence(stream, start_id, length, left, passage, rng, f"{length}/{s}/{k}")
                if rest == left:
                    raise ValueError(f"cannot place a copy probe at distance {left[0]} in {length} tokens")
                out.append(seq)
                left, k = rest, k + 1
    return out


@torch.inference_mode()
def score_rows(model, ids, rows, targets):
    """NLL and top-1 of targets[i] predicted at position rows[i] of one forward pass over `ids`.

    The network runs over the whole sequence once; the output layer only over the rows that are scored."""
    device = next(model.parameters()).device
    h = model.hidden_states(torch.as_tensor(ids, device=device)[None])[0]  # (T, dim)
    logp = torch.log_softmax(model.lm_head(h[torch.as_tensor(rows, device=device)]).float(), dim=-1)  # (R, vocab)
    targets = torch.as_tensor(targets, device=device)
    nll, top = -logp.gather(1, targets[:, None])[:, 0], logp.argmax(-1)
    return nll.double().cpu().numpy(), top.cpu().numpy(), (top == targets).cpu().numpy()


def score_copy(model, seq, passage):
    """Per probe: NLL and top-1 accuracy of the passage's tokens 2..P at its first and at its second occurrence."""
    rows, targets = [], []
    for p in seq.probes:
        for start in (p.first, p.first + p.distance):
            rows += range(start, start + passage - 1)  # position t predicts token t + 1
            targets += seq.ids[start + 1:start + passage].tolist()
    nll, _, hit = score_rows(model, seq.ids, rows, targets)
    n = passage - 1
    records = []
    for i, p in enumerate(seq.probes):
        a, b = 2 * i * n, (2 * i + 1) * n
        records.append(dict(distance=p.distance, length=len(seq.ids), sequence=seq.name, first=p.first,
                            source=p.source, first_nll=float(nll[a:b].mean()), copy_nll=float(nll[b:b + n].mean()),
                            first_accuracy=float(hit[a:b].mean()), copy_accuracy=float(hit[b:b + n].mean())))
    return records


# ----------------------------------------------------------------------------------------------------------------
# passkey and multikey at a fixed distance

class DistanceTooShort(ValueError):
    pass


class KeyPrompt(NamedTuple):
    ids: list  # the prompt, start token first; the answer is generated at position len(ids)
    answer: list  # the answer's tokens up to the key's last digit (teacher-forced)
    length: int  # the length group: len(ids) <= length
    key_start: int  # where the asked key line starts: len(ids) - key_start == the distance
    key: int
    distractors: list  # (label, key, after the asked key?) of the other keys


def aligned_prefix(tok, text, prefix):
    """len(tok.encode(prefix)) when the tokens of `prefix` begin the tokens of `text`, else an error: the distance
    is counted in the tokens the model reads, which a boundary merged across the prefix would make ambiguous."""
    full, head = tok.encode(text, bos=True), tok.encode(prefix, bos=True)
    if full[:len(head)] != head:
        raise ValueError(f"the tokenizer merges tokens across {prefix[-20:]!r} | {text[len(prefix):][:20]!r}; "
                         "recall prompts need line boundaries that tokenize apart")
    return full, len(head)


def filler_lines(sentences, inserts):
    """Filler lines: the sentences joined by spaces, broken by the inserted lines (inserts[i] go before sentence i)."""
    lines, current = [], []
    for i in range(len(sentences) + 1):
        for line in inserts.get(i, []):
            lines, current = lines + ([" ".join(current)] if current else []) + [line], []
        if i < len(sentences):
            current.append(sentences[i])
    return lines + ([" ".join(current)] if current else [])


def largest_within(f, limit):
    """The largest n >= 0 with f(n) <= limit, for f increasing by about the same amount per step (-1 if none): an
    estimate from f(0) and f(20), then single steps."""
    f0 = f(0)
    if f0 > limit:
        return -1
    n = max(0, int((limit - f0) / max(1e-9, (f(20) - f0) / 20)))
    while n > 0 and f(n) > limit:
        n -= 1
    while f(n + 1) <= limit:
        n += 1
    return n


def key_prompt(tok, window, distance, key, rng, labels=()):
    """A passkey prompt (no labels) or a multikey prompt (labels[0] asked for, the others distractors) whose asked key
    line starts exactly `distance` tokens before the answer position. Its length is at most the shortest of window x
    1, 2, 4, ... that holds the shortest such prompt (group_length).

    One part per line, as the paper's prompt: the task, filler, the key line, filler, the question; distractor lines
    at random sentence boundaries of either filler (all before the key when the distance leaves no room after it),
    never after the last sentence. The filler after the key line restarts the sentence cycle and is the fewest whole
    sentences that reach the distance (at least one), the last one then cut to the token; the filler before it is the
    most sentences that fit in that length."""
    keys = [key] + [int(k) for k in rng.integers(10000, 100000, size=max(0, len(labels) - 1))]
    if labels:
        lines = [MULTI_KEY_LINE.format(label=label, key=k) for label, k in zip(labels, keys)]
        question = MULTI_QUESTION.format(label=labels[0])
    else:
        lines, question = [KEY_LINE.format(key=key)], QUESTION
    after, place = rng.random(len(lines) - 1) < 0.5, rng.random(len(lines) - 1)  # each distractor's side and place

    def texts(n_before, n_after):
        """(everything before the key line, everything before the question's line break, the question part)."""
        inserts = ({}, {})
        for i, (a, x) in enumerate(zip(after, place)):
            n = n_after if a else n_before
            inserts[int(a)].setdefault(min(int(x * (n + 1)), n - 1) if a else int(x * (n + 1)), []).append(
                lines[i + 1])
        before = [TASK] + filler_lines([FILLER[i % len(FILLER)] for i in range(n_before)], inserts[0])
        body = before + [lines[0]] + filler_lines([FILLER[i % len(FILLER)] for i in range(n_after)],
                                                  inserts[1])
        return "\n".join(before) + "\n", "\n".join(body), "\n" + question

    def reach(n_before, n_after):  # tokens from the key line's start to the answer position
        head, body, tail = texts(n_before, n_after)
        return len(tok.encode(body + tail)) - len(tok.encode(head))

    if reach(0, 1) > distance:  # no room after the key for its distractors: they all go before it
        after[:] = False
    if reach(0, 1) > distance:
        raise DistanceTooShort(f"distance {distance} is shorter than the key line, a sentence and the question")
    n_after = largest_within(lambda n: reach(0, n + 1), distance - 1) + 2  # the fewest with reach >= distance
    excess = reach(0, n_after) - distance
    size = lambda n: len(tok.encode("".join(texts(n, n_after)[1:]))) - excess  # noqa: E731 (the prompt's tokens)
    length = group_length(size(0), window)
    n_before = largest_within(size, length)
    head, body, tail = texts(n_before, n_after)
    full, key_start = aligned_prefix(tok, body + tail, head)
    _, cut = aligned_prefix(tok, body + tail, body)
    ids = full[:cut - excess] + full[cut:]  # the last filler sentence cut: len(ids) - key_start == distance
    assert len(ids) - key_start == distance and len(ids) <= length
    # the answer as the text continues, " 12345." tokenized with the prompt, up to the key's last digit
    with_answer, n_prompt = aligned_prefix(tok, body + tail + f" {key}.", body + tail)
    answer = with_answer[n_prompt:]
    last_digit = max(i for i, t in enumerate(answer) if any(c.isdigit() for c in tok.decode([t])))
    distractors = list(zip(labels[1:], keys[1:], after.tolist()))
    return KeyPrompt(ids, answer[:last_digit + 1], length, key_start, key, distractors)


def score_key(model, tok, prompt):
    """Teacher-forced exact match and mean NLL of the key (module docstring)."""
    ids = prompt.ids + prompt.answer
    n = len(prompt.ids)
    rows = list(range(n - 1, len(ids)))  # predicts answer[0], ..., answer[-1] and the token after the key
    targets = prompt.answer + [prompt.answer[-1]]  # the last target is a placeholder: only its argmax is read
    nll, top, hit = score_rows(model, ids, rows, targets)
    after = tok.decode([int(top[-1])])
    correct = bool(hit[:-1].all()) and not after[:1].isdigit()
    return dict(correct=correct, key_nll=float(nll[:-1].mean()))


def key_trials(model, tok, task, distances, window, trials, seed, keys, bar):
    records = []
    for d in distances:
        for trial in range(trials):
            rng = np.random.default_rng([seed, 0x4B4559, int(task == "multikey"), d, trial])  # "KEY"
            key = int(rng.integers(10000, 100000))
            labels = tuple(LABELS[i] for i in rng.permutation(len(LABELS))[:keys]) if task == "multikey" else ()
            try:
                prompt = key_prompt(tok, window, d, key, rng, labels)
            except DistanceTooShort:  # e.g. 64 tokens cannot hold a labelled key line and its question: no trial
                bar.update(trials - trial)
                break
            r = score_key(model, tok, prompt)
            records.append(dict(distance=d, trial=trial, length=prompt.length, prompt_tokens=len(prompt.ids), key=key,
                                distractors=len(prompt.distractors), **r))
            bar.update()
    return records


# ----------------------------------------------------------------------------------------------------------------
# one model, all tasks

def run_recall(model, tok, stream, distances, window, tasks=TASKS, passage=32, sequences=8, trials=20, keys=4,
               seed=0, progress=False):
    """Every record of every task for one model: {"copy": [...], "passkey": [...], "multikey": [...]}."""
    out = {}
    seqs = copy_sequences(stream, tok.start_id, distances, window, passage, sequences, seed) if "copy" in tasks else []
    total = len(seqs) + trials * len(distances) * sum(t in tasks for t in ("passkey", "multikey"))
    with cli.progress(total, desc=progress if isinstance(progress, str) else None, unit="seq",
                      enabled=bool(progress)) as bar:
        if "copy" in tasks:
            out["copy"] = []
            for seq in seqs:
                out["copy"] += score_copy(model, seq, passage)
                bar.update()
        for task in ("passkey", "multikey"):
            if task in tasks:
                out[task] = key_trials(model, tok, task, distances, window, trials, seed, keys, bar)
    return out


def summarize(records, distances):
    """Per-distance means, lists aligned with `distances` (None for a task not run)."""
    def mean(task, field):
        if task not in records:
            return [None] * len(distances)
        values = [[r[field] for r in records[task] if r["distance"] == d] for d in distances]
        return [float(np.mean(v)) if v else None for v in values]

    first, copy = mean("copy", "first_nll"), mean("copy", "copy_nll")
    return dict(distances=list(distances), first_nll=first, copy_nll=copy,
                copy_ratio=[c / f if c is not None else None for c, f in zip(copy, first)],
                copy_accuracy=mean("copy", "copy_accuracy"), first_accuracy=mean("copy", "first_accuracy"),
                passkey_accuracy=mean("passkey", "correct"), passkey_nll=mean("passkey", "key_nll"),
                multikey_accuracy=mean("multikey", "correct"))


KEY_THRESHOLD = 0.5
"""Passkey and multikey: a distance is recalled when at least this share of its trials is correct."""
COPY_THRESHOLD = 0.5
"""Copy: a distance is recalled when the mean second-sight NLL is at most this fraction of the first-sight NLL."""
THRESHOLDS = {"copy": f"copy NLL <= {COPY_THRESHOLD} x first NLL", "passkey": f"accuracy >= {KEY_THRESHOLD}",
              "multikey": f"accuracy >= {KEY_THRESHOLD}"}


def effective_distance(summary):
    """How far back a model recalls, per task with values in `summary` (summarize's means): the largest tested
    distance d such that every tested distance up to d meets the task's threshold (KEY_THRESHOLD, COPY_THRESHOLD).
    It is 0 when even the shortest tested distance fails. A pass beyond the first failure does not count. A distance
    without a value (no trial fits it) is not tested."""
    none = [None] * len(summary["distances"])
    passed = {
        "copy": [None if c is None else c <= COPY_THRESHOLD * f
                 for c, f in zip(summary.get("copy_nll") or none, summary.get("first_nll") or none)],
        "passkey": [None if a is None else a >= KEY_THRESHOLD for a in summary.get("passkey_accuracy") or none],
        "multikey": [None if a is None else a >= KEY_THRESHOLD for a in summary.get("multikey_accuracy") or none]}
    reach = {}
    for task, ok in passed.items():
        tested = sorted((d, p) for d, p in zip(summary["distances"], ok) if p is not None)
        if tested:
            reach[task] = 0
            for d, p in tested:
                if not p:
                    break
                reach[task] = d
    return reach


# ----------------------------------------------------------------------------------------------------------------
# output

def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(summary, lengths):
    lines = ["| distance | length | first NLL | copy NLL | ratio | copy top-1 | passkey | key NLL | multikey |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, d in enumerate(summary["distances"]):
        lines.append(f"| {d} | {lengths[i]} | {fmt(summary['first_nll'][i])} | {fmt(summary['copy_nll'][i])} | "
                     f"{fmt(summary['copy_ratio'][i])} | {fmt(summary['copy_accuracy'][i])} | "
                     f"{fmt(summary['passkey_accuracy'][i])} | {fmt(summary['passkey_nll'][i])} | "
                     f"{fmt(summary['multikey_accuracy'][i])} |")
    return "\n".join(lines)


def write_plot(path, rows):
    """Copy NLL ratio, passkey and multikey accuracy against distance, one line per row; the original window
    (dotted) and the supported window (dashed) of each row marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("copy_ratio", "copy NLL / first-sight NLL"), ("passkey_accuracy", "passkey accuracy"),
              ("multikey_accuracy", "multikey accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (metric, title) in zip(axes, panels):
        for k, row in enumerate(rows):
            s = row["summary"]
            pairs = [(d, v) for d, v in zip(s["distances"], s[metric]) if v is not None]
            if pairs:
                line, = ax.plot(*zip(*pairs), marker="o", ms=3, label=row["name"])
                for x, style in ((row["original_window"], ":"), (row["supported_window"], "--")):
                    ax.axvline(x, color=line.get_color(), ls=style, lw=0.8, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distance (tokens)")
        ax.set_title(title, fontsize=9)
        if metric != "copy_ratio":
            ax.set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=7)
    fig.suptitle("recall by distance (dotted: original window, dashed: supported window)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    p = cli.ArgumentParser(description="Recall by distance: copy recall on natural text, passkey at a fixed distance, "
                                       "multi-key retrieval with distractors.")
    p.add_argument("--model", action="append", metavar="DIR",
                   help=f"Hugging Face model directory with its tokenizer; repeat for several rows (default: the "
                        f"bundled tiny base, {os.path.relpath(cli.BUNDLED_MODEL)})")
    p.add_argument("--data", default=cli.BUNDLED_EVAL, help="held-out text for the filler and the passages (default: "
                                                        "the bundled held-out plays)")
    p.add_argument("--distances", type=int, nargs="+", default=None,
                   help="distances in tokens (default: window x 1/4, 1/2, 3/4, 1, 2, 4, ... up to the supported one)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="default: all")
    p.add_argument("--passage", type=int, default=32, help="copy: passage length in tokens (default 32)")
    p.add_argument("--sequences", type=int, default=8, help="copy: sequences per length group, each with one probe "
                                                            "per distance of the group (default 8)")
    p.add_argument("--trials", type=int, default=20, help="passkey and multikey: trials per distance (default 20)")
    p.add_argument("--keys", type=int, default=4, help="multikey: keys per prompt, one asked for (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of every construction (default 0)")
    cli.add_model_options(p, CHECKPOINT)
    cli.add_memory_options(p)
    cli.add_threads(p)
    p.add_argument("--json", metavar="FILE", help="write the means and every probe and trial to FILE")
    p.add_argument("--plot", metavar="FILE", help="write the metrics against distance (.png, .pdf, ...)")
    args = p.parse_args(argv)
    args.model = args.model or [cli.BUNDLED_MODEL]
    try:
        for flag in ("passage", "sequences", "trials"):
            cli.positive(f"--{flag}", getattr(args, flag))
        cli.positive("--keys", args.keys, 2)
        if args.keys > len(LABELS):
            raise ValueError(f"--keys must be at most {len(LABELS)}, got {args.keys}")
        if args.passage < 2:
            raise ValueError(f"--passage must be >= 2 (its first token is not scored), got {args.passage}")
        for d in args.distances or []:
            if d < args.passage + 1:
                raise ValueError(f"--distances must be > --passage ({args.passage}): the two occurrences would "
                                 f"overlap, got {d}")
    except ValueError as e:
        p.error(str(e))
    return cli.check_evaluation_args(p, args, args.rope)


def default_distances(window, supported):
    distances = [window // 4, window // 2, 3 * window // 4]
    while distances[-1] * 2 <= supported or distances[-1] < window:
        distances.append(window if distances[-1] < window else distances[-1] * 2)
    return distances


def longest_forward(distances, window, passage, tasks, keys):
    """(tokens, rows): upper bounds of the longest forward pass and of the rows its output layer scores, from the
    distances alone (no tokenizer). A copy sequence fills its length group and scores 2 x (passage - 1) rows per
    probe, one probe per distance at most. A key prompt fills the length group of the distance plus the text before
    its key line (the task and the distractors: at most a token per character, a BOS and a leading space), then reads
    its answer (a space and 5 digits) and scores those tokens and the one after."""
    distractor = len(MULTI_KEY_LINE.format(label=max(LABELS, key=len), key=99999)) + 1
    before = 2 + len(TASK) + 1 + (keys - 1) * distractor * ("multikey" in tasks)
    lengths = [group_length(d + 2 * passage + 1, window) for d in distances] if "copy" in tasks else []
    if {"passkey", "multikey"} & set(tasks):
        lengths += [group_length(d + before, window) + 6 for d in distances]
    return max(lengths), max(2 * (passage - 1) * len(distances) * ("copy" in tasks), 7)


def plan_memory(args):
    """The memory plan of every model's rows, from its config.json alone (memory.evaluation_path): one teacher-forced
    forward pass per sequence, no KV cache, over the longest sequence of any --rope row."""
    for path in args.model:
        cfg = ModelConfig(**hf.read_config(path))
        tokens, rows = 0, 0
        for spec in args.rope:
            _, original, supported = memory.rope_windows(cfg, spec, args.original_len)
            distances = args.distances or default_distances(original, supported)
            tokens, rows = map(max, zip((tokens, rows), longest_forward(distances, original, args.passage,
                                                                         args.tasks, args.keys)))
        plan = memory.eval_plan(cfg, tokens, cli.torch_dtype(args.dtype, args.device), logit_rows=rows,
                                no_cache="each sequence scored in one forward pass")
        what = f"recall of {os.path.basename(os.path.normpath(path))} in sequences up to {tokens} tokens"
        memory.evaluation_path(args, what, [("one forward pass per sequence", plan)], "give shorter --distances")


def main(argv=None):
    args = parse_args(argv)
    cli.set_threads(args.threads)
    plan_memory(args)  # printed by --dry-run; checked on CUDA before any weight is loaded
    if args.dry_run:
        return
    # 1) bad input first: every model directory, its tokenizer and the held-out text
    streams = {}
    for path in args.model:
        hf.read_config(path)
        tok = data.Tokenizer(path)
        if tok.path not in streams:
            streams[tok.path] = (tok, held_out_stream(data.load_corpus(args.data, tokenizer=tok)))
    dtype = cli.torch_dtype(args.dtype, args.device)
    rows = []
    for m in evaluation.load(args.model, args.rope, dtype, args.device, args.original_len):
        model, path, name, spec, original, supported, scaling, rope = (m.model, m.path, m.name, m.spec, m.original,
                                                                      m.supported, m.rope_scaling, m.rope)
        tok, stream = streams[data.Tokenizer(path).path]
        distances = args.distances or default_distances(original, supported)
        lengths = [group_length(d + 2 * args.passage + 1, original) for d in distances]
        if max(lengths) > supported:
            cli.warn(f"{name} with rope {rope} supports {supported} positions; the longest recall sequence "
                     f"has {max(lengths)}")
        records = run_recall(model, tok, stream, distances, original, args.tasks, args.passage, args.sequences,
                             args.trials, args.keys, args.seed, progress=f"{name} {rope}")
        summary = summarize(records, distances)
        reach = effective_distance(summary)
        rows.append(dict(model=path, name=name, rope=spec, rope_scaling=scaling, original_window=original,
                         supported_window=supported, summary=summary, effective_distance=reach,
                         lengths=lengths, records=records))
        print(f"recall by distance, {name}, rope {rope} (window {original}, supported {supported}); copy: "
              f"{args.sequences} sequences per length, passage {args.passage}; passkey/multikey "
              f"({args.keys} keys): {args.trials} trials per distance; seed {args.seed}")
        print(format_table(summary, lengths))
        for task, d in reach.items():
            print(f"effective distance, {task}: {d} (the largest d with {THRESHOLDS[task]} at every tested "
                  f"distance up to d; 0: not even at the shortest)")
    if args.json:
        settings = {k: getattr(args, k) for k in ("data", "tasks", "passage", "sequences", "trials", "keys", "seed")}
        result = dict(settings=settings, rows=[{**{k: v for k, v in r.items() if k != "summary"}, **r["summary"]}
                                               for r in rows])
        if len(rows) == 1:  # one row: its means and effective distances at the top level too
            result.update(rows[0]["summary"], effective_distance=rows[0]["effective_distance"])
        cli.write_text_atomically(args.json, json.dumps(result, indent=1))
    if args.plot:
        write_plot(args.plot, rows)


if __name__ == "__main__":
    cli.run(main)
