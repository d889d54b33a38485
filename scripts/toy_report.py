"""The toy reproduction's report: results.json, results.md and the plots, from the eval.json files of a work directory.

The tables put the paper's numbers beside ours. The decision rules of DESIGN.md sections 14-16 are read here.
"""
import math
import os
import statistics

from reproduce_common import git_state, log_ticks, mean_std, read_json, write_atomically, write_json, write_text
from toy_rows import EXTREME, LONG, ROW, TRIMMED, eval_path, required_seeds, seeds_of, step_evals

SMOKE = "SMOKE RUN (--quick): not results"

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
