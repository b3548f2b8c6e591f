"""The compiled LDA E-step (emflow.models.lda_kernel) against the NumPy path it replaces;
``compute_dtype="float32"`` against float64."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("numba")

from emflow.errors import ConfigError
from emflow.estimators.lda import LatentDirichletAllocation
from emflow.models import lda as M
from emflow.storage.corpus import open_corpus
from _kernels import both_kernels


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _corpus(rng, n_docs=150, n_terms=60, empty=True):
    X = rng.poisson(0.4, size=(n_docs, n_terms)) * rng.integers(1, 4, size=(n_docs, n_terms))
    if empty:
        X[[3, 77]] = 0  # empty documents
        X[5] = 0
        X[5, 7] = 9  # one term only
    return sp.csr_matrix(X.astype(np.float64))


def _partition(X):
    return open_corpus(X, chunk_docs=X.shape[0]).loaders[0]()


def _both(monkeypatch, fn):
    return both_kernels(monkeypatch, M, fn)


@pytest.mark.parametrize("K, alpha, seed, max_iter", [(1, 0.5, None, 100), (3, 0.25, None, 100), (7, 0.1, (4, 1), 100),
                                                      (5, "asym", (2, 0), 30), (4, 0.2, (1, 2), 0)])
def test_kernel_statistics_equal_the_numpy_path(monkeypatch, K, alpha, seed, max_iter):
    rng = np.random.default_rng(K)
    X = _corpus(rng)
    entries, indptr = _partition(X)
    if alpha == "asym":
        alpha = rng.uniform(0.05, 1.0, K)
    params = M.make_params(M.init_components(K, X.shape[1], K))
    a, b = _both(monkeypatch, lambda: M.e_step(entries, indptr, params, alpha, max_iter, 1e-3, seed, 40, want_gamma=True))
    (sa, ga), (sb, gb) = a, b
    assert rel(ga, gb) < 1e-12
    for f in M.LDAStats._fields:
        x, y = getattr(sa, f), getattr(sb, f)
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.max(np.abs(y)), err_msg=f)
    t_a, t_b = _both(monkeypatch, lambda: M.transform(entries, indptr, params, alpha, max_iter, 1e-3))
    assert rel(t_a, t_b) < 1e-12


def test_word_bound_where_the_products_underflow(monkeypatch):
    """Topics with E[log beta] near -800 on some terms: exp underflows, the log-sum-exp does not."""
    rng = np.random.default_rng(0)
    X = _corpus(rng, 40, 30, empty=False)
    entries, indptr = _partition(X)
    lam = M.init_components(3, 30, 0)
    lam[:, :4] = 1.2e-3  # psi(1.2e-3) ~ -833 on terms 0..3 in every topic
    params = M.make_params(lam)
    assert np.all(params.exp_elog_beta[:, :4] == 0)
    a, b = _both(monkeypatch, lambda: M.e_step(entries, indptr, params, 0.3, 50, 1e-3, None, 0))
    assert np.isfinite(a.word_bound)
    assert rel(a.word_bound, b.word_bound) < 1e-12


def test_fit_with_the_kernel_equals_the_numpy_fit(monkeypatch):
    X = _corpus(np.random.default_rng(5), 200, 50)
    kw = dict(max_iter=5, random_state=0, scheduler="threads", learn_doc_topic_prior=True)
    a, b = _both(monkeypatch, lambda: LatentDirichletAllocation(4, **kw).fit(X))
    assert rel(a.components_, b.components_) < 1e-10
    assert rel(a.history_, b.history_) < 1e-12
    assert rel(a.doc_topic_prior_, b.doc_topic_prior_) < 1e-10
    assert rel(a.bound_, b.bound_) < 1e-12


@pytest.mark.parametrize("kernel", ["numba", "numpy"])
def test_float32_compute_agrees_with_float64(monkeypatch, kernel):
    monkeypatch.setattr(M, "KERNEL", kernel)
    X = _corpus(np.random.default_rng(8), 200, 60, empty=False)
    kw = dict(max_iter=6, random_state=1, scheduler="threads")
    m64 = LatentDirichletAllocation(5, **kw).fit(X)
    m32 = LatentDirichletAllocation(5, compute_dtype="float32", **kw).fit(X)
    assert m32.components_.dtype == np.float64
    # measured: bound per word 1e-8 relative, topics 1e-5 (the tolerance of each document's fit is 1e-3)
    assert rel(m32.history_, m64.history_) < 1e-6
    assert rel(m32.components_, m64.components_) < 1e-3
    assert abs(m32.perplexity(X) / m64.perplexity(X) - 1) < 1e-6
    np.testing.assert_allclose(m32.transform(X), m64.transform(X), atol=1e-4)


def test_compute_dtype_is_checked_before_any_work():
    X = _corpus(np.random.default_rng(0), 20, 10, empty=False)
    with pytest.raises(ConfigError, match="compute_dtype"):
        LatentDirichletAllocation(2, compute_dtype="float16").fit(X)
    with pytest.raises(ConfigError, match="compute_dtype"):
        LatentDirichletAllocation(2, compute_dtype="float32", learning_method="online").fit(X)


def test_vector_exp_is_within_an_ulp_or_two_of_numpy():
    from emflow.models import lda_kernel as LK

    v = np.concatenate([np.linspace(-707.9, 709.0, 20001), np.random.default_rng(0).uniform(-40, 1, 20000),
                        [0.0, -1e-300, 1e-20, -0.34657359, 0.34657359, 1.0, -1.0]])
    got = np.array([LK._exp(x) for x in v])
    want = np.exp(v)
    assert np.max(np.abs(got - want) / want) < 3 * np.finfo(float).eps
    # below EXP_LO: 0 where numpy gives a subnormal or 0
    assert [LK._exp(x) for x in (-708.5, -745.2, -800.0, -np.inf)] == [0.0] * 4


@pytest.mark.parametrize("K", [1, 5, 8, 20, 33])
def test_vector_digamma_exp_equals_the_numpy_psi(K):
    """exp(psi(g) - psi(sum g)) over padded lanes against emflow.models.lda.psi, with values
    below 1e-6 (psi's other branch), between 1e-6 and 6 (the recurrence) and above 6."""
    from emflow.models import lda_kernel as LK

    rng = np.random.default_rng(K)
    Kp = -(-K // LK.LANES) * LK.LANES
    for scale in (1e-7, 1e-3, 1.0, 10.0, 1e4):
        g = rng.uniform(0.5, 2.0, K) * scale
        g[0] = 3e-7 if K > 1 else g[0]
        E, Ep = np.empty(K), np.empty(Kp)
        LK._exp_elog_theta_vec(g, E, np.ones(Kp), Ep)
        v = M.psi(g) - M.psi(g.sum())
        want = np.exp(v)
        # exp(v) carries the absolute rounding of psi(g) and psi(sum g) (their size times eps)
        # as a relative error; 0 below EXP_LO
        size = 8 + np.abs(M.psi(g)) + np.abs(M.psi(g.sum()))
        ok = np.abs(E - want) <= 4 * np.finfo(float).eps * size * want
        assert np.all(ok | ((v < LK.EXP_LO) & (E == 0))), (scale, E, want)
