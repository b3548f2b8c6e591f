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

A function mapped over data that cut a sequence must declare its sweeps or be marked
*step-local* (its result on a slice does not depend on the rest of the sequence: moments,
samples of steps, symbol ranges), by :func:`step_local` or an attribute ``step_local =
True`` (on itself or its bound object); any other function is refused with a TypeError
naming it: a function that ignores the boundaries would give wrong statistics silently.
``sweeps`` may also have ``bind(fn, args) -> sweeps`` to resolve them against the pass's
arguments: :class:`Group` does, for a function that runs several members' functions on one
read of a partition (the lockstep E-step of :func:`emflow.estimators.em.run_em_group`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from .tasks import _apply_indexed

SWEEP_FORMS = ("chain", "scan")

__all__ = ["sweeps_of", "step_local", "Group", "Linked", "links"]


def sweeps_of(fn: Callable):
    """The ``sweeps`` a function declares (on itself or on its bound object), or None."""
    s = getattr(fn, "sweeps", None)
    if s is None:
        s = getattr(getattr(fn, "__self__", None), "sweeps", None)
    return s


def step_local(fn: Callable) -> Callable:
    """Mark ``fn`` step-local: on a slice of a cut sequence it needs no boundary messages."""
    fn.step_local = True
    return fn


def _is_step_local(fn: Callable) -> bool:
    return bool(getattr(fn, "step_local", False) or getattr(getattr(fn, "__self__", None), "step_local", False))


def _name(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{type(owner).__qualname__}.{fn.__name__}" if owner is not None else f"{mod}.{name}"


def _resolve(fn: Callable, args: tuple):
    """The sweeps of ``fn`` for a pass with ``args``, None for a step-local function;
    a TypeError naming ``fn`` when it is neither."""
    sweeps = sweeps_of(fn)
    if sweeps is not None and getattr(sweeps, "bind", None) is not None:
        sweeps = sweeps.bind(fn, args)
    if sweeps is None and not _is_step_local(fn):
        raise TypeError(
            f"{_name(fn)} is mapped over data that cut a sequence across partitions, but declares neither "
            "`sweeps` (the boundary messages it needs, emflow.execution.sweeps) nor `step_local = True` (its "
            "result on a slice does not depend on the rest of the sequence). Declare one, or open the data "
            "without cut_long.")
    return sweeps


@dataclass(frozen=True)
class Group:
    """Sweeps of a function that runs several members' functions on one read of a partition
    and returns the tuple of their results (a lockstep group of EM runs).

    ``members(args) -> [(fn_i, args_i), ...]`` (a module-level function) gives each member's
    function and its arguments from the pass's; ``args_i`` None marks a member that cannot
    take boundary messages (refused if its function declares sweeps). A member's messages
    and link are the i-th entries of the group's tuples (None for a step-local member);
    :meth:`member_links` splits a group link.
    """

    members: Callable

    def bind(self, fn: Callable, args: tuple) -> "_BoundGroup":
        out = []
        for f, a in self.members(args):
            s = _resolve(f, a)
            if s is not None and a is None:
                raise TypeError(f"{_name(f)} declares sweeps but its arguments cannot be given boundary messages "
                                f"in {_name(fn)}; run it alone.")
            out.append((s, a))
        return _BoundGroup(tuple(out), len(args))

    @staticmethod
    def member_links(link, n: int) -> list:
        """Per-member links of a group link ``(fwd in, own fwd, bwd in)`` (None: none)."""
        if link is None:
            return [None] * n
        return [None if link[1][i] is None else tuple(None if m is None else m[i] for m in link) for i in range(n)]


@dataclass(frozen=True)
class _BoundGroup:
    members: tuple
    n_args: int

    def _each(self, step: str, a: tuple, only=None):
        *rest, msg = a
        part = rest[:len(rest) - self.n_args]
        msgs = [None] * len(self.members) if msg is None or only == "ends" else msg
        out = []
        for (s, args), m in zip(self.members, msgs):
            f = None if s is None else getattr(s, step, None)
            out.append(None if f is None else f(*part, *args, msg if only == "ends" else m))
        return tuple(out)

    def forward(self, *a):
        return self._each("forward", a)

    def _backward(self, *a):
        return self._each("backward", a)

    def _transfer(self, *a):
        return self._each("transfer", a, only="ends")

    @property
    def backward(self):
        """None when no member has a backward sweep."""
        if all(s is None or getattr(s, "backward", None) is None for s, _ in self.members):
            return None
        return self._backward

    @property
    def transfer(self):
        """The parallel form, when every member that sweeps has it."""
        if any(s is not None and getattr(s, "transfer", None) is None for s, _ in self.members):
            return None
        return self._transfer

    def scan(self, elements: list) -> list:
        per = [None if s is None else s.scan([e[i] for e in elements]) for i, (s, _) in enumerate(self.members)]
        n = len(elements)
        return [tuple(tuple(None if L is None else L[j][k] for L in per) for k in range(3)) for j in range(n)]


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
    sweeps = _resolve(fn, args) if chains else None
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
