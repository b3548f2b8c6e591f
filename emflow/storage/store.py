"""Model store: a fitted model as a Zarr group (arrays + JSON attributes), replaced atomically.

Layout (format 2)::

    model.zarr/
      zarr.json              attrs["emflow"] = {format, family, version, config, fitted, history,
                                                dataset, created, current, arrays}
      v-<tag>/               the current version: a Zarr group of float64 arrays (weights, means...)
      v-<tag>/               the previous version, kept until the next save (for readers in flight)

``model.zarr`` stays an ordinary Zarr group (``cp -r`` and ``zarr.open_group`` work on it).
The root ``zarr.json`` is the one pointer: ``current`` names the version subgroup that holds the
arrays, and ``arrays`` records each array's shape, dtype and SHA-256, checked on load.

Writing never loses a model:

* a new path is written whole under a temporary sibling (``.NAME.tmp-<tag>``) and renamed into
  place;
* replacing a model writes a new version subgroup inside it, then swaps ``zarr.json`` with one
  ``os.replace`` (readers see the old model or the new one, never neither), then removes
  versions older than the previous one;
* temporaries carry the writer's pid and host in their ``<tag>``; the next write removes those
  of writers that are gone (never those of a writer still running) and puts back a directory a
  crashed :class:`~emflow.storage.destinations.atomic_dir` replacement had moved aside.

What a model may contain: arrays of numbers and JSON attributes (configuration, fit record,
dataset description). Never a scheduler address, a callback or anything executable: ``save``
drops them and ``load`` ignores them in older files, so loading never connects anywhere.

Format-1 models (arrays at the root) still load.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import threading
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import destinations as _dest
from . import validation as _validation
from ..errors import ConfigError, DataNotFoundError, ModelFormatError, StorageError

__all__ = ["FORMAT_VERSION", "save_model", "load_model", "read_model_attrs", "EXECUTION_KEYS"]

FORMAT_VERSION = 2
POINTER = "zarr.json"
# configuration keys that say where (or how) to compute: the caller's choice at call time,
# never saved, ignored when found in an older file
EXECUTION_KEYS = ("scheduler", "callbacks")


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


# -- saving ----------------------------------------------------------------------------------
def _digest(value: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{value.dtype.str}{tuple(value.shape)}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_version(group_dir: str, arrays: Mapping[str, np.ndarray]) -> dict[str, dict]:
    import zarr

    group = zarr.open_group(group_dir, mode="w-")
    table = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        chunks = tuple(max(1, s) for s in value.shape) or (1,)
        # every chunk is written, even one equal to the fill value, so a missing chunk is damage
        group.create_array(name, data=value, chunks=chunks, compressors=None, config={"write_empty_chunks": True})
        table[name] = {"shape": list(value.shape), "dtype": value.dtype.str, "sha256": _digest(value)}
    return table


def _write_pointer(model_dir: str, attrs: dict) -> None:
    """Replace ``model_dir/zarr.json`` in one rename (the single step that swaps versions)."""
    doc = {"attributes": {"emflow": attrs}, "zarr_format": 3, "node_type": "group"}
    tmp = os.path.join(model_dir, f".{POINTER}.tmp-{_dest.temp_tag()}")
    try:
        with open(tmp, "wb") as f:
            f.write(json.dumps(doc, indent=2).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(model_dir, POINTER))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(model_dir)


def _prune(model_dir: str, keep: set[str]) -> None:
    """Remove versions and pointer temporaries in ``model_dir`` not in ``keep`` whose writer is
    gone, and the root arrays of a format-1 model."""
    for name in os.listdir(model_dir):
        if name == POINTER or name in keep:
            continue
        full = os.path.join(model_dir, name)
        if name.startswith("v-") or name.startswith(f".{POINTER}.tmp-"):
            mine = _dest.written_here(name)
            # this process writes one version of a path at a time (_SAVE_LOCK), so its own
            # versions not kept are finished and superseded
            if mine or not _dest.writer_alive(name, full):
                _dest.remove_path(full)
        elif os.path.isdir(full) and os.path.exists(os.path.join(full, POINTER)):
            try:
                node = _dest.read_json(os.path.join(full, POINTER)).get("node_type")
            except (OSError, ValueError, AttributeError):
                continue
            if node == "array":  # a format-1 model's arrays, superseded by a version
                _dest.remove_path(full)


def save_model(path, family: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], *,
               overwrite: bool = False, inputs: Iterable[tuple[str, Any]] = ()) -> str:
    """Write a model at ``path``; returns the absolute path.

    A model already there is replaced only with ``overwrite`` (in one rename, see the module
    doc); anything else there is never replaced. ``inputs`` (``(what, path)`` pairs, e.g. the
    data the model was fitted on) may not be, contain or be inside ``path``.
    """
    if "://" in os.fspath(path):
        raise ConfigError(f"Models are saved to a local (or mounted) path, not {os.fspath(path)!r}.")
    out = _dest.check_destination(path, "model", overwrite=overwrite, inputs=inputs)
    try:
        return _save_model(out, family, arrays, meta)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(
            f"Could not write the model to {os.fspath(path)!r}: {exc.strerror or exc}. Nothing was changed "
            "there (a model already at that path is intact). Free some space, or save to a writable location."
        ) from exc


def _model_attrs(family: str, meta: dict[str, Any], version: str, table: dict) -> dict:
    meta = dict(meta)
    meta["config"] = {k: v for k, v in dict(meta.get("config", {})).items() if k not in EXECUTION_KEYS}
    attrs = {
        "format": FORMAT_VERSION,
        "family": family,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "current": version,
        "arrays": table,
    }
    return _json_safe(attrs)


_SAVE_LOCK = threading.RLock()


def _save_model(out: str, family: str, arrays, meta) -> str:
    with _SAVE_LOCK:
        return _save_model_locked(out, family, arrays, meta)


def _save_model_locked(out: str, family: str, arrays, meta) -> str:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _dest.clean_leftovers(out)
    version = f"v-{_dest.temp_tag()}"
    found, _ = _dest.destination_kind(out)
    if found == "model":
        previous = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            em = _dest.read_json(os.path.join(out, POINTER))["attributes"]["emflow"]
            previous = em.get("current") if isinstance(em.get("current"), str) else None
        _prune(out, keep={previous} if previous else set())
        vdir = os.path.join(out, version)
        try:
            table = _write_version(vdir, arrays)
            _fsync_dir(out)
            _write_pointer(out, _model_attrs(family, meta, version, table))
        except BaseException:
            shutil.rmtree(vdir, ignore_errors=True)
            raise
        _prune(out, keep={version, previous} if previous else {version})
        return out
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{_dest.temp_tag()}")
    try:
        os.mkdir(tmp)
        table = _write_version(os.path.join(tmp, version), arrays)
        _write_pointer(tmp, _model_attrs(family, meta, version, table))
        os.replace(tmp, out)  # onto nothing, or onto an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return out


# -- loading ---------------------------------------------------------------------------------
def _check_meta(p: str, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict) or "family" not in meta:
        raise ModelFormatError(
            f"{p!r} is a Zarr group but not an emflow model (no 'emflow' attributes). "
            "If it is a dataset, use it as DATA, not MODEL."
        )
    fmt = meta.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise ModelFormatError(f"The model at {p!r} has format {fmt!r}, not an integer: the file is damaged. "
                               "Re-save it from the fitted estimator (or refit).")
    if fmt > FORMAT_VERSION:
        raise ModelFormatError(
            f"{p!r} was written in model format {fmt} by emflow {meta.get('version')}; "
            f"this emflow reads formats up to {FORMAT_VERSION}. Upgrade emflow to load it."
        )
    if not isinstance(meta["family"], str):
        raise ModelFormatError(f"The model at {p!r} names family {meta['family']!r}, not a string: damaged.")
    return meta


def _check_content(p: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The attributes a model needs beyond its family and format (checked when it is loaded)."""
    fmt = meta["format"]
    for key, typ in (("config", dict), ("fitted", dict)):
        if not isinstance(meta.get(key), typ):
            raise ModelFormatError(
                f"The model at {p!r} has no {key!r} attribute (or it is not a {typ.__name__}): the file is "
                "damaged or was not written by emflow. Re-save it from the fitted estimator (or refit).")
    if not isinstance(meta.get("history", []), list):
        raise ModelFormatError(f"The model at {p!r} has a 'history' that is not a list: damaged.")
    if fmt >= 2:
        if not isinstance(meta.get("current"), str) or not re.fullmatch(r"v-[A-Za-z0-9_.@-]+", meta["current"]):
            raise ModelFormatError(f"The model at {p!r} names no valid current version: damaged.")
        if not isinstance(meta.get("arrays"), dict):
            raise ModelFormatError(f"The model at {p!r} has no 'arrays' table: damaged.")
    return meta


def read_model_attrs(path) -> dict[str, Any]:
    """The ``emflow`` attributes of a stored model (raises if ``path`` is not a model)."""
    p = os.fspath(path)
    if "://" not in p:
        if not os.path.exists(p):
            raise DataNotFoundError(f"No model at {p!r}. Check the path (a model is written by `emflow fit --out`).")
        ptr = os.path.join(p, POINTER)
        if not os.path.isfile(ptr):
            raise ModelFormatError(f"{p!r} is not a Zarr group (no zarr.json), so not an emflow model.")
        try:
            doc = _dest.read_json(ptr)
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{p!r} has an unreadable zarr.json ({exc}), so it is not a usable model.") from exc
        if not isinstance(doc, dict) or doc.get("node_type") != "group":
            raise ModelFormatError(f"{p!r} is not a Zarr group, so not an emflow model.")
        attrs = doc.get("attributes") or {}
        return _check_meta(p, attrs.get("emflow") if isinstance(attrs, dict) else None)
    import zarr

    try:
        group = zarr.open_group(p, mode="r")
    except Exception as exc:
        raise ModelFormatError(f"{p!r} is not a Zarr group, so not an emflow model ({exc}).") from exc
    return _check_meta(p, group.attrs.get("emflow"))


class _Gone(Exception):
    """The version a reader was told to read disappeared (a writer replaced it meanwhile)."""


def _read_arrays(path: str, meta: dict) -> dict[str, np.ndarray]:
    import zarr

    fmt = meta["format"]
    root = path if fmt < 2 else path.rstrip("/") + "/" + meta["current"]
    if "://" not in root and not os.path.isdir(root):
        raise _Gone(root)
    try:
        group = zarr.open_group(root, mode="r")
        members = dict(group.arrays())
    except Exception as exc:
        raise _Gone(f"{root}: {exc}") from exc
    names = list(meta["arrays"]) if fmt >= 2 else list(members)
    out = {}
    for name in names:
        arr = members.get(name)
        if arr is None:
            if fmt >= 2:
                raise _Gone(f"{root}/{name}")
            continue
        try:
            value = np.asarray(arr[...])
            # format 1 did not write chunks equal to the fill value: there a missing chunk may be
            # zeros, and only the family's constraints can tell
            present = arr.nchunks_initialized if arr.size and fmt >= 2 else arr.nchunks
        except Exception as exc:
            raise _Gone(f"{root}/{name}: {exc}") from exc
        if present != arr.nchunks:
            raise _Missing(name, f"{arr.nchunks - present} of its {arr.nchunks} chunk(s) are missing")
        out[name] = value
    if fmt >= 2:
        for name, entry in meta["arrays"].items():
            v = out[name]
            if not isinstance(entry, dict) or entry.get("sha256") != _digest(v):
                raise _Missing(name, "its contents do not match the digest recorded when it was saved "
                                     "(altered or partly deleted)")
    return out


class _Missing(Exception):
    def __init__(self, name: str, why: str):
        super().__init__(name, why)
        self.name, self.why = name, why


def load_model(path, family: str | None = None, spec: Callable[[dict], dict] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a model group; ``family`` (when given) must match the stored family.

    The arrays are read from the version the pointer names (retried if a writer replaced it
    meanwhile), checked against their recorded digests (format 2) or for missing chunks
    (format 1), and against ``spec`` (see :func:`~emflow.storage.validation.validate_arrays`). Execution settings stored
    by older versions (``scheduler``) are dropped from the returned config.
    """
    p = os.fspath(path)
    for attempt in range(4):
        meta = read_model_attrs(p)
        if family is not None and meta["family"] != family:
            raise ModelFormatError(
                f"The model at {p!r} is a {meta['family']!r} model, not {family!r}. "
                "Load it with emflow.load(path), which picks the right class."
            )
        _check_content(p, meta)
        try:
            arrays = _read_arrays(p, meta)
        except (_Gone, _Missing) as exc:
            if attempt < 3 and _pointer_changed(p, meta):
                continue  # a writer swapped versions while we read: read the new one
            if isinstance(exc, _Missing):
                raise ModelFormatError(
                    f"The model at {p!r} is damaged: array {exc.name!r}: {exc.why}. Re-save it from the "
                    "fitted estimator, or refit."
                ) from None
            raise ModelFormatError(
                f"The model at {p!r} is damaged: {exc}. Re-save it from the fitted estimator, or refit."
            ) from None
        break
    meta = dict(meta)
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in EXECUTION_KEYS}
    if spec is not None:
        _validation.validate_arrays(p, arrays, meta, spec)
    meta["_loaded_from"] = os.path.abspath(p) if "://" not in p else p
    return arrays, meta


def _pointer_changed(p: str, meta: dict) -> bool:
    try:
        now = read_model_attrs(p)
    except Exception:
        return True
    return (now.get("current"), now.get("created"), now.get("format")) != (
        meta.get("current"), meta.get("created"), meta.get("format"))




@contextlib.contextmanager
def loading(path):
    """Turn what a damaged model's attributes make a family's ``load`` raise into ModelFormatError."""
    try:
        yield
    except ModelFormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        if isinstance(exc, ConfigError):
            msg = str(exc)
        else:
            msg = f"{type(exc).__name__}: {exc}"
        raise ModelFormatError(
            f"The model at {os.fspath(path)!r} cannot be loaded ({msg}): the file is damaged or was not "
            "written by emflow. Re-save it from the fitted estimator, or refit."
        ) from None


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
    model._loaded_from = meta.get("_loaded_from")


def saved_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor parameters a model saves: all but where to compute (EXECUTION_KEYS)."""
    return {k: v for k, v in params.items() if k not in EXECUTION_KEYS}


def fit_inputs(model) -> list[tuple[str, Any]]:
    """``(what, path)`` pairs a saved model may not overwrite: the data it was fitted on."""
    src = (getattr(model, "fit_info_", None) or {}).get("source")
    return [("the data the model was fitted on", src)] if isinstance(src, str) else []


def to_json(obj: Any) -> str:
    return json.dumps(_json_safe(obj))
