"""Seconds per EM iteration against sequence length: emflow's HMMs against hmmlearn and its
linear-Gaussian state-space model against pykalman, on one sequence of each length.

For every length and model, ``--repeats`` interleaved pairs (peer, emflow; the order
alternates) fit fresh models from the same starting parameters on the same sequence, with
``tol=0``. A fit's time is its wall time divided by its iterations, for both systems: emflow's
figure includes its fixed cost (opening the data, the content scan, the engine's passes).
The tables give medians, the speed-up as the ratio of the medians, the largest relative
difference of the per-iteration log-likelihoods (the check that both ran the same algorithm)
and the load average. Writes ``RESULTS.md``, ``results.json`` and ``seqlen.png`` to ``--out``.

    python benchmarks/bench_sequence_length.py --out benchmarks/sequences
    python benchmarks/bench_sequence_length.py --lengths 100,1000 --repeats 1 --out /tmp/seq   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _load() -> float:
    return os.getloadavg()[0]


def _hmm_cases(K, d, scheduler, iters):
    from hmmlearn import hmm as hl

    from emflow.estimators.hmm import CategoricalHMM, GaussianHMM
    from emflow.storage.synthetic.hmm import make_hmm_params, sample_hmm

    def gaussian(ct):
        truth, start = make_hmm_params(K, d, "gaussian", ct, seed=1), make_hmm_params(K, d, "gaussian", ct, seed=2)
        kw = dict(covariance_type=ct, init_params="", n_iter=iters, tol=0)

        def data(L, rng):
            return sample_hmm(truth, np.array([L]), rng)[0]

        def pair():
            ref, ours = hl.GaussianHMM(K, **kw), GaussianHMM(K, scheduler=scheduler, **kw)
            for m in (ref, ours):
                m.startprob_, m.transmat_, m.means_, m.covars_ = start.startprob, start.transmat, start.means, start.covars
            return ref, ours

        return f"GaussianHMM {ct}", "hmmlearn", data, pair

    def categorical():
        truth, start = make_hmm_params(K, 8, "categorical", seed=1), make_hmm_params(K, 8, "categorical", seed=2)
        kw = dict(n_features=8, init_params="", n_iter=iters, tol=0)

        def data(L, rng):
            return sample_hmm(truth, np.array([L]), rng)[0]

        def pair():
            ref, ours = hl.CategoricalHMM(K, **kw), CategoricalHMM(K, scheduler=scheduler, **kw)
            for m in (ref, ours):
                m.startprob_, m.transmat_, m.emissionprob_ = start.startprob, start.transmat, start.emissionprob
            return ref, ours

        return "CategoricalHMM", "hmmlearn", data, pair

    return [gaussian("diag"), gaussian("full"), categorical()]


def _lgssm_case(k, p, scheduler, iters):
    from pykalman import KalmanFilter

    from emflow.estimators.lgssm import LinearGaussianSSM
    from emflow.models import lgssm as M
    from emflow.storage.synthetic.lgssm import make_lgssm_params, sample_lgssm

    truth = make_lgssm_params(k, p, seed=0)
    start = dict(zip(M.EM_VARS, M.LGSSMParams(0.5 * np.eye(k), truth.C, np.eye(k), np.eye(p), np.zeros(k), np.eye(k))))
    names = ["transition_matrices", "observation_matrices", "transition_covariance", "observation_covariance",
             "initial_state_mean", "initial_state_covariance"]

    def data(L, rng):
        return sample_lgssm(truth, [L], seed=int(rng.integers(2**31)))[1]

    def kalman():
        return KalmanFilter(start["transition_matrix"], start["observation_matrix"], start["transition_covariance"],
                            start["observation_covariance"], np.zeros(k), np.zeros(p),
                            start["initial_state_mean"], start["initial_state_covariance"])

    class _PyKalman:
        """pykalman's EM, timed as one ``em(n_iter=iters)`` call; ``history`` (untimed, on request)
        replays it one iteration a call for the mean log-likelihood per step at each start."""

        def fit(self, X, lengths):
            self._X = X
            kalman().em(X, n_iter=iters, em_vars=names)
            return self

        @property
        def history(self):
            kf, out = kalman(), []
            for _ in range(iters):
                out.append(kf.loglikelihood(self._X) / len(self._X))
                kf = kf.em(self._X, n_iter=1, em_vars=names)
            return out

    def pair():
        ours = LinearGaussianSSM(k, em_vars="all", tol=0.0, max_iter=iters, scheduler=scheduler, **start)
        return _PyKalman(), ours

    return "LinearGaussianSSM", "pykalman", data, pair


def _history(model):
    if hasattr(model, "monitor_"):
        return list(model.monitor_.history)
    if hasattr(model, "history"):
        return list(model.history)
    return list(model.history_)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="100,1000,5000,20000,50000")
    ap.add_argument("--lgssm-max-length", type=int, default=20000,
                    help="pykalman takes ~0.15 ms a step an iteration: longer LGSSM cases are skipped")
    ap.add_argument("--states", type=int, default=4)
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (peer, emflow) pairs per case")
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--out", default=os.path.join(HERE, "sequences"))
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    warnings.simplefilter("ignore")
    import emflow

    # warm imports, thread pools and compiled kernels outside the timings
    emflow.GaussianHMM(2, n_iter=1, random_state=0, scheduler=args.scheduler).fit(np.random.default_rng(0).normal(size=(50, 3)))
    cases = _hmm_cases(args.states, args.features, args.scheduler, args.iters)
    cases.append(_lgssm_case(2, args.features, args.scheduler, args.iters))
    start_load, rows = _load(), []
    for name, peer, data, pair in cases:
        for L in lengths:
            if name == "LinearGaussianSSM" and L > args.lgssm_max_length:
                continue
            X = data(L, np.random.default_rng(L))
            t = {"peer": [], "emflow": []}
            loads = []
            for r in range(max(1, args.repeats)):
                ref, ours = pair()
                order = [("peer", ref), ("emflow", ours)]
                for who, model in order if r % 2 == 0 else order[::-1]:
                    loads.append(_load())
                    t0 = time.perf_counter()
                    model.fit(X, np.array([L]))
                    t[who].append((time.perf_counter() - t0) / args.iters)
            h_ref, h_ours = np.array(_history(ref)), np.array(_history(ours))
            n = min(len(h_ref), len(h_ours))
            agree = float(np.max(np.abs(h_ours[:n] - h_ref[:n]) / np.abs(h_ref[:n])))
            row = dict(model=name, peer=peer, length=L, peer_s=float(np.median(t["peer"])),
                       emflow_s=float(np.median(t["emflow"])), agree=agree, load_min=min(loads), load_max=max(loads))
            row["speedup"] = row["peer_s"] / row["emflow_s"]
            rows.append(row)
            print(f"{name} L={L}: {peer} {row['peer_s']:.4f} s/iter, emflow {row['emflow_s']:.4f} "
                  f"({row['speedup']:.1f}x), agree {agree:.1e}, load {min(loads):.1f}-{max(loads):.1f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    _write_markdown(args, rows, start_load)
    _plot(args, rows)


def _write_markdown(args, rows, start_load):
    import emflow

    cmd = "python benchmarks/bench_sequence_length.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out") + f" --out {args.out}"
    lines = ["# Seconds per EM iteration against sequence length", "",
             f"Generated by `{cmd}` on {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}.  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average {start_load:.2f} at start, "
             f"{_load():.2f} at end. emflow {emflow.__version__}, scheduler `{args.scheduler}`.  ",
             f"One sequence per case; {args.states} states, {args.features} features (categorical: 8 symbols; "
             f"state-space: 2 states); {args.iters} iterations per fit, `tol=0`; medians of {args.repeats} "
             "interleaved (peer, emflow) pairs; a fit's time is its wall time over its iterations for both "
             "systems (emflow's includes opening, the content scan and the engine's passes).", "",
             "| model | peer | steps | peer s/iter | emflow s/iter | speed-up | max rel. diff of log-lik | load |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['peer']} | {r['length']:,} | {r['peer_s']:.4f} | {r['emflow_s']:.4f} | "
                     f"{r['speedup']:.1f}x | {r['agree']:.1e} | {r['load_min']:.1f}-{r['load_max']:.1f} |")
    lines += ["", "![seconds per iteration against sequence length](seqlen.png)", ""]
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def _plot(args, rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'emflow[bench]')")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m]
        L = [r["length"] for r in rs]
        ax.loglog(L, [r["emflow_s"] for r in rs], "o-", label="emflow")
        ax.loglog(L, [r["peer_s"] for r in rs], "s--", label=rs[0]["peer"])
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("sequence length (steps)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("seconds per iteration")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "seqlen.png"), dpi=110)


if __name__ == "__main__":
    main()
