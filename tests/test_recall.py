"""recall.py: exact constructions, scores equal to brute-force losses, and the bundled base recalls in its window."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib import cli
import data
import passkey
import recall
from helpers import ROOT
from model import LLaMA


@pytest.fixture(scope="module")
def bundled(one_thread):
    tok = data.Tokenizer(cli.BUNDLED_MODEL)
    stream = recall.held_out_stream(data.load_corpus(cli.BUNDLED_EVAL, tok))
    return LLaMA.from_pretrained(cli.BUNDLED_MODEL), tok, stream


def test_copy_sequences_are_exact_and_depend_on_the_seed_only(bundled):
    _, tok, stream = bundled
    distances, passage = [64, 128, 192, 512, 1024, 1536], 32
    seqs = recall.copy_sequences(stream, tok.start_id, distances, 256, passage, sequences=3, seed=0)
    again = recall.copy_sequences(stream, tok.start_id, distances, 256, passage, sequences=3, seed=0)
    assert all(np.array_equal(a.ids, b.ids) and a.probes == b.probes for a, b in zip(seqs, again))
    other = recall.copy_sequences(stream, tok.start_id, distances, 256, passage, sequences=3, seed=1)
    assert not all(np.array_equal(a.ids, b.ids) for a, b in zip(seqs, other))
    counts = {d: 0 for d in distances}
    for seq in seqs:
        assert seq.ids[0] == tok.start_id and len(seq.ids) in (256, 512, 1024, 2048)
        spans = []
        for p in seq.probes:
            counts[p.distance] += 1
            assert len(seq.ids) == recall.group_length(p.distance + 2 * passage + 1, 256)
            first, second = seq.ids[p.first:p.first + passage], seq.ids[p.first + p.distance:p.first + p.distance +
                                                                        passage]
            assert np.array_equal(first, second) and np.array_equal(first, stream[p.source:p.source + passage])
            assert p.first >= passage and p.first + p.distance + passage <= len(seq.ids)
            # the passage comes from outside this sequence's filler
            assert p.source + passage <= seq.filler or p.source >= seq.filler + len(seq.ids)
            spans += [(p.first, p.first + passage), (p.first + p.distance, p.first + p.distance + passage)]
        spans.sort()
        assert all(e < b for (_, e), (b, _) in zip(spans, spans[1:]))  # no two occurrences overlap or touch
        covered = np.zeros(len(seq.ids), bool)
        for b, e in spans:
            covered[b:e] = True
        filler = np.concatenate([[tok.start_id], stream[seq.filler:seq.filler + len(seq.ids) - 1]])
        assert np.array_equal(seq.ids[~covered], filler[~covered])  # everything else is the natural filler
    assert counts == {d: 3 for d in distances}
    # each sequence is named by its length and draw; a later call adds draws and repeats none of the earlier ones
    assert {seq.name.rsplit("/", 1)[0] for seq in seqs} == {f"{n}/{s}" for n in (256, 512, 1024, 2048)
                                                           for s in range(3)}
    later = recall.copy_sequences(stream, tok.start_id, distances, 256, passage, sequences=3, seed=0, skip=2)
    third = [a for a in seqs if a.name.split("/")[1] == "2"]
    assert [b.name for b in later] == [a.name for a in third]
    assert all(np.array_equal(a.ids, b.ids) and a.probes == b.probes for a, b in zip(later, third))


def test_copy_nll_equals_a_brute_force_loss(bundled):
    model, tok, stream = bundled
    passage = 16
    seq = recall.copy_sequences(stream, tok.start_id, [40, 100], 256, passage, sequences=1, seed=3)[0]
    records = recall.score_copy(model, seq, passage)
    assert [r["distance"] for r in records] == [p.distance for p in seq.probes]
    assert seq.name == "256/0/0" and all(r["sequence"] == seq.name for r in records)
    tokens = torch.as_tensor(seq.ids)[None]
    for p, r in zip(seq.probes, records):
        for start, nll in ((p.first, r["first_nll"]), (p.first + p.distance, r["copy_nll"])):
            targets = torch.full_like(tokens, -100)
            targets[0, start:start + passage - 1] = tokens[0, start + 1:start + passage]  # tokens 2..P
            with torch.no_grad():
                assert model.loss(tokens, targets).item() == pytest.approx(nll, rel=1e-5)
        logits = model(tokens)[0]
        hits = (logits[p.first + p.distance:p.first + p.distance + passage - 1].argmax(-1)
                == tokens[0, p.first + p.distance + 1:p.first + p.distance + passage])
        assert r["copy_accuracy"] == pytest.approx(hits.float().mean().item())


@pytest.mark.parametrize("labels", [(), ("river", "apple", "castle", "violin")])
@pytest.mark.parametrize("distance", [100, 192, 700])
def test_key_prompts_put_the_asked_key_exactly_at_the_distance(bundled, distance, labels):
    _, tok, _ = bundled
    p = recall.key_prompt(tok, 256, distance, 12345, np.random.default_rng(distance), labels)
    assert len(p.ids) - p.key_start == distance and len(p.ids) <= p.length
    assert p.length == recall.group_length(p.length // 2 + 1, 256) and len(p.ids) > p.length // 2  # shortest fit
    line = (recall.MULTI_KEY_LINE.format(label=labels[0], key=12345) if labels else passkey.KEY_LINE.format(key=12345))
    assert tok.decode(p.ids[p.key_start:]).startswith(line)
    assert p.ids[0] == tok.start_id and tok.decode(p.answer).strip() == "12345"
    text = tok.decode(p.ids)
    assert text.endswith(recall.MULTI_QUESTION.format(label=labels[0]) if labels else passkey.QUESTION)
    assert len(p.distractors) == max(0, len(labels) - 1)
    for label, key, after in p.distractors:  # every distractor is there, on the side it was drawn for
        where = text.index(recall.MULTI_KEY_LINE.format(label=label, key=key))
        assert (where > text.index(line)) == after


def test_teacher_forced_passkey_agrees_with_greedy_decoding(bundled):
    model, tok, _ = bundled
    decoder = passkey.Decoder(model)
    agree = 0
    for i, d in enumerate([60, 120, 180, 230, 300, 400]):
        p = recall.key_prompt(tok, 256, d, 20000 + 7919 * i, np.random.default_rng(i))
        greedy = passkey.first_number(passkey.greedy_answer(decoder, p.ids, tok)) == str(p.key)
        agree += recall.score_key(model, tok, p)["correct"] == greedy
    assert agree == 6


def test_the_bundled_base_recalls_inside_its_window_only(bundled):
    model, tok, stream = bundled
    records = recall.run_recall(model, tok, stream, [64, 192, 1024], 256, tasks=("passkey",), trials=10)
    s = recall.summarize(records, [64, 192, 1024])
    assert s["passkey_accuracy"][0] >= 0.8 and s["passkey_accuracy"][1] >= 0.8
    assert s["passkey_accuracy"][2] <= 0.2
    assert s["passkey_nll"][2] > 10 * s["passkey_nll"][0]
    assert s["copy_nll"] == [None] * 3


def summary(distances, passkey=None, copy=None):
    """A made-up summarize() result: passkey accuracies, copy NLLs against a first-sight NLL of 4."""
    none = [None] * len(distances)
    return dict(distances=distances, passkey_accuracy=passkey or none, multikey_accuracy=none,
                first_nll=[4.0] * len(distances) if copy else none, copy_nll=copy or none)


def test_effective_distance_is_the_last_distance_before_the_first_failure():
    ds = [64, 128, 192, 320, 512]
    assert recall.effective_distance(summary(ds, [1.0, 0.9, 0.5, 0.7, 0.6])) == {"passkey": 512}  # all pass
    assert recall.effective_distance(summary(ds, [0.4, 1.0, 1.0, 1.0, 1.0])) == {"passkey": 0}  # the first fails
    assert recall.effective_distance(summary(ds, [1.0, 0.8, 0.6, 0.45, 0.9])) == {"passkey": 192}  # a later pass
    # distances in any order; one without a value (no trial fitted) is not tested; tasks not run are left out
    assert recall.effective_distance(summary([320, 64, 128], [0.2, None, 0.9])) == {"passkey": 128}
    copy = summary(ds, copy=[1.0, 2.0, 2.0, 2.1, 0.5])  # at most half the first-sight NLL (4.0)
    assert recall.effective_distance(copy) == {"copy": 192}
    assert recall.effective_distance(summary(ds, [1.0] * 5, [2.5] * 5)) == {"passkey": 512, "copy": 0}


def test_command_line_json_and_bad_input(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(ROOT, "recall.py"), "--distances", "64", "100", "300", "--sequences", "2",
           "--trials", "2", "--keys", "2", "--json", str(out), "--plot", str(tmp_path / "r.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["distances"] == [64, 100, 300]
    for key in ("first_nll", "copy_nll", "passkey_accuracy", "multikey_accuracy"):
        assert len(result[key]) == 3
    # 64 tokens hold the passkey prompt's key line and question, not the labelled ones
    assert result["multikey_accuracy"][0] is None and result["passkey_accuracy"][0] is not None
    assert len(result["rows"][0]["records"]["copy"]) == 2 * 3 and os.path.getsize(tmp_path / "r.png") > 0
    assert proc.stdout.startswith("recall by distance, tiny")
    reach = result["effective_distance"]
    assert set(reach) == {"copy", "passkey", "multikey"} and result["rows"][0]["effective_distance"] == reach
    assert all(reach[t] in (0, 64, 100, 300) for t in reach)
    assert f"effective distance, passkey: {reach['passkey']} (" in proc.stdout
    assert all("sequence" in r for r in result["rows"][0]["records"]["copy"])
    bad = subprocess.run(cmd[:2] + ["--distances", "20", "--json", str(tmp_path / "b.json")], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--distances must be >" in bad.stderr
    assert not os.path.exists(tmp_path / "b.json")


def test_dry_run_reads_config_json_alone(tmp_path, capsys):
    """--dry-run on a directory holding only the bundled base's config.json: the plan of the longest sequence
    (longest_forward), with its KV-cache and peak lines, and the path, on the CPU with no memory to check."""
    import shutil

    from lib import hf
    from lib import memory
    from model import ModelConfig
    shutil.copy(os.path.join(cli.BUNDLED_MODEL, "config.json"), tmp_path)
    recall.main(["--model", str(tmp_path), "--distances", "64", "128", "--tasks", "copy", "--device", "cpu",
                 "--dry-run"])
    out = capsys.readouterr().out
    tokens, rows = recall.longest_forward([64, 128], 256, 32, ["copy"], 4)
    assert (tokens, rows) == (256, 2 * 31 * 2)  # both distances in 256-token sequences, 2 x 31 rows per probe
    plan = memory.eval_plan(ModelConfig(**hf.read_config(str(tmp_path))), tokens, torch.float32, logit_rows=rows,
                            no_cache="each sequence scored in one forward pass")
    lines = out.splitlines()
    assert lines[0].startswith(f"dry run: recall of {tmp_path.name} in sequences up to 256 tokens; ")
    assert plan.table() in out and "| KV cache: none (each sequence scored in one forward pass) | - | 0.00 |" in lines
    assert any(line.startswith("| **peak per process** | the rows above | **") for line in lines)
    assert lines[-2:] == ["cpu: the free memory is not checked", "path: one forward pass per sequence"]
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize("distance", [100, 192, 230, 700])
def test_longest_forward_bounds_the_key_prompts(bundled, distance):
    """The plan's length of a key prompt and its answer, from the distance alone, is at least the real one."""
    _, tok, _ = bundled
    labels = ("harbor", "river", "lantern", "apple")
    for task, names in (("passkey", ()), ("multikey", labels)):
        p = recall.key_prompt(tok, 256, distance, 99999, np.random.default_rng(distance), names)
        tokens, rows = recall.longest_forward([distance], 256, 32, [task], len(labels))
        assert len(p.ids) + len(p.answer) <= tokens and len(p.answer) + 1 <= rows
