"""BayesianGaussianMixture against scikit-learn's, from the same start, every iteration."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import zarr
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture as SkBGMM

import emflow
from emflow.errors import ConfigError
from emflow.models import bgmm as B

COV_TYPES = ["full", "tied", "diag", "spherical"]
PRIOR_TYPES = ["dirichlet_process", "dirichlet_distribution"]
FITTED = ["weight_concentration_", "mean_precision_", "means_", "degrees_of_freedom_", "covariances_",
          "precisions_cholesky_", "weights_"]


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(5)
    A = rng.normal(size=(3, 3))
    X = np.vstack([
        rng.multivariate_normal([0, 0, 0], np.eye(3), 150),
        rng.multivariate_normal([3, 1, -1], A @ A.T + 0.2 * np.eye(3), 150),
        rng.multivariate_normal([-2, 3, 1], np.diag([0.5, 2, 0.3]), 100),
    ])
    return X + 20.0  # away from zero: the moments are taken about a shift


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn()


def _assert_same(em, sk, rtol=1e-8):
    ref = np.ravel(np.asarray(sk.lower_bounds_, dtype=np.float64))  # tied: scikit-learn keeps (1,) arrays
    assert em.n_iter_ == sk.n_iter_ == len(ref)
    np.testing.assert_allclose(em.lower_bounds_, ref, rtol=rtol, atol=0)
    np.testing.assert_allclose(em.lower_bound_, float(np.ravel(sk.lower_bound_)[0]), rtol=rtol)
    assert em.converged_ == sk.converged_
    for name in FITTED:
        want = np.asarray(getattr(sk, name), dtype=np.float64)
        got = np.asarray(getattr(em, name))
        np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-7, atol=1e-9 * np.abs(want).max(),
                                   err_msg=name)


@pytest.mark.parametrize("pt", PRIOR_TYPES)
@pytest.mark.parametrize("ct", COV_TYPES)
def test_lower_bound_matches_sklearn_every_iteration(X, ct, pt):
    """init_params='random_from_data' with the same random_state: scikit-learn's rows, its bound
    at every iteration (1e-8 relative), its parameters and its predictions."""
    kw = dict(n_components=5, covariance_type=ct, weight_concentration_prior_type=pt,
              init_params="random_from_data", random_state=1, max_iter=25, tol=1e-6)
    sk = _quiet(lambda: SkBGMM(**kw).fit(X))
    em = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, scheduler="threads").fit(X))
    _assert_same(em, sk)
    np.testing.assert_array_equal(em.predict(X), sk.predict(X))
    np.testing.assert_allclose(em.predict_proba(X), sk.predict_proba(X), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(em.score_samples(X), sk.score_samples(X), rtol=1e-9)


def _sk_start(sk, X):
    """scikit-learn's own starting posterior (its private initialisation, run as its fit runs it)."""
    s = SkBGMM(**sk.get_params())
    s._check_parameters(X)
    s._initialize_parameters(X, np.random.RandomState(s.random_state))
    wc = s.weight_concentration_
    wc = np.vstack(wc) if isinstance(wc, tuple) else wc
    return B.BGMMParams(wc, s.mean_precision_, s.means_, np.asarray(s.degrees_of_freedom_, dtype=np.float64),
                        s.covariances_, s.precisions_cholesky_, s.covariance_type, s.weight_concentration_prior_type)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_from_sklearns_kmeans_start_with_given_priors(X, ct):
    """scikit-learn's k-means start set by hand (initial_params), priors given: same iterations."""
    d = X.shape[1]
    cov_prior = {"full": np.eye(d) * 2.0, "tied": np.eye(d) + 0.3, "diag": np.full(d, 1.5), "spherical": 0.7}[ct]
    kw = dict(n_components=4, covariance_type=ct, weight_concentration_prior_type="dirichlet_distribution",
              weight_concentration_prior=0.5, mean_precision_prior=0.1, mean_prior=X.mean(0) + 1.0,
              degrees_of_freedom_prior=d + 1.5, covariance_prior=cov_prior, random_state=0, max_iter=15, tol=1e-6)
    sk = _quiet(lambda: SkBGMM(**kw).fit(X))
    start = _sk_start(sk, X)
    em = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, scheduler="threads").fit(X, initial_params=start))
    _assert_same(em, sk)
    np.testing.assert_allclose(em.covariance_prior_, cov_prior)
    np.testing.assert_allclose(em.mean_prior_, X.mean(0) + 1.0)


def test_kmeans_plusplus_and_restarts_replay_sklearn(X):
    """k-means++ (restart 0 seeds from scikit-learn's stream) and n_init=3 random_from_data
    (one draw of scikit-learn's RandomState per restart) pick scikit-learn's starts."""
    for kw in (dict(init_params="k-means++", covariance_type="diag"),
               dict(init_params="random_from_data", n_init=3, covariance_type="full")):
        kw.update(n_components=4, random_state=3, max_iter=20, tol=1e-6)
        sk = _quiet(lambda: SkBGMM(**kw).fit(X))
        em = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, scheduler="threads").fit(X))
        _assert_same(em, sk)


def test_default_priors_are_sklearns(X):
    for ct in COV_TYPES:
        kw = dict(n_components=3, covariance_type=ct, max_iter=1, random_state=0)
        sk = _quiet(lambda: SkBGMM(**kw).fit(X))
        em = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, scheduler="threads").fit(X))
        for name in ("weight_concentration_prior_", "mean_precision_prior_", "mean_prior_",
                     "degrees_of_freedom_prior_", "covariance_prior_"):
            np.testing.assert_allclose(getattr(em, name), getattr(sk, name), rtol=1e-12, err_msg=f"{ct} {name}")


def test_default_priors_far_from_zero_in_many_partitions(tmp_path):
    """Each partition's moments are centred on its own mean and merged exactly: the covariance
    prior of data offset by 1e6 (unit spread) is scikit-learn's (np.cov) to 1e-8."""
    X = np.random.default_rng(0).normal(size=(400, 3)) @ np.diag([1.0, 2.0, 0.5]) + 1e6
    path = str(tmp_path / "far.zarr")
    zarr.create_array(store=path, data=X, chunks=(16, 3))
    for ct in COV_TYPES:
        em = emflow.BayesianGaussianMixture(n_components=2, covariance_type=ct, max_iter=0, partition_bytes=1024,
                                            scheduler="threads").fit(path)
        assert em.fit_info_["partitions"] > 10
        sk = SkBGMM(n_components=2, covariance_type=ct, max_iter=0).fit(X)
        np.testing.assert_allclose(em.covariance_prior_, sk.covariance_prior_, rtol=1e-8, err_msg=ct)
        np.testing.assert_allclose(em.mean_prior_, sk.mean_prior_, rtol=1e-14, err_msg=ct)


def test_zarr_streamed_and_persisted_equal_in_memory(X, tmp_path):
    path = str(tmp_path / "x.zarr")
    zarr.create_array(store=path, data=X, chunks=(32, X.shape[1]))
    kw = dict(n_components=4, covariance_type="tied", weight_concentration_prior_type="dirichlet_distribution",
              init_params="random_from_data", random_state=2, max_iter=10, tol=0.0)
    ref = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, scheduler="threads").fit(X))
    for persist in (False, True):
        em = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, scheduler="threads", persist=persist,
                                                           partition_bytes=2048).fit(path))
        assert em.fit_info_["partitions"] > 3
        np.testing.assert_allclose(em.history_, ref.history_, rtol=1e-12)
        for name in FITTED:
            np.testing.assert_allclose(getattr(em, name), getattr(ref, name), rtol=1e-10, atol=1e-12, err_msg=name)


def test_sample_weight_counts_rows(X):
    """A weight of 2 is the row twice (same start, same priors)."""
    w = np.ones(len(X))
    w[::3] = 2.0
    dup = np.vstack([X, X[::3]])
    kw = dict(n_components=3, covariance_type="full", max_iter=8, tol=0.0, scheduler="threads")
    start = _quiet(lambda: emflow.BayesianGaussianMixture(**{**kw, "max_iter": 0}, init_params="random_from_data",
                                                          random_state=0).fit(X))
    p = start._get_parameters()
    a = _quiet(lambda: emflow.BayesianGaussianMixture(**kw).fit(dup, initial_params=p))
    b = _quiet(lambda: emflow.BayesianGaussianMixture(**kw).fit(X, sample_weight=w, initial_params=p))
    np.testing.assert_allclose(b.history_, a.history_, rtol=1e-10)
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-10)


def test_unused_components_are_reported(X):
    kw = dict(n_components=8, weight_concentration_prior=1e-3, random_state=0, max_iter=300)
    em = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, scheduler="threads").fit(X))
    sk = _quiet(lambda: SkBGMM(**kw).fit(X))
    assert em.n_components_used_ == int(np.sum(em.weights_ >= 0.01)) == 3
    assert int(np.sum(sk.weights_ >= 0.01)) == 3
    assert em.used_components_.shape == (8,)


def test_save_load_keeps_priors_and_warm_start_continues(X, tmp_path):
    kw = dict(n_components=3, init_params="random_from_data", random_state=0, max_iter=3, tol=0.0,
              scheduler="threads")
    em = _quiet(lambda: emflow.BayesianGaussianMixture(**kw).fit(X))
    back = emflow.load(em.save(tmp_path / "m.zarr"))
    np.testing.assert_array_equal(back.covariance_prior_, em.covariance_prior_)
    np.testing.assert_array_equal(back.predict_proba(X), em.predict_proba(X))
    six = _quiet(lambda: emflow.BayesianGaussianMixture(**{**kw, "max_iter": 6}).fit(X))
    back.set_params(warm_start=True)
    _quiet(lambda: back.fit(X))  # three more iterations from where the saved fit stopped
    np.testing.assert_allclose(back.lower_bound_, six.lower_bound_, rtol=1e-12)
    np.testing.assert_allclose(back.means_, six.means_, rtol=1e-12)


# -- bad input: a ConfigError before anything is read -----------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(weight_concentration_prior=-1.0), "weight_concentration_prior"),
    (dict(weight_concentration_prior=0.0), "weight_concentration_prior"),
    (dict(mean_precision_prior=-0.5), "mean_precision_prior"),
    (dict(degrees_of_freedom_prior=0.0), "degrees_of_freedom_prior"),
    (dict(weight_concentration_prior_type="dirichlet"), "weight_concentration_prior_type"),
    (dict(covariance_prior=np.array([[1.0, 2.0], [2.0, 1.0]])), "positive-definite"),
    (dict(covariance_prior=np.array([[1.0, 0.5], [0.0, 1.0]])), "symmetric"),
    (dict(covariance_prior=np.ones(3)), "shape"),
    (dict(covariance_type="diag", covariance_prior=np.array([1.0, -1.0])), "positive"),
    (dict(covariance_type="spherical", covariance_prior=-2.0), "covariance_prior"),
    (dict(mean_prior=np.ones((2, 2))), "mean_prior"),
])
def test_bad_priors_refused_before_opening_the_data(tmp_path, kw, words):
    with pytest.raises(ConfigError, match=words):
        emflow.BayesianGaussianMixture(**kw).fit(str(tmp_path / "does_not_exist.zarr"))


@pytest.mark.parametrize("kw, words", [
    (dict(degrees_of_freedom_prior=2.0), "'degrees_of_freedom_prior' should be greater than 2, but got 2.000"),
    (dict(mean_prior=np.zeros(2)), "mean_prior"),
    (dict(covariance_prior=np.eye(2)), r"full covariance_prior' should have the shape of \(3, 3\)"),
    (dict(covariance_type="diag", covariance_prior=np.ones(4)), "shape"),
])
def test_priors_of_the_wrong_size_refused_before_any_pass(X, monkeypatch, kw, words):
    def no_pass(*a, **k):
        raise AssertionError("a pass over the data ran before the check")

    monkeypatch.setattr(B, "partition_moments", no_pass)
    with pytest.raises(ConfigError, match=words):
        emflow.BayesianGaussianMixture(**kw, scheduler="threads").fit(X)


# -- model selection in one fit -----------------------------------------------------------

def test_select_by_variational_reports_the_unused_components(X):
    from emflow.estimators.selection import select_by_variational

    res = _quiet(lambda: select_by_variational(X, 8, "full", weight_concentration_prior=1e-3, random_state=0,
                                               max_iter=300, scheduler="threads"))
    assert res.n_components == 3 == sum(r["used"] for r in res.table)
    assert [r["component"] for r in res.table] == list(range(8))
    np.testing.assert_allclose([r["weight"] for r in res.table], res.model.weights_)
    assert res.best_model is res.model


@pytest.mark.slow
def test_select_flow_variational(prefect_server, tmp_path, X):
    from flows.model_selection import select_flow

    data = str(tmp_path / "x.zarr")
    zarr.create_array(store=data, data=X, chunks=(100, X.shape[1]))
    with pytest.raises(ConfigError, match="one covariance type"):
        select_flow(data, str(tmp_path / "no.zarr"), method="variational", covariance_types=["full", "diag"])
    out = str(tmp_path / "best.zarr")
    state = select_flow(data, out, n_components=[2, 8], covariance_types=["full"], method="variational",
                        max_iter=300, persist=False, return_state=True)
    assert state.is_completed()
    res = state.result()
    assert res["best"]["max_components"] == 8 and len(res["table"]) == 8
    model = emflow.load(out)
    assert type(model) is emflow.BayesianGaussianMixture
    assert res["best"]["n_components"] == model.n_components_used_ >= 3


@pytest.mark.slow
def test_model_fit_flow_fits_the_family_by_name(prefect_server, tmp_path, X):
    """flows/fit_model.py (any registered family) with two restarts equals fit(n_init=2)."""
    from flows.fit_model import model_fit_flow

    data = str(tmp_path / "x.zarr")
    zarr.create_array(store=data, data=X, chunks=(100, X.shape[1]))
    kw = dict(n_components=4, init_params="random_from_data", max_iter=8, tol=0.0, random_state=5)
    out = str(tmp_path / "bgmm.zarr")
    state = model_fit_flow(data, out, family="bayesian_gaussian_mixture", params=kw, n_init=2, return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    ref = _quiet(lambda: emflow.BayesianGaussianMixture(**kw, n_init=2, scheduler="threads").fit(X))
    np.testing.assert_allclose(model.history_, ref.history_, rtol=1e-12)
    for name in FITTED:
        np.testing.assert_allclose(getattr(model, name), getattr(ref, name), rtol=1e-10, atol=1e-12, err_msg=name)


def test_has_no_partial_fit_as_in_scikit_learn():
    est = emflow.BayesianGaussianMixture(n_components=2)
    assert not hasattr(est, "partial_fit") and hasattr(emflow.GaussianMixture(), "partial_fit")
    with pytest.raises(AttributeError, match="GaussianMixture.partial_fit"):
        est.partial_fit(np.zeros((4, 2)))
