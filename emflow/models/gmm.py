"""Gaussian mixture math: pure functions over NumPy arrays.

Nothing here knows about Dask, Zarr or Prefect. One EM iteration is::

    stats  = e_step(X_p, w_p, params)     # per partition, a GMMStats
    total  = add(stats_1, ..., stats_P)   # field-wise sums (emflow.stats.add)
    params = m_step(total, shift(params), covariance_type, reg_covar)

Statistics are raw moments about a *shift* ``g`` that every partition knows (the
weighted mean of the current means), accumulated in float64, so combining partitions is
a plain ``+`` and the M-step recovers centred moments without the cancellation that
moments about the origin suffer (``E[x x^T] - m m^T`` on data far from zero).

The E-step's kernel (blocks of rows, transposed; quadratic features for full covariances)
is :mod:`emflow.models.gmm_kernel`.

Shapes: ``n`` rows, ``d`` features, ``K`` components.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import linalg

from ..errors import FitFailedError
from ..stats import require_finite
from ._numerics import exp_floored as _exp_floored

__all__ = [
    "COVARIANCE_TYPES",
    "GMMParams",
    "GMMStats",
    "e_step",
    "m_step",
    "scatter",
    "shift_of",
    "hard_stats",
    "soft_stats",
    "log_prob",
    "log_gaussian_density",
    "posterior",
    "precisions_cholesky_from_covariances",
    "precisions_cholesky_from_precisions",
    "covariances_from_precisions_cholesky",
    "n_parameters",
    "empty_stats",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

# Rows per block inside a partition: bounds the temporaries (n_block x K x (d + 1)) to ~16 MB.
_BLOCK_FLOATS = 1 << 21


class GMMParams(NamedTuple):
    """Parameters of a Gaussian mixture.

    Attributes
    ----------
    weights : ndarray of shape (K,)
    means : ndarray of shape (K, d)
    covariances : ndarray
        (K, d, d) full, (d, d) tied, (K, d) diag, (K,) spherical.
    precisions_cholesky : ndarray
        Same shapes; upper-triangular ``U`` with precision ``U @ U.T`` (scikit-learn's form).
    covariance_type : str
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str


class GMMStats(NamedTuple):
    """Additive sufficient statistics of one or many partitions (all float64).

    Attributes
    ----------
    n : ndarray of shape (K,)
        ``sum_i w_i r_ik``.
    s1 : ndarray of shape (K, d)
        ``sum_i w_i r_ik (x_i - g)``.
    s2 : ndarray
        full: (K, d, d) ``sum_i w_i r_ik (x_i - g)(x_i - g)^T``;
        tied: (d, d) ``sum_i w_i (x_i - g)(x_i - g)^T``;
        diag and spherical: (K, d) ``sum_i w_i r_ik (x_i - g)**2``.
    loglik : ndarray of shape ()
        ``sum_i w_i log p(x_i)``.
    weight_sum : ndarray of shape ()
        ``sum_i w_i`` (the row count when unweighted).
    n_rows : ndarray of shape ()
        Number of rows seen.
    """

    n: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    loglik: np.ndarray
    weight_sum: np.ndarray
    n_rows: np.ndarray


def _s2_shape(covariance_type: str, K: int, d: int) -> tuple[int, ...]:
    return {
        "full": (K, d, d),
        "tied": (d, d),
        "diag": (K, d),
        "spherical": (K, d),
    }[covariance_type]


def empty_stats(covariance_type: str, K: int, d: int) -> GMMStats:
    """Statistics of zero rows (the identity of ``+``)."""
    z = np.zeros
    return GMMStats(
        z(K), z((K, d)), z(_s2_shape(covariance_type, K, d)), z(()), z(()), z(())
    )


def shift_of(params: GMMParams) -> np.ndarray:
    """The fixed shift ``g`` of shape (d,) statistics are taken about (weighted mean of means)."""
    w = np.asarray(params.weights, dtype=np.float64)
    return (w / w.sum()) @ np.asarray(params.means, dtype=np.float64)


def _blocks(n: int, width: int):
    step = max(256, _BLOCK_FLOATS // max(width, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _log_det_cholesky(prec_chol: np.ndarray, covariance_type: str, d: int) -> np.ndarray:
    if covariance_type == "full":
        K = prec_chol.shape[0]
        return np.sum(np.log(prec_chol.reshape(K, -1)[:, :: d + 1]), axis=1)
    if covariance_type == "tied":
        return np.sum(np.log(np.diag(prec_chol)))
    if covariance_type == "diag":
        return np.sum(np.log(prec_chol), axis=1)
    return d * np.log(prec_chol)


# Every block of rows is turned into one augmented design matrix A (float64), centred on
# the shift g:  A = [x - g, 1]  (full, tied)  or  [x - g, 1, (x - g)**2]  (diag, spherical).
# Both the Mahalanobis distances and all the statistics are then single GEMMs against A.


def _design(Xb: np.ndarray, shift: np.ndarray, covariance_type: str, dtype=np.float64) -> np.ndarray:
    B, d = Xb.shape
    quad = covariance_type in ("diag", "spherical")
    A = np.empty((B, 2 * d + 1 if quad else d + 1), dtype)
    np.subtract(Xb, shift, out=A[:, :d], casting="same_kind")
    A[:, d] = 1.0
    if quad:
        np.square(A[:, :d], out=A[:, d + 1 :])
    return A


class _Coef(NamedTuple):
    """Per-parameter constants for the log-densities (computed once per partition)."""

    const: np.ndarray  # (K,): log pi_k + log det U_k - d/2 log(2 pi)
    M: np.ndarray  # full: (d+1, K*d) [U_all; -b]; tied: (d, d) U; diag/spherical: (2d+1, K)
    b: np.ndarray | None  # tied: (K, d) means @ U
    bb: np.ndarray | None  # tied: (K,) |b_k|^2


def _coef(params: GMMParams, shift: np.ndarray) -> _Coef:
    mc = np.asarray(params.means, dtype=np.float64) - shift
    K, d = mc.shape
    ct = params.covariance_type
    pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_w = np.log(np.asarray(params.weights, dtype=np.float64))
    const = log_w + _log_det_cholesky(pc, ct, d) - 0.5 * d * np.log(2 * np.pi)
    b = bb = None
    if ct == "full":
        M = np.empty((d + 1, K * d))
        M[:d] = pc.transpose(1, 0, 2).reshape(d, K * d)
        M[d] = -np.einsum("kd,kde->ke", mc, pc).reshape(K * d)
    elif ct == "tied":
        M = pc
        b = mc @ pc
        bb = np.einsum("kd,kd->k", b, b)
    else:
        prec = pc**2
        prec_kd = prec if ct == "diag" else np.repeat(prec[:, None], d, axis=1)
        M = np.empty((2 * d + 1, K))
        M[:d] = -2.0 * (mc * prec_kd).T
        M[d] = np.sum(mc**2 * prec_kd, axis=1)
        M[d + 1 :] = prec_kd.T
    return _Coef(np.asarray(const, dtype=np.float64) * np.ones(K), M, b, bb)


def _weighted_log_prob(A: np.ndarray, coef: _Coef, covariance_type: str, K: int, d: int) -> np.ndarray:
    """``log pi_k + log N(x | mu_k, Sigma_k)`` of shape (B, K) from a design block."""
    if covariance_type == "full":
        Y = A @ coef.M
        np.square(Y, out=Y)
        maha = Y.reshape(len(A), K, d).sum(axis=2)
    elif covariance_type == "tied":
        Y = A[:, :d] @ coef.M
        maha = np.einsum("ij,ij->i", Y, Y)[:, None] - 2.0 * (Y @ coef.b.T) + coef.bb
    else:
        maha = A @ coef.M
    maha *= -0.5
    maha += coef.const
    return maha


def _normalise(wlp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise log-sum-exp (B,) and responsibilities (B, K), overwriting ``wlp``."""
    mx = wlp.max(axis=1)
    mx[~np.isfinite(mx)] = 0.0
    wlp -= mx[:, None]
    _exp_floored(wlp)
    tot = wlp.sum(axis=1)
    wlp /= tot[:, None]
    return np.log(tot) + mx, wlp


def _accumulate(A: np.ndarray, wr: np.ndarray, w: np.ndarray | None, ct: str, s: GMMStats) -> None:
    """Add one block's counts, first and second moments into ``s`` (in place)."""
    B, K = wr.shape
    d = s.s1.shape[1]
    if ct == "full":
        # all K second-moment matrices, first moments and counts in one GEMM
        W = (wr[:, :, None] * A[:, None, :]).reshape(B, K * (d + 1))
        M = (W.T @ A).reshape(K, d + 1, d + 1)
        s.n[...] += M[:, d, d]
        s.s1[...] += M[:, :d, d]
        s.s2[...] += M[:, :d, :d]
        return
    M = wr.T @ A
    s.s1[...] += M[:, :d]
    s.n[...] += M[:, d]
    if ct == "tied":
        Xc = A[:, :d]
        s.s2[...] += (Xc if w is None else Xc * w[:, None].astype(Xc.dtype, copy=False)).T @ Xc
    else:
        s.s2[...] += M[:, d + 1 :]


def _blocks_of(X, shift, ct, width, dtype=np.float64):
    n = X.shape[0]
    for a, b in _blocks(n, width):
        yield a, b, _design(np.asarray(X[a:b]), shift, ct, dtype)


def _finish(s: GMMStats, X, w, loglik: float) -> GMMStats:
    wsum = float(X.shape[0]) if w is None else float(np.sum(w, dtype=np.float64))
    return s._replace(loglik=np.asarray(loglik), weight_sum=np.asarray(wsum), n_rows=np.asarray(float(X.shape[0])))


def e_step(X: np.ndarray, w: np.ndarray | None, params: GMMParams, compute_dtype: str = "float64") -> GMMStats:
    """E-step over one partition: responsibilities, log-likelihood and statistics in one pass.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32 or float64
    w : ndarray of shape (n,) or None
        Non-negative row weights; ``None`` means all ones.
    params : GMMParams
    compute_dtype : {"float64", "float32"}, default "float64"
        Precision of the per-block arithmetic (design matrix, GEMMs, responsibilities).
        ``"float32"`` halves the memory traffic and doubles the SIMD width; the sums over
        blocks (statistics and log-likelihood) are still accumulated in float64.

    Returns
    -------
    GMMStats
        Statistics about ``shift_of(params)``.
    """
    # imported here: the kernel builds on this module's types and coefficients
    from .gmm_kernel import e_step_blocks

    return e_step_blocks(X, w, params, _compute_dtype(compute_dtype))


def _compute_dtype(compute_dtype) -> type:
    dt = np.dtype(compute_dtype)
    if dt not in (np.float64, np.float32):
        raise ValueError(f"compute_dtype must be 'float64' or 'float32', got {compute_dtype!r}.")
    return dt.type


def hard_stats(
    X: np.ndarray,
    w: np.ndarray | None,
    centers: np.ndarray,
    shift: np.ndarray,
    covariance_type: str,
) -> GMMStats:
    """Statistics with one-hot responsibilities: each row belongs to its nearest centre.

    Used to turn k-means centres into initial mixture parameters (scikit-learn's
    ``init_params="kmeans"``). ``loglik`` is zero.
    """
    centers = np.asarray(centers, dtype=np.float64)
    K, d = centers.shape
    cc = centers - shift
    s = empty_stats(covariance_type, K, d)
    for a, b, A in _blocks_of(X, shift, covariance_type, K * (d + 1) + 2 * d):
        dist = -2.0 * A[:, :d] @ cc.T + np.einsum("kd,kd->k", cc, cc)
        labels = np.argmin(dist, axis=1)
        wb = None if w is None else np.asarray(w[a:b], dtype=np.float64)
        resp = np.zeros((b - a, K))
        resp[np.arange(b - a), labels] = 1.0 if wb is None else wb
        _accumulate(A, resp, wb, covariance_type, s)
    return _finish(s, X, w, 0.0)


def soft_stats(
    X: np.ndarray,
    w: np.ndarray | None,
    resp: np.ndarray,
    shift: np.ndarray,
    covariance_type: str,
) -> GMMStats:
    """Statistics for given responsibilities ``resp`` of shape (n, K) (``loglik`` is zero)."""
    d = X.shape[1]
    K = resp.shape[1]
    s = empty_stats(covariance_type, K, d)
    for a, b, A in _blocks_of(X, shift, covariance_type, K * (d + 1) + 2 * d):
        wb = None if w is None else np.asarray(w[a:b], dtype=np.float64)
        wr = resp[a:b] if wb is None else resp[a:b] * wb[:, None]
        _accumulate(A, wr, wb, covariance_type, s)
    return _finish(s, X, w, 0.0)


def scatter(stats: GMMStats, covariance_type: str):
    """``(N, nk, delta, W)`` from summed statistics: counts ``N`` (K,), ``nk = N + 10 eps``
    (scikit-learn's), the component means about the shift ``delta`` (K, d) and the scatter
    about them ``W``: full (K, d, d), tied (d, d) summed over components, diag and spherical
    (K, d) per coordinate."""
    require_finite(stats, "Gaussian mixture")
    N = np.asarray(stats.n, dtype=np.float64)
    nk = N + 10 * np.finfo(np.float64).eps
    delta = stats.s1 / nk[:, None]
    if covariance_type == "full":
        outer = delta[:, :, None] * stats.s1[:, None, :]
        W = (stats.s2 - outer - outer.transpose(0, 2, 1) + N[:, None, None] * delta[:, :, None] * delta[:, None, :])
    elif covariance_type == "tied":
        W = stats.s2 - np.einsum("k,ki,kj->ij", nk, delta, delta)
    else:
        W = stats.s2 - 2.0 * delta * stats.s1 + N[:, None] * delta**2
    return N, nk, delta, W


def m_step(
    stats: GMMStats,
    shift: np.ndarray,
    covariance_type: str,
    reg_covar: float,
) -> tuple[GMMParams, dict]:
    """M-step: new parameters from summed statistics.

    Matches scikit-learn's ``_estimate_gaussian_parameters`` (including its ``10 * eps``
    added to each component's count) computed from moments about ``shift``.

    Returns
    -------
    params : GMMParams
    report : dict
        ``empty_components``: indices whose weight fell to (numerically) zero;
        ``repaired_covariances``: {index: jitter added} for covariances that were not
        positive definite after ``reg_covar`` and needed more regularisation.
    """
    N, nk, delta, W = scatter(stats, covariance_type)
    K, d = stats.s1.shape
    means = shift + delta
    if covariance_type == "full":
        cov = W
        cov /= nk[:, None, None]
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))
        cov[:, np.arange(d), np.arange(d)] += reg_covar
    elif covariance_type == "tied":
        cov = W
        cov /= nk.sum()
        cov = 0.5 * (cov + cov.T)
        cov[np.arange(d), np.arange(d)] += reg_covar
    else:
        var = W / nk[:, None]
        var = np.maximum(var, 0.0)  # rounding can leave -1e-17 for a collapsed component
        if covariance_type == "diag":
            cov = var + reg_covar
        else:
            cov = var.mean(axis=1) + reg_covar
    weights = nk / nk.sum()
    total = float(np.sum(stats.weight_sum))
    empty = [int(k) for k in np.flatnonzero(N <= 1e-10 * max(total, 1e-300))]
    prec_chol, cov, repaired = _precisions_cholesky_repairing(cov, covariance_type, reg_covar)
    report = {"empty_components": empty, "repaired_covariances": repaired}
    return GMMParams(weights, means, cov, prec_chol, covariance_type), report


_ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined "
    "empirical covariance (for instance caused by singleton or collapsed samples). "
    "Try to decrease the number of components, increase reg_covar, or scale the input data."
)


def _singular_to_rounding(cov: np.ndarray) -> bool:
    """Whether a covariance is singular to rounding, whatever the features' scales: a zero
    variance, or a correlation matrix whose smallest eigenvalue is within rounding of 0."""
    sd = np.sqrt(np.diag(cov))
    if not np.all(sd > 0):
        return True
    corr = cov / np.outer(sd, sd)
    return float(np.linalg.eigvalsh(corr)[0]) <= 100 * cov.shape[0] * np.finfo(np.float64).eps


def _chol_upper_precision(cov: np.ndarray) -> np.ndarray:
    L = linalg.cholesky(cov, lower=True)
    d = cov.shape[0]
    return linalg.solve_triangular(L, np.eye(d), lower=True).T


def _precisions_cholesky_repairing(cov, covariance_type, reg_covar):
    """Precision Cholesky factors; a non-PD covariance gets growing jitter, and is reported.

    With ``reg_covar == 0`` the caller turned regularisation off: a covariance that is not
    positive definite, or singular to rounding, is an error (scikit-learn's ValueError and
    words), never repaired behind the caller's back.
    """
    repaired: dict[int, float] = {}
    if covariance_type in ("full", "tied"):
        mats = cov[None] if covariance_type == "tied" else cov
        out = np.empty_like(mats)
        for k, c in enumerate(mats):
            try:
                out[k] = _chol_upper_precision(c)
                if reg_covar <= 0 and _singular_to_rounding(c):
                    raise FitFailedError(_ILL_DEFINED)
                continue
            except (linalg.LinAlgError, ValueError) as exc:
                if reg_covar <= 0:
                    raise FitFailedError(_ILL_DEFINED) from exc
            d = c.shape[0]
            # the largest entry bounds the most negative eigenvalue rounding can leave (|lambda|
            # <= d max|c_ij|): a singleton far from the moments' shift cancels to noise of that size
            scale = max(float(np.abs(c).max()), np.finfo(float).tiny)
            jitter = max(reg_covar, 1e-12 * scale)
            for _ in range(14 + int(np.ceil(np.log10(d)))):
                try:
                    fixed = c + jitter * np.eye(d)
                    out[k] = _chol_upper_precision(fixed)
                    mats[k] = fixed
                    repaired[k] = jitter
                    break
                except (linalg.LinAlgError, ValueError):
                    jitter *= 10.0
            else:
                raise FitFailedError(_ILL_DEFINED)
        return (out[0] if covariance_type == "tied" else out), cov, repaired
    bad = ~(cov > 0) | ~np.isfinite(cov)
    if np.any(bad):
        raise FitFailedError(_ILL_DEFINED)
    return 1.0 / np.sqrt(cov), cov, repaired


def precisions_cholesky_from_covariances(cov: np.ndarray, covariance_type: str) -> np.ndarray:
    """Upper-triangular precision factors from covariances (raises FitFailedError if not PD)."""
    pc, _, repaired = _precisions_cholesky_repairing(np.array(cov, dtype=np.float64), covariance_type, 0.0)
    if repaired:
        raise FitFailedError(_ILL_DEFINED)
    return pc


def precisions_cholesky_from_precisions(prec: np.ndarray, covariance_type: str) -> np.ndarray:
    """scikit-learn's factor ``U`` (upper, ``prec = U U^T``) computed from precisions."""
    prec = np.asarray(prec, dtype=np.float64)
    if covariance_type in ("full", "tied"):
        mats = prec[None] if covariance_type == "tied" else prec
        out = np.empty_like(mats)
        for k, p in enumerate(mats):
            out[k] = np.flipud(np.fliplr(linalg.cholesky(np.flipud(np.fliplr(p)), lower=True)))
        return out[0] if covariance_type == "tied" else out
    return np.sqrt(prec)


def covariances_from_precisions_cholesky(pc: np.ndarray, covariance_type: str) -> np.ndarray:
    """Covariances from precision factors (``(U U^T)^{-1}``)."""
    pc = np.asarray(pc, dtype=np.float64)
    if covariance_type in ("full", "tied"):
        mats = pc[None] if covariance_type == "tied" else pc
        out = np.empty_like(mats)
        for k, U in enumerate(mats):
            Uinv = linalg.solve_triangular(U, np.eye(U.shape[0]), lower=False)
            out[k] = Uinv.T @ Uinv
        return out[0] if covariance_type == "tied" else out
    return 1.0 / pc**2


def log_prob(X: np.ndarray, params: GMMParams) -> np.ndarray:
    """Weighted log-densities ``log pi_k + log N(x | mu_k, Sigma_k)`` of shape (n, K)."""
    g = shift_of(params)
    K, d = np.shape(params.means)
    ct = params.covariance_type
    coef = _coef(params, g)
    out = np.empty((X.shape[0], K))
    for a, b, A in _blocks_of(X, g, ct, K * d + 2 * d):
        out[a:b] = _weighted_log_prob(A, coef, ct, K, d)
    return out


def log_gaussian_density(Xc: np.ndarray, mc: np.ndarray, params: GMMParams) -> np.ndarray:
    """``log N(x | mu_k, Sigma_k)`` (no mixture weights) of shape (n, K), for rows and means
    already centred on a common shift (``Xc = X - g``, ``mc = means - g``)."""
    K, d = np.shape(mc)
    zero = np.zeros(d)
    p = params._replace(means=np.asarray(mc, dtype=np.float64), weights=np.ones(K))
    coef = _coef(p, zero)
    out = np.empty((Xc.shape[0], K))
    for a, b, A in _blocks_of(Xc, zero, p.covariance_type, K * d + 2 * d):
        out[a:b] = _weighted_log_prob(A, coef, p.covariance_type, K, d)
    return out


def posterior(X: np.ndarray, params: GMMParams) -> tuple[np.ndarray, np.ndarray]:
    """Per-row log-likelihood (n,) and responsibilities (n, K)."""
    return _normalise(log_prob(X, params))


def n_parameters(K: int, d: int, covariance_type: str) -> int:
    """Number of free parameters (for BIC / AIC), as scikit-learn counts them."""
    cov = {
        "full": K * d * (d + 1) / 2.0,
        "diag": K * d,
        "tied": d * (d + 1) / 2.0,
        "spherical": K,
    }[covariance_type]
    return int(cov + K * d + K - 1)
