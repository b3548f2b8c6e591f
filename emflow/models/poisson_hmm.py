"""Poisson-emission HMM math (hmmlearn's ``PoissonHMM``): an emission component.

Each state ``k`` emits ``d`` independent counts, ``x_tj ~ Poisson(lambda_kj)``. The
statistics are ``post_k = sum_t gamma_tk`` and ``obs_kj = sum_t gamma_tk x_tj``, plain
float64 sums, so partitions of whole sequences add. The M-step is hmmlearn's (0.3), its
gamma prior included: ``lambda = (lambdas_prior + n * ybar) / (lambdas_weight + n)`` with
``ybar_kj = obs_kj / post_k`` and, as hmmlearn writes it, ``n`` the posterior mass of *all*
states (``sum_k post_k``); the priors broadcast against (K, d) as NumPy broadcasts them
there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
from scipy import special

from ..errors import DataError
from ..stats import require_finite
from .family import ParamSpec
from .hmm_emissions import Emission

__all__ = ["PoissonHMMParams", "PoissonHMMStats", "PoissonEmissionStats", "PoissonEmission",
           "check_counts", "initial_lambdas"]


class PoissonHMMParams(NamedTuple):
    """Parameters of an HMM with Poisson emissions.

    Attributes
    ----------
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)
    lambdas : ndarray of shape (K, d)
        Rate of each feature in each state (hmmlearn's ``lambdas_``).
    """

    startprob: np.ndarray
    transmat: np.ndarray
    lambdas: np.ndarray

    param_spec = ParamSpec({"startprob": "simplex", "transmat": "stochastic", "lambdas": "positive"})


class PoissonHMMStats(NamedTuple):
    """Additive statistics of Poisson-emission Baum-Welch (all float64).

    Attributes
    ----------
    start : ndarray of shape (K,)
    trans : ndarray of shape (K, K)
    post : ndarray of shape (K,)
        ``sum_t gamma_tk``.
    obs : ndarray of shape (K, d)
        ``sum_t gamma_tk x_t``.
    loglik, n_sequences, n_steps : ndarray of shape ()
    """

    start: np.ndarray
    trans: np.ndarray
    post: np.ndarray
    obs: np.ndarray
    loglik: np.ndarray
    n_sequences: np.ndarray
    n_steps: np.ndarray


class PoissonEmissionStats(NamedTuple):
    """``post`` (K,) and ``obs`` (K, d) of :class:`PoissonHMMStats`."""

    post: np.ndarray
    obs: np.ndarray


def check_counts(X, where: str = "The sequences", row0: int = 0) -> np.ndarray:
    """Validate Poisson observations (non-negative whole numbers); returns them as float64 (n, d)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise DataError(f"{where} have shape {X.shape}; Poisson observations must be (n_steps, n_features).")
    if X.dtype.kind not in "iuf" and X.dtype.kind != "b":
        raise DataError(f"{where} have dtype {X.dtype}; Poisson observations must be counts (integers >= 0).")
    Xf = X.astype(np.float64, copy=False)
    bad = ~(np.isfinite(Xf) & (Xf >= 0) & (Xf == np.round(Xf)))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(f"{where}: step {row0 + i}, feature {j} holds {X[i, j]!r}; Poisson observations "
                        "must be counts (whole numbers >= 0).")
    return Xf


def initial_lambdas(mean: float, var: float, K: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """hmmlearn's start: rates drawn from a gamma matching the mean and variance of all counts."""
    if not (mean > 0 and var > 0):
        raise DataError("Initialising lambdas needs counts that are not all equal (mean and variance > 0); "
                        "set lambdas_ and leave 'l' out of init_params.")
    return rng.gamma(shape=mean**2 / var, scale=var / mean, size=(K, d))


@dataclass(frozen=True, eq=False)
class PoissonEmission(Emission):
    """Poisson emissions (hmmlearn's ``PoissonHMM``).

    Parameters
    ----------
    lambdas_prior, lambdas_weight : float or array broadcastable to (K, d), default 0
        Gamma prior (hmmlearn's alpha-beta notation); 0 and 0 is none.
    params : str
        hmmlearn's letters to learn; this component reads "l".
    """

    params_type: ClassVar[type] = PoissonHMMParams
    stats_type: ClassVar[type] = PoissonHMMStats
    letters: ClassVar[str] = "l"

    lambdas_prior: Any = 0.0
    lambdas_weight: Any = 0.0
    params: str = "l"

    def observations(self, values, params):
        return check_counts(values)

    def log_likelihood(self, X, params):
        lam = np.asarray(params.lambdas, dtype=np.float64)
        const = special.gammaln(X + 1.0).sum(axis=1)
        if np.all(lam > 0):
            return X @ np.log(lam).T - lam.sum(axis=1) - const[:, None]
        out = np.empty((len(X), len(lam)))  # a zero rate: 0 log 0 = 0 where the count is 0
        for k in range(len(lam)):
            out[:, k] = special.xlogy(X, lam[k]).sum(axis=1) - lam[k].sum() - const
        return out

    def stats(self, X, posteriors, params, cache=None):
        return PoissonEmissionStats(posteriors.sum(axis=0), posteriors.T @ X)

    def m_step(self, stats, params):
        require_finite(stats, "Poisson HMM")
        old = np.asarray(params.lambdas, dtype=np.float64)
        report: dict = {}
        post = np.asarray(stats.post, dtype=np.float64)
        total = max(float(stats.n_steps), 1.0)
        report["empty_states"] = [int(k) for k in np.flatnonzero(post <= 1e-12 * total)]
        if "l" not in self.params:
            return params._replace(lambdas=old.copy()), report
        K, d = old.shape
        alphas = np.broadcast_to(np.asarray(self.lambdas_prior, dtype=np.float64), (K, d))
        betas = np.broadcast_to(np.asarray(self.lambdas_weight, dtype=np.float64), (K, d))
        n = post.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            ybar = stats.obs / post[:, None]
            lam = (alphas + n * ybar) / (betas + n)
        # a state without posterior mass: hmmlearn's update is 0/0; keep its rates
        bad = ~np.all(np.isfinite(lam), axis=1)
        lam[bad] = old[bad]
        report["kept_states"] = [int(k) for k in np.flatnonzero(bad)]
        return params._replace(lambdas=lam), report

    def n_free(self, K, d):
        return K * d

    def sample(self, state, rng, params):
        return rng.poisson(params.lambdas[state])

    def sample_many(self, states, rng, params):
        lam = np.asarray(params.lambdas, dtype=np.float64)
        return rng.poisson(lam[np.asarray(states)])
