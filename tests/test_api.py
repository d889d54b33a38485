"""The project's fixed public API (model.LLaMA, data.Tokenizer, rope.rope_frequencies, pose's samplers) and the flags
each script's command line promises, called as the README and the scripts' docstrings write them."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT



def test_python_api(tiny_model_dir, tmp_path):
    from data import Tokenizer
    from model import LLaMA
    from pose import pose_example, randpos_positions, skip_positions
    from rope import rope_frequencies

    model = LLaMA.from_pretrained(tiny_model_dir, dtype=torch.float32, rope_scaling=None, device="cpu")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    positions = torch.tensor(skip_positions(12, 48, chunks=2, rng=np.random.default_rng(0))).expand(2, 12)
    logits = model(tokens, positions=None)
    assert logits.shape == (2, 12, model.cfg.vocab_size)
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    loss = model.loss(tokens, targets, positions=positions)
    assert loss.dim() == 0 and torch.isfinite(loss)
    model.save_pretrained(str(tmp_path / "saved"))
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(tmp_path / "saved"))

    tok = Tokenizer(os.path.join(tiny_model_dir, "tokenizer.model"))
    ids = tok.encode("the king and the queen", bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "the king and the queen"

    inv_freq, attention_scale = rope_frequencies(64, 10000.0, {"rope_type": "linear", "factor": 8.0}, seq_len=None)
    assert inv_freq.shape == (32,) and attention_scale == 1.0

    rng = np.random.default_rng(0)
    positions = skip_positions(16, 128, chunks=2, rng=rng)
    assert positions.dtype == np.int64 and positions.shape == (16,)
    input_ids, positions = pose_example(np.arange(200), 16, 128, chunks=2, content="uniform", rng=rng)
    assert input_ids.shape == positions.shape == (16,)
    assert randpos_positions(16, 128, rng=rng).shape == (16,)


class Parsed(Exception):
    """Raised instead of parsing: carries the parser a script built."""


def option_strings(script, monkeypatch):
    """Every option string of the script's argparse parser (its actions), taken from the parser the script builds."""
    import importlib

    from lib import cli

    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(Parsed) as parsed:
        getattr(module, "parse_args", module.main)([])  # data.py and train.py parse in main
    return {s for action in parsed.value.args[0]._actions for s in action.option_strings}


@pytest.mark.parametrize("script", ["data.py", "train.py", "evaluate.py", "passkey.py", "coverage.py"])
def test_command_lines_have_their_flags(script, monkeypatch):
    """Each flag of the fixed command lines is an option of the script (exactly, not a word of its help), and --help
    works."""
    flags = {
        "data.py": ["--input", "--tokenizer", "--out", "--min-tokens"],
        "train.py": ["--target", "--model", "--data", "--out", "--train-len", "--method", "--chunks", "--content",
                     "--rope", "--steps", "--batch-size", "--lr", "--warmup", "--seed", "--save-every", "--resume",
                     "--dry-run"],
        "evaluate.py": ["--ctx", "--model", "--data", "--stride", "--docs", "--rope", "--json"],
        "passkey.py": ["--model", "--lengths", "--trials", "--seed", "--json", "--plot"],
        "coverage.py": ["--train-len", "--target", "--chunks", "--samples", "--json", "--plot"],
    }[script]
    assert set(flags) <= option_strings(script, monkeypatch), set(flags) - option_strings(script, monkeypatch)
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr
