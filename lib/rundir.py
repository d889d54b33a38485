"""The run directory (--out): the checks before anything is written, where a run starts, args.json and log.jsonl.

train.py writes only into a new or empty folder, or into a run directory it made itself (marked by RUN_MARKER, the
first file it writes). A fresh run needs one with nothing of value in it (an earlier attempt that failed before its
first checkpoint); --resume needs one whose args.json matches the settings outside settings.RESUMABLE.

    start = rundir.find_start(s)      # checks only: raises a one-line UsageError, writes nothing
    start, lock = rundir.claim(s)     # the checks, then the run's lock on --out (rank 0), then the checks again
    log = rundir.create(s, start)     # the marker, args.json, log.jsonl up to the start (rank 0)
    log.append({"step": 1, ...})
    lock.release()

A run directory admits one writer. The lock is an exclusive flock on OUT/.pose-run.lock, held by rank 0 for the
whole run; the file names the holder (pid and host). The operating system releases the flock of a dead process,
so a killed run never blocks the next one; the holder's line it leaves behind is reported when the lock is taken
over.
"""
import fcntl
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field

from lib import cli

from lib import checkpoints
from lib.cli import UsageError
from lib.settings import RESUMABLE

RUN_MARKER = ".pose-run"  # written first into every --out that train.py makes: only such folders are written into
LOCK = ".pose-run.lock"  # the run's lock (RunLock)


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
    if os.path.isdir(out) and set(os.listdir(out)) - {LOCK} and not ours:
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


class RunLock:
    """The lock of run directory `out`, held until release(); raises UsageError, naming the holder, when another
    process holds it. Creates `out` if needed (and nothing else when refused); release() removes what the lock alone
    added to it, so that a run that fails before writing anything leaves --out as it found it."""

    def __init__(self, out):
        self.out, self.created = out, not os.path.exists(out)
        self.path = os.path.join(out, LOCK)
        try:
            os.makedirs(out, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder() or "starting"
            self.file.close()
            raise UsageError(f"--out {out} is in use by another train.py ({holder}): wait for it to end or use "
                             "another --out") from None
        stale = self.holder()  # the line of a holder that died without releasing the lock
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        if stale:
            cli.warn(f"--out {out}: took over the lock of a run that ended without releasing it ({stale})")

    def holder(self):
        self.file.seek(0)
        return self.file.read().strip()

    def release(self):
        if self.file.closed:
            return
        self.file.truncate(0)
        if os.listdir(self.out) == [LOCK]:  # the run wrote nothing
            os.remove(self.path)
            if self.created:
                os.rmdir(self.out)
        self.file.close()  # closing releases the flock


def claim(s):
    """(Start, RunLock) of Settings s on rank 0: the checks of find_start, the lock, then the checks again (another run
    may have written into --out between them). A refused claim leaves --out as it found it."""
    find_start(s)
    lock = RunLock(s.out)
    try:
        return find_start(s), lock
    except BaseException:
        lock.release()
        raise


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
    cli.write_text_atomically(log.path, "".join(json.dumps(e) + "\n" for e in start.log))
    return log


def remove_temporary_files(out):
    for root, dirs, files in os.walk(out):
        for name in files:
            if re.search(r"\.tmp(\.|$)|\.tmp\d+$", name):
                os.remove(os.path.join(root, name))
        for name in [d for d in dirs if d.endswith(".tmp")]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
