"""The starting parameters of restart ``r`` of a fit with ``n_init`` restarts, for the flows.

The flows run each restart as its own checkpointed EM (so a killed run resumes the restart it
was in), and must start restart ``r`` exactly where ``Estimator(n_init=R).fit(...)`` starts it,
so that the flow's model is the library's. The estimator base (``emflow``'s ``EMEstimator``)
says where: ``est.init_params_for(data, *fit_args, init=r)``. :func:`restart_params` calls it.

TRANSITIONAL: until every estimator has ``init_params_for``, :func:`restart_params` falls back
to a stub that reproduces what that estimator's own ``fit`` does today:

* ``GaussianMixture`` (the one estimator with ``n_init`` now) draws its restarts one after
  another from one Generator, so restart ``r`` is the ``r + 1``-th initialisation from
  ``random_state``'s Generator;
* the others have no ``n_init``: restart 0 is their own initialisation, restart ``r > 0`` the
  one from the derived seed :func:`restart_seed`.

Delete the stubs (and the adapters' ``start_params``) once the base is in.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

__all__ = ["accepts", "restart_params", "restart_seed"]


def accepts(cls, name: str) -> bool:
    """Whether the estimator class takes the constructor keyword ``name``."""
    return name in inspect.signature(cls.__init__).parameters


def restart_seed(random_state: int | None, init: int) -> int | None:
    """TRANSITIONAL (estimators without ``n_init``): the seed of restart ``init``; the seed
    itself for the first restart, a derived one after it."""
    if random_state is None or init == 0:
        return random_state
    return int(np.random.SeedSequence([random_state, init]).generate_state(1, dtype=np.uint32)[0])  # a valid seed


def restart_params(adapter, est, data: Any, init: int):
    """The parameters restart ``init`` of ``est.fit(data, ...)`` starts from.

    ``est`` is the estimator as configured for the fit (with ``n_init`` when it takes one).
    """
    method = getattr(est, "init_params_for", None)
    if method is not None:
        return method(data, *adapter.fit_args, init=init)
    if hasattr(est, "_initial_params") and accepts(type(est), "n_init"):  # TRANSITIONAL: GaussianMixture
        return _sequential_restart(adapter, est, data, init)
    # TRANSITIONAL: estimators without n_init: their own initialisation (a fit of no iteration)
    overrides = {adapter.iter_param(type(est)): 0}
    if init and accepts(type(est), "random_state"):
        overrides["random_state"] = restart_seed(est.random_state, init)
    started = est.set_params(**overrides).fit(data, *adapter.fit_args)
    return adapter.start_params(started)


def _sequential_restart(adapter, est, data, init: int):
    """TRANSITIONAL: restart ``init`` of today's ``GaussianMixture.fit``: the ``init + 1``-th
    initialisation drawn from one Generator (as its restart loop does)."""
    from emflow.cluster import engine_for

    est._validate_params()
    with engine_for(est.scheduler, split_every=est.split_every) as engine:
        loaded = engine.open(data, *adapter.fit_args, min_rows=est.n_components, persist=False,
                             **est._partitioning())
        try:
            est._check_inits(loaded.data.n_features)
            rng = est._rng()
            for _ in range(init + 1):
                params = est._initial_params(engine, loaded, rng)
        finally:
            loaded.release()
    return params
