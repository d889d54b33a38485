"""Train the sentencepiece tokenizer of the bundled tiny model on assets/books/train.

A LLaMA-style BPE (the trainer settings of the LLaMA tokenizer, at a small vocabulary):
byte fallback (no <unk> on unseen characters), digits split one by one, <unk>=0 <s>=1 </s>=2, no pad,
identity normalization, a dummy prefix space. Deterministic: every line is used (no sampling), and
the same corpus gives the same tokenizer.model. About a minute on 2 CPU cores.

$ python scripts/make_tokenizer.py --out out/tokenizer              # -> out/tokenizer/tokenizer.model
$ python scripts/make_tokenizer.py --vocab-size 8192 --out out/tok8k
"""
import argparse
import glob
import gzip
import io
import os
import sys
import time

import sentencepiece as spm


def lines(paths):
    """Every non-empty line of the documents (sentencepiece trains on lines, at most 4192 bytes each)."""
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")


def count_tokens(model_file, paths):
    """Tokens of the documents as data.py stores them: one BOS per document, no EOS."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    texts = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.append(f.read())
    return sum(1 + len(ids) for ids in sp.encode(texts, num_threads=os.cpu_count()))


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "books")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--books", default=root, help="folder with train/*.txt.gz (and eval/ for the token count)")
    p.add_argument("--vocab-size", type=int, default=4096)  # 256 byte pieces + 3 specials + ~3.8k merges
    p.add_argument("--out", required=True, help="output folder; tokenizer.model is written there")
    args = p.parse_args()

    train = sorted(glob.glob(os.path.join(args.books, "train", "*.txt.gz")))
    if not train:
        sys.exit(f"error: no train/*.txt.gz under {args.books}")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    buf = io.BytesIO()  # the model is written here rather than to a model_prefix, which it would record
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(train),
        model_writer=buf,
        model_type="bpe",
        vocab_size=args.vocab_size,
        # the LLaMA tokenizer's trainer spec
        byte_fallback=True,  # unseen characters become <0xNN> byte pieces, never <unk>
        split_digits=True,  # numbers are read digit by digit
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True,  # "Hello" and " Hello" start with the same piece
        normalization_rule_name="identity",  # text is kept as is (no NFKC)
        remove_extra_whitespaces=False,  # indentation of verse is content
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        max_sentence_length=4192,
        # determinism: use every line (no random sampling of sentences) and one fixed seed
        input_sentence_size=0, shuffle_input_sentence=False, seed_sentencepiece_size=1_000_000,
        num_threads=os.cpu_count(),
        minloglevel=2,
    )
    model = os.path.join(args.out, "tokenizer.model")
    with open(model + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    os.replace(model + ".tmp", model)
    print(f"wrote {model} (vocab {args.vocab_size}) in {time.time() - t0:.0f}s")
    for split in ("train", "eval"):
        paths = sorted(glob.glob(os.path.join(args.books, split, "*.txt.gz")))
        if paths:
            print(f"{split}: {len(paths)} documents, {count_tokens(model, paths):,} tokens")


if __name__ == "__main__":
    main()
