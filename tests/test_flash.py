"""Our flash-attn path on the CPU, through a stand-in `flash_attn` module that enforces the library's rules and
computes with an explicit mask; the broken-install fallback, the dtype check and the backend log."""
import importlib.machinery
import sys
import types

import pytest
import torch

import model
from model import KVCache, LLaMA, ModelConfig
from helpers import rel_err

# bf16 keeps 8 significant bits: the bf16 logits of these models are 0.5 % from their fp32 logits, through SDPA and
# through the stand-in alike (measured: 0.50 % and 0.49 %). A wrong mask, layout or window moves them by over 25 %.
BF16_TOL = 2e-2


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's flash_attn_func (flash_attn_interface.py and its CUDA API's checks), in fp32 with an explicit
    mask:
    - q (B, Tq, Hq, D), k and v (B, Tk, Hk, D), fp16 or bf16 alike, each with stride(-1) == 1 (the kernel's
      requirement; the library's Python wrapper would copy such a tensor instead);
    - GQA by fewer k/v heads: Hq divisible by Hk, query head h reads k/v head h // (Hq / Hk);
    - window_size = (left, right), -1 for unbounded: query i reads keys i + Tk - Tq - left .. i + Tk - Tq + right;
    - causal: keys up to i + Tk - Tq, the mask aligned to the bottom right (flash-attn >= 2.1) when Tq < Tk;
    - a query with no key left gives zeros."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"FlashAttention only supports fp16 and bf16 data type ({name} is {t.dtype})")
        if t.dim() != 4 or t.stride(-1) != 1:
            raise RuntimeError(f"{name} must be (batch, seqlen, heads, head_dim) with a contiguous last dimension")
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError("query, key and value must have the same dtype")
    if k.shape != (B, Tk, Hk, D) or v.shape != k.shape:
        raise RuntimeError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if Hq % Hk:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2 and
            all(isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size must be (left, right), not {window_size!r}")
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not return_attn_probs
    left, right = window_size
    i = torch.arange(Tq)[:, None] + Tk - Tq  # query i's own place among the keys: bottom-right alignment
    j = torch.arange(Tk)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool)  # (Tq, Tk): True where query i reads key j
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    kf, vf = (t.float().repeat_interleave(Hq // Hk, dim=2) for t in (k, v))  # (B, Tk, Hq, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * (softmax_scale or D ** -0.5)  # (B, Hq, Tq, Tk)
    p = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype)  # (B, Tq, Hq, D)


@pytest.fixture
def flash(monkeypatch):
    """The stand-in installed as the package `flash_attn` and imported by model.py's own loader; returns the list of
    its calls (q, k shapes, causal, window_size)."""
    calls = []

    def recording(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw.get("causal", False), kw.get("window_size", (-1, -1))))
        return flash_attn_func(q, k, v, **kw)

    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # what importlib.util.find_spec reads
    package.flash_attn_func = recording
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setattr(model, "flash_attn_func", model.load_flash_attn())
    monkeypatch.setattr(model, "backends_used", set())
    return calls


def tiny(sliding_window=None):
    """A random GQA model (4 query heads, 2 key-value heads) in fp32 and a bf16 copy of it using flash-attn."""
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=112,
                      max_position_embeddings=32, sliding_window=sliding_window)
    fp32 = LLaMA(cfg).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fp32.init_weights()
    bf16 = LLaMA(cfg).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16).set_attn_impl("flash")
    return fp32, bf16


def decode(m, tokens, prompt_len):
    """Logits (B, T, vocab) of tokens read with a KV cache: the first prompt_len at once, then one at a time."""
    cache = KVCache.for_model(m, tokens.shape[1], batch=tokens.shape[0])
    out = [m.lm_head(m.hidden_states(tokens[:, :prompt_len], cache=cache))]
    out += [m.lm_head(m.hidden_states(tokens[:, t:t + 1], cache=cache)) for t in range(prompt_len, tokens.shape[1])]
    return torch.cat(out, dim=1)


def test_bf16_prefill_with_pose_positions(flash):
    fp32, bf16 = tiny()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 24), generator=g)
    positions = torch.cat([torch.arange(0, 10), torch.arange(90, 104)]).expand(2, 24).clone()  # PoSE: a skip
    positions[1, 10:] += 7  # another skip in the second row
    with torch.no_grad():
        want = fp32(tokens, positions)
        got = bf16(tokens, positions)
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), want) < BF16_TOL
    # one call per layer, GQA by the 2 key-value heads themselves (not repeated to 4), causal over the 24 tokens
    assert flash == [((2, 24, 4, 16), (2, 24, 2, 16), True, (-1, -1))] * 2


def test_kv_cache_decoding(flash):
    """A prompt of 12 tokens, then 8 queries of one token against the cached keys (q shorter than k)."""
    fp32, bf16 = tiny()
    tokens = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = fp32(tokens)
        got = decode(bf16, tokens, 12)
    assert rel_err(got.float(), want) < BF16_TOL
    assert [(q, k) for q, k, _, _ in flash[::2]] == [((1, 12, 4, 16), (1, 12, 2, 16))] + \
        [((1, 1, 4, 16), (1, t, 2, 16)) for t in range(13, 21)]


def test_sliding_window(flash):
    """Mistral's window of 6 tokens: a prefill of 20 tokens (a band of keys per query), then decoding past it."""
    fp32, bf16 = tiny(sliding_window=6)
    tokens = torch.randint(0, 96, (1, 28), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fp32(tokens)
        got = decode(bf16, tokens, 20)
        assert rel_err(got.float(), want) < BF16_TOL
        fp32.layers[0].self_attn.window = None  # and the window changes the logits far beyond the tolerance
        assert rel_err(fp32(tokens), want) > 10 * BF16_TOL
    assert flash[0] == ((1, 20, 4, 16), (1, 20, 2, 16), True, (5, 0))  # query i reads keys i - 5 .. i
    assert all(k == (1, 6, 2, 16) for _, k, _, _ in flash[2:])  # a new token reads the last 6 cached keys


def test_flash_needs_fp16_or_bf16(flash):
    fp32, _ = tiny()
    fp32.set_attn_impl("flash")
    with pytest.raises(ValueError, match="^attn_impl='flash' needs fp16 or bf16, not float32$"):
        fp32(torch.zeros(1, 4, dtype=torch.long))
    assert not flash


def test_flash_not_installed(monkeypatch):
    monkeypatch.setattr(model, "flash_attn_func", None)
    m = tiny()[1]
    with pytest.raises(ValueError, match="flash-attn is not installed"):
        m(torch.zeros(1, 4, dtype=torch.long))


class BrokenModule(types.ModuleType):
    """An installed flash_attn whose import of flash_attn_func raises `error` (a broken CUDA extension, say)."""

    def __init__(self, error):
        super().__init__("flash_attn")
        self.error = error

    def __getattr__(self, name):
        raise self.error


@pytest.mark.parametrize("module,warning", [
    (None, None),  # not installed: `import flash_attn` finds nothing
    (types.SimpleNamespace(), "ImportError: cannot import name 'flash_attn_func'"),  # an old flash-attn 1.x
    (BrokenModule(ImportError("libcudart.so.12: cannot open shared object file")), "ImportError: libcudart.so.12"),
    (BrokenModule(ModuleNotFoundError("No module named 'flash_attn_2_cuda'", name="flash_attn_2_cuda")),
     "ModuleNotFoundError: No module named 'flash_attn_2_cuda'"),
    (BrokenModule(OSError("undefined symbol: _ZN3c104cuda9SetDevice\nmore")), "OSError: undefined symbol"),
    (BrokenModule(RuntimeError("CUDA driver version is insufficient")), "RuntimeError: CUDA driver version"),
], ids=["not-installed", "no-function", "import-error", "missing-extension", "os-error", "runtime-error"])
def test_broken_install_falls_back_with_one_warning(monkeypatch, capsys, module, warning):
    monkeypatch.setitem(sys.modules, "flash_attn", module)  # None in sys.modules: the import fails as not found
    assert model.load_flash_attn() is None
    err = capsys.readouterr().err
    if warning is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("warning: flash-attn is installed but does not import (")
        assert warning in err and err.endswith("; attention uses SDPA\n")


def test_backend_chosen_and_logged_once(flash, capsys):
    _, bf16 = tiny()
    with torch.no_grad():
        for _ in range(2):
            bf16(torch.zeros(1, 4, dtype=torch.long))
        assert capsys.readouterr().err == "attention: flash-attn (attn_impl='flash')\n"
        bf16.set_attn_impl("auto")  # on the CPU: SDPA, recorded but not named (the CPU has no other backend)
        bf16(torch.zeros(1, 4, dtype=torch.long))
    assert capsys.readouterr().err == "" and model.backends_used == {"flash", "sdpa"}
    cuda, cpu, bf, fp = torch.device("cuda", 0), torch.device("cpu"), torch.bfloat16, torch.float32
    assert model.attention_backend("auto", bf, cuda) == ("flash", "installed, CUDA, fp16/bf16")
    assert model.attention_backend("auto", fp, cuda)[0] == model.attention_backend("auto", bf, cpu)[0] == "sdpa"
    assert model.attention_backend("sdpa", bf, cuda)[0] == "sdpa"
    model.note_backend("sdpa", "why", cuda)  # already run in this process: not named again
    assert capsys.readouterr().err == ""
    model.backends_used.clear()
    model.note_backend("sdpa", "flash-attn is not installed", cuda)  # a CUDA process names SDPA too
    assert capsys.readouterr().err == "attention: SDPA (flash-attn is not installed)\n"


def test_bench_labels_our_attention_by_its_backend(flash, monkeypatch):
    """bench.py's ours-vs-transformers timing names the backend our model ran: flash-attn where "auto" takes it (a
    CUDA device, faked here for the choice, with the stand-in installed), else SDPA."""
    pytest.importorskip("transformers")
    import bench

    choose = model.attention_backend
    as_if_cuda = lambda impl, dtype, device: choose(impl, dtype, torch.device("cuda"))  # noqa: E731
    monkeypatch.setattr(model, "attention_backend", as_if_cuda)
    monkeypatch.setattr(bench, "attention_backend", as_if_cuda)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=112)
    cpu = torch.device("cpu")
    assert bench.ours_vs_transformers(cfg, cpu, 16, 1, 0, torch.bfloat16)["attention"] == "flash-attn" and flash
    flash.clear()
    assert bench.ours_vs_transformers(cfg, cpu, 16, 1, 0, torch.float32)["attention"] == "SDPA" and not flash
