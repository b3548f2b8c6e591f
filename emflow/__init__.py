"""emflow: Expectation-Maximization for latent-variable models on data larger than memory.

Data sit chunked in Zarr; a Dask cluster runs the E-step on each partition and returns
small additive statistics, tree-reduced into the M-step. See README.md.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("emflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .errors import (  # noqa: E402
    ClusterError,
    ClusterWarning,
    ConfigError,
    DataError,
    DataNotFoundError,
    DegenerateComponentWarning,
    EmflowConvergenceWarning,
    EmflowError,
    FeatureMismatchError,
    FitFailedError,
    ModelFormatError,
    NonFiniteDataError,
    NotFittedError,
    StorageError,
)
from .estimators.hmm import CategoricalHMM, GaussianHMM  # noqa: E402
from .storage.ingest import ingest  # noqa: E402
from .estimators.lda import LatentDirichletAllocation  # noqa: E402
from .estimators.lgssm import LinearGaussianSSM  # noqa: E402
from .estimators.mixture import GaussianMixture  # noqa: E402
from .storage.store import read_model_attrs  # noqa: E402

from .estimators import REGISTRY, EMEstimator, discover  # noqa: E402

# every family registers itself when its module is imported; export each by its class name
# (a new family's module is found without an edit here)
for _cls in discover().values():
    globals().setdefault(_cls.__name__, _cls)
del _cls


def load(path):
    """Load any saved emflow model, picking the class from the stored family.

    Every array is validated against the family's constraints (a damaged or altered model
    raises ModelFormatError naming the array). Loading never connects anywhere: the model
    computes where its ``scheduler`` is set after loading (None: threads, or the active client).
    """
    meta = read_model_attrs(path)  # a ModelFormatError unless the attributes are usable
    try:
        cls = REGISTRY[meta["family"]]
    except KeyError:
        raise ModelFormatError(
            f"The model at {str(path)!r} is of family {meta['family']!r}, which this emflow "
            f"({__version__}) does not know. Upgrade emflow."
        ) from None
    return cls.load(path)


__all__ = [
    *sorted(_c.__name__ for _c in REGISTRY.values()),
    "load",
    "EMEstimator",
    "REGISTRY",
    "ingest",
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
    "DegenerateComponentWarning",
    "EmflowConvergenceWarning",
    "ClusterWarning",
    "__version__",
]
