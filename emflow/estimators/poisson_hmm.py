"""``PoissonHMM``: hmmlearn's Poisson-emission HMM, fitted by Baum-Welch over partitions.

A thin face over :mod:`emflow.models.poisson_hmm` (the math) and the HMM estimator base:
hmmlearn's constructor parameters and attributes (``lambdas_`` (n_components,
n_features), ``lambdas_prior`` / ``lambdas_weight``, ``params`` / ``init_params`` letters
"s", "t", "l"), plus emflow's execution parameters.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_choice
from ..storage.data import DEFAULT_PARTITION_BYTES
from ..errors import ConfigError, FeatureMismatchError
from ._hmm_driver import BaseDriverHMM
from .hmm import _BaseHMM
from ..models import hmm as H
from ..models import poisson_hmm as P
from ..models.hmm_emissions import BaumWelch
from ..stats import require_finite

__all__ = ["PoissonHMM"]


def _count_moments(values, offsets):
    """Number, sum and sum of squares of all counts of a partition (hmmlearn's mean and variance of X)."""
    X = P.check_counts(values)
    return np.array([X.size, X.sum(), (X * X).sum()], dtype=np.float64)


class PoissonHMM(BaseDriverHMM, _BaseHMM):
    """Hidden Markov model with Poisson emissions, fitted out of core.

    Parameters follow :class:`hmmlearn.hmm.PoissonHMM` (same names and defaults), plus
    emflow's execution parameters.

    Parameters
    ----------
    n_components : int, default 1
        Number of states.
    startprob_prior, transmat_prior : float or array, default 1.0
        Dirichlet priors (1.0 is none).
    lambdas_prior, lambdas_weight : float or array broadcastable to (n_components, n_features), default 0
        Gamma prior on the rates (alpha, beta); 0 and 0 is none.
    algorithm : {"viterbi", "map"}, default "viterbi"
    random_state : int, Generator or None
    n_iter : int, default 10
    tol : float, default 1e-2
        Stop when the gain in total log-likelihood falls below ``tol``.
    verbose : bool, default False
    params, init_params : str, default "stl"
        s startprob, t transmat, l lambdas.
    implementation : {"log", "scaling"}, default "log"
        Accepted for hmmlearn compatibility; emflow always runs the scaled recursions
        (the same numbers to rounding).
    scheduler, persist, split_every, partition_bytes
        As :class:`~emflow.GaussianHMM`.

    Attributes
    ----------
    startprob_ : ndarray of shape (n_components,)
    transmat_ : ndarray of shape (n_components, n_components)
    lambdas_ : ndarray of shape (n_components, n_features)
    n_features : int
    monitor_, history_, converged_, n_iter_, lower_bound_, fit_info_
    """

    _family_name = family = "poisson_hmm"
    params_type = P.PoissonHMMParams
    fitted = {"startprob": "startprob_", "transmat": "transmat_", "lambdas": "lambdas_"}
    _emission_letters = "l"

    def __init__(self, n_components: int = 1, startprob_prior=1.0, transmat_prior=1.0, lambdas_prior=0.0,
                 lambdas_weight=0.0, algorithm: str = "viterbi", random_state=None, n_iter: int = 10,
                 tol: float = 1e-2, verbose: bool = False, params: str = "stl", init_params: str = "stl",
                 implementation: str = "log", *, scheduler=None, persist="auto", split_every: int = 8,
                 partition_bytes: int = DEFAULT_PARTITION_BYTES):
        self.n_components = n_components
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.lambdas_prior = lambdas_prior
        self.lambdas_weight = lambdas_weight
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.verbose = verbose
        self.params = params
        self.init_params = init_params
        self.implementation = implementation
        self.scheduler = scheduler
        self.persist = persist
        self.split_every = split_every
        self.partition_bytes = partition_bytes

    def _validate(self):
        self._validate_common()
        check_choice("implementation", self.implementation, ("log", "scaling"))
        for name in ("lambdas_prior", "lambdas_weight"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ConfigError(f"{name} must be a number or array of numbers >= 0, got {getattr(self, name)!r}.")

    def _family(self):
        em = P.PoissonEmission(self.lambdas_prior, self.lambdas_weight, self.params)
        return BaumWelch(em, H.TransitionPriors(self.startprob_prior, self.transmat_prior), self.params)

    def _em_family(self):
        return self._family()

    @classmethod
    def _contract_example(cls, rng: np.random.Generator):
        """Counts from a two-state Poisson HMM in five sequences (a few KiB)."""
        truth = P.PoissonHMMParams(np.array([0.6, 0.4]), np.array([[0.9, 0.1], [0.2, 0.8]]),
                                   np.array([[1.0, 6.0], [5.0, 0.5]]))
        lengths = [60, 35, 80, 50, 45]
        X = np.concatenate([H.sample_sequence(truth, n, rng)[0] for n in lengths]).astype(np.float64)
        return (X, lengths), {"n_components": 2, "random_state": 0, "tol": 0.0}

    def _prepare_data(self, engine, loaded):
        K, d = self.n_components, loaded.data.n_features
        for name in ("lambdas_prior", "lambdas_weight"):
            try:
                np.broadcast_to(np.asarray(getattr(self, name), dtype=np.float64), (K, d))
            except ValueError:
                raise ConfigError(f"{name} must be a number or broadcast to (n_components, n_features) = {(K, d)}, "
                                  f"got shape {np.shape(getattr(self, name))}.") from None

    def _check_data(self, engine, loaded):
        d = loaded.data.n_features
        if d != self.lambdas_.shape[1]:
            raise FeatureMismatchError(
                f"The model was fitted on {self.lambdas_.shape[1]} feature(s) but the sequences have {d}. "
                "Apply it to data with the same columns, in the same order.")

    def _initial_params(self, engine, loaded, rng) -> P.PoissonHMMParams:
        K, d = self.n_components, loaded.data.n_features
        sp, tm = self._transition_init(rng, K)
        sp = sp if sp is not None else self._current("startprob_", "s")
        tm = tm if tm is not None else self._current("transmat_", "t")
        if "l" in self.init_params:
            n, s1, s2 = engine.map_reduce(_count_moments, loaded)
            require_finite((n, s1, s2), "Poisson HMM initial rates")
            mean = s1 / n
            lam = P.initial_lambdas(mean, max(s2 / n - mean * mean, 0.0), K, d, rng)
        else:
            lam = np.atleast_2d(self._current("lambdas_", "l"))
        self._check_prob("startprob_", np.asarray(sp), (K,))
        self._check_prob("transmat_", np.asarray(tm), (K, K))
        if lam.shape != (K, d):
            raise ConfigError(f"lambdas_ must have shape (n_components, n_features) = {(K, d)}, got {lam.shape}.")
        if not np.all(np.isfinite(lam) & (lam >= 0)):
            raise ConfigError("lambdas_ must hold finite rates >= 0.")
        return P.PoissonHMMParams(np.asarray(sp, dtype=np.float64), np.asarray(tm, dtype=np.float64), lam)

    def _params(self) -> P.PoissonHMMParams:
        return P.PoissonHMMParams(np.asarray(self.startprob_, dtype=np.float64),
                                  np.asarray(self.transmat_, dtype=np.float64),
                                  np.asarray(self.lambdas_, dtype=np.float64))

    def _set_params(self, p: P.PoissonHMMParams):
        self.startprob_, self.transmat_, self.lambdas_ = p.startprob, p.transmat, p.lambdas
        self.n_features = int(p.lambdas.shape[1])

    def _n_parameters(self) -> int:
        return self._family().n_free(self.n_components, self.lambdas_.shape[1])

    def _arrays(self):
        return {"startprob": self.startprob_, "transmat": self.transmat_, "lambdas": self.lambdas_}

    @staticmethod
    def _emission_spec(meta, K, d):
        return {"lambdas": ((K, d), ["nonnegative"])}

    def _restore(self, arrays, fitted):
        self._set_params(P.PoissonHMMParams(arrays["startprob"], arrays["transmat"], arrays["lambdas"]))
