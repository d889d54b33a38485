"""The Hugging Face checkpoint format: config.json, safetensors (single or sharded), tokenizer files.

    fields = read_config("llama-7b")             # config.json -> model.ModelConfig's fields (a dict)
    for name, tensor in read_tensors("llama-7b", fields): ...   # one tensor at a time, our names
    write_checkpoint("out/", state, config_to_hf(fields, dtype), tokenizer_dir="llama-7b")

Our module names are the checkpoint's less the "model." prefix, so reading is a rename. What is not a rename:
  - Baichuan-7B / Baichuan2-7B (extended in the PoSE paper) fuse q, k, v into one `W_pack` matrix: split on read.
  - Baichuan2's NormHead normalizes each output embedding to unit length before use: applied on read.
  - transformers 5 writes rope settings as `rope_parameters` (theta + scaling in one dict), older versions as
    `rope_theta` + `rope_scaling`: both read; we write the older form, which every version reads.
  - fixed NTK (PoSE section 3.1) has no transformers type: written as the plain RoPE with a larger base it equals.
  - dynamic NTK is written over max_position_embeddings = the original window, the one transformers scales from.
  - Mistral is LLaMA with an optional sliding window; Qwen2 adds biases to the q, k, v projections (not o).
  - a sentencepiece tokenizer.model is exported with a tokenizer.json converted from it (write_tokenizer), so that
    transformers reads it with the `tokenizers` library alone, to the same ids.
This file imports nothing of model.py: it maps files to plain dicts and tensors, model.py builds the network.
"""
import json
import os
import shutil
import struct

import torch
import torch.nn.functional as F

from lib import cli
from lib import tokenizer
from rope import normalize_rope_scaling, rope_type

# what loads: architecture -> model_type. Mistral and Qwen2 differ from LLaMA only where config_from_hf says.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "BaichuanForCausalLM": "baichuan"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")

# model.ModelConfig field -> config.json key
HF_NAMES = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "intermediate_size": "intermediate_size", "norm_eps": "rms_norm_eps",
            "max_position_embeddings": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
            "attention_bias": "attention_bias", "mlp_bias": "mlp_bias"}
INTEGER_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                  "max_position_embeddings")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or key."""


# ----------------------------------------------------------------------------------------------------------------
# config.json

def read_config(path):
    """The model fields (model.ModelConfig's keyword arguments) of the checkpoint directory `path`."""
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory not found: {path}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face LLaMA directory)")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    return config_from_hf(cfg, where=config_path)


def config_from_hf(cfg, where="config.json"):
    """Model fields from a config.json dict: legacy (rope_theta + rope_scaling) or transformers 5 (rope_parameters)."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    arch = (cfg.get("architectures") or [None])[0] or {t: a for a, t in ARCHITECTURES.items()}.get(
        cfg.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{where}: architecture {arch or cfg.get('model_type')!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}")
    fields = {ours: cfg[theirs] for ours, theirs in HF_NAMES.items() if cfg.get(theirs) is not None}
    fields.setdefault("n_kv_heads", cfg["num_attention_heads"])
    fields.setdefault("max_position_embeddings", cfg.get("model_max_length", 2048))
    for name in INTEGER_FIELDS:
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CheckpointError(f"{where}: {HF_NAMES[name]} must be a non-negative integer, got {value!r}")
    if "hidden_act" in cfg and cfg["hidden_act"] != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (LLaMA uses silu)")
    if arch == "MistralForCausalLM":  # v0.1: every layer attends to the last 4096 tokens only; v0.2 on: null
        window = cfg.get("sliding_window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise CheckpointError(f"{where}: sliding_window must be a positive integer or null, got {window!r}")
        fields["sliding_window"] = window
    if arch == "Qwen2ForCausalLM":
        # Qwen2 / Qwen2.5 keep sliding_window in config.json but switch it off (use_sliding_window false); when on, it
        # applies to the layers from max_window_layers on, a per-layer form we do not implement
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
            raise CheckpointError(f"{where}: Qwen2 sliding-window attention (use_sliding_window true) is not "
                                  "supported")
        fields["qkv_bias"] = True
    rope = dict(cfg.get("rope_parameters") or {})  # transformers 5: theta and scaling in one dict
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    if isinstance(cfg.get("pose_rope"), dict):  # our fixed-NTK export (config_to_hf): read back as what it was
        rope, theta = {k: v for k, v in cfg["pose_rope"].items() if k != "rope_theta"}, cfg["pose_rope"]["rope_theta"]
    try:
        fields["rope_theta"] = float(theta)
        fields["rope_scaling"] = normalize_rope_scaling(rope or cfg.get("rope_scaling"),
                                                        fields["max_position_embeddings"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: bad rope settings ({e})") from None
    known = set(HF_NAMES.values()) | {"rope_theta", "rope_scaling", "rope_parameters", "architectures",
                                      "model_type", "transformers_version", "pose_rope", "pose_note"}
    if arch == "MistralForCausalLM":
        known.add("sliding_window")
    fields["extra"] = {k: v for k, v in cfg.items() if k not in known} | {"architecture": arch}
    return fields


def export_architecture(fields):
    """The architecture an export is written as: the one read (Baichuan: LLaMA, as its weights are read), else the
    one the fields need (Qwen2 for q/k/v biases, Mistral for a sliding window)."""
    arch = fields["extra"].get("architecture") or ("Qwen2ForCausalLM" if fields.get("qkv_bias") else
                                                   "MistralForCausalLM" if fields.get("sliding_window") else
                                                   "LlamaForCausalLM")
    arch = "LlamaForCausalLM" if arch == "BaichuanForCausalLM" else arch  # W_pack split, NormHead applied on read
    wrong = [name for name, allowed in (("qkv_bias", "Qwen2ForCausalLM"), ("sliding_window", "MistralForCausalLM"),
                                        ("attention_bias", "LlamaForCausalLM"), ("mlp_bias", "LlamaForCausalLM"))
             if fields.get(name) and arch != allowed]
    if wrong:
        raise CheckpointError(f"{', '.join(wrong)} cannot be written as {arch}")
    return arch


def stored_dtype(fields):
    """The dtype config.json says the weights are stored in (torch_dtype, or transformers 5's dtype); fp32 if none."""
    name = fields["extra"].get("torch_dtype") or fields["extra"].get("dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def config_to_hf(fields, dtype=None):
    """A config.json dict that transformers loads as the model's architecture (LLaMA, Mistral or Qwen2; Baichuan is
    written as the LLaMA it was read as), from model fields; rope in the legacy form."""
    arch = export_architecture(fields)
    cfg = {"architectures": [arch], "model_type": ARCHITECTURES[arch], "hidden_act": "silu"}
    cfg.update({k: v for k, v in fields["extra"].items() if k not in ("architecture", "auto_map", "dtype")})
    cfg.update({theirs: fields[ours] for ours, theirs in HF_NAMES.items()})
    if arch != "LlamaForCausalLM":  # LLaMA's bias flags; Qwen2's q/k/v biases are implied by its architecture
        del cfg["attention_bias"], cfg["mlp_bias"]
    if arch == "MistralForCausalLM":
        cfg["sliding_window"] = fields.get("sliding_window")
    theta, scaling = fields["rope_theta"], fields["rope_scaling"]
    if rope_type(scaling) == "ntk":
        # transformers has no fixed-NTK type, but fixed NTK *is* plain RoPE with a larger base (rope.py):
        # write that, exactly equivalent, and keep what it came from for the record.
        head_dim = fields["head_dim"]
        cfg["pose_rope"] = {"rope_type": "ntk", "factor": scaling["factor"], "rope_theta": theta}
        theta, scaling = theta * scaling["factor"] ** (head_dim / (head_dim - 2)), None
    if rope_type(scaling) == "dynamic":
        # transformers (5.23) builds dynamic NTK on max_position_embeddings as the original window and ignores
        # original_max_position_embeddings: written this way it scales as we do, and our reader takes
        # max_position_embeddings back as the original window (rope.normalize_rope_scaling)
        cfg["max_position_embeddings"] = scaling["original_max_position_embeddings"]
        scaling = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    if scaling and scaling.get("yarn_variant") == "revised":
        cfg["pose_note"] = ("rope_scaling.yarn_variant 'revised' (the official PoSE code's YaRN) is read by this "
                            "project only: transformers, vLLM and others read this model as standard YaRN, which "
                            "gives different logits")
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = None if scaling is None else {"type": rope_type(scaling), **scaling}
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# weights

def read_tensors(path, fields):
    """Yield (our name, tensor) for every tensor of the checkpoint, one at a time, in its stored dtype."""
    baichuan2 = fields["extra"].get("architecture") == "BaichuanForCausalLM" and "z_loss_weight" in fields["extra"]
    for file in weight_files(path):
        for name, tensor in _read_file(file):
            name = name.removeprefix("model.")
            if name.endswith("self_attn.W_pack.weight"):  # Baichuan: q, k, v fused along the output dimension
                prefix = name.removesuffix("W_pack.weight")
                for part, t in zip("qkv", tensor.chunk(3, dim=0)):
                    yield f"{prefix}{part}_proj.weight", t
            elif name == "lm_head.weight" and baichuan2:
                yield name, F.normalize(tensor.float(), dim=-1).to(tensor.dtype)  # NormHead
            else:
                yield name, tensor


def read_state_dict(path, fields, expected, dtype=torch.float32, device="cpu"):
    """The checkpoint at `path` as a state dict, each tensor checked against `expected` ({name: shape}) and converted
    to dtype/device as it is read. Tied models get one shared tensor for the embedding and the output layer."""
    state = {}
    for name, tensor in read_tensors(path, fields):
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved RoPE buffers; ours are computed
                continue
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in the checkpoint")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name])} from config.json")
        tensor = tensor.to(device=device, dtype=dtype)
        if not torch.isfinite(tensor).all():  # corrupt bytes read as NaN/inf: fail here, not as a NaN loss later
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or inf values")
        state[name] = tensor
    if fields.get("tie_embeddings"):  # some tied checkpoints store lm_head too; the input embedding is the one used
        state.pop("lm_head.weight", None)
        if "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return state


def weight_files(path):
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e})") from None
            missing = [n for n in files if not os.path.isfile(os.path.join(path, n))]
            if missing:
                raise CheckpointError(f"{index_path}: shard(s) not found: {', '.join(missing)}")
            return [os.path.join(path, n) for n in files]
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise CheckpointError(f"{path}: no weights (model.safetensors, sharded safetensors or pytorch_model.bin)")


def _read_file(file):
    if file.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # SafetensorError for truncated/corrupt headers and data
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{file}: cannot read safetensors file ({_truncated(file) or e})") from None
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read checkpoint ({e})") from None
        yield from state.items()


def _truncated(file):
    """'truncated: ...' when a safetensors file is shorter than its own header says (an interrupted copy or
    download), else None. The format: an 8-byte little-endian header size n, n bytes of JSON header whose tensors'
    data_offsets are relative to the end of the header."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, less than the 8-byte header size"
        (n,) = struct.unpack("<Q", head)
        if size < 8 + n:
            return f"truncated: {size} bytes, while its header alone is {8 + n}"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return None  # a corrupt header, not a short file
    if size < 8 + n + end:
        return f"truncated: {size} bytes, while its header says {8 + n + end}"
    return None


def write_checkpoint(path, state, config, tokenizer_dir=None):
    """Write `state` (our names, full tensors) as safetensors shards of at most 5 GB (+ index), the tokenizer files
    found in `tokenizer_dir`, and `config` as config.json, last.

    Each file is written under a temporary name and renamed, config.json last, so a crash never leaves a directory
    that looks complete. Tied output weights are dropped (safetensors cannot store shared tensors; transformers
    re-ties them from tie_word_embeddings)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    if config.get("tie_word_embeddings"):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    state = {("" if k.startswith("lm_head") else "model.") + k: v.detach().contiguous() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        cli.write_atomically(os.path.join(path, name), lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        write_json(os.path.join(path, "model.safetensors.index.json"), index)
    if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(path):
        write_tokenizer(tokenizer_dir, path)
    write_json(os.path.join(path, "config.json"), config)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer files

def write_tokenizer(source, path):
    """The tokenizer files of an export: those of TOKENIZER_FILES that the directory `source` has, copied, and where
    it has a sentencepiece tokenizer.model but no tokenizer.json (the bundled tiny model, scripts/init_model.py's),
    a tokenizer.json converted from it and a tokenizer_config.json naming the class and the special tokens.

    transformers reads a tokenizer.json with the `tokenizers` library alone; a bare tokenizer.model it reads only
    with sentencepiece and protobuf installed, and then (as LlamaTokenizer's defaults) without our BOS and with
    other pieces. The converted files (tokenizer.sentencepiece_to_hf) give tokenizer.Tokenizer(source)'s ids exactly,
    BOS included."""
    has = {name: os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES}
    convert = has["tokenizer.model"] and not has["tokenizer.json"]
    files = {}
    if convert:
        try:
            files = tokenizer.sentencepiece_to_hf(source)
        except tokenizer.ConversionError as e:
            cli.warn(f"the export's tokenizer is tokenizer.model alone, which transformers reads only with "
                     f"sentencepiece and protobuf installed: {e}")
    for name in TOKENIZER_FILES:
        if name in files:
            cli.write_text_atomically(os.path.join(path, name), files[name])
        elif has[name]:
            source_file = os.path.join(source, name)
            cli.write_atomically(os.path.join(path, name), lambda tmp, s=source_file: shutil.copyfile(s, tmp))


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    cli.write_atomically(path, write)
