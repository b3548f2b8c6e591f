"""``GMMHMM``: hmmlearn's HMM with Gaussian-mixture emissions, fitted by Baum-Welch over partitions.

A thin face over :mod:`emflow.models.gmm_hmm` (the math) and the HMM estimator base:
hmmlearn's constructor parameters and attributes (``n_mix``, ``covariance_type``,
``weights_`` (n_components, n_mix), ``means_`` (n_components, n_mix, n_features),
``covars_`` by covariance type, priors with hmmlearn's defaults, ``params`` /
``init_params`` letters "s", "t", "m", "c", "w"), plus emflow's execution parameters.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_choice, check_int, check_real
from ..storage.data import DEFAULT_PARTITION_BYTES, SQUARE_LIMIT
from ..errors import DataError, FeatureMismatchError, ConfigError
from ._hmm_driver import BaseDriverHMM
from .hmm import GaussianHMM, _BaseHMM, _moments, _take_steps
from ..models import gmm_hmm as GH
from ..models import hmm as H
from ..models.hmm_emissions import BaumWelch
from ..stats import require_finite

__all__ = ["GMMHMM"]


class GMMHMM(BaseDriverHMM, _BaseHMM):
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
                 init_params: str = "stmcw", implementation: str = "log", *, scheduler=None, persist="auto",
                 split_every: int = 8, partition_bytes: int = DEFAULT_PARTITION_BYTES):
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
        check_int("n_mix", self.n_mix, 1)
        check_choice("covariance_type", self.covariance_type, H.COVARIANCE_TYPES)
        check_choice("implementation", self.implementation, ("log", "scaling"))
        check_real("min_covar", self.min_covar, 0, finite=True)

    def _priors(self) -> GH.GMMHMMPriors:
        return GH.GMMHMMPriors(self.weights_prior, self.means_prior, self.means_weight, self.covars_prior,
                               self.covars_weight)

    def _family(self):
        em = GH.GMMEmission(self.n_mix, self.covariance_type, self._priors(), self.params)
        return BaumWelch(em, H.TransitionPriors(self.startprob_prior, self.transmat_prior), self.params)

    def _em_family(self):
        return self._family()

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

    def _prepare_data(self, engine, loaded):
        K, M, d = self.n_components, self.n_mix, loaded.data.n_features
        try:
            GH.resolve_priors(self._priors(), self.covariance_type, K, M, d)
        except ValueError as exc:
            raise ConfigError(f"The priors (weights_prior, means_prior, means_weight, covars_prior, covars_weight) "
                              f"must broadcast to hmmlearn's shapes for n_components={K}, n_mix={M}, "
                              f"n_features={d}: {exc}.") from None
        if loaded.data.n_rows < 2 and ("c" in self.init_params or "m" in self.init_params):
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
        sp, tm = self._transition_init(rng, K)
        sp = sp if sp is not None else self._current("startprob_", "s")
        tm = tm if tm is not None else self._current("transmat_", "t")
        cv = None
        if "m" in self.init_params:
            centers = GaussianHMM._kmeans(self, engine, loaded, rng)  # the state centres, out of core
            cv = self._data_covariance(engine, loaded, centers.mean(axis=0))
            means = GH.initial_mixture_means(self._sample(engine, loaded, rng), centers, M, cv, rng)
        else:
            means = self._current("means_", "m")
        if "w" in self.init_params:
            weights = np.full((K, M), 1.0 / M)
        else:
            weights = self._current("weights_", "w")
        if "c" in self.init_params:
            cv = cv if cv is not None else self._data_covariance(engine, loaded, means.reshape(-1, d).mean(axis=0))
            covars = GH.initial_covars(cv, ct, K, M)
        else:
            covars = self._current("covars_", "c")
        self._check_prob("startprob_", np.asarray(sp), (K,))
        self._check_prob("transmat_", np.asarray(tm), (K, K))
        self._check_prob("weights_", weights, (K, M))
        if means.shape != (K, M, d):
            raise ConfigError(f"means_ must have shape (n_components, n_mix, n_features) = {(K, M, d)}, "
                              f"got {means.shape}.")
        want = GH.covars_shape(ct, K, M, d)
        if covars.shape != want:
            raise ConfigError(f"covars_ for covariance_type={ct!r} must have shape {want}, got {covars.shape}.")
        return GH.GMMHMMParams(np.asarray(sp, dtype=np.float64), np.asarray(tm, dtype=np.float64), weights, means,
                               covars, ct)

    def _sample(self, engine, loaded, rng) -> np.ndarray:
        """A uniform sample of the steps, in memory (at most ``SAMPLE_STEPS`` or 50 per component)."""
        from .hmm import SAMPLE_STEPS

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

    def _params(self) -> GH.GMMHMMParams:
        f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        return GH.GMMHMMParams(f(self.startprob_), f(self.transmat_), f(self.weights_), f(self.means_),
                               f(self.covars_), self.covariance_type)

    def _set_params(self, p: GH.GMMHMMParams):
        self.startprob_, self.transmat_ = p.startprob, p.transmat
        self.weights_, self.means_, self.covars_ = p.weights, p.means, p.covars
        self.n_features = int(p.means.shape[-1])

    def _n_parameters(self) -> int:
        return self._family().n_free(self.n_components, self.means_.shape[-1])

    def _arrays(self):
        return {"startprob": self.startprob_, "transmat": self.transmat_, "weights": self.weights_,
                "means": self.means_, "covars": self.covars_}

    @staticmethod
    def _emission_spec(meta, K, d):
        M, ct = int(meta["config"]["n_mix"]), meta["config"]["covariance_type"]
        return {"weights": ((K, M), ["simplex"]), "means": ((K, M, d), []),
                "covars": (GH.covars_shape(ct, K, M, d), ["spd"] if ct in ("full", "tied") else ["positive"])}

    def _restore(self, arrays, fitted):
        self._set_params(GH.GMMHMMParams(arrays["startprob"], arrays["transmat"], arrays["weights"],
                                         arrays["means"], arrays["covars"], self.covariance_type))
