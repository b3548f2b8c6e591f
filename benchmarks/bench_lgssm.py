"""Time per EM iteration: emflow's LinearGaussianSSM vs pykalman's KalmanFilter.em; and
emflow's filter / smooth passes over the same data against one of its EM iterations.

emflow runs both of its paths, in the same process, interleaved with pykalman: the
compiled kernel (numba, when it imports) and the NumPy path (the sequences of a partition
filtered together). pykalman fits one sequence at a time, so with many sequences its time
per iteration is one E-step + M-step per sequence, timed on ``--pk-sequences`` of them and
scaled to all (it has no pooled M-step over many sequences). Every figure is the median of
``--repeats`` interleaved repeats, with the load average (1 minute) beside it: on a shared
machine the ratios move with the load.

    python benchmarks/bench_lgssm.py --sequences 1 --length 5000
    python benchmarks/bench_lgssm.py --sequences 500 --length 100

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np


def _load() -> float:
    return os.getloadavg()[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=50)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--state-dim", type=int, default=2)
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3, help="EM iterations per emflow fit (median taken)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pk-sequences", type=int, default=20, help="sequences pykalman is timed on")
    ap.add_argument("--missing", type=float, default=0.0)
    ap.add_argument("--scheduler", default="threads")
    args = ap.parse_args(argv)

    from emflow.estimators.lgssm import LinearGaussianSSM
    from emflow.models import lgssm as M
    from emflow.models import lgssm_stats as MS
    from emflow.storage.synthetic.lgssm import make_lgssm_params, sample_lgssm

    k, p = args.state_dim, args.features
    truth = make_lgssm_params(k, p, seed=0)
    lengths = [args.length] * args.sequences
    _, X = sample_lgssm(truth, lengths, seed=0, missing_fraction=args.missing)
    start = dict(zip(M.EM_VARS, M.LGSSMParams(0.5 * np.eye(k), truth.C, np.eye(k), np.eye(p), np.zeros(k), np.eye(k))))
    paths = ["numba", "numpy"] if MS._kernel() is not None else ["numpy"]
    if "numba" in paths:  # compile (or load the cache) outside the timings
        MS.KERNEL = "numba"
        MS.partition_stats(X[: args.length], np.array([0, args.length]), truth)
    try:
        from pykalman import KalmanFilter
    except ImportError:
        KalmanFilter = None
    n_pk = min(args.pk_sequences, args.sequences)
    times: dict[str, list[tuple[float, float]]] = {}

    def record(name, sec):
        times.setdefault(name, []).append((sec, _load()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.repeats):
            for path in paths:
                MS.KERNEL = path
                model = LinearGaussianSSM(k, em_vars="all", tol=0.0, max_iter=args.iters, scheduler=args.scheduler,
                                          **start)
                model.fit(X, lengths)
                record(f"emflow EM iteration ({path})", float(np.median(model.fit_info_["seconds_per_iteration"])))
                for kind in ("filter", "smooth"):
                    t0 = time.perf_counter()
                    getattr(model, kind)(X, lengths)
                    record(f"emflow `{kind}` pass ({path})", time.perf_counter() - t0)
            if KalmanFilter is not None:
                kf = KalmanFilter(start["transition_matrix"], start["observation_matrix"], start["transition_covariance"],
                                  start["observation_covariance"], np.zeros(k), np.zeros(p),
                                  start["initial_state_mean"], start["initial_state_covariance"])
                names = ["transition_matrices", "observation_matrices", "transition_covariance",
                         "observation_covariance", "initial_state_mean", "initial_state_covariance"]
                t0 = time.perf_counter()
                for s in range(n_pk):
                    kf.em(np.ma.masked_invalid(X[s * args.length : (s + 1) * args.length]), n_iter=1, em_vars=names)
                record("pykalman KalmanFilter.em iteration" + (f" ({n_pk} sequences, scaled)" if n_pk < args.sequences
                                                               else ""), (time.perf_counter() - t0) * args.sequences / n_pk)
    steps = args.sequences * args.length
    med = {name: float(np.median([s for s, _ in v])) for name, v in times.items()}
    pk = next((v for n, v in med.items() if n.startswith("pykalman")), None)
    print(f"\n{args.sequences} sequences x {args.length} steps, state_dim={k}, features={p}, missing={args.missing}, "
          f"scheduler={args.scheduler}, medians of {args.repeats} interleaved repeats\n")
    print("| implementation | seconds | steps / second | pykalman / this | load average (1 min) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, v in times.items():
        loads = [ld for _, ld in v]
        ratio = f"{pk / med[name]:.1f}x" if pk else "-"
        print(f"| {name} | {med[name]:.4f} | {steps / med[name]:,.0f} | {ratio} | {min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
