"""Gaussian-mixture-emission HMM math (hmmlearn's ``GMMHMM``): an emission component.

State ``k`` emits from a mixture of ``M`` Gaussians with weights ``w_k``, means
``mu_km`` and covariances of one of four types: ``spherical`` (K, M), ``diag``
(K, M, d), ``full`` (K, M, d, d), or ``tied`` (K, d, d), one full matrix shared by the
components of a state (hmmlearn's meaning, not GaussianHMM's).

With ``r_tkm = gamma_tk * p(m | x_t, k)`` the statistics are float64 sums, so partitions
of whole sequences add: ``post_mix = sum_t r`` (K, M), ``post = sum_t gamma`` (K,),
``s1 = sum_t r (x_t - g)`` (K, M, d) about a fixed shift ``g`` (the mean of all
means), and ``c``, hmmlearn's ``c_n``: second moments about the means *the E-step ran
with* (hmmlearn's M-step uses them with the new means; this module does the same, so the
numbers are hmmlearn's).

The M-step is hmmlearn's (0.3) with its priors and their defaults: Dirichlet
``weights_prior`` (1), normal ``means_prior`` / ``means_weight`` (0, 0), and
``covars_prior`` / ``covars_weight`` defaulting by covariance type (diag -1.5 / 0,
spherical -(M + 2) / 2 / 0, full 0 / -(d + 2), tied 0 / -(M + d + 1)), all broadcast to
hmmlearn's shapes. Where hmmlearn's update is 0/0 (a mixture component without posterior
mass) the component keeps its previous mean and covariance and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
from scipy import special

from ..errors import FitFailedError
from ..stats import require_finite
from . import gmm as G
from . import hmm as H
from .family import ParamSpec, by
from .hmm_emissions import Emission

__all__ = ["GMMHMMParams", "GMMHMMStats", "GMMEmissionStats", "GMMHMMPriors", "GMMEmission",
           "covars_shape", "resolve_priors",
           "initial_mixture_means", "initial_covars"]


class GMMHMMParams(NamedTuple):
    """Parameters of an HMM with Gaussian-mixture emissions.

    Attributes
    ----------
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)
    weights : ndarray of shape (K, M)
    means : ndarray of shape (K, M, d)
    covars : ndarray
        (K, M) spherical, (K, M, d) diag, (K, M, d, d) full, (K, d, d) tied (hmmlearn's ``covars_``).
    covariance_type : str
    """

    startprob: np.ndarray
    transmat: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    covariance_type: str

    param_spec = ParamSpec({"startprob": "simplex", "transmat": "stochastic", "weights": "stochastic",
                            "means": "real",
                            "covars": by("covariance_type", full="spd", tied="spd", diag="positive",
                                         spherical="positive"),
                            "covariance_type": "fixed"})


class GMMHMMStats(NamedTuple):
    """Additive statistics of Gaussian-mixture-emission Baum-Welch (all float64).

    Attributes
    ----------
    start : ndarray of shape (K,)
    trans : ndarray of shape (K, K)
    post_mix : ndarray of shape (K, M)
    post : ndarray of shape (K,)
    s1 : ndarray of shape (K, M, d)
        ``sum_t r_tkm (x_t - g)``, ``g = shift_of(params)``.
    c : ndarray
        ``sum_t r_tkm`` times ``|x_t - mu_km|^2`` (spherical, (K, M)), ``(x_t - mu_km)**2``
        (diag, (K, M, d)), ``(x_t - mu_km)(x_t - mu_km)^T`` (full, (K, M, d, d); tied:
        summed over m, (K, d, d)), about the means of the E-step.
    loglik, n_sequences, n_steps : ndarray of shape ()
    """

    start: np.ndarray
    trans: np.ndarray
    post_mix: np.ndarray
    post: np.ndarray
    s1: np.ndarray
    c: np.ndarray
    loglik: np.ndarray
    n_sequences: np.ndarray
    n_steps: np.ndarray


class GMMEmissionStats(NamedTuple):
    """``post_mix``, ``post``, ``s1`` and ``c`` of :class:`GMMHMMStats`."""

    post_mix: np.ndarray
    post: np.ndarray
    s1: np.ndarray
    c: np.ndarray


class GMMHMMPriors(NamedTuple):
    """hmmlearn's GMMHMM priors (``None``: hmmlearn's default for the covariance type)."""

    weights_prior: Any = 1.0
    means_prior: Any = 0.0
    means_weight: Any = 0.0
    covars_prior: Any = None
    covars_weight: Any = None


def covars_shape(ct: str, K: int, M: int, d: int) -> tuple[int, ...]:
    """Shape of ``covars`` for a covariance type (hmmlearn's ``covars_``)."""
    return {"spherical": (K, M), "diag": (K, M, d), "full": (K, M, d, d), "tied": (K, d, d)}[ct]


def resolve_priors(priors: GMMHMMPriors, ct: str, K: int, M: int, d: int) -> GMMHMMPriors:
    """Priors with hmmlearn's defaults filled in and broadcast to its shapes
    (``GMMHMM._init_covar_priors`` and ``_fix_priors_shape``)."""
    default_cp, default_cw = {"full": (0.0, -(1.0 + d + 1.0)), "tied": (0.0, -(M + d + 1.0)),
                              "diag": (-1.5, 0.0), "spherical": (-(M + 2.0) / 2.0, 0.0)}[ct]
    cp = default_cp if priors.covars_prior is None else priors.covars_prior
    cw = default_cw if priors.covars_weight is None else priors.covars_weight
    cw_shape = {"full": (K, M), "tied": (K,), "diag": (K, M, d), "spherical": (K, M)}[ct]

    def b(v, shape):
        return np.broadcast_to(np.asarray(v, dtype=np.float64), shape).copy()

    return GMMHMMPriors(b(priors.weights_prior, (K, M)), b(priors.means_prior, (K, M, d)),
                        b(priors.means_weight, (K, M)), b(cp, covars_shape(ct, K, M, d)), b(cw, cw_shape))


def shift_of(params: GMMHMMParams) -> np.ndarray:
    """The fixed shift ``g`` of shape (d,) the first moments are taken about."""
    m = np.asarray(params.means, dtype=np.float64)
    return m.reshape(-1, m.shape[-1]).mean(axis=0)


def _state_view(params: GMMHMMParams, k: int) -> G.GMMParams:
    """State ``k``'s mixture as a scikit-learn-type GMM (tied: one matrix for its components)."""
    ct = params.covariance_type
    cov = np.asarray(params.covars[k], dtype=np.float64)
    try:  # as hmmlearn's densities: a failed Cholesky retried with 1e-7 I, variances floored
        pc = H._precisions_cholesky(cov, ct)
    except FitFailedError:
        raise FitFailedError(
            f"The covariance of state {k} is not positive definite, even with {H.FULL_COVAR_JITTER:g} added to "
            "its diagonal (a mixture component collapsed onto too few distinct points). Use fewer states or mixture components, a larger covars_prior, "
            "or scale the data.") from None
    w = np.asarray(params.weights[k], dtype=np.float64)
    return G.GMMParams(w, np.asarray(params.means[k], dtype=np.float64), cov, pc, ct)


def _component_log_prob(Xc: np.ndarray, g: np.ndarray, params: GMMHMMParams, k: int) -> np.ndarray:
    """``log w_km + log N(x_t | mu_km, Sigma_km)`` of shape (n, M), for ``Xc = X - g``."""
    view = _state_view(params, k)
    with np.errstate(divide="ignore"):
        logw = np.log(view.weights)
    return G.log_gaussian_density(Xc, view.means - g, view) + logw


@dataclass(frozen=True, eq=False)
class GMMEmission(Emission):
    """Gaussian-mixture emissions (hmmlearn's ``GMMHMM``).

    Parameters
    ----------
    n_mix : int
    covariance_type : {"spherical", "diag", "full", "tied"}
    priors : GMMHMMPriors
    params : str
        hmmlearn's letters to learn; this component reads "w", "m" and "c".
    """

    params_type: ClassVar[type] = GMMHMMParams
    stats_type: ClassVar[type] = GMMHMMStats
    letters: ClassVar[str] = "mcw"

    n_mix: int = 1
    covariance_type: str = "diag"
    priors: GMMHMMPriors = field(default_factory=GMMHMMPriors)
    params: str = "mcw"

    @classmethod
    def for_params(cls, params) -> "GMMEmission":
        return cls(n_mix=int(np.shape(params.weights)[1]), covariance_type=params.covariance_type)

    def log_likelihood(self, X, params):
        return self.log_likelihood_and_cache(X, params)[0]

    def log_likelihood_and_cache(self, X, params):
        """Per-state log densities (n, K), and the per-component ones (K arrays (n, M)),
        which the E-step's :meth:`stats` reuses for the component responsibilities."""
        g = shift_of(params)
        Xc = X - g
        out = np.empty((len(X), len(params.startprob)))
        comps = []
        for k in range(out.shape[1]):
            lp = _component_log_prob(Xc, g, params, k)
            with np.errstate(under="ignore"):
                out[:, k] = special.logsumexp(lp, axis=1)
            comps.append(lp)
        return out, (comps, out)

    def stats(self, X, posteriors, params, cache=None):
        ct = params.covariance_type
        g = shift_of(params)
        Xc = X - g
        K, M, d = np.shape(params.means)
        comps, state_lp = cache if cache is not None else self.log_likelihood_and_cache(X, params)[1]
        post_mix = np.zeros((K, M))
        s1 = np.zeros((K, M, d))
        c = np.zeros(covars_shape(ct, K, M, d))
        for k in range(K):
            with np.errstate(under="ignore", invalid="ignore"):
                r = posteriors[:, k : k + 1] * np.exp(comps[k] - state_lp[:, k : k + 1])
            post_mix[k] = r.sum(axis=0)
            s1[k] = r.T @ Xc
            for m in range(M):
                D = X - params.means[k, m]
                rm = r[:, m : m + 1]
                if ct == "spherical":
                    c[k, m] = rm[:, 0] @ np.einsum("ij,ij->i", D, D)
                elif ct == "diag":
                    c[k, m] = rm[:, 0] @ (D * D)
                elif ct == "full":
                    c[k, m] = (D * rm).T @ D
                else:
                    c[k] += (D * rm).T @ D
        return GMMEmissionStats(post_mix, posteriors.sum(axis=0), s1, c)

    def online_move(self, stats, about, params):
        """``s1`` moved from ``shift_of(about)`` to ``shift_of(params)`` and ``c`` from
        ``about``'s means to ``params``' (``x - b = (x - a) + delta``, ``delta = a - b``)."""
        Nm = np.asarray(stats.post_mix, dtype=np.float64)
        g_a, g_b = shift_of(about), shift_of(params)
        mu_a = np.asarray(about.means, dtype=np.float64)
        delta = mu_a - np.asarray(params.means, dtype=np.float64)
        u = stats.s1 + Nm[..., None] * (g_a - mu_a)  # sum r (x - mu_a), (K, M, d)
        ct = params.covariance_type
        if ct in ("full", "tied"):
            cross = u[..., :, None] * delta[..., None, :]
            add = cross + np.swapaxes(cross, -1, -2) + Nm[..., None, None] * delta[..., :, None] * delta[..., None, :]
            add = add.sum(axis=1) if ct == "tied" else add
        else:
            add = 2.0 * delta * u + Nm[..., None] * delta**2
            add = add.sum(axis=-1) if ct == "spherical" else add
        return stats._replace(s1=stats.s1 + Nm[..., None] * (g_a - g_b), c=stats.c + add)

    def m_step(self, stats, params):
        require_finite(stats, "GMM HMM")
        ct = params.covariance_type
        learn = self.params
        K, M, d = np.shape(params.means)
        pri = resolve_priors(self.priors, ct, K, M, d)
        g = shift_of(params)
        old_means = np.asarray(params.means, dtype=np.float64)
        old_cov = np.asarray(params.covars, dtype=np.float64)
        weights = np.asarray(params.weights, dtype=np.float64).copy()
        Nm = np.asarray(stats.post_mix, dtype=np.float64)
        kept: set[tuple[int, int]] = set()
        if "w" in learn:
            am1 = pri.weights_prior - 1
            weights = (Nm + am1) / (stats.post + am1.sum(axis=1))[:, None]
            if not np.all(np.isfinite(weights) & (weights >= 0)):
                raise FitFailedError("The re-estimated mixture weights are not probabilities (a state without "
                                     "posterior mass, or weights_prior < 1). Use fewer states or weights_prior >= 1.")
        means = old_means.copy()
        if "m" in learn:
            mw = pri.means_weight
            # hmmlearn: m_n = mw mu0 + sum r x, with sum r x = s1 + N g
            m_n = mw[:, :, None] * pri.means_prior + (stats.s1 + Nm[:, :, None] * g)
            m_d = Nm + mw
            m_d = np.where((weights == 0) & np.all(m_n == 0, axis=-1), 1.0, m_d)
            with np.errstate(divide="ignore", invalid="ignore"):
                means = m_n / m_d[:, :, None]
            bad = ~np.all(np.isfinite(means), axis=-1)
            means[bad] = old_means[bad]
            kept.update((int(k), int(m)) for k, m in np.argwhere(bad))
        covars = old_cov.copy()
        if "c" in learn:
            covars = self._covars(stats, pri, means, Nm, d, M, ct)
            bad = ~np.all(np.isfinite(covars.reshape(covars.shape[0], -1) if ct == "tied"
                                      else covars.reshape(K, M, -1)), axis=-1)
            covars[bad] = old_cov[bad]
            if ct == "tied":
                kept.update((int(k), m) for k in np.flatnonzero(bad) for m in range(M))
            else:
                kept.update((int(k), int(m)) for k, m in np.argwhere(bad))
        new = params._replace(weights=weights, means=means, covars=covars)
        for k in range(K):
            _state_view(new, k)  # positive definite, or a FitFailedError naming the state
        total = max(float(stats.n_steps), 1.0)
        report = {"empty_states": [int(k) for k in np.flatnonzero(stats.post <= 1e-12 * total)],
                  "empty_components": [[int(k), int(m)] for k, m in np.argwhere(Nm <= 1e-12 * total)],
                  "kept_components": [list(km) for km in sorted(kept)]}
        return new, report

    @staticmethod
    def _covars(stats, pri, means, Nm, d, M, ct):
        """hmmlearn ``GMMHMM._do_mstep``'s covariance update (its variable names)."""
        lambdas = pri.means_weight
        centered = means - pri.means_prior
        with np.errstate(divide="ignore", invalid="ignore"):
            if ct == "full":
                dots = centered[..., :, None] * centered[..., None, :]
                c_n = np.transpose(pri.covars_prior, (0, 1, 3, 2)) + lambdas[:, :, None, None] * dots + stats.c
                c_d = (Nm + 1 + pri.covars_weight + d + 1)[:, :, None, None]
            elif ct == "diag":
                c_n = lambdas[:, :, None] * centered**2 + 2 * pri.covars_weight + stats.c
                c_d = Nm[:, :, None] + 1 + 2 * (pri.covars_prior + 1)
            elif ct == "spherical":
                c_n = lambdas * np.einsum("...i,...i", centered, centered) + 2 * pri.covars_weight + stats.c
                c_d = d * (Nm + 1) + 2 * (pri.covars_prior + 1)
            else:
                dots = centered[..., :, None] * centered[..., None, :]
                c_n = np.einsum("ij,ijkl->ikl", lambdas, dots) + np.transpose(pri.covars_prior, (0, 2, 1)) + stats.c
                c_d = (stats.post + M + pri.covars_weight + d + 1)[:, None, None]
            cv = c_n / c_d
        if ct in ("full", "tied"):
            cv = 0.5 * (cv + np.swapaxes(cv, -1, -2))
        return cv

    def n_free(self, K, d):
        M = self.n_mix
        cov = {"spherical": K * M, "diag": K * M * d, "full": K * M * d * (d + 1) // 2,
               "tied": K * d * (d + 1) // 2}[self.covariance_type]
        return K * M * d + cov + K * (M - 1)

    def sample(self, state, rng, params):
        K, M, d = np.shape(params.means)
        m = rng.choice(M, p=params.weights[state])
        cov = params.covars[state] if params.covariance_type == "tied" else params.covars[state, m]
        if params.covariance_type != "tied":
            cov = H.full_covars(np.asarray(cov)[None], params.covariance_type, 1, d)[0]
        return rng.multivariate_normal(params.means[state, m], cov)

    def sample_many(self, states, rng, params):
        states = np.asarray(states)
        K, M, d = np.shape(params.means)
        ct = params.covariance_type
        u = rng.random(len(states))
        cdf = np.cumsum(params.weights, axis=1)
        comp = np.array([min(int(np.searchsorted(cdf[k], x * cdf[k, -1], side="right")), M - 1)
                         for k, x in zip(states, u)], dtype=np.int64)
        Z = rng.standard_normal((len(states), d))
        X = np.empty((len(states), d))
        for k in range(K):
            full = (np.tile(params.covars[k], (M, 1, 1)) if ct == "tied"
                    else H.full_covars(params.covars[k], ct, M, d))
            for m in range(M):
                idx = (states == k) & (comp == m)
                if idx.any():
                    X[idx] = params.means[k, m] + Z[idx] @ np.linalg.cholesky(full[m]).T
        return X


def initial_mixture_means(Xs: np.ndarray, state_centers: np.ndarray, M: int, cov: np.ndarray,
                          rng: np.random.Generator, max_iter: int = 100, tol: float = 1e-4) -> np.ndarray:
    """hmmlearn's start for the means (K, M, d), on an in-memory sample ``Xs`` of the steps.

    Each sample step goes to its nearest state centre; the steps of state ``k`` are
    clustered into ``M`` by k-means (k-means++ seeding, Lloyd iterations). A state with
    fewer than ``M`` sample steps draws its means from ``N(mean of the centres, cov)``, as
    hmmlearn does.
    """
    from . import kmeans as KM

    centers = np.asarray(state_centers, dtype=np.float64)
    K, d = centers.shape
    g = centers.mean(axis=0)
    labels = np.argmin(((Xs[:, None, :] - centers[None]) ** 2).sum(axis=-1), axis=1)
    out = np.empty((K, M, d))
    for k in range(K):
        Xk = Xs[labels == k]
        if len(Xk) < M:
            out[k] = rng.multivariate_normal(g, cov, size=M)
            continue
        c = Xk[KM.kmeans_plusplus(Xk, M, rng)]
        var = float(Xk.var(axis=0).mean()) if len(Xk) > 1 else 0.0
        for _ in range(max_iter):
            shift = c.mean(axis=0)
            new, _ = KM.m_step(KM.e_step(Xk, None, c, shift), c, shift)
            moved = float(np.sum((new - c) ** 2))
            c = new
            if moved <= tol * var:
                break
        out[k] = c
    return out


def initial_covars(cv: np.ndarray, ct: str, K: int, M: int) -> np.ndarray:
    """hmmlearn's start for the covariances: the data covariance (plus ``min_covar``) everywhere
    (spherical: the mean variance, as emflow's GaussianHMM; hmmlearn averages every entry of
    the matrix, off-diagonal ones included, which can be <= 0)."""
    d = cv.shape[0]
    if ct == "tied":
        return np.tile(cv, (K, 1, 1))
    if ct == "full":
        return np.tile(cv, (K, M, 1, 1))
    if ct == "diag":
        return np.tile(np.diag(cv), (K, M, 1))
    return np.full((K, M), np.diag(cv).mean())
