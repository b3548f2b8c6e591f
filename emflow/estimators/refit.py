"""Refit a saved model of any registered family on data that grew since it was fitted.

One implementation for the ``emflow refit`` command and the ``emflow-refit`` flow
(flows/refit.py), written once for every family in :data:`emflow.estimators.REGISTRY`:

1. :func:`check_schema`: the data must still be what the model was fitted on, in layout
   (the stored group's ``kind``: rows, sequences or corpus, the family's ``data_kind``),
   number of features and dtype; otherwise a :class:`~emflow.errors.DataError` (a
   :class:`~emflow.errors.FeatureMismatchError` for the features) that says what changed,
   raised before anything is written.
2. :func:`refit`: the saved parameters are the start (``fit(..., initial_params=...)``, which
   every family takes), EM runs on the grown data, and a :func:`report` says what happened:
   the partitions new / changed / reused (from the statistics ledger, when the estimator keeps
   one), the passes, the bytes read and the objective before and after.

"Before" is the objective *on the grown data* of the parameters the refit starts from, from
its first E-step (``history_[0]``, no extra pass): the saved model's parameters, or, when
the ledger's statistics are reused, the parameters those statistics were computed at (the
ones entering the saved model's last iteration; ``report()["before_params"]`` says which).
The saved model's own ``lower_bound_`` (on the data it was fitted on) is reported too, as
``previous_lower_bound``: the two differ by what the appended data add.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from ..errors import DataError, FeatureMismatchError, ModelFormatError

__all__ = ["default_ledger", "check_out", "check_schema", "prepare", "fit_prepared", "refit", "report", "report_rows"]

_SIZE_KEYS = ("n_samples", "n_sequences", "n_docs")


def default_ledger(model_path: str | os.PathLike) -> str:
    """The ledger a refit of ``model_path`` uses unless told otherwise: ``<model>.ledger``
    beside the model (never inside the data store)."""
    return os.fspath(model_path).rstrip("/\\") + ".ledger"


def check_out(model_path: str | os.PathLike, data: Any, out: str | os.PathLike | None = None, *,
              overwrite: bool = False) -> str:
    """Where the refitted model goes (``out``, by default over ``model_path``), refused before
    any work unless that loses nothing: an emflow model there is replaced only with
    ``overwrite``, anything else never, and ``out`` may not be (or hold) the data, nor another
    model than the one refitted. Returns the absolute path."""
    from ..storage.destinations import check_destination

    target = os.fspath(out if out is not None else model_path)
    inputs = [("DATA", data)]
    if os.path.abspath(target) != os.path.abspath(os.fspath(model_path)):
        inputs.append(("MODEL", model_path))
    return check_destination(target, "model", overwrite=overwrite, inputs=inputs)


def _stored_kind(data: Any) -> str | None:
    """The ``kind`` attribute of a stored emflow dataset (rows, sequences, corpus), or None."""
    if not isinstance(data, (str, os.PathLike)):
        return None
    import zarr

    from ..storage.chunks import _url

    try:
        node = zarr.open(_url(os.fspath(data)), mode="r")
    except Exception:  # not a Zarr store: the opener below says so
        return None
    kind = node.attrs.get("kind") if isinstance(node, zarr.Group) else None
    return kind if isinstance(kind, str) else None


def _load(path):
    """The saved model at ``path``, of whichever registered family it names (as ``emflow.load``)."""
    from ..storage.store import read_model_attrs
    from . import discover

    family = read_model_attrs(path)["family"]
    if family not in discover():
        raise ModelFormatError(f"The model at {os.fspath(path)!r} is of family {family!r}, which this emflow "
                               "does not know. Upgrade emflow.")
    return discover()[family].load(path)


def check_schema(model, data: Any):
    """Open ``data`` as ``model``'s family reads it and refuse it if its schema changed.

    Compared with what the saved model records: the layout (the stored group's ``kind``
    against the family's ``data_kind``), the number of features (``n_features_in_``) and
    the dtype (``fit_info_["dtype"]``). Nothing is written. Returns the opened data.

    Raises
    ------
    FeatureMismatchError
        The number of features changed.
    DataError
        The layout or the dtype changed (or the data do not open as the family's layout).
    """
    from ..storage.layouts import open_stored

    cls = type(model)
    where = f"Refusing to refit the {cls.__name__} ({cls.family}) model on {os.fspath(data)!r}"
    kind = _stored_kind(data)
    if kind is not None and kind != cls.data_kind:
        raise DataError(f"{where}: the data are a {kind!r} dataset; the model was fitted on {cls.data_kind!r} "
                        f"data. Fit a new model (`emflow fit`) for these data instead.")
    opened = open_stored(cls.data_kind, data, allow_nan=model._allows_nan())
    expected = getattr(model, "n_features_in_", None)
    if expected is not None and int(opened.n_features) != int(expected):
        raise FeatureMismatchError(
            f"{where}: the data have {opened.n_features} features; the model was fitted on {expected}. "
            "A refit continues the same model on more of the same data; fit a new model for a new schema.")
    dtype = (getattr(model, "fit_info_", None) or {}).get("dtype")
    if dtype is not None and str(opened.dtype) != str(dtype):
        raise DataError(
            f"{where}: the data's dtype is {opened.dtype}; the model was fitted on {dtype} data. Write the "
            f"appended data as {dtype}, or fit a new model.")
    return opened


def prepare(model_path: str | os.PathLike, data: Any, *, ledger: str | None = None,
            out: str | os.PathLike | None = None, max_iter: int | None = None, scheduler: Any = None,
            persist: Any = "auto"):
    """Load the model, check the data's schema and configure the warm-started estimator.

    Nothing is read beyond the model and the data's structure, and nothing is written.
    Returns ``(estimator, opened data, state)`` where ``state`` holds what the saved model
    recorded (for :func:`report`) and the starting parameters.

    The ledger is ``ledger`` when given (read and rewritten there); else the one beside the
    refitted model, ``<out>.ledger`` (``out`` defaults to ``model_path``): with ``out``
    elsewhere, :func:`fit_prepared` first copies ``<model>.ledger`` there (when it exists and
    ``<out>.ledger`` does not), so each saved model keeps the ledger of its own fit.
    """
    from ..checks import check_int

    est = _load(model_path)
    opened = check_schema(est, data)
    info = dict(getattr(est, "fit_info_", None) or {})
    state = {
        "model": os.fspath(model_path),
        "params": est._get_parameters(),
        "previous_lower_bound": float(est.lower_bound_),
        "previous_fingerprint": info.get("fingerprint"),
        "previous_partitions": info.get("partitions"),
        "previous_size": next((int(info[k]) for k in _SIZE_KEYS if info.get(k) is not None), None),
        "ledger": None,
    }
    names = est._get_param_names()
    updates: dict[str, Any] = {"persist": persist}
    if max_iter is not None:
        check_int("max_iter", max_iter, 1)
        updates[type(est).iter_param] = int(max_iter)
    if "n_init" in names:
        updates["n_init"] = 1  # the saved model is the one start
    if "ledger" in names:  # estimators that keep the statistics ledger (incremental EM)
        if ledger is not None:
            state["ledger"] = os.fspath(ledger)
        else:
            state["ledger"] = default_ledger(out if out is not None else model_path)
            if os.path.abspath(state["ledger"]) != os.path.abspath(default_ledger(model_path)):
                state["ledger_from"] = default_ledger(model_path)
        updates["ledger"] = state["ledger"]
    est.set_params(**{k: v for k, v in updates.items() if k in names})
    est.scheduler = scheduler
    return est, opened, state


def refit(model_path: str | os.PathLike, data: Any, *, ledger: str | None = None,
          out: str | os.PathLike | None = None, max_iter: int | None = None, callbacks: Iterable = (),
          scheduler: Any = None, persist: Any = "auto"):
    """Warm-start the saved model at ``model_path`` on ``data``; returns ``(estimator, report)``.

    The model is not saved here (``out`` only places the default ledger; the caller saves,
    as ``emflow refit --out`` does).
    """
    est, opened, state = prepare(model_path, data, ledger=ledger, out=out, max_iter=max_iter,
                                 scheduler=scheduler, persist=persist)
    fit_prepared(est, data, state, callbacks)
    return est, report(est, state)


def fit_prepared(est, data: Any, state: dict, callbacks: Iterable = ()):
    """Run the warm-started EM of :func:`prepare`'s estimator; returns it (fitted).

    The start is the saved parameters (``initial_params``, which every family takes); the fit
    is a warm start (``fit(..., warm_start=True)``, every family), so that the ledger's
    statistics are reused: only the partitions it does not hold are read first
    (:mod:`emflow.estimators.incremental`).
    """
    source = state.get("ledger_from")
    if source and os.path.isdir(source) and not os.path.exists(state["ledger"]):
        import shutil

        # the input model's ledger stays its own (and a fit's lock on it is not copied)
        shutil.copytree(source, state["ledger"], ignore=shutil.ignore_patterns("lock.json"))
    est.fit(data, callbacks=list(callbacks), initial_params=state["params"], warm_start=True)
    return est


def report(est, state: dict) -> dict[str, Any]:
    """What a refit did, as plain JSON-ready values.

    Keys: ``family``, ``n_passes``, ``n_iter``, ``converged``, ``log_likelihood_before`` (the
    refit's first E-step: the objective on the grown data of the parameters named by
    ``before_params``, "saved model", or "ledger version" when ledger statistics were
    reused: the parameters entering the saved model's last iteration), ``log_likelihood_after``,
    ``previous_lower_bound`` (the saved model on its own data), ``size_before`` /
    ``size_after`` (rows, sequences or documents), ``partitions_total``, ``partitions_new``,
    ``partitions_changed``, ``partitions_reused``, ``bytes_read`` (the last four from the
    ledger; None without one), ``ledger`` (its path or None), ``fingerprint_before`` /
    ``fingerprint_after``, ``data_changed``.
    """
    info = est.fit_info_
    led = info.get("ledger") or {}
    history = list(est.history_)
    size_after = next((int(info[k]) for k in _SIZE_KEYS if info.get(k) is not None), None)
    return {
        "family": est.family,
        "objective": est.objective_name,
        "n_passes": int(est.n_passes_),
        "n_iter": int(est.n_iter_),
        "converged": bool(est.converged_),
        "log_likelihood_before": float(history[0]) if history else None,
        # with reused ledger statistics, the first E-step is at the ledger's parameter version
        "before_params": "ledger version" if led.get("partitions_reused") else "saved model",
        "log_likelihood_after": float(est.lower_bound_),
        "previous_lower_bound": state["previous_lower_bound"],
        "size_before": state["previous_size"],
        "size_after": size_after,
        "partitions_total": int(led.get("partitions_total", info.get("partitions") or 0)),
        "partitions_before": state["previous_partitions"],
        "partitions_new": led.get("partitions_new"),
        "partitions_changed": led.get("partitions_changed"),
        "partitions_reused": led.get("partitions_reused"),
        "bytes_read": led.get("bytes_read", info.get("bytes_read")),  # the engine's counter
        "ledger": led.get("path", state.get("ledger")),
        "fingerprint_before": state["previous_fingerprint"],
        "fingerprint_after": info.get("fingerprint"),
        "data_changed": info.get("fingerprint") != state["previous_fingerprint"],
    }


_BEFORE = {"saved model": "saved model on the grown data",
           "ledger version": "ledger's parameters on the grown data"}


def _count(v) -> str:
    return "n/a" if v is None else f"{v:,}"


def report_rows(rep: dict) -> list[tuple[str, str]]:
    """:func:`report` as ``(field, value)`` text rows (the command's table, the flow's summary)."""
    counts = [rep[k] for k in ("partitions_new", "partitions_changed", "partitions_reused")]
    obj = rep["objective"]
    return [
        ("family", rep["family"]),
        ("partitions", f"{rep['partitions_total']} (last fit: {_count(rep['partitions_before'])})"),
        ("new / changed / reused", "n/a (no ledger)" if all(v is None for v in counts)
         else " / ".join(_count(v) for v in counts)),
        ("passes over the data", str(rep["n_passes"])),
        ("bytes read", _count(rep["bytes_read"]) + (" (no ledger)" if rep["bytes_read"] is None else "")),
        ("iterations", f"{rep['n_iter']} ({'converged' if rep['converged'] else 'not converged'})"),
        (f"{obj} before", f"{rep['log_likelihood_before']:.10g} ({_BEFORE[rep['before_params']]})"),
        (f"{obj} after", f"{rep['log_likelihood_after']:.10g}"),
        ("saved lower_bound_", f"{rep['previous_lower_bound']:.10g} (on the data it was fitted on)"),
        ("size", f"{_count(rep['size_before'])} -> {_count(rep['size_after'])}"),
        ("data changed", "yes" if rep["data_changed"] else "no (same fingerprint)"),
        ("ledger", str(rep["ledger"] or "none (this estimator keeps no ledger)")),
    ]
