"""The replay pool of the toy reproduction (results/toy/DESIGN.md, section 5): passkey episodes in fixed windows.

    python scripts/make_replay.py --tokenizer assets/tiny --window 256 --windows 2000 --seed 3 \\
        --out assets/replay/passkey-256.npz

Episodes are those of the base model's pretraining (scripts/make_passkey_corpus.py's episode(): the passkey prompt
of passkey.py with its answer), with the number of filler sentences capped so that BOS + episode (answer included)
fits the window: the cap is the largest count for which every depth of the key fits, measured with the tokenizer.
Whole episodes are packed greedily, in the order drawn, separated by a blank line as in pretraining, into windows
that start with the BOS (the tokenizer's start token); a window takes the next episode while its text, tokenized as a
whole, stays within --window tokens; the rest is padding (the EOS, or 0 without one). No episode is ever cut.

The .npz (train.py --replay, data.ReplayPool):
  input_ids  (P, L) uint16 (int32 for vocabularies over 65536): the windows
  targets    (P, L) int16 / int32: input_ids[t + 1] inside the window's text, -100 at its last token and on padding
  lengths    (P,) int32: real tokens of each window (BOS included)
  episodes   (E, 9) int32, one row per episode, columns in `episode_columns`: window, start, end (its token
             span; from a window's second episode on, the blank line before it included), key_line (first token of
             "The pass key is K"), key (the key line's first key token), question (first token of "What is the pass
             key? ..."), answer (the answer's first key token), n_filler, passkey
  meta       a JSON string: the command's arguments, the filler cap, the tokenizer file and its sha256
Deterministic: the same arguments give the same file.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import census  # noqa: E402
from lib import cli  # noqa: E402
import data  # noqa: E402
from make_passkey_corpus import episode  # noqa: E402
from passkey import prompt_text  # noqa: E402

EPISODE_COLUMNS = ("window", "start", "end", "key_line", "key", "question", "answer", "n_filler", "passkey")
SEPARATOR = "\n\n"


def filler_cap(tokenizer, window):
    """The most filler sentences such that BOS + episode + answer <= window tokens at every depth of the key (keys
    of five digits, the smallest and largest)."""
    def longest(n):
        return max(len(tokenizer.encode(f"{prompt_text(key, n, before)} {key}.", bos=True))
                   for key in (10000, 99999) for before in range(n + 1))

    if longest(1) > window:
        raise ValueError(f"--window {window} is too short for an episode with one filler sentence "
                         f"({longest(1)} tokens)")
    n = 1
    while longest(n + 1) <= window:
        n += 1
    return n


def pack(rng, tokenizer, window, windows, cap):
    """`windows` lists of episode texts, each list's text (BOS + episodes joined by blank lines) <= window tokens."""
    packed, current = [], []
    while len(packed) < windows:
        text = episode(rng, cap)
        if len(tokenizer.encode(text, bos=True)) > window:
            raise AssertionError(f"an episode of {len(tokenizer.encode(text, bos=True))} tokens exceeds the cap")
        if current and len(tokenizer.encode(SEPARATOR.join(current + [text]), bos=True)) > window:
            packed.append(current)
            current = []
        current.append(text)
    return packed


def build(tokenizer, window, windows, seed):
    """(input_ids, targets, lengths, episodes, cap) of the pool; see the module docstring."""
    patterns = census.Patterns(tokenizer)
    cap = filler_cap(tokenizer, window)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ids = np.full((windows, window), pad, dtype=np.int64)
    targets = np.full((windows, window), -100, dtype=np.int64)
    lengths = np.zeros(windows, dtype=np.int64)
    rows = []
    for w, texts in enumerate(pack(np.random.default_rng(seed), tokenizer, window, windows, cap)):
        tokens = tokenizer.encode(SEPARATOR.join(texts), bos=True)
        n = len(tokens)
        ids[w, :n], targets[w, :n - 1], lengths[w] = tokens, tokens[1:], n
        key_lines, questions = census.scan(tokens, patterns)
        if len(key_lines) != len(texts) or len(questions) != len(texts):
            raise AssertionError(f"window {w}: {len(texts)} episodes but {len(key_lines)} key lines and "
                                 f"{len(questions)} questions found")
        start = 0
        for j, text in enumerate(texts):
            prefix = SEPARATOR.join(texts[:j + 1])
            end = len(tokenizer.encode(prefix, bos=True))
            if tokens[:end] != tokenizer.encode(prefix, bos=True):
                raise AssertionError(f"window {w}: the tokens of episode {j} depend on the episode after it")
            (line, key_at, key), (question, answer, answer_key) = key_lines[j], questions[j]
            passkey = int(text.rsplit(" ", 1)[1].rstrip("."))
            if not start <= line < key_at < question < answer < end or key != answer_key or key != str(passkey):
                raise AssertionError(f"window {w}, episode {j}: key line / question / answer out of place")
            n_filler = sum(text.count(f) for f in census.FILLER)
            rows.append((w, start, end, line, key_at, question, answer, n_filler, passkey))
            start = end
    return ids, targets, lengths, np.array(rows, dtype=np.int64), cap


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a tokenizer file or a checkpoint directory (assets/tiny)")
    p.add_argument("--window", type=int, default=256, help="tokens per window (the base model's window)")
    p.add_argument("--windows", type=int, default=2000, help="windows in the pool")
    p.add_argument("--seed", type=int, default=3, help="seed of the episodes (pretraining used 0 and 1)")
    p.add_argument("--out", required=True, help=".npz file to write")
    args = p.parse_args()
    tokenizer = data.Tokenizer(args.tokenizer)
    ids, targets, lengths, episodes, cap = build(tokenizer, args.window, args.windows, args.seed)
    id_dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    target_dtype = np.int16 if tokenizer.vocab_size <= 2**15 else np.int32
    meta = dict(window=args.window, windows=args.windows, seed=args.seed, filler_cap=cap,
                tokenizer=os.path.relpath(tokenizer.path), tokenizer_sha256=data.file_sha256(tokenizer.path),
                start_id=tokenizer.start_id, pad_id=tokenizer.eos_id if tokenizer.eos_id is not None else 0,
                episodes=len(episodes), tokens=int(lengths.sum()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, input_ids=ids.astype(id_dtype), targets=targets.astype(target_dtype),
                        lengths=lengths.astype(np.int32), episodes=episodes.astype(np.int32),
                        episode_columns=np.array(EPISODE_COLUMNS), meta=np.array(json.dumps(meta)))
    os.replace(tmp, args.out)
    per_window = np.bincount(episodes[:, 0], minlength=args.windows)
    print(f"wrote {args.out}: {args.windows} windows of {args.window} tokens, {len(episodes)} episodes "
          f"({per_window.min()}-{per_window.max()} per window, mean {per_window.mean():.2f}), filler cap {cap}, "
          f"{lengths.sum():,} real tokens ({lengths.sum() / ids.size:.0%}), {os.path.getsize(args.out) / 2**20:.2f} MB")


if __name__ == "__main__":
    cli.run(main)
