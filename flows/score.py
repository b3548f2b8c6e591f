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

from ._common import compute, retry_if_transient

__all__ = ["score_flow"]

Output = Literal["labels", "proba", "log_likelihood", "topics", "filtered_states", "smoothed_states"]
_HMM = {"labels": "predict", "proba": "predict_proba"}
# model class -> ({output: method that writes it}, default outputs)
_OUTPUTS = {
    "GaussianMixture": ({"labels": "predict", "proba": "predict_proba", "log_likelihood": "score_samples"},
                        ["labels", "proba"]),
    "GaussianHMM": (_HMM, ["labels", "proba"]),
    "CategoricalHMM": (_HMM, ["labels", "proba"]),
    "LatentDirichletAllocation": ({"topics": "transform"}, ["topics"]),
    "LinearGaussianSSM": ({"smoothed_states": "smooth", "filtered_states": "filter"}, ["smoothed_states"]),
}


def _outputs_of(model, model_path: str) -> tuple[dict[str, str], list[str]]:
    name = type(model).__name__
    if name not in _OUTPUTS:
        raise emflow.ConfigError(
            f"{model_path!r} holds a {name}, which has no chunk-by-chunk outputs to score with "
            f"(the scoring flow serves {', '.join(_OUTPUTS)}). Use its methods in Python."
        )
    return _OUTPUTS[name]


def check_outputs(model_path: str, outputs: list[str] | None) -> list[str]:
    """The outputs to write (the family's defaults for None); a ConfigError naming the
    outputs the model has when one asked for is not among them."""
    est = emflow.load(model_path)
    methods, default = _outputs_of(est, model_path)
    wanted = list(dict.fromkeys(outputs)) if outputs else default
    bad = [k for k in wanted if k not in methods]
    if bad:
        raise emflow.ConfigError(
            f"{model_path!r} holds a {type(est).__name__}, which writes "
            f"{', '.join(methods)}; it has no {', '.join(bad)}. Choose outputs among those."
        )
    return wanted


@task(name="score", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def score_output(model: str, data: str, kind: str, out: str, scheduler: str | None) -> dict:
    """One of the model's outputs (see ``_OUTPUTS``) written to ``out``.

    Safe to retry: the array is written under a temporary name and replaces ``out`` only when whole.
    """
    est = emflow.load(model)
    est.scheduler = scheduler
    written = getattr(est, _outputs_of(est, model)[0][kind])(data, out=out)
    # sequence families write a sequence store (a group: per-step ``values``, the input's ``offsets``)
    arr = written["values"] if hasattr(written, "array_keys") else written
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
