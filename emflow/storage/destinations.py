"""Destinations: what is at a path, whether a write may replace it, and atomic replacement.

Every writer (models, outputs, datasets, checkpoints) goes through here:

* :func:`check_destination` refuses to write where that would lose something (someone's data,
  the input being read, an emflow store of another kind) and asks for ``overwrite`` before
  replacing an emflow store of the same kind;
* :class:`atomic_dir` writes a directory under a temporary sibling (``.NAME.tmp-<tag>``) and
  renames it into place;
* temporaries carry the writer's pid and host in their ``<tag>``; :func:`clean_leftovers`
  removes those of writers that are gone (never those of a writer still running) and puts back
  a directory a crashed replacement had moved aside.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Any, Iterable

from ..errors import ConfigError

__all__ = [
    "atomic_dir", "check_destination", "destination_kind", "clean_leftovers", "clean_checkpoint_leftovers",
    "output_inputs",
]

ZARR_JSON = "zarr.json"  # a Zarr v3 node's metadata
# a temporary whose name carries no pid (older emflow) or another host's is removed once this old
STALE_SECONDS = 24 * 3600
_LEGACY_STALE_SECONDS = 600

# -- temporary names: who wrote them, and is that writer still alive -------------------------
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname() or "host")[:64]
_TAG_RE = re.compile(r"(?P<t>[0-9a-f]+)_(?P<pid>\d+)_(?P<r>[0-9a-f]+)@(?P<host>[A-Za-z0-9.-]+)$")


def temp_tag() -> str:
    """A unique suffix naming this writer: time, pid, random, host."""
    return f"{time.time_ns():x}_{os.getpid()}_{uuid.uuid4().hex[:8]}@{_HOST}"


def writer_alive(name: str, full: str) -> bool:
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


def written_here(name: str) -> bool:
    """Whether the temporary ``name`` was created by this process."""
    m = _TAG_RE.search(name)
    return m is not None and m["host"] == _HOST and int(m["pid"]) == os.getpid()


def remove_path(full: str) -> None:
    """Remove the file, link or directory tree at ``full``, ignoring errors."""
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
        if writer_alive(name, full):
            continue
        if name.startswith(f".{base}.old-") and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(full, path)  # the previous version goes back where it was
                continue
        remove_path(full)
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
            if name.startswith(prefix) and not writer_alive(name, full):
                remove_path(full)
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
        tag = temp_tag()
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
def read_json(path: str) -> Any:
    """The JSON document in the file ``path``."""
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
    if ZARR_JSON not in names:
        return "other", "a directory holding other files (not a Zarr store)"
    try:
        meta = read_json(os.path.join(p, ZARR_JSON))
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


def output_inputs(model, data) -> list[tuple[str, Any]]:
    """``(what, path)`` pairs an output of ``model`` applied to ``data`` may not overwrite."""
    pairs = []
    if isinstance(data, (str, os.PathLike)):
        pairs.append(("the input data", data))
    if getattr(model, "_loaded_from", None):
        pairs.append(("the model being applied", model._loaded_from))
    return pairs
