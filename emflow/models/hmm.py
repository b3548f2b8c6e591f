"""Hidden Markov model math (Baum-Welch): pure functions over NumPy arrays.

Nothing here knows about Dask, Zarr or Prefect. One EM iteration is::

    stats  = e_step_*(values_p, offsets_p, params)   # per partition of whole sequences
    total  = add(stats_1, ..., stats_P)              # field-wise sums (emflow.stats.add)
    params = m_step_*(total, params, config)

The emissions are components (:mod:`emflow.models.hmm_emissions`: Gaussian and
categorical there, Poisson in :mod:`~emflow.models.poisson_hmm`, Gaussian mixtures in
:mod:`~emflow.models.gmm_hmm`); the E-step, the transition M-step, decoding and sampling
here are written once over them. This module keeps the Gaussian and categorical
parameter, statistics and M-step code and the ``e_step_*`` / ``frame_log_prob`` /
``sample_sequence`` entry points, which now go through the components.

Forward-backward runs in scaled form (Rabiner's normalised alpha and beta) over *all the
sequences of a partition at once*: the sequences are sorted by length (longest first) and
their steps laid out time-major, so step ``t`` of every sequence still running is one
contiguous block of rows and the sequences alive at ``t + 1`` are a prefix of those alive
at ``t``. Each recursion step is then one small matrix product over that block, and the
Python loop runs ``max(length)`` times per partition rather than once per step of every
sequence. A few very long sequences would make that loop long for little batching, so the
longest ones (as many as a cost model says pay) run one at a time in hmmlearn's compiled
recursions, and the loop only runs as long as the remaining sequences. Emission
probabilities are taken relative to the best state of each step (``exp(log b - max log
b)``), so scaling never underflows on far-out observations.

Gaussian emission statistics are raw moments about a *shift* ``g`` (the mean of the
current means) accumulated in float64, so combining partitions is a plain ``+`` and the
M-step recovers centred moments without cancellation.

The M-step follows hmmlearn (0.3) exactly, priors included: Dirichlet priors on
``startprob`` and each row of ``transmat`` (entries that are zero stay zero), a normal
prior on the means and inverse-gamma (diag, spherical) or inverse-Wishart (full, tied)
priors on the covariances with hmmlearn's defaults (``covars_prior=1e-2`` added to every
entry, ``covars_weight=1``), and a Dirichlet prior on categorical emission rows.

Shapes: ``n`` steps in a partition, ``S`` sequences, ``d`` features, ``K`` states,
``M`` symbols.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import linalg

from ..errors import DataError, FitFailedError
from ..stats import require_finite
from . import gmm as G

__all__ = [
    "COVARIANCE_TYPES",
    "GaussianHMMParams",
    "CategoricalHMMParams",
    "GaussianHMMStats",
    "CategoricalHMMStats",
    "GaussianPriors",
    "TransitionPriors",
    "Layout",
    "shift_of",
    "forward_backward",
    "viterbi",
    "frame_log_prob",
    "e_step_gaussian",
    "e_step_categorical",
    "m_step_gaussian",
    "m_step_categorical",
    "m_step_transitions",
    "check_symbols",
    "full_covars",
    "sample_sequence",
]

COVARIANCE_TYPES = ("spherical", "diag", "full", "tied")


# -- parameters and statistics --------------------------------------------------------
class GaussianHMMParams(NamedTuple):
    """Parameters of an HMM with Gaussian emissions.

    Attributes
    ----------
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)
    means : ndarray of shape (K, d)
    covars : ndarray
        (K,) spherical, (K, d) diag, (K, d, d) full, (d, d) tied (hmmlearn's ``_covars_``).
    covariance_type : str
    """

    startprob: np.ndarray
    transmat: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    covariance_type: str


class CategoricalHMMParams(NamedTuple):
    """Parameters of an HMM with categorical emissions.

    Attributes
    ----------
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)
    emissionprob : ndarray of shape (K, M)
    """

    startprob: np.ndarray
    transmat: np.ndarray
    emissionprob: np.ndarray


class GaussianHMMStats(NamedTuple):
    """Additive statistics of Gaussian-emission Baum-Welch (all float64).

    Attributes
    ----------
    start : ndarray of shape (K,)
        Expected number of sequences starting in each state.
    trans : ndarray of shape (K, K)
        Expected number of transitions ``i -> j``.
    post : ndarray of shape (K,)
        ``N_k = sum_t gamma_tk``.
    s1 : ndarray of shape (K, d)
        ``sum_t gamma_tk (x_t - g)``.
    s2 : ndarray
        (K, d) ``sum_t gamma_tk (x_t - g)**2`` for diag and spherical;
        (K, d, d) ``sum_t gamma_tk (x_t - g)(x_t - g)^T`` for full and tied.
    loglik : ndarray of shape ()
        ``sum_s log p(x_s)`` over sequences.
    n_sequences, n_steps : ndarray of shape ()
    """

    start: np.ndarray
    trans: np.ndarray
    post: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    loglik: np.ndarray
    n_sequences: np.ndarray
    n_steps: np.ndarray


class CategoricalHMMStats(NamedTuple):
    """Additive statistics of categorical-emission Baum-Welch (all float64).

    Attributes
    ----------
    start : ndarray of shape (K,)
    trans : ndarray of shape (K, K)
    obs : ndarray of shape (K, M)
        ``sum_t gamma_tk [x_t == m]``.
    loglik, n_sequences, n_steps : ndarray of shape ()
    """

    start: np.ndarray
    trans: np.ndarray
    obs: np.ndarray
    loglik: np.ndarray
    n_sequences: np.ndarray
    n_steps: np.ndarray


class TransitionPriors(NamedTuple):
    """Dirichlet priors (hmmlearn's ``startprob_prior``, ``transmat_prior``; 1 = none)."""

    startprob_prior: np.ndarray | float = 1.0
    transmat_prior: np.ndarray | float = 1.0


class GaussianPriors(NamedTuple):
    """hmmlearn's GaussianHMM priors, with its defaults."""

    means_prior: np.ndarray | float = 0.0
    means_weight: np.ndarray | float = 0.0
    covars_prior: np.ndarray | float = 1e-2
    covars_weight: np.ndarray | float = 1.0


# -- time-major layout of the sequences of one partition -----------------------------
class Layout:
    """Time-major ordering of the steps of many sequences.

    Sequences are sorted by decreasing length (stable). Row ``c[t] + j`` of a time-major
    array holds step ``t`` of the ``j``-th longest sequence; the block of step ``t`` has
    ``n[t]`` rows and the rows alive at ``t + 1`` are its first ``n[t + 1]``.

    Attributes
    ----------
    perm : ndarray of shape (n,)
        Original (flat, sequence-major) index of each time-major row.
    order : ndarray of shape (S,)
        Sequences by decreasing length.
    n : ndarray of shape (T_max,)
        Sequences alive at each step.
    c : ndarray of shape (T_max + 1,)
        Start row of each step's block.
    """

    def __init__(self, offsets: np.ndarray):
        off = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(off)
        if lengths.size == 0 or np.any(lengths <= 0):
            raise DataError("Every sequence needs at least one step (offsets must be strictly increasing).")
        self.n_sequences = int(lengths.size)
        self.n_steps = int(off[-1] - off[0])
        self.lengths = lengths
        self.order = np.argsort(-lengths, kind="stable")
        T = int(lengths.max())
        self.T = T
        counts = np.bincount(lengths, minlength=T + 1)
        self.n = (self.n_sequences - np.cumsum(counts))[:T] + 0  # alive at t: length > t
        self.c = np.concatenate([[0], np.cumsum(self.n)])
        t_of_row = np.repeat(np.arange(T), self.n)
        j_of_row = np.arange(self.n_steps) - np.repeat(self.c[:-1], self.n)
        self.perm = off[self.order][j_of_row] - off[0] + t_of_row
        # predecessor row of each row in blocks t >= 1 (rows c[1]:)
        self.prev = (np.repeat(self.c[:-2], self.n[1:]) + j_of_row[self.c[1]:]) if T > 1 else np.zeros(0, np.int64)

    def to_time_major(self, a: np.ndarray) -> np.ndarray:
        return a[self.perm]

    def to_original(self, a_tm: np.ndarray) -> np.ndarray:
        out = np.empty_like(a_tm)
        out[self.perm] = a_tm
        return out


# -- forward-backward and Viterbi -----------------------------------------------------
class FBResult(NamedTuple):
    """Result of :func:`forward_backward` (time-major unless stated).

    Attributes
    ----------
    loglik : ndarray of shape (S,)
        Log-likelihood of each sequence, in the partition's original sequence order.
    gamma : ndarray of shape (n, K)
        Posterior state probabilities, time-major rows (see :class:`Layout`).
    start : ndarray of shape (K,)
        ``sum_s gamma_s0``.
    trans : ndarray of shape (K, K)
        ``sum_s sum_t xi_st``.
    """

    loglik: np.ndarray
    gamma: np.ndarray
    start: np.ndarray
    trans: np.ndarray


try:  # hmmlearn's compiled scaled recursions (pybind11), for sequences too long to batch
    from hmmlearn import _hmmc
except ImportError:  # pragma: no cover - hmmlearn is a dependency; this keeps the NumPy path working
    _hmmc = None

# Cost model of forward + backward, in seconds: per step of a compiled one-sequence
# recursion, per compiled call, and per time step of the batched NumPy loop (measured on
# the 2-core build machine: 0.2 us, 5-10 us, 8-16 us; rounded towards the batched loop).
# Only their ratios matter.
_C_STEP, _C_CALL, _PY_STEP = 0.25e-6, 15e-6, 8e-6


def _n_long(layout: Layout) -> int:
    """How many of the longest sequences to run one at a time in compiled code: the count
    that minimises the cost model (the batched loop then runs only as long as the rest)."""
    if _hmmc is None:
        return 0
    lengths = layout.lengths[layout.order]  # longest first
    S = lengths.size
    k = np.arange(S + 1)
    compiled = _C_STEP * np.concatenate([[0], np.cumsum(lengths)]) + _C_CALL * k
    batched = _PY_STEP * np.concatenate([lengths, [0]])
    return int(np.argmin(compiled + batched))


def _split_long(layout: Layout) -> tuple[list[np.ndarray], int]:
    """The time-major rows of each sequence to run in compiled code (rank ``j`` = the
    ``j``-th longest), and how many steps the batched loop then runs for the rest."""
    n_long = _n_long(layout)
    lengths = layout.lengths[layout.order]
    rows = [layout.c[: lengths[j]] + j for j in range(n_long)]
    return rows, (int(lengths[n_long]) if n_long < layout.n_sequences else 0)


def _one_sequence(B, rows, pi, A, alpha, scale, beta) -> None:
    """Scaled forward-backward of one sequence (rows ``rows`` of the time-major arrays) in
    hmmlearn's compiled code, written into ``alpha``, ``scale`` and ``beta`` with this
    module's conventions (hmmlearn's backward variable is ours times its scaling factor)."""
    frames = np.ascontiguousarray(B[rows])
    try:
        _, fwd, sf = _hmmc.forward_scaling(pi, A, frames)
    except ValueError:  # every path has zero probability at some step: find which, for the error
        a, s = pi, np.ones(len(rows))
        for i in range(len(rows)):
            a = (a if i == 0 else a @ A) * frames[i]
            s[i] = a.sum()
            if not s[i] > 0:
                break
            a = a / s[i]
        scale[rows] = s
        return
    alpha[rows] = fwd
    scale[rows] = 1.0 / sf
    beta[rows] = _hmmc.backward_scaling(pi, A, frames, sf) / sf[:, None]


def forward_backward(log_b_tm: np.ndarray, layout: Layout, startprob: np.ndarray, transmat: np.ndarray,
                     *, want_trans: bool = True) -> FBResult:
    """Scaled forward-backward over every sequence of a partition at once.

    Parameters
    ----------
    log_b_tm : ndarray of shape (n, K)
        Log emission densities, time-major rows.
    layout : Layout
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)

    Returns
    -------
    FBResult
    """
    A = np.asarray(transmat, dtype=np.float64)
    pi = np.asarray(startprob, dtype=np.float64)
    n_rows, K = log_b_tm.shape
    c, n = layout.c, layout.n
    mx = log_b_tm.max(axis=1)
    if not np.all(np.isfinite(mx)):
        bad = int(np.flatnonzero(~np.isfinite(mx))[0])
        raise FitFailedError(
            f"Step {int(layout.perm[bad])} of the partition has zero probability under every state "
            "(emission log-density -inf or NaN). Check the data, or the emission parameters you set."
        )
    B = np.exp(log_b_tm - mx[:, None])
    alpha = np.empty((n_rows, K))
    scale = np.empty(n_rows)
    beta = np.ones((n_rows, K))
    # The longest sequences (ranks 0..n_long-1 of every step's block) run one at a time in
    # hmmlearn's compiled recursions; the others run batched, one NumPy step per time index.
    long_rows, T_short = _split_long(layout)
    n_long = len(long_rows)
    for rows in long_rows:
        _one_sequence(B, rows, pi, A, alpha, scale, beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        if T_short:
            a = pi * B[n_long : n[0]]
            s = a.sum(axis=1)
            alpha[n_long : n[0]] = a / s[:, None]
            scale[n_long : n[0]] = s
        for t in range(1, T_short):
            lo, m = c[t] + n_long, n[t] - n_long
            a = alpha[c[t - 1] + n_long : c[t - 1] + n_long + m] @ A
            a *= B[lo : lo + m]
            s = a.sum(axis=1)
            alpha[lo : lo + m] = a / s[:, None]
            scale[lo : lo + m] = s
    if not np.all(scale > 0):
        bad = int(np.flatnonzero(~(scale > 0))[0])
        raise FitFailedError(
            f"Step {int(layout.perm[bad])} of the partition cannot be reached by any state path with "
            "non-zero probability (the forward variable vanished). Check startprob_/transmat_ zeros."
        )
    W = B / scale[:, None]  # b_t / c_t, reused for beta and xi
    for t in range(T_short - 2, -1, -1):
        m1 = n[t + 1] - n_long
        if m1 <= 0:
            continue
        lo1 = c[t + 1] + n_long
        beta[c[t] + n_long : c[t] + n_long + m1] = (W[lo1 : lo1 + m1] * beta[lo1 : lo1 + m1]) @ A.T
    gamma = alpha * beta
    gamma /= gamma.sum(axis=1, keepdims=True)
    logc = np.log(scale) + mx
    # per-sequence log-likelihood: sum of log c over the sequence's rows
    seq_of_row = layout.order[np.arange(n_rows) - np.repeat(c[:-1], n)]
    loglik = np.bincount(seq_of_row, weights=logc, minlength=layout.n_sequences)
    start = gamma[: n[0]].sum(axis=0)
    if want_trans and layout.T > 1:
        rows = slice(c[1], n_rows)
        trans = A * (alpha[layout.prev].T @ (W[rows] * beta[rows]))
    else:
        trans = np.zeros((K, K))
    return FBResult(loglik, gamma, start, trans)


def viterbi(log_b_tm: np.ndarray, layout: Layout, startprob: np.ndarray, transmat: np.ndarray):
    """Most likely state path of every sequence of a partition (vectorised across sequences).

    Parameters
    ----------
    log_b_tm : ndarray of shape (n, K)
        Log emission densities, time-major rows.
    layout : Layout
    startprob : ndarray of shape (K,)
    transmat : ndarray of shape (K, K)

    Returns
    -------
    logprob : ndarray of shape (S,)
        Log-probability of each sequence's best path (original sequence order).
    states : ndarray of shape (n,)
        State of each step, in the original (sequence-major) row order.
    """
    with np.errstate(divide="ignore"):
        log_pi = np.log(np.asarray(startprob, dtype=np.float64))
        log_A = np.log(np.asarray(transmat, dtype=np.float64))
    n_rows, K = log_b_tm.shape
    c, n = layout.c, layout.n
    states_tm = np.empty(n_rows, dtype=np.int64)
    logprob = np.empty(layout.n_sequences)
    # the longest sequences one at a time in hmmlearn's compiled Viterbi (as forward_backward)
    long_rows, T_short = _split_long(layout)
    n_long = len(long_rows)
    for j, rows in enumerate(long_rows):
        lp, path = _hmmc.viterbi(np.asarray(startprob, dtype=np.float64), np.asarray(transmat, dtype=np.float64),
                                 np.ascontiguousarray(log_b_tm[rows]))  # takes probabilities, logs them itself
        states_tm[rows] = path
        logprob[layout.order[j]] = lp
    # the others batched: block t holds ranks n_long .. n[t] - 1 at rows c[t] + n_long ...
    delta = np.empty((n_rows, K))
    back = np.zeros((n_rows, K), dtype=np.int32)
    delta[n_long : n[0]] = log_pi + log_b_tm[n_long : n[0]]
    for t in range(1, T_short):
        lo, m = c[t] + n_long, n[t] - n_long
        cand = delta[c[t - 1] + n_long : c[t - 1] + n_long + m, :, None] + log_A  # (m, K_from, K_to)
        arg = cand.argmax(axis=1)
        back[lo : lo + m] = arg
        delta[lo : lo + m] = np.take_along_axis(cand, arg[:, None, :], axis=1)[:, 0, :] + log_b_tm[lo : lo + m]
    cur = np.zeros(0, dtype=np.int64)
    for t in range(T_short - 1, -1, -1):
        lo, m = c[t] + n_long, n[t] - n_long
        m1 = n[t + 1] - n_long if t + 1 < T_short else 0
        if m1:
            cur = back[c[t + 1] + n_long + np.arange(m1), cur[:m1]].astype(np.int64)
        ending = delta[lo + m1 : lo + m]
        if len(ending):
            best = ending.argmax(axis=1)
            logprob[layout.order[n_long + m1 : n_long + m]] = ending[np.arange(len(best)), best]
            cur = np.concatenate([cur[:m1], best])
        states_tm[lo : lo + m] = cur
    return logprob, layout.to_original(states_tm)


# -- emissions -----------------------------------------------------------------------
def shift_of(params: GaussianHMMParams) -> np.ndarray:
    """The fixed shift ``g`` of shape (d,) Gaussian statistics are taken about."""
    return np.asarray(params.means, dtype=np.float64).mean(axis=0)


# hmmlearn's Gaussian log density retries a full (or tied) covariance whose Cholesky
# factorisation fails with ``Sigma + 1e-7 I`` (its ``_log_multivariate_normal_density_full``),
# and floors diagonal variances at the smallest positive double; the stored covariance is
# left as the M-step made it. Doing the same keeps near-degenerate fits going as hmmlearn's do.
FULL_COVAR_JITTER = 1e-7


def _precisions_cholesky(cov: np.ndarray, ct: str) -> np.ndarray:
    """Precision factors as hmmlearn's density sees the covariances (FitFailedError if even
    the jittered matrix is not positive definite, or a variance is not finite)."""
    msg = ("The covariance of the {what} is not positive definite, even with {jitter:g} added to its "
           "diagonal (a state collapsed onto too few distinct points). Use fewer states, a larger "
           "covars_prior, or scale the data.")
    if ct in ("full", "tied"):
        mats = cov[None] if ct == "tied" else cov
        out = np.empty_like(mats)
        for k, c in enumerate(mats):
            for jitter in (0.0, FULL_COVAR_JITTER):
                try:
                    out[k] = G._chol_upper_precision(c + jitter * np.eye(len(c)) if jitter else c)
                    break
                except (linalg.LinAlgError, ValueError):
                    continue
            else:
                raise FitFailedError(msg.format(what="tied states" if ct == "tied" else f"state {k}",
                                                jitter=FULL_COVAR_JITTER))
        return out[0] if ct == "tied" else out
    if not np.all(np.isfinite(cov)):
        k = int(np.flatnonzero(~np.all(np.reshape(np.isfinite(cov), (len(cov), -1)), axis=1))[0])
        raise FitFailedError(msg.format(what=f"state {k}", jitter=0.0))
    return 1.0 / np.sqrt(np.maximum(cov, np.finfo(np.float64).tiny))


def _gmm_view(params: GaussianHMMParams) -> G.GMMParams:
    ct = params.covariance_type
    cov = np.asarray(params.covars, dtype=np.float64)
    pc = _precisions_cholesky(cov, ct)
    K = len(params.startprob)
    return G.GMMParams(np.ones(K), np.asarray(params.means, dtype=np.float64), cov, pc, ct)


def gaussian_log_prob(X: np.ndarray, params: GaussianHMMParams, shift: np.ndarray | None = None) -> np.ndarray:
    """Log emission densities ``log N(x_t | mu_k, Sigma_k)``: ndarray of shape (n, K)."""
    g = shift_of(params) if shift is None else shift
    Xc = np.asarray(X, dtype=np.float64) - g
    return G.log_gaussian_density(Xc, np.asarray(params.means, dtype=np.float64) - g, _gmm_view(params))


def check_symbols(X: np.ndarray, n_symbols: int | None, where: str = "The sequences", row0: int = 0) -> np.ndarray:
    """Validate categorical observations; returns them as a 1-D int64 array."""
    X = np.asarray(X)
    if X.ndim == 2:
        if X.shape[1] != 1:
            raise DataError(f"{where} have shape {X.shape}; categorical observations must be (n_steps, 1).")
        X = X[:, 0]
    if X.dtype.kind not in "iu":
        if X.dtype.kind == "f" and np.all(np.abs(X) < 2.0**53) and np.all(X == np.round(X)):
            X = X.astype(np.int64)
        else:
            raise DataError(f"{where} have dtype {X.dtype}; categorical symbols must be integers 0..n_features-1.")
    X = X.astype(np.int64, copy=False)
    if X.size and X.min() < 0:
        i = int(np.flatnonzero(X < 0)[0])
        raise DataError(f"{where}: step {row0 + i} holds symbol {int(X[i])}; symbols must be >= 0.")
    if n_symbols is not None and X.size and X.max() >= n_symbols:
        i = int(np.flatnonzero(X >= n_symbols)[0])
        raise DataError(
            f"{where}: step {row0 + i} holds symbol {int(X[i])} but the model emits symbols "
            f"0..{n_symbols - 1}. Set n_features to at least {int(X.max()) + 1}."
        )
    return X


def categorical_log_prob(X: np.ndarray, params: CategoricalHMMParams) -> np.ndarray:
    """Log emission probabilities ``log B[k, x_t]``: ndarray of shape (n, K)."""
    E = np.asarray(params.emissionprob, dtype=np.float64)
    sym = check_symbols(X, E.shape[1])
    with np.errstate(divide="ignore"):
        return np.log(E[:, sym].T)


def frame_log_prob(X: np.ndarray, params) -> np.ndarray:
    """Log emission densities of each step under each state: ndarray of shape (n, K).

    The emission component is the one registered for ``type(params)``
    (:func:`emflow.models.hmm_emissions.emission_for`).
    """
    from .hmm_emissions import emission_for

    em = emission_for(params)
    return em.log_likelihood(em.observations(X, params), params)


# -- E-steps (Baum-Welch over an emission component: emflow.models.hmm_emissions) -----
def e_step_gaussian(values: np.ndarray, offsets: np.ndarray, params: GaussianHMMParams) -> GaussianHMMStats:
    """Baum-Welch E-step over one partition of whole sequences.

    Parameters
    ----------
    values : ndarray of shape (n, d)
    offsets : ndarray of shape (S + 1,)
        Partition-local offsets (``offsets[0] == 0``).
    params : GaussianHMMParams

    Returns
    -------
    GaussianHMMStats
        Moments about ``shift_of(params)``.
    """
    from .hmm_emissions import GaussianEmission, e_step

    return e_step(values, offsets, params, GaussianEmission.for_params(params))


def e_step_categorical(values: np.ndarray, offsets: np.ndarray, params: CategoricalHMMParams) -> CategoricalHMMStats:
    """Baum-Welch E-step over one partition of whole sequences (categorical emissions).

    Parameters
    ----------
    values : ndarray of shape (n, 1) or (n,), integers in ``0..M-1``
    offsets : ndarray of shape (S + 1,)
    params : CategoricalHMMParams
    """
    from .hmm_emissions import CategoricalEmission, e_step

    return e_step(values, offsets, params, CategoricalEmission())


# -- M-steps (hmmlearn's, from summed statistics) ------------------------------------
def _normalize_rows(a: np.ndarray) -> np.ndarray:
    s = a.sum(axis=-1, keepdims=True)
    if a.ndim > 1:
        s = np.where(s == 0, 1.0, s)
    return a / s


def m_step_transitions(stats, startprob, transmat, priors: TransitionPriors, params: str):
    """New ``startprob`` and ``transmat`` (hmmlearn ``BaseHMM._do_mstep``).

    Entries that are zero stay zero (left-right models); a row of ``transmat`` with no
    expected transitions out stays all zero and is reported.

    Returns ``(startprob, transmat, report)``.
    """
    sp = np.asarray(startprob, dtype=np.float64)
    tm = np.asarray(transmat, dtype=np.float64)
    report: dict = {}
    if "s" in params:
        new = np.maximum(np.asarray(priors.startprob_prior, dtype=np.float64) - 1 + stats.start, 0)
        new = np.where(sp == 0, 0, new)
        total = new.sum()
        if not total > 0:
            raise FitFailedError(
                "Every start state has zero expected count and zero prior mass; startprob cannot be "
                "re-estimated. Use startprob_prior > 1 or leave 's' out of params."
            )
        sp = new / total
    if "t" in params:
        new = np.maximum(np.asarray(priors.transmat_prior, dtype=np.float64) - 1 + stats.trans, 0)
        new = np.where(tm == 0, 0, new)
        tm = _normalize_rows(new)
        empty = [int(k) for k in np.flatnonzero(tm.sum(axis=1) == 0)]
        if empty:
            report["zero_transition_rows"] = empty
    return sp, tm, report


def m_step_gaussian(stats: GaussianHMMStats, params: GaussianHMMParams, priors: GaussianPriors,
                    trans_priors: TransitionPriors, learn: str) -> tuple[GaussianHMMParams, dict]:
    """M-step of a Gaussian HMM (hmmlearn ``GaussianHMM._do_mstep``), from moments about a shift.

    Parameters
    ----------
    stats : GaussianHMMStats
        Summed over partitions, all taken about ``shift_of(params)``.
    params : GaussianHMMParams
        Parameters the E-step ran with.
    priors, trans_priors
        Priors as hmmlearn broadcasts them (scalars, or arrays of its shapes).
    learn : str
        hmmlearn's ``params``: letters of the parameters to update ("s", "t", "m", "c").

    Returns
    -------
    params : GaussianHMMParams
    report : dict
        ``empty_states``: states with (numerically) zero posterior mass; those whose
        update is undefined (0/0 without a prior) keep their previous mean and
        covariance. ``log_prob``: total log-likelihood of the E-step.
        ``zero_transition_rows``.
    """
    require_finite(stats, "Gaussian HMM")
    ct = params.covariance_type
    g = shift_of(params)
    sp, tm, report = m_step_transitions(stats, params.startprob, params.transmat, trans_priors, learn)
    N = np.asarray(stats.post, dtype=np.float64)
    K, d = stats.s1.shape
    means_prior = np.asarray(priors.means_prior, dtype=np.float64)
    means_weight = np.asarray(priors.means_weight, dtype=np.float64)
    old_means = np.asarray(params.means, dtype=np.float64)
    old_cov = np.asarray(params.covars, dtype=np.float64)
    denom = N[:, None]
    kept: set[int] = set()
    if "m" in learn:
        # hmmlearn: (w mu0 + sum gamma x) / (w + N), with sum gamma x = s1 + N g
        with np.errstate(divide="ignore", invalid="ignore"):
            means = (means_weight * means_prior + (stats.s1 + N[:, None] * g)) / (means_weight + denom)
        bad = ~np.all(np.isfinite(means), axis=1)
        means[bad] = old_means[bad]
        kept.update(int(k) for k in np.flatnonzero(bad))
    else:
        means = old_means.copy()
    covars = old_cov.copy()
    if "c" in learn:
        covars_prior = np.asarray(priors.covars_prior, dtype=np.float64)
        covars_weight = np.asarray(priors.covars_weight, dtype=np.float64)
        meandiff = means - means_prior
        delta = means - g  # sum gamma (x - m)^2 = S2 - 2 delta s1 + N delta^2, no cancellation
        if ct in ("spherical", "diag"):
            c_n = means_weight * meandiff**2 + (stats.s2 - 2 * delta * stats.s1 + N[:, None] * delta**2)
            c_d = np.maximum(covars_weight - 1, 0) + denom
            cv = (covars_prior + c_n) / np.maximum(c_d, 1e-5)
            if ct == "spherical":
                cv = cv.mean(axis=1)
            covars = cv
        else:
            mw = means_weight[:, None, None] if means_weight.ndim == 1 else means_weight
            outer_s1 = delta[:, :, None] * stats.s1[:, None, :]
            centred = (stats.s2 - outer_s1 - outer_s1.transpose(0, 2, 1)
                       + N[:, None, None] * delta[:, :, None] * delta[:, None, :])
            c_n = mw * meandiff[:, :, None] * meandiff[:, None, :] + centred
            cvweight = np.maximum(covars_weight - d, 0)
            if ct == "tied":
                covars = (covars_prior + c_n.sum(axis=0)) / (cvweight + N.sum())
                covars = 0.5 * (covars + covars.T)
            else:
                cp = covars_prior[:, None, None] if covars_prior.ndim == 1 else covars_prior
                cw = cvweight[:, None, None] if cvweight.ndim == 1 else cvweight
                with np.errstate(divide="ignore", invalid="ignore"):
                    cv = (cp + c_n) / (cw + N[:, None, None])
                cv = 0.5 * (cv + cv.transpose(0, 2, 1))
                bad = ~np.all(np.isfinite(cv.reshape(K, -1)), axis=1)
                cv[bad] = old_cov[bad]
                kept.update(int(k) for k in np.flatnonzero(bad))
                covars = cv
    _check_covars(covars, ct)
    total = max(float(stats.n_steps), 1.0)
    report.update({
        "empty_states": [int(k) for k in np.flatnonzero(N <= 1e-12 * total)],
        "kept_states": sorted(kept),
        "log_prob": float(stats.loglik),
    })
    return GaussianHMMParams(sp, tm, means, covars, ct), report


def _check_covars(covars: np.ndarray, ct: str) -> None:
    _precisions_cholesky(np.asarray(covars, dtype=np.float64), ct)  # what the next E-step will need


def m_step_categorical(stats: CategoricalHMMStats, params: CategoricalHMMParams, emissionprob_prior,
                       trans_priors: TransitionPriors, learn: str) -> tuple[CategoricalHMMParams, dict]:
    """M-step of a categorical HMM (hmmlearn ``CategoricalHMM._do_mstep``)."""
    sp, tm, report = m_step_transitions(stats, params.startprob, params.transmat, trans_priors, learn)
    E = np.asarray(params.emissionprob, dtype=np.float64)
    if "e" in learn:
        new = np.maximum(np.asarray(emissionprob_prior, dtype=np.float64) - 1 + stats.obs, 0)
        empty = new.sum(axis=1) == 0
        new = _normalize_rows(new)
        new[empty] = E[empty]  # hmmlearn would leave an all-zero row: keep the old one
        E = new
        if np.any(empty):
            report["empty_states"] = [int(k) for k in np.flatnonzero(empty)]
    report["log_prob"] = float(stats.loglik)
    return CategoricalHMMParams(sp, tm, E), report


# -- utilities -----------------------------------------------------------------------
def full_covars(covars: np.ndarray, ct: str, K: int, d: int) -> np.ndarray:
    """Covariances as full matrices of shape (K, d, d) (hmmlearn's ``covars_``)."""
    covars = np.asarray(covars, dtype=np.float64)
    if ct == "full":
        return covars.copy()
    if ct == "diag":
        return np.stack([np.diag(c) for c in covars])
    if ct == "tied":
        return np.tile(covars, (K, 1, 1))
    return np.eye(d)[None] * np.ravel(covars)[:, None, None]


def n_free_parameters(K: int, d_or_m: int, kind: str, ct: str | None = None) -> int:
    """Number of free scalar parameters (for AIC/BIC)."""
    from .hmm_emissions import CategoricalEmission, GaussianEmission, n_free

    em = CategoricalEmission() if kind == "categorical" else GaussianEmission(covariance_type=ct)
    return n_free(K, d_or_m, em)


def sample_sequence(params, n_steps: int, rng: np.random.Generator, currstate: int | None = None):
    """Draw one sequence ``(X, states)``: X of shape (n_steps, d) (Gaussian: float, categorical:
    (n_steps, 1) ints), from the emission component registered for ``type(params)``."""
    from .hmm_emissions import emission_for, sample_states

    states = sample_states(params.startprob, params.transmat, n_steps, rng, currstate)
    return emission_for(params).sample_many(states, rng, params), states
