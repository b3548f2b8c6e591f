"""Data access: open row datasets (Zarr, NumPy, Dask), validate them, choose partitions.

A partition is a run of whole Zarr chunks (or rows of an in-memory array). Each partition
is described by a small picklable *loader*; calling the loader on a worker reads that
partition (``X`` of shape (rows, n_features) and optional weights of shape (rows,)) and
checks it, so data never travel through the client.

Every Zarr read goes through :func:`emflow.storage.chunks.read_chunked` (a missing or
undecodable chunk is a DataError that names it). A partition's values are checked where it is
read (:class:`CheckedLoader`, the findings below); the engine's opening scan and the
fingerprint are in :mod:`emflow.storage.fingerprint`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np

from .chunks import _check_dtype, open_zarr_array, read_chunked
from ..errors import ConfigError, DataError, FitFailedError, NonFiniteDataError

__all__ = ["RowData", "open_rows", "is_zarr_path", "DEFAULT_PARTITION_BYTES"]

DEFAULT_PARTITION_BYTES = 64 * 2**20


def is_zarr_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


# -- value checks ---------------------------------------------------------------------
# A partition's values are checked where it is read, and what is wrong is returned as
# Findings rather than raised: the opening scan (which reads every partition once) sums
# them over the dataset, so an error counts the whole dataset's bad values and names the
# first, and no worker logs a traceback for an error the client is about to report.

# values whose square overflows float64: no Gaussian model of them exists in float64
SQUARE_LIMIT = float(np.sqrt(np.finfo(np.float64).max))  # ~1.34e154


class Finding(NamedTuple):
    """One kind of bad value in a partition: how many, and where the first is."""

    kind: str  # a key of FINDINGS
    count: int
    first: str  # e.g. "at row 612, column 1 (Zarr chunk 6, rows 600-700)"


# kind -> (error class, what the values are, what to do)
FINDINGS: dict[str, tuple[type, str, str]] = {
    "nonfinite": (NonFiniteDataError, "NaN or infinite value(s)", "Remove or impute them before fitting."),
    "weights": (DataError, "negative, NaN or infinite sample weight(s)", "Weights must be finite and >= 0."),
    "huge": (FitFailedError, f"value(s) too large to square in float64 (beyond {SQUARE_LIMIT:.3g})",
             "No Gaussian model of them exists in float64. Scale the data before fitting, e.g. divide each "
             "column by its standard deviation or by a power of ten."),
    "infinite": (NonFiniteDataError, "infinite value(s)", "NaN marks a missing value here, infinity is not "
                 "allowed: replace it with NaN or a finite value."),
    "term": (DataError, "term id(s) outside [0, n_terms)", "The vocabulary and the term ids do not match."),
    "count_nonfinite": (NonFiniteDataError, "NaN or infinite count(s)", "Counts must be finite."),
    "count_negative": (DataError, "negative count(s)", "Topic models need counts >= 0."),
    "empty_row": (DataError, "row(s) with every value missing (NaN)", "A row with no observed value says "
                  "nothing about the model: drop those rows."),
}


def finding_error(where: str, f: Finding, count: int | None = None) -> Exception:
    cls, what, advice = FINDINGS[f.kind]
    return cls(f"{where} holds {f.count if count is None else count} {what}; the first is {f.first}. {advice}")


def raise_findings(findings, where: str) -> None:
    if findings:
        raise finding_error(where, findings[0])


class CheckedLoader:
    """A partition loader: calling it ``read()``s the partition's arrays and raises what its
    value ``checks`` find there (named by ``where``); subclasses define those three."""

    def __call__(self):
        parts = self.read()
        raise_findings(self.checks.findings(parts), self.where)
        return parts


def value_findings(X: np.ndarray, row0: int, unit: str = "row", chunk_rows: int | None = None,
                   limit: float | None = None, allow_nan: bool = False) -> list[Finding]:
    """Non-finite values of a 2-D float partition (only infinities with ``allow_nan``), and,
    with ``limit``, values beyond it in magnitude. One min and one max over the data when
    they are clean; the detailed count only when they are not."""
    if X.dtype.kind != "f" or X.size == 0:
        return []

    def at(r, c, value=None):
        row = row0 + int(r)
        chunk = ""
        if chunk_rows:
            ci = row // chunk_rows
            chunk = f" (Zarr chunk {ci}, {unit}s {ci * chunk_rows}-{(ci + 1) * chunk_rows})"
        v = "" if value is None else f"{value:.3g} "
        return f"{v}at {unit} {row}, column {int(c)}{chunk}"

    with np.errstate(invalid="ignore"):
        lo, hi = np.min(X), np.max(X)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = np.isinf(X) if allow_nan else ~np.isfinite(X)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            return [Finding("infinite" if allow_nan else "nonfinite", int(bad.sum()), at(r, c))]
        if limit is None:
            return []
        with np.errstate(invalid="ignore"):
            lo, hi = np.nanmin(X), np.nanmax(X)
    if limit is not None and max(-float(lo), float(hi)) > limit:
        big = np.abs(X) > limit
        r, c = np.argwhere(big)[0]
        return [Finding("huge", int(big.sum()), at(r, c, X[r, c]))]
    return []


def weight_findings(w: np.ndarray | None, row0: int) -> list[Finding]:
    if w is None:
        return []
    badw = ~np.isfinite(w) | (w < 0)
    if not badw.any():
        return []
    return [Finding("weights", int(badw.sum()), f"at row {row0 + int(np.flatnonzero(badw)[0])}")]


def empty_row_findings(X: np.ndarray, row0: int) -> list[Finding]:
    """Rows whose every value is NaN (where NaN marks a missing value)."""
    if X.dtype.kind != "f" or X.size == 0:
        return []
    empty = np.flatnonzero(np.isnan(X).all(axis=1))
    return [Finding("empty_row", int(empty.size), f"at row {row0 + int(empty[0])}")] if empty.size else []


@dataclass(frozen=True)
class RowChecks:
    """What a row partition's values must satisfy: finite (with ``allow_nan``, NaN marks a
    missing value and a row must keep one observed value), squarable, weights >= 0."""

    row0: int
    chunk_rows: int | None = None
    allow_nan: bool = False

    def findings(self, parts) -> list[Finding]:
        X, w = parts
        found = value_findings(X, self.row0, "row", self.chunk_rows, SQUARE_LIMIT, self.allow_nan)
        if self.allow_nan and not found:
            found = empty_row_findings(X, self.row0)
        return found + weight_findings(w, self.row0)


def _check_finite(X: np.ndarray, w: np.ndarray | None, where: str, row0: int, chunk_rows: int | None = None,
                  allow_nan: bool = False) -> None:
    found = value_findings(X, row0, "row", chunk_rows, allow_nan=allow_nan)
    raise_findings(found or (empty_row_findings(X, row0) if allow_nan else []) + weight_findings(w, row0), where)


@dataclass(frozen=True)
class ZarrLoader(CheckedLoader):
    """Reads rows [start, stop) of a Zarr array (and its weights) on whichever process calls it."""

    url: str
    start: int
    stop: int
    index: int
    weights_url: str | None = None
    chunk_rows: int | None = None
    allow_nan: bool = False

    @property
    def where(self) -> str:
        return f"partition {self.index} (rows {self.start}-{self.stop}) of {self.url}"

    @property
    def checks(self) -> RowChecks:
        return RowChecks(self.start, self.chunk_rows, self.allow_nan)

    def read(self) -> tuple[np.ndarray, np.ndarray | None]:
        X = read_chunked(self.url, self.start, self.stop, "data", url=self.url)
        w = None
        if self.weights_url is not None:
            w = np.asarray(read_chunked(self.weights_url, self.start, self.stop, "weights", url=self.weights_url),
                           dtype=np.float64)
        return X, w


@dataclass(frozen=True)
class ArrayLoader(CheckedLoader):
    """A partition already in memory (NumPy input)."""

    X: np.ndarray = field(repr=False)
    w: np.ndarray | None = field(repr=False)
    start: int
    index: int
    allow_nan: bool = False

    @property
    def where(self) -> str:
        return f"partition {self.index} (rows {self.start}-{self.start + len(self.X)}) of the array"

    @property
    def checks(self) -> RowChecks:
        return RowChecks(self.start, allow_nan=self.allow_nan)

    def read(self):
        return self.X, self.w


@dataclass(frozen=True)
class DaskLoader(CheckedLoader):
    """One row block of a Dask array, computed with the synchronous scheduler where it runs."""

    block: Any = field(repr=False)
    wblock: Any = field(repr=False)
    start: int
    index: int
    allow_nan: bool = False

    @property
    def where(self) -> str:
        return f"partition {self.index} (rows from {self.start}) of the dask array"

    @property
    def checks(self) -> RowChecks:
        return RowChecks(self.start, allow_nan=self.allow_nan)

    def read(self):
        import dask

        X, w = dask.compute(self.block, self.wblock, scheduler="sync")
        return np.asarray(X), (None if w is None else np.asarray(w, dtype=np.float64))


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
    what: ClassVar[str] = "The data"  # how errors about the whole dataset name it

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
    allow_nan: bool = False,
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
    allow_nan : bool, default False
        NaN marks a missing value (for models that marginalise them); a row of only NaN, and
        infinities, are still errors.
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
        raise DataError(  # scikit-learn's words first: its users match them
            f"Expected n_samples >= n_components but got n_components = {min_rows}, n_samples = {n_rows}: "
            f"{where} have {n_rows} row(s), one per mixture component is needed. Use fewer components or more data."
        )

    w_arr, w_url = _as_weights(sample_weight, n_rows, url)
    row_bytes = n_features * dtype.itemsize
    loaders: list[Callable] = []
    if url is not None:
        bounds = _bounds(n_rows, chunk_rows, row_bytes, partition_bytes, min_partitions)
        if w_arr is not None:  # in-memory weights beside Zarr data: ship their slices
            loaders = [
                _ZarrWithWeights(ZarrLoader(url, a, b, i, None, chunk_rows, allow_nan), w_arr[a:b])
                for i, (a, b) in enumerate(bounds)
            ]
        else:
            loaders = [ZarrLoader(url, a, b, i, w_url, chunk_rows, allow_nan) for i, (a, b) in enumerate(bounds)]
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
            ArrayLoader(arr[a:b], None if wn is None else wn[a:b], a, i, allow_nan) for i, (a, b) in enumerate(bounds)
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
    loaders = [DaskLoader(blocks[i], w_d[i], a, i, allow_nan) for i, (a, b) in enumerate(bounds)]
    return RowData(n_rows, n_features, dtype, loaders, bounds, source, False, None, int(arr.chunks[0][0]), w_arr is not None)


@dataclass(frozen=True)
class _ZarrWithWeights(CheckedLoader):
    inner: ZarrLoader
    w: np.ndarray = field(repr=False)

    @property
    def index(self):
        return self.inner.index

    @property
    def where(self) -> str:
        return self.inner.where

    @property
    def checks(self) -> RowChecks:
        return self.inner.checks

    def read(self):
        return self.inner.read()[0], self.w


