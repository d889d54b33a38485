"""Training checkpoints (sharded, torch.distributed.checkpoint) in OUT/checkpoints/step_N, and the final export in
Hugging Face format.

    step, path = checkpoints.latest(out)               # (0, None) when there is none
    checkpoints.save(model, optimizer, out, step, keep, rank)
    checkpoints.load(model, optimizer, path)
    checkpoints.load_weights(model, path)              # one process, an unsharded model: evaluate a step
    checkpoints.export(model, out, target, base, export_dtype, rank)
    checkpoints.delete(out)

save, load and export are collectives: every rank calls them.
"""
import json
import logging
import os
import re
import shutil
import warnings

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from lib import cli
from lib import hf


def folder(out):
    return os.path.join(out, "checkpoints")


def latest(out):
    """(step, path) of the newest complete checkpoint in run directory `out`, or (0, None)."""
    root = folder(out)
    steps = sorted(int(m.group(1)) for d in (os.listdir(root) if os.path.isdir(root) else [])
                   if (m := re.fullmatch(r"step_(\d+)", d)) and os.path.isfile(os.path.join(root, d, "done.json")))
    return (steps[-1], os.path.join(root, f"step_{steps[-1]:06d}")) if steps else (0, None)


def save(model, optimizer, out, step, keep, rank):
    """Sharded save (each process writes its shards) into step_N.tmp, renamed to step_N once complete: a kill at any
    moment leaves either the previous checkpoints or the new one, never a half-written one that looks valid. The
    newest `keep` checkpoints stay."""
    root = folder(out)
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
        for old in sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d))[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()


def load(model, optimizer, path):
    """The model's and the optimizer's state from checkpoint `path`, into the (sharded) objects given."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    read(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_weights(model, path):
    """The weights of checkpoint `path` into an unsharded model, in one process (no process group, the optimizer's
    state not read): an intermediate step evaluated as the final export is (scripts/reproduce.py's step rows)."""
    read({"model": model.state_dict()}, path, no_dist=True)  # the model's own tensors: DCP loads into them in place


def read(state, path, **kw):
    """dcp.load of `state` from `path`, every failure as one CheckpointError line."""
    logging.disable(logging.CRITICAL)  # DCP logs tracebacks of what it tries first; we report one line instead
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, as meant
            dcp.load(state, checkpoint_id=path, **kw)
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        reason = ([line for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1]
        raise hf.CheckpointError(f"{path}: cannot load checkpoint ({reason.strip()[:300]})") from None
    finally:
        logging.disable(logging.NOTSET)


def export(model, out, target, base, export_dtype, rank):
    """The trained model in Hugging Face format into `out`: config.json with max_position_embeddings = target, the
    weights in `export_dtype` ("auto": the dtype of the base checkpoint, the directory `base`), the base's tokenizer
    files. Gathering the full state dict is a collective: every rank calls it, rank 0 writes."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        dtype = hf.stored_dtype(hf.read_config(base)) if export_dtype == "auto" else \
            cli.torch_dtype(export_dtype, "cpu")
        model.save_pretrained(out, {k: v.to(dtype) for k, v in state.items()}, tokenizer_dir=base,
                              max_position_embeddings=target)  # the extended window (lib/hf.py: dynamic NTK)
    dist.barrier()


def delete(out):
    """Remove the checkpoints of run directory `out`; returns the folder removed, or None when there was none."""
    root = folder(out)
    if not os.path.isdir(root):
        return None
    shutil.rmtree(root)
    return root


def disk_usage(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
