"""Linear-Gaussian state-space model math (Kalman filter, RTS smoother, EM): pure NumPy/SciPy.

The model, for each sequence ``y_1..y_T``::

    z_1 ~ N(mu0, V0)
    z_t = A z_{t-1} + w_t,   w_t ~ N(0, Q)        (t = 2..T)
    y_t = C z_t + v_t,       v_t ~ N(0, R)        (t = 1..T)

One EM iteration (Shumway and Stoffer, 1982; Ghahramani and Hinton, 1996) is::

    stats  = e_step(values_p, offsets_p, params)  # Kalman filter + RTS smoother per sequence
    total  = add(stats_1, ..., stats_P)           # field-wise sums (emflow.stats.add)
    params = m_step(total, params, em_vars, ...)  # closed form

Nothing here knows about Dask, Zarr or Prefect.

Missing observations are NaN entries of ``y_t``. The filter updates with the observed
components only (the sub-blocks ``C_o``, ``R_oo``) and skips the update when a whole step is
missing. For the M-step of ``C`` and ``R`` a step with *some* components observed counts as a
complete step whose missing components are latent: their conditional moments given ``z_t``
and the observed components (under the current ``R``) enter the sums (Shumway and Stoffer,
*Time Series Analysis and Its Applications*, section 6.4). A step with *no* component
observed carries no information about ``C`` or ``R`` and is left out of those sums (as
pykalman does). Both choices are exact EM for their complete data, so the log-likelihood
never decreases.

:func:`kalman_filter` and :func:`rts_smoother` here run one sequence (the reference). The
E-step's statistics and the filtered / smoothed states and log-likelihood of a partition's
sequences, filtered together or by the compiled kernel, are in :mod:`emflow.models.lgssm_stats`.

Shapes: ``k`` state dimension, ``p`` observation dimension, ``T`` steps of one sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError, FitFailedError
from ..stats import require_finite

__all__ = [
    "EM_VARS",
    "EM_VAR_ALIASES",
    "LGSSMParams",
    "LGSSMStats",
    "FilterResult",
    "SmootherResult",
    "kalman_filter",
    "rts_smoother",
    "e_step",
    "m_step",
    "empty_stats",
    "loglik_stats",
    "normalize_em_vars",
    "check_params",
    "sample",
    "forecast",
]

EM_VARS = (
    "transition_matrix",
    "observation_matrix",
    "transition_covariance",
    "observation_covariance",
    "initial_state_mean",
    "initial_state_covariance",
)
EM_VAR_ALIASES = {
    "A": "transition_matrix",
    "C": "observation_matrix",
    "Q": "transition_covariance",
    "R": "observation_covariance",
    "mu0": "initial_state_mean",
    "V0": "initial_state_covariance",
    # pykalman's plural names
    "transition_matrices": "transition_matrix",
    "observation_matrices": "observation_matrix",
}

_LOG_2PI = math.log(2.0 * math.pi)


class LGSSMParams(NamedTuple):
    """Parameters of a linear-Gaussian state-space model (all float64).

    Attributes
    ----------
    A : ndarray of shape (k, k)
        Transition matrix.
    C : ndarray of shape (p, k)
        Observation matrix.
    Q : ndarray of shape (k, k)
        Transition (process) noise covariance.
    R : ndarray of shape (p, p)
        Observation noise covariance.
    mu0 : ndarray of shape (k,)
        Mean of the first state ``z_1``.
    V0 : ndarray of shape (k, k)
        Covariance of the first state.
    """

    A: np.ndarray
    C: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    mu0: np.ndarray
    V0: np.ndarray


class LGSSMStats(NamedTuple):
    """Additive expected sufficient statistics over a set of sequences (all float64).

    Expectations are under the smoothed posterior ``p(z | y)`` of each sequence; sums run
    over sequences and over the steps named.

    Attributes
    ----------
    n_seq : ndarray of shape ()
        Number of sequences.
    n_steps : ndarray of shape ()
        Number of steps ``sum T``.
    n_obs_steps : ndarray of shape ()
        Steps with at least one observed component (the steps in ``zz_obs``, ``yz``, ``yy``).
    n_values : ndarray of shape (p,)
        Observed values per component.
    z1 : ndarray of shape (k,)
        ``sum E[z_1]``.
    z1z1 : ndarray of shape (k, k)
        ``sum E[z_1 z_1^T]``.
    z : ndarray of shape (k,)
        ``sum_{t=1..T} E[z_t]``.
    zz_prev : ndarray of shape (k, k)
        ``sum_{t=1..T-1} E[z_t z_t^T]``.
    zz_next : ndarray of shape (k, k)
        ``sum_{t=2..T} E[z_t z_t^T]``.
    zz_lag : ndarray of shape (k, k)
        ``sum_{t=2..T} E[z_t z_{t-1}^T]``.
    zz_obs : ndarray of shape (k, k)
        ``sum E[z_t z_t^T]`` over steps with at least one observed component.
    yz : ndarray of shape (p, k)
        ``sum E[y_t z_t^T]`` over the same steps (missing components in conditional expectation).
    yy : ndarray of shape (p, p)
        ``sum E[y_t y_t^T]`` over the same steps.
    loglik : ndarray of shape ()
        ``sum log p(y_obs)`` by the prediction-error decomposition.
    """

    n_seq: np.ndarray
    n_steps: np.ndarray
    n_obs_steps: np.ndarray
    n_values: np.ndarray
    z1: np.ndarray
    z1z1: np.ndarray
    z: np.ndarray
    zz_prev: np.ndarray
    zz_next: np.ndarray
    zz_lag: np.ndarray
    zz_obs: np.ndarray
    yz: np.ndarray
    yy: np.ndarray
    loglik: np.ndarray


class FilterResult(NamedTuple):
    """Kalman filter output for one sequence.

    Attributes
    ----------
    predicted_means : ndarray of shape (T, k)
        ``E[z_t | y_1..y_{t-1}]`` (``mu0`` at ``t = 1``).
    predicted_covariances : ndarray of shape (T, k, k)
    filtered_means : ndarray of shape (T, k)
        ``E[z_t | y_1..y_t]``.
    filtered_covariances : ndarray of shape (T, k, k)
    loglik : float
        ``log p(y_1..y_T)`` (observed components only).
    """

    predicted_means: np.ndarray
    predicted_covariances: np.ndarray
    filtered_means: np.ndarray
    filtered_covariances: np.ndarray
    loglik: float


class SmootherResult(NamedTuple):
    """Rauch-Tung-Striebel smoother output for one sequence.

    Attributes
    ----------
    means : ndarray of shape (T, k)
        ``E[z_t | y_1..y_T]``.
    covariances : ndarray of shape (T, k, k)
        ``Cov[z_t | y_1..y_T]``.
    lag_covariances : ndarray of shape (T, k, k)
        ``Cov[z_t, z_{t-1} | y_1..y_T]`` (entry 0 is zero).
    gains : ndarray of shape (T - 1, k, k)
        Smoother gains ``J_t = P_{t|t} A^T P_{t+1|t}^{-1}``.
    """

    means: np.ndarray
    covariances: np.ndarray
    lag_covariances: np.ndarray
    gains: np.ndarray


def _sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + (M.T if M.ndim == 2 else np.swapaxes(M, -1, -2)))


def empty_stats(k: int, p: int) -> LGSSMStats:
    """Statistics of no sequence (the identity of ``+``)."""
    z = np.zeros
    return LGSSMStats(z(()), z(()), z(()), z(p), z(k), z((k, k)), z(k), z((k, k)), z((k, k)), z((k, k)),
                      z((k, k)), z((p, k)), z((p, p)), z(()))


# -- parameters ------------------------------------------------------------------------
def normalize_em_vars(em_vars) -> frozenset:
    """The set of canonical parameter names EM learns (``"all"``, a name, or an iterable)."""
    if isinstance(em_vars, str):
        if em_vars == "all":
            return frozenset(EM_VARS)
        em_vars = [em_vars]
    try:
        items = list(em_vars)
    except TypeError:
        raise ConfigError(f"em_vars must be 'all' or a list of parameter names, got {em_vars!r}.") from None
    out = set()
    for v in items:
        name = EM_VAR_ALIASES.get(v, v)
        if name not in EM_VARS:
            raise ConfigError(
                f"Unknown em_vars entry {v!r}. Use 'all' or names from {list(EM_VARS)} "
                f"(or the short names {[a for a in EM_VAR_ALIASES if len(a) <= 3]})."
            )
        out.add(name)
    return frozenset(out)


def _check_spd(M: np.ndarray, name: str, allow_psd: bool = False) -> None:
    if not np.allclose(M, M.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(M).max()))):
        raise ConfigError(f"{name} must be symmetric.")
    ev = np.linalg.eigvalsh(_sym(M))
    if np.any(ev < 0) if allow_psd else np.any(ev <= 0):
        raise ConfigError(
            f"{name} must be positive {'semi-' if allow_psd else ''}definite (smallest eigenvalue "
            f"{ev.min():.3g}). Pass a covariance matrix, e.g. a scaled identity."
        )


def check_params(params: LGSSMParams) -> LGSSMParams:
    """Validate shapes and definiteness; returns float64 copies."""
    A, C, Q, R, mu0, V0 = (np.array(x, dtype=np.float64) for x in params)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ConfigError(f"transition_matrix must be square (k, k), got shape {A.shape}.")
    k = A.shape[0]
    if C.ndim != 2 or C.shape[1] != k:
        raise ConfigError(f"observation_matrix must have shape (n_features, {k}), got {C.shape}.")
    p = C.shape[0]
    for M, name, d in ((Q, "transition_covariance", k), (R, "observation_covariance", p),
                       (V0, "initial_state_covariance", k)):
        if M.shape != (d, d):
            raise ConfigError(f"{name} must have shape ({d}, {d}), got {M.shape}.")
        if not np.all(np.isfinite(M)):
            raise ConfigError(f"{name} holds NaN or infinite values.")
    if mu0.shape != (k,):
        raise ConfigError(f"initial_state_mean must have shape ({k},), got {mu0.shape}.")
    for M, name in ((A, "transition_matrix"), (C, "observation_matrix"), (mu0, "initial_state_mean")):
        if not np.all(np.isfinite(M)):
            raise ConfigError(f"{name} holds NaN or infinite values.")
    _check_spd(Q, "transition_covariance", allow_psd=True)
    _check_spd(R, "observation_covariance")
    _check_spd(V0, "initial_state_covariance", allow_psd=True)
    return LGSSMParams(A, C, Q, R, mu0, V0)


# -- inference for one sequence --------------------------------------------------------
def kalman_filter(Y: np.ndarray, params: LGSSMParams) -> FilterResult:
    """Kalman filter of one sequence with missing values.

    Parameters
    ----------
    Y : ndarray of shape (T, p)
        Observations; NaN entries are missing. A step with some components observed is
        updated with those components only; a fully missing step is not updated.
    params : LGSSMParams

    Returns
    -------
    FilterResult
        The covariance update is in Joseph form and every covariance is symmetrised; the
        innovation covariance is factorised by Cholesky (its log-determinant and solves).
    """
    A, C, Q, R, mu0, V0 = params
    Y = np.asarray(Y, dtype=np.float64)
    T, p = Y.shape
    k = A.shape[0]
    observed = ~np.isnan(Y)
    all_obs = observed.all(axis=1)
    any_obs = observed.any(axis=1)
    mp = np.empty((T, k))
    Pp = np.empty((T, k, k))
    mf = np.empty((T, k))
    Pf = np.empty((T, k, k))
    eye = np.eye(k)
    loglik = 0.0
    m, P = np.array(mu0, dtype=np.float64), _sym(np.array(V0, dtype=np.float64))
    for t in range(T):
        if t > 0:
            m = A @ m
            P = _sym(A @ P @ A.T + Q)
        mp[t], Pp[t] = m, P
        if not any_obs[t]:
            mf[t], Pf[t] = m, P
            continue
        if all_obs[t]:
            Co, Ro, yo = C, R, Y[t]
        else:
            o = observed[t]
            Co, Ro, yo = C[o], R[np.ix_(o, o)], Y[t, o]
        e = yo - Co @ m
        PCt = P @ Co.T
        S = _sym(Co @ PCt + Ro)
        try:
            L = np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            raise FitFailedError(
                f"The innovation covariance at step {t} is not positive definite; the observation "
                "covariance R is (near) singular. Use a larger reg_covar or scale the data."
            ) from None
        Li = np.linalg.inv(L)  # small and triangular; cheaper than scipy's per-call checks
        Kt = Li.T @ (Li @ PCt.T)  # K^T = S^{-1} C P, shape (q, k)
        w = Li @ e
        loglik -= 0.5 * (len(yo) * _LOG_2PI + 2.0 * np.log(np.diag(L)).sum() + w @ w)
        K = Kt.T
        m = m + K @ e
        IKC = eye - K @ Co
        P = _sym(IKC @ P @ IKC.T + K @ Ro @ Kt)
        mf[t], Pf[t] = m, P
    return FilterResult(mp, Pp, mf, Pf, float(loglik))


def _solve_spd(M: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``M^{-1} B`` for symmetric positive (semi-)definite ``M``; pseudo-inverse when singular."""
    try:
        return np.linalg.solve(M, B)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(M, hermitian=True) @ B


def rts_smoother(A: np.ndarray, filt: FilterResult) -> SmootherResult:
    """Rauch-Tung-Striebel smoother with lag-one cross-covariances for one sequence."""
    mp, Pp, mf, Pf, _ = filt
    T, k = mf.shape
    ms = np.empty_like(mf)
    Ps = np.empty_like(Pf)
    lag = np.zeros_like(Pf)
    J = np.empty((max(T - 1, 0), k, k))
    ms[-1], Ps[-1] = mf[-1], Pf[-1]
    for t in range(T - 2, -1, -1):
        Jt = _solve_spd(Pp[t + 1], A @ Pf[t]).T
        J[t] = Jt
        ms[t] = mf[t] + Jt @ (ms[t + 1] - mp[t + 1])
        Ps[t] = _sym(Pf[t] + Jt @ (Ps[t + 1] - Pp[t + 1]) @ Jt.T)
        lag[t + 1] = Ps[t + 1] @ Jt.T
    return SmootherResult(ms, Ps, lag, J)


def e_step(values: np.ndarray, offsets: np.ndarray, params: LGSSMParams) -> LGSSMStats:
    """Statistics of a partition of whole sequences.

    Parameters
    ----------
    values : ndarray of shape (n_steps, p)
        The partition's sequences, concatenated (NaN = missing).
    offsets : ndarray of shape (n_sequences + 1,)
        Local offsets, ``offsets[0] == 0``.
    params : LGSSMParams
    """
    # imported here: the batched statistics build on this module's filter and smoother
    from .lgssm_stats import partition_stats

    return partition_stats(values, offsets, params)


def loglik_stats(values: np.ndarray, offsets: np.ndarray, params: LGSSMParams) -> np.ndarray:
    """``[sum log p(y), n_steps, n_sequences]`` of a partition (filter only, the sequences
    filtered together: :func:`emflow.models.lgssm_stats.partition_loglik`)."""
    from .lgssm_stats import partition_loglik

    return np.array([partition_loglik(values, offsets, params), float(offsets[-1]), float(len(offsets) - 1)])


# -- M-step ----------------------------------------------------------------------------
def _solve_right(B: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``B M^{-1}`` for symmetric positive (semi-)definite ``M`` (pseudo-inverse if singular)."""
    return _solve_spd(M, B.T).T


def _finish_cov(S: np.ndarray, diagonal: bool, reg: float, name: str, report: dict) -> np.ndarray:
    S = _sym(S)
    if diagonal:
        S = np.diag(np.diag(S))
    if reg:
        S = S + reg * np.eye(len(S))
    ev_min = float(np.linalg.eigvalsh(S).min())
    scale = max(float(np.trace(S)) / len(S), 1e-300)
    if ev_min <= 1e-12 * scale:
        jitter = 1e-10 * scale - min(ev_min, 0.0)
        S = S + jitter * np.eye(len(S))
        report.setdefault("repaired_covariances", {})[name] = float(jitter)
    return S


def m_step(stats: LGSSMStats, params: LGSSMParams, em_vars: frozenset, *,
           transition_covariance_type: str = "full", observation_covariance_type: str = "full",
           reg_covar: float = 0.0) -> tuple[LGSSMParams, dict]:
    """Closed-form maximisation over the parameters in ``em_vars`` (the others held fixed).

    ``C`` is updated before ``R`` and ``A`` before ``Q`` and ``mu0`` before ``V0``, each
    covariance using the new matrix or mean, which maximises jointly over each pair.
    Diagonal covariances are the diagonals of the full updates. Returns ``(params, report)``;
    the report lists covariances that had to be repaired (not positive definite).
    """
    require_finite(stats, "state-space model")
    A, C, Q, R, mu0, V0 = params
    report: dict = {}
    n_seq = float(stats.n_seq)
    n_trans = float(stats.n_steps) - n_seq
    n_obs = float(stats.n_obs_steps)
    if n_obs > 0:
        if "observation_matrix" in em_vars:
            C = _solve_right(stats.yz, stats.zz_obs)
        if "observation_covariance" in em_vars:
            Cyz = C @ stats.yz.T
            S = stats.yy - Cyz - Cyz.T + C @ stats.zz_obs @ C.T
            R = _finish_cov(S / n_obs, observation_covariance_type == "diag", reg_covar,
                            "observation_covariance", report)
    elif em_vars & {"observation_matrix", "observation_covariance"}:
        report["skipped"] = report.get("skipped", []) + ["observation_matrix", "observation_covariance"]
    if n_trans > 0:
        if "transition_matrix" in em_vars:
            A = _solve_right(stats.zz_lag, stats.zz_prev)
        if "transition_covariance" in em_vars:
            AL = A @ stats.zz_lag.T
            S = stats.zz_next - AL - AL.T + A @ stats.zz_prev @ A.T
            Q = _finish_cov(S / n_trans, transition_covariance_type == "diag", reg_covar,
                            "transition_covariance", report)
    elif em_vars & {"transition_matrix", "transition_covariance"}:
        # every sequence has one step: nothing informs the dynamics
        report["skipped"] = report.get("skipped", []) + ["transition_matrix", "transition_covariance"]
    if "initial_state_mean" in em_vars:
        mu0 = stats.z1 / n_seq
    if "initial_state_covariance" in em_vars:
        mz = np.outer(mu0, stats.z1)
        S = (stats.z1z1 - mz - mz.T + n_seq * np.outer(mu0, mu0)) / n_seq
        V0 = _finish_cov(S, False, reg_covar, "initial_state_covariance", report)
    return LGSSMParams(A, C, Q, R, mu0, V0), report


# -- generation ------------------------------------------------------------------------
def sample(params: LGSSMParams, n_steps: int, rng: np.random.Generator,
           initial_state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one sequence: ``(states, observations)`` of shapes (T, k) and (T, p).

    ``initial_state`` (shape (k,)) fixes ``z_1`` instead of drawing it from ``N(mu0, V0)``.
    """
    A, C, Q, R, mu0, V0 = params
    k, p = A.shape[0], C.shape[0]

    def chol(M):
        w, U = np.linalg.eigh(_sym(M))
        return U * np.sqrt(np.clip(w, 0, None))  # works for semi-definite Q and V0

    LQ, LR, LV = chol(Q), chol(R), chol(V0)
    Z = np.empty((n_steps, k))
    Z[0] = mu0 + LV @ rng.standard_normal(k) if initial_state is None else initial_state
    eq = rng.standard_normal((n_steps, k))
    for t in range(1, n_steps):
        Z[t] = A @ Z[t - 1] + LQ @ eq[t]
    Yv = Z @ C.T + rng.standard_normal((n_steps, p)) @ LR.T
    return Z, Yv


def forecast(params: LGSSMParams, mean: np.ndarray, cov: np.ndarray, n_steps: int):
    """Predict ``n_steps`` ahead from a state distribution ``N(mean, cov)`` at step ``t``.

    Returns ``(state_means (n, k), state_covs (n, k, k), obs_means (n, p), obs_covs (n, p, p))``
    for steps ``t + 1 .. t + n``.
    """
    A, C, Q, R, _, _ = params
    k, p = A.shape[0], C.shape[0]
    sm, sc = np.empty((n_steps, k)), np.empty((n_steps, k, k))
    om, oc = np.empty((n_steps, p)), np.empty((n_steps, p, p))
    m, P = np.asarray(mean, dtype=np.float64), np.asarray(cov, dtype=np.float64)
    for i in range(n_steps):
        m = A @ m
        P = _sym(A @ P @ A.T + Q)
        sm[i], sc[i] = m, P
        om[i], oc[i] = C @ m, _sym(C @ P @ C.T + R)
    return sm, sc, om, oc
