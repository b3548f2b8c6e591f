"""One Gaussian HMM sequence far longer than a partition, fitted streaming from Zarr (issue 17).

The sequence is written to Zarr block by block (never whole in memory), then fitted by a
Dask LocalCluster of ``--workers`` single-threaded workers with a memory limit, streaming
(``persist=False``): each EM iteration is a forward and a backward sweep of boundary
messages along the slices (chains of tasks) and one parallel pass of statistics. Prints
seconds per iteration, the peak resident memory of any worker (sampled every 0.2 s) and
the load average beside them (the machine may be shared: say so next to any figure).

    python benchmarks/bench_long_sequence.py --steps 10000000 --features 4 --states 4 --iters 3

``--span 2,64`` instead measures, in this process on one core, the work of one slice of
``steps / P`` steps for each P (forward step, backward step, transfer elements, the slice's
statistics) and prints the span of one iteration on P workers: the chain waits for P
sweep steps one after the other, the parallel form for one transfer (simulated: the
figures are one slice's times, not a cluster's).

``--check`` also fits the same data in memory as one partition (single-sequence path) and
prints the largest relative difference of the log-likelihood history and the means
(needs the sequence in memory: use it at 1e6 steps or so).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
import warnings

import numpy as np


def sticky_states(n: int, K: int, stay: float, rng: np.random.Generator) -> np.ndarray:
    """A state path of a chain that stays with probability ``stay`` and otherwise jumps to
    another state uniformly (run lengths are geometric: one draw per run)."""
    out = np.empty(n, dtype=np.int64)
    t, s = 0, int(rng.integers(K))
    while t < n:
        run = int(rng.geometric(1 - stay))
        out[t : t + run] = s
        t += run
        s = (s + 1 + int(rng.integers(K - 1))) % K
    return out


def write_long(path: str, n: int, K: int, d: int, block: int, chunk: int, seed: int = 0):
    """Write one sequence of ``n`` steps to a Zarr sequences group, ``block`` steps at a time."""
    import zarr

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, d)) * 3
    g = zarr.open_group(path, mode="w")
    every = {"config": {"write_empty_chunks": True}, "attributes": {"all_chunks_written": True}}
    values = g.create_array("values", shape=(n, d), dtype="float64", chunks=(chunk, d), **every)
    g.create_array("offsets", data=np.array([0, n], dtype=np.int64), chunks=(2,), **every)
    g.attrs.update({"kind": "sequences", "n_sequences": 1, "total_steps": n, "n_features": d, "dtype": "float64"})
    for a in range(0, n, block):
        m = min(block, n - a)
        z = sticky_states(m, K, 0.95, rng)
        values[a : a + m] = means[z] + rng.normal(size=(m, d))
    return means


class PeakRSS:
    """The largest resident memory of any worker process while the block runs."""

    def __init__(self, client, every: float = 0.2):
        self.client, self.every, self.peak, self._stop = client, every, 0, threading.Event()

    def _poll(self):
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                self.peak = max(self.peak, *rss.values())
            except Exception:
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def span(args):
    from emflow.models import hmm as H
    from emflow.models import hmm_long as HL
    from emflow.models.hmm_emissions import emission_for

    n, K, d = int(args.steps), args.states, args.features
    rng = np.random.default_rng(0)
    means = rng.normal(size=(K, d)) * 3
    tm = np.full((K, K), 0.1 / (K - 1)) + np.eye(K) * (0.9 - 0.1 / (K - 1))
    p = H.GaussianHMMParams(np.full(K, 1.0 / K), tm, means + rng.normal(size=(K, d)), np.full((K, d), 2.0), "diag")
    em = emission_for(p)
    print(f"span of one iteration, one sequence of {n} steps x {d} features, K={K} diag (one core, `uptime`: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()})\n")
    print("| slices P | steps/slice | forward step s | backward step s | transfer s | statistics s | chain span s | parallel span s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for P in (int(x) for x in args.span.split(",")):
        m = n // P
        z = sticky_states(m, K, 0.95, rng)
        X = means[z] + rng.normal(size=(m, d))

        def timed(f):
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            return float(np.median(ts))

        f_in = HL.forward_message(X, p, em, None)
        b_in = HL.backward_message(X, p, em, None)
        tf = timed(lambda: HL.forward_message(X, p, em, f_in))
        tb = timed(lambda: HL.backward_message(X, p, em, b_in))
        tt = timed(lambda: HL.transfer(X, p, em, False, False))
        te = timed(lambda: HL.slice_e_step(X, p, em, (f_in, f_in, b_in)))
        print(f"| {P} | {m} | {tf:.3f} | {tb:.3f} | {tt:.3f} | {te:.3f} | {P * max(tf, tb) + te:.2f} | {tt + te:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=float, default=1e7)
    ap.add_argument("--features", type=int, default=4)
    ap.add_argument("--states", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="1GiB", help="per worker")
    ap.add_argument("--partition-mib", type=float, default=32)
    ap.add_argument("--chunk-steps", type=int, default=1 << 18)
    ap.add_argument("--path", default=None, help="Zarr path (default: a temporary directory)")
    ap.add_argument("--sweep-form", choices=("chain", "scan"), default="chain",
                    help="the Dask config key emflow.sweep-form: the two-sweep chain or the parallel form")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--span", default=None, help="comma-separated numbers of slices, e.g. 2,64")
    args = ap.parse_args(argv)
    if args.span:
        return span(args)

    import dask
    from distributed import Client, LocalCluster

    from emflow.estimators.hmm import GaussianHMM

    n, K, d = int(args.steps), args.states, args.features
    tmp = tempfile.mkdtemp(prefix="emflow-long-")
    path = args.path or os.path.join(tmp, "long.zarr")
    t0 = time.perf_counter()
    means = write_long(path, n, K, d, block=1 << 20, chunk=args.chunk_steps)
    t_write = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    start = dict(startprob_=np.full(K, 1.0 / K), transmat_=np.full((K, K), 0.1 / (K - 1)) + np.eye(K) * (0.9 - 0.1 / (K - 1)),
                 means_=means + rng.normal(size=(K, d)), covars_=np.full((K, d), 2.0))
    kw = dict(covariance_type="diag", init_params="", n_iter=args.iters, tol=0)
    seconds: list[float] = []
    load_before = os.getloadavg()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, memory_limit=args.memory_limit,
                      dashboard_address=":0", silence_logs=40) as cluster, Client(cluster) as client:
        m = GaussianHMM(K, scheduler=client, persist=False, partition_bytes=int(args.partition_mib * 2**20), **kw)
        for k, v in start.items():
            setattr(m, k, v.copy())
        with warnings.catch_warnings(), dask.config.set({"emflow.sweep-form": args.sweep_form}), \
                PeakRSS(client) as peak:
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            m.fit(path, callbacks=[lambda ev: seconds.append(ev.seconds)])
            t_fit = time.perf_counter() - t0
    load_after = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    nbytes = n * d * 8
    print(f"one sequence of {n} steps x {d} features (float64, {nbytes / 2**30:.2f} GiB), K={K}, diag; "
          f"{m.fit_info_['partitions']} slices of <= {args.partition_mib:g} MiB; {args.workers} workers x 1 thread, "
          f"memory limit {args.memory_limit} each; streamed from Zarr (persist=False); sweep form {args.sweep_form}\n")
    print("| s/iteration (median) | s/iteration (all) | fit s (incl. open + scan) | peak worker RSS | write s | load avg before -> after |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {np.median(seconds):.2f} | {', '.join(f'{s:.2f}' for s in seconds)} | {t_fit:.1f} | "
          f"{peak.peak / 2**20:.0f} MiB | {t_write:.1f} | {load_before[0]:.2f} -> {load_after[0]:.2f} |")
    print(f"\n`uptime`: {uptime}")
    print(f"log-likelihood history: {m.monitor_.history}")
    if args.check:
        import zarr

        X = zarr.open_group(path, mode="r")["values"][:]
        one = GaussianHMM(K, scheduler="threads", partition_bytes=max(1024, X.nbytes + 1), **kw)
        for k, v in start.items():
            setattr(one, k, v.copy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one.fit(X)
        h, h1 = np.array(m.monitor_.history), np.array(one.monitor_.history)
        print(f"in memory, one partition: max rel. diff of log-lik history {np.max(np.abs(h - h1) / np.abs(h1)):.1e}, "
              f"of means {np.max(np.abs(m.means_ - one.means_) / np.abs(one.means_)):.1e}")


if __name__ == "__main__":
    main()
