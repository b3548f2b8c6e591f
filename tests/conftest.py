"""Shared fixtures. Processes a test starts (Dask workers, a Prefect server) it stops, by pid."""

from __future__ import annotations

import os
import signal
import tempfile

import numpy as np
import pytest

# Prefect: never touch the user's profile or the network during tests.
_PREFECT_HOME = tempfile.mkdtemp(prefix="emflow-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
# Dask's diagnostics that no test reads, sampling in every scheduler, worker and client
# process (the statistical profiler every 10 ms, the event-loop tick every 20 ms, the
# system and GIL monitors every 0.5 s / 1 ms): idle, they cost a 2-worker cluster ~8 % of
# a core, ~1.5 % without them. Environment variables too, so that the worker and scheduler
# processes the tests start (subprocesses, spawned LocalCluster workers) see them.
# Nothing that Dask decides with is changed (memory monitor, heartbeats, timeouts).
_QUIET_DASK = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.system-monitor.gil.enabled": False,
}
_mine = {}
for _key, _value in _QUIET_DASK.items():
    _env = "DASK_" + "__".join(part.replace("-", "_").upper() for part in _key.split("."))
    if os.environ.setdefault(_env, str(_value)) == str(_value):  # a value set outside wins
        _mine[_key] = _value
import dask  # noqa: E402

dask.config.set(_mine)  # in case dask was imported (and read the environment) before this file

# Command-line output is checked by its text: a wide terminal, so that rich does not wrap
# lines at 80 columns (where they wrap would depend on the length of the temporary path).
os.environ["COLUMNS"] = "250"


def _kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, 0)
        except OSError:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _start_cluster(n_workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=40)
    client = Client(cluster)
    pids = [p for p in client.run(os.getpid).values()]
    return cluster, client, pids


@pytest.fixture(scope="session")
def dask_client():
    """A LocalCluster of two single-threaded worker processes, shared by the session."""
    cluster, client, pids = _start_cluster(2)
    yield client
    client.close()
    cluster.close()
    _kill_pids(pids)


@pytest.fixture
def make_cluster():
    """Start LocalClusters of a given size inside a test; all are stopped afterwards."""
    started = []

    def start(n_workers: int):
        cluster, client, pids = _start_cluster(n_workers)
        started.append((cluster, client, pids))
        return client

    yield start
    for cluster, client, pids in started:
        client.close()
        cluster.close()
        _kill_pids(pids)


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server (SQLite, in PREFECT_HOME above) for the whole session,
    shared by every flow test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def blobs(rng):
    """Three well separated 3-D clusters, 600 rows."""
    centers = np.array([[-5.0, 0.0, 1.0], [0.0, 4.0, -2.0], [5.0, -3.0, 0.0]])
    X = np.vstack([rng.normal(c, [1.0, 0.7, 1.3], size=(200, 3)) for c in centers])
    return X[rng.permutation(len(X))]
