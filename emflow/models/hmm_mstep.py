"""The HMM families' parameter and statistics types and their M-steps (pure NumPy).

Split from :mod:`emflow.models.hmm` (which imports every name back: ``H.GaussianHMMParams``,
``H.m_step_gaussian``, ... are the same objects): the forward-backward and Viterbi passes,
the emission densities and sampling stay there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import linalg

from ..errors import FitFailedError
from ..stats import require_finite
from . import gmm as G

COVARIANCE_TYPES = ("spherical", "diag", "full", "tied")


# -- parameters and statistics --------------------------------------------------------
class GaussianHMMParams(NamedTuple):
    """Parameters of an HMM with Gaussian emissions.

    Attributes
    ----------
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)
    means : ndarray of shape (K, d)
    covars : ndarray
        (K,) spherical, (K, d) diag, (K, d, d) full, (d, d) tied (hmmlearn's ``_covars_``).
    covariance_type : str
    """

    startprob: np.ndarray
    transmat: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    covariance_type: str


class CategoricalHMMParams(NamedTuple):
    """Parameters of an HMM with categorical emissions.

    Attributes
    ----------
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)
    emissionprob : ndarray of shape (K, M)
    """

    startprob: np.ndarray
    transmat: np.ndarray
    emissionprob: np.ndarray


class GaussianHMMStats(NamedTuple):
    """Additive statistics of Gaussian-emission Baum-Welch (all float64).

    Attributes
    ----------
    start : ndarray of shape (K,)
        Expected number of sequences starting in each state.
    trans : ndarray of shape (K, K)
        Expected number of transitions ``i -> j``.
    post : ndarray of shape (K,)
        ``N_k = sum_t gamma_tk``.
    s1 : ndarray of shape (K, d)
        ``sum_t gamma_tk (x_t - g)``.
    s2 : ndarray
        (K, d) ``sum_t gamma_tk (x_t - g)**2`` for diag and spherical;
        (K, d, d) ``sum_t gamma_tk (x_t - g)(x_t - g)^T`` for full and tied.
    loglik : ndarray of shape ()
        ``sum_s log p(x_s)`` over sequences.
    n_sequences, n_steps : ndarray of shape ()
    """

    start: np.ndarray
    trans: np.ndarray
    post: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    loglik: np.ndarray
    n_sequences: np.ndarray
    n_steps: np.ndarray


class CategoricalHMMStats(NamedTuple):
    """Additive statistics of categorical-emission Baum-Welch (all float64).

    Attributes
    ----------
    start : ndarray of shape (K,)
    trans : ndarray of shape (K, K)
    obs : ndarray of shape (K, M)
        ``sum_t gamma_tk [x_t == m]``.
    loglik, n_sequences, n_steps : ndarray of shape ()
    """

    start: np.ndarray
    trans: np.ndarray
    obs: np.ndarray
    loglik: np.ndarray
    n_sequences: np.ndarray
    n_steps: np.ndarray


class TransitionPriors(NamedTuple):
    """Dirichlet priors (hmmlearn's ``startprob_prior``, ``transmat_prior``; 1 = none)."""

    startprob_prior: np.ndarray | float = 1.0
    transmat_prior: np.ndarray | float = 1.0


class GaussianPriors(NamedTuple):
    """hmmlearn's GaussianHMM priors, with its defaults."""

    means_prior: np.ndarray | float = 0.0
    means_weight: np.ndarray | float = 0.0
    covars_prior: np.ndarray | float = 1e-2
    covars_weight: np.ndarray | float = 1.0


def shift_of(params: GaussianHMMParams) -> np.ndarray:
    """The fixed shift ``g`` of shape (d,) Gaussian statistics are taken about."""
    return np.asarray(params.means, dtype=np.float64).mean(axis=0)


# hmmlearn's Gaussian log density retries a full (or tied) covariance whose Cholesky
# factorisation fails with ``Sigma + 1e-7 I`` (its ``_log_multivariate_normal_density_full``),
# and floors diagonal variances at the smallest positive double; the stored covariance is
# left as the M-step made it. Doing the same keeps near-degenerate fits going as hmmlearn's do.
FULL_COVAR_JITTER = 1e-7


def _precisions_cholesky(cov: np.ndarray, ct: str) -> np.ndarray:
    """Precision factors as hmmlearn's density sees the covariances (FitFailedError if even
    the jittered matrix is not positive definite, or a variance is not finite)."""
    msg = ("The covariance of the {what} is not positive definite, even with {jitter:g} added to its "
           "diagonal (a state collapsed onto too few distinct points). Use fewer states, a larger "
           "covars_prior, or scale the data.")
    if ct in ("full", "tied"):
        mats = cov[None] if ct == "tied" else cov
        out = np.empty_like(mats)
        for k, c in enumerate(mats):
            for jitter in (0.0, FULL_COVAR_JITTER):
                try:
                    out[k] = G._chol_upper_precision(c + jitter * np.eye(len(c)) if jitter else c)
                    break
                except (linalg.LinAlgError, ValueError):
                    continue
            else:
                raise FitFailedError(msg.format(what="tied states" if ct == "tied" else f"state {k}",
                                                jitter=FULL_COVAR_JITTER))
        return out[0] if ct == "tied" else out
    if not np.all(np.isfinite(cov)):
        k = int(np.flatnonzero(~np.all(np.reshape(np.isfinite(cov), (len(cov), -1)), axis=1))[0])
        raise FitFailedError(msg.format(what=f"state {k}", jitter=0.0))
    return 1.0 / np.sqrt(np.maximum(cov, np.finfo(np.float64).tiny))


def _normalize_rows(a: np.ndarray) -> np.ndarray:
    s = a.sum(axis=-1, keepdims=True)
    if a.ndim > 1:
        s = np.where(s == 0, 1.0, s)
    return a / s


def m_step_transitions(stats, startprob, transmat, priors: TransitionPriors, params: str):
    """New ``startprob`` and ``transmat`` (hmmlearn ``BaseHMM._do_mstep``).

    Entries that are zero stay zero (left-right models); a row of ``transmat`` with no
    expected transitions out stays all zero and is reported.

    Returns ``(startprob, transmat, report)``.
    """
    sp = np.asarray(startprob, dtype=np.float64)
    tm = np.asarray(transmat, dtype=np.float64)
    report: dict = {}
    if "s" in params:
        new = np.maximum(np.asarray(priors.startprob_prior, dtype=np.float64) - 1 + stats.start, 0)
        new = np.where(sp == 0, 0, new)
        total = new.sum()
        if not total > 0:
            raise FitFailedError(
                "Every start state has zero expected count and zero prior mass; startprob cannot be "
                "re-estimated. Use startprob_prior > 1 or leave 's' out of params."
            )
        sp = new / total
    if "t" in params:
        new = np.maximum(np.asarray(priors.transmat_prior, dtype=np.float64) - 1 + stats.trans, 0)
        new = np.where(tm == 0, 0, new)
        tm = _normalize_rows(new)
        empty = [int(k) for k in np.flatnonzero(tm.sum(axis=1) == 0)]
        if empty:
            report["zero_transition_rows"] = empty
    return sp, tm, report


def m_step_gaussian(stats: GaussianHMMStats, params: GaussianHMMParams, priors: GaussianPriors,
                    trans_priors: TransitionPriors, learn: str) -> tuple[GaussianHMMParams, dict]:
    """M-step of a Gaussian HMM (hmmlearn ``GaussianHMM._do_mstep``), from moments about a shift.

    Parameters
    ----------
    stats : GaussianHMMStats
        Summed over partitions, all taken about ``shift_of(params)``.
    params : GaussianHMMParams
        Parameters the E-step ran with.
    priors, trans_priors
        Priors as hmmlearn broadcasts them (scalars, or arrays of its shapes).
    learn : str
        hmmlearn's ``params``: letters of the parameters to update ("s", "t", "m", "c").

    Returns
    -------
    params : GaussianHMMParams
    report : dict
        ``empty_states``: states with (numerically) zero posterior mass; those whose
        update is undefined (0/0 without a prior) keep their previous mean and
        covariance. ``log_prob``: total log-likelihood of the E-step.
        ``zero_transition_rows``.
    """
    require_finite(stats, "Gaussian HMM")
    ct = params.covariance_type
    g = shift_of(params)
    sp, tm, report = m_step_transitions(stats, params.startprob, params.transmat, trans_priors, learn)
    N = np.asarray(stats.post, dtype=np.float64)
    K, d = stats.s1.shape
    means_prior = np.asarray(priors.means_prior, dtype=np.float64)
    means_weight = np.asarray(priors.means_weight, dtype=np.float64)
    old_means = np.asarray(params.means, dtype=np.float64)
    old_cov = np.asarray(params.covars, dtype=np.float64)
    denom = N[:, None]
    kept: set[int] = set()
    if "m" in learn:
        # hmmlearn: (w mu0 + sum gamma x) / (w + N), with sum gamma x = s1 + N g
        with np.errstate(divide="ignore", invalid="ignore"):
            means = (means_weight * means_prior + (stats.s1 + N[:, None] * g)) / (means_weight + denom)
        bad = ~np.all(np.isfinite(means), axis=1)
        means[bad] = old_means[bad]
        kept.update(int(k) for k in np.flatnonzero(bad))
    else:
        means = old_means.copy()
    covars = old_cov.copy()
    if "c" in learn:
        covars_prior = np.asarray(priors.covars_prior, dtype=np.float64)
        covars_weight = np.asarray(priors.covars_weight, dtype=np.float64)
        meandiff = means - means_prior
        delta = means - g  # sum gamma (x - m)^2 = S2 - 2 delta s1 + N delta^2, no cancellation
        if ct in ("spherical", "diag"):
            c_n = means_weight * meandiff**2 + (stats.s2 - 2 * delta * stats.s1 + N[:, None] * delta**2)
            c_d = np.maximum(covars_weight - 1, 0) + denom
            cv = (covars_prior + c_n) / np.maximum(c_d, 1e-5)
            if ct == "spherical":
                cv = cv.mean(axis=1)
            covars = cv
        else:
            mw = means_weight[:, None, None] if means_weight.ndim == 1 else means_weight
            outer_s1 = delta[:, :, None] * stats.s1[:, None, :]
            centred = (stats.s2 - outer_s1 - outer_s1.transpose(0, 2, 1)
                       + N[:, None, None] * delta[:, :, None] * delta[:, None, :])
            c_n = mw * meandiff[:, :, None] * meandiff[:, None, :] + centred
            cvweight = np.maximum(covars_weight - d, 0)
            if ct == "tied":
                covars = (covars_prior + c_n.sum(axis=0)) / (cvweight + N.sum())
                covars = 0.5 * (covars + covars.T)
            else:
                cp = covars_prior[:, None, None] if covars_prior.ndim == 1 else covars_prior
                cw = cvweight[:, None, None] if cvweight.ndim == 1 else cvweight
                with np.errstate(divide="ignore", invalid="ignore"):
                    cv = (cp + c_n) / (cw + N[:, None, None])
                cv = 0.5 * (cv + cv.transpose(0, 2, 1))
                bad = ~np.all(np.isfinite(cv.reshape(K, -1)), axis=1)
                cv[bad] = old_cov[bad]
                kept.update(int(k) for k in np.flatnonzero(bad))
                covars = cv
    _check_covars(covars, ct)
    total = max(float(stats.n_steps), 1.0)
    report.update({
        "empty_states": [int(k) for k in np.flatnonzero(N <= 1e-12 * total)],
        "kept_states": sorted(kept),
        "log_prob": float(stats.loglik),
    })
    return GaussianHMMParams(sp, tm, means, covars, ct), report


def _check_covars(covars: np.ndarray, ct: str) -> None:
    _precisions_cholesky(np.asarray(covars, dtype=np.float64), ct)  # what the next E-step will need


def m_step_categorical(stats: CategoricalHMMStats, params: CategoricalHMMParams, emissionprob_prior,
                       trans_priors: TransitionPriors, learn: str) -> tuple[CategoricalHMMParams, dict]:
    """M-step of a categorical HMM (hmmlearn ``CategoricalHMM._do_mstep``)."""
    sp, tm, report = m_step_transitions(stats, params.startprob, params.transmat, trans_priors, learn)
    E = np.asarray(params.emissionprob, dtype=np.float64)
    if "e" in learn:
        new = np.maximum(np.asarray(emissionprob_prior, dtype=np.float64) - 1 + stats.obs, 0)
        empty = new.sum(axis=1) == 0
        new = _normalize_rows(new)
        new[empty] = E[empty]  # hmmlearn would leave an all-zero row: keep the old one
        E = new
        if np.any(empty):
            report["empty_states"] = [int(k) for k in np.flatnonzero(empty)]
    report["log_prob"] = float(stats.loglik)
    return CategoricalHMMParams(sp, tm, E), report


# -- utilities -----------------------------------------------------------------------


def full_covars(covars: np.ndarray, ct: str, K: int, d: int) -> np.ndarray:
    """Covariances as full matrices of shape (K, d, d) (hmmlearn's ``covars_``)."""
    covars = np.asarray(covars, dtype=np.float64)
    if ct == "full":
        return covars.copy()
    if ct == "diag":
        return np.stack([np.diag(c) for c in covars])
    if ct == "tied":
        return np.tile(covars, (K, 1, 1))
    return np.eye(d)[None] * np.ravel(covars)[:, None, None]
