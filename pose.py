"""PoSE position and content sampler, plus the position schemes of the baselines.

PoSE (Positional Skip-wise training, Zhu et al. 2023, arXiv 2309.10400, section 3.2) fine-tunes on windows of
`train_len` tokens whose position ids are spread over 0 .. target_len - 1. With L = train_len, L_t = target_len and
N chunks, one example is drawn as:

  eq. 3  cut the window into N chunks of lengths l_0 .. l_{N-1} >= 1 (sum L); chunk i starts at
         st_i = l_0 + ... + l_{i-1} and would have the plain ids st_i .. st_i + l_i - 1
  eq. 4  shift chunk i by a skip bias u_i: ids u_i + st_i .. u_i + st_i + l_i - 1, with
         u_0 = 0 and u_i ~ U{u_{i-1}, ..., L_t - L}
  eq. 5  fill chunk i with the document tokens doc[v_i + st_i : v_i + st_i + l_i], with
         v_0 = 0 and v_i ~ U{v_{i-1}, ..., len(doc) - L}   (content "uniform"; appendix A's
         alternatives: v_i = 0 "contiguous", v_i = u_i "aligned")

Since u_i >= u_{i-1}, chunk i + 1 starts at u_{i+1} + st_{i+1} >= u_i + st_i + l_i, one past the end of chunk i: ids
never overlap, stay strictly increasing, and the last is at most (L_t - L) + L - 1 = L_t - 1. Attention therefore
sees relative distances up to L_t - 1 while every forward pass stays L tokens long.

    import pose
    rng = pose.example_rng(seed=0, index=step * batch_size + i)    # the same example on any machine
    input_ids, positions = pose.make_example("pose", window, 2048, 16384, chunks=2, rng=rng)

Methods (paper Table 1 and the ablations; train.py calls `make_example` on a window of `window_length` document
tokens that data.py cut):

    method   tokens fed to the model                  position ids
    pose     N chunks of the window (eq. 5)           N runs of consecutive ids shifted by skips (eq. 3-4)
    full     target_len consecutive tokens            0 .. target_len - 1 (full-length fine-tuning)
    randpos  train_len consecutive tokens             sorted random subset of 0 .. target_len - 1 (RandPos)
    pi       train_len consecutive tokens             0 .. train_len - 1 (interpolation only, no skipping)

The RoPE interpolation (rope.py) is applied by the model, not here: "pi" is the ablation that keeps the scaled RoPE
but never shows a position beyond train_len - 1.

Training targets: `targets[t] = input_ids[t + 1]` inside the example, as the official code does. At each of the
N - 1 chunk boundaries the target is the first token of the next chunk: the true next token with "contiguous"
content, a token from further on with "uniform" or "aligned" content (README, "Choices").

Randomness: every function takes `rng`, a `numpy.random.Generator`, an int seed or None. Draw order inside
`pose_example`: chunk cuts, skips u, content offsets v. Arguments are checked once, at the public entry points.
Only numpy is needed here.
"""

import numpy as np

METHODS = ("pose", "full", "randpos", "pi")
CONTENTS = ("uniform", "contiguous", "aligned")
SPLITS = ("uniform", "official")


# ----------------------------------------------------------------------------------------------
# PoSE: eq. 3-5


def sample_chunks(train_len, target_len, chunks=2, rng=None, split="uniform"):
    """Draw one PoSE layout: chunk starts st_i, chunk lengths l_i and skip biases u_i, int64 (chunks,) each.

    split="uniform": (l_0, ..., l_{N-1}) is a uniformly random composition of train_len into N positive parts: N - 1
        distinct cut points drawn without replacement from 1 .. train_len - 1 and sorted. For N = 2 the first
        length is uniform on 1 .. train_len - 1, as in the paper's appendix B code (Figure 6).
    split="official": the official training code draws the first cut from the first half of the window only,
        l_0 ~ U{1, ..., (train_len + 1) // 2}; it is written for N = 2, so only N <= 2 is accepted.
    """
    check_lengths(train_len, target_len, chunks, split)
    return _sample_chunks(int(train_len), int(target_len), int(chunks), np.random.default_rng(rng), split)


def _sample_chunks(train_len, target_len, chunks, rng, split):
    # eq. 3: N - 1 cuts give the chunk boundaries 0 = st_0 < st_1 < ... < st_{N-1} < train_len
    if chunks == 1:
        cuts = np.zeros(0, dtype=np.int64)
    elif split == "official":
        cuts = np.array([rng.integers(1, (train_len + 1) // 2 + 1)], dtype=np.int64)
    else:  # N - 1 distinct cuts in 1..train_len-1 (choice draws from 0..train_len-2, hence the + 1)
        cuts = np.sort(rng.choice(train_len - 1, size=chunks - 1, replace=False, shuffle=False)) + 1
    bounds = np.concatenate(([0], cuts, [train_len])).astype(np.int64)  # (N + 1,)
    starts, lengths = bounds[:-1], np.diff(bounds)  # st_i and l_i, (N,) each, every l_i >= 1
    skips = _sequential_uniform(chunks, target_len - train_len, rng)  # eq. 4's u_i
    return starts, lengths, skips


def _sequential_uniform(n, high, rng):
    """x_0 = 0 and x_i ~ U{x_{i-1}, ..., high} for i = 1 .. n-1, as int64 (n,): the law of eq. 4's u_i and eq. 5's v_i.

    It is not the law of n - 1 sorted i.i.d. uniforms: each draw starts from the previous value, so the gap to `high`
    is on average halved at every step, and after about ln(high) + 1 draws it is 0 and all later values equal
    `high`. The loop stops there, so it costs O(log high) draws, not O(n): n = 2048 chunks are as cheap as 3.
    """
    x = np.full(n, high, dtype=np.int64)
    x[0] = 0
    prev = 0
    for i in range(1, n):
        if prev == high:  # the support {high} leaves no choice: x[i:] already holds high
            break
        prev = int(rng.integers(prev, high + 1))  # U{prev, ..., high}, both ends included
        x[i] = prev
    return x


def layout_positions(lengths, skips):
    """Position ids of a layout: window slot t of chunk i gets t + u_i (slot t = st_i + k, id u_i + st_i + k)."""
    return np.arange(int(np.sum(lengths)), dtype=np.int64) + np.repeat(skips, lengths)  # (train_len,)


def skip_positions(train_len, target_len, chunks=2, rng=None, split="uniform"):
    """PoSE position ids for one example: int64 (train_len,), strictly increasing, < target_len.

    chunks=1 gives the plain ids 0 .. train_len - 1 (u_0 = 0); chunks=train_len gives one token per chunk."""
    _, lengths, skips = sample_chunks(train_len, target_len, chunks, rng, split)
    return layout_positions(lengths, skips)


def pose_example(doc, train_len, target_len, chunks=2, content="uniform", rng=None, split="uniform"):
    """One PoSE training example from document `doc`: (input_ids, positions), int64 (train_len,) each.

    Chunk i reads doc[v_i + st_i : v_i + st_i + l_i] (eq. 5) with, by `content`:
      uniform     v_0 = 0, v_i ~ U{v_{i-1}, ..., len(doc) - train_len} (the paper's default)
      contiguous  v_i = 0: the chunks are one stretch doc[0 : train_len] (appendix A, "v_i = 0")
      aligned     v_i = min(u_i, len(doc) - train_len) (appendix A, "v_i = u_i")
    The offsets are non-decreasing, so chunk contents keep the document's order and never overlap, and the largest
    index read is v_{N-1} + train_len - 1 <= len(doc) - 1. With len(doc) >= target_len the aligned clip never binds
    and every token sits at its document index: input_ids[t] == doc[positions[t]].
    """
    check_lengths(train_len, target_len, chunks, split)
    _check_choice("content", content, CONTENTS)
    doc = _as_doc(doc, train_len, "train_len")
    return _pose_example(doc, int(train_len), int(target_len), int(chunks), content, np.random.default_rng(rng),
                         split)


def _pose_example(doc, train_len, target_len, chunks, content, rng, split):
    _, lengths, skips = _sample_chunks(train_len, target_len, chunks, rng, split)
    room = len(doc) - train_len  # largest content offset that keeps a whole window inside the document
    if content == "uniform":
        offsets = _sequential_uniform(chunks, room, rng)
    elif content == "contiguous":
        offsets = np.zeros(chunks, dtype=np.int64)
    else:  # aligned, clipped for documents shorter than target_len
        offsets = np.minimum(skips, room)
    index = np.arange(train_len, dtype=np.int64) + np.repeat(offsets, lengths)  # slot t of chunk i reads doc[v_i + t]
    return doc[index].astype(np.int64), layout_positions(lengths, skips)


# ----------------------------------------------------------------------------------------------
# baselines, and one entry point for every method


def randpos_positions(train_len, target_len, rng=None):
    """RandPos (Ruoss et al. 2023): train_len distinct position ids drawn uniformly without replacement from
    0 .. target_len - 1, sorted, int64 (train_len,).

    numpy's `choice(replace=False)` uses Floyd's algorithm when train_len << target_len, so target_len = 128k or 1M
    costs about the same as 16k. PoSE's appendix B calls this the limit of many chunks; it is not PoSE with
    N = train_len, whose skips follow the sequential law of eq. 4."""
    check_lengths(train_len, target_len)
    picked = np.random.default_rng(rng).choice(target_len, size=train_len, replace=False, shuffle=False)
    return np.sort(picked).astype(np.int64)


def example_length(method, train_len, target_len):
    """Tokens in one example of `method`: target_len for full-length fine-tuning, train_len for the others."""
    return target_len if method == "full" else train_len


def window_length(method, train_len, target_len):
    """How many consecutive document tokens one example of `method` reads from (data.Corpus.sample cuts them).

    full: target_len; randpos and pi: train_len; pose: max(5 train_len, target_len). PoSE's chunks read from
    further on in the document (eq. 5); the official code truncates each document to 5 train_len tokens, and
    target_len at least keeps `aligned` content aligned."""
    return {"full": target_len, "pose": max(5 * train_len, target_len)}.get(method, train_len)


def make_example(method, window, train_len, target_len, chunks=2, content="uniform", rng=None, split="uniform"):
    """One training example (input_ids, positions), int64, for any method, from a window of document tokens (at
    least train_len of them; target_len for "full"). `chunks`, `content` and `split` only matter for "pose".
    The arrays have length target_len for "full" and train_len otherwise."""
    _check_choice("method", method, METHODS)
    check_lengths(train_len, target_len, chunks, split)
    _check_choice("content", content, CONTENTS)
    train_len, target_len, rng = int(train_len), int(target_len), np.random.default_rng(rng)
    if method == "pose":
        return _pose_example(_as_doc(window, train_len, "train_len"), train_len, target_len, int(chunks), content,
                             rng, split)
    length = example_length(method, train_len, target_len)
    input_ids = _as_doc(window, length, "target_len" if method == "full" else "train_len")[:length]
    input_ids = input_ids.astype(np.int64)
    if method == "randpos":
        return input_ids, randpos_positions(train_len, target_len, rng)
    return input_ids, np.arange(length, dtype=np.int64)  # full or pi


def example_rng(seed, index):
    """Generator of the example with global index `index` under run seed `seed`.

    Seeding with the pair (seed, index) through numpy's SeedSequence makes each example a pure function of its
    index: 8 processes or 1, restarted or not, example 12345 is the same."""
    for name, value in (("seed", seed), ("index", index)):
        _check_int(name, value, 0)
    return np.random.default_rng([int(seed), int(index)])


# ----------------------------------------------------------------------------------------------
# argument checks: every bad input is a ValueError with a one-line message


def check_lengths(train_len, target_len, chunks=1, split="uniform"):
    """ValueError unless 1 <= chunks <= train_len <= target_len (integers) and the split rule allows `chunks`."""
    for name, value in (("train_len", train_len), ("target_len", target_len), ("chunks", chunks)):
        _check_int(name, value, 1)
    if target_len < train_len:
        raise ValueError(f"target_len ({target_len}) must be >= train_len ({train_len})")
    if chunks > train_len:
        raise ValueError(f"chunks ({chunks}) must be <= train_len ({train_len}): every chunk holds >= 1 token")
    _check_choice("split", split, SPLITS)
    if split == "official" and chunks > 2:
        raise ValueError(f"split='official' is defined for chunks <= 2 only, got chunks={chunks}")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}, expected one of {', '.join(allowed)}")


def _as_doc(doc, min_len, what):
    doc = np.asarray(doc)
    if doc.ndim != 1:
        raise ValueError(f"doc must be a 1-D sequence of token ids, got shape {doc.shape}")
    if len(doc) < min_len:
        raise ValueError(f"document has {len(doc)} tokens, fewer than {what} ({min_len})")
    if not np.issubdtype(doc.dtype, np.integer):
        raise ValueError(f"doc must hold integer token ids, got dtype {doc.dtype}")
    return doc
