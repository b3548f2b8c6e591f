"""The statistics ledger's lock (emflow.storage.ledger.ledger_lock): one fit at a time writes
a ledger; a live holder is an error before the data are read, a dead one's lock is taken
over, and a failing fit releases it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest

import emflow
from emflow.errors import LedgerBusy, StorageError
from emflow.storage.ledger import LOCK, LedgerLockWarning, ledger_lock, read_ledger_summary


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([[0.0, 0], [4, 0]])[rng.integers(0, 2, n)] + rng.normal(size=(n, 2))


def _gmm(ledger, **kw):
    return emflow.GaussianMixture(n_components=2, random_state=0, max_iter=3, partition_bytes=8000, ledger=ledger, **kw)


def _fit(est, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.errors.EmflowConvergenceWarning)
        return est.fit(X, **kw)


def _snapshot(path):
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


HOLD = """
import sys, time
from emflow.storage.ledger import ledger_lock
with ledger_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_live_holder_in_another_process_is_an_error_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch):
    X = _rows(2000)
    led = tmp_path / "L"
    first = _fit(_gmm(led), X)
    before = _snapshot(led)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(emflow.__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(led)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        opened = []
        orig = type(first)._open
        monkeypatch.setattr(type(first), "_open", lambda self, *a, **k: opened.append(1) or orig(self, *a, **k))
        with pytest.raises(LedgerBusy, match=rf"pid {holder.pid}.*{LOCK}") as err:
            _fit(first, X, warm_start=True)
        assert isinstance(err.value, StorageError) and socket.gethostname() in str(err.value)
        assert "another ledger=" in str(err.value)
        assert opened == []  # raised before the data were opened (read)
        held = json.loads((led / LOCK).read_text())
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname() and held["started"]
        assert {k: v for k, v in _snapshot(led).items() if k != LOCK} == before  # the ledger as it was
    finally:
        holder.kill()  # SIGKILL: its finally never runs, the lock file stays behind
        holder.wait()
        holder.stdout.close()
    assert (led / LOCK).exists()
    with pytest.warns(LedgerLockWarning, match=f"pid {holder.pid} on this host"):
        _fit(first, X, warm_start=True)
    assert opened and not (led / LOCK).exists()
    assert first.fit_info_["ledger"]["partitions_reused"] == first.fit_info_["ledger"]["partitions_total"]


def test_a_lock_left_by_a_dead_process_in_a_new_ledger_directory(tmp_path):
    led = tmp_path / "L"
    led.mkdir()
    (led / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"}))
    with pytest.warns(LedgerLockWarning, match="is gone"):
        est = _fit(_gmm(led), _rows(1000))
    assert "summary.json" in os.listdir(led) and LOCK not in os.listdir(led)
    assert read_ledger_summary(led)["n_partitions"] == est.fit_info_["partitions"]


def test_lock_released_after_a_failing_fit(tmp_path):
    led = tmp_path / "L"
    X = _rows(1000)
    X[5, 1] = np.nan
    with pytest.raises(emflow.errors.NonFiniteDataError):
        _fit(_gmm(led), X)
    assert not (led / LOCK).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LedgerLockWarning)
        _fit(_gmm(led), _rows(1000))  # no stale lock to take over
    assert not (led / LOCK).exists()


def test_holders_in_this_process_and_on_other_hosts_are_busy(tmp_path):
    with ledger_lock(tmp_path / "L"):
        with pytest.raises(LedgerBusy, match=f"pid {os.getpid()}"):  # another fit in this process (a thread)
            with ledger_lock(tmp_path / "L"):
                pass
    assert not (tmp_path / "L" / LOCK).exists()
    (tmp_path / "L" / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "started": "then"}))
    with pytest.raises(LedgerBusy, match="host 'elsewhere'.*delete"):  # its processes cannot be seen from here
        with ledger_lock(tmp_path / "L"):
            pass
    assert (tmp_path / "L" / LOCK).exists()
    with ledger_lock(None):
        pass
