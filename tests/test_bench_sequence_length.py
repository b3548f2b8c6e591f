"""The sequence-length benchmark runs both systems on the same data from the same start (its
agreement column is what says so) and writes its table, JSON and plot. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_model_agrees_with_its_peer_and_the_report_is_written(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_sequence_length",
                                                  os.path.join(ROOT, "benchmarks", "bench_sequence_length.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--lengths", "60,200", "--repeats", "1", "--iters", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["model"], r["length"]) for r in rows} == {
        (m, L) for m in ("GaussianHMM diag", "GaussianHMM full", "CategoricalHMM", "LinearGaussianSSM")
        for L in (60, 200)}
    for r in rows:  # the same algorithm from the same start: per-iteration log-likelihoods agree
        assert r["agree"] < 1e-10, r
        assert r["peer_s"] > 0 and r["emflow_s"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| LinearGaussianSSM | pykalman | 200 |" in text
    assert (tmp_path / "seqlen.png").stat().st_size > 1000
