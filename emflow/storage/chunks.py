"""Reading Zarr arrays: open one (a group resolves to its rows array), read element ranges.

Zarr reads a missing chunk as the fill value, which would silently become data; every Zarr
read a fit makes goes through :func:`read_chunked`, which refuses missing or undecodable
chunks with a DataError naming the chunk.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import DataError, DataNotFoundError

__all__ = ["open_zarr_array", "read_chunked", "check_pointer"]

ROWS_ARRAY_NAMES = ("X", "data", "values")


def _url(path: Any) -> str:
    s = os.fspath(path)
    return s if "://" in s else os.path.abspath(s)


def open_zarr_array(path: Any, *, role: str = "data"):
    """Open a Zarr array read-only; a group resolves to its rows array.

    A group written by emflow names its rows array in ``attrs["rows"]``; otherwise the
    first of ``X``, ``data``, ``values`` that exists is used.
    """
    import zarr

    url = _url(path)
    if "://" not in url and not os.path.exists(url):
        raise DataNotFoundError(
            f"No Zarr {role} at {url!r}. Check the path, or create a dataset first "
            "(`emflow generate` writes a synthetic one)."
        )
    if "://" not in url and os.path.isfile(url):
        raise DataError(
            f"{url!r} is a file, not a Zarr dataset (a folder). Convert it first: "
            f"`emflow ingest {os.fspath(path)} --out DATA.zarr` (or emflow.storage.ingest.ingest) reads CSV, "
            "Parquet, .npy and HDF5 files; then use DATA.zarr."
        )
    try:
        node = zarr.open(url, mode="r")
    except Exception as exc:  # zarr raises several types for "not a zarr store"
        raise DataNotFoundError(
            f"{url!r} exists but is not a readable Zarr array or group ({exc}). Point at the directory "
            "that holds zarr.json, or convert a CSV, Parquet, .npy or HDF5 file with `emflow ingest`."
        ) from exc
    if isinstance(node, zarr.Group):
        name = node.attrs.get("rows")
        candidates = [name] if name else [n for n in ROWS_ARRAY_NAMES if n in node]
        if not candidates:
            raise DataError(
                f"The Zarr group at {url!r} holds no rows array (looked for "
                f"{', '.join(ROWS_ARRAY_NAMES)}; found {sorted(node.array_keys())}). "
                "Pass the path of the array itself, e.g. 'dataset.zarr/NAME'."
            )
        return node[candidates[0]], url + "/" + candidates[0]
    return node, url


def check_pointer(ptr, count: str, where: str) -> np.ndarray:
    """The checks every pointer array (sequence offsets, a corpus's indptr) shares: 1-D with
    at least two entries, integers, starting at 0. Returns it as int64; ``count`` names what
    it delimits (``"n_sequences"``, ``"n_docs"``) in the error."""
    p = np.asarray(ptr)
    if p.ndim != 1 or p.size < 2:
        raise DataError(f"{where} must be 1-D with {count} + 1 >= 2 entries; got shape {p.shape}.")
    if p.dtype.kind not in "iu":
        raise DataError(f"{where} must be integers, got dtype {p.dtype}.")
    p = p.astype(np.int64)
    if p[0] != 0:
        raise DataError(f"{where}[0] must be 0, got {int(p[0])}.")
    return p


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "fiu":
        raise DataError(
            f"{where} has dtype {dtype}, which is not a real number type. Convert it to "
            "float32 or float64 first (e.g. `emflow ingest` with --dtype float64)."
        )


def _chunk_key(arr, coords: tuple[int, ...]) -> str:
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{key}" if arr.path else key


def _span(ci: int, size: int, extent: int) -> str:
    return f"{ci * size}-{min(extent, (ci + 1) * size)}"


def _chunk_where(arr, coords: tuple[int, ...], unit: str) -> str:
    """``rows 200-300`` (and ``columns 4-8`` when the array is chunked along its columns too)."""
    stored = tuple(arr.shards or arr.chunks)
    text = f"{unit} {_span(coords[0], stored[0], arr.shape[0])}"
    if arr.ndim == 2 and stored[1] < arr.shape[1]:
        text += f", columns {_span(coords[1], stored[1], arr.shape[1])}"
    return text


def _label(arr) -> str:
    return "Shard" if arr.shards else "Chunk"


def _fill(arr) -> str:
    v = arr.fill_value
    return str(v.item() if hasattr(v, "item") else v)


def _touched(arr, start: int, stop: int) -> list[tuple[int, ...]]:
    """Grid coordinates of every stored object (chunk, or shard) that elements [start, stop)
    along axis 0, all of the other axes, read."""
    import itertools

    stored = tuple(arr.shards or arr.chunks)
    first, last = start // stored[0], (stop - 1) // stored[0]
    rest = [range(max(1, -(-n // c))) for n, c in zip(arr.shape[1:], stored[1:])]
    return [(ci, *r) for ci in range(first, last + 1) for r in itertools.product(*rest)]


def read_chunked(arr, start: int, stop: int, role: str = "data", *, url: str | None = None,
                 unit: str = "rows") -> np.ndarray:
    """Elements [start, stop) along axis 0 (all of the other axes) of a Zarr array, refusing
    missing or unreadable chunks. Every array a fit reads goes through here.

    ``arr`` is an opened ``zarr.Array`` or its URL. Zarr reads a missing chunk as the fill
    value, which would silently become data, so every stored object the read touches (each
    chunk, or each shard of a sharded array, along every axis) must exist: one ``exists``
    per object, asked concurrently, and no second read. Zarr also leaves out chunks that
    hold only the fill value unless the array was written with
    ``config={"write_empty_chunks": True}`` (emflow's writers do); an array written without
    it that has such chunks says so with ``attrs["all_chunks_written"] = False``, and then
    its missing chunks read as the fill value. A chunk that fails to decode (truncated,
    altered) is always an error, and it is named with its rows. ``role`` (``"data"``,
    ``"weights"``, ``"sequence values"``...) and ``unit`` (``"rows"``, ``"steps"``,
    ``"entries"``, ``"documents"``) name the array and its first axis in errors.
    """
    import asyncio

    import zarr
    from zarr.core.sync import sync

    if not isinstance(arr, zarr.Array):
        url = url or str(arr)
        arr = zarr.open_array(arr, mode="r")
    url = url or str(arr.store_path)
    stop = min(int(stop), int(arr.shape[0]))
    if stop <= start:
        return arr[start:stop]
    coords = _touched(arr, start, stop)
    if arr.attrs.get("all_chunks_written") is not False:
        store = arr.store

        async def exist():
            return await asyncio.gather(*(store.exists(_chunk_key(arr, c)) for c in coords))

        found = sync(exist())
        missing = [c for c, ok in zip(coords, found) if not ok]
        if missing:
            c = missing[0]
            more = (f" ({len(missing)} of the {len(coords)} {_label(arr).lower()}s this read needs are missing)"
                    if len(missing) > 1 else "")
            raise DataError(
                f"{_label(arr)} {c} ({_chunk_where(arr, c, unit)}) of the {role} at {url!r} is missing from storage{more}, "
                f"so those {unit} would read as the fill value ({_fill(arr)}). Restore the chunk or re-create "
                "the dataset. (If the array legitimately leaves out chunks that hold only the fill value, as Zarr "
                "does unless written with config={'write_empty_chunks': True}, set attrs['all_chunks_written'] = "
                "False on it.)"
            )
    try:
        return arr[start:stop]
    except Exception as exc:
        stored = tuple(arr.shards or arr.chunks)
        for c in coords:
            region = tuple(slice(i * s, (i + 1) * s) for i, s in zip(c, stored))
            try:
                arr[region]
            except Exception as exc_c:
                raise DataError(
                    f"{_label(arr)} {c} ({_chunk_where(arr, c, unit)}) of the {role} at {url!r} cannot be read "
                    f"({type(exc_c).__name__}: {exc_c}). The file is corrupt (truncated or altered): restore it "
                    "or re-create the dataset."
                ) from exc_c
        raise DataError(f"{unit.capitalize()} {start}-{stop} of the {role} at {url!r} cannot be read "
                        f"({type(exc).__name__}: {exc}).") from exc
