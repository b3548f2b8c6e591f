"""Running one computation on both paths of a model module with a compiled kernel."""

from __future__ import annotations


def both_kernels(monkeypatch, module, fn, order=("numba", "numpy")):
    """``fn()`` with ``module.KERNEL`` set to each of ``order`` in turn: the two results."""
    out = []
    for setting in order:
        monkeypatch.setattr(module, "KERNEL", setting)
        out.append(fn())
    return tuple(out)
