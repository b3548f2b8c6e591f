"""Test helpers shipped with emflow: the estimator contract every family passes.

>>> from emflow.testing import EstimatorContract
>>> class TestMyFamily(EstimatorContract):   # doctest: +SKIP
...     cls = MyFamilyEstimator

pytest is needed to run it (it is not a dependency of emflow itself).
"""

from .contract import EstimatorContract, registry

__all__ = ["EstimatorContract", "registry"]
