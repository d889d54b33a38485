"""The bundled tiny base model and corpus (assets/): what the README's first command and the toy reproduction rely
on. Cheap checks only; the reproduction itself (scripts/reproduce.py) is not part of the test suite."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lib import cli
import data
import evaluate
import passkey
from data import Tokenizer
from model import LLaMA
from helpers import ROOT



@pytest.fixture(scope="module")
def base():
    model = LLaMA.from_pretrained(cli.BUNDLED_MODEL)
    return model, Tokenizer(cli.BUNDLED_MODEL)


@pytest.fixture(scope="module")
def eval_docs(base):
    corpus = data.load_corpus(cli.BUNDLED_EVAL, base[1], min_tokens=2048)
    assert len(corpus) == 6
    return [corpus[i][:2048] for i in range(2)]


def test_bundled_model_config(base):
    model, tokenizer = base
    assert model.cfg.max_position_embeddings == 256 and model.cfg.rope_scaling is None
    assert tokenizer.vocab_size == model.cfg.vocab_size == 4096
    assert model.lm_head.weight.dtype == torch.float32  # stored in bf16, loaded in the requested dtype


def test_perplexity_inside_the_window_and_explodes_beyond(base, eval_docs):
    """The paper's "Original" row: fine inside the pretraining window, far worse beyond it without interpolation.
    (Measured when the model was made: 34.7 and 96.6 on these two plays.)"""
    model, _ = base
    inside = evaluate.perplexity(model, eval_docs, 256, 128)["ppl"]  # scored tokens at positions 128..255
    beyond = evaluate.perplexity(model, eval_docs, 1024, 128)["ppl"]  # scored tokens at positions 896..1023
    assert inside < 40
    assert beyond > 2.5 * inside


def test_passkey_inside_the_window(base):
    model, tokenizer = base
    records = passkey.run_passkey(model, tokenizer, [256], trials=10, seed=0)
    assert sum(r["correct"] for r in records) >= 8


def test_main_command_runs_on_the_bundled_defaults(tmp_path):
    """README's `python train.py --target 2048`, shortened: no --model, no --data."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--target", "512", "--steps", "2",
                          "--batch-size", "2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "next: python evaluate.py" in res.stdout
    extended = LLaMA.from_pretrained(out)
    assert extended.cfg.max_position_embeddings == 512
    assert extended.cfg.rope_scaling == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256,
                                         "beta_fast": 4.0, "beta_slow": 1.0}  # the tiny recipe (results/toy/DESIGN.md)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all("replay_loss" in e for e in log)  # the recipe's replay stream


# The first steps of the README's main command, `python train.py --target 2048`, as its full run logged them (100
# steps, final loss 3.074594). The learning rate of a step inside the warmup does not depend on --steps, so a 3-step
# run must log exactly these: any change to the examples, the replay, the model or the update shows here.
BUNDLED_FIRST_STEPS = [
    {"step": 1, "loss": 3.244062, "lr": 2e-05, "tokens": 4096, "grad_norm": 1.477298, "replay_loss": 0.169282},
    {"step": 2, "loss": 3.189906, "lr": 4e-05, "tokens": 8192, "grad_norm": 1.396523, "replay_loss": 0.144818},
    {"step": 3, "loss": 3.228605, "lr": 6.000000000000001e-05, "tokens": 12288, "grad_norm": 1.255237,
     "replay_loss": 0.176494},
]


def test_bundled_recipe_losses_are_unchanged(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--target", "2048", "--steps", "3",
                          "--threads", "1", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    # to one unit of the logged 6th digit: floating-point kernels differ between CPUs (README, "Reproducibility");
    # the gradient norm, a sum over 4M squares, to 1e-5 relative (1.477302 against 1.477298 measured on another CPU)
    assert len(log) == len(BUNDLED_FIRST_STEPS)
    for e, want in zip(log, BUNDLED_FIRST_STEPS):
        for k, v in want.items():
            assert e[k] == pytest.approx(v, **(dict(rel=1e-5) if k == "grad_norm" else dict(rel=0, abs=1.5e-6))), (k, e)
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ends inside the --warmup" in warnings[0]  # 3 steps of a 10-step warmup
