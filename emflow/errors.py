"""Exceptions raised by emflow.

Every error the library raises on purpose derives from :class:`EmflowError`, so a caller
can catch the package's errors in one place. Each subclass also derives from the builtin
exception a Python user would expect (``ValueError``, ``FileNotFoundError``...), and every
message says what to do about it.
"""

from __future__ import annotations

import warnings

from sklearn.exceptions import ConvergenceWarning as _SkConvergenceWarning
from sklearn.exceptions import NotFittedError as _SkNotFittedError

__all__ = [
    "EmflowError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "NonFiniteDataError",
    "FeatureMismatchError",
    "NotFittedError",
    "ModelFormatError",
    "FitFailedError",
    "ClusterError",
    "StorageError",
    "LedgerBusy",
    "DegenerateComponentWarning",
    "EmflowConvergenceWarning",
    "ClusterWarning",
]


class EmflowError(Exception):
    """Base class of every error raised by emflow."""

    def __reduce__(self):  # keep subclasses picklable across Dask workers
        return (self.__class__, self.args)


class ConfigError(EmflowError, ValueError):
    """An estimator or command was given an invalid parameter."""


class DataError(EmflowError, ValueError):
    """The data cannot be used as given (wrong rank, dtype, size...)."""


class DataNotFoundError(EmflowError, FileNotFoundError):
    """A dataset or model path does not exist."""


class NonFiniteDataError(DataError):
    """The data hold NaN or infinite values."""


class FeatureMismatchError(DataError):
    """A model is applied to data with a different number of features."""


class NotFittedError(EmflowError, _SkNotFittedError):
    """A method that needs a fitted model was called before ``fit``."""


class ModelFormatError(EmflowError, ValueError):
    """A stored model cannot be read (another family, corrupt, or a newer format)."""


class FitFailedError(EmflowError, ValueError, RuntimeError):
    """EM cannot continue (for example a covariance that no regularisation repairs)."""


class ClusterError(EmflowError, RuntimeError):
    """The Dask cluster could not be reached or was lost."""


class StorageError(EmflowError, OSError):
    """Writing a model, checkpoint or output failed (disk full, read-only location...).

    Whatever was at the destination before is left as it was.
    """


class LedgerBusy(StorageError):
    """Another fit (another process, or another thread of this one) holds the lock of the
    statistics ledger this fit would write; raised before the data are read, and the ledger
    is left as it was. The message names the holder (host, pid, start time) and the lock file.
    """


class DegenerateComponentWarning(UserWarning):
    """A mixture component lost its points or its covariance had to be repaired."""


class EmflowConvergenceWarning(_SkConvergenceWarning):
    """EM stopped at ``max_iter`` before the change in log-likelihood fell below ``tol``."""


class ClusterWarning(UserWarning):
    """The cluster lost something it could recover from (work went on)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    warnings.warn(message, category, stacklevel=3)
