"""Seconds of one ``smooth`` (and ``filter``) pass of ``LinearGaussianSSM`` over a dataset
against one of its EM iterations over the same dataset, on the README's example (500
sequences of 20-200 steps, state_dim=2, 3 features, 10% missing, in Zarr).

Both passes run the sequences of a partition together (the compiled kernel when numba
imports, else the batched NumPy path; ``--kernel`` forces one). Figures are medians of
``--repeats`` interleaved repeats with the 1-minute load average beside each: on a shared
machine they move with the load.

    python benchmarks/bench_lgssm_apply.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5, help="EM iterations per fit (median per iteration taken)")
    ap.add_argument("--kernel", default="auto", choices=["auto", "numba", "numpy"])
    ap.add_argument("--scheduler", default="threads")
    args = ap.parse_args(argv)

    import emflow
    from emflow.models import lgssm_stats as MS
    from emflow.storage.synthetic import write_lgssm

    MS.KERNEL = args.kernel
    times: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ssm = write_lgssm(os.path.join(tmp, "ssm.zarr"), n_sequences=args.sequences, state_dim=2, n_features=3,
                          missing_fraction=0.1, overwrite=True)
        for r in range(args.repeats + 1):  # repeat 0 compiles / loads the kernel cache: not recorded
            t0 = time.perf_counter()
            kf = emflow.LinearGaussianSSM(2, em_vars=["A", "Q", "R"], max_iter=1, tol=0.0,
                                          scheduler=args.scheduler).fit(ssm)
            one = time.perf_counter() - t0  # like a pass: open + load + one sweep
            kf.set_params(max_iter=args.iters).fit(ssm)
            row = {"EM iteration": float(np.median(kf.fit_info_["seconds_per_iteration"])),
                   "`fit` with max_iter=1 (open + load + one iteration)": one}
            for kind in ("filter", "smooth"):
                t0 = time.perf_counter()
                getattr(kf, kind)(ssm)
                row[f"`{kind}` pass (in memory)"] = time.perf_counter() - t0
            if r:
                for name, sec in row.items():
                    times.setdefault(name, []).append((sec, os.getloadavg()[0]))
    path = "numpy" if MS._kernel() is None else "numba"
    em = float(np.median([s for s, _ in times["EM iteration"]]))
    print(f"\n{args.sequences} sequences (README example), kernel={path}, scheduler={args.scheduler}, "
          f"medians of {args.repeats} repeats\n")
    print("| what | seconds | / one EM iteration | load average (1 min) |")
    print("| --- | ---: | ---: | --- |")
    for name, v in times.items():
        med = float(np.median([s for s, _ in v]))
        loads = [ld for _, ld in v]
        print(f"| {name} | {med:.3f} | {med / em:.2f} | {min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
