"""Checkpoints: atomic, verified, refused with a warning when they cannot be used."""

from __future__ import annotations

import os

import numpy as np
import pytest

from emflow.storage.checkpoint import (
    Checkpoint,
    CheckpointWarning,
    checkpoint_path,
    config_hash,
    load_resumable,
    read_checkpoint,
    write_checkpoint,
)
from emflow.models.gmm import GMMParams


def _ckpt(history=(-3.0, -2.5, -2.4), fp="fp1", ch="c1"):
    rng = np.random.default_rng(0)
    cov = np.stack([np.eye(2) * 2.0, np.eye(2)])
    pc = np.stack([np.eye(2) / np.sqrt(2.0), np.eye(2)])
    p = GMMParams(np.array([0.25, 0.75]), rng.normal(size=(2, 2)), cov, pc, "full")
    return Checkpoint(p, list(history), [0.1] * len(history), False, fp, ch)


def test_round_trip_bit_identical_and_atomic(tmp_path):
    path = checkpoint_path(tmp_path / "model.zarr")
    assert path.endswith("model.zarr.checkpoint.npz")
    c = _ckpt()
    write_checkpoint(path, c)
    back = read_checkpoint(path)
    for a, b in zip(back.params[:4], c.params[:4]):
        assert np.array_equal(a, b)
    assert back.history == c.history and back.fingerprint == "fp1" and back.params.covariance_type == "full"
    assert os.listdir(tmp_path) == ["model.zarr.checkpoint.npz"]  # no temporary left behind
    got = load_resumable(path, fingerprint="fp1", config_hash="c1", tol=1e-3, max_iter=10)
    assert got is not None and got.iteration == 3 and not got.converged
    assert load_resumable(path, fingerprint="fp1", config_hash="c1", tol=0.2, max_iter=10).converged


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "unreadable or truncated"),
    ("flip", "digest|unreadable"),
    ("garbage", "unreadable or truncated"),
])
def test_damaged_checkpoint_is_refused(tmp_path, damage, reason):
    path = str(tmp_path / "m.checkpoint.npz")
    write_checkpoint(path, _ckpt())
    raw = bytearray(open(path, "rb").read())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip":
        i = raw.find(np.float64(0.25).tobytes())  # inside the weights array
        raw[i + 3] ^= 0xFF
    else:
        raw = bytearray(b"not a zip file at all")
    open(path, "wb").write(bytes(raw))
    with pytest.warns(CheckpointWarning, match=reason):
        assert load_resumable(path, fingerprint="fp1", config_hash="c1", tol=1e-3, max_iter=10) is None


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "m.checkpoint.npz")
    write_checkpoint(path, _ckpt())
    with pytest.warns(CheckpointWarning, match="other data"):
        assert load_resumable(path, fingerprint="fp2", config_hash="c1", tol=1e-3, max_iter=10) is None
    with pytest.warns(CheckpointWarning, match="other settings"):
        assert load_resumable(path, fingerprint="fp1", config_hash="c2", tol=1e-3, max_iter=10) is None
    with pytest.warns(CheckpointWarning, match="more than max_iter"):
        assert load_resumable(path, fingerprint="fp1", config_hash="c1", tol=1e-3, max_iter=2) is None
    with pytest.warns(CheckpointWarning, match="stopped before"):  # change 0.5 then 0.1: tol 0.6 stops at 2
        assert load_resumable(path, fingerprint="fp1", config_hash="c1", tol=0.6, max_iter=10) is None
    assert load_resumable(str(tmp_path / "none.npz"), fingerprint="fp1", config_hash="c1", tol=1e-3,
                          max_iter=10) is None


def test_config_hash_ignores_order_and_sees_values():
    a = config_hash({"n_components": 3, "reg_covar": 1e-6, "means_init": np.zeros((2, 2))})
    b = config_hash({"means_init": np.zeros((2, 2)), "reg_covar": 1e-6, "n_components": 3})
    assert a == b
    assert a != config_hash({"n_components": 3, "reg_covar": 1.0000001e-6, "means_init": np.zeros((2, 2))})
