"""Linear-Gaussian state-space data (many sequences of different lengths) with known parameters."""

from __future__ import annotations

import os

import numpy as np

from ...errors import ConfigError
from ...models import lgssm as M

__all__ = ["make_lgssm_params", "sample_lgssm", "write_lgssm"]


def make_lgssm_params(state_dim: int, n_features: int, *, seed: int = 0) -> M.LGSSMParams:
    """True parameters: a stable rotation-and-decay ``A`` (spectral radius <= 0.95), random ``C``,
    random full ``Q`` and ``R``, ``mu0`` of unit scale and ``V0`` the identity."""
    if state_dim < 1 or n_features < 1:
        raise ConfigError("state_dim and n_features must be >= 1.")
    rng = np.random.default_rng([seed, 0x5A7E])
    k, p = state_dim, n_features
    U, _ = np.linalg.qr(rng.normal(size=(k, k)))
    A = U @ np.diag(rng.uniform(0.6, 0.95, size=k)) @ U.T
    if k >= 2:  # add a rotation so the dynamics oscillate
        th = rng.uniform(0.1, 0.5)
        Rot = np.eye(k)
        Rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
        A = A @ Rot
    C = rng.normal(size=(p, k))

    def rand_cov(d, scale):
        B = rng.normal(size=(d, d)) / np.sqrt(d)
        return scale * (B @ B.T + 0.5 * np.eye(d))

    return M.LGSSMParams(A, C, rand_cov(k, 0.3), rand_cov(p, 0.5), rng.normal(size=k), np.eye(k))


def sample_lgssm(params: M.LGSSMParams, lengths, seed: int = 0, *, missing_fraction: float = 0.0,
                 first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``(states, observations)`` of sequences with the given lengths.

    Sequence ``first + i`` is drawn from ``default_rng([seed, first + i])``, so the data do not
    depend on how the work is batched. With ``missing_fraction > 0`` that fraction of the
    observed values (independently) is replaced by NaN.
    """
    Zs, Ys = [], []
    for i, T in enumerate(lengths):
        rng = np.random.default_rng([seed, first + i])
        Z, Y = M.sample(params, int(T), rng)
        if missing_fraction > 0:
            Y[rng.random(Y.shape) < missing_fraction] = np.nan
        Zs.append(Z)
        Ys.append(Y)
    return np.concatenate(Zs), np.concatenate(Ys)


def write_lgssm(path, n_sequences: int, state_dim: int, n_features: int, *, min_length: int = 20,
                max_length: int = 200, missing_fraction: float = 0.0, seed: int = 0,
                chunk_steps: int = 65536, params: M.LGSSMParams | None = None,
                overwrite: bool = False) -> str:
    """Write a sequences group (``values``, ``offsets``, and the hidden ``states``) to Zarr.

    Lengths are uniform on ``[min_length, max_length]``; the true parameters are in
    ``attrs["truth"]`` (``A, C, Q, R, mu0, V0`` as lists). Memory stays bounded by about one
    chunk of steps whatever ``n_sequences``. Returns the absolute path.
    """
    import zarr

    from ..store import atomic_dir

    if n_sequences < 1:
        raise ConfigError(f"n_sequences must be >= 1, got {n_sequences}.")
    if not 1 <= min_length <= max_length:
        raise ConfigError(f"Need 1 <= min_length <= max_length, got {min_length}, {max_length}.")
    if not 0 <= missing_fraction < 1:
        raise ConfigError(f"missing_fraction must be in [0, 1), got {missing_fraction}.")
    params = params if params is not None else make_lgssm_params(state_dim, n_features, seed=seed)
    params = M.check_params(params)
    k, p = params.A.shape[0], params.C.shape[0]
    lengths = np.random.default_rng([seed, 0x1E9]).integers(min_length, max_length + 1, size=n_sequences)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    chunk = int(min(chunk_steps, total))
    with atomic_dir(path, kind="dataset", overwrite=overwrite) as tmp:
        g = zarr.open_group(tmp, mode="w")
        values = g.create_array("values", shape=(total, p), dtype="float64", chunks=(chunk, p), config={"write_empty_chunks": True})
        states = g.create_array("states", shape=(total, k), dtype="float64", chunks=(chunk, k), config={"write_empty_chunks": True})
        g.create_array("offsets", data=offsets, chunks=(max(1, min(1 << 20, len(offsets))),), config={"write_empty_chunks": True})
        s = 0
        while s < n_sequences:  # batches of whole sequences of about `chunk` steps
            e = int(np.searchsorted(offsets, offsets[s] + chunk, side="right")) - 1
            e = max(e, s + 1)
            Z, Y = sample_lgssm(params, lengths[s:e], seed, missing_fraction=missing_fraction, first=s)
            values[offsets[s] : offsets[e]] = Y
            states[offsets[s] : offsets[e]] = Z
            s = e
        g.attrs.update({
            "kind": "sequences", "n_sequences": int(n_sequences), "total_steps": total,
            "n_features": p, "dtype": "float64",
            "source": f"emflow.storage.synthetic.lgssm.write_lgssm(seed={seed})",
            "truth": {"family": "linear_gaussian_ssm", "missing_fraction": float(missing_fraction),
                      **{n: np.asarray(v).tolist() for n, v in zip(M.LGSSMParams._fields, params)}},
        })
    return os.path.abspath(os.fspath(path))
