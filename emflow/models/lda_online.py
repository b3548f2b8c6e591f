"""Online variational Bayes for LDA (Hoffman, Blei & Bach 2010), as scikit-learn's
``LatentDirichletAllocation(learning_method="online")``: pure NumPy.

After the E-step of a mini-batch of ``n_t`` documents (the batch E-step of
:mod:`emflow.models.lda`), ``lambda`` moves towards the batch's estimate of it::

    lambda <- (1 - rho_t) lambda + rho_t (eta + (N / n_t) sstats * exp(E[log beta]))

with ``rho_t = (learning_offset + t) ** (-learning_decay)`` and ``N`` the number of
documents the corpus stands for (``total_samples``; the corpus's size in ``fit``). This is
the stepwise-EM update of :mod:`emflow.models.online` with ``lambda`` as the running
quantity; the operations are scikit-learn's, in its order, so that the same start and the
same batches give the same topics to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lda import LDAFamily, LDAParams, LDAStats, make_params, with_topic_word_prior

__all__ = ["LDAOnlineFamily"]


@dataclass(frozen=True)
class LDAOnlineFamily(LDAFamily):
    """:class:`~emflow.models.lda.LDAFamily` with the hooks of stepwise EM
    (:class:`emflow.estimators.online.StepwiseEM`): the running quantity is ``lambda``."""

    def online_start(self, params: LDAParams) -> np.ndarray:
        return np.array(params.components, dtype=np.float64, copy=True)

    def online_stats(self, stats: LDAStats, params: LDAParams, factor: float) -> np.ndarray:
        """The batch's ``lambda``: ``eta + factor * sstats * exp(E[log beta])`` (old beta)."""
        return self.eta(params) + factor * (stats.sstats * params.exp_elog_beta)

    def online_m_step(self, lam: np.ndarray, params: LDAParams):
        report: dict = {}
        return with_topic_word_prior(make_params(lam), self.eta(params), self.learn_topic_word_prior, report), report
