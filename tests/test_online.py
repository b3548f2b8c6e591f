"""Online EM: online LDA against scikit-learn's from the same start and batches, stepwise EM
(Cappé & Moulines) for the Gaussian mixture and the HMMs against one batch EM step and a
brute-force NumPy update, the gap to the batch optimum, and the bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import LatentDirichletAllocation as SkLDA
from sklearn.decomposition._online_lda_fast import _dirichlet_expectation_2d
from sklearn.utils import gen_batches

from emflow import CategoricalHMM, ConfigError, GaussianHMM, GaussianMixture, LatentDirichletAllocation
from emflow.errors import DataError, FeatureMismatchError
from emflow.estimators.online import plan_batches
from emflow.models import gmm as G
from emflow.models import lda as M
from emflow.models import online as O
from emflow.storage.corpus import open_corpus, write_corpus


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(autouse=True)
def _one_blas_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def counts():
    rng = np.random.RandomState(0)
    topics = rng.dirichlet(np.full(40, 0.2), 4)
    theta = rng.dirichlet(np.full(4, 0.3), 150)
    X = np.vstack([rng.multinomial(rng.poisson(30) + 1, t @ topics) for t in theta]).astype(np.float64)
    return sp.csr_matrix(X)


@pytest.fixture(scope="module")
def two_blobs():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (3000, 3)), rng.normal(3, 0.6, (3000, 3)), rng.normal([0, 4, -2], 0.8, (2000, 3))])
    return X[rng.permutation(len(X))]


def sklearn_online(X, lam0, *, batch_size, total, offset, decay, passes, alpha, eta):
    """scikit-learn's online updates from ``lam0`` (ones E-step start): topics after each batch."""
    K, V = lam0.shape
    sk = SkLDA(K, doc_topic_prior=alpha, topic_word_prior=eta, learning_method="online", learning_offset=offset,
               learning_decay=decay, batch_size=batch_size)
    sk._init_latent_vars(V)
    sk.components_ = lam0.copy()
    sk.exp_dirichlet_component_ = np.exp(_dirichlet_expectation_2d(sk.components_))
    sk.random_state_ = None  # every document's E-step starts at ones, as emflow's doc_topic_init="ones"
    after = []
    for _ in range(passes):
        for sl in gen_batches(X.shape[0], batch_size):
            sk._em_step(X[sl], total_samples=total, batch_update=False)
            after.append(sk.components_.copy())
    return after, sk


# -- online LDA ------------------------------------------------------------------------
def test_online_lda_fit_on_zarr_equals_sklearn_after_every_batch(counts, tmp_path):
    """Batches of 37 documents over partitions of 16-document chunks (batches span partitions)."""
    path = write_corpus(tmp_path / "c.zarr", counts, chunk_docs=16)
    corpus = open_corpus(path, partition_bytes=1)  # one 16-document chunk per partition
    assert corpus.n_partitions == 10
    K, V = 4, counts.shape[1]
    lam0 = M.init_components(K, V, 7)
    kw = dict(batch_size=37, offset=4.0, decay=0.8, alpha=0.3, eta=0.2)
    ref, sk = sklearn_online(counts, lam0, total=counts.shape[0], passes=2, **kw)
    seen = []
    m = LatentDirichletAllocation(K, learning_method="online", batch_size=37, learning_offset=4.0, learning_decay=0.8,
                                  doc_topic_prior=0.3, topic_word_prior=0.2, max_iter=2, doc_topic_init="ones",
                                  scheduler="threads")
    m.fit(corpus, initial_params=lam0, callbacks=[lambda ev: seen.append(ev.params.components.copy())])
    assert len(seen) == len(ref) == 2 * 5
    worst = max(rel(a, b) for a, b in zip(seen, ref))
    assert worst < 1e-10
    assert rel(m.components_, sk.components_) < 1e-10
    assert m.n_batch_iter_ == sk.n_batch_iter_ == 11 and m.n_iter_ == 2
    assert rel(m.bound_, sk.perplexity(counts)) < 1e-8
    assert m.lower_bound_ == m.history_[-1] and rel(np.exp(-m.lower_bound_), m.bound_) < 1e-12
    print(f"\nonline LDA vs scikit-learn, 10 batches: max relative difference of components_ {worst:.2e}")


def test_online_lda_partial_fit_equals_sklearn_and_counts_batches(counts, tmp_path):
    K, V = 3, counts.shape[1]
    sk = SkLDA(K, batch_size=64, total_samples=5000, learning_offset=10.0, random_state=11)
    m = LatentDirichletAllocation(K, batch_size=64, total_samples=5000, learning_offset=10.0, random_state=11,
                                  doc_topic_init="ones", scheduler="threads")
    sk._init_latent_vars(V)
    np.testing.assert_array_equal(sk.components_, M.init_components(K, V, 11))  # the same first draw
    sk.random_state_ = None
    for chunk in (counts[:100], counts[100:]):
        sk.partial_fit(chunk)
        m.partial_fit(chunk)
        assert rel(m.components_, sk.components_) < 1e-10
    assert m.n_batch_iter_ == sk.n_batch_iter_ == 1 + 2 + 1
    assert rel(m.perplexity(counts), sk.perplexity(counts)) < 1e-8
    with pytest.raises(FeatureMismatchError):
        m.partial_fit(sp.csr_matrix(np.ones((3, V + 1))))
    back = LatentDirichletAllocation.load(m.save(tmp_path / "m"))
    assert back.n_batch_iter_ == 4
    np.testing.assert_array_equal(back.components_, m.components_)


def test_online_lda_perplexity_stop_and_random_starts(counts):
    m = LatentDirichletAllocation(3, learning_method="online", batch_size=50, max_iter=50, evaluate_every=1,
                                  perp_tol=1e-1, random_state=0, scheduler="threads").fit(counts)
    assert m.converged_ and m.n_iter_ < 50 and m.n_batch_iter_ == 1 + 3 * (m.n_iter_ + 1)
    assert len(m.history_) == m.n_iter_ + 1 and m.history_[-1] == m.lower_bound_
    again = LatentDirichletAllocation(3, learning_method="online", batch_size=50, max_iter=50, evaluate_every=1,
                                      perp_tol=1e-1, random_state=0, scheduler="threads").fit(counts)
    np.testing.assert_array_equal(m.components_, again.components_)


# -- stepwise EM: the driver's arithmetic ------------------------------------------------
def test_plan_batches_is_gen_batches_across_partitions():
    bounds = [(0, 5), (5, 12), (12, 13), (13, 30)]
    plan = plan_batches(bounds, 7)
    got = [[(q, lo + bounds[q][0], hi + bounds[q][0]) for q, lo, hi, _ in b] for b in plan]
    want = [[(0, 0, 5), (1, 5, 7)], [(1, 7, 12), (2, 12, 13), (3, 13, 14)], [(3, 14, 21)], [(3, 21, 28)],
            [(3, 28, 30)]]
    assert got == want
    assert [b[0][3] for b in plan] == [s.start for s in gen_batches(30, 7)]
    cut = plan_batches(bounds, 7, split=3)  # pieces of at most 3 units, the same batches
    assert [[(p[3], p[3] + p[2] - p[1]) for p in b] for b in cut][:2] == [[(0, 3), (3, 5), (5, 7)],
                                                                            [(7, 10), (10, 12), (12, 13), (13, 14)]]
    assert all(max(p[2] - p[1] for p in b) <= 3 for b in cut)


@pytest.mark.parametrize("kind", ["outer", "elementwise", "total"])
def test_recenter_equals_moments_recomputed_about_the_new_shift(kind):
    rng = np.random.default_rng(1)
    x, r = rng.normal(2, 1, (50, 3)), rng.dirichlet(np.ones(2), 50)
    a, b = rng.normal(size=3), rng.normal(size=3)

    def moments(g):
        c = x - g
        s2 = {"outer": np.einsum("nk,ni,nj->kij", r, c, c), "elementwise": r.T @ c**2,
              "total": c.T @ c}[kind]
        return G.GMMStats(r.sum(0), r.T @ c, s2, np.zeros(()), np.zeros(()), np.zeros(()))

    moved = O.recenter(moments(a), a - b, "n", kind)
    np.testing.assert_allclose(moved.s1, moments(b).s1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moved.s2, moments(b).s2, rtol=1e-12, atol=1e-11)


def _gmm_start(X, K=3, ct="full"):
    rng = np.random.default_rng(5)
    means = X[rng.choice(len(X), K, replace=False)]
    prec = {"full": np.tile(np.eye(X.shape[1]), (K, 1, 1)), "diag": np.ones((K, X.shape[1])),
            "spherical": np.ones(K), "tied": np.eye(X.shape[1])}[ct]
    return dict(weights_init=np.full(K, 1.0 / K), means_init=means, precisions_init=prec)


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_first_partial_fit_on_all_the_data_is_one_batch_em_step(two_blobs, ct):
    init = _gmm_start(two_blobs, ct=ct)
    batch = GaussianMixture(3, covariance_type=ct, max_iter=1, scheduler="threads", **init)
    with pytest.warns(Warning):  # did not converge in one iteration
        batch.fit(two_blobs)
    online = GaussianMixture(3, covariance_type=ct, scheduler="threads", **init).partial_fit(two_blobs)
    for attr in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(online, attr), getattr(batch, attr))
    assert online.n_batch_iter_ == 2
    # after an online fit, partial_fit goes on with its running statistics
    online.fit(two_blobs, method="online", batch_size=4000, shuffle=False)
    assert online.n_batch_iter_ == 3
    assert online.partial_fit(two_blobs[:100]).n_batch_iter_ == 4
    # after a batch fit, the running statistics start afresh from that fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online.set_params(max_iter=3).fit(two_blobs)
    stepped = copy.deepcopy(online).set_params(warm_start=True, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stepped.fit(two_blobs)  # one EM step from the online fit's parameters
    online.partial_fit(two_blobs)
    for attr in ("weights_", "means_", "covariances_"):
        np.testing.assert_array_equal(getattr(online, attr), getattr(stepped, attr))
    assert online.n_batch_iter_ == 2


def test_second_partial_fit_is_the_stepwise_update_in_numpy(two_blobs):
    """rho = (offset + 2)^-decay on raw moments about the origin, scaled to the rows seen."""
    init = _gmm_start(two_blobs)
    A, B = two_blobs[:1000], two_blobs[1000:1600]
    m = GaussianMixture(3, reg_covar=1e-6, scheduler="threads", **init)
    m.partial_fit(A, learning_decay=0.7, learning_offset=3.0)
    p1 = m._get_parameters()
    m.partial_fit(B)  # the schedule of the first call is kept

    def raw(X, p):
        _, resp = G.posterior(X, p)
        return resp.sum(0), resp.T @ X, np.einsum("nk,ni,nj->kij", resp, X, X)

    p0 = G.GMMParams(init["weights_init"], init["means_init"], np.tile(np.eye(3), (3, 1, 1)),
                     np.tile(np.eye(3), (3, 1, 1)), "full")
    S = raw(A, p0)  # first batch: taken whole (rho = 1), scale 1000 / 1000
    rho = (3.0 + 2) ** -0.7
    s = [v * (1600 / 600) for v in raw(B, p1)]
    S = [(1 - rho) * a + rho * b for a, b in zip(S, s)]
    n, s1, s2 = S
    means = s1 / n[:, None]
    cov = s2 / n[:, None, None] - np.einsum("ki,kj->kij", means, means) + 1e-6 * np.eye(3)
    assert rel(m.means_, means) < 1e-10 and rel(m.covariances_, cov) < 1e-10 and rel(m.weights_, n / n.sum()) < 1e-10
    assert m.n_batch_iter_ == 3


def test_one_online_pass_comes_near_the_batch_optimum(two_blobs, tmp_path):
    batch = GaussianMixture(3, tol=1e-10, max_iter=500, random_state=0, scheduler="threads").fit(two_blobs)
    best = batch.score(two_blobs)
    gaps = {}
    for passes, polyak in [(1, False), (2, False), (2, True)]:
        m = GaussianMixture(3, random_state=0, scheduler="threads")
        m.fit(two_blobs, method="online", batch_size=250, n_passes=passes, polyak=polyak)
        gaps[passes, polyak] = (best - m.score(two_blobs)) / abs(best)
        assert len(m.history_) == passes == m.n_iter_ and m.n_batch_iter_ == 1 + passes * 32
        assert m.fit_info_["method"] == "online" and m.fit_info_["online"]["batch_size"] == 250
    assert all(-1e-9 < g < 1e-2 for g in gaps.values()), gaps
    print(f"\nGMM K=3, 8000 rows, batches of 250: relative gap to the batch optimum {gaps}")
    # stored in Zarr, partitions cut across batches: the same fit as in memory (storage order)
    import zarr

    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=two_blobs.shape, chunks=(300, 3), dtype="f8")
    z[:] = two_blobs
    kw = dict(method="online", batch_size=250, shuffle=False)
    a = GaussianMixture(3, random_state=0, scheduler="threads", partition_bytes=300 * 24).fit(str(tmp_path / "x.zarr"), **kw)
    b = GaussianMixture(3, random_state=0, scheduler="threads").fit(two_blobs, **kw)
    assert a.fit_info_["partitions"] > 10
    assert rel(a.means_, b.means_) < 1e-9 and rel(a.covariances_, b.covariances_) < 1e-9


def test_hmms_online(two_blobs):
    gen = GaussianHMM(2, covariance_type="diag")
    gen.startprob_, gen.transmat_ = np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]])
    gen.means_, gen.covars_ = np.array([[0.0, 0.0], [3.0, 1.0]]), np.ones((2, 2))
    X, _ = gen.sample(6000, random_state=0)
    lengths = [100] * 60
    init = dict(init_params="", params="stmc")
    start = dict(startprob_=np.array([0.5, 0.5]), transmat_=np.full((2, 2), 0.5),
                 means_=np.array([[0.5, 0.5], [2.0, 0.0]]), covars_=np.ones((2, 2)))

    def hmm(**kw):
        m = GaussianHMM(2, covariance_type="diag", random_state=0, **init, **kw)
        for k, v in start.items():
            setattr(m, k, v.copy())
        return m

    with pytest.warns(Warning):  # did not converge in one iteration
        one = hmm(n_iter=1).fit(X, lengths)
    first = hmm().partial_fit(X, lengths)
    for attr in ("startprob_", "transmat_", "means_", "_covars_"):
        np.testing.assert_array_equal(getattr(first, attr), getattr(one, attr))
    best = hmm(n_iter=200, tol=1e-8).fit(X, lengths).score(X, lengths)
    m = hmm().fit(X, lengths=lengths, method="online", batch_size=5, n_passes=2)
    assert 0 <= (best - m.score(X, lengths)) / abs(best) < 1e-2
    with pytest.raises(FeatureMismatchError):
        first.partial_fit(np.zeros((10, 3)))
    c = CategoricalHMM(2, n_features=3, random_state=0)
    Y = np.random.default_rng(0).integers(0, 3, (400, 1))
    c.partial_fit(Y[:200], [100, 100]).partial_fit(Y[200:], [50] * 4)
    assert c.n_batch_iter_ == 3 and np.allclose(c.emissionprob_.sum(1), 1.0)
    with pytest.raises(DataError, match="symbol 5"):  # a later batch is checked against the model
        c.partial_fit(np.full((10, 1), 5))


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"learning_decay": 0.5}, {"learning_decay": 1.01}, {"learning_offset": 0.0},
                                {"learning_offset": -1.0}, {"batch_size": 0}, {"batch_size": 2.5},
                                {"n_passes": 0}, {"polyak": "yes"}, {"step": 3}])
def test_bad_online_settings_are_config_errors_before_anything_is_read(kw, tmp_path):
    missing = str(tmp_path / "nothing.zarr")  # opening it would be a DataNotFoundError
    with pytest.raises(ConfigError, match=next(iter(kw))):
        GaussianMixture(2).fit(missing, method="online", **kw)
    with pytest.raises(ConfigError, match=next(iter(kw))):
        GaussianHMM(2).fit(missing, method="online", **kw)
    if "step" not in kw and "n_passes" not in kw:
        with pytest.raises(ConfigError, match=next(iter(kw))):
            GaussianMixture(2).partial_fit(missing, **kw)


def test_bad_method_and_lda_settings(tmp_path):
    missing = str(tmp_path / "nothing.zarr")
    for est in (GaussianMixture(2), GaussianHMM(2)):
        with pytest.raises(ConfigError, match="method"):
            est.fit(missing, method="stochastic")
        with pytest.raises(ConfigError, match="method='online'"):
            est.fit(missing, batch_size=10)
    for kw in ({"learning_decay": 0.5}, {"learning_decay": 1.5}, {"learning_offset": 0.0}, {"batch_size": 0},
               {"learning_method": "minibatch"}, {"learning_method": "online", "learn_doc_topic_prior": True}):
        with pytest.raises(ConfigError):
            LatentDirichletAllocation(2, **kw).fit(missing)
        with pytest.raises(ConfigError):
            LatentDirichletAllocation(2, **kw).partial_fit(missing)


@pytest.mark.slow  # a Dask cluster and many small tasks
def test_online_fits_on_dask_equal_the_threads_ones(two_blobs, counts, tmp_path, dask_client):
    kw = dict(method="online", batch_size=700, shuffle=False)
    a = GaussianMixture(3, random_state=0, scheduler=dask_client).fit(two_blobs, **kw)
    b = GaussianMixture(3, random_state=0, scheduler="threads").fit(two_blobs, **kw)
    assert rel(a.means_, b.means_) < 1e-12 and rel(a.covariances_, b.covariances_) < 1e-12
    path = write_corpus(tmp_path / "c.zarr", counts, chunk_docs=16)
    lda = dict(learning_method="online", batch_size=40, max_iter=2, random_state=0)
    la = LatentDirichletAllocation(3, scheduler=dask_client, **lda).fit(path)
    lb = LatentDirichletAllocation(3, scheduler="threads", **lda).fit(path)
    assert rel(la.components_, lb.components_) < 1e-12 and la.n_batch_iter_ == lb.n_batch_iter_ == 9
