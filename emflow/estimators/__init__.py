"""Estimator layer: the EM loop and the scikit-learn / hmmlearn style estimators built on the
model math (``emflow.models``), the execution layer and the storage layer.

Every module of this package is imported by :func:`discover` (``import emflow`` calls it), and
every estimator class that declares a ``family`` registers itself in :data:`REGISTRY`
(:class:`~emflow.estimators.base.EMEstimator`): a new family is one new module here (its thin
estimator face) beside its math in ``emflow.models``, with no table to edit.
"""

import importlib
import pkgutil

from .base import REGISTRY, EMEstimator, Output, family_of

__all__ = ["REGISTRY", "EMEstimator", "Output", "family_of", "discover"]


def discover() -> dict:
    """Import every module of ``emflow.estimators`` (so every family is registered); returns
    :data:`REGISTRY`."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY
