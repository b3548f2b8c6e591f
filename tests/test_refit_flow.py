"""Refit of a saved model on grown data (issue 15 item 3): :mod:`emflow.estimators.refit` and the
``emflow-refit`` flow (flows/refit.py) under a temporary Prefect server.

The flow's model is checked against the library's own warm-started fit (the same start, the
same data); a schema change is refused before anything is written.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import zarr

pytest.importorskip("prefect")

import emflow  # noqa: E402
from emflow.estimators import refit as _refit  # noqa: E402
from emflow.storage.synthetic import write_gmm, write_hmm, write_lda  # noqa: E402

from test_flows import _artifacts  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")

N0, N1, CHUNK = 1500, 2000, 250


def _append_rows(path: str, rows: np.ndarray) -> None:
    """Rows appended to the group's array ``X`` in place (the store grows by whole chunks)."""
    X = zarr.open_group(path, mode="r+")["X"]
    n = X.shape[0]
    X.resize((n + len(rows), X.shape[1]))
    X[n:] = rows


# one storage chunk per partition, so that the partitions of the grown data start with the old ones
KW = dict(tol=1e-6, random_state=0, partition_bytes=CHUNK * 2 * 8)


@pytest.fixture
def grown(tmp_path):
    """A mixture fitted on N0 rows with its ledger beside it (``model.zarr.ledger``) and
    saved; then N1 - N0 rows of the same mixture appended."""
    src = write_gmm(tmp_path / "all.zarr", N1, 3, 2, "full", seed=3, chunk_rows=CHUNK, separation=4.0)
    data = write_gmm(tmp_path / "train.zarr", N0, 3, 2, "full", seed=3, chunk_rows=CHUNK, separation=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = emflow.GaussianMixture(3, **KW, ledger=_refit.default_ledger(tmp_path / "model.zarr"),
                                    scheduler="threads").fit(data)
    model = gm.save(tmp_path / "model.zarr")
    _append_rows(data, zarr.open_group(src, mode="r")["X"][N0:])
    return {"data": data, "model": model, "fitted": gm, "root": tmp_path}


def _listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_refit_flow_after_an_append(prefect_server, grown):
    from flows.refit import refit_flow

    from emflow.storage.ledger import Ledger

    model, data = grown["model"], grown["data"]
    led = Ledger(model + ".ledger")
    version = led.version_params(led.summary())  # the parameters its statistics were computed at
    state = refit_flow(model, data, overwrite=True, scheduler="threads", return_state=True)
    assert state.is_completed(), state
    rep = state.result()
    refitted = emflow.load(model)
    # the model replaced in place is plain EM on the grown data from the ledger's parameters
    # (incremental EM's first iteration is plain EM's from there), for a fraction of the reads
    ref = emflow.GaussianMixture(**{**grown["fitted"].get_params(), "ledger": None, "scheduler": "threads"})
    ref.fit(data, initial_params=version)
    np.testing.assert_allclose(refitted.means_, ref.means_, rtol=1e-9)
    assert refitted.history_ == pytest.approx(ref.history_, rel=1e-9)
    # the report: the objective on the grown data before, the refit's after (never lower)
    assert rep["path"] == os.path.abspath(model)
    assert rep["log_likelihood_before"] == pytest.approx(ref.history_[0], rel=1e-9)
    assert rep["log_likelihood_after"] == pytest.approx(ref.lower_bound_, rel=1e-9)
    assert rep["log_likelihood_after"] >= rep["log_likelihood_before"] - 1e-12
    assert rep["previous_lower_bound"] == pytest.approx(grown["fitted"].lower_bound_, rel=1e-12)
    assert (rep["size_before"], rep["size_after"]) == (N0, N1)
    # the ledger's counts: the old chunks reused, the appended ones new, nothing changed
    P0, P1 = N0 // CHUNK, N1 // CHUNK
    assert (rep["partitions_total"], rep["partitions_before"]) == (P1, P0)
    assert (rep["partitions_new"], rep["partitions_changed"], rep["partitions_reused"]) == (P1 - P0, 0, P0)
    assert rep["before_params"] == "ledger version" and rep["ledger"] == model + ".ledger"
    assert rep["n_passes"] == refitted.n_passes_ < ref.n_passes_  # the first iteration read the new chunks only
    assert rep["bytes_read"] == refitted.fit_info_["ledger"]["bytes_read"] > 0
    assert rep["data_changed"] and rep["fingerprint_after"] == ref.fit_info_["fingerprint"]
    # and close to a fit from scratch on the grown data (the same optimum, well separated)
    scratch = emflow.GaussianMixture(3, **KW, scheduler="threads").fit(data)
    assert rep["log_likelihood_after"] == pytest.approx(scratch.lower_bound_, abs=1e-4)

    arts = _artifacts(state.state_details.flow_run_id)
    assert {"refit-summary", "refit-report", "refit-progress", "refit-log-likelihood"} <= set(arts)
    summary = arts["refit-summary"][-1].data
    for text in ("new / changed / reused", "passes over the data", "bytes read",
                 f"{rep['log_likelihood_before']:.10g}", f"{rep['log_likelihood_after']:.10g}"):
        assert text in summary
    table = arts["refit-report"][-1].data
    assert "passes over the data" in str(table)
    assert not os.path.exists(model + ".lock")


def test_refit_flow_refuses_a_schema_change_and_writes_nothing(prefect_server, grown, tmp_path):
    from flows.refit import refit_flow

    other = write_gmm(tmp_path / "wide.zarr", 600, 3, 3, "full", seed=1, chunk_rows=CHUNK)  # 3 features, not 2
    before = _listing(tmp_path)
    state = refit_flow(grown["model"], other, overwrite=True, scheduler="threads", return_state=True)
    assert state.is_failed()
    with pytest.raises(emflow.FeatureMismatchError, match="3 features; the model was fitted on 2"):
        state.result()
    assert _listing(tmp_path) == before  # no model, no ledger written, no lock
    # a model at `out` is never replaced unasked (here: the model itself, the default `out`)
    state = refit_flow(grown["model"], grown["data"], scheduler="threads", return_state=True)
    assert state.is_failed()
    with pytest.raises(emflow.ConfigError, match="overwrite"):
        state.result()
    assert _listing(tmp_path) == before


def test_schema_checks_name_what_changed(grown, tmp_path):
    model = emflow.load(grown["model"])
    X = zarr.open_group(grown["data"], mode="r")["X"][:]
    f32 = write_gmm(tmp_path / "f32.zarr", 600, 3, 2, "full", seed=1, chunk_rows=CHUNK, dtype="float32")
    with pytest.raises(emflow.DataError, match="dtype is float32; the model was fitted on float64"):
        _refit.check_schema(model, f32)
    seqs = write_hmm(tmp_path / "seq.zarr", 10, 2, 2, "gaussian", "diag", min_length=5, max_length=20, seed=0)
    with pytest.raises(emflow.DataError, match="'sequences' dataset; the model was fitted on 'rows'"):
        _refit.check_schema(model, seqs)
    assert _refit.check_schema(model, grown["data"]).n_rows == len(X) == N1
    with pytest.raises(emflow.ConfigError, match="max_iter"):
        _refit.prepare(grown["model"], grown["data"], max_iter=0)


def test_refit_any_family_continues_from_the_saved_model(tmp_path):
    """Written once: an HMM (its own iteration budget, n_iter) goes through the same refit."""
    small = write_hmm(tmp_path / "small.zarr", 20, 2, 2, "gaussian", "diag", min_length=10, max_length=40, seed=4)
    big = write_hmm(tmp_path / "big.zarr", 40, 2, 2, "gaussian", "diag", min_length=10, max_length=40, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hmm = emflow.GaussianHMM(2, covariance_type="diag", n_iter=20, random_state=0,
                                 scheduler="threads").fit(small)
        path = hmm.save(tmp_path / "hmm.zarr")
        est, rep = _refit.refit(path, big, max_iter=5, scheduler="threads")
        ref = emflow.GaussianHMM(2, covariance_type="diag", n_iter=5, random_state=0, scheduler="threads")
        ref.fit(big, initial_params=hmm._get_parameters())
    assert est.n_iter == 5 and rep["n_iter"] == ref.n_iter_
    assert est.history_ == pytest.approx(ref.history_, rel=1e-12)
    assert rep["family"] == "gaussian_hmm" and (rep["size_before"], rep["size_after"]) == (20, 40)
    assert rep["log_likelihood_after"] >= rep["log_likelihood_before"] - 1e-12
    assert rep["ledger"] == path + ".ledger" and rep["partitions_reused"] == 0  # no ledger before


def test_refit_lda_reuses_its_ledger(tmp_path):
    """A corpus family: the second refit on the same documents reuses every partition."""
    docs = write_lda(tmp_path / "docs.zarr", 200, 40, 3, seed=8, chunk_docs=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lda = emflow.LatentDirichletAllocation(3, max_iter=3, random_state=0, scheduler="threads").fit(docs)
        path = lda.save(tmp_path / "lda.zarr")
        first, rep1 = _refit.refit(path, docs, max_iter=2, scheduler="threads")
        first.save(path, overwrite=True)
        second, rep2 = _refit.refit(path, docs, max_iter=2, scheduler="threads")
        ref = emflow.LatentDirichletAllocation(3, max_iter=2, random_state=0, scheduler="threads")
        ref.fit(docs, initial_params=lda._get_parameters())
    assert first.history_ == pytest.approx(ref.history_, rel=1e-12)  # no ledger yet: plain EM from the model
    assert rep1["partitions_new"] == rep1["partitions_total"] and rep1["partitions_reused"] == 0
    assert rep2["partitions_reused"] == rep2["partitions_total"] > 0 and rep2["partitions_new"] == 0
    assert rep2["n_passes"] < rep1["n_passes"]  # the first iteration read nothing
    assert rep2["objective"] == lda.objective_name
    assert rep2["log_likelihood_after"] >= rep2["log_likelihood_before"] - 1e-12
