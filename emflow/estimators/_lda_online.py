"""Online variational Bayes for :class:`~emflow.estimators.lda.LatentDirichletAllocation`
(``learning_method="online"`` and ``partial_fit``), as scikit-learn's, on the mini-batch
driver of :mod:`emflow.estimators.online` and the update of :mod:`emflow.models.lda_online`.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from ..checks import MAX_SEED
from ..errors import ConfigError
from ..execution.engine import Engine, Loaded
from ..models import lda as M
from ..models.lda_online import LDAOnlineFamily
from .em import EMResult
from .online import OnlineSchedule, OnlineState, StepwiseEM, run_online

__all__ = ["LDAOnlineMixin"]


class LDAOnlineMixin:
    """Online learning of the topics (see :mod:`emflow.models.lda_online`)."""

    def partial_fit(self, X, y=None) -> "LatentDirichletAllocation":
        """Online variational Bayes on ``X``, in mini-batches of ``batch_size`` documents.

        As scikit-learn's ``partial_fit`` (whatever ``learning_method``): the first call
        draws the initial topics from ``random_state``; every batch's statistics are scaled
        by ``total_samples / batch documents``; ``n_batch_iter_`` goes on across calls.

        Parameters
        ----------
        X : corpus (see :meth:`fit`)
        y : ignored

        Returns
        -------
        self
        """
        self._validate_params()
        if self.learn_doc_topic_prior:
            raise ConfigError("partial_fit keeps the document-topic prior fixed: set learn_doc_topic_prior=False.")
        with self._session() as engine:
            loaded = self._open(engine, X, None, "partial_fit")
            try:
                first = not self._is_fitted()
                if first:
                    self._seed()
                    params = self._initial_params(engine, loaded, None)
                    self._online_seed = int(copy.deepcopy(self.random_state_).randint(MAX_SEED, dtype=np.int64))
                else:
                    self._check_features(loaded.data.n_terms)
                    params = self._get_parameters()
                state = self.__dict__.get("_online_state")
                fam = self._online_family()
                if state is None or first:
                    state = OnlineState(self._schedule(), fam.online_start(params), t=self.n_batch_iter_ if not first else 1)
                seed = self.__dict__.get("_online_seed", 0)
                result = run_online(engine, loaded, StepwiseEM(fam), params, state, total=float(self.total_samples),
                                    batch_size=int(self.batch_size), seed=(seed, 0))
                if first:
                    self._set_fit_result(EMResult(result.params, [], False, 0, math.nan), loaded, engine,
                                         method="online", n_batches=state.t - 1)
                else:
                    self._set_parameters(result.params)
                    self._after_fit(loaded, result)
            finally:
                loaded.release()
        self._online_state = state
        self._n_batch_iter = state.t
        return self

    def _schedule(self) -> OnlineSchedule:
        return OnlineSchedule(int(self.batch_size), float(self.learning_decay), float(self.learning_offset),
                              False, max(1, int(self.max_iter)), False)

    def _online_family(self) -> LDAOnlineFamily:
        alpha, eta = self._priors()
        return LDAOnlineFamily(alpha, eta, int(self.max_doc_update_iter), float(self.mean_change_tol),
                               self.doc_topic_init == "random", False, self._eta_mode())

    def _fit_online_loaded(self, engine: Engine, loaded: Loaded, callbacks, initial_params=None):
        """``max_iter`` passes of online variational Bayes; scikit-learn's perplexity check
        (``evaluate_every``, ``perp_tol``) after the passes it names, one pass each."""
        seed = self._seed()
        params = (self._check_start(initial_params, loaded) if initial_params is not None
                  else self._initial_params(engine, loaded, None))
        fam = self._online_family()
        state = OnlineState(self._schedule(), fam.online_start(params))
        callbacks = [c for c in callbacks if c != self._print_iteration]  # stop() prints scikit-learn's lines
        # the evaluations' E-step (the fitted model's, ones start) reads the priors
        self.doc_topic_prior_, self.topic_word_prior_ = self._priors()
        rule = M.PerplexityStop(int(self.evaluate_every), float(self.perp_tol))
        evals: list[float] = []

        def stop(n_pass: int, p) -> bool:
            line = f"iteration: {n_pass} of max_iter: {self.max_iter}"
            done = False
            if rule.evaluated(n_pass):
                b, words, _ = self._bound_loaded(engine, loaded, p)
                evals.append(b / words if words > 0 else math.nan)
                perp = M.perplexity(evals[-1])
                line += f", perplexity: {perp:.4f}"
                done = len(evals) >= 2 and abs(M.perplexity(evals[-2]) - perp) < self.perp_tol
            if self.verbose:
                print(line, flush=True)
            return done

        result = run_online(engine, loaded, StepwiseEM(fam), params, state, total=float(loaded.data.n_docs),
                            batch_size=int(self.batch_size), n_passes=int(self.max_iter), seed=(seed, 0),
                            callbacks=callbacks, stop=stop)
        n_pass = len(result.history)
        result = EMResult(result.params, evals, result.converged, n_pass - int(result.converged),
                          evals[-1] if evals else math.nan, result.seconds, result.reports)
        self._set_fit_result(result, loaded, engine, method="online", n_batches=state.t - 1)
        self._online_state = state
        self._n_batch_iter = state.t
