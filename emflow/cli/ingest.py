"""``emflow ingest``: the command-line face of :func:`emflow.storage.ingest.ingest`.

The lead wires it into the main application with::

    from .ingest import ingest_command
    app.command("ingest")(ingest_command)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["ingest_command"]


def _columns(text: Optional[str]):
    if text is None:
        return None
    cols = [c.strip() for c in text.split(",") if c.strip()]
    return cols or None


def ingest_command(
    source: Path = typer.Argument(..., help="CSV (.csv/.tsv, optionally .gz), Parquet, NumPy .npy or HDF5 file."),
    out: Path = typer.Option(..., "--out", "-o", help="Zarr dataset to write (appears only once complete)."),
    columns: Optional[str] = typer.Option(
        None, "--columns", "-c", help="Comma-separated value columns, by name or position (default: all)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Storage type: float64 or float32 (default: float32 for a float32 source, "
        "float64 otherwise)."),
    chunk_rows: Optional[int] = typer.Option(
        None, "--chunk-rows", min=1, help="Rows per Zarr chunk (default: about 16 MiB per chunk)."),
    compression: str = typer.Option(
        "zstd", "--compression", help="zstd, lz4, lz4hc, blosclz, zlib, gzip or none."),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Skip and count unparseable CSV rows instead of stopping at the first."),
    sequence_column: Optional[str] = typer.Option(
        None, "--sequence-column", help="Write ragged sequences (values + offsets): rows with the same id "
        "in this column form one sequence."),
    format: Optional[str] = typer.Option(None, "--format", help="csv, parquet, npy or hdf5 (default: from the extension)."),
    delimiter: Optional[str] = typer.Option(None, "--delimiter", help="CSV field separator (default ',', tab for .tsv)."),
    header: bool = typer.Option(True, "--header/--no-header", help="Whether the CSV's first row names the columns."),
    skip_rows: int = typer.Option(0, "--skip-rows", min=0, help="CSV lines to skip before the header."),
    key: Optional[str] = typer.Option(None, "--key", help="HDF5 dataset to read (default: the only one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Stream a file into a chunked Zarr dataset that `emflow fit` reads, with a validation report."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from rich.text import Text

    from .main import _errors
    from ..storage.ingest import ingest, read_report

    console = Console(stderr=True)
    seq_col = sequence_column  # a name, or a position when no column has that name
    with _errors(out):
        with Progress(
            TextColumn("[bold]ingest[/]"), BarColumn(), TextColumn("{task.completed:,} rows"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=True,
        ) as bar:
            task = bar.add_task("rows", total=None, rate="")
            import time

            t0 = time.perf_counter()

            def progress(n: int) -> None:
                bar.advance(task, n)
                done = bar.tasks[task].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s")

            path = ingest(
                source, out, format=format, columns=_columns(columns), dtype=dtype, chunk_rows=chunk_rows,
                compression=compression, on_bad_rows="skip" if skip_bad_rows else "error", progress=progress,
                sequence_column=seq_col, delimiter=delimiter, header=header, skip_rows=skip_rows, key=key,
                overwrite=overwrite,
            )

    rep = read_report(path)
    out_console = Console()
    seqs = f", {rep['sequences']:,} sequences" if "sequences" in rep else ""
    out_console.print(Text(
        f"Wrote {path}: {rep['rows']:,} rows x {len(rep['columns'])} columns{seqs} "
        f"in {rep['seconds']:.2f} s (fingerprint {rep['fingerprint']}, {_stored_dtype(path)})"), highlight=False)
    if rep["skipped_rows"]:
        out_console.print(Text(f"Skipped {rep['skipped_rows']:,} bad row(s)", style="yellow") + Text(", e.g.:"),
                          highlight=False)
        for e in rep["skipped_examples"][:5]:
            out_console.print(Text(f"  {e}"), highlight=False)
    table = Table("column", "min", "max", "mean", "std", "NaN", "inf", box=None)
    shown = min(len(rep["columns"]), 20)

    def fmt(v):
        return "-" if v is None else f"{v:.6g}"

    for j in range(shown):
        table.add_row(Text(str(rep["columns"][j])), fmt(rep["min"][j]), fmt(rep["max"][j]), fmt(rep["mean"][j]),
                      fmt(rep["std"][j]), str(rep["nan"][j]), str(rep["posinf"][j] + rep["neginf"][j]))
    out_console.print(table)
    if shown < len(rep["columns"]):
        out_console.print(f"... and {len(rep['columns']) - shown} more columns (all in the dataset's attrs['report']).")


def _stored_dtype(path) -> str:
    import zarr

    return str(zarr.open_group(path, mode="r").attrs.get("dtype", "?"))
