"""``emflow flows run NAME`` / ``emflow flows serve``: the repository's Prefect flows, locally.

The flows live in the repository (``flows/``, ``deploy/``), not in the installed library: these
commands work from a checkout of it (its root on ``sys.path``, e.g. the current directory), and
say so when it is not there. They are imported here only, by name, when the command runs.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from typing import List, Optional

import typer
from rich.text import Text

from .main import _fail, app, out_console

__all__ = ["flows_app"]

flows_app = typer.Typer(help="Run the repository's Prefect flows (from a checkout of it).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(flows_app, name="flows")


def _repo_package(name: str):
    """Import the repository package ``name`` (flows, deploy), the current directory first."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name not in (name, None) and not str(exc.name).startswith(name + "."):
            raise  # the package is there but something it needs is not: keep the real error
        _fail(f"`{name}/` is not importable: `emflow flows` runs the Prefect flows of a checkout of the "
              "emflow repository; run it from that checkout's root (or put the root on PYTHONPATH).")
        raise typer.Exit(2) from None


def _flow_modules() -> dict[str, object]:
    """``{module name: its flow}`` of every flow module in ``flows/``."""
    from prefect.flows import Flow

    pkg = _repo_package("flows")
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"flows.{info.name}")
        for value in vars(mod).values():
            if isinstance(value, Flow) and value.fn.__module__ == mod.__name__:
                found[info.name] = value
                break
    return found


@flows_app.command("list")
def list_flows():
    """List the flows `emflow flows run` runs: module name and Prefect flow name."""
    for name, flow in sorted(_flow_modules().items()):
        out_console.print(Text(f"{name:<18} {flow.name}"), highlight=False)


@flows_app.command("run", context_settings={"ignore_unknown_options": True})
def run(
    name: str = typer.Argument(..., help="The flow: a module of flows/ (fit, fit_model, score, ...) "
                                         "or its Prefect name (emflow-fit)."),
    param: Optional[List[str]] = typer.Option(
        None, "--param", "-p", help="KEY=VALUE, repeated; VALUE is JSON when it parses, else text."),
    params: Optional[str] = typer.Option(None, "--params", help="All parameters as one JSON object."),
):
    """Run one flow of flows/ locally, with a temporary Prefect server unless PREFECT_API_URL is set."""
    found = _flow_modules()
    by_flow_name = {f.name: m for m, f in found.items()}
    module = name if name in found else by_flow_name.get(name)
    if module is None:
        _fail(f"no flow {name!r} in flows/; choose one of: {', '.join(sorted(found))}.")
        raise typer.Exit(2)
    from flows._main import main as run_flow  # noqa: the repository's runner (imported above)

    argv = [a for p in (param or []) for a in ("--param", p)] + (["--params", params] if params else [])
    raise typer.Exit(run_flow(found[module], argv, module=f"flows.{module}"))


@flows_app.command("serve")
def serve(
    only: Optional[List[str]] = typer.Option(None, "--only", help="Serve only this deployment (repeat it)."),
):
    """Serve the deployments of deploy/deployments.py in this process (schedules fire while it runs)."""
    deployments = _repo_package("deploy.deployments")
    chosen = [d for d in deployments.DEPLOYMENTS if not only or d.name in only]
    unknown = sorted(set(only or ()) - {d.name for d in deployments.DEPLOYMENTS})
    if unknown:
        _fail(f"no deployment {', '.join(unknown)}; choose among: "
              f"{', '.join(d.name for d in deployments.DEPLOYMENTS)}.")
        raise typer.Exit(2)
    from prefect import serve as prefect_serve

    out_console.print(Text(f"serving {len(chosen)} deployment(s): {', '.join(d.name for d in chosen)}"),
                      highlight=False)
    prefect_serve(*(d.to_deployment() for d in chosen))
