"""Plain text into a corpus: tokenise, build the vocabulary, count, write (see :mod:`emflow.storage.corpus`).

:func:`ingest_text` reads one document per line of a file, or one per file of a directory,
in two streaming passes (vocabulary, then counts) with a fixed memory footprint besides the
vocabulary; tokens are found as scikit-learn's ``CountVectorizer`` finds them by default.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Callable, Iterator

import numpy as np

from .corpus import DEFAULT_CHUNK_DOCS, _CorpusWriter
from ..errors import ConfigError, DataError, DataNotFoundError

__all__ = ["ingest_text", "tokenize", "DEFAULT_TOKEN_PATTERN"]

DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn CountVectorizer's default


def tokenize(text: str, *, lowercase: bool = True, token_pattern: str = DEFAULT_TOKEN_PATTERN) -> list[str]:
    """Tokens of one document, as scikit-learn's ``CountVectorizer`` finds them by default."""
    if lowercase:
        text = text.lower()
    return re.findall(token_pattern, text)


def _documents(source, per: str, encoding: str) -> Callable[[], Iterator[str]]:
    """A re-iterable stream of documents (each pass re-reads the files)."""
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if not os.path.exists(p):
            raise DataNotFoundError(f"No text at {p!r}. Pass a text file (one document per line) or a directory.")
        if os.path.isdir(p):
            files = sorted(os.path.join(p, f) for f in os.listdir(p) if os.path.isfile(os.path.join(p, f)))
            if per == "auto":
                per = "file"
        else:
            files = [p]
            if per == "auto":
                per = "line"
    else:
        files = [os.fspath(f) for f in source]
        for f in files:
            if not os.path.isfile(f):
                raise DataNotFoundError(f"No text file at {f!r}.")
        if per == "auto":
            per = "file"
    if per not in ("line", "file"):
        raise ConfigError(f"per must be 'line', 'file' or 'auto', got {per!r}.")
    if not files:
        raise DataError(f"No text files in {source!r}.")

    def stream():
        for f in files:
            with open(f, encoding=encoding, errors="replace") as fh:
                if per == "file":
                    yield fh.read()
                else:
                    for line in fh:
                        yield line.rstrip("\r\n")

    return stream


def _doc_count_limit(value, n_docs: int, name: str) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an int (documents) or a float in [0, 1] (fraction), got {value!r}.")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}.")
        return float(value)
    if isinstance(value, (float, np.floating)) and 0.0 <= value <= 1.0:
        return float(value) * n_docs
    raise ConfigError(f"{name} must be an int (documents) or a float in [0, 1] (fraction), got {value!r}.")


def ingest_text(
    source,
    path,
    *,
    per: str = "auto",
    min_df: int | float = 1,
    max_df: int | float = 1.0,
    max_features: int | None = None,
    lowercase: bool = True,
    token_pattern: str = DEFAULT_TOKEN_PATTERN,
    encoding: str = "utf-8",
    chunk_docs: int = DEFAULT_CHUNK_DOCS,
    overwrite: bool = False,
) -> str:
    """Tokenise plain text into a Zarr corpus, streaming, in two passes.

    Pass one counts document and term frequencies; the vocabulary keeps terms in at least
    ``min_df`` and at most ``max_df`` documents (ints: documents, floats: fractions), then
    the ``max_features`` most frequent, and is sorted. Pass two writes the counts, one
    chunk of ``chunk_docs`` documents at a time. With the defaults the result equals
    ``sklearn.feature_extraction.text.CountVectorizer(min_df=..., max_df=...,
    max_features=...).fit_transform(documents)`` and its ``get_feature_names_out()``.

    Parameters
    ----------
    source : str, PathLike or list of paths
        A text file (one document per line), a directory (one document per file, files in
        name order) or a list of files (one document each).
    path : str or PathLike
        Where to write the corpus (written atomically).
    per : {"auto", "line", "file"}
        What a document is; "auto" is per line for a file, per file for a directory or list.
    overwrite : bool, default False
        Replace an emflow dataset already at ``path``; anything else there is never replaced.

    Returns
    -------
    str
        The absolute path of the corpus.
    """
    from .destinations import atomic_dir

    if max_features is not None and (not isinstance(max_features, (int, np.integer)) or max_features < 1):
        raise ConfigError(f"max_features must be a positive integer or None, got {max_features!r}.")
    try:
        re.compile(token_pattern)
    except re.error as exc:
        raise ConfigError(f"token_pattern {token_pattern!r} is not a valid regular expression ({exc}).") from exc
    docs = _documents(source, per, encoding)

    df: Counter = Counter()
    tf: Counter = Counter()
    n_docs = 0
    for text in docs():
        toks = tokenize(text, lowercase=lowercase, token_pattern=token_pattern)
        tf.update(toks)
        df.update(set(toks))
        n_docs += 1
    if n_docs == 0:
        raise DataError(f"{source!r} holds no documents.")
    lo = _doc_count_limit(min_df, n_docs, "min_df")
    hi = _doc_count_limit(max_df, n_docs, "max_df")
    if hi < lo:
        raise ConfigError(f"max_df corresponds to {hi:g} documents, fewer than min_df ({lo:g}). Lower min_df or raise max_df.")
    terms = sorted(t for t, c in df.items() if lo <= c <= hi)
    if max_features is not None and len(terms) > max_features:
        freq = np.array([tf[t] for t in terms])
        keep = np.sort(np.argsort(-freq, kind="stable")[:max_features])
        terms = [terms[i] for i in keep]
    if not terms:
        raise DataError(
            f"After pruning (min_df={min_df}, max_df={max_df}) no terms remain in {n_docs} documents. "
            "Lower min_df or raise max_df."
        )
    vocab = {t: i for i, t in enumerate(terms)}
    del df, tf

    with atomic_dir(path, kind="dataset", overwrite=overwrite) as tmp:
        w = _CorpusWriter(tmp, len(terms), "int64", chunk_docs)
        ptr, ids, cnts = [0], [], []

        def flush():
            if len(ptr) > 1:
                w.append(np.asarray(ptr, dtype=np.int64),
                         np.asarray(ids, dtype=np.int64), np.asarray(cnts, dtype=np.int64))
            ptr[:] = [0]
            ids.clear()
            cnts.clear()

        for text in docs():
            c = Counter(vocab[t] for t in tokenize(text, lowercase=lowercase, token_pattern=token_pattern) if t in vocab)
            for t in sorted(c):
                ids.append(t)
                cnts.append(c[t])
            ptr.append(len(ids))
            if len(ptr) - 1 == chunk_docs:
                flush()
        flush()
        w.finish(terms, {
            "source": f"emflow.storage.text.ingest_text({os.fspath(source) if isinstance(source, (str, os.PathLike)) else 'files'})",
            "tokenizer": {"lowercase": lowercase, "token_pattern": token_pattern},
            "pruning": {"min_df": min_df, "max_df": max_df, "max_features": max_features},
        })
    return os.path.abspath(os.fspath(path))
