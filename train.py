"""Extend a LLaMA's context window by fine-tuning: PoSE (default) or a baseline, with FSDP2 on any number of processes.

    torchrun --nproc_per_node 8 train.py --model llama-7b --data pile.jsonl --target 16384      # 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train.py ... --target 131072 --rope yarn
    python train.py --target 2048                          # one CPU process, the bundled tiny model and books
    torchrun --nproc_per_node 2 train.py --target 2048     # two CPU processes (gloo): same batches, same weights

Each optimizer step takes `--batch-size` examples (64, the paper's global batch): `--micro-batch-size` per process
and forward/backward, accumulated over batch / (world x micro) micro-steps. Example i of the run is a pure function
of (--seed, i) (pose.example_rng), so the run is the same whatever the number of processes, and a resumed run
continues exactly where the checkpoint left it.

Recipes (--recipe; every flag it sets can still be given):
    paper  the paper's (section 4.1) for real checkpoints: AdamW, lr 2e-5, no weight decay, 10 warmup steps then
           linear decay, 1000 steps of 64 examples, linear position interpolation, micro-batch 1
    tiny   the bundled tiny model's: 100 steps of 16 examples, lr 2e-4, YaRN, the whole per-process batch in one
           micro-step; about a minute on a 2-core CPU (README, "Results at toy scale", says why YaRN)
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
step, loss, lr, tokens, seconds, ...), args.json, checkpoints/step_N (sharded, torch.distributed.checkpoint; --resume
continues from the latest), and at the end the model in Hugging Face format (config.json with rope_scaling and
max_position_embeddings = target (hf.py says why dynamic NTK differs), safetensors in the base checkpoint's dtype,
tokenizer files).
"""
import argparse
import json
import logging
import math
import os
import re
import resource
import shlex
import shutil
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

import cli
import data
import hf
import pose
from cli import UsageError
from model import LLaMA, ModelConfig
from rope import describe_rope, original_window, rope_kind, scaling_from_spec

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_MODEL = os.path.join(HERE, "assets", "tiny")  # the bundled tiny base model (256-token window)
BUNDLED_DATA = os.path.join(HERE, "assets", "books", "train")  # the bundled public-domain books
BUNDLED_REPLAY = os.path.join(HERE, "assets", "replay", "passkey-256.npz")  # synthetic passkey episodes
RUN_MARKER = ".pose-run"  # written first into every --out that train.py makes: only such folders are written into

RECIPES = {
    # section 4.1, LLaMA-7B
    "paper": dict(steps=1000, batch_size=64, lr=2e-5, rope="linear", micro_batch_size=1, replay="none",
                  replay_batch=0),
    # the toy reproduction's (results/toy/DESIGN.md): 4M parameters need a larger step size; YaRN with the fast bound
    # at LLaMA's 64-token wavelength; the base learned retrieval from synthetic episodes, which it replays
    "tiny": dict(steps=100, batch_size=16, lr=2e-4, rope="yarn,beta_fast=4,beta_slow=1", micro_batch_size=None,
                 replay=BUNDLED_REPLAY, replay_batch=4),  # micro-batch None: batch / world
}
# What --resume may change (anything else would change the examples, the model or the schedule of the run)
RESUMABLE = ("save_every", "keep", "steps", "micro_batch_size", "grad_checkpointing", "cpu_offload",
             "delete_checkpoints", "export_dtype", "resume")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[2:5]))
    p.add_argument("--model", default=None, help=f"Hugging Face LLaMA directory (default: the bundled tiny base, "
                                                 f"{os.path.relpath(BUNDLED_MODEL)})")
    p.add_argument("--data", default=None, help="jsonl/txt file or directory, or a data.py-prepared dataset "
                                                f"(default: the bundled books, {os.path.relpath(BUNDLED_DATA)})")
    p.add_argument("--out", default=None, help="output directory (default: out/METHOD-TARGET)")
    p.add_argument("--target", type=int, required=True, help="target context window, in tokens")
    p.add_argument("--train-len", type=int, default=None,
                   help="training window (default: the checkpoint's max_position_embeddings)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="default values of --steps, --batch-size, --lr, --rope, --micro-batch-size (see above; "
                        "default: tiny for the bundled model, paper otherwise)")
    p.add_argument("--method", choices=pose.METHODS, default="pose",
                   help="pose (default), full, randpos or pi: see Methods above")
    p.add_argument("--chunks", type=int, default=2, help="PoSE chunks per example (default 2, as the paper)")
    p.add_argument("--content", choices=pose.CONTENTS, default="uniform",
                   help="PoSE chunk content (paper appendix A): uniform (default, the paper's), contiguous, aligned")
    p.add_argument("--split", choices=pose.SPLITS, default="uniform",
                   help="PoSE chunk lengths: uniform (default, a uniform random split as the paper's appendix code) "
                        "or official (the official code's: first chunk at most half the window; chunks <= 2)")
    p.add_argument("--rope", default=None, help="interpolation, factor target / original window: linear (paper "
                   "recipe), ntk, yarn (tiny recipe), yarn-revised, dynamic, llama3, none; an extended checkpoint "
                   "keeps its own type")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (recipe: paper 1000, tiny 100); may grow "
                                                           "on --resume, which stretches the decay to the new end")
    p.add_argument("--batch-size", type=int, default=None, help="global batch in examples (recipe: paper 64, tiny 16)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="examples per process per forward/backward "
                   "(recipe: paper 1, tiny the whole per-process batch)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (recipe: paper 2e-5, tiny 2e-4)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps (default 10)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default 1.0, HF Trainer's, "
                                                                "which the official code used; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and of the replay draw (default 0)")
    p.add_argument("--replay", default=None, metavar="POOL", help="a pool of windows (.npz: input_ids, targets) read "
                   "beside the method's examples at positions 0..train_len-1, the same for every method (recipe: "
                   "tiny the bundled passkey episodes, paper none)")
    p.add_argument("--replay-batch", type=int, default=None, help="replay windows per step (recipe: tiny 4)")
    p.add_argument("--replay-weight", type=float, default=None, help="weight w of the replay loss: the step "
                   "minimizes (1 - w) method loss + w replay loss (default: replay / (batch + replay))")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100; 0: only "
                                                               "the final export)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk, the newest (default 2)")
    p.add_argument("--delete-checkpoints", action="store_true",
                   help="remove the checkpoints after a successful export (default: keep them, for --resume)")
    p.add_argument("--export-dtype", choices=("auto",) + cli.DTYPES, default="auto",
                   help="dtype of the exported weights (default auto: the base checkpoint's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint; "
                   f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE[:-1])} may differ")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="compute dtype (default: bf16 on CUDA, fp32 on CPU); master weights and reductions are fp32")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (default: on for CUDA)")
    p.add_argument("--cpu-offload", action="store_true", help="keep sharded parameters, gradients and optimizer "
                                                               "state in CPU memory (FSDP2 CPUOffloadPolicy)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# every default and every check, in one place, before anything is written

def resolve_args(args, world, device):
    """Fill every default of `args` and check every setting; raises UsageError (or CheckpointError/DataError) with one
    line. Reads config.json and the tokenizer, nothing else: no output exists yet."""
    args.model = args.model or BUNDLED_MODEL
    args.data = args.data or BUNDLED_DATA
    fields = hf.read_config(args.model)  # CheckpointError on a bad directory
    tokenizer = data.Tokenizer(args.model)
    if tokenizer.vocab_size > fields["vocab_size"]:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {fields['vocab_size']}")
    bundled = os.path.realpath(args.model) == os.path.realpath(BUNDLED_MODEL)
    args.recipe = args.recipe or ("tiny" if bundled else "paper")
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None and key != "rope":  # rope: extended_scaling, below
            setattr(args, key, value)
    if args.micro_batch_size is None:
        args.micro_batch_size = max(1, args.batch_size // world)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.grad_checkpointing is None:
        args.grad_checkpointing = device.type == "cuda"
    args.train_len = args.train_len or fields["max_position_embeddings"]
    args.out = args.out or os.path.join("out", f"{args.method}-{args.target}")

    for flag, minimum in (("target", 1), ("train_len", 1), ("steps", 1), ("batch_size", 1), ("micro_batch_size", 1),
                          ("chunks", 1), ("keep", 1), ("save_every", 0), ("warmup", 0), ("seed", 0)):
        cli.positive(f"--{flag.replace('_', '-')}", getattr(args, flag), minimum)
    for flag in ("lr", "grad_clip", "weight_decay"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (flag == "lr" and value == 0):
            raise UsageError(f"--{flag.replace('_', '-')} must be {'> 0' if flag == 'lr' else '>= 0'}, got {value}")
    if args.target < args.train_len:
        raise UsageError(f"--target {args.target} is below the training length {args.train_len}: nothing to extend")
    if args.method == "pose" and args.chunks > args.train_len:
        raise UsageError(f"--chunks {args.chunks} is more than --train-len {args.train_len}: every chunk holds at "
                         "least one token")
    if args.method == "pose" and args.split == "official" and args.chunks > 2:
        raise UsageError(f"--split official is defined for --chunks 1 or 2 (the official code's), got {args.chunks}")
    if args.batch_size % (world * args.micro_batch_size):
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by world size {world} x "
                         f"--micro-batch-size {args.micro_batch_size}")
    check_replay(args, world)
    args.rope_scaling = extended_scaling(fields, args.rope, RECIPES[args.recipe]["rope"], args.train_len, args.target)
    args.rope = args.rope or (rope_kind(describe_rope(args.rope_scaling)) if fields["rope_scaling"] else
                              RECIPES[args.recipe]["rope"])
    return args


def check_replay(args, world):
    """--replay none or a pool whose windows are --train-len long, with 1 <= --replay-batch <= its size."""
    if args.replay in (None, "none") or args.replay_batch == 0:
        if args.replay not in (None, "none") or args.replay_batch:
            raise UsageError("--replay and --replay-batch go together (--replay none: no replay)")
        args.replay, args.replay_batch, args.replay_weight = None, 0, 0.0
        return
    pool = data.ReplayPool(args.replay)
    if pool.window != args.train_len:
        raise UsageError(f"--replay {args.replay} holds windows of {pool.window} tokens, not --train-len "
                         f"{args.train_len}")
    if not 1 <= args.replay_batch <= len(pool) or args.replay_batch % world:
        raise UsageError(f"--replay-batch must be in 1..{len(pool)} and a multiple of the world size {world}, got "
                         f"{args.replay_batch}")
    if args.replay_weight is None:
        args.replay_weight = args.replay_batch / (args.batch_size + args.replay_batch)
    if not 0 <= args.replay_weight < 1:
        raise UsageError(f"--replay-weight must be in [0, 1), got {args.replay_weight}")
    args.replay = os.path.abspath(args.replay)


def extended_scaling(fields, spec, recipe_spec, train_len, target):
    """The rope_scaling of the extended model.

    A plain checkpoint gets `spec` (default: the recipe's) with factor target / train_len over train_len. A checkpoint
    that is already extended (scaling of factor f over an original window o) keeps its type and every setting, and
    its factor grows to target / o: yarn x8 over 256, extended to 4096, becomes yarn x16 over 256, so positions keep
    the angles the checkpoint was trained with. Another type cannot compose with it: refused."""
    own = fields["rope_scaling"]
    if own is None:
        try:
            return scaling_from_spec(spec or recipe_spec, train_len, factor=target / train_len)
        except ValueError as e:
            raise UsageError(f"--rope: {e}") from None
    original = original_window(own, fields["max_position_embeddings"])
    composed = dict(own, factor=target / original)
    wanted = scaling_from_spec(spec, original, factor=target / original) if spec else composed
    if wanted is None or any(composed.get(k) != v for k, v in wanted.items()):
        raise UsageError(f"the checkpoint is already extended with {describe_rope(own)} over {original} tokens: "
                         f"--rope {spec} cannot compose with it; leave --rope out to continue with "
                         f"{rope_kind(describe_rope(own))}")
    if target < original * float(own["factor"]):
        raise UsageError(f"--target {target} is below the {int(original * float(own['factor']))} tokens the "
                         f"checkpoint already supports ({describe_rope(own)} over {original})")
    return composed


def check_out(args):
    """Check --out before anything is written. A fresh run needs a new or empty folder, or a run directory with
    nothing of value in it (an earlier attempt that failed before its first checkpoint); --resume needs a run
    directory whose args.json matches. Returns the checkpoint step to resume from, its path, the log up to it and
    what --resume changed."""
    out = args.out
    if os.path.realpath(out) == os.path.realpath(args.model):
        raise UsageError(f"--out {out} is the --model directory: refusing to write over the base model")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out))
    writable = os.access(out, os.W_OK | os.X_OK) if os.path.isdir(out) else (
        os.access(nearest_existing(parent), os.W_OK | os.X_OK))
    if not writable:
        raise UsageError(f"--out {out} is not writable")
    ours = os.path.isfile(os.path.join(out, RUN_MARKER))
    if os.path.isdir(out) and os.listdir(out) and not ours:
        raise UsageError(f"--out {out} is not empty and was not made by train.py: refusing to write into it")
    start, path = latest_checkpoint(out) if ours else (0, None)
    changed = {}
    if args.resume:
        if not path:
            raise UsageError(f"--resume: no checkpoint in {out}; run without --resume to start")
        changed = check_resume(args, os.path.join(out, "args.json"), start)
    elif ours and (path or os.path.isfile(os.path.join(out, "config.json"))):
        raise UsageError(f"{out} already holds a run; use --resume to continue it or another --out")
    log = read_log(os.path.join(out, "log.jsonl"), start) if path else []
    return start, path, log, changed


def make_run_dir(out):
    """--out as a run directory: the marker first, and no temporary file left by a killed command."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RUN_MARKER), "w") as f:
        f.write("made by train.py: it writes only into such directories\n")
    remove_temporary_files(out)


def nearest_existing(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_resume(args, args_path, start):
    """--resume continues the same run: every argument outside RESUMABLE must equal args.json's."""
    try:
        with open(args_path) as f:
            before = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--resume: cannot read {args_path} ({e})") from None
    now = run_args(args)
    derived = ("out", "rope_scaling")  # rope_scaling follows from --model, --rope, --train-len and --target
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE + derived and before.get(k) != now[k]]
    if changed:
        raise UsageError(f"--resume: these would change the run, refused: {'; '.join(changed)}")
    if args.steps < start:
        raise UsageError(f"--resume: --steps {args.steps} is below the checkpoint's step {start}")
    return {k: [before.get(k), now[k]] for k in RESUMABLE if k != "resume" and before.get(k) != now[k]}


def run_args(args):
    """The resolved arguments as args.json records them (paths absolute, so a resume from elsewhere compares)."""
    out = {k: v for k, v in vars(args).items() if k not in ("resumed_with", "last_checkpoint")}
    for k in ("model", "data", "out"):
        out[k] = os.path.abspath(out[k])
    return json.loads(json.dumps(out))  # tuples -> lists, as read back


def remove_temporary_files(out):
    for root, dirs, files in os.walk(out):
        for name in files:
            if re.search(r"\.tmp(\.|$)|\.tmp\d+$", name):
                os.remove(os.path.join(root, name))
        for name in [d for d in dirs if d.endswith(".tmp")]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)


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


def build(args, device, mesh, rank):
    """The sharded model with its weights, and the training corpus."""
    fields = hf.read_config(args.model)
    fields["rope_scaling"] = args.rope_scaling
    # 1) the model skeleton on the meta device: no memory, no init cost
    with torch.device("meta"):
        model = LLaMA(ModelConfig(**fields))
    # 2) the weights, read on rank 0 only (checked: shapes, NaN/inf)
    expected = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
    state = on_rank0(lambda: hf.read_state_dict(args.model, fields, expected, torch.float32))
    # the data: documents long enough for one example (the paper keeps documents of >= train_len tokens); rank 0
    # tokenizes raw data into the cache first, the others then read it
    need = args.target if args.method == "full" else args.train_len
    load = lambda: data.load_corpus(args.data, data.Tokenizer(args.model), min_tokens=need)  # noqa: E731
    corpus = on_rank0(load)
    if rank != 0:
        corpus = load()
    # 3) shard the skeleton, give every rank storage for its shards only, then broadcast the weights shard by shard
    #    (the other ranks never hold a full copy)
    shard_model(model, mesh, args, device)
    model.to_empty(device=device)
    set_model_state_dict(model, state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del state
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    return model, corpus


# ----------------------------------------------------------------------------------------------------------------------
# examples and schedule

def example(index, args, corpus):
    """Global example `index` of the run, (input_ids, positions): a pure function of (--seed, index)."""
    rng = pose.example_rng(args.seed, index)
    window = corpus.sample(rng, pose.window_length(args.method, args.train_len, args.target))  # data.py
    return pose.make_example(args.method, window, args.train_len, args.target, chunks=args.chunks,
                             content=args.content, rng=rng, split=args.split)


def step_examples(step, args, corpus):
    """Every example of optimizer step `step`, in order: examples are numbered step * batch + k."""
    return [example(step * args.batch_size + k, args, corpus) for k in range(args.batch_size)]


def batch_for(step, micro, rank, world, args, corpus):
    """Tokens, targets, positions (micro_batch, T) of one micro-step: process `rank` takes the examples
    k = (micro * world + rank) * micro_batch + j of the step."""
    first = step * args.batch_size + (micro * world + rank) * args.micro_batch_size
    rows = [example(first + j, args, corpus) for j in range(args.micro_batch_size)]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    positions = torch.from_numpy(np.stack([r[1] for r in rows]))
    # Next-token prediction inside the example, as the official code does (labels = input_ids, shifted by one):
    # the target of the last token of a PoSE chunk is the first token of the next chunk.
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return ids, targets, positions


def replay_windows(step, args, pool):
    """The --replay windows of optimizer step `step`, (input_ids, targets) (K, L): a function of (--seed, step)
    only, the same whatever the method (data.ReplayPool)."""
    index = pool.indices(args.seed, step, args.replay_batch)
    return pool.input_ids[index], pool.targets[index]


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
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    except dcp.api.CheckpointException as e:  # DCP wraps every failure, Ctrl-C included: unwrap that one
        if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
            raise KeyboardInterrupt from None
        reason = "; ".join(f"{type(exc).__name__}: {exc}" for exc, _ in e.failures.values())
        raise OSError(f"cannot save checkpoint {tmp} ({reason[:300]})") from None
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
        raise hf.CheckpointError(f"{path}: cannot load checkpoint ({reason.strip()[:300]})") from None
    finally:
        logging.disable(logging.NOTSET)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_log(path, upto):
    """log.jsonl entries of steps <= upto (a killed run may have logged past its last checkpoint)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [e for e in map(json.loads, f) if e["step"] <= upto]


def export(model, args, rank):
    """The final model in Hugging Face format. Gathering the full state dict is a collective: every rank calls it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        dtype = hf.stored_dtype(hf.read_config(args.model)) if args.export_dtype == "auto" else \
            cli.torch_dtype(args.export_dtype, "cpu")
        model.cfg.max_position_embeddings = args.target
        model.save_pretrained(args.out, state_dict={k: v.to(dtype) for k, v in state.items()},
                              tokenizer_dir=args.model)
    dist.barrier()


def disk_usage(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------------------------------------------------

def train(args, device, mesh):
    rank, world = dist.get_rank(), dist.get_world_size()
    # 1) every check that can fail on bad input, before anything is written
    resolve_args(args, world, device)
    start, checkpoint_path, log, args.resumed_with = broadcast(on_rank0(lambda: check_out(args)))
    model, corpus = build(args, device, mesh, rank)
    pool = data.ReplayPool(args.replay) if args.replay else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)  # "AdamW with its default hyperparameters"
    if checkpoint_path:
        load_checkpoint(model, optimizer, checkpoint_path)
    # 2) the run directory and its records: args.json, and the log up to the checkpoint we start from
    log_path = os.path.join(args.out, "log.jsonl")
    if rank == 0:
        make_run_dir(args.out)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(run_args(args), f, indent=2)
        with open(log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in log)
        os.replace(log_path + ".tmp", log_path)
    dist.barrier()
    args.last_checkpoint = start

    # 3) the loop
    micro_steps = args.batch_size // (world * args.micro_batch_size)
    tokens_per_step = args.batch_size * (args.target if args.method == "full" else args.train_len)
    tokens_done = log[-1]["tokens"] if log else 0
    with tqdm(total=args.steps, initial=start, desc=f"{args.method} {args.train_len}->{args.target}",
              disable=rank != 0, dynamic_ncols=True) as bar:
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, args)
            loss, replay_loss, grad_norm = optimizer_step(model, optimizer, lr, step, args, corpus, pool, device,
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
                if step == start and args.resumed_with:
                    entry["resumed_with"] = args.resumed_with  # what --resume changed, from the step it resumed at
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:.0f}",
                                mem=f"{peak:.1f}G")
                bar.update(1)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save_checkpoint(model, optimizer, step + 1, args, rank)
                args.last_checkpoint = step + 1

    # 4) the extended model, and what is left on disk
    export(model, args, rank)
    if rank == 0:
        summary(args)


def optimizer_step(model, optimizer, lr, step, args, corpus, pool, device, micro_steps):
    """One optimizer step over the global batch (and the replay windows, if any); returns the method's loss and the
    replay's (None without one), each averaged over the batch, and the gradient norm.

    The step minimizes (1 - w) * method loss + w * replay loss, w = --replay-weight (0 without replay)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for group in optimizer.param_groups:
        group["lr"] = lr
    w = args.replay_weight if pool else 0.0
    losses = torch.zeros(2, device=device)  # method, replay
    for micro in range(micro_steps):
        ids, targets, positions = (t.to(device) for t in batch_for(step, micro, rank, world, args, corpus))
        loss = model(ids, positions, targets=targets)
        # Every example has the same number of targets, so the mean of the micro-batch means is the global mean:
        # each backward() adds to the gradient, hence the division; FSDP averages over the ranks.
        (loss * (1 - w) / micro_steps).backward()
        losses[0] += loss.detach() / micro_steps
    if pool:  # this rank's share of the step's replay windows, in one micro-step at positions 0..L-1
        ids, targets = (torch.from_numpy(a[rank::world]).to(device) for a in replay_windows(step, args, pool))
        loss = model(ids, None, targets=targets)
        (loss * w).backward()
        losses[1] += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(losses, op=dist.ReduceOp.SUM)  # average the logged losses over ranks
    loss, replay_loss = (losses / world).tolist()
    if not math.isfinite(loss) or not math.isfinite(replay_loss):
        raise UsageError(f"loss is {loss} at step {step + 1}; lower --lr or check the data")
    return loss, replay_loss if pool else None, grad_norm.item()


def broadcast(obj):
    shared = [obj]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def summary(args):
    checkpoints = os.path.join(args.out, "checkpoints")
    if os.path.isdir(checkpoints) and args.delete_checkpoints:
        shutil.rmtree(checkpoints)
        print(f"removed {checkpoints} (--delete-checkpoints)")
    ctxs = [args.train_len]
    while ctxs[-1] * 2 <= args.target:
        ctxs.append(ctxs[-1] * 2)
    bundled = os.path.realpath(args.model) == os.path.realpath(BUNDLED_MODEL)
    data_flag = "" if bundled else " --data YOUR_EVAL_DATA"
    lines = [f"saved the extended model to {args.out} ({disk_usage(args.out) / 2**20:.1f} MB"
             + (f", of which checkpoints/ {disk_usage(checkpoints) / 2**20:.1f} MB: --resume continues from them; "
                f"delete them when done" if os.path.isdir(checkpoints) else "") + ")",
             f"next: python evaluate.py --model {os.path.relpath(args.model)} --model {args.out}{data_flag} "
             f"--ctx {' '.join(map(str, ctxs))}",
             f"      python passkey.py --model {args.out} --lengths {' '.join(map(str, ctxs))}"]
    if args.rope_scaling and args.rope_scaling.get("yarn_variant") == "revised":
        lines.append("note: revised YaRN (yarn_variant) is read by this project only; transformers reads it as "
                     "standard YaRN")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        device, mesh = setup_distributed()
        train(args, device, mesh)
    except KeyboardInterrupt:
        if rank == 0:
            step = getattr(args, "last_checkpoint", 0)
            command = "the same torchrun command with --resume" if "TORCHELASTIC_RUN_ID" in os.environ else \
                shlex.join(["python", *sys.argv] + ([] if args.resume else ["--resume"]))
            where = f"the last complete checkpoint is step {step} in {args.out}/checkpoints; resume with: {command}" \
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
