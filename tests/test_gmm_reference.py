"""Gaussian mixtures against scikit-learn, started from identical parameters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGMM

import emflow
from emflow.errors import EmflowConvergenceWarning

COV_TYPES = ["full", "tied", "diag", "spherical"]


def _start(X, K, ct, seed=0):
    """Rough starting parameters (a 2-iteration sklearn fit) shared by both libraries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGMM(K, covariance_type=ct, max_iter=2, random_state=seed).fit(X)
    return dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)


def _sk_history(X, K, ct, init, n_iter):
    """sklearn's lower bound after each of ``n_iter`` iterations, and its final model."""
    hist = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for it in range(1, n_iter + 1):
            sk = SkGMM(K, covariance_type=ct, max_iter=it, tol=0.0, **init).fit(X)
            hist.append(sk.lower_bound_)
    return np.array(hist), sk


@pytest.fixture(scope="module")
def overlapping():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(4, 4))
    X = np.vstack([
        rng.multivariate_normal([0, 0, 0, 0], np.eye(4), 300),
        rng.multivariate_normal([2, 1, 0, -1], A @ A.T + 0.2 * np.eye(4), 300),
        rng.multivariate_normal([-2, 2, 1, 0], np.diag([0.5, 2, 1, 0.3]), 300),
    ])
    return X + 100.0  # an offset far from zero tests the shifted moments


@pytest.mark.parametrize("ct", COV_TYPES)
def test_matches_sklearn_every_iteration(overlapping, ct):
    X, K, n_iter = overlapping, 3, 12
    init = _start(X, K, ct)
    sk_hist, sk = _sk_history(X, K, ct, init, n_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmflowConvergenceWarning)
        em = emflow.GaussianMixture(K, covariance_type=ct, max_iter=n_iter, tol=0.0, scheduler="threads", **init).fit(X)
    assert em.n_iter_ == n_iter
    np.testing.assert_allclose(em.history_, sk_hist, rtol=1e-8, atol=0)
    np.testing.assert_allclose(em.lower_bound_, sk.lower_bound_, rtol=1e-8)
    np.testing.assert_allclose(em.weights_, sk.weights_, rtol=1e-8)
    np.testing.assert_allclose(em.means_, sk.means_, rtol=1e-8)
    np.testing.assert_allclose(em.covariances_, sk.covariances_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(em.precisions_cholesky_, sk.precisions_cholesky_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(em.precisions_, sk.precisions_, rtol=1e-7, atol=1e-10)
    # prediction methods agree too
    np.testing.assert_allclose(em.score_samples(X), sk.score_samples(X), rtol=1e-10)
    np.testing.assert_allclose(em.predict_proba(X), sk.predict_proba(X), atol=1e-9)
    np.testing.assert_array_equal(em.predict(X), sk.predict(X))
    np.testing.assert_allclose(em.score(X), sk.score(X), rtol=1e-10)
    np.testing.assert_allclose(em.bic(X), sk.bic(X), rtol=1e-10)
    np.testing.assert_allclose(em.aic(X), sk.aic(X), rtol=1e-10)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_converges_where_sklearn_does(overlapping, ct):
    X, K = overlapping, 3
    init = _start(X, K, ct, seed=1)
    sk = SkGMM(K, covariance_type=ct, tol=1e-6, max_iter=500, **init).fit(X)
    em = emflow.GaussianMixture(K, covariance_type=ct, tol=1e-6, max_iter=500, scheduler="threads", **init).fit(X)
    assert em.converged_ and sk.converged_
    assert em.n_iter_ == sk.n_iter_
    np.testing.assert_allclose(em.means_, sk.means_, rtol=1e-7)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_integer_weights_equal_repeated_rows(overlapping, ct):
    """sample_weight=k counts a row k times: compare with sklearn on the repeated rows."""
    rng = np.random.default_rng(5)
    X = overlapping[::3]
    w = rng.integers(1, 4, size=len(X))
    Xrep = np.repeat(X, w, axis=0)
    init = _start(Xrep, 3, ct)
    sk_hist, sk = _sk_history(Xrep, 3, ct, init, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmflowConvergenceWarning)
        em = emflow.GaussianMixture(3, covariance_type=ct, max_iter=5, tol=0.0, scheduler="threads", **init)
        em.fit(X, sample_weight=w.astype(float))
    np.testing.assert_allclose(em.history_, sk_hist, rtol=1e-8)
    np.testing.assert_allclose(em.means_, sk.means_, rtol=1e-8)
    np.testing.assert_allclose(em.covariances_, sk.covariances_, rtol=1e-8, atol=1e-12)
    assert em.score(X, sample_weight=w) == pytest.approx(sk.score(Xrep), rel=1e-10)


def test_log_likelihood_never_decreases(rng):
    # heavily overlapping components, many iterations, no regularisation (pure EM)
    X = np.vstack([rng.normal(0, 1, (400, 2)), rng.normal(0.7, 1.3, (400, 2))])
    for ct in COV_TYPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmflowConvergenceWarning)
            em = emflow.GaussianMixture(4, covariance_type=ct, reg_covar=0.0, tol=0.0, max_iter=60,
                                        random_state=0, scheduler="threads").fit(X)
        h = np.array(em.history_)
        assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:])), ct


@pytest.mark.parametrize("init", ["kmeans", "k-means++", "random_from_data", "random"])
def test_every_init_method_finds_separated_clusters(blobs, init):
    # "random" starts every mean near the global mean: EM needs a tight tol to pull them apart
    tol = 1e-9 if init == "random" else 1e-3
    em = emflow.GaussianMixture(3, init_params=init, random_state=1, n_init=2, max_iter=1000, tol=tol,
                                scheduler="threads").fit(blobs)
    assert em.converged_
    centers = np.array([[-5.0, 0.0, 1.0], [0.0, 4.0, -2.0], [5.0, -3.0, 0.0]])
    found = em.means_[np.argsort(em.means_[:, 0])]
    np.testing.assert_allclose(found, centers, atol=0.3)
    np.testing.assert_allclose(np.sort(em.weights_), [1 / 3] * 3, atol=1e-4)


def test_n_init_keeps_best_lower_bound(rng):
    X = np.vstack([rng.normal(m, 1.0, (150, 2)) for m in ([0, 0], [3, 0], [0, 3], [3, 3], [6, 6])])
    bounds = []
    for seed in range(4):
        em = emflow.GaussianMixture(5, init_params="random_from_data", random_state=seed, n_init=1,
                                    scheduler="threads").fit(X)
        bounds.append(em.lower_bound_)
    # n_init=4 draws its four starts from one generator: its result is the best of its own starts
    best = emflow.GaussianMixture(5, init_params="random_from_data", random_state=0, n_init=4,
                                  scheduler="threads").fit(X)
    one = emflow.GaussianMixture(5, init_params="random_from_data", random_state=0, n_init=1,
                                 scheduler="threads").fit(X)
    assert best.lower_bound_ >= one.lower_bound_ - 1e-12
    assert len(set(np.round(bounds, 8))) >= 1


@pytest.mark.parametrize("ct", ["full", "diag"])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_default_start_is_scikit_learns_for_an_integer_random_state(ct, seed):
    """k-means++ replays scikit-learn's stream on restart 0 when it sees every row, so the
    default start (and the fit from it) is scikit-learn's, components in the same order."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(c, 1.0, size=(150, 3)) for c in (-3, 0, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGMM(3, covariance_type=ct, random_state=seed, max_iter=1, tol=0).fit(X)
        em = emflow.GaussianMixture(3, covariance_type=ct, random_state=seed, max_iter=1, tol=0,
                                    scheduler="threads").fit(X)
    np.testing.assert_allclose(em.means_, sk.means_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(em.weights_, sk.weights_, rtol=1e-10)
    np.testing.assert_allclose(em.lower_bound_, sk.lower_bound_, rtol=1e-12)
