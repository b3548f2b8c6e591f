"""Scoring flow: apply a saved model to a dataset, writing outputs to Zarr chunk by chunk.

Each output is written by the workers, one partition at a time, into a Zarr array with
the input's chunking (under a temporary name, moved into place when complete).
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
import os
from typing import Annotated, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

import emflow

from ._common import compute, retry_if_transient

__all__ = ["score_flow"]

Output = Literal["labels", "proba", "log_likelihood"]
_METHOD = {"labels": "predict", "proba": "predict_proba", "log_likelihood": "score_samples"}


@task(name="score", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def score_output(model: str, data: str, kind: str, out: str, scheduler: str | None) -> dict:
    """One output (labels, responsibilities or per-row log-likelihood) written to ``out``.

    Safe to retry: the array is written under a temporary name and replaces ``out`` only when whole.
    """
    gm = emflow.load(model)
    gm.scheduler = scheduler
    arr = getattr(gm, _METHOD[kind])(data, out=out)
    get_run_logger().info("wrote %s %s to %s (chunks %s)", kind, arr.shape, out, arr.chunks)
    return {"kind": kind, "path": os.path.abspath(out), "shape": list(arr.shape), "chunks": list(arr.chunks)}


@flow(name="emflow-score", log_prints=True)
def score_flow(
    model: str,
    data: str,
    out_dir: str,
    outputs: Annotated[list[Output], Field(min_length=1)] = ["labels", "proba"],  # noqa: B006
    scheduler: str | None = None,
) -> dict[str, str]:
    """Write ``OUT_DIR/<output>.zarr`` for each requested output; returns {output: path}."""
    written = {}
    with compute(scheduler) as (sched, _dashboard):
        for kind in dict.fromkeys(outputs):
            written[kind] = score_output(model, data, kind, os.path.join(out_dir, f"{kind}.zarr"), sched)["path"]
    create_markdown_artifact(
        "\n".join([f"# Scored `{data}` with `{model}`", "", "| output | Zarr array |", "|---|---|",
                   *[f"| {k} | `{p}` |" for k, p in written.items()]]),
        key="score-summary",
    )
    return written
