"""One contract, every family: emflow's shipped contract (emflow.testing.EstimatorContract)
run for every registered family. A family's own test may also subclass it in one line
(``class TestGMM(EstimatorContract): cls = emflow.GaussianMixture``)."""

from emflow.testing import EstimatorContract


class TestEveryFamily(EstimatorContract):
    """cls left unset: parametrised over emflow's registry (a new family is included as it registers)."""


# -- the contract's checks can fail ------------------------------------------------------
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from emflow.testing import _support as S  # noqa: E402

pytest_plugins = ["pytester"]


class _Sums(NamedTuple):
    n: np.ndarray
    s: np.ndarray


class _SumFamily:
    def e_step(self, X, w, params):
        return _Sums(np.array(float(len(X))), X.sum(axis=0))


class _MeanFamily(_SumFamily):
    def e_step(self, X, w, params):  # not additive: a mean of the partition
        return _Sums(np.array(float(len(X))), X.mean(axis=0))


def test_the_additivity_check_catches_a_family_that_is_not_additive():
    X = np.random.default_rng(0).normal(size=(50, 3))
    S.check_additive(_SumFamily(), "rows", (X, None), None, np.random.default_rng(1))
    with pytest.raises(AssertionError, match="s, 2 pieces"):
        S.check_additive(_MeanFamily(), "rows", (X, None), None, np.random.default_rng(1))


def test_splits_fall_on_sequence_boundaries():
    values, offsets = np.arange(20.0)[:, None], np.array([0, 3, 8, 9, 15, 20])
    pieces = S.split_partition("sequences", (values, offsets), 3, np.random.default_rng(0))
    assert len(pieces) == 3
    assert np.concatenate([p[0] for p, _ in pieces]).tolist() == values.tolist()
    for (v, off), ctx in pieces:
        assert off[0] == 0 and off[-1] == len(v) and ctx.element_start == offsets[ctx.start]


def test_a_one_line_subclass_runs_the_contract_and_reports_a_broken_family(pytester):
    pytester.makepyfile(test_broken="""
        import emflow
        from emflow.testing import EstimatorContract

        class Broken(emflow.GaussianMixture):
            def fit(self, *args, callbacks=(), **kw):  # drops the first iteration's event
                seen = []
                super().fit(*args, callbacks=[seen.append], **kw)
                for e in seen[1:]:
                    for cb in callbacks:
                        cb(e)
                return self

        class TestBroken(EstimatorContract):
            cls = Broken

        class TestGood(EstimatorContract):
            cls = emflow.GaussianMixture
    """)
    from emflow.estimators import REGISTRY

    saved = dict(REGISTRY)
    try:
        result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-k", "one_callback_event")
    finally:  # the broken subclass must not stay in this session's registry
        REGISTRY.clear()
        REGISTRY.update(saved)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*TestBroken::test_one_callback_event_per_iteration_equal_to_history*"])


def test_the_contract_runs_for_every_family():
    """The registry (what TestEveryFamily parametrises over) holds the seven families, each
    with its own example; nothing lists them for the contract."""
    fams = S.registry()
    assert set(fams) >= {"gaussian_mixture", "gaussian_hmm", "categorical_hmm", "poisson_hmm", "gmm_hmm",
                         "linear_gaussian_ssm", "latent_dirichlet_allocation"}
    for name, cls in fams.items():
        assert cls.family == name and "_contract_example" in vars(cls), name
