"""Gaussian mixtures side by side: emflow, scikit-learn and Spark MLlib, and the machine's ceiling.

One command regenerates ``benchmarks/RESULTS.md``, ``benchmarks/results.json`` and
``benchmarks/throughput.png``::

    python benchmarks/bench_gmm.py                  # quick grid (a few minutes)
    python benchmarks/bench_gmm.py --grid target    # full covariance, 1e6 rows, d=16, K=16
    python benchmarks/bench_gmm.py --grid types     # the same for full, tied, diag, spherical
    python benchmarks/bench_gmm.py --grid sizes     # every covariance type at 1e4, 1e5 and 1e6 rows (the plot)
    python benchmarks/bench_gmm.py --grid scale     # the target case at 1e7 rows
    python benchmarks/bench_gmm.py --grid full      # up to 10 million rows (long; needs ~10 GB)

For every case (rows n, features d, components K, covariance type) the data are generated
once into Zarr (``emflow.storage.synthetic.write_gmm``); scikit-learn reads the same values into
memory and Spark reads the same values from a raw binary copy. All systems start from the
same parameters (the true ones, perturbed) with ``reg_covar=0`` (Spark MLlib has none) and
run the same number of iterations. Each system runs in its own subprocess, so its peak
memory is the peak resident set of its whole process tree (interpreter, Dask workers or
JVM included), sampled every 50 ms.

How each system is timed (seconds per iteration, the median over iterations):

* emflow: ``GaussianMixture.fit(zarr_path, max_iter=N, tol=0)`` on a LocalCluster of one
  single-threaded worker process per core, started before the call; the per-iteration
  times are ``fit_info_["seconds_per_iteration"]`` (E-step map + tree reduction + M-step).
  Variants: ``emflow-f32`` (``compute_dtype="float32"``), ``emflow-stream`` (``persist=False``:
  the data are read from Zarr every iteration), ``emflow-threads`` (``scheduler="threads"``:
  no cluster, a thread pool in the calling process).
* scikit-learn: its own iteration, ``_e_step`` then ``_m_step`` (what ``fit`` runs per
  iteration), from the initial parameters set on the estimator (``fit`` would first run
  k-means even when all three ``*_init`` are given); OpenBLAS uses all cores.
* Spark MLlib (RDD API, ``local[*]``): the data are converted to a cached JVM RDD once,
  then ``trainGaussianMixtureModel`` runs with ``initialModel`` for 1 and for 1 + iters
  iterations; seconds per iteration = the difference / iters (Spark reports no
  per-iteration times). Spark MLlib has only full covariances: other types are n/a.

Every system's final parameters are scored by one float64 evaluator (the mean
log-likelihood per row of the data), which must agree between systems.

The ceiling: the GEMM rate through NumPy (2048^3 matmul; all threads in one process, and one
thread in each of ``cores`` processes at once, which is how emflow's workers run), and the
minimum floating-point work of one iteration (symmetric forms counted once; see
``min_flops``). The fraction of the ceiling is (min work / time per iteration) / rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEMS = ("emflow", "emflow-f32", "emflow-stream", "emflow-threads", "sklearn", "spark")
PEERS = ("sklearn", "spark")

# -- grids ---------------------------------------------------------------------------------


def grid(name: str) -> list[dict]:
    """Cases: dicts with n, d, K, ct and a sweep label."""
    cts = ("full", "tied", "diag", "spherical")
    out = []

    def add(sweep, n, d, K, ct):
        out.append(dict(sweep=sweep, n=int(n), d=d, K=K, ct=ct))

    if name == "tiny":  # what the test runs
        add("size", 2000, 3, 2, "full")
        add("size", 2000, 3, 2, "diag")
    elif name == "target":
        add("size", 1_000_000, 16, 16, "full")
    elif name == "types":  # the target case for every covariance type
        for ct in cts:
            add("size", 1_000_000, 16, 16, ct)
    elif name == "sizes":  # throughput against rows for every covariance type (the plot), up to the target size
        for ct in cts:
            for n in (10_000, 100_000, 1_000_000):
                add("size", n, 16, 16, ct)
    elif name == "scale":  # the target case at 10x the rows (1.2 GiB of float64)
        add("size", 10_000_000, 16, 16, "full")
    elif name == "quick":
        for n in (10_000, 100_000):
            add("size", n, 16, 16, "full")
        for ct in cts[1:]:
            add("size", 100_000, 16, 16, ct)
        for d, K in ((2, 2), (64, 4)):
            add("shape", 100_000, d, K, "full")
    elif name == "full":
        for ct in cts:
            for n in (10_000, 100_000, 1_000_000, 10_000_000):
                add("size", n, 16, 16, ct)
        for ct in cts:
            for d, K in ((2, 2), (2, 64), (64, 2), (64, 16), (32, 64)):
                add("shape", 100_000, d, K, ct)
    else:
        raise SystemExit(f"unknown grid {name!r}")
    return out


def case_id(c: dict) -> str:
    if "ct" not in c:  # the fixed-cost run on a tiny dataset
        return "tiny"
    return f"{c['ct']}-n{c['n']}-d{c['d']}-K{c['K']}"


def min_flops(n: int, d: int, K: int, ct: str) -> float:
    """Minimum floating-point work of one EM iteration (E-step + statistics), symmetric forms once.

    full: a quadratic form in a = [x - g, 1] per component for the log-densities and the
    K packed moment matrices sum r a a^T: 2 n K P each, P = (d+1)(d+2)/2. (The dense count
    the issue quotes, 2 n K d^2 + 2 n K (d+1)^2, is about twice this.)
    tied: U^T x (n d (d+1)), cross terms 2 n K d, first moments 2 n K (d+1), pooled second
    moment n d (d+1). diag: 4 n K (2d+1). spherical: 4 n K (d+1) + 2 n d.
    """
    if ct == "full":
        return 4.0 * n * K * (d + 1) * (d + 2) / 2
    if ct == "tied":
        return 2.0 * n * d * (d + 1) + 2.0 * n * K * d + 2.0 * n * K * (d + 1)
    if ct == "diag":
        return 4.0 * n * K * (2 * d + 1)
    return 4.0 * n * K * (d + 1) + 2.0 * n * d


def min_bytes(n: int, d: int, itemsize: int = 8) -> float:
    """Minimum memory traffic of one iteration on resident data: reading X once (n d values);
    everything else (per-block features, log-densities) can stay in the caches."""
    return float(n) * d * itemsize


# -- initial parameters and the common evaluator ---------------------------------------------


def start_params(truth: dict, seed: int = 1) -> dict:
    """The true parameters perturbed: means moved by ~0.3 sd, covariances x1.5, equal weights."""
    rng = np.random.default_rng(seed)
    ct = truth["covariance_type"]
    means = np.asarray(truth["means"])
    cov = np.asarray(truth["covariances"]) * 1.5
    K, d = means.shape
    sd = {"full": lambda: np.sqrt(np.einsum("kii->ki", cov)), "tied": lambda: np.sqrt(np.diag(cov))[None],
          "diag": lambda: np.sqrt(cov), "spherical": lambda: np.sqrt(cov)[:, None]}[ct]()
    means = means + 0.3 * sd * rng.standard_normal((K, d))
    return {"weights": np.full(K, 1.0 / K), "means": means, "covariances": cov, "covariance_type": ct}


def precisions(cov: np.ndarray, ct: str) -> np.ndarray:
    return np.linalg.inv(cov) if ct in ("full", "tied") else 1.0 / cov


def mean_loglik(X, p: dict) -> float:
    """Mean log-likelihood per row of parameters ``p`` on the Zarr array ``X`` (float64, chunked)."""
    from emflow.models import gmm as G

    ct = p["covariance_type"]
    cov = np.asarray(p["covariances"], dtype=np.float64)
    params = G.GMMParams(np.asarray(p["weights"]), np.asarray(p["means"]), cov,
                         G.precisions_cholesky_from_covariances(cov, ct), ct)
    total, n = 0.0, X.shape[0]
    step = max(1, (1 << 24) // (8 * max(X.shape[1], len(params.weights))))
    for a in range(0, n, step):
        lse, _ = G.posterior(np.asarray(X[a:a + step], dtype=np.float64), params)
        total += float(lse.sum())
    return total / n


# -- the ceiling -----------------------------------------------------------------------------


def _gemm_rate(dtype: str, threads: int | None, size: int = 2048, repeats: int = 3) -> float:
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((size, size)).astype(dtype)
    b = a.T.copy()
    with threadpool_limits(threads):
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * size**3 / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _gemm_worker(args):
    dtype, barrier_time = args
    while time.time() < barrier_time:
        time.sleep(0.001)
    return _gemm_rate(dtype, 1)


def _read_rate(barrier_time: float, mb: int = 256, repeats: int = 3) -> float:
    """Bytes/s one process reads from memory (``sum`` over an array far larger than the caches)."""
    x = np.ones(mb * 2**20 // 8)
    while time.time() < barrier_time:
        time.sleep(0.001)
    x.sum()
    return x.nbytes / min(_timed(x.sum) for _ in range(repeats))


def ceiling(cores: int) -> dict:
    """GEMM GFLOP/s through NumPy (one process with all threads, one thread, and ``cores``
    1-thread processes at once) and the memory read rate in GB/s of ``cores`` processes at once."""
    import multiprocessing as mp

    out = {}
    for dt in ("float64", "float32"):
        out[f"{dt}_all_threads"] = _gemm_rate(dt, None) / 1e9
        out[f"{dt}_one_thread"] = _gemm_rate(dt, 1) / 1e9
        with mp.get_context("spawn").Pool(cores) as pool:
            rates = pool.map(_gemm_worker, [(dt, time.time() + 2.0)] * cores)
        out[f"{dt}_workers"] = float(sum(rates)) / 1e9
    with mp.get_context("spawn").Pool(cores) as pool:
        out["read_gbs_workers"] = float(sum(pool.map(_read_rate, [time.time() + 2.0] * cores))) / 1e9
    return out


# -- subprocess runners (one system, one case) -----------------------------------------------


def _load_case(case: dict):
    import zarr

    g = zarr.open_group(case["path"], mode="r")
    truth = dict(g.attrs["truth"])
    return g, truth


def _save_result(out: str, res: dict, params: dict | None):
    if params is not None:
        np.savez(out + ".npz", **{k: np.asarray(v) for k, v in params.items() if k != "covariance_type"})
    with open(out + ".json", "w") as f:
        json.dump(res, f)


def run_emflow(case: dict, out: str, variant: str):
    import emflow
    from distributed import Client

    from emflow.execution.cluster import local_cluster

    g, truth = _load_case(case)
    ct, K, N = case["ct"], case["K"], case["iters"] + 1
    st = start_params(truth)
    t0 = time.perf_counter()
    if variant == "emflow-threads":  # in-process thread pool, no cluster (emflow's default without a client)
        cluster = client = None
    else:
        cluster = local_cluster(silence_logs=40)
        client = Client(cluster)
    t_cluster = time.perf_counter() - t0
    first = {}

    def on_iter(ev):
        first.setdefault("t", time.perf_counter())

    gm = emflow.GaussianMixture(
        K, covariance_type=ct, max_iter=N, tol=0.0, reg_covar=0.0, scheduler=client or "threads",
        weights_init=st["weights"], means_init=st["means"], precisions_init=precisions(st["covariances"], ct),
        compute_dtype="float32" if variant == "emflow-f32" else "float64",
        persist=False if variant == "emflow-stream" else "auto",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = time.perf_counter()
        gm.fit(case["path"] + "/X", callbacks=[on_iter])
    secs = gm.fit_info_["seconds_per_iteration"]
    if client is not None:
        blas = client.run(lambda: [i["num_threads"] for i in __import__("threadpoolctl").threadpool_info()])
        client.close()
        cluster.close()
    else:
        blas = {"threads": [i["num_threads"] for i in __import__("threadpoolctl").threadpool_info()]}
    res = {
        "sec_per_iter": float(np.median(secs)), "sec_iters": secs, "first_iteration_s": first["t"] - t1,
        "cluster_start_s": t_cluster, "partitions": gm.fit_info_["partitions"], "resident": gm.fit_info_["resident"],
        "workers": len(blas), "blas_threads_per_worker": sorted({t for v in blas.values() for t in v}),
        "own_loglik": gm.history_[-1],
    }
    _save_result(out, res, {"weights": gm.weights_, "means": gm.means_, "covariances": gm.covariances_})


def run_sklearn(case: dict, out: str):
    from sklearn.mixture import GaussianMixture as SK
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    g, truth = _load_case(case)
    X = np.asarray(g["X"][:], dtype=np.float64)
    ct, K, N = case["ct"], case["K"], case["iters"] + 1
    st = start_params(truth)
    t0 = time.perf_counter()
    m = SK(K, covariance_type=ct, reg_covar=0.0, max_iter=N, tol=0.0)
    m._check_parameters(X) if hasattr(m, "_check_parameters") else None
    m.weights_, m.means_, m.covariances_ = st["weights"], st["means"], st["covariances"]
    m.precisions_cholesky_ = _compute_precision_cholesky(st["covariances"], ct)
    secs, lls = [], []
    first = None
    for _ in range(N):
        t = time.perf_counter()
        log_prob_norm, log_resp = m._e_step(X)
        m._m_step(X, log_resp)
        secs.append(time.perf_counter() - t)
        first = first or time.perf_counter() - t0
        lls.append(float(log_prob_norm))
    res = {"sec_per_iter": float(np.median(secs)), "sec_iters": secs, "first_iteration_s": first,
           "own_loglik": lls[-1]}
    _save_result(out, res, {"weights": m.weights_, "means": m.means_, "covariances": m.covariances_})


def run_spark(case: dict, out: str):
    from pyspark import SparkConf, SparkContext
    from pyspark.mllib.clustering import GaussianMixtureModel
    from pyspark.mllib.common import _py2java, callMLlibFunc
    from pyspark.mllib.linalg import DenseMatrix, DenseVector

    g, truth = _load_case(case)
    K, d, N, n = case["K"], case["d"], case["iters"] + 1, case["n"]
    st = start_params(truth)
    t0 = time.perf_counter()
    conf = (SparkConf().setMaster("local[*]").setAppName("emflow-bench")
            .set("spark.driver.memory", case.get("spark_memory", "4g")).set("spark.ui.enabled", "false")
            .set("spark.default.parallelism", str(2 * os.cpu_count())))
    sc = SparkContext(conf=conf)
    sc.setLogLevel("ERROR")
    t_start = time.perf_counter() - t0
    parts = max(2 * os.cpu_count(), n * d * 8 // (32 << 20))
    raw = sc.binaryRecords(case["raw"], 8 * d).map(lambda b: DenseVector(np.frombuffer(b, dtype="<f8")))
    jrdd = _py2java(sc, raw.repartition(parts) if parts > 2 else raw).cache()
    assert jrdd.count() == n
    t_load = time.perf_counter() - t0 - t_start
    weights = [float(w) for w in st["weights"]]
    mus = [DenseVector(m) for m in st["means"]]
    sigmas = [DenseMatrix(d, d, np.asarray(c).T.ravel().tolist()) for c in st["covariances"]]

    def train(iters):
        t = time.perf_counter()
        jm = callMLlibFunc("trainGaussianMixtureModel", jrdd, K, 0.0, iters, 1, weights, mus, sigmas)
        return time.perf_counter() - t, GaussianMixtureModel(jm)

    train(1)  # warm-up: JIT and the first materialisation are not an iteration's cost
    t1, _ = train(1)
    tN, model = train(N)
    secs = (tN - t1) / (N - 1)
    res = {"sec_per_iter": secs, "sec_iters": [t1, tN], "first_iteration_s": t_start + t_load + t1,
           "spark_start_s": t_start, "spark_load_s": t_load, "partitions": parts}
    params = {"weights": np.array(model.weights), "means": np.array([gs.mu.toArray() for gs in model.gaussians]),
              "covariances": np.array([gs.sigma.toArray() for gs in model.gaussians])}
    sc.stop()
    _save_result(out, res, params)


def run_tiny(system: str, out: str, iters: int):
    """Per-iteration overhead on a tiny dataset (1000 rows, d=2, K=2, full), in memory."""
    X = np.random.default_rng(0).normal(size=(1000, 2))
    X[:500] += 4
    init = dict(weights_init=[0.5, 0.5], means_init=[[0.5, 0.5], [3.5, 3.5]],
                precisions_init=np.stack([np.eye(2)] * 2))
    if system == "emflow":
        import emflow
        from distributed import Client

        from emflow.execution.cluster import local_cluster

        t0 = time.perf_counter()
        with local_cluster(silence_logs=40) as cluster, Client(cluster) as client:
            t_cluster = time.perf_counter() - t0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t1 = time.perf_counter()
                first = {}
                gm = emflow.GaussianMixture(2, max_iter=iters, tol=0.0, scheduler=client, **init)
                gm.fit(X, callbacks=[lambda ev: first.setdefault("t", time.perf_counter())])
        secs = gm.fit_info_["seconds_per_iteration"]
        res = {"sec_per_iter": float(np.median(secs)), "first_iteration_s": first["t"] - t1, "cluster_start_s": t_cluster}
    elif system == "sklearn":
        from sklearn.mixture import GaussianMixture as SK

        secs = []
        for _ in range(3):
            m = SK(2, max_iter=1, tol=0.0, warm_start=True, **init)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.fit(X)
            secs.append(time.perf_counter() - t)
        res = {"sec_per_iter": float(np.median(secs)), "note": "one fit(max_iter=1) call"}
    else:
        res = {"sec_per_iter": None}
    _save_result(out, res, None)


# -- orchestration -----------------------------------------------------------------------------


class TreeMemory:
    """Peak resident memory (bytes) of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.05):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def run_system(system: str, case: dict, tmp: str, timeout: float) -> dict:
    out = os.path.join(tmp, f"{system}-{case_id(case)}-{time.time_ns()}")
    cmd = [sys.executable, os.path.abspath(__file__), "_run", system, json.dumps(case), out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        for c in _children(proc.pid):
            c.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "peak_mb": mem.stop() / 2**20}
    peak = mem.stop()
    if proc.returncode != 0 or not os.path.exists(out + ".json"):
        return {"error": (log or "").strip().splitlines()[-1:] or ["failed"], "log": log[-3000:], "peak_mb": peak / 2**20}
    with open(out + ".json") as f:
        res = json.load(f)
    res["peak_mb"] = peak / 2**20
    if os.path.exists(out + ".npz"):
        z = np.load(out + ".npz")
        res["params"] = {k: z[k] for k in z.files}
    return res


def _children(pid):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def spark_available() -> str | None:
    """None when pyspark and a Java runtime are usable, else why not."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install 'emflow[bench]')"
    java = shutil.which("java") or (os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else None)
    if not java:
        return "no Java runtime (java) on PATH; Spark 4 needs Java 17 or 21"
    return None


def java_version() -> str:
    try:
        r = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        return (r.stderr or r.stdout).splitlines()[0]
    except Exception as exc:  # pragma: no cover
        return f"unavailable ({exc})"


def prepare_case(case: dict, datadir: str, need_raw: bool) -> dict:
    from emflow.storage.synthetic.gmm import write_gmm

    path = os.path.join(datadir, case_id(case) + ".zarr")
    if not os.path.exists(path):
        write_gmm(path, case["n"], case["K"], case["d"], case["ct"], seed=7)
    case = dict(case, path=path)
    if need_raw:
        import zarr

        raw = path + ".f64"
        if not os.path.exists(raw):
            X = zarr.open_group(path, mode="r")["X"]
            with open(raw, "wb") as f:
                step = max(1, (1 << 24) // (8 * case["d"]))
                for a in range(0, case["n"], step):
                    np.asarray(X[a:a + step], dtype="<f8").tofile(f)
        case["raw"] = raw
    return case


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="quick", choices=["quick", "target", "types", "sizes", "scale", "full", "tiny"])
    ap.add_argument("--systems", default="emflow,emflow-f32,sklearn,spark",
                    help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations (each system runs iters + 1)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every case this many times, systems interleaved")
    ap.add_argument("--spark-max-rows", type=int, default=2_000_000, help="skip Spark above this many rows")
    ap.add_argument("--spark-memory", default="4g")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per system and case")
    ap.add_argument("--datadir", default=None, help="where the Zarr data go (default: a temporary folder)")
    ap.add_argument("--out", default=HERE, help="folder for RESULTS.md, results.json, throughput.png")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--no-tiny", action="store_true", help="skip the fixed-cost runs on a tiny dataset")
    args = ap.parse_args(argv)

    systems = [s for s in args.systems.split(",") if s]
    bad = set(systems) - set(SYSTEMS)
    if bad:
        raise SystemExit(f"unknown systems {sorted(bad)}; choose from {SYSTEMS}")
    spark_why = spark_available() if "spark" in systems else None
    cores = os.cpu_count() or 1
    meta = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_gmm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores, "
                   f"{_mem_gb():.0f} GiB RAM, {platform.system()} {platform.release()}",
        "cpu": _cpu_model(), "load_start": os.getloadavg(), "versions": _versions(),
        "java": java_version() if "spark" in systems else None, "spark_unavailable": spark_why,
        "iters": args.iters, "rounds": args.rounds, "grid": args.grid,
    }
    print(f"load average {meta['load_start']}", flush=True)
    meta["ceiling"] = None if args.no_ceiling else ceiling(cores)
    if meta["ceiling"]:
        print("ceiling GFLOP/s", {k: round(v, 1) for k, v in meta["ceiling"].items()}, flush=True)

    tmp = tempfile.mkdtemp(prefix="emflow-bench-")
    datadir = args.datadir or os.path.join(tmp, "data")
    os.makedirs(datadir, exist_ok=True)
    rows = []
    try:
        cases = grid(args.grid)
        for case in cases:
            case = dict(case, iters=args.iters, spark_memory=args.spark_memory)
            use_spark = "spark" in systems and spark_why is None and case["ct"] == "full" and case["n"] <= args.spark_max_rows
            t = time.perf_counter()
            case = prepare_case(case, datadir, need_raw=use_spark)
            print(f"\n== {case_id(case)} (data {time.perf_counter() - t:.1f} s), load {os.getloadavg()[0]:.2f}", flush=True)
            import zarr

            X = zarr.open_group(case["path"], mode="r")["X"]
            results = {s: [] for s in systems}
            for r in range(args.rounds):
                order = systems if r % 2 == 0 else systems[::-1]  # interleave
                for s in order:
                    if s == "spark" and not use_spark:
                        continue
                    res = run_system(s, case, tmp, args.timeout)
                    if "params" in res:
                        p = dict(res.pop("params"), covariance_type=case["ct"])
                        res["loglik"] = mean_loglik(X, p)
                    res["load"] = os.getloadavg()[0]
                    results[s].append(res)
                    print(f"  {s:14s} {_fmt_res(res)}", flush=True)
            for s in systems:
                why = None
                if s == "spark" and not use_spark:
                    why = (spark_why or ("n/a: Spark MLlib has only full covariances" if case["ct"] != "full"
                                         else f"skipped: more than --spark-max-rows={args.spark_max_rows} rows"))
                rows.append(_summarise(case, s, results[s], why, meta["ceiling"], cores))
        tiny = {}
        if not args.no_tiny and args.grid != "tiny":
            for s in ("emflow", "sklearn"):
                if s in systems:
                    tiny[s] = run_system("_tiny_" + s, {"iters": 10}, tmp, 600)
                    print(f"  tiny {s}: {tiny[s]}", flush=True)
        meta["load_end"] = os.getloadavg()
        meta["tiny"] = tiny
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=float)
    md = render_markdown(meta, rows)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(md)
    plot(rows, os.path.join(args.out, "throughput.png"))
    print("\n" + md)
    return rows


def _fmt_res(res: dict) -> str:
    if "error" in res:
        return f"ERROR {res['error']}"
    return (f"{res['sec_per_iter']:.4f} s/iter, peak {res['peak_mb']:.0f} MB, loglik {res.get('loglik', float('nan')):.10f}, "
            f"first iteration after {res.get('first_iteration_s') or float('nan'):.2f} s")


def _summarise(case, system, results, why, ceil, cores) -> dict:
    row = {k: case[k] for k in ("sweep", "n", "d", "K", "ct")}
    row["system"] = system
    ok = [r for r in results if "error" not in r]
    if why or not ok:
        row["status"] = why or ("error: " + str(results[0].get("error")) if results else "not run")
        return row
    sec = float(np.median([r["sec_per_iter"] for r in ok]))
    flops = min_flops(case["n"], case["d"], case["K"], case["ct"])
    rate = flops / sec / 1e9
    key = "float32" if system == "emflow-f32" else "float64"
    ref = None
    if ceil:
        ref = ceil[f"{key}_workers"] if system.startswith("emflow") else ceil[f"{key}_all_threads"]
    row.update(
        status="ok", sec_per_iter=sec, rows_per_s=case["n"] / sec, gflops=rate,
        ceiling_fraction=(rate / ref if ref else None), peak_mb=float(max(r["peak_mb"] for r in ok)),
        loglik=float(np.median([r["loglik"] for r in ok])), first_iteration_s=float(np.median([r["first_iteration_s"] for r in ok])),
        load=float(np.median([r["load"] for r in ok])), runs=len(ok),
        sec_runs=[r.get("sec_per_iter") for r in results], loads=[r.get("load") for r in results],
        extra={k: v for k, v in ok[0].items() if k in ("partitions", "resident", "workers", "blas_threads_per_worker",
                                                        "cluster_start_s", "spark_start_s", "spark_load_s")},
    )
    return row


def _compare(rows):
    """Per case: emflow's speed ratio to each peer and each system's log-likelihood difference to emflow."""
    by = {}
    for r in rows:
        by.setdefault((r["ct"], r["n"], r["d"], r["K"]), {})[r["system"]] = r
    for group in by.values():
        em = group.get("emflow")
        for s, r in group.items():
            if r["status"] != "ok" or not em or em["status"] != "ok":
                continue
            r["ll_rel_diff"] = abs(r["loglik"] - em["loglik"]) / abs(em["loglik"])
            # with several rounds: the median of the ratios within each round (interleaved pairs,
            # which share the machine's load), else the ratio of the medians
            pairs = [(e, x) for e, x in zip(em.get("sec_runs", []), r.get("sec_runs", [])) if e and x]
            if len(pairs) < 2:
                pairs = [(em["sec_per_iter"], r["sec_per_iter"])]
            ratios = [e / x if s == "emflow-f32" else x / e for e, x in pairs]
            r["emflow_speedup"] = float(np.median(ratios))
            r["speedup_pairs"] = ratios
    return by


def render_markdown(meta, rows) -> str:
    by = _compare(rows)
    L = []
    L.append("# Gaussian mixtures: emflow vs scikit-learn vs Spark MLlib\n")
    L.append(f"Generated by `{meta['command']}` on {meta['started']}.  ")
    L.append(f"Machine: {meta['cpu']} ({meta['machine']}).  ")
    L.append(f"Load average (1/5/15 min) at start {_la(meta['load_start'])}, at end {_la(meta.get('load_end'))}.  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + (f", {meta['java']}" if meta.get("java") else "") + ".  ")
    L.append(f"{meta['iters']} timed iterations per run (each system runs {meta['iters'] + 1}); "
             f"{meta['rounds']} round(s), systems interleaved; `reg_covar=0` everywhere.\n")
    if meta.get("spark_unavailable"):
        L.append(f"**Spark did not run:** {meta['spark_unavailable']}\n")
    c = meta.get("ceiling")
    if c:
        L.append("## The machine's ceiling (GEMM through NumPy, 2048^3)\n")
        L.append("| | float64 GFLOP/s | float32 GFLOP/s |\n| --- | --- | --- |")
        L.append(f"| one process, all BLAS threads (scikit-learn, Spark's ceiling) | {c['float64_all_threads']:.1f} | {c['float32_all_threads']:.1f} |")
        L.append(f"| one thread | {c['float64_one_thread']:.1f} | {c['float32_one_thread']:.1f} |")
        L.append(f"| one single-threaded process per core, at once (emflow's workers) | {c['float64_workers']:.1f} | {c['float32_workers']:.1f} |\n")
        if c.get("read_gbs_workers"):
            L.append(f"Memory read rate, one process per core at once: {c['read_gbs_workers']:.1f} GB/s.\n")
    L.append("## Results\n")
    L.append("Rows/s is per iteration. GFLOP/s counts the minimum work of an iteration (symmetric forms "
             "once: full `2nK(d+1)(d+2)`, see `min_flops`); '% ceiling' divides it by the GEMM rate of "
             "the configuration the system runs in. 'emflow x' is how many times faster emflow (float64) "
             "is than that system (for emflow-f32: how much faster float32 is than float64). "
             "'LL' is the mean log-likelihood per row of each system's final parameters, scored by one "
             "float64 evaluator; 'ΔLL' its relative difference to emflow's.\n")
    L.append("| cov | rows | d | K | system | s/iter | rows/s | GFLOP/s | % ceiling | peak MB | emflow x | LL | ΔLL | load |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (ct, n, d, K), group in by.items():
        for s in SYSTEMS:
            r = group.get(s)
            if r is None:
                continue
            if r["status"] != "ok":
                L.append(f"| {ct} | {n:,} | {d} | {K} | {s} | {r['status']} | | | | | | | | |")
                continue
            frac = f"{100 * r['ceiling_fraction']:.0f}%" if r.get("ceiling_fraction") else ""
            sp = r.get("emflow_speedup")
            sp = "" if s == "emflow" or sp is None else f"{sp:.1f}x"
            dll = r.get("ll_rel_diff")
            dll = "" if s == "emflow" or dll is None else f"{dll:.1e}"
            L.append(f"| {ct} | {n:,} | {d} | {K} | {s} | {r['sec_per_iter']:.4g} | {r['rows_per_s']:.3g} | {r['gflops']:.2f} | "
                     f"{frac} | {r['peak_mb']:.0f} | {sp} | {r['loglik']:.8f} | {dll} | {r['load']:.1f} |")
    L.append("")
    L.append("## Targets\n")
    L.extend(_targets(by, meta))
    L.append("\n## Fixed costs\n")
    L.extend(_fixed(by, meta))
    L.append("\n## Method\n")
    L.append("How each system is timed, and what is counted, is written at the top of "
             "`benchmarks/bench_gmm.py`.")
    return "\n".join(L) + "\n"


def _targets(by, meta):
    out = []
    t = by.get(("full", 1_000_000, 16, 16))
    if t and t.get("emflow", {}).get("status") == "ok":
        em = t["emflow"]
        for peer, goal in (("sklearn", 15.0), ("spark", 3.0)):
            r = t.get(peer)
            if r and r["status"] == "ok":
                x = r["emflow_speedup"]
                out.append(f"- full, 1e6 x 16, K=16: emflow {em['rows_per_s']:.3g} rows/s vs {peer} {r['rows_per_s']:.3g}: "
                           f"**{x:.1f}x** (target {goal:.0f}x: {'met' if x >= goal else 'MISSED'}){_pairs_note(r)}.")
            else:
                out.append(f"- full, 1e6 x 16, K=16 vs {peer}: not measured ({r['status'] if r else 'not run'}).")
        if em.get("ceiling_fraction"):
            out.append(f"- full, 1e6 x 16, K=16: emflow at {100 * em['ceiling_fraction']:.0f}% of the GEMM ceiling "
                       f"measured in this run (target 30%: {'met' if em['ceiling_fraction'] >= 0.3 else 'MISSED'}).")
    else:
        out.append("- The target case (full, 1e6 rows, d=16, K=16) is not in this grid: run `--grid target`.")
    for ct in ("tied", "diag", "spherical"):
        g = by.get((ct, 1_000_000, 16, 16), {})
        r = g.get("sklearn")
        if g.get("emflow", {}).get("status") == "ok" and r and r.get("status") == "ok":
            x = r["emflow_speedup"]
            out.append(f"- {ct}, 1e6 x 16, K=16 vs sklearn: **{x:.1f}x** (target 5x: {'met' if x >= 5 else 'MISSED'})"
                       f"{_pairs_note(r)}.")
    out.extend(_limits(by, meta))
    f32 = [(k, g["emflow-f32"]) for k, g in by.items() if g.get("emflow-f32", {}).get("status") == "ok"]
    if f32:
        worst_ll = max(r["ll_rel_diff"] for _, r in f32)
        sp = [r["emflow_speedup"] for _, r in f32]
        big = [r["emflow_speedup"] for k, r in f32 if k[1] >= 100_000]
        out.append(f"- float32 compute: log-likelihood within {worst_ll:.1e} relative of float64 (target 1e-5: "
                   f"{'met' if worst_ll <= 1e-5 else 'MISSED'}); speed-up {min(sp):.2f}x to {max(sp):.2f}x, "
                   f"median {np.median(big if big else sp):.2f}x at >= 100k rows (target 1.5x).")
    losses = []
    for (ct, n, d, K), g in by.items():
        em = g.get("emflow")
        for peer in PEERS:
            r = g.get(peer)
            if em and r and em["status"] == r["status"] == "ok" and r["emflow_speedup"] < 1.0:
                losses.append(f"{ct} n={n:,} d={d} K={K} vs {peer} ({r['emflow_speedup']:.2f}x)")
    out.append("- emflow faster than every peer in every case measured: " + ("yes." if not losses else "NO: " + "; ".join(losses) + "."))
    agree = [(k, s, r["ll_rel_diff"]) for k, g in by.items() for s, r in g.items()
             if s in PEERS and r["status"] == "ok" and "ll_rel_diff" in r]
    if agree:
        worst = max(agree, key=lambda a: a[2])
        out.append(f"- Final log-likelihoods: largest relative difference to emflow {worst[2]:.1e} "
                   f"({worst[1]}, {worst[0][0]} n={worst[0][1]:,}).")
        sk = [a for a in agree if a[1] == "sklearn"]
        if sk:
            out.append(f"  scikit-learn vs emflow: at most {max(a[2] for a in sk):.1e} (same algorithm).")
        bad = [a for a in agree if a[1] == "spark" and a[2] > 1e-6]
        if bad:
            out.append("  Spark MLlib differs where it does not compute exact EM: it takes responsibilities from "
                       "`weight * pdf(x) + EPSILON` in probability space (not log space), so every row whose "
                       "density is below ~1e-16 (common at d=16) gets uniform responsibilities 1/K, which "
                       "drags all components. Its final model therefore scores lower than the exact-EM one "
                       "that emflow and scikit-learn agree on; with d=3 (the tiny grid) all three agree to 1e-14.")
    return out


def _pairs_note(r) -> str:
    p = r.get("speedup_pairs") or []
    if len(p) < 2:
        return ""
    return f", median of {len(p)} interleaved pairs, range {min(p):.1f}x-{max(p):.1f}x"


def _limits(by, meta) -> list[str]:
    """How far each emflow float64 run is from the GEMM limit and the memory-read limit."""
    c = meta.get("ceiling") or {}
    if not c.get("float64_workers"):
        return []
    out = []
    for (ct, n, d, K), g in by.items():
        em = g.get("emflow")
        if not em or em["status"] != "ok" or n < 100_000:
            continue
        t_gemm = min_flops(n, d, K, ct) / (c["float64_workers"] * 1e9)
        line = (f"- {ct} n={n:,} d={d} K={K}: minimum work {min_flops(n, d, K, ct) / 1e9:.2f} GFLOP "
                f"({t_gemm:.4f} s at the workers' GEMM rate), minimum traffic {min_bytes(n, d) / 1e6:.0f} MB")
        if c.get("read_gbs_workers"):
            t_mem = min_bytes(n, d) / (c["read_gbs_workers"] * 1e9)
            line += f" ({t_mem:.4f} s at the read rate)"
        line += (f"; measured {em['sec_per_iter']:.4f} s/iter: {100 * t_gemm / em['sec_per_iter']:.0f}% of the GEMM limit"
                 + (f", {100 * t_mem / em['sec_per_iter']:.0f}% of the memory limit" if c.get("read_gbs_workers") else "") + ".")
        out.append(line)
    return out


def _fixed(by, meta):
    out = []
    for k, g in by.items():
        em = g.get("emflow")
        if em and em["status"] == "ok":
            ex = em.get("extra", {})
            out.append(f"- {k[0]} n={k[1]:,} d={k[2]} K={k[3]}: emflow's first iteration result {em['first_iteration_s']:.2f} s "
                       f"after `fit()` (open, scan/fingerprint, load into {ex.get('workers')} workers, first E+M); "
                       f"LocalCluster start {ex.get('cluster_start_s', float('nan')):.1f} s; "
                       + "; ".join(f"{s} first iteration after {g[s]['first_iteration_s']:.2f} s"
                                   for s in PEERS if g.get(s, {}).get("status") == "ok"))
    tiny = meta.get("tiny") or {}
    for s, r in tiny.items():
        if "error" not in r:
            out.append(f"- Tiny data (1,000 x 2, K=2): {s} {r['sec_per_iter'] * 1e3:.1f} ms per iteration"
                       + (f"; first iteration {r['first_iteration_s']:.2f} s after fit(), cluster start {r['cluster_start_s']:.1f} s"
                          if s == "emflow" else "") + ".")
    return out


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'emflow[bench]')")
        return
    size = [r for r in rows if r["sweep"] == "size" and r["status"] == "ok"]
    cts = [c for c in ("full", "tied", "diag", "spherical") if any(r["ct"] == c for r in size)]
    if not cts:
        return
    fig, axes = plt.subplots(1, len(cts), figsize=(4.2 * len(cts), 3.8), squeeze=False)
    color = {s: f"C{i}" for i, s in enumerate(SYSTEMS)}  # one colour per system in every panel
    handles = {}
    for ax, ct in zip(axes[0], cts):
        for s in SYSTEMS:
            pts = sorted((r["n"], r["rows_per_s"]) for r in size if r["ct"] == ct and r["system"] == s)
            if pts:
                (handles[s],) = ax.plot(*zip(*pts), marker="o", label=s, color=color[s])
        sub = [r for r in size if r["ct"] == ct]
        ax.set(xscale="log", yscale="log", xlabel="rows", title=f"{ct} (d={sub[0]['d']}, K={sub[0]['K']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("rows per second per iteration")
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _la(v):
    return "n/a" if not v else " / ".join(f"{x:.2f}" for x in v)


def _mem_gb():
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:  # pragma: no cover
        return float("nan")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions():
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("emflow", "numpy", "scikit-learn", "dask", "distributed", "zarr", "pyspark"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        if rev:
            out["emflow"] = out.get("emflow", "?") + f" ({rev})"
    except OSError:
        pass
    from threadpoolctl import threadpool_info

    out["BLAS"] = ", ".join(f"{i['internal_api']} {i.get('version', '')} {i.get('architecture', '')}".strip() for i in threadpool_info())
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        system, case, out = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
        if system.startswith("_tiny_"):
            run_tiny(system[len("_tiny_"):], out, case["iters"])
        elif system.startswith("emflow"):
            run_emflow(case, out, system)
        elif system == "sklearn":
            run_sklearn(case, out)
        elif system == "spark":
            run_spark(case, out)
        else:
            raise SystemExit(f"unknown system {system}")
    else:
        main()
