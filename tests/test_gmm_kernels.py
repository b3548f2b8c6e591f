"""The GMM E-step kernels (quadratic features, Cholesky route, float32 compute) against brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import emflow
from emflow.errors import ConfigError, EmflowConvergenceWarning
from emflow.models import gmm as G
from emflow.models import gmm_kernel as GK
from emflow.storage.synthetic.gmm import make_gmm_params, sample_gmm

COV_TYPES = ["full", "tied", "diag", "spherical"]


def _params(K, d, ct, seed):
    p = make_gmm_params(K, d, ct, seed=seed)
    pc = G.precisions_cholesky_from_covariances(p["covariances"], ct)
    return G.GMMParams(p["weights"], p["means"], p["covariances"], pc, ct)


def _dense_cov(params, k):
    ct, cov = params.covariance_type, params.covariances
    d = params.means.shape[1]
    return {"full": lambda: cov[k], "tied": lambda: cov, "diag": lambda: np.diag(cov[k]),
            "spherical": lambda: np.eye(d) * cov[k]}[ct]()


def _brute_stats(X, w, params):
    """Statistics from scipy log-densities and explicit sums over rows."""
    K, d = params.means.shape
    g = G.shift_of(params)
    lp = np.column_stack([
        np.log(params.weights[k]) + multivariate_normal(params.means[k], _dense_cov(params, k)).logpdf(X)
        for k in range(K)
    ])
    lse = logsumexp(lp, axis=1)
    ww = np.ones(len(X)) if w is None else w
    R = np.exp(lp - lse[:, None]) * ww[:, None]
    Xc = X - g
    s2 = {
        "full": lambda: np.einsum("ik,id,ie->kde", R, Xc, Xc),
        "tied": lambda: np.einsum("i,id,ie->de", ww, Xc, Xc),
    }.get(params.covariance_type, lambda: R.T @ Xc**2)()
    return G.GMMStats(R.sum(0), R.T @ Xc, s2, np.asarray(lse @ ww), np.asarray(ww.sum()), np.asarray(float(len(X))))


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("ct", COV_TYPES)
@pytest.mark.parametrize("route", ["features", "cholesky"])
@pytest.mark.parametrize("weighted", [False, True])
def test_e_step_matches_brute_force(ct, route, weighted, monkeypatch):
    # "route" only changes the kernel of full covariances; the others run twice (cheap)
    monkeypatch.setattr(GK, "_use_quadratic_features", lambda K, d: route == "features")
    monkeypatch.setattr(GK, "_QUAD_BLOCK_BYTES", 40_000)  # several blocks, a ragged last one
    rng = np.random.default_rng(7)
    K, d = 4, 5
    truth = make_gmm_params(K, d, ct, seed=1)
    X, _ = sample_gmm(truth, 1500, rng)
    X += 30.0  # far from the origin: the moments are taken about the shift
    w = rng.integers(0, 4, len(X)).astype(np.float64) if weighted else None
    params = _params(K, d, ct, seed=2)._replace(means=_params(K, d, ct, seed=2).means + 30.0)
    got = G.e_step(X, w, params)
    want = _brute_stats(X, w, params)
    for name, a, b in zip(G.GMMStats._fields, got, want):
        assert _rel(a, b) < 1e-10, (name, _rel(a, b))
    # the two routes and every block size give the same numbers up to rounding
    monkeypatch.setattr(GK, "_QUAD_BLOCK_BYTES", 1 << 22)
    again = G.e_step(X, w, params)
    for a, b in zip(got, again):
        assert _rel(a, b) < 1e-12


@pytest.mark.parametrize("ct", COV_TYPES)
def test_float32_statistics_close_to_float64(ct):
    rng = np.random.default_rng(11)
    K, d = 6, 8
    truth = make_gmm_params(K, d, ct, seed=3)
    X, _ = sample_gmm(truth, 20_000, rng)
    params = _params(K, d, ct, seed=4)
    s64 = G.e_step(X, None, params)
    s32 = G.e_step(X, None, params, "float32")
    for name, a, b in zip(G.GMMStats._fields, s32, s64):
        assert np.asarray(a).dtype == np.float64  # accumulated in float64
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    # and not identical: the float32 kernel really ran in float32
    assert _rel(s32.s2, s64.s2) > 1e-12


@pytest.mark.parametrize("ct", COV_TYPES)
@pytest.mark.parametrize("data_dtype", [np.float64, np.float32])
def test_float32_fit_log_likelihood_within_1e_5(ct, data_dtype):
    rng = np.random.default_rng(5)
    K, d = 4, 8
    truth = make_gmm_params(K, d, ct, separation=2.0, seed=5)
    X, _ = sample_gmm(truth, 20_000, rng)
    X = (X + 50.0).astype(data_dtype)
    start = make_gmm_params(K, d, ct, separation=2.0, seed=6)
    prec = {"full": lambda c: np.linalg.inv(c), "tied": lambda c: np.linalg.inv(c)}.get(ct, lambda c: 1.0 / c)
    init = dict(weights_init=start["weights"], means_init=start["means"] + 50.0,
                precisions_init=prec(start["covariances"]))
    fits = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmflowConvergenceWarning)
        for cd in ("float64", "float32"):
            fits[cd] = emflow.GaussianMixture(K, covariance_type=ct, max_iter=10, tol=0.0, scheduler="threads",
                                              compute_dtype=cd, **init).fit(X)
    h64, h32 = np.array(fits["float64"].history_), np.array(fits["float32"].history_)
    assert len(h64) == len(h32) == 10
    np.testing.assert_allclose(h32, h64, rtol=1e-5, atol=0)
    np.testing.assert_allclose(fits["float32"].means_, fits["float64"].means_, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(h32, h64)


def test_compute_dtype_is_validated_and_saved(tmp_path):
    X = np.random.default_rng(0).normal(size=(200, 2))
    with pytest.raises(ConfigError, match="compute_dtype"):
        emflow.GaussianMixture(2, compute_dtype="float16").fit(X)
    gm = emflow.GaussianMixture(2, compute_dtype="float32", scheduler="threads", random_state=0).fit(X)
    back = emflow.GaussianMixture.load(gm.save(tmp_path / "m"))
    assert back.compute_dtype == "float32"
    with pytest.raises(ValueError, match="compute_dtype"):
        G.e_step(X, None, gm._params, "int32")


def test_exp_floor_gives_zero_below_and_exp_above():
    L = np.array([[0.0, -1.0, -699.0, -700.0, -708.5, -745.5, -800.0, -np.inf]])
    G._exp_floored(L)
    want = np.exp([0.0, -1.0, -699.0])
    np.testing.assert_array_equal(L[0, :2], want[:2])
    assert abs(L[0, 2] - want[2]) <= np.exp(-700.0)
    np.testing.assert_array_equal(L[0, 3:], 0.0)  # exactly zero at and below the floor


@pytest.mark.parametrize("ct", COV_TYPES)
def test_separated_clusters_and_an_empty_component_match_brute_force(ct):
    # far-apart clusters put most log-responsibilities below -708 (the slow, floored range of
    # exp); a zero weight puts a whole column at -inf: it must get exactly zero responsibility
    rng = np.random.default_rng(3)
    K, d = 5, 6
    truth = make_gmm_params(K, d, ct, separation=40.0, seed=8)
    X, _ = sample_gmm(truth, 3000, rng)
    params = _params(K, d, ct, seed=8)
    lp = G.log_prob(X, params)
    assert np.mean(lp - lp.max(1, keepdims=True) < -708) > 0.3
    got, want = G.e_step(X, None, params), _brute_stats(X, None, params)
    for name, a, b in zip(G.GMMStats._fields, got, want):
        assert _rel(a, b) < 1e-10, (name, _rel(a, b))
    weights = params.weights.copy()
    weights[1] = 0.0
    zero = G.e_step(X, None, params._replace(weights=weights / weights.sum()))
    assert zero.n[1] == 0.0 and np.all(zero.s1[1] == 0.0)
    if ct != "tied":  # tied's s2 is pooled over components
        assert np.all(zero.s2[1] == 0.0)
