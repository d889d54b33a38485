"""evaluate.py: the sliding-window protocol against a brute-force recomputation, token weighting, the rope helpers,
and the CLI (table, JSON, warnings, one-line errors)."""
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
from evaluate import perplexity, windows
from rope import describe_rope, original_window, supported_window
from model import LLaMA, ModelConfig
from helpers import ROOT

BOS = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    m = LLaMA(ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                          max_position_embeddings=64))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m.init_weights(std=0.3)  # peaked next-token distributions, so that scoring mistakes show
    return m.eval()


def make_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS], rng.integers(3, 96, n - 1)]).astype(np.uint16) for n in lengths]


def brute_force(model, docs, ctx, stride):
    """Written independently of evaluate.py: full logits of each window, a mask of the tokens already scored."""
    nll, count, n_windows = 0.0, 0, 0
    for doc in docs:
        bos, x = int(doc[0]), [int(t) for t in doc[1:]]
        scored = [False] * len(x)
        for begin in range(0, len(x), stride):
            window = x[begin:begin + ctx - 1]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([[bos] + window]))[0].double(), -1)  # (T, vocab)
            n_windows += 1
            for i, token in enumerate(window):  # row i (BOS at 0) is the distribution of window[i]
                if not scored[begin + i]:
                    nll -= logp[i, token].item()
                    count += 1
                    scored[begin + i] = True
            if begin + ctx - 1 >= len(x):  # this window reached the end of the document
                break
    return nll, count, n_windows


def test_windows_by_hand():
    # 10 tokens after the BOS, ctx 4: each window holds 3 document tokens
    assert list(windows(10, 4, 2)) == [(0, 3, 0), (2, 5, 3), (4, 7, 5), (6, 9, 7), (8, 10, 9)]
    assert list(windows(10, 4, 3)) == [(0, 3, 0), (3, 6, 3), (6, 9, 6), (9, 10, 9)]  # stride ctx - 1: tiles
    assert list(windows(10, 4, 4)) == [(0, 3, 0), (4, 7, 4), (8, 10, 8)]  # stride ctx: x3, x7 never scored
    assert list(windows(10, 4, 6)) == [(0, 3, 0), (6, 9, 6)]  # x3..x5 and x9 never scored
    assert list(windows(10, 20, 2)) == [(0, 10, 0)]  # ctx > document: one window, the whole document
    assert list(windows(10, 11, 1)) == [(0, 10, 0)]
    assert list(windows(0, 4, 2)) == []
    with pytest.raises(ValueError, match="ctx must be >= 2"):
        list(windows(10, 1, 1))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        list(windows(10, 4, 0))


@pytest.mark.parametrize("ctx,stride", [(8, 3), (8, 7), (8, 8), (8, 11), (64, 16), (2, 1), (5, 1), (6, 30)],
                         ids=["stride<ctx-1", "stride=ctx-1", "stride=ctx", "stride>ctx", "ctx>docs", "ctx=2",
                              "stride=1", "stride>doc"])
def test_perplexity_equals_brute_force(model, ctx, stride):
    docs = make_docs([40, 13, 6, 2, 1])  # the last one is a lone BOS: nothing to score
    result = perplexity(model, docs, ctx, stride)
    nll, count, n_windows = brute_force(model, docs, ctx, stride)
    assert result["tokens"] == count and result["windows"] == n_windows and result["docs"] == len(docs)
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    if stride <= ctx - 1:  # overlapping or tiling windows score every document token exactly once
        assert count == sum(len(d) - 1 for d in docs)
    else:
        assert count < sum(len(d) - 1 for d in docs)


def test_token_weighted_over_documents(model):
    long, short = make_docs([60], seed=1)[0], np.array([BOS] + [7] * 5, dtype=np.uint16)
    a, b = perplexity(model, [long], 16, 4), perplexity(model, [short], 16, 4)
    both = perplexity(model, [long, short], 16, 4)
    assert both["tokens"] == a["tokens"] + b["tokens"] == 64
    assert both["nll"] == pytest.approx(a["nll"] + b["nll"], rel=1e-9)
    assert both["ppl"] == pytest.approx(math.exp((a["nll"] + b["nll"]) / (a["tokens"] + b["tokens"])), rel=1e-9)
    assert abs(a["ppl"] - b["ppl"]) > 0.5 * min(a["ppl"], b["ppl"])  # the two documents differ a lot...
    mean_of_ppl = (a["ppl"] + b["ppl"]) / 2
    assert abs(both["ppl"] - mean_of_ppl) > 0.05 * mean_of_ppl  # ...so a per-document mean would be far off
    # the long document dominates: its 59 tokens weigh 59/64
    assert abs(math.log(both["ppl"]) - math.log(a["ppl"])) < abs(math.log(both["ppl"]) - math.log(b["ppl"]))


def test_perplexity_never_builds_full_logits(model, monkeypatch):
    def no_logits(h):
        raise AssertionError("lm_head called: full logits built")
    monkeypatch.setattr(model.lm_head, "forward", no_logits)
    flags = [p.requires_grad for p in model.parameters()]
    perplexity(model, make_docs([30]), 8, 3)
    assert [p.requires_grad for p in model.parameters()] == flags  # parameters left as they were


def test_original_and_supported_window():
    plain = ModelConfig(max_position_embeddings=2048)
    pi = ModelConfig(max_position_embeddings=16384, rope_scaling={"type": "linear", "factor": 8})
    yarn = ModelConfig(max_position_embeddings=65536,
                       rope_scaling={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 4096})
    window = lambda cfg: original_window(cfg.rope_scaling, cfg.max_position_embeddings)  # noqa: E731
    assert window(plain) == 2048 and supported_window(None, 2048) == 2048
    assert window(pi) == 2048 and supported_window(pi.rope_scaling, 2048) == 16384
    assert window(yarn) == 4096 and supported_window(yarn.rope_scaling, 4096) == 65536
    assert describe_rope(None) == "none" and describe_rope(pi.rope_scaling) == "linear:8"


# ----------------------------------------------------------------------------------------------------------------
# CLI

WORDS = "the king and queen of night and day a sword for the lord of light".split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rnd = random.Random(0)
    path = tmp_path_factory.mktemp("eval_data") / "docs.jsonl"
    with open(path, "w") as f:
        for n in (120, 20, 150, 140):  # words; the tiny tokenizer gives a few tokens per word
            f.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(n))}) + "\n")
    return str(path)


def cli(*args, cwd):
    env = dict(os.environ, POSE_CACHE=os.path.join(cwd, "cache"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_table_json_and_warning(tiny_model_dir, corpus_file, tmp_path):
    proc = cli("--model", tiny_model_dir, "--data", corpus_file, "--ctx", 32, 128, "--stride", 16, "--docs", 3,
               "--rope", "checkpoint", "linear:4", "--json", "out.json", cwd=str(tmp_path))
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    # stderr: ctx 128 is beyond the 64 positions of the unscaled model (a warning), not beyond linear:4's 256;
    # stdout: the results only, a header line and the table (no cache message between them)
    assert [line for line in err.splitlines() if "%|" not in line] == [  # progress lines aside
        f"warning: {os.path.basename(tiny_model_dir)} with rope none supports 64 positions, fewer than ctx 128"]
    header, *table = out.strip().splitlines()
    assert header.startswith("perplexity, sliding window with stride 16, 3 documents") and len(table) == 4
    result = json.load(open(tmp_path / "out.json"))
    assert result["min_tokens"] == result["max_tokens"] == 128 and result["stride"] == 16
    assert [row["rope"] for row in result["rows"]] == ["checkpoint", "linear:4"]
    assert [row["supported_window"] for row in result["rows"]] == [64, 256]
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "| model | rope | 32 | 128 |" and len(table) == 4
    for line, row in zip(table[2:], result["rows"]):
        assert [r["ctx"] for r in row["results"]] == [32, 128]
        assert line.split(" | ")[2:] == [f"{r['ppl']:.2f}" for r in row["results"][:-1]] + \
            [f"{row['results'][-1]['ppl']:.2f} |"]
        for r in row["results"]:
            assert r["docs"] == 3 and r["tokens"] == 3 * 127  # 3 documents of >= 128 tokens, truncated to 128
            assert r["ppl"] == pytest.approx(math.exp(r["nll"] / r["tokens"]), rel=1e-12)
    # the same numbers in code: first 3 documents of >= 128 tokens, truncated
    import data
    from data import Tokenizer
    model = LLaMA.from_pretrained(tiny_model_dir)
    corpus = data.load_corpus(corpus_file, Tokenizer(tiny_model_dir), cache_dir=str(tmp_path / "cache")).filter(128)
    docs = [corpus[i][:128] for i in range(3)]
    assert result["rows"][0]["results"][0]["ppl"] == pytest.approx(perplexity(model, docs, 32, 16)["ppl"], rel=1e-6)


def test_cli_progress_goes_to_stderr_in_lines(tiny_model_dir, corpus_file, tmp_path):
    """With stderr redirected (a log file), progress is still written, as plain lines: one at the start and one at the
    end of each context size (and one every 30 s between); stdout holds the header and the table only."""
    proc = cli("--model", tiny_model_dir, "--data", corpus_file, "--ctx", 16, 32, "--stride", 8, "--docs", 1,
               "--threads", 1, cwd=str(tmp_path))
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    name = os.path.basename(tiny_model_dir)
    header, *table = out.strip().splitlines()
    assert header.startswith("perplexity, sliding window with stride 8, 1 document of >= 32 tokens") and len(table) == 3
    assert all(line.startswith("| ") for line in table)
    lines = err.splitlines()
    assert "\r" not in err and [line.split(":")[0] for line in lines] == [f"{name} none ctx=16"] * 2 + \
        [f"{name} none ctx=32"] * 2, err
    assert re.search(r"ctx=16:   0%\|.*\| 0/3 ", lines[0]) and re.search(r"ctx=16: 100%\|.*\| 3/3 .*ppl=", lines[1])
    assert re.search(r"ctx=32: 100%\|.*\| 1/1 ", lines[3]), err


def test_cli_bad_input(tiny_model_dir, corpus_file, tmp_path):
    good = ["--model", tiny_model_dir, "--data", corpus_file, "--json", "out.json"]
    cases = {
        "missing model": (["--model", "nowhere", "--data", corpus_file, "--ctx", 32], "model directory not found"),
        "missing data": (["--model", tiny_model_dir, "--data", "nowhere.jsonl", "--ctx", 32], "nowhere.jsonl"),
        "no long document": ([*good, "--ctx", 100000], "the longest has"),
        "ctx 0": ([*good, "--ctx", 32, 0], "--ctx must be >= 2"),
        "bad rope": ([*good, "--ctx", 32, "--rope", "linear:x"], "not a number"),
    }
    procs = {name: cli(*args, cwd=str(tmp_path)) for name, (args, _) in cases.items()}  # all at once
    for name, proc in procs.items():
        out, err = proc.communicate()
        assert proc.returncode != 0, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, err)
    assert not os.path.exists(tmp_path / "out.json")
    assert [p for p in os.listdir(tmp_path) if p != "cache"] == []  # no temporary files either


@pytest.mark.parametrize("args,message", [
    (["--ctx", "32", "--json", "no/such/out.json"], "does not exist"),
    (["--ctx", "32", "--stride", "0"], "--stride must be >= 1"),
    (["--ctx", "32", "--docs", "0"], "--docs must be >= 1"),
    (["--ctx", "abc"], "invalid int value"),
    (["--ctx", "32", "--rope", "spline:2"], "unknown rope"),
])
def test_parse_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--model", "m", "--data", "d", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and message in err
    assert "\n" not in str(exit_info.value)


def test_dry_run_reads_config_json_alone(tiny_model_dir, tmp_path, capsys):
    """--dry-run on a directory holding only a config.json, with --data missing: the plan of the largest ctx (weights,
    a KV-cache line, the largest temporaries, the peak) and the path, on the CPU with no memory to check."""
    import shutil

    from lib import hf
    from lib import memory
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), tmp_path)
    evaluate.main(["--model", str(tmp_path), "--data", str(tmp_path / "missing"), "--ctx", "64", "128", "--device",
                   "cpu", "--dry-run"])
    out = capsys.readouterr().out
    plan = memory.eval_plan(ModelConfig(**hf.read_config(str(tmp_path))), 128, torch.float32, logit_rows=None,
                            no_cache="each window scored in one forward pass")
    lines = out.splitlines()
    assert lines[0] == f"dry run: perplexity of {tmp_path.name} at ctx 128; config.json alone is read, nothing is " \
                       "loaded"
    assert plan.table() in out and "| KV cache: none (each window scored in one forward pass) | - | 0.00 |" in lines
    assert any(line.startswith("| **peak per process** | the rows above | **") for line in lines)
    assert lines[-2:] == ["cpu: the free memory is not checked", "path: one forward pass per window"]
    assert os.listdir(tmp_path) == ["config.json"]
