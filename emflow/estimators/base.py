"""The estimator contract: one base class for every EM family, and the registry of families.

A family's estimator declares what it is (class attributes) and fills a few hooks; this base
owns everything every family shares, as scikit-learn's ``BaseMixture`` does for its mixtures:

========================  ================================================================
declared by the family    ``family`` (registry key, stored in models and checkpoints),
                          ``data_kind`` ("rows", "sequences", "corpus"), ``params_type``
                          (the parameter NamedTuple of its math module), ``fitted``
                          (parameter field -> fitted attribute), ``outputs`` (what ``out=``
                          writes), ``iter_param`` (``max_iter``; hmmlearn says ``n_iter``),
                          ``array_params`` (constructor parameters that hold arrays)
hooks it fills            ``_validate_params``, ``_open``, ``_em_family``,
                          ``_initial_params``, ``_n_parameters``, ``_array_spec``;
                          optionally ``_prepare``, ``_watch``, ``_em_tol``,
                          ``_fit_info_extra``, ``_after_fit``, ``_meta_extra``,
                          ``_after_load``, ``_contract_example``
the base provides         the fit driver (engine session, ``n_init`` restarts with the best
                          lower bound, ``warm_start``, ``max_iter == 0``, one convergence
                          warning, fitted attributes, ``lower_bounds_``, one ``fit_info_``
                          schema), ``init_params_for`` (the start of restart r, for the
                          flows), ``_get_parameters``/``_set_parameters``,
                          ``_check_fitted``, ``save``/``load`` through one config codec,
                          and registration in :data:`REGISTRY`, which ``emflow.load``,
                          checkpoints, outputs and the command line read; every family's
                          ``accelerate`` parameter (None / "none": plain EM, "squarem":
                          :mod:`emflow.estimators.accelerate`, added to the ``__init__`` it
                          defines) and the fitted ``n_passes_`` (passes over the data)
========================  ================================================================

Restart ``r`` of a fit draws its initialisation from ``numpy.random.default_rng([seed, r])``
where ``seed`` is drawn once per fit from ``random_state`` with scikit-learn's
``check_random_state`` (so ``random_state=None`` honours ``np.random.seed``). A flow that runs
the restarts as separate tasks therefore reproduces ``fit(n_init=R)`` exactly.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._set_output import _SetOutputMixin, _wrap_method_output

from ._persist import Persistent
from .accelerate import AccelerateRule, add_accelerate_parameter, add_keyword_parameter
from .em import EMResult, IterationEvent, run_em
from .incremental import (LedgerRule, RefreshRule, add_warm_start_keyword, check_ledger_location, fit_with_ledger,
                          ledger_lock, record_ledger, wants_warm_start)
from ..errors import ConfigError, EmflowConvergenceWarning, NotFittedError

__all__ = ["EMEstimator", "Output", "REGISTRY", "family_of", "print_iteration"]

REGISTRY: dict[str, type["EMEstimator"]] = {}
"""Every registered family: ``family`` name -> estimator class (filled by subclassing)."""


@dataclass(frozen=True)
class Output:
    """One output a fitted model writes to Zarr (``out=``): the method that computes it and
    whether ``emflow predict`` / the scoring flow write it when none is named."""

    method: str
    default: bool = False


# words of family names the command line shortens, as users write them (gmm, lgssm, lda)
_CLI_SHORT = {"gaussian-mixture": "gmm", "linear-gaussian-ssm": "lgssm", "latent-dirichlet-allocation": "lda"}


def _cli_name(family: str) -> str:
    """``gaussian_hmm`` -> ``gaussian-hmm``; ``bayesian_gaussian_mixture`` -> ``bayesian-gmm``."""
    name = family.replace("_", "-")
    for long, short in _CLI_SHORT.items():
        name = name.replace(long, short)
    return name


def family_of(name: str) -> type["EMEstimator"]:
    """The estimator class registered under ``name``; a ConfigError naming the known ones."""
    from . import discover

    fams = discover()
    if name not in fams:
        raise ConfigError(f"family must be one of {sorted(fams)}, got {name!r}.")
    return fams[name]


def print_iteration(event: IterationEvent) -> None:
    """The per-iteration line ``verbose=1`` prints, the same for every family."""
    print(
        f"init {event.init} iter {event.iteration:4d}  objective {event.log_likelihood:.10g}  "
        f"change {event.change:.3g}  {event.seconds:.3f}s" + ("" if event.step == "em" else f"  ({event.step})"),
        flush=True,
    )


@dataclass(frozen=True)
class _WarmStop:
    """The default stop rule of a warm-started fit: as :class:`~emflow.estimators.em.ChangeBelow`,
    with the previous fit's lower bound standing before the first iteration."""

    previous: float
    tol: float

    def __call__(self, history) -> bool:
        last = history[-2] if len(history) >= 2 else self.previous
        return bool(history) and abs(history[-1] - last) < self.tol


class EMEstimator(Persistent, _SetOutputMixin, BaseEstimator):
    """Base class of every emflow estimator (see the module docstring for the contract).

    A family with ``transform`` (and ``get_feature_names_out``) gets scikit-learn's
    ``set_output(transform="pandas")``, as its transformers do."""

    family: ClassVar[str] = ""
    data_kind: ClassVar[str] = "rows"
    params_type: ClassVar[type | None] = None
    fitted: ClassVar[dict[str, str]] = {}
    outputs: ClassVar[dict[str, Output]] = {}
    iter_param: ClassVar[str] = "max_iter"
    array_params: ClassVar[tuple[str, ...]] = ()
    # how `emflow info` / `emflow fit` describe a fitted model
    objective_name: ClassVar[str] = "mean log-likelihood"
    size_param: ClassVar[tuple[str, str]] = ("n_components", "components")
    summary_arrays: ClassVar[dict[str, str]] = {}
    # the name `emflow fit --model` takes; by default the family's, hyphenated and abbreviated
    # (see _cli_name), so a new family needs no entry in the command line
    cli_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        add_accelerate_parameter(cls)  # every family's accelerate=None (emflow.estimators.accelerate)
        add_keyword_parameter(cls, "ledger")  # and ledger=None (emflow.estimators.incremental)
        add_keyword_parameter(cls, "refresh")  # and refresh=None (incremental EM, with a ledger)
        add_warm_start_keyword(cls)  # fit(..., warm_start=True) in every family
        name = cls.__dict__.get("family")
        if name:
            if "cli_name" not in cls.__dict__:
                cls.cli_name = _cli_name(name)
            # scikit-learn wraps only a class's own transform; a family may inherit its (LDA)
            if callable(getattr(cls, "transform", None)) and not hasattr(cls.transform, "__wrapped__"):
                cls._sklearn_auto_wrap_output_keys = {*getattr(cls, "_sklearn_auto_wrap_output_keys", ()),
                                                      "transform"}
                cls.transform = _wrap_method_output(cls.transform, "transform")
            known = REGISTRY.get(name)
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise TypeError(f"Family {name!r} is already registered by {known.__module__}.{known.__qualname__}.")
            REGISTRY[name] = cls

    # -- scikit-learn plumbing -------------------------------------------------------------
    def set_params(self, **params):
        valid = self._get_param_names()
        bad = [k for k in params if k.split("__")[0] not in valid]
        if bad:
            raise ConfigError(f"Unknown parameter {bad[0]!r} for {type(self).__name__}; valid: {valid}.")
        return super().set_params(**params)

    def __sklearn_is_fitted__(self) -> bool:
        return self._is_fitted()

    def __sklearn_tags__(self):
        """scikit-learn's tags, from the declarations: no target; a corpus family (LDA) reads
        sparse, non-negative counts; a family with ``transform`` is a transformer (float64
        out); one with ``score_samples`` a density estimator, as scikit-learn's mixtures."""
        from sklearn.utils import TransformerTags

        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        if self.data_kind == "corpus":
            tags.input_tags.sparse = True
            tags.input_tags.positive_only = True
        if callable(getattr(type(self), "transform", None)) and tags.transformer_tags is None:
            tags.transformer_tags = TransformerTags(preserves_dtype=["float64"])
        if callable(getattr(type(self), "score_samples", None)) and tags.estimator_type is None:
            tags.estimator_type = "density_estimator"
        return tags

    def _check_not_sparse(self, data) -> None:
        """A scipy sparse matrix given to a family that reads dense data: say so (NumPy would
        see an object array), as scikit-learn's ``check_array`` does."""
        if self.data_kind != "corpus" and type(data).__module__.startswith("scipy.sparse"):
            from ..errors import DataError

            raise DataError(f"{type(self).__name__} does not accept sparse input (a {type(data).__name__}): "
                            "pass dense data, e.g. X.toarray().")

    # -- parameter validation -----------------------------------------------------------------
    _param_rules: ClassVar[dict] = {"accelerate": AccelerateRule(), "ledger": LedgerRule(), "refresh": RefreshRule()}
    """``{parameter: emflow.checks rule}``; a subclass's table extends its parents'.
    Every family has ``accelerate`` (None / "none": plain EM; "squarem": SQUAREM), ``ledger``
    (None: no statistics kept; a directory: :mod:`emflow.estimators.incremental`) and
    ``refresh`` (None: full passes; a fraction: incremental EM with the ledger, same module)."""

    @classmethod
    def _rules(cls) -> dict:
        table: dict = {}
        for klass in reversed(cls.__mro__):
            table.update(klass.__dict__.get("_param_rules", {}))
        return table

    def _validate_params(self) -> None:
        """Raise a ConfigError naming the first invalid constructor parameter: the declared
        rules, then the execution parameters every estimator has, then the family's own
        cross-parameter checks (:meth:`_validate_more`)."""
        from ..checks import check_execution, check_rules

        check_rules(self, self._rules())
        check_execution(self)
        self._validate_more()

    def _validate_more(self) -> None:
        """Checks that involve several parameters (a family overrides it)."""

    # -- hooks (a family overrides these) --------------------------------------------------

    def _open(self, engine, data, *fit_args):
        raise NotImplementedError

    def _allows_nan(self) -> bool:
        """Whether NaN in the data is a missing value this estimator handles (else an error):
        what every opener outside the estimator (the CLI, the flows) passes on."""
        return False

    def _em_family(self):
        raise NotImplementedError

    def _initial_params(self, engine, loaded, rng: np.random.Generator):
        raise NotImplementedError

    def param_spec(self):
        """The :class:`~emflow.models.family.ParamSpec` of this estimator's parameters (which
        fields are learned and their constraints); the parameter type's own by default, narrowed
        by a family whose configuration holds some parameters fixed."""
        from ..models.family import spec_of

        return spec_of(self.params_type)

    def _n_parameters(self) -> int:
        """Free scalars of the fitted parameters (what BIC and AIC count), from :meth:`param_spec`."""
        from ..models.family import n_free

        self._check_fitted()
        return int(n_free(self.param_spec(), self._get_parameters()))

    def _prepare(self, engine, loaded) -> None:
        """Checks and data-derived settings before the first E-step (feature counts...)."""

    def _watch(self, event: IterationEvent, warned: set) -> None:
        """Warn (once per cause) about what the M-step report says (degenerate states...)."""

    def _check_start(self, params, loaded):
        """Check (and normalise) parameters given to resume from (``initial_params``)."""
        return params

    def _em_tol(self, loaded) -> float:
        return float(self.tol)

    def _em_stop(self, loaded):
        """Another stop rule for run_em (``stop(history) -> bool``); None: ``_em_tol``'s."""
        return None

    def _print_iteration(self, event: IterationEvent) -> None:
        """The line ``verbose`` prints after each iteration."""
        print_iteration(event)

    def _warn_unconverged(self, restarts: int, max_iter: int) -> None:
        """The one convergence warning (scikit-learn's wording); a family with another stop rule words its own."""
        warnings.warn(
            f"Best performing initialization did not converge. Try different init parameters, or "
            f"increase {self.iter_param}, tol, or check for degenerate data. ({type(self).__name__}: "
            f"{restarts} initialisation(s), {self.iter_param}={max_iter}, tol={self.tol})",
            EmflowConvergenceWarning, stacklevel=6,  # the caller of fit (through its warm_start wrapper)
        )

    def _fit_info_extra(self, loaded, result: EMResult) -> dict:
        return {}

    def _after_fit(self, loaded, result: EMResult) -> None:
        pass

    def _meta_extra(self) -> dict:
        return {}

    def _after_load(self, meta: dict) -> None:
        pass

    def _summary(self) -> dict[str, str]:
        """Rows (label -> text) describing the fitted model, for the command line."""
        param, label = self.size_param
        rows = {label: str(getattr(self, param))}
        if getattr(self, "covariance_type", None):
            rows["covariance"] = str(self.covariance_type)
        rows["converged"] = f"{self.converged_} after {self.n_iter_} iterations"
        info = getattr(self, "fit_info_", None) or {}
        if info.get("n_passes") is not None:
            rows["passes over the data"] = f"{info['n_passes']} (accelerate={info.get('accelerate')})"
        rows[self.objective_name] = f"{self.lower_bound_:.10g}"
        for lab, attr in self.summary_arrays.items():
            if getattr(self, attr, None) is not None:
                rows[lab] = np.array2string(np.asarray(getattr(self, attr)), precision=4)
        return rows

    @classmethod
    def _contract_example(cls, rng: np.random.Generator) -> tuple[tuple, dict]:
        """``(fit_args, init_kwargs)``: a small dataset and constructor keywords for the
        shipped contract test (:mod:`emflow.testing`)."""
        raise NotImplementedError

    # -- parameters <-> fitted attributes --------------------------------------------------
    def _is_fitted(self) -> bool:
        return all(hasattr(self, attr) for attr in self.fitted.values())

    def _check_fitted(self) -> None:
        if not self._is_fitted():
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with appropriate "
                "arguments before using this estimator (or load a saved model with emflow.load(path))."
            )

    def _get_parameters(self):
        values = {f: getattr(self, a) for f, a in self.fitted.items()}
        return self.params_type(**values, **self._parameter_settings())

    def _parameter_settings(self) -> dict:
        """Non-array fields of the parameter NamedTuple (e.g. ``covariance_type``)."""
        return {}

    def _set_parameters(self, params) -> None:
        for f, a in self.fitted.items():
            setattr(self, a, getattr(params, f))

    # -- the fit driver ----------------------------------------------------------------------
    def _seed(self) -> int:
        rs = self.random_state
        if isinstance(rs, np.random.Generator):
            return int(rs.integers(2**32))
        return int(check_random_state(rs).randint(2**32 - 1, dtype=np.int64))

    @staticmethod
    def _restart_rng(seed: int, init: int) -> np.random.Generator:
        return np.random.default_rng([seed, init])

    def _session(self):
        from ..execution.cluster import engine_for

        return engine_for(self.scheduler, split_every=self.split_every)

    def _xarray_rows(self, data, sample_dims=None, feature_dim=None, *, fitting: bool = False, chunk_bytes=None):
        """``(data, template)``: an xarray object's rows and grid, for a rows family; other data
        unchanged with template None. A fit records the layout (sample dims, features) that
        applying the model reuses and its save keeps (:func:`emflow.storage.xarray_io.layout_rows`)."""
        from ..storage.xarray_io import layout_rows

        self._check_feature_names(data, fitting)
        return layout_rows(self, data, sample_dims, feature_dim, fitting=fitting, chunk_bytes=chunk_bytes)

    def _check_feature_names(self, data, fitting: bool) -> None:
        """scikit-learn's column names of a pandas DataFrame: a fit keeps them in
        ``feature_names_in_`` (and drops them for data without names); applying the model
        warns or raises as scikit-learn does when the names differ (before any count check)."""
        from sklearn.utils.validation import _check_feature_names

        _check_feature_names(self, data, reset=fitting)

    def _fit(self, data, *fit_args, callbacks: Iterable[Callable[[IterationEvent], None]] = (),
             initial_params=None, history: list[float] | None = None, sample_dims=None, feature_dim=None):
        """What every family's ``fit`` does: open the data, run EM, set the fitted state
        (an xarray object given to a rows family is stacked into rows first)."""
        data, _ = self._xarray_rows(data, sample_dims, feature_dim, fitting=True)
        self._validate_params()
        from ..checks import check_rules

        check_rules(self, EMEstimator._param_rules)  # also where a family validates on its own
        self._check_not_sparse(data)
        check_ledger_location(self.ledger, data, self)
        callbacks = list(callbacks)
        if getattr(self, "verbose", 0):
            callbacks.append(self._print_iteration)
        with ledger_lock(self.ledger), self._session() as engine:
            loaded = self._open(engine, data, *fit_args)
            try:
                self._fit_loaded(engine, loaded, callbacks, initial_params, history)
                self._record_passes(loaded)  # with any pass a family makes after EM (LDA's bound_)
                return self
            finally:
                loaded.release()

    def _record_passes(self, loaded) -> None:
        """``n_passes_`` (and ``fit_info_["n_passes"]``): passes over ``loaded`` so far, from
        the engine's count of partition reads (the opening scan included)."""
        self.n_passes_ = int(loaded.partition_reads // max(1, len(loaded.handles)))
        if getattr(self, "fit_info_", None) is not None:
            self.fit_info_["n_passes"] = self.n_passes_
            self.fit_info_["bytes_read"] = int(loaded.bytes_read)  # stored bytes, the engine's count

    def init_params_for(self, data, *fit_args, init: int = 0, seed: int | None = None):
        """The starting parameters of restart ``init`` of ``fit(data, ...)`` (what
        ``fit(n_init=R)`` starts restart ``init`` from, for the same ``random_state`` or
        ``seed``): the flows run each restart as its own checkpointed task with these.
        ``init_passes_`` is set to the passes it made (the opening scan included)."""
        self._validate_params()
        seed = self._seed() if seed is None else int(seed)
        with self._session() as engine:
            loaded = self._open(engine, data, *fit_args)
            try:
                self._prepare(engine, loaded)
                params = self._initial_params(engine, loaded, self._restart_rng(seed, init))
                self.init_passes_ = int(loaded.partition_reads // max(1, len(loaded.handles)))  # scan included
                return params
            finally:
                loaded.release()

    def _fit_loaded(self, engine, loaded, callbacks, initial_params=None, history=None):
        self._prepare(engine, loaded)
        n_init = int(getattr(self, "n_init", 1))
        warm = wants_warm_start(self) and self._is_fitted()
        if initial_params is not None and n_init != 1 and not warm:
            raise ConfigError("Resuming from initial_params needs n_init=1.")
        max_iter = int(getattr(self, self.iter_param))
        family = self._em_family()
        warned: set = set()

        def watch(event):
            self._watch(event, warned)

        restarts = 1 if (initial_params is not None or warm) else n_init
        # drawn when resuming too: the E-step context's seed ((seed, restart)) must be the same
        seed = self._seed()
        best: EMResult | None = None
        for init in range(restarts):
            if initial_params is not None:
                params = self._check_start(initial_params, loaded)
            elif warm:
                params = self._get_parameters()
            else:
                params = self._initial_params(engine, loaded, self._restart_rng(seed, init))
            if max_iter == 0:
                past = list(history or [])
                result = EMResult(params, past, False, len(past), past[-1] if past else -math.inf)
            else:
                stop = self._em_stop(loaded)
                if warm and stop is None and initial_params is None and np.isfinite(self.lower_bound_):
                    # scikit-learn's warm start: the first change is measured from the last fit's bound
                    stop = _WarmStop(float(self.lower_bound_), self._em_tol(loaded))
                # with a ledger: per-partition statistics kept, a warm start from them (incremental.py)
                em = run_em if self.ledger is None else functools.partial(fit_with_ledger, estimator=self, warm=warm)
                result = em(engine, loaded, family, params, tol=None if stop is not None else self._em_tol(loaded),
                            stop=stop, max_iter=max_iter, callbacks=[watch, *callbacks], init=init,
                            history=history, seed=(seed, init), accelerate=self.accelerate,
                            spec=self.param_spec() if self.accelerate == "squarem" else None)
            if best is None or result.lower_bound > best.lower_bound:
                best = result
        assert best is not None
        if not best.converged and max_iter > 0:
            self._warn_unconverged(restarts, max_iter)
        info = record_ledger(self, loaded, best) if self.ledger is not None and max_iter > 0 else {}
        return self._set_fit_result(best, loaded, engine, restarts=restarts, **info)

    def _set_fit_result(self, result: EMResult, loaded, engine, *, restarts: int = 1, **info):
        """The fitted state from an EM result, the same for every family and every caller
        (the fit driver, model selection, the flows): parameters, ``converged_``,
        ``n_iter_``, ``lower_bound_``, ``history_``, ``lower_bounds_``, ``n_features_in_``,
        ``n_passes_`` and ``fit_info_`` (common keys, then the family's, then ``info``).

        ``n_passes_``: passes over ``loaded`` so far, from the engine's count of partition reads
        (the opening scan, initialisation passes such as k-means, every EM or SQUAREM pass of
        every restart). ``n_iter_`` counts accepted parameter sets (one pass each; see
        :mod:`emflow.estimators.accelerate` for SQUAREM's rejected passes)."""
        self._set_parameters(result.params)
        self.converged_ = bool(result.converged)
        self.n_iter_ = int(result.n_iter)
        self.lower_bound_ = float(result.lower_bound)
        self.history_ = [float(v) for v in result.history]
        self.lower_bounds_ = list(self.history_)
        self.n_features_in_ = int(loaded.data.n_features)
        self._record_passes(loaded)
        self.fit_info_ = {
            "fingerprint": loaded.fingerprint,
            "source": loaded.data.source,
            "n_features": int(loaded.data.n_features),
            "dtype": str(loaded.data.dtype),
            "partitions": loaded.data.n_partitions,
            "resident": bool(loaded.resident),
            "engine": engine.describe(),
            "n_init": int(restarts),
            "seconds_per_iteration": [float(s) for s in result.seconds],
            "n_passes": self.n_passes_,
            "bytes_read": int(loaded.bytes_read),
            "accelerate": getattr(self, "accelerate", None),
            **({"acceleration": result.acceleration} if result.acceleration else {}),
            **self._fit_info_extra(loaded, result),
            **info,
        }
        self._after_fit(loaded, result)
        return self

    # -- scores every family shares -----------------------------------------------------------
    def _loglik_count(self, data, *args) -> tuple[float, float]:
        """``(total log-likelihood, number of observations)`` of ``data`` under the fitted
        parameters (rows, steps), one pass on the engine."""
        raise NotImplementedError

    def bic(self, X, *args) -> float:
        """Bayesian information criterion ``-2 log L + p log(n)`` on the data (lower is better);
        ``p`` counts the free parameters (:meth:`_n_parameters`), ``n`` the rows or steps."""
        loglik, n = self._loglik_count(X, *args)
        return -2.0 * loglik + self._n_parameters() * np.log(n)

    def aic(self, X, *args) -> float:
        """Akaike information criterion ``-2 log L + 2 p`` on the data (lower is better)."""
        loglik, _ = self._loglik_count(X, *args)
        return -2.0 * loglik + 2.0 * self._n_parameters()
