"""What every emflow estimator shares: scikit-learn's parameter plumbing."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["ParamsMixin"]


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``repr`` from the constructor's signature, as in
    scikit-learn (so ``sklearn.base.clone`` and grid searches work on emflow estimators)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self._param_names():
                raise ConfigError(f"Unknown parameter {k!r} for {type(self).__name__}; valid: {self._param_names()}.")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        shown = []
        for k in self._param_names():
            v, default = getattr(self, k), defaults.get(k)
            if isinstance(v, np.ndarray):
                shown.append(f"{k}=array")
            elif v is not default and not (np.isscalar(v) and np.isscalar(default) and v == default):
                shown.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(shown)})"
