"""Cluster access: where the engine runs.

``scheduler`` is understood everywhere (estimators, CLI, flows) the same way:

* ``None``: the active ``distributed`` client if there is one, else in-process threads;
* ``"threads"``: in-process threads even when a client is active;
* ``"local"``: start a ``LocalCluster`` (one single-threaded worker process per core) for
  the duration of the work, then stop it;
* ``"tcp://host:8786"`` (any address string): connect to that running scheduler, e.g. one
  started by dask-jobqueue, dask-kubernetes or ``dask scheduler`` (see deploy/);
* a ``distributed.Client``: use it as it is.

Connecting to a scheduler by address, or being given a Client, checks first that every
worker there imports the same emflow as this process (:func:`check_worker_versions`): a
worker without emflow, or with another version, is a :class:`ClusterError` naming it before
any work is sent. Workers that join later are checked before the next pass over the data.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from ..checks import is_int
from .engine import Engine
from ..errors import ClusterError, ConfigError

__all__ = ["engine_for", "local_cluster", "local_client", "check_worker_versions"]


NO_MAIN_GUARD = ("emflow started a local Dask cluster from a script without an `if __name__ == '__main__':` "
                 "guard; put your code under it")


def _is_main_guard(test) -> bool:
    """``__name__ == "__main__"`` (either way round) somewhere in an ``if`` test."""
    import ast

    for node in ast.walk(test):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
            sides = [node.left, node.comparators[0]]
            names = [n for n in sides if isinstance(n, ast.Name) and n.id == "__name__"]
            consts = [n for n in sides if isinstance(n, ast.Constant) and n.value == "__main__"]
            if names and consts:
                return True
    return False


def _unguarded_main_line() -> int | None:
    """The line of the script run as ``__main__`` that is starting a cluster from outside an
    ``if __name__ == "__main__":`` block, or None (guarded, interactive, or not a script).

    Worker processes are started by *spawn*: each imports the script again, so an unguarded
    script runs its top level (and this cluster) again in every worker, which multiprocessing
    reports as a "bootstrapping phase" RuntimeError, hundreds of lines of them.
    """
    import ast
    import sys

    main = sys.modules.get("__main__")
    source_file = getattr(main, "__file__", None)
    if main is None or not source_file:
        return None  # a REPL, a notebook, python -c: the workers do not import it
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return None  # not called from the script's top level (e.g. from a thread it started)
    line = frame.f_lineno
    try:
        with open(source_file, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_guard(node.test) and node.body:
            end = max(getattr(n, "end_lineno", n.lineno) for n in node.body)
            if node.body[0].lineno <= line <= end:
                return None
    return line


def _one_line_for(exc: BaseException, previous):
    """An excepthook that reports ``exc``, if the script lets it escape, as its one line (the
    line it names is the script's own); anything else goes to ``previous``."""
    import sys

    def hook(tp, value, tb):
        if value is exc:
            sys.stderr.write(f"{tp.__module__}.{tp.__qualname__}: {value}\n")
        else:
            previous(tp, value, tb)

    return hook


def _check_can_start_processes() -> None:
    """Refuse, in one line, to start worker processes where they would re-run the caller's script."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a spawned child importing the parent's script: the script has no main guard
        raise ClusterError(NO_MAIN_GUARD + ".")
    import dask

    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "fork":
        return  # forked workers do not import the script
    line = _unguarded_main_line()
    if line is not None:
        import sys

        exc = ClusterError(f"{NO_MAIN_GUARD} (line {line} of {sys.modules['__main__'].__file__}).")
        if sys.excepthook is sys.__excepthook__:
            sys.excepthook = _one_line_for(exc, sys.excepthook)
        raise exc


def local_cluster(n_workers: int | None = None, threads_per_worker: int = 1, **kwargs):
    """A ``LocalCluster`` of single-threaded worker processes (one per core by default).

    Raises :class:`~emflow.errors.ClusterError` when called from a script's top level outside
    an ``if __name__ == "__main__":`` block (its worker processes would run the script again).
    """
    from distributed import LocalCluster

    import logging

    if n_workers is not None and not (is_int(n_workers) and n_workers >= 1):
        raise ConfigError(f"n_workers must be an integer >= 1 or None (one per core), got {n_workers!r}.")
    n_workers = n_workers or os.cpu_count() or 1
    kwargs.setdefault("dashboard_address", ":0")
    kwargs.setdefault("processes", True)
    if kwargs["processes"]:
        _check_can_start_processes()
    level = kwargs.setdefault("silence_logs", logging.WARNING)
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs)
    # the scheduler lives in this process; keep its INFO chatter out of the caller's logs
    # (Prefect's root handler would otherwise print every client connection)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("distributed")]:
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).getEffectiveLevel()))
    return cluster


@contextlib.contextmanager
def local_client(n_workers: int | None = None, **kwargs) -> Iterator[Any]:
    """A ``distributed.Client`` of a :func:`local_cluster` started here; both closed on exit."""
    from distributed import Client

    cluster = local_cluster(n_workers, **kwargs)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _version_probe():
    """A function that reports the emflow a worker imports. Made inside a function so that
    cloudpickle sends it by value: a worker that cannot import emflow can still run it."""

    def emflow_version():
        try:
            import emflow
        except BaseException as exc:  # noqa: BLE001 - any failure to import is the answer
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"version": getattr(emflow, "__version__", None), "path": getattr(emflow, "__file__", None)}

    return emflow_version


def check_worker_versions(client, workers: list[str] | None = None, *, joined: bool = False) -> list[str]:
    """Check that the Dask workers of ``client`` (all, or those in ``workers``) import the
    same emflow version as this process. Returns the addresses checked.

    Raises :class:`ClusterError` naming every worker that cannot import emflow or has
    another version (distributed's own version check does not cover emflow: the workers
    unpickle emflow's functions and data loaders, so they need the same emflow as the
    client). ``joined``: the workers joined during a fit (the message says so).
    """
    from .. import __version__ as mine

    if workers is not None and not workers:
        return []
    try:
        found = client.run(_version_probe(), workers=workers, on_error="return")
    except Exception as exc:
        raise ClusterError(
            f"Could not ask the Dask workers at {_address(client)} which emflow they have "
            f"({type(exc).__name__}: {exc}). Check that the scheduler and its workers are running."
        ) from exc
    bad = []
    for addr, answer in sorted(found.items()):
        if isinstance(answer, BaseException):
            continue  # the worker left while we asked: nothing of ours runs there
        if "error" in answer:
            bad.append(f"{addr} cannot import emflow ({answer['error']})")
        elif answer["version"] != mine:
            bad.append(f"{addr} has emflow {answer['version']} ({answer['path']})")
    if bad:
        n_of = f"{len(bad)} of the {len(found)} Dask workers" if len(found) > 1 else "The Dask worker"
        tail = ("Checkpoints already written are intact: stop those workers, or restart them with emflow "
                f"{mine} installed, and run the same command again to resume." if joined else
                "Nothing was run. Install the same emflow in the workers' environment (the worker image, or "
                f"the environment `dask worker` runs in: `pip install emflow=={mine}`) and restart them.")
        raise ClusterError(
            f"{n_of} at {_address(client)}{' that joined the scheduler during the fit' if joined else ''} "
            f"cannot run this emflow {mine} (the client's): " + "; ".join(bad) + ". " + tail
        )
    return sorted(a for a, v in found.items() if not isinstance(v, BaseException))


def _address(client) -> str:
    try:
        return client.scheduler.address
    except AttributeError:
        return "the scheduler"


def _checked_engine(client, split_every: int) -> Engine:
    """An Engine on ``client`` whose workers were checked (and whose later ones will be)."""
    checked = check_worker_versions(client)
    engine = Engine(client, split_every=split_every)
    engine.worker_check = lambda new: check_worker_versions(client, new, joined=True)
    engine.checked_workers.update(checked)
    return engine


@contextlib.contextmanager
def engine_for(scheduler: Any = None, *, n_workers: int | None = None, split_every: int = 8,
               connect_timeout: float = 10.0) -> Iterator[Engine]:
    """Context manager yielding an :class:`Engine` for ``scheduler`` (see module doc)."""
    from distributed import Client

    if isinstance(scheduler, Client):
        yield _checked_engine(scheduler, split_every)
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
        yield _checked_engine(client, split_every)
    finally:
        client.close()
