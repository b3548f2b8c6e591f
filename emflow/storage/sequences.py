"""Ragged sequences: many sequences of different lengths, for HMMs and state-space models.

Layout in Zarr (a group)::

    values   (total_steps, n_features)   float or int, chunked along steps
    offsets  (n_sequences + 1,)          int64, offsets[0] == 0, strictly increasing,
                                         offsets[-1] == total_steps

Sequence ``s`` is ``values[offsets[s]:offsets[s + 1]]``. A partition is a run of whole
sequences, or, with ``cut_long=True``, one *slice* of a sequence longer than the partition
budget: such a sequence is cut along its time axis into slices of about the budget, and
:attr:`SequenceData.chains` lists the partitions of each cut sequence in time order (the
models that accept cuts pass boundary messages along them: :mod:`emflow.models.hmm_long`).
In memory, hmmlearn's ``(X, lengths)`` convention is accepted as well.

A partition loader returns ``(values, local_offsets)`` with ``local_offsets[0] == 0`` (a
slice: ``[0, n_steps]``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from .chunks import _check_dtype, _url, check_pointer, read_chunked
from .data import DEFAULT_PARTITION_BYTES, CheckedLoader, is_zarr_path, value_findings
from ..errors import DataError, DataNotFoundError

__all__ = ["SequenceData", "open_sequences", "check_offsets", "write_sequences", "write_owned", "write_step_outputs"]


def check_offsets(offsets: np.ndarray, total_steps: int, where: str = "offsets") -> np.ndarray:
    """Validate sequence offsets; returns them as int64."""
    off = check_pointer(offsets, "n_sequences", where)
    steps = np.diff(off)
    if np.any(steps <= 0):
        s = int(np.flatnonzero(steps <= 0)[0])
        raise DataError(
            f"{where} must be strictly increasing; sequence {s} has length {int(steps[s])}. "
            "Drop empty sequences before writing the dataset."
        )
    if off[-1] != total_steps:
        raise DataError(
            f"{where}[-1] is {int(off[-1])} but the values hold {total_steps} steps; the offsets do "
            "not match the values."
        )
    return off


@dataclass(frozen=True)
class SeqChecks:
    """What a partition of sequences must satisfy: finite values (with ``allow_nan``, NaN
    means "missing" and only infinities are errors), and none beyond ``limit`` in magnitude
    when one is set."""

    step0: int
    allow_nan: bool = False
    chunk_steps: int | None = None
    limit: float | None = None

    def findings(self, parts) -> list:
        values, _ = parts
        return value_findings(values, self.step0, "step", self.chunk_steps, self.limit, self.allow_nan)


@dataclass(frozen=True)
class ZarrSeqLoader(CheckedLoader):
    url: str
    seq_start: int
    seq_stop: int
    step_start: int
    step_stop: int
    index: int
    allow_nan: bool = False
    chunk_steps: int | None = None
    limit: float | None = None

    @property
    def where(self) -> str:
        return (f"partition {self.index} (sequences {self.seq_start}-{self.seq_stop}, steps "
                f"{self.step_start}-{self.step_stop}) of {self.url}")

    @property
    def checks(self) -> SeqChecks:
        return SeqChecks(self.step_start, self.allow_nan, self.chunk_steps, self.limit)

    def read(self):
        import zarr

        g = zarr.open_group(self.url, mode="r")
        values = read_chunked(g["values"], self.step_start, self.step_stop, "sequence values",
                              url=self.url + "/values", unit="steps")
        off = read_chunked(g["offsets"], self.seq_start, self.seq_stop + 1, "sequence offsets",
                           url=self.url + "/offsets", unit="entries")
        off = np.asarray(off, dtype=np.int64) - self.step_start
        if len(off) != self.seq_stop - self.seq_start + 1 or off[0] != 0 or off[-1] != len(values):
            raise DataError(
                f"The offsets of {self.where} no longer match the steps they delimit: the dataset changed after "
                "it was opened. Let whatever writes to it finish, then run again."
            )
        return values, off


@dataclass(frozen=True)
class ZarrSliceLoader(ZarrSeqLoader):
    """Steps ``step_start .. step_stop`` of sequence ``seq_start``: one slice of a cut sequence."""

    @property
    def where(self) -> str:
        return (f"partition {self.index} (steps {self.step_start}-{self.step_stop}, a slice of sequence "
                f"{self.seq_start}) of {self.url}")

    def read(self):
        import zarr

        g = zarr.open_group(self.url, mode="r")
        values = read_chunked(g["values"], self.step_start, self.step_stop, "sequence values",
                              url=self.url + "/values", unit="steps")
        return values, np.array([0, len(values)], dtype=np.int64)


@dataclass(frozen=True)
class ArraySeqLoader(CheckedLoader):
    values: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    index: int
    allow_nan: bool = False
    step0: int = 0
    limit: float | None = None

    @property
    def where(self) -> str:
        return f"partition {self.index} of the sequences"

    @property
    def checks(self) -> SeqChecks:
        return SeqChecks(self.step0, self.allow_nan, limit=self.limit)

    def read(self):
        return self.values, self.offsets



@dataclass
class SequenceData:
    """Sequences split into partitions of whole sequences (engine-compatible like RowData)."""

    n_rows: int  # total steps
    n_features: int
    dtype: np.dtype
    offsets: np.ndarray
    loaders: list[Callable]
    bounds: list[tuple[int, int]]  # step ranges of the partitions
    seq_bounds: list[tuple[int, int]]  # sequence ranges of the partitions
    source: str
    in_memory: bool
    url: str | None
    chunk_rows: int
    weighted: bool = False
    # partitions of each sequence cut into slices, in time order (none: every partition
    # holds whole sequences)
    chains: list[list[int]] = field(default_factory=list)
    what: ClassVar[str] = "The sequence dataset"

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.n_features * np.dtype(self.dtype).itemsize

    @property
    def n_partitions(self) -> int:
        return len(self.loaders)


def _runs(offsets: np.ndarray, target_steps: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Sequences ``lo .. hi`` in runs of whole sequences of about ``target_steps`` steps."""
    cuts = [lo]
    # cut at the first sequence boundary at or after each multiple of target_steps
    for goal in range(int(offsets[lo]) + target_steps, int(offsets[hi]), target_steps):
        s = int(np.searchsorted(offsets, goal, side="left"))
        if s > cuts[-1] and s < hi:
            cuts.append(s)
    cuts.append(hi)
    return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]


def _slices(a: int, b: int, budget: int, chunk: int | None) -> list[int]:
    """Cut points of steps ``a .. b`` into ``ceil((b - a) / budget)`` slices of near-equal
    length, moved onto Zarr chunk boundaries when the chunks are smaller than a slice."""
    n = -(-(b - a) // budget)
    cuts = [a + (k * (b - a)) // n for k in range(n + 1)]
    if chunk and chunk < (b - a) // n:
        inner = sorted({max(a + 1, min(b - 1, int(round(c / chunk)) * chunk)) for c in cuts[1:-1]})
        cuts = [a, *inner, b]
    return cuts


def _seq_partitions(offsets: np.ndarray, row_bytes: int, target_bytes: int, min_partitions: int,
                    cut_long: bool = False, chunk: int | None = None):
    """``(parts, steps, chains)``: the sequence range and step range of each partition, and
    the partitions of each cut sequence. Whole sequences are grouped in runs of about
    ``target_bytes`` (fewer bytes if that makes at least ``min_partitions``); with
    ``cut_long``, a sequence of more than ``target_bytes`` is cut into slices of at most
    that."""
    total = int(offsets[-1])
    n_seq = len(offsets) - 1
    budget = max(1, target_bytes // max(1, row_bytes))
    target_steps = min(budget, max(1, -(-total // max(1, min_partitions))))
    lengths = np.diff(offsets)
    long = np.flatnonzero(lengths > budget) if cut_long else np.zeros(0, np.int64)
    parts, chains = [], []
    lo = 0
    for s in [*long.tolist(), n_seq]:
        if s > lo:
            parts += [((a, b), (int(offsets[a]), int(offsets[b]))) for a, b in _runs(offsets, target_steps, lo, s)]
        if s < n_seq:
            cuts = _slices(int(offsets[s]), int(offsets[s + 1]), budget, chunk)
            chains.append(list(range(len(parts), len(parts) + len(cuts) - 1)))
            parts += [((s, s + 1), (cuts[k], cuts[k + 1])) for k in range(len(cuts) - 1)]
        lo = s + 1
    return [p for p, _ in parts], [st for _, st in parts], chains


def open_sequences(
    data: Any,
    lengths: Any = None,
    *,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    min_partitions: int = 1,
    allow_nan: bool = False,
    max_magnitude: float | None = None,
    cut_long: bool = False,
) -> SequenceData:
    """Open ragged sequences.

    Parameters
    ----------
    data : str, PathLike or array-like of shape (total_steps, n_features)
        A Zarr group with ``values`` and ``offsets``, or the concatenated values in memory.
    lengths : array-like of shape (n_sequences,), optional
        In-memory only (hmmlearn's convention); ``None`` means one sequence.
    allow_nan : bool, default False
        Accept NaN values (they mean "missing" to models that handle missing observations,
        such as state-space models); infinities are still errors.
    max_magnitude : float, optional
        Values beyond this magnitude are an error (a ``FitFailedError`` that says to scale
        the data), found by the opening scan before any arithmetic. Models that square
        the values (Gaussian emissions, state-space models) pass
        :data:`emflow.storage.data.SQUARE_LIMIT`.
    cut_long : bool, default False
        Cut a sequence longer than ``partition_bytes`` into slices along its time axis
        (one partition each, listed in :attr:`SequenceData.chains`), for models that pass
        boundary messages between slices; otherwise a partition always holds whole
        sequences.
    """
    if is_zarr_path(data):
        import zarr

        url = _url(data)
        if "://" not in url and not os.path.exists(url):
            raise DataNotFoundError(f"No sequence dataset at {url!r}. Check the path.")
        try:
            g = zarr.open_group(url, mode="r")
        except Exception as exc:
            raise DataError(f"{url!r} is not a Zarr group of sequences ({exc}).") from exc
        if "values" not in g or "offsets" not in g:
            raise DataError(
                f"The Zarr group at {url!r} needs arrays 'values' and 'offsets' (found "
                f"{sorted(g.array_keys())}). Write sequences with emflow.storage.sequences.write_sequences."
            )
        values = g["values"]
        if values.ndim != 2:
            raise DataError(f"'values' at {url!r} has shape {values.shape}; expected (total_steps, n_features).")
        _check_dtype(np.dtype(values.dtype), f"'values' at {url!r}")
        if values.shape[1] == 0:
            raise DataError(f"'values' at {url!r} has shape {values.shape}: no features, nothing to fit.")
        offsets = check_offsets(read_chunked(g["offsets"], 0, g["offsets"].shape[0], "sequence offsets",
                                             url=url + "/offsets", unit="entries"),
                                values.shape[0], f"'offsets' at {url!r}")
        row_bytes = values.shape[1] * np.dtype(values.dtype).itemsize
        C = int(values.chunks[0])
        parts, bounds, chains = _seq_partitions(offsets, row_bytes, partition_bytes, min_partitions, cut_long, C)
        cut = {i for ch in chains for i in ch}
        loaders = [
            (ZarrSliceLoader if i in cut else ZarrSeqLoader)(url, a, b, sa, sb, i, allow_nan, C, max_magnitude)
            for i, ((a, b), (sa, sb)) in enumerate(zip(parts, bounds))
        ]
        return SequenceData(
            values.shape[0], values.shape[1], np.dtype(values.dtype), offsets, loaders, bounds, parts,
            url, False, url, C, chains=chains,
        )
    X = np.asarray(data)
    if X.ndim != 2:
        raise DataError(f"Sequence values have shape {X.shape}; expected 2-D (total_steps, n_features).")
    _check_dtype(X.dtype, "Sequence values")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"The sequences are empty (values of shape {X.shape}); there is nothing to fit.")
    if lengths is None:
        lengths = [X.shape[0]]
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise DataError("lengths must be a 1-D array of integers.")
    offsets = check_offsets(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), X.shape[0], "lengths")
    parts, bounds, chains = _seq_partitions(offsets, X.shape[1] * X.itemsize, partition_bytes, min_partitions,
                                            cut_long)
    cut = {i for ch in chains for i in ch}
    loaders = [
        ArraySeqLoader(X[sa:sb], np.array([0, sb - sa]) if i in cut else offsets[a : b + 1] - sa, i, allow_nan, sa,
                       max_magnitude)
        for i, ((a, b), (sa, sb)) in enumerate(zip(parts, bounds))
    ]
    return SequenceData(X.shape[0], X.shape[1], X.dtype, offsets, loaders, bounds, parts, "in-memory sequences", True,
                        None, X.shape[0], chains=chains)


def write_sequences(path, values: np.ndarray, offsets: np.ndarray, *, chunk_steps: int = 65536, attrs: dict | None = None,
                    overwrite: bool = False) -> str:
    """Write in-memory sequences to a Zarr group atomically (values + offsets); returns the path.

    An emflow dataset already at ``path`` is replaced only with ``overwrite=True``; anything
    else there never is.
    """
    import zarr

    from .destinations import atomic_dir

    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    offsets = check_offsets(offsets, values.shape[0])
    with atomic_dir(path, kind="dataset", overwrite=overwrite) as tmp:
        g = zarr.open_group(tmp, mode="w")
        # every chunk is stored (even one of zeros), so a missing one is detectable
        every = {"config": {"write_empty_chunks": True}, "attributes": {"all_chunks_written": True}}
        g.create_array("values", data=values, chunks=(min(chunk_steps, len(values)), values.shape[1]), **every)
        g.create_array("offsets", data=offsets, chunks=(max(1, min(1 << 20, len(offsets))),), **every)
        g.attrs.update({"kind": "sequences", "n_sequences": len(offsets) - 1,
                        "total_steps": int(values.shape[0]), "n_features": int(values.shape[1]),
                        "dtype": str(values.dtype), **(attrs or {})})
    return os.path.abspath(os.fspath(path))


def write_owned(array_url: str, res: np.ndarray, start: int) -> list[tuple[int, np.ndarray]]:
    """Write rows ``start .. start + len(res)`` of the Zarr array at ``array_url`` where they
    fill whole chunks; return the edge pieces ``[(row, rows), (row, rows)]``.

    Neighbouring partitions may share a chunk at their boundary; those pieces go back to
    the client, which writes them one after the other (no two tasks write one chunk).
    """
    import zarr

    arr = zarr.open_array(array_url, mode="r+").with_config({"write_empty_chunks": True})
    C, total = arr.chunks[0], arr.shape[0]
    a, b = start, start + len(res)
    lo = a if a % C == 0 else min(b, -(-a // C) * C)
    hi = b if (b % C == 0 or b == total) else max(lo, (b // C) * C)
    if hi > lo:
        arr[lo:hi] = res[lo - a : hi - a]
    return [(a, res[: lo - a]), (hi, res[hi - a :])]


def write_step_outputs(out, loaded, arrays: dict[str, tuple[tuple[int, ...], str]], fill: Callable,
                       attrs: dict[str, Any]):
    """Write per-step outputs of a loaded sequences dataset to a Zarr sequences group at
    ``out``, atomically, and return the group.

    ``arrays`` maps each array's name to its per-step shape and dtype (``values`` first);
    the group also gets the input's ``offsets``, with the input's chunking of steps.
    ``fill(url)`` runs the partitions (each writes the chunks it covers whole with
    :func:`write_owned` under ``url + "/" + name``) and returns ``(pieces, extra)``: per
    partition ``{name: edge pieces}``, written here one at a time, and attributes to add to
    ``attrs`` (recorded under ``"emflow"`` with the source, fingerprint and version).
    """
    import zarr

    from .. import __version__
    from .destinations import atomic_dir

    data = loaded.data
    n = data.n_rows
    chunk = int(min(max(data.chunk_rows, 1), 1 << 20)) if not data.in_memory else min(n, 65536)
    with atomic_dir(out) as tmp:
        g = zarr.open_group(tmp, mode="w")
        for name, (tail, dtype) in arrays.items():
            g.create_array(name, shape=(n, *tail), dtype=dtype, chunks=(chunk, *tail), config={"write_empty_chunks": True})
        g.create_array("offsets", data=data.offsets, chunks=(max(1, min(1 << 20, len(data.offsets))),), config={"write_empty_chunks": True})
        pieces, extra = fill(os.path.abspath(tmp))
        for part in pieces:  # edge pieces of shared chunks, written one at a time
            for name, edges in part.items():
                for a, piece in edges:
                    if len(piece):
                        g[name].with_config({"write_empty_chunks": True})[a : a + len(piece)] = piece
        tail, dtype = arrays["values"]
        g.attrs.update({
            "kind": "sequences", "n_sequences": int(data.n_sequences), "total_steps": int(n),
            "n_features": int(tail[0]) if tail else 1, "dtype": dtype,
            "emflow": {**attrs, **extra, "source": data.source, "fingerprint": loaded.fingerprint,
                       "version": __version__},
        })
    return zarr.open_group(os.fspath(out), mode="r")
