"""One pass of online (stepwise) EM against the batch EM optimum: GMM on stored data.

Writes a Gaussian-mixture dataset to Zarr (``write_gmm``: rows drawn independently, so
storage order is a random order), fits batch EM to convergence and online EM for one
(or more) pass(es) in mini-batches, both from the same k-means start (``random_state``),
and prints for each online setting the relative gap of the mean log-likelihood on the
whole data to the batch optimum's, and the time of an online pass against one batch EM
iteration: wall (median of the iterations; the sum of the batches' times per pass) and CPU
seconds of this process (all its threads). Initialisation is not counted in either. The machine's load
(``uptime``) is printed beside the figures: on shared cores they are noisy.

    python benchmarks/bench_online.py --rows 1000000 --features 16 --components 16 --separation 1.5

(the issue asks for 1e7 rows; ``--rows 10000000`` runs that size: 1.3 GB of float64.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import emflow
from emflow.storage.synthetic.gmm import write_gmm


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--components", type=int, default=16)
    ap.add_argument("--separation", type=float, default=1.5, help="write_gmm's: smaller overlaps more")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--passes", type=int, nargs="+", default=[1])
    ap.add_argument("--tol", type=float, default=1e-7, help="batch EM's tol (mean log-likelihood)")
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    K = args.components
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = write_gmm(os.path.join(tmp, "gmm.zarr"), args.rows, K, args.features, separation=args.separation,
                         seed=0)
        print(f"data: {args.rows} rows, {args.features} features, K={K} full covariance, separation "
              f"{args.separation}; {load()}", flush=True)
        # CPU seconds (all threads of this process), from the callbacks' clock: less at the
        # mercy of the other load on shared cores than wall time
        ticks: list[float] = []
        t0 = time.perf_counter()
        batch = emflow.GaussianMixture(K, tol=args.tol, max_iter=args.max_iter, random_state=0,
                                       scheduler=args.scheduler).fit(path, callbacks=[lambda ev: ticks.append(time.process_time())])
        wall = time.perf_counter() - t0
        cpu_it = statistics.median(b - a for a, b in zip(ticks, ticks[1:]))
        best = batch.score(path)
        it = statistics.median(batch.fit_info_["seconds_per_iteration"])
        print(f"batch EM: {batch.n_iter_} iterations to tol={args.tol} (converged {batch.converged_}), "
              f"mean log-likelihood {best:.10g}, one iteration {it:.3f} s wall (median), {cpu_it:.3f} s CPU "
              f"(median), fit {wall:.1f} s; {load()}", flush=True)
        print("| batch_size | passes | polyak | relative gap to batch optimum | wall s per online pass | "
              "wall s per batch iteration | CPU s per online pass | CPU s per batch iteration | load |")
        print("|---|---|---|---|---|---|---|---|---|")
        for bs in args.batch_sizes:
            for passes in args.passes:
                for polyak in (False, True):
                    m = emflow.GaussianMixture(K, random_state=0, scheduler=args.scheduler)
                    ticks = []
                    m.fit(path, method="online", batch_size=bs, n_passes=passes, polyak=polyak,
                          callbacks=[lambda ev: ticks.append(time.process_time())])
                    n = len(ticks)  # the first batch's CPU time taken as the mean of the others'
                    cpu = (ticks[-1] - ticks[0]) * n / max(1, n - 1) / passes
                    secs = sum(m.fit_info_["seconds_per_iteration"]) / passes
                    gap = (best - m.score(path)) / abs(best)
                    print(f"| {bs} | {passes} | {polyak} | {gap:.2e} | {secs:.2f} | {it:.3f} | {cpu:.2f} | "
                          f"{cpu_it:.2f} | {load().split('load average:')[-1].strip()} |", flush=True)


if __name__ == "__main__":
    main()
