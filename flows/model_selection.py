"""Model selection flow: a grid of components x covariance types, best by BIC, or the number
of components from one variational fit (``method="variational"``: a BayesianGaussianMixture
with ``max(n_components)`` components; those with a weight below ``weight_threshold`` are
reported as unused).

The candidates (and their ``n_init`` restarts) are fitted together by
:func:`emflow.estimators.selection.select_gaussian_mixture`: one read of a chunk serves the E-step of
every candidate still running. The flow reports the passes and bytes read against fitting
the candidates one after another, saves the best model, and publishes the comparison.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
from typing import Annotated, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

import emflow.storage.data
from emflow.errors import ConfigError
from emflow.estimators.selection import (SelectionResult, VariationalSelection, select_by_variational,
                                        select_gaussian_mixture)

from ._common import (
    PersistParam,
    compute,
    dask_performance_report,
    output_locked,
    publish_dashboard_link,
    resolve_scheduler,
    retry_if_transient,
)

__all__ = ["select_flow", "validate_inputs"]


@task(name="validate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def validate_inputs(data: str, sample_weight: str | None, max_components: int) -> dict:
    """Open the data and the weights before any work (metadata only): a missing path is a
    DataNotFoundError naming it; too few rows for the largest candidate, a DataError."""
    rows = emflow.storage.data.open_rows(data, sample_weight, min_rows=max_components)
    get_run_logger().info("data %s: %d rows x %d features (%s)%s", data, rows.n_rows, rows.n_features, rows.dtype,
                          f", weights {sample_weight}" if sample_weight else "")
    return {"n_rows": int(rows.n_rows), "n_features": int(rows.n_features)}

CovarianceType = Literal["full", "tied", "diag", "spherical"]


@task(name="fit-candidates", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def fit_candidates(data: str, n_components: list[int], covariance_types: list[str], n_init: int, tol: float,
                   reg_covar: float, max_iter: int, random_state: int | None, sample_weight: str | None,
                   scheduler: str | None, persist) -> SelectionResult:
    """All candidates in lockstep: one pass per step serves every candidate still running."""
    logger = get_run_logger()

    def log_pass(info):
        logger.info("pass %d: %d unit(s) still running; %s", info["pass"], info["active"],
                    ", ".join(f"K={k} {ct} r{r} it{i} ll={ll:.6g}" for k, ct, r, i, ll in info["units"]))

    res = select_gaussian_mixture(
        data, n_components, covariance_types, sample_weight=sample_weight, n_init=n_init, tol=tol,
        reg_covar=reg_covar, max_iter=max_iter, random_state=random_state, scheduler=scheduler,
        persist=persist, callbacks=[log_pass],
    )
    io = res.io
    logger.info("read %d passes (%.3g MB) instead of %d (%.3g MB) fitting one candidate after another: "
                "%.0f%% less", io["passes_shared"], io["bytes_shared"] / 1e6, io["passes_sequential"],
                io["bytes_sequential"] / 1e6, 100 * io["saved_fraction"])
    return res


@task(name="fit-variational", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def fit_variational(data: str, max_components: int, covariance_type: str, weight_threshold: float, n_init: int,
                    tol: float, reg_covar: float, max_iter: int, random_state: int | None, sample_weight: str | None,
                    scheduler: str | None, persist) -> VariationalSelection:
    """One BayesianGaussianMixture with ``max_components`` components; unused ones reported."""
    res = select_by_variational(data, max_components, covariance_type, weight_threshold=weight_threshold,
                                sample_weight=sample_weight, n_init=n_init, tol=tol, reg_covar=reg_covar,
                                max_iter=max_iter, random_state=random_state, scheduler=scheduler, persist=persist)
    get_run_logger().info("%d of %d components used (weight >= %g); lower bound %.10g", res.n_components,
                          max_components, weight_threshold, res.model.lower_bound_)
    return res


def _publish_variational(res: VariationalSelection, path: str) -> dict:
    m = res.model
    create_table_artifact(res.table, key="model-selection",
                          description="Components of the variational fit: expected weight, used or not")
    create_markdown_artifact("\n".join([
        f"# Model selection (variational): {res.n_components} of {m.n_components} components used",
        "", f"Weight threshold {m.weight_threshold:g}, {m.covariance_type} covariance, lower bound "
        f"{m.lower_bound_:.10g} after {m.n_iter_} iterations; saved to `{path}`.", "",
        "| component | weight | used |", "|---|---|---|",
        *[f"| {r['component']} | {r['weight']:.4g} | {r['used']} |" for r in res.table],
    ]), key="selection-summary")
    best = {"n_components": res.n_components, "covariance_type": m.covariance_type,
            "max_components": int(m.n_components), "lower_bound": float(m.lower_bound_)}
    return {"model": path, "best": best, "table": res.table}


@task(name="save-best", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def save_best(res: SelectionResult, out: str) -> str:
    return res.best_model.save(out, overwrite=True)  # the flow re-saving its own model


@flow(name="emflow-select", log_prints=True)
def select_flow(
    data: str,
    out: str,
    n_components: Annotated[list[int], Field(min_length=1, description="component counts to try")] = [1, 2, 3, 4, 5],  # noqa: B006
    covariance_types: Annotated[list[CovarianceType], Field(min_length=1)] = ["full", "diag"],  # noqa: B006
    n_init: Annotated[int, Field(ge=1)] = 1,
    tol: Annotated[float, Field(ge=0)] = 1e-3,
    reg_covar: Annotated[float, Field(ge=0)] = 1e-6,
    max_iter: Annotated[int, Field(ge=1)] = 100,
    random_state: int | None = 0,
    sample_weight: str | None = None,
    scheduler: str | None = None,
    persist: PersistParam = "auto",
    method: Literal["bic", "variational"] = "bic",
    weight_threshold: Annotated[float, Field(ge=0)] = 0.01,
) -> dict:
    """Fit the grid, save the model with the lowest BIC to ``out``; returns the comparison
    (``table``: the candidates ranked by BIC, lowest first, each with ``rank``, ``grid_index``
    and ``chosen``). With ``method="variational"`` (one covariance type): one
    BayesianGaussianMixture with ``max(n_components)`` components is fitted and saved; ``best``
    holds the components it uses (weight >= ``weight_threshold``), ``table`` one row per component.

    Artifacts: ``model-selection`` (table, one row per candidate, ranked by BIC),
    ``selection-summary`` (markdown: the choice and the I/O saved), ``dask-dashboard`` (link,
    with a cluster) and ``dask-performance-report``. Holds ``OUT.lock`` for the run.
    """
    if method == "variational" and len(covariance_types) != 1:
        raise ConfigError("method='variational' fits one covariance type: give covariance_types=[one of 'full', "
                          f"'tied', 'diag', 'spherical'], got {covariance_types!r}.")
    scheduler = resolve_scheduler(scheduler)
    with output_locked(out, "emflow-select"), compute(scheduler) as (sched, dashboard), \
            dask_performance_report(sched, dashboard, out):
        publish_dashboard_link(dashboard, scheduler)
        validate_inputs(data, sample_weight, max(int(k) for k in n_components))
        if method == "variational":
            res = fit_variational(data, max(int(k) for k in n_components), covariance_types[0], weight_threshold,
                                  n_init, tol, reg_covar, max_iter, random_state, sample_weight, sched, persist)
        else:
            res = fit_candidates(data, [int(k) for k in n_components], list(covariance_types), n_init, tol,
                                 reg_covar, max_iter, random_state, sample_weight, sched, persist)
        path = save_best(res, out)
    if method == "variational":
        return _publish_variational(res, path)
    ranked = res.ranked_table()
    create_table_artifact(ranked, key="model-selection",
                          description="Candidates ranked by BIC, lowest (best) first; equal BICs in grid order")
    b, io = res.table[res.best], res.io
    md = "\n".join([
        f"# Model selection: {b['n_components']} components, {b['covariance_type']} covariance",
        "", f"Lowest BIC {b['bic']:.8g} among {len(res.table)} candidates; saved to `{path}`.", "",
        "| candidate | BIC | AIC | converged | iterations |", "|---|---|---|---|---|",
        *[f"| {'**' if i == res.best else ''}K={r['n_components']} {r['covariance_type']}"
          f"{'**' if i == res.best else ''} | {r['bic']:.8g} | {r['aic']:.8g} | {r['converged']} | {r['n_iter']} |"
          for i, r in ((i, res.table[i]) for i in res.ranking)],
        "", "## Passes over the data",
        f"Shared passes: **{io['passes_shared']}** ({io['bytes_shared'] / 1e6:.3g} MB); one candidate after "
        f"another: {io['passes_sequential']} ({io['bytes_sequential'] / 1e6:.3g} MB): "
        f"**{100 * io['saved_fraction']:.0f}% less read** for {io['units']} fits (candidates x restarts).",
    ])
    create_markdown_artifact(md, key="selection-summary")
    return {"model": path, "best": b, "table": ranked, "io": io}


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(select_flow, module="flows.model_selection"))
