"""What a fitted Gaussian mixture computes on one partition: per-row outputs and the total
log-likelihood (rows with NaN are marginalised: :mod:`emflow.models.gmm_missing`)."""

from __future__ import annotations

import numpy as np

from ..models import gmm_missing as GM
from .outputs import write_rows_at

__all__ = ["loglik_stats", "predict_part"]


def loglik_stats(X, w, params):
    """``[sum_i w_i log p(x_i), sum_i w_i, rows]`` of one partition (additive)."""
    lse, _ = GM.posterior(X, params)
    s = lse.sum() if w is None else lse @ np.asarray(w, dtype=np.float64)
    return np.array([s, float(len(X)) if w is None else float(np.sum(w)), float(len(X))])


def predict_part(X, w, params, kind: str, out_url: str | None, start: int):
    """One partition's ``kind`` ("labels", "proba", "score", "impute"), returned, or written
    at row ``start`` of the Zarr array ``out_url``."""
    if kind == "impute":
        result = GM.impute(X, params, start)
    else:
        lse, resp = GM.posterior(X, params, start)
        result = {"labels": lambda: resp.argmax(axis=1), "proba": lambda: resp, "score": lambda: lse}[kind]()
    if out_url is None:
        return result
    write_rows_at(out_url, start, result)
    return None
