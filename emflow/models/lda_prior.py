"""Estimating LDA's Dirichlet priors by Newton's method: pure NumPy/SciPy.

Both priors enter the variational bound only through terms of the form
``N (log Gamma(sum a) - sum_k log Gamma(a_k)) + sum_k (a_k - 1) S_k`` with ``S`` a sum of
expected log-probabilities: the document-topic prior ``alpha`` with ``N`` documents and
``S = sum_d E[log theta_d]``, the topic-word prior ``eta`` with ``N = K`` topics and
``S = sum_k E[log beta_k]`` under ``Dir(lambda_k)`` (``lambda`` = ``components_``). That
function is concave; its maximiser is the maximum-likelihood Dirichlet for those expected
log-probabilities (Minka, "Estimating a Dirichlet distribution", 2000).
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln, polygamma

__all__ = ["dirichlet_newton", "update_doc_topic_prior", "update_topic_word_prior", "TOPIC_WORD_PRIOR_MODES"]

#: the values of ``learn_topic_word_prior`` that estimate ``eta`` (False keeps it fixed)
TOPIC_WORD_PRIOR_MODES = ("symmetric", "asymmetric")


def dirichlet_newton(a, S: np.ndarray, N: float, *, symmetric: bool = False, max_iter: int = 100,
                     tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Maximise ``f(a) = N (log Gamma(sum a) - sum log Gamma(a)) + (a - 1) . S`` by Newton's method.

    Parameters
    ----------
    a : float or ndarray of shape (n,)
        The start (positive).
    S : ndarray of shape (n,)
        Sums of expected log-probabilities.
    N : float
        How many distributions those sums are over (nothing is done unless > 0).
    symmetric : bool
        Maximise over ``a = s * ones(n)`` (one scalar ``s``, returned as a 0-d array):
        ``f(s) = N (log Gamma(n s) - n log Gamma(s)) + (s - 1) sum(S)``.
        Otherwise over every ``a_k``, with the Hessian's diagonal-plus-rank-one inverse.
    max_iter, tol
        At most ``max_iter`` steps; stop when the largest relative change is below ``tol``.

    Returns
    -------
    (a, steps) : the maximiser (shape (n,), or () when symmetric) and the Newton steps taken.

    Notes
    -----
    A step that would leave a value <= 0, or lower ``f``, is halved.
    """
    S = np.asarray(S, dtype=np.float64)
    n, N = S.shape[0], float(N)
    if symmetric:
        a = np.array(np.asarray(a, dtype=np.float64).reshape(-1)[0])
        T = float(S.sum())

        def f(x):
            return N * (gammaln(n * x) - n * gammaln(x)) + (x - 1.0) * T

        def newton_step(x):
            g = N * n * (digamma(n * x) - digamma(x)) + T
            h = N * n * (n * polygamma(1, n * x) - polygamma(1, x))  # < 0: f is concave
            return g / h
    else:
        a = np.broadcast_to(np.asarray(a, dtype=np.float64), S.shape).copy()

        def f(x):
            return N * (gammaln(x.sum()) - gammaln(x).sum()) + float(np.dot(x - 1.0, S))

        def newton_step(x):
            g = N * (digamma(x.sum()) - digamma(x)) + S
            q = -N * polygamma(1, x)
            z = N * polygamma(1, x.sum())
            b = np.sum(g / q) / (1.0 / z + np.sum(1.0 / q))
            return (g - b) / q  # H^-1 g for H = diag(q) + z 11^T
    if not N > 0 or n == 0:
        return a, 0
    fa = f(a)
    for it in range(1, max_iter + 1):
        step = newton_step(a)
        t = 1.0
        while t >= 1e-10:  # the full step, or the largest halving that stays > 0 and ascends
            new = a - t * step
            if np.all(new > 0):
                f_new = f(new)
                if f_new >= fa - 1e-12 * abs(fa):
                    break
            t *= 0.5
        else:
            return a, it  # no ascending step left: at the maximum, to rounding
        done = np.max(np.abs(new - a) / new) < tol
        a, fa = new, f_new
        if done:
            return a, it
    return a, max_iter


def update_doc_topic_prior(alpha, elog_theta_sum: np.ndarray, n_docs: float, *, max_iter: int = 100,
                           tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """The asymmetric Dirichlet prior that maximises the bound's ``alpha`` terms.

    Maximises ``f(a) = N (log Gamma(sum a) - sum log Gamma(a_k)) + sum_k (a_k - 1) S_k``
    (``S = elog_theta_sum``, ``N = n_docs``) by :func:`dirichlet_newton`, starting from
    ``alpha`` (a float or an array of shape (K,)). Returns ``(alpha, Newton steps taken)``.
    """
    return dirichlet_newton(alpha, elog_theta_sum, n_docs, max_iter=max_iter, tol=tol)


def update_topic_word_prior(eta, elog_beta: np.ndarray, mode: str, *, max_iter: int = 100,
                            tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """The topic-word prior that maximises the bound's ``eta`` terms for fixed topics.

    Those terms are ``sum_k [log Gamma(sum_v eta_v) - sum_v log Gamma(eta_v)
    + sum_v (eta_v - 1) E[log beta_kv]]`` (the rest of the bound does not involve ``eta``):
    the Dirichlet likelihood of the K topics' expected log-probabilities.

    Parameters
    ----------
    eta : float or ndarray of shape (V,)
        The start.
    elog_beta : ndarray of shape (K, V)
        ``E[log beta]`` under ``Dir(lambda)``, of the topics just updated.
    mode : {"symmetric", "asymmetric"}
        One ``eta`` for every term (returned as a 0-d array) or one per term (shape (V,)).

    Returns
    -------
    (eta, Newton steps taken)
    """
    elog_beta = np.asarray(elog_beta, dtype=np.float64)
    return dirichlet_newton(eta, elog_beta.sum(axis=0), float(elog_beta.shape[0]),
                            symmetric=mode == "symmetric", max_iter=max_iter, tol=tol)
