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
  crashed :class:`atomic_dir` replacement had moved aside.

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
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import ConfigError, DataNotFoundError, ModelFormatError, StorageError

__all__ = [
    "FORMAT_VERSION", "save_model", "load_model", "read_model_attrs", "atomic_dir", "check_destination",
    "destination_kind", "validate_arrays", "clean_leftovers", "EXECUTION_KEYS",
]

FORMAT_VERSION = 2
POINTER = "zarr.json"
# configuration keys that say where (or how) to compute: the caller's choice at call time,
# never saved, ignored when found in an older file
EXECUTION_KEYS = ("scheduler", "callbacks")
# a temporary whose name carries no pid (older emflow) or another host's is removed once this old
STALE_SECONDS = 24 * 3600
_LEGACY_STALE_SECONDS = 600
_SIMPLEX_ATOL = 1e-8


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


# -- temporary names: who wrote them, and is that writer still alive -------------------------
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname() or "host")[:64]
_TAG_RE = re.compile(r"(?P<t>[0-9a-f]+)_(?P<pid>\d+)_(?P<r>[0-9a-f]+)@(?P<host>[A-Za-z0-9.-]+)$")


def _tag() -> str:
    """A unique suffix naming this writer: time, pid, random, host."""
    return f"{time.time_ns():x}_{os.getpid()}_{uuid.uuid4().hex[:8]}@{_HOST}"


def _writer_alive(name: str, full: str) -> bool:
    """Whether the writer that created the temporary ``name`` (at ``full``) may still be running."""
    m = _TAG_RE.search(name)
    try:
        age = time.time() - os.lstat(full).st_mtime
    except OSError:
        return False
    if m is None:
        return age < _LEGACY_STALE_SECONDS
    if m["host"] != _HOST:
        return age < STALE_SECONDS
    pid = int(m["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(full: str) -> None:
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(full)


def clean_leftovers(path: str | os.PathLike) -> list[str]:
    """Remove what crashed writes of ``path`` left beside it; returns what was removed.

    ``.NAME.tmp-*`` (a directory being written, or a checkpoint ``NAME.checkpoint.npz`` being
    written) of writers that are gone are deleted; a ``.NAME.old-*`` left by a replacement that
    crashed between its two renames is put back at ``NAME`` if nothing is there, else deleted.
    Temporaries of writers still running are left alone.
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.dirname(path), os.path.basename(path)
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    prefixes = (f".{base}.tmp-", f".{base}.old-", f".{base}.checkpoint.npz.tmp-")
    init_ckpt = re.compile(rf"^\.{re.escape(base)}\.init\d+\.checkpoint\.npz\.tmp-")
    for name in sorted(names):
        if not (name.startswith(prefixes) or init_ckpt.match(name)):
            continue
        full = os.path.join(parent, name)
        if _writer_alive(name, full):
            continue
        if name.startswith(f".{base}.old-") and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(full, path)  # the previous version goes back where it was
                continue
        _remove(full)
        removed.append(full)
    return removed


def clean_checkpoint_leftovers(path: str | os.PathLike) -> list[str]:
    """Remove ``.FILE.tmp-*`` beside the file ``path`` left by writers that are gone."""
    path = os.path.abspath(os.fspath(path))
    parent, prefix = os.path.dirname(path), f".{os.path.basename(path)}.tmp-"
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            full = os.path.join(parent, name)
            if name.startswith(prefix) and not _writer_alive(name, full):
                _remove(full)
                removed.append(full)
    return removed


class atomic_dir:
    """Context manager: yields a temporary directory that replaces ``path`` on success.

    With ``kind`` ("dataset", "output"), what is at ``path`` is first checked with
    :func:`check_destination` (replaced only with ``overwrite``, and only if it is an emflow
    ``kind``). On an exception the temporary directory is removed and ``path`` is untouched. Leftovers
    of crashed writes of ``path`` are cleaned (or recovered) first, see :func:`clean_leftovers`.
    Replacing an existing directory takes two renames (it moves aside, the new one moves in);
    a crash between them is repaired by the next write. Models use :func:`save_model`, whose
    replacement is a single rename.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str | None = None, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.kind, self.overwrite = kind, overwrite
        parent = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        tag = _tag()
        self.tmp = os.path.join(parent, f".{base}.tmp-{tag}")
        self.old = os.path.join(parent, f".{base}.old-{tag}")

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        if self.kind is not None:  # refuses what must not be replaced (and cleans leftovers)
            check_destination(self.path, self.kind, overwrite=self.overwrite)
        else:
            clean_leftovers(self.path)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        moved = False
        try:
            if os.path.isdir(self.path) and not os.path.islink(self.path) and os.listdir(self.path):
                os.replace(self.path, self.old)
                moved = True
            os.replace(self.tmp, self.path)
            if moved:
                shutil.rmtree(self.old, ignore_errors=True)
        except BaseException:
            if moved and os.path.isdir(self.old) and not os.path.exists(self.path):
                os.replace(self.old, self.path)  # put the previous version back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


# -- what is at a destination, and may it be replaced ---------------------------------------
def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def destination_kind(path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, description)`` of what is at ``path``: kind is "missing", "empty", "model",
    "output" (an array or group emflow wrote from a model), "dataset" or "other"."""
    p = os.path.abspath(os.fspath(path))
    if os.path.islink(p):
        return "other", "a symbolic link"
    if not os.path.exists(p):
        return "missing", "nothing"
    if not os.path.isdir(p):
        return "other", "a file"
    names = os.listdir(p)
    if not names:
        return "empty", "an empty directory"
    if POINTER not in names:
        return "other", "a directory holding other files (not a Zarr store)"
    try:
        meta = _read_json(os.path.join(p, POINTER))
        attrs = meta.get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return "other", "a directory whose zarr.json is not readable"
    em = attrs.get("emflow") if isinstance(attrs, dict) else None
    if isinstance(em, dict) and "family" in em and "format" in em:
        return "model", f"an emflow {em.get('family')} model"
    if isinstance(em, dict) and "model_family" in em:
        return "output", f"an emflow output ({em.get('kind', '?')} of a {em.get('model_family')} model)"
    if isinstance(attrs, dict) and attrs.get("kind") in ("rows", "sequences", "corpus"):
        return "dataset", f"an emflow {attrs['kind']} dataset"
    return "other", "a Zarr store that emflow did not write (someone's data?)"


def _local(p: Any) -> str | None:
    if p is None:
        return None
    if isinstance(p, os.PathLike):
        p = os.fspath(p)
    if not isinstance(p, str) or "://" in p:
        return None
    return os.path.realpath(os.path.abspath(p))


def _overlap(out: str, other: str) -> str | None:
    if out == other:
        return "is"
    try:
        common = os.path.commonpath([out, other])
    except ValueError:
        return None
    if common == other:
        return "is inside"
    if common == out:
        return "contains"
    return None


def check_destination(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
                      inputs: Iterable[tuple[str, Any]] = ()) -> str:
    """Refuse to write a ``kind`` ("model", "output" or "dataset") at ``path`` unless that
    loses nothing.

    ``inputs`` are ``(what, path)`` pairs (the data read, the model applied): an output equal
    to, inside or containing one is always refused. An existing emflow ``kind`` at ``path`` is
    replaced only with ``overwrite``; anything else there (a dataset, other files, a file) never
    is. Raises :class:`ConfigError` saying what to do; returns the absolute path.
    """
    out = os.path.abspath(os.fspath(path))
    # first put back (or remove) what a crashed write of this path left, so the decision
    # below sees what is really there
    clean_leftovers(out)
    real = os.path.realpath(out)
    noun = {"model": "the model", "output": "the output", "dataset": "the dataset"}[kind]
    for what, other in inputs:
        o = _local(other)
        if o is None:
            continue
        rel = _overlap(real, o)
        if rel is not None:
            raise ConfigError(
                f"Refusing to write {noun} to {out!r}: that path {rel} {what} ({os.fspath(other)!r}), which "
                "this command reads. Choose another path."
            )
    found, desc = destination_kind(out)
    if found in ("missing", "empty"):
        return out
    if found == kind:
        if not overwrite:
            raise ConfigError(
                f"{out!r} already holds {desc}. Pass overwrite=True (--overwrite) to replace it, or choose "
                "another path."
            )
        return out
    raise ConfigError(
        f"Refusing to write {noun} to {out!r}: it holds {desc}, which emflow never replaces, even with "
        "overwrite. Choose another path."
    )


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
    tmp = os.path.join(model_dir, f".{POINTER}.tmp-{_tag()}")
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
            m = _TAG_RE.search(name)
            mine = m is not None and m["host"] == _HOST and int(m["pid"]) == os.getpid()
            # this process writes one version of a path at a time (_SAVE_LOCK), so its own
            # versions not kept are finished and superseded
            if mine or not _writer_alive(name, full):
                _remove(full)
        elif os.path.isdir(full) and os.path.exists(os.path.join(full, POINTER)):
            try:
                node = _read_json(os.path.join(full, POINTER)).get("node_type")
            except (OSError, ValueError, AttributeError):
                continue
            if node == "array":  # a format-1 model's arrays, superseded by a version
                _remove(full)


def save_model(path, family: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], *,
               overwrite: bool = False, inputs: Iterable[tuple[str, Any]] = ()) -> str:
    """Write a model at ``path``; returns the absolute path.

    A model already there is replaced only with ``overwrite`` (in one rename, see the module
    doc); anything else there is never replaced. ``inputs`` (``(what, path)`` pairs, e.g. the
    data the model was fitted on) may not be, contain or be inside ``path``.
    """
    if "://" in os.fspath(path):
        raise ConfigError(f"Models are saved to a local (or mounted) path, not {os.fspath(path)!r}.")
    out = check_destination(path, "model", overwrite=overwrite, inputs=inputs)
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
    clean_leftovers(out)
    version = f"v-{_tag()}"
    found, _ = destination_kind(out)
    if found == "model":
        previous = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            em = _read_json(os.path.join(out, POINTER))["attributes"]["emflow"]
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
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{_tag()}")
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
            doc = _read_json(ptr)
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
    (format 1), and against ``spec`` (see :func:`validate_arrays`). Execution settings stored
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
        validate_arrays(p, arrays, meta, spec)
    meta["_loaded_from"] = os.path.abspath(p) if "://" not in p else p
    return arrays, meta


def _pointer_changed(p: str, meta: dict) -> bool:
    try:
        now = read_model_attrs(p)
    except Exception:
        return True
    return (now.get("current"), now.get("created"), now.get("format")) != (
        meta.get("current"), meta.get("created"), meta.get("format"))


# -- validation: each family declares, per array, its shape and constraints -------------------
def _rule_finite(a, axis_desc):
    return None if np.all(np.isfinite(a)) else "holds NaN or infinite values"


def _rule_nonneg(a, _):
    return None if np.all(a >= 0) else "has negative entries"


def _rule_positive(a, _):
    return None if np.all(a > 0) else "has entries that are not > 0"


def _rule_simplex(a, _):
    if a.size == 0:
        return None
    if np.any(a < 0):
        return "has negative probabilities"
    s = a.sum(axis=-1)
    if not np.allclose(s, 1.0, rtol=0, atol=_SIMPLEX_ATOL):
        return f"has rows that do not sum to 1 (sums range {s.min():.12g} .. {s.max():.12g})"
    return None


def _mats(a):
    return a.reshape((-1,) + a.shape[-2:])


def _rule_symmetric(a):
    m = _mats(a)
    scale = max(1.0, float(np.max(np.abs(m))) if m.size else 1.0)
    return bool(np.allclose(m, np.swapaxes(m, -1, -2), rtol=0, atol=1e-10 * scale))


def _rule_spd(a, _):
    if not _rule_symmetric(a):
        return "is not symmetric"
    for m in _mats(a):
        try:
            np.linalg.cholesky(m)
        except np.linalg.LinAlgError:
            return "is not positive definite"
    return None


def _rule_psd(a, _):
    if not _rule_symmetric(a):
        return "is not symmetric"
    for m in _mats(a):
        ev = np.linalg.eigvalsh((m + m.T) / 2)
        if ev.size and ev.min() < -1e-10 * max(1.0, float(np.abs(ev).max())):
            return "is not positive semi-definite"
    return None


def _rule_triangular_posdiag(a, _):
    m = _mats(a)
    if m.size and not np.all(np.diagonal(m, axis1=-2, axis2=-1) > 0):
        return "is not a Cholesky factor (its diagonal is not positive)"
    lower = np.all(np.triu(m, 1) == 0)
    upper = np.all(np.tril(m, -1) == 0)
    return None if (lower or upper) else "is not a Cholesky factor (not triangular)"


RULES: dict[str, Callable[[np.ndarray, Any], str | None]] = {
    "finite": _rule_finite,
    "nonnegative": _rule_nonneg,
    "positive": _rule_positive,
    "simplex": _rule_simplex,  # last axis: non-negative, sums to 1
    "spd": _rule_spd,  # last two axes: symmetric positive definite
    "psd": _rule_psd,  # last two axes: symmetric positive semi-definite
    "cholesky": _rule_triangular_posdiag,  # last two axes: triangular, positive diagonal
}


def validate_arrays(path: str, arrays: Mapping[str, np.ndarray], meta: dict,
                    spec: Callable[[dict], Mapping[str, tuple]]) -> None:
    """Check a model's arrays against its family's declaration; ModelFormatError naming the array.

    ``spec(meta)`` returns ``{name: (shape, rules)}`` (or ``(shape, rules, optional)``): the
    arrays the family stores, the shape each must have given the configuration, and the names
    of :data:`RULES` each must satisfy. A spec that cannot be computed from the attributes
    (missing or ill-typed configuration) is itself a format error.
    """
    try:
        declared = dict(spec(meta))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelFormatError(
            f"The model at {path!r} has a configuration its family ({meta.get('family')!r}) cannot use "
            f"({type(exc).__name__}: {exc}): "
            "the file is damaged. Re-save it from the fitted estimator, or refit."
        ) from None
    required = {n for n, d in declared.items() if not (len(d) > 2 and d[2])}
    missing = sorted(required - set(arrays))
    extra = sorted(set(arrays) - set(declared))
    if missing or extra:
        bits = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"]
                                                                       if extra else [])
        raise ModelFormatError(
            f"The model at {path!r} is a {meta['family']!r} model but its arrays do not match that family "
            f"({'; '.join(bits)}). The file is damaged or mislabelled; refit or re-save it."
        )
    for name, decl in declared.items():
        if name not in arrays:
            continue
        shape, rules = decl[0], decl[1]
        a = arrays[name]
        if a.dtype.kind not in "fiu":
            raise ModelFormatError(f"The model at {path!r}: array {name!r} has dtype {a.dtype}, not numeric.")
        if shape is not None and tuple(a.shape) != tuple(int(s) for s in shape):
            raise ModelFormatError(
                f"The model at {path!r}: array {name!r} has shape {tuple(a.shape)}, but its configuration "
                f"implies {tuple(int(s) for s in shape)}. The file is damaged; refit or re-save it."
            )
        af = a.astype(np.float64, copy=False)
        for rule in ("finite", *[r for r in rules if r != "finite"]):
            why = RULES[rule](af, None)
            if why:
                raise ModelFormatError(
                    f"The model at {path!r}: array {name!r} {why}, so the model cannot be used. The file "
                    "is damaged or was altered; refit or re-save it."
                )


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


def output_inputs(model, data) -> list[tuple[str, Any]]:
    """``(what, path)`` pairs an output of ``model`` applied to ``data`` may not overwrite."""
    pairs = []
    if isinstance(data, (str, os.PathLike)):
        pairs.append(("the input data", data))
    if getattr(model, "_loaded_from", None):
        pairs.append(("the model being applied", model._loaded_from))
    return pairs


def to_json(obj: Any) -> str:
    return json.dumps(_json_safe(obj))
