"""The engine: the one place that owns execution.

It maps a function over the partitions of a dataset and tree-reduces the results with
:func:`emflow.stats.add`. Two backends share every line that decides *what* is computed:

* a Dask distributed ``Client``: each partition's task reads its own data on a worker
  (or uses the copy kept resident in worker memory), and the statistics are combined by
  a tree of ``add`` tasks with fan-in ``split_every`` (its last node on the client when
  the statistics are small; how a pass keeps its fixed cost low: :mod:`.submit`);
* in-process threads (no cluster), for in-memory work and small data.

Both reduce in the same fixed tree, so the answer does not depend on the backend or the
number of workers. What runs inside the tasks and the tree's shape are in
:mod:`emflow.execution.tasks`; watching the cluster during a pass (lost scheduler, lost
workers, stalls) is in :mod:`emflow.execution.watch`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from ..storage import data as _data
from ..storage import fingerprint as _fp
from ..errors import ClusterError, ConfigError
from ..stats import add
from .tasks import _apply, _apply_indexed, _batch_width, _element_starts, _reduce_tasks, _scan_batch, tree_reduce
from .watch import ClusterWatch, _cancelled, _comm_failed, _warn
from . import submit as _dask
from . import sweeps as _sweeps

__all__ = ["Engine", "Loaded", "sample_rows", "take_rows"]

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

# passes remembered for the usual duration of a pass
PASS_HISTORY = 20


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
    # seconds taken by the latest passes over these data (the opening scan first)
    pass_seconds: list = field(default_factory=list, repr=False)
    # the same per function run over the data (``"scan"``: the opening scan): the usual
    # time of a pass of a function is that of its own previous passes
    pass_history: dict = field(default_factory=dict, repr=False)
    # partitions read so far (the opening scan and every pass): n_passes_ = reads / partitions
    partition_reads: int = field(default=0, repr=False)
    # per partition: the scan's digests (rows, h1, h2, check) and stored bytes; bytes read so far
    partition_digests: list = field(default_factory=list, repr=False)
    partition_nbytes: list = field(default_factory=list, repr=False)
    bytes_read: int = field(default=0, repr=False)

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


class Engine(ClusterWatch):
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
        # every partition read by this engine (scans and passes, repeated attempts included)
        self.partition_reads = 0
        # bytes of the latest statistics of each map_reduce function (where to add the last node)
        self._stats_bytes: dict[str, int] = {}

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

    def _one_blas_thread(self):
        """With several task threads, BLAS runs single-threaded inside them (as Dask's
        nanny arranges for worker processes): threads x BLAS threads would oversubscribe
        the cores and run many times slower."""
        if self.n_threads <= 1:
            return contextlib.nullcontext()
        return _dask.blas_controller().limit(limits=1, user_api="blas")

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
             persist: Persist = "auto", partition_bytes: int = _data.DEFAULT_PARTITION_BYTES,
             allow_nan: bool = False) -> Loaded:
        """Open and validate a dataset, scan it once (fingerprint, finiteness), keep it resident if it fits
        (``allow_nan``: NaN marks a missing value, see :func:`emflow.storage.data.open_rows`)."""
        rows = _data.open_rows(
            data, sample_weight, partition_bytes=partition_bytes,
            min_partitions=2 * self.total_threads, min_rows=min_rows, allow_nan=allow_nan,
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
        # fingerprint; errors come back as values (emflow.storage.fingerprint.scan_partition)
        starts = _element_starts(rows)
        checks = [getattr(ld, "checks", None) for ld in rows.loaders]
        if self.client is None:
            if resident and not rows.in_memory:
                handles = list(self._threads().map(_fp.read_quiet, rows.loaders))
            elif rows.in_memory:
                handles = [_fp.read_quiet(ld) for ld in rows.loaders]  # arrays are views
            else:
                handles = list(rows.loaders)
            scans = list(self._threads().map(lambda a: _fp.scan_partition(a[0], a[1], rows.weighted, a[2]),
                                             zip(handles, checks, starts)))
        else:
            t0 = time.monotonic()
            try:
                self._await_workers("before loading data", healthy=True)
                self._check_new_workers()
                if rows.in_memory:
                    # the client holds the values: ship them once (not inside task specs,
                    # which the scheduler would keep a copy of)
                    handles = self.client.scatter([_fp.read_quiet(ld) for ld in rows.loaders], hash=False)

                    def rescatter(idx: list[int]) -> None:
                        new = self.client.scatter([rows.loaders[i]() for i in idx], hash=False)
                        for i, f in zip(idx, new):
                            handles[i] = f  # in place: release() sees the new futures
                elif resident:
                    # a task per partition: if a worker dies, the scheduler recomputes its
                    # partitions from the loaders on another worker
                    handles = self.client.map(_fp.read_quiet, rows.loaders, pure=False)
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
            fingerprint, weight_sum = _fp.finish_scan(rows, scans)
        except Exception:
            if release is not None:
                release()
            raise
        if not resident:  # streamed: every later read is checked against the scan's digest
            handles = _fp.checked_handles(rows.loaders, scans, rows.weighted, starts)
        loaded = Loaded(rows, handles, resident, fingerprint, weight_sum, release, rescatter)
        loaded.partition_digests = [(s.rows, s.h1, s.h2, s.check) for s in scans]
        total = max(1, sum(s.rows for s in scans))
        loaded.partition_nbytes = [int(rows.nbytes) * s.rows // total for s in scans]
        self._count_reads(loaded)  # the scan
        if self.client is not None:
            loaded.pass_seconds.append(scan_seconds)
            loaded.pass_history["scan"] = [scan_seconds]
        return loaded

    # -- passes over the data -------------------------------------------------------
    def _count_reads(self, loaded: Loaded) -> None:
        n = len(loaded.handles)
        loaded.partition_reads += n
        loaded.bytes_read += sum(loaded.partition_nbytes[:n])
        self.partition_reads += n

    def _broadcast(self, args: tuple):
        """``args`` as the tasks take them: one copy sent to every worker first (a future).
        Not inside each task: arrays unpickled from a task's message lie at any alignment,
        and BLAS and the compiled kernels then round differently (1 ulp), so two passes over
        the same data would not give the same bits; on resident data the broadcast copy is
        also what lets the scheduler place tasks on a worker that joined with no partition."""
        if self.client is None or not args:
            return args
        try:
            [fut] = self.client.scatter([args], broadcast=True, hash=False)
        except Exception as exc:
            self._raise_if_lost(exc, "while sending parameters")
            raise
        return fut

    def _submit(self, fn: Callable, loaded: Loaded, args: tuple, per_partition: Sequence | None, width: int = 1):
        """Results (in-process) or futures (Dask) of fn over every partition, in order (on
        Dask, ``width`` consecutive partitions per task, reduced inside it)."""
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
        return _dask.submit_map(self.client, fn, handles, bargs, per_partition, width, self.split_every)

    def _pass(self, loaded: Loaded, run: Callable[[Callable], Any], name: str = "") -> Any:
        """``run(wait)`` (one pass of the function ``name`` over the data; ``wait(futures,
        keys, probes)`` waits for its futures while watching the cluster: the usual time of
        the pass is the median of the function's previous passes, or for its first pass is
        estimated from the first of ``probes`` (map futures) to finish). Faults the cluster
        recovers from repeat the pass (a few times at most):

        * a worker died holding scattered in-memory partitions: send them again;
        * every worker was lost, the scheduler still up: wait (bounded) for workers to
          join, send lost partitions again, repeat the pass.

        A lost scheduler is a ClusterError naming it.
        """
        for attempt in range(MAX_RESCATTERS + 1):
            t0 = time.monotonic()
            if self.client is not None:
                waited = self._await_workers("before a pass over the data" if attempt == 0 else
                                             "during a pass over the data", healthy=attempt == 0)
                self._check_new_workers(latest=not waited)
                t0 = time.monotonic()
            past = loaded.pass_history.setdefault(name, [])
            usual = statistics.median(past) if past else None

            def wait(futures: list, keys: list, probes) -> None:
                if usual is not None:
                    probes.futures.clear()  # not needed: let the workers free their statistics
                self._wait(futures, keys, t0, usual, probes)

            self._count_reads(loaded)
            try:
                with _dask.prompt_client(self.client):
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
            loaded.pass_seconds.append(past[-1])
            del loaded.pass_seconds[:-PASS_HISTORY]
            return out

    def _linked(self, fn: Callable, loaded: Loaded, args: tuple, per_partition: Sequence | None):
        """``(fn, per_partition, sweep keys)``, with the boundary messages of sequences cut
        across partitions added (:mod:`emflow.execution.sweeps`) when ``fn`` declares sweeps."""
        links, keys = _sweeps.links(self, fn, loaded, args)
        if links is None:
            return fn, per_partition, []
        extras = [None] * len(links) if per_partition is None else list(per_partition)
        return _sweeps.Linked(fn, per_partition is not None), list(zip(extras, links)), keys

    def map_reduce(self, fn: Callable, loaded: Loaded, *args, per_partition: Sequence | None = None) -> Any:
        """``add`` over partitions of ``fn(X_p, w_p, *args[, per_partition[p]])``, reduced in a tree."""
        t0 = time.perf_counter()

        width, levels = self._batch(len(loaded.handles))
        fn0, per0 = fn, per_partition

        def run(wait):
            fn, per_partition, sweep_keys = self._linked(fn0, loaded, args, per0)
            parts = self._submit(fn, loaded, args, per_partition, width)
            if self.client is None:
                return tree_reduce(parts, add, self.split_every, lambda f, *a: f(*a))
            keys = sweep_keys + [p.key for p in parts]
            probes = _dask.probes(parts, self._threads_seen())
            # small statistics (as this function's were last time): the tree's last node on the client
            small = self._stats_bytes.get(name, np.inf) <= _dask.CLIENT_COMBINE_BYTES

            def submit(f, *a):
                # before the map tasks still queued: a partial sum frees its inputs, so the
                # workers hold a few statistics bundles at a time, not one per map task
                fut = self.client.submit(f, *a, pure=False, priority=1)
                keys.append(fut.key)
                return fut

            top, depth = tree_reduce(parts, add, self.split_every, submit, until=self.split_every if small else 1)
            # hold only the top: a map task's statistics are freed on the worker once its
            # partial sum is done, not at the end of the pass (P bundles held at once)
            del parts
            top = top if small else [top]
            wait(top, keys, probes)
            got = self.client.gather(top)
            if len(got) > 1:  # the root of the same tree, added here
                return add(*got), depth + 1 + levels, len(keys) + 1
            return got[0], depth + levels, len(keys)

        name = _dask.name(fn)
        out = self._pass(loaded, run, name)
        if self.client is None:
            (total, depth), tasks = out, len(loaded.handles) + _reduce_tasks(len(loaded.handles), self.split_every)
        else:
            total, depth, tasks = out
            self._stats_bytes[name] = _dask.nbytes(total)
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

    def map(self, fn: Callable, loaded: Loaded, *args, per_partition: Sequence | None = None) -> list:
        """``[fn(X_p, w_p, *args[, per_partition[p]]) for each partition]``, gathered in order."""
        fn0, per0 = fn, per_partition

        def run(wait):
            fn, per_partition, sweep_keys = self._linked(fn0, loaded, args, per0)
            parts = self._submit(fn, loaded, args, per_partition)
            if self.client is None:
                return parts
            wait(parts, sweep_keys + [p.key for p in parts], _dask.probes(parts, self._threads_seen()))
            return self.client.gather(parts)

        return self._pass(loaded, run, "map " + _dask.name(fn0))


@_sweeps.step_local
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
