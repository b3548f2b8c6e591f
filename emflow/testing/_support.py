"""Helpers of the shipped contract test (emflow.testing.contract): the registry, a family's
declarations, data in every layout."""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import numpy as np

__all__ = ["registry", "family_name", "data_kind", "iter_param", "example_for"]


def registry() -> dict[str, type]:
    """Every registered family (``emflow.estimators.REGISTRY``, all estimator modules imported)."""
    from ..estimators import discover

    return dict(discover())


def family_name(cls) -> str:
    if not getattr(cls, "family", ""):
        raise NotImplementedError(f"{cls.__name__} declares no family name (class attribute family = '...').")
    return cls.family


def data_kind(cls, family: str = "") -> str:
    return cls.data_kind


def iter_param(cls) -> str:
    return cls.iter_param


def example_for(cls, family: str, rng: np.random.Generator):
    """``(fit_args, init_kwargs)``: the family's own ``_contract_example(rng)``."""
    try:
        return cls._contract_example(rng)
    except NotImplementedError:
        raise NotImplementedError(
            f"{cls.__name__} (family {family!r}) defines no _contract_example(rng) classmethod; the shipped "
            "contract test needs one: a small dataset and constructor keywords.") from None


def ignore_convergence_warnings() -> None:
    from sklearn.exceptions import ConvergenceWarning

    from ..errors import EmflowConvergenceWarning

    warnings.simplefilter("ignore", EmflowConvergenceWarning)
    warnings.simplefilter("ignore", ConvergenceWarning)


def fitted_arrays(est) -> dict[str, np.ndarray]:
    """The fitted array attributes (``name_``) of an estimator."""
    return {k: v for k, v in vars(est).items()
            if k.endswith("_") and not k.startswith("_") and isinstance(v, np.ndarray)}


def get_parameters(est):
    """The fitted parameters as the family's NamedTuple (what ``fit(initial_params=)`` takes)."""
    return est._get_parameters()


def init_params_for(est, fit_args):
    return est.init_params_for(*fit_args, init=0)


def outputs_of(cls) -> dict[str, str]:
    """``{output: method}`` of a family (its ``outputs`` declaration)."""
    return {k: getattr(v, "method", v) for k, v in (getattr(cls, "outputs", None) or {}).items()}


def in_memory_result(r) -> np.ndarray:
    return np.asarray(r[0] if isinstance(r, tuple) else r)


# -- data in every layout ------------------------------------------------------------
def _offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def one_partition(kind: str, fit_args) -> tuple:
    """The whole example as one partition, as the engine hands it to ``e_step``."""
    if kind == "rows":
        return (np.asarray(fit_args[0], dtype=np.float64), None)
    if kind == "sequences":
        X = np.asarray(fit_args[0])
        return (X[:, None] if X.ndim == 1 else X, _offsets(fit_args[1]))
    from ..storage.corpus import open_corpus

    return open_corpus(fit_args[0], partition_bytes=1 << 50).loaders[0].read()


def split_partition(kind: str, whole: tuple, n_pieces: int, rng: np.random.Generator) -> list[tuple]:
    """``n_pieces`` non-empty pieces at random boundaries (rows, sequences or documents), each
    with its context (global start of its unit and of its first element)."""
    if kind == "rows":
        X, w = whole
        n = len(X)
    else:
        n = len(whole[1]) - 1
    n_pieces = min(n_pieces, n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=n_pieces - 1, replace=False))
    bounds = list(zip([0, *cuts], [*cuts, n]))
    pieces = []
    for a, b in bounds:
        if kind == "rows":
            part, elem = (X[a:b], None if w is None else w[a:b]), a
        else:
            first, ptr = whole
            elem = int(ptr[a])
            part = (first[ptr[a]:ptr[b]], ptr[a:b + 1] - ptr[a])
        pieces.append((part, SimpleNamespace(start=int(a), element_start=elem, iteration=1, seed=0)))
    return pieces


def e_step(family, part: tuple, params, context):
    """``family.e_step`` of one partition (with a context where the family takes one)."""
    if isinstance(context, int):
        context = SimpleNamespace(start=0, element_start=0, iteration=1, seed=0)
    if "context" in inspect.signature(family.e_step).parameters:
        return family.e_step(*part, params, context)
    return family.e_step(*part, params)


def check_additive(family, kind: str, whole: tuple, params, rng: np.random.Generator,
                   splits=(2, 3, 5), rtol: float = 1e-10) -> None:
    """Assert that the statistics of ``whole`` equal the sum of those of random splits of it."""
    from ..stats import add

    ref = e_step(family, whole, params, 0)
    for n_pieces in splits:
        pieces = split_partition(kind, whole, n_pieces, rng)
        total = add(*[e_step(family, p, params, ctx) for p, ctx in pieces])
        assert type(total) is type(ref), (type(total), type(ref))
        for name, x, y in zip(ref._fields, ref, total):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol, err_msg=f"{name}, {len(pieces)} pieces")


def to_zarr(kind: str, fit_args, path) -> str:
    """The example written to Zarr in small chunks (several per partition size tried)."""
    if kind == "rows":
        import zarr

        X = np.asarray(fit_args[0], dtype=np.float64)
        zarr.create_array(store=str(path), data=X, chunks=(25, X.shape[1]), overwrite=True)
        return str(path)
    if kind == "sequences":
        from ..storage.sequences import write_sequences

        values, offsets = one_partition(kind, fit_args)
        return write_sequences(path, values, offsets, chunk_steps=32)
    from ..storage.corpus import write_corpus

    return write_corpus(path, fit_args[0], chunk_docs=5)


def partition_sizes(kind: str, fit_args) -> list[int]:
    """Partition sizes (bytes) that split the example several ways."""
    return [1024, 2048]


def wrong_ndim(kind: str, fit_args) -> list[tuple]:
    X = fit_args[0]
    if kind == "corpus":
        return [(np.asarray(X.todense())[None],)]
    X = np.asarray(X)
    return [(X.reshape(X.shape + (1,)), *fit_args[1:])]


def non_finite(kind: str, fit_args) -> tuple:
    X = fit_args[0]
    if kind == "corpus":
        X = X.astype(np.float64, copy=True)
        X.data[0] = np.inf
        return (X,)
    X = np.array(X, dtype=np.float64)
    X[3, 0] = np.inf
    return (X, *fit_args[1:])


def more_features(kind: str, fit_args) -> tuple:
    """The example with one more feature (column, symbol or term) than the model has."""
    X = fit_args[0]
    if kind == "corpus":
        import scipy.sparse as sp

        return (sp.hstack([X, sp.csr_matrix(np.ones((X.shape[0], 1), dtype=X.dtype))]).tocsr(),)
    X = np.asarray(X)
    if X.dtype.kind in "iu":  # symbols: one beyond the largest
        X = X.copy()
        X[0] = X.max() + 1
        return (X, *fit_args[1:])
    return (np.hstack([X, X[:, :1]]), *fit_args[1:])
