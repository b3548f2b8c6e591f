"""An exclusive lock on an output path, so two fits never write the same model at once.

A fit writing ``OUT`` (its checkpoints ``OUT.checkpoint.npz`` and the model itself) holds
the lock file ``OUT.lock`` for the whole run::

    with output_lock("models/gmm.zarr", run_id=..., what="emflow-fit"):
        ...  # checkpoint, fit, save

The lock file is created with ``O_CREAT | O_EXCL`` (one creator wins, also on NFS v3+)
and holds JSON: ``pid``, ``host``, ``since`` (UTC, ISO 8601), ``run_id`` (the Prefect flow
run, when known), ``what``, the process start time and the boot id (Linux), so a pid
reused after the holder died is not mistaken for the holder. A second fit on the same
``OUT`` fails at once with :class:`LockHeldError`, naming the holder.

When is a lock stale (taken over, with a :class:`StaleLockWarning`)?

* held on **this host**: when its process is gone, or the pid now belongs to another
  process (its start time differs from the one recorded), or the machine rebooted since;
* held on **another host** (a shared file system): when its holder stopped refreshing it.
  A holder touches the lock file every ``HEARTBEAT_SECONDS`` (30 s); another host's lock
  whose modification time is older than ``$EMFLOW_LOCK_EXPIRY_SECONDS`` (default 600 s)
  is stale. ``EMFLOW_LOCK_EXPIRY_SECONDS=0`` means another host's lock never expires
  (then remove it by hand once you know its run is gone).
* a lock file that cannot be read (its writer died between creating and writing it) is
  stale once it is older than ``EMFLOW_LOCK_EXPIRY_SECONDS`` as well (or 10 s, whichever
  is less).

Paths with a URL scheme (``s3://...``) cannot be locked this way: :func:`output_lock`
then takes no lock (and says so in its result).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import EmflowError, StorageError

__all__ = ["LockHeldError", "StaleLockWarning", "OutputLock", "lock_path", "output_lock", "read_lock",
           "HEARTBEAT_SECONDS", "DEFAULT_EXPIRY_SECONDS", "EXPIRY_ENV"]

HEARTBEAT_SECONDS = 30.0
DEFAULT_EXPIRY_SECONDS = 600.0
EXPIRY_ENV = "EMFLOW_LOCK_EXPIRY_SECONDS"
_UNREADABLE_GRACE_SECONDS = 10.0


class LockHeldError(EmflowError, RuntimeError):
    """Another live process holds the lock on an output path (a second fit writing the same model)."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs was taken over."""


def lock_path(out: str | os.PathLike) -> str:
    """The lock file of output ``out``: ``OUT.lock`` beside it (absolute)."""
    return os.path.abspath(os.fspath(out)).rstrip("/") + ".lock"


def _host() -> str:
    return socket.gethostname()


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces or parentheses: split after the last ')'
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return False
    return True


def _expiry() -> float:
    raw = os.environ.get(EXPIRY_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_EXPIRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise EmflowError(f"${EXPIRY_ENV}={raw!r} is not a number of seconds; set it to e.g. 600, or 0 for "
                          "'another host's lock never expires'.") from None
    return max(0.0, value)


def read_lock(path: str) -> dict[str, Any] | None:
    """The holder recorded in lock file ``path`` ({} if unreadable), or None if there is no lock."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw.decode())
        return info if isinstance(info, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {}


def describe(info: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-...Z (flow run 1234-...)`` for a lock's JSON."""
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    text = f"pid {info.get('pid')} on host {info.get('host')!r} since {info.get('since')}"
    if info.get("what"):
        text += f" ({info['what']}"
        text += f", flow run {info['run_id']})" if info.get("run_id") else ")"
    elif info.get("run_id"):
        text += f" (flow run {info['run_id']})"
    return text


def _stale_reason(info: dict[str, Any], path: str) -> str | None:
    """Why the lock described by ``info`` is stale, or None when its holder may still run."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "it was removed"
    expiry = _expiry()
    if not info:
        grace = min(_UNREADABLE_GRACE_SECONDS, expiry) if expiry > 0 else _UNREADABLE_GRACE_SECONDS
        return f"it is unreadable and {age:.0f} s old" if age > grace else None
    if info.get("host") == _host():
        try:
            pid = int(info.get("pid"))
        except (TypeError, ValueError):
            return "it names no valid pid"
        if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
            return "this machine rebooted since it was taken"
        if not _alive(pid):
            return f"process {pid} is no longer running"
        started = info.get("process_start")
        now_started = _process_start(pid)
        if started is not None and now_started is not None and int(started) != now_started:
            return f"pid {pid} now belongs to another process (the holder ended and the pid was reused)"
        return None
    if expiry > 0 and age > expiry:
        return (f"its holder on host {info.get('host')!r} has not refreshed it for {age:.0f} s "
                f"(more than ${EXPIRY_ENV}={expiry:g})")
    return None


@dataclass
class OutputLock:
    """The lock taken by :func:`output_lock` (``path`` is None when no lock could be taken)."""

    path: str | None
    info: dict[str, Any]
    took_over: str | None = None  # the stale holder it replaced, described


def _create(path: str, info: dict[str, Any]) -> bool:
    """Create the lock file exclusively; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(info, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _break(path: str, seen: dict[str, Any]) -> None:
    """Remove the stale lock ``seen`` (and only it: a fresh lock taken meanwhile is put back)."""
    aside = f"{path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process broke it first
    try:
        if read_lock(aside) != seen:  # a new holder's lock: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)


def acquire(out: str | os.PathLike, *, run_id: str | None = None, what: str = "") -> OutputLock:
    """Take the lock on ``out`` or raise :class:`LockHeldError`; see :func:`output_lock`."""
    s = os.fspath(out)
    if "://" in s:
        return OutputLock(None, {})
    path = lock_path(s)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise StorageError(f"Cannot create the folder of {s!r} to lock it ({exc}). Choose a writable location "
                           "for the output.") from exc
    info = {"pid": os.getpid(), "host": _host(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "run_id": str(run_id) if run_id else None, "what": what, "out": os.path.abspath(s),
            "process_start": _process_start(os.getpid()), "boot_id": _boot_id()}
    took_over = None
    for _ in range(5):
        try:
            if _create(path, info):
                return OutputLock(path, info, took_over)
        except OSError as exc:
            raise StorageError(f"Cannot write the lock file {path!r} ({exc}). Choose a writable location for "
                               "the output.") from exc
        held = read_lock(path)
        if held is None:
            continue  # released meanwhile: try again
        reason = _stale_reason(held, path)
        if reason is None:
            raise LockHeldError(
                f"{s!r} is being written by another run: {describe(held)} holds {path!r}. Wait for that run to "
                f"finish (or cancel it), or write to another output path. If you are sure it is gone, delete "
                f"{path!r} and run again."
            )
        warnings.warn(f"Taking over the stale lock {path!r} of {describe(held)}: {reason}.", StaleLockWarning,
                      stacklevel=3)
        took_over = describe(held)
        _break(path, held)
    raise LockHeldError(f"Could not take the lock {path!r}: other processes keep taking it. Make sure only one "
                        f"run writes {s!r}.")


def release(lock: OutputLock) -> None:
    """Remove the lock file, if it is still ours."""
    if lock.path is None:
        return
    held = read_lock(lock.path)
    if held is not None and held.get("pid") == lock.info["pid"] and held.get("since") == lock.info["since"] \
            and held.get("host") == lock.info["host"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock.path)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, run_id: str | None = None, what: str = "",
                heartbeat: float = HEARTBEAT_SECONDS) -> Iterator[OutputLock]:
    """Hold the lock on output ``out`` for the ``with`` block; released on exit, also on error.

    Raises :class:`LockHeldError` (naming the holder: pid, host, since, run id) when a live
    process holds it; takes over a stale one with a :class:`StaleLockWarning`. While held,
    a daemon thread refreshes the file's modification time every ``heartbeat`` seconds so
    other hosts can tell a live holder from a dead one.
    """
    lock = acquire(out, run_id=run_id, what=what)
    stop = threading.Event()
    beat = None
    if lock.path is not None and heartbeat > 0:
        def touch():
            while not stop.wait(heartbeat):
                with contextlib.suppress(OSError):
                    os.utime(lock.path)

        beat = threading.Thread(target=touch, name="emflow-lock-heartbeat", daemon=True)
        beat.start()
    try:
        yield lock
    finally:
        stop.set()
        if beat is not None:
            beat.join(5)
        release(lock)
