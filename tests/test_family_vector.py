"""The flat unconstrained parameter vector (emflow.models.family): round trips, the constraint
set, and free-parameter counts checked against scikit-learn's and hmmlearn's own counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from emflow import ConfigError
from emflow.models import family as F
from emflow.models import gmm as G
from emflow.models import hmm as H
from emflow.models import lda as LD
from emflow.models import lgssm as LG

COV_TYPES = ("full", "tied", "diag", "spherical")
PROPS = settings(max_examples=40, deadline=None)


def _spd(rng, *lead, d):
    A = rng.normal(size=lead + (d, d))
    return A @ np.swapaxes(A, -1, -2) + d * np.eye(d)


def _simplex(rng, *shape):
    p = rng.uniform(0.05, 1.0, size=shape)
    return p / p.sum(axis=-1, keepdims=True)


def _cov(rng, ct, K, d):
    return {"full": lambda: _spd(rng, K, d=d), "tied": lambda: _spd(rng, d=d),
            "diag": lambda: rng.uniform(0.1, 3.0, (K, d)), "spherical": lambda: rng.uniform(0.1, 3.0, K)}[ct]()


def make_params(kind, rng, K, d, ct="full"):
    """Random parameters of each family (inside the constraint set) and their spec."""
    if kind == "gmm":
        cov = _cov(rng, ct, K, d)
        p = G.GMMParams(_simplex(rng, K), rng.normal(size=(K, d)), cov,
                        G.precisions_cholesky_from_covariances(cov, ct), ct)
        return p, F.gmm_spec()
    if kind == "gaussian_hmm":
        p = H.GaussianHMMParams(_simplex(rng, K), _simplex(rng, K, K), rng.normal(size=(K, d)), _cov(rng, ct, K, d), ct)
        return p, F.hmm_spec()
    if kind == "categorical_hmm":
        return H.CategoricalHMMParams(_simplex(rng, K), _simplex(rng, K, K), _simplex(rng, K, d + 1)), F.categorical_hmm_spec()
    if kind == "lgssm":
        diag = ct in ("diag", "spherical")
        R = np.diag(rng.uniform(0.1, 2, d)) if diag else _spd(rng, d=d)
        p = LG.LGSSMParams(rng.normal(size=(K, K)), rng.normal(size=(d, K)), _spd(rng, d=K), R,
                           rng.normal(size=K), _spd(rng, d=K))
        return p, F.lgssm_spec(observation_covariance_type="diag" if diag else "full")
    if kind == "lda":
        alpha = rng.uniform(0.1, 2, K) if ct in ("full", "diag") else None
        return LD.make_params(rng.gamma(100, 0.01, (K, d + 1)), alpha), F.lda_spec()
    raise AssertionError(kind)


KINDS = ("gmm", "gaussian_hmm", "categorical_hmm", "lgssm", "lda")
cases = st.tuples(st.sampled_from(KINDS), st.integers(1, 4), st.integers(1, 4),
                  st.sampled_from(COV_TYPES), st.integers(0, 2**32 - 1))


def _assert_params_close(a, b, rtol=1e-12):
    assert type(a) is type(b)
    for name, x, y in zip(a._fields, a, b):
        if isinstance(x, str) or x is None:
            assert x == y, name
        else:
            np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * max(1.0, np.abs(x).max()), err_msg=name)


@PROPS
@given(cases)
def test_round_trip_params_vector_params(case):
    kind, K, d, ct, seed = case
    p, spec = make_params(kind, np.random.default_rng(seed), K, d, ct)
    v = F.to_vector(p, spec)
    assert v.dtype == np.float64 and v.ndim == 1 and v.shape[0] == F.n_free(spec, p)
    assert np.all(np.isfinite(v))
    _assert_params_close(p, F.from_vector(v, p, spec))


@PROPS
@given(cases, st.floats(0.1, 3.0))
def test_any_real_vector_maps_into_the_constraint_set_and_back(case, scale):
    kind, K, d, ct, seed = case
    rng = np.random.default_rng(seed)
    template, spec = make_params(kind, rng, K, d, ct)
    v = rng.uniform(-scale, scale, F.n_free(spec, template))
    p = F.from_vector(v, template, spec)
    for name in p._fields:
        c, x = spec.constraint(name, p), getattr(p, name)
        if c == "positive":
            assert np.all(x > 0), name
        elif c in ("simplex", "stochastic"):
            assert np.all(x > 0), name
            np.testing.assert_allclose(x.sum(axis=-1), 1.0, rtol=1e-12, err_msg=name)
        elif c == "spd":
            np.testing.assert_array_equal(x, np.swapaxes(x, -1, -2), err_msg=name)
            assert np.all(np.linalg.eigvalsh(x) > 0), name
        elif c == "diagonal":
            assert np.all(np.diagonal(x, axis1=-2, axis2=-1) > 0), name
            np.testing.assert_array_equal(x, np.diag(np.diag(x)), err_msg=name)
        elif c == "fixed":
            assert x is getattr(template, name) or np.array_equal(x, getattr(template, name)), name
    # the vector is a chart: reading it back gives the same vector (to the conditioning of the
    # SPD matrices built from it: log-diagonals 6 apart give condition numbers near 1e10)
    np.testing.assert_allclose(F.to_vector(p, spec), v, rtol=1e-7, atol=1e-7)


def test_derived_fields_are_recomputed_from_the_free_ones():
    rng = np.random.default_rng(0)
    p, spec = make_params("gmm", rng, 3, 2, "full")
    v = F.to_vector(p, spec)
    q = F.from_vector(v + 0.3, p, spec)
    np.testing.assert_allclose(q.precisions_cholesky, G.precisions_cholesky_from_covariances(q.covariances, "full"))
    lp, lspec = make_params("lda", rng, 3, 4, "full")
    lq = F.from_vector(F.to_vector(lp, lspec) - 0.5, lp, lspec)
    np.testing.assert_allclose(lq.elog_beta, LD.dirichlet_expectation_2d(lq.components))
    np.testing.assert_allclose(lq.exp_elog_beta, np.exp(lq.elog_beta))
    assert F.learnable(lp, lspec) == ["components", "doc_topic_prior"]
    assert F.learnable(lp._replace(doc_topic_prior=None), lspec) == ["components"]


@pytest.mark.parametrize("ct", COV_TYPES)
@pytest.mark.parametrize("K,d", [(1, 1), (3, 2), (4, 5)])
def test_n_free_matches_scikit_learn_gaussian_mixture(ct, K, d):
    from sklearn.mixture import GaussianMixture

    p, spec = make_params("gmm", np.random.default_rng(K * d), K, d, ct)
    ref = GaussianMixture(K, covariance_type=ct)
    ref.means_ = p.means
    ref.covariances_ = p.covariances
    assert F.n_free(spec, p) == ref._n_parameters() == G.n_parameters(K, d, ct)


@pytest.mark.parametrize("letters", ["stmc", "st", "mc", "sc", ""])
@pytest.mark.parametrize("ct", COV_TYPES)
@pytest.mark.parametrize("K,d", [(1, 1), (3, 2), (2, 4)])
def test_n_free_matches_hmmlearn_gaussian_hmm(letters, ct, K, d):
    from hmmlearn.hmm import GaussianHMM

    p, _ = make_params("gaussian_hmm", np.random.default_rng(K + d), K, d, ct)
    ref = GaussianHMM(K, covariance_type=ct)
    ref.n_features = d
    want = sum(n for letter, n in ref._get_n_fit_scalars_per_param().items() if letter in letters)
    assert F.n_free(F.hmm_spec(letters), p) == want


@pytest.mark.parametrize("letters", ["ste", "e", "st"])
@pytest.mark.parametrize("K,M", [(1, 2), (3, 4), (2, 7)])
def test_n_free_matches_hmmlearn_categorical_hmm(letters, K, M):
    from hmmlearn.hmm import CategoricalHMM

    p, _ = make_params("categorical_hmm", np.random.default_rng(K * M), K, M - 1)
    ref = CategoricalHMM(K, n_features=M)
    want = sum(n for letter, n in ref._get_n_fit_scalars_per_param().items() if letter in letters)
    assert F.n_free(F.categorical_hmm_spec(letters), p) == want


def test_lgssm_counts_and_held_fields():
    rng = np.random.default_rng(1)
    k, p_ = 2, 3
    p, _ = make_params("lgssm", rng, k, p_, "full")
    full = k * k + p_ * k + k * (k + 1) // 2 + p_ * (p_ + 1) // 2 + k + k * (k + 1) // 2
    assert F.n_free(F.lgssm_spec(), p) == full
    assert F.n_free(F.lgssm_spec(observation_covariance_type="diag"), p._replace(R=np.eye(p_))) == \
        full - p_ * (p_ + 1) // 2 + p_
    held = F.lgssm_spec(em_vars=["transition_matrix", "observation_covariance"])
    assert F.learnable(p, held) == ["A", "R"]
    q = F.from_vector(np.zeros(F.n_free(held, p)), p, held)
    assert q.C is p.C and q.Q is p.Q
    np.testing.assert_allclose(q.R, np.eye(p_))
    assert F._LGSSM_EM_VARS == LG.EM_VARS


def test_spec_of_finds_the_table_and_a_declared_spec():
    from typing import NamedTuple

    assert F.spec_of(G.GMMParams) == F.gmm_spec()
    assert F.spec_of(H.CategoricalHMMParams) == F.categorical_hmm_spec()

    class PoissonParams(NamedTuple):
        startprob: np.ndarray
        lambdas: np.ndarray

        param_spec = F.ParamSpec({"startprob": "simplex", "lambdas": "positive"})

    p = PoissonParams(np.array([0.25, 0.75]), np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert F.spec_of(p) is PoissonParams.param_spec
    np.testing.assert_allclose(F.to_vector(p, F.spec_of(p)), [np.log(1 / 3), *np.log([1, 2, 3, 4])])
    assert F.n_free(F.spec_of(p), p) == 5


def test_bad_specs_and_vectors_raise_config_errors():
    with pytest.raises(ConfigError, match="'w'.*allowed: real, positive"):
        F.ParamSpec({"w": "probability"})
    with pytest.raises(ConfigError, match="covariance_type"):
        F.by("covariance_type", full="psd")
    p, spec = make_params("gmm", np.random.default_rng(0), 2, 2, "diag")
    with pytest.raises(ConfigError, match="vec must be a 1-D vector of the 9 free"):
        F.from_vector(np.zeros(8), p, spec)
    with pytest.raises(ConfigError, match="'means'.*no constraint"):
        F.to_vector(p, F.ParamSpec({"weights": "simplex"}))
    with pytest.raises(ConfigError, match="covariance_type='other'"):
        F.to_vector(p._replace(covariance_type="other"), spec)
    with pytest.raises(ConfigError, match="declares no param_spec"):
        F.spec_of(tuple)
