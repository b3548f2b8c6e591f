"""Storage errors while writing: disk full, read-only location, a failing store or rename.

Each gives a StorageError (an EmflowError and an OSError) that names the path and says
what to do; the model and the checkpoint already there stay intact and readable, and no
temporary file is left beside them. Real ENOSPC / EROFS come from a tiny tmpfs mounted for
the test (skipped where mounting is not allowed); the rest is simulated by making the
store's writes or ``os.replace`` fail part way.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import numpy as np
import pytest
from typer.testing import CliRunner

import emflow
from emflow.storage.checkpoint import Checkpoint, CheckpointWriter, read_checkpoint, write_checkpoint
from emflow.errors import StorageError
from emflow.models.gmm import GMMParams

RNG = np.random.default_rng(7)
X = np.vstack([RNG.normal(-3, 1, (150, 2)), RNG.normal(3, 1, (150, 2))])


@pytest.fixture(scope="module")
def models():
    a = emflow.GaussianMixture(2, random_state=0, scheduler="threads").fit(X)
    b = emflow.GaussianMixture(2, covariance_type="diag", random_state=1, scheduler="threads").fit(X)
    return a, b


def _same(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("weights_", "means_", "covariances_", "precisions_cholesky_"))


def _ckpt(model, n=3):
    p = GMMParams(model.weights_, model.means_, model.covariances_, model.precisions_cholesky_,
                  model.covariance_type)
    return Checkpoint(p, [-3.0 + 0.1 * i for i in range(n)], [0.01] * n, False, "fp", "hash")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs, unmounted afterwards; yields its path and a remount(options) helper."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")

    def remount(opts):
        subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True, capture_output=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt):
    """Fill the file system to the last byte."""
    with open(mnt / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_disk_full_keeps_model_and_checkpoint(models, tiny_fs):
    a, b = models
    mnt, _ = tiny_fs
    path = a.save(mnt / "m.zarr")
    ck = write_checkpoint(mnt / "m.zarr.checkpoint.npz", _ckpt(a))
    _fill(mnt)
    with pytest.raises(StorageError, match=r"Could not write the model to .*m\.zarr.*No space left.*intact") as e:
        b.save(path, overwrite=True)
    assert isinstance(e.value, (emflow.EmflowError, OSError))
    with pytest.raises(StorageError, match=r"checkpoint .*No space left.*intact"):
        write_checkpoint(ck, _ckpt(b, 5))
    os.remove(mnt / "filler")
    assert _same(emflow.load(path), a)
    assert read_checkpoint(ck).iteration == 3
    assert np.array_equal(read_checkpoint(ck).params.means, a.means_)
    assert sorted(os.listdir(mnt)) == ["m.zarr", "m.zarr.checkpoint.npz"]


def test_read_only_location_keeps_model_and_checkpoint(models, tiny_fs):
    a, b = models
    mnt, remount = tiny_fs
    path = a.save(mnt / "m.zarr")
    ck = write_checkpoint(mnt / "m.zarr.checkpoint.npz", _ckpt(a))
    remount("ro")
    with pytest.raises(StorageError, match=r"Could not write the model .*Read-only file system"):
        b.save(path, overwrite=True)
    with pytest.raises(StorageError, match=r"Read-only file system"):
        write_checkpoint(ck, _ckpt(b, 5))
    remount("rw")
    assert _same(emflow.load(path), a)
    assert read_checkpoint(ck).iteration == 3
    assert sorted(os.listdir(mnt)) == ["m.zarr", "m.zarr.checkpoint.npz"]


def test_cli_fit_onto_full_disk(models, tiny_fs, tmp_path):
    """`emflow fit` into a full location: exit 2, a clear message, the previous model untouched."""
    import zarr

    from emflow.cli.main import app

    a, _ = models
    mnt, _ = tiny_fs
    path = a.save(mnt / "m.zarr")
    data = tmp_path / "d.zarr"
    g = zarr.open_group(data, mode="w")
    g.create_array("X", data=X, chunks=(100, 2))
    g.attrs["rows"] = "X"
    _fill(mnt)
    r = CliRunner().invoke(app, ["fit", str(data), "-k", "2", "-c", "diag", "-o", path, "--overwrite",
                                 "-s", "threads"])
    assert r.exit_code == 2, r.output
    assert "No space left" in r.output and "Traceback" not in r.output
    os.remove(mnt / "filler")
    assert _same(emflow.load(path), a)


def test_store_write_failing_mid_save(models, tmp_path, monkeypatch):
    """The Zarr store raises ENOSPC on its third write: the old model stays, no temp dir is left."""
    from zarr.storage import LocalStore

    a, b = models
    path = a.save(tmp_path / "m.zarr")
    real_set = LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return await real_set(self, key, value, *args, **kw)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    with pytest.raises(StorageError, match="No space left on device"):
        b.save(path, overwrite=True)
    assert calls["n"] == 3
    monkeypatch.setattr(LocalStore, "set", real_set)
    assert _same(emflow.load(path), a)
    assert os.listdir(tmp_path) == ["m.zarr"]


@pytest.mark.parametrize("fail_at", [1])
def test_rename_failing_keeps_previous_model(models, tmp_path, monkeypatch, fail_at):
    """os.replace fails when swapping in the new version's pointer (the one rename a replacement takes)."""
    import emflow.storage.store as S

    a, b = models
    path = a.save(tmp_path / "m.zarr")
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        # os.replace is patched process-wide: count only this test's renames, not those of
        # threads other tests left running (Prefect's, Dask's)
        if str(tmp_path) in os.fspath(dst):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.EIO, "Input/output error (simulated)")
        return real(src, dst)

    monkeypatch.setattr(S.os, "replace", flaky)
    with pytest.raises(StorageError, match="Input/output error"):
        b.save(path, overwrite=True)
    monkeypatch.setattr(S.os, "replace", real)
    assert _same(emflow.load(path), a)
    assert os.listdir(tmp_path) == ["m.zarr"]


def test_checkpoint_write_failing_keeps_previous(models, tmp_path, monkeypatch):
    """fsync fails (as on a full disk) while the writer checkpoints iteration 4: iteration 3 stays."""
    import emflow.storage.checkpoint as C

    a, _ = models
    ck = str(tmp_path / "m.zarr.checkpoint.npz")
    writer = CheckpointWriter(ck, fingerprint="fp", config_hash="h")
    seen = []

    def fsync(fd):
        if len(seen) == 4:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(C.os, "fsync", fsync)

    def record(event):
        seen.append(event.iteration)
        writer(event)

    gm = emflow.GaussianMixture(2, tol=0.0, max_iter=6, random_state=0, scheduler="threads")
    with pytest.raises(StorageError, match=r"checkpoint .*No space left.*intact"):
        gm.fit(X, callbacks=[record])
    assert seen == [1, 2, 3, 4]
    back = read_checkpoint(ck)
    assert back.iteration == 3 and back.params.means.shape == (2, 2)
    assert os.listdir(tmp_path) == ["m.zarr.checkpoint.npz"]
