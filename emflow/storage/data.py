"""Data access: open row datasets (Zarr, NumPy, Dask), validate them, choose partitions.

A partition is a run of whole Zarr chunks (or rows of an in-memory array). Each partition
is described by a small picklable *loader*; calling the loader on a worker reads that
partition (``X`` of shape (rows, n_features) and optional weights of shape (rows,)) and
checks it, so data never travel through the client.

Every Zarr read goes through :func:`read_chunked` (a missing or undecodable chunk is a
DataError that names it). The engine's opening scan (:func:`scan_partition`) reads each
partition once: it checks the values (bad ones counted over the whole dataset), computes
the fingerprint, and keeps each partition's digest, which every later streamed read must
match (:class:`Checked`), so a fit stops if its data change under it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np

from ..errors import ConfigError, DataError, DataNotFoundError, EmflowError, FitFailedError, NonFiniteDataError

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


@dataclass(frozen=True)
class RowChecks:
    """What a row partition's values must satisfy: finite, squarable, weights >= 0."""

    row0: int
    chunk_rows: int | None = None

    def findings(self, parts) -> list[Finding]:
        X, w = parts
        return value_findings(X, self.row0, "row", self.chunk_rows, SQUARE_LIMIT) + weight_findings(w, self.row0)


def _check_finite(X: np.ndarray, w: np.ndarray | None, where: str, row0: int, chunk_rows: int | None = None) -> None:
    raise_findings(value_findings(X, row0, "row", chunk_rows) + weight_findings(w, row0), where)


# -- partitions: read, scan, re-read --------------------------------------------------
def read_partition(loader):
    """A partition's arrays, without the value checks (those run in the scan)."""
    return loader.read() if hasattr(loader, "read") else loader()


def read_quiet(loader):
    """``read_partition``, returning an expected error instead of raising it, so that the
    Dask worker running it does not log a traceback; the scan hands it to the client."""
    try:
        return read_partition(loader)
    except EmflowError as exc:
        return exc


_SEEDS = (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)


def _check_digest(parts: tuple, row0: int, skip: int = 0) -> tuple:
    """What a re-read of a partition must match: its length and the first-seed positional
    hash of each of its arrays (64 bits each: half the work of the fingerprint's two seeds).
    The first ``skip`` arrays' hashes are left out (the scan has them from the fingerprint)."""
    return (len(parts[0]), *(positional_hash(a, row0, seeds=(_SEEDS[0] + k,))[0]
                             for k, a in enumerate(parts) if k >= skip and isinstance(a, np.ndarray)))


def _scan_check(parts: tuple, hashed: int, row0: int, head: tuple) -> tuple:
    """:func:`_check_digest` of a scanned partition, reusing the fingerprint's hashes: the
    first-seed hash of each hashed array, which ``digest`` sums into ``head[1]``."""
    if hashed == 1:
        n, *extra = _check_digest(parts, row0, skip=1)
        return (n, head[1], *extra)
    return _check_digest(parts, row0)  # X and weights: their hashes are summed in head


class Scan(NamedTuple):
    rows: int
    weight_sum: float
    h1: int
    h2: int
    findings: tuple
    check: tuple


def scan_partition(handle, checks, weighted: bool, row0: int):
    """Read (a loader) or take (resident data) a partition, check its values and hash it.

    Returns a :class:`Scan`, or the expected error (an ``EmflowError``) that reading it
    raised: returned, not raised, so no worker logs it; :func:`finish_scan` raises it on
    the client. Only the first array (rows, sequence values, corpus entries) and, for rows,
    the weights enter the fingerprint; the structure arrays (offsets, indptr) are hashed
    once globally. ``check`` covers every array, for :class:`Checked` re-reads.
    """
    try:
        if isinstance(handle, BaseException):
            return handle
        parts = handle if isinstance(handle, tuple) else read_partition(handle)
        found = tuple(checks.findings(parts)) if checks is not None else ()
        hashed = 2 if weighted else 1
        head = digest(row0, *parts[:hashed])
        total = weight_total(*parts) if weighted and not found else float(head[0])
        return Scan(head[0], total, head[1], head[2], found, _scan_check(parts, hashed, row0, head))
    except EmflowError as exc:
        return exc


def finish_scan(rows, scans: list) -> tuple[str, float]:
    """Raise what the scan found (the first partition's error; bad values counted over the
    whole dataset, the first named), else return ``(fingerprint, weight sum)``."""
    for s in scans:
        if isinstance(s, BaseException):
            raise s
    first = next((s.findings[0] for s in scans if s.findings), None)
    if first is not None:
        total = sum(f.count for s in scans for f in s.findings if f.kind == first.kind)
        raise finding_error(f"{getattr(rows, 'what', 'The data')} ({rows.source})", first, total)
    structure = getattr(rows, "offsets", None)
    if structure is None:
        structure = getattr(rows, "indptr", None)
    fingerprint = combine_fingerprint((rows.n_rows, rows.n_features), rows.dtype, [(s.h1, s.h2) for s in scans],
                                      structure)
    weight_sum = float(sum(s.weight_sum for s in scans))
    if getattr(rows, "weighted", True) and not weight_sum > 0:  # (a corpus may hold no words)
        raise DataError("sample_weight sums to zero: at least one row needs a positive weight.")
    return fingerprint, weight_sum


@dataclass(frozen=True)
class Checked:
    """A streamed partition's loader that refuses data changed since the fit's opening scan.

    Each pass re-reads the partition and recomputes a 64-bit positional hash of each of its
    arrays (the first of the fingerprint's two seeds, which the scan already computed; ~3
    GB/s per idle core), so a fit never mixes two versions of the data and never records
    the fingerprint of data it did not fit. A change goes unnoticed only if its hash
    collides (about 2**-64 for a change that is not built to collide).
    """

    inner: Any
    row0: int
    expected: tuple

    @property
    def index(self):
        return getattr(self.inner, "index", None)

    def __call__(self):
        parts = read_partition(self.inner)
        if _check_digest(parts, self.row0) != self.expected:
            where = getattr(self.inner, "where", None) or f"partition {self.index}"
            raise DataError(
                f"The data changed during the fit: {where} no longer holds what the fit read when it started "
                "(its content digest differs). The fit stops, with no model, rather than mix two versions of the "
                "data. Let whatever writes to the dataset finish, then run the fit again."
            )
        return parts


def checked_handles(loaders: list, scans: list, weighted: bool, starts: list[int]) -> list:
    """Streamed handles: each loader wrapped to verify its data against the scan's digest."""
    return [Checked(ld, r0, s.check) for ld, s, r0 in zip(loaders, scans, starts)]


@dataclass(frozen=True)
class ZarrLoader(CheckedLoader):
    """Reads rows [start, stop) of a Zarr array (and its weights) on whichever process calls it."""

    url: str
    start: int
    stop: int
    index: int
    weights_url: str | None = None
    chunk_rows: int | None = None

    @property
    def where(self) -> str:
        return f"partition {self.index} (rows {self.start}-{self.stop}) of {self.url}"

    @property
    def checks(self) -> RowChecks:
        return RowChecks(self.start, self.chunk_rows)

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

    @property
    def where(self) -> str:
        return f"partition {self.index} (rows {self.start}-{self.start + len(self.X)}) of the array"

    @property
    def checks(self) -> RowChecks:
        return RowChecks(self.start)

    def read(self):
        return self.X, self.w



@dataclass(frozen=True)
class DaskLoader(CheckedLoader):
    """One row block of a Dask array, computed with the synchronous scheduler where it runs."""

    block: Any = field(repr=False)
    wblock: Any = field(repr=False)
    start: int
    index: int

    @property
    def where(self) -> str:
        return f"partition {self.index} (rows from {self.start}) of the dask array"

    @property
    def checks(self) -> RowChecks:
        return RowChecks(self.start)

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
