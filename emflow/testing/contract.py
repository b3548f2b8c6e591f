"""The estimator contract every emflow family passes, shipped with the package.

As zarr ships ``zarr.testing.store.StoreTests``, emflow ships :class:`EstimatorContract`.
A family's test module subclasses it in one line::

    from emflow.testing import EstimatorContract

    class TestGaussianMixture(EstimatorContract):
        cls = emflow.GaussianMixture

and a subclass that leaves ``cls`` unset runs the contract for every registered family
(``emflow.estimators.REGISTRY``), so that a new family is tested without being listed::

    class TestEveryFamily(EstimatorContract):
        pass

The data come from the family: ``cls._contract_example(rng) -> (fit_args, init_kwargs)``.
Everything runs on tiny data with the threads scheduler; one test compares with a Dask
cluster and runs where the test suite provides a ``dask_client`` fixture (it is skipped
otherwise).
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

from . import _support as S

__all__ = ["EstimatorContract", "registry"]

registry = S.registry


class EstimatorContract:
    """What every emflow estimator does; subclasses set ``cls`` (or leave it None for all)."""

    cls: type | None = None
    rtol = 1e-10  # same data, other partitioning / resumed: equal to rounding
    monotone_rtol = 1e-10

    # -- collection -----------------------------------------------------------------
    def pytest_generate_tests(self, metafunc):
        if type(self).cls is None and "contract_cls" in metafunc.fixturenames:
            fams = registry()
            metafunc.parametrize("contract_cls", list(fams.values()), ids=list(fams))

    @pytest.fixture
    def contract_cls(self):
        return type(self).cls

    @pytest.fixture(autouse=True)
    def _contract_setup(self, request, contract_cls):
        self.cls = contract_cls
        self.family = S.family_name(contract_cls)
        self.kind = S.data_kind(contract_cls, self.family)
        self.iter_param = S.iter_param(contract_cls)
        self.fit_args, self.init_kwargs = S.example_for(contract_cls, self.family, np.random.default_rng(0))

    # -- helpers ----------------------------------------------------------------------
    def make(self, **kw):
        """The family's example estimator (threads scheduler) with ``kw`` on top."""
        return self.cls(**{**self.init_kwargs, "scheduler": "threads", **kw})

    def make_iters(self, n: int, **kw):
        return self.make(**{self.iter_param: n}, **kw)

    def fit(self, est, *args, **kw):
        with warnings.catch_warnings():
            S.ignore_convergence_warnings()
            return est.fit(*(args or self.fit_args), **kw)

    def score(self, est, *args):
        return est.score(*(args or self.fit_args))

    def assert_same_fit(self, a, b, rtol=None, what=""):
        rtol = self.rtol if rtol is None else rtol
        np.testing.assert_allclose(b.history_, a.history_, rtol=rtol, err_msg=f"history_ {what}")
        arrays = S.fitted_arrays(a)
        assert arrays and arrays.keys() == S.fitted_arrays(b).keys()
        for k, v in arrays.items():
            np.testing.assert_allclose(getattr(b, k), v, rtol=rtol, atol=rtol * max(1.0, np.abs(v).max()),
                                       err_msg=f"{k} {what}")

    # -- the fit --------------------------------------------------------------------
    def test_objective_never_decreases(self):
        est = self.fit(self.make_iters(8))
        h = np.asarray(est.history_)
        assert len(h) == est.n_iter_ >= 2
        assert np.all(np.isfinite(h))
        assert np.all(np.diff(h) >= -self.monotone_rtol * np.abs(h[1:])), np.diff(h)
        assert isinstance(est.converged_, bool)
        assert est.fit_info_["fingerprint"]

    def test_e_step_is_additive_over_random_splits(self):
        """Statistics of a partition == the sum of those of a random split of it (split at
        sequence / document boundaries for sequence and corpus data)."""
        est = self.fit(self.make_iters(2))
        whole = S.one_partition(self.kind, self.fit_args)
        S.check_additive(est._em_family(), self.kind, whole, S.get_parameters(est), np.random.default_rng(1))

    def test_zarr_streamed_and_resident_give_the_same_fit(self, tmp_path):
        path = S.to_zarr(self.kind, self.fit_args, tmp_path / "data.zarr")
        ref = self.fit(self.make_iters(4))
        sizes = S.partition_sizes(self.kind, self.fit_args)
        for persist in (False, True):
            for pb in sizes:
                est = self.fit(self.make_iters(4, persist=persist, partition_bytes=pb), path)
                self.assert_same_fit(ref, est, what=f"(persist={persist}, partition_bytes={pb})")
        assert est.fit_info_["fingerprint"] == ref.fit_info_["fingerprint"]

    def test_resume_after_k_iterations_equals_an_uninterrupted_fit(self):
        whole = self.fit(self.make_iters(6))
        first = self.fit(self.make_iters(3))
        resumed = self.fit(self.make_iters(6), initial_params=S.get_parameters(first), history=list(first.history_))
        assert resumed.n_iter_ == whole.n_iter_ == 6
        self.assert_same_fit(whole, resumed, what="(resumed after 3)")

    def test_one_callback_event_per_iteration_equal_to_history(self):
        events = []
        est = self.fit(self.make_iters(5), callbacks=[events.append])
        assert [e.iteration for e in events] == list(range(1, est.n_iter_ + 1))
        assert [e.log_likelihood for e in events] == list(est.history_)
        assert len(est.history_) == est.n_iter_ == 5

    def test_max_iter_zero_gives_the_initialisation(self):
        init = S.init_params_for(self.make(), self.fit_args)
        est = self.fit(self.make_iters(0))
        assert est.n_iter_ == 0 and list(est.history_) == []
        for name, want in zip(init._fields, init):
            got = getattr(S.get_parameters(est), name)
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(got, want, err_msg=name)

    def test_free_parameters_are_counted_as_the_parameter_spec_says(self):
        """``_n_parameters`` (BIC / AIC) equals the free scalars of the family's parameter spec."""
        from ..models.family import n_free, spec_of

        est = self.fit(self.make_iters(2))
        params = S.get_parameters(est)
        assert est._n_parameters() == n_free(spec_of(params), params)

    def test_same_random_state_gives_the_same_fit(self):
        a, b = self.fit(self.make_iters(3)), self.fit(self.make_iters(3))
        self.assert_same_fit(a, b, rtol=0.0, what="(same random_state)")

    def test_random_state_none_honours_np_random_seed(self):
        np.random.seed(7)
        c = self.fit(self.make_iters(3, random_state=None))
        np.random.seed(7)
        d = self.fit(self.make_iters(3, random_state=None))
        self.assert_same_fit(c, d, rtol=0.0, what="(random_state=None after np.random.seed)")

    def test_same_answer_in_process_and_on_dask(self, request):
        try:
            client = request.getfixturevalue("dask_client")
        except pytest.FixtureLookupError:
            pytest.skip("the test suite provides no dask_client fixture")
        a = self.fit(self.make_iters(4))
        b = self.fit(self.make_iters(4, scheduler=client))
        self.assert_same_fit(a, b, rtol=1e-9, what="(threads vs Dask)")

    # -- outputs ----------------------------------------------------------------------
    def test_every_output_through_out_equals_the_in_memory_result(self, tmp_path):
        from ..estimators.outputs import write_output

        est = self.fit(self.make_iters(3))
        path = S.to_zarr(self.kind, self.fit_args, tmp_path / "data.zarr")
        outputs = S.outputs_of(self.cls)
        assert outputs
        for name, method in outputs.items():
            want = S.in_memory_result(getattr(est, method)(*self.fit_args))
            _, written = write_output(est, name, path, str(tmp_path / f"{name}.zarr"))
            np.testing.assert_allclose(np.asarray(written[...]), want, rtol=1e-12, atol=1e-12, err_msg=name)

    # -- bad input --------------------------------------------------------------------
    def test_wrong_ndim_is_refused(self):
        from .. import errors as E

        for bad in S.wrong_ndim(self.kind, self.fit_args):
            with pytest.raises(E.EmflowError):
                self.fit(self.make_iters(2), *bad)

    def test_non_finite_input_is_refused(self):
        from .. import errors as E

        with pytest.raises(E.DataError):
            self.fit(self.make_iters(2), *S.non_finite(self.kind, self.fit_args))

    def test_feature_mismatch_is_refused(self):
        from .. import errors as E

        est = self.fit(self.make_iters(2))
        with pytest.raises((E.FeatureMismatchError, E.DataError)):
            self.score(est, *S.more_features(self.kind, self.fit_args))

    def test_not_fitted(self):
        from .. import errors as E

        with pytest.raises(E.NotFittedError):
            self.score(self.make())

    def test_not_fitted_is_scikit_learns(self):
        from sklearn.exceptions import NotFittedError

        with pytest.raises(NotFittedError):
            self.score(self.make())

    # -- scikit-learn's object model --------------------------------------------------
    def test_clone_and_pickle_round_trip(self):
        from sklearn.base import clone

        est = self.make_iters(3)
        c = clone(est)
        assert type(c) is self.cls and c.get_params() == est.get_params() and not S.fitted_arrays(c)
        fitted = self.fit(est)
        back = pickle.loads(pickle.dumps(fitted))
        self.assert_same_fit(fitted, back, rtol=0.0, what="(pickled)")
        assert self.score(back) == self.score(fitted)
        self.assert_same_fit(fitted, self.fit(clone(fitted)), rtol=0.0, what="(clone refitted)")

    def test_params_round_trip(self):
        from .. import errors as E

        est = self.make()
        params = est.get_params()
        assert self.cls(**params).get_params().keys() == params.keys()
        est.set_params(**{self.iter_param: 7})
        assert est.get_params()[self.iter_param] == 7
        with pytest.raises((E.ConfigError, ValueError)):
            est.set_params(no_such_parameter=1)

    # -- persistence ------------------------------------------------------------------
    def test_save_load_round_trip_is_bit_identical(self, tmp_path):
        import emflow

        est = self.fit(self.make_iters(4))
        path = est.save(tmp_path / "m.zarr")
        back = emflow.load(path)
        assert type(back) is self.cls
        assert emflow.read_model_attrs(path)["family"] == self.family
        arrays = S.fitted_arrays(est)
        assert arrays
        for k, v in arrays.items():
            w = getattr(back, k)
            assert w.dtype == v.dtype and w.shape == v.shape and w.tobytes() == v.tobytes(), k
        assert list(back.history_) == list(est.history_)
        assert self.score(back) == pytest.approx(self.score(est), rel=1e-12)

    def test_load_refuses_another_family(self, tmp_path):
        from .. import errors as E

        others = [c for f, c in registry().items() if f != self.family]
        other_cls = others[0]
        fam = S.family_name(other_cls)
        args, kw = S.example_for(other_cls, fam, np.random.default_rng(0))
        with warnings.catch_warnings():
            S.ignore_convergence_warnings()
            other = other_cls(**{**kw, "scheduler": "threads", S.iter_param(other_cls): 2}).fit(*args)
        path = other.save(tmp_path / "other.zarr")
        with pytest.raises(E.ModelFormatError):
            self.cls.load(path)

