"""Stepwise EM for the Poisson and Gaussian-mixture HMMs (the mixin the Gaussian HMM uses):
the first update on all the data is one Baum-Welch step, bit for bit; the second is the
stepwise update of raw statistics computed by brute force from hmmlearn's posteriors and
run through hmmlearn's own M-step; and the HMMs' convergence warning names the caller."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import special

from emflow import GMMHMM, CategoricalHMM, GaussianHMM, GaussianMixture, PoissonHMM
from emflow.errors import ConfigError, EmflowConvergenceWarning, FeatureMismatchError
from emflow.models import gmm_hmm as GH
from emflow.models import hmm as H

hl = pytest.importorskip("hmmlearn.hmm")

K, M, D = 2, 2, 2
CTS = ["spherical", "diag", "full", "tied"]
DECAY, OFFSET = 0.7, 3.0


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(autouse=True)
def _one_blas_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def split(X, lengths, n_first):
    """The first ``n_first`` sequences and the rest."""
    cut = int(np.sum(lengths[:n_first]))
    return (X[:cut], lengths[:n_first]), (X[cut:], lengths[n_first:])


def blend(SA, SB, nA, nB):
    """Stepwise EM's second update: S = (1 - rho) S_A + rho (N / n_B) s_B, N = n_A + n_B steps."""
    rho = (OFFSET + 2) ** -DECAY
    return {k: (1 - rho) * SA[k] + rho * (nA + nB) / nB * SB[k] for k in SA}


# -- the Gaussian-mixture HMM ---------------------------------------------------------------
def gmm_hmm_start(ct, seed=3):
    rng = np.random.default_rng(seed)
    if ct == "spherical":
        cov = rng.uniform(0.5, 2.0, (K, M))
    elif ct == "diag":
        cov = rng.uniform(0.5, 2.0, (K, M, D))
    else:
        A = rng.normal(size=(K, D, D) if ct == "tied" else (K, M, D, D))
        cov = A @ np.swapaxes(A, -1, -2) + np.eye(D)
    return GH.GMMHMMParams(rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K) * 3, K), rng.dirichlet(np.ones(M) * 2, K),
                           rng.normal(size=(K, M, D)) * 2.0, cov, ct)


@pytest.fixture(scope="module")
def gmm_hmm_data():
    rng = np.random.default_rng(0)
    truth = gmm_hmm_start("full", 1)
    truth = truth._replace(transmat=0.3 * truth.transmat + 0.7 * np.eye(K))
    lengths = rng.integers(10, 40, 24)
    X = np.concatenate([H.sample_sequence(truth, int(n), rng)[0] for n in lengths])
    return X, lengths


def emflow_gmm_hmm(p, **kw):
    m = GMMHMM(K, M, covariance_type=p.covariance_type, init_params="", scheduler="threads", **kw)
    m.startprob_, m.transmat_, m.weights_ = p.startprob.copy(), p.transmat.copy(), p.weights.copy()
    m.means_, m.covars_ = p.means.copy(), p.covars.copy()
    return m


def hmmlearn_gmm_hmm(p):
    ref = hl.GMMHMM(K, M, covariance_type=p.covariance_type, n_iter=1, init_params="", implementation="log")
    ref.startprob_, ref.transmat_ = p.startprob.copy(), p.transmat.copy()
    ref.weights_, ref.means_, ref.covars_ = p.weights.copy(), p.means.copy(), p.covars.copy()
    ref._check()
    return ref


def raw_gmm_hmm_stats(p, X, lengths):
    """Raw moments about the origin from hmmlearn's state posteriors and component densities."""
    ref = hmmlearn_gmm_hmm(p)
    stats, _ = ref._do_estep(X, lengths)
    gamma = ref.predict_proba(X, lengths)
    logd = np.stack([ref._compute_log_weighted_gaussian_densities(X, k) for k in range(K)], axis=1)
    r = gamma[:, :, None] * np.exp(logd - special.logsumexp(logd, axis=2, keepdims=True))
    return {"start": stats["start"], "trans": stats["trans"], "post_sum": stats["post_sum"], "N": r.sum(0),
            "S1": np.einsum("nkm,nd->kmd", r, X), "S2": np.einsum("nkm,nd,ne->kmde", r, X, X)}


def hmmlearn_m_step(S, p):
    """hmmlearn's M-step on raw moments, its ``c_n`` taken about the E-step's means ``p.means``."""
    mu, N, S1 = p.means, S["N"], S["S1"]
    cross = S1[..., :, None] * mu[..., None, :]
    c = S["S2"] - cross - np.swapaxes(cross, -1, -2) + N[..., None, None] * mu[..., :, None] * mu[..., None, :]
    c = {"full": c, "tied": c.sum(axis=1), "diag": np.diagonal(c, axis1=-2, axis2=-1),
         "spherical": np.trace(c, axis1=-2, axis2=-1)}[p.covariance_type]
    ref = hmmlearn_gmm_hmm(p)
    ref._do_mstep({"nobs": 1, "start": S["start"], "trans": S["trans"], "post_mix_sum": N, "post_sum": S["post_sum"],
                   "m_n": S1, "c_n": c})
    return ref


@pytest.mark.parametrize("ct", CTS)
def test_gmm_hmm_first_update_is_a_baum_welch_step_and_the_second_the_stepwise_update(gmm_hmm_data, ct):
    X, lengths = gmm_hmm_data
    p0 = gmm_hmm_start(ct)
    with pytest.warns(EmflowConvergenceWarning):
        one = emflow_gmm_hmm(p0, n_iter=1).fit(X, lengths)
    first = emflow_gmm_hmm(p0).partial_fit(X, lengths)
    for attr in ("startprob_", "transmat_", "weights_", "means_", "covars_"):
        np.testing.assert_array_equal(getattr(first, attr), getattr(one, attr))
    assert first.n_batch_iter_ == 2

    (XA, lA), (XB, lB) = split(X, lengths, 15)
    m = emflow_gmm_hmm(p0).partial_fit(XA, lA, learning_decay=DECAY, learning_offset=OFFSET)
    p1 = m._get_parameters()
    m.partial_fit(XB, lB)
    S = blend(raw_gmm_hmm_stats(p0, XA, lA), raw_gmm_hmm_stats(p1, XB, lB), len(XA), len(XB))
    ref = hmmlearn_m_step(S, p1)
    for attr in ("startprob_", "transmat_", "weights_", "means_", "covars_"):
        assert rel(getattr(m, attr), getattr(ref, attr)) < 1e-9, attr
    assert m.n_batch_iter_ == 3


@pytest.mark.parametrize("ct", CTS)
def test_gmm_hmm_online_move_equals_statistics_recomputed_about_the_new_parameters(ct):
    rng = np.random.default_rng(2)
    X, r = rng.normal(1, 2, (60, D)), rng.dirichlet(np.ones(K * M), 60).reshape(60, K, M)
    a, b = gmm_hmm_start(ct, 4), gmm_hmm_start(ct, 5)

    def about(p):
        g = GH.shift_of(p)
        Dc = X[:, None, None, :] - p.means  # (n, K, M, d)
        full = np.einsum("nkm,nkmi,nkmj->kmij", r, Dc, Dc)
        c = {"full": full, "tied": full.sum(1), "diag": np.diagonal(full, axis1=-2, axis2=-1),
             "spherical": np.trace(full, axis1=-2, axis2=-1)}[ct]
        z = np.zeros(())
        return GH.GMMHMMStats(np.zeros(K), np.zeros((K, K)), r.sum(0), r.sum((0, 2)),
                              np.einsum("nkm,nd->kmd", r, X - g), c, z, z, z)

    moved = GH.GMMEmission(M, ct).online_move(about(a), a, b)
    want = about(b)
    assert rel(moved.s1, want.s1) < 1e-12 and rel(moved.c, want.c) < 1e-12


# -- the Poisson HMM -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def poisson_data():
    rng = np.random.default_rng(0)
    lam = np.array([[1.0, 6.0], [8.0, 2.0]])
    lengths = rng.integers(20, 60, 30)
    X, s = [], 0
    for n in lengths:
        for _ in range(n):
            s = s if rng.random() < 0.9 else 1 - s
            X.append(rng.poisson(lam[s]))
    return np.array(X), lengths


POISSON_START = dict(startprob_=np.array([0.6, 0.4]), transmat_=np.array([[0.7, 0.3], [0.4, 0.6]]),
                     lambdas_=np.array([[2.0, 4.0], [5.0, 3.0]]))


def emflow_poisson(**kw):
    m = PoissonHMM(K, init_params="", scheduler="threads", **kw)
    for k, v in POISSON_START.items():
        setattr(m, k, v.copy())
    return m


def hmmlearn_poisson(m):
    ref = hl.PoissonHMM(K, init_params="", n_iter=1)
    ref.startprob_, ref.transmat_, ref.lambdas_ = m.startprob_.copy(), m.transmat_.copy(), m.lambdas_.copy()
    ref._check()
    return ref


def test_poisson_hmm_first_update_is_a_baum_welch_step_and_the_second_the_stepwise_update(poisson_data):
    X, lengths = poisson_data
    with pytest.warns(EmflowConvergenceWarning):
        one = emflow_poisson(n_iter=1).fit(X, lengths)
    first = emflow_poisson().partial_fit(X, lengths)
    for attr in ("startprob_", "transmat_", "lambdas_"):
        np.testing.assert_array_equal(getattr(first, attr), getattr(one, attr))

    (XA, lA), (XB, lB) = split(X, lengths, 20)
    m = emflow_poisson()
    SA, _ = hmmlearn_poisson(m)._do_estep(XA, lA)
    m.partial_fit(XA, lA, learning_decay=DECAY, learning_offset=OFFSET)
    ref = hmmlearn_poisson(m)
    SB, _ = ref._do_estep(XB, lB)
    m.partial_fit(XB, lB)
    keys = ("start", "trans", "post", "obs")
    S = blend({k: SA[k] for k in keys}, {k: SB[k] for k in keys}, len(XA), len(XB))
    ref._do_mstep({"nobs": 1, **S})
    for attr in ("startprob_", "transmat_", "lambdas_"):
        assert rel(getattr(m, attr), getattr(ref, attr)) < 1e-10, attr
    assert m.n_batch_iter_ == 3
    with pytest.raises(FeatureMismatchError):
        m.partial_fit(np.zeros((10, 3), dtype=int))


def test_online_fits_of_the_new_hmms_come_near_the_batch_optimum(poisson_data, gmm_hmm_data):
    X, lengths = poisson_data
    best = emflow_poisson(n_iter=300, tol=1e-8).fit(X, lengths).score(X, lengths)
    m = emflow_poisson().fit(X, lengths, method="online", batch_size=5, n_passes=2)
    assert m.fit_info_["method"] == "online" and m.n_iter_ == 2 and m.n_batch_iter_ == 1 + 2 * 6
    assert 0 <= (best - m.score(X, lengths)) / abs(best) < 1e-2
    X, lengths = gmm_hmm_data
    p0 = gmm_hmm_start("diag")
    best = emflow_gmm_hmm(p0, n_iter=300, tol=1e-8).fit(X, lengths).score(X, lengths)
    m = emflow_gmm_hmm(p0).fit(X, lengths, method="online", batch_size=6, n_passes=3, shuffle=False)
    assert m.n_iter_ == 3 and len(m.history_) == 3
    assert abs(best - m.score(X, lengths)) / abs(best) < 2e-2


def test_hmm_fit_keywords_are_checked():
    X = np.zeros((10, 2), dtype=int)
    with pytest.raises(ConfigError, match="learning_decay"):
        PoissonHMM(2).fit(X, method="online", learning_decay=2.0)
    with pytest.raises(ConfigError, match="step"):
        GMMHMM(2).fit(X, method="online", step=3)
    with pytest.raises(ConfigError, match="initial_params"):
        GMMHMM(2).fit(X, method="online", history=[1.0])
    with pytest.raises(ConfigError, match="method='online'"):
        PoissonHMM(2).fit(X, batch_size=3)
    with pytest.raises(TypeError, match="step"):
        PoissonHMM(2).fit(X, step=3)


# -- the convergence warning points at the caller ------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: (GaussianHMM(2, n_iter=1, random_state=0, scheduler="threads"), np.random.default_rng(0).normal(size=(200, 2))),
    lambda: (CategoricalHMM(2, n_iter=1, random_state=0, scheduler="threads"),
             np.random.default_rng(0).integers(0, 3, (200, 1))),
    lambda: (PoissonHMM(2, n_iter=1, random_state=0, scheduler="threads"), np.random.default_rng(0).poisson(3, (200, 2))),
    lambda: (GMMHMM(2, 2, n_iter=1, random_state=0, scheduler="threads"), np.random.default_rng(0).normal(size=(200, 2))),
    lambda: (GaussianMixture(2, max_iter=1, random_state=0, scheduler="threads"),
             np.random.default_rng(0).normal(size=(200, 2))),
], ids=["gaussian", "categorical", "poisson", "gmm_hmm", "mixture"])
def test_convergence_warning_names_the_callers_line(make):
    est, X = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X)
    got = [w for w in caught if issubclass(w.category, EmflowConvergenceWarning)]
    assert len(got) == 1 and got[0].filename == __file__, [(w.filename, w.lineno) for w in got]
