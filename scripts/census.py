"""The answer-target census of a training run (results/toy/DESIGN.md, section 9): the retrieval practice in its data.

    python scripts/census.py --method pose --rope yarn,beta_fast=4,beta_slow=1 --seed 0      # train.py's arguments
    python scripts/census.py --method full --batch-size 2 --micro-batch-size 2 --seed 1 --json census.json

For every example of the run (train.step_examples for each step: the method's stream; train.replay_windows: the
replay stream), without a model, it counts per stream:
  examples, tokens (real tokens read; padding left out), targets (tokens with a training target)
  answers   answer targets: the first token of a key right after the question "What is the pass key? The pass key
            is" (the space token the tokenizer may put before the digits is not the key), counted where the token
            has a target in the example
  own       the most recent key line ("The pass key is K. ...") that starts before the question in the same example
            holds the answer's key: binned by the distance in model positions from the key line's first key token to
            the answer token (< 256, 256-511, 512-1023, 1024-2047, >= 2048)
  other     the most recent key line holds another key (another episode's: a misleading target)
  none      no key line before the question (an answer the example gives no way to read)
  mentions, key_lines, questions: every occurrence of " pass key", of a key line's head and of the question,
            target or not
Lines are found as token sequences, tokenized in the context they have in an episode (after a newline), so the
census reads exactly what the model reads, for any stream: the books of the method stream (expected: no answer at
all) and the replay pool (expected: every answer "own", < 256 positions, the same counts in every arm of a seed).
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import cli  # noqa: E402
from passkey import FILLER, QUESTION  # noqa: E402

KEY_LINE_HEAD = "The pass key is"  # passkey.KEY_LINE up to the key
BINS = ((0, 256, "<256"), (256, 512, "256-511"), (512, 1024, "512-1023"), (1024, 2048, "1024-2047"),
        (2048, None, ">=2048"))
STREAMS = ("method", "replay")


class Patterns:
    """The token sequences of the question and of a key line's head as they appear after a newline in an episode,
    and which tokens are digits or whitespace (to read the key that follows)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.question = np.array(in_context(tokenizer, QUESTION), dtype=np.int64)
        self.key_line = np.array(in_context(tokenizer, KEY_LINE_HEAD), dtype=np.int64)
        the = len(in_context(tokenizer, "The"))
        self.mention = np.array(in_context(tokenizer, "The pass key")[the:], dtype=np.int64)  # " pass key"
        # each token's text where it follows another (a lone token decodes without its leading space)
        anchor = int(self.key_line[0])
        skip = len(tokenizer.decode([anchor]))
        pieces = [tokenizer.decode([anchor, i])[skip:] for i in range(tokenizer.vocab_size)]
        self.digits = np.array([p.strip().isdigit() for p in pieces])  # tokens made of digits (and a space)
        self.digit_text = [p.strip() if p.strip().isdigit() else "" for p in pieces]
        self.blank = np.array([p != "" and p.strip() == "" for p in pieces])  # e.g. sentencepiece's lone "▁"


def in_context(tokenizer, text, before=FILLER[0] + "\n"):
    """The tokens of `text` where it stands in an episode: after a line of filler and a newline."""
    head = tokenizer.encode(before, bos=False)
    full = tokenizer.encode(before + text, bos=False)
    if full[:len(head)] != head:
        raise ValueError(f"the tokenizer does not split {text!r} from the line before it")
    return full[len(head):]


def find(ids, pattern):
    """Start indices of every occurrence of `pattern` in `ids` (1-D integer arrays)."""
    n = len(pattern)
    if len(ids) < n:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(ids[:len(ids) - n + 1] == pattern[0])
    for j in range(1, n):
        starts = starts[ids[starts + j] == pattern[j]]
    return starts


def read_key(ids, i, patterns, blanks=1):
    """The key that starts at ids[i] (after at most `blanks` whitespace tokens): (index of its first token, digits),
    or (None, "") when no digit follows."""
    while i < len(ids) and blanks and patterns.blank[ids[i]]:
        i, blanks = i + 1, blanks - 1
    first, key = i, ""
    while i < len(ids) and patterns.digits[ids[i]]:
        key += patterns.digit_text[ids[i]]
        i += 1
    return (first, key) if key else (None, "")


def scan(ids, patterns):
    """The key lines and questions of one example: lists of (line start, first key token, key), the key token None
    where the example ends (or breaks) before the key."""
    ids = np.asarray(ids, dtype=np.int64)
    found = []
    for pattern in (patterns.key_line, patterns.question):
        found.append([(int(s), *read_key(ids, int(s) + len(pattern), patterns)) for s in find(ids, pattern)])
    return found


def empty_counts():
    return {"examples": 0, "tokens": 0, "targets": 0, "mentions": 0, "key_lines": 0, "questions": 0, "answers": 0,
            "own": {label: 0 for *_, label in BINS}, "other": 0, "none": 0}


def distance_bin(distance):
    return next(label for low, high, label in BINS if distance >= low and (high is None or distance < high))


def count_example(counts, ids, positions, targets, patterns, real=None):
    """Add one example to `counts` (empty_counts()). positions: the model positions (None: 0..T-1); targets: the
    training targets (None: ids shifted by one, the last -100); real: tokens read (default: all)."""
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.arange(len(ids)) if positions is None else np.asarray(positions)
    if targets is None:
        targets = np.append(ids[1:], -100)
    targets = np.asarray(targets)
    key_lines, questions = scan(ids, patterns)
    counts["examples"] += 1
    counts["tokens"] += len(ids) if real is None else int(real)
    counts["targets"] += int((targets != -100).sum())
    counts["mentions"] += len(find(ids, patterns.mention))
    counts["key_lines"] += len(key_lines)
    counts["questions"] += len(questions)
    for start, answer, key in questions:
        if answer is None or answer == 0 or targets[answer - 1] != ids[answer]:
            continue  # the key is not in the example, or nothing is trained to predict it
        counts["answers"] += 1
        before = [line for line in key_lines if line[0] < start and line[1] is not None]
        if not before:
            counts["none"] += 1
        elif before[-1][2] == key:
            counts["own"][distance_bin(int(positions[answer]) - int(positions[before[-1][1]]))] += 1
        else:
            counts["other"] += 1
    return counts


def add_counts(a, b):
    """a + b, recursively (census counts of two parts)."""
    return {k: add_counts(v, b[k]) if isinstance(v, dict) else v + b[k] for k, v in a.items()}


def arm_census(argv, patterns=None, corpus=None, pool=None):
    """The census of the run `train.py ARGV` would make: {"method": counts, "replay": counts, "steps", "seed"}.

    Builds the run's resolved arguments as train.py does (one process, CPU) and reads the same corpus and pool;
    `corpus` and `pool` may be given (loaded once for several arms of the same data)."""
    import data
    from lib import settings
    import train

    args = settings.from_command_line(list(argv), world=1, device="cpu")
    tokenizer = data.Tokenizer(args.model)
    patterns = patterns or Patterns(tokenizer)
    if corpus is None:
        corpus = data.load_corpus(args.data, tokenizer, min_tokens=args.seq_len)
    if pool is None and args.replay:
        pool = data.ReplayPool(args.replay)
    out = {stream: empty_counts() for stream in STREAMS}
    for step in range(args.steps):
        for ids, positions in train.step_examples(step, args, corpus):
            count_example(out["method"], ids, positions, None, patterns)
        if args.replay:
            for ids, targets in zip(*train.replay_windows(step, args, pool)):
                real = len(ids) if (targets != -100).all() else int(np.flatnonzero(targets != -100)[-1]) + 2
                count_example(out["replay"], ids, None, targets, patterns, real=real)
    return dict(out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, replay_batch=args.replay_batch)


def format_counts(c):
    own = " ".join(f"{k}:{v}" for k, v in c["own"].items())
    return (f"{c['examples']} examples, {c['tokens']:,} tokens, {c['answers']} answers (own {own}; other "
            f"{c['other']}; none {c['none']}), {c['mentions']} mentions of 'pass key', {c['key_lines']} key lines, "
            f"{c['questions']} questions")


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--json", default=None, help="write the census to this file")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args()
    if args.help:
        print(__doc__)
        print("Every other argument is train.py's (--target defaults to 2048 here).")
        return
    if "--target" not in rest:
        rest = ["--target", "2048"] + rest
    result = arm_census(rest)
    for stream in STREAMS:
        print(f"{stream}: {format_counts(result[stream])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
