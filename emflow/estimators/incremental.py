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

A ledger written for another model or dataset (family, features, dtype, parameter
structure, another fit's parameters) is ignored with a
:class:`~emflow.storage.ledger.LedgerMismatch` warning and rewritten.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any

import numpy as np

from ..checks import Rule, _config_error
from ..execution.tasks import tree_reduce
from ..stats import add
from ..storage.ledger import LOCK, Ledger, compare_partitions, ledger_lock, structure_of  # noqa: F401 (ledger_lock: base.py's)
from .em import ChangeBelow, partition_starts, run_em

__all__ = ["LedgerRule", "Incremental", "check_ledger_location", "partition_stats", "fit_with_ledger",
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


def _local_path(obj) -> str | None:
    if isinstance(obj, (str, os.PathLike)):
        s = os.fspath(obj)
        if "://" not in s or s.startswith("file://"):
            return os.path.realpath(s.removeprefix("file://"))
    return None


def check_ledger_location(ledger, data) -> None:
    """A ConfigError, before anything is opened or written, when ``ledger`` is not a place
    for a ledger: inside the data store being fitted, a file, or a directory holding
    something other than a ledger."""
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


class Incremental:
    """What a ledgered run (:class:`~emflow.estimators.em.EMRun` ``incremental``) does with
    each pass: per-partition statistics, kept with the parameters and context they were
    computed at; the first pass's may be given (``first``: the version's statistics over
    the grown data, from the ledger and the new partitions)."""

    def __init__(self, first: list | None = None, version: Any = None, context: tuple | None = None):
        self.first = first
        self.parts, self.version, self.context = first, version, context

    def pass_stats(self, engine, loaded, state):
        if self.first is not None:
            parts, self.first = self.first, None
            return _total(engine, parts)
        context = (state.next_iteration, state.run.seed, int(state.run.init))
        self.parts = partition_stats(engine, loaded, state.run.family, state.params, context)
        self.version, self.context = state.params, context
        return _total(engine, self.parts)


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
    inc, reuse = Incremental(), {}
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
        inc = Incremental(parts, version, context)
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
