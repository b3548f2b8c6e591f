"""The HMM estimators' work shipped to workers: EM family objects, per-partition passes,
hmmlearn's ``ConvergenceMonitor`` record and the checks of hand-set covariances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..models import hmm as H
from ..models import hmm_long as HL
from ..models import kmeans as KM
from ..models.hmm_emissions import CategoricalEmission, GaussianEmission, e_step as _bw_e_step, emission_for
from ..models.hmm_missing import MissingGaussianEmission
from ..execution.sweeps import step_local
from ..storage.sequences import write_owned

__all__ = ["GaussianHMMFamily", "CategoricalHMMFamily", "ConvergenceMonitor"]

SAMPLE_STEPS = 20_000
KMEANS_MAX_ITER = 100
KMEANS_TOL = 1e-4
# An inferred emission matrix larger than this means the symbols are not codes 0..M-1.
MAX_EMISSION_BYTES = 2**30
IMPLEMENTATIONS = ("log", "scaling")
DECODER_ALGORITHMS = ("viterbi", "map")
COMPUTE_DTYPES = ("float64", "float32")




# -- family objects (shipped to workers) ----------------------------------------------
@dataclass(frozen=True, eq=False)
class GaussianHMMFamily:
    """EM family of Gaussian-emission HMMs (for :func:`emflow.em.run_em`)."""

    priors: H.GaussianPriors
    trans_priors: H.TransitionPriors
    params: str
    scaling: bool = False
    missing: bool = False  # NaN marks a missing value (marginalised: emflow.models.hmm_missing)
    compute_dtype: str = "float64"  # of the emission densities (statistics: float64)

    def _emission(self, p):
        if self.missing:
            return MissingGaussianEmission.for_params(p)
        return GaussianEmission(covariance_type=p.covariance_type, compute_dtype=self.compute_dtype)

    def e_step(self, values, offsets, p: H.GaussianHMMParams, link=None) -> H.GaussianHMMStats:
        em = self._emission(p)
        if self.scaling:
            _check_scaling(values, p, emission=em)
        if link is not None:  # a slice of a sequence cut across partitions
            return HL.slice_e_step(values, p, em, link)
        if self.missing and np.isnan(values).any():
            return _bw_e_step(values, offsets, p, em)
        # a partition without NaN takes the complete-data path (the compiled kernel), so a
        # fit with missing="marginalize" on complete data is the complete-data fit exactly
        return H.e_step_gaussian(values, offsets, p, self.compute_dtype)

    @property
    def sweeps(self):
        if self.missing:
            return HL.Sweeps(MissingGaussianEmission())
        return HL.Sweeps(GaussianEmission(compute_dtype=self.compute_dtype) if self.compute_dtype != "float64" else None)

    def m_step(self, stats: H.GaussianHMMStats, p: H.GaussianHMMParams):
        return H.m_step_gaussian(stats, p, self.priors, self.trans_priors, self.params)

    def online_move(self, stats, about, p):
        """Running moments moved to ``p``'s shift (stepwise EM: the emission's ``online_move``)."""
        return GaussianEmission.for_params(p).online_move(stats, about, p)

    def objective(self, stats) -> float:
        return float(stats.loglik) / float(stats.n_steps)


@dataclass(frozen=True, eq=False)
class CategoricalHMMFamily:
    """EM family of categorical-emission HMMs (for :func:`emflow.em.run_em`)."""

    emissionprob_prior: Any
    trans_priors: H.TransitionPriors
    params: str
    scaling: bool = False

    def e_step(self, values, offsets, p: H.CategoricalHMMParams, link=None) -> H.CategoricalHMMStats:
        if self.scaling:
            _check_scaling(values, p)
        if link is not None:
            return HL.slice_e_step(values, p, CategoricalEmission(), link)
        return H.e_step_categorical(values, offsets, p)

    sweeps = HL.Sweeps()

    def m_step(self, stats: H.CategoricalHMMStats, p: H.CategoricalHMMParams):
        return H.m_step_categorical(stats, p, self.emissionprob_prior, self.trans_priors, self.params)

    def objective(self, stats) -> float:
        return float(stats.loglik) / float(stats.n_steps)


class ConvergenceMonitor:
    """hmmlearn-like record of a fit.

    Attributes
    ----------
    tol : float
    n_iter : int
    history : list of float
        Total log-likelihood of all sequences, per iteration (as hmmlearn records it).
    iter : int
    converged : bool
    """

    def __init__(self, tol: float, n_iter: int, history=(), converged: bool = False):
        self.tol, self.n_iter = tol, n_iter
        self.history = list(history)
        self.iter = len(self.history)
        self.converged = converged

    def __repr__(self) -> str:
        return f"ConvergenceMonitor(tol={self.tol}, n_iter={self.n_iter}, iter={self.iter}, history={self.history})"


# -- per-partition work --------------------------------------------------------------
def _check_scaling(values, params, log_b=None, emission=None) -> None:
    """hmmlearn's ``implementation="scaling"`` works on emission probabilities in linear
    scale, and its forward pass fails (ValueError) on a step where they all underflow to 0;
    emflow's recursions never underflow, so it checks for such steps to fail as hmmlearn does."""
    if log_b is None:
        log_b = _log_b(np.asarray(values), params, emission)
    with np.errstate(under="ignore"):
        dead = ~np.any(np.exp(log_b) > 0, axis=1)
    if np.any(dead):
        raise DataError(
            f"Forward pass failed with underflow: {int(dead.sum())} step(s) have emission probability 0 "
            "under every state in linear scale (implementation='scaling'). Consider using "
            "implementation='log' instead.")


def _log_b(X, params, emission=None):
    """Log emission densities (n, K) under ``emission`` (default: the one of the parameters' type)."""
    em = emission_for(params) if emission is None else emission
    return em.log_likelihood(em.observations(X, params), params)


@step_local
def _observed_step_sums(values, offsets):
    """Per column: sum of the observed (non-NaN) values and their number, shape (2, d)."""
    X = np.asarray(values, dtype=np.float64)
    obs = ~np.isnan(X)
    return np.stack([np.where(obs, X, 0.0).sum(axis=0), obs.sum(axis=0).astype(np.float64)])


@step_local
def _km_e_step(values, offsets, centers, shift):
    return KM.e_step(np.asarray(values, dtype=np.float64), None, centers, shift)


@step_local
def _moments(values, offsets, shift):
    Xc = np.asarray(values, dtype=np.float64) - shift
    return (np.asarray(float(len(Xc))), Xc.sum(axis=0), Xc.T @ Xc)


@step_local
def _take_steps(values, offsets, rows):
    return np.asarray(values[rows], dtype=np.float64)


@step_local
def _symbol_range(values, offsets, n_symbols, start):
    sym = H.check_symbols(values, n_symbols, "The sequences", start)
    return int(sym.min()), int(sym.max())


def _posterior_part(values, offsets, params, out_url: str | None, kind: str, scaling: bool, emission, start: int,
                    link=None):
    if link is not None:
        return _posterior_slice(values, params, out_url, kind, scaling, emission, start, link)
    layout = H.Layout(offsets)
    log_b = _log_b(np.asarray(values)[layout.perm], params, emission)
    if scaling and kind != "states":
        _check_scaling(values, params, log_b)
    if kind == "states":
        logprob, res = H.viterbi(log_b, layout, params.startprob, params.transmat)
    else:
        fb = H.forward_backward(log_b, layout, params.startprob, params.transmat, want_trans=False)
        logprob, res = fb.loglik, layout.to_original(fb.gamma)
        if kind == "map":
            res = res.argmax(axis=1)
    total = float(logprob.sum())
    if out_url is None:
        return total, res
    return total, write_owned(out_url + "/values", res, start)


def _posterior_slice(values, params, out_url, kind, scaling, emission, start, link):
    """:func:`_posterior_part` of one slice of a cut sequence (``kind`` "proba" or "map")."""
    em = emission_for(params) if emission is None else emission
    if kind == "states":
        total, res = HL.slice_viterbi(values, params, em, link)
    else:
        if scaling:
            _check_scaling(values, params, emission=em)
        total, res = HL.slice_posteriors(values, params, em, link)
        if kind == "map":
            res = res.argmax(axis=1)
    return total, (res if out_url is None else write_owned(out_url + "/values", res, start))


@dataclass(frozen=True)
class _PosteriorSweeps:
    """Max-product sweeps for Viterbi states, sum-product ones for posteriors."""

    def _pick(self, rest):  # rest: out_url, kind, scaling, emission, ...
        return HL.ViterbiSweeps(rest[3]) if rest[1] == "states" else HL.Sweeps(rest[3])

    def forward(self, values, offsets, params, *rest):
        return self._pick(rest).forward(values, offsets, params, *rest)

    def backward(self, values, offsets, params, *rest):
        return self._pick(rest).backward(values, offsets, params, *rest)


_posterior_part.sweeps = _PosteriorSweeps()


def _score_part(values, offsets, params, scaling: bool, emission, link=None):
    if link is not None:  # the forward sweep has the slice's share of the log-likelihood
        if scaling:
            _check_scaling(values, params, emission=emission)
        return np.array([link[1].loglik, 0.0 if link[0] is not None else 1.0, len(values)], dtype=np.float64)
    layout = H.Layout(offsets)
    log_b = _log_b(np.asarray(values)[layout.perm], params, emission)
    if scaling:
        _check_scaling(values, params, log_b)
    fb = H.forward_backward(log_b, layout, params.startprob, params.transmat, want_trans=False)
    return np.array([fb.loglik.sum(), layout.n_sequences, layout.n_steps], dtype=np.float64)


@dataclass(frozen=True)
class _ScoreSweep(HL.ForwardSweep):
    """The forward sweep under the emission among the arguments (rest: scaling, emission, message)."""

    def forward(self, values, offsets, params, *rest):
        return HL.ForwardSweep(rest[1]).forward(values, offsets, params, *rest)


_score_part.sweeps = _ScoreSweep()


def _stored_covars(covars, ct: str, K: int, strict: bool = True) -> np.ndarray:
    """Covariances as assigned to ``covars_``, checked as hmmlearn's setter checks them
    (ConfigError), in the stored shape of ``ct``: spherical (K,), diag (K, d), full
    (K, d, d), tied (d, d). A spherical value may come as hmmlearn's (K, d) tiled form (or
    any (K, ...) array constant per state). ``strict=False`` checks shapes only (what an
    M-step made may be singular to rounding, which the density's jitter absorbs)."""
    try:
        cv = np.array(covars, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"covars_ must be an array of covariances for covariance_type={ct!r}.") from None
    if not np.all(np.isfinite(cv)):
        raise ConfigError("covars_ must be finite.")
    if ct == "spherical":
        if cv.ndim == 0 or len(cv) != K:
            raise ConfigError("'spherical' covars have length n_components")
        flat = cv.reshape(K, -1)
        if flat.shape[1] == 0 or (strict and np.any(flat <= 0)):
            raise ConfigError("'spherical' covars must be positive")
        if not np.all(flat == flat[:, :1]):
            raise ConfigError("'spherical' covars hold one variance per state: shape (n_components,), or "
                              "(n_components, n_features) with equal entries in each row")
        return flat[:, 0].copy()
    if ct == "diag":
        if cv.ndim != 2:
            raise ConfigError("'diag' covars must have shape (n_components, n_dim)")
        if strict and np.any(cv <= 0):
            raise ConfigError("'diag' covars must be positive")
        return cv
    mats = cv[None] if ct == "tied" and cv.ndim == 2 else cv
    if mats.ndim != 3 or mats.shape[1] != mats.shape[2]:
        raise ConfigError("'tied' covars must have shape (n_dim, n_dim)" if ct == "tied"
                          else "'full' covars must have shape (n_components, n_dim, n_dim)")
    for k, c in enumerate(mats if strict else ()):
        if not np.allclose(c, c.T) or np.any(np.linalg.eigvalsh(c) <= 0):
            raise ConfigError("'tied' covars must be symmetric, positive-definite" if ct == "tied"
                              else f"component {k} of 'full' covars must be symmetric, positive-definite")
    return cv
