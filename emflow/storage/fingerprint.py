"""Partitions read, scanned once, and re-read: the dataset fingerprint and the change check.

The engine's opening scan (:func:`scan_partition`) reads each partition once: it checks the
values (bad ones counted over the whole dataset, see :func:`finish_scan`), computes the
fingerprint (:func:`positional_hash`, additive over any split into row ranges, so it does not
depend on the partitioning), and keeps each partition's digest, which every later streamed
read must match (:class:`Checked`), so a fit stops if its data change under it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .data import finding_error
from ..errors import DataError, EmflowError

__all__ = ["scan_partition", "finish_scan", "checked_handles", "read_quiet", "positional_hash",
           "combine_fingerprint"]


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
    """What the opening scan learnt of one partition (see :func:`scan_partition`)."""

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
    out = [0] * len(seeds)
    cols = np.arange(per_row, dtype=np.uint64)
    step = max(1, (1 << 18) // max(per_row, 1))
    with np.errstate(over="ignore"):
        col_mult = [_mix64((cols + _COL_SALT) ^ np.uint64(seed)) | np.uint64(1) for seed in seeds]
        kernel = _hash_kernel()
        if kernel is not None and n:
            return tuple(kernel.hash_words(words, row0, np.array(seeds, dtype=np.uint64), np.stack(col_mult)))
        for b0 in range(0, n, step):
            blk = words[b0 : b0 + step].astype(np.uint64)
            rows = np.uint64(row0 + b0) + np.arange(len(blk), dtype=np.uint64)
            for i, seed in enumerate(seeds):
                per_row_sum = blk @ col_mult[i]  # integer matmul: wraps modulo 2**64
                row_mult = _mix64(rows ^ np.uint64(seed)) | np.uint64(1)
                out[i] = (out[i] + int(np.sum(per_row_sum * row_mult, dtype=np.uint64))) & 0xFFFFFFFFFFFFFFFF
    return tuple(out)


# "auto": the compiled hash when numba imports; "numpy": never (the same hashes either way).
# "numpy" by default: the hash runs in every worker's opening scan, and importing numba and
# compiling there costs a small worker (512 MiB) enough memory to be paused or restarted
KERNEL = "numpy"


def _hash_kernel():
    if KERNEL == "numpy":
        return None
    try:
        from . import hash_kernel
    except (ImportError, RuntimeError):  # RuntimeError: numba found no writable cache directory
        return None
    return hash_kernel


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
