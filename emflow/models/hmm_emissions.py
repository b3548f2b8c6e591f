"""HMM emissions as components, and Baum-Welch written once over them.

An emission component (as hmmlearn's ``_emissions.py`` mixins and dynamax's
``HMMEmissions``) is a frozen, picklable dataclass that knows one kind of observation
density and nothing about states' dynamics::

    obs    = emission.observations(values, params)       # validated, float64 or int64
    log_b  = emission.log_likelihood(obs, params)        # (n, K)
    em     = emission.stats(obs, posteriors, params)     # additive NamedTuple of float64 sums
    params, report = emission.m_step(hmm_stats, params)  # emission fields re-estimated
    emission.n_free(K, d)
    emission.sample(state, rng, params)                  # one draw, hmmlearn's stream
    emission.sample_many(states, rng, params)            # vectorised over a state path

An HMM's parameters are a NamedTuple ``(startprob, transmat, *emission fields)`` and its
statistics a NamedTuple ``(start, trans, *emission statistics, loglik, n_sequences,
n_steps)`` (``emission.stats_type``): every field is a float64 sum, so the statistics of
two partitions of whole sequences add field-wise (:func:`emflow.stats.add`).
:class:`BaumWelch` is the EM family (``e_step`` / ``m_step`` / ``objective``) of any
emission; :func:`emission_for` finds the default component of a parameter value (each
component class registers its ``params_type`` when it is defined, so a new emission needs
no table edited anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from . import hmm as H
from . import online as O

__all__ = [
    "Emission",
    "GaussianEmission",
    "GaussianEmissionStats",
    "CategoricalEmission",
    "CategoricalEmissionStats",
    "BaumWelch",
    "emission_for",
    "e_step",
    "m_step",
    "n_free",
    "sample_states",
    "uniform",
]

_BY_PARAMS: dict[type, type] = {}


def _scalar(v) -> np.ndarray:
    return np.asarray(float(v))


class Emission:
    """Base class of emission components (subclasses are frozen dataclasses).

    Class attributes a component declares: ``params_type`` (the HMM parameter NamedTuple,
    ``startprob`` and ``transmat`` first), ``stats_type`` (the HMM statistics NamedTuple,
    ``start`` and ``trans`` first, ``loglik``, ``n_sequences``, ``n_steps`` last) and
    ``letters`` (hmmlearn's ``params`` letters of its parameters, e.g. ``"mc"``).
    """

    params_type: ClassVar[type]
    stats_type: ClassVar[type]
    letters: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "params_type" in cls.__dict__:
            _BY_PARAMS[cls.params_type] = cls

    @classmethod
    def for_params(cls, params) -> "Emission":
        """The component (default priors) whose structure matches ``params``."""
        return cls()

    def observations(self, values, params) -> np.ndarray:
        """``values`` validated and converted for :meth:`log_likelihood` (original row order)."""
        return np.asarray(values, dtype=np.float64)

    def log_likelihood(self, X, params) -> np.ndarray:
        """Log emission density of each step under each state: ndarray of shape (n, K)."""
        raise NotImplementedError

    def log_likelihood_and_cache(self, X, params) -> tuple[np.ndarray, Any]:
        """:meth:`log_likelihood` and whatever :meth:`stats` can reuse (default: nothing)."""
        return self.log_likelihood(X, params), None

    def stats(self, X, posteriors, params, cache=None) -> tuple:
        """Additive emission statistics of ``X`` weighted by ``posteriors`` (n, K);
        ``cache`` is what :meth:`log_likelihood_and_cache` returned for the same ``X``."""
        raise NotImplementedError

    def m_step(self, stats, params) -> tuple[Any, dict]:
        """``(params, report)``: emission fields re-estimated from summed HMM statistics."""
        raise NotImplementedError

    def n_free(self, K: int, d: int) -> int:
        """Free scalar parameters of the emissions of ``K`` states over ``d`` features."""
        raise NotImplementedError

    def online_move(self, stats, about, params):
        """HMM statistics taken about the parameters ``about`` re-expressed about ``params``
        (stepwise EM, :mod:`emflow.models.online`); default: they do not depend on them."""
        return stats

    def sample(self, state: int, rng, params) -> np.ndarray:
        """One observation from ``state``, drawn as hmmlearn's ``_generate_sample_from_state``
        draws it (so a ``numpy.random.RandomState`` gives hmmlearn's stream)."""
        raise NotImplementedError

    def sample_many(self, states, rng: np.random.Generator, params) -> np.ndarray:
        """One observation per entry of ``states`` (ndarray of shape (n,)), vectorised: shape (n, d)."""
        raise NotImplementedError


def uniform(rng) -> float:
    """One uniform draw from a ``RandomState`` (``rand``, as hmmlearn) or a ``Generator``."""
    return rng.rand() if isinstance(rng, np.random.RandomState) else rng.random()


def emission_for(params) -> Emission:
    """The default emission component of an HMM parameter value (registry by type)."""
    try:
        cls = _BY_PARAMS[type(params)]
    except KeyError:
        raise TypeError(f"No HMM emission component is registered for {type(params).__name__}.") from None
    return cls.for_params(params)


# -- Baum-Welch over any emission ------------------------------------------------------
def e_step(values, offsets, params, emission: Emission):
    """Baum-Welch E-step over one partition of whole sequences.

    Parameters
    ----------
    values : ndarray of shape (n, d)
    offsets : ndarray of shape (S + 1,)
        Partition-local offsets (``offsets[0] == 0``).
    params : the emission's ``params_type``
    emission : Emission

    Returns
    -------
    emission.stats_type
    """
    kern = H._kernel()
    if kern is not None:  # compiled recursions, rows in their own order (no time-major layout)
        X = emission.observations(values, params)
        log_b, cache = emission.log_likelihood_and_cache(X, params)
        status, loglik, gamma, start, trans = kern.forward_backward(log_b, offsets, params.startprob,
                                                                    params.transmat)
        H._check_status(status)
        em = emission.stats(X, gamma, params, cache)
        return emission.stats_type(start, trans, *em, _scalar(loglik.sum()), _scalar(len(loglik)),
                                   _scalar(len(X)))
    layout = H.Layout(offsets)
    X = emission.observations(values, params)[layout.perm]
    log_b, cache = emission.log_likelihood_and_cache(X, params)
    fb = H.forward_backward(log_b, layout, params.startprob, params.transmat)
    em = emission.stats(X, fb.gamma, params, cache)
    return emission.stats_type(fb.start, fb.trans, *em, _scalar(fb.loglik.sum()),
                               _scalar(layout.n_sequences), _scalar(layout.n_steps))


def m_step(stats, params, emission: Emission, trans_priors: H.TransitionPriors, learn: str):
    """Baum-Welch M-step (hmmlearn's): transitions, then the emission's fields.

    Returns ``(params, report)``; ``report["log_prob"]`` is the E-step's total log-likelihood.
    """
    sp, tm, report = H.m_step_transitions(stats, params.startprob, params.transmat, trans_priors, learn)
    new, rep = emission.m_step(stats, params)
    report.update(rep)
    report["log_prob"] = float(stats.loglik)
    return new._replace(startprob=sp, transmat=tm), report


def n_free(K: int, d: int, emission: Emission) -> int:
    """Free scalar parameters of an HMM (start and transition probabilities included)."""
    return (K - 1) + K * (K - 1) + emission.n_free(K, d)


def sample_states(startprob, transmat, n_steps: int, rng: np.random.Generator, currstate=None) -> np.ndarray:
    """A state path of ``n_steps`` steps (one uniform draw per step)."""
    sp = np.asarray(startprob, dtype=np.float64)
    A = np.asarray(transmat, dtype=np.float64)
    K = len(sp)
    states = np.empty(n_steps, dtype=np.int64)
    u = rng.random(n_steps)
    cdfA = np.cumsum(A, axis=1)
    s = int(np.searchsorted(np.cumsum(sp), u[0] * sp.sum(), side="right")) if currstate is None else int(currstate)
    states[0] = min(s, K - 1)
    for t in range(1, n_steps):
        states[t] = min(int(np.searchsorted(cdfA[states[t - 1]], u[t] * cdfA[states[t - 1], -1], side="right")), K - 1)
    return states


@dataclass(frozen=True, eq=False)
class BaumWelch:
    """EM family of an HMM with the given emission (for :func:`emflow.em.run_em`).

    Parameters
    ----------
    emission : Emission
    trans_priors : TransitionPriors
    params : str
        hmmlearn's letters of the parameters to learn ("s", "t" and the emission's).
    """

    emission: Emission
    trans_priors: H.TransitionPriors = field(default_factory=H.TransitionPriors)
    params: str = "st"

    def e_step(self, values, offsets, p, link=None):
        """Statistics of a partition of whole sequences, or, with ``link`` (its boundary
        messages), of one slice of a cut sequence (:mod:`emflow.models.hmm_long`)."""
        if link is not None:
            from .hmm_long import slice_e_step

            return slice_e_step(values, p, self.emission, link)
        return e_step(values, offsets, p, self.emission)

    @property
    def sweeps(self):
        """The boundary-message sweeps of :meth:`e_step` over a cut sequence."""
        from .hmm_long import Sweeps

        return Sweeps(self.emission)

    def m_step(self, stats, p):
        return m_step(stats, p, self.emission, self.trans_priors, self.params)

    def objective(self, stats) -> float:
        """Mean log-likelihood per step."""
        return float(stats.loglik) / float(stats.n_steps)

    def n_free(self, K: int, d: int) -> int:
        return n_free(K, d, self.emission)

    def online_move(self, stats, about, p):
        """Running statistics moved from ``about`` to ``p`` (the emission's :meth:`Emission.online_move`)."""
        return self.emission.online_move(stats, about, p)


# -- Gaussian and categorical emissions (the math of models/hmm.py) -------------------
class GaussianEmissionStats(NamedTuple):
    """``post`` (K,), ``s1`` (K, d) and ``s2`` of :class:`~emflow.models.hmm.GaussianHMMStats`."""

    post: np.ndarray
    s1: np.ndarray
    s2: np.ndarray


@dataclass(frozen=True, eq=False)
class GaussianEmission(Emission):
    """Gaussian emissions (hmmlearn's ``GaussianHMM``); moments about ``shift_of(params)``.

    Parameters
    ----------
    covariance_type : {"spherical", "diag", "full", "tied"}
    priors : GaussianPriors
    params : str
        hmmlearn's letters to learn; this component reads "m" and "c".
    compute_dtype : {"float64", "float32"}
        Precision of the log-density arithmetic (the result, and every statistic, is float64).
    """

    params_type: ClassVar[type] = H.GaussianHMMParams
    stats_type: ClassVar[type] = H.GaussianHMMStats
    letters: ClassVar[str] = "mc"

    covariance_type: str = "diag"
    priors: H.GaussianPriors = field(default_factory=H.GaussianPriors)
    params: str = "mc"
    compute_dtype: str = "float64"

    @classmethod
    def for_params(cls, params) -> "GaussianEmission":
        return cls(covariance_type=params.covariance_type)

    def log_likelihood(self, X, params):
        if self.compute_dtype == "float32":
            return _gaussian_log_prob_f32(X, params)
        return H.gaussian_log_prob(X, params)

    def stats(self, X, posteriors, params, cache=None):
        g = H.shift_of(params)
        Xc = X - g
        gam = posteriors
        post = gam.sum(axis=0)
        s1 = gam.T @ Xc
        if params.covariance_type in ("full", "tied"):
            K, d = s1.shape
            s2 = np.empty((K, d, d))
            for k in range(K):
                s2[k] = (Xc * gam[:, k : k + 1]).T @ Xc
        else:
            s2 = gam.T @ (Xc * Xc)
        return GaussianEmissionStats(post, s1, s2)

    def online_move(self, stats, about, params):
        delta = H.shift_of(about) - H.shift_of(params)
        return O.recenter(stats, delta, "post", "outer" if np.ndim(stats.s2) == 3 else "elementwise")

    def m_step(self, stats, params):
        # m_step_gaussian without "s"/"t" leaves the transitions as they are
        learn = "".join(c for c in self.params if c in self.letters)
        return H.m_step_gaussian(stats, params, self.priors, H.TransitionPriors(), learn)

    def n_free(self, K, d):
        cov = {"spherical": K, "diag": K * d, "full": K * d * (d + 1) // 2, "tied": d * (d + 1) // 2}
        return K * d + cov[self.covariance_type]

    def sample(self, state, rng, params):
        K, d = np.shape(params.means)
        full = H.full_covars(params.covars, params.covariance_type, K, d)
        return rng.multivariate_normal(params.means[state], full[state])

    def sample_many(self, states, rng, params):
        means = np.asarray(params.means, dtype=np.float64)
        K, d = means.shape
        full = H.full_covars(params.covars, params.covariance_type, K, d)
        n = len(states)
        Z = rng.standard_normal((n, d))
        X = np.empty((n, d))
        for k in range(K):
            idx = states == k
            if idx.any():
                X[idx] = means[k] + Z[idx] @ np.linalg.cholesky(full[k]).T
        return X


def _gaussian_log_prob_f32(X, params) -> np.ndarray:
    """``log N(x_t | mu_k, Sigma_k)`` with the quadratic forms in float32 (NumPy; the
    compiled E-step does the same per step): ndarray of shape (n, K), float64."""
    g = H.shift_of(params)
    ct = params.covariance_type
    K, d = np.shape(params.means)
    pc = H._precisions_cholesky(np.asarray(params.covars, dtype=np.float64), ct)
    diff = (np.asarray(X, dtype=np.float64) - g).astype(np.float32)[:, None, :] \
        - (np.asarray(params.means, dtype=np.float64) - g).astype(np.float32)
    if ct in ("full", "tied"):
        P = np.broadcast_to(pc, (K, d, d)).astype(np.float32)
        y = np.einsum("nki,kij->nkj", diff, P)
        logdet = np.log(np.diagonal(np.broadcast_to(pc, (K, d, d)), axis1=1, axis2=2)).sum(axis=1)
    else:
        pd = np.broadcast_to(pc[:, None] if ct == "spherical" else pc, (K, d))
        y = diff * pd.astype(np.float32)
        logdet = np.log(pd).sum(axis=1)
    q = (y * y).sum(axis=2, dtype=np.float32).astype(np.float64)
    return logdet - 0.5 * d * np.log(2.0 * np.pi) - 0.5 * q


class CategoricalEmissionStats(NamedTuple):
    """``obs`` (K, M) of :class:`~emflow.models.hmm.CategoricalHMMStats`."""

    obs: np.ndarray


@dataclass(frozen=True, eq=False)
class CategoricalEmission(Emission):
    """Categorical emissions over symbols ``0..M-1`` (hmmlearn's ``CategoricalHMM``).

    Parameters
    ----------
    emissionprob_prior : float or ndarray of shape (K, M)
        Dirichlet prior on each row of ``emissionprob`` (1 = none).
    params : str
        hmmlearn's letters to learn; this component reads "e".
    """

    params_type: ClassVar[type] = H.CategoricalHMMParams
    stats_type: ClassVar[type] = H.CategoricalHMMStats
    letters: ClassVar[str] = "e"

    emissionprob_prior: Any = 1.0
    params: str = "e"

    def observations(self, values, params):
        return H.check_symbols(values, np.shape(params.emissionprob)[1])

    def log_likelihood(self, X, params):
        E = np.asarray(params.emissionprob, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return np.log(E[:, X].T)

    def stats(self, X, posteriors, params, cache=None):
        K, M = np.shape(params.emissionprob)
        obs = np.zeros((M, K))
        np.add.at(obs, X, posteriors)
        return CategoricalEmissionStats(obs.T.copy())

    def m_step(self, stats, params):
        learn = "".join(c for c in self.params if c in self.letters)
        return H.m_step_categorical(stats, params, self.emissionprob_prior, H.TransitionPriors(), learn)

    def n_free(self, K, d):
        return K * (d - 1)

    def sample(self, state, rng, params):
        cdf = np.cumsum(params.emissionprob[state, :])
        return np.array([(cdf > uniform(rng)).argmax()])

    def sample_many(self, states, rng, params):
        E = np.asarray(params.emissionprob, dtype=np.float64)
        cdfE = np.cumsum(E, axis=1)
        v = rng.random(len(states))
        sym = np.array([min(int(np.searchsorted(cdfE[k], x * cdfE[k, -1], side="right")), E.shape[1] - 1)
                        for k, x in zip(states, v)], dtype=np.int64)
        return sym[:, None]
