"""Data access: open row datasets (Zarr, NumPy, Dask), validate them, choose partitions.

A partition is a run of whole Zarr chunks (or rows of an in-memory array). Each partition
is described by a small picklable *loader*; calling the loader on a worker reads that
partition (``X`` of shape (rows, n_features) and optional weights of shape (rows,)) and
checks it, so data never travel through the client.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, DataError, DataNotFoundError, NonFiniteDataError

__all__ = ["RowData", "open_rows", "open_zarr_array", "is_zarr_path", "DEFAULT_PARTITION_BYTES"]

DEFAULT_PARTITION_BYTES = 64 * 2**20
ROWS_ARRAY_NAMES = ("X", "data", "values")


def is_zarr_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


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
            f"`emflow ingest {os.fspath(path)} --out DATA.zarr` (or emflow.ingest.ingest) reads CSV, "
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


def _check_finite(X: np.ndarray, w: np.ndarray | None, where: str, row0: int, chunk_rows: int | None = None) -> None:
    if X.dtype.kind == "f":
        bad = ~np.isfinite(X)
        if bad.any():
            count = int(bad.sum())
            r, c = np.argwhere(bad)[0]
            row = row0 + int(r)
            chunk = ""
            if chunk_rows:
                ci = row // chunk_rows
                chunk = f" (Zarr chunk {ci}, rows {ci * chunk_rows}-{(ci + 1) * chunk_rows})"
            raise NonFiniteDataError(
                f"{where} holds {count} NaN or infinite value(s); the first is at row "
                f"{row}, column {int(c)}{chunk}. Remove or impute those rows before fitting."
            )
    if w is not None:
        badw = ~np.isfinite(w) | (w < 0)
        if badw.any():
            r = int(np.flatnonzero(badw)[0])
            raise DataError(
                f"sample_weight for {where} holds {int(badw.sum())} negative, NaN or infinite "
                f"value(s); the first is at row {row0 + r}. Weights must be finite and >= 0."
            )


def _chunk_key(arr, coords: tuple[int, ...]) -> str:
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{key}" if arr.path else key


def read_zarr_rows(url: str, start: int, stop: int, role: str = "data") -> np.ndarray:
    """Rows [start, stop) of a Zarr array, refusing missing or unreadable chunks.

    Zarr reads a missing chunk as the fill value, which would silently become data. Zarr
    also skips writing chunks that hold only the fill value, so a missing chunk is an error
    only in arrays whose writer stored every chunk and said so with the attribute
    ``all_chunks_written`` (emflow's generators and ingest do). A chunk that fails to
    decode is always an error, and it is named.
    """
    import zarr
    from zarr.core.sync import sync

    arr = zarr.open_array(url, mode="r")
    if stop <= start:
        return arr[start:stop]
    c = int(arr.chunks[0])
    first, last = start // c, (stop - 1) // c
    trailing = (0,) * (arr.ndim - 1)
    for ci in range(first, last + 1) if arr.attrs.get("all_chunks_written") else ():
        coords = (ci, *trailing)
        if not sync(arr.store.exists(_chunk_key(arr, coords))):
            raise DataError(
                f"Chunk {coords} (rows {ci * c}-{min(arr.shape[0], (ci + 1) * c)}) of the {role} at {url!r} "
                "is missing from storage, so those rows would read as the fill value. Restore the "
                "chunk or re-create the dataset."
            )
    try:
        return arr[start:stop]
    except Exception as exc:
        for ci in range(first, last + 1):
            try:
                arr[ci * c : (ci + 1) * c]
            except Exception as exc_c:
                raise DataError(
                    f"Chunk {(ci, *trailing)} (rows {ci * c}-{min(arr.shape[0], (ci + 1) * c)}) of the {role} "
                    f"at {url!r} cannot be read ({type(exc_c).__name__}: {exc_c}). The file is corrupt: "
                    "restore it or re-create the dataset."
                ) from exc_c
        raise DataError(f"Rows {start}-{stop} of the {role} at {url!r} cannot be read: {exc}") from exc


@dataclass(frozen=True)
class ZarrLoader:
    """Reads rows [start, stop) of a Zarr array (and its weights) on whichever process calls it."""

    url: str
    start: int
    stop: int
    index: int
    weights_url: str | None = None
    chunk_rows: int | None = None

    def __call__(self) -> tuple[np.ndarray, np.ndarray | None]:
        X = read_zarr_rows(self.url, self.start, self.stop)
        w = None
        if self.weights_url is not None:
            w = np.asarray(read_zarr_rows(self.weights_url, self.start, self.stop, "weights"), dtype=np.float64)
        _check_finite(X, w, f"partition {self.index} (rows {self.start}-{self.stop}) of {self.url}", self.start,
                      self.chunk_rows)
        return X, w


@dataclass(frozen=True)
class ArrayLoader:
    """A partition already in memory (NumPy input)."""

    X: np.ndarray = field(repr=False)
    w: np.ndarray | None = field(repr=False)
    start: int
    index: int

    def __call__(self):
        stop = self.start + len(self.X)
        _check_finite(self.X, self.w, f"partition {self.index} (rows {self.start}-{stop}) of the array", self.start)
        return self.X, self.w


@dataclass(frozen=True)
class DaskLoader:
    """One row block of a Dask array, computed with the synchronous scheduler where it runs."""

    block: Any = field(repr=False)
    wblock: Any = field(repr=False)
    start: int
    index: int

    def __call__(self):
        import dask

        X, w = dask.compute(self.block, self.wblock, scheduler="sync")
        X = np.asarray(X)
        w = None if w is None else np.asarray(w, dtype=np.float64)
        stop = self.start + len(X)
        _check_finite(X, w, f"partition {self.index} (rows {self.start}-{stop}) of the dask array", self.start)
        return X, w


@dataclass
class RowData:
    """A row dataset split into partitions.

    Attributes
    ----------
    n_rows, n_features : int
    dtype : numpy dtype of the stored values
    loaders : list of callables returning ``(X, w)`` for one partition
    bounds : list of (start, stop)
    source : str
        A description for reports and model attributes.
    in_memory : bool
        True when the client already holds the values (NumPy input).
    url : str or None
        The Zarr array's location, when the data are in Zarr.
    chunk_rows : int
        Rows per storage chunk (outputs are written with the same chunking).
    """

    n_rows: int
    n_features: int
    dtype: np.dtype
    loaders: list[Callable]
    bounds: list[tuple[int, int]]
    source: str
    in_memory: bool
    url: str | None
    chunk_rows: int
    weighted: bool

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.n_features * np.dtype(self.dtype).itemsize

    @property
    def n_partitions(self) -> int:
        return len(self.loaders)


def _bounds(n_rows: int, chunk_rows: int, row_bytes: int, target_bytes: int, min_partitions: int):
    n_chunks = max(1, -(-n_rows // chunk_rows))
    if n_chunks < min_partitions and n_rows >= 2 * min_partitions:
        # Too few chunks to keep every worker busy: split inside chunks (each chunk is then
        # decompressed by more than one task, which is cheap next to an E-step).
        step = -(-n_rows // min_partitions)
        return [(a, min(n_rows, a + step)) for a in range(0, n_rows, step)]
    per = max(1, target_bytes // max(1, chunk_rows * row_bytes))
    per = min(per, max(1, n_chunks // max(1, min_partitions)))
    step = per * chunk_rows
    return [(a, min(n_rows, a + step)) for a in range(0, n_rows, step)]


def _as_weights(sample_weight, n_rows: int, base_url: str | None):
    """Returns (numpy or dask weights or None, zarr url or None)."""
    if sample_weight is None:
        return None, None
    if is_zarr_path(sample_weight):
        s = os.fspath(sample_weight)
        if base_url is not None and "/" not in s and "://" not in s and not os.path.exists(s):
            # a bare name: an array beside the data in the same group
            s = base_url.rsplit("/", 1)[0] + "/" + s
        arr, url = open_zarr_array(s, role="weights")
        if arr.ndim != 1 or arr.shape[0] != n_rows:
            raise DataError(
                f"sample_weight at {url!r} has shape {arr.shape}; expected ({n_rows},), one weight per row."
            )
        _check_dtype(np.dtype(arr.dtype), f"sample_weight at {url!r}")
        return None, url
    try:
        import dask.array as da

        if isinstance(sample_weight, da.Array):
            if sample_weight.ndim != 1 or sample_weight.shape[0] != n_rows:
                raise DataError(f"sample_weight has shape {sample_weight.shape}; expected ({n_rows},).")
            return sample_weight, None
    except ImportError:  # pragma: no cover
        pass
    w = np.asarray(sample_weight)
    if w.ndim != 1 or w.shape[0] != n_rows:
        raise DataError(f"sample_weight has shape {w.shape}; expected ({n_rows},), one weight per row.")
    _check_dtype(w.dtype, "sample_weight")
    return w.astype(np.float64), None


def open_rows(
    data: Any,
    sample_weight: Any = None,
    *,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    min_partitions: int = 1,
    min_rows: int = 1,
) -> RowData:
    """Open a row dataset and split it into partitions.

    Parameters
    ----------
    data : str, PathLike, zarr.Array, dask.array.Array or array-like of shape (n_samples, n_features)
        A path or URL of a Zarr array (or of a group holding one), an opened Zarr array,
        a Dask array, or an in-memory array.
    sample_weight : array-like of shape (n_samples,), Zarr path, or None
        Row weights. A bare name (``"weights"``) means the array of that name beside the
        data in the same Zarr group.
    partition_bytes : int
        Target size of a partition; partitions are whole storage chunks.
    min_partitions : int
        Split finer than ``partition_bytes`` when needed to give every worker thread work.
    min_rows : int
        Fewer rows than this is an error (a mixture needs at least ``n_components`` rows).
    """
    import zarr

    url = None
    if is_zarr_path(data) or isinstance(data, zarr.Array):
        if isinstance(data, zarr.Array):
            arr = data
            store_root = getattr(arr.store, "root", None)
            if store_root is None:
                raise ConfigError(
                    "This Zarr array lives in a store workers cannot open by path (for example "
                    "an in-memory store). Save it to a directory or URL and pass that path."
                )
            url = os.path.join(str(store_root), arr.path) if arr.path else str(store_root)
        else:
            arr, url = open_zarr_array(data)
        shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
        chunk_rows = int(arr.chunks[0]) if arr.ndim >= 1 else 1
        source = url
    else:
        try:
            import dask.array as da
        except ImportError:  # pragma: no cover
            da = None
        if da is not None and isinstance(data, da.Array):
            arr = data
        else:
            arr = np.asarray(data)
            if arr.dtype == object:
                raise DataError(
                    "The data are an object array (mixed or non-numeric values). Pass a numeric "
                    "array of shape (n_samples, n_features)."
                )
        shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
        chunk_rows = None
        source = "dask array" if not isinstance(arr, np.ndarray) else "in-memory array"

    where = f"The data ({source})"
    if len(shape) != 2:
        hint = " Reshape 1-D data with X.reshape(-1, 1)." if len(shape) == 1 else ""
        raise DataError(f"{where} have shape {shape}; expected 2-D (n_samples, n_features).{hint}")
    _check_dtype(dtype, where)
    n_rows, n_features = shape
    if n_rows == 0 or n_features == 0:
        raise DataError(f"{where} are empty (shape {shape}); there is nothing to fit.")
    if n_rows < min_rows:
        raise DataError(
            f"{where} have {n_rows} row(s) but at least {min_rows} are needed "
            "(one per mixture component). Use fewer components or more data."
        )

    w_arr, w_url = _as_weights(sample_weight, n_rows, url)
    row_bytes = n_features * dtype.itemsize
    loaders: list[Callable] = []
    if url is not None:
        bounds = _bounds(n_rows, chunk_rows, row_bytes, partition_bytes, min_partitions)
        if w_arr is not None:  # in-memory weights beside Zarr data: ship their slices
            loaders = [
                _ZarrWithWeights(ZarrLoader(url, a, b, i, None, chunk_rows), w_arr[a:b])
                for i, (a, b) in enumerate(bounds)
            ]
        else:
            loaders = [ZarrLoader(url, a, b, i, w_url, chunk_rows) for i, (a, b) in enumerate(bounds)]
        return RowData(n_rows, n_features, dtype, loaders, bounds, source, False, url, chunk_rows, w_arr is not None or w_url is not None)

    if w_url is not None:
        import dask.array as da

        w_arr = da.from_zarr(w_url)
    if isinstance(arr, np.ndarray):
        rows = max(1, partition_bytes // max(1, row_bytes))
        rows = min(rows, max(1, -(-n_rows // max(1, min_partitions))))
        bounds = [(a, min(n_rows, a + rows)) for a in range(0, n_rows, rows)]
        wn = None if w_arr is None else np.asarray(w_arr, dtype=np.float64)
        loaders = [
            ArrayLoader(arr[a:b], None if wn is None else wn[a:b], a, i) for i, (a, b) in enumerate(bounds)
        ]
        return RowData(n_rows, n_features, dtype, loaders, bounds, source, True, None, rows, wn is not None)

    # dask array: one partition per row block
    arr = arr.rechunk({1: -1}) if len(arr.chunks[1]) > 1 else arr
    starts = np.concatenate([[0], np.cumsum(arr.chunks[0])])
    bounds = [(int(starts[i]), int(starts[i + 1])) for i in range(len(arr.chunks[0]))]
    blocks = arr.to_delayed().ravel()
    if w_arr is not None:
        import dask.array as da

        w_d = da.asarray(w_arr).rechunk((arr.chunks[0],)).to_delayed().ravel()
    else:
        w_d = [None] * len(blocks)
    loaders = [DaskLoader(blocks[i], w_d[i], a, i) for i, (a, b) in enumerate(bounds)]
    return RowData(n_rows, n_features, dtype, loaders, bounds, source, False, None, int(arr.chunks[0][0]), w_arr is not None)


@dataclass(frozen=True)
class _ZarrWithWeights:
    inner: ZarrLoader
    w: np.ndarray = field(repr=False)

    @property
    def index(self):
        return self.inner.index

    def __call__(self):
        X, _ = self.inner()
        _check_finite(X, self.w, f"partition {self.inner.index} of {self.inner.url}", self.inner.start)
        return X, self.w


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_COL_SALT = np.uint64(0x632BE59BD9B4E019)


def positional_hash(a: np.ndarray, row0: int, seeds=(0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)) -> tuple[int, int]:
    """An additive content hash of rows ``row0, row0 + 1, ...`` of a larger array.

    Each 32-bit word of the raw bytes, at global row ``r`` and word column ``c``, is
    multiplied by ``R(r) * C(c)`` with ``R`` and ``C`` pseudo-random odd numbers (splitmix64
    of the position), and the products are summed modulo 2**64 (twice, with two seeds).
    The hash of an array is the sum of the hashes of any split of it into row ranges, so a
    dataset's fingerprint does not depend on how it is chunked or partitioned. The
    multipliers factor into a row part and a column part, so a row costs one integer
    dot product and one mix: about three operations per word (~1.5 GB/s on one core here).
    """
    a = np.ascontiguousarray(a)
    n = a.shape[0] if a.ndim else 1
    raw = a.reshape(n, -1).view(np.uint8).reshape(n, -1) if n else np.zeros((0, 4), np.uint8)
    width = raw.shape[1]
    if width % 4:
        raw = np.pad(raw, ((0, 0), (0, 4 - width % 4)))
    words = raw.view(np.uint32)
    per_row = words.shape[1]
    out = [0, 0]
    cols = np.arange(per_row, dtype=np.uint64)
    step = max(1, (1 << 18) // max(per_row, 1))
    with np.errstate(over="ignore"):
        col_mult = [_mix64((cols + _COL_SALT) ^ np.uint64(seed)) | np.uint64(1) for seed in seeds]
        for b0 in range(0, n, step):
            blk = words[b0 : b0 + step].astype(np.uint64)
            rows = np.uint64(row0 + b0) + np.arange(len(blk), dtype=np.uint64)
            for i, seed in enumerate(seeds):
                per_row_sum = blk @ col_mult[i]  # integer matmul: wraps modulo 2**64
                row_mult = _mix64(rows ^ np.uint64(seed)) | np.uint64(1)
                out[i] = (out[i] + int(np.sum(per_row_sum * row_mult, dtype=np.uint64))) & 0xFFFFFFFFFFFFFFFF
    return out[0], out[1]


def digest(row0: int, X: np.ndarray, *rest: np.ndarray | None) -> tuple[int, int, int]:
    """(rows, hash1, hash2) of a partition's first array (and any further arrays that are
    row-aligned with it, such as weights), positioned at global row ``row0``."""
    h1 = h2 = 0
    for k, arr in enumerate((X, *rest)):
        if arr is None:
            continue
        a, b = positional_hash(arr, row0, seeds=(0x9E3779B97F4A7C15 + k, 0xD1B54A32D192ED03 + k))
        h1, h2 = (h1 + a) & 0xFFFFFFFFFFFFFFFF, (h2 + b) & 0xFFFFFFFFFFFFFFFF
    return X.shape[0], h1, h2


def weight_total(X: np.ndarray, w: np.ndarray | None = None) -> float:
    """Total weight of a row partition (its row count when unweighted)."""
    return float(X.shape[0]) if w is None else float(np.sum(w, dtype=np.float64))


def combine_fingerprint(shape, dtype, partials: list[tuple[int, int]], structure: np.ndarray | None = None) -> str:
    """One fingerprint from the partitions' additive hashes (and a global structure array
    such as sequence offsets or a corpus's indptr)."""
    h1 = sum(p[0] for p in partials) & 0xFFFFFFFFFFFFFFFF
    h2 = sum(p[1] for p in partials) & 0xFFFFFFFFFFFFFFFF
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(shape), str(np.dtype(dtype)), h1, h2)).encode())
    if structure is not None:
        h.update(np.ascontiguousarray(structure).view(np.uint8).ravel())
    return h.hexdigest()
