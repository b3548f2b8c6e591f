"""xarray DataArray / Dataset in and out of the row families (emflow.storage.xarray_io)."""

from __future__ import annotations

import numpy as np
import pytest

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")

import emflow  # noqa: E402
from emflow.errors import DataError  # noqa: E402
from emflow.storage.xarray_io import from_rows, to_rows  # noqa: E402

T, Y, X, D = 6, 5, 4, 3


@pytest.fixture(scope="module")
def cube():
    """A (time, lat, lon, variable) DataArray with two clusters, and its rows in C order."""
    rng = np.random.default_rng(0)
    vals = rng.normal(0, 1, (T, Y, X, D))
    vals[:, :, 2:] += 4.0
    arr = xr.DataArray(vals, dims=("time", "lat", "lon", "variable"),
                       coords={"time": np.arange(T) * 10, "lat": np.linspace(-10, 10, Y),
                               "lon": np.linspace(0, 30, X), "variable": ["t2m", "u10", "v10"]}, name="cube")
    return arr, vals.reshape(-1, D)


def _gmm(cls=emflow.GaussianMixture):
    return cls(n_components=2, random_state=0, tol=1e-6, max_iter=50)


def _same_fit(a, b):
    np.testing.assert_array_equal(a.means_, b.means_)
    np.testing.assert_array_equal(a.covariances_, b.covariances_)
    np.testing.assert_array_equal(a.weights_, b.weights_)
    assert a.lower_bound_ == b.lower_bound_ and a.n_iter_ == b.n_iter_


def test_rows_round_trip(cube):
    arr, rows = cube
    got, tpl = to_rows(arr, feature_dim="variable")
    np.testing.assert_array_equal(got, rows)
    assert tpl.sample_dims == ("time", "lat", "lon") and tpl.shape == (T, Y, X)
    back = from_rows(got[:, 0], tpl, "first")
    xr.testing.assert_equal(back, arr.isel(variable=0, drop=True).rename("first"))
    # other stacking order: lon fastest -> time fastest
    got2, tpl2 = to_rows(arr, sample_dims=("lon", "lat", "time"), feature_dim="variable")
    np.testing.assert_array_equal(got2, arr.transpose("lon", "lat", "time", "variable").values.reshape(-1, D))
    xr.testing.assert_equal(from_rows(got2[:, 1], tpl2, "u").transpose("time", "lat", "lon"),
                            arr.sel(variable="u10", drop=True).rename("u"))


@pytest.mark.parametrize("cls", [emflow.GaussianMixture, emflow.BayesianGaussianMixture])
def test_dataarray_fit_equals_rows_fit(cube, cls):
    arr, rows = cube
    ref = _gmm(cls).fit(rows)
    est = _gmm(cls).fit(arr, feature_dim="variable")
    _same_fit(est, ref)
    labels = est.predict(arr)
    assert isinstance(labels, xr.DataArray) and labels.dims == ("time", "lat", "lon")
    np.testing.assert_array_equal(labels.values.reshape(-1), ref.predict(rows))
    for d in ("time", "lat", "lon"):
        np.testing.assert_array_equal(labels[d].values, arr[d].values)
    proba = est.predict_proba(arr)
    assert proba.dims == ("time", "lat", "lon", "component") and proba.sizes["component"] == 2
    np.testing.assert_array_equal(proba.values.reshape(-1, 2), ref.predict_proba(rows))
    score = est.score_samples(arr)
    assert score.dims == ("time", "lat", "lon") and score.name == "log_likelihood"
    np.testing.assert_array_equal(score.values.reshape(-1), ref.score_samples(rows))
    assert est.score(arr) == ref.score(rows) and est.bic(arr) == ref.bic(rows)


def test_dask_dataarray_and_dataset(cube):
    arr, rows = cube
    chunked = arr.chunk({"time": 2, "variable": -1})
    got, _ = to_rows(chunked, feature_dim="variable")
    assert isinstance(got, da.Array)  # lazy: nothing read on the client
    ref = _gmm().fit(da.from_array(rows, chunks=got.chunks))
    est = _gmm().fit(chunked, feature_dim="variable")
    _same_fit(est, ref)
    np.testing.assert_array_equal(est.predict(chunked).values.reshape(-1), ref.predict(rows))

    ds = arr.to_dataset(dim="variable")
    ref_mem = _gmm().fit(rows)
    est_ds = _gmm().fit(ds)  # features: the variables, sample dims: every dimension
    _same_fit(est_ds, ref_mem)
    ds_lazy = ds.chunk({"time": 2})
    rows_lazy, tpl = to_rows(ds_lazy)
    assert isinstance(rows_lazy, da.Array) and tpl.features == ("t2m", "u10", "v10")
    np.testing.assert_array_equal(rows_lazy.compute(), rows)
    _same_fit(_gmm().fit(ds_lazy), _gmm().fit(da.from_array(rows, chunks=rows_lazy.chunks)))
    # prediction takes the fitted variables in the fitted order
    lab = est_ds.predict(ds[["v10", "t2m", "u10"]])
    np.testing.assert_array_equal(lab.values.reshape(-1), ref_mem.predict(rows))
    assert lab.dims == ("time", "lat", "lon")


def test_nan_follows_missing_option(cube):
    arr, rows = cube
    holes = arr.copy()
    holes[0, 0, 0, 1] = np.nan
    with pytest.raises(emflow.NonFiniteDataError):
        _gmm().fit(holes, feature_dim="variable")
    rows_h = rows.copy()
    rows_h[0, 1] = np.nan
    est = emflow.GaussianMixture(n_components=2, random_state=0, max_iter=5, missing="marginalize")
    ref = emflow.GaussianMixture(n_components=2, random_state=0, max_iter=5, missing="marginalize")
    _same_fit(est.fit(holes, feature_dim="variable"), ref.fit(rows_h))


def test_bad_input(cube):
    arr, _ = cube
    est = _gmm()
    with pytest.raises(DataError, match="feature_dim='band'"):
        est.fit(arr, feature_dim="band")
    with pytest.raises(DataError, match="'depth'"):
        est.fit(arr, sample_dims=("time", "depth"), feature_dim="variable")
    with pytest.raises(DataError, match=r"\['lon'\].*sample_dims"):
        est.fit(arr, sample_dims=("time", "lat"), feature_dim="variable")
    with pytest.raises(DataError, match="needs feature_dim"):
        est.fit(arr)
    with pytest.raises(DataError, match=r"'variable' is split into 3 chunks.*chunk\(\{'variable': -1\}\)"):
        est.fit(arr.chunk({"variable": 1}), feature_dim="variable")
    with pytest.raises(DataError, match="not numeric"):
        est.fit(arr.astype(str), feature_dim="variable")
    ds = arr.to_dataset(dim="variable")
    ds["name"] = ds["t2m"].astype(str)
    with pytest.raises(DataError, match="Variable 'name'.*not numeric"):
        est.fit(ds)
    with pytest.raises(DataError, match="Dataset"):
        est.fit(ds[["t2m"]], feature_dim="variable")
    fitted = _gmm().fit(arr.to_dataset(dim="variable"))
    with pytest.raises(DataError, match=r"no variable\(s\) \['v10'\]"):
        fitted.predict(ds[["t2m", "u10"]])
    with pytest.raises(DataError, match="sequences"):
        emflow.GaussianHMM(n_components=2).fit(arr)


def _blocks_of(x):
    """Row partitions of a fit or prediction input (as the engine opens them)."""
    from emflow.storage.data import open_rows

    return len(open_rows(x).bounds)


def test_chunked_cube_stays_chunk_aligned(cube):
    arr, rows = cube
    chunked = arr.chunk({"time": 2, "lat": 2, "lon": 3, "variable": -1})  # 3 x 3 x 2 blocks
    got, tpl = to_rows(chunked, feature_dim="variable")
    assert got.numblocks == (18, 1) and tpl.chunks == ((2, 2, 2), (2, 2, 1), (3, 1))
    assert not any("rechunk" in name for name in got.dask.layers)  # each row block reads its own chunk
    assert _blocks_of(got) == 18
    # plain dask reshape would have merged chunks (what to_rows avoids)
    assert chunked.data.reshape(-1, D).numblocks[0] != 18
    # block by block: block (i, j, k) of the grid is one row block, in C order inside it
    first = chunked.isel(time=slice(0, 2), lat=slice(0, 2), lon=slice(0, 3)).values.reshape(-1, D)
    np.testing.assert_array_equal(got.blocks[0].compute(), first)
    values = got.compute()
    for v in (values[:, 0], got[:, 0]):  # back on the grid, from NumPy or from Dask
        xr.testing.assert_equal(from_rows(v, tpl, "t").compute(), arr.isel(variable=0, drop=True).rename("t"))
    est = _gmm().fit(chunked, feature_dim="variable")
    assert est.fit_info_["partitions"] == 18
    _same_fit(est, _gmm().fit(da.from_array(values, chunks=got.chunks)))
    ref = est.predict(arr)  # the same model on the in-memory cube (C order)
    xr.testing.assert_equal(est.predict(chunked), ref)
    ds = chunked.to_dataset(dim="variable")
    ds["u10"] = ds["u10"].chunk({"time": 3})  # variables chunked differently: stacked on the first's blocks
    rows_ds, tpl_ds = to_rows(ds)
    assert rows_ds.numblocks == (18, 1) and tpl_ds.chunks == tpl.chunks
    np.testing.assert_array_equal(rows_ds.compute(), values)


def test_out_writes_xarray_dataset_on_the_grid(cube, tmp_path):
    arr, rows = cube
    est = _gmm().fit(arr, feature_dim="variable")
    ref = est.predict(arr)
    chunked = arr.chunk({"time": 2, "lat": 2, "lon": 3})
    written = est.predict(chunked, out=tmp_path / "labels.zarr")
    opened = xr.open_zarr(tmp_path / "labels.zarr")
    for got in (written, opened["label"]):
        assert got.dims == ("time", "lat", "lon") and got.chunks is not None  # lazy
        xr.testing.assert_identical(got.compute(), ref)
    assert opened.attrs["emflow"]["kind"] == "labels" and opened.attrs["emflow"]["model_family"] == est.family
    import zarr

    var = zarr.open_array(tmp_path / "labels.zarr" / "label", mode="r")
    assert var.chunks == (2, 2, 3) and "emflow_row_blocks" not in var.attrs  # chunks: the blocks' common step
    # nothing is replaced unasked; with overwrite=True it is
    with pytest.raises(emflow.ConfigError, match="overwrite=True"):
        est.predict(chunked, out=tmp_path / "labels.zarr")
    proba = est.predict_proba(arr, out=tmp_path / "labels.zarr", overwrite=True)  # in memory: chunked on time
    assert proba.dims == ("time", "lat", "lon", "component")
    xr.testing.assert_allclose(xr.open_zarr(tmp_path / "labels.zarr")["proba"].compute(), est.predict_proba(arr),
                               rtol=0, atol=0)
    # a Dataset, and the family's other outputs
    ds = arr.to_dataset(dim="variable")
    est_ds = _gmm().fit(ds)
    score = est_ds.score_samples(ds.chunk({"lat": 2}), out=tmp_path / "score.zarr")
    np.testing.assert_array_equal(score.values.reshape(-1), est_ds.score_samples(rows))
    assert xr.open_zarr(tmp_path / "score.zarr")["log_likelihood"].dims == ("time", "lat", "lon")
    with pytest.raises(emflow.ConfigError, match="emflow never replaces"):
        est.predict(arr, out=tmp_path)  # a directory holding other files
    # the row families' plain outputs are unchanged
    flat = est.predict(rows, out=tmp_path / "flat.zarr")
    np.testing.assert_array_equal(flat[:], ref.values.reshape(-1))


@pytest.mark.parametrize("cls", [emflow.GaussianMixture, emflow.BayesianGaussianMixture])
def test_saved_model_keeps_the_layout(cube, tmp_path, cls):
    arr, rows = cube
    ds = arr.to_dataset(dim="variable")
    est = _gmm(cls).fit(ds)
    est.save(tmp_path / "m.zarr")
    loaded = emflow.load(tmp_path / "m.zarr")
    assert loaded._xarray_layout == {"sample_dims": ["time", "lat", "lon"], "feature_dim": None,
                                     "variables": ["t2m", "u10", "v10"], "features": None}
    shuffled = ds[["v10", "t2m", "u10"]].transpose("lon", "time", "lat")
    got = loaded.predict(shuffled)  # variables by name, in the fitted order; the fitted grid order
    assert got.dims == ("time", "lat", "lon")
    np.testing.assert_array_equal(got.values.reshape(-1), est.predict(rows))
    with pytest.raises(DataError, match=r"no variable\(s\) \['u10'\]"):
        loaded.predict(ds.drop_vars("u10"))
    # a DataArray with a labelled feature dimension: features by label
    est_a = _gmm(cls).fit(arr, feature_dim="variable")
    est_a.save(tmp_path / "a.zarr")
    loaded_a = emflow.load(tmp_path / "a.zarr")
    assert loaded_a._xarray_layout["features"] == ["t2m", "u10", "v10"]
    np.testing.assert_array_equal(loaded_a.predict(arr.sel(variable=["v10", "u10", "t2m"])).values.reshape(-1),
                                  est_a.predict(rows))
    renamed = arr.assign_coords(variable=["t2m", "u10", "w10"])
    with pytest.raises(DataError, match=r"'variable' has no \['v10'\]"):
        loaded_a.predict(renamed)
    # a model fitted on arrays keeps no layout
    plain = _gmm(cls).fit(rows)
    plain.save(tmp_path / "p.zarr")
    assert emflow.load(tmp_path / "p.zarr")._xarray_layout is None


def test_climate_example_runs_at_a_tiny_size(tmp_path):
    """datasets/climate_clusters.py end to end (cube to Zarr, fit, labels to Zarr, the PNG)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets",
                        "climate_clusters.py")
    spec = importlib.util.spec_from_file_location("climate_clusters", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    out = tmp_path / "cc"
    summary = ex.main(["--gib", "0.0003", "--res", "10", "--chunk-days", "8", "--out", str(out)])
    assert summary["sizes"] == {"time": 31, "lat": 18, "lon": 36} and summary["rows"] == 31 * 18 * 36
    assert summary["partitions"] == 4 * 2  # one per chunk: 4 in time x 2 in longitude
    assert summary["adjusted_rand_vs_true_regimes"] > 0.99  # the five regimes are recovered
    labels = xr.open_zarr(out / "labels.zarr")["label"]
    cube = xr.open_zarr(out / "cube.zarr")
    assert labels.dims == ("time", "lat", "lon")
    for d in labels.dims:
        np.testing.assert_array_equal(labels[d].values, cube[d].values)
    pytest.importorskip("matplotlib")
    assert (out / "cluster_map.png").stat().st_size > 0 and summary["plot"] is not None
