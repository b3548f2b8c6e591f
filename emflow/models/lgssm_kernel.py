"""Compiled Kalman filter and RTS smoother (numba) over a partition's sequences.

One sequence after another, every step in compiled code: on one long sequence with a small
state the NumPy path's cost is Python's per-step overhead (about 40 array calls a step),
which this removes. The arithmetic is the batched NumPy path's
(:func:`emflow.models.lgssm_stats.batch_filter_smooth`) step for step: a missing component
has its row of ``C`` zeroed, its block of ``R`` replaced by a unit variance and a zero
residual; the innovation covariance is factorised by Cholesky; the covariance update is in
Joseph form; every covariance is symmetrised. The two agree to rounding (tests: 1e-12).

This module imports numba; :mod:`emflow.models.lgssm_stats` imports it lazily and uses the
NumPy path when numba is missing. Layout is concatenated: row ``t`` of every output is row
``t`` of ``values``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["filter_smooth"]

_LOG_2PI = math.log(2.0 * math.pi)


_jit = numba.njit(cache=True, nogil=True, fastmath=False)


@_jit
def _mm(A, B, out, ta, tb, add, use_add):
    """``out = op(A) @ op(B) (+ add)``, ``op`` the transpose where ``ta`` / ``tb``; no allocation.

    One signature for every call (all C-contiguous 2-D), so it compiles once."""
    n, c = out.shape
    r = A.shape[0] if ta else A.shape[1]
    for i in range(n):
        for j in range(c):
            acc = add[i, j] if use_add else 0.0
            for q in range(r):
                acc += (A[q, i] if ta else A[i, q]) * (B[j, q] if tb else B[q, j])
            out[i, j] = acc


@_jit
def _mv(A, x, out):
    for i in range(A.shape[0]):
        acc = 0.0
        for q in range(A.shape[1]):
            acc += A[i, q] * x[q]
        out[i] = acc


@_jit
def _sym_into(M, out):
    for i in range(M.shape[0]):
        for j in range(i, M.shape[0]):
            v = 0.5 * (M[i, j] + M[j, i])
            out[i, j] = v
            out[j, i] = v


@_jit
def _chol(S, L):
    """Lower Cholesky factor of ``S`` into ``L``; False when ``S`` is not positive definite."""
    n = S.shape[0]
    for j in range(n):
        d = S[j, j]
        for q in range(j):
            d -= L[j, q] * L[j, q]
        if not d > 0.0:
            return False
        L[j, j] = math.sqrt(d)
        for i in range(j + 1, n):
            acc = S[i, j]
            for q in range(j):
                acc -= L[i, q] * L[j, q]
            L[i, j] = acc / L[j, j]
        for i in range(j):
            L[i, j] = 0.0
    return True


@_jit
def _tri_inv(L, out):
    """Inverse of the lower-triangular ``L``."""
    n = L.shape[0]
    for j in range(n):
        for i in range(n):
            if i < j:
                out[i, j] = 0.0
            elif i == j:
                out[i, i] = 1.0 / L[i, i]
            else:
                acc = 0.0
                for q in range(j, i):
                    acc += L[i, q] * out[q, j]
                out[i, j] = -acc / L[i, i]


@_jit
def _run(values, offsets, A, C, Q, R, mu0, V0, smooth, mp, Pp, mf, Pf, ms, Ps, lag, loglik):
    """Returns 0, or 1 + the row where an innovation covariance (1) or, smoothing, a
    predicted covariance (2, encoded as -(row + 1)) is not positive definite."""
    p, k = C.shape
    m, e, w, Cm, d = np.empty(k), np.empty(p), np.empty(p), np.empty(p), np.empty(k)
    P, AP, IKC = np.empty((k, k)), np.empty((k, k)), np.empty((k, k))
    T1, T2, T3 = np.empty((k, k)), np.empty((k, k)), np.empty((k, k))
    Cb, Kt, X1 = np.empty((p, k)), np.empty((p, k)), np.empty((p, k))
    PCt, K, KR = np.empty((k, p)), np.empty((k, p)), np.empty((k, p))
    Rb, S, L, Li = np.empty((p, p)), np.empty((p, p)), np.empty((p, p)), np.empty((p, p))
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        ll = 0.0
        for t in range(a, b):
            if t == a:
                m[:] = mu0
                _sym_into(V0, P)
            else:
                _mv(A, mf[t - 1], m)
                _mm(A, Pf[t - 1], AP, False, False, Q, False)
                _mm(AP, A, T1, False, True, Q, True)
                _sym_into(T1, P)
            mp[t] = m
            Pp[t] = P
            n_obs = 0
            for i in range(p):
                oi = not np.isnan(values[t, i])
                n_obs += oi
                for j in range(k):
                    Cb[i, j] = C[i, j] if oi else 0.0
                for j in range(p):
                    oj = not np.isnan(values[t, j])
                    Rb[i, j] = R[i, j] if (oi and oj) else (1.0 if i == j else 0.0)
            _mv(Cb, m, Cm)
            for i in range(p):
                e[i] = 0.0 if np.isnan(values[t, i]) else values[t, i] - Cm[i]
            _mm(P, Cb, PCt, False, True, Q, False)  # P C^T
            _mm(Cb, PCt, L, False, False, Rb, True)
            _sym_into(L, S)
            if not _chol(S, L):
                return t + 1
            _tri_inv(L, Li)
            _mm(Li, PCt, X1, False, True, Q, False)  # Li (P C^T)^T
            _mm(Li, X1, Kt, True, False, Q, False)  # K^T = S^{-1} C P
            _mv(Li, e, w)
            q = 0.0
            for i in range(p):
                q += 2.0 * math.log(L[i, i]) + w[i] * w[i]
            ll -= 0.5 * (n_obs * _LOG_2PI + q)
            for i in range(k):
                acc = 0.0
                for j in range(p):
                    K[i, j] = Kt[j, i]
                    acc += Kt[j, i] * e[j]
                mf[t, i] = m[i] + acc
            _mm(K, Cb, IKC, False, False, Q, False)
            for i in range(k):
                for j in range(k):
                    IKC[i, j] = (1.0 if i == j else 0.0) - IKC[i, j]
            _mm(IKC, P, T1, False, False, Q, False)
            _mm(K, Rb, KR, False, False, Q, False)
            _mm(KR, Kt, T2, False, False, Q, False)
            _mm(T1, IKC, T3, False, True, T2, True)
            _sym_into(T3, Pf[t])
        loglik[s] = ll
        if not smooth:
            continue
        ms[b - 1] = mf[b - 1]
        Ps[b - 1] = Pf[b - 1]
        lag[a] = 0.0
        for t in range(b - 2, a - 1, -1):
            # J^T = Pp[t+1]^{-1} A Pf[t], by Cholesky (T1 = factor, T2 = A Pf[t], AP = J^T)
            if not _chol(Pp[t + 1], T1):
                return -(t + 2)
            _mm(A, Pf[t], T2, False, False, Q, False)
            for j in range(k):
                for i in range(k):
                    acc = T2[i, j]
                    for q in range(i):
                        acc -= T1[i, q] * AP[q, j]
                    AP[i, j] = acc / T1[i, i]
                for i in range(k - 1, -1, -1):
                    acc = AP[i, j]
                    for q in range(i + 1, k):
                        acc -= T1[q, i] * AP[q, j]
                    AP[i, j] = acc / T1[i, i]
            for i in range(k):
                d[i] = ms[t + 1, i] - mp[t + 1, i]
            for i in range(k):
                acc = 0.0
                for j in range(k):
                    acc += AP[j, i] * d[j]
                ms[t, i] = mf[t, i] + acc
            for i in range(k):
                for j in range(k):
                    P[i, j] = Ps[t + 1, i, j] - Pp[t + 1, i, j]
            _mm(AP, P, T3, True, False, Q, False)  # J (Ps - Pp)
            _mm(T3, AP, T2, False, False, Pf[t], True)
            _sym_into(T2, Ps[t])
            _mm(Ps[t + 1], AP, lag[t + 1], False, False, Q, False)
    return 0


def filter_smooth(values: np.ndarray, offsets: np.ndarray, params, smooth: bool = True) -> dict:
    """Filter (and smooth) every sequence of a partition in compiled code.

    Parameters
    ----------
    values : ndarray of shape (n_steps, p)
        The sequences, concatenated (NaN = missing).
    offsets : ndarray of shape (n_sequences + 1,)
    params : LGSSMParams
    smooth : bool
        Also run the RTS smoother (``ms``, ``Ps``, ``lag``; otherwise those are ``None``).

    Returns
    -------
    dict
        ``mp, Pp, mf, Pf`` (predicted and filtered means and covariances), ``ms, Ps, lag``
        (smoothed means, covariances, lag-one cross-covariances, zero at each first step)
        and ``loglik`` (per sequence), all in the concatenated layout of ``values``.

    Raises
    ------
    numpy.linalg.LinAlgError
        An innovation covariance is not positive definite, or (smoothing) a predicted
        covariance is exactly singular; the caller falls back or reports.
    """
    A, C, Q, R, mu0, V0 = (np.ascontiguousarray(x, dtype=np.float64) for x in params)
    values = np.ascontiguousarray(values, dtype=np.float64)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    n, k = len(values), A.shape[0]
    mp, mf = np.empty((n, k)), np.empty((n, k))
    Pp, Pf = np.empty((n, k, k)), np.empty((n, k, k))
    shape_s = (n, k) if smooth else (0, k)
    ms, Ps, lag = np.empty(shape_s), np.empty(shape_s + (k,)), np.empty(shape_s + (k,))
    loglik = np.empty(len(offsets) - 1)
    bad = _run(values, offsets, A, C, Q, R, mu0, V0, bool(smooth), mp, Pp, mf, Pf, ms, Ps, lag, loglik)
    if bad > 0:
        raise np.linalg.LinAlgError(f"innovation covariance not positive definite at row {bad - 1}")
    if bad < 0:
        raise np.linalg.LinAlgError(f"predicted covariance not positive definite at row {-bad - 1}")
    out = dict(mp=mp, Pp=Pp, mf=mf, Pf=Pf, loglik=loglik, ms=None, Ps=None, lag=None)
    if smooth:
        out.update(ms=ms, Ps=Ps, lag=lag)
    return out
