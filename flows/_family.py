"""The checkpointed fit of every EM family, as coarse Prefect tasks.

``validate -> (initialise -> em-iterations) per restart -> save-model -> evaluate``, written
once for every family (the Gaussian mixture's flows/fit.py included); what differs between
families (which estimator, its fit arguments, how its tolerance is applied, what its summary
shows) is an adapter object (:class:`FamilyAdapter`; the adapters live beside their flows in
flows/fit.py, flows/fit_hmm.py, flows/fit_lgssm.py and flows/fit_lda.py). The monitoring is
flows/_common.py's, so every family gets the same log lines and artifacts:

- ``dask-dashboard`` (link, when a Dask cluster runs the fit; live only while it runs) and
  ``dask-performance-report`` (markdown: where ``OUT.dask-report.html`` was saved),
- ``<prefix>-fit-progress`` (progress, in EM iterations of all restarts),
- ``<prefix>-fit-<objective>`` (table: the objective per iteration, its change, seconds),
- ``<prefix>-fit-summary`` (markdown: verdict, data, metrics, timing, family details and
  the convergence plot),

plus whatever the adapter publishes (LDA: ``lda-top-words``). The mixture's prefix is empty
(``fit-progress``, ``fit-log-likelihood``, ``fit-summary``).

Restarts: ``n_init=R`` runs R restarts, restart ``r`` from the parameters the estimator's own
``fit(n_init=R)`` starts restart ``r`` from (flows/_restarts.py), and keeps the best final
objective (the first of equals), so the flow's model is the library's.

Lock: the run holds ``OUT.lock`` (:mod:`emflow.storage.locking`) from start to end, so a second
run writing the same ``out`` fails at once, naming the first.

Checkpoints: after every iteration the parameters are written next to ``out``
(``OUT.checkpoint.npz`` for restart 0, ``OUT.initR.checkpoint.npz`` for restart R,
atomically); a rerun of the flow with the same arguments, or a retry of the EM task,
continues from there and ends with the same model as an uninterrupted fit, because each
estimator's ``fit`` takes ``initial_params`` and ``history``.
"""

# No `from __future__ import annotations`: Prefect builds the run form's schema from the
# evaluated annotations (the flows import from here).
from typing import Any, Callable, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact
from prefect.cache_policies import NO_CACHE

import emflow
from emflow.storage.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    checkpoint_path,
    config_hash,
    dataset_fingerprint,
    restore_fitted,
    write_checkpoint,
)

from ._restarts import accepts, restart_params

from ._common import (
    IterationMonitor,
    check_same_data,
    compute,
    convergence_verdict,
    dask_performance_report,
    load_checkpoint_logged,
    output_locked,
    publish_dashboard_link,
    resolve_scheduler,
    retry_if_transient,
    seconds_row,
    summary_markdown,
)

#: the flows' ``accelerate`` parameter (None: plain EM; "squarem": emflow.estimators.accelerate)
AccelerateParam = Literal["none", "squarem"] | None

__all__ = ["FamilyAdapter", "AccelerateParam", "run_family_fit", "validate", "initialise", "em_iterations", "save",
           "evaluate"]


class FamilyAdapter:
    """What the generic fit needs to know about one family. Subclass and fill in.

    ``cfg`` is always the estimator's constructor keywords minus ``scheduler``, ``persist``
    and ``n_init`` (the flow runs the restarts); ``info`` is :meth:`fingerprint`'s dict
    (:func:`emflow.storage.checkpoint.dataset_fingerprint`'s by default).
    """

    prefix: str = ""                      # artifact keys: <prefix>-fit-...; "" -> fit-...
    estimator_cls: type | None = None     # the estimator (or override estimator_class)
    label: str = "mean log-likelihood per step"
    column: str = "log_likelihood"
    record: tuple[str, ...] = ()          # report keys the checkpoint keeps per iteration
    units: str = "steps"
    fit_args: tuple = ()                  # what fit(data, *fit_args) takes besides the data

    def key(self, name: str) -> str:
        """An artifact key: ``<prefix>-fit-<name>`` (``fit-<name>`` without a prefix)."""
        return f"{self.prefix}-fit-{name}" if self.prefix else f"fit-{name}"

    @property
    def lock_name(self) -> str:
        return f"emflow-fit-{self.prefix}" if self.prefix else "emflow-fit"

    def extra_columns(self, value: float) -> dict:
        return {}

    def open(self, data: str):
        """The opened dataset (for validation and the fingerprint)."""
        raise NotImplementedError

    def check_heldout(self, data: str, heldout: str | None) -> None:
        """Open the held-out set (its structure): a DataNotFoundError naming a missing path."""
        if heldout:
            self.open(heldout)

    def fingerprint(self, data: str, cfg: dict, scheduler) -> dict:
        """Validate (structure, every value) and fingerprint the data in one pass; ``n_rows``
        counts :attr:`units`."""
        return dataset_fingerprint(self.open(data), scheduler=scheduler)

    def estimator_class(self, cfg: dict) -> type:
        return self.estimator_cls

    def iter_param(self, cls: type) -> str:
        """The estimator's name for its iteration budget (its declared ``iter_param``)."""
        return cls.iter_param

    def budget(self, cfg: dict) -> int:
        return int(cfg[self.iter_param(self.estimator_class(cfg))])

    def estimator(self, cfg: dict, scheduler, persist: Any = "auto", **overrides):
        return self.estimator_class(cfg)(**{**cfg, **overrides}, scheduler=scheduler, persist=persist)

    def tol(self, cfg: dict, info: dict) -> float:
        """The tolerance as the EM loop applies it to the history (mean per unit)."""
        return float(cfg["tol"])

    def stop_rule(self, cfg: dict, info: dict) -> Callable[[list], bool] | None:
        """None: the loop stops when the change in the history is below :meth:`tol`."""
        return None

    def tol_text(self, cfg: dict) -> str:
        return f"tol {cfg['tol']:g}"

    def trajectory(self, cfg: dict) -> dict:
        """The settings that decide the EM trajectory (``tol`` and the budget only decide where it stops)."""
        budget = self.iter_param(self.estimator_class(cfg))
        # plain EM's hash stays what it was before accelerate existed
        return {k: v for k, v in cfg.items() if k not in ("tol", budget, "verbose")
                and not (k == "accelerate" and v in (None, "none"))}

    def trajectory_hash(self, cfg: dict, init: int) -> str:
        """The checkpoint's configuration hash of restart ``init``."""
        base = {"adapter": type(self).__name__, **self.trajectory(cfg)}
        return config_hash(base if init == 0 else {**base, "restart": int(init)})

    def start_text(self, cfg: dict, params) -> str:
        """What the initialise task logs about the starting parameters."""
        return type(params).__name__

    def fit(self, est, data: str, callbacks: list, params, history: list[float]):
        return est.fit(data, *self.fit_args, callbacks=callbacks, initial_params=params, history=history)

    def after_fit(self, est, ck: Checkpoint, records: dict) -> None:
        """Fix up what a resumed fit reports only for the iterations it ran."""

    def restore(self, est, ck: Checkpoint, info: dict) -> None:
        """Give ``est`` the fitted state of a finished checkpoint without recomputing (any
        estimator on the base: its parameters through ``_set_parameters``)."""
        restore_fitted(est, ck, {k: info[k] for k in _DATASET_KEYS if k in info})
        est.fit_info_.update(resumed_from_iteration=len(ck.history), engine=info.get("engine"))

    def evaluate(self, model, data: str, heldout: str | None) -> dict:
        return {}

    def title(self, est) -> str:
        raise NotImplementedError

    def facts(self, est, metrics: dict) -> list[tuple[str, str]]:
        return []

    def sections(self, est) -> list[tuple[str, list[str]]]:
        return []

    def publish(self, est) -> None:
        """Family-specific artifacts, after the model is saved."""


# what a restored model's fit_info_ keeps of the validated dataset's facts
_DATASET_KEYS = ("source", "n_samples", "n_sequences", "n_docs", "nnz", "n_features", "dtype", "partitions")


def _restart_text(init: int, n_init: int) -> str:
    return f"restart {init + 1}/{n_init}: " if n_init > 1 else ""


@task(name="validate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def validate(adapter: FamilyAdapter, data: str, cfg: dict, scheduler: str | None, heldout: str | None = None) -> dict:
    """Check every input before any work: the held-out set opens (its structure; a missing
    path is a DataNotFoundError naming it), then the dataset is opened, checked (structure,
    every value) and fingerprinted in one pass."""
    adapter.check_heldout(data, heldout)
    info = adapter.fingerprint(data, cfg, scheduler)
    extra = "".join(f", {info[k]} {k[2:]}" for k in ("n_sequences", "n_docs", "nnz") if k in info)
    get_run_logger().info(
        "data %s: %d %s x %d features (%s)%s, %d partitions, fingerprint %s; compute: %s", info["source"],
        info["n_rows"], adapter.units, info["n_features"], info["dtype"], extra, info["partitions"],
        info["fingerprint"], info["engine"],
    )
    return info


def _load(adapter: FamilyAdapter, cfg: dict, ckpt_path: str, info: dict, chash: str):
    return load_checkpoint_logged(ckpt_path, info["fingerprint"], chash, tol=adapter.tol(cfg, info),
                                  max_iter=adapter.budget(cfg), stop_rule=adapter.stop_rule(cfg, info))


@task(name="initialise", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def initialise(adapter: FamilyAdapter, data: str, cfg: dict, scheduler: str | None, ckpt_path: str,
               info: dict, chash: str, resume: bool = True, init: int = 0, n_init: int = 1) -> dict:
    """The starting parameters of restart ``init`` (those the estimator's own ``fit`` with
    ``n_init`` restarts starts it from), written as an iteration-0 checkpoint; with
    ``resume`` and a usable checkpoint there, nothing is computed."""
    logger = get_run_logger()
    if resume:
        ck = _load(adapter, cfg, ckpt_path, info, chash)
        if ck is not None:
            logger.info("%sresuming from checkpoint %s at iteration %d%s", _restart_text(init, n_init), ckpt_path,
                        ck.iteration, " (already finished)" if ck.converged or ck.iteration >= adapter.budget(cfg)
                        else "")
            return {"resumed": True, "iteration": ck.iteration}
    cls = adapter.estimator_class(cfg)
    est = adapter.estimator(cfg, scheduler, persist=False, **({"n_init": n_init} if accepts(cls, "n_init") else {}))
    params = restart_params(adapter, est, data, init)
    extra = {"records": {k: [] for k in adapter.record}} if adapter.record else {}
    write_checkpoint(ckpt_path, Checkpoint(params, [], [], False, info["fingerprint"], chash, init, extra))
    logger.info("%sinitialised %s", _restart_text(init, n_init), adapter.start_text(cfg, params))
    return {"resumed": False, "iteration": 0, "n_passes": getattr(est, "init_passes_", 0)}


@task(name="em-iterations", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def em_iterations(adapter: FamilyAdapter, data: str, cfg: dict, scheduler: str | None, persist: Any,
                  ckpt_path: str, info: dict, chash: str, progress_id=None, init: int = 0, n_init: int = 1):
    """EM of restart ``init`` from its latest checkpoint to the end, checkpointing every iteration.

    A retry (or a rerun of the flow) continues from the last checkpoint written.
    """
    logger = get_run_logger()
    max_iter = adapter.budget(cfg)
    ck = _load(adapter, cfg, ckpt_path, info, chash)
    if ck is None:
        raise emflow.FitFailedError(
            f"The checkpoint {ckpt_path!r} written by the initialise task is missing or unusable. "
            "Run the flow again; it will initialise afresh."
        )
    est = adapter.estimator(cfg, scheduler, persist)
    monitor = IterationMonitor(max_iter=max_iter, progress_id=progress_id,
                               table_key=adapter.key(adapter.column.replace("_", "-")), history=ck.history,
                               seconds=ck.seconds, init=init, n_init=n_init, label=adapter.label,
                               column=adapter.column, extra_columns=adapter.extra_columns)
    if ck.converged or ck.iteration >= max_iter:
        logger.info("%scheckpoint at iteration %d is final; restoring the fitted model without recomputing",
                    _restart_text(init, n_init), ck.iteration)
        adapter.restore(est, ck, info)
    else:
        writer = CheckpointWriter(ckpt_path, fingerprint=info["fingerprint"], config_hash=chash, history=ck.history,
                                  seconds=ck.seconds, init=init, extra=ck.extra, record=adapter.record)
        adapter.fit(est, data, [writer, monitor], ck.params, ck.history)
        check_same_data(data, est.fit_info_.get("fingerprint"), info["fingerprint"], ckpt_path)
        est.fit_info_["seconds_per_iteration"] = list(writer.seconds)
        est.fit_info_["resumed_from_iteration"] = ck.iteration
        adapter.after_fit(est, ck, writer.extra.get("records", {}))
    monitor.progress((init + 1) / n_init)
    monitor.publish_table()
    return est


@task(name="save-model", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def save(model, out: str) -> str:
    """Write the model as a Zarr group (atomically: a crash leaves the old model or the new one)."""
    path = model.save(out, overwrite=True)  # the flow re-saving its own model (a scheduled re-run)
    get_run_logger().info("saved model to %s", path)
    return path


@task(name="evaluate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def evaluate(adapter: FamilyAdapter, model_path: str, data: str, heldout: str | None,
             scheduler: str | None) -> dict:
    """The family's criteria on the saved model (training data and, if given, held-out data)."""
    model = emflow.load(model_path)
    model.scheduler = scheduler
    metrics = adapter.evaluate(model, data, heldout)
    if metrics:
        get_run_logger().info("evaluation: %s", ", ".join(f"{k} {v:.8g}" for k, v in metrics.items()))
    return metrics


def _summary(adapter: FamilyAdapter, est, metrics: dict, info: dict, path: str, cfg: dict,
             restarts: list[float], passes: int = 0) -> str:
    extra = "".join(f", {info[k]} {k[2:]}" for k in ("n_sequences", "n_docs", "nnz") if k in info)
    facts = [
        ("model", f"`{path}`"),
        ("data", f"`{info['source']}`: {info['n_rows']} {adapter.units} x {info['n_features']} features "
                 f"({info['dtype']}){extra}"),
        ("data fingerprint", f"`{info['fingerprint']}`"),
        (f"final {adapter.label}", f"{est.lower_bound_:.10g}"),
        *adapter.facts(est, metrics),
        *seconds_row(est.fit_info_.get("seconds_per_iteration", [])),
        ("passes over the data", f"{passes} (validation, initialisation and EM of every restart, before "
                                 f"evaluation; accelerate={cfg.get('accelerate')})"),
    ]
    if len(restarts) > 1:
        facts.append((f"restarts (final {adapter.label})", ", ".join(f"{v:.8g}" for v in restarts)))
    if est.fit_info_.get("resumed_from_iteration"):
        facts.append(("resumed from checkpoint at iteration", str(est.fit_info_["resumed_from_iteration"])))
    facts.append(("compute", str(est.fit_info_.get("engine") or info.get("engine", "?"))))
    budget = adapter.iter_param(adapter.estimator_class(cfg))
    verdict = convergence_verdict(est.converged_, est.n_iter_, est.history_, adapter.tol_text(cfg),
                                  f"raise {budget} or the tolerance")
    return summary_markdown(adapter.title(est), verdict, facts, est.history_, sections=adapter.sections(est),
                            ylabel=adapter.label)


def run_family_fit(adapter: FamilyAdapter, cfg: dict, data: str, out: str, *, n_init: int = 1,
                   heldout: str | None, scheduler: str | None, persist: Any, resume: bool,
                   accelerate: str | None = None) -> str:
    """The body of every family's fit flow (call it inside a ``@flow``); returns the model path.

    ``n_init`` restarts, each checkpointed on its own; the model saved is the restart with the
    best final objective (the first of equals), as the estimator's ``fit`` keeps.
    ``accelerate`` is the estimator's (None: plain EM); the summary counts the passes over the
    data (``n_passes`` in the model's ``fit_info_`` counts those of its EM task).
    """
    if accelerate not in (None, "none"):
        cfg = {**cfg, "accelerate": accelerate}
    scheduler = resolve_scheduler(scheduler)
    # one run at a time writes `out` (its checkpoints and the model): a second fails here
    with output_locked(out, adapter.lock_name), compute(scheduler) as (sched, dashboard), \
            dask_performance_report(sched, dashboard, out):
        publish_dashboard_link(dashboard, scheduler)
        info = validate(adapter, data, cfg, sched, heldout)
        progress_id = create_progress_artifact(0.0, key=adapter.key("progress"), description="EM iterations done")
        fitted, passes = [], 1  # the validation pass
        for init in range(n_init):
            chash = adapter.trajectory_hash(cfg, init)
            ck = checkpoint_path(out, init)
            passes += initialise(adapter, data, cfg, sched, ck, info, chash, resume, init, n_init).get("n_passes", 0)
            fitted.append(em_iterations(adapter, data, cfg, sched, persist, ck, info, chash, progress_id, init,
                                        n_init))
        best = fitted[0]
        for est in fitted[1:]:
            if est.lower_bound_ > best.lower_bound_:
                best = est
        best.fit_info_["n_init"] = n_init  # the fit as a whole, as the estimator's own records it
        passes += sum(int(e.fit_info_.get("n_passes") or 0) for e in fitted)  # none for a restored one
        path = save(best, out)
        metrics = evaluate(adapter, path, data, heldout, sched)
    create_markdown_artifact(_summary(adapter, best, metrics, info, path, cfg, [e.lower_bound_ for e in fitted],
                                      passes),
                             key=adapter.key("summary"), description="Fitted model, convergence and criteria")
    adapter.publish(best)
    return path
