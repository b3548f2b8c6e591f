"""Refit a saved model on data that grew since it was fitted: ``emflow-refit``, for every family.

    refit_flow("models/gmm.zarr", "train.zarr", overwrite=True)   # replace the model in place

Written once for every family in ``emflow.estimators.REGISTRY`` (the saved model names its
family); the work is :mod:`emflow.estimators.refit`'s, as for ``emflow refit``:

``check-schema -> refit-em -> save-model``

- **check-schema**: the model loads and the data are still what it was fitted on (layout,
  number of features, dtype); otherwise the run fails with a message saying what changed, and
  nothing is written (no model, no ledger, no lock file: the check comes first). The
  destination is checked too: a model already at ``out`` (``out`` defaults to ``model``
  itself) is replaced only with ``overwrite=True``; anything else there never is.
- **refit-em**: EM from the saved parameters on the grown data, incremental from the
  statistics ledger (``ledger``, else ``<out>.ledger`` beside the model saved, a copy of
  ``<model>.ledger`` when ``out`` is elsewhere): only the partitions the ledger does not
  hold are read first. A log line per iteration and the ``refit-progress`` /
  ``refit-log-likelihood`` artifacts.
- **save-model**: atomically (readers see the old model or the new one).

Artifacts: ``refit-summary`` (markdown: partitions new / changed / reused, passes, bytes
read, the objective before and after, the convergence plot), ``refit-report`` (the same
counts as a table), plus those above. "Before" is the saved model scored on the grown data
(the refit's first E-step, no extra pass); the saved model's own ``lower_bound_`` (on the
data it was fitted on) is shown beside it.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
import os
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from emflow.estimators import refit as _refit

from ._common import (
    IterationMonitor,
    PersistParam,
    SchedulerParam,
    compute,
    convergence_verdict,
    output_locked,
    publish_dashboard_link,
    resolve_scheduler,
    retry_if_transient,
    summary_markdown,
)

__all__ = ["refit_flow"]


@task(name="check-schema", cache_policy=NO_CACHE)
def check_schema(model: str, data: str, out: str, overwrite: bool) -> dict:
    """Refuse, before anything is written, a destination that would replace something unasked
    and data whose schema changed since the model was fitted."""
    _refit.check_out(model, data, out, overwrite=overwrite)
    est, opened, state = _refit.prepare(model, data)
    get_run_logger().info("model %s (%s, fitted on %s rows/sequences/documents); data %s: %d partitions, "
                          "%d features (%s)", model, type(est).__name__, state["previous_size"], data,
                          opened.n_partitions, opened.n_features, opened.dtype)
    return {"family": est.family, "class": type(est).__name__}


@task(name="refit-em", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def refit_em(model: str, data: str, out: str, ledger: str | None, max_iter: int | None, scheduler: str | None,
             persist: Any, progress_id=None):
    """EM from the saved parameters on the grown data; returns ``(estimator, report)``."""
    est, _, state = _refit.prepare(model, data, ledger=ledger, out=out, max_iter=max_iter, scheduler=scheduler,
                                   persist=persist)
    monitor = IterationMonitor(max_iter=int(getattr(est, type(est).iter_param)), progress_id=progress_id,
                               table_key="refit-log-likelihood", label=est.objective_name)
    _refit.fit_prepared(est, data, state, [monitor])
    monitor.progress(1.0)
    monitor.publish_table()
    return est, _refit.report(est, state)


@task(name="save-model", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def save(est, out: str) -> str:
    """Write the model atomically (``check-schema`` already refused a destination not to replace)."""
    path = est.save(out, overwrite=True)
    get_run_logger().info("saved model to %s", path)
    return path


@flow(name="emflow-refit", log_prints=True)
def refit_flow(
    model: Annotated[str, Field(description="the saved model to refit (a Zarr group, any family)")],
    data: Annotated[str, Field(description="the grown dataset (Zarr, the layout the model was fitted on)")],
    out: Annotated[str | None, Field(description="where to save the refitted model; None: over `model` "
                                                 "(needs overwrite)")] = None,
    overwrite: Annotated[bool, Field(description="replace an emflow model already at `out`")] = False,
    ledger: Annotated[str | None, Field(description="the statistics ledger; None: <out>.ledger (a copy of "
                                                    "<model>.ledger when out is elsewhere)")] = None,
    max_iter: Annotated[int | None, Field(ge=1, description="EM iterations at most; None: the model's "
                                                            "own budget")] = None,
    scheduler: SchedulerParam = None,
    persist: PersistParam = "auto",
) -> dict:
    """Refit a saved model on grown data, starting from its parameters; returns the refit's report
    (with ``path``, where the model was saved)."""
    out = os.fspath(out if out is not None else model)
    what = check_schema(model, data, out, overwrite)
    scheduler = resolve_scheduler(scheduler)
    with output_locked(out, "emflow-refit"), compute(scheduler) as (sched, dashboard):
        publish_dashboard_link(dashboard, scheduler)
        progress_id = create_progress_artifact(0.0, key="refit-progress", description="EM iterations done")
        est, rep = refit_em(model, data, out, ledger, max_iter, sched, persist, progress_id)
        est.scheduler = None
        path = save(est, out)
    rep = {**rep, "path": path, "model": os.fspath(model), "data": os.fspath(data)}
    rows = _refit.report_rows(rep)
    budget = type(est).iter_param
    verdict = convergence_verdict(est.converged_, est.n_iter_, est.history_, f"tol {getattr(est, 'tol', '?')}",
                                  f"raise max_iter ({budget}) or the tolerance")
    create_markdown_artifact(
        summary_markdown(f"Refit of {what['class']} ({what['family']}): `{model}` on `{data}` -> `{path}`",
                         verdict, rows, est.history_, ylabel=est.objective_name),
        key="refit-summary", description="Partitions new / changed / reused, passes, objective before and after")
    create_table_artifact([{"field": k, "value": v} for k, v in rows], key="refit-report",
                          description="What the refit read and how the objective moved")
    get_run_logger().info("refit: %s", "; ".join(f"{k}: {v}" for k, v in rows))
    return rep


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(refit_flow, module="flows.refit"))
