"""What the Gaussian and categorical HMM estimators share (hmmlearn's ``BaseHMM`` API on
emflow's engine): hand-set parameters, initialisation, fit, decoding, scoring, sampling,
save / load."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Iterable

import numpy as np
from sklearn.utils import check_random_state as _legacy_random_state

from .. import __version__
from ..storage import store as _store
from ._hmm_work import (DECODER_ALGORITHMS, IMPLEMENTATIONS, ConvergenceMonitor, _posterior_part,
                        _print_iteration, _score_part)
from ..checks import check_choice, check_execution, check_int, check_random_state, check_real, rng_from
from ..execution.cluster import engine_for
from ..storage.data import DEFAULT_PARTITION_BYTES, is_zarr_path
from .em import EMResult, IterationEvent, run_em
from .base import EMEstimator, Output
from ..errors import ConfigError, DegenerateComponentWarning, EmflowConvergenceWarning, NotFittedError
from ..models import hmm as H
from ..storage.sequences import open_sequences, write_step_outputs

_log = logging.getLogger("emflow.hmm")


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
        rs = self.random_state if random_state is None else random_state
        check_random_state(rs)
        # None draws from NumPy's global RandomState, so np.random.seed decides (as in hmmlearn)
        return rng_from(_legacy_random_state(None) if rs is None else rs)

    def _validate_common(self):
        check_int("n_components", self.n_components, 1)
        check_int("n_iter", self.n_iter, 0)
        check_real("tol", self.tol, 0)
        check_execution(self)
        check_choice("algorithm", self.algorithm, DECODER_ALGORITHMS)
        check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        letters = "st" + self._emission_letters
        for name in ("params", "init_params"):
            v = getattr(self, name)
            if not isinstance(v, str) or set(v) - set(letters):
                raise ConfigError(f"{name} must be a string of letters from {letters!r}, got {v!r}.")

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
        self._validate()
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

    def _open(self, engine, X, lengths):
        pb = self.partition_bytes or DEFAULT_PARTITION_BYTES
        if is_zarr_path(X):
            if lengths is not None:
                raise ConfigError("lengths is for in-memory data; a Zarr sequence group carries its own offsets.")
            seq = open_sequences(X, partition_bytes=pb, min_partitions=2 * engine.total_threads,
                                 max_magnitude=self._max_magnitude)
        else:
            if lengths is not None and np.ndim(lengths) == 0:
                lengths = [lengths]
            seq = open_sequences(self._as_values(X), lengths, partition_bytes=pb,
                                 min_partitions=2 * engine.total_threads, max_magnitude=self._max_magnitude)
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
        self._validate()
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                self._prepare_data(engine, loaded)
                self._set_params(self._initial_params(engine, loaded, self._rng()))
            finally:
                loaded.release()
        return self

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
            Each is called with an :class:`~emflow.em.IterationEvent` after every iteration.
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
        self._check()
        n_steps = loaded.data.n_rows
        warned: set = set()

        last: list[float] = []

        def watch(event: IterationEvent):
            # hmmlearn's ConvergenceMonitor.report: a fall beyond rounding is logged
            total = event.report.get("log_prob")
            if total is not None:
                if last and total - last[-1] < -np.finfo(float).eps ** 0.5:
                    _log.warning("Model is not converging.  Current: %s is not greater than %s. Delta is %s",
                                 total, last[-1], total - last[-1])
                last[:] = [total]
            if event.report.get("zero_transition_rows"):
                _log.warning("Some rows of transmat_ have zero sum because no transition from the state was ever "
                             "observed.")
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
                    parts = engine.map(_posterior_part, loaded, params, None, kind, self._scaling,
                                       per_partition=starts)
                    return sum(p[0] for p in parts), np.concatenate([p[1] for p in parts])
                return self._write_output(engine, loaded, params, kind, out, starts)
            finally:
                loaded.release()

    def _write_output(self, engine, loaded, params, kind, out, starts):
        per_step = ((), "int64") if kind in ("states", "map") else ((self.n_components,), "float64")

        def fill(url):
            parts = engine.map(_posterior_part, loaded, params, url, kind, self._scaling, per_partition=starts)
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
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, X, lengths)
            try:
                self._check_data(engine, loaded)
                return engine.map_reduce(_score_part, loaded, self._params(), self._scaling)
            finally:
                loaded.release()

    def score(self, X, lengths=None) -> float:
        """Total log-likelihood of all sequences (hmmlearn's ``score``; not a mean per step)."""
        return float(self._totals(X, lengths)[0])

    def bic(self, X, lengths=None) -> float:
        """Bayesian information criterion, ``-2 log L + p log(n_samples)`` (lower is better)."""
        tot = self._totals(X, lengths)
        return -2 * float(tot[0]) + self._n_parameters() * np.log(tot[2])

    def aic(self, X, lengths=None) -> float:
        """Akaike information criterion, ``-2 log L + 2 p`` (lower is better)."""
        return -2 * self.score(X, lengths) + 2 * self._n_parameters()

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
            return H.sample_sequence(self._params(), int(n_samples), rs, currstate)
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
        return {"startprob": ((K,), ["simplex"]), "transmat": ((K, K), ["simplex"]), **cls._emission_spec(meta, K)}

    def save(self, path, *, overwrite: bool = False) -> str:
        """Save the fitted model as a Zarr group at ``path``; returns the path.

        A model already at ``path`` is replaced only with ``overwrite=True`` (atomically);
        anything else there, and the data it was fitted on, never are.
        """
        self._check_fitted()
        # a model whose parameters were set by hand, never fitted, saves an empty fit record
        meta = {
            "version": __version__,
            "class": type(self).__name__,
            "config": self._config(),
            "fitted": {"converged": bool(getattr(self, "converged_", False)), "n_iter": int(getattr(self, "n_iter_", 0)),
                       "lower_bound": float(getattr(self, "lower_bound_", -math.inf)),
                       "n_features_in": int(self.n_features_in_)},
            "history": list(getattr(self, "history_", [])),
            "monitor_history": list(getattr(getattr(self, "monitor_", None), "history", [])),
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
