"""Bad input, tried against every entry point: the library (every estimator), the CLI, the fit flow.

One table of inputs. Each either gets a specific emflow error (an ``EmflowError``
subclass) whose message says what to do, or, where the input is legitimate (constant
columns, duplicate rows, tiny magnitudes, fewer distinct points than components), a finite
fit. No entry point leaves a file behind in the output folder after an error.

Decisions per case (what a user would expect):

- values near 1e300 are finite but their squares are not representable in float64, so
  no Gaussian model of them exists in float64 (its covariance would be ~1e600): a
  FitFailedError that says to scale the data. 1e150 still fits. LDA takes counts, where
  only ratios matter, so 1e300 counts fit.
- values near 1e-300 are legitimate: their spread underflows below ``reg_covar``, so the
  fit is that of constant data (finite; degenerate-component warnings allowed).
- the LGSSM treats NaN as a missing observation (documented), so NaN fits there.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import emflow
from emflow import errors as E
from emflow.cli.main import app

RNG = np.random.default_rng(20240601)
CONT = RNG.normal(size=(60, 2))  # a valid continuous dataset (GMM, Gaussian HMM, LGSSM)
COUNTS = RNG.poisson(1.0, size=(30, 8)).astype(np.float64)  # a valid corpus (LDA)
COUNTS[COUNTS.sum(1) == 0, 0] = 1
SYMBOLS = RNG.integers(0, 4, size=(60, 1))  # valid categorical sequences


@dataclass
class Family:
    make: Callable[..., Any]
    base: np.ndarray
    sequences: bool = False

    def args(self, X):
        if self.sequences and not isinstance(X, (str, os.PathLike)):
            n = len(X) if np.ndim(X) else 0
            return (X, [n // 2, n - n // 2] if n >= 2 else None)
        return (X,)


FAMILIES = {
    "gmm_full": Family(lambda **k: emflow.GaussianMixture(3, scheduler="threads", random_state=0, max_iter=30, **k),
                       CONT),
    "gmm_diag": Family(lambda **k: emflow.GaussianMixture(3, covariance_type="diag", scheduler="threads",
                                                          random_state=0, max_iter=30, **k), CONT),
    "gaussian_hmm": Family(lambda **k: emflow.GaussianHMM(3, scheduler="threads", random_state=0, n_iter=10, **k),
                           CONT, True),
    "categorical_hmm": Family(lambda **k: emflow.CategoricalHMM(3, scheduler="threads", random_state=0, n_iter=10,
                                                                **k), SYMBOLS, True),
    "lgssm": Family(lambda **k: emflow.LinearGaussianSSM(2, scheduler="threads", random_state=0, max_iter=10, **k),
                    CONT, True),
    "lda": Family(lambda **k: emflow.LatentDirichletAllocation(3, scheduler="threads", random_state=0, max_iter=5,
                                                               **k), COUNTS),
}


def _with(X, r, c, v):
    X = np.array(X, dtype=np.float64)
    X[r, c] = v
    return X


FIT = ("fit",)


def err(cls, pattern):
    return ("error", cls, pattern)


# case -> (make input from the family's valid data, default expectation, {family: expectation})
CASES: dict[str, tuple[Callable, Any, dict]] = {
    "missing_path": (lambda B, tmp: str(tmp / "no-such.zarr"), err(E.DataNotFoundError, r"Check the path"), {}),
    "rank_1": (lambda B, tmp: B[:, 0].copy(), err(E.DataError, r"expected 2-D"),
               {"categorical_hmm": FIT}),  # hmmlearn's convention: 1-D symbols are one column
    "rank_3": (lambda B, tmp: B[..., None], err(E.DataError, r"expected 2-D"), {}),
    "strings": (lambda B, tmp: B.astype(str), err(E.DataError, r"(Convert it to float|pass a sparse or dense matrix)"),
                {}),
    "object_dtype": (lambda B, tmp: np.array([[1, "x"]] * len(B), dtype=object),
                     err(E.DataError, r"(Convert it to float|Pass a numeric array|pass a sparse or dense)"), {}),
    "complex": (lambda B, tmp: B.astype(complex), err(E.DataError, r"(Convert it to float|pass a sparse or dense)"),
                {}),
    "nan": (lambda B, tmp: _with(B, 3, 0, np.nan), err(E.NonFiniteDataError, r"(Remove or impute|must be finite)"),
            {"lgssm": FIT}),  # NaN marks a missing observation in a state-space model
    "inf": (lambda B, tmp: _with(B, 3, 0, np.inf),
            err(E.NonFiniteDataError, r"(Remove or impute|must be finite|replace)"), {}),
    "empty_rows": (lambda B, tmp: B[:0], err(E.DataError, r"nothing to fit"), {}),
    "empty_columns": (lambda B, tmp: B[:, :0], err(E.DataError, r"(nothing to fit|must have one column)"), {}),
    "single_row": (lambda B, tmp: B[:1],
                   err(E.DataError, r"(Use fewer components or more data|at least 2 steps)"),
                   {"categorical_hmm": FIT, "lgssm": FIT, "lda": FIT}),
    "constant_column": (lambda B, tmp: np.column_stack([B[:, 0], np.full(len(B), 3.0)]), FIT,
                        {"categorical_hmm": err(E.DataError, r"must have one column")}),
    "duplicate_rows_only": (lambda B, tmp: np.repeat(B[:1], len(B), axis=0), FIT, {}),
    "fewer_distinct_points_than_components": (lambda B, tmp: np.tile(B[:2], (len(B) // 2, 1)), FIT, {}),
    "huge_1e300": (lambda B, tmp: B * 1e300, err(E.FitFailedError, r"Scale the data"),
                   {"lda": FIT, "categorical_hmm": err(E.DataError, r"integers")}),
    "large_1e150": (lambda B, tmp: B * 1e150, FIT, {"categorical_hmm": err(E.DataError, r"integers")}),
    "tiny_1e-300": (lambda B, tmp: B * 1e-300, FIT, {"categorical_hmm": err(E.DataError, r"integers")}),
}


def _fitted_arrays(est):
    return {k: v for k, v in vars(est).items()
            if k.endswith("_") and not k.startswith("_") and isinstance(v, np.ndarray)}


def _check_sensible(name, est, X):
    arrays = _fitted_arrays(est)
    assert arrays
    for k, v in arrays.items():
        assert np.all(np.isfinite(v)), (k, v)
    hist = np.asarray(est.history_, dtype=float)
    assert len(hist) and np.all(np.isfinite(hist))
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    if name.startswith("gmm"):
        np.testing.assert_allclose(est.weights_.sum(), 1.0, rtol=1e-12)
        # every mean lies within the data's range (per column), covariances are positive
        lo, hi = X.min(0), X.max(0)
        span = np.maximum(hi - lo, np.abs(hi) * 1e-12)
        assert np.all(est.means_ >= lo - 1e-9 * span) and np.all(est.means_ <= hi + 1e-9 * span)
        assert np.all(np.linalg.eigvalsh(est.covariances_) > 0) if est.covariance_type == "full" else \
            np.all(est.covariances_ > 0)
        # the fit is at least as good as one Gaussian over all of the data
        one = emflow.GaussianMixture(1, covariance_type=est.covariance_type, scheduler="threads").fit(X)
        assert est.lower_bound_ >= one.lower_bound_ - 1e-6 * abs(one.lower_bound_)
    if "hmm" in name:
        np.testing.assert_allclose(est.startprob_.sum(), 1.0, rtol=1e-9)
        rows = est.transmat_.sum(1)
        if len(X) == 1:  # no transition observed: rows stay zero, as hmmlearn's (documented, reported)
            assert np.all((np.abs(rows - 1) < 1e-9) | (rows == 0))
        else:
            np.testing.assert_allclose(rows, 1.0, rtol=1e-9)
    if name == "lda":
        assert np.all(est.components_ > 0)


@pytest.mark.filterwarnings("ignore::emflow.DegenerateComponentWarning")
@pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_library_bad_input(name, case, tmp_path):
    fam = FAMILIES[name]
    make_input, default, overrides = CASES[case]
    expect = overrides.get(name, default)
    X = make_input(fam.base, tmp_path)
    est = fam.make()
    if expect == FIT:
        est.fit(*fam.args(X))
        _check_sensible(name, est, X)
    else:
        _, cls, pattern = expect
        with pytest.raises(cls, match=pattern) as info:
            est.fit(*fam.args(X))
        assert isinstance(info.value, E.EmflowError)
    assert os.listdir(tmp_path) == []  # fitting writes nothing


def test_lgssm_nan_is_a_missing_value_not_a_poison():
    """NaN in the LGSSM is a missing observation: the fit and its score stay finite."""
    X = _with(CONT, 3, 0, np.nan)
    est = FAMILIES["lgssm"].make().fit(X, [30, 30])
    assert np.isfinite(est.lower_bound_)
    assert np.isfinite(est.score(X, [30, 30]))


# --- invalid parameters, per estimator -----------------------------------------------------

BAD_PARAMS = [
    ("gmm_full", dict(tol=-1.0), "tol"), ("gmm_full", dict(n_components=0), "n_components"),
    ("gmm_full", dict(covariance_type="banana"), "covariance_type"),
    ("gaussian_hmm", dict(tol=-1.0), "tol"), ("gaussian_hmm", dict(n_components=0), "n_components"),
    ("gaussian_hmm", dict(covariance_type="banana"), "covariance_type"),
    ("categorical_hmm", dict(tol=-1.0), "tol"), ("categorical_hmm", dict(n_components=0), "n_components"),
    ("lgssm", dict(tol=-1.0), "tol"), ("lgssm", dict(state_dim=0), "state_dim"),
    ("lgssm", dict(transition_covariance_type="banana"), "transition_covariance_type"),
    ("lgssm", dict(observation_covariance_type="banana"), "observation_covariance_type"),
    ("lda", dict(perp_tol=-1.0), "perp_tol"), ("lda", dict(n_components=0), "n_components"),
    ("lda", dict(max_iter=-1), "max_iter"),
    # counts are ints and never bools (as in scikit-learn); seeds are what NumPy takes; a
    # partition is at least 1 KiB (emflow.checks.MIN_PARTITION_BYTES)
    *[(name, dict(random_state=rs), "random_state") for name in FAMILIES if name != "gmm_diag"
      for rs in (-1, "x", 2**32, 1.5)],
    *[(name, {"state_dim" if name == "lgssm" else "n_components": True}, "state_dim" if name == "lgssm" else
       "n_components") for name in FAMILIES if name != "gmm_diag"],
    *[(name, dict(partition_bytes=pb), "partition_bytes") for name in ("gmm_full", "gaussian_hmm",
      "categorical_hmm", "lgssm") for pb in (1, 1023, 2.0**20)],
    *[(name, dict(split_every=True), "split_every") for name in FAMILIES if name != "gmm_diag"],
    ("gmm_full", dict(max_iter=True), "max_iter"), ("gmm_full", dict(n_init=False), "n_init"),
    ("gmm_full", dict(tol=float("nan")), "tol"), ("gaussian_hmm", dict(n_iter=True), "n_iter"),
    ("gaussian_hmm", dict(min_covar=-1.0), "min_covar"), ("categorical_hmm", dict(n_features=True), "n_features"),
    ("lgssm", dict(max_iter=2.5), "max_iter"), ("lda", dict(max_doc_update_iter=True), "max_doc_update_iter"),
]


@pytest.mark.parametrize("name", ["gmm_full", "gaussian_hmm", "categorical_hmm", "lgssm", "lda"])
def test_valid_random_states_are_accepted(name):
    """None, an int in [0, 2**32 - 1], a RandomState and a Generator all fit, and an int seed
    and the same seed again give the same model."""
    fam = FAMILIES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rs in (None, 2**32 - 1, np.random.RandomState(3), np.random.default_rng(3)):
            fam.make().set_params(random_state=rs).fit(*fam.args(fam.base))
        a, b = (fam.make().set_params(random_state=7).fit(*fam.args(fam.base)) for _ in range(2))
    assert a.history_ == b.history_


@pytest.mark.parametrize("name, kwargs, word", BAD_PARAMS)
def test_invalid_parameters(name, kwargs, word):
    fam = FAMILIES[name]
    est = fam.make()
    est.set_params(**kwargs)
    with pytest.raises(E.ConfigError, match=rf"{word} must be") as info:
        est.fit(*fam.args(fam.base))
    assert repr(list(kwargs.values())[0]) in str(info.value)  # the message shows the bad value


# --- fitted models applied to other data, and models of other families ---------------------

@pytest.fixture(scope="module")
def fitted_models():
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fam in FAMILIES.items():
            out[name] = fam.make().fit(*fam.args(fam.base))
    return out


MISMATCH = {
    "gmm_full": (np.zeros((5, 3)), E.FeatureMismatchError, "same columns"),
    "gmm_diag": (np.zeros((5, 1)), E.FeatureMismatchError, "same columns"),
    "gaussian_hmm": (np.zeros((6, 3)), E.FeatureMismatchError, "same columns"),
    "lgssm": (np.zeros((6, 3)), E.FeatureMismatchError, "same columns"),
    "lda": (np.ones((4, 5)), E.FeatureMismatchError, "same vocabulary"),
    "categorical_hmm": (np.full((6, 1), 9), E.DataError, "n_features"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mismatched_features_between_model_and_data(name, fitted_models):
    est, fam = fitted_models[name], FAMILIES[name]
    X, cls, pattern = MISMATCH[name]
    with pytest.raises(cls, match=pattern):
        est.score(*fam.args(X))


def test_predict_mismatch_writes_nothing(fitted_models, tmp_path):
    gm = fitted_models["gmm_full"]
    data = _zarr_rows(tmp_path / "three.zarr", np.zeros((20, 3)), (10, 3))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(E.FeatureMismatchError):
        gm.predict(data, out=tmp_path / "labels.zarr")
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("name", list(FAMILIES))
def test_model_of_another_family_is_refused(name, fitted_models, tmp_path):
    other = "categorical_hmm" if name.startswith("gmm") else "gmm_full"
    path = fitted_models[other].save(tmp_path / "other.zarr")
    cls = type(fitted_models[name])
    with pytest.raises(E.ModelFormatError, match=r"emflow\.load\(path\)"):
        cls.load(path)
    assert type(emflow.load(path)) is type(fitted_models[other])  # and emflow.load picks the right class


# --- the command line ----------------------------------------------------------------------

def _zarr_rows(path, X, chunks=None):
    g = zarr.open_group(path, mode="w")
    X = np.asarray(X)
    g.create_array("X", data=X, chunks=chunks or (max(1, min(len(X), 20)),) + X.shape[1:],
                   config={"write_empty_chunks": True})  # store chunks of zeros too: a missing one is an error
    g.attrs["rows"] = "X"
    return str(path)


CLI_DATA = {  # case -> (rows, components, exit code, text the message must hold)
    "missing_path": (None, 2, 2, "No Zarr data"),
    "rank_1": (CONT[:, 0], 2, 2, "expected 2-D"),
    "bool_dtype": (CONT > 0, 2, 2, "Convert it to float"),
    "nan": (_with(CONT, 7, 1, np.nan), 2, 2, "Remove or impute"),
    "inf": (_with(CONT, 7, 1, -np.inf), 2, 2, "Remove or impute"),
    "empty_rows": (CONT[:0], 2, 2, "nothing to fit"),
    "single_row": (CONT[:1], 2, 2, "Use fewer components"),
    "huge_1e300": (CONT * 1e300, 2, 2, "Scale the data"),
    "constant_column": (np.column_stack([CONT[:, 0], np.full(60, 3.0)]), 2, 0, "converged"),
    "duplicate_rows_only": (np.repeat(CONT[:1], 60, axis=0), 2, 0, "converged"),
    "fewer_distinct_points_than_components": (np.tile(CONT[:2], (30, 1)), 3, 0, "converged"),
    "tiny_1e-300": (CONT * 1e-300, 2, 0, "converged"),
}


def _unwrapped(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.filterwarnings("ignore::emflow.DegenerateComponentWarning")
@pytest.mark.parametrize("case", list(CLI_DATA))
def test_cli_fit_bad_data(case, tmp_path):
    X, k, code, text = CLI_DATA[case]
    data = str(tmp_path / "in" / "missing.zarr") if X is None else _zarr_rows(tmp_path / "in" / "d.zarr", X)
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = CliRunner().invoke(app, ["fit", data, "-k", str(k), "-o", str(outdir / "m.zarr"), "-s", "threads",
                                 "--seed", "0"])
    assert r.exit_code == code, r.output
    assert text in _unwrapped(r.output)
    if code == 0:
        gm = emflow.load(outdir / "m.zarr")
        assert all(np.all(np.isfinite(a)) for a in (gm.weights_, gm.means_, gm.covariances_))
        assert os.listdir(outdir) == ["m.zarr"]
    else:
        assert "error:" in r.output and "Traceback" not in r.output
        assert os.listdir(outdir) == []


CLI_PARAMS = [
    (["-k", "0"], 2, "--components (-k): n_components must be an integer >= 1, got 0"),
    (["-k", "2", "--tol", "-1"], 2, "tol must be a number >= 0"),
    (["-k", "2", "--reg-covar", "-1"], 2, "--reg-covar: reg_covar must be a finite number >= 0"),
    (["-k", "2", "-c", "banana"], 2, "'banana' is not one of"),  # typer's own usage error lists the choices
    (["-k", "2", "--n-init", "0"], 2, "n_init must be an integer >= 1"),
    (["-k", "2", "--max-iter", "-1"], 2, "--max-iter: max_iter must be an integer >= 0, got -1."),
    (["-k", "2", "--seed", "-1"], 2, "--seed must be an integer in [0, 4294967295], got -1."),
    (["-k", "2", "--seed", "4294967296"], 2, "--seed must be an integer in [0, 4294967295], got 4294967296."),
    (["-k", "2", "--partition-mib", "-1"], 2, "--partition-mib must be a finite number >= 0.0009765625 (1 KiB)"),
    (["-k", "2", "--partition-mib", "0"], 2, "--partition-mib must be a finite number >= 0.0009765625 (1 KiB)"),
    (["-k", "2", "--workers", "0"], 2, "--workers must be an integer >= 1, got 0."),
]


@pytest.mark.parametrize("extra, code, text", CLI_PARAMS)
def test_cli_fit_bad_parameters(extra, code, text, tmp_path):
    data = _zarr_rows(tmp_path / "d.zarr", CONT)
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = CliRunner().invoke(app, ["fit", data, *extra, "-o", str(outdir / "m.zarr"), "-s", "threads"])
    assert r.exit_code == code, r.output
    assert text in _unwrapped(r.output)
    assert os.listdir(outdir) == []


def test_cli_predict_and_info_bad_input(fitted_models, tmp_path):
    runner = CliRunner()
    model = fitted_models["gmm_full"].save(tmp_path / "m.zarr")
    other = fitted_models["categorical_hmm"].save(tmp_path / "hmm.zarr")
    three = _zarr_rows(tmp_path / "three.zarr", np.zeros((20, 3)))
    nan = _zarr_rows(tmp_path / "nan.zarr", _with(CONT, 5, 0, np.nan))
    outdir = tmp_path / "out"
    outdir.mkdir()
    cases = [
        (["predict", model, three, "-o", str(outdir / "p.zarr")], "fitted on 2 feature(s) but the data have 3"),
        (["predict", model, nan, "-o", str(outdir / "p.zarr")], "Remove or impute"),
        (["predict", str(tmp_path / "none.zarr"), three, "-o", str(outdir / "p.zarr")], "No model at"),
        (["predict", three, three, "-o", str(outdir / "p.zarr")], "not an emflow model"),
        (["predict", other, three, "-o", str(outdir / "p.zarr")], "needs arrays 'values' and 'offsets'"),
        (["predict", model, three, "-o", str(outdir / "p.zarr"), "--what", "banana"], "GaussianMixture, which writes labels, proba, log_likelihood; it has no banana"),
        (["info", str(tmp_path / "none.zarr")], "Check the path"),
    ]
    for args, text in cases:
        r = runner.invoke(app, [*args, "-s", "threads"] if args[0] == "predict" else args)
        assert r.exit_code == 2, (args, r.output)
        assert text in _unwrapped(r.output), (args, r.output)
        assert "Traceback" not in r.output
        assert os.listdir(outdir) == [], args


# --- the fit flow ----------------------------------------------------------------------------

# the session-wide ``prefect_server`` fixture is in conftest.py


FLOW_CASES = {  # case -> (rows or None for a missing path, flow kwargs, exception type, message)
    "missing_path": (None, {}, E.DataNotFoundError, "Check the path"),
    "rank_1": (CONT[:, 0], {}, E.DataError, "expected 2-D"),
    "nan": (_with(CONT, 7, 1, np.nan), {}, E.NonFiniteDataError, "Remove or impute"),
    "single_row": (CONT[:1], {}, E.DataError, "Use fewer components"),
    "huge_1e300": (CONT * 1e300, {}, E.FitFailedError, "Scale the data"),
}


@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_fit_flow_bad_input(case, prefect_server, tmp_path):
    from flows.fit import fit_flow

    X, kw, cls, text = FLOW_CASES[case]
    data = str(tmp_path / "missing.zarr") if X is None else _zarr_rows(tmp_path / "d.zarr", X)
    outdir = tmp_path / "out"
    outdir.mkdir()
    state = fit_flow(data, str(outdir / "m.zarr"), n_components=2, scheduler="threads", return_state=True, **kw)
    assert state.is_failed()
    with pytest.raises(cls, match=re.escape(text)):
        state.result()
    assert os.listdir(outdir) == []  # no model, no checkpoint


def test_fit_flow_bad_parameters_are_refused_before_running(prefect_server, tmp_path):
    from prefect.exceptions import ParameterTypeError

    from flows.fit import fit_flow

    data = _zarr_rows(tmp_path / "d.zarr", CONT)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for kw, word in [(dict(n_components=0), "n_components"), (dict(tol=-1.0), "tol"),
                     (dict(covariance_type="banana"), "covariance_type")]:
        with pytest.raises(ParameterTypeError, match=word):
            fit_flow(data, str(outdir / "m.zarr"), scheduler="threads", **kw)
    assert os.listdir(outdir) == []


@pytest.mark.filterwarnings("ignore::emflow.DegenerateComponentWarning")
def test_fit_flow_legitimate_odd_data_fits(prefect_server, tmp_path):
    """Duplicate rows only: the flow completes with a finite model, as the library does."""
    from flows.fit import fit_flow

    data = _zarr_rows(tmp_path / "d.zarr", np.repeat(CONT[:1], 60, axis=0))
    outdir = tmp_path / "out"
    outdir.mkdir()
    path = fit_flow(data, str(outdir / "m.zarr"), n_components=2, scheduler="threads")
    gm = emflow.load(path)
    assert all(np.all(np.isfinite(a)) for a in (gm.weights_, gm.means_, gm.covariances_))
    np.testing.assert_allclose(gm.means_, np.repeat(CONT[:1], 2, axis=0), rtol=1e-9)
