"""cli.py: --threads, progress lines for log files, counted nouns."""
import io
import os

import pytest
import torch

from lib import cli


def test_threads_flag_and_what_it_sets(monkeypatch):
    p = cli.ArgumentParser()
    cli.add_threads(p)
    assert p.parse_args([]).threads is None and p.parse_args(["--threads", "3"]).threads == 3
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        cli.set_threads(None)  # the defaults stay
        assert torch.get_num_threads() == threads and "RAYON_NUM_THREADS" not in os.environ
        cli.set_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["RAYON_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_bad_values_are_one_line(value, capsys):
    p = cli.ArgumentParser()
    cli.add_threads(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--threads", value])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: argument --threads: ") and len(err.splitlines()) == 1


def test_progress_without_a_terminal_writes_lines(monkeypatch):
    """Redirected stderr: a line at the start, one per interval (0 here: each update) and one at the end."""
    err = io.StringIO()  # isatty() is False, as for a log file
    monkeypatch.setattr("sys.stderr", err)
    with cli.progress(3, desc="ctx=8", unit="win", interval=0) as bar:
        for _ in range(3):
            bar.update()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and lines[0].startswith("ctx=8:   0%|") and lines[-1].startswith("ctx=8: 100%|")
    assert len(lines) >= 3 and all(line.startswith("ctx=8: ") for line in lines)
    with cli.progress(3, enabled=False) as bar:
        bar.update(3)
    assert err.getvalue().splitlines() == lines


def test_plural():
    assert [cli.plural(n, "document") for n in (0, 1, 2, 1500)] == ["0 documents", "1 document", "2 documents",
                                                                      "1,500 documents"]


def test_a_long_forward_pass_says_its_size_and_reports_by_layer(monkeypatch):
    """One forward pass over many tokens names its size before it starts and counts its layers; a short one says
    nothing."""
    from model import LLaMA, ModelConfig
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    model = LLaMA(ModelConfig(vocab_size=32, dim=16, n_layers=3, n_heads=2, n_kv_heads=2, intermediate_size=32,
                              max_position_embeddings=64))
    cli.layer_progress(model, min_tokens=40)
    with torch.no_grad():
        model(torch.zeros(1, 39, dtype=torch.long))
        assert err.getvalue() == ""
        model(torch.zeros(2, 20, dtype=torch.long))
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("one forward pass over 40 tokens:") and "0/3" in lines[0]
    assert "3/3" in lines[-1] and "\r" not in err.getvalue()
