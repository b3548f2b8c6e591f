"""MAP estimation of a Gaussian mixture under a conjugate prior (Fraley and Raftery, 2007:
mclust's ``priorControl``).

The prior, with strength ``s`` (a power on the prior density: ``s = 1`` is the prior below,
``s -> 0`` the maximum-likelihood fit):

* weights: Dirichlet(alpha, ..., alpha), ``alpha >= 1`` (1: flat);
* full: for each component, ``Sigma_k ~ inverse-Wishart(nu, Lambda)`` and
  ``mu_k | Sigma_k ~ N(mu_P, Sigma_k / kappa)``;
* tied: one ``Sigma ~ inverse-Wishart(nu, Lambda)``, each ``mu_k | Sigma ~ N(mu_P, Sigma / kappa)``;
* diag: each variance ``sigma_kj^2 ~ inverse-gamma(nu / 2, varsigma_j^2 / 2)`` and
  ``mu_kj | sigma_kj^2 ~ N(mu_Pj, sigma_kj^2 / kappa)``;
* spherical: ``sigma_k^2 ~ inverse-gamma(nu / 2, varsigma^2 / 2)``,
  ``mu_k | sigma_k^2 ~ N(mu_P, sigma_k^2 I / kappa)``.

mclust's defaults (:func:`default_prior`): ``kappa = 0.01``, ``nu = d + 2``, ``mu_P`` the data's
mean, ``Lambda`` the data's covariance divided by ``K^(2/d)`` (diag: its diagonal so divided;
spherical: the mean of that diagonal).

The M-step (:func:`m_step`) maximises the expected complete-data log-likelihood plus
``s log p(theta)``; EM then never decreases the log posterior ``log L(theta) + s log p(theta)``
(:func:`log_prior` gives ``log p`` up to a constant that depends on the hyperparameters only).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import gmm as G

__all__ = ["ConjugatePrior", "default_prior", "m_step", "log_prior"]


class ConjugatePrior(NamedTuple):
    """Hyperparameters of the conjugate prior (see the module docstring).

    Attributes
    ----------
    mean : ndarray of shape (d,)
        ``mu_P``.
    shrinkage : float
        ``kappa > 0``.
    dof : float
        ``nu`` (full, tied: ``> d - 1``; diag, spherical: ``> 0``).
    scale : ndarray
        ``Lambda`` (d, d) for full and tied, ``varsigma^2`` (d,) for diag, () for spherical.
    weight_concentration : float
        Dirichlet ``alpha >= 1``.
    strength : float
        ``s >= 0``, the power on the prior density.
    """

    mean: np.ndarray
    shrinkage: float
    dof: float
    scale: np.ndarray
    weight_concentration: float = 1.0
    strength: float = 1.0


def default_prior(data_mean: np.ndarray, data_cov: np.ndarray, K: int, covariance_type: str,
                  **given) -> ConjugatePrior:
    """mclust's default prior from the data's mean (d,) and covariance (d, d); ``given``
    (any field of :class:`ConjugatePrior`) overrides a default."""
    d = len(data_mean)
    scale = np.asarray(data_cov, dtype=np.float64) / K ** (2.0 / d)
    scale = {"full": scale, "tied": scale, "diag": np.diag(scale).copy(),
             "spherical": np.asarray(np.trace(scale) / d)}[covariance_type]
    base = dict(mean=np.asarray(data_mean, dtype=np.float64), shrinkage=0.01, dof=d + 2.0, scale=scale)
    base.update({k: v for k, v in given.items() if v is not None})
    return ConjugatePrior(**base)


def _exponent(covariance_type: str, prior: ConjugatePrior, K: int, d: int) -> float:
    """The power of ``1 / det`` (full, tied) or ``1 / sigma^2`` (diag, spherical), times 2, that
    the prior contributes to one covariance."""
    nu = float(prior.dof)
    return {"full": nu + d + 2.0, "tied": nu + d + 1.0 + K, "diag": nu + 3.0, "spherical": nu + d + 2.0}[covariance_type]


def m_step(stats: G.GMMStats, shift: np.ndarray, covariance_type: str, reg_covar: float,
           prior: ConjugatePrior) -> tuple[G.GMMParams, dict]:
    """MAP M-step: the maximiser of the expected complete-data log posterior, plus ``reg_covar``
    on the diagonal of each covariance (as :func:`emflow.models.gmm.m_step`)."""
    ct = covariance_type
    N, nk, delta, W = G.scatter(stats, ct)
    K, d = delta.shape
    s = float(prior.strength)
    kappa = s * float(prior.shrinkage)
    scale = s * np.asarray(prior.scale, dtype=np.float64)
    xbar = shift + delta
    dev = xbar - prior.mean  # (K, d)
    means = (nk[:, None] * xbar + kappa * prior.mean) / (nk + kappa)[:, None]
    shrink = nk * kappa / (nk + kappa)  # (K,)
    denom = s * _exponent(ct, prior, K, d)
    if ct == "full":
        cov = (scale + W + shrink[:, None, None] * dev[:, :, None] * dev[:, None, :]) / (nk + denom)[:, None, None]
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))
        cov[:, np.arange(d), np.arange(d)] += reg_covar
    elif ct == "tied":
        cov = (scale + W + np.einsum("k,ki,kj->ij", shrink, dev, dev)) / (nk.sum() + denom)
        cov = 0.5 * (cov + cov.T)
        cov[np.arange(d), np.arange(d)] += reg_covar
    elif ct == "diag":
        cov = (scale + np.maximum(W, 0.0) + shrink[:, None] * dev**2) / (nk + denom)[:, None] + reg_covar
    else:
        tot = np.maximum(W, 0.0).sum(axis=1) + shrink * np.sum(dev**2, axis=1)
        cov = (scale + tot) / (nk * d + denom) + reg_covar
    a = s * (float(prior.weight_concentration) - 1.0)
    weights = (nk + a) / (nk.sum() + K * a)
    total = float(np.sum(stats.weight_sum))
    empty = [int(k) for k in np.flatnonzero(N <= 1e-10 * max(total, 1e-300))]
    prec_chol, cov, repaired = G._precisions_cholesky_repairing(cov, ct, reg_covar)
    return G.GMMParams(weights, means, cov, prec_chol, ct), {"empty_components": empty,
                                                            "repaired_covariances": repaired}


def log_prior(params: G.GMMParams, prior: ConjugatePrior) -> float:
    """``s log p(params)`` up to an additive constant (the hyperparameters' normalisers)."""
    ct = params.covariance_type
    means = np.asarray(params.means, dtype=np.float64)
    K, d = means.shape
    s = float(prior.strength)
    if s == 0.0:
        return 0.0
    pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
    dev = means - prior.mean
    kappa, scale = float(prior.shrinkage), np.asarray(prior.scale, dtype=np.float64)
    e = _exponent(ct, prior, K, d)
    with np.errstate(divide="ignore"):
        out = (float(prior.weight_concentration) - 1.0) * float(np.sum(np.log(params.weights)))
    if ct in ("full", "tied"):
        U = pc[None] if ct == "tied" else pc
        logdet_prec = 2.0 * np.sum(np.log(np.diagonal(U, axis1=1, axis2=2)), axis=1)  # (Kc,)
        P = np.matmul(U, U.transpose(0, 2, 1))
        maha = np.einsum("ki,kij,kj->k", dev, np.broadcast_to(P, (K, d, d)), dev)
        out += 0.5 * e * float(logdet_prec.sum()) - 0.5 * float(np.einsum("kij,ji->", P, scale)) - 0.5 * kappa * float(maha.sum())
    else:
        prec = pc**2
        prec_kd = prec if ct == "diag" else np.repeat(prec[:, None], d, axis=1)
        if ct == "diag":
            out += float(np.sum(0.5 * e * np.log(prec) - 0.5 * scale * prec))
        else:
            out += float(np.sum(0.5 * e * np.log(prec) - 0.5 * float(scale) * prec))
        out -= 0.5 * kappa * float(np.sum(prec_kd * dev**2))
    return s * out
