"""Sections 1 and 5 of scripts/gpu_check.py: our model on the device against a reference, in this process.

Section 1 compares bf16 logits on the device with fp32 logits on the CPU, for every rope type.
Section 5 compares passkey decoding with the KV cache against re-reading the whole sequence.
"""
import importlib
import os

import numpy as np
import torch

# gpu_check_common puts the repository root on sys.path: it comes before lib and the top level
from gpu_check_common import FP32_TOL, INIT_STD, LOGITS_TOL, log, rel_error, row, rule_backend
from lib import cli
import passkey
from data import Tokenizer
from model import BACKENDS, LLaMA, ModelConfig
from pose import skip_positions


# ----------------------------------------------------------------------------------------------------------------------
# 1. logits: bf16 on the device against fp32 on the CPU

ROPE_CASES = {  # the rope types transformers knows, each at factor 8 over a 1024-token original window
    "none": None,
    "linear": {"rope_type": "linear", "factor": 8.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024},
    "dynamic": {"rope_type": "dynamic", "factor": 8.0, "original_max_position_embeddings": 1024},
}


def logits_config(scaling, vocab=4096, dim=512, n_layers=4, n_heads=4, n_kv_heads=2, window=1024):
    """A LLaMA-shaped model: GQA (2 query heads per key/value head), head_dim 128 as LLaMA's, SwiGLU 8/3 x dim."""
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       intermediate_size=dim * 8 // 3 // 64 * 64 + 64, max_position_embeddings=window,
                       rope_scaling=scaling)


def random_model(cfg, std=INIT_STD, seed=0):
    """Fresh fp32 weights on the CPU, rounded to bf16-representable values: the bf16 copy then holds exactly the same
    weights, and a comparison measures arithmetic, not the rounding of the weights."""
    torch.manual_seed(seed)
    model = LLaMA(cfg)
    model.init_weights(std)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model.eval()


def logits_inputs(cfg, seq_len, target, seed=0):
    """Random tokens at PoSE positions: two chunks with a random skip, positions up to `target` (beyond the window)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen)
    positions = torch.from_numpy(skip_positions(seq_len, target, chunks=2, rng=np.random.default_rng(seed)))[None]
    return tokens, positions


@torch.no_grad()
def logits_check(device, dtype=torch.bfloat16, scaling=None, attn_impl="sdpa", cfg=None, seq_len=1024, target=8192,
                 reference=None, seed=0):
    """Our logits on `device` in `dtype` against fp32 CPU logits of the same weights.

    Returns {"rel_err", "max_err" (max |diff| / max |ref|), "argmax" (fraction of positions whose top token agrees)}.
    `reference` (cfg -> fp32 CPU model) lets a test compare against a different model on purpose."""
    cfg = cfg or logits_config(scaling)
    tokens, positions = logits_inputs(cfg, seq_len, target, seed)
    ref_model = (reference or random_model)(cfg)
    ref = ref_model(tokens, positions)
    model = random_model(cfg).to(device=device, dtype=dtype)
    model.set_attn_impl(attn_impl)
    got = model(tokens.to(device), positions.to(device)).float().cpu()
    diff = (got - ref).abs()
    return dict(rel_err=rel_error(got, ref), max_err=(diff.max() / ref.abs().max()).item(),
                argmax=(got.argmax(-1) == ref.argmax(-1)).float().mean().item())


def fused_attention_check(device, dtype, backends=None, seq_len=1024, n_heads=4, n_kv_heads=2, head_dim=128):
    """Whether causal GQA attention (model.py's SDPA call) runs on a fused kernel (flash, memory-efficient or cuDNN)
    on `device` in `dtype`, i.e. without falling back to the math kernel, whose T x T scores make long contexts run
    out of memory. Returns {"ok", "error"}."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = backends or [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    q = torch.randn(1, n_heads, seq_len, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, n_kv_heads, seq_len, head_dim, device=device, dtype=dtype) for _ in range(2))
    try:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_heads != n_heads)
    except RuntimeError as e:
        return dict(ok=False, error=" ".join(str(e).split())[:300])
    return dict(ok=True, error="")


def flash_attn_available():
    try:
        importlib.import_module("flash_attn")
    except ImportError:
        return False
    return True


def section_logits(device, config=logits_config, seq_len=1024, target=8192):
    """Rows of section 1; config(scaling) -> ModelConfig and the sizes are for tests (tiny, on the CPU)."""
    sizes = dict(seq_len=seq_len, target=target)
    rows = []
    impls = ["sdpa"] + (["flash"] if flash_attn_available() else [])
    if "flash" not in impls:
        rows.append(row("1 logits", "flash-attn", "not installed", status="skip"))
    # fp32 on the GPU: the same arithmetic as the CPU up to summation order (TF32, if something enabled it, fails)
    r = logits_check(device, torch.float32, cfg=config(ROPE_CASES["yarn"]), **sizes)
    rows.append(row("1 logits", "fp32 sdpa, rope yarn, GQA 4q/2kv", f"rel err {r['rel_err']:.2e}", f"<= {FP32_TOL:g}",
                    "pass" if r["rel_err"] <= FP32_TOL else "FAIL", **r, attention=BACKENDS["sdpa"]))
    # without a fused kernel, SDPA computes T x T scores: training and evaluation at long context run out of memory
    for dtype, needed in ((torch.bfloat16, True), (torch.float32, False)):
        f = fused_attention_check(device, dtype)
        name = str(dtype).removeprefix("torch.")
        rows.append(row("1 logits", f"fused SDPA kernel for causal GQA in {name} (no T x T math fallback)",
                        "yes" if f["ok"] else f"no: {f['error']}",
                        "needed: training and evaluation run in bf16" if needed else
                        "fp32 long-context evaluation of GQA models needs it",
                        ("pass" if f["ok"] else "FAIL") if needed else "info", **f))
    for name, scaling in ROPE_CASES.items():
        # the same model in bf16 on the CPU: the size of a bf16 error on this model, for context
        cpu_bf16 = logits_check("cpu", torch.bfloat16, cfg=config(scaling), **sizes)
        for impl in impls:
            r = logits_check(device, torch.bfloat16, cfg=config(scaling), attn_impl=impl, **sizes)
            ok = r["rel_err"] <= LOGITS_TOL
            log(f"logits rope={name} attn={impl}: rel err {r['rel_err']:.2e} (CPU bf16 {cpu_bf16['rel_err']:.2e})")
            rows.append(row("1 logits", f"bf16 {impl}, rope {name}, GQA 4q/2kv, positions to 8x window",
                            f"rel err {r['rel_err']:.2e} (max {r['max_err']:.1e}, argmax {r['argmax']:.3f})",
                            f"<= {LOGITS_TOL:g} (CPU bf16: {cpu_bf16['rel_err']:.2e})",
                            "pass" if ok else "FAIL", **r, cpu_bf16=cpu_bf16, attention=BACKENDS[impl]))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 5. passkey: KV cache against re-reading the sequence

def passkey_config(vocab=4096, window=2048, factor=16.0, dim=256):
    """A small random GQA model whose YaRN scaling covers 32k tokens."""
    return logits_config({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": window},
                         vocab=vocab, dim=dim, n_layers=4, n_heads=4, n_kv_heads=2, window=window)


class RecordingDecoder:
    """A passkey.Decoder that records the (ids read so far, next-token logits) of every step."""

    def __init__(self, decoder):
        self.decoder, self.ids, self.steps = decoder, [], []

    def start(self, ids):
        self.ids = list(ids)
        return self._record(self.decoder.start(ids))

    def step(self, token):
        self.ids.append(int(token))
        return self._record(self.decoder.step(token))

    def _record(self, logits):
        self.steps.append((list(self.ids), logits.float().cpu()))
        return logits


def decode_recorded(model, prompt_ids, tokenizer, use_cache, max_new_tokens=8):
    """passkey.greedy_answer through passkey.Decoder, with or without the KV cache; returns (answer, steps)."""
    decoder = RecordingDecoder(passkey.Decoder(model, use_cache=use_cache, max_new_tokens=max_new_tokens))
    answer = passkey.greedy_answer(decoder, prompt_ids, tokenizer, max_new_tokens)
    return answer, decoder.steps


def compare_decodes(cached, full, tol=LOGITS_TOL):
    """Two greedy decodes of one prompt, each a list of (ids, logits) steps. Returns (same answer, near tie, max rel
    logits error). They read the same ids until their first different choice. A different choice is a near tie when
    the re-read's logits of the two tokens are closer than the tolerated error of a typical logit (tol x their rms):
    then rounding, not a cache mistake, decided it; a broken cache shows as a logits error above tol anyway."""
    errors, near_tie = [], False
    for (ids_c, lc), (ids_f, lf) in zip(cached, full):
        if ids_c != ids_f:
            break
        errors.append(rel_error(lc, lf))
        a_c, a_f = int(lc.argmax()), int(lf.argmax())
        if a_c != a_f:
            near_tie = bool(lf[a_f] - lf[a_c] <= tol * lf.double().pow(2).mean().sqrt())
            break
    same = [ids for ids, _ in cached] == [ids for ids, _ in full]
    return same, near_tie, max(errors, default=0.0)


def passkey_check(device, model, tokenizer, lengths, trials=3, seed=0, tol=LOGITS_TOL, max_new_tokens=8):
    """Passkey decoding with the KV cache vs without, per length. Prompts as passkey.run_passkey draws them."""
    model = model.to(device)
    model_calls = []
    hidden_states = model.hidden_states

    def counting(tokens, positions=None, cache=None):  # records how many tokens each forward pass reads
        model_calls.append((tokens.shape[1], cache is not None))
        return hidden_states(tokens, positions, cache)

    model.hidden_states = counting
    rng = np.random.default_rng(seed)
    results = []
    try:
        for length in lengths:
            r = dict(length=length, trials=trials, same=0, near_ties=0, max_rel_err=0.0, cache_steps=0,
                     answers=[])
            for _ in range(trials):
                key = int(rng.integers(10000, 100000))
                prompt = passkey.make_prompt(tokenizer, length, key, depth=rng.random())
                model_calls.clear()
                answer_c, cached = decode_recorded(model, prompt.ids, tokenizer, True, max_new_tokens)
                # with the cache, the prompt is read once and every later step reads one token
                r["cache_steps"] += sum(1 for n, c in model_calls[1:] if n == 1 and c)
                cache_ok = len(model_calls) == len(cached) and all(n == 1 and c for n, c in model_calls[1:])
                answer_f, full = decode_recorded(model, prompt.ids, tokenizer, False, max_new_tokens)
                same, near_tie, err = compare_decodes(cached, full, tol)
                r["same"] += int(same and answer_c == answer_f)
                r["near_ties"] += int(not same and near_tie)
                r["max_rel_err"] = max(r["max_rel_err"], err)
                r["cache_used"] = r.get("cache_used", True) and cache_ok
                r["answers"].append(dict(key=key, prompt_tokens=len(prompt.ids), cached=answer_c, full=answer_f))
            r["ok"] = (r["same"] + r["near_ties"] == trials and r["max_rel_err"] <= tol and r["cache_used"])
            results.append(r)
    finally:
        del model.hidden_states  # the class's method again
    return results


def section_passkey(device, lengths=(16384, 32768), trials=3):
    tokenizer = Tokenizer(os.path.join(cli.BUNDLED_MODEL, "tokenizer.model"))
    model = random_model(passkey_config(vocab=tokenizer.vocab_size)).to(device=device, dtype=torch.bfloat16)
    attention = rule_backend(device, torch.bfloat16)
    rows = [row("5 passkey", "attention backend", attention, attention=attention)]
    for r in passkey_check(device, model, tokenizer, lengths, trials):
        log(f"passkey {r['length']}: {r['same']}/{r['trials']} same answers, {r['near_ties']} near ties, "
            f"logits rel err {r['max_rel_err']:.1e}")
        rows.append(row("5 passkey", f"{r['length']} tokens, bf16, GQA: KV cache vs re-reading, {r['trials']} trials",
                        f"{r['same']}/{r['trials']} same answers ({r['near_ties']} near ties), logits rel err "
                        f"{r['max_rel_err']:.1e}", f"all same or near ties; <= {LOGITS_TOL:g}",
                        "pass" if r["ok"] else "FAIL", **r))
    return rows
