"""The Gaussian mixture's fit flow: validate -> (initialise -> EM iterations) per restart -> save -> evaluate.

Run it as a plain function (``fit_flow("data.zarr", "model.zarr", n_components=3)``), from
the shell (``python -m flows.fit ...``), in the demo (``python -m flows.demo``), or as a
deployment (deploy/prefect.yaml). The stages, checkpoints, lock and monitoring are every
family's (flows/_family.py); this file says what is the mixture's: its settings, its weights,
its criteria (BIC, AIC, held-out mean log-likelihood) and its summary.

Killed and started again with the same arguments, the flow resumes from the checkpoint
next to ``out`` (``OUT.checkpoint.npz``; restart R > 0: ``OUT.initR.checkpoint.npz``) and
ends with the same model as an uninterrupted run. The EM task is retried (resuming from its
checkpoint) when a cluster is lost. ``n_init=R`` with ``random_state=s`` gives the model of
``GaussianMixture(n_init=R, random_state=s).fit(data)``.

A run holds the lock ``OUT.lock`` (:mod:`emflow.storage.locking`) from start to end: a second run
writing the same ``out`` fails at once with a LockHeldError naming the first (pid, host,
since, flow run id); a lock left by a dead run is taken over with a warning.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
import math
from typing import Annotated, Literal

import numpy as np
from prefect import flow
from pydantic import Field

import emflow
import emflow.storage.data
from emflow import GaussianMixture
from emflow.storage.checkpoint import config_hash, data_fingerprint, gmm_trajectory_config

from ._common import PersistParam, RestartsParam, SchedulerParam
from ._family import AccelerateParam, FamilyAdapter, run_family_fit

__all__ = ["fit_flow", "GMMAdapter", "check_heldout_rows"]

CovarianceType = Literal["full", "tied", "diag", "spherical"]
InitParams = Literal["kmeans", "k-means++", "random_from_data", "random"]


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


class GMMAdapter(FamilyAdapter):
    """Gaussian mixtures on rows, with optional row weights (``sample_weight``)."""

    estimator_cls = GaussianMixture
    label = "mean log-likelihood"
    units = "rows"

    def __init__(self, sample_weight: str | None = None):
        self.sample_weight = sample_weight
        self.fit_args = (sample_weight,)

    def open(self, data):
        return emflow.storage.data.open_rows(data)

    def check_heldout(self, data, heldout):
        check_heldout_rows(data, heldout)

    def fingerprint(self, data, cfg, scheduler):
        # the rows and the weights, checked in the pass that fingerprints them (as fit does)
        info = data_fingerprint(data, self.sample_weight, scheduler=scheduler, min_rows=cfg["n_components"])
        return {**info, "n_rows": info["n_samples"]}

    def trajectory_hash(self, cfg, init):
        # restart 0's is the library's own (a checkpoint written by GaussianMixture.fit resumes here)
        base = gmm_trajectory_config(GaussianMixture(**cfg), self.sample_weight)
        if cfg.get("accelerate") not in (None, "none"):
            base["accelerate"] = cfg["accelerate"]
        return config_hash(base if init == 0 else {**base, "restart": int(init)})

    def start_text(self, cfg, params):
        return (f"{cfg['n_components']} components ({cfg['covariance_type']}) with "
                f"init_params={cfg['init_params']!r}; weights {np.round(params.weights, 4).tolist()}")

    def fit(self, est, data, callbacks, params, history):
        return est.fit(data, sample_weight=self.sample_weight, callbacks=callbacks, initial_params=params,
                       history=history)

    def evaluate(self, model, data, heldout):
        """BIC and AIC on the training data (one pass) and the held-out mean log-likelihood."""
        n = emflow.storage.data.open_rows(data).n_rows  # metadata only
        mean_ll = float(model.score(data))  # one pass; BIC and AIC both follow from it
        total, p = mean_ll * n, model._n_parameters()
        out = {"log_likelihood": total, "mean_log_likelihood": mean_ll, "n_samples": int(n),
               "n_parameters": int(p), "bic": -2 * total + p * math.log(n), "aic": -2 * total + 2 * p}
        if heldout:
            out["heldout_mean_log_likelihood"] = float(model.score(heldout))
        return out

    def title(self, est):
        return f"Gaussian mixture: {est.n_components} components, {est.covariance_type} covariance"

    def facts(self, est, metrics):
        out = [("BIC", f"{metrics['bic']:.8g}"), ("AIC", f"{metrics['aic']:.8g}")]
        if "heldout_mean_log_likelihood" in metrics:
            out.append(("held-out mean log-likelihood", f"{metrics['heldout_mean_log_likelihood']:.8g}"))
        return out

    def sections(self, est):
        comps = ["| component | weight | mean |", "|---|---|---|"]
        for k in np.argsort(-est.weights_):
            mean = ", ".join(f"{v:.4g}" for v in est.means_[k][:8]) + (", ..." if est.means_.shape[1] > 8 else "")
            comps.append(f"| {int(k)} | {est.weights_[k]:.4f} | [{mean}] |")
        return [("Components", comps)]


@flow(name="emflow-fit", log_prints=True)
def fit_flow(
    data: str,
    out: str,
    n_components: Annotated[int, Field(ge=1, description="number of mixture components")] = 3,
    covariance_type: CovarianceType = "full",
    tol: Annotated[float, Field(ge=0, description="stop when the mean log-likelihood changes less")] = 1e-3,
    reg_covar: Annotated[float, Field(ge=0)] = 1e-6,
    max_iter: Annotated[int, Field(ge=1)] = 100,
    n_init: RestartsParam = 1,
    init_params: InitParams = "kmeans",
    random_state: int | None = 0,
    sample_weight: Annotated[str | None, Field(description="Zarr path, or a name beside the data")] = None,
    heldout: Annotated[str | None, Field(description="held-out Zarr dataset to score")] = None,
    scheduler: SchedulerParam = None,
    persist: PersistParam = "auto",
    resume: bool = True,
    accelerate: AccelerateParam = None,
) -> str:
    """Fit a Gaussian mixture to a Zarr dataset and save it; returns the model path.

    Artifacts: ``dask-dashboard`` (link, when a Dask cluster is used; live only while it
    runs), ``dask-performance-report`` (markdown: where ``OUT.dask-report.html`` is), ``fit-progress``
    (progress), ``fit-log-likelihood`` (table, per iteration), ``fit-summary`` (markdown
    with the convergence plot).
    """
    cfg = dict(n_components=n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
               max_iter=max_iter, init_params=init_params, random_state=random_state)
    return run_family_fit(GMMAdapter(sample_weight), cfg, data, out, n_init=n_init, heldout=heldout,
                          scheduler=scheduler, persist=persist, resume=resume, accelerate=accelerate)


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(fit_flow, module="flows.fit"))
