"""Fit flows of the HMM, linear-Gaussian SSM and LDA families under a temporary Prefect server.

Each flow's model is checked against the same fit made by the library directly; the
dashboard side (artifacts by key and type, log lines) through the Prefect API; resuming
after a crash against an uninterrupted library fit.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

pytest.importorskip("prefect")

import emflow  # noqa: E402
from emflow.storage.checkpoint import (  # noqa: E402
    Checkpoint,
    checkpoint_path,
    read_checkpoint,
    write_checkpoint,
)
from emflow.storage.synthetic import write_hmm, write_lda, write_lgssm  # noqa: E402

from test_flows import _artifacts, _crash_after, _logs, _rel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")


@pytest.fixture(scope="session")
def family_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("famdata")
    return {
        "hmm": write_hmm(d / "hmm.zarr", 60, 3, 2, "gaussian", "diag", min_length=10, max_length=60, seed=4,
                         sequences_per_chunk=15),
        "hmm_heldout": write_hmm(d / "hmm_ho.zarr", 20, 3, 2, "gaussian", "diag", min_length=10, max_length=60,
                                 seed=4, sequences_per_chunk=10),
        "cat": write_hmm(d / "cat.zarr", 60, 2, 4, "categorical", min_length=10, max_length=60, seed=5,
                         sequences_per_chunk=15),
        "lgssm": write_lgssm(d / "lgssm.zarr", 12, 2, 3, min_length=20, max_length=60, seed=6, chunk_steps=200,
                             missing_fraction=0.05),
        "lda": write_lda(d / "lda.zarr", 300, 60, 3, seed=7, chunk_docs=100),
        "lda_heldout": write_lda(d / "lda_ho.zarr", 100, 60, 3, seed=8, chunk_docs=100),
    }


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def _rows(artifact):
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def _check_monitoring(run_id, prefix, model, column="log_likelihood", label="mean log-likelihood per step",
                      resumed_from=0):
    """The artifacts and log lines every family's fit flow publishes (the table covers every
    iteration; a resumed run logs those it ran)."""
    arts = _artifacts(run_id)
    key = f"{prefix}-fit-{column.replace('_', '-')}"
    assert {f"{prefix}-fit-progress", key, f"{prefix}-fit-summary"} <= set(arts), set(arts)
    prog = arts[f"{prefix}-fit-progress"][-1]
    assert prog.type == "progress" and float(prog.data) == pytest.approx(100.0)
    rows = _rows(arts[key][-1])
    assert arts[key][-1].type == "table"
    assert [r["iteration"] for r in rows] == list(range(1, model.n_iter_ + 1))
    assert [r[column] for r in rows] == model.history_
    assert rows[0]["change"] is None
    assert rows[-1]["change"] == pytest.approx(model.history_[-1] - model.history_[-2])
    summary = arts[f"{prefix}-fit-summary"][-1]
    assert summary.type == "markdown"
    assert "data:image/png;base64," in summary.data
    assert model.fit_info_["fingerprint"] in summary.data
    assert f"{model.lower_bound_:.10g}" in summary.data
    assert ("**Converged**" if model.converged_ else "**Did not converge**") in summary.data
    logs = _logs(run_id, f"iteration {model.n_iter_}: {label}")
    for i in range(1, model.n_iter_ + 1):
        assert any(m.startswith(f"iteration {i}: {label} ") for m in logs) == (i > resumed_from), (i, logs)
    return arts


# --- checkpoints of every family ------------------------------------------------------------

def test_checkpoint_round_trip_every_family(tmp_path):
    from emflow.models.lda import make_params
    from emflow.storage.synthetic import make_hmm_params, make_lgssm_params

    rng = np.random.default_rng(0)
    for i, p in enumerate([make_hmm_params(3, 2, "gaussian", covariance_type="full"),
                           make_hmm_params(3, 5, "categorical"), make_lgssm_params(2, 3),
                           make_params(rng.gamma(100, 0.01, (3, 7))),
                           make_params(rng.gamma(100, 0.01, (3, 7)), rng.uniform(0.05, 0.5, 3))]):
        path = tmp_path / f"c{i}.npz"
        write_checkpoint(path, Checkpoint(p, [-2.0, -1.5], [0.1, 0.2], False, "f", "h", extra={"records": {"x": [1.5]}}))
        back = read_checkpoint(path)
        assert type(back.params) is type(p)
        for a, b in zip(back.params, p):
            if isinstance(b, str) or b is None:
                assert a == b
            else:
                np.testing.assert_array_equal(a, b)  # bit-identical; LDA's expectations recomputed alike
        assert back.history == [-2.0, -1.5] and back.extra == {"records": {"x": [1.5]}}


# --- HMM -------------------------------------------------------------------------------------

def test_hmm_flow_on_dask_cluster_equals_library(prefect_server, family_data, dask_client, tmp_path):
    from flows.fit_hmm import hmm_fit_flow

    out = str(tmp_path / "hmm.zarr")
    state = hmm_fit_flow(family_data["hmm"], out, n_components=3, covariance_type="diag", n_iter=12, tol=1e-3,
                         heldout=family_data["hmm_heldout"], scheduler=dask_client.scheduler.address,
                         return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    ref = _quiet(emflow.GaussianHMM(3, covariance_type="diag", n_iter=12, tol=1e-3, random_state=0,
                                    scheduler="threads").fit, family_data["hmm"])
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        assert _rel(getattr(model, name), getattr(ref, name)) <= 1e-10, name
    assert model.n_iter_ == ref.n_iter_ and model.converged_ == ref.converged_ and ref.n_iter_ > 2
    assert _rel(model.history_, ref.history_) <= 1e-10
    assert _rel(model.monitor_.history, ref.monitor_.history) <= 1e-10

    arts = _check_monitoring(state.state_details.flow_run_id, "hmm", model)
    link = arts["dask-dashboard"][-1]
    assert dask_client.dashboard_link.split("//")[1].split(":")[0] in str(link.data)
    md = arts["hmm-fit-summary"][-1].data
    assert f"{ref.bic(family_data['hmm']):.8g}" in md
    assert f"{ref.score(family_data['hmm_heldout']):.8g}" in md
    assert "Transition matrix" in md


def test_categorical_hmm_flow_resumes_after_crash(prefect_server, family_data, tmp_path, monkeypatch):
    import flows._family as F
    from flows.fit_hmm import hmm_fit_flow

    kw = dict(n_components=2, n_iter=7, tol=0.0)
    ref = _quiet(emflow.CategoricalHMM(**kw, random_state=0, scheduler="threads").fit, family_data["cat"])
    out = str(tmp_path / "cat.zarr")
    stop_crashing = _crash_after(monkeypatch, F, 3)
    state = hmm_fit_flow(family_data["cat"], out, emission="categorical", **kw, return_state=True)
    assert state.is_failed()
    assert read_checkpoint(checkpoint_path(out)).iteration == 3

    stop_crashing()
    state = hmm_fit_flow(family_data["cat"], out, emission="categorical", **kw, return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    assert model.fit_info_["resumed_from_iteration"] == 3
    for name in ("startprob_", "transmat_", "emissionprob_"):
        assert _rel(getattr(model, name), getattr(ref, name)) <= 1e-12, name
    assert model.history_ == pytest.approx(ref.history_, rel=1e-13) and model.n_iter_ == 7
    assert model.monitor_.history == ref.monitor_.history  # totals of all 7 iterations, not the last 4
    arts = _check_monitoring(state.state_details.flow_run_id, "hmm", model, resumed_from=3)
    assert "resumed from checkpoint at iteration | 3" in arts["hmm-fit-summary"][-1].data


def test_hmm_flow_restarts_keep_the_best(prefect_server, family_data, tmp_path):
    """``n_init`` in a family's flow: one checkpoint per restart, the best final log-likelihood
    kept; the model is the estimator's own ``fit(n_init=2)``'s, and restart 0 its single fit."""
    from emflow.storage.checkpoint import checkpoint_path
    from flows.fit_hmm import hmm_fit_flow

    kw = dict(n_components=3, covariance_type="diag", n_iter=6, tol=0.0)
    out = str(tmp_path / "hmm.zarr")
    state = hmm_fit_flow(family_data["hmm"], out, **kw, n_init=2, random_state=3, return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    runs = [read_checkpoint(checkpoint_path(out, r)) for r in range(2)]
    finals = [ck.history[-1] for ck in runs]
    assert finals[0] != finals[1] and model.lower_bound_ == max(finals)
    assert model.history_ == runs[int(np.argmax(finals))].history
    single = _quiet(emflow.GaussianHMM(**kw, random_state=3, scheduler="threads").fit, family_data["hmm"])
    assert _rel(runs[0].history, single.history_) <= 1e-12
    ref = _quiet(emflow.GaussianHMM(**kw, n_init=2, random_state=3, scheduler="threads").fit, family_data["hmm"])
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        assert _rel(getattr(model, name), getattr(ref, name)) <= 1e-12, name
    arts = _artifacts(state.state_details.flow_run_id)
    assert "restarts (final mean log-likelihood per step)" in arts["hmm-fit-summary"][-1].data


# --- linear-Gaussian SSM -----------------------------------------------------------------------

def test_lgssm_flow_equals_library(prefect_server, family_data, tmp_path):
    from flows.fit_lgssm import lgssm_fit_flow

    em_vars = ["transition_matrix", "observation_matrix", "transition_covariance", "observation_covariance"]
    kw = dict(state_dim=2, observation_covariance_type="diag", tol=1e-6, max_iter=12)
    out = str(tmp_path / "ssm.zarr")
    state = lgssm_fit_flow(family_data["lgssm"], out, em_vars=em_vars, **kw, return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    ref = _quiet(emflow.LinearGaussianSSM(em_vars=em_vars, **kw, scheduler="threads").fit, family_data["lgssm"])
    for name in ("transition_matrix_", "observation_matrix_", "transition_covariance_", "observation_covariance_",
                 "initial_state_mean_", "initial_state_covariance_"):
        assert _rel(getattr(model, name), getattr(ref, name)) <= 1e-12, name
    np.testing.assert_array_equal(model.initial_state_mean_, np.zeros(2))  # held, not learned
    assert model.history_ == pytest.approx(ref.history_, rel=1e-13) and model.n_iter_ == ref.n_iter_
    arts = _check_monitoring(state.state_details.flow_run_id, "lgssm", model)
    assert "observation_covariance" in arts["lgssm-fit-summary"][-1].data


# --- LDA ---------------------------------------------------------------------------------------

def test_lda_flow_equals_library_and_publishes_top_words(prefect_server, family_data, tmp_path):
    from flows.fit_lda import lda_fit_flow

    kw = dict(n_components=3, max_iter=6, random_state=1)
    out = str(tmp_path / "lda.zarr")
    state = lda_fit_flow(family_data["lda"], out, **kw, n_top_words=5, heldout=family_data["lda_heldout"],
                         return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    ref = emflow.LatentDirichletAllocation(**kw, scheduler="threads").fit(family_data["lda"])
    assert _rel(model.components_, ref.components_) <= 1e-12
    # the flow's workers and the library's threads agree to rounding, not always to the bit (NumPy's
    # SIMD sums can round by memory alignment): measured 1 ulp apart once in a loaded run
    assert model.history_ == pytest.approx(ref.history_, rel=1e-13) and model.n_iter_ == 6

    arts = _check_monitoring(state.state_details.flow_run_id, "lda", model, column="bound_per_word",
                             label="bound per word")
    rows = _rows(arts["lda-fit-bound-per-word"][-1])
    assert [r["perplexity"] for r in rows] == pytest.approx([math.exp(-h) for h in ref.history_], rel=1e-12)
    top = arts["lda-top-words"][-1]
    assert top.type == "table"
    top_rows = _rows(top)
    assert [r["topic"] for r in top_rows] == [0, 1, 2]
    assert [r["top_words"].split(", ") for r in top_rows] == ref.top_words(5)
    assert sum(r["share"] for r in top_rows) == pytest.approx(1.0, abs=1e-5)
    md = arts["lda-fit-summary"][-1].data
    assert f"{ref.perplexity(family_data['lda_heldout']):.8g}" in md
    assert top_rows[0]["top_words"] in md


def test_lda_flow_resume_keeps_the_perplexity_stopping_rule(prefect_server, family_data, tmp_path, monkeypatch):
    """Crash after iteration 4 with evaluate_every=2: the resumed fit must stop where an
    uninterrupted one does (it needs the perplexity of iteration 4 from the checkpoint)."""
    import flows._family as F
    from flows.fit_lda import lda_fit_flow

    # with the doc-topic prior estimated, so the resumed fit must also restore the prior reached
    base = dict(n_components=3, max_iter=12, random_state=2, evaluate_every=2, learn_doc_topic_prior=True)
    probe = emflow.LatentDirichletAllocation(**base, perp_tol=0.0, scheduler="threads")
    _quiet(probe.fit, family_data["lda"])
    p = [math.exp(-h) for h in probe.history_]
    d4, d6 = abs(p[3] - p[1]), abs(p[5] - p[3])
    assert d6 < d4, (d4, d6)
    kw = dict(base, perp_tol=(d4 + d6) / 2)  # an uninterrupted fit stops after iteration 6
    ref = emflow.LatentDirichletAllocation(**kw, scheduler="threads").fit(family_data["lda"])
    assert ref.converged_ and ref.n_iter_ == 6

    out = str(tmp_path / "lda.zarr")
    stop_crashing = _crash_after(monkeypatch, F, 4)
    assert lda_fit_flow(family_data["lda"], out, **kw, return_state=True).is_failed()
    stop_crashing()
    state = lda_fit_flow(family_data["lda"], out, **kw, return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    assert model.fit_info_["resumed_from_iteration"] == 4
    assert model.converged_ and model.n_iter_ == 6
    assert model.history_ == pytest.approx(ref.history_, rel=1e-13)
    assert _rel(model.components_, ref.components_) <= 1e-12
    assert np.ndim(ref.doc_topic_prior_) == 1 and _rel(model.doc_topic_prior_, ref.doc_topic_prior_) <= 1e-12
    _check_monitoring(state.state_details.flow_run_id, "lda", model, column="bound_per_word", label="bound per word",
                      resumed_from=4)


# --- scoring every family ---------------------------------------------------------------------

def test_score_flow_writes_each_familys_outputs(prefect_server, family_data, tmp_path):
    import os

    import zarr

    from flows.score import score_flow

    hmm = _quiet(emflow.GaussianHMM(3, covariance_type="diag", n_iter=5, random_state=0, scheduler="threads").fit,
                 family_data["hmm"])
    lda = emflow.LatentDirichletAllocation(3, max_iter=3, random_state=0, scheduler="threads").fit(family_data["lda"])
    ssm = _quiet(emflow.LinearGaussianSSM(2, max_iter=2, scheduler="threads").fit, family_data["lgssm"])
    paths = {name: m.save(tmp_path / f"{name}.zarr") for name, m in [("hmm", hmm), ("lda", lda), ("ssm", ssm)]}

    written = score_flow(paths["hmm"], family_data["hmm"], str(tmp_path / "hmm-scores"))  # defaults: labels, proba
    assert set(written) == {"labels", "proba"}
    labels = zarr.open_group(written["labels"], mode="r")  # a sequence store: values + offsets
    np.testing.assert_array_equal(labels["values"][:], hmm.predict(family_data["hmm"]))
    np.testing.assert_array_equal(labels["offsets"][:], zarr.open_group(family_data["hmm"], mode="r")["offsets"][:])
    np.testing.assert_allclose(zarr.open_group(written["proba"], mode="r")["values"][:],
                               hmm.predict_proba(family_data["hmm"]), rtol=1e-10, atol=1e-12)

    written = score_flow(paths["lda"], family_data["lda"], str(tmp_path / "lda-scores"))  # default: topics
    assert set(written) == {"topics"}
    np.testing.assert_allclose(zarr.open_array(written["topics"], mode="r")[:], lda.transform(family_data["lda"]),
                               rtol=1e-12)

    written = score_flow(paths["ssm"], family_data["lgssm"], str(tmp_path / "ssm-scores"),
                         outputs=["smoothed_states", "filtered_states"])
    for kind, method in [("smoothed_states", ssm.smooth), ("filtered_states", ssm.filter)]:
        g = zarr.open_group(written[kind], mode="r")
        m, c = method(family_data["lgssm"])
        np.testing.assert_allclose(g["values"][:], m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g["covariances"][:], c, rtol=1e-12, atol=1e-14)

    # a wrong output: a clear error naming the outputs there are, nothing written
    with pytest.raises(emflow.ConfigError, match="LatentDirichletAllocation, which writes topics; it has no labels"):
        score_flow(paths["lda"], family_data["lda"], str(tmp_path / "bad"), outputs=["topics", "labels"])
    with pytest.raises(emflow.ConfigError, match="LinearGaussianSSM, which writes smoothed_states, filtered_states"):
        score_flow(paths["ssm"], family_data["lgssm"], str(tmp_path / "bad"), outputs=["proba"])
    assert not os.path.exists(tmp_path / "bad")


# --- deployments and the run form --------------------------------------------------------------

def test_deployments_yaml_and_registry_agree_and_validate():
    """Every deployment in deploy/prefect.yaml has its twin in deploy/deployments.py, its
    entrypoint loads, and its parameters pass the flow's own validation."""
    import importlib
    import inspect
    import os

    import yaml

    from deploy.deployments import DEPLOYMENTS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "deploy", "prefect.yaml")) as f:
        spec = yaml.safe_load(f)
    by_name = {d.name: d for d in DEPLOYMENTS}
    assert {d["name"] for d in spec["deployments"]} == set(by_name)
    for d in spec["deployments"]:
        path, fn = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path[:-3].replace("/", ".")), fn)
        assert by_name[d["name"]].flow is flow
        defaults = {k: v.default for k, v in inspect.signature(flow.fn).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        assert {**defaults, **by_name[d["name"]].parameters} == {**defaults, **d["parameters"]}, d["name"]
        flow.validate_parameters(d["parameters"])
        assert d["schedules"][0]["cron"] == by_name[d["name"]].cron


def test_family_flow_forms_are_typed():
    """The dashboard's run form comes from these schemas: enums and bounds must be there."""
    from prefect.utilities.callables import parameter_schema

    from flows.fit_hmm import hmm_fit_flow
    from flows.fit_lda import lda_fit_flow
    from flows.fit_lgssm import lgssm_fit_flow

    def props(flow):
        return parameter_schema(flow).model_dump()["properties"]

    hmm = json.dumps(props(hmm_fit_flow))
    assert '"categorical"' in hmm and '"spherical"' in hmm
    p = props(hmm_fit_flow)
    assert p["n_components"]["minimum"] == 1 and p["n_components"]["type"] == "integer"
    lg = json.dumps(props(lgssm_fit_flow))
    assert '"observation_covariance"' in lg and '"diag"' in lg
    p = props(lda_fit_flow)
    assert p["max_iter"]["minimum"] == 1 and p["n_top_words"]["minimum"] == 1
    assert '"ones"' in json.dumps(p)


# --- any registered family, by name -------------------------------------------------------------

def test_model_fit_flow_fits_a_family_no_flow_file_names(prefect_server, tmp_path):
    """flows/fit_model.py fits any family of the registry from its declarations: a Poisson HMM
    (added with no edit to the flows) with two restarts equals PoissonHMM(n_init=2).fit, and a
    rerun restores the saved restarts without recomputing; an unknown family is refused."""
    from emflow.storage.sequences import write_sequences
    from flows.fit_model import model_fit_flow

    rng = np.random.default_rng(3)
    lengths = [40, 60, 50, 70]
    states = rng.integers(0, 2, size=sum(lengths))
    X = rng.poisson(np.where(states[:, None] == 0, 1.0, 6.0), size=(sum(lengths), 2))
    data = write_sequences(tmp_path / "counts.zarr", X, np.concatenate([[0], np.cumsum(lengths)]), chunk_steps=64)
    out = str(tmp_path / "poisson.zarr")
    kw = dict(n_components=2, n_iter=8, tol=0.0, random_state=5)
    state = model_fit_flow(data, out, family="poisson_hmm", params=kw, n_init=2, return_state=True)
    assert state.is_completed(), state
    model = emflow.load(out)
    ref = _quiet(emflow.PoissonHMM(**kw, n_init=2, scheduler="threads").fit, X, lengths)
    assert type(model) is emflow.PoissonHMM
    for name in ("startprob_", "transmat_", "lambdas_"):
        assert _rel(getattr(model, name), getattr(ref, name)) <= 1e-12, name
    assert _rel(model.history_, ref.history_) <= 1e-12
    arts = _artifacts(state.state_details.flow_run_id)
    assert "poisson-hmm-fit-summary" in arts
    with pytest.raises(emflow.ConfigError, match="family must be one of"):
        model_fit_flow(data, str(tmp_path / "x.zarr"), family="no_such_family")
