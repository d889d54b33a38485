"""The rotary spectrum relative to the window: how much of a model's RoPE each interpolation leaves alone.

    python scripts/rope_spectrum.py                          # LLaMA-7B, the bundled base and candidate toys
    python scripts/rope_spectrum.py --window 256 --head-dim 64 --theta 10000 --factor 8 --json spectrum.json

Pair j (j = 0 .. d/2 - 1) of a head of dimension d turns at theta_j = base^(-2j/d) radians per position (rope.py),
so over a window of L positions it makes r_j = L * theta_j / (2 pi) full rotations. YaRN (Peng et al. 2023,
section 3.2, "NTK-by-parts") keys everything on r_j: a pair with r_j >= beta_fast keeps its frequency, a pair with
r_j < beta_slow is divided by the factor (linear PI), and a ramp over the pair index blends the two in between.
The paper fixes beta_fast = 32, beta_slow = 1 for LLaMA (L = 2048, d = 128).

Where r_j crosses a value r is the fraction of the pairs

    f(r) = ln(L / (2 pi r)) / ln(base)             (pair index j = f * d / 2)

so the fraction of unchanged pairs is f(beta_fast), that of fully interpolated ones 1 - f(beta_slow), and the ratio
f(beta_fast) / f(beta_slow) = ln(L / (2 pi beta_fast)) / ln(L / (2 pi beta_slow)) depends on L alone: with the
paper's betas, only L = 2048 gives LLaMA's proportions, and then base = 10000 gives its fractions. A smaller toy
window keeps the proportions only if the ramp's bounds scale with the window, beta = beta_LLaMA * L / 2048 (a
"window-relative ramp"): then L / beta = 2048 / beta_LLaMA and f(r) is LLaMA's exactly, for any head_dim (up to the
rounding of f * d / 2 to a whole pair). In tokens: L / beta is a wavelength, so the window-relative ramp keeps the
pairs of wavelength <= 64 tokens and fully interpolates those of wavelength > 2048 tokens, LLaMA-7B's YaRN bounds
exactly. But with beta_slow = 1/8 < 1 the pairs of wavelength between L and 8 L, which never complete a turn
inside the window, are only partly interpolated and reach angles they never saw well before the target ("safe"
below: 1.5 windows). Scaling beta_fast alone ("fast": 4 / 1 for L = 256) keeps LLaMA's kept wavelengths and
fraction of kept pairs and YaRN's rule that every pair slower than one turn per window is fully interpolated; the
fraction of fully interpolated pairs is then the window's, not LLaMA's. The table prints, per configuration:

  unchanged   pairs rope.yarn_frequencies leaves at their frequency (r_j >= beta_fast, after its floor/ceil)
  ramp        pairs blended
  interp      pairs divided by the factor, like PI (r_j < beta_slow)
  f_fast, f_slow   the continuous fractions f(beta_fast), f(beta_slow)
  r_slow      rotations of the slowest pair over the window (LLaMA-7B: 0.037)
  r_fast      rotations of the fastest pair (pair 0) over the window: L / (2 pi)
  safe        the longest input, in windows, at which no pair turns past the angles it saw in pretraining, for
              YaRN with these betas and for fixed NTK (ntk_safe). A pair that turns less than once over the window
              (r_j < 1) saw only the angles [0, L theta_j]; scaled to theta'_j it reaches them at L theta_j /
              theta'_j, so safe = min over those pairs of theta_j / theta'_j. Linear PI and YaRN with beta_slow = 1
              interpolate every such pair by the full factor: safe = factor. Fixed NTK divides pair j by
              s^(2j/(d-2)), so its first pair with r_j < 1 sets the limit (LLaMA-7B: 3.9 windows, 8k tokens, the
              length past which the PoSE paper's Table 6 NTK PI-only row breaks: 5.80 at 8k, 550 at 16k).

The counts are read off rope.py's own frequencies (the functions the model uses), not recomputed, so they include
its flooring and ceiling of the ramp ends.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from rope import default_frequencies, ntk_frequencies, yarn_frequencies  # noqa: E402

LLAMA_WINDOW = 2048  # the window YaRN's beta_fast = 32, beta_slow = 1 were chosen for

# (label, window, head_dim, theta, window-relative ramp?)
CONFIGS = [
    ("LLaMA-7B (reference)", 2048, 128, 10000.0, False),
    ("bundled base, standard ramp", 256, 64, 10000.0, False),
    ("bundled base, window-relative ramp", 256, 64, 10000.0, True),
    ("bundled base, window-relative beta_fast only", 256, 64, 10000.0, "fast"),
    ("toy head_dim 128, standard ramp", 256, 128, 10000.0, False),
    ("toy theta 500, standard ramp", 256, 64, 500.0, False),
    ("toy window 512, standard ramp", 512, 64, 10000.0, False),
    ("toy window 1024, standard ramp", 1024, 64, 10000.0, False),
    ("toy window 2048, standard ramp", 2048, 64, 10000.0, False),
    ("LLaMA-2-7B 4096 (reference)", 4096, 128, 10000.0, False),
]


def ramp_bounds(window, relative, beta_fast=32.0, beta_slow=1.0):
    """YaRN's (beta_fast, beta_slow): the paper's (relative False), both scaled by window / 2048 (True: the
    window-relative ramp), or only beta_fast scaled ("fast": the same kept wavelengths as LLaMA-7B's YaRN, <= 64
    tokens, and YaRN's beta_slow = 1, every pair slower than one turn per window fully interpolated)."""
    scale = window / LLAMA_WINDOW
    if relative == "fast":
        return beta_fast * scale, beta_slow
    if relative:
        return beta_fast * scale, beta_slow * scale
    return beta_fast, beta_slow


def fraction(window, theta, rotations):
    """f(r): the fraction of the pairs below which a pair turns more than r times over the window (clipped to 0..1)."""
    return min(1.0, max(0.0, math.log(window / (2 * math.pi * rotations)) / math.log(theta)))


def spectrum(window, head_dim, theta, factor=8.0, beta_fast=32.0, beta_slow=1.0):
    """One row of the table (see the module docstring), from rope.py's frequencies."""
    base = default_frequencies(head_dim, theta)
    yarn = yarn_frequencies(head_dim, theta, factor, window, beta_fast, beta_slow)
    ntk = ntk_frequencies(head_dim, theta, factor)
    ratio = yarn / base  # 1: unchanged, 1 / factor: interpolated like PI
    unchanged = int(torch.isclose(ratio, torch.ones_like(ratio), rtol=1e-6).sum())
    rotations = window * base / (2 * math.pi)
    slow = rotations < 1  # pairs that never complete a turn inside the window

    def safe(scaled):  # in windows; every pair turns at least once: no angle is unseen at any length
        return float((base / scaled)[slow].min()) if slow.any() else math.inf

    interp = int(torch.isclose(ratio, torch.full_like(ratio, 1 / factor), rtol=1e-6).sum())
    pairs = head_dim // 2
    return dict(window=window, head_dim=head_dim, theta=theta, factor=factor, beta_fast=beta_fast,
                beta_slow=beta_slow, pairs=pairs, unchanged=unchanged, ramp=pairs - unchanged - interp,
                interp=interp, unchanged_analytic=int((rotations >= beta_fast).sum()),
                interp_analytic=int((rotations < beta_slow).sum()),
                f_fast=fraction(window, theta, beta_fast), f_slow=fraction(window, theta, beta_slow),
                r_slow=float(rotations[-1]), r_fast=float(rotations[0]),
                yarn_safe=safe(yarn), ntk_safe=safe(ntk))


def table(rows):
    head = ("| configuration | L | d | theta | beta_fast / beta_slow | unchanged | ramp | interp | f_fast | "
            "1 - f_slow | r_slow | r_fast | yarn safe | ntk safe |")
    lines = [head, "|---" * 14 + "|"]
    for label, r in rows:
        p = r["pairs"]
        lines.append(f"| {label} | {r['window']} | {r['head_dim']} | {r['theta']:g} | {r['beta_fast']:g} / "
                     f"{r['beta_slow']:g} | {r['unchanged']}/{p} ({r['unchanged'] / p:.0%}) | {r['ramp']}/{p} | "
                     f"{r['interp']}/{p} ({r['interp'] / p:.0%}) | {r['f_fast']:.3f} | {1 - r['f_slow']:.3f} | "
                     f"{r['r_slow']:.4f} | {r['r_fast']:.1f} | {r['yarn_safe']:.2f} | {r['ntk_safe']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, help="one configuration instead of the built-in list")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--theta", type=float, default=10000.0)
    p.add_argument("--relative", choices=("none", "both", "fast"), default="none",
                   help="window-relative ramp: both betas x window / 2048, or only beta_fast")
    p.add_argument("--factor", type=float, default=8.0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    relative = {"none": False, "both": True, "fast": "fast"}[args.relative]
    configs = CONFIGS if args.window is None else [("custom", args.window, args.head_dim, args.theta, relative)]
    rows = []
    for label, window, head_dim, theta, relative in configs:
        fast, slow = ramp_bounds(window, relative)
        rows.append((label, spectrum(window, head_dim, theta, args.factor, fast, slow)))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(label=label, **r) for label, r in rows], f, indent=2)


if __name__ == "__main__":
    main()
