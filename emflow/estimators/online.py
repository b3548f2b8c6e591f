"""Online EM, written once: stepwise EM (Cappé & Moulines 2009) for the mixtures and the
HMMs, and the mini-batch driver online LDA (Hoffman, Blei & Bach 2010) runs on too.

The data are cut into mini-batches of ``batch_size`` units (rows, sequences or documents),
in storage order, as scikit-learn's ``gen_batches``; a batch may span partitions. The
E-step of a batch runs on the workers that hold its partitions (one engine reduction over
just those partitions, each task slicing its part of the batch), and the client blends the
batch's statistics into running ones and runs the family's M-step on them
(:mod:`emflow.models.online`)::

    S <- (1 - rho_t) S + rho_t (N / n_t) s_t,     rho_t = (learning_offset + t) ** (-learning_decay)

``N`` is the data's size (the units seen so far for ``partial_fit``) and ``n_t`` the batch's,
so ``S`` stands for statistics of the full data. ``t`` counts updates from 1, as
scikit-learn's ``n_batch_iter_``. A family whose running statistics start empty (mixtures,
HMMs) takes the first batch whole (``rho = 1``): with one batch holding all the data, the
first online step is exactly one batch EM step. LDA's running quantity is ``lambda`` itself,
which starts at the initial topics.

The estimators' side (:class:`OnlineEMMixin`) is the scikit-learn-like surface:

* ``partial_fit(X, ...)``: one stepwise update with ``X`` as the mini-batch (the first call
  initialises, as ``fit`` would, from ``X``); the schedule's keywords given on the first
  call are kept for the later ones. On a model fitted by ``fit`` (or loaded), the running
  statistics start afresh from its parameters: the first call is one EM step on ``X``;
* ``fit(data, ..., method="online", batch_size=..., learning_decay=..., learning_offset=...,
  polyak=..., n_passes=..., shuffle=...)``: ``n_passes`` passes over stored (or in-memory)
  data in mini-batches, from one initialisation (``n_init`` is not used; ``warm_start``
  starts from the fitted parameters). ``history_`` then holds, per pass, the mean
  log-likelihood of the batches under the parameters each batch met (a progressive
  estimate: no extra pass is made), ``n_iter_`` the passes, ``n_batch_iter_`` the updates
  plus one, and ``converged_`` whether the last two passes' estimates differ by less than
  ``tol``.

Streamed (not resident) data: each batch reads the partitions it overlaps, so a pass reads
a partition about ``partition rows / batch_size`` times; keep such data resident
(``persist=True``) or make partitions about one batch (``partition_bytes``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from ..checks import check_choice, check_int, check_real
from ..errors import ConfigError, FeatureMismatchError
from ..models import online as O
from .em import EMResult, EStepContext, IterationEvent, _objective

__all__ = ["METHODS", "OnlineSchedule", "OnlineState", "StepwiseEM", "check_method", "online_schedule",
           "plan_batches", "run_online", "OnlineEMMixin", "check_online_call",
           "split_online_kwargs"]

METHODS = ("batch", "online")
# a mini-batch's E-step runs as at most this many tasks (pieces of at least MIN_PIECE units)
BATCH_TASKS = 8
MIN_PIECE = 256


@dataclass(frozen=True)
class OnlineSchedule:
    """How an online fit walks the data and weighs each batch (see the module docstring).

    Attributes
    ----------
    batch_size : int >= 1
        Units (rows, sequences, documents) per mini-batch.
    learning_decay : float in (0.5, 1]
        ``kappa``.
    learning_offset : float > 0
        ``tau``.
    polyak : bool
        Polyak-Ruppert averaging: the fitted parameters come from the mean of the running
        statistics over all updates (the E-steps still use the running ones).
    n_passes : int >= 1
    shuffle : bool
        Visit the batches in a random order on each pass (drawn from ``random_state``);
        False keeps storage order.
    """

    batch_size: int = 1024
    learning_decay: float = 0.6
    learning_offset: float = 2.0
    polyak: bool = False
    n_passes: int = 1
    shuffle: bool = True

    def rho(self, t: int) -> float:
        return O.step_size(t, self.learning_offset, self.learning_decay)


def check_method(method) -> str:
    """``method`` is ``"batch"`` or ``"online"`` (a ConfigError otherwise)."""
    check_choice("method", method, METHODS)
    return method


def check_online_call(method, online: dict) -> bool:
    """Whether a ``fit(..., method=method, **online)`` call is online; a ConfigError for an
    unknown method or keyword, or online keywords without ``method="online"``."""
    if check_method(method) == "online":
        online_schedule(**online)
        return True
    if online:
        online_schedule(**online)  # names an unknown keyword
        raise ConfigError(f"{sorted(online)[0]!r} is an online-EM keyword: pass method='online' with it.")
    return False


def check_decay(name: str, value) -> None:
    check_real(name, value, 0.5, strict=True, finite=True)
    if value > 1:
        raise ConfigError(f"{name} must be a number in (0.5, 1] (the step size (t + offset)^-decay needs it), "
                          f"got {value!r}.")


def split_online_kwargs(kwargs: dict) -> dict:
    """Pop the :class:`OnlineSchedule` keywords out of ``kwargs`` (for a ``fit(**kwargs)``)."""
    names = {f.name for f in dataclasses.fields(OnlineSchedule)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def online_schedule(base: OnlineSchedule | None = None, **given) -> OnlineSchedule:
    """An :class:`OnlineSchedule` from keywords (None: ``base``'s value), checked before anything runs."""
    names = {f.name for f in dataclasses.fields(OnlineSchedule)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"Unknown online-EM keyword {unknown[0]!r}; valid: {sorted(names)}.")
    kw = {k: v for k, v in given.items() if v is not None}
    sched = dataclasses.replace(base or OnlineSchedule(), **kw)
    check_int("batch_size", sched.batch_size, 1)
    check_decay("learning_decay", sched.learning_decay)
    check_real("learning_offset", sched.learning_offset, 0, strict=True, finite=True)
    check_int("n_passes", sched.n_passes, 1)
    for name in ("polyak", "shuffle"):
        if not isinstance(getattr(sched, name), (bool, np.bool_)):
            raise ConfigError(f"{name} must be True or False, got {getattr(sched, name)!r}.")
    return sched


@dataclass
class OnlineState:
    """The running state of an online fit (kept between ``partial_fit`` calls).

    ``stats`` (and ``average``, Polyak's mean of them) are about ``shift`` for families whose
    statistics are moments about a shift; ``t`` is the index of the next update (from 1);
    ``units`` counts the units seen.
    """

    schedule: OnlineSchedule
    stats: Any = None
    shift: np.ndarray | None = None
    average: Any = None
    n_average: int = 0
    t: int = 1
    units: float = 0.0
    n_features: int | None = None
    params: Any = None
    about: Any = None  # the parameters the running statistics are about (families with online_move)
    fit_info: dict | None = None  # the fit_info_ of the fit this state belongs to


# -- what a family's statistics need -----------------------------------------------------
def _moment_layout(stats, params) -> tuple[Callable, str, str] | None:
    """``(shift_of, count field, s2 layout)`` for statistics that are moments about a shift."""
    fields = getattr(stats, "_fields", ())
    if "s1" not in fields or "s2" not in fields:
        return None
    if "n" in fields:  # Gaussian mixture
        from ..models.gmm import shift_of

        ct = params.covariance_type
        return shift_of, "n", {"full": "outer", "tied": "total"}.get(ct, "elementwise")
    raise ConfigError(f"Online EM does not support the statistics {type(stats).__name__} yet.")


def _units(stats) -> float:
    for name in ("weight_sum", "n_steps", "n_docs"):
        if name in getattr(stats, "_fields", ()):
            return float(getattr(stats, name))
    raise ConfigError(f"Online EM cannot size the statistics {type(stats).__name__}.")


class StepwiseEM:
    """Stepwise EM over an ordinary EM family (``e_step``, ``m_step``, ``objective``).

    A family may refine it with ``online_start(params)`` (the running quantity before the
    first batch; default none), ``online_stats(stats, params, factor)`` (the batch's
    contribution, scaled by ``factor = N / n_t``; default the scaled statistics),
    ``online_m_step(running, params)`` (default the family's ``m_step``) and
    ``online_move(running, about, params)``: statistics taken about points that follow the
    parameters ``about`` (the E-step's), re-expressed about those of ``params`` before the
    batch's are blended in (the HMMs' emissions; a mixture's moments about one shift are
    moved here, by :func:`_moment_layout`).
    """

    def __init__(self, family):
        self.family = family

    def start(self, params) -> Any:
        fn = getattr(self.family, "online_start", None)
        return None if fn is None else fn(params)

    def update(self, state: OnlineState, stats, params, total: float | None):
        """One stepwise update from a batch's statistics: ``(params, report, rho)``."""
        sched = state.schedule
        n_t = _units(stats)
        N = float(total) if total is not None else state.units + n_t
        factor = N / n_t if n_t > 0 else 0.0
        fn = getattr(self.family, "online_stats", None)
        s = fn(stats, params, factor) if fn is not None else O.scale(stats, factor)
        move = getattr(self.family, "online_move", None)
        layout = None if move is not None else _moment_layout(stats, params)
        if move is not None:
            if state.about is not None:
                if state.stats is not None:
                    state.stats = move(state.stats, state.about, params)
                if state.average is not None:
                    state.average = move(state.average, state.about, params)
            state.about = params
        elif layout is not None:
            shift_of, count, kind = layout
            g = np.asarray(shift_of(params), dtype=np.float64)
            if state.shift is not None:  # move the running moments to the batch's shift
                delta = state.shift - g
                if state.stats is not None:
                    state.stats = O.recenter(state.stats, delta, count, kind)
                if state.average is not None:
                    state.average = O.recenter(state.average, delta, count, kind)
            state.shift = g
        if state.stats is None:
            rho = 1.0
            state.stats = s
        else:
            rho = sched.rho(state.t)
            state.stats = O.blend(state.stats, s, rho)
        state.t += 1
        state.units += n_t
        if sched.polyak:
            state.n_average += 1
            state.average = O.polyak(state.average, state.stats, state.n_average)
        new, report = self._m_step(state.stats, params)
        return new, {**report, "rho": rho}

    def _m_step(self, running, params):
        fn = getattr(self.family, "online_m_step", None)
        return fn(running, params) if fn is not None else self.family.m_step(running, params)

    def final(self, state: OnlineState, params, after):
        """The parameters to report: Polyak's (from the averaged statistics) or ``after``."""
        if state.schedule.polyak and state.average is not None:
            return self._m_step(state.average, params)[0]
        return after


# -- mini-batches through the engine -------------------------------------------------------
def plan_batches(bounds: list[tuple[int, int]], batch_size: int, split: int = 1) -> list[list[tuple[int, int, int, int]]]:
    """scikit-learn's ``gen_batches`` over the global units, each batch as the pieces of the
    partitions it overlaps: ``[(partition, local_lo, local_hi, global_lo), ...]``.

    ``split`` cuts every batch into pieces of at most ``ceil(batch_size / split)`` units, so
    that one batch's E-step runs as several tasks; the cut depends on nothing but these
    arguments (not on the machine), so neither does the answer.
    """
    n = bounds[-1][1] if bounds else 0
    step = max(1, -(-batch_size // max(1, split)))
    out = []
    p = 0
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        while bounds[p][1] <= a:
            p += 1
        pieces, q = [], p
        while q < len(bounds) and bounds[q][0] < b:
            lo, hi = max(a, bounds[q][0]), min(b, bounds[q][1])
            for c in range(lo, hi, step):
                pieces.append((q, c - bounds[q][0], min(hi, c + step) - bounds[q][0], c))
            q += 1
        out.append(pieces)
    return out


def _slice(kind: str, X, w, lo: int, hi: int):
    if kind == "rows":
        return X[lo:hi], (None if w is None else w[lo:hi])
    ptr = np.asarray(w)  # ragged: (values, offsets) or (entries, indptr)
    a, b = int(ptr[lo]), int(ptr[hi])
    return X[a:b], ptr[lo:hi + 1] - a


def _batch_e_step(X, w, family, params, kind, iteration, seed, piece):
    """E-step of a piece ``(local_lo, local_hi, global_lo)`` of one partition."""
    lo, hi, start = piece
    a, b = _slice(kind, X, w, lo, hi)
    if getattr(family, "takes_context", False):
        return family.e_step(a, b, params, EStepContext(iteration, seed, start, 0))
    return family.e_step(a, b, params)


def _whole_sequences_only(loaded) -> None:
    """Stepwise EM takes whole sequences: refuse data that cut one across partitions."""
    chains = getattr(loaded.data, "chains", None)
    if chains:
        raise ConfigError(
            f"method='online' (stepwise EM) needs whole sequences, but {len(chains)} sequence(s) are longer than "
            "partition_bytes and were cut across partitions: raise partition_bytes above the longest sequence's "
            "bytes, or fit with the default method='batch' (exact across cuts).")


def _units_bounds(loaded) -> list[tuple[int, int]]:
    data = loaded.data
    return list(getattr(data, "seq_bounds", None) or data.bounds)


def _kind(loaded) -> str:
    return "ragged" if (hasattr(loaded.data, "seq_bounds") or hasattr(loaded.data, "n_terms")) else "rows"


def batch_stats(engine, loaded, family, params, pieces, iteration: int, seed) -> Any:
    """Statistics of one mini-batch (its pieces), reduced on the engine."""
    view = dataclasses.replace(loaded, handles=[loaded.handles[q] for q, *_ in pieces], _release=None,
                               _rescatter=None, pass_seconds=[])
    return engine.map_reduce(_batch_e_step, view, family, params, _kind(loaded), int(iteration), seed,
                             per_partition=[tuple(p[1:]) for p in pieces])


def run_online(engine, loaded, stepwise: StepwiseEM, params, state: OnlineState, *, total: float | None,
               batch_size: int | None = None, n_passes: int = 1, shuffle: bool = False,
               rng: np.random.Generator | None = None, seed: Any = None,
               callbacks: Iterable[Callable[[IterationEvent], None]] = (),
               stop: Callable[[int, Any], bool] | None = None) -> EMResult:
    """``n_passes`` passes of mini-batch updates over ``loaded``; an :class:`EMResult` whose
    ``history`` holds each pass's mean batch objective (weighted by the batches' units) and
    whose ``reports`` are the batches' M-step reports.

    ``batch_size=None`` makes the whole data one batch (``partial_fit``). ``stop(pass, params)``,
    called after each pass, ends the fit early (LDA's perplexity test).
    """
    callbacks = list(callbacks)
    bounds = _units_bounds(loaded)
    if batch_size is None:  # the data as one batch, in the engine's partitions
        batches = plan_batches(bounds, max(1, bounds[-1][1] if bounds else 1))
    else:  # a batch's pieces: at most BATCH_TASKS per batch, none below MIN_PIECE units
        batches = plan_batches(bounds, batch_size, split=max(1, min(BATCH_TASKS, batch_size // MIN_PIECE)))
    history, seconds, reports = [], [], []
    converged = False
    for p in range(n_passes):
        order = rng.permutation(len(batches)) if (shuffle and rng is not None) else range(len(batches))
        acc = units = 0.0
        for j in order:
            t0 = time.perf_counter()
            it = state.t
            stats = batch_stats(engine, loaded, stepwise.family, params, batches[j], it, seed)
            ll = _objective(stepwise.family, stats, params)
            params, report = stepwise.update(state, stats, params, total)
            n_t = _units(stats)
            if np.isfinite(ll) and n_t > 0:
                acc += ll * n_t
                units += n_t
            reports.append(report)
            dt = time.perf_counter() - t0
            seconds.append(dt)
            ev = IterationEvent(it, ll, math.inf, dt, False, params, report)
            for cb in callbacks:
                cb(ev)
        history.append(acc / units if units > 0 else math.nan)
        if stop is not None and stop(p + 1, params):
            converged = True
            break
    result = EMResult(stepwise.final(state, params, params), history, converged, len(history),
                      history[-1] if history else -math.inf, seconds, reports)
    state.params = params  # the running parameters (the next E-step's), Polyak or not
    return result


# -- the estimators' surface ----------------------------------------------------------------
class OnlineEMMixin:
    """``partial_fit`` and ``fit(..., method="online")`` for an :class:`~emflow.estimators.base.EMEstimator`
    whose family's statistics add (mixtures, HMMs). See the module docstring."""

    def _open_args(self, args: tuple) -> tuple:
        # a rows estimator's second positional argument is scikit-learn's ignored y
        return tuple(args[1:]) if self.data_kind == "rows" else tuple(args)

    def _online_total(self, loaded) -> float:
        return float(loaded.weight_sum) if getattr(loaded.data, "weighted", False) else float(loaded.data.n_rows)

    def _watch_online(self, warned: set):
        def watch(event):
            # the batches differ, so a batch's log-likelihood below the last is no failure
            report = {k: v for k, v in event.report.items() if k != "log_prob"}
            self._watch(dataclasses.replace(event, report=report), warned)
        return watch

    def _fit_online(self, data, *args, callbacks=(), **online):
        """``fit(data, ..., method="online", **online)``: see the module docstring."""
        sched = online_schedule(**online)
        self._validate_params()
        callbacks = list(callbacks)
        if getattr(self, "verbose", 0):
            callbacks.append(self._print_iteration)
        with self._session() as engine:
            loaded = self._open(engine, data, *self._open_args(args))
            try:
                _whole_sequences_only(loaded)
                self._prepare(engine, loaded)
                seed = self._seed()
                rng = self._restart_rng(seed, 0)
                warm = bool(getattr(self, "warm_start", False)) and self._is_fitted()
                params = self._get_parameters() if warm else self._initial_params(engine, loaded, rng)
                stepwise = StepwiseEM(self._em_family())
                state = OnlineState(sched, stepwise.start(params), n_features=int(loaded.data.n_features))
                result = run_online(engine, loaded, stepwise, params, state, total=self._online_total(loaded),
                                    batch_size=sched.batch_size, n_passes=sched.n_passes, shuffle=sched.shuffle,
                                    rng=rng, seed=(seed, 0), callbacks=[self._watch_online(set()), *callbacks])
                h = result.history  # the change between the last two passes' estimates, against tol
                result.converged = len(h) >= 2 and abs(h[-1] - h[-2]) < self._em_tol(loaded)
                self._finish_online(result, loaded, engine, state)
            finally:
                loaded.release()
        return self

    def _finish_online(self, result: EMResult, loaded, engine, state: OnlineState) -> None:
        """The fitted state of an online fit or update, and the running state kept with it."""
        self._set_fit_result(result, loaded, engine, method="online", online=dataclasses.asdict(state.schedule),
                             n_batches=state.t - 1)
        state.fit_info = self.fit_info_
        self._online_state = state
        self.n_batch_iter_ = state.t

    def partial_fit(self, X, *args, **online):
        """One stepwise-EM update with ``X`` as the mini-batch (in memory or stored).

        Parameters
        ----------
        X : data as :meth:`fit` takes it
        *args
            What :meth:`fit` takes after the data (``y, sample_weight`` for a mixture,
            ``lengths`` for an HMM).
        **online
            ``learning_decay`` (0.5, 1], ``learning_offset`` > 0, ``polyak``: the schedule,
            fixed by the first call (a later call may change it); defaults 0.6, 2.0, False.

        Returns
        -------
        self

        Raises
        ------
        ConfigError
            A bad schedule keyword (before anything is read).
        FeatureMismatchError
            ``X`` has another number of features than the first batch.
        """
        state: OnlineState | None = getattr(self, "_online_state", None)
        if state is not None and state.fit_info is not getattr(self, "fit_info_", None):
            state = None  # fitted again since (fit, or parameters loaded): start from that fit
        sched = online_schedule(state.schedule if state is not None else None, **online)
        self._validate_params()
        self._check_feature_names(X, state is None and not self._is_fitted())  # a DataFrame's columns
        with self._session() as engine:
            loaded = self._open(engine, X, *self._open_args(args))
            try:
                _whole_sequences_only(loaded)
                d = int(loaded.data.n_features)
                if state is not None or self._is_fitted():
                    known = state.n_features if state is not None else int(getattr(self, "n_features_in_", d))
                    if d != known:
                        raise FeatureMismatchError(
                            f"X has {d} feature(s), but {type(self).__name__} is being fitted online on {known}: "
                            "every batch of partial_fit needs the same columns, in the same order.")
                if state is None:
                    self._prepare(engine, loaded)
                elif hasattr(self, "_check_data"):  # a later batch is checked against the model (HMM symbols)
                    self._check_data(engine, loaded)
                seed = self._seed()
                stepwise = StepwiseEM(self._em_family())
                if state is None:
                    params = (self._get_parameters() if self._is_fitted()
                              else self._initial_params(engine, loaded, self._restart_rng(seed, 0)))
                    state = OnlineState(sched, stepwise.start(params), n_features=d)
                else:
                    params = state.params
                    state.schedule = sched
                result = run_online(engine, loaded, stepwise, params, state, total=None, seed=(seed, 0),
                                    callbacks=[self._watch_online(set())])
                result.converged = False
                self._finish_online(result, loaded, engine, state)
            finally:
                loaded.release()
        return self
