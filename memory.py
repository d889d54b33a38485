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
"""
import math
from dataclasses import dataclass

import torch

import hf
from cli import UsageError
from model import LLaMA, ModelConfig

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
