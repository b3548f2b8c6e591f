"""The compiled Baum-Welch kernel (emflow.models.hmm_kernel) against the NumPy path it
replaces, every emission and covariance type; float32 emission densities against float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("numba")

from emflow import GaussianHMM
from emflow.errors import FitFailedError
from emflow.models import hmm as H
from emflow.models.hmm_emissions import e_step, emission_for

from test_hmm_emissions import examples
from _kernels import both_kernels

LENGTHS = [1, 2, 37, 5, 120, 3]


def _values(p, rng, n):
    if isinstance(p, H.CategoricalHMMParams):
        return rng.integers(0, p.emissionprob.shape[1], (n, 1))
    if hasattr(p, "lambdas"):
        return rng.poisson(3.0, (n, p.lambdas.shape[1])).astype(float)
    return rng.normal(size=(n, p.means.shape[-1])) * 1.5


def _both(monkeypatch, fn):
    return both_kernels(monkeypatch, H, fn)


@pytest.mark.parametrize("case", range(10))
def test_kernel_statistics_equal_the_numpy_path(monkeypatch, case):
    rng = np.random.default_rng(case)
    p, _ = examples(rng)[case]
    off = np.concatenate([[0], np.cumsum(LENGTHS)])
    X = _values(p, rng, int(off[-1]))
    if isinstance(p, H.GaussianHMMParams):
        a, b = _both(monkeypatch, lambda: H.e_step_gaussian(X, off, p))
    else:
        em = emission_for(p)
        a, b = _both(monkeypatch, lambda: e_step(X, off, p, em))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ct", H.COVARIANCE_TYPES)
def test_fit_with_the_kernel_equals_the_numpy_fit(monkeypatch, ct):
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(m, 1.0, (200, 2)) for m in (0.0, 4.0, -3.0)])
    kw = dict(covariance_type=ct, n_iter=6, tol=0.0, random_state=0, scheduler="threads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_iter=6 with tol=0 never "converges"
        a, b = _both(monkeypatch, lambda: GaussianHMM(3, **kw).fit(X, [300, 300]))
    np.testing.assert_allclose(a.monitor_.history, b.monitor_.history, rtol=1e-12)
    for name in ("startprob_", "transmat_", "means_", "_covars_"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ct", H.COVARIANCE_TYPES)
def test_float32_emissions_agree_with_float64(ct):
    rng = np.random.default_rng(5)
    X = np.concatenate([rng.normal(m, 1.0, (500, 3)) for m in (0.0, 4.0, -3.0)])
    kw = dict(covariance_type=ct, n_iter=8, tol=0.0, random_state=0, scheduler="threads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = GaussianHMM(3, **kw).fit(X, [750, 750])
        b = GaussianHMM(3, compute_dtype="float32", **kw).fit(X, [750, 750])
    ha, hb = np.array(a.monitor_.history), np.array(b.monitor_.history)
    assert np.max(np.abs(ha - hb) / np.abs(ha)) < 1e-5
    assert not np.array_equal(ha, hb)  # float32 really ran
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-4, atol=1e-4)


def test_unreachable_step_is_named(monkeypatch):
    p = H.GaussianHMMParams(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.0, 1.0]]),
                            np.array([[0.0], [100.0]]), np.array([[1e-4], [1e-4]]), "diag")
    X = np.array([[0.0], [0.0], [100.0]])
    monkeypatch.setattr(H, "KERNEL", "numba")
    with pytest.raises(FitFailedError, match="Step 2"):
        H.e_step_gaussian(X, np.array([0, 3]), p)
