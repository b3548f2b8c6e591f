"""The engine: partition and worker invariance, the reduction tree, additive statistics."""

from __future__ import annotations

import os
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emflow
from emflow.execution.engine import Engine
from emflow.execution.tasks import _batch_width, _reduce_tasks, tree_reduce
from emflow.models import gmm as G
from emflow.stats import add
from emflow.storage.synthetic import write_gmm


@pytest.fixture(scope="module")
def zdata(tmp_path_factory):
    """The same 6,000 x 3 values stored with two chunkings, plus weights beside them."""
    root = tmp_path_factory.mktemp("data")
    big = write_gmm(root / "big.zarr", 6000, 3, 3, "full", seed=11, chunk_rows=1500, weights=True)
    X = zarr.open_group(big)["X"][...]
    w = zarr.open_group(big)["weights"][...]
    small = root / "small.zarr"
    g = zarr.open_group(small, mode="w")
    g.create_array("X", data=X, chunks=(250, 3))
    g.create_array("weights", data=w, chunks=(250,))
    g.attrs["rows"] = "X"
    return {"big": big, "small": str(small), "X": X, "w": w}


def _init(X, K=3, ct="full"):
    from sklearn.mixture import GaussianMixture as Sk

    sk = Sk(K, covariance_type=ct, max_iter=1, random_state=0).fit(X)
    return dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)


def _fit(data, scheduler, ct="full", **kw):
    X = zarr.open_group(data)["X"][...] if isinstance(data, str) else data
    return emflow.GaussianMixture(3, covariance_type=ct, max_iter=15, tol=0.0, scheduler=scheduler,
                                  **_init(X, ct=ct), **kw)


@pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")
def test_same_answer_for_chunkings_workers_and_backends(zdata, dask_client, make_cluster):
    ref = _fit(zdata["big"], "threads").fit(zdata["big"], sample_weight="weights")
    runs = {
        "small chunks, threads": _fit(zdata["small"], "threads").fit(zdata["small"], sample_weight="weights"),
        "big chunks, 2 workers": _fit(zdata["big"], dask_client).fit(zdata["big"], sample_weight="weights"),
        "small chunks, 2 workers, streamed": _fit(zdata["small"], dask_client, persist=False).fit(
            zdata["small"], sample_weight="weights"),
        "numpy, 2 workers": _fit(zdata["X"], dask_client).fit(zdata["X"], sample_weight=zdata["w"]),
        "one chunk per partition": _fit(zdata["small"], "threads", partition_bytes=1024).fit(
            zdata["small"], sample_weight="weights"),
        "dask array": _fit(zdata["X"], "threads").fit(
            da.from_array(zdata["X"], chunks=(700, 3)), sample_weight=zdata["w"]),
    }
    one = make_cluster(1)
    runs["small chunks, 1 worker"] = _fit(zdata["small"], one).fit(zdata["small"], sample_weight="weights")
    for name, em in runs.items():
        np.testing.assert_allclose(em.history_, ref.history_, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(em.means_, ref.means_, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(em.covariances_, ref.covariances_, rtol=1e-10, err_msg=name)
    assert runs["small chunks, 2 workers, streamed"].fit_info_["resident"] is False
    assert ref.fit_info_["fingerprint"] == runs["big chunks, 2 workers"].fit_info_["fingerprint"]


def test_tree_reduce_shape():
    calls = []

    def submit(f, *a):
        calls.append(len(a))
        return f(*a)

    root, depth = tree_reduce(list(range(1, 21)), lambda *a: sum(a), 3, submit)
    assert root == 210
    assert depth == 3  # 20 -> 7 -> 3 -> 1
    assert max(calls) == 3 and len(calls) == 7 + 3 + 1 - 1  # the lone 20th item is carried up once
    root, depth = tree_reduce([5], lambda *a: sum(a), 2, submit)
    assert (root, depth) == (5, 0)


def test_dask_reduction_is_a_tree(zdata, dask_client):
    engine = Engine(dask_client, split_every=2)
    rows = emflow.storage.data.open_rows(zdata["small"], partition_bytes=1)  # one chunk per partition: 24
    loaded = engine.load(rows)
    params = G.GMMParams(np.full(3, 1 / 3), np.eye(3), np.stack([np.eye(3)] * 3), np.stack([np.eye(3)] * 3), "full")
    total = engine.map_reduce(G.e_step, loaded, params)
    assert engine.last_reduction["partitions"] == 24
    assert engine.last_reduction["depth"] == 5  # ceil(log2(24))
    direct = G.e_step(zdata["X"], None, params)
    for a, b in zip(total, direct):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    loaded.release()
    # the same partitions reduced in the same fixed tree in-process: identical bits
    threads = Engine(None, split_every=2)
    local = threads.map_reduce(G.e_step, threads.load(rows), params)
    assert threads.last_reduction["depth"] == 5
    for a, b in zip(total, local):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("split_every, width", [(2, 4), (3, 9), (8, 8)])
def test_partitions_reduced_inside_a_task_give_the_same_bits(zdata, dask_client, split_every, width):
    """Several partitions per task (each task reducing its own): the same tree, the same bits
    as the in-process pass of one task per partition; fewer tasks for the scheduler."""
    rows = emflow.storage.data.open_rows(zdata["X"], zdata["w"], partition_bytes=24 * 7)  # 7 rows: 858 partitions
    P = len(rows.loaders)
    params = G.GMMParams(np.full(3, 1 / 3), np.eye(3), np.stack([np.eye(3)] * 3), np.stack([np.eye(3)] * 3), "full")
    threads = Engine(None, split_every=split_every)
    local_loaded = threads.load(rows)
    local = threads.map_reduce(G.e_step, local_loaded, params)
    engine = Engine(dask_client, split_every=split_every, partitions_per_task=width)
    loaded = engine.load(rows)  # the scan too runs `width` partitions per task
    assert (loaded.fingerprint, loaded.weight_sum) == (local_loaded.fingerprint, local_loaded.weight_sum)
    total = engine.map_reduce(G.e_step, loaded, params)
    info = engine.last_reduction
    assert info["partitions"] == P and info["partitions_per_task"] == width
    assert info["depth"] == threads.last_reduction["depth"]
    batches = -(-P // width)
    assert info["tasks"] == batches + _reduce_tasks(batches, split_every)
    assert info["tasks"] < threads.last_reduction["tasks"]
    for a, b in zip(total, local):
        np.testing.assert_array_equal(a, b)
    # per-partition arguments travel with their partitions
    per = list(range(P))
    got = engine.map_reduce(lambda X, w, i: np.array([i, len(X)], dtype=np.float64), loaded, per_partition=per)
    np.testing.assert_array_equal(got, [P * (P - 1) / 2, len(zdata["X"])])
    loaded.release()


@pytest.mark.parametrize("width", [1, 4])
def test_a_pass_holds_only_the_top_of_its_reduction(zdata, dask_client, width):
    """While a pass runs, the client holds the futures of the tree's top only (its root, or
    the last node's inputs when the statistics are small), and in the first pass of a
    function its probes (one map task per thread, let go once one is done): each map
    task's statistics are freed on its worker once the partial sum above it is done
    (holding every leaf kept P bundles of statistics in the workers' memory)."""
    rows = emflow.storage.data.open_rows(zdata["small"], partition_bytes=1)  # 24 partitions
    engine = Engine(dask_client, split_every=2, partitions_per_task=width)
    loaded = engine.load(rows)
    seen, wait = [], engine._wait

    def spy(futures, keys, started, usual, probes):
        tops = sorted(f.key for f in futures) + sorted(f.key for f in probes.futures)
        # a released future leaves the client's count on its event loop, soon after
        deadline = time.monotonic() + 5
        while True:
            held = sorted(k for k in keys if dask_client.refcount.get(k, 0) > 0)
            if held == sorted(tops) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        seen.append((len(keys), held, sorted(tops), len(futures), len(probes.futures)))
        return wait(futures, keys, started, usual, probes)

    engine._wait = spy
    for _ in range(2):
        engine.map_reduce(G.e_step, loaded, _unit_params())
    loaded.release()
    (n1, held1, top1, root1, probes1), (n2, held2, top2, root2, probes2) = seen
    assert n1 == engine.last_reduction["tasks"] == n2 + 1 > 2  # then the last add ran on the client
    assert (root1, probes1, root2, probes2) == (1, 2, 2, 0)  # 2 threads: 2 probes
    assert held1 == top1 and held2 == top2, f"{len(held1)}, {len(held2)} of the pass's {n1} futures held"


def test_a_batched_scan_reports_bad_values_as_one_task_per_partition_does(zdata, dask_client):
    X = zdata["X"].copy()
    X[3500, 1] = np.nan
    X[5000:5003, 0] = np.inf
    rows = emflow.storage.data.open_rows(X, partition_bytes=24 * 7)
    with pytest.raises(emflow.DataError) as alone:
        Engine(dask_client, partitions_per_task=1).load(rows)
    with pytest.raises(emflow.DataError) as batched:
        Engine(dask_client, partitions_per_task=64).load(rows)
    assert str(batched.value) == str(alone.value)
    assert "3500" in str(batched.value)


def test_partitions_per_task_auto_batches_only_many_partitions(dask_client):
    from emflow.execution.engine import BATCH_MIN_TASKS

    engine = Engine(dask_client)
    assert engine._batch(BATCH_MIN_TASKS) == (1, 0)
    assert engine._batch(10 * BATCH_MIN_TASKS) == (64, 2)  # 2 threads: at most 512 tasks
    assert _batch_width(100_000, 512, 8) == (512, 3)
    assert _batch_width(100_000, 6400, 8) == (64, 2)
    assert Engine(None)._batch(10**6) == (1, 0)  # in-process: no task overhead to save
    for bad in (0, 3, 16, 2.0, True, "many"):
        with pytest.raises(emflow.ConfigError, match="partitions_per_task must be 'auto' or a power of split_every"):
            Engine(None, partitions_per_task=bad)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(2, 120),
    d=st.integers(1, 4),
    K=st.integers(1, 4),
    ct=st.sampled_from(G.COVARIANCE_TYPES),
    cuts=st.lists(st.floats(0, 1), max_size=5),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_statistics_of_a_chunk_equal_the_sum_over_any_split(n, d, K, ct, cuts, weighted, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 10) + rng.normal(0, 50)
    w = rng.uniform(0, 3, n) if weighted else None
    cov = {"full": np.stack([np.eye(d)] * K), "tied": np.eye(d), "diag": np.ones((K, d)), "spherical": np.ones(K)}[ct]
    params = G.GMMParams(rng.dirichlet(np.ones(K)), X[rng.choice(n, K)], cov,
                         G.precisions_cholesky_from_covariances(cov, ct), ct)
    whole = G.e_step(X, w, params)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    parts = [G.e_step(X[a:b], None if w is None else w[a:b], params) for a, b in zip(bounds, bounds[1:]) if b > a]
    total = add(*parts)
    for name, a, b in zip(G.GMMStats._fields, total, whole):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * (1 + np.abs(b).max()), err_msg=name)


def test_predict_writes_zarr_chunk_by_chunk(zdata, tmp_path, dask_client):
    em = emflow.GaussianMixture(3, random_state=0, scheduler=dask_client).fit(zdata["small"])
    labels = em.predict(zdata["small"], out=tmp_path / "labels.zarr")
    proba = em.predict_proba(zdata["small"], out=tmp_path / "proba.zarr")
    score = em.score_samples(zdata["small"], out=tmp_path / "score.zarr")
    assert isinstance(labels, zarr.Array) and labels.shape == (6000,)
    assert labels.chunks[0] < 6000  # written in pieces, not as one array
    np.testing.assert_array_equal(labels[...], em.predict(zdata["X"]))
    np.testing.assert_allclose(proba[...], em.predict_proba(zdata["X"]), rtol=1e-12)
    np.testing.assert_allclose(score[...], em.score_samples(zdata["X"]), rtol=1e-12)
    assert labels.attrs["emflow"]["kind"] == "labels"
    # no temporary directories left behind
    assert sorted(os.listdir(tmp_path)) == ["labels.zarr", "proba.zarr", "score.zarr"]
    # a result too big for memory must go to Zarr
    import emflow.estimators.mixture as M

    old, M.MAX_IN_MEMORY_RESULT = M.MAX_IN_MEMORY_RESULT, 1000
    try:
        with pytest.raises(emflow.ConfigError, match="Pass out="):
            em.predict_proba(zdata["small"])
    finally:
        M.MAX_IN_MEMORY_RESULT = old


def test_resident_is_chosen_by_size(zdata):
    engine = Engine(None)
    rows = emflow.storage.data.open_rows(zdata["big"])
    assert engine.load(rows, persist="auto").resident
    assert not engine.load(rows, persist=False).resident
    import emflow.execution.engine as E

    old = E.RESIDENT_FRACTION
    try:
        E.RESIDENT_FRACTION = 1e-12
        assert not engine.load(rows, persist="auto").resident
    finally:
        E.RESIDENT_FRACTION = old


def test_fingerprint_ignores_chunking_but_not_content(zdata, tmp_path):
    engine = Engine(None)
    fp = {name: engine.open(zdata[name], "weights").fingerprint for name in ("big", "small")}
    assert fp["big"] == fp["small"]
    assert engine.open(zdata["X"], zdata["w"]).fingerprint == fp["big"]
    assert engine.open(zdata["X"], zdata["w"], partition_bytes=10_000).fingerprint == fp["big"]
    assert engine.open(zdata["X"]).fingerprint != fp["big"]  # weights are part of the data
    X = zdata["X"].copy()
    X[4321, 1] = np.nextafter(X[4321, 1], np.inf)  # one ulp in one value
    assert engine.open(X, zdata["w"]).fingerprint != fp["big"]
    Y = zdata["X"].copy()
    Y[[10, 11]] = Y[[11, 10]]  # the same rows in another order
    assert engine.open(Y, zdata["w"]).fingerprint != fp["big"]


def _unit_params(d=3, K=3):
    return G.GMMParams(np.full(K, 1 / K), np.eye(d), np.stack([np.eye(d)] * K), np.stack([np.eye(d)] * K), "full")


@pytest.mark.parametrize("combine_bytes", [None, 0])
def test_small_statistics_end_on_the_client_in_the_same_tree(zdata, dask_client, monkeypatch, combine_bytes):
    """From the second pass of a function whose statistics are small, the tree's last node
    runs on the client (its inputs come back in one gather): the same node of the same
    tree, so the same bits as in-process and as the first pass (whose root ran on a worker);
    large statistics (CLIENT_COMBINE_BYTES 0) keep the whole tree on the workers."""
    from emflow.execution import submit as S

    if combine_bytes is not None:
        monkeypatch.setattr(S, "CLIENT_COMBINE_BYTES", combine_bytes)
    rows = emflow.storage.data.open_rows(zdata["small"], partition_bytes=1)  # 24 partitions
    threads = Engine(None, split_every=2)
    local = threads.map_reduce(G.e_step, threads.load(rows), _unit_params())
    engine = Engine(dask_client, split_every=2)
    loaded = engine.load(rows)
    seen, wait = [], engine._wait
    engine._wait = lambda futures, keys, *a: (seen.append(len(futures)), wait(futures, keys, *a))
    passes = [engine.map_reduce(G.e_step, loaded, _unit_params()) for _ in range(3)]
    info = engine.last_reduction
    loaded.release()
    assert seen == ([1, 1, 1] if combine_bytes == 0 else [1, 2, 2])  # 24 -> 12 -> 6 -> 3 -> 2 -> (client) 1
    assert (info["depth"], info["tasks"]) == (threads.last_reduction["depth"], threads.last_reduction["tasks"])
    for total in passes:
        for a, b in zip(total, local):
            np.testing.assert_array_equal(a, b)


def test_parameters_are_broadcast_once_and_every_pass_gives_the_same_bits(zdata, dask_client):
    """Parameters go to the workers as one broadcast copy (not inside each task: arrays
    unpickled from a task's message lie at any alignment, and BLAS rounds differently
    there), so passes over the same data give the same bits, as in-process."""
    from distributed import Future

    rows = emflow.storage.data.open_rows(zdata["X"], partition_bytes=24 * 500)  # 12 partitions
    engine = Engine(dask_client)
    loaded = engine.load(rows)
    small = _unit_params()
    assert isinstance(engine._broadcast((small,)), Future)
    first = engine.map_reduce(G.e_step, loaded, small)
    again = engine.map_reduce(G.e_step, loaded, small)
    loaded.release()
    for a, b, c in zip(first, again, G.e_step(zdata["X"], None, small)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-12)


def test_a_pass_lowers_the_clients_batching_interval_only_while_it_runs(zdata, dask_client):
    from emflow.execution import submit as S

    comm = dask_client.scheduler_comm
    before = comm.interval
    assert before > S.CLIENT_BATCH_INTERVAL  # Dask's default: 10 ms
    engine = Engine(dask_client)
    loaded = engine.load(emflow.storage.data.open_rows(zdata["X"]))
    during, wait = [], engine._wait
    engine._wait = lambda *a: (during.append(comm.interval), wait(*a))
    engine.map_reduce(G.e_step, loaded, _unit_params())
    assert during == [S.CLIENT_BATCH_INTERVAL] and comm.interval == before
    with pytest.raises(ZeroDivisionError), S.prompt_client(dask_client):
        assert comm.interval == S.CLIENT_BATCH_INTERVAL
        1 / 0
    loaded.release()
    assert comm.interval == before
    with S.prompt_client(None):  # in-process: nothing to do
        pass


def test_nbytes_counts_the_arrays_of_statistics_and_parameters():
    from emflow.execution.submit import nbytes

    stats = G.e_step(np.ones((5, 3)), None, _unit_params())
    assert nbytes(stats) == sum(np.asarray(v).nbytes for v in stats)
    assert nbytes(_unit_params()) >= 3 * 8 + 9 * 8 + 2 * 27 * 8
    assert nbytes((np.zeros(10), [np.zeros(5)], {"a": np.zeros(2)})) == 8 * 17


def _slow(X, w, slow_part, i):
    time.sleep(0.3 if i != slow_part else 4.0)
    return np.array([len(X)], dtype=np.float64)


@pytest.mark.parametrize("slow_part", [None, 3])
def test_the_first_pass_of_a_function_is_compared_with_its_own_tasks(zdata, dask_client, slow_part):
    """The stall baseline compares like with like: the opening scan (read and hash only) is
    no measure of a slower function's first pass; that pass's usual time is estimated from
    its first finished task (x tasks per thread), so a slow but steady first pass is not
    reported, and one task far slower than the others is."""
    import warnings

    rows = emflow.storage.data.open_rows(zdata["X"], partition_bytes=24 * 1500)  # 4 partitions
    engine = Engine(dask_client, stall_factor=4, stall_floor=0.01)
    loaded = engine.load(rows)
    loaded.pass_history["scan"] = loaded.pass_seconds = [1e-3]  # a quick scan: 300x faster than the pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", emflow.ClusterWarning)
        got = engine.map_reduce(_slow, loaded, slow_part, per_partition=list(range(4)))
    loaded.release()
    assert got[0] == len(zdata["X"])
    stalls = [str(w.message) for w in caught if issubclass(w.category, emflow.ClusterWarning)]
    if slow_part is None:
        assert stalls == []
    else:
        [msg] = stalls
        assert "(estimated from its first finished task). Its unfinished tasks are held by worker" in msg, msg
    assert list(loaded.pass_history) == ["scan", "_slow"]
