"""The fit flow of any registered family, by name: ``model_fit_flow(data, out, family="poisson_hmm",
params={"n_components": 3})``.

The typed flows (flows/fit.py, fit_hmm.py, fit_lgssm.py, fit_lda.py) give their families a
run form with one field per parameter and family-specific summaries; this one serves every
family in ``emflow.estimators.REGISTRY`` (a family added later included, with no edit here)
through the same generic checkpointed stages (flows/_family.py): validate, initialise (each
of ``n_init`` restarts from where ``fit(n_init=R)`` starts it), EM iterations checkpointed
after each one, save, evaluate. Artifacts: ``<family>-fit-progress``,
``<family>-fit-log-likelihood``, ``<family>-fit-summary``, ``dask-dashboard``.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
from types import SimpleNamespace
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from emflow.errors import ConfigError
from emflow.estimators import REGISTRY, family_of
from emflow.storage.checkpoint import dataset_fingerprint
from emflow.storage.layouts import open_stored

from ._common import PersistParam, RestartsParam, SchedulerParam
from ._family import AccelerateParam, FamilyAdapter, run_family_fit

__all__ = ["model_fit_flow", "RegistryAdapter"]


class RegistryAdapter(FamilyAdapter):
    """A family's fit from its declarations alone (``family``, ``data_kind``, ``iter_param``,
    ``_em_tol`` / ``_em_stop``, ``_summary``)."""

    def __init__(self, cls: type):
        self.estimator_cls = cls
        self.prefix = cls.family.replace("_", "-")
        self.units = {"rows": "rows", "sequences": "steps", "corpus": "words"}[cls.data_kind]
        self.label = cls.objective_name

    def open(self, data: str, cfg: dict | None = None):
        est = self.estimator_cls() if cfg is None else self.estimator(cfg, None)
        return open_stored(self.estimator_cls.data_kind, data, allow_nan=est._allows_nan())

    def fingerprint(self, data: str, cfg: dict, scheduler) -> dict:
        # NaN as the configured estimator reads it (e.g. GaussianMixture(missing="marginalize"))
        return dataset_fingerprint(self.open(data, cfg), scheduler=scheduler)

    def _as_loaded(self, info: dict):
        return SimpleNamespace(data=SimpleNamespace(n_rows=int(info["n_rows"])))

    def tol(self, cfg, info):
        return self.estimator(cfg, None)._em_tol(self._as_loaded(info))

    def stop_rule(self, cfg, info):
        return self.estimator(cfg, None)._em_stop(self._as_loaded(info))

    def title(self, est) -> str:
        return f"{type(est).__name__} ({est.family})"

    def facts(self, est, metrics):
        return [(k, v) for k, v in est._summary().items()]


@flow(name="emflow-fit-model", log_prints=True)
def model_fit_flow(
    data: Annotated[str, Field(description="Zarr dataset in the family's layout (rows, sequences or corpus)")],
    out: Annotated[str, Field(description="where the fitted model is saved (a Zarr group)")],
    family: Annotated[str, Field(description=f"a registered family: {', '.join(sorted(REGISTRY))}")],
    params: Annotated[dict[str, Any], Field(description="the estimator's constructor parameters")] = {},  # noqa: B006
    n_init: RestartsParam = 1,
    heldout: Annotated[str | None, Field(description="held-out data (Zarr) to score")] = None,
    scheduler: SchedulerParam = None,
    persist: PersistParam = "auto",
    resume: bool = True,
    accelerate: AccelerateParam = None,
) -> str:
    """Fit a model of any registered family to a Zarr dataset and save it; returns the model path.

    ``params`` are the estimator's constructor keywords (checked by the estimator before
    anything is opened); ``scheduler``, ``persist`` and ``n_init`` are the flow's own.
    """
    cls = family_of(family)
    bad = sorted(set(params) & {"scheduler", "persist", "n_init"})
    if bad:
        raise ConfigError(f"{', '.join(bad)} are arguments of the flow itself, not params.")
    cfg = {k: v for k, v in cls(**params).get_params(deep=False).items()
           if k not in ("scheduler", "persist", "n_init")}
    cls(**cfg)._validate_params()
    return run_family_fit(RegistryAdapter(cls), cfg, data, out, n_init=n_init, heldout=heldout,
                          scheduler=scheduler, persist=persist, resume=resume, accelerate=accelerate)


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(model_fit_flow, module="flows.fit_model"))

