"""The statistics ledger: each partition's E-step statistics, kept on disk between fits.

A fit with ``ledger=PATH`` (every family; see :mod:`emflow.estimators.incremental`) keeps,
in the directory ``PATH``, the statistics of every partition from its last pass over the
data, keyed by the partition's content fingerprint (its range and the digests the engine's
opening scan computes, :mod:`emflow.storage.fingerprint`) and by the *parameter version*
(a hash of the parameters that pass was run with, which are kept too). A later
``fit(..., warm_start=True)`` on grown data then reads only the partitions that are new or
whose content changed, and adds the others' statistics from the ledger.

Layout of ``PATH``::

    summary.json          what read_ledger_summary returns (and the partition table)
    version-<hash>.npz    the parameters the statistics were computed at
    stats-<key>.npz       one partition's statistics (key: fingerprint + version)
    lock.json             while a fit runs: who holds the ledger (:func:`ledger_lock`)

Every file is written to a temporary name and renamed into place, the summary last, so a
reader sees the old ledger or the new one; files the new summary no longer names are
removed afterwards. Statistics and parameters are stored as arrays plus a JSON description
of their structure (tuples, NamedTuples of :mod:`emflow` modules, dicts), never pickled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib
import json
import os
import socket
import tempfile
import time
import warnings
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: the lock file alone
    fcntl = None

import numpy as np

__all__ = ["LedgerMismatch", "LedgerLockWarning", "Ledger", "ledger_lock", "read_ledger_summary",
           "partition_fingerprints", "compare_partitions", "params_hash", "FORMAT", "LOCK"]

FORMAT = 1
SUMMARY = "summary.json"
LOCK = "lock.json"


class LedgerMismatch(UserWarning):
    """A ledger written for another model or another dataset (family, number of features,
    dtype, parameter structure, or a model other than the one warm-started): it is ignored,
    never mixed in, and the fit rewrites it."""


class LedgerLockWarning(UserWarning):
    """A stale ledger lock (its process, on this host, is gone) was taken over."""


# -- structures <-> arrays + JSON -------------------------------------------------------------
def _flatten(obj: Any, arrays: list) -> dict:
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
        arrays.append(np.asarray(obj))
        return {"t": "a", "i": len(arrays) - 1}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"t": "v", "v": obj}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        cls = type(obj)
        return {"t": "nt", "c": f"{cls.__module__}:{cls.__qualname__}", "f": [_flatten(v, arrays) for v in obj]}
    if isinstance(obj, (tuple, list)):
        return {"t": type(obj).__name__, "f": [_flatten(v, arrays) for v in obj]}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"t": "dict", "k": list(obj), "f": [_flatten(v, arrays) for v in obj.values()]}
    raise TypeError(f"The statistics ledger cannot store a {type(obj).__name__}.")


def _named_tuple(path: str):
    module, _, name = path.partition(":")
    if not (module == "emflow" or module.startswith("emflow.")):
        raise ValueError(f"A ledger names a type outside emflow ({path!r}); it is not read.")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _unflatten(spec: dict, arrays) -> Any:
    t = spec["t"]
    if t == "a":
        return arrays[f"a{spec['i']}"]
    if t == "v":
        return spec["v"]
    items = [_unflatten(s, arrays) for s in spec["f"]]
    if t == "nt":
        return _named_tuple(spec["c"])(*items)
    if t == "dict":
        return dict(zip(spec["k"], items))
    return tuple(items) if t == "tuple" else items


def _encode(obj: Any) -> tuple[dict, list[np.ndarray]]:
    arrays: list = []
    return _flatten(obj, arrays), arrays


def params_hash(params: Any) -> str:
    """A content hash of a parameter set (or any ledger-storable structure)."""
    spec, arrays = _encode(params)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(spec, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(a.view(np.uint8).ravel() if a.size else b"")
    return h.hexdigest()


def structure_of(params: Any) -> list:
    """What a parameter set's statistics are shaped by: the structure with array shapes
    (and dtypes) in place of the values, and the non-array values (``covariance_type``)."""
    spec, arrays = _encode(params)

    def shape_only(node):
        if node["t"] == "v" and isinstance(node["v"], (int, float)) and not isinstance(node["v"], bool):
            return {"t": "v", "v": type(node["v"]).__name__}  # a learned scalar: its type, not its value
        return {**node, "f": [shape_only(n) for n in node["f"]]} if "f" in node else node

    return [json.loads(json.dumps(shape_only(spec))), [[a.dtype.str, list(a.shape)] for a in arrays]]


def _atomic_write(path: str, write) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_npz(path: str, obj: Any) -> None:
    spec, arrays = _encode(obj)
    payload = {f"a{i}": a for i, a in enumerate(arrays)}
    payload["__spec__"] = np.frombuffer(json.dumps(spec).encode(), dtype=np.uint8)
    _atomic_write(path, lambda f: np.savez(f, **payload))


def _load_npz(path: str) -> Any:
    with np.load(path, allow_pickle=False) as z:
        spec = json.loads(bytes(z["__spec__"]).decode())
        return _unflatten(spec, {k: z[k] for k in z.files})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- partitions -------------------------------------------------------------------------------
def _json_ready(obj):
    if isinstance(obj, (tuple, list)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def partition_fingerprints(loaded) -> list[str]:
    """Each partition's content fingerprint: its range (rows; steps and sequences; documents)
    and the digests the engine's opening scan computed (``Loaded.partition_digests``)."""
    data = loaded.data
    seq = getattr(data, "seq_bounds", None)
    out = []
    for i, dig in enumerate(loaded.partition_digests):
        where = (tuple(data.bounds[i]), tuple(seq[i]) if seq is not None else None)
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((_json_ready(where), _json_ready(dig))).encode())
        out.append(h.hexdigest())
    return out


def compare_partitions(summary: dict | None, loaded) -> dict:
    """How the data's partitions stand against a ledger's: ``{"fingerprints": [...],
    "reused": [i...], "changed": [i...], "new": [i...]}`` (indices of ``loaded``'s
    partitions). A partition is *reused* when the ledger holds its fingerprint, *changed*
    when the ledger has a partition starting where it starts with another fingerprint (its
    data were rewritten, or its range moved), *new* otherwise."""
    fps = partition_fingerprints(loaded)
    known = {} if summary is None else {p["fingerprint"]: p for p in summary["partitions"]}
    starts = set() if summary is None else {p["start"] for p in summary["partitions"]}
    out = {"fingerprints": fps, "reused": [], "changed": [], "new": []}
    for i, fp in enumerate(fps):
        start = int(loaded.data.bounds[i][0])
        out["reused" if fp in known else "changed" if start in starts else "new"].append(i)
    return out


# -- the ledger -------------------------------------------------------------------------------
def read_ledger_summary(path) -> dict:
    """What the ledger at ``path`` records, without fitting or opening the data.

    Returns
    -------
    dict
        ``format``, ``family``, ``n_features``, ``dtype``, ``structure`` (parameter shapes),
        ``params_hash`` (the fitted model's parameters), ``version`` (hash of the parameters
        the statistics were computed at), ``fingerprint`` (the dataset's), ``source``,
        ``n_rows`` (rows; steps for sequences; documents for a corpus), ``n_sequences``
        (sequences only), ``n_partitions``, ``partition_fingerprints`` (list of str),
        ``partitions`` (one dict each: ``start``, ``bounds``, ``fingerprint``, ``file``),
        ``created`` and ``updated`` (UTC, ISO 8601).

    Raises
    ------
    FileNotFoundError
        No ledger at ``path``.
    """
    file = os.path.join(os.fspath(path), SUMMARY)
    if not os.path.exists(file):
        raise FileNotFoundError(f"No statistics ledger at {os.fspath(path)!r} (no {SUMMARY}).")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


class Ledger:
    """The ledger directory ``path`` of one fit: what it holds, and writing the new one.

    Parameters
    ----------
    path : str or path-like
        A directory (created by :meth:`write`).
    """

    def __init__(self, path):
        self.path = os.fspath(path)

    def summary(self) -> dict | None:
        try:
            return read_ledger_summary(self.path)
        except FileNotFoundError:
            return None

    def usable(self, identity: dict, params) -> dict | None:
        """The summary when the ledger was written for this model and this kind of data
        (``identity``: family, n_features, dtype, structure; ``params``: the model being
        warm-started); else None, with a :class:`LedgerMismatch` warning when a ledger is
        there but belongs to something else."""
        s = self.summary()
        if s is None:
            return None
        stored = {k: s.get(k) for k in identity}
        if s.get("format") != FORMAT or stored != json.loads(json.dumps(identity)):
            diff = [k for k in identity if stored.get(k) != json.loads(json.dumps(identity[k]))] or ["format"]
            warnings.warn(f"The statistics ledger at {self.path!r} was written for another model or dataset "
                          f"({', '.join(diff)} differ: ledger {[stored.get(k) for k in diff]}); it is ignored "
                          "and rewritten by this fit.", LedgerMismatch, stacklevel=7)
            return None
        if s.get("params_hash") != params_hash(params):
            warnings.warn(f"The statistics ledger at {self.path!r} was written by another fit (its model's "
                          "parameters differ from the warm-started model's); it is ignored and rewritten by "
                          "this fit.", LedgerMismatch, stacklevel=7)
            return None
        return s

    def stats(self, summary: dict, indices_by_fp: dict[str, int]) -> dict[int, Any]:
        """``{partition index: statistics}`` for the ledger partitions whose fingerprints
        are keys of ``indices_by_fp``."""
        return {indices_by_fp[p["fingerprint"]]: _load_npz(os.path.join(self.path, p["file"]))
                for p in summary["partitions"] if p["fingerprint"] in indices_by_fp}

    def version_params(self, summary: dict) -> Any:
        """The parameters the ledger's statistics were computed at."""
        return _load_npz(os.path.join(self.path, f"version-{summary['version']}.npz"))

    def write(self, *, identity: dict, loaded, fingerprints: list[str], stats: list, version_params,
              final_params, context: Any = None, reuse: dict[int, str] | None = None) -> dict:
        """Write the ledger of a fit: ``stats[i]`` of partition ``i`` computed at
        ``version_params`` (``reuse[i]``: a file already in the ledger that holds them);
        ``final_params``: the fitted model. Returns the summary written."""
        os.makedirs(self.path, exist_ok=True)
        old = self.summary()
        version = params_hash(version_params)
        reuse = reuse or {}
        vfile = f"version-{version}.npz"
        if not os.path.exists(os.path.join(self.path, vfile)):
            _save_npz(os.path.join(self.path, vfile), version_params)
        data = loaded.data
        seq = getattr(data, "seq_bounds", None)
        parts = []
        for i, (fp, st) in enumerate(zip(fingerprints, stats)):
            key = hashlib.blake2b(f"{fp}:{version}".encode(), digest_size=16).hexdigest()
            file = f"stats-{key}.npz"
            if reuse.get(i) != file or not os.path.exists(os.path.join(self.path, file)):
                _save_npz(os.path.join(self.path, file), st)
            parts.append({"start": int(data.bounds[i][0]), "bounds": _json_ready(data.bounds[i]),
                          **({"seq_bounds": _json_ready(seq[i])} if seq is not None else {}),
                          "fingerprint": fp, "file": file})
        now = _now()
        ident = json.loads(json.dumps(identity))
        summary = {
            "format": FORMAT, **ident,
            "params_hash": params_hash(final_params), "version": version,
            "context": _json_ready(context),
            "fingerprint": loaded.fingerprint, "source": str(getattr(data, "source", "")),
            "n_rows": int(data.n_rows),
            **({"n_sequences": int(data.n_sequences)} if hasattr(data, "n_sequences") else {}),
            "n_partitions": len(parts), "partition_fingerprints": list(fingerprints), "partitions": parts,
            "created": old["created"] if old and all(old.get(k) == v for k, v in ident.items()) else now,
            "updated": now,
        }
        _atomic_write(os.path.join(self.path, SUMMARY),
                      lambda f: f.write(json.dumps(summary, indent=1).encode()))
        keep = {SUMMARY, vfile, *(p["file"] for p in parts)}
        for name in os.listdir(self.path):
            if name not in keep and (name.startswith(("stats-", "version-")) and name.endswith(".npz")):
                os.unlink(os.path.join(self.path, name))
        return summary


# -- the lock ---------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def _flock(fd: int) -> bool:
    """An exclusive, non-blocking flock on ``fd``: False when another open file holds one;
    True when taken, or when the file system has none (then the lock file alone guards)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK and the like (some network file systems)
        return True
    return True


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _write_holder(fd: int, info: dict) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _busy(path: str, lock: str, holder: dict | None):
    from ..errors import LedgerBusy

    who = ("an unknown holder (the lock file is empty or unreadable)" if holder is None else
           f"host {holder.get('host')!r}, pid {holder.get('pid')}, since {holder.get('started')}")
    return LedgerBusy(f"The statistics ledger {path!r} is in use by another fit ({who}; lock file {lock!r}). "
                      "Wait for that fit to end, or give this fit another ledger=...; if that process is "
                      f"gone (another host, or a machine that restarted), delete {lock!r} and fit again.")


@contextlib.contextmanager
def ledger_lock(path, *, wait: float = 1.0):
    """Hold the ledger directory ``path`` exclusively for a fit (None: nothing to lock).

    The lock is the file ``path/lock.json``, created with ``O_CREAT | O_EXCL`` and holding
    ``host``, ``pid`` and ``started`` (UTC), removed when the block ends (in a ``finally``),
    and, where the file system has it, an exclusive ``flock`` on that file for as long. A lock
    file whose process is gone (same host, no such pid, and no flock held) is taken over with
    a :class:`LedgerLockWarning`; a lock held by a live process (or by another host, whose
    processes cannot be seen) raises :class:`emflow.errors.LedgerBusy`. ``wait``: seconds an
    empty lock file (a holder between creating and writing it) is waited for.

    Raises
    ------
    emflow.errors.LedgerBusy
        Another fit holds the ledger; nothing was read or written.
    """
    if path is None:
        yield
        return
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, LOCK)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:  # released meanwhile
                continue
            if not _flock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise _busy(path, lock, holder)
            if not _same_file(fd, lock):  # released (unlinked) between our open and flock
                os.close(fd)
                continue
            holder = _read_holder(fd)
            stale = holder is not None and holder.get("host") == me["host"] and not _alive(holder["pid"])
            if not stale and (holder is not None or time.monotonic() < deadline):
                os.close(fd)
                if holder is not None:
                    raise _busy(path, lock, holder)
                time.sleep(0.05)  # empty: its creator is about to write it
                continue
            was = ("its writer left it empty" if holder is None else
                   f"pid {holder['pid']} on this host, its holder since {holder.get('started')}, is gone")
            warnings.warn(f"Taking over the stale lock {lock!r} of the statistics ledger ({was}).",
                          LedgerLockWarning, stacklevel=4)
        else:
            _flock(fd)
        break
    try:
        _write_holder(fd, me)
        yield
    finally:
        try:
            if _same_file(fd, lock):
                os.unlink(lock)
        finally:
            os.close(fd)
