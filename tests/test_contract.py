"""One contract, every family: a base test class that each model family subclasses.

Whatever the model, an emflow estimator: refuses to be used before fit; fits with a
log-likelihood (or bound) that never decreases; gives the same answer in-process and on a
Dask cluster; saves to Zarr and loads back bit for bit through ``emflow.load``; refuses a
model of another family; and follows scikit-learn's get_params/set_params.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import emflow
from emflow import errors as E


def _fitted_arrays(est) -> dict[str, np.ndarray]:
    out = {}
    for k, v in vars(est).items():
        if k.endswith("_") and not k.startswith("_") and isinstance(v, np.ndarray):
            out[k] = v
    return out


class ModelContract:
    """Subclasses set ``cls`` and implement ``data()`` and ``make(**kw)``."""

    cls: type
    family: str
    monotone_rtol = 1e-10
    iter_param = "max_iter"  # hmmlearn calls it n_iter

    def data(self):
        raise NotImplementedError

    def make(self, **kw):
        raise NotImplementedError

    def fit(self, est, data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", E.EmflowConvergenceWarning)
            return est.fit(*data) if isinstance(data, tuple) else est.fit(data)

    def score(self, est, data):
        return est.score(*data) if isinstance(data, tuple) else est.score(data)

    def test_not_fitted(self):
        with pytest.raises(E.EmflowError):
            self.score(self.make(), self.data())

    def test_objective_never_decreases(self):
        est = self.fit(self.make(**{self.iter_param: 15}), self.data())
        h = np.asarray(est.history_)
        assert len(h) == est.n_iter_ >= 2
        assert np.all(np.isfinite(h))
        assert np.all(np.diff(h) >= -self.monotone_rtol * np.abs(h[1:])), np.diff(h)
        assert isinstance(est.converged_, bool)
        assert est.fit_info_["fingerprint"]

    def test_same_answer_in_process_and_on_dask(self, dask_client):
        a = self.fit(self.make(**{self.iter_param: 5}, scheduler="threads"), self.data())
        b = self.fit(self.make(**{self.iter_param: 5}, scheduler=dask_client), self.data())
        np.testing.assert_allclose(a.history_, b.history_, rtol=1e-10)
        for k, v in _fitted_arrays(a).items():
            np.testing.assert_allclose(getattr(b, k), v, rtol=1e-9, atol=1e-12, err_msg=k)

    def test_save_load_bit_identical(self, tmp_path):
        est = self.fit(self.make(**{self.iter_param: 4}), self.data())
        path = est.save(tmp_path / "m.zarr")
        back = emflow.load(path)
        assert type(back) is self.cls
        assert emflow.read_model_attrs(path)["family"] == self.family
        arrays = _fitted_arrays(est)
        assert arrays
        for k, v in arrays.items():
            w = getattr(back, k)
            assert w.dtype == v.dtype and w.shape == v.shape and w.tobytes() == v.tobytes(), k
        assert list(back.history_) == list(est.history_)
        assert self.score(back, self.data()) == pytest.approx(self.score(est, self.data()), rel=1e-12)

    def test_refuses_another_family(self, tmp_path):
        other = emflow.GaussianMixture(1, scheduler="threads").fit(np.random.default_rng(0).normal(size=(20, 1)))
        if self.cls is emflow.GaussianMixture:
            other = self.fit(emflow.CategoricalHMM(2, n_features=3, scheduler="threads", random_state=0),
                             (np.random.default_rng(0).integers(0, 3, (40, 1)), [20, 20]))
        path = other.save(tmp_path / "other.zarr")
        with pytest.raises(E.ModelFormatError):
            self.cls.load(path)

    def test_params_round_trip(self):
        est = self.make()
        params = est.get_params()
        clone = self.cls(**params)
        assert clone.get_params().keys() == params.keys()
        est.set_params(**{self.iter_param: 7})
        assert est.get_params()[self.iter_param] == 7
        with pytest.raises((E.ConfigError, ValueError)):
            est.set_params(no_such_parameter=1)


class TestGaussianMixture(ModelContract):
    cls = emflow.GaussianMixture
    family = "gaussian_mixture"

    def data(self):
        rng = np.random.default_rng(0)
        return np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(1.5, 0.7, (200, 2))])

    def make(self, **kw):
        kw.setdefault("scheduler", "threads")
        return emflow.GaussianMixture(3, random_state=0, tol=0.0, reg_covar=0.0, **kw)


class TestGaussianHMM(ModelContract):
    cls = emflow.GaussianHMM
    family = "gaussian_hmm"
    iter_param = "n_iter"

    def data(self):
        from emflow.storage.synthetic import make_hmm_params, sample_hmm

        p = make_hmm_params(3, 2, "gaussian", "diag", seed=1)
        lengths = [40, 25, 60, 33]
        X, _ = sample_hmm(p, lengths, np.random.default_rng(2))
        return X, lengths

    def make(self, **kw):
        kw.setdefault("scheduler", "threads")
        return emflow.GaussianHMM(3, covariance_type="diag", random_state=0, tol=0.0, **kw)


class TestCategoricalHMM(ModelContract):
    cls = emflow.CategoricalHMM
    family = "categorical_hmm"
    iter_param = "n_iter"

    def data(self):
        rng = np.random.default_rng(3)
        return rng.integers(0, 4, size=(150, 1)), [50, 30, 70]

    def make(self, **kw):
        kw.setdefault("scheduler", "threads")
        return emflow.CategoricalHMM(2, n_features=4, random_state=0, tol=0.0, **kw)


class TestLinearGaussianSSM(ModelContract):
    cls = emflow.LinearGaussianSSM
    family = "linear_gaussian_ssm"

    def data(self):
        from emflow.storage.synthetic import make_lgssm_params, sample_lgssm

        p = make_lgssm_params(2, 3, seed=0)
        lengths = [30, 45, 20]
        _, y = sample_lgssm(p, lengths, seed=4)
        return y, lengths

    def make(self, **kw):
        kw.setdefault("scheduler", "threads")
        return emflow.LinearGaussianSSM(2, tol=0.0, **kw)


class TestLatentDirichletAllocation(ModelContract):
    cls = emflow.LatentDirichletAllocation
    family = "latent_dirichlet_allocation"

    def data(self):
        import scipy.sparse as sp

        rng = np.random.default_rng(5)
        dense = rng.poisson(0.6, size=(60, 30))
        dense[dense.sum(1) == 0, 0] = 1
        return sp.csr_matrix(dense)

    def make(self, **kw):
        kw.setdefault("scheduler", "threads")
        return emflow.LatentDirichletAllocation(3, random_state=0, **kw)
