"""The starting parameters of restart ``r`` of a fit with ``n_init`` restarts, for the flows.

The flows run each restart as its own checkpointed EM (so a killed run resumes the restart it
was in), and must start restart ``r`` exactly where ``Estimator(n_init=R).fit(...)`` starts it,
so that the flow's model is the library's. The estimator base (``EMEstimator``) says where:
``est.init_params_for(data, *fit_args, init=r)`` (restart ``r`` draws from
``np.random.default_rng([seed, r])``, ``seed`` drawn once from ``random_state``).
:func:`restart_params` calls it.

TRANSITIONAL: an estimator whose ``fit`` does not run the base's driver yet (it overrides
``_fit_loaded``) starts from its own initialisation, a fit of no iteration: restart 0 with its
``random_state``, restart ``r > 0`` with the derived seed :func:`restart_seed`. Delete that
branch (and the adapters' ``start_params``) once every family is on the base.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

__all__ = ["accepts", "on_base_driver", "restart_params", "restart_seed"]


def accepts(cls, name: str) -> bool:
    """Whether the estimator class takes the constructor keyword ``name``."""
    return name in inspect.signature(cls.__init__).parameters


def on_base_driver(cls) -> bool:
    """Whether ``cls.fit`` runs the estimator base's fit driver (restarts seeded per restart)."""
    owner = next((c for c in cls.__mro__ if "_fit_loaded" in c.__dict__), None)
    return hasattr(cls, "init_params_for") and owner is not None and owner.__name__ == "EMEstimator"


def restart_seed(random_state: int | None, init: int) -> int | None:
    """TRANSITIONAL (estimators not on the base's driver): the seed of restart ``init``; the
    seed itself for the first restart, a derived one after it."""
    if random_state is None or init == 0:
        return random_state
    return int(np.random.SeedSequence([random_state, init]).generate_state(1, dtype=np.uint32)[0])  # a valid seed


def restart_params(adapter, est, data: Any, init: int):
    """The parameters restart ``init`` of ``est.fit(data, *adapter.fit_args)`` starts from.

    ``est`` is the estimator as configured for the fit (with ``n_init`` when it takes one).
    """
    if on_base_driver(type(est)):
        return est.init_params_for(data, *adapter.fit_args, init=init)
    # TRANSITIONAL: the estimator's own initialisation (a fit of no iteration)
    overrides = {adapter.iter_param(type(est)): 0}
    if init and accepts(type(est), "random_state"):
        overrides["random_state"] = restart_seed(est.random_state, init)
    started = est.set_params(**overrides).fit(data, *adapter.fit_args)
    return adapter.start_params(started)
