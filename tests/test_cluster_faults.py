"""Faults that must not end a fit that could go on: every worker lost (and new ones joining
the same scheduler), a hung (SIGSTOPped) worker; and those that must end it clearly.

Each test runs its own scheduler and worker processes (``--no-nanny``: a killed worker
stays dead until the test starts another) and stops every one of them by pid.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pytest

import emflow
from emflow.estimators.em import run_em
from emflow.execution.engine import Engine
from emflow.estimators.mixture import GMMFamily
from emflow.storage.synthetic import write_gmm

from _faults import FaultAt, gmm_start

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProcCluster:
    """A scheduler and worker processes started (and stopped, by pid) by a test."""

    def __init__(self):
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        # workers unpickle the test's family classes: they import this module by name
        path = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
        self.env = {**os.environ, "PYTHONPATH": path}
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", self.address.rsplit(":", 1)[1], "--dashboard-address", ":0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        self.workers: list[subprocess.Popen] = []
        self.all: list[subprocess.Popen] = [self.scheduler]

    def start_workers(self, n: int) -> list[subprocess.Popen]:
        new = [subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--nthreads", "1",
             "--no-nanny", "--dashboard-address", ":0", "--death-timeout", "60"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env) for _ in range(n)]
        self.workers += new
        self.all += new
        return new

    def wait_listening(self, timeout: float = 90.0) -> None:
        """Until the scheduler accepts connections (a loaded machine takes seconds to start it)."""
        host, port = self.address.removeprefix("tcp://").rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"the test's scheduler exited with {self.scheduler.returncode}")
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def client(self, n_workers: int):
        from distributed import Client

        self.wait_listening()
        client = Client(self.address, timeout=30)
        client.wait_for_workers(n_workers, timeout=60)
        return client

    def close(self):
        for p in self.all:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                except OSError:
                    pass
            p.wait()


@pytest.fixture
def proc_cluster():
    started = []

    def start():
        c = ProcCluster()
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


@dataclass(frozen=True)
class KillAllWorkers(FaultAt):
    """At the n-th E-step call (counted across the cluster), SIGKILL every worker process
    listed in the file ``pids`` (its own last)."""

    pids: str = ""

    def fault(self):
        me = os.getpid()
        for pid in [int(p) for p in Path(self.pids).read_text().split()]:
            if pid != me:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        os.kill(me, signal.SIGKILL)


@dataclass(frozen=True)
class StopOnce(FaultAt):
    """At the n-th E-step call, SIGSTOP its own worker after writing the worker's address to
    the file ``who``."""

    who: str = ""

    def fault(self):
        from distributed import get_worker

        Path(self.who).write_text(get_worker().address)
        os.kill(os.getpid(), signal.SIGSTOP)




FAMILY = GMMFamily("full", 1e-6)
ITERS = 5


def _data(tmp_path, source):
    data = write_gmm(tmp_path / "d.zarr", 8000, 3, 2, seed=4, chunk_rows=500)
    if source == "numpy":
        import zarr

        return zarr.open_group(data, mode="r")["X"][...]
    return data


def _reference(data):
    """The undisturbed fit, in-process with the cluster's two threads (same partitions,
    same reduction tree)."""
    engine = Engine(None, n_threads=2)
    try:
        loaded = engine.open(data, persist=False)
        return run_em(engine, loaded, FAMILY, gmm_start(3, 2), tol=0.0, max_iter=ITERS), len(loaded.handles)
    finally:
        engine.close()


class OnLog(logging.Handler):
    """Runs ``action`` once, when a record on the ``emflow`` logger contains ``text``: the
    operator who reads the warning and acts on it."""

    def __init__(self, text: str, action):
        super().__init__(logging.WARNING)
        self.text, self.action, self.records = text, action, []

    def emit(self, record):
        self.records.append(record.getMessage())
        if self.action is not None and self.text in record.getMessage():
            action, self.action = self.action, None
            action()

    def __enter__(self):
        log = logging.getLogger("emflow")
        self._level = log.level
        log.addHandler(self)
        log.setLevel(min(log.getEffectiveLevel(), logging.WARNING))
        return self

    def __exit__(self, *exc):
        log = logging.getLogger("emflow")
        log.removeHandler(self)
        log.setLevel(self._level)


@pytest.mark.parametrize("source", ["zarr", "numpy"])
def test_every_worker_killed_and_new_ones_join(tmp_path, proc_cluster, source):
    """Every worker SIGKILLed in the middle of a pass, two new ones started on the same
    scheduler: a ClusterWarning says so, the pass is repeated, the result is the undisturbed one."""
    data = _data(tmp_path, source)
    ref, n_parts = _reference(data)
    cluster = proc_cluster()
    old = cluster.start_workers(2)
    client = cluster.client(2)
    (tmp_path / "pids").write_text(" ".join(str(p) for p in client.run(os.getpid).values()))
    killer = KillAllWorkers(FAMILY, str(tmp_path / "calls"), at_call=2 * n_parts + 3, pids=str(tmp_path / "pids"))
    # a dead worker the scheduler still lists for a moment: do not try to reach it for 30 s
    with dask.config.set({"emflow.worker-wait-timeout": 60, "distributed.comm.timeouts.connect": "3s"}), \
            OnLog("workers were lost", lambda: cluster.start_workers(1)) as log:
        try:
            engine = Engine(client)
            loaded = engine.open(data, persist=False)
            assert len(loaded.handles) == n_parts
            with pytest.warns(emflow.ClusterWarning, match=r"All 2 Dask workers were lost during a pass over the data "
                              r"\(the scheduler at tcp://127\.0\.0\.1:\d+ is still up\); waiting up to 60 s") as rec:
                hit = run_em(engine, loaded, killer, gmm_start(3, 2), tol=0.0, max_iter=ITERS)
            loaded.release()
        finally:
            client.close(timeout=5)
    assert any("worker(s) joined the scheduler" in m for m in log.records)
    resent = [str(w.message) for w in rec if "of the in-memory data; sending them again" in str(w.message)]
    assert bool(resent) == (source == "numpy"), resent  # scattered partitions went with the workers
    assert all(p.poll() is not None for p in old)  # the kill happened
    assert os.path.getsize(tmp_path / "calls") > 2 * n_parts + 3  # and work went on after it
    np.testing.assert_allclose(hit.history, ref.history, rtol=1e-10)
    np.testing.assert_allclose(hit.params.means, ref.params.means, rtol=1e-10)
    np.testing.assert_allclose(hit.params.covariances, ref.params.covariances, rtol=1e-10)


def test_every_worker_killed_and_none_joins_is_a_clear_error(tmp_path, proc_cluster):
    """Every worker killed mid-pass and none started: a ClusterError once the wait is over
    (not a hang, and not 'Lost the Dask scheduler')."""
    data = _data(tmp_path, "zarr")
    cluster = proc_cluster()
    cluster.start_workers(2)
    client = cluster.client(2)
    (tmp_path / "pids").write_text(" ".join(str(p) for p in client.run(os.getpid).values()))
    try:
        with dask.config.set({"emflow.worker-wait-timeout": "2s"}):
            engine = Engine(client)
            loaded = engine.open(data, persist=False)
            killer = KillAllWorkers(FAMILY, str(tmp_path / "calls"), at_call=len(loaded.handles) + 3,
                                    pids=str(tmp_path / "pids"))
            t0 = time.monotonic()
            with pytest.warns(emflow.ClusterWarning, match="waiting up to 2 s for workers to join"), \
                    pytest.raises(emflow.ClusterError) as err:
                run_em(engine, loaded, killer, gmm_start(3, 2), tol=0.0, max_iter=ITERS)
            waited = time.monotonic() - t0
    finally:
        client.close(timeout=5)
    msg = str(err.value)
    assert f"All 2 Dask workers were lost during a pass over the data and none joined the scheduler at " \
           f"{cluster.address} within 2 s (the scheduler is still up)" in msg
    assert f"`dask worker {cluster.address}`" in msg and "emflow.worker-wait-timeout" in msg
    assert "Lost the Dask scheduler" not in msg
    assert waited < 2 + 15


@dataclass(frozen=True)
class KillScheduler(FaultAt):
    """At the n-th E-step call, SIGKILL the scheduler process ``pid``."""

    pid: int = 0

    def fault(self):
        os.kill(self.pid, signal.SIGKILL)


def test_scheduler_killed_mid_pass_names_it_and_keeps_the_checkpoint(tmp_path, proc_cluster):
    """The scheduler SIGKILLed in the middle of the third pass: a ClusterError naming its
    address at once (not a wait for workers), and the checkpoint of iteration 2 intact."""
    from emflow.storage.checkpoint import CheckpointWriter, read_checkpoint

    data = _data(tmp_path, "zarr")
    ref, n_parts = _reference(data)
    cluster = proc_cluster()
    cluster.start_workers(2)
    client = cluster.client(2)
    ckpt = tmp_path / "fit.checkpoint.npz"
    writer = CheckpointWriter(ckpt, fingerprint="f", config_hash="c")
    killer = KillScheduler(FAMILY, str(tmp_path / "calls"), at_call=2 * n_parts + 3, pid=cluster.scheduler.pid)
    try:
        with dask.config.set({"emflow.worker-wait-timeout": 60}), warnings.catch_warnings():
            warnings.simplefilter("error", emflow.ClusterWarning)  # no "waiting for workers"
            engine = Engine(client)
            loaded = engine.open(data, persist=False)
            t0 = time.monotonic()
            with pytest.raises(emflow.ClusterError, match=r"Lost the Dask scheduler at "
                               + cluster.address.replace(".", r"\.") + " during a pass over the data"):
                run_em(engine, loaded, killer, gmm_start(3, 2), tol=0.0, max_iter=ITERS, callbacks=[writer])
            assert time.monotonic() - t0 < 30
    finally:
        client.close(timeout=5)
    ck = read_checkpoint(ckpt)
    assert ck.iteration == 2
    np.testing.assert_allclose(ck.history, ref.history[:2], rtol=1e-10)


def _fit_until_stall_warning(client, data, stopper, resume):
    """A streamed fit whose family ``stopper`` hangs part of the cluster; ``resume`` (called
    when the stall warning is logged, and after 60 s at the latest, so that a missing warning
    fails rather than hangs) lets it go on. Returns the EM result, the ClusterWarning texts and
    the emflow log records."""
    safety = threading.Timer(60, resume)
    safety.start()
    try:
        with dask.config.set({"emflow.stall-factor": 3, "emflow.stall-floor": "1s"}), \
                OnLog("has taken", resume) as log, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", emflow.ClusterWarning)
            engine = Engine(client)
            loaded = engine.open(data, persist=False)
            hit = run_em(engine, loaded, stopper, gmm_start(3, 2), tol=0.0, max_iter=ITERS)
    finally:
        safety.cancel()
        resume()
        client.close(timeout=5)
    return hit, [str(w.message) for w in caught if issubclass(w.category, emflow.ClusterWarning)], log


def test_hung_worker_is_reported_and_the_fit_goes_on(tmp_path, proc_cluster):
    """A worker SIGSTOPped in the middle of a pass: once the pass has run far longer than
    the usual, one warning (ClusterWarning and the emflow logger) names the worker holding
    the unfinished task; the fit waits on, and finishes when the worker is continued."""
    data = _data(tmp_path, "zarr")
    ref, n_parts = _reference(data)
    cluster = proc_cluster()
    workers = cluster.start_workers(2)
    client = cluster.client(2)
    stopper = StopOnce(FAMILY, str(tmp_path / "calls"), at_call=2 * n_parts + 3, who=str(tmp_path / "who"))

    def resume():
        for p in workers:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)

    hit, stalls, log = _fit_until_stall_warning(client, data, stopper, resume)
    stopped = (tmp_path / "who").read_text()
    assert len(stalls) == 1, stalls
    assert stalls == [m for m in log.records if "has taken" in m]  # the same text on the emflow logger
    assert re.fullmatch(
        r"A pass over the data has taken \d+\.\d+ s so far, against a usual \d+\.\d+ s \(median of the previous "
        r"passes\)\. Its unfinished tasks are held by worker " + re.escape(stopped) + r" \(\d+ tasks?\): a hung "
        r"worker \(stopped with SIGSTOP, swapping\) or an overloaded cluster are likely\. Still waiting: the fit "
        r"goes on when they finish\.", stalls[0]), stalls[0]
    np.testing.assert_allclose(hit.history, ref.history, rtol=1e-10)
    np.testing.assert_allclose(hit.params.means, ref.params.means, rtol=1e-10)


@pytest.mark.parametrize("key,value,message", [
    ("emflow.worker-wait-timeout", "soon", r"emflow\.worker-wait-timeout must be a duration \(seconds, or a string "
                                           r"such as '5 minutes'\), got 'soon'"),
    ("emflow.worker-wait-timeout", 0, r"emflow\.worker-wait-timeout must be positive and finite, got 0"),
    ("emflow.stall-factor", "x", r"emflow\.stall-factor must be a number, got 'x'"),
    ("emflow.stall-floor", -1, r"emflow\.stall-floor must be positive and finite, got -1"),
])
def test_bad_fault_settings_are_config_errors(key, value, message):
    with dask.config.set({key: value}), pytest.raises(emflow.ConfigError, match=message):
        Engine(None)
    name = key.split(".")[1].replace("-", "_")
    with pytest.raises(emflow.ConfigError, match=message.replace(r"emflow\.", "").split(" ")[0]):
        Engine(None, **{name: value})


def test_fault_settings_come_from_arguments_then_dask_config_then_defaults():
    assert (Engine(None).worker_wait_timeout, Engine(None).stall_factor, Engine(None).stall_floor) == (300, 10, 60)
    with dask.config.set({"emflow.worker-wait-timeout": "2 minutes", "emflow.stall-factor": 4,
                          "emflow.stall-floor": "5s"}):
        engine = Engine(None)
        assert (engine.worker_wait_timeout, engine.stall_factor, engine.stall_floor) == (120, 4, 5)
        assert Engine(None, worker_wait_timeout=7, stall_factor=2.5, stall_floor="1s").worker_wait_timeout == 7


def test_library_warnings_reach_the_flow_run_log(prefect_server):
    """What the engine logs on the ``emflow`` logger (the stall and lost-workers warnings)
    shows in the run log of the flow whose task met it, visible in the dashboard."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context

    import flows._common  # noqa: F401  (the flows attach the run-log handler)

    text = "A pass over the data has taken 99.0 s so far, against a usual 0.10 s"

    @task
    def meets_a_stall():
        logging.getLogger("emflow.execution.engine").warning("%s", text)

    @flow
    def stalled():
        meets_a_stall()
        return str(get_run_context().flow_run.id)

    flow_run_id = stalled()
    logging.getLogger("emflow.execution.engine").warning("outside any run: %s", text)  # dropped, no error
    deadline = time.monotonic() + 15
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        mine = [(lg.name, lg.level, lg.message) for lg in logs if text in lg.message]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert mine == [("emflow.execution.engine", logging.WARNING, text)]
    assert all(lg.task_run_id is not None for lg in logs if text in lg.message)  # the task's log


@dataclass(frozen=True)
class StopScheduler(FaultAt):
    """At the n-th E-step call, SIGSTOP the scheduler process ``pid``."""

    pid: int = 0

    def fault(self):
        os.kill(self.pid, signal.SIGSTOP)


@pytest.mark.slow
def test_hung_scheduler_is_reported_and_the_fit_goes_on(tmp_path, proc_cluster, monkeypatch):
    """The scheduler SIGSTOPped mid-pass: the stall warning says it does not answer; once
    it is continued the fit finishes with the undisturbed result."""
    import emflow.execution.engine

    monkeypatch.setattr(emflow.execution.engine, "PROBE_TIMEOUT", 1.0)
    data = _data(tmp_path, "zarr")
    ref, n_parts = _reference(data)
    cluster = proc_cluster()
    cluster.start_workers(2)
    client = cluster.client(2)
    stopper = StopScheduler(FAMILY, str(tmp_path / "calls"), at_call=2 * n_parts + 3, pid=cluster.scheduler.pid)

    def resume():
        cluster.scheduler.send_signal(signal.SIGCONT)

    hit, stalls, _ = _fit_until_stall_warning(client, data, stopper, resume)
    assert len(stalls) == 1, stalls
    assert f"The Dask scheduler at {cluster.address} did not answer within 1 s either: a hung scheduler " \
           "(stopped with SIGSTOP, swapping) or an overloaded one is likely. Still waiting" in stalls[0]
    np.testing.assert_allclose(hit.history, ref.history, rtol=1e-10)
