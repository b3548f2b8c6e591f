"""Kalman-smoother EM statistics of one sequence cut into slices (pure NumPy).

The linear-Gaussian counterpart of :mod:`emflow.models.hmm_long`, with the same three
steps per slice (covering steps ``a .. b - 1``) and the same ``link`` convention::

    fwd[p]  = forward_message(Y_p, params, fwd[p - 1])     # Kalman filter
    bwd[p]  = backward_message(Y_p, params, bwd[p + 1])    # backward information filter
    stats_p = slice_stats(Y_p, params, (fwd[p - 1], fwd[p], bwd[p + 1]))

* forward: the filtered mean and covariance of ``z_{b-1}`` (and the slice's share of the
  log-likelihood); the next slice's filter starts from their prediction ``(A m, A P A^T + Q)``;
* backward: the information form ``(Lambda, eta)`` of ``p(y_a .. y_{T-1} | z_{a-1})``
  (proportional to ``exp(-z^T Lambda z / 2 + eta^T z)``); it needs no forward message, so
  both sweeps run at once;
* a slice's statistics: its Kalman filter from the incoming prediction, the future's
  information folded into the filtered state of its last step (which makes it the
  smoothed one), then the ordinary RTS smoother and :func:`emflow.models.lgssm_stats.
  smoothed_stats`. The lag-one term across a cut belongs to the later slice; ``z1``,
  ``z1z1`` and ``n_seq`` count in the first slice, and ``zz_prev`` / ``zz_next`` leave out
  only the sequence's last / first step.

NaN values are missing, as in :func:`emflow.models.lgssm.kalman_filter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .lgssm import LGSSMParams, LGSSMStats, _sym, kalman_filter, rts_smoother

__all__ = ["KalmanMessage", "forward_message", "backward_message", "slice_stats", "slice_states", "chain_links",
           "chain_stats", "Sweeps", "ForwardSweep", "StateSweeps", "loglik_part"]


class KalmanMessage(NamedTuple):
    """Filtered ``mean`` (k,) and ``cov`` (k, k) of a slice's last state, its share of the
    log-likelihood ``loglik`` and the running ``total``."""

    mean: np.ndarray
    cov: np.ndarray
    loglik: float
    total: float


def _entry(params: LGSSMParams, fwd_in: KalmanMessage | None) -> LGSSMParams:
    """Parameters whose first-state prior is the slice's predicted first state."""
    if fwd_in is None:
        return params
    A, Q = np.asarray(params.A), np.asarray(params.Q)
    return params._replace(mu0=A @ fwd_in.mean, V0=_sym(A @ fwd_in.cov @ A.T + Q))


def forward_message(Y, params: LGSSMParams, fwd_in: KalmanMessage | None) -> KalmanMessage:
    """The forward sweep's step over one slice (``None``: the slice starts the sequence)."""
    f = kalman_filter(np.asarray(Y, dtype=np.float64), _entry(params, fwd_in))
    return KalmanMessage(f.filtered_means[-1], f.filtered_covariances[-1], f.loglik,
                         f.loglik + (0.0 if fwd_in is None else float(fwd_in.total)))


def backward_message(Y, params: LGSSMParams, bwd_in):
    """The backward sweep's step over one slice: ``(Lambda, eta)`` on the state before the
    slice, from the next slice's (``None``: the slice ends the sequence)."""
    A, C, Q, R = (np.asarray(x, dtype=np.float64) for x in params[:4])
    Y = np.asarray(Y, dtype=np.float64)
    k = A.shape[0]
    lam, eta = (np.zeros((k, k)), np.zeros(k)) if bwd_in is None else (np.array(bwd_in[0]), np.array(bwd_in[1]))
    observed = ~np.isnan(Y)
    eye = np.eye(k)
    for t in range(len(Y) - 1, -1, -1):
        o = observed[t]
        if o.any():
            Co, yo = C[o], Y[t, o]
            RiC = np.linalg.solve(R[np.ix_(o, o)], Co)
            lam = lam + Co.T @ RiC
            eta = eta + RiC.T @ yo
        # through the transition: Lambda' = A^T (I + Lambda Q)^{-1} Lambda A
        M = np.linalg.solve(eye + lam @ Q, np.column_stack([lam, eta]))
        lam, eta = _sym(A.T @ M[:, :k] @ A), A.T @ M[:, k]
    return lam, eta


def _smoothed_last(m: np.ndarray, P: np.ndarray, lam: np.ndarray, eta: np.ndarray):
    """The filtered ``(m, P)`` with the future's information added (the smoothed state)."""
    k = len(m)
    P2 = _sym(np.linalg.solve(np.eye(k) + P @ lam, P))  # (P^-1 + Lambda)^-1 without inverting P
    return m + P2 @ (eta - lam @ m), P2


def _smooth(Y, params: LGSSMParams, link):
    """``(slice prior parameters, filter, smoother)`` of one slice given its link."""
    fwd_in, _, bwd_in = link
    p_in = _entry(params, fwd_in)
    filt = kalman_filter(Y, p_in)
    if bwd_in is not None:
        mf, Pf = filt.filtered_means.copy(), filt.filtered_covariances.copy()
        mf[-1], Pf[-1] = _smoothed_last(mf[-1], Pf[-1], *bwd_in)
        filt = filt._replace(filtered_means=mf, filtered_covariances=Pf)
    return p_in, filt, rts_smoother(np.asarray(params.A, dtype=np.float64), filt)


def slice_states(Y, params: LGSSMParams, link, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Filtered (``kind="filter"``) or smoothed state means and covariances of one slice."""
    Y = np.asarray(Y, dtype=np.float64)
    if kind != "smooth":
        f = kalman_filter(Y, _entry(params, link[0]))
        return f.filtered_means, f.filtered_covariances
    _, _, sm = _smooth(Y, params, link)
    return sm.means, sm.covariances


def slice_stats(Y, params: LGSSMParams, link) -> LGSSMStats:
    """EM statistics of one slice of a cut sequence; they add over the slices to those of
    the uncut sequence (:func:`emflow.models.lgssm_stats.sequence_stats`)."""
    from .lgssm_stats import smoothed_stats

    fwd_in, _, bwd_in = link
    Y = np.asarray(Y, dtype=np.float64)
    A = np.asarray(params.A, dtype=np.float64)
    p_in, filt, sm = _smooth(Y, params, link)
    st = smoothed_stats(Y, p_in, filt, sm)
    m, P = sm.means, sm.covariances
    first = np.outer(m[0], m[0]) + P[0]
    last = np.outer(m[-1], m[-1]) + P[-1]
    zz_prev = st.zz_prev + (last if bwd_in is not None else 0.0)
    zz_next, zz_lag, z1, z1z1, n_seq = st.zz_next, st.zz_lag, st.z1, st.z1z1, st.n_seq
    if fwd_in is not None:
        # the step before the slice, smoothed, and its lag-one moment with the first step
        J = np.linalg.solve(p_in.V0, A @ fwd_in.cov).T  # P_{a-1|a-1} A^T P_{a|a-1}^{-1}
        m_prev = fwd_in.mean + J @ (m[0] - p_in.mu0)
        zz_next = zz_next + first
        zz_lag = zz_lag + P[0] @ J.T + np.outer(m[0], m_prev)
        z1, z1z1, n_seq = np.zeros_like(z1), np.zeros_like(z1z1), np.array(0.0)
    return st._replace(n_seq=n_seq, z1=z1, z1z1=z1z1, zz_prev=zz_prev, zz_next=zz_next, zz_lag=zz_lag)


def chain_links(slices, params: LGSSMParams) -> list[tuple]:
    """The ``link`` of every slice of one sequence (both sweeps, in-process)."""
    P = len(slices)
    fwd, bwd = [None] * P, [None] * P
    for q in range(P):
        fwd[q] = forward_message(slices[q], params, fwd[q - 1] if q else None)
    for q in range(P - 1, -1, -1):
        bwd[q] = backward_message(slices[q], params, bwd[q + 1] if q + 1 < P else None)
    return [(fwd[q - 1] if q else None, fwd[q], bwd[q + 1] if q + 1 < P else None) for q in range(P)]


def chain_stats(slices, params: LGSSMParams) -> LGSSMStats:
    """Statistics of one sequence given as consecutive slices (arrays of shape (n_q, p))."""
    from ..stats import add

    return add(*[slice_stats(s, params, ln) for s, ln in zip(slices, chain_links(slices, params))])


@dataclass(frozen=True)
class Sweeps:
    """The two sweeps of a function ``f(values, offsets, params, ...)`` over slices, for the
    engine (:mod:`emflow.execution.sweeps`)."""

    def forward(self, values, offsets, params, *rest):
        return forward_message(values, params, rest[-1])

    def backward(self, values, offsets, params, *rest):
        return backward_message(values, params, rest[-1])


@dataclass(frozen=True)
class ForwardSweep(Sweeps):
    """Only the forward sweep (the log-likelihood, filtered states)."""

    backward = None


@dataclass(frozen=True)
class StateSweeps(Sweeps):
    """For ``f(values, offsets, params, out_url, kind, ...)``: the backward sweep only when
    ``kind == "smooth"``."""

    def backward(self, values, offsets, params, *rest):
        return backward_message(values, params, rest[-1]) if rest[1] == "smooth" else None


def loglik_part(values, offsets, params: LGSSMParams, link=None) -> np.ndarray:
    """:func:`emflow.models.lgssm.loglik_stats`, or, with ``link``, one slice's share."""
    if link is None:
        from .lgssm import loglik_stats

        return loglik_stats(values, offsets, params)
    return np.array([float(link[1].loglik), float(len(values)), 0.0 if link[0] is not None else 1.0])


loglik_part.sweeps = ForwardSweep()
