"""Hidden Markov model sequences with known parameters, written to a Zarr sequence group."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ...errors import ConfigError
from ...models import hmm as H

__all__ = ["make_hmm_params", "sample_hmm", "write_hmm"]


def make_hmm_params(n_components: int, n_features: int, emission: str = "gaussian",
                    covariance_type: str = "diag", *, separation: float = 3.0, stickiness: float = 0.8,
                    seed: int = 0):
    """True parameters: a "sticky" transition matrix and well separated emissions.

    Parameters
    ----------
    n_components : int
    n_features : int
        Dimension (Gaussian) or number of symbols (categorical).
    emission : {"gaussian", "categorical"}
    covariance_type : {"diag", "full", "spherical", "tied"}
        Gaussian only; covariances come in hmmlearn's stored shape for the type.
    separation : float
        Distance scale between Gaussian means (in standard deviations).
    stickiness : float
        Expected probability of staying in a state.
    seed : int

    Returns
    -------
    GaussianHMMParams or CategoricalHMMParams
    """
    if n_components < 1 or n_features < 1:
        raise ConfigError("n_components and n_features must be >= 1.")
    if emission not in ("gaussian", "categorical"):
        raise ConfigError(f"emission must be 'gaussian' or 'categorical', got {emission!r}.")
    if not 0 <= stickiness < 1:
        raise ConfigError(f"stickiness must be in [0, 1), got {stickiness}.")
    rng = np.random.default_rng([seed, 0x4B11])
    K, d = n_components, n_features
    sp = rng.dirichlet(np.full(K, 5.0))
    off = rng.dirichlet(np.ones(K), size=K) if K > 1 else np.ones((1, 1))
    tm = stickiness * np.eye(K) + (1 - stickiness) * off
    tm /= tm.sum(axis=1, keepdims=True)
    if emission == "categorical":
        E = rng.dirichlet(np.full(d, 0.5), size=K)
        return H.CategoricalHMMParams(sp, tm, E)
    if covariance_type not in H.COVARIANCE_TYPES:
        raise ConfigError(f"covariance_type must be one of {H.COVARIANCE_TYPES}, got {covariance_type!r}.")
    means = rng.normal(size=(K, d)) * separation * np.sqrt(K) / 2

    def rand_cov():
        A = rng.normal(size=(d, d)) / np.sqrt(d)
        return A @ A.T + 0.5 * np.eye(d)

    cov = {"full": lambda: np.stack([rand_cov() for _ in range(K)]), "tied": rand_cov,
           "diag": lambda: rng.uniform(0.5, 1.5, size=(K, d)),
           "spherical": lambda: rng.uniform(0.5, 1.5, size=K)}[covariance_type]()
    return H.GaussianHMMParams(sp, tm, means, cov, covariance_type)


def sample_hmm(params, lengths, rng: np.random.Generator):
    """Draw sequences of the given lengths: ``(values, states)`` concatenated."""
    Xs, Zs = [], []
    for n in lengths:
        X, Z = H.sample_sequence(params, int(n), rng)
        Xs.append(X)
        Zs.append(Z)
    return np.concatenate(Xs), np.concatenate(Zs)


def write_hmm(path, n_sequences: int, n_components: int, n_features: int, emission: str = "gaussian",
              covariance_type: str = "diag", *, min_length: int = 10, max_length: int = 200, seed: int = 0,
              sequences_per_chunk: int = 1000, dtype: str = "float64",
              progress: Callable[[int], None] | None = None, overwrite: bool = False) -> str:
    """Write HMM sequences of random lengths to a Zarr group (``values``, ``offsets``, ``states``).

    Lengths are uniform on ``[min_length, max_length]``. Sequences are drawn in blocks of
    ``sequences_per_chunk``; block ``i`` uses ``default_rng([seed, i])``, so the data
    depend only on the seed and the block size, and memory stays bounded by one block.
    The true parameters are in ``attrs["truth"]``. ``values`` is float (Gaussian) or int64
    (categorical) of shape (total_steps, n_features or 1).

    Returns the absolute path.
    """
    import zarr

    from ..store import atomic_dir

    if n_sequences < 1:
        raise ConfigError(f"n_sequences must be >= 1, got {n_sequences}.")
    if not 1 <= min_length <= max_length:
        raise ConfigError(f"Need 1 <= min_length <= max_length, got {min_length}, {max_length}.")
    params = make_hmm_params(n_components, n_features, emission, covariance_type, seed=seed)
    lengths = np.random.default_rng([seed, 0x1E]).integers(min_length, max_length + 1, size=n_sequences)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    width = n_features if emission == "gaussian" else 1
    vdtype = dtype if emission == "gaussian" else "int64"
    chunk_steps = int(max(1024, min(total, (16 * 2**20) // (8 * width))))
    with atomic_dir(path, kind="dataset", overwrite=overwrite) as tmp:
        g = zarr.open_group(tmp, mode="w")
        V = g.create_array("values", shape=(total, width), dtype=vdtype, chunks=(chunk_steps, width), config={"write_empty_chunks": True})
        S = g.create_array("states", shape=(total,), dtype="int64", chunks=(chunk_steps,), config={"write_empty_chunks": True})
        g.create_array("offsets", data=offsets, chunks=(max(1, min(1 << 20, len(offsets))),), config={"write_empty_chunks": True})
        # buffer whole chunks so every chunk is written once
        buf_v, buf_s, written = [], [], 0
        for i, a in enumerate(range(0, n_sequences, sequences_per_chunk)):
            b = min(n_sequences, a + sequences_per_chunk)
            X, Z = sample_hmm(params, lengths[a:b], np.random.default_rng([seed, i]))
            buf_v.append(X.astype(vdtype))
            buf_s.append(Z)
            pending = sum(len(x) for x in buf_s)
            last = b == n_sequences
            n_out = pending if last else (pending // chunk_steps) * chunk_steps
            if n_out:
                v, s = np.concatenate(buf_v), np.concatenate(buf_s)
                V[written : written + n_out] = v[:n_out]
                S[written : written + n_out] = s[:n_out]
                buf_v, buf_s = [v[n_out:]], [s[n_out:]]
                written += n_out
            if progress is not None:
                progress(b - a)
        truth = {"family": f"{emission}_hmm", "startprob": params.startprob.tolist(),
                 "transmat": params.transmat.tolist()}
        if emission == "gaussian":
            truth.update({"covariance_type": covariance_type, "means": params.means.tolist(),
                          "covars": np.asarray(params.covars).tolist()})
        else:
            truth["emissionprob"] = params.emissionprob.tolist()
        g.attrs.update({
            "kind": "sequences", "n_sequences": int(n_sequences), "total_steps": total,
            "n_features": width, "dtype": vdtype,
            "source": f"emflow.storage.synthetic.hmm.write_hmm(seed={seed})", "truth": truth,
        })
    return os.path.abspath(os.fspath(path))
