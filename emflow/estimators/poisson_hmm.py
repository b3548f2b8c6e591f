"""``PoissonHMM``: hmmlearn's Poisson-emission HMM, fitted by Baum-Welch over partitions.

A thin face over :mod:`emflow.models.poisson_hmm` (the math) and the HMM estimator base:
hmmlearn's constructor parameters and attributes (``lambdas_`` (n_components,
n_features), ``lambdas_prior`` / ``lambdas_weight``, ``params`` / ``init_params`` letters
"s", "t", "l"), plus emflow's execution parameters.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, FeatureMismatchError
from ..execution.sweeps import step_local
from ._hmm_base import _BaseHMM
from ..models import hmm as H
from ..models import poisson_hmm as P
from ..models.hmm_emissions import BaumWelch
from ..stats import require_finite

__all__ = ["PoissonHMM"]


@step_local
def _count_moments(values, offsets):
    """Number, sum and sum of squares of all counts of a partition (hmmlearn's mean and variance of X)."""
    X = P.check_counts(values)
    return np.array([X.size, X.sum(), (X * X).sum()], dtype=np.float64)


class PoissonHMM(_BaseHMM):
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
                 implementation: str = "log", *, n_init: int = 1, scheduler=None, persist="auto", split_every: int = 8,
                 partition_bytes: int | None = None):
        self.n_components = n_components
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.lambdas_prior = lambdas_prior
        self.lambdas_weight = lambdas_weight
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_init = n_init
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

    def _validate_more(self):
        super()._validate_more()
        for name in ("lambdas_prior", "lambdas_weight"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ConfigError(f"{name} must be a number or array of numbers >= 0, got {getattr(self, name)!r}.")

    def _em_family(self):
        em = P.PoissonEmission(self.lambdas_prior, self.lambdas_weight, self.params)
        return BaumWelch(em, H.TransitionPriors(self.startprob_prior, self.transmat_prior), self.params)

    @classmethod
    def _contract_example(cls, rng: np.random.Generator):
        """Counts from a two-state Poisson HMM in five sequences (a few KiB)."""
        truth = P.PoissonHMMParams(np.array([0.6, 0.4]), np.array([[0.9, 0.1], [0.2, 0.8]]),
                                   np.array([[1.0, 6.0], [5.0, 0.5]]))
        lengths = [60, 35, 80, 50, 45]
        X = np.concatenate([H.sample_sequence(truth, n, rng)[0] for n in lengths]).astype(np.float64)
        return (X, lengths), {"n_components": 2, "random_state": 0, "tol": 0.0}

    # hand-set parameters (hmmlearn's _check)
    def _param_attrs(self) -> tuple[str, ...]:
        return ("startprob_", "transmat_", "lambdas_")

    def _emission_scalars(self, d: int) -> dict[str, int]:
        return {"l": self.n_components * d}

    def _check_emissions(self) -> None:
        K = self.n_components
        try:
            lam = np.atleast_2d(np.array(self.lambdas_, dtype=np.float64))
        except (TypeError, ValueError):
            raise ConfigError("lambdas_ must be an array of shape (n_components, n_features).") from None
        if lam.ndim != 2 or lam.shape[0] != K or lam.shape[1] < 1:
            raise ConfigError(f"lambdas_ must have shape (n_components, n_features) = ({K}, d), got {lam.shape}.")
        if not np.all(np.isfinite(lam) & (lam >= 0)):
            raise ConfigError("lambdas_ must hold finite rates >= 0.")
        self.lambdas_ = lam
        self.n_features = self.n_features_in_ = int(lam.shape[1])

    def _sampler(self):
        p, em = self._get_parameters(), P.PoissonEmission()
        return lambda k, rs: em.sample(k, rs, p)

    # data and the start
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
        sp, tm = self._transition_init(rng)
        if self._needs_init("l", "lambdas_"):
            n, s1, s2 = engine.map_reduce(_count_moments, loaded)
            require_finite((n, s1, s2), "Poisson HMM initial rates")
            mean = s1 / n
            lam = P.initial_lambdas(mean, max(s2 / n - mean * mean, 0.0), K, d, rng)
        else:
            lam = self.lambdas_
        self._warn_if_degenerate(loaded.data.n_rows * d, d)
        self.startprob_, self.transmat_, self.lambdas_ = sp, tm, lam
        self._check()
        if self.n_features_in_ != d:
            raise FeatureMismatchError(f"lambdas_ has {self.n_features_in_} feature(s) but the sequences have {d}. "
                                       "Set lambdas_ for these data, or add 'l' to init_params.")
        return self._get_parameters()

    def _set_parameters(self, p: P.PoissonHMMParams) -> None:
        super()._set_parameters(p)
        self.n_features = self.n_features_in_ = int(np.shape(p.lambdas)[1])

    @staticmethod
    def _emission_spec(meta, K):
        d = int(meta["fitted"]["n_features_in"])
        return {"lambdas": ((K, d), ["nonnegative"])}
