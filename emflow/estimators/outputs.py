"""What a fitted model writes when applied to a dataset, for every family.

``emflow predict`` and the scoring flow (flows/score.py) both read the family's declared
``outputs`` (a class attribute of its estimator), so a family's outputs are named the same
everywhere and a new family needs no entry here. Every output is written to Zarr chunk by
chunk by the estimator's own method (``out=``); sequence families write a sequence store
(a group: per-step ``values`` beside the input's ``offsets``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import ConfigError
from ..storage.xarray_io import GridOut, grid_rows, write_grid

__all__ = ["outputs_of", "check_outputs", "write_output", "write_rows", "write_rows_at"]

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
    refused with a ConfigError (see :func:`emflow.storage.destinations.check_destination`).

    Returns ``(written, array)``: what the method returned (a Zarr array, or a group for
    sequence families) and its main array (the group's ``values``).
    """
    [kind] = check_outputs(model, [kind])
    written = getattr(model, outputs_of(model)[0][kind])(data, out=out, overwrite=overwrite)
    return written, (written["values"] if hasattr(written, "array_keys") else written)


def write_rows(out, loaded, model, *, kind: str, shape: tuple, dtype: str, chunk: int,
               fill: Callable[[str], Any], overwrite: bool = False, data=None, **attrs):
    """Write an output with one row per input row (a mixture's labels, LDA's topic mixtures)
    to a Zarr array at ``out``, atomically, and return it opened read-only.

    ``fill(url)`` runs the partitions on the engine, each writing its own rows with
    :func:`write_rows_at` (``chunk`` must divide every partition's first row, so that no two
    tasks write one chunk). The array's ``emflow`` attribute records the output's kind, the
    family, the data's source and fingerprint and the version (plus ``attrs``). What is at
    ``out`` is replaced only as :func:`emflow.storage.store.check_destination` allows.
    """
    import zarr

    from .. import __version__
    from ..storage import destinations as _dest

    meta = {"kind": kind, **attrs, "model_family": model.family, "source": loaded.data.source,
            "fingerprint": loaded.fingerprint, "version": __version__}
    if isinstance(out, GridOut):  # an xarray object's output: a dataset on its grid
        return write_grid(out, model, data, shape=shape, dtype=dtype, fill=fill, attrs=meta, overwrite=overwrite)
    with _dest.atomic_dir(out) as tmp:
        _dest.check_destination(out, "output", overwrite=overwrite, inputs=_dest.output_inputs(model, data))
        arr = zarr.create_array(tmp, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]),
                                config={"write_empty_chunks": True})
        arr.attrs["emflow"] = meta
        fill(os.path.abspath(tmp))
    return zarr.open_array(os.fspath(out), mode="r")


def write_rows_at(url: str, start: int, values) -> None:
    """On a worker: rows ``start .. start + len(values)`` of the output array at ``url``."""
    import zarr

    arr = zarr.open_array(url, mode="r+").with_config({"write_empty_chunks": True})
    where, values = grid_rows(arr, start, values)  # a grid output (xarray): the block's region
    arr[where] = values
