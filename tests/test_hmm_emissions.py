"""HMM emission components: the registry, hmmlearn's per-state sampling stream, and Baum-Welch
over the Gaussian and categorical components equal to hmmlearn from the same start."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from emflow.models import hmm as H
from emflow.models.gmm_hmm import GMMEmission, GMMHMMParams
from emflow.models.hmm_emissions import (BaumWelch, CategoricalEmission, Emission, GaussianEmission,
                                         emission_for)
from emflow.models.poisson_hmm import PoissonEmission, PoissonHMMParams

hl = pytest.importorskip("hmmlearn.hmm")

K, D, M = 3, 2, 4


def spd(rng, *shape):
    A = rng.normal(size=(*shape, D, D))
    return A @ np.swapaxes(A, -1, -2) + np.eye(D)


def examples(rng):
    """(our params, hmmlearn model with the same parameters) for every emission."""
    sp, tm = rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K), K)
    out = []
    for ct in H.COVARIANCE_TYPES:
        cov = {"spherical": rng.uniform(0.5, 2, K), "diag": rng.uniform(0.5, 2, (K, D)),
               "full": spd(rng, K), "tied": spd(rng)}[ct]
        p = H.GaussianHMMParams(sp, tm, rng.normal(size=(K, D)), cov, ct)
        ref = hl.GaussianHMM(K, covariance_type=ct)
        ref.n_features = D
        ref.startprob_, ref.transmat_, ref.means_, ref.covars_ = sp, tm, p.means, cov
        out.append((p, ref))
    p = H.CategoricalHMMParams(sp, tm, rng.dirichlet(np.ones(M), K))
    ref = hl.CategoricalHMM(K)
    ref.n_features = M
    ref.startprob_, ref.transmat_, ref.emissionprob_ = sp, tm, p.emissionprob
    out.append((p, ref))
    p = PoissonHMMParams(sp, tm, rng.gamma(2.0, 2.0, (K, D)))
    ref = hl.PoissonHMM(K)
    ref.n_features = D
    ref.startprob_, ref.transmat_, ref.lambdas_ = sp, tm, p.lambdas
    out.append((p, ref))
    for ct in H.COVARIANCE_TYPES:
        n_mix = 2
        cov = {"spherical": rng.uniform(0.5, 2, (K, n_mix)), "diag": rng.uniform(0.5, 2, (K, n_mix, D)),
               "full": spd(rng, K, n_mix), "tied": spd(rng, K)}[ct]
        p = GMMHMMParams(sp, tm, rng.dirichlet(np.ones(n_mix), K), rng.normal(size=(K, n_mix, D)), cov, ct)
        ref = hl.GMMHMM(K, n_mix, covariance_type=ct)
        ref.n_features = D
        ref.startprob_, ref.transmat_, ref.weights_, ref.means_, ref.covars_ = sp, tm, p.weights, p.means, cov
        out.append((p, ref))
    return out


def test_each_params_type_finds_its_component_from_the_registry():
    found = {type(emission_for(p)) for p, _ in examples(np.random.default_rng(0))}
    assert found == {GaussianEmission, CategoricalEmission, PoissonEmission, GMMEmission}
    with pytest.raises(TypeError, match="No HMM emission component"):
        emission_for((np.ones(1), np.ones((1, 1))))

    from emflow.models import hmm_emissions

    class Other(Emission):  # a new emission registers itself by declaring its params type
        params_type = tuple

    try:
        assert type(emission_for(())) is Other
    finally:
        del hmm_emissions._BY_PARAMS[tuple]


@pytest.mark.parametrize("seed", [0, 1])
def test_one_state_draws_are_hmmlearns_random_state_stream(seed):
    for p, ref in examples(np.random.default_rng(seed)):
        em = emission_for(p)
        for state in range(K):
            ours = em.sample(state, np.random.RandomState(seed + 10 * state), p)
            theirs = ref._generate_sample_from_state(state, np.random.RandomState(seed + 10 * state))
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, err_msg=type(em).__name__)


@pytest.mark.parametrize("seed", [0, 1])
def test_frame_log_prob_of_every_component_equals_hmmlearn(seed):
    rng = np.random.default_rng(seed)
    for p, ref in examples(rng):
        em = emission_for(p)
        if isinstance(em, CategoricalEmission):
            X = rng.integers(0, M, (20, 1))
        elif isinstance(em, PoissonEmission):
            X = rng.poisson(3.0, (20, D))
        else:
            X = rng.normal(size=(20, D)) * 2
        np.testing.assert_allclose(H.frame_log_prob(X, p), ref._compute_log_likelihood(X), rtol=1e-10,
                                   err_msg=type(em).__name__)


@pytest.mark.parametrize("ct", H.COVARIANCE_TYPES)
def test_baum_welch_over_the_gaussian_component_is_the_gaussian_m_step(ct):
    """The generic family and the Gaussian HMM's own E-step/M-step give the same numbers."""
    rng = np.random.default_rng(3)
    p = next(q for q, _ in examples(rng) if isinstance(q, H.GaussianHMMParams) and q.covariance_type == ct)
    X = rng.normal(size=(50, D))
    off = np.array([0, 20, 50])
    pri, tpri = H.GaussianPriors(), H.TransitionPriors(2.0, 1.5)
    fam = BaumWelch(GaussianEmission(ct, pri, "stmc"), tpri, "stmc")
    st = fam.e_step(X, off, p)
    ref = H.e_step_gaussian(X, off, p)
    for a, b in zip(st, ref):  # the Gaussian E-step is fused in the compiled kernel: equal to rounding
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    ours, _ = fam.m_step(st, p)
    theirs, _ = H.m_step_gaussian(st, p, pri, tpri, "stmc")
    for a, b in zip(ours[:-1], theirs[:-1]):
        np.testing.assert_array_equal(a, b)
    back = pickle.loads(pickle.dumps(fam))
    assert back.emission.covariance_type == ct and back.n_free(K, D) == H.n_free_parameters(K, D, "gaussian", ct)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["PoissonHMM", "GMMHMM"])
def test_new_families_work_through_the_command_line_without_an_edit_there(name, tmp_path):
    """``emflow info`` and ``emflow predict`` read the registry: a family added by its own
    files only is described and applied like the others."""
    from typer.testing import CliRunner

    import emflow
    from emflow.cli import app
    from emflow.storage.sequences import write_sequences

    cls = getattr(emflow, name)
    (X, lengths), kw = cls._contract_example(np.random.default_rng(0))
    model = cls(**{**kw, "n_iter": 3}, scheduler="threads").fit(X, lengths)
    path = model.save(str(tmp_path / "m.zarr"))
    data = write_sequences(str(tmp_path / "x.zarr"), X, np.concatenate([[0], np.cumsum(lengths)]))
    r = CliRunner().invoke(app, ["info", path])
    assert r.exit_code == 0 and name in r.output, r.output
    r = CliRunner().invoke(app, ["predict", path, data, "--out", str(tmp_path / "out.zarr"), "-s", "threads"])
    assert r.exit_code == 0, r.output
    import zarr

    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["values"][:],
                                  model.predict(X, lengths))
