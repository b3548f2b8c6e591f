"""What became of the cluster during a pass: a lost scheduler, lost workers, a stalled pass.

:class:`ClusterWatch` is the part of :class:`~emflow.execution.engine.Engine` that asks the
scheduler about its workers (each question answered within ``PROBE_TIMEOUT`` or taken as no
answer), waits for workers to join when all were lost, and reports a pass that takes far
longer than usual, naming the workers that hold its unfinished tasks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
import warnings
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ClusterError, ClusterWarning, ConfigError

if TYPE_CHECKING:
    from .engine import Loaded

__all__ = ["ClusterWatch", "WORKER_WAIT_TIMEOUT", "STALL_FACTOR", "STALL_FLOOR"]

# the engine's logger: a Prefect flow's run log, a log file or a console handler picks it up
logger = logging.getLogger("emflow.execution.engine")

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


@dataclass
class Probes:
    """A pass's first map futures (one per thread at most) and its number of map tasks."""

    futures: list
    tasks: int


class ClusterWatch:
    """The engine's view of its cluster (a mixin of :class:`~emflow.execution.engine.Engine`).

    Uses the engine's ``client``, ``address``, ``worker_check``, ``checked_workers``,
    ``_workers_seen`` and the settings given to its constructor (``_worker_wait_timeout``,
    ``_stall_factor``, ``_stall_floor``).
    """

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
        workers = self._latest_workers = self._workers()
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
            workers = self._latest_workers = self._workers()
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

    def _check_new_workers(self, latest: bool = False) -> None:
        """Workers that joined since the last look go through ``worker_check`` (once each);
        ``latest``: the workers :meth:`_await_workers` has just seen (no second question)."""
        if self.worker_check is None:
            return
        workers = getattr(self, "_latest_workers", None) if latest else None
        new = sorted(set((workers if workers is not None else self._workers()) or ()) - self.checked_workers)
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

    def _threads_seen(self) -> int:
        """Threads of the workers :meth:`_await_workers` saw last (no question asked)."""
        return max(1, sum((getattr(self, "_latest_workers", None) or {}).values()))

    def _wait(self, futures: list, keys: list, started: float, usual: float | None,
              probes: Probes | None = None) -> None:
        """Wait until ``futures`` are done (or erred or cancelled), watching the cluster:
        all workers lost -> :meth:`_await_workers`; a pass far slower than ``usual`` ->
        one stall warning. Without ``usual`` (the first pass of its function), the usual
        time is estimated once the first of ``probes`` is done: its time x the map tasks
        per probe. Results are not fetched here."""
        from distributed import wait

        stall_after = None if usual is None else max(self.stall_factor * usual, self.stall_floor)
        basis = "median of the previous passes"
        warned = False
        while True:
            pending = probes.futures if probes is not None else []
            try:
                with self.client.as_current():
                    if pending:  # the first pass of its function: wake up when a probe is done
                        wait(futures + pending, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
                    else:
                        wait(futures, timeout=POLL_SECONDS)
                if not pending or all(f.done() for f in futures):
                    return
            except TimeoutError:
                pass
            except Exception:
                return  # cancelled futures: their result() raises what the caller reports
            if pending and any(f.done() for f in pending):
                usual = (time.monotonic() - started) * -(-probes.tasks // len(pending))
                stall_after = max(self.stall_factor * usual, self.stall_floor)
                basis = "estimated from its first finished task"
                pending.clear()  # let the workers free their statistics
                continue
            if not self._connected():
                return  # the futures are cancelled now; the caller reports the lost scheduler
            if self._await_workers("during a pass over the data"):
                started = time.monotonic()  # the time waiting for workers is accounted for
                continue
            elapsed = time.monotonic() - started
            if not warned and stall_after is not None and elapsed > stall_after:
                warned = True
                _warn(self._stall_message(keys, elapsed, usual, basis))

    def _stall_message(self, keys: list, elapsed: float, usual: float,
                       basis: str = "median of the previous passes") -> str:
        head = f"A pass over the data has taken {_secs(elapsed)} so far, against a usual {_secs(usual)} ({basis}). "
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
