"""Functions mapped over a sequence cut across partitions must declare their sweeps or be
step-local (issue 17): the lockstep EM group on cut data is exact, undeclared functions are
refused by name."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from emflow.estimators._hmm_work import GaussianHMMFamily
from emflow.estimators.em import EMRun, run_em, run_em_group
from emflow.execution.engine import Engine
from emflow.execution.sweeps import step_local
from emflow.models import hmm as H
from emflow.storage.sequences import open_sequences

K, D, T = 3, 2, 600


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def hmm_problem():
    rng = np.random.default_rng(41)
    tm = rng.dirichlet(np.ones(K), size=K) * 0.4 + 0.6 * np.eye(K)
    truth = H.GaussianHMMParams(rng.dirichlet(np.ones(K)), tm, rng.normal(size=(K, D)) * 3,
                                rng.uniform(0.5, 2, (K, D)), "diag")
    X = H.sample_sequence(truth, T, rng)[0]
    starts = [H.GaussianHMMParams(rng.dirichlet(np.ones(K) * 3), rng.dirichlet(np.ones(K) * 3, size=K),
                                  rng.normal(size=(K, D)) * 2, np.ones((K, D)), "diag") for _ in range(3)]
    return X, starts


def _family():
    return GaussianHMMFamily(H.GaussianPriors(), H.TransitionPriors(), "stmc")


def _cut(X, n_parts):
    d = open_sequences(X, [len(X)], partition_bytes=X.nbytes // n_parts + 1, cut_long=True)
    assert len(d.chains) == 1 and len(d.chains[0]) >= n_parts
    return d


@pytest.mark.parametrize("form", ["chain", "scan"])
def test_lockstep_group_on_cut_data_equals_each_run_alone_uncut(hmm_problem, form):
    X, starts = hmm_problem
    engine = Engine(None, n_threads=2)
    whole = engine.load(open_sequences(X, [len(X)]))
    cut = engine.load(_cut(X, 7))
    alone = [run_em(engine, whole, _family(), p, tol=0.0, max_iter=m) for p, m in zip(starts, (4, 3, 5))]
    with dask.config.set({"emflow.sweep-form": form}):
        group = run_em_group(engine, cut, [EMRun(_family(), p, tol=0.0, max_iter=m, init=i)
                                           for i, (p, m) in enumerate(zip(starts, (4, 3, 5)))])
    for a, g in zip(alone, group):
        assert g.n_iter == a.n_iter
        assert rel(g.history, a.history) < 1e-10
        for x, y in zip(g.params[:4], a.params[:4]):
            assert rel(x, y) < 1e-10


def _undeclared(values, offsets):
    return np.asarray(float(len(values)))


@step_local
def _declared(values, offsets):
    return np.asarray(float(len(values)))


def test_undeclared_function_on_cut_data_is_refused_by_name(hmm_problem):
    X, _ = hmm_problem
    engine = Engine(None, n_threads=2)
    cut = engine.load(_cut(X, 5))
    with pytest.raises(TypeError, match="_undeclared.*neither `sweeps`.*step_local"):
        engine.map_reduce(_undeclared, cut)
    with pytest.raises(TypeError, match="_undeclared"):
        engine.map(_undeclared, cut)
    assert float(engine.map_reduce(_declared, cut)) == T
    # data that cut no sequence: no declaration needed
    assert float(engine.map_reduce(_undeclared, engine.load(open_sequences(X, [len(X)])))) == T


class _PlainFamily:
    """A family object whose E-step ignores boundaries (declares nothing)."""

    def e_step(self, values, offsets, p):
        return np.asarray(float(len(values)))


def test_lockstep_member_without_sweeps_is_refused(hmm_problem):
    X, starts = hmm_problem
    engine = Engine(None, n_threads=2)
    cut = engine.load(_cut(X, 5))
    runs = [EMRun(_family(), starts[0], tol=0.0, max_iter=1), EMRun(_PlainFamily(), starts[1], tol=0.0, max_iter=1)]
    with pytest.raises(TypeError, match="_PlainFamily.e_step"):
        run_em_group(engine, cut, runs)
    with pytest.raises(TypeError, match="_PlainFamily.e_step"):
        run_em(engine, cut, _PlainFamily(), starts[1], tol=0.0, max_iter=1)


@pytest.mark.parametrize("form", ["chain", "scan"])
def test_lgssm_lockstep_group_on_cut_data_equals_each_run_alone_uncut(form):
    from emflow.estimators.lgssm import LGSSMFamily
    from emflow.models import lgssm as LG

    rng = np.random.default_rng(29)
    k, p = 2, 2
    B = rng.normal(size=(k, k))
    truth = LG.LGSSMParams(0.9 * np.eye(k) + 0.05 * rng.normal(size=(k, k)), rng.normal(size=(p, k)),
                           0.1 * B @ B.T + 0.1 * np.eye(k), 0.5 * np.eye(p), rng.normal(size=k), np.eye(k))
    Y = LG.sample(truth, 300, rng)[1]
    Y[[100, 101]] = np.nan
    starts = [LG.LGSSMParams(s * np.eye(k), truth.C + s, np.eye(k), np.eye(p), np.zeros(k), 2.0 * np.eye(k))
              for s in (0.3, 0.6)]
    fam = LGSSMFamily(frozenset(LG.normalize_em_vars(list(LG.EM_VARS))))
    engine = Engine(None, n_threads=2)
    whole = engine.load(open_sequences(Y, [len(Y)], allow_nan=True))
    d = open_sequences(Y, [len(Y)], partition_bytes=Y.nbytes // 6 + 1, allow_nan=True, cut_long=True)
    assert len(d.chains) == 1 and len(d.chains[0]) >= 6
    cut = engine.load(d)
    alone = [run_em(engine, whole, fam, s, tol=0.0, max_iter=4) for s in starts]
    with dask.config.set({"emflow.sweep-form": form}):
        group = run_em_group(engine, cut, [EMRun(fam, s, tol=0.0, max_iter=4, init=i) for i, s in enumerate(starts)])
    for a, g in zip(alone, group):
        assert rel(g.history, a.history) < 1e-10
        for x, y in zip(g.params, a.params):
            assert np.allclose(x, y, rtol=1e-10, atol=1e-12 * np.abs(y).max())


def test_online_fit_refuses_cut_sequences():
    from emflow import ConfigError, GaussianHMM

    X = np.random.default_rng(0).normal(size=(600, 2))
    m = GaussianHMM(2, partition_bytes=X.nbytes // 5 + 1, n_iter=2, scheduler="threads")
    with pytest.raises(ConfigError, match="method='online'.*partition_bytes"):
        m.fit(X, method="online")
    with pytest.raises(ConfigError, match="method='online'.*partition_bytes"):
        m.partial_fit(X)
