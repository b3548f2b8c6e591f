"""Poisson-emission HMM math: hmmlearn's PoissonHMM per iteration, brute force, additivity."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
from scipy import special, stats as sps

from emflow.errors import DataError
from emflow.models import hmm as H
from emflow.models.hmm_emissions import BaumWelch, e_step, emission_for
from emflow.models.poisson_hmm import PoissonEmission, PoissonHMMParams, initial_lambdas
from emflow.estimators.poisson_hmm import PoissonHMM
from emflow.stats import add
from test_hmm import _one_blas_thread, offsets_of, rel  # noqa: F401 (an autouse fixture)

hl = pytest.importorskip("hmmlearn.hmm")

K, D = 3, 4
N_ITER = 8


def make_data(seed):
    """Counts from a known Poisson HMM, in sequences of unequal lengths (some of length 1)."""
    rng = np.random.default_rng(seed)
    truth = PoissonHMMParams(rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K) * 3, K) * 0.3 + 0.7 * np.eye(K),
                             rng.gamma(2.0, 2.0, (K, D)))
    lengths = np.concatenate([[1, 2], rng.integers(1, 40, 20)])
    X = np.concatenate([H.sample_sequence(truth, int(n), rng)[0] for n in lengths])
    return X, lengths


def start_of(seed):
    rng = np.random.default_rng(100 + seed)
    return PoissonHMMParams(rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K), K), rng.gamma(2.0, 2.0, (K, D)))


def partition_stats(family, X, lengths, p, n_parts, rng):
    """Statistics summed over a random split of the sequences into partitions."""
    off = offsets_of(lengths)
    cuts = np.sort(rng.choice(np.arange(1, len(lengths)), size=n_parts - 1, replace=False))
    parts = []
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(lengths)]])):
        parts.append(family.e_step(X[off[a]:off[b]], off[a:b + 1] - off[a], p))
    return add(*parts)


PRIORS = [  # (lambdas_prior, lambdas_weight): none, scalars, arrays of hmmlearn's shapes
    (0.0, 0.0),
    (2.0, 0.5),
    (np.linspace(0.5, 3.0, K * D).reshape(K, D), np.linspace(0.1, 1.0, K * D).reshape(K, D)),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prior", range(len(PRIORS)))
@pytest.mark.parametrize("learn", ["stl", "sl", "tl"])
def test_every_iteration_equals_hmmlearn_from_the_same_start(seed, prior, learn):
    """hmmlearn refitted with n_iter=1 from its own last parameters, emflow's Baum-Welch
    over random partitions of the sequences: parameters and log-likelihood to 1e-8 each step."""
    X, lengths = make_data(seed)
    p = start_of(seed)
    lp, lw = PRIORS[prior]
    ref = hl.PoissonHMM(K, lambdas_prior=lp, lambdas_weight=lw, n_iter=1, init_params="", params=learn,
                        implementation="log")
    ref.startprob_, ref.transmat_, ref.lambdas_ = p.startprob.copy(), p.transmat.copy(), p.lambdas.copy()
    family = BaumWelch(PoissonEmission(lp, lw, learn), H.TransitionPriors(), learn)
    rng = np.random.default_rng(seed)
    for it in range(N_ITER):
        stats = partition_stats(family, X, lengths, p, 1 + it % 4, rng)
        p, report = family.m_step(stats, p)
        ref.fit(X, lengths)
        assert rel(report["log_prob"], ref.monitor_.history[-1]) < 1e-8, it
        assert rel(p.startprob, ref.startprob_) < 1e-8, it
        assert rel(p.transmat, ref.transmat_) < 1e-8, it
        assert rel(p.lambdas, ref.lambdas_) < 1e-8, it
    # and the log-likelihood of the final parameters
    assert rel(family.e_step(X, offsets_of(lengths), p).loglik, ref.score(X, lengths)) < 1e-8


def brute_force(log_b, startprob, transmat):
    """log p(x) and posteriors gamma (T, K) of one sequence, by enumerating every state path."""
    T, Kb = log_b.shape
    with np.errstate(divide="ignore"):
        lpi, lA = np.log(startprob), np.log(transmat)
    paths = np.array(list(itertools.product(range(Kb), repeat=T)))
    lp = lpi[paths[:, 0]] + log_b[np.arange(T), paths].sum(axis=1)
    lp += lA[paths[:, :-1], paths[:, 1:]].sum(axis=1)
    total = special.logsumexp(lp)
    w = np.exp(lp - total)
    gamma = np.zeros((T, Kb))
    for t in range(T):
        np.add.at(gamma[t], paths[:, t], w)
    return total, gamma


def test_log_likelihood_and_statistics_equal_brute_force_over_state_paths():
    rng = np.random.default_rng(5)
    p = PoissonHMMParams(rng.dirichlet(np.ones(2)), rng.dirichlet(np.ones(2), 2), rng.gamma(2.0, 1.5, (2, 3)))
    lengths = [5, 1, 3]
    X = rng.poisson(2.0, (sum(lengths), 3)).astype(np.float64)
    off = offsets_of(lengths)
    em = PoissonEmission()
    log_b = em.log_likelihood(X, p)
    ref_b = np.stack([sps.poisson.logpmf(X, p.lambdas[k]).sum(axis=1) for k in range(2)], axis=1)
    np.testing.assert_allclose(log_b, ref_b, rtol=1e-13)
    total, post, obs = 0.0, np.zeros(2), np.zeros((2, 3))
    for a, b in zip(off[:-1], off[1:]):
        ll, gamma = brute_force(ref_b[a:b], p.startprob, p.transmat)
        total += ll
        post += gamma.sum(axis=0)
        obs += gamma.T @ X[a:b]
    st = e_step(X, off, p, em)
    assert rel(st.loglik, total) < 1e-12
    np.testing.assert_allclose(st.post, post, rtol=1e-12)
    np.testing.assert_allclose(st.obs, obs, rtol=1e-12)
    assert float(st.n_sequences) == 3 and float(st.n_steps) == 9


def test_statistics_are_additive_over_any_split_at_sequence_boundaries():
    X, lengths = make_data(3)
    p = start_of(3)
    family = BaumWelch(PoissonEmission())
    whole = family.e_step(X, offsets_of(lengths), p)
    rng = np.random.default_rng(0)
    for n_parts in (2, 5, len(lengths)):
        split = partition_stats(family, X, lengths, p, n_parts, rng)
        for a, b, name in zip(split, whole, whole._fields):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


def test_zero_rate_counts_zero_observations_as_certain():
    """A rate of 0 (a feature a state never emits): log p(0) = 0, log p(x > 0) = -inf, as scipy."""
    p = PoissonHMMParams(np.array([0.5, 0.5]), np.full((2, 2), 0.5), np.array([[0.0, 2.0], [1.0, 3.0]]))
    X = np.array([[0.0, 1.0], [2.0, 0.0]])
    ref = np.stack([sps.poisson.logpmf(X, p.lambdas[k]).sum(axis=1) for k in range(2)], axis=1)
    np.testing.assert_array_equal(np.isinf(PoissonEmission().log_likelihood(X, p)), np.isinf(ref))
    np.testing.assert_allclose(PoissonEmission().log_likelihood(X, p)[np.isfinite(ref)], ref[np.isfinite(ref)],
                               rtol=1e-13)


@pytest.mark.parametrize("bad, where", [(-1.0, "step 1, feature 0"), (1.5, "step 1, feature 0"),
                                         (np.nan, "step 1, feature 0")])
def test_counts_that_are_not_whole_non_negative_numbers_are_refused_by_step(bad, where):
    X = np.ones((4, 2))
    X[1, 0] = bad
    p = start_of(0)._replace(lambdas=np.ones((K, 2)))
    with pytest.raises(DataError, match=where):
        e_step(X, np.array([0, 4]), p, PoissonEmission())
    with pytest.raises(DataError, match="n_steps, n_features"):
        PoissonEmission().observations(np.ones(4), p)


def test_empty_state_keeps_its_rates_and_is_reported():
    """A state no step can be in (start 0, no transition in): hmmlearn's 0/0; emflow keeps it."""
    p = PoissonHMMParams(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[2.0], [7.0]]))
    X = np.array([[1.0], [3.0], [2.0]])
    family = BaumWelch(PoissonEmission(), params="stl")
    new, report = family.m_step(family.e_step(X, np.array([0, 3]), p), p)
    assert report["empty_states"] == [1] and report["kept_states"] == [1]
    np.testing.assert_allclose(new.lambdas, [[2.0], [7.0]])


def test_sampling_is_the_state_path_then_one_poisson_draw_per_step():
    p = start_of(1)
    X, states = H.sample_sequence(p, 50, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    rng.random(50)  # the state path's draws
    np.testing.assert_array_equal(X, rng.poisson(p.lambdas[states]))
    assert X.shape == (50, D) and states.shape == (50,)
    assert type(emission_for(p)) is PoissonEmission


def test_free_parameters_equal_hmmlearn_count_and_components_pickle():
    ref = hl.PoissonHMM(K)
    ref.n_features = D
    assert BaumWelch(PoissonEmission()).n_free(K, D) == sum(ref._get_n_fit_scalars_per_param().values())
    fam = BaumWelch(PoissonEmission(np.ones((K, D)), 0.5, "l"), H.TransitionPriors(2.0, 1.0), "stl")
    back = pickle.loads(pickle.dumps(fam))
    p = start_of(0)
    X, lengths = make_data(0)
    a, b = fam.e_step(X, offsets_of(lengths), p), back.e_step(X, offsets_of(lengths), p)
    for u, v in zip(fam.m_step(a, p)[0], back.m_step(b, p)[0]):
        np.testing.assert_array_equal(u, v)


def test_initial_lambdas_draw_hmmlearn_gamma_from_the_moments():
    X, _ = make_data(0)
    mean, var = X.mean(), X.var()
    lam = initial_lambdas(mean, var, K, D, np.random.default_rng(4))
    np.testing.assert_array_equal(lam, np.random.default_rng(4).gamma(mean**2 / var, var / mean, (K, D)))
    with pytest.raises(DataError, match="not all equal"):
        initial_lambdas(1.0, 0.0, K, D, np.random.default_rng(0))


# -- the estimator face ----------------------------------------------------------------
def with_start(model, p):
    model.startprob_, model.transmat_, model.lambdas_ = p.startprob.copy(), p.transmat.copy(), p.lambdas.copy()
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", [0, 1])
def test_estimator_fit_score_decode_equal_hmmlearn_from_the_same_start(seed):

    X, lengths = make_data(seed)
    p = start_of(seed)
    kw = dict(n_iter=6, tol=0.0, init_params="", lambdas_prior=0.5, lambdas_weight=0.2)
    ours = with_start(PoissonHMM(K, scheduler="threads", **kw), p).fit(X, lengths)
    ref = with_start(hl.PoissonHMM(K, **kw), p).fit(X, lengths)
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
    for name in ("startprob_", "transmat_", "lambdas_"):
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-8, name
    assert rel(ours.score(X, lengths), ref.score(X, lengths)) < 1e-8
    lp, post = ours.score_samples(X, lengths)
    rlp, rpost = ref.score_samples(X, lengths)
    assert rel(lp, rlp) < 1e-8
    np.testing.assert_allclose(post, rpost, rtol=1e-7, atol=1e-10)
    for algorithm in ("viterbi", "map"):
        a, b = ours.decode(X, lengths, algorithm=algorithm), ref.decode(X, lengths, algorithm=algorithm)
        assert rel(a[0], b[0]) < 1e-8
        np.testing.assert_array_equal(a[1], b[1])
    assert ours.n_features == D and ours._n_parameters() == K - 1 + K * (K - 1) + K * D


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_zarr_sequences_streamed_in_small_partitions_give_the_in_memory_fit(tmp_path):
    from emflow.storage.sequences import write_sequences

    X, lengths = make_data(4)
    path = write_sequences(str(tmp_path / "counts.zarr"), X.astype(np.int64), offsets_of(lengths))
    kw = dict(n_iter=5, tol=0.0, random_state=3, scheduler="threads")
    mem = PoissonHMM(K, **kw).fit(X, lengths)
    for persist in (False, True):
        z = PoissonHMM(K, persist=persist, partition_bytes=1024, **kw).fit(path)
        assert z.fit_info_["partitions"] > 2
        for name in ("startprob_", "transmat_", "lambdas_"):
            assert rel(getattr(z, name), getattr(mem, name)) < 1e-10, name
        assert rel(z.history_, mem.history_) < 1e-10


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_random_start_is_reproducible_and_saved_models_load_bit_identical(tmp_path):

    X, lengths = make_data(5)
    a = PoissonHMM(K, random_state=7, scheduler="threads").fit(X, lengths)
    b = PoissonHMM(K, random_state=7, scheduler="threads").fit(X, lengths)
    np.testing.assert_array_equal(a.lambdas_, b.lambdas_)
    import emflow

    back = emflow.load(a.save(str(tmp_path / "m.zarr")))  # found in the registry by its family
    assert type(back) is PoissonHMM
    for name in ("startprob_", "transmat_", "lambdas_"):
        np.testing.assert_array_equal(getattr(back, name), getattr(a, name))
    np.testing.assert_array_equal(back.predict(X, lengths), a.predict(X, lengths))
    Xs, states = a.sample(20, random_state=1)
    assert Xs.shape == (20, D) and states.shape == (20,)


@pytest.mark.parametrize("kw, match", [
    (dict(lambdas_prior=-1.0), "lambdas_prior must be"),
    (dict(lambdas_weight=np.ones((K, D + 1))), "lambdas_weight must be a number or broadcast"),
    (dict(params="stlx"), "params must be a string of letters from 'stl'"),
    (dict(implementation="fast"), "implementation must be one of"),
    (dict(n_components=0), "n_components must be"),
])
def test_bad_parameters_raise_config_errors_naming_them(kw, match):
    from emflow.errors import ConfigError

    X, lengths = make_data(0)
    with pytest.raises(ConfigError, match=match):
        PoissonHMM(**{"n_components": K, **kw}, scheduler="threads").fit(X, lengths)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_count_data_and_feature_mismatch_are_refused():
    from emflow.errors import FeatureMismatchError

    X, lengths = make_data(0)
    with pytest.raises(DataError, match="Poisson observations must be counts"):
        PoissonHMM(K, scheduler="threads").fit(X + 0.5, lengths)
    m = with_start(PoissonHMM(K, init_params="", n_iter=1, scheduler="threads"), start_of(0))
    m.fit(X, lengths)
    with pytest.raises(FeatureMismatchError, match="fitted on 4 feature"):
        m.predict(X[:, :3], lengths)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpoints_of_the_parameters_round_trip_without_any_table(tmp_path):
    from emflow.storage import checkpoint as C
    from emflow.estimators import REGISTRY

    X, lengths = make_data(0)[-2:]
    m = REGISTRY[PoissonHMM.family](3, n_iter=2, random_state=0, scheduler="threads").fit(X, lengths)
    assert REGISTRY[PoissonHMM.family] is PoissonHMM
    p = m._get_parameters()
    path = C.write_checkpoint(tmp_path / "c.npz", C.Checkpoint(p, m.history_, [0.0] * len(m.history_), False, "f", "h"))
    back = C.read_checkpoint(path)
    assert type(back.params) is type(p) and back.history == m.history_
    for a, b in zip(back.params, p):
        np.testing.assert_array_equal(a, b)
