"""What the flows share: where the compute is, dashboard artifacts, the convergence plot.

The monitoring here knows nothing of any model family: an EM fit of any family reports
an objective per iteration (a mean log-likelihood, or LDA's bound per word), and
:class:`IterationMonitor`, :func:`convergence_png`, :func:`summary_markdown` and
:func:`publish_dashboard_link` turn that into log lines and dashboard artifacts.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import os
import statistics
import time
import warnings
from typing import Annotated, Any, Callable, Iterator, Literal, Sequence

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.logging.handlers import APILogHandler
from pydantic import Field

from emflow.errors import ClusterError, EmflowError

# The run-form fields every fit flow shares (Prefect builds the form from these annotations).
SchedulerParam = Annotated[str | None, Field(
    description="None: $EMFLOW_DASK_SCHEDULER or the Prefect variable emflow_dask_scheduler, else "
                "threads; 'local': a LocalCluster for this run; or a scheduler address")]
RestartsParam = Annotated[int, Field(ge=1, description="restarts (n_init); the best final objective is kept")]
PersistParam = bool | Literal["auto"]

SCHEDULER_ENV = "EMFLOW_DASK_SCHEDULER"


class _RunLog(APILogHandler):
    """The library's own warnings (``emflow`` logger: all workers lost, a stalled pass) into
    the log of the flow or task run they happen in; outside a run, nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            super().emit(record)


if not any(isinstance(h, _RunLog) for h in logging.getLogger("emflow").handlers):
    logging.getLogger("emflow").addHandler(_RunLog())
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


def check_same_data(data: Any, fitted: str | None, validated: str, ckpt_path: str) -> None:
    """Stop a flow whose data changed between its validate task and the fit: the fit's own
    fingerprint differs from the validated one, so its checkpoints (labelled with the validated
    fingerprint) describe a fit of other data. They are removed and the run fails with a
    DataError; a rerun validates the data as they are now and starts afresh."""
    if fitted == validated:
        return
    from emflow.errors import DataError

    with contextlib.suppress(OSError):
        os.unlink(ckpt_path)
    raise DataError(
        f"The data at {data!r} changed while the flow ran (fingerprint {fitted}, validated {validated}): "
        "the fit read other data than the validate task checked, so no model is saved and its checkpoint "
        f"({ckpt_path}) was removed. Run the flow again once the data stop changing."
    )


@contextlib.contextmanager
def compute(scheduler: str | None) -> Iterator[tuple[str | None, str | None]]:
    """Yields ``(scheduler argument for the library, Dask dashboard link or None)``.

    ``"local"`` starts one LocalCluster for the whole flow run (not one per library call)
    and hands its address to the tasks; it is closed when the flow ends.
    """
    scheduler = resolve_scheduler(scheduler)
    if scheduler == "local":
        from emflow.execution.cluster import local_cluster

        cluster = local_cluster(silence_logs=40)
        try:
            yield cluster.scheduler_address, cluster.dashboard_link
        finally:
            cluster.close()
        return
    if scheduler is None or scheduler in ("threads", "sync", "synchronous"):
        yield scheduler, None
        return
    from emflow.execution.cluster import engine_for

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


def publish_dashboard_link(dashboard: str | None, scheduler: str | None = None) -> None:
    """The ``dask-dashboard`` link artifact (and a log line), when a Dask cluster runs the fit.

    The link is live only while that cluster runs: a ``scheduler="local"`` cluster is closed
    when the run ends (the artifact says so; see :func:`dask_performance_report` for what
    stays afterwards)."""
    if dashboard:
        lifetime = ("the LocalCluster started for this run, closed when the run ends: the link works only "
                    "while the run lasts" if scheduler == "local" else
                    "an existing Dask cluster: the link works while that cluster runs")
        create_link_artifact(dashboard, link_text="Dask dashboard (live only while the cluster runs)",
                             key="dask-dashboard",
                             description=f"Dask dashboard of {lifetime}. After the run, see the "
                                         "`dask-performance-report` artifact.")
        get_run_logger().info("Dask dashboard: %s (live only while the cluster runs)", dashboard)


def report_path(out: str) -> str:
    """Where a fit writing ``out`` saves its Dask performance report: ``OUT.dask-report.html``."""
    s = os.fspath(out).rstrip("/")
    return (s if "://" in s else os.path.abspath(s)) + ".dask-report.html"


@contextlib.contextmanager
def dask_performance_report(address: str | None, dashboard: str | None, out: str) -> Iterator[None]:
    """With a Dask cluster, record a ``distributed.performance_report`` of the block into
    ``OUT.dask-report.html`` (beside the model) and publish the ``dask-performance-report``
    markdown artifact saying where it is and that the live dashboard link works only while
    the cluster runs. Without a cluster (threads), does nothing.

    The report needs bokeh where the scheduler runs; without it (or when the report cannot
    be written) the artifact says so and the run goes on: a report never fails a fit.
    """
    if not dashboard or not address:
        yield
        return
    logger = get_run_logger()
    path = report_path(out)
    client = report = None
    problem = None
    try:
        import bokeh  # noqa: F401  the scheduler renders the report with it
        from distributed import Client, performance_report

        client = Client(address, set_as_default=False, timeout="20s")
        report = performance_report(filename=path)
        with client.as_current():
            report.__enter__()
    except Exception as exc:  # no bokeh, or the cluster refuses: no report, the fit goes on
        problem = exc
        report = None
    try:
        yield
    finally:
        if report is not None:
            try:
                with client.as_current():
                    report.__exit__(None, None, None)
            except Exception as exc:
                problem = exc
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        written = problem is None and ("://" in path or os.path.exists(path))
        lines = ["# Dask performance report", ""]
        if written:
            lines.append(f"Saved beside the model: `{path}` (HTML: task stream, worker profile, bandwidth; open it "
                         "in a browser).")
            logger.info("Dask performance report: %s", path)
        else:
            why = ("bokeh is not installed (`pip install bokeh`)" if isinstance(problem, ImportError)
                   else f"{type(problem).__name__}: {problem}")
            lines.append(f"Not saved: {why}.")
            logger.warning("no Dask performance report for this run: %s", why)
        lines += ["", f"The live Dask dashboard ({dashboard}) works only while its cluster runs; a "
                      "`scheduler=\"local\"` cluster is closed when the run ends, so the `dask-dashboard` link "
                      "is dead afterwards" + (": this report is what stays." if written else ".")]
        with contextlib.suppress(Exception):
            create_markdown_artifact("\n".join(lines), key="dask-performance-report",
                                     description="Where the Dask performance report of this run is")


@contextlib.contextmanager
def output_locked(out: str, what: str) -> Iterator[Any]:
    """Hold :func:`emflow.storage.locking.output_lock` on ``out`` (with this flow run's id) for the block.

    A stale lock taken over is also reported in the run log; a live holder fails the run at
    once with :class:`emflow.storage.locking.LockHeldError` naming it."""
    from emflow.storage.locking import StaleLockWarning, output_lock

    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
    except Exception:
        run_id = None
    with contextlib.ExitStack() as stack:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StaleLockWarning)
            lock = stack.enter_context(output_lock(out, run_id=run_id, what=what))
        for w in caught:
            if issubclass(w.category, StaleLockWarning):
                get_run_logger().warning("%s", w.message)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        yield lock


def load_checkpoint_logged(ckpt_path: str, fingerprint: str, chash: str, *, tol: float, max_iter: int,
                           stop_rule=None):
    """:func:`emflow.storage.checkpoint.load_resumable`, with its warnings also sent to the run log
    (visible in the dashboard)."""
    from emflow.storage.checkpoint import CheckpointWarning, load_resumable

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        ck = load_resumable(ckpt_path, fingerprint=fingerprint, config_hash=chash, tol=tol, max_iter=max_iter,
                            stop_rule=stop_rule)
    for w in caught:
        if issubclass(w.category, CheckpointWarning):
            get_run_logger().warning("%s", w.message)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ck


class IterationMonitor:
    """EM callback: a log line per iteration, the progress artifact, the objective table.

    Works for any family: ``label`` names the objective in the log line ("mean
    log-likelihood", "bound per word"), ``column`` is its key in the table, and
    ``extra_columns(value) -> dict`` adds columns derived from it (LDA's perplexity).

    The table artifact is republished (a new version under the same key) at most every
    ``table_every_s`` seconds and at the end, so a long fit shows it growing without
    flooding the API.
    """

    def __init__(self, *, max_iter: int, progress_id=None, table_key: str = "fit-log-likelihood",
                 history=(), seconds=(), init: int = 0, n_init: int = 1, table_every_s: float = 5.0,
                 label: str = "mean log-likelihood", column: str = "log_likelihood",
                 extra_columns: Callable[[float], dict] | None = None, description: str | None = None):
        self.logger = get_run_logger()
        self.max_iter, self.progress_id, self.table_key = max_iter, progress_id, table_key
        self.init, self.n_init, self.table_every_s = init, n_init, table_every_s
        self.label, self.column, self.extra_columns = label, column, extra_columns
        self.description = description or f"{label[0].upper()}{label[1:]} per EM iteration and its change."
        self.rows: list[dict[str, Any]] = []
        prev = -math.inf
        seconds = list(seconds)
        for i, ll in enumerate(history):
            self.rows.append(self._row(i + 1, ll, ll - prev, seconds[i] if i < len(seconds) else math.nan))
            prev = ll
        self._last_table = time.monotonic()
        self._published = 0  # rows in the last published version

    def _row(self, iteration, value, change, seconds) -> dict[str, Any]:
        row = _row(iteration, value, change, seconds, self.init)
        if self.column != "log_likelihood":
            row = {(self.column if k == "log_likelihood" else k): v for k, v in row.items()}
        if self.extra_columns is not None:
            row.update(self.extra_columns(float(value)))
        return row

    def __call__(self, event) -> None:
        self.rows.append(self._row(event.iteration, event.log_likelihood, event.change, event.seconds))
        restart = f"restart {self.init + 1}/{self.n_init} " if self.n_init > 1 else ""
        self.logger.info(
            "%siteration %d: %s %.10g, change %.3g, %.3f s%s", restart, event.iteration, self.label,
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
        """Publish the table as a new version of its artifact, unless nothing changed since."""
        if self.rows and len(self.rows) != self._published:
            create_table_artifact(self.rows, key=self.table_key, description=self.description)
            self._last_table = time.monotonic()
            self._published = len(self.rows)


def _row(iteration, ll, change, seconds, init) -> dict[str, Any]:
    def num(x):
        return None if x is None or not math.isfinite(x) else float(x)

    return {"restart": init, "iteration": int(iteration), "log_likelihood": float(ll),
            "change": num(change), "seconds": num(seconds)}


def convergence_png(history: list[float], title: str = "", ylabel: str = "mean log-likelihood") -> bytes | None:
    """A PNG of the objective per iteration (and |change| on a log scale), or None when
    matplotlib is not installed."""
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
    ax1.set_ylabel(ylabel)
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


def convergence_verdict(converged: bool, n_iter: int, history: Sequence[float], tol_text: str,
                        remedy: str = "raise max_iter or tol") -> str:
    """The summary's first line: converged or not, in how many iterations, the last change."""
    last_change = history[-1] - history[-2] if len(history) > 1 else math.inf
    if converged:
        return f"**Converged** in {n_iter} iterations (last change {last_change:.3g}; {tol_text})"
    return (f"**Did not converge** in {n_iter} iterations (last change {last_change:.3g}; {tol_text}); "
            f"{remedy}")


def seconds_row(seconds: Sequence[float]) -> list[tuple[str, str]]:
    secs = [s for s in seconds if s == s]
    if not secs:
        return []
    return [("time per iteration", f"mean {statistics.fmean(secs):.3f} s, median {statistics.median(secs):.3f} s, "
                                   f"total {sum(secs):.2f} s")]


def summary_markdown(title: str, verdict: str, facts: Sequence[tuple[str, str]], history: Sequence[float], *,
                     sections: Sequence[tuple[str, Sequence[str]]] = (), ylabel: str = "mean log-likelihood") -> str:
    """A fit summary for any family: title, verdict, a two-column table of facts, extra
    sections (heading, markdown lines), and the convergence plot embedded as a data URI."""
    lines = [f"# {title}", "", verdict, "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts]
    for heading, body in sections:
        lines += ["", f"## {heading}", "", *body]
    png = convergence_png(list(history), "convergence", ylabel)
    lines += ["", "## Convergence", ""]
    lines.append(f"![convergence plot]({png_data_uri(png)})" if png else
                 "(install matplotlib to see the convergence plot; the table artifact has the values)")
    return "\n".join(lines)
