"""Corpus preparation (jsonl / txt -> one flat token file + a document index) and deterministic sampling.

    python data.py --input pile_val.jsonl.gz --tokenizer llama-7b/tokenizer.model --out data/pile --min-tokens 2048
    python data.py --input pile_val.jsonl.gz --tokenizer llama-3.1-8b --out data/pile-llama3   # its tokenizer.json
    python data.py --input assets/books/train --tokenizer assets/tiny --out data/books_train  # the bundled books

Prepare a corpus once, then train and evaluate from the memory-mapped token file (--data data/pile). Raw text given
to train.py or evaluate.py is prepared into the cache (~/.cache/pose, or $POSE_CACHE) the same way.

Input: .jsonl (one JSON object per line, the document in its "text" field: {"text": "..."}; other fields are
ignored), .txt (one document per file), the same
gzipped (.jsonl.gz, .txt.gz), or a directory of them (recursive, in sorted order). Empty documents are
skipped. Each document is encoded as in LLaMA pretraining: BOS first, no EOS (a tokenizer without a BOS, as Qwen2's,
starts it with its EOS instead: Tokenizer.start_id). Output:
    OUT.bin      the tokens of all documents back to back (uint16 when the vocabulary fits, else uint32)
    OUT.idx.npy  int64 offsets, n_docs + 1 of them: document i is OUT.bin[idx[i]:idx[i + 1]]
    OUT.json     dtype, counts, the tokenizer file's path and sha256, its start token, min_tokens, sources
They are written under temporary names and renamed into place, OUT.json last: a dataset without its
OUT.json is incomplete and never loads. An --out that is an existing directory (or ends with /) holds DIR/data.bin,
DIR/data.idx.npy and DIR/data.json, and --data DIR reads them. A complete dataset at OUT is not replaced without
--overwrite.

In code (train.py, evaluate.py):
    corpus = load_corpus("data/pile", tokenizer="llama-7b", min_tokens=2048)   # a prepared dataset
    corpus = load_corpus("assets/books/train", tokenizer=tok)   # raw text: prepared into ~/.cache/pose once
    window = corpus.sample(rng, 2048)   # 2048 tokens of a document chosen with probability ~ its length
"""
import fcntl
import gzip
import hashlib
import json
import os
import re
import sys
import zipfile
import zlib
from array import array

import numpy as np
from tqdm import tqdm

from lib import cli
from lib.tokenizer import DataError, Tokenizer, load_tokenizer  # noqa: F401 (data.Tokenizer, data.DataError)

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
BATCH_CHARS = 16 * 2**20  # documents go to the tokenizer ~16M characters at a time (one multithreaded call)
DIR_DATASET = "data"  # a dataset prepared into a directory DIR is DIR/data.bin, DIR/data.idx.npy, DIR/data.json




# -----------------------------------------------------------------------------
# reading and tokenizing

def input_files(path):
    """The document files of an input: the file itself, or every supported file under a directory, sorted."""
    if not os.path.exists(path):
        raise DataError(f"input not found: {path}")
    if os.path.isfile(path):
        if not path.endswith(SUFFIXES):
            raise DataError(f"unsupported input {path}: expected {', '.join(SUFFIXES)} or a directory")
        return [path]
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(SUFFIXES))
    if not files:
        raise DataError(f"no {', '.join(SUFFIXES)} files under {path}")
    return files


def read_documents(files):
    """Yield the text of every non-empty document, in order: a .txt file is one, a .jsonl line is one."""
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                if path.endswith((".txt", ".txt.gz")):
                    texts = [f.read()]
                else:
                    texts = (_jsonl_text(path, n, line) for n, line in enumerate(f, 1) if line.strip())
                yield from (t for t in texts if t.strip())
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # unreadable, truncated .gz, not UTF-8
            raise DataError(f"cannot read {path}: {e}") from None


def _jsonl_text(path, lineno, line):
    try:
        doc = json.loads(line.rstrip("\n"))  # columns then count within the line
    except json.JSONDecodeError as e:  # e.msg alone can be a fragment ("Invalid control character at")
        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise DataError(f'{path}:{lineno}: no "text" string field (each line is a JSON object '
                        '{"text": "the document", ...})')
    return doc["text"]


def batches(texts, max_chars):
    batch, n = [], 0
    for text in texts:
        batch.append(text)
        n += len(text)
        if n >= max_chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size):
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)  # LLaMA's 32000 fits in uint16


def dataset_prefix(path):
    """The prefix of a dataset named by `path`: OUT itself, or DIR/data for a directory (an existing one, or one
    written with a trailing /), so that `data.py --out DIR` writes inside DIR and `--data DIR` reads it there."""
    return os.path.join(path, DIR_DATASET) if path.endswith(os.sep) or os.path.isdir(path) else path


def prepare(input_path, tokenizer, out, min_tokens=0, verbose=True, reuse=False, overwrite=True, threads=None):
    """Tokenize `input_path` into OUT.bin / OUT.idx.npy / OUT.json, keeping documents of >= min_tokens tokens.

    OUT is a prefix, or a directory (dataset_prefix). overwrite=False: a complete dataset at OUT is an error (data.py
    without --overwrite); True replaces it. threads: sentencepiece's (None: one per core); the `tokenizers` library
    takes its count from cli.set_threads.
    Preparations into one directory take turns (an exclusive flock on the directory itself, so that no lock file is
    left behind): two runs starting on a cold cache never remove or replace each other's files. reuse=True: if OUT is
    complete once it is this call's turn (another process prepared it meanwhile), keep it and return None."""
    files = input_files(input_path)
    tok = load_tokenizer(tokenizer)
    out = os.path.abspath(dataset_prefix(os.fspath(out)))
    created, d = [], os.path.dirname(out)  # directories made here, deepest first: removed again on failure
    while not os.path.isdir(d):
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    turn = os.open(os.path.dirname(out), os.O_RDONLY)
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)  # waits while another process prepares into this directory
        if reuse and os.path.isfile(out + ".json"):
            return None
        if not overwrite and os.path.isfile(out + ".json"):
            raise DataError(f"{out} already holds a prepared dataset ({out}.json); --overwrite replaces it")
        meta = _prepare(files, tok, input_path, out, min_tokens, created, threads)
    finally:
        os.close(turn)  # releases the lock
    if verbose:
        print(describe_prepared(out, meta))
    return meta


def _prepare(files, tok, input_path, out, min_tokens, created, threads):
    """prepare()'s work, done in its turn."""
    dtype = token_dtype(tok.vocab_size)
    for name in os.listdir(os.path.dirname(out)):  # what a killed preparation of OUT left (no live one: it is our turn)
        if re.fullmatch(re.escape(os.path.basename(out)) + r"\.(bin|idx\.npy|json)\.tmp\d+", name):
            os.remove(os.path.join(os.path.dirname(out), name))
    tmp = {ext: f"{out}{ext}.tmp{os.getpid()}" for ext in (".bin", ".idx.npy", ".json")}
    try:
        # 1) tokenize batch by batch, appending kept documents to the .bin; their offsets are kept in memory
        offsets, n_read, longest = array("q", [0]), 0, 0
        with open(tmp[".bin"], "wb") as f, tqdm(desc=f"tokenizing {input_path}", unit=" docs", disable=None) as bar:
            for batch in batches(read_documents(files), BATCH_CHARS):
                for ids in tok.encode_batch(batch, bos=True, eos=False, threads=threads or -1):
                    n_read, longest = n_read + 1, max(longest, len(ids))
                    if len(ids) >= min_tokens:
                        f.write(np.asarray(ids, dtype=dtype).tobytes())  # ids < vocab_size fit the dtype
                        offsets.append(offsets[-1] + len(ids))
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{offsets[-1]:,}")
        if n_read == 0:
            raise DataError(f"no documents in {input_path}")
        if len(offsets) == 1:
            raise DataError(f"no document of {input_path} has >= {min_tokens} tokens (the longest has {longest})")
        # 2) the index and the metadata
        with open(tmp[".idx.npy"], "wb") as f:
            np.save(f, np.frombuffer(offsets, dtype=np.int64))
        n_docs, n_tokens = len(offsets) - 1, offsets[-1]
        meta = dict(dtype=dtype.name, n_docs=n_docs, n_tokens=n_tokens, vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                    start_id=tok.start_id, tokenizer=os.path.abspath(tok.path), tokenizer_sha256=file_sha256(tok.path),
                    min_tokens=min_tokens, n_dropped=n_read - n_docs, sources=[os.path.abspath(p) for p in files])
        with open(tmp[".json"], "w") as f:
            json.dump(meta, f, indent=1)
        # 3) publish: drop the old OUT.json first and rename the new one last, so that no reader ever pairs
        #    a .json with another run's .bin (a rename within one directory is atomic)
        if os.path.exists(out + ".json"):
            os.remove(out + ".json")
        for ext in (".bin", ".idx.npy", ".json"):
            os.replace(tmp[ext], out + ext)
    except BaseException:  # errors and Ctrl-C alike: leave nothing behind
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        for d in created:
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    return meta


def describe_prepared(out, meta):
    """One line on what prepare() kept: data.py's result on stdout, a cache message on stderr (load_corpus)."""
    min_tokens, n_docs, n_read = meta["min_tokens"], meta["n_docs"], meta["n_docs"] + meta["n_dropped"]
    dropped = f" ({meta['n_dropped']:,} shorter than {min_tokens} tokens dropped)" if min_tokens > 0 else ""
    return f"{out}: kept {n_docs:,} of {cli.plural(n_read, 'document')}{dropped}, {meta['n_tokens']:,} tokens as " \
           f"{meta['dtype']}"


# -----------------------------------------------------------------------------
# loading and sampling

class Corpus:
    """Tokenized documents: `corpus[i]` is a read-only view of document i's token ids (uint16/uint32).

    `tokens` is the flat token array (a np.memmap of OUT.bin, or any array), `offsets` the n + 1 document
    boundaries, `docs` the documents of the flat array that this corpus holds (all by default)."""

    def __init__(self, tokens, offsets, docs=None, meta=None):
        self.tokens, self.offsets = tokens, np.asarray(offsets, dtype=np.int64)
        self.docs = np.arange(len(self.offsets) - 1) if docs is None else np.asarray(docs, dtype=np.int64)
        self.lengths = self.offsets[self.docs + 1] - self.offsets[self.docs]  # (n_docs,) int64
        self.n_tokens = int(self.lengths.sum())
        self.meta = meta or {}
        self._ends = np.cumsum(self.lengths)  # document i holds corpus tokens [ends[i-1], ends[i])

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        j = self.docs[i]
        return self.tokens[self.offsets[j]:self.offsets[j + 1]]

    def __repr__(self):
        return f"Corpus({len(self):,} documents, {self.n_tokens:,} tokens)"

    def filter(self, min_tokens):
        """The documents of at least `min_tokens` tokens, as a view of the same token file."""
        keep = self.lengths >= min_tokens
        if not keep.any():
            raise DataError(f"no document has >= {min_tokens} tokens (the longest has {self.lengths.max(initial=0)})")
        return Corpus(self.tokens, self.offsets, self.docs[keep], self.meta)

    def sample_index(self, rng):
        """A document index drawn with probability len(doc) / n_tokens, from a np.random.Generator.

        Equivalently: pick one token of the whole corpus uniformly and take its document. Uniform over
        documents would instead give each token of a 2k-token document 50x the weight of a token of a
        100k-token book; proportional sampling keeps every token equally likely, whether the corpus is a
        few dozen books or millions of web pages (and PoSE then draws the window inside the document)."""
        t = rng.integers(self.n_tokens)
        return int(np.searchsorted(self._ends, t, side="right"))

    def sample(self, rng, length):
        """A training window: a document drawn by sample_index, then `length` consecutive tokens of it at a uniformly
        random offset (the whole document when it is not longer).

        Documents are drawn with replacement, so without the random offset every example drawn from a long book
        would read its opening."""
        doc = self[self.sample_index(rng)]
        if len(doc) <= length:
            return doc
        start = int(rng.integers(0, len(doc) - length + 1))  # U{0, ..., len(doc) - length}
        return doc[start:start + length]


class ReplayPool:
    """A fixed pool of training windows replayed beside the method's examples (train.py --replay).

    An .npz file with "input_ids" and "targets", both (P, L) integers; targets are -100 where nothing is predicted
    (padding). Which K windows a step reads depends on the run's seed and the step only (never on the method, its
    chunks, the rope or the batch size), so every method of a comparison reads the same replay data."""

    STREAM = 0x5245504C  # "REPL": keeps the replay's random stream apart from the examples' (seed, index) streams

    def __init__(self, path):
        try:
            with np.load(path) as f:
                self.input_ids, self.targets = f["input_ids"].astype(np.int64), f["targets"].astype(np.int64)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read replay pool {path}: {e}") from None
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.targets.shape or len(self.input_ids) == 0:
            raise DataError(f"replay pool {path}: input_ids and targets must be equal (P, L) arrays, got "
                            f"{self.input_ids.shape} and {self.targets.shape}")
        self.path, self.window = path, self.input_ids.shape[1]

    def __len__(self):
        return len(self.input_ids)

    def indices(self, seed, step, k):
        """The k windows of optimizer step `step` (distinct, drawn without replacement)."""
        return np.random.default_rng([seed, self.STREAM, step]).choice(len(self), k, replace=False)


def open_prepared(prefix):
    """The Corpus of a prepared dataset OUT (OUT.json, OUT.idx.npy, OUT.bin), after checking that they agree."""
    try:
        with open(prefix + ".json") as f:
            meta = json.load(f)
        dtype, n_docs, n_tokens = np.dtype(meta["dtype"]), int(meta["n_docs"]), int(meta["n_tokens"])
        offsets = np.load(prefix + ".idx.npy")
        size = os.path.getsize(prefix + ".bin")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"corrupt dataset {prefix}: {e}") from None
    if (offsets.shape != (n_docs + 1,) or n_docs < 1 or offsets[0] != 0 or offsets[-1] != n_tokens
            or np.any(np.diff(offsets) < 0) or size != n_tokens * dtype.itemsize):
        raise DataError(f"corrupt dataset {prefix}: {prefix}.bin has {size} bytes, while the index and json "
                        f"say {n_docs} documents of {n_tokens} {dtype.name} tokens")
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(n_tokens,))
    return Corpus(tokens, offsets, meta=meta)


def load_corpus(path, tokenizer=None, min_tokens=0, cache_dir=None, threads=None):
    """A Corpus of the documents with >= min_tokens tokens, from a prepared dataset or from raw input.

    `path`: a prepared dataset (OUT, OUT.json or OUT.bin, or the directory data.py --out DIR wrote it into), or
    raw input as for the CLI, which is then
    prepared into `cache_dir` (default $POSE_CACHE or ~/.cache/pose) under a key made of the input files'
    paths, sizes and mtimes, the tokenizer file's sha256, the token documents start with (Tokenizer.start_id:
    tokenizer_config.json can change it) and min_tokens, so that the next call loads at once.
    `tokenizer` (a path or a Tokenizer) is required for raw input; for a prepared dataset it is
    checked against the tokenizer the dataset was made with. threads: prepare's, for raw input."""
    path = os.fspath(path)
    prefix = next((path[: -len(e)] for e in (".json", ".bin", ".idx.npy") if path.endswith(e)), path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, DIR_DATASET + ".json")):
        prefix = os.path.join(path, DIR_DATASET)  # data.py --out DIR
    if os.path.isfile(prefix + ".json"):
        corpus = open_prepared(prefix)
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            if file_sha256(tok.path) != corpus.meta.get("tokenizer_sha256"):
                raise DataError(f"{prefix} was tokenized with {corpus.meta.get('tokenizer')}, not with "
                                f"{tok.path}: its token ids would not match this vocabulary; prepare it again")
            start = corpus.meta.get("start_id", corpus.meta.get("bos_id"))
            if start != tok.start_id:
                raise DataError(f"{prefix}: its documents start with token {start}, while {tok.path} starts them "
                                f"with {tok.start_id} (tokenizer_config.json's add_bos_token?); prepare it again")
    elif prefix == path and os.path.exists(path):  # raw input
        if tokenizer is None:
            raise DataError(f"{path} is raw text: a tokenizer is needed to prepare it")
        files, tok = input_files(path), load_tokenizer(tokenizer)
        stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
        key = json.dumps([stats, file_sha256(tok.path), tok.start_id, min_tokens])
        key = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache_dir = cache_dir or os.environ.get("POSE_CACHE") or os.path.expanduser("~/.cache/pose")
        cached = os.path.join(cache_dir, f"{os.path.basename(os.path.abspath(path)).split('.')[0]}-{key}")
        if not os.path.isfile(cached + ".json"):  # preparations take turns (prepare): one process per machine works
            meta = prepare(path, tok, cached, min_tokens, verbose=False, reuse=True,  # None: another process did
                           threads=threads)
            # a progress message, shown where tqdm's bar is: piped stderr keeps warnings only
            if meta is not None and sys.stderr.isatty():
                print(f"prepared {path} once, into the cache: {describe_prepared(cached, meta)}", file=sys.stderr)
        corpus = open_prepared(cached)
    else:
        raise DataError(f"not found: {path} is neither input nor a prepared dataset ({prefix}.json is missing; "
                        "an interrupted preparation leaves none)")
    return corpus.filter(min_tokens)


def main(argv=None):
    p = cli.ArgumentParser(description="Tokenize jsonl/txt documents into OUT.bin + OUT.idx.npy + OUT.json.")
    p.add_argument("--input", required=True,
                   help='.jsonl (one JSON object per line, the document in its "text" field: {"text": "..."}), .txt '
                        "(one document per file), the same gzipped (.jsonl.gz, .txt.gz), or a directory of them")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.model (sentencepiece), tokenizer.json (Hugging Face), or a checkpoint directory "
                        "holding one (tokenizer.model first when it has both)")
    p.add_argument("--out", required=True,
                   help="output prefix: writes OUT.bin, OUT.idx.npy, OUT.json; an existing directory (or one named "
                        "with a trailing /) gets DIR/data.bin, ...; --data OUT or DIR reads it")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared at --out")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="drop documents shorter than this (the start token, BOS, included)")
    cli.add_threads(p)
    args = p.parse_args(argv)
    cli.set_threads(args.threads, torch_threads=False)  # the `tokenizers` library's pool
    cli.run(lambda: prepare(args.input, args.tokenizer, args.out, args.min_tokens, overwrite=args.overwrite,
                            threads=args.threads))


if __name__ == "__main__":
    main()
