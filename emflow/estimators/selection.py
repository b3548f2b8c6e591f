"""Model selection for Gaussian mixtures with shared passes over the data.

On data larger than memory each pass over the data is the expensive part. Fitting a grid
of candidates (components x covariance types, each with ``n_init`` restarts) one after
another reads the data once per iteration of every one of them. Here every *unit* (one
restart of one candidate) advances in lockstep: one read of a partition serves the E-step
(or k-means step, or sampling) of every unit still running, and the statistics of all of
them travel back as one tuple, tree-reduced with the same :func:`emflow.stats.add`. A unit
that converges drops out of the next pass; the pass continues while any unit runs.

Every unit follows exactly the trajectory ``GaussianMixture(K, covariance_type=ct,
random_state=seed, n_init=R).fit(data)`` would follow (same random draws, same k-means
refinement, same EM iterations), so the selected models equal the ones fitted separately.
Only ``init_params="kmeans"`` (the default) is shared this way.

:func:`select_by_variational` chooses the number of components in one fit instead: a
:class:`~emflow.BayesianGaussianMixture` with the most components allowed, whose components
with an expected weight below a threshold are reported as unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..execution.cluster import engine_for
from .em import EMRun, run_em_group
from ..execution.engine import take_rows
from ..errors import ConfigError
from .mixture import KMEANS_MAX_ITER, KMEANS_TOL, SAMPLE_ROWS, GaussianMixture, GMMFamily
from ..models import gmm as G
from ..models import kmeans as KM

__all__ = ["SelectionResult", "VariationalSelection", "select_by_variational", "select_gaussian_mixture"]


def _take_many(X, w, rows_per_unit: list):
    return tuple(take_rows(X, w, r) for r in rows_per_unit)


def _kmeans_many(X, w, centers: tuple, shifts: tuple):
    return tuple(KM.e_step(X, w, c, s) for c, s in zip(centers, shifts))


def _hard_many(X, w, centers: tuple, shifts: tuple, cov_types: tuple):
    return tuple(G.hard_stats(X, w, c, s, ct) for c, s, ct in zip(centers, shifts, cov_types))


def _loglik_many(X, w, params: tuple):
    out = []
    for p in params:
        lse, _ = G.posterior(X, p)
        out.append(np.asarray(lse.sum() if w is None else lse @ np.asarray(w, dtype=np.float64)))
    return tuple(out)


@dataclass
class _Unit:
    cand: int
    restart: int
    K: int
    ct: str
    centers: np.ndarray | None = None
    var: float = 0.0
    kmeans_done: bool = False
    kmeans_iters: int = 0
    params: Any = None
    history: list = field(default_factory=list)
    result: Any = None
    converged: bool = False
    done: bool = False
    lower_bound: float = -math.inf


@dataclass
class SelectionResult:
    """Outcome of :func:`select_gaussian_mixture`.

    Attributes
    ----------
    models : list of GaussianMixture
        One fitted model per candidate, in grid order (components outer, covariance inner).
    table : list of dict
        Per candidate, in grid order (as ``models``): n_components, covariance_type,
        n_parameters, log_likelihood (total), bic, aic, converged, n_iter, best_restart.
        :meth:`ranked_table` gives the same rows ranked by BIC.
    best : int
        Index of the candidate with the lowest BIC.
    io : dict
        ``passes_shared`` and ``bytes_shared`` (what this run read), ``passes_sequential``
        and ``bytes_sequential`` (what fitting each candidate with ``GaussianMixture.fit``
        and then ``bic`` would have read: the same trajectories, one pass per step each),
        ``bytes_per_pass``, ``saved_fraction``, ``resident``.
    """

    models: list
    table: list
    best: int
    io: dict

    @property
    def best_model(self) -> GaussianMixture:
        return self.models[self.best]

    @property
    def ranking(self) -> list[int]:
        """Candidate indices ranked by BIC, lowest (best) first; equal BICs keep grid order
        (a stable sort) and a NaN BIC ranks last. ``ranking[0] == best``."""
        def key(i):
            bic = float(self.table[i]["bic"])
            return (math.isnan(bic), 0.0 if math.isnan(bic) else bic)

        return sorted(range(len(self.table)), key=key)

    def ranked_table(self) -> list[dict]:
        """The rows of :attr:`table` ranked by BIC (see :attr:`ranking`), each with ``rank``
        (1 = lowest BIC), ``grid_index`` (its place in :attr:`table`) and ``chosen``."""
        return [{"rank": r + 1, **self.table[i], "grid_index": i, "chosen": i == self.best}
                for r, i in enumerate(self.ranking)]


def select_gaussian_mixture(
    data,
    n_components: Sequence[int] = (1, 2, 3, 4),
    covariance_types: Sequence[str] = ("full",),
    *,
    sample_weight=None,
    n_init: int = 1,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    random_state: int | None = 0,
    scheduler=None,
    persist="auto",
    split_every: int = 8,
    callbacks: Iterable[Callable[[dict], None]] = (),
) -> SelectionResult:
    """Fit every (n_components, covariance_type) candidate with shared passes and rank by BIC.

    Parameters
    ----------
    data : Zarr path, zarr/dask array or array-like of shape (n_samples, n_features)
    n_components : sequence of int
    covariance_types : sequence of {"full", "tied", "diag", "spherical"}
    sample_weight : as in ``GaussianMixture.fit``
    n_init, tol, reg_covar, max_iter, random_state
        As in :class:`GaussianMixture`; every candidate uses ``random_state``.
    scheduler, persist, split_every
        Where to run (see :mod:`emflow.execution.cluster`).
    callbacks : iterable of callables
        Each called after every shared EM pass with ``{"pass": i, "active": n_units_running,
        "units": [(n_components, covariance_type, restart, iteration, log_likelihood), ...]}``.

    Returns
    -------
    SelectionResult
    """
    Ks = [int(k) for k in n_components]
    cts = list(covariance_types)
    if not Ks or not cts:
        raise ConfigError("Give at least one value of n_components and one covariance type.")
    proto = [GaussianMixture(K, covariance_type=ct, tol=tol, reg_covar=reg_covar, max_iter=max_iter,
                             n_init=n_init, random_state=random_state, split_every=split_every)
             for K in Ks for ct in cts]
    for gm in proto:
        gm._validate_params()
        gm._check_feature_names(data, True)  # a DataFrame's column names, as fit keeps them
    if isinstance(random_state, (np.random.Generator, np.random.RandomState)):
        raise ConfigError("select_gaussian_mixture needs an int or None random_state (each candidate "
                          "starts from the same seed).")
    callbacks = list(callbacks)
    with engine_for(scheduler, split_every=split_every) as engine:
        loaded = engine.open(data, sample_weight, min_rows=max(Ks), persist=persist)
        try:
            return _select(engine, loaded, proto, n_init, tol, reg_covar, max_iter, callbacks)
        finally:
            loaded.release()


def _select(engine, loaded, proto, n_init, tol, reg, max_iter, callbacks) -> SelectionResult:
    N = loaded.data.n_rows
    bytes_per_pass = loaded.data.nbytes + (8 * N if loaded.data.weighted else 0)
    passes = 1  # the opening scan (validation + fingerprint)
    # restart r of candidate c draws from the rng GaussianMixture.fit gives its restart r
    seeds = [gm._seed() for gm in proto]
    units: list[_Unit] = []

    # -- initialisation: shared sampling pass per restart round, joint k-means, joint hard stats
    for r in range(n_init):
        round_units = [_Unit(c, r, gm.n_components, gm.covariance_type) for c, gm in enumerate(proto)]
        rngs = [gm._restart_rng(seeds[c], r) for c, gm in enumerate(proto)]
        idx = []
        for u in round_units:
            n = min(max(SAMPLE_ROWS, 50 * u.K), N)
            idx.append(np.sort(rngs[u.cand].choice(N, size=n, replace=False)))
        per = []
        for a, b in loaded.data.bounds:
            per.append([ix[np.searchsorted(ix, a):np.searchsorted(ix, b)] - a for ix in idx])
        parts = engine.map(_take_many, loaded, per_partition=per)
        passes += 1
        for j, u in enumerate(round_units):
            Xs = np.concatenate([p[j][0] for p in parts])
            ws = None if parts[0][j][1] is None else np.concatenate([p[j][1] for p in parts])
            u.centers = Xs[KM.kmeans_plusplus(Xs, u.K, KM.seeding_rng(rngs[u.cand], len(Xs), N), ws)]
            u.var = np.average((Xs - Xs.mean(0)) ** 2, axis=0, weights=ws).mean() if len(Xs) > 1 else 0.0
        units += round_units

    for _ in range(KMEANS_MAX_ITER):
        active = [u for u in units if not u.kmeans_done]
        if not active:
            break
        shifts = tuple(u.centers.mean(axis=0) for u in active)
        stats = engine.map_reduce(_kmeans_many, loaded, tuple(u.centers for u in active), shifts)
        passes += 1
        for u, st, shift in zip(active, stats, shifts):
            new, _ = KM.m_step(st, u.centers, shift)
            moved = float(np.sum((new - u.centers) ** 2))
            u.centers = new
            u.kmeans_iters += 1
            if moved <= KMEANS_TOL * u.var:
                u.kmeans_done = True
    shifts = tuple(u.centers.mean(axis=0) for u in units)
    stats = engine.map_reduce(_hard_many, loaded, tuple(u.centers for u in units), shifts,
                              tuple(u.ct for u in units))
    passes += 1
    for u, st, shift in zip(units, stats, shifts):
        u.params, _ = G.m_step(st, shift, u.ct, reg)

    # -- EM in lockstep (emflow.em.run_em_group): one read per pass serves every unit still running
    em_passes = [0]

    def on_pass(n: int, events) -> None:
        em_passes[0] = n
        info = {"pass": n, "active": sum(not ev.converged and ev.iteration < max_iter for _, ev in events),
                "units": [(units[i].K, units[i].ct, units[i].restart, ev.iteration, ev.log_likelihood)
                          for i, ev in events]}
        for cb in callbacks:
            cb(info)

    runs = [EMRun(GMMFamily(u.ct, float(reg)), u.params, tol=tol, max_iter=max_iter, init=u.restart) for u in units]
    for u, res in zip(units, run_em_group(engine, loaded, runs, on_pass=on_pass)):
        u.result, u.params, u.history = res, res.params, list(res.history)
        u.converged, u.lower_bound, u.done = bool(res.converged), float(res.lower_bound), True
    passes += em_passes[0]

    # -- best restart per candidate (the first of equal bounds, as GaussianMixture does)
    best_units = []
    for c in range(len(proto)):
        best = None
        for u in (u for u in units if u.cand == c):
            if best is None or u.lower_bound > best.lower_bound:
                best = u
        best_units.append(best)
    totals = engine.map_reduce(_loglik_many, loaded, tuple(u.params for u in best_units))
    passes += 1

    models, table = [], []
    for c, (gm, u, tot) in enumerate(zip(proto, best_units, totals)):
        # the fitted state exactly as GaussianMixture.fit sets it (the estimator base's)
        gm._set_fit_result(u.result, loaded, engine, restarts=n_init,
                           selection={"restart": u.restart, "shared_passes": True})
        p = gm._n_parameters()
        total = float(tot)
        table.append({
            "n_components": u.K, "covariance_type": u.ct, "n_parameters": int(p),
            "log_likelihood": total, "bic": -2 * total + p * math.log(N), "aic": -2 * total + 2 * p,
            "converged": bool(u.converged), "n_iter": len(u.history), "best_restart": u.restart,
        })
        models.append(gm)
    best = min(range(len(table)), key=lambda i: table[i]["bic"])

    # one GaussianMixture.fit per candidate: scan, then per restart one sampling pass, its
    # k-means passes, one hard-assignment pass and its EM passes; then one pass for bic()
    seq = sum(1 + sum(1 + u.kmeans_iters + 1 + len(u.history) for u in units if u.cand == c) + 1
              for c in range(len(proto)))
    io = {
        "passes_shared": passes, "passes_sequential": seq, "bytes_per_pass": int(bytes_per_pass),
        "bytes_shared": int(passes * bytes_per_pass), "bytes_sequential": int(seq * bytes_per_pass),
        "saved_fraction": 1.0 - passes / seq, "resident": bool(loaded.resident),
        "units": len(units),
    }
    return SelectionResult(models, table, best, io)


@dataclass
class VariationalSelection:
    """Outcome of :func:`select_by_variational`.

    Attributes
    ----------
    model : BayesianGaussianMixture
        The fit with ``max_components`` components.
    table : list of dict
        Per component: ``component``, ``weight`` (expected), ``used`` (weight >= threshold).
    """

    model: Any
    table: list

    @property
    def best_model(self):
        return self.model

    @property
    def n_components(self) -> int:
        """Components in use (``model.n_components_used_``)."""
        return int(self.model.n_components_used_)


def select_by_variational(data, max_components: int, covariance_type: str = "full", *, weight_threshold: float = 0.01,
                          sample_weight=None, **params) -> VariationalSelection:
    """Choose the number of components in one variational fit (no grid).

    Parameters
    ----------
    data : as in ``BayesianGaussianMixture.fit``
    max_components : int
        ``n_components`` of the fit: the most components the data may use.
    covariance_type : {"full", "tied", "diag", "spherical"}
    weight_threshold : float
        A component whose expected weight is below it is reported as unused.
    sample_weight : as in ``fit``
    **params
        Any other :class:`~emflow.BayesianGaussianMixture` parameter (priors, ``random_state``,
        ``scheduler``...).

    Returns
    -------
    VariationalSelection
    """
    from .bayesian_mixture import BayesianGaussianMixture

    model = BayesianGaussianMixture(n_components=int(max_components), covariance_type=covariance_type,
                                    weight_threshold=weight_threshold, **params)
    model.fit(data, sample_weight=sample_weight)
    table = [{"component": k, "weight": float(w), "used": bool(u)}
             for k, (w, u) in enumerate(zip(model.weights_, model.used_components_))]
    return VariationalSelection(model, table)
