"""``emflow refit MODEL DATA``: continue a saved model of any family on data that grew.

The work is :mod:`emflow.estimators.refit`'s (as in the ``emflow-refit`` flow): the data's schema is
checked against the model (layout, features, dtype) before a cluster starts or anything is
written; EM starts from the saved parameters, with the same progress bar and per-iteration
line as ``emflow fit``; the model is saved atomically to ``--out`` (by default over MODEL,
which needs ``--overwrite``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from ..checks import check_int
from .main import (SchedulerOpt, WorkersOpt, Persist, _PERSIST, _check_workers, _errors, _iteration_progress,
                   _scheduler, app, out_console)

__all__ = ["refit"]

_HELP = (
    "Refit the saved MODEL (any family) on DATA that grew since it was fitted.\n\n"
    "EM starts from the saved parameters, incrementally from the statistics ledger beside "
    "the model: the partitions it does not hold are read first. DATA must have the layout, features and dtype the model was "
    "fitted on: otherwise nothing is written. The model is saved to --out, by default over "
    "MODEL (that needs --overwrite)."
)


@app.command(help=_HELP)
def refit(
    model: str = typer.Argument(..., help="A saved model of any family (`emflow fit`, a flow, or .save())."),
    data: str = typer.Argument(..., help="The grown Zarr dataset, in the layout the model was fitted on."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help="The statistics ledger (default: "
                                                                "beside the model saved, OUT.ledger; "
                                                                "MODEL.ledger is copied there first)."),
    max_iter: Optional[int] = typer.Option(None, "--max-iter", help="EM iterations at most (default: the "
                                                                    "model's own budget)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to save the refitted model "
                                                                 "(default: MODEL)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an emflow model already at --out "
                                                              "(or MODEL)."),
    persist: Persist = typer.Option(Persist.auto, help="Keep data in worker memory, stream them each "
                                                       "iteration, or decide."),
    scheduler: Optional[str] = SchedulerOpt,
    workers: Optional[int] = WorkersOpt,
):
    from ..estimators import refit as _refit

    target = out if out is not None else Path(model)
    with _errors(target):
        _check_workers(workers)
        if max_iter is not None:
            check_int("--max-iter", max_iter, 1)
        # before any work: --out may not be DATA, nor replace anything unasked
        target = _refit.check_out(model, data, out, overwrite=overwrite)
        est, _, state = _refit.prepare(model, data, ledger=ledger, out=target, max_iter=max_iter,
                                       persist=_PERSIST[persist.value])
        with _scheduler(scheduler, workers) as client:
            est.scheduler = client
            progress, cb = _iteration_progress(int(getattr(est, type(est).iter_param)))
            t0 = time.perf_counter()
            with progress:
                _refit.fit_prepared(est, data, state, [cb])
            elapsed = time.perf_counter() - t0
        est.scheduler = scheduler
        rep = _refit.report(est, state)
        path = est.save(target, overwrite=True)  # check_destination refused above what is not to replace
    _print_report(rep, title=Text(f"refitted in {elapsed:.1f}s -> {path}"))


def _print_report(rep: dict, title) -> None:
    from ..estimators.refit import report_rows

    t = Table(title=title)
    t.add_column("field")
    t.add_column("value")
    for k, v in report_rows(rep):
        t.add_row(Text(k), Text(v))
    out_console.print(t)
