"""What an export is to other tools: every rope scaling read by transformers to our logits, the base checkpoint's dtype,
checkpoints removed on request, a Qwen2 trained by train.py, and a tokenizer.json-only checkpoint through every
script."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import data
import evaluate
import passkey
from model import LLaMA, ModelConfig
from rope import scaling_from_spec
from helpers import rel_err, run_train

transformers = pytest.importorskip("transformers")



def random_model(path, vocab_size=96, dtype=torch.float32, **kw):
    """A random tiny LLaMA (window 32) saved by our save_pretrained, with weights large enough for RoPE to matter."""
    cfg = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=112,
               max_position_embeddings=32, **kw)
    model = LLaMA(ModelConfig(**cfg))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.init_weights(std=0.1)
    model.to(dtype).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("spec", ["linear", "dynamic", "yarn", "llama3", "ntk", "yarn-revised"])
def test_every_rope_scaling_reads_in_transformers_to_our_logits(base, tmp_path, one_thread, spec):
    """The export of a model extended 4x (window 32 -> 128), read by transformers, gives our logits at 100 tokens, past
    the original window. ntk is written as the plain RoPE it equals; dynamic over max_position_embeddings = the original
    window, which transformers scales from; revised YaRN, which transformers lacks, says so in config.json."""
    ours = LLaMA.from_pretrained(base, rope_scaling=scaling_from_spec(spec, 32, factor=4.0))
    ours.save_pretrained(tmp_path, max_position_embeddings=128)  # what train.py exports: the extended window
    config = json.load(open(tmp_path / "config.json"))
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    back = LLaMA.from_pretrained(tmp_path)
    tokens = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, plain = ours(tokens), LLaMA.from_pretrained(base)(tokens)
        assert torch.equal(back(tokens), want) and back.cfg.rope_scaling == ours.cfg.rope_scaling
        assert rel_err(want, plain) > 1e-3  # the scaling matters at this length
        err = rel_err(theirs(tokens).logits, want)
    assert config["max_position_embeddings"] == (32 if spec == "dynamic" else 128)
    if spec == "yarn-revised":
        assert "read by this project only" in config["pose_note"] and err > 1e-4  # transformers: standard YaRN
    else:
        assert "pose_note" not in config and err < 1e-5, err


def stored_dtypes(path):
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def short_run(model, corpus, out, *extra):
    return ["--model", model, "--data", corpus, "--out", out, "--target", 128, "--steps", 2, "--batch-size", 2,
            "--lr", 1e-3, "--warmup", 1, *extra]


def test_export_dtype_and_checkpoints(spm_tokenizer, text_corpus, tmp_path):
    """A bf16 base exports bf16 by default, --delete-checkpoints removes the checkpoints after the export, and revised
    YaRN, which only this project reads, is noted in the summary and in config.json."""
    import shutil
    model = random_model(tmp_path / "bf16", vocab_size=320, dtype=torch.bfloat16)
    shutil.copy(spm_tokenizer, os.path.join(model, "tokenizer.model"))
    out = tmp_path / "out"
    proc = run_train(short_run(model, text_corpus, out, "--save-every", 1, "--delete-checkpoints",
                               "--rope", "yarn-revised"))
    assert stored_dtypes(out) == {"BF16"} and json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
    assert not os.path.exists(out / "checkpoints")
    lines = proc.stdout.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("removed")):]  # the summary
    assert lines[0] == f"removed {out / 'checkpoints'} (--delete-checkpoints)"
    assert lines[1].startswith(f"saved the extended model to {out} (") and "checkpoints/" not in lines[1]
    assert lines[-1].startswith("note: revised YaRN") and "this project only" in lines[-1]
    assert "read by this project only" in json.load(open(out / "config.json"))["pose_note"]
    assert "tokenizer.json" in os.listdir(out)  # converted from the base's tokenizer.model


def test_train_qwen2_with_tokenizer_json_only(hf_tokenizer_dirs, text_corpus, tmp_path):
    """train.py on a random Qwen2 made by transformers whose only tokenizer is a tokenizer.json without BOS: it trains,
    keeps the checkpoints (the summary says how large), exports the dtype asked for, and the export loads as
    Qwen2ForCausalLM (with its q/k/v biases) to our logits, its tokenizer in AutoTokenizer."""
    import shutil
    cfg = transformers.Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_tokenizer_dirs["qwen2"], name), tmp_path / "qwen2" / name)
    out = tmp_path / "out"
    proc = run_train(short_run(tmp_path / "qwen2", text_corpus, out, "--save-every", 1, "--export-dtype", "bf16",
                               "--rope", "yarn"))
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("saved the extended model"))
    assert "of which checkpoints/" in summary and "MB: --resume continues from them" in summary
    assert stored_dtypes(out) == {"BF16"}
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert theirs.model.layers[0].self_attn.k_proj.bias is not None
    ours = LLaMA.from_pretrained(out)
    assert ours.cfg.qkv_bias and ours.cfg.rope_scaling["rope_type"] == "yarn"
    tokens = torch.randint(0, 400, (1, 100))
    with torch.no_grad():
        assert rel_err(ours(tokens), theirs(tokens).logits) < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("The king")["input_ids"] == data.Tokenizer(out).encode("The king", bos=False)


def test_every_script_on_a_tokenizer_json_checkpoint(hf_tokenizer_dirs, tmp_path, capsys, monkeypatch, one_thread):
    """data.py, evaluate.py and passkey.py on a checkpoint whose only tokenizer is a tokenizer.json without BOS:
    documents and prompts start with its EOS, and stdout holds the results alone (no warning for the default
    --docs, though there are fewer than 50 documents)."""
    import shutil
    model = random_model(tmp_path / "model", vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_tokenizer_dirs["qwen2"], name), os.path.join(model, name))
    tok = data.Tokenizer(model)
    monkeypatch.setenv("POSE_CACHE", str(tmp_path / "cache"))
    text = " ".join(["The king is dead; long live the king, and the night is long."] * 12)
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"{i}: {text}"}) + "\n" for i in range(3))

    data.main(["--input", str(tmp_path / "docs.jsonl"), "--tokenizer", model, "--out", str(tmp_path / "ds")])
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'ds'}: kept 3 of 3 documents")
    corpus = data.load_corpus(str(tmp_path / "ds"), tok)
    assert corpus[0][0] == tok.eos_id and corpus[0][1:].tolist() == tok.encode(f"0: {text}", bos=False)

    evaluate.main(["--model", model, "--data", str(tmp_path / "docs.jsonl"), "--ctx", "16", "32", "--stride", "16"])
    out, err = capsys.readouterr()
    header, *table = out.strip().splitlines()
    assert header.startswith("perplexity, sliding window with stride 16, 3 documents") and len(table) == 3
    assert "warning" not in err
    assert all(line.startswith("| ") for line in table)

    passkey.main(["--model", model, "--lengths", "256", "--trials", "2", "--json", str(tmp_path / "pk.json")])
    out, _ = capsys.readouterr()
    header, *table = out.strip().splitlines()
    assert header.startswith("passkey retrieval") and len(table) == 3 and table[2].startswith("| 256 | 256 | 2 |")
    prompt = passkey.make_prompt(tok, 256, 12345, 0.5)
    assert prompt.ids[0] == tok.eos_id and len(prompt.ids) <= 256


def test_exported_files_have_plain_permissions(tmp_path):
    """Every exported file is readable by others, as a plain file is under the umask (safetensors writes 0600)."""
    import stat

    from model import LLaMA, ModelConfig
    LLaMA(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=32)) \
        .save_pretrained(str(tmp_path / "m"))
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "m"):
        assert stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode) == 0o666 & ~umask, name
