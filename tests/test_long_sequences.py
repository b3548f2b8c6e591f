"""One sequence cut across many partitions (issue 17): exact Baum-Welch and Viterbi by
boundary messages, against the uncut in-memory computation and hmmlearn."""

from __future__ import annotations

import os
import signal
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emflow.errors import ConfigError, DataError
from emflow.estimators.gmm_hmm import GMMHMM
from emflow.estimators.hmm import CategoricalHMM, GaussianHMM
from emflow.estimators.poisson_hmm import PoissonHMM
from emflow.models import hmm as H
from emflow.models import hmm_long as HL
from emflow.models.gmm_hmm import GMMHMMParams
from emflow.models.hmm_emissions import e_step, emission_for
from emflow.models.poisson_hmm import PoissonHMMParams
from emflow.storage.sequences import open_sequences, write_sequences

from test_hmm import _one_blas_thread, rel  # noqa: F401 (an autouse fixture)

hl = pytest.importorskip("hmmlearn.hmm")

K, D, M_MIX = 3, 2, 2
T_PROP = 90


def _params(kind: str, rng: np.random.Generator):
    sp = rng.dirichlet(np.ones(K))
    tm = rng.dirichlet(np.ones(K), size=K)
    if kind == "gaussian-full":
        A = rng.normal(size=(K, D, D))
        return H.GaussianHMMParams(sp, tm, rng.normal(size=(K, D)) * 2, A @ A.transpose(0, 2, 1) + np.eye(D), "full")
    if kind == "gaussian-diag":
        return H.GaussianHMMParams(sp, tm, rng.normal(size=(K, D)) * 2, rng.uniform(0.5, 2, (K, D)), "diag")
    if kind == "categorical":
        return H.CategoricalHMMParams(sp, tm, rng.dirichlet(np.ones(4), size=K))
    if kind == "poisson":
        return PoissonHMMParams(sp, tm, rng.uniform(0.5, 6, (K, D)))
    return GMMHMMParams(sp, tm, rng.dirichlet(np.ones(M_MIX), size=K), rng.normal(size=(K, M_MIX, D)) * 2,
                        rng.uniform(0.5, 2, (K, M_MIX, D)), "diag")


KINDS = ["gaussian-full", "gaussian-diag", "categorical", "poisson", "gmm"]


@pytest.fixture(scope="module")
def problems():
    rng = np.random.default_rng(17)
    out = {}
    for kind in KINDS:
        p = _params(kind, rng)
        X = H.sample_sequence(p, T_PROP, rng)[0] if kind != "gmm" else rng.normal(size=(T_PROP, D)) * 2
        out[kind] = (p, X, e_step(X, np.array([0, T_PROP]), p, emission_for(p)))
    return out


# -- the statistics of any cut equal the uncut ones ---------------------------------------
cut_points = st.lists(st.integers(1, T_PROP - 1), max_size=12).map(lambda c: sorted(set(c)))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(cuts=cut_points, ones=st.lists(st.integers(1, T_PROP - 2), max_size=3))
def test_statistics_of_any_cut_equal_the_uncut(problems, kind, cuts, ones):
    p, X, ref = problems[kind]
    pts = sorted(set(cuts) | set(ones) | {o + 1 for o in ones})  # each `o` makes a slice of length 1
    edges = [0, *pts, T_PROP]
    slices = [X[a:b] for a, b in zip(edges[:-1], edges[1:])]
    got = HL.chain_e_step(slices, p, emission_for(p))
    for name, a, b in zip(ref._fields, got, ref):
        assert rel(a, b) < 1e-10 or np.max(np.abs(np.asarray(a) - np.asarray(b))) < 1e-12 * max(1.0, np.abs(b).max()), name


def test_length_one_slices_everywhere(problems):
    p, X, ref = problems["gaussian-full"]
    got = HL.chain_e_step([X[t : t + 1] for t in range(T_PROP)], p, emission_for(p))
    for name, a, b in zip(ref._fields, got, ref):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-12), name


# -- partitions chosen by bytes along the time axis --------------------------------------
def test_partitions_cut_long_sequences_only():
    X = np.zeros((1000, 2))
    lengths = [100, 500, 50, 350]
    d = open_sequences(X, lengths, partition_bytes=16 * 120, min_partitions=2, cut_long=True)
    assert d.chains == [[1, 2, 3, 4, 5], [7, 8, 9]]
    assert d.bounds == [(0, 100), (100, 200), (200, 300), (300, 400), (400, 500), (500, 600), (600, 650),
                        (650, 766), (766, 883), (883, 1000)]
    # short sequences keep today's partitions of whole sequences; without cut_long nothing is cut
    assert open_sequences(X, lengths, partition_bytes=16 * 120, min_partitions=2).chains == []
    assert open_sequences(X, lengths, partition_bytes=16 * 600, min_partitions=2, cut_long=True).chains == []


def test_zarr_slices_fall_on_chunk_boundaries(tmp_path):
    p = write_sequences(tmp_path / "s.zarr", np.zeros((1000, 2)), np.array([0, 1000]), chunk_steps=40)
    d = open_sequences(p, partition_bytes=16 * 300, cut_long=True)
    assert d.chains == [[0, 1, 2, 3]]
    assert all(a % 40 == 0 for a, _ in d.bounds)
    vals = [ld()[0] for ld in d.loaders]
    assert sum(len(v) for v in vals) == 1000 and all(ld()[1].tolist() == [0, len(ld()[0])] for ld in d.loaders)


# -- a fit across ~10 slices equals the in-memory fit and hmmlearn's ---------------------
T_FIT, N_ITER = 3000, 6


def _start(kind, rng):
    sp = rng.dirichlet(np.ones(K) * 3)
    tm = rng.dirichlet(np.ones(K) * 3, size=K) * 0.5 + 0.5 * np.eye(K)
    if kind == "gaussian":
        A = rng.normal(size=(K, D, D))
        return {"startprob_": sp, "transmat_": tm, "means_": rng.normal(size=(K, D)) * 2,
                "covars_": A @ A.transpose(0, 2, 1) + np.eye(D)}
    if kind == "categorical":
        return {"startprob_": sp, "transmat_": tm, "emissionprob_": rng.dirichlet(np.ones(4), size=K)}
    if kind == "poisson":
        return {"startprob_": sp, "transmat_": tm, "lambdas_": rng.uniform(0.5, 6, (K, D))}
    return {"startprob_": sp, "transmat_": tm, "weights_": rng.dirichlet(np.ones(M_MIX), size=K),
            "means_": rng.normal(size=(K, M_MIX, D)) * 2, "covars_": rng.uniform(0.5, 2, (K, M_MIX, D))}


FIT_CASES = {
    "gaussian": (lambda **kw: GaussianHMM(K, "full", **kw), lambda **kw: hl.GaussianHMM(K, "full", **kw),
                 ("startprob_", "transmat_", "means_", "covars_")),
    "categorical": (lambda **kw: CategoricalHMM(K, n_features=4, **kw), lambda **kw: hl.CategoricalHMM(K, n_features=4, **kw),
                    ("startprob_", "transmat_", "emissionprob_")),
    "poisson": (lambda **kw: PoissonHMM(K, **kw), lambda **kw: hl.PoissonHMM(K, **kw),
                ("startprob_", "transmat_", "lambdas_")),
    "gmm": (lambda **kw: GMMHMM(K, n_mix=M_MIX, covariance_type="diag", **kw), lambda **kw: hl.GMMHMM(K, n_mix=M_MIX, covariance_type="diag", **kw),
            ("startprob_", "transmat_", "weights_", "means_", "covars_")),
}


def _data(kind):
    rng = np.random.default_rng(5)
    truth = _start(kind, np.random.default_rng(99))
    if kind == "gaussian":
        p = H.GaussianHMMParams(truth["startprob_"], truth["transmat_"], truth["means_"] * 2, truth["covars_"], "full")
    elif kind == "categorical":
        p = H.CategoricalHMMParams(truth["startprob_"], truth["transmat_"], truth["emissionprob_"])
    elif kind == "poisson":
        p = PoissonHMMParams(truth["startprob_"], truth["transmat_"], truth["lambdas_"] * 2)
    else:
        p = H.GaussianHMMParams(truth["startprob_"], truth["transmat_"], rng.normal(size=(K, D)) * 3,
                                np.ones((K, D)), "diag")
    return H.sample_sequence(p, T_FIT, rng)[0]


def _set(model, start):
    for k, v in start.items():
        setattr(model, k, v.copy())
    return model


@pytest.mark.filterwarnings("ignore:Best performing initialization did not converge")
@pytest.mark.parametrize("kind", list(FIT_CASES))
def test_fit_across_slices_equals_in_memory_and_hmmlearn(kind):
    ours, theirs, names = FIT_CASES[kind]
    X = _data(kind)
    start = _start(kind, np.random.default_rng(3))
    kw = dict(init_params="", n_iter=N_ITER, tol=0)
    fits = []
    for pb in (None, X.nbytes // 10 + 1):
        fits.append(_set(ours(scheduler="threads", partition_bytes=pb, **kw), start).fit(X))
    whole, cut = fits
    assert whole.fit_info_["partitions"] == 1 and cut.fit_info_["partitions"] == 10
    assert rel(cut.monitor_.history, whole.monitor_.history) < 1e-10
    for n in names:
        assert rel(getattr(cut, n), getattr(whole, n)) < 1e-10, n
    ref = _set(theirs(**kw), start).fit(X)
    # hmmlearn works in log space: its smallest probabilities differ in their last digits
    assert rel(cut.monitor_.history, list(ref.monitor_.history)) < 1e-10
    for n in names:
        assert rel(getattr(cut, n), getattr(ref, n)) < 1e-9, n


def test_decoding_and_scoring_across_slices_equal_in_memory():
    X = _data("gaussian")
    start = _start("gaussian", np.random.default_rng(3))
    whole = _set(GaussianHMM(K, "full", scheduler="threads"), start)
    cut = _set(GaussianHMM(K, "full", scheduler="threads", partition_bytes=1024), start)  # 47 slices
    ref = _set(hl.GaussianHMM(K, "full"), start)
    lp, states = cut.decode(X)
    lp0, states0 = whole.decode(X)
    assert rel(lp, lp0) < 1e-10 and rel(lp, ref.decode(X)[0]) < 1e-10
    np.testing.assert_array_equal(states, states0)
    np.testing.assert_array_equal(states, ref.predict(X))
    assert rel(cut.score(X), whole.score(X)) < 1e-10
    np.testing.assert_allclose(cut.predict_proba(X), whole.predict_proba(X), rtol=1e-9, atol=1e-12)
    cut.algorithm = whole.algorithm = "map"
    np.testing.assert_array_equal(cut.predict(X), whole.predict(X))


# -- streamed from Zarr; a missing or corrupt middle chunk is named ----------------------
def _zarr(tmp_path, X):
    return write_sequences(tmp_path / "long.zarr", X, np.array([0, len(X)]), chunk_steps=100)


def test_zarr_fit_across_slices_equals_in_memory(tmp_path):
    X = _data("gaussian")
    path = _zarr(tmp_path, X)
    start = _start("gaussian", np.random.default_rng(3))
    kw = dict(init_params="", n_iter=3, tol=0, scheduler="threads")
    with pytest.warns(Warning):
        whole = _set(GaussianHMM(K, "full", **kw), start).fit(X)
    with pytest.warns(Warning):
        cut = _set(GaussianHMM(K, "full", persist=False, partition_bytes=X.nbytes // 10, **kw), start).fit(path)
    assert cut.fit_info_["partitions"] >= 10
    assert rel(cut.monitor_.history, whole.monitor_.history) < 1e-10
    assert rel(cut.means_, whole.means_) < 1e-10 and rel(cut.covars_, whole.covars_) < 1e-10


def test_outputs_written_to_zarr_slice_by_slice(tmp_path):
    X = _data("gaussian")
    path = _zarr(tmp_path, X)
    m = _set(GaussianHMM(K, "full", scheduler="threads", persist=False, partition_bytes=X.nbytes // 7),
             _start("gaussian", np.random.default_rng(3)))
    states = m.predict(path, out=tmp_path / "states.zarr")
    proba = m.predict_proba(path, out=tmp_path / "proba.zarr")
    whole = _set(GaussianHMM(K, "full", scheduler="threads"), _start("gaussian", np.random.default_rng(3)))
    np.testing.assert_array_equal(states["values"][:], whole.predict(X))
    np.testing.assert_allclose(proba["values"][:], whole.predict_proba(X), rtol=1e-9, atol=1e-12)
    assert rel(states.attrs["emflow"]["log_prob"], whole.decode(X)[0]) < 1e-10


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_bad_middle_chunk_is_named(tmp_path, fault):
    X = _data("gaussian")
    path = _zarr(tmp_path, X)
    chunk = os.path.join(path, "values", "c", "15", "0")
    if fault == "missing":
        os.remove(chunk)
        match = r"Chunk \(15, 0\) \(steps 1500-1600\) of the sequence values at .*long\.zarr/values"
    else:
        with open(chunk, "r+b") as f:
            f.truncate(max(1, os.path.getsize(chunk) // 2))
        match = r"(?s)Chunk \(15, 0\) \(steps 1500-1600\) of the sequence values.*"
    m = GaussianHMM(K, "full", n_iter=2, scheduler="threads", persist=False, partition_bytes=X.nbytes // 10)
    with pytest.raises(DataError, match=match):
        m.fit(path)


# -- the Dask backend runs the sweeps as chains of tasks ---------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("form", ["chain", "scan"])
def test_dask_chain_equals_threads(dask_client, form):
    import dask

    X = _data("gaussian")
    start = _start("gaussian", np.random.default_rng(3))
    kw = dict(init_params="", n_iter=3, tol=0, partition_bytes=X.nbytes // 10 + 1)
    out = []
    for sched in ("threads", dask_client):
        with pytest.warns(Warning), dask.config.set({"emflow.sweep-form": form}):
            out.append(_set(GaussianHMM(K, "full", scheduler=sched, **kw), start).fit(X))
    assert rel(out[1].monitor_.history, out[0].monitor_.history) < 1e-12
    assert rel(out[1].means_, out[0].means_) < 1e-12
    np.testing.assert_array_equal(out[1].predict(X), out[0].predict(X))


# -- the parallel-in-time form: transfer elements and a scan give the same links ----------
@pytest.mark.parametrize("kind", KINDS)
def test_transfer_scan_equals_chain(problems, kind):
    p, X, ref = problems[kind]
    em = emission_for(p)
    for edges in ([0, 1, 2, 30, 31, 89, T_PROP], [0, 45, T_PROP], list(range(0, T_PROP + 1, 9))):
        slices = [X[a:b] for a, b in zip(edges[:-1], edges[1:])]
        P = len(slices)
        links = HL.scan_links([HL.transfer(s, p, em, i == 0, i == P - 1) for i, s in enumerate(slices)])
        for got, want in zip(links, HL.chain_links(slices, p, em)):
            if want[0] is not None:
                np.testing.assert_allclose(got[0].alpha, want[0].alpha, rtol=1e-10, atol=1e-14)
            assert abs(got[1].loglik - want[1].loglik) <= 1e-10 * abs(want[1].total)
            if want[2] is not None:
                np.testing.assert_allclose(got[2], want[2], rtol=1e-10, atol=1e-14)


def test_fit_with_the_parallel_form_equals_in_memory():
    import dask

    X = _data("gaussian")
    start = _start("gaussian", np.random.default_rng(3))
    kw = dict(init_params="", n_iter=4, tol=0, scheduler="threads")
    with pytest.warns(Warning):
        whole = _set(GaussianHMM(K, "full", **kw), start).fit(X)
    with dask.config.set({"emflow.sweep-form": "scan"}), pytest.warns(Warning):
        scan = _set(GaussianHMM(K, "full", partition_bytes=X.nbytes // 10 + 1, **kw), start).fit(X)
    assert scan.fit_info_["partitions"] == 10
    assert rel(scan.monitor_.history, whole.monitor_.history) < 1e-10
    for n in ("startprob_", "transmat_", "means_", "covars_"):
        assert rel(getattr(scan, n), getattr(whole, n)) < 1e-10, n
    with dask.config.set({"emflow.sweep-form": "tree"}), pytest.raises(ConfigError, match="emflow.sweep-form"):
        _set(GaussianHMM(K, "full", partition_bytes=X.nbytes // 10 + 1, **kw), start).fit(X)


# -- a worker killed in the middle of a sweep: the chain is recomputed, same result ---------
@dataclass(frozen=True)
class _KillInSweep:
    """Forward sweep steps that SIGKILL their worker process at the n-th call (over every
    process, counted in a file)."""

    inner: object
    counter: str
    at_call: int

    def forward(self, *a):
        with open(self.counter, "a") as f:
            f.write(".")
        if os.path.getsize(self.counter) == self.at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.forward(*a)

    def backward(self, *a):
        return self.inner.backward(*a)


@dataclass(frozen=True)
class _FamilyKilledInSweep:
    inner: object
    counter: str
    at_call: int

    def e_step(self, *a):
        return self.inner.e_step(*a)

    def m_step(self, stats, params):
        return self.inner.m_step(stats, params)

    def objective(self, stats):
        return self.inner.objective(stats)

    @property
    def sweeps(self):
        return _KillInSweep(self.inner.sweeps, self.counter, self.at_call)


@pytest.mark.slow
def test_worker_killed_mid_sweep_gives_the_same_result(tmp_path, make_cluster):
    import emflow
    from emflow.estimators.em import run_em
    from emflow.execution.cluster import engine_for
    from emflow.models.hmm_emissions import BaumWelch

    X = _data("gaussian")
    path = _zarr(tmp_path, X)
    s = _start("gaussian", np.random.default_rng(3))
    p0 = H.GaussianHMMParams(s["startprob_"], s["transmat_"], s["means_"], s["covars_"], "full")
    family = BaumWelch(emission_for(p0), params="stmc")
    client = make_cluster(2)
    with engine_for(client) as engine:
        loaded = engine.load(open_sequences(path, partition_bytes=X.nbytes // 10, cut_long=True), persist=False)
        assert len(loaded.data.chains[0]) >= 10
        ref = run_em(engine, loaded, family, p0, tol=0.0, max_iter=3)
        killer = _FamilyKilledInSweep(family, str(tmp_path / "calls"), at_call=len(loaded.handles) + 5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", emflow.ClusterWarning)
            hit = run_em(engine, loaded, killer, p0, tol=0.0, max_iter=3)
        loaded.release()
    assert os.path.getsize(tmp_path / "calls") > len(loaded.handles) + 5  # killed in iteration 2, went on
    np.testing.assert_allclose(hit.history, ref.history, rtol=1e-12)
    np.testing.assert_allclose(hit.params.means, ref.params.means, rtol=1e-12)


# -- LGSSM: Kalman filter / RTS smoother statistics across slices -------------------------
def _lgssm_problem():
    from emflow.models import lgssm as LG

    rng = np.random.default_rng(23)
    k, p, T = 3, 2, 80
    A = 0.9 * np.eye(k) + 0.05 * rng.normal(size=(k, k))
    B = rng.normal(size=(k, k))
    params = LG.LGSSMParams(A, rng.normal(size=(p, k)), 0.1 * B @ B.T + 0.1 * np.eye(k), 0.5 * np.eye(p),
                            rng.normal(size=k), np.eye(k))
    Y = LG.sample(params, T, rng)[1]
    Y[5, 0] = np.nan  # missing components and whole missing steps
    Y[[40, 41]] = np.nan
    return params, Y


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 79), max_size=12).map(lambda c: sorted(set(c))))
def test_lgssm_statistics_of_any_cut_equal_the_uncut(cuts):
    from emflow.models import lgssm_long as LL
    from emflow.models.lgssm_stats import sequence_stats

    params, Y = _lgssm_problem()
    ref = sequence_stats(Y, params)
    edges = [0, *cuts, len(Y)]
    got = LL.chain_stats([Y[a:b] for a, b in zip(edges[:-1], edges[1:])], params)
    for name, a, b in zip(ref._fields, got, ref):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(b).max())), name


def test_lgssm_em_across_slices_equals_uncut_and_pykalman():
    from test_lgssm import pykalman_em

    from emflow.models import lgssm as LG
    from emflow.models import lgssm_long as LL
    from emflow.models.lgssm_stats import sequence_stats

    truth, Y = _lgssm_problem()
    k, p = truth.A.shape[0], truth.C.shape[0]
    start = LG.LGSSMParams(0.5 * np.eye(k), truth.C + 0.3, np.eye(k), np.eye(p), np.zeros(k), 2.0 * np.eye(k))
    em_vars = LG.normalize_em_vars(list(LG.EM_VARS))
    edges = [0, 1, 9, 17, 30, 40, 41, 55, 62, 70, len(Y)]  # 10 slices, one of length 1
    out = []
    for cut in (False, True):
        params, lls = start, []
        for _ in range(6):
            stats = (LL.chain_stats([Y[a:b] for a, b in zip(edges[:-1], edges[1:])], params) if cut
                     else sequence_stats(Y, params))
            lls.append(float(stats.loglik))
            params, _ = LG.m_step(stats, params, em_vars)
        out.append((np.array(lls), params))
    (ll0, p0), (ll1, p1) = out
    assert rel(ll1, ll0) < 1e-10
    for a, b in zip(p1, p0):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())
    Y_pk = Y.copy()
    Y_pk[5] = np.nan  # pykalman masks whole steps only: compare on a sequence without partial steps
    ref_ll, _ = pykalman_em(start, Y_pk, list(LG.EM_VARS), 6)
    params, lls = start, []
    for _ in range(6):
        stats = LL.chain_stats([Y_pk[a:b] for a, b in zip(edges[:-1], edges[1:])], params)
        lls.append(float(stats.loglik))
        params, _ = LG.m_step(stats, params, em_vars)
    np.testing.assert_allclose(lls, ref_ll, rtol=1e-7)


@pytest.mark.filterwarnings("ignore::Warning")
def test_lgssm_fit_filter_smooth_score_across_slices_equal_in_memory():
    # (pykalman's agreement: test_lgssm_em_across_slices_equals_uncut_and_pykalman)
    from emflow.estimators.lgssm import LinearGaussianSSM
    from emflow.models import lgssm as LG

    truth, Y = _lgssm_problem()
    Y = np.concatenate([Y, LG.sample(truth, 720, np.random.default_rng(2))[1]])  # 800 steps
    Y[5] = np.nan
    k, p = truth.A.shape[0], truth.C.shape[0]
    start = LG.LGSSMParams(0.5 * np.eye(k), truth.C + 0.3, np.eye(k), np.eye(p), np.zeros(k), 2.0 * np.eye(k))
    kw = dict(em_vars=list(LG.EM_VARS), tol=0.0, max_iter=3, scheduler="threads", **dict(zip(LG.EM_VARS, start)))
    whole = LinearGaussianSSM(k, **kw).fit(Y)
    cut = LinearGaussianSSM(k, partition_bytes=Y.nbytes // 10 + 1, **kw).fit(Y)
    assert cut.fit_info_["partitions"] == 10 and whole.fit_info_["partitions"] == 1
    assert rel(cut.history_, whole.history_) < 1e-10
    for a, b in zip(cut._params, whole._params):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())
    assert rel(cut.score(Y), whole.score(Y)) < 1e-10
    for name in ("filter", "smooth"):
        (m1, c1), (m0, c0) = getattr(cut, name)(Y), getattr(whole, name)(Y)
        np.testing.assert_allclose(m1, m0, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(c1, c0, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::Warning")
def test_lgssm_dask_chain_equals_threads(dask_client):
    from emflow.estimators.lgssm import LinearGaussianSSM
    from emflow.models import lgssm as LG

    truth, Y = _lgssm_problem()
    Y = np.concatenate([Y, LG.sample(truth, 720, np.random.default_rng(2))[1]])
    kw = dict(em_vars=list(LG.EM_VARS), tol=0.0, max_iter=3, partition_bytes=Y.nbytes // 10 + 1,
              **dict(zip(LG.EM_VARS, truth)))
    a = LinearGaussianSSM(3, scheduler="threads", **kw).fit(Y)
    b = LinearGaussianSSM(3, scheduler=dask_client, **kw).fit(Y)
    assert b.fit_info_["partitions"] == 10
    assert rel(b.history_, a.history_) < 1e-12
    np.testing.assert_allclose(b.smooth(Y)[0], a.smooth(Y)[0], rtol=1e-12, atol=1e-14)
