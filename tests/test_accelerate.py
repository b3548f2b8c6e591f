"""SQUAREM (``accelerate="squarem"``) and pass counting (``n_passes_``), for every family.

Small in-memory problems: the accelerated fit reaches plain EM's optimum, never lowers
``history_``, and every pass it makes is one the engine counted.
"""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emflow
from emflow.estimators import REGISTRY
from emflow.estimators.base import EMEstimator
from emflow.estimators.em import EMRun, run_em, run_em_group
from emflow.estimators.mixture import GMMFamily
from emflow.execution.engine import Engine
from emflow.models.family import gmm_spec

FAMILIES = sorted(REGISTRY)
TIGHT = 1e-9  # plain EM then stops within ~1e-7 of its optimum here


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.EmflowConvergenceWarning)
        yield


def _example(name):
    cls = REGISTRY[name]
    args, kw = cls._contract_example(np.random.default_rng(0))
    return cls, args, kw


def _rounding(h):
    # EM steps at a fixed point move the objective by rounding noise (~1e-11 relative seen here)
    return 1e-10 * np.maximum(1.0, np.abs(np.asarray(h[:-1])))


def _three_blobs(seed=0, n=150):
    rng = np.random.default_rng(seed)
    return np.vstack([rng.normal(0, 1, (n, 2)), rng.normal(1.5, 0.7, (n, 2)), rng.normal([-2, 1], 0.5, (n, 2))])


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("bad", ["fast", "SQUAREM", 1, True])
def test_a_bad_accelerate_is_a_config_error_before_anything_is_opened(name, bad, monkeypatch):
    cls, args, kw = _example(name)

    def no_session(self):
        raise AssertionError("an engine session was started")

    monkeypatch.setattr(EMEstimator, "_session", no_session)
    with pytest.raises(emflow.ConfigError, match=r"accelerate must be None, 'none' or 'squarem'"):
        cls(**kw, accelerate=bad).fit(*args)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_takes_accelerate_as_a_constructor_parameter(name):
    cls = REGISTRY[name]
    est = cls()
    assert est.get_params()["accelerate"] is None
    assert est.set_params(accelerate="squarem").accelerate == "squarem"
    from sklearn.base import clone

    assert clone(est).accelerate == "squarem"


# -- the same optimum as plain EM -------------------------------------------------------------
def _fit(cls, args, kw, **extra):
    k = {**kw, **extra}
    return cls(**k).fit(*args)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gmm_squarem_reaches_plain_em_optimum(covariance_type):
    X = _three_blobs()
    kw = dict(n_components=3, covariance_type=covariance_type, tol=TIGHT, max_iter=5000, random_state=3)
    plain = emflow.GaussianMixture(**kw).fit(X)
    fast = emflow.GaussianMixture(**kw, accelerate="squarem").fit(X)
    assert plain.converged_ and fast.converged_
    assert abs(fast.lower_bound_ - plain.lower_bound_) < 1e-6
    np.testing.assert_allclose(np.sort(fast.weights_), np.sort(plain.weights_), atol=1e-3)
    assert fast.n_passes_ < plain.n_passes_


@pytest.mark.parametrize("name", ["gaussian_hmm", "categorical_hmm", "poisson_hmm", "gmm_hmm"])
def test_hmm_squarem_reaches_plain_em_optimum(name):
    cls, args, kw = _example(name)
    plain = _fit(cls, args, kw, tol=TIGHT, n_iter=3000)
    fast = _fit(cls, args, kw, tol=TIGHT, n_iter=3000, accelerate="squarem")
    assert abs(fast.lower_bound_ - plain.lower_bound_) < 1e-6
    assert fast.n_passes_ <= plain.n_passes_


def _em_from(cls, args, kw, fitted, n):
    """Plain EM for n iterations from a fitted model's parameters: (first, last) objective."""
    est = cls(**kw, **{cls.iter_param: n}).fit(*args, initial_params=fitted._get_parameters())
    return est.history_[0], est.lower_bound_


def test_lgssm_squarem_reaches_plain_em_optimum():
    # the observation noise and the initial mean: identifiable, so EM has an isolated optimum
    cls, args, kw = _example("linear_gaussian_ssm")
    kw = {**kw, "em_vars": ["observation_covariance", "initial_state_mean"]}
    plain = _fit(cls, args, kw, tol=1e-10, max_iter=500)
    fast = _fit(cls, args, kw, tol=1e-10, max_iter=500, accelerate="squarem")
    assert plain.converged_ and fast.converged_
    assert abs(fast.lower_bound_ - plain.lower_bound_) < 1e-6
    first, last = _em_from(cls, args, {**kw, "tol": 0.0}, fast, 5)  # a fixed point of plain EM
    assert abs(first - fast.lower_bound_) < 1e-9 and abs(last - fast.lower_bound_) < 1e-9
    assert fast.fit_info_["acceleration"]["accepted"] > 0


def test_lda_squarem_stops_at_a_fixed_point_of_batch_em():
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, size=(12, 8))
    dense[dense.sum(1) == 0, 0] = 1
    X = sp.csr_matrix(dense)
    kw = dict(n_components=2, random_state=0, evaluate_every=1, perp_tol=1e-10, mean_change_tol=1e-10,
              max_doc_update_iter=200)
    fast = emflow.LatentDirichletAllocation(**kw, max_iter=2000, accelerate="squarem").fit(X)
    assert fast.converged_ and fast.fit_info_["acceleration"]["accepted"] > 0
    # batch EM from there stays within 1e-6 of it (plain EM from random_state=0 reaches
    # -2.26905629863 after 45 passes here; SQUAREM -2.26905629863 after 19 at 1e-10)
    more = emflow.LatentDirichletAllocation(**{**kw, "evaluate_every": -1}, max_iter=5).fit(
        X, initial_params=fast._get_parameters())
    assert abs(more.history_[0] - fast.lower_bound_) < 1e-6 and abs(more.lower_bound_ - fast.lower_bound_) < 1e-6


# -- history_ never decreases ---------------------------------------------------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), covariance_type=st.sampled_from(["full", "tied", "diag", "spherical"]),
       init_params=st.sampled_from(["kmeans", "random", "random_from_data"]))
def test_squarem_never_lowers_the_gmm_history(seed, covariance_type, init_params):
    X = _three_blobs(seed % 7, n=80)
    est = emflow.GaussianMixture(3, covariance_type=covariance_type, init_params=init_params, tol=1e-9,
                                 max_iter=150, random_state=seed, accelerate="squarem").fit(X)
    h = np.asarray(est.history_)
    assert np.all(np.diff(h) >= -_rounding(h))
    assert est.lower_bound_ == h[-1]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(["gaussian_hmm", "categorical_hmm", "poisson_hmm"]))
def test_squarem_never_lowers_an_hmm_history(seed, name):
    cls, args, kw = _example(name)
    # hmmlearn's default covars_prior makes the Gaussian M-step a MAP step, which plain EM's
    # likelihood need not follow upward either: the likelihood is monotone for the MLE step
    mle = {"covars_prior": 0.0} if name == "gaussian_hmm" else {}
    est = _fit(cls, args, kw, random_state=seed, tol=1e-9, n_iter=40, accelerate="squarem", **mle)
    h = np.asarray(est.history_)
    assert np.all(np.diff(h) >= -_rounding(h))


def test_rejected_extrapolations_add_nothing_to_the_history_and_are_counted():
    X = _three_blobs(1)
    events = []
    est = emflow.GaussianMixture(3, tol=TIGHT, max_iter=400, random_state=0, accelerate="squarem")
    est.fit(X, callbacks=[events.append])
    acc = est.fit_info_["acceleration"]
    assert [e.log_likelihood for e in events] == est.history_
    assert sum(e.step == "squarem" for e in events) == acc["accepted"]
    assert acc["passes"] == est.n_iter_ + acc["rejected"]
    assert len(est.fit_info_["seconds_per_iteration"]) == est.n_iter_


def test_an_extrapolated_point_the_m_step_cannot_start_from_is_rejected():
    # from this start a GMM-HMM extrapolation leaves a state without mass: its M-step raises
    # FitFailedError, which plain EM never meets here; the point is rejected, the fit goes on
    cls, args, kw = _example("gmm_hmm")
    est = _fit(cls, args, kw, random_state=356276112, tol=1e-9, n_iter=60, accelerate="squarem")
    acc = est.fit_info_["acceleration"]
    assert acc["m_step_failed"] >= 1 and acc["accepted"] > 0
    h = np.asarray(est.history_)
    assert np.all(np.diff(h) >= -_rounding(h))


# -- n_passes_ is the engine's count ------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("accelerate", [None, "squarem"])
def test_n_passes_is_the_engines_count_of_partition_reads(name, accelerate, monkeypatch):
    cls, args, kw = _example(name)
    reads, passes = [], []
    count, run_pass = Engine._count_reads, Engine._pass

    def counting_reads(self, loaded):
        reads.append(len(loaded.handles))
        return count(self, loaded)

    def counting_pass(self, loaded, run, name=""):
        passes.append(1)
        return run_pass(self, loaded, run, name)

    monkeypatch.setattr(Engine, "_count_reads", counting_reads)
    monkeypatch.setattr(Engine, "_pass", counting_pass)
    est = _fit(cls, args, kw, **{cls.iter_param: 6, "accelerate": accelerate})
    assert est.n_passes_ == 1 + len(passes)  # the opening scan, then every pass
    assert est.n_passes_ * est.fit_info_["partitions"] == sum(reads)
    assert est.fit_info_["n_passes"] == est.n_passes_
    em_passes = est.fit_info_["acceleration"]["passes"] if accelerate else est.n_iter_
    assert est.n_passes_ >= em_passes + 1


def test_n_passes_counts_the_kmeans_initialisation(monkeypatch):
    X = _three_blobs(2)
    est = emflow.GaussianMixture(3, max_iter=5, tol=0.0, random_state=0).fit(X)
    given = emflow.GaussianMixture(3, max_iter=5, tol=0.0, means_init=est.means_, weights_init=est.weights_,
                                   precisions_init=est.precisions_).fit(X)
    assert given.n_passes_ == 1 + 5  # the scan and the EM passes: nothing to initialise
    assert est.n_passes_ > given.n_passes_ + 2  # the sample, the k-means passes, the hard statistics


def test_n_passes_survives_save_and_load(tmp_path):
    est = emflow.GaussianMixture(2, max_iter=5, tol=0.0, random_state=0, accelerate="squarem").fit(_three_blobs())
    back = emflow.load(est.save(str(tmp_path / "m.zarr")))
    assert back.n_passes_ == est.n_passes_ and back.accelerate == "squarem"
    assert "passes over the data" in back._summary()


# -- the driver -------------------------------------------------------------------------------------
def test_a_lockstep_group_mixes_plain_and_accelerated_runs_as_if_alone():
    X = _three_blobs(4)
    start = emflow.GaussianMixture(3, max_iter=1, tol=0.0, random_state=0).fit(X)._get_parameters()
    fam, spec = GMMFamily("full", 1e-6), gmm_spec()
    engine = Engine(None, n_threads=1)
    try:
        loaded = engine.open(X)
        runs = [EMRun(fam, start, tol=1e-9, max_iter=200),
                EMRun(fam, start, tol=1e-9, max_iter=200, accelerate="squarem", spec=spec)]
        together = run_em_group(engine, loaded, runs)
        alone = [run_em(engine, loaded, fam, start, tol=1e-9, max_iter=200),
                 run_em(engine, loaded, fam, start, tol=1e-9, max_iter=200, accelerate="squarem", spec=spec)]
    finally:
        engine.close()
    for a, b in zip(together, alone):
        assert a.history == b.history and a.evaluations == b.evaluations
    assert together[1].evaluations < together[0].evaluations


# -- the flows ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_hmm_fit_flow_takes_accelerate_and_reports_its_passes(prefect_server, tmp_path):
    from emflow.storage.synthetic import write_hmm
    from flows.fit_hmm import hmm_fit_flow
    from test_flows import _artifacts

    data = write_hmm(tmp_path / "hmm.zarr", 40, 3, 2, "gaussian", "diag", min_length=10, max_length=60, seed=4,
                     sequences_per_chunk=10)
    out = str(tmp_path / "m.zarr")
    kw = dict(n_components=3, covariance_type="diag", n_iter=60, tol=1e-6, random_state=0)
    state = hmm_fit_flow(data, out, **kw, accelerate="squarem", return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    ref = emflow.GaussianHMM(**kw, accelerate="squarem", scheduler="threads").fit(data)
    assert model.accelerate == "squarem" and model.history_ == ref.history_
    assert model.fit_info_["acceleration"]["accepted"] == ref.fit_info_["acceleration"]["accepted"]
    summary = _artifacts(state.state_details.flow_run_id)["hmm-fit-summary"][-1].data
    assert "passes over the data" in summary and "accelerate=squarem" in summary
