"""Extend a LLaMA's context window by fine-tuning: PoSE (default) or a baseline, with FSDP2 on any number of processes.

    torchrun --nproc_per_node 8 train.py --model llama-7b --data pile.jsonl --target 16384      # 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train.py ... --target 131072 --rope yarn
    python train.py --target 2048                          # one CPU process, the bundled tiny model and books
    torchrun --nproc_per_node 2 train.py --target 2048     # two CPU processes (gloo): same batches, same weights

Each optimizer step takes `--batch-size` examples (64, the paper's global batch): `--micro-batch-size` per process
and forward/backward, accumulated over batch / (world x micro) micro-steps. Example i of the run is a pure function
of (--seed, i) (pose.example_rng), so the run is the same whatever the number of processes, and a resumed run
continues exactly where the checkpoint left it. The paper's recipe is the default (section 4.1): AdamW, lr 2e-5,
no weight decay, 10 warmup steps then linear decay, 1000 steps, linear position interpolation.

Methods (--method):
    pose     train_len tokens, positions in --chunks chunks with random skips, up to target (paper eq. 3-5)
    full     target tokens with plain positions: full-length fine-tuning (costly; the paper's upper bound)
    randpos  train_len tokens at train_len sorted random distinct positions below target (Ruoss et al. 2023)
    pi       train_len tokens with plain positions: position interpolation fine-tuned without skips
All apply --rope interpolation with factor target / train_len ("none": no interpolation).

Outputs in --out: log.jsonl (one JSON object per optimizer step: step, loss, lr, tokens, seconds, ...),
checkpoints/step_N (sharded, torch.distributed.checkpoint; --resume continues from the latest), and at the end the
model in Hugging Face format (config.json with rope_scaling and max_position_embeddings = target, safetensors,
tokenizer), loadable by model.LLaMA.from_pretrained, transformers and vLLM.
"""
import argparse
import json
import logging
import math
import os
import re
import resource
import shutil
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import data
from model import CheckpointError, LLaMA, ModelConfig, Tokenizer, read_config, read_state_dict
from pose import example_rng, make_example
from rope import scaling_from_spec

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "assets", "tiny")  # the bundled tiny base model (256-token window)
DEFAULT_DATA = os.path.join(HERE, "assets", "books", "train")  # the bundled public-domain books


class UsageError(ValueError):
    """Bad command-line input or settings (a diverging run included), reported as one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"Hugging Face LLaMA directory (default: {DEFAULT_MODEL})")
    p.add_argument("--data", default=None, help="jsonl/txt file or directory, or a data.py-prepared dataset "
                                                f"(default: {DEFAULT_DATA})")
    p.add_argument("--out", default=None, help="output directory (default: out/METHOD-TARGET)")
    p.add_argument("--target", type=int, required=True, help="target context window, in tokens")
    p.add_argument("--train-len", type=int, default=None, help="training window (default: the checkpoint's "
                                                                 "max_position_embeddings)")
    p.add_argument("--method", choices=("pose", "full", "randpos", "pi"), default="pose")
    p.add_argument("--chunks", type=int, default=2, help="PoSE chunks per example (paper: 2)")
    p.add_argument("--content", choices=("uniform", "contiguous", "aligned"), default="uniform",
                   help="PoSE chunk content (paper appendix A; uniform is the paper's default)")
    p.add_argument("--split", choices=("uniform", "official"), default="uniform",
                   help="PoSE chunk lengths: a uniform random split (paper appendix code) or the official code's "
                        "(first chunk at most half the window; N <= 2)")
    p.add_argument("--rope", default=None, help="interpolation, factor target/train_len: linear (the paper's "
                   "default), ntk, yarn, yarn-revised, none (bundled model: yarn, see README)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000; bundled model: 100)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch, in examples (default 64; bundled "
                                                                   "model: 16)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="examples per process per forward/backward "
                   "(default 1; bundled model: the whole per-process batch)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5; bundled model: 2e-4)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off; HF Trainer's default, "
                                                                "which the official code used, is 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="compute dtype (default: bf16 on CUDA, fp32 on CPU); master weights and reductions are fp32")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (default: on for CUDA)")
    p.add_argument("--cpu-offload", action="store_true", help="keep sharded parameters, gradients and optimizer "
                                                               "state in CPU memory (FSDP2 CPUOffloadPolicy)")
    p.add_argument("--init", default=None, metavar="CONFIG_JSON", help="pretrain from scratch: a config.json for a "
                   "fresh, randomly initialized model (with --tokenizer) instead of --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model for --init")
    return p.parse_args(argv)


PAPER_RECIPE = {"steps": 1000, "batch_size": 64, "lr": 2e-5, "rope": "linear"}  # section 4.1, for LLaMA-7B
# The bundled tiny model's recipe: about a minute on a 2-core CPU. A 4M-parameter model needs a larger step size, and
# linear interpolation breaks its copying (passkey 0 at every length; README, "Results at toy scale"), YaRN does not.
TINY_RECIPE = {"steps": 100, "batch_size": 16, "lr": 2e-4, "rope": "yarn"}


def check_args(args, world):
    recipe = TINY_RECIPE if args.model is None and args.init is None else PAPER_RECIPE
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.micro_batch_size is None:
        args.micro_batch_size = max(1, args.batch_size // world) if recipe is TINY_RECIPE else 1
    if args.target <= 0:
        raise UsageError(f"--target must be positive, got {args.target}")
    if args.train_len is not None and args.train_len > args.target:
        raise UsageError(f"--target {args.target} is below --train-len {args.train_len}: nothing to extend")
    if args.steps <= 0 or args.batch_size <= 0 or args.micro_batch_size <= 0:
        raise UsageError("--steps, --batch-size and --micro-batch-size must be positive")
    if args.batch_size % (world * args.micro_batch_size):
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by world size {world} x "
                         f"--micro-batch-size {args.micro_batch_size}")
    if args.chunks < 1:
        raise UsageError(f"--chunks must be at least 1, got {args.chunks}")
    if args.init and args.model:
        raise UsageError("give --model or --init, not both")


# ----------------------------------------------------------------------------------------------------------------------
# distributed setup

def setup_distributed():
    """torchrun's environment, or a one-process group for `python train.py`: the same code path either way."""
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the single-process rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # the backend is the only difference
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return device, mesh


def on_rank0(fn):
    """fn() on rank 0 only; an error there becomes the same error on every rank (instead of the others hanging in
    the next collective). Returns fn's result on rank 0, None elsewhere."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except (UsageError, CheckpointError, data.DataError, FileNotFoundError) as e:
            error = [type(e).__name__, str(e)]
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise UsageError(shared[0][1])
    return result


def shard_model(model, mesh, args, device):
    """FSDP2: each transformer block is one unit (its parameters gathered just in time), then the root (embeddings,
    final norm, output layer). On CUDA, blocks compute in bf16 while the sharded master weights, the gradient
    reduction and the optimizer stay fp32."""
    compute = torch.bfloat16 if args.precision == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if args.cpu_offload else None
    kw = dict(mesh=mesh, mp_policy=mp, **({"offload_policy": offload} if offload else {}))
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# examples

def batch_for(step, micro, rank, world, args, corpus, train_len):
    """Tokens, targets, positions (micro_batch, T) of one micro-step: global examples are numbered
    step * batch + k, and process `rank` takes k = (micro * world + rank) * micro_batch + j."""
    rows = []
    for j in range(args.micro_batch_size):
        index = step * args.batch_size + (micro * world + rank) * args.micro_batch_size + j
        rng = example_rng(args.seed, index)
        doc = corpus.sample_doc(rng)
        rows.append(make_example(args.method, doc, train_len, args.target, chunks=args.chunks, content=args.content,
                                 rng=rng, split=args.split))
    ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    positions = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
    # Next-token prediction inside the example, as the official code does (labels = input_ids, shifted by one):
    # the target of the last token of a PoSE chunk is the first token of the next chunk.
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return ids, targets, positions


def lr_at(step, args):
    """Linear warmup over --warmup steps, then linear decay towards 0 at --steps (step counts from 0)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (args.steps - step) / max(1, args.steps - args.warmup)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints

def latest_checkpoint(out):
    root = os.path.join(out, "checkpoints")
    steps = sorted(int(m.group(1)) for d in (os.listdir(root) if os.path.isdir(root) else [])
                   if (m := re.fullmatch(r"step_(\d+)", d)) and os.path.isfile(os.path.join(root, d, "done.json")))
    return (steps[-1], os.path.join(root, f"step_{steps[-1]:06d}")) if steps else (0, None)


def save_checkpoint(model, optimizer, step, args, rank):
    """Sharded save (each process writes its shards) into step_N.tmp, renamed to step_N once complete: a kill at any
    moment leaves either the previous checkpoints or the new one, never a half-written one that looks valid."""
    root = os.path.join(args.out, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "done.json"), "w") as f:
            json.dump({"step": step}, f)
        os.replace(tmp, final)
        for old in sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d))[:-args.keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()


def load_checkpoint(model, optimizer, path):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    logging.disable(logging.CRITICAL)  # DCP logs tracebacks of what it tries first; we report one line instead
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        reason = ([line for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1]
        raise CheckpointError(f"{path}: cannot load checkpoint ({reason.strip()[:300]})") from None
    finally:
        logging.disable(logging.NOTSET)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_log(path, upto):
    """log.jsonl entries of steps <= upto (a killed run may have logged past its last checkpoint)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [e for e in map(json.loads, f) if e["step"] <= upto]


# ----------------------------------------------------------------------------------------------------------------------

def build(args, device, mesh, rank):
    """The sharded model with its weights, and the training corpus."""
    if args.init:
        try:
            with open(args.init) as f:
                cfg = ModelConfig.from_hf(json.load(f), where=args.init)
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--init {args.init}: {e}") from None
        if not args.tokenizer:
            raise UsageError("--init needs --tokenizer")
        tokenizer_path = args.tokenizer
    else:
        args.model = args.model or DEFAULT_MODEL
        cfg = read_config(args.model)
        tokenizer_path = args.model
    if args.train_len is None:
        args.train_len = cfg.max_position_embeddings
    if args.train_len > args.target:
        raise UsageError(f"--target {args.target} is below the training length {args.train_len}: nothing to extend")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    cfg.rope_scaling = scaling_from_spec(args.rope, args.train_len, factor=args.target / args.train_len)

    # data: documents long enough for one example (the paper keeps documents of >= train_len tokens)
    need = args.target if args.method == "full" else args.train_len
    data_path = args.data or DEFAULT_DATA
    # rank 0 tokenizes raw data into the cache first, the others then read it
    corpus = on_rank0(lambda: data.load_corpus(data_path, tokenizer, min_tokens=need))
    if rank != 0:
        corpus = data.load_corpus(data_path, tokenizer, min_tokens=need)

    # 1) the model skeleton on the meta device: no memory, no init cost
    with torch.device("meta"):
        model = LLaMA(cfg)
    model.source = args.model
    # 2) shard it, then give every rank storage for its shards only
    state = None if args.init else on_rank0(lambda: read_state_dict(args.model, model, torch.float32))
    shard_model(model, mesh, args, device)
    model.to_empty(device=device)
    # 3) weights: read on rank 0 only and broadcast shard by shard (the other ranks never hold a full copy), or a
    #    fresh init for --init (same seed on every rank, so the shards agree)
    if args.init:
        torch.manual_seed(args.seed)
        model.init_weights()
    else:
        set_model_state_dict(model, state or {}, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
        del state
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    return model, corpus, tokenizer_path


def export(model, args, rank, tokenizer_path):
    """The final model in Hugging Face format. Gathering the full state dict is a collective: every rank calls it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.cfg.max_position_embeddings = args.target
        model.source = os.path.dirname(os.path.abspath(tokenizer_path)) if tokenizer_path.endswith(".model") \
            else tokenizer_path
        model.save_pretrained(args.out, state_dict=state)
    dist.barrier()


def train(args):
    device, mesh = setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    check_args(args, world)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.grad_checkpointing is None:
        args.grad_checkpointing = device.type == "cuda"
    model, corpus, tokenizer_path = build(args, device, mesh, rank)
    args.out = args.out or os.path.join("out", f"{args.method}-{args.target}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)  # "AdamW with its default hyperparameters"

    start, log = 0, []
    log_path = os.path.join(args.out, "log.jsonl")
    if args.resume:
        start, path = latest_checkpoint(args.out)
        if path:
            load_checkpoint(model, optimizer, path)
            log = read_log(log_path, start)
        elif rank == 0:
            print(f"--resume: no checkpoint in {args.out}, starting from scratch", file=sys.stderr)
    else:
        def fresh_out():
            if os.path.exists(log_path):
                raise UsageError(f"{args.out} already holds a run; use --resume to continue it or another --out")
        on_rank0(fresh_out)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        with open(log_path + ".tmp", "w") as f:  # rewrite the log up to the checkpoint we resume from
            f.writelines(json.dumps(e) + "\n" for e in log)
        os.replace(log_path + ".tmp", log_path)
    dist.barrier()

    micro_steps = args.batch_size // (world * args.micro_batch_size)
    tokens_per_step = args.batch_size * (args.target if args.method == "full" else args.train_len)
    tokens_done = log[-1]["tokens"] if log else 0
    bar = tqdm(total=args.steps, initial=start, desc=f"{args.method} {args.train_len}->{args.target}",
               disable=rank != 0, dynamic_ncols=True)
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(micro_steps):
            ids, targets, positions = (t.to(device) for t in batch_for(step, micro, rank, world, args, corpus,
                                                                       args.train_len))
            loss = model(ids, positions, targets=targets)
            # Every example has the same number of targets, so the mean of the micro-batch means is the global mean:
            # each backward() adds to the gradient, hence the division; FSDP averages over the ranks.
            (loss / micro_steps).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)  # average the logged loss over ranks
        loss_value = loss_sum.item() / (micro_steps * world)
        if not math.isfinite(loss_value):
            raise UsageError(f"loss is {loss_value} at step {step + 1}; lower --lr or check the data")
        seconds = time.perf_counter() - t0
        tokens_done += tokens_per_step
        if rank == 0:
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            entry = {"step": step + 1, "loss": round(loss_value, 6), "lr": lr, "tokens": tokens_done,
                     "seconds": round(seconds, 4), "grad_norm": round(grad_norm.item(), 6),
                     "tokens_per_s": round(tokens_per_step / seconds, 1), "peak_mem_gb": round(peak, 3)}
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:.0f}",
                            mem=f"{peak:.1f}G")
            bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(model, optimizer, step + 1, args, rank)
    bar.close()
    export(model, args, rank, tokenizer_path)
    if rank == 0:
        ctxs = [args.train_len]
        while ctxs[-1] * 2 <= args.target:
            ctxs.append(ctxs[-1] * 2)
        data_flag = "" if args.model == DEFAULT_MODEL else " --data YOUR_EVAL_DATA"
        base = "" if args.init else f" --model {os.path.relpath(args.model)}"
        print(f"saved the extended model to {args.out}\nnext: python evaluate.py{base} --model {args.out}{data_flag} "
              f"--ctx {' '.join(map(str, ctxs))}\n      python passkey.py --model {args.out} "
              f"--lengths {' '.join(map(str, ctxs))}")


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, CheckpointError, data.DataError, FileNotFoundError, ValueError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
