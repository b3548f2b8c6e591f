"""``warm_start`` as scikit-learn's mixtures have it, for every family on the estimator base."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.mixture import GaussianMixture as SkGM

import emflow


def _data():
    rng = np.random.default_rng(0)
    return np.vstack([rng.normal(0, 1, (300, 2)), rng.normal(3, 1, (300, 2))])


def test_warm_start_continues_and_detects_convergence_like_scikit_learn():
    """Repeated warm fits of one iteration each walk the same EM path as one long fit, and the
    first fit whose change from the previous fit's lower bound is below tol says converged."""
    X = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        long = emflow.GaussianMixture(2, max_iter=30, tol=1e-6, random_state=0).fit(X)
        warm = emflow.GaussianMixture(2, warm_start=True, max_iter=1, tol=1e-6, random_state=0)
        bounds = []
        for _ in range(100):
            warm.fit(X)
            bounds.append(warm.lower_bound_)
            if warm.converged_:
                break
    assert warm.converged_
    np.testing.assert_allclose(bounds, long.history_[: len(bounds)], rtol=1e-12)
    assert len(bounds) == len(long.history_)  # converged at the same iteration as the long fit
    np.testing.assert_allclose(warm.means_, long.means_, rtol=1e-10)
    # scikit-learn's own warm start converges too, from its own start (its test's pattern)
    sk = SkGM(2, warm_start=True, max_iter=1, tol=1e-6, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(100):
            sk.fit(X)
            if sk.converged_:
                break
    assert sk.converged_
    assert warm.lower_bounds_ == warm.history_


def test_warm_start_false_starts_afresh_and_n_init_is_ignored_when_warm():
    X = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = emflow.GaussianMixture(2, max_iter=3, random_state=0).fit(X)
        b = emflow.GaussianMixture(2, max_iter=3, random_state=0).fit(X).fit(X)
        w = emflow.GaussianMixture(2, max_iter=3, random_state=0, warm_start=True, n_init=3).fit(X)
        first = list(w.history_)
        w.fit(X)
    assert a.history_ == b.history_  # a second cold fit is the first again
    assert w.fit_info_["n_init"] == 1 and w.history_[0] > first[0]
