"""``GMMHMM``: hmmlearn's HMM with Gaussian-mixture emissions, fitted by Baum-Welch over partitions.

A thin face over :mod:`emflow.models.gmm_hmm` (the math) and the HMM estimator base:
hmmlearn's constructor parameters and attributes (``n_mix``, ``covariance_type``,
``weights_`` (n_components, n_mix), ``means_`` (n_components, n_mix, n_features),
``covars_`` by covariance type, priors with hmmlearn's defaults, ``params`` /
``init_params`` letters "s", "t", "m", "c", "w"), plus emflow's execution parameters.
"""

from __future__ import annotations

import numpy as np

from ..checks import Choice, Int, Real
from ..storage.data import SQUARE_LIMIT
from ..errors import DataError, FeatureMismatchError, ConfigError
from ._hmm_base import _BaseHMM
from ._hmm_work import SAMPLE_STEPS, _moments, _take_steps
from .hmm import GaussianHMM
from ..models import gmm_hmm as GH
from ..models import hmm as H
from ..models.hmm_emissions import BaumWelch
from ..stats import require_finite

__all__ = ["GMMHMM"]


class GMMHMM(_BaseHMM):
    """Hidden Markov model with Gaussian-mixture emissions, fitted out of core.

    Parameters follow :class:`hmmlearn.hmm.GMMHMM` (same names, defaults and priors),
    plus emflow's execution parameters.

    Parameters
    ----------
    n_components : int, default 1
        Number of states.
    n_mix : int, default 1
        Gaussians in each state's mixture.
    min_covar : float, default 1e-3
        Added to the diagonal of the data covariance when "c" is initialised.
    startprob_prior, transmat_prior : float or array, default 1.0
    weights_prior : float or array of shape (n_components, n_mix), default 1.0
        Dirichlet prior on each state's mixture weights.
    means_prior, means_weight : float or array, default 0
        Normal prior on the means.
    covars_prior, covars_weight : float, array or None, default None
        Inverse-gamma (diag, spherical) or inverse-Wishart (full, tied) prior; None is
        hmmlearn's default for the covariance type.
    algorithm : {"viterbi", "map"}, default "viterbi"
    covariance_type : {"diag", "spherical", "full", "tied"}, default "diag"
        "tied": the mixture components of a state share one full matrix (hmmlearn's meaning).
    random_state, n_iter, tol, verbose
        As :class:`~emflow.GaussianHMM`.
    params, init_params : str, default "stmcw"
    implementation : {"log", "scaling"}, default "log"
        Accepted for hmmlearn compatibility (the same numbers to rounding).
    scheduler, persist, split_every, partition_bytes
        As :class:`~emflow.GaussianHMM`.

    Attributes
    ----------
    startprob_, transmat_ : ndarray
    weights_ : ndarray of shape (n_components, n_mix)
    means_ : ndarray of shape (n_components, n_mix, n_features)
    covars_ : ndarray
        (n_components, n_mix) spherical, (n_components, n_mix, n_features) diag,
        (n_components, n_mix, n_features, n_features) full, (n_components, n_features,
        n_features) tied.
    n_features : int
    monitor_, history_, converged_, n_iter_, lower_bound_, fit_info_

    Notes
    -----
    ``bic`` / ``aic`` count ``n_components * (n_mix - 1)`` free mixture weights;
    hmmlearn 0.3 counts ``n_mix - 1`` in all, so its criteria are lower by
    ``(n_components - 1) * (n_mix - 1)`` parameters' worth.
    """

    _family_name = family = "gmm_hmm"
    params_type = GH.GMMHMMParams
    fitted = {"startprob": "startprob_", "transmat": "transmat_", "weights": "weights_", "means": "means_",
              "covars": "covars_"}
    _emission_letters = "mcw"
    _max_magnitude = SQUARE_LIMIT

    def __init__(self, n_components: int = 1, n_mix: int = 1, min_covar: float = 1e-3, startprob_prior=1.0,
                 transmat_prior=1.0, weights_prior=1.0, means_prior=0.0, means_weight=0.0, covars_prior=None,
                 covars_weight=None, algorithm: str = "viterbi", covariance_type: str = "diag", random_state=None,
                 n_iter: int = 10, tol: float = 1e-2, verbose: bool = False, params: str = "stmcw",
                 init_params: str = "stmcw", implementation: str = "log", *, n_init: int = 1, scheduler=None, persist="auto",
                 split_every: int = 8, partition_bytes: int | None = None):
        self.n_components = n_components
        self.n_mix = n_mix
        self.min_covar = min_covar
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.weights_prior = weights_prior
        self.means_prior = means_prior
        self.means_weight = means_weight
        self.covars_prior = covars_prior
        self.covars_weight = covars_weight
        self.algorithm = algorithm
        self.covariance_type = covariance_type
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

    _param_rules = {"n_mix": Int(1), "covariance_type": Choice(*H.COVARIANCE_TYPES), "min_covar": Real(0, finite=True)}

    def _priors(self) -> GH.GMMHMMPriors:
        return GH.GMMHMMPriors(self.weights_prior, self.means_prior, self.means_weight, self.covars_prior,
                               self.covars_weight)

    def _em_family(self):
        em = GH.GMMEmission(self.n_mix, self.covariance_type, self._priors(), self.params)
        return BaumWelch(em, H.TransitionPriors(self.startprob_prior, self.transmat_prior), self.params)

    @classmethod
    def _contract_example(cls, rng: np.random.Generator):
        """Two states of two-component mixtures in two dimensions, five sequences (a few KiB)."""
        truth = GH.GMMHMMParams(np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.15, 0.85]]),
                                np.array([[0.5, 0.5], [0.3, 0.7]]),
                                np.array([[[0.0, 0.0], [3.0, 0.0]], [[0.0, 4.0], [3.0, 4.0]]]),
                                np.full((2, 2, 2), 0.5), "diag")
        lengths = [60, 35, 80, 50, 45]
        X = np.concatenate([H.sample_sequence(truth, n, rng)[0] for n in lengths])
        return (X, lengths), {"n_components": 2, "n_mix": 2, "random_state": 0, "tol": 0.0}

    # hand-set parameters (hmmlearn's _check)
    def _param_attrs(self) -> tuple[str, ...]:
        return ("startprob_", "transmat_", "weights_", "means_", "covars_")

    def _emission_scalars(self, d: int) -> dict[str, int]:
        K, M = self.n_components, self.n_mix
        cov = {"spherical": K * M, "diag": K * M * d, "full": K * M * d * (d + 1) // 2,
               "tied": K * d * (d + 1) // 2}[self.covariance_type]
        return {"m": K * M * d, "c": cov, "w": K * (M - 1)}

    def _check_emissions(self) -> None:
        K, M, ct = self.n_components, self.n_mix, self.covariance_type
        try:
            means = np.array(self.means_, dtype=np.float64)
            covars = np.array(self.covars_, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError("means_ and covars_ must be arrays of numbers.") from None
        if means.ndim != 3 or means.shape[:2] != (K, M) or not np.all(np.isfinite(means)):
            raise ConfigError(f"means_ must be a finite array of shape (n_components, n_mix, n_features) = "
                              f"({K}, {M}, d), got shape {means.shape}.")
        d = means.shape[2]
        self.weights_ = self._check_prob("weights_", self.weights_, (K, M), "(n_components, n_mix)")
        want = GH.covars_shape(ct, K, M, d)
        if covars.shape != want:
            raise ConfigError(f"{ct!r} mixture covars_ must have shape {want}, got {covars.shape}.")
        if ct in ("spherical", "diag"):
            if not np.all(np.isfinite(covars) & (covars >= 0)):
                raise ConfigError(f"{ct!r} mixture covars_ must be non-negative")
        else:
            for idx in np.ndindex(covars.shape[:-2]):
                c = covars[idx]
                if not np.allclose(c, c.T) or np.linalg.eigvalsh(c).min() < 0:
                    where = f"state #{idx[0]}" + ("" if ct == "tied" else f", mixture #{idx[1]}")
                    raise ConfigError(f"Covariance of {where} is not symmetric positive semi-definite")
        self.means_, self.covars_ = means, covars
        self.n_features = self.n_features_in_ = int(d)

    def _sampler(self):
        p, em = self._get_parameters(), GH.GMMEmission(self.n_mix, self.covariance_type)
        return lambda k, rs: em.sample(k, rs, p)

    # data and the start
    def _prepare_data(self, engine, loaded):
        K, M, d = self.n_components, self.n_mix, loaded.data.n_features
        try:
            GH.resolve_priors(self._priors(), self.covariance_type, K, M, d)
        except ValueError as exc:
            raise ConfigError(f"The priors (weights_prior, means_prior, means_weight, covars_prior, covars_weight) "
                              f"must broadcast to hmmlearn's shapes for n_components={K}, n_mix={M}, "
                              f"n_features={d}: {exc}.") from None
        initialised = any(c in self.init_params or not hasattr(self, a) for c, a in (("c", "covars_"), ("m", "means_")))
        if loaded.data.n_rows < 2 and initialised:
            raise DataError("Initialising means or covariances needs at least 2 steps of data.")

    def _check_data(self, engine, loaded):
        d = loaded.data.n_features
        if d != self.means_.shape[-1]:
            raise FeatureMismatchError(
                f"The model was fitted on {self.means_.shape[-1]} feature(s) but the sequences have {d}. "
                "Apply it to data with the same columns, in the same order.")

    def _data_covariance(self, engine, loaded, g0):
        n, s1, s2 = engine.map_reduce(_moments, loaded, g0)
        require_finite((n, s1, s2), "GMM HMM initial covariance")
        n = float(n)
        cv = (s2 - np.outer(s1, s1) / n) / (n - 1) + self.min_covar * np.eye(len(g0))
        return 0.5 * (cv + cv.T)

    def _initial_params(self, engine, loaded, rng) -> GH.GMMHMMParams:
        K, M, d, ct = self.n_components, self.n_mix, loaded.data.n_features, self.covariance_type
        sp, tm = self._transition_init(rng)
        cv = None
        if self._needs_init("m", "means_"):
            centers = GaussianHMM._kmeans(self, engine, loaded, rng)  # the state centres, out of core
            cv = self._data_covariance(engine, loaded, centers.mean(axis=0))
            means = GH.initial_mixture_means(self._sample(engine, loaded, rng), centers, M, cv, rng)
        else:
            means = np.asarray(self.means_, dtype=np.float64)
        weights = np.full((K, M), 1.0 / M) if self._needs_init("w", "weights_") else self.weights_
        if self._needs_init("c", "covars_"):
            cv = cv if cv is not None else self._data_covariance(engine, loaded, means.reshape(-1, d).mean(axis=0))
            covars = GH.initial_covars(cv, ct, K, M)
        else:
            covars = self.covars_
        self._warn_if_degenerate(loaded.data.n_rows * d, d)
        self.startprob_, self.transmat_, self.weights_, self.means_, self.covars_ = sp, tm, weights, means, covars
        self._check()
        if self.n_features_in_ != d:
            raise FeatureMismatchError(f"means_ has {self.n_features_in_} feature(s) but the sequences have {d}. "
                                       "Set means_ for these data, or add 'm' to init_params.")
        return self._get_parameters()

    def _sample(self, engine, loaded, rng) -> np.ndarray:
        """A uniform sample of the steps, in memory (at most ``SAMPLE_STEPS`` or 50 per component)."""
        N = loaded.data.n_rows
        m = min(N, max(SAMPLE_STEPS, 50 * self.n_components * self.n_mix))
        idx = np.sort(rng.choice(N, size=m, replace=False))
        per = []
        for a, b in loaded.data.bounds:
            lo, hi = np.searchsorted(idx, [a, b])
            per.append(idx[lo:hi] - a)
        return np.concatenate(engine.map(_take_steps, loaded, per_partition=per))

    def _parameter_settings(self) -> dict:
        return {"covariance_type": self.covariance_type}

    def _set_parameters(self, p: GH.GMMHMMParams) -> None:
        super()._set_parameters(p)
        self.n_features = self.n_features_in_ = int(np.shape(p.means)[-1])

    @staticmethod
    def _emission_spec(meta, K):
        d = int(meta["fitted"]["n_features_in"])
        M, ct = int(meta["config"]["n_mix"]), meta["config"]["covariance_type"]
        return {"weights": ((K, M), ["simplex"]), "means": ((K, M, d), []),
                "covars": (GH.covars_shape(ct, K, M, d), ["psd"] if ct in ("full", "tied") else ["nonnegative"])}
