"""The ``emflow`` command line (typer + rich)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..checks import MAX_SEED, MIN_PARTITION_BYTES, check_int, check_real
from ..errors import ConfigError, EmflowError
from ..estimators import discover

app = typer.Typer(
    name="emflow",
    help="Fit latent-variable models by EM on Zarr data with Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: at 80 columns it wraps long option names instead of cutting them
    rich_markup_mode=None,
)
console = Console(stderr=True)
out_console = Console()


class Covariance(str, Enum):
    full = "full"
    tied = "tied"
    diag = "diag"
    spherical = "spherical"


class Init(str, Enum):
    kmeans = "kmeans"
    kmeanspp = "k-means++"
    random_from_data = "random_from_data"
    random = "random"


class Persist(str, Enum):
    auto = "auto"
    memory = "memory"
    stream = "stream"


_PERSIST = {"auto": "auto", "memory": True, "stream": False}

SchedulerOpt = typer.Option(
    None, "--scheduler", "-s",
    help="Address of a running Dask scheduler (tcp://host:8786). Default: start a local cluster.",
)
WorkersOpt = typer.Option(None, "--workers", help="Worker processes of the local cluster (default: one per core).")


def _fail(message: str) -> None:
    """One line on stderr, ``error: <message>``; the message is text, never rich markup."""
    console.print(Text.assemble(("error: ", "bold red"), " ".join(str(message).split())),
                  soft_wrap=True, highlight=False)


# a temporary sibling that emflow writes before renaming into place (emflow.storage.store.atomic_dir)
_TMP_NAME = re.compile(r"(^|[/\\])\.([^/\\]+)\.(?:tmp|old)-[0-9a-f]{12}(?=[/\\]|$).*$")
_OS_HINTS = {
    errno.ENOSPC: "Free some space, or write to another location.",
    errno.EDQUOT: "Free some space (you are over quota), or write to another location.",
    errno.EROFS: "That location is read-only: write somewhere else.",
    errno.EACCES: "You may not write there: check its permissions, or write somewhere else.",
    errno.EPERM: "You may not write there: check its permissions, or write somewhere else.",
    errno.ENOTDIR: "Something that is not a folder is in the way: choose another path, or remove it.",
    errno.EEXIST: "Something is in the way: choose another path, or remove it.",
    errno.EISDIR: "A folder is in the way: choose another path, or remove it.",
    errno.ENOENT: "Check the path.",
}


def _user_path(p) -> str:
    """The path the user named: a temporary sibling ``.NAME.tmp-XXXX/...`` is shown as NAME."""
    s = os.fsdecode(p)
    m = _TMP_NAME.search(s)
    return s[: m.start()] + m.group(1) + m.group(2) if m else s


def _os_error_text(exc: OSError, target=None) -> str:
    paths = [p for p in (exc.filename2, exc.filename) if p not in (None, "")]
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = _user_path(paths[0]) if paths else (os.fspath(target) if target is not None else None)
    hint = _OS_HINTS.get(exc.errno, "Check the path, its permissions and the free space.")
    return f"{reason}" + (f": {where}" if where else "") + f". {hint}"


@contextlib.contextmanager
def _errors(target=None, options: Optional[dict] = None):
    """Turn the failures a user can act on into one line on stderr and an exit status: 2 for an
    emflow error, an OSError (disk full, a file in the way, no permission) or memory running out,
    130 for Ctrl-C. ``target`` is the path written, named when an OSError carries none;
    ``options`` maps estimator parameters to the command's options, named in their errors.
    Anything else is a bug and keeps its traceback."""
    try:
        yield
    except EmflowError as exc:
        param = getattr(exc, "param", None)
        prefix = f"{options[param]}: " if isinstance(exc, ConfigError) and param in (options or {}) else ""
        _fail(prefix + str(exc))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); an output being written was not moved into place.")
        raise typer.Exit(130) from None
    except MemoryError:
        _fail("out of memory. Give the workers more memory, or use smaller partitions "
              "(fit: --persist stream, --partition-mib).")
        raise typer.Exit(2) from None
    except OSError as exc:
        _fail(_os_error_text(exc, target))
        raise typer.Exit(2) from None


def _check_workers(workers: Optional[int]) -> None:
    if workers is not None:
        check_int("--workers", workers, 1)


def _check_seed(seed: Optional[int], name: str = "--seed") -> None:
    if seed is not None:
        check_int(name, seed, 0, MAX_SEED)


def _partition_bytes(partition_mib: Optional[float]) -> Optional[int]:
    """``--partition-mib`` in bytes; at least :data:`emflow.checks.MIN_PARTITION_BYTES` (1 KiB)."""
    if partition_mib is None:
        return None
    low = MIN_PARTITION_BYTES / 2**20
    check_real("--partition-mib", partition_mib, low, finite=True, hint=" (1 KiB)")
    return int(partition_mib * 2**20)


@contextlib.contextmanager
def _scheduler(address: Optional[str], workers: Optional[int]):
    """A Dask client: the given scheduler, or a LocalCluster started (and stopped) here."""
    from ..execution.cluster import local_client

    if address:
        from ..execution.cluster import engine_for

        with engine_for(address) as engine:
            yield engine.client
        return
    with contextlib.ExitStack() as stack:
        with console.status("starting a local Dask cluster"):
            client = stack.enter_context(local_client(workers, silence_logs=40))
        console.print(Text(f"Dask dashboard: {client.dashboard_link}"), highlight=False)
        yield client


def _iteration_progress(max_iter: int):
    progress = Progress(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
    )
    task = progress.add_task("initialising", total=max_iter)

    def callback(event):
        progress.update(task, completed=event.iteration, description=f"EM (init {event.init})")
        progress.console.print(
            f"iter {event.iteration:4d}  log-likelihood {event.log_likelihood: .10g}  "
            f"change {event.change: .3e}  {event.seconds:.2f}s"
        )

    return progress, callback


@app.command()
def predict(
    model: str = typer.Argument(..., help="A saved model of any family (`emflow fit`, a flow, or .save())."),
    data: str = typer.Argument(..., help="Zarr dataset (array, sequences or corpus) to apply it to."),
    out: Path = typer.Option(..., "--out", "-o", help="Zarr array (or sequences group) to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an emflow output already at --out."),
    what: Optional[str] = typer.Option(
        None, "--what",
        help="The output to write, one the model's family declares (" + "; ".join(
            f"{cls.cli_name}: {' | '.join(cls.outputs)}" for cls in sorted(discover().values(),
                                                                          key=lambda c: c.cli_name)
            if cls.outputs) + "). Default: the first of the family's."),
    scheduler: Optional[str] = SchedulerOpt,
    workers: Optional[int] = WorkersOpt,
):
    """Apply a saved model to DATA, writing the result to Zarr chunk by chunk."""
    from .. import load
    from ..estimators.outputs import check_outputs, write_output

    from ..storage.destinations import check_destination

    with _errors(out):
        _check_workers(workers)
        # before any work: --out may not be MODEL or DATA (or hold them), nor replace anything unasked
        check_destination(out, "output", overwrite=overwrite, inputs=[("MODEL", model), ("DATA", data)])
        est = load(model)
        [kind] = check_outputs(est, [what] if what else None, where=repr(model))[:1]
        with _scheduler(scheduler, workers) as client:
            est.scheduler = client
            with console.status(escape(f"writing {kind} to {out}")):
                _, arr = write_output(est, kind, data, out, overwrite=overwrite)
    out_console.print(Text(f"wrote {kind} of shape {arr.shape} ({arr.dtype}) to {out}"), highlight=False)


@app.command()
def info(path: str = typer.Argument(..., help="A saved model or a Zarr dataset (rows, sequences or corpus).")):
    """Describe a saved model or a Zarr dataset: rows (an array, or a group holding one), a
    sequences group (values + offsets) or a corpus group (indptr, indices, counts)."""
    from ..storage.store import read_model_attrs

    with _errors(path):
        try:
            meta = read_model_attrs(path)
        except EmflowError:
            from ..storage.destinations import destination_kind

            if destination_kind(path)[0] == "model":
                raise  # a damaged model is reported as such, not described as a dataset
            meta = None
        if meta is not None:
            from .. import load

            _print_model(load(path), title=Text(f"{meta['family']} model at {path}"))
            return
        kind, url, fields, attrs = _describe_dataset(path)
        table = Table(title=Text(f"{kind} dataset {url}"))
        table.add_column("field")
        table.add_column("value")
        table.add_row("kind", kind)
        for k, v in fields:
            table.add_row(Text(k), Text(v))
        for k, v in attrs.items():
            if k == "kind" and v == kind:
                continue  # shown above
            text = json.dumps(v)
            table.add_row(Text(str(k)), Text(text if len(text) < 200 else text[:197] + "..."))
        out_console.print(table)


_SEQUENCES = ("values", "offsets")
_CORPUS = ("indptr", "indices", "counts")


def _describe_dataset(path: str) -> tuple[str, str, list[tuple[str, str]], dict]:
    """(kind, url, [(field, value)], attrs) of a Zarr dataset in any of emflow's layouts."""
    import zarr

    from ..storage.chunks import _url, open_zarr_array

    url = _url(path)
    node = None
    if "://" in url or os.path.isdir(url):
        try:
            node = zarr.open(url, mode="r")
        except Exception:  # not Zarr: open_zarr_array below says so, with what to do
            node = None
    if isinstance(node, zarr.Group) and all(n in node for n in _CORPUS):
        indptr, indices = node["indptr"], node["indices"]
        n_docs, nnz = max(0, indptr.shape[0] - 1), indices.shape[0]
        n_terms = node.attrs.get("n_terms")
        fields = [
            ("shape", f"({n_docs}, {n_terms}) (documents, terms)"),
            ("documents", f"{n_docs:,}"), ("terms", str(n_terms)), ("nonzeros", f"{nnz:,}"),
            ("counts dtype", str(node["counts"].dtype)), ("vocabulary", "stored" if "vocabulary_utf8" in node else "none"),
            ("chunks (documents)", str(node.attrs.get("chunk_docs", tuple(indptr.chunks)))),
            ("stored bytes", f"{sum(node[n].nbytes for n in _CORPUS):,}"),
        ]
        return "corpus", url, fields, dict(node.attrs)
    if isinstance(node, zarr.Group) and all(n in node for n in _SEQUENCES):
        values, offsets = node["values"], node["offsets"]
        n_seq = max(0, offsets.shape[0] - 1)
        fields = [
            ("shape", f"{tuple(values.shape)} (steps, features)"), ("sequences", f"{n_seq:,}"),
            ("steps", f"{values.shape[0]:,}"), ("features", str(values.shape[1] if values.ndim > 1 else 1)),
            ("dtype", str(values.dtype)), ("chunks", str(tuple(values.chunks))),
            ("stored bytes", f"{values.nbytes + offsets.nbytes:,}"),
        ]
        return "sequences", url, fields, dict(node.attrs)
    arr, url = open_zarr_array(path)
    fields = [("shape", str(tuple(arr.shape))), ("dtype", str(arr.dtype)), ("chunks", str(tuple(arr.chunks))),
              ("stored bytes", f"{arr.nbytes:,}")]
    if isinstance(node, zarr.Group) and "weights" in node:
        fields.append(("weights", f"{node['weights'].shape[0]:,} (array 'weights')"))
    attrs = dict(node.attrs) if isinstance(node, zarr.Group) else dict(arr.attrs)
    return "rows", url, fields, attrs


@app.command()
def generate(
    out: Path = typer.Argument(..., help="Zarr group to write."),
    samples: int = typer.Option(100_000, "--samples", "-n"),
    components: int = typer.Option(3, "--components", "-k"),
    features: int = typer.Option(2, "--features", "-d"),
    covariance: Covariance = typer.Option(Covariance.full, "--covariance", "-c"),
    separation: float = typer.Option(4.0),
    seed: int = typer.Option(0),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows"),
    dtype: str = typer.Option("float64"),
    weights: bool = typer.Option(False, "--weights", help="Also write integer row weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an emflow dataset already at OUT."),
):
    """Write a synthetic Gaussian-mixture dataset with known parameters."""
    from ..storage.synthetic import write_gmm

    with _errors(out):
        for name, value in (("--samples", samples), ("--components", components), ("--features", features)):
            check_int(name, value, 1)
        if chunk_rows is not None:
            check_int("--chunk-rows", chunk_rows, 1)
        _check_seed(seed)
        check_real("--separation", separation, 0, finite=True)
        with Progress(TextColumn("generating"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} rows"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("rows", total=samples)
            path = write_gmm(out, samples, components, features, covariance.value, separation=separation,
                             seed=seed, chunk_rows=chunk_rows, dtype=dtype, weights=weights,
                             progress=lambda n: progress.advance(task, n), overwrite=overwrite)
    out_console.print(Text(f"wrote {samples:,} x {features} rows to {path}"), highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo():
    """How to run the demo: a Prefect flow, run from the repository (flows/ is not installed)."""
    _fail("the demo runs the Prefect fit flow, which lives in the repository, not in the installed "
          "library: run `make demo` in a clone of it, or `python -m flows.demo --out demo-output` from its root.")
    raise typer.Exit(2)


def _row(table: Table, field: str, value) -> None:
    """A table row whose value is shown as text (paths and attributes may hold '[...]')."""
    table.add_row(field, Text(str(value)))


def _print_model(gm, title) -> None:
    info = getattr(gm, "fit_info_", {}) or {}
    name = type(gm).__name__
    t = Table(title=title)
    t.add_column("field")
    t.add_column("value")
    _row(t, "family", name)
    for field, value in gm._summary().items():
        _row(t, field, value)
    if info:
        secs = info.get("seconds_per_iteration") or []
        if secs:
            _row(t, "seconds / iteration", f"{float(np.median(secs)):.3f} (median)")
        size = [f"{info[k]} {k.removeprefix('n_')}" for k in ("n_samples", "n_sequences", "n_steps", "n_docs")
                if info.get(k) is not None]
        _row(t, "data", f"{info.get('source')} ({', '.join(size)}, {info.get('n_features')} features, "
                          f"{info.get('dtype')})")
        _row(t, "fingerprint", str(info.get("fingerprint")))
        _row(t, "ran on", str(info.get("engine")))
    _row(t, "emflow", __version__)
    out_console.print(t)


from .ingest import ingest_command  # noqa: E402

app.command("ingest")(ingest_command)

from . import fit as _fit  # noqa: E402,F401  (registers `fit` and `select`)
from . import apply as _apply  # noqa: E402,F401  (registers `score`)
from . import flows_cmd as _flows  # noqa: E402,F401  (registers `flows run` and `flows serve`)
from . import refit as _refit  # noqa: E402,F401  (registers `refit`)


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"emflow {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
