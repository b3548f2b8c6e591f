"""The LDA topic-model fit flow: batch variational EM on a Zarr document-term corpus.

``lda_fit_flow("corpus.zarr", "lda.zarr", n_components=10)`` or as a deployment
(deploy/prefect.yaml). Stages, checkpoints and artifacts as every family's fit
(flows/_family.py): ``lda-fit-progress``, ``lda-fit-bound-per-word`` (the bound per word
and the perplexity, per iteration), ``lda-fit-summary`` (with the convergence plot and the
topics), ``lda-top-words`` (table: the top words of each topic), ``dask-dashboard``.

As in scikit-learn, the fit runs ``max_iter`` iterations unless ``evaluate_every > 0``,
in which case it stops when the perplexity, checked every ``evaluate_every`` iterations,
changes by less than ``perp_tol``.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations, also when a deployment loads this file by path.
import math
from typing import Annotated, Literal

import numpy as np
from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import Field

from emflow import LatentDirichletAllocation
from emflow.storage.corpus import open_corpus

from ._common import PersistParam, RestartsParam, SchedulerParam
from ._family import AccelerateParam, FamilyAdapter, run_family_fit

__all__ = ["lda_fit_flow", "LDAAdapter", "top_words_rows"]


def top_words_rows(model: LatentDirichletAllocation, n: int) -> list[dict]:
    """One row per topic: its share of the expected word counts and its ``n`` heaviest terms."""
    vocab = model.vocabulary_ if getattr(model, "vocabulary_", None) is not None else [
        f"term {j}" for j in range(model.n_features_in_)]
    words = model.top_words(min(n, model.n_features_in_), vocabulary=vocab)
    counts = model.components_.sum(axis=1) - model.topic_word_prior_ * model.n_features_in_
    share = counts / counts.sum() if counts.sum() > 0 else np.full(len(counts), 1.0 / len(counts))
    return [{"topic": k, "share": round(float(share[k]), 6), "top_words": ", ".join(w)} for k, w in enumerate(words)]


class LDAAdapter(FamilyAdapter):
    prefix = "lda"
    estimator_cls = LatentDirichletAllocation
    label = "bound per word"
    column = "bound_per_word"
    units = "documents"

    def __init__(self, n_top_words: int = 10):
        self.n_top_words = n_top_words

    def extra_columns(self, value):
        return {"perplexity": math.exp(-value)}

    def open(self, data):
        return open_corpus(data)

    def trajectory(self, cfg):
        # evaluate_every and perp_tol only decide where the sequence of topics stops
        return {k: v for k, v in cfg.items() if k not in ("max_iter", "evaluate_every", "perp_tol", "verbose")}

    def stop_rule(self, cfg, info):
        e, tol = int(cfg["evaluate_every"]), float(cfg["perp_tol"])

        def stopped(h):  # LatentDirichletAllocation.fit's own test, on the first len(h) iterations
            n = len(h)
            return e > 0 and n % e == 0 and n >= 2 * e and abs(math.exp(-h[n - e - 1]) - math.exp(-h[n - 1])) < tol

        return stopped

    def tol(self, cfg, info):
        return float(cfg["perp_tol"])

    def tol_text(self, cfg):
        if cfg["evaluate_every"] > 0:
            return f"perp_tol {cfg['perp_tol']:g} every {cfg['evaluate_every']} iteration(s)"
        return "evaluate_every <= 0: runs max_iter iterations"

    def start_text(self, cfg, params):
        return f"{cfg['n_components']} topics over {params.components.shape[1]} terms"

    def restore(self, est, ck, info):
        super().restore(est, ck, info)  # the parameters and priors through LDA's _set_parameters
        est.vocabulary_ = open_corpus(info["source"]).vocabulary

    def evaluate(self, model, data, heldout):
        return {"heldout_perplexity": float(model.perplexity(heldout))} if heldout else {}

    def title(self, est):
        return f"LDA: {est.n_components} topics, {est.n_features_in_} terms"

    def facts(self, est, metrics):
        out = [("final perplexity (training)", f"{math.exp(-est.lower_bound_):.8g}"),
               ("priors (doc-topic, topic-word)", f"{_prior_text(est.doc_topic_prior_)}, {est.topic_word_prior_:.4g}")]
        if "heldout_perplexity" in metrics:
            out.append(("held-out perplexity", f"{metrics['heldout_perplexity']:.8g}"))
        return out

    def sections(self, est):
        rows = ["| topic | share | top words |", "|---|---|---|"]
        rows += [f"| {r['topic']} | {r['share']:.4f} | {r['top_words']} |" for r in top_words_rows(est, self.n_top_words)]
        return [("Topics", rows)]

    def publish(self, est):
        create_table_artifact(top_words_rows(est, self.n_top_words), key="lda-top-words",
                              description=f"The {self.n_top_words} heaviest terms of each topic, heaviest first")


def _prior_text(alpha) -> str:
    if np.ndim(alpha):
        return "estimated, " + " ".join(f"{a:.3g}" for a in np.asarray(alpha))
    return f"{alpha:.4g}"


@flow(name="emflow-fit-lda", log_prints=True)
def lda_fit_flow(
    data: Annotated[str, Field(description="Zarr document-term corpus (indptr, indices, counts, vocabulary)")],
    out: Annotated[str, Field(description="where the fitted model is saved (a Zarr group)")],
    n_components: Annotated[int, Field(ge=1, description="number of topics")] = 10,
    doc_topic_prior: Annotated[float | None, Field(gt=0, description="alpha; None: 1 / n_components")] = None,
    topic_word_prior: Annotated[float | None, Field(gt=0, description="eta; None: 1 / n_components")] = None,
    max_iter: Annotated[int, Field(ge=1, description="EM iterations (passes over the corpus)")] = 10,
    evaluate_every: Annotated[int, Field(description="check the perplexity every this many iterations; <= 0: never")]
    = -1,
    perp_tol: Annotated[float, Field(ge=0, description="stop when the perplexity changes less")] = 0.1,
    mean_change_tol: Annotated[float, Field(ge=0, description="E-step: per-document stopping tolerance")] = 1e-3,
    max_doc_update_iter: Annotated[int, Field(ge=1, description="E-step: iterations per document")] = 100,
    doc_topic_init: Literal["random", "ones"] = "random",
    learn_doc_topic_prior: Annotated[bool, Field(
        description="also estimate an asymmetric doc-topic prior (one alpha per topic) in every M-step")] = False,
    random_state: int | None = 0,
    n_init: RestartsParam = 1,
    n_top_words: Annotated[int, Field(ge=1, description="words per topic in the top-words table")] = 10,
    heldout: Annotated[str | None, Field(description="held-out corpus (Zarr, same vocabulary) for its perplexity")]
    = None,
    scheduler: SchedulerParam = None,
    persist: PersistParam = "auto",
    resume: bool = True,
    accelerate: AccelerateParam = None,
) -> str:
    """Fit an LDA topic model to a Zarr corpus and save it; returns the model path."""
    cfg = dict(n_components=n_components, doc_topic_prior=doc_topic_prior, topic_word_prior=topic_word_prior,
               max_iter=max_iter, evaluate_every=evaluate_every, perp_tol=perp_tol, mean_change_tol=mean_change_tol,
               max_doc_update_iter=max_doc_update_iter, doc_topic_init=doc_topic_init,
               learn_doc_topic_prior=learn_doc_topic_prior, random_state=random_state)
    return run_family_fit(LDAAdapter(n_top_words), cfg, data, out, n_init=n_init,
                          heldout=heldout, scheduler=scheduler,
                          persist=persist, resume=resume, accelerate=accelerate)


if __name__ == "__main__":
    import sys

    from flows._main import main

    sys.exit(main(lda_fit_flow, module="flows.fit_lda"))
