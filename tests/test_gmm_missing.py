"""GaussianMixture(missing="marginalize") against a brute-force NumPy reference (a loop over
rows: marginal densities of the observed values, conditional moments of the missing ones)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.special import logsumexp

import emflow
from emflow import errors as E
from emflow.models import gmm as G
from emflow.models import gmm_missing as M

COV_TYPES = ["full", "tied", "diag", "spherical"]
K = 3


# -- the reference -------------------------------------------------------------------------
def _full_covs(cov, ct, K, d):
    if ct == "full":
        return np.asarray(cov)
    if ct == "tied":
        return np.broadcast_to(cov, (K, d, d))
    if ct == "diag":
        return np.array([np.diag(c) for c in cov])
    return np.array([np.eye(d) * c for c in cov])


def ref_e_step(X, w, weights, means, covs):
    """Per row: marginal log-density of the observed values, responsibilities, conditional
    means and covariances of the missing values; summed expected statistics."""
    n, d = X.shape
    Kc = len(weights)
    w = np.ones(n) if w is None else w
    ll, N, S1, S2 = 0.0, np.zeros(Kc), np.zeros((Kc, d)), np.zeros((Kc, d, d))
    lls, resps, xfill = np.zeros(n), np.zeros((n, Kc)), X.copy()
    for i in range(n):
        o = ~np.isnan(X[i])
        m = ~o
        logp, xh, C = np.zeros(Kc), np.zeros((Kc, d)), np.zeros((Kc, d, d))
        for k in range(Kc):
            S, mu = covs[k], means[k]
            Soo = S[np.ix_(o, o)]
            r = X[i, o] - mu[o]
            sol = np.linalg.solve(Soo, r)
            logp[k] = np.log(weights[k]) - 0.5 * (o.sum() * np.log(2 * np.pi) + np.linalg.slogdet(Soo)[1] + r @ sol)
            xh[k, o] = X[i, o]
            xh[k, m] = mu[m] + S[np.ix_(m, o)] @ sol
            C[k][np.ix_(m, m)] = S[np.ix_(m, m)] - S[np.ix_(m, o)] @ np.linalg.solve(Soo, S[np.ix_(o, m)])
        lse = logsumexp(logp)
        r = np.exp(logp - lse)
        lls[i], resps[i] = lse, r
        xfill[i, m] = (r @ xh)[m]
        ll += w[i] * lse
        N += w[i] * r
        S1 += w[i] * r[:, None] * xh
        S2 += w[i] * r[:, None, None] * (xh[:, :, None] * xh[:, None, :] + C)
    return ll, N, S1, S2, lls, resps, xfill


def ref_m_step(N, S1, S2, ct, reg):
    d = S1.shape[1]
    mu = S1 / N[:, None]
    cov = S2 / N[:, None, None] - mu[:, :, None] * mu[:, None, :]
    if ct == "full":
        c = cov + reg * np.eye(d)
    elif ct == "tied":
        c = np.einsum("k,kij->ij", N, cov) / N.sum() + reg * np.eye(d)
    elif ct == "diag":
        c = np.array([np.diag(s) for s in cov]) + reg
    else:
        c = np.array([np.diag(s).mean() for s in cov]) + reg
    return N / N.sum(), mu, c


def ref_em(X, w, weights, means, cov, ct, n_iter, reg):
    """Mean log-likelihood entering each iteration and the parameters after it."""
    n, d = X.shape
    wsum = float(n if w is None else np.sum(w))
    hist, params = [], []
    for _ in range(n_iter):
        ll, N, S1, S2, *_ = ref_e_step(X, w, weights, means, _full_covs(cov, ct, len(weights), d))
        hist.append(ll / wsum)
        weights, means, cov = ref_m_step(N, S1, S2, ct, reg)
        params.append((weights, means, cov))
    return np.array(hist), params


# -- data ------------------------------------------------------------------------------------
def _data(n=90, d=4, frac=0.3, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    X = np.vstack([rng.normal(0, 1, (n // 3, d)), rng.multivariate_normal(np.full(d, 2.5), A @ A.T / d + 0.3 * np.eye(d), n // 3),
                   rng.normal(-2, 0.6, (n - 2 * (n // 3), d))]) + offset
    rng.shuffle(X)
    Xm = X.copy()
    Xm[rng.random(X.shape) < frac] = np.nan
    for i in np.flatnonzero(np.isnan(Xm).all(axis=1)):
        Xm[i, 0] = X[i, 0]
    return X, Xm


def _init(X, ct, seed=1):
    rng = np.random.default_rng(seed)
    d = X.shape[1]
    rows = X[rng.choice(len(X), K, replace=False)]
    means = np.where(np.isnan(rows), np.nanmean(X, axis=0), rows)
    prec = {"full": np.stack([np.eye(d) * (0.5 + 0.1 * k) for k in range(K)]), "tied": np.eye(d) * 0.6,
            "diag": np.full((K, d), 0.5) + 0.05 * np.arange(K)[:, None], "spherical": np.array([0.4, 0.5, 0.6])}[ct]
    init = dict(weights_init=np.array([0.3, 0.3, 0.4]), means_init=means, precisions_init=prec)
    pc = G.precisions_cholesky_from_precisions(prec, ct)
    return init, G.covariances_from_precisions_cholesky(pc, ct)


def _fit(Xm, ct, n_iter, init, sample_weight=None, **kw):
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.EmflowConvergenceWarning)
        gm = emflow.GaussianMixture(K, covariance_type=ct, max_iter=n_iter, tol=0.0, missing="marginalize",
                                    scheduler="threads", **init, **kw)
        gm.fit(Xm, sample_weight=sample_weight, callbacks=[seen.append])
    return gm, seen


def _close(a, b, rtol=1e-8):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)))


# -- agreement with the reference -----------------------------------------------------------
@pytest.mark.parametrize("ct", COV_TYPES)
def test_every_iteration_matches_the_reference(ct):
    X, Xm = _data(offset=50.0)  # far from zero: the shifted moments matter
    init, cov0 = _init(Xm, ct)
    n_iter, reg = 6, 1e-6
    gm, seen = _fit(Xm, ct, n_iter, init, reg_covar=reg)
    hist, params = ref_em(Xm, None, init["weights_init"], init["means_init"], cov0, ct, n_iter, reg)
    _close(gm.history_, hist)
    assert len(seen) == n_iter
    for ev, (w, mu, c) in zip(seen, params):
        _close(ev.params.weights, w)
        _close(ev.params.means, mu)
        _close(ev.params.covariances, c)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_sample_weights_match_the_reference(ct):
    _, Xm = _data(n=60, seed=4)
    w = np.random.default_rng(5).uniform(0.2, 3.0, len(Xm))
    init, cov0 = _init(Xm, ct)
    gm, seen = _fit(Xm, ct, 3, init, sample_weight=w)
    hist, params = ref_em(Xm, w, init["weights_init"], init["means_init"], cov0, ct, 3, 1e-6)
    _close(gm.history_, hist)
    _close(seen[-1].params.means, params[-1][1])
    _close(seen[-1].params.covariances, params[-1][2])


@pytest.mark.parametrize("ct", COV_TYPES)
def test_predictions_and_imputation_match_the_reference(ct, tmp_path):
    X, Xm = _data(n=60, seed=2)
    init, _ = _init(Xm, ct)
    gm, _ = _fit(Xm, ct, 4, init)
    d = Xm.shape[1]
    *_, lls, resps, xfill = ref_e_step(Xm, None, gm.weights_, gm.means_, _full_covs(gm.covariances_, ct, K, d))
    _close(gm.score_samples(Xm), lls)
    _close(gm.predict_proba(Xm), resps)
    np.testing.assert_array_equal(gm.predict(Xm), resps.argmax(axis=1))
    imputed = gm.impute(Xm)
    _close(imputed, xfill)
    obs = ~np.isnan(Xm)
    np.testing.assert_array_equal(imputed[obs], Xm[obs])
    _close(gm.score(Xm), lls.mean())
    written = gm.impute(Xm, out=str(tmp_path / "imputed.zarr"))
    np.testing.assert_allclose(np.asarray(written[...]), imputed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ct", ["full", "tied"])
def test_pattern_blocks_do_not_change_the_statistics(ct, monkeypatch):
    """Many small blocks of patterns and rows (every loop path) give the same statistics."""
    _, Xm = _data(n=120, d=5, frac=0.35, seed=7)
    init, cov0 = _init(Xm, ct)
    p = G.GMMParams(init["weights_init"], init["means_init"], cov0,
                    G.precisions_cholesky_from_covariances(cov0, ct), ct)
    w = np.linspace(0.5, 2.0, len(Xm))
    a = M.e_step(Xm, w, p)
    monkeypatch.setattr(M, "_BLOCK_FLOATS", 64)
    b = M.e_step(Xm, w, p)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


# -- complete data, other paths -------------------------------------------------------------
@pytest.mark.parametrize("ct", COV_TYPES)
def test_without_nan_the_fit_is_the_complete_data_fit(ct):
    X, _ = _data(n=150, seed=3)
    kw = dict(covariance_type=ct, random_state=0, max_iter=20, scheduler="threads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.EmflowConvergenceWarning)
        a = emflow.GaussianMixture(K, **kw).fit(X)
        b = emflow.GaussianMixture(K, missing="marginalize", **kw).fit(X)
    assert a.history_ == b.history_
    for attr in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    np.testing.assert_array_equal(b.impute(X), X)


@pytest.mark.parametrize("ct", ["full", "spherical"])
def test_dask_zarr_and_partitioned_paths_equal_in_memory(ct, tmp_path):
    import dask.array as da
    import zarr

    _, Xm = _data(n=300, seed=6)
    init, _ = _init(Xm, ct)
    ref, _ = _fit(Xm, ct, 5, init)
    z = zarr.open(str(tmp_path / "x.zarr"), mode="w", shape=Xm.shape, chunks=(50, 4), dtype="f8")
    z[...] = Xm
    for data, kw in [(da.from_array(Xm, chunks=(70, 4)), {}), (str(tmp_path / "x.zarr"), {"partition_bytes": 3200}),
                     (Xm, {"partition_bytes": 2048})]:
        gm, _ = _fit(data, ct, 5, init, **kw)
        assert gm.fit_info_["partitions"] > 1
        np.testing.assert_allclose(gm.history_, ref.history_, rtol=1e-11)
        np.testing.assert_allclose(gm.means_, ref.means_, rtol=1e-10)
        np.testing.assert_allclose(gm.covariances_, ref.covariances_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gm.predict_proba(data), ref.predict_proba(Xm), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random_from_data", "random"])
def test_every_init_runs_on_data_with_nan(init_params):
    X, Xm = _data(n=150, seed=8, frac=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.EmflowConvergenceWarning)
        gm = emflow.GaussianMixture(K, init_params=init_params, missing="marginalize", random_state=0,
                                    reg_covar=1e-3, max_iter=30, scheduler="threads").fit(Xm)
    assert np.all(np.isfinite(gm.means_)) and np.all(np.diff(gm.history_) > -1e-9)


# -- bad input ---------------------------------------------------------------------------------
def test_a_row_with_every_value_missing_is_named():
    _, Xm = _data(n=60)
    Xm[17] = np.nan
    Xm[40] = np.nan
    with pytest.raises(E.DataError, match=r"2 row\(s\) with every value missing.*at row 17"):
        emflow.GaussianMixture(K, missing="marginalize", scheduler="threads").fit(Xm)
    init, _ = _init(Xm, "full")
    ok = Xm.copy()
    ok[[17, 40], 0] = 0.0
    gm, _ = _fit(ok, "full", 2, init)
    with pytest.raises(E.DataError, match="row 17"):
        gm.predict(Xm)
    with pytest.raises(E.DataError, match="Row 3 has every value missing"):
        M.e_step(Xm[14:20], None, gm._params, row0=0)


def test_nan_is_still_refused_without_the_option_and_infinity_always():
    _, Xm = _data(n=60)
    with pytest.raises(E.NonFiniteDataError, match="NaN or infinite"):
        emflow.GaussianMixture(K, scheduler="threads").fit(Xm)
    Xm[5, 1] = np.inf
    with pytest.raises(E.NonFiniteDataError, match="infinite value"):
        emflow.GaussianMixture(K, missing="marginalize", scheduler="threads").fit(Xm)


def test_unknown_missing_is_a_config_error_before_anything_runs(tmp_path):
    with pytest.raises(E.ConfigError, match="missing.*'error'.*'marginalize'"):
        emflow.GaussianMixture(K, missing="drop").fit(str(tmp_path / "does-not-exist.zarr"))
    assert not (tmp_path / "does-not-exist.zarr").exists()


def test_on_a_dask_cluster_equals_in_memory(dask_client, tmp_path):
    import zarr

    _, Xm = _data(n=300, seed=6)
    z = zarr.open(str(tmp_path / "x.zarr"), mode="w", shape=Xm.shape, chunks=(50, 4), dtype="f8")
    z[...] = Xm
    kw = dict(covariance_type="full", random_state=0, max_iter=5, tol=0.0, missing="marginalize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.EmflowConvergenceWarning)
        ref = emflow.GaussianMixture(K, scheduler="threads", **kw).fit(Xm)
        gm = emflow.GaussianMixture(K, scheduler=dask_client, **kw).fit(str(tmp_path / "x.zarr"))
    np.testing.assert_allclose(gm.history_, ref.history_, rtol=1e-11)
    np.testing.assert_allclose(gm.impute(str(tmp_path / "x.zarr")), ref.impute(Xm), rtol=1e-10, atol=1e-12)


def test_save_and_load_keep_the_option(tmp_path):
    _, Xm = _data(n=90, seed=9)
    init, _ = _init(Xm, "diag")
    gm, _ = _fit(Xm, "diag", 3, init)
    back = emflow.load(gm.save(tmp_path / "m.zarr"))
    assert back.missing == "marginalize"
    np.testing.assert_array_equal(back.predict_proba(Xm), gm.predict_proba(Xm))
    np.testing.assert_array_equal(back.impute(Xm), gm.impute(Xm))


@pytest.mark.parametrize("ct", ["full", "tied"])
def test_the_numpy_path_matches_the_reference_too(ct, monkeypatch):
    """The NumPy path (M.KERNEL = "numpy"), which the compiled kernel replaces by default."""
    monkeypatch.setattr(M, "KERNEL", "numpy")
    assert M._kernel() is None
    test_every_iteration_matches_the_reference(ct)
