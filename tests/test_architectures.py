"""Mistral and Qwen2 against transformers' MistralForCausalLM / Qwen2ForCausalLM: logits, sliding window, export."""
import json
import os

import pytest
import torch

from lib.hf import CheckpointError
from model import KVCache, LLaMA
from helpers import rel_err

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
FAMILIES = {"mistral": ("MistralForCausalLM", "MistralConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config")}


def family_checkpoint(path, family, rope=None, **kw):
    """A random transformers model of `family` written by its own save_pretrained; returns (dir, fp32 HF model)."""
    model_cls, config_cls = (getattr(transformers, name) for name in FAMILIES[family])
    cfg = dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}, **kw)
    if family == "mistral":
        cfg.setdefault("sliding_window", None)  # MistralConfig's default is v0.1's 4096
    torch.manual_seed(0)
    hf = model_cls(config_cls(**cfg)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a missed weight shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(path)
    return path, model_cls.from_pretrained(path, dtype=torch.float32).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=g)
    skipped = torch.cat([torch.arange(0, 10), torch.arange(90, 104)]).expand(2, 24)  # PoSE-style positions
    return tokens, {"contiguous": torch.arange(40, 64).expand(2, 24), "skipped": skipped}


@pytest.mark.parametrize("family,kw", [("mistral", {}), ("mistral", {"sliding_window": 8}), ("qwen2", {}),
                                       ("qwen2", {"tie_word_embeddings": True})],
                         ids=["mistral", "mistral-window-8", "qwen2", "qwen2-tied"])
def test_logits_match_transformers(tmp_path, one_thread, family, kw):
    path, hf = family_checkpoint(tmp_path, family, **kw)
    ours = LLaMA.from_pretrained(path)
    assert ours.cfg.qkv_bias == (family == "qwen2") and ours.layers[0].self_attn.o_proj.bias is None
    assert ours.cfg.sliding_window == kw.get("sliding_window")
    tokens, positions = inputs()
    for name, pos in positions.items():
        with torch.no_grad():
            err = rel_err(ours(tokens, pos), hf(tokens, position_ids=pos).logits)
        assert err < 1e-5, (family, name, err)


def test_sliding_window_kv_cache_equals_full_forward(tmp_path, one_thread):
    path, _ = family_checkpoint(tmp_path, "mistral", sliding_window=6)
    ours = LLaMA.from_pretrained(path)
    tokens = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        want = ours(tokens)
        cache = KVCache.for_model(ours, 20)
        got = [ours.lm_head(ours.hidden_states(tokens[:, :9], cache=cache))]
        got += [ours.lm_head(ours.hidden_states(tokens[:, t:t + 1], cache=cache)) for t in range(9, 20)]
        assert rel_err(torch.cat(got, dim=1), want) < 1e-5
        ours.layers[0].self_attn.window = None  # and the window really changed the model
        assert rel_err(ours(tokens), want) > 1e-3


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_export_keeps_the_architecture(tmp_path, one_thread, family):
    """save_pretrained with a rope scaling and an extended window -> transformers' class of the same family (with
    Qwen2's biases, Mistral's window) and our logits past the original window."""
    kw = {"sliding_window": 16} if family == "mistral" else {}
    path, _ = family_checkpoint(tmp_path / "src", family, **kw)
    ours = LLaMA.from_pretrained(path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    ours.save_pretrained(tmp_path / "out", max_position_embeddings=128)  # the extended window, as train.py exports
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["architectures"] == [FAMILIES[family][0]] and cfg["model_type"] == family
    assert "attention_bias" not in cfg and cfg.get("sliding_window") == kw.get("sliding_window")
    back = getattr(transformers, FAMILIES[family][0]).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    if family == "qwen2":
        assert back.model.layers[0].self_attn.q_proj.bias is not None
    tokens = torch.randint(0, 96, (1, 100))
    with torch.no_grad():
        assert rel_err(ours(tokens), back(tokens).logits) < 1e-5


def test_qwen2_sliding_window_refused(tmp_path):
    path, _ = family_checkpoint(tmp_path, "qwen2")
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump(dict(cfg, use_sliding_window=True, sliding_window=8), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="Qwen2 sliding-window attention .* not supported"):
        LLaMA.from_pretrained(path)
