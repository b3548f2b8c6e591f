"""Faults survived: a worker killed mid-iteration, a scheduler lost."""

from __future__ import annotations

import os
import signal
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

import emflow
from emflow.execution.cluster import engine_for
from emflow.estimators.em import run_em
from emflow.estimators.mixture import GMMFamily
from emflow.storage.synthetic import write_gmm

from _faults import FaultAt, gmm_start


@dataclass(frozen=True)
class KillWorkerOnce(FaultAt):
    """At the n-th E-step call, SIGKILL its own worker process."""

    def fault(self):
        os.kill(os.getpid(), signal.SIGKILL)




@pytest.mark.parametrize("source,persist", [("zarr", True), ("zarr", False), ("numpy", True)])
def test_worker_killed_mid_iteration_gives_the_same_result(tmp_path, make_cluster, source, persist):
    """Zarr partitions are recomputed from the store; in-memory ones, scattered from this
    process, are sent again (Dask cannot recompute scattered data)."""
    data = write_gmm(tmp_path / "d.zarr", 8000, 3, 2, seed=4, chunk_rows=500)
    if source == "numpy":
        import zarr

        data = zarr.open_group(data, mode="r")["X"][...]
    family = GMMFamily("full", 1e-6)
    client = make_cluster(2)
    with engine_for(client) as engine:
        loaded = engine.open(data, persist=persist)
        ref = run_em(engine, loaded, family, gmm_start(3, 2), tol=0.0, max_iter=6)
        n_parts = len(loaded.handles)
        killer = KillWorkerOnce(family, str(tmp_path / "calls"), at_call=2 * n_parts + 3)
        with warnings.catch_warnings():
            # numpy: a ClusterWarning when the dead worker held the only copy of a partition
            # (other workers may hold replicas, fetched for tasks they ran; then nothing is lost)
            warnings.simplefilter("ignore", emflow.ClusterWarning)
            hit = run_em(engine, loaded, killer, gmm_start(3, 2), tol=0.0, max_iter=6)
        loaded.release()
    assert os.path.getsize(tmp_path / "calls") > 2 * n_parts + 3  # the kill happened, work went on
    np.testing.assert_allclose(hit.history, ref.history, rtol=1e-10)
    np.testing.assert_allclose(hit.params.means, ref.params.means, rtol=1e-10)
    np.testing.assert_allclose(hit.params.covariances, ref.params.covariances, rtol=1e-10)


def test_lost_scattered_partitions_are_sent_again(make_cluster):
    """In-memory partitions whose only copy is gone (cancelled here, as when the one worker
    holding them dies) are scattered again from the client and the pass repeated."""
    X = np.random.default_rng(0).normal(size=(8000, 2))
    family = GMMFamily("full", 1e-6)
    client = make_cluster(2)
    with engine_for(client) as engine:
        loaded = engine.open(X, persist=True)
        ref = run_em(engine, loaded, family, gmm_start(3, 2), tol=0.0, max_iter=4)
        client.cancel([loaded.handles[0], loaded.handles[2]])
        assert loaded.lost_partitions() == [0, 2]
        with pytest.warns(emflow.ClusterWarning, match=r"holding 2 partition\(s\) of the in-memory data"):
            hit = run_em(engine, loaded, family, gmm_start(3, 2), tol=0.0, max_iter=4)
        assert loaded.lost_partitions() == []
        loaded.release()
    np.testing.assert_array_equal(hit.history, ref.history)
    np.testing.assert_array_equal(hit.params.means, ref.params.means)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # 12-27 s: kept out of the default run (make test-slow)
def test_scheduler_lost_is_a_clear_error(tmp_path):
    """A scheduler process killed mid-fit: a ClusterError naming its address."""
    import subprocess
    import sys
    import time

    from distributed import Client

    data = write_gmm(tmp_path / "d.zarr", 4000, 2, 2, seed=5, chunk_rows=500)
    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", address.rsplit(":", 1)[1], "--dashboard-address", ":0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                       "--nthreads", "1", "--no-nanny", "--dashboard-address", ":0"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # the client's timeout is also how long it tries to reconnect to a lost scheduler
        client = Client(address, timeout=10)
        client.wait_for_workers(1, timeout=60)

        def kill_scheduler(event):
            if event.iteration == 2:
                procs[0].kill()
                procs[0].wait()
                time.sleep(0.5)

        with pytest.raises(emflow.ClusterError, match=address.replace(".", r"\.")):
            emflow.GaussianMixture(2, scheduler=client, max_iter=50, tol=0.0, random_state=0).fit(
                data, callbacks=[kill_scheduler])
        client.close(timeout=5)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # nothing listens there now: the error names the address and says what to do
    with pytest.raises(emflow.ClusterError, match=r"Could not reach the Dask scheduler at .*127\.0\.0\.1"):
        emflow.GaussianMixture(2, scheduler=address, random_state=0).fit(data)
