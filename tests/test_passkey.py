"""passkey.py: prompt length and key placement, depth spread, greedy decoding and exact-match scoring with fake
models, determinism, and the CLI (JSON, plot, warning, one-line errors)."""
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import passkey
from data import Tokenizer
from model import LLaMA
from passkey import FILLER, KEY_LINE, QUESTION, TASK, greedy_answer, make_prompt, run_passkey
from helpers import ROOT



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tokenizer that knows the prompt's words, like LLaMA's: about 5 tokens per filler sentence."""
    rnd = random.Random(0)
    lines = [TASK, QUESTION, " ".join(FILLER)] + [KEY_LINE.format(key=rnd.randint(10000, 99999)) for _ in range(50)]
    prefix = tmp_path_factory.mktemp("passkey_tok") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    return Tokenizer(f"{prefix}.model")


def filler_tokens(tok):
    return max(len(tok.encode(s, bos=False)) for s in FILLER)


@pytest.mark.parametrize("length", [150, 333, 1000, 4096])
def test_prompt_length(tok, length):
    assert filler_tokens(tok) <= 8
    for key, depth in [(10000, 0.0), (54321, 0.37), (99999, 1.0)]:
        prompt = make_prompt(tok, length, key, depth)
        assert prompt.ids == tok.encode(prompt.text, bos=True)
        # the longest prompt that fits: within one filler sentence (<= 8 tokens here) of the request
        assert length - filler_tokens(tok) <= len(prompt.ids) <= length
        longer = passkey.prompt_text(key, prompt.n_filler + 1, round(depth * (prompt.n_filler + 1)))
        assert len(tok.encode(longer, bos=True)) > length


def test_prompt_length_other_tokenizer(spm_tokenizer):
    tok = Tokenizer(spm_tokenizer)  # knows few of the prompt's words: many tokens per sentence
    for length in (400, 1500):
        prompt = make_prompt(tok, length, 12345, 0.5)
        assert length - filler_tokens(tok) <= len(prompt.ids) <= length


def test_prompt_too_short(tok):
    with pytest.raises(ValueError, match="too short"):
        make_prompt(tok, 20, 12345, 0.5)


def test_key_placement(tok):
    for depth in np.linspace(0, 1, 13):
        prompt = make_prompt(tok, 600, 24680, depth)
        line = KEY_LINE.format(key=24680)
        assert prompt.text.count(line) == 1 and prompt.text.count("24680") == 2
        before, after = prompt.text.split(line)
        assert before.startswith(TASK) and after.endswith(QUESTION)
        before, after = before[len(TASK):], after[:-len(QUESTION)]
        sentences_before = re.findall(r"[A-Z][^.]*\.", before)
        sentences_after = re.findall(r"[A-Z][^.]*\.", after)
        # the key splices the unbroken filler cycle at the recorded depth
        assert sentences_before + sentences_after == [FILLER[i % 5] for i in range(prompt.n_filler)]
        assert len(sentences_before) == prompt.n_before == round(depth * prompt.n_filler)
        assert prompt.depth == pytest.approx(len(sentences_before) / prompt.n_filler)
        assert abs(prompt.depth - depth) <= 1 / prompt.n_filler


class AnswersKey:
    """A fake decoder (passkey.Decoder's start/step) that reads the key from its prompt and answers `template` filled
    with it, token by token."""

    def __init__(self, tok, template="{key}. The", wrong=False):
        self.tok, self.template, self.wrong = tok, template, wrong
        self.answer, self.done, self.calls = None, 0, 0

    def start(self, ids):
        key = int(re.search(r"The pass key is (\d+)", self.tok.decode(list(ids))).group(1))
        if self.wrong:
            key = 10000 + (key - 10000 + 1) % 90000  # another 5-digit key
        self.answer, self.done = self.tok.encode(self.template.format(key=key), bos=False), 0
        return self._logits()

    def step(self, token):
        assert token == self.answer[min(self.done, len(self.answer) - 1)]  # greedy: the argmax is fed back
        self.done += 1
        return self._logits()

    def _logits(self):
        self.calls += 1
        logits = torch.zeros(self.tok.vocab_size)
        logits[self.answer[min(self.done, len(self.answer) - 1)]] = 1.0
        return logits


def test_scoring_with_fake_models(tok):
    right = run_passkey(AnswersKey(tok), tok, [200, 400], trials=6, seed=1)
    assert len(right) == 12 and all(r["correct"] for r in right)
    assert [row["accuracy"] for row in passkey.accuracy_by_length(right)] == [1.0, 1.0]
    assert all(r["predicted"] == str(r["passkey"]) and 10000 <= r["passkey"] <= 99999 for r in right)
    wrong = run_passkey(AnswersKey(tok, wrong=True), tok, [200, 400], trials=6, seed=1)
    assert not any(r["correct"] for r in wrong) and all(re.fullmatch(r"\d{5}", r["predicted"]) for r in wrong)
    assert [row["accuracy"] for row in passkey.accuracy_by_length(wrong)] == [0.0, 0.0]
    # exact match of the first run of digits: a longer number or digits after words
    assert not any(r["correct"] for r in run_passkey(AnswersKey(tok, "{key}7."), tok, [200], trials=3, seed=1))
    assert all(r["correct"] for r in run_passkey(AnswersKey(tok, "is {key}."), tok, [200], trials=3, seed=1))
    assert not any(r["correct"] for r in run_passkey(AnswersKey(tok, "12 {key}."), tok, [200], trials=3, seed=1))


def test_greedy_stops_after_the_digits(tok):
    fake = AnswersKey(tok, "{key}. The grass is green.")
    prompt = make_prompt(tok, 200, 13579, 0.5)
    assert greedy_answer(fake, prompt.ids, tok, max_new_tokens=20) == "13579."
    assert fake.calls == len(tok.encode("13579.", bos=False))  # "▁", five digits, "."
    assert greedy_answer(AnswersKey(tok, "{key}"), prompt.ids, tok, max_new_tokens=3) == "13"  # token budget


def test_depth_spread_and_determinism(tok):
    records = run_passkey(AnswersKey(tok), tok, [300], trials=200, seed=0)
    depths = np.array([r["depth"] for r in records])
    assert depths.min() < 0.05 and depths.max() > 0.95
    counts = np.histogram(depths, bins=5, range=(0, 1))[0]
    assert counts.min() >= 20  # about 40 per fifth
    assert abs(depths.mean() - 0.5) < 0.07
    again = run_passkey(AnswersKey(tok), tok, [300], trials=200, seed=0)
    assert again == records
    other = run_passkey(AnswersKey(tok), tok, [300], trials=5, seed=1)
    assert [r["passkey"] for r in other] != [r["passkey"] for r in records[:5]]


def test_accuracy_grid():
    records = [dict(length=8, depth=0.0, correct=True), dict(length=8, depth=0.05, correct=False),
               dict(length=8, depth=1.0, correct=True), dict(length=16, depth=0.5, correct=True)]
    grid = passkey.accuracy_grid(records, [8, 16], 2)
    assert grid[0].tolist() == [0.5, 1.0] and np.isnan(grid[1, 0]) and grid[1, 1] == 1.0


def test_heatmap_counts_and_empty_bins(tmp_path):
    """Each cell says its accuracy and its count; a bin without a trial is hatched grey, "(0/0)", and the plot's
    legend names it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [dict(length=8, depth=0.0, correct=True), dict(length=8, depth=0.05, correct=False),
               dict(length=8, depth=1.0, correct=True), dict(length=16, depth=0.5, correct=True)]
    hits, counts = passkey.accuracy_counts(records, [8, 16], 2)
    assert hits.tolist() == [[1, 1], [0, 1]] and counts.tolist() == [[2, 1], [0, 1]]
    fig, ax = plt.subplots()
    passkey.draw_accuracy_grid(ax, records, [8, 16], 2)
    assert sorted(t.get_text() for t in ax.texts) == ["(0/0)", "0.50\n(1/2)", "1.00\n(1/1)", "1.00\n(1/1)"]
    [empty] = ax.patches
    assert empty.get_xy() == (-0.5, 0.5) and empty.get_hatch() == "///"  # row 16, bin 0
    plt.close(fig)
    figures = []
    real_close = plt.close
    try:
        plt.close = figures.append  # keep write_plot's figure to look at
        passkey.write_plot(tmp_path / "p.png", records, [8, 16], 2, "t")
    finally:
        plt.close = real_close
    [legend] = figures[0].legends
    assert [t.get_text() for t in legend.get_texts()] == ["no trial in this bin"]
    real_close(figures[0])


def test_default_lengths():
    assert passkey.default_lengths(2048, 16384) == [2048, 4096, 8192, 16384]
    assert passkey.default_lengths(2048, 2048) == [2048, 4096]
    assert passkey.default_lengths(4096, 32768) == [4096, 8192, 16384, 32768]


def test_decoder_starts_each_prompt_afresh(tiny_model_dir):
    """The passkey Decoder reuses one model for many prompts: a prompt decoded after another gives the answer a fresh
    decoder gives (the KV cache itself is tested in tests/test_model.py)."""
    model, tok = LLaMA.from_pretrained(tiny_model_dir), Tokenizer(tiny_model_dir)
    first, second = (make_prompt(tok, 250, key, 0.5) for key in (11111, 22222))
    reused = passkey.Decoder(model)
    greedy_answer(reused, first.ids, tok, max_new_tokens=4)
    assert greedy_answer(reused, second.ids, tok, max_new_tokens=4) == \
        greedy_answer(passkey.Decoder(model), second.ids, tok, max_new_tokens=4)
    assert reused.cache is not None


def test_dynamic_ntk_decodes_without_cache(tiny_model_dir):
    from rope import scaling_from_spec
    model = LLaMA.from_pretrained(tiny_model_dir)
    model.set_rope_scaling(scaling_from_spec("dynamic:4", 64))  # rescales with the length: cached keys go stale
    decoder, ids = passkey.Decoder(model), torch.randint(3, 300, (200,)).tolist()
    with torch.no_grad():  # a prompt, then one more token (beyond the 64-token original window)
        torch.testing.assert_close(decoder.start(ids[:199]), model(torch.tensor([ids[:199]]))[0, -1])
        torch.testing.assert_close(decoder.step(ids[199]), model(torch.tensor([ids]))[0, -1])
    assert decoder.cache is None


# ----------------------------------------------------------------------------------------------------------------
# CLI

def cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "passkey.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli(tiny_model_dir, tmp_path):
    bad = {
        "missing model": (["--model", "nowhere"], "model directory not found"),
        "length 0": (["--model", tiny_model_dir, "--lengths", 300, 0], "--lengths must be >= 1"),
        "bad rope": (["--model", tiny_model_dir, "--rope", "yarn"], "needs a factor"),
    }
    procs = {name: cli(*args, "--json", "out.json", "--plot", "out.png", cwd=str(tmp_path))
             for name, (args, _) in bad.items()}
    good = cli("--model", tiny_model_dir, "--lengths", 300, 400, "--trials", 2, "--json", "good.json", "--plot",
               "good.png", cwd=str(tmp_path))
    for name, proc in procs.items():
        out, err = proc.communicate()
        lines = err.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, (name, err)
        assert lines[0].startswith("error: ") and bad[name][1] in lines[0], (name, err)
    assert not os.path.exists(tmp_path / "out.json") and not os.path.exists(tmp_path / "out.png")
    out, err = good.communicate()
    assert good.returncode == 0, err
    # both lengths are beyond the 64 positions of the tiny unscaled model: a warning, and the run goes on; progress
    # in plain lines though stderr is no terminal (the first and the last here: one every 30 s between)
    lines = err.strip().splitlines()
    assert lines[0] == (f"warning: {os.path.basename(tiny_model_dir)} with rope none supports 64 positions, fewer "
                        "than length 300, 400")
    assert len(lines) == 3 and "\r" not in err, err
    assert re.match(r"passkey:   0%\|.*\| 0/4 ", lines[1]) and re.match(r"passkey: 100%\|.*\| 4/4 .*acc=", lines[2])
    assert out.splitlines()[0].endswith("2 trials per length, seed 0") and len(out.strip().splitlines()) == 5
    result = json.load(open(tmp_path / "good.json"))
    assert result["lengths"] == [300, 400] and result["trials"] == 2 and result["seed"] == 0
    assert len(result["records"]) == 4
    assert set(result["records"][0]) >= {"length", "depth", "passkey", "prompt_tokens", "predicted", "correct"}
    for row in result["accuracy"]:
        assert f"| {row['length']} |" in out and f"| {row['accuracy']:.2f} |" in out
        assert row["prompt_tokens_max"] <= row["length"]
    assert open(tmp_path / "good.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["good.json", "good.png"]  # no temporary files left


LLAMA_7B_128K = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                 "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "max_position_embeddings": 131072, "rope_scaling": {"type": "linear", "factor": 64.0},
                 "torch_dtype": "bfloat16"}  # LLaMA-7B's 2048 positions x 64: max_position_embeddings is the window


def test_dry_run_at_128k_on_80_gb_decodes_without_a_cache(tmp_path, capsys):
    """A directory holding only a config.json: the plan's KV-cache and peak lines, the peak within 80 GB, and the path
    without a cache (the cache alone would be 68.7 GB beside 13.5 GB of weights)."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B_128K))
    passkey.main(["--model", str(tmp_path), "--lengths", "131072", "--device", "cuda", "--dtype", "bf16",
                  "--gpu-memory", "80", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("| KV cache")] == \
        ["| KV cache: none (the prompt and answer re-read per token) | - | 0.00 |"]
    assert "| bf16 weights | 6,738,415,616 x 2 B | 13.48 |" in lines
    peak = [re.fullmatch(r"\| \*\*peak per process\*\* \| the rows above \| \*\*([\d.]+)\*\* \|", line)
            for line in lines]
    assert [float(m[1]) for m in peak if m] == [30.8]  # <= 80
    assert lines[-2:] == ["a GPU of 80 GB (--gpu-memory): 80.0 GB free",
                          "path: no cache; cached decoding needs about 99.5 GB, its KV cache 68.72 GB"]
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "80", "--device", "cuda"],
     "--gpu-memory plans a --dry-run; a run measures the GPU's free memory"),
    (["--gpu-memory", "0", "--device", "cuda", "--dry-run"], "--gpu-memory must be > 0 GB, got 0"),
    (["--gpu-memory", "80", "--device", "cpu", "--dry-run"], "--gpu-memory states a GPU's memory: plan for it with "
                                                             "--device cuda")])
def test_gpu_memory_states_a_gpu_for_a_dry_run(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        passkey.main(args)
    assert e.value.code == 1 and capsys.readouterr().err == f"error: {message}\n"


def test_a_cuda_run_measures_the_free_memory_before_loading(tmp_path, monkeypatch, capsys):
    """A CUDA run (faked here: the same code on the CPU) asks torch.cuda.mem_get_info, decodes without a cache where
    the cache does not fit, and stops in one line before reading the tokenizer or the weights where nothing fits."""
    from lib.cli import UsageError
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B_128K))
    free = {"bytes": 79e9}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80e9))
    argv = ["--model", str(tmp_path), "--lengths", "131072", "--device", "cuda"]
    assert passkey.plan_memory(passkey.parse_args(argv)) == "no cache"
    assert capsys.readouterr().err == (f"warning: passkey on {tmp_path.name} with prompts up to 131072 tokens: cached "
                                       "decoding needs about 99.5 GB, its KV cache 68.72 GB; cuda has 79.0 GB free: "
                                       "no cache\n")
    assert passkey.plan_memory(passkey.parse_args([*argv[:3], "4096", *argv[4:]])) == "cached decoding"
    free["bytes"] = 20e9
    with pytest.raises(UsageError, match=r"needs about 30.8 GB \(no cache; --dry-run shows the plan\) and cuda has "
                                         r"20.0 GB free: give shorter --lengths$"):
        passkey.main(argv)  # the directory holds no tokenizer: any later step would fail otherwise
