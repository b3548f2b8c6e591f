"""Compiled (numba) form of :func:`emflow.storage.fingerprint.positional_hash`.

One pass over the words of a block of rows for every seed at once, with the same arithmetic
as the NumPy path (uint64, wrapping modulo 2**64: the sums are exact, whatever the order),
so the hashes are bit for bit those of the NumPy path (tests/test_fingerprint*.py). The NumPy
path widens each block to uint64 and runs an integer matmul (not BLAS) once per seed; this
reads each word once. Imported lazily: without numba, the NumPy path runs.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["hash_words"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_ONE = np.uint64(1)


@numba.njit(cache=True, nogil=True)
def _mix(x):
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@numba.njit(cache=True, nogil=True)
def _row_dot(words, i, c):
    acc = np.uint64(0)
    for j in range(words.shape[1]):
        acc += np.uint64(words[i, j]) * c[j]
    return acc


@numba.njit(cache=True, nogil=True)
def _hash(words, row0, seeds, col_mult, out):
    n = words.shape[0]
    for s in range(seeds.shape[0]):
        c = col_mult[s]
        h = np.uint64(0)
        for i in range(n):
            h += _row_dot(words, i, c) * (_mix(row0 + np.uint64(i) ^ seeds[s]) | _ONE)
        out[s] = h


def hash_words(words: np.ndarray, row0: int, seeds: np.ndarray, col_mult: np.ndarray) -> list[int]:
    """Per seed: sum over rows ``i`` of ``(words[i] . col_mult[s]) * R_s(row0 + i)`` modulo
    2**64, as :func:`~emflow.storage.fingerprint.positional_hash` defines it."""
    out = np.zeros(len(seeds), dtype=np.uint64)
    _hash(np.ascontiguousarray(words), np.uint64(row0), np.asarray(seeds, dtype=np.uint64),
          np.ascontiguousarray(col_mult, dtype=np.uint64), out)
    return [int(v) for v in out]
