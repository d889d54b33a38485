"""The real-model experiment of results/smollm2/DESIGN.md: SmolLM2-135M (an 8192-token window) extended to 16384
tokens, by interpolation alone and by fine-tuning at 1024 tokens with and without PoSE's skips.

    python scripts/get_smollm2.py                          # once: the checkpoint, out/smollm2-135m
    python scripts/reproduce_smollm2.py --out out/smollm2  # the design's run (hours on 2 cores; resumable)
    python scripts/reproduce_smollm2.py --rows pose,pi-ft  # a part of it, in the same --out
    python scripts/reproduce_smollm2.py --rows pose --seeds 1,2   # some seeds of a fine-tuned row
    python scripts/reproduce_smollm2.py --publish          # a finished design run -> results/smollm2
    python scripts/reproduce_smollm2.py --quick --out /tmp/sq   # smoke run: every row, tiny sizes (minutes)

Rows. Without training, the base evaluated with --rope none, linear:2, ntk:2 and yarn:2 (factor target / 8192).
Fine-tuned: `train.py --method pi` (no skips: positions 0..1023) and `--method pose --chunks 2` (positions up to
16383), both `--rope yarn` (x2 over 8192), on the bundled train books prepared once by data.py with the model's
tokenizer.json, the same steps, batch, learning rate and seeds (0, 1, 2: DESIGN.md's second section); no replay
(the paper recipe).

Evaluation, by the functions, one thread, the same text and probes for every model: evaluate.perplexity on the first
held-out play of at least 16384 tokens (truncated to 16384) at ctx 4096, 8192 and 16384 with stride 4096, so every
ctx scores the same 16383 tokens; recall.run_recall's copy recall (a 32-token passage seen again exactly d tokens
later, in sequences of 1024 x 2^k tokens, several probes per sequence), then more draws of the longest sequences
(copy_more: the probes beyond the base's window come from 2 + 6 sequences), every probe with its sequence; and, for
Original, YaRN-only and the two fine-tuned rows, its passkey at fixed distances.

The decision rule (DESIGN.md, 2026-12-06): per seed, the region means of copy NLL of PoSE minus PI-no-skips; a
finding when the 3 seeds share a sign and |t| over seeds > 4.30. Beside it: PI-no-skips seed 1 minus seed 0 (the null
calibration) and both fine-tuned rows against YaRN-only. The report computes them once every seed has every copy
part, and lists what is pending before that.

Work lives under --out only: OUT/data (the prepared books), OUT/ROW[/seedS] with run/ (train.py's run, resumed from
its last checkpoint), and one JSON per evaluation part (ppl.json, copy.json, copy_more.json, passkey.json: a part
that exists is not recomputed), then eval.json. After every part OUT/results.json, results.md and the plots are
rewritten. --publish copies them to results/smollm2 only from a design run with every row done. A work directory of
the first design (seed 0, no copy_more) is taken up: its parts are parts of this design.
"""
import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from lib import cli  # noqa: E402
from reproduce_common import (git_state, log_ticks, mean_std, read_json, row_dir, write_atomically,  # noqa: E402
                              write_json, write_text)

RESULTS = os.path.join(ROOT, "results", "smollm2")
PUBLISHED = ("results.json", "results.md", "recall.png", "ppl.png")
SMOKE = "SMOKE RUN (--quick): not results"
PARTS = ("ppl", "copy", "copy_more", "passkey")
RULE_T = 4.30  # Student's t, two-sided 5%, 2 degrees of freedom (3 seeds): 4.303, as the toy's rule rounds it


class Row(NamedTuple):
    slug: str
    label: str
    train: tuple = ()  # train.py's own arguments; () = no training
    rope: str = ""  # the base's rotary scaling when the row does not train
    passkey: bool = True  # the passkey part (the design's four rows; the two other interpolations skip it)


def seeds_of(row, settings):
    """The design's seeds; none for a row that does not train."""
    return list(settings["seeds"]) if row.train else [None]


ROWS = (
    Row("original", "Original (8k window)", rope="none"),
    Row("linear-only", "Linear (PI) x2, no training", rope="linear:2", passkey=False),
    Row("ntk-only", "NTK x2, no training", rope="ntk:2", passkey=False),
    Row("yarn-only", "YaRN x2, no training", rope="yarn:2"),
    Row("pi-ft", "PI-no-skips, YaRN x2, trained at 1024", ("--method", "pi", "--rope", "yarn")),
    Row("pose", "PoSE N=2, YaRN x2, trained at 1024", ("--method", "pose", "--chunks", "2", "--rope", "yarn")),
)
ROW = {r.slug: r for r in ROWS}
PAIR = ("pose", "pi-ft")  # the decisive comparison: skips or not, everything else equal


def design_settings(quick=False):
    """Every setting of the run (results/smollm2/DESIGN.md); --quick's reduced version."""
    s = dict(mode="quick" if quick else "design", base="out/smollm2-135m", train_data="assets/books/train",
             eval_data="assets/books/eval", window=8192, target=16384, train_len=1024, steps=40, batch_size=1,
             micro_batch_size=1, lr=5e-5, warmup=4, save_every=5, seeds=[0, 1, 2],
             ppl_docs=1, ctx=[4096, 8192, 16384], ppl_stride=4096,
             ladder=1024, passage=32, sequences=2, more_sequences=6, copy_seed=0,
             distances=[256, 512, 768, 896, 1024, 1536, 1920, 2048, 3072, 3968, 4096, 5120, 6144, 7168, 8064,
                        8192, 9216, 10240, 11264, 12288, 13312, 14336, 15360, 16256],
             passkey_distances=[768, 3072, 12288], passkey_trials=2, passkey_seed=0)
    if quick:
        s.update(steps=2, batch_size=1, warmup=1, save_every=1, seeds=[0], train_len=256, ctx=[512, 1024],
                 ppl_stride=512, ladder=256, sequences=1, more_sequences=1, distances=[128, 192, 384, 768],
                 passkey_distances=[192], passkey_trials=1)
    return s


def first_design(settings):
    """The settings of DESIGN.md's first section: seed 0 only, no copy_more. Its runs are parts of this design."""
    return dict({k: v for k, v in settings.items() if k != "more_sequences"}, seeds=[0])


def longest(settings):
    """The copy distances measured in sequences of the target's length: copy_more draws more of these."""
    import recall
    return [d for d in settings["distances"]
            if recall.group_length(d + 2 * settings["passage"] + 1, settings["ladder"]) == settings["target"]]


def parts_of(row):
    return [p for p in PARTS if p != "passkey" or row.passkey]


def load(path):
    return read_json(path) if os.path.isfile(path) else None


# ----------------------------------------------------------------------------------------------------------------
# data and training (train.py and data.py as commands: what users run)

def run_logged(cmd, log_path, what):
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code:
        tail = open(log_path).read().strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited with {code}; {log_path} ends with: " + " | ".join(tail))


def prepared_data(out, settings):
    """The train books tokenized once by data.py with the model's tokenizer (OUT/data/train.*)."""
    prefix = os.path.join(out, "data", "train")
    if not os.path.isfile(prefix + ".json"):  # data.py writes its .json last
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        run_logged([sys.executable, "data.py", "--input", settings["train_data"], "--tokenizer", settings["base"],
                    "--out", prefix, "--overwrite", "--min-tokens", str(settings["train_len"]), "--threads", "1"],
                   os.path.join(out, "data", "data.log"), "data.py")
    return prefix


def train_args(row, settings, seed, data):
    return ["--model", settings["base"], "--data", data, "--target", str(settings["target"]),
            "--train-len", str(settings["train_len"]), "--steps", str(settings["steps"]),
            "--batch-size", str(settings["batch_size"]), "--micro-batch-size", str(settings["micro_batch_size"]),
            "--lr", str(settings["lr"]), "--warmup", str(settings["warmup"]), "--seed", str(seed),
            "--replay", "none", "--save-every", str(settings["save_every"]), "--precision", "fp32",
            "--threads", "1", *row.train]


def train(row, seed, settings, folder, data):
    """train.py for one row and seed into folder/run (resumed when a checkpoint is there); its wall time."""
    from lib import checkpoints
    run = os.path.join(folder, "run")
    if os.path.isfile(os.path.join(run, "config.json")):  # exported: config.json is written last
        return run
    cmd = [sys.executable, "train.py", *train_args(row, settings, seed, data), "--out", run, "--delete-checkpoints"]
    if os.path.isdir(run) and checkpoints.latest(run)[1]:
        cmd.append("--resume")
    os.makedirs(folder, exist_ok=True)
    run_logged(cmd, os.path.join(folder, "train.log"), f"{row.slug} seed {seed}: train.py")
    return run


# ----------------------------------------------------------------------------------------------------------------
# evaluation, part by part

def evaluate_part(part, model, tokenizer, settings):
    import data
    import evaluate
    import recall

    corpus = data.load_corpus(os.path.join(ROOT, settings["eval_data"]), tokenizer,
                              min_tokens=max(settings["ctx"]) if part == "ppl" else 1)
    if part == "ppl":
        docs = [corpus[i][:max(settings["ctx"])] for i in range(settings["ppl_docs"])]
        return {str(ctx): {k: v for k, v in evaluate.perplexity(model, docs, ctx, settings["ppl_stride"]).items()
                           if k in ("ppl", "nll", "tokens", "windows")} for ctx in settings["ctx"]}
    if part == "copy":
        return recall.run_recall(model, tokenizer, recall.held_out_stream(corpus), settings["distances"],
                                 settings["ladder"], ["copy"], settings["passage"], settings["sequences"],
                                 seed=settings["copy_seed"])["copy"]
    if part == "copy_more":  # draws sequences .. sequences + more_sequences - 1 of the longest copy sequences
        seqs = recall.copy_sequences(recall.held_out_stream(corpus), tokenizer.start_id, longest(settings),
                                     settings["ladder"], settings["passage"],
                                     settings["sequences"] + settings["more_sequences"], settings["copy_seed"],
                                     skip=settings["sequences"])
        return [r for seq in seqs for r in recall.score_copy(model, seq, settings["passage"])]
    return recall.run_recall(model, tokenizer, None, settings["passkey_distances"], settings["ladder"], ["passkey"],
                             trials=settings["passkey_trials"], seed=settings["passkey_seed"])["passkey"]


def run_row_seed(slug, seed, settings, out, data, report):
    """Train (if the row trains) and evaluate one row-seed, part by part; eval.json when every part is there (an
    eval.json of the first design gains the parts it lacks)."""
    import torch

    import rope
    from lib import evaluation
    from lib import tokenizer as tokenizers

    row = ROW[slug]
    folder = row_dir(out, row, seed)
    before = load(os.path.join(folder, "eval.json")) or {}
    if all(part in before for part in parts_of(row)):
        return
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = train(row, seed, settings, folder, data) if row.train else os.path.join(ROOT, settings["base"])
    train_s = round(time.perf_counter() - t0, 1) if row.train else None
    torch.set_num_threads(1)
    tok = tokenizers.Tokenizer(model_dir)
    model = next(evaluation.load([model_dir], [rope.CHECKPOINT if row.train else row.rope])).model
    model.eval()
    cost = {}
    for part in parts_of(row):
        path = os.path.join(folder, part + ".json")
        if not os.path.isfile(path):
            t0 = time.perf_counter()
            with torch.no_grad():
                value = evaluate_part(part, model, tok, settings)
            write_json(path, {"value": value, "seconds": round(time.perf_counter() - t0, 1),
                              "loadavg": os.getloadavg()})
            report(f"{slug}{'' if seed is None else f' seed {seed}'}: {part} in {time.perf_counter() - t0:.0f} s")
        cost[part + "_s"] = read_json(path)["seconds"]
    result = {"row": slug, "label": row.label, "seed": seed, "settings": settings,
              "rope_scaling": model.cfg.rope_scaling, "rope": rope.describe_rope(model.cfg.rope_scaling),
              "git": git_state(), "cost": cost}
    for part in parts_of(row):
        result[part] = read_json(os.path.join(folder, part + ".json"))["value"]
    if row.train:
        log = [json.loads(line) for line in open(os.path.join(model_dir, "log.jsonl"))]
        result["train_args"] = train_args(row, settings, seed, "OUT/data/train")
        result["train"] = {"final_loss": log[-1]["loss"], "losses": [e["loss"] for e in log],
                           "seconds_per_step": sorted(e["seconds"] for e in log)[len(log) // 2],
                           "peak_mem_gb": max(e["peak_mem_gb"] for e in log),
                           "wall_s_this_attempt": before.get("train", {}).get("wall_s_this_attempt", train_s)}
    write_json(os.path.join(folder, "eval.json"), result)


# ----------------------------------------------------------------------------------------------------------------
# results

def recall_means(records, distances, field):
    return [mean_std([r[field] for r in records if r["distance"] == d])[0] for d in distances]


# Student's t, two-sided 5%: the 97.5% quantile by degrees of freedom (1..30), for the decision rule of DESIGN.md
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_copy(a, b, lo, hi):
    """Per-probe copy NLL differences a - b (the same probes: same tokenizer and seed) for lo < distance <= hi:
    mean, sd, n, t, the critical value for n - 1 degrees of freedom and the verdict (|t| above it)."""
    key = lambda r: (r["distance"], r["length"], r["first"], r["source"])  # noqa: E731
    other = {key(r): r["copy_nll"] for r in b}
    diffs = [r["copy_nll"] - other[key(r)] for r in a if lo < r["distance"] <= hi and key(r) in other]
    mean, sd = mean_std(diffs)
    t = mean / (sd / len(diffs) ** 0.5) if sd else None
    critical = T_975[len(diffs) - 2] if 2 <= len(diffs) <= len(T_975) + 1 else None
    return {"mean": mean, "sd": sd, "n": len(diffs), "t": t, "critical": critical,
            "finding": None if t is None or critical is None else abs(t) > critical}


def rebuild_sequences(records, settings):
    """The copy part's records with their sequence: as recorded, or, for records made before probes recorded it,
    rebuilt. The places of the probes are a function of the seed, the distances, the ladder, the passage and the
    count of sequences, not of the text (recall.copy_sequences): the construction rebuilt on a stand-in text gives
    each probe's sequence. Where the rebuilt places (distance, length, first position) do not match the records one
    for one, the sequence is unknown (None)."""
    import numpy as np

    import recall

    if all("sequence" in r for r in records):
        return records
    stand_in = np.zeros(4 * settings["target"], dtype=np.int64)
    seqs = recall.copy_sequences(stand_in, 0, settings["distances"], settings["ladder"], settings["passage"],
                                 settings["sequences"], settings["copy_seed"])
    places = [(p.distance, len(seq.ids), p.first, seq.name) for seq in seqs for p in seq.probes]
    if [(r["distance"], r["length"], r["first"]) for r in records] != [x[:3] for x in places]:
        return [dict(r, sequence=None) for r in records]
    return [dict(r, sequence=x[3]) for r, x in zip(records, places)]


def copy_records(r):
    """Every copy probe of a row-seed: the copy part's and copy_more's."""
    return r.get("copy", []) + r.get("copy_more", [])


def sequences_beyond(r, settings):
    """How many sequences hold the row-seed's probes beyond the base's window (None: some sequence unknown)."""
    names = [p["sequence"] for p in copy_records(r) if p["distance"] > settings["window"]]
    return None if None in names else len(set(names))


def effective_distances(r, settings):
    """recall.effective_distance of the row-seed's copy probes and passkey trials (those it has)."""
    import recall

    reach = {}
    if "copy" in r:
        reach.update(recall.effective_distance(recall.summarize({"copy": copy_records(r)}, settings["distances"])))
    if "passkey" in r:
        reach.update(recall.effective_distance(recall.summarize({"passkey": r["passkey"]},
                                                                settings["passkey_distances"])))
    return reach


def over_seeds(diffs):
    """The rule of DESIGN.md's second section on per-seed differences: their mean, sd, the t over seeds, and a
    finding when every seed has one sign and |t| > RULE_T (no t without spread)."""
    mean, sd = mean_std(diffs)
    t = mean / (sd / len(diffs) ** 0.5) if sd else None
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return {"diffs": diffs, "mean": mean, "sd": sd, "t": t, "finding": t is not None and same_sign and abs(t) > RULE_T}


def seed_rule(rows, settings):
    """The comparisons of DESIGN.md's second section, on each row-seed's region means of copy NLL over all its
    probes: PoSE - PI-no-skips per seed (the rule), PoSE - YaRN-only and PI-no-skips - YaRN-only per seed (the same
    rule), and PI-no-skips seed 1 - seed 0 (the null calibration, no verdict). Until every row-seed they need has
    both copy parts: {"pending": [what is missing]}."""
    seeds = [str(x) for x in settings["seeds"]]
    needed = [(slug, seed) for slug in PAIR for seed in seeds] + [("yarn-only", "None")]
    pending = [f"{slug}{'' if seed == 'None' else f' seed {seed}'} {part}" for slug, seed in needed
               for part in ("copy", "copy_more") if part not in rows[slug]["seeds"].get(seed, {})]
    if pending:
        return {"pending": pending}
    means = {(slug, seed): {name: region_mean(copy_records(rows[slug]["seeds"][seed]), lo, hi, "copy_nll")
                            for name, (lo, hi) in regions(settings).items()} for slug, seed in needed}
    names = [name for name in regions(settings) if all(m[name] is not None for m in means.values())]  # has probes

    def mean_of(slug, seed):  # YaRN-only has no seed
        return means[(slug, "None" if slug == "yarn-only" else seed)]

    rule = {f"{a} - {b}": {name: over_seeds([mean_of(a, x)[name] - mean_of(b, x)[name] for x in seeds])
                           for name in names}
            for a, b in (("pose", "pi-ft"), ("pose", "yarn-only"), ("pi-ft", "yarn-only"))}
    if "1" in seeds:
        rule["null: pi-ft seed 1 - seed 0"] = {name: mean_of("pi-ft", "1")[name] - mean_of("pi-ft", "0")[name]
                                               for name in names}
    return rule


def collect(out, settings):
    rows, rebuilt = {}, []
    for row in ROWS:
        seeds = {}
        for seed in seeds_of(row, settings):
            folder = row_dir(out, row, seed)
            parts = {part: load(os.path.join(folder, part + ".json")) for part in PARTS}
            result = load(os.path.join(folder, "eval.json")) or {}
            r = dict(result, **{p: v["value"] for p, v in parts.items() if v})
            if "copy" in r and not all("sequence" in p for p in r["copy"]):
                r["copy"] = rebuild_sequences(r["copy"], settings)
                rebuilt.append(f"{row.slug}{'' if seed is None else f' seed {seed}'}")
            r["effective_distance"] = effective_distances(r, settings)
            seeds[str(seed)] = r
        rows[row.slug] = {"label": row.label, "train": list(row.train), "rope": row.rope, "seeds": seeds}
    results = {"settings": settings, "git": git_state(), "rows": rows, "regions": regions(settings),
               "seed_rule": seed_rule(rows, settings), "sequences_rebuilt": rebuilt}
    pair = [rows[slug]["seeds"].get(str(seed), {}) for slug in PAIR for seed in settings["seeds"][:1]]
    if all("copy" in p for p in pair):  # the first design's per-probe test: seed 0, the copy part's probes
        results["pose_minus_pi_copy_nll"] = {name: paired_copy(pair[0]["copy"], pair[1]["copy"], lo, hi)
                                             for name, (lo, hi) in regions(settings).items()}
    return results


def regions(s):
    """Distance ranges of the decision rule: inside the training window, beyond it but inside the base's window,
    beyond the base's window."""
    return {"trained": (0, s["train_len"]), "beyond_train": (s["train_len"], s["window"]),
            "beyond_window": (s["window"], s["target"])}


def region_mean(records, lo, hi, field):
    return mean_std([r[field] for r in records if lo < r["distance"] <= hi])[0]


def markdown(results):
    s = results["settings"]
    fmt = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = ([f"**{SMOKE}**", ""] if s["mode"] == "quick" else []) + [
        f"# SmolLM2-135M, {s['window']} -> {s['target']} tokens (results/smollm2/DESIGN.md)", "",
        f"Perplexity on one held-out play ({max(s['ctx'])} tokens, stride {s['ppl_stride']}: every ctx scores the "
        "same tokens); copy recall: mean NLL of a 32-token passage at its second sight / at its first, by distance "
        "region (trained: d <= train_len; beyond_train: train_len < d <= window; beyond_window: d > window), over "
        f"every probe ({s['sequences']} sequences per length, {s['more_sequences']} more of {s['target']} tokens); "
        "passkey accuracy at fixed distances. Effective distance (recall.py): the largest tested d up to which every "
        "tested distance meets its threshold (copy: second-sight NLL at most half the first-sight NLL; passkey: "
        "accuracy >= 0.5); 0: not even the shortest. Sequences: how many sequences hold the probes beyond the window.",
        "",
        "| row | " + " | ".join(f"ppl {c}" for c in s["ctx"]) + " | copy ratio " +
        " | copy ratio ".join(results["regions"]) + " | " +
        " | ".join(f"passkey {d}" for d in s["passkey_distances"]) +
        " | effective distance, copy | effective distance, passkey | sequences, d > window |",
        "| --- " * (4 + len(s["ctx"]) + len(results["regions"]) + len(s["passkey_distances"])) + "|"]
    for slug, row in results["rows"].items():
        for seed, r in row["seeds"].items():
            ppl = [fmt(r["ppl"][str(c)]["ppl"]) if "ppl" in r else "pending" for c in s["ctx"]]
            ratios = []
            for lo, hi in results["regions"].values():
                if "copy" in r:
                    first = region_mean(copy_records(r), lo, hi, "first_nll")
                    copy = region_mean(copy_records(r), lo, hi, "copy_nll")
                    ratios.append(fmt(copy / first if first else None))
                else:
                    ratios.append("pending")
            keys = [fmt(v) for v in recall_means(r["passkey"], s["passkey_distances"], "correct")] \
                if "passkey" in r else ["pending" if ROW[slug].passkey else "-"] * len(s["passkey_distances"])
            reach = [str(r["effective_distance"][task]) if task in r["effective_distance"] else
                     ("pending" if task == "copy" or ROW[slug].passkey else "-") for task in ("copy", "passkey")]
            n = sequences_beyond(r, s) if "copy" in r else "pending"
            more = "" if "copy_more" in r or "copy" not in r else " (copy_more pending)"
            name = row["label"] + ("" if seed == "None" else f" (seed {seed})")
            lines.append(f"| {name} | " + " | ".join(ppl + ratios + keys + reach) +
                         f" | {'unknown' if n is None else n}{more} |")
    if results.get("sequences_rebuilt"):
        lines += ["", "The copy part of " + ", ".join(results["sequences_rebuilt"]) + " was recorded without each "
                  "probe's sequence: it is rebuilt from the construction (rebuild_sequences; unknown where the places "
                  "do not match)."]
    lines += ["", "Perplexity: the training books hold 31 Shakespeare plays and the evaluation text is Hamlet (held "
              "out). The fine-tuned rows gain from this domain adaptation: their lead over the rows without training "
              "is no evidence of a longer context. PoSE and PI-no-skips read the same books."]
    lines += ["", "## The rule over seeds (DESIGN.md, 2026-12-06)", "",
              f"Copy NLL at the second sight, mean over every probe of a region, per seed ({len(s['seeds'])} seeds; "
              "negative: the first row recalls better). A finding when every seed has one sign and |t| over seeds "
              f"> {RULE_T:.2f}. YaRN-only is one model without training: did fine-tuning help at all?", ""]
    rule = results["seed_rule"]
    if "pending" in rule:
        lines.append("Pending (the rule is computed once all of these are there): " + ", ".join(rule["pending"]) +
                     ".")
    else:
        lines += ["| comparison | region | per-seed difference | mean | sd | t | finding |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, by_region in rule.items():
            if name.startswith("null"):
                continue
            for region, v in by_region.items():
                lines.append(f"| {name} | {region} | " + ", ".join(f"{d:+.3f}" for d in v["diffs"]) +
                             f" | {v['mean']:+.3f} | {fmt(v['sd'], 3)} | {fmt(v['t'])} | "
                             f"{'yes' if v['finding'] else 'no'} |")
        null = rule.get("null: pi-ft seed 1 - seed 0")
        lines += ["", "Null calibration, PI-no-skips seed 1 - seed 0 (two runs that differ only in their seed; no "
                  "verdict): " + ("-" if null is None else
                                  ", ".join(f"{region} {d:+.3f}" for region, d in null.items())) + "."]
    if "pose_minus_pi_copy_nll" in results:
        lines += ["", "## Seed 0 alone, per probe (DESIGN.md's first section; it decides nothing now)", "",
                  "PoSE - PI-no-skips seed 0, copy NLL at the second sight, per probe of the copy part (the same "
                  "probes; negative: PoSE recalls better), |t| against Student's two-sided 5% point for n - 1 "
                  "degrees of freedom. Its t measures the evaluation's noise, not the training's.", "",
                  "| region | mean | sd | n | t | critical | finding |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, d in results["pose_minus_pi_copy_nll"].items():
            verdict = "-" if d["finding"] is None else ("yes" if d["finding"] else "no")
            lines.append(f"| {name} | {fmt(d['mean'], 3)} | {fmt(d['sd'], 3)} | {d['n']} | {fmt(d['t'])} | "
                         f"{fmt(d['critical'], 3)} | {verdict} |")
    return "\n".join(lines) + "\n"


def plots(results, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for slug, row in results["rows"].items():
        for seed, r in row["seeds"].items():
            if "copy" in r:
                first = recall_means(copy_records(r), s["distances"], "first_nll")
                copy = recall_means(copy_records(r), s["distances"], "copy_nll")
                label = row["label"] + ("" if seed == "None" else f" (seed {seed})")
                ax.plot(s["distances"], [c / f for c, f in zip(copy, first)], marker=".", label=label)
    for x, style in ((s["train_len"], "-."), (s["window"], ":"), (s["target"], "--")):
        ax.axvline(x, color="gray", linestyle=style, linewidth=0.8)
    ax.set(xscale="log", xlabel="distance d (tokens; dash-dot: train_len, dotted: window, dashed: target)",
           ylabel="copy NLL / first-sight NLL", title=SMOKE if s["mode"] == "quick" else "copy recall by distance")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    write_atomically(os.path.join(folder, "recall.png"), lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for slug, row in results["rows"].items():
        for seed, r in row["seeds"].items():
            if "ppl" in r:
                ax.plot(s["ctx"], [r["ppl"][str(c)]["ppl"] for c in s["ctx"]], marker="o", label=row["label"])
    ax.axvline(s["window"], color="gray", linestyle=":", linewidth=0.8)
    log_ticks(ax)
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="perplexity",
           title=SMOKE if s["mode"] == "quick" else "held-out perplexity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    write_atomically(os.path.join(folder, "ppl.png"), lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)


def write_results(out, settings, folder=None):
    folder = folder or out
    results = collect(out, settings)
    write_json(os.path.join(folder, "results.json"), results, separators=(",", ":"))
    write_text(os.path.join(folder, "results.md"), markdown(results))
    plots(results, folder)
    return results


def publish(out):
    settings = load(os.path.join(out, "settings.json"))
    if settings is None or settings.get("mode") != "design" or settings != design_settings():
        raise SystemExit(f"error: {out} holds no design run of this script (a --quick run is never published)")
    missing = [f"{r.slug}{'' if seed is None else f' seed {seed}'}" for r in ROWS for seed in seeds_of(r, settings)
               if not all(part in (load(os.path.join(row_dir(out, r, seed), "eval.json")) or {})
                          for part in parts_of(r))]
    if missing:
        raise SystemExit(f"error: not computed in {out}: {', '.join(missing)}; nothing published")
    write_results(out, settings)
    os.makedirs(RESULTS, exist_ok=True)
    for name in PUBLISHED:
        shutil.copyfile(os.path.join(out, name), os.path.join(RESULTS, name + ".tmp"))
        os.replace(os.path.join(RESULTS, name + ".tmp"), os.path.join(RESULTS, name))
    return [os.path.join(RESULTS, name) for name in PUBLISHED]


# ----------------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work directory (default out/smollm2; --quick: out/smollm2-quick)")
    p.add_argument("--quick", action="store_true", help="the smoke run: every row at tiny sizes")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default all: {', '.join(ROW)})")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds of the fine-tuned rows to compute "
                                                 "now (default: the design's, 0,1,2; --quick: 0)")
    p.add_argument("--publish", action="store_true", help="copy a finished design run's results to results/smollm2")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(ROOT, "out", "smollm2-quick" if args.quick else "smollm2"))
    if args.publish:
        print("published: " + ", ".join(os.path.relpath(x, ROOT) for x in publish(out)))
        return
    rows = [r.strip() for r in (args.rows or ",".join(ROW)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROW)}")
    settings = design_settings(args.quick)
    try:
        seeds = settings["seeds"] if args.seeds is None else [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or not set(seeds) <= set(settings["seeds"]):
        p.error(f"--seeds must be among the {settings['mode']} seeds {settings['seeds']}, got {args.seeds!r}")
    if not os.path.isfile(os.path.join(ROOT, settings["base"], "config.json")):
        sys.exit(f"error: {settings['base']} is missing: run python scripts/get_smollm2.py first")
    os.makedirs(out, exist_ok=True)
    before = load(os.path.join(out, "settings.json"))
    if before is not None and before not in (settings, first_design(settings)):  # the first design's run: taken up
        sys.exit(f"error: {out} holds a run with other settings ({before.get('mode')}); use another --out")
    write_json(os.path.join(out, "settings.json"), settings, indent=2)
    t_start = time.perf_counter()

    def report(message):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {message}", flush=True)
        write_results(out, settings)

    try:
        data = prepared_data(out, settings)
        for slug in rows:
            with open(os.path.join(out, f".lock.{slug}"), "w") as lock:  # two processes may share --out, not a row
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    sys.exit(f"error: another scripts/reproduce_smollm2.py computes {slug} in {out}")
                for seed in seeds_of(ROW[slug], settings):
                    if seed is None or seed in seeds:
                        run_row_seed(slug, seed, settings, out, data, report)
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: finished parts are kept in {out}; the same command resumes")
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    print(markdown(write_results(out, settings)))


if __name__ == "__main__":
    cli.run(main)
