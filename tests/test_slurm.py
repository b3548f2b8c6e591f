"""emflow on a real SLURM cluster: munged, slurmctld and slurmd started on this machine by
deploy/slurm/local-cluster.sh, Dask workers as SLURM batch jobs (dask-jobqueue SLURMCluster,
through the recipe deploy/dask/jobqueue.py), the fit flow pointed at the cluster's scheduler.

Run with ``make test-slurm`` (installs slurm-wlm and munge with apt when missing). Every test
that needs SLURM is slow, and skipped with the reason when SLURM, munge, dask-jobqueue or root
are missing; only the check of the generated configuration runs in the default suite (it needs
none of them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "deploy", "slurm", "local-cluster.sh")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "squeue", "sinfo")


def _missing() -> str | None:
    lost = [d for d in DAEMONS if not (shutil.which(d) or os.path.exists(f"/usr/sbin/{d}"))]
    if lost:
        return f"SLURM/munge not installed ({', '.join(lost)} missing): run `make test-slurm`, which installs them"
    if os.geteuid() != 0:
        return "needs root: slurmd starts the jobs as their user"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue not installed: pip install 'emflow[slurm]'"
    return None


_MISSING = _missing()
if _MISSING and os.environ.get("EMFLOW_REQUIRE_SLURM") == "1":  # make test-slurm: never a silent skip
    raise RuntimeError(f"EMFLOW_REQUIRE_SLURM=1 but {_MISSING}")

pytestmark = pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")


def needs_slurm(test):
    for mark in (pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(600),
                 pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")):
        test = mark(test)
    return test


def test_generated_config_is_one_node_with_this_machines_cores_and_memory(tmp_path):
    env = {**os.environ, "SLURMCTLD_PORT": "17001", "SLURMD_PORT": "17002"}
    out = subprocess.run(["bash", SCRIPT, "config", str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(tmp_path / "slurm.conf")
    conf = dict(line.split("=", 1) for line in open(out).read().splitlines()
                if line and not line.startswith(("#", "NodeName", "PartitionName")))
    node = [line for line in open(out) if line.startswith("NodeName=")][0].split()
    node = dict(w.split("=", 1) for w in node)
    mem_kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal:")))
    assert node["NodeName"] == socket.gethostname().split(".")[0] and node["NodeAddr"] == "127.0.0.1"
    assert int(node["CPUs"]) == len(os.sched_getaffinity(0))
    assert int(node["RealMemory"]) == max(mem_kb // 1024 - 512, 256)
    assert conf["SlurmctldPort"] == "17001" and conf["SlurmdPort"] == "17002"
    # everything the daemons write stays under the state folder
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile"):
        assert conf[key].startswith(str(tmp_path) + "/"), key
    assert conf["AuthInfo"] == f"socket={tmp_path}/munge/munge.socket"
    line = "PartitionName=debug Nodes={} Default=YES".format(node["NodeName"])
    assert line in open(out).read()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once: n distinct ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids(state) -> list[int]:
    out = []
    for name in ("slurmd", "slurmctld", "munged"):
        try:
            out.append(int(open(os.path.join(state, "run", f"{name}.pid")).read()))
        except (OSError, ValueError):
            pass
    return out


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster for this module; SLURM_CONF points the commands at it.
    Stopped by pid at the end, also when a test failed."""
    state = str(tmp_path_factory.mktemp("slurm"))
    ctld_port, slurmd_port = _free_ports(2)
    env = {**os.environ, "SLURMCTLD_PORT": str(ctld_port), "SLURMD_PORT": str(slurmd_port)}
    old = os.environ.get("SLURM_CONF")
    try:
        proc = subprocess.run(["bash", SCRIPT, "start", state], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"local-cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        os.environ["SLURM_CONF"] = os.path.join(state, "slurm.conf")
        yield state
    finally:
        pids = _pids(state)
        subprocess.run(["bash", SCRIPT, "stop", state], env=env, capture_output=True, timeout=120)
        survivors = []
        for pid in pids:  # whatever the script could not stop
            try:
                os.kill(pid, signal.SIGKILL)
                survivors.append(pid)
            except OSError:
                pass
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
    assert not survivors, f"local-cluster.sh stop left daemons running (pids {survivors}, killed now)"


def _squeue() -> dict[str, str]:
    """job id -> state of this cluster's jobs."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _wait(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def make_slurm_cluster(slurm, tmp_path):
    """SLURMClusters built by the recipe (deploy/dask/jobqueue.py) for this one node: one
    single-threaded worker per job, scheduler and workers on loopback. All closed afterwards
    and their jobs cancelled."""
    from deploy.dask.jobqueue import slurm_cluster

    made = []

    def make(jobs: int = 0, **kwargs):
        options = dict(
            cores=1, memory="1GB", walltime="00:20:00", queue="debug", exclusive=False,
            scheduler_options={"host": "127.0.0.1", "port": 0, "dashboard_address": ":0"},
            worker_extra_args=["--host", "127.0.0.1"], log_directory=str(tmp_path / "jobs"),
            python=sys.executable, death_timeout=30,
            # the worker jobs import this checkout's emflow, as the client does
            job_script_prologue=[f"export PYTHONPATH={ROOT}", "export OMP_NUM_THREADS=1"],
        )
        options.update(kwargs)
        cluster = slurm_cluster(jobs, **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        try:
            cluster.close(timeout=60)
        except Exception:
            pass
    jobs = list(_squeue())
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True)
    # the next test starts from an empty queue (cancelled jobs stay COMPLETING a few seconds)
    _wait(lambda: _squeue() == {}, 60, "the cancelled jobs to leave the queue")


@pytest.fixture(scope="module")
def slurm_data(tmp_path_factory):
    """Four overlapping 4-D components (EM keeps moving for many iterations), 60,000 rows in 30 partitions."""
    from emflow.storage.synthetic import write_gmm

    d = tmp_path_factory.mktemp("slurmdata")
    return write_gmm(d / "train.zarr", 60_000, 4, 4, "full", seed=7, chunk_rows=2_000, separation=1.5)


def _model_arrays(path):
    import emflow

    gm = emflow.load(path)
    return gm, {"weights": gm.weights_, "means": gm.means_, "covariances": gm.covariances_}


@needs_slurm
def test_recipe_job_script_is_a_slurm_job(make_slurm_cluster):
    """The job script the recipe generates asks SLURM for what the worker uses, and SLURM accepts it."""
    from deploy.dask.jobqueue import check_slurm_job

    cluster = make_slurm_cluster(0)
    script = cluster.job_script()
    assert "#SBATCH -p debug" in script and "#SBATCH --cpus-per-task=1" in script
    assert "--nthreads 1" in script and "${TMPDIR:-/tmp}" in script
    assert "to start at" in check_slurm_job(cluster)  # sbatch --test-only: accepted, nothing queued
    assert _squeue() == {}


@needs_slurm
def test_unknown_partition_is_a_cluster_error_before_any_job(make_slurm_cluster):
    import emflow

    with pytest.raises(emflow.ClusterError, match=r"(?s)SLURM refuses the Dask worker job: .*"
                                                  r"[Ii]nvalid partition.*Check the partition \(queue="):
        make_slurm_cluster(2, queue="no-such-partition")
    assert _squeue() == {}


@needs_slurm
def test_fit_flow_on_slurm_survives_scancel_of_a_worker_job(make_slurm_cluster, slurm_data, tmp_path,
                                                            prefect_server):
    """Two worker jobs; the fit flow against the cluster's address; one job cancelled with
    scancel mid-fit: the fit ends with the same model as an undisturbed fit on the same cluster."""
    from distributed import Client

    from emflow.storage.checkpoint import checkpoint_path, read_checkpoint
    from flows.fit import fit_flow

    cluster = make_slurm_cluster(2)
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        jobs = _squeue()
        assert len(jobs) == 2 and set(jobs.values()) == {"RUNNING"}, jobs
        assert {j.job_id for j in cluster.workers.values()} == set(jobs)

        kw = dict(n_components=4, covariance_type="full", tol=0.0, max_iter=25, random_state=1,
                  scheduler=cluster.scheduler_address, persist=True)
        quiet = fit_flow(slurm_data, str(tmp_path / "quiet.zarr"), **kw)

        out = str(tmp_path / "cancelled.zarr")
        ckpt = checkpoint_path(out)
        victim = sorted(jobs)[0]
        seen: dict = {}

        def cancel_mid_fit():
            def iteration():
                try:
                    return read_checkpoint(ckpt).iteration
                except Exception:
                    return -1
            while iteration() < 3:
                if seen.get("stop"):
                    return
                time.sleep(0.02)
            seen["cancelled_at"] = iteration()
            subprocess.run(["scancel", victim], check=True)
            while len(client.scheduler_info()["workers"]) > 1 and not seen.get("stop"):
                time.sleep(0.05)
            seen["worker_gone_at"] = iteration()
            seen["jobs_after"] = _squeue()
            seen["workers_after"] = len(client.scheduler_info()["workers"])

        watcher = threading.Thread(target=cancel_mid_fit, daemon=True)
        watcher.start()
        try:
            disturbed = fit_flow(slurm_data, out, **kw)
        finally:
            seen["stop"] = True
            watcher.join(30)
        seen["jobs_end"] = _squeue()

    print(f"scancel of job {victim} after iteration {seen.get('cancelled_at')}, its worker gone after "
          f"iteration {seen.get('worker_gone_at')} of 25; jobs then {seen.get('jobs_after')}, "
          f"at the end {seen.get('jobs_end')}")
    assert seen.get("cancelled_at", -1) >= 3, seen
    # the job was gone from SLURM and its worker from the scheduler while iterations remained
    assert victim not in seen["jobs_after"] or seen["jobs_after"][victim] != "RUNNING", seen
    assert 3 <= seen["worker_gone_at"] < 25, seen
    gm_q, a = _model_arrays(quiet)
    gm_d, b = _model_arrays(disturbed)
    assert gm_q.n_iter_ == gm_d.n_iter_ == 25
    # the model still moved after the cancellation: the iterations after it did real work
    assert gm_q.history_[-1] - gm_q.history_[seen["worker_gone_at"]] > 1e-6, gm_q.history_
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(gm_d.history_, gm_q.history_, rtol=1e-10)


@needs_slurm
def test_adapt_scales_slurm_jobs_up_and_down(make_slurm_cluster):
    """adapt(): queued work brings jobs up to the maximum; idleness cancels them down to the minimum."""
    from distributed import Client

    cluster = make_slurm_cluster(0)
    cluster.adapt(minimum_jobs=0, maximum_jobs=2, interval="500ms", wait_count=4)
    with Client(cluster) as client:
        assert _squeue() == {}
        t0 = time.monotonic()
        futures = client.map(lambda i: time.sleep(0.5) or i, range(60), pure=False)
        _wait(lambda: list(_squeue().values()).count("RUNNING") == 2, 120, "2 running SLURM jobs")
        up = time.monotonic() - t0
        assert client.gather(futures) == list(range(60))
        assert len(_squeue()) <= 2  # never more than maximum_jobs
        del futures  # results held on a worker keep it up
        t1 = time.monotonic()
        _wait(lambda: _squeue() == {}, 120, "the idle jobs to be cancelled")
        down = time.monotonic() - t1
    print(f"adapt: 0 -> 2 running jobs in {up:.1f} s; 2 -> 0 jobs {down:.1f} s after the work ended")
