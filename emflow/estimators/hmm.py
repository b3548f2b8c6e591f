"""Hidden Markov models fitted by Baum-Welch over partitions of many sequences.

``GaussianHMM`` and ``CategoricalHMM`` follow hmmlearn's estimators (constructor
parameters, ``startprob_`` / ``transmat_`` / ``means_`` / ``covars_`` / ``emissionprob_``,
``init_params`` / ``params`` letter strings, ``fit(X, lengths)``, ``predict``,
``predict_proba``, ``score``, ``decode``, ``sample``, ``monitor_``) plus emflow's common
surface (``scheduler``, ``persist``, ``split_every``, ``callbacks``, ``history_``,
``fit_info_``, ``save`` / ``load``).

Data: in memory as hmmlearn's ``(X, lengths)``, or a Zarr group with ``values``
(total_steps, n_features) and ``offsets`` (n_sequences + 1) (see :mod:`emflow.sequences`).
A partition is a run of whole sequences; the E-step of each partition runs on a worker
and returns additive statistics (:mod:`emflow.models.hmm`).

Conventions to know:

* A model whose parameters are assigned by hand (``startprob_``, ``transmat_``,
  ``means_`` and ``covars_``, or ``emissionprob_``) can ``sample``, ``decode``,
  ``predict``, ``score`` and ``save`` without ``fit``; the parameters are validated then
  (ConfigError, a ValueError, with hmmlearn's wording). ``fit`` initialises a parameter
  when ``init_params`` names it (overwriting a value set, with a logged warning) or when it
  is not set, and re-estimates those ``params`` names, as hmmlearn does.
* ``implementation`` is accepted as in hmmlearn; both give emflow's numbers (its
  recursions never underflow), and ``"scaling"`` fails (DataError) where hmmlearn's
  scaled recursions would: on a step whose emission probabilities all underflow to 0.
* A full (or tied) covariance whose Cholesky factorisation fails is used as
  ``Sigma + 1e-7 I`` in the densities, as hmmlearn's density does, so near-degenerate data
  fit on instead of failing.
* ``score`` returns the *total* log-likelihood of all sequences, as hmmlearn does
  (``GaussianMixture.score`` is a mean per row, as scikit-learn does).
* ``tol`` applies to the total log-likelihood, as in hmmlearn; ``history_`` holds the mean
  log-likelihood per step (emflow's convention) and ``monitor_.history`` the totals.
"""

from __future__ import annotations

import numpy as np

from ._hmm_base import _BaseHMM
from ._hmm_work import (MAX_EMISSION_BYTES, SAMPLE_STEPS, KMEANS_MAX_ITER, KMEANS_TOL, CategoricalHMMFamily,
                        ConvergenceMonitor, GaussianHMMFamily, _km_e_step, _moments, _observed_step_sums,
                        _stored_covars, _symbol_range, _take_steps)
from .mixture_missing import MISSING, _FillingEngine
from ..models.hmm_missing import MissingGaussianEmission
from ..checks import Choice, Int, Real, check_choice
from ..storage.data import SQUARE_LIMIT
from ..errors import ConfigError, DataError, FeatureMismatchError
from ..models import hmm as H
from ..models import kmeans as KM
from ..stats import require_finite

__all__ = ["GaussianHMM", "CategoricalHMM", "ConvergenceMonitor", "GaussianHMMFamily", "CategoricalHMMFamily"]


class GaussianHMM(_BaseHMM):
    """Hidden Markov model with Gaussian emissions, fitted out of core.

    Parameters follow :class:`hmmlearn.hmm.GaussianHMM` (same names and defaults, priors
    included), plus emflow's execution parameters.

    Parameters
    ----------
    n_components : int, default 1
        Number of states.
    covariance_type : {"diag", "full", "spherical", "tied"}, default "diag"
    min_covar : float, default 1e-3
        Added to the diagonal of the data covariance when ``"c"`` is initialised.
    startprob_prior, transmat_prior : float or array, default 1.0
        Dirichlet priors (1.0 is none).
    means_prior, means_weight : float or array, default 0
        Normal prior on the means.
    covars_prior, covars_weight : float or array, default 1e-2 and 1
        Inverse-gamma (diag, spherical) or inverse-Wishart (full, tied) prior; as in
        hmmlearn, the scalar ``covars_prior`` is added to every entry.
    algorithm : {"viterbi", "map"}, default "viterbi"
        Decoder used by ``predict``.
    random_state : int, Generator or None
    n_iter : int, default 10
        Maximum number of EM iterations.
    n_init : int, default 1
        Initialisations (keyword only; an emflow addition to hmmlearn's API): the one with the
        best log-likelihood is kept, as scikit-learn's mixtures do.
    tol : float, default 1e-2
        Stop when the gain in total log-likelihood falls below ``tol``.
    verbose : bool, default False
    params, init_params : str, default "stmc"
        Letters of the parameters to learn / to initialise: s startprob, t transmat,
        m means, c covars. Parameters not initialised must be set on the estimator
        (``model.means_ = ...``) before ``fit``.
    implementation : {"log", "scaling"}, default "log"
        hmmlearn's choice of recursions; see the module notes.
    scheduler : None, "threads", "local", address or distributed.Client
    persist : "auto", True or False
    split_every : int, default 8
    partition_bytes : int or None
        Target bytes of values per partition (a partition holds whole sequences); None is
        the library default.
    missing : {"error", "marginalize"}, default "error"
        NaN is bad data (NonFiniteDataError), or a value missing at random: exact EM
        (Ghahramani & Jordan 1994) where a step's emission density is the marginal density
        of its observed coordinates and the M-step uses the conditional expectations of the
        missing ones given the state. A step with every value missing has emission density
        1 (the transition still runs) and adds nothing to the emission statistics.
        ``predict``, ``predict_proba``, ``decode`` and ``score`` marginalise the same way;
        the initialisation (k-means, data covariance) sees each NaN replaced by its
        column's mean over the observed values. (keyword only; an emflow addition)
    compute_dtype : {"float64", "float32"}, default "float64"
        Precision of the emission log-densities during fitting (the quadratic forms;
        keyword only, an emflow addition). The forward-backward recursions and every
        statistic stay float64; ``"float32"`` changes the log-likelihood by about 1e-7
        relative. Not with ``missing="marginalize"``.

    Attributes
    ----------
    startprob_ : ndarray of shape (n_components,)
    transmat_ : ndarray of shape (n_components, n_components)
    means_ : ndarray of shape (n_components, n_features)
    covars_ : ndarray of shape (n_components, n_features, n_features)
        Full matrices, as hmmlearn returns them; the stored form (shape by
        ``covariance_type``) is ``_covars_``. Assign either form's hmmlearn input shape.
    monitor_ : ConvergenceMonitor
    history_ : list of float
        Mean log-likelihood per step, per iteration.
    converged_, n_iter_, lower_bound_, fit_info_
    n_features, n_features_in_ : int
        Number of features (columns of X).
    """

    _family_name = family = "gaussian_hmm"
    params_type = H.GaussianHMMParams
    fitted = {"startprob": "startprob_", "transmat": "transmat_", "means": "means_", "covars": "_covars_"}
    _emission_letters = "mc"
    _max_magnitude = SQUARE_LIMIT

    def __init__(self, n_components: int = 1, covariance_type: str = "diag", min_covar: float = 1e-3,
                 startprob_prior=1.0, transmat_prior=1.0, means_prior=0, means_weight=0,
                 covars_prior=1e-2, covars_weight=1, algorithm: str = "viterbi", random_state=None,
                 n_iter: int = 10, tol: float = 1e-2, verbose: bool = False, params: str = "stmc",
                 init_params: str = "stmc", implementation: str = "log", *, n_init: int = 1, scheduler=None, persist="auto",
                 split_every: int = 8, partition_bytes: int | None = None, missing: str = "error",
                 compute_dtype: str = "float64"):
        self.n_components = n_components
        self.compute_dtype = compute_dtype
        self.covariance_type = covariance_type
        self.missing = missing
        self.min_covar = min_covar
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.means_prior = means_prior
        self.means_weight = means_weight
        self.covars_prior = covars_prior
        self.covars_weight = covars_weight
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

    @property
    def covars_(self) -> np.ndarray:
        return H.full_covars(self._covars_, self.covariance_type, self.n_components, self.means_.shape[1])

    @covars_.setter
    def covars_(self, covars) -> None:
        check_choice("covariance_type", self.covariance_type, H.COVARIANCE_TYPES)
        self._covars_ = _stored_covars(covars, self.covariance_type, self.n_components)

    _param_rules = {"covariance_type": Choice(*H.COVARIANCE_TYPES), "min_covar": Real(0, finite=True),
                    "missing": Choice(*MISSING)}

    def _validate_more(self):
        super()._validate_more()
        if self.compute_dtype == "float32" and self.missing == "marginalize":
            raise ConfigError("compute_dtype='float32' is for missing='error'; with missing='marginalize' "
                              "use compute_dtype='float64'.")

    @property
    def _allow_nan(self) -> bool:
        return getattr(self, "missing", "error") == "marginalize"

    def _allows_nan(self) -> bool:  # the declaration the CLI and the flows read
        return self._allow_nan

    @property
    def _apply_emission(self):
        return MissingGaussianEmission() if self._allow_nan else None

    def _em_family(self):
        pri = H.GaussianPriors(self.means_prior, self.means_weight, self.covars_prior, self.covars_weight)
        return GaussianHMMFamily(pri, H.TransitionPriors(self.startprob_prior, self.transmat_prior), self.params,
                                 self._scaling, self._allow_nan, self.compute_dtype)

    def _param_attrs(self) -> tuple[str, ...]:
        return ("startprob_", "transmat_", "means_", "_covars_")

    def _emission_scalars(self, d: int) -> dict[str, int]:
        K = self.n_components
        cov = {"spherical": K, "diag": K * d, "full": K * d * (d + 1) // 2, "tied": d * (d + 1) // 2}
        return {"m": K * d, "c": cov[self.covariance_type]}

    def _check_emissions(self) -> None:
        K, ct = self.n_components, self.covariance_type
        means = np.array(self.means_, dtype=np.float64)
        if means.ndim != 2 or len(means) != K or not np.all(np.isfinite(means)):
            raise ConfigError(f"means_ must be a finite array of shape (n_components, n_features) = ({K}, d), "
                              f"got shape {means.shape}.")
        d = means.shape[1]
        cov = _stored_covars(self._covars_, ct, K, strict=False)
        want = {"spherical": (K,), "diag": (K, d), "full": (K, d, d), "tied": (d, d)}[ct]
        if cov.shape != want:
            raise ConfigError(f"covars_ for covariance_type={ct!r} must have shape {want} (n_features={d} from "
                              f"means_), got {cov.shape}.")
        self.means_, self._covars_ = means, cov
        self.n_features = self.n_features_in_ = d

    def _sampler(self):
        means, full = self.means_, self.covars_
        return lambda k, rs: rs.multivariate_normal(means[k], full[k])

    def _prepare_data(self, engine, loaded):
        if loaded.data.n_rows < 2 and self._needs_init("c", "covars_", "_covars_"):
            raise DataError("Initialising covariances needs at least 2 steps of data.")

    def _check_data(self, engine, loaded):
        d = loaded.data.n_features
        if d != self.means_.shape[1]:
            raise FeatureMismatchError(
                f"The model was fitted on {self.means_.shape[1]} feature(s) but the sequences have {d}. "
                "Apply it to data with the same columns, in the same order.")

    def _initial_params(self, engine, loaded, rng) -> H.GaussianHMMParams:
        K, d, ct = self.n_components, loaded.data.n_features, self.covariance_type
        if self._allow_nan:  # the starts see each NaN replaced by its column's observed mean
            sums = engine.map_reduce(_observed_step_sums, loaded)
            engine = _FillingEngine(engine, np.divide(sums[0], sums[1], out=np.zeros(d), where=sums[1] > 0))
        sp, tm = self._transition_init(rng)
        means = self._kmeans(engine, loaded, rng) if self._needs_init("m", "means_") else self.means_
        if self._needs_init("c", "covars_", "_covars_"):
            g0 = np.asarray(means, dtype=np.float64).mean(axis=0)
            n, s1, s2 = engine.map_reduce(_moments, loaded, g0)
            require_finite((n, s1, s2), "Gaussian HMM initial covariance")
            n = float(n)
            cv = (s2 - np.outer(s1, s1) / n) / (n - 1) + self.min_covar * np.eye(d)
            cv = 0.5 * (cv + cv.T)
            covars = {"full": lambda: np.tile(cv, (K, 1, 1)), "tied": lambda: cv,
                      "diag": lambda: np.tile(np.diag(cv), (K, 1)),
                      "spherical": lambda: np.full(K, np.diag(cv).mean())}[ct]()
        else:
            covars = self._covars_
        self._warn_if_degenerate(loaded.data.n_rows * d, d)
        self.startprob_, self.transmat_, self.means_, self._covars_ = sp, tm, means, covars
        self._check()
        if self.n_features_in_ != d:
            raise FeatureMismatchError(f"means_ has {self.n_features_in_} feature(s) but the sequences have {d}. "
                                       "Set means_ for these data, or add 'm' to init_params.")
        return self._get_parameters()

    def _kmeans(self, engine, loaded, rng) -> np.ndarray:
        K = self.n_components
        N = loaded.data.n_rows
        if N < K:
            raise DataError(f"The sequences hold {N} steps in all, fewer than n_components={K}.")
        m = min(N, max(SAMPLE_STEPS, 50 * K))
        idx = np.sort(rng.choice(N, size=m, replace=False))
        per = []
        for a, b in loaded.data.bounds:
            lo, hi = np.searchsorted(idx, [a, b])
            per.append(idx[lo:hi] - a)
        Xs = np.concatenate(engine.map(_take_steps, loaded, per_partition=per))
        centers = Xs[KM.kmeans_plusplus(Xs, K, rng)]
        var = float(Xs.var(axis=0).mean()) if len(Xs) > 1 else 0.0
        for _ in range(KMEANS_MAX_ITER):
            shift = centers.mean(axis=0)
            st = engine.map_reduce(_km_e_step, loaded, centers, shift)
            new, _ = KM.m_step(st, centers, shift)
            moved = float(np.sum((new - centers) ** 2))
            centers = new
            if moved <= KMEANS_TOL * var:
                break
        return centers

    def _parameter_settings(self) -> dict:
        return {"covariance_type": self.covariance_type}

    @classmethod
    def _contract_example(cls, rng: np.random.Generator) -> tuple[tuple, dict]:
        from ..storage.synthetic import make_hmm_params, sample_hmm

        lengths = [60, 35, 80, 50, 45]
        X, _ = sample_hmm(make_hmm_params(2, 2, "gaussian", "diag", seed=1), lengths, rng)
        return (X, lengths), {"n_components": 2, "covariance_type": "diag", "random_state": 0, "tol": 0.0}

    def _set_parameters(self, p: H.GaussianHMMParams) -> None:
        super()._set_parameters(p)
        self.n_features = self.n_features_in_ = int(np.shape(p.means)[1])

    def _n_parameters(self) -> int:
        return H.n_free_parameters(self.n_components, self.means_.shape[1], "gaussian", self.covariance_type)

    @staticmethod
    def _emission_spec(meta, K):
        fitted = meta["fitted"]  # saves before n_features_in call it n_features
        d = int(fitted["n_features_in"] if "n_features_in" in fitted else fitted["n_features"])
        ct = meta["config"]["covariance_type"]
        cov = {"full": (K, d, d), "tied": (d, d), "diag": (K, d), "spherical": (K,)}[ct]
        # what the densities can use: positive semi-definite to rounding (a failed Cholesky
        # factorisation is retried with 1e-7 added to the diagonal, as hmmlearn does)
        return {"means": ((K, d), []), "covars": (cov, ["psd"] if ct in ("full", "tied") else ["nonnegative"])}


class CategoricalHMM(_BaseHMM):
    """Hidden Markov model with categorical emissions (symbols ``0..n_features-1``), fitted out of core.

    Parameters follow :class:`hmmlearn.hmm.CategoricalHMM`; observations have shape
    (n_samples, 1) (or (n_samples,)) and hold integers.

    Parameters
    ----------
    n_components : int, default 1
    startprob_prior, transmat_prior : float or array, default 1.0
    emissionprob_prior : float or array of shape (n_components, n_features), default 1.0
    n_features : int or None
        Number of symbols; ``None`` infers ``max symbol + 1`` from the data in one pass.
    algorithm, random_state, n_iter, tol, verbose, implementation
        As :class:`GaussianHMM`.
    params, init_params : str, default "ste"
        s startprob, t transmat, e emissionprob.
    scheduler, persist, split_every, partition_bytes
        As :class:`GaussianHMM`.

    Attributes
    ----------
    startprob_, transmat_ : ndarray
    emissionprob_ : ndarray of shape (n_components, n_features)
    monitor_, history_, converged_, n_iter_, lower_bound_, fit_info_
    """

    _family_name = family = "categorical_hmm"
    params_type = H.CategoricalHMMParams
    fitted = {"startprob": "startprob_", "transmat": "transmat_", "emissionprob": "emissionprob_"}
    _emission_letters = "e"

    def __init__(self, n_components: int = 1, startprob_prior=1.0, transmat_prior=1.0, *,
                 emissionprob_prior=1.0, n_features: int | None = None, algorithm: str = "viterbi",
                 random_state=None, n_iter: int = 10, tol: float = 1e-2, verbose: bool = False,
                 params: str = "ste", init_params: str = "ste", implementation: str = "log", n_init: int = 1,
                 scheduler=None, persist="auto", split_every: int = 8, partition_bytes: int | None = None):
        self.n_components = n_components
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.emissionprob_prior = emissionprob_prior
        self.n_features = n_features
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

    _param_rules = {"n_features": Int(1, allow_none=True)}

    def _param_attrs(self) -> tuple[str, ...]:
        return ("startprob_", "transmat_", "emissionprob_")

    def _emission_scalars(self, M: int) -> dict[str, int]:
        return {"e": self.n_components * (M - 1)}

    def _check_emissions(self) -> None:
        K = self.n_components
        try:
            E = np.atleast_2d(np.array(self.emissionprob_, dtype=np.float64))
        except (TypeError, ValueError):
            raise ConfigError("emissionprob_ must be an array of shape (n_components, n_features).") from None
        M = self.n_features if self.n_features is not None else E.shape[-1]
        if E.shape != (K, M) or M < 1:
            raise ConfigError(f"emissionprob_ must have shape (n_components, n_features) = ({K}, {M}), "
                              f"got {E.shape}.")
        self.emissionprob_ = self._check_prob("emissionprob_", E, (K, M), "(n_components, n_features)")
        self.n_features, self.n_features_in_ = int(M), 1

    def _check_and_set_n_features(self, X) -> None:
        """Check that X holds symbols 0..n_features-1 and infer n_features if unset (hmmlearn's)."""
        X = np.ravel(np.asarray(X))
        if X.dtype.kind not in "iu":
            raise DataError(f"Symbols should be integers 0..n_features-1; X has dtype {X.dtype}.")
        H.check_symbols(X, self.n_features, "X")
        if self.n_features is None:
            self.n_features = int(X.max()) + 1

    def _sampler(self):
        cdf = np.cumsum(self.emissionprob_, axis=1)
        return lambda k, rs: [int((cdf[k] > rs.rand()).argmax())]

    def _as_values(self, X):
        X = np.asarray(X)
        return X[:, None] if X.ndim == 1 else X

    def _em_family(self):
        return CategoricalHMMFamily(self.emissionprob_prior, H.TransitionPriors(self.startprob_prior, self.transmat_prior),
                                    self.params, self._scaling)

    def _symbols_seen(self, engine, loaded, n_symbols=None) -> int:
        if loaded.data.n_features != 1:
            raise DataError(f"Categorical sequences must have one column (n_steps, 1); got {loaded.data.n_features}.")
        starts = [a for a, _ in loaded.data.bounds]
        ranges = engine.map(_symbol_range, loaded, n_symbols, per_partition=starts)
        return max(r[1] for r in ranges) + 1

    def _prepare_data(self, engine, loaded):
        M = self.n_features
        if M is None and "e" not in self.init_params and hasattr(self, "emissionprob_"):
            M = int(np.shape(np.atleast_2d(self.emissionprob_))[1])
        seen = self._symbols_seen(engine, loaded, M)
        if M is None:
            M = seen
            size = 8.0 * self.n_components * M
            if size > MAX_EMISSION_BYTES:
                raise DataError(
                    f"The sequences hold symbol {seen - 1}, so the emission matrix would be {self.n_components} x "
                    f"{seen} ({size / 2**30:.1f} GiB). Symbols must be codes 0..n_features-1: recode them "
                    "(e.g. with np.unique(X, return_inverse=True)), or pass n_features to allow this size.")
        if seen > M:
            raise DataError(f"The sequences hold symbol {seen - 1} but the model emits symbols 0..{M - 1}. "
                            f"Set n_features to at least {seen}.")
        self._n_symbols = int(M)

    def _check_data(self, engine, loaded):
        M = self.emissionprob_.shape[1]
        seen = self._symbols_seen(engine, loaded, M)
        if seen > M:
            raise DataError(f"The sequences hold symbol {seen - 1} but the model emits symbols 0..{M - 1}. "
                            "Refit with n_features large enough.")

    def _initial_params(self, engine, loaded, rng) -> H.CategoricalHMMParams:
        K, M = self.n_components, self._n_symbols
        sp, tm = self._transition_init(rng)
        if self._needs_init("e", "emissionprob_"):
            E = rng.random((K, M))
            E /= E.sum(axis=1, keepdims=True)
        else:
            E = self.emissionprob_
        self._warn_if_degenerate(loaded.data.n_rows, M)
        self.startprob_, self.transmat_, self.emissionprob_ = sp, tm, E
        if self.n_features is None:
            self.n_features = M
        self._check()
        return self._get_parameters()

    @classmethod
    def _contract_example(cls, rng: np.random.Generator) -> tuple[tuple, dict]:
        lengths = [150, 100, 200, 120]
        X = rng.integers(0, 4, size=(sum(lengths), 1))
        return (X, lengths), {"n_components": 2, "n_features": 4, "random_state": 0, "tol": 0.0}

    def _set_parameters(self, p: H.CategoricalHMMParams) -> None:
        super()._set_parameters(p)
        if self.n_features is None:
            self.n_features = int(np.shape(p.emissionprob)[1])
        self.n_features_in_ = 1

    def _n_parameters(self) -> int:
        return H.n_free_parameters(self.n_components, self.emissionprob_.shape[1], "categorical")

    @staticmethod
    def _emission_spec(meta, K):
        M = meta["config"].get("n_features")
        M = int(M if M is not None else meta["fitted"]["n_features"])  # n_features in the fit record before 0.x
        return {"emissionprob": ((K, M), ["simplex"])}
