"""Latent Dirichlet allocation by batch variational EM: pure NumPy/SciPy math.

The arithmetic follows scikit-learn's ``LatentDirichletAllocation(learning_method="batch")``
(``sklearn/decomposition/_lda.py`` and ``_online_lda_fast.pyx``) step for step, including
its fast digamma (:func:`psi`), its ``eps`` in the word normaliser and its per-document
stopping rule, so that the two agree to rounding when started from the same topics.
The per-document loop is vectorised over a block of documents: each document's numbers
are computed exactly as in the loop (operations are row-wise), so the answer does not
depend on which documents share a block or a partition.

A partition of a corpus is ``(entries, indptr)``: ``entries`` a structured array of the
partition's non-zeros with fields ``term`` (int) and ``count`` (float), ``indptr`` of shape
(n_docs + 1,) with ``indptr[0] == 0`` (see :mod:`emflow.storage.corpus`).

Notation: K topics, V terms, ``lambda`` = ``components_`` (K, V), ``gamma`` the document-topic
variational parameters (n_docs, K), ``alpha`` = ``doc_topic_prior``, ``eta`` =
``topic_word_prior``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln, logsumexp

from ._compiled import compiled_kernel
from .lda_prior import update_doc_topic_prior, update_topic_word_prior

__all__ = [
    "LDAParams", "LDAStats", "psi", "dirichlet_expectation_2d", "make_params", "init_components",
    "doc_topic_init", "e_step", "m_step", "topic_bound", "bound", "transform", "update_doc_topic_prior",
    "update_topic_word_prior", "LDAFamily", "PerplexityStop", "perplexity",
]

EPS = np.finfo(np.float64).eps
EULER = 0.577215664901532860606512090082402431
# documents are processed in blocks holding at most this many (non-zero x topic) cells
BLOCK_CELLS = 1 << 21
# random document initialisations are drawn per aligned block of this many documents
INIT_BLOCK = 1024
COMPUTE_DTYPES = ("float64", "float32")

#: "auto": the compiled kernel (:mod:`emflow.models.lda_kernel`) when numba imports, else
#: NumPy; "numpy": never the kernel; "numba": the kernel, an ImportError without numba.
KERNEL = "auto"


def _kernel():
    """The compiled kernel module, or ``None`` for the NumPy path."""
    return compiled_kernel(KERNEL, "lda_kernel")


class LDAParams(NamedTuple):
    """Topic-word variational parameters and their Dirichlet expectations.

    components : ndarray of shape (K, V), ``lambda``
    elog_beta : ndarray of shape (K, V), ``E[log beta]`` under ``Dir(lambda)``
    exp_elog_beta : ndarray of shape (K, V), ``exp(E[log beta])``
    doc_topic_prior : ndarray of shape (K,) or None
        The document-topic prior ``alpha`` when it is estimated (an asymmetric Dirichlet);
        None when it is the fixed, symmetric prior of the configuration.
    topic_word_prior : ndarray of shape () or (V,), or None
        The topic-word prior ``eta`` when it is estimated (symmetric: one value, shape ();
        asymmetric: one per term); None when it is the fixed prior of the configuration.
    """

    components: np.ndarray
    elog_beta: np.ndarray
    exp_elog_beta: np.ndarray
    doc_topic_prior: np.ndarray | None = None
    topic_word_prior: np.ndarray | None = None


class LDAStats(NamedTuple):
    """Additive statistics of one pass (all float64).

    sstats : ndarray of shape (K, V)
        ``sum_d outer(exp(E[log theta_d]), counts_d / phinorm_d)`` scattered on the terms;
        the expected topic-word counts are ``sstats * exp_elog_beta`` (done in the M-step,
        as scikit-learn does after summing its workers' statistics).
    word_bound : ndarray of shape ()
        ``sum_d sum_w n_dw log sum_k exp(E[log theta_dk] + E[log beta_kw])``.
    doc_bound : ndarray of shape ()
        ``sum_d E[log p(theta_d | alpha) - log q(theta_d | gamma_d)]``.
    n_words : ndarray of shape ()
        Total count of the documents.
    n_docs : ndarray of shape ()
    elog_theta_sum : ndarray of shape (K,)
        ``sum_d E[log theta_d]``: the statistic of the document-topic prior's update.
    """

    sstats: np.ndarray
    word_bound: np.ndarray
    doc_bound: np.ndarray
    n_words: np.ndarray
    n_docs: np.ndarray
    elog_theta_sum: np.ndarray


def psi(x) -> np.ndarray:
    """Digamma for positive arguments, exactly as scikit-learn's LDA computes it.

    Algorithm AS 103 (Bernardo 1976): recurrence up to 6, then the asymptotic series.
    scikit-learn uses this approximation (absolute error about 1e-8) everywhere in its
    LDA, so using it here is what makes the two agree to rounding.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    out = np.zeros_like(x)
    small = x <= 1e-6
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(6):  # x > 1e-6 reaches 6 after at most 6 steps
            m = (x < 6) & ~small
            if not m.any():
                break
            out -= np.where(m, 1.0 / x, 0.0)
            x += m
        r = 1.0 / x
        out += np.log(x) - 0.5 * r
        r = r * r
        out -= r * ((1.0 / 12.0) - r * ((1.0 / 120.0) - r * (1.0 / 252.0)))
        if small.any():
            out[small] = -EULER - 1.0 / x[small]
    return out


def dirichlet_expectation_2d(arr: np.ndarray) -> np.ndarray:
    """``E[log X]`` for each row ``X ~ Dir(arr[i])``: psi(arr) - psi(row sums), shape of ``arr``."""
    arr = np.asarray(arr, dtype=np.float64)
    return psi(arr) - psi(arr.sum(axis=1))[:, None]


def make_params(components: np.ndarray, doc_topic_prior: np.ndarray | None = None,
                topic_word_prior: np.ndarray | None = None) -> LDAParams:
    """:class:`LDAParams` of ``lambda`` (and the estimated priors, if any)."""
    lam = np.ascontiguousarray(components, dtype=np.float64)
    elog = dirichlet_expectation_2d(lam)
    alpha = None if doc_topic_prior is None else np.array(doc_topic_prior, dtype=np.float64).reshape(lam.shape[0])
    eta = None
    if topic_word_prior is not None:
        eta = np.array(topic_word_prior, dtype=np.float64)
        eta = eta if eta.ndim == 0 else eta.reshape(lam.shape[1])
    return LDAParams(lam, elog, np.exp(elog), alpha, eta)


def init_components(n_components: int, n_terms: int, random_state) -> np.ndarray:
    """``lambda`` drawn as scikit-learn draws it: ``RandomState(seed).gamma(100, 0.01, (K, V))``.

    ``random_state`` is an int, ``None`` or a ``numpy.random.RandomState``; an int gives the
    same starting topics as ``sklearn LatentDirichletAllocation(random_state=int)``.
    """
    if isinstance(random_state, np.random.RandomState):
        rs = random_state
    else:
        rs = np.random.RandomState(random_state)
    return rs.gamma(100.0, 0.01, (n_components, n_terms))


def doc_topic_init(n_docs: int, n_components: int, doc_start: int, seed) -> np.ndarray:
    """Initial ``gamma`` for documents ``doc_start .. doc_start + n_docs``, of shape (n_docs, K).

    ``seed is None`` gives ones (scikit-learn's ``transform``); otherwise Gamma(100, 0.01)
    draws (scikit-learn's training E-step) that depend only on the seed (an int or a tuple
    of ints, e.g. ``(seed, iteration)``) and the global document index, never on the
    partitioning.
    """
    if seed is None:
        return np.ones((n_docs, n_components))
    out = np.empty((n_docs, n_components))
    if n_docs == 0:
        return out
    b0, b1 = doc_start // INIT_BLOCK, (doc_start + n_docs - 1) // INIT_BLOCK
    for b in range(b0, b1 + 1):
        g = np.random.default_rng([*np.atleast_1d(seed).tolist(), b]).gamma(100.0, 0.01, (INIT_BLOCK, n_components))
        lo, hi = max(doc_start, b * INIT_BLOCK), min(doc_start + n_docs, (b + 1) * INIT_BLOCK)
        out[lo - doc_start : hi - doc_start] = g[lo - b * INIT_BLOCK : hi - b * INIT_BLOCK]
    return out


def _blocks(indptr: np.ndarray, K: int):
    """Document ranges whose (non-zeros x K) stay under BLOCK_CELLS (at least one document each)."""
    n = len(indptr) - 1
    cap = max(1, BLOCK_CELLS // max(1, K))
    a = 0
    while a < n:
        b = int(np.searchsorted(indptr, indptr[a] + cap, side="right")) - 1
        b = min(n, max(b, a + 1))
        yield a, b
        a = b


def _fit_block(ids, cnts, indptr, gamma, exp_elog_beta, alpha, max_iter, tol, dtype=np.float64):
    """Iterate the documents of one block to convergence, as scikit-learn's per-document loop.

    ``gamma`` (n, K) is the initial value and is overwritten. Returns
    ``(gamma, exp_elog_theta, W)`` with ``W = exp_elog_beta[:, ids].T`` of shape (nnz, K).

    Every step is a pass over the block's (non-zeros x K) cells: a gather and a row-wise dot
    for ``norm_phi``, then one sparse-times-dense product that scales each document's rows
    of ``W`` by ``cnts / norm_phi`` and sums them. A document stops changing once it has
    converged; the arrays are compacted only when half the documents they hold have
    converged, so copying stays proportional to the work. With ``dtype`` float32 the
    tables ``W`` and ``exp(E[log theta])`` are float32 and so are the K-term dot products of
    ``norm_phi``; every other sum is float64.
    """
    n, K = gamma.shape
    exp_elog_theta = np.exp(dirichlet_expectation_2d(gamma)).astype(dtype, copy=False)
    W = np.ascontiguousarray(exp_elog_beta[:, ids].T, dtype=dtype)
    lens = np.diff(indptr)
    held = np.arange(n)  # documents in the compacted arrays
    live = np.ones(n, dtype=bool)  # which of those are still iterating
    a_W, a_cnts, a_ptr = W, cnts, indptr
    a_doc = np.repeat(np.arange(n), lens)
    for _ in range(max_iter):
        if not live.any():
            break
        E = exp_elog_theta[held]
        norm_phi = np.einsum("ek,ek->e", np.take(E, a_doc, axis=0), a_W).astype(np.float64, copy=False)
        norm_phi += EPS
        S = sp.csr_matrix((a_cnts / norm_phi, np.arange(len(a_cnts)), a_ptr), shape=(held.size, len(a_cnts)))
        new = (E * (S @ a_W))[live]
        new += alpha
        idx = held[live]
        last = gamma[idx]
        gamma[idx] = new
        exp_elog_theta[idx] = np.exp(psi(new) - psi(new.sum(axis=1))[:, None])
        done = np.abs(last - new).mean(axis=1) < tol
        live[np.flatnonzero(live)[done]] = False
        if 0 < 2 * np.count_nonzero(live) <= held.size:
            emask = np.repeat(live, np.diff(a_ptr))
            held = held[live]
            a_W, a_cnts = a_W[emask], a_cnts[emask]
            a_ptr = np.concatenate([[0], np.cumsum(lens[held])])
            a_doc = np.repeat(np.arange(held.size), lens[held])
            live = np.ones(held.size, dtype=bool)
    return gamma, exp_elog_theta, W


def _doc_bound(gamma: np.ndarray, elog_theta: np.ndarray, alpha) -> float:
    """``sum_d E[log p(theta_d | alpha) - log q(theta_d | gamma_d)]`` (scikit-learn's _loglikelihood).

    ``alpha`` is a float (symmetric prior, computed exactly as scikit-learn does) or an
    array of shape (K,) (asymmetric).
    """
    K = gamma.shape[1]
    if np.ndim(alpha):
        alpha = np.asarray(alpha, dtype=np.float64)
        n = gamma.shape[0]
        score = np.sum((alpha - gamma) * elog_theta)
        score += np.sum(gammaln(gamma)) - n * np.sum(gammaln(alpha))
        score += n * gammaln(alpha.sum()) - np.sum(gammaln(np.sum(gamma, 1)))
        return float(score)
    score = np.sum((alpha - gamma) * elog_theta)
    score += np.sum(gammaln(gamma) - gammaln(alpha))
    score += np.sum(gammaln(alpha * K) - gammaln(np.sum(gamma, 1)))
    return float(score)


def _word_bound(ids, cnts, indptr, elog_theta, elog_beta) -> float:
    n = len(indptr) - 1
    doc = np.repeat(np.arange(n), np.diff(indptr))
    temp = elog_theta[doc] + elog_beta[:, ids].T  # (nnz, K)
    return float(np.dot(cnts, logsumexp(temp, axis=1)))


def _compute_dtype(compute_dtype) -> type:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be 'float64' or 'float32', got {compute_dtype!r}.")
    return np.dtype(compute_dtype).type


def _split(entries, indptr):
    ids = np.asarray(entries["term"], dtype=np.intp)
    cnts = np.asarray(entries["count"], dtype=np.float64)
    return ids, cnts, np.asarray(indptr, dtype=np.int64)


def e_step(entries, indptr, params: LDAParams, alpha: float | np.ndarray, max_doc_update_iter: int,
           mean_change_tol: float, seed: int | None, doc_start: int, *, stats: bool = True,
           want_gamma: bool = False, compute_dtype: str = "float64"):
    """E-step over one partition: per-document variational fit, statistics and bound terms.

    Parameters
    ----------
    entries : structured ndarray of shape (nnz,) with fields ``term``, ``count``
    indptr : ndarray of shape (n_docs + 1,), partition-local
    params : LDAParams
    alpha : float or ndarray of shape (K,)
        ``doc_topic_prior`` (an array once it is estimated).
    max_doc_update_iter : int
    mean_change_tol : float
    seed : int, tuple of ints or None
        Seed of the random ``gamma`` initialisation (None: ones).
    doc_start : int
        Global index of the partition's first document.
    stats : bool
        Compute the statistics (otherwise only ``gamma``).
    want_gamma : bool
        Also return ``gamma`` of shape (n_docs, K).
    compute_dtype : {"float64", "float32"}
        Dtype of the topic-word table and of the K-term products of ``norm_phi``; every
        sum over terms and documents, ``gamma`` and the statistics stay float64.

    Returns
    -------
    LDAStats, or ``gamma``, or ``(LDAStats, gamma)``.
    """
    ids, cnts, indptr = _split(entries, indptr)
    n = len(indptr) - 1
    K, V = params.components.shape
    gamma_all = doc_topic_init(n, K, doc_start, seed)
    dtype = _compute_dtype(compute_dtype)
    kern = _kernel()
    if kern is not None:
        out = kern.e_step(ids, cnts, indptr, gamma_all, params.exp_elog_beta, params.elog_beta, alpha,
                          max_doc_update_iter, mean_change_tol, stats, dtype)
        if not stats:
            return gamma_all
        elog_theta = dirichlet_expectation_2d(gamma_all)
        st = LDAStats(out[0], np.float64(out[1]), np.float64(_doc_bound(gamma_all, elog_theta, alpha)),
                      np.float64(cnts.sum()), np.float64(n), elog_theta.sum(axis=0))
        return (st, gamma_all) if want_gamma else st
    sstats = np.zeros((K, V)) if stats else None
    word_bound = doc_bound = 0.0
    elog_theta_sum = np.zeros(K)
    for a, b in _blocks(indptr, K):
        lo, hi = int(indptr[a]), int(indptr[b])
        b_ids, b_cnts, b_ptr = ids[lo:hi], cnts[lo:hi], indptr[a : b + 1] - lo
        gamma, exp_elog_theta, W = _fit_block(
            b_ids, b_cnts, b_ptr, gamma_all[a:b], params.exp_elog_beta, alpha, max_doc_update_iter, mean_change_tol,
            dtype,
        )
        gamma_all[a:b] = gamma
        if not stats:
            continue
        nb = b - a
        doc = np.repeat(np.arange(nb), np.diff(b_ptr))
        norm_phi = np.einsum("ek,ek->e", exp_elog_theta[doc], W).astype(np.float64, copy=False) + EPS
        # sstats[:, ids_d] += outer(exp_elog_theta_d, cnts_d / norm_phi_d), for every document
        B = sp.csr_matrix((b_cnts / norm_phi, (b_ids, doc)), shape=(V, nb))
        sstats += np.asarray(B @ exp_elog_theta).T
        elog_theta = dirichlet_expectation_2d(gamma)
        word_bound += _word_bound(b_ids, b_cnts, b_ptr, elog_theta, params.elog_beta)
        doc_bound += _doc_bound(gamma, elog_theta, alpha)
        elog_theta_sum += elog_theta.sum(axis=0)
    if not stats:
        return gamma_all
    st = LDAStats(
        sstats, np.float64(word_bound), np.float64(doc_bound), np.float64(cnts.sum()), np.float64(n), elog_theta_sum,
    )
    return (st, gamma_all) if want_gamma else st


def topic_bound(params: LDAParams, eta) -> float:
    """``E[log p(beta | eta) - log q(beta | lambda)]``, summed over topics (``eta``: a float,
    or an array of shape (V,) for an asymmetric prior)."""
    V = params.components.shape[1]
    return _doc_bound(params.components, params.elog_beta, eta) if V else 0.0


def bound(stats: LDAStats, params: LDAParams, eta) -> float:
    """The variational bound (scikit-learn's ``score``) of ``params`` on the pass's documents."""
    return float(stats.word_bound) + float(stats.doc_bound) + topic_bound(params, eta)


def m_step(stats: LDAStats, params: LDAParams, eta, alpha=None, learn_eta: str | None = None
           ) -> tuple[LDAParams, dict]:
    """Batch update ``lambda = eta + sstats * exp(E[log beta])`` (old beta).

    With ``alpha`` (the document-topic prior the E-step used: a float or an array of shape
    (K,)), the prior is estimated too (:func:`update_doc_topic_prior`) and returned in the
    new parameters' ``doc_topic_prior``; otherwise the prior stays the configured one.
    With ``learn_eta`` ("symmetric" or "asymmetric"), ``eta`` is then estimated for the new
    ``lambda`` (:func:`update_topic_word_prior`) and returned in ``topic_word_prior``.
    """
    lam = eta + stats.sstats * params.exp_elog_beta
    report = {"n_words": float(stats.n_words), "n_docs": float(stats.n_docs)}
    new_alpha = None
    if alpha is not None:
        new_alpha, steps = update_doc_topic_prior(alpha, stats.elog_theta_sum, float(stats.n_docs))
        report["doc_topic_prior_newton_steps"] = steps
    return with_topic_word_prior(make_params(lam, new_alpha), eta, learn_eta, report), report


def with_topic_word_prior(params: LDAParams, eta, learn_eta: str | None, report: dict | None = None) -> LDAParams:
    """``params`` with ``eta`` estimated for its ``lambda`` (from ``eta``); unchanged when
    ``learn_eta`` is None. Records the Newton steps in ``report``."""
    if learn_eta is None:
        return params
    new_eta, steps = update_topic_word_prior(eta, params.elog_beta, learn_eta)
    if report is not None:
        report["topic_word_prior_newton_steps"] = steps
    return params._replace(topic_word_prior=new_eta)


def transform(entries, indptr, params: LDAParams, alpha: float | np.ndarray, max_doc_update_iter: int,
              mean_change_tol: float, normalize: bool = True, compute_dtype: str = "float64") -> np.ndarray:
    """Document-topic distribution of a partition, of shape (n_docs, K) (ones initialisation)."""
    gamma = e_step(entries, indptr, params, alpha, max_doc_update_iter, mean_change_tol, None, 0, stats=False,
                   compute_dtype=compute_dtype)
    if normalize:
        gamma /= gamma.sum(axis=1)[:, None]
    return gamma


def perplexity(per_word: float) -> float:
    """``exp(-bound per word)``; inf where that overflows (a bound per word below about -709)."""
    return math.exp(-per_word) if -per_word < 709.0 else math.inf


@dataclass(frozen=True)
class LDAFamily:
    """Batch variational LDA as an EM family (for :func:`emflow.em.run_em`).

    Takes the E-step context: the training E-step starts each document at Gamma(100, 0.01)
    draws keyed by ``(*context.seed, context.iteration)`` and the document's global index
    (``context.start + i``), so the same for any partitioning; ``random_doc_init=False``
    starts every document at ones. The objective is the bound per word of the parameters
    the E-step ran with (its topic-prior term depends on the parameters only).

    Attributes
    ----------
    doc_topic_prior : float
        ``alpha`` while it is fixed; the start of its estimation with ``learn_doc_topic_prior``
        (the estimate then travels in the parameters' ``doc_topic_prior``).
    topic_word_prior : float
        ``eta``.
    max_doc_update_iter, mean_change_tol
        The per-document E-step's limits.
    random_doc_init : bool
    learn_doc_topic_prior : bool
    learn_topic_word_prior : {None, "symmetric", "asymmetric"}
        Estimate ``eta`` after each update of ``lambda`` (its estimate travels in the
        parameters' ``topic_word_prior``, starting from ``topic_word_prior``).
    compute_dtype : {"float64", "float32"}
        Of the E-step's K-term products (see :func:`e_step`).
    """

    doc_topic_prior: float
    topic_word_prior: float
    max_doc_update_iter: int
    mean_change_tol: float
    random_doc_init: bool = True
    learn_doc_topic_prior: bool = False
    learn_topic_word_prior: str | None = None
    compute_dtype: str = "float64"
    takes_context = True

    def prior(self, params: LDAParams):
        return self.doc_topic_prior if params.doc_topic_prior is None else params.doc_topic_prior

    def eta(self, params: LDAParams):
        """The topic-word prior of ``params``: the estimate they carry, else the configured one."""
        return self.topic_word_prior if params.topic_word_prior is None else params.topic_word_prior

    def e_step(self, entries, indptr, params: LDAParams, context) -> LDAStats:
        seed = (*np.atleast_1d(context.seed).tolist(), context.iteration) if self.random_doc_init else None
        return e_step(entries, indptr, params, self.prior(params), self.max_doc_update_iter,
                      self.mean_change_tol, seed, context.start, compute_dtype=self.compute_dtype)

    def objective(self, stats: LDAStats, params: LDAParams) -> float:
        n = float(stats.n_words)
        return bound(stats, params, self.eta(params)) / n if n > 0 else math.nan

    def m_step(self, stats: LDAStats, params: LDAParams):
        per_word = self.objective(stats, params)
        alpha = self.prior(params) if self.learn_doc_topic_prior else None
        new, report = m_step(stats, params, self.eta(params), alpha, self.learn_topic_word_prior)
        return new, {**report, "perplexity": perplexity(per_word)}


@dataclass(frozen=True)
class PerplexityStop:
    """scikit-learn's LDA stop rule: every ``evaluate_every`` iterations, stop when the
    perplexity changed by less than ``perp_tol`` since the previous evaluation
    (``evaluate_every <= 0``: never). ``history`` holds bounds per word."""

    evaluate_every: int
    perp_tol: float

    def evaluated(self, n: int) -> bool:
        """Whether iteration ``n`` (1-based) is one where the perplexity is checked."""
        return self.evaluate_every > 0 and n % self.evaluate_every == 0

    def __call__(self, history) -> bool:
        n, e = len(history), self.evaluate_every
        if not self.evaluated(n) or n < 2 * e:
            return False
        return abs(perplexity(history[n - 1 - e]) - perplexity(history[n - 1])) < self.perp_tol
