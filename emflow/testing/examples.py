"""Small datasets for the shipped contract test, keyed by family name.

STAND-IN (issue 14): once a family's estimator defines the classmethod
``_contract_example(rng) -> (fit_args, init_kwargs)``, the contract uses that and the entry
here is removed; the mixture and the state-space model define theirs, these remain until
the other faces do.

``fit_args`` are the in-memory arguments of ``fit`` (``(X,)``, ``(X, lengths)``, ``(corpus,)``);
Each holds a few KiB, so that partitionings down to the 1 KiB minimum of ``partition_bytes``
split it several ways; ``init_kwargs`` are the constructor keywords (a few components, ``random_state``, ``tol=0``
where the family has it so that iteration counts are exact).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EXAMPLES", "DATA_KINDS", "example_for"]


def _gaussian_hmm(rng):
    from ..storage.synthetic import make_hmm_params, sample_hmm

    p = make_hmm_params(2, 2, "gaussian", "diag", seed=1)
    lengths = [60, 35, 80, 50, 45]
    X, _ = sample_hmm(p, lengths, rng)
    return (X, lengths), {"n_components": 2, "covariance_type": "diag", "random_state": 0, "tol": 0.0}


def _categorical_hmm(rng):
    lengths = [150, 100, 200, 120]
    return (rng.integers(0, 4, size=(sum(lengths), 1)), lengths), {
        "n_components": 2, "n_features": 4, "random_state": 0, "tol": 0.0}


def _latent_dirichlet_allocation(rng):
    import scipy.sparse as sp

    dense = rng.poisson(0.6, size=(40, 20))
    dense[dense.sum(1) == 0, 0] = 1
    return (sp.csr_matrix(dense),), {"n_components": 3, "random_state": 0}


EXAMPLES = {
    "gaussian_hmm": _gaussian_hmm,
    "categorical_hmm": _categorical_hmm,
    "latent_dirichlet_allocation": _latent_dirichlet_allocation,
}

#: STAND-IN (issue 14) for the estimators' ``data_kind`` class attribute
DATA_KINDS = {
    "gaussian_mixture": "rows",
    "gaussian_hmm": "sequences",
    "categorical_hmm": "sequences",
    "linear_gaussian_ssm": "sequences",
    "latent_dirichlet_allocation": "corpus",
}


def example_for(cls, family: str, rng: np.random.Generator):
    """``(fit_args, init_kwargs)`` of a family: its own ``_contract_example``, else the table."""
    own = getattr(cls, "_contract_example", None)
    if own is not None:
        try:
            return own(rng)
        except NotImplementedError:  # the base's default: the family has not written one yet
            pass
    if family not in EXAMPLES:
        raise NotImplementedError(
            f"{cls.__name__} (family {family!r}) defines no _contract_example(rng) classmethod; the shipped "
            "contract test needs one: a small dataset and constructor keywords.")
    return EXAMPLES[family](rng)
