"""Fixed cost per EM iteration: emflow (LocalCluster and default scheduler) vs scikit-learn.

Issue 18's targets: on a started LocalCluster the fixed cost of one iteration is <= 10 ms
(1,000 x 2, GMM K=2), and with the default scheduler emflow is no slower than scikit-learn
at 1e4 rows and at 1e5 x 2, K=2. Run::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_overhead.py
    python benchmarks/bench_overhead.py --repeats 5 --iters 20 --cases 1000x2x2

Cases are ``n x d x K`` (full covariances, in-memory NumPy data). Every system starts from
the same parameters (``*_init``) and runs ``--iters`` iterations with ``tol=0``; the systems
run interleaved (emflow-cluster, emflow-default, sklearn, then again, ``--repeats`` times)
so that machine load hits them alike. Per-iteration seconds:

* emflow: the ``seconds`` of every ``IterationEvent`` the fit's callback sees (E-step pass,
  reduction, M-step), the first iteration dropped (it materialises the data); the median.
  ``emflow-cluster``: a LocalCluster of 2 workers x 1 thread, started once, its ``Client``
  passed as ``scheduler=``. ``emflow-default``: ``scheduler=None``.
* scikit-learn: ``_e_step`` then ``_m_step`` (what its ``fit`` runs per iteration) timed
  one by one, after a ``fit(max_iter=1)`` that sets the initial parameters; the median.

The figure printed per system is the median over repeats of the per-repeat medians, with
the load average (``os.getloadavg``) beside it: on a shared machine the figures are noisy.

``--phases`` also prints, per case and emflow system, the median milliseconds per pass spent
in each engine step (time.perf_counter around the Engine methods: the scheduler question
before a pass, sending the parameters, submitting, waiting for the tasks, the whole pass),
which is where the fixed cost of an iteration goes. ``emflow-default`` runs with no default
Dask client (the benchmark's own Client is not made the default), i.e. in-process threads.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

DEFAULT_CASES = ("1000x2x2", "10000x16x16", "100000x2x2")
PHASES = ("_await_workers", "_broadcast", "_submit", "_wait", "map_reduce")


def stamp_phases() -> dict:
    """Wrap the Engine steps of a pass with perf_counter stamps: {step: [seconds, ...]}."""
    import functools

    from emflow.execution.engine import Engine

    stamps: dict[str, list[float]] = {p: [] for p in PHASES}
    for name in PHASES:
        f = getattr(Engine, name)

        def timed(*a, _f=f, _name=name, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                stamps[_name].append(time.perf_counter() - t)

        setattr(Engine, name, functools.wraps(f)(timed))
    return stamps


def make_case(n: int, d: int, K: int, seed: int = 0):
    """Data with K separated blobs and initial parameters near the truth."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(K, d))
    labels = rng.integers(K, size=n)
    X = centres[labels] + rng.normal(size=(n, d))
    init = dict(weights_init=np.full(K, 1.0 / K), means_init=centres + 0.3,
                precisions_init=np.stack([np.eye(d)] * K))
    return X, init


def time_emflow(X, init, K: int, iters: int, scheduler) -> float:
    import emflow

    secs: list[float] = []
    gm = emflow.GaussianMixture(K, max_iter=iters, tol=0.0, scheduler=scheduler, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X, callbacks=[lambda ev: secs.append(ev.seconds)])
    return float(np.median(secs[1:] if len(secs) > 1 else secs))


def time_sklearn(X, init, K: int, iters: int) -> float:
    from sklearn.mixture import GaussianMixture as SK

    m = SK(K, max_iter=1, tol=0.0, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X)
    secs = []
    for _ in range(iters):
        t = time.perf_counter()
        _, log_resp = m._e_step(X)
        m._m_step(X, log_resp)
        secs.append(time.perf_counter() - t)
    return float(np.median(secs))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="n x d x K, e.g. 1000x2x2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--systems", nargs="+", default=["emflow-cluster", "emflow-default", "sklearn"])
    ap.add_argument("--phases", action="store_true", help="print ms per pass in each engine step")
    args = ap.parse_args(argv)
    stamps = stamp_phases() if args.phases else None

    from distributed import Client

    from emflow.execution.cluster import local_cluster

    print(f"load average at start: {os.getloadavg()}")
    out: dict = {}
    with local_cluster(n_workers=args.workers, threads_per_worker=1, silence_logs=40) as cluster, \
            Client(cluster, set_as_default=False) as client:
        for case in args.cases:
            n, d, K = (int(v) for v in case.lower().split("x"))
            X, init = make_case(n, d, K)
            runs: dict[str, list[float]] = {s: [] for s in args.systems}
            phases: dict[str, dict[str, list[float]]] = {}
            for _ in range(args.repeats):
                for s in args.systems:
                    for v in (stamps or {}).values():
                        v.clear()
                    if s == "emflow-cluster":
                        runs[s].append(time_emflow(X, init, K, args.iters, client))
                    elif s == "emflow-default":
                        runs[s].append(time_emflow(X, init, K, args.iters, None))
                    elif s == "sklearn":
                        runs[s].append(time_sklearn(X, init, K, args.iters))
                    else:
                        raise SystemExit(f"unknown system {s!r}")
                    for p, v in (stamps or {}).items():
                        if v and s.startswith("emflow"):
                            phases.setdefault(s, {}).setdefault(p, []).append(float(np.median(v[1:] or v)))
            load = os.getloadavg()
            out[case] = {s: float(np.median(v)) for s, v in runs.items()}
            cells = "  ".join(f"{s} {1e3 * t:8.2f} ms" for s, t in out[case].items())
            print(f"{case:>14}: {cells}   (load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})", flush=True)
            for s, per in phases.items():
                print(f"{'':>16}{s} ms per pass: " + "  ".join(
                    f"{p.strip('_')} {1e3 * np.median(v):.2f}" for p, v in per.items()), flush=True)
    return out


if __name__ == "__main__":
    main()
