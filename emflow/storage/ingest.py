"""Ingestion: stream a CSV, Parquet, NumPy or HDF5 file into an emflow Zarr dataset.

A source is read in blocks and written one whole Zarr chunk at a time, so peak memory is a
few chunks whatever the size of the file. While the rows stream past, a validation report
is accumulated (per-column count, min, max, mean and standard deviation merged block by
block with Chan et al.'s parallel update, NaN and infinity counts) and stored in the
dataset's attributes with a content fingerprint. The whole dataset is written under a
temporary sibling name and renamed into place only when complete
(:class:`emflow.storage.store.atomic_dir`), so an interrupted ingest leaves nothing that looks
like a dataset.

Layouts written::

    rows                         sequences (sequence_column=...)
    out.zarr/                    out.zarr/
      zarr.json  attrs: kind="rows", rows="X",      zarr.json  attrs: kind="sequences", ...
                 columns, report, fingerprint         values   (total_steps, n_features)
      X  (n_samples, n_features)                      offsets  (n_sequences + 1,) int64

The first is what :func:`emflow.storage.data.open_rows` reads, the second
:func:`emflow.storage.sequences.open_sequences`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError, DataNotFoundError

__all__ = ["ingest", "ColumnStats", "FORMATS", "COMPRESSIONS", "DEFAULT_CHUNK_BYTES", "read_report"]

DEFAULT_CHUNK_BYTES = 16 * 2**20
FORMATS = ("csv", "parquet", "npy", "hdf5")
COMPRESSIONS = ("zstd", "lz4", "lz4hc", "blosclz", "zlib", "gzip", "none")
_EXTENSIONS = {
    ".csv": "csv", ".tsv": "csv", ".txt": "csv", ".csv.gz": "csv", ".tsv.gz": "csv",
    ".parquet": "parquet", ".pq": "parquet",
    ".npy": "npy",
    ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5",
}
# Rows converted from text to numbers at a time; bounds the Python objects alive at once.
_CSV_BATCH = 4096
_MAX_EXAMPLES = 10


# --------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------
@dataclass
class ColumnStats:
    """Per-column moments of the finite values, mergeable across blocks.

    ``update(block)`` folds in a block of shape (n_rows, n_columns) with Chan, Golub and
    LeVeque's pairwise update, which stays accurate where the naive sum of squares loses
    every digit (large mean, small spread).

    Attributes
    ----------
    count : ndarray of shape (n_columns,)  finite values seen
    mean, m2 : ndarray of shape (n_columns,)  mean and sum of squared deviations of them
    min, max : ndarray of shape (n_columns,)
    nan, posinf, neginf : ndarray of shape (n_columns,)  counts of non-finite values
    """

    n_columns: int
    count: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    min: np.ndarray = field(init=False)
    max: np.ndarray = field(init=False)
    nan: np.ndarray = field(init=False)
    posinf: np.ndarray = field(init=False)
    neginf: np.ndarray = field(init=False)
    rows: int = 0

    def __post_init__(self):
        d = self.n_columns
        self.count = np.zeros(d, np.int64)
        self.mean = np.zeros(d)
        self.m2 = np.zeros(d)
        self.min = np.full(d, np.inf)
        self.max = np.full(d, -np.inf)
        self.nan = np.zeros(d, np.int64)
        self.posinf = np.zeros(d, np.int64)
        self.neginf = np.zeros(d, np.int64)

    def update(self, block: np.ndarray) -> None:
        x = np.asarray(block, dtype=np.float64)
        if x.shape[0] == 0:
            return
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            self._update(x)

    def _update(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        self.rows += x.shape[0]
        self.nan += np.isnan(x).sum(axis=0)
        self.posinf += (x == np.inf).sum(axis=0)
        self.neginf += (x == -np.inf).sum(axis=0)
        nb = finite.sum(axis=0)
        xf = np.where(finite, x, 0.0)
        mb = np.where(nb > 0, xf.sum(axis=0) / np.maximum(nb, 1), 0.0)
        m2b = np.where(finite, (x - mb) ** 2, 0.0).sum(axis=0)
        self.min = np.minimum(self.min, np.where(finite, x, np.inf).min(axis=0))
        self.max = np.maximum(self.max, np.where(finite, x, -np.inf).max(axis=0))
        na = self.count
        n = na + nb
        safe = np.maximum(n, 1)
        delta = mb - self.mean
        self.mean = np.where(n > 0, self.mean + delta * (nb / safe), 0.0)
        self.m2 = self.m2 + m2b + delta**2 * (na * (nb / safe))
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (``ddof=0``, as :func:`numpy.std`)."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    def to_dict(self) -> dict[str, list]:
        has = self.count > 0

        def col(a):
            return [float(v) if h else None for v, h in zip(a, has)]

        return {
            "count": self.count.tolist(), "min": col(self.min), "max": col(self.max),
            "mean": col(self.mean), "std": col(self.std),
            "nan": self.nan.tolist(), "posinf": self.posinf.tolist(), "neginf": self.neginf.tolist(),
        }


# --------------------------------------------------------------------------------------
# Readers: each yields (values of shape (n, d) float64, ids of shape (n,) or None)
# --------------------------------------------------------------------------------------
@dataclass
class _Source:
    names: list[str]  # the value columns, in output order
    n_rows: int | None  # known up front (None for text)
    blocks: Iterator[tuple[np.ndarray, np.ndarray | None]]
    block_rows: int = 1024  # rows per yielded block; set before the first block is read
    skipped: list[int] = field(default_factory=lambda: [0])  # mutable counter shared with the reader
    examples: list[str] = field(default_factory=list)
    close: Callable[[], None] = lambda: None
    dtype: str = "float64"  # the storage type that keeps the source's precision (text: float64)


def _float_type_of(dtypes) -> str:
    """float32 when every source column is a float of at most 32 bits, else float64 (integers,
    float64, text): the narrowest of emflow's two storage types that loses nothing."""
    dtypes = list(dtypes)
    return "float32" if dtypes and all(np.dtype(t).kind == "f" and np.dtype(t).itemsize <= 4 for t in dtypes) \
        else "float64"


def _resolve_columns(available: list[str], columns, where: str, what: str = "column") -> list[int]:
    """Indices of the requested columns (names or integer positions)."""
    out = []
    for c in columns:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not -len(available) <= c < len(available):
                raise ConfigError(
                    f"{what} index {c} is out of range: {where} has {len(available)} column(s) "
                    f"(0-{len(available) - 1})."
                )
            out.append(int(c) % len(available))
        else:
            name = str(c)
            if name in available:
                out.append(available.index(name))
            elif name.lstrip("-").isdigit() and not any(a == name for a in available):
                out.append(_resolve_columns(available, [int(name)], where, what)[0])
            else:
                shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
                raise ConfigError(f"No {what} named {name!r} in {where}; its columns are: {shown}.")
    return out


def _select(available: list[str], columns, seq_col, where: str) -> tuple[list[int], int | None]:
    id_index = None
    if seq_col is not None:
        id_index = _resolve_columns(available, [seq_col], where, "sequence column")[0]
    if columns is None:
        cols = [i for i in range(len(available)) if i != id_index]
    else:
        if isinstance(columns, (str, int)):
            columns = [columns]
        cols = _resolve_columns(available, list(columns), where)
        if id_index is not None and id_index in cols:
            raise ConfigError(f"The sequence column {available[id_index]!r} cannot also be a value column.")
    if not cols:
        raise ConfigError(f"No value columns selected from {where}.")
    if len(set(cols)) != len(cols):
        raise ConfigError(f"A column is selected twice from {where}: {columns!r}.")
    return cols, id_index


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, newline="", encoding="utf-8-sig")


def _parse_field(s: str) -> float:
    t = s.strip()
    if not t:
        return math.nan  # an empty field is a missing value; counted as NaN in the report
    return float(t)


def _csv_source(path, columns, seq_col, *, delimiter, header, skip_rows, on_bad_rows) -> _Source:
    f = _open_text(path)
    try:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            for _ in range(skip_rows):
                next(reader)
            first = next(reader)
            while not first:  # blank lines before the header / first row
                first = next(reader)
        except StopIteration:
            raise DataError(f"{path!r} holds no rows (after skipping {skip_rows} line(s)).") from None
        except csv.Error as exc:
            raise DataError(f"{path!r}, line {reader.line_num}: not valid CSV ({exc}).") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path!r} is not UTF-8 text ({exc}). Re-encode the file as UTF-8.") from None
        if header:
            available = [h.strip() for h in first]
            pending = None
        else:
            available = [str(i) for i in range(len(first))]
            pending = (reader.line_num, first)
        n_fields = len(available)
        cols, id_index = _select(available, columns, seq_col, repr(path))
    except BaseException:
        f.close()
        raise
    src = _Source([available[i] for i in cols], None, iter(()), close=f.close)

    def bad(line: int, msg: str):
        if on_bad_rows == "error":
            raise DataError(
                f"{path!r}, line {line}: {msg}. Fix the file, or pass on_bad_rows='skip' "
                "(--skip-bad-rows) to skip such rows and count them in the report."
            )
        src.skipped[0] += 1
        if len(src.examples) < _MAX_EXAMPLES:
            src.examples.append(f"line {line}: {msg}")

    def convert(line: int, row: list[str]):
        if len(row) != n_fields:
            bad(line, f"{len(row)} field(s), expected {n_fields}")
            return None
        try:
            return [float(row[i]) for i in cols]
        except ValueError:
            pass
        vals = []
        for i in cols:
            try:
                vals.append(_parse_field(row[i]))
            except ValueError:
                break
        else:
            return vals
        v = row[i] if len(row[i]) <= 40 else row[i][:40] + "..."
        bad(line, f"column {available[i]!r} holds {v!r}, which is not a number")
        return None

    def gen():
        block_rows = src.block_rows
        rows: list[list[float]] = []
        ids: list[str] = []
        out = np.empty((block_rows, len(cols)))
        filled = 0
        first_record = pending
        while True:
            if first_record is not None:
                (line, row), first_record = first_record, None
            else:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    bad(reader.line_num, f"not valid CSV ({exc})")
                    continue
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path!r}, after line {reader.line_num}: not UTF-8 text ({exc}). Re-encode the file as UTF-8."
                    ) from None
                line = reader.line_num
            if not row:
                continue  # blank line
            vals = convert(line, row)
            if vals is None:
                continue
            rows.append(vals)
            if id_index is not None:
                ids.append(row[id_index].strip())
            if len(rows) == _CSV_BATCH or filled + len(rows) == block_rows:
                out[filled : filled + len(rows)] = rows
                filled += len(rows)
                rows.clear()
                if filled == block_rows:
                    yield out, (np.array(ids, dtype=object) if id_index is not None else None)
                    ids.clear()
                    out = np.empty((block_rows, len(cols)))
                    filled = 0
        if rows:
            out[filled : filled + len(rows)] = rows
            filled += len(rows)
        if filled:
            yield out[:filled], (np.array(ids, dtype=object) if id_index is not None else None)

    src.blocks = gen()
    return src


def _arrow_numpy_dtype(t):
    try:
        return np.dtype(t.to_pandas_dtype())
    except Exception:  # decimals, booleans: stored as float64
        return np.dtype(np.float64)


def _parquet_source(path, columns, seq_col) -> _Source:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "Reading Parquet needs pyarrow: pip install 'emflow[parquet]' (or pyarrow)."
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path!r} is not a readable Parquet file ({exc}).") from exc
    schema = pf.schema_arrow
    available = list(schema.names)
    cols, id_index = _select(available, columns, seq_col, repr(path))
    for i in cols:
        t = schema.field(i).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
            raise DataError(
                f"Column {available[i]!r} of {path!r} has type {t}, which is not numeric. "
                "Leave it out with columns=[...] (--columns)."
            )
    wanted = [available[i] for i in cols] + ([available[id_index]] if id_index is not None else [])

    def gen():
        for batch in pf.iter_batches(batch_size=src.block_rows, columns=wanted):
            X = np.empty((batch.num_rows, len(cols)))
            for j in range(len(cols)):
                arr = batch.column(j).cast(pa.float64()).fill_null(math.nan)
                X[:, j] = arr.to_numpy(zero_copy_only=False)
            ids = None
            if id_index is not None:
                ids = np.asarray(batch.column(len(cols)).to_numpy(zero_copy_only=False), dtype=object)
            yield X, ids

    src = _Source([available[i] for i in cols], pf.metadata.num_rows, iter(()), close=pf.close,
                  dtype=_float_type_of([_arrow_numpy_dtype(schema.field(i).type) for i in cols]))
    src.blocks = gen()
    return src


def _array_source(arr, where: str, columns, seq_col, *, close=lambda: None) -> _Source:
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise DataError(f"{where} has shape {arr.shape}; expected 2-D (n_samples, n_features).")
    if np.dtype(arr.dtype).kind not in "fiub":
        raise DataError(f"{where} has dtype {arr.dtype}, which is not numeric.")
    available = [str(i) for i in range(arr.shape[1])]
    cols, id_index = _select(available, columns, seq_col, where)
    contiguous = cols == list(range(cols[0], cols[0] + len(cols)))

    def gen():
        step = src.block_rows
        for a in range(0, arr.shape[0], step):
            block = np.asarray(arr[a : a + step])
            X = block[:, cols[0] : cols[0] + len(cols)] if contiguous else block[:, cols]
            ids = block[:, id_index].copy() if id_index is not None else None
            yield np.asarray(X, dtype=np.float64), ids

    src = _Source([available[i] for i in cols], int(arr.shape[0]), iter(()), close=close,
                  dtype=_float_type_of([arr.dtype]))
    src.blocks = gen()
    return src


def _npy_source(path, columns, seq_col) -> _Source:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path!r} is not a readable .npy file ({exc}).") from exc
    if arr.dtype.names:
        raise DataError(f"{path!r} holds a structured array; save a plain 2-D numeric array instead.")
    return _array_source(arr, repr(path), columns, seq_col)


def _hdf5_source(path, columns, seq_col, *, key) -> _Source:
    try:
        import h5py
    except ImportError:
        raise ConfigError("Reading HDF5 needs h5py: pip install 'emflow[hdf5]' (or h5py).") from None
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise DataError(f"{path!r} is not a readable HDF5 file ({exc}).") from exc
    try:
        if key is None:
            found = []
            f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim in (1, 2) else None)
            if len(found) != 1:
                raise ConfigError(
                    f"{path!r} holds {len(found)} 1-D/2-D datasets ({', '.join(found[:10])}); "
                    "name the one to ingest with key=... (--key)."
                )
            key = found[0]
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise ConfigError(f"{path!r} has no dataset {key!r}.")
        return _array_source(f[key], f"{path!r}[{key!r}]", columns, seq_col, close=f.close)
    except BaseException:
        f.close()
        raise


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------
def _compressors(compression):
    from zarr.codecs import BloscCodec, BloscShuffle, GzipCodec

    c = "none" if compression is None else str(compression).lower()
    if c == "none":
        return None
    if c == "gzip":
        return GzipCodec(level=5)
    if c in ("zstd", "lz4", "lz4hc", "blosclz", "zlib"):
        return BloscCodec(cname=c, clevel=3, shuffle=BloscShuffle.bitshuffle)
    raise ConfigError(f"compression must be one of {COMPRESSIONS}, got {compression!r}.")


class _ChunkWriter:
    """Appends rows to a growing Zarr array one whole chunk at a time."""

    def __init__(self, array, chunk_rows: int, dtype: np.dtype, hasher, stats: ColumnStats):
        self.array = array
        self.chunk_rows = chunk_rows
        self.dtype = dtype
        self.buf = np.empty((chunk_rows, array.shape[1]), dtype=dtype)
        self.fill = 0
        self.rows = 0
        self.hasher = hasher
        self.stats = stats

    def append(self, X: np.ndarray, on_chunk: Callable[[int], None]) -> None:
        a = 0
        while a < len(X):
            take = min(len(X) - a, self.chunk_rows - self.fill)
            self.buf[self.fill : self.fill + take] = X[a : a + take]
            self.fill += take
            a += take
            if self.fill == self.chunk_rows:
                self.flush(on_chunk)

    def flush(self, on_chunk: Callable[[int], None]) -> None:
        if not self.fill:
            return
        block = self.buf[: self.fill]
        self.stats.update(block)
        self.hasher.update(np.ascontiguousarray(block).view(np.uint8).ravel())
        n = self.rows + self.fill
        self.array.resize((n, self.array.shape[1]))
        self.array[self.rows : n] = block
        self.rows = n
        done = self.fill
        self.fill = 0
        on_chunk(done)


class _SequenceTracker:
    """Cuts the stream of rows into runs of equal sequence id; offsets stay in memory (8 bytes each)."""

    def __init__(self, where: str):
        self.offsets = [0]
        self.seen: set = set()
        self.current: Any = _NOTHING
        self.total = 0
        self.where = where

    def feed(self, ids: np.ndarray) -> None:
        n = len(ids)
        if n == 0:
            return
        change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        starts = np.concatenate([[0], change]).astype(np.int64)
        for s in starts:
            key = ids[s]
            key = key.item() if isinstance(key, np.generic) else key
            if s == 0 and self.current is not _NOTHING and key == self.current:
                continue  # the run goes on from the previous block
            if self.current is not _NOTHING:
                self.offsets.append(self.total + int(s))
            if key in self.seen:
                raise DataError(
                    f"Sequence id {key!r} in {self.where} appears again after other sequences (at data "
                    f"row {self.total + int(s)}). Each sequence's rows must be contiguous: sort the file "
                    "by the sequence column (keeping time order within each sequence)."
                )
            self.seen.add(key)
            self.current = key
        self.total += n

    def finish(self) -> np.ndarray:
        if self.total and self.offsets[-1] != self.total:
            self.offsets.append(self.total)
        return np.asarray(self.offsets, dtype=np.int64)


_NOTHING = object()


def _detect_format(path: str, format: str | None) -> str:
    if format is not None:
        fmt = str(format).lower()
        fmt = {"h5": "hdf5", "pq": "parquet", "numpy": "npy", "tsv": "csv"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {format!r}.")
        return fmt
    low = path.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return _EXTENSIONS[ext]
    raise ConfigError(
        f"Cannot tell the format of {path!r} from its extension; pass format= one of {FORMATS} (--format)."
    )


def _source_info(path: str, fmt: str) -> dict:
    st = os.stat(path)
    return {
        "path": os.path.abspath(path), "format": fmt, "size_bytes": int(st.st_size),
        "modified": _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
    }


def ingest(
    source,
    out,
    *,
    format: str | None = None,
    columns: Sequence[str | int] | None = None,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    compression: str | None = "zstd",
    on_bad_rows: str = "error",
    progress: Callable[[int], None] | None = None,
    sequence_column: str | int | None = None,
    delimiter: str | None = None,
    header: bool = True,
    skip_rows: int = 0,
    key: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
) -> str:
    """Stream a tabular file into an emflow Zarr dataset.

    Parameters
    ----------
    source : str or PathLike
        A CSV (``.csv``, ``.tsv``, optionally ``.gz``), Parquet (``.parquet``), NumPy
        (``.npy``, memory-mapped) or HDF5 (``.h5``, ``.hdf5``) file.
    out : str or PathLike
        The Zarr group to write. It appears only once complete.
    format : {"csv", "parquet", "npy", "hdf5"}, optional
        Default: from the file's extension.
    columns : sequence of str or int, optional
        Value columns to keep, in this order, by name (CSV header, Parquet schema) or by
        position. Default: every column except ``sequence_column``.
    dtype : {"float64", "float32"}, optional
        Storage type. Default: the source's precision, float32 for a float32 (or float16)
        array or Parquet columns, float64 otherwise (CSV, integers, float64). Statistics are
        always accumulated in float64.
    chunk_rows : int, optional
        Rows per Zarr chunk. Default: about ``chunk_bytes`` (16 MiB) per chunk.
    compression : {"zstd", "lz4", "lz4hc", "blosclz", "zlib", "gzip", "none"}
        Blosc codec (with bit shuffle) or gzip, or none.
    on_bad_rows : {"error", "skip"}
        A CSV row with an unparseable value or the wrong number of fields raises
        :class:`~emflow.errors.DataError` naming its line (``"error"``), or is skipped
        and counted in the report (``"skip"``). An empty field is a missing value and is
        stored as NaN (counted in the report), not a bad row.
    progress : callable, optional
        Called with the number of rows written after every chunk. An exception raised by
        it aborts the ingest and leaves no output.
    sequence_column : str or int, optional
        Write the sequences layout (``values`` + ``offsets``): rows with the same id in
        this column form one sequence, in file order. Each sequence's rows must be
        contiguous.
    delimiter : str, optional
        CSV field separator; default ``","`` (``"\\t"`` for ``.tsv``).
    header : bool, default True
        The CSV's first row (after ``skip_rows``) names the columns. With ``False`` the
        columns are named by position ``"0"``, ``"1"``, ...
    skip_rows : int, default 0
        CSV records to skip before the header (or the first data row).
    key : str, optional
        HDF5 dataset to read; default the file's only 1-D or 2-D dataset.
    chunk_bytes : int
        Target chunk size used when ``chunk_rows`` is not given.
    overwrite : bool, default False
        Replace an existing ``out`` (atomically, once the new dataset is complete).

    Notes
    -----
    Memory: one chunk being filled, one being written, and (CSV) at most a few thousand
    parsed rows; ``.npy`` files are memory-mapped and HDF5 datasets read by slices. Parquet
    is read by ``iter_batches``, which decodes a whole row group at a time, so a file written
    with very large row groups needs that much memory. A CSV sequence ingest also keeps the
    offsets and the set of sequence ids seen (a few dozen bytes per sequence).

    Returns
    -------
    str
        The absolute path of the dataset. Its attributes hold ``report``: rows, columns,
        per-column count/min/max/mean/std of the finite values, NaN and infinity counts,
        skipped rows (with the first few reasons), source, fingerprint.
    """
    import zarr

    from .store import _json_safe, atomic_dir, check_destination

    t0 = time.perf_counter()
    path = os.fspath(source)
    if not os.path.exists(path):
        raise DataNotFoundError(f"No file at {path!r}. Check the path.")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; ingest reads one file (CSV, Parquet, .npy or HDF5).")
    fmt = _detect_format(path, format)
    if dtype is not None and dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be 'float32', 'float64' or None (keep the source's), got {dtype!r}.")
    if on_bad_rows not in ("error", "skip"):
        raise ConfigError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}.")
    if chunk_rows is not None and (not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1):
        raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}.")
    if int(chunk_bytes) < 1:
        raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes!r}.")
    if int(skip_rows) < 0:
        raise ConfigError(f"skip_rows must be >= 0, got {skip_rows!r}.")
    out_path = os.path.abspath(os.fspath(out))
    # an emflow dataset there is replaced only with overwrite; anything else never is
    check_destination(out_path, "dataset", overwrite=overwrite, inputs=[("the source file", path)])
    comp = _compressors(compression)

    # Columns are known before rows: pick the chunk size, then read blocks of one chunk.
    if delimiter is None:
        delimiter = "\t" if path.lower().endswith((".tsv", ".tsv.gz")) else ","
    if fmt == "csv":
        src = _csv_source(path, columns, sequence_column, delimiter=delimiter, header=header,
                          skip_rows=int(skip_rows), on_bad_rows=on_bad_rows)
    elif fmt == "parquet":
        src = _parquet_source(path, columns, sequence_column)
    elif fmt == "npy":
        src = _npy_source(path, columns, sequence_column)
    else:
        src = _hdf5_source(path, columns, sequence_column, key=key)
    try:
        np_dtype = np.dtype(dtype or src.dtype)
        d = len(src.names)
        if chunk_rows is None:
            chunk_rows = max(1, int(chunk_bytes) // (d * np_dtype.itemsize))
            if src.n_rows is not None:
                chunk_rows = max(1, min(chunk_rows, src.n_rows))
        src.block_rows = int(chunk_rows)
        chunk_rows = int(chunk_rows)
        stats = ColumnStats(d)
        hasher = hashlib.blake2b(digest_size=16)
        seq = _SequenceTracker(repr(path)) if sequence_column is not None else None
        name = "values" if seq is not None else "X"
        report_progress = progress if progress is not None else (lambda n: None)

        with atomic_dir(out_path) as tmp:
            g = zarr.open_group(tmp, mode="w")
            # every chunk is stored (even all-zero ones), so a chunk lost later is detected
            arr = g.create_array(name, shape=(0, d), dtype=np_dtype, chunks=(chunk_rows, d), compressors=comp,
                                 config={"write_empty_chunks": True}, attributes={"all_chunks_written": True})
            writer = _ChunkWriter(arr, chunk_rows, np_dtype, hasher, stats)
            for X, ids in src.blocks:
                if seq is not None:
                    seq.feed(ids)
                with np.errstate(over="ignore"):  # float32 overflow becomes inf, counted in the report
                    X = X.astype(np_dtype, copy=False)
                writer.append(X, report_progress)
            writer.flush(report_progress)
            n = writer.rows
            if n == 0:
                raise DataError(
                    f"{path!r} yielded no data rows"
                    + (f" ({src.skipped[0]} bad row(s) skipped)" if src.skipped[0] else "")
                    + "; there is nothing to ingest."
                )
            hasher.update(repr(((n, d), str(np_dtype))).encode())
            attrs: dict[str, Any] = {
                "n_features": d, "dtype": str(np_dtype), "columns": list(src.names),
            }
            if seq is not None:
                offsets = seq.finish()
                hasher.update(offsets.view(np.uint8).ravel())
                g.create_array("offsets", data=offsets, chunks=(max(1, min(1 << 20, len(offsets))),),
                               compressors=comp)
                attrs.update({"kind": "sequences", "n_sequences": len(offsets) - 1, "total_steps": n,
                              "sequence_column": str(sequence_column)})
            else:
                attrs.update({"kind": "rows", "rows": "X", "n_samples": n})
            fingerprint = hasher.hexdigest()
            info = _source_info(path, fmt)
            report = {
                "rows": n, "columns": list(src.names), **stats.to_dict(),
                "skipped_rows": int(src.skipped[0]), "skipped_examples": list(src.examples),
                "source": info, "fingerprint": fingerprint, "chunk_rows": chunk_rows,
                "compression": "none" if comp is None else str(compression).lower(),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if seq is not None:
                report["sequences"] = len(offsets) - 1
            from .. import __version__

            attrs.update({
                "source": f"{info['path']} ({fmt})", "fingerprint": fingerprint,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "emflow_version": __version__, "report": report,
            })
            g.attrs.update(_json_safe(attrs))
    finally:
        src.close()
    return out_path


def read_report(path) -> dict:
    """The validation report stored by :func:`ingest` in a dataset's attributes."""
    import zarr

    p = os.fspath(path)
    if not os.path.exists(p):
        raise DataNotFoundError(f"No dataset at {p!r}.")
    g = zarr.open_group(p, mode="r")
    rep = g.attrs.get("report")
    if not isinstance(rep, dict):
        raise DataError(f"{p!r} has no ingest report (it was not written by emflow.ingest).")
    return rep
