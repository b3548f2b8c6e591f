"""The engine at scale: what one EM iteration costs the engine as partitions multiply.

One command regenerates ``benchmarks/scale-engine/RESULTS.md``, ``results.json`` and
``overhead.png``::

    python benchmarks/bench_scale.py                       # the reported grid (~20 min on 2 cores)
    python benchmarks/bench_scale.py --sizes 100 1000 --repeats 1 --out /tmp/x   # a quick look

The cluster is what a user on a real one has: an external ``dask scheduler`` process and
two single-threaded ``dask worker`` processes (no nanny), joined by a scheduler file, so the
client, the scheduler and the workers are separate processes whose CPU time and memory are
measured apart (psutil). Each partition holds 4 rows of 16 float64 values, so the E-step is
next to nothing and an iteration costs what the engine costs: submitting the tasks,
scheduling them, serialising and moving the statistics, the reduction tree's ``add``.

The "E-step" returns a statistics bundle of a fixed size (a ``GMMStats`` of zeros but for
values taken from the partition), like every family's E-step:

* ``K16-d16``: the full-covariance GMM bundle at K=16, d=16 (n, s1, s2 of (16, 16, 16)): 35 KB;
* ``K256-d128``: 4.5 MB (n (256), s1 (256, 128), s2 (256, 128, 16)): the issue's "~4 MB"
  case. (A full-covariance GMM at K=256, d=128 carries 33.6 MB, a diagonal one 0.5 MB;
  the transfer and ``add`` costs scale with the bytes, see the model in RESULTS.md.)

Modes: ``per-partition`` (``Engine(partitions_per_task=1)``: one task per partition, the
engine before the fix) and ``auto`` (the default: passes of more than 512 partitions run
several consecutive partitions per task, reduced inside the task in the same tree).

Per iteration (``engine.map_reduce``, the E-step map + tree reduction + result to the
client; the parameters are broadcast each time, as a fit does): wall seconds, tasks,
the CPU seconds of the client, the scheduler and the workers, the bytes the workers sent
each other (``Worker.transfer_outgoing_bytes_total``), the statistics bytes serialised
(one bundle per task output), the peak resident memory of the client, the scheduler and
the largest worker (sampled every 20 ms), and the most bytes of results one worker held
(the scheduler's count). The M-step is timed apart, on the client, with
the real ``emflow.models.gmm.m_step`` (full covariances) at each K, d. Iterations are
interleaved over sizes and modes within a repeat; figures are medians over repeats; the
load average is recorded beside each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import emflow  # noqa: E402
from emflow.storage import data as _data  # noqa: E402
from emflow.execution.engine import Engine  # noqa: E402
from emflow.models import gmm as G  # noqa: E402

ROWS_PER_PARTITION = 4
D_DATA = 16
CONFIGS = {
    # name: (K, d, s2 shape)
    "K16-d16": (16, 16, (16, 16, 16)),
    "K256-d128": (256, 128, (256, 128, 16)),
}
# per-partition mode is skipped where it would hold more than this many bytes of leaf
# statistics (the machine has ~23 GB shared by several people)
MAX_LEAF_BYTES = 6e9


def stats_bytes(cfg: str) -> int:
    K, d, s2 = CONFIGS[cfg]
    return 8 * (K + K * d + int(np.prod(s2)) + 3)


def fake_e_step(X, w, params, cfg):
    """A statistics bundle of the config's size; the values depend on the partition."""
    K, d, s2 = CONFIGS[cfg]
    s = G.GMMStats(np.zeros(K), np.zeros((K, d)), np.empty(s2), np.zeros(()), np.zeros(()), np.zeros(()))
    s.s2.fill(float(X[0, 0]))  # a real E-step writes every value
    s.n[0] = len(X)
    m = min(d, X.shape[1])
    s.s1[0, :m] = X.sum(axis=0)[:m]
    return s._replace(loglik=np.asarray(-float(np.square(X).sum())), weight_sum=np.asarray(float(len(X))),
                      n_rows=np.asarray(float(len(X))))


def fake_params(cfg):
    K, d, _ = CONFIGS[cfg]
    eye = np.broadcast_to(np.eye(d), (K, d, d)).copy()
    return G.GMMParams(np.full(K, 1 / K), np.zeros((K, d)), eye, eye, "full")


# -- the cluster: separate processes, stopped by pid ------------------------------------


class Cluster:
    def __init__(self, n_workers: int, tmp: str):
        import psutil

        self.sfile = os.path.join(tmp, "scheduler.json")
        py = sys.executable
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(os.path.join(tmp, "cluster.log"), "w")
        self.procs = [subprocess.Popen([py, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", self.sfile,
                                        "--port", "0", "--dashboard-address", ":0", "--no-show"],
                                       env=env, stdout=log, stderr=log)]
        deadline = time.time() + 60
        while not os.path.exists(self.sfile):
            if time.time() > deadline:
                raise SystemExit("the scheduler did not start; see " + log.name)
            time.sleep(0.2)
        for i in range(n_workers):
            self.procs.append(subprocess.Popen(
                [py, "-m", "distributed.cli.dask_worker", "--scheduler-file", self.sfile, "--nthreads", "1",
                 "--no-nanny", "--memory-limit", "0", "--local-directory", os.path.join(tmp, f"w{i}"),
                 "--dashboard-address", ":0"], env=env, stdout=log, stderr=log))
        from distributed import Client

        self.client = Client(scheduler_file=self.sfile)
        self.client.wait_for_workers(n_workers, timeout=120)
        self.ps = [psutil.Process(p.pid) for p in self.procs]
        self.me = psutil.Process()

    def cpu(self) -> dict:
        def t(p):
            c = p.cpu_times()
            return c.user + c.system

        return {"client": t(self.me), "scheduler": t(self.ps[0]), "workers": sum(t(p) for p in self.ps[1:])}

    def rss(self) -> dict:
        return {"client": self.me.memory_info().rss, "scheduler": self.ps[0].memory_info().rss,
                "worker_max": max(p.memory_info().rss for p in self.ps[1:])}

    def sent(self) -> int:
        return sum(self.client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())

    def close(self):
        try:
            self.client.close()
        except Exception:
            pass
        for p in self.procs[::-1]:  # workers first, then the scheduler; by pid
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _held(dask_scheduler=None):
    return max((ws.nbytes for ws in dask_scheduler.workers.values()), default=0)


class Peak:
    """The peak of each rss() figure while the block runs."""

    def __init__(self, cluster):
        self.cluster, self.peak, self._stop = cluster, {}, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            try:
                now = self.cluster.rss()
                # the bytes of results a worker holds, as the scheduler counts them
                now["held_max"] = self.cluster.client.run_on_scheduler(_held)
                for k, v in now.items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
            except Exception:
                pass
            self._stop.wait(0.02)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _trim():
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def one_iteration(cluster, engine, loaded, cfg, params) -> dict:
    # freed memory back to the system first, so each iteration's peak RSS is its own
    # the previous pass's results are released asynchronously: wait until they are gone
    deadline = time.monotonic() + 30
    while cluster.client.run_on_scheduler(_held) > 64 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.client.run(_trim)
    _trim()
    sent0, cpu0 = cluster.sent(), cluster.cpu()
    load = os.getloadavg()[0]
    with Peak(cluster) as peak:
        t0 = time.perf_counter()
        total = engine.map_reduce(fake_e_step, loaded, params, cfg)
        secs = time.perf_counter() - t0
    cpu1 = cluster.cpu()
    info = engine.last_reduction
    P = info["partitions"]
    assert float(total.n_rows) == P * ROWS_PER_PARTITION, (float(total.n_rows), P)
    return dict(seconds=secs, tasks=info["tasks"], partitions_per_task=info["partitions_per_task"],
                depth=info["depth"], bytes_between_workers=cluster.sent() - sent0,
                stats_bytes_serialised=info["tasks"] * stats_bytes(cfg),
                cpu={k: cpu1[k] - cpu0[k] for k in cpu0}, peak_rss=dict(peak.peak), loadavg=load,
                checksum=float(total.s1.sum()))


def time_m_step(cfg: str, repeats: int = 3) -> float:
    K, d, _ = CONFIGS[cfg]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(max(4 * d, 2000), d))
    R = rng.dirichlet(np.ones(K), size=len(X))
    n = R.sum(0)
    s1 = R.T @ X
    s2 = np.einsum("ik,id,ie->kde", R, X, X)
    st = G.GMMStats(n, s1, s2, np.asarray(0.0), np.asarray(float(len(X))), np.asarray(float(len(X))))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        G.m_step(st, np.zeros(d), "full", 1e-6)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def median_of(runs: list[dict]) -> dict:
    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    return dict(
        repeats=len(runs), seconds=med([r["seconds"] for r in runs]),
        seconds_all=[round(r["seconds"], 4) for r in runs],
        tasks=runs[0]["tasks"], partitions_per_task=runs[0]["partitions_per_task"], depth=runs[0]["depth"],
        bytes_between_workers=med([r["bytes_between_workers"] for r in runs]),
        stats_bytes_serialised=runs[0]["stats_bytes_serialised"],
        cpu={k: med([r["cpu"][k] for r in runs]) for k in runs[0]["cpu"]},
        peak_rss={k: med([r["peak_rss"].get(k, 0) for r in runs]) for k in ("client", "scheduler", "worker_max", "held_max")},
        loadavg=[round(r["loadavg"], 2) for r in runs], checksums_agree=len({r["checksum"] for r in runs}) == 1,
    )


def run(args) -> dict:
    import psutil

    results = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": dict(platform=platform.platform(), cores=os.cpu_count(),
                               memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
                               python=platform.python_version(), emflow=emflow.__version__),
               "setup": dict(workers=args.workers, threads_per_worker=1, rows_per_partition=ROWS_PER_PARTITION,
                             d_data=D_DATA, split_every=8, repeats=args.repeats),
               "m_step_seconds": {}, "load": {}, "cases": []}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        cluster = Cluster(args.workers, tmp)
        try:
            for cfg in args.configs:
                results["m_step_seconds"][cfg] = time_m_step(cfg)
                S = stats_bytes(cfg)
                modes = {"per-partition": Engine(cluster.client, partitions_per_task=1),
                         "auto": Engine(cluster.client)}
                loaded = {}
                for P in args.sizes:
                    X = np.random.default_rng(P).normal(size=(P * ROWS_PER_PARTITION, D_DATA))
                    rows = _data.open_rows(X, partition_bytes=ROWS_PER_PARTITION * D_DATA * 8)
                    assert len(rows.loaders) == P
                    t0 = time.perf_counter()
                    loaded[P] = modes["auto"].load(rows, persist=True)
                    results["load"][f"{cfg}-P{P}"] = dict(seconds=time.perf_counter() - t0,
                                                          loadavg=os.getloadavg()[0])
                    print(f"{cfg} P={P}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
                params = fake_params(cfg)
                runs = {}
                for r in range(args.repeats):
                    for P in args.sizes:
                        for mode, engine in modes.items():
                            if mode == "per-partition" and (P * S > MAX_LEAF_BYTES or P > args.max_per_partition):
                                continue
                            if r >= args.repeats_large and P >= 10**5:
                                continue
                            out = one_iteration(cluster, engine, loaded[P], cfg, params)
                            runs.setdefault((P, mode), []).append(out)
                            print(f"{cfg} P={P} {mode} repeat {r}: {out['seconds']:.2f} s, {out['tasks']} tasks, "
                                  f"load {out['loadavg']:.2f}", flush=True)
                for (P, mode), rs in sorted(runs.items()):
                    results["cases"].append(dict(config=cfg, stats_bytes=S, partitions=P, mode=mode, **median_of(rs)))
                for ld in loaded.values():
                    ld.release()
                for e in modes.values():
                    e.close()
        finally:
            cluster.close()
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return results


def fit(cases: list[dict], cfg: str, mode: str, key) -> tuple[float, float]:
    """Least squares key(case) = a * P + b over the config's cases in that mode."""
    pts = [(c["partitions"], key(c)) for c in cases if c["config"] == cfg and c["mode"] == mode]
    if len(pts) < 2:
        return float("nan"), float("nan")
    P, y = np.array(pts, dtype=float).T
    a, b = np.polyfit(P, y, 1)
    return float(a), float(b)


# -- the model of a large cluster ---------------------------------------------------------

MODEL = dict(workers=100, threads_per_worker=16, rows=1e11, d=16, itemsize=8,
             partition_bytes=64 * 2**20, add_bytes_per_s=2e9, gflops_per_thread=20.0)


def _lsq(cases, target, cols) -> list[float]:
    """Least squares target(case) = sum_j coef_j * col_j(case) (non-negative: clipped at 0)."""
    A = np.array([[f(c) for f in cols] for c in cases], dtype=float)
    y = np.array([target(c) for c in cases], dtype=float)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return [max(0.0, float(x)) for x in coef]


def costs(results: dict) -> dict:
    """Per-task and per-partition CPU costs fitted over every case (both configs, both modes):
    scheduler CPU = a * tasks + b * partitions (a batch task depends on its partitions'
    resident data: the scheduler handles each dependency), client CPU likewise; worker CPU
    per statistics byte moved (serialise, send, add) and per task."""
    cs = results["cases"]
    T, P = (lambda c: c["tasks"]), (lambda c: c["partitions"])
    return dict(
        scheduler=_lsq(cs, lambda c: c["cpu"]["scheduler"], [T, P]),
        client=_lsq(cs, lambda c: c["cpu"]["client"], [T, P]),
        workers=_lsq(cs, lambda c: c["cpu"]["workers"], [T, P, lambda c: c["partitions"] * c["stats_bytes"]]),
    )


def model(results: dict) -> list[dict]:
    """Seconds per iteration of the engine's work on MODEL's cluster, per config and mode."""
    from emflow.execution.engine import BATCH_MIN_TASKS, TASKS_PER_THREAD, _batch_width, _reduce_tasks

    k = costs(results)
    M = MODEL
    threads = M["workers"] * M["threads_per_worker"]
    P = int(np.ceil(M["rows"] * M["d"] * M["itemsize"] / M["partition_bytes"]))
    out = []
    for cfg in CONFIGS:
        S = stats_bytes(cfg)
        K, d, _ = CONFIGS[cfg]
        for mode in ("per-partition", "auto"):
            width = 1 if mode == "per-partition" else _batch_width(P, max(BATCH_MIN_TASKS, TASKS_PER_THREAD * threads), 8)[0]
            maps = -(-P // width)
            tasks = maps + _reduce_tasks(maps, 8)
            sched = k["scheduler"][0] * tasks + k["scheduler"][1] * P
            client = k["client"][0] * tasks + k["client"][1] * P
            # worker side, spread over the cluster's threads: the per-task cost and adding P bundles
            work = (k["workers"][0] * tasks + k["workers"][1] * P + k["workers"][2] * P * S) / threads
            m_step = results["m_step_seconds"].get(cfg, float("nan"))
            # the E-step's arithmetic on these data (d=16) at K=16, full covariances
            e_step = 4.0 * M["rows"] * 16 * (M["d"] + 1) * (M["d"] + 2) / 2 / (threads * M["gflops_per_thread"] * 1e9)
            parts = dict(scheduler=sched, client=client, workers=work, m_step=m_step)
            out.append(dict(config=cfg, mode=mode, partitions=P, partitions_per_task=width, tasks=tasks,
                            stats_bytes_moved=tasks * S, **{f"{n}_s": v for n, v in parts.items()},
                            engine_s=max(sched, client, work) + m_step, bottleneck=max(parts, key=parts.get),
                            e_step_compute_s=e_step))
    return out


def _h(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{b:.0f} B"


def report(results: dict, path: str) -> None:
    cs = sorted(results["cases"], key=lambda c: (c["config"], c["partitions"], c["mode"] != "per-partition"))
    L = ["# The engine at scale: per-iteration overhead as partitions multiply", "",
         f"`{results.get('command', 'python benchmarks/bench_scale.py').strip()}` ({results['started']} to "
         f"{results.get('finished', '?')}; {results['machine']['cores']} cores, {results['machine']['memory_gb']} GB, "
         "shared with other work: the load average is recorded beside each figure).", "",
         f"A `dask scheduler` process and {results['setup']['workers']} single-threaded `dask worker` processes; "
         f"{results['setup']['rows_per_partition']} rows of {results['setup']['d_data']} float64 values per "
         "partition, in worker memory, so an iteration costs the engine's work only: submitting, scheduling, "
         "moving and adding the statistics (split_every 8), the result to the client. Seconds are medians "
         "over the repeats; CPU seconds are per iteration, per process.", "",
         "| stats | partitions | mode | tasks | s / iter | scheduler CPU s | client CPU s | workers CPU s "
         "| sent between workers | stats serialised | peak RSS client / scheduler / worker | held on a worker | load avg |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        r = c["peak_rss"]
        L.append(f"| {c['config']} ({_h(c['stats_bytes'])}) | {c['partitions']:,} | {c['mode']}"
                 f"{'' if c['partitions_per_task'] == 1 else ' (' + str(c['partitions_per_task']) + '/task)'} "
                 f"| {c['tasks']:,} | {c['seconds']:.2f} | {c['cpu']['scheduler']:.2f} | {c['cpu']['client']:.2f} "
                 f"| {c['cpu']['workers']:.2f} | {_h(c['bytes_between_workers'])} | {_h(c['stats_bytes_serialised'])} "
                 f"| {_h(r['client'])} / {_h(r['scheduler'])} / {_h(r['worker_max'])} | {_h(r.get('held_max', 0))} "
                 f"| {', '.join(f'{x:.1f}' for x in c['loadavg'])} |")
    L += ["", "Loading (scatter of the in-memory partitions and the scan; once per fit): " + ", ".join(
        f"{k} {v['seconds']:.1f} s" for k, v in results["load"].items()) + ".", "",
        "M-step on the client (`emflow.models.gmm.m_step`, full covariances, at the K and d named): " + ", ".join(
        f"{k} {v * 1e3:.0f} ms" for k, v in results["m_step_seconds"].items()) + ".", ""]
    k = costs(results)
    L += ["## Fitted costs (least squares over every case above)", "",
          f"* scheduler CPU = {k['scheduler'][0] * 1e3:.3f} ms x tasks + {k['scheduler'][1] * 1e6:.1f} us x partitions",
          f"* client CPU = {k['client'][0] * 1e3:.3f} ms x tasks + {k['client'][1] * 1e6:.1f} us x partitions",
          f"* workers CPU = {k['workers'][0] * 1e3:.3f} ms x tasks + {k['workers'][1] * 1e6:.1f} us x partitions + "
          f"{k['workers'][2] * 1e9:.2f} s per GB of statistics produced",
          "", "These are CPU costs on 2 cores shared by ~10 busy processes; a dedicated scheduler core is "
          "usually 2-4x faster per task. The per-partition mode was not run where it would hold more than "
          f"{MAX_LEAF_BYTES / 1e9:.0f} GB of statistics or beyond {max([c['partitions'] for c in cs if c['mode'] == 'per-partition'] or [0]):,} "
          "partitions (minutes per iteration here): its figures there are the fit's.", ""]
    M = MODEL
    L += ["## A model: 100 workers fitting 10 TB (1e11 rows x 16)", "",
          f"{M['workers']} workers x {M['threads_per_worker']} threads, {M['rows']:.0e} rows x {M['d']} float64 "
          f"({M['rows'] * M['d'] * M['itemsize'] / 1e12:.1f} TB) in partitions of {M['partition_bytes'] >> 20} MiB "
          "(the default), the fitted costs above; the E-step's own arithmetic at "
          f"{M['gflops_per_thread']:.0f} GFLOP/s per thread (full GMM, K=16 on these 16 columns) is beside it for scale "
          "(reading the data from storage each iteration is not counted).", "",
          "| stats | mode | partitions | per task | tasks | statistics moved | scheduler s | client s "
          "| workers s (overhead) | M-step s | engine s / iter | bottleneck | E-step arithmetic s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in model(results):
        L.append(f"| {m['config']} | {m['mode']} | {m['partitions']:,} | {m['partitions_per_task']} | {m['tasks']:,} "
                 f"| {_h(m['stats_bytes_moved'])} | {m['scheduler_s']:.1f} | {m['client_s']:.1f} "
                 f"| {m['workers_s']:.2f} | {m['m_step_s']:.2f} | {m['engine_s']:.1f} | {m['bottleneck']} "
                 f"| {m['e_step_compute_s']:.1f} |")
    mod = {(m["config"], m["mode"]): m for m in model(results)}
    here = {(c["config"], c["partitions"], c["mode"]): c["seconds"] for c in cs}
    big = max((P for (cfg, P, mode) in here if cfg == "K16-d16" and mode == "per-partition"
               and ("K16-d16", P, "auto") in here), default=None)
    per, auto = mod[("K16-d16", "per-partition")], mod[("K16-d16", "auto")]
    dep = k["scheduler"][1] * per["partitions"]
    L += ["", "## What breaks first, and the fix", "",
          f"* **The scheduler, then the client, at one task per partition.** Every task costs the scheduler "
          f"{k['scheduler'][0] * 1e3:.1f} ms of CPU here and the client {k['client'][0] * 1e3:.1f} ms (submitting it); "
          f"at {per['partitions']:,} partitions that is {per['tasks']:,} tasks and {per['scheduler_s']:.0f} s of "
          "scheduler time per iteration, an order of magnitude more than the E-step's arithmetic. The fix, "
          "now the engine's default (`Engine(partitions_per_task=\"auto\")`): a pass of more than 512 partitions "
          "runs 8^j consecutive partitions per task and reduces them inside the task in the same tree (the "
          f"same bits), at most max(512, 4 x threads) map tasks: {auto['tasks']:,} tasks, "
          f"{auto['engine_s']:.0f} s per iteration on the modelled cluster"
          + (f"; here, at {big:,} partitions, {here[('K16-d16', big, 'per-partition')]:.1f} s became "
             f"{here[('K16-d16', big, 'auto')]:.1f} s." if big else "."),
          f"* **What is left is per partition:** with partitions resident in worker memory each is a "
          f"dependency the scheduler tracks ({k['scheduler'][1] * 1e6:.0f} us each here: {dep:.0f} s of the "
          f"{auto['scheduler_s']:.0f} s); streamed partitions (read from Zarr by the task) carry none. Larger "
          "partitions (partition_bytes) divide it; keeping resident data per batch rather than per partition "
          "would remove it (not done).",
          "* **Worker memory:** a pass held the future of every map task until it ended, so each worker "
          "kept one statistics bundle per partition it computed (P x size at once; measured before the fix, "
          "1,000 partitions of the 4.5 MB bundle: 2.7 GB held on one of the two workers, i.e. all it computed; "
          "45 GB at 1e4 partitions by the same count). Fixed: the pass holds only the root, and partial sums run before queued map "
          "tasks; the table's 'held on a worker' column is the scheduler's count after the fix.",
          "* **Bytes moved** are tasks x size(stats), so batching divides them too: statistics stay float64 "
          "sums of fixed size, and no compression is needed at these sizes "
          f"({_h(mod[('K256-d128', 'auto')]['stats_bytes_moved'])} per iteration over {M['workers']} workers "
          "for the 4.5 MB bundle).",
          "* **The client's memory** is flat in P (futures are small; the peak RSS above includes every loaded "
          "dataset and the interpreter). The M-step is the client's only real work, 0.1 s at these sizes.", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for cfg, color in zip(CONFIGS, ("tab:blue", "tab:red")):
        for mode, style in (("per-partition", "o--"), ("auto", "s-")):
            pts = sorted((c["partitions"], c["seconds"]) for c in results["cases"]
                         if c["config"] == cfg and c["mode"] == mode)
            if pts:
                P, s = zip(*pts)
                ax.loglog(P, s, style, color=color, label=f"{cfg} ({mode})")
    ax.set_xlabel("partitions")
    ax.set_ylabel("seconds per iteration (engine only)")
    ax.set_title("emflow engine overhead, 2 workers x 1 thread, 2 shared cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000, 100_000])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=2,
                    help="repeats at 1e5 partitions and more (each takes minutes)")
    ap.add_argument("--max-per-partition", type=int, default=10_000,
                    help="largest partition count run in the per-partition mode")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "scale-engine"))
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and the plot from results.json")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
    else:
        results = run(args)
        results["command"] = "python benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "overhead.png"))
    report(results, os.path.join(args.out, "RESULTS.md"))
    print(open(os.path.join(args.out, "RESULTS.md")).read())


if __name__ == "__main__":
    main()
