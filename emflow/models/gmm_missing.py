"""Gaussian mixture EM with values missing at random (Ghahramani & Jordan, 1994).

A missing value is a NaN. For a row with observed coordinates ``o`` and missing ``m``:

* its responsibilities and log-likelihood come from the marginal density of ``x_o``
  under each component, ``N(x_o | mu_o, Sigma_oo)``;
* the M-step uses the expected complete-data statistics: the missing coordinates are
  replaced by their conditional means ``mu_m + Sigma_mo Sigma_oo^{-1} (x_o - mu_o)`` and the
  second moments gain the conditional covariance ``Sigma_mm - Sigma_mo Sigma_oo^{-1} Sigma_om``.

The statistics are :class:`emflow.models.gmm.GMMStats`, exactly as for complete data (the
same shift, the same shapes), so partitions add and :func:`emflow.models.gmm.m_step` is the
M-step. Complete rows go through the complete-data kernel unchanged: with no NaN the E-step
*is* :func:`emflow.models.gmm.e_step`.

Full and tied covariances: rows are grouped by their missingness pattern; a pattern with
``t`` missing values costs one t x t factorisation per component (of the precision's missing
block, see :func:`_incomplete_matrix`), computed for many patterns at a time.
Diagonal and spherical covariances need no grouping (the coordinates are independent given
the component). Arithmetic is float64 throughout.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from . import gmm as G
from ._compiled import compiled_kernel

__all__ = ["e_step", "posterior", "impute", "check_rows"]

_LOG_2PI = np.log(2 * np.pi)
# floats per temporary: bounds the per-pattern (P, K, d, d) and per-row (B, K, d, d) arrays
_BLOCK_FLOATS = 1 << 21

#: Which path the full and tied covariances take: "auto" the compiled kernel
#: (:mod:`emflow.models.gmm_missing_kernel`) when numba imports, else NumPy; "numpy" never the
#: kernel; "numba" the kernel, an ImportError without numba. Both give the same answers.
KERNEL = "auto"


def _kernel():
    """The compiled kernel module, or ``None`` for the NumPy path."""
    return compiled_kernel(KERNEL, "gmm_missing_kernel")


def check_rows(miss: np.ndarray, row0: int = 0) -> None:
    """Raise DataError naming the first row whose every value is missing."""
    empty = np.flatnonzero(miss.all(axis=1))
    if empty.size:
        raise DataError(
            f"Row {row0 + int(empty[0])} has every value missing (NaN) ({empty.size} such row(s)); a row with "
            "no observed value says nothing about the mixture. Drop those rows."
        )


def _split(X):
    X = np.asarray(X)
    miss = np.isnan(X)
    inc = miss.any(axis=1)
    return X, miss, inc


def e_step(X, w, params: G.GMMParams, compute_dtype: str = "float64", row0: int = 0) -> G.GMMStats:
    """E-step over one partition with NaN marking missing values.

    Parameters
    ----------
    X : ndarray of shape (n, d)
        NaN marks a missing value; a row must have at least one observed value.
    w : ndarray of shape (n,) or None
    params : GMMParams
    compute_dtype : str
        Used for the complete rows only (the incomplete rows are computed in float64; with the
        compiled kernel and float64, full and tied covariances, the complete rows go through
        the kernel too, as the pattern with nothing missing).
    row0 : int
        Global index of the first row (error messages).

    Returns
    -------
    GMMStats
        Expected complete-data statistics about ``gmm.shift_of(params)``.
    """
    X, miss, inc = _split(X)
    if not inc.any():
        return G.e_step(X, w, params, compute_dtype)
    check_rows(miss, row0)
    if params.covariance_type in ("full", "tied") and np.dtype(compute_dtype) == np.float64 and _kernel():
        wa = None if w is None else np.asarray(w, dtype=np.float64)
        return _incomplete(X, miss, wa, params, stats=True)[2]
    wi = None if w is None else np.asarray(w, dtype=np.float64)[inc]
    _, _, s, _ = _incomplete(X[inc], miss[inc], wi, params, stats=True)
    if inc.all():
        return s
    wc = None if w is None else np.asarray(w)[~inc]
    sc = G.e_step(X[~inc], wc, params, compute_dtype)
    return G.GMMStats(*(a + b for a, b in zip(sc, s)))


def posterior(X, params: G.GMMParams, row0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-row log-likelihood of the observed values (n,) and responsibilities (n, K)."""
    X, miss, inc = _split(X)
    if not inc.any():
        return G.posterior(X, params)
    check_rows(miss, row0)
    lse = np.empty(X.shape[0])
    resp = np.empty((X.shape[0], len(params.weights)))
    lse[inc], resp[inc], _, _ = _incomplete(X[inc], miss[inc], None, params)
    if not inc.all():
        lse[~inc], resp[~inc] = G.posterior(X[~inc], params)
    return lse, resp


def impute(X, params: G.GMMParams, row0: int = 0) -> np.ndarray:
    """``X`` with each missing value replaced by its conditional expectation given the row's
    observed values, ``sum_k p(k | x_o) E[x_m | x_o, k]`` (float64; observed values unchanged)."""
    X, miss, inc = _split(X)
    out = np.array(X, dtype=np.float64, copy=True)
    if inc.any():
        check_rows(miss, row0)
        _, _, _, xhat = _incomplete(X[inc], miss[inc], None, params, fill=True)
        out[inc] = np.where(miss[inc], xhat, out[inc])
    return out


def _incomplete(X, miss, w, params: G.GMMParams, *, stats: bool = False, fill: bool = False, gamma=None,
                logp=None):
    """Log-likelihoods (n,), responsibilities (n, K), statistics (or None) and imputed rows
    (or None) of rows that each miss at least one value.

    ``gamma`` (n, K), if given, replaces the responsibilities as the weights of the
    statistics and imputations (an HMM's state posteriors: :mod:`emflow.models.hmm_missing`);
    ``logp`` (n, K), if given, receives each row's ``log w_k + log N(x_o | mu_o, Sigma_oo)``."""
    ct = params.covariance_type
    g = G.shift_of(params)
    mu = np.asarray(params.means, dtype=np.float64)
    K, d = mu.shape
    with np.errstate(divide="ignore"):
        log_w = np.log(np.asarray(params.weights, dtype=np.float64))
    mc = mu - g
    n = X.shape[0]
    lse = np.empty(n)
    resp = np.empty((n, K))
    s = G.empty_stats(ct, K, d) if stats else None
    xhat = np.empty((n, d)) if fill else None
    logp_out = logp
    kern = None if ct in ("diag", "spherical") else _kernel()
    if kern is not None:  # it centres the rows itself, block by block
        X = np.asarray(X, dtype=np.float64)
        return kern.incomplete_matrix(X, None, miss, w, params, mc, log_w, lse, resp, s, xhat, g, gamma, logp_out)
    Xc = np.where(miss, 0.0, np.asarray(X, dtype=np.float64) - g)  # observed values about g, 0 where missing
    if ct in ("diag", "spherical"):
        var = np.asarray(params.covariances, dtype=np.float64)
        var = var if ct == "diag" else np.repeat(var[:, None], d, axis=1)
        prec = 1.0 / var
        obs = (~miss).astype(np.float64)
        step = max(64, _BLOCK_FLOATS // (4 * K + 4 * d))
        for a in range(0, n, step):
            b = min(n, a + step)
            Ob, Xb = obs[a:b], Xc[a:b]
            maha = (Xb**2) @ prec.T - 2.0 * Xb @ (mc * prec).T + Ob @ (mc**2 * prec).T
            logp = log_w - 0.5 * (Ob.sum(axis=1)[:, None] * _LOG_2PI + Ob @ np.log(var).T + maha)
            if logp_out is not None:
                logp_out[a:b] = logp
            lse[a:b], resp[a:b] = G._normalise(logp)
            r = resp[a:b] if gamma is None else gamma[a:b]
            if stats:
                wr = r if w is None else r * w[a:b, None]
                Nm = wr.T @ (1.0 - Ob)  # (K, d): weight of the rows missing coordinate j
                s.n[...] += wr.sum(axis=0)
                s.s1[...] += wr.T @ Xb + Nm * mc
                s.s2[...] += wr.T @ Xb**2 + Nm * (mc**2 + var)
            if fill:
                xhat[a:b] = g + Xb + (1.0 - Ob) * (r @ mc)
        _finish(s, lse, w)
        return lse, resp, s, xhat
    obs = (~miss).astype(np.float64)
    return _incomplete_matrix(Xc, obs, miss, w, params, mc, log_w, lse, resp, s, xhat, g, gamma, logp_out)


def _finish(s, lse, w):
    if s is not None:
        s.loglik[...] = lse.sum() if w is None else lse @ w
        s.weight_sum[...] = float(len(lse)) if w is None else float(np.sum(w))
        s.n_rows[...] = float(len(lse))


def _factor_inverse(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log det A`` (...,) and ``A^{-1}`` (..., t, t) for a stack of small symmetric positive
    definite matrices (..., t, t): Cholesky and forward substitution written over the whole
    stack, entry by entry, on contiguous (N,) vectors (LAPACK's per-matrix overhead, or a
    strided einsum, would dominate for the many tiny matrices here)."""
    t = A.shape[-1]
    lead = A.shape[:-2]
    At = np.ascontiguousarray(np.moveaxis(A.reshape(-1, t, t), 0, -1))  # (t, t, N)
    L = np.zeros_like(At)
    for j in range(t):
        v = At[j, j] - np.einsum("kn,kn->n", L[j, :j], L[j, :j]) if j else At[j, j].copy()
        if np.any(v <= 0.0):
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        L[j, j] = np.sqrt(v)
        for i in range(j + 1, t):
            L[i, j] = (At[i, j] - np.einsum("kn,kn->n", L[i, :j], L[j, :j])) / L[j, j] if j else At[i, j] / L[j, j]
    X = np.zeros_like(L)  # L^{-1}, lower triangular
    for i in range(t):
        X[i, i] = 1.0 / L[i, i]
        for k in range(i):
            X[i, k] = -np.einsum("jn,jn->n", L[i, k:i], X[k:i, k]) * X[i, i]
    C = np.empty_like(L)
    for a in range(t):
        for b in range(a + 1):
            C[a, b] = C[b, a] = np.einsum("in,in->n", X[a:, a], X[a:, b])
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=0, axis2=1)), axis=-1)
    return logdet.reshape(lead), np.moveaxis(C, -1, 0).reshape(lead + (t, t))


def _small_matvec(C: np.ndarray, V: np.ndarray, Kc: int) -> np.ndarray:
    """``Z[k, b] = C[b, k] @ V[k, b]`` for t x t matrices ``C`` (B, Kc, t, t) (Kc = 1: one per
    row) and vectors ``V`` (K, B, t): t^2 multiply-adds over whole (K, B) arrays when t is
    small (a batched matmul pays a call per tiny matrix)."""
    t = V.shape[2]
    Ct = np.moveaxis(C, 0, 1)  # (Kc, B, t, t): broadcasts against (K, B)
    if t > 8:
        return np.einsum("kbij,kbj->kbi", np.broadcast_to(Ct, (V.shape[0],) + Ct.shape[1:]), V)
    Z = np.empty_like(V)
    for i in range(t):
        z = Ct[:, :, i, 0] * V[:, :, 0]
        for j in range(1, t):
            z += Ct[:, :, i, j] * V[:, :, j]
        Z[:, :, i] = z
    return Z


def _patterns(miss: np.ndarray):
    """Rows grouped by missingness pattern, the patterns ordered by their number of missing
    values: ``(pid, order, ptr, first, t)`` with ``pid[i]`` row i's pattern, ``order`` the rows
    sorted by pattern, ``ptr[p]:ptr[p+1]`` pattern p's run in ``order``, ``first[p]`` a row of
    pattern p and ``t[p]`` its number of missing values (non-decreasing)."""
    packed = np.ascontiguousarray(np.packbits(miss, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, pid = np.unique(keys, return_index=True, return_inverse=True)
    t = miss[first].sum(axis=1)
    by_t = np.argsort(t, kind="stable")
    rank = np.empty_like(by_t)
    rank[by_t] = np.arange(by_t.size)
    pid = rank[pid.ravel()]
    order = np.argsort(pid, kind="stable")
    ptr = np.searchsorted(pid[order], np.arange(by_t.size + 1))
    return pid, order, ptr, first[by_t], t[by_t]


def _incomplete_matrix(Xc, obs, miss, w, params, mc, log_w, lse, resp, s, xhat, g, gamma=None, logp_out=None):
    """Full and tied covariances, through the precision ``P = Sigma^{-1}``: for a pattern with
    missing coordinates ``m`` (``t`` of them), ``C = P_mm^{-1}`` is the conditional covariance
    of ``x_m``, the conditional mean is ``mu_m - C P_mo r_o`` (``r_o = x_o - mu_o``),
    ``r_o^T Sigma_oo^{-1} r_o = r_o^T P_oo r_o - (P_mo r_o)^T C (P_mo r_o)`` and
    ``log det Sigma_oo = log det Sigma + log det P_mm`` (Schur complements). So a pattern costs
    one t x t factorisation per component, and a row products with t-vectors beside one d x d
    product per component."""
    ct = params.covariance_type
    K, d = mc.shape
    pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
    pc = pc[None] if ct == "tied" else pc
    Kc = pc.shape[0]
    prec = np.matmul(pc, pc.transpose(0, 2, 1))  # (Kc, d, d)
    logdet_sig = -2.0 * np.sum(np.log(np.diagonal(pc, axis1=1, axis2=2)), axis=1)  # (Kc,)
    stats, fill = s is not None, xhat is not None
    pid_all, order, ptr, first, tpat = _patterns(miss)
    s2 = np.zeros(K * d * d) if stats else None  # sum of N_pk C_pk, scattered into (K, d, d)
    for t in np.unique(tpat):
        t = int(t)
        lo, hi = np.searchsorted(tpat, [t, t + 1])
        pstep = max(1, _BLOCK_FLOATS // (4 * Kc * t * t))
        rstep = max(16, _BLOCK_FLOATS // (6 * K * d + 2 * Kc * t * t))
        for p0 in range(lo, hi, pstep):
            p1 = min(hi, p0 + pstep)
            mi = np.nonzero(miss[first[p0:p1]])[1].reshape(p1 - p0, t)  # (Pq, t) missing coordinates
            Pmm = prec[:, mi[:, :, None], mi[:, None, :]].transpose(1, 0, 2, 3)  # (Pq, Kc, t, t)
            logdet_mm, Cmm = _factor_inverse(Pmm)
            const = log_w - 0.5 * ((d - t) * _LOG_2PI + logdet_sig + logdet_mm)  # (Pq, K)
            Npk = np.zeros((p1 - p0, K)) if stats else None
            for a in range(ptr[p0], ptr[p1], rstep):
                b = min(ptr[p1], a + rstep)
                idx = order[a:b]
                pid = pid_all[idx] - p0
                B = b - a
                R = np.empty((K, B, d))  # observed residuals r_o, zeros where missing
                np.subtract(Xc[idx][None], mc[:, None, :], out=R)
                R *= obs[idx][None]
                U = np.matmul(R, prec)  # P r: P_oo r_o on o, P_mo r_o on m
                # flat positions of each row's missing coordinates in a (B, d) slab
                flat = (np.arange(B)[:, None] * d + mi[pid]).ravel()
                V = U.reshape(K, B * d)[:, flat].reshape(K, B, t)  # P_mo r_o
                Z = _small_matvec(Cmm[pid], V, Kc)  # C P_mo r_o, shape (K, B, t)
                maha = np.einsum("kbd,kbd->bk", R, U) - np.einsum("kbi,kbi->bk", V, Z)
                logp = const[pid] - 0.5 * maha
                if logp_out is not None:
                    logp_out[idx] = logp
                lse[idx], resp[idx] = G._normalise(logp)
                if not (stats or fill):
                    continue
                # the row's conditional mean about g: x_o - g observed, mu_m - g - C P_mo r_o missing
                Xh = R
                Xh += mc[:, None, :]
                Xh.reshape(K, B * d)[:, flat] -= Z.reshape(K, B * t)
                r = resp[idx] if gamma is None else gamma[idx]
                if fill:
                    xhat[idx] = g + np.einsum("bk,kbd->bd", r, Xh)
                if stats:
                    wr = r if w is None else r * w[idx, None]
                    s.n[...] += wr.sum(axis=0)
                    s.s1[...] += np.einsum("bk,kbd->kd", wr, Xh)
                    M2 = np.matmul((Xh * wr.T[:, :, None]).transpose(0, 2, 1), Xh)  # (K, d, d)
                    s.s2[...] += M2.sum(axis=0) if ct == "tied" else M2
                    # rows are sorted by pattern: one sum per run of equal patterns
                    seg = np.concatenate([[0], np.flatnonzero(np.diff(pid)) + 1])
                    Npk[pid[seg]] += np.add.reduceat(wr, seg, axis=0)
            if stats:  # the conditional covariances: N_pk C_pk into the missing block of s2_k
                kk = np.arange(K)[None, :, None, None]
                flat = (kk * d + mi[:, None, :, None]) * d + mi[:, None, None, :]
                vals = Npk[:, :, None, None] * (Cmm if Kc == K else Cmm[:, :1])
                s2 += np.bincount(flat.ravel(), vals.ravel(), minlength=K * d * d)
    if stats:
        C = s2.reshape(K, d, d)
        C = 0.5 * (C + C.transpose(0, 2, 1))
        s.s2[...] += C.sum(axis=0) if ct == "tied" else C
    _finish(s, lse, w)
    return lse, resp, s, xhat
