"""The EM iteration loop, shared by every model family (LDA and model selection included).

A *family* is any object with three methods over NumPy data::

    e_step(*partition, params) -> stats    # one partition; stats add with emflow.stats.add
    m_step(stats, params) -> (params, report)
    objective(stats) -> float              # mean log-likelihood (or bound) per unit weight

A family that sets ``takes_context = True`` is called as ``e_step(*partition, params,
context)`` with an :class:`EStepContext` (the iteration, the run's seed and the global
index of the partition's first element) and ``objective(stats, params)``; that is what a
family whose E-step draws random numbers (LDA's per-document starts) or whose objective
has a parameter-only term (LDA's topic prior) needs.

:func:`run_em` makes one pass over the data per iteration: the E-step that gives the
statistics also gives the objective of the parameters it was run with (so, as in
scikit-learn, ``history[i]`` is the objective of the parameters *entering* iteration
``i + 1``). It stops when its stop rule says so (by default when the objective changed by
less than ``tol``; any ``stop(history) -> bool``) or after ``max_iter`` iterations.

:func:`run_em_group` runs several such fits in *lockstep*: every pass reads each partition
once and computes the statistics of every run still going (one task per partition
returns the tuple of them, tree-reduced like any statistics bundle); a run leaves the
group when it stops. Each run follows exactly the iterations it would follow alone.
:func:`run_em` is the group of one.

``accelerate="squarem"`` (any run of a group) replaces the plain iteration by SQUAREM on the
family's flat parameter vector (:mod:`emflow.estimators.accelerate`); the loop is the same,
only what a run does with each pass's statistics differs (``_State.take``). ``history``
then holds the objective of every *accepted* parameter set; a rejected extrapolation costs
a pass but adds nothing to ``history`` and sends no event.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from ..execution import sweeps as _sweeps
from ..execution.engine import Engine, Loaded

__all__ = ["Family", "EStepContext", "IterationEvent", "EMResult", "EMRun", "ChangeBelow", "run_em",
           "run_em_group", "partition_starts", "ACCELERATIONS"]

#: the values of ``accelerate`` (None and "none": plain EM)
ACCELERATIONS = (None, "none", "squarem")


class Family(Protocol):
    def e_step(self, *partition_and_params): ...

    def m_step(self, stats, params) -> tuple[Any, dict]: ...

    def objective(self, stats, *params) -> float: ...


@dataclass(frozen=True)
class EStepContext:
    """What a context-taking family's E-step is told besides the parameters.

    Attributes
    ----------
    iteration : int
        1-based iteration number (counting iterations resumed from a checkpoint).
    seed : Any
        The run's seed (whatever the estimator passed to :func:`run_em`; None if none).
        Random draws keyed by ``(seed, iteration, start + i)`` do not depend on the
        partitioning.
    start : int
        Global index of the partition's first element: its first row, sequence or document.
    init : int
        Index of the initialisation (``n_init`` restarts).
    """

    iteration: int
    seed: Any
    start: int
    init: int = 0


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
        The stop rule holds (by default ``abs(change) < tol``).
    params : Any
        Parameters after the M-step.
    report : dict
        The family's M-step report (degenerate components and the like).
    init : int
        Index of the initialisation (``n_init`` restarts).
    step : str
        ``"em"``: the parameters entering the pass were an EM step's; ``"squarem"``: an
        accepted SQUAREM extrapolation (``params`` is then the EM step from it).
    """

    iteration: int
    log_likelihood: float
    change: float
    seconds: float
    converged: bool
    params: Any
    report: dict
    init: int = 0
    step: str = "em"


@dataclass
class EMResult:
    params: Any
    history: list[float]
    converged: bool
    n_iter: int
    lower_bound: float
    seconds: list[float] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    #: E-step passes this run made (accepted or not); what the acceleration did
    evaluations: int = 0
    acceleration: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChangeBelow:
    """The default stop rule: the last change of the objective is below ``tol`` in size."""

    tol: float

    def __call__(self, history: Sequence[float]) -> bool:
        return len(history) >= 2 and abs(history[-1] - history[-2]) < self.tol


@dataclass
class EMRun:
    """One fit of a lockstep group (:func:`run_em_group`); the arguments of :func:`run_em`."""

    family: Any
    params: Any
    tol: float | None = None
    max_iter: int = 100
    stop: Callable[[Sequence[float]], bool] | None = None
    callbacks: Iterable[Callable[[IterationEvent], None]] = ()
    init: int = 0
    history: list[float] | None = None
    seed: Any = None
    accelerate: str | None = None
    spec: Any = None  # the family's ParamSpec (emflow.models.family), which SQUAREM needs
    # emflow.estimators.incremental.Incremental: per-partition statistics (the ledger); run alone
    incremental: Any = None


def partition_starts(loaded: Loaded) -> list[int]:
    """Global index of each partition's first element (row, sequence or document)."""
    data = loaded.data
    bounds = getattr(data, "seq_bounds", None) or data.bounds
    return [int(a) for a, _ in bounds]


def _group_e_step(*args):
    """Every run's E-step on one read of a partition: ``(*partition, families, params,
    iterations, seeds, inits, start[, link]) -> tuple of stats``; ``link`` (a slice of a
    cut sequence) holds every run's boundary messages (:class:`~emflow.execution.sweeps.Group`)."""
    link = args[-1] if isinstance(args[-1], tuple) else None  # start is an int
    *partition, families, params, iterations, seeds, inits, start = args[:-1] if link is not None else args
    out = []
    for fam, p, it, seed, init, lk in zip(families, params, iterations, seeds, inits,
                                         _sweeps.Group.member_links(link, len(families))):
        if getattr(fam, "takes_context", False):
            out.append(fam.e_step(*partition, p, EStepContext(it, seed, start, init)))
        else:
            out.append(fam.e_step(*partition, p) if lk is None else fam.e_step(*partition, p, lk))
    return tuple(out)


def _group_members(args) -> list:
    families, params = args[0], args[1]
    return [(f.e_step, None if getattr(f, "takes_context", False) else (p,)) for f, p in zip(families, params)]


_group_e_step.sweeps = _sweeps.Group(_group_members)


def _objective(family, stats, params) -> float:
    if getattr(family, "takes_context", False):
        return float(family.objective(stats, params))
    return float(family.objective(stats))


class _State:
    """One run of a group: the parameters its next E-step is run with, and what it makes of
    the statistics that come back (:meth:`take`: plain EM here; SQUAREM overrides it)."""

    def __init__(self, run: EMRun):
        if run.stop is None and run.tol is None:
            raise ValueError("EMRun needs tol or stop")
        self.run = run
        self.stop = run.stop if run.stop is not None else ChangeBelow(float(run.tol))
        self.callbacks = list(run.callbacks)
        self.params = run.params
        self.history = [float(v) for v in (run.history or [])]
        self.seconds: list[float] = []
        self.reports: list[dict] = []
        self.converged = False
        self.done = len(self.history) >= int(run.max_iter)
        self.evaluations = len(self.history)  # E-steps, counting resumed iterations
        self.pending_seconds = 0.0  # time of passes not yet charged to an event

    @property
    def next_iteration(self) -> int:
        return self.evaluations + 1

    def evaluate(self, stats):
        """``(objective of the parameters entering the pass, M-step params, report)``."""
        fam = self.run.family
        self.evaluations += 1
        ll = _objective(fam, stats, self.params)
        params, report = fam.m_step(stats, self.params)
        return ll, params, report

    def accept(self, ll: float, params, report: dict, *, step: str = "em", check_stop: bool = True) -> IterationEvent:
        """Record the parameters that entered the pass as accepted (objective ``ll``); the next
        E-step runs with ``params``."""
        change = ll - self.history[-1] if self.history else math.inf
        self.history.append(ll)
        self.params = params
        self.reports.append(report)
        self.converged = bool(self.stop(self.history)) if check_stop else False
        self.done = self.converged or len(self.history) >= int(self.run.max_iter)
        return IterationEvent(len(self.history), ll, change, 0.0, self.converged, params, report,
                              int(self.run.init), step)

    def take(self, stats) -> list[IterationEvent]:
        """The iterations this pass completes (plain EM: one, every pass)."""
        return [self.accept(*self.evaluate(stats))]

    def acceleration(self) -> dict:
        return {}

    def result(self) -> EMResult:
        lb = self.history[-1] if self.history else -math.inf
        return EMResult(self.params, self.history, self.converged, len(self.history), lb, self.seconds, self.reports,
                        self.evaluations - len(self.run.history or []), self.acceleration())


def _state(run: EMRun) -> _State:
    if run.accelerate not in ACCELERATIONS:
        from ..errors import ConfigError

        raise ConfigError(f"accelerate must be one of {', '.join(map(repr, ACCELERATIONS))}; got {run.accelerate!r}.")
    if run.incremental is not None and getattr(run.incremental, "refresh", None) is not None:
        return run.incremental.make_state(run)  # incremental EM between full passes
    if run.accelerate == "squarem":
        from .accelerate import SquaremState

        return SquaremState(run)
    return _State(run)


def _pass_stats(engine: Engine, loaded: Loaded, active: list[_State], starts: list[int]) -> list:
    """The statistics of every active run, from one pass over the data."""
    if active[0].run.incremental is not None:  # (a group of one)
        return [active[0].run.incremental.pass_stats(engine, loaded, active[0])]
    if len(active) == 1 and not getattr(active[0].run.family, "takes_context", False):
        s = active[0]
        return [engine.map_reduce(s.run.family.e_step, loaded, s.params)]
    stats = engine.map_reduce(
        _group_e_step, loaded, tuple(s.run.family for s in active), tuple(s.params for s in active),
        tuple(s.next_iteration for s in active), tuple(s.run.seed for s in active),
        tuple(int(s.run.init) for s in active), per_partition=starts,
    )
    return list(stats)


def run_em_group(
    engine: Engine,
    loaded: Loaded,
    runs: Sequence[EMRun],
    *,
    on_pass: Callable[[int, list[tuple[int, IterationEvent]]], None] | None = None,
) -> list[EMResult]:
    """Run several EM fits in lockstep over the same data: one read per pass serves them all.

    Parameters
    ----------
    engine, loaded
        Where and on what (every run sees the same partitions).
    runs : sequence of EMRun
        The fits; each has its family, start, stop rule, ``max_iter``, callbacks, resumed
        ``history`` and seed, exactly as :func:`run_em` takes them.
    on_pass : callable, optional
        Called after every shared pass with ``(pass_number, [(run_index, event), ...])``
        for the runs that took part in it.

    Returns
    -------
    list of EMResult, one per run, in order; each equal to what :func:`run_em` gives for
    that run alone.
    """
    if len(runs) > 1 and any(r.incremental is not None for r in runs):
        raise ValueError("a run with a statistics ledger (incremental) runs alone, not in a group")
    states = [_state(r) for r in runs]
    starts = partition_starts(loaded)
    n_pass = 0
    while True:
        active = [s for s in states if not s.done]
        if not active:
            break
        t0 = time.perf_counter()
        stats = _pass_stats(engine, loaded, active, starts)
        n_pass += 1
        events = []
        for s, st in zip(active, stats):
            # none: the pass's point is not accepted (yet); its time goes to the next event
            events += [(s, ev) for ev in s.take(st)]
        # one pass served every active run: each is charged the whole pass's time (shared
        # by the events it completes)
        dt = time.perf_counter() - t0
        for s in active:
            s.pending_seconds += dt
            mine = [ev for t, ev in events if t is s]
            for ev in mine:
                ev.seconds = s.pending_seconds / len(mine)
            if mine:
                s.pending_seconds = 0.0
        for s, ev in events:
            s.seconds.append(ev.seconds)
            for cb in s.callbacks:
                cb(ev)
        if on_pass is not None:
            on_pass(n_pass, [(states.index(s), ev) for s, ev in events])
    return [s.result() for s in states]


def run_em(
    engine: Engine,
    loaded: Loaded,
    family: Family,
    params: Any,
    *,
    tol: float | None = None,
    max_iter: int,
    callbacks: Iterable[Callable[[IterationEvent], None]] = (),
    init: int = 0,
    history: list[float] | None = None,
    stop: Callable[[Sequence[float]], bool] | None = None,
    seed: Any = None,
    accelerate: str | None = None,
    spec: Any = None,
    incremental: Any = None,
) -> EMResult:
    """Iterate E and M steps until the stop rule holds or ``max_iter`` iterations are done.

    Parameters
    ----------
    engine, loaded, family, params
        Where, on what, which model and from where.
    tol : float, optional
        The default stop rule, :class:`ChangeBelow` ``(tol)``: the objective changed by
        less than ``tol``. Give ``tol`` or ``stop``.
    max_iter : int
        Iterations in all, counting those in ``history``.
    callbacks : iterable of callables
        Each called with an :class:`IterationEvent` after every iteration.
    init : int
        Index of the initialisation (passed on in events and contexts).
    history : list of float, optional
        Continues a run resumed from a checkpoint: iterations already done are counted and
        the stop rule sees them.
    stop : callable ``stop(history) -> bool``, optional
        Another stop rule (LDA's perplexity test every ``evaluate_every`` iterations...);
        ``history`` holds the objective of every iteration so far.
    seed : optional
        Passed to a context-taking family's E-step (:class:`EStepContext`).
    accelerate : {None, "none", "squarem"}
        ``"squarem"``: SQUAREM on the flat parameter vector of ``spec``
        (:mod:`emflow.estimators.accelerate`). ``max_iter`` then counts accepted parameter
        sets (``len(history)``), so a fit makes at most 1.5 x ``max_iter`` passes.
    spec : ParamSpec, optional
        The family's parameter spec (needed with ``accelerate="squarem"``).
    incremental : emflow.estimators.incremental.Incremental, optional
        Keeps each partition's statistics of every pass (the statistics ledger), and may
        give the first pass's statistics without reading the data.
    """
    run = EMRun(family, params, tol, max_iter, stop, callbacks, init, history, seed, accelerate, spec, incremental)
    return run_em_group(engine, loaded, [run])[0]
