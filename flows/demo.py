"""The demo (``make demo``): generate a dataset, fit it with the Prefect fit flow on a local
Dask cluster, show the model beside the true parameters and the flow run's dashboard address.

Run it from the repository root (the flows are not installed with emflow)::

    python -m flows.demo --out demo-output [--samples N] [--components K] [--features D] [--workers W]

The Prefect API used is ``$PREFECT_API_URL`` or a server on 127.0.0.1:4200 when one answers;
otherwise a ``prefect server start`` on loopback (SQLite, offline) is started and left running
(its pid is printed). Bad options are one ``error:`` line and exit status 2, as in ``emflow``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from emflow.checks import check_int
from emflow.cli.main import _check_workers, _errors, _print_model, console, out_console
from emflow.errors import EmflowError

__all__ = ["app", "demo", "ensure_prefect_server"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Folder for the dataset and the model."),
    samples: int = typer.Option(500_000, "--samples", "-n"),
    components: int = typer.Option(4, "--components", "-k"),
    features: int = typer.Option(8, "--features", "-d"),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="Worker processes of the local cluster (default: one per core)."),
):
    """Generate a dataset, fit it with the Prefect fit flow on a local Dask cluster, show the result."""
    from emflow.storage.store import check_destination
    from emflow.storage.synthetic import write_gmm

    with _errors(out):
        for name, value in (("--samples", samples), ("--components", components), ("--features", features)):
            check_int(name, value, 1)
        _check_workers(workers)
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data.zarr"
        console.rule("1. generate")
        with console.status(f"writing {samples:,} x {features} rows"):
            # strongly overlapping components (separation 0.8), so EM has real work to do after
            # its k-means start: about 20 iterations from the k-means solution to the true
            # mixture (at 2.5 it took 2), a real curve in the dashboard's convergence plot.
            # The demo's own dataset is replaced; anything else at that path never is.
            write_gmm(data, samples, components, features, "full", seed=7, separation=0.8, overwrite=True)
        console.print(Text(f"dataset: {data}"), highlight=False)
        # a demo starts afresh: no model or checkpoint from an earlier demo run (only an
        # emflow model is removed; anything else at that path stops the demo here)
        if os.path.exists(check_destination(out / "model.zarr", "model", overwrite=True)):
            shutil.rmtree(out / "model.zarr")
        (out / "model.zarr.checkpoint.npz").unlink(missing_ok=True)
        console.rule("2. Prefect server")
        api, pid = ensure_prefect_server(out)
        console.rule("3. fit (Prefect flow on a local Dask cluster)")
        from flows.fit import fit_flow

        kwargs = dict(data=str(data), out=str(out / "model.zarr"), n_components=components,
                      covariance_type="full", random_state=0, return_state=True)
        if workers is None:
            state = fit_flow(**kwargs, scheduler="local")
        else:
            from emflow.execution.cluster import local_cluster

            with local_cluster(workers, silence_logs=40) as cluster:
                state = fit_flow(**kwargs, scheduler=cluster.scheduler_address)
        model_path = state.result()
        run_url = f"{api.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}"
        console.rule("4. result")
        import emflow

        gm = emflow.load(model_path)
        _print_model(gm, title=Text(f"model at {model_path}"))
        _print_truth(gm, data)
        out_console.print(Text(f"Flow run in the Prefect dashboard: {run_url}"), highlight=False)
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


def ensure_prefect_server(folder: Path) -> tuple[str, int | None]:
    """The Prefect API to use: $PREFECT_API_URL or one on 127.0.0.1:4200 if it answers, else a
    ``prefect server start`` on loopback (SQLite, offline) started here, its log in
    ``FOLDER/prefect-server.log``. Sets ``PREFECT_API_URL``; returns ``(api, pid or None)``."""
    import subprocess

    for api in (os.environ.get("PREFECT_API_URL"), "http://127.0.0.1:4200/api"):
        if api and _healthy(api):
            os.environ["PREFECT_API_URL"] = api
            console.print(Text(f"using the Prefect server at {api}"), highlight=False)
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


def _print_truth(gm, data) -> None:
    """The fitted components beside the true ones the generator recorded (matched by means)."""
    import zarr
    from scipy.optimize import linear_sum_assignment

    truth = zarr.open_group(str(data), mode="r").attrs.get("truth")
    if not truth:
        return
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


if __name__ == "__main__":
    app()
