"""The ``emflow`` command line (typer + rich)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import EmflowError

app = typer.Typer(
    name="emflow",
    help="Fit latent-variable models by EM on Zarr data with Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


@contextlib.contextmanager
def _errors():
    try:
        yield
    except EmflowError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _scheduler(address: Optional[str], workers: Optional[int]):
    """A Dask client: the given scheduler, or a LocalCluster started (and stopped) here."""
    from distributed import Client

    from .cluster import local_cluster

    if address:
        from .cluster import engine_for

        with engine_for(address) as engine:
            yield engine.client
        return
    with console.status("starting a local Dask cluster"):
        cluster = local_cluster(workers, silence_logs=40)
        client = Client(cluster)
    try:
        console.print(f"Dask dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        cluster.close()


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
def fit(
    data: str = typer.Argument(..., help="Zarr array (or group holding one) of shape (n_samples, n_features)."),
    components: int = typer.Option(..., "--components", "-k", help="Number of mixture components."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the fitted model (a Zarr group)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an emflow model already at --out."),
    covariance: Covariance = typer.Option(Covariance.full, "--covariance", "-c"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Row weights: a Zarr array path, or the name of an array beside the data."),
    tol: float = typer.Option(1e-3, help="Stop when the mean log-likelihood changes less than this."),
    reg_covar: float = typer.Option(1e-6, "--reg-covar"),
    max_iter: int = typer.Option(100, "--max-iter"),
    n_init: int = typer.Option(1, "--n-init"),
    init: Init = typer.Option(Init.kmeans, "--init"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for initialisation."),
    persist: Persist = typer.Option(Persist.auto, help="Keep data in worker memory, stream it each iteration, or decide."),
    partition_mib: Optional[float] = typer.Option(None, "--partition-mib", help="Target partition size in MiB (default 64); smaller bounds worker memory when streaming."),
    scheduler: Optional[str] = SchedulerOpt,
    workers: Optional[int] = WorkersOpt,
):
    """Fit a Gaussian mixture to DATA and save it to --out."""
    from .mixture import GaussianMixture

    with _errors():
        gm = GaussianMixture(
            components, covariance_type=covariance.value, tol=tol, reg_covar=reg_covar, max_iter=max_iter,
            n_init=n_init, init_params=init.value, random_state=seed, persist=_PERSIST[persist.value],
            partition_bytes=None if partition_mib is None else max(1, int(partition_mib * 2**20)),
        )
        gm._validate_params()
        from .data import open_rows
        from .store import check_destination

        # before any work: --out may not be DATA (or hold it), nor replace anything unasked
        weights_path = weights if weights and os.path.exists(weights) else None
        check_destination(out, "model", overwrite=overwrite, inputs=[("DATA", data), ("--weights", weights_path)])

        open_rows(data, weights, min_rows=components)  # fail fast, before starting a cluster
        with _scheduler(scheduler, workers) as client:
            gm.scheduler = client
            progress, cb = _iteration_progress(max_iter)
            t0 = time.perf_counter()
            with progress:
                gm.fit(data, sample_weight=weights, callbacks=[cb])
            elapsed = time.perf_counter() - t0
        gm.scheduler = scheduler
        path = gm.save(out, overwrite=overwrite)
    _print_model(gm, title=f"fitted in {elapsed:.1f}s -> {path}")


@app.command()
def predict(
    model: str = typer.Argument(..., help="A saved model of any family (`emflow fit`, a flow, or .save())."),
    data: str = typer.Argument(..., help="Zarr dataset (array, sequences or corpus) to apply it to."),
    out: Path = typer.Option(..., "--out", "-o", help="Zarr array (or sequences group) to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an emflow output already at --out."),
    what: Optional[str] = typer.Option(
        None, "--what",
        help="Mixtures: labels | proba (responsibilities) | log_likelihood (per row; also 'score'). "
             "HMMs: labels (Viterbi states) | proba (posteriors). LDA: topics. State-space: smoothed_states | "
             "filtered_states. Default: the first of the family's."),
    scheduler: Optional[str] = SchedulerOpt,
    workers: Optional[int] = WorkersOpt,
):
    """Apply a saved model to DATA, writing the result to Zarr chunk by chunk."""
    from . import load
    from .outputs import check_outputs, write_output

    from .store import check_destination

    with _errors():
        # before any work: --out may not be MODEL or DATA (or hold them), nor replace anything unasked
        check_destination(out, "output", overwrite=overwrite, inputs=[("MODEL", model), ("DATA", data)])
        est = load(model)
        [kind] = check_outputs(est, [what] if what else None, where=repr(model))[:1]
        with _scheduler(scheduler, workers) as client:
            est.scheduler = client
            with console.status(f"writing {kind} to {out}"):
                _, arr = write_output(est, kind, data, out, overwrite=overwrite)
    out_console.print(f"wrote {kind} of shape {arr.shape} ({arr.dtype}) to {out}")


@app.command()
def info(path: str = typer.Argument(..., help="A saved model or a Zarr dataset.")):
    """Describe a saved model or a Zarr dataset."""
    import zarr

    from .store import read_model_attrs

    with _errors():
        from .data import open_zarr_array

        try:
            meta = read_model_attrs(path)
        except EmflowError:
            from .store import destination_kind

            if destination_kind(path)[0] == "model":
                raise  # a damaged model is reported as such, not described as a dataset
            meta = None
        if meta is not None:
            from . import load

            _print_model(load(path), title=f"{meta['family']} model at {path}")
            return
        arr, url = open_zarr_array(path)
        table = Table(title=f"dataset {url}")
        table.add_column("field")
        table.add_column("value")
        table.add_row("shape", str(tuple(arr.shape)))
        table.add_row("dtype", str(arr.dtype))
        table.add_row("chunks", str(tuple(arr.chunks)))
        table.add_row("stored bytes", f"{arr.nbytes:,}")
        node = zarr.open(path, mode="r")
        for k, v in dict(node.attrs).items():
            text = json.dumps(v)
            table.add_row(k, text if len(text) < 200 else text[:197] + "...")
        out_console.print(table)


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
):
    """Write a synthetic Gaussian-mixture dataset with known parameters."""
    from .synthetic import write_gmm

    with _errors():
        with Progress(TextColumn("generating"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} rows"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("rows", total=samples)
            path = write_gmm(out, samples, components, features, covariance.value, separation=separation,
                             seed=seed, chunk_rows=chunk_rows, dtype=dtype, weights=weights,
                             progress=lambda n: progress.advance(task, n))
    out_console.print(f"wrote {samples:,} x {features} rows to {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Folder for the dataset and the model."),
    samples: int = typer.Option(500_000, "--samples", "-n"),
    components: int = typer.Option(4, "--components", "-k"),
    features: int = typer.Option(8, "--features", "-d"),
    workers: Optional[int] = WorkersOpt,
):
    """Generate a dataset, fit it with the Prefect fit flow on a local Dask cluster, show the result."""
    from .synthetic import write_gmm

    with _errors():
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data.zarr"
        console.rule("1. generate")
        with console.status(f"writing {samples:,} x {features} rows"):
            # overlapping components, so EM has real work to do after its k-means start
            write_gmm(data, samples, components, features, "full", seed=7, separation=2.5)
        console.print(f"dataset: {data}")
        import shutil

        # a demo starts afresh: no model or checkpoint from an earlier demo run
        shutil.rmtree(out / "model.zarr", ignore_errors=True)
        (out / "model.zarr.checkpoint.npz").unlink(missing_ok=True)
        console.rule("2. Prefect server")
        api, pid = _ensure_prefect_server(out)
        console.rule("3. fit (Prefect flow on a local Dask cluster)")
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from flows.fit import fit_flow

        state = fit_flow(
            data=str(data), out=str(out / "model.zarr"), n_components=components,
            covariance_type="full", scheduler="local", random_state=0, return_state=True,
        )
        model_path = state.result()
        run_url = f"{api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}"
        console.rule("4. result")
        from . import load

        gm = load(model_path)
        _print_model(gm, title=f"model at {model_path}")
        _print_truth(gm, data)
        out_console.print(f"Flow run in the Prefect dashboard: {run_url}")
        if pid is not None:
            out_console.print(f"The Prefect server started for this demo keeps running (pid {pid}); "
                              f"stop it with: kill {pid}")


def _healthy(api: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def _free_port(preferred: int = 4200) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free port on 127.0.0.1")


def _ensure_prefect_server(folder: Path) -> tuple[str, int | None]:
    """The Prefect API to use: $PREFECT_API_URL or one on 127.0.0.1:4200 if it answers, else a
    ``prefect server start`` on loopback (SQLite, offline) started here. Returns (api, pid)."""
    import subprocess

    for api in (os.environ.get("PREFECT_API_URL"), "http://127.0.0.1:4200/api"):
        if api and _healthy(api):
            os.environ["PREFECT_API_URL"] = api
            console.print(f"using the Prefect server at {api}")
            return api, None
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    prefect = Path(sys.executable).with_name("prefect")
    log = open(folder / "prefect-server.log", "ab")
    # the dashboard must call this server's API, whatever port it got
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    with console.status(f"starting a Prefect server on 127.0.0.1:{port} (pid {proc.pid})"):
        deadline = time.time() + 180
        while not _healthy(api):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise EmflowError(
                    f"The Prefect server did not start (see {folder / 'prefect-server.log'}). "
                    "Start one with `prefect server start` and set PREFECT_API_URL."
                )
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = api
    console.print(f"started a Prefect server at {api.removesuffix('/api')} (pid {proc.pid})")
    return api, proc.pid


def _print_model(gm, title: str) -> None:
    info = getattr(gm, "fit_info_", {}) or {}
    name = type(gm).__name__
    t = Table(title=title)
    t.add_column("field")
    t.add_column("value")
    t.add_row("family", name)
    if hasattr(gm, "state_dim"):
        t.add_row("state dimension", str(gm.state_dim))
    else:
        t.add_row("topics" if name == "LatentDirichletAllocation" else "components", str(gm.n_components))
    if getattr(gm, "covariance_type", None):
        t.add_row("covariance", gm.covariance_type)
    t.add_row("converged", f"{gm.converged_} after {gm.n_iter_} iterations")
    objective = {"GaussianMixture": "mean log-likelihood", "LatentDirichletAllocation": "bound per word"}
    t.add_row(objective.get(name, "log-likelihood per step"), f"{gm.lower_bound_:.10g}")
    for label, attr in [("weights", "weights_"), ("start probabilities", "startprob_"),
                        ("doc-topic prior", "doc_topic_prior_")]:
        if hasattr(gm, attr):
            t.add_row(label, np.array2string(np.asarray(getattr(gm, attr)), precision=4))
    if name == "LatentDirichletAllocation":
        t.add_row("perplexity (training)", f"{np.exp(-gm.lower_bound_):.6g}")
    if info:
        secs = info.get("seconds_per_iteration") or []
        if secs:
            t.add_row("seconds / iteration", f"{float(np.median(secs)):.3f} (median)")
        size = [f"{info[k]} {k.removeprefix('n_')}" for k in ("n_samples", "n_sequences", "n_steps", "n_docs")
                if info.get(k) is not None]
        t.add_row("data", f"{info.get('source')} ({', '.join(size)}, {info.get('n_features')} features, "
                          f"{info.get('dtype')})")
        t.add_row("fingerprint", str(info.get("fingerprint")))
        t.add_row("ran on", str(info.get("engine")))
    t.add_row("emflow", __version__)
    out_console.print(t)


def _print_truth(gm, data) -> None:
    import zarr

    truth = zarr.open_group(str(data), mode="r").attrs.get("truth")
    if not truth:
        return
    from scipy.optimize import linear_sum_assignment

    tm = np.asarray(truth["means"])
    cost = ((gm.means_[:, None, :] - tm[None]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    t = Table(title="fitted vs true parameters (components matched by means)")
    for col in ("component", "weight (fit)", "weight (true)", "max |mean error|"):
        t.add_column(col)
    for i, j in zip(r, c):
        t.add_row(str(i), f"{gm.weights_[i]:.4f}", f"{truth['weights'][j]:.4f}",
                  f"{np.abs(gm.means_[i] - tm[j]).max():.4f}")
    out_console.print(t)


from .cli_ingest import ingest_command  # noqa: E402

app.command("ingest")(ingest_command)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        out_console.print(__version__)
        raise typer.Exit()


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
