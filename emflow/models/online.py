"""Stepwise (online) EM: the arithmetic of running sufficient statistics, pure NumPy.

Stepwise EM (Cappé & Moulines 2009; Liang & Klein 2009) keeps a running estimate ``S`` of
the full-data sufficient statistics and, after the E-step of mini-batch ``t``, moves it
towards that batch's statistics scaled to the full-data size::

    S <- (1 - rho_t) S + rho_t s_t,        rho_t = (tau + t) ** (-kappa),  0.5 < kappa <= 1

then runs the family's ordinary M-step on ``S``. ``sum rho_t = inf`` and ``sum rho_t**2 <
inf`` (hence ``0.5 < kappa <= 1``) make it converge to a stationary point of the
likelihood. Online variational Bayes for LDA (Hoffman, Blei & Bach 2010) is the same update
applied to ``lambda`` itself (``lambda`` is a linear function of the statistics).

Families whose statistics are moments about a shift that follows the parameters
(Gaussian mixtures, Gaussian HMMs: ``s1 = sum r (x - g)``, ``s2 = sum r (x - g)(x - g)^T``)
need the running statistics moved to the batch's shift before they are blended:
:func:`recenter`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["step_size", "blend", "scale", "recenter", "polyak"]


def step_size(t: int, offset: float, decay: float) -> float:
    """``rho_t = (offset + t) ** (-decay)`` (scikit-learn's online-LDA weight, ``t`` from 1)."""
    return float(np.power(float(offset) + float(t), -float(decay)))


def _fieldwise(fn, *bundles):
    first = bundles[0]
    if isinstance(first, tuple):
        out = [_fieldwise(fn, *(b[i] for b in bundles)) for i in range(len(first))]
        return type(first)(*out) if hasattr(first, "_fields") else tuple(out)
    return fn(*bundles)


def blend(running: Any, batch: Any, rho: float) -> Any:
    """``running * (1 - rho) + rho * batch`` field by field (NamedTuples of arrays, or arrays).

    The operations are scikit-learn's online-LDA update's, in its order
    (``components_ *= 1 - w; components_ += w * new``), so the same inputs give the same bits.
    """
    def one(a, b):
        out = np.array(a, dtype=np.float64, copy=True)
        out *= 1.0 - rho
        out += rho * np.asarray(b, dtype=np.float64)
        return out

    return _fieldwise(one, running, batch)


def scale(stats: Any, factor: float) -> Any:
    """Every field times ``factor`` (returned unchanged, not copied, for ``factor == 1``)."""
    if factor == 1.0:
        return stats
    return _fieldwise(lambda a: np.asarray(a, dtype=np.float64) * factor, stats)


def recenter(stats: Any, delta: np.ndarray, count: str, kind: str) -> Any:
    """Moments about a shift ``a`` moved to the shift ``b = a - delta``.

    With ``x - b = (x - a) + delta``: ``s1 += n delta`` and ``s2 += s1 delta^T + delta s1^T
    + n delta delta^T`` (``s1``, ``n`` before the move).

    Parameters
    ----------
    stats : NamedTuple with fields ``count``, ``s1`` (K, d) and ``s2``
    delta : ndarray of shape (d,)
    count : str
        The field of per-component weights (K,) (``"n"`` for mixtures, ``"post"`` for HMMs).
    kind : {"outer", "elementwise", "total"}
        ``s2`` of shape (K, d, d) (full, or an HMM's tied), (K, d) (diag, spherical), or one
        (d, d) matrix summed over components (a mixture's tied).
    """
    delta = np.asarray(delta, dtype=np.float64)
    if not np.any(delta):
        return stats
    n = np.asarray(getattr(stats, count), dtype=np.float64)
    s1 = np.asarray(stats.s1, dtype=np.float64)
    s2 = np.asarray(stats.s2, dtype=np.float64)
    if kind == "outer":
        cross = s1[:, :, None] * delta[None, None, :]
        s2 = s2 + cross + cross.transpose(0, 2, 1) + n[:, None, None] * np.outer(delta, delta)[None]
    elif kind == "elementwise":
        s2 = s2 + 2.0 * delta[None, :] * s1 + n[:, None] * delta[None, :] ** 2
    elif kind == "total":
        t1 = s1.sum(axis=0)
        s2 = s2 + np.outer(t1, delta) + np.outer(delta, t1) + n.sum() * np.outer(delta, delta)
    else:
        raise ValueError(f"unknown moment layout {kind!r}")
    return stats._replace(s1=s1 + n[:, None] * delta[None, :], s2=s2)


def polyak(average: Any, current: Any, n: int) -> Any:
    """Running mean of ``n`` statistics bundles: ``average + (current - average) / n``."""
    if average is None or n <= 1:
        return current
    return _fieldwise(lambda a, c: np.asarray(a) + (np.asarray(c) - np.asarray(a)) / n, average, current)
