"""What the two reproductions share.

A row-seed's folder, atomic writes, the git state, mean ± sd and the perplexity axis live here.
scripts/reproduce.py (the toy) and scripts/reproduce_smollm2.py (the real model) import them.
"""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib.cli import write_atomically, write_text_atomically  # noqa: E402,F401 (the project's atomic write)


def row_dir(out, row, seed):
    return os.path.join(out, row.slug) if seed is None else os.path.join(out, row.slug, f"seed{seed}")


def git_state():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def write_text(path, text):
    write_text_atomically(path, text)


def write_json(path, obj, **kw):
    write_text(path, json.dumps(obj, **kw))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def log_ticks(ax):
    """The perplexity axis, labelled as plain numbers over its whole range: linear within one decade, else log with
    ticks at 1-9 times each power of ten over less than two decades and at 1, 2 and 5 times them over more. Call it
    once the data are plotted."""
    import matplotlib.ticker
    low, high = ax.get_ylim()
    if low <= 0 or high / low < 10:
        return
    ax.set_yscale("log")
    subs = range(1, 10) if high / low < 100 else (1, 2, 5)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
