"""``LatentDirichletAllocation``: scikit-learn's batch variational LDA, distributed over documents.

Each iteration is one pass over the corpus: on every partition the documents' variational
parameters are fitted and the partition returns the (K, V) statistics and the terms of
the bound; the statistics are tree-reduced (pairwise ``+``, never a list of them) and the
M-step sets ``components_ = topic_word_prior + expected topic-word counts``.

The bound of the topics *entering* an iteration comes from that iteration's own E-step,
so monitoring costs no extra pass: ``history_[i]`` is the bound per word (``-log`` of
the perplexity) of the topics entering iteration ``i + 1``.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Iterable

import numpy as np
from sklearn.base import ClassNamePrefixFeaturesOutMixin
from sklearn.utils import check_random_state as _sk_random_state

from ..checks import (MAX_SEED, Choice, check_choice, check_execution, check_int, check_random_state, check_real,
                      check_rules)
from ..errors import ConfigError, EmflowConvergenceWarning, ModelFormatError
from ..execution.engine import Engine, Loaded
from ..models import lda as M
from ..models.lda_prior import TOPIC_WORD_PRIOR_MODES
from ._lda_apply import LDAApplyMixin
from .base import EMEstimator, Output
from .em import EMResult, IterationEvent
from .online import check_decay
from ._lda_online import LDAOnlineMixin

__all__ = ["LatentDirichletAllocation"]

FAMILY = "latent_dirichlet_allocation"
DOC_INITS = ("random", "ones")
LEARNING_METHODS = ("batch", "online")


class LatentDirichletAllocation(LDAOnlineMixin, LDAApplyMixin, ClassNamePrefixFeaturesOutMixin, EMEstimator):
    """Latent Dirichlet allocation fitted by batch variational EM over a partitioned corpus.

    Parameters and fitted attributes follow
    :class:`sklearn.decomposition.LatentDirichletAllocation` with ``learning_method="batch"``
    (its default): started from the same ``random_state`` the two agree to rounding.

    Parameters
    ----------
    n_components : int, default 10
        Number of topics K.
    doc_topic_prior : float or None, default None
        ``alpha``; None means ``1 / n_components``.
    topic_word_prior : float or None, default None
        ``eta``; None means ``1 / n_components``.
    learning_method : {"batch", "online"}, default "batch"
        ``"batch"``: batch variational EM, one pass over the corpus per iteration.
        ``"online"``: online variational Bayes (Hoffman, Blei & Bach 2010) as scikit-learn's:
        each iteration is a pass in mini-batches of ``batch_size`` documents in corpus order
        (scikit-learn's ``gen_batches``); a batch's E-step runs on the workers holding its
        documents and ``components_`` moves by ``rho_t = (learning_offset + t) **
        (-learning_decay)`` towards the batch's estimate (:mod:`emflow.models.lda_online`).
    learning_decay : float in (0.5, 1], default 0.7
        ``kappa`` of the online step size (online learning and ``partial_fit``).
    learning_offset : float >= 1, default 10.0
        ``tau`` of the online step size.
    max_iter : int, default 10
        Passes over the corpus (EM iterations).
    batch_size : int >= 1, default 128
        Documents per mini-batch (online learning and ``partial_fit``).
    evaluate_every : int, default -1
        Check convergence every this many iterations (<= 0: never; run ``max_iter``).
        The perplexity of the topics entering each iteration comes from that iteration's
        own E-step at no cost (scikit-learn makes one more pass per check, for the topics
        after it); this only sets when the ``perp_tol`` test is made.
    total_samples : float > 0, default 1e6
        The number of documents the corpus stands for: used by ``partial_fit`` (a batch's
        statistics are scaled by ``total_samples / batch documents``) and by
        ``perplexity(X, sub_sampling=True)``.
    perp_tol : float, default 0.1
        Stop when the perplexity changed by less than this between two checks.
    mean_change_tol : float, default 1e-3
        Per-document stopping tolerance of the E-step.
    max_doc_update_iter : int, default 100
        Most E-step iterations per document.
    n_jobs : int or None, default None
        Accepted for scikit-learn compatibility and unused: the work is spread by
        ``scheduler`` (threads by default use every core).
    verbose : int, default 0
        Print one line per iteration (scikit-learn's, with the perplexity on evaluated ones).
    random_state : int, numpy RandomState or None
        An int gives the same initial ``components_`` as scikit-learn with that int; None
        draws from NumPy's global RandomState (honours ``np.random.seed``), as scikit-learn.
    doc_topic_init : {"random", "ones"}, default "random"
        Initial document-topic parameters of each training E-step: Gamma(100, 0.01) draws
        as scikit-learn's training E-step makes (here keyed by document, so the same for
        any partitioning), or ones as scikit-learn's ``transform`` uses.
    learn_doc_topic_prior : bool, default False
        Also estimate the document-topic prior in each M-step, as an asymmetric Dirichlet
        (one ``alpha_k`` per topic, Newton's method on the bound, as gensim's
        ``alpha="auto"`` aims at), starting from ``doc_topic_prior``. The statistic it needs
        (``sum_d E[log theta_d]``) comes from the same pass. ``doc_topic_prior_`` is then an
        array. scikit-learn has no such option; with False the prior stays fixed as there.
    learn_topic_word_prior : {False, True, "symmetric", "asymmetric"}, default False
        Also estimate the topic-word prior ``eta`` after each update of ``components_``:
        the Dirichlet that maximises the bound's ``eta`` terms for the new topics (Newton's
        method, Minka 2000), starting from ``topic_word_prior``. ``"symmetric"`` (or True):
        one value for every term, ``topic_word_prior_`` a float; ``"asymmetric"``: one per
        term, ``topic_word_prior_`` an array of shape (n_features,). In online learning and
        ``partial_fit`` it is re-estimated after every mini-batch's update (those terms of
        the bound depend on ``components_`` alone, so no step size is needed).
    scheduler : None, "threads", "local", address string or distributed.Client
        Where to run (see :mod:`emflow.execution.cluster`).
    persist : "auto", True or False, default "auto"
        Keep the corpus in worker memory between iterations.
    split_every : int, default 8
        Fan-in of the tree reduction of statistics.
    partition_bytes : int or None
        Target bytes of a partition's entries (whole document chunks; 12 bytes per non-zero);
        default 64 MiB. Ignored for an opened corpus (``open_corpus(...)``).
    compute_dtype : {"float64", "float32"}, default "float64"
        Dtype of the E-step's topic-word table and of its K-term products (``norm_phi``);
        every sum over terms and documents, ``gamma``, the statistics and ``components_``
        stay float64. Batch learning, ``transform``, ``score`` and ``perplexity``; online
        learning computes in float64.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Topic-word variational parameters ``lambda`` (float32 for float32 counts, as
        scikit-learn; computed in float64).
    exp_dirichlet_component_ : ndarray of shape (n_components, n_features)
        ``exp(E[log beta])``.
    doc_topic_prior_ : float, or ndarray of shape (n_components,) with ``learn_doc_topic_prior``
    topic_word_prior_ : float, or ndarray of shape (n_features,) with ``learn_topic_word_prior="asymmetric"``
    n_iter_ : int
        EM iterations (passes) done (scikit-learn does not count the iteration whose check
        stopped it).
    n_batch_iter_ : int
        Update steps plus one, as scikit-learn: ``n_iter_ + 1`` in batch learning, one per
        mini-batch in online learning and ``partial_fit``.
    bound_ : float
        Perplexity of the fitted topics on the training corpus (one pass at the end of fit,
        as scikit-learn); equals ``perplexity(training corpus)``.
    converged_ : bool
        Stopped by ``perp_tol`` before ``max_iter``.
    history_ : list of float
        Batch learning: bound per word of the topics entering each iteration (perplexity =
        exp(-value)). Online learning: bound per word of the topics after each evaluated
        pass (``evaluate_every``), then of the fitted topics (``-log bound_``).
    lower_bound_ : float
        Last entry of ``history_``.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        The column names of a pandas DataFrame given to fit (with string column names only),
        as scikit-learn; ``transform`` then checks them. ``get_feature_names_out()`` gives
        the topics' names, ``latentdirichletallocation0`` ... (``set_output(transform="pandas")``).
    vocabulary_ : list of str or None
        The corpus's terms when it stores them.
    fit_info_ : dict
    """

    family = FAMILY
    data_kind = "corpus"
    params_type = M.LDAParams
    fitted = {"components": "components_"}
    outputs = {"topics": Output("transform", True)}
    objective_name = "bound per word"
    size_param = ("n_components", "topics")
    summary_arrays = {"doc-topic prior": "doc_topic_prior_"}
    _param_rules = {"compute_dtype": Choice(*M.COMPUTE_DTYPES)}

    def _summary(self) -> dict[str, str]:
        return {**super()._summary(), "perplexity (training)": f"{np.exp(-self.lower_bound_):.6g}"}

    def __init__(
        self,
        n_components: int = 10,
        *,
        doc_topic_prior: float | None = None,
        topic_word_prior: float | None = None,
        learning_method: str = "batch",
        learning_decay: float = 0.7,
        learning_offset: float = 10.0,
        max_iter: int = 10,
        batch_size: int = 128,
        evaluate_every: int = -1,
        total_samples: float = 1e6,
        perp_tol: float = 0.1,
        mean_change_tol: float = 1e-3,
        max_doc_update_iter: int = 100,
        n_jobs: int | None = None,
        verbose: int = 0,
        random_state=None,
        doc_topic_init: str = "random",
        learn_doc_topic_prior: bool = False,
        learn_topic_word_prior: bool | str = False,
        scheduler=None,
        persist="auto",
        split_every: int = 8,
        partition_bytes: int | None = None,
        compute_dtype: str = "float64",
    ):
        self.n_components = n_components
        self.doc_topic_prior = doc_topic_prior
        self.topic_word_prior = topic_word_prior
        self.learning_method = learning_method
        self.learning_decay = learning_decay
        self.learning_offset = learning_offset
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.evaluate_every = evaluate_every
        self.total_samples = total_samples
        self.perp_tol = perp_tol
        self.mean_change_tol = mean_change_tol
        self.max_doc_update_iter = max_doc_update_iter
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.random_state = random_state
        self.doc_topic_init = doc_topic_init
        self.learn_doc_topic_prior = learn_doc_topic_prior
        self.learn_topic_word_prior = learn_topic_word_prior
        self.scheduler = scheduler
        self.persist = persist
        self.split_every = split_every
        self.partition_bytes = partition_bytes
        self.compute_dtype = compute_dtype

    def _validate_params(self) -> None:
        check_int("n_components", self.n_components, 1)
        for name in ("doc_topic_prior", "topic_word_prior"):
            check_real(name, getattr(self, name), 0, strict=True, finite=True, allow_none=True,
                       hint=" (None is 1 / n_components)")
        check_choice("learning_method", self.learning_method, LEARNING_METHODS)
        check_decay("learning_decay", self.learning_decay)
        check_real("learning_offset", self.learning_offset, 1.0, finite=True)
        check_int("max_iter", self.max_iter, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("evaluate_every", self.evaluate_every)
        check_real("total_samples", self.total_samples, 0, strict=True, finite=True)
        for name in ("perp_tol", "mean_change_tol"):
            check_real(name, getattr(self, name), 0)
        check_int("max_doc_update_iter", self.max_doc_update_iter, 0)
        check_int("n_jobs", self.n_jobs, allow_none=True)
        if not isinstance(self.learn_doc_topic_prior, (bool, np.bool_)):
            raise ConfigError(f"learn_doc_topic_prior must be True or False, got {self.learn_doc_topic_prior!r}.")
        self._eta_mode()
        check_choice("doc_topic_init", self.doc_topic_init, DOC_INITS)
        if self.learn_doc_topic_prior and self.learning_method == "online":
            raise ConfigError("learn_doc_topic_prior=True needs learning_method='batch' (online learning keeps "
                              "the document-topic prior fixed, as scikit-learn).")
        check_rules(self, self._rules())
        if self.compute_dtype != "float64" and self.learning_method == "online":
            raise ConfigError(f"compute_dtype={self.compute_dtype!r} needs learning_method='batch' (online "
                              "learning computes in float64).")
        check_execution(self)

    def _eta_mode(self) -> str | None:
        """``learn_topic_word_prior`` as None, "symmetric" or "asymmetric" (ConfigError otherwise)."""
        v = self.learn_topic_word_prior
        if isinstance(v, (bool, np.bool_)):
            return "symmetric" if v else None
        if isinstance(v, str) and v in TOPIC_WORD_PRIOR_MODES:
            return v
        raise ConfigError(f"learn_topic_word_prior must be False, True, 'symmetric' or 'asymmetric', got {v!r}.")

    def _random_state(self) -> np.random.RandomState:
        """The RandomState drawing the initial topics (scikit-learn's, for an int seed or None)."""
        rs = self.random_state
        check_random_state(rs)
        if isinstance(rs, np.random.Generator):
            return np.random.RandomState(int(rs.integers(MAX_SEED, endpoint=True)))
        return _sk_random_state(rs)

    @property
    def n_batch_iter_(self) -> int:
        """Update steps plus one, as scikit-learn counts them (batch learning: ``n_iter_ + 1``)."""
        return self.__dict__.get("_n_batch_iter") or self.n_iter_ + 1

    # -- fitting ---------------------------------------------------------------------
    def fit(self, data, y=None, *, callbacks: Iterable[Callable[[IterationEvent], None]] = (),
            initial_params: np.ndarray | None = None, history: list[float] | None = None) -> "LatentDirichletAllocation":
        """Fit the topics by batch variational EM.

        Parameters
        ----------
        data : str, PathLike, CorpusData, scipy sparse matrix or array-like of shape (n_docs, n_terms)
            A Zarr corpus (see :mod:`emflow.storage.corpus`), an opened corpus (to choose the
            partitioning: ``open_corpus(..., partition_bytes=...)``) or counts in memory.
        y : ignored
        callbacks : iterable of callables
            Called with an :class:`~emflow.estimators.em.IterationEvent` after every iteration
            (``log_likelihood`` is the bound per word).

        initial_params : ndarray of shape (n_components, n_terms) or LDAParams, optional
            Starting ``components_`` (a given start), or a checkpoint's parameters
            (``components`` and, with ``learn_doc_topic_prior``, the prior reached).
        history : list of float, optional
            Bound per word of iterations already done (resume).

        Returns
        -------
        self
        """
        return self._fit(data, callbacks=callbacks, initial_params=initial_params, history=history)

    # -- the hooks of the estimator contract (emflow.estimator) ---------------------------
    def _priors(self) -> tuple[float, float]:
        K = int(self.n_components)
        alpha = 1.0 / K if self.doc_topic_prior is None else float(self.doc_topic_prior)
        return alpha, 1.0 / K if self.topic_word_prior is None else float(self.topic_word_prior)

    @classmethod
    def _contract_example(cls, rng):
        import scipy.sparse as sp

        dense = rng.poisson(0.6, size=(40, 20))
        dense[dense.sum(1) == 0, 0] = 1
        return (sp.csr_matrix(dense),), {"n_components": 3, "random_state": 0}

    def _em_family(self) -> M.LDAFamily:
        alpha, eta = self._priors()
        return M.LDAFamily(alpha, eta, int(self.max_doc_update_iter), float(self.mean_change_tol),
                           self.doc_topic_init == "random", bool(self.learn_doc_topic_prior), self._eta_mode(),
                           self.compute_dtype)

    def _em_stop(self, loaded) -> M.PerplexityStop:
        return M.PerplexityStop(int(self.evaluate_every), float(self.perp_tol))

    def _seed(self) -> int:
        # scikit-learn draws the initial topics first from random_state (random_state_); the
        # seed of the E-step's document starts is drawn from a copy, so the topics drawn
        # next are scikit-learn's for an int, a RandomState or None (np.random.seed) alike
        self.random_state_ = self._random_state()
        return int(copy.deepcopy(self.random_state_).randint(MAX_SEED, dtype=np.int64))

    def _initial_params(self, engine, loaded, rng) -> M.LDAParams:
        # from random_state_ (see _seed), not the restart's rng: LDA has no restarts
        return M.make_params(M.init_components(int(self.n_components), loaded.data.n_terms, self.random_state_))

    def _check_start(self, params, loaded) -> M.LDAParams:
        K, V = int(self.n_components), loaded.data.n_terms
        learned = eta = None
        if isinstance(params, M.LDAParams):  # a checkpoint's parameters
            params, learned, eta = params.components, params.doc_topic_prior, params.topic_word_prior
        lam = np.array(params, dtype=np.float64)
        if lam.shape != (K, V):
            raise ConfigError(f"initial_params has shape {lam.shape}; expected ({K}, {V}).")
        if not np.all(np.isfinite(lam)) or np.any(lam <= 0):
            raise ConfigError("initial_params must be finite and > 0 (they are Dirichlet parameters).")
        if learned is not None and not self.learn_doc_topic_prior:
            raise ConfigError("initial_params holds an estimated doc_topic_prior but learn_doc_topic_prior is False.")
        mode = self._eta_mode()
        if eta is not None and (mode is None or np.shape(eta) != ((V,) if mode == "asymmetric" else ())):
            raise ConfigError(f"initial_params holds an estimated topic_word_prior of shape {np.shape(eta)}, which "
                              f"learn_topic_word_prior={self.learn_topic_word_prior!r} does not estimate.")
        return M.make_params(lam, learned, eta)

    def _get_parameters(self) -> M.LDAParams:
        learned = self.doc_topic_prior_ if np.ndim(self.doc_topic_prior_) else None
        eta = self.topic_word_prior_ if self._eta_mode() is not None else None
        return M.make_params(self.components_, learned, eta)

    def _set_parameters(self, params: M.LDAParams) -> None:
        self.components_ = params.components
        alpha, eta = self._priors()
        self.doc_topic_prior_ = alpha if params.doc_topic_prior is None else params.doc_topic_prior
        eta = eta if params.topic_word_prior is None else params.topic_word_prior
        self.topic_word_prior_ = np.asarray(eta) if np.ndim(eta) else float(eta)

    def param_spec(self):
        """``lambda`` positive (K x V free scalars); ``alpha`` learned only with
        ``learn_doc_topic_prior`` (otherwise the configured prior, fixed)."""
        from ..models.family import ParamSpec, lda_spec

        spec = lda_spec()
        if self.learn_doc_topic_prior:
            return spec
        return ParamSpec({**spec.fields, "doc_topic_prior": "fixed"}, spec.derive)

    def _warn_unconverged(self, restarts: int, max_iter: int) -> None:
        if self.evaluate_every > 0:
            warnings.warn(f"LDA did not reach perp_tol={self.perp_tol} in {self.max_iter} iterations. Increase "
                          "max_iter or perp_tol.", EmflowConvergenceWarning, stacklevel=7)

    def _fit_info_extra(self, loaded, result: EMResult) -> dict:
        return {"n_docs": loaded.data.n_docs, "nnz": loaded.data.nnz}

    def _after_fit(self, loaded, result: EMResult) -> None:
        if loaded.data.dtype == np.float32:  # scikit-learn keeps float32 (computed in float64 here)
            self.components_ = self.components_.astype(np.float32)
        self.vocabulary_ = loaded.data.vocabulary

    def _fit_loaded(self, engine: Engine, loaded: Loaded, callbacks, initial_params=None, history=None):
        self.__dict__.pop("_n_batch_iter", None)
        self.__dict__.pop("_online_state", None)
        if self.learning_method == "online":
            if history:
                raise ConfigError("Resuming online learning from a history is not supported; fit again.")
            self._fit_online_loaded(engine, loaded, callbacks, initial_params)
        else:
            super()._fit_loaded(engine, loaded, callbacks, initial_params, history)
        self.fit_info_["reduction"] = dict(engine.last_reduction)
        # scikit-learn's bound_: the perplexity of the fitted topics (one more pass)
        bound, words, _ = self._bound_loaded(engine, loaded, self._get_parameters())
        self.bound_ = float(np.exp(-bound / words)) if words > 0 else math.nan
        if self.learning_method == "online" and words > 0:
            final = bound / words
            if not self.history_ or self.history_[-1] != final:
                self.history_.append(final)
            self.lower_bound_ = final
            self.lower_bounds_ = list(self.history_)
        return self

    def fit_transform(self, data, y=None, *, normalize: bool = True, **kwargs):
        """Fit, then return the document-topic distribution of ``data``."""
        return self.fit(data, **kwargs).transform(data, normalize=normalize)

    def _print_iteration(self, event: IterationEvent) -> None:
        """scikit-learn's verbose line, with the perplexity on iterations where it is checked."""
        line = f"iteration: {event.iteration} of max_iter: {self.max_iter}"
        if M.PerplexityStop(int(self.evaluate_every), float(self.perp_tol)).evaluated(event.iteration):
            line += f", perplexity: {event.report.get('perplexity', math.nan):.4f}"
        print(f"{line}  (bound per word {event.log_likelihood:.10g}, {event.seconds:.3f}s)", flush=True)

    # -- persistence (the base's save/load; these add LDA's priors, bound_ and vocabulary) ----
    @staticmethod
    def _array_spec(meta: dict) -> dict:
        """The arrays a saved LDA model holds: shapes and constraints (see store.RULES)."""
        K, V = int(meta["config"]["n_components"]), int(meta["fitted"]["n_features_in"])
        return {"components": ((K, V), ["positive"]), "doc_topic_prior": ((K,), ["positive"], True),
                "topic_word_prior": ((V,), ["positive"], True)}

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"components": self.components_}
        for name in ("doc_topic_prior", "topic_word_prior"):
            if np.ndim(getattr(self, name + "_")):
                arrays[name] = np.asarray(getattr(self, name + "_"))
        return arrays

    def _meta_extra(self) -> dict:
        return {"vocabulary": getattr(self, "vocabulary_", None), "lda": {
            "doc_topic_prior_": "array" if np.ndim(self.doc_topic_prior_) else self.doc_topic_prior_,
            "topic_word_prior_": "array" if np.ndim(self.topic_word_prior_) else self.topic_word_prior_,
            "bound_": _finite_or_none(getattr(self, "bound_", None)),
            "n_batch_iter_": int(self.n_batch_iter_),
        }}

    def _restore_arrays(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        extra = meta.get("lda") or meta["fitted"]  # models saved before the estimator base: in "fitted"
        self.components_ = arrays["components"]
        self.doc_topic_prior_ = (arrays["doc_topic_prior"] if "doc_topic_prior" in arrays
                                 else float(extra["doc_topic_prior_"]))
        self.topic_word_prior_ = (arrays["topic_word_prior"] if "topic_word_prior" in arrays
                                  else float(extra["topic_word_prior_"]))
        if extra.get("bound_") is not None:  # models saved before bound_ have none
            self.bound_ = float(extra["bound_"])
        if extra.get("n_batch_iter_") is not None:  # nor before online learning
            self._n_batch_iter = int(extra["n_batch_iter_"])

    def _after_load(self, meta: dict) -> None:
        path = meta.get("_loaded_from", "?")
        if not (np.all(np.isfinite(self.doc_topic_prior_)) and np.all(np.asarray(self.doc_topic_prior_) > 0)
                and np.all(np.isfinite(self.topic_word_prior_)) and np.all(np.asarray(self.topic_word_prior_) > 0)):
            raise ModelFormatError(f"The model at {path!r}: its priors are not positive and finite; "
                                   "the file is damaged. Refit or re-save it.")
        vocab = meta.get("vocabulary")
        if vocab is not None and (not isinstance(vocab, list) or len(vocab) != self.n_features_in_):
            raise ModelFormatError(f"The model at {path!r}: its vocabulary does not have one term "
                                   "per feature; the file is damaged. Refit or re-save it.")
        self.vocabulary_ = vocab


def _finite_or_none(x):
    return float(x) if x is not None and np.isfinite(x) else None


