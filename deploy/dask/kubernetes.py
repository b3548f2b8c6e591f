"""A Dask cluster on Kubernetes with the dask-kubernetes operator, for emflow flows.

Needs (not installed by emflow): ``pip install dask-kubernetes`` and the operator in the
cluster (``helm install --repo https://helm.dask.org dask-kubernetes-operator``).
Run this once to start a cluster, then point the flows at it:

    python deploy/dask/kubernetes.py           # prints tcp://emflow-dask-scheduler.<ns>:8786
    prefect variable set emflow_dask_scheduler tcp://emflow-dask-scheduler.emflow:8786

Workers use the image built from deploy/Dockerfile, so they can read the same Zarr
store URLs (s3://, gs://, or a shared volume) as the flow.
"""

import os

IMAGE = os.environ.get("EMFLOW_IMAGE", "ghcr.io/your-org/emflow-worker:latest")


def make_cluster(n_workers: int = 8, memory: str = "8Gi", cpu: str = "2"):
    from dask_kubernetes.operator import KubeCluster, make_cluster_spec

    spec = make_cluster_spec(name="emflow-dask", image=IMAGE, n_workers=n_workers,
                             resources={"requests": {"memory": memory, "cpu": cpu},
                                        "limits": {"memory": memory, "cpu": cpu}})
    # one single-threaded worker process per core, as emflow's LocalCluster does
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    worker["args"] = ["dask-worker", "--nthreads", "1", "--nworkers", cpu, "--memory-limit", "auto",
                      "--name", "$(DASK_WORKER_NAME)", "--dashboard-address", "8788"]
    cluster = KubeCluster(custom_cluster_spec=spec, shutdown_on_close=False)
    cluster.adapt(minimum=1, maximum=n_workers)
    return cluster


if __name__ == "__main__":
    c = make_cluster()
    print(c.scheduler_address)
    print("dashboard:", c.dashboard_link)
