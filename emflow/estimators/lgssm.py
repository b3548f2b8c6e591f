"""``LinearGaussianSSM``: a Kalman filter / smoother whose parameters are learned by EM over many sequences.

The model is the linear-Gaussian state-space model (a "Kalman filter model", a linear
dynamical system)::

    z_1 ~ N(mu0, V0),  z_t = A z_{t-1} + w_t,  w_t ~ N(0, Q),  y_t = C z_t + v_t,  v_t ~ N(0, R)

The E-step runs a Kalman filter and a Rauch-Tung-Striebel smoother on every sequence of a
partition (on a Dask worker or a thread) and returns small additive statistics; the M-step is
closed form (Shumway and Stoffer, 1982; Ghahramani and Hinton, 1996). Names follow pykalman's
``KalmanFilter`` (``em_vars``, ``filter``, ``smooth``, ``sample``, ``loglikelihood``), with
emflow's common estimator surface.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from .. import __version__
from ..storage import store as _store
from ..checks import ParamsMixin, check_choice, check_execution, check_int, check_real, rng_from
from ..execution.cluster import engine_for
from ..storage.data import DEFAULT_PARTITION_BYTES, SQUARE_LIMIT, is_zarr_path
from .em import EMResult, IterationEvent, run_em
from ..errors import (
    ConfigError,
    DegenerateComponentWarning,
    EmflowConvergenceWarning,
    FeatureMismatchError,
    NotFittedError,
)
from ..models import lgssm as M
from ..storage.sequences import open_sequences, write_owned, write_step_outputs

__all__ = ["LinearGaussianSSM", "LGSSMFamily", "Forecast"]

FAMILY = "linear_gaussian_ssm"
COVARIANCE_TYPES = ("full", "diag")
_INIT_NAMES = M.EM_VARS  # constructor arguments holding initial / fixed values, in LGSSMParams order


@dataclass(frozen=True)
class LGSSMFamily:
    """The EM family object for linear-Gaussian state-space models (picklable; shipped to workers)."""

    em_vars: frozenset
    transition_covariance_type: str = "full"
    observation_covariance_type: str = "full"
    reg_covar: float = 0.0

    def e_step(self, values, offsets, params: M.LGSSMParams) -> M.LGSSMStats:
        return M.e_step(values, offsets, params)

    def m_step(self, stats: M.LGSSMStats, params: M.LGSSMParams):
        return M.m_step(
            stats, params, self.em_vars, transition_covariance_type=self.transition_covariance_type,
            observation_covariance_type=self.observation_covariance_type, reg_covar=self.reg_covar,
        )

    def objective(self, stats: M.LGSSMStats) -> float:
        """Mean log-likelihood per step."""
        return float(stats.loglik) / float(stats.n_steps)


class Forecast(NamedTuple):
    """Predictive distributions ``n_steps`` ahead.

    Attributes
    ----------
    state_means : ndarray of shape (n_steps, state_dim)
    state_covariances : ndarray of shape (n_steps, state_dim, state_dim)
    observation_means : ndarray of shape (n_steps, n_features)
    observation_covariances : ndarray of shape (n_steps, n_features, n_features)
    """

    state_means: np.ndarray
    state_covariances: np.ndarray
    observation_means: np.ndarray
    observation_covariances: np.ndarray


def _state_part(values, offsets, params: M.LGSSMParams, out_url: str | None, kind: str, start: int):
    """Filtered or smoothed state means and covariances of one partition's sequences."""
    Y = np.asarray(values, dtype=np.float64)
    means, covs = [], []
    for a, b in zip(offsets[:-1], offsets[1:]):
        f = M.kalman_filter(Y[a:b], params)
        if kind == "smooth":
            r = M.rts_smoother(params.A, f)
            means.append(r.means)
            covs.append(r.covariances)
        else:
            means.append(f.filtered_means)
            covs.append(f.filtered_covariances)
    m, c = np.concatenate(means), np.concatenate(covs)
    if out_url is None:
        return m, c
    return write_owned(out_url + "/values", m, start), write_owned(out_url + "/covariances", c, start)


class LinearGaussianSSM(ParamsMixin):
    """Linear-Gaussian state-space model (Kalman filter and smoother) fitted by EM.

    ``z_1 ~ N(mu0, V0)``, ``z_t = A z_{t-1} + w_t`` with ``w_t ~ N(0, Q)``, and
    ``y_t = C z_t + v_t`` with ``v_t ~ N(0, R)``. ``fit`` learns any chosen subset of
    ``A, C, Q, R, mu0, V0`` by EM over many sequences of different lengths (the E-step is a
    Kalman filter plus a Rauch-Tung-Striebel smoother per sequence, run where the data are);
    the other parameters stay at their given values. Missing observations are NaN: the
    Kalman update uses the observed components of a step and is skipped when none is.

    Parameters
    ----------
    state_dim : int, default 1
        Dimension ``k`` of the hidden state.
    em_vars : "all" or list of str, default "all"
        Parameters EM learns: any of ``"transition_matrix"`` (``"A"``),
        ``"observation_matrix"`` (``"C"``), ``"transition_covariance"`` (``"Q"``),
        ``"observation_covariance"`` (``"R"``), ``"initial_state_mean"`` (``"mu0"``),
        ``"initial_state_covariance"`` (``"V0"``). pykalman's plural names are accepted.
    transition_covariance_type, observation_covariance_type : {"full", "diag"}, default "full"
        Structure of the learned ``Q`` and ``R``.
    transition_matrix : array-like of shape (k, k), optional
        Initial (or, when not learned, fixed) ``A``. Default: identity.
    observation_matrix : array-like of shape (n_features, k), optional
        Default: ``numpy.eye(n_features, k)``.
    transition_covariance : array-like of shape (k, k), optional
        Default: identity.
    observation_covariance : array-like of shape (n_features, n_features), optional
        Default: identity.
    initial_state_mean : array-like of shape (k,), optional
        Default: zeros.
    initial_state_covariance : array-like of shape (k, k), optional
        Default: identity. (The defaults are pykalman's.)
    tol : float, default 1e-4
        Convergence threshold on the change of the mean log-likelihood per step.
    max_iter : int, default 100
    reg_covar : float, default 0.0
        Added to the diagonal of learned covariances.
    random_state : int, numpy Generator or None
        Seed for :meth:`sample`.
    verbose : int, default 0
        1 prints a line per iteration.
    scheduler : None, "threads", "local", address string or distributed.Client
        Where to run (see :mod:`emflow.execution.cluster`).
    persist : "auto", True or False, default "auto"
        Keep the sequences in worker memory between iterations.
    split_every : int, default 8
        Fan-in of the tree reduction of statistics.
    partition_bytes : int or None
        Target bytes per partition (a partition is a run of whole sequences); ``None`` is
        the library default.

    Attributes
    ----------
    transition_matrix_ : ndarray of shape (k, k)
    observation_matrix_ : ndarray of shape (n_features, k)
    transition_covariance_ : ndarray of shape (k, k)
    observation_covariance_ : ndarray of shape (n_features, n_features)
    initial_state_mean_ : ndarray of shape (k,)
    initial_state_covariance_ : ndarray of shape (k, k)
    history_ : list of float
        Mean log-likelihood per step of the parameters entering each iteration.
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Last entry of ``history_``.
    n_features_in_ : int
    fit_info_ : dict
        Dataset fingerprint and source, sequences, steps, partitions, engine, seconds per
        iteration, repaired covariances.
    """

    def __init__(
        self,
        state_dim: int = 1,
        *,
        em_vars="all",
        transition_covariance_type: str = "full",
        observation_covariance_type: str = "full",
        transition_matrix=None,
        observation_matrix=None,
        transition_covariance=None,
        observation_covariance=None,
        initial_state_mean=None,
        initial_state_covariance=None,
        tol: float = 1e-4,
        max_iter: int = 100,
        reg_covar: float = 0.0,
        random_state=None,
        verbose: int = 0,
        scheduler=None,
        persist="auto",
        split_every: int = 8,
        partition_bytes: int | None = None,
    ):
        self.state_dim = state_dim
        self.em_vars = em_vars
        self.transition_covariance_type = transition_covariance_type
        self.observation_covariance_type = observation_covariance_type
        self.transition_matrix = transition_matrix
        self.observation_matrix = observation_matrix
        self.transition_covariance = transition_covariance
        self.observation_covariance = observation_covariance
        self.initial_state_mean = initial_state_mean
        self.initial_state_covariance = initial_state_covariance
        self.tol = tol
        self.max_iter = max_iter
        self.reg_covar = reg_covar
        self.random_state = random_state
        self.verbose = verbose
        self.scheduler = scheduler
        self.persist = persist
        self.split_every = split_every
        self.partition_bytes = partition_bytes

    def _validate(self) -> frozenset:
        check_int("state_dim", self.state_dim, 1)
        for name in ("transition_covariance_type", "observation_covariance_type"):
            check_choice(name, getattr(self, name), COVARIANCE_TYPES)
        check_real("tol", self.tol, 0)
        check_real("reg_covar", self.reg_covar, 0, finite=True)
        check_int("max_iter", self.max_iter, 0)
        check_execution(self)
        return M.normalize_em_vars(self.em_vars)

    def _initial_params(self, p: int) -> M.LGSSMParams:
        k = int(self.state_dim)
        defaults = (np.eye(k), np.eye(p, k), np.eye(k), np.eye(p), np.zeros(k), np.eye(k))
        given = [getattr(self, n) for n in _INIT_NAMES]
        vals = [d if g is None else np.asarray(g, dtype=np.float64) for g, d in zip(given, defaults)]
        for v, d, name in zip(vals, defaults, _INIT_NAMES):
            if v.shape != d.shape:
                where = f" for state_dim={k} and data with {p} feature(s)"
                raise ConfigError(f"{name} has shape {v.shape}; expected {d.shape}{where}.")
        return M.check_params(M.LGSSMParams(*vals))

    def _check_fitted(self) -> None:
        if not hasattr(self, "transition_matrix_"):
            raise NotFittedError(
                "This LinearGaussianSSM is not fitted yet. Call fit(X, lengths) first, or load a "
                "saved model with emflow.load(path)."
            )

    @property
    def _params(self) -> M.LGSSMParams:
        self._check_fitted()
        return M.LGSSMParams(self.transition_matrix_, self.observation_matrix_, self.transition_covariance_,
                             self.observation_covariance_, self.initial_state_mean_, self.initial_state_covariance_)

    def _set_params(self, params: M.LGSSMParams) -> None:
        (self.transition_matrix_, self.observation_matrix_, self.transition_covariance_,
         self.observation_covariance_, self.initial_state_mean_, self.initial_state_covariance_) = params

    def _rng(self) -> np.random.Generator:
        return rng_from(self.random_state)

    # -- data ------------------------------------------------------------------------
    def _open(self, engine, X, lengths):
        if is_zarr_path(X) and lengths is not None:
            raise ConfigError(
                "lengths is for in-memory data only; a Zarr sequences group carries its own offsets."
            )
        return open_sequences(
            X, lengths, partition_bytes=self.partition_bytes or DEFAULT_PARTITION_BYTES,
            min_partitions=2 * engine.total_threads, allow_nan=True, max_magnitude=SQUARE_LIMIT,
        )

    # -- fitting ---------------------------------------------------------------------
    def fit(self, X, lengths=None, *, callbacks: Iterable[Callable[[IterationEvent], None]] = (),
            initial_params: M.LGSSMParams | None = None, history: list[float] | None = None) -> "LinearGaussianSSM":
        """Learn the parameters in ``em_vars`` by EM.

        Parameters
        ----------
        X : str, PathLike or array-like of shape (total_steps, n_features)
            A Zarr sequences group (``values`` + ``offsets``, see
            :func:`emflow.storage.sequences.write_sequences`) or the concatenated sequences in
            memory. NaN entries are missing observations.
        lengths : array-like of shape (n_sequences,), optional
            Lengths of the in-memory sequences (hmmlearn's convention); ``None`` is one sequence.
        callbacks : iterable of callables
            Called with an :class:`~emflow.estimators.em.IterationEvent` after every iteration.
        initial_params, history
            Resume from a checkpoint: start from these :class:`~emflow.models.lgssm.LGSSMParams`
            with the iterations already recorded in ``history``.

        Returns
        -------
        self
        """
        em_vars = self._validate()
        callbacks = list(callbacks)
        if self.verbose:
            callbacks.append(_print_iteration)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            seqs = self._open(engine, X, lengths)
            loaded = engine.load(seqs, persist=self.persist)
            try:
                return self._fit_loaded(engine, loaded, em_vars, callbacks, initial_params, history)
            finally:
                loaded.release()

    def _fit_loaded(self, engine, loaded, em_vars, callbacks, initial_params, history):
        p = loaded.data.n_features
        params = M.check_params(initial_params) if initial_params is not None else self._initial_params(p)
        if params.C.shape[0] != p:
            raise FeatureMismatchError(f"initial_params are for {params.C.shape[0]} feature(s) but the data have {p}.")
        family = LGSSMFamily(em_vars, self.transition_covariance_type, self.observation_covariance_type,
                             float(self.reg_covar))
        warned: set = set()

        def watch(event: IterationEvent):
            for name, jitter in event.report.get("repaired_covariances", {}).items():
                if name not in warned:
                    warned.add(name)
                    warnings.warn(
                        f"The learned {name} was not positive definite at iteration {event.iteration}; "
                        f"added {jitter:.3g} to its diagonal. Consider reg_covar > 0, a smaller state_dim, "
                        "or holding that parameter fixed.", DegenerateComponentWarning, stacklevel=2,
                    )
            for name in event.report.get("skipped", []):
                if ("skip", name) not in warned:
                    warned.add(("skip", name))
                    warnings.warn(
                        f"{name} was not updated: the data carry no information about it (every "
                        "sequence has one step, or no value is observed). It keeps its given value.",
                        DegenerateComponentWarning, stacklevel=2,
                    )

        if self.max_iter == 0:
            result = EMResult(params, [], False, 0, -math.inf)
        else:
            result = run_em(engine, loaded, family, params, tol=self.tol, max_iter=self.max_iter,
                            callbacks=[watch, *callbacks], history=history)
        if not result.converged and self.max_iter > 0:
            warnings.warn(
                f"EM did not converge in {self.max_iter} iterations (last change above tol={self.tol}). "
                "Try increasing max_iter or tol.", EmflowConvergenceWarning, stacklevel=3,
            )
        self._set_params(result.params)
        self.converged_, self.n_iter_ = bool(result.converged), int(result.n_iter)
        self.lower_bound_ = float(result.lower_bound)
        self.history_ = [float(v) for v in result.history]
        self.n_features_in_ = p
        repaired = sorted({k for r in result.reports for k in r.get("repaired_covariances", {})})
        self.fit_info_ = {
            "fingerprint": loaded.fingerprint,
            "source": loaded.data.source,
            "n_sequences": int(loaded.data.n_sequences),
            "n_steps": int(loaded.data.n_rows),
            "n_features": p,
            "dtype": str(loaded.data.dtype),
            "partitions": loaded.data.n_partitions,
            "resident": bool(loaded.resident),
            "engine": engine.describe(),
            "em_vars": sorted(em_vars),
            "seconds_per_iteration": [float(s) for s in result.seconds],
            "repaired_covariances": repaired,
        }
        return self

    # -- applying a fitted model -----------------------------------------------------
    def _check_features(self, p: int) -> None:
        if p != self.n_features_in_:
            raise FeatureMismatchError(
                f"The model was fitted on {self.n_features_in_} feature(s) but the data have {p}. "
                "Apply it to data with the same columns, in the same order."
            )

    def _sequences_in_memory(self, X, lengths) -> list[np.ndarray]:
        seqs = open_sequences(X, lengths, partition_bytes=1 << 62, allow_nan=True)
        self._check_features(seqs.n_features)
        out = []
        for ld in seqs.loaders:
            values, off = ld()
            values = np.asarray(values, dtype=np.float64)
            out.extend(values[a:b] for a, b in zip(off[:-1], off[1:]))
        return out

    def filter(self, X, lengths=None, *, out=None, overwrite: bool = False):
        """Kalman filter: ``E[z_t | y_1..y_t]`` and its covariance for every step.

        Parameters
        ----------
        X : array-like of shape (total_steps, n_features), or a Zarr sequences group; NaN = missing.
        lengths : array-like of shape (n_sequences,), optional
        out : str or path, optional
            Write the result to a Zarr sequences group there instead of returning it,
            partition by partition on the engine: ``values`` (the means, total_steps x
            state_dim), ``covariances`` (total_steps x state_dim x state_dim) and the input's
            ``offsets``. An emflow output already there is replaced only with
            ``overwrite=True``; anything else there, the input and the model's own path never are.

        Returns
        -------
        means : ndarray of shape (total_steps, state_dim)
        covariances : ndarray of shape (total_steps, state_dim, state_dim)
            Or, with ``out``, the Zarr group written.
        """
        return self._states(X, lengths, "filter", out, overwrite)

    def smooth(self, X, lengths=None, *, out=None, overwrite: bool = False):
        """Rauch-Tung-Striebel smoother: ``E[z_t | y_1..y_T]`` and its covariance for every step.

        Same inputs and outputs as :meth:`filter`.
        """
        return self._states(X, lengths, "smooth", out, overwrite)

    def _states(self, X, lengths, kind: str, out, overwrite: bool = False):
        params = self._params
        if out is not None:  # refuse before any work: nothing is replaced unasked
            _store.check_destination(out, "output", overwrite=overwrite, inputs=_store.output_inputs(self, X))
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            seqs = self._open(engine, X, lengths)
            self._check_features(seqs.n_features)
            loaded = engine.load(seqs, persist=False)
            try:
                starts = [a for a, _ in seqs.bounds]
                if out is None:
                    parts = engine.map(_state_part, loaded, params, None, kind, per_partition=starts)
                    return np.concatenate([m for m, _ in parts]), np.concatenate([c for _, c in parts])
                return self._write_states(engine, loaded, params, kind, out, starts)
            finally:
                loaded.release()

    def _write_states(self, engine, loaded, params, kind, out, starts):
        k = int(self.state_dim)

        def fill(url):
            parts = engine.map(_state_part, loaded, params, url, kind, per_partition=starts)
            return [{"values": m, "covariances": c} for m, c in parts], {}

        return write_step_outputs(out, loaded, {"values": ((k,), "float64"), "covariances": ((k, k), "float64")}, fill, {
            "kind": {"filter": "filtered_states", "smooth": "smoothed_states"}[kind], "model_family": FAMILY,
        })

    def score(self, X, lengths=None) -> float:
        """Total log-likelihood ``sum log p(y_obs)`` of the sequences (pykalman's ``loglikelihood``).

        Computed by the prediction-error decomposition of the Kalman filter, on the engine
        (``X`` may be a Zarr sequences group of any size).
        """
        params = self._params
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            seqs = self._open(engine, X, lengths)
            self._check_features(seqs.n_features)
            loaded = engine.load(seqs, persist=False)
            try:
                tot = engine.map_reduce(M.loglik_stats, loaded, params)
            finally:
                loaded.release()
        return float(tot[0])

    loglikelihood = score

    def sample(self, n_steps: int = 1, *, initial_state=None, random_state=None) -> tuple[np.ndarray, np.ndarray]:
        """Draw one sequence: ``(states, observations)`` of shapes (n_steps, state_dim) and (n_steps, n_features)."""
        params = self._params
        if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ConfigError(f"n_steps must be a positive integer, got {n_steps!r}.")
        rng = self._rng() if random_state is None else rng_from(random_state)
        init = None if initial_state is None else np.asarray(initial_state, dtype=np.float64)
        if init is not None and init.shape != (params.A.shape[0],):
            raise ConfigError(f"initial_state must have shape ({params.A.shape[0]},), got {init.shape}.")
        return M.sample(params, int(n_steps), rng, init)

    def forecast(self, X=None, n_steps: int = 1) -> Forecast:
        """Predictive distributions of the next ``n_steps`` states and observations.

        Parameters
        ----------
        X : array-like of shape (T, n_features), optional
            One observed sequence (NaN = missing): the forecast starts after its last step.
            ``None`` forecasts the first ``n_steps`` steps of a new sequence from ``N(mu0, V0)``.
        n_steps : int, default 1

        Returns
        -------
        Forecast
        """
        params = self._params
        if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ConfigError(f"n_steps must be a positive integer, got {n_steps!r}.")
        if X is None:
            # step 1 is N(mu0, V0): start one step "before" by forecasting n-1 steps from it
            sm, sc, om, oc = M.forecast(params, params.mu0, params.V0, int(n_steps) - 1)
            m0, V0 = params.mu0[None], params.V0[None]
            C, R = params.C, params.R
            return Forecast(np.concatenate([m0, sm]), np.concatenate([V0, sc]),
                            np.concatenate([(C @ params.mu0)[None], om]),
                            np.concatenate([(C @ params.V0 @ C.T + R)[None], oc]))
        seqs = self._sequences_in_memory(X, None)
        filt = M.kalman_filter(seqs[0], params)
        return Forecast(*M.forecast(params, filt.filtered_means[-1], filt.filtered_covariances[-1], int(n_steps)))

    # -- persistence -----------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        cfg = {}
        for k, v in _store.saved_config(self.get_params()).items():
            if k in _INIT_NAMES and v is not None:
                v = np.asarray(v, dtype=np.float64).tolist()
            if k == "em_vars" and not isinstance(v, str):
                v = list(v)
            if isinstance(v, np.random.Generator | np.random.RandomState):
                v = None
            cfg[k] = v
        return cfg

    @staticmethod
    def _array_spec(meta: dict) -> dict:
        """The arrays a saved state-space model holds: shapes and constraints (see store.RULES)."""
        k, d = int(meta["config"]["state_dim"]), int(meta["fitted"]["n_features_in"])
        shapes = {"transition_matrix": ((k, k), []), "observation_matrix": ((d, k), []),
                  "transition_covariance": ((k, k), ["psd"]), "observation_covariance": ((d, d), ["psd"]),
                  "initial_state_mean": ((k,), []), "initial_state_covariance": ((k, k), ["psd"])}
        return {n: shapes[n] for n in _INIT_NAMES}

    def save(self, path, *, overwrite: bool = False) -> str:
        """Save the fitted model as a Zarr group at ``path``; returns the path.

        A model already at ``path`` is replaced only with ``overwrite=True`` (atomically);
        anything else there, and the data it was fitted on, never are.
        """
        self._check_fitted()
        arrays = dict(zip(_INIT_NAMES, self._params))
        meta = {
            "version": __version__,
            "class": "LinearGaussianSSM",
            "config": self._config(),
            "fitted": {"converged": self.converged_, "n_iter": self.n_iter_, "lower_bound": self.lower_bound_,
                       "n_features_in": self.n_features_in_},
            "history": self.history_,
            "dataset": getattr(self, "fit_info_", {}),
        }
        return _store.save_model(path, FAMILY, arrays, meta, overwrite=overwrite, inputs=_store.fit_inputs(self))

    @classmethod
    def load(cls, path) -> "LinearGaussianSSM":
        """Load a model saved by :meth:`save`; arrays come back bit-identical, validated (scheduler None)."""
        arrays, meta = _store.load_model(path, FAMILY, cls._array_spec)
        with _store.loading(path):
            cfg = dict(meta["config"])
            for k in _INIT_NAMES:
                if cfg.get(k) is not None:
                    cfg[k] = np.asarray(cfg[k], dtype=np.float64)
            model = cls(**{k: v for k, v in cfg.items() if k in cls._param_names()})
            model._set_params(M.LGSSMParams(*(arrays[n] for n in _INIT_NAMES)))
            _store.restore_fit_record(model, meta)
        return model


def _print_iteration(event: IterationEvent) -> None:
    print(
        f"iter {event.iteration:4d}  log-likelihood/step {event.log_likelihood:.10g}  "
        f"change {event.change:.3g}  {event.seconds:.3f}s",
        flush=True,
    )
