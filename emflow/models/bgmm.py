"""Variational Gaussian mixture math (scikit-learn's ``BayesianGaussianMixture``): pure NumPy.

The E-step is the Gaussian mixture's (:func:`emflow.models.gmm.e_step`) run with
:func:`as_gmm` parameters: the expected log-weights ``E[log pi_k]`` and the expected
log-determinant and mean-precision terms of the variational posterior are per-component
constants, so they enter as the mixture's log-weights, and the same additive statistics
(counts, first and second moments about a shift) come back. The variational M-step and
scikit-learn's lower bound are computed here from those statistics.

scikit-learn's lower bound of an iteration is the entropy of the responsibilities of that
iteration's E-step plus terms of the parameters its M-step produced (Bishop 2006, 10.2;
constants dropped exactly as scikit-learn drops them). The entropy is not summed row by row:
with ``L_ik`` the log-weighted density the E-step normalised,
``sum_i r_ik log r_ik = sum_k sum_i r_ik L_ik - sum_i log sum_k exp(L_ik)``, and
``sum_i r_ik L_ik`` is a linear function of the statistics (the Mahalanobis distances
summed with the responsibilities are traces of the precisions with the scatter matrices).

Shapes: ``K`` components, ``d`` features. For ``covariance_type="tied"``
``degrees_of_freedom`` is a 0-d array, as scikit-learn's scalar.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.special import betaln, digamma, gammaln

from . import gmm as G
from .family import ParamSpec, by

__all__ = ["PRIOR_TYPES", "BGMMParams", "BGMMPriors", "as_gmm", "log_weights", "weights",
           "partition_moments", "combine_moments", "default_priors", "moments", "m_step", "m_step_from_moments", "lower_bound",
           "resp_entropy", "log_dirichlet_norm", "log_wishart_norm", "n_used"]

PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")


def _derive(p):
    return p._replace(precisions_cholesky=G.precisions_cholesky_from_covariances(p.covariances, p.covariance_type))


class BGMMParams(NamedTuple):
    """The variational posterior of a Gaussian mixture (scikit-learn's fitted attributes).

    Attributes
    ----------
    weight_concentration : ndarray
        (2, K) the Beta parameters of the stick-breaking weights (``dirichlet_process``),
        or (K,) the Dirichlet parameters (``dirichlet_distribution``).
    mean_precision : ndarray of shape (K,)
    means : ndarray of shape (K, d)
    degrees_of_freedom : ndarray of shape (K,) (0-d for ``tied``)
    covariances : ndarray
        The Wishart scale matrices divided by the degrees of freedom; (K, d, d) full,
        (d, d) tied, (K, d) diag, (K,) spherical.
    precisions_cholesky : ndarray
        scikit-learn's upper factors of the inverse of ``covariances``.
    covariance_type, weight_concentration_prior_type : str
    """

    weight_concentration: np.ndarray
    mean_precision: np.ndarray
    means: np.ndarray
    degrees_of_freedom: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str
    weight_concentration_prior_type: str

    param_spec = ParamSpec({
        "weight_concentration": "positive", "mean_precision": "positive", "means": "real",
        "degrees_of_freedom": "positive",
        "covariances": by("covariance_type", full="spd", tied="spd", diag="positive", spherical="positive"),
        "precisions_cholesky": "cholesky", "covariance_type": "fixed", "weight_concentration_prior_type": "fixed",
    }, _derive)


class BGMMPriors(NamedTuple):
    """The priors in use (scikit-learn's ``*_prior_`` attributes, defaults filled from the data).

    Attributes
    ----------
    weight_concentration : float
    mean_precision : float
    mean : ndarray of shape (d,)
    degrees_of_freedom : float
    covariance : ndarray
        (d, d) full and tied, (d,) diag, 0-d spherical.
    """

    weight_concentration: float
    mean_precision: float
    mean: np.ndarray
    degrees_of_freedom: float
    covariance: np.ndarray


def partition_moments(X: np.ndarray, w: np.ndarray | None) -> tuple[float, np.ndarray, np.ndarray]:
    """``(n, mean, scatter)`` of one partition: the weight sum, the weighted mean and
    ``sum_i w_i (x_i - mean)(x_i - mean)^T``, centred in the partition (no cancellation of the
    data's offset); :func:`combine_moments` merges partitions exactly."""
    X = np.asarray(X)
    d = X.shape[1]
    if X.shape[0] == 0:
        return 0.0, np.zeros(d), np.zeros((d, d))
    g = np.asarray(X[0], dtype=np.float64)
    st = G.soft_stats(X, w, np.ones((X.shape[0], 1)), g, "full")
    n = float(st.n[0])
    if n <= 0:
        return 0.0, np.zeros(d), np.zeros((d, d))
    delta = st.s1[0] / n
    return n, g + delta, st.s2[0] - n * np.outer(delta, delta)


def combine_moments(parts) -> tuple[float, np.ndarray, np.ndarray]:
    """Merge :func:`partition_moments` of several partitions (Chan et al.'s pairwise update):
    ``M = sum_p M_p + n_p (m_p - m)(m_p - m)^T``."""
    parts = [p for p in parts if p[0] > 0]
    n = float(sum(p[0] for p in parts))
    mean = sum(p[0] * p[1] for p in parts) / n
    scatter = sum(p[2] + p[0] * np.outer(p[1] - mean, p[1] - mean) for p in parts)
    return n, mean, 0.5 * (scatter + scatter.T)


def default_priors(K: int, covariance_type: str, n: float, data_mean: np.ndarray, scatter: np.ndarray, *,
                   weight_concentration=None, mean_precision=None, mean=None, degrees_of_freedom=None,
                   covariance=None) -> BGMMPriors:
    """The priors with scikit-learn's defaults (``_check_parameters``) for those given as None.

    ``n`` (rows, or the weight sum), ``data_mean`` (d,) and ``scatter`` (d, d) describe the
    data (:func:`combine_moments`); the default mean prior is the data mean and the default
    covariance prior the unbiased sample covariance (its diagonal for ``diag``, the mean of
    that for ``spherical``).
    """
    data_mean = np.asarray(data_mean, dtype=np.float64)
    d = data_mean.shape[0]
    if covariance is None:
        cov = np.asarray(scatter, dtype=np.float64) / (n - 1.0)
        cov = {"full": cov, "tied": cov, "diag": np.diag(cov).copy(),
               "spherical": np.asarray(np.diag(cov).mean())}[covariance_type]
    else:
        cov = np.asarray(covariance, dtype=np.float64)
    return BGMMPriors(
        1.0 / K if weight_concentration is None else float(weight_concentration),
        1.0 if mean_precision is None else float(mean_precision),
        data_mean if mean is None else np.asarray(mean, dtype=np.float64).reshape(d),
        float(d) if degrees_of_freedom is None else float(degrees_of_freedom),
        cov,
    )


# -- the expectations the E-step needs ----------------------------------------------------

def log_weights(params: BGMMParams) -> np.ndarray:
    """``E[log pi_k]`` under the variational posterior of the weights (K,)."""
    wc = np.asarray(params.weight_concentration, dtype=np.float64)
    if params.weight_concentration_prior_type == "dirichlet_process":
        dsum = digamma(wc[0] + wc[1])
        return digamma(wc[0]) - dsum + np.hstack((0.0, np.cumsum(digamma(wc[1]) - dsum)[:-1]))
    return digamma(wc) - digamma(np.sum(wc))


def weights(params: BGMMParams) -> np.ndarray:
    """The expected weights (scikit-learn's ``weights_``)."""
    wc = np.asarray(params.weight_concentration, dtype=np.float64)
    if params.weight_concentration_prior_type == "dirichlet_process":
        total = wc[0] + wc[1]
        w = wc[0] / total * np.hstack((1.0, np.cumprod(wc[1] / total)[:-1]))
        return w / np.sum(w)
    return wc / np.sum(wc)


def _log_gauss_offset(params: BGMMParams, d: int) -> np.ndarray:
    """What scikit-learn adds to ``log N(x | means, covariances)`` per component (K,):
    ``-d/2 log nu + (E[log |Lambda|] - d / beta) / 2`` with the normalised precision."""
    nu = np.asarray(params.degrees_of_freedom, dtype=np.float64)
    log_lambda = d * math.log(2.0) + np.sum(digamma(0.5 * (nu - np.arange(d)[:, None])), 0)
    return -0.5 * d * np.log(nu) + 0.5 * (log_lambda - d / np.asarray(params.mean_precision, dtype=np.float64))


def as_gmm(params: BGMMParams) -> G.GMMParams:
    """Gaussian-mixture parameters whose E-step gives the variational responsibilities: the
    per-component constants (:func:`log_weights` and the expected-precision terms) become the
    log-weights (they do not sum to one; the E-step does not need them to)."""
    K, d = np.shape(params.means)
    logw = log_weights(params) + _log_gauss_offset(params, d) * np.ones(K)
    return G.GMMParams(np.exp(logw), np.asarray(params.means, dtype=np.float64), params.covariances,
                       params.precisions_cholesky, params.covariance_type)


# -- M-step ---------------------------------------------------------------------------------

def moments(stats: G.GMMStats, shift: np.ndarray, covariance_type: str, reg_covar: float):
    """scikit-learn's ``_estimate_gaussian_parameters`` from statistics about ``shift``:
    ``nk`` (with its ``10 eps``), the component means ``xk`` and covariances ``sk``
    (``reg_covar`` added), centred on ``xk`` without clipping (scikit-learn does not clip)."""
    N = np.asarray(stats.n, dtype=np.float64)
    nk = N + 10 * np.finfo(np.float64).eps
    delta = np.asarray(stats.s1, dtype=np.float64) / nk[:, None]  # xk - shift
    K, d = delta.shape
    if covariance_type == "full":
        cross = np.einsum("ki,kj->kij", delta, stats.s1)
        sk = (stats.s2 - cross - cross.transpose(0, 2, 1) + N[:, None, None] * np.einsum("ki,kj->kij", delta, delta))
        sk = sk / nk[:, None, None]
        sk[:, np.arange(d), np.arange(d)] += reg_covar
    elif covariance_type == "tied":
        sk = (stats.s2 - np.einsum("k,ki,kj->ij", nk, delta, delta)) / nk.sum()
        sk[np.arange(d), np.arange(d)] += reg_covar
    else:
        sk = (stats.s2 - 2.0 * delta * stats.s1 + N[:, None] * delta**2) / nk[:, None] + reg_covar
        if covariance_type == "spherical":
            sk = sk.mean(axis=1)
    return nk, np.asarray(shift, dtype=np.float64) + delta, sk


def m_step_from_moments(nk, xk, sk, priors: BGMMPriors, covariance_type: str, prior_type: str) -> BGMMParams:
    """scikit-learn's ``_estimate_weights``, ``_estimate_means``, ``_estimate_precisions``."""
    K, d = xk.shape
    if prior_type == "dirichlet_process":
        wc = np.vstack((1.0 + nk, priors.weight_concentration + np.hstack((np.cumsum(nk[::-1])[-2::-1], 0.0))))
    else:
        wc = priors.weight_concentration + nk
    beta0, m0, nu0, cov0 = priors.mean_precision, priors.mean, priors.degrees_of_freedom, priors.covariance
    beta = beta0 + nk
    means = (beta0 * m0 + nk[:, None] * xk) / beta[:, None]
    diff = xk - m0
    if covariance_type == "full":
        nu = nu0 + nk
        cov = cov0 + nk[:, None, None] * sk + (nk * beta0 / beta)[:, None, None] * np.einsum("ki,kj->kij", diff, diff)
        cov = cov / nu[:, None, None]
    elif covariance_type == "tied":
        nu = np.asarray(nu0 + nk.sum() / K)
        cov = cov0 + sk * nk.sum() / K + beta0 / K * np.dot((nk / beta) * diff.T, diff)
        cov = cov / nu
    elif covariance_type == "diag":
        nu = nu0 + nk
        cov = (cov0 + nk[:, None] * (sk + (beta0 / beta)[:, None] * np.square(diff))) / nu[:, None]
    else:
        nu = nu0 + nk
        cov = (cov0 + nk * (sk + beta0 / beta * np.mean(np.square(diff), 1))) / nu
    pc = G.precisions_cholesky_from_covariances(cov, covariance_type)
    return BGMMParams(wc, beta, means, nu, cov, pc, covariance_type, prior_type)


def m_step(stats: G.GMMStats, params: BGMMParams, priors: BGMMPriors, reg_covar: float) -> BGMMParams:
    """The variational M-step from the statistics of an E-step run with ``as_gmm(params)``."""
    shift = G.shift_of(as_gmm(params))
    nk, xk, sk = moments(stats, shift, params.covariance_type, reg_covar)
    return m_step_from_moments(nk, xk, sk, priors, params.covariance_type, params.weight_concentration_prior_type)


# -- lower bound ----------------------------------------------------------------------------

def log_dirichlet_norm(concentration) -> float:
    """Log normalisation of a Dirichlet distribution."""
    return float(gammaln(np.sum(concentration)) - np.sum(gammaln(concentration)))


def log_wishart_norm(nu, log_det_precisions_chol, d: int):
    """Log normalisation of Wishart distributions, without the ``log pi`` term (scikit-learn's)."""
    nu = np.asarray(nu, dtype=np.float64)
    return -(nu * log_det_precisions_chol + nu * d * 0.5 * math.log(2.0)
             + np.sum(gammaln(0.5 * (nu - np.arange(d)[:, None])), 0))


def resp_entropy(stats: G.GMMStats, params: BGMMParams) -> float:
    """``sum_i w_i sum_k r_ik log r_ik`` of the E-step that gave ``stats`` (run with
    ``as_gmm(params)``), from the statistics alone (see the module docstring)."""
    gp = as_gmm(params)
    g = G.shift_of(gp)
    ct = params.covariance_type
    K, d = np.shape(params.means)
    pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
    with np.errstate(divide="ignore"):
        const = np.log(gp.weights) + G._log_det_cholesky(pc, ct, d) - 0.5 * d * math.log(2 * math.pi)
    N = np.asarray(stats.n, dtype=np.float64)
    s1, s2 = np.asarray(stats.s1, dtype=np.float64), np.asarray(stats.s2, dtype=np.float64)
    e = np.asarray(params.means, dtype=np.float64) - g  # (K, d)
    if ct == "full":
        prec = np.einsum("kij,klj->kil", pc, pc)
        pe = np.einsum("kij,kj->ki", prec, e)
        maha = (np.einsum("kij,kij->k", prec, s2) - 2.0 * np.einsum("ki,ki->k", pe, s1)
                + N * np.einsum("ki,ki->k", pe, e))
    elif ct == "tied":
        prec = pc @ pc.T
        pe = e @ prec
        # sum_k r_ik = 1 row by row, so the pooled scatter carries every component's
        maha_total = np.sum(prec * s2) - 2.0 * np.sum(pe * s1) + np.sum(N * np.einsum("ki,ki->k", pe, e))
        used = N > 0
        return float(np.sum(N[used] * const[used]) - 0.5 * maha_total - float(stats.loglik))
    else:
        p = pc**2 if ct == "diag" else np.repeat((pc**2)[:, None], d, axis=1)
        maha = np.sum(p * (s2 - 2.0 * e * s1 + N[:, None] * e**2), axis=1)
    used = N > 0  # a component with log-weight -inf and no responsibility adds 0 (r log r -> 0)
    return float(np.sum(N[used] * const[used] - 0.5 * maha[used]) - float(stats.loglik))


def lower_bound(stats: G.GMMStats, params: BGMMParams, priors: BGMMPriors, reg_covar: float) -> float:
    """scikit-learn's lower bound of the iteration whose E-step (run with ``params``) gave
    ``stats``: the responsibilities' entropy, and the parameters of the M-step that follows."""
    new = m_step(stats, params, priors, reg_covar)
    return bound_terms(new) - resp_entropy(stats, params)


def bound_terms(params: BGMMParams) -> float:
    """The lower bound's terms that depend on the variational parameters only."""
    K, d = np.shape(params.means)
    ct = params.covariance_type
    nu = np.asarray(params.degrees_of_freedom, dtype=np.float64)
    log_det = G._log_det_cholesky(np.asarray(params.precisions_cholesky), ct, d) - 0.5 * d * np.log(nu)
    if ct == "tied":
        log_wishart = K * float(np.sum(log_wishart_norm(nu, log_det, d)))
    else:
        log_wishart = float(np.sum(log_wishart_norm(nu, log_det, d)))
    wc = np.asarray(params.weight_concentration, dtype=np.float64)
    if params.weight_concentration_prior_type == "dirichlet_process":
        log_norm_weight = -float(np.sum(betaln(wc[0], wc[1])))
    else:
        log_norm_weight = log_dirichlet_norm(wc)
    return -log_wishart - log_norm_weight - 0.5 * d * float(np.sum(np.log(params.mean_precision)))


def n_used(params: BGMMParams, threshold: float) -> int:
    """How many components have an expected weight of at least ``threshold``."""
    return int(np.sum(weights(params) >= threshold))
