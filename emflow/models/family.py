"""Declarative parameter specs and one flat, unconstrained parameter vector for every family.

A family's parameters are a NamedTuple of arrays (``GMMParams``, ``GaussianHMMParams``, ...).
A :class:`ParamSpec` names, for every field, its constraint:

==============  ========================================  ===============================  =========
constraint      meaning                                   coordinates in the flat vector   free
==============  ========================================  ===============================  =========
``real``        any real array                            as is                            ``size``
``positive``    every entry > 0                           ``log``                          ``size``
``simplex``     entries > 0, last axis sums to 1          ``log(x_i / x_last)``, i < n-1   ``size - size / n``
``stochastic``  a matrix whose rows lie on the simplex    as ``simplex``, row by row       ``size - size / n``
``spd``         symmetric positive definite (last two     log-Cholesky: ``log`` of the     ``d(d+1)/2`` per matrix
                axes)                                     diagonal of ``L``, the strict
                                                          lower triangle as it is
``diagonal``    a diagonal matrix with a positive         ``log`` of the diagonal          ``d`` per matrix
                diagonal (``diag`` covariances stored
                as matrices)
``cholesky``    a factor derived from another field       none (recomputed by ``derive``)  0
``derived``     recomputed from other fields              none (recomputed by ``derive``)  0
``fixed``       not learnable (a setting, or a parameter  none (copied from the template)  0
                the user holds fixed)
==============  ========================================  ===============================  =========

:func:`to_vector` maps parameters onto one 1-D float64 vector, :func:`from_vector` maps any
real vector of the right length back onto parameters inside the constraint set (shapes, fixed
fields from a template; derived fields recomputed by the spec's ``derive``), and
:func:`n_free` counts the free scalars (what BIC / AIC count). The round trip is exact to
rounding. Constraints that depend on a setting carried by the parameters (a covariance type)
are written with :func:`by`.

A family declares its spec beside its parameter type, as an unannotated class attribute of
the NamedTuple (an attribute, not a field)::

    class PoissonHMMParams(NamedTuple):
        startprob: np.ndarray
        transmat: np.ndarray
        lambdas: np.ndarray

        param_spec = ParamSpec({"startprob": "simplex", "transmat": "stochastic",
                                "lambdas": "positive"})

:func:`spec_of` finds that attribute first, then this module's table :data:`SPECS` of the
families written before specs existed. A spec that depends on the estimator's configuration
(which fields are learned) is built by a function, e.g. :func:`hmm_spec` (hmmlearn's
``params="stmc"`` letters) and :func:`lgssm_spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import ConfigError

__all__ = [
    "CONSTRAINTS",
    "FREE_CONSTRAINTS",
    "ParamSpec",
    "by",
    "to_vector",
    "from_vector",
    "n_free",
    "learnable",
    "spec_of",
    "gmm_spec",
    "hmm_spec",
    "categorical_hmm_spec",
    "lgssm_spec",
    "lda_spec",
    "SPECS",
]

CONSTRAINTS = ("real", "positive", "simplex", "stochastic", "spd", "diagonal", "cholesky", "derived", "fixed")
FREE_CONSTRAINTS = ("real", "positive", "simplex", "stochastic", "spd", "diagonal")


@dataclass(frozen=True)
class By:
    """A constraint chosen by the value of a string field of the parameters."""

    key: str
    cases: Mapping[str, str]


def by(key: str, **cases: str) -> By:
    """Constraint chosen by the string field ``key`` of the parameters.

    Examples
    --------
    >>> cov = by("covariance_type", full="spd", tied="spd", diag="positive", spherical="positive")
    """
    for c in cases.values():
        _check_constraint(c, key)
    return By(key, dict(cases))


def _check_constraint(c, name):
    if c not in CONSTRAINTS:
        raise ConfigError(f"The constraint of parameter field {name!r} is {c!r}; allowed: {', '.join(CONSTRAINTS)}.")


@dataclass(frozen=True)
class ParamSpec:
    """Constraints of the fields of a parameter NamedTuple.

    Parameters
    ----------
    fields : mapping of str to str or :func:`by`
        Every field of the parameter type, with its constraint (one of :data:`CONSTRAINTS`).
    derive : callable, optional
        ``derive(params) -> params`` recomputing the ``cholesky`` and ``derived`` fields from
        the free ones (called by :func:`from_vector`).
    """

    fields: Mapping[str, str | By]
    derive: Callable[[Any], Any] | None = field(default=None, compare=False)

    def __post_init__(self):
        for name, c in self.fields.items():
            if not isinstance(c, By):
                _check_constraint(c, name)

    def constraint(self, name: str, params) -> str:
        """The constraint of field ``name`` for these parameters (``fixed`` for a None value)."""
        if name not in self.fields:
            raise ConfigError(f"The parameter field {name!r} of {type(params).__name__} has no constraint in the spec "
                              f"(the spec names {', '.join(self.fields)}).")
        c = self.fields[name]
        if isinstance(c, By):
            key = getattr(params, c.key)
            if key not in c.cases:
                raise ConfigError(f"{c.key}={key!r} has no constraint for field {name!r}; "
                                  f"allowed: {', '.join(c.cases)}.")
            c = c.cases[key]
        return "fixed" if getattr(params, name) is None else c

    def replace(self, **constraints: str) -> "ParamSpec":
        """A copy with some fields' constraints replaced (e.g. a field held ``fixed``)."""
        return ParamSpec({**self.fields, **constraints}, self.derive)


# -- the maps of one field -----------------------------------------------------------
def _tril(d: int):
    return np.tril_indices(d, -1)


def _n_field(c: str, shape: tuple) -> int:
    size = int(np.prod(shape, dtype=np.int64))
    if c in ("real", "positive"):
        return size
    if c in ("simplex", "stochastic"):
        return size - size // shape[-1] if size else 0
    if c == "spd":
        d = shape[-1]
        return (size // (d * d)) * d * (d + 1) // 2 if d else 0
    if c == "diagonal":
        return size // shape[-1] if shape[-1] else 0
    return 0


def _forward(c: str, a: np.ndarray) -> np.ndarray:
    if c == "real":
        return a.ravel()
    if c == "positive":
        return np.log(a).ravel()
    if c in ("simplex", "stochastic"):
        la = np.log(a)
        return (la[..., :-1] - la[..., -1:]).ravel()
    if c == "diagonal":
        return np.log(np.diagonal(a, axis1=-2, axis2=-1)).ravel()
    # spd: log-Cholesky, matrix by matrix: log diag(L), then the strict lower triangle row-major
    d = a.shape[-1]
    L = np.linalg.cholesky(a.reshape(-1, d, d))
    i, j = _tril(d)
    return np.concatenate([np.log(np.diagonal(L, axis1=1, axis2=2)), L[:, i, j]], axis=1).ravel()


def _backward(c: str, v: np.ndarray, shape: tuple) -> np.ndarray:
    if c == "real":
        return v.reshape(shape).copy()
    if c == "positive":
        return np.exp(v).reshape(shape)
    if c in ("simplex", "stochastic"):
        z = np.concatenate([v.reshape(shape[:-1] + (shape[-1] - 1,)), np.zeros(shape[:-1] + (1,))], axis=-1)
        z = np.exp(z - z.max(axis=-1, keepdims=True))  # softmax, shifted against overflow
        return z / z.sum(axis=-1, keepdims=True)
    d = shape[-1]
    if c == "diagonal":
        diag = np.exp(v.reshape(-1, d))
        out = np.zeros((diag.shape[0], d, d))
        out[:, np.arange(d), np.arange(d)] = diag
        return out.reshape(shape)
    w = v.reshape(-1, d * (d + 1) // 2)
    L = np.zeros((w.shape[0], d, d))
    L[:, np.arange(d), np.arange(d)] = np.exp(w[:, :d])
    i, j = _tril(d)
    L[:, i, j] = w[:, d:]
    return (L @ np.swapaxes(L, 1, 2)).reshape(shape)


# -- the generic maps ---------------------------------------------------------------
def _free_fields(params, spec: ParamSpec):
    for name in params._fields:
        c = spec.constraint(name, params)
        if c in FREE_CONSTRAINTS:
            yield name, c, np.shape(getattr(params, name))


def learnable(params, spec: ParamSpec) -> list[str]:
    """Names of the fields with free coordinates (in vector order)."""
    return [name for name, _, _ in _free_fields(params, spec)]


def n_free(spec: ParamSpec, params) -> int:
    """Number of free scalars of ``params`` under ``spec`` (the length of :func:`to_vector`).

    A simplex of length ``n`` has ``n - 1``, a ``d x d`` SPD matrix ``d(d+1)/2``, a diagonal
    matrix ``d``; ``cholesky``, ``derived`` and ``fixed`` fields none.
    """
    return int(sum(_n_field(c, shape) for _, c, shape in _free_fields(params, spec)))


def to_vector(params, spec: ParamSpec) -> np.ndarray:
    """The free fields of ``params`` as one flat, unconstrained float64 vector.

    Fields in declaration order; each mapped as the table in the module docstring says.
    """
    parts = [_forward(c, np.asarray(getattr(params, name), dtype=np.float64))
             for name, c, _ in _free_fields(params, spec)]
    return np.concatenate(parts) if parts else np.zeros(0)


def from_vector(vec, template, spec: ParamSpec):
    """Parameters shaped like ``template`` whose free fields are read from ``vec``.

    Any finite real ``vec`` gives parameters inside the constraint set; fixed fields are
    those of ``template``, derived ones are recomputed by ``spec.derive``.
    """
    vec = np.asarray(vec, dtype=np.float64)
    want = n_free(spec, template)
    if vec.ndim != 1 or vec.shape[0] != want:
        raise ConfigError(f"vec must be a 1-D vector of the {want} free parameters of this "
                          f"{type(template).__name__}; got shape {vec.shape}.")
    out, pos = {}, 0
    for name, c, shape in _free_fields(template, spec):
        n = _n_field(c, shape)
        out[name] = _backward(c, vec[pos:pos + n], shape)
        pos += n
    params = template._replace(**out)
    return spec.derive(params) if spec.derive is not None else params


def spec_of(params_or_type) -> ParamSpec:
    """The spec a parameter type declares (``param_spec``), else the one in :data:`SPECS`."""
    cls = params_or_type if isinstance(params_or_type, type) else type(params_or_type)
    spec = getattr(cls, "param_spec", None)
    if isinstance(spec, ParamSpec):
        return spec
    try:
        return SPECS[cls.__name__]
    except KeyError:
        raise ConfigError(f"{cls.__name__} declares no param_spec and is not in emflow.models.family.SPECS "
                          f"(known: {', '.join(SPECS)}).") from None


# -- the specs of the families written before specs existed ----------------------------
_COVARIANCE = by("covariance_type", full="spd", tied="spd", diag="positive", spherical="positive")


def _gmm_derive(p):
    from .gmm import precisions_cholesky_from_covariances

    return p._replace(precisions_cholesky=precisions_cholesky_from_covariances(p.covariances, p.covariance_type))


def _lda_derive(p):
    from .lda import make_params

    return make_params(p.components, p.doc_topic_prior, p.topic_word_prior)


def gmm_spec() -> ParamSpec:
    """``GMMParams``: weights on the simplex, means real, covariances by type (scikit-learn's count)."""
    return ParamSpec({"weights": "simplex", "means": "real", "covariances": _COVARIANCE,
                      "precisions_cholesky": "cholesky", "covariance_type": "fixed"}, _gmm_derive)


_HMM_LETTERS = {"s": "startprob", "t": "transmat", "m": "means", "c": "covars", "e": "emissionprob"}


def _hmm_fixed(fields: dict, params: str) -> ParamSpec:
    held = {f: "fixed" for letter, f in _HMM_LETTERS.items() if f in fields and letter not in params}
    return ParamSpec({**fields, **held})


def hmm_spec(params: str = "stmc") -> ParamSpec:
    """``GaussianHMMParams``; the fields whose letter is not in ``params`` (hmmlearn's) are fixed."""
    return _hmm_fixed({"startprob": "simplex", "transmat": "stochastic", "means": "real", "covars": _COVARIANCE,
                       "covariance_type": "fixed"}, params)


def categorical_hmm_spec(params: str = "ste") -> ParamSpec:
    """``CategoricalHMMParams``; the fields whose letter is not in ``params`` are fixed."""
    return _hmm_fixed({"startprob": "simplex", "transmat": "stochastic", "emissionprob": "stochastic"}, params)


_LGSSM_FIELDS = ("A", "C", "Q", "R", "mu0", "V0")
# pykalman's names of those fields, as emflow.models.lgssm.EM_VARS lists them (a test checks)
_LGSSM_EM_VARS = ("transition_matrix", "observation_matrix", "transition_covariance",
                  "observation_covariance", "initial_state_mean", "initial_state_covariance")


def lgssm_spec(em_vars=None, transition_covariance_type: str = "full",
               observation_covariance_type: str = "full") -> ParamSpec:
    """``LGSSMParams``; ``em_vars`` (pykalman's names, all by default) are learned, the rest fixed.

    A ``diag`` noise covariance is a matrix with a positive diagonal (``d`` free values).
    """
    learned = set(_LGSSM_EM_VARS if em_vars is None else em_vars)
    kind = {"full": "spd", "diag": "diagonal"}
    fields = dict(zip(_LGSSM_FIELDS, ("real", "real", kind[transition_covariance_type],
                                      kind[observation_covariance_type], "real", "spd")))
    return ParamSpec({f: (c if v in learned else "fixed") for (f, c), v in zip(fields.items(), _LGSSM_EM_VARS)})


def lda_spec() -> ParamSpec:
    """``LDAParams``: ``lambda`` positive, its Dirichlet expectations derived, ``alpha`` and
    ``eta`` positive when they are estimated (None: the fixed prior)."""
    return ParamSpec({"components": "positive", "elog_beta": "derived", "exp_elog_beta": "derived",
                      "doc_topic_prior": "positive", "topic_word_prior": "positive"}, _lda_derive)


#: parameter type name -> spec with every field learnable (the estimator narrows it with its
#: configuration: hmmlearn's ``params``, the LGSSM's ``em_vars``)
SPECS: dict[str, ParamSpec] = {
    "GMMParams": gmm_spec(),
    "GaussianHMMParams": hmm_spec(),
    "CategoricalHMMParams": categorical_hmm_spec(),
    "LGSSMParams": lgssm_spec(),
    "LDAParams": lda_spec(),
}
