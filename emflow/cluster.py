"""Cluster access: where the engine runs.

``scheduler`` is understood everywhere (estimators, CLI, flows) the same way:

* ``None``: the active ``distributed`` client if there is one, else in-process threads;
* ``"threads"``: in-process threads even when a client is active;
* ``"local"``: start a ``LocalCluster`` (one single-threaded worker process per core) for
  the duration of the work, then stop it;
* ``"tcp://host:8786"`` (any address string): connect to that running scheduler, e.g. one
  started by dask-jobqueue, dask-kubernetes or ``dask scheduler`` (see deploy/);
* a ``distributed.Client``: use it as it is.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from .engine import Engine
from .errors import ClusterError, ConfigError

__all__ = ["engine_for", "local_cluster"]


def local_cluster(n_workers: int | None = None, threads_per_worker: int = 1, **kwargs):
    """A ``LocalCluster`` of single-threaded worker processes (one per core by default)."""
    from distributed import LocalCluster

    import logging

    n_workers = n_workers or os.cpu_count() or 1
    kwargs.setdefault("dashboard_address", ":0")
    kwargs.setdefault("processes", True)
    level = kwargs.setdefault("silence_logs", logging.WARNING)
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs)
    # the scheduler lives in this process; keep its INFO chatter out of the caller's logs
    # (Prefect's root handler would otherwise print every client connection)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("distributed")]:
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).getEffectiveLevel()))
    return cluster


@contextlib.contextmanager
def engine_for(scheduler: Any = None, *, n_workers: int | None = None, split_every: int = 8,
               connect_timeout: float = 10.0) -> Iterator[Engine]:
    """Context manager yielding an :class:`Engine` for ``scheduler`` (see module doc)."""
    from distributed import Client

    if isinstance(scheduler, Client):
        yield Engine(scheduler, split_every=split_every)
        return
    if scheduler is None:
        try:
            from distributed import default_client

            client = default_client()
        except ValueError:
            client = None
        engine = Engine(client, split_every=split_every, n_threads=n_workers)
        try:
            yield engine
        finally:
            engine.close()
        return
    if not isinstance(scheduler, str):
        raise ConfigError(
            f"scheduler must be None, 'threads', 'local', a scheduler address or a "
            f"distributed.Client; got {type(scheduler).__name__}."
        )
    if scheduler in ("threads", "sync", "synchronous"):
        engine = Engine(None, split_every=split_every, n_threads=1 if scheduler != "threads" else n_workers)
        try:
            yield engine
        finally:
            engine.close()
        return
    if scheduler == "local":
        cluster = local_cluster(n_workers)
        try:
            with Client(cluster) as client:
                yield Engine(client, split_every=split_every)
        finally:
            cluster.close()
        return
    try:
        client = Client(scheduler, timeout=connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"Could not reach the Dask scheduler at {scheduler!r} ({exc}). Check that it is "
            "running and reachable, or leave --scheduler out to start a local cluster."
        ) from exc
    try:
        yield Engine(client, split_every=split_every)
    finally:
        client.close()
