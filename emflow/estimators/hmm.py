"""Hidden Markov models fitted by Baum-Welch over partitions of many sequences.

``GaussianHMM`` and ``CategoricalHMM`` follow hmmlearn's estimators (constructor
parameters, ``startprob_`` / ``transmat_`` / ``means_`` / ``covars_`` / ``emissionprob_``,
``init_params`` / ``params`` letter strings, ``fit(X, lengths)``, ``predict``,
``predict_proba``, ``score``, ``decode``, ``sample``, ``monitor_``) plus emflow's common
surface (``scheduler``, ``persist``, ``split_every``, ``callbacks``, ``history_``,
``fit_info_``, ``save`` / ``load``).

Data: in memory as hmmlearn's ``(X, lengths)``, or a Zarr group with ``values``
(total_steps, n_features) and ``offsets`` (n_sequences + 1) (see :mod:`emflow.storage.sequences`).
A partition is a run of whole sequences; the E-step of each partition runs on a worker
and returns additive statistics (:mod:`emflow.models.hmm`).

Conventions to know:

* ``score`` returns the *total* log-likelihood of all sequences, as hmmlearn does
  (``GaussianMixture.score`` is a mean per row, as scikit-learn does).
* ``tol`` applies to the total log-likelihood, as in hmmlearn; ``history_`` holds the mean
  log-likelihood per step (emflow's convention) and ``monitor_.history`` the totals.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from .. import __version__
from ..storage import store as _store
from ..checks import check_execution, check_int, check_real, rng_from
from ..execution.cluster import engine_for
from ..storage.data import DEFAULT_PARTITION_BYTES, SQUARE_LIMIT, is_zarr_path
from .em import EMResult, IterationEvent, run_em
from ..stats import require_finite
from .base import EMEstimator, Output
from ..errors import (
    ConfigError,
    DataError,
    DegenerateComponentWarning,
    EmflowConvergenceWarning,
    FeatureMismatchError,
    NotFittedError,
)
from ..models import hmm as H
from ..models import kmeans as KM
from ..storage.sequences import open_sequences, write_owned, write_step_outputs

__all__ = ["GaussianHMM", "CategoricalHMM", "ConvergenceMonitor", "GaussianHMMFamily", "CategoricalHMMFamily"]

SAMPLE_STEPS = 20_000
KMEANS_MAX_ITER = 100
KMEANS_TOL = 1e-4
# An inferred emission matrix larger than this means the symbols are not codes 0..M-1.
MAX_EMISSION_BYTES = 2**30


# -- family objects (shipped to workers) ----------------------------------------------
@dataclass(frozen=True, eq=False)
class GaussianHMMFamily:
    """EM family of Gaussian-emission HMMs (for :func:`emflow.estimators.em.run_em`)."""

    priors: H.GaussianPriors
    trans_priors: H.TransitionPriors
    params: str

    def e_step(self, values, offsets, p: H.GaussianHMMParams) -> H.GaussianHMMStats:
        return H.e_step_gaussian(values, offsets, p)

    def m_step(self, stats: H.GaussianHMMStats, p: H.GaussianHMMParams):
        return H.m_step_gaussian(stats, p, self.priors, self.trans_priors, self.params)

    def objective(self, stats) -> float:
        return float(stats.loglik) / float(stats.n_steps)


@dataclass(frozen=True, eq=False)
class CategoricalHMMFamily:
    """EM family of categorical-emission HMMs (for :func:`emflow.estimators.em.run_em`)."""

    emissionprob_prior: Any
    trans_priors: H.TransitionPriors
    params: str

    def e_step(self, values, offsets, p: H.CategoricalHMMParams) -> H.CategoricalHMMStats:
        return H.e_step_categorical(values, offsets, p)

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
def _km_e_step(values, offsets, centers, shift):
    return KM.e_step(np.asarray(values, dtype=np.float64), None, centers, shift)


def _moments(values, offsets, shift):
    Xc = np.asarray(values, dtype=np.float64) - shift
    return (np.asarray(float(len(Xc))), Xc.sum(axis=0), Xc.T @ Xc)


def _take_steps(values, offsets, rows):
    return np.asarray(values[rows], dtype=np.float64)


def _symbol_range(values, offsets, n_symbols, start):
    sym = H.check_symbols(values, n_symbols, "The sequences", start)
    return int(sym.min()), int(sym.max())


def _posterior_part(values, offsets, params, out_url: str | None, kind: str, start: int):
    layout = H.Layout(offsets)
    log_b = H.frame_log_prob(np.asarray(values)[layout.perm], params)
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


def _score_part(values, offsets, params):
    layout = H.Layout(offsets)
    log_b = H.frame_log_prob(np.asarray(values)[layout.perm], params)
    fb = H.forward_backward(log_b, layout, params.startprob, params.transmat, want_trans=False)
    return np.array([fb.loglik.sum(), layout.n_sequences, layout.n_steps], dtype=np.float64)


# -- the estimators ------------------------------------------------------------------
class _BaseHMM(EMEstimator):
    _family_name = ""
    data_kind = "sequences"
    iter_param = "n_iter"
    objective_name = "log-likelihood per step"
    summary_arrays = {"start probabilities": "startprob_"}
    outputs = {"labels": Output("predict", True), "proba": Output("predict_proba", True)}
    _emission_letters = ""
    _max_magnitude: float | None = None  # values beyond it: "scale the data", before any arithmetic

    def _rng(self, random_state=None) -> np.random.Generator:
        return rng_from(self.random_state if random_state is None else random_state)

    def _validate_common(self):
        check_int("n_components", self.n_components, 1)
        check_int("n_iter", self.n_iter, 0)
        check_real("tol", self.tol, 0)
        check_execution(self, partition_bytes_none=False)
        if self.algorithm not in ("viterbi", "map"):
            raise ConfigError(f"algorithm must be 'viterbi' or 'map', got {self.algorithm!r}.")
        letters = "st" + self._emission_letters
        for name in ("params", "init_params"):
            v = getattr(self, name)
            if not isinstance(v, str) or set(v) - set(letters):
                raise ConfigError(f"{name} must be a string of letters from {letters!r}, got {v!r}.")

    def _check_fitted(self):
        if not hasattr(self, "startprob_") or not hasattr(self, "monitor_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet. Call fit first, or load a saved model.")

    # data
    def _as_values(self, X):
        return X

    def _open(self, engine, X, lengths):
        if is_zarr_path(X):
            if lengths is not None:
                raise ConfigError("lengths is for in-memory data; a Zarr sequence group carries its own offsets.")
            seq = open_sequences(X, partition_bytes=self.partition_bytes, min_partitions=2 * engine.total_threads,
                                 max_magnitude=self._max_magnitude)
        else:
            seq = open_sequences(self._as_values(X), lengths, partition_bytes=self.partition_bytes,
                                 min_partitions=2 * engine.total_threads, max_magnitude=self._max_magnitude)
        return engine.load(seq, persist=self.persist)

    def _transition_init(self, rng: np.random.Generator, K: int):
        init = 1.0 / K
        sp = rng.dirichlet(np.full(K, init)) if "s" in self.init_params else None
        tm = rng.dirichlet(np.full(K, init), size=K) if "t" in self.init_params else None
        return sp, tm

    def _current(self, name: str, letter: str):
        if not hasattr(self, name):
            raise ConfigError(
                f"{name} is not set and init_params={self.init_params!r} does not contain {letter!r}: set "
                f"{name} on the estimator before fit, or add {letter!r} to init_params."
            )
        return np.array(getattr(self, name), dtype=np.float64)

    def _check_prob(self, name: str, a: np.ndarray, shape: tuple):
        if a.shape != shape:
            raise ConfigError(f"{name} must have shape {shape}, got {a.shape}.")
        if np.any(a < 0) or not np.allclose(a.sum(axis=-1), 1):
            raise ConfigError(f"{name} must hold probabilities whose rows sum to 1.")

    # fitting
    def fit(self, X, lengths=None, *, callbacks: Iterable[Callable[[IterationEvent], None]] = (),
            initial_params=None, history: list[float] | None = None):
        """Estimate the parameters by Baum-Welch (EM) over all sequences.

        Parameters
        ----------
        X : str, PathLike or array-like of shape (n_samples, n_features)
            A Zarr group of sequences (``values`` + ``offsets``), or the concatenated
            sequences in memory.
        lengths : array-like of int of shape (n_sequences,), optional
            Lengths of the in-memory sequences (hmmlearn's convention); ``None`` means one
            sequence.
        callbacks : iterable of callables
            Each is called with an :class:`~emflow.estimators.em.IterationEvent` after every iteration.
        initial_params, history
            Resume from a checkpoint: EM starts from these parameters (a
            ``GaussianHMMParams`` / ``CategoricalHMMParams``) with the iterations already
            recorded in ``history`` (means per step).

        Returns
        -------
        self
        """
        self._validate()
        callbacks = list(callbacks)
        if self.verbose:
            callbacks.append(_print_iteration)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                return self._fit_loaded(engine, loaded, callbacks, initial_params, history)
            finally:
                loaded.release()

    def _fit_loaded(self, engine, loaded, callbacks, initial_params, history):
        self._prepare_data(engine, loaded)
        params = initial_params if initial_params is not None else self._initial_params(engine, loaded, self._rng())
        self._set_params(params)
        n_steps = loaded.data.n_rows
        warned: set = set()

        def watch(event: IterationEvent):
            for k in event.report.get("empty_states", []):
                if k not in warned:
                    warned.add(k)
                    warnings.warn(
                        f"State {k} has no posterior mass at iteration {event.iteration}. Use fewer states "
                        "or another random_state.", DegenerateComponentWarning, stacklevel=2)

        totals: list[float] = []
        if self.n_iter == 0:
            result = EMResult(params, list(history or []), False, len(history or []), -math.inf)
        else:
            # hmmlearn's tol is on the total log-likelihood; run_em sees the mean per step
            result = run_em(engine, loaded, self._family(), params, tol=self.tol / n_steps,
                            max_iter=self.n_iter, callbacks=[watch, *callbacks], history=history)
            totals = [float(r["log_prob"]) for r in result.reports]
            if not result.converged:
                warnings.warn(
                    f"EM stopped after n_iter={self.n_iter} iterations before the gain in log-likelihood "
                    f"fell below tol={self.tol}. Increase n_iter or tol.", EmflowConvergenceWarning, stacklevel=3)
        self._set_params(result.params)
        self.converged_ = bool(result.converged)
        self.n_iter_ = int(result.n_iter)
        self.lower_bound_ = float(result.lower_bound)
        self.history_ = [float(v) for v in result.history]
        self.monitor_ = ConvergenceMonitor(self.tol, self.n_iter, totals, self.converged_)
        self.fit_info_ = {
            "fingerprint": loaded.fingerprint,
            "source": loaded.data.source,
            "n_sequences": int(loaded.data.n_sequences),
            "n_steps": int(n_steps),
            "n_features": int(loaded.data.n_features),
            "dtype": str(loaded.data.dtype),
            "partitions": loaded.data.n_partitions,
            "resident": bool(loaded.resident),
            "engine": engine.describe(),
            "seconds_per_iteration": [float(s) for s in result.seconds],
            "empty_states": sorted({k for r in result.reports for k in r.get("empty_states", [])}),
        }
        return self

    # applying a fitted model
    def _apply(self, X, lengths, kind: str, out=None, overwrite: bool = False):
        self._check_fitted()
        if out is not None:  # refuse before any work: nothing is replaced unasked
            _store.check_destination(out, "output", overwrite=overwrite, inputs=_store.output_inputs(self, X))
        params = self._params()
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                self._check_data(engine, loaded)
                starts = [a for a, _ in loaded.data.bounds]
                if out is None:
                    parts = engine.map(_posterior_part, loaded, params, None, kind, per_partition=starts)
                    return sum(p[0] for p in parts), np.concatenate([p[1] for p in parts])
                return self._write_output(engine, loaded, params, kind, out, starts)
            finally:
                loaded.release()

    def _write_output(self, engine, loaded, params, kind, out, starts):
        per_step = ((), "int64") if kind in ("states", "map") else ((self.n_components,), "float64")

        def fill(url):
            parts = engine.map(_posterior_part, loaded, params, url, kind, per_partition=starts)
            return [{"values": pieces} for _, pieces in parts], {"log_prob": float(sum(p[0] for p in parts))}

        return write_step_outputs(out, loaded, {"values": per_step}, fill, {
            "kind": {"states": "viterbi_states", "map": "map_states"}.get(kind, "posteriors"),
            "model_family": self._family_name,
        })

    def decode(self, X, lengths=None, algorithm: str | None = None):
        """Most likely states: ``(log_prob, states)`` with states of shape (n_samples,).

        ``algorithm="viterbi"`` (default: the estimator's) gives the best joint path and
        its total log-probability; ``"map"`` the most likely state of each step.
        """
        algorithm = algorithm or self.algorithm
        if algorithm not in ("viterbi", "map"):
            raise ConfigError(f"algorithm must be 'viterbi' or 'map', got {algorithm!r}.")
        if algorithm == "viterbi":
            return self._apply(X, lengths, "states")
        _, post = self._apply(X, lengths, "proba")
        # hmmlearn reports the sum of the per-step maximal posteriors for "map"
        return float(post.max(axis=1).sum()), post.argmax(axis=1)

    def predict(self, X, lengths=None, *, out=None, overwrite: bool = False):
        """State of each step (Viterbi, or per-step MAP with ``algorithm="map"``).

        Returns an ndarray of shape (n_samples,), or, with ``out``, the Zarr group written
        there: ``values`` (total_steps,) int64 states and ``offsets`` as in the input. An emflow
        output already at ``out`` is replaced only with ``overwrite=True``; anything else there,
        the input and the model's own path never are.
        """
        kind = "states" if self.algorithm == "viterbi" else "map"
        res = self._apply(X, lengths, kind, out, overwrite)
        return res[1] if out is None else res

    def predict_proba(self, X, lengths=None, *, out=None, overwrite: bool = False):
        """Posterior state probabilities: ndarray of shape (n_samples, n_components), or a Zarr group at ``out``."""
        res = self._apply(X, lengths, "proba", out, overwrite)
        return res[1] if out is None else res

    def score_samples(self, X, lengths=None):
        """``(log_prob, posteriors)``: total log-likelihood and (n_samples, n_components) posteriors."""
        return self._apply(X, lengths, "proba")

    def score(self, X, lengths=None) -> float:
        """Total log-likelihood of all sequences (hmmlearn's ``score``)."""
        self._check_fitted()
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                self._check_data(engine, loaded)
                tot = engine.map_reduce(_score_part, loaded, self._params())
            finally:
                loaded.release()
        return float(tot[0])

    def _n_parameters(self) -> int:
        raise NotImplementedError

    def bic(self, X, lengths=None) -> float:
        """Bayesian information criterion (lower is better)."""
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                self._check_data(engine, loaded)
                tot = engine.map_reduce(_score_part, loaded, self._params())
            finally:
                loaded.release()
        return -2 * float(tot[0]) + self._n_parameters() * np.log(tot[2])

    def aic(self, X, lengths=None) -> float:
        """Akaike information criterion (lower is better)."""
        return -2 * self.score(X, lengths) + 2 * self._n_parameters()

    def sample(self, n_samples: int = 1, random_state=None, currstate: int | None = None):
        """Draw one sequence: ``(X, state_sequence)``, X of shape (n_samples, n_features)."""
        self._check_fitted()
        if n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}.")
        return H.sample_sequence(self._params(), int(n_samples), self._rng(random_state), currstate)

    # persistence
    def _config(self) -> dict[str, Any]:
        cfg = {}
        for k, v in _store.saved_config(self.get_params()).items():
            if isinstance(v, (np.random.Generator, np.random.RandomState)):
                v = None
            if isinstance(v, np.ndarray):
                v = {"__array__": v.tolist()}
            cfg[k] = v
        return cfg

    @classmethod
    def _array_spec(cls, meta: dict) -> dict:
        """The arrays a saved HMM holds: shapes from its configuration, constraints (see store.RULES)."""
        K = int(meta["config"]["n_components"])
        return {"startprob": ((K,), ["simplex"]), "transmat": ((K, K), ["simplex"]),
                **cls._emission_spec(meta, K, int(meta["fitted"]["n_features"]))}

    def save(self, path, *, overwrite: bool = False) -> str:
        """Save the fitted model as a Zarr group at ``path``; returns the path.

        A model already at ``path`` is replaced only with ``overwrite=True`` (atomically);
        anything else there, and the data it was fitted on, never are.
        """
        self._check_fitted()
        meta = {
            "version": __version__,
            "class": type(self).__name__,
            "config": self._config(),
            "fitted": {"converged": self.converged_, "n_iter": self.n_iter_, "lower_bound": self.lower_bound_,
                       "n_features": int(self.n_features)},
            "history": self.history_,
            "monitor_history": self.monitor_.history,
            "dataset": getattr(self, "fit_info_", {}),
        }
        return _store.save_model(path, self._family_name, self._arrays(), meta, overwrite=overwrite,
                                 inputs=_store.fit_inputs(self))

    @classmethod
    def load(cls, path):
        """Load a model saved by :meth:`save`; arrays come back bit-identical, validated (scheduler None)."""
        arrays, meta = _store.load_model(path, cls._family_name, cls._array_spec)
        with _store.loading(path):
            cfg = {k: (np.asarray(v["__array__"]) if isinstance(v, dict) and "__array__" in v else v)
                   for k, v in meta["config"].items() if k in cls._param_names()}
            model = cls(**cfg)
            model._restore(arrays, meta["fitted"])
            _store.restore_fit_record(model, meta)
            model.monitor_ = ConvergenceMonitor(model.tol, model.n_iter, meta.get("monitor_history", []),
                                                model.converged_)
        return model


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
    tol : float, default 1e-2
        Stop when the gain in total log-likelihood falls below ``tol``.
    verbose : bool, default False
    params, init_params : str, default "stmc"
        Letters of the parameters to learn / to initialise: s startprob, t transmat,
        m means, c covars. Parameters not initialised must be set on the estimator
        (``model.means_ = ...``) before ``fit``.
    scheduler : None, "threads", "local", address or distributed.Client
    persist : "auto", True or False
    split_every : int, default 8
    partition_bytes : int
        Target bytes of values per partition (a partition holds whole sequences).

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
    n_features : int
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
                 init_params: str = "stmc", *, scheduler=None, persist="auto", split_every: int = 8,
                 partition_bytes: int = DEFAULT_PARTITION_BYTES):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.min_covar = min_covar
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.means_prior = means_prior
        self.means_weight = means_weight
        self.covars_prior = covars_prior
        self.covars_weight = covars_weight
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.verbose = verbose
        self.params = params
        self.init_params = init_params
        self.scheduler = scheduler
        self.persist = persist
        self.split_every = split_every
        self.partition_bytes = partition_bytes

    @property
    def covars_(self) -> np.ndarray:
        return H.full_covars(self._covars_, self.covariance_type, self.n_components, self.means_.shape[1])

    @covars_.setter
    def covars_(self, covars) -> None:
        self._covars_ = np.array(covars, dtype=np.float64, copy=True)

    def _validate(self):
        self._validate_common()
        if self.covariance_type not in H.COVARIANCE_TYPES:
            raise ConfigError(f"covariance_type must be one of {H.COVARIANCE_TYPES}, got {self.covariance_type!r}.")
        check_real("min_covar", self.min_covar, 0, finite=True)

    def _family(self):
        pri = H.GaussianPriors(self.means_prior, self.means_weight, self.covars_prior, self.covars_weight)
        return GaussianHMMFamily(pri, H.TransitionPriors(self.startprob_prior, self.transmat_prior), self.params)

    def _prepare_data(self, engine, loaded):
        if loaded.data.n_rows < 2 and "c" in self.init_params:
            raise DataError("Initialising covariances needs at least 2 steps of data.")

    def _check_data(self, engine, loaded):
        d = loaded.data.n_features
        if d != self.means_.shape[1]:
            raise FeatureMismatchError(
                f"The model was fitted on {self.means_.shape[1]} feature(s) but the sequences have {d}. "
                "Apply it to data with the same columns, in the same order.")

    def _initial_params(self, engine, loaded, rng) -> H.GaussianHMMParams:
        K, d, ct = self.n_components, loaded.data.n_features, self.covariance_type
        sp, tm = self._transition_init(rng, K)
        sp = sp if sp is not None else self._current("startprob_", "s")
        tm = tm if tm is not None else self._current("transmat_", "t")
        if "m" in self.init_params:
            means = self._kmeans(engine, loaded, rng)
        else:
            means = self._current("means_", "m")
        if "c" in self.init_params:
            g0 = means.mean(axis=0)
            n, s1, s2 = engine.map_reduce(_moments, loaded, g0)
            require_finite((n, s1, s2), "Gaussian HMM initial covariance")
            n = float(n)
            cv = (s2 - np.outer(s1, s1) / n) / (n - 1) + self.min_covar * np.eye(d)
            cv = 0.5 * (cv + cv.T)
            covars = {"full": lambda: np.tile(cv, (K, 1, 1)), "tied": lambda: cv,
                      "diag": lambda: np.tile(np.diag(cv), (K, 1)),
                      "spherical": lambda: np.full(K, np.diag(cv).mean())}[ct]()
        else:
            if not hasattr(self, "_covars_"):
                self._current("covars_", "c")
            covars = np.array(self._covars_, dtype=np.float64)
        self._check_prob("startprob_", np.asarray(sp), (K,))
        self._check_prob("transmat_", np.asarray(tm), (K, K))
        if means.shape != (K, d):
            raise ConfigError(f"means_ must have shape {(K, d)}, got {means.shape}.")
        want = {"spherical": (K,), "diag": (K, d), "full": (K, d, d), "tied": (d, d)}[ct]
        if covars.shape != want:
            raise ConfigError(f"covars_ for covariance_type={ct!r} must have shape {want}, got {covars.shape}.")
        return H.GaussianHMMParams(np.asarray(sp, dtype=np.float64), np.asarray(tm, dtype=np.float64), means, covars, ct)

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

    def _params(self) -> H.GaussianHMMParams:
        return H.GaussianHMMParams(np.asarray(self.startprob_, dtype=np.float64),
                                   np.asarray(self.transmat_, dtype=np.float64),
                                   np.asarray(self.means_, dtype=np.float64),
                                   np.asarray(self._covars_, dtype=np.float64), self.covariance_type)

    def _set_params(self, p: H.GaussianHMMParams):
        self.startprob_, self.transmat_, self.means_ = p.startprob, p.transmat, p.means
        self._covars_ = p.covars
        self.n_features = int(p.means.shape[1])

    def _n_parameters(self) -> int:
        return H.n_free_parameters(self.n_components, self.means_.shape[1], "gaussian", self.covariance_type)

    def _arrays(self):
        return {"startprob": self.startprob_, "transmat": self.transmat_, "means": self.means_, "covars": self._covars_}

    @staticmethod
    def _emission_spec(meta, K, d):
        ct = meta["config"]["covariance_type"]
        cov = {"full": (K, d, d), "tied": (d, d), "diag": (K, d), "spherical": (K,)}[ct]
        return {"means": ((K, d), []), "covars": (cov, ["spd"] if ct in ("full", "tied") else ["positive"])}

    def _restore(self, arrays, fitted):
        self._set_params(H.GaussianHMMParams(arrays["startprob"], arrays["transmat"], arrays["means"],
                                             arrays["covars"], self.covariance_type))


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
    algorithm, random_state, n_iter, tol, verbose
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
                 params: str = "ste", init_params: str = "ste", scheduler=None, persist="auto",
                 split_every: int = 8, partition_bytes: int = DEFAULT_PARTITION_BYTES):
        self.n_components = n_components
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.emissionprob_prior = emissionprob_prior
        self.n_features = n_features
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.verbose = verbose
        self.params = params
        self.init_params = init_params
        self.scheduler = scheduler
        self.persist = persist
        self.split_every = split_every
        self.partition_bytes = partition_bytes

    def _validate(self):
        self._validate_common()
        check_int("n_features", self.n_features, 1, allow_none=True)

    def _as_values(self, X):
        X = np.asarray(X)
        return X[:, None] if X.ndim == 1 else X

    def _family(self):
        return CategoricalHMMFamily(self.emissionprob_prior, H.TransitionPriors(self.startprob_prior, self.transmat_prior),
                                    self.params)

    def _symbols_seen(self, engine, loaded, n_symbols=None) -> int:
        if loaded.data.n_features != 1:
            raise DataError(f"Categorical sequences must have one column (n_steps, 1); got {loaded.data.n_features}.")
        starts = [a for a, _ in loaded.data.bounds]
        ranges = engine.map(_symbol_range, loaded, n_symbols, per_partition=starts)
        return max(r[1] for r in ranges) + 1

    def _prepare_data(self, engine, loaded):
        M = self.n_features
        if M is None and "e" not in self.init_params and hasattr(self, "emissionprob_"):
            M = int(np.shape(self.emissionprob_)[1])
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
        sp, tm = self._transition_init(rng, K)
        sp = sp if sp is not None else self._current("startprob_", "s")
        tm = tm if tm is not None else self._current("transmat_", "t")
        if "e" in self.init_params:
            E = rng.random((K, M))
            E /= E.sum(axis=1, keepdims=True)
        else:
            E = self._current("emissionprob_", "e")
        self._check_prob("startprob_", np.asarray(sp), (K,))
        self._check_prob("transmat_", np.asarray(tm), (K, K))
        self._check_prob("emissionprob_", E, (K, M))
        return H.CategoricalHMMParams(np.asarray(sp, dtype=np.float64), np.asarray(tm, dtype=np.float64), E)

    def _params(self) -> H.CategoricalHMMParams:
        return H.CategoricalHMMParams(np.asarray(self.startprob_, dtype=np.float64),
                                      np.asarray(self.transmat_, dtype=np.float64),
                                      np.asarray(self.emissionprob_, dtype=np.float64))

    def _set_params(self, p: H.CategoricalHMMParams):
        self.startprob_, self.transmat_, self.emissionprob_ = p.startprob, p.transmat, p.emissionprob
        if self.n_features is None:
            self.n_features = int(p.emissionprob.shape[1])

    def _n_parameters(self) -> int:
        return H.n_free_parameters(self.n_components, self.emissionprob_.shape[1], "categorical")

    def _arrays(self):
        return {"startprob": self.startprob_, "transmat": self.transmat_, "emissionprob": self.emissionprob_}

    @staticmethod
    def _emission_spec(meta, K, d):
        return {"emissionprob": ((K, d), ["simplex"])}

    def _restore(self, arrays, fitted):
        self._set_params(H.CategoricalHMMParams(arrays["startprob"], arrays["transmat"], arrays["emissionprob"]))


def _print_iteration(event: IterationEvent) -> None:
    print(f"iter {event.iteration:4d}  log-likelihood/step {event.log_likelihood:.10g}  "
          f"change {event.change:.3g}  {event.seconds:.3f}s", flush=True)
