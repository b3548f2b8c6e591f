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

from ..errors import DataError, FitFailedError
from . import gmm as G
from ._compiled import compiled_kernel

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

from .hmm_mstep import (  # noqa: E402  (the types and M-steps, split out; used here and as H.<name>)
    COVARIANCE_TYPES,
    FULL_COVAR_JITTER,
    CategoricalHMMParams,
    CategoricalHMMStats,
    GaussianHMMParams,
    GaussianHMMStats,
    GaussianPriors,
    TransitionPriors,
    _precisions_cholesky,
    full_covars,
    m_step_categorical,
    m_step_gaussian,
    m_step_transitions,
    shift_of,
)


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


#: "auto": the compiled kernel (:mod:`emflow.models.hmm_kernel`) when numba imports, else
#: NumPy; "numpy": never the kernel; "numba": the kernel, an ImportError without numba.
KERNEL = "auto"


def _kernel():
    """The compiled kernel module, or ``None`` for the NumPy path."""
    return compiled_kernel(KERNEL, "hmm_kernel")


def _check_status(status: int) -> None:
    """The kernel's status as the NumPy path's errors (``status`` names a row of the partition)."""
    if status < 0:
        raise FitFailedError(
            f"Step {-status - 1} of the partition has zero probability under every state "
            "(emission log-density -inf or NaN). Check the data, or the emission parameters you set."
        )
    if status > 0:
        raise FitFailedError(
            f"Step {status - 1} of the partition cannot be reached by any state path with "
            "non-zero probability (the forward variable vanished). Check startprob_/transmat_ zeros."
        )


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
def e_step_gaussian(values: np.ndarray, offsets: np.ndarray, params: GaussianHMMParams,
                    compute_dtype: str = "float64") -> GaussianHMMStats:
    """Baum-Welch E-step over one partition of whole sequences.

    Parameters
    ----------
    values : ndarray of shape (n, d)
    offsets : ndarray of shape (S + 1,)
        Partition-local offsets (``offsets[0] == 0``).
    params : GaussianHMMParams
    compute_dtype : {"float64", "float32"}, default "float64"
        Precision of the emission log-densities; the recursions and the statistics are
        float64 either way.

    Returns
    -------
    GaussianHMMStats
        Moments about ``shift_of(params)``.
    """
    from .hmm_emissions import GaussianEmission, e_step

    em = GaussianEmission(covariance_type=params.covariance_type, compute_dtype=compute_dtype)
    kern = _kernel()
    if kern is None:
        return e_step(values, offsets, params, em)
    g = shift_of(params)
    ct = params.covariance_type
    pc = _precisions_cholesky(np.asarray(params.covars, dtype=np.float64), ct)
    Xc = em.observations(values, params) - g
    status, ll, start, trans, post, s1, s2 = kern.gaussian_e_step(
        Xc, offsets, params.startprob, params.transmat, np.asarray(params.means, dtype=np.float64) - g, pc, ct,
        np.dtype(compute_dtype))
    _check_status(status)
    one = np.asarray
    return GaussianHMMStats(start, trans, post, s1, s2, one(float(ll.sum())), one(float(len(ll))),
                            one(float(len(Xc))))


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
