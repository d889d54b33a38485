"""RoPE frequencies against their formulas (types transformers lacks) and basic invariants of every type."""
import math

import pytest
import torch

from rope import RoPE, apply_rope, rope_frequencies

D, THETA = 128, 10000.0
PLAIN = THETA ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # theta_j = base^(-2j/d), in float64


def test_default_and_linear():
    inv, scale = rope_frequencies(D, THETA, None)
    assert scale == 1.0 and torch.allclose(inv.double(), PLAIN, rtol=1e-6)
    lin, _ = rope_frequencies(D, THETA, {"type": "linear", "factor": 8.0})  # legacy "type" key
    assert torch.allclose(lin.double(), PLAIN / 8, rtol=1e-6)


def test_ntk_formula():
    """PoSE section 3.1: theta'_j = (base * lambda)^(-2j/d), lambda = s^(d/(d-2)); the lowest frequency is then
    interpolated exactly like PI (m theta'_{d/2-1} = (m/s) theta_{d/2-1}) and the highest is kept."""
    s = 16.0
    inv, scale = rope_frequencies(D, THETA, {"rope_type": "ntk", "factor": s})
    lam = s ** (D / (D - 2))
    want = (THETA * lam) ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    assert scale == 1.0 and torch.allclose(inv.double(), want, rtol=1e-5)
    assert inv[-1].item() == pytest.approx(PLAIN[-1].item() / s, rel=1e-5)
    assert inv[0].item() == 1.0


def test_dynamic_is_plain_inside_the_window_then_ntk_with_a_growing_factor():
    cfg = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048}
    inside, _ = rope_frequencies(D, THETA, cfg, seq_len=1000)
    assert torch.allclose(inside.double(), PLAIN, rtol=1e-5)
    # at length L the NTK factor is s * L / L_orig - (s - 1): 4 at L = 3584, 13 at L = 8192
    for length, ntk_factor in ((3584, 4.0), (8192, 13.0)):
        got, _ = rope_frequencies(D, THETA, cfg, seq_len=torch.tensor(length))
        ntk, _ = rope_frequencies(D, THETA, {"rope_type": "ntk", "factor": ntk_factor})
        assert torch.allclose(got, ntk, rtol=1e-5)


def yarn_reference(s, original, beta_fast=32, beta_slow=1, revised=False):
    """YaRN written out from the paper, in float64, one channel pair at a time."""
    def channel(rotations):
        return D * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(THETA))
    low, high = max(math.floor(channel(beta_fast)), 0), min(math.ceil(channel(beta_slow)), D - 1)
    out = []
    for j in range(D // 2):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        theta_j = THETA ** (-2 * j / D)
        if revised:
            out.append(theta_j / (ramp * s + (1 - ramp)))
        else:
            out.append(theta_j / s * ramp + theta_j * (1 - ramp))
    return torch.tensor(out, dtype=torch.float64), low, high


@pytest.mark.parametrize("revised", [False, True])
def test_yarn_formula(revised):
    s, original = 8.0, 2048
    cfg = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": original}
    if revised:
        cfg["yarn_variant"] = "revised"
    inv, scale = rope_frequencies(D, THETA, cfg)
    want, low, high = yarn_reference(s, original, revised=revised)
    assert torch.allclose(inv.double(), want, rtol=1e-5)
    assert scale == pytest.approx(0.1 * math.log(s) + 1)  # YaRN's temperature, on cos and sin
    # outside the ramp both variants are plain RoPE (fast pairs) or PI (slow pairs)
    assert torch.allclose(inv[:low].double(), PLAIN[:low], rtol=1e-5)
    assert torch.allclose(inv[high:].double(), PLAIN[high:] / s, rtol=1e-5)


def test_yarn_variants_differ_inside_the_ramp():
    cfg = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048}
    std, _ = rope_frequencies(D, THETA, cfg)
    rev, _ = rope_frequencies(D, THETA, dict(cfg, yarn_variant="revised"))
    _, low, high = yarn_reference(8.0, 2048)
    mid = (low + high) // 2
    # blending wavelengths gives lower frequencies than blending frequencies (harmonic vs arithmetic mean)
    assert rev[mid] < std[mid] * 0.9


def test_unknown_rope_type_and_missing_original():
    with pytest.raises(ValueError, match="unknown rope_type 'foo'"):
        rope_frequencies(D, THETA, {"rope_type": "foo", "factor": 2.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_frequencies(D, THETA, {"rope_type": "yarn", "factor": 2.0})


def test_apply_rope_is_a_rotation_of_channel_pairs_j_and_j_plus_half():
    """Rotate-half: channel j pairs with j + d/2; norms are kept and q.k depends only on m - n."""
    rope = RoPE(D, THETA)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, D, generator=g), torch.randn(1, 1, 1, D, generator=g)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    cos, sin = rope(torch.tensor([[7]]))
    assert torch.allclose(apply_rope(q, cos, sin).norm(), q.norm(), rtol=1e-5)
    assert score(10, 3) == pytest.approx(score(1010, 1003), rel=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)
    # one pair by hand: (x_0, x_{d/2}) rotated by angle m * theta_0 = m
    x = torch.zeros(1, 1, 1, D)
    x[..., 0] = 1.0
    y = apply_rope(x, *rope(torch.tensor([[2]])))
    assert y[..., 0].item() == pytest.approx(math.cos(2), abs=1e-6)
    assert y[..., D // 2].item() == pytest.approx(math.sin(2), abs=1e-6)


def test_scaling_from_spec():
    from rope import scaling_from_spec
    assert scaling_from_spec("none", 2048) is None
    assert scaling_from_spec("linear:8", 2048) == {"rope_type": "linear", "factor": 8.0}
    assert scaling_from_spec("ntk", 2048, factor=4) == {"rope_type": "ntk", "factor": 4.0}
    assert scaling_from_spec("yarn-revised:16", 2048) == {
        "rope_type": "yarn", "factor": 16.0, "yarn_variant": "revised", "original_max_position_embeddings": 2048}
    for bad, match in (("foo:2", "unknown rope"), ("linear:x", "not a number"), ("yarn", "needs a factor"),
                       ("linear:0.5", "needs a factor")):
        with pytest.raises(ValueError, match=match):
            scaling_from_spec(bad, 2048)
