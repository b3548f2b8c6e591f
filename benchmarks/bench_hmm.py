"""Time per Baum-Welch iteration: emflow vs hmmlearn on the same data and starting parameters.

Prints a markdown table. Defaults are small; scale with --sequences / --max-length.
Each case runs ``--repeats`` interleaved pairs (hmmlearn, emflow; the order alternates between
repeats) on fresh models from the same start; the table gives the medians and the speed-up as
the ratio of the medians, with the load average before and after.

    python benchmarks/bench_hmm.py --sequences 2000 --states 4 --features 3 --iters 5 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sequences", type=int, default=500)
    ap.add_argument("--min-length", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=100)
    ap.add_argument("--states", type=int, default=4)
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--covariance-types", default="diag,full")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (hmmlearn, emflow) pairs per case")
    ap.add_argument("--scheduler", default="threads", help="emflow scheduler: threads, local or an address")
    args = ap.parse_args(argv)

    from hmmlearn import hmm as hl

    from emflow.estimators.hmm import CategoricalHMM, GaussianHMM
    from emflow.storage.synthetic.hmm import make_hmm_params, sample_hmm

    load0 = f"{os.getloadavg()[0]:.2f}"
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_length, args.max_length + 1, size=args.sequences)
    n_steps = int(lengths.sum())
    K, d = args.states, args.features
    rows = []

    def timed(model, X):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X, lengths)
        return (time.perf_counter() - t0) / args.iters

    # warm up imports and thread pools so the first row is not charged for them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GaussianHMM(2, n_iter=1, random_state=0, scheduler=args.scheduler).fit(rng.normal(size=(50, d)))
    cases = [("gaussian", ct) for ct in args.covariance_types.split(",") if ct] + [("categorical", None)]
    for emission, ct in cases:
        if emission == "gaussian":
            truth = make_hmm_params(K, d, "gaussian", ct, seed=1)
            X, _ = sample_hmm(truth, lengths, rng)
            start = make_hmm_params(K, d, "gaussian", ct, seed=2)
            kw = dict(covariance_type=ct, init_params="", n_iter=args.iters, tol=0)

            def pair(start=start, kw=kw):
                ref, ours = hl.GaussianHMM(K, **kw), GaussianHMM(K, scheduler=args.scheduler, **kw)
                for m in (ref, ours):
                    m.startprob_, m.transmat_, m.means_, m.covars_ = (start.startprob, start.transmat,
                                                                      start.means, start.covars)
                return ref, ours
        else:
            truth = make_hmm_params(K, 8, "categorical", seed=1)
            X, _ = sample_hmm(truth, lengths, rng)
            start = make_hmm_params(K, 8, "categorical", seed=2)
            kw = dict(n_features=8, init_params="", n_iter=args.iters, tol=0)

            def pair(start=start, kw=kw):
                ref = hl.CategoricalHMM(K, **kw)
                ours = CategoricalHMM(K, scheduler=args.scheduler, **kw)
                for m in (ref, ours):
                    m.startprob_, m.transmat_, m.emissionprob_ = start.startprob, start.transmat, start.emissionprob
                return ref, ours
        t_ref, t_ours = [], []
        for r in range(max(1, args.repeats)):
            ref, ours = pair()
            order = [(ref, t_ref), (ours, t_ours)]
            for model, times in (order if r % 2 == 0 else order[::-1]):
                times.append(timed(model, X))
        t_ref, t_ours = float(np.median(t_ref)), float(np.median(t_ours))
        agree = float(np.max(np.abs(np.subtract(ours.monitor_.history, list(ref.monitor_.history)))
                             / np.abs(list(ref.monitor_.history))))
        label = f"{emission} {ct}" if ct else emission
        rows.append((label, t_ref, t_ours, agree, ours.fit_info_["partitions"]))
    print(f"{args.sequences} sequences, lengths {args.min_length}-{args.max_length}, {n_steps} steps, "
          f"K={K}, d={d}, emflow scheduler={args.scheduler!r}; medians of {max(1, args.repeats)} "
          f"interleaved pairs; load average {load0} before, {os.getloadavg()[0]:.2f} after\n")
    print("| emissions | hmmlearn s/iter | emflow s/iter | hmmlearn seq/s | emflow seq/s | speed-up | max rel. diff of log-lik | partitions |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, a, b, agree, parts in rows:
        print(f"| {label} | {a:.4f} | {b:.4f} | {args.sequences / a:,.0f} | {args.sequences / b:,.0f} | "
              f"{a / b:.1f}x | {agree:.1e} | {parts} |")


if __name__ == "__main__":
    main()
