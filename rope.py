"""Rotary position embedding (RoPE) and its interpolations.

RoPE (Su et al. 2021) rotates each pair of query/key channels by an angle m * theta_j that grows with the
token's position m, so that the attention score q_m . k_n depends on positions only through m - n (paper eq. 1-2).
Context-window extension changes the frequencies theta_j so that positions beyond the original window map onto
angles the model has seen. Every method here is one function from (head_dim, theta, scaling) to
(inv_freq, attention_scale):

    inv_freq[j]      = theta_j, the angle per position of channel pair j, j = 0 .. head_dim/2 - 1   (fp32)
    attention_scale  = a factor on both cos and sin (YaRN's temperature; 1.0 for the others)

`scaling` is the Hugging Face `rope_scaling` dict (`{"rope_type": "linear", "factor": 8.0, ...}`; the legacy key
"type" works too) or None. Formulas are those of transformers' `modeling_rope_utils` (our tests compare against it)
and of the cited papers; PoSE's own additions are `rope_type: "ntk"` (fixed NTK, PoSE section 3.1) and
`yarn_variant: "revised"` (the blend used by the official PoSE code).

Pairing convention. The paper's eq. 1 rotates adjacent channels (h_0, h_1), (h_2, h_3), ... Hugging Face LLaMA
(and we) rotate channel j with channel j + head_dim/2 ("rotate half"): cos/sin are laid out as [f, f] and the
partner of x is [-x2, x1]. Both are the same rotation up to a fixed permutation of the channels inside each head.
Meta's conversion script applied that permutation to the q/k projection weights once, when it wrote the HF
checkpoints, so HF-format weights already expect rotate-half and load here with no permutation.
"""
import math

import torch

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")
NEEDS_ORIGINAL = ("dynamic", "yarn", "llama3")  # types built on the original window (original_max_position_embeddings)


def rope_type(scaling):
    """The normalized rope type of a `rope_scaling` dict ("default" for None)."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = {"none": "default", "dynamic_ntk": "dynamic"}.get(kind, kind)
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    return kind


def _exponents(head_dim):
    # 2j / d for j = 0 .. d/2 - 1, the exponents of theta_j = base^(-2j/d)
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


def default_frequencies(head_dim, theta):
    """Plain RoPE: theta_j = base^(-2j/d) (Su et al. 2021; paper eq. 1)."""
    return 1.0 / (theta ** _exponents(head_dim))


def linear_frequencies(head_dim, theta, factor):
    """Position interpolation (Chen et al. 2023, "Extending context window ... via positional interpolation").

    Positions are squeezed by the scale factor, m -> m / s, so that a window s times longer maps onto the original
    range of angles. Dividing every frequency by s is the same thing: (m / s) * theta_j = m * (theta_j / s).
    """
    return default_frequencies(head_dim, theta) / factor


def ntk_frequencies(head_dim, theta, factor):
    """Fixed NTK-aware interpolation, as in the PoSE paper section 3.1 (bloc97, "NTK-aware scaled RoPE", 2023).

    The base is raised, base' = base * s^(d / (d - 2)), so that high frequencies (small j) are almost unchanged
    (extrapolation: local order stays sharp) while the lowest frequency j = d/2 - 1 is divided by exactly s:
    base'^(-(d-2)/d) = base^(-(d-2)/d) / s, i.e. it is interpolated like linear PI.
    """
    return default_frequencies(head_dim, theta * factor ** (head_dim / (head_dim - 2)))


def dynamic_ntk_frequencies(head_dim, theta, factor, original_len, seq_len=None):
    """Dynamic NTK (emozilla, 2023): NTK scaling whose strength follows the current sequence length.

    With L = max(seq_len, L_orig) the base becomes base * (s * L / L_orig - (s - 1))^(d / (d - 2)): fixed NTK with a
    factor that grows linearly with the length, 1 (plain RoPE) up to the original window. `seq_len` is the longest
    position + 1 in the batch; it may be a tensor (then no host synchronization is needed). transformers keeps a
    cache that only grows between calls; we compute from the current batch alone, which equals transformers' result
    on a fresh model.
    """
    if seq_len is None:
        seq_len = original_len
    if isinstance(seq_len, torch.Tensor):
        seq_len = torch.clamp(seq_len, min=original_len)
    else:
        seq_len = max(seq_len, original_len)
    base = theta * ((factor * seq_len / original_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = _exponents(head_dim)
    if isinstance(base, torch.Tensor):
        exponents = exponents.to(base.device)
    return 1.0 / (base ** exponents)


def yarn_frequencies(head_dim, theta, factor, original_len, beta_fast=32.0, beta_slow=1.0, truncate=True,
                     variant="standard"):
    """YaRN's "NTK-by-parts" frequencies (Peng et al. 2023, "YaRN", section 3.2).

    A channel pair j turns original_len / wavelength_j = original_len * theta_j / (2 pi) times over the original
    window. Pairs that turn more than beta_fast times keep their frequency (extrapolate: they already saw every
    angle), pairs that turn less than beta_slow times are interpolated like PI (theta_j / s), and a linear ramp over
    the channel index blends the two in between. The channel where a pair turns r times is
    d * ln(L / (2 pi r)) / (2 ln base), which gives the ramp's ends (floored/ceiled unless truncate=False).

    variant="standard" (YaRN paper, transformers) blends the frequencies:
        theta'_j = theta_j / s * (1 - w_j) + theta_j * w_j
    variant="revised" (the official PoSE code's `revised_yarn`) blends the wavelengths instead:
        theta'_j = theta_j / ((1 - w_j) * s + w_j)
    where w_j in [0, 1] is 1 for extrapolated pairs. Both agree at the ends of the ramp and differ inside it.
    """
    def channel_of(rotations):
        return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = channel_of(beta_fast), channel_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a degenerate ramp would divide by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    w = 1 - ramp  # extrapolation weight: 1 for the fast (high-frequency) pairs, 0 for the slow ones
    base_freq = 1.0 / (theta ** _exponents(head_dim))
    if variant == "revised":
        return base_freq / ((1 - w) * factor + w)
    if variant != "standard":
        raise ValueError(f"unknown yarn_variant {variant!r}; use 'standard' or 'revised'")
    return (1.0 / (factor * theta ** _exponents(head_dim))) * (1 - w) + base_freq * w


def yarn_attention_scale(factor, mscale=None, mscale_all_dim=None):
    """YaRN's attention temperature: softmax(q.k / (t sqrt(d))) with sqrt(1/t) = 0.1 ln(s) + 1 (YaRN eq. 22).

    Multiplying both cos and sin by sqrt(1/t) scales q.k by 1/t without touching the attention kernel. DeepSeek-style
    configs give mscale / mscale_all_dim, and the factor becomes the ratio of the two temperatures.
    """
    def get(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get(factor, mscale) / get(factor, mscale_all_dim))
    return get(factor)


def llama3_frequencies(head_dim, theta, factor, original_len, low_freq_factor=1.0, high_freq_factor=4.0):
    """Llama 3.1's frequency-band scaling (Meta, 2024).

    Wavelengths shorter than original_len / high_freq_factor are kept, those longer than original_len /
    low_freq_factor are divided by the factor like PI, and the band in between is blended smoothly by where
    original_len / wavelength falls between low_freq_factor and high_freq_factor.
    """
    inv_freq = default_frequencies(head_dim, theta)
    wavelen = 2 * math.pi / inv_freq
    # wavelen > original_len / low_freq_factor: divide by the factor (interpolate)
    scaled = torch.where(wavelen > original_len / low_freq_factor, inv_freq / factor, inv_freq)
    # in between: interpolate the frequency, weighted by how fast the pair turns over the original window
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original_len / high_freq_factor) & (wavelen <= original_len / low_freq_factor)
    return torch.where(medium, blended, scaled)


def rope_frequencies(head_dim, theta, scaling, seq_len=None):
    """(inv_freq, attention_scale) for a rope_scaling dict; `seq_len` only matters for dynamic NTK."""
    kind = rope_type(scaling)
    if kind == "default":
        return default_frequencies(head_dim, theta), 1.0
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings")
    if kind in NEEDS_ORIGINAL and original is None:
        raise ValueError(f"rope_type {kind!r} needs original_max_position_embeddings")
    if kind == "linear":
        return linear_frequencies(head_dim, theta, factor), 1.0
    if kind == "ntk":
        return ntk_frequencies(head_dim, theta, factor), 1.0
    if kind == "dynamic":
        return dynamic_ntk_frequencies(head_dim, theta, factor, original, seq_len), 1.0
    if kind == "llama3":
        return llama3_frequencies(head_dim, theta, factor, original, scaling.get("low_freq_factor", 1.0),
                                  scaling.get("high_freq_factor", 4.0)), 1.0
    inv_freq = yarn_frequencies(head_dim, theta, factor, original, scaling.get("beta_fast") or 32.0,
                                scaling.get("beta_slow") or 1.0, scaling.get("truncate", True),
                                scaling.get("yarn_variant", "standard"))
    scale = scaling.get("attention_factor")
    if scale is None:
        scale = yarn_attention_scale(factor, scaling.get("mscale"), scaling.get("mscale_all_dim"))
    return inv_freq, float(scale)


class RoPE:
    """cos/sin tables built on the fly from integer positions, in fp32.

    A plain object, not an nn.Module: it holds no parameters or buffers, so `model.to(bfloat16)`, meta-device init
    and FSDP never touch it, and the frequencies stay fp32 (bf16 angles are off by whole radians at long context).
    One instance is shared by all layers; inv_freq is cached per device.
    """

    def __init__(self, head_dim, theta, scaling=None):
        self.head_dim, self.theta = head_dim, theta
        self.set_scaling(scaling)

    def set_scaling(self, scaling):
        """Switch the interpolation (every layer sees it: they share this object)."""
        self.scaling, self.kind = scaling, rope_type(scaling)
        self._cache = {}  # device -> (inv_freq, attention_scale)

    def frequencies(self, positions):
        if self.kind == "dynamic":  # depends on the longest position in the batch; no host sync
            return rope_frequencies(self.head_dim, self.theta, self.scaling, seq_len=positions.max() + 1)
        if positions.device not in self._cache:
            inv_freq, scale = rope_frequencies(self.head_dim, self.theta, self.scaling)
            self._cache[positions.device] = inv_freq.to(positions.device), scale
        return self._cache[positions.device]

    def __call__(self, positions):
        """positions (B, T) integer -> cos, sin (B, T, head_dim) fp32, already multiplied by attention_scale."""
        inv_freq, scale = self.frequencies(positions)
        angles = positions[..., None].float() * inv_freq.to(positions.device)  # (B, T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): rotate-half layout [f, f]
        return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, hd) by the angles of cos/sin (B, T, hd), in fp32; returns x's dtype."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # the partner of channel j is channel j + hd/2
    return (x * cos + rotated * sin).to(dtype)


OPTIONS = {"yarn": {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "mscale": None,
                    "mscale_all_dim": None},
           "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0}}  # settable in a spec, with their defaults


CHECKPOINT = "checkpoint"  # the spec that keeps a checkpoint's own scaling (evaluate.py, passkey.py)


def scaling_from_spec(spec, original_len, factor=None, checkpoint=None):
    """A rope_scaling dict from a command-line spec KIND[:FACTOR][,KEY=VALUE ...]: "none", "linear:8", "ntk:4",
    "dynamic:8", "yarn:8", "yarn-revised:8", "llama3:8", "yarn:8,beta_fast=4,beta_slow=1" (OPTIONS lists the keys),
    or "checkpoint": the `checkpoint` scaling given. The factor may be left out when `factor` gives it (train.py:
    target / the checkpoint's window). original_len is the window the model was trained on (the base of YaRN's ramp and of
    dynamic/llama3 scaling)."""
    if spec == CHECKPOINT:
        return checkpoint
    head, *options = [part.strip() for part in spec.split(",")]
    kind, _, value = head.partition(":")
    kind = kind.lower()
    if kind in ("none", "default", "original") and not options:
        return None
    variant = None
    if kind == "yarn-revised":
        kind, variant = "yarn", "revised"
    if kind not in ROPE_TYPES or kind == "default":
        raise ValueError(f"unknown rope {spec!r}; use none, linear, ntk, dynamic, yarn, yarn-revised or llama3, "
                         f"with :FACTOR (e.g. linear:8)")
    try:
        factor = float(value) if value else factor
    except ValueError:
        raise ValueError(f"rope {spec!r}: factor {value!r} is not a number") from None
    if factor is None or factor < 1:
        raise ValueError(f"rope {spec!r} needs a factor >= 1 (e.g. {kind}:8)")
    scaling = {"rope_type": kind, "factor": factor}
    if kind in NEEDS_ORIGINAL:
        scaling["original_max_position_embeddings"] = int(original_len)
    if kind == "llama3":
        scaling.update(OPTIONS["llama3"])
    if variant:
        scaling["yarn_variant"] = variant
    for option in options:
        key, _, text = option.partition("=")
        if key not in OPTIONS.get(kind, {}):
            allowed = ", ".join(OPTIONS.get(kind, {})) or "none"
            raise ValueError(f"rope {spec!r}: {kind} takes no option {key!r} (options: {allowed})")
        try:
            scaling[key] = float(text)
        except ValueError:
            raise ValueError(f"rope {spec!r}: {key}={text!r} is not a number") from None
    return scaling


# ----------------------------------------------------------------------------------------------------------------
# describing a scaling: its canonical form, the windows it is built on and supports, its command-line spec

def normalize_rope_scaling(scaling, max_position_embeddings):
    """One spelling for a rope_scaling dict: "rope_type" key, original length filled in where the type needs it;
    None for plain RoPE (None, {} or type "default")."""
    kind = rope_type(scaling)
    if kind == "default":
        return None
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    out["rope_type"] = kind
    if kind in NEEDS_ORIGINAL:
        # transformers' convention: the original window defaults to the config's max_position_embeddings
        out.setdefault("original_max_position_embeddings", max_position_embeddings)
    if "factor" not in out:
        raise ValueError(f"rope_scaling of type {kind!r} needs a 'factor'")
    return out


def original_window(scaling, max_position_embeddings):
    """The context the base model was pretrained on.

    rope_scaling's original_max_position_embeddings when present; else, for a scaled checkpoint (linear, ntk),
    max_position_embeddings / factor, Hugging Face's convention for linear PI checkpoints (LongChat,
    LLaMA-2-7B-32K: max_position_embeddings is the extended window); else (no scaling) max_position_embeddings.
    """
    if scaling and scaling.get("original_max_position_embeddings"):
        return int(scaling["original_max_position_embeddings"])
    if scaling and scaling.get("factor"):
        return max(1, round(max_position_embeddings / float(scaling["factor"])))
    return max_position_embeddings


def supported_window(scaling, original):
    """The longest context a rotary scaling is meant for: original * factor (the original window without one)."""
    return original if not scaling else int(original * float(scaling["factor"]))


def describe_rope(scaling):
    """'none', 'linear:8', 'yarn:16,beta_fast=4' ...: a rope_scaling dict as a command-line spec (scaling_from_spec's
    input), options listed where they differ from their defaults."""
    if not scaling:
        return "none"
    options = "".join(f",{k}={float(scaling[k]):g}" for k, default in OPTIONS.get(rope_type(scaling), {}).items()
                      if scaling.get(k) is not None and scaling[k] != default)
    return f"{rope_name(scaling)}:{float(scaling['factor']):g}{options}"


def rope_name(scaling):
    """The type of a rope_scaling dict as a spec names it ('none', 'linear', 'yarn-revised' ...): describe_rope's
    spec without its factor and options, what --rope takes to continue with the same interpolation."""
    if not scaling:
        return "none"
    kind = rope_type(scaling)
    return "yarn-revised" if kind == "yarn" and scaling.get("yarn_variant") == "revised" else kind


def rope_kind(spec):
    """The type part of a command-line spec: 'yarn' for 'yarn:8,beta_fast=4' (rope_name gives it for a dict)."""
    return spec.split(",")[0].partition(":")[0].strip().lower()
