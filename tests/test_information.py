"""BIC and AIC, written once in the estimator base, agree with the peers' for every family."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hmmlearn import hmm as H
from sklearn.mixture import GaussianMixture as SkGM

import emflow


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_gaussian_mixture_bic_aic_equal_scikit_learns(ct):
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (150, 3)), rng.normal(3, 0.5, (150, 3))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = emflow.GaussianMixture(2, covariance_type=ct, max_iter=5, random_state=0).fit(X)
    sk = SkGM(2, covariance_type=ct)
    sk.weights_, sk.means_, sk.covariances_ = gm.weights_, gm.means_, gm.covariances_
    sk.precisions_cholesky_ = gm.precisions_cholesky_
    assert gm._n_parameters() == sk._n_parameters()
    np.testing.assert_allclose(gm.bic(X), sk.bic(X), rtol=1e-10)
    np.testing.assert_allclose(gm.aic(X), sk.aic(X), rtol=1e-10)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_gaussian_hmm_bic_aic_equal_hmmlearns(ct):
    rng = np.random.default_rng(1)
    lengths = [80, 120]
    X = rng.normal(size=(200, 2)) + np.repeat([[0, 0], [3, 3]], 100, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = emflow.GaussianHMM(2, covariance_type=ct, n_iter=5, random_state=0).fit(X, lengths)
    ref = H.GaussianHMM(2, covariance_type=ct, init_params="")
    ref.n_features = 2
    ref.startprob_, ref.transmat_, ref.means_ = m.startprob_, m.transmat_, m.means_
    ref.covars_ = m._covars_
    np.testing.assert_allclose(m.bic(X, lengths), ref.bic(X, lengths), rtol=1e-10)
    np.testing.assert_allclose(m.aic(X, lengths), ref.aic(X, lengths), rtol=1e-10)


def test_state_space_bic_counts_the_learned_parameters():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(150, 3)).cumsum(axis=0) * 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = emflow.LinearGaussianSSM(2, max_iter=3).fit(y)
        held = emflow.LinearGaussianSSM(2, max_iter=3, em_vars=["transition_matrix", "observation_covariance"]).fit(y)
    ll = m.score(y)
    # A 2x2, C 3x2, Q spd 3, R spd 6, mu0 2, V0 spd 3
    assert m._n_parameters() == 4 + 6 + 3 + 6 + 2 + 3
    np.testing.assert_allclose(m.bic(y), -2 * ll + 24 * np.log(150), rtol=1e-12)
    np.testing.assert_allclose(m.aic(y), -2 * ll + 48, rtol=1e-12)
    assert held._n_parameters() == 4 + 6
