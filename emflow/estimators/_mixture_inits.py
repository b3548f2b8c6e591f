"""Checks of a Gaussian mixture's starting arrays (``weights_init``, ``means_init``,
``precisions_init``), in scikit-learn's words."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["check_inits"]


def check_inits(est, d: int) -> None:
    """scikit-learn's checks of ``weights_init``, ``means_init``, ``precisions_init``
    (its wording, which its users' code and tests match)."""
    K, ct = est.n_components, est.covariance_type

    def shape_error(name, got, want, param):
        return ConfigError(f"The parameter '{name}' should have the shape of {want}, but got {got} ({param}).")

    if est.weights_init is not None:
        w = np.asarray(est.weights_init, dtype=np.float64)
        if w.shape != (K,):
            raise shape_error("weights", w.shape, (K,), "weights_init")
        if np.any(w < 0) or np.any(w > 1):
            # scikit-learn's message, word for word (its "max value" is the minimum)
            raise ConfigError(f"The parameter 'weights' should be in the range [0, 1], but got max value "
                              f"{np.min(w):.5f}, min value {np.max(w):.5f} (weights_init: its values lie in "
                              f"[{np.min(w):.5g}, {np.max(w):.5g}])")
        if not np.isclose(w.sum(), 1.0, rtol=0, atol=1e-6):
            raise ConfigError(f"The parameter 'weights' should be normalized, but got sum(weights) = "
                              f"{w.sum():.5f} (weights_init). Normalise it: w / w.sum().")
    if est.means_init is not None:
        m = np.asarray(est.means_init, dtype=np.float64)
        if m.shape != (K, d):
            raise shape_error("means", m.shape, (K, d), f"means_init, for data with {d} features")
    if est.precisions_init is not None:
        p = np.asarray(est.precisions_init, dtype=np.float64)
        shape = {"full": (K, d, d), "tied": (d, d), "diag": (K, d), "spherical": (K,)}[ct]
        if p.shape != shape:
            raise shape_error(f"{ct} precision", p.shape, shape, f"precisions_init, covariance_type={ct!r}")
        if ct in ("full", "tied"):
            mats = p[None] if ct == "tied" else p
            for mtx in mats:
                if not np.allclose(mtx, mtx.T) or np.any(np.linalg.eigvalsh(mtx) <= 0):
                    raise ConfigError(f"'{ct} precision' should be symmetric, positive-definite (precisions_init)")
        elif np.any(p <= 0):
            raise ConfigError(f"'{ct} precision' should be positive (precisions_init)")
