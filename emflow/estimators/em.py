"""The EM iteration loop, shared by every model family.

A *family* is any object with three methods over NumPy data::

    e_step(X, w, params) -> stats          # one partition; stats add with emflow.stats.add
    m_step(stats, params) -> (params, report)
    objective(stats) -> float              # mean log-likelihood (or bound) per unit weight

``run_em`` makes one pass over the data per iteration: the E-step that gives the
statistics also gives the objective of the parameters it was run with (so, as in
scikit-learn, ``history[i]`` is the log-likelihood of the parameters *entering*
iteration ``i + 1``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from ..execution.engine import Engine, Loaded

__all__ = ["Family", "IterationEvent", "EMResult", "run_em"]


class Family(Protocol):
    def e_step(self, X, w, params): ...

    def m_step(self, stats, params) -> tuple[Any, dict]: ...

    def objective(self, stats) -> float: ...


@dataclass
class IterationEvent:
    """What a callback sees after each EM iteration.

    Attributes
    ----------
    iteration : int
        1-based iteration number within this initialisation.
    log_likelihood : float
        Mean log-likelihood (per unit weight) of the parameters entering the iteration.
    change : float
        ``log_likelihood`` minus the previous iteration's (``inf`` on the first).
    seconds : float
        Wall time of the iteration (E-step pass, reduction and M-step).
    converged : bool
        ``abs(change) < tol``.
    params : Any
        Parameters after the M-step.
    report : dict
        The family's M-step report (degenerate components and the like).
    init : int
        Index of the initialisation (``n_init`` restarts).
    """

    iteration: int
    log_likelihood: float
    change: float
    seconds: float
    converged: bool
    params: Any
    report: dict
    init: int = 0


@dataclass
class EMResult:
    params: Any
    history: list[float]
    converged: bool
    n_iter: int
    lower_bound: float
    seconds: list[float] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)


def run_em(
    engine: Engine,
    loaded: Loaded,
    family: Family,
    params: Any,
    *,
    tol: float,
    max_iter: int,
    callbacks: Iterable[Callable[[IterationEvent], None]] = (),
    init: int = 0,
    history: list[float] | None = None,
) -> EMResult:
    """Iterate E and M steps until the change in mean log-likelihood is below ``tol``.

    ``history`` continues a run resumed from a checkpoint: iterations already done are
    counted and the convergence test uses the last recorded value.
    """
    callbacks = list(callbacks)
    history = list(history or [])
    seconds: list[float] = []
    reports: list[dict] = []
    lower_bound = history[-1] if history else -math.inf
    converged = False
    for it in range(len(history) + 1, max_iter + 1):
        t0 = time.perf_counter()
        stats = engine.map_reduce(family.e_step, loaded, params)
        ll = float(family.objective(stats))
        params, report = family.m_step(stats, params)
        change = ll - lower_bound
        lower_bound = ll
        history.append(ll)
        dt = time.perf_counter() - t0
        seconds.append(dt)
        reports.append(report)
        converged = abs(change) < tol
        event = IterationEvent(it, ll, change, dt, converged, params, report, init)
        for cb in callbacks:
            cb(event)
        if converged:
            break
    return EMResult(params, history, converged, len(history), lower_bound, seconds, reports)
