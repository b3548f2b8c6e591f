"""Gaussian-mixture-emission HMM math: hmmlearn's GMMHMM per iteration (four covariance
types, priors), brute force over state paths, additivity over partitions."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
from scipy import special, stats as sps

from emflow.errors import FitFailedError
from emflow.estimators.gmm_hmm import GMMHMM
from emflow.models import hmm as H
from emflow.models.gmm_hmm import GMMEmission, GMMHMMParams, GMMHMMPriors, resolve_priors
from emflow.models.hmm_emissions import BaumWelch, e_step, emission_for
from emflow.stats import add
from test_hmm import _one_blas_thread, offsets_of, rel  # noqa: F401 (an autouse fixture)

hl = pytest.importorskip("hmmlearn.hmm")

K, M, D = 3, 2, 2
N_ITER = 6
CTS = ["spherical", "diag", "full", "tied"]


def random_covars(ct, rng, k=K, m=M, d=D):
    if ct == "spherical":
        return rng.uniform(0.5, 2.0, (k, m))
    if ct == "diag":
        return rng.uniform(0.5, 2.0, (k, m, d))
    A = rng.normal(size=(k, d, d) if ct == "tied" else (k, m, d, d))
    return A @ np.swapaxes(A, -1, -2) + np.eye(d)


def random_params(ct, rng, k=K, m=M, d=D, scale=3.0):
    return GMMHMMParams(rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k), k), rng.dirichlet(np.ones(m) * 2, k),
                        rng.normal(size=(k, m, d)) * scale, random_covars(ct, rng, k, m, d), ct)


@pytest.fixture(scope="module", params=[0, 1, 2])
def data(request):
    """Sequences of unequal lengths (some of length 1) from a known GMM-HMM."""
    return make_data(request.param)


def make_data(seed):
    rng = np.random.default_rng(seed)
    truth = random_params("full", rng)
    truth = truth._replace(transmat=0.3 * truth.transmat + 0.7 * np.eye(K))
    lengths = np.concatenate([[1, 2], rng.integers(5, 40, 12)])
    X = np.concatenate([H.sample_sequence(truth, int(n), rng)[0] for n in lengths])
    return seed, X, lengths


def partition_stats(family, X, lengths, p, n_parts, rng):
    off = offsets_of(lengths)
    cuts = np.sort(rng.choice(np.arange(1, len(lengths)), size=n_parts - 1, replace=False))
    parts = [family.e_step(X[off[a]:off[b]], off[a:b + 1] - off[a], p)
             for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(lengths)]]))]
    return add(*parts)


def hmmlearn_model(p: GMMHMMParams, priors: GMMHMMPriors, learn: str):
    ref = hl.GMMHMM(K, M, covariance_type=p.covariance_type, weights_prior=priors.weights_prior,
                    means_prior=priors.means_prior, means_weight=priors.means_weight,
                    covars_prior=priors.covars_prior, covars_weight=priors.covars_weight,
                    n_iter=1, init_params="", params=learn, implementation="log")
    ref.startprob_, ref.transmat_ = p.startprob.copy(), p.transmat.copy()
    ref.weights_, ref.means_, ref.covars_ = p.weights.copy(), p.means.copy(), p.covars.copy()
    return ref


def hmmlearn_iteration(ref, X, lengths) -> float:
    """One hmmlearn Baum-Welch iteration: ``fit(n_iter=1)`` without its ``_init`` (which for
    GMMHMM reruns k-means on every call, though ``init_params=""`` then discards it)."""
    ref._check()
    stats, logprob = ref._do_estep(X, lengths)
    ref._do_mstep(stats)
    return logprob


def assert_iterations_agree(p, priors, learn, X, lengths, seed, n_iter=N_ITER):
    ref = hmmlearn_model(p, priors, learn)
    family = BaumWelch(GMMEmission(M, p.covariance_type, priors, learn), H.TransitionPriors(), learn)
    rng = np.random.default_rng(seed)
    for it in range(n_iter):
        stats = partition_stats(family, X, lengths, p, 1 + it % 4, rng)
        p, report = family.m_step(stats, p)
        logprob = hmmlearn_iteration(ref, X, lengths)
        assert rel(report["log_prob"], logprob) < 1e-8, it
        for name, ours, theirs in [("startprob", p.startprob, ref.startprob_), ("transmat", p.transmat, ref.transmat_),
                                   ("weights", p.weights, ref.weights_), ("means", p.means, ref.means_),
                                   ("covars", p.covars, ref.covars_)]:
            assert rel(ours, theirs) < 1e-8, (it, name)
    return p, ref


@pytest.mark.parametrize("ct", CTS)
def test_every_iteration_equals_hmmlearn_from_the_same_start(ct, data):
    seed, X, lengths = data
    p = random_params(ct, np.random.default_rng(100 + seed))
    p, ref = assert_iterations_agree(p, GMMHMMPriors(), "stmcw", X, lengths, seed)
    fam = BaumWelch(GMMEmission(M, ct))
    assert rel(fam.e_step(X, offsets_of(lengths), p).loglik, ref.score(X, lengths)) < 1e-8


@pytest.mark.parametrize("ct", CTS)
@pytest.mark.parametrize("learn", ["stmcw", "mc", "stw", "sc"])
def test_priors_and_partial_updates_equal_hmmlearn(ct, learn, data):
    """Non-default priors of every kind, and subsets of the parameters learnt."""
    seed, X, lengths = data
    rng = np.random.default_rng(200 + seed)
    p = random_params(ct, rng)
    d_cov = {"full": (K, M, D, D), "tied": (K, D, D), "diag": (K, M, D), "spherical": (K, M)}[ct]
    cp = np.broadcast_to(np.eye(D) * 0.3, d_cov).copy() if ct in ("full", "tied") else rng.uniform(0.1, 0.5, d_cov)
    cw = {"full": 2.0, "tied": 3.0, "diag": rng.uniform(0.1, 0.5, d_cov), "spherical": 0.4}[ct]
    priors = GMMHMMPriors(weights_prior=rng.uniform(1.0, 3.0, (K, M)), means_prior=rng.normal(size=(K, M, D)),
                          means_weight=rng.uniform(0.1, 2.0, (K, M)), covars_prior=cp, covars_weight=cw)
    assert_iterations_agree(p, priors, learn, X, lengths, seed, n_iter=3)


def test_fit_with_n_iter_1_is_the_iteration_the_reference_helper_runs(data):
    """The helper above is hmmlearn's own ``fit(n_iter=1)`` minus ``_init``: check once that
    refitting the public way gives the same numbers."""
    seed, X, lengths = data
    p = random_params("diag", np.random.default_rng(7 + seed))
    a, b = hmmlearn_model(p, GMMHMMPriors(), "stmcw"), hmmlearn_model(p, GMMHMMPriors(), "stmcw")
    for _ in range(2):
        lp = hmmlearn_iteration(a, X, lengths)
        b.fit(X, lengths)
        assert rel(lp, b.monitor_.history[-1]) < 1e-12
        np.testing.assert_allclose(a.means_, b.means_, rtol=1e-12)
        np.testing.assert_allclose(a.covars_, b.covars_, rtol=1e-12)


def mixture_log_density(X, p: GMMHMMParams, k: int) -> np.ndarray:
    """log sum_m w_km N(x | mu_km, Sigma_km) with scipy, one component at a time."""
    ct = p.covariance_type
    cols = []
    for m in range(p.weights.shape[1]):
        cov = {"spherical": lambda: np.eye(X.shape[1]) * p.covars[k, m], "diag": lambda: np.diag(p.covars[k, m]),
               "full": lambda: p.covars[k, m], "tied": lambda: p.covars[k]}[ct]()
        cols.append(np.log(p.weights[k, m]) + sps.multivariate_normal(p.means[k, m], cov).logpdf(X))
    return special.logsumexp(np.stack(cols, axis=1), axis=1)


@pytest.mark.parametrize("ct", CTS)
def test_log_likelihood_and_statistics_equal_brute_force_over_state_paths(ct):
    rng = np.random.default_rng(11)
    k, m = 2, 2
    p = random_params(ct, rng, k, m, D, scale=1.0)
    lengths = [4, 1, 3]
    X = rng.normal(size=(sum(lengths), D))
    off = offsets_of(lengths)
    em = GMMEmission(m, ct)
    ref_b = np.stack([mixture_log_density(X, p, j) for j in range(k)], axis=1)
    np.testing.assert_allclose(em.log_likelihood(X, p), ref_b, rtol=1e-12)
    total, post = 0.0, np.zeros(k)
    for a, b in zip(off[:-1], off[1:]):
        T = b - a
        paths = np.array(list(itertools.product(range(k), repeat=T)))
        lp = np.log(p.startprob)[paths[:, 0]] + ref_b[a:b][np.arange(T), paths].sum(axis=1)
        lp += np.log(p.transmat)[paths[:, :-1], paths[:, 1:]].sum(axis=1)
        ll = special.logsumexp(lp)
        total += ll
        for t in range(T):
            np.add.at(post, paths[:, t], np.exp(lp - ll))
    st = e_step(X, off, p, em)
    assert rel(st.loglik, total) < 1e-12
    np.testing.assert_allclose(st.post, post, rtol=1e-12)
    np.testing.assert_allclose(st.post_mix.sum(axis=1), post, rtol=1e-12)


@pytest.mark.parametrize("ct", CTS)
def test_statistics_are_additive_over_any_split_at_sequence_boundaries(ct, data):
    seed, X, lengths = data
    p = random_params(ct, np.random.default_rng(300 + seed))
    family = BaumWelch(GMMEmission(M, ct))
    whole = family.e_step(X, offsets_of(lengths), p)
    rng = np.random.default_rng(seed)
    for n_parts in (2, 5, len(lengths)):
        split = partition_stats(family, X, lengths, p, n_parts, rng)
        for a, b, name in zip(split, whole, whole._fields):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11, err_msg=name)


def test_first_moments_about_a_shift_stay_exact_far_from_the_origin():
    """Data around 1e6: means from moments about the shift equal the centred computation."""
    rng = np.random.default_rng(2)
    p = random_params("diag", rng, scale=1.0)
    X0 = rng.normal(size=(60, D))
    fam = BaumWelch(GMMEmission(M, "diag"), params="stmcw")
    near, _ = fam.m_step(fam.e_step(X0, np.array([0, 60]), p), p)
    far_p = p._replace(means=p.means + 1e6)
    far, _ = fam.m_step(fam.e_step(X0 + 1e6, np.array([0, 60]), far_p), far_p)
    np.testing.assert_allclose(far.means - 1e6, near.means, atol=1e-8)
    np.testing.assert_allclose(far.covars, near.covars, rtol=1e-6)


def test_default_priors_are_hmmlearns():
    ref = hl.GMMHMM(K, M)
    ref.n_features = D
    for ct in CTS:
        ref.covariance_type, ref.covars_prior, ref.covars_weight = ct, None, None
        ref.weights_prior, ref.means_prior, ref.means_weight = 1.0, 0.0, 0.0
        ref._init_covar_priors()
        ref._fix_priors_shape()
        ours = resolve_priors(GMMHMMPriors(), ct, K, M, D)
        for name in GMMHMMPriors._fields:
            np.testing.assert_array_equal(getattr(ours, name), getattr(ref, name), err_msg=f"{ct} {name}")


def test_free_parameters_count_every_states_weights():
    """hmmlearn counts M - 1 free weights in all ("w": nm - 1); each of the K states has M - 1."""
    for ct in CTS:
        ref = hl.GMMHMM(K, M, covariance_type=ct)
        ref.n_features = D
        theirs = sum(ref._get_n_fit_scalars_per_param().values())
        assert BaumWelch(GMMEmission(M, ct)).n_free(K, D) == theirs + (K - 1) * (M - 1)


def test_singular_covariance_gets_hmmlearns_jitter_and_a_negative_one_is_refused_naming_the_state():
    rng = np.random.default_rng(0)
    p = random_params("full", rng)
    X = rng.normal(size=(5, D))
    cov = p.covars.copy()
    cov[1, 0] = np.ones((D, D))  # rank 1: hmmlearn's density retries with 1e-7 on the diagonal
    ref = hmmlearn_model(p._replace(covars=cov), GMMHMMPriors(), "stmcw")
    ref.n_features = D
    np.testing.assert_allclose(GMMEmission(M, "full").log_likelihood(X, p._replace(covars=cov)),
                               ref._compute_log_likelihood(X), rtol=1e-10)
    cov[1, 0] = -np.eye(D)
    with pytest.raises(FitFailedError, match="state 1"):
        GMMEmission(M, "full").log_likelihood(X, p._replace(covars=cov))


def test_sampling_and_registry_and_pickling():
    rng = np.random.default_rng(4)
    for ct in CTS:
        p = random_params(ct, rng)
        X, states = H.sample_sequence(p, 30, np.random.default_rng(1))
        X2, states2 = H.sample_sequence(p, 30, np.random.default_rng(1))
        assert X.shape == (30, D) and states.shape == (30,)
        np.testing.assert_array_equal(X, X2)
        em = emission_for(p)
        assert type(em) is GMMEmission and em.n_mix == M and em.covariance_type == ct
        fam = BaumWelch(GMMEmission(M, ct, GMMHMMPriors(weights_prior=2.0)), H.TransitionPriors(1.5, 1.0), "stmcw")
        back = pickle.loads(pickle.dumps(fam))
        a = fam.m_step(fam.e_step(X, np.array([0, 30]), p), p)[0]
        b = back.m_step(back.e_step(X, np.array([0, 30]), p), p)[0]
        for u, v in zip(a[:-1], b[:-1]):
            np.testing.assert_array_equal(u, v)


# -- the estimator face ----------------------------------------------------------------
def with_start(model, p):
    model.startprob_, model.transmat_ = p.startprob.copy(), p.transmat.copy()
    model.weights_, model.means_, model.covars_ = p.weights.copy(), p.means.copy(), p.covars.copy()
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ct", CTS)
def test_estimator_fit_score_decode_equal_hmmlearn_from_the_same_start(ct):

    seed, X, lengths = make_data(0)  # one data set for the face; the math runs on three
    p = random_params(ct, np.random.default_rng(400))
    kw = dict(n_iter=5, tol=0.0, init_params="", covariance_type=ct, weights_prior=1.5)
    ours = with_start(GMMHMM(K, M, scheduler="threads", **kw), p).fit(X, lengths)
    ref = with_start(hl.GMMHMM(K, M, **kw), p).fit(X, lengths)
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
    for name in ("startprob_", "transmat_", "weights_", "means_", "covars_"):
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-8, name
    assert rel(ours.score(X, lengths), ref.score(X, lengths)) < 1e-8
    for algorithm in ("viterbi", "map"):
        a, b = ours.decode(X, lengths, algorithm=algorithm), ref.decode(X, lengths, algorithm=algorithm)
        assert rel(a[0], b[0]) < 1e-8
        np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(ours.predict_proba(X, lengths), ref.predict_proba(X, lengths), rtol=1e-7, atol=1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ct", ["diag", "tied"])
def test_zarr_sequences_streamed_in_small_partitions_give_the_in_memory_fit(ct, tmp_path):
    from emflow.storage.sequences import write_sequences

    rng = np.random.default_rng(8)
    truth = random_params("full", rng)
    lengths = rng.integers(5, 40, 15)
    X = np.concatenate([H.sample_sequence(truth, int(n), rng)[0] for n in lengths])
    path = write_sequences(str(tmp_path / "x.zarr"), X, offsets_of(lengths))
    kw = dict(n_iter=4, tol=0.0, random_state=3, covariance_type=ct, scheduler="threads")
    mem = GMMHMM(K, M, **kw).fit(X, lengths)
    for persist in (False, True):
        z = GMMHMM(K, M, persist=persist, partition_bytes=1024, **kw).fit(path)
        assert z.fit_info_["partitions"] > 2
        for name in ("startprob_", "transmat_", "weights_", "means_", "covars_"):
            assert rel(getattr(z, name), getattr(mem, name)) < 1e-10, name


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ct", CTS)
def test_random_start_is_hmmlearns_shape_reproducible_and_saved_models_load(ct, tmp_path):

    seed, X, lengths = make_data(0)  # one data set for the face; the math runs on three
    a = GMMHMM(K, M, covariance_type=ct, random_state=5, scheduler="threads").fit(X, lengths)
    b = GMMHMM(K, M, covariance_type=ct, random_state=5, scheduler="threads").fit(X, lengths)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.means_.shape == (K, M, D) and a.weights_.shape == (K, M)
    assert a.covars_.shape == {"spherical": (K, M), "diag": (K, M, D), "full": (K, M, D, D), "tied": (K, D, D)}[ct]
    # EM from the start it chose never decreases the likelihood (hmmlearn's own check)
    assert np.all(np.diff(a.monitor_.history) > -1e-8 * np.abs(a.monitor_.history[1:]))
    import emflow

    back = emflow.load(a.save(str(tmp_path / "m.zarr")))  # found in the registry by its family
    assert type(back) is GMMHMM
    for name in ("startprob_", "transmat_", "weights_", "means_", "covars_"):
        np.testing.assert_array_equal(getattr(back, name), getattr(a, name))
    Xs, states = back.sample(25, random_state=0)
    assert Xs.shape == (25, D) and states.shape == (25,)


@pytest.mark.parametrize("kw, match", [
    (dict(n_mix=0), "n_mix must be"),
    (dict(covariance_type="banded"), "covariance_type must be one of"),
    (dict(params="stmcwx"), "params must be a string of letters from 'stmcw'"),
    (dict(weights_prior=np.ones((K, M + 1))), "priors .* must broadcast"),
    (dict(min_covar=-1.0), "min_covar must be"),
])
def test_bad_parameters_raise_config_errors_naming_them(kw, match):
    from emflow.errors import ConfigError

    X = np.random.default_rng(0).normal(size=(40, D))
    with pytest.raises(ConfigError, match=match):
        GMMHMM(**{"n_components": K, "n_mix": M, **kw}, scheduler="threads").fit(X, [20, 20])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpoints_of_the_parameters_round_trip_without_any_table(tmp_path):
    from emflow.storage import checkpoint as C
    from emflow.estimators import REGISTRY

    X, lengths = make_data(0)[-2:]
    m = REGISTRY[GMMHMM.family](3, n_iter=2, random_state=0, scheduler="threads").fit(X, lengths)
    assert REGISTRY[GMMHMM.family] is GMMHMM
    p = m._get_parameters()
    path = C.write_checkpoint(tmp_path / "c.npz", C.Checkpoint(p, m.history_, [0.0] * len(m.history_), False, "f", "h"))
    back = C.read_checkpoint(path)
    assert type(back.params) is type(p) and back.history == m.history_
    for a, b in zip(back.params, p):
        np.testing.assert_array_equal(a, b)
