"""The linear-Gaussian state-space model (Kalman filter/smoother EM) fit flow.

``lgssm_fit_flow("seqs.zarr", "ssm.zarr", state_dim=2)`` or as a deployment
(deploy/prefect.yaml). Stages, checkpoints and artifacts as every family's fit
(flows/_family.py): ``lgssm-fit-progress``, ``lgssm-fit-log-likelihood`` (mean
log-likelihood per step, per iteration), ``lgssm-fit-summary`` (with the convergence plot
and the learned matrices), ``dask-dashboard``.

The parameters not in ``em_vars`` are held at their starting values: the library's
defaults (identity matrices, zero mean), or those of a saved model (``initial_model``).
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
from typing import Annotated, Literal

import numpy as np
from prefect import flow
from pydantic import Field

import emflow
from emflow import LinearGaussianSSM
from emflow.storage.sequences import open_sequences

from ._common import PersistParam, RestartsParam, SchedulerParam
from ._family import AccelerateParam, FamilyAdapter, run_family_fit

__all__ = ["lgssm_fit_flow", "LGSSMAdapter"]

Param = Literal["transition_matrix", "observation_matrix", "transition_covariance", "observation_covariance",
                "initial_state_mean", "initial_state_covariance"]
CovarianceType = Literal["full", "diag"]
_INIT = ("transition_matrix", "observation_matrix", "transition_covariance", "observation_covariance",
         "initial_state_mean", "initial_state_covariance")


def _fmt(a: np.ndarray, limit: int = 6) -> str:
    a = np.atleast_2d(a)
    rows = ["[" + ", ".join(f"{v:.4g}" for v in r[:limit]) + (", ..." if len(r) > limit else "") + "]"
            for r in a[:limit]]
    return "[" + ", ".join(rows) + (", ..." if len(a) > limit else "") + "]"


class LGSSMAdapter(FamilyAdapter):
    prefix = "lgssm"
    estimator_cls = LinearGaussianSSM

    def open(self, data):
        return open_sequences(data, allow_nan=True)  # NaN: a missing observation

    def start_text(self, cfg, params):
        return f"state dimension {cfg['state_dim']}, learning {cfg['em_vars']}"

    def restore(self, est, ck, info):
        super().restore(est, ck, info)
        est.fit_info_["n_steps"] = info["n_rows"]

    def evaluate(self, model, data, heldout):
        if not heldout:
            return {}
        total = float(model.score(heldout))
        return {"heldout_log_likelihood": total,
                "heldout_log_likelihood_per_step": total / open_sequences(heldout, allow_nan=True).n_rows}

    def title(self, est):
        return (f"Linear-Gaussian state-space model: state dimension {est.state_dim}, "
                f"{est.observation_matrix_.shape[0]} observed features")

    def facts(self, est, metrics):
        learned = est.em_vars if isinstance(est.em_vars, str) else ", ".join(est.em_vars)
        out = [("learned (em_vars)", learned)]
        if "heldout_log_likelihood" in metrics:
            out.append(("held-out log-likelihood (total, per step)",
                        f"{metrics['heldout_log_likelihood']:.8g}, {metrics['heldout_log_likelihood_per_step']:.8g}"))
        repaired = est.fit_info_.get("repaired_covariances")
        if repaired:
            out.append(("covariances repaired (jitter added)", ", ".join(repaired)))
        return out

    def sections(self, est):
        rows = ["| parameter | value |", "|---|---|"]
        for name in _INIT:
            rows.append(f"| {name} | {_fmt(getattr(est, name + '_'))} |")
        return [("Parameters", rows)]


@flow(name="emflow-fit-lgssm", log_prints=True)
def lgssm_fit_flow(
    data: Annotated[str, Field(description="Zarr group of sequences (values + offsets); NaN is missing")],
    out: Annotated[str, Field(description="where the fitted model is saved (a Zarr group)")],
    state_dim: Annotated[int, Field(ge=1, description="dimension of the hidden state")] = 2,
    em_vars: Annotated[list[Param] | Literal["all"], Field(
        description="the parameters EM learns; the others stay at their starting values")] = "all",
    transition_covariance_type: CovarianceType = "full",
    observation_covariance_type: CovarianceType = "full",
    tol: Annotated[float, Field(ge=0, description="stop when the mean log-likelihood per step changes less")]
    = 1e-4,
    max_iter: Annotated[int, Field(ge=1)] = 100,
    reg_covar: Annotated[float, Field(ge=0, description="added to the diagonal of learned covariances")] = 0.0,
    initial_model: Annotated[str | None, Field(
        description="a saved LinearGaussianSSM whose parameters are the starting (and held) values")] = None,
    n_init: RestartsParam = 1,
    heldout: Annotated[str | None, Field(description="held-out sequences (Zarr) to score")] = None,
    scheduler: SchedulerParam = None,
    persist: PersistParam = "auto",
    resume: bool = True,
    accelerate: AccelerateParam = None,
) -> str:
    """Fit a linear-Gaussian state-space model (Kalman smoother EM) and save it; returns the model path."""
    cfg = dict(state_dim=state_dim, em_vars=em_vars if isinstance(em_vars, str) else list(em_vars),
               transition_covariance_type=transition_covariance_type,
               observation_covariance_type=observation_covariance_type, tol=tol, max_iter=max_iter,
               reg_covar=reg_covar)
    if initial_model:
        start = emflow.load(initial_model)
        if not isinstance(start, LinearGaussianSSM):
            raise emflow.ConfigError(f"initial_model {initial_model!r} is a {type(start).__name__}, not a "
                                     "LinearGaussianSSM.")
        cfg.update({name: np.asarray(getattr(start, name + "_")) for name in _INIT})
    return run_family_fit(LGSSMAdapter(), cfg, data, out, n_init=n_init,
                          heldout=heldout, scheduler=scheduler, persist=persist,
                          resume=resume, accelerate=accelerate)


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(lgssm_fit_flow, module="flows.fit_lgssm"))
