"""What several test files share: the repository root, the relative error of two tensors, and train.py run as a
command (tests import them: `from helpers import ROOT, rel_err, run_train`)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")


def rel_err(a, b):
    """max |a - b| / max |b|: the error of `a` against the reference `b`, relative to the reference's scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


def run_train(args, nproc=1, cache=None, check=True, **kw):
    """`python train.py ARGS` from the repository root (`torchrun --nproc_per_node NPROC` for more than one process),
    one thread per process, prepared corpora cached in `cache` (default $POSE_CACHE, else /tmp/pose-test-cache).
    check: raise with the end of stderr when it fails. Returns the CompletedProcess (text output)."""
    cmd = [sys.executable, TRAIN] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN]
    env = dict(os.environ, POSE_CACHE=cache or os.environ.get("POSE_CACHE", "/tmp/pose-test-cache"),
               OMP_NUM_THREADS="1")
    out = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out
