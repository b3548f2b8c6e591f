"""The fit flow: validate -> initialise -> EM iterations (checkpointed) -> save -> evaluate.

Run it as a plain function (``fit_flow("data.zarr", "model.zarr", n_components=3)``), from
the CLI (``emflow demo``), or as a deployment (deploy/prefect.yaml). Every stage is one
coarse Prefect task around an emflow library call; the per-partition work stays in Dask.

Killed and started again with the same arguments, the flow resumes from the checkpoint
next to ``out`` (``OUT.checkpoint.npz``) and ends with the same model as an uninterrupted
run. The EM task is retried (resuming from its checkpoint) when a cluster is lost.

A run holds the lock ``OUT.lock`` (:mod:`emflow.storage.locking`) from start to end: a second run
writing the same ``out`` fails at once with a LockHeldError naming the first (pid, host,
since, flow run id); a lock left by a dead run is taken over with a warning.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
import math
from typing import Annotated, Any, Literal

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

import emflow
import emflow.storage.data
from emflow import GaussianMixture
from emflow.storage.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    checkpoint_path,
    config_hash,
    data_fingerprint,
    gmm_trajectory_config,
    restore_fitted,
    write_checkpoint,
)
from emflow.models.gmm import GMMParams, n_parameters

from ._common import (
    IterationMonitor,
    check_same_data,
    compute,
    convergence_verdict,
    dask_performance_report,
    load_checkpoint_logged,
    output_locked,
    publish_dashboard_link,
    resolve_scheduler,
    retry_if_transient,
    seconds_row,
    summary_markdown as _summary,
)

__all__ = ["fit_flow", "validate", "initialise", "em_iterations", "save", "evaluate"]

CovarianceType = Literal["full", "tied", "diag", "spherical"]
InitParams = Literal["kmeans", "k-means++", "random_from_data", "random"]


def _model(cfg: dict[str, Any], scheduler, persist="auto", **overrides) -> GaussianMixture:
    return GaussianMixture(**{**cfg, **overrides}, scheduler=scheduler, persist=persist)


def check_heldout_rows(data: str, heldout: str | None) -> int | None:
    """Open the held-out rows (metadata only): a DataNotFoundError when missing, a
    FeatureMismatchError when their features differ from the data's. Returns their features."""
    if not heldout:
        return None
    held = emflow.storage.data.open_rows(heldout)
    train = emflow.storage.data.open_rows(data)
    if held.n_features != train.n_features:
        raise emflow.FeatureMismatchError(
            f"The held-out data {heldout!r} have {held.n_features} features, the training data {data!r} "
            f"{train.n_features}. Pass a held-out set with the same features (or none)."
        )
    return held.n_features


def restart_seed(random_state: int | None, init: int) -> int | None:
    """Seed of restart ``init``: the flow's seed itself for the first, a derived one after."""
    if random_state is None or init == 0:
        return random_state
    return int(np.random.SeedSequence([random_state, init]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _load_logged(ckpt_path: str, fingerprint: str, chash: str, cfg: dict) -> Checkpoint | None:
    """load_resumable, with its warnings also sent to the run log (visible in the dashboard)."""
    return load_checkpoint_logged(ckpt_path, fingerprint, chash, tol=cfg["tol"], max_iter=cfg["max_iter"])


@task(name="validate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def validate(data: str, sample_weight: str | None, cfg: dict[str, Any], scheduler: str | None,
             heldout: str | None = None) -> dict:
    """Check every input before any work: the held-out set opens and has the data's features
    (metadata only), then the data and weights (shape, dtype, every value finite) are
    checked and fingerprinted in one pass. A missing path is a DataNotFoundError naming it."""
    check_heldout_rows(data, heldout)
    info = data_fingerprint(data, sample_weight, scheduler=scheduler, min_rows=cfg["n_components"])
    get_run_logger().info(
        "data %s: %d rows x %d features (%s), %d partitions, fingerprint %s; compute: %s",
        info["source"], info["n_samples"], info["n_features"], info["dtype"], info["partitions"],
        info["fingerprint"], info["engine"],
    )
    return info


@task(name="initialise", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def initialise(data: str, sample_weight: str | None, cfg: dict[str, Any], scheduler: str | None,
               ckpt_path: str, fingerprint: str, chash: str, resume: bool = True, init: int = 0) -> dict:
    """Initial parameters (k-means on the cluster by default), written as an iteration-0 checkpoint.

    With ``resume`` and a usable checkpoint already there, nothing is computed.
    """
    logger = get_run_logger()
    if resume:
        ck = _load_logged(ckpt_path, fingerprint, chash, cfg)
        if ck is not None:
            logger.info("resuming from checkpoint %s at iteration %d%s", ckpt_path, ck.iteration,
                        " (already finished)" if ck.converged or ck.iteration >= cfg["max_iter"] else "")
            return {"resumed": True, "iteration": ck.iteration}
    gm = _model(cfg, scheduler, persist=False, max_iter=0).fit(data, sample_weight=sample_weight)
    params = GMMParams(gm.weights_, gm.means_, gm.covariances_, gm.precisions_cholesky_, gm.covariance_type)
    write_checkpoint(ckpt_path, Checkpoint(params, [], [], False, fingerprint, chash, init))
    logger.info("initialised %d components (%s) with init_params=%r; weights %s", cfg["n_components"],
                cfg["covariance_type"], cfg["init_params"], np.round(gm.weights_, 4).tolist())
    return {"resumed": False, "iteration": 0}


@task(name="em-iterations", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def em_iterations(data: str, sample_weight: str | None, cfg: dict[str, Any], scheduler: str | None,
                  persist: Any, ckpt_path: str, info: dict, chash: str, progress_id=None,
                  init: int = 0, n_init: int = 1) -> GaussianMixture:
    """EM from the latest checkpoint to convergence, checkpointing every iteration.

    A retry (or a rerun of the flow) continues from the last checkpoint written.
    """
    logger = get_run_logger()
    ck = _load_logged(ckpt_path, info["fingerprint"], chash, cfg)
    if ck is None:
        raise emflow.FitFailedError(
            f"The checkpoint {ckpt_path!r} written by the initialise task is missing or unusable. "
            "Run the flow again; it will initialise afresh."
        )
    gm = _model(cfg, scheduler, persist)
    monitor = IterationMonitor(max_iter=cfg["max_iter"], progress_id=progress_id, history=ck.history,
                               seconds=ck.seconds, init=init, n_init=n_init)
    if ck.converged or ck.iteration >= cfg["max_iter"]:
        logger.info("checkpoint at iteration %d is final; restoring the fitted model without recomputing",
                    ck.iteration)
        restore_fitted(gm, ck, {k: info[k] for k in ("source", "n_samples", "n_features", "dtype")})
    else:
        writer = CheckpointWriter(ckpt_path, fingerprint=info["fingerprint"], config_hash=chash,
                                  history=ck.history, seconds=ck.seconds, init=init)
        gm.fit(data, sample_weight=sample_weight, callbacks=[writer, monitor], initial_params=ck.params,
               history=ck.history)
        check_same_data(data, gm.fit_info_.get("fingerprint"), info["fingerprint"], ckpt_path)
        gm.fit_info_["seconds_per_iteration"] = list(writer.seconds)
        gm.fit_info_["resumed_from_iteration"] = ck.iteration
    monitor.progress((init + 1) / n_init)
    monitor.publish_table()
    return gm


@task(name="save-model", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def save(model: GaussianMixture, out: str) -> str:
    """Write the model as a Zarr group (atomically: a crash leaves the old model or the new one)."""
    path = model.save(out, overwrite=True)  # the flow re-saving its own model (a scheduled re-run)
    get_run_logger().info("saved model to %s", path)
    return path


@task(name="evaluate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def evaluate(model_path: str, data: str, heldout: str | None, scheduler: str | None) -> dict:
    """BIC and AIC on the training data (one pass) and the held-out mean log-likelihood."""
    gm = emflow.load(model_path)
    gm.scheduler = scheduler
    d = gm.means_.shape[1]
    n = emflow.storage.data.open_rows(data).n_rows  # metadata only
    mean_ll = float(gm.score(data))  # one pass; BIC and AIC both follow from it
    total = mean_ll * n
    p = n_parameters(gm.n_components, d, gm.covariance_type)
    out = {"log_likelihood": total, "mean_log_likelihood": mean_ll, "n_samples": int(n),
           "n_parameters": int(p), "bic": -2 * total + p * math.log(n), "aic": -2 * total + 2 * p}
    if heldout:
        out["heldout_mean_log_likelihood"] = float(gm.score(heldout))
    get_run_logger().info("BIC %.6g, AIC %.6g%s", out["bic"], out["aic"],
                          f", held-out mean log-likelihood {out['heldout_mean_log_likelihood']:.6g}"
                          if heldout else "")
    return out


def summary_markdown(gm: GaussianMixture, metrics: dict, info: dict, model_path: str, tol: float,
                     restarts: list[float] | None = None) -> str:
    """The end-of-run markdown: verdict, metrics, data, timing, components and the convergence plot."""
    facts = [
        ("model", f"`{model_path}`"),
        ("data", f"`{info['source']}`: {info['n_samples']} rows x {info['n_features']} features ({info['dtype']})"),
        ("data fingerprint", f"`{info['fingerprint']}`"),
        ("final mean log-likelihood", f"{gm.lower_bound_:.10g}"),
        ("BIC", f"{metrics['bic']:.8g}"),
        ("AIC", f"{metrics['aic']:.8g}"),
    ]
    if "heldout_mean_log_likelihood" in metrics:
        facts.append(("held-out mean log-likelihood", f"{metrics['heldout_mean_log_likelihood']:.8g}"))
    facts += seconds_row(gm.fit_info_.get("seconds_per_iteration", []))
    if restarts and len(restarts) > 1:
        facts.append(("restarts (final mean log-likelihood)", ", ".join(f"{v:.8g}" for v in restarts)))
    facts.append(("compute", str(gm.fit_info_.get("engine", info.get("engine", "?")))))
    comps = ["| component | weight | mean |", "|---|---|---|"]
    for k in np.argsort(-gm.weights_):
        mean = ", ".join(f"{v:.4g}" for v in gm.means_[k][:8]) + (", ..." if gm.means_.shape[1] > 8 else "")
        comps.append(f"| {int(k)} | {gm.weights_[k]:.4f} | [{mean}] |")
    return _summary(f"Gaussian mixture: {gm.n_components} components, {gm.covariance_type} covariance",
                    convergence_verdict(gm.converged_, gm.n_iter_, gm.history_, f"tol {tol:g}"), facts,
                    gm.history_, sections=[("Components", comps)])


@flow(name="emflow-fit", log_prints=True)
def fit_flow(
    data: str,
    out: str,
    n_components: Annotated[int, Field(ge=1, description="number of mixture components")] = 3,
    covariance_type: CovarianceType = "full",
    tol: Annotated[float, Field(ge=0, description="stop when the mean log-likelihood changes less")] = 1e-3,
    reg_covar: Annotated[float, Field(ge=0)] = 1e-6,
    max_iter: Annotated[int, Field(ge=1)] = 100,
    n_init: Annotated[int, Field(ge=1, description="restarts; the best log-likelihood is kept")] = 1,
    init_params: InitParams = "kmeans",
    random_state: int | None = 0,
    sample_weight: Annotated[str | None, Field(description="Zarr path, or a name beside the data")] = None,
    heldout: Annotated[str | None, Field(description="held-out Zarr dataset to score")] = None,
    scheduler: Annotated[str | None, Field(
        description="None: $EMFLOW_DASK_SCHEDULER or the Prefect variable emflow_dask_scheduler, else "
                    "threads; 'local': a LocalCluster for this run; or a scheduler address")] = None,
    persist: bool | Literal["auto"] = "auto",
    resume: bool = True,
) -> str:
    """Fit a Gaussian mixture to a Zarr dataset and save it; returns the model path.

    Artifacts: ``dask-dashboard`` (link, when a Dask cluster is used; live only while it
    runs), ``dask-performance-report`` (markdown: where ``OUT.dask-report.html`` is), ``fit-progress``
    (progress), ``fit-log-likelihood`` (table, per iteration), ``fit-summary`` (markdown
    with the convergence plot).
    """
    cfg = dict(n_components=n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
               max_iter=max_iter, init_params=init_params, random_state=random_state)
    scheduler = resolve_scheduler(scheduler)
    # one run at a time writes `out` (its checkpoints and the model): a second fails here
    with output_locked(out, "emflow-fit"), compute(scheduler) as (sched, dashboard), \
            dask_performance_report(sched, dashboard, out):
        publish_dashboard_link(dashboard, scheduler)
        info = validate(data, sample_weight, cfg, sched, heldout)
        progress_id = create_progress_artifact(0.0, key="fit-progress", description="EM iterations done")
        fitted: list[GaussianMixture] = []
        for i in range(n_init):
            rcfg = {**cfg, "random_state": restart_seed(random_state, i)}
            chash = config_hash(gmm_trajectory_config(_model(rcfg, None), sample_weight))
            ck = checkpoint_path(out, i)
            initialise(data, sample_weight, rcfg, sched, ck, info["fingerprint"], chash, resume, i)
            fitted.append(em_iterations(data, sample_weight, rcfg, sched, persist, ck, info, chash,
                                        progress_id, i, n_init))
        best = fitted[0]
        for gm in fitted[1:]:
            if gm.lower_bound_ > best.lower_bound_:
                best = gm
        path = save(best, out)
        metrics = evaluate(path, data, heldout, sched)
    create_markdown_artifact(
        summary_markdown(best, metrics, info, path, tol, [g.lower_bound_ for g in fitted]),
        key="fit-summary", description="Fitted model, convergence and criteria",
    )
    return path


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(fit_flow, module="flows.fit"))
