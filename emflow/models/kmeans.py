"""k-means (hard EM) math for initialisation: pure NumPy.

``kmeans_plusplus`` seeds centres on an in-memory sample; ``e_step`` / ``m_step`` run
Lloyd iterations over partitions with additive statistics, like every EM family here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["KMeansStats", "FirstRestart", "seeding_rng", "kmeans_plusplus", "e_step", "m_step"]


class KMeansStats(NamedTuple):
    """Additive statistics of a Lloyd step.

    Attributes
    ----------
    counts : ndarray of shape (K,)
        Weighted number of rows nearest each centre.
    sums : ndarray of shape (K, d)
        Weighted sum of ``x - shift`` over those rows.
    inertia : ndarray of shape ()
        Weighted sum of squared distances to the nearest centre.
    """

    counts: np.ndarray
    sums: np.ndarray
    inertia: np.ndarray


class FirstRestart(np.random.Generator):
    """Restart 0 of an integer ``random_state``: the restart's usual generator, plus
    scikit-learn's own stream (``RandomState(random_state)``) for the k-means++ seeding, so
    that on data the seeding sees whole the components come out in scikit-learn's order."""

    sklearn_stream: np.random.RandomState


def seeding_rng(rng: np.random.Generator, n_sample: int, n_rows: int):
    """The stream k-means++ seeds from: scikit-learn's when it can be replayed exactly."""
    replay = isinstance(rng, FirstRestart) and n_sample >= n_rows
    return rng.sklearn_stream if replay else rng


def _sq_dist(Xc: np.ndarray, cc: np.ndarray) -> np.ndarray:
    d2 = np.einsum("ij,ij->i", Xc, Xc)[:, None] - 2.0 * Xc @ cc.T + np.einsum("kd,kd->k", cc, cc)
    return np.maximum(d2, 0.0)


def kmeans_plusplus(
    X: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator | np.random.RandomState,
    sample_weight: np.ndarray | None = None,
    n_local_trials: int | None = None,
) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur and Vassilvitskii; scikit-learn's variant).

    Parameters
    ----------
    X : ndarray of shape (m, d)
        An in-memory sample of rows.
    n_clusters : int
    rng : numpy Generator or RandomState
        Given a ``RandomState``, the draws are scikit-learn's ``_kmeans_plusplus``'s, one for
        one (the first centre by ``choice(m, p=w/sum(w))``, then ``n_local_trials`` uniforms
        scaled by the current potential), so on the same rows in the same order the centres
        come out the same and in the same order.
    sample_weight : ndarray of shape (m,) or None
    n_local_trials : int, default ``2 + int(log(n_clusters))``

    Returns
    -------
    indices : ndarray of shape (n_clusters,)
        Row indices into ``X`` of the chosen centres.
    """
    X = np.asarray(X, dtype=np.float64)
    m = X.shape[0]
    w = np.ones(m) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    Xc = X - np.average(X, axis=0, weights=w if w.sum() > 0 else None)
    x2 = np.einsum("ij,ij->i", Xc, Xc)
    first = rng.choice(m, p=w / w.sum()) if w.sum() > 0 else rng.choice(m)
    idx = [int(first)]
    closest = np.maximum(x2 - 2 * Xc @ Xc[first] + x2[first], 0.0)
    pot = closest @ w
    for _ in range(1, n_clusters):
        if pot <= 0:  # fewer distinct points than clusters: take any unused row
            rest = np.setdiff1d(np.arange(m), idx)
            idx.append(int(rng.choice(rest)) if rest.size else int(rng.choice(m)))
            continue
        cdf = np.cumsum(closest * w)
        cand = np.searchsorted(cdf, rng.random(n_local_trials) * pot)
        cand = np.minimum(cand, m - 1)
        d_cand = np.maximum(x2[None, :] - 2 * Xc[cand] @ Xc.T + x2[cand][:, None], 0.0)
        d_cand = np.minimum(closest[None, :], d_cand)
        pots = d_cand @ w
        best = int(np.argmin(pots))
        idx.append(int(cand[best]))
        closest = d_cand[best]
        pot = pots[best]
    return np.asarray(idx)


def e_step(X: np.ndarray, w: np.ndarray | None, centers: np.ndarray, shift: np.ndarray) -> KMeansStats:
    """Assign each row of a partition to its nearest centre; accumulate counts and sums.

    Parameters
    ----------
    X : ndarray of shape (n, d)
    w : ndarray of shape (n,) or None
    centers : ndarray of shape (K, d)
    shift : ndarray of shape (d,)
        Sums are taken about this point (the mean of the centres) for precision.
    """
    centers = np.asarray(centers, dtype=np.float64)
    K, d = centers.shape
    cc = centers - shift
    counts = np.zeros(K)
    sums = np.zeros((K, d))
    inertia = 0.0
    step = max(256, (1 << 22) // max(K + d, 1))
    for a in range(0, X.shape[0], step):
        Xc = np.asarray(X[a : a + step], dtype=np.float64) - shift
        d2 = _sq_dist(Xc, cc)
        lab = np.argmin(d2, axis=1)
        best = d2[np.arange(len(lab)), lab]
        wb = np.ones(len(lab)) if w is None else np.asarray(w[a : a + step], dtype=np.float64)
        counts += np.bincount(lab, weights=wb, minlength=K)
        onehot = np.zeros((len(lab), K))
        onehot[np.arange(len(lab)), lab] = wb
        sums += onehot.T @ Xc
        inertia += best @ wb
    return KMeansStats(counts, sums, np.asarray(inertia))


def m_step(stats: KMeansStats, centers: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """New centres; a centre that lost all its rows stays where it was (reported)."""
    centers = np.asarray(centers, dtype=np.float64)
    new = centers.copy()
    nonempty = stats.counts > 0
    new[nonempty] = shift + stats.sums[nonempty] / stats.counts[nonempty, None]
    return new, [int(k) for k in np.flatnonzero(~nonempty)]
