"""Prove the CUDA path on one GPU (or several) in under 10 minutes, and measure memory and speed there.

    python scripts/gpu_check.py                      # writes out/gpu_check/results.json and results.md
    python scripts/gpu_check.py --out DIR --layers 4 8 --only logits train memory speed passkey compile
    python scripts/gpu_check.py --rehearse --out /tmp/rehearsal    # every section on the CPU at tiny sizes

Needs one CUDA GPU (H100 / H200 class: the memory section wants about 45 GB at --layers 4 8), PyTorch with CUDA,
transformers, sentencepiece, safetensors and tqdm; no network. flash-attn is used when it is installed. Without CUDA
it prints one line and exits 0; --rehearse runs every section on the CPU at tiny sizes instead (the GPU hidden), the
same functions and train.py / scripts/bench.py commands as the GPU run (about 3 minutes on a busy 2-core CPU). It exits 1
when a check fails. Every section is a function that takes a device, so tests/test_gpu_check.py runs the same code on
the CPU.

Sections (each prints its progress on stderr and adds rows to one table; each measured section has a row naming the
attention backend it used):
  1. logits    our model in bf16 on CUDA (SDPA, and flash-attn when importable) against fp32 CPU logits of the same
               weights: GQA, rope types none / linear / yarn / llama3 / dynamic, PoSE's skipped positions up to 8x the
               window. Relative error within LOGITS_TOL (the why is beside the constant).
  2. train     `torchrun train.py` on the bundled tiny model and books, bf16 with activation checkpointing, --replay
               none: FSDP2 over NCCL (gloo on the CPU). Its losses against the same run in fp32 on the CPU (GPU
               hidden). A second straight run of the same command measures the noise floor (kernel nondeterminism).
               The same run killed with SIGKILL after a checkpoint and resumed: log losses and final weights against
               the uninterrupted run, within NOISE_MULTIPLE x the floor. With N >= 2 GPUs (2 gloo processes on the
               CPU): N processes against 1, losses and final weights. A --cpu-offload run (N processes, else 1)
               against the plain run of the same processes. With one GPU the N-process rows say skipped, and why.
  3. memory    `scripts/bench.py memory` at LLaMA-7B's layer shape with two layer counts: train.py's own FSDP2 model, batches
               and optimizer steps (bf16, activation checkpointing, 2048 tokens per example), and evaluation windows
               of 32k and 128k tokens through evaluate.perplexity. The weights, gradients and AdamW state, counted
               tensor by tensor and read from the allocator, against lib/memory.py's plan of the same run (train.py
               --dry-run); the step's peak beside the plan; a straight line through the two layer counts gives each
               quantity at 32 layers, and LLaMA-7B per GPU at 8 GPUs beside `train.py --dry-run --world 8`.
  4. speed     `scripts/bench.py speed` at the larger layer count: tokens/s and model FLOPs utilization of train.py's optimizer
               step, PoSE (2048 tokens, positions up to 16k) vs full-length (16k tokens), and forward + backward of
               our model (its attention backend named) vs transformers' LlamaForCausalLM (sdpa) on the same weights,
               timed alternately.
  5. passkey   passkey retrieval at 16k and 32k tokens on CUDA in bf16 with the KV cache against re-reading the whole
               sequence at each step: the same answers, and the same logits within LOGITS_TOL at every answer step.
  6. compile   `train.py --compile` against eager, the same command otherwise: tokens/s of train.py's own step (from
               its log), the losses of the first steps (bf16, within TRAIN_LOSS_RTOL), the recompilations that
               TORCH_LOGS=recompiles reports. Twice: the bundled tiny model with activation checkpointing, and 2
               layers of LLaMA-7B's shape (fresh weights, 2048 tokens, no checkpointing, as the plan chooses for
               LLaMA-7B on 8 x 80 GB).

Memory and speed run `python scripts/bench.py SECTION --device cuda --layers ... --json OUT/bench_SECTION.json` and turn
its JSON into rows; scripts/bench.py measures each model size in a fresh process, so that it starts from an empty CUDA
allocator. This script defines no model setup, batch or training step of its own.

The code of the sections sits beside this file. scripts/gpu_check_model.py holds sections 1 and 5 (our model in this
process). scripts/gpu_check_train.py holds sections 2 and 6 (train.py runs). scripts/gpu_check_bench.py holds sections
3 and 4 (scripts/bench.py runs). scripts/gpu_check_common.py holds the tolerances and what the sections share. This
file writes the results and holds the command line.

Time on one H100, estimated from the sizes (a train.py run of the tiny model costs about 15 s: two Python and CUDA
starts under torchrun, 24 steps of 4096 tokens, 7 small checkpoints; a first compilation of a block's forward and
backward about 30 s, twice per compiled run as the rope cache's first fill recompiles it):
  logits   20 s   5 rope types x (CPU fp32 and bf16 references of a 4-layer model, 1-2 GPU runs)
  train   130 s   6 train.py runs on the GPU (7 with 2+ GPUs) and one on the host's CPU
  memory   60 s   two scripts/bench.py processes (4 and 8 layers of LLaMA-7B, 3 steps, 32k and 128k windows)
  speed    80 s   one scripts/bench.py process: 12 steps of 2k and 16k tokens, writing and loading 8 layers for transformers
  passkey  20 s   2 lengths x 3 trials x 2 ways on a 4-layer model
  compile 170 s   4 train.py runs, two of them compiling; writing a 0.9 GB checkpoint
  total   about 8 minutes.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gpu_check_bench import section_memory, section_speed  # noqa: E402
from gpu_check_common import log, row  # noqa: E402
from gpu_check_model import flash_attn_available, logits_config, section_logits, section_passkey  # noqa: E402
from gpu_check_train import section_compile, train_check  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------------
# output and main

def markdown(rows, header):
    lines = [header, "", "| section | check | measured | reference / limit | status |",
             "| --- | --- | --- | --- | --- |"]

    def cell(text):  # an error message may hold newlines or pipes
        return " ".join(str(text).split()).replace("|", "\\|")

    for r in rows:
        lines.append("| " + " | ".join(cell(r[k]) for k in ("section", "check", "value", "reference", "status")) + " |")
    return "\n".join(lines) + "\n"


def write_results(out, rows, meta):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2, default=float)
    header = (f"# gpu_check on {meta['device']} (torch {meta['torch']}, CUDA {meta['cuda']}, flash-attn "
              f"{'yes' if meta['flash_attn'] else 'no'}), {meta['seconds']:.0f} s")
    if meta.get("attention"):
        header += "\n\nAttention backend by section: " + "; ".join(
            f"{section}: {', '.join(names)}" for section, names in meta["attention"].items() if names) + "."
    text = markdown(rows, header)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


SECTIONS = {"logits": "1 logits", "train": "2 train", "memory": "3 memory", "speed": "4 speed", "passkey": "5 passkey",
            "compile": "6 compile"}


def rehearsal_config(scaling):
    """--rehearse: the logits section's model at the tests' size (2 layers, dim 128, a 64-token window)."""
    return logits_config(scaling, vocab=512, dim=128, n_layers=2, window=64)


TINY = dict(train_len=64, target=512, batch=4, micro_batch=2)  # 4 examples of 64 tokens per step
REHEARSAL = {  # --rehearse: each section's arguments on the CPU, at sizes that take seconds to a minute
    "layers": [1, 2],
    "logits": dict(config=rehearsal_config, seq_len=64, target=512),
    "train": dict(TINY, steps=8, save_every=3, threads=1),
    "bench": ["--train-len", "32", "--target", "128", "--eval-ctx", "64", "--repeats", "1", "--warmup", "0",
              "--threads", "1", "--shape", json.dumps({"dim": 64, "n_heads": 4, "n_kv_heads": 2,
                                                       "intermediate_size": 128, "vocab_size": 4096})],
    "passkey": dict(lengths=(160, 320), trials=1),
    "compile": dict(shape=dict(dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128), steps=6, tiny=TINY,
                    large=TINY, threads=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("out", "gpu_check"), help="output directory (default out/gpu_check)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layer counts of the LLaMA-7B-shaped models for memory (two or more) and speed (the largest); "
                        "default 4 8 (--rehearse: 1 2)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run these sections only")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's bf16 dense peak, if not in scripts/bench.py's PEAK_TFLOPS")
    p.add_argument("--rehearse", action="store_true",
                   help="run every section on the CPU at tiny sizes (the GPU hidden): the GPU run's code paths")
    args = p.parse_args(argv)
    args.layers = args.layers or (REHEARSAL["layers"] if args.rehearse else [4, 8])
    if "memory" in args.only and len(set(args.layers)) < 2:
        p.error("--layers needs two different layer counts (a straight line through them gives 32 layers)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.rehearse:
        print("gpu_check: no CUDA device on this machine; nothing checked (run it on a machine with a GPU, or "
              "rehearse it on the CPU with --rehearse)")
        return 0
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = torch.device("cpu" if args.rehearse else "cuda")
    tiny = REHEARSAL if args.rehearse else {}
    bench = dict(device=device.type, flags=tiny.get("bench", ()))
    t_start = time.time()
    rows, raw, seconds = [], {}, {}
    steps = {
        "logits": lambda: section_logits(device, **tiny.get("logits", {})),
        "train": lambda: train_check(device, os.path.join(out, "train"), **tiny.get("train", {})),
        "memory": lambda: section_memory(out, sorted(set(args.layers)), **bench),
        "speed": lambda: section_speed(out, max(args.layers), args.peak_tflops, **bench),
        "passkey": lambda: section_passkey(device, **tiny.get("passkey", {})),
        "compile": lambda: section_compile(device, os.path.join(out, "compile"), **tiny.get("compile", {})),
    }
    for name in SECTIONS:
        if name not in args.only:
            continue
        t0 = time.time()
        log(f"section {name}")
        try:
            result = steps[name]()
            if isinstance(result, tuple):
                result, raw[name] = result
            rows += result
        except Exception as e:  # a section that cannot finish is a failed check; the others still run
            rows.append(row(SECTIONS[name], "section ran", f"{type(e).__name__}: {str(e).strip()[-600:]}",
                            status="FAIL"))
        seconds[name] = round(time.time() - t0, 1)
        log(f"section {name}: {seconds[name]:.0f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    attention = {}  # the attention backends of each section, as its rows name them
    for r in rows:
        if "attention" in r["data"] and r["data"]["attention"] not in attention.setdefault(r["section"], []):
            attention[r["section"]].append(r["data"]["attention"])
    meta = dict(device="cpu (--rehearse)" if args.rehearse else torch.cuda.get_device_name(device),
                torch=torch.__version__, cuda=torch.version.cuda, flash_attn=flash_attn_available(),
                seconds=time.time() - t_start, section_seconds=seconds, layers=args.layers, attention=attention,
                raw=raw)
    print(write_results(out, rows, meta))
    failed = [r for r in rows if r["status"] == "FAIL"]
    print(f"{len(failed)} failed check(s); results in {out}/results.md" if failed else
          f"all checks passed; results in {out}/results.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
