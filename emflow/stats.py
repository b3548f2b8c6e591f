"""Additive statistics: the one operation the engine needs from a model family."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["add", "require_finite"]


def add(*parts: Any) -> Any:
    """Field-wise sum of statistics bundles (NamedTuples of float64 arrays).

    ``add(a, b, c)`` sums in the order given, so a fixed tree of calls gives a fixed
    floating-point result whatever the number of workers. A bundle may also be a plain
    array or a tuple of bundles.
    """
    if not parts:
        raise ValueError("add() needs at least one statistics bundle")
    first = parts[0]
    if isinstance(first, tuple):
        fields = [add(*(p[i] for p in parts)) for i in range(len(first))]
        return type(first)(*fields) if hasattr(first, "_fields") else tuple(fields)
    total = np.array(first, dtype=np.float64, copy=True)
    for p in parts[1:]:
        total += p
    return total


def require_finite(stats: Any, model: str) -> None:
    """Raise :class:`~emflow.errors.FitFailedError` when summed statistics hold inf or NaN.

    Finite data can still overflow float64 once squared (values beyond ~1e154): the
    second moments become infinite and every later parameter NaN. Refuse that loudly
    instead of returning a model of NaN.
    """
    from .errors import FitFailedError

    fields = stats._fields if hasattr(stats, "_fields") else [str(i) for i in range(len(stats))]
    bad = [name for name, v in zip(fields, stats) if not np.all(np.isfinite(np.asarray(v, dtype=np.float64)))]
    if bad:
        raise FitFailedError(
            f"The {model} statistics summed over the data are not finite ({', '.join(bad)}): the data's "
            "magnitudes overflow float64 when squared (values beyond ~1e150). Scale the data before "
            "fitting, e.g. divide each column by its standard deviation or by a power of ten."
        )
