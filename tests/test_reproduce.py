"""The toy reproduction's data and bookkeeping (results/toy/DESIGN.md): the replay pool, its independence from the
method, the answer-target census, and scripts/reproduce.py's refusal to publish a quick or partial run."""
import hashlib
import json
import os
import statistics
import sys
import zlib

import numpy as np
import pytest

from lib import cli
import data
from lib import settings as run_settings  # reproduce.py's `settings` are the design's
import train
from passkey import TASK, prompt_text
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import census  # noqa: E402
import make_replay  # noqa: E402
import reproduce  # noqa: E402
import reproduce_common  # noqa: E402
import toy_publish  # noqa: E402
import toy_report  # noqa: E402
import toy_rows  # noqa: E402
import toy_run  # noqa: E402

POOL = os.path.join(ROOT, "assets", "replay", "passkey-256.npz")


@pytest.fixture(scope="module")
def tokenizer():
    return data.Tokenizer(cli.BUNDLED_MODEL)


@pytest.fixture(scope="module")
def patterns(tokenizer):
    return census.Patterns(tokenizer)


def resolved(*argv):
    return run_settings.from_command_line(["--target", "2048", "--replay", POOL, "--replay-batch", "4", *argv],
                                          world=1, device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# the pool

def test_pool_windows_hold_whole_episodes(tokenizer, patterns):
    with np.load(POOL) as f:
        ids, targets, lengths = f["input_ids"].astype(np.int64), f["targets"].astype(np.int64), f["lengths"]
        episodes, columns = f["episodes"], list(f["episode_columns"])
        meta = json.loads(str(f["meta"]))
    assert ids.shape == targets.shape == (2000, 256) and meta["seed"] == 3
    assert (ids[:, 0] == tokenizer.start_id).all()
    col = {name: episodes[:, columns.index(name)] for name in columns}
    assert np.array_equal(np.bincount(col["window"], minlength=2000) > 0, np.ones(2000, bool))  # no empty window
    for w in range(2000):
        n = lengths[w]
        assert np.array_equal(targets[w, :n - 1], ids[w, 1:n])
        assert (targets[w, n - 1:] == -100).all() and (ids[w, n:] == tokenizer.eos_id).all()
        text = tokenizer.decode(ids[w, :n])
        parts = text.split("\n\n")
        mine = episodes[col["window"] == w]
        assert len(parts) == len(mine)
        for part, row in zip(parts, mine):
            key = row[columns.index("passkey")]
            n_filler = row[columns.index("n_filler")]
            # the whole episode, exactly: the prompt with its key at some depth, then the answer
            candidates = [prompt_text(key, n_filler, b) + f" {key}." for b in range(n_filler + 1)]
            assert part in candidates, part
            assert part.startswith(TASK)
        # the metadata's spans tile the window and point at the key line, question and answer of each episode
        assert mine[0][columns.index("start")] == 0 and mine[-1][columns.index("end")] == n
        key_lines, questions = census.scan(ids[w, :n], patterns)
        assert [k[1] for k in key_lines] == list(mine[:, columns.index("key")])
        assert [q[1] for q in questions] == list(mine[:, columns.index("answer")])
        assert [int(k[2]) for k in key_lines] == [int(q[2]) for q in questions] == list(mine[:, -1])
    assert len(tokenizer.encode(prompt_text(99999, meta["filler_cap"] + 1, 0) + " 99999.")) > 256


def test_pool_is_reproducible(tokenizer):
    """make_replay.py with the pool's arguments makes the same windows (the first 50 of them, drawn in order)."""
    ids, targets, lengths, episodes, cap = make_replay.build(tokenizer, 256, 50, 3)
    with np.load(POOL) as f:
        assert np.array_equal(ids, f["input_ids"][:50]) and np.array_equal(targets, f["targets"][:50])
        assert np.array_equal(episodes, f["episodes"][:len(episodes)])


# ----------------------------------------------------------------------------------------------------------------
# the replay stream is the method's business in no way

def test_replay_windows_do_not_depend_on_the_method():
    pool = data.ReplayPool(POOL)
    arms = [resolved("--method", "pose"), resolved("--method", "pose", "--chunks", "3", "--content", "contiguous"),
            resolved("--method", "pose", "--content", "aligned", "--rope", "ntk"),
            resolved("--method", "full", "--batch-size", "2", "--micro-batch-size", "2"),
            resolved("--method", "full", "--rope", "none"), resolved("--method", "pi", "--rope", "linear"),
            resolved("--method", "randpos", "--batch-size", "8", "--rope", "yarn:8,beta_fast=4,beta_slow=1")]
    first = [train.replay_windows(step, arms[0], pool) for step in range(100)]
    for arm in arms[1:]:
        for step in range(100):
            ids, targets = train.replay_windows(step, arm, pool)
            assert np.array_equal(ids, first[step][0]) and np.array_equal(targets, first[step][1])
    other = resolved("--method", "pose", "--seed", "1")
    differ = [not np.array_equal(train.replay_windows(step, other, pool)[0], first[step][0]) for step in range(100)]
    assert all(differ)
    assert len({tuple(pool.indices(0, step, 4)) for step in range(100)}) == 100


# ----------------------------------------------------------------------------------------------------------------
# the census

def test_census_counts_own_other_and_none(tokenizer, patterns):
    own = prompt_text(11111, 6, 2) + " 11111."
    other = ("\n".join([TASK, "The pass key is 22222. Remember it. 22222 is the pass key.", "The sky is blue.",
                        "What is the pass key? The pass key is 33333."]))
    none = "\n".join([TASK, "The grass is green.", "What is the pass key? The pass key is 44444."])
    unanswered = "\n".join([TASK, "The pass key is 55555. Remember it.", "What is the pass key? The pass key is"])
    counts = census.empty_counts()
    for text in (own, other, none, unanswered):
        census.count_example(counts, tokenizer.encode(text), None, None, patterns)
    assert counts["answers"] == 3 and counts["questions"] == 4 and counts["key_lines"] == 3
    assert counts["own"]["<256"] == 1 and counts["other"] == 1 and counts["none"] == 1

    # the distance is in model positions: a skip of 300 between the key line and the question
    ids = np.array(tokenizer.encode(own))
    (question, answer, _), = census.scan(ids, patterns)[1]
    positions = np.arange(len(ids)) + np.where(np.arange(len(ids)) >= question, 300, 0)
    counts = census.count_example(census.empty_counts(), ids, positions, None, patterns)
    assert counts["own"]["256-511"] == 1 and counts["own"]["<256"] == 0
    # an answer nothing is trained to predict is not an answer target
    targets = np.append(ids[1:], -100)
    targets[answer - 1] = -100
    assert census.count_example(census.empty_counts(), ids, None, targets, patterns)["answers"] == 0
    # a later episode's key line does not count for an earlier question; two episodes: two own answers
    two = tokenizer.encode(own + "\n\n" + prompt_text(66666, 3, 3) + " 66666.")
    counts = census.count_example(census.empty_counts(), two, None, None, patterns)
    assert counts["own"]["<256"] == 2 and counts["other"] == 0


def test_arm_census_on_a_synthetic_pool(tmp_path, monkeypatch, tokenizer):
    """A pool of 4 windows (own, other, none, no episode) read whole at each of 3 steps, beside books without any
    passkey text."""
    monkeypatch.setenv("POSE_CACHE", str(tmp_path / "cache"))
    texts = [prompt_text(11111, 2, 1) + " 11111.",
             "\n".join([TASK, "The pass key is 22222. Remember it.", "What is the pass key? The pass key is 33333."]),
             "\n".join([TASK, "What is the pass key? The pass key is 44444."]), "The grass is green."]
    ids = np.full((4, 128), tokenizer.eos_id)
    targets = np.full((4, 128), -100)
    for w, text in enumerate(texts):
        tokens = tokenizer.encode(text)
        assert len(tokens) <= 128
        ids[w, :len(tokens)], targets[w, :len(tokens) - 1] = tokens, tokens[1:]
    np.savez(tmp_path / "pool.npz", input_ids=ids, targets=targets)
    books = tmp_path / "books.txt"
    books.write_text("And the king said unto them, Go ye and see. " * 200)
    result = census.arm_census(["--model", cli.BUNDLED_MODEL, "--data", str(books), "--target", "512",
                                "--train-len", "128", "--method", "pose", "--steps", "3", "--batch-size", "2", "--replay",
                                str(tmp_path / "pool.npz"), "--replay-batch", "4"])
    method, replay = result["method"], result["replay"]
    assert method["examples"] == 6 and method["tokens"] == 6 * 128 and method["answers"] == 0
    assert method["mentions"] == method["key_lines"] == method["questions"] == 0
    assert replay["examples"] == 12 and replay["answers"] == 9
    assert replay["own"]["<256"] == 3 and replay["other"] == 3 and replay["none"] == 3
    assert replay["tokens"] == 3 * sum(len(tokenizer.encode(t)) for t in texts)


# ----------------------------------------------------------------------------------------------------------------
# reproduce.py: rows, settings, and publishing

def test_rows_and_settings(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert all(row.slug in shown and row.label in shown for row in toy_rows.ROWS)
    design, quick = toy_rows.design_settings(), toy_rows.design_settings(quick=True)
    assert (design["steps"], design["batch_size"], design["replay_batch"], design["seeds"]) == (100, 16, 4, [0, 1, 2])
    assert (quick["steps"], quick["batch_size"], quick["replay_batch"], quick["seeds"]) == (10, 8, 2, [0])
    token = toy_rows.row_train_args(toy_rows.ROW["full-token"], design, 1)
    assert token[-4:] == ["--batch-size", "2", "--micro-batch-size", "2"] and "--seed" in token
    assert toy_rows.row_train_args(toy_rows.ROW["full-token"], quick, 0)[-1] == "1"
    args, _ = reproduce.parse_args(["--quick"])
    assert args.rows == [r.slug for r in toy_rows.ROWS] and args.out.endswith("reproduce-quick")
    args, _ = reproduce.parse_args([])
    assert "full-linear" not in args.rows and "direct" not in args.rows and "pose-linear-1k" in args.rows  # v2's rows
    assert args.out.endswith(os.path.join("out", "reproduce"))
    assert reproduce.parse_args(["--rows", "all"])[0].rows == [r.slug for r in toy_rows.ROWS]
    # the train.py arguments of every row resolve, and every row trains with the designed replay weight (DESIGN.md
    # sections 5 and 14: 0.2, the token-matched Full-length row's batch of 2 included), as train.py resolves it
    for row in toy_rows.ROWS:
        if row.train:
            a = run_settings.from_command_line(toy_rows.row_train_args(row, design, 0, ROOT), world=1, device="cpu")
            assert a.replay_batch == 4 and a.replay_weight == 0.2, row.slug
            # a long row (section 15): 1000 steps, a checkpoint at each step it is evaluated at, all of them kept
            assert (a.steps, a.save_every, a.keep) == ((1000, 50, 20) if row.long else (100, 25, 2)), row.slug
            assert all(step % a.save_every == 0 for step in toy_rows.step_evals(row, design)), row.slug
    assert toy_rows.step_evals(toy_rows.ROW["pose-linear-1k"], design) == [100, 250, 500]
    # DESIGN.md section 17: the long rows run seeds 0-2; the extreme rows train to their own target
    assert toy_rows.seeds_of(toy_rows.ROW["pose-linear-1k"], design) == [0, 1, 2]
    for slug, target in (("pose-16k", 16384), ("pose-32k", 32768)):
        a = run_settings.from_command_line(toy_rows.row_train_args(toy_rows.ROW[slug], design, 0, ROOT), world=1,
                                           device="cpu")
        assert (a.target, a.train_len, a.method, a.steps) == (target, 256, "pose", 100)
        assert toy_rows.seeds_of(toy_rows.ROW[slug], design) == [0, 1, 2]


def fake_eval(settings, slug, seed):
    """An eval.json as run_row_seed writes it, with made-up numbers."""
    rng = np.random.default_rng([zlib.crc32(slug.encode()), seed or 0])
    records = [[n, t, float(rng.random()), 12345, n, "12345", bool(rng.random() < 0.5)]
               for n in settings["passkey_lengths"] for t in range(settings["passkey_trials"])]
    result = {"row": slug, "label": toy_rows.ROW[slug].label, "seed": seed, "settings": settings,
              "ppl": {str(c): {"ppl": 40 + rng.random(), "nll": 1.0, "tokens": 10} for c in settings["ctx"]},
              "passkey": {str(n): float(rng.random()) for n in settings["passkey_lengths"]},
              "records": {"fields": list(toy_run.RECORD_FIELDS), "rows": records},
              "recall": {m: [float(rng.random()) for _ in settings["recall"]["distances"]]
                         for m in toy_report.RECALL_METRICS},
              "rope_scaling": None, "rope": "none", "git": {"commit": "0" * 40, "dirty": False},
              "cost": {"eval_wall_s": 1.0, "eval_loadavg_start": [1, 1, 1], "eval_loadavg_end": [1, 1, 1]}}
    if toy_rows.ROW[slug].long:
        result["by_step"] = {str(step): {k: result[k] for k in ("ppl", "passkey", "recall")}
                             for step in toy_rows.step_evals(toy_rows.ROW[slug], settings)}
    if toy_rows.ROW[slug].target:
        distances = [d for d in toy_rows.EXTENDED["distances"] if d <= 3 * toy_rows.ROW[slug].target // 4]
        ctxs = [256 * 2 ** k for k in range(8) if 256 * 2 ** k <= toy_rows.ROW[slug].target]
        result["extended"] = {"settings": toy_rows.EXTENDED, "target": toy_rows.ROW[slug].target,
                              "ppl": {str(c): {"ppl": 40 + rng.random(), "nll": 1.0, "tokens": 10} for c in ctxs},
                              "distances": distances,
                              "recall": {"passkey_accuracy": [float(rng.random()) for _ in distances]}}
    if seed is not None:
        counts = census.empty_counts()
        result["census"] = {"method": counts, "replay": counts, "steps": 1, "seed": seed}
        result["cost"].update(seconds_per_step=0.5, peak_mem_gb=1.0, steps=1, method_tokens_per_step=4096,
                              final_loss=3.0, final_replay_loss=0.1, train_wall_s=60.0,
                              train_attempts=[{"resume": False, "threads": None, "seconds": 60.0,
                                               "loadavg_start": [1, 1, 1], "loadavg_end": [1, 1, 1]}])
    return result


def fake_out(path, settings, done):
    """A --out holding settings.json and the eval.json of each (slug, seed) in `done`."""
    os.makedirs(path, exist_ok=True)
    reproduce_common.write_json(os.path.join(path, "settings.json"), settings)
    for slug, seed in done:
        folder = reproduce_common.row_dir(str(path), toy_rows.ROW[slug], seed)
        os.makedirs(folder, exist_ok=True)
        reproduce_common.write_json(os.path.join(folder, "eval.json"), fake_eval(settings, slug, seed))
    return str(path)


def tree_digest(folder):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(d, name), "rb").read())
    return h.hexdigest()


def test_publish_refuses_quick_partial_and_other_settings(tmp_path):
    dest = tmp_path / "results"
    dest.mkdir()
    (dest / "results.md").write_text("the committed results\n")
    before = tree_digest(dest)
    design, quick = toy_rows.design_settings(), toy_rows.design_settings(quick=True)
    rows = ["original", "pose-n2"]
    everything = [("original", None)] + [("pose-n2", s) for s in (0, 1, 2)]
    cases = {
        "quick": (fake_out(tmp_path / "quick", quick, [("original", None), ("pose-n2", 0)]), "--quick run"),
        "partial": (fake_out(tmp_path / "partial", design, everything[:-1]), "pose-n2 seed 2"),
        "settings": (fake_out(tmp_path / "settings", dict(design, steps=50), everything), "settings other"),
        "empty": (str(tmp_path / "empty"), "no settings.json"),
    }
    for name, (out, message) in cases.items():
        with pytest.raises(toy_report.PublishError, match=message):
            toy_publish.publish(out, rows, dest=str(dest))
        assert tree_digest(dest) == before, name
    # the command itself: an error, and results/ of the repository untouched
    committed = tree_digest(toy_publish.RESULTS)
    for argv in (["--publish", "--out", cases["quick"][0]], ["--publish", "--out", cases["partial"][0], "--rows",
                                                             ",".join(rows)]):
        with pytest.raises(SystemExit) as e:
            reproduce.main(argv)
        assert "error" in str(e.value)
    with pytest.raises(SystemExit):
        reproduce.main(["--publish", "--quick", "--out", cases["quick"][0]])
    assert tree_digest(toy_publish.RESULTS) == committed

    # finished rows of a design run: published, with every seed's numbers and their mean and deviation
    out = fake_out(tmp_path / "done", design, everything)
    written = toy_publish.publish(out, rows, dest=str(dest))
    assert sorted(os.listdir(dest)) == sorted(toy_publish.PUBLISHED)
    assert len(written) == len(toy_publish.PUBLISHED)
    results = json.load(open(dest / "results.json"))
    pose = results["rows"]["pose-n2"]
    assert sorted(pose["per_seed"]) == ["0", "1", "2"] and set(results["rows"]) == set(rows)
    values = [pose["per_seed"][s]["ppl"]["2048"]["ppl"] for s in "012"]
    assert pose["summary"]["ppl"]["2048"]["mean"] == pytest.approx(np.mean(values))
    assert pose["summary"]["ppl"]["2048"]["std"] == pytest.approx(np.std(values, ddof=1))
    md = (dest / "results.md").read_text()
    assert not md.startswith(toy_report.SMOKE) and "±" in md and "Pending" not in md
    assert pose["seeds_expected"] == [0, 1, 2, 3, 4] and "| 3 of 5 |" in md  # seeds 3-4 (section 15) not yet there

    # --partial: a row with some of its seeds is published, listed as pending; a row with none is still refused
    toy_publish.publish(cases["partial"][0], rows, dest=str(dest), partial=True)
    md = (dest / "results.md").read_text()
    assert "Pending (not all seeds computed): PoSE N=2" in md and "| 2 of 5 |" in md
    with pytest.raises(toy_report.PublishError, match="randpos"):
        toy_publish.publish(cases["partial"][0], rows + ["randpos"], dest=str(dest), partial=True)

    # seeds 3 and 4 join the row when computed
    out = fake_out(tmp_path / "five", design, everything + [("pose-n2", 3), ("pose-n2", 4)])
    toy_publish.publish(out, rows, dest=str(dest))
    pose = json.load(open(dest / "results.json"))["rows"]["pose-n2"]
    assert sorted(pose["per_seed"]) == ["0", "1", "2", "3", "4"] and pose["summary"]["ppl"]["2048"]["n"] == 5


def test_paired_rule_with_three_and_five_seeds():
    """Section 14's rule on seeds 0-2 (t > 4.30) and section 15's on seeds 0-4 (t > 2.78), both same-sign."""
    settings = toy_rows.design_settings()

    def results(diffs):
        rows = {slug: {"seeds_expected": [0, 1, 2, 3, 4], "per_seed": {}} for slug in ("pose-n2", "pi-ft")}
        for seed, d in enumerate(diffs):
            for slug, value in (("pose-n2", 40.0 + d), ("pi-ft", 40.0)):
                rows[slug]["per_seed"][str(seed)] = {"ppl": {"2048": {"ppl": value}}}
        return {"settings": settings, "rows": rows}

    three = results([1.0, 1.1, 0.9])
    assert toy_report.paired(three, "pose-n2", "pi-ft", "ppl", 3)["finding"]
    assert toy_report.paired(three, "pose-n2", "pi-ft", "ppl", 5) is None  # seeds 3-4 missing
    five = toy_report.paired(results([1.0, 0.2, 1.5, 0.4, 1.2]), "pose-n2", "pi-ft", "ppl", 5)
    assert five["t"] == pytest.approx(np.mean([1.0, 0.2, 1.5, 0.4, 1.2]) / (np.std([1.0, 0.2, 1.5, 0.4, 1.2], ddof=1)
                                                                              / np.sqrt(5)))
    assert 2.78 < five["t"] < 4.30 and five["finding"]  # a finding with 5 seeds at a t that 3 seeds would not pass
    assert not toy_report.paired(results([1.0, -0.2, 1.5, 0.4, 1.2]), "pose-n2", "pi-ft", "ppl", 5)["finding"]


def test_quick_results_are_labelled(tmp_path):
    quick = toy_rows.design_settings(quick=True)
    out = fake_out(tmp_path / "quick", quick, [("original", None), ("pose-n2", 0)])
    _, md = toy_report.write_results(out, quick, ["original", "pose-n2", "randpos"])
    assert md.startswith(toy_report.SMOKE) and open(os.path.join(out, "results.md")).read() == md
    assert "Pending (not all seeds computed): RandPos" in md
    # PoSE N=2 heads the methods table; the chunk-content table, which would hold it alone, is left out
    assert "## Methods" in md and "## Chunk content" not in md
    with pytest.raises(SystemExit):  # a --out keeps its settings
        toy_rows.check_out(out, toy_rows.design_settings())



def test_long_rows_are_reported_by_step(tmp_path):
    design = toy_rows.design_settings()
    slugs = ["pose-linear-1k", "full-token-linear-1k"]
    out = fake_out(tmp_path / "long", design, [(slug, seed) for slug in slugs for seed in (0, 1, 2)])
    results, md = toy_report.write_results(out, design, slugs)
    section = md.split("## Linear at the paper's budget, by step")[1].split("\n\n", 2)[2].split("\n\n")[0]
    lines = section.splitlines()[2:]
    assert [line.split(" | ")[2] for line in lines] == ["100", "250", "500", "1000"] * 2
    per_seed = results["rows"]["pose-linear-1k"]["per_seed"]
    assert sorted(per_seed) == ["0", "1", "2"]  # seeds 0-2 (DESIGN.md section 17)
    mean = statistics.fmean(r["by_step"]["250"]["ppl"]["2048"]["ppl"] for r in per_seed.values())
    assert f"| 3 | 250 | {mean:.2f} ± " in lines[1]
    toy_publish.publish(out, slugs, dest=str(tmp_path / "published"))


def test_restore_then_publish_gives_the_published_rows(tmp_path):
    """--restore on a fresh --out, then --publish: the same rows, numbers and tables as published before."""
    design = toy_rows.design_settings()
    rows = ["original", "pose-n2", "pi-ft"]
    out = fake_out(tmp_path / "before", design, [("original", None)] + [(r, s) for r in rows[1:] for s in range(5)])
    toy_publish.publish(out, rows, dest=str(tmp_path / "v1"))
    published = str(tmp_path / "v1" / "results.json")
    assert toy_publish.restore(str(tmp_path / "fresh"), published) == 11
    assert toy_publish.restore(str(tmp_path / "fresh"), published) == 0  # nothing overwritten
    toy_publish.publish(str(tmp_path / "fresh"), rows, dest=str(tmp_path / "v2"))
    a, b = (json.load(open(tmp_path / v / "results.json")) for v in ("v1", "v2"))
    assert a["rows"] == b["rows"] and a["settings"] == b["settings"]
    assert (tmp_path / "v1" / "results.md").read_text() == (tmp_path / "v2" / "results.md").read_text()
    # a quick run's file, or an unreadable one, restores nothing
    quick = fake_out(tmp_path / "quick", toy_rows.design_settings(quick=True), [("original", None)])
    toy_report.write_results(quick, toy_rows.design_settings(quick=True), ["original"])
    for path, message in ((os.path.join(quick, "results.json"), "design's settings"),
                          (str(tmp_path / "missing.json"), "cannot read")):
        with pytest.raises(toy_report.PublishError, match=message):
            toy_publish.restore(str(tmp_path / "other"), path)
        assert not os.path.exists(tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--restore", str(tmp_path / "missing.json"), "--out", str(tmp_path / "other")])
    assert str(e.value).startswith("error: cannot read")


def test_extreme_rows_rule(tmp_path):
    """DESIGN.md section 16: PoSE to 16k minus its YaRN-only row (one model) per seed, and minus PoSE N=2 at the
    recipe's lengths, seeds paired; the extended table up to the target."""
    design = toy_rows.design_settings()
    slugs = ["pose-n2", "pose-16k", "yarn-only-16k"]
    out = fake_out(tmp_path / "x", design, [("yarn-only-16k", None)] + [(r, s) for r in slugs[:2] for s in range(3)])
    for seed, gain in enumerate([0.5, 0.6, 0.4]):  # PoSE-16k passes the far passkey `gain` more often
        path = os.path.join(reproduce_common.row_dir(out, toy_rows.ROW["pose-16k"], seed), "eval.json")
        r = reproduce_common.read_json(path)
        r["extended"]["recall"]["passkey_accuracy"] = [0.1 + gain] * 3
        reproduce_common.write_json(path, r)
    path = os.path.join(reproduce_common.row_dir(out, toy_rows.ROW["yarn-only-16k"], None), "eval.json")
    r = reproduce_common.read_json(path)
    r["extended"]["recall"]["passkey_accuracy"] = [0.1] * 3
    reproduce_common.write_json(path, r)
    results, md = toy_report.write_results(out, design, slugs)
    section = md.split("## Extreme extension, up to the target")[1]
    assert "| ppl 16384 |" in section and "| passkey d=12288 |" in section and "d=24576" not in section
    line = next(x for x in section.splitlines() if "yarn-only-16k | passkey" in x)
    t = np.mean([0.5, 0.6, 0.4]) / (np.std([0.5, 0.6, 0.4], ddof=1) / np.sqrt(3))
    assert "+0.500, +0.600, +0.400 | +0.500 |" in line and f"| {t:.2f} | yes |" in line
    n2 = results["rows"]["pose-n2"]["per_seed"]
    x16 = results["rows"]["pose-16k"]["per_seed"]
    diffs = [x16[s]["ppl"]["2048"]["ppl"] - n2[s]["ppl"]["2048"]["ppl"] for s in "012"]
    line = next(x for x in section.splitlines() if "PoSE N=2 | ppl at 2048" in x)
    assert ", ".join(f"{d:+.3f}" for d in diffs) in line
    assert "PoSE N=2, to 32768" not in section  # rows not asked for are not shown
    # with the 32k rows too: each comparison at its own target, the longer columns empty for the 16k rows
    more = [("yarn-only-32k", None)] + [("pose-32k", s) for s in range(3)]
    fake_out(out, design, more)
    _, md = toy_report.write_results(out, design, slugs + ["pose-32k", "yarn-only-32k"])
    section = md.split("## Extreme extension, up to the target")[1]
    assert "| ppl 32768 |" in section and "| passkey d=24576 |" in section
    assert "yarn-only-16k | ppl at 16384 |" in section and "yarn-only-32k | ppl at 32768 |" in section
    row16 = next(x for x in section.splitlines() if x.startswith("| PoSE N=2, to 16384"))
    assert row16.endswith("| - |")  # no d=24576 for a 16k row


def test_extended_evaluation_on_the_bundled_base(tmp_path):
    """--quick's extended evaluation on the bundled base: tiling windows score every token of the play once at
    every ctx up to 4096, and the passkey prompts keep the key exactly 3072 tokens back within 4096 tokens."""
    import data
    import rope
    from model import LLaMA

    quick = toy_rows.design_settings(quick=True)
    tokenizer = data.Tokenizer(os.path.join(ROOT, "assets", "tiny"))
    model = LLaMA.from_pretrained(os.path.join(ROOT, "assets", "tiny"))
    model.set_rope_scaling(rope.scaling_from_spec("yarn:64,beta_fast=4,beta_slow=1", 256))
    r = toy_run.evaluate_extended(model, tokenizer, quick, 16384, str(tmp_path))
    assert list(r["ppl"]) == ["256", "512", "1024", "2048", "4096"] and r["distances"] == [3072]
    assert {v["tokens"] for v in r["ppl"].values()} == {4095}  # the first 4096 tokens, BOS not scored
    assert all(np.isfinite(v["ppl"]) for v in r["ppl"].values())
    trials = r["recall_records"]["passkey"]
    assert len(trials) == 2 and all(t["distance"] == 3072 and t["prompt_tokens"] <= t["length"] == 4096
                                    for t in trials)
    assert toy_run.evaluate_extended(None, tokenizer, quick, 16384, str(tmp_path)) == r  # kept: not recomputed
