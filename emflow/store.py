"""Model store: a fitted model as a Zarr group (arrays + JSON attributes), written atomically.

Layout::

    model.zarr/
      zarr.json              attrs["emflow"] = {format, family, version, config, fitted,
                                                history, dataset, created}
      weights, means, ...    float64 arrays, one per fitted parameter

A save writes the whole group under a temporary sibling name and moves it into place with
``os.replace``, so a crash leaves either the old model or the new one, never half of one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from typing import Any

import numpy as np

from .errors import DataNotFoundError, ModelFormatError, StorageError

__all__ = ["FORMAT_VERSION", "save_model", "load_model", "read_model_attrs", "atomic_dir"]

FORMAT_VERSION = 1


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return repr(obj)  # "inf", "-inf", "nan": strict JSON has no literal for them
    return obj


class atomic_dir:
    """Context manager: yields a temporary directory that replaces ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        self.tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        try:
            if os.path.isdir(self.path) and not os.path.islink(self.path):
                old = self.tmp.replace(".tmp-", ".old-")
                os.replace(self.path, old)
                os.replace(self.tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.path)
        except BaseException:
            if old is not None and os.path.isdir(old) and not os.path.exists(self.path):
                os.replace(old, self.path)  # put the previous version back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def save_model(path, family: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Write a model group atomically; returns the absolute path."""
    try:
        return _save_model(path, family, arrays, meta)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(
            f"Could not write the model to {os.fspath(path)!r}: {exc.strerror or exc}. Nothing was changed "
            "there (a model already at that path is intact). Free some space, or save to a writable location."
        ) from exc


def _save_model(path, family, arrays, meta) -> str:
    import zarr

    with atomic_dir(path) as tmp:
        group = zarr.open_group(tmp, mode="w")
        for name, value in arrays.items():
            value = np.asarray(value)
            group.create_array(name, data=value, chunks=value.shape or (1,), compressors=None)
        attrs = {
            "format": FORMAT_VERSION,
            "family": family,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **meta,
        }
        group.attrs["emflow"] = _json_safe(attrs)
    return os.path.abspath(os.fspath(path))


def read_model_attrs(path) -> dict[str, Any]:
    """The ``emflow`` attributes of a stored model (raises if ``path`` is not a model)."""
    import zarr

    p = os.fspath(path)
    if "://" not in p and not os.path.exists(p):
        raise DataNotFoundError(f"No model at {p!r}. Check the path (a model is written by `emflow fit --out`).")
    try:
        group = zarr.open_group(p, mode="r")
    except Exception as exc:
        raise ModelFormatError(f"{p!r} is not a Zarr group, so not an emflow model ({exc}).") from exc
    meta = group.attrs.get("emflow")
    if not isinstance(meta, dict) or "family" not in meta:
        raise ModelFormatError(
            f"{p!r} is a Zarr group but not an emflow model (no 'emflow' attributes). "
            "If it is a dataset, use it as DATA, not MODEL."
        )
    if int(meta.get("format", 0)) > FORMAT_VERSION:
        raise ModelFormatError(
            f"{p!r} was written in model format {meta['format']} by emflow {meta.get('version')}; "
            f"this emflow reads format {FORMAT_VERSION}. Upgrade emflow to load it."
        )
    return meta


def load_model(path, family: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a model group; ``family`` (when given) must match the stored family."""
    import zarr

    meta = read_model_attrs(path)
    if family is not None and meta["family"] != family:
        raise ModelFormatError(
            f"The model at {os.fspath(path)!r} is a {meta['family']!r} model, not {family!r}. "
            "Load it with emflow.load(path), which picks the right class."
        )
    group = zarr.open_group(os.fspath(path), mode="r")
    arrays = {name: np.asarray(arr[...]) for name, arr in group.arrays()}
    return arrays, meta


def restore_fit_record(model, meta: dict[str, Any]) -> None:
    """Set the fitted attributes every family saves (``converged_``, ``n_iter_``,
    ``lower_bound_``, ``n_features_in_`` where saved, ``history_``, ``fit_info_``) from the
    attributes :func:`load_model` returned."""
    fitted = meta["fitted"]
    model.converged_ = bool(fitted["converged"])
    model.n_iter_ = int(fitted["n_iter"])
    model.lower_bound_ = float(fitted["lower_bound"])
    if "n_features_in" in fitted:
        model.n_features_in_ = int(fitted["n_features_in"])
    model.history_ = [float(v) for v in meta["history"]]
    model.fit_info_ = dict(meta.get("dataset", {}))


def to_json(obj: Any) -> str:
    return json.dumps(_json_safe(obj))
