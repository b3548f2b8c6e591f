"""``emflow score``: a saved model of any family on a dataset: its score (and BIC, AIC), and
with ``--out-dir`` every output the family declares (``outputs``), one Zarr store each."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from .main import SchedulerOpt, WorkersOpt, _check_workers, _errors, _scheduler, app, console, out_console

__all__ = ["score"]


@app.command()
def score(
    model: str = typer.Argument(..., help="A saved model of any family (`emflow fit`, a flow, or .save())."),
    data: str = typer.Argument(..., help="Zarr dataset in the model's layout (rows, sequences or corpus)."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", "-o", help="Also write outputs here, one Zarr store each (OUTPUT.zarr)."),
    what: Optional[List[str]] = typer.Option(
        None, "--what", help="An output to write (repeat it; 'all': every one the family declares). "
                             "Default: the family's default outputs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace emflow outputs already in --out-dir."),
    scheduler: Optional[str] = SchedulerOpt,
    workers: Optional[int] = WorkersOpt,
):
    """Score a saved model on DATA (its `score`, BIC and AIC); with --out-dir, write its outputs."""
    from .. import load
    from ..estimators.outputs import check_outputs, outputs_of, write_output
    from ..storage.destinations import check_destination

    with _errors(out_dir):
        _check_workers(workers)
        est = load(model)
        kinds = []
        if out_dir is not None:
            wanted = list(outputs_of(est)[0]) if what and "all" in what else what
            kinds = check_outputs(est, wanted, where=repr(model))
            for kind in kinds:  # before any work: nothing is replaced unasked
                check_destination(out_dir / f"{kind}.zarr", "output", overwrite=overwrite,
                                  inputs=[("MODEL", model), ("DATA", data)])
        elif what:
            check_outputs(est, [w for w in what if w != "all"] or None, where=repr(model))
        with _scheduler(scheduler, workers) as client:
            est.scheduler = client
            with console.status(f"scoring {type(est).__name__} on the data"):
                rows = [("score", est.score(data))]
                for name in ("bic", "aic"):
                    try:
                        rows.append((name.upper(), getattr(est, name)(data)))
                    except NotImplementedError:  # a family without a likelihood to count (LDA)
                        pass
            written = []
            for kind in kinds:
                with console.status(f"writing {kind}"):
                    _, arr = write_output(est, kind, data, out_dir / f"{kind}.zarr", overwrite=overwrite)
                written.append((kind, out_dir / f"{kind}.zarr", arr))
    out_console.print(Text(f"{type(est).__name__} ({est.cli_name}) from {model} on {data}"), highlight=False)
    table = Table()
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, f"{float(value):.10g}")
    out_console.print(table)
    for kind, path, arr in written:
        out_console.print(Text(f"wrote {kind} of shape {arr.shape} ({arr.dtype}) to {path}"), highlight=False)
