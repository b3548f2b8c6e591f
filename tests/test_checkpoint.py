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


def _format1(path, family, arrays, attrs, history):
    """A checkpoint exactly as emflow wrote it before the estimator contract (format 1: the
    family named, a hand-kept table of fields)."""
    import io
    import json

    from emflow.storage.checkpoint import _digest

    arrays = {**{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()},
              "history": np.asarray(history, dtype=np.float64), "seconds": np.full(len(history), 0.1)}
    header = {"format": 1, "family": family, **attrs, "iteration": len(history), "converged": False,
              "fingerprint": "fp", "config_hash": "c", "init": 0, "extra": {}, "digest": _digest(arrays)}
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    path.write_bytes(buf.getvalue())
    return path


def test_format_1_checkpoints_still_resume(tmp_path):
    """Checkpoints written before the estimator contract (format 1) are read into the same
    parameters; new ones (format 2) name the parameter type and round-trip every family's."""
    from emflow.models.hmm import CategoricalHMMParams
    from emflow.models.lda import make_params

    p = _ckpt().params
    old = read_checkpoint(_format1(tmp_path / "gmm.npz", "gaussian_mixture",
                                   {f: getattr(p, f) for f in ("weights", "means", "covariances",
                                                               "precisions_cholesky")},
                                   {"covariance_type": "full"}, [-3.0, -2.5]))
    assert isinstance(old.params, GMMParams) and old.params.covariance_type == "full"
    assert all(np.array_equal(a, b) for a, b in zip(old.params[:4], p[:4])) and old.history == [-3.0, -2.5]
    cat = CategoricalHMMParams(np.array([0.5, 0.5]), np.eye(2), np.full((2, 3), 1 / 3))
    back = read_checkpoint(_format1(tmp_path / "cat.npz", "categorical_hmm", cat._asdict(), {}, [-1.0]))
    assert all(np.array_equal(a, b) for a, b in zip(back.params, cat))
    lam = np.random.default_rng(0).gamma(1.0, size=(2, 5)) + 0.1
    lda = read_checkpoint(_format1(tmp_path / "lda.npz", "latent_dirichlet_allocation", {"components": lam}, {},
                                   [-7.0]))
    assert np.array_equal(lda.params.exp_elog_beta, make_params(lam).exp_elog_beta)
    new = write_checkpoint(tmp_path / "new.npz", Checkpoint(make_params(lam), [-7.0], [0.1], False, "fp", "c"))
    again = read_checkpoint(new)
    assert again.params.doc_topic_prior is None and np.array_equal(again.params.components, lam)
