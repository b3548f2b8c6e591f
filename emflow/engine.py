"""The engine: the one place that owns execution.

It maps a function over the partitions of a dataset and tree-reduces the results with
:func:`emflow.stats.add`. Two backends share every line that decides *what* is computed:

* a Dask distributed ``Client``: each partition's task reads its own data on a worker
  (or uses the copy kept resident in worker memory), and the statistics are combined by
  a tree of ``add`` tasks with fan-in ``split_every``;
* in-process threads (no cluster), for in-memory work and small data.

Both reduce in the same fixed tree, so the answer does not depend on the backend or the
number of workers.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from . import data as _data
from .errors import ClusterError, ClusterWarning, ConfigError
from .stats import add

__all__ = ["Engine", "Loaded", "tree_reduce"]

Persist = Literal["auto"] | bool

# Keep data resident when it takes at most this fraction of the memory it would occupy.
RESIDENT_FRACTION = 0.35
# how many times one pass sends lost in-memory partitions again before giving up
MAX_RESCATTERS = 3


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


def _element_starts(rows) -> list[int]:
    """Global index of each partition's first element of its first array."""
    starts = getattr(rows, "element_starts", None)
    return list(starts) if starts is not None else [a for a, _ in rows.bounds]


def tree_reduce(items: list, combine: Callable, split_every: int, submit: Callable) -> tuple[Any, int]:
    """Reduce ``items`` with ``combine`` in a tree of fan-in ``split_every``.

    ``submit(combine, *group)`` returns the (possibly future) combined item. Returns the
    root and the depth of the tree (0 for a single item).
    """
    if split_every < 2:
        raise ConfigError(f"split_every must be at least 2, got {split_every}.")
    if not items:
        raise ValueError("nothing to reduce")
    depth = 0
    level = list(items)
    while len(level) > 1:
        level = [
            submit(combine, *level[i : i + split_every]) if len(level[i : i + split_every]) > 1 else level[i]
            for i in range(0, len(level), split_every)
        ]
        depth += 1
    return level[0], depth


@dataclass
class Loaded:
    """A dataset prepared for repeated passes.

    Attributes
    ----------
    data : RowData
    handles : list
        Per partition: a loader (streamed each pass) or a reference to data kept resident.
    resident : bool
    fingerprint : str
        Content digest of the data (and weights) as stored.
    weight_sum : float
    """

    data: "_data.RowData"
    handles: list
    resident: bool
    fingerprint: str
    weight_sum: float
    _release: Callable[[], None] | None = field(default=None, repr=False)
    # in-memory data scattered to workers: sends partitions i, j, ... again (a worker that
    # dies takes its scattered partitions with it, and Dask cannot recompute them)
    _rescatter: Callable[[list[int]], None] | None = field(default=None, repr=False)

    def lost_partitions(self) -> list[int]:
        """Partitions whose scattered copy is gone (their worker died)."""
        if self._rescatter is None:
            return []
        return [i for i, h in enumerate(self.handles) if getattr(h, "status", "finished") != "finished"]

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None
        self.handles = []


def _lost_scheduler(exc: BaseException) -> bool:
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    return isinstance(exc, (CommClosedError, TimeoutError, CancelledError))


class Engine:
    """Execution of partition-wise map and tree reduction.

    Parameters
    ----------
    client : distributed.Client or None
        ``None`` runs in-process on a thread pool.
    split_every : int, default 8
        Fan-in of the reduction tree.
    n_threads : int or None
        Threads for the in-process backend (default: the machine's cores).
    """

    def __init__(self, client=None, *, split_every: int = 8, n_threads: int | None = None):
        if split_every < 2:
            raise ConfigError(f"split_every must be at least 2, got {split_every}.")
        self.client = client
        self.address = None
        if client is not None:
            try:
                self.address = client.scheduler.address
            except AttributeError:
                self.address = None
        self.split_every = int(split_every)
        self.n_threads = n_threads or os.cpu_count() or 1
        self._pool: ThreadPoolExecutor | None = None
        self.last_reduction: dict = {}

    # -- facts about where we run ---------------------------------------------------
    @property
    def total_threads(self) -> int:
        if self.client is None:
            return self.n_threads
        info = self.client.scheduler_info(n_workers=-1)
        return max(1, sum(w.get("nthreads", 1) for w in info["workers"].values()))

    def memory_limit(self) -> int:
        """Bytes of memory the data may live in (cluster total, or this machine's available)."""
        if self.client is None:
            import psutil

            return int(psutil.virtual_memory().available)
        info = self.client.scheduler_info(n_workers=-1)
        limits = [w.get("memory_limit") or 0 for w in info["workers"].values()]
        return int(sum(limits))

    @property
    def dashboard_link(self) -> str | None:
        if self.client is None:
            return None
        try:
            return self.client.dashboard_link
        except Exception:  # pragma: no cover - no dashboard configured
            return None

    def describe(self) -> str:
        if self.client is None:
            return f"in-process, {self.n_threads} thread(s)"
        info = self.client.scheduler_info(n_workers=-1)
        return f"Dask cluster at {info.get('address', '?')}, {len(info['workers'])} worker(s), {self.total_threads} thread(s)"

    def _raise_if_lost(self, exc: BaseException, when: str) -> None:
        """Turn a lost connection to the scheduler into a ClusterError that names it."""
        if self.client is None:
            return
        closed = getattr(self.client, "status", "running") not in ("running", "connecting")
        if closed or _lost_scheduler(exc):
            raise ClusterError(
                f"Lost the Dask scheduler at {self.address} {when} ({type(exc).__name__}: {exc}). "
                "Checkpoints already written are intact: check the cluster and run the same "
                "command again to resume."
            ) from exc

    def _one_blas_thread(self):
        """With several task threads, BLAS runs single-threaded inside them (as Dask's
        nanny arranges for worker processes): threads x BLAS threads would oversubscribe
        the cores and run many times slower."""
        if self.n_threads <= 1:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1, user_api="blas")

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.n_threads, thread_name_prefix="emflow")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- preparing data -------------------------------------------------------------
    def open(self, data: Any, sample_weight: Any = None, *, min_rows: int = 1,
             persist: Persist = "auto", partition_bytes: int = _data.DEFAULT_PARTITION_BYTES) -> Loaded:
        """Open and validate a dataset, scan it once (fingerprint, finiteness), keep it resident if it fits."""
        rows = _data.open_rows(
            data, sample_weight, partition_bytes=partition_bytes,
            min_partitions=2 * self.total_threads, min_rows=min_rows,
        )
        return self.load(rows, persist=persist)

    def _decide_resident(self, rows: "_data.RowData", persist: Persist) -> bool:
        if persist not in ("auto", True, False):
            raise ConfigError(f"persist must be 'auto', True or False, got {persist!r}.")
        if rows.in_memory:
            return True
        if persist != "auto":
            return bool(persist)
        return rows.nbytes <= RESIDENT_FRACTION * self.memory_limit()

    def load(self, rows: "_data.RowData", *, persist: Persist = "auto") -> Loaded:
        resident = self._decide_resident(rows, persist)
        release: Callable[[], None] | None = None
        rescatter: Callable[[list[int]], None] | None = None
        # the scan reads every partition once: values checked over the whole dataset,
        # fingerprint; errors come back as values (emflow.data.scan_partition)
        starts = _element_starts(rows)
        checks = [getattr(ld, "checks", None) for ld in rows.loaders]
        if self.client is None:
            if resident and not rows.in_memory:
                handles = list(self._threads().map(_data.read_quiet, rows.loaders))
            elif rows.in_memory:
                handles = [_data.read_quiet(ld) for ld in rows.loaders]  # arrays are views
            else:
                handles = list(rows.loaders)
            scans = list(self._threads().map(lambda a: _data.scan_partition(a[0], a[1], rows.weighted, a[2]),
                                             zip(handles, checks, starts)))
        else:
            try:
                if rows.in_memory:
                    # the client holds the values: ship them once (not inside task specs,
                    # which the scheduler would keep a copy of)
                    handles = self.client.scatter([_data.read_quiet(ld) for ld in rows.loaders], hash=False)

                    def rescatter(idx: list[int]) -> None:
                        new = self.client.scatter([rows.loaders[i]() for i in idx], hash=False)
                        for i, f in zip(idx, new):
                            handles[i] = f  # in place: release() sees the new futures
                elif resident:
                    # a task per partition: if a worker dies, the scheduler recomputes its
                    # partitions from the loaders on another worker
                    handles = self.client.map(_data.read_quiet, rows.loaders, pure=False)
                else:
                    handles = list(rows.loaders)
                scans = self.client.gather([
                    self.client.submit(_data.scan_partition, h, c, rows.weighted, r0, pure=False)
                    for h, c, r0 in zip(handles, checks, starts)
                ])
            except Exception as exc:
                self._raise_if_lost(exc, "while loading data")
                raise
            if resident:
                futures = handles

                def release():
                    for f in futures:
                        f.release()

        try:
            fingerprint, weight_sum = _data.finish_scan(rows, scans)
        except Exception:
            if release is not None:
                release()
            raise
        if not resident:  # streamed: every later read is checked against the scan's digest
            handles = _data.checked_handles(rows.loaders, scans, rows.weighted, starts)
        return Loaded(rows, handles, resident, fingerprint, weight_sum, release, rescatter)

    # -- passes over the data -------------------------------------------------------
    def _broadcast(self, args: tuple):
        if self.client is None or not args:
            return args
        try:
            [fut] = self.client.scatter([args], broadcast=True, hash=False)
        except Exception as exc:
            self._raise_if_lost(exc, "while sending parameters")
            raise
        return fut

    def _submit(self, fn: Callable, loaded: Loaded, args: tuple, per_partition: Sequence | None):
        """Results (in-process) or futures (Dask) of fn over every partition, in order."""
        handles = loaded.handles
        extras = [None] * len(handles) if per_partition is None else list(per_partition)
        if len(extras) != len(handles):
            raise ValueError("per_partition needs one entry per partition")
        if self.client is None:
            with self._one_blas_thread():
                if per_partition is None:
                    return list(self._threads().map(lambda h: _apply(fn, h, args), handles))
                return list(self._threads().map(lambda he: _apply_indexed(fn, he[0], args, he[1]),
                                                zip(handles, extras)))
        bargs = self._broadcast(args)
        if per_partition is None:
            return [self.client.submit(_apply, fn, h, bargs, pure=False) for h in handles]
        return [self.client.submit(_apply_indexed, fn, h, bargs, e, pure=False) for h, e in zip(handles, extras)]

    def _pass(self, loaded: Loaded, run: Callable[[], Any]) -> Any:
        """``run()`` (one pass over the data); if a worker died holding scattered in-memory
        partitions, send them again and run the pass again (a few times at most)."""
        for attempt in range(MAX_RESCATTERS + 1):
            try:
                return run()
            except Exception as exc:
                lost = loaded.lost_partitions() if self.client is not None else []
                if lost and attempt < MAX_RESCATTERS and self.client.status == "running":
                    warnings.warn(
                        f"A Dask worker died holding {len(lost)} partition(s) of the in-memory data; sending "
                        "them again from this process and repeating the pass.", ClusterWarning, stacklevel=4)
                    try:
                        loaded._rescatter(lost)
                    except Exception as exc2:
                        self._raise_if_lost(exc2, "while sending lost partitions again")
                        raise
                    continue
                if lost:
                    raise ClusterError(
                        f"Dask workers holding {len(lost)} partition(s) of the in-memory data died "
                        f"{MAX_RESCATTERS + 1} times during one pass ({type(exc).__name__}: {exc}). Check the "
                        "workers' logs (memory limits?), or fit from Zarr, which workers re-read."
                    ) from exc
                self._raise_if_lost(exc, "during a pass over the data")
                raise

    def map_reduce(self, fn: Callable, loaded: Loaded, *args, per_partition: Sequence | None = None) -> Any:
        """``add`` over partitions of ``fn(X_p, w_p, *args[, per_partition[p]])``, reduced in a tree."""
        t0 = time.perf_counter()

        def run():
            parts = self._submit(fn, loaded, args, per_partition)
            if self.client is None:
                return tree_reduce(parts, add, self.split_every, lambda f, *a: f(*a))
            root, depth = tree_reduce(parts, add, self.split_every, lambda f, *a: self.client.submit(f, *a, pure=False))
            return root.result(), depth

        total, depth = self._pass(loaded, run)
        self.last_reduction = {
            "partitions": len(loaded.handles), "depth": depth, "split_every": self.split_every,
            "seconds": time.perf_counter() - t0,
        }
        return total

    def map(self, fn: Callable, loaded: Loaded, *args, per_partition: Sequence | None = None) -> list:
        """``[fn(X_p, w_p, *args[, per_partition[p]]) for each partition]``, gathered in order."""

        def run():
            parts = self._submit(fn, loaded, args, per_partition)
            return parts if self.client is None else self.client.gather(parts)

        return self._pass(loaded, run)


def take_rows(X, w, rows: np.ndarray):
    """Rows ``rows`` (partition-local indices) of a partition, with their weights."""
    return np.asarray(X[rows], dtype=np.float64), (None if w is None else np.asarray(w[rows]))


def sample_rows(engine: Engine, loaded: Loaded, n: int, rng: np.random.Generator):
    """A uniform random sample (without replacement) of ``n`` rows drawn across all partitions.

    Only the sampled rows travel to the client. Returns ``(X_sample, w_sample)``.
    """
    N = loaded.data.n_rows
    n = min(n, N)
    idx = np.sort(rng.choice(N, size=n, replace=False))
    per = []
    for a, b in loaded.data.bounds:
        lo, hi = np.searchsorted(idx, [a, b])
        per.append(idx[lo:hi] - a)
    parts = engine.map(take_rows, loaded, per_partition=per)
    Xs = np.concatenate([p[0] for p in parts])
    ws = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return Xs, ws
