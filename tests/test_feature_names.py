"""pandas column names for the sequence families, as scikit-learn keeps and checks them: a fit
on a DataFrame (with ``lengths``) records ``feature_names_in_``, saved with the model; every
method that takes data warns or raises with scikit-learn's own messages when the names
differ, before any count check."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import emflow
from emflow.estimators import REGISTRY

pd = pytest.importorskip("pandas")

SEQUENCE_FAMILIES = sorted(name for name, cls in REGISTRY.items() if cls.data_kind == "sequences")
METHODS = ("score", "score_samples", "predict", "predict_proba", "decode", "filter", "smooth")


def _fitted(family, tmp_path=None):
    cls = REGISTRY[family]
    (X, lengths), kw = cls._contract_example(np.random.default_rng(0))
    kw = {**kw, **({"n_iter": 2} if "n_iter" in cls().get_params() else {"max_iter": 2})}
    X = np.asarray(X)
    cols = [f"c{j}" for j in range(X.shape[1])]
    df = pd.DataFrame(X, columns=cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.EmflowConvergenceWarning)
        named = cls(**kw).fit(df, lengths)
        bare = cls(**kw).fit(X, lengths)
    return cls, named, bare, X, df, lengths


def test_every_sequence_family_is_covered():
    assert {"gaussian_hmm", "categorical_hmm", "linear_gaussian_ssm"} <= set(SEQUENCE_FAMILIES)


@pytest.mark.parametrize("family", SEQUENCE_FAMILIES)
def test_fit_keeps_the_names_and_every_method_checks_them(family, tmp_path):
    cls, named, bare, X, df, lengths = _fitted(family)
    cols = list(df.columns)
    assert named.feature_names_in_.dtype == object and list(named.feature_names_in_) == cols
    assert not hasattr(bare, "feature_names_in_")
    assert named.score(df, lengths) == pytest.approx(bare.score(X, lengths), rel=1e-12)  # the same fit
    methods = [m for m in METHODS if hasattr(named, m)]
    assert "score" in methods and len(methods) >= 3
    renamed = df.rename(columns={cols[0]: "other"})
    for m in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # the fitted names: no warning
            getattr(named, m)(df, lengths)
        with pytest.raises(ValueError, match="Feature names unseen at fit time:\n- other"):
            getattr(named, m)(renamed, lengths)
        if len(cols) > 1:
            with pytest.raises(ValueError, match="Feature names must be in the same order as they were in fit"):
                getattr(named, m)(df[cols[::-1]], lengths)
        with pytest.warns(UserWarning, match="X does not have valid feature names, but " + cls.__name__):
            getattr(named, m)(X, lengths)
        with pytest.warns(UserWarning, match="X has feature names, but " + cls.__name__):
            getattr(bare, m)(df, lengths)
    back = emflow.load(named.save(str(tmp_path / "model.zarr")))  # saved with the model
    assert list(back.feature_names_in_) == cols
    with pytest.raises(ValueError, match="Feature names unseen at fit time"):
        back.score(renamed, lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.EmflowConvergenceWarning)
        named.fit(X, lengths)  # a refit on data without names drops them, as in scikit-learn
    assert not hasattr(named, "feature_names_in_")
