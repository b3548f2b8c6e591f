"""Scoring flow: apply a saved model to a dataset, writing outputs to Zarr chunk by chunk.

Each output is written by the workers, one partition at a time, into a Zarr array with
the input's chunking (under a temporary name, moved into place when complete).

Outputs by family: a Gaussian mixture writes ``labels``, ``proba`` (responsibilities) and
``log_likelihood`` (per row); an HMM writes ``labels`` (Viterbi states) and ``proba``
(state posteriors) per time step, and a linear-Gaussian state-space model
``smoothed_states`` and ``filtered_states`` (means as ``values``, with ``covariances``), as
sequence stores beside the input's ``offsets``; LDA writes ``topics`` (document-topic
distributions).
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
from emflow.estimators import outputs as _outputs
from emflow.storage.layouts import open_stored

from ._common import compute, retry_if_transient

__all__ = ["score_flow"]

Output = Literal["labels", "proba", "log_likelihood", "topics", "filtered_states", "smoothed_states"]


def open_input(model, data: str):
    """Open ``data`` as the model's family reads it (its declared ``data_kind``; structure and
    metadata, no values), NaN allowed where the model handles missing values. A missing path
    is a DataNotFoundError naming it; data with other features than the model's, a
    FeatureMismatchError."""
    opened = open_stored(type(model).data_kind, data, allow_nan=model._allows_nan())
    expected = getattr(model, "n_features_in_", None)
    if expected is not None and int(opened.n_features) != int(expected):
        raise emflow.FeatureMismatchError(
            f"{data!r} has {opened.n_features} features; the model was fitted on {expected}. Score data with "
            "the features the model was fitted on."
        )
    return opened


@task(name="validate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def validate_inputs(model: str, data: str, outputs: list[str] | None) -> list[str]:
    """Open every input before any work: the model (its outputs checked against those asked
    for) and the data; returns the outputs to write."""
    est = emflow.load(model)
    wanted = _outputs.check_outputs(est, outputs, where=repr(model))
    opened = open_input(est, data)
    get_run_logger().info("model %s (%s); data %s: %d rows x %d features; writing %s", model, type(est).__name__,
                          data, opened.n_rows, opened.n_features, ", ".join(wanted))
    return wanted


def check_outputs(model_path: str, outputs: list[str] | None) -> list[str]:
    """The outputs to write (the family's defaults for None); a ConfigError naming the
    outputs the model has when one asked for is not among them."""
    return _outputs.check_outputs(emflow.load(model_path), outputs, where=repr(model_path))


@task(name="score", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def score_output(model: str, data: str, kind: str, out: str, scheduler: str | None) -> dict:
    """One of the model's outputs (see :mod:`emflow.estimators.outputs`) written to ``out``.

    Safe to retry: the array is written under a temporary name and replaces ``out`` only when whole.
    """
    est = emflow.load(model)
    est.scheduler = scheduler
    _, arr = _outputs.write_output(est, kind, data, out, overwrite=True)  # the flow's own outputs
    get_run_logger().info("wrote %s %s to %s (chunks %s)", kind, arr.shape, out, arr.chunks)
    return {"kind": kind, "path": os.path.abspath(out), "shape": list(arr.shape), "chunks": list(arr.chunks)}


@flow(name="emflow-score", log_prints=True)
def score_flow(
    model: str,
    data: str,
    out_dir: str,
    outputs: Annotated[list[Output] | None, Field(
        min_length=1, description="None: the family's defaults (mixtures and HMMs: labels, proba; LDA: topics; "
                                  "state-space models: smoothed_states)")]
    = None,
    scheduler: str | None = None,
) -> dict[str, str]:
    """Write ``OUT_DIR/<output>.zarr`` for each requested output; returns {output: path}."""
    wanted = check_outputs(model, outputs)  # before any work: a wrong output writes nothing
    validate_inputs(model, data, wanted)  # the model and the data open: a missing one writes nothing
    written = {}
    with compute(scheduler) as (sched, _dashboard):
        for kind in wanted:
            written[kind] = score_output(model, data, kind, os.path.join(out_dir, f"{kind}.zarr"), sched)["path"]
    create_markdown_artifact(
        "\n".join([f"# Scored `{data}` with `{model}`", "", "| output | Zarr array |", "|---|---|",
                   *[f"| {k} | `{p}` |" for k, p in written.items()]]),
        key="score-summary",
    )
    return written


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(score_flow, module="flows.score"))
