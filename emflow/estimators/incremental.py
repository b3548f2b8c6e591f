"""Incremental EM from a statistics ledger (Neal & Hinton 1998), for every family.

EM's statistics are sums over partitions, so the statistics of the whole data at
parameters ``theta`` are the sum of each partition's statistics at ``theta``, whenever
(and wherever) each was computed. A fit with ``ledger=PATH`` keeps every partition's
statistics of its last pass, with the parameters that pass ran at (the *version*), in
:class:`emflow.storage.ledger.Ledger`; every pass of such a fit computes the per-partition
statistics and sums them in the engine's own reduction tree, so its iterations are those of
plain EM, bit for bit (in-process).

``fit(data, warm_start=True)`` on a fitted estimator whose data grew (rows appended to the
Zarr array, sequences or documents appended to the group):

1. the engine's opening scan gives each partition's content fingerprint
   (:func:`emflow.storage.ledger.partition_fingerprints`); partitions the ledger holds are
   *reused*, the others are *new* or *changed* (same start, other content: recomputed,
   never trusted);
2. only the new and changed partitions are read, at the ledger's version; with the reused
   partitions' statistics this is the E-step of the version over the whole grown data, so
   the first iteration (its log-likelihood in ``history_`` and its M-step) is exactly plain
   EM's from the version, for a fraction of a pass;
3. full passes follow (plain or SQUAREM) until the stop rule holds (``tol``, measured
   between iterations on the grown data, not against the previous fit's bound).

``refresh=f`` (a fraction in (0, 1]; needs ``ledger``): incremental EM (Neal & Hinton 1998)
after the first iteration. The partitions are taken in a fixed rotation (on a warm start the
new and changed ones first, then the others in order; else in order), cut into blocks of
``ceil(f x partitions)``. After every *full pass* (every partition's statistics at one
parameter set: the first iteration, and every ``ceil(1 / f) + 1``-th pass after it) come
``ceil(1 / f)`` incremental iterations, one per block: the block's statistics are recomputed
at the current parameters and replace its old ones, and the M-step runs on the sum of all
partitions' statistics (stale blocks + fresh block). ``history_`` holds only the full passes'
objectives, each the true log-likelihood (or bound) of the parameters entering that pass, so
the stop rule (``tol``) compares full passes (one sweep of incremental iterations and an EM
step apart), ``n_iter_`` and ``max_iter`` count full passes, and the ledger keeps the last
full pass's statistics. ``fit_info_["acceleration"]`` counts the incremental iterations.

A ledger written for another model or dataset (family, features, dtype, parameter
structure, another fit's parameters) is ignored with a
:class:`~emflow.storage.ledger.LedgerMismatch` warning and rewritten.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from typing import Any

import numpy as np

from ..checks import Real, Rule, _config_error
from ..execution.tasks import tree_reduce
from ..stats import add
from ..storage.ledger import LOCK, Ledger, compare_partitions, ledger_lock, structure_of  # noqa: F401 (ledger_lock: base.py's)
from .em import ChangeBelow, _State, partition_starts, run_em

__all__ = ["LedgerRule", "RefreshRule", "RefreshState", "Incremental", "check_ledger_location", "partition_stats", "fit_with_ledger",
           "record_ledger", "add_warm_start_keyword", "wants_warm_start"]


class LedgerRule(Rule):
    """``ledger``: None (no statistics kept) or a directory path (str or os.PathLike)."""

    help = ("None: no statistics kept; a directory: each partition's statistics are kept there, so that "
            "fit(..., warm_start=True) on grown data reads only the new partitions first.")

    def check(self, name, value):
        if value is None:
            return
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise _config_error(name, f"{name} must be None or a directory path (str or os.PathLike), got {value!r}.")


class RefreshRule(Real):
    """``refresh``: None (full passes) or a fraction in (0, 1] of the partitions that each
    incremental iteration refreshes (incremental EM with the ledger)."""

    help = ("None: full passes after the new partitions; a fraction f in (0, 1] (with ledger): incremental EM "
            "(Neal and Hinton 1998), each iteration refreshing ceil(f x partitions) partitions' statistics "
            "between full passes.")

    def __init__(self):
        super().__init__(0.0, strict=True, finite=True, allow_none=True)

    def check(self, name, value):
        super().check(name, value)
        if value is not None and float(value) > 1:
            raise _config_error(name, f"{name} must be None or a fraction in (0, 1], got {value!r}.")


def _local_path(obj) -> str | None:
    if isinstance(obj, (str, os.PathLike)):
        s = os.fspath(obj)
        if "://" not in s or s.startswith("file://"):
            return os.path.realpath(s.removeprefix("file://"))
    return None


def check_ledger_location(ledger, data, est=None) -> None:
    """A ConfigError, before anything is opened or written, when ``ledger`` is not a place
    for a ledger: inside the data store being fitted, a file, or a directory holding
    something other than a ledger; or when ``est``'s ``refresh`` has no ledger or is
    combined with SQUAREM."""
    if est is not None and getattr(est, "refresh", None) is not None:
        if est.family not in REFRESH_FAMILIES:
            raise _config_error("refresh", f"refresh (incremental EM) is available for {', '.join(REFRESH_FAMILIES)}, "
                                           f"not {est.family}: refresh=None.")
        if ledger is None:
            raise _config_error("refresh", f"refresh={est.refresh!r} (incremental EM) keeps each partition's "
                                           "statistics in a ledger: give ledger=DIRECTORY too, or refresh=None.")
        if getattr(est, "accelerate", None) == "squarem":
            raise _config_error("refresh", "refresh (incremental EM) and accelerate='squarem' cannot be combined: "
                                           "set one of them to None.")
    if ledger is None:
        return
    LedgerRule().check("ledger", ledger)
    where = _local_path(ledger)
    if where is None:
        raise _config_error("ledger", f"ledger must be a local directory, got {os.fspath(ledger)!r}.")
    store = _local_path(data)
    if store is not None and (where == store or where.startswith(store.rstrip(os.sep) + os.sep)):
        raise _config_error("ledger", f"ledger must be a directory outside the data store {store!r} "
                                      f"(got {where!r}): emflow never writes into the data.")
    if os.path.isfile(where):
        raise _config_error("ledger", f"ledger must be a directory; {where!r} is a file.")
    if (os.path.isdir(where) and [n for n in os.listdir(where) if n != LOCK]
            and not os.path.exists(os.path.join(where, "summary.json"))):
        raise _config_error("ledger", f"ledger {where!r} is a directory holding something other than a statistics "
                                      "ledger; give an empty or new directory.")


def _subset(loaded, idx: list[int]):
    """The partitions ``idx`` of ``loaded``, as a Loaded the engine passes over (its reads
    are added back to ``loaded``'s counters by :func:`partition_stats`)."""
    return dataclasses.replace(
        loaded, handles=[loaded.handles[i] for i in idx], partition_nbytes=[loaded.partition_nbytes[i] for i in idx],
        partition_digests=[loaded.partition_digests[i] for i in idx], partition_reads=0, bytes_read=0,
        pass_seconds=[], _release=None, _rescatter=None)


def partition_stats(engine, loaded, family, params, context: tuple, idx: list[int] | None = None) -> list:
    """Each partition's statistics at ``params`` (partitions ``idx`` only, if given; all when
    the data cut sequences across partitions, whose statistics need their neighbours').
    ``context``: ``(iteration, seed, init)`` for a context-taking family's E-step."""
    from .em import _group_e_step

    P = len(loaded.handles)
    want = list(range(P)) if idx is None else list(idx)
    full = len(want) == P or bool(getattr(loaded.data, "chains", None))
    which = list(range(P)) if full else want
    target = loaded if full else _subset(loaded, want)
    if getattr(family, "takes_context", False):
        starts = partition_starts(loaded)
        it, seed, init = context
        out = engine.map(_group_e_step, target, (family,), (params,), (int(it),), (seed,), (int(init),),
                         per_partition=[starts[i] for i in which])
        out = [o[0] for o in out]
    else:
        out = engine.map(family.e_step, target, params)
    if not full:  # the subset's reads count as reads of the data
        loaded.partition_reads += target.partition_reads
        loaded.bytes_read += target.bytes_read
        return out
    return out if len(want) == P else [out[i] for i in want]


def _total(engine, parts: list):
    """The sum of per-partition statistics in the engine's reduction tree (map_reduce's bits)."""
    return tree_reduce(parts, add, engine.split_every, lambda f, *a: f(*a))[0]


def _seed_json(seed):
    return list(seed) if isinstance(seed, tuple) else seed


#: the families whose statistics :func:`_rebaser` can move to another reference point, so
#: that statistics computed at different parameters add up (incremental EM's M-step)
REFRESH_FAMILIES = ("gaussian_mixture",)


def _rebase_gmm(covariance_type: str):
    """GMM statistics are moments about a shift ``g`` of the parameters they were computed
    at (:func:`emflow.models.gmm.shift_of`); the M-step takes them about the current
    parameters' shift. ``(at, rebase)``: a partition's shift, and its statistics moved from
    shift ``g_old`` to ``g_new`` (``x - g_new = (x - g_old) + c``, ``c = g_old - g_new``)."""
    from ..models import gmm as G

    def rebase(st, g_old, g_new):
        c = g_old - g_new
        if not np.any(c):
            return st
        n, s1 = np.asarray(st.n), np.asarray(st.s1)
        if covariance_type == "full":
            s2 = (st.s2 + s1[:, :, None] * c[None, None, :] + c[None, :, None] * s1[:, None, :]
                  + n[:, None, None] * np.outer(c, c)[None])
        elif covariance_type == "tied":
            t1 = s1.sum(axis=0)
            s2 = st.s2 + np.outer(t1, c) + np.outer(c, t1) + float(st.weight_sum) * np.outer(c, c)
        else:
            s2 = st.s2 + 2.0 * c[None, :] * s1 + n[:, None] * c[None, :] ** 2
        return st._replace(s1=s1 + n[:, None] * c[None, :], s2=s2)

    return G.shift_of, rebase


def _rebaser(family):
    """``(at(params), rebase(stats, at_old, at_new))`` for a family :data:`REFRESH_FAMILIES`
    covers; a ConfigError for another (a missing-values or MAP mixture, another family)."""
    from .mixture import GMMFamily

    if type(family) is GMMFamily:
        return _rebase_gmm(family.covariance_type)
    raise _config_error("refresh", "refresh (incremental EM) is available for GaussianMixture without missing "
                                   f"values or a prior; this fit's family is {type(family).__name__}: refresh=None.")


class RefreshState(_State):
    """A run with ``refresh``: a full pass (plain EM's iteration, in ``history``), then one
    incremental iteration per block of ``blocks``, then a full pass again (module docstring).
    ``block``: the partitions the next pass refreshes (None: all of them)."""

    def __init__(self, run, blocks: list[list[int]], fraction: float):
        super().__init__(run)
        self.blocks, self.fraction = blocks, fraction
        self.block: list[int] | None = None
        self.partial = 0

    def take(self, stats):
        if self.block is None:
            events, nxt = [self.accept(*self.evaluate(stats))], 0
        else:
            self.evaluations += 1
            self.params, _ = self.run.family.m_step(stats, self.params)
            self.partial += 1
            events, nxt = [], self.blocks.index(self.block) + 1
        self.block = self.blocks[nxt] if nxt < len(self.blocks) else None
        return events

    def acceleration(self) -> dict:
        return {"method": "refresh", "refresh": self.fraction, "blocks": len(self.blocks),
                "block_partitions": max(len(b) for b in self.blocks), "incremental_iterations": self.partial,
                "full_passes": len(self.history) - len(self.run.history or []),
                "passes": self.evaluations - len(self.run.history or [])}


class Incremental:
    """What a ledgered run (:class:`~emflow.estimators.em.EMRun` ``incremental``) does with
    each pass: per-partition statistics, kept with the parameters and context they were
    computed at; the first pass's may be given (``first``: the version's statistics over
    the grown data, from the ledger and the new partitions). ``refresh`` and ``order`` (the
    rotation of partitions): incremental EM (:class:`RefreshState`)."""

    def __init__(self, first: list | None = None, version: Any = None, context: tuple | None = None,
                 refresh: float | None = None, order: list[int] | None = None):
        self.first = first
        # the last full pass (what the ledger keeps), and the statistics the M-steps add up
        self.parts, self.version, self.context = first, version, context
        self.work: list | None = None
        self.refresh, self.order = refresh, order

    def make_state(self, run) -> RefreshState:
        self.at, self.rebase = _rebaser(run.family)
        order = list(self.order)
        size = max(1, math.ceil(float(self.refresh) * len(order)))
        blocks = [sorted(order[k:k + size]) for k in range(0, len(order), size)]
        return RefreshState(run, blocks, float(self.refresh))

    def pass_stats(self, engine, loaded, state):
        if self.first is not None:
            parts, self.first = self.first, None
            self.work = list(parts)
            if self.refresh is not None:
                self.where = [self.at(self.version)] * len(parts)
            return _total(engine, parts)
        context = (state.next_iteration, state.run.seed, int(state.run.init))
        block = getattr(state, "block", None)
        if block is None:
            self.parts = partition_stats(engine, loaded, state.run.family, state.params, context)
            self.version, self.context = state.params, context
            self.work = list(self.parts)
            if self.refresh is None:
                return _total(engine, self.work)
            self.where = [self.at(state.params)] * len(self.work)
        else:
            here = self.at(state.params)
            for i, st in zip(block, partition_stats(engine, loaded, state.run.family, state.params, context, block)):
                self.work[i], self.where[i] = st, here
        # statistics computed at other parameters, moved to the M-step's reference point
        here = self.at(state.params)
        return _total(engine, [self.rebase(st, g, here) for st, g in zip(self.work, self.where)])


def _identity(estimator, loaded, params) -> dict:
    return {"family": estimator.family, "data_kind": estimator.data_kind, "n_features": int(loaded.data.n_features),
            "dtype": str(loaded.data.dtype), "structure": structure_of(params)}


def fit_with_ledger(engine, loaded, family, params, *, estimator, warm: bool, stop=None, history=None, **kwargs):
    """:func:`~emflow.estimators.em.run_em` keeping every partition's statistics, and, on a
    warm start whose ledger belongs to the model, starting from the ledger (see the module
    docstring). The result carries ``ledger_record`` for :func:`record_ledger`."""
    ledger = Ledger(estimator.ledger)
    ident = _identity(estimator, loaded, params)
    P = len(loaded.handles)
    counts = {"partitions_total": P, "partitions_new": P, "partitions_changed": 0, "partitions_reused": 0}
    refresh = getattr(estimator, "refresh", None)
    inc, reuse = Incremental(refresh=refresh, order=list(range(P))), {}
    summary = ledger.usable(ident, params) if warm and not history else None
    fps = compare_partitions(summary, loaded)
    if summary is not None:
        version = ledger.version_params(summary)
        context = tuple(summary["context"]) if summary.get("context") else (1, None, 0)
        context = (context[0], tuple(context[1]) if isinstance(context[1], list) else context[1], context[2])
        by_fp = {fps["fingerprints"][i]: i for i in fps["reused"]}
        parts: list = [None] * P
        parts_from_ledger = ledger.stats(summary, by_fp)
        for i, st in parts_from_ledger.items():
            parts[i] = st
        todo = sorted(fps["new"] + fps["changed"])
        if todo:
            for i, st in zip(todo, partition_stats(engine, loaded, family, version, context, todo)):
                parts[i] = st
        files = {p["fingerprint"]: p["file"] for p in summary["partitions"]}
        reuse = {i: files[fps["fingerprints"][i]] for i in fps["reused"]}
        order = todo + [i for i in range(P) if i not in set(todo)]  # the new and changed refreshed first
        inc = Incremental(parts, version, context, refresh=refresh, order=order)
        params = version
        counts.update(partitions_new=len(fps["new"]), partitions_changed=len(fps["changed"]),
                      partitions_reused=len(fps["reused"]))
        if todo and hasattr(stop, "previous"):
            # the warm stop measures the first change from the last fit's bound, on other data
            stop = ChangeBelow(float(stop.tol))
    result = run_em(engine, loaded, family, params, stop=stop, history=history, incremental=inc, **kwargs)
    result.ledger_record = {"identity": ident, "inc": inc, "fingerprints": fps["fingerprints"], "counts": counts,
                            "reuse": reuse}
    return result


def record_ledger(estimator, loaded, result) -> dict:
    """Write the ledger of the chosen run; ``{"ledger": fit_info_ entry}``."""
    rec = getattr(result, "ledger_record", None)
    if rec is None or rec["inc"].parts is None:
        return {}
    inc = rec["inc"]
    it, seed, init = inc.context
    Ledger(estimator.ledger).write(
        identity=rec["identity"], loaded=loaded, fingerprints=rec["fingerprints"], stats=inc.parts,
        version_params=inc.version, final_params=result.params, context=[int(it), _seed_json(seed), int(init)],
        reuse=rec["reuse"])
    return {"ledger": {"path": os.fspath(estimator.ledger), **rec["counts"], "bytes_read": int(loaded.bytes_read),
                       "fingerprint": loaded.fingerprint}}



def add_warm_start_keyword(cls) -> None:
    """Give the ``fit`` ``cls`` defines a keyword ``warm_start`` (None: the estimator's own
    ``warm_start`` parameter, where it has one; True / False: for this fit only), so that
    ``est.fit(data, warm_start=True)`` continues a fitted model, from its ledger when it has
    one, in every family (hmmlearn's HMMs have no ``warm_start`` parameter)."""
    fit = cls.__dict__.get("fit")
    if fit is None or "warm_start" in inspect.signature(fit).parameters:
        return

    @functools.wraps(fit)
    def wrapped(self, *args, warm_start=None, **kwargs):
        if warm_start is None:
            return fit(self, *args, **kwargs)
        if not isinstance(warm_start, (bool, np.bool_)):
            raise _config_error("warm_start", f"warm_start must be True, False or None, got {warm_start!r}.")
        self._warm_override = bool(warm_start)
        try:
            return fit(self, *args, **kwargs)
        finally:
            del self._warm_override

    sig = inspect.signature(fit)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("warm_start", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = len(params) - 1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(params)
    wrapped.__signature__ = sig.replace(parameters=[*params[:at], extra, *params[at:]])
    cls.fit = wrapped


def wants_warm_start(est) -> bool:
    """Whether this fit continues the fitted model: ``fit(warm_start=...)`` if given, else
    the estimator's ``warm_start`` parameter."""
    return bool(getattr(est, "_warm_override", getattr(est, "warm_start", False)))
