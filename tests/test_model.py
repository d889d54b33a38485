"""Our LLaMA against transformers' LlamaForCausalLM, checkpoint I/O, the chunked loss and the attention paths."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from lib.hf import CheckpointError
from model import LLaMA
from rope import RoPE
from helpers import rel_err

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32)
ROPES = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16,
                    "mscale": 0.9, "mscale_all_dim": 0.7},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


def hf_checkpoint(path, rope=None, theta=10000.0, dtype=torch.float32, seed=0, legacy=False, save_kw=None, **kw):
    """A random transformers LlamaForCausalLM written by its own save_pretrained; returns (dir, fp32 HF model)."""
    cfg = dict(SMALL, **kw)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(rope or {})}
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # make the norms non-trivial so that a missed weight shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.to(dtype).save_pretrained(path, **(save_kw or {}))
    if legacy:  # rewrite config.json the way transformers 4 wrote it: rope_theta + rope_scaling with "type"
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        params = c.pop("rope_parameters")
        c["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        c["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def hf_logits(hf, tokens, positions):
    with torch.no_grad():
        return hf(tokens, position_ids=positions).logits


def sample_inputs():
    """Contiguous positions past the original window, and PoSE-style skipped ones (two chunks, a jump between)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=g)
    contiguous = torch.arange(40, 64).expand(2, 24)
    skipped = torch.cat([torch.arange(0, 10), torch.arange(90, 104)]).expand(2, 24).clone()
    skipped[1, 10:] += 7  # a different skip for each row
    return tokens, {"contiguous": contiguous, "skipped": skipped}


@pytest.mark.parametrize("legacy", [False, True], ids=["v5-config", "legacy-config"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_logits_match_transformers(tmp_path, rope, legacy):
    path, hf = hf_checkpoint(tmp_path, ROPES[rope], legacy=legacy, num_key_value_heads=2)  # GQA: 4 q / 2 kv heads
    ours = LLaMA.from_pretrained(path)
    tokens, positions = sample_inputs()
    for name, pos in positions.items():
        with torch.no_grad():
            err = rel_err(ours(tokens, pos), hf_logits(hf, tokens, pos))
        assert err < 1e-5, (rope, name, err)


@pytest.mark.parametrize("variant", ["tied", "sharded", "bf16", "theta"])
def test_checkpoint_variants_match_transformers(tmp_path, variant):
    kw = {"tied": dict(tie_word_embeddings=True), "sharded": dict(save_kw={"max_shard_size": "40KB"}),
          "bf16": dict(dtype=torch.bfloat16), "theta": dict(theta=500000.0, rope=ROPES["linear"])}[variant]
    path, hf = hf_checkpoint(tmp_path, **kw)
    if variant == "sharded":
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ours = LLaMA.from_pretrained(path)
    if variant == "tied":
        assert ours.lm_head.weight is ours.embed_tokens.weight
    tokens, positions = sample_inputs()
    for pos in positions.values():
        with torch.no_grad():
            assert rel_err(ours(tokens, pos), hf_logits(hf, tokens, pos)) < 1e-5


def test_default_positions_are_arange(tmp_path):
    path, _ = hf_checkpoint(tmp_path)
    ours = LLaMA.from_pretrained(path)
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours(tokens), ours(tokens, torch.arange(16).expand(2, 16)))


def test_relative_positions_only(tmp_path):
    """RoPE depends on position differences only: shifting all positions leaves logits (almost) unchanged."""
    path, _ = hf_checkpoint(tmp_path)
    ours = LLaMA.from_pretrained(path)
    tokens, positions = sample_inputs()
    pos = positions["skipped"]
    with torch.no_grad():
        assert rel_err(ours(tokens, pos + 1000), ours(tokens, pos)) < 1e-4
        assert rel_err(ours(tokens, pos * 2), ours(tokens, pos)) > 1e-3  # but not their scale


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 8.0},
                                  {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}])
def test_save_pretrained_roundtrip(tmp_path, rope):
    path, hf = hf_checkpoint(tmp_path / "src")
    ours = LLaMA.from_pretrained(path, rope_scaling=rope)
    out = tmp_path / "out"
    ours.save_pretrained(out, max_position_embeddings=256)  # what train.py exports: the extended window
    back_hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back = LLaMA.from_pretrained(out)
    assert back_hf.config.max_position_embeddings == 256
    if rope:
        assert back_hf.config.rope_parameters["rope_type"] == rope["rope_type"]
        assert back_hf.config.rope_parameters["factor"] == rope["factor"]
    tokens, positions = sample_inputs()
    for pos in positions.values():
        with torch.no_grad():
            want = ours(tokens, pos)
            assert rel_err(hf_logits(back_hf, tokens, pos), want) < 1e-5
            assert torch.equal(back(tokens, pos), want)
    if rope and rope["rope_type"] == "linear":
        with torch.no_grad():  # and the scaling really changed the model
            assert rel_err(hf_logits(hf, tokens, positions["skipped"]), want) > 1e-3


def test_save_ntk_as_equivalent_theta(tmp_path):
    """Fixed NTK is plain RoPE with base * s^(d/(d-2)); save writes that so transformers loads it exactly."""
    path, _ = hf_checkpoint(tmp_path / "src")
    ours = LLaMA.from_pretrained(path, rope_scaling={"rope_type": "ntk", "factor": 8.0})
    ours.save_pretrained(tmp_path / "out")
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["rope_scaling"] is None and cfg["rope_theta"] == pytest.approx(10000 * 8 ** (16 / 14))
    back_hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens, positions = sample_inputs()
    with torch.no_grad():
        assert rel_err(hf_logits(back_hf, tokens, positions["skipped"]), ours(tokens, positions["skipped"])) < 1e-5


def test_loss_equals_full_cross_entropy(tmp_path):
    path, _ = hf_checkpoint(tmp_path, tie_word_embeddings=True)
    ours = LLaMA.from_pretrained(path)
    ours.loss_chunk = 7  # several chunks, the last one partial
    tokens, positions = sample_inputs()
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :5] = -100
    pos = positions["skipped"]
    logits = ours(tokens, pos)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    want_grads = torch.autograd.grad(want, list(ours.parameters()))
    got = ours.loss(tokens, targets, pos)
    got_grads = torch.autograd.grad(got, list(ours.parameters()))
    assert torch.allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(ours.loss(tokens, targets, pos), want, rtol=1e-6)


def test_gradient_checkpointing_same_gradients(tmp_path):
    path, _ = hf_checkpoint(tmp_path)
    ours = LLaMA.from_pretrained(path)
    tokens, positions = sample_inputs()
    targets = torch.roll(tokens, -1, dims=1)
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        loss = ours.loss(tokens, targets, positions["skipped"])
        grads.append(torch.autograd.grad(loss, list(ours.parameters())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_bf16_close_to_fp32(tmp_path):
    path, _ = hf_checkpoint(tmp_path)
    fp32 = LLaMA.from_pretrained(path)
    bf16 = LLaMA.from_pretrained(path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    tokens, positions = sample_inputs()
    with torch.no_grad():
        assert rel_err(bf16(tokens, positions["skipped"]).float(), fp32(tokens, positions["skipped"])) < 3e-2


def test_rope_tables_stay_fp32(tmp_path):
    path, _ = hf_checkpoint(tmp_path)
    ours = LLaMA.from_pretrained(path, dtype=torch.bfloat16)
    cos, sin = ours.rope(torch.tensor([[0, 100000]]))
    assert cos.dtype == torch.float32 and isinstance(ours.rope, RoPE)
    with pytest.raises(TypeError):
        ours(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0.0, 1.0]]))


def test_baichuan_w_pack_split(tmp_path):
    """Baichuan's fused W_pack (q; k; v stacked on the output dimension) loads as LLaMA's three projections."""
    from safetensors.torch import load_file, save_file

    path, hf = hf_checkpoint(tmp_path / "llama")
    state = load_file(os.path.join(path, "model.safetensors"))
    for i in range(SMALL["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        state[p + "W_pack.weight"] = torch.cat([state.pop(p + f"{x}_proj.weight") for x in "qkv"])
    out = tmp_path / "baichuan"
    out.mkdir()
    save_file(state, out / "model.safetensors")
    cfg = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    json.dump(dict(cfg, architectures=["BaichuanForCausalLM"], model_type="baichuan", rms_norm_eps=1e-6,
                   hidden_act="silu"), open(out / "config.json", "w"))
    ours = LLaMA.from_pretrained(out)
    tokens, positions = sample_inputs()
    with torch.no_grad():
        assert rel_err(ours(tokens, positions["skipped"]), hf_logits(hf, tokens, positions["skipped"])) < 1e-5


def test_pytorch_bin_checkpoint(tmp_path):
    from safetensors.torch import load_file

    path, hf = hf_checkpoint(tmp_path)
    torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "model.safetensors"))
    ours = LLaMA.from_pretrained(path)
    tokens, positions = sample_inputs()
    with torch.no_grad():
        assert rel_err(ours(tokens, positions["contiguous"]), hf_logits(hf, tokens, positions["contiguous"])) < 1e-5


def _edit_config(path, **changes):
    c = json.load(open(os.path.join(path, "config.json")))
    c.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del c[k]
    json.dump(c, open(os.path.join(path, "config.json"), "w"))


@pytest.mark.parametrize("case,match", [
    ("missing-dir", "model directory not found"),
    ("no-config", "no config.json"),
    ("bad-json", "not valid JSON"),
    ("missing-key", "missing key\\(s\\) hidden_size"),
    ("architecture", "architecture 'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM"),
    ("shape", "has shape .* expected"),
    ("truncated", "cannot read safetensors file \\(truncated: [0-9]+ bytes, while its header says [0-9]+\\)"),
    ("no-weights", "no weights"),
    ("missing-tensor", "missing tensor\\(s\\) layers.2"),
])
def test_bad_checkpoints(tmp_path, case, match):
    path, _ = hf_checkpoint(tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    if case == "missing-dir":
        path = tmp_path / "nowhere"
    elif case == "no-config":
        os.remove(os.path.join(path, "config.json"))
    elif case == "bad-json":
        open(os.path.join(path, "config.json"), "w").write("{")
    elif case == "missing-key":
        _edit_config(path, hidden_size=None)
    elif case == "architecture":
        _edit_config(path, architectures=["GPT2LMHeadModel"])
    elif case == "shape":
        _edit_config(path, intermediate_size=100)
    elif case == "truncated":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    elif case == "no-weights":
        os.remove(weights)
    elif case == "missing-tensor":
        _edit_config(path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=match):
        LLaMA.from_pretrained(path)


class ConcatCache:
    """The KV cache before preallocation: torch.cat of the cached and the new keys and values at every step. The
    preallocated cache must give its logits bit for bit."""

    def __init__(self, n_layers):
        self.keys, self.values, self.length = [None] * n_layers, [None] * n_layers, 0

    def update(self, layer, k, v):
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def greedy(model, prompt, steps, cache):
    """Greedy decoding of `steps` tokens after prompt (1, T); returns the tokens and the logits (steps, vocab) that
    chose them. With a cache the prompt is read once, then one token per step; without (None) every step re-reads
    the whole sequence."""
    ids, logits = prompt, []
    for _ in range(steps):
        fed = ids if cache is None or cache.length == 0 else ids[:, -1:]
        logits.append(model.lm_head(model.hidden_states(fed, cache=cache))[0, -1])
        ids = torch.cat([ids, logits[-1].argmax()[None, None]], dim=1)
    return ids[0, prompt.shape[1]:].tolist(), torch.stack(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_greedy_decoding(tmp_path, dtype):
    """Greedy decoding with the preallocated cache: the tokens of decoding without a cache, the logits of the
    concatenating cache bit for bit, written in place (the buffers never move)."""
    from model import KVCache
    path, _ = hf_checkpoint(tmp_path, num_key_value_heads=2, rope=ROPES["yarn"])
    ours = LLaMA.from_pretrained(path, dtype=dtype)
    prompt = torch.randint(0, 96, (1, 12))
    cache = KVCache.for_model(ours, 12 + 7)  # the prompt and the 7 tokens fed back (the 8th is not)
    buffers = [t.data_ptr() for t in cache.keys + cache.values]
    with torch.no_grad():
        tokens, logits = greedy(ours, prompt, 8, cache)
        want_tokens, want_logits = greedy(ours, prompt, 8, ConcatCache(ours.cfg.n_layers))
        full_tokens, full_logits = greedy(ours, prompt, 8, None)
        assert tokens == want_tokens == full_tokens and len(set(tokens)) > 1
        assert torch.equal(logits, want_logits)
        assert rel_err(logits.float(), full_logits.float()) < (1e-5 if dtype == torch.float32 else 3e-2)
        assert cache.length == 19 and cache.keys[0].dtype == dtype
        assert [t.data_ptr() for t in cache.keys + cache.values] == buffers
        with pytest.raises(ValueError, match="holds 19 tokens, 20 do not fit"):
            ours.hidden_states(prompt[:, :1], cache=cache)
        cache = KVCache.for_model(ours, 4)
        ours.hidden_states(prompt[:, :2], cache=cache)
        with pytest.raises(ValueError, match="one token at a time"):
            ours.hidden_states(prompt[:, 2:4], cache=cache)


def test_loss_under_no_grad_computes_no_gradients(tmp_path, monkeypatch):
    """The chunked loss computes gradients in its forward pass when its inputs require grad; under no_grad (evaluation)
    it must not, or evaluation pays for a vocab x dim gradient it throws away."""
    from model import ChunkedCrossEntropy
    seen = []
    original = ChunkedCrossEntropy.apply
    monkeypatch.setattr(ChunkedCrossEntropy, "apply", lambda h, w, *a: seen.append(
        (h.requires_grad, w.requires_grad)) or original(h, w, *a))
    path, _ = hf_checkpoint(tmp_path)
    ours = LLaMA.from_pretrained(path)
    tokens, _ = sample_inputs()
    with torch.no_grad():
        ours.loss(tokens, tokens)
    ours.loss(tokens, tokens)
    assert seen == [(False, False), (True, True)]
