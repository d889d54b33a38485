"""data.py: preparation round trip, input formats, filtering, cache, errors, atomicity and sampling."""
import fcntl
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import sentencepiece as spm

import data
from data import Corpus, DataError, load_corpus, prepare
from data import Tokenizer
from helpers import ROOT

DOCS = [
    "The king is dead; long live the king!\nAnd the night was long.",
    "Love, light and shadow.",
    "In 1611 the river of time ran to the sea, and a stone lay in the river, and the crown was heaven's. " * 6,
    "Ünïcode and emoji 😀 fall back to bytes.",
    "Day.",
    "A sword for the queen of the earth, a crown for the lord of the night. " * 12,
]


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "meta": {"src": "test"}}) + "\n")


def write_txt(path, text, opener=open):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture(scope="module")
def tok(spm_tokenizer):
    return Tokenizer(spm_tokenizer)


def tokens_of(corpus):
    return [corpus[i].tolist() for i in range(len(corpus))]


def test_round_trip_jsonl(tmp_path, tok):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    meta = prepare(str(tmp_path / "docs.jsonl"), tok.path, str(tmp_path / "out" / "ds"), verbose=False)
    expected = [tok.encode(t) for t in DOCS]  # BOS first, no EOS
    assert all(ids[0] == tok.bos_id and ids[-1] != tok.eos_id for ids in expected)
    flat = np.fromfile(tmp_path / "out" / "ds.bin", dtype=np.uint16)
    assert flat.tolist() == sum(expected, [])
    idx = np.load(tmp_path / "out" / "ds.idx.npy")
    assert idx.dtype == np.int64 and idx.tolist() == np.cumsum([0] + [len(e) for e in expected]).tolist()
    assert meta["dtype"] == "uint16" and meta["n_docs"] == len(DOCS) and meta["n_tokens"] == len(flat)
    assert meta["tokenizer_sha256"] == data.file_sha256(tok.path) and meta["vocab_size"] == tok.vocab_size
    for path in ("out/ds", "out/ds.json", "out/ds.bin"):  # the prefix or any of its files
        corpus = load_corpus(str(tmp_path / path), tokenizer=tok)
        assert tokens_of(corpus) == expected
        assert corpus.lengths.tolist() == [len(e) for e in expected] and corpus.n_tokens == len(flat)
    assert isinstance(corpus.tokens, np.memmap) and not corpus[0].flags.writeable
    assert [d.tolist() for d in corpus] == expected


def test_input_formats(tmp_path, tok):
    """jsonl, jsonl.gz, txt, txt.gz and a directory of them (recursive, sorted) give the same documents."""
    expected = [tok.encode(t) for t in DOCS]
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    write_jsonl(tmp_path / "b.jsonl.gz", DOCS, opener=gzip.open)
    # a directory: 0_*.txt, 1_*/... sorted by path; .gz mixed in; other files ignored; empty documents skipped
    for i, text in enumerate(DOCS):
        name = f"dir/{i // 2}_part/{i}.txt" + (".gz" if i % 2 else "")
        write_txt(tmp_path / name, text, opener=gzip.open if i % 2 else open)
    write_txt(tmp_path / "dir/9_empty.txt", "\n")
    write_txt(tmp_path / "dir/README.md", "not a document")
    write_txt(tmp_path / "one.txt.gz", DOCS[2], opener=gzip.open)
    for name, want in [("a.jsonl", expected), ("b.jsonl.gz", expected), ("dir", expected),
                       ("one.txt.gz", [expected[2]])]:
        corpus = load_corpus(str(tmp_path / name), tokenizer=tok.path, cache_dir=str(tmp_path / "cache"))
        assert tokens_of(corpus) == want, name


class BigVocab:
    """A tokenizer whose ids go past 65535 (as a 128k-vocabulary LLaMA 3 tokenizer's do)."""

    def __init__(self, tok):
        self.tok, self.path, self.vocab_size, self.bos_id = tok, tok.path, 70_000, tok.bos_id + 65_000
        self.start_id = self.bos_id

    def encode_batch(self, texts, bos=True, eos=False, threads=-1):
        return [[i + 65_000 for i in ids] for ids in self.tok.encode_batch(texts, bos=bos, eos=eos)]


def test_uint16_or_uint32(tmp_path, tok):
    assert data.token_dtype(32_000) == np.uint16 and data.token_dtype(65_536) == np.uint16
    assert data.token_dtype(65_537) == np.uint32 and data.token_dtype(128_256) == np.uint32
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    meta = prepare(str(tmp_path / "docs.jsonl"), BigVocab(tok), str(tmp_path / "big"), verbose=False)
    corpus = load_corpus(str(tmp_path / "big"))
    assert meta["dtype"] == "uint32" and corpus[0].dtype == np.uint32
    assert os.path.getsize(tmp_path / "big.bin") == 4 * meta["n_tokens"]
    assert tokens_of(corpus) == [[i + 65_000 for i in tok.encode(t)] for t in DOCS]


def test_min_tokens(tmp_path, tok):
    lengths = [len(tok.encode(t)) for t in DOCS]
    k = sorted(lengths)[3]  # keeps the 3 longest documents (lengths are distinct)
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    meta = prepare(str(tmp_path / "docs.jsonl"), tok, str(tmp_path / "ds"), min_tokens=k, verbose=False)
    assert meta["n_docs"] == 3 and meta["n_dropped"] == 3 and meta["min_tokens"] == k
    assert tokens_of(load_corpus(str(tmp_path / "ds"))) == [tok.encode(t) for t, n in zip(DOCS, lengths) if n >= k]
    # filtering a prepared dataset at load time, and as a view
    prepare(str(tmp_path / "docs.jsonl"), tok, str(tmp_path / "all"), verbose=False)
    full = load_corpus(str(tmp_path / "all"))
    assert len(full) == len(DOCS) and len(load_corpus(str(tmp_path / "all"), min_tokens=k)) == 3
    view = full.filter(k)
    assert view.lengths.tolist() == [n for n in lengths if n >= k] and view.n_tokens == sum(view.lengths)
    assert view[0].tolist() == full[int(np.argmax(np.array(lengths) >= k))].tolist()
    with pytest.raises(DataError, match=f"no document has >= 100000 tokens \\(the longest has {max(lengths)}\\)"):
        full.filter(100_000)
    with pytest.raises(DataError, match=f"the longest has {max(lengths)}"):
        prepare(str(tmp_path / "docs.jsonl"), tok, str(tmp_path / "none"), min_tokens=10**6, verbose=False)
    assert not list(tmp_path.glob("none*"))


def test_cache(tmp_path, tok, monkeypatch):
    write_txt(tmp_path / "books/a.txt", DOCS[2])
    write_txt(tmp_path / "books/b.txt", DOCS[5])
    cache = tmp_path / "cache"
    first = load_corpus(str(tmp_path / "books"), tokenizer=tok, cache_dir=str(cache))
    (bin_path,) = cache.glob("books-*.bin")
    mtime = os.stat(bin_path).st_mtime_ns

    calls = []
    real_prepare = data.prepare
    monkeypatch.setattr(data, "prepare", lambda *a, **k: calls.append(a) or real_prepare(*a, **k))
    again = load_corpus(str(tmp_path / "books"), tokenizer=tok.path, cache_dir=str(cache))
    assert calls == [] and os.stat(bin_path).st_mtime_ns == mtime  # a cache hit: no tokenization
    assert tokens_of(again) == tokens_of(first)
    monkeypatch.setenv("POSE_CACHE", str(cache))  # the default cache dir
    load_corpus(str(tmp_path / "books"), tokenizer=tok)
    assert calls == []

    load_corpus(str(tmp_path / "books"), tokenizer=tok, min_tokens=3)  # another min_tokens: another entry
    assert len(calls) == 1
    write_txt(tmp_path / "books/b.txt", DOCS[5] + " More.")  # a changed input: prepared again
    changed = load_corpus(str(tmp_path / "books"), tokenizer=tok)
    assert len(calls) == 2 and changed[1].tolist() == tok.encode(DOCS[5] + " More.")
    assert len(list(cache.glob("*.json"))) == 3


def test_preparations_into_one_cache_take_turns(tmp_path, tok):
    """Two processes starting on a cold cache (reproduce.py's two workers): the second waits for the first's turn to
    end, then loads its dataset instead of removing its temporaries or preparing it again."""
    write_txt(tmp_path / "books/a.txt", DOCS[2])
    write_txt(tmp_path / "books/b.txt", DOCS[5])
    elsewhere, cache = tmp_path / "elsewhere", tmp_path / "cache"
    expected = tokens_of(load_corpus(str(tmp_path / "books"), tokenizer=tok, cache_dir=str(elsewhere)))
    cache.mkdir()
    other = os.open(cache, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # "another process" is preparing into the cache
    (cache / "books-0123.bin.tmp1").write_text("its temporary")
    got = {}
    waiting = threading.Thread(target=lambda: got.update(corpus=load_corpus(str(tmp_path / "books"), tokenizer=tok,
                                                                            cache_dir=str(cache))))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive() and os.listdir(cache) == ["books-0123.bin.tmp1"]  # waits, touching nothing
    (cache / "books-0123.bin.tmp1").unlink()
    for f in elsewhere.iterdir():  # the other process publishes the same dataset, then its turn ends
        shutil.copy2(f, cache / f.name)
    mtimes = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    os.close(other)
    waiting.join(10)
    assert not waiting.is_alive() and tokens_of(got["corpus"]) == expected
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == mtimes  # loaded, not prepared again


def test_tokenizer_mismatch(tmp_path, tok):
    other = tmp_path / "other"
    other.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 5), model_prefix=str(other / "tokenizer"),
                                   model_type="bpe", vocab_size=330, byte_fallback=True, minloglevel=2)
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare(str(tmp_path / "docs.jsonl"), tok, str(tmp_path / "ds"), verbose=False)
    assert len(load_corpus(str(tmp_path / "ds"), tokenizer=tok.path)) == len(DOCS)
    with pytest.raises(DataError, match="was tokenized with .* not with .*other"):
        load_corpus(str(tmp_path / "ds"), tokenizer=str(other))


def test_atomic(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = str(tmp_path / "ds")
    prepare(str(tmp_path / "docs.jsonl"), tok, out, verbose=False)
    before = tokens_of(load_corpus(out))

    # a run that dies half-way (here: in its second batch) leaves no files and the old dataset intact
    monkeypatch.setattr(data, "BATCH_CHARS", 1)  # one document per batch
    real = tok.encode_batch

    def dies_in_second_batch(texts, **kwargs):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise KeyboardInterrupt  # as if stopped with Ctrl-C
        return real(texts, **kwargs)

    calls = []
    monkeypatch.setattr(tok, "encode_batch", dies_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "docs.jsonl"), tok, out, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "ds.bin", "ds.idx.npy", "ds.json"]
    assert tokens_of(load_corpus(out)) == before
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "docs.jsonl"), tok, str(tmp_path / "new/sub/ds"), verbose=False)
    assert not (tmp_path / "new").exists()  # directories it made are gone too

    # without its .json (the last file written) a dataset does not load
    os.remove(out + ".json")
    for path in (out, out + ".bin", out + ".json"):
        with pytest.raises(DataError, match="ds.json is missing"):
            load_corpus(path, tokenizer=tok)


def test_corrupt_dataset(tmp_path, tok):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = str(tmp_path / "ds")
    prepare(str(tmp_path / "docs.jsonl"), tok, out, verbose=False)
    size = os.path.getsize(out + ".bin")
    with open(out + ".bin", "r+b") as f:
        f.truncate(size - 2)  # one token short
    with pytest.raises(DataError, match="corrupt dataset .*ds.bin has"):
        load_corpus(out)
    with open(out + ".json", "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="corrupt dataset"):
        load_corpus(out)


def test_cli_errors(tmp_path, spm_tokenizer):
    """Each bad input: exit code != 0, one line `error: ...` on stderr, no traceback, nothing written."""
    write_jsonl(tmp_path / "good.jsonl", DOCS)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "oops"\n')
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"content": "no text"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "blank.txt").write_text("  \n")
    cases = {  # name: (--input, --tokenizer, extra args, expected message)
        "missing_input": ("nope.jsonl", spm_tokenizer, [], "input not found: .*nope.jsonl"),
        "malformed": ("bad.jsonl", spm_tokenizer, [], "bad.jsonl:3: malformed JSON \\(Expecting ',' delimiter at "
                                                      "column 16\\)$"),
        "no_text": ("notext.jsonl", spm_tokenizer, [], 'notext.jsonl:2: no "text" string field \\(each line is a '
                                                       'JSON object {"text": "the document", ...}\\)$'),
        "missing_tokenizer": ("good.jsonl", "missing.model", [], "tokenizer not found: missing.model"),
        "no_documents": ("empty.jsonl", spm_tokenizer, [], "no documents in .*empty.jsonl"),
        "no_documents_dir": ("emptydir", spm_tokenizer, [], "no documents in .*emptydir"),
        "too_short": ("good.jsonl", spm_tokenizer, ["--min-tokens", "100000"], "the longest has [0-9]+\\)"),
    }
    procs = {name: subprocess.Popen(  # all at once: each start of python pays its imports
        [sys.executable, os.path.join(ROOT, "data.py"), "--input", inp, "--tokenizer", tokenizer,
         "--out", f"out_{name}/ds", *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (inp, tokenizer, extra, _) in cases.items()}
    procs["ok"] = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "--input", "good.jsonl",
                                    "--tokenizer", spm_tokenizer, "--out", "out_ok/ds", "--min-tokens", "3"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        if name == "ok":
            assert proc.returncode == 0, stderr
            assert "kept 6 of 6 documents" in stdout and (tmp_path / "out_ok/ds.json").exists()
            continue
        assert proc.returncode != 0, name
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, (name, stderr)
        assert re.search(cases[name][3], lines[0]), (name, lines[0])
        assert not (tmp_path / f"out_{name}").exists(), name


def test_sample_doc_proportional_to_length():
    lengths = np.array([1, 5, 10, 20, 64])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    corpus = Corpus(np.arange(offsets[-1], dtype=np.uint16), offsets)
    rng = np.random.default_rng(0)
    n = 20_000
    counts = np.bincount([corpus.sample_index(rng) for _ in range(n)], minlength=len(lengths))
    expected = n * lengths / lengths.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 18.47, (counts, expected)  # chi-square, 4 degrees of freedom, p = 0.001
    # on a filtered view, indices and documents refer to the view
    view = corpus.filter(10)
    docs = [view.sample(rng, 100) for _ in range(2000)]
    assert {len(d) for d in docs} == {10, 20, 64}
    assert sum(len(d) == 64 for d in docs) > sum(len(d) == 10 for d in docs) * 3


def test_sample_doc_deterministic():
    rnd = np.random.default_rng(123)
    lengths = rnd.integers(1, 100, size=50)
    corpus = Corpus(rnd.integers(0, 1000, size=lengths.sum()).astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]))
    a = [corpus.sample_index(np.random.default_rng(7)) for _ in range(3)]
    r1, r2, r3 = np.random.default_rng(7), np.random.default_rng(7), np.random.default_rng(8)
    s1 = [corpus.sample_index(r1) for _ in range(200)]
    assert s1 == [corpus.sample_index(r2) for _ in range(200)] and a == [s1[0]] * 3
    assert s1 != [corpus.sample_index(r3) for _ in range(200)]
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    assert all(np.array_equal(corpus.sample(r1, 100), corpus[i]) for i in [corpus.sample_index(r2) for _ in range(50)])


def test_sample_window_covers_the_document():
    """A long document gives windows at every offset: documents are drawn with replacement, and every example of a
    long book must not open with the same text."""
    corpus = Corpus(np.arange(20, dtype=np.uint16), [0, 20])
    rng = np.random.default_rng(9)
    firsts = {int(corpus.sample(rng, 16)[0]) for _ in range(300)}
    assert firsts == set(range(5))  # U{0..len(doc) - length}
    assert all(len(corpus.sample(rng, 16)) == 16 for _ in range(10)) and len(corpus.sample(rng, 50)) == 20
    book = Corpus(np.arange(10_000, dtype=np.uint16), [0, 10_000])
    firsts = [int(book.sample(np.random.default_rng(seed), 80)[0]) for seed in range(300)]
    assert len(set(firsts)) > 250 and min(firsts) < 1000 and max(firsts) > 8000


def test_leftovers_of_a_killed_preparation_are_removed(tmp_path, tok):
    """A kill -9 leaves OUT.*.tmpPID files; the next preparation of OUT removes them (and only them)."""
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    (tmp_path / "x.bin.tmp999").write_text("junk")
    (tmp_path / "x.json.tmp12").write_text("junk")
    (tmp_path / "other.bin.tmp999").write_text("not ours")
    data.prepare(str(tmp_path / "docs.jsonl"), tok, str(tmp_path / "x"), verbose=False)
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "other.bin.tmp999", "x.bin", "x.idx.npy", "x.json"]


def test_out_directory_overwrite_and_threads(tmp_path, spm_tokenizer):
    """data.py --out: an existing directory (or one named with a trailing /) holds DIR/data.*, which --data DIR reads;
    a dataset already there is kept unless --overwrite; --threads 1 tokenizes to the same ids."""
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    (tmp_path / "existing").mkdir()

    def prepare_cli(out, *extra):
        return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--input", "docs.jsonl", "--tokenizer",
                               spm_tokenizer, "--out", out, *extra], cwd=tmp_path, capture_output=True, text=True)

    first, slash = prepare_cli("existing"), prepare_cli("new/", "--threads", "1")
    assert first.returncode == 0 and slash.returncode == 0, first.stderr + slash.stderr
    assert sorted(os.listdir(tmp_path / "existing")) == ["data.bin", "data.idx.npy", "data.json"]
    assert sorted(os.listdir(tmp_path / "new")) == ["data.bin", "data.idx.npy", "data.json"]
    assert not os.path.exists(tmp_path / "existing.bin")
    corpus = load_corpus(str(tmp_path / "existing"), tokenizer=spm_tokenizer)
    assert tokens_of(corpus) == tokens_of(load_corpus(str(tmp_path / "new"))) == [Tokenizer(spm_tokenizer).encode(t)
                                                                                 for t in DOCS]
    stamp = os.stat(tmp_path / "existing" / "data.json").st_mtime_ns
    again = prepare_cli("existing")
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'existing' / 'data'} already holds a prepared dataset "
        f"({tmp_path / 'existing' / 'data.json'}); --overwrite replaces it"]
    assert os.stat(tmp_path / "existing" / "data.json").st_mtime_ns == stamp
    replaced = prepare_cli("existing", "--overwrite", "--min-tokens", "20")
    assert replaced.returncode == 0, replaced.stderr
    assert load_corpus(str(tmp_path / "existing")).meta["min_tokens"] == 20


def test_messages_count_documents_in_words():
    meta = dict(min_tokens=0, n_docs=1, n_dropped=0, n_tokens=12, dtype="uint16")
    assert data.describe_prepared("x", meta) == "x: kept 1 of 1 document, 12 tokens as uint16"
    meta.update(n_docs=2, n_dropped=1000, min_tokens=5)
    assert data.describe_prepared("x", meta) == ("x: kept 2 of 1,002 documents (1,000 shorter than 5 tokens "
                                                 "dropped), 12 tokens as uint16")
