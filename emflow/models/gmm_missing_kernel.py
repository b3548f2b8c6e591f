"""Compiled E-step (numba) for Gaussian mixtures with missing values: full and tied covariances.

The mathematics of :func:`emflow.models.gmm_missing._incomplete_matrix` (through the
precision ``P = Sigma^{-1}`` and Schur complements), arranged so that the ``d x d`` products
per component are the complete-data GEMMs and only work that scales with the number ``t`` of
missing values of a row runs per row, in compiled code.

The rows of a partition are sorted by missingness pattern (an integer key per row), so that
everything that depends on the pattern only (for each component the Cholesky factor ``L`` of
``P_mm``, ``P_mm^{-1}``, the gathered columns ``P_{., m}``, the log-density's constant) is
computed once per run of equal patterns. Rows with nothing missing are the empty pattern.
With ``x0`` a row about the shift, zero where missing, ``e = x0 - mu_k`` and ``r`` the
observed part of ``e`` (zero on the missing coordinates ``m``):

* ``r^T P r = e^T P e + 2 mu_m^T (P e)_m + mu_m^T P_mm mu_m``: ``e^T P e`` is the complete-data
  quadratic form of ``x0`` (packed quadratic features against the coefficients of
  :mod:`emflow.models.gmm_kernel`: one GEMM per block), ``(P e)_m = (P x0)_m - (P mu)_m``;
* ``v = (P r)_m = (P x0)_m - P_mo mu_o`` (``t d`` per row and component); then
  ``r_o^T Sigma_oo^{-1} r_o = r^T P r - |L^{-1} v|^2``, ``log det Sigma_oo = log det Sigma +
  log det P_mm``, conditional mean ``mu_m - P_mm^{-1} v``, conditional covariance ``P_mm^{-1}``;
* the statistics of the completed row ``x0 + D`` (``D`` nonzero on ``m`` only) are those of
  ``x0`` (the same features against the responsibilities: one GEMM per block), the cross terms
  ``r_k D x0^T`` (``t d`` per row and component), the ``t x t`` blocks ``r_k D D^T`` and, once
  per run, ``(sum r_k) P_mm^{-1}``.

The rows of a run (up to ``_RUN`` at a time) are processed together: ``(P_k x0)_m`` for every
component and row is one GEMM (gathered precision rows times the rows' ``x0``), so are the
cross terms (weighted ``D`` times ``x0``), and the triangular solves, log-densities and
responsibilities run on ``(K t, rows)`` arrays whose inner loops are over the rows.

Float64 throughout; the answers agree with the NumPy path to rounding (tests: 1e-12).

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
# rows of one pattern taken together: the (K t, rows) work arrays stay in the L2 cache
_RUN = 256

_jit = numba.njit(cache=True, nogil=True, fastmath=False)


@_jit
def _factor(prec, mi, t, chol, rdiag, cinv, logdet_mm, want_inverse, W, V):
    """Cholesky ``L`` of every component's ``P_mm`` into ``chol[kc, :t, :t]`` (``rdiag``: the
    reciprocals of its diagonal), ``log det P_mm`` and (``want_inverse``) ``P_mm^{-1} =
    L^{-T} L^{-1}`` into ``cinv``. Returns False if one is not positive definite.

    The components share the pattern, so the factorisations run side by side: the work
    arrays ``W`` (3, d, d, Kc) and ``V`` (3, Kc) hold entry ``[i, j]`` of every component's
    matrix as one contiguous (Kc,) vector, and every operation is a loop over the components
    (the same operations, in the same order, as one factorisation at a time)."""
    Kc = prec.shape[0]
    A, L, Li = W[0], W[1], W[2]
    det, v, rd = V[0], V[1], V[2]
    for i in range(t):
        for j in range(i + 1):
            a = A[i, j]
            for kc in range(Kc):
                a[kc] = prec[kc, mi[i], mi[j]]
    for kc in range(Kc):
        det[kc] = 1.0
    for j in range(t):
        Ljj = L[j, j]
        for kc in range(Kc):
            v[kc] = A[j, j, kc]
        for q in range(j):
            Ljq = L[j, q]
            for kc in range(Kc):
                v[kc] -= Ljq[kc] * Ljq[kc]
        for kc in range(Kc):
            if not v[kc] > 0.0:
                return False
        for kc in range(Kc):
            Ljj[kc] = math.sqrt(v[kc])
            rd[kc] = 1.0 / Ljj[kc]
            det[kc] *= v[kc]
            rdiag[kc, j] = rd[kc]
            chol[kc, j, j] = Ljj[kc]
        for i in range(j + 1, t):
            Lij = L[i, j]
            for kc in range(Kc):
                Lij[kc] = A[i, j, kc]
            for q in range(j):
                Liq, Ljq = L[i, q], L[j, q]
                for kc in range(Kc):
                    Lij[kc] -= Liq[kc] * Ljq[kc]
            for kc in range(Kc):
                Lij[kc] *= rd[kc]
                chol[kc, i, j] = Lij[kc]
    for kc in range(Kc):
        if 1e-280 < det[kc] < 1e280:  # one logarithm, unless the product could leave the range
            logdet_mm[kc] = math.log(det[kc])
        else:
            ld = 0.0
            for j in range(t):
                ld += math.log(L[j, j, kc])
            logdet_mm[kc] = 2.0 * ld
    if want_inverse:
        for c in range(t):  # L^{-1}: Li[i, c] for i >= c
            Lcc = L[c, c]
            Lic = Li[c, c]
            for kc in range(Kc):
                Lic[kc] = 1.0 / Lcc[kc]
            for i in range(c + 1, t):
                u = Li[i, c]
                for kc in range(Kc):
                    u[kc] = 0.0
                for q in range(c, i):
                    Liq, Lqc = L[i, q], Li[q, c]
                    for kc in range(Kc):
                        u[kc] -= Liq[kc] * Lqc[kc]
                Lii = L[i, i]
                for kc in range(Kc):
                    u[kc] *= 1.0 / Lii[kc]
        for i in range(t):  # (L^{-T} L^{-1})_{ij} = sum_q Linv_{qi} Linv_{qj}, q >= max(i, j)
            for j in range(i, t):
                for kc in range(Kc):
                    v[kc] = 0.0
                for q in range(j, t):
                    Lqi, Lqj = Li[q, i], Li[q, j]
                    for kc in range(Kc):
                        v[kc] += Lqi[kc] * Lqj[kc]
                for kc in range(Kc):
                    cinv[kc, j, i] = v[kc]
                    cinv[kc, i, j] = v[kc]
    return True


@_jit
def _pattern_keys(miss):
    """Each row's missingness pattern as an integer (bit j: coordinate j missing), d <= 62."""
    n, d = miss.shape
    key = np.empty(n, np.int64)
    for b in range(n):
        v = 0
        for j in range(d):
            if miss[b, j]:
                v |= 1 << j
        key[b] = v
    return key


@_jit
def _features(X0, F, off):
    """Packed quadratic features of ``[x0, 1]`` (the layout of :mod:`emflow.models.gmm_kernel`)."""
    B, d = X0.shape
    for b in range(B):
        x, f = X0[b], F[b]
        for p in range(d):
            f[p] = x[p]
        f[d] = 1.0
        for p in range(d):
            fp = f[off[p] : off[p] + d - p]
            xp = x[p]
            for q in range(d - p):
                fp[q] = xp * x[p + q]


@_jit
def _flush(t, mi, cinv, Nk, s2):
    """End of a run of rows of one pattern: add its conditional covariances ``N_k P_mm^{-1}``
    into the missing block of ``s2``."""
    K = Nk.shape[0]
    Kc = cinv.shape[0]
    for k in range(K):
        kc = k if Kc == K else 0
        for i in range(t):
            for j in range(t):
                s2[k, mi[i], mi[j]] += Nk[k] * cinv[kc, i, j]
        Nk[k] = 0.0


@_jit
def _pattern(prec, precT, mc, log_w, logdet_sig, hd, mi, t, chol, rdiag, cinv, logdet_mm, PmT, mm, cvec, const,
             want_inverse, W, V):
    """Everything that depends on the pattern only: the factorisations, ``PmT[k t + i, j] =
    P_k[j, m_i]``, ``mm = mu_m``, ``cvec = P_mo mu_o`` and the constant of the log-density."""
    K, d = mc.shape
    Kc = prec.shape[0]
    if not _factor(prec, mi, t, chol, rdiag, cinv, logdet_mm, want_inverse, W, V):
        return False
    for k in range(K):
        kc = k if Kc == K else 0
        q = 0.0
        for i in range(t):
            for j in range(d):
                PmT[k * t + i, j] = precT[kc, mi[i], j]  # prec[kc, j, mi[i]], read in order
            v = 0.0
            for j in range(t):
                v += prec[kc, mi[i], mi[j]] * mc[k, mi[j]]
            mm[k * t + i] = mc[k, mi[i]]
            cvec[k * t + i] = hd[k, mi[i]] - v  # P_mo mu_o = (P mu)_m - P_mm mu_m
            q += mc[k, mi[i]] * (v - 2.0 * hd[k, mi[i]])
        const[k] = log_w[k] - 0.5 * ((d - t) * _LOG_2PI + logdet_sig[kc] + logdet_mm[kc] + q)
    return True


@_jit
def _run_end(miss, b0, lim):
    """The end of the run of rows with row ``b0``'s pattern, at most ``lim``."""
    d = miss.shape[1]
    b1 = b0 + 1
    while b1 < lim:
        for j in range(d):
            if miss[b1, j] != miss[b0, j]:
                return b1
        b1 += 1
    return b1


@_jit
def _rows(miss, X0, Lq, hd, mc, prec, logdet_sig, log_w, gamma, use_gamma, wts, use_w, want_stats, want_resp,
          want_fill, logp_out, want_logp, lse, resp, WR, s1, s2, cross, xfill, mi, state, chol, rdiag, cinv, logdet_mm,
          PmT, mm, cvec, const, Nk, HT, ZT, LP, col, ctmp, precT, W, V):
    """One block of rows sorted by pattern (every array indexed by the block's row: the caller
    gathers and scatters, so that this loop reads and writes memory in order), taken a run of
    equal patterns (at most ``LP.shape[1]`` rows) at a time: the products with the gathered
    precision columns are GEMMs (``(P x0)_m`` and the cross terms ``D x0^T``), and the rest
    runs on ``(K t, rows)`` arrays whose inner loops are over the rows (contiguous, no
    reduction: they vectorise). What depends on the pattern only is computed when the pattern
    changes and kept across blocks (``state[0]``: the current pattern's ``t``, -1 for none).
    Returns -1, or the block row at which a ``P_mm`` was not positive definite."""
    B, d = miss.shape
    K = mc.shape[0]
    Kc = prec.shape[0]
    CH = LP.shape[1]
    b0 = 0
    while b0 < B:
        b1 = _run_end(miss, b0, min(B, b0 + CH))
        nr = b1 - b0
        t = 0
        same = True
        for j in range(d):
            if miss[b0, j]:
                if t >= state[0] or mi[t] != j:
                    same = False
                t += 1
        if not (same and t == state[0]):
            if want_stats and state[0] >= 0:
                _flush(state[0], mi, cinv, Nk, s2)
            t = 0
            for j in range(d):
                if miss[b0, j]:
                    mi[t] = j
                    t += 1
            state[0] = -1
            if not _pattern(prec, precT, mc, log_w, logdet_sig, hd, mi, t, chol, rdiag, cinv, logdet_mm, PmT, mm, cvec,
                            const, want_stats, W, V):
                return b0
            state[0] = t
        Kt = K * t
        Xr = X0[b0:b1]
        H = HT[: Kt * nr].reshape((Kt, nr))
        Z = ZT[: Kt * nr].reshape((Kt, nr))
        if t > 0:
            np.dot(PmT[:Kt], Xr.T, H)  # (P_k x0)_m for every component and row: x0 is zero on m
        for k in range(K):
            kc = k if Kc == K else 0
            L, rd = chol[kc], rdiag[kc]
            o = k * t
            lp = LP[k]
            for r in range(nr):
                lp[r] = -2.0 * Lq[b0 + r, k]  # e^T P e, e = x0 - mu
            for i in range(t):
                h, m2 = H[o + i], 2.0 * mm[o + i]
                for r in range(nr):
                    lp[r] += m2 * h[r]
            for i in range(t):  # L^{-1} v, v = (P r)_m = (P x0)_m - P_mo mu_o
                h, z, c, ri = H[o + i], Z[o + i], cvec[o + i], rd[i]
                for r in range(nr):
                    z[r] = h[r] - c
                for q in range(i):
                    zq, lq = Z[o + q], L[i, q]
                    for r in range(nr):
                        z[r] -= lq * zq[r]
                for r in range(nr):
                    z[r] *= ri
                    lp[r] -= z[r] * z[r]
            for i in range(t - 1, -1, -1):  # L^{-T} L^{-1} v = P_mm^{-1} v
                z, ri = Z[o + i], rd[i]
                for q in range(i + 1, t):
                    zq, lq = Z[o + q], L[q, i]
                    for r in range(nr):
                        z[r] -= lq * zq[r]
                for r in range(nr):
                    z[r] *= ri
            ck = const[k]
            for r in range(nr):
                lp[r] = ck - 0.5 * lp[r]
            if want_logp:
                for r in range(nr):
                    logp_out[b0 + r, k] = lp[r]
        mx, tot = col[0], col[1]
        for r in range(nr):
            mx[r] = -np.inf
            tot[r] = 0.0
        for k in range(K):
            lp = LP[k]
            for r in range(nr):
                if lp[r] > mx[r]:
                    mx[r] = lp[r]
        for r in range(nr):
            if not (mx[r] > -np.inf and mx[r] < np.inf):
                mx[r] = 0.0
        for k in range(K):
            lp = LP[k]
            for r in range(nr):
                lp[r] = math.exp(lp[r] - mx[r])
                tot[r] += lp[r]
        for r in range(nr):
            lse[b0 + r] = math.log(tot[r]) + mx[r]
        for k in range(K):  # the responsibilities (or the given weights), into LP
            lp = LP[k]
            for r in range(nr):
                lp[r] = lp[r] / tot[r]
            if want_resp or not use_gamma:
                for r in range(nr):
                    resp[b0 + r, k] = lp[r]
            if use_gamma:
                for r in range(nr):
                    lp[r] = gamma[b0 + r, k]
        for c in range(Kt):
            z, mc_ = Z[c], mm[c]
            for r in range(nr):
                z[r] = mc_ - z[r]  # D: the conditional mean about the shift
        if want_fill:
            for r in range(nr):
                for j in range(d):
                    xfill[b0 + r, j] = Xr[r, j]
                for i in range(t):
                    acc = 0.0
                    for k in range(K):
                        acc += LP[k, r] * Z[k * t + i, r]
                    xfill[b0 + r, mi[i]] = acc
        if want_stats:
            for k in range(K):
                wr = LP[k]
                if use_w:
                    for r in range(nr):
                        wr[r] *= wts[b0 + r]
                acc = Nk[k]
                for r in range(nr):
                    WR[b0 + r, k] = wr[r]
                    acc += wr[r]
                Nk[k] = acc
                o = k * t
                for i in range(t):
                    dw = H[o + i]  # H is free now: the weighted D
                    z = Z[o + i]
                    for r in range(nr):
                        dw[r] = wr[r] * z[r]
                    acc = s1[k, mi[i]]
                    for r in range(nr):
                        acc += dw[r]
                    s1[k, mi[i]] = acc
                    for j in range(t):
                        zj = Z[o + j]
                        acc = s2[k, mi[i], mi[j]]
                        for r in range(nr):
                            acc += dw[r] * zj[r]
                        s2[k, mi[i], mi[j]] = acc
            if t > 0:
                C = ctmp[: Kt * d].reshape((Kt, d))
                np.dot(H, Xr, C)  # sum over the run of r_k D x0^T (x0 is zero on m)
                for k in range(K):
                    for i in range(t):
                        cr, cc = cross[k, mi[i]], C[k * t + i]
                        for j in range(d):
                            cr[j] += cc[j]
        b0 = b1
    return -1


def incomplete_matrix(X, obs, miss, w, params, mc, log_w, lse, resp, s, xhat, g, gamma=None, logp_out=None):
    """The compiled twin of :func:`emflow.models.gmm_missing._incomplete_matrix`: the same
    arguments except that ``X`` (float64) is not yet centred or zeroed where missing and ``obs``
    is unused; rows with nothing missing are allowed. The same results, except that ``resp`` is left unset when
    statistics are asked for: no caller reads it then)."""
    ct = params.covariance_type
    K, d = mc.shape
    pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
    pc = pc[None] if ct == "tied" else pc
    Kc = pc.shape[0]
    prec = np.ascontiguousarray(np.matmul(pc, pc.transpose(0, 2, 1)))  # (Kc, d, d)
    logdet_sig = -2.0 * np.sum(np.log(np.diagonal(pc, axis1=1, axis2=2)), axis=1)
    full = params._replace(precisions_cholesky=np.broadcast_to(pc, (K, d, d)), covariance_type="full")
    C, _ = _quadratic_coef(full, g)  # (P, K): -e^T P_k e / 2 from the features of [x0, 1]
    hd = np.einsum("kij,kj->ki", np.broadcast_to(prec, (K, d, d)), mc)  # P_k mu_k
    stats, fill = s is not None, xhat is not None
    n = X.shape[0]
    miss = np.ascontiguousarray(miss)
    if d <= 62:
        order = np.argsort(_pattern_keys(miss))
    else:
        from .gmm_missing import _patterns

        order = _patterns(miss)[1]
    m = d + 1
    P = m * (m + 1) // 2
    off = _pair_offsets(d)
    step = int(max(64, min(n, _BLOCK_BYTES // (8 * (P + 2 * K + d)))))
    F = np.empty((step, P))
    X0 = np.empty((step, d))
    Lq = np.empty((step, K))
    WR = np.empty((step, K))
    acc = np.zeros((K, P))
    s1, s2, cross = np.zeros((K, d)), np.zeros((K, d, d)), np.zeros((K, d, d))
    mi, state = np.empty(d, np.int64), np.full(1, -1, np.int64)
    chol, cinv, rdiag = np.zeros((Kc, d, d)), np.zeros((Kc, d, d)), np.zeros((Kc, d))
    logdet_mm, const, Nk = np.empty(Kc), np.empty(K), np.zeros(K)
    PmT, ctmp = np.empty((K * d, d)), np.empty(K * d * d)
    precT = np.ascontiguousarray(prec.transpose(0, 2, 1))
    W, V = np.zeros((3, d, d, Kc)), np.zeros((3, Kc))
    mm, cvec = np.empty(K * d), np.empty(K * d)
    HT, ZT = np.empty(K * d * _RUN), np.empty(K * d * _RUN)
    LP, col = np.empty((K, _RUN)), np.empty((2, _RUN))
    dummy = np.zeros((1, 1))
    want_resp = not stats  # the statistics need the responsibilities of the block only
    Rb = np.empty((step, K))
    lse_b, miss_b = np.empty(step), np.empty((step, d), bool)
    lp_b = np.empty((step, K)) if logp_out is not None else dummy
    xf_b = np.empty((step, d)) if fill else dummy
    g_b = np.empty((step, K)) if gamma is not None else dummy
    w_b = np.empty(step) if w is not None else dummy[0]
    for a in range(0, n, step):
        b = min(n, a + step)
        nb = b - a
        rows = order[a:b]
        Fb, X0b = F[:nb], X0[:nb]
        np.take(X, rows, axis=0, out=X0b)
        np.take(miss, rows, axis=0, out=miss_b[:nb])
        X0b -= g
        X0b[miss_b[:nb]] = 0.0  # x0: about the shift, zero where missing
        if gamma is not None:
            np.take(gamma, rows, axis=0, out=g_b[:nb])
        if w is not None:
            np.take(w, rows, out=w_b[:nb])
        _features(X0b, Fb, off)
        np.matmul(Fb, C, out=Lq[:nb])
        bad = _rows(miss_b[:nb], X0b, Lq, hd, mc, prec, logdet_sig, log_w, g_b, gamma is not None, w_b,
                    w is not None, stats, want_resp, fill, lp_b, logp_out is not None, lse_b, Rb, WR, s1, s2, cross,
                    xf_b, mi, state, chol, rdiag, cinv, logdet_mm, PmT, mm, cvec, const, Nk, HT, ZT, LP, col, ctmp,
                    precT, W, V)
        if bad >= 0:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        lse[rows] = lse_b[:nb]
        if want_resp:
            resp[rows] = Rb[:nb]
        if logp_out is not None:
            logp_out[rows] = lp_b[:nb]
        if fill:
            xhat[rows] = xf_b[:nb]
        if stats:
            acc += WR[:nb].T @ Fb  # the statistics of x0
    if fill:
        xhat += g
    if stats:
        if state[0] >= 0:
            _flush(state[0], mi, cinv, Nk, s2)
        N, S1, S2 = _unpack_full(acc, d)
        S2 = S2 + cross + cross.transpose(0, 2, 1) + s2
        s.n[...] += N
        s.s1[...] += S1 + s1
        s.s2[...] += S2.sum(axis=0) if ct == "tied" else S2
    _finish(s, lse, w)
    return lse, resp, s, xhat
