"""Additive statistics: the one operation the engine needs from a model family."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["add"]


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
