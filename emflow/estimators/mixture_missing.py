"""``GaussianMixture(missing="marginalize")``: the estimator side of EM with missing values.

The math is :mod:`emflow.models.gmm_missing`. Here: the EM family whose E-step marginalises
NaN, the initialisation (k-means and the other starts run on the data with each missing value
replaced by its column's mean over the observed values, one extra pass), and ``impute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..models import gmm_missing as M

__all__ = ["MISSING", "MissingGMMFamily", "filling_engine", "MissingValuesMixin"]

MISSING = ("error", "marginalize")


@dataclass(frozen=True)
class MissingGMMFamily:
    """The Gaussian mixture family ``base`` (a ``GMMFamily``) with an E-step that marginalises
    missing values (NaN); its M-step and objective are ``base``'s."""

    base: Any

    def e_step(self, X, w, params):
        return M.e_step(X, w, params, self.base.compute_dtype)

    def m_step(self, stats, params):
        return self.base.m_step(stats, params)

    def objective(self, stats) -> float:
        return self.base.objective(stats)


def _observed_sums(X, w):
    """Per column: (weighted) sum of the observed values and their weight, shape (2, d)."""
    X = np.asarray(X, dtype=np.float64)
    obs = ~np.isnan(X)
    ww = np.ones(len(X)) if w is None else np.asarray(w, dtype=np.float64)
    return np.stack([ww @ np.where(obs, X, 0.0), ww @ obs])


@dataclass(frozen=True)
class _Filled:
    """``fn`` applied to a partition whose NaN are replaced by ``fill`` (picklable)."""

    fn: Callable
    fill: np.ndarray

    def __call__(self, X, w, *args):
        X = np.asarray(X)
        return self.fn(np.where(np.isnan(X), self.fill, X), w, *args)

    # filling changes values, not what a pass needs across a cut sequence: fn's declarations
    @property
    def step_local(self) -> bool:
        from ..execution.sweeps import _is_step_local

        return _is_step_local(self.fn)

    @property
    def sweeps(self):
        from ..execution.sweeps import sweeps_of

        return sweeps_of(self.fn)


class _FillingEngine:
    """An engine whose passes see the data with missing values filled (initialisation only)."""

    def __init__(self, engine, fill: np.ndarray):
        self._engine = engine
        self._fill = fill

    def map_reduce(self, fn, loaded, *args, **kwargs):
        return self._engine.map_reduce(_Filled(fn, self._fill), loaded, *args, **kwargs)

    def map(self, fn, loaded, *args, **kwargs):
        return self._engine.map(_Filled(fn, self._fill), loaded, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def filling_engine(engine, loaded):
    """``engine`` seen through the column-mean fill of the missing values of ``loaded``."""
    sums = engine.map_reduce(_observed_sums, loaded)
    fill = np.divide(sums[0], sums[1], out=np.zeros_like(sums[0]), where=sums[1] > 0)
    return _FillingEngine(engine, fill)


class MissingValuesMixin:
    """``impute`` for :class:`~emflow.estimators.mixture.GaussianMixture`, and the two settings
    its methods read (a subclass without the ``missing`` or ``prior`` parameter gets the
    defaults)."""

    @property
    def _marginalize(self) -> bool:
        return getattr(self, "missing", "error") == "marginalize"

    def _allows_nan(self) -> bool:
        return self._marginalize

    @property
    def _prior_setting(self):
        return getattr(self, "prior", None)

    def impute(self, data, *, out=None, overwrite: bool = False):
        """Each missing value (NaN) replaced by its conditional expectation under the fitted
        mixture given the row's observed values, ``sum_k p(k | x_o) E[x_m | x_o, k]``.

        Observed values are returned unchanged (with ``missing="error"`` the data may hold
        no NaN, so the result is the data).

        Parameters
        ----------
        data : str, PathLike, zarr.Array, dask.array.Array or array-like of shape (n_samples, n_features)
        out : str or PathLike, optional
            Write the result (float64, shape (n_samples, n_features)) to this Zarr array
            instead of returning it.
        overwrite : bool, default False
            Replace an emflow output already at ``out``.

        Returns
        -------
        ndarray of shape (n_samples, n_features), or the Zarr array written to ``out``.
        """
        return self._apply(data, "impute", out, overwrite)
