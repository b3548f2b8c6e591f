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

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import numpy as np

from ..storage import destinations as _dest
from ..checks import Choice, Int, Real, rng_from
from ..execution.cluster import engine_for
from ..storage.data import DEFAULT_PARTITION_BYTES, SQUARE_LIMIT, is_zarr_path
from .em import IterationEvent
from ..errors import ConfigError, DegenerateComponentWarning, FeatureMismatchError
from .base import EMEstimator, Output
from ..models import lgssm as M
from ..models import lgssm_long as LL
from ..models import lgssm_stats as MS
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

    def e_step(self, values, offsets, params: M.LGSSMParams, link=None) -> M.LGSSMStats:
        if link is not None:  # a slice of a sequence cut across partitions
            return LL.slice_stats(values, params, link)
        return M.e_step(values, offsets, params)

    sweeps = LL.Sweeps()

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


def _state_part(values, offsets, params: M.LGSSMParams, out_url: str | None, kind: str, start: int, link=None):
    """Filtered or smoothed state means and covariances of one partition's sequences.

    The sequences are filtered together (:func:`emflow.models.lgssm_stats.partition_states`),
    a run of whole sequences within the step budget at a time; with ``out_url`` each run is
    written as it is done and only the edge pieces of chunks it shares come back. With
    ``link`` the partition is one slice of a cut sequence, filtered from its boundary messages.
    """
    Y = np.asarray(values, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    k, p = params.A.shape[0], params.C.shape[0]
    if link is not None:
        pieces = [(0, LL.slice_states(Y, params, link, kind))]
    else:
        pieces = ((offsets[i], MS.partition_states(Y[offsets[i]:offsets[j]], offsets[i : j + 1] - offsets[i],
                                                   params, kind)) for i, j in MS.runs(offsets, k, p))
    means, covs, edges_m, edges_c = [], [], [], []
    for a, (m, c) in pieces:
        if out_url is None:
            means.append(m)
            covs.append(c)
        else:
            edges_m += write_owned(out_url + "/values", m, start + int(a))
            edges_c += write_owned(out_url + "/covariances", c, start + int(a))
    if out_url is None:
        return np.concatenate(means), np.concatenate(covs)
    return edges_m, edges_c


_state_part.sweeps = LL.StateSweeps()


class LinearGaussianSSM(EMEstimator):
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

    family = FAMILY
    data_kind = "sequences"

    def _allows_nan(self) -> bool:  # NaN marks a missing observation
        return True
    params_type = M.LGSSMParams
    fitted = {f: f"{n}_" for f, n in zip(M.LGSSMParams._fields, _INIT_NAMES)}
    outputs = {"smoothed_states": Output("smooth", True), "filtered_states": Output("filter")}
    array_params = _INIT_NAMES
    objective_name = "log-likelihood per step"
    size_param = ("state_dim", "state dimension")
    _param_rules = {
        "state_dim": Int(1), "transition_covariance_type": Choice(*COVARIANCE_TYPES),
        "observation_covariance_type": Choice(*COVARIANCE_TYPES), "tol": Real(0),
        "reg_covar": Real(0, finite=True), "max_iter": Int(0),
    }

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

    def _validate_more(self) -> None:
        self._em_vars()

    def _em_vars(self) -> frozenset:
        return M.normalize_em_vars(self.em_vars)

    def _initial_params(self, engine, loaded, rng) -> M.LGSSMParams:
        k, p = int(self.state_dim), loaded.data.n_features
        defaults = (np.eye(k), np.eye(p, k), np.eye(k), np.eye(p), np.zeros(k), np.eye(k))
        given = [getattr(self, n) for n in _INIT_NAMES]
        vals = [d if g is None else np.asarray(g, dtype=np.float64) for g, d in zip(given, defaults)]
        for v, d, name in zip(vals, defaults, _INIT_NAMES):
            if v.shape != d.shape:
                where = f" for state_dim={k} and data with {p} feature(s)"
                raise ConfigError(f"{name} has shape {v.shape}; expected {d.shape}{where}.")
        return M.check_params(M.LGSSMParams(*vals))

    @property
    def _params(self) -> M.LGSSMParams:
        self._check_fitted()
        return self._get_parameters()

    def _rng(self) -> np.random.Generator:
        return rng_from(self.random_state)

    # -- data ------------------------------------------------------------------------
    def _open(self, engine, X, lengths=None):
        return engine.load(self._sequences(engine, X, lengths), persist=self.persist)

    def _sequences(self, engine, X, lengths):
        if is_zarr_path(X) and lengths is not None:
            raise ConfigError(
                "lengths is for in-memory data only; a Zarr sequences group carries its own offsets."
            )
        return open_sequences(
            X, lengths, partition_bytes=self.partition_bytes or DEFAULT_PARTITION_BYTES,
            min_partitions=2 * engine.total_threads, allow_nan=True, max_magnitude=SQUARE_LIMIT,
            cut_long=True,  # a sequence longer than partition_bytes: slices (emflow.models.lgssm_long)
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
        return self._fit(X, lengths, callbacks=callbacks, initial_params=initial_params, history=history)

    def _check_start(self, params, loaded):
        params = M.check_params(params)
        p = loaded.data.n_features
        if params.C.shape[0] != p:
            raise FeatureMismatchError(f"initial_params are for {params.C.shape[0]} feature(s) but the data have {p}.")
        return params

    def param_spec(self):
        from ..models.family import lgssm_spec

        return lgssm_spec(self._em_vars(), self.transition_covariance_type, self.observation_covariance_type)

    @classmethod
    def _contract_example(cls, rng):
        from ..storage.synthetic import make_lgssm_params, sample_lgssm

        lengths = [40, 60, 30, 50]
        _, y = sample_lgssm(make_lgssm_params(2, 3, seed=0), lengths, seed=int(rng.integers(2**31)))
        return (y, lengths), {"state_dim": 2, "random_state": 0, "tol": 0.0}

    def _em_family(self) -> LGSSMFamily:
        return LGSSMFamily(self._em_vars(), self.transition_covariance_type, self.observation_covariance_type,
                           float(self.reg_covar))

    def _watch(self, event: IterationEvent, warned: set) -> None:
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

    def _fit_info_extra(self, loaded, result) -> dict:
        return {
            "n_sequences": int(loaded.data.n_sequences),
            "n_steps": int(loaded.data.n_rows),
            "em_vars": sorted(self._em_vars()),
            "repaired_covariances": sorted({k for r in result.reports for k in r.get("repaired_covariances", {})}),
        }

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
        self._check_feature_names(X, False)  # scikit-learn's name checks, before the count check
        if out is not None:  # refuse before any work: nothing is replaced unasked
            _dest.check_destination(out, "output", overwrite=overwrite, inputs=_dest.output_inputs(self, X))
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            seqs = self._sequences(engine, X, lengths)
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

    def _loglik_count(self, X, lengths=None) -> tuple[float, float]:
        tot = self._loglik_stats(X, lengths)
        return float(tot[0]), float(tot[1])

    def score(self, X, lengths=None) -> float:
        """Total log-likelihood ``sum log p(y_obs)`` of the sequences (pykalman's ``loglikelihood``).

        Computed by the prediction-error decomposition of the Kalman filter, on the engine
        (``X`` may be a Zarr sequences group of any size).
        """
        return float(self._loglik_stats(X, lengths)[0])

    def _loglik_stats(self, X, lengths) -> np.ndarray:
        params = self._params
        self._check_feature_names(X, False)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            seqs = self._sequences(engine, X, lengths)
            self._check_features(seqs.n_features)
            loaded = engine.load(seqs, persist=False)
            try:
                return engine.map_reduce(LL.loglik_part, loaded, params)
            finally:
                loaded.release()

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
        means, covs = MS.partition_states(seqs[0], np.array([0, len(seqs[0])]), params, "filter")
        return Forecast(*M.forecast(params, means[-1], covs[-1], int(n_steps)))

    # -- persistence -----------------------------------------------------------------
    @staticmethod
    def _array_spec(meta: dict) -> dict:
        """The arrays a saved state-space model holds: shapes and constraints (see store.RULES)."""
        k, d = int(meta["config"]["state_dim"]), int(meta["fitted"]["n_features_in"])
        shapes = {"transition_matrix": ((k, k), []), "observation_matrix": ((d, k), []),
                  "transition_covariance": ((k, k), ["psd"]), "observation_covariance": ((d, d), ["psd"]),
                  "initial_state_mean": ((k,), []), "initial_state_covariance": ((k, k), ["psd"])}
        return {n: shapes[n] for n in _INIT_NAMES}
