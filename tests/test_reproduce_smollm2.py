"""scripts/reproduce_smollm2.py: its design settings, the paired decision rule, and one row end to end on the bundled
tiny model (the experiment itself needs SmolLM2 and hours; CI runs none of it)."""
import importlib.util
import json
import os

import numpy as np
import pytest

import recall
from helpers import ROOT

spec = importlib.util.spec_from_file_location("reproduce_smollm2", os.path.join(ROOT, "scripts", "reproduce_smollm2.py"))
smol = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smol)


def test_design_settings_fit_the_target_and_the_regions():
    s = smol.design_settings()
    assert (s["window"], s["target"], s["train_len"]) == (8192, 16384, 1024)
    groups = {recall.group_length(d + 2 * s["passage"] + 1, s["ladder"]) for d in s["distances"]}
    assert max(groups) == s["target"]  # every copy probe fits a sequence no longer than the target
    counts = {name: sum(lo < d <= hi for d in s["distances"]) * s["sequences"]
              for name, (lo, hi) in smol.regions(s).items()}
    assert counts == {"trained": 10, "beyond_train": 22, "beyond_window": 16}
    # copy_more: 6 more draws of the 16384-token sequences, so that the probes beyond the window come from 8
    assert smol.longest(s) == [8192, 9216, 10240, 11264, 12288, 13312, 14336, 15360, 16256]
    assert s["sequences"] + s["more_sequences"] == 8 and s["seeds"] == [0, 1, 2]
    first = smol.first_design(s)
    assert first["seeds"] == [0] and "more_sequences" not in first and dict(first, seeds=s["seeds"],
                                                                            more_sequences=6) == s
    assert all(d <= s["target"] for d in s["passkey_distances"])
    trained = [r for r in smol.ROWS if r.train]
    assert [r.slug for r in trained] == ["pi-ft", "pose"]
    args = [smol.train_args(r, s, 0, "D") for r in trained]
    assert args[0][:-len(trained[0].train)] == args[1][:-len(trained[1].train)]  # everything but the method shared


def probe(distance, first, copy_nll):
    return dict(distance=distance, length=2048, first=first, source=7, first_nll=5.0, copy_nll=copy_nll)


def test_paired_copy_is_a_paired_t_over_the_same_probes():
    rng = np.random.default_rng(0)
    pi = [probe(d, i, float(v)) for i, (d, v) in enumerate(zip([1536] * 12, rng.uniform(1, 3, 12)))]
    diffs = rng.normal(-0.3, 0.2, 12)
    pose = [dict(p, copy_nll=p["copy_nll"] + float(x)) for p, x in zip(pi, diffs)]
    pose.append(probe(1536, 99, 0.0))  # a probe the other model lacks is not paired
    r = smol.paired_copy(pose, pi, 1024, 8192)
    assert r["n"] == 12 and r["mean"] == pytest.approx(diffs.mean())
    assert r["t"] == pytest.approx(diffs.mean() / (diffs.std(ddof=1) / np.sqrt(12)))
    assert r["critical"] == 2.201 and r["finding"] == (abs(r["t"]) > 2.201)
    assert smol.paired_copy(pose, pi, 8192, 16384)["n"] == 0  # no probe in that region


def copy_parts(nll, seq):
    """A row-seed's two copy parts with made-up copy NLLs: one probe per region in copy (nll[0], nll[1], nll[2]) and
    one more beyond the window in copy_more (nll[3])."""
    copy = [dict(probe(d, i, v), sequence=seq) for i, (d, v) in enumerate(zip((512, 4096, 9216), nll))]
    return {"copy": copy, "copy_more": [dict(probe(12288, 9, nll[3]), sequence="16384/2/0")]}


def test_the_rule_over_seeds():
    s = smol.design_settings()
    diffs = {"trained": [0.02, 0.03, 0.025], "beyond_train": [0.1, -0.1, 0.05], "beyond_window": [-0.30, -0.25, -0.35]}
    pi = {str(x): copy_parts([1.0 + 0.1 * x, 2.0 + 0.1 * x, 3.0 + 0.1 * x, 3.2 + 0.1 * x], "1024/0/0")
          for x in (0, 1, 2)}
    pose = {str(x): copy_parts([1.0 + 0.1 * x + diffs["trained"][x], 2.0 + 0.1 * x + diffs["beyond_train"][x],
                                3.0 + 0.1 * x + diffs["beyond_window"][x], 3.2 + 0.1 * x + diffs["beyond_window"][x]],
                               "1024/0/0") for x in (0, 1, 2)}
    rows = {"pose": {"seeds": pose}, "pi-ft": {"seeds": pi}, "yarn-only": {"seeds": {"None": copy_parts(
        [1.5, 2.5, 3.5, 3.5], "1024/0/0")}}}
    rule = smol.seed_rule(rows, s)
    for region, d in diffs.items():
        v = rule["pose - pi-ft"][region]
        assert v["diffs"] == pytest.approx(d) and v["mean"] == pytest.approx(np.mean(d))
        assert v["t"] == pytest.approx(np.mean(d) / (np.std(d, ddof=1) / np.sqrt(3)))
    assert rule["pose - pi-ft"]["beyond_window"]["t"] == pytest.approx(-10.39, abs=0.01)
    assert rule["pose - pi-ft"]["beyond_window"]["finding"] and rule["pose - pi-ft"]["trained"]["finding"]
    assert not rule["pose - pi-ft"]["beyond_train"]["finding"]  # the seeds disagree in sign
    # against YaRN-only (one model): per seed, the row's region mean minus YaRN-only's
    assert rule["pi-ft - yarn-only"]["beyond_window"]["diffs"] == pytest.approx([-0.4, -0.3, -0.2])
    assert rule["pose - yarn-only"]["trained"]["diffs"] == pytest.approx([-0.48, -0.37, -0.275])
    assert rule["null: pi-ft seed 1 - seed 0"] == pytest.approx({r: 0.1 for r in diffs})
    # one seed with the same sign everywhere but a small t is no finding
    assert not smol.over_seeds([0.1, 0.5, 0.02])["finding"] and smol.over_seeds([0.1, 0.5, 0.02])["t"] < 4.30
    # computed only once every row-seed has both copy parts
    del pose["2"]["copy_more"]
    del rows["yarn-only"]["seeds"]["None"]["copy"]
    assert smol.seed_rule(rows, s) == {"pending": ["pose seed 2 copy_more", "yarn-only copy"]}


def test_sequences_of_probes_recorded_without_them_are_rebuilt():
    s = smol.design_settings()
    text = np.random.default_rng(1).integers(0, 50000, 123457)  # not the stand-in's text or length
    seqs = recall.copy_sequences(text, 1, s["distances"], s["ladder"], s["passage"], s["sequences"], s["copy_seed"])
    recorded = [dict(distance=p.distance, length=len(q.ids), sequence=q.name, first=p.first, source=p.source)
                for q in seqs for p in q.probes]
    legacy = [{k: v for k, v in r.items() if k != "sequence"} for r in recorded]
    assert smol.rebuild_sequences(legacy, s) == recorded
    # the first design's probes sit in 11 sequences: the second 1024-token draw placed 3 of its 4 distances
    assert len(seqs) == 11 and [q.name for q in seqs if q.name.startswith("1024/1/")] == ["1024/1/0", "1024/1/1"]
    assert smol.sequences_beyond({"copy": recorded}, s) == 2
    moved = [dict(legacy[0], first=legacy[0]["first"] + 1)] + legacy[1:]  # places that do not match: unknown
    assert all(r["sequence"] is None for r in smol.rebuild_sequences(moved, s))
    assert smol.sequences_beyond({"copy": smol.rebuild_sequences(moved, s)}, s) is None
    # the published runs: every probe's sequence recorded or rebuilt
    published = json.load(open(os.path.join(smol.RESULTS, "results.json")))
    for row in published["rows"].values():
        for r in row["seeds"].values():
            assert None not in [p["sequence"] for p in smol.rebuild_sequences(r["copy"], published["settings"])]


def test_one_row_end_to_end_on_the_bundled_model(tmp_path, monkeypatch, capsys):
    """The original row with --quick's sizes on assets/tiny: every part computed once, then eval.json, the table and
    the plots; a second run computes nothing."""
    quick = dict(smol.design_settings(quick=True), base="assets/tiny", window=256, target=1024)
    monkeypatch.setattr(smol, "design_settings", lambda quick_=False, q=quick: dict(q))
    out = str(tmp_path / "out")
    smol.main(["--quick", "--rows", "original", "--out", out])
    folder = os.path.join(out, "original")
    assert sorted(os.listdir(folder)) == ["copy.json", "copy_more.json", "eval.json", "passkey.json", "ppl.json"]
    result = json.load(open(os.path.join(folder, "eval.json")))
    assert set(result["ppl"]) == {"512", "1024"}
    assert sorted({p["distance"] for p in result["copy"]}) == quick["distances"]
    # every probe names its sequence; copy_more adds draw 1 of the longest sequences (the copy part has draw 0)
    assert {p["sequence"] for p in result["copy"]} == {"256/0/0", "512/0/0", "1024/0/0"}
    assert [(p["distance"], p["sequence"]) for p in result["copy_more"]] == [(768, "1024/1/0")]
    assert smol.sequences_beyond(result, quick) == 3
    assert len(result["passkey"]) == quick["passkey_trials"] * len(quick["passkey_distances"])
    md = open(os.path.join(out, "results.md")).read()
    assert md.startswith(f"**{smol.SMOKE}**") and "| Original (8k window) | " in md
    assert "Pending (the rule is computed once all of these are there): pose seed 0 copy," in md
    assert os.path.isfile(os.path.join(out, "recall.png")) and os.path.isfile(os.path.join(out, "ppl.png"))
    before = os.path.getmtime(os.path.join(folder, "eval.json"))
    smol.main(["--quick", "--rows", "original", "--out", out])
    assert os.path.getmtime(os.path.join(folder, "eval.json")) == before
    with pytest.raises(SystemExit, match="no design run"):  # a smoke run is never published
        smol.publish(out)
    # a run of the first design (seed 0, no copy_more) is taken up: only the missing part is computed
    os.remove(os.path.join(folder, "copy_more.json"))
    smol.write_json(os.path.join(folder, "eval.json"), {k: v for k, v in result.items() if k != "copy_more"})
    smol.write_json(os.path.join(out, "settings.json"), smol.first_design(quick))
    before = os.path.getmtime(os.path.join(folder, "copy.json"))
    smol.main(["--quick", "--rows", "original", "--out", out])
    assert json.load(open(os.path.join(folder, "eval.json")))["copy_more"] == result["copy_more"]
    assert os.path.getmtime(os.path.join(folder, "copy.json")) == before
    assert json.load(open(os.path.join(out, "settings.json"))) == quick
    with pytest.raises(SystemExit):
        smol.main(["--quick", "--seeds", "3", "--out", out])
    assert "error: --seeds must be among the quick seeds [0]" in capsys.readouterr().err
