"""The starting parameters of restart ``r`` of a fit with ``n_init`` restarts, for the flows.

The flows run each restart as its own checkpointed EM (so a killed run resumes the restart it
was in), and must start restart ``r`` exactly where ``Estimator(n_init=R).fit(...)`` starts it,
so that the flow's model is the library's. The estimator base (``EMEstimator``) says where:
``est.init_params_for(data, *fit_args, init=r)`` (restart ``r`` draws from
``np.random.default_rng([seed, r])``, ``seed`` drawn once from ``random_state``).
:func:`restart_params` calls it.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["accepts", "restart_params"]


def accepts(cls, name: str) -> bool:
    """Whether the estimator class takes the constructor keyword ``name``."""
    return name in inspect.signature(cls.__init__).parameters


def restart_params(adapter, est, data: Any, init: int):
    """The parameters restart ``init`` of ``est.fit(data, *adapter.fit_args)`` starts from.

    ``est`` is the estimator as configured for the fit (with ``n_init`` when it takes one).
    """
    return est.init_params_for(data, *adapter.fit_args, init=init)
