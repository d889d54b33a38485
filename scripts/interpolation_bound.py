"""Why interpolate rather than extrapolate: the Position Interpolation paper's Figure 2 and Theorem 2.1, redrawn
from the bundled base model (assets/tiny: head_dim 64, rope_theta 10000, a 256-token window).

    python scripts/interpolation_bound.py --out results/toy/interpolation_bound.png      # seconds, CPU

The attention score (Chen et al. 2023, "Extending context window of large language models via positional
interpolation", section 2). With RoPE, a query q at position m and a key k at position n score

    q~ . k~ = Re[ sum_j h_j e^{i s theta_j} ] =: a(s),   s = m - n,   h_j = q_j conj(k_j),   theta_j = c^(-2j/d)

where q_j = q[j] + i q[j + d/2] is pair j of the query as a complex number (rope.py's rotate-half pairing), c the
rope base and d the head dimension. The pretrained model has seen a(s) only at integer s in [0, L), L its window.
  - Extrapolation (plain RoPE on a longer input) evaluates a at integer s >= L: values the model never saw.
  - Linear interpolation (PI) with factor S evaluates a(s / S): every s / S lies in [0, L), between two integers
    s1 = floor(s / S) and s2 = s1 + 1 whose scores the model has seen.

Theorem 2.1 (interpolation bound), as we reconstruct it. For s in [s1, s2], let a_linear(s) = (1 - lambda) a(s1) +
lambda a(s2), lambda = (s - s1) / (s2 - s1), the straight line between the two seen scores. The error of linear
interpolation of a twice differentiable function is at most (s - s1)(s2 - s) / 2 * max |a''| on [s1, s2], and

    a''(s) = -Re[ sum_j h_j theta_j^2 e^{i s theta_j} ]   so   |a''| <= sum_j |h_j| theta_j^2                    (1)
                                                             <= max_j |h_j| * sum_j c^(-4j/d)                     (2)
    sum_{j=0}^{d/2-1} c^(-4j/d) = (1 - c^-2) / (1 - c^(-4/d))  ~  d / (4 ln c)   (1 - e^-x ~ x, x = 4 ln c / d)

hence |a(s) - a_linear(s)| <= d * max_j |h_j| * (s - s1)(s2 - s) / (8 ln c), the closed form in which we remember
the paper stating the theorem. We could not check that statement against the paper's text (it is not among this
project's sources), and the last step is an approximation, not an inequality: for d = 128, c = 10000 (LLaMA) the
exact geometric sum is 4.00 where d / (4 ln c) = 3.47; for the tiny model (d = 64) 2.26 vs 1.74. So the figure draws
the bounds we can prove: (1) with the real h_j (tightest) and (2) with the exact sum; the closed form is printed
beside them. Between two neighbouring integers (s2 - s1 = 1) the factor (s - s1)(s2 - s) is at most 1/4.
For extrapolation nothing of the sort holds: a(s) at s >= L is bounded only by sum_j |h_j|, and a function fitted
to be small on [0, L) can be huge beyond it (the paper's Figure 2, middle; we redraw it in the second panel).

Panels:
  1. a(s) for one real query/key pair of the base model's first layer (the head and pair are chosen by the rule in
     real_scores: the pair whose score varies most with s inside the window), s = 0 .. 8L: extrapolation a(s) vs
     linear interpolation a(s / 8), with the range a(s) takes inside the window shaded.
  2. The paper's experiment with the tiny model's frequencies: h_j fitted by least squares to random targets in
     [-1, 1] at random s in [0, L); extrapolated beyond L it explodes, interpolated it stays in range.
  3. Zoom on interpolated positions of panel 1's pair between integers: a at fractional s, the line a_linear
     through the seen integer scores, and the bounds (1) and (2) around it.
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib import cli  # noqa: E402
import data  # noqa: E402
from model import LLaMA  # noqa: E402
from rope import rope_frequencies  # noqa: E402

from data import Tokenizer  # noqa: E402



def score(h, theta, s):
    """a(s) = Re sum_j h_j e^{i s theta_j} for complex h (P,), theta (P,), s (N,) float -> (N,)."""
    return (h[None, :] * np.exp(1j * s[:, None] * theta[None, :])).real.sum(axis=1)


def as_complex(x):
    """(..., d) real -> (..., d/2) complex, pair j = (x[j], x[j + d/2]) (rope.py's rotate-half pairing)."""
    half = x.shape[-1] // 2
    return x[..., :half] + 1j * x[..., half:]


@torch.no_grad()
def first_layer_qk(model, tokens):
    """Un-rotated queries and keys of layer 0 for a token sequence: (heads, T, d) each, as float64 numpy."""
    layer = model.layers[0]
    x = layer.input_layernorm(model.embed_tokens(torch.as_tensor(tokens)[None]))  # (1, T, dim)
    attn = layer.self_attn
    d = attn.head_dim
    q = attn.q_proj(x).view(len(tokens), -1, d).transpose(0, 1)  # (heads, T, d)
    k = attn.k_proj(x).view(len(tokens), -1, d).transpose(0, 1)  # (kv heads, T, d)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # GQA: the key head each query head reads
    return q.double().numpy(), k.double().numpy()


def real_scores(model, tokens, theta, window):
    """h = q_j conj(k_j) / sqrt(d) for every (query, key) token pair of the text, every head; returns the h of the pair
    whose in-window score a(0..L-1) has the largest standard deviation (the most position-dependent one), and the
    share of all pairs whose extrapolated scores a(L..8L-1) leave the range they take inside the window."""
    q, k = first_layer_qk(model, tokens)
    d = q.shape[-1]
    h = as_complex(q)[:, :, None, :] * np.conj(as_complex(k))[:, None, :, :] / math.sqrt(d)  # (H, T, T, d/2)
    h = h.reshape(-1, h.shape[-1])
    inside = np.arange(window, dtype=np.float64)
    beyond = np.arange(window, 8 * window, dtype=np.float64)
    a_in = (h @ np.exp(1j * inside[None, :] * theta[:, None])).real  # (pairs, L)
    a_out = (h @ np.exp(1j * beyond[None, :] * theta[:, None])).real  # (pairs, 7L)
    lo, hi = a_in.min(axis=1), a_in.max(axis=1)
    out_of_range = (a_out.max(axis=1) > hi) | (a_out.min(axis=1) < lo)
    excess = np.maximum(a_out.max(axis=1) - hi, lo - a_out.min(axis=1)) / (hi - lo)
    best = int(np.argmax(a_in.std(axis=1)))
    return h[best], float(out_of_range.mean()), float(np.median(np.maximum(excess, 0))), len(h)


def fitted_scores(theta, window, rng, points=None):
    """The PI paper's Figure 2 experiment: least-squares h (d/2 complex = d real unknowns) with a(s_i) ~ y_i for random
    s_i in [0, L) and y_i uniform in [-1, 1]; twice as many points as unknowns unless told."""
    n = points or 4 * len(theta)
    s = np.sort(rng.uniform(0, window, n))
    y = rng.uniform(-1, 1, n)
    # a(s) = sum_j Re(h_j) cos(s theta_j) - Im(h_j) sin(s theta_j): linear in (Re h, Im h)
    design = np.concatenate([np.cos(s[:, None] * theta), -np.sin(s[:, None] * theta)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef[:len(theta)] + 1j * coef[len(theta):], s, y


def bounds(h, theta):
    """max |a''| bounds: (1) sum |h_j| theta_j^2, (2) max |h_j| * sum theta_j^2, and the closed form d max|h| / (4 ln c)
    is returned by the caller (it needs c)."""
    return float((np.abs(h) * theta ** 2).sum()), float(np.abs(h).max() * (theta ** 2).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=cli.BUNDLED_MODEL)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "toy", "interpolation_bound.png"))
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="tokens of the first held-out play whose layer-0 query/key "
                                                          "pairs are searched (all tokens x all tokens x all heads)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = LLaMA.from_pretrained(args.model)
    cfg = model.cfg
    window, d, c = cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta
    theta = rope_frequencies(d, c, None)[0].double().numpy()  # the model's own plain RoPE frequencies
    tokenizer = Tokenizer(args.model)
    doc = data.load_corpus(cli.BUNDLED_EVAL, tokenizer)[0]
    h, share_out, median_excess, n_pairs = real_scores(model, np.asarray(doc[1:args.tokens + 1], dtype=np.int64),
                                                       theta, window)
    S = args.factor
    closed_form = d / (4 * math.log(c))
    exact_sum = float((theta ** 2).sum())
    print(f"d = {d}, c = {c:g}, L = {window}: sum_j theta_j^2 = {exact_sum:.3f}, d / (4 ln c) = {closed_form:.3f}; "
          f"LLaMA-7B (d 128): {(1 - c ** -2) / (1 - c ** (-4 / 128)):.3f} vs {128 / (4 * math.log(c)):.3f}")
    print(f"{n_pairs} layer-0 (query, key, head) pairs: {share_out:.0%} leave their in-window range when "
          f"extrapolated to {S * window}, median excess {median_excess:.2f} x the in-window range")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    # 1. real pair: extrapolation vs interpolation over the target window
    s_int = np.arange(S * window, dtype=np.float64)
    a_in = score(h, theta, np.arange(window, dtype=np.float64))
    ax = axes[0]
    ax.axhspan(a_in.min(), a_in.max(), color="0.9", label="range of a(s) inside the window")
    ax.plot(s_int, score(h, theta, s_int), lw=0.6, color="tab:red", alpha=0.8, label="extrapolation: a(s)")
    ax.plot(s_int, score(h, theta, s_int / S), lw=1.2, color="tab:blue", label=f"linear interpolation: a(s / {S})")
    ax.axvline(window, color="gray", ls=":")
    ax.set_xlabel("relative distance s (tokens)")
    ax.set_ylabel("attention score q.k / sqrt(d)")
    ax.set_title(f"base model, layer 0, one real query/key pair. Beyond L = {window}, {share_out:.0%} of\n"
                 f"{n_pairs} pairs leave their in-window range (median by {median_excess:.2f} x that range)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")

    # 2. the paper's fitted function
    rng = np.random.default_rng(args.seed)
    h_fit, s_pts, y_pts = fitted_scores(theta, window, rng)
    s_fine = np.linspace(0, S * window, 8000)
    a_extra = score(h_fit, theta, s_fine)
    ax = axes[1]
    ax.plot(s_fine, a_extra, lw=0.7, color="tab:red", label="extrapolation: a(s)")
    ax.plot(s_fine, score(h_fit, theta, s_fine / S), lw=1.2, color="tab:blue", label=f"interpolation: a(s / {S})")
    ax.scatter(s_pts, y_pts, s=4, color="k", zorder=3, label="fitted points (random, in [0, L))")
    ax.axvline(window, color="gray", ls=":")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("relative distance s (tokens)")
    ax.set_title(f"PI paper's Fig. 2 with this model's theta_j (d = {d}): h fitted to random points\n"
                 f"max |a| beyond L: {np.abs(a_extra[s_fine >= window]).max():.1e}; inside: "
                 f"{np.abs(a_extra[s_fine < window]).max():.1f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")

    # 3. zoom: fractional positions between seen integers, with the bounds
    b_real, b_max = bounds(h, theta)
    s1 = int(np.argmax(np.abs(np.diff(a_in, 2)))) + 1  # the most curved stretch of the in-window score
    lo_s, hi_s = max(0, s1 - 3), min(window - 1, s1 + 3)
    s_frac = np.linspace(lo_s, hi_s, 600)
    a_frac = score(h, theta, s_frac)
    knots = np.arange(lo_s, hi_s + 1, dtype=np.float64)
    a_knots = score(h, theta, knots)
    a_lin = np.interp(s_frac, knots, a_knots)
    t = s_frac - np.floor(s_frac)
    wiggle = t * (1 - t) / 2  # (s - s1)(s2 - s) / 2
    ax = axes[2]
    ax.fill_between(s_frac, a_lin - wiggle * b_max, a_lin + wiggle * b_max, color="tab:orange", alpha=0.25,
                    label="bound (2): max|h| sum theta_j^2 (s-s1)(s2-s)/2")
    ax.fill_between(s_frac, a_lin - wiggle * b_real, a_lin + wiggle * b_real, color="tab:green", alpha=0.35,
                    label="bound (1): sum |h_j| theta_j^2 (s-s1)(s2-s)/2")
    ax.plot(s_frac, a_frac, color="tab:blue", lw=1.2, label="a(s) at interpolated (fractional) s")
    ax.plot(knots, a_knots, "ko-", ms=4, lw=0.6, label="a_linear through seen integer s")
    ax.set_xlabel(f"s / {S} (original units; {S} interpolated positions per integer)")
    ax.set_title(f"panel 1 between seen integers: |a - a_linear| <= bound; at a midpoint\n(1) {b_real / 8:.3f}, "
                 f"(2) {b_max / 8:.3f}, closed form d max|h| / (32 ln c) = {closed_form * np.abs(h).max() / 8:.3f}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    err = np.abs(a_frac - a_lin).max()
    print(f"zoom: max |a - a_linear| = {err:.4f}; bound (1) at the midpoint {b_real / 8:.4f}, (2) {b_max / 8:.4f}, "
          f"closed form {closed_form * np.abs(h).max() / 8:.4f}")
    assert np.all(np.abs(a_frac - a_lin) <= wiggle * b_real + 1e-12), "bound (1) violated"
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
