"""One contract, every family: emflow's shipped contract (emflow.testing.EstimatorContract)
run for every registered family. A family's own test may also subclass it in one line
(``class TestGMM(EstimatorContract): cls = emflow.GaussianMixture``)."""

from emflow.testing import EstimatorContract


class TestEveryFamily(EstimatorContract):
    """cls left unset: parametrised over emflow's registry (a new family is included as it registers)."""
