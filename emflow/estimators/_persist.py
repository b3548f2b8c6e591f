"""``save`` / ``load`` for every estimator: one config codec and one Zarr model layout
(:mod:`emflow.storage.store`), read through the declarations of
:class:`~emflow.estimators.base.EMEstimator` (``family``, ``fitted``, ``array_params``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import __version__
from ..storage import store as _store

__all__ = ["Persistent"]


class Persistent:
    """The persistence half of the estimator contract (a mixin of ``EMEstimator``)."""

    def _arrays(self) -> dict[str, np.ndarray]:
        """The arrays a saved model holds, named after their fitted attributes (``means_``
        is stored as ``means``)."""
        return {a.strip("_"): np.asarray(getattr(self, a)) for a in self.fitted.values()}

    def _config(self) -> dict[str, Any]:
        """The constructor parameters, JSON-ready: arrays as ``{"__array__": list}``, a
        Generator or RandomState as None (it cannot be stored), execution keys dropped."""
        cfg = {}
        for k, v in _store.saved_config(self.get_params(deep=False)).items():
            if isinstance(v, (np.random.Generator, np.random.RandomState)):
                v = None
            elif isinstance(v, np.ndarray) or (k in self.array_params and v is not None):
                v = {"__array__": np.asarray(v, dtype=np.float64).tolist()}
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, os.PathLike):  # ledger=Path(...)
                v = os.fspath(v)
            cfg[k] = v
        return cfg

    @classmethod
    def _decode_config(cls, config: dict) -> dict[str, Any]:
        names = cls._get_param_names()
        cfg = {}
        for k, v in config.items():
            if k not in names:
                continue
            if isinstance(v, dict) and "__array__" in v:
                v = np.asarray(v["__array__"], dtype=np.float64)
            elif k in cls.array_params and isinstance(v, list):  # format 1 stored plain lists
                v = np.asarray(v, dtype=np.float64)
            elif isinstance(v, float) and v.is_integer() and k in ("n_init", "n_components"):
                v = int(v)  # format-1 files stored some counts as floats
            cfg[k] = v
        return cfg

    def save(self, path, *, overwrite: bool = False) -> str:
        """Save the fitted model as a Zarr group at ``path``; returns the path.

        A model already at ``path`` is replaced only with ``overwrite=True`` (atomically:
        readers see the old model or the new one); anything else there (a dataset, other
        files) is never replaced, nor the data the model was fitted on.
        """
        self._check_fitted()
        meta = {
            "version": __version__,
            "class": type(self).__name__,
            "config": self._config(),
            "fitted": {"converged": self.converged_, "n_iter": self.n_iter_, "lower_bound": self.lower_bound_,
                       "n_features_in": int(self.n_features_in_)},
            "history": self.history_,
            "dataset": getattr(self, "fit_info_", {}),
            **self._meta_extra(),
        }
        if getattr(self, "_xarray_layout", None):  # fitted on xarray: sample dims and features
            meta["xarray_layout"] = self._xarray_layout
        if getattr(self, "feature_names_in_", None) is not None:  # fitted on a pandas DataFrame
            meta["feature_names_in"] = [str(n) for n in self.feature_names_in_]
        return _store.save_model(path, self.family, self._arrays(), meta, overwrite=overwrite,
                                 inputs=_store.fit_inputs(self))

    @classmethod
    def load(cls, path):
        """Load a model saved by :meth:`save`; arrays come back bit-identical, validated.

        The model computes where the caller says (``scheduler=None`` unless set): a saved
        model never carries a scheduler.
        """
        arrays, meta = _store.load_model(path, cls.family, cls._array_spec)
        with _store.loading(path):
            fitted = meta["fitted"]
            if "n_features_in" not in fitted and "n_features" in fitted:  # older HMM models
                fitted["n_features_in"] = fitted["n_features"]
            model = cls(**cls._decode_config(meta["config"]))
            model._validate_params()
            model._restore_arrays(arrays, meta)
            _store.restore_fit_record(model, meta)
            model.n_passes_ = model.fit_info_.get("n_passes")
            model.lower_bounds_ = list(model.history_)
            model._xarray_layout = meta.get("xarray_layout")
            if meta.get("feature_names_in") is not None:
                model.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
            model._after_load(meta)
        return model

    def _restore_arrays(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        for a in self.fitted.values():
            setattr(self, a, arrays[a.strip("_")])
