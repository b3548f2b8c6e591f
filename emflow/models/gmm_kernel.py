"""The Gaussian mixture E-step kernel: one partition, in blocks of rows, transposed.

:func:`emflow.models.gmm.e_step` runs :func:`e_step_blocks` here. Pure NumPy: nothing here
knows about Dask, Zarr or Prefect.
"""

from __future__ import annotations

import numpy as np

from ._numerics import exp_floored as _exp_floored
from .gmm import GMMParams, GMMStats, _coef, _finish, _log_det_cholesky, shift_of

__all__ = ["e_step_blocks"]


# -- full covariance through quadratic features ---------------------------------------
#
# With a = [x - g, 1] (length m = d + 1) the log-density of component k is a quadratic form
# a^T Q_k a (plus a constant), and the statistics sum_i r_ik a_i a_i^T hold the counts, the
# first and the second moments. Both only need the m (m + 1) / 2 distinct products
# a_p a_q (p <= q), the "quadratic features" F of a block (B, P). Then
#
#     log-densities  = F @ C          (B, P) x (P, K)   C: packed -Q_k / 2
#     statistics    += R^T @ F        (K, B) x (B, P)   R: responsibilities (x weights)
#
# which is 4 B K P ~ 2 B K (d + 1)^2 flops in two well-shaped GEMMs, half the work of the
# Cholesky route (2 B K d (d + 1) for the distances plus 2 B K (d + 1)^2 for the
# statistics, with a B x K (d + 1) temporary), because symmetry is used on both sides.
# The expanded quadratic form loses a little to cancellation compared with
# |U^T (x - mu)|^2; about the shift g this is ~1e-14 relative in float64.

# Bytes of the per-block buffers (features, log-densities): they stay in the caches.
_QUAD_BLOCK_BYTES = 4 << 20


def _use_quadratic_features(K: int, d: int) -> bool:
    """The feature route writes P ~ (d + 1)^2 / 2 values per row where the Cholesky route
    writes ~ K (d + 1); it does half the flops. Measured crossover (one core, float64):
    the features win from about d + 1 <= 4 K + 4, and lose for K <= 2."""
    return K >= 3 and d + 1 <= 4 * K + 4


def _pairs(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (p, q), p <= q, of the packed quadratic features of a = [x - g, 1].

    The first d + 1 are (p, d): the products with the constant, i.e. ``a`` itself, so the
    leading rows of the features are the design [x - g, 1] as for the other covariance
    types. Then (p, q) with p <= q < d, row by row.
    """
    iu, ju = np.triu_indices(d)
    return np.concatenate([np.arange(d + 1), iu]), np.concatenate([np.full(d + 1, d), ju])


def _pair_offsets(d: int) -> np.ndarray:
    """Start of the run of products ``a_p * a[p:d]`` in the packed features (length d + 1)."""
    p = np.arange(d + 1)
    return (d + 1) + p * d - p * (p - 1) // 2


def _quadratic_coef(params: GMMParams, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed coefficients C (P, K) of ``-a^T Q_k a / 2`` and constants (K,)."""
    mc = np.asarray(params.means, dtype=np.float64) - shift
    K, d = mc.shape
    m = d + 1
    pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
    prec = np.einsum("kij,klj->kil", pc, pc)
    h = np.einsum("kij,kj->ki", prec, mc)
    Q = np.empty((K, m, m))
    Q[:, :d, :d] = prec
    Q[:, :d, d] = -h
    Q[:, d, :d] = -h
    Q[:, d, d] = np.einsum("ki,ki->k", h, mc)
    iu, ju = _pairs(d)
    C = Q[:, iu, ju] * np.where(iu == ju, -0.5, -1.0)
    with np.errstate(divide="ignore"):
        log_w = np.log(np.asarray(params.weights, dtype=np.float64))
    const = log_w + _log_det_cholesky(pc, "full", d) - 0.5 * d * np.log(2 * np.pi)
    return np.ascontiguousarray(C.T), const


def _unpack_full(acc: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n (K,), s1 (K, d), s2 (K, d, d) from packed sums of a_p a_q (K, P)."""
    m = d + 1
    iu, ju = _pairs(d)
    K = acc.shape[0]
    full = np.empty((K, m, m))
    full[:, iu, ju] = acc
    full[:, ju, iu] = acc
    return full[:, d, d].copy(), full[:, :d, d].copy(), np.ascontiguousarray(full[:, :d, :d])


def _block_rows(n: int, width: int, itemsize: int) -> int:
    """Rows per block so that ``width`` values per row take about _QUAD_BLOCK_BYTES."""
    return int(min(max(n, 1), max(256, _QUAD_BLOCK_BYTES // (width * itemsize))))


def e_step_blocks(X, w, params: GMMParams, dtype) -> GMMStats:
    """The E-step on transposed blocks (features x rows), for every covariance type.

    Every elementwise operation then runs along a contiguous row of B values, and the
    reductions over components are elementwise across rows, which NumPy vectorises
    (row-major (B, K) blocks with small K spend most of their time in per-row loop
    overhead). Per block, with F the (W, B) features of the rows:

    * full: F = packed quadratic features a_p a_q of a = [x - g, 1];
      log-densities C^T F, statistics F R^T (both GEMMs, see above); with few components
      and many features (``_use_quadratic_features`` false) F = a, the distances come
      from the Cholesky factors and the second moments from one (d+1)^2 GEMM per component;
    * diag, spherical: F = [x - g, 1, (x - g)**2]; log-densities M^T F, statistics F R^T;
    * tied: F = [x - g, 1]; distances from Y = U^T (x - g); statistics F R^T and the
      pooled second moment (x - g)(x - g)^T.
    """
    g = shift_of(params)
    K, d = np.shape(params.means)
    ct = params.covariance_type
    m = d + 1
    quad = ct == "full" and _use_quadratic_features(K, d)
    if quad:
        C, const = _quadratic_coef(params, g)
        Mt = np.ascontiguousarray(C.T, dtype=dtype)  # (K, P)
        W = m * (m + 1) // 2
        off = _pair_offsets(d)
    else:
        coef = _coef(params, g)
        const = coef.const
        W = 2 * d + 1 if ct in ("diag", "spherical") else m
        if ct == "full":  # Cholesky route: distances |U_k^T (x - mu_k)|^2, K small
            Mt = np.ascontiguousarray(coef.M.T, dtype=dtype)  # (K d, d + 1)
        elif ct == "tied":
            Ut = np.ascontiguousarray(coef.M.T, dtype=dtype)  # (d, d)
            bm2 = np.asarray(-2.0 * coef.b, dtype=dtype)  # (K, d)
            const = const - 0.5 * coef.bb
        else:
            Mt = np.ascontiguousarray(-0.5 * coef.M.T, dtype=dtype)  # (K, 2d + 1)
    # full (features) and diag/spherical: row d of F is the constant 1, so the constants go
    # into its coefficients and the GEMM adds them (one pass over the log-densities less);
    # not a -inf (zero weight), which the GEMM could turn into NaN
    folded = (quad or ct in ("diag", "spherical")) and bool(np.all(np.isfinite(const)))
    if folded:
        Mt = Mt.copy()
        Mt[:, d] += np.asarray(const, dtype=dtype)
    const = np.asarray(const, dtype=dtype)[:, None]
    n = X.shape[0]
    width = W + 2 * K + m + (K * d if ct == "full" and not quad else 0)
    step = _block_rows(n, width, np.dtype(dtype).itemsize)
    # buffers reused by every block (no allocation, no page faults in the loop)
    F = np.empty((W, step), dtype)
    F[d] = 1.0
    L = np.empty((K, step), dtype)
    mx = np.empty(step, dtype)
    tot = np.empty(step, dtype)
    S = np.empty((W, K), dtype)
    acc = np.zeros((W, K))
    if ct == "full" and not quad:
        Y = np.empty((K * d, step), dtype)
        Rk = np.empty((m, step), dtype)
        T = np.empty((m, m), dtype)
        acc_k = np.zeros((K, m, m))
    if ct == "tied":
        Y = np.empty((d, step), dtype)
        yy = np.empty(step, dtype)
        T = np.empty((d, d), dtype)
        acc_t = np.zeros((d, d))
    loglik = 0.0
    for a in range(0, n, step):
        b = min(n, a + step)
        nb = b - a
        Fb, Lb, mxb, totb = F[:, :nb], L[:, :nb], mx[:nb], tot[:nb]
        Xc = Fb[:d]
        np.subtract(np.asarray(X[a:b]).T, g[:, None], out=Xc, casting="same_kind")
        if quad:
            for p in range(d):  # rows 0..d are already [x - g, 1] = a * 1
                np.multiply(Xc[p], Xc[p:], out=Fb[off[p] : off[p + 1]])
            np.matmul(Mt, Fb, out=Lb)
        elif ct == "full":
            Yb = Y[:, :nb]
            np.matmul(Mt, Fb, out=Yb)
            np.square(Yb, out=Yb)
            np.sum(Yb.reshape(K, d, nb), axis=1, out=Lb)
            Lb *= -0.5
        elif ct == "tied":
            Yb, yyb = Y[:, :nb], yy[:nb]
            np.matmul(Ut, Xc, out=Yb)
            np.matmul(bm2, Yb, out=Lb)
            np.square(Yb, out=Yb)
            np.sum(Yb, axis=0, out=yyb)
            Lb += yyb
            Lb *= -0.5
        else:
            np.square(Xc, out=Fb[d + 1 :])
            np.matmul(Mt, Fb, out=Lb)
        if not folded:
            Lb += const
        # log-sum-exp over components and responsibilities, in place
        np.max(Lb, axis=0, out=mxb)
        mxb[~np.isfinite(mxb)] = 0.0
        Lb -= mxb
        _exp_floored(Lb)
        np.sum(Lb, axis=0, out=totb)
        lse = np.log(totb)
        lse += mxb
        np.divide(1.0, totb, out=totb)
        wb = None
        if w is None:
            loglik += float(lse.sum(dtype=np.float64))
        else:
            wb = np.asarray(w[a:b], dtype=np.float64)
            loglik += float(lse @ wb)
            totb *= wb.astype(dtype, copy=False)
        Lb *= totb
        np.matmul(Fb, Lb.T, out=S)  # sum_i r_ik F_i (x weights)
        acc += S
        if ct == "full" and not quad:
            Rb = Rk[:, :nb]
            for k in range(K):
                np.multiply(Fb, Lb[k], out=Rb)
                np.matmul(Rb, Fb.T, out=T)
                acc_k[k] += T
        if ct == "tied":
            Xw = Xc if wb is None else Xc * wb.astype(dtype, copy=False)
            np.matmul(Xw, Xc.T, out=T)
            acc_t += T
    acc = acc.T  # (K, W)
    if quad:
        N, s1, s2 = _unpack_full(acc, d)
    elif ct == "full":
        N, s1, s2 = acc[:, d].copy(), acc[:, :d].copy(), np.ascontiguousarray(acc_k[:, :d, :d])
    else:
        N, s1 = acc[:, d].copy(), acc[:, :d].copy()
        s2 = acc_t if ct == "tied" else acc[:, d + 1 :].copy()
    s = GMMStats(N, s1, s2, np.zeros(()), np.zeros(()), np.zeros(()))
    return _finish(s, X, w, loglik)
