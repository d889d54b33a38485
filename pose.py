"""PoSE position and content sampler, plus the position schemes of the baselines.

PoSE (Positional Skip-wise training, Zhu et al. 2023, arXiv 2309.10400, section 3.2) fine-tunes on
windows of `train_len` tokens whose position ids are spread over `0 .. target_len - 1`: the window
is cut into N chunks, each chunk keeps consecutive position ids, and each chunk is pushed right by a
random "skip". Attention then sees relative distances up to `target_len - 1` while every forward
pass stays `train_len` tokens long.

    import pose
    rng = pose.example_rng(seed=0, index=step * batch_size + i)    # same example on any machine
    input_ids, positions = pose.make_example("pose", doc, 2048, 16384, chunks=2, rng=rng)

Methods (paper Table 1 and the ablations; `make_example` dispatches, train.py calls it):

    method   tokens fed to the model                  position ids
    pose     N chunks of the document (eq. 5)         N runs of consecutive ids shifted by skips (eq. 3-4)
    full     target_len consecutive tokens            0 .. target_len - 1 (full-length fine-tuning)
    randpos  train_len consecutive tokens             sorted random subset of 0 .. target_len - 1 (RandPos)
    pi       train_len consecutive tokens             0 .. train_len - 1 (interpolation only, no skipping)

Whatever the method, the RoPE interpolation (rope.py) is applied by the model, not here: "pi" is the
ablation that keeps the scaled RoPE but never shows a position beyond `train_len - 1`.

Training targets. The loop feeds `input_ids` and `positions` to the model and predicts
`targets[t] = input_ids[t + 1]` inside the example, as the official PoSE code does (labels =
input_ids, the model shifts by one). Inside a chunk that is ordinary next-token prediction. At each
of the N - 1 chunk boundaries the target is the first token of the next chunk: with
`content="contiguous"` it is the true next token of the document (only the position id jumps), with
`uniform` or `aligned` content the document jumps ahead by v_{i+1} - v_i tokens, so that single
target is a token from further on in the text. The official code trains on those targets like on any
other (N - 1 of train_len - 1 targets); so do we. Note that a boundary is not always visible in
`positions` (when u_{i+1} = u_i the ids run on without a gap).

Randomness. Every function takes `rng`: a `numpy.random.Generator`, an int seed, or None (fresh
entropy). `example_rng(seed, index)` gives the generator of one global example index, so an example
is the same whatever the number of processes. Draw order inside `pose_example`: chunk cuts, skips u,
content offsets v.

Only numpy is needed here.
"""

import numpy as np

METHODS = ("pose", "full", "randpos", "pi")
CONTENTS = ("uniform", "contiguous", "aligned")
SPLITS = ("uniform", "official")


# ----------------------------------------------------------------------------------------------
# argument checks: every bad input is a ValueError with a one-line message


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_lengths(train_len, target_len, chunks=1):
    train_len = _check_int("train_len", train_len, 1)
    target_len = _check_int("target_len", target_len, 1)
    chunks = _check_int("chunks", chunks, 1)
    if target_len < train_len:
        raise ValueError(f"target_len ({target_len}) must be >= train_len ({train_len})")
    if chunks > train_len:
        raise ValueError(f"chunks ({chunks}) must be <= train_len ({train_len}): every chunk holds >= 1 token")
    return train_len, target_len, chunks


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}, expected one of {', '.join(allowed)}")
    return value


def _as_doc(doc, min_len, what):
    doc = np.asarray(doc)
    if doc.ndim != 1:
        raise ValueError(f"doc must be a 1-D sequence of token ids, got shape {doc.shape}")
    if len(doc) < min_len:
        raise ValueError(f"document has {len(doc)} tokens, fewer than {what} ({min_len})")
    if not np.issubdtype(doc.dtype, np.integer):
        raise ValueError(f"doc must hold integer token ids, got dtype {doc.dtype}")
    return doc


def example_rng(seed, index):
    """Generator of the example with global index `index` under run seed `seed`.

    Seeding with the pair (seed, index) through numpy's SeedSequence makes each example a pure
    function of its index: 8 processes or 1, restarted or not, example 12345 is the same.
    """
    seed = _check_int("seed", seed, 0)
    index = _check_int("index", index, 0)
    return np.random.default_rng([seed, index])


# ----------------------------------------------------------------------------------------------
# PoSE (paper section 3.2)


def _sequential_uniform(n, high, rng):
    """x_0 = 0 and x_i ~ U{x_{i-1}, ..., high} for i = 1 .. n-1, as int64 (n,).

    This is the law of the paper's skip biases (eq. 4's u_i) and content offsets (eq. 5's v_i). It is
    not the law of n - 1 sorted i.i.d. uniforms: each draw starts from the previous value, so the gap
    to `high` is on average halved at every step, and after about ln(high) + 1 draws it is 0 and all
    later values equal `high`. The loop stops there, so it costs O(log high) draws, not O(n), and
    n = 2048 chunks are as cheap as 3.
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


def sample_chunks(train_len, target_len, chunks=2, rng=None, split="uniform"):
    """Draw one PoSE layout: chunk starts st_i, chunk lengths l_i and skip biases u_i.

    Returns three int64 arrays of shape (chunks,). Chunk i covers window slots st_i .. st_i + l_i - 1
    and gets position ids u_i + st_i .. u_i + st_i + l_i - 1.

    split="uniform": (l_0, ..., l_{N-1}) is a uniformly random composition of train_len into N
        positive parts: N - 1 distinct cut points drawn without replacement from 1 .. train_len - 1
        and sorted. Every composition has probability 1 / C(train_len - 1, N - 1); for N = 2 the first
        length is uniform on 1 .. train_len - 1, as in the paper's appendix B code (Figure 6).
    split="official": the official PoSE training code (src/train_pose.py) draws the first cut from
        the first half of the window only, l_0 ~ U{1, ..., (train_len + 1) // 2}, so the second chunk
        is always at least as long as the first. It is written for N = 2, so only N <= 2 is
        accepted here.
    (The paper's N = 3 coverage code in Figure 6 draws l_0 ~ U{1..L-2}, then l_1 ~ U{1..L-l_0-1}:
    a sequential split that favours a short l_1 when l_0 is long, unlike the uniform composition.)
    """
    train_len, target_len, chunks = _check_lengths(train_len, target_len, chunks)
    _check_choice("split", split, SPLITS)
    rng = np.random.default_rng(rng)

    # 1) chunk boundaries. Eq. (3): chunk i starts at st_i = l_0 + ... + l_{i-1} and its plain
    #    position ids are st_i, st_i + 1, ..., st_i + l_i - 1; together the N chunks tile 0..train_len-1.
    if chunks == 1:
        cuts = np.zeros(0, dtype=np.int64)
    elif split == "official":
        if chunks != 2:
            raise ValueError(f"split='official' is defined for chunks=2 only, got chunks={chunks}")
        cuts = np.array([rng.integers(1, (train_len + 1) // 2 + 1)], dtype=np.int64)
    else:
        # N - 1 distinct cuts in 1..train_len-1 (choice draws from 0..train_len-2, hence the + 1)
        cuts = np.sort(rng.choice(train_len - 1, size=chunks - 1, replace=False, shuffle=False)) + 1
    bounds = np.concatenate(([0], cuts, [train_len])).astype(np.int64)  # (N + 1,)
    starts, lengths = bounds[:-1], np.diff(bounds)  # st_i and l_i, (N,) each, every l_i >= 1

    # 2) skip biases. Eq. (4): chunk i is shifted to u_i + st_i, ..., u_i + st_i + l_i - 1 with
    #    u_0 = 0 and u_i ~ U{u_{i-1}, ..., target_len - train_len}. Since u_i >= u_{i-1}, chunk i+1
    #    starts at u_{i+1} + st_{i+1} >= u_i + st_i + l_i, one past the end of chunk i: ids never
    #    overlap and stay strictly increasing; the last id is at most
    #    (target_len - train_len) + train_len - 1 = target_len - 1.
    skips = _sequential_uniform(chunks, target_len - train_len, rng)
    return starts, lengths, skips


def _layout_positions(lengths, skips, train_len):
    # position of window slot t in chunk i is t + u_i (slot t = st_i + k, id = u_i + st_i + k)
    return np.arange(train_len, dtype=np.int64) + np.repeat(skips, lengths)  # (train_len,)


def skip_positions(train_len, target_len, chunks=2, rng=None, split="uniform"):
    """PoSE position ids for one example: int64 (train_len,), strictly increasing, < target_len.

    chunks=1 gives the plain ids 0 .. train_len - 1 (u_0 = 0); chunks=train_len gives one token per
    chunk. See `sample_chunks` for the law of chunk lengths and skips.
    """
    _, lengths, skips = sample_chunks(train_len, target_len, chunks, rng, split)
    return _layout_positions(lengths, skips, int(train_len))


def pose_example(doc, train_len, target_len, chunks=2, content="uniform", rng=None, split="uniform"):
    """One PoSE training example from document `doc`: (input_ids, positions), int64 (train_len,) each.

    Chunk i reads doc[v_i + st_i : v_i + st_i + l_i] (paper eq. 5) with, by `content`:
      uniform     v_0 = 0, v_i ~ U{v_{i-1}, ..., len(doc) - train_len} (the paper's default)
      contiguous  v_i = 0: the chunks are one stretch doc[0 : train_len] (appendix A, "v_i = 0")
      aligned     v_i = min(u_i, len(doc) - train_len) (appendix A, "v_i = u_i")
    In every case the offsets are non-decreasing, so chunk contents keep the document's order and
    never overlap, and the largest index read is v_{N-1} + train_len - 1 <= len(doc) - 1.

    Aligned content with a short document: v_i = u_i would read past the end of any document shorter
    than u_{N-1} + train_len, so the content offset is clipped to len(doc) - train_len (the skip u_i
    of the positions is untouched). With len(doc) >= target_len the clip never binds and every token
    sits at its true document index: input_ids[t] == doc[positions[t]]. With a shorter document the
    chunks whose skip exceeds len(doc) - train_len are read from the last possible offset instead:
    still in order, still a valid example, but no longer aligned.

    The official code additionally truncates each document to 5 * train_len tokens before sampling
    v (so v_1 <= 4 * train_len) and accepts documents shorter than train_len; here the whole document
    is used and a document shorter than train_len is a ValueError.
    """
    train_len, target_len, chunks = _check_lengths(train_len, target_len, chunks)
    _check_choice("content", content, CONTENTS)
    doc = _as_doc(doc, train_len, "train_len")
    rng = np.random.default_rng(rng)

    starts, lengths, skips = sample_chunks(train_len, target_len, chunks, rng, split)
    positions = _layout_positions(lengths, skips, train_len)

    # content offsets v_i of eq. (5)
    room = len(doc) - train_len  # largest offset that keeps a whole window inside the document
    if content == "uniform":
        offsets = _sequential_uniform(chunks, room, rng)
    elif content == "contiguous":
        offsets = np.zeros(chunks, dtype=np.int64)
    else:  # aligned, clipped as documented above
        offsets = np.minimum(skips, room)

    # token of window slot t (in chunk i) is doc[v_i + t]: one gather, no loop over tokens
    index = np.arange(train_len, dtype=np.int64) + np.repeat(offsets, lengths)  # (train_len,)
    input_ids = doc[index].astype(np.int64)
    return input_ids, positions


# ----------------------------------------------------------------------------------------------
# baselines


def randpos_positions(train_len, target_len, rng=None):
    """RandPos (Ruoss et al. 2023): train_len distinct position ids drawn uniformly without
    replacement from 0 .. target_len - 1, sorted. int64 (train_len,).

    Every subset of size train_len is equally likely. numpy's `choice(replace=False)` uses Floyd's
    algorithm when train_len << target_len, so target_len = 128k or 1M costs about the same as 16k.
    PoSE's appendix B calls this the limit of many chunks; it is not PoSE with N = train_len, whose
    skips follow the sequential law of eq. (4).
    """
    train_len, target_len, _ = _check_lengths(train_len, target_len)
    rng = np.random.default_rng(rng)
    picked = rng.choice(target_len, size=train_len, replace=False, shuffle=False)
    return np.sort(picked).astype(np.int64)


def full_positions(target_len):
    """Full-length fine-tuning: plain position ids 0 .. target_len - 1 over target_len tokens."""
    target_len = _check_int("target_len", target_len, 1)
    return np.arange(target_len, dtype=np.int64)


def pi_positions(train_len):
    """Positional interpolation only: plain ids 0 .. train_len - 1 over train_len tokens."""
    train_len = _check_int("train_len", train_len, 1)
    return np.arange(train_len, dtype=np.int64)


def make_example(method, doc, train_len, target_len, chunks=2, content="uniform", rng=None, split="uniform"):
    """One training example (input_ids, positions), int64, for any method of the paper.

      pose     pose_example(...) on a window of max(5 train_len, target_len) tokens at a random offset
               of the document: train_len tokens, chunked content, skipped positions
      full     target_len consecutive tokens from a random offset, positions 0 .. target_len - 1;
               the document needs >= target_len tokens
      randpos  train_len consecutive tokens from a random offset, randpos_positions(...)
      pi       train_len consecutive tokens from a random offset, positions 0 .. train_len - 1

    The random offset is uniform on 0 .. len(doc) - window. `chunks`, `content` and `split` only
    matter for "pose". The arrays have length target_len for "full" and train_len otherwise.
    """
    _check_choice("method", method, METHODS)
    train_len, target_len, chunks = _check_lengths(train_len, target_len, chunks)
    if method == "pose":
        # Eq. 5 sets v_0 = 0: the first chunk starts at the document's first token. The official code uses each
        # document once, truncated to 5 * train_len tokens; we draw documents with replacement (data.py), so a long
        # document would give every one of its examples the same opening. So PoSE reads a window of
        # max(5 * train_len, target_len) tokens at a uniform offset of the document, as the official code reads its
        # truncated document (target_len at least, so that `aligned` content stays aligned).
        doc = _as_doc(doc, train_len, "train_len")
        rng = np.random.default_rng(rng)
        span = max(5 * train_len, target_len)
        start = int(rng.integers(0, len(doc) - span + 1)) if len(doc) > span else 0
        return pose_example(doc[start:start + span], train_len, target_len, chunks, content, rng, split)
    _check_choice("content", content, CONTENTS)  # unused below, but a typo should still fail
    _check_choice("split", split, SPLITS)
    window = target_len if method == "full" else train_len
    doc = _as_doc(doc, window, "target_len" if method == "full" else "train_len")
    rng = np.random.default_rng(rng)
    start = int(rng.integers(0, len(doc) - window + 1))  # U{0, ..., len(doc) - window}
    input_ids = doc[start:start + window].astype(np.int64)
    if method == "randpos":
        positions = randpos_positions(train_len, target_len, rng)
    else:
        positions = np.arange(window, dtype=np.int64)  # full or pi
    return input_ids, positions
