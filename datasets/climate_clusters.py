"""Climate regimes of a synthetic (time, lat, lon) cube: Zarr in with xarray, labels out to Zarr.

    python datasets/climate_clusters.py                     # ~20 MiB cube, about a minute
    python datasets/climate_clusters.py --gib 3 --res 1     # a few GiB at 1 degree, daily

What it does, all lazily (the cube is never in the client's memory):

1. writes a synthetic climate-like dataset to ``OUT/cube.zarr`` chunk by chunk: four float32
   variables (``t2m`` 2 m temperature [K], ``rh`` relative humidity [%], ``u10`` zonal wind
   [m/s], ``tcwv`` total column water vapour [kg/m2]) on a daily ``time`` axis and a ``--res`` degree
   ``lat``/``lon`` grid, chunked in time *and* longitude. Each grid cell belongs to one of five
   regimes (polar, temperate, desert, subtropical ocean, tropics; :func:`zones`), which set the
   variables' means; a seasonal cycle and noise vary them from day to day;
2. opens it with ``xarray.open_zarr`` and fits ``emflow.GaussianMixture`` on every
   (time, lat, lon) point, the four variables as features: each worker reads its own chunks;
3. writes the labels with ``predict(ds, out=OUT/labels.zarr)``, chunk by chunk, as an xarray
   dataset on the cube's grid (``xarray.open_zarr`` reads it back with the coordinates);
4. saves ``OUT/cluster_map.png``: the labels on the first day and each cell's most frequent
   label (clusters numbered from the coldest mean temperature up), if matplotlib is installed;
5. prints the figures (rows, GiB, partitions, seconds, the agreement of the labels with the
   true regimes) and writes them to ``OUT/summary.json``, with the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

VARIABLES = ("t2m", "rh", "u10", "tcwv")
# per regime: mean t2m [K], rh [%], u10 [m/s], tcwv [kg/m2]; and the seasonal amplitude of t2m [K]
REGIMES = {
    "polar": ((255.0, 75.0, 2.0, 5.0), 2.0),
    "temperate": ((281.0, 70.0, 7.0, 15.0), 2.0),
    "desert": ((301.0, 22.0, -2.0, 12.0), 1.5),
    "subtropical ocean": ((293.0, 72.0, -6.0, 30.0), 1.0),
    "tropics": ((300.0, 86.0, -3.0, 50.0), 0.5),
}
NOISE = (2.5, 5.0, 1.5, 3.0)  # standard deviation of each variable around its regime's mean


def zones(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """The true regime (index into :data:`REGIMES`) of each (lat, lon) cell: latitude bands,
    with synthetic continents (``sin(2 lon + 0.3) + 0.6 cos(9 lat) > 0``) turning the subtropics into deserts."""
    la, lo = np.abs(lat)[:, None], np.asarray(lon)[None, :]
    land = np.sin(np.deg2rad(2 * lo) + 0.3) + 0.6 * np.cos(np.deg2rad(9 * lat))[:, None] > 0.0
    z = np.full((lat.size, lon.size), 4)
    z = np.where(la > 15, np.where(land, 2, 3), z)
    z = np.where(la > 35, 1, z)
    return np.where(la > 60, 0, z)


def _block(block_info=None, *, lat, lon, var: int, seed: int):
    """One chunk of variable ``var``: deterministic in (seed, variable, chunk location)."""
    loc = block_info[None]["array-location"]
    (t0, t1), (y0, y1), (x0, x1) = loc
    z = zones(lat[y0:y1], lon[x0:x1])
    means = np.array([m[var] for m, _ in REGIMES.values()])[z]
    day = np.arange(t0, t1, dtype=np.float64)[:, None, None]
    rng = np.random.default_rng([seed, var, t0, y0, x0])
    values = means[None] + NOISE[var] * rng.standard_normal((t1 - t0, y1 - y0, x1 - x0))
    if VARIABLES[var] == "t2m":  # the seasons: opposite in the two hemispheres
        amp = np.array([a for _, a in REGIMES.values()])[z] * np.sign(lat[y0:y1])[:, None]
        values += amp[None] * np.cos(2 * np.pi * (day - 15) / 365.25)
    if VARIABLES[var] == "rh":
        values = np.clip(values, 0.0, 100.0)
    return values.astype(np.float32)


def make_cube(path: str, gib: float, res: float, chunk_days: int, seed: int = 0):
    """Write the synthetic cube (about ``gib`` GiB of float32) to Zarr at ``path``; returns it
    opened lazily with ``xarray.open_zarr``."""
    import dask.array as da
    import pandas as pd
    import xarray as xr

    lat = np.arange(-90 + res / 2, 90, res)
    lon = np.arange(0, 360, res)
    per_day = lat.size * lon.size * len(VARIABLES) * 4
    days = max(2, int(round(gib * 2**30 / per_day)))
    chunks = (min(chunk_days, days), lat.size, max(1, lon.size // 2))  # chunked in time and longitude
    shape = (days, lat.size, lon.size)
    data = {v: (("time", "lat", "lon"), da.map_blocks(_block, lat=lat, lon=lon, var=i, seed=seed,
                                                      chunks=da.core.normalize_chunks(chunks, shape),
                                                      dtype=np.float32, meta=np.empty((0, 0, 0), np.float32)))
            for i, v in enumerate(VARIABLES)}
    ds = xr.Dataset(data, coords={"time": pd.date_range("2001-01-01", periods=days, freq="D"), "lat": lat,
                                  "lon": lon})
    with warnings.catch_warnings():  # zarr: consolidated metadata is not in the v3 spec (xarray reads it)
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(path, mode="w", consolidated=True)
    return xr.open_zarr(path)[list(VARIABLES)]  # the features in this order


def plot_map(labels, order: np.ndarray, path: str) -> bool:
    """Save the labels on the first day and each cell's most frequent label as a PNG; False
    (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib to get cluster_map.png).")
        return False
    K = order.size
    rank = np.empty(K, dtype=np.int64)
    rank[order] = np.arange(K)  # cluster k is drawn as colour rank[k]: 0 = coldest
    first = rank[labels.isel(time=0).values]
    counts = np.stack([(labels == k).sum("time").values for k in range(K)])  # one lazy pass each
    common = rank[counts.argmax(axis=0)]
    cmap = plt.get_cmap("viridis", K)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    lon, lat = labels["lon"].values, labels["lat"].values
    for ax, grid, title in ((axes[0], first, f"labels on {str(labels['time'].values[0])[:10]}"),
                            (axes[1], common, f"most frequent label over {labels.sizes['time']} days")):
        im = ax.pcolormesh(lon, lat, grid, cmap=cmap, vmin=-0.5, vmax=K - 0.5, shading="nearest")
        ax.set(title=title, xlabel="longitude", ylabel="latitude")
    fig.colorbar(im, ax=axes, ticks=range(K), label="cluster (0 = coldest)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _peak_mib() -> float:
    """The process's peak resident memory so far, MiB (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=0.02, help="size of the cube in GiB (float32; default 0.02)")
    p.add_argument("--res", type=float, default=2.0, help="grid spacing in degrees (default 2)")
    p.add_argument("--chunk-days", type=int, default=32, help="days per chunk (default 32)")
    p.add_argument("--n-components", type=int, default=len(REGIMES), help="clusters (default 5)")
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--scheduler", default="threads", help="emflow scheduler (default threads)")
    p.add_argument("--no-persist", action="store_true",
                   help="stream the cube from Zarr every iteration (persist=False) instead of keeping it in memory")
    p.add_argument("--out", default="climate_clusters_out", help="folder for cube.zarr, labels.zarr, the PNG")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import emflow

    os.makedirs(a.out, exist_ok=True)
    cube_path, labels_path = os.path.join(a.out, "cube.zarr"), os.path.join(a.out, "labels.zarr")
    t0 = time.perf_counter()
    ds = make_cube(cube_path, a.gib, a.res, a.chunk_days, a.seed)
    t_make = time.perf_counter() - t0
    peak = {"make": _peak_mib()}
    n_rows = int(np.prod([ds.sizes[d] for d in ("time", "lat", "lon")]))
    print(f"cube: {dict(ds.sizes)}, {len(VARIABLES)} variables, {n_rows:,} rows, "
          f"{ds.nbytes / 2**30:.3f} GiB, chunks {ds['t2m'].data.chunksize} (written in {t_make:.1f} s)")

    gmm = emflow.GaussianMixture(n_components=a.n_components, covariance_type="full", max_iter=a.max_iter,
                                 tol=a.tol, random_state=a.seed, scheduler=a.scheduler,
                                 persist=False if a.no_persist else "auto")
    t0 = time.perf_counter()
    gmm.fit(ds, sample_dims=("time", "lat", "lon"))
    t_fit = time.perf_counter() - t0
    peak["fit"] = _peak_mib()
    t0 = time.perf_counter()
    labels = gmm.predict(ds, out=labels_path, overwrite=True)  # an xarray dataset on the grid, chunk by chunk
    t_predict = time.perf_counter() - t0
    peak["predict"] = _peak_mib()
    print(f"fit: {gmm.n_iter_} iterations (converged {gmm.converged_}), {gmm.fit_info_['partitions']} "
          f"partitions, {t_fit:.1f} s; predict to {labels_path}: {t_predict:.1f} s")

    import xarray as xr
    from sklearn.metrics import adjusted_rand_score

    labels = xr.open_zarr(labels_path)["label"]  # what any xarray user reads back
    truth = np.broadcast_to(zones(ds["lat"].values, ds["lon"].values), labels.shape)
    step = max(1, labels.size // 2_000_000)  # days apart in the sample scored (at most ~2e6 points)
    ari = float(adjusted_rand_score(truth[::step].ravel(), labels[::step].values.ravel()))
    order = np.argsort(gmm.means_[:, VARIABLES.index("t2m")])
    plotted = plot_map(labels, order, os.path.join(a.out, "cluster_map.png"))
    peak["plot"] = _peak_mib()
    summary = {
        "rows": n_rows, "features": len(VARIABLES), "gib": round(ds.nbytes / 2**30, 4),
        "sizes": {k: int(v) for k, v in ds.sizes.items()}, "chunks": list(ds["t2m"].data.chunksize),
        "partitions": gmm.fit_info_["partitions"], "resident": gmm.fit_info_["resident"], "n_components": a.n_components, "n_iter": gmm.n_iter_,
        "converged": gmm.converged_, "seconds_make": round(t_make, 2), "seconds_fit": round(t_fit, 2),
        "seconds_predict": round(t_predict, 2), "adjusted_rand_vs_true_regimes": round(ari, 4),
        "cluster_means": {v: [round(float(m), 2) for m in gmm.means_[order, i]] for i, v in enumerate(VARIABLES)},
        "plot": os.path.join(a.out, "cluster_map.png") if plotted else None,
        "peak_rss_mib_after": peak,
        "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
    }
    print(f"agreement with the true regimes (adjusted Rand index, every {step} day(s)): {ari:.4f}")
    print(f"load average {summary['loadavg']} on {summary['cpus']} CPUs (timings on a shared machine are noisy)")
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
