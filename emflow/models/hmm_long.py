"""Baum-Welch on one sequence cut into slices (pure NumPy): exact boundary messages.

A sequence too long for one worker is cut along its time axis into slices (partitions
of :class:`emflow.storage.sequences.SequenceData` listed in its ``chains``). One EM
iteration over a cut sequence is two sweeps of tiny messages and one parallel pass::

    fwd[p]  = forward_message(slice_p, params, emission, fwd[p - 1])     # p = 0, 1, ...
    bwd[p]  = backward_message(slice_p, params, emission, bwd[p + 1])    # p = P-1, ..., 0
    stats_p = slice_e_step(slice_p, params, emission, (fwd[p - 1], fwd[p], bwd[p + 1]))

(``None`` beyond either end.) The two sweeps do not depend on each other, and the stats
of the slices add field-wise to exactly the statistics of the uncut sequence.

The messages, for a slice covering steps ``a .. b - 1``:

* forward: ``alpha`` = ``p(z_{b-1} | x_0 .. x_{b-1})`` (Rabiner's scaled forward variable
  at the slice's last step, a K-vector) with ``loglik`` = ``log p(x_a .. x_{b-1} | x_0 ..
  x_{a-1})`` (this slice's share of the sequence's log-likelihood) and ``total`` (the
  running log-normaliser ``log p(x_0 .. x_{b-1})``);
* backward: ``m(i)`` proportional to ``p(x_a .. x_{T-1} | z_{a-1} = i)``, scaled to
  maximum 1 (only its direction matters).

Each slice then runs the ordinary scaled forward-backward of
:func:`emflow.models.hmm.forward_backward` (compiled for long slices) on a modified
problem with the same posteriors: the first step's prior is the predictive ``alpha_in @
A`` instead of ``startprob``, and the future's evidence ``m`` multiplies the last step's
emission probabilities. The transition across a cut (steps ``a - 1 -> a``) belongs to the
later slice: ``xi(i, j) = alpha_in(i) A_ij gamma_a(j) / (alpha_in @ A)_j`` (the Markov
property). ``start`` and ``n_sequences`` count in the first slice only.

:func:`chain_e_step` runs the three steps in-process over a list of slices (the
reference orchestration; the engine runs the same functions as a chain of tasks:
:mod:`emflow.execution.sweeps`). Viterbi decoding uses max-product messages the same way,
and :func:`transfer` / :func:`scan_links` give the same links in the parallel-in-time
form. The linear-Gaussian counterpart is :mod:`emflow.models.lgssm_long`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import hmm as H

__all__ = ["ForwardMessage", "forward_message", "backward_message", "slice_e_step", "slice_posteriors",
           "chain_links", "chain_e_step", "Sweeps", "ForwardSweep", "ViterbiMessage",
           "viterbi_forward_message", "Transfer", "transfer", "scan_links", "viterbi_backward_message", "slice_viterbi", "ViterbiSweeps"]


class ForwardMessage(NamedTuple):
    """What a slice sends to the next one in the forward sweep.

    Attributes
    ----------
    alpha : ndarray of shape (K,)
        Filtered state distribution at the slice's last step.
    loglik : float
        The slice's share of the sequence's log-likelihood.
    total : float
        Log-likelihood of the sequence up to the slice's last step.
    """

    alpha: np.ndarray
    loglik: float
    total: float


def _one(n: int) -> H.Layout:
    return H.Layout(np.array([0, n], dtype=np.int64))


def _frames(values, params, emission):
    X = emission.observations(values, params)
    log_b, cache = emission.log_likelihood_and_cache(X, params)
    return X, np.asarray(log_b, dtype=np.float64), cache


def _prior(params, fwd_in: ForwardMessage | None) -> np.ndarray:
    if fwd_in is None:
        return np.asarray(params.startprob, dtype=np.float64)
    return np.asarray(fwd_in.alpha, dtype=np.float64) @ np.asarray(params.transmat, dtype=np.float64)


def _with_future(log_b: np.ndarray, bwd_in) -> np.ndarray:
    """``log_b`` with the future's evidence folded into the last step."""
    if bwd_in is None:
        return log_b
    out = log_b.copy()
    with np.errstate(divide="ignore"):
        out[-1] += np.log(np.asarray(bwd_in, dtype=np.float64))
    return out


def _forward_only(log_b: np.ndarray, prior: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, float]:
    """(filtered distribution at the last step, log-likelihood) of one slice."""
    n = len(log_b)
    if H._hmmc is not None and n > 1:
        mx = log_b.max(axis=1)
        if np.all(np.isfinite(mx)):
            with np.errstate(under="ignore"):
                B = np.exp(log_b - mx[:, None])
            try:
                _, fwd, sf = H._hmmc.forward_scaling(prior, A, B)
            except ValueError:
                pass  # a vanished forward variable: forward_backward names the step
            else:
                return fwd[-1] / fwd[-1].sum(), float(np.sum(mx) - np.sum(np.log(sf)))
    fb = H.forward_backward(log_b, _one(n), prior, A, want_trans=False)
    return fb.gamma[-1], float(fb.loglik[0])  # no future: the last posterior is the filtered one


def forward_message(values, params, emission, fwd_in: ForwardMessage | None) -> ForwardMessage:
    """The forward sweep's step over one slice.

    Parameters
    ----------
    values : ndarray of shape (n, d)
        The slice's observations.
    params : the emission's ``params_type``
    emission : Emission
    fwd_in : ForwardMessage or None
        The previous slice's message (``None``: the slice starts the sequence).
    """
    _, log_b, _ = _frames(values, params, emission)
    alpha, ll = _forward_only(log_b, _prior(params, fwd_in), np.asarray(params.transmat, dtype=np.float64))
    return ForwardMessage(alpha, ll, ll + (0.0 if fwd_in is None else float(fwd_in.total)))


def backward_message(values, params, emission, bwd_in: np.ndarray | None) -> np.ndarray:
    """The backward sweep's step over one slice: ``m`` for the previous slice (see the
    module's notes), from the next slice's ``bwd_in`` (``None``: the slice ends the sequence)."""
    _, log_b, _ = _frames(values, params, emission)
    A = np.asarray(params.transmat, dtype=np.float64)
    K = len(A)
    # with a uniform prior the first posterior is proportional to b_a * beta_a, whatever
    # came before the slice
    fb = H.forward_backward(_with_future(log_b, bwd_in), _one(len(log_b)), np.full(K, 1.0 / K), A,
                            want_trans=False)
    m = A @ fb.gamma[0]
    return m / m.max()


def _cross(prior: np.ndarray, alpha_in, A: np.ndarray, gamma0: np.ndarray) -> np.ndarray:
    """Expected transitions across the cut before the slice's first step."""
    ratio = np.divide(gamma0, prior, out=np.zeros_like(gamma0), where=prior > 0)
    return np.asarray(alpha_in, dtype=np.float64)[:, None] * A * ratio[None, :]


def _slice_fb(log_b, params, link, want_trans: bool):
    fwd_in, _, bwd_in = link
    A = np.asarray(params.transmat, dtype=np.float64)
    prior = _prior(params, fwd_in)
    fb = H.forward_backward(_with_future(log_b, bwd_in), _one(len(log_b)), prior, A, want_trans=want_trans)
    return fb, prior, A


def slice_e_step(values, params, emission, link):
    """Baum-Welch statistics of one slice of a cut sequence.

    Parameters
    ----------
    values : ndarray of shape (n, d)
    params : the emission's ``params_type``
    emission : Emission
    link : tuple ``(fwd_in, fwd_own, bwd_in)``
        The previous slice's :class:`ForwardMessage` (``None`` for the first slice), this
        slice's own, and the next slice's backward message (``None`` for the last).

    Returns
    -------
    emission.stats_type
        Statistics that add over the slices to those of the uncut sequence.
    """
    fwd_in, fwd_own, _ = link
    X, log_b, cache = _frames(values, params, emission)
    fb, prior, A = _slice_fb(log_b, params, link, True)
    em = emission.stats(X, fb.gamma, params, cache)
    K = len(A)
    if fwd_in is None:
        start, trans = fb.start, fb.trans
    else:
        start, trans = np.zeros(K), fb.trans + _cross(prior, fwd_in.alpha, A, fb.gamma[0])
    first = 1.0 if fwd_in is None else 0.0
    return emission.stats_type(start, trans, *em, np.asarray(float(fwd_own.loglik)), np.asarray(first),
                               np.asarray(float(len(log_b))))


def slice_posteriors(values, params, emission, link) -> tuple[float, np.ndarray]:
    """``(the slice's share of the log-likelihood, posteriors (n, K))`` of one slice."""
    _, log_b, _ = _frames(values, params, emission)
    fb, _, _ = _slice_fb(log_b, params, link, False)
    return float(link[1].loglik), fb.gamma


def chain_links(slices, params, emission) -> list[tuple]:
    """The ``link`` of every slice of one sequence (both sweeps, in-process)."""
    P = len(slices)
    fwd, bwd = [None] * P, [None] * P
    for p in range(P):
        fwd[p] = forward_message(slices[p], params, emission, fwd[p - 1] if p else None)
    for p in range(P - 1, -1, -1):
        bwd[p] = backward_message(slices[p], params, emission, bwd[p + 1] if p + 1 < P else None)
    return [(fwd[p - 1] if p else None, fwd[p], bwd[p + 1] if p + 1 < P else None) for p in range(P)]


def chain_e_step(slices, params, emission):
    """Statistics of one sequence given as consecutive slices (a list of (n_p, d) arrays),
    computed slice by slice with boundary messages; equal to the uncut E-step's."""
    from ..stats import add

    links = chain_links(slices, params, emission)
    return add(*[slice_e_step(s, params, emission, ln) for s, ln in zip(slices, links)])


# -- the parallel-in-time form: transfer elements and a prefix scan --------------------
# Each slice reduces itself, independently of the others, to a K x K transfer element:
# forward, row i = (filtered distribution at the slice's end, log-likelihood) when the
# step before the slice is in state i; backward, column j = the message it would send
# when the future's evidence is all on state j. Messages are linear in what comes in, so
# the exact messages of every slice follow from these elements by a prefix scan of small
# matrix products (Saerkkae & Garcia-Fernandez's parallel form); each element is scaled to
# maximum 1 with its log-scale kept aside. Unlike the chain, a row (column) whose
# likelihood is below exp(-745) of the element's best underflows to 0: exact unless the
# incoming message puts all its mass on such states.
class Transfer(NamedTuple):
    """A slice's transfer element: ``matrix`` (K, K) scaled to maximum 1 and ``log_scale``."""

    matrix: np.ndarray
    log_scale: float


def _scaled(rows: np.ndarray, logs: np.ndarray, axis: int) -> Transfer:
    finite = np.isfinite(logs)
    if not finite.any():
        raise H.FitFailedError("A slice of the sequence cannot be reached by any state path with non-zero probability.")
    c = float(logs[finite].max())
    w = np.where(finite, np.exp(np.where(finite, logs, 0.0) - c), 0.0)
    return Transfer(rows * (w[:, None] if axis == 0 else w[None, :]), c)


def transfer(values, params, emission, first: bool, last: bool) -> tuple:
    """``(forward element, backward element)`` of one slice: a :class:`ForwardMessage`
    for the sequence's first slice (else a :class:`Transfer`), the backward message for its
    last (else a :class:`Transfer`)."""
    _, log_b, _ = _frames(values, params, emission)
    A = np.asarray(params.transmat, dtype=np.float64)
    K = len(A)
    if first:
        alpha, ll = _forward_only(log_b, _prior(params, None), A)
        fwd = ForwardMessage(alpha, ll, ll)
    else:
        rows, logs = np.zeros((K, K)), np.full(K, -np.inf)
        for i in range(K):
            try:
                rows[i], logs[i] = _forward_only(log_b, A[i], A)
            except H.FitFailedError:  # nothing after state i explains the slice
                pass
        fwd = _scaled(rows, logs, 0)
    if last:
        return fwd, backward_message(values, params, emission, None)
    cols, logs = np.zeros((K, K)), np.full(K, -np.inf)
    uniform = np.full(K, 1.0 / K)
    for j in range(K):
        e = np.zeros(K)
        e[j] = 1.0
        try:
            fb = H.forward_backward(_with_future(log_b, e), _one(len(log_b)), uniform, A, want_trans=False)
        except H.FitFailedError:
            continue
        cols[:, j], logs[j] = A @ fb.gamma[0], fb.loglik[0]  # b_a beta_a = K exp(loglik) gamma_a
    return fwd, _scaled(cols, logs, 1)


def scan_links(elements: list[tuple]) -> list[tuple]:
    """The ``link`` of every slice of one sequence from its slices' :func:`transfer` elements."""
    P = len(elements)
    fwd = [elements[0][0]]
    for p in range(1, P):
        T = elements[p][0]
        v = np.asarray(fwd[-1].alpha) @ T.matrix
        s = float(v.sum())
        ll = float(np.log(s)) + T.log_scale
        fwd.append(ForwardMessage(v / s, ll, float(fwd[-1].total) + ll))
    bwd = [None] * P
    bwd[P - 1] = elements[P - 1][1]
    for p in range(P - 2, -1, -1):
        m = elements[p][1].matrix @ bwd[p + 1]
        bwd[p] = m / m.max()
    return [(fwd[p - 1] if p else None, fwd[p], bwd[p + 1] if p + 1 < P else None) for p in range(P)]


# -- Viterbi across slices (max-product messages) -----------------------------------
# Forward: ``delta(k)`` = best log-probability of a path over x_0 .. x_{b-1} ending in
# state k (scaled to maximum 0; ``offset`` carries the maximum). Backward: ``mu(i)`` = best
# log-probability of x_a .. x_{T-1} and their states given z_{a-1} = i (maximum 0). Every
# score folds into the slice's first and last log emission rows, so hmmlearn's compiled
# Viterbi (through emflow.models.hmm.viterbi) runs on a slice unchanged.
class ViterbiMessage(NamedTuple):
    """What a slice sends forward in the Viterbi sweep: ``delta`` (K,), ``offset`` (float)."""

    delta: np.ndarray
    offset: float


def _log_A(params) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(params.transmat, dtype=np.float64))


def _entry(params, msg_in: ViterbiMessage | None) -> np.ndarray:
    """Best score of entering each state at the slice's first step (before its emission)."""
    if msg_in is None:
        with np.errstate(divide="ignore"):
            return np.log(np.asarray(params.startprob, dtype=np.float64))
    return np.max(np.asarray(msg_in.delta)[:, None] + _log_A(params), axis=0)


def _best(log_b: np.ndarray, A: np.ndarray, first: np.ndarray, last: np.ndarray | None = None,
          mask: int | None = None):
    """Viterbi of one slice with ``first`` added to its first row and ``last`` to its last
    (with ``mask``: paths ending in that state only): ``(log-probability, path)``."""
    lb = log_b.copy()
    lb[0] += first
    if last is not None:
        lb[-1] += last
    if mask is not None:
        keep = lb[-1, mask]
        lb[-1] = -np.inf
        lb[-1, mask] = keep
    if not np.any(np.isfinite(lb[-1])) or not np.any(np.isfinite(lb[0])):
        return -np.inf, None
    lp, path = H.viterbi(lb, _one(len(lb)), np.ones(len(A)), A)
    return float(lp[0]), path


def viterbi_forward_message(values, params, emission, msg_in: ViterbiMessage | None) -> ViterbiMessage:
    """The Viterbi forward sweep's step over one slice (``None``: it starts the sequence)."""
    _, log_b, _ = _frames(values, params, emission)
    A = np.asarray(params.transmat, dtype=np.float64)
    first = _entry(params, msg_in)
    delta = np.array([_best(log_b, A, first, mask=k)[0] for k in range(len(A))])
    top = float(delta.max())
    return ViterbiMessage(delta - top, top + (0.0 if msg_in is None else float(msg_in.offset)))


def viterbi_backward_message(values, params, emission, mu_in: np.ndarray | None) -> np.ndarray:
    """The Viterbi backward sweep's step over one slice: ``mu`` for the previous slice."""
    _, log_b, _ = _frames(values, params, emission)
    A = np.asarray(params.transmat, dtype=np.float64)
    log_A = _log_A(params)
    mu = np.array([_best(log_b, A, log_A[i], mu_in)[0] for i in range(len(A))])
    return mu - mu.max()


def slice_viterbi(values, params, emission, link) -> tuple[float, np.ndarray]:
    """``(log-probability of the best path if the slice ends the sequence else 0, the
    slice's states)``; the states are those of the best path of the whole sequence (when
    it is unique)."""
    fwd_in, fwd_own, mu_in = link
    _, log_b, _ = _frames(values, params, emission)
    A = np.asarray(params.transmat, dtype=np.float64)
    _, path = _best(log_b, A, _entry(params, fwd_in), mu_in)
    return (float(fwd_own.offset) if mu_in is None else 0.0), path


@dataclass(frozen=True)
class Sweeps:
    """The two sweeps of a function ``f(values, offsets, params, ...)`` over slices, for the
    engine (:mod:`emflow.execution.sweeps`): ``forward`` / ``backward`` take the function's
    arguments and then the incoming message.

    Parameters
    ----------
    emission : Emission, optional
        Default: the component registered for the parameters' type.
    """

    emission: Any = None

    def _em(self, params):
        from .hmm_emissions import emission_for

        return self.emission if self.emission is not None else emission_for(params)

    def forward(self, values, offsets, params, *rest):
        return forward_message(values, params, self._em(params), rest[-1])

    def backward(self, values, offsets, params, *rest):
        return backward_message(values, params, self._em(params), rest[-1])

    def transfer(self, values, offsets, params, *rest):
        """The parallel form: ``rest[-1]`` is ``(first, last)``; see :func:`transfer`."""
        return transfer(values, params, self._em(params), *rest[-1])

    scan = staticmethod(scan_links)


@dataclass(frozen=True)
class ForwardSweep(Sweeps):
    """Only the forward sweep (what the log-likelihood needs)."""

    backward = None
    transfer = None


@dataclass(frozen=True)
class ViterbiSweeps(Sweeps):
    """The max-product sweeps (Viterbi decoding; the chain form only)."""

    transfer = None

    def forward(self, values, offsets, params, *rest):
        return viterbi_forward_message(values, params, self._em(params), rest[-1])

    def backward(self, values, offsets, params, *rest):
        return viterbi_backward_message(values, params, self._em(params), rest[-1])
