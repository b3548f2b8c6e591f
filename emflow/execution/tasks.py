"""What runs inside the engine's tasks, and the shape of its reduction tree.

Every pass reduces in the same fixed tree of fan-in ``split_every`` (:func:`tree_reduce`);
a task that runs several consecutive partitions (:func:`_apply_reduce`) reduces them in the
subtree the one-task-per-partition tree would build over them, so the answer is the same bits
whatever the batching, the backend or the number of workers.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError
from ..stats import add
from ..storage import fingerprint as _fp

__all__ = ["tree_reduce"]


def _partition_data(handle):
    """Return (X, w) for a partition handle: a loader (streaming) or loaded data (resident)."""
    if isinstance(handle, tuple):
        return handle
    if isinstance(handle, BaseException):  # a resident partition whose (re)read failed
        raise handle
    return handle()


def _apply(fn: Callable, handle, args: tuple):
    X, w = _partition_data(handle)
    return fn(X, w, *args)


def _apply_indexed(fn: Callable, handle, args: tuple, extra):
    X, w = _partition_data(handle)
    return fn(X, w, *args, extra)


def _subtree(leaf: Callable[[int], Any], lo: int, n: int, width: int, split_every: int):
    """The node of :func:`tree_reduce`'s tree over leaves ``lo .. lo + width - 1`` (those
    below ``n``; ``width`` a power of ``split_every``), evaluated depth first: at most
    ``split_every`` partial results per level are alive at once."""
    if width == 1:
        return leaf(lo)
    sub = width // split_every
    kids = [_subtree(leaf, c, n, sub, split_every) for c in range(lo, min(n, lo + width), sub)]
    return add(*kids) if len(kids) > 1 else kids[0]


def _apply_reduce(fn: Callable, handles: list, args: tuple, extras: list | None, width: int,
                  split_every: int):
    """``fn`` over a batch of ``width`` (a power of ``split_every``; fewer in the last batch)
    consecutive partitions, reduced in the same tree :func:`tree_reduce` would build over
    them, so the answer is the same bits as one task per partition."""
    def leaf(i):
        X, w = _partition_data(handles[i])
        return fn(X, w, *args) if extras is None else fn(X, w, *args, extras[i])

    return _subtree(leaf, 0, len(handles), width, split_every)


def _scan_batch(handles: list, checks: list, weighted: bool, starts: list) -> list:
    return [_fp.scan_partition(h, c, weighted, r0) for h, c, r0 in zip(handles, checks, starts)]


def _batch_width(n_partitions: int, max_tasks: int, split_every: int) -> tuple[int, int]:
    """(partitions per task, levels of the tree inside a task): the smallest power of
    ``split_every`` that runs the partitions in at most ``max_tasks`` tasks."""
    width, levels = 1, 0
    while -(-n_partitions // width) > max_tasks:
        width *= split_every
        levels += 1
    return width, levels


def _element_starts(rows) -> list[int]:
    """Global index of each partition's first element of its first array."""
    starts = getattr(rows, "element_starts", None)
    return list(starts) if starts is not None else [a for a, _ in rows.bounds]


def tree_reduce(items: list, combine: Callable, split_every: int, submit: Callable,
                until: int = 1) -> tuple[Any, int]:
    """Reduce ``items`` with ``combine`` in a tree of fan-in ``split_every``.

    ``submit(combine, *group)`` returns the (possibly future) combined item. Returns the
    root and the depth of the tree (0 for a single item). ``until=split_every``: stop at
    the last node's inputs (a list of at most ``split_every`` items; ``combine(*them)`` is
    the root) and return them with the depth below them.
    """
    if split_every < 2:
        raise ConfigError(f"split_every must be at least 2, got {split_every}.")
    if not items:
        raise ValueError("nothing to reduce")
    depth = 0
    level = list(items)
    while len(level) > until:
        level = [
            submit(combine, *level[i : i + split_every]) if len(level[i : i + split_every]) > 1 else level[i]
            for i in range(0, len(level), split_every)
        ]
        depth += 1
    return (level[0] if until == 1 else level), depth


def _reduce_tasks(n: int, split_every: int) -> int:
    """``add`` calls :func:`tree_reduce` makes over ``n`` items."""
    calls = 0
    while n > 1:
        calls += n // split_every + (n % split_every > 1)
        n = -(-n // split_every)
    return calls
