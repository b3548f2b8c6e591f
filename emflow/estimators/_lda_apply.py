"""What a fitted :class:`~emflow.estimators.lda.LatentDirichletAllocation` does with a corpus:
document-topic distributions (in memory or written to Zarr chunk by chunk), the bound, the
perplexity and the top words. The E-steps here start every document at ones, as
scikit-learn's ``transform`` does.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import ConfigError, DataError, FeatureMismatchError
from ..execution.cluster import engine_for
from ..execution.engine import Engine, Loaded
from ..models import lda as M
from ..storage import destinations as _dest
from ..storage.corpus import CorpusData, open_corpus
from ..storage.data import DEFAULT_PARTITION_BYTES, is_zarr_path
from .em import partition_starts
from .outputs import write_rows, write_rows_at

__all__ = ["LDAApplyMixin"]

def _prior(alpha) -> float | np.ndarray:
    return np.asarray(alpha, dtype=np.float64) if np.ndim(alpha) else float(alpha)


def _bound_part(entries, indptr, params: M.LDAParams, fam: M.LDAFamily, doc_start: int) -> M.LDAStats:
    """Statistics of the fitted topics on one partition (ones initialisation, as transform)."""
    return M.e_step(entries, indptr, params, fam.prior(params), fam.max_doc_update_iter, fam.mean_change_tol,
                    None, doc_start, compute_dtype=fam.compute_dtype)


def _transform_part(entries, indptr, params: M.LDAParams, fam: M.LDAFamily, normalize: bool,
                    out_url: str | None, doc_start: int):
    gamma = M.transform(entries, indptr, params, fam.prior(params), fam.max_doc_update_iter,
                        fam.mean_change_tol, normalize, fam.compute_dtype)
    if out_url is None:
        return gamma
    write_rows_at(out_url, doc_start, gamma)
    return None


class LDAApplyMixin:
    """Applying fitted topics (``components_``, ``doc_topic_prior_``, ``topic_word_prior_``)."""

    def _family(self, alpha=None, random_doc_init: bool = False) -> M.LDAFamily:
        """The EM family; ``alpha`` defaults to the fitted prior (an estimated one too)."""
        alpha = _prior(self.doc_topic_prior_) if alpha is None else alpha
        return M.LDAFamily(alpha, _prior(self.topic_word_prior_), int(self.max_doc_update_iter),
                           float(self.mean_change_tol), random_doc_init, bool(self.learn_doc_topic_prior),
                           compute_dtype=getattr(self, "compute_dtype", "float64"))

    @property
    def exp_dirichlet_component_(self) -> np.ndarray:
        self._check_fitted()
        return M.make_params(self.components_).exp_elog_beta.astype(self.components_.dtype, copy=False)

    @property
    def _n_features_out(self) -> int:
        """Number of transformed output features (``get_feature_names_out``)."""
        return self.components_.shape[0]

    # -- data ------------------------------------------------------------------------
    def _open(self, engine: Engine, data, persist=None, whom: str = "fit") -> Loaded:
        persist = self.persist if persist is None else persist
        if whom != "fit":  # a DataFrame's column names (fit's own are kept by EMEstimator._fit)
            self._check_feature_names(data, whom == "partial_fit" and not self._is_fitted())
        if not isinstance(data, CorpusData) and not is_zarr_path(data):
            _check_non_negative(data, f"LatentDirichletAllocation.{whom}")
        corpus = data if isinstance(data, CorpusData) else open_corpus(
            data, partition_bytes=self.partition_bytes or DEFAULT_PARTITION_BYTES,
            min_partitions=2 * engine.total_threads,
        )
        return engine.load(corpus, persist=persist)

    def _check_features(self, n_terms: int) -> None:
        if n_terms != self.n_features_in_:
            raise FeatureMismatchError(
                f"The model was fitted on {self.n_features_in_} terms but the corpus has {n_terms}. "
                "Apply it to a corpus built with the same vocabulary (same terms, same order)."
            )

    # -- applying a fitted model -----------------------------------------------------
    def transform(self, data, *, normalize: bool = True, out=None, overwrite: bool = False):
        """Document-topic distribution of each document.

        Parameters
        ----------
        data : corpus (see :meth:`fit`)
        normalize : bool, default True
            Rows sum to one (otherwise the variational ``gamma``).
        out : str or PathLike, optional
            Write the result to a Zarr array at ``out`` (chunked like the corpus's documents,
            one partition's documents at a time on the workers) and return it opened.
        overwrite : bool, default False
            Replace an emflow output already at ``out``. Anything else there, the corpus and
            the model's own path are never replaced.

        Returns
        -------
        ndarray of shape (n_docs, n_components), or the Zarr array written to ``out``.
        """
        self._check_fitted()
        if out is not None:  # refuse before any work: nothing is replaced unasked
            _dest.check_destination(out, "output", overwrite=overwrite, inputs=_dest.output_inputs(self, data))
        params = M.make_params(self.components_)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, data, False, "transform")
            try:
                corpus: CorpusData = loaded.data
                self._check_features(corpus.n_terms)
                starts = partition_starts(loaded)
                if out is None:
                    parts = engine.map(_transform_part, loaded, params, self._family(), normalize, None,
                                       per_partition=starts)
                    return np.concatenate(parts)
                fam = self._family()

                def fill(url):
                    engine.map(_transform_part, loaded, params, fam, normalize, url, per_partition=starts)

                return write_rows(out, loaded, self, kind="doc_topic", shape=(corpus.n_docs, int(self.n_components)),
                                  dtype="float64", chunk=corpus.chunk_rows, fill=fill, overwrite=overwrite,
                                  data=data, normalized=bool(normalize))
            finally:
                loaded.release()

    def _bound_loaded(self, engine: Engine, loaded: Loaded, params: M.LDAParams) -> tuple[float, float, M.LDAStats]:
        """(bound, total words, statistics) of the loaded corpus under ``params`` (ones initialisation)."""
        fam = self._family()
        stats = engine.map_reduce(_bound_part, loaded, params, fam, per_partition=partition_starts(loaded))
        return M.bound(stats, params, fam.eta(params)), float(stats.n_words), stats

    def _bound_stats(self, data, whom: str, sub_sampling: bool = False) -> tuple[float, float]:
        """(bound, total words) of ``data`` under the fitted topics, scaled to ``total_samples``
        documents with ``sub_sampling`` (as scikit-learn's ``_approx_bound``)."""
        self._check_fitted()
        params = M.make_params(self.components_)
        with engine_for(self.scheduler, split_every=self.split_every) as engine:
            loaded = self._open(engine, data, False, whom)
            try:
                self._check_features(loaded.data.n_terms)
                bound, words, stats = self._bound_loaded(engine, loaded, params)
            finally:
                loaded.release()
        if sub_sampling:
            ratio = float(self.total_samples) / float(stats.n_docs)
            topic = M.topic_bound(params, _prior(self.topic_word_prior_))
            return (bound - topic) * ratio + topic, words * ratio
        return bound, words

    def score(self, data, y=None) -> float:
        """Approximate log-likelihood (the variational bound) of ``data``, as scikit-learn's ``score``."""
        return self._bound_stats(data, "score")[0]

    def perplexity(self, data, sub_sampling: bool = False) -> float:
        """``exp(-bound / total words)`` of ``data``, as scikit-learn's ``perplexity``.

        Parameters
        ----------
        data : corpus (see :meth:`fit`)
        sub_sampling : bool, default False
            Treat ``data`` as a sample of ``total_samples`` documents: the documents' part
            of the bound and the word count are scaled by ``total_samples / n_docs``.

        Returns
        -------
        float
        """
        if not isinstance(sub_sampling, (bool, np.bool_)):
            raise ConfigError(f"sub_sampling must be True or False, got {sub_sampling!r}.")
        b, n = self._bound_stats(data, "perplexity", bool(sub_sampling))
        if not n > 0:
            raise DataError("The corpus holds no words, so its perplexity is undefined.")
        return float(np.exp(-b / n))

    def top_words(self, n: int = 10, vocabulary=None) -> list[list[str]]:
        """The ``n`` heaviest terms of each topic, heaviest first.

        Parameters
        ----------
        n : int
        vocabulary : sequence of str of length n_features, optional
            Defaults to the fitted corpus's vocabulary.

        Returns
        -------
        list of n_components lists of str
        """
        self._check_fitted()
        vocab = vocabulary if vocabulary is not None else getattr(self, "vocabulary_", None)
        if vocab is None:
            raise ConfigError("No vocabulary: the corpus stored none, so pass vocabulary=[term, ...].")
        vocab = list(vocab)
        if len(vocab) != self.n_features_in_:
            raise FeatureMismatchError(f"The vocabulary has {len(vocab)} terms; the model has {self.n_features_in_}.")
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"n must be a positive integer, got {n!r}.")
        order = np.argsort(-self.components_, axis=1, kind="stable")[:, :n]
        return [[vocab[j] for j in row] for row in order]


def _check_non_negative(X, whom: str) -> None:
    """scikit-learn's check (and message) on counts given in memory, before anything is read."""
    if sp.issparse(X):
        values = np.asarray(X.data) if X.format in ("csr", "csc", "coo", "bsr") else sp.csr_matrix(X).data
    else:
        values = np.asarray(X)
        if values.dtype.kind not in "fiub":
            return  # open_corpus names the bad dtype
    neg = values < 0
    if np.any(neg):
        raise DataError(f"Negative values in data passed to {whom} ({int(np.count_nonzero(neg))} negative "
                        "count(s)); a corpus holds counts >= 0.")
