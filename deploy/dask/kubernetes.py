"""A Dask cluster on Kubernetes with the dask-kubernetes operator, for emflow flows.

Needs ``pip install 'emflow[kubernetes]'`` (dask-kubernetes, pinned) and the operator in the
cluster (``helm install --repo https://helm.dask.org dask-kubernetes-operator``).
Run this once to start a cluster, then point the flows at it:

    python deploy/dask/kubernetes.py           # prints tcp://emflow-dask-scheduler.<ns>:8786
    prefect variable set emflow_dask_scheduler tcp://emflow-dask-scheduler.emflow:8786

    python deploy/dask/kubernetes.py --print   # the DaskCluster resource as YAML, for kubectl apply -f -

Workers use the image built from deploy/Dockerfile, so they can read the same Zarr
store URLs (s3://, gs://, or a shared volume) as the flow.

Checked without a cluster (tests/test_deploy_k8s.py): the resource below validates against the
DaskCluster schema the operator's CRD declares, and every container runs a command the image has.
"""

import os
import sys

IMAGE = os.environ.get("EMFLOW_IMAGE", "ghcr.io/your-org/emflow-worker:latest")


def cluster_spec(n_workers: int = 8, memory: str = "8Gi", cpu: int = 2, image: str = IMAGE,
                 name: str = "emflow-dask") -> dict:
    """The DaskCluster resource: ``n_workers`` pods, each ``cpu`` single-threaded worker processes."""
    from dask_kubernetes.operator import make_cluster_spec

    resources = {"requests": {"memory": memory, "cpu": str(cpu)}, "limits": {"memory": memory, "cpu": str(cpu)}}
    spec = make_cluster_spec(name=name, image=image, n_workers=n_workers, resources=resources)
    # The image has the `dask` command only: distributed >= 2024 no longer installs the
    # `dask-worker` / `dask-scheduler` scripts that make_cluster_spec's defaults call.
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    scheduler["args"] = ["dask", "scheduler", "--host", "0.0.0.0"]
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    # one single-threaded worker process per core, as emflow's LocalCluster does
    worker["args"] = ["dask", "worker", "--nthreads", "1", "--nworkers", str(cpu), "--memory-limit", "auto",
                      "--name", "$(DASK_WORKER_NAME)", "--dashboard-address", "8788"]
    for container in (scheduler, worker):
        # make_cluster_spec writes env: null (dropped by the API server); one BLAS thread per process
        container["env"] = [{"name": "PREFECT_SERVER_ANALYTICS_ENABLED", "value": "false"},
                            {"name": "OMP_NUM_THREADS", "value": "1"}]
    return spec


def make_cluster(n_workers: int = 8, memory: str = "8Gi", cpu: int = 2):
    from dask_kubernetes.operator import KubeCluster

    cluster = KubeCluster(custom_cluster_spec=cluster_spec(n_workers, memory, cpu), shutdown_on_close=False)
    cluster.adapt(minimum=1, maximum=n_workers)
    return cluster


if __name__ == "__main__":
    if "--print" in sys.argv[1:]:
        import yaml

        print(yaml.safe_dump(cluster_spec(), sort_keys=False))
    else:
        c = make_cluster()
        print(c.scheduler_address)
        print("dashboard:", c.dashboard_link)
