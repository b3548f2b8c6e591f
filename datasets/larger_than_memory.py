"""Larger than memory, shown: fit a Gaussian mixture to data several times the workers' memory.

The script

1. writes a Gaussian-mixture dataset of ``--size`` bytes to Zarr with
   :func:`emflow.storage.synthetic.write_gmm` (one chunk in memory at a time);
2. starts a ``LocalCluster`` of ``--workers`` single-threaded worker processes, each
   limited to ``--memory-limit`` (Dask's nanny pauses a worker at 80 % of it, spills at
   70 %, and kills it at 95 %);
3. fits :class:`emflow.GaussianMixture` with ``persist=False``: every EM iteration streams
   the partitions from Zarr on the workers, and only the sufficient statistics travel;
4. samples every worker's resident set size (a thread per worker, psutil, every 20 ms,
   started and read with ``client.run``) and also reads the kernel's high-water mark
   (``VmHWM``), checks that no worker was restarted, paused or spilled to disk;
5. fits the same data in memory in this process (same initial parameters) and reports the
   largest relative difference of the fitted parameters (skipped when three copies of the
   data would not fit in this machine's available memory).

Partitions are ``--partition-mib`` MiB (``GaussianMixture(partition_bytes=...)``; emflow's
default for a Zarr path is 64 MiB partitions, with which workers peaked at 264 MiB).

Run the small default (1.5 GiB of data, two workers of 256 MiB)::

    python -m datasets.larger_than_memory --workdir /tmp/ltm

and by hand at a larger size, e.g. 8 GiB against two 1 GiB workers::

    python -m datasets.larger_than_memory --workdir /scratch/ltm --size 8GiB --memory-limit 1GiB \\
        --partition-mib 64 --max-iter 3

Figures measured are recorded in datasets/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings

import numpy as np

__all__ = ["run", "parse_size"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text) -> int:
    """Bytes in ``"1GiB"``, ``"300MiB"``, ``"2.5GB"`` or a plain number."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(float(num) * _UNITS[s[len(num):]])


# -- run on the workers (client.run passes dask_worker) --------------------------------------
def _start_sampler(dask_worker, interval: float = 0.02) -> dict:
    import threading

    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "samples": 0, "paused": False, "max_on_disk": 0,
             "stop": threading.Event(), "pid": os.getpid()}

    def loop():
        while not state["stop"].is_set():
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            state["samples"] += 1
            if getattr(dask_worker.status, "name", "") == "paused":
                state["paused"] = True
            state["max_on_disk"] = max(state["max_on_disk"], len(getattr(dask_worker.data, "slow", ())))
            state["stop"].wait(interval)

    t = threading.Thread(target=loop, name="emflow-rss-sampler", daemon=True)
    state["thread"] = t
    dask_worker._emflow_rss = state
    t.start()
    return {"pid": os.getpid(), "rss": proc.memory_info().rss}


def _vm_hwm() -> int:
    """The kernel's high-water mark of this process's resident memory (Linux VmHWM), or 0.

    (``getrusage().ru_maxrss`` is no use here: it survives ``exec`` and so reports the
    parent's peak in a freshly spawned worker.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _stop_sampler(dask_worker) -> dict:
    state = dask_worker._emflow_rss
    state["stop"].set()
    state["thread"].join()
    metrics = getattr(dask_worker.data, "cumulative_metrics", {})
    return {
        "pid": os.getpid(),
        "peak_rss": int(state["peak"]),
        "max_rss_kernel": _vm_hwm(),
        "samples": int(state["samples"]),
        "paused": bool(state["paused"]),
        "spilled_keys": int(metrics.get(("disk-write", "count"), 0)) + int(state["max_on_disk"]),
        "memory_limit": int(dask_worker.memory_manager.memory_limit or 0),
    }


def _warm_up() -> int:
    """Import what the E-step needs, so the baseline includes the libraries."""
    import psutil
    import scipy.linalg  # noqa: F401
    import scipy.special  # noqa: F401
    import zarr  # noqa: F401

    import emflow.estimators.mixture  # noqa: F401

    return psutil.Process().memory_info().rss


def _initial_params(truth: dict, covariance_type: str, seed: int) -> dict:
    """The same start for both fits: true means moved by ~half a unit, equal weights, unit precisions."""
    rng = np.random.default_rng([seed, 7])
    means = np.asarray(truth["means"]) + rng.normal(scale=0.5, size=np.shape(truth["means"]))
    K, d = means.shape
    prec = {"full": np.broadcast_to(np.eye(d), (K, d, d)).copy(), "tied": np.eye(d),
            "diag": np.ones((K, d)), "spherical": np.ones(K)}[covariance_type]
    return {"weights_init": np.full(K, 1.0 / K), "means_init": means, "precisions_init": prec}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def run(workdir, *, size="1.5GiB", n_workers: int = 2, memory_limit="256MiB", partition_mib: float = 8,
        n_features: int = 16, n_components: int = 3, covariance_type: str = "diag", max_iter: int = 3,
        seed: int = 0, compare: bool = True, keep: bool = True, log=print) -> dict:
    """Write the data (unless already there), fit them streaming on a memory-limited cluster, report.

    Returns a dict of the figures (sizes in bytes, seconds, per-worker memory, agreement).
    """
    import zarr
    from distributed import Client, LocalCluster

    import emflow
    from emflow.storage.synthetic import write_gmm

    size_b, limit_b = parse_size(size), parse_size(memory_limit)
    row_bytes = n_features * 8
    n_samples = max(n_components, size_b // row_bytes)
    part_rows = max(1, int(partition_mib * 2**20) // row_bytes)
    chunk_rows = max(1, part_rows // 2)  # two Zarr chunks per partition
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"gmm-{n_samples}x{n_features}-{covariance_type}-k{n_components}-s{seed}-c{chunk_rows}.zarr")
    t0 = time.perf_counter()
    if not os.path.exists(path):
        log(f"writing {n_samples:,} rows x {n_features} ({size_b / 2**30:.2f} GiB) to {path}")
        write_gmm(path, n_samples, n_components, n_features, covariance_type, seed=seed, chunk_rows=chunk_rows)
    write_s = time.perf_counter() - t0
    g = zarr.open_group(path, mode="r")
    truth = dict(g.attrs["truth"])
    data_bytes = n_samples * row_bytes
    init = _initial_params(truth, covariance_type, seed)
    common = dict(n_components=n_components, covariance_type=covariance_type, tol=0.0, max_iter=max_iter, **init)

    report: dict = {
        "data": {"path": path, "rows": n_samples, "features": n_features, "bytes": data_bytes,
                 "bytes_on_disk": _du(path), "zarr_chunk_rows": chunk_rows, "write_seconds": round(write_s, 2)},
        "cluster": {"workers": n_workers, "memory_limit_per_worker": limit_b,
                    "memory_limit_total": limit_b * n_workers},
        "partition_bytes": part_rows * row_bytes,
    }
    report["data_over_total_worker_memory"] = data_bytes / (limit_b * n_workers)
    log(f"data {data_bytes / 2**20:,.0f} MiB = {report['data_over_total_worker_memory']:.1f}x the workers' "
        f"total memory ({n_workers} x {limit_b / 2**20:.0f} MiB); partitions of {part_rows * row_bytes / 2**20:.1f} MiB")

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit=limit_b,
                           dashboard_address=":0", silence_logs=40)
    pids = []
    try:
        with Client(cluster) as client:
            pids = sorted(client.run(os.getpid).values())
            baseline = client.run(_warm_up)
            client.run(_start_sampler)
            gm = emflow.GaussianMixture(**common, scheduler=client, persist=False,
                                        partition_bytes=part_rows * row_bytes)
            t1 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", emflow.errors.EmflowConvergenceWarning)
                gm.fit(path)  # each worker reads its partitions straight from Zarr
            fit_s = time.perf_counter() - t1
            workers = client.run(_stop_sampler)
            pids_after = sorted(client.run(os.getpid).values())
            addresses_ok = set(workers) == set(baseline)
    finally:
        cluster.close()
        _kill_pids(pids)

    per_worker = []
    for addr, w in sorted(workers.items()):
        per_worker.append({
            "address": addr, "pid": w["pid"], "baseline_rss": int(baseline[addr]), "peak_rss": w["peak_rss"],
            "peak_rss_kernel": w["max_rss_kernel"], "memory_limit": w["memory_limit"],
            "rss_samples": w["samples"], "paused": w["paused"], "spilled_keys": w["spilled_keys"],
        })
    peak = max(max(w["peak_rss"], w["peak_rss_kernel"]) for w in per_worker)
    report["workers"] = per_worker
    report["restarted"] = (pids != pids_after) or not addresses_ok
    report["paused"] = any(w["paused"] for w in per_worker)
    report["spilled"] = any(w["spilled_keys"] for w in per_worker)
    report["peak_rss_max"] = peak
    report["peak_over_limit"] = peak / limit_b
    report["peak_growth_in_partitions"] = max(
        (max(w["peak_rss"], w["peak_rss_kernel"]) - w["baseline_rss"]) for w in per_worker
    ) / report["partition_bytes"]
    report["streaming"] = {
        "seconds": round(fit_s, 2), "n_iter": gm.n_iter_, "partitions": gm.fit_info_["partitions"],
        "resident": gm.fit_info_["resident"], "seconds_per_iteration": gm.fit_info_["seconds_per_iteration"],
        "lower_bound": gm.lower_bound_, "history": gm.history_,
    }
    log(f"streaming fit: {gm.n_iter_} iterations in {fit_s:.1f} s, "
        f"{np.mean(gm.fit_info_['seconds_per_iteration']):.2f} s/iteration over {gm.fit_info_['partitions']} partitions")
    for w in per_worker:
        log(f"  worker pid {w['pid']}: baseline {w['baseline_rss'] / 2**20:.0f} MiB, peak {w['peak_rss'] / 2**20:.0f} MiB "
            f"sampled / {w['peak_rss_kernel'] / 2**20:.0f} MiB kernel high-water, limit {w['memory_limit'] / 2**20:.0f} MiB, "
            f"paused={w['paused']}, spilled={w['spilled_keys']}")
    log(f"  restarted={report['restarted']} paused={report['paused']} spilled={report['spilled']}")

    if compare:
        import psutil

        if data_bytes * 3 > psutil.virtual_memory().available:
            log("skipping the in-memory comparison: the data do not fit in this machine's memory")
        else:
            t2 = time.perf_counter()
            Xm = zarr.open_group(path, mode="r")["X"][...]
            ref = emflow.GaussianMixture(**common, scheduler="threads", persist=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", emflow.errors.EmflowConvergenceWarning)
                ref.fit(Xm)
            del Xm
            report["in_memory"] = {"seconds": round(time.perf_counter() - t2, 2), "lower_bound": ref.lower_bound_}
            report["agreement"] = {
                "weights": _rel(gm.weights_, ref.weights_), "means": _rel(gm.means_, ref.means_),
                "covariances": _rel(gm.covariances_, ref.covariances_),
                "history": _rel(gm.history_, ref.history_),
            }
            log("  agreement with the in-memory fit (max relative difference): "
                + ", ".join(f"{k} {v:.1e}" for k, v in report["agreement"].items()))
    truth_means = np.asarray(truth["means"])
    order = [int(np.argmin(((truth_means - m) ** 2).sum(1))) for m in gm.means_]
    report["max_error_vs_truth_means"] = float(np.max(np.abs(gm.means_ - truth_means[order])))
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    return report


def _kill_pids(pids) -> None:
    """Kill worker processes this run started that outlived cluster.close() (by pid only)."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, 0)
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Fit a Gaussian mixture to data several times the Dask workers' memory.")
    p.add_argument("--workdir", required=True, help="Where the dataset is written (kept for reuse unless --no-keep).")
    p.add_argument("--size", default="1.5GiB", help="Data size, e.g. 1GiB, 8GiB (default 1.5GiB).")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="256MiB", help="Per worker (default 256MiB).")
    p.add_argument("--partition-mib", type=float, default=8)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--components", type=int, default=3)
    p.add_argument("--covariance-type", default="diag", choices=["full", "tied", "diag", "spherical"])
    p.add_argument("--max-iter", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true", help="Skip the in-memory reference fit.")
    p.add_argument("--no-keep", action="store_true", help="Delete the dataset afterwards.")
    p.add_argument("--json", default=None, help="Also write the report as JSON to this file.")
    a = p.parse_args(argv)
    rep = run(a.workdir, size=a.size, n_workers=a.workers, memory_limit=a.memory_limit,
              partition_mib=a.partition_mib, n_features=a.features, n_components=a.components,
              covariance_type=a.covariance_type, max_iter=a.max_iter, seed=a.seed,
              compare=not a.no_compare, keep=not a.no_keep)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2, default=float)
    return rep


if __name__ == "__main__":
    main()
