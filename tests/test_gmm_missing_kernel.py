"""The compiled missing-value kernel (emflow.models.gmm_missing_kernel) against the NumPy path
of emflow.models.gmm_missing: the same statistics, log-likelihoods, responsibilities,
imputations and HMM quantities to 1e-12, for full and tied covariances."""

from __future__ import annotations

import numpy as np
import pytest

from emflow.models import gmm as G
from emflow.models import gmm_missing as M
from _kernels import both_kernels

pytest.importorskip("numba")
from emflow.models import gmm_missing_kernel as MK  # noqa: E402

RTOL = 1e-12


def _problem(ct, n=400, d=6, K=4, frac=0.3, seed=0, offset=20.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + offset
    X[rng.random(X.shape) < frac] = np.nan
    X[np.isnan(X).all(axis=1), 0] = offset
    X[: n // 10] = np.where(np.isnan(X[: n // 10]), 1.0, X[: n // 10])  # some complete rows
    X[n // 10 : n // 5, : d // 2] = np.nan  # a long run of one pattern
    X[n // 10 : n // 5, d // 2 :] = np.nan_to_num(X[n // 10 : n // 5, d // 2 :], nan=offset)
    means = offset + rng.normal(size=(K, d))
    if ct == "full":
        A = rng.normal(size=(K, d, d))
        cov = A @ A.transpose(0, 2, 1) / d + 0.5 * np.eye(d)
    else:
        A = rng.normal(size=(d, d))
        cov = A @ A.T / d + 0.5 * np.eye(d)
    w = rng.dirichlet(np.full(K, 3.0))
    p = G.GMMParams(w, means, cov, G.precisions_cholesky_from_covariances(cov, ct), ct)
    return X, p


def _both(monkeypatch, f):
    return both_kernels(monkeypatch, M, f, order=("numpy", "numba"))


def _same(a, b, rtol=RTOL):
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * max(1.0, np.max(np.abs(x))))


@pytest.mark.parametrize("ct", ["full", "tied"])
@pytest.mark.parametrize("weighted", [False, True])
def test_statistics_equal_the_numpy_path(ct, weighted, monkeypatch):
    X, p = _problem(ct)
    w = np.linspace(0.2, 3.0, len(X)) if weighted else None
    a, b = _both(monkeypatch, lambda: M.e_step(X, w, p))
    _same(a, b)


@pytest.mark.parametrize("ct", ["full", "tied"])
def test_posterior_and_imputation_equal_the_numpy_path(ct, monkeypatch):
    X, p = _problem(ct, seed=1)
    a, b = _both(monkeypatch, lambda: (*M.posterior(X, p), M.impute(X, p)))
    _same(a, b)
    obs = ~np.isnan(X)
    np.testing.assert_array_equal(b[2][obs], X[obs])


@pytest.mark.parametrize("ct", ["full", "tied"])
def test_hmm_quantities_equal_the_numpy_path(ct, monkeypatch):
    """State posteriors as weights (``gamma``) and the per-row log densities (``logp``)."""
    X, p = _problem(ct, seed=2)
    miss = np.isnan(X)
    inc = miss.any(axis=1)
    Xi, mi = X[inc], miss[inc]
    gamma = np.random.default_rng(3).dirichlet(np.ones(len(p.weights)), size=len(Xi))

    def run():
        lp = np.empty((len(Xi), len(p.weights)))
        M._incomplete(Xi, mi, None, p, logp=lp)
        _, _, s, xh = M._incomplete(Xi, mi, None, p, stats=True, fill=True, gamma=gamma)
        return (lp, *s, xh)

    a, b = _both(monkeypatch, run)
    _same(a, b)


def test_small_blocks_and_many_features(monkeypatch):
    """Pattern runs across block boundaries, and d > 62 (patterns grouped without integer keys)."""
    X, p = _problem("full", n=300, d=5, seed=4)
    a = M.e_step(X, None, p)
    monkeypatch.setattr(MK, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(M, "KERNEL", "numba")
    _same(a, M.e_step(X, None, p))
    X, p = _problem("tied", n=150, d=64, K=2, frac=0.1, seed=5)
    a, b = _both(monkeypatch, lambda: M.e_step(X, None, p))
    _same(a, b)


def test_not_positive_definite_is_the_numpy_error(monkeypatch):
    X, p = _problem("full", n=50, seed=6)
    pc = np.array(p.precisions_cholesky)
    pc[1] = np.triu(np.ones_like(pc[1]))
    pc[1][1:, 1:] = 0.0
    pc[1][np.arange(1, pc.shape[1]), np.arange(1, pc.shape[1])] = 1e-300  # precision of rank one, in effect
    p = p._replace(precisions_cholesky=pc)
    for kernel in ("numpy", "numba"):
        monkeypatch.setattr(M, "KERNEL", kernel)
        with pytest.raises(np.linalg.LinAlgError):
            M.e_step(X, None, p)


def test_the_setting_chooses_the_path(monkeypatch):
    monkeypatch.setattr(M, "KERNEL", "numpy")
    assert M._kernel() is None
    monkeypatch.setattr(M, "KERNEL", "auto")
    assert M._kernel() is MK


@pytest.mark.parametrize("run", [None, 3])
def test_long_runs_split_into_chunks(run, monkeypatch):
    """A run of one pattern longer than the kernel's run buffer (split, its statistics carried
    across the pieces), short runs, and (``run=3``) every run cut into pieces of three rows."""
    X, p = _problem("full", n=1200, d=6, K=3, seed=7)
    X[200:900] = np.where(np.arange(6) < 2, np.nan, np.nan_to_num(X[200:900], nan=20.0))
    w = np.linspace(0.5, 2.0, len(X))
    if run is not None:
        monkeypatch.setattr(MK, "_RUN", run)
    a, b = _both(monkeypatch, lambda: (*M.e_step(X, w, p), *M.posterior(X, p), M.impute(X, p)))
    _same(a, b)
