"""The statistics ledger and incremental EM (emflow.estimators.incremental, emflow.storage.ledger).

References: plain EM (emflow's own driver, ledger=None) started from the same parameters on
the same data, and a from-scratch fit on the grown data."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from sklearn.base import clone

import emflow
from emflow.errors import ConfigError
from emflow.storage.ledger import Ledger, LedgerMismatch, read_ledger_summary
from emflow.storage.sequences import write_sequences
from emflow.storage.synthetic import make_hmm_params, sample_hmm

CHUNK = 500
PB = 2 * CHUNK * 3 * 8  # two chunks of 3 float64 features a partition


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0, 0], [4, 0, 0], [0, 4, 1]])
    return centres[rng.integers(0, 3, n)] + rng.normal(size=(n, 3))


def _zarr_rows(path, X):
    g = zarr.open_group(path, mode="w")
    g.create_array("X", data=X, chunks=(CHUNK, X.shape[1]))
    g.attrs["rows"] = "X"
    return str(path)


def _gmm(**kw):
    kw = {"n_components": 3, "random_state": 0, "tol": 1e-9, "max_iter": 200, "partition_bytes": PB, **kw}
    return emflow.GaussianMixture(**kw)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.errors.EmflowConvergenceWarning)
        yield


def _plain_from(est, params, data, *fit_args, **kw):
    """Plain EM (no ledger) from ``params`` on ``data``: the reference."""
    ref = clone(est).set_params(ledger=None, **kw)
    ref._set_parameters(params)
    ref.lower_bound_ = -np.inf  # no previous bound: the plain stop rule
    return ref.fit(data, *fit_args, warm_start=True)


def test_every_partition_refreshed_is_plain_em_exactly(tmp_path):
    """A ledgered fit refreshes every partition each pass and sums the per-partition
    statistics in the engine's tree: the same iterations as plain EM, bit for bit."""
    X = _rows(3000)
    with _quiet():
        plain = _gmm(max_iter=15).fit(X)
        led = _gmm(max_iter=15, ledger=tmp_path / "L").fit(X)
    assert led.history_ == plain.history_
    np.testing.assert_array_equal(led.means_, plain.means_)
    np.testing.assert_array_equal(led.covariances_, plain.covariances_)
    assert led.n_passes_ == plain.n_passes_
    info = led.fit_info_["ledger"]
    assert info["path"] == os.fspath(tmp_path / "L") and info["partitions_total"] == led.fit_info_["partitions"]
    assert info["partitions_new"] == info["partitions_total"] and info["partitions_reused"] == 0
    assert info["bytes_read"] == led.n_passes_ * X.nbytes and info["fingerprint"] == led.fit_info_["fingerprint"]
    # ledger=None: today's behaviour, no ledger entry, nothing written
    assert "ledger" not in plain.fit_info_ and plain.get_params()["ledger"] is None


def test_summary_records_model_and_partitions(tmp_path):
    X = _rows(3000)
    with _quiet():
        est = _gmm(max_iter=5, ledger=tmp_path / "L").fit(X)
    s = read_ledger_summary(tmp_path / "L")
    assert (s["family"], s["n_features"], s["dtype"], s["n_rows"]) == ("gaussian_mixture", 3, "float64", 3000)
    assert len(s["partition_fingerprints"]) == s["n_partitions"] == est.fit_info_["partitions"]
    assert s["fingerprint"] == est.fit_info_["fingerprint"] and s["created"] <= s["updated"]
    from emflow.storage.ledger import params_hash

    assert s["params_hash"] == params_hash(est._get_parameters())
    with pytest.raises(FileNotFoundError):
        read_ledger_summary(tmp_path / "nothing")


def test_warm_refit_after_append_gmm(tmp_path):
    """Rows appended to the Zarr array: only the new partition is read before the first
    M-step, whose iteration is plain EM's from the ledger's version on the grown data; the
    refit ends where a from-scratch fit on the grown data does."""
    X, more = _rows(6000), _rows(600, seed=1)
    path = _zarr_rows(tmp_path / "d.zarr", X)
    with _quiet():
        est = _gmm(ledger=tmp_path / "L", warm_start=True).fit(path)
    version = Ledger(tmp_path / "L").version_params(read_ledger_summary(tmp_path / "L"))
    zarr.open_group(path)["X"].append(more)
    est = emflow.load(est.save(tmp_path / "model.zarr"))  # a saved model keeps its ledger
    with _quiet():
        est.fit(path)
        scratch = _gmm().fit(path)
        plain = _plain_from(est, version, path, max_iter=1)
    info = est.fit_info_["ledger"]
    assert (info["partitions_total"], info["partitions_reused"], info["partitions_new"],
            info["partitions_changed"]) == (7, 6, 1, 0)
    assert est.history_[0] == plain.history_[0]  # the first iteration: exact plain EM from the version
    np.testing.assert_allclose(est.lower_bound_, scratch.lower_bound_, rtol=1e-6)
    # read: the scan, the new partition, then full passes
    nbytes = (6600 * 3 * 8)
    assert info["bytes_read"] == nbytes * (1 + len(est.history_) - 1) + 600 * 3 * 8
    assert read_ledger_summary(tmp_path / "L")["n_rows"] == 6600


def test_a_changed_chunk_is_recomputed_not_trusted(tmp_path):
    X = _rows(6000)
    path = _zarr_rows(tmp_path / "d.zarr", X)
    with _quiet():
        est = _gmm(ledger=tmp_path / "L", warm_start=True).fit(path)
    version = Ledger(tmp_path / "L").version_params(read_ledger_summary(tmp_path / "L"))
    arr = zarr.open_group(path)["X"]
    arr[1200:1300] = arr[1200:1300] + 3.0  # inside the second partition (rows 1000-2000)
    with _quiet():
        est.set_params(max_iter=1).fit(path)
        plain = _plain_from(est, version, path, max_iter=1)
    info = est.fit_info_["ledger"]
    assert (info["partitions_changed"], info["partitions_reused"], info["partitions_new"]) == (1, 5, 0)
    # had the stale statistics been used, the objective would be that of the old data
    assert est.history_[0] == plain.history_[0]
    np.testing.assert_array_equal(est.means_, plain.means_)


def test_warm_refit_after_append_gaussian_hmm(tmp_path):
    params = make_hmm_params(2, 2, "gaussian", "diag", seed=1)
    rng = np.random.default_rng(0)
    lengths = [80] * 30
    Xs, _ = sample_hmm(params, lengths + [80] * 4, rng)
    off = np.concatenate([[0], np.cumsum(lengths + [80] * 4)])
    path = write_sequences(tmp_path / "s.zarr", Xs[: off[30]], off[:31], chunk_steps=400)
    kw = dict(n_components=2, covariance_type="diag", random_state=0, tol=1e-9, n_iter=200, partition_bytes=400 * 16)
    with _quiet():
        est = emflow.GaussianHMM(**kw, ledger=tmp_path / "L").fit(path)
    version = Ledger(tmp_path / "L").version_params(read_ledger_summary(tmp_path / "L"))
    write_sequences(tmp_path / "s.zarr", Xs, off, chunk_steps=400, overwrite=True)  # four sequences appended
    with _quiet():
        est.fit(path, warm_start=True)  # hmmlearn's HMMs have no warm_start parameter: fit's keyword
        scratch = emflow.GaussianHMM(**kw).fit(path)
        plain = _plain_from(est, version, path, n_iter=1)
    info = est.fit_info_["ledger"]
    print(info, est.history_[:3], len(est.history_))
    assert info["partitions_new"] >= 1 and info["partitions_reused"] >= 1 and info["partitions_changed"] <= 1
    assert est.history_[0] == pytest.approx(plain.history_[0], rel=1e-13)
    np.testing.assert_allclose(est.score(path) / off[-1], scratch.score(path) / off[-1], rtol=1e-6)
    assert read_ledger_summary(tmp_path / "L")["n_sequences"] == 34


def test_lda_every_partition_refreshed_is_plain_em(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.6, size=(60, 20))
    dense[dense.sum(1) == 0, 0] = 1
    C = sp.csr_matrix(dense)
    kw = dict(n_components=3, random_state=0, max_iter=6, evaluate_every=1)
    with _quiet():
        plain = emflow.LatentDirichletAllocation(**kw).fit(C)
        led = emflow.LatentDirichletAllocation(**kw, ledger=tmp_path / "L").fit(C)
    np.testing.assert_array_equal(led.components_, plain.components_)
    assert led.history_ == plain.history_


def test_a_foreign_ledger_is_ignored_with_a_warning(tmp_path):
    X = _rows(3000)
    with _quiet():
        _gmm(max_iter=5, ledger=tmp_path / "L").fit(X)
        other = _gmm(max_iter=5, n_components=2, ledger=tmp_path / "L2", warm_start=True).fit(X)
    # another model (2 components) warm-started on a 3-component ledger
    other.set_params(ledger=tmp_path / "L")
    with _quiet(), pytest.warns(LedgerMismatch, match="another model or dataset"):
        other.fit(X)
    assert other.fit_info_["ledger"]["partitions_reused"] == 0
    assert read_ledger_summary(tmp_path / "L")["structure"][1][0] == ["<f8", [2]]  # rewritten for this model
    # another dataset's ledger (4 features)
    X4 = np.hstack([X, X[:, :1]])
    est = _gmm(max_iter=3, warm_start=True, ledger=tmp_path / "L4").fit(X4)
    est.set_params(ledger=tmp_path / "L", max_iter=3)
    before = est._get_parameters()
    with _quiet(), pytest.warns(LedgerMismatch, match="n_features"):
        est.fit(X4)
    plain = _plain_from(est, before, X4, max_iter=3)
    np.testing.assert_array_equal(est.means_, plain.means_)


def test_bad_ledger_locations(tmp_path):
    X = _rows(600)
    path = _zarr_rows(tmp_path / "d.zarr", X)
    with pytest.raises(ConfigError, match="ledger must be None or a directory"):
        _gmm(ledger=3).fit(X)
    with pytest.raises(ConfigError, match="outside the data store"):
        _gmm(ledger=os.path.join(path, "ledger")).fit(path)
    assert not os.path.exists(os.path.join(path, "ledger"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="something other than a statistics ledger"):
        _gmm(ledger=tmp_path / "busy").fit(X)
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_squarem_with_a_ledger_is_squarem(tmp_path):
    X = _rows(3000)
    with _quiet():
        plain = _gmm(max_iter=12, accelerate="squarem").fit(X)
        led = _gmm(max_iter=12, accelerate="squarem", ledger=tmp_path / "L").fit(X)
    assert led.history_ == plain.history_ and led.n_passes_ == plain.n_passes_
    np.testing.assert_array_equal(led.means_, plain.means_)
    assert read_ledger_summary(tmp_path / "L")["n_partitions"] == led.fit_info_["partitions"]


def test_unchanged_data_reuses_every_partition(tmp_path):
    """Nothing appended: no partition is read before the first iteration, whose objective is
    the previous fit's last (the ledger's version on the same data)."""
    X = _rows(3000)
    with _quiet():
        est = _gmm(max_iter=8, ledger=tmp_path / "L").fit(X)
        last = est.history_[-1]
        est.set_params(max_iter=1).fit(X, warm_start=True)
    info = est.fit_info_["ledger"]
    assert info["partitions_reused"] == info["partitions_total"] and est.history_ == [last]
    assert info["bytes_read"] == X.nbytes  # the opening scan only


def test_a_change_inside_a_cut_sequence_recomputes_its_chain(tmp_path):
    """One long sequence cut across partitions: a partition's statistics need its neighbours'
    messages, so a changed partition is recomputed with every partition of the chain."""
    params = make_hmm_params(2, 2, "gaussian", "diag", seed=1)
    X, _ = sample_hmm(params, [3000], np.random.default_rng(0))
    kw = dict(n_components=2, covariance_type="diag", random_state=0, tol=1e-9, n_iter=5, partition_bytes=8000)
    with _quiet():
        est = emflow.GaussianHMM(**kw, ledger=tmp_path / "L").fit(X, [3000])
    assert est.fit_info_["partitions"] > 2
    version = Ledger(tmp_path / "L").version_params(read_ledger_summary(tmp_path / "L"))
    X2 = X.copy()
    X2[1500] += 1.0
    with _quiet():
        est.set_params(n_iter=1).fit(X2, [3000], warm_start=True)
        plain = _plain_from(est, version, X2, [3000], n_iter=1)
    info = est.fit_info_["ledger"]
    assert info["partitions_changed"] == 1 and info["partitions_reused"] == info["partitions_total"] - 1
    assert est.history_[0] == pytest.approx(plain.history_[0], rel=1e-13)


def test_lda_warm_refit_after_documents_appended(tmp_path):
    from emflow.storage.corpus import write_corpus

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.6, size=(240, 20))
    dense[dense.sum(1) == 0, 0] = 1
    path = write_corpus(tmp_path / "c.zarr", sp.csr_matrix(dense[:200]), chunk_docs=20)
    kw = dict(n_components=3, random_state=0, max_iter=5, evaluate_every=1, partition_bytes=2048)
    with _quiet():
        est = emflow.LatentDirichletAllocation(**kw, ledger=tmp_path / "L").fit(path)
    version = Ledger(tmp_path / "L").version_params(read_ledger_summary(tmp_path / "L"))
    write_corpus(tmp_path / "c.zarr", sp.csr_matrix(dense), chunk_docs=20, overwrite=True)  # 40 documents more
    with _quiet():
        est.set_params(max_iter=1).fit(path, warm_start=True)
        plain = _plain_from(est, version, path, max_iter=1)
    info = est.fit_info_["ledger"]
    assert info["partitions_new"] >= 1 and info["partitions_reused"] >= 1 and info["partitions_changed"] == 0
    # LDA's per-document E-step starts are drawn per (seed, iteration, document): the ledger's
    # iteration is not the plain fit's first, so the two agree to the inner loop's tolerance
    assert est.history_[0] == pytest.approx(plain.history_[0], rel=1e-5)


# -- refresh: incremental EM (Neal & Hinton 1998) between full passes ------------------------
def _ref_gmm_refresh(X, bounds, start, refresh, reg, tol, max_iter):
    """Brute-force NumPy incremental EM for a full-covariance GMM (raw moments about zero):
    a full pass (its mean log-likelihood in the history), then one M-step per block of
    ceil(refresh x P) partitions (in order), each on the sum of every partition's newest
    statistics; the parameters after every M-step, and the history."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    def e(Xp, p):
        w, mu, cov = p
        lp = np.log(w) + np.column_stack([multivariate_normal(mu[k], cov[k]).logpdf(Xp) for k in range(len(w))])
        ll = logsumexp(lp, axis=1)
        r = np.exp(lp - ll[:, None])
        return r.sum(0), r.T @ Xp, np.einsum("ik,id,ie->kde", r, Xp, Xp), ll.sum()

    def m(parts):
        n, s1, s2 = (sum(p[j] for p in parts) for j in range(3))
        nk = n + 10 * np.finfo(float).eps
        mu = s1 / nk[:, None]
        o = mu[:, :, None] * s1[:, None, :]
        cov = (s2 - o - o.transpose(0, 2, 1) + n[:, None, None] * mu[:, :, None] * mu[:, None, :]) / nk[:, None, None]
        cov = 0.5 * (cov + cov.transpose(0, 2, 1)) + reg * np.eye(X.shape[1])
        return nk / nk.sum(), mu, cov

    P = len(bounds)
    size = int(np.ceil(refresh * P))
    blocks = [list(range(k, min(P, k + size))) for k in range(0, P, size)]
    p, steps, history = start, [], []
    parts = [None] * P
    while True:
        parts = [e(X[a:b], p) for a, b in bounds]
        history.append(sum(q[3] for q in parts) / len(X))
        p = m(parts)
        steps.append(p)
        if len(history) >= max_iter or (len(history) >= 2 and abs(history[-1] - history[-2]) < tol):
            return steps, history
        for blk in blocks:
            for i in blk:
                parts[i] = e(X[bounds[i][0]:bounds[i][1]], p)
            p = m(parts)
            steps.append(p)


def _recording(monkeypatch):
    from emflow.estimators.mixture import GMMFamily

    seen, m_step = [], GMMFamily.m_step

    def rec(self, stats, params):
        out = m_step(self, stats, params)
        seen.append(out[0])
        return out

    monkeypatch.setattr(GMMFamily, "m_step", rec)
    return seen


def test_refresh_is_incremental_em_step_for_step(tmp_path, monkeypatch):
    """refresh=0.25 on 10 partitions: blocks of 3 partitions; every M-step's parameters equal
    a brute-force NumPy incremental EM's from the same start on the same partitions, and
    history_ holds the full passes' true mean log-likelihoods."""
    X = _rows(2500)
    est = _gmm(max_iter=4, reg_covar=1e-6, ledger=tmp_path / "L", refresh=0.25, partition_bytes=6000)
    start = est.init_params_for(X)
    seen = _recording(monkeypatch)
    with _quiet():
        est.fit(X, initial_params=start)
    bounds = [p["bounds"] for p in read_ledger_summary(tmp_path / "L")["partitions"]]
    assert len(bounds) == 10
    steps, history = _ref_gmm_refresh(X, bounds, (start.weights, start.means, start.covariances), 0.25,
                                      1e-6, 1e-9, 4)
    assert len(seen) == len(steps) == 4 + 3 * 4  # 4 full passes, 4 blocks after each but the last
    for got, (w, mu, cov) in zip(seen, steps):
        np.testing.assert_allclose(got.weights, w, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.means, mu, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got.covariances, cov, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(est.history_, history, rtol=1e-12)
    assert est.n_iter_ == 4 and est.fit_info_["acceleration"]["incremental_iterations"] == 12
    # the opening scan, 4 full passes, 3 sweeps of the blocks (3 + 3 + 3 + 1 partitions each)
    assert est.n_passes_ == 1 + 4 + 3 and est.fit_info_["bytes_read"] == 8 * X.nbytes


def test_refresh_ends_at_batch_em_optimum(tmp_path):
    X = _rows(2500, seed=3)
    kw = dict(tol=1e-12, max_iter=2000)
    start = _gmm(**kw).init_params_for(X)
    with _quiet():
        plain = _gmm(**kw).fit(X, initial_params=start)
        inc = _gmm(**kw, ledger=tmp_path / "L", refresh=0.3).fit(X, initial_params=start)
    assert inc.converged_ and plain.converged_
    assert inc.lower_bound_ == pytest.approx(plain.lower_bound_, abs=1e-9)
    np.testing.assert_allclose(inc.means_, plain.means_, atol=1e-6)
    np.testing.assert_allclose(inc.covariances_, plain.covariances_, atol=1e-6)
    np.testing.assert_allclose(inc.weights_, plain.weights_, atol=1e-6)
    assert inc.n_iter_ < plain.n_iter_


def test_bad_refresh(tmp_path):
    X = _rows(600)
    for bad in (0, -0.5, 1.5, "half", float("nan")):
        with pytest.raises(ConfigError, match="refresh"):
            _gmm(ledger=tmp_path / "L", refresh=bad).fit(X)
    with pytest.raises(ConfigError, match="refresh.*ledger=DIRECTORY"):
        _gmm(refresh=0.5).fit(X)
    with pytest.raises(ConfigError, match="squarem"):
        _gmm(ledger=tmp_path / "L", refresh=0.5, accelerate="squarem").fit(X)
    with pytest.raises(ConfigError, match="refresh.*gaussian_mixture"):
        emflow.GaussianHMM(n_components=2, ledger=tmp_path / "L", refresh=0.5).fit(X)
    assert not (tmp_path / "L").exists()


def test_warm_refit_with_refresh_refreshes_the_new_partitions_first(tmp_path, monkeypatch):
    """Rows appended, refresh=0.3 (blocks of 3 of 7 partitions): the first iteration is the
    ledger's (the new partition read at the version), the first block refreshed holds the
    new partition, and the refit ends where a plain warm refit does."""
    import emflow.estimators.incremental as inc

    X, more = _rows(6000), _rows(600, seed=1)
    path = _zarr_rows(tmp_path / "d.zarr", X)
    with _quiet():
        est = _gmm(ledger=tmp_path / "L", warm_start=True).fit(path)
    zarr.open_group(path)["X"].append(more)
    led = clone(est).set_params(ledger=tmp_path / "L2")
    plain = clone(est).set_params(ledger=None)
    for e in (led, plain):
        e._set_parameters(est._get_parameters())
        e.lower_bound_ = est.lower_bound_
    import shutil

    shutil.copytree(tmp_path / "L", tmp_path / "L2")
    est.set_params(refresh=0.3)
    calls, partition_stats = [], inc.partition_stats
    monkeypatch.setattr(inc, "partition_stats", lambda *a, **k: calls.append(a[-1] if len(a) > 5 else None)
                        or partition_stats(*a, **k))
    with _quiet():
        est.fit(path)
        led.fit(path)
        plain.fit(path)
    assert calls[0] == [6] and calls[1] == [0, 1, 6]  # the new partition, then its block first
    assert est.history_[0] == led.history_[0]
    assert est.fit_info_["ledger"]["partitions_new"] == 1
    assert est.lower_bound_ == pytest.approx(plain.lower_bound_, abs=1e-7)
    np.testing.assert_allclose(est.means_, plain.means_, atol=1e-4)
