"""Validation of a loaded model's arrays: each family declares, per array, its shape and constraints.

A family's ``_array_spec(meta)`` returns ``{name: (shape, rules)}``; :func:`validate_arrays`
checks the arrays read from a model store against it and raises
:class:`~emflow.errors.ModelFormatError` naming the first array that breaks a rule of
:data:`RULES`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..errors import ModelFormatError

__all__ = ["RULES", "validate_arrays"]

_SIMPLEX_ATOL = 1e-8


def _rule_finite(a, axis_desc):
    return None if np.all(np.isfinite(a)) else "holds NaN or infinite values"


def _rule_nonneg(a, _):
    return None if np.all(a >= 0) else "has negative entries"


def _rule_positive(a, _):
    return None if np.all(a > 0) else "has entries that are not > 0"


def _rule_simplex(a, _):
    if a.size == 0:
        return None
    if np.any(a < 0):
        return "has negative probabilities"
    s = a.sum(axis=-1)
    if not np.allclose(s, 1.0, rtol=0, atol=_SIMPLEX_ATOL):
        return f"has rows that do not sum to 1 (sums range {s.min():.12g} .. {s.max():.12g})"
    return None


def _mats(a):
    return a.reshape((-1,) + a.shape[-2:])


def _rule_symmetric(a):
    m = _mats(a)
    scale = max(1.0, float(np.max(np.abs(m))) if m.size else 1.0)
    return bool(np.allclose(m, np.swapaxes(m, -1, -2), rtol=0, atol=1e-10 * scale))


def _rule_spd(a, _):
    if not _rule_symmetric(a):
        return "is not symmetric"
    for m in _mats(a):
        try:
            np.linalg.cholesky(m)
        except np.linalg.LinAlgError:
            return "is not positive definite"
    return None


def _rule_psd(a, _):
    if not _rule_symmetric(a):
        return "is not symmetric"
    for m in _mats(a):
        ev = np.linalg.eigvalsh((m + m.T) / 2)
        if ev.size and ev.min() < -1e-10 * max(1.0, float(np.abs(ev).max())):
            return "is not positive semi-definite"
    return None


def _rule_triangular_posdiag(a, _):
    m = _mats(a)
    if m.size and not np.all(np.diagonal(m, axis1=-2, axis2=-1) > 0):
        return "is not a Cholesky factor (its diagonal is not positive)"
    lower = np.all(np.triu(m, 1) == 0)
    upper = np.all(np.tril(m, -1) == 0)
    return None if (lower or upper) else "is not a Cholesky factor (not triangular)"


RULES: dict[str, Callable[[np.ndarray, Any], str | None]] = {
    "finite": _rule_finite,
    "nonnegative": _rule_nonneg,
    "positive": _rule_positive,
    "simplex": _rule_simplex,  # last axis: non-negative, sums to 1
    "spd": _rule_spd,  # last two axes: symmetric positive definite
    "psd": _rule_psd,  # last two axes: symmetric positive semi-definite
    "cholesky": _rule_triangular_posdiag,  # last two axes: triangular, positive diagonal
}


def validate_arrays(path: str, arrays: Mapping[str, np.ndarray], meta: dict,
                    spec: Callable[[dict], Mapping[str, tuple]]) -> None:
    """Check a model's arrays against its family's declaration; ModelFormatError naming the array.

    ``spec(meta)`` returns ``{name: (shape, rules)}`` (or ``(shape, rules, optional)``): the
    arrays the family stores, the shape each must have given the configuration, and the names
    of :data:`RULES` each must satisfy. A spec that cannot be computed from the attributes
    (missing or ill-typed configuration) is itself a format error.
    """
    try:
        declared = dict(spec(meta))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelFormatError(
            f"The model at {path!r} has a configuration its family ({meta.get('family')!r}) cannot use "
            f"({type(exc).__name__}: {exc}): "
            "the file is damaged. Re-save it from the fitted estimator, or refit."
        ) from None
    required = {n for n, d in declared.items() if not (len(d) > 2 and d[2])}
    missing = sorted(required - set(arrays))
    extra = sorted(set(arrays) - set(declared))
    if missing or extra:
        bits = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"]
                                                                       if extra else [])
        raise ModelFormatError(
            f"The model at {path!r} is a {meta['family']!r} model but its arrays do not match that family "
            f"({'; '.join(bits)}). The file is damaged or mislabelled; refit or re-save it."
        )
    for name, decl in declared.items():
        if name not in arrays:
            continue
        shape, rules = decl[0], decl[1]
        a = arrays[name]
        if a.dtype.kind not in "fiu":
            raise ModelFormatError(f"The model at {path!r}: array {name!r} has dtype {a.dtype}, not numeric.")
        if shape is not None and tuple(a.shape) != tuple(int(s) for s in shape):
            raise ModelFormatError(
                f"The model at {path!r}: array {name!r} has shape {tuple(a.shape)}, but its configuration "
                f"implies {tuple(int(s) for s in shape)}. The file is damaged; refit or re-save it."
            )
        af = a.astype(np.float64, copy=False)
        for rule in ("finite", *[r for r in rules if r != "finite"]):
            why = RULES[rule](af, None)
            if why:
                raise ModelFormatError(
                    f"The model at {path!r}: array {name!r} {why}, so the model cannot be used. The file "
                    "is damaged or was altered; refit or re-save it."
                )
