"""Soak: many fits submitted at once to one local cluster (slow; run with ``pytest -m slow tests/test_soak.py``).

20 Gaussian-mixture fits run from 10 threads sharing one Client of a 2-worker LocalCluster,
twice over. They must give results identical (1e-10) to the same fits run one at a time,
leave the worker processes as they were (same pids, none leaked after the cluster closes)
and not grow the workers' memory from one round of 20 fits to the next.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import emflow
from emflow.storage.synthetic import write_gmm

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")]

N_FITS = 20


def _rss():
    import psutil

    return psutil.Process().memory_info().rss


def _fit(client, data, i):
    gm = emflow.GaussianMixture(2 + i % 3, covariance_type=["full", "diag", "tied", "spherical"][i % 4],
                                tol=1e-6, max_iter=25, random_state=i, scheduler=client, persist=bool(i % 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(data)
    return gm.weights_, gm.means_, gm.covariances_, np.asarray(gm.history_)


def test_many_concurrent_fits_on_one_cluster(tmp_path):
    import gc

    import psutil
    from distributed import Client, LocalCluster

    datasets = [write_gmm(tmp_path / f"d{j}.zarr", 20_000, 3, 4, "full", seed=j, chunk_rows=2_000)
                for j in range(4)]
    jobs = [(datasets[i % 4], i) for i in range(N_FITS)]
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=40)
    client = Client(cluster)
    try:
        pids = client.run(os.getpid)
        one_by_one = [_fit(client, d, i) for d, i in jobs]  # also warms the workers up
        client.run(gc.collect)
        rss0 = client.run(_rss)

        rounds = []
        for _ in range(2):
            with ThreadPoolExecutor(max_workers=10) as pool:
                rounds.append(list(pool.map(lambda job: _fit(client, *job), jobs)))
            client.run(gc.collect)
        rss1 = client.run(_rss)

        for results in rounds:
            for (w, m, c, h), (w0, m0, c0, h0) in zip(results, one_by_one):
                np.testing.assert_allclose(h, h0, rtol=1e-10)
                np.testing.assert_allclose(w, w0, rtol=1e-10, atol=1e-14)
                np.testing.assert_allclose(m, m0, rtol=1e-10, atol=1e-12)
                np.testing.assert_allclose(c, c0, rtol=1e-10, atol=1e-12)
        assert client.run(os.getpid) == pids  # no worker died or was replaced
        # releases reach the scheduler asynchronously (batched): a leak is what stays
        deadline = time.monotonic() + 15
        while (left := {w: keys for w, keys in client.has_what().items() if keys}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"data left resident on the workers after the fits released them: {left}"
        for addr in rss0:
            growth = rss1[addr] - rss0[addr]
            # 40 more fits of ~2.5 MB datasets: allow allocator noise, not a leak per fit
            assert growth < 64 * 2**20, f"worker {addr} grew by {growth / 2**20:.1f} MiB over 40 fits"
        print({a: (rss0[a] / 2**20, rss1[a] / 2**20) for a in rss0})
    finally:
        client.close()
        cluster.close()
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        leaked = {p.pid for p in me.children(recursive=True) if p.is_running()
                  and p.status() != psutil.STATUS_ZOMBIE} - children_before
        if not leaked & set(pids.values()):
            break
        time.sleep(0.5)
    assert not leaked & set(pids.values()), f"worker processes still running: {leaked}"
