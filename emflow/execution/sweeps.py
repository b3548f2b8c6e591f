"""Boundary-message sweeps along sequences cut across partitions (used by the engine).

A dataset may cut a long sequence into consecutive partitions (``data.chains``: the
partitions of each cut sequence, in time order). A function the engine maps over such
data may declare ``sweeps`` (on itself, or on the object of a bound method): an object
with ``forward(*partition, *args, msg) -> msg`` and, optionally, ``backward(*partition,
*args, msg) -> msg``. Before the map, the engine runs, for every cut sequence, a forward
chain of tasks (each partition's task gets the previous one's message, ``None`` for the
first) and a backward chain the other way; the chains of one sequence, and of different
sequences, do not wait for each other. Each partition of a chain then gets, after its
usual arguments, its *link* ``(forward message in, its own forward message, backward
message in)``; partitions of whole sequences are called as usual. Messages are small (a
few K-vectors); the data are read by each task as usual, so a worker holds a few
partitions at a time whatever the sequence's length.

The *parallel-in-time form* (Dask config key ``emflow.sweep-form`` set to ``"scan"``; the
default is ``"chain"``) is used for sweeps that also declare ``transfer(*partition, *args,
(first, last)) -> (forward element, backward element)`` and ``scan(elements) -> links``:
every partition of a chain reduces itself to its transfer elements in one parallel pass
(a task each, all at once), and the links follow on the client from those small
elements; the span of the heavy work is then one pass whatever the number of slices.

The HMMs' sweeps are in :mod:`emflow.models.hmm_long`, the LGSSM's in
:mod:`emflow.models.lgssm_long`.

A function without ``sweeps`` is taken to be step-local (its result on a slice does not
depend on the rest of the sequence: moments, samples of steps, symbol ranges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from .tasks import _apply_indexed

SWEEP_FORMS = ("chain", "scan")

__all__ = ["sweeps_of", "Linked", "links"]


def sweeps_of(fn: Callable):
    """The ``sweeps`` a function declares (on itself or on its bound object), or None."""
    s = getattr(fn, "sweeps", None)
    if s is None:
        s = getattr(getattr(fn, "__self__", None), "sweeps", None)
    return s


@dataclass(frozen=True)
class Linked:
    """``fn`` called with its per-partition value (when it has one) and then the link
    (partitions of whole sequences: without a link)."""

    fn: Callable
    has_extra: bool

    def __call__(self, *a):
        *rest, (extra, link) = a
        tail = ((extra,) if self.has_extra else ()) + (() if link is None else (link,))
        return self.fn(*rest, *tail)


def _run_chain(step: Callable, handles: list, order: list[int], args: tuple) -> dict[int, Any]:
    out, msg = {}, None
    for p in order:
        msg = _apply_indexed(step, handles[p], args, msg)
        out[p] = msg
    return out


def links(engine, fn: Callable, loaded, args: tuple) -> tuple[list | None, list]:
    """``(per-partition links or None, keys of the sweep tasks)`` for ``fn`` over ``loaded``.

    None when the data cut no sequence or ``fn`` is step-local. In-process, each chain runs
    in one thread (every chain, forward and backward, at once); on Dask, each partition's
    sweep step is a task that depends on its neighbour's.
    """
    chains = getattr(loaded.data, "chains", None)
    sweeps = sweeps_of(fn) if chains else None
    if sweeps is None:
        return None, []
    if _form() == "scan" and getattr(sweeps, "transfer", None) is not None:
        return _scan(engine, sweeps, loaded, args, chains), []
    backward = getattr(sweeps, "backward", None)
    handles = loaded.handles
    fwd: dict[int, Any] = {}
    bwd: dict[int, Any] = {}
    keys: list = []
    if engine.client is None:
        pool = engine._threads()
        with engine._one_blas_thread():
            jobs = [(fwd, pool.submit(_run_chain, sweeps.forward, handles, ch, args)) for ch in chains]
            if backward is not None:
                jobs += [(bwd, pool.submit(_run_chain, backward, handles, ch[::-1], args)) for ch in chains]
            for into, job in jobs:
                into.update(job.result())
    else:
        bargs = engine._broadcast(args)
        for steps, into, step in ((list, fwd, sweeps.forward), (reversed, bwd, backward)):
            if step is None:
                continue
            for ch in chains:
                prev = None
                for p in steps(ch):
                    # before the map tasks: the map waits on the sweeps
                    prev = engine.client.submit(_apply_indexed, step, handles[p], bargs, prev, pure=False, priority=2)
                    into[p] = prev
                    keys.append(prev.key)
    out: list = [None] * len(handles)
    for ch in chains:
        for j, p in enumerate(ch):
            out[p] = (fwd[ch[j - 1]] if j else None, fwd[p], bwd.get(ch[j + 1]) if j + 1 < len(ch) else None)
    return out, keys


def _form() -> str:
    import dask

    form = dask.config.get("emflow.sweep-form", "chain")
    if form not in SWEEP_FORMS:
        raise ConfigError(f"The Dask config key emflow.sweep-form must be one of {SWEEP_FORMS}, got {form!r}.")
    return form


def _scan(engine, sweeps, loaded, args: tuple, chains: list[list[int]]) -> list:
    """Links of the parallel form: every slice's transfer elements at once, then the scan."""
    handles = loaded.handles
    jobs = [(p, (j == 0, j == len(ch) - 1)) for ch in chains for j, p in enumerate(ch)]
    if engine.client is None:
        with engine._one_blas_thread():
            elems = list(engine._threads().map(lambda pe: _apply_indexed(sweeps.transfer, handles[pe[0]], args, pe[1]),
                                               jobs))
    else:
        bargs = engine._broadcast(args)
        futures = [engine.client.submit(_apply_indexed, sweeps.transfer, handles[p], bargs, ends, pure=False,
                                        priority=2) for p, ends in jobs]
        elems = engine.client.gather(futures)
    by_part = {p: e for (p, _), e in zip(jobs, elems)}
    out: list = [None] * len(handles)
    for ch in chains:
        for p, link in zip(ch, sweeps.scan([by_part[p] for p in ch])):
            out[p] = link
    return out
