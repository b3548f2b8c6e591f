"""Sparse document-term corpora, for topic models.

Layout in Zarr (a group), compressed sparse rows::

    indptr              (n_docs + 1,)  int64, indptr[0] == 0, non-decreasing, indptr[-1] == nnz
    indices             (nnz,)         int32/int64 term ids in [0, n_terms)
    counts              (nnz,)         int or float, finite and >= 0
    vocabulary_utf8     (n_bytes,)     uint8, the terms encoded in UTF-8 back to back (optional)
    vocabulary_offsets  (n_terms + 1,) int64, term t is utf8[offsets[t]:offsets[t + 1]]

    attrs: kind="corpus", n_docs, n_terms, nnz, chunk_docs, counts_dtype, source, total_count

Document ``d`` is ``indices/counts[indptr[d]:indptr[d + 1]]``; empty documents are allowed.
A partition is a run of whole *document chunks* (``chunk_docs`` documents each, the last one
shorter), so outputs written per document (``transform(..., out=)``) land on whole chunks.

A partition loader returns ``(entries, indptr)``: ``entries`` a structured array of the
partition's non-zeros (fields ``term`` int64 and ``count`` float64) and ``indptr`` the
partition-local offsets (``indptr[0] == 0``). (A plain structured array, not a scipy matrix,
so that the engine can fingerprint it like any other partition.)

Ingestion: :func:`write_corpus` from a scipy sparse matrix (or dense counts), and
:func:`emflow.storage.text.ingest_text` from plain text (one document per line of a file, or one per file of a
directory), streaming in two passes (vocabulary, then counts) with a fixed memory footprint
besides the vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np

from .chunks import _url, check_pointer, read_chunked
from .data import DEFAULT_PARTITION_BYTES, CheckedLoader, Finding, is_zarr_path, raise_findings
from ..errors import ConfigError, DataError, DataNotFoundError

__all__ = [
    "CorpusData", "open_corpus", "write_corpus", "read_corpus", "read_vocabulary", "ENTRY_DTYPE", "DEFAULT_CHUNK_DOCS",
]

ENTRY_DTYPE = np.dtype([("term", "<i8"), ("count", "<f8")])
DEFAULT_CHUNK_DOCS = 4096
_ENTRY_BYTES = ENTRY_DTYPE.itemsize


# -- validation ----------------------------------------------------------------------
def check_indptr(indptr, nnz: int, where: str = "indptr") -> np.ndarray:
    """Validate CSR document offsets; returns them as int64."""
    p = check_pointer(indptr, "n_docs", where)
    steps = np.diff(p)
    if np.any(steps < 0):
        d = int(np.flatnonzero(steps < 0)[0])
        raise DataError(f"{where} must be non-decreasing; it falls at document {d} ({int(p[d])} -> {int(p[d + 1])}).")
    if p[-1] != nnz:
        raise DataError(f"{where}[-1] is {int(p[-1])} but there are {nnz} non-zero entries; indptr does not match indices.")
    return p


def _check_types(indices: np.ndarray, counts: np.ndarray, where: str) -> None:
    if indices.dtype.kind not in "iu":
        raise DataError(f"term ids of {where} must be integers, got dtype {indices.dtype}.")
    if counts.dtype.kind not in "fiu":
        raise DataError(f"counts of {where} have dtype {counts.dtype}; they must be numbers.")


def _entry_findings(indices: np.ndarray, counts: np.ndarray, n_terms: int, nnz0: int = 0) -> list[Finding]:
    """Bad entries: term ids outside [0, n_terms), NaN or infinite counts, negative counts."""
    if indices.size:
        bad = (indices < 0) | (indices >= n_terms)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return [Finding("term", int(bad.sum()), f"{int(indices[i])} at entry {nnz0 + i} (n_terms is {n_terms})")]
    if counts.dtype.kind == "f":
        badf = ~np.isfinite(counts)
        if badf.any():
            return [Finding("count_nonfinite", int(badf.sum()), f"at entry {nnz0 + int(np.flatnonzero(badf)[0])}")]
    neg = counts < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        return [Finding("count_negative", int(neg.sum()), f"{counts[i]:g} at entry {nnz0 + i}")]
    return []


def _check_entries(indices: np.ndarray, counts: np.ndarray, n_terms: int, where: str, nnz0: int = 0) -> None:
    _check_types(indices, counts, where)
    raise_findings(_entry_findings(indices, counts, n_terms, nnz0), where)


def _entries(indices: np.ndarray, counts: np.ndarray) -> np.ndarray:
    e = np.empty(len(indices), dtype=ENTRY_DTYPE)
    e["term"] = indices
    e["count"] = counts
    return e


# -- loaders -------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusChecks:
    """What a partition of a corpus must satisfy: term ids in range, counts finite and >= 0."""

    nnz0: int
    n_terms: int

    def findings(self, parts) -> list[Finding]:
        entries, _ = parts
        return _entry_findings(entries["term"], entries["count"], self.n_terms, self.nnz0)


@dataclass(frozen=True)
class ZarrCorpusLoader(CheckedLoader):
    """Reads documents [doc_start, doc_stop) of a Zarr corpus where it is called."""

    url: str
    doc_start: int
    doc_stop: int
    nnz_start: int
    nnz_stop: int
    n_terms: int
    index: int

    @property
    def where(self) -> str:
        return f"partition {self.index} (documents {self.doc_start}-{self.doc_stop}) of {self.url}"

    @property
    def checks(self) -> CorpusChecks:
        return CorpusChecks(self.nnz_start, self.n_terms)

    def read(self):
        import zarr

        g = zarr.open_group(self.url, mode="r")
        a, b = self.nnz_start, self.nnz_stop
        indices = read_chunked(g["indices"], a, b, "corpus indices", url=self.url + "/indices", unit="entries")
        counts = read_chunked(g["counts"], a, b, "corpus counts", url=self.url + "/counts", unit="entries")
        ptr = read_chunked(g["indptr"], self.doc_start, self.doc_stop + 1, "corpus indptr", url=self.url + "/indptr",
                           unit="documents")
        ptr = np.asarray(ptr, dtype=np.int64) - a
        check_indptr(ptr, b - a, f"indptr of {self.where}")
        _check_types(indices, counts, self.where)
        return _entries(indices, counts), ptr


@dataclass(frozen=True)
class ArrayCorpusLoader:
    """A partition of an in-memory corpus (validated when opened)."""

    entries: np.ndarray = field(repr=False)
    indptr: np.ndarray = field(repr=False)
    index: int

    def read(self):
        return self.entries, self.indptr

    def __call__(self):
        return self.entries, self.indptr


@dataclass
class CorpusData:
    """A document-term corpus split into partitions of whole document chunks.

    Engine-compatible like :class:`emflow.storage.data.RowData`: ``n_rows`` is the number of
    documents and ``n_features`` the number of terms.

    Attributes
    ----------
    n_rows : int
        Documents.
    n_features : int
        Terms (vocabulary size).
    dtype : numpy dtype of the stored counts
    indptr : ndarray of shape (n_docs + 1,)
    loaders : list of callables returning ``(entries, indptr)``
    bounds : list of (doc_start, doc_stop)
    source : str
    in_memory : bool
    url : str or None
    chunk_rows : int
        Documents per chunk (outputs are written with the same chunking).
    vocabulary : list of str or None
    """

    n_rows: int
    n_features: int
    dtype: np.dtype
    indptr: np.ndarray = field(repr=False)
    loaders: list[Callable] = field(repr=False)
    bounds: list[tuple[int, int]]
    source: str
    in_memory: bool
    url: str | None
    chunk_rows: int
    vocabulary: list[str] | None = field(default=None, repr=False)
    weighted: bool = False
    what: ClassVar[str] = "The corpus"

    @property
    def n_docs(self) -> int:
        return self.n_rows

    @property
    def n_terms(self) -> int:
        return self.n_features

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def nbytes(self) -> int:
        return self.nnz * _ENTRY_BYTES + 8 * (self.n_rows + 1)

    @property
    def n_partitions(self) -> int:
        return len(self.loaders)

    @property
    def element_starts(self) -> list[int]:
        """Global entry index where each partition's entries start (for fingerprinting)."""
        return [int(self.indptr[a]) for a, _ in self.bounds]


def _doc_partitions(indptr: np.ndarray, chunk_docs: int, target_bytes: int, min_partitions: int):
    """Runs of whole document chunks of about ``target_bytes`` of entries each."""
    n_docs = len(indptr) - 1
    starts = list(range(0, n_docs, chunk_docs)) + [n_docs]
    nnz = int(indptr[-1])
    target = max(1, target_bytes // _ENTRY_BYTES)
    target = min(target, max(1, -(-nnz // max(1, min_partitions))))
    cuts = [0]
    acc = 0
    for i in range(len(starts) - 1):
        a, b = starts[i], starts[i + 1]
        acc += int(indptr[b] - indptr[a])
        if acc >= target and b < n_docs:
            cuts.append(b)
            acc = 0
    cuts.append(n_docs)
    return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]


def _auto_chunk_docs(n_docs: int, min_partitions: int) -> int:
    return max(1, min(DEFAULT_CHUNK_DOCS, -(-n_docs // max(1, 4 * min_partitions))))


def _as_csr(X, where: str = "The corpus"):
    import scipy.sparse as sp

    if sp.issparse(X):
        X = sp.csr_matrix(X)
    else:
        A = np.asarray(X)
        if A.dtype == object or A.dtype.kind not in "fiub":
            raise DataError(f"{where} has dtype {A.dtype}; pass a sparse or dense matrix of counts.")
        if A.ndim != 2:
            raise DataError(f"{where} has shape {A.shape}; expected 2-D (n_docs, n_terms).")
        X = sp.csr_matrix(A)
    if X.dtype.kind == "b":
        X = X.astype(np.int64)
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{where} is empty (shape {X.shape}); there is nothing to fit.")
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    _check_entries(np.asarray(X.indices), np.asarray(X.data), X.shape[1], where)
    return X


def open_corpus(
    data: Any,
    *,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    min_partitions: int = 1,
    chunk_docs: int | None = None,
    vocabulary: Iterable[str] | None = None,
) -> CorpusData:
    """Open a document-term corpus for the engine.

    Parameters
    ----------
    data : str, PathLike, scipy sparse matrix or array-like of shape (n_docs, n_terms)
        A Zarr corpus group (see the module doc) or counts in memory.
    partition_bytes : int
        Target size of a partition's entries (12 bytes per non-zero).
    min_partitions : int
        Split finer when needed to give every worker thread work (never below one chunk).
    chunk_docs : int, optional
        In-memory data only: documents per chunk (the unit of partitioning and of outputs).
    vocabulary : iterable of str, optional
        In-memory data only: the terms, one per column.
    """
    if isinstance(data, CorpusData):
        return data
    if is_zarr_path(data):
        import zarr

        url = _url(data)
        if "://" not in url and not os.path.exists(url):
            raise DataNotFoundError(
                f"No corpus at {url!r}. Check the path, or write one with emflow.storage.corpus.write_corpus "
                "or emflow.storage.text.ingest_text."
            )
        try:
            g = zarr.open_group(url, mode="r")
        except Exception as exc:
            raise DataError(f"{url!r} is not a Zarr group, so not a corpus ({exc}).") from exc
        missing = [k for k in ("indptr", "indices", "counts") if k not in g]
        if missing:
            raise DataError(
                f"The Zarr group at {url!r} is not a corpus: it lacks {missing} (found "
                f"{sorted(g.array_keys())}). Write corpora with emflow.storage.corpus.write_corpus or ingest_text."
            )
        n_terms = g.attrs.get("n_terms")
        if not isinstance(n_terms, int) or n_terms < 1:
            raise DataError(f"The corpus at {url!r} has no valid attrs['n_terms'] ({n_terms!r}).")
        nnz = int(g["indices"].shape[0])
        if g["counts"].shape[0] != nnz:
            raise DataError(f"The corpus at {url!r} has {nnz} term ids but {g['counts'].shape[0]} counts.")
        indptr = check_indptr(read_chunked(g["indptr"], 0, g["indptr"].shape[0], "corpus indptr",
                                           url=url + "/indptr", unit="documents"), nnz, f"'indptr' at {url!r}")
        n_docs = len(indptr) - 1
        cdocs = int(g.attrs.get("chunk_docs") or g["indptr"].chunks[0])
        parts = _doc_partitions(indptr, cdocs, partition_bytes, min_partitions)
        loaders = [
            ZarrCorpusLoader(url, a, b, int(indptr[a]), int(indptr[b]), n_terms, i) for i, (a, b) in enumerate(parts)
        ]
        vocab = read_vocabulary(url)
        return CorpusData(n_docs, n_terms, np.dtype(g["counts"].dtype), indptr, loaders, parts, url, False, url,
                          cdocs, vocab)
    X = _as_csr(data)
    n_docs, n_terms = X.shape
    vocab = _check_vocabulary(vocabulary, n_terms)
    indptr = np.asarray(X.indptr, dtype=np.int64)
    cdocs = int(chunk_docs or _auto_chunk_docs(n_docs, min_partitions))
    if cdocs < 1:
        raise ConfigError(f"chunk_docs must be >= 1, got {chunk_docs}.")
    parts = _doc_partitions(indptr, cdocs, partition_bytes, min_partitions)
    entries = _entries(X.indices, X.data)
    loaders = [
        ArrayCorpusLoader(entries[indptr[a] : indptr[b]], indptr[a : b + 1] - indptr[a], i)
        for i, (a, b) in enumerate(parts)
    ]
    return CorpusData(n_docs, n_terms, np.dtype(X.dtype), indptr, loaders, parts, "in-memory corpus", True, None,
                      cdocs, vocab)


def _check_vocabulary(vocabulary, n_terms: int) -> list[str] | None:
    if vocabulary is None:
        return None
    vocab = [str(t) for t in vocabulary]
    if len(vocab) != n_terms:
        raise DataError(f"The vocabulary has {len(vocab)} terms but the counts have {n_terms} columns.")
    return vocab


def read_vocabulary(path) -> list[str] | None:
    """The terms of a Zarr corpus (None when it stores none)."""
    import zarr

    g = zarr.open_group(_url(path), mode="r")
    if "vocabulary_utf8" not in g:
        return None
    u, o = g["vocabulary_utf8"], g["vocabulary_offsets"]
    raw = bytes(np.asarray(read_chunked(u, 0, u.shape[0], "vocabulary", unit="bytes"), dtype=np.uint8))
    off = np.asarray(read_chunked(o, 0, o.shape[0], "vocabulary offsets", unit="entries"), dtype=np.int64)
    return [raw[off[i] : off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]


def read_corpus(path):
    """The whole corpus in memory: ``(scipy.sparse.csr_matrix, vocabulary or None)``."""
    import scipy.sparse as sp
    import zarr

    c = open_corpus(path)
    g = zarr.open_group(c.url, mode="r")
    counts, indices = (read_chunked(g[k], 0, c.nnz, f"corpus {k}", unit="entries") for k in ("counts", "indices"))
    X = sp.csr_matrix((counts, indices, c.indptr), shape=(c.n_docs, c.n_terms))
    return X, c.vocabulary


# -- writing -------------------------------------------------------------------------
class _CorpusWriter:
    """Appends batches of documents to a new Zarr corpus group (inside an atomic_dir)."""

    def __init__(self, root: str, n_terms: int, counts_dtype, chunk_docs: int, chunk_nnz: int = 1 << 20):
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        comp = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)
        # every chunk is stored (even one of zeros), so a missing one is detectable
        kw = {"compressors": comp, "config": {"write_empty_chunks": True}, "attributes": {"all_chunks_written": True}}
        self.g = zarr.open_group(root, mode="w")
        idt = "int32" if n_terms < 2**31 else "int64"
        self.indptr = self.g.create_array("indptr", shape=(1,), dtype="int64", chunks=(chunk_docs,), **kw)
        self.indptr[0:1] = 0
        self.indices = self.g.create_array("indices", shape=(0,), dtype=idt, chunks=(chunk_nnz,), **kw)
        self.counts = self.g.create_array("counts", shape=(0,), dtype=np.dtype(counts_dtype), chunks=(chunk_nnz,),
                                          **kw)
        self.n_terms, self.chunk_docs = n_terms, chunk_docs
        self.n_docs = 0
        self.nnz = 0
        self.total = 0.0

    def append(self, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray) -> None:
        n, m = len(indptr) - 1, len(indices)
        if n == 0:
            return
        self.indptr.resize((self.n_docs + n + 1,))
        self.indptr[self.n_docs + 1 : self.n_docs + n + 1] = self.nnz + np.asarray(indptr[1:], dtype=np.int64)
        if m:
            self.indices.resize((self.nnz + m,))
            self.indices[self.nnz : self.nnz + m] = indices
            self.counts.resize((self.nnz + m,))
            self.counts[self.nnz : self.nnz + m] = counts
        self.n_docs += n
        self.nnz += m
        self.total += float(np.sum(counts, dtype=np.float64))

    def finish(self, vocabulary: list[str] | None, attrs: dict) -> None:
        if self.n_docs == 0:
            raise DataError("The corpus has no documents.")
        if vocabulary is not None:
            enc = [t.encode("utf-8") for t in vocabulary]
            off = np.concatenate([[0], np.cumsum([len(b) for b in enc])]).astype(np.int64)
            raw = np.frombuffer(b"".join(enc), dtype=np.uint8)
            every = {"config": {"write_empty_chunks": True}, "attributes": {"all_chunks_written": True}}
            self.g.create_array("vocabulary_utf8", data=raw if raw.size else np.zeros(0, np.uint8),
                                chunks=(max(1, min(1 << 22, raw.size)),), **every)
            self.g.create_array("vocabulary_offsets", data=off, chunks=(max(1, min(1 << 20, off.size)),), **every)
        self.g.attrs.update({
            "kind": "corpus", "n_docs": self.n_docs, "n_terms": self.n_terms, "nnz": self.nnz,
            "chunk_docs": self.chunk_docs, "counts_dtype": str(self.counts.dtype), "total_count": self.total,
            **attrs,
        })


def write_corpus(path, X, vocabulary: Iterable[str] | None = None, *, chunk_docs: int = DEFAULT_CHUNK_DOCS,
                 attrs: dict | None = None, overwrite: bool = False) -> str:
    """Write counts (scipy sparse or dense, shape (n_docs, n_terms)) as a Zarr corpus, atomically.

    Duplicate entries are summed and term ids sorted within each document. Returns the
    absolute path.
    """
    from .destinations import atomic_dir

    X = _as_csr(X)
    X.sort_indices()
    vocab = _check_vocabulary(vocabulary, X.shape[1])
    if chunk_docs < 1:
        raise ConfigError(f"chunk_docs must be >= 1, got {chunk_docs}.")
    with atomic_dir(path, kind="dataset", overwrite=overwrite) as tmp:
        w = _CorpusWriter(tmp, X.shape[1], X.dtype, chunk_docs)
        for a in range(0, X.shape[0], chunk_docs):
            b = min(X.shape[0], a + chunk_docs)
            lo, hi = X.indptr[a], X.indptr[b]
            w.append(X.indptr[a : b + 1] - lo, X.indices[lo:hi], X.data[lo:hi])
        w.finish(vocab, {"source": "emflow.storage.corpus.write_corpus", **(attrs or {})})
    return os.path.abspath(os.fspath(path))


