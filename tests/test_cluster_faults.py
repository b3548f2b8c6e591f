"""Faults that must not end a fit that could go on: every worker lost (and new ones joining
the same scheduler), a hung (SIGSTOPped) worker; and those that must end it clearly.

Each test runs its own scheduler and worker processes (``--no-nanny``: a killed worker
stays dead until the test starts another) and stops every one of them by pid.
"""

from __future__ import annotations

import logging
import os
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
from emflow.em import run_em
from emflow.engine import Engine
from emflow.mixture import GMMFamily
from emflow.models import gmm as G
from emflow.synthetic import write_gmm

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

    def client(self, n_workers: int):
        from distributed import Client

        client = Client(self.address, timeout=10)
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
class KillAllWorkers:
    """A GMM family whose E-step, at the n-th call (counted across the cluster), SIGKILLs
    every worker process listed in ``pids`` (its own last)."""

    inner: GMMFamily
    counter: str
    pids: str
    at_call: int

    def e_step(self, X, w, params):
        with open(self.counter, "a") as f:
            f.write(".")
        if os.path.getsize(self.counter) == self.at_call:
            me = os.getpid()
            for pid in [int(p) for p in Path(self.pids).read_text().split()]:
                if pid != me:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            os.kill(me, signal.SIGKILL)
        return self.inner.e_step(X, w, params)

    def m_step(self, stats, params):
        return self.inner.m_step(stats, params)

    def objective(self, stats):
        return self.inner.objective(stats)


@dataclass(frozen=True)
class StopOnce:
    """A GMM family whose E-step SIGSTOPs its own worker at the n-th call, after writing the
    worker's address to ``who``."""

    inner: GMMFamily
    counter: str
    who: str
    at_call: int

    def e_step(self, X, w, params):
        with open(self.counter, "a") as f:
            f.write(".")
        if os.path.getsize(self.counter) == self.at_call:
            from distributed import get_worker

            Path(self.who).write_text(get_worker().address)
            os.kill(os.getpid(), signal.SIGSTOP)
        return self.inner.e_step(X, w, params)

    def m_step(self, stats, params):
        return self.inner.m_step(stats, params)

    def objective(self, stats):
        return self.inner.objective(stats)


def _params(K, d):
    eye = np.stack([np.eye(d)] * K)
    return G.GMMParams(np.full(K, 1 / K), np.linspace(-3, 3, K)[:, None] * np.ones(d), eye, eye, "full")


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
        return run_em(engine, loaded, FAMILY, _params(3, 2), tol=0.0, max_iter=ITERS), len(loaded.handles)
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
    killer = KillAllWorkers(FAMILY, str(tmp_path / "calls"), str(tmp_path / "pids"), at_call=2 * n_parts + 3)
    # a dead worker the scheduler still lists for a moment: do not try to reach it for 30 s
    with dask.config.set({"emflow.worker-wait-timeout": 60, "distributed.comm.timeouts.connect": "3s"}), \
            OnLog("workers were lost", lambda: cluster.start_workers(1)) as log:
        try:
            engine = Engine(client)
            loaded = engine.open(data, persist=False)
            assert len(loaded.handles) == n_parts
            with pytest.warns(emflow.ClusterWarning, match=r"All 2 Dask workers were lost during a pass over the data "
                              r"\(the scheduler at tcp://127\.0\.0\.1:\d+ is still up\); waiting up to 60 s"):
                hit = run_em(engine, loaded, killer, _params(3, 2), tol=0.0, max_iter=ITERS)
            loaded.release()
        finally:
            client.close(timeout=5)
    assert any("worker(s) joined the scheduler" in m for m in log.records)
    assert all(p.poll() is not None for p in old)  # the kill happened
    assert os.path.getsize(tmp_path / "calls") > 2 * n_parts + 3  # and work went on after it
    np.testing.assert_allclose(hit.history, ref.history, rtol=1e-10)
    np.testing.assert_allclose(hit.params.means, ref.params.means, rtol=1e-10)
    np.testing.assert_allclose(hit.params.covariances, ref.params.covariances, rtol=1e-10)
