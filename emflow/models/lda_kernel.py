"""Compiled LDA E-step (numba) over the CSR rows of a partition.

One document after another, every inner iteration in compiled code: no Python per document
or per iteration, no ``(nnz, K)`` temporaries, no compaction of converged documents. The
arithmetic is the NumPy path's (:func:`emflow.models.lda._fit_block`, scikit-learn's
``_update_doc_distribution``) step for step: per inner iteration of a document with ``n``
distinct terms, ``n K`` multiply-adds for ``norm_phi``, ``n K`` for the back-projection,
``K`` digammas and ``K`` exponentials; the statistics add ``2 n K`` more. The two paths
agree to rounding (tests: 1e-12).

The topic-word table is read as ``Wt = exp(E[log beta]).T`` of shape (V, K), so a term's K
values are contiguous; a document's rows are gathered once into contiguous (n, K) and
(K, n) buffers that its inner iterations reuse, and the statistics are scattered into
``sstats_t`` of shape (V, K). Every inner loop vectorises without reassociation (no
``fastmath`` on any sum; the numba error model is NumPy's, so a division is not a branch):
the terms and the topics are padded to multiples of :data:`LANES` with zeros that add exact
zeros, the sums keep eight steps in a register, and ``exp(E[log theta])`` is computed
branch-free over the padded topics (digamma's recurrence unrolled as selects, one
division, an exponential by range reduction and a polynomial, fused multiply-adds), equal
to the NumPy path's to a few ulp of ``psi``'s size.

The word bound uses ``log sum_k exp(E[log theta_dk]) exp(E[log beta_kw])`` (the dot already
computed for ``norm_phi``), with the log-sum-exp of the logarithms where that product
underflows. With a float32 ``Wt`` (``compute_dtype="float32"``) the K-term products run in
float32; every sum over a document's terms, over documents and every ``gamma`` is float64.

This module imports numba; :mod:`emflow.models.lda` imports it lazily and uses the NumPy
path when numba is missing.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = ["fit_docs", "e_step"]

_jit = numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
# fused multiply-adds only (one rounding instead of two; no reassociation), for the elementwise
# digamma and exponential
_jit_fma = numba.njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")

EPS = float(np.finfo(np.float64).eps)
EULER = 0.577215664901532860606512090082402431
# below this dot product the word bound is taken as a log-sum-exp of the logarithms
TINY = 1e-280
# exp by range reduction: v = n ln2 + r, |r| <= ln2 / 2 (fdlibm's split of ln2: n * LN2_HI is exact)
LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
MAGIC = 6755399441055744.0  # 1.5 * 2**52: adding it rounds to an integer held in the low mantissa bits
EXP_LO = -708.0  # below, exp is subnormal or 0 and is returned as 0 (absolute error < 3e-308)
EXP_HI = 709.0
LANES = 8  # float64 lanes of the widest vectors (AVX-512); K and the terms are padded to a multiple


@intrinsic
def _bits(typingctx, x):
    """The int64 with the bits of a float64 (a bitcast, so loops using it still vectorise)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _from_bits(typingctx, x):
    """The float64 with the bits of an int64."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@_jit_fma
def _exp(v):
    """``exp(v)`` within ~1 ulp of libm's, with no call and no branch, so that a loop over a
    vector of arguments vectorises (this numba has no vector math library): ``2**n exp(r)``
    with ``exp(r)`` its Taylor polynomial of degree 13 (truncation 4e-18 relative at
    ``|r| <= ln2 / 2``) and ``2**n`` built from its bits."""
    u = min(max(v, EXP_LO), EXP_HI)
    kf = u * LOG2E + MAGIC
    n = kf - MAGIC
    r = (u - n * LN2_HI) - n * LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    scale = _from_bits((_bits(kf) + 1023) << 52)
    return p * scale if v >= EXP_LO else 0.0


@_jit
def _psi(x):
    """:func:`emflow.models.lda.psi` for one positive value (the same operations, in order)."""
    if x <= 1e-6:
        return -EULER - 1.0 / x
    out = 0.0
    for _ in range(6):
        if x >= 6.0:
            break
        out -= 1.0 / x
        x += 1.0
    r = 1.0 / x
    out += math.log(x) - 0.5 * r
    r = r * r
    out -= r * ((1.0 / 12.0) - r * ((1.0 / 120.0) - r * (1.0 / 252.0)))
    return out


@_jit
def _exp_elog_theta_vec(g, E, gp, Ep):
    """``E = exp(psi(g) - psi(sum g))`` as ``y_k exp(t_k - psi(sum g))`` with ``psi(g_k) =
    log(y_k) + t_k`` (``y_k`` is ``g_k`` shifted to at least 6 by the recurrence, whose
    ``-sum 1 / (g_k + i)`` is summed as one fraction): no logarithm, and with the six steps
    unrolled as selects, one division and :func:`_exp`, no branch and no call, so the loop
    over topics vectorises. ``gp`` and ``Ep`` are buffers of ``K`` padded to a multiple of
    :data:`LANES` (the pad of ``gp`` holds ones), so no topic runs in a scalar remainder
    loop. Equal to :func:`_exp_elog_theta` to a few ulp of ``psi``'s size."""
    K = g.shape[0]
    for k in range(K):
        gp[k] = g[k]
    _psi_exp_lanes(gp, Ep, _psi_of_sum(g))
    for k in range(K):
        E[k] = Ep[k]


@_jit_fma
def _psi_exp_lanes(g, E, ps):
    """``E = exp(psi(g) - ps)`` for every entry of ``g``."""
    for k in range(g.shape[0]):
        x0 = g[k]
        x = x0
        num = 0.0
        den = 1.0
        for _ in range(6):  # a constant count: unrolled by the compiler, the ifs become selects
            m = x < 6.0
            num = num * x + den if m else num
            den = den * x if m else den
            x = x + 1.0 if m else x
        # one division for 1 / x and num / den: q = 1 / (x den); for x0 <= 1e-6, q = 1 / x0
        # rounded once, as psi takes it (it cancels against psi(sum g) when all of g is tiny)
        small = x0 <= 1e-6
        num = 1.0 if small else num
        den = x0 if small else den
        xs = 1.0 if small else x
        q = 1.0 / (xs * den)
        r = q * den
        f = (num * xs) * q
        t = -0.5 * r
        r = r * r
        t -= r * ((1.0 / 12.0) - r * ((1.0 / 120.0) - r * (1.0 / 252.0)))
        t = -EULER - f if small else t - f
        y = 1.0 if small else x
        E[k] = y * _exp(t - ps)


@_jit
def _psi_of_sum(g):
    s = 0.0
    for k in range(g.shape[0]):
        s += g[k]
    return _psi(s)


@_jit
def _exp_elog_theta(g, E, L):
    """``L = psi(g) - psi(sum g)`` and ``E = exp(L)`` (E in its own dtype)."""
    ps = _psi_of_sum(g)
    for k in range(g.shape[0]):
        v = _psi(g[k]) - ps
        L[k] = v
        E[k] = math.exp(v)


@_jit
def _gather(ids, cnts, lo, hi, Wt, Wd, WdT, cp):
    """A document's rows of ``Wt`` into ``Wd`` (n, Kp) and ``WdT`` (K, n_p), contiguous, and
    its counts into ``cp``; the terms from ``n`` up to ``n_p`` (``n`` rounded up to a multiple
    of :data:`LANES`) are zeros, and so are the columns of ``Wd`` from ``K`` (never written)."""
    K = Wt.shape[1]
    n = hi - lo
    for j in range(n):
        w = ids[lo + j]
        cp[j] = cnts[lo + j]
        for k in range(K):
            v = Wt[w, k]
            Wd[j, k] = v
            WdT[k, j] = v
    n_p = -(-n // LANES) * LANES
    for j in range(n, n_p):
        cp[j] = 0.0
        for k in range(K):
            Wd[j, k] = 0.0
            WdT[k, j] = 0.0
    return n_p


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")  # inlined: measured faster
def _norms(n, WdT, E, norm):
    """``norm[j] = E . WdT[:, j]`` for ``j < n``, summed in order over the topics, eight
    topics per pass over the terms (``E`` and the rows of ``WdT`` padded to a multiple of
    :data:`LANES` with zeros)."""
    Kp = E.shape[0]
    for j in range(n):
        s = E[0] * WdT[0, j]
        s += E[1] * WdT[1, j]
        s += E[2] * WdT[2, j]
        s += E[3] * WdT[3, j]
        s += E[4] * WdT[4, j]
        s += E[5] * WdT[5, j]
        s += E[6] * WdT[6, j]
        s += E[7] * WdT[7, j]
        norm[j] = s
    for kb in range(LANES, Kp, LANES):
        e0 = E[kb]
        e1 = E[kb + 1]
        e2 = E[kb + 2]
        e3 = E[kb + 3]
        e4 = E[kb + 4]
        e5 = E[kb + 5]
        e6 = E[kb + 6]
        e7 = E[kb + 7]
        for j in range(n):
            s = norm[j]
            s += e0 * WdT[kb, j]
            s += e1 * WdT[kb + 1, j]
            s += e2 * WdT[kb + 2, j]
            s += e3 * WdT[kb + 3, j]
            s += e4 * WdT[kb + 4, j]
            s += e5 * WdT[kb + 5, j]
            s += e6 * WdT[kb + 6, j]
            s += e7 * WdT[kb + 7, j]
            norm[j] = s


@_jit
def _project(c, n, Wd, WdT, E, norm, ratio, acc):
    """``acc = sum_j (c_j / norm_phi_j) Wd[j]``, ``norm_phi_j = E . Wd[j] + EPS``, over the
    document's ``n`` terms, each sum in the NumPy path's order (each dot in order over k,
    ``acc`` in order over j), so without reassociation.

    ``n`` and ``Kp`` (the length of ``E``, ``acc`` and the rows of ``WdT``) are multiples of
    :data:`LANES`; the padding (``c_j = 0``, zero rows of ``WdT``, zero entries of ``E``) adds
    exact zeros. Both loops run over contiguous memory with eight steps of the sum unrolled
    in a register (eight topics per pass for ``norm_phi``, eight terms per pass for ``acc``),
    so the inner loops vectorise with one load and one store per eight multiply-adds.
    """
    _norms(n, WdT, E, norm)
    Kp = acc.shape[0]
    for j in range(n):  # the divisions as one vector loop
        ratio[j] = c[j] / (np.float64(norm[j]) + EPS)
    for k in range(Kp):
        acc[k] = 0.0
    for jb in range(0, n, LANES):
        r0 = ratio[jb]
        r1 = ratio[jb + 1]
        r2 = ratio[jb + 2]
        r3 = ratio[jb + 3]
        r4 = ratio[jb + 4]
        r5 = ratio[jb + 5]
        r6 = ratio[jb + 6]
        r7 = ratio[jb + 7]
        for k in range(Kp):
            a = acc[k]
            a += r0 * Wd[jb, k]
            a += r1 * Wd[jb + 1, k]
            a += r2 * Wd[jb + 2, k]
            a += r3 * Wd[jb + 3, k]
            a += r4 * Wd[jb + 4, k]
            a += r5 * Wd[jb + 5, k]
            a += r6 * Wd[jb + 6, k]
            a += r7 * Wd[jb + 7, k]
            acc[k] = a


@_jit
def fit_docs(ids, cnts, indptr, gamma, Wt, alpha, max_iter, tol, want_stats, Lt, sstats_t):
    """Fit every document of a partition and (``want_stats``) add its statistics.

    Parameters
    ----------
    ids : int array of shape (nnz,)
    cnts : float64 array of shape (nnz,)
    indptr : int64 array of shape (n + 1,)
    gamma : float64 array of shape (n, K)
        The initial ``gamma``; overwritten with the fitted one.
    Wt : float64 or float32 array of shape (V, K)
        ``exp(E[log beta]).T``.
    alpha : float64 array of shape (K,)
    max_iter : int
    tol : float
    want_stats : bool
    Lt : float64 array of shape (V, K)
        ``E[log beta].T`` (read only where a word's dot product underflows).
    sstats_t : float64 array of shape (V, K)
        Incremented by ``outer(cnts_d / norm_phi_d, exp(E[log theta_d]))`` on the terms.

    Returns
    -------
    (word_bound, inner_iterations, term_iterations)
        ``inner_iterations`` counts the inner iterations of every document,
        ``term_iterations`` the same weighted by the document's distinct terms (each costs
        ``2 K`` multiply-adds).
    """
    n, K = gamma.shape
    Kp = -(-K // LANES) * LANES
    E = np.zeros(Kp, dtype=Wt.dtype)  # exp(E[log theta]) in the inner iterations; the pad stays 0
    Es = np.empty(K, dtype=Wt.dtype)  # the same for the statistics
    L = np.empty(K)
    acc = np.zeros(Kp)
    longest = 0
    for d in range(n):
        longest = max(longest, indptr[d + 1] - indptr[d])
    longest = -(-longest // LANES) * LANES
    Wd = np.zeros((longest, Kp), dtype=Wt.dtype)
    WdT = np.zeros((Kp, longest), dtype=Wt.dtype)
    norm = np.empty(longest, dtype=Wt.dtype)
    cp = np.empty(longest)
    ratio = np.empty(longest)
    gp = np.ones(Kp)
    Ep = np.empty(Kp)
    word_bound = 0.0
    inner = 0
    term_iters = 0
    for d in range(n):
        lo, hi = indptr[d], indptr[d + 1]
        g = gamma[d]
        n_p = _gather(ids, cnts, lo, hi, Wt, Wd, WdT, cp)
        _exp_elog_theta_vec(g, E, gp, Ep)
        for _ in range(max_iter):
            inner += 1
            term_iters += hi - lo
            _project(cp, n_p, Wd, WdT, E, norm, ratio, acc)
            change = 0.0
            for k in range(K):
                new = E[k] * acc[k] + alpha[k]
                change += abs(g[k] - new)
                g[k] = new
            _exp_elog_theta_vec(g, E, gp, Ep)
            if change / K < tol:
                break
        if not want_stats:
            continue
        _exp_elog_theta(g, Es, L)  # Es as the NumPy path's statistics take it, and its logarithm L
        for k in range(K):
            E[k] = Es[k]
        _norms(n_p, WdT, E, norm)  # each term's dot with Es, in order over the topics
        for j in range(lo, hi):
            w = ids[j]
            dot64 = np.float64(norm[j - lo])
            r = cnts[j] / (dot64 + EPS)
            for k in range(K):
                sstats_t[w, k] += Es[k] * r
            if dot64 > TINY:
                word_bound += cnts[j] * math.log(dot64)
            else:  # log-sum-exp of E[log theta_d] + E[log beta_w]
                m = L[0] + Lt[w, 0]
                for k in range(1, K):
                    m = max(m, L[k] + Lt[w, k])
                s = 0.0
                if m > -math.inf:
                    for k in range(K):
                        s += math.exp(L[k] + Lt[w, k] - m)
                    word_bound += cnts[j] * (m + math.log(s))
                else:
                    word_bound += cnts[j] * m
    return word_bound, inner, term_iters


def e_step(ids, cnts, indptr, gamma, exp_elog_beta, elog_beta, alpha, max_iter, tol, stats, dtype):
    """The E-step of a partition through :func:`fit_docs`: ``gamma`` (fitted in place) and,
    with ``stats``, ``(sstats of shape (K, V), word_bound, (inner_iterations, term_iterations))``.

    ``alpha`` is a float or an array of shape (K,); ``dtype`` the compute dtype of the
    K-term products (float64 or float32).
    """
    K, V = exp_elog_beta.shape
    Wt = np.ascontiguousarray(exp_elog_beta.T, dtype=dtype)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (K,)).copy()
    Lt = np.ascontiguousarray(elog_beta.T) if stats else np.zeros((0, K))
    sstats_t = np.zeros((V, K)) if stats else np.zeros((0, K))
    word_bound, inner, term_iters = fit_docs(np.ascontiguousarray(ids), np.ascontiguousarray(cnts, dtype=np.float64),
                                 np.ascontiguousarray(indptr, dtype=np.int64), gamma, Wt, alpha, int(max_iter),
                                 float(tol), bool(stats), Lt, sstats_t)
    return (sstats_t.T.copy(), float(word_bound), (int(inner), int(term_iters))) if stats else None
