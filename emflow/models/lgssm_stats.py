"""Expected sufficient statistics, filtered / smoothed states and log-likelihoods of a
linear-Gaussian state-space model's sequences, a partition at a time.

:func:`sequence_stats` runs the Kalman filter and RTS smoother of
:mod:`emflow.models.lgssm` over one sequence (the reference). :func:`partition_stats`
(which :func:`emflow.models.lgssm.e_step` runs), :func:`partition_states` and
:func:`partition_loglik` give the same for a partition of many sequences by one of two
paths, chosen by :data:`KERNEL`:

- NumPy (always there): the sequences, sorted by length, filtered and smoothed together in
  batches, every step one set of ``(n_active, k, k)`` array operations
  (:func:`batch_filter_smooth`), so 500 short sequences cost about one sequence's Python loop;
- compiled (:mod:`emflow.models.lgssm_kernel`, when numba imports): every step of every
  sequence in compiled code, which removes the per-step Python overhead of long sequences.

Both give the same answer to rounding. Nothing here knows about Dask, Zarr or Prefect.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from .lgssm import _LOG_2PI, LGSSMParams, LGSSMStats, _sym, empty_stats, kalman_filter, rts_smoother
from ..errors import FitFailedError
from ._compiled import compiled_kernel

__all__ = ["sequence_stats", "smoothed_stats", "partition_stats", "partition_states", "partition_loglik",
           "batch_filter_smooth", "runs"]


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

#: "auto": the compiled kernel when numba imports, else NumPy; "numpy": never the kernel;
#: "numba": the kernel, an ImportError without numba.
KERNEL = "auto"


def _kernel():
    """The compiled kernel module, or ``None`` for the NumPy path."""
    return compiled_kernel(KERNEL, "lgssm_kernel")


def _not_pd(t) -> FitFailedError:
    return FitFailedError(
        f"The innovation covariance at step {t} is not positive definite; the observation "
        "covariance R is (near) singular. Use a larger reg_covar or scale the data."
    )


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


def runs(offsets: np.ndarray, k: int, p: int):
    """Runs ``(i, j)`` of consecutive sequences ``i..j-1`` of at most the step budget each
    (one sequence over it is a run alone): the units whose per-step arrays are held at once."""
    cap = max(16, _BATCH_FLOATS // (4 * k * k + 3 * k + p + 1))
    n = len(offsets) - 1
    i = 0
    while i < n:
        j = int(np.searchsorted(offsets, offsets[i] + cap, side="right")) - 1
        j = min(max(j, i + 1), n)
        yield i, j
        i = j


def batch_filter_smooth(values: np.ndarray, offsets: np.ndarray, seqs: np.ndarray, params: LGSSMParams,
                        smooth: bool = True) -> dict:
    """Filter (and smooth) sequences ``seqs`` (sorted by decreasing length) together, padded.

    The filter and smoother run over steps, vectorised over the sequences still active at a
    step. A missing component is made uninformative exactly: its row of ``C`` is zeroed and
    its block of ``R`` replaced by an independent unit variance with a zero residual, so the
    innovation covariance is block diagonal with an identity block, contributing nothing to
    the gain, the determinant or the quadratic form (its ``log 2 pi`` is not counted).

    Returns a dict of (steps, sequences, ...) arrays, zero past each sequence's end: ``Y0``
    (observations, missing as 0), ``obs`` (observed and inside the sequence), ``lengths``,
    ``mp, Pp, mf, Pf, ms, Ps, lag`` (``ms, Ps, lag`` ``None`` without smoothing) and
    ``loglik`` (per sequence).
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
    loglik = np.zeros(B)
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
            raise _not_pd(t) from None
        Li = np.linalg.inv(Lc)
        Kt = Li.transpose(0, 2, 1) @ (Li @ PCt.transpose(0, 2, 1))
        w = np.einsum("npq,nq->np", Li, e)
        logdet = np.log(np.diagonal(Lc, axis1=1, axis2=2)).sum(axis=1)
        loglik[:n] -= 0.5 * (o.sum(axis=1) * _LOG_2PI + 2.0 * logdet + np.einsum("np,np->n", w, w))
        K = Kt.transpose(0, 2, 1)
        mf[t, :n] = m + np.einsum("nkp,np->nk", K, e)
        IKC = eye_k - K @ Cb
        Pf[t, :n] = _sym(IKC @ P @ IKC.transpose(0, 2, 1) + K @ Rb @ Kt)
    valid = np.arange(T)[:, None] < lengths[None, :]
    out = dict(Y0=Y0, obs=obs & valid[:, :, None], lengths=lengths, mp=mp, Pp=Pp, mf=mf, Pf=Pf,
               loglik=loglik, ms=None, Ps=None, lag=None)
    if not smooth:
        return out
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
    out.update(ms=ms, Ps=Ps, lag=lag)
    return out


def _obs_sums(Y0: np.ndarray, obs: np.ndarray, ms: np.ndarray, Ps: np.ndarray, C: np.ndarray, R: np.ndarray):
    """``(yz, yy, zz_obs, n_obs_steps, n_values)`` over rows of steps (``obs`` all False on padding).

    A step with some components missing takes their conditional moments given ``z_t`` and
    the observed components: ``y_t = H z_t + h + eps``, ``eps ~ N(0, Sigma)`` on the missing rows.
    """
    p, k = C.shape
    anyo, full = obs.any(axis=1), obs.all(axis=1)
    wa = anyo.astype(np.float64)
    Yfull = Y0 * full[:, None]
    yz = Yfull.T @ ms
    yy = Yfull.T @ Yfull
    zz_obs = np.tensordot(wa, Ps, axes=1) + (ms * wa[:, None]).T @ ms
    rows = np.flatnonzero(anyo & ~full)
    if len(rows):
        pats = obs[rows]
        if p <= 62:  # a pattern as an integer: np.unique of ints, not of rows (sorting rows is slow)
            codes = pats @ (np.int64(1) << np.arange(p, dtype=np.int64))
            _, first_of, inv = np.unique(codes, return_index=True, return_inverse=True)
            uniq = pats[first_of]
        else:
            uniq, inv = np.unique(pats, axis=0, return_inverse=True)
        for u_idx, pat in enumerate(uniq):
            sel = rows[inv.ravel() == u_idx]
            o, u = pat, ~pat
            G = linalg.solve(R[np.ix_(o, o)], R[np.ix_(o, u)], assume_a="pos", check_finite=False).T
            H = np.zeros((p, k))
            H[u] = C[u] - G @ C[o]
            Hy = np.zeros((p, int(o.sum())))
            Hy[o] = np.eye(int(o.sum()))
            Hy[u] = G
            Sig = np.zeros((p, p))
            Sig[np.ix_(u, u)] = R[np.ix_(u, u)] - G @ R[np.ix_(o, u)]
            msel = ms[sel]
            h = Y0[sel][:, o] @ Hy.T
            Ssum = Ps[sel].sum(axis=0) + msel.T @ msel
            hm = h.T @ msel
            yz += H @ Ssum + hm
            HmH = H @ hm.T
            yy += H @ Ssum @ H.T + HmH + HmH.T + h.T @ h + len(sel) * _sym(Sig)
    return yz, _sym(yy), zz_obs, float(anyo.sum()), obs.sum(axis=0).astype(np.float64)


def _stats(Y0, obs, ms, Ps, lag_sum, first, last, n_steps, loglik, params) -> LGSSMStats:
    """Statistics from smoothed rows (``first``/``last``: each sequence's first and last rows;
    ``lag_sum``: ``sum_{t>=2} E[z_t z_{t-1}^T]``)."""
    yz, yy, zz_obs, n_obs, n_values = _obs_sums(Y0, obs, ms, Ps, params.C, params.R)
    tot = Ps.sum(axis=0) + ms.T @ ms
    z1z1 = Ps[first].sum(axis=0) + ms[first].T @ ms[first]
    zlast = Ps[last].sum(axis=0) + ms[last].T @ ms[last]
    return LGSSMStats(
        n_seq=np.array(float(len(first))), n_steps=np.array(float(n_steps)),
        n_obs_steps=np.array(n_obs), n_values=n_values, z1=ms[first].sum(axis=0), z1z1=z1z1,
        z=ms.sum(axis=0), zz_prev=tot - zlast, zz_next=tot - z1z1, zz_lag=lag_sum, zz_obs=zz_obs,
        yz=yz, yy=yy, loglik=np.array(float(np.sum(loglik))),
    )


def _batch_stats(values: np.ndarray, offsets: np.ndarray, seqs: np.ndarray, params: LGSSMParams) -> LGSSMStats:
    """Statistics of sequences ``seqs`` (sorted by decreasing length), filtered and smoothed together."""
    d = batch_filter_smooth(values, offsets, seqs, params)
    T, B, k = d["ms"].shape
    ms, lag = d["ms"], d["lag"]
    lag_sum = lag.sum(axis=(0, 1)) + ms[1:].reshape(-1, k).T @ ms[:-1].reshape(-1, k)  # zero past the ends
    flat = lambda a: a.reshape(T * B, *a.shape[2:])  # noqa: E731
    first = np.arange(B)
    last = (d["lengths"] - 1) * B + first
    return _stats(flat(d["Y0"]), flat(d["obs"]), flat(ms), flat(d["Ps"]), lag_sum, first, last,
                  d["lengths"].sum(), d["loglik"], params)


def _kernel_stats(K, values, offsets, params) -> LGSSMStats:
    d = K.filter_smooth(values, offsets, params)
    ms, Ps, lag = d["ms"], d["Ps"], d["lag"]
    first, last = offsets[:-1], offsets[1:] - 1
    f = first[1:]  # rows whose predecessor starts another sequence: not lag pairs
    lag_sum = lag.sum(axis=0) + ms[1:].T @ ms[:-1] - ms[f].T @ ms[f - 1]
    obs = ~np.isnan(values)
    return _stats(np.where(obs, values, 0.0), obs, ms, Ps, lag_sum, first, last, len(values), d["loglik"], params)


def _states(values, offsets, params, smooth: bool):
    """``(means, covariances, loglik per sequence)`` of every step, filtered or smoothed, by either path."""
    K = _kernel()
    if K is not None:
        try:
            d = K.filter_smooth(values, offsets, params, smooth)
            return (d["ms"], d["Ps"], d["loglik"]) if smooth else (d["mf"], d["Pf"], d["loglik"])
        except np.linalg.LinAlgError as exc:
            if "innovation" in str(exc):
                raise _not_pd(int(str(exc).rsplit(" ", 1)[1])) from None
            # a singular predicted covariance: the NumPy path's pseudo-inverse handles it
    k = params.A.shape[0]
    lengths = np.diff(offsets)
    means, covs, ll = np.empty((len(values), k)), np.empty((len(values), k, k)), np.empty(len(lengths))
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    for seqs in _batches(lengths, order, k, params.C.shape[0]):
        d = batch_filter_smooth(values, offsets, seqs, params, smooth)
        m, P = (d["ms"], d["Ps"]) if smooth else (d["mf"], d["Pf"])
        for j, sq in enumerate(seqs):
            a, b = offsets[sq], offsets[sq + 1]
            means[a:b], covs[a:b] = m[: b - a, j], P[: b - a, j]
        ll[seqs] = d["loglik"]
    return means, covs, ll


def _prepared(values, offsets):
    return np.asarray(values, dtype=np.float64), np.asarray(offsets, dtype=np.int64)


def partition_stats(values: np.ndarray, offsets: np.ndarray, params: LGSSMParams) -> LGSSMStats:
    """Statistics of a partition of whole sequences (see :func:`emflow.models.lgssm.e_step`)."""
    k, p = params.A.shape[0], params.C.shape[0]
    values, offsets = _prepared(values, offsets)
    total = empty_stats(k, p)
    K = _kernel()
    if K is not None:
        try:
            for i, j in runs(offsets, k, p):
                a, b = offsets[i], offsets[j]
                s = _kernel_stats(K, values[a:b], offsets[i : j + 1] - a, params)
                total = LGSSMStats(*(x + y for x, y in zip(total, s)))
            return total
        except np.linalg.LinAlgError as exc:
            if "innovation" in str(exc):
                raise _not_pd(int(str(exc).rsplit(" ", 1)[1])) from None
            total = empty_stats(k, p)  # singular predicted covariance: the NumPy path below
    lengths = np.diff(offsets)
    # sequences sorted by decreasing length (ties by position) so the active ones are a prefix
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    for seqs in _batches(lengths, order, k, p):
        s = _batch_stats(values, offsets, seqs, params)
        total = LGSSMStats(*(a + b for a, b in zip(total, s)))
    return total


def partition_states(values: np.ndarray, offsets: np.ndarray, params: LGSSMParams, kind: str = "smooth"):
    """Filtered (``kind="filter"``) or smoothed (``"smooth"``) state means ``(n_steps, k)`` and
    covariances ``(n_steps, k, k)`` of a partition's sequences, in the layout of ``values``."""
    values, offsets = _prepared(values, offsets)
    m, c, _ = _states(values, offsets, params, kind == "smooth")
    return m, c


def partition_loglik(values: np.ndarray, offsets: np.ndarray, params: LGSSMParams) -> float:
    """``sum log p(y_obs)`` over a partition's sequences (filter only)."""
    values, offsets = _prepared(values, offsets)
    k, p = params.A.shape[0], params.C.shape[0]
    total = 0.0
    for i, j in runs(offsets, k, p):
        a, b = offsets[i], offsets[j]
        total += float(np.sum(_states(values[a:b], offsets[i : j + 1] - a, params, False)[2]))
    return total
