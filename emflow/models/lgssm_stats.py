"""Expected sufficient statistics of a linear-Gaussian state-space model's sequences.

:func:`sequence_stats` runs the Kalman filter and RTS smoother of
:mod:`emflow.models.lgssm` over one sequence (the reference); :func:`partition_stats`, which
:func:`emflow.models.lgssm.e_step` runs, gives the same sums for a partition of many
sequences, filtered and smoothed together in batches of similar length. Pure NumPy: nothing
here knows about Dask, Zarr or Prefect.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from .lgssm import _LOG_2PI, LGSSMParams, LGSSMStats, _sym, empty_stats, kalman_filter, rts_smoother
from ..errors import FitFailedError

__all__ = ["sequence_stats", "smoothed_stats", "partition_stats"]


def sequence_stats(Y: np.ndarray, params: LGSSMParams) -> LGSSMStats:
    """Expected sufficient statistics of one sequence ``Y`` of shape (T, p)."""
    Y = np.asarray(Y, dtype=np.float64)
    filt = kalman_filter(Y, params)
    return smoothed_stats(Y, params, filt, rts_smoother(params.A, filt))


def smoothed_stats(Y: np.ndarray, params: LGSSMParams, filt, sm) -> LGSSMStats:
    """:func:`sequence_stats` from a filter's and a smoother's results (also used by
    :mod:`emflow.models.lgssm_long` for one slice of a cut sequence)."""
    A, C, Q, R, mu0, V0 = params
    T, p = Y.shape
    m, P = sm.means, sm.covariances
    Szz = P + m[:, :, None] * m[:, None, :]
    observed = ~np.isnan(Y)
    full = observed.all(axis=1)
    anyo = observed.any(axis=1)
    Yf, mfull = Y[full], m[full]
    yz = Yf.T @ mfull
    yy = Yf.T @ Yf
    for t in np.flatnonzero(anyo & ~full):
        o, u = observed[t], ~observed[t]
        # y_t = H z_t + h + eps given the observed components, eps ~ N(0, Sigma) on the missing rows
        G = linalg.solve(R[np.ix_(o, o)], R[np.ix_(o, u)], assume_a="pos", check_finite=False).T
        H = np.zeros((p, C.shape[1]))
        h = np.zeros(p)
        Sig = np.zeros((p, p))
        H[u] = C[u] - G @ C[o]
        h[o] = Y[t, o]
        h[u] = G @ Y[t, o]
        Sig[np.ix_(u, u)] = R[np.ix_(u, u)] - G @ R[np.ix_(o, u)]
        Hm = H @ m[t]
        yz += H @ Szz[t] + np.outer(h, m[t])
        yy += H @ Szz[t] @ H.T + np.outer(Hm, h) + np.outer(h, Hm) + np.outer(h, h) + _sym(Sig)
    lagm = sm.lag_covariances[1:] + m[1:, :, None] * m[:-1, None, :]
    return LGSSMStats(
        n_seq=np.array(1.0),
        n_steps=np.array(float(T)),
        n_obs_steps=np.array(float(anyo.sum())),
        n_values=observed.sum(axis=0).astype(np.float64),
        z1=m[0].copy(),
        z1z1=Szz[0].copy(),
        z=m.sum(axis=0),
        zz_prev=Szz[:-1].sum(axis=0),
        zz_next=Szz[1:].sum(axis=0),
        zz_lag=lagm.sum(axis=0),
        zz_obs=Szz[anyo].sum(axis=0),
        yz=yz,
        yy=_sym(yy),
        loglik=np.array(filt.loglik),
    )



# Padded (steps x sequences) cells per batch of the vectorised E-step, scaled by the state size.
_BATCH_FLOATS = 1 << 22


def _batches(lengths: np.ndarray, order: np.ndarray, k: int, p: int):
    """Runs of the length-sorted sequences whose padded size stays within budget and twice the data."""
    cap = max(256, _BATCH_FLOATS // (4 * k * k + 2 * p * p + 1))
    start = 0
    n = len(order)
    while start < n:
        Tmax = int(lengths[order[start]])
        stop, steps = start, 0
        while stop < n:
            steps_new = steps + int(lengths[order[stop]])
            width = stop - start + 1
            if stop > start and (Tmax * width > cap or Tmax * width > 2 * steps_new + 64):
                break
            steps, stop = steps_new, stop + 1
        yield order[start:stop]
        start = stop


def _batch_stats(values: np.ndarray, offsets: np.ndarray, seqs: np.ndarray, params: LGSSMParams) -> LGSSMStats:
    """Statistics of sequences ``seqs`` (sorted by decreasing length), filtered and smoothed together.

    The filter and smoother run over steps, vectorised over the sequences still active at a
    step. A missing component is made uninformative exactly: its row of ``C`` is zeroed and
    its block of ``R`` replaced by an independent unit variance with a zero residual, so the
    innovation covariance is block diagonal with an identity block, contributing nothing to
    the gain, the determinant or the quadratic form (its ``log 2 pi`` is not counted).
    """
    A, C, Q, R, mu0, V0 = params
    k, p = A.shape[0], C.shape[0]
    lengths = (offsets[seqs + 1] - offsets[seqs]).astype(np.int64)
    B, T = len(seqs), int(lengths[0])
    Y = np.full((T, B, p), np.nan)
    for j, sq in enumerate(seqs):
        Y[: lengths[j], j] = values[offsets[sq] : offsets[sq + 1]]
    active = (lengths[None, :] > np.arange(T)[:, None]).sum(axis=1)  # prefix sizes, decreasing
    obs = ~np.isnan(Y)
    Y0 = np.where(obs, Y, 0.0)
    mp = np.zeros((T, B, k))
    Pp = np.zeros((T, B, k, k))
    mf = np.zeros((T, B, k))
    Pf = np.zeros((T, B, k, k))
    eye_k, eye_p = np.eye(k), np.eye(p)
    loglik = 0.0
    for t in range(T):
        n = int(active[t])
        if t == 0:
            m = np.broadcast_to(mu0, (n, k)).copy()
            P = np.broadcast_to(_sym(V0), (n, k, k)).copy()
        else:
            m = mf[t - 1, :n] @ A.T
            P = _sym(A @ Pf[t - 1, :n] @ A.T + Q)
        mp[t, :n], Pp[t, :n] = m, P
        o = obs[t, :n]
        Cb = C[None] * o[:, :, None]
        Rb = R * (o[:, :, None] & o[:, None, :]) + eye_p * (~o)[:, None, :]
        e = Y0[t, :n] - np.einsum("npk,nk->np", Cb, m)
        PCt = P @ Cb.transpose(0, 2, 1)
        S = _sym(Cb @ PCt + Rb)
        try:
            Lc = np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            raise FitFailedError(
                f"The innovation covariance at step {t} is not positive definite; the observation "
                "covariance R is (near) singular. Use a larger reg_covar or scale the data."
            ) from None
        Li = np.linalg.inv(Lc)
        Kt = Li.transpose(0, 2, 1) @ (Li @ PCt.transpose(0, 2, 1))
        w = np.einsum("npq,nq->np", Li, e)
        logdet = np.log(np.diagonal(Lc, axis1=1, axis2=2)).sum()
        loglik -= 0.5 * (o.sum() * _LOG_2PI + 2.0 * logdet + np.einsum("np,np->", w, w))
        K = Kt.transpose(0, 2, 1)
        mf[t, :n] = m + np.einsum("nkp,np->nk", K, e)
        IKC = eye_k - K @ Cb
        Pf[t, :n] = _sym(IKC @ P @ IKC.transpose(0, 2, 1) + K @ Rb @ Kt)
    ms, Ps = mf.copy(), Pf.copy()
    lag = np.zeros_like(Pf)
    for t in range(T - 2, -1, -1):
        n = int(active[t + 1])
        rhs = A @ Pf[t, :n]
        try:
            Jt = np.linalg.solve(Pp[t + 1, :n], rhs)  # J^T
        except np.linalg.LinAlgError:
            Jt = np.linalg.pinv(Pp[t + 1, :n], hermitian=True) @ rhs
        J = Jt.transpose(0, 2, 1)
        ms[t, :n] = mf[t, :n] + np.einsum("nij,nj->ni", J, ms[t + 1, :n] - mp[t + 1, :n])
        Ps[t, :n] = _sym(Pf[t, :n] + J @ (Ps[t + 1, :n] - Pp[t + 1, :n]) @ Jt)
        lag[t + 1, :n] = Ps[t + 1, :n] @ Jt
    tt = np.arange(T)[:, None]
    valid = tt < lengths[None, :]
    prev = (tt < lengths[None, :] - 1).astype(np.float64)
    nxt = (valid & (tt >= 1)).astype(np.float64)
    obs &= valid[:, :, None]
    anyo = obs.any(axis=2)
    full = obs.all(axis=2)
    Szz = Ps + ms[..., :, None] * ms[..., None, :]  # zero on padding
    lagm = lag[1:] + ms[1:, :, :, None] * ms[:-1, :, None, :]
    Yfull = np.where(full[:, :, None], Y0, 0.0)
    yz = np.einsum("tbp,tbk->pk", Yfull, ms)
    yy = np.einsum("tbp,tbq->pq", Yfull, Yfull)
    partial = anyo & ~full
    if partial.any():
        ti, bi = np.nonzero(partial)
        pats = obs[ti, bi]
        uniq, inv = np.unique(pats, axis=0, return_inverse=True)
        for u_idx, pat in enumerate(uniq):
            sel = inv.ravel() == u_idx
            o, u = pat, ~pat
            G = linalg.solve(R[np.ix_(o, o)], R[np.ix_(o, u)], assume_a="pos", check_finite=False).T
            H = np.zeros((p, k))
            H[u] = C[u] - G @ C[o]
            Hy = np.zeros((p, int(o.sum())))
            Hy[o] = np.eye(int(o.sum()))
            Hy[u] = G
            Sig = np.zeros((p, p))
            Sig[np.ix_(u, u)] = R[np.ix_(u, u)] - G @ R[np.ix_(o, u)]
            tsel, bsel = ti[sel], bi[sel]
            msel = ms[tsel, bsel]
            h = Y0[tsel, bsel][:, o] @ Hy.T
            Ssum = Szz[tsel, bsel].sum(axis=0)
            hm = h.T @ msel
            yz += H @ Ssum + hm
            HmH = H @ hm.T
            yy += H @ Ssum @ H.T + HmH + HmH.T + h.T @ h + len(tsel) * _sym(Sig)
    return LGSSMStats(
        n_seq=np.array(float(B)),
        n_steps=np.array(float(lengths.sum())),
        n_obs_steps=np.array(float(anyo.sum())),
        n_values=obs.sum(axis=(0, 1)).astype(np.float64),
        z1=ms[0].sum(axis=0),
        z1z1=Szz[0].sum(axis=0),
        z=ms.sum(axis=(0, 1)),
        zz_prev=np.einsum("tb,tbij->ij", prev, Szz),
        zz_next=np.einsum("tb,tbij->ij", nxt, Szz),
        zz_lag=np.einsum("tb,tbij->ij", nxt[1:], lagm),
        zz_obs=np.einsum("tb,tbij->ij", anyo.astype(np.float64), Szz),
        yz=yz,
        yy=_sym(yy),
        loglik=np.array(loglik),
    )


def partition_stats(values: np.ndarray, offsets: np.ndarray, params: LGSSMParams) -> LGSSMStats:
    """Statistics of a partition of whole sequences (see :func:`emflow.models.lgssm.e_step`)."""
    k, p = params.A.shape[0], params.C.shape[0]
    values = np.asarray(values, dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    # sequences sorted by decreasing length (ties by position) so the active ones are a prefix
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    total = empty_stats(k, p)
    for seqs in _batches(lengths, order, k, p):
        s = _batch_stats(values, offsets, seqs, params)
        total = LGSSMStats(*(a + b for a, b in zip(total, s)))
    return total
