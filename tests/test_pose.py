"""Tests of pose.py: the sampling laws of eq. 3-5 (chi-square), the structure of the ids, the content
strategies, the baselines, determinism and input checks. CPU only, about a second."""

import itertools
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pose  # noqa: E402


def chi_square(counts, expected):
    """Pearson's statistic; the caller compares it with a fixed, generous critical value."""
    counts, expected = np.asarray(counts, float), np.asarray(expected, float)
    return float(((counts - expected) ** 2 / expected).sum())


def critical(df):
    # far beyond the 0.9999 quantile of chi-square(df) for the df used here (mean df, sd sqrt(2 df));
    # the seeds are fixed, so the tests are deterministic either way
    return df + 6 * np.sqrt(2 * df) + 10


def layouts(n, train_len, target_len, chunks, seed=0, split="uniform"):
    rng = np.random.default_rng(seed)
    return [pose.sample_chunks(train_len, target_len, chunks, rng, split) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# laws of chunk lengths and skips


def test_first_chunk_length_uniform_for_two_chunks():
    L = 10
    l0 = np.array([lengths[0] for _, lengths, _ in layouts(9000, L, 40, 2)])
    counts = np.bincount(l0, minlength=L)[1:]  # l0 in 1..9
    assert l0.min() == 1 and l0.max() == L - 1
    assert chi_square(counts, np.full(L - 1, 9000 / (L - 1))) < critical(L - 2)


def test_compositions_uniform_for_three_chunks():
    L, n = 8, 6300
    comps = list(itertools.combinations(range(1, L), 2))  # the 21 cut pairs
    index = {c: i for i, c in enumerate(comps)}
    counts = np.zeros(len(comps))
    for starts, lengths, _ in layouts(n, L, 20, 3, seed=1):
        assert starts[0] == 0 and lengths.sum() == L and lengths.min() >= 1
        assert np.array_equal(starts[1:], np.cumsum(lengths)[:-1])  # eq. 3: st_i = l_0 + ... + l_{i-1}
        counts[index[tuple(starts[1:])]] += 1
    assert chi_square(counts, np.full(len(comps), n / len(comps))) < critical(len(comps) - 1)


def test_skip_uniform_for_two_chunks():
    L, Lt, n = 6, 16, 10000
    M = Lt - L
    u = np.array([skips for _, _, skips in layouts(n, L, Lt, 2, seed=2)])
    assert np.all(u[:, 0] == 0)
    counts = np.bincount(u[:, 1], minlength=M + 1)
    assert len(counts) == M + 1
    assert chi_square(counts, np.full(M + 1, n / (M + 1))) < critical(M)


def test_skips_follow_sequential_law_not_sorted_iid():
    # eq. 4 for N = 3: u_1 ~ U{0..M}, u_2 ~ U{u_1..M}, so P(u_1, u_2) = 1/(M+1) * 1/(M-u_1+1)
    L, Lt, n = 5, 9, 8000
    M = Lt - L
    pairs = [(a, b) for a in range(M + 1) for b in range(a, M + 1)]
    seq = np.array([1 / (M + 1) / (M - a + 1) for a, b in pairs])
    iid = np.array([(2 if a < b else 1) / (M + 1) ** 2 for a, b in pairs])  # two sorted i.i.d. uniforms
    index = {p: i for i, p in enumerate(pairs)}
    counts = np.zeros(len(pairs))
    for _, _, u in layouts(n, L, Lt, 3, seed=3):
        counts[index[(u[1], u[2])]] += 1
    assert chi_square(counts, n * seq) < critical(len(pairs) - 1)
    assert chi_square(counts, n * iid) > 10 * critical(len(pairs) - 1)  # the test can tell the laws apart


def test_official_split_draws_first_cut_from_first_half():
    for L in (9, 10):
        top = (L + 1) // 2
        l0 = np.array([lengths[0] for _, lengths, _ in layouts(5000, L, 30, 2, seed=4, split="official")])
        counts = np.bincount(l0, minlength=top + 1)
        assert len(counts) == top + 1 and counts[0] == 0
        assert chi_square(counts[1:], np.full(top, 5000 / top)) < critical(top - 1)
    with pytest.raises(ValueError, match="official"):
        pose.sample_chunks(10, 30, 3, 0, split="official")
    assert np.array_equal(pose.skip_positions(10, 30, 1, 0, split="official"), np.arange(10))


# ----------------------------------------------------------------------------------------------
# structure of the ids


@pytest.mark.parametrize("L,Lt,N", [(1, 1, 1), (5, 5, 3), (16, 64, 1), (16, 64, 2), (16, 64, 5), (16, 64, 16),
                                    (100, 1000, 7)])
def test_positions_structure(L, Lt, N):
    for seed in range(30):
        starts, lengths, skips = pose.sample_chunks(L, Lt, N, seed)
        pos = pose.skip_positions(L, Lt, N, seed)  # same seed: same layout
        assert pos.dtype == np.int64 and pos.shape == (L,)
        assert pos[0] == 0 and pos[-1] <= Lt - 1
        assert np.all(np.diff(pos) >= 1)  # strictly increasing: no two tokens share an id
        assert np.all(np.diff(skips) >= 0) and skips[0] == 0 and skips[-1] <= Lt - L
        for st, ln, u in zip(starts, lengths, skips):  # eq. 4: chunk i holds u_i + st_i .. u_i + st_i + l_i - 1
            assert np.array_equal(pos[st:st + ln], u + np.arange(st, st + ln))


def test_one_chunk_is_plain_positions():
    assert np.array_equal(pose.skip_positions(2048, 16384, 1, 0), np.arange(2048))


def test_one_token_per_chunk_at_paper_size():
    # chunks = train_len, the limit the paper's ablation pushes to (and that breaks naive ports)
    rng = np.random.default_rng(5)
    for _ in range(20):
        pos = pose.skip_positions(2048, 16384, 2048, rng)
        assert pos.shape == (2048,) and np.all(np.diff(pos) >= 1) and pos[-1] < 16384
    starts, lengths, _ = pose.sample_chunks(2048, 16384, 2048, rng)
    assert np.all(lengths == 1) and np.array_equal(starts, np.arange(2048))


def test_no_skip_room_gives_plain_positions():
    for n in (1, 2, 7):
        assert np.array_equal(pose.skip_positions(7, 7, n, 0), np.arange(7))


# ----------------------------------------------------------------------------------------------
# content (eq. 5 and appendix A)


def offsets_of(input_ids, doc_start, starts, lengths):
    """v_i per chunk from a document arange(len) + doc_start; asserts each chunk reads a contiguous span."""
    shift = input_ids - doc_start - np.arange(len(input_ids))  # v of the chunk of each slot
    for st, ln in zip(starts, lengths):
        assert np.all(shift[st:st + ln] == shift[st])
    return shift[starts]


@pytest.mark.parametrize("N", [1, 2, 3, 8])
def test_uniform_content(N):
    L, Lt, Lx = 16, 128, 50
    doc = np.arange(Lx) + 1000
    for seed in range(40):
        ids, pos = pose.pose_example(doc, L, Lt, N, "uniform", seed)
        starts, lengths, skips = pose.sample_chunks(L, Lt, N, seed)  # drawn first inside pose_example
        assert np.array_equal(pos, np.arange(L) + np.repeat(skips, lengths))
        v = offsets_of(ids, 1000, starts, lengths)
        assert v[0] == 0 and np.all(np.diff(v) >= 0) and v[-1] <= Lx - L
        assert ids.dtype == np.int64


def test_uniform_content_offset_law():
    # N = 2: v_1 ~ U{0..len(doc) - train_len}
    L, Lx, n = 6, 15, 6000
    doc = np.arange(Lx)
    rng = np.random.default_rng(6)
    v1 = np.array([pose.pose_example(doc, L, 40, 2, "uniform", rng)[0][-1] - (L - 1) for _ in range(n)])
    counts = np.bincount(v1, minlength=Lx - L + 1)
    assert len(counts) == Lx - L + 1
    assert chi_square(counts, np.full(Lx - L + 1, n / (Lx - L + 1))) < critical(Lx - L)


def test_contiguous_content():
    doc = np.arange(100) + 7
    for seed in range(20):
        ids, pos = pose.pose_example(doc, 16, 200, 3, "contiguous", seed)
        assert np.array_equal(ids, np.arange(16) + 7)  # v_i = 0: doc[0:train_len], whatever the skips
        assert np.array_equal(pos, pose.skip_positions(16, 200, 3, seed))


def test_aligned_content_long_document():
    L, Lt = 16, 100
    doc = np.arange(Lt + 30) * 3
    for seed in range(30):
        ids, pos = pose.pose_example(doc, L, Lt, 4, "aligned", seed)
        assert np.array_equal(ids, doc[pos])  # each token sits at its true document index


def test_aligned_content_short_document_is_clipped():
    L, Lt, Lx = 16, 100, 40
    doc = np.arange(Lx)
    clipped = 0
    for seed in range(60):
        ids, pos = pose.pose_example(doc, L, Lt, 3, "aligned", seed)
        starts, lengths, skips = pose.sample_chunks(L, Lt, 3, seed)
        assert np.array_equal(offsets_of(ids, 0, starts, lengths), np.minimum(skips, Lx - L))
        assert ids.max() < Lx
        clipped += int(skips[-1] > Lx - L)
    assert clipped > 0  # the clipping branch was exercised


def test_document_forms():
    L = 8
    for doc in (list(range(20)), np.arange(20, dtype=np.uint16), np.arange(20, dtype=np.int32)):
        ids, pos = pose.pose_example(doc, L, 32, 2, rng=0)
        assert ids.dtype == np.int64 and pos.dtype == np.int64 and ids.shape == pos.shape == (L,)
    ids, _ = pose.pose_example(np.arange(8), 8, 32, 2, "uniform", 0)  # len(doc) == train_len: v_i = 0
    assert np.array_equal(ids, np.arange(8))


# ----------------------------------------------------------------------------------------------
# baselines and dispatch


def test_randpos_positions():
    rng = np.random.default_rng(7)
    for L, Lt in ((1, 1), (5, 5), (8, 30), (2048, 16384), (2048, 131072), (4096, 1 << 20)):
        p = pose.randpos_positions(L, Lt, rng)
        assert p.dtype == np.int64 and p.shape == (L,)
        assert p[0] >= 0 and p[-1] < Lt and np.all(np.diff(p) >= 1)
    assert np.array_equal(pose.randpos_positions(6, 6, rng), np.arange(6))


def test_randpos_law():
    # a uniformly random 3-subset of 0..6: all C(7, 3) = 35 subsets equally likely
    L, Lt, n = 3, 7, 7000
    subsets = list(itertools.combinations(range(Lt), L))
    index = {s: i for i, s in enumerate(subsets)}
    rng = np.random.default_rng(8)
    counts = np.zeros(len(subsets))
    for _ in range(n):
        counts[index[tuple(pose.randpos_positions(L, Lt, rng))]] += 1
    assert chi_square(counts, np.full(len(subsets), n / len(subsets))) < critical(len(subsets) - 1)


@pytest.mark.parametrize("method,length", [("pose", 16), ("full", 64), ("randpos", 16), ("pi", 16)])
def test_make_example(method, length):
    window = np.arange(100) + 5  # data.Corpus.sample cut it from a document
    for seed in range(10):
        ids, pos = pose.make_example(method, window, 16, 64, chunks=3, rng=seed)
        assert ids.shape == pos.shape == (length,) and ids.dtype == pos.dtype == np.int64
        assert np.all(np.diff(pos) >= 1) and pos[0] >= 0 and pos[-1] < 64
        if method != "pose":  # the window's first tokens
            assert np.array_equal(ids, window[:length])
        if method in ("full", "pi"):
            assert np.array_equal(pos, np.arange(length))
    ids, pos = pose.make_example("pose", window, 16, 64, 3, "uniform", 11)
    ids2, pos2 = pose.pose_example(window, 16, 64, 3, "uniform", 11)
    assert np.array_equal(ids, ids2) and np.array_equal(pos, pos2)


def test_window_length():
    assert pose.window_length("full", 16, 64) == 64 and pose.window_length("pi", 16, 64) == 16
    assert pose.window_length("randpos", 16, 64) == 16
    assert pose.window_length("pose", 16, 64) == 80 and pose.window_length("pose", 16, 1024) == 1024


def test_content_modes():
    window = np.arange(10_000)
    for content in ("contiguous", "aligned"):
        ids, pos = pose.make_example("pose", window, 16, 64, content=content, rng=3)
        if content == "contiguous":
            assert np.array_equal(ids, ids[0] + np.arange(16))
        else:
            assert np.array_equal(ids - ids[0], pos)  # aligned: content offsets follow the positions


# ----------------------------------------------------------------------------------------------
# determinism


def test_example_rng_determinism():
    doc = np.arange(5000)
    a = pose.make_example("pose", doc, 64, 1024, 3, "uniform", pose.example_rng(1, 42))
    b = pose.make_example("pose", doc, 64, 1024, 3, "uniform", pose.example_rng(1, 42))
    c = pose.make_example("pose", doc, 64, 1024, 3, "uniform", pose.example_rng(1, 43))
    d = pose.make_example("pose", doc, 64, 1024, 3, "uniform", pose.example_rng(2, 42))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not all(np.array_equal(x, y) for x, y in zip(a, d))
    # the generator is exactly numpy's default_rng([seed, index]): PCG64 seeded by SeedSequence
    ref = np.random.default_rng([1, 42])
    assert pose.example_rng(1, 42).integers(1 << 30) == ref.integers(1 << 30)
    assert np.array_equal(pose.skip_positions(64, 1024, 3, 123), pose.skip_positions(64, 1024, 3, 123))


def test_rng_none_is_fresh():
    draws = {tuple(pose.skip_positions(64, 100000, 4)) for _ in range(5)}
    assert len(draws) > 1


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call,match", [
    (lambda: pose.skip_positions(0, 10), "train_len"),
    (lambda: pose.skip_positions(10, 5), "target_len"),
    (lambda: pose.skip_positions(10, 20, 0), "chunks"),
    (lambda: pose.skip_positions(10, 20, 11), "chunks"),
    (lambda: pose.skip_positions(10.0, 20), "integer"),
    (lambda: pose.skip_positions(10, 20, split="halves"), "split"),
    (lambda: pose.pose_example(np.arange(9), 10, 20), "9 tokens, fewer than train_len \\(10\\)"),
    (lambda: pose.pose_example(np.arange(30), 10, 20, content="random"), "content"),
    (lambda: pose.pose_example(np.zeros((3, 10), int), 10, 20), "1-D"),
    (lambda: pose.pose_example(np.linspace(0, 1, 20), 10, 20), "integer"),
    (lambda: pose.make_example("yarn", np.arange(30), 10, 20), "method"),
    (lambda: pose.make_example("full", np.arange(30), 10, 40), "target_len \\(40\\)"),
    (lambda: pose.make_example("pi", np.arange(30), 10, 40, content="x"), "content"),
    (lambda: pose.randpos_positions(10, 9), "target_len"),
    (lambda: pose.make_example("pose", np.arange(30), 10, 20, chunks=3, split="official"), "official"),
    (lambda: pose.example_rng(-1, 0), "seed"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
