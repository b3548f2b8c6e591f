"""Model selection with shared passes: same models as separate fits, fewer passes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import emflow
from emflow.execution.cluster import engine_for
from emflow.estimators.em import EMRun, run_em, run_em_group
from emflow.estimators.mixture import GMMFamily
from emflow.estimators.selection import select_gaussian_mixture
from emflow.storage.synthetic import write_gmm


@pytest.fixture(scope="module")
def sep_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    return write_gmm(d / "d.zarr", 2400, 3, 2, "full", seed=11, chunk_rows=400, separation=6.0)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-300))


def test_lockstep_group_equals_each_run_alone(rng):
    """run_em_group: one pass serves every run; each run's trajectory is the one it has alone."""
    X = rng.normal(size=(600, 3))
    X[:300] += 4.0
    fams = (GMMFamily("full", 1e-6), GMMFamily("diag", 1e-6), GMMFamily("spherical", 1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.EmflowConvergenceWarning)
        gms = [emflow.GaussianMixture(k, covariance_type=f.covariance_type, max_iter=1, random_state=0,
                                      scheduler="threads").fit(X) for k, f in zip((2, 3, 4), fams)]
    starts = [g._params for g in gms]
    tols, max_iters = (1e-3, 1e-8, 1e-4), (50, 7, 50)
    passes = []
    with engine_for("threads") as engine:
        loaded = engine.open(X, partition_bytes=2400)
        alone = [run_em(engine, loaded, f, p, tol=t, max_iter=m, init=i)
                 for i, (f, p, t, m) in enumerate(zip(fams, starts, tols, max_iters))]
        calls = {"n": 0}
        real = engine.map_reduce

        def counted(*a, **k):
            calls["n"] += 1
            return real(*a, **k)

        engine.map_reduce = counted
        runs = [EMRun(f, p, tol=t, max_iter=m, init=i) for i, (f, p, t, m) in enumerate(zip(fams, starts, tols, max_iters))]
        together = run_em_group(engine, loaded, runs, on_pass=lambda n, ev: passes.append([i for i, _ in ev]))
        loaded.release()
    assert calls["n"] == len(passes) == max(r.n_iter for r in alone)  # one map_reduce per shared pass
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.history == b.history and a.n_iter == b.n_iter and a.converged == b.converged
        for x, y in zip(a.params, b.params):
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
        # a run takes part in the passes until it stops, then leaves the group
        assert [n for n, ids in enumerate(passes) if i in ids] == list(range(a.n_iter))
    assert together[1].n_iter == 7 and not together[1].converged


def test_selection_equals_separate_fits_and_reads_less(sep_data):
    Ks, cts = [1, 2, 3, 4], ["full", "diag"]
    res = select_gaussian_mixture(sep_data, Ks, cts, n_init=2, random_state=0, scheduler="threads",
                                  persist=False)
    assert [(r["n_components"], r["covariance_type"]) for r in res.table] == [(k, c) for k in Ks for c in cts]
    best = res.table[res.best]
    assert (best["n_components"], best["covariance_type"]) == (3, "full")  # the truth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row, model in zip(res.table, res.models):
            ref = emflow.GaussianMixture(row["n_components"], covariance_type=row["covariance_type"], n_init=2,
                                         random_state=0, scheduler="threads", persist=False).fit(sep_data)
            for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
                assert _rel(getattr(model, name), getattr(ref, name)) <= 1e-10, (row, name)
            assert model.n_iter_ == ref.n_iter_ and _rel(model.history_, ref.history_) <= 1e-10
            assert model.converged_ == ref.converged_ and model.lower_bounds_ == model.history_
            assert set(model.fit_info_) - {"selection"} == set(ref.fit_info_)  # one fit_info_ schema
            assert abs(row["bic"] - ref.bic(sep_data)) <= 1e-10 * abs(row["bic"])
            assert abs(row["aic"] - ref.aic(sep_data)) <= 1e-10 * abs(row["aic"])
    io = res.io
    assert io["units"] == 16
    # sequential: per candidate a scan, per restart sample + k-means + hard pass + EM, then bic
    assert io["passes_sequential"] > 3 * io["passes_shared"]
    assert io["bytes_shared"] == io["passes_shared"] * 2400 * 2 * 8
    assert io["saved_fraction"] == pytest.approx(1 - io["passes_shared"] / io["passes_sequential"])


def test_selection_counts_the_passes_it_makes(sep_data, monkeypatch):
    """passes_shared is the number of map / map_reduce calls actually made (plus the opening scan)."""
    from emflow.execution.engine import Engine

    calls = {"n": 0}
    for name in ("map", "map_reduce"):
        real = getattr(Engine, name)

        def counted(self, *a, _real=real, **k):
            calls["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(Engine, name, counted)
    res = select_gaussian_mixture(sep_data, [2, 3], ["spherical"], scheduler="threads", persist=False)
    assert res.io["passes_shared"] == calls["n"] + 1


def test_selection_on_dask_matches_threads(sep_data, dask_client):
    a = select_gaussian_mixture(sep_data, [2, 3], ["tied"], scheduler=dask_client, persist=False)
    b = select_gaussian_mixture(sep_data, [2, 3], ["tied"], scheduler="threads", persist=False)
    for ma, mb in zip(a.models, b.models):
        assert _rel(ma.means_, mb.means_) <= 1e-10 and ma.n_iter_ == mb.n_iter_
