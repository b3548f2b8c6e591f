"""Gaussian mixtures with values missing at random: exact EM against the usual workarounds.

    python benchmarks/bench_missing.py                      # 1e6 rows x 16, 20% missing, K=16 full
    python benchmarks/bench_missing.py --rows 100000        # a quicker run
    python benchmarks/bench_missing.py --kernel numpy       # the NumPy path of the missing-value E-step

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=16)
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
