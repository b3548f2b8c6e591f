"""Fault injection for the reliability tests: a model family that wraps another and does
something to the cluster at the n-th E-step call (counted across processes in a file)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FaultAt:
    """Wraps the family ``inner``; at the ``at_call``-th E-step (over every process, counted
    in the file ``counter``) calls :meth:`fault` before computing. Subclasses say what."""

    inner: Any
    counter: str
    at_call: int

    def fault(self) -> None:
        raise NotImplementedError

    def e_step(self, X, w, params):
        with open(self.counter, "a") as f:
            f.write(".")
        if os.path.getsize(self.counter) == self.at_call:
            self.fault()
        return self.inner.e_step(X, w, params)

    def m_step(self, stats, params):
        return self.inner.m_step(stats, params)

    def objective(self, stats):
        return self.inner.objective(stats)


def gmm_start(K: int, d: int):
    """A fixed full-covariance GMM start: equal weights, means spread on a line, identity covariances."""
    import numpy as np

    from emflow.models import gmm as G

    eye = np.stack([np.eye(d)] * K)
    return G.GMMParams(np.full(K, 1 / K), np.linspace(-3, 3, K)[:, None] * np.ones(d), eye, eye, "full")
