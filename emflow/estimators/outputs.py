"""What a fitted model writes when applied to a dataset, for every family.

``emflow predict`` and the scoring flow (flows/score.py) both read the family's declared
``outputs`` (a class attribute of its estimator), so a family's outputs are named the same
everywhere and a new family needs no entry here. Every output is written to Zarr chunk by
chunk by the estimator's own method (``out=``); sequence families write a sequence store
(a group: per-step ``values`` beside the input's ``offsets``).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["outputs_of", "check_outputs", "write_output"]

# earlier names still accepted
_ALIASES = {"score": "log_likelihood"}


def outputs_of(model) -> tuple[dict[str, str], list[str]]:
    """``({output: method}, default outputs)`` of a fitted estimator, from its family's
    declared ``outputs`` (see :class:`emflow.estimators.base.Output`)."""
    declared = getattr(type(model), "outputs", None)
    if not declared:
        from .base import REGISTRY

        names = ", ".join(c.__name__ for c in REGISTRY.values() if c.outputs)
        raise ConfigError(f"A {type(model).__name__} has no outputs to write to Zarr (emflow writes those of {names}).")
    return {k: o.method for k, o in declared.items()}, [k for k, o in declared.items() if o.default]


def check_outputs(model, wanted: list[str] | None, where: str = "the model") -> list[str]:
    """The outputs to write: the family's defaults for None, else ``wanted`` (aliases
    resolved, duplicates dropped); a ConfigError naming the family's outputs otherwise."""
    methods, default = outputs_of(model)
    if not wanted:
        return list(default)
    resolved = list(dict.fromkeys(_ALIASES.get(k, k) for k in wanted))
    bad = [k for k in resolved if k not in methods]
    if bad:
        raise ConfigError(
            f"{where} is a {type(model).__name__}, which writes {', '.join(methods)}; it has no "
            f"{', '.join(bad)}. Choose among those."
        )
    return resolved


def write_output(model, kind: str, data, out, *, overwrite: bool = False) -> tuple[Any, Any]:
    """Write output ``kind`` of ``model`` applied to ``data`` into Zarr at ``out``.

    An emflow output already at ``out`` is replaced only with ``overwrite=True``; a path that
    holds anything else, or is (inside, or contains) ``data`` or the model's own path, is
    refused with a ConfigError (see :func:`emflow.storage.store.check_destination`).

    Returns ``(written, array)``: what the method returned (a Zarr array, or a group for
    sequence families) and its main array (the group's ``values``).
    """
    [kind] = check_outputs(model, [kind])
    written = getattr(model, outputs_of(model)[0][kind])(data, out=out, overwrite=overwrite)
    return written, (written["values"] if hasattr(written, "array_keys") else written)
