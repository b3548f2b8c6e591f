"""Readers of the files :func:`emflow.storage.ingest.ingest` converts: CSV, Parquet, NumPy, HDF5.

Each opens its file, selects the columns asked for (by name or position) and an optional
sequence-id column, and yields blocks ``(values of shape (n, d) float64, ids of shape (n,) or
None)``, so a file of any size streams through in bounded memory. A malformed CSV row is
refused or skipped (``on_bad_rows``) with its line number and a few examples.
"""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["csv_source", "parquet_source", "npy_source", "hdf5_source"]

# Rows converted from text to numbers at a time; bounds the Python objects alive at once.
_CSV_BATCH = 4096
_MAX_EXAMPLES = 10


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


def csv_source(path, columns, seq_col, *, delimiter, header, skip_rows, on_bad_rows) -> _Source:
    """A CSV (or TSV, gzipped or not) file as blocks; bad rows refused or skipped per ``on_bad_rows``."""
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


def parquet_source(path, columns, seq_col) -> _Source:
    """A Parquet file as blocks (record batches of the selected columns)."""
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


def npy_source(path, columns, seq_col) -> _Source:
    """A ``.npy`` file (memory-mapped) as blocks."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path!r} is not a readable .npy file ({exc}).") from exc
    if arr.dtype.names:
        raise DataError(f"{path!r} holds a structured array; save a plain 2-D numeric array instead.")
    return _array_source(arr, repr(path), columns, seq_col)


def hdf5_source(path, columns, seq_col, *, key) -> _Source:
    """The dataset ``key`` of an HDF5 file as blocks."""
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
