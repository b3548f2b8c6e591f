"""``BayesianGaussianMixture``: scikit-learn's variational Gaussian mixture, fitted out of core.

The E-step is the Gaussian mixture's (same kernel, same additive statistics); the variational
M-step and the lower bound are :mod:`emflow.models.bgmm`. Priors left as None default from
the data (mean and covariance, one extra pass) as scikit-learn's ``_check_parameters``.
Predictions, scores, samples and Zarr outputs are :class:`~emflow.GaussianMixture`'s, run with
the variational responsibilities (scikit-learn's ``_estimate_weighted_log_prob``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import numpy as np

from ..checks import Choice, Int, Real
from ..errors import ConfigError, DataError
from ..execution.engine import Engine, Loaded, sample_rows, take_rows
from ..models import bgmm as B
from ..models import gmm as G
from ..models import kmeans as KM
from .base import print_iteration
from .em import IterationEvent
from .mixture import KMEANS_MAX_ITER, KMEANS_TOL, SAMPLE_ROWS, GaussianMixture, _random_resp_stats

__all__ = ["BayesianGaussianMixture", "BGMMFamily"]

FAMILY = "bayesian_gaussian_mixture"
_PRIOR_ARRAYS = ("mean_prior", "covariance_prior")


class _Numbered(np.random.Generator):
    """A restart's generator (the stream of ``default_rng([seed, init])``) that knows its restart."""

    restart: int


@dataclass(frozen=True)
class BGMMFamily:
    """The EM family of the variational mixture (picklable; shipped to workers). Its objective
    needs the parameters the E-step ran with (the bound is computed after the M-step)."""

    covariance_type: str
    reg_covar: float
    priors: B.BGMMPriors
    compute_dtype: str = "float64"
    takes_context: ClassVar[bool] = True

    def e_step(self, X, w, params: B.BGMMParams, context=None) -> G.GMMStats:
        return G.e_step(X, w, B.as_gmm(params), self.compute_dtype)

    def m_step(self, stats: G.GMMStats, params: B.BGMMParams):
        return B.m_step(stats, params, self.priors, self.reg_covar), {}

    def objective(self, stats: G.GMMStats, params: B.BGMMParams) -> float:
        return B.lower_bound(stats, params, self.priors, self.reg_covar)


def _rows_at(engine: Engine, loaded: Loaded, idx: np.ndarray):
    """The rows at global indices ``idx`` (in that order) and their weights."""
    order = np.argsort(idx, kind="stable")
    srt = np.asarray(idx)[order]
    per = []
    for a, b in loaded.data.bounds:
        lo, hi = np.searchsorted(srt, [a, b])
        per.append(srt[lo:hi] - a)
    parts = engine.map(take_rows, loaded, per_partition=per)
    Xs = np.empty((len(idx), loaded.data.n_features))
    Xs[order] = np.concatenate([p[0] for p in parts])
    if parts[0][1] is None:
        return Xs, None
    ws = np.empty(len(idx))
    ws[order] = np.concatenate([p[1] for p in parts])
    return Xs, ws


class BayesianGaussianMixture(GaussianMixture):
    """Variational Bayesian Gaussian mixture fitted over partitions of a (possibly huge) dataset.

    Parameters, fitted attributes and the lower bound follow
    :class:`sklearn.mixture.BayesianGaussianMixture`; the execution parameters are
    :class:`~emflow.GaussianMixture`'s.

    Parameters
    ----------
    n_components : int, default 1
        The most components; the fit can leave some with a weight near zero.
    covariance_type : {"full", "tied", "diag", "spherical"}, default "full"
    tol : float, default 1e-3
        Convergence threshold on the change of the lower bound (a total, not a mean per row,
        as scikit-learn's).
    reg_covar : float, default 1e-6
    max_iter : int, default 100
    n_init : int, default 1
    init_params : {"kmeans", "k-means++", "random_from_data", "random"}, default "kmeans"
        Starting responsibilities, as scikit-learn's. With an integer ``random_state``
        ``"random_from_data"`` picks scikit-learn's rows (``RandomState(random_state).choice``,
        one draw per restart) and ``"k-means++"`` on data that fit in its sample replays
        scikit-learn's seeding for the first restart; ``"kmeans"`` and ``"random"`` are
        emflow's distributed versions (they need not pick scikit-learn's start).
    weight_concentration_prior_type : {"dirichlet_process", "dirichlet_distribution"}, default "dirichlet_process"
    weight_concentration_prior : float > 0 or None
        None: ``1 / n_components``.
    mean_precision_prior : float > 0 or None
        None: 1.
    mean_prior : array-like of shape (n_features,) or None
        None: the data mean.
    degrees_of_freedom_prior : float > n_features - 1 or None
        None: ``n_features``.
    covariance_prior : float or array-like or None
        (d, d) symmetric positive definite for full and tied, (d,) positive for diag, a
        positive float for spherical. None: the sample covariance of the data (unbiased; its
        diagonal for diag, their mean for spherical).
    random_state, warm_start, verbose
        As scikit-learn's.
    verbose_interval : int, default 10
        With ``verbose``, print every this many iterations (and the last).
    weight_threshold : float, default 0.01
        A component whose expected weight is below it is reported as unused
        (``n_components_used_``, ``used_components_``).
    scheduler, persist, split_every, partition_bytes, compute_dtype
        Where and how to run, as :class:`~emflow.GaussianMixture`.

    Attributes
    ----------
    weights_, means_, covariances_, precisions_, precisions_cholesky_ : ndarray
    weight_concentration_ : ndarray
        (2, K) the Beta parameters (``dirichlet_process``; unpacks as scikit-learn's tuple),
        or (K,) the Dirichlet parameters.
    mean_precision_ : ndarray of shape (K,)
    degrees_of_freedom_ : ndarray of shape (K,) (a 0-d array for tied)
    weight_concentration_prior_, mean_precision_prior_, mean_prior_, degrees_of_freedom_prior_, covariance_prior_
        The priors in use.
    converged_, n_iter_, lower_bound_, lower_bounds_, history_, n_features_in_, fit_info_
        As :class:`~emflow.GaussianMixture`; the bound is scikit-learn's (constants dropped).
    n_components_used_ : int
        Components whose expected weight is at least ``weight_threshold``.
    used_components_ : ndarray of bool, shape (K,)
    """

    family = FAMILY
    params_type = B.BGMMParams
    fitted = {"weight_concentration": "weight_concentration_", "mean_precision": "mean_precision_",
              "means": "means_", "degrees_of_freedom": "degrees_of_freedom_", "covariances": "covariances_",
              "precisions_cholesky": "precisions_cholesky_"}
    array_params = _PRIOR_ARRAYS
    objective_name = "lower bound"
    _param_rules = {
        "weight_concentration_prior_type": Choice(*B.PRIOR_TYPES), "verbose_interval": Int(1),
        "weight_threshold": Real(0, finite=True),
        "weight_concentration_prior": Real(0, strict=True, finite=True, allow_none=True),
        "mean_precision_prior": Real(0, strict=True, finite=True, allow_none=True),
        "degrees_of_freedom_prior": Real(0, strict=True, finite=True, allow_none=True),
    }
    # GaussianMixture's starting arrays do not exist here
    weights_init = means_init = precisions_init = None
    missing = "error"

    def __init__(
        self,
        *,
        n_components: int = 1,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior=None,
        mean_precision_prior=None,
        mean_prior=None,
        degrees_of_freedom_prior=None,
        covariance_prior=None,
        random_state=None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        weight_threshold: float = 0.01,
        scheduler=None,
        persist="auto",
        split_every: int = 8,
        partition_bytes: int | None = None,
        compute_dtype: str = "float64",
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.weight_threshold = weight_threshold
        self.scheduler = scheduler
        self.persist = persist
        self.split_every = split_every
        self.partition_bytes = partition_bytes
        self.compute_dtype = compute_dtype

    # -- validation --------------------------------------------------------------------
    def _validate_more(self) -> None:
        """The priors that need no data: a covariance prior must be positive (definite)."""
        if self.mean_prior is not None:
            m = np.asarray(self.mean_prior, dtype=np.float64)
            if m.ndim != 1 or not np.all(np.isfinite(m)):
                raise ConfigError(f"mean_prior must be a finite 1-D array of length n_features, got shape {m.shape}.")
        cp, ct = self.covariance_prior, self.covariance_type
        if cp is None:
            return
        a = np.asarray(cp, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ConfigError(f"covariance_prior must be finite, got {cp!r}.")
        if ct in ("full", "tied"):
            if a.ndim != 2 or a.shape[0] != a.shape[1]:
                raise ConfigError(f"The parameter '{ct} covariance_prior' should have the shape of (n_features, "
                                  f"n_features), but got {a.shape} (covariance_prior, covariance_type={ct!r}).")
            if not np.allclose(a, a.T) or np.any(np.linalg.eigvalsh(a) <= 0):
                raise ConfigError(f"'{ct} covariance_prior' should be symmetric, positive-definite "
                                  "(covariance_prior must be a symmetric positive definite matrix).")
        elif ct == "diag":
            if a.ndim != 1:
                raise ConfigError(f"The parameter 'diag covariance_prior' should have the shape of (n_features,), "
                                  f"but got {a.shape} (covariance_prior).")
            if np.any(a <= 0):
                raise ConfigError("'diag covariance_prior' should be positive (covariance_prior: every entry > 0).")
        elif a.ndim != 0 or not a > 0:
            raise ConfigError(f"covariance_prior must be a float > 0 for covariance_type='spherical', got {cp!r}.")

    def _check_priors(self, d: int) -> None:
        """The checks that need the number of features (scikit-learn's words), before any pass."""
        if self.mean_prior is not None:
            m = np.asarray(self.mean_prior, dtype=np.float64)
            if m.shape != (d,) or not np.all(np.isfinite(m)):
                raise ConfigError(f"The parameter 'means' should have the shape of {(d,)}, but got {m.shape} "
                                  f"(mean_prior, for data with {d} features; finite).")
        dof = self.degrees_of_freedom_prior
        if dof is not None and not dof > d - 1.0:
            raise ConfigError(f"The parameter 'degrees_of_freedom_prior' should be greater than {d - 1}, but got "
                              f"{dof:.3f}. (It must exceed n_features - 1.)")
        if self.covariance_prior is not None and self.covariance_type != "spherical":
            shape = (d,) if self.covariance_type == "diag" else (d, d)
            got = np.shape(self.covariance_prior)
            if got != shape:
                raise ConfigError(f"The parameter '{self.covariance_type} covariance_prior' should have the shape of "
                                  f"{shape}, but got {got} (covariance_prior, for data with {d} features).")

    def _prepare(self, engine, loaded) -> None:
        if loaded.data.n_rows < 2:  # scikit-learn's minimum too: the default priors are the data's covariance
            raise DataError(f"Found {loaded.data.n_rows} sample(s) while a minimum of 2 is required by "
                            "BayesianGaussianMixture (its default priors are the data's mean and covariance).")
        d = loaded.data.n_features
        self._check_priors(d)
        # one pass; each partition's moments about its own mean, merged exactly here
        n, mean, scatter = B.combine_moments(engine.map(B.partition_moments, loaded))
        self._moments = (n, mean, scatter)
        self._set_priors(B.default_priors(
            self.n_components, self.covariance_type, n, mean, scatter,
            weight_concentration=self.weight_concentration_prior, mean_precision=self.mean_precision_prior,
            mean=self.mean_prior, degrees_of_freedom=self.degrees_of_freedom_prior,
            covariance=self.covariance_prior))

    def _set_priors(self, pr: B.BGMMPriors) -> None:
        self._priors = pr
        self.weight_concentration_prior_ = pr.weight_concentration
        self.mean_precision_prior_ = pr.mean_precision
        self.mean_prior_ = pr.mean
        self.degrees_of_freedom_prior_ = pr.degrees_of_freedom
        cov = pr.covariance
        self.covariance_prior_ = float(cov) if self.covariance_type == "spherical" else cov

    # -- parameters ----------------------------------------------------------------------
    def _parameter_settings(self) -> dict:
        return {"covariance_type": self.covariance_type,
                "weight_concentration_prior_type": self.weight_concentration_prior_type}

    @property
    def _params(self) -> G.GMMParams:
        """The Gaussian-mixture parameters whose posterior is the variational one (predictions)."""
        return B.as_gmm(self._get_parameters())

    @property
    def weights_(self) -> np.ndarray:
        self._check_fitted()
        return B.weights(self._get_parameters())

    @property
    def used_components_(self) -> np.ndarray:
        return self.weights_ >= float(self.weight_threshold)

    @property
    def n_components_used_(self) -> int:
        return int(np.sum(self.used_components_))

    # -- initialisation ------------------------------------------------------------------
    def _chosen_rows(self, engine, loaded, rng, init: int):
        """The K rows that start ``random_from_data`` / ``k-means++`` (one-hot responsibilities)."""
        K, n = self.n_components, loaded.data.n_rows
        if self.init_params == "k-means++":
            Xs, ws = sample_rows(engine, loaded, max(SAMPLE_ROWS, 50 * K), rng)
            idx = KM.kmeans_plusplus(Xs, K, KM.seeding_rng(rng, len(Xs), n), ws)
            return Xs[idx], None if ws is None else ws[idx]
        rs = self.random_state
        if isinstance(rs, (int, np.integer)) and not isinstance(rs, bool):
            stream = np.random.RandomState(int(rs))  # scikit-learn's draws, one per restart
            for _ in range(init + 1):
                idx = stream.choice(n, size=K, replace=False)
        else:
            idx = rng.choice(n, size=K, replace=False)
        return _rows_at(engine, loaded, idx)

    def _kmeans_stats(self, engine, loaded, rng, shift):
        K, ct = self.n_components, self.covariance_type
        Xs, ws = sample_rows(engine, loaded, max(SAMPLE_ROWS, 50 * K), rng)
        centers = Xs[KM.kmeans_plusplus(Xs, K, KM.seeding_rng(rng, len(Xs), loaded.data.n_rows), ws)]
        var = np.average((Xs - Xs.mean(0)) ** 2, axis=0, weights=ws).mean() if len(Xs) > 1 else 0.0
        for _ in range(KMEANS_MAX_ITER):
            st = engine.map_reduce(KM.e_step, loaded, centers, centers.mean(axis=0))
            new, _ = KM.m_step(st, centers, centers.mean(axis=0))
            moved, centers = float(np.sum((new - centers) ** 2)), new
            if moved <= KMEANS_TOL * var:
                break
        return engine.map_reduce(G.hard_stats, loaded, centers, shift, ct)

    def _initial_params(self, engine: Engine, loaded: Loaded, rng: np.random.Generator) -> B.BGMMParams:
        K, ct = self.n_components, self.covariance_type
        n, mean, scatter = self._moments
        shift = mean
        if self.init_params == "kmeans":
            st = self._kmeans_stats(engine, loaded, rng, shift)
        elif self.init_params == "random":
            starts = [a for a, _ in loaded.data.bounds]
            st = engine.map_reduce(_random_resp_stats, loaded, int(rng.integers(2**62)), K, shift, ct,
                                   per_partition=starts)
        else:
            # one row per component; scikit-learn's tied covariance then takes every row's
            # second moment with the K rows' means (its formula about the origin, kept exactly)
            init = getattr(rng, "restart", 0)
            rows, wr = self._chosen_rows(engine, loaded, rng, init)
            shift = np.zeros(rows.shape[1])
            st = G.soft_stats(rows, wr, np.eye(K), shift, ct)
            if ct == "tied":
                st = st._replace(s2=scatter + n * np.outer(mean, mean))
        nk, xk, sk = B.moments(st, shift, ct, float(self.reg_covar))
        return B.m_step_from_moments(nk, xk, sk, self._priors, ct, self.weight_concentration_prior_type)

    def _restart_rng(self, seed: int, init: int) -> np.random.Generator:
        rng = super()._restart_rng(seed, init)
        if not isinstance(rng, KM.FirstRestart):
            rng = _Numbered(np.random.PCG64([seed, init]))
        rng.restart = init  # which of scikit-learn's draws random_from_data replays
        return rng

    # -- fitting -------------------------------------------------------------------------
    @property
    def partial_fit(self):
        """Not available (as in scikit-learn): stepwise EM is the maximum-likelihood mixture's
        (``GaussianMixture.partial_fit``); ``hasattr(est, "partial_fit")`` is False here."""
        raise AttributeError("BayesianGaussianMixture has no partial_fit (as in scikit-learn); use fit, or "
                             "GaussianMixture.partial_fit for stepwise EM.")

    def fit(self, data, y=None, sample_weight=None, *, callbacks: Iterable[Callable[[IterationEvent], None]] = (),
            initial_params: B.BGMMParams | None = None,
            history: list[float] | None = None, sample_dims=None,
            feature_dim=None) -> "BayesianGaussianMixture":
        """Fit the variational posterior (coordinate ascent on scikit-learn's lower bound).

        Parameters are :meth:`GaussianMixture.fit`'s: ``data`` (Zarr path or URL, Zarr,
        Dask or in-memory array), ``sample_weight`` (a row of weight 2 counts twice;
        scikit-learn has none), ``callbacks``, ``initial_params``/``history`` to resume,
        and ``sample_dims``/``feature_dim`` for an xarray ``DataArray`` or ``Dataset``.

        Returns
        -------
        self
        """
        return self._fit(data, sample_weight, callbacks=callbacks, initial_params=initial_params, history=history,
                         sample_dims=sample_dims, feature_dim=feature_dim)

    def _em_family(self) -> BGMMFamily:
        return BGMMFamily(self.covariance_type, float(self.reg_covar), self._priors, self.compute_dtype)

    def _print_iteration(self, event: IterationEvent) -> None:
        last = event.converged or event.iteration >= int(self.max_iter)
        if event.iteration % int(self.verbose_interval) == 0 or last or event.iteration == 1:
            print_iteration(event)

    @classmethod
    def _contract_example(cls, rng):
        X = np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(3.0, 0.6, (200, 2))])
        return (X,), {"n_components": 4, "random_state": 0, "tol": 0.0}

    # -- persistence ---------------------------------------------------------------------
    def _meta_extra(self) -> dict:
        pr = getattr(self, "_priors", None)
        if pr is None:  # a fitted state restored without a fit (a flow's final checkpoint)
            return {}
        return {"priors": {"weight_concentration": pr.weight_concentration, "mean_precision": pr.mean_precision,
                           "mean": np.asarray(pr.mean).tolist(), "degrees_of_freedom": pr.degrees_of_freedom,
                           "covariance": np.asarray(pr.covariance).tolist()}}

    def _after_load(self, meta: dict) -> None:
        p = meta.get("priors")
        if p is not None:
            self._set_priors(B.BGMMPriors(float(p["weight_concentration"]), float(p["mean_precision"]),
                                          np.asarray(p["mean"], dtype=np.float64), float(p["degrees_of_freedom"]),
                                          np.asarray(p["covariance"], dtype=np.float64)))

    @staticmethod
    def _array_spec(meta: dict) -> dict:
        cfg, fitted = meta["config"], meta["fitted"]
        K, d, ct = int(cfg["n_components"]), int(fitted["n_features_in"]), cfg["covariance_type"]
        cov = {"full": (K, d, d), "tied": (d, d), "diag": (K, d), "spherical": (K,)}[ct]
        matrix = ct in ("full", "tied")
        dp = cfg.get("weight_concentration_prior_type", "dirichlet_process") == "dirichlet_process"
        return {
            "weight_concentration": ((2, K) if dp else (K,), ["positive"]),
            "mean_precision": ((K,), ["positive"]),
            "means": ((K, d), []),
            "degrees_of_freedom": ((() if ct == "tied" else (K,)), ["positive"]),
            "covariances": (cov, ["spd"] if matrix else ["positive"]),
            "precisions_cholesky": (cov, ["cholesky"] if matrix else ["positive"]),
        }
