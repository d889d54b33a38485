"""LLaMA from scratch: the network, its chunked loss and a KV cache for decoding.

    model = LLaMA.from_pretrained("path/to/llama-7b", dtype=torch.bfloat16, device="cuda")
    logits = model(tokens, positions)           # positions: any increasing integers, e.g. PoSE's skipped ones
    loss = model.loss(tokens, targets, positions)
    model.save_pretrained("out/")               # loadable by transformers, vLLM, ...

The architecture is LLaMA 1/2/3 as in Hugging Face's `LlamaForCausalLM`: pre-norm RMSNorm blocks, grouped-query
attention with rotary embeddings (rope.py), a SwiGLU MLP, optional tied input/output embeddings. Mistral is the same
with an optional sliding window (`MistralForCausalLM`), Qwen2 / Qwen2.5 the same with biases on the q, k and v
projections (`Qwen2ForCausalLM`). Module names equal the Hugging Face checkpoint names (less the "model." prefix), so
loading is a rename (lib/hf.py), not a conversion.
"""
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lib import cli
from lib import hf
from rope import RoPE, apply_rope, normalize_rope_scaling


def load_flash_attn():
    """flash-attn's flash_attn_func, or None: SDPA is the fallback and the CPU path. Not installed: None, silently.
    Installed but broken (an extension built for another torch or CUDA, a missing library): None, and one warning."""
    try:
        from flash_attn import flash_attn_func
        return flash_attn_func
    except ModuleNotFoundError as e:
        if e.name == "flash_attn":  # not installed
            return None
        error = e  # a part of it is missing, e.g. its CUDA extension flash_attn_2_cuda
    except Exception as e:  # the import of an installed package fails: ImportError, OSError, RuntimeError, ...
        error = e
    reason = (str(error).strip().splitlines() or [""])[0]
    cli.warn(f"flash-attn is installed but does not import ({type(error).__name__}: {reason}); attention uses SDPA")
    return None


flash_attn_func = load_flash_attn()
BACKENDS = {"flash": "flash-attn", "sdpa": "SDPA"}
backends_used = set()  # the attention backends this process has run ("flash", "sdpa")


def attention_backend(impl, dtype, device):
    """The backend that computes attention in `dtype` on `device` under Attention.attn_impl `impl`, and why.

    "auto" takes flash-attn on CUDA in fp16/bf16 when it is installed, else SDPA; "flash" requires flash-attn and
    fp16/bf16 (its kernels have no fp32); "sdpa" is always possible."""
    half = dtype in (torch.float16, torch.bfloat16)
    if impl == "flash":
        if flash_attn_func is None:
            raise ValueError("attn_impl='flash' but flash-attn is not installed (or does not import)")
        if not half:
            raise ValueError(f"attn_impl='flash' needs fp16 or bf16, not {str(dtype).removeprefix('torch.')}")
        return "flash", "attn_impl='flash'"
    if impl == "sdpa":
        return "sdpa", "attn_impl='sdpa'"
    if flash_attn_func is None:
        return "sdpa", "flash-attn is not installed"
    if device.type != "cuda" or not half:
        return "sdpa", "flash-attn runs on CUDA in fp16/bf16 only"
    return "flash", "installed, CUDA, fp16/bf16"


def note_backend(backend, reason, device):
    """Record the backend; name it on stderr the first time this process runs it. On the CPU, where SDPA is the
    only backend, SDPA is recorded but not named."""
    if backend not in backends_used:
        backends_used.add(backend)
        if device.type != "cpu" or backend == "flash":
            print(f"attention: {BACKENDS[backend]} ({reason})", file=sys.stderr)


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
    attention_bias: bool = False  # biases on q, k, v and o (LLaMA's attention_bias)
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int = None  # attend to the last sliding_window tokens only (Mistral v0.1: 4096); None: all
    extra: dict = field(default_factory=dict)  # other config.json keys (token ids, ...), written back on save

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if min(self.n_heads, self.n_kv_heads, self.dim, self.n_layers, self.vocab_size) < 1 or \
                self.n_heads % self.n_kv_heads:
            raise hf.CheckpointError(f"bad shape: {self.n_heads} attention heads, {self.n_kv_heads} key-value heads "
                                     f"(a divisor of the former), dim {self.dim}, {self.n_layers} layers, "
                                     f"vocabulary {self.vocab_size}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RoPE, layer: int):
        super().__init__()
        self.layer = layer  # index into a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_bias)
        self.rope = rope
        self.window = cfg.sliding_window
        self.attn_impl = "auto"  # "auto": flash-attn on CUDA in fp16/bf16 when installed, else SDPA; "sdpa"; "flash"

    def forward(self, x, positions, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        # RoPE from the integer positions, in fp32: PoSE's positions are not 0..T-1, and FSDP would cast a float
        # cos/sin table handed into the block to bf16.
        cos, sin = self.rope(positions)  # (B, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # incremental decoding: the cached (already rotated) keys and values come first
            k, v = cache.update(self.layer, k, v)  # (B, nkv, T_past + T, hd)
        # a prefill is causal; one new token attends to everything cached (SDPA's is_causal aligns top-left)
        causal = k.shape[2] == T
        if not causal and T != 1:
            raise ValueError("with a non-empty cache, feed one token at a time")
        # Sliding window (Mistral v0.1): token i attends to tokens i - window + 1 .. i of the sequence (not of the
        # positions, as in transformers). A new token reads the last `window` cached keys; a prefill longer than the
        # window needs a band mask instead of the causal one.
        if self.window and not causal:
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]  # (B, nkv, <= window, hd)
        window = self.window if causal and self.window and T > self.window else None
        backend, _ = attention_backend(self.attn_impl, q.dtype, q.device)
        if backend == "flash":
            # flash-attn takes (B, T, heads, hd) and handles GQA itself (fewer k/v heads); causal mask built in, and
            # the band as window_size = (keys to the left, keys to the right)
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                **({"window_size": (window - 1, 0)} if window else {}))  # (B, T, nh, hd)
        else:
            # The causal mask is over sequence order, which PoSE keeps increasing: positions only enter via RoPE.
            mask = None
            if window:  # (T, T), True where query i may attend key j: i - window < j <= i (O(T^2); flash is O(T))
                i = torch.arange(T, device=q.device)
                mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
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
    def __init__(self, cfg: ModelConfig, rope: RoPE, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, rope, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Rotated keys and values of the tokens read so far, per layer: greedy decoding reads a prompt once, then one
    token per step (passkey.py). Inference only.

    The buffers are allocated once, for max_len tokens, and each step writes its keys and values in place after the
    cached ones. Appending with torch.cat would copy the whole cache at every decoded token and layer."""

    def __init__(self, n_layers, batch, n_kv_heads, head_dim, max_len, dtype=torch.float32, device="cpu"):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens cached; the next token's position by default

    @classmethod
    def for_model(cls, model, max_len, batch=1):
        """A cache for `model`'s layers and key-value heads, in the dtype and on the device of its weights."""
        cfg, weight = model.cfg, model.embed_tokens.weight
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, max_len, weight.dtype, weight.device)

    def update(self, layer, k, v):
        """Write this step's keys and values (B, nkv, T, hd) for `layer` after the cached ones; returns views of
        everything cached for it, (B, nkv, length + T, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens, {end} do not fit")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


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
        self.layers = nn.ModuleList(Block(cfg, self.rope, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each block in backward (train.py turns it on for CUDA)
        self.loss_chunk = 2048  # rows per chunk of the loss's output projection: 256 MB of fp32 logits at 32k
        self.tokenizer_dir = None  # from_pretrained's directory: save_pretrained copies its tokenizer files

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
        self.rope.set_scaling(self.cfg.rope_scaling)

    def set_attn_impl(self, impl):
        """"auto" (flash-attn on CUDA in fp16/bf16 when installed, else SDPA), "sdpa" or "flash"."""
        if impl not in ("auto", "sdpa", "flash"):
            raise ValueError(f"unknown attention implementation {impl!r}; use auto, sdpa or flash")
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
        # The blocks compute in x's dtype on its device: name their attention backend here, outside any compiled
        # block (a print inside one would break its graph).
        note_backend(*attention_backend(self.layers[0].self_attn.attn_impl, x.dtype, x.device), x.device)
        for block in self.layers:
            if cache is not None:
                x = block(x, positions, cache)
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

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, rope_scaling=None, device="cpu"):
        """Load a Hugging Face LLaMA, Mistral, Qwen2 or Baichuan directory (config.json + safetensors or
        pytorch_model.bin, single or sharded; lib/hf.py).

        rope_scaling: None keeps the checkpoint's; a dict replaces it ({"rope_type": "default"} removes it).
        The model is built on the meta device and each checkpoint tensor is moved into place as it is read, so only
        one copy of the weights is ever held (plus one tensor in flight).
        """
        fields = hf.read_config(path)
        with torch.device("meta"):
            model = cls(ModelConfig(**fields))
        if rope_scaling is not None:
            model.set_rope_scaling(rope_scaling)
        expected = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
        model.load_state_dict(hf.read_state_dict(path, fields, expected, dtype, device), strict=True, assign=True)
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.tokenizer_dir = str(path)
        return model.eval()

    def save_pretrained(self, path, state_dict=None, tokenizer_dir=None, max_position_embeddings=None):
        """Hugging Face format: config.json, safetensors and the tokenizer files (hf.write_checkpoint, atomic).

        state_dict: a full, unsharded state dict (train.py passes the one gathered from FSDP); default: this model's.
        tokenizer_dir: where the tokenizer files are; default: the directory from_pretrained read.
        max_position_embeddings: the window config.json claims; default the model's own; an extended model's export
        gives its target (checkpoints.export; lib/hf.py writes dynamic NTK over the original window instead)."""
        state = state_dict or self.state_dict()
        dtype = next(iter(state.values())).dtype
        fields = asdict(self.cfg)
        if max_position_embeddings is not None:
            fields["max_position_embeddings"] = int(max_position_embeddings)
        hf.write_checkpoint(path, state, hf.config_to_hf(fields, dtype),
                            tokenizer_dir=tokenizer_dir or self.tokenizer_dir)
