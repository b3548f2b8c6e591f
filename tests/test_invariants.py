"""EM invariants, property-tested over random models and data drawn by hypothesis.

For Gaussian mixtures of every covariance type: the log-likelihood never decreases across
iterations; the weights sum to one; covariances stay symmetric positive definite; the
result does not depend on how the rows are partitioned (1e-10); save then load returns
identical parameters. One monotonicity + round-trip property each for the Gaussian HMM and
the linear-Gaussian state-space model.
"""

from __future__ import annotations

import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emflow

pytestmark = [pytest.mark.filterwarnings("ignore::emflow.DegenerateComponentWarning"),
              pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")]

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COV_TYPES = ["full", "tied", "diag", "spherical"]


@st.composite
def mixtures(draw):
    """Data drawn from a random mixture (random centres, scales, correlations, weights)."""
    seed = draw(st.integers(0, 2**32 - 1))
    K = draw(st.integers(1, 3))
    d = draw(st.integers(1, 3))
    n = draw(st.integers(30, 90))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (K, d))
    weights = rng.dirichlet(np.ones(K))
    labels = rng.choice(K, size=n, p=weights)
    mix = rng.normal(size=(K, d, d)) * 0.7 + np.eye(d)
    X = centres[labels] + np.einsum("nij,nj->ni", mix[labels], rng.normal(size=(n, d)))
    return X * scale, seed


def _fit_gmm(X, K, ct, seed, data=None, **kw):
    n, d = X.shape
    rng = np.random.default_rng(seed)
    prec = {"full": np.stack([np.eye(d)] * K), "tied": np.eye(d), "diag": np.ones((K, d)),
            "spherical": np.ones(K)}[ct] / max(float(X.var()), 1e-300)
    gm = emflow.GaussianMixture(K, covariance_type=ct, tol=0.0, max_iter=10, reg_covar=1e-6 * max(float(X.var()), 1e-12),
                                weights_init=np.full(K, 1.0 / K), means_init=X[rng.choice(n, K, replace=False)],
                                precisions_init=prec, scheduler="threads", **kw)
    return gm.fit(X if data is None else data)


@SETTINGS
@given(mixtures(), st.sampled_from(COV_TYPES), st.integers(1, 3))
def test_gmm_invariants(drawn, ct, K):
    X, seed = drawn
    gm = _fit_gmm(X, K, ct, seed)
    h = np.asarray(gm.history_)
    assert len(h) == 10 and np.all(np.isfinite(h))
    # never decreases (beyond rounding in the last bits of the mean log-likelihood)
    assert np.all(np.diff(h) >= -1e-10 * np.maximum(1.0, np.abs(h[1:]))), np.diff(h)
    np.testing.assert_allclose(gm.weights_.sum(), 1.0, rtol=0, atol=1e-12)
    assert np.all(gm.weights_ >= 0)
    cov = gm.covariances_
    if ct in ("full", "tied"):
        mats = cov[None] if ct == "tied" else cov
        for c in mats:
            np.testing.assert_array_equal(c, c.T)
            assert np.linalg.eigvalsh(c).min() > 0
    else:
        assert np.all(cov > 0) and np.all(np.isfinite(cov))
    # the precision factors are those of the covariances
    P = gm.precisions_
    if ct == "full":
        for c, p in zip(cov, P):
            np.testing.assert_allclose(c @ p, np.eye(len(c)), atol=1e-6 * np.linalg.cond(c))
    elif ct in ("diag", "spherical"):
        np.testing.assert_allclose(cov * P, 1.0, rtol=1e-9)


@SETTINGS
@given(mixtures(), st.sampled_from(COV_TYPES), st.integers(1, 3), st.integers(1, 29), st.integers(1, 29))
def test_gmm_result_does_not_depend_on_partitioning(drawn, ct, K, c1, c2):
    import dask.array as da

    X, seed = drawn
    a = _fit_gmm(X, K, ct, seed, data=da.from_array(X, chunks=(c1, X.shape[1])))
    b = _fit_gmm(X, K, ct, seed, data=da.from_array(X, chunks=(c2, X.shape[1])))
    assert a.fit_info_["partitions"] == -(-len(X) // c1)
    np.testing.assert_allclose(a.history_, b.history_, rtol=1e-10)
    for k in ("weights_", "means_", "covariances_"):
        scale = np.abs(getattr(b, k)).max()
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=1e-10, atol=1e-10 * scale, err_msg=k)


@SETTINGS
@given(mixtures(), st.sampled_from(COV_TYPES), st.integers(1, 3))
def test_gmm_save_load_identical(drawn, ct, K):
    X, seed = drawn
    gm = _fit_gmm(X, K, ct, seed)
    with tempfile.TemporaryDirectory() as tmp:
        back = emflow.load(gm.save(f"{tmp}/m.zarr"))
    for k in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        a, b = getattr(gm, k), getattr(back, k)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
    assert back.history_ == gm.history_ and back.lower_bound_ == gm.lower_bound_
    np.testing.assert_array_equal(back.predict(X), gm.predict(X))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["diag", "full", "spherical", "tied"]), st.integers(1, 3))
def test_gaussian_hmm_monotone_and_round_trip(seed, ct, K):
    from emflow.storage.synthetic import make_hmm_params, sample_hmm

    p = make_hmm_params(K, 2, "gaussian", ct, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(10, 40, size=3))
    X, _ = sample_hmm(p, lengths, rng)
    hmm = emflow.GaussianHMM(K, covariance_type=ct, n_iter=8, tol=0.0, random_state=seed % 1000,
                             scheduler="threads").fit(X, lengths)
    h = np.asarray(hmm.history_)
    assert np.all(np.isfinite(h)) and np.all(np.diff(h) >= -1e-10 * np.maximum(1.0, np.abs(h[1:]))), np.diff(h)
    np.testing.assert_allclose(hmm.transmat_.sum(1), 1.0, rtol=1e-12)
    with tempfile.TemporaryDirectory() as tmp:
        back = emflow.load(hmm.save(f"{tmp}/h.zarr"))
    for k in ("startprob_", "transmat_", "means_", "covars_"):
        assert np.asarray(getattr(back, k)).tobytes() == np.asarray(getattr(hmm, k)).tobytes(), k


@settings(max_examples=5, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(1, 2), st.integers(1, 3))
def test_lgssm_monotone_and_round_trip(seed, state_dim, obs_dim):
    from emflow.storage.synthetic import make_lgssm_params, sample_lgssm

    p = make_lgssm_params(state_dim, obs_dim, seed=seed % 1000)
    _, y = sample_lgssm(p, [25, 30], seed=seed % 997)
    m = emflow.LinearGaussianSSM(state_dim, max_iter=8, tol=0.0, random_state=0, scheduler="threads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(y, [25, 30])
    h = np.asarray(m.history_)
    assert np.all(np.isfinite(h)) and np.all(np.diff(h) >= -1e-9 * np.maximum(1.0, np.abs(h[1:]))), np.diff(h)
    with tempfile.TemporaryDirectory() as tmp:
        back = emflow.load(m.save(f"{tmp}/s.zarr"))
    arrays = {k: v for k, v in vars(m).items() if k.endswith("_") and isinstance(v, np.ndarray)}
    assert arrays
    for k, v in arrays.items():
        assert getattr(back, k).tobytes() == v.tobytes(), k
