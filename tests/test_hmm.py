"""Hidden Markov models: hmmlearn reference, brute force, partition invariance, bad input."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emflow.errors import ConfigError, DataError
from emflow.estimators.hmm import CategoricalHMM, GaussianHMM
from emflow.models import hmm as H
from emflow.storage.sequences import write_sequences
from emflow.stats import add
from emflow.storage.synthetic.hmm import make_hmm_params, write_hmm

hl = pytest.importorskip("hmmlearn.hmm")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: BLAS threads only contend on a shared 2-core machine (10x slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield

K, D, M = 3, 3, 5
N_ITER = 8


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def offsets_of(lengths):
    """Sequence offsets (``[0, cumsum(lengths)]``, int64) from hmmlearn-style lengths."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@pytest.fixture(scope="module")
def seqs():
    """Many Gaussian sequences of unequal lengths (some of length 1) from a known HMM."""
    rng = np.random.default_rng(7)
    lengths = np.concatenate([[1, 1, 2], rng.integers(1, 60, size=77)])
    truth = make_hmm_params(K, D, "gaussian", "full", seed=3)
    X = np.concatenate([H.sample_sequence(truth, int(n), rng)[0] for n in lengths])
    return X, lengths


def start_params(ct, rng):
    sp = rng.dirichlet(np.ones(K))
    tm = rng.dirichlet(np.ones(K), size=K)
    means = rng.normal(size=(K, D)) * 3
    if ct == "diag":
        cov = rng.uniform(0.5, 3, (K, D))
    elif ct == "spherical":
        cov = rng.uniform(0.5, 3, K)
    elif ct == "full":
        A = rng.normal(size=(K, D, D))
        cov = A @ A.transpose(0, 2, 1) + np.eye(D)
    else:
        A = rng.normal(size=(D, D))
        cov = A @ A.T + np.eye(D)
    return sp, tm, means, cov


def set_gaussian(model, sp, tm, means, cov):
    model.startprob_, model.transmat_, model.means_, model.covars_ = sp, tm, means, cov
    return model


# -- agreement with hmmlearn ------------------------------------------------------------
@pytest.mark.parametrize("ct", ["diag", "full", "spherical", "tied"])
def test_gaussian_matches_hmmlearn(seqs, ct):
    X, lengths = seqs
    p0 = start_params(ct, np.random.default_rng(11))
    ref = set_gaussian(hl.GaussianHMM(K, covariance_type=ct, init_params="", n_iter=N_ITER, tol=0), *p0)
    ref.fit(X, lengths)
    ours = set_gaussian(GaussianHMM(K, covariance_type=ct, init_params="", n_iter=N_ITER, tol=0,
                                    scheduler="threads", partition_bytes=2000), *p0)
    with pytest.warns(Warning):  # did not converge in N_ITER
        ours.fit(X, lengths)
    assert ours.fit_info_["partitions"] > 3
    assert len(ours.monitor_.history) == len(ref.monitor_.history) == N_ITER
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
    assert rel(np.asarray(ours.history_) * len(X), list(ref.monitor_.history)) < 1e-8
    assert rel(ours.startprob_, ref.startprob_) < 1e-8
    assert rel(ours.transmat_, ref.transmat_) < 1e-8
    assert rel(ours.means_, ref.means_) < 1e-8
    # hmmlearn keeps spherical variances tiled to (K, d) after its M-step
    ref_cov = ref._covars_[:, 0] if ct == "spherical" else ref._covars_
    assert rel(ours._covars_, ref_cov) < 1e-8
    # the log-likelihood never falls
    assert np.all(np.diff(ours.monitor_.history) > -1e-8 * abs(ours.monitor_.history[-1]))
    # applying the fitted model
    assert rel(ours.score(X, lengths), ref.score(X, lengths)) < 1e-10
    np.testing.assert_array_equal(ours.predict(X, lengths), ref.predict(X, lengths))
    np.testing.assert_allclose(ours.predict_proba(X, lengths), ref.predict_proba(X, lengths), rtol=1e-8, atol=1e-10)
    lp, st = ours.decode(X, lengths)
    lp_ref, st_ref = ref.decode(X, lengths)
    assert rel(lp, lp_ref) < 1e-10
    np.testing.assert_array_equal(st, st_ref)


def test_gaussian_priors_match_hmmlearn(seqs):
    X, lengths = seqs
    p0 = start_params("diag", np.random.default_rng(5))
    kw = dict(startprob_prior=2.0, transmat_prior=1.5, means_prior=0.5, means_weight=2.0,
              covars_prior=0.3, covars_weight=3.0, init_params="", n_iter=4, tol=0)
    ref = set_gaussian(hl.GaussianHMM(K, "diag", **kw), *p0).fit(X, lengths)
    ours = set_gaussian(GaussianHMM(K, "diag", scheduler="threads", **kw), *p0)
    with pytest.warns(Warning):
        ours.fit(X, lengths)
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-8, name


def test_partial_params_match_hmmlearn(seqs):
    X, lengths = seqs
    p0 = start_params("full", np.random.default_rng(9))
    kw = dict(init_params="", params="tm", n_iter=5, tol=0)
    ref = set_gaussian(hl.GaussianHMM(K, "full", **kw), *p0).fit(X, lengths)
    ours = set_gaussian(GaussianHMM(K, "full", scheduler="threads", **kw), *p0)
    with pytest.warns(Warning):
        ours.fit(X, lengths)
    np.testing.assert_array_equal(ours.startprob_, p0[0])
    np.testing.assert_array_equal(ours._covars_, p0[3])
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
    assert rel(ours.transmat_, ref.transmat_) < 1e-8
    assert rel(ours.means_, ref.means_) < 1e-8


def test_categorical_matches_hmmlearn():
    rng = np.random.default_rng(21)
    lengths = np.concatenate([[1, 3], rng.integers(1, 50, size=90)])
    truth = make_hmm_params(K, M, "categorical", seed=4)
    X = np.concatenate([H.sample_sequence(truth, int(n), rng)[0] for n in lengths])
    sp, tm = rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K), size=K)
    E = rng.dirichlet(np.ones(M), size=K)
    ref = hl.CategoricalHMM(K, n_features=M, init_params="", n_iter=N_ITER, tol=0)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = sp, tm, E
    ref.fit(X, lengths)
    ours = CategoricalHMM(K, n_features=M, init_params="", n_iter=N_ITER, tol=0, scheduler="threads",
                          partition_bytes=1024)
    ours.startprob_, ours.transmat_, ours.emissionprob_ = sp, tm, E
    with pytest.warns(Warning):
        ours.fit(X, lengths)
    assert ours.fit_info_["partitions"] > 3
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
    for name in ("startprob_", "transmat_", "emissionprob_"):
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-8, name
    np.testing.assert_array_equal(ours.predict(X, lengths), ref.predict(X, lengths))
    assert rel(ours.score(X, lengths), ref.score(X, lengths)) < 1e-10


# -- brute force -----------------------------------------------------------------------
def brute_force(log_b, sp, A):
    """Log-likelihood, posteriors, expected transitions and best path by enumerating paths."""
    T, Kb = log_b.shape
    paths = np.array(list(itertools.product(range(Kb), repeat=T)))
    lp = np.log(sp)[paths[:, 0]] + log_b[np.arange(T), paths].sum(axis=1)
    if T > 1:
        lp += np.log(A)[paths[:, :-1], paths[:, 1:]].sum(axis=1)
    ll = np.logaddexp.reduce(lp)
    w = np.exp(lp - ll)
    gamma = np.zeros((T, Kb))
    xi = np.zeros((Kb, Kb))
    for p, wp in zip(paths, w):
        gamma[np.arange(T), p] += wp
        for t in range(T - 1):
            xi[p[t], p[t + 1]] += wp
    best = paths[np.argmax(lp)]
    return ll, gamma, xi, best, lp.max()


def test_forward_backward_vs_brute_force():
    rng = np.random.default_rng(3)
    Kb = 3
    sp, A = rng.dirichlet(np.ones(Kb)), rng.dirichlet(np.ones(Kb), size=Kb)
    lengths = np.array([4, 1, 6, 2, 5])
    off = np.concatenate([[0], np.cumsum(lengths)])
    log_b = rng.normal(size=(off[-1], Kb)) * 3 - 40  # far out: tests the per-step shift
    layout = H.Layout(off)
    fb = H.forward_backward(log_b[layout.perm], layout, sp, A)
    gamma = layout.to_original(fb.gamma)
    lp_v, states = H.viterbi(log_b[layout.perm], layout, sp, A)
    xi_tot, start_tot = np.zeros((Kb, Kb)), np.zeros(Kb)
    for s in range(len(lengths)):
        sl = slice(off[s], off[s + 1])
        ll, g, xi, best, best_lp = brute_force(log_b[sl], sp, A)
        assert abs(fb.loglik[s] - ll) < 1e-10 * abs(ll)
        np.testing.assert_allclose(gamma[sl], g, rtol=1e-10, atol=1e-13)
        np.testing.assert_array_equal(states[sl], best)
        assert abs(lp_v[s] - best_lp) < 1e-10 * abs(best_lp)
        xi_tot += xi
        start_tot += g[0]
    np.testing.assert_allclose(fb.trans, xi_tot, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(fb.start, start_tot, rtol=1e-10)


def test_statistics_add_over_splits(seqs):
    """The statistics of all sequences equal the sum over any split into runs of sequences."""
    X, lengths = seqs
    off = np.concatenate([[0], np.cumsum(lengths)])
    sp, tm, means, cov = start_params("full", np.random.default_rng(1))
    p = H.GaussianHMMParams(sp, tm, means, cov, "full")
    whole = H.e_step_gaussian(X, off, p)
    for cuts in ([0, 10, 40, 80], [0, 1, 2, 79, 80]):
        parts = [H.e_step_gaussian(X[off[a]:off[b]], off[a:b + 1] - off[a], p) for a, b in zip(cuts[:-1], cuts[1:])]
        total = add(*parts)
        for f in whole._fields:
            np.testing.assert_allclose(getattr(total, f), getattr(whole, f), rtol=1e-10, atol=1e-9, err_msg=f)


# -- partitioning and backends -----------------------------------------------------------
@pytest.fixture(scope="module")
def zarr_seqs(tmp_path_factory, seqs):
    X, lengths = seqs
    path = tmp_path_factory.mktemp("hmm") / "seqs.zarr"
    write_sequences(path, X, np.concatenate([[0], np.cumsum(lengths)]), chunk_steps=97)
    return str(path)


def fit_zarr(path, **kw):
    m = set_gaussian(GaussianHMM(K, "diag", init_params="", n_iter=5, tol=0, **kw),
                     *start_params("diag", np.random.default_rng(2)))
    with pytest.warns(Warning):
        return m.fit(path)


def assert_same_fit(a, b, tol=1e-10):
    assert rel(a.monitor_.history, b.monitor_.history) < tol
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        assert rel(getattr(a, name), getattr(b, name)) < tol, name


def test_partitionings_agree(zarr_seqs):
    one = fit_zarr(zarr_seqs, scheduler="threads")
    many = fit_zarr(zarr_seqs, scheduler="threads", partition_bytes=3000)
    assert many.fit_info_["partitions"] >= 5 and one.fit_info_["partitions"] < many.fit_info_["partitions"]
    assert_same_fit(one, many)


def test_dask_client_matches_threads(zarr_seqs, dask_client):
    threads = fit_zarr(zarr_seqs, scheduler="threads", partition_bytes=3000)
    dask = fit_zarr(zarr_seqs, scheduler=dask_client, partition_bytes=3000)
    assert "Dask" in dask.fit_info_["engine"]
    assert_same_fit(threads, dask)
    # Viterbi written to Zarr by the workers, partitions crossing chunk boundaries
    out = os.path.join(os.path.dirname(zarr_seqs), "states.zarr")
    dask.set_params(scheduler=dask_client)
    g = dask.predict(zarr_seqs, out=out)
    X, lengths = _read(zarr_seqs)
    dask.set_params(scheduler="threads")
    np.testing.assert_array_equal(g["values"][:], dask.predict(X, lengths))
    np.testing.assert_array_equal(g["offsets"][:], np.concatenate([[0], np.cumsum(lengths)]))


def _read(path):
    import zarr

    g = zarr.open_group(path, mode="r")
    return g["values"][:], np.diff(g["offsets"][:])


def test_predict_out_threads_small_chunks(zarr_seqs, tmp_path):
    m = fit_zarr(zarr_seqs, scheduler="threads", partition_bytes=2500)
    X, lengths = _read(zarr_seqs)
    g = m.predict(zarr_seqs, out=tmp_path / "v.zarr")
    np.testing.assert_array_equal(g["values"][:], m.predict(X, lengths))
    gp = m.predict_proba(zarr_seqs, out=tmp_path / "p.zarr")
    np.testing.assert_allclose(gp["values"][:], m.predict_proba(X, lengths), rtol=1e-12, atol=1e-15)


# -- fitting from scratch, persistence, generator ---------------------------------------
def test_fit_from_scratch_recovers_truth(tmp_path):
    path = write_hmm(tmp_path / "g.zarr", 150, 2, 2, "gaussian", "diag", min_length=20, max_length=60, seed=5)
    m = GaussianHMM(2, n_iter=50, random_state=0, scheduler="threads", partition_bytes=8000).fit(path)
    assert m.converged_
    assert np.all(np.diff(m.monitor_.history) > -1e-6)
    import zarr

    truth = zarr.open_group(path, mode="r").attrs["truth"]
    order = np.argsort(m.means_[:, 0])
    t_order = np.argsort(np.asarray(truth["means"])[:, 0])
    np.testing.assert_allclose(m.means_[order], np.asarray(truth["means"])[t_order], atol=0.15)
    np.testing.assert_allclose(m.transmat_[np.ix_(order, order)],
                               np.asarray(truth["transmat"])[np.ix_(t_order, t_order)], atol=0.05)
    # save / load
    m.save(tmp_path / "m.zarr")
    m2 = GaussianHMM.load(tmp_path / "m.zarr")
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        np.testing.assert_array_equal(getattr(m2, name), getattr(m, name))
    assert m2.monitor_.history == m.monitor_.history and m2.history_ == m.history_
    assert m2.score(path) == m.score(path)


def test_categorical_fit_and_save(tmp_path):
    path = write_hmm(tmp_path / "c.zarr", 120, 2, 4, "categorical", seed=8)
    m = CategoricalHMM(2, n_iter=100, tol=0.1, random_state=1, scheduler="threads").fit(path)
    assert m.n_features == 4 and m.emissionprob_.shape == (2, 4)
    assert np.all(np.diff(m.monitor_.history) > -1e-6)
    m.save(tmp_path / "cm.zarr")
    m2 = CategoricalHMM.load(tmp_path / "cm.zarr")
    np.testing.assert_array_equal(m2.emissionprob_, m.emissionprob_)
    X, states = m2.sample(50, random_state=0)
    assert X.shape == (50, 1) and X.max() < 4 and states.shape == (50,)


def test_generator_is_seeded(tmp_path):
    a = write_hmm(tmp_path / "a.zarr", 30, 2, 2, seed=3, sequences_per_chunk=7)
    b = write_hmm(tmp_path / "b.zarr", 30, 2, 2, seed=3, sequences_per_chunk=7)
    Xa, La = _read(a)
    Xb, Lb = _read(b)
    np.testing.assert_array_equal(Xa, Xb)
    np.testing.assert_array_equal(La, Lb)
    assert La.min() >= 10 and La.max() <= 200 and len(La) == 30


# -- bad input -----------------------------------------------------------------------------
def _fresh_gaussian():
    return set_gaussian(GaussianHMM(K, "diag", init_params="", n_iter=2, scheduler="threads"),
                        *start_params("diag", np.random.default_rng(0)))


def test_zero_length_sequence_rejected():
    X = np.zeros((10, D))
    with pytest.raises(DataError, match="sequence 1 has length 0"):
        _fresh_gaussian().fit(X, [4, 0, 6])


def test_lengths_not_matching_values():
    with pytest.raises(DataError, match="do not match the values"):
        _fresh_gaussian().fit(np.zeros((10, D)), [4, 5])


def test_bad_offsets_in_zarr(tmp_path):
    import zarr

    def group(name, offsets, n=10):
        g = zarr.open_group(tmp_path / name, mode="w")
        g.create_array("values", data=np.zeros((n, D)), config={"write_empty_chunks": True})
        g.create_array("offsets", data=np.asarray(offsets, dtype=np.int64))
        return str(tmp_path / name)

    with pytest.raises(DataError, match="strictly increasing"):
        _fresh_gaussian().fit(group("dec.zarr", [0, 6, 4, 10]))
    with pytest.raises(DataError, match="do not match the values"):
        _fresh_gaussian().fit(group("short.zarr", [0, 4, 8]))
    with pytest.raises(DataError, match=r"offsets.*\[0\] must be 0"):
        _fresh_gaussian().fit(group("start.zarr", [2, 4, 10]))
    with pytest.raises(ConfigError, match="lengths is for in-memory"):
        _fresh_gaussian().fit(group("ok.zarr", [0, 4, 10]), [4, 6])


def test_categorical_out_of_range(tmp_path):
    X = np.array([0, 1, 2, 5, 1, 0])[:, None]
    m = CategoricalHMM(2, n_features=4, scheduler="threads")
    with pytest.raises(DataError, match="step 3 holds symbol 5"):
        m.fit(X, [3, 3])
    with pytest.raises(DataError, match="symbols must be >= 0"):
        CategoricalHMM(2, scheduler="threads").fit(np.array([[0], [-1], [1]]))
    with pytest.raises(DataError, match="must be integers"):
        CategoricalHMM(2, scheduler="threads").fit(np.array([[0.5], [1.0]]))
    path = write_sequences(tmp_path / "c.zarr", X, np.array([0, 3, 6]))
    with pytest.raises(DataError, match="step 3 holds symbol 5"):
        m.fit(path)


def test_categorical_symbol_ids_that_are_not_codes():
    # one huge id would make the inferred emission matrix 3 x 2e9: refused before allocating
    X = np.array([[0], [1], [2_000_000_000], [1]])
    with pytest.raises(DataError, match=r"emission matrix would be 3 x 2000000001 \(44.7 GiB\).*recode"):
        CategoricalHMM(3, scheduler="threads").fit(X)


def test_parameters_not_set_are_initialised_as_hmmlearn_does():
    # hmmlearn's rule: a parameter not named in init_params is initialised anyway when unset
    m = GaussianHMM(2, init_params="mc", n_iter=1, scheduler="threads")
    with pytest.warns(Warning):
        m.fit(np.random.default_rng(0).normal(size=(30, 2)))
    assert m.startprob_.shape == (2,) and m.transmat_.shape == (2, 2)
    with pytest.raises(ConfigError, match="params must be a string"):
        GaussianHMM(2, params="stx").fit(np.zeros((5, 2)))


def test_long_sequences_in_compiled_code_equal_the_batched_numpy_path(monkeypatch):
    """The longest sequences of a partition run one at a time in hmmlearn's compiled
    recursions, the rest batched; both must give what the all-NumPy path gives."""
    rng = np.random.default_rng(3)
    K = 3
    lengths = np.concatenate([[3000, 900], rng.integers(1, 40, 60)])
    off = np.concatenate([[0], np.cumsum(lengths)])
    layout = H.Layout(off)
    log_b = layout.to_time_major(np.log(rng.random((off[-1], K))))
    A, pi = rng.dirichlet(np.ones(K), K), rng.dirichlet(np.ones(K))
    assert 0 < H._n_long(layout) < len(lengths)  # a mix of both paths
    fb, vit = H.forward_backward(log_b, layout, pi, A), H.viterbi(log_b, layout, pi, A)
    monkeypatch.setattr(H, "_hmmc", None)
    assert H._n_long(layout) == 0
    fb0, vit0 = H.forward_backward(log_b, layout, pi, A), H.viterbi(log_b, layout, pi, A)
    for a, b in zip(fb, fb0):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(vit[0], vit0[0], rtol=1e-12)
    np.testing.assert_array_equal(vit[1], vit0[1])


@settings(max_examples=40, deadline=None)
@given(short=st.lists(st.integers(1, 20), max_size=60), long=st.lists(st.integers(100, 600), max_size=3),
       K=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_any_split_between_compiled_and_batched_paths_gives_the_numpy_answer(short, long, K, seed):
    """Whatever the lengths (so whatever number of sequences the cost model sends to compiled
    code: none, some or all), forward-backward and Viterbi equal the all-NumPy path."""
    lengths = short + long
    if not lengths:
        return
    rng = np.random.default_rng(seed)
    off = np.concatenate([[0], np.cumsum(rng.permutation(lengths))])
    layout = H.Layout(off)
    log_b = layout.to_time_major(np.log(rng.uniform(0.01, 1.0, (off[-1], K))))
    A, pi = rng.dirichlet(np.ones(K), K), rng.dirichlet(np.ones(K))
    fb, vit = H.forward_backward(log_b, layout, pi, A), H.viterbi(log_b, layout, pi, A)
    hmmc, H._hmmc = H._hmmc, None
    try:
        fb0, vit0 = H.forward_backward(log_b, layout, pi, A), H.viterbi(log_b, layout, pi, A)
    finally:
        H._hmmc = hmmc
    for a, b in zip(fb, fb0):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(vit[0], vit0[0], rtol=1e-12)
    # paths may differ only where two paths tie to rounding; with continuous random emissions they do not
    np.testing.assert_array_equal(vit[1], vit0[1])


@pytest.mark.parametrize("lengths", [[500], [5, 5, 5]])  # the compiled path, the batched one
def test_unreachable_step_is_named_on_either_path(lengths):
    from emflow.errors import FitFailedError

    off = np.concatenate([[0], np.cumsum(lengths)])
    layout = H.Layout(off)
    log_b = np.zeros((off[-1], 2))
    log_b[3, 0] = -np.inf  # state 0 cannot emit step 3, and state 1 is never entered
    with pytest.raises(FitFailedError, match="Step 3 of the partition cannot be reached"):
        H.forward_backward(layout.to_time_major(log_b), layout, np.array([1.0, 0.0]), np.eye(2))
