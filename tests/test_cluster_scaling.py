"""Several machines' worth of workers on one: separate ``dask worker`` processes, each with
its own memory limit and local directory, joined to an external ``dask scheduler`` by
address, as a user on a cluster starts them. Workers join and leave in the middle of a fit
(scale up, graceful retirement, a kill); workers without emflow, or with another version,
are refused on connect, and those joining later before the next pass.

Every process a test starts it stops, by pid (the ``proc_cluster`` fixture of
test_cluster_faults).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emflow
from emflow.execution.cluster import check_worker_versions, engine_for
from emflow.estimators.em import run_em
from emflow.execution.engine import Engine

from _faults import FaultAt, gmm_start
from test_cluster_faults import FAMILY, ITERS, ProcCluster, _data, proc_cluster  # noqa: F401 (fixture)

PARTITION_BYTES = 8000  # 500 rows x 2 float64: 16 partitions of the 8000-row dataset


def start_worker(cluster: ProcCluster, tmp_path: Path, name: str, *, memory: str = "512MiB",
                 pythonpath: Path | None = None) -> subprocess.Popen:
    """A ``dask worker`` process of its own (a 'machine'): its memory limit, its local directory."""
    local = tmp_path / f"{name}-local"
    local.mkdir()
    env = dict(cluster.env)
    if pythonpath is not None:  # its own environment, in front of the usual one
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env["PYTHONPATH"]])
    p = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", cluster.address, "--name", name,
         "--nthreads", "1", "--no-nanny", "--memory-limit", memory, "--local-directory", str(local),
         "--dashboard-address", ":0", "--death-timeout", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=local)  # `-m` puts the cwd first
    cluster.workers.append(p)
    cluster.all.append(p)
    return p


def wait_for(client, n: int, timeout: float = 60) -> dict:
    """The scheduler's workers, once exactly ``n`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if len(workers) == n:
            return workers
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(workers)} workers, not {n}, after {timeout} s")
        time.sleep(0.1)


def address_of(client, name: str) -> str:
    [addr] = [a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == name]
    return addr


@dataclass(frozen=True)
class Recording:
    """Wraps a family; each E-step appends the name of the worker that ran it to ``log``."""

    inner: Any
    log: str

    def e_step(self, X, w, params):
        from distributed import get_worker

        with open(self.log, "a") as f:
            f.write(get_worker().name + "\n")
        return self.inner.e_step(X, w, params)

    def m_step(self, stats, params):
        return self.inner.m_step(stats, params)

    def objective(self, stats):
        return self.inner.objective(stats)


@dataclass(frozen=True)
class KillSelf(FaultAt):
    """At the n-th E-step call (over the cluster), SIGKILL the worker running it."""

    def fault(self):
        os.kill(os.getpid(), signal.SIGKILL)


def per_pass(log: Path) -> list[list[str]]:
    """Worker names of the E-steps of each pass (the client writes '--' after each iteration)."""
    passes = [[]]
    for line in log.read_text().split("\n"):
        if line == "--":
            passes.append([])
        elif line:
            passes[-1].append(line)
    return passes[:-1] if not passes[-1] else passes


def marker(log: Path, then=None):
    """An EM callback: marks the end of each iteration in ``log``, then runs ``then(iteration)``."""

    def cb(event):
        with open(log, "a") as f:
            f.write("--\n")
        if then is not None:
            then(event.iteration)

    return cb


def reference(data, iters: int = ITERS):
    """The undisturbed fit: in-process, the same 16 partitions."""
    engine = Engine(None, n_threads=2)
    try:
        loaded = engine.open(data, persist=False, partition_bytes=PARTITION_BYTES)
        return run_em(engine, loaded, FAMILY, gmm_start(3, 2), tol=0.0, max_iter=iters)
    finally:
        engine.close()


def assert_same_fit(hit, ref):
    np.testing.assert_allclose(hit.history, ref.history, rtol=1e-10)
    np.testing.assert_allclose(hit.params.means, ref.params.means, rtol=1e-10)
    np.testing.assert_allclose(hit.params.covariances, ref.params.covariances, rtol=1e-10)


# -- workers joining and leaving mid-fit -------------------------------------------------

@pytest.mark.parametrize("source", ["zarr", "numpy"])
def test_a_worker_started_mid_fit_gets_e_steps_and_the_fit_is_unchanged(tmp_path, proc_cluster, source):
    """One worker ('machine' a, 512 MiB, its own directory) on an external scheduler; after
    iteration 2 a second one (b, 768 MiB) joins: it runs E-steps of the later passes, and
    the fit equals the undisturbed one."""
    data = _data(tmp_path, source)
    ref = reference(data)
    cluster = proc_cluster()
    start_worker(cluster, tmp_path, "a", memory="512MiB")
    client = cluster.client(1)
    log = tmp_path / "who"

    def join(iteration):
        if iteration == 2:
            start_worker(cluster, tmp_path, "b", memory="768MiB")
            wait_for(client, 2)

    try:
        with engine_for(client) as engine:
            loaded = engine.open(data, persist=False, partition_bytes=PARTITION_BYTES)
            assert len(loaded.handles) == 16
            hit = run_em(engine, loaded, Recording(FAMILY, str(log)), gmm_start(3, 2), tol=0.0, max_iter=ITERS,
                         callbacks=[marker(log, join)])
            workers = client.scheduler_info(n_workers=-1)["workers"]
            checked = set(engine.checked_workers)
        loaded.release()
    finally:
        client.close(timeout=5)
    # each its own machine: memory limit and local directory as given
    by_name = {w["name"]: w for w in workers.values()}
    assert by_name["a"]["memory_limit"] == 512 * 2**20 and by_name["b"]["memory_limit"] == 768 * 2**20
    assert by_name["a"]["local_directory"].startswith(str(tmp_path / "a-local"))
    assert by_name["b"]["local_directory"].startswith(str(tmp_path / "b-local"))
    assert checked == set(workers)  # the newcomer's emflow was checked before it got work
    passes = per_pass(log)
    assert len(passes) == ITERS
    assert all(set(p) == {"a"} for p in passes[:2]), passes[:2]
    later = [n for p in passes[2:] for n in p]
    assert later.count("b") >= 4, passes[2:]  # the new worker ran E-steps of the later passes
    assert_same_fit(hit, ref)


@pytest.mark.parametrize("source", ["zarr", "numpy"])
def test_workers_retired_and_killed_mid_fit_the_fit_goes_on(tmp_path, proc_cluster, source):
    """Three workers; after iteration 1 one is retired gracefully (``retire_workers``: its
    data move to the others, it exits), and in the middle of pass 3 another is SIGKILLed:
    the fit finishes on the last one with the undisturbed result."""
    data = _data(tmp_path, source)
    ref = reference(data)
    cluster = proc_cluster()
    procs = {n: start_worker(cluster, tmp_path, n) for n in "abc"}
    client = cluster.client(3)
    wait_for(client, 3)
    log = tmp_path / "who"
    killer = KillSelf(FAMILY, str(tmp_path / "calls"), at_call=2 * 16 + 4)

    def retire(iteration):
        if iteration == 1:
            client.retire_workers(workers=[address_of(client, "a")], close_workers=True)
            wait_for(client, 2)

    try:
        with engine_for(client) as engine:
            loaded = engine.open(data, persist=False, partition_bytes=PARTITION_BYTES)
            hit = run_em(engine, loaded, Recording(killer, str(log)), gmm_start(3, 2), tol=0.0, max_iter=ITERS,
                         callbacks=[marker(log, retire)])
        loaded.release()
        left = client.scheduler_info(n_workers=-1)["workers"]
    finally:
        client.close(timeout=5)
    assert procs["a"].wait(timeout=30) == 0  # retired: a clean exit
    killed = [n for n in "bc" if procs[n].poll() == -signal.SIGKILL]
    assert len(killed) == 1 and len(left) == 1, (killed, left)
    passes = per_pass(log)
    assert "a" not in {n for p in passes[1:] for n in p}  # no work for the retired worker
    assert set(passes[-1]) == {w["name"] for w in left.values()}  # the survivor did the last passes
    assert_same_fit(hit, ref)


def test_every_worker_stopped_mid_fit_is_a_clear_error_after_the_wait_and_the_checkpoint_stays(tmp_path, proc_cluster):
    """Both workers stopped with SIGTERM after iteration 2 (what a batch system sends at the
    end of a job; the worker closes itself cleanly) and none started: the next pass
    waits emflow.worker-wait-timeout (2 s), then a ClusterError says what to do; the
    checkpoint of iteration 2 is intact and equals the undisturbed fit's."""
    import dask

    from emflow.storage.checkpoint import CheckpointWriter, read_checkpoint

    data = _data(tmp_path, "zarr")
    ref = reference(data)
    cluster = proc_cluster()
    procs = [start_worker(cluster, tmp_path, n) for n in "ab"]
    client = cluster.client(2)
    wait_for(client, 2)
    ckpt = tmp_path / "fit.checkpoint.npz"

    def stop_all(event):
        # (retire_workers of every worker may refuse: data they hold would have nowhere to go)
        if event.iteration == 2:
            for p in procs:
                p.terminate()
            wait_for(client, 0)

    try:
        with dask.config.set({"emflow.worker-wait-timeout": "2s"}), engine_for(client) as engine:
            loaded = engine.open(data, persist=False, partition_bytes=PARTITION_BYTES)
            t0 = time.monotonic()
            with pytest.warns(emflow.ClusterWarning, match="waiting up to 2 s for workers to join"), \
                    pytest.raises(emflow.ClusterError) as err:
                run_em(engine, loaded, FAMILY, gmm_start(3, 2), tol=0.0, max_iter=ITERS,
                       callbacks=[CheckpointWriter(ckpt, fingerprint="f", config_hash="c"), stop_all])
            waited = time.monotonic() - t0
    finally:
        client.close(timeout=5)
    assert all(p.wait(timeout=30) is not None for p in procs)
    assert str(err.value) == (
        f"All 2 Dask workers were lost before a pass over the data and none joined the scheduler at "
        f"{cluster.address} within 2 s (the scheduler is still up). Start workers on that scheduler "
        f"(`dask worker {cluster.address}`), or allow them longer with the Dask config key "
        "emflow.worker-wait-timeout, and run the same command again: checkpoints already written are intact.")
    assert waited < 30
    ck = read_checkpoint(ckpt)
    assert ck.iteration == 2
    np.testing.assert_allclose(ck.history, ref.history[:2], rtol=1e-10)
    np.testing.assert_allclose(ck.params.means, reference(data, iters=2).params.means, rtol=1e-10)


# -- the emflow the workers import ------------------------------------------------------

def fake_emflow(tmp_path: Path, body: str) -> Path:
    """A directory holding an ``emflow`` package whose ``__init__`` is ``body``."""
    root = tmp_path / "fake-env"
    (root / "emflow").mkdir(parents=True)
    (root / "emflow" / "__init__.py").write_text(body)
    return root


def no_emflow(tmp_path: Path) -> Path:
    """A directory whose ``sitecustomize`` makes ``import emflow`` fail as in an image without it."""
    root = tmp_path / "no-emflow-env"
    root.mkdir()
    (root / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoEmflow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'emflow' or name.startswith('emflow.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoEmflow())\n")
    return root


def test_workers_with_another_emflow_or_none_are_refused_on_connect(tmp_path, proc_cluster):
    """Three workers: one with this emflow, one with emflow 9.9.9, one that cannot import
    emflow. Connecting by address (and by a Client) is a ClusterError naming the two, the
    versions and what to do, before anything runs; the estimators say the same."""
    cluster = proc_cluster()
    start_worker(cluster, tmp_path, "good")
    start_worker(cluster, tmp_path, "other", pythonpath=fake_emflow(tmp_path, "__version__ = '9.9.9'\n"))
    start_worker(cluster, tmp_path, "bare", pythonpath=no_emflow(tmp_path))
    client = cluster.client(3)
    try:
        other, bare = address_of(client, "other"), address_of(client, "bare")
        v = emflow.__version__
        expected = (
            f"2 of the 3 Dask workers at {cluster.address} cannot run this emflow {v} (the client's): "
            f"{bare} cannot import emflow (ModuleNotFoundError: No module named 'emflow'); "
            f"{other} has emflow 9.9.9 ({tmp_path / 'fake-env' / 'emflow' / '__init__.py'}). Nothing was run. "
            f"Install the same emflow in the workers' environment (the worker image, or the environment "
            f"`dask worker` runs in: `pip install emflow=={v}`) and restart them.")
        if bare > other:  # listed by address
            expected = expected.replace(
                f"{bare} cannot import emflow (ModuleNotFoundError: No module named 'emflow'); "
                f"{other} has emflow 9.9.9 ({tmp_path / 'fake-env' / 'emflow' / '__init__.py'})",
                f"{other} has emflow 9.9.9 ({tmp_path / 'fake-env' / 'emflow' / '__init__.py'}); "
                f"{bare} cannot import emflow (ModuleNotFoundError: No module named 'emflow')")
        for scheduler in (cluster.address, client):
            with pytest.raises(emflow.ClusterError) as err:
                with engine_for(scheduler):
                    pytest.fail("an engine on workers that cannot run emflow")
            assert str(err.value) == expected
        X = np.random.default_rng(0).normal(size=(400, 2))
        with pytest.raises(emflow.ClusterError, match="cannot run this emflow"):
            emflow.GaussianMixture(2, max_iter=2, scheduler=cluster.address).fit(X)
        assert client.run(lambda: 1, workers=[other, bare]) == {other: 1, bare: 1}  # nothing crashed them
        # the good worker alone passes, and the check is quick
        t0 = time.perf_counter()
        assert check_worker_versions(client, [address_of(client, "good")]) == [address_of(client, "good")]
        assert time.perf_counter() - t0 < 2
    finally:
        client.close(timeout=5)


def test_a_broken_emflow_joining_before_the_data_are_loaded_is_refused(tmp_path, proc_cluster):
    """Connected to one good worker; a second joins whose ``emflow`` raises ImportError on
    import (a broken install) before the data are opened: the scan of the data does not
    start (a ClusterError naming the worker and its error)."""
    data = _data(tmp_path, "zarr")
    cluster = proc_cluster()
    start_worker(cluster, tmp_path, "good")
    client = cluster.client(1)
    try:
        with engine_for(client) as engine:
            start_worker(cluster, tmp_path, "broken", pythonpath=fake_emflow(
                tmp_path, "raise ImportError('emflow is broken here: numpy missing')\n"))
            wait_for(client, 2)
            broken = address_of(client, "broken")
            with pytest.raises(emflow.ClusterError) as err:
                engine.open(data, persist=False, partition_bytes=PARTITION_BYTES)
    finally:
        client.close(timeout=5)
    assert str(err.value).startswith(
        f"The Dask worker at {cluster.address} that joined the scheduler during the fit cannot run this emflow "
        f"{emflow.__version__} (the client's): {broken} cannot import emflow (ImportError: emflow is broken here: "
        "numpy missing). Checkpoints already written are intact")


@pytest.mark.parametrize("env", ["9.9.9", pytest.param("none", marks=pytest.mark.slow)])
def test_a_worker_of_another_version_joining_mid_fit_stops_it_before_the_next_pass(tmp_path, proc_cluster, env):
    """A worker with emflow 9.9.9 (or none) joins after iteration 2: the next pass does not
    start (a ClusterError naming it, it ran nothing) and the checkpoint of iteration 2 is intact."""
    from emflow.storage.checkpoint import CheckpointWriter, read_checkpoint

    data = _data(tmp_path, "zarr")
    ref = reference(data)
    cluster = proc_cluster()
    start_worker(cluster, tmp_path, "a")
    client = cluster.client(1)
    log = tmp_path / "who"
    ckpt = tmp_path / "fit.checkpoint.npz"
    fake = fake_emflow(tmp_path, "__version__ = '9.9.9'\n") if env == "9.9.9" else no_emflow(tmp_path)

    def join(iteration):
        if iteration == 2:
            start_worker(cluster, tmp_path, "other", pythonpath=fake)
            wait_for(client, 2)

    try:
        with engine_for(cluster.address) as engine:
            loaded = engine.open(data, persist=False, partition_bytes=PARTITION_BYTES)
            with pytest.raises(emflow.ClusterError) as err:
                run_em(engine, loaded, Recording(FAMILY, str(log)), gmm_start(3, 2), tol=0.0, max_iter=ITERS,
                       callbacks=[CheckpointWriter(ckpt, fingerprint="f", config_hash="c"), marker(log, join)])
            other = address_of(engine.client, "other")
    finally:
        client.close(timeout=5)
    why = (f"has emflow 9.9.9 ({fake / 'emflow' / '__init__.py'})" if env == "9.9.9" else
           "cannot import emflow (ModuleNotFoundError: No module named 'emflow')")
    assert str(err.value) == (
        f"The Dask worker at {cluster.address} that joined the scheduler during the fit cannot run this emflow "
        f"{emflow.__version__} (the client's): {other} {why}. "
        f"Checkpoints already written are intact: stop those workers, or restart them with emflow "
        f"{emflow.__version__} installed, and run the same command again to resume.")
    assert per_pass(log) == [["a"] * 16] * 2  # the third pass never started
    ck = read_checkpoint(ckpt)
    assert ck.iteration == 2
    np.testing.assert_allclose(ck.history, ref.history[:2], rtol=1e-10)


@dataclass(frozen=True)
class StartWorkerAt(FaultAt):
    """At the n-th E-step call, start the worker process ``argv`` (its pid written to
    ``pidfile``) and keep this task busy for ``hold`` seconds: it joins mid-pass."""

    argv: tuple = ()
    env: tuple = ()
    pidfile: str = ""
    hold: float = 10.0

    def fault(self):
        p = subprocess.Popen(list(self.argv), env=dict(self.env), cwd=os.path.dirname(self.pidfile),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        Path(self.pidfile).write_text(str(p.pid))
        time.sleep(self.hold)


@pytest.mark.slow
@pytest.mark.parametrize("nanny", [False, True])
def test_a_worker_without_emflow_joining_mid_pass_is_no_hang_and_no_wrong_answer(tmp_path, proc_cluster, nanny):
    """A worker that cannot import emflow joins in the middle of pass 3 (started by the
    running E-step, which holds the only other worker meanwhile). Either it is seen there
    (a ClusterError naming it, while the pass runs) or it crashes on the first task it is
    given (it cannot unpickle emflow's functions) and leaves, and the fit ends with the
    undisturbed result; never a hang, a bare ModuleNotFoundError or another answer."""
    import threading

    data = _data(tmp_path, "zarr")
    ref = reference(data)
    cluster = proc_cluster()
    start_worker(cluster, tmp_path, "a")
    client = cluster.client(1)
    log = tmp_path / "who"
    (tmp_path / "bare-local").mkdir()
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join([str(no_emflow(tmp_path)), cluster.env["PYTHONPATH"]])}
    argv = (sys.executable, "-m", "distributed.cli.dask_worker", cluster.address, "--name", "bare", "--nthreads",
            "1", "--nanny" if nanny else "--no-nanny", "--local-directory", str(tmp_path / "bare-local"),
            "--dashboard-address", ":0")
    pidfile = tmp_path / "bare-local" / "pid"
    starter = StartWorkerAt(FAMILY, str(tmp_path / "calls"), at_call=2 * 16 + 2, argv=argv,
                            env=tuple(env.items()), pidfile=str(pidfile), hold=6.0)

    def stop_bare():
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except OSError:
                pass

    safety = threading.Timer(90, stop_bare)  # a hang ends, and fails the test below
    safety.start()
    t0 = time.monotonic()
    try:
        with engine_for(client) as engine:
            loaded = engine.open(data, persist=False, partition_bytes=PARTITION_BYTES)
            try:
                hit = run_em(engine, loaded, Recording(starter, str(log)), gmm_start(3, 2), tol=0.0,
                             max_iter=ITERS, callbacks=[marker(log)])
                err = None
            except emflow.ClusterError as exc:
                hit, err, third = None, exc, per_pass(log)[2]
    finally:
        safety.cancel()
        client.close(timeout=5)
        stop_bare()
    assert time.monotonic() - t0 < 80
    assert pidfile.exists()  # the newcomer was started
    if err is None:
        assert "bare" not in {n for p in per_pass(log) for n in p}
        assert_same_fit(hit, ref)
    else:
        assert len(third) < 16, third  # raised while the third pass was running
        assert re.fullmatch(
            f"The Dask worker at {re.escape(cluster.address)} that joined the scheduler during the fit cannot run "
            rf"this emflow {re.escape(emflow.__version__)} \(the client's\): tcp://127\.0\.0\.1:\d+ cannot import "
            r"emflow \(ModuleNotFoundError: No module named 'emflow'\)\. Checkpoints already written are intact: "
            ".*", str(err)), str(err)
