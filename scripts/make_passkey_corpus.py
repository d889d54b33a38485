"""Synthetic passkey documents mixed into the tiny base model's pretraining (README, "The bundled tiny model").

A model of a few million parameters trained on a few million tokens of books does not learn to copy a number it
read 200 tokens earlier; LLaMA learned that from its trillion-token corpus. So the tiny base model also reads
documents made of passkey episodes -- the evaluation prompt of passkey.py (task, filler, key line at a random depth,
question) followed by the answer -- all short enough to fit its 256-token window. It learns retrieval *inside* its
window; whether retrieval works beyond it after context extension is what passkey.py then measures. Deterministic.

    python scripts/make_passkey_corpus.py --out out/pretrain-data/passkey.jsonl --docs 60
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from passkey import prompt_text  # noqa: E402


def episode(rng, max_filler):
    """One prompt with its answer: the key after a uniformly random number of the n filler sentences."""
    key = int(rng.integers(10000, 100000))
    n = int(rng.integers(1, max_filler + 1))
    return f"{prompt_text(key, n, int(rng.integers(0, n + 1)))} {key}."


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="jsonl file to write")
    p.add_argument("--docs", type=int, default=60, help="documents (of --episodes episodes each)")
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--max-filler", type=int, default=36, help="most filler sentences in an episode (36: about 250 "
                                                               "tokens with the 4096-token tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        for _ in range(args.docs):
            text = "\n\n".join(episode(rng, args.max_filler) for _ in range(args.episodes))
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.docs} documents of {args.episodes} passkey episodes to {args.out}")


if __name__ == "__main__":
    main()
