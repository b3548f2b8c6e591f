"""A typed registry of the emflow deployments (the Python twin of deploy/prefect.yaml).

    python -m deploy.deployments serve      # one process serves every deployment (no work pool)
    python -m deploy.deployments list

``serve`` needs only a Prefect API (a local ``prefect server start`` will do); schedules
fire while the process runs. For work pools use ``prefect deploy`` with prefect.yaml.
"""

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from flows.fit import fit_flow
from flows.fit_hmm import hmm_fit_flow
from flows.fit_lda import lda_fit_flow
from flows.fit_lgssm import lgssm_fit_flow
from flows.score import score_flow
from flows.model_selection import select_flow
from flows.refit import refit_flow


@dataclass(frozen=True)
class Deployment:
    name: str
    flow: Callable
    cron: str
    parameters: dict[str, Any]
    tags: tuple[str, ...] = ("emflow",)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_deployment(self):
        return self.flow.to_deployment(name=self.name, cron=self.cron, parameters=self.parameters,
                                       tags=list(self.tags), description=self.description or None)


DATA = "/data/emflow"
# Only `data` and `out` are paths in these defaults: a run started with those two overridden
# (deploy/README.md, "run one now") reads nothing else. Add heldout=... to score a held-out set.

DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment("nightly-fit", fit_flow, "0 2 * * *",
               {"data": f"{DATA}/train.zarr", "out": f"{DATA}/models/gmm.zarr", "n_components": 8},
               description="Refit the mixture every night; resumes from its checkpoint if killed."),
    Deployment("weekly-model-selection", select_flow, "0 4 * * 0",
               {"data": f"{DATA}/train.zarr", "out": f"{DATA}/models/best.zarr", "n_components": [2, 4, 8, 16],
                "covariance_types": ["full", "diag"], "n_init": 2},
               description="Grid of candidates with shared passes; keep the best BIC."),
    Deployment("hourly-score", score_flow, "15 * * * *",
               {"model": f"{DATA}/models/gmm.zarr", "data": f"{DATA}/incoming.zarr",
                "out_dir": f"{DATA}/scores", "outputs": ["labels", "log_likelihood"]},
               description="Label the newest data with the current model."),
    Deployment("nightly-hmm-fit", hmm_fit_flow, "30 2 * * *",
               {"data": f"{DATA}/sequences.zarr", "out": f"{DATA}/models/hmm.zarr", "emission": "gaussian",
                "n_components": 4, "covariance_type": "diag"},
               description="Refit the Gaussian HMM on the sequences every night; resumes from its checkpoint."),
    Deployment("nightly-lgssm-fit", lgssm_fit_flow, "0 3 * * *",
               {"data": f"{DATA}/tracks.zarr", "out": f"{DATA}/models/lgssm.zarr", "state_dim": 4,
                "observation_covariance_type": "diag"},
               description="Re-estimate the state-space model (Kalman EM) every night; resumes from its checkpoint."),
    Deployment("weekly-lda-fit", lda_fit_flow, "0 5 * * 6",
               {"data": f"{DATA}/corpus.zarr", "out": f"{DATA}/models/lda.zarr", "n_components": 20,
                "max_iter": 30, "evaluate_every": 5, "perp_tol": 0.1},
               description="Refit the topic model every week; top words per topic as a table artifact."),
    Deployment("hourly-refit", refit_flow, "45 * * * *",
               {"model": f"{DATA}/models/gmm.zarr", "data": f"{DATA}/train.zarr", "overwrite": True},
               description="Continue the nightly mixture on the rows appended since (warm start); refuses a "
                           "changed schema, writing nothing."),
)


def main(argv: list[str]) -> None:
    cmd = argv[0] if argv else "list"
    if cmd == "list":
        for d in DEPLOYMENTS:
            print(f"{d.flow.name}/{d.name}  cron={d.cron!r}  {d.parameters}")
    elif cmd == "serve":
        from prefect import serve

        serve(*(d.to_deployment() for d in DEPLOYMENTS))
    else:
        raise SystemExit("usage: python -m deploy.deployments [list|serve]")


if __name__ == "__main__":
    main(sys.argv[1:])
