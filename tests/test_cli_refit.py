"""``emflow refit MODEL DATA`` (issue 20, item 1; issue 15, item 3) and ``emflow flows run emflow-refit``."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import emflow
from emflow.cli import app

# imported first outside CliRunner (see tests/test_cli_families.py): Prefect's log handlers
import prefect.main  # noqa: E402,F401  isort: skip
from emflow.storage.synthetic import write_gmm

pytestmark = pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")


@pytest.fixture(autouse=True)
def _one_blas_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=80)


def _listing(root) -> dict[str, float]:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def grown(tmp_path):
    """A mixture fitted on 1200 rows (without a ledger) and saved; then 400 more rows appended
    to its data (one storage chunk per partition: 400 rows x 2 float64)."""
    src = write_gmm(tmp_path / "all.zarr", 1600, 3, 2, "full", seed=2, chunk_rows=400, separation=4.0)
    data = write_gmm(tmp_path / "train.zarr", 1200, 3, 2, "full", seed=2, chunk_rows=400, separation=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = emflow.GaussianMixture(3, tol=1e-6, random_state=0, partition_bytes=400 * 2 * 8,
                                    scheduler="threads").fit(data)
    model = gm.save(tmp_path / "model.zarr")
    X = zarr.open_group(data, mode="r+")["X"]
    X.resize((1600, 2))
    X[1200:] = zarr.open_group(src, mode="r")["X"][1200:]
    return {"data": data, "model": model, "fitted": gm, "root": tmp_path}


def test_refit_after_an_append_reports_and_improves(grown, tmp_path):
    out = tmp_path / "refitted.zarr"
    r = run("refit", grown["model"], grown["data"], "--out", out, "--max-iter", 50, "-s", "threads")
    assert r.exit_code == 0, r.output
    ref = emflow.GaussianMixture(**{**grown["fitted"].get_params(), "max_iter": 50, "scheduler": "threads"})
    ref.fit(grown["data"], initial_params=grown["fitted"]._get_parameters())
    # the same per-iteration line as `emflow fit`, one per EM iteration of the library's refit
    lines = re.findall(r"^iter +(\d+)  log-likelihood (\S+)  change", r.output, re.M)
    assert [int(i) for i, _ in lines] == list(range(1, ref.n_iter_ + 1))
    assert [float(v) for _, v in lines] == pytest.approx(ref.history_, rel=1e-9)
    est = emflow.load(out)
    np.testing.assert_allclose(est.means_, ref.means_, rtol=1e-10)
    assert est.lower_bound_ >= ref.history_[0] - 1e-12  # improves or keeps the log-likelihood
    text = " ".join(r.output.split())
    assert f"mean log-likelihood before │ {ref.history_[0]:.10g}" in text
    assert f"mean log-likelihood after │ {ref.lower_bound_:.10g}" in text
    assert f"passes over the data │ {ref.n_passes_} │" in text
    assert "new / changed / reused" in text and "size │ 1,200 -> 1,600" in text
    assert emflow.load(grown["model"]).lower_bound_ == grown["fitted"].lower_bound_  # MODEL left as it was
    # no ledger before: every partition is new; the ledger is written beside the model saved
    assert "new / changed / reused │ 4 / 0 / 0" in text
    assert os.path.isdir(f"{out}.ledger") and not os.path.exists(grown["model"] + ".ledger")
    # 400 more rows: the ledger's four partitions are reused, the new one is read first
    X = zarr.open_group(grown["data"], mode="r+")["X"]
    X.resize((2000, 2))
    X[1600:] = np.random.default_rng(5).normal(size=(400, 2)) + X[:400]
    r = run("refit", out, grown["data"], "--overwrite", "--max-iter", 50, "-s", "threads")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "new / changed / reused │ 1 / 0 / 4" in text and "ledger's parameters on the grown data" in text
    est = emflow.load(out)
    assert est.fit_info_["ledger"]["partitions_reused"] == 4 and est.lower_bound_ >= est.history_[0]


def test_refit_refuses_and_writes_nothing(grown, tmp_path):
    wide = write_gmm(tmp_path / "wide.zarr", 400, 3, 3, "full", seed=1, chunk_rows=200)
    f32 = write_gmm(tmp_path / "f32.zarr", 400, 3, 2, "full", seed=1, chunk_rows=200, dtype="float32")
    before = _listing(tmp_path)
    cases = [
        ((grown["model"], wide, "--overwrite"), "the data have 3 features; the model was fitted on 2"),
        ((grown["model"], f32, "-o", tmp_path / "new.zarr"), "dtype is float32; the model was fitted on float64"),
        ((grown["model"], grown["data"]), "already holds an emflow gaussian_mixture model. Pass overwrite=True "
                                          "(--overwrite)"),
        ((grown["model"], grown["data"], "-o", grown["data"]), "that path is DATA"),
        ((grown["model"], grown["data"], "--max-iter", 0, "-o", tmp_path / "new.zarr"), "--max-iter must be"),
        ((tmp_path / "nothing.zarr", grown["data"], "-o", tmp_path / "new.zarr"), "nothing.zarr"),
    ]
    for args, message in cases:
        r = run("refit", *args, "-s", "threads")
        assert r.exit_code == 2, (args, r.output)
        assert message in " ".join(r.output.split()), (args, r.output)
        assert "Traceback" not in r.output
    assert _listing(tmp_path) == before  # nothing written, nothing touched


def test_refit_help_is_readable_at_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = run("refit", "--help")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in r.output
    for opt in ("--ledger", "--max-iter", "--out", "--overwrite", "--scheduler"):
        assert opt in r.output


def test_flows_run_emflow_refit(monkeypatch):
    import flows._main

    r = run("flows", "list")
    assert r.exit_code == 0 and re.search(r"^refit +emflow-refit$", r.output, re.M), r.output
    calls = []
    monkeypatch.setattr(flows._main, "main", lambda flow, argv, module: calls.append((flow.name, argv, module)) or 0)
    r = run("flows", "run", "emflow-refit", "--param", "model=m.zarr", "-p", "data=d.zarr", "-p", "overwrite=true")
    assert r.exit_code == 0, r.output
    assert calls == [("emflow-refit", ["--param", "model=m.zarr", "--param", "data=d.zarr", "--param",
                                       "overwrite=true"], "flows.refit")]


@pytest.mark.slow
def test_flows_run_emflow_refit_runs_it(grown, prefect_server):
    r = run("flows", "run", "emflow-refit", "--param", f"model={grown['model']}", "--param",
            f"data={grown['data']}", "--param", "overwrite=true", "--param", "scheduler=threads")
    assert r.exit_code == 0, r.output
    assert emflow.load(grown["model"]).fit_info_["n_samples"] == 1600
