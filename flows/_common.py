"""What the flows share: where the compute is, dashboard artifacts, the convergence plot."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import time
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact, update_progress_artifact

from emflow.errors import ClusterError, EmflowError

SCHEDULER_ENV = "EMFLOW_DASK_SCHEDULER"
SCHEDULER_VARIABLE = "emflow_dask_scheduler"


def resolve_scheduler(scheduler: str | None) -> str | None:
    """The scheduler a flow uses: the argument, else ``$EMFLOW_DASK_SCHEDULER``, else the
    Prefect variable ``emflow_dask_scheduler``, else None (threads in the flow's process).

    So pointing scheduled runs at a cluster is configuration, not a code change:
    ``prefect variable set emflow_dask_scheduler tcp://scheduler:8786``.
    """
    if scheduler:
        return scheduler
    env = os.environ.get(SCHEDULER_ENV)
    if env:
        return env
    try:
        from prefect.variables import Variable

        value = Variable.get(SCHEDULER_VARIABLE, default=None)
    except Exception:  # no API reachable: fall back to local threads
        value = None
    return str(value) if value else None


@contextlib.contextmanager
def compute(scheduler: str | None) -> Iterator[tuple[str | None, str | None]]:
    """Yields ``(scheduler argument for the library, Dask dashboard link or None)``.

    ``"local"`` starts one LocalCluster for the whole flow run (not one per library call)
    and hands its address to the tasks; it is closed when the flow ends.
    """
    scheduler = resolve_scheduler(scheduler)
    if scheduler == "local":
        from emflow.cluster import local_cluster

        cluster = local_cluster(silence_logs=40)
        try:
            yield cluster.scheduler_address, cluster.dashboard_link
        finally:
            cluster.close()
        return
    if scheduler is None or scheduler in ("threads", "sync", "synchronous"):
        yield scheduler, None
        return
    from emflow.cluster import engine_for

    with engine_for(scheduler) as engine:
        link = engine.dashboard_link
    yield scheduler, link


def retry_if_transient(task, task_run, state) -> bool:
    """Retry condition: retry lost clusters and I/O errors, never a user error (bad data or settings)."""
    try:
        state.result()
    except ClusterError:
        return True
    except EmflowError:
        return False
    except (ValueError, TypeError):
        return False
    except BaseException:
        return True
    return True


class IterationMonitor:
    """EM callback: a log line per iteration, the progress artifact, the log-likelihood table.

    The table artifact is republished (a new version under the same key) at most every
    ``table_every_s`` seconds and at the end, so a long fit shows it growing without
    flooding the API.
    """

    def __init__(self, *, max_iter: int, progress_id=None, table_key: str = "fit-log-likelihood",
                 history=(), seconds=(), init: int = 0, n_init: int = 1, table_every_s: float = 5.0):
        self.logger = get_run_logger()
        self.max_iter, self.progress_id, self.table_key = max_iter, progress_id, table_key
        self.init, self.n_init, self.table_every_s = init, n_init, table_every_s
        self.rows: list[dict[str, Any]] = []
        prev = -math.inf
        seconds = list(seconds)
        for i, ll in enumerate(history):
            self.rows.append(_row(i + 1, ll, ll - prev, seconds[i] if i < len(seconds) else math.nan, init))
            prev = ll
        self._last_table = time.monotonic()

    def __call__(self, event) -> None:
        self.rows.append(_row(event.iteration, event.log_likelihood, event.change, event.seconds, self.init))
        restart = f"restart {self.init + 1}/{self.n_init} " if self.n_init > 1 else ""
        self.logger.info(
            "%siteration %d: mean log-likelihood %.10g, change %.3g, %.3f s%s", restart, event.iteration,
            event.log_likelihood, event.change, event.seconds, " (converged)" if event.converged else "",
        )
        done = 1.0 if event.converged else event.iteration / self.max_iter
        self.progress((self.init + done) / self.n_init)
        if event.converged or time.monotonic() - self._last_table >= self.table_every_s:
            self.publish_table()

    def progress(self, fraction: float) -> None:
        if self.progress_id is not None:
            update_progress_artifact(self.progress_id, round(100.0 * min(1.0, fraction), 2))

    def publish_table(self) -> None:
        if self.rows:
            create_table_artifact(self.rows, key=self.table_key,
                                  description="Mean log-likelihood per EM iteration and its change.")
            self._last_table = time.monotonic()


def _row(iteration, ll, change, seconds, init) -> dict[str, Any]:
    def num(x):
        return None if x is None or not math.isfinite(x) else float(x)

    return {"restart": init, "iteration": int(iteration), "log_likelihood": float(ll),
            "change": num(change), "seconds": num(seconds)}


def convergence_png(history: list[float], title: str = "") -> bytes | None:
    """A PNG of the mean log-likelihood per iteration (and |change| on a log scale), or None
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    h = np.asarray(history, dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    it = np.arange(1, len(h) + 1)
    ax1.plot(it, h, marker="o", ms=3)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("mean log-likelihood")
    if len(h) > 1:
        ch = np.abs(np.diff(h))
        ch[ch == 0] = np.nan
        ax2.semilogy(it[1:], ch, marker="o", ms=3, color="tab:orange")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("|change|")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
