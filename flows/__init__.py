"""Prefect 3 flows around the emflow library: fit, model selection, scoring, ingestion.

Each flow file holds a few coarse tasks (a whole stage, or a checkpointed run of EM
iterations) that call the library; the per-partition work stays in Dask. Deployments
point at ``flows/<file>.py:<flow>`` (see deploy/prefect.yaml).
"""
