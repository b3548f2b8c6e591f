"""A Dask cluster on an HPC batch scheduler (SLURM or PBS) with dask-jobqueue, for emflow.

Needs ``pip install 'emflow[slurm]'`` (dask-jobqueue, pinned). Each batch job runs one worker
process per core, single-threaded (the E-step is NumPy-bound). Start it from a login node and
point the flows at it, or use it from Python in the same process as the flow:

    python deploy/dask/jobqueue.py slurm 16     # 16 jobs; prints the scheduler address
    prefect variable set emflow_dask_scheduler tcp://login01:8786

    from deploy.dask.jobqueue import slurm_cluster
    from flows.fit import fit_flow
    with slurm_cluster(jobs=4, cores=16, memory="64GB", queue="compute", account="proj42") as cluster:
        fit_flow("/shared/train.zarr", "/shared/model.zarr", scheduler=cluster.scheduler_address)

Before any job is queued the SLURM job script is checked with ``sbatch --test-only``, so a
partition or account that does not exist (or a request no node can satisfy) fails at once with
an :class:`emflow.ClusterError` quoting SLURM, instead of a fit waiting for workers that never come.

The Zarr data must be on a file system every compute node mounts (or an object store), and the
compute nodes must run the same Python environment as the client (same emflow version).
"""

from __future__ import annotations

import subprocess
import sys

from emflow.errors import ClusterError


def _jobqueue():
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ClusterError(
            "dask-jobqueue is not installed: install it with pip install 'emflow[slurm]'."
        ) from exc
    return dask_jobqueue


def check_slurm_job(cluster) -> str:
    """Ask SLURM whether it would run ``cluster``'s job script (``sbatch --test-only``), queueing
    nothing; returns SLURM's answer, or raises :class:`emflow.ClusterError` with its reason."""
    try:
        proc = subprocess.run(["sbatch", "--test-only"], input=cluster.job_script(), capture_output=True,
                              text=True, timeout=60)
    except FileNotFoundError as exc:
        raise ClusterError("sbatch was not found: run this on a SLURM login node (or put SLURM's "
                           "commands on PATH).") from exc
    except subprocess.TimeoutExpired as exc:
        raise ClusterError("sbatch --test-only did not answer within 60 s: check that slurmctld is "
                           "reachable (sinfo).") from exc
    answer = (proc.stderr + proc.stdout).strip()
    if proc.returncode != 0:
        raise ClusterError(
            f"SLURM refuses the Dask worker job: {answer or 'sbatch exited with ' + str(proc.returncode)}. "
            "Check the partition (queue=, see sinfo), the account (account=, see sacctmgr show assoc "
            "user=$USER), and that cores/memory/walltime fit a node of that partition."
        )
    return answer


def slurm_cluster(jobs: int = 4, cores: int = 16, memory: str = "64GB", walltime: str = "04:00:00",
                  queue: str | None = None, account: str | None = None, *, exclusive: bool = True,
                  scheduler_options: dict | None = None, check: bool = True, **kwargs):
    """A ``dask_jobqueue.SLURMCluster`` of ``jobs`` jobs, each ``cores`` single-threaded workers.

    ``kwargs`` go to SLURMCluster (e.g. ``log_directory``, ``job_script_prologue``, ``python``).
    With ``check`` the job script is first tested with ``sbatch --test-only``.
    """
    options = dict(
        cores=cores, processes=cores, memory=memory, walltime=walltime, queue=queue, account=account,
        job_extra_directives=["--exclusive"] if exclusive else [],
        # node-local scratch for spilled data: SLURM sets TMPDIR in each job (its TmpFS, /tmp by
        # default); the fallback keeps the worker command whole where a site's prolog unsets it
        local_directory="${TMPDIR:-/tmp}",
        scheduler_options={"port": 8786, "dashboard_address": ":8787", **(scheduler_options or {})},
    )
    options.update(kwargs)
    cluster = _jobqueue().SLURMCluster(**options)
    try:
        if check:
            check_slurm_job(cluster)
        if jobs:
            cluster.scale(jobs=jobs)
    except BaseException:
        cluster.close()
        raise
    return cluster


def pbs_cluster(jobs: int = 4, cores: int = 16, memory: str = "64GB", walltime: str = "04:00:00",
                queue: str | None = None, account: str | None = None, **kwargs):
    """A ``dask_jobqueue.PBSCluster`` (not run here: no PBS on the test machines)."""
    options = dict(
        cores=cores, processes=cores, memory=memory, walltime=walltime, queue=queue, account=account,
        resource_spec=f"select=1:ncpus={cores}:mem={memory}", local_directory="${TMPDIR:-/tmp}",
        scheduler_options={"port": 8786, "dashboard_address": ":8787"},
    )
    options.update(kwargs)
    cluster = _jobqueue().PBSCluster(**options)
    cluster.scale(jobs=jobs)
    return cluster


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "slurm"
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    c = (slurm_cluster if kind == "slurm" else pbs_cluster)(jobs)
    print(c.job_script())
    print(c.scheduler_address)
    print("dashboard:", c.dashboard_link)
    input("cluster running; press Enter to stop it\n")
