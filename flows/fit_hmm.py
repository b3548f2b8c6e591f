"""The HMM fit flow: Baum-Welch on a Zarr group of sequences, Gaussian or categorical emissions.

``hmm_fit_flow("seqs.zarr", "hmm.zarr", n_components=3)`` or as a deployment
(deploy/prefect.yaml). Stages, checkpoints and artifacts as every family's fit
(flows/_family.py), ``n_init`` restarts included: ``hmm-fit-progress``,
``hmm-fit-log-likelihood`` (mean log-likelihood per step, per iteration), ``hmm-fit-summary``
(with the convergence plot and the learned transition matrix), ``dask-dashboard``.

``tol`` is hmmlearn's: on the *total* log-likelihood of all sequences.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
from typing import Annotated, Literal

import numpy as np
from prefect import flow
from pydantic import Field

from emflow import CategoricalHMM, GaussianHMM
from emflow.estimators.hmm import ConvergenceMonitor
from emflow.storage.sequences import open_sequences

from ._common import PersistParam, RestartsParam, SchedulerParam
from ._family import AccelerateParam, FamilyAdapter, run_family_fit

__all__ = ["hmm_fit_flow", "HMMAdapter"]

Emission = Literal["gaussian", "categorical"]
CovarianceType = Literal["diag", "full", "spherical", "tied"]


def _matrix(a: np.ndarray, digits: int = 4, limit: int = 12) -> list[str]:
    k = min(a.shape[1], limit)
    rows = ["| from \\ to | " + " | ".join(str(j) for j in range(k)) + (" | ..." if a.shape[1] > k else "") + " |",
            "|---" * (k + 1 + (a.shape[1] > k)) + "|"]
    for i, r in enumerate(a[:limit]):
        rows.append(f"| {i} | " + " | ".join(f"{v:.{digits}f}" for v in r[:k]) + (" | ..." if a.shape[1] > k else "")
                    + " |")
    return rows


class HMMAdapter(FamilyAdapter):
    """Gaussian or categorical HMMs (``cfg["emission"]`` picks the estimator)."""

    prefix = "hmm"
    record = ("log_prob",)  # the total log-likelihood, which monitor_.history shows
    fit_args = (None,)  # lengths: a Zarr group of sequences carries its own offsets

    def open(self, data):
        return open_sequences(data)

    def estimator_class(self, cfg):
        return GaussianHMM if cfg["emission"] == "gaussian" else CategoricalHMM

    def estimator(self, cfg, scheduler, persist="auto", **overrides):
        kwargs = {k: v for k, v in cfg.items() if k != "emission"}
        return self.estimator_class(cfg)(**kwargs, **overrides, scheduler=scheduler, persist=persist)

    def tol(self, cfg, info):
        return cfg["tol"] / info["n_rows"]  # exactly what GaussianHMM.fit hands run_em

    def tol_text(self, cfg):
        return f"tol {cfg['tol']:g} on the total log-likelihood"

    def start_text(self, cfg, params):
        return f"{cfg['n_components']} states ({cfg['emission']} emissions); start probabilities " \
               f"{np.round(params.startprob, 4).tolist()}"

    def after_fit(self, est, ck, records):
        # the estimator's monitor_ holds the totals of the iterations this run did; the
        # checkpoint kept those before it
        if "log_prob" in records:
            est.monitor_ = ConvergenceMonitor(est.tol, est.n_iter, records["log_prob"], est.converged_)

    def restore(self, est, ck, info):
        super().restore(est, ck, info)
        est.fit_info_.update(n_steps=info["n_rows"])
        est.monitor_ = ConvergenceMonitor(est.tol, est.n_iter, (ck.extra.get("records") or {}).get("log_prob", []),
                                          est.converged_)

    def evaluate(self, model, data, heldout):
        out = {"bic": float(model.bic(data))}
        if heldout:
            total = float(model.score(heldout))
            out["heldout_log_likelihood"] = total
            out["heldout_log_likelihood_per_step"] = total / open_sequences(heldout).n_rows
        return out

    def title(self, est):
        if isinstance(est, GaussianHMM):
            return f"Gaussian HMM: {est.n_components} states, {est.covariance_type} covariance"
        return f"Categorical HMM: {est.n_components} states, {est.emissionprob_.shape[1]} symbols"

    def facts(self, est, metrics):
        out = [("final total log-likelihood", f"{est.monitor_.history[-1]:.10g}")] if est.monitor_.history else []
        out.append(("BIC", f"{metrics['bic']:.8g}"))
        if "heldout_log_likelihood" in metrics:
            out.append(("held-out log-likelihood (total, per step)",
                        f"{metrics['heldout_log_likelihood']:.8g}, {metrics['heldout_log_likelihood_per_step']:.8g}"))
        return out

    def sections(self, est):
        order = np.argsort(-est.startprob_)
        states = ["| state | start probability | " + ("mean |" if isinstance(est, GaussianHMM) else "most likely symbols |"),
                  "|---|---|---|"]
        for k in order:
            if isinstance(est, GaussianHMM):
                m = est.means_[k]
                what = "[" + ", ".join(f"{v:.4g}" for v in m[:8]) + (", ..." if len(m) > 8 else "") + "]"
            else:
                top = np.argsort(-est.emissionprob_[k], kind="stable")[:5]
                what = ", ".join(f"{j} ({est.emissionprob_[k, j]:.3f})" for j in top)
            states.append(f"| {int(k)} | {est.startprob_[k]:.4f} | {what} |")
        return [("States", states), ("Transition matrix", _matrix(est.transmat_))]


@flow(name="emflow-fit-hmm", log_prints=True)
def hmm_fit_flow(
    data: Annotated[str, Field(description="Zarr group of sequences (values + offsets)")],
    out: Annotated[str, Field(description="where the fitted model is saved (a Zarr group)")],
    emission: Emission = "gaussian",
    n_components: Annotated[int, Field(ge=1, description="number of hidden states")] = 3,
    covariance_type: Annotated[CovarianceType, Field(description="Gaussian emissions only")] = "diag",
    n_features: Annotated[int | None, Field(ge=1, description=(
        "categorical emissions only: number of symbols (None: largest symbol in the data + 1)"))] = None,
    n_iter: Annotated[int, Field(ge=1, description="maximum EM iterations")] = 100,
    tol: Annotated[float, Field(ge=0, description="stop when the total log-likelihood gains less")] = 1e-2,
    min_covar: Annotated[float, Field(ge=0, description="Gaussian emissions only")] = 1e-3,
    params: Annotated[str, Field(description="letters of what is learned: s t, m c (Gaussian) or e (categorical)")]
    = "",
    init_params: Annotated[str, Field(description="letters of what is initialised (as params)")] = "",
    random_state: int | None = 0,
    n_init: RestartsParam = 1,
    heldout: Annotated[str | None, Field(description="held-out sequences (Zarr) to score")] = None,
    scheduler: SchedulerParam = None,
    persist: PersistParam = "auto",
    resume: bool = True,
    accelerate: AccelerateParam = None,
) -> str:
    """Fit a hidden Markov model to the sequences in a Zarr group and save it; returns the model path.

    ``params`` / ``init_params`` left empty mean all of the emission's letters (``"stmc"``
    for Gaussian, ``"ste"`` for categorical), as hmmlearn's defaults.
    """
    letters = "stmc" if emission == "gaussian" else "ste"
    cfg = dict(emission=emission, n_components=n_components, n_iter=n_iter, tol=tol, random_state=random_state,
               params=params or letters, init_params=init_params or letters)
    if emission == "gaussian":
        cfg.update(covariance_type=covariance_type, min_covar=min_covar)
    else:
        cfg.update(n_features=n_features)
    return run_family_fit(HMMAdapter(), cfg, data, out, n_init=n_init,
                          heldout=heldout, scheduler=scheduler, persist=persist,
                          resume=resume, accelerate=accelerate)


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(hmm_fit_flow, module="flows.fit_hmm"))
