"""The toy reproduction's design as data: its rows, settings and seeds (results/toy/DESIGN.md sections 6-8, 15, 16).

A row is a method with its train.py arguments, or the base evaluated with a rotary scaling.
The work directory holds one folder per row and seed; eval.json marks a row-seed done.
"""
import os
from typing import NamedTuple

from reproduce_common import read_json, row_dir, write_json

BASE = "assets/tiny"  # paths relative to the repository
TRAIN_DATA = "assets/books/train"
EVAL_DATA = "assets/books/eval"
REPLAY = "assets/replay/passkey-256.npz"

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


def eval_path(out, row, seed):
    """A row-seed's eval.json: it exists once the row-seed is done."""
    return os.path.join(row_dir(out, row, seed), "eval.json")


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
