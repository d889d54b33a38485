"""LLaMA from scratch: the model, Hugging Face checkpoint loading/saving, the tokenizer and a chunked loss.

    model = LLaMA.from_pretrained("path/to/llama-7b", dtype=torch.bfloat16, device="cuda")
    logits = model(tokens, positions)           # positions: any increasing integers, e.g. PoSE's skipped ones
    loss = model.loss(tokens, targets, positions)
    model.save_pretrained("out/")               # loadable by transformers, vLLM, ...

The architecture is LLaMA 1/2/3 as in Hugging Face's `LlamaForCausalLM`: pre-norm RMSNorm blocks, grouped-query
attention with rotary embeddings, a SwiGLU MLP, optional tied input/output embeddings. Module names equal the HF
checkpoint names (less the "model." prefix), so loading is a rename, not a conversion. Baichuan-7B/Baichuan2-7B
(which the PoSE paper also extends) load too: their fused W_pack projection is split into q/k/v.
"""
import json
import os
import shutil
from dataclasses import dataclass, field

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rope import RoPE, apply_rope, rope_type

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "BaichuanForCausalLM")
MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or key."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention (LLaMA-2 70B, LLaMA-3)
    head_dim: int = 0  # 0: dim // n_heads
    intermediate_size: int = 11008  # SwiGLU width, about 8/3 * dim rounded up (LLaMA-7B)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # HF rope_scaling dict, e.g. {"rope_type": "linear", "factor": 8.0}; None: plain RoPE
    max_position_embeddings: int = 2048  # the context the checkpoint claims; the original window for PoSE
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict = field(default_factory=dict)  # other config.json keys (token ids, ...), written back on save

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"num_attention_heads {self.n_heads} is not a multiple of "
                                  f"num_key_value_heads {self.n_kv_heads}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    # config.json <-> ModelConfig
    HF_NAMES = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
                "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "intermediate_size": "intermediate_size", "norm_eps": "rms_norm_eps",
                "max_position_embeddings": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
                "attention_bias": "attention_bias", "mlp_bias": "mlp_bias"}

    @classmethod
    def from_hf(cls, cfg, where="config.json"):
        """Read a Hugging Face LLaMA config: legacy (rope_theta + rope_scaling) or transformers 5 (rope_parameters)."""
        arch = (cfg.get("architectures") or [None])[0] or {"llama": "LlamaForCausalLM", "baichuan":
                                                           "BaichuanForCausalLM"}.get(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{where}: architecture {arch or cfg.get('model_type')!r} is not supported; "
                                  f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}")
        kw = {ours: cfg[theirs] for ours, theirs in cls.HF_NAMES.items() if cfg.get(theirs) is not None}
        kw.setdefault("n_kv_heads", cfg["num_attention_heads"])
        kw.setdefault("max_position_embeddings", cfg.get("model_max_length", 2048))
        if "hidden_act" in cfg and cfg["hidden_act"] != "silu":
            raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (LLaMA uses silu)")
        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5: theta and scaling in one dict
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        scaling = rope or cfg.get("rope_scaling")
        known = set(cls.HF_NAMES.values()) | {"rope_theta", "rope_scaling", "rope_parameters", "architectures",
                                             "model_type", "torch_dtype", "dtype", "transformers_version"}
        extra = {k: v for k, v in cfg.items() if k not in known}
        extra["architecture"] = arch
        return cls(rope_theta=float(theta), rope_scaling=scaling, extra=extra, **kw)

    def to_hf(self, dtype=None):
        """A config.json that transformers' LlamaForCausalLM loads; rope in the legacy form (rope_theta,
        rope_scaling)."""
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
        cfg.update({k: v for k, v in self.extra.items() if k not in ("architecture", "auto_map")})
        cfg.update({theirs: getattr(self, ours) for ours, theirs in self.HF_NAMES.items()})
        theta, scaling = self.rope_theta, self.rope_scaling
        if rope_type(scaling) == "ntk":
            # transformers has no fixed-NTK type, but fixed NTK *is* plain RoPE with a larger base (rope.py):
            # write that, exactly equivalent, and keep what it came from for the record.
            cfg["pose_rope"] = {"rope_type": "ntk", "factor": scaling["factor"], "rope_theta": theta}
            theta, scaling = theta * scaling["factor"] ** (self.head_dim / (self.head_dim - 2)), None
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = None if scaling is None else {"type": rope_type(scaling), **scaling}
        if dtype is not None:
            cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        return cfg


def normalize_rope_scaling(scaling, max_position_embeddings):
    """One spelling for a rope_scaling dict: "rope_type" key, original length filled in where the type needs it;
    None for plain RoPE (None, {} or type "default")."""
    kind = rope_type(scaling)
    if kind == "default":
        return None
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    out["rope_type"] = kind
    if kind in ("dynamic", "yarn", "llama3"):
        # transformers' convention: the original window defaults to the config's max_position_embeddings
        out.setdefault("original_max_position_embeddings", max_position_embeddings)
    if "factor" not in out:
        raise CheckpointError(f"rope_scaling of type {kind!r} needs a 'factor'")
    return out


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _flash_attn_func():
    """flash-attn's kernel if it is installed, else None (imported on first use)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RoPE):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_bias)
        self.rope = rope
        self.attn_impl = "auto"  # "auto": flash-attn on CUDA in fp16/bf16 when installed, else SDPA; "sdpa"; "flash"

    def forward(self, x, positions, kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        # RoPE from the integer positions, in fp32: PoSE's positions are not 0..T-1, and FSDP would cast a float
        # cos/sin table handed into the block to bf16.
        cos, sin = self.rope(positions)  # (B, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # incremental decoding: prepend the cached (already rotated) keys and values
            if kv[0] is not None:
                k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)  # (B, nkv, T_past + T, hd)
            kv[0], kv[1] = k, v
        # a prefill is causal; one new token attends to everything cached (SDPA's is_causal aligns top-left)
        causal = k.shape[2] == T
        if not causal and T != 1:
            raise ValueError("with a non-empty cache, feed one token at a time")
        flash = _flash_attn_func() if self.attn_impl != "sdpa" else None
        use_flash = flash is not None and (self.attn_impl == "flash" or (
            q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)))
        if self.attn_impl == "flash" and flash is None:
            raise RuntimeError("attn_impl='flash' but flash_attn is not installed")
        if use_flash:
            # flash-attn takes (B, T, heads, hd) and handles GQA itself (fewer k/v heads); causal mask built in
            y = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)  # (B, T, nh, hd)
        else:
            # The causal mask is over sequence order, which PoSE keeps increasing: positions only enter via RoPE.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                               enable_gqa=self.n_kv_heads != self.n_heads)  # (B, nh, T, hd)
            y = y.transpose(1, 2)  # (B, T, nh, hd)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RoPE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, rope)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Rotated keys and values of the tokens read so far, per layer: greedy decoding reads a prompt once and then
    one token per step (passkey.py). Inference only."""

    def __init__(self, n_layers):
        self.layers = [[None, None] for _ in range(n_layers)]
        self.length = 0


class ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of -log softmax(h W^T)[target] over rows with target != -100, `chunk` rows at a time.

    Only one chunk's logits exist at any moment. Under autograd the gradients are computed in the same pass, since
    d loss / d logits = softmax - onehot is known as soon as a chunk's logits are: grad_h = g W and grad_W += g^T h.
    So backward costs no recomputation (unlike checkpointing each chunk, which redoes the output projection) and
    memory is one chunk's logits plus grad_h, the size of h. Logits and softmax are in fp32 even for bf16 weights.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for i in range(0, h.shape[0], chunk):
            h_c, t_c = h[i:i + chunk], targets[i:i + chunk]  # (c, dim), (c,)
            logp = (h_c @ weight.T).float()  # (c, vocab) logits, a fresh tensor: normalized in place below
            logp -= torch.logsumexp(logp, dim=-1, keepdim=True)  # log-probabilities
            valid = t_c != -100
            t_safe = torch.where(valid, t_c, 0)
            total -= (logp.gather(1, t_safe[:, None])[:, 0] * valid).sum()
            if need_grad:
                g = logp.exp_()  # d nll / d logits = softmax - onehot, zero for ignored rows
                g.scatter_add_(1, t_safe[:, None], -torch.ones_like(g[:, :1]))
                g *= valid[:, None]
                g = g.to(h.dtype)
                grad_h[i:i + chunk] = g @ weight
                grad_w += (g.T @ h_c).float()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


class LLaMA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rope = RoPE(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, self.rope) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each block in backward (train.py turns it on for CUDA)
        self.loss_chunk = 2048  # rows per chunk of the loss's output projection: 256 MB of fp32 logits at 32k
        self.source = None  # directory this model was loaded from (its tokenizer files are copied on save)

    def init_weights(self, std=0.02):
        """Fresh weights (for pretraining from scratch): normal(0, std) linears/embeddings, unit norms."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("layernorm.weight") or name == "norm.weight" else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def set_rope_scaling(self, scaling):
        """Switch the rotary interpolation (e.g. evaluate the same weights with and without PI)."""
        self.cfg.rope_scaling = normalize_rope_scaling(scaling, self.cfg.max_position_embeddings)
        self.rope.__init__(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)  # in place: layers share it

    def set_attn_impl(self, impl):
        for block in self.layers:
            block.self_attn.attn_impl = impl

    def hidden_states(self, tokens, positions=None, cache=None):
        """tokens, positions (B, T) -> final normalized hidden states (B, T, dim).

        cache: a KVCache for incremental decoding (inference); positions then default to continue after the cached
        tokens."""
        B, T = tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        elif positions.shape != tokens.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        if positions.dtype.is_floating_point:
            raise TypeError("positions must be integers (fp16/bf16 cannot represent large positions exactly)")
        x = self.embed_tokens(tokens)  # (B, T, dim)
        for i, block in enumerate(self.layers):
            if cache is not None:
                x = block(x, positions, cache.layers[i])
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, positions, use_reentrant=False)
            else:
                x = block(x, positions)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(self, tokens, positions=None, targets=None):
        """Logits (B, T, vocab) or, with targets, the mean next-token cross-entropy over targets != -100.

        The loss path never holds the full (B, T, vocab) logits: at 128k tokens and a 32k vocabulary those are 16 GB
        in fp32. See ChunkedCrossEntropy.
        """
        h = self.hidden_states(tokens, positions)
        if targets is None:
            return self.lm_head(h)
        weight = self.lm_head.weight
        if not torch.is_grad_enabled():  # autograd.Function sees requires_grad even under no_grad: skip the gradients
            h, weight = h.detach(), weight.detach()
        nll = ChunkedCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), self.loss_chunk)
        return nll / (targets != -100).sum().clamp(min=1)

    def loss(self, tokens, targets, positions=None):
        """Mean cross-entropy of next-token prediction over targets != -100 (see forward)."""
        return self(tokens, positions, targets=targets)

    # ----------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, rope_scaling=None, device="cpu"):
        """Load a Hugging Face LLaMA directory (config.json + safetensors or pytorch_model.bin, single or sharded).

        rope_scaling: None keeps the checkpoint's; a dict replaces it ({"rope_type": "default"} removes it).
        The model is built on the meta device and each checkpoint tensor is moved into place as it is read, so only
        one copy of the weights is ever held (plus one tensor in flight).
        """
        with torch.device("meta"):
            model = cls(read_config(path))
        if rope_scaling is not None:
            model.set_rope_scaling(rope_scaling)
        cfg = model.cfg
        model.load_state_dict(read_state_dict(path, model, dtype, device), strict=True, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.source = str(path)
        return model.eval()

    def save_pretrained(self, path, state_dict=None):
        """Write config.json, safetensors shards of at most 5 GB (+ index) and the tokenizer files, atomically.

        state_dict: a full, unsharded state dict (train.py passes the one gathered from FSDP); default: this model's.
        Each file is written under a temporary name and renamed, config.json last, so a crash never leaves a
        directory that looks complete.
        """
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {k: v for k, v in (state_dict or self.state_dict()).items()}
        if self.cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # safetensors cannot store shared tensors; transformers re-ties
        state = {("" if k.startswith("lm_head") else "model.") + k: v.detach().contiguous() for k, v in state.items()}
        dtype = next(iter(state.values())).dtype
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
            replace_atomically(os.path.join(path, name),
                               lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            write_json(os.path.join(path, "model.safetensors.index.json"), index)
        if self.source and os.path.abspath(self.source) != os.path.abspath(path):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(self.source, name)):
                    replace_atomically(os.path.join(path, name), lambda tmp, n=name: shutil.copyfile(
                        os.path.join(self.source, n), tmp))
        write_json(os.path.join(path, "config.json"), self.cfg.to_hf(dtype))


def read_state_dict(path, model, dtype=torch.float32, device="cpu"):
    """The checkpoint at `path` as a state dict for `model` (which may live on the meta device), each tensor checked
    against the model's shape and converted to dtype/device as it is read. Tied models get one shared tensor."""
    expected = model.state_dict(keep_vars=True)
    state = {}
    for name, tensor in read_checkpoint(path, model.cfg):
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved RoPE buffers; ours are computed
                continue
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in the checkpoint")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name].shape)} from config.json")
        state[name] = tensor.to(device=device, dtype=dtype)
    if model.cfg.tie_embeddings:  # some tied checkpoints store lm_head too; the input embedding is the one used
        state.pop("lm_head.weight", None)
        if "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return state


def replace_atomically(path, write):
    """Call write(tmp) on a temporary name in the same folder, then rename: never a half-written file at `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{root}.{os.getpid()}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    replace_atomically(path, write)


def read_config(path):
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory not found: {path}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face LLaMA directory)")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(cfg, where=config_path)


def read_checkpoint(path, cfg: ModelConfig):
    """Yield (our name, tensor) for every tensor of the checkpoint, one at a time, in its stored dtype."""
    for file in _weight_files(path):
        for name, tensor in _read_file(file):
            name = name.removeprefix("model.")
            if name.endswith("self_attn.W_pack.weight"):  # Baichuan: q, k, v fused along the output dimension
                prefix = name.removesuffix("W_pack.weight")
                for part, t in zip("qkv", tensor.chunk(3, dim=0)):
                    yield f"{prefix}{part}_proj.weight", t
            elif name == "lm_head.weight" and cfg.extra.get("architecture") == "BaichuanForCausalLM" \
                    and "z_loss_weight" in cfg.extra:
                # Baichuan2's NormHead normalizes each output embedding to unit length before use
                yield name, F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
            else:
                yield name, tensor


def _weight_files(path):
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
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
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read checkpoint ({e})") from None
        yield from state.items()


class Tokenizer:
    """The sentencepiece model of a LLaMA checkpoint (`tokenizer.model`)."""

    def __init__(self, path):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()

    def encode(self, text, bos=True, eos=False):
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts, bos=True, eos=False, threads=-1):
        out = self.sp.encode(texts, num_threads=threads)
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])
