"""Gaussian HMM emissions with values missing at random (``GaussianHMM(missing="marginalize")``).

A missing value is a NaN. Exact EM (Ghahramani & Jordan, 1994), with the pattern machinery
of :mod:`emflow.models.gmm_missing` (a state is a mixture component of weight 1):

* a step with observed coordinates ``o`` and missing ``m`` has emission density
  ``N(x_o | mu_o, Sigma_oo)`` under each state (the marginal over ``x_m``);
* its share of the M-step statistics, weighted by the state posterior ``gamma_tk``, replaces
  ``x_m`` by its conditional mean given ``x_o`` and the state, and adds the conditional
  covariance to the second moments;
* a step with *every* coordinate missing has emission density 1 under every state (the
  standard HMM convention: the transition still runs, so the chain bridges the gap) and
  contributes nothing to the emission statistics (only to the transition ones).

Steps with no NaN go through :class:`~emflow.models.hmm_emissions.GaussianEmission`
unchanged: with no NaN in the data the E-step *is* the complete-data one. Tied covariances
are seen as K equal full ones and spherical as diagonal ones, so the statistics stay per
state (what the HMM's M-step reads). Arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import gmm as G
from . import gmm_missing as GM
from . import hmm as H
from .hmm_emissions import GaussianEmission, GaussianEmissionStats

__all__ = ["MissingGaussianEmission", "mixture_view"]


def mixture_view(params: H.GaussianHMMParams) -> G.GMMParams:
    """The states' emissions as a Gaussian mixture of weight-1 components with per-state
    ("full" or "diag") covariances, as the HMM's density sees them (jitter included)."""
    v = H._gmm_view(params)
    K, d = np.shape(params.means)
    ct = params.covariance_type
    if ct == "tied":
        cov = np.broadcast_to(v.covariances, (K, d, d)).copy()
        pc = np.broadcast_to(np.asarray(v.precisions_cholesky).reshape(-1, d, d)[0], (K, d, d)).copy()
        return v._replace(covariances=cov, precisions_cholesky=pc, covariance_type="full")
    if ct == "spherical":
        var = np.repeat(np.asarray(v.covariances, dtype=np.float64)[:, None], d, axis=1)
        return v._replace(covariances=var, precisions_cholesky=1.0 / np.sqrt(var), covariance_type="diag")
    return v


def _masks(X: np.ndarray):
    miss = np.isnan(X)
    inc = miss.any(axis=1)
    part = inc & ~miss.all(axis=1)  # some coordinates observed, some missing
    return miss, inc, part


@dataclass(frozen=True, eq=False)
class MissingGaussianEmission(GaussianEmission):
    """:class:`~emflow.models.hmm_emissions.GaussianEmission` whose steps may hold NaN
    (missing values, marginalised; see the module notes).

    Parameters are those of :class:`GaussianEmission` (it is not registered for a
    parameter type: the estimator chooses it under ``missing="marginalize"``).
    """

    def observations(self, values, params):
        return np.asarray(values, dtype=np.float64)

    def log_likelihood(self, X, params):
        return self.log_likelihood_and_cache(X, params)[0]

    def log_likelihood_and_cache(self, X, params):
        X = np.asarray(X, dtype=np.float64)
        miss, inc, part = _masks(X)
        if not inc.any():
            return H.gaussian_log_prob(X, params), None
        K = len(params.startprob)
        log_b = np.zeros((X.shape[0], K))  # every coordinate missing: density 1
        if not inc.all():
            log_b[~inc] = H.gaussian_log_prob(X[~inc], params)
        if part.any():
            lp = np.empty((int(part.sum()), K))
            GM._incomplete(X[part], miss[part], None, mixture_view(params), logp=lp)
            log_b[part] = lp
        return log_b, (miss, inc, part)

    def stats(self, X, posteriors, params, cache=None):
        X = np.asarray(X, dtype=np.float64)
        miss, inc, part = _masks(X) if cache is None else cache
        if not inc.any():
            return super().stats(X, posteriors, params)
        gam = np.asarray(posteriors, dtype=np.float64)
        K, d = np.shape(params.means)
        full = params.covariance_type in ("full", "tied")
        out = GaussianEmissionStats(np.zeros(K), np.zeros((K, d)), np.zeros((K, d, d) if full else (K, d)))
        if not inc.all():
            out = GaussianEmissionStats(*super().stats(X[~inc], gam[~inc], params))
        if part.any():
            view = mixture_view(params)
            _, _, s, _ = GM._incomplete(X[part], miss[part], None, view, stats=True, gamma=gam[part])
            # s is about the mixture's shift; move it to the HMM's (equal up to rounding)
            dg = G.shift_of(view) - H.shift_of(params)
            s1 = s.s1 + s.n[:, None] * dg
            if full:
                s2 = (s.s2 + dg[None, :, None] * s.s1[:, None, :] + s.s1[:, :, None] * dg[None, None, :]
                      + s.n[:, None, None] * np.outer(dg, dg)[None])
            else:
                s2 = s.s2 + 2 * dg * s.s1 + s.n[:, None] * dg**2
            out = GaussianEmissionStats(out.post + s.n, out.s1 + s1, out.s2 + s2)
        return out
