"""What re-checking streamed partitions costs: a streamed GMM fit with and without the check.

A streamed fit (``persist=False``) re-reads every partition each iteration; emflow
recomputes a 64-bit positional hash of the partition (one of the two the opening scan
computed for the fingerprint) and compares, so data that change during the fit stop it. This script times
the same fit with the check and with it switched off (``emflow.storage.data.checked_handles``
replaced by the bare loaders), in alternating runs, and prints the median seconds per
iteration of each, plus the digest's own throughput on one partition.

    python benchmarks/bench_data_check.py --rows 1000000 --features 16 --components 16 --iters 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

import emflow
import emflow.storage.data as D
from emflow.storage.synthetic.gmm import write_gmm


def fit_seconds(path, args, check: bool) -> list[float]:
    secs: list[float] = []
    original = D.checked_handles
    if not check:
        D.checked_handles = lambda loaders, scans, weighted, starts: list(loaders)
    try:
        emflow.GaussianMixture(args.components, max_iter=args.iters, tol=0, random_state=0, persist=False,
                               partition_bytes=args.partition_mib * 2**20, scheduler=args.scheduler,
                               init_params="random_from_data").fit(
            path, callbacks=[lambda ev: secs.append(ev.seconds)])
    finally:
        D.checked_handles = original
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--components", type=int, default=16)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partition-mib", type=int, default=64)
    ap.add_argument("--scheduler", default="threads")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_gmm(f"{tmp}/d.zarr", args.rows, args.components, args.features, "full", seed=0)
        rows = D.open_rows(path, partition_bytes=args.partition_mib * 2**20)
        ld = rows.loaders[0]
        t = time.perf_counter()
        X, _ = ld.read()
        t_read = time.perf_counter() - t
        t = time.perf_counter()
        D._check_digest((X, None), ld.start)  # what each streamed re-read computes
        t_hash = time.perf_counter() - t
        print(f"partition 0: {X.nbytes / 2**20:.0f} MiB; read+decompress {t_read:.3f} s, check digest {t_hash:.3f} s "
              f"({X.nbytes / t_hash / 1e9:.2f} GB/s on one core)")
        res = {True: [], False: []}
        for _ in range(args.repeats):
            for check in (False, True):
                res[check].extend(fit_seconds(path, args, check))
        for check in (False, True):
            s = res[check]
            print(f"check {'on ' if check else 'off'}: median {statistics.median(s):.3f} s/iteration "
                  f"(min {min(s):.3f}, {len(s)} iterations)")
        on, off = statistics.median(res[True]), statistics.median(res[False])
        print(f"overhead: {on - off:+.3f} s/iteration ({100 * (on - off) / off:+.1f}%)")


if __name__ == "__main__":
    main()
