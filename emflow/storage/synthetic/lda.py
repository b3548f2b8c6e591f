"""Corpora drawn from the LDA generative model, with the true topics stored beside them."""

from __future__ import annotations

import os

import numpy as np

from ...errors import ConfigError

__all__ = ["make_lda_params", "sample_lda", "write_lda"]


def make_lda_params(n_components: int, n_terms: int, *, topic_word_concentration: float = 0.05,
                    seed: int = 0) -> np.ndarray:
    """True topics: ndarray of shape (n_components, n_terms), rows drawn from Dir(concentration)."""
    if n_components < 1 or n_terms < 2:
        raise ConfigError("n_components must be >= 1 and n_terms >= 2.")
    if not topic_word_concentration > 0:
        raise ConfigError(f"topic_word_concentration must be > 0, got {topic_word_concentration}.")
    rng = np.random.default_rng([seed, 0x70B1C])
    topics = rng.dirichlet(np.full(n_terms, topic_word_concentration), size=n_components)
    return np.maximum(topics, 1e-300) / np.maximum(topics, 1e-300).sum(axis=1, keepdims=True)


def sample_lda(topics: np.ndarray, n_docs: int, rng: np.random.Generator, *, doc_topic_prior: float = 0.1,
               mean_length: float = 50.0):
    """Draw ``n_docs`` documents: ``(X, theta)`` with X a CSR matrix (n_docs, n_terms) of counts
    and theta of shape (n_docs, n_components), the true topic proportions."""
    import scipy.sparse as sp

    K, V = topics.shape
    theta = rng.dirichlet(np.full(K, doc_topic_prior), size=n_docs)
    lengths = rng.poisson(mean_length, size=n_docs)
    rows = []
    for d in range(n_docs):
        counts = rng.multinomial(lengths[d], theta[d] @ topics)
        rows.append(counts)
    X = sp.csr_matrix(np.asarray(rows, dtype=np.int64).reshape(n_docs, V))
    return X, theta


def write_lda(path, n_docs: int, n_terms: int, n_components: int, *, doc_topic_prior: float = 0.1,
              topic_word_concentration: float = 0.05, mean_length: float = 50.0, seed: int = 0,
              chunk_docs: int = 1024, overwrite: bool = False) -> str:
    """Write an LDA corpus to a Zarr group, one chunk of documents at a time.

    The group is a corpus (see :mod:`emflow.storage.corpus`) with vocabulary ``t00000, t00001...``;
    ``attrs["truth"]`` holds the true ``topics`` (K, V), ``doc_topic_prior`` and the other
    settings, and the array ``theta`` (n_docs, K) the true proportions. Chunk ``i`` is drawn
    from ``default_rng([seed, i])``, so the corpus depends only on the arguments.

    Returns the absolute path.
    """
    import zarr

    from ..corpus import _CorpusWriter
    from ..store import atomic_dir

    if n_docs < 1 or chunk_docs < 1:
        raise ConfigError("n_docs and chunk_docs must be >= 1.")
    if not (doc_topic_prior > 0 and mean_length > 0):
        raise ConfigError("doc_topic_prior and mean_length must be > 0.")
    topics = make_lda_params(n_components, n_terms, topic_word_concentration=topic_word_concentration, seed=seed)
    width = max(5, len(str(n_terms - 1)))
    vocab = [f"t{i:0{width}d}" for i in range(n_terms)]
    with atomic_dir(path, kind="dataset", overwrite=overwrite) as tmp:
        w = _CorpusWriter(tmp, n_terms, "int64", chunk_docs)
        theta_arr = zarr.open_group(tmp, mode="r+").create_array(
            "theta", shape=(n_docs, n_components), dtype="float64", chunks=(chunk_docs, n_components), config={"write_empty_chunks": True})
        for i, a in enumerate(range(0, n_docs, chunk_docs)):
            b = min(n_docs, a + chunk_docs)
            X, theta = sample_lda(topics, b - a, np.random.default_rng([seed, i]),
                                  doc_topic_prior=doc_topic_prior, mean_length=mean_length)
            w.append(X.indptr, X.indices, X.data)
            theta_arr[a:b] = theta
        w.finish(vocab, {
            "source": f"emflow.storage.synthetic.write_lda(seed={seed})",
            "truth": {
                "family": "latent_dirichlet_allocation", "topics": topics.tolist(),
                "doc_topic_prior": doc_topic_prior, "topic_word_concentration": topic_word_concentration,
                "mean_length": mean_length, "seed": seed,
            },
        })
    return os.path.abspath(os.fspath(path))
