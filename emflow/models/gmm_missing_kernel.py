"""Compiled E-step (numba) for Gaussian mixtures with missing values: full and tied covariances.

The same mathematics as :func:`emflow.models.gmm_missing._incomplete_matrix` (through the
precision ``P = Sigma^{-1}`` and Schur complements), arranged so that every product of size
``d x d`` per component is one well-shaped GEMM over a block of rows, and only the work that
scales with the number ``t`` of missing values of a row runs per row in compiled code.

With ``x0`` a row about the shift, zero where missing, ``e = x0 - mu_k`` and ``s`` the part of
``e`` on the missing coordinates ``m`` (``-mu_m``), the observed residual is ``r = e - s``, so

* ``r^T P r = e^T P e + 2 mu_m^T (P e)_m + mu_m^T P_mm mu_m``: ``e^T P e`` is the complete-data
  quadratic form of ``x0`` (packed quadratic features against the coefficients of
  :mod:`emflow.models.gmm_kernel`, one GEMM), ``(P e)_m = (P x0)_m - (P mu)_m`` is read from
  ``P_k x0`` for every component (one GEMM ``(B, d) x (d, K d)``);
* ``v = (P r)_m = (P e)_m + P_mm mu_m``, and with ``P_mm = L L^T``,
  ``r_o^T Sigma_oo^{-1} r_o = r^T P r - |L^{-1} v|^2``, ``log det Sigma_oo = log det Sigma +
  log det P_mm``, conditional mean ``mu_m - L^{-T} L^{-1} v``, conditional covariance
  ``P_mm^{-1}``;
* the statistics of the completed row ``x0 + D`` (``D`` nonzero on ``m`` only) are those of
  ``x0`` (the same packed features against the responsibilities, one GEMM), the cross terms
  ``D x0^T`` (one GEMM of the per-row ``r_k D`` against ``x0``) and, per row, the ``t x t``
  block ``r_k (D D^T + P_mm^{-1})``.

Per row and component the compiled part costs ``O(t^3)`` for the factorisation (reused while
consecutive rows share a pattern) and ``O(t^2)`` besides; the GEMMs cost about 2.5 times the
complete-data E-step. Float64 throughout; the answers agree with the NumPy path to rounding
(tests: 1e-12).

This module imports numba; :mod:`emflow.models.gmm_missing` imports it lazily through
:func:`emflow.models._compiled.compiled_kernel` and uses the NumPy path without numba.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .gmm_kernel import _pair_offsets, _quadratic_coef, _unpack_full
from .gmm_missing import _finish

__all__ = ["incomplete_matrix"]

_LOG_2PI = math.log(2 * math.pi)
# bytes of the per-block buffers (features, P x0, cross terms): they stay in the caches
_BLOCK_BYTES = 4 << 20

_jit = numba.njit(cache=True, nogil=True, fastmath=False)


@_jit
def _factor(prec, mi, t, chol, cinv, logdet_mm, want_inverse):
    """Cholesky ``L`` of every component's ``P_mm`` into ``chol[kc, :t, :t]``, ``log det P_mm``
    and (``want_inverse``) ``P_mm^{-1}`` into ``cinv``. Returns False if one is not positive
    definite."""
    for kc in range(prec.shape[0]):
        L = chol[kc]
        ld = 0.0
        for j in range(t):
            v = prec[kc, mi[j], mi[j]]
            for q in range(j):
                v -= L[j, q] * L[j, q]
            if not v > 0.0:
                return False
            L[j, j] = math.sqrt(v)
            ld += math.log(L[j, j])
            for i in range(j + 1, t):
                u = prec[kc, mi[i], mi[j]]
                for q in range(j):
                    u -= L[i, q] * L[j, q]
                L[i, j] = u / L[j, j]
        logdet_mm[kc] = 2.0 * ld
        if want_inverse:
            C = cinv[kc]
            for c in range(t):  # column c of P_mm^{-1}: L L^T x = e_c
                for i in range(t):  # forward
                    u = 1.0 if i == c else 0.0
                    for q in range(i):
                        u -= L[i, q] * C[q, c]
                    C[i, c] = u / L[i, i]
                for i in range(t - 1, -1, -1):  # backward
                    u = C[i, c]
                    for q in range(i + 1, t):
                        u -= L[q, i] * C[q, c]
                    C[i, c] = u / L[i, i]
            for i in range(t):  # exactly symmetric
                for j in range(i):
                    C[i, j] = C[j, i] = 0.5 * (C[i, j] + C[j, i])
    return True


@_jit
def _rows(miss, Lq, H, hd, mc, prec, logdet_sig, log_w, gamma, use_gamma, wts, use_w, want_stats, want_fill,
          logp_out, want_logp, lse, resp, WR, E, s1, s2, xfill, mi, prev, chol, cinv, logdet_mm, Z, logp, tprev):
    """One block of rows (see the module docstring). Returns -1, or the (block) row at which a
    ``P_mm`` was not positive definite; ``tprev`` carries the cached pattern between blocks."""
    B, d = miss.shape
    K = mc.shape[0]
    Kc = prec.shape[0]
    for b in range(B):
        t = 0
        for j in range(d):
            if miss[b, j]:
                mi[t] = j
                t += 1
        same = t == tprev[0]
        if same:
            for i in range(t):
                if mi[i] != prev[i]:
                    same = False
                    break
        if not same:
            if not _factor(prec, mi, t, chol, cinv, logdet_mm, want_stats):
                tprev[0] = -1
                return b
            for i in range(t):
                prev[i] = mi[i]
            tprev[0] = t
        mx = -np.inf
        for k in range(K):
            kc = k if Kc == K else 0
            L = chol[kc]
            ePe = -2.0 * Lq[b, k]
            lin = 0.0
            quad = 0.0
            for i in range(t):
                pe = H[b, kc * d + mi[i]] - hd[k, mi[i]]
                pm = 0.0
                for j in range(t):
                    pm += prec[kc, mi[i], mi[j]] * mc[k, mi[j]]
                lin += mc[k, mi[i]] * pe
                quad += mc[k, mi[i]] * pm
                Z[k, i] = pe + pm  # v = (P r)_m
            maha = ePe + 2.0 * lin + quad
            for i in range(t):  # L^{-1} v
                u = Z[k, i]
                for q in range(i):
                    u -= L[i, q] * Z[k, q]
                Z[k, i] = u / L[i, i]
                maha -= Z[k, i] * Z[k, i]
            for i in range(t - 1, -1, -1):  # L^{-T} L^{-1} v = P_mm^{-1} v
                u = Z[k, i]
                for q in range(i + 1, t):
                    u -= L[q, i] * Z[k, q]
                Z[k, i] = u / L[i, i]
            lp = log_w[k] - 0.5 * ((d - t) * _LOG_2PI + logdet_sig[kc] + logdet_mm[kc]) - 0.5 * maha
            logp[k] = lp
            if want_logp:
                logp_out[b, k] = lp
            if lp > mx:
                mx = lp
        if not (mx > -np.inf and mx < np.inf):
            mx = 0.0
        tot = 0.0
        for k in range(K):
            logp[k] = math.exp(logp[k] - mx)
            tot += logp[k]
        lse[b] = math.log(tot) + mx
        for k in range(K):
            resp[b, k] = logp[k] / tot
        if want_fill:
            for i in range(t):
                acc = 0.0
                for k in range(K):
                    r = gamma[b, k] if use_gamma else resp[b, k]
                    acc += r * (mc[k, mi[i]] - Z[k, i])
                xfill[b, mi[i]] = acc
        if want_stats:
            for j in range(K * d):
                E[b, j] = 0.0
            for k in range(K):
                kc = k if Kc == K else 0
                wr = gamma[b, k] if use_gamma else resp[b, k]
                if use_w:
                    wr *= wts[b]
                WR[b, k] = wr
                for i in range(t):
                    Z[k, i] = mc[k, mi[i]] - Z[k, i]  # D: the conditional mean about the shift
                for i in range(t):
                    Di = wr * Z[k, i]
                    E[b, k * d + mi[i]] = Di
                    s1[k, mi[i]] += Di
                    for j in range(t):
                        s2[k, mi[i], mi[j]] += Di * Z[k, j] + wr * cinv[kc, i, j]
    return -1


def incomplete_matrix(Xc, obs, miss, w, params, mc, log_w, lse, resp, s, xhat, g, gamma=None, logp_out=None):
    """The compiled twin of :func:`emflow.models.gmm_missing._incomplete_matrix` (same
    arguments, same results)."""
    ct = params.covariance_type
    K, d = mc.shape
    pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
    pc = pc[None] if ct == "tied" else pc
    Kc = pc.shape[0]
    prec = np.ascontiguousarray(np.matmul(pc, pc.transpose(0, 2, 1)))  # (Kc, d, d)
    logdet_sig = -2.0 * np.sum(np.log(np.diagonal(pc, axis1=1, axis2=2)), axis=1)
    full = params._replace(precisions_cholesky=np.broadcast_to(pc, (K, d, d)), covariance_type="full")
    C, _ = _quadratic_coef(full, g)  # (P, K): -e^T P_k e / 2 from the features of [x0, 1]
    Pcat = np.ascontiguousarray(prec.transpose(1, 0, 2).reshape(d, Kc * d))  # x0 @ Pcat = P_k x0
    hd = np.einsum("kij,kj->ki", np.broadcast_to(prec, (K, d, d)), mc)  # P_k mu_k
    stats, fill = s is not None, xhat is not None
    n = Xc.shape[0]
    m = d + 1
    P = m * (m + 1) // 2
    off = _pair_offsets(d)
    step = int(max(64, min(n, _BLOCK_BYTES // (8 * (P + 2 * Kc * d + 4 * K + 2 * d)))))
    F = np.empty((step, P))
    F[:, d] = 1.0
    H = np.empty((step, Kc * d))
    Lq = np.empty((step, K))
    E = np.zeros((step, K * d)) if stats else np.zeros((1, 1))
    WR = np.empty((step, K))
    acc = np.zeros((K, P))
    cross = np.zeros((K * d, d))
    s1 = np.zeros((K, d))
    s2 = np.zeros((K, d, d))
    mi, prev = np.empty(d, np.int64), np.empty(d, np.int64)
    chol, cinv = np.zeros((Kc, d, d)), np.zeros((Kc, d, d))
    logdet_mm, Z, logp, tprev = np.empty(Kc), np.empty((K, d)), np.empty(K), np.full(1, -1, np.int64)
    dummy = np.zeros((1, 1))
    miss = np.ascontiguousarray(miss)
    for a in range(0, n, step):
        b = min(n, a + step)
        nb = b - a
        Fb = F[:nb]
        X0 = Fb[:, :d]
        X0[...] = Xc[a:b]
        for p in range(d):  # columns 0..d are already [x0, 1] = a * 1
            np.multiply(X0[:, p : p + 1], X0[:, p:], out=Fb[:, off[p] : off[p + 1]])
        np.matmul(Fb, C, out=Lq[:nb])
        np.matmul(X0, Pcat, out=H[:nb])
        xf = xhat[a:b] if fill else dummy
        if fill:
            xf[...] = X0  # the observed values (zero where missing, overwritten there)
        bad = _rows(miss[a:b], Lq, H, hd, mc, prec, logdet_sig, log_w,
                    dummy if gamma is None else gamma[a:b], gamma is not None,
                    dummy[0] if w is None else w[a:b], w is not None, stats, fill,
                    dummy if logp_out is None else logp_out[a:b], logp_out is not None,
                    lse[a:b], resp[a:b], WR, E, s1, s2, xf, mi, prev, chol, cinv, logdet_mm, Z, logp, tprev)
        if bad >= 0:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        if fill:
            xf += g
        if stats:
            acc += WR[:nb].T @ Fb  # the statistics of x0
            cross += E[:nb].T @ X0  # sum_i r_ik D_i x0_i^T
    if stats:
        N, S1, S2 = _unpack_full(acc, d)
        cr = cross.reshape(K, d, d)
        S2 = S2 + cr + cr.transpose(0, 2, 1) + s2
        s.n[...] += N
        s.s1[...] += S1 + s1
        s.s2[...] += S2.sum(axis=0) if ct == "tied" else S2
    _finish(s, lse, w)
    return lse, resp, s, xhat
