"""Extend a LLaMA's context window by fine-tuning: PoSE (default) or a baseline, with FSDP2 on any number of processes.

    python train.py --target 2048                          # one CPU process, the bundled tiny model and books
    torchrun --nproc_per_node 2 train.py --target 2048     # two CPU processes (gloo): same batches, same weights
    torchrun --nproc_per_node 8 train.py --model llama-7b --data data/pile --target 16384      # 8 GPUs
    python train.py --model assets/configs/llama-7b --target 16384 --world 8 --device cuda --gpu-memory 80 --dry-run

Each optimizer step takes `--batch-size` examples (64, the paper's global batch): `--micro-batch-size` per process
and forward/backward, accumulated over batch / (world x micro) micro-steps. Example i of the run is a pure function
of (--seed, i) (pose.example_rng), so the run is the same whatever the number of processes, and a resumed run
continues exactly where the checkpoint left it. On CUDA the memory plan chooses the micro-batch and activation
checkpointing unless they are given (lib/settings.plan_defaults). Prepare large data first with `python data.py`.

Recipes (--recipe; every flag it sets can still be given):
    paper  the paper's (section 4.1) for real checkpoints: AdamW, lr 2e-5, no weight decay, 10 warmup steps then
           linear decay, 1000 steps of 64 examples, linear position interpolation, micro-batch 1 on the CPU
    tiny   the bundled tiny model's: 100 steps of 16 examples, lr 2e-4, YaRN, the whole per-process batch in one
           micro-step; about 3 minutes on a 2-core CPU (results/toy/README.md says why YaRN)
The default is tiny for the bundled model and for a model a tiny run made (its args.json), paper for any other.
Every run prints its recipe, why, and its token budget.

Methods (--method):
    pose     train_len tokens, positions in --chunks chunks with random skips, up to target (paper eq. 3-5)
    full     target tokens with plain positions: full-length fine-tuning (costly; the paper's upper bound)
    randpos  train_len tokens at train_len sorted random distinct positions below target (Ruoss et al. 2023)
    pi       train_len tokens with plain positions: position interpolation fine-tuned without skips
All apply --rope interpolation with factor target / original window ("none": no interpolation). A checkpoint that is
already extended keeps its geometry: the new scaling is its own type with the factor grown to target / its original
window (docs/at-scale.md, "Progressive extension").

Outputs in --out (created by train.py, or a run directory it made; one run at a time holds its lock): log.jsonl (one
JSON object per optimizer step: step, loss, lr, tokens, seconds, ...), args.json, checkpoints/step_N (sharded,
torch.distributed.checkpoint, every --save-every steps and after the last; --resume continues from the latest, a
finished run too), and at the end the model in Hugging Face format (config.json with rope_scaling and
max_position_embeddings = target (lib/hf.py says why dynamic NTK differs), safetensors in the base checkpoint's
dtype, tokenizer files).

Here: setup, build, examples, the loop, export, top to bottom. lib/settings.py resolves the frozen Settings they
take; lib/rundir.py checks --out and writes args.json and the log; lib/checkpoints.py saves, loads and exports;
lib/memory.py plans.
"""
import dataclasses
import datetime
import math
import os
import resource
import shlex
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lib import checkpoints
from lib import cli
import data
from lib import hf
from lib import memory
import pose
from lib import rundir
from lib import settings
from lib.cli import UsageError
from model import LLaMA, ModelConfig


# ----------------------------------------------------------------------------------------------------------------------
# distributed setup

def setup_distributed(timeout_minutes=60.0):
    """torchrun's environment, or a one-process group for `python train.py`: the same code path either way.

    On CUDA the group has NCCL for GPU tensors and gloo for CPU tensors (--cpu-offload's gradient norm, a CPU
    broadcast); gloo idles unless used. Every collective waits at most `timeout_minutes` for the slowest rank: long
    enough for rank 0 to read and check a large checkpoint while the others wait (NCCL's default is 10 minutes)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"  # the backend is the only difference
    timeout = datetime.timedelta(minutes=timeout_minutes)
    try:
        if "RANK" in os.environ:  # torchrun: rendezvous through its environment variables
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process: an in-memory store, no port to find or to race for
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    except RuntimeError as e:
        raise UsageError(f"cannot start the process group: {str(e).strip().splitlines()[-1]}") from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return device, mesh


def on_rank0(fn):
    """fn() on rank 0 only; an error there becomes the same error on every rank (instead of the others hanging in
    the next collective). Returns fn's result on rank 0, None elsewhere."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except (ValueError, OSError) as e:  # UsageError, CheckpointError and DataError are ValueErrors
            error = str(e)
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise UsageError(shared[0])
    return result


def broadcast(obj):
    shared = [obj]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


# ----------------------------------------------------------------------------------------------------------------------
# the model and its data

def sharded_model(cfg, device, mesh, precision="fp32", cpu_offload=False, grad_checkpointing=False, compile=False):
    """The LLaMA of ModelConfig cfg in training mode, built on the meta device and sharded by FSDP2, so that no
    process holds it whole, then given uninitialized storage on `device` (build loads a checkpoint, bench.py draws
    weights). Each block is one unit (gathered just in time), then the root (embeddings, final norm, output layer);
    blocks compute in `precision`, while the master weights, the gradient reduction and the optimizer stay fp32.
    cpu_offload: the shards live in CPU memory (FSDP2 requires them materialized there) and move to `device` for
    compute. compile: each block is compiled before sharding, as torchtitan does; positions are a tensor input, so new
    positions every step reuse the compiled code."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else None
    kw = dict(mesh=mesh, mp_policy=mp, **({"offload_policy": offload} if offload else {}))
    for block in model.layers:
        if compile:
            block.compile()
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.to_empty(device="cpu" if cpu_offload else device)
    if compile:  # fill RoPE's per-device cache now: filling it inside a compiled block would recompile it, and
        # activation checkpointing would then recompute with the other graph
        model.rope.frequencies(torch.zeros(1, 1, dtype=torch.long, device=device))
    model.gradient_checkpointing = grad_checkpointing
    return model.train()


def build(s, device, mesh, rank):
    """The sharded model of Settings s with its weights, and the training corpus."""
    fields = dict(hf.read_config(s.model), rope_scaling=s.rope_scaling)
    # 1) the data, on every rank before any collective: documents long enough for one example (the paper keeps
    # documents of >= train_len tokens). Raw data is tokenized into the cache by one process per machine while the
    # others of the machine wait for their turn (data.prepare's lock), not in a collective with a timeout.
    corpus, error = None, None
    try:
        corpus = data.load_corpus(s.data, data.Tokenizer(s.model), min_tokens=s.seq_len)
    except (ValueError, OSError) as e:
        error = f"rank {rank}: {e}" if rank else str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        raise UsageError(next(e for e in errors if e))
    # 2) the sharded model: every rank holds storage for its shards only
    model = sharded_model(ModelConfig(**fields), device, mesh, s.precision, s.cpu_offload, s.grad_checkpointing,
                          s.compile)
    # 3) the weights, read on rank 0 only (checked: shapes, NaN/inf) while the others wait (--dist-timeout)
    expected = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}  # whole shapes (DTensor)
    state = on_rank0(lambda: hf.read_state_dict(s.model, fields, expected, torch.float32))
    # 4) the weights broadcast shard by shard (the other ranks never hold a full copy)
    set_model_state_dict(model, state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del state
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    return model, corpus


# ----------------------------------------------------------------------------------------------------------------------
# examples and schedule

def example(index, s, corpus):
    """Global example `index` of the run, (input_ids, positions): a pure function of (--seed, index)."""
    rng = pose.example_rng(s.seed, index)
    window = corpus.sample(rng, pose.window_length(s.method, s.train_len, s.target))  # data.py
    return pose.make_example(s.method, window, s.train_len, s.target, chunks=s.chunks, content=s.content, rng=rng,
                             split=s.split)


def step_examples(step, s, corpus):
    """Every example of optimizer step `step`, in order: examples are numbered step * batch + k."""
    return [example(step * s.batch_size + k, s, corpus) for k in range(s.batch_size)]


def batch_for(step, micro, rank, world, s, corpus):
    """Tokens, targets, positions (micro_batch, T) of one micro-step: process `rank` takes the examples
    k = (micro * world + rank) * micro_batch + j of the step."""
    first = step * s.batch_size + (micro * world + rank) * s.micro_batch_size
    rows = [example(first + j, s, corpus) for j in range(s.micro_batch_size)]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    positions = torch.from_numpy(np.stack([r[1] for r in rows]))
    # Next-token prediction inside the example, as the official code does (labels = input_ids, shifted by one):
    # the target of the last token of a PoSE chunk is the first token of the next chunk.
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return ids, targets, positions


def replay_windows(step, s, pool):
    """The --replay windows of optimizer step `step`, (input_ids, targets) (K, L): a function of (--seed, step)
    only, the same whatever the method (data.ReplayPool)."""
    index = pool.indices(s.seed, step, s.replay_batch)
    return pool.input_ids[index], pool.targets[index]


def adamw(model, s):
    """The run's optimizer: "AdamW with its default hyperparameters" (paper 4.1), --lr (see lr_at), --weight-decay."""
    return torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, lr, warmup, steps):
    """Linear warmup over `warmup` steps to `lr`, then linear decay towards 0 at `steps` (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (steps - step) / max(1, steps - warmup)


# ----------------------------------------------------------------------------------------------------------------------
# the loop

class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the run, with the step of its last complete checkpoint (0: none)."""

    def __init__(self, last_checkpoint):
        super().__init__(last_checkpoint)
        self.last_checkpoint = last_checkpoint


def train(s, device, mesh):
    # 1) every check of --out before anything is written, and the run's lock on it (rank 0 holds it to the end)
    claimed = on_rank0(lambda: rundir.claim(s))
    start, lock = broadcast(claimed[0] if claimed else None), claimed[1] if claimed else None
    try:
        run(s, device, mesh, start)
    finally:
        if lock:
            lock.release()


def run(s, device, mesh, start):
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print("\n".join(s.why + (budget(s),) + resume_note(s, start)), flush=True)
    # 2) the model, the data, the optimizer
    if device.type == "cuda":  # will it fit? asked before any weight goes to the GPU
        memory.check_fits(memory.plan_of(s), free_memory(device))
    model, corpus = build(s, device, mesh, rank)
    pool = data.ReplayPool(s.replay) if s.replay else None
    optimizer = adamw(model, s)
    if start.checkpoint:
        checkpoints.load(model, optimizer, start.checkpoint)
    # 3) the run directory and its records: args.json, and the log up to the checkpoint we start from
    log = rundir.create(s, start) if rank == 0 else None
    for line in settings.warnings(s) if rank == 0 else []:  # after every check: a failed start prints one line
        cli.warn(line)
    dist.barrier()
    last_checkpoint = start.step
    losses = [e["loss"] for e in start.log]
    try:
        # 4) the loop
        micro_steps = s.batch_size // (world * s.micro_batch_size)
        tokens_per_step = s.batch_size * s.seq_len
        tokens_done = start.log[-1]["tokens"] if start.log else 0
        with cli.progress(s.steps, f"{s.method} {s.train_len}->{s.target}", "step", enabled=rank == 0,
                          initial=start.step) as bar:
            for step in range(start.step, s.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, s.lr, s.warmup, s.steps)
                loss, replay_loss, grad_norm = optimizer_step(model, optimizer, lr, step, s, corpus, pool, device,
                                                              micro_steps)
                seconds = time.perf_counter() - t0
                tokens_done += tokens_per_step
                losses.append(loss)
                if rank == 0:
                    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                    entry = {"step": step + 1, "loss": round(loss, 6), "lr": lr, "tokens": tokens_done,
                             "seconds": round(seconds, 4), "grad_norm": round(grad_norm, 6),
                             "tokens_per_s": round(tokens_per_step / seconds, 1), "peak_mem_gb": round(peak, 3)}
                    if replay_loss is not None:
                        entry["replay_loss"] = round(replay_loss, 6)
                    if step == start.step and start.resumed_with:
                        entry["resumed_with"] = start.resumed_with  # what --resume changed, from this step on
                    log.append(entry)
                    if step == start.step and s.steps > step + 1:
                        bar.write(f"the first step took {seconds:.1f} s: the {s.steps - step - 1} steps left take "
                                  f"about {duration(seconds * (s.steps - step - 1))}")
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:.0f}",
                                    mem=f"{peak:.1f}G", refresh=False)
                    bar.update(1)
                if (s.save_every and (step + 1) % s.save_every == 0) or step + 1 == s.steps:  # the last: resumable
                    checkpoints.save(model, optimizer, s.out, step + 1, s.keep, rank)
                    last_checkpoint = step + 1
        # 5) the extended model, after a warning if the loss rose far above its start
        diverged = divergence(losses)
        if diverged and rank == 0:
            cli.warn(diverged)
        checkpoints.export(model, s.out, s.target, s.model, s.export_dtype, rank)
    except KeyboardInterrupt:
        raise Interrupted(last_checkpoint) from None
    # 6) rank 0's last words while the others wait, then a barrier: every rank leaves the last collective together,
    # so that no rank closes the process group while another still talks to it
    on_rank0(lambda: summary(s, checkpoints.delete(s.out) if s.delete_checkpoints else None, diverged))
    dist.barrier()


DIVERGED = 2.0  # a run diverged when its last losses average more than this times its first step's loss


def divergence(losses):
    """A one-line warning when the mean loss of the last tenth of the steps (at least one) is above DIVERGED times the
    first step's loss; None otherwise."""
    if len(losses) < 2:
        return None
    tail = losses[-max(1, len(losses) // 10):]
    last = sum(tail) / len(tail)
    if not last > DIVERGED * losses[0]:  # NaN never reaches here: a non-finite loss stops the run
        return None
    return (f"the loss rose from {losses[0]:.4g} at step 1 to {last:.4g} (the mean of the last {len(tail)} steps), "
            f"more than {DIVERGED:g}x: the run diverged; its model is exported anyway, lower --lr and train again")


def budget(s):
    """The run's token budget, one line."""
    replay = f" + {s.replay_batch} replay windows x {s.train_len}" if s.replay else ""
    return (f"budget: {s.steps} steps x {s.batch_size} examples x {s.seq_len} tokens = "
            f"{s.steps * s.batch_size * s.seq_len:,} tokens{replay}")


def resume_note(s, start):
    """What --resume does to the learning rate when it changes --steps (the decay is stretched to the new end)."""
    before = start.resumed_with.get("steps")
    if not before or start.step == 0:
        return ()
    old, new = before
    was, now = lr_at(start.step - 1, s.lr, s.warmup, old), lr_at(start.step, s.lr, s.warmup, new)
    return (f"--resume with --steps {old} -> {new}: the learning rate's decay is stretched to end at step {new}; "
            f"it was {was:.2e} at step {start.step} and is {now:.2e} at step {start.step + 1}"
            + (f" ({now / was:.0f}x higher)" if was and now > 1.5 * was else ""),)


def duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


def optimizer_step(model, optimizer, lr, step, s, corpus, pool, device, micro_steps):
    """Optimizer step `step` of the run: this rank's micro-batches of the global batch and its share of the replay
    windows (if any) through `update`; returns the method's loss and the replay's (None without one), each averaged
    over the batch, and the gradient norm."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = (batch_for(step, micro, rank, world, s, corpus) for micro in range(micro_steps))
    replay = [torch.from_numpy(a[rank::world]) for a in replay_windows(step, s, pool)] if pool else None
    loss, replay_loss, grad_norm = update(model, optimizer, lr, batches, micro_steps, replay,
                                          s.replay_weight if pool else 0.0, s.grad_clip, device)
    if not math.isfinite(loss) or not math.isfinite(replay_loss or 0.0):
        raise UsageError(f"loss is {loss} at step {step + 1}; lower --lr or check the data")
    return loss, replay_loss, grad_norm


def update(model, optimizer, lr, batches, n_batches, replay, w, grad_clip, device):
    """One optimizer step of `model` on `n_batches` micro-batches (tokens, targets, positions) and the replay windows
    (input_ids, targets) or None, minimizing (1 - w) * method loss + w * replay loss; the gradient is clipped to
    norm grad_clip (0: not clipped). Returns the method's loss, the replay's (None) and the gradient norm, the losses
    averaged over the ranks. Every rank calls it (FSDP's gradient reduction, the all-reduces)."""
    world = dist.get_world_size()
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = torch.zeros(2, device=device)  # method, replay
    for batch in batches:
        ids, targets, positions = (t.to(device) for t in batch)
        loss = model(ids, positions, targets=targets)
        # Every example has the same number of targets, so the mean of the micro-batch means is the global mean:
        # each backward() adds to the gradient, hence the division; FSDP averages over the ranks.
        (loss * (1 - w) / n_batches).backward()
        losses[0] += loss.detach() / n_batches
    if replay is not None:  # this rank's share of the step's replay windows, in one micro-step at positions 0..L-1
        ids, targets = (t.to(device) for t in replay)
        # The windows are padded (targets -100) by different amounts, so each rank's mean is over its own count of
        # targets: weighting it by count x world / global count makes FSDP's average over the ranks the mean over
        # every replay target of the step (the weight is exactly 1.0 in one process).
        count = (targets != -100).sum()
        total = count.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        share = count.item() * world / max(1, total.item())
        loss = model(ids, None, targets=targets)
        (loss * (w * share)).backward()
        losses[1] += loss.detach() * share
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(losses, op=dist.ReduceOp.SUM)  # average the logged losses over ranks
    loss, replay_loss = (losses / world).tolist()
    return loss, replay_loss if replay is not None else None, grad_norm.item()


# ----------------------------------------------------------------------------------------------------------------------
# will it fit?

def free_memory(device):
    """{device name: free bytes} of the fullest GPU of the run, the same on every rank (a collective)."""
    free = torch.tensor(torch.cuda.mem_get_info(device)[0], device=device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return {"the GPU with the least free memory" if dist.get_world_size() > 1 else str(device): free.item()}


def position_runs(positions, most=4):
    """'0-1013, 9876-10909': the runs of consecutive positions of an example."""
    cuts = np.flatnonzero(np.diff(positions) != 1) + 1
    runs = [f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in np.split(positions, cuts)]
    return ", ".join(runs) if len(runs) <= most else f"{', '.join(runs[:most - 1])}, ..., {runs[-1]} ({len(runs)} runs)"


def dry_run(s):
    """--dry-run: every setting, why the recipe and the plan-chosen defaults are what they are, the token budget, the
    first examples' positions and the memory plan. Loads no weights and writes nothing into --out; a --model holding
    only a config.json is enough (the positions are then drawn without documents)."""
    start = rundir.find_start(s)  # the run's own checks of --out
    print(f"dry run: {'resume from step ' + str(start.step) if start.checkpoint else 'a new run'} in {s.out}; "
          "nothing is loaded to a device or written")
    print("\n".join(f"  {k:<19} {v}" for k, v in dataclasses.asdict(s).items() if k != "why"))
    plan = memory.plan_of(s)
    print("\n".join(s.why + (budget(s), estimate(s, plan.params)) + resume_note(s, start)))
    for line in settings.warnings(s):
        cli.warn(line)
    if settings.config_only(s.model):
        print(f"the first examples ({s.seq_len} tokens each), their positions (drawn without documents: {s.model} has "
              "no tokenizer; a run's draws depend on its documents):")
        window = np.zeros(pose.window_length(s.method, s.train_len, s.target), dtype=np.int64)
        examples = [pose.make_example(s.method, window, s.train_len, s.target, chunks=s.chunks, content=s.content,
                                      rng=pose.example_rng(s.seed, i), split=s.split) for i in range(3)]
    else:
        corpus = data.load_corpus(s.data, data.Tokenizer(s.model), min_tokens=s.seq_len)
        print(f"the first examples ({s.seq_len} tokens each, from {corpus}), their positions:")
        examples = [example(i, s, corpus) for i in range(3)]
    print("\n".join(f"  example {i}: {position_runs(e[1])}" for i, e in enumerate(examples)))
    print(f"memory plan per process: {plan.params:,} parameters, {s.world} process{'es' * (s.world > 1)} on {s.device}, "
          f"micro-batch {s.micro_batch_size} x {s.seq_len} tokens, {s.precision}, activation checkpointing "
          f"{'on' if s.grad_checkpointing else 'off'}, CPU offload {'on' if s.cpu_offload else 'off'}\n{plan.table()}")
    if s.device != "cuda":
        return
    if s.gpu_memory:
        free = {f"a GPU of {s.gpu_memory:g} GB (--gpu-memory)": s.gpu_memory * memory.GB}
    elif torch.cuda.is_available():
        free = {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(min(s.world, torch.cuda.device_count()))}
        print("\n".join(f"{name}: {f / memory.GB:.1f} GB free" for name, f in free.items()))
    else:
        return print("no GPU here: --gpu-memory GB plans for GPUs of that memory")
    memory.check_fits(plan, free)
    print(f"fits: {plan.peak / memory.GB:.1f} GB per process")


H100_BF16 = 989e12  # FLOP/s, dense bf16 peak of an H100 SXM
MFU = 0.4  # the share of it a dry run's estimate assumes


def estimate(s, params):
    """The duration of the run of Settings s (a model of `params` parameters) at a stated rate: 6 FLOPs per parameter
    and token, plus causal attention, on CUDA at MFU of an H100's bf16 peak per GPU; on the CPU at a third of a matmul
    rate measured here (the bundled run reaches about that)."""
    cfg = ModelConfig(**hf.read_config(s.model))
    per_token = 6 * params + 6 * cfg.n_layers * s.seq_len * cfg.n_heads * cfg.head_dim  # QK and AV, fwd + bwd, causal
    flops = s.steps * (s.batch_size * s.seq_len + s.replay_batch * s.train_len) * per_token
    if s.device == "cuda":
        rate, how = s.world * MFU * H100_BF16, f"{MFU:.0%} of an H100's bf16 peak per GPU, a stated rate"
    else:
        rate, how = s.world * matmul_rate() / 3, "a third of this CPU's matmul rate, measured now"
    return f"compute: {flops:.3g} FLOPs, about {duration(flops / rate)} at {how}; the run measures its first step"


def matmul_rate(n=512, repeats=8):
    """FLOP/s of an n x n fp32 matmul on this process's threads."""
    a = torch.randn(n, n)
    a @ a
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------------

def summary(s, removed=None, diverged=None):
    """What the run left and what to run next (rank 0). removed: the checkpoints folder --delete-checkpoints removed;
    diverged: divergence's warning, repeated last."""
    if removed:
        print(f"removed {removed} (--delete-checkpoints)")
    ctxs = [s.train_len]
    while ctxs[-1] * 2 <= s.target:
        ctxs.append(ctxs[-1] * 2)
    if ctxs[-1] != s.target:  # a target that is not a power-of-two multiple of the window
        ctxs.append(s.target)
    folder = checkpoints.folder(s.out)
    # the toy's evaluation settings (README: the bundled run's table); evaluate.py's default data is the bundled plays
    toy = s.recipe == "tiny"
    ctx = " ".join(map(str, ctxs))
    lines = [f"saved the extended model to {s.out} ({checkpoints.disk_usage(s.out) / 2**20:.1f} MB"
             + (f", of which checkpoints/ {checkpoints.disk_usage(folder) / 2**20:.1f} MB: --resume continues from "
                f"them; delete them when done" if os.path.isdir(folder) else "") + ")",
             f"next: python evaluate.py --model {os.path.relpath(s.model)} --model {s.out} --ctx {ctx}"
             + (" --stride 128 --max-tokens 4096" if toy else ""),
             f"      python passkey.py --model {s.out} --lengths {ctx}" + (" --trials 100" if toy else "")]
    if s.bundled_replay_on_own_data:
        lines.append(f"note: the bundled passkey replay ({os.path.relpath(s.replay)}, {s.replay_batch} windows per "
                     f"step, weight {s.replay_weight:g}) was mixed into your --data; --replay none trains on it alone")
    if s.rope_scaling and s.rope_scaling.get("yarn_variant") == "revised":
        lines.append("note: revised YaRN (yarn_variant) is read by this project only; transformers reads it as "
                     "standard YaRN")
    if diverged:
        lines.append(f"warning: {diverged}")
    print("\n".join(lines))


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))
    s = None
    try:
        s = settings.from_command_line(argv, __doc__)
        cli.set_threads(s.threads)
        if s.dry_run:
            return dry_run(s) if rank == 0 else None
        device, mesh = setup_distributed(s.dist_timeout)
        train(s, device, mesh)
    except KeyboardInterrupt as e:
        if rank == 0:
            step = getattr(e, "last_checkpoint", 0)
            command = "the same torchrun command with --resume" if "TORCHELASTIC_RUN_ID" in os.environ else \
                shlex.join(["python", *sys.argv] + ([] if s and s.resume else ["--resume"]))
            where = f"the last complete checkpoint is step {step} in {s.out}/checkpoints; resume with: {command}" \
                if step else "no checkpoint was written yet"
            print(f"\ninterrupted: {where}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # UsageError, CheckpointError, DataError are ValueErrors
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except dist.DistError as e:  # a peer that died or hung: every rank says it, in one line
        print(f"error: rank {rank}: the process group failed ({one_line(e)})", file=sys.stderr)
        sys.exit(1)
    finally:
        if s is not None and not s.dry_run:  # only a run makes a process group
            close_process_group(rank)


def one_line(e):
    return ([line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1][:300]


def close_process_group(rank):
    """Destroy the process group, if any. After a finished run every rank has passed the final barrier, so a failure
    here loses nothing: it is one line on stderr, and the exit status stays the run's."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - whatever the backend raises while closing
        print(f"warning: rank {rank}: closing the process group failed ({one_line(e)})", file=sys.stderr)


if __name__ == "__main__":
    main()
