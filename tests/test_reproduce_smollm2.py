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


def test_one_row_end_to_end_on_the_bundled_model(tmp_path, monkeypatch):
    """The original row with --quick's sizes on assets/tiny: every part computed once, then eval.json, the table and
    the plots; a second run computes nothing."""
    quick = dict(smol.design_settings(quick=True), base="assets/tiny", window=256, target=1024)
    monkeypatch.setattr(smol, "design_settings", lambda quick_=False, q=quick: dict(q))
    out = str(tmp_path / "out")
    smol.main(["--quick", "--rows", "original", "--out", out])
    folder = os.path.join(out, "original")
    assert sorted(os.listdir(folder)) == ["copy.json", "eval.json", "passkey.json", "ppl.json"]
    result = json.load(open(os.path.join(folder, "eval.json")))
    assert set(result["ppl"]) == {"512", "1024"}
    assert sorted({p["distance"] for p in result["copy"]}) == quick["distances"]
    assert len(result["passkey"]) == quick["passkey_trials"] * len(quick["passkey_distances"])
    md = open(os.path.join(out, "results.md")).read()
    assert md.startswith(f"**{smol.SMOKE}**") and "| Original (8k window) | " in md
    assert os.path.isfile(os.path.join(out, "recall.png")) and os.path.isfile(os.path.join(out, "ppl.png"))
    before = os.path.getmtime(os.path.join(folder, "eval.json"))
    smol.main(["--quick", "--rows", "original", "--out", out])
    assert os.path.getmtime(os.path.join(folder, "eval.json")) == before
    with pytest.raises(SystemExit, match="no design run"):  # a smoke run is never published
        smol.publish(out)
