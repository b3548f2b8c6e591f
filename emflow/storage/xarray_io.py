"""xarray objects in and out of the row families (Gaussian mixtures).

A ``DataArray`` (``feature_dim`` names its feature dimension) or a ``Dataset`` (its data
variables are the features) becomes a 2-D array of rows, one per point of the sample grid
(``sample_dims`` stacked in order); a Dask-backed object stays lazy (a Dask array: nothing is
read on the client). The returned :class:`RowsTemplate` rebuilds per-row outputs (labels,
responsibilities, log-likelihoods) on the original grid with its coordinates.

Row order: an in-memory object's rows are in C order over ``sample_dims`` (the last varies
fastest). A Dask-backed object is stacked block by block (``dask.array.reshape_blockwise``):
one row block per chunk of the grid, each in C order inside its chunk, the chunks in C order.
Dask's plain ``reshape`` would merge chunks to keep global C order, so that every partition
read several chunks; block by block, each worker reads only its own chunk. (The two orders
agree when only the first sample dimension is chunked.)

With ``out=`` an output is written to Zarr as an xarray dataset on the grid (one variable,
e.g. ``label``, with the coordinates), each partition writing its own chunk's region
(:func:`write_grid`); ``xarray.open_zarr(out)`` reads it back.

xarray is imported only when an xarray object is given (``import emflow`` works without it).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["is_xarray", "to_rows", "from_rows", "apply_on_grid", "layout_rows", "write_grid", "grid_rows",
           "RowsTemplate", "GridOut"]

# attribute of a grid output's variable while partitions write it: the sample dims' chunks
_BLOCKS = "emflow_row_blocks"


def is_xarray(obj) -> bool:
    """Whether ``obj`` is an xarray ``DataArray`` or ``Dataset`` (without importing xarray)."""
    return type(obj).__module__.startswith("xarray.") and type(obj).__name__ in ("DataArray", "Dataset")


@dataclass(frozen=True)
class RowsTemplate:
    """What :func:`from_rows` needs to put rows back on the grid: the sample dimensions (in
    stacking order), their sizes, the coordinates that live on them, and the features (the
    feature dimension's name and labels, or the Dataset's variable names). ``chunks``: the
    sample dimensions' chunks when the rows are stacked block by block (a Dask-backed object),
    else None (C order)."""

    sample_dims: tuple[str, ...]
    shape: tuple[int, ...]
    coords: dict[str, Any]
    feature_dim: str | None
    features: tuple | None
    is_dataset: bool
    chunks: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class GridOut(os.PathLike):
    """An ``out=`` path for an output of an xarray object: written as a dataset on
    ``template``'s grid (:func:`write_grid`) instead of one array of rows."""

    path: str
    template: RowsTemplate

    def __fspath__(self) -> str:
        return self.path


def _block_table(chunks):
    """``(first row of each block, block shapes, offsets per dimension)``, blocks in C order."""
    sizes = np.ones(1, dtype=np.int64)
    for c in chunks:
        sizes = np.multiply.outer(sizes, np.asarray(c, dtype=np.int64)).reshape(-1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in chunks]
    return starts, offsets


def _block_region(chunks, offsets, b: int):
    """``(region, shape)`` of block ``b`` (C order over the block grid)."""
    idx = np.unravel_index(b, tuple(len(c) for c in chunks))
    shape = tuple(int(c[i]) for c, i in zip(chunks, idx))
    region = tuple(slice(int(o[i]), int(o[i]) + n) for o, i, n in zip(offsets, idx, shape))
    return region, shape


def _c_order(chunks) -> bool:
    return chunks is None or all(len(c) == 1 for c in chunks[1:])


def grid_rows(arr, start: int, values):
    """``(where, values)`` to assign in the Zarr array ``arr`` for rows ``start ..`` of an
    output: rows ``start .. start + len(values)`` of an array of rows, or, for a grid output
    (while it is written, its variable records the row blocks), the block's region of the grid."""
    blocks = arr.attrs.get(_BLOCKS)
    if blocks is None:
        return slice(start, start + len(values)), values
    starts, offsets = _block_table(blocks)
    b = int(np.searchsorted(starts, start))
    region, shape = _block_region(blocks, offsets, b)
    return region, np.asarray(values).reshape(*shape, *np.shape(values)[1:])


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


def _reorder_features(obj, feature_dim: str, features) -> Any:
    """A DataArray's features in the fitted order (by label, when both have labels)."""
    if features is None or feature_dim not in obj.coords:
        return obj
    have, want = obj[feature_dim].values.tolist(), list(features)
    if have == want:
        return obj
    missing = [f for f in want if f not in have]
    if missing:
        raise DataError(f"The data's {feature_dim!r} has no {missing} (it has {have}); the model was fitted on "
                        f"{want}: select those.")
    return obj.sel({feature_dim: want})


def _chunked(obj, sample_dims, chunk_bytes: int):
    """An in-memory object as Dask blocks of about ``chunk_bytes`` along its first sample dim."""
    per = int(np.prod([obj.sizes[d] for d in obj.dims if d != sample_dims[0]], dtype=np.int64))
    itemsize = max(np.dtype(v.dtype).itemsize for v in getattr(obj, "data_vars", {None: obj}).values())
    step = max(1, int(chunk_bytes) // max(1, per * itemsize))
    return obj.chunk({d: (step if d == sample_dims[0] else -1) for d in obj.dims})


def to_rows(obj, sample_dims=None, feature_dim=None, *, features=None, chunk_bytes=None):
    """``(rows, template)``: the 2-D array of rows of an xarray object and its grid.

    Parameters
    ----------
    obj : xarray.DataArray or xarray.Dataset
        In memory or Dask-backed (then ``rows`` is a Dask array, one row block per chunk of
        the grid; nothing is computed).
    sample_dims : str or sequence of str, optional
        Dimensions stacked into rows, in this order (the last varies fastest); default every
        dimension but ``feature_dim``.
    feature_dim : str, optional
        A DataArray's feature dimension (required for a DataArray; its chunks must hold every
        feature). A Dataset's features are its data variables.
    features : sequence, optional
        Those a model was fitted on, in order: a Dataset's variables, or the labels of a
        DataArray's feature coordinate (the data's are reordered to match; one missing is a
        DataError naming it).
    chunk_bytes : int, optional
        Stack an in-memory object as Dask blocks of about this size along the first sample
        dimension (for an output written to Zarr chunk by chunk).

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
        obj = obj[names]
        sample_dims = _check_dims(obj, sample_dims, None)
        for v in names:
            if set(obj[v].dims) != set(sample_dims):
                raise DataError(f"Variable {v!r} has dimensions {list(obj[v].dims)}, not the sample dimensions "
                                f"{list(sample_dims)}; every feature variable must span them (broadcast it, or "
                                "drop it).")
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
        obj = _reorder_features(obj, feature_dim, features)
        fdim = feature_dim
        feats = tuple(obj[feature_dim].values.tolist()) if feature_dim in obj.coords else None
    if chunk_bytes is not None and not obj.chunks:  # in memory
        obj = _chunked(obj, sample_dims, chunk_bytes)
    shape = tuple(obj.sizes[d] for d in sample_dims)
    n = int(np.prod(shape, dtype=np.int64))
    rows, chunks = _stack(obj, sample_dims, feature_dim, feats if is_ds else None, n)
    coords = {k: c.variable for k, c in obj.coords.items() if c.dims and set(c.dims) <= set(sample_dims)}
    return rows, RowsTemplate(tuple(sample_dims), shape, coords, fdim, feats, is_ds, chunks)


def _stack(obj, sample_dims, feature_dim, names, n: int):
    """``(rows, chunks)``: the rows of a DataArray (``feature_dim``) or of a Dataset's variables
    ``names``; a Dask-backed object block by block (``chunks``: the sample dims' chunks)."""
    if names is None:
        arr = obj.transpose(*sample_dims, feature_dim).data
        if not type(arr).__module__.startswith("dask"):
            return np.asarray(arr).reshape(n, -1), None
        import dask.array as da

        return da.reshape_blockwise(arr, (n, arr.shape[-1])), tuple(arr.chunks[:-1])
    arrays = [obj[v].transpose(*sample_dims).data for v in names]
    lazy = [a for a in arrays if type(a).__module__.startswith("dask")]
    if not lazy:
        return np.stack([np.asarray(a).reshape(n) for a in arrays], axis=1), None
    import dask.array as da

    chunks = lazy[0].chunks  # every variable stacked with the first lazy one's blocks
    cols = [da.reshape_blockwise(da.asarray(a).rechunk(chunks), (n,)) for a in arrays]
    return da.stack(cols, axis=1).rechunk({1: -1}), tuple(chunks)


def from_rows(values, template: RowsTemplate, name: str, extra_dim: str | None = None):
    """A DataArray named ``name`` on the template's grid: ``values`` has one row per grid
    point, in the template's row order (shape ``(n_samples,)``, or ``(n_samples, k)`` with
    ``extra_dim`` naming the second axis, e.g. ``"component"``, coordinates ``0 .. k-1``)."""
    import xarray as xr

    lazy = type(values).__module__.startswith("dask")
    values = values if lazy else np.asarray(values)
    dims, shape, coords = template.sample_dims, template.shape, dict(template.coords)
    rest = tuple(values.shape[1:])
    if extra_dim is not None:
        dims, coords[extra_dim] = (*dims, extra_dim), np.arange(rest[0])
    chunks = template.chunks
    if _c_order(chunks):
        grid = values.reshape(*shape, *rest)
    elif lazy:
        import dask.array as da

        starts, _ = _block_table(chunks)
        sizes = tuple(np.diff(np.append(starts, len(values))).tolist())
        grid = da.reshape_blockwise(values.rechunk((sizes, *rest)), (*shape, *rest),
                                    chunks=(*chunks, *((r,) for r in rest)))
    else:
        grid = np.empty((*shape, *rest), dtype=values.dtype)
        starts, offsets = _block_table(chunks)
        for b, a in enumerate(starts):
            region, bshape = _block_region(chunks, offsets, b)
            grid[region] = values[a : a + int(np.prod(bshape))].reshape(*bshape, *rest)
    return xr.DataArray(grid, dims=dims, coords=coords, name=name)


# a mixture output's name on the grid, and the name of its second axis
_OUTPUT_NAMES = {"labels": ("label", None), "proba": ("proba", "component"), "score": ("log_likelihood", None),
                 "impute": ("imputed", "feature")}


def layout_rows(model, data, sample_dims=None, feature_dim=None, *, fitting: bool = False, chunk_bytes=None):
    """``(data, template)`` for ``model`` (a rows family): an xarray object's rows and grid,
    other data unchanged with template None.

    A fit records the layout on the model (``_xarray_layout``: sample dims, feature dim,
    features; saved with it); applying the model reuses it: a Dataset's variables are taken by
    name in the fitted order, a labelled DataArray's features by label, and the fitted sample
    dims' stacking order when the data have just those dimensions."""
    if not is_xarray(data):
        if fitting:
            model._xarray_layout = None
        return data, None
    if model.data_kind != "rows":
        raise DataError(f"{type(model).__name__} reads {model.data_kind}, not an xarray object; pass its arrays.")
    layout = {} if fitting else (getattr(model, "_xarray_layout", None) or {})
    features = layout.get("variables") or layout.get("features")
    if not fitting:
        feature_dim = layout.get("feature_dim") if feature_dim is None else feature_dim
        if feature_dim is None and type(data).__name__ == "DataArray":
            feature_dim = data.dims[-1]  # no recorded layout: the last dimension holds the features
        fitted_dims = layout.get("sample_dims")
        if sample_dims is None and fitted_dims and set(data.dims) == {*fitted_dims, *([feature_dim] if
                                                                                        feature_dim else [])}:
            sample_dims = tuple(fitted_dims)
    rows, template = to_rows(data, sample_dims, feature_dim, features=None if fitting else features,
                             chunk_bytes=chunk_bytes)
    if fitting:
        model._xarray_layout = {"sample_dims": list(template.sample_dims), "feature_dim": template.feature_dim,
                                "variables": list(template.features) if template.is_dataset else None,
                                "features": None if template.is_dataset or template.features is None
                                else list(template.features)}
    return rows, template


def apply_on_grid(model, data, kind: str, out=None, overwrite: bool = False):
    """Output ``kind`` (labels, proba, score, impute) of a fitted mixture on ``data``: for an
    xarray object, a DataArray on its grid, or with ``out`` a Zarr dataset on the grid written
    chunk by chunk (returned opened lazily with xarray); other data go to ``_apply_rows``."""
    if not is_xarray(data):  # (a DataFrame's column names checked by _xarray_rows)
        return model._apply_rows(model._xarray_rows(data)[0], kind, out, overwrite)
    from .data import DEFAULT_PARTITION_BYTES

    chunk_bytes = None if out is None else (getattr(model, "partition_bytes", None) or DEFAULT_PARTITION_BYTES)
    rows, template = model._xarray_rows(data, chunk_bytes=chunk_bytes)
    if out is None:
        return from_rows(model._apply_rows(rows, kind), template, *_OUTPUT_NAMES[kind])
    return model._apply_rows(rows, kind, GridOut(os.path.abspath(os.fspath(out)), template), overwrite)


def _zarr_step(chunks) -> int:
    """A Zarr chunk size along one dimension whose boundaries include every Dask block's."""
    return math.gcd(*chunks[:-1]) if len(chunks) > 1 else int(chunks[0])


def write_grid(out: GridOut, model, data, *, shape, dtype, fill, attrs: dict, overwrite: bool = False):
    """Write an output with one row per grid point as an xarray dataset at ``out.path``:
    one variable (``label``, ``proba``, ``log_likelihood`` or ``imputed``) on the grid with
    its coordinates, the group's ``emflow`` attribute ``attrs``; atomically, refusing what
    :func:`emflow.storage.destinations.check_destination` refuses. ``fill(url)`` runs the
    partitions, each writing its own block (:func:`grid_rows`). Returns the variable opened
    lazily with ``xarray.open_zarr``."""
    import dask.array as da
    import xarray as xr
    import zarr

    from . import destinations as _dest

    tpl = out.template
    name, extra = _OUTPUT_NAMES[attrs["kind"]]
    rest = tuple(shape[1:])
    dims = (*tpl.sample_dims, *([extra] if extra else []))
    coords = dict(tpl.coords)
    if extra:
        coords[extra] = np.arange(rest[0])
    steps = (*(_zarr_step(c) for c in tpl.chunks), *rest)
    with _dest.atomic_dir(out.path) as tmp:
        _dest.check_destination(out.path, "output", overwrite=overwrite, inputs=_dest.output_inputs(model, data))
        skeleton = xr.DataArray(da.zeros((*tpl.shape, *rest), dtype=dtype, chunks=steps), dims=dims,
                                coords=coords, name=name).to_dataset()
        skeleton.attrs["emflow"] = {**attrs, "sample_dims": list(tpl.sample_dims)}
        with warnings.catch_warnings():  # zarr: consolidated metadata is not in the v3 spec (xarray reads it)
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            skeleton.to_zarr(tmp, mode="w", compute=False)  # metadata and coordinates only
        url = os.path.join(os.path.abspath(tmp), name)
        arr = zarr.open_array(url, mode="r+")
        arr.attrs[_BLOCKS] = [list(map(int, c)) for c in tpl.chunks]
        fill(url)
        del arr.attrs[_BLOCKS]
    return xr.open_zarr(out.path)[name]
