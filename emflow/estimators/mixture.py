"""``GaussianMixture``: scikit-learn's estimator, fitted out of core on a Dask cluster."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..storage import destinations as _dest
from ..checks import Choice, Flag, Int, Real
from ..execution.cluster import engine_for
from ..storage.data import is_zarr_path
from ..storage.xarray_io import apply_on_grid
from .em import IterationEvent
from ..execution.engine import Engine, Loaded, sample_rows
from ..errors import ConfigError, DegenerateComponentWarning, FeatureMismatchError
from .base import EMEstimator, Output
from .online import OnlineEMMixin, check_online_call
from .outputs import write_rows
from ..models import gmm as G
from ..models import kmeans as KM
from ._mixture_apply import loglik_stats as _loglik_stats, predict_part as _predict_part
from ._mixture_inits import check_inits
from .mixture_missing import MISSING, MissingGMMFamily, MissingValuesMixin, filling_engine
from .mixture_prior import MAPFamily, build_prior, check_prior

__all__ = ["GaussianMixture", "GMMFamily"]

FAMILY = "gaussian_mixture"
INIT_PARAMS = ("kmeans", "k-means++", "random_from_data", "random")
KMEANS_MAX_ITER = 100
KMEANS_TOL = 1e-4
SAMPLE_ROWS = 20_000
# Prediction on stored data returns an in-memory array only up to this size; beyond it,
# the caller must name a Zarr output (out=...).
MAX_IN_MEMORY_RESULT = 1 << 30
_INIT_ARRAYS = ("weights_init", "means_init", "precisions_init")


@dataclass(frozen=True)
class GMMFamily:
    """The EM family object for Gaussian mixtures (picklable; shipped to workers)."""

    covariance_type: str
    reg_covar: float
    compute_dtype: str = "float64"

    def e_step(self, X, w, params: G.GMMParams) -> G.GMMStats:
        return G.e_step(X, w, params, self.compute_dtype)

    def m_step(self, stats: G.GMMStats, params: G.GMMParams):
        return G.m_step(stats, G.shift_of(params), self.covariance_type, self.reg_covar)

    def objective(self, stats: G.GMMStats) -> float:
        return float(stats.loglik) / float(stats.weight_sum)


def _random_resp_stats(X, w, seed: int, K: int, shift, covariance_type: str, start: int):
    """Statistics of uniform random responsibilities that depend on the row, not the chunking."""
    n = X.shape[0]
    block = 4096
    resp = np.empty((n, K))
    b0, b1 = start // block, (start + n - 1) // block
    for b in range(b0, b1 + 1):
        u = np.random.default_rng([seed, b]).random((block, K))
        lo, hi = max(start, b * block), min(start + n, (b + 1) * block)
        resp[lo - start : hi - start] = u[lo - b * block : hi - b * block]
    resp /= resp.sum(axis=1, keepdims=True)
    return G.soft_stats(X, w, resp, shift, covariance_type)


class GaussianMixture(OnlineEMMixin, MissingValuesMixin, EMEstimator):
    """Gaussian mixture model fitted by EM over partitions of a (possibly huge) dataset.

    Parameters follow :class:`sklearn.mixture.GaussianMixture`.

    Parameters
    ----------
    n_components : int, default 1
    covariance_type : {"full", "tied", "diag", "spherical"}, default "full"
    tol : float, default 1e-3
        Convergence threshold on the change of the mean log-likelihood.
    reg_covar : float, default 1e-6
        Added to the diagonal of the covariances.
    max_iter : int, default 100
    n_init : int, default 1
        Number of initialisations; the one with the best lower bound is kept.
    init_params : {"kmeans", "k-means++", "random_from_data", "random"}, default "kmeans"
        ``"kmeans"`` seeds k-means++ on a uniform sample of rows drawn across all chunks,
        then refines with distributed k-means over the whole dataset.
    weights_init : array-like of shape (n_components,), optional
    means_init : array-like of shape (n_components, n_features), optional
    precisions_init : array-like, optional
        Shape (K, d, d) full, (d, d) tied, (K, d) diag, (K,) spherical.
    random_state : int, RandomState, numpy Generator or None
        None draws from NumPy's global state (``np.random.seed`` makes it repeatable).
    warm_start : bool, default False
        Start each ``fit`` from the previous fit's parameters (one initialisation, ``n_init``
        ignored), as scikit-learn's.
    verbose : int, default 0
        1 prints a line per iteration.
    scheduler : None, "threads", "local", address string or distributed.Client
        Where to run (see :mod:`emflow.execution.cluster`). ``None`` uses the active Dask client if
        there is one, otherwise threads in this process.
    persist : "auto", True or False, default "auto"
        Keep the data in worker memory between iterations (True), stream them from storage
        every iteration (False), or decide from the data size and cluster memory ("auto").
    split_every : int, default 8
        Fan-in of the tree reduction of statistics.
    partition_bytes : int or None
        Target bytes per partition (whole Zarr chunks); default 64 MiB. Smaller partitions
        bound worker memory more tightly when streaming data larger than memory.
    compute_dtype : {"float64", "float32"}, default "float64"
        Precision of the E-step arithmetic inside each block of rows. ``"float32"`` is about
        twice as fast; statistics and log-likelihood are still summed in float64 across
        blocks, partitions and workers (the log-likelihood then agrees with the float64 run
        to ~1e-7 relative on well-scaled data).
    missing : {"error", "marginalize"}, default "error"
        NaN is bad data (NonFiniteDataError), or a value missing at random: exact EM on each
        row's observed values (Ghahramani and Jordan 1994); ``predict*`` and ``score*``
        marginalise, ``impute`` fills them in. A row with no observed value is a DataError.
    prior : None, "conjugate" or dict, default None
        MAP under mclust's conjugate prior (:mod:`emflow.models.gmm_prior`; defaults from the
        data, one extra pass); a dict overrides ``mean``, ``shrinkage`` (0.01), ``dof`` (d + 2),
        ``scale``, ``weight_concentration`` (1) or ``strength`` (1; 0 is the ML fit).
        ``lower_bound_`` and ``history_`` are then the log posterior per row (up to a constant).

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
    precisions_ : ndarray
    precisions_cholesky_ : ndarray
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood of the best fit's last E-step.
    history_, lower_bounds_ : list of float
        Mean log-likelihood per iteration of the best fit.
    n_features_in_ : int
    prior_ : emflow.models.gmm_prior.ConjugatePrior or None (the prior with its defaults filled in)
    fit_info_ : dict
        Dataset fingerprint and source, rows, time per iteration, where it ran, reports
        of degenerate components.
    """

    family = FAMILY
    data_kind = "rows"
    params_type = G.GMMParams
    fitted = {"weights": "weights_", "means": "means_", "covariances": "covariances_",
              "precisions_cholesky": "precisions_cholesky_"}
    outputs = {"labels": Output("predict", True), "proba": Output("predict_proba", True),
               "log_likelihood": Output("score_samples")}
    array_params = _INIT_ARRAYS
    summary_arrays = {"weights": "weights_"}
    _param_rules = {
        "n_components": Int(1), "covariance_type": Choice(*G.COVARIANCE_TYPES), "tol": Real(0),
        "reg_covar": Real(0, finite=True), "max_iter": Int(0), "n_init": Int(1),
        "init_params": Choice(*INIT_PARAMS), "compute_dtype": Choice("float64", "float32"), "warm_start": Flag(),
        "missing": Choice(*MISSING),
    }

    def _validate_more(self) -> None:
        check_prior(self._prior_setting, self.covariance_type)

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start: bool = False,
        verbose: int = 0,
        scheduler=None,
        persist="auto",
        split_every: int = 8,
        partition_bytes: int | None = None,
        compute_dtype: str = "float64",
        missing: str = "error",
        prior=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.scheduler = scheduler
        self.persist = persist
        self.split_every = split_every
        self.partition_bytes = partition_bytes
        self.compute_dtype = compute_dtype
        self.missing = missing
        self.prior = prior

    # -- validation ------------------------------------------------------------------
    def _check_inits(self, d: int) -> None:
        check_inits(self, d)

    def _partitioning(self) -> dict:
        return {} if self.partition_bytes is None else {"partition_bytes": int(self.partition_bytes)}

    def _parameter_settings(self) -> dict:
        return {"covariance_type": self.covariance_type}

    @property
    def _params(self) -> G.GMMParams:
        return self._get_parameters()

    @property
    def precisions_(self) -> np.ndarray:
        self._check_fitted()
        pc = self.precisions_cholesky_
        if self.covariance_type == "full":
            return np.einsum("kij,kzj->kiz", pc, pc)
        if self.covariance_type == "tied":
            return pc @ pc.T
        return pc**2

    # -- initialisation --------------------------------------------------------------
    def _restart_rng(self, seed: int, init: int) -> np.random.Generator:
        rs = self.random_state
        if init != 0 or isinstance(rs, bool) or not isinstance(rs, (int, np.integer)):
            return super()._restart_rng(seed, init)
        rng = KM.FirstRestart(np.random.PCG64([seed, init]))  # the same stream as default_rng([seed, 0])
        rng.sklearn_stream = np.random.RandomState(int(rs))
        return rng

    def _initial_params(self, engine: Engine, loaded: Loaded, rng: np.random.Generator) -> G.GMMParams:
        K, ct, reg = self.n_components, self.covariance_type, self.reg_covar
        d = loaded.data.n_features
        if self._marginalize:  # the starts see NaN filled with column means
            engine = filling_engine(engine, loaded)
        given = [self.weights_init, self.means_init, self.precisions_init]
        if all(x is not None for x in given):
            base = None
        elif self.init_params == "kmeans":
            Xs, ws = sample_rows(engine, loaded, max(SAMPLE_ROWS, 50 * K), rng)
            centers = Xs[KM.kmeans_plusplus(Xs, K, KM.seeding_rng(rng, len(Xs), loaded.data.n_rows), ws)]
            var = np.average((Xs - Xs.mean(0)) ** 2, axis=0, weights=ws).mean() if len(Xs) > 1 else 0.0
            for _ in range(KMEANS_MAX_ITER):
                shift = centers.mean(axis=0)
                st = engine.map_reduce(KM.e_step, loaded, centers, shift)
                new, _empty = KM.m_step(st, centers, shift)
                moved = float(np.sum((new - centers) ** 2))
                centers = new
                if moved <= KMEANS_TOL * var:
                    break
            shift = centers.mean(axis=0)
            st = engine.map_reduce(G.hard_stats, loaded, centers, shift, ct)
            base, _ = G.m_step(st, shift, ct, reg)
        elif self.init_params == "random":
            shift = np.zeros(d)
            seed = int(rng.integers(2**62))
            starts = [a for a, _ in loaded.data.bounds]
            st = engine.map_reduce(_random_resp_stats, loaded, seed, K, shift, ct, per_partition=starts)
            # centre the moments on the data mean for precision, then redo about that shift
            shift = st.s1.sum(axis=0) / max(st.n.sum(), 1e-300)
            st = engine.map_reduce(_random_resp_stats, loaded, seed, K, shift, ct, per_partition=starts)
            base, _ = G.m_step(st, shift, ct, reg)
        else:  # "k-means++" and "random_from_data": K rows become the means
            if self.init_params == "k-means++":
                Xs, ws = sample_rows(engine, loaded, max(SAMPLE_ROWS, 50 * K), rng)
                means = Xs[KM.kmeans_plusplus(Xs, K, KM.seeding_rng(rng, len(Xs), loaded.data.n_rows), ws)]
            else:
                means, _ = sample_rows(engine, loaded, K, rng)
                means = means[rng.permutation(K)]
            cov = {
                "full": np.broadcast_to(np.eye(d) * reg, (K, d, d)).copy(),
                "tied": np.eye(d) * reg,
                "diag": np.full((K, d), reg),
                "spherical": np.full(K, reg),
            }[ct]
            if reg <= 0:
                raise ConfigError(
                    f"init_params={self.init_params!r} starts every component with covariance reg_covar, "
                    "so reg_covar must be > 0. Use init_params='kmeans' or set reg_covar."
                )
            base = G.GMMParams(np.full(K, 1.0 / K), means, cov, G.precisions_cholesky_from_covariances(cov, ct), ct)
        weights = np.asarray(self.weights_init, dtype=np.float64) if self.weights_init is not None else base.weights
        means = np.asarray(self.means_init, dtype=np.float64) if self.means_init is not None else base.means
        if self.precisions_init is not None:
            pc = G.precisions_cholesky_from_precisions(self.precisions_init, ct)
            cov = G.covariances_from_precisions_cholesky(pc, ct)
        else:
            pc, cov = base.precisions_cholesky, base.covariances
        return G.GMMParams(weights.copy(), means.copy(), cov, pc, ct)

    # -- fitting ---------------------------------------------------------------------
    def fit(self, data, y=None, sample_weight=None, *, method: str = "batch",
            callbacks: Iterable[Callable[[IterationEvent], None]] = (),
            initial_params: G.GMMParams | None = None, history: list[float] | None = None,
            sample_dims=None, feature_dim=None, **online) -> "GaussianMixture":
        """Fit the mixture by EM.

        Parameters
        ----------
        data : str, PathLike, zarr.Array, dask.array.Array or array-like of shape (n_samples, n_features)
            Zarr path or URL (an array, or a group holding one), opened Zarr array, Dask
            array or in-memory array.
            Or an xarray ``DataArray`` / ``Dataset`` (in memory or Dask-backed), whose
            ``sample_dims`` become rows; outputs come back on its grid (``out=``: a Zarr dataset on it).
        y : ignored
        sample_weight : array-like of shape (n_samples,), Zarr path, array name, or None
            Non-negative weight per row (a weight of 2 counts a row twice). A bare name
            such as ``"weights"`` reads the array of that name beside the data.
        callbacks : iterable of callables
            Each is called with an :class:`~emflow.estimators.em.IterationEvent` after every
            iteration (monitoring, checkpoints).
        initial_params, history
            Resume from a checkpoint: start EM from these parameters with the iterations
            already recorded in ``history`` (``n_init`` must be 1).
        method : {"batch", "online"}, default "batch"
            ``"online"``: stepwise EM in mini-batches (:mod:`emflow.estimators.online`).
        sample_dims, feature_dim : xarray data's row dimensions (default: all but ``feature_dim``)
            and a DataArray's feature dimension (a Dataset's features are its variables).
        **online
            With ``method="online"``: ``batch_size``, ``learning_decay``, ``learning_offset``,
            ``polyak``, ``n_passes``, ``shuffle`` (:class:`~emflow.estimators.online.OnlineSchedule`).

        Returns
        -------
        self
        """
        if check_online_call(method, online):
            data, _ = self._xarray_rows(data, sample_dims, feature_dim, fitting=True)
            return self._fit_online(data, y, sample_weight, callbacks=callbacks, **online)
        return self._fit(data, sample_weight, callbacks=callbacks, initial_params=initial_params, history=history,
                         sample_dims=sample_dims, feature_dim=feature_dim)

    def partial_fit(self, X, y=None, sample_weight=None, **online):  # scikit-learn's signature
        return super().partial_fit(X, y, sample_weight, **online)

    partial_fit.__doc__ = OnlineEMMixin.partial_fit.__doc__

    def _open(self, engine, data, sample_weight=None):
        return engine.open(data, sample_weight, min_rows=self.n_components, persist=self.persist,
                           **self._partitioning(), allow_nan=self._marginalize)

    def _prepare(self, engine, loaded) -> None:
        self._check_inits(loaded.data.n_features)
        self.prior_ = build_prior(self, engine, loaded)

    @classmethod
    def _contract_example(cls, rng):
        X = np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(2.5, 0.7, (200, 2))])
        return (X,), {"n_components": 2, "random_state": 0, "tol": 0.0}

    def _em_family(self) -> GMMFamily:
        fam = GMMFamily(self.covariance_type, float(self.reg_covar), self.compute_dtype)
        fam = MissingGMMFamily(fam) if self._marginalize else fam
        if self._prior_setting is None:
            return fam
        # the prior's defaults come from the data: _prepare computes them
        return MAPFamily(fam, self.covariance_type, float(self.reg_covar), self.prior_)

    def _watch(self, event: IterationEvent, warned: set) -> None:
        for k in event.report.get("empty_components", []):
            if ("empty", k) not in warned:
                warned.add(("empty", k))
                warnings.warn(
                    f"Component {k} lost all its points at iteration {event.iteration}; it keeps a "
                    "weight of ~0. Use fewer components or another random_state.",
                    DegenerateComponentWarning, stacklevel=2,
                )
        for k, jitter in event.report.get("repaired_covariances", {}).items():
            if ("cov", k) not in warned:
                warned.add(("cov", k))
                warnings.warn(
                    f"Covariance of component {k} was not positive definite at iteration "
                    f"{event.iteration}; added {jitter:.3g} to its diagonal. Consider increasing "
                    "reg_covar or scaling the data.", DegenerateComponentWarning, stacklevel=2,
                )

    def _fit_info_extra(self, loaded, result) -> dict:
        return {
            "n_samples": loaded.data.n_rows,
            "weight_sum": loaded.weight_sum,
            "weighted": bool(loaded.data.weighted),
            "empty_components": sorted({k for r in result.reports for k in r.get("empty_components", [])}),
        }

    def fit_predict(self, data, y=None, sample_weight=None, **kwargs):
        """Fit, then return the component label of each row (in-memory result)."""
        return self.fit(data, sample_weight=sample_weight, **kwargs).predict(data)

    # -- applying a fitted model -----------------------------------------------------
    def _check_features(self, d: int) -> None:
        if d != self.n_features_in_:
            raise FeatureMismatchError(
                f"The model was fitted on {self.n_features_in_} feature(s) but the data have {d}. "
                "Apply it to data with the same columns, in the same order."
            )

    def _apply(self, data, kind: str, out=None, overwrite: bool = False):
        self._check_fitted()
        return apply_on_grid(self, data, kind, out, overwrite)  # an xarray object's outputs: on its grid

    def _apply_rows(self, data, kind: str, out=None, overwrite: bool = False):
        if out is not None:  # refuse before any work: nothing is replaced unasked
            _dest.check_destination(out, "output", overwrite=overwrite, inputs=_dest.output_inputs(self, data))
        import dask.array as da
        import zarr

        if not (is_zarr_path(data) or isinstance(data, (zarr.Array, da.Array))):
            X = np.asarray(data)
            if X.ndim != 2:
                from ..errors import DataError

                raise DataError(f"The data have shape {X.shape}; expected 2-D (n_samples, n_features).")
            self._check_features(X.shape[1])
            if X.dtype.kind not in "fiu":
                from ..errors import DataError

                raise DataError(f"The data have dtype {X.dtype}; convert to float64 first.")
            from ..storage.data import _check_finite

            _check_finite(X, None, "The data", 0, allow_nan=self._marginalize)
            if out is None:
                return _predict_part(X, None, self._params, kind, None, 0)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = engine.open(data, persist=False, **self._partitioning(), allow_nan=self._marginalize)
            try:
                self._check_features(loaded.data.n_features)
                starts = [a for a, _ in loaded.data.bounds]
                if out is None:
                    width = {"proba": self.n_components, "impute": loaded.data.n_features}.get(kind, 1)
                    nbytes = loaded.data.n_rows * width * 8
                    if nbytes > MAX_IN_MEMORY_RESULT:
                        raise ConfigError(
                            f"The result would take {nbytes / 2**30:.1f} GiB in memory. Pass out='result.zarr' "
                            "to write it to Zarr chunk by chunk instead."
                        )
                    parts = engine.map(_predict_part, loaded, self._params, kind, None, per_partition=starts)
                    return np.concatenate(parts)
                return self._write_output(engine, loaded, kind, out, starts, overwrite, data)
            finally:
                loaded.release()

    def _write_output(self, engine, loaded, kind, out, starts, overwrite=False, data=None):
        n, K = loaded.data.n_rows, self.n_components
        shape, dtype = {"labels": ((n,), "int64"), "proba": ((n, K), "float64"), "score": ((n,), "float64"),
                        "impute": ((n, loaded.data.n_features), "float64")}[kind]
        # output chunks = the partitions' common step, so no two tasks write one chunk
        chunk = math.gcd(*[a for a, _ in loaded.data.bounds if a > 0]) or n

        def fill(url):
            engine.map(_predict_part, loaded, self._params, kind, url, per_partition=starts)

        return write_rows(out, loaded, self, kind=kind, shape=shape, dtype=dtype, chunk=chunk, fill=fill,
                          overwrite=overwrite, data=data)

    def predict(self, data, *, out=None, overwrite: bool = False):
        """Component label of each row: ndarray of shape (n_samples,), or a Zarr array written to ``out``.

        An emflow output already at ``out`` is replaced only with ``overwrite=True``; anything
        else there, the input data and the model's own path are never replaced.
        """
        return self._apply(data, "labels", out, overwrite)

    def predict_proba(self, data, *, out=None, overwrite: bool = False):
        """Responsibilities: ndarray of shape (n_samples, n_components), or a Zarr array written to ``out``."""
        return self._apply(data, "proba", out, overwrite)

    def score_samples(self, data, *, out=None, overwrite: bool = False):
        """Log-likelihood of each row: ndarray of shape (n_samples,), or a Zarr array written to ``out``."""
        return self._apply(data, "score", out, overwrite)

    def _loglik_total(self, data, sample_weight=None) -> tuple[float, float, float]:
        self._check_fitted()
        data, _ = self._xarray_rows(data)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = engine.open(data, sample_weight, persist=False, **self._partitioning(),
                                 allow_nan=self._marginalize)
            try:
                self._check_features(loaded.data.n_features)
                tot = engine.map_reduce(_loglik_stats, loaded, self._params)
            finally:
                loaded.release()
        return float(tot[0]), float(tot[1]), float(tot[2])

    def score(self, data, y=None, sample_weight=None) -> float:
        """Mean (weighted) log-likelihood per row."""
        s, wsum, _ = self._loglik_total(data, sample_weight)
        return s / wsum

    def _loglik_count(self, data) -> tuple[float, float]:
        s, _, n = self._loglik_total(data)
        return s, n

    def sample(self, n_samples: int = 1):
        """Draw samples: ``(X, y)`` with X of shape (n_samples, n_features) and labels y."""
        self._check_fitted()
        if not (isinstance(n_samples, (int, np.integer)) and n_samples >= 1):
            raise ConfigError(f"Invalid value for 'n_samples': {n_samples} . The sampling requires at least one "
                              "sample (n_samples must be an integer >= 1).")
        rng = np.random.default_rng(self._seed())
        counts = rng.multinomial(n_samples, self.weights_ / self.weights_.sum())
        d = self.means_.shape[1]
        ct = self.covariance_type
        Xs, ys = [], []
        for k, (mean, c) in enumerate(zip(self.means_, counts)):
            if c == 0:
                continue
            if ct == "full":
                cov = self.covariances_[k]
            elif ct == "tied":
                cov = self.covariances_
            elif ct == "diag":
                cov = np.diag(self.covariances_[k])
            else:
                cov = np.eye(d) * self.covariances_[k]
            Xs.append(rng.multivariate_normal(mean, cov, size=c, method="cholesky"))
            ys.append(np.full(c, k))
        return np.vstack(Xs), np.concatenate(ys)

    # -- persistence -----------------------------------------------------------------
    @staticmethod
    def _array_spec(meta: dict) -> dict:
        """The arrays a saved mixture holds: shapes from its configuration, constraints (see store.RULES)."""
        cfg, fitted = meta["config"], meta["fitted"]
        K, d, ct = int(cfg["n_components"]), int(fitted["n_features_in"]), cfg["covariance_type"]
        cov = {"full": (K, d, d), "tied": (d, d), "diag": (K, d), "spherical": (K,)}[ct]
        matrix = ct in ("full", "tied")
        return {
            "weights": ((K,), ["simplex"]),
            "means": ((K, d), []),
            "covariances": (cov, ["spd"] if matrix else ["positive"]),
            "precisions_cholesky": (cov, ["cholesky"] if matrix else ["positive"]),
        }
