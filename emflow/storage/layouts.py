"""Open a stored dataset in the layout a family reads: ``rows``, ``sequences`` or ``corpus``
(an estimator's ``data_kind``). The command line and the flows open data through this one
dispatch, before any cluster starts, so a dataset in the wrong layout is refused early."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["KINDS", "open_stored"]

KINDS = ("rows", "sequences", "corpus")


def open_stored(kind: str, data: Any, sample_weight: Any = None, *, allow_nan: bool = False, min_rows: int = 1):
    """The validated data view of ``data`` for a family whose ``data_kind`` is ``kind``.

    Parameters
    ----------
    kind : {"rows", "sequences", "corpus"}
    data : Zarr path, URL or array
    sample_weight : row weights (rows only): a Zarr path or the name of an array beside the data
    allow_nan : bool
        NaN is a missing value (the estimator's ``_allows_nan()``), not an error.
    min_rows : int
        Rows only: fewer rows than this is an error (e.g. ``n_components``).

    Returns
    -------
    The opened data (:func:`~emflow.storage.data.open_rows`,
    :func:`~emflow.storage.sequences.open_sequences`, or
    :func:`~emflow.storage.corpus.open_corpus`).
    """
    if kind not in KINDS:
        raise ConfigError(f"data_kind must be one of {KINDS}, got {kind!r}.")
    if sample_weight is not None and kind != "rows":
        raise ConfigError(f"Row weights are for rows; a {kind} dataset takes none.")
    if kind == "rows":
        from .data import open_rows

        return open_rows(data, sample_weight, min_rows=min_rows, allow_nan=allow_nan)
    if kind == "sequences":
        from .sequences import open_sequences

        return open_sequences(data, allow_nan=allow_nan)
    from .corpus import open_corpus

    return open_corpus(data)
