"""Prefect flows under a real temporary Prefect server (prefect_test_harness).

The flows' numbers are checked against the library called directly; the dashboard side is
checked through the Prefect API (artifacts by key and type, logs, final states).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("prefect")

import emflow  # noqa: E402
from emflow.storage.checkpoint import CheckpointWarning, CheckpointWriter, checkpoint_path, read_checkpoint  # noqa: E402
from emflow.storage.synthetic import write_gmm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def gmm_data(tmp_path_factory):
    """Three well separated 2-D components, 3000 rows in 6 chunks."""
    d = tmp_path_factory.mktemp("flowdata")
    return write_gmm(d / "train.zarr", 3000, 3, 2, "full", seed=3, chunk_rows=500, separation=6.0)


@pytest.fixture(scope="session")
def heldout_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    return write_gmm(d / "test.zarr", 1000, 3, 2, "full", seed=3, chunk_rows=500, separation=6.0)


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict = {}
    for a in sorted(arts, key=lambda a: a.created):
        by_key.setdefault(a.key, []).append(a)
    return by_key


def _logs(flow_run_id, want: str, timeout: float = 10.0) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        msgs = [lg.message for lg in logs]
        if any(want in m for m in msgs) or time.monotonic() > deadline:
            return msgs
        time.sleep(0.3)


def _crash_after(monkeypatch, flow_module, iteration: int):
    """Make the next flow run fail right after it checkpoints ``iteration`` (no Prefect
    retry); returns a function that stops the crashing, for the run that resumes."""
    real_call = CheckpointWriter.__call__

    def dying(self, event):
        real_call(self, event)
        if event.iteration == iteration:
            raise RuntimeError(f"simulated crash after iteration {iteration}")

    monkeypatch.setattr(CheckpointWriter, "__call__", dying)
    monkeypatch.setattr(flow_module, "em_iterations", flow_module.em_iterations.with_options(retries=0))
    return lambda: monkeypatch.setattr(CheckpointWriter, "__call__", real_call)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _assert_same_model(a, b, rtol=1e-10):
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert _rel(getattr(a, name), getattr(b, name)) <= rtol, name
    assert a.n_iter_ == b.n_iter_
    assert a.converged_ == b.converged_
    assert _rel(a.history_, b.history_) <= rtol


def _library_fit(data, kw, checkpoint=None):
    """The same fit through the library alone (optionally writing a checkpoint)."""
    import warnings

    from emflow.storage.checkpoint import config_hash, data_fingerprint, gmm_trajectory_config

    gm = emflow.GaussianMixture(**kw, scheduler="threads")
    cbs = []
    if checkpoint:
        info = data_fingerprint(data, min_rows=gm.n_components)
        cbs.append(CheckpointWriter(checkpoint, fingerprint=info["fingerprint"],
                                    config_hash=config_hash(gmm_trajectory_config(gm))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emflow.EmflowConvergenceWarning)
        return gm.fit(data, callbacks=cbs)


# --- the fit flow -------------------------------------------------------------------------

def test_fit_flow_on_dask_cluster_artifacts_and_model(prefect_server, gmm_data, heldout_data, dask_client,
                                                      tmp_path):
    from flows.fit import fit_flow

    out = str(tmp_path / "model.zarr")
    state = fit_flow(gmm_data, out, n_components=3, heldout=heldout_data,
                     scheduler=dask_client.scheduler.address, return_state=True)
    assert state.is_completed(), state
    assert state.result() == out
    run_id = state.state_details.flow_run_id

    # the model equals the library's own fit (threads, same seed)
    gm = emflow.load(out)
    ref = _library_fit(gmm_data, dict(n_components=3, random_state=0))
    _assert_same_model(gm, ref)
    assert gm.converged_

    arts = _artifacts(run_id)
    assert set(arts) >= {"dask-dashboard", "fit-progress", "fit-log-likelihood", "fit-summary"}
    link = arts["dask-dashboard"][-1]
    assert link.type == "markdown" or link.type == "link"
    assert dask_client.dashboard_link.split("//")[1].split(":")[0] in str(link.data)
    prog = arts["fit-progress"][-1]
    assert prog.type == "progress" and float(prog.data) == pytest.approx(100.0)
    table = arts["fit-log-likelihood"][-1]
    assert table.type == "table"
    import json

    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["iteration"] for r in rows] == list(range(1, gm.n_iter_ + 1))
    assert _rel([r["log_likelihood"] for r in rows], gm.history_) == 0.0
    assert rows[0]["change"] is None and rows[1]["change"] == pytest.approx(gm.history_[1] - gm.history_[0])
    summary = arts["fit-summary"][-1]
    assert summary.type == "markdown"
    assert "**Converged**" in summary.data and "data:image/png;base64," in summary.data
    assert gm.fit_info_["fingerprint"] in summary.data
    bic = ref.bic(gmm_data)
    assert f"{bic:.8g}" in summary.data
    assert f"{ref.score(heldout_data):.8g}" in summary.data

    logs = _logs(run_id, f"iteration {gm.n_iter_}:")
    for i in range(1, gm.n_iter_ + 1):
        assert any(m.startswith(f"iteration {i}: mean log-likelihood") for m in logs), i


def test_fit_flow_n_init_equals_the_estimators_restarts(prefect_server, tmp_path):
    """``fit_flow(n_init=3, random_state=2)`` is ``GaussianMixture(n_init=3, random_state=2).fit``:
    each restart starts where the estimator's restart starts, the best final mean log-likelihood
    is kept (here the second restart's: the three end apart). Run again, every restart is
    restored from its finished checkpoint, to the same model."""
    from flows.fit import fit_flow

    data = write_gmm(tmp_path / "overlap.zarr", 1200, 3, 2, "full", seed=3, chunk_rows=400, separation=1.5)
    out = str(tmp_path / "model.zarr")
    kw = dict(n_components=3, n_init=3, random_state=2)
    state = fit_flow(data, out, **kw, return_state=True)
    assert state.is_completed(), state
    gm = emflow.load(out)
    ref = _library_fit(data, kw)
    _assert_same_model(gm, ref, rtol=1e-12)
    assert gm.lower_bound_ == ref.lower_bound_
    finals = [read_checkpoint(checkpoint_path(out, r)).history[-1] for r in range(3)]
    assert len(set(finals)) == 3 and int(np.argmax(finals)) == 1, finals
    assert gm.lower_bound_ == max(finals)

    run_id = state.state_details.flow_run_id
    summary = _artifacts(run_id)["fit-summary"][-1].data
    assert "restarts (final mean log-likelihood) | " + ", ".join(f"{v:.8g}" for v in finals) in summary
    logs = _logs(run_id, "restart 3/3 iteration 1:")
    assert all(any(m.startswith(f"restart {r}/3 iteration 1: mean log-likelihood") for m in logs) for r in (1, 2, 3))

    again = fit_flow(data, out, **kw, return_state=True)
    assert again.is_completed()
    _assert_same_model(emflow.load(out), ref, rtol=1e-12)
    logs = _logs(again.state_details.flow_run_id, "restart 3/3: checkpoint at iteration")
    assert sum("checkpoint at iteration" in m and "is final" in m for m in logs) == 3


def test_fit_flow_resumes_after_failure_mid_fit(prefect_server, gmm_data, tmp_path, monkeypatch):
    """A fit that dies after iteration 3 and is run again ends exactly as an uninterrupted one."""
    import flows._family as F
    from flows.fit import fit_flow

    kw = dict(n_components=3, covariance_type="diag", tol=0.0, max_iter=8, random_state=7)
    ref = _library_fit(gmm_data, kw)  # the flow equals the library (first test)
    assert ref.n_iter_ == 8

    out = str(tmp_path / "model.zarr")
    stop_crashing = _crash_after(monkeypatch, F, 3)
    state = fit_flow(gmm_data, out, **kw, return_state=True)
    assert state.is_failed()
    assert "simulated crash" in str(state.message) or "simulated crash" in repr(state.result(raise_on_failure=False))
    assert read_checkpoint(checkpoint_path(out)).iteration == 3
    assert not os.path.exists(out)

    stop_crashing()
    state = fit_flow(gmm_data, out, **kw, return_state=True)
    assert state.is_completed()
    gm = emflow.load(out)
    assert gm.fit_info_["resumed_from_iteration"] == 3
    _assert_same_model(gm, ref)


def test_em_task_retry_resumes_from_checkpoint(prefect_server, gmm_data, tmp_path, monkeypatch):
    """A transient error inside EM is retried by Prefect and the retry continues from the checkpoint."""
    import flows._family as F
    from flows.fit import fit_flow

    kw = dict(n_components=3, covariance_type="spherical", tol=0.0, max_iter=6, random_state=1)
    ref = _library_fit(gmm_data, kw)
    real_call = CheckpointWriter.__call__
    calls = {"n": 0}

    def flaky(self, event):
        real_call(self, event)
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionError("simulated lost connection")

    monkeypatch.setattr(CheckpointWriter, "__call__", flaky)
    monkeypatch.setattr(F, "em_iterations", F.em_iterations.with_options(retry_delay_seconds=0))
    out = fit_flow(gmm_data, str(tmp_path / "m.zarr"), **kw)
    gm = emflow.load(out)
    assert calls["n"] == 6  # 4 iterations, then the retry did the last 2, not all 6 again
    assert gm.fit_info_["resumed_from_iteration"] == 4
    _assert_same_model(gm, ref)


def test_fit_resumes_after_sigkill(prefect_server, gmm_data, tmp_path):
    """A fit process killed by SIGKILL mid-way; the flow run afterwards resumes from its checkpoint."""
    from flows.fit import fit_flow

    out = str(tmp_path / "model.zarr")
    ck = checkpoint_path(out)
    script = textwrap.dedent(f"""
        import time, emflow
        from emflow.storage.checkpoint import CheckpointWriter, config_hash, data_fingerprint, gmm_trajectory_config
        gm = emflow.GaussianMixture(3, covariance_type="tied", tol=0.0, max_iter=12, random_state=5)
        info = data_fingerprint({gmm_data!r}, min_rows=3)
        writer = CheckpointWriter({ck!r}, fingerprint=info["fingerprint"],
                                  config_hash=config_hash(gmm_trajectory_config(gm)))
        gm.fit({gmm_data!r}, callbacks=[writer, lambda ev: time.sleep(0.4)])
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(ck) and read_checkpoint(ck).iteration >= 3:
                break
            assert proc.poll() is None, "the fit process ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    done = read_checkpoint(ck).iteration
    assert 3 <= done < 12

    kw = dict(n_components=3, covariance_type="tied", tol=0.0, max_iter=12, random_state=5)
    gm = emflow.load(fit_flow(gmm_data, out, **kw))
    assert gm.fit_info_["resumed_from_iteration"] == done
    _assert_same_model(gm, _library_fit(gmm_data, kw))


def test_corrupt_checkpoint_is_ignored_with_a_warning(prefect_server, gmm_data, tmp_path):
    from flows.fit import fit_flow

    kw = dict(n_components=3, covariance_type="full", max_iter=20, random_state=2)
    out = str(tmp_path / "model.zarr")
    ref = _library_fit(gmm_data, kw, checkpoint=str(tmp_path / "ref.npz"))
    good = open(tmp_path / "ref.npz", "rb").read()
    with open(checkpoint_path(out), "wb") as f:
        f.write(good[: len(good) // 2])  # truncated
    with pytest.warns(CheckpointWarning, match="unreadable or truncated"):
        state = fit_flow(gmm_data, out, **kw, return_state=True)
    assert state.is_completed()
    gm = emflow.load(out)
    assert gm.fit_info_["resumed_from_iteration"] == 0
    _assert_same_model(gm, ref)
    logs = _logs(state.state_details.flow_run_id, "Ignoring the checkpoint")
    assert any("Ignoring the checkpoint" in m for m in logs)


def test_fit_flow_rejects_bad_parameters_before_running(prefect_server, gmm_data, tmp_path):
    from prefect.exceptions import ParameterTypeError

    from flows.fit import fit_flow

    with pytest.raises(ParameterTypeError):
        fit_flow(gmm_data, str(tmp_path / "m.zarr"), n_components=0)
    with pytest.raises(ParameterTypeError):
        fit_flow(gmm_data, str(tmp_path / "m.zarr"), covariance_type="banana")
    state = fit_flow(str(tmp_path / "missing.zarr"), str(tmp_path / "m.zarr"), return_state=True)
    assert state.is_failed()
    with pytest.raises(emflow.DataNotFoundError):
        state.result()


# --- model selection and scoring ----------------------------------------------------------

def test_select_flow_picks_true_k_and_reports_io(prefect_server, gmm_data, tmp_path):
    from flows.model_selection import select_flow

    out = str(tmp_path / "best.zarr")
    state = select_flow(gmm_data, out, n_components=[1, 2, 3, 4], covariance_types=["full", "spherical"],
                        persist=False, return_state=True)
    assert state.is_completed()
    res = state.result()
    assert (res["best"]["n_components"], res["best"]["covariance_type"]) == (3, "full")
    best = emflow.load(out)
    assert best.n_components == 3 and best.covariance_type == "full"
    assert res["io"]["bytes_shared"] < res["io"]["bytes_sequential"] / 3
    arts = _artifacts(state.state_details.flow_run_id)
    assert arts["model-selection"][-1].type == "table"
    import json

    rows = arts["model-selection"][-1].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert len(rows) == 8 and [r["chosen"] for r in rows].count(True) == 1
    assert min(rows, key=lambda r: r["bic"])["chosen"]
    md = arts["selection-summary"][-1].data
    assert f"{res['io']['passes_shared']}" in md and "less read" in md


def test_score_flow_writes_zarr_outputs(prefect_server, gmm_data, tmp_path, dask_client):
    import zarr

    from flows.score import score_flow

    gm = emflow.GaussianMixture(3, random_state=0, scheduler="threads").fit(gmm_data)
    model = gm.save(tmp_path / "m.zarr")
    written = score_flow(model, gmm_data, str(tmp_path / "scores"),
                         outputs=["labels", "proba", "log_likelihood"], scheduler=dask_client.scheduler.address)
    X = zarr.open_array(gmm_data + "/X", mode="r")[:]
    labels = zarr.open_array(written["labels"], mode="r")
    assert labels.chunks == (500,)
    np.testing.assert_array_equal(labels[:], gm.predict(X))
    np.testing.assert_allclose(zarr.open_array(written["proba"], mode="r")[:], gm.predict_proba(X), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(zarr.open_array(written["log_likelihood"], mode="r")[:], gm.score_samples(X),
                               rtol=1e-10)


# --- deployments --------------------------------------------------------------------------

@pytest.mark.slow  # 12-27 s: kept out of the default run (make test-slow)
def test_served_deployment_runs_on_schedule_trigger(prefect_server, gmm_data, tmp_path):
    """Serve the fit flow as a deployment (with a cron) in a separate process, trigger a run as
    the schedule would, and see it complete through the Prefect API."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    out = str(tmp_path / "served.zarr")
    script = textwrap.dedent(f"""
        from flows.fit import fit_flow
        fit_flow.serve(name="nightly-test", cron="0 3 * * *",
                       parameters={{"data": {gmm_data!r}, "out": {out!r}, "n_components": 3}})
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + 60
        dep = None
        while dep is None and time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                try:
                    dep = client.read_deployment_by_name("emflow-fit/nightly-test")
                except Exception:
                    time.sleep(0.5)
        assert dep is not None, "the served deployment never registered"
        assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
        run = run_deployment("emflow-fit/nightly-test", timeout=90)
        assert run.state.is_completed(), run.state
        assert os.path.exists(out) and emflow.load(out).n_components == 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
