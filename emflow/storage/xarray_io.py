"""xarray objects in and out of the row families (Gaussian mixtures).

A ``DataArray`` (``feature_dim`` names its feature dimension) or a ``Dataset`` (its data
variables are the features) becomes a 2-D array of rows, one per point of the sample grid
(``sample_dims`` stacked in order); a Dask-backed object stays lazy (a Dask array: nothing is
read on the client). The returned :class:`RowsTemplate` rebuilds per-row outputs (labels,
responsibilities, log-likelihoods) on the original grid with its coordinates.

xarray is imported only when an xarray object is given (``import emflow`` works without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["is_xarray", "to_rows", "from_rows", "on_grid", "RowsTemplate"]


def is_xarray(obj) -> bool:
    """Whether ``obj`` is an xarray ``DataArray`` or ``Dataset`` (without importing xarray)."""
    return type(obj).__module__.startswith("xarray.") and type(obj).__name__ in ("DataArray", "Dataset")


@dataclass(frozen=True)
class RowsTemplate:
    """What :func:`from_rows` needs to put rows back on the grid: the sample dimensions (in
    stacking order), their sizes, the coordinates that live on them, and the features (the
    feature dimension's name and labels, or the Dataset's variable names)."""

    sample_dims: tuple[str, ...]
    shape: tuple[int, ...]
    coords: dict[str, Any]
    feature_dim: str | None
    features: tuple | None
    is_dataset: bool


def _check_dims(obj, sample_dims, feature_dim) -> tuple[str, ...]:
    dims = tuple(obj.dims)
    if feature_dim is not None and feature_dim not in dims:
        raise DataError(f"feature_dim={feature_dim!r} is not a dimension of the data (dimensions: {list(dims)}); "
                        "name one of those.")
    if sample_dims is None:
        return tuple(d for d in dims if d != feature_dim)
    sample_dims = (sample_dims,) if isinstance(sample_dims, str) else tuple(sample_dims)
    for d in sample_dims:
        if d not in dims:
            raise DataError(f"sample_dims names {d!r}, which is not a dimension of the data (dimensions: "
                            f"{list(dims)}); name those to stack into rows.")
        if d == feature_dim:
            raise DataError(f"sample_dims names {d!r}, which is the feature_dim; a dimension is one or the other.")
    rest = [d for d in dims if d not in sample_dims and d != feature_dim]
    if rest:
        raise DataError(f"Dimension(s) {rest} of the data are neither in sample_dims={list(sample_dims)} nor the "
                        "feature_dim: add them to sample_dims, or select one value (e.g. .isel(...)).")
    return sample_dims


def _check_dtype(dtype, what: str) -> None:
    if np.dtype(dtype).kind not in "fiu":
        raise DataError(f"{what} has dtype {dtype}, which is not numeric; convert it, e.g. .astype('float64'), "
                        "or drop it.")


def to_rows(obj, sample_dims=None, feature_dim=None, *, features=None):
    """``(rows, template)``: the 2-D array of rows of an xarray object and its grid.

    Parameters
    ----------
    obj : xarray.DataArray or xarray.Dataset
        In memory or Dask-backed (then ``rows`` is a Dask array; nothing is computed).
    sample_dims : str or sequence of str, optional
        Dimensions stacked into rows, in this order (the last varies fastest); default every
        dimension but ``feature_dim``.
    feature_dim : str, optional
        A DataArray's feature dimension (required for a DataArray; its chunks must hold every
        feature). A Dataset's features are its data variables.
    features : sequence, optional
        For a Dataset: the variables to take, in this order (those a model was fitted on).

    Returns
    -------
    rows : numpy.ndarray or dask.array.Array of shape (n_samples, n_features)
    template : RowsTemplate
    """
    if not is_xarray(obj):
        raise DataError(f"Expected an xarray DataArray or Dataset, got {type(obj).__name__}.")
    is_ds = type(obj).__name__ == "Dataset"
    if is_ds:
        if feature_dim is not None:
            raise DataError(f"feature_dim={feature_dim!r} was given with a Dataset, whose features are its data "
                            "variables; leave feature_dim out (or pass one DataArray, e.g. ds.to_dataarray()).")
        names = list(obj.data_vars) if features is None else list(features)
        if not names:
            raise DataError("The Dataset has no data variables to use as features.")
        missing = [v for v in names if v not in obj.data_vars]
        if missing:
            raise DataError(f"The Dataset has no variable(s) {missing} (it has {list(obj.data_vars)}); the model "
                            "was fitted on those.")
        for v in names:
            _check_dtype(obj[v].dtype, f"Variable {v!r}")
        sample_dims = _check_dims(obj[names], sample_dims, None)
        for v in names:
            if set(obj[v].dims) != set(sample_dims):
                raise DataError(f"Variable {v!r} has dimensions {list(obj[v].dims)}, not the sample dimensions "
                                f"{list(sample_dims)}; every feature variable must span them (broadcast it, or "
                                "drop it).")
        arrays = [obj[v].transpose(*sample_dims).data for v in names]
        lazy = any(type(a).__module__.startswith("dask") for a in arrays)
        shape = tuple(obj.sizes[d] for d in sample_dims)
        n = int(np.prod(shape, dtype=np.int64))
        if lazy:
            import dask.array as da

            rows = da.stack([da.asarray(a).reshape(n) for a in arrays], axis=1)
        else:
            rows = np.stack([np.asarray(a).reshape(n) for a in arrays], axis=1)
        fdim, feats = None, tuple(names)
    else:
        if feature_dim is None:
            raise DataError(f"A DataArray needs feature_dim= naming its feature dimension (one of {list(obj.dims)}).")
        sample_dims = _check_dims(obj, sample_dims, feature_dim)
        _check_dtype(obj.dtype, f"The DataArray{f' {obj.name!r}' if obj.name is not None else ''}")
        if obj.chunks is not None:
            fchunks = obj.chunks[obj.dims.index(feature_dim)]
            if len(fchunks) > 1:
                raise DataError(f"The feature dimension {feature_dim!r} is split into {len(fchunks)} chunks; each "
                                f"chunk must hold every feature: rechunk it, e.g. da.chunk({{{feature_dim!r}: -1}}).")
        arr = obj.transpose(*sample_dims, feature_dim).data
        shape = tuple(obj.sizes[d] for d in sample_dims)
        n = int(np.prod(shape, dtype=np.int64))
        rows = arr.reshape(n, obj.sizes[feature_dim]) if obj.chunks is not None else np.asarray(arr).reshape(n, -1)
        fdim = feature_dim
        feats = tuple(obj[feature_dim].values.tolist()) if feature_dim in obj.coords else None
    coords = {k: c.variable for k, c in obj.coords.items() if c.dims and set(c.dims) <= set(sample_dims)}
    return rows, RowsTemplate(tuple(sample_dims), shape, coords, fdim, feats, is_ds)


def from_rows(values, template: RowsTemplate, name: str, extra_dim: str | None = None):
    """A DataArray named ``name`` on the template's grid: ``values`` has one row per grid
    point (shape ``(n_samples,)``, or ``(n_samples, k)`` with ``extra_dim`` naming the
    second axis, e.g. ``"component"``, coordinates ``0 .. k-1``)."""
    import xarray as xr

    values = values if type(values).__module__.startswith("dask") else np.asarray(values)
    dims, shape, coords = template.sample_dims, template.shape, dict(template.coords)
    if extra_dim is not None:
        k = values.shape[1]
        dims, shape = (*dims, extra_dim), (*shape, k)
        coords[extra_dim] = np.arange(k)
    return xr.DataArray(values.reshape(shape), dims=dims, coords=coords, name=name)


# a mixture output's name on the grid, and the name of its second axis
_OUTPUT_NAMES = {"labels": ("label", None), "proba": ("proba", "component"), "score": ("log_likelihood", None),
                 "impute": ("imputed", "feature")}


def on_grid(result, template: RowsTemplate | None, kind: str, out=None):
    """A per-row output ``kind`` of a mixture (labels, proba, score, impute) on the grid of
    ``template``; unchanged when the input was not xarray or the output went to Zarr (``out``)."""
    if template is None or out is not None:
        return result
    name, extra = _OUTPUT_NAMES[kind]
    return from_rows(result, template, name, extra)
