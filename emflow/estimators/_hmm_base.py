"""What the Gaussian and categorical HMM estimators share (hmmlearn's ``BaseHMM`` API on
emflow's engine): hand-set parameters, initialisation, fit, decoding, scoring, sampling,
save / load."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Iterable

import numpy as np
from sklearn.utils import check_random_state as _legacy_random_state

from ..storage import destinations as _dest
from ._hmm_work import COMPUTE_DTYPES, DECODER_ALGORITHMS, IMPLEMENTATIONS, ConvergenceMonitor, _posterior_part, _score_part
from ..checks import Choice, Int, Letters, Real, check_choice, check_int, check_random_state
from ..execution.cluster import engine_for
from ..storage.data import DEFAULT_PARTITION_BYTES, is_zarr_path
from .em import EMResult, IterationEvent
from .online import OnlineEMMixin, check_online_call, online_schedule, split_online_kwargs
from .base import EMEstimator, Output
from ..errors import ConfigError, DegenerateComponentWarning, NotFittedError
from ..models import hmm as H
from ..storage.sequences import open_sequences, write_step_outputs

_log = logging.getLogger("emflow.hmm")


class _BaseHMM(OnlineEMMixin, EMEstimator):
    """hmmlearn's ``BaseHMM`` surface on :class:`~emflow.estimators.base.EMEstimator`.

    An HMM face (one emission family) declares ``family``, ``params_type``, ``fitted`` and
    ``_emission_letters`` (its letters of ``params`` / ``init_params``), and fills, besides
    the base's ``_validate_params`` (calling ``_validate_common``), ``_em_family``,
    ``_initial_params`` (through ``_transition_init`` and ``_needs_init``) and
    ``_n_parameters``: ``_param_attrs`` (the attributes a usable model has),
    ``_check_emissions`` (validate hand-set emission parameters, set ``n_features``),
    ``_emission_scalars`` (free scalars per emission letter, for hmmlearn's
    degenerate-fit warning), ``_sampler`` (draw one step of a state from a RandomState, in
    hmmlearn's order), ``_prepare_data`` / ``_check_data`` (data checks before fitting /
    applying) and ``_emission_spec`` (saved emission arrays).
    """

    _family_name = ""
    data_kind = "sequences"
    iter_param = "n_iter"
    objective_name = "log-likelihood per step"
    summary_arrays = {"start probabilities": "startprob_"}
    outputs = {"labels": Output("predict", True), "proba": Output("predict_proba", True)}
    _emission_letters = ""
    _max_magnitude: float | None = None  # values beyond it: "scale the data", before any arithmetic
    _allow_nan = False  # NaN marks a missing value (GaussianHMM(missing="marginalize"))
    _apply_emission = None  # emission of predict/score/decode (None: the parameters' default)

    compute_dtype = "float64"  # a face whose emission can compute in float32 takes it as a parameter

    _param_rules = {"n_components": Int(1), "n_iter": Int(0), "n_init": Int(1), "tol": Real(0),
                    "algorithm": Choice(*DECODER_ALGORITHMS), "implementation": Choice(*IMPLEMENTATIONS),
                    "compute_dtype": Choice(*COMPUTE_DTYPES)}

    def _validate_more(self):
        letters = Letters("st" + self._emission_letters)
        for name in ("params", "init_params"):
            letters.check(name, getattr(self, name))

    # hand-set parameters (hmmlearn's pattern: assign startprob_, transmat_, ... then use)
    def _needs_init(self, code: str, name: str, attr: str | None = None) -> bool:
        """hmmlearn's rule: a parameter is initialised from the data when ``init_params``
        names it (a value already set is overwritten, with a logged warning) or when it
        is not set."""
        is_set = hasattr(self, attr or name)
        if code in self.init_params:
            if is_set:
                _log.warning("Even though the %r attribute is set, it will be overwritten during "
                             "initialization because 'init_params' contains %r", name, code)
            return True
        return not is_set

    def _n_fit_scalars(self, n_features: int) -> dict[str, int]:
        K = self.n_components
        return {"s": K - 1, "t": K * (K - 1), **self._emission_scalars(n_features)}

    def _warn_if_degenerate(self, n_values: int, n_features: int) -> None:
        n = sum(self._n_fit_scalars(n_features)[p] for p in self.params)
        if n_values < n:
            _log.warning("Fitting a model with %d free scalar parameters with only %d data points will "
                         "result in a degenerate solution.", n, n_values)

    def _check_prob(self, name: str, a, shape: tuple, shape_text: str) -> np.ndarray:
        try:
            a = np.array(a, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an array of probabilities of shape {shape_text}.") from None
        if a.shape != shape:
            raise ConfigError(f"{name} must have shape {shape_text} = {shape}, got {a.shape}.")
        if not np.all(np.isfinite(a) & (a >= 0)):
            raise ConfigError(f"{name} must hold probabilities in [0, 1].")
        s = a.sum(axis=-1)
        # an all-zero row of transmat_ is a state never left in the training data (hmmlearn's
        # M-step leaves it so): kept usable
        ok = np.isclose(s, 1) | ((s == 0) if a.ndim == 2 and name == "transmat_" else False)
        if not np.all(ok):
            raise ConfigError(f"{name} must sum to 1 (got {float(s):.4f})" if s.ndim == 0
                              else f"{name} rows must sum to 1 (got row sums of {s})")
        return a

    def _check(self) -> None:
        """Validate the parameters set on the estimator (hmmlearn's ``_check``): shapes,
        probabilities that sum to 1, emission parameters. Raises ConfigError (a ValueError)."""
        self._validate_params()
        K = self.n_components
        self.startprob_ = self._check_prob("startprob_", self.startprob_, (K,), "(n_components,)")
        self.transmat_ = self._check_prob("transmat_", self.transmat_, (K, K), "(n_components, n_components)")
        self._check_emissions()

    def _check_fitted(self):
        """Usable once fitted, loaded, or once every parameter is set by hand; then validated."""
        missing = [n for n in self._param_attrs() if not hasattr(self, n)]
        if "startprob_" in missing:
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet. Call fit first, load a saved "
                                 "model, or set its parameters (startprob_, transmat_, ...).")
        if missing:
            raise NotFittedError(f"This {type(self).__name__} has no {', '.join(missing)}: set "
                                 f"{'it' if len(missing) == 1 else 'them'}, or call fit.")
        self._check()

    # data
    def _as_values(self, X):
        return X

    def _open(self, engine, X, lengths=None):
        pb = self.partition_bytes or DEFAULT_PARTITION_BYTES
        if is_zarr_path(X):
            if lengths is not None:
                raise ConfigError("lengths is for in-memory data; a Zarr sequence group carries its own offsets.")
            seq = open_sequences(X, partition_bytes=pb, min_partitions=2 * engine.total_threads,
                                 max_magnitude=self._max_magnitude, cut_long=True, allow_nan=self._allow_nan)
        else:
            if lengths is not None and np.ndim(lengths) == 0:
                lengths = [lengths]
            seq = open_sequences(self._as_values(X), lengths, partition_bytes=pb,
                                 min_partitions=2 * engine.total_threads, max_magnitude=self._max_magnitude,
                                 cut_long=True, allow_nan=self._allow_nan)  # a sequence longer than pb: slices (emflow.models.hmm_long)
        return engine.load(seq, persist=self.persist)

    def _transition_init(self, rng: np.random.Generator):
        K = self.n_components
        init = 1.0 / K
        sp = rng.dirichlet(np.full(K, init)) if self._needs_init("s", "startprob_") else self.startprob_
        tm = rng.dirichlet(np.full(K, init), size=K) if self._needs_init("t", "transmat_") else self.transmat_
        return sp, tm

    def _init(self, X, lengths=None):
        """Initialise the parameters from the data without running EM (hmmlearn's ``_init``).

        Sets the parameters ``init_params`` names, and any not set, as ``fit`` would
        before its first iteration; parameters already set and not named are kept.
        """
        self._set_parameters(self.init_params_for(X, lengths))
        return self

    # fitting (the driver is EMEstimator's; these are its hooks)
    def fit(self, X, lengths=None, *, method: str = "batch",
            callbacks: Iterable[Callable[[IterationEvent], None]] = (), initial_params=None,
            history: list[float] | None = None, **online):
        """Estimate the parameters by Baum-Welch (EM) over all sequences, or by stepwise EM.

        Parameters
        ----------
        X : str, PathLike or array-like of shape (n_samples, n_features)
            A Zarr group of sequences (``values`` + ``offsets``), or the concatenated
            sequences in memory.
        lengths : array-like of int of shape (n_sequences,), optional
            Lengths of the in-memory sequences (hmmlearn's convention); ``None`` means one
            sequence.
        method : {"batch", "online"}, default "batch"
            ``"online"``: stepwise EM in mini-batches of ``batch_size`` sequences
            (:mod:`emflow.estimators.online`).
        callbacks : iterable of callables
            Each is called with an :class:`~emflow.estimators.em.IterationEvent` after every
            iteration.
        initial_params, history
            Resume from a checkpoint: EM starts from these parameters (a
            ``GaussianHMMParams`` / ``CategoricalHMMParams``) with the iterations already
            recorded in ``history`` (means per step). Batch EM only.
        **online
            With ``method="online"``: ``batch_size``, ``learning_decay``, ``learning_offset``,
            ``polyak``, ``n_passes``, ``shuffle`` (:class:`~emflow.estimators.online.OnlineSchedule`).

        Returns
        -------
        self
        """
        schedule = split_online_kwargs(online)
        if check_online_call(method, schedule):
            if online:
                online_schedule(**online)  # a ConfigError naming the unknown keyword
            if initial_params is not None or history is not None:
                raise ConfigError("initial_params and history resume a batch fit: fit(method='online') takes "
                                  "neither (warm_start=True starts from the fitted parameters).")
            return self._fit_online(X, lengths, callbacks=callbacks, **schedule)
        if online:
            raise TypeError(f"fit() got an unexpected keyword argument {sorted(online)[0]!r}")
        return self._fit(X, lengths, callbacks=callbacks, initial_params=initial_params, history=history)

    def _prepare(self, engine, loaded) -> None:
        self._prepare_data(engine, loaded)
        self._last_total = None

    def _em_tol(self, loaded) -> float:
        return float(self.tol) / loaded.data.n_rows  # hmmlearn's tol is on the total; run_em sees means

    def _check_start(self, params, loaded):
        self._set_parameters(params)
        self._check()
        return self._get_parameters()

    def _watch(self, event: IterationEvent, warned: set) -> None:
        # hmmlearn's ConvergenceMonitor.report: a fall beyond rounding is logged
        total, last = event.report.get("log_prob"), getattr(self, "_last_total", None)
        if total is not None:
            if last is not None and total - last < -np.finfo(float).eps ** 0.5:
                _log.warning("Model is not converging.  Current: %s is not greater than %s. Delta is %s",
                             total, last, total - last)
            self._last_total = total
        if event.report.get("zero_transition_rows"):
            _log.warning("Some rows of transmat_ have zero sum because no transition from the state was ever "
                         "observed.")
        for k in event.report.get("empty_states", []):
            if k not in warned:
                warned.add(k)
                warnings.warn(f"State {k} has no posterior mass at iteration {event.iteration}. Use fewer states "
                              "or another random_state.", DegenerateComponentWarning, stacklevel=2)

    def _fit_info_extra(self, loaded, result: EMResult) -> dict:
        return {"n_sequences": int(loaded.data.n_sequences), "n_steps": int(loaded.data.n_rows),
                "empty_states": sorted({k for r in result.reports for k in r.get("empty_states", [])})}

    def _after_fit(self, loaded, result: EMResult) -> None:
        self._set_parameters(result.params)  # the family's own attributes (n_features)
        self.monitor_ = ConvergenceMonitor(self.tol, self.n_iter, [float(r["log_prob"]) for r in result.reports],
                                           self.converged_)

    # applying a fitted model
    def _apply(self, X, lengths, kind: str, out=None, overwrite: bool = False):
        self._check_fitted()
        self._check_feature_names(X, False)  # scikit-learn's name checks, before the count check
        if out is not None:  # refuse before any work: nothing is replaced unasked
            _dest.check_destination(out, "output", overwrite=overwrite, inputs=_dest.output_inputs(self, X))
        params = self._get_parameters()
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                self._check_data(engine, loaded)
                starts = [a for a, _ in loaded.data.bounds]
                if out is None:
                    parts = engine.map(_posterior_part, loaded, params, None, kind, self._scaling,
                                       self._apply_emission, per_partition=starts)
                    return sum(p[0] for p in parts), np.concatenate([p[1] for p in parts])
                return self._write_output(engine, loaded, params, kind, out, starts)
            finally:
                loaded.release()

    def _write_output(self, engine, loaded, params, kind, out, starts):
        per_step = ((), "int64") if kind in ("states", "map") else ((self.n_components,), "float64")

        def fill(url):
            parts = engine.map(_posterior_part, loaded, params, url, kind, self._scaling, self._apply_emission,
                               per_partition=starts)
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
        check_choice("algorithm", algorithm, DECODER_ALGORITHMS)
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

    @property
    def _scaling(self) -> bool:
        return self.implementation == "scaling"

    def _totals(self, X, lengths) -> np.ndarray:
        """(total log-likelihood, n_sequences, n_steps) of the data under the current parameters."""
        self._check_fitted()
        self._check_feature_names(X, False)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                self._check_data(engine, loaded)
                return engine.map_reduce(_score_part, loaded, self._get_parameters(), self._scaling,
                                         self._apply_emission)
            finally:
                loaded.release()

    def score(self, X, lengths=None) -> float:
        """Total log-likelihood of all sequences (hmmlearn's ``score``; not a mean per step)."""
        return float(self._totals(X, lengths)[0])

    def _loglik_count(self, X, lengths=None) -> tuple[float, float]:
        tot = self._totals(X, lengths)
        return float(tot[0]), float(tot[2])

    def get_stationary_distribution(self) -> np.ndarray:
        """Stationary distribution of the states: the left eigenvector of ``transmat_`` for
        its largest eigenvalue (1), normalised to sum to 1 (hmmlearn's)."""
        self._check_fitted()
        eigvals, eigvecs = np.linalg.eig(self.transmat_.T)
        v = np.real_if_close(eigvecs[:, np.argmax(eigvals)])
        return v / v.sum()

    def sample(self, n_samples: int = 1, random_state=None, currstate: int | None = None):
        """Draw one sequence: ``(X, state_sequence)``, X of shape (n_samples, n_features).

        Parameters
        ----------
        n_samples : int
        random_state : None, int, RandomState or Generator
            ``None`` uses the estimator's ``random_state`` (and NumPy's global RandomState
            if that is None too). An int or a RandomState draws exactly hmmlearn's
            samples (its order of draws from a ``RandomState``); a Generator draws
            emflow's vectorised samples.
        currstate : int, optional
            State of the first step (default: drawn from ``startprob_``).
        """
        self._check_fitted()
        check_int("n_samples", n_samples, 1)
        check_int("currstate", currstate, 0, self.n_components - 1, allow_none=True)
        rs = self.random_state if random_state is None else random_state
        check_random_state(rs)
        if isinstance(rs, np.random.Generator):
            return H.sample_sequence(self._get_parameters(), int(n_samples), rs, currstate)
        rs = _legacy_random_state(rs)
        sp_cdf, tm_cdf = np.cumsum(self.startprob_), np.cumsum(self.transmat_, axis=1)
        state = int((sp_cdf > rs.rand()).argmax()) if currstate is None else int(currstate)
        draw = self._sampler()
        states, X = [state], [draw(state, rs)]
        for _ in range(int(n_samples) - 1):
            state = int((tm_cdf[state] > rs.rand()).argmax())
            states.append(state)
            X.append(draw(state, rs))
        return np.atleast_2d(np.array(X)), np.array(states, dtype=int)

    # persistence (EMEstimator's save / load, with the monitor and hand-set models)
    @classmethod
    def _array_spec(cls, meta: dict) -> dict:
        """The arrays a saved HMM holds: shapes from its configuration, constraints (see store.RULES)."""
        K = int(meta["config"]["n_components"])
        return {"startprob": ((K,), ["simplex"]), "transmat": ((K, K), ["simplex"]), **cls._emission_spec(meta, K)}

    def save(self, path, *, overwrite: bool = False) -> str:
        """Save the model as a Zarr group at ``path``; returns the path.

        A model whose parameters were set by hand (never fitted) saves with an empty fit
        record. A model already at ``path`` is replaced only with ``overwrite=True``
        (atomically); anything else there, and the data it was fitted on, never are.
        """
        self._check_fitted()
        if not hasattr(self, "converged_"):
            self.converged_, self.n_iter_, self.lower_bound_, self.history_ = False, 0, -math.inf, []
        return super().save(path, overwrite=overwrite)

    def _meta_extra(self) -> dict:
        return {"monitor_history": list(getattr(getattr(self, "monitor_", None), "history", []))}

    def _after_load(self, meta: dict) -> None:
        self._set_parameters(self._get_parameters())
        self.monitor_ = ConvergenceMonitor(self.tol, self.n_iter, meta.get("monitor_history", []), self.converged_)
