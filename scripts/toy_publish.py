"""Publishing the toy reproduction, and restoring a published run.

Finished rows are copied to results/toy, only from a run with the design's settings.
A published results.json restored into a work directory counts as computed there.
Nothing else writes under results/.
"""
import os
import shutil
import tempfile

from reproduce_common import read_json, write_json
from toy_report import PublishError, write_results
from toy_rows import ROW, check_out, design_settings, eval_path, required_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results", "toy")  # where --publish writes (design v2; v1 is in results/toy/v1)
PUBLISHED = ("results.json", "results.md", "ppl.png", "passkey.png", "passkey_depth.png", "recall.png")


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
