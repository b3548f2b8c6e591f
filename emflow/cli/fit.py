"""``emflow fit --model NAME``: every registered family, its options generated from the registry.

The family is read from ``--model`` before the rest of the line is parsed; its options
(:mod:`emflow.cli.options`) are then added to the command's own, so ``emflow fit --model
lda --help`` lists LDA's. The data are opened in the family's layout (``data_kind``) before
a cluster starts; every family gets the same progress bar and per-iteration line.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text
from typer.core import TyperCommand

from ..errors import ConfigError
from . import options as O
from .main import (SchedulerOpt, WorkersOpt, Persist, _PERSIST, _check_seed, _check_workers, _errors, _fail,
                   _iteration_progress, _partition_bytes, _print_model, _scheduler, app)

__all__ = ["fit", "FamilyCommand"]

DEFAULT_MODEL = "gmm"
_META = "emflow.family"


def _peek_model(args: list[str]) -> Optional[str]:
    """The value of ``--model`` / ``-m`` in ``args`` (None when not given)."""
    for i, a in enumerate(args):
        if a == "--":
            break
        if a in ("--model", "-m") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
        if a.startswith("-m") and len(a) > 2 and not a.startswith("--"):
            return a[2:]
    return None


def model_list() -> str:
    return ", ".join(O.families())


def resolve_model(name: str):
    """The estimator class of ``--model name``; one error line listing the registered names otherwise."""
    cls = O.family_by_name(name)
    if cls is None:
        _fail(f"--model: no registered family {name!r}; choose one of: {model_list()}.")
        raise typer.Exit(2)
    return cls


class FamilyCommand(TyperCommand):
    """A typer command whose options include those of the family ``--model`` names."""

    def _own_names(self) -> frozenset:
        return frozenset(d for p in self.params for d in (*p.opts, *p.secondary_opts))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            ctx.meta[_META] = resolve_model(_peek_model(args) or DEFAULT_MODEL)
        return super().parse_args(ctx, args)

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        cls = ctx.meta.get(_META)
        if cls is None:
            return params
        extra, _, _ = O.family_options(cls, self._own_names())
        help_opts = [p for p in params if p.name == "help"]
        return [p for p in params if p.name != "help"] + list(extra) + help_opts

    def format_epilog(self, ctx, formatter) -> None:
        self.epilog = f"Models: {model_list()}."  # read now: a family registered later is listed
        super().format_epilog(ctx, formatter)

    def invoke(self, ctx):
        cls = ctx.meta.get(_META)
        family_values = {k: ctx.params.pop(k) for k in list(ctx.params) if k.startswith(O.PREFIX)}
        if cls is not None:
            ctx.meta["emflow.params"] = O.given(ctx, cls, self._own_names(), family_values)
            ctx.meta["emflow.labels"] = O.family_options(cls, self._own_names())[1]
        return super().invoke(ctx)


_FIT_HELP = (
    "Fit a model of any registered family to DATA and save it to --out.\n\n"
    "The family's own options follow --model: see them with "
    "`emflow fit --model NAME --help`."
)


@app.command(cls=FamilyCommand, help=_FIT_HELP)
def fit(
    data: str = typer.Argument(..., help="Zarr dataset in the family's layout: rows (an array), "
                                         "sequences (values + offsets) or a corpus."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="The family to fit (see Models below)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the fitted model (a Zarr group)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an emflow model already at --out."),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="Row weights (rows families): a Zarr array path, or an array beside the data."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for initialisation."),
    persist: Persist = typer.Option(Persist.auto, help="Keep data in worker memory, stream them each "
                                                       "iteration, or decide."),
    partition_mib: Optional[float] = typer.Option(
        None, "--partition-mib", help="Target partition size in MiB (default 64); smaller bounds worker "
                                      "memory when streaming."),
    scheduler: Optional[str] = SchedulerOpt,
    workers: Optional[int] = WorkersOpt,
    ctx: typer.Context = None,
):
    cls = ctx.meta[_META]
    labels = {**ctx.meta["emflow.labels"], "random_state": "--seed", "persist": "--persist",
              "partition_bytes": "--partition-mib"}
    with _errors(out, labels):
        _check_seed(seed)
        _check_workers(workers)
        names = cls._get_param_names()
        kwargs = dict(ctx.meta["emflow.params"])
        common = {"random_state": seed, "persist": _PERSIST[persist.value],
                  "partition_bytes": _partition_bytes(partition_mib)}
        kwargs.update({k: v for k, v in common.items() if k in names})
        est = cls(**kwargs)
        est._validate_params()
        takes_weights = "sample_weight" in inspect.signature(cls.fit).parameters
        if weights is not None and not takes_weights:
            raise ConfigError(f"--weights: a {cls.__name__} ({cls.cli_name}) takes no row weights.")
        from ..storage.destinations import check_destination
        from ..storage.layouts import open_stored

        # before any work: --out may not be DATA (or hold it), nor replace anything unasked
        weights_path = weights if weights and os.path.exists(weights) else None
        check_destination(out, "model", overwrite=overwrite, inputs=[("DATA", data), ("--weights", weights_path)])
        # fail fast, before starting a cluster
        open_stored(cls.data_kind, data, weights, allow_nan=est._allows_nan(),
                    min_rows=int(getattr(est, "n_components", 1)) if cls.data_kind == "rows" else 1)
        fit_kwargs = {"sample_weight": weights} if weights is not None else {}
        with _scheduler(scheduler, workers) as client:
            est.scheduler = client
            progress, cb = _iteration_progress(int(getattr(est, cls.iter_param)))
            t0 = time.perf_counter()
            with progress:
                est.fit(data, callbacks=[cb], **fit_kwargs)
            elapsed = time.perf_counter() - t0
        est.scheduler = scheduler
        path = est.save(out, overwrite=overwrite)
    _print_model(est, title=Text(f"fitted in {elapsed:.1f}s -> {path}"))


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers (e.g. 2,3,4), got {text!r}.") from None
    if not values:
        raise ConfigError(f"{name} must name at least one value (e.g. 2,3,4).")
    return values


@app.command()
def select(
    data: str = typer.Argument(..., help="Zarr array of rows (n_samples, n_features)."),
    components: str = typer.Option("1,2,3,4", "--components", "-k", help="Comma-separated numbers of "
                                                                         "components to try."),
    covariance: str = typer.Option("full", "--covariance", "-c", help="Comma-separated covariance types "
                                                                      "(full, tied, diag, spherical)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Save the model with the lowest BIC here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an emflow model already at --out."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Row weights: a Zarr array path, or an "
                                                                  "array beside the data."),
    n_init: int = typer.Option(1, "--n-init", help="Initialisations per candidate."),
    tol: float = typer.Option(1e-3, "--tol", help="Stop a candidate when its mean log-likelihood changes "
                                                  "less than this."),
    reg_covar: float = typer.Option(1e-6, "--reg-covar", help="Added to the diagonal of the covariances."),
    max_iter: int = typer.Option(100, "--max-iter", help="EM iterations per candidate, at most."),
    seed: int = typer.Option(0, "--seed", help="Random seed (every candidate starts from it)."),
    persist: Persist = typer.Option(Persist.auto, help="Keep data in worker memory, stream them each "
                                                       "pass, or decide."),
    scheduler: Optional[str] = SchedulerOpt,
    workers: Optional[int] = WorkersOpt,
):
    """Fit a grid of Gaussian mixtures with shared passes over DATA; print them ranked by BIC."""
    from rich.table import Table

    from ..estimators.selection import select_gaussian_mixture
    from .main import out_console

    options = {"n_components": "--components (-k)", "covariance_type": "--covariance (-c)", "tol": "--tol",
               "reg_covar": "--reg-covar", "max_iter": "--max-iter", "n_init": "--n-init",
               "random_state": "--seed"}
    with _errors(out, options):
        _check_seed(seed)
        _check_workers(workers)
        ks = _ints(components, "--components (-k)")
        cts = [c.strip() for c in covariance.split(",") if c.strip()]
        if out is not None:
            from ..storage.destinations import check_destination

            check_destination(out, "model", overwrite=overwrite, inputs=[("DATA", data)])
        with _scheduler(scheduler, workers) as client:
            with console_status("fitting the candidates with shared passes") as status:
                def on_pass(info):
                    status.update(f"pass {info['pass']}: {info['active']} of {len(ks) * len(cts) * n_init} "
                                  "candidate restarts still running")

                result = select_gaussian_mixture(
                    data, ks, cts, sample_weight=weights, n_init=n_init, tol=tol, reg_covar=reg_covar,
                    max_iter=max_iter, random_state=seed, scheduler=client, persist=_PERSIST[persist.value],
                    callbacks=[on_pass])
        best = result.best_model
        best.scheduler = None
        path = best.save(out, overwrite=overwrite) if out is not None else None
    from rich import box

    header = ("rank", "K", "covariance", "params", "log-lik", "BIC", "AIC", "conv", "iter")
    rows = [(f"{row['rank']}{' *' if row['chosen'] else ''}", str(row["n_components"]), row["covariance_type"],
             str(row["n_parameters"]), f"{row['log_likelihood']:.2f}", f"{row['bic']:.2f}", f"{row['aic']:.2f}",
             str(row["converged"]), str(row["n_iter"])) for row in result.ranked_table()]
    table = Table(title=Text("candidates ranked by BIC (lower is better; * chosen)"), box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for j, col in enumerate(header):
        width = max(len(col), *(len(r[j]) for r in rows))
        table.add_column(col, justify="left" if col in ("covariance", "conv") else "right", min_width=width)
    for r in rows:
        table.add_row(*r)
    out_console.print(table)
    io = result.io
    out_console.print(Text(f"{io['passes_shared']} passes over the data (fitting each candidate alone: "
                           f"{io['passes_sequential']})" + (f"; best model saved to {path}" if path else "")),
                      highlight=False)


def console_status(text: str):
    from .main import console

    return console.status(text)
