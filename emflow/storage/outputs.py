"""What a fitted model writes when applied to a dataset, for every family.

``emflow predict`` and the scoring flow (flows/score.py) both go through this table, so a
family's outputs are named the same everywhere. Every output is written to Zarr chunk by
chunk by the estimator's own method (``out=``); sequence families write a sequence store
(a group: per-step ``values`` beside the input's ``offsets``).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["OUTPUTS", "outputs_of", "check_outputs", "write_output"]

_MIXTURE = {"labels": "predict", "proba": "predict_proba", "log_likelihood": "score_samples"}
_HMM = {"labels": "predict", "proba": "predict_proba"}

# estimator class -> ({output: the method that writes it}, default outputs)
OUTPUTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "GaussianMixture": (_MIXTURE, ["labels", "proba"]),
    "GaussianHMM": (_HMM, ["labels", "proba"]),
    "CategoricalHMM": (_HMM, ["labels", "proba"]),
    "LatentDirichletAllocation": ({"topics": "transform"}, ["topics"]),
    "LinearGaussianSSM": ({"smoothed_states": "smooth", "filtered_states": "filter"}, ["smoothed_states"]),
}
# earlier names still accepted
_ALIASES = {"score": "log_likelihood"}


def outputs_of(model) -> tuple[dict[str, str], list[str]]:
    """``({output: method}, default outputs)`` of a fitted estimator."""
    name = type(model).__name__
    if name not in OUTPUTS:
        raise ConfigError(f"A {name} has no outputs to write to Zarr (emflow writes those of {', '.join(OUTPUTS)}).")
    return OUTPUTS[name]


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
