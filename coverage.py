"""Probability that a relative position is trained: PoSE paper appendix B, Figure 5.

    python coverage.py --train-len 2048 --target 16384 --plot coverage.png     # N = 2 exact, N = 3 and RandPos sampled

For one training example with position ids p_0 < ... < p_{L-1} (L = train_len), relative distance d
is "covered" when p_j - p_i = d for some pair i < j: some query/key pair in that example attends at
distance d, so RoPE's rotation by d gets a gradient. This script gives, for every d in
1 .. target_len - 1, the probability of that event under pose.py's own sampling law (so it describes
the examples training really sees):

  PoSE, N = 1 or 2 chunks  exact: every chunk length l_0 and skip u_1 counted in closed form
  PoSE, N >= 3 chunks      Monte Carlo over pose.sample_chunks, with a standard error
  RandPos                  Monte Carlo over pose.randpos_positions, with a standard error

    python coverage.py --train-len 2048 --target 16384 --chunks 2 3
    python coverage.py --train-len 2048 --target 16384 --chunks 2 3 --samples 1000 --seed 0 \
        --json coverage.json --plot coverage.png
    python coverage.py --train-len 64 --target 512 --chunks 1 2 3 8 --no-randpos    # tiny, instant
    python coverage.py --train-len 2048 --target 16384 --chunks 2 --split official  # official code's l_0

The table gives the mean coverage over distances inside the original window, [1, train_len - 1],
and beyond it, [train_len, target_len - 1]; Monte Carlo rows add the standard error of that mean
(from the spread of the per-example means). `--json` holds every printed number and the full
curves; `--plot` draws Figure 5 (coverage vs relative position, a vertical line at train_len).

The N >= 3 rows use pose.py's law: a uniformly random composition of train_len into N chunks and
the sequential skips of eq. 4. The paper's own N = 3 code (Figure 6, middle) splits sequentially
instead (l_0 ~ U{1..L-2}, then l_1 ~ U{1..L-l_0-1}), so its Figure 5 curve for N = 3 differs a little
from ours; N = 2 and RandPos follow the same law as the paper's code.

Curves are numpy arrays of length target_len indexed by the distance d; entry 0 (a token and
itself) is 1 by convention.
"""

import argparse
import json
import sys
import time

import numpy as np

from lib import cli
import pose


# ----------------------------------------------------------------------------------------------
# exact coverage for N = 1 and N = 2


def coverage_exact_two_chunks(train_len, target_len, split="uniform"):
    """Exact coverage probability of each distance for PoSE with N = 2, float64 (target_len,).

    Write L = train_len, M = target_len - train_len. An example is fixed by l_0 (l_1 = L - l_0) and
    the skip u = u_1 ~ U{0, ..., M}; its ids are 0 .. l_0 - 1 and u + l_0 .. u + L - 1. Its distances:
      inside a chunk   1 .. max(l_0, l_1) - 1                                          (set A)
      across chunks    (u + l_0) - (l_0 - 1) = u + 1  up to  (u + L - 1) - 0 = u + L - 1  (set B)
    (the difference of two integer intervals is the full interval between the extreme differences).
    A depends on l_0 only and B on u only, and l_0, u are drawn independently, so
        P(d covered) = a(d) + b(d) - a(d) b(d)
        a(d) = P(max(l_0, L - l_0) >= d + 1)                    (a tail count over l_0)
        b(d) = #{u in 0..M : d - L + 1 <= u <= d - 1} / (M + 1)  (an interval length, clipped)
    All O(L + target_len) with numpy, no enumeration of the (l_0, u) pairs.
    """
    pose.check_lengths(train_len, target_len, 2, split)
    L, M = train_len, target_len - train_len
    d = np.arange(target_len)

    # a(d): l_0 is uniform on 1..top (top = L - 1 for the uniform split, (L + 1) // 2 for the official
    # code's). Count m = max(l_0, L - l_0) over that support, then P(m >= d + 1) is a reversed
    # cumulative count over top (tail[k] = #{l_0 : m >= k}); integer counts keep a(d) = 1 exact.
    top = L - 1 if split == "uniform" else (L + 1) // 2
    l0 = np.arange(1, top + 1)
    hist = np.bincount(np.maximum(l0, L - l0), minlength=L + 1)  # (L + 1,)
    tail = np.concatenate((np.cumsum(hist[::-1])[::-1], [0]))  # (L + 2,), tail[L + 1] = 0
    a = tail[np.minimum(d + 1, L + 1)] / top

    # b(d): the skips u with u + 1 <= d <= u + L - 1 form the interval [max(0, d-L+1), min(M, d-1)]
    count = np.minimum(M, d - 1) - np.maximum(0, d - L + 1) + 1
    b = np.clip(count, 0, None) / (M + 1)

    prob = 1.0 - (1.0 - a) * (1.0 - b)  # = a + b - a b, written so that a = 1 or b = 1 gives exactly 1
    prob[0] = 1.0
    return prob


def coverage_exact(train_len, target_len, chunks, split="uniform"):
    """Exact coverage for N = 1 (plain ids: distances 1 .. L - 1 always, nothing beyond) or N = 2."""
    pose.check_lengths(train_len, target_len, chunks, split)
    if chunks == 2:
        return coverage_exact_two_chunks(train_len, target_len, split)
    if chunks != 1:
        raise ValueError(f"exact coverage is implemented for chunks 1 and 2, got {chunks}: use coverage_monte_carlo")
    prob = np.zeros(target_len)
    prob[:train_len] = 1.0
    return prob


# ----------------------------------------------------------------------------------------------
# Monte Carlo for N >= 3 and RandPos


def covered_from_positions(positions, target_len):
    """Which distances each example covers, from its position ids: bool (B, target_len).

    With x the 0/1 indicator of the ids on 0 .. target_len - 1, the autocorrelation
    c(d) = sum_t x[t] x[t + d] counts the pairs at distance d, so d is covered iff c(d) >= 1. An FFT
    of length 2 * target_len (no wrap-around) computes all of c in O(target_len log target_len);
    c holds integers, so c > 0.5 is an exact test despite rounding.
    """
    positions = np.atleast_2d(positions)  # (B, L)
    n = positions.shape[0]
    x = np.zeros((n, target_len))
    np.put_along_axis(x, positions, 1.0, axis=1)  # (B, Lt) indicator
    spec = np.fft.rfft(x, n=2 * target_len, axis=1)  # (B, Lt + 1)
    auto = np.fft.irfft(spec.real ** 2 + spec.imag ** 2, n=2 * target_len, axis=1)[:, :target_len]
    return auto > 0.5


def covered_from_layouts(layouts, target_len):
    """Which distances each PoSE example covers, from its chunk layouts: bool (B, target_len).

    `layouts` is a list of (starts, lengths, skips) from pose.sample_chunks. Chunk i occupies the ids
    [s_i, e_i] with s_i = u_i + st_i and e_i = s_i + l_i - 1, so the covered distances are a union of
    integer intervals: [1, l_i - 1] inside chunk i and [s_b - e_a, e_b - s_a] between chunks a < b.
    The union is painted with one difference array per example (+1 at each interval's start, -1 past
    its end, cumulative sum > 0). O(N^2 + target_len) per example.
    """
    rows, lo, hi = [], [], []
    for r, (starts, lengths, skips) in enumerate(layouts):
        s = skips + starts  # first id of each chunk
        e = s + lengths - 1  # last id of each chunk
        inner = lengths >= 2
        a, b = np.triu_indices(len(s), 1)  # all chunk pairs a < b
        lo_r = np.concatenate((np.ones(inner.sum(), dtype=np.int64), s[b] - e[a]))
        hi_r = np.concatenate((lengths[inner] - 1, e[b] - s[a]))
        rows.append(np.full(len(lo_r), r))
        lo.append(lo_r)
        hi.append(hi_r)
    n, width = len(layouts), target_len + 1
    rows, lo, hi = np.concatenate(rows), np.concatenate(lo), np.concatenate(hi)
    diff = np.bincount(rows * width + lo, minlength=n * width) - np.bincount(rows * width + hi + 1, minlength=n * width)
    covered = np.cumsum(diff.reshape(n, width), axis=1)[:, :target_len] > 0  # (B, Lt)
    covered[:, 0] = True
    return covered


def _monte_carlo(train_len, target_len, chunks, samples, rng, method, split):
    """Counts coverage over `samples` examples; returns prob, stderr (target_len,) and the
    per-example mean coverage inside [1, L - 1] and beyond [L, target_len - 1] ((samples,) or None)."""
    pose.check_lengths(train_len, target_len, chunks, split)
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a standard error needs two), got {samples}")
    if method not in ("pose", "randpos"):
        raise ValueError(f"unknown method {method!r}, expected pose or randpos")
    rng = np.random.default_rng(rng)
    L, Lt = train_len, target_len
    batch = max(1, min(samples, 2 ** 21 // Lt))  # bounds the (batch, 2 Lt) FFT buffers to ~32 MB
    counts = np.zeros(Lt)
    inside, beyond = [], []
    for done in range(0, samples, batch):
        b = min(batch, samples - done)
        if method == "randpos":
            pos = np.stack([pose.randpos_positions(L, Lt, rng) for _ in range(b)])  # (b, L)
            covered = covered_from_positions(pos, Lt)
        else:
            layouts = [pose.sample_chunks(L, Lt, chunks, rng, split) for _ in range(b)]
            if chunks <= 64:  # O(N^2) intervals are cheaper than an FFT for few chunks
                covered = covered_from_layouts(layouts, Lt)
            else:
                pos = np.stack([pose.layout_positions(l, u) for _, l, u in layouts])  # (b, L)
                covered = covered_from_positions(pos, Lt)
        counts += covered.sum(axis=0)
        inside.append(covered[:, 1:L].mean(axis=1) if L > 1 else np.zeros(0))
        beyond.append(covered[:, L:].mean(axis=1) if Lt > L else np.zeros(0))
    prob = counts / samples
    # standard error of a Bernoulli mean with the unbiased variance: sqrt(p (1 - p) / (S - 1))
    stderr = np.sqrt(prob * (1.0 - prob) / (samples - 1))
    inside = np.concatenate(inside) if L > 1 else None
    beyond = np.concatenate(beyond) if Lt > L else None
    return prob, stderr, inside, beyond


def coverage_monte_carlo(train_len, target_len, chunks=2, samples=1000, rng=None, method="pose", split="uniform"):
    """Monte Carlo coverage of each distance: (prob, stderr), float64 (target_len,) each.

    method="pose" samples layouts with pose.sample_chunks(train_len, target_len, chunks, rng, split);
    method="randpos" samples pose.randpos_positions (chunks is then ignored). stderr is the standard
    error of each prob, sqrt(p (1 - p) / (samples - 1)); samples must be >= 2.
    """
    prob, stderr, _, _ = _monte_carlo(train_len, target_len, chunks, samples, rng, method, split)
    return prob, stderr


# ----------------------------------------------------------------------------------------------
# the table of the CLI


def _mean(x):
    return None if x is None else float(np.mean(x))


def _sem(x):
    return None if x is None else float(np.std(x, ddof=1) / np.sqrt(len(x)))


def coverage_table(train_len, target_len, chunks=(2, 3), randpos=True, samples=1000, seed=0, split="uniform"):
    """One row per method: exact for N <= 2, Monte Carlo otherwise (row RNG: default_rng([seed, N]),
    N = 0 for RandPos, so a row does not depend on which other rows are computed).

    Each row is a dict: label, method, chunks, estimate ("exact" | "monte carlo"), samples,
    inside_mean / inside_stderr over distances [1, L - 1], beyond_mean / beyond_stderr over
    [L, target_len - 1] (None for an empty range; stderr None for exact rows), seconds, and the curves
    prob and stderr (numpy, length target_len; stderr None for exact rows).
    """
    L, Lt = train_len, target_len
    specs = [("pose", n) for n in dict.fromkeys(chunks)] + ([("randpos", 0)] if randpos else [])
    rows = []
    for method, n in specs:
        t0 = time.perf_counter()
        if method == "pose" and n <= 2:
            prob, stderr = coverage_exact(L, Lt, n, split), None
            inside = None if L == 1 else float(prob[1:L].mean())
            beyond = None if Lt == L else float(prob[L:].mean())
            row = dict(estimate="exact", samples=None, inside_mean=inside, inside_stderr=None,
                       beyond_mean=beyond, beyond_stderr=None)
        else:
            rng = np.random.default_rng([seed, n])
            prob, stderr, ins, bey = _monte_carlo(L, Lt, max(n, 1), samples, rng, method, split)
            row = dict(estimate="monte carlo", samples=samples, inside_mean=_mean(ins), inside_stderr=_sem(ins),
                       beyond_mean=_mean(bey), beyond_stderr=_sem(bey))
        label = "RandPos" if method == "randpos" else f"PoSE N={n}"
        rows.append(dict(label=label, method=method, chunks=n if method == "pose" else None, **row,
                         seconds=time.perf_counter() - t0, prob=prob, stderr=stderr))
    return rows


def _fmt(mean, se):
    if mean is None:
        return "-"
    return f"{mean:.4f}" if se is None else f"{mean:.4f} +- {se:.2g}"


def format_table(rows, train_len, target_len, split):
    L, Lt = train_len, target_len
    lines = [f"coverage of relative distances by one training example: train_len {L} -> target_len {Lt}"
             f" (chunk split: {split})"]
    head = ("method", "estimate", f"inside [1, {L - 1}]", f"beyond [{L}, {Lt - 1}]", "seconds")
    table = [head] + [(r["label"], r["estimate"] + (f", {r['samples']}" if r["samples"] else ""),
                       _fmt(r["inside_mean"], r["inside_stderr"]), _fmt(r["beyond_mean"], r["beyond_stderr"]),
                       f"{r['seconds']:.2f}") for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# output files


def write_json(path, rows, args, seconds):
    def listed(x):
        return None if x is None else [float(v) for v in x]

    out = dict(train_len=args.train_len, target_len=args.target, chunks=args.chunks, randpos=args.randpos,
               samples=args.samples, seed=args.seed, split=args.split, seconds=seconds,
               curves_index="curve[d] is the probability that distance d is covered; curve[0] = 1 by convention",
               rows=[{**{k: v for k, v in r.items() if k not in ("prob", "stderr")},
                      "prob": listed(r["prob"]), "stderr": listed(r["stderr"])} for r in rows])

    with open(path, "w") as f:
        json.dump(out, f)


def write_plot(path, rows, train_len, target_len):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    d = np.arange(1, target_len)
    for r in rows:
        how = "exact" if r["estimate"] == "exact" else f"{r['samples']} samples"
        ax.plot(d, r["prob"][1:], lw=1, label=f"{r['label']} ({how})")
    ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"train_len = {train_len}")
    ax.set_xlim(0, target_len)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("relative position d")
    ax.set_ylabel("P(d covered by one example)")
    ax.set_title(f"Coverage of relative positions, {train_len} -> {target_len}")
    # below the axes: inside, any corner covers some curve for some train_len / target (RandPos and N = 3 fall
    # at the right end, N = 2 and N = 3 start at the left)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Coverage probability of relative positions (PoSE appendix B).")
    p.add_argument("--train-len", type=int, default=2048, help="training window L_c (default 2048)")
    p.add_argument("--target", type=int, default=16384, help="target context L_t (default 16384)")
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 3],
                   help="PoSE chunk counts N (default 2 3); N <= 2 exact, N >= 3 Monte Carlo")
    p.add_argument("--randpos", action=argparse.BooleanOptionalAction, default=True,
                   help="add RandPos (Monte Carlo); on by default, as in Figure 5")
    p.add_argument("--split", choices=pose.SPLITS, default="uniform",
                   help="chunk split: uniform composition (paper) or official code's first-half cut (N <= 2)")
    p.add_argument("--samples", type=int, default=1000,
                   help="Monte Carlo examples per row (default 1000: stderr <= 0.016 per distance)")
    p.add_argument("--seed", type=int, default=0, help="Monte Carlo seed (default 0)")
    p.add_argument("--json", metavar="FILE", help="write every printed number and the full curves")
    p.add_argument("--plot", metavar="FILE", help="write a Figure-5-like plot (.png, .pdf, .svg, ...)")
    args = p.parse_args(argv)

    if args.train_len < 1:
        p.error(f"--train-len must be >= 1, got {args.train_len}")
    if args.target < args.train_len:
        p.error(f"--target ({args.target}) must be >= --train-len ({args.train_len})")
    for n in args.chunks:
        if not 1 <= n <= args.train_len:
            p.error(f"--chunks values must be in 1..{args.train_len} (one token per chunk at least), got {n}")
    if args.split == "official" and any(n > 2 for n in args.chunks):
        p.error("--split official is defined for --chunks 1 or 2 only")
    if args.samples < 2:
        p.error(f"--samples must be >= 2 (a standard error needs two samples), got {args.samples}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    try:
        cli.check_outputs(args)
    except cli.UsageError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows = coverage_table(args.train_len, args.target, args.chunks, args.randpos, args.samples, args.seed,
                          args.split)
    seconds = time.perf_counter() - t0
    print(format_table(rows, args.train_len, args.target, args.split))
    print(f"computed in {seconds:.2f} s", file=sys.stderr)
    if args.json:
        write_json(args.json, rows, args, seconds)
    if args.plot:
        write_plot(args.plot, rows, args.train_len, args.target)


if __name__ == "__main__":
    cli.run(main)
