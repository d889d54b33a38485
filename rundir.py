"""The run directory (--out): the checks before anything is written, where a run starts, args.json and log.jsonl.

train.py writes only into a new or empty folder, or into a run directory it made itself (marked by RUN_MARKER, the
first file it writes). A fresh run needs one with nothing of value in it (an earlier attempt that failed before its
first checkpoint); --resume needs one whose args.json matches the settings outside settings.RESUMABLE.

    start = rundir.find_start(s)      # checks only: raises a one-line UsageError, writes nothing
    log = rundir.create(s, start)     # the marker, args.json, log.jsonl up to the start (rank 0)
    log.append({"step": 1, ...})
"""
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import checkpoints
from cli import UsageError
from settings import RESUMABLE

RUN_MARKER = ".pose-run"  # written first into every --out that train.py makes: only such folders are written into


@dataclass(frozen=True)
class Start:
    """Where a run starts: step 0, or the checkpoint that --resume continues from with the log up to it and what the
    resume changed ({setting: [before, now]})."""
    step: int = 0
    checkpoint: str | None = None
    log: tuple = ()
    resumed_with: dict = field(default_factory=dict)


def find_start(s):
    """Check --out (of Settings s) before anything is written; returns the Start of the run."""
    out = s.out
    if os.path.realpath(out) == os.path.realpath(s.model):
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
    step, path = checkpoints.latest(out) if ours else (0, None)
    changed = {}
    if s.resume:
        if not path:
            raise UsageError(f"--resume: no checkpoint in {out}; run without --resume to start")
        changed = check_resume(s, os.path.join(out, "args.json"), step)
    elif ours and (path or os.path.isfile(os.path.join(out, "config.json"))):
        raise UsageError(f"{out} already holds a run; use --resume to continue it or another --out")
    log = read_log(os.path.join(out, "log.jsonl"), step) if path else []
    return Start(step, path, tuple(log), changed)


def check_resume(s, args_path, step):
    """--resume continues the same run: every setting outside RESUMABLE must equal args.json's. Returns what changed
    among the others."""
    try:
        with open(args_path) as f:
            before = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--resume: cannot read {args_path} ({e})") from None
    now = s.record()
    derived = ("out", "rope_scaling")  # rope_scaling follows from --model, --rope, --train-len and --target
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE + derived and before.get(k) != now[k]]
    if changed:
        raise UsageError(f"--resume: these would change the run, refused: {'; '.join(changed)}")
    if s.steps < step:
        raise UsageError(f"--resume: --steps {s.steps} is below the checkpoint's step {step}")
    return {k: [before.get(k), now[k]] for k in RESUMABLE if k != "resume" and before.get(k) != now[k]}


def nearest_existing(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def read_log(path, upto):
    """log.jsonl entries of steps <= upto (a killed run may have logged past its last checkpoint)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [e for e in map(json.loads, f) if e["step"] <= upto]


class Log:
    """log.jsonl: one JSON object per optimizer step, appended as the step ends."""

    def __init__(self, path):
        self.path = path

    def append(self, entry):
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def create(s, start):
    """--out as a run directory: the marker first, no temporary file left by a killed command, args.json, and
    log.jsonl holding the log up to the step the run starts from. Rank 0 only."""
    os.makedirs(s.out, exist_ok=True)
    with open(os.path.join(s.out, RUN_MARKER), "w") as f:
        f.write("made by train.py: it writes only into such directories\n")
    remove_temporary_files(s.out)
    with open(os.path.join(s.out, "args.json"), "w") as f:
        json.dump(s.record(), f, indent=2)
    log = Log(os.path.join(s.out, "log.jsonl"))
    with open(log.path + ".tmp", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in start.log)
    os.replace(log.path + ".tmp", log.path)
    return log


def remove_temporary_files(out):
    for root, dirs, files in os.walk(out):
        for name in files:
            if re.search(r"\.tmp(\.|$)|\.tmp\d+$", name):
                os.remove(os.path.join(root, name))
        for name in [d for d in dirs if d.endswith(".tmp")]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
