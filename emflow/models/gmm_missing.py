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

Full and tied covariances: rows are grouped by their missingness pattern and the per-pattern
terms (``Sigma_oo^{-1}`` embedded in a d x d matrix, its log-determinant, the conditional
covariance) are computed once per pattern and component, for many patterns at a time.
Diagonal and spherical covariances need no grouping (the coordinates are independent given
the component). Arithmetic is float64 throughout.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from . import gmm as G

__all__ = ["e_step", "posterior", "impute", "check_rows"]

_LOG_2PI = np.log(2 * np.pi)
# floats per temporary: bounds the per-pattern (P, K, d, d) and per-row (B, K, d, d) arrays
_BLOCK_FLOATS = 1 << 21


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
        Used for the complete rows only (the incomplete rows are computed in float64).
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


def _incomplete(X, miss, w, params: G.GMMParams, *, stats: bool = False, fill: bool = False):
    """Log-likelihoods (n,), responsibilities (n, K), statistics (or None) and imputed rows
    (or None) of rows that each miss at least one value."""
    ct = params.covariance_type
    g = G.shift_of(params)
    mu = np.asarray(params.means, dtype=np.float64)
    K, d = mu.shape
    with np.errstate(divide="ignore"):
        log_w = np.log(np.asarray(params.weights, dtype=np.float64))
    obs = (~miss).astype(np.float64)
    Xc = np.where(miss, 0.0, np.asarray(X, dtype=np.float64) - g)  # observed values about g, 0 where missing
    mc = mu - g
    n = X.shape[0]
    lse = np.empty(n)
    resp = np.empty((n, K))
    s = G.empty_stats(ct, K, d) if stats else None
    xhat = np.empty((n, d)) if fill else None
    if ct in ("diag", "spherical"):
        var = np.asarray(params.covariances, dtype=np.float64)
        var = var if ct == "diag" else np.repeat(var[:, None], d, axis=1)
        prec = 1.0 / var
        step = max(64, _BLOCK_FLOATS // (4 * K + 4 * d))
        for a in range(0, n, step):
            b = min(n, a + step)
            Ob, Xb = obs[a:b], Xc[a:b]
            maha = (Xb**2) @ prec.T - 2.0 * Xb @ (mc * prec).T + Ob @ (mc**2 * prec).T
            logp = log_w - 0.5 * (Ob.sum(axis=1)[:, None] * _LOG_2PI + Ob @ np.log(var).T + maha)
            lse[a:b], resp[a:b] = G._normalise(logp)
            r = resp[a:b]
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
    return _incomplete_matrix(Xc, obs, miss, w, params, mc, log_w, lse, resp, s, xhat, g)


def _finish(s, lse, w):
    if s is not None:
        s.loglik[...] = lse.sum() if w is None else lse @ w
        s.weight_sum[...] = float(len(lse)) if w is None else float(np.sum(w))
        s.n_rows[...] = float(len(lse))


def _pattern_terms(O: np.ndarray, Sig: np.ndarray):
    """Per pattern (rows of the 0/1 observed mask ``O``, shape (P, d)) and covariance
    (``Sig``, shape (Kc, d, d)): ``Q`` = Sigma_oo^{-1} embedded in d x d (zeros elsewhere),
    ``log det Sigma_oo`` and ``C`` = the conditional covariance of the missing coordinates
    embedded in d x d (zeros on observed rows and columns), shapes (P, Kc, d, d), (P, Kc)."""
    P, d = O.shape
    oo = O[:, None, :, None] * O[:, None, None, :]  # (P, 1, d, d)
    # Sigma_oo in the observed block, the identity in the missing block: its inverse is
    # Sigma_oo^{-1} there and the identity elsewhere, its determinant det Sigma_oo
    S = oo * Sig[None] + (1.0 - O)[:, None, :, None] * np.eye(d)
    L = np.linalg.cholesky(S)
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=2, axis2=3)), axis=2)
    Q = np.linalg.inv(S) * oo
    Q = 0.5 * (Q + np.swapaxes(Q, 2, 3))
    C = Sig[None] - Sig[None] @ Q @ Sig[None]
    miss = (1.0 - O)
    C *= miss[:, None, :, None] * miss[:, None, None, :]  # exact zeros on observed rows/columns
    return Q, logdet, 0.5 * (C + np.swapaxes(C, 2, 3))


def _incomplete_matrix(Xc, obs, miss, w, params, mc, log_w, lse, resp, s, xhat, g):
    ct = params.covariance_type
    K, d = mc.shape
    Sig = np.asarray(params.covariances, dtype=np.float64)
    Sig = Sig[None] if ct == "tied" else Sig
    Kc = Sig.shape[0]
    stats, fill = s is not None, xhat is not None
    # group rows by missingness pattern
    packed = np.ascontiguousarray(np.packbits(miss, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")
    P = first.size
    ptr = np.searchsorted(inv[order], np.arange(P + 1))
    Opat = obs[first]  # (P, d)
    nobs = Opat.sum(axis=1)
    pstep = max(1, _BLOCK_FLOATS // (3 * Kc * d * d))
    rstep = max(16, _BLOCK_FLOATS // (2 * K * d * d + 4 * K * d))
    for p0 in range(0, P, pstep):
        p1 = min(P, p0 + pstep)
        Q, logdet, C = _pattern_terms(Opat[p0:p1], Sig)
        Npk = np.zeros((p1 - p0, K)) if stats else None
        const = log_w - 0.5 * (nobs[p0:p1, None] * _LOG_2PI + logdet)  # (Pb, K) (Kc broadcasts)
        for a in range(ptr[p0], ptr[p1], rstep):
            b = min(ptr[p1], a + rstep)
            idx = order[a:b]
            pid = inv[idx] - p0
            Xb, Ob = Xc[idx], obs[idx]
            R = (Xb[:, None, :] - mc[None]) * Ob[:, None, :]  # (B, K, d) observed residuals
            if Kc == 1:
                QR = np.einsum("nij,nkj->nki", Q[pid, 0], R)
            else:
                QR = np.einsum("nkij,nkj->nki", Q[pid], R)
            maha = np.einsum("nki,nki->nk", R, QR)
            lse[idx], resp[idx] = G._normalise(const[pid] - 0.5 * maha)
            if not (stats or fill):
                continue
            # conditional mean of the whole row about g: mu_k + Sigma_k Q r (observed part = x_o)
            Xh = mc[:, None, :] + np.matmul(QR.transpose(1, 0, 2), Sig)  # (K, B, d)
            r = resp[idx]
            if fill:
                xhat[idx] = g + np.einsum("nk,knd->nd", r, Xh)
            if stats:
                wr = r if w is None else r * w[idx, None]
                s.n[...] += wr.sum(axis=0)
                s.s1[...] += np.einsum("nk,knd->kd", wr, Xh)
                WX = Xh * wr.T[:, :, None]
                M2 = np.matmul(WX.transpose(0, 2, 1), Xh)  # (K, d, d)
                s.s2[...] += M2.sum(axis=0) if ct == "tied" else M2
                # rows are sorted by pattern: one sum per run of equal patterns
                cut = np.flatnonzero(np.diff(pid)) + 1
                seg = np.concatenate([[0], cut])
                Npk[pid[seg]] += np.add.reduceat(wr, seg, axis=0)
        if stats:
            if Kc == 1:
                s.s2[...] += np.einsum("p,pij->ij", Npk.sum(axis=1), C[:, 0])
            else:
                s.s2[...] += np.einsum("pk,pkij->kij", Npk, C)
    _finish(s, lse, w)
    return lse, resp, s, xhat
