"""``LinearGaussianSSM.filter`` / ``.smooth`` over a dataset of many partitions: the batched
paths (compiled kernel and NumPy) equal the per-sequence NumPy reference to 1e-10 and
pykalman's ``filter`` / ``smooth`` from the same parameters, in memory and written to Zarr."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from emflow.estimators.lgssm import LinearGaussianSSM
from emflow.models import lgssm as M
from emflow.models import lgssm_stats as MS
from emflow.storage.sequences import write_sequences
from emflow.storage.synthetic.lgssm import sample_lgssm
from test_lgssm import small_params

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
PATHS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed"))]
LENGTHS = [30, 1, 17, 45, 8, 22, 3, 60, 12, 25]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setattr(MS, "KERNEL", request.param)
    return request.param


def _close(got, want, name, rtol=1e-10):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())), err_msg=name)


def test_filter_and_smooth_over_partitions_equal_the_per_sequence_reference_and_pykalman(path, tmp_path):
    truth = small_params()
    _, X = sample_lgssm(truth, LENGTHS, seed=7, missing_fraction=0.15)
    off = np.concatenate([[0], np.cumsum(LENGTHS)])
    X[off[3] + 4 : off[3] + 7] = np.nan  # whole missing steps (pykalman masks them too)
    src = write_sequences(tmp_path / "in.zarr", X, off, chunk_steps=16)
    model = LinearGaussianSSM(2, max_iter=0, scheduler="threads", partition_bytes=1200,
                              **dict(zip(M.EM_VARS, truth))).fit(X, LENGTHS)
    filt = [M.kalman_filter(X[a:b], truth) for a, b in zip(off[:-1], off[1:])]
    want = {"filter": (np.concatenate([f.filtered_means for f in filt]),
                       np.concatenate([f.filtered_covariances for f in filt]))}
    sm = [M.rts_smoother(truth.A, f) for f in filt]
    want["smooth"] = np.concatenate([s.means for s in sm]), np.concatenate([s.covariances for s in sm])
    for kind, (wm, wc) in want.items():
        m, c = getattr(model, kind)(src)
        _close(m, wm, kind + " means")
        _close(c, wc, kind + " covariances")
        g = getattr(model, kind)(src, out=tmp_path / f"{kind}.zarr")
        np.testing.assert_array_equal(g["values"][...], m)
        np.testing.assert_array_equal(g["covariances"][...], c)
        np.testing.assert_array_equal(g["offsets"][...], off)
    pk = pytest.importorskip("pykalman")
    kf = pk.KalmanFilter(truth.A, truth.C, truth.Q, truth.R, np.zeros(2), np.zeros(3), truth.mu0, truth.V0)
    m_all = {kind: getattr(model, kind)(X, LENGTHS) for kind in want}
    for s in (0, 3, 7):  # pykalman only skips whole missing steps: sequences with none partly missing
        a, b = off[s], off[s + 1]
        Y = X[a:b].copy()
        Y[np.isnan(Y).any(axis=1)] = np.nan
        for kind in want:
            rm, rc = getattr(kf, kind)(np.ma.masked_invalid(Y))
            ref = LinearGaussianSSM(2, max_iter=0, **dict(zip(M.EM_VARS, truth))).fit(Y)
            gm, gc = getattr(ref, kind)(Y)
            _close(gm, rm, f"{kind} means vs pykalman", rtol=1e-9)
            _close(gc, rc, f"{kind} covariances vs pykalman", rtol=1e-9)
    assert m_all["smooth"][0].shape == (off[-1], 2)
