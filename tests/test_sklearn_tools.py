"""emflow's estimators inside scikit-learn's tools (issue 20, item 3): ``check_estimator`` on
every registered family (in-memory data), with every expected failure listed, with its
reason, through the checker's own ``expected_failed_checks``; ``Pipeline`` after
``StandardScaler``, ``GridSearchCV`` over ``n_components`` scored by ``score``, ``clone``,
pickling and ``set_output``; pandas DataFrames as scikit-learn takes them (``feature_names_in_``
kept by fit and saved, checked with scikit-learn's warnings and errors by every method), and
``set_output(transform="pandas")`` of LDA's transform.
"""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pytest
import sklearn
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

import emflow
from emflow.estimators import REGISTRY

assert tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 6)  # expected_failed_checks

# -- the expected failures, each with its reason ------------------------------------------------

WORDING = {
    "check_complex_data": "emflow's DataError says the dtype is not a real number type and what to convert "
                          "to, not scikit-learn's 'Complex data not supported'",
    "check_dtype_object": "emflow refuses object arrays rather than guess a conversion of mixed values "
                          "(a DataError that says to pass a numeric array)",
    "check_estimators_empty_data_messages": "emflow's DataError for 0 features says the data are empty and "
                                            "there is nothing to fit, not scikit-learn's '0 feature(s) "
                                            "(shape=...) while a minimum of 1 is required'",
}
APPLY_WORDING = {
    "check_fit2d_predict1d": "1-D data: emflow's DataError says 'expected 2-D (n_samples, n_features)', not "
                             "'Reshape your data'",
    "check_n_features_in_after_fitting": "emflow's FeatureMismatchError says 'fitted on d feature(s) but the "
                                         "data have e' and what to do, not 'X has e features, but ... is "
                                         "expecting d features as input'",
}
LENGTHS = ("hmmlearn's API: fit(X, lengths) and score(X, lengths) take the sequence lengths where "
           "scikit-learn passes y, so the checker's y is read as lengths (and refused)")
SEQUENCE_CHECKS = (
    "check_dict_unchanged", "check_dont_overwrite_parameters", "check_estimators_dtypes",
    "check_estimators_fit_returns_self", "check_estimators_nan_inf", "check_estimators_overwrite_params",
    "check_estimators_pickle", "check_f_contiguous_array_estimator", "check_fit2d_1feature",
    "check_fit2d_predict1d", "check_fit_check_is_fitted", "check_fit_idempotent", "check_fit_score_takes_y",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_n_features_in",
    "check_n_features_in_after_fitting", "check_pipeline_consistency", "check_positive_only_tag_during_fit",
    "check_readonly_memmap_input",
)
ONE_SAMPLE = ("the checker's one row is one step of one sequence: emflow's error is about that step (after "
              "the lengths problem above), not scikit-learn's '1 sample': ")
HMM = {**WORDING, **{c: LENGTHS for c in SEQUENCE_CHECKS},
       "check_fit2d_1sample": ONE_SAMPLE + "initialising needs at least 2 steps"}
EXPECTED_FAILURES = {
    "gaussian_mixture": {**WORDING, **APPLY_WORDING},
    "bayesian_gaussian_mixture": {**WORDING, **APPLY_WORDING},
    "latent_dirichlet_allocation": {**WORDING, **APPLY_WORDING},
    "gaussian_hmm": HMM, "gmm_hmm": HMM,
    "categorical_hmm": {**HMM, "check_fit2d_1sample": ONE_SAMPLE + "categorical sequences have one column of "
                                                                   "symbols, and the checker's have 10"},
    "poisson_hmm": {**HMM, "check_fit2d_1sample": ONE_SAMPLE + "Poisson observations must be whole counts "
                                                               "and the checker's are real numbers"},
    "linear_gaussian_ssm": {**WORDING, **{c: LENGTHS for c in SEQUENCE_CHECKS}},
}

# what each expected failure's message must show, so that a check listed for one reason does not
# fail for another unnoticed (None: the checker's message does not show emflow's error)
WORDING_EVIDENCE = {"check_complex_data": "complex128", "check_dtype_object": "object",
                    "check_estimators_empty_data_messages": r"empty .*there is nothing to fit"}
EVIDENCE = {
    "rows": {**WORDING_EVIDENCE, "check_fit2d_predict1d": "expected 2-D", "check_n_features_in_after_fitting": None},
    "sequences": {**WORDING_EVIDENCE, **{c: "lengths|offsets" for c in SEQUENCE_CHECKS},
                  "check_estimators_nan_inf": "doesn't check for NaN and inf in fit",  # the lengths error names neither
                  "check_positive_only_tag_during_fit": "raised DataError unexpectedly",  # (the lengths DataError)
                  "check_fit2d_1sample": "at least 2 steps"},
}
EVIDENCE["corpus"] = EVIDENCE["rows"]
EVIDENCE_BY_FAMILY = {
    "categorical_hmm": {"check_fit2d_1sample": r"must have one column \(n_steps, 1\); got 10"},
    "poisson_hmm": {"check_fit2d_1sample": "must be counts"},
}


def _evidence(family):
    return {**EVIDENCE[REGISTRY[family].data_kind], **EVIDENCE_BY_FAMILY.get(family, {})}


# a family registered later starts from its layout's list (not checked strictly: it may pass more),
# and test_every_family_lists_its_expected_failures asks for its own list
BY_KIND = {"rows": {**WORDING, **APPLY_WORDING}, "corpus": EXPECTED_FAILURES["latent_dirichlet_allocation"],
           "sequences": HMM}


def _instance(cls):
    """The estimator the checker gets: its defaults (LDA: fewer topics and passes, for time)."""
    if cls.data_kind == "corpus":
        return cls(n_components=2, max_iter=5, random_state=0)
    return cls()


def _check_family(family):
    cls = REGISTRY[family]
    expected = EXPECTED_FAILURES.get(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(_instance(cls), expected_failed_checks=expected or BY_KIND[cls.data_kind],
                                  on_fail=None, on_skip=None)
    failed = {r["check_name"]: str(r["exception"])[:300] for r in results
              if r["status"] == "failed" and not r["expected_to_fail"]}
    assert failed == {}, f"{cls.__name__} fails scikit-learn checks not listed as expected: {failed}"
    still = {r["check_name"] for r in results if r["expected_to_fail"] and r["status"] == "xfail"}
    if expected is not None:  # each listed failure still fails (a fixed one is taken off the list)
        assert still == set(expected), sorted(set(expected) ^ still)
        for r in results:  # and for the reason given
            pattern = _evidence(family)[r["check_name"]] if r["status"] == "xfail" else None
            if pattern is not None:
                assert re.search(pattern, str(r["exception"])), (r["check_name"], expected[r["check_name"]],
                                                                  str(r["exception"])[-300:])
    ran = {r["check_name"] for r in results if r["status"] == "passed"}
    assert len(ran) >= 15, ran  # the checker really ran


FAST = [f for f in REGISTRY if REGISTRY[f].data_kind != "corpus"]
SLOW = [f for f in REGISTRY if REGISTRY[f].data_kind == "corpus"]


@pytest.mark.parametrize("family", FAST)
def test_check_estimator(family):
    _check_family(family)


@pytest.mark.slow
@pytest.mark.parametrize("family", SLOW)
def test_check_estimator_corpus_families(family):  # LDA: about 35 s on 1 core
    _check_family(family)


def test_every_family_lists_its_expected_failures():
    """Each registered family has its own list of expected check_estimator failures, each with
    a reason in words and what its message must show (a new family adds its entry here)."""
    assert set(EXPECTED_FAILURES) == set(REGISTRY), sorted(set(REGISTRY) ^ set(EXPECTED_FAILURES))
    for family, listed in EXPECTED_FAILURES.items():
        evidence = _evidence(family)
        for check, reason in listed.items():
            assert check.startswith("check_") and len(reason.split()) >= 8, (family, check, reason)
            assert check in evidence, (family, check)


def test_sparse_input_is_refused_by_name():
    """Fixed here (base.py): a scipy sparse matrix given to a dense family was an 'object array'."""
    import scipy.sparse as sp

    X = sp.csr_matrix(np.eye(6))
    for est in (emflow.GaussianMixture(2), emflow.GaussianHMM(2), emflow.LinearGaussianSSM()):
        with pytest.raises(emflow.DataError, match="does not accept sparse input .*X.toarray()"):
            est.fit(X)


def test_tags_from_the_declarations():
    lda, gm, hmm = (REGISTRY[f]().__sklearn_tags__()
                    for f in ("latent_dirichlet_allocation", "gaussian_mixture", "gaussian_hmm"))
    assert lda.input_tags.sparse and lda.input_tags.positive_only and lda.transformer_tags is not None
    assert not gm.input_tags.sparse and gm.transformer_tags is None and gm.estimator_type == "density_estimator"
    assert hmm.estimator_type == "density_estimator" and not hmm.target_tags.required


# -- Pipeline, GridSearchCV, clone, pickle, set_output -------------------------------------------

@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(3)
    return np.vstack([rng.normal([0, 10], [1, 20], (150, 2)), rng.normal([6, -30], [1, 20], (150, 2))])


def test_pipeline_after_standard_scaler(blobs):
    pipe = Pipeline([("scale", StandardScaler()), ("gmm", emflow.GaussianMixture(2, random_state=0))]).fit(blobs)
    Z = StandardScaler().fit_transform(blobs)
    ref = emflow.GaussianMixture(2, random_state=0).fit(Z)
    np.testing.assert_allclose(pipe[-1].means_, ref.means_, rtol=1e-12)
    np.testing.assert_array_equal(pipe.predict(blobs), ref.predict(Z))
    assert pipe.score(blobs) == pytest.approx(ref.score(Z), rel=1e-12)
    np.testing.assert_allclose(pipe.score_samples(blobs), ref.score_samples(Z), rtol=1e-12)


def test_pipeline_passes_hmm_lengths_as_y(blobs):
    """hmmlearn's fit(X, lengths): in a Pipeline the lengths go where y goes (the scaler ignores
    y); ``hmm__lengths=`` cannot be routed (the Pipeline passes y=None there as well)."""
    lengths = [100, 120, 80]
    pipe = Pipeline([("scale", StandardScaler()), ("hmm", emflow.GaussianHMM(2, random_state=0, n_iter=5))])
    pipe.fit(blobs, lengths)
    Z = StandardScaler().fit_transform(blobs)
    ref = emflow.GaussianHMM(2, random_state=0, n_iter=5).fit(Z, lengths)
    np.testing.assert_allclose(pipe[-1].means_, ref.means_, rtol=1e-12)
    np.testing.assert_allclose(pipe[-1].transmat_, ref.transmat_, rtol=1e-12)
    np.testing.assert_array_equal(pipe.predict(blobs, lengths=lengths), ref.predict(Z, lengths))
    assert pipe.score(blobs, lengths) == pytest.approx(ref.score(Z, lengths), rel=1e-12)


def test_grid_search_over_n_components_scored_by_score(blobs):
    grid = GridSearchCV(emflow.GaussianMixture(random_state=0), {"n_components": [1, 2, 3]},
                        cv=KFold(3, shuffle=True, random_state=0)).fit(blobs)
    # the same folds by hand: GridSearchCV with no scoring uses the estimator's score
    want = []
    for k in (1, 2, 3):
        scores = [emflow.GaussianMixture(k, random_state=0).fit(blobs[tr]).score(blobs[te])
                  for tr, te in KFold(3, shuffle=True, random_state=0).split(blobs)]
        want.append(np.mean(scores))
    np.testing.assert_allclose(grid.cv_results_["mean_test_score"], want, rtol=1e-12)
    assert grid.best_params_ == {"n_components": int(np.argmax(want)) + 1} == {"n_components": 2}
    assert grid.best_estimator_.n_components == 2 and grid.best_estimator_.converged_


def test_grid_search_lda_topics():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.poisson([4, 4, 0.1, 0.1, 0.1, 0.1], (30, 6)), rng.poisson([0.1, 0.1, 0.1, 0.1, 4, 4], (30, 6))])
    params = dict(max_iter=5, random_state=0)
    grid = GridSearchCV(emflow.LatentDirichletAllocation(**params), {"n_components": [2, 3]}, cv=2).fit(X)
    want = [np.mean([emflow.LatentDirichletAllocation(k, **params).fit(X[tr]).score(X[te])
                     for tr, te in KFold(2).split(X)]) for k in (2, 3)]
    np.testing.assert_allclose(grid.cv_results_["mean_test_score"], want, rtol=1e-12)


def _fitted(family):
    cls = REGISTRY[family]
    fit_args, kwargs = cls._contract_example(np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**{**kwargs, cls.iter_param: 5}).fit(*fit_args), fit_args


@pytest.mark.parametrize("family", list(REGISTRY))
def test_clone_and_pickle(family):
    est, fit_args = _fitted(family)
    c = clone(est)
    assert type(c) is type(est) and not c._is_fitted()
    assert {k: v for k, v in c.get_params().items() if not isinstance(v, np.ndarray)} == \
        {k: v for k, v in est.get_params().items() if not isinstance(v, np.ndarray)}
    back = pickle.loads(pickle.dumps(est))
    assert back.score(*fit_args) == est.score(*fit_args)
    for attr in est.fitted.values():
        np.testing.assert_array_equal(getattr(back, attr), getattr(est, attr))
    # the refit of a clone follows the same trajectory
    refit = clone(est).fit(*fit_args)
    assert refit.lower_bound_ == pytest.approx(est.lower_bound_, rel=1e-12)


def test_set_output_default_and_where_unsupported():
    X = np.random.default_rng(0).poisson(1.0, (30, 8))
    lda = emflow.LatentDirichletAllocation(n_components=2, max_iter=3, random_state=0)
    out = lda.set_output(transform="default").fit_transform(X)
    assert isinstance(out, np.ndarray) and out.shape == (30, 2)
    np.testing.assert_allclose(lda.transform(X), out, rtol=1e-10)
    assert list(lda.get_feature_names_out()) == ["latentdirichletallocation0", "latentdirichletallocation1"]
    # as in scikit-learn, a family without transform (a mixture, an HMM) has no set_output
    assert not hasattr(emflow.GaussianMixture(), "set_output") and not hasattr(emflow.GaussianHMM(), "set_output")


def test_set_output_pandas():
    pd = pytest.importorskip("pandas")
    X = np.random.default_rng(0).poisson(1.0, (30, 8))
    lda = emflow.LatentDirichletAllocation(n_components=2, max_iter=3, random_state=0).set_output(transform="pandas")
    out = lda.fit(X).transform(X)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(lda.get_feature_names_out())
    assert isinstance(lda.fit_transform(X), pd.DataFrame)


# -- pandas: feature names in, set_output(transform="pandas") out ------------------------------

def test_set_output_pandas_in_a_pipeline_after_standard_scaler():
    """The values are those of emflow's LDA fitted on the bare scaled array; the columns, index
    and feature names are those of scikit-learn's own LDA in the same Pipeline."""
    pd = pytest.importorskip("pandas")
    from sklearn.decomposition import LatentDirichletAllocation as SkLDA

    rng = np.random.default_rng(1)
    counts = pd.DataFrame(rng.poisson(1.5, (40, 6)), columns=[f"w{j}" for j in range(6)],
                          index=[f"doc{i}" for i in range(40)])
    params = dict(n_components=3, max_iter=5, random_state=0)

    def pipe(lda):  # counts scaled, still >= 0 (with_mean=False)
        return Pipeline([("scale", StandardScaler(with_mean=False)), ("lda", lda)]).set_output(transform="pandas")

    ours = pipe(emflow.LatentDirichletAllocation(**params)).fit(counts)
    ref = pipe(SkLDA(**params)).fit(counts)
    out, want = ours.transform(counts), ref.transform(counts)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == list(want.columns) == [f"latentdirichletallocation{k}" for k in range(3)]
    assert list(out.index) == list(want.index) == list(counts.index)
    Z = StandardScaler(with_mean=False).fit_transform(counts.to_numpy())
    bare = emflow.LatentDirichletAllocation(**params).fit(Z)
    np.testing.assert_allclose(ours[-1].components_, bare.components_, rtol=1e-12)
    np.testing.assert_allclose(out.to_numpy(), bare.transform(Z), rtol=1e-12)
    # the scaler's DataFrame reached the LDA: its column names are kept, as scikit-learn's LDA keeps them
    np.testing.assert_array_equal(ours[-1].feature_names_in_, ref[-1].feature_names_in_)
    np.testing.assert_array_equal(ours[-1].feature_names_in_, counts.columns)
    np.testing.assert_array_equal(ours.get_feature_names_out(), ref.get_feature_names_out())
    assert not hasattr(bare, "feature_names_in_")


def test_rows_families_keep_dataframe_feature_names(blobs, tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(blobs, columns=["depth", "temp"])
    for cls in (emflow.GaussianMixture, emflow.BayesianGaussianMixture):
        est = cls(n_components=2, random_state=0).fit(df)
        assert est.feature_names_in_.dtype == object and list(est.feature_names_in_) == ["depth", "temp"]
        ref = cls(n_components=2, random_state=0).fit(blobs)  # the same fit as from the bare array
        assert not hasattr(ref, "feature_names_in_")
        np.testing.assert_allclose(est.means_, ref.means_, rtol=1e-12)
        np.testing.assert_array_equal(est.predict(df), ref.predict(blobs))
        assert est.score(df) == pytest.approx(ref.score(blobs), rel=1e-12)
        # scikit-learn's errors and warnings when the names differ
        with pytest.raises(ValueError, match="Feature names must be in the same order as they were in fit"):
            est.predict(df[["temp", "depth"]])
        with pytest.raises(ValueError, match="Feature names unseen at fit time:\n- salinity"):
            est.score_samples(df.rename(columns={"temp": "salinity"}))
        with pytest.warns(UserWarning, match="X does not have valid feature names, but " + cls.__name__):
            est.predict_proba(blobs)
        with pytest.warns(UserWarning, match="X has feature names, but " + cls.__name__):
            ref.predict(df)
        back = emflow.load(est.save(str(tmp_path / f"{cls.__name__}.zarr")))  # saved with the model
        assert back.feature_names_in_.dtype == object and list(back.feature_names_in_) == ["depth", "temp"]
        with pytest.raises(ValueError, match="Feature names must be in the same order"):
            back.predict(df[["temp", "depth"]])
        est.fit(blobs)  # a refit on data without names drops them, as in scikit-learn
        assert not hasattr(est, "feature_names_in_")


def test_model_selection_keeps_dataframe_feature_names(blobs):
    """The selection grid's models (shared passes) carry the names as a fit does."""
    pd = pytest.importorskip("pandas")
    from emflow.estimators.selection import select_gaussian_mixture

    df = pd.DataFrame(blobs, columns=["depth", "temp"])
    best = select_gaussian_mixture(df, [1, 2], max_iter=20).best_model
    assert list(best.feature_names_in_) == ["depth", "temp"]
    ref = emflow.GaussianMixture(best.n_components, max_iter=20, random_state=0).fit(blobs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no feature-name warning
        np.testing.assert_array_equal(best.predict(df), ref.predict(blobs))


@pytest.mark.parametrize("family", ["gaussian_mixture", "bayesian_gaussian_mixture", "latent_dirichlet_allocation"])
def test_dataframe_column_names_check(family):
    """scikit-learn's own check (not run by check_estimator): fit, every method and the second
    partial_fit on a DataFrame, with its reordered, renamed and truncated columns."""
    pytest.importorskip("pandas")
    from sklearn.utils.estimator_checks import check_dataframe_column_names_consistency

    cls = REGISTRY[family]
    est = cls(n_components=2, max_iter=5, random_state=0) if cls.data_kind == "corpus" else cls(n_components=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.EmflowConvergenceWarning)
        check_dataframe_column_names_consistency(cls.__name__, est)
