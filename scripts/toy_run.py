"""One row-seed of the toy reproduction: training, the answer-target census, evaluation and eval.json.

Training is train.py in a subprocess; an interrupted run resumes from its last checkpoint.
Evaluation calls the measurement functions on one thread: perplexity, passkey and recall by distance.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from reproduce_common import git_state, read_json, row_dir, write_json
from toy_rows import EXTENDED, EXTENDED_QUICK, ROW, eval_path, row_train_args, step_evals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    from lib import checkpoints

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
    from lib import checkpoints
    from lib import hf
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
    from lib import evaluation

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
    model = next(evaluation.load([model_dir], [rope.CHECKPOINT if row.train else row.rope])).model
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
