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
from emflow.estimators import REGISTRY, discover

from ._common import PersistParam, RestartsParam, SchedulerParam
from ._family import AccelerateParam, FamilyAdapter, run_family_fit

__all__ = ["model_fit_flow", "RegistryAdapter"]


def _opener(kind: str):
    if kind == "rows":
        from emflow.storage.data import open_rows

        return open_rows
    if kind == "sequences":
        from emflow.storage.sequences import open_sequences

        return lambda data: open_sequences(data, allow_nan=True)
    from emflow.storage.corpus import open_corpus

    return open_corpus


class RegistryAdapter(FamilyAdapter):
    """A family's fit from its declarations alone (``family``, ``data_kind``, ``iter_param``,
    ``_em_tol`` / ``_em_stop``, ``_summary``)."""

    def __init__(self, cls: type):
        self.estimator_cls = cls
        self.prefix = cls.family.replace("_", "-")
        self.units = {"rows": "rows", "sequences": "steps", "corpus": "words"}[cls.data_kind]
        self.label = cls.objective_name

    def open(self, data: str):
        return _opener(self.estimator_cls.data_kind)(data)

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


def _family_class(family: str) -> type:
    fams = discover()
    if family not in fams:
        raise ConfigError(f"family must be one of {sorted(fams)}, got {family!r}.")
    return fams[family]


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
    cls = _family_class(family)
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

