"""Tests of coverage.py: the exact N = 2 curve against the paper's appendix code (enumerated) and
against brute force over real ids, Monte Carlo against exact laws, RandPos, and the CLI."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT
sys.path.insert(0, ROOT)
import coverage  # noqa: E402
import pose  # noqa: E402


def distances(positions, target_len):
    """Brute force: 0/1 per distance d, 1 iff two ids of the example differ by d."""
    p = np.asarray(positions)
    out = np.zeros(target_len)
    out[np.unique(np.abs(p[:, None] - p[None, :]))] = 1.0
    return out


def figure6_two_chunks(Lc, Lt, first_lengths):
    """The paper's Figure 6 (left) coverage code, with its random draws replaced by an exact average
    over every l0 (in `first_lengths`) and every u1 in 0..Lt-Lc."""
    visit = np.zeros(Lt)
    total = 0
    for l0 in first_lengths:
        l1 = Lc - l0
        for u1 in range(0, Lt - Lc + 1):
            rng1 = set(range(1, max(l0, l1)))
            rng2 = set(range(u1 + 1, u1 + Lc))
            for x in rng1 | rng2:
                visit[x] += 1
            total += 1
    return visit / total


SIZES = [(2, 2), (2, 5), (3, 3), (5, 12), (8, 8), (8, 20), (9, 31), (16, 40)]


@pytest.mark.parametrize("Lc,Lt", SIZES)
def test_exact_two_chunks_matches_paper_code(Lc, Lt):
    exact = coverage.coverage_exact_two_chunks(Lc, Lt)
    ref = figure6_two_chunks(Lc, Lt, range(1, Lc))  # l0 = randint(1, Lc-1)
    assert exact.shape == (Lt,) and exact[0] == 1.0
    np.testing.assert_allclose(exact[1:], ref[1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("split", ["uniform", "official"])
@pytest.mark.parametrize("Lc,Lt", SIZES)
def test_exact_two_chunks_matches_brute_force_over_ids(Lc, Lt, split):
    # enumerate every layout pose.sample_chunks can draw, build its real ids, take all pairwise differences
    top = Lc - 1 if split == "uniform" else (Lc + 1) // 2
    acc = np.zeros(Lt)
    for l0 in range(1, top + 1):
        for u in range(Lt - Lc + 1):
            pos = pose.layout_positions(np.array([l0, Lc - l0]), np.array([0, u]))
            acc += distances(pos, Lt)
    acc /= top * (Lt - Lc + 1)
    exact = coverage.coverage_exact_two_chunks(Lc, Lt, split)
    np.testing.assert_allclose(exact, acc, rtol=0, atol=1e-12)
    if split == "official":
        np.testing.assert_allclose(exact, figure6_two_chunks(Lc, Lt, range(1, top + 1)) + (np.arange(Lt) == 0),
                                   rtol=0, atol=1e-12)


def test_exact_two_chunks_paper_size_closed_form():
    # for L <= d <= M + 1 no chunk is that long, and d is covered iff d - L + 1 <= u <= d - 1: P = (L - 1) / (M + 1)
    L, Lt = 2048, 16384
    M = Lt - L
    prob = coverage.coverage_exact_two_chunks(L, Lt)
    np.testing.assert_allclose(prob[L:M + 2], (L - 1) / (M + 1), rtol=1e-12)
    assert np.all(prob[1:L // 2] == 1.0)  # max(l0, l1) >= L/2 always
    assert np.all(np.diff(prob[1:]) <= 1e-15)  # non-increasing in d
    assert 0 < prob[-1] < 1e-3


def test_exact_one_chunk():
    prob = coverage.coverage_exact(8, 20, 1)
    assert np.array_equal(prob, (np.arange(20) < 8).astype(float))
    with pytest.raises(ValueError, match="chunks 1 and 2"):
        coverage.coverage_exact(8, 20, 3)


def within(mc, se_exact, exact, k=5.0):
    return np.abs(mc - exact) <= k * se_exact + 1e-12


@pytest.mark.parametrize("split", ["uniform", "official"])
def test_monte_carlo_agrees_with_exact_two_chunks(split):
    L, Lt, S = 12, 60, 3000
    exact = coverage.coverage_exact_two_chunks(L, Lt, split)
    prob, stderr = coverage.coverage_monte_carlo(L, Lt, 2, S, np.random.default_rng(0), split=split)
    se = np.sqrt(exact * (1 - exact) / S)
    assert prob.shape == stderr.shape == (Lt,)
    assert np.all(within(prob, se, exact))
    np.testing.assert_allclose(stderr, np.sqrt(prob * (1 - prob) / (S - 1)))


def exact_pose_law(L, Lt, N):
    """Exact coverage by enumeration of pose's law: uniform compositions x sequential skips."""
    M = Lt - L
    acc = np.zeros(Lt)
    cuts_all = list(itertools.combinations(range(1, L), N - 1))

    def skip_paths(i, prev, p):  # u_i ~ U{u_{i-1}..M}
        if i == N:
            yield (), p
            return
        for u in range(prev, M + 1):
            for rest, q in skip_paths(i + 1, u, p / (M - prev + 1)):
                yield (u,) + rest, q

    for cuts in cuts_all:
        lengths = np.diff((0,) + cuts + (L,))
        for skips, p in skip_paths(1, 0, 1.0):
            pos = pose.layout_positions(lengths, np.array((0,) + skips))
            acc += p * distances(pos, Lt)
    return acc / len(cuts_all)


@pytest.mark.parametrize("L,Lt,N", [(6, 14, 3), (5, 11, 4)])
def test_monte_carlo_agrees_with_exact_enumeration_many_chunks(L, Lt, N):
    exact = exact_pose_law(L, Lt, N)
    S = 3000
    prob, stderr = coverage.coverage_monte_carlo(L, Lt, N, S, np.random.default_rng(1))
    assert np.all(within(prob, np.sqrt(exact * (1 - exact) / S), exact))


def test_interval_union_equals_fft_equals_brute_force():
    rng = np.random.default_rng(2)
    for L, Lt, N in ((1, 1, 1), (5, 5, 5), (10, 40, 1), (10, 40, 2), (10, 40, 5), (10, 40, 10), (64, 500, 9)):
        lays = [pose.sample_chunks(L, Lt, N, rng) for _ in range(20)]
        by_intervals = coverage.covered_from_layouts(lays, Lt)
        pos = np.stack([pose.layout_positions(l, u) for _, l, u in lays])
        by_fft = coverage.covered_from_positions(pos, Lt)
        brute = np.stack([distances(p, Lt) > 0 for p in pos])
        assert np.array_equal(by_intervals, brute) and np.array_equal(by_fft, brute)


def test_many_chunks_take_the_fft_path():
    L, Lt = 128, 1024
    prob, _ = coverage.coverage_monte_carlo(L, Lt, 128, 20, np.random.default_rng(3))
    assert prob[0] == 1.0 and prob[1] == 1.0  # one token per chunk still leaves adjacent ids (u_i = u_{i+1})
    assert np.all((prob >= 0) & (prob <= 1))


def test_randpos_monte_carlo():
    # exact RandPos coverage on a tiny size by enumerating all C(10, 4) subsets
    L, Lt, S = 4, 10, 4000
    subsets = list(itertools.combinations(range(Lt), L))
    exact = np.mean([distances(s, Lt) for s in subsets], axis=0)
    exact[0] = 1.0
    prob, _ = coverage.coverage_monte_carlo(L, Lt, samples=S, rng=np.random.default_rng(4), method="randpos")
    assert np.all(within(prob, np.sqrt(exact * (1 - exact) / S), exact))
    # every distance has positive coverage: "covers every relative position in expectation"
    prob, _ = coverage.coverage_monte_carlo(64, 512, samples=200, rng=np.random.default_rng(5), method="randpos")
    assert np.all(prob[1:] > 0)


def test_coverage_table_rows():
    rows = coverage.coverage_table(16, 64, chunks=(1, 2, 3, 2), randpos=True, samples=200, seed=0)
    assert [r["label"] for r in rows] == ["PoSE N=1", "PoSE N=2", "PoSE N=3", "RandPos"]
    for r in rows:
        assert r["prob"].shape == (64,)
        assert r["inside_mean"] == pytest.approx(r["prob"][1:16].mean())
        assert r["beyond_mean"] == pytest.approx(r["prob"][16:].mean())
        if r["estimate"] == "exact":
            assert r["stderr"] is None and r["inside_stderr"] is None
        else:
            assert r["samples"] == 200 and r["beyond_stderr"] > 0
    assert rows[0]["inside_mean"] == 1.0 and rows[0]["beyond_mean"] == 0.0
    # the same seed gives the same Monte Carlo row, whatever other rows are computed
    again = coverage.coverage_table(16, 64, chunks=(3,), randpos=False, samples=200, seed=0)
    assert np.array_equal(again[0]["prob"], rows[2]["prob"])
    # empty ranges: no distance beyond the window when target_len == train_len
    rows = coverage.coverage_table(4, 4, chunks=(2, 3), samples=10)
    assert all(r["beyond_mean"] is None for r in rows)


def test_monte_carlo_bad_input():
    with pytest.raises(ValueError, match="samples"):
        coverage.coverage_monte_carlo(8, 16, 3, samples=1)
    with pytest.raises(ValueError, match="method"):
        coverage.coverage_monte_carlo(8, 16, 3, samples=10, method="full")
    with pytest.raises(ValueError, match="chunks"):
        coverage.coverage_monte_carlo(8, 16, 9, samples=10)


# ----------------------------------------------------------------------------------------------
# CLI


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "coverage.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_writes_json_and_plot(tmp_path):
    js, png = tmp_path / "cov.json", tmp_path / "cov.png"
    res = run_cli("--train-len", "32", "--target", "256", "--chunks", "2", "3", "--samples", "100",
                  "--json", str(js), "--plot", str(png))
    assert res.returncode == 0, res.stderr
    assert "PoSE N=2" in res.stdout and "PoSE N=3" in res.stdout and "RandPos" in res.stdout
    out = json.loads(js.read_text())
    assert out["train_len"] == 32 and out["target_len"] == 256 and len(out["rows"]) == 3
    row2 = out["rows"][0]
    np.testing.assert_allclose(row2["prob"], coverage.coverage_exact_two_chunks(32, 256))
    assert f"{row2['inside_mean']:.4f}" in res.stdout and f"{out['rows'][1]['beyond_mean']:.4f}" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cov.json", "cov.png"]  # no temporary files left


@pytest.mark.parametrize("args", [
    ["--train-len", "0"],
    ["--train-len", "64", "--target", "32"],
    ["--train-len", "16", "--target", "64", "--chunks", "0"],
    ["--train-len", "16", "--target", "64", "--chunks", "17"],
    ["--train-len", "16", "--target", "64", "--samples", "1"],
    ["--train-len", "16", "--target", "64", "--chunks", "3", "--split", "official"],
    ["--train-len", "16", "--target", "64", "--chunks", "two"],
    ["--train-len", "16", "--target", "64", "--plot", "PLOT.notaformat"],
    ["--train-len", "16", "--target", "64", "--json", "no/such/folder/x.json"],
])
def test_cli_bad_args(args, tmp_path):
    args = [a.replace("PLOT", str(tmp_path / "p")) for a in args]
    res = run_cli(*args, "--json", str(tmp_path / "out.json")) if "--json" not in args else run_cli(*args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()[-1]) > 0 and "error" in res.stderr.strip().splitlines()[-1]
    assert res.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_plot_legend_covers_no_curve(tmp_path):
    """The legend sits below the axes: inside, RandPos's and N = 3's fall at the right end and the first chunks at the
    left would be under it for some train_len / target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = coverage.coverage_table(32, 128, [2, 3], True, 50, 0, "uniform")
    figures, real_close = [], plt.close
    try:
        plt.close = figures.append  # keep write_plot's figure to look at
        coverage.write_plot(tmp_path / "c.png", rows, 32, 128)
    finally:
        plt.close = real_close
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.y1 < frame.y0 and len(ax.get_legend().get_texts()) == 4
    assert fig.get_tightbbox(renderer).y0 >= 0  # and inside the saved image
    real_close(fig)
