"""GaussianHMM(missing="marginalize"): exact EM over steps with NaN, against a brute-force
NumPy reference (a loop over steps and states) from the same start, every iteration."""

import numpy as np
import pytest
from scipy.special import logsumexp

from emflow import ConfigError, GaussianHMM
from emflow.errors import NonFiniteDataError
from emflow.storage.synthetic import make_hmm_params, sample_hmm

CTS = ("diag", "full", "tied", "spherical")
LENGTHS = [9, 6, 8]
K, D = 2, 3


def _data(ct, seed=3, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    X, _ = sample_hmm(make_hmm_params(K, D, "gaussian", ct, seed=1), lengths, rng)
    Xm = X.copy()
    Xm[rng.random(X.shape) < 0.3] = np.nan
    Xm[[2, 10, 11]] = np.nan  # steps with every value missing (two in a row)
    Xm[0] = X[0]
    return X, Xm


def _start(ct, X):
    means = np.nanmean(X, axis=0) + np.array([[-0.7, 0.2, 0.4], [0.6, -0.3, -0.2]])
    full = np.array([[[1.0, 0.3, 0.1], [0.3, 1.5, -0.2], [0.1, -0.2, 0.8]],
                     [[0.9, -0.1, 0.0], [-0.1, 0.7, 0.2], [0.0, 0.2, 1.2]]])
    cov = {"full": full, "tied": full[0], "diag": np.array([[1.0, 1.5, 0.8], [0.9, 0.7, 1.2]]),
           "spherical": np.array([1.1, 0.8])}[ct]
    return np.array([0.6, 0.4]), np.array([[0.7, 0.3], [0.2, 0.8]]), means, cov


def _full(ct, cov):
    return {"full": lambda: cov, "tied": lambda: np.stack([cov] * K), "diag": lambda: np.stack([np.diag(c) for c in cov]),
            "spherical": lambda: np.stack([v * np.eye(D) for v in cov])}[ct]()


def _reference_iteration(X, lengths, ct, sp, tm, means, cov):
    """One EM iteration, brute force: returns (total log-likelihood, new parameters)."""
    S = _full(ct, cov)
    n = len(X)
    log_b = np.zeros((n, K))
    cond = [[None] * K for _ in range(n)]  # (x_hat, C) per step and state
    for t in range(n):
        o = ~np.isnan(X[t])
        m = ~o
        for k in range(K):
            if not o.any():
                continue
            Soo = S[k][np.ix_(o, o)]
            r = X[t, o] - means[k, o]
            _, logdet = np.linalg.slogdet(Soo)
            log_b[t, k] = -0.5 * (o.sum() * np.log(2 * np.pi) + logdet + r @ np.linalg.solve(Soo, r))
            xh = X[t].copy()
            C = np.zeros((D, D))
            if m.any():
                Smo = S[k][np.ix_(m, o)]
                xh[m] = means[k, m] + Smo @ np.linalg.solve(Soo, r)
                C[np.ix_(m, m)] = S[k][np.ix_(m, m)] - Smo @ np.linalg.solve(Soo, Smo.T)
            cond[t][k] = (xh, C)
    total, start, trans = 0.0, np.zeros(K), np.zeros((K, K))
    gamma = np.zeros((n, K))
    lA = np.log(tm)
    a0 = 0
    for L in lengths:
        lb = log_b[a0:a0 + L]
        alpha = np.zeros((L, K))
        beta = np.zeros((L, K))
        alpha[0] = np.log(sp) + lb[0]
        for t in range(1, L):
            alpha[t] = logsumexp(alpha[t - 1][:, None] + lA, axis=0) + lb[t]
        for t in range(L - 2, -1, -1):
            beta[t] = logsumexp(lA + (lb[t + 1] + beta[t + 1])[None], axis=1)
        ll = logsumexp(alpha[-1])
        total += ll
        g = np.exp(alpha + beta - ll)
        gamma[a0:a0 + L] = g
        start += g[0]
        for t in range(L - 1):
            trans += np.exp(alpha[t][:, None] + lA + (lb[t + 1] + beta[t + 1])[None] - ll)
        a0 += L
    N, s1, s2 = np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D))
    for t in range(n):
        for k in range(K):
            if cond[t][k] is None:  # every value missing: no emission statistics
                continue
            xh, C = cond[t][k]
            N[k] += gamma[t, k]
            s1[k] += gamma[t, k] * xh
            s2[k] += gamma[t, k] * (np.outer(xh, xh) + C)
    new_sp = start / start.sum()
    new_tm = trans / trans.sum(axis=1, keepdims=True)
    mu = s1 / N[:, None]
    Ck = np.stack([s2[k] - np.outer(mu[k], s1[k]) - np.outer(s1[k], mu[k]) + N[k] * np.outer(mu[k], mu[k])
                   for k in range(K)])
    prior = 1e-2  # hmmlearn's default covars_prior (covars_weight 1, no means prior)
    if ct == "full":
        new_cov = (prior + Ck) / N[:, None, None]
    elif ct == "tied":
        new_cov = (prior + Ck.sum(axis=0)) / N.sum()
    else:
        diag = (prior + np.diagonal(Ck, axis1=1, axis2=2)) / np.maximum(N, 1e-5)[:, None]
        new_cov = diag if ct == "diag" else diag.mean(axis=1)
    return total, (new_sp, new_tm, mu, new_cov)


def _model(ct, start, **kw):
    kw = {"n_iter": 4, **kw}
    m = GaussianHMM(K, covariance_type=ct, tol=0.0, init_params="", missing="marginalize", **kw)
    m.startprob_, m.transmat_, m.means_, m.covars_ = start
    return m


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


# 1024 bytes: 42 steps of 3 values per partition, so the long sequence is cut across partitions
@pytest.mark.parametrize("partition_bytes,lengths", [(None, LENGTHS), (1024, [100, 30])], ids=["whole", "cut"])
@pytest.mark.parametrize("ct", CTS)
def test_matches_brute_force_every_iteration(ct, partition_bytes, lengths):
    _, Xm = _data(ct, lengths=lengths)
    start = _start(ct, Xm)
    seen = []
    m = _model(ct, start, partition_bytes=partition_bytes, scheduler="threads")
    m.fit(Xm, lengths, callbacks=[lambda ev: seen.append(ev.params)])
    if partition_bytes:
        assert m.fit_info_["partitions"] >= 3
    assert len(seen) == 4
    p = start
    for i, got in enumerate(seen):
        total, p = _reference_iteration(Xm, lengths, ct, *p)
        _close(m.monitor_.history[i], total)
        for a, b in zip((got.startprob, got.transmat, got.means, got.covars), p):
            _close(a, b)
    # scoring and decoding marginalise the same way (fitted parameters)
    total, _ = _reference_iteration(Xm, lengths, ct, *p)
    _close(m.score(Xm, lengths), total)
    post = m.predict_proba(Xm, lengths)
    assert post.shape == (len(Xm), K) and np.all(np.isfinite(post))
    _close(post.sum(axis=1), 1.0)
    states = m.predict(Xm, lengths)
    logprob, states2 = m.decode(Xm, lengths)
    np.testing.assert_array_equal(states, states2)
    assert np.isfinite(logprob) and logprob <= total


def _viterbi_reference(X, ct, sp, tm, means, cov):
    S = _full(ct, cov)
    out, a0, best = [], 0, 0.0
    for L in LENGTHS:
        lb = np.zeros((L, K))
        for t in range(L):
            o = ~np.isnan(X[a0 + t])
            for k in range(K):
                if o.any():
                    Soo, r = S[k][np.ix_(o, o)], X[a0 + t, o] - means[k, o]
                    lb[t, k] = -0.5 * (o.sum() * np.log(2 * np.pi) + np.linalg.slogdet(Soo)[1]
                                       + r @ np.linalg.solve(Soo, r))
        delta, back = np.log(sp) + lb[0], []
        for t in range(1, L):
            sc = delta[:, None] + np.log(tm)
            back.append(sc.argmax(axis=0))
            delta = sc.max(axis=0) + lb[t]
        path = [int(delta.argmax())]
        for b in reversed(back):
            path.append(int(b[path[-1]]))
        out.extend(reversed(path))
        best += delta.max()
        a0 += L
    return best, np.array(out)


@pytest.mark.parametrize("ct", ["full", "spherical"])
def test_decode_matches_brute_force(ct):
    _, Xm = _data(ct)
    start = _start(ct, Xm)
    m = _model(ct, start)
    logprob, states = m.decode(Xm, LENGTHS)
    ref_lp, ref_states = _viterbi_reference(Xm, ct, *start)
    _close(logprob, ref_lp)
    np.testing.assert_array_equal(states, ref_states)


@pytest.mark.parametrize("ct", CTS)
def test_no_nan_is_the_complete_data_fit(ct):
    X, _ = _data(ct)
    kw = dict(covariance_type=ct, n_iter=5, tol=0.0, random_state=0)
    a = GaussianHMM(K, **kw).fit(X, LENGTHS)
    b = GaussianHMM(K, missing="marginalize", **kw).fit(X, LENGTHS)
    for name in ("startprob_", "transmat_", "means_", "_covars_"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.monitor_.history == b.monitor_.history
    assert a.score(X, LENGTHS) == b.score(X, LENGTHS)


def test_fit_from_data_initialisation():
    _, Xm = _data("diag")
    m = GaussianHMM(K, covariance_type="full", n_iter=5, random_state=0, missing="marginalize").fit(Xm, LENGTHS)
    assert np.all(np.isfinite(m.means_)) and np.all(np.isfinite(m.covars_))
    h = m.monitor_.history
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(h, h[1:]))  # EM never decreases the likelihood


def test_bad_option_and_nan_without_it():
    _, Xm = _data("diag")
    with pytest.raises(ConfigError, match="missing"):
        GaussianHMM(K, missing="drop").fit(Xm, LENGTHS)
    with pytest.raises(NonFiniteDataError):
        GaussianHMM(K, n_iter=2).fit(Xm, LENGTHS)


def test_zarr_input_output_and_save_load(tmp_path):
    from emflow.storage.sequences import write_sequences

    _, Xm = _data("diag")
    start = _start("diag", Xm)
    path = write_sequences(tmp_path / "seqs.zarr", Xm, np.concatenate([[0], np.cumsum(LENGTHS)]))
    m = _model("diag", start, n_iter=3).fit(path)
    ref = _model("diag", start, n_iter=3).fit(Xm, LENGTHS)
    _close(m.means_, ref.means_)
    _close(m._covars_, ref._covars_)
    g = m.predict_proba(path, out=tmp_path / "post.zarr")
    _close(np.asarray(g["values"][:]), ref.predict_proba(Xm, LENGTHS))
    loaded = GaussianHMM.load(m.save(tmp_path / "model"))
    assert loaded.missing == "marginalize"
    _close(loaded.score(path), ref.score(Xm, LENGTHS))
