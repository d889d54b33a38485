"""Extend a LLaMA's context window by fine-tuning: PoSE (default) or a baseline, with FSDP2 on any number of processes.

    torchrun --nproc_per_node 8 train.py --model llama-7b --data pile.jsonl --target 16384      # 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train.py ... --target 131072 --rope yarn
    python train.py --target 2048                          # one CPU process, the bundled tiny model and books
    torchrun --nproc_per_node 2 train.py --target 2048     # two CPU processes (gloo): same batches, same weights
    python train.py --model llama-7b --target 16384 --world 8 --device cuda --dry-run   # will it fit on 8 GPUs?

Each optimizer step takes `--batch-size` examples (64, the paper's global batch): `--micro-batch-size` per process
and forward/backward, accumulated over batch / (world x micro) micro-steps. Example i of the run is a pure function
of (--seed, i) (pose.example_rng), so the run is the same whatever the number of processes, and a resumed run
continues exactly where the checkpoint left it.

Recipes (--recipe; every flag it sets can still be given):
    paper  the paper's (section 4.1) for real checkpoints: AdamW, lr 2e-5, no weight decay, 10 warmup steps then
           linear decay, 1000 steps of 64 examples, linear position interpolation, micro-batch 1
    tiny   the bundled tiny model's: 100 steps of 16 examples, lr 2e-4, YaRN, the whole per-process batch in one
           micro-step; about 3 minutes on a 2-core CPU (README, "Results at toy scale", says why YaRN)
The default is tiny for the bundled model (assets/tiny, however it is named) and paper for any other.

Methods (--method):
    pose     train_len tokens, positions in --chunks chunks with random skips, up to target (paper eq. 3-5)
    full     target tokens with plain positions: full-length fine-tuning (costly; the paper's upper bound)
    randpos  train_len tokens at train_len sorted random distinct positions below target (Ruoss et al. 2023)
    pi       train_len tokens with plain positions: position interpolation fine-tuned without skips
All apply --rope interpolation with factor target / original window ("none": no interpolation). A checkpoint that is
already extended keeps its geometry: the new scaling is its own type with the factor grown to target / its original
window (README, "Progressive extension").

Outputs in --out (created by train.py, or a run directory it made): log.jsonl (one JSON object per optimizer step:
step, loss, lr, tokens, seconds, ...), args.json, checkpoints/step_N (sharded, torch.distributed.checkpoint, every
--save-every steps and after the last; --resume continues from the latest, a finished run too), and at the end the model in Hugging Face format (config.json with rope_scaling and
max_position_embeddings = target (hf.py says why dynamic NTK differs), safetensors in the base checkpoint's dtype,
tokenizer files).

Here: setup, build, examples, the loop, export, top to bottom; settings.py resolves the frozen Settings they take,
rundir.py checks --out and writes args.json and the log, checkpoints.py saves, loads and exports, memory.py plans.
"""
import dataclasses
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
from tqdm import tqdm

import checkpoints
import cli
import data
import hf
import memory
import pose
import rundir
import settings
from cli import UsageError
from model import LLaMA, ModelConfig


# ----------------------------------------------------------------------------------------------------------------------
# distributed setup

def setup_distributed():
    """torchrun's environment, or a one-process group for `python train.py`: the same code path either way."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"  # the backend is the only difference
    try:
        if "RANK" in os.environ:  # torchrun: rendezvous through its environment variables
            dist.init_process_group(backend)
        else:  # one process: an in-memory store, no port to find or to race for
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
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

def sharded_model(cfg, device, mesh, precision="fp32", cpu_offload=False, grad_checkpointing=False):
    """The LLaMA of ModelConfig cfg in training mode, built on the meta device and sharded by FSDP2, so that no
    process holds it whole, then given uninitialized storage on `device` (build loads a checkpoint, bench.py draws
    weights). Each block is one unit (gathered just in time), then the root (embeddings, final norm, output layer);
    blocks compute in `precision`, while the master weights, the gradient reduction and the optimizer stay fp32."""
    with torch.device("meta"):
        model = LLaMA(cfg)
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else None
    kw = dict(mesh=mesh, mp_policy=mp, **({"offload_policy": offload} if offload else {}))
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.to_empty(device=device)
    model.gradient_checkpointing = grad_checkpointing
    return model.train()


def build(s, device, mesh, rank):
    """The sharded model of Settings s with its weights, and the training corpus."""
    fields = dict(hf.read_config(s.model), rope_scaling=s.rope_scaling)
    # 1) the sharded model: every rank holds storage for its shards only
    model = sharded_model(ModelConfig(**fields), device, mesh, s.precision, s.cpu_offload, s.grad_checkpointing)
    # 2) the weights, read on rank 0 only (checked: shapes, NaN/inf)
    expected = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}  # whole shapes (DTensor)
    state = on_rank0(lambda: hf.read_state_dict(s.model, fields, expected, torch.float32))
    # the data: documents long enough for one example (the paper keeps documents of >= train_len tokens); rank 0
    # tokenizes raw data into the cache first, the others then read it
    load = lambda: data.load_corpus(s.data, data.Tokenizer(s.model), min_tokens=s.seq_len)  # noqa: E731
    corpus = on_rank0(load)
    if rank != 0:
        corpus = load()
    # 3) the weights broadcast shard by shard (the other ranks never hold a full copy)
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
    rank, world = dist.get_rank(), dist.get_world_size()
    # 1) every check of --out before anything is written, then the model, the data, the optimizer
    start = broadcast(on_rank0(lambda: rundir.find_start(s)))
    if device.type == "cuda":  # will it fit? asked before any weight goes to the GPU
        memory.check_fits(memory.plan_of(s), free_memory(device))
    model, corpus = build(s, device, mesh, rank)
    pool = data.ReplayPool(s.replay) if s.replay else None
    optimizer = adamw(model, s)
    if start.checkpoint:
        checkpoints.load(model, optimizer, start.checkpoint)
    # 2) the run directory and its records: args.json, and the log up to the checkpoint we start from
    log = rundir.create(s, start) if rank == 0 else None
    for line in settings.warnings(s) if rank == 0 else []:  # after every check: a failed start prints one line
        cli.warn(line)
    dist.barrier()
    last_checkpoint = start.step
    try:
        # 3) the loop
        micro_steps = s.batch_size // (world * s.micro_batch_size)
        tokens_per_step = s.batch_size * s.seq_len
        tokens_done = start.log[-1]["tokens"] if start.log else 0
        with tqdm(total=s.steps, initial=start.step, desc=f"{s.method} {s.train_len}->{s.target}",
                  disable=rank != 0, dynamic_ncols=True) as bar:
            for step in range(start.step, s.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, s.lr, s.warmup, s.steps)
                loss, replay_loss, grad_norm = optimizer_step(model, optimizer, lr, step, s, corpus, pool, device,
                                                              micro_steps)
                seconds = time.perf_counter() - t0
                tokens_done += tokens_per_step
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
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:.0f}",
                                    mem=f"{peak:.1f}G")
                    bar.update(1)
                if (s.save_every and (step + 1) % s.save_every == 0) or step + 1 == s.steps:  # the last: resumable
                    checkpoints.save(model, optimizer, s.out, step + 1, s.keep, rank)
                    last_checkpoint = step + 1
        # 4) the extended model
        checkpoints.export(model, s.out, s.target, s.model, s.export_dtype, rank)
    except KeyboardInterrupt:
        raise Interrupted(last_checkpoint) from None
    if rank == 0:
        removed = checkpoints.delete(s.out) if s.delete_checkpoints else None
        summary(s, removed)


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
    """--dry-run: every setting, the first examples' positions and the memory plan. Loads no weights (config.json
    and the tokenizer are all it needs of --model) and writes nothing into --out."""
    start = rundir.find_start(s)  # the run's own checks of --out
    print(f"dry run: {'resume from step ' + str(start.step) if start.checkpoint else 'a new run'} in {s.out}; "
          "nothing is loaded to a device or written")
    print("\n".join(f"  {k:<19} {v}" for k, v in dataclasses.asdict(s).items()))
    for line in settings.warnings(s):
        cli.warn(line)
    corpus = data.load_corpus(s.data, data.Tokenizer(s.model), min_tokens=s.seq_len)
    print(f"the first examples ({s.seq_len} tokens each, from {corpus}), their positions:")
    print("\n".join(f"  example {i}: {position_runs(example(i, s, corpus)[1])}" for i in range(3)))
    plan = memory.plan_of(s)
    print(f"memory plan per process: {plan.params:,} parameters, {s.world} process{'es' * (s.world > 1)} on {s.device}, "
          f"micro-batch {s.micro_batch_size} x {s.seq_len} tokens, {s.precision}, activation checkpointing "
          f"{'on' if s.grad_checkpointing else 'off'}, CPU offload {'on' if s.cpu_offload else 'off'}\n{plan.table()}")
    if s.device == "cuda" and torch.cuda.is_available():
        free = {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(min(s.world, torch.cuda.device_count()))}
        print("\n".join(f"{name}: {f / memory.GB:.1f} GB free" for name, f in free.items()))
        memory.check_fits(plan, free)
        print(f"fits: {plan.peak / memory.GB:.1f} GB per process")


# ----------------------------------------------------------------------------------------------------------------------

def summary(s, removed=None):
    """What the run left and what to run next (rank 0). removed: the checkpoints folder --delete-checkpoints removed."""
    if removed:
        print(f"removed {removed} (--delete-checkpoints)")
    ctxs = [s.train_len]
    while ctxs[-1] * 2 <= s.target:
        ctxs.append(ctxs[-1] * 2)
    if ctxs[-1] != s.target:  # a target that is not a power-of-two multiple of the window
        ctxs.append(s.target)
    folder = checkpoints.folder(s.out)
    data_flag = "" if s.bundled else " --data YOUR_EVAL_DATA"
    lines = [f"saved the extended model to {s.out} ({checkpoints.disk_usage(s.out) / 2**20:.1f} MB"
             + (f", of which checkpoints/ {checkpoints.disk_usage(folder) / 2**20:.1f} MB: --resume continues from "
                f"them; delete them when done" if os.path.isdir(folder) else "") + ")",
             f"next: python evaluate.py --model {os.path.relpath(s.model)} --model {s.out}{data_flag} "
             f"--ctx {' '.join(map(str, ctxs))}",
             f"      python passkey.py --model {s.out} --lengths {' '.join(map(str, ctxs))}"]
    if s.bundled_replay_on_own_data:
        lines.append(f"note: the bundled passkey replay ({os.path.relpath(s.replay)}, {s.replay_batch} windows per "
                     f"step, weight {s.replay_weight:g}) was mixed into your --data; --replay none trains on it alone")
    if s.rope_scaling and s.rope_scaling.get("yarn_variant") == "revised":
        lines.append("note: revised YaRN (yarn_variant) is read by this project only; transformers reads it as "
                     "standard YaRN")
    print("\n".join(lines))


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))
    s = None
    try:
        s = settings.from_command_line(argv, __doc__)
        cli.set_threads(s.threads)
        if s.dry_run:
            return dry_run(s) if rank == 0 else None
        device, mesh = setup_distributed()
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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
