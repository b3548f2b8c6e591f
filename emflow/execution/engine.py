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
import logging
import os
import statistics
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from ..storage import data as _data
from ..errors import ClusterError, ClusterWarning, ConfigError
from ..stats import add

__all__ = ["Engine", "Loaded", "tree_reduce", "WORKER_WAIT_TIMEOUT", "STALL_FACTOR", "STALL_FLOOR"]

logger = logging.getLogger("emflow.execution.engine")

Persist = Literal["auto"] | bool

# Keep data resident when it takes at most this fraction of the memory it would occupy.
RESIDENT_FRACTION = 0.35
# how many times one pass sends lost in-memory partitions again before giving up
MAX_RESCATTERS = 3
# A Dask pass over many partitions runs several consecutive partitions in one task, which
# reduces them inside the task (the scheduler's cost is per task: ~0.5 ms each, see
# benchmarks/scale-engine). With partitions_per_task="auto", a pass of P partitions runs as
# at most max(BATCH_MIN_TASKS, TASKS_PER_THREAD x the cluster's threads) map tasks.
BATCH_MIN_TASKS = 512
TASKS_PER_THREAD = 4

# Dask config keys (``dask.config.set({...})``, a Dask YAML file, or environment variables
# such as ``DASK_EMFLOW__WORKER_WAIT_TIMEOUT=10m``); Engine arguments override them.
# How long a fit whose every worker was lost waits for one to join the scheduler:
WORKER_WAIT_TIMEOUT = "emflow.worker-wait-timeout"
# A pass taking more than max(factor x the median of the previous passes, floor) is
# reported (once per pass) as stalled; the wait goes on.
STALL_FACTOR = "emflow.stall-factor"
STALL_FLOOR = "emflow.stall-floor"
_DEFAULTS = {WORKER_WAIT_TIMEOUT: "300s", STALL_FACTOR: 10.0, STALL_FLOOR: "60s"}
# while waiting for a pass, look at the cluster this often (seconds)
POLL_SECONDS = 0.5
# how long the scheduler may take to answer a question about its workers (seconds)
PROBE_TIMEOUT = 5.0
# passes remembered for the usual duration of a pass
PASS_HISTORY = 20


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
    return [_data.scan_partition(h, c, weighted, r0) for h, c, r0 in zip(handles, checks, starts)]


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
    # seconds taken by the latest passes over these data (the usual time of a pass)
    pass_seconds: list = field(default_factory=list, repr=False)

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


def _cancelled(exc: BaseException) -> bool:
    """Futures cancelled: data they needed left the cluster (or the scheduler connection did)."""
    from concurrent.futures import CancelledError

    return isinstance(exc, CancelledError)


def _comm_failed(exc: BaseException) -> bool:
    from distributed.comm.core import CommClosedError

    return isinstance(exc, (CommClosedError, OSError, TimeoutError))


def _secs(x: float) -> str:
    return f"{x:.0f} s" if x >= 100 else f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def _warn(message: str) -> None:
    """A ClusterWarning, and the same text as a warning on the ``emflow`` logger (which a
    Prefect flow's run log, a log file or a console handler picks up)."""
    logger.warning("%s", message)
    warnings.warn(message, ClusterWarning, stacklevel=5)


def _setting(key: str, value, seconds: bool) -> float:
    """An engine setting: the argument, else the Dask config key, else the default."""
    import dask
    from dask.utils import parse_timedelta

    if value is None:
        value = dask.config.get(key, _DEFAULTS[key])
    try:
        if seconds and not isinstance(value, (int, float)):  # "5 minutes", a timedelta
            out = float(parse_timedelta(value, default="seconds"))
        else:
            out = float(value)
    except (TypeError, ValueError, KeyError) as exc:
        kind = "a duration (seconds, or a string such as '5 minutes')" if seconds else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}.") from exc
    if not out > 0 or not np.isfinite(out):
        raise ConfigError(f"{key} must be positive and finite, got {value!r}.")
    return out


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
    worker_wait_timeout : float or str, optional
        When every worker of the cluster is lost (the scheduler still up), how long to wait
        for one to join before failing (seconds or a string such as ``"5 minutes"``;
        default: the Dask config key ``emflow.worker-wait-timeout``, else 300 s).
    partitions_per_task : int or "auto", default "auto"
        On a Dask cluster, :meth:`map_reduce` runs this many consecutive partitions in one
        task and reduces them there (a power of ``split_every``: the reduction tree, and so
        the answer, is the same bits as with one task per partition). ``"auto"``: one per
        task up to ``BATCH_MIN_TASKS`` partitions, then the smallest power of
        ``split_every`` that keeps a pass at most ``max(BATCH_MIN_TASKS, TASKS_PER_THREAD x
        threads)`` tasks. Tasks cost the scheduler about half a millisecond each.
    stall_factor, stall_floor : float, optional
        A pass that has run longer than ``max(stall_factor x the median of the previous
        passes, stall_floor seconds)`` is reported once as stalled (a ClusterWarning and a
        warning on the ``emflow`` logger, naming the workers that hold its unfinished
        tasks); the wait goes on. Defaults: Dask config keys ``emflow.stall-factor`` (10)
        and ``emflow.stall-floor`` (60 s).
    """

    def __init__(self, client=None, *, split_every: int = 8, n_threads: int | None = None,
                 worker_wait_timeout: float | str | None = None, stall_factor: float | None = None,
                 stall_floor: float | str | None = None, partitions_per_task: int | str = "auto"):
        if split_every < 2:
            raise ConfigError(f"split_every must be at least 2, got {split_every}.")
        if partitions_per_task != "auto":
            ok = isinstance(partitions_per_task, (int, np.integer)) and not isinstance(partitions_per_task, bool)
            width = 1
            while ok and width < partitions_per_task:
                width *= int(split_every)
            if not ok or partitions_per_task < 1 or width != partitions_per_task:
                raise ConfigError(
                    f"partitions_per_task must be 'auto' or a power of split_every ({split_every}): "
                    f"1, {split_every}, {split_every ** 2}, ...; got {partitions_per_task!r}.")
        self.partitions_per_task = partitions_per_task
        self._worker_wait_timeout, self._stall_factor, self._stall_floor = (
            worker_wait_timeout, stall_factor, stall_floor)
        # bad values fail here (the config is read again at each use, so dask.config.set applies)
        _ = (self.worker_wait_timeout, self.stall_factor, self.stall_floor)
        self._workers_seen = 0  # workers at the latest look: "all N workers were lost"
        # set by emflow.execution.cluster on a cluster it connected to: called before each pass with the
        # workers not checked yet (ones that joined), raises ClusterError for unfit ones
        self.worker_check: Callable[[list[str]], Any] | None = None
        self.checked_workers: set[str] = set()
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

    # -- settings -------------------------------------------------------------------
    @property
    def worker_wait_timeout(self) -> float:
        return _setting(WORKER_WAIT_TIMEOUT, self._worker_wait_timeout, seconds=True)

    @property
    def stall_factor(self) -> float:
        return _setting(STALL_FACTOR, self._stall_factor, seconds=False)

    @property
    def stall_floor(self) -> float:
        return _setting(STALL_FLOOR, self._stall_floor, seconds=True)

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

    # -- what became of the cluster ---------------------------------------------------
    def _connected(self) -> bool:
        """The client is connected to the scheduler. Once the connection drops, the client
        cancels every future and tries to reconnect ("connecting"), then closes: either
        way the work it held is gone."""
        return getattr(self.client, "status", "running") == "running"

    def _ask(self, method: str, **kwargs):
        """A scheduler RPC answered within PROBE_TIMEOUT, or None (no answer: the scheduler
        is gone, hung or overloaded)."""
        try:
            return self.client.sync(getattr(self.client.scheduler, method), callback_timeout=PROBE_TIMEOUT,
                                    **kwargs)
        except Exception:
            return None

    def _workers(self) -> dict | None:
        """Worker address -> threads, as the scheduler sees them now; None when it does not answer."""
        if not self._connected():
            return None
        return self._ask("ncores")

    def _scheduler_gone(self, exc: BaseException | None = None) -> bool:
        if not self._connected():
            return True
        # a failed connection: gone if it no longer answers either
        return exc is not None and _comm_failed(exc) and self._workers() is None

    def _lost_scheduler_error(self, when: str, exc: BaseException | None = None) -> ClusterError:
        why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        return ClusterError(
            f"Lost the Dask scheduler at {self.address} {when}{why}. "
            "Checkpoints already written are intact: check the cluster and run the same "
            "command again to resume."
        )

    def _raise_if_lost(self, exc: BaseException, when: str) -> None:
        """Turn a lost connection to the scheduler into a ClusterError that names it."""
        if self.client is not None and self._scheduler_gone(exc):
            raise self._lost_scheduler_error(when, exc) from exc

    def _await_workers(self, when: str, healthy: bool = False) -> bool:
        """If the scheduler answers that it has no worker: warn, and wait (at most
        ``worker_wait_timeout``) for one to join. Returns whether it had to wait; raises
        ClusterError when none joined in time, or when the scheduler is lost meanwhile.

        ``healthy``: nothing has gone wrong yet (before a pass), so the workers there now
        are the ones "all N workers were lost" counts."""
        workers = self._workers()
        if workers is None or workers:
            if workers and healthy:
                self._workers_seen = len(workers)
            return False  # workers there (or the scheduler did not answer: nothing to decide)
        timeout = self.worker_wait_timeout
        n = self._workers_seen
        _warn(f"All {n or 'the'} Dask workers were lost {when} (the scheduler at {self.address} is still up); "
              f"waiting up to {timeout:g} s for workers to join (start new ones on this scheduler), "
              "then the fit goes on.")
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            if not self._connected():
                raise self._lost_scheduler_error("while waiting for workers to join")
            workers = self._workers()
            if workers:
                logger.warning("%d Dask worker(s) joined the scheduler at %s; going on with the fit.",
                               len(workers), self.address)
                return True
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"All {n or 'the'} Dask workers were lost {when} and none joined the scheduler at "
                    f"{self.address} within {timeout:g} s (the scheduler is still up). Start workers on "
                    f"that scheduler (`dask worker {self.address}`), or allow them longer with the Dask "
                    f"config key {WORKER_WAIT_TIMEOUT}, and run the same command again: checkpoints "
                    "already written are intact."
                )

    def _check_new_workers(self) -> None:
        """Workers that joined since the last look go through ``worker_check`` (once each)."""
        if self.worker_check is None:
            return
        new = sorted(set(self._workers() or ()) - self.checked_workers)
        if new:
            self.worker_check(new)
            self.checked_workers.update(new)

    def _lost_partitions(self, loaded: Loaded) -> list[int]:
        """Scattered partitions gone from the cluster: those whose future says so, and those
        no worker holds by the scheduler's count (the client learns of lost data a little
        later than the scheduler does: after every worker died, some futures still look fine)."""
        lost = set(loaded.lost_partitions())
        if loaded._rescatter is not None:
            keys = [h.key for h in loaded.handles]
            held = self._ask("who_has", keys=keys)
            if held is not None:
                lost.update(i for i, k in enumerate(keys) if not held.get(k))
        return sorted(lost)

    def _wait(self, futures: list, keys: list, started: float, usual: float | None) -> None:
        """Wait until ``futures`` are done (or erred or cancelled), watching the cluster:
        all workers lost -> :meth:`_await_workers`; a pass far slower than ``usual`` ->
        one stall warning. Results are not fetched here."""
        from distributed import wait

        stall_after = None if usual is None else max(self.stall_factor * usual, self.stall_floor)
        warned = False
        while True:
            try:
                with self.client.as_current():
                    wait(futures, timeout=POLL_SECONDS)
                return
            except TimeoutError:
                pass
            except Exception:
                return  # cancelled futures: their result() raises what the caller reports
            if not self._connected():
                return  # the futures are cancelled now; the caller reports the lost scheduler
            if self._await_workers("during a pass over the data"):
                started = time.monotonic()  # the time waiting for workers is accounted for
                continue
            elapsed = time.monotonic() - started
            if not warned and stall_after is not None and elapsed > stall_after:
                warned = True
                _warn(self._stall_message(keys, elapsed, usual))

    def _stall_message(self, keys: list, elapsed: float, usual: float) -> str:
        head = (f"A pass over the data has taken {_secs(elapsed)} so far, against a usual {_secs(usual)} "
                "(median of the previous passes). ")
        processing = self._ask("processing")
        if processing is None:
            where = (f"The Dask scheduler at {self.address} did not answer within {PROBE_TIMEOUT:g} s either: "
                     "a hung scheduler (stopped with SIGSTOP, swapping) or an overloaded one is likely. ")
        else:
            mine = set(keys)
            held = {w: sum(k in mine for k in ks) for w, ks in processing.items()}
            held = {w: n for w, n in sorted(held.items()) if n}
            if held:
                where = ("Its unfinished tasks are held by " + ", ".join(
                    f"worker {w} ({n} task{'s' * (n > 1)})" for w, n in held.items())
                         + ": a hung worker (stopped with SIGSTOP, swapping) or an overloaded cluster are likely. ")
            else:
                where = (f"No worker of the {len(processing)} at the scheduler {self.address} is running its "
                         "tasks: they wait for a free worker (an overloaded cluster, or workers that cannot "
                         "take them) or for data held by a hung worker. ")
        return head + where + "Still waiting: the fit goes on when they finish."

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
        # fingerprint; errors come back as values (emflow.storage.data.scan_partition)
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
            t0 = time.monotonic()
            try:
                self._await_workers("before loading data", healthy=True)
                self._check_new_workers()
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
                # many partitions: several per scan task (a task costs the scheduler ~0.5 ms)
                width, _ = self._batch(len(handles))
                futures = [self.client.submit(_scan_batch, list(handles[i:i + width]), checks[i:i + width],
                                              rows.weighted, starts[i:i + width], pure=False)
                           for i in range(0, len(handles), width)]
                self._wait(futures, [], t0, None)
                scans = [s for batch in self.client.gather(futures) for s in batch]
            except Exception as exc:
                if isinstance(exc, ClusterError):
                    raise
                self._raise_if_lost(exc, "while loading data")
                if _cancelled(exc):
                    raise ClusterError(
                        f"Dask workers of the scheduler at {self.address} were lost while loading the data, "
                        f"with data only they held ({type(exc).__name__}: {exc}). Run the same command again."
                    ) from exc
                raise
            scan_seconds = time.monotonic() - t0
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
        loaded = Loaded(rows, handles, resident, fingerprint, weight_sum, release, rescatter)
        if self.client is not None:
            # the scan read every partition: the first measure of how long a pass takes
            loaded.pass_seconds.append(scan_seconds)
        return loaded

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

    def _pass(self, loaded: Loaded, run: Callable[[Callable], Any]) -> Any:
        """``run(wait)`` (one pass over the data; ``wait(futures, keys)`` waits for its
        futures while watching the cluster). Faults the cluster recovers from repeat the
        pass (a few times at most):

        * a worker died holding scattered in-memory partitions: send them again;
        * every worker was lost, the scheduler still up: wait (bounded) for workers to
          join, send lost partitions again, repeat the pass.

        A lost scheduler is a ClusterError naming it.
        """
        for attempt in range(MAX_RESCATTERS + 1):
            t0 = time.monotonic()
            if self.client is not None:
                self._await_workers("before a pass over the data" if attempt == 0 else
                                    "during a pass over the data", healthy=attempt == 0)
                self._check_new_workers()
                t0 = time.monotonic()
            past = loaded.pass_seconds
            usual = statistics.median(past) if past else None

            def wait(futures: list, keys: list) -> None:
                self._wait(futures, keys, t0, usual)

            try:
                out = run(wait)
            except Exception as exc:
                if self.client is None or isinstance(exc, ClusterError):
                    raise
                self._raise_if_lost(exc, "during a pass over the data")
                lost = self._lost_partitions(loaded)
                # scattered data (partitions, the parameters sent to every worker) went with
                # workers that died, or none is left: a later attempt can do the pass
                recoverable = bool(lost) or _cancelled(exc) or self._workers() == {}
                if recoverable and attempt < MAX_RESCATTERS:
                    self._await_workers("during a pass over the data")
                    lost = self._lost_partitions(loaded)
                    if lost:
                        _warn(f"A Dask worker died holding {len(lost)} partition(s) of the in-memory data; "
                              "sending them again from this process and repeating the pass.")
                        try:
                            loaded._rescatter(lost)
                        except Exception as exc2:
                            self._raise_if_lost(exc2, "while sending lost partitions again")
                            if not (_comm_failed(exc2) or _cancelled(exc2)):
                                raise
                            # sent to a worker dying too: the next attempt looks again
                            logger.warning("Sending lost partitions again failed (%s: %s); trying again.",
                                           type(exc2).__name__, exc2)
                    else:
                        logger.info("Data held by lost Dask workers (%s); repeating the pass.", exc)
                    continue
                if lost:
                    raise ClusterError(
                        f"Dask workers holding {len(lost)} partition(s) of the in-memory data died "
                        f"{MAX_RESCATTERS + 1} times during one pass ({type(exc).__name__}: {exc}). Check the "
                        "workers' logs (memory limits?), or fit from Zarr, which workers re-read."
                    ) from exc
                raise
            past.append(time.monotonic() - t0)
            del past[:-PASS_HISTORY]
            return out

    def map_reduce(self, fn: Callable, loaded: Loaded, *args, per_partition: Sequence | None = None) -> Any:
        """``add`` over partitions of ``fn(X_p, w_p, *args[, per_partition[p]])``, reduced in a tree."""
        t0 = time.perf_counter()

        width, levels = self._batch(len(loaded.handles))

        def run(wait):
            if width > 1:
                parts = self._submit_batches(fn, loaded, args, per_partition, width)
            else:
                parts = self._submit(fn, loaded, args, per_partition)
            if self.client is None:
                return tree_reduce(parts, add, self.split_every, lambda f, *a: f(*a))
            keys = [p.key for p in parts]

            def submit(f, *a):
                # before the map tasks still queued: a partial sum frees its inputs, so the
                # workers hold a few statistics bundles at a time, not one per map task
                fut = self.client.submit(f, *a, pure=False, priority=1)
                keys.append(fut.key)
                return fut

            root, depth = tree_reduce(parts, add, self.split_every, submit)
            # hold only the root: a map task's statistics are freed on the worker once its
            # partial sum is done, not at the end of the pass (P bundles held at once)
            del parts
            wait([root], keys)
            return root.result(), depth + levels, len(keys)

        out = self._pass(loaded, run)
        if self.client is None:
            (total, depth), tasks = out, len(loaded.handles) + _reduce_tasks(len(loaded.handles), self.split_every)
        else:
            total, depth, tasks = out
        self.last_reduction = {
            "partitions": len(loaded.handles), "depth": depth, "split_every": self.split_every,
            "partitions_per_task": width, "tasks": tasks, "seconds": time.perf_counter() - t0,
        }
        return total

    def _batch(self, n_partitions: int) -> tuple[int, int]:
        """(partitions per map task, tree levels inside a task) for a Dask pass."""
        if self.client is None:
            return 1, 0
        if self.partitions_per_task == "auto":
            if n_partitions <= BATCH_MIN_TASKS:
                return 1, 0
            return _batch_width(n_partitions, max(BATCH_MIN_TASKS, TASKS_PER_THREAD * self.total_threads),
                                self.split_every)
        width, levels = 1, 0
        while width < self.partitions_per_task:
            width, levels = width * self.split_every, levels + 1
        return width, levels

    def _submit_batches(self, fn: Callable, loaded: Loaded, args: tuple, per_partition: Sequence | None,
                        width: int) -> list:
        """Futures of fn over runs of ``width`` consecutive partitions, each reduced in its task."""
        handles = loaded.handles
        if per_partition is not None and len(per_partition) != len(handles):
            raise ValueError("per_partition needs one entry per partition")
        bargs = self._broadcast(args)
        return [self.client.submit(_apply_reduce, fn, list(handles[i:i + width]), bargs,
                                   None if per_partition is None else list(per_partition[i:i + width]),
                                   width, self.split_every, pure=False)
                for i in range(0, len(handles), width)]

    def map(self, fn: Callable, loaded: Loaded, *args, per_partition: Sequence | None = None) -> list:
        """``[fn(X_p, w_p, *args[, per_partition[p]]) for each partition]``, gathered in order."""

        def run(wait):
            parts = self._submit(fn, loaded, args, per_partition)
            if self.client is None:
                return parts
            wait(parts, [p.key for p in parts])
            return self.client.gather(parts)

        return self._pass(loaded, run)


def _reduce_tasks(n: int, split_every: int) -> int:
    """``add`` calls :func:`tree_reduce` makes over ``n`` items."""
    calls = 0
    while n > 1:
        calls += n // split_every + (n % split_every > 1)
        n = -(-n // split_every)
    return calls


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
