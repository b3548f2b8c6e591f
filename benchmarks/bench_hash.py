"""Throughput of the content hash every opening scan and streamed re-read computes
(:func:`emflow.storage.fingerprint.positional_hash`): the compiled kernel against the NumPy
path, interleaved repeats, medians, load average printed.

    OMP_NUM_THREADS=1 python benchmarks/bench_hash.py --rows 2000000 --features 16 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from emflow.storage import fingerprint as F

    a = np.random.default_rng(0).normal(size=(args.rows, args.features))
    load0 = os.getloadavg()[0]
    times = {"numpy": [], "auto": []}
    F.positional_hash(a[:10], 0)  # compile / load the cached kernel
    for r in range(args.repeats):
        for kernel in (("numpy", "auto") if r % 2 == 0 else ("auto", "numpy")):
            F.KERNEL = kernel
            t0 = time.perf_counter()
            h = F.positional_hash(a, 0)
            times[kernel].append(time.perf_counter() - t0)
            if kernel == "numpy":
                ref = h
            else:
                kern = h
    F.KERNEL = "auto"
    assert ref == kern, "the two paths disagree"
    gb = a.nbytes / 1e9
    print(f"{args.rows:,} rows x {args.features} float64 ({gb:.2f} GB), medians of {args.repeats} interleaved "
          f"repeats, load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after; both paths give the same hash\n")
    print("| path | s | GB/s |")
    print("| --- | --- | --- |")
    for kernel, label in (("numpy", "NumPy (uint64 matmul per seed)"), ("auto", "compiled (numba)")):
        t = float(np.median(times[kernel]))
        print(f"| {label} | {t:.3f} | {gb / t:.2f} |")


if __name__ == "__main__":
    main()
