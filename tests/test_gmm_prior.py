"""GaussianMixture(prior=...): MAP under the conjugate prior of Fraley and Raftery (2007)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats as ss

import emflow
from emflow import errors as E
from emflow.models import gmm as G
from emflow.models import gmm_prior as P

COV_TYPES = ["full", "tied", "diag", "spherical"]
K = 3


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 3))
    return np.vstack([rng.normal(0, 1, (150, 3)), rng.multivariate_normal([3, 1, 0], A @ A.T + 0.3 * np.eye(3), 150),
                      rng.normal(-2, 0.5, (100, 3))]) + 30.0


def _fit(X, ct, prior, n_iter=12, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.EmflowConvergenceWarning)
        return emflow.GaussianMixture(K, covariance_type=ct, prior=prior, reg_covar=0.0, tol=0.0, max_iter=n_iter,
                                      random_state=0, scheduler="threads", **kw).fit(X)


def _params(gm):
    return G.GMMParams(gm.weights_, gm.means_, gm.covariances_, gm.precisions_cholesky_, gm.covariance_type)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_log_posterior_never_decreases_and_defaults_are_mclusts(X, ct):
    gm = _fit(X, ct, "conjugate", weights_init=None)
    h = np.asarray(gm.history_)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))
    d = X.shape[1]
    p = gm.prior_
    np.testing.assert_allclose(p.mean, X.mean(axis=0), rtol=1e-13)
    scale = np.cov(X.T, bias=True) / K ** (2 / d)
    want = {"full": scale, "tied": scale, "diag": np.diag(scale), "spherical": np.trace(scale) / d}[ct]
    np.testing.assert_allclose(p.scale, want, rtol=1e-11)
    assert (p.shrinkage, p.dof, p.weight_concentration, p.strength) == (0.01, d + 2, 1.0, 1.0)
    # the reported objective is the log posterior of the parameters entering the last iteration
    last = _fit(X, ct, "conjugate", n_iter=len(h) - 1)
    lse, _ = G.posterior(X, _params(last))
    np.testing.assert_allclose(h[-1], (lse.sum() + P.log_prior(_params(last), p)) / len(X), rtol=1e-10)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_zero_strength_is_the_maximum_likelihood_fit(X, ct):
    ml = _fit(X, ct, None)
    for strength, tol in [(0.0, 1e-12), (1e-9, 1e-7)]:
        gm = _fit(X, ct, {"strength": strength})
        np.testing.assert_allclose(gm.history_, ml.history_, rtol=tol)
        np.testing.assert_allclose(gm.means_, ml.means_, rtol=tol)
        np.testing.assert_allclose(gm.covariances_, ml.covariances_, rtol=tol, atol=tol)
    strong = _fit(X, ct, {"strength": 1.0, "shrinkage": 50.0})
    assert not np.allclose(strong.means_, ml.means_, rtol=1e-3)


def _expected_log_posterior(X, resp, params, prior):
    """sum_ik r_ik log(pi_k N(x_i | mu_k, Sigma_k)) + s log p(params): what the M-step maximises."""
    lp = G.log_prob(X, params)
    return float(np.sum(resp * lp)) + P.log_prior(params, prior)


def _perturb(params, rng, eps):
    ct = params.covariance_type
    w = params.weights * np.exp(eps * rng.normal(size=params.weights.shape))
    mu = params.means + eps * rng.normal(size=params.means.shape)
    cov = np.array(params.covariances, copy=True)
    if ct in ("full", "tied"):
        mats = cov[None] if ct == "tied" else cov
        for k in range(len(mats)):
            B = eps * rng.normal(size=mats[k].shape)
            mats[k] = mats[k] + 0.5 * (B + B.T) * np.abs(np.diag(mats[k])).min()
        cov = mats[0] if ct == "tied" else mats
    else:
        cov = cov * np.exp(eps * rng.normal(size=cov.shape))
    return G.GMMParams(w / w.sum(), mu, cov, G.precisions_cholesky_from_covariances(cov, ct), ct)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_the_map_m_step_maximises_the_expected_log_posterior(X, ct):
    """Brute force: every random perturbation of the M-step's parameters lowers the objective
    the M-step maximises (the expected complete-data log posterior at fixed responsibilities)."""
    rng = np.random.default_rng(1)
    start = _params(_fit(X, ct, None, n_iter=2))
    prior = P.default_prior(X.mean(0), np.cov(X.T), K, ct, shrinkage=0.5, weight_concentration=3.0, strength=2.0)
    _, resp = G.posterior(X, start)
    st = G.soft_stats(X, None, resp, G.shift_of(start), ct)
    best, _ = P.m_step(st._replace(weight_sum=np.asarray(float(len(X)))), G.shift_of(start), ct, 0.0, prior)
    top = _expected_log_posterior(X, resp, best, prior)
    for eps in (1e-2, 1e-4):
        for _ in range(20):
            assert _expected_log_posterior(X, resp, _perturb(best, rng, eps), prior) < top


@pytest.mark.parametrize("ct", ["full", "tied", "diag"])
def test_log_prior_is_the_stated_density(X, ct):
    """Differences of log_prior equal differences of scipy's densities (inverse-Wishart or
    inverse-gamma, normal, Dirichlet): the normalisers cancel."""
    d = X.shape[1]
    prior = P.default_prior(X.mean(0), np.cov(X.T), K, ct, shrinkage=0.3, weight_concentration=2.5)
    a, b = _params(_fit(X, ct, None, n_iter=2)), _params(_fit(X, ct, None, n_iter=6))

    def scipy_log(p):
        out = ss.dirichlet.logpdf(p.weights, np.full(K, prior.weight_concentration))
        if ct == "full":
            for k in range(K):
                out += ss.invwishart.logpdf(p.covariances[k], prior.dof, prior.scale)
                out += ss.multivariate_normal.logpdf(p.means[k], prior.mean, p.covariances[k] / prior.shrinkage)
        elif ct == "tied":
            out += ss.invwishart.logpdf(p.covariances, prior.dof, prior.scale)
            for k in range(K):
                out += ss.multivariate_normal.logpdf(p.means[k], prior.mean, p.covariances / prior.shrinkage)
        else:
            out += np.sum(ss.invgamma.logpdf(p.covariances, prior.dof / 2, scale=prior.scale / 2))
            out += np.sum(ss.norm.logpdf(p.means, prior.mean, np.sqrt(p.covariances / prior.shrinkage)))
        return out

    np.testing.assert_allclose(P.log_prior(a, prior) - P.log_prior(b, prior), scipy_log(a) - scipy_log(b),
                               rtol=1e-9)
    assert d == 3


def test_with_missing_values_the_log_posterior_never_decreases(X):
    Xm = X.copy()
    Xm[np.random.default_rng(2).random(X.shape) < 0.2] = np.nan
    Xm[np.isnan(Xm).all(axis=1), 0] = 30.0
    gm = _fit(Xm, "full", "conjugate", missing="marginalize")
    assert np.all(np.diff(gm.history_) >= -1e-12 * np.abs(gm.history_[1:]))


@pytest.mark.parametrize("prior, match", [
    ("flat", "unknown prior"), ({"kappa": 1.0}, "unknown key"), ({"shrinkage": -1.0}, "shrinkage must be"),
    ({"weight_concentration": 0.5}, "weight_concentration must be"), ({"strength": -0.1}, "strength"),
    ({"scale": -np.eye(3)}, "positive definite"), ({"scale": np.ones(3)}, "shape"), ([1, 2], "got a list"),
])
def test_bad_priors_are_config_errors_before_anything_runs(prior, match, tmp_path):
    with pytest.raises(E.ConfigError, match=match):
        emflow.GaussianMixture(K, prior=prior).fit(str(tmp_path / "none.zarr"))


def test_prior_shapes_and_dof_are_checked_against_the_data(X):
    for prior, match in [({"dof": 1.5}, "dof must be"), ({"mean": np.zeros(4)}, "mean must be"),
                         ({"scale": np.eye(4)}, "shape")]:
        with pytest.raises(E.ConfigError, match=match):
            emflow.GaussianMixture(K, prior=prior, scheduler="threads").fit(X)


def test_given_settings_are_used_and_survive_save_and_load(X, tmp_path):
    prior = {"mean": [30.0, 30.0, 30.0], "scale": 2.0 * np.eye(3), "shrinkage": 0.1, "dof": 7.0,
             "weight_concentration": 2.0}
    gm = _fit(X, "full", prior, n_iter=3)
    np.testing.assert_array_equal(gm.prior_.mean, prior["mean"])
    np.testing.assert_array_equal(gm.prior_.scale, prior["scale"])
    assert (gm.prior_.shrinkage, gm.prior_.dof, gm.prior_.weight_concentration) == (0.1, 7.0, 2.0)
    back = emflow.load(gm.save(tmp_path / "m.zarr"))
    again = _fit(X, "full", back.prior, n_iter=3)
    assert again.history_ == gm.history_
