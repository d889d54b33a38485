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
import multiprocessing
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from lib import cli  # noqa: E402
from reproduce_common import read_json  # noqa: E402
from toy_publish import publish, restore  # noqa: E402
from toy_report import PublishError, write_results  # noqa: E402
from toy_rows import ROW, ROWS, TOKEN_MATCHED, check_out, design_settings, eval_path, seeds_of  # noqa: E402
from toy_run import run_row_seed  # noqa: E402


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


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the running train.py is stopped and its attempt recorded


def _worker(slug, seed, settings, out, threads):  # a --jobs 2 process
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run_row_seed(slug, seed, settings, out, threads)
    except KeyboardInterrupt:  # stopped by the main process: end this worker, or the pool hands it the next job
        os._exit(130)


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
