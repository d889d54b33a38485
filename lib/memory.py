"""The memory plan of a training run, by arithmetic, before anything is loaded: `python train.py ... --dry-run` prints
it, and train.py refuses a CUDA run whose plan exceeds the free memory of a GPU.

Everything is counted as the code allocates it, per process of a run of `world` processes (bytes; b = 2 for bf16
compute, 4 for fp32):
  state        fp32 master weights, fp32 gradients and AdamW's two moments (and its step counters), sharded: FSDP2
               gives every process ceil(rows / world) rows of each parameter, so 4 + 4 + 8 bytes per parameter / world
               (--cpu-offload keeps them in host memory)
  gathered     the weights FSDP2 all-gathers for compute, in the compute dtype: the root (embeddings, final norm, output
               layer) for the whole step, and two blocks at a time (the running one and the prefetched next)
  activations  what autograd keeps for backward, per token and layer (ACTIVATIONS below); with activation
               checkpointing only each block's input (b x dim) is kept, and one block at a time is recomputed
  loss         model.ChunkedCrossEntropy: one chunk of fp32 logits with logsumexp's temporary of the same size, or
               later the chunk's gradient and its product with the hidden states; the output layer's gradient
               accumulated in fp32; grad_h, the size of the hidden states
The peak is the larger of the forward/backward peak and the optimizer step's. It is an upper bound of what the
allocator holds (tests/test_memory.py measures a CPU run against it), not counting the CUDA context (~0.5 GB),
NCCL's buffers or fragmentation.

An evaluation (evaluate.py, passkey.py, recall.py) is planned for one process without gradients (eval_plan): the
weights in the load dtype, the KV cache where the tool keeps one, and the largest moment of the forward pass
(forward_moments). Each tool lists its paths in order of preference (passkey: cached decoding, then none) and takes
the first that fits the GPU's free memory (evaluation_path); tests/test_memory.py measures CPU forward passes against
the plan.
"""
import math
from dataclasses import dataclass

import torch

from lib import hf
from lib.cli import UsageError, warn
from model import LLaMA, ModelConfig
from rope import normalize_rope_scaling, original_window, scaling_from_spec, supported_window

GB = 1e9  # decimal gigabytes


def activations_per_token(cfg, b):
    """Bytes autograd keeps for backward per token in one block, without checkpointing (model.Block in dtype b):
      2 RMSNorms  the fp32 input, the normalized input in b, the output in b, the fp32 1/rms: 2 (4 dim + 2 b dim + 4)
      rope        cos and sin of the positions in fp32, built in every layer (rope.RoPE): 2 x 4 x head_dim
      attention   rotated q and k, v, the output (b x (2 q_dim + 2 kv_dim)), the fp32 logsumexp per head (4 heads);
                  flash-attn and SDPA's fused kernels keep no T x T matrix
      MLP         gate, silu(gate), up and their product: 4 b intermediate"""
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    norms = 2 * (4 * cfg.dim + 2 * b * cfg.dim + 4)
    rope = 2 * 4 * cfg.head_dim
    attention = b * (2 * q_dim + 2 * kv_dim) + 4 * cfg.n_heads
    mlp = 4 * b * cfg.intermediate_size
    return norms + rope + attention + mlp


@dataclass(frozen=True)
class Row:
    what: str
    arithmetic: str
    bytes: int


@dataclass(frozen=True)
class Plan:
    params: int  # parameters of the model
    rows: tuple  # the parts, in bytes per process
    peak: int  # device bytes per process at the peak (host bytes for a CPU run)
    peak_is: str  # what the peak adds up
    host: int  # host bytes per process held by --cpu-offload (0 without)
    notes: tuple  # the alternatives, one line each

    def part(self, what):
        return next(r.bytes for r in self.rows if r.what.startswith(what))

    def parts(self):
        """{weights, gradients, adamw: the sharded state's rows; working: the other rows, what a step adds to the
        state (gathered weights, activations, the loss); peak} in bytes, as bench.py's memory section compares them."""
        weights, gradients, adamw, *working = (r.bytes for r in self.rows)
        return dict(weights=weights, gradients=gradients, adamw=adamw, working=sum(working), peak=self.peak)

    def table(self):
        lines = ["| what | arithmetic | GB |", "| --- | --- | --- |"]
        lines += [f"| {r.what} | {r.arithmetic} | {r.bytes / GB:.2f} |" for r in self.rows]
        lines.append(f"| **peak per process** | {self.peak_is} | **{self.peak / GB:.1f}** |")
        return "\n".join(lines + [""] + list(self.notes))


def shard_bytes(shapes, world, itemsize=4):
    """Bytes of every parameter's shard on the process holding the most: ceil(rows / world) rows (FSDP2 shards dim 0
    and pads every shard to that size)."""
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) * itemsize for s in shapes)


def plan(cfg, world=1, micro_batch=1, seq_len=2048, precision="bf16", grad_checkpointing=True, cpu_offload=False,
         replay_tokens=0, accumulating=True):
    """The Plan of one process. seq_len: tokens per example; replay_tokens: tokens of this process's replay
    micro-step (0: none); accumulating: the step has more than one forward pass, so gradients exist during one."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    b = 2 if precision == "bf16" else 4
    shapes = [tuple(p.shape) for p in model.parameters()]
    count = sum(math.prod(s) for s in shapes)
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = count - cfg.n_layers * block
    tokens = max(micro_batch * seq_len, replay_tokens)  # the largest forward pass
    chunk, V, d, L = min(model.loss_chunk, tokens), cfg.vocab_size, cfg.dim, cfg.n_layers
    per_token = activations_per_token(cfg, b)

    weights = shard_bytes(shapes, world)
    adam = 2 * weights + 4 * len(shapes)  # exp_avg, exp_avg_sq, and a 0-d fp32 step per parameter
    gathered = (root + 2 * block) * b
    kept = L * tokens * (b * d if grad_checkpointing else per_token)
    outside = tokens * (4 * d + 3 * b * d + 4)  # the final RMSNorm's saved tensors and grad_h
    # a chunk's fp32 logits with logsumexp's copy of them; or, later, the chunk's gradient (fp32, and its copy in b)
    # with its product with h (in b, then in fp32 to accumulate)
    cast = b if b < 4 else 0
    logits, product = 2 * chunk * V * 4, chunk * V * (4 + cast) + V * d * (b + (4 if b < 4 else 0))
    logits_is = f"2 x {chunk} x {V} x 4 B (a chunk of fp32 logits and logsumexp's copy)" if logits >= product else \
        f"{chunk} x {V} x {4 + cast} B + {V} x {d} x {b + (4 if b < 4 else 0)} B (a chunk's gradient times h)"
    logits = max(logits, product)
    loss = logits + V * d * 4
    if grad_checkpointing:  # the loss, then one recomputed block with its gathered gradients (b, and fp32 to reduce)
        transient = max(outside + loss, tokens * per_token + block * (b + (4 if b < 4 else 0)))
    else:
        transient = outside + loss
    rows = [Row("fp32 master weights, sharded", f"{count:,} x 4 B / {world}", weights),
            Row("fp32 gradients, sharded", f"{count:,} x 4 B / {world}", weights),
            Row("AdamW moments, sharded", f"2 x {count:,} x 4 B / {world}", adam),
            Row(f"{precision} weights gathered: the root and two blocks",
                f"({root:,} + 2 x {block:,}) x {b} B", gathered),
            Row("activations kept for backward" + (", checkpointing: each block's input" if grad_checkpointing else
                                                  ", every layer (no checkpointing)"),
                f"{L} x {tokens} tokens x {b * d if grad_checkpointing else per_token} B", kept),
            Row("the loss, or one block recomputed in backward if larger" if grad_checkpointing else "the loss",
                f"{logits_is} + {V} x {d} x 4 B (the output "
                f"layer's gradient) + {tokens} x {4 * d + 3 * b * d} B (final norm, grad_h)"
                + (f"; a block: {tokens} x {per_token} B + its gradients" if grad_checkpointing else ""), transient)]
    state = 0 if cpu_offload else weights + adam
    grads = 0 if cpu_offload else weights
    forward_backward = state + (grads if accumulating else 0) + gathered + kept + transient
    optimizer = 0 if cpu_offload else state + grads + weights  # torch's foreach AdamW: about one moment more
    scores = cfg.n_heads * seq_len ** 2 * b * micro_batch * (1 if grad_checkpointing else L)
    other = L * tokens * (per_token if grad_checkpointing else b * d)
    notes = [f"activations: {per_token} B per token and layer without checkpointing, {b * d} B with; "
             f"{'without' if grad_checkpointing else 'with'} it the kept activations are {other / GB:.2f} GB",
             f"attention: flash-attn and SDPA's fused kernels keep O(T), counted above; SDPA's math kernel (no fused "
             f"kernel, or a sliding-window mask) adds {cfg.n_heads} x {seq_len} x {seq_len} x {b} B of scores per "
             f"example and layer: {scores / GB:.2f} GB more",
             f"--cpu-offload{' (on)' if cpu_offload else ''}: the sharded weights, gradients and AdamW state "
             f"({(2 * weights + adam) / GB:.2f} GB) in host memory; the device keeps "
             f"{(gathered + kept + transient) / GB:.2f} GB"]
    peak_is = ("the last three rows (the first three in host memory)" if cpu_offload else
               "the rows above" + ("" if accumulating else ", less the gradients (one forward pass: none yet)")
               if forward_backward >= optimizer else "weights, gradients, AdamW and a moment's copy: the optimizer step")
    return Plan(count, tuple(rows), max(forward_backward, optimizer), peak_is, 2 * weights + adam if cpu_offload else 0,
                tuple(notes))


def plan_of(s):
    """The Plan of a process of the run of settings.Settings s, from its config.json alone."""
    fields = dict(hf.read_config(s.model), rope_scaling=s.rope_scaling)
    micro_steps = s.batch_size // (s.world * s.micro_batch_size)
    return plan(ModelConfig(**fields), s.world, s.micro_batch_size, s.seq_len, s.precision, s.grad_checkpointing,
                s.cpu_offload, replay_tokens=s.replay_batch // s.world * s.train_len,
                accumulating=micro_steps > 1 or bool(s.replay))


def check_fits(plan, free):
    """UsageError unless the plan's peak fits the least of `free` ({device name: free bytes})."""
    where = min(free, key=free.get)
    if plan.peak > free[where]:
        raise UsageError(f"the run needs about {plan.peak / GB:.1f} GB per process (--dry-run shows the plan) and "
                         f"{where} has {free[where] / GB:.1f} GB free: lower --micro-batch-size, or use "
                         "--grad-checkpointing or --cpu-offload")


# ----------------------------------------------------------------------------------------------------------------------
# evaluation: one process, no gradients (evaluate.py, passkey.py, recall.py)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def forward_moments(cfg, b):
    """(name, what is held, bytes per token) at each of the largest moments of a forward pass without gradients,
    beside the weights and the KV cache, as model.py allocates them in dtype b (bytes). The int64 positions live
    through the pass; a block's input x to the block's end (its caller holds it); its normalized copy n, and q, k, v,
    cos and sin, to the attention's end.
      RMSNorm    two fp32 copies of its input at once (x.float() with its square, then with x / rms): 8 B per channel
      RoPE       apply_rope in fp32: the input's copy (b < 4), its rotate-half, two products and their sum
      attention  flash-attn's and SDPA's fused kernels keep no T x T matrix: the output, its reshaped copy, o_proj's
                 output
      MLP        silu(gate), up and their product, each b x intermediate"""
    d, hd, inter = cfg.dim, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    xn = 8 + 2 * b * d  # the positions, x and n
    qkv, trig = b * (q + 2 * kv), 2 * 4 * hd  # q, k and v; cos and sin in fp32
    rope = 16 + (4 if b < 4 else 0)
    return [("RMSNorm", "positions, x, x + attention, two fp32 copies", 8 + 2 * b * d + 8 * d),
            ("RoPE on q", "positions, x, n, q, k, v, cos, sin, q's fp32 temporaries", xn + qkv + trig + rope * q),
            ("RoPE on k", "positions, x, n, q, k, v, rotated q, cos, sin, k's fp32 temporaries",
             xn + qkv + b * q + trig + rope * kv),
            ("attention output", "positions, x, n, q, k, v, cos, sin, the output, its reshaped copy, o_proj's output",
             xn + qkv + trig + 2 * b * q + b * d),
            ("MLP", "positions, x, x + attention, n, silu(gate), up and their product",
             8 + 3 * b * d + 3 * b * inter)]


def eval_plan(cfg, tokens, dtype=torch.bfloat16, cache_tokens=0, logit_rows=1, no_cache="no cache"):
    """The Plan of one evaluation process: the weights in `dtype`; a KV cache preallocated for `cache_tokens` tokens
    (0: none, and `no_cache` says what the tool does instead); the largest moment of a forward pass over `tokens`
    tokens (forward_moments), or of its output layer on `logit_rows` rows (None: model.loss's chunks of rows)."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    b, L, V, d = dtype.itemsize, cfg.n_layers, cfg.vocab_size, cfg.dim
    count = sum(p.numel() for p in model.parameters())
    rows = min(model.loss_chunk, tokens) if logit_rows is None else logit_rows
    moments = [(name, f"{tokens:,} tokens x {per:,} B ({held})", tokens * per)
               for name, held, per in forward_moments(cfg, b)]
    # the output layer: the final hidden states, fp32 logits of the scored rows and log-softmax's (logsumexp's) copy;
    # model.loss computes a chunk's logits (in b, then in fp32) while the previous chunk's are still held
    chunked = logit_rows is None and tokens > rows and b < 4
    moments.append(("output layer", f"{tokens:,} x {b * d} B (the final hidden states) + {rows:,} x {V} x "
                                    f"{8 + b * chunked} B (" + (f"a chunk of fp32 logits, and the next one's in "
                                                                f"{DTYPE_NAMES[dtype]} and fp32)" if chunked else
                                                                "fp32 logits and their log-softmax)"),
                    tokens * b * d + rows * V * (8 + b * chunked)))
    largest = max(moments, key=lambda m: m[2])
    cache = L * 2 * cache_tokens * cfg.n_kv_heads * cfg.head_dim * b
    table = [Row(f"{DTYPE_NAMES[dtype]} weights", f"{count:,} x {b} B", count * b),
             Row(f"KV cache, preallocated for {cache_tokens:,} tokens" if cache_tokens else
                 f"KV cache: none ({no_cache})",
                 f"{L} layers x 2 x {cache_tokens:,} x {cfg.n_kv_heads} x {cfg.head_dim} x {b} B" if cache_tokens
                 else "-", cache),
             Row(f"the forward's largest temporaries: {largest[0]}", largest[1], largest[2])]
    scores = cfg.n_heads * tokens ** 2 * b
    notes = ["the forward's other moments: " + ", ".join(f"{name} {n / GB:.2f} GB" for name, _, n in moments
                                                         if name != largest[0]),
             f"attention: SDPA's math kernel (no fused kernel, or a sliding-window mask without flash-attn) adds "
             f"{cfg.n_heads} x {tokens} x {tokens} x {b} B of scores: {scores / GB:.2f} GB more",
             "not counted: the CUDA context (about 0.5 GB) and the allocator's fragmentation"]
    return Plan(count, tuple(table), sum(r.bytes for r in table), "the rows above", 0, tuple(notes))


def rope_windows(cfg, spec, original_len=None):
    """(rope_scaling, original window, supported window) of a ModelConfig under a --rope spec, as the evaluation
    commands set them on the loaded model (rope.scaling_from_spec, then LLaMA.set_rope_scaling); original_len:
    --original-len."""
    own = cfg.rope_scaling
    original = original_len or original_window(own, cfg.max_position_embeddings)
    scaling = normalize_rope_scaling(scaling_from_spec(spec, original, checkpoint=own), cfg.max_position_embeddings)
    return scaling, original, supported_window(scaling, original)


def gpu_free(device, gpu_memory=None):
    """{name: free bytes} of an evaluation's GPU: gpu_memory GB as stated (--gpu-memory), else measured on CUDA
    (torch.cuda.mem_get_info, as train.py); None on a CPU."""
    if gpu_memory is not None:
        return {f"a GPU of {gpu_memory:g} GB (--gpu-memory)": gpu_memory * GB}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return {str(device): torch.cuda.mem_get_info(torch.device(device))[0]}
    return None


def evaluation_path(args, what, candidates, hint):
    """The path an evaluation command takes: the first of `candidates`, (path, Plan) pairs in order of preference,
    whose peak fits the GPU's free memory (gpu_free of args.device and args.gpu_memory); the first on a CPU.
    args.dry_run: print the chosen plan and the path. A CUDA run warns when it leaves the first path. None fits:
    UsageError in one line, naming what the least needs, the free memory and `hint`."""
    free = gpu_free(args.device, args.gpu_memory)
    where = next(iter(free)) if free else None
    fits = [c for c in candidates if free is None or c[1].peak <= free[where]]
    path, plan = (fits or candidates[-1:])[0]
    left = "; ".join(f"{p} needs about {c.peak / GB:.1f} GB" + (f", its KV cache {c.rows[1].bytes / GB:.2f} GB"
                                                               if c.rows[1].bytes else "")
                     for p, c in candidates[:candidates.index((path, plan))])
    if args.dry_run:
        print(f"dry run: {what}; config.json alone is read, nothing is loaded\n"
              f"memory plan of one process on {args.device}, {path}: {plan.params:,} parameters\n{plan.table()}")
        print(f"{where}: {free[where] / GB:.1f} GB free" if free else
              "no GPU here: --gpu-memory GB plans for a GPU of that memory" if str(args.device).startswith("cuda") else
              f"{args.device}: the free memory is not checked")
    if not fits:
        raise UsageError(f"{what} needs about {plan.peak / GB:.1f} GB ({path}; --dry-run shows the plan) and {where} "
                         f"has {free[where] / GB:.1f} GB free: {hint}")
    if args.dry_run:
        print(f"path: {path}" + (f"; {left}" if left else ""))
    elif left:
        warn(f"{what}: {left}; {where} has {free[where] / GB:.1f} GB free: {path}")
    return path
