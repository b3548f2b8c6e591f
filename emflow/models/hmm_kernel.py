"""Compiled Baum-Welch E-step (numba) over a partition's sequences.

One sequence after another, in their own (sequence-major) row order, every step in compiled
code: no time-major reordering, no per-step Python, no ``(n, K)`` temporaries besides the
forward variables of the longest sequence. The arithmetic is the NumPy path's
(:func:`emflow.models.hmm.forward_backward`) step for step: emission probabilities are
taken relative to the best state of each step, the forward variable is normalised at every
step (Rabiner's scaling), the backward variable is scaled by the same factors, and the
posteriors are normalised explicitly. The two agree to rounding (tests: 1e-12).

Two kernels:

- :func:`forward_backward` takes the log emission densities (any emission) and returns the
  posteriors, for the emission's own statistics;
- :func:`gaussian_e_step` fuses the Gaussian log-density (through the upper Cholesky
  factors of the precisions, as :mod:`emflow.models.gmm`), forward-backward and the
  moments about the shift: per step ``K^2`` (forward) + ``2 K^2`` (backward and the
  transition counts) multiply-adds, ``K d (d + 1) / 2`` (full, tied) or ``K d`` (diag,
  spherical) for the density and as many again for the moments. The density runs in the
  dtype of ``Xc`` (``compute_dtype="float32"``: float32); the recursions and every sum
  are float64.

This module imports numba; :mod:`emflow.models.hmm` imports it lazily and uses the NumPy
path when numba is missing.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["forward_backward", "gaussian_e_step"]

_jit = numba.njit(cache=True, nogil=True, fastmath=False)


@_jit
def _forward(B, a, b, pi, A, alpha, scale):
    """Scaled forward pass over rows ``a:b`` of ``B`` (emission probabilities relative to
    each row's best state) into rows ``0:b-a`` of ``alpha`` / ``scale``; returns -1, or the
    row whose forward variable vanished."""
    K = A.shape[0]
    for t in range(a, b):
        r = t - a
        s = 0.0
        for k in range(K):
            if t == a:
                v = pi[k] * B[r, k]
            else:
                v = 0.0
                for i in range(K):
                    v += alpha[r - 1, i] * A[i, k]
                v *= B[r, k]
            alpha[r, k] = v
            s += v
        if not s > 0.0:
            return t
        for k in range(K):
            alpha[r, k] /= s
        scale[r] = s
    return -1


@_jit
def _backward_step(B, r, scale, A, alpha, beta, w, trans):
    """From ``beta`` at local row ``r`` to row ``r - 1``; adds ``alpha_{r-1} w^T`` to ``trans``."""
    K = A.shape[0]
    for j in range(K):
        w[j] = B[r, j] * beta[j] / scale[r]
    for i in range(K):
        acc = 0.0
        ai = alpha[r - 1, i]
        for j in range(K):
            acc += A[i, j] * w[j]
            trans[i, j] += ai * w[j]
        beta[i] = acc


@_jit
def _longest(offsets):
    """Length of the longest sequence (at least 1)."""
    T = 1
    for s in range(len(offsets) - 1):
        T = max(T, offsets[s + 1] - offsets[s])
    return T


@_jit
def _scaled_row(lb, B, r):
    """``B[r] = exp(lb - max(lb))``; returns the max (the row's log scale), or NaN when no
    entry of ``lb`` is finite."""
    mx = -np.inf
    for k in range(lb.shape[0]):
        mx = max(mx, lb[k])
    if not (mx > -np.inf and mx < np.inf):
        return np.nan
    for k in range(lb.shape[0]):
        B[r, k] = math.exp(lb[k] - mx)
    return mx


@_jit
def _forward_loglik(B, a, b, pi, A, alpha, scale, ll):
    """:func:`_forward`, then the log scale factors added to ``ll``: returns (vanished row
    or -1, ``ll``)."""
    bad = _forward(B, a, b, pi, A, alpha, scale)
    if bad < 0:
        for r in range(b - a):
            ll += math.log(scale[r])
    return bad, ll


@_jit
def _posterior(alpha, r, beta, out):
    """``out = alpha[r] * beta`` normalised to sum to one."""
    tot = 0.0
    for k in range(out.shape[0]):
        g = alpha[r, k] * beta[k]
        out[k] = g
        tot += g
    for k in range(out.shape[0]):
        out[k] /= tot


@_jit
def _finish_transitions(A, tr, trans):
    """Expected transition counts: ``trans = A * tr`` elementwise."""
    for i in range(A.shape[0]):
        for j in range(A.shape[0]):
            trans[i, j] = A[i, j] * tr[i, j]


@_jit
def _fb(log_b, offsets, pi, A, gamma, start, trans, loglik, want_trans):
    """Returns 0, -(row + 1) for a row of non-finite log densities, or row + 1 for a row the
    forward variable vanished at."""
    K = A.shape[0]
    T = _longest(offsets)
    alpha, B, scale = np.empty((T, K)), np.empty((T, K)), np.empty(T)
    beta, w, tr = np.empty(K), np.empty(K), np.zeros((K, K))
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        ll = 0.0
        for t in range(a, b):
            mx = _scaled_row(log_b[t], B, t - a)
            if np.isnan(mx):
                return -(t + 1)
            ll += mx
        bad, ll = _forward_loglik(B, a, b, pi, A, alpha, scale, ll)
        if bad >= 0:
            return bad + 1
        loglik[s] = ll
        beta[:] = 1.0
        for t in range(b - 1, a - 1, -1):
            r = t - a
            _posterior(alpha, r, beta, gamma[t])
            if t == a:
                for k in range(K):
                    start[k] += gamma[t, k]
            else:
                _backward_step(B, r, scale, A, alpha, beta, w, tr)
    if want_trans:
        _finish_transitions(A, tr, trans)
    return 0


def forward_backward(log_b, offsets, startprob, transmat, want_trans=True):
    """Scaled forward-backward of every sequence, rows in their own order.

    Parameters
    ----------
    log_b : ndarray of shape (n, K)
        Log emission densities (float64, C order).
    offsets : ndarray of shape (S + 1,)
        Partition-local offsets of the sequences.
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)

    Returns
    -------
    status : int
        0, ``-(row + 1)`` for a row with no finite log density, ``row + 1`` for a row no
        state path reaches.
    loglik : ndarray of shape (S,)
    gamma : ndarray of shape (n, K)
    start : ndarray of shape (K,)
    trans : ndarray of shape (K, K)
    """
    log_b = np.ascontiguousarray(log_b, dtype=np.float64)
    off = np.ascontiguousarray(offsets, dtype=np.int64) - int(offsets[0])
    K = log_b.shape[1]
    gamma = np.empty_like(log_b)
    start, trans, loglik = np.zeros(K), np.zeros((K, K)), np.zeros(len(off) - 1)
    status = _fb(log_b, off, np.ascontiguousarray(startprob, dtype=np.float64),
                 np.ascontiguousarray(transmat, dtype=np.float64), gamma, start, trans, loglik, want_trans)
    return int(status), loglik, gamma, start, trans


@_jit
def _gauss_e(Xc, offsets, pi, A, mc, P, Pd, logdet, full, outer, start, trans, post, s1, s2f, s2d, loglik):
    """Fused Gaussian E-step; status as :func:`_fb`."""
    K = A.shape[0]
    d = Xc.shape[1]
    T = _longest(offsets)
    alpha, B, scale = np.empty((T, K)), np.empty((T, K)), np.empty(T)
    beta, w, tr, lb = np.empty(K), np.empty(K), np.zeros((K, K)), np.empty(K)
    g, x = np.empty(K), np.empty(d)
    diff, y = np.empty(d, dtype=Xc.dtype), np.empty(d, dtype=Xc.dtype)
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        ll = 0.0
        for t in range(a, b):
            for k in range(K):
                # the quadratic form in the dtype of Xc (float32 compute), then float64
                for i in range(d):
                    diff[i] = Xc[t, i] - mc[k, i]
                if full:
                    for j in range(d):
                        acc = diff[0] * P[k, 0, j]
                        for i in range(1, j + 1):
                            acc += diff[i] * P[k, i, j]
                        y[j] = acc
                else:
                    for j in range(d):
                        y[j] = diff[j] * Pd[k, j]
                q = y[0] * y[0]
                for j in range(1, d):
                    q += y[j] * y[j]
                lb[k] = logdet[k] - 0.5 * np.float64(q)
            mx = _scaled_row(lb, B, t - a)
            if np.isnan(mx):
                return -(t + 1)
            ll += mx
        bad, ll = _forward_loglik(B, a, b, pi, A, alpha, scale, ll)
        if bad >= 0:
            return bad + 1
        loglik[s] = ll
        beta[:] = 1.0
        for t in range(b - 1, a - 1, -1):
            r = t - a
            _posterior(alpha, r, beta, g)
            for i in range(d):
                x[i] = np.float64(Xc[t, i])
            for k in range(K):
                gk = g[k]
                post[k] += gk
                for i in range(d):
                    gx = gk * x[i]
                    s1[k, i] += gx
                    if outer:
                        for j in range(i + 1):
                            s2f[k, i, j] += gx * x[j]
                    else:
                        s2d[k, i] += gx * x[i]
                if t == a:
                    start[k] += gk
            if t > a:
                _backward_step(B, r, scale, A, alpha, beta, w, tr)
    _finish_transitions(A, tr, trans)
    if outer:
        for k in range(K):
            for i in range(d):
                for j in range(i):
                    s2f[k, j, i] = s2f[k, i, j]
    return 0


def gaussian_e_step(Xc, offsets, startprob, transmat, mc, pc, ct, compute_dtype=np.float64):
    """Fused Gaussian Baum-Welch E-step over one partition.

    Parameters
    ----------
    Xc : ndarray of shape (n, d)
        Observations minus the shift.
    offsets : ndarray of shape (S + 1,)
    startprob, transmat : ndarray
    mc : ndarray of shape (K, d)
        Means minus the shift.
    pc : ndarray
        Precision factors as :func:`emflow.models.hmm_mstep._precisions_cholesky` returns
        them for ``ct`` (upper Cholesky factors for full / tied, inverse deviations else).
    ct : {"full", "tied", "diag", "spherical"}
    compute_dtype : numpy float type
        Dtype of the density's arithmetic.

    Returns
    -------
    status : int
        As :func:`forward_backward`.
    loglik : ndarray of shape (S,)
    start, trans, post, s1, s2 : ndarray
        float64 sums; ``s2`` of shape (K, d, d) for full / tied, (K, d) else.
    """
    dt = np.dtype(compute_dtype)
    Xc = np.ascontiguousarray(Xc, dtype=dt)
    K, d = np.shape(mc)
    full = ct in ("full", "tied")
    pc = np.asarray(pc, dtype=np.float64)
    if ct == "tied":
        pc = np.broadcast_to(pc, (K, d, d))
    elif ct == "spherical":
        pc = np.broadcast_to(pc[:, None], (K, d))
    if full:
        logdet = np.log(np.diagonal(pc, axis1=1, axis2=2)).sum(axis=1)
        P, Pd = np.ascontiguousarray(pc, dtype=dt), np.zeros((K, d), dt)
    else:
        logdet = np.log(pc).sum(axis=1)
        P, Pd = np.zeros((K, 1, 1), dt), np.ascontiguousarray(pc, dtype=dt)
    logdet = logdet - 0.5 * d * math.log(2.0 * math.pi)
    off = np.ascontiguousarray(offsets, dtype=np.int64) - int(offsets[0])
    start, trans, post, s1 = np.zeros(K), np.zeros((K, K)), np.zeros(K), np.zeros((K, d))
    s2f, s2d = (np.zeros((K, d, d)), np.zeros((K, 0))) if full else (np.zeros((K, 0, 0)), np.zeros((K, d)))
    loglik = np.zeros(len(off) - 1)
    status = _gauss_e(Xc, off, np.ascontiguousarray(startprob, dtype=np.float64),
                      np.ascontiguousarray(transmat, dtype=np.float64), np.ascontiguousarray(mc, dtype=dt), P, Pd,
                      logdet, full, full, start, trans, post, s1, s2f, s2d, loglik)
    return int(status), loglik, start, trans, post, s1, (s2f if full else s2d)
