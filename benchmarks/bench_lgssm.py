"""Time per EM iteration: emflow's LinearGaussianSSM vs pykalman's KalmanFilter.em.

pykalman fits one sequence at a time, so its time for many sequences is the sum over
sequences of one E-step + M-step each (an upper bound on what a loop over sequences costs;
it does not give the pooled M-step). emflow runs one pooled iteration over all sequences.

    python benchmarks/bench_lgssm.py --sequences 50 --length 100 --state-dim 2 --features 3

Prints a markdown table. Keep it small on shared machines.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=50)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--state-dim", type=int, default=2)
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--missing", type=float, default=0.0)
    ap.add_argument("--scheduler", default="threads")
    args = ap.parse_args(argv)

    from emflow.estimators.lgssm import LinearGaussianSSM
    from emflow.models import lgssm as M
    from emflow.storage.synthetic.lgssm import make_lgssm_params, sample_lgssm

    k, p = args.state_dim, args.features
    truth = make_lgssm_params(k, p, seed=0)
    lengths = [args.length] * args.sequences
    _, X = sample_lgssm(truth, lengths, seed=0, missing_fraction=args.missing)
    start = dict(zip(M.EM_VARS, M.LGSSMParams(0.5 * np.eye(k), truth.C, np.eye(k), np.eye(p), np.zeros(k), np.eye(k))))
    rows = []

    model = LinearGaussianSSM(k, em_vars="all", tol=0.0, max_iter=args.iters, scheduler=args.scheduler, **start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, lengths)
    sec = np.median(model.fit_info_["seconds_per_iteration"])
    rows.append(("emflow LinearGaussianSSM (" + model.fit_info_["engine"] + ")", sec))

    single = X[: args.length]
    sec1 = None
    try:
        from pykalman import KalmanFilter
    except ImportError:
        rows.append(("pykalman (not installed)", float("nan")))
    else:
        names = ["transition_matrices", "observation_matrices", "transition_covariance",
                 "observation_covariance", "initial_state_mean", "initial_state_covariance"]
        kf = KalmanFilter(start["transition_matrix"], start["observation_matrix"], start["transition_covariance"],
                          start["observation_covariance"], np.zeros(k), np.zeros(p),
                          start["initial_state_mean"], start["initial_state_covariance"])
        Ym = np.ma.masked_invalid(single)
        t0 = time.perf_counter()
        kf.em(Ym, n_iter=args.iters, em_vars=names)
        sec1 = (time.perf_counter() - t0) / args.iters
        rows.append((f"pykalman KalmanFilter.em, one sequence x {args.sequences} (extrapolated)", sec1 * args.sequences))
    steps = args.sequences * args.length
    print(f"\n{args.sequences} sequences x {args.length} steps, state_dim={k}, features={p}, "
          f"missing={args.missing}\n")
    print("| implementation | seconds / iteration | steps / second |")
    print("| --- | ---: | ---: |")
    for name, s in rows:
        print(f"| {name} | {s:.4f} | {steps / s:,.0f} |")


if __name__ == "__main__":
    main()
