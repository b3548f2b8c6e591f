"""HMM faces fitted through the estimator base's driver (:meth:`EMEstimator._fit`).

``_BaseHMM`` still runs its own fit loop (its port onto the base is pending); a face that
puts :class:`BaseDriverHMM` before ``_BaseHMM`` in its bases is fitted by the base instead:
restart ``r`` seeded by ``default_rng([seed, r])`` (so ``init_params_for`` gives the start of
``fit``, and ``random_state=None`` follows ``np.random.seed``), ``n_iter=0``, one convergence
warning, ``lower_bounds_`` and the common ``fit_info_``, with hmmlearn's ``monitor_`` on top.
Every hook it fills maps onto one ``_BaseHMM`` already has, so the mixin goes away when
``_BaseHMM`` itself is ported.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

from ..errors import DegenerateComponentWarning
from .base import EMEstimator
from .em import IterationEvent
from .hmm import ConvergenceMonitor

__all__ = ["BaseDriverHMM"]


class BaseDriverHMM:
    """Mixin: ``fit`` through :meth:`EMEstimator._fit`, the hooks from ``_BaseHMM``'s methods."""

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
            Resume from a checkpoint: EM starts from these parameters with the iterations
            already recorded in ``history`` (means per step).

        Returns
        -------
        self
        """
        return self._fit(X, lengths, callbacks=callbacks, initial_params=initial_params, history=history)

    def _fit_loaded(self, engine, loaded, callbacks, initial_params=None, history=None):
        return EMEstimator._fit_loaded(self, engine, loaded, callbacks, initial_params, history)

    def _validate_params(self) -> None:
        self._validate()

    def _prepare(self, engine, loaded) -> None:
        self._prepare_data(engine, loaded)

    def _em_tol(self, loaded) -> float:
        # hmmlearn's tol is on the total log-likelihood; the EM loop sees the mean per step
        return float(self.tol) / loaded.data.n_rows

    def _get_parameters(self):
        return self._params()

    def _set_parameters(self, params) -> None:
        self._set_params(params)

    def _watch(self, event: IterationEvent, warned: set) -> None:
        for k in event.report.get("empty_states", []):
            if k not in warned:
                warned.add(k)
                warnings.warn(f"State {k} has no posterior mass at iteration {event.iteration}. Use fewer states "
                              "or another random_state.", DegenerateComponentWarning, stacklevel=2)

    def _fit_info_extra(self, loaded, result) -> dict:
        return {"n_sequences": int(loaded.data.n_sequences), "n_steps": int(loaded.data.n_rows),
                "empty_states": sorted({k for r in result.reports for k in r.get("empty_states", [])})}

    def _after_fit(self, loaded, result) -> None:
        totals = [float(r["log_prob"]) for r in result.reports]
        self.monitor_ = ConvergenceMonitor(self.tol, self.n_iter, totals, self.converged_)
