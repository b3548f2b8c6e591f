"""The LGSSM's fast paths: sequences filtered and smoothed together (NumPy, batched across
sequences) and the compiled kernel (numba), each against the per-sequence reference
(:func:`kalman_filter`, :func:`rts_smoother`, :func:`sequence_stats`) to 1e-12, against each
other, and against pykalman from the same parameters; with missing values (single
components and whole steps) and sequences of unequal length, length 1 included."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from emflow.errors import FitFailedError
from emflow.estimators.lgssm import LinearGaussianSSM
from emflow.models import lgssm as M
from emflow.models import lgssm_stats as MS
from emflow.storage.sequences import write_sequences
from emflow.storage.synthetic.lgssm import sample_lgssm
from test_lgssm import pykalman_em, small_params

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
PATHS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed"))]
LENGTHS = [1, 23, 7, 1, 40, 3, 12]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setattr(MS, "KERNEL", request.param)
    return request.param


def _data(lengths=LENGTHS, seed=3, missing=0.2):
    truth = small_params()
    _, X = sample_lgssm(truth, lengths, seed=seed, missing_fraction=missing)
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    X[off[4] + 2 : off[4] + 5] = np.nan  # whole missing steps
    X[off[1]] = np.nan  # the first step of a sequence
    X[off[3]] = np.nan  # the only step of a length-1 sequence
    return truth, X, off


def _close(got, want, name="", rtol=1e-12):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())), err_msg=name)


def _reference(X, off, params):
    filt = [M.kalman_filter(X[a:b], params) for a, b in zip(off[:-1], off[1:])]
    sm = [M.rts_smoother(params.A, f) for f in filt]
    return filt, sm


def test_states_loglik_and_stats_match_the_per_sequence_reference(path):
    truth, X, off = _data()
    filt, sm = _reference(X, off, truth)
    m, c = MS.partition_states(X, off, truth, "filter")
    _close(m, np.concatenate([f.filtered_means for f in filt]), "filtered means")
    _close(c, np.concatenate([f.filtered_covariances for f in filt]), "filtered covariances")
    m, c = MS.partition_states(X, off, truth, "smooth")
    _close(m, np.concatenate([s.means for s in sm]), "smoothed means")
    _close(c, np.concatenate([s.covariances for s in sm]), "smoothed covariances")
    _close(MS.partition_loglik(X, off, truth), sum(f.loglik for f in filt), "loglik")
    _close(M.loglik_stats(X, off, truth), [sum(f.loglik for f in filt), off[-1], len(off) - 1])
    got = MS.partition_stats(X, off, truth)
    want = [sum(f) for f in zip(*[MS.sequence_stats(X[a:b], truth) for a, b in zip(off[:-1], off[1:])])]
    for name, g, w in zip(M.LGSSMStats._fields, got, want):
        _close(g, w, name)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("k, p", [(3, 4), (1, 1), (2, 1)])
def test_compiled_kernel_equals_numpy_path(monkeypatch, k, p):
    # other state and feature sizes than small_params, some values missing
    rng = np.random.default_rng(7)
    A = 0.8 * np.linalg.qr(rng.normal(size=(k, k)))[0]
    B = rng.normal(size=(p, p))
    params = M.LGSSMParams(A, rng.normal(size=(p, k)), 0.2 * np.eye(k) + 0.05, B @ B.T / p + 0.3 * np.eye(p),
                           rng.normal(size=k), np.eye(k))
    lengths = [300, 1, 17, 2, 60]
    Y = np.concatenate([M.sample(params, T, rng)[1] for T in lengths])
    Y[rng.random(Y.shape) < 0.15] = np.nan
    off = np.concatenate([[0], np.cumsum(lengths)])
    out = {}
    for which in ("numpy", "numba"):
        monkeypatch.setattr(MS, "KERNEL", which)
        out[which] = (MS.partition_stats(Y, off, params), MS.partition_states(Y, off, params, "filter"),
                      MS.partition_states(Y, off, params, "smooth"), MS.partition_loglik(Y, off, params))
    for name, g, w in zip(M.LGSSMStats._fields, out["numba"][0], out["numpy"][0]):
        _close(g, w, name)
    for g, w in zip(out["numba"][1:3], out["numpy"][1:3]):
        _close(g[0], w[0])
        _close(g[1], w[1])
    _close(out["numba"][3], out["numpy"][3])


def test_runs_of_sequences_within_the_step_budget(path, monkeypatch, tmp_path):
    truth, X, off = _data()
    whole = MS.partition_states(X, off, truth, "smooth")
    monkeypatch.setattr(MS, "_BATCH_FLOATS", 300)  # runs of 16 steps: a few sequences each
    runs = list(MS.runs(off, 2, 3))
    assert len(runs) > 1 and runs[0][0] == 0 and runs[-1][1] == len(off) - 1
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    model = LinearGaussianSSM(2, max_iter=0, scheduler="threads", **dict(zip(M.EM_VARS, truth))).fit(X, np.diff(off))
    for got, want in zip(model._params, truth):
        np.testing.assert_array_equal(got, want)
    m, c = model.smooth(X, np.diff(off))
    _close(m, whole[0])
    _close(c, whole[1])
    # written run by run (edge pieces of shared chunks back to the client): the same values
    src = write_sequences(tmp_path / "in.zarr", X, off, chunk_steps=8)
    g = model.smooth(src, out=tmp_path / "s.zarr")
    assert g["values"].chunks == (8, 2)
    np.testing.assert_array_equal(g["values"][...], m)
    np.testing.assert_array_equal(g["covariances"][...], c)
    assert model.score(X, np.diff(off)) == pytest.approx(MS.partition_loglik(X, off, truth), rel=1e-12)
    f = model.forecast(X[off[4] : off[5]], 3)
    ref = M.kalman_filter(X[off[4] : off[5]], truth)
    want = M.forecast(truth, ref.filtered_means[-1], ref.filtered_covariances[-1], 3)
    for g, w in zip(f, want):
        _close(g, w)


def test_against_pykalman_filter_smoother_loglik_and_one_em_step(path):
    pk = pytest.importorskip("pykalman")
    truth = small_params()
    rng = np.random.default_rng(5)
    _, Y = M.sample(truth, 120, rng)
    Y[[0, 9, 50, 51]] = np.nan  # pykalman skips whole missing steps; so do we
    kf = pk.KalmanFilter(truth.A, truth.C, truth.Q, truth.R, np.zeros(2), np.zeros(3), truth.mu0, truth.V0)
    Ym = np.ma.masked_invalid(Y)
    off = np.array([0, len(Y)])
    for kind in ("filter", "smooth"):
        ref_m, ref_c = getattr(kf, kind)(Ym)
        m, c = MS.partition_states(Y, off, truth, kind)
        _close(m, ref_m, kind, rtol=1e-9)
        _close(c, ref_c, kind, rtol=1e-9)
    _close(MS.partition_loglik(Y, off, truth), kf.loglikelihood(Ym), rtol=1e-10)
    ref_ll, ref = pykalman_em(truth, Y, list(M.EM_VARS), 1)
    got, _ = M.m_step(M.e_step(Y, off, truth), truth, frozenset(M.EM_VARS))
    for g, w, name in zip(got, ref, M.EM_VARS):
        _close(g, w, name, rtol=1e-8)


def test_singular_predicted_covariance_and_bad_innovation(path):
    truth, X, off = _data(missing=0.0)
    # Q = V0 = 0: every predicted covariance is zero; the kernel hands over to the NumPy
    # path's pseudo-inverse, which the reference uses too
    deg = truth._replace(Q=np.zeros((2, 2)), V0=np.zeros((2, 2)))
    filt, sm = _reference(X, off, deg)
    m, c = MS.partition_states(X, off, deg, "smooth")
    _close(m, np.concatenate([s.means for s in sm]))
    st = MS.partition_stats(X, off, deg)
    want = [sum(f) for f in zip(*[MS.sequence_stats(X[a:b], deg) for a, b in zip(off[:-1], off[1:])])]
    for name, g, w in zip(M.LGSSMStats._fields, st, want):
        _close(g, w, name)
    bad = deg._replace(R=np.zeros((3, 3)))  # the innovation covariance is zero
    for call in (lambda: MS.partition_stats(X, off, bad), lambda: MS.partition_loglik(X, off, bad),
                 lambda: MS.partition_states(X, off, bad, "filter")):
        with pytest.raises(FitFailedError, match="innovation covariance"):
            call()


def test_kernel_choice(monkeypatch):
    monkeypatch.setattr(MS, "KERNEL", "numpy")
    assert MS._kernel() is None
    monkeypatch.setattr(MS, "KERNEL", "auto")
    assert (MS._kernel() is not None) == HAVE_NUMBA
    if not HAVE_NUMBA:
        monkeypatch.setattr(MS, "KERNEL", "numba")
        with pytest.raises(ImportError):
            MS._kernel()
