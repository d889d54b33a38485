"""The toy reproduction of results/toy/DESIGN.md: every row trained from the bundled base, 3 seeds, and evaluated.

    python scripts/reproduce.py                         # the design's run into out/reproduce (hours; resumable)
    python scripts/reproduce.py --jobs 1                # one row-seed at a time (leaves a core to others)
    python scripts/reproduce.py --rows pose-n2,full-step --seeds 0    # a part of it (same --out, same settings)
    python scripts/reproduce.py --publish --rows original,yarn-only,pose-n2       # finished rows -> results/toy
    python scripts/reproduce.py --quick --out /tmp/rq   # smoke run: every row, 1 seed, 10 small steps (~8 min)

What it computes (DESIGN.md sections 5-9 and 12). Every fine-tuned row is `python train.py` from assets/tiny with
the row's arguments, the recipe (target 2048, 100 steps x 16 examples, lr 2e-4, 10 warmup steps), the replay
stream (--replay assets/replay/passkey-256.npz --replay-batch 4 --replay-weight 0.2: the same windows, and the same
weight, in every row of a seed), --seed 0, 1 and 2 (and 3, 4 for the main trio: section 15), checkpoints every 25
steps. The rows without training evaluate the base with a rotary scaling. Every model is evaluated by the functions,
not the CLIs, on one thread: evaluate.perplexity on the 6 held-out plays (first 4096 tokens each, stride 128) at 256,
512, 1024 and 2048 tokens, and passkey.run_passkey with 100 trials per length, seed 0 (the same prompts for every
model; each trial's key depth is kept), and recall.py's passkey at fixed distances 64 .. 1536 (50 trials each) and
copy recall (DESIGN.md section 14, design v2). The long rows (section 15: linear at 1000 steps; seed 0 only,
section 16) keep a checkpoint every 50 steps and are also evaluated at steps 100, 250 and 500, each from its
checkpoint (checkpoints.load_weights, the weights rounded to the export's dtype, as the final model is read). Each
fine-tuned run also gets its answer-target census (scripts/census.py): what retrieval practice the method's examples
and the replay windows hold.
Two row-seeds run side by side (--jobs), each in its own process on one thread (--threads): on 2 shared cores a
second torch thread per process mostly waits (10x slower steps were measured next to another 2-thread run).

Work and cache live under --out only, never read from results/: one directory per row and seed (OUT/ROW/seedS, the
training run in run/, eval.json once evaluated; OUT/ROW for a row without training). A row-seed with eval.json is
done and skipped; an interrupted training resumes from its last checkpoint (train.py --resume). After every
finished row-seed, OUT/results.json (settings, git commit, per-seed numbers, passkey records, census, cost) and
OUT/results.md with the plots (ppl.png, passkey.png, passkey_depth.png, recall.png) are rewritten, pending rows
marked so.

--publish computes nothing: it copies the results of the rows printed (--rows, default the design's) to
results/toy/, and only when OUT was run with the design's settings (not --quick) and every printed row has its
design seeds 0-2 there (seeds 3-4 of the main trio, DESIGN.md section 15, join when computed); otherwise it is an
error and results/ is untouched; with --partial, rows with some of their seeds are published too, listed as
pending (their decisions are read only once every seed is there). The published run is design v2's; design v1's
(no recall; the token-matched row at replay weight 2/3) stays in results/toy/v1/ as it was published. Nothing else
ever writes under results/.

--restore RESULTS_JSON computes nothing either: it writes each row-seed of a published results.json into OUT as
its eval.json (the numbers as published), so that a fresh machine adds rows to a published run without
recomputing it; then --publish as usual.

The extreme rows (DESIGN.md section 16: PoSE and YaRN-only to 16384 and 32768) are also evaluated up to their target:
perplexity on 3 plays cut to the target in tiling windows, and the fixed-distance passkey at 3072 .. 24576.

--quick: every row (optional ones included), seed 0, 10 steps of 8 method examples + 2 replay windows (the
token-matched Full-length: 1 example), warmup 2, perplexity on 1 play (first 2048 tokens), 5 passkey trials per
length, the extreme rows' extended evaluation stopped at 4096 tokens; default --out out/reproduce-quick; its
results.md starts with "SMOKE RUN (--quick): not results".
"""
import argparse
import concurrent.futures
import fcntl
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import cli  # noqa: E402

BASE = "assets/tiny"  # paths relative to ROOT
TRAIN_DATA = "assets/books/train"
EVAL_DATA = "assets/books/eval"
REPLAY = "assets/replay/passkey-256.npz"
RESULTS = os.path.join(ROOT, "results", "toy")  # where --publish writes (design v2; v1 is in results/toy/v1)
PUBLISHED = ("results.json", "results.md", "ppl.png", "passkey.png", "passkey_depth.png", "recall.png")
SMOKE = "SMOKE RUN (--quick): not results"

YARN = "yarn,beta_fast=4,beta_slow=1"  # DESIGN section 4: factor target / window = 2048 / 256 = 8
YARN8 = "yarn:8,beta_fast=4,beta_slow=1"
YARN_AT = "yarn:{},beta_fast=4,beta_slow=1"  # YaRN 4 / 1 with an explicit factor (no training)
RELATIVE = "yarn,beta_fast=4,beta_slow=0.125"  # the both-relative ramp: unseen angles from 1.5 windows on


class Row(NamedTuple):
    slug: str
    label: str
    train: tuple = None  # train.py arguments besides the recipe, replay and seed; None: no training
    rope: str = None  # rotary scaling the base is evaluated with (rows without training)
    optional: bool = False
    extra_seeds: tuple = ()  # seeds beyond the design's 0-2 (DESIGN.md section 15); design runs only
    long: bool = False  # 10x the recipe's steps, also evaluated at 1x, 2.5x and 5x of them (section 15)
    target: int = None  # an extreme row's target (section 16; None: the recipe's), also evaluated up to it


EXTRA = (3, 4)  # DESIGN.md section 15: the main trio's seeds 3 and 4
TOKEN_MATCHED = "{token_matched}"  # the batch that gives Full-length PoSE's method tokens per step
LONG = 10  # a long row's steps, in recipe steps (the paper's 1000 for the design's 100)
ROWS = (  # DESIGN section 7, in the order they run: no training first, then the main table, then the rest
    Row("original", "Original", rope="none"),
    Row("pi-only", "PI-only (linear)", rope="linear:8"),
    Row("ntk-only", "NTK-only", rope="ntk:8"),
    Row("yarn-only", "YaRN-only", rope=YARN8),
    Row("yarn-only-standard", "YaRN-only, standard ramp 32 / 1", rope="yarn:8"),
    Row("yarn-only-relative", "YaRN-only, both-relative ramp 4 / 0.125", rope="yarn:8,beta_fast=4,beta_slow=0.125"),
    Row("pose-n2", "PoSE N=2", ("--method", "pose", "--chunks", "2", "--rope", YARN), extra_seeds=EXTRA),
    Row("pi-ft", "PI fine-tuned, no skips", ("--method", "pi", "--rope", YARN), extra_seeds=EXTRA),
    Row("randpos", "RandPos", ("--method", "randpos", "--rope", YARN)),
    Row("full-token", "Full-length, token-matched", ("--method", "full", "--rope", YARN, "--batch-size",
                                                     TOKEN_MATCHED, "--micro-batch-size", TOKEN_MATCHED),
        extra_seeds=EXTRA),
    Row("full-step", "Full-length, step-matched", ("--method", "full", "--rope", YARN)),
    Row("pose-linear", "PoSE, linear", ("--method", "pose", "--rope", "linear")),
    Row("pose-ntk", "PoSE, NTK", ("--method", "pose", "--rope", "ntk")),
    Row("pi-ntk", "PI fine-tuned, no skips, NTK", ("--method", "pi", "--rope", "ntk")),
    Row("pose-relative", "PoSE, ramp 4 / 0.125", ("--method", "pose", "--rope", RELATIVE)),
    Row("pi-relative", "PI fine-tuned, no skips, ramp 4 / 0.125", ("--method", "pi", "--rope", RELATIVE)),
    # TRIMMED from design v2 (DESIGN.md section 16): optional, their v1 numbers are published in results/toy/v1
    Row("pose-n3", "PoSE N=3", ("--method", "pose", "--chunks", "3", "--rope", YARN), optional=True),
    Row("pose-contiguous", "PoSE, content contiguous (v_i = 0)", ("--method", "pose", "--content", "contiguous",
                                                                  "--rope", YARN), optional=True),
    Row("pose-aligned", "PoSE, content aligned (v_i = u_i)", ("--method", "pose", "--content", "aligned",
                                                              "--rope", YARN), optional=True),
    Row("direct", "Direct fine-tuning (PI paper)", ("--method", "full", "--rope", "none"), optional=True),
    Row("full-linear", "Full-length, linear", ("--method", "full", "--rope", "linear"), optional=True),
    Row("full-ntk", "Full-length, NTK", ("--method", "full", "--rope", "ntk"), optional=True),
    Row("pose-linear-1k", "PoSE, linear, 1000 steps", ("--method", "pose", "--rope", "linear"), long=True),
    Row("pi-linear-1k", "PI fine-tuned, no skips, linear, 1000 steps", ("--method", "pi", "--rope", "linear"),
        long=True),
    Row("full-token-linear-1k", "Full-length, token-matched, linear, 1000 steps",
        ("--method", "full", "--rope", "linear", "--batch-size", TOKEN_MATCHED, "--micro-batch-size", TOKEN_MATCHED),
        long=True),
    Row("pose-16k", "PoSE N=2, to 16384 (64x)", ("--method", "pose", "--chunks", "2", "--rope", YARN), target=16384),
    Row("yarn-only-16k", "YaRN-only, 64x", rope=YARN_AT.format(64), target=16384),
    Row("pose-32k", "PoSE N=2, to 32768 (128x)", ("--method", "pose", "--chunks", "2", "--rope", YARN), target=32768),
    Row("yarn-only-32k", "YaRN-only, 128x", rope=YARN_AT.format(128), target=32768),
)
ROW = {r.slug: r for r in ROWS}
TRIMMED = ("pose-n3", "pose-contiguous", "pose-aligned", "direct")
# DESIGN.md section 16: the extreme rows' evaluation up to their target, besides every row's; a constant, not a
# key of the settings, so that the runs made before it keep their settings. --quick stops it at 4096 tokens.
EXTENDED = dict(ppl_docs=3, distances=[3072, 6144, 12288, 24576], trials=10, seed=0, max_tokens=None)
EXTENDED_QUICK = dict(EXTENDED, ppl_docs=1, trials=2, max_tokens=4096)
EXTREME = (("pose-16k", "yarn-only-16k"), ("pose-32k", "yarn-only-32k"))  # (PoSE, its no-training comparison)

# The tables of results.md: (title, rows, which paper numbers stand beside them)
TABLES = (
    ("Methods (paper Table 1 / Figure 2); YaRN 4 / 1 except Direct fine-tuning", "T1",
     ("original", "yarn-only", "pi-ft", "randpos", "full-step", "full-token", "pose-n2", "pose-n3", "direct")),
    ("Interpolations (paper Table 6), and the ramps of DESIGN.md section 4 without fine-tuning", "T6",
     ("original", "pi-only", "pose-linear", "full-linear", "ntk-only", "pose-ntk", "pi-ntk", "full-ntk", "yarn-only",
      "pose-n2", "full-step", "yarn-only-standard", "yarn-only-relative", "pose-relative", "pi-relative")),
    ("Chunk content (paper appendix A, Table 4)", "T4", ("pose-n2", "pose-contiguous", "pose-aligned")),
    ("Extreme extension, at the recipe's lengths (DESIGN.md section 16)", None,
     ("pose-n2", "pose-16k", "yarn-only-16k", "pose-32k", "yarn-only-32k")),
)
MAIN_TABLE = TABLES[0][2]
# DESIGN.md section 14: (PoSE row, PI-no-skips row) pairs, the setting, and whether positions go out of range
PAIRS = (("pose-ntk", "pi-ntk", "NTK", "from 2.4 windows on"),
         ("pose-relative", "pi-relative", "YaRN 4 / 0.125", "from 1.5 windows on"),
         ("pose-n2", "pi-ft", "YaRN 4 / 1 (control)", "never up to 8x"))
T_CRITICAL = {3: 4.30, 5: 2.78}  # two-sided 5% of Student's t with n - 1 degrees of freedom, n seeds
RENAMED = {("T6", "pose-n2"): "PoSE, YaRN (= PoSE N=2)", ("T6", "full-step"): "Full-length, YaRN (= step-matched)",
           ("T4", "pose-n2"): "PoSE, content uniform (= PoSE N=2)"}

# LLaMA-7B 2k -> 16k in the PoSE paper (Zhu et al. 2023, arXiv 2309.10400): GovReport perplexity at 2k / 4k / 8k /
# 16k (Table 1: linear interpolation; Table 6: each interpolation; Table 4: chunk content), and passkey retrieval
# where its text (section 4.3) says something; Figure 2b's values are not in the text.
GT = "> 10^3"  # the paper's numbers as printed
PAPER_PPL = {
    "T1": {"original": ["4.74", GT, GT, GT], "randpos": ["11.63", "11.17", "11.54", "15.16"],
           "full-step": ["4.87", "4.70", "4.61", "4.59"], "pose-n2": ["4.84", "4.68", "4.60", "4.60"],
           "yarn-only": ["5.57", "5.51", "5.57", "5.83"]},
    "T6": {"original": ["4.74", GT, GT, GT], "pi-only": ["43.80", "43.35", "45.89", "54.33"],
           "full-linear": ["4.87", "4.70", "4.61", "4.59"], "pose-linear": ["4.84", "4.68", "4.60", "4.60"],
           "ntk-only": ["5.62", "5.61", "5.80", "550"], "full-ntk": ["4.78", "4.63", "4.57", "7.24"],
           "pose-ntk": ["4.79", "4.63", "4.57", "7.24"], "yarn-only": ["5.57", "5.51", "5.57", "5.83"],
           "full-step": ["4.78", "4.62", "4.54", "4.53"], "pose-n2": ["4.79", "4.63", "4.55", "4.55"]},
    "T4": {"pose-n2": ["4.84", "4.68", "4.60", "4.60"], "pose-contiguous": ["4.85", "4.72", "4.64", "4.68"],
           "pose-aligned": ["4.84", "4.68", "4.60", "4.60"]},
}
PAPER_SOURCE = {"T1": "Table 1, linear (YaRN-only: Table 6)", "T6": "Table 6", "T4": "Table 4"}
PAPER_PASSKEY = {"original": "0 beyond 2k", "pi-only": "0 beyond 2k", "randpos": "0 beyond 2k",
                 "pose-n2": ">= 0.90 to 16k", "full-step": "comparable to PoSE"}


RECALL_METRICS = ("passkey_accuracy", "passkey_nll", "first_nll", "copy_nll", "copy_ratio")


class PublishError(Exception):
    """--publish refused: results/ is left untouched."""


# ----------------------------------------------------------------------------------------------------------------
# settings

def design_settings(quick=False):
    """Every setting of the run (DESIGN.md sections 6-8); --quick's reduced version."""
    s = dict(mode="quick" if quick else "design", base=BASE, train_data=TRAIN_DATA, eval_data=EVAL_DATA,
             replay=REPLAY, target=2048, train_len=256, steps=100, batch_size=16, replay_batch=4, lr=2e-4,
             warmup=10, save_every=25, seeds=[0, 1, 2], ppl_docs=6, ppl_max_tokens=4096, ppl_stride=128,
             ctx=[256, 512, 1024, 2048], passkey_lengths=[256, 512, 1024, 2048], passkey_trials=100,
             passkey_seed=0, depth_bins=5, design="v2", replay_weight=0.2,
             recall=dict(distances=[64, 128, 192, 320, 512, 768, 1024, 1536], tasks=["copy", "passkey"], passage=32,
                         sequences=8, trials=50, seed=0))
    if quick:
        s.update(steps=10, batch_size=8, replay_batch=2, warmup=2, seeds=[0], ppl_docs=1, ppl_max_tokens=2048,
                 passkey_trials=5)
        s["recall"].update(sequences=1, trials=3)
    s["token_matched_batch"] = max(1, s["batch_size"] * s["train_len"] // s["target"])
    return s


def row_train_args(row, settings, seed, root=None):
    """train.py's arguments for one row and seed (without the script and --out); paths relative to `root` (None:
    as the settings give them, relative to the repository)."""
    own = [a.replace(TOKEN_MATCHED, str(settings["token_matched_batch"])) for a in row.train]
    path = (lambda p: os.path.join(root, p)) if root else (lambda p: p)
    steps, save_every = settings["steps"], settings["save_every"]
    if row.long:  # every evaluated step's checkpoint kept (evaluate_steps deletes them)
        steps, save_every = LONG * steps, settings["steps"] // 2
        own += ["--keep", str(LONG * 2)]
    return ["--model", path(settings["base"]), "--data", path(settings["train_data"]), "--recipe", "tiny",
            "--target", str(row.target or settings["target"]), "--train-len", str(settings["train_len"]),
            "--steps", str(steps), "--batch-size", str(settings["batch_size"]), "--lr", str(settings["lr"]),
            "--warmup", str(settings["warmup"]), "--seed", str(seed), "--replay", path(settings["replay"]),
            "--replay-batch", str(settings["replay_batch"]), "--replay-weight", str(settings["replay_weight"]),
            "--save-every", str(save_every), *own]


def step_evals(row, settings):
    """The intermediate steps a long row is also evaluated at: 100, 250 and 500 of 1000 (DESIGN.md section 15)."""
    n = settings["steps"]
    return [n, 5 * n // 2, 5 * n] if row.long else []


def seeds_of(row, settings):
    """Every seed a row runs: the design's, and for a design run the row's extra seeds (section 15)."""
    if not row.train:
        return [None]
    return required_seeds(row, settings) + (list(row.extra_seeds) if settings["mode"] == "design" else [])


def required_seeds(row, settings):
    """The seeds a row must have to be published: the design's (for a long row since DESIGN.md section 17; section 16
    had seed 0 only); a row's extra seeds are added when they exist."""
    if not row.train:
        return [None]
    return list(settings["seeds"])


def row_dir(out, row, seed):
    return os.path.join(out, row.slug) if seed is None else os.path.join(out, row.slug, f"seed{seed}")


def eval_path(out, row, seed):
    """A row-seed's eval.json: it exists once the row-seed is done."""
    return os.path.join(row_dir(out, row, seed), "eval.json")


def git_state():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def write_atomically(path, write):
    """write(tmp) on a temporary name of this process with path's extension (matplotlib reads it), then rename to
    path: two processes rewriting one file leave one whole version of it."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


def write_json(path, obj, **kw):
    write_text(path, json.dumps(obj, **kw))


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# one row and seed: train, census, evaluate

_EVAL_DOCS = {}


def eval_docs(settings, tokenizer, n_docs=None, max_tokens=None, min_tokens=None):
    """The first held-out plays (default: section 8's: ppl_docs of them, of >= the largest ctx tokens, cut to
    ppl_max_tokens), cached per process."""
    import data
    n_docs, max_tokens = n_docs or settings["ppl_docs"], max_tokens or settings["ppl_max_tokens"]
    min_tokens = min_tokens or max(settings["ctx"])
    key = (n_docs, max_tokens, min_tokens)
    if key not in _EVAL_DOCS:
        corpus = data.load_corpus(os.path.join(ROOT, settings["eval_data"]), tokenizer, min_tokens=min_tokens)
        _EVAL_DOCS[key] = [corpus[i][:max_tokens] for i in range(min(n_docs, len(corpus)))]
    return _EVAL_DOCS[key]


def train_row_seed(row, seed, settings, folder, threads=1):
    """Run (or resume) train.py for one row and seed into folder/run; every attempt is logged in
    folder/train_attempts.jsonl with its wall time and the machine's load. Returns the run directory."""
    sys.path.insert(0, ROOT)
    import checkpoints

    run_dir = os.path.join(folder, "run")
    if os.path.isfile(os.path.join(run_dir, "config.json")):  # exported: config.json is written last
        return run_dir
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *row_train_args(row, settings, seed, ROOT), "--out", run_dir,
           *([] if row.long else ["--delete-checkpoints"])]
    resume = bool(checkpoints.latest(run_dir)[1]) if os.path.isdir(run_dir) else False
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    os.makedirs(folder, exist_ok=True)
    attempt = {"resume": resume, "threads": threads, "loadavg_start": os.getloadavg(), "started": time.time()}
    t0, code = time.perf_counter(), None
    try:
        with open(os.path.join(folder, "train.log"), "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    finally:
        attempt.update(seconds=round(time.perf_counter() - t0, 1), loadavg_end=os.getloadavg(), returncode=code)
        with open(os.path.join(folder, "train_attempts.jsonl"), "a") as f:
            f.write(json.dumps(attempt) + "\n")
    if code:
        tail = open(os.path.join(folder, "train.log")).read().strip().splitlines()[-5:]
        raise RuntimeError(f"{row.slug} seed {seed}: train.py exited with {code}; "
                           f"{os.path.join(folder, 'train.log')} ends with:\n" + "\n".join(tail))
    return run_dir


def training_cost(folder, run_dir):
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    attempts = [json.loads(line) for line in open(os.path.join(folder, "train_attempts.jsonl"))]
    return {"seconds_per_step": statistics.median(e["seconds"] for e in log),
            "peak_mem_gb": max(e["peak_mem_gb"] for e in log), "steps": len(log),
            "method_tokens_per_step": log[0]["tokens"], "final_loss": log[-1]["loss"],
            "final_replay_loss": log[-1].get("replay_loss"),
            "train_wall_s": round(sum(a["seconds"] for a in attempts), 1),
            "train_attempts": [{k: a[k] for k in ("resume", "threads", "seconds", "loadavg_start", "loadavg_end")}
                               for a in attempts]}


RECORD_FIELDS = ("length", "trial", "depth", "passkey", "prompt_tokens", "predicted", "correct")


def recall_stream(settings, tokenizer):
    import data
    import recall
    if "stream" not in _EVAL_DOCS:
        _EVAL_DOCS["stream"] = recall.held_out_stream(data.load_corpus(os.path.join(ROOT, settings["eval_data"]),
                                                                       tokenizer))
    return _EVAL_DOCS["stream"]


def evaluate_model(model, tokenizer, settings):
    import evaluate
    import passkey
    import recall

    docs = eval_docs(settings, tokenizer)
    ppl = {}
    for ctx in settings["ctx"]:
        r = evaluate.perplexity(model, docs, ctx, settings["ppl_stride"])
        ppl[str(ctx)] = {"ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"]}
    records = passkey.run_passkey(model, tokenizer, settings["passkey_lengths"], trials=settings["passkey_trials"],
                                  seed=settings["passkey_seed"])
    accuracy = {str(r["length"]): r["accuracy"] for r in passkey.accuracy_by_length(records)}
    rc = settings["recall"]
    probes = recall.run_recall(model, tokenizer, recall_stream(settings, tokenizer), rc["distances"],
                               settings["train_len"], rc["tasks"], rc["passage"], rc["sequences"], rc["trials"],
                               seed=rc["seed"])
    return {"ppl": ppl, "passkey": accuracy,
            "records": {"fields": list(RECORD_FIELDS), "rows": [[r[k] for k in RECORD_FIELDS] for r in records]},
            "recall": recall.summarize(probes, rc["distances"]), "recall_records": probes}


def evaluate_extended(model, tokenizer, settings, target, folder):
    """An extreme row's evaluation up to its target (DESIGN.md section 16), kept in folder/extended.json once done:
    perplexity on the first plays cut to the target, at ctx window x 2^k, in windows that tile them; the passkey at
    the fixed distances of at most 3/4 of the target (prompts up to the target). --quick stops at 4096 tokens."""
    import evaluate
    import recall

    path = os.path.join(folder, "extended.json")
    if os.path.isfile(path):
        return read_json(path)
    ext = EXTENDED_QUICK if settings["mode"] == "quick" else EXTENDED
    top = min(target, ext["max_tokens"] or target)
    docs = eval_docs(settings, tokenizer, ext["ppl_docs"], top, top)
    ppl, ctx = {}, settings["train_len"]
    while ctx <= top:
        r = evaluate.perplexity(model, docs, ctx, ctx - 1)
        ppl[str(ctx)] = {"ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"]}
        ctx *= 2
    distances = [d for d in ext["distances"] if d <= 3 * top // 4]
    probes = recall.run_recall(model, tokenizer, None, distances, settings["train_len"], ["passkey"],
                               trials=ext["trials"], seed=ext["seed"])
    result = {"settings": ext, "target": target, "ppl": ppl, "distances": distances,
              "recall": recall.summarize(probes, distances), "recall_records": probes}
    write_json(path, result)
    return result


def evaluate_steps(row, settings, folder, run_dir, tokenizer):
    """A long row's intermediate steps, each from its training checkpoint with the weights rounded to the export's
    dtype (as the final model is read), evaluated as the final model is; each kept in folder/step_K.json once done,
    the checkpoints deleted when all are. Returns {step: {ppl, passkey, recall}}."""
    import checkpoints
    import hf
    from model import LLaMA

    dtype = hf.stored_dtype(hf.read_config(run_dir))
    by_step = {}
    for step in step_evals(row, settings):
        path = os.path.join(folder, f"step_{step}.json")
        if not os.path.isfile(path):
            model = LLaMA.from_pretrained(run_dir)
            checkpoints.load_weights(model, os.path.join(checkpoints.folder(run_dir), f"step_{step:06d}"))
            for p in model.parameters():
                p.data = p.data.to(dtype).to(p.dtype)
            r = evaluate_model(model, tokenizer, settings)
            write_json(path, {k: r[k] for k in ("ppl", "passkey", "recall")})
        by_step[str(step)] = read_json(path)
    checkpoints.delete(run_dir)
    return by_step


def run_row_seed(slug, seed, settings, out, threads=1):
    """Train (if the row trains), take the census, evaluate, and write eval.json; nothing when it exists."""
    import torch

    import data
    import rope
    from model import LLaMA

    row = ROW[slug]
    folder = row_dir(out, row, seed)
    path = eval_path(out, row, seed)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    result = {"row": slug, "label": row.label, "seed": seed, "settings": settings}
    if row.train:
        run_dir = train_row_seed(row, seed, settings, folder, threads)
        import census
        t0 = time.perf_counter()
        result["census"] = census.arm_census(row_train_args(row, settings, seed, ROOT))
        result["census"]["seconds"] = round(time.perf_counter() - t0, 2)
        result["train_args"] = row_train_args(row, settings, seed)
        result["replay_weight_trained"] = read_json(os.path.join(run_dir, "args.json"))["replay_weight"]
        model_dir = run_dir
    else:
        model_dir = os.path.join(ROOT, settings["base"])
    torch.set_num_threads(1)
    tokenizer = data.Tokenizer(model_dir)
    model = LLaMA.from_pretrained(model_dir)
    if not row.train:
        model.set_rope_scaling(rope.scaling_from_spec(row.rope, model.cfg.max_position_embeddings))
    result["rope_scaling"] = model.cfg.rope_scaling
    result["rope"] = rope.describe_rope(model.cfg.rope_scaling)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    result.update(evaluate_model(model, tokenizer, settings))
    if row.long:
        result["by_step"] = evaluate_steps(row, settings, folder, run_dir, tokenizer)
    if row.target:
        result["extended"] = evaluate_extended(model, tokenizer, settings, row.target, folder)
    cost = training_cost(folder, run_dir) if row.train else {}
    cost.update(eval_wall_s=round(time.perf_counter() - t0, 1), eval_threads=1, eval_loadavg_start=load_start,
                eval_loadavg_end=os.getloadavg())
    result["cost"] = cost
    result["git"] = git_state()
    write_json(path, result)
    return path


def _worker(slug, seed, settings, out, threads):  # a --jobs 2 process
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run_row_seed(slug, seed, settings, out, threads)
    except KeyboardInterrupt:  # stopped by the main process: end this worker, or the pool hands it the next job
        os._exit(130)


# ----------------------------------------------------------------------------------------------------------------
# collecting, tables, plots

def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def collect(out, settings, slugs):
    """results.json's object for the rows `slugs`, from the eval.json files under `out`."""
    rows = {}
    for slug in slugs:
        row = ROW[slug]
        expected = seeds_of(row, settings)
        per_seed = {}
        for seed in expected:
            path = eval_path(out, row, seed)
            if os.path.isfile(path):
                result = read_json(path)
                if result.get("settings") != settings:
                    raise PublishError(f"{path} was computed with other settings than {out}/settings.json")
                per_seed["base" if seed is None else str(seed)] = {k: v for k, v in result.items()
                                                                   if k not in ("settings", "row", "label")}
        entry = {"label": row.label, "train_args": list(row.train) if row.train else None,
                 "rope": row.rope or "checkpoint", "optional": row.optional,
                 "seeds_expected": expected, "seeds_required": required_seeds(row, settings),
                 "seeds_done": [s for s in expected if ("base" if s is None else str(s)) in per_seed],
                 "per_seed": per_seed}
        if per_seed:
            summary = {}
            for metric, keys in (("ppl", settings["ctx"]), ("passkey", settings["passkey_lengths"])):
                for k in keys:
                    values = [(r[metric][str(k)]["ppl"] if metric == "ppl" else r[metric][str(k)])
                              for r in per_seed.values()]
                    m, s = mean_std(values)
                    summary.setdefault(metric, {})[str(k)] = {"mean": m, "std": s, "n": len(values)}
            for metric in RECALL_METRICS:
                columns = list(zip(*[r["recall"][metric] for r in per_seed.values()]))
                summary.setdefault("recall", {})[metric] = [dict(zip(("mean", "std"), mean_std(list(c))),
                                                                 n=len(c)) for c in columns]
            costs = [r.get("cost", {}) for r in per_seed.values()]
            for key in ("seconds_per_step", "peak_mem_gb", "train_wall_s", "eval_wall_s"):
                m, s = mean_std([c.get(key) for c in costs])
                summary.setdefault("cost", {})[key] = {"mean": m, "std": s}
            entry["summary"] = summary
        rows[slug] = entry
    evals = [r.get("git", {}) for row in rows.values() for r in row["per_seed"].values()]
    commits = sorted({(g.get("commit"), g.get("dirty")) for g in evals}, key=str)
    return {"settings": settings, "design": "results/toy/DESIGN.md", "git": git_state(),
            "evaluated_at_commits": [{"commit": c, "dirty": d} for c, d in commits],
            "paper": {"ppl": PAPER_PPL, "source": PAPER_SOURCE, "passkey_text": PAPER_PASSKEY,
                      "what": "LLaMA-7B 2k -> 16k, GovReport perplexity at 2k / 4k / 8k / 16k (PoSE paper)"},
            "rows": rows}


def fmt_number(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.3g}"


def fmt_cell(cell, digits=2):
    if cell is None or cell["mean"] is None:
        return "-"
    if cell.get("std") is None:
        return fmt_number(cell["mean"], digits)
    return f"{fmt_number(cell['mean'], digits)} ± {fmt_number(cell['std'], digits)}"


def fmt_values(values):
    """mean ± sd of values, as a table cell."""
    return fmt_cell(dict(zip(("mean", "std"), mean_std(values))))


def seeds_label(entry):
    if entry["seeds_expected"] == [None]:
        return "base" if entry["seeds_done"] else "pending"
    done, expected = len(entry["seeds_done"]), len(entry["seeds_expected"])
    return "pending" if done == 0 else (f"{done}" if done == expected else f"{done} of {expected}")


def table(results, slugs, paper):
    """One results table; `paper` names the paper's table whose numbers stand beside ours (None: no paper column)."""
    s = results["settings"]
    head = ["row", "seeds"] + [f"ppl {c}" for c in s["ctx"]] + [f"passkey {n}" for n in s["passkey_lengths"]] + \
        ["s/step"] + ([f"paper ppl 2k / 4k / 8k / 16k ({PAPER_SOURCE[paper]})", "paper passkey (text)"]
                      if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for slug in slugs:
        if slug not in results["rows"]:
            continue
        entry = results["rows"][slug]
        summary = entry.get("summary", {})
        cells = [RENAMED.get((paper, slug), entry["label"]), seeds_label(entry)]
        cells += [fmt_cell(summary.get("ppl", {}).get(str(c))) for c in s["ctx"]]
        cells += [fmt_cell(summary.get("passkey", {}).get(str(n))) for n in s["passkey_lengths"]]
        cells.append(fmt_cell(summary.get("cost", {}).get("seconds_per_step")) if entry["train_args"] else "-")
        if paper:
            ppl = PAPER_PPL[paper].get(slug)
            cells.append(" / ".join(ppl) if ppl else "-")
            cells.append(PAPER_PASSKEY.get(slug, "-") if paper == "T1" or slug in ("original", "pi-only") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def census_table(results):
    bins = None
    lines = []
    for slug, entry in results["rows"].items():
        for seed, r in entry["per_seed"].items():
            c = r.get("census")
            if not c:
                continue
            if bins is None:
                bins = list(c["replay"]["own"])
                head = ["row", "seed", "method examples", "method tokens", "method 'pass key'", "method answers",
                        "replay windows", "replay tokens", "replay answers"] + \
                    [f"own {b}" for b in bins] + ["other", "none"]
                lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            m, rp = c["method"], c["replay"]
            own = [m["own"][b] + rp["own"][b] for b in bins]
            cells = [entry["label"], seed, m["examples"], f"{m['tokens']:,}", m["mentions"], m["answers"],
                     rp["examples"], f"{rp['tokens']:,}", rp["answers"], *own, m["other"] + rp["other"],
                     m["none"] + rp["none"]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) if lines else "(no fine-tuned run finished yet)"


def cost_table(results):
    head = ["row", "seed", "s/step (median)", "peak GB", "method tokens / step", "train min", "eval min",
            "load avg (train start, eval end)", "final loss", "final replay loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for slug, entry in results["rows"].items():
        for seed, r in entry["per_seed"].items():
            c = r.get("cost", {})
            loads = [a["loadavg_start"][0] for a in c.get("train_attempts", [])] + [c["eval_loadavg_end"][0]]
            cells = [entry["label"], seed, fmt_number(c.get("seconds_per_step")), fmt_number(c.get("peak_mem_gb")),
                     f"{c['method_tokens_per_step']:,}" if "method_tokens_per_step" in c else "-",
                     fmt_number(c["train_wall_s"] / 60, 1) if "train_wall_s" in c else "-",
                     fmt_number(c["eval_wall_s"] / 60, 1), ", ".join(f"{x:.1f}" for x in loads),
                     fmt_number(c.get("final_loss"), 3), fmt_number(c.get("final_replay_loss"), 3)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def markdown(results):
    s = results["settings"]
    quick = s["mode"] == "quick"
    rows = results["rows"]
    pending = [e["label"] for e in rows.values() if not set(e["seeds_required"]) <= set(e["seeds_done"])]
    commits = ", ".join(c["commit"][:10] + (" (modified)" if c["dirty"] else "")
                        for c in results["evaluated_at_commits"] if c["commit"]) or "-"
    md = ([SMOKE, ""] if quick else []) + [
        f"# PoSE at toy scale: {s['train_len']} -> {s['target']} tokens" + (" (smoke run)" if quick else ""), "",
        f"Design: results/toy/DESIGN.md, v2 (section 14: replay weight {s['replay_weight']} passed to every row, "
        f"recall.py added to every evaluation), fixed before the runs. Made by `python scripts/reproduce.py"
        f"{' --quick' if quick else ''}` at commit {commits}.", "",
        f"Base {s['base']}; fine-tuning: {s['steps']} steps x {s['batch_size']} method examples + "
        f"{s['replay_batch']} replay windows ({s['replay']}, the same in every row of a seed), lr {s['lr']}, "
        f"{s['warmup']} warmup steps then linear decay, seeds {', '.join(map(str, s['seeds']))}; Full-length "
        f"token-matched: {s['token_matched_batch']} example(s) of {s['target']} tokens per step. Perplexity: "
        f"{s['ppl_docs']} held-out plays (first {s['ppl_max_tokens']} tokens each), sliding window stride "
        f"{s['ppl_stride']}. Passkey: "
        f"{s['passkey_trials']} trials per length, the same prompts (seed {s['passkey_seed']}) for every model, greedy "
        f"exact match. Cells: mean ± sample standard deviation over the seeds (one number: one seed, or no training). "
        f"s/step: median optimizer-step time of the training run (shared 2-core CPU; the load is in the cost table). "
        f"Paper: LLaMA-7B 2k -> 16k, GovReport; its passkey numbers are only what its text says (section 4.3)."
        + ("" if any(slug in rows for slug in TRIMMED) else
           " Rows trimmed from v2 (DESIGN.md section 16: Direct fine-tuning, PoSE N=3, PoSE content contiguous and "
           "aligned): their v1 numbers are in results/toy/v1/results.md."), ""]
    if pending:
        md += [f"Pending (not all seeds computed): {', '.join(pending)}.", ""]
    shown = set()
    for title, paper, slugs in TABLES:
        if any(slug in rows and slug not in shown for slug in slugs):  # not a table of rows shown above only
            md += [f"## {title}", "", table(results, slugs, paper), ""]
            shown.update(slugs)
    md += recall_sections(results) + long_section(results) + extreme_section(results)
    md += ["![perplexity](ppl.png) ![passkey](passkey.png)", "",
           f"Passkey accuracy by key depth ({s['depth_bins']} bins of the filler) and length, trials pooled over the "
           f"seeds: ![depth x length](passkey_depth.png)", "",
           "## Answer-target census (DESIGN.md section 9)", "",
           "Per fine-tuned run, over all its steps: the method's examples (books only) and the replay windows. "
           "'pass key': mentions in the method's examples; answers: answer targets; own: the most recent key line "
           "before the question holds the answer's key, binned by distance in model positions; other: it holds "
           "another key; none: no key line before it.", "", census_table(results), "",
           "## Cost", "", cost_table(results), ""]
    return "\n".join(md)


def beyond_window(entry, settings, metric, seed):
    """A row-seed's recall `metric` averaged over the distances beyond the window (DESIGN.md section 14)."""
    values = entry["per_seed"][seed]["recall"][metric]
    far = [v for d, v in zip(settings["recall"]["distances"], values) if d > settings["train_len"] and v is not None]
    return statistics.fmean(far) if far else None


def verdict(diffs):
    """Mean, paired t and the decision rule's verdict (sections 14-16) of per-seed differences."""
    m, sd = mean_std(diffs)
    if len(diffs) < 2:  # one seed (a --quick run): no t, never a finding
        return dict(diffs=diffs, mean=m, t=None, finding=False)
    t = m / (sd / math.sqrt(len(diffs))) if sd else (math.inf if m else 0.0)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return dict(diffs=diffs, mean=m, t=t, finding=same_sign and abs(t) > T_CRITICAL[len(diffs)])


def verdict_cells(v):
    if v is None:
        return ["pending"] * 4
    return [", ".join(f"{d:+.3f}" for d in v["diffs"]), f"{v['mean']:+.3f}", fmt_number(v["t"]),
            "yes" if v["finding"] else "no"]


def paired(results, pose, pi, metric, n=3):
    """Per-seed PoSE - PI differences of `metric` (beyond the window, or ppl at the longest ctx) over the first `n`
    seeds, their mean, the paired t and the verdict of the decision rule (n = 3: section 14's, n = 5: section 15's);
    None until both rows have those seeds."""
    s, rows = results["settings"], results["rows"]
    if pose not in rows or pi not in rows:
        return None
    a, b = rows[pose], rows[pi]
    seeds = a["seeds_expected"][:n]
    if len(seeds) < n or any(str(x) not in a["per_seed"] or str(x) not in b["per_seed"] for x in seeds):
        return None
    if metric == "ppl":
        top = str(max(s["ctx"]))
        value = lambda e, seed: e["per_seed"][seed]["ppl"][top]["ppl"]  # noqa: E731
    else:
        value = lambda e, seed: beyond_window(e, s, metric, seed)  # noqa: E731
    return verdict([value(a, str(x)) - value(b, str(x)) for x in seeds])


def long_section(results):
    """The long rows by step (DESIGN.md section 15; the paper's Figure 3c is the perplexity column per step)."""
    s, rows = results["settings"], results["rows"]
    done = [slug for slug in rows if ROW[slug].long and rows[slug]["per_seed"]]
    if not done:
        return []
    top, final = str(max(s["ctx"])), LONG * s["steps"]
    md = ["## Linear at the paper's budget, by step (DESIGN.md section 15)", "",
          f"Perplexity at {top} and the fixed-distance passkey accuracy averaged over the distances beyond the window, "
          "mean ± sd over seeds, at each evaluated step (the paper's Figure 3c: perplexity against the step).", "",
          "| row | seeds | step | ppl " + top + " | passkey, d > window |", "|---|---|---|---|---|"]
    for slug in done:
        entry = rows[slug]
        for step in [*step_evals(ROW[slug], s), final]:
            at = [r if step == final else r["by_step"][str(step)] for r in entry["per_seed"].values()]
            distances = s["recall"]["distances"]
            far = [statistics.fmean([v for d, v in zip(distances, r["recall"]["passkey_accuracy"])
                                     if d > s["train_len"]]) for r in at]
            md.append(f"| {entry['label']} | {seeds_label(entry)} | {step} | "
                      f"{fmt_values([r['ppl'][top]['ppl'] for r in at])} | {fmt_values(far)} |")
    return md + [""]


def extreme_section(results):
    """The extreme rows' evaluation up to the target (DESIGN.md section 16) and its decision rule."""
    s, rows = results["settings"], results["rows"]
    done = [slug for slug in rows if ROW[slug].target and rows[slug]["per_seed"]]
    if not done:
        return []
    extended = [r["extended"] for slug in done for r in rows[slug]["per_seed"].values()]
    ext = extended[0]["settings"]
    ctxs = sorted({int(c) for e in extended for c in e["ppl"]})
    distances = sorted({d for e in extended for d in e["distances"]})

    def far_passkey(r):  # the primary metric: passkey accuracy over the extended distances
        return statistics.fmean(r["extended"]["recall"]["passkey_accuracy"])

    md = ["## Extreme extension, up to the target (DESIGN.md section 16)", "",
          f"Perplexity on the first {ext['ppl_docs']} held-out plays, each cut to the row's target, in windows that "
          f"tile them (stride ctx - 1: not the main tables' protocol), and the passkey at a fixed distance "
          f"({ext['trials']} trials per distance, recall.py), mean ± sd over seeds.", "",
          "| row | seeds | " + " | ".join(f"ppl {c}" for c in ctxs) + " | " +
          " | ".join(f"passkey d={d}" for d in distances) + " |", "|" + "---|" * (2 + len(ctxs) + len(distances))]
    for slug in done:
        entry, per_seed = rows[slug], rows[slug]["per_seed"].values()
        cells = [fmt_values([r["extended"]["ppl"][str(c)]["ppl"] for r in per_seed if str(c) in r["extended"]["ppl"]])
                 for c in ctxs]
        cells += [fmt_values([v for r in per_seed for dd, v in zip(r["extended"]["distances"],
                                                             r["extended"]["recall"]["passkey_accuracy"]) if dd == d])
                  for d in distances]
        md.append(f"| {entry['label']} | {seeds_label(entry)} | " + " | ".join(cells) + " |")
    md += ["", "Decision rule (section 16): per seed, PoSE minus its YaRN-only row (no training, one model), and "
           f"PoSE minus PoSE N=2 inside the recipe's lengths, seeds paired; a finding when all {len(s['seeds'])} "
           f"seeds have one sign and |t| > {T_CRITICAL[3]}.", "",
           "| comparison | metric | per-seed difference | mean | t | finding |", "|---|---|---|---|---|---|"]
    top = str(max(s["ctx"]))
    for pose, base in EXTREME:
        if pose not in rows:
            continue
        a, seeds = rows[pose], [str(x) for x in required_seeds(ROW[pose], s)]
        b, n2 = rows.get(base), rows.get("pose-n2")
        far = str(min(ROW[pose].target, max(ctxs)))  # the target (--quick: where its extended evaluation stops)
        comparisons = [  # (name, metric, the other row, the seeds it needs, the per-seed difference)
            (f"{a['label']} - {base}", "passkey accuracy, extended distances", b, ["base"],
             lambda x: far_passkey(a["per_seed"][x]) - far_passkey(b["per_seed"]["base"])),
            (f"{a['label']} - {base}", f"ppl at {far}", b, ["base"],
             lambda x: a["per_seed"][x]["extended"]["ppl"][far]["ppl"] -
             b["per_seed"]["base"]["extended"]["ppl"][far]["ppl"]),
            (f"{a['label']} - PoSE N=2", "ppl at 256", n2, seeds,
             lambda x: a["per_seed"][x]["ppl"]["256"]["ppl"] - n2["per_seed"][x]["ppl"]["256"]["ppl"]),
            (f"{a['label']} - PoSE N=2", f"ppl at {top}", n2, seeds,
             lambda x: a["per_seed"][x]["ppl"][top]["ppl"] - n2["per_seed"][x]["ppl"][top]["ppl"]),
        ]
        for name, metric, other, needs, diff in comparisons:
            ok = all(e is not None and all(x in e["per_seed"] for x in keys)
                     for e, keys in ((a, seeds), (other, needs)))
            v = verdict([diff(x) for x in seeds]) if ok else None
            md.append(f"| {name} | {metric} | " + " | ".join(verdict_cells(v)) + " |")
    return md + [""]


def effective_distances(entry, settings):
    """Each row-seed's effective distance of the fixed-distance passkey (recall.effective_distance), from its
    per-distance accuracies."""
    import recall
    distances = settings["recall"]["distances"]
    return [recall.effective_distance({"distances": distances, "passkey_accuracy": r["recall"]["passkey_accuracy"]})
            ["passkey"] for r in entry["per_seed"].values()]


def recall_sections(results):
    import recall
    s, rows = results["settings"], results["rows"]
    rc = s["recall"]
    done = [slug for slug in rows if rows[slug].get("summary", {}).get("recall")]
    if not done:
        return []
    md = ["## Recall by distance (DESIGN.md section 14)", "",
          f"Passkey with the key line exactly d tokens before the answer (recall.py; {rc['trials']} trials per "
          f"distance, the same prompts for every model, teacher-forced exact match), mean ± sd over seeds; the "
          f"window is {s['train_len']}. Effective distance: the largest d up to which every tested distance has "
          f"accuracy >= {recall.KEY_THRESHOLD} (0: not even {rc['distances'][0]}), per seed, then mean ± sd. Copy "
          f"recall is recorded in results.json (the base does not copy natural text: DESIGN.md section 14).", "",
          "| row | seeds | " + " | ".join(f"d={d}" for d in rc["distances"]) +
          " | key NLL beyond the window | effective distance |", "|" + "---|" * (len(rc["distances"]) + 4)]
    for slug in done:
        entry = rows[slug]
        cells = [fmt_cell(c) for c in entry["summary"]["recall"]["passkey_accuracy"]]
        far = [beyond_window(entry, s, "passkey_nll", seed) for seed in entry["per_seed"]]
        m, sd = mean_std(effective_distances(entry, s))
        reach = f"{m:.0f}" + ("" if sd is None else f" ± {sd:.0f}")
        md.append(f"| {entry['label']} | {seeds_label(entry)} | " + " | ".join(cells) + f" | {fmt_values(far)} | "
                  f"{reach} |")
    md += ["", "![recall](recall.png)", "", "## Do the skips matter? PoSE minus PI-no-skips, paired by seed", "",
           f"Decision rule (DESIGN.md sections 14 and 15): a finding when every seed has the same sign and "
           f"|paired t| > {T_CRITICAL[3]} (3 seeds) or {T_CRITICAL[5]} (5 seeds).", "",
           "| setting | positions out of range | metric | seeds | per-seed PoSE - PI | mean | t | finding |",
           "|---|---|---|---|---|---|---|---|"]
    for pose, pi, setting, out_of_range in PAIRS:
        counts = (3, 5) if ROW[pose].extra_seeds and s["mode"] == "design" else (3,)
        for n in counts:
            for metric, label in (("passkey_accuracy", "passkey accuracy, d > window"),
                                  ("passkey_nll", "key NLL, d > window"), ("ppl", f"ppl at {max(s['ctx'])}")):
                cells = verdict_cells(paired(results, pose, pi, metric, n))
                md.append(f"| {setting} | {out_of_range} | {label} | 0-{n - 1} | " + " | ".join(cells) + " |")
    return md + [""]


def records_of(entry):
    out = []
    for r in entry["per_seed"].values():
        fields = r["records"]["fields"]
        out += [dict(zip(fields, values)) for values in r["records"]["rows"]]
    return out


def log_ticks(ax):
    """The perplexity axis, labelled as plain numbers over its whole range: linear within one decade, else log with
    ticks at 1-9 times each power of ten over less than two decades and at 1, 2 and 5 times them over more. Call it
    once the data are plotted."""
    import matplotlib.ticker
    low, high = ax.get_ylim()
    if high / low < 10:
        return
    ax.set_yscale("log")
    subs = range(1, 10) if high / low < 100 else (1, 2, 5)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plots(results, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    import passkey

    s = results["settings"]
    rows = {slug: e for slug, e in results["rows"].items() if e["per_seed"]}
    for name, metric, keys, ylabel in (("ppl.png", "ppl", s["ctx"], "perplexity (held-out plays)"),
                                       ("passkey.png", "passkey", s["passkey_lengths"], "passkey accuracy")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for slug in [m for m in MAIN_TABLE if m in rows]:
            cells = [rows[slug]["summary"][metric][str(k)] for k in keys]
            ax.errorbar(keys, [c["mean"] for c in cells], yerr=[c["std"] or 0 for c in cells], marker="o",
                        capsize=3, label=f"{rows[slug]['label']} ({seeds_label(rows[slug])})")
        ax.axvline(s["train_len"], color="gray", linestyle=":", label="original window")
        ax.set_xscale("log", base=2)
        ax.set_xticks(keys, [str(k) for k in keys])
        if metric == "ppl":
            log_ticks(ax)
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel + (" (mean ± sd over seeds)" if len(s["seeds"]) > 1 else ""))
        if s["mode"] == "quick":
            ax.set_title(SMOKE, color="red")
        ax.legend(fontsize=7)
        fig.tight_layout()
        write_atomically(os.path.join(folder, name), lambda tmp: fig.savefig(tmp, dpi=120))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    distances = s["recall"]["distances"]
    for slug, entry in rows.items():
        if "recall" in entry.get("summary", {}):
            cells = entry["summary"]["recall"]["passkey_accuracy"]
            ax.errorbar(distances, [c["mean"] for c in cells], yerr=[c["std"] or 0 for c in cells], marker="o", ms=3,
                        capsize=2, label=f"{entry['label']} ({seeds_label(entry)})")
    ax.axvline(s["train_len"], color="gray", linestyle=":", label="original window")
    ax.set_xscale("log", base=2)
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("distance from the key line to the answer (tokens)")
    ax.set_ylabel("passkey accuracy at a fixed distance")
    if s["mode"] == "quick":
        ax.set_title(SMOKE, color="red")
    ax.legend(fontsize=6)
    fig.tight_layout()
    write_atomically(os.path.join(folder, "recall.png"), lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)

    lengths, bins = s["passkey_lengths"], s["depth_bins"]
    n = max(1, len(rows))
    cols = min(6, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.4 * cols + 1, 2.5 * nrows + 0.4), squeeze=False)
    image = None
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (slug, entry) in zip(axes.flat, rows.items()):
        image = passkey.draw_accuracy_grid(ax, records_of(entry), lengths, bins, fontsize=6)
        ax.set_title(f"{entry['label']} ({seeds_label(entry)})", fontsize=7)
        ax.set_xlabel("key depth (bin start)", fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy", shrink=0.8)
    if s["mode"] == "quick":
        fig.suptitle(SMOKE, color="red")
    write_atomically(os.path.join(folder, "passkey_depth.png"),
                     lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)


def write_results(out, settings, slugs, folder=None):
    """results.json, results.md and the plots of the rows `slugs` into `folder` (default: out)."""
    folder = folder or out
    results = collect(out, settings, slugs)
    write_json(os.path.join(folder, "results.json"), results, separators=(",", ":"))
    md = markdown(results)
    write_text(os.path.join(folder, "results.md"), md)
    plots(results, folder)
    return results, md


# ----------------------------------------------------------------------------------------------------------------
# publishing

def publish(out, slugs, dest=RESULTS, partial=False):
    """Copy the results of the rows `slugs` computed in `out` to `dest`: only a design run (not --quick) with every
    seed of every row done (partial: at least one seed of every row; results.md lists the others as pending and
    no decision is read from a row without all its seeds). Raises PublishError, with `dest` untouched, otherwise."""
    path = os.path.join(out, "settings.json")
    if not os.path.isfile(path):
        raise PublishError(f"{out} holds no run of scripts/reproduce.py (no settings.json): nothing to publish")
    settings = read_json(path)
    if settings.get("mode") == "quick":
        raise PublishError(f"{out} is a --quick run: smoke runs are never published")
    if settings != design_settings():
        raise PublishError(f"{out} was run with settings other than results/toy/DESIGN.md's: not published")
    missing = []
    for slug in slugs:
        absent = [seed for seed in required_seeds(ROW[slug], settings)
                  if not os.path.isfile(eval_path(out, ROW[slug], seed))]
        if partial:
            absent = [] if len(absent) < len(required_seeds(ROW[slug], settings)) else [None]
        missing += [slug if seed is None else f"{slug} seed {seed}" for seed in absent]
    if missing:
        raise PublishError(f"not computed in {out}: {', '.join(missing)}; run scripts/reproduce.py for them first, "
                           f"or publish only finished rows with --rows")
    staging = tempfile.mkdtemp(prefix=".publish-", dir=out)
    try:
        write_results(out, settings, slugs, folder=staging)  # everything built before anything is copied
        os.makedirs(dest, exist_ok=True)
        for name in PUBLISHED:
            shutil.copyfile(os.path.join(staging, name), os.path.join(dest, name + ".tmp"))
        for name in PUBLISHED:
            os.replace(os.path.join(dest, name + ".tmp"), os.path.join(dest, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [os.path.join(dest, name) for name in PUBLISHED]


def restore(out, path):
    """Write into `out` the eval.json of every row-seed of a published results.json (`path`), computing nothing: on a
    fresh machine, the rows published before go on counting without being recomputed. Only a design run's file;
    a row-seed already in `out` is kept. Returns the number written."""
    try:
        published = read_json(path)
    except (OSError, ValueError) as e:
        raise PublishError(f"cannot read {path}: {e}") from None
    settings = published.get("settings") if isinstance(published, dict) else None
    if settings != design_settings():
        raise PublishError(f"{path} was not made with the design's settings: nothing restored")
    unknown = [slug for slug in published["rows"] if slug not in ROW]
    if unknown:
        raise PublishError(f"{path} has rows this scripts/reproduce.py does not know: {', '.join(unknown)}")
    check_out(out, settings)
    written = 0
    for slug, entry in published["rows"].items():
        for key, result in entry["per_seed"].items():
            seed = None if key == "base" else int(key)
            eval_json = eval_path(out, ROW[slug], seed)
            if not os.path.isfile(eval_json):
                os.makedirs(os.path.dirname(eval_json), exist_ok=True)
                write_json(eval_json, {"row": slug, "label": entry["label"], "seed": seed, "settings": settings,
                                       **result})
                written += 1
    return written


# ----------------------------------------------------------------------------------------------------------------
# CLI

def rows_help():
    lines = ["rows (--rows takes these names; * optional: run only when named, or with --rows all):"]
    for r in ROWS:
        what = "no training, evaluated with --rope " + r.rope if not r.train else \
            "train.py " + " ".join(a.replace(TOKEN_MATCHED, "B/8") for a in r.train)
        lines.append(f"  {r.slug + (' *' if r.optional else ''):<21} {r.label}: {what}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=rows_help() + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default=None, help="work directory (default out/reproduce; --quick: "
                                               "out/reproduce-quick)")
    p.add_argument("--quick", action="store_true", help="the smoke run: every row, reduced (see below)")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: every row but the optional "
                                                "ones; --quick: every row; 'all': every row)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds to compute now (default: every "
                                                 "seed: 0,1,2, and 3,4 of the main trio; --quick: 0)")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="row-seeds computed side by side, each in "
                   "its own process (default 2: both cores; 1 leaves a core to others)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training run (default 1: on a "
                   "shared machine a second thread per process waits for a core, up to 10x slower; evaluation "
                   "always uses 1)")
    p.add_argument("--publish", action="store_true", help="copy the results of --rows (all of them computed, with "
                   "the design's settings) to results/toy; computes nothing")
    p.add_argument("--partial", action="store_true", help="with --publish: also rows with only some of their seeds "
                   "(listed as pending; so that a later session can --restore them)")
    p.add_argument("--restore", metavar="RESULTS_JSON", help="write the row-seeds of a published results.json into "
                   "--out as if computed there (a fresh machine continues a published run); computes nothing")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out or os.path.join(ROOT, "out", "reproduce-quick" if args.quick else
                                                        "reproduce"))
    if args.rows in (None, "all"):
        args.rows = [r.slug for r in ROWS if args.quick or args.rows == "all" or not r.optional]
    else:
        args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in args.rows if r not in ROW]
        if unknown:
            p.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROW)}")
    settings = design_settings(args.quick)
    known = sorted({seed for r in ROWS for seed in seeds_of(r, settings) if seed is not None})
    if args.seeds is None:
        args.seeds = known
    else:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        if not set(args.seeds) <= set(known):
            p.error(f"--seeds must be among the {'--quick' if args.quick else 'design'} seeds {known}")
    if (args.publish or args.restore) and args.quick:
        p.error("--quick runs are never published or restored")
    if args.partial and not args.publish:
        p.error("--partial goes with --publish")
    if args.publish and args.restore:
        p.error("--publish and --restore are separate steps: restore first, then publish")
    return args, settings


def check_out(out, settings):
    """--out's settings.json: written by the first run, and every later run must have the same settings."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "settings.json")
    if os.path.isfile(path):
        before = read_json(path)
        if before != settings:
            raise SystemExit(f"error: {out} holds a run with other settings ({before.get('mode')}); use another --out")
    else:
        write_json(path, settings, indent=2)


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the running train.py is stopped and its attempt recorded


def main(argv=None):
    args, settings = parse_args(argv)
    if args.publish:
        try:
            written = publish(args.out, args.rows, partial=args.partial)
        except PublishError as e:
            sys.exit(f"error: {e}")
        print("published: " + ", ".join(os.path.relpath(p, ROOT) for p in written))
        return
    if args.restore:
        try:
            n = restore(args.out, args.restore)
        except PublishError as e:
            sys.exit(f"error: {e}")
        print(f"{args.out}: {n} row-seeds restored from {args.restore}")
        return
    if os.path.realpath(args.out).startswith(os.path.realpath(os.path.join(ROOT, "results")) + os.sep):
        sys.exit("error: --out must not be under results/ (--publish writes there)")
    check_out(args.out, settings)
    signal.signal(signal.SIGTERM, interrupted)
    lock = open(os.path.join(args.out, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: another scripts/reproduce.py is running in {args.out}")

    jobs = [(slug, seed) for slug in args.rows for seed in seeds_of(ROW[slug], settings)
            if seed is None or seed in args.seeds]
    jobs.sort(key=lambda job: -1 if job[1] is None else job[1])  # seed-major: the rows of a seed finish together
    todo = [(slug, seed) for slug, seed in jobs
            if not os.path.isfile(eval_path(args.out, ROW[slug], seed))]
    print(f"{args.out}: {len(jobs) - len(todo)} of {len(jobs)} row-seeds done, {len(todo)} to compute "
          f"({settings['mode']} settings, --jobs {args.jobs})", flush=True)
    t_start = time.perf_counter()

    def finished(slug, seed):
        path = eval_path(args.out, ROW[slug], seed)
        r = read_json(path)
        ppl = " ".join(f"{v['ppl']:.1f}" for v in r["ppl"].values())
        acc = " ".join(f"{v:.2f}" for v in r["passkey"].values())
        print(f"[{time.perf_counter() - t_start:6.0f}s] {slug}{'' if seed is None else f' seed {seed}'}: ppl {ppl}; "
              f"passkey {acc}", flush=True)
        write_results(args.out, settings, args.rows)

    try:
        if args.jobs == 1:
            for slug, seed in todo:
                run_row_seed(slug, seed, settings, args.out, args.threads)
                finished(slug, seed)
        else:
            context = multiprocessing.get_context("spawn")
            pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context)
            try:
                futures = {pool.submit(_worker, slug, seed, settings, args.out, args.threads): (slug, seed)
                           for slug, seed in todo}
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    finished(*futures[future])
            except BaseException:  # an error or an interruption: stop the other row-seed too (it resumes later)
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.terminate()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # a failure or Ctrl-C: nothing new starts
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: finished row-seeds are kept in {args.out}; the same command resumes")
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    _, md = write_results(args.out, settings, args.rows)
    print(md)
    print(f"\n{len(todo)} row-seeds computed in {(time.perf_counter() - t_start) / 60:.1f} min; "
          f"{args.out}/results.md, results.json and the plots written", flush=True)


if __name__ == "__main__":
    cli.run(main)
