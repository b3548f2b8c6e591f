"""LDA: estimating the topic-word prior ``eta`` (``learn_topic_word_prior``), batch and online."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import minimize, root
from scipy.special import digamma

from emflow.errors import ConfigError
from emflow.estimators.lda import LatentDirichletAllocation
from emflow.models import lda as M
from emflow.models.family import n_free
from emflow.storage.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from emflow.storage.corpus import open_corpus
from emflow.storage.synthetic.lda import write_lda


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("lda_eta") / "corpus.zarr"
    write_lda(path, n_docs=120, n_terms=40, n_components=3, mean_length=30, seed=5, chunk_docs=16)
    return str(path)


def reference_eta(params: M.LDAParams, mode: str, start) -> np.ndarray:
    """Brute force: scipy's BFGS on the bound's topic terms (``M.topic_bound``) over ``log eta``,
    polished by scipy's root finder on the gradient.

    The gradient is the derivative of ``topic_bound`` in ``eta`` written out from its formula
    (``K (psi(sum eta) - psi(eta_v)) + sum_k E[log beta_kv]``), so the optimiser converges to
    the rounding level; the objective is emflow's own bound.
    """
    K, V = params.components.shape
    S = params.elog_beta.sum(axis=0)

    def full(y):
        return np.full(V, np.exp(y[0])) if mode == "symmetric" else np.exp(y)

    def negf(y):
        eta = full(y)
        return -M.topic_bound(params, eta[0] if mode == "symmetric" else eta)

    def grad(y):
        eta = full(y)
        g = K * (digamma(eta.sum()) - digamma(eta)) + S  # d topic_bound / d eta_v
        return -(np.array([g.sum()]) if mode == "symmetric" else g) * np.exp(y)

    y0 = np.log(np.atleast_1d(np.asarray(start, dtype=float)))
    y0 = y0[:1] if mode == "symmetric" else np.broadcast_to(y0, (V,)).copy()
    res = minimize(negf, y0, jac=grad, method="BFGS", options={"gtol": 1e-13, "maxiter": 2000})
    # BFGS stops where the bound is flat to rounding; polish: the gradient's root from there
    y = root(grad, res.x, method="hybr", tol=1e-15).x
    # 1e-10: with lambda ~1e5 (partial_fit's scaling) the bound's terms cancel to about that
    assert negf(y) <= negf(res.x) + 1e-10 * abs(negf(res.x))
    return np.exp(y[0]) if mode == "symmetric" else np.exp(y)


# -- the update ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_update_is_the_maximiser_of_the_bounds_eta_terms(mode):
    rng = np.random.default_rng(0)
    for K, V, shape, start in [(3, 5, 2.0, 0.3), (4, 7, 0.5, 1.0), (2, 6, 20.0, 0.01)]:
        params = M.make_params(rng.gamma(shape, 1.0, (K, V)) + 0.05)
        got, steps = M.update_topic_word_prior(start, params.elog_beta, mode)
        ref = reference_eta(params, mode, start)
        assert got.shape == (() if mode == "symmetric" else (V,))
        assert rel(got, ref) < 1e-8 and steps < 100, (got, ref)
        e_got = got if mode == "asymmetric" else float(got)
        assert M.topic_bound(params, e_got) >= M.topic_bound(params, ref) - 1e-12 * abs(M.topic_bound(params, ref))
        again, _ = M.update_topic_word_prior(got, params.elog_beta, mode)  # a maximiser stays put
        assert rel(again, got) < 1e-10


def test_m_step_sets_lambda_from_the_old_eta_then_maximises_eta(corpus):
    entries, indptr = open_corpus(corpus, chunk_docs=120).loaders[0]()
    params = M.make_params(M.init_components(3, 40, 0), None, np.full(40, 0.2))
    stats = M.e_step(entries, indptr, params, 1 / 3, 100, 1e-3, None, 0)
    new, report = M.m_step(stats, params, params.topic_word_prior, None, "asymmetric")
    np.testing.assert_array_equal(new.components, 0.2 + stats.sstats * params.exp_elog_beta)
    assert rel(new.topic_word_prior, reference_eta(new, "asymmetric", 0.2)) < 1e-8
    assert report["topic_word_prior_newton_steps"] >= 1
    # the topic terms rise from the old eta to the new one, for the new lambda
    assert M.topic_bound(new, new.topic_word_prior) > M.topic_bound(new, params.topic_word_prior)
    fixed, _ = M.m_step(stats, params, params.topic_word_prior)
    assert fixed.topic_word_prior is None
    np.testing.assert_array_equal(fixed.components, new.components)


# -- the estimator ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_batch_fit_bound_never_decreases_and_eta_is_the_maximiser(corpus, mode):
    kw = dict(n_components=3, max_iter=12, random_state=0, doc_topic_init="ones", scheduler="threads")
    fixed = LatentDirichletAllocation(**kw).fit(corpus)
    learned = LatentDirichletAllocation(**kw, learn_topic_word_prior=mode).fit(corpus)
    h = np.array(learned.history_)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:])), np.diff(h)
    assert learned.lower_bound_ > fixed.lower_bound_
    eta = learned.topic_word_prior_
    assert isinstance(eta, float) if mode == "symmetric" else eta.shape == (40,)
    # the fitted eta maximises the bound's eta terms for the fitted topics
    params = M.make_params(learned.components_)
    assert rel(eta, reference_eta(params, mode, 1 / 3)) < 1e-8
    # bound_ and perplexity() use it: the bound computed by hand with the learned eta
    entries, indptr = open_corpus(corpus, chunk_docs=120).loaders[0]()
    stats = M.e_step(entries, indptr, params, 1 / 3, 100, 1e-3, None, 0)
    want = np.exp(-M.bound(stats, params, eta) / float(stats.n_words))
    assert rel(learned.bound_, want) < 1e-12 and rel(learned.perplexity(corpus), want) < 1e-12
    # one free scalar (symmetric) or V (asymmetric) more than the fixed-prior model
    extra = 1 if mode == "symmetric" else 40
    assert learned._n_parameters() == fixed._n_parameters() + extra


def test_same_answer_for_partitionings_save_load_and_checkpoint(corpus, tmp_path):
    kw = dict(n_components=3, max_iter=4, random_state=1, learn_topic_word_prior="asymmetric",
              learn_doc_topic_prior=True, scheduler="threads")
    a = LatentDirichletAllocation(**kw).fit(open_corpus(corpus))
    b = LatentDirichletAllocation(**kw).fit(open_corpus(corpus, partition_bytes=12 * 300))
    assert rel(b.topic_word_prior_, a.topic_word_prior_) < 1e-10 and rel(b.history_, a.history_) < 1e-10
    for mode in ("asymmetric", True):
        m = a if mode == "asymmetric" else LatentDirichletAllocation(
            n_components=3, max_iter=3, random_state=1, learn_topic_word_prior=True, scheduler="threads").fit(corpus)
        m.save(tmp_path / f"m{mode}.zarr")
        back = LatentDirichletAllocation.load(tmp_path / f"m{mode}.zarr")
        np.testing.assert_array_equal(back.topic_word_prior_, m.topic_word_prior_)
        assert type(back.topic_word_prior_) is type(m.topic_word_prior_)
        assert back.perplexity(corpus) == m.perplexity(corpus)
        got = back._get_parameters().topic_word_prior
        np.testing.assert_array_equal(got, m.topic_word_prior_)
    # a checkpoint keeps the estimate (generic NamedTuple fields)
    p = a._get_parameters()
    write_checkpoint(tmp_path / "c.npz", Checkpoint(p, [-1.0], [0.1], False, "f", "h"))
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "c.npz").params.topic_word_prior, p.topic_word_prior)
    # and a fit resumes from such parameters only when it estimates the same kind of eta
    with pytest.raises(ConfigError, match="topic_word_prior of shape"):
        LatentDirichletAllocation(**{**kw, "learn_topic_word_prior": "symmetric"}).fit(corpus, initial_params=p)


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_online_and_partial_fit_re_estimate_eta_after_every_batch(corpus, mode):
    kw = dict(n_components=3, random_state=0, batch_size=32, learn_topic_word_prior=mode, scheduler="threads")
    m = LatentDirichletAllocation(**kw, learning_method="online", max_iter=2).fit(corpus)
    params = M.make_params(m.components_)
    assert rel(m.topic_word_prior_, reference_eta(params, mode, 1 / 3)) < 1e-8
    assert np.isfinite(m.bound_)
    # the model math by hand: one batch of stepwise EM from the same start
    from emflow.models.lda_online import LDAOnlineFamily

    fam = LDAOnlineFamily(1 / 3, 1 / 3, 100, 1e-3, False, False, mode)
    entries, indptr = open_corpus(corpus, chunk_docs=120).loaders[0]()
    p0 = M.make_params(M.init_components(3, 40, 0))
    stats = M.e_step(entries, indptr, p0, 1 / 3, 100, 1e-3, None, 0)
    new, _ = fam.online_m_step(fam.online_stats(stats, p0, 1.0), p0)
    np.testing.assert_allclose(new.components, 1 / 3 + stats.sstats * p0.exp_elog_beta, rtol=1e-14)
    assert rel(new.topic_word_prior, reference_eta(new, mode, 1 / 3)) < 1e-8
    # the next batch's target uses the estimate
    np.testing.assert_allclose(fam.online_stats(stats, new, 2.0),
                               new.topic_word_prior + 2.0 * (stats.sstats * new.exp_elog_beta), rtol=1e-14)
    # partial_fit: the same, continued across calls
    X = sp.csr_matrix(np.random.default_rng(1).poisson(0.7, (50, 40)))
    pf = LatentDirichletAllocation(**kw).partial_fit(X)
    first = np.copy(pf.topic_word_prior_)
    pf.partial_fit(X)
    assert rel(pf.topic_word_prior_, reference_eta(M.make_params(pf.components_), mode, 1 / 3)) < 1e-8
    assert not np.array_equal(first, pf.topic_word_prior_)


@pytest.mark.parametrize("bad", ["yes", "auto", 1, None, 0.5])
def test_bad_learn_topic_word_prior_is_a_config_error(corpus, bad):
    with pytest.raises(ConfigError, match="learn_topic_word_prior must be False, True, 'symmetric' or 'asymmetric'"):
        LatentDirichletAllocation(learn_topic_word_prior=bad).fit(corpus)
    with pytest.raises(ConfigError, match="topic_word_prior"):
        LatentDirichletAllocation(topic_word_prior=-1.0, learn_topic_word_prior=True).fit(corpus)


def test_param_spec_counts_eta_only_when_estimated():
    from emflow.models.family import lda_spec

    p = M.make_params(np.ones((2, 3)))
    assert n_free(lda_spec(), p) == 6
    assert n_free(lda_spec(), p._replace(topic_word_prior=np.array(0.5))) == 7
    assert n_free(lda_spec(), p._replace(topic_word_prior=np.full(3, 0.5))) == 9
