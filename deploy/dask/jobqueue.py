"""A Dask cluster on an HPC batch scheduler (SLURM or PBS) with dask-jobqueue, for emflow.

Needs (not installed by emflow): ``pip install dask-jobqueue``. Each batch job runs one
worker process per core, single-threaded (the E-step is NumPy-bound). Start it from a login
node (or inside the flow with ``scheduler=<address>``):

    python deploy/dask/jobqueue.py slurm 16     # 16 jobs; prints the scheduler address
    prefect variable set emflow_dask_scheduler tcp://login01:8786

The Zarr data must be on a file system every compute node mounts (or an object store).
"""

import sys


def slurm_cluster(jobs: int = 4, cores: int = 16, memory: str = "64GB", walltime: str = "04:00:00",
                  queue: str | None = None, account: str | None = None):
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(
        cores=cores, processes=cores, memory=memory, walltime=walltime, queue=queue, account=account,
        job_extra_directives=["--exclusive"], local_directory="$TMPDIR",
        scheduler_options={"port": 8786, "dashboard_address": ":8787"},
    )
    cluster.scale(jobs=jobs)
    return cluster


def pbs_cluster(jobs: int = 4, cores: int = 16, memory: str = "64GB", walltime: str = "04:00:00",
                queue: str | None = None, account: str | None = None):
    from dask_jobqueue import PBSCluster

    cluster = PBSCluster(
        cores=cores, processes=cores, memory=memory, walltime=walltime, queue=queue, account=account,
        resource_spec=f"select=1:ncpus={cores}:mem={memory}", local_directory="$TMPDIR",
        scheduler_options={"port": 8786, "dashboard_address": ":8787"},
    )
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
