"""Bad input gets a specific error and touches nothing; models round-trip exactly."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import emflow
from emflow import errors as E
from emflow.cli.main import app
from emflow.storage.synthetic import write_gmm


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_gmm(tmp_path_factory.mktemp("d") / "data.zarr", 3000, 3, 2, "full", seed=2, chunk_rows=500)


@pytest.fixture(scope="module")
def fitted(dataset):
    return emflow.GaussianMixture(3, random_state=0, scheduler="threads").fit(dataset)


def _zarr_rows(path, X, chunks):
    g = zarr.open_group(path, mode="w")
    g.create_array("X", data=X, chunks=chunks, config={"write_empty_chunks": True})  # a missing chunk is an error
    g.attrs["rows"] = "X"
    return str(path)


BAD_PARAMS = [
    (dict(n_components=0), "n_components"),
    (dict(n_components=2.5), "n_components"),
    (dict(covariance_type="banana"), "covariance_type"),
    (dict(tol=-1.0), "tol"),
    (dict(reg_covar=-1e-6), "reg_covar"),
    (dict(max_iter=-1), "max_iter"),
    (dict(n_init=0), "n_init"),
    (dict(init_params="magic"), "init_params"),
    (dict(split_every=1), "split_every"),
    (dict(persist="sometimes"), "persist"),
    (dict(partition_bytes=0), "partition_bytes"),
    (dict(n_components=2, weights_init=[0.3, 0.3]), "weights_init"),
    (dict(n_components=2, means_init=np.zeros((3, 2))), "means_init"),
    (dict(n_components=2, precisions_init=-np.ones(2), covariance_type="spherical"), "precisions_init"),
]


@pytest.mark.parametrize("kwargs, word", BAD_PARAMS)
def test_invalid_parameters(kwargs, word):
    X = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(E.ConfigError, match=word):
        emflow.GaussianMixture(scheduler="threads", **kwargs).fit(X)


def test_bad_data(tmp_path):
    gm = emflow.GaussianMixture(3, scheduler="threads")
    with pytest.raises(E.DataNotFoundError, match="No Zarr data"):
        gm.fit(tmp_path / "missing.zarr")
    with pytest.raises(E.DataError, match="expected 2-D"):
        gm.fit(np.arange(10.0))
    with pytest.raises(E.DataError, match="not a real number type"):
        gm.fit(np.array([["a", "b"]] * 10))
    with pytest.raises(E.DataError, match="empty"):
        gm.fit(np.zeros((0, 3)))
    with pytest.raises(E.DataError, match="at least 3 are needed"):
        gm.fit(np.zeros((2, 3)))
    with pytest.raises(E.DataError, match="one weight per row"):
        gm.fit(np.zeros((10, 2)), sample_weight=np.ones(9))
    with pytest.raises(E.DataError, match="negative"):
        gm.fit(np.random.default_rng(0).normal(size=(10, 2)), sample_weight=-np.ones(10))
    with pytest.raises(E.DataError, match="sums to zero"):
        gm.fit(np.random.default_rng(0).normal(size=(10, 2)), sample_weight=np.zeros(10))
    g = zarr.open_group(tmp_path / "nodata.zarr", mode="w")
    g.create_array("other", shape=(3,), dtype="f8")
    with pytest.raises(E.DataError, match="holds no rows array"):
        gm.fit(tmp_path / "nodata.zarr")
    # all of these are EmflowErrors and builtin errors a Python user expects
    assert issubclass(E.DataError, ValueError) and issubclass(E.DataNotFoundError, FileNotFoundError)


def test_nan_names_the_chunk_and_count(tmp_path):
    X = np.random.default_rng(1).normal(size=(1000, 3))
    X[612, 1] = np.nan
    X[640, 2] = np.inf
    path = _zarr_rows(tmp_path / "nan.zarr", X, (100, 3))
    with pytest.raises(E.NonFiniteDataError, match=r"holds 2 NaN or infinite.*row 612, column 1 \(Zarr chunk 6, rows 600-700\)"):
        emflow.GaussianMixture(2, scheduler="threads").fit(path)
    with pytest.raises(E.NonFiniteDataError, match="row 612"):
        emflow.GaussianMixture(2, scheduler="threads").fit(X)


def test_wrong_feature_count_on_apply(fitted, tmp_path):
    with pytest.raises(E.FeatureMismatchError, match="fitted on 2 feature"):
        fitted.predict(np.zeros((5, 3)))
    path = _zarr_rows(tmp_path / "three.zarr", np.zeros((20, 3)), (10, 3))
    with pytest.raises(E.FeatureMismatchError):
        fitted.predict(path, out=tmp_path / "labels.zarr")
    assert not (tmp_path / "labels.zarr").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_not_fitted():
    with pytest.raises(E.NotFittedError, match="Call fit"):
        emflow.GaussianMixture(2).predict(np.zeros((3, 2)))


def test_degenerate_component_is_reported_not_nan(rng):
    X = rng.normal(size=(300, 2))
    means = np.array([[0.0, 0.0], [0.5, 0.5], [1e4, 1e4]])  # the third is far from every point
    with pytest.warns(E.DegenerateComponentWarning, match="Component 2 lost all its points"):
        gm = emflow.GaussianMixture(3, means_init=means, max_iter=5, scheduler="threads").fit(X)
    for a in (gm.weights_, gm.means_, gm.covariances_, gm.precisions_cholesky_):
        assert np.all(np.isfinite(a))
    assert gm.fit_info_["empty_components"] == [2]
    assert gm.weights_[2] < 1e-12


def test_singular_covariance_is_repaired_and_reported(rng):
    X = np.column_stack([rng.normal(size=400), np.full(400, 3.0)])  # a constant column
    with pytest.warns(E.DegenerateComponentWarning, match="not positive definite"):
        gm = emflow.GaussianMixture(2, reg_covar=0.0, random_state=0, scheduler="threads").fit(X)
    assert np.all(np.isfinite(gm.precisions_cholesky_))


def test_save_load_is_bit_identical(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.zarr")
    back = emflow.load(path)
    assert type(back) is emflow.GaussianMixture
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        a, b = getattr(fitted, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert a.tobytes() == b.tobytes()
    assert back.history_ == fitted.history_
    assert back.lower_bound_ == fitted.lower_bound_
    assert back.fit_info_["fingerprint"] == fitted.fit_info_["fingerprint"]
    assert back.get_params()["covariance_type"] == "full"
    attrs = emflow.read_model_attrs(path)
    assert attrs["family"] == "gaussian_mixture" and attrs["version"] == emflow.__version__
    # overwriting keeps one model and no temporary siblings
    fitted.save(tmp_path / "model.zarr", overwrite=True)
    assert os.listdir(tmp_path) == ["model.zarr"]


def test_load_refuses_other_things(dataset, tmp_path):
    with pytest.raises(E.ModelFormatError, match="not an emflow model"):
        emflow.load(dataset)
    with pytest.raises(E.DataNotFoundError):
        emflow.load(tmp_path / "none.zarr")
    g = zarr.open_group(tmp_path / "hmm.zarr", mode="w")
    g.attrs["emflow"] = {"family": "gaussian_hmm", "format": 1}
    with pytest.raises(E.ModelFormatError, match="not 'gaussian_mixture'"):
        emflow.GaussianMixture.load(tmp_path / "hmm.zarr")
    g.attrs["emflow"] = {"family": "gaussian_mixture", "format": 99}
    with pytest.raises(E.ModelFormatError, match="Upgrade emflow"):
        emflow.load(tmp_path / "hmm.zarr")


def test_failed_save_keeps_previous_model(fitted, tmp_path, monkeypatch):
    path = fitted.save(tmp_path / "model.zarr")
    before = emflow.load(path).means_.copy()
    import emflow.storage.store as S

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(S, "_json_safe", boom)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(path, overwrite=True)
    assert np.array_equal(emflow.load(path).means_, before)
    assert os.listdir(tmp_path) == ["model.zarr"]


def test_cli_fit_predict_info(dataset, tmp_path, dask_client):
    runner = CliRunner()
    addr = dask_client.scheduler.address
    model = tmp_path / "m.zarr"
    r = runner.invoke(app, ["fit", dataset, "-k", "3", "-o", str(model), "--seed", "0", "-s", addr])
    assert r.exit_code == 0, r.output
    assert "converged" in r.output and "log-likelihood" in r.output
    gm = emflow.load(model)
    ref = emflow.GaussianMixture(3, random_state=0, scheduler="threads").fit(dataset)
    np.testing.assert_allclose(gm.lower_bound_, ref.lower_bound_, rtol=1e-10)
    r = runner.invoke(app, ["predict", str(model), dataset, "-o", str(tmp_path / "lab.zarr"), "-s", addr])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "lab.zarr")[...], gm.predict(zarr.open_group(dataset)["X"][...]))
    r = runner.invoke(app, ["info", str(model)])
    assert r.exit_code == 0 and "GaussianMixture" in r.output
    r = runner.invoke(app, ["info", dataset])
    assert r.exit_code == 0 and "(3000, 2)" in r.output


def test_cli_predict_and_info_for_every_family(tmp_path):
    """`emflow predict` writes each family's default output (or the one asked for) and
    `emflow info` describes every family's model; a wrong output is an error that lists them."""
    from emflow.storage.synthetic import write_hmm, write_lda, write_lgssm

    runner = CliRunner()
    hmm_data = write_hmm(tmp_path / "h.zarr", 20, 2, 2, "gaussian", "diag", min_length=10, max_length=30, seed=1)
    lda_data = write_lda(tmp_path / "c.zarr", 60, 30, 3, seed=1)
    ssm_data = write_lgssm(tmp_path / "s.zarr", 6, 2, 3, min_length=10, max_length=30, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = {
            "hmm": (emflow.GaussianHMM(2, n_iter=3, scheduler="threads").fit(hmm_data), hmm_data),
            "lda": (emflow.LatentDirichletAllocation(3, max_iter=2, scheduler="threads").fit(lda_data), lda_data),
            "ssm": (emflow.LinearGaussianSSM(2, max_iter=2, scheduler="threads").fit(ssm_data), ssm_data),
        }
    for name, (est, data) in fitted.items():
        est.save(tmp_path / f"{name}-model.zarr")
    cases = [("hmm", None, "labels", lambda est, d: est.predict(d)),
             ("hmm", "proba", "proba", lambda est, d: est.predict_proba(d)),
             ("lda", None, "topics", lambda est, d: est.transform(d)),
             ("ssm", "filtered_states", "filtered_states", lambda est, d: est.filter(d)[0])]
    for name, what, kind, expected in cases:
        est, data = fitted[name]
        out = tmp_path / f"{name}-{kind}.zarr"
        r = runner.invoke(app, ["predict", str(tmp_path / f"{name}-model.zarr"), data, "-o", str(out), "-s", "threads",
                                *(["--what", what] if what else [])])
        assert r.exit_code == 0, r.output
        assert f"wrote {kind} of shape" in r.output
        got = zarr.open_group(out)["values"][...] if name != "lda" else zarr.open_array(out)[...]
        np.testing.assert_allclose(got, expected(est, data), rtol=1e-12, atol=1e-14)
    r = runner.invoke(app, ["predict", str(tmp_path / "lda-model.zarr"), lda_data, "-o", str(tmp_path / "x.zarr"),
                            "--what", "labels", "-s", "threads"])
    assert r.exit_code == 2 and "LatentDirichletAllocation, which writes topics; it has no labels" in r.output
    assert not (tmp_path / "x.zarr").exists()
    for name, words in [("hmm", ["GaussianHMM", "log-likelihood per step", "start probabilities", "20 sequences"]),
                        ("lda", ["LatentDirichletAllocation", "bound per word", "perplexity", "60 docs"]),
                        ("ssm", ["LinearGaussianSSM", "state dimension", "6 sequences"])]:
        r = runner.invoke(app, ["info", str(tmp_path / f"{name}-model.zarr")])
        assert r.exit_code == 0, r.output
        assert all(w in r.output for w in words), (name, r.output)


def test_cli_errors_leave_nothing(tmp_path):
    runner = CliRunner()
    X = np.random.default_rng(0).normal(size=(100, 2))
    X[5, 0] = np.nan
    bad = _zarr_rows(tmp_path / "bad.zarr", X, (50, 2))
    r = runner.invoke(app, ["fit", bad, "-k", "2", "-o", str(tmp_path / "m.zarr"), "-s", "threads"])
    assert r.exit_code == 2
    assert "NaN" in r.output
    r = runner.invoke(app, ["fit", str(tmp_path / "nope.zarr"), "-k", "2", "-o", str(tmp_path / "m.zarr")])
    assert r.exit_code == 2 and "No Zarr data" in r.output
    r = runner.invoke(app, ["fit", bad, "-k", "2", "-o", str(tmp_path / "m.zarr"), "-s", "tcp://127.0.0.1:1"])
    assert r.exit_code == 2 and "127.0.0.1:1" in r.output
    assert sorted(os.listdir(tmp_path)) == ["bad.zarr"]


def test_missing_or_corrupt_chunk_is_named(tmp_path):
    X = np.random.default_rng(2).normal(size=(400, 2))
    path = write_gmm(tmp_path / "holes.zarr", 400, 2, 2, seed=1, chunk_rows=100)
    os.remove(tmp_path / "holes.zarr" / "X" / "c" / "2" / "0")
    with pytest.raises(E.DataError, match=r"Chunk \(2, 0\) \(rows 200-300\).*missing"):
        emflow.GaussianMixture(2, scheduler="threads").fit(path)
    path = _zarr_rows(tmp_path / "bad.zarr", X, (100, 2))
    with open(tmp_path / "bad.zarr" / "X" / "c" / "1" / "0", "wb") as f:
        f.write(b"not a chunk")
    with pytest.raises(E.DataError, match=r"Chunk \(1, 0\) \(rows 100-200\).*corrupt"):
        emflow.GaussianMixture(2, scheduler="threads").fit(path)
