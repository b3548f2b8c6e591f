"""Gaussian mixtures and HMMs with values missing at random: exact EM against the usual workarounds.

    python benchmarks/bench_missing.py                      # 1e6 rows x 16, 20% missing, K=16 full
    python benchmarks/bench_missing.py --rows 100000        # a quicker run
    python benchmarks/bench_missing.py --kernel numpy       # the NumPy path of the missing-value E-step
    python benchmarks/bench_missing.py --model hmm          # GaussianHMM: 200 sequences x 500 steps x 8, K=4

Data: ``rows`` draws from a known K-component full-covariance mixture in ``features``
dimensions; each value is then missing (NaN) with probability ``missing``, independently
(missing completely at random). Four fits, all with ``scheduler="threads"`` and all started
from the same parameters (the true ones with every mean moved by a random vector of length
``--perturb``, uniform weights), ``tol`` and ``max_iter`` as given:

* ``complete``: the data before values were removed (the reference for time and error);
* ``marginalize``: ``GaussianMixture(missing="marginalize")`` on the data with NaN;
* ``drop rows``: the rows with no missing value only (0.8**16 = 2.8% of them at 20%);
* ``mean impute``: each NaN replaced by its column's mean over the observed values.

Reported per fit: seconds per iteration (median of ``fit_info_["seconds_per_iteration"]``),
CPU seconds per iteration (the process's CPU time over the whole fit, all threads, divided by
the iterations: less sensitive to other load on the machine, but it includes the opening
scan and, for ``marginalize``, the pass that computes the initialisation's column means),
iterations, and the error of the fitted parameters against the true ones, components matched
by the assignment that minimises the total distance between means: the mean over components
of ``|mu_k - mu_k*|``, of ``||Sigma_k - Sigma_k*||_F / ||Sigma_k*||_F``, and the largest
``|pi_k - pi_k*|``. The machine's load average (``os.getloadavg``) is printed beside the
figures: on a shared machine they are noisy.

``--model hmm``: ``--sequences`` sequences of ``--length`` steps drawn from a known
``GaussianHMM`` (:func:`emflow.storage.synthetic.hmm.make_hmm_params`, ``--states`` states,
``--features`` features, ``--covariance-type``), each value then missing with probability
``missing``. The fits start from the true parameters with every mean moved by ``--perturb``
and the transition matrix halfway to uniform (uniform start probabilities), ``init_params=""``.
The cases are ``complete``, ``marginalize`` (``GaussianHMM(missing="marginalize")``),
``mean impute`` and ``drop steps``: every time step with a missing value is removed from its
sequence and the remaining steps of a sequence are joined (the sequence boundaries are kept,
a sequence left with no step is dropped), so the chain sees consecutive kept steps as one
transition (0.8**8 = 17% of the steps are complete at 20%: the transition matrix is then
that of about six steps). Errors: means and covariances as for the mixture (states matched
by their means), and the largest ``|A_ij - A_ij*|`` of the transition matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment


def truth(K: int, d: int, rng: np.random.Generator):
    weights = rng.dirichlet(np.full(K, 5.0))
    means = rng.normal(0.0, 3.0, (K, d))
    covs = np.empty((K, d, d))
    for k in range(K):
        A = rng.normal(size=(d, d))
        covs[k] = A @ A.T / d + 0.5 * np.eye(d)
    return weights, means, covs


def draw(n: int, weights, means, covs, rng):
    K, d = means.shape
    labels = rng.choice(K, size=n, p=weights)
    X = np.empty((n, d))
    for k in range(K):
        idx = np.flatnonzero(labels == k)
        X[idx] = means[k] + rng.standard_normal((idx.size, d)) @ np.linalg.cholesky(covs[k]).T
    return X


def errors(gm, weights, means, covs) -> dict:
    cost = np.linalg.norm(gm.means_[:, None, :] - means[None], axis=2)
    rows, cols = linear_sum_assignment(cost)
    order = cols[np.argsort(rows)]  # fitted component k matches true component order[k]
    mu_err = np.linalg.norm(gm.means_ - means[order], axis=1).mean()
    cov_err = np.mean([np.linalg.norm(gm.covariances_[k] - covs[order[k]]) / np.linalg.norm(covs[order[k]])
                       for k in range(len(order))])
    w_err = np.max(np.abs(gm.weights_ - weights[order]))
    return {"mean_error": float(mu_err), "cov_rel_error": float(cov_err), "weight_error": float(w_err)}


def fit(X, start, args, **kw):
    import emflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = emflow.GaussianMixture(args.components, covariance_type="full", tol=args.tol, max_iter=args.max_iter,
                                    scheduler="threads", **start, **kw)
        t0, c0 = time.perf_counter(), time.process_time()
        gm.fit(X)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return gm, wall, cpu


def hmm_errors(model, truth) -> dict:
    from emflow.models import hmm as H

    means = np.asarray(truth.means)
    covs = np.asarray(H.full_covars(truth.covars, truth.covariance_type, *means.shape))
    cost = np.linalg.norm(model.means_[:, None, :] - means[None], axis=2)
    rows, cols = linear_sum_assignment(cost)
    order = cols[np.argsort(rows)]  # fitted state k is true state order[k]
    mu_err = np.linalg.norm(model.means_ - means[order], axis=1).mean()
    fitted = np.asarray(model.covars_)
    cov_err = np.mean([np.linalg.norm(fitted[k] - covs[order[k]]) / np.linalg.norm(covs[order[k]])
                       for k in range(len(order))])
    A = np.asarray(truth.transmat)[np.ix_(order, order)]
    return {"mean_error": float(mu_err), "cov_rel_error": float(cov_err),
            "transmat_error": float(np.max(np.abs(model.transmat_ - A)))}


def run_hmm(args):
    """The ``--model hmm`` cases (see the module docstring)."""
    import emflow
    from emflow.storage.synthetic.hmm import make_hmm_params, sample_hmm

    rng = np.random.default_rng(args.seed)
    K, d, ct = args.states, args.features, args.covariance_type
    truth = make_hmm_params(K, d, "gaussian", ct, seed=args.seed + 1)
    lengths = np.full(args.sequences, args.length)
    X, _ = sample_hmm(truth, lengths, rng)
    Xm = X.copy()
    Xm[rng.random(X.shape) < args.missing] = np.nan
    step = rng.normal(size=(K, d))
    step *= args.perturb / np.linalg.norm(step, axis=1, keepdims=True)
    start = dict(startprob_=np.full(K, 1.0 / K), transmat_=0.5 * np.asarray(truth.transmat) + 0.5 / K,
                 means_=np.asarray(truth.means) + step, covars_=np.asarray(truth.covars))
    keep = ~np.isnan(Xm).any(axis=1)
    seq = np.repeat(np.arange(args.sequences), lengths)
    kept_lengths = np.bincount(seq[keep], minlength=args.sequences)
    col_means = np.nanmean(Xm, axis=0)
    cases = {
        "complete": (X, lengths, {}),
        "marginalize": (Xm, lengths, {"missing": "marginalize"}),
        "drop steps": (Xm[keep], kept_lengths[kept_lengths > 0], {}),
        "mean impute": (np.where(np.isnan(Xm), col_means, Xm), lengths, {}),
    }
    wanted = args.cases.split(",")
    cases = {k: v for k, v in cases.items() if k in wanted or k == "complete"}

    def fit_hmm(data, lens, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = emflow.GaussianHMM(K, covariance_type=ct, init_params="", n_iter=args.max_iter, tol=args.tol,
                                   scheduler="threads", **kw)
            for name, value in start.items():
                setattr(m, name, value.copy())
            t0, c0 = time.perf_counter(), time.process_time()
            m.fit(data, lens)
            return m, time.perf_counter() - t0, time.process_time() - c0

    fit_hmm(Xm[: 20 * args.length], lengths[:20], missing="marginalize")  # warm-up: imports, compilation
    fit_hmm(X[: 20 * args.length], lengths[:20])
    results = {"model": "hmm", "sequences": args.sequences, "length": args.length, "features": d, "states": K,
               "covariance_type": ct, "missing": args.missing, "complete_steps": int(keep.sum()),
               "tol": args.tol, "max_iter": args.max_iter, "cases": {}}
    for name, (data, lens, kw) in cases.items():
        load0 = os.getloadavg()[0]
        m, wall, cpu = fit_hmm(data, lens, **kw)
        n_iter = int(m.n_iter_)
        r = {"steps": int(len(data)), "sequences": int(len(lens)),
             "s_per_iter": float(np.median(m.fit_info_["seconds_per_iteration"])),
             "cpu_s_per_iter": cpu / max(n_iter, 1), "n_iter": n_iter, "converged": bool(m.converged_),
             "wall_s": wall, "load_before": load0, "load_after": os.getloadavg()[0], **hmm_errors(m, truth)}
        results["cases"][name] = r
        print(f"{name:12s} {r['steps']:>8d} steps  {r['s_per_iter']:.3f} s/iter  cpu {r['cpu_s_per_iter']:.3f} "
              f"s/iter  {n_iter:3d} iters  mean err {r['mean_error']:.4f}  cov rel err {r['cov_rel_error']:.4f}  "
              f"transmat err {r['transmat_error']:.4f}  load {load0:.1f}-{r['load_after']:.1f}", flush=True)
    base = results["cases"]["complete"]
    print("\n| fit | steps (sequences) | s/iter | vs complete | CPU s/iter | vs complete | iterations | mean error | "
          "cov. rel. error | transmat error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["cases"].items():
        print(f"| {name} | {r['steps']:,} ({r['sequences']}) | {r['s_per_iter']:.3f} | "
              f"{r['s_per_iter'] / base['s_per_iter']:.1f}x | {r['cpu_s_per_iter']:.3f} | "
              f"{r['cpu_s_per_iter'] / base['cpu_s_per_iter']:.1f}x | {r['n_iter']} | {r['mean_error']:.4f} | "
              f"{r['cov_rel_error']:.4f} | {r['transmat_error']:.4f} |")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["gmm", "hmm"], default="gmm")
    ap.add_argument("--sequences", type=int, default=200, help="hmm: number of sequences")
    ap.add_argument("--length", type=int, default=500, help="hmm: steps per sequence")
    ap.add_argument("--states", type=int, default=4, help="hmm: number of states")
    ap.add_argument("--covariance-type", default="full", help="hmm: covariance_type")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=None, help="default 16 (gmm), 8 (hmm)")
    ap.add_argument("--components", type=int, default=16)
    ap.add_argument("--missing", type=float, default=0.2)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--perturb", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--kernel", choices=["auto", "numpy", "numba"], default="auto",
                    help="emflow.models.gmm_missing.KERNEL: the compiled missing-value E-step or NumPy")
    ap.add_argument("--cases", default="complete,marginalize,drop rows,mean impute",
                    help="comma-separated subset of the fits to run")
    args = ap.parse_args(argv)
    from emflow.models import gmm_missing

    gmm_missing.KERNEL = args.kernel
    if args.features is None:
        args.features = 16 if args.model == "gmm" else 8
    if args.model == "hmm":
        if args.cases == ap.get_default("cases"):
            args.cases = "complete,marginalize,drop steps,mean impute"
        results = run_hmm(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return

    rng = np.random.default_rng(args.seed)
    K, d = args.components, args.features
    weights, means, covs = truth(K, d, rng)
    X = draw(args.rows, weights, means, covs, rng)
    Xm = X.copy()
    Xm[rng.random(X.shape) < args.missing] = np.nan
    keep = ~np.isnan(Xm).all(axis=1)  # a row with no observed value says nothing: dropped
    X, Xm = X[keep], Xm[keep]
    step = rng.normal(size=(K, d))
    step *= args.perturb / np.linalg.norm(step, axis=1, keepdims=True)
    start = dict(weights_init=np.full(K, 1.0 / K), means_init=means + step,
                 precisions_init=np.linalg.inv(covs))
    complete_rows = ~np.isnan(Xm).any(axis=1)
    col_means = np.nanmean(Xm, axis=0)
    cases = {
        "complete": (X, {}),
        "marginalize": (Xm, {"missing": "marginalize"}),
        "drop rows": (Xm[complete_rows], {}),
        "mean impute": (np.where(np.isnan(Xm), col_means, Xm), {}),
    }
    wanted = args.cases.split(",")
    cases = {k: v for k, v in cases.items() if k in wanted or k == "complete"}
    results = {"rows": int(len(X)), "features": d, "components": K, "missing": args.missing, "kernel": args.kernel,
               "complete_rows": int(complete_rows.sum()), "tol": args.tol, "max_iter": args.max_iter,
               "cases": {}}
    fit(Xm[:2000], start, args, missing="marginalize")  # warm-up: imports, thread pool
    for name, (data, kw) in cases.items():
        load0 = os.getloadavg()[0]
        gm, wall, cpu = fit(data, start, args, **kw)
        r = {"rows": int(len(data)), "s_per_iter": float(np.median(gm.fit_info_["seconds_per_iteration"])),
             "cpu_s_per_iter": cpu / max(gm.n_iter_, 1),
             "n_iter": int(gm.n_iter_), "converged": bool(gm.converged_), "wall_s": wall,
             "load_before": load0, "load_after": os.getloadavg()[0], **errors(gm, weights, means, covs)}
        results["cases"][name] = r
        print(f"{name:12s} {r['rows']:>9d} rows  {r['s_per_iter']:.3f} s/iter  cpu {r['cpu_s_per_iter']:.3f} s/iter  "
              f"{r['n_iter']:3d} iters  "
              f"mean err {r['mean_error']:.4f}  cov rel err {r['cov_rel_error']:.4f}  "
              f"weight err {r['weight_error']:.4f}  load {load0:.1f}-{r['load_after']:.1f}", flush=True)
    base = results["cases"]["complete"]
    print("\n| fit | rows | s/iter | vs complete | CPU s/iter | vs complete | iterations | mean error | "
          "cov. rel. error | weight error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["cases"].items():
        print(f"| {name} | {r['rows']:,} | {r['s_per_iter']:.3f} | {r['s_per_iter'] / base['s_per_iter']:.1f}x | "
              f"{r['cpu_s_per_iter']:.3f} | {r['cpu_s_per_iter'] / base['cpu_s_per_iter']:.1f}x | {r['n_iter']} | "
              f"{r['mean_error']:.4f} | {r['cov_rel_error']:.4f} | {r['weight_error']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
