"""Gaussian mixture data with known parameters."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ...errors import ConfigError
from ...models.gmm import COVARIANCE_TYPES

__all__ = ["make_gmm_params", "sample_gmm", "write_gmm"]


def make_gmm_params(n_components: int, n_features: int, covariance_type: str = "full", *,
                    separation: float = 4.0, seed: int = 0) -> dict:
    """True parameters: means about ``separation`` standard deviations apart, random covariances.

    Returns a dict with ``weights`` (K,), ``means`` (K, d) and ``covariances`` in the shape
    of ``covariance_type`` (as :class:`emflow.GaussianMixture` stores them).
    """
    if covariance_type not in COVARIANCE_TYPES:
        raise ConfigError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}.")
    if n_components < 1 or n_features < 1:
        raise ConfigError("n_components and n_features must be >= 1.")
    rng = np.random.default_rng([seed, 0xC0FFEE])
    K, d = n_components, n_features
    weights = rng.dirichlet(np.full(K, 5.0))
    means = rng.normal(size=(K, d)) * separation * np.sqrt(K) / 2

    def rand_cov():
        A = rng.normal(size=(d, d)) / np.sqrt(d)
        return A @ A.T + 0.5 * np.eye(d)

    if covariance_type == "full":
        cov = np.stack([rand_cov() for _ in range(K)])
    elif covariance_type == "tied":
        cov = rand_cov()
    elif covariance_type == "diag":
        cov = rng.uniform(0.5, 1.5, size=(K, d))
    else:
        cov = rng.uniform(0.5, 1.5, size=K)
    return {"weights": weights, "means": means, "covariances": cov, "covariance_type": covariance_type}


def _chols(params: dict) -> list[np.ndarray]:
    ct, cov = params["covariance_type"], np.asarray(params["covariances"])
    K, d = np.asarray(params["means"]).shape
    if ct == "full":
        return [np.linalg.cholesky(c) for c in cov]
    if ct == "tied":
        return [np.linalg.cholesky(cov)] * K
    if ct == "diag":
        return [np.diag(np.sqrt(c)) for c in cov]
    return [np.eye(d) * np.sqrt(c) for c in cov]


def sample_gmm(params: dict, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` rows: ``(X, labels)`` with X of shape (n, d)."""
    means = np.asarray(params["means"])
    labels = rng.choice(len(means), size=n, p=np.asarray(params["weights"]))
    Z = rng.standard_normal((n, means.shape[1]))
    X = np.empty_like(Z)
    for k, L in enumerate(_chols(params)):
        idx = labels == k
        X[idx] = means[k] + Z[idx] @ L.T
    return X, labels


def write_gmm(path, n_samples: int, n_components: int, n_features: int, covariance_type: str = "full", *,
              separation: float = 4.0, seed: int = 0, chunk_rows: int | None = None,
              dtype: str = "float64", weights: bool = False,
              progress: Callable[[int], None] | None = None, overwrite: bool = False) -> str:
    """Write a Gaussian-mixture dataset to a Zarr group, chunk by chunk.

    The group holds ``X`` (n_samples, n_features), ``labels`` (n_samples,) and, with
    ``weights=True``, integer-valued row weights in ``weights``. The true parameters are
    in ``attrs["truth"]``. Memory stays bounded by one chunk whatever ``n_samples``.
    Chunk ``i`` is drawn from ``default_rng([seed, i])``, so the data depend only on the
    seed and ``chunk_rows``.

    Returns the absolute path.
    """
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    from ..store import atomic_dir

    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}.")
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}.")
    params = make_gmm_params(n_components, n_features, covariance_type, separation=separation, seed=seed)
    row_bytes = n_features * np.dtype(dtype).itemsize
    chunk_rows = int(chunk_rows or max(1024, min(n_samples, (16 * 2**20) // row_bytes)))
    comp = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)
    with atomic_dir(path, kind="dataset", overwrite=overwrite) as tmp:
        g = zarr.open_group(tmp, mode="w")
        every = {"write_empty_chunks": True}  # every chunk is stored, so a missing one is detectable
        X = g.create_array("X", shape=(n_samples, n_features), dtype=dtype, chunks=(chunk_rows, n_features),
                           compressors=comp, config=every, attributes={"all_chunks_written": True})
        y = g.create_array("labels", shape=(n_samples,), dtype="int32", chunks=(chunk_rows,), compressors=comp,
                           config=every, attributes={"all_chunks_written": True})
        W = (g.create_array("weights", shape=(n_samples,), dtype="float64", chunks=(chunk_rows,),
                            compressors=comp, config=every, attributes={"all_chunks_written": True})
             if weights else None)
        for i, a in enumerate(range(0, n_samples, chunk_rows)):
            b = min(n_samples, a + chunk_rows)
            rng = np.random.default_rng([seed, i])
            Xi, yi = sample_gmm(params, b - a, rng)
            X[a:b] = Xi.astype(dtype)
            y[a:b] = yi
            if W is not None:
                W[a:b] = rng.integers(1, 4, size=b - a).astype(np.float64)
            if progress is not None:
                progress(b - a)
        g.attrs.update({
            "kind": "rows", "rows": "X", "n_samples": n_samples, "n_features": n_features,
            "dtype": dtype, "source": f"emflow.storage.synthetic.write_gmm(seed={seed})",
            "truth": {
                "family": "gaussian_mixture", "covariance_type": covariance_type,
                "weights": params["weights"].tolist(), "means": params["means"].tolist(),
                "covariances": np.asarray(params["covariances"]).tolist(),
            },
        })
    return os.path.abspath(os.fspath(path))
