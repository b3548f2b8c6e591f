"""The GMM benchmark harness runs end to end on a tiny grid (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gmm", os.path.join(ROOT, "benchmarks", "bench_gmm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_min_flops_counts():
    b = _bench()
    # full: 2 n K (d+1)(d+2): for d=16, K=16, n=1e6 that is 9.79 GFLOP
    assert b.min_flops(1_000_000, 16, 16, "full") == pytest.approx(2 * 1e6 * 16 * 17 * 18)
    assert b.min_flops(10, 3, 2, "diag") == 4 * 10 * 2 * 7


def _run(tmp_path, systems, extra=()):
    b = _bench()
    out = tmp_path / "out"
    b.main(["--grid", "tiny", "--systems", systems, "--iters", "2", "--no-ceiling",
            "--datadir", str(tmp_path / "data"), "--out", str(out), *extra])
    res = json.loads((out / "results.json").read_text())
    return out, res


@pytest.mark.slow  # 12-27 s: kept out of the default run (make test-slow)
def test_benchmark_runs_on_a_tiny_grid(tmp_path):
    out, res = _run(tmp_path, "emflow,sklearn")
    rows = res["rows"]
    assert {(r["ct"], r["system"]) for r in rows} == {(c, s) for c in ("full", "diag") for s in ("emflow", "sklearn")}
    for ct in ("full", "diag"):
        em, sk = (next(r for r in rows if r["ct"] == ct and r["system"] == s) for s in ("emflow", "sklearn"))
        assert em["status"] == sk["status"] == "ok", (em, sk)
        # same start, same iterations, same data: the final models score the same
        assert abs(em["loglik"] - sk["loglik"]) <= 1e-9 * abs(sk["loglik"])
        assert em["sec_per_iter"] > 0 and em["peak_mb"] > 0
    md = (out / "RESULTS.md").read_text()
    assert "| full | 2,000 | 3 | 2 | emflow |" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "throughput.png").stat().st_size > 1000


@pytest.mark.slow
def test_benchmark_with_spark_on_a_tiny_grid(tmp_path):
    b = _bench()
    if b.spark_available():
        pytest.skip(b.spark_available())
    _, res = _run(tmp_path, "emflow,spark")
    sp = next(r for r in res["rows"] if r["ct"] == "full" and r["system"] == "spark")
    em = next(r for r in res["rows"] if r["ct"] == "full" and r["system"] == "emflow")
    assert sp["status"] == "ok"
    assert abs(sp["loglik"] - em["loglik"]) <= 1e-8 * abs(em["loglik"])
    assert next(r for r in res["rows"] if r["ct"] == "diag" and r["system"] == "spark")["status"].startswith("n/a")
