"""The HMM estimators speak hmmlearn: hand-set parameters, init_params / params, sampling,
implementation=, near-degenerate full covariances, persistence of n_features_in."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

import emflow
from emflow.errors import ConfigError, DataError, NotFittedError
from emflow.estimators.hmm import CategoricalHMM, GaussianHMM
from test_hmm import _one_blas_thread, rel  # noqa: F401 (an autouse fixture)

hl = pytest.importorskip("hmmlearn.hmm")

K, D = 3, 2
CTS = ["spherical", "diag", "full", "tied"]


def gaussian_start(ct, seed=0):
    rng = np.random.default_rng(seed)
    sp, tm = rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K) * 3, size=K)
    means = rng.normal(size=(K, D)) * 4
    cov = {"spherical": rng.uniform(0.5, 2, K), "diag": rng.uniform(0.5, 2, (K, D)),
           "full": np.array([a @ a.T + np.eye(D) for a in rng.normal(size=(K, D, D))]),
           "tied": np.eye(D) + 0.3}[ct]
    return dict(startprob_=sp, transmat_=tm, means_=means, covars_=cov)


def hand_set(model, **attrs):
    for k, v in attrs.items():
        setattr(model, k, v)
    return model


def data(seed=1, n=(30, 1, 17, 40)):
    ref = hand_set(hl.GaussianHMM(K, "full"), **gaussian_start("full", 5))
    X = ref.sample(sum(n), random_state=seed)[0]
    return X, list(n)


# -- a model whose parameters are set by hand is usable, as hmmlearn's ------------------
@pytest.mark.parametrize("ct", CTS)
def test_hand_set_gaussian_scores_decodes_and_predicts_as_hmmlearn(ct):
    X, lengths = data()
    start = gaussian_start(ct)
    ref = hand_set(hl.GaussianHMM(K, ct), **start)
    ours = hand_set(GaussianHMM(K, ct, scheduler="threads"), **start)
    assert rel(ours.score(X, lengths), ref.score(X, lengths)) < 1e-10
    lp, post = ours.score_samples(X, lengths)
    lp_ref, post_ref = ref.score_samples(X, lengths)
    assert rel(lp, lp_ref) < 1e-10
    np.testing.assert_allclose(post, post_ref, rtol=1e-8, atol=1e-12)
    for algorithm in ("viterbi", "map"):
        lp, st = ours.decode(X, lengths, algorithm=algorithm)
        lp_ref, st_ref = ref.decode(X, lengths, algorithm=algorithm)
        assert rel(lp, lp_ref) < 1e-10
        np.testing.assert_array_equal(st, st_ref)
    np.testing.assert_array_equal(ours.predict(X, lengths), ref.predict(X, lengths))
    assert rel(ours.bic(X, lengths), ref.bic(X, lengths)) < 1e-10
    assert rel(ours.aic(X, lengths), ref.aic(X, lengths)) < 1e-10
    assert ours.n_features == ours.n_features_in_ == D
    assert ours.covars_.shape == ref.covars_.shape == (K, D, D)
    np.testing.assert_allclose(ours.get_stationary_distribution(), ref.get_stationary_distribution(), rtol=1e-12)


def test_hand_set_categorical_as_hmmlearn():
    attrs = dict(startprob_=np.array([0.6, 0.4]), transmat_=np.array([[0.7, 0.3], [0.4, 0.6]]),
                 emissionprob_=np.array([[0.1, 0.4, 0.5], [0.6, 0.3, 0.1]]))
    ref = hand_set(hl.CategoricalHMM(2), **attrs)
    ours = hand_set(CategoricalHMM(2, scheduler="threads"), **attrs)
    X = ref.sample(200, random_state=3)[0]
    assert rel(ours.score(X, [120, 80]), ref.score(X, [120, 80])) < 1e-10
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=1e-8)
    lp, st = ours.decode([[0], [1], [2]])
    assert round(np.exp(lp), 5) == 0.01344 and list(st) == [1, 0, 0]  # Wikipedia's Viterbi example
    assert ours.n_features == 3 and ours.n_features_in_ == 1


def test_unset_parameters_are_not_fitted_errors_and_bad_ones_config_errors():
    m = GaussianHMM(K, "diag", scheduler="threads")
    with pytest.raises(NotFittedError, match="not fitted yet"):
        m.score(np.zeros((4, D)))
    start = gaussian_start("diag")
    hand_set(m, startprob_=start["startprob_"], transmat_=start["transmat_"], means_=start["means_"])
    with pytest.raises(NotFittedError, match="_covars_"):
        m.predict(np.zeros((4, D)))
    assert issubclass(NotFittedError, AttributeError)
    m.covars_ = start["covars_"]
    m.startprob_ = np.array([0.5, 0.2, 0.2])
    with pytest.raises(ConfigError, match=r"startprob_ must sum to 1 \(got 0.9000\)"):
        m.score(np.zeros((4, D)))
    m.startprob_ = start["startprob_"]
    m.transmat_ = np.ones((K, K))
    with pytest.raises(ConfigError, match="transmat_ rows must sum to 1"):
        m.sample(3)
    m.transmat_ = start["transmat_"]
    m.means_ = np.zeros((K + 1, D))
    with pytest.raises(ConfigError, match=r"means_ must be .* shape \(n_components, n_features\)"):
        m.decode(np.zeros((4, D)))
    with pytest.raises(ConfigError, match="'diag' covars must be positive"):
        m.covars_ = -np.ones((K, D))
    with pytest.raises(ConfigError, match="component 1 of 'full' covars must be symmetric, positive-definite"):
        GaussianHMM(2, "full").covars_ = np.stack([np.eye(2), -np.eye(2)])
    with pytest.raises(ConfigError, match="covariance_type must be one of"):
        GaussianHMM(2, "bad").covars_ = []
    c = CategoricalHMM(2)
    hand_set(c, startprob_=[0.5, 0.5], transmat_=np.eye(2), emissionprob_=np.ones((1, 3)) / 3)
    with pytest.raises(ConfigError, match=r"emissionprob_ must have shape"):
        c.predict([[0], [1]])
    for bad in (dict(implementation="fast"), dict(algorithm="best"), dict(n_iter=-1)):
        with pytest.raises(ConfigError, match=list(bad)[0]):
            GaussianHMM(2, **bad).fit(np.zeros((6, 1)))


def test_spherical_covars_accept_hmmlearns_shapes():
    m = GaussianHMM(2, "spherical")
    m.covars_ = np.array([[[[4.0]]], [[[3.0]]]])  # hmmlearn's issue 385
    np.testing.assert_array_equal(m._covars_, [4.0, 3.0])
    m.covars_ = [[1.0, 1.0], [2.0, 2.0]]  # hmmlearn's tiled (K, d) form
    np.testing.assert_array_equal(m._covars_, [1.0, 2.0])
    with pytest.raises(ConfigError, match="one variance per state"):
        m.covars_ = [[1.0, 2.0], [2.0, 2.0]]


# -- sampling --------------------------------------------------------------------------
@pytest.mark.parametrize("ct", CTS)
def test_sample_draws_hmmlearns_samples(ct):
    start = gaussian_start(ct, 2)
    ref = hand_set(hl.GaussianHMM(K, ct), **start)
    ours = hand_set(GaussianHMM(K, ct), **start)
    for rs in (7, np.random.RandomState(7)):
        X, Z = ours.sample(60, random_state=rs)
        X_ref, Z_ref = ref.sample(60, random_state=7)
        np.testing.assert_array_equal(Z, Z_ref)
        np.testing.assert_allclose(X, X_ref, rtol=1e-12)
    X, Z = ours.sample(5, random_state=7, currstate=2)
    X_ref, Z_ref = ref.sample(5, random_state=7, currstate=2)
    np.testing.assert_array_equal(Z, Z_ref)
    # None: NumPy's global RandomState decides, as in hmmlearn
    np.random.seed(11)
    X, Z = ours.sample(20)
    np.random.seed(11)
    X_ref, Z_ref = ref.sample(20)
    np.testing.assert_allclose(X, X_ref, rtol=1e-12)
    # a Generator draws emflow's vectorised samples
    X, Z = ours.sample(30, random_state=np.random.default_rng(0))
    assert X.shape == (30, D) and Z.shape == (30,)
    with pytest.raises(ConfigError, match="n_samples"):
        ours.sample(0)
    with pytest.raises(ConfigError, match="currstate"):
        ours.sample(3, currstate=K)


def test_categorical_sample_draws_hmmlearns_samples():
    attrs = dict(startprob_=np.array([0.6, 0.4]), transmat_=np.array([[0.7, 0.3], [0.4, 0.6]]),
                 emissionprob_=np.array([[0.1, 0.4, 0.5], [0.6, 0.3, 0.1]]))
    X, Z = hand_set(CategoricalHMM(2), **attrs).sample(100, random_state=4)
    X_ref, Z_ref = hand_set(hl.CategoricalHMM(2), **attrs).sample(100, random_state=4)
    np.testing.assert_array_equal(X, X_ref)
    np.testing.assert_array_equal(Z, Z_ref)
    assert X.shape == (100, 1)


# -- init_params and params -------------------------------------------------------------
def test_init_params_follow_hmmlearns_rule(caplog):
    X, lengths = data()
    m = GaussianHMM(K, "diag", init_params="", n_iter=1, scheduler="threads", random_state=0)
    with pytest.warns(Warning):
        m.fit(X, lengths)  # nothing set: everything is initialised
    assert m.means_.shape == (K, D)
    start = gaussian_start("diag")
    m = hand_set(GaussianHMM(K, "diag", init_params="m", n_iter=0, scheduler="threads"), **start)
    with caplog.at_level(logging.WARNING, logger="emflow.hmm"):
        m.fit(X, lengths)
    assert ["will be overwritten" in r.getMessage() and "'means_'" in r.getMessage() for r in caplog.records] == [True]
    np.testing.assert_array_equal(m.startprob_, start["startprob_"])
    np.testing.assert_array_equal(m._covars_, start["covars_"])
    assert not np.array_equal(m.means_, start["means_"])


def test_fit_logs_hmmlearns_warnings(caplog, monkeypatch):
    import emflow.estimators._hmm_work as W

    X, lengths = data()
    start = gaussian_start("diag", 1)
    kw = dict(init_params="", n_iter=4, tol=0, means_prior=20.0, means_weight=50.0, covars_prior=5.0,
              covars_weight=30.0)  # priors that empty the rows of two states
    m_step = W.H.m_step_gaussian

    calls = []

    def falling(stats, *args):  # a log-likelihood that falls: what hmmlearn's monitor logs
        params, report = m_step(stats, *args)
        calls.append(1)
        return params, {**report, "log_prob": -float(stats.n_steps) * len(calls)}

    monkeypatch.setattr(W.H, "m_step_gaussian", falling)
    with caplog.at_level(logging.WARNING, logger="emflow.hmm"), pytest.warns(Warning):
        hand_set(GaussianHMM(K, "diag", scheduler="threads", **kw), **start).fit(X, lengths)
    messages = [r.getMessage() for r in caplog.records]
    assert "Model is not converging.  Current: -176.0 is not greater than -88.0. Delta is -88.0" in messages
    assert "Some rows of transmat_ have zero sum because no transition from the state was ever observed." in messages


def test_random_state_none_follows_numpys_global_seed():
    X, lengths = data()
    fits = []
    for seed in (5, 5, 6):
        np.random.seed(seed)
        m = CategoricalHMM(2, n_iter=2, scheduler="threads")
        with pytest.warns(Warning):
            fits.append(m.fit((X[:, :1] > 0).astype(int), lengths).emissionprob_)
    np.testing.assert_array_equal(fits[0], fits[1])
    assert not np.array_equal(fits[0], fits[2])


def test_too_little_data_logs_hmmlearns_warning(caplog):
    m = hand_set(GaussianHMM(K, "full", init_params=""), **gaussian_start("full"))
    with caplog.at_level(logging.WARNING):
        m._init(np.zeros((4, D)), 4)
    assert [r.getMessage() for r in caplog.records] == [
        "Fitting a model with 23 free scalar parameters with only 8 data points will result in a degenerate "
        "solution."]


# (hmmlearn accumulates the posterior mass only with "m": "c" without "m" divides by zero there)
@pytest.mark.parametrize("params", ["st", "mc", "tm", "s"])
def test_params_letters_match_hmmlearn_per_iteration(params):
    X, lengths = data()
    start = gaussian_start("full", 3)
    ref = hand_set(hl.GaussianHMM(K, "full", init_params="", params=params, n_iter=1), **start)
    ours = hand_set(GaussianHMM(K, "full", init_params="", params=params, n_iter=1, scheduler="threads",
                                partition_bytes=1024), **start)
    for _ in range(4):
        ref.fit(X, lengths)
        with pytest.warns(Warning):
            ours.fit(X, lengths)
        assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
        for name in ("startprob_", "transmat_", "means_", "_covars_"):
            assert rel(getattr(ours, name), getattr(ref, name)) < 1e-8, name
    for name, letter in (("startprob_", "s"), ("transmat_", "t"), ("means_", "m"), ("covars_", "c")):
        if letter not in params:
            np.testing.assert_array_equal(getattr(ours, name), start[name])


# -- near-degenerate data: hmmlearn's density jitter, not a failure ------------------------
ZERO_VARIANCE = np.array([  # hmmlearn's test_fit_zero_variance (its GitHub issue 2)
    [715.0, 585.0, 0.0, 0.0], [715.0, 520.0, 1.04705811, -60.3696289], [715.0, 455.0, 0.72088623, -52.7055664],
    [715.0, 390.0, -0.457946777, -78.0605469], [715.0, 325.0, -6.43127441, -55.9954834],
    [715.0, 260.0, -2.90063477, -78.0220947], [715.0, 195.0, 8.45532227, -70.3294373],
    [715.0, 130.0, 4.09387207, -58.3621216], [715.0, 65.0, -1.2166748, -44.8131409]])


def test_singular_covariance_gets_hmmlearns_jitter():
    """A covariance whose Cholesky factorisation fails is used as ``Sigma + 1e-7 I`` by
    hmmlearn's density (the stored value unchanged): emflow does the same, so the fit goes
    on with hmmlearn's numbers instead of failing. State 0 starts singular, as after it
    collapsed onto steps on a line (the steps of its segments lie on that line)."""
    from scipy import linalg

    rng = np.random.default_rng(2)
    start = gaussian_start("full", 4)
    line = np.array([1.0, 1.0]) / np.sqrt(2)
    singular = np.outer(line, line) * 2.0 - 1e-9 * np.eye(2)  # eigenvalues 2 - 1e-9 and -1e-9
    with pytest.raises(linalg.LinAlgError):
        linalg.cholesky(singular, lower=True)
    cov = start["covars_"].copy()
    cov[0] = singular
    Z = rng.integers(0, K, 120)
    X = np.where((Z == 0)[:, None], start["means_"][0] + rng.normal(size=(120, 1)) * line,
                 start["means_"][Z] + rng.normal(size=(120, D)))
    lengths = [50, 70]
    ref = hand_set(hl.GaussianHMM(K, "full", init_params="", n_iter=1), startprob_=start["startprob_"],
                   transmat_=start["transmat_"], means_=start["means_"])
    ours = hand_set(GaussianHMM(K, "full", init_params="", n_iter=1, scheduler="threads"),
                    startprob_=start["startprob_"], transmat_=start["transmat_"], means_=start["means_"])
    ref._covars_ = ours._covars_ = cov  # hmmlearn's setter (and emflow's) refuse a singular matrix
    assert rel(ours.score(X, lengths), ref.score(X, lengths)) < 1e-8
    np.testing.assert_array_equal(ours.predict(X, lengths), ref.predict(X, lengths))
    # one iteration: its E-step runs on the jittered matrix (its M-step gives a matrix as
    # singular again, the steps lying on a line, whose digits are rounding from then on)
    ref.fit(X, lengths)
    with pytest.warns(Warning):
        ours.fit(X, lengths)
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
    for name in ("startprob_", "transmat_", "means_", "_covars_"):
        assert rel(getattr(ours, name), getattr(ref, name)) < 1e-8, name


def test_near_degenerate_data_go_on_as_hmmlearn(tmp_path):
    """hmmlearn's zero-variance example: a constant column and 9 steps for 3 full-covariance
    states. Agreement per iteration until the covariances become singular to rounding (from
    then on the values ~715 squared swamp variances ~1e-12, and neither implementation's
    digits mean anything); then the fit goes on to n_iter, as hmmlearn's does."""
    ref = hl.GaussianHMM(3, "full", random_state=0)
    ref._init(ZERO_VARIANCE)
    start = dict(startprob_=ref.startprob_, transmat_=ref.transmat_, means_=ref.means_, covars_=ref._covars_)
    ref = hand_set(hl.GaussianHMM(3, "full", init_params="", n_iter=1), **start)
    ours = hand_set(GaussianHMM(3, "full", init_params="", n_iter=1, scheduler="threads"), **start)
    for _ in range(4):
        ref.fit(ZERO_VARIANCE)
        with pytest.warns(Warning):
            ours.fit(ZERO_VARIANCE)
        assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8
        assert np.abs(ours.means_ - ref.means_).max() < 1e-8 * np.abs(ref.means_).max()
        assert np.abs(ours._covars_ - ref._covars_).max() < 1e-7 * np.abs(ref._covars_).max()
    assert np.linalg.eigvalsh(ours._covars_).min() < 1e-9  # a state has collapsed
    m = hand_set(GaussianHMM(3, "full", init_params="", n_iter=10, tol=0, scheduler="threads"), **start)
    with pytest.warns(Warning):
        m.fit(ZERO_VARIANCE)
    assert m.n_iter_ == 10 and np.all(np.isfinite(m.monitor_.history))
    path = m.save(tmp_path / "zero_variance.zarr")  # and the model saves and loads
    assert emflow.load(path).score(ZERO_VARIANCE) == m.score(ZERO_VARIANCE)


# -- implementation= -----------------------------------------------------------------------
def test_implementation_scaling_fails_on_underflow_as_hmmlearn():
    rng = np.random.default_rng(10)
    X = np.concatenate([rng.normal(0, 1, 100), rng.normal(5, 1, 100)])[:, None]
    X[40] = 10000  # every state's density underflows to 0 in linear scale
    kw = dict(covariance_type="spherical", init_params="", n_iter=3)
    start = dict(startprob_=[0.0, 1.0], transmat_=[[0.4, 0.6], [0.6, 0.4]], means_=[[0], [5]], covars_=[1, 1])
    with pytest.raises(ValueError):
        hand_set(hl.GaussianHMM(2, implementation="scaling", **kw), **start).fit(X)
    with pytest.raises(DataError, match="underflow.*implementation='log'"):
        hand_set(GaussianHMM(2, implementation="scaling", scheduler="threads", **kw), **start).fit(X)
    with pytest.raises(DataError, match="underflow"):
        hand_set(GaussianHMM(2, implementation="scaling", **kw), **start).score(X)
    ours = hand_set(GaussianHMM(2, scheduler="threads", **kw), **start)
    ref = hand_set(hl.GaussianHMM(2, **kw), **start).fit(X)
    with pytest.warns(Warning):
        ours.fit(X)
    assert rel(ours.monitor_.history, list(ref.monitor_.history)) < 1e-8


# -- execution parameters and persistence --------------------------------------------------
def test_partition_bytes_none_is_the_default():
    X, _ = data(n=(25, 25))
    m = GaussianHMM(2, partition_bytes=None, scheduler="threads", random_state=0, n_iter=3, tol=0)
    with pytest.warns(Warning):
        m.fit(X, [25, 25])
    assert m.get_params()["partition_bytes"] is None and np.isfinite(m.score(X, [25, 25]))


def test_save_writes_n_features_in_and_loads_old_models(tmp_path):
    start = gaussian_start("tied")
    m = hand_set(GaussianHMM(K, "tied", scheduler="threads"), **start)
    path = m.save(tmp_path / "hand.zarr")  # a hand-set model saves too
    loaded = emflow.load(path)
    assert loaded.n_features_in_ == D
    np.testing.assert_array_equal(loaded.covars_, m.covars_)
    # a model saved before n_features_in (its fit record says n_features) still loads
    ptr = os.path.join(path, "zarr.json")
    with open(ptr) as f:
        doc = json.load(f)
    fitted = doc["attributes"]["emflow"]["fitted"]
    fitted["n_features"] = fitted.pop("n_features_in")
    with open(ptr, "w") as f:
        json.dump(doc, f)
    old = GaussianHMM.load(path)
    assert old.n_features == old.n_features_in_ == D
    X, lengths = data()
    assert rel(old.score(X, lengths), m.score(X, lengths)) < 1e-12
