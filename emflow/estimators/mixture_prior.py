"""``GaussianMixture(prior=...)``: MAP estimation under mclust's conjugate prior.

The math is :mod:`emflow.models.gmm_prior`. Here: checking the ``prior`` parameter, the one
extra pass that gives the data's mean and covariance (the defaults), and the EM family whose
M-step is the MAP one and whose objective is the log posterior per unit weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError
from ..models import gmm as G
from ..models import gmm_prior as P

__all__ = ["PRIOR_KEYS", "check_prior", "build_prior", "MAPFamily"]

PRIOR_KEYS = ("mean", "shrinkage", "dof", "scale", "weight_concentration", "strength")


def _bad(what: str) -> ConfigError:
    return ConfigError(f"prior: {what} (prior is None, 'conjugate' or a dict with keys among "
                       f"{', '.join(PRIOR_KEYS)}; see GaussianMixture's docstring).")


def _real(cfg: dict, key: str, low: float, strict: bool) -> None:
    v = cfg.get(key)
    if v is None:
        return
    ok = isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v) and (v > low if strict else v >= low)
    if not ok:
        raise _bad(f"{key} must be a finite number {'>' if strict else '>='} {low:g}, got {v!r}")


def check_prior(prior, covariance_type: str, d: int | None = None) -> dict | None:
    """The prior's settings as a dict (None: no prior); a ConfigError naming what is wrong.
    With ``d`` (the data's features) the shapes and the degrees of freedom are checked too."""
    if prior is None:
        return None
    if isinstance(prior, str):
        if prior != "conjugate":
            raise _bad(f"unknown prior {prior!r}")
        return {}
    if not isinstance(prior, dict):
        raise _bad(f"got a {type(prior).__name__}")
    unknown = sorted(set(prior) - set(PRIOR_KEYS))
    if unknown:
        raise _bad(f"unknown key(s) {', '.join(map(repr, unknown))}")
    cfg = dict(prior)
    _real(cfg, "shrinkage", 0.0, True)
    _real(cfg, "weight_concentration", 1.0, False)
    _real(cfg, "strength", 0.0, False)
    ct = covariance_type
    dof_low = (d - 1.0 if d is not None else -np.inf) if ct in ("full", "tied") else 0.0
    _real(cfg, "dof", max(dof_low, 0.0), True)
    if cfg.get("mean") is not None:
        m = np.asarray(cfg["mean"], dtype=np.float64)
        if m.ndim != 1 or (d is not None and m.shape != (d,)) or not np.all(np.isfinite(m)):
            raise _bad(f"mean must be a finite vector of shape ({d if d is not None else 'n_features'},), "
                       f"got shape {m.shape}")
        cfg["mean"] = m
    if cfg.get("scale") is not None:
        sc = np.asarray(cfg["scale"], dtype=np.float64)
        want = {"full": 2, "tied": 2, "diag": 1, "spherical": 0}[ct]
        dd = d if d is not None else (sc.shape[0] if sc.ndim else None)
        shape = {2: (dd, dd), 1: (dd,), 0: ()}[want]
        if sc.ndim != want or sc.shape != shape:
            raise _bad(f"scale for covariance_type={ct!r} must have shape {shape}, got {sc.shape}")
        if want == 2:
            if not (np.all(np.isfinite(sc)) and np.allclose(sc, sc.T)) or np.linalg.eigvalsh(sc)[0] <= 0:
                raise _bad("scale must be symmetric positive definite")
        elif not np.all(np.isfinite(sc) & (sc > 0)):
            raise _bad("scale must be positive")
        cfg["scale"] = sc
    return cfg


def _moments(X, w):
    """A partition's (weight, weighted mean, scatter about it)."""
    X = np.asarray(X, dtype=np.float64)
    ww = np.ones(len(X)) if w is None else np.asarray(w, dtype=np.float64)
    n = float(ww.sum())
    mean = ww @ X / n if n > 0 else np.zeros(X.shape[1])
    Xc = X - mean
    return n, mean, (Xc * ww[:, None]).T @ Xc


def data_moments(engine, loaded) -> tuple[np.ndarray, np.ndarray]:
    """The data's (weighted) mean and covariance, one pass, partitions merged with Chan et
    al.'s update (no cancellation on data far from zero)."""
    n, mean, M2 = 0.0, None, None
    for nb, mb, Mb in engine.map(_moments, loaded):
        if nb <= 0:
            continue
        if mean is None:
            n, mean, M2 = nb, mb, Mb
            continue
        delta = mb - mean
        tot = n + nb
        M2 = M2 + Mb + np.outer(delta, delta) * (n * nb / tot)
        mean = mean + delta * (nb / tot)
        n = tot
    return mean, M2 / n


def build_prior(est, engine, loaded) -> P.ConjugatePrior | None:
    """The prior of ``est`` for the data ``loaded`` (mclust's defaults where not given)."""
    cfg = check_prior(getattr(est, "prior", None), est.covariance_type, loaded.data.n_features)
    if cfg is None:
        return None
    if getattr(est, "missing", "error") == "marginalize":  # moments of the mean-filled data
        from .mixture_missing import filling_engine

        engine = filling_engine(engine, loaded)
    mean, cov = data_moments(engine, loaded)
    return P.default_prior(mean, cov, est.n_components, est.covariance_type, **cfg)


@dataclass(frozen=True)
class MAPFamily:
    """A Gaussian mixture family ``base`` (its E-step) with the MAP M-step under ``prior``;
    the objective is the log posterior per unit weight (up to a constant)."""

    base: Any
    covariance_type: str
    reg_covar: float
    prior: P.ConjugatePrior
    takes_context: ClassVar[bool] = True

    def e_step(self, X, w, params, context=None):
        return self.base.e_step(X, w, params)

    def m_step(self, stats, params):
        return P.m_step(stats, G.shift_of(params), self.covariance_type, self.reg_covar, self.prior)

    def objective(self, stats, params) -> float:
        return (float(stats.loglik) + P.log_prior(params, self.prior)) / float(stats.weight_sum)
