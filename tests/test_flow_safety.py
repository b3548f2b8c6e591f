"""What keeps the flows safe and plain to use: the output lock, early input checks, runnable
flow modules, quiet Prefect defaults, the ranked selection table, the deployments' defaults
and what the Dask artifacts promise."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import emflow
from emflow.storage.checkpoint import checkpoint_path
from emflow.storage.locking import (
    EXPIRY_ENV,
    LockHeldError,
    StaleLockWarning,
    lock_path,
    output_lock,
    read_lock,
)
from emflow.storage.synthetic import write_gmm

pytestmark = pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    return write_gmm(d / "train.zarr", 1200, 3, 2, "full", seed=3, chunk_rows=400, separation=6.0)


def _dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out, **info) -> str:
    path = lock_path(out)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "since": "2026-01-01T00:00:00Z", "run_id": None,
            "what": "test"}
    with open(path, "w") as f:
        json.dump({**base, **info}, f)
    return path


@pytest.fixture
def holder(tmp_path):
    """Start a separate live process holding the lock on an output; stopped by pid afterwards."""
    procs = []

    def start(out, run_id="run-of-the-holder"):
        script = textwrap.dedent(f"""
            import sys
            from emflow.storage.locking import output_lock
            with output_lock({str(out)!r}, run_id={run_id!r}, what="emflow-fit"):
                print("held", flush=True)
                sys.stdin.read()
        """)
        proc = subprocess.Popen([PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --- the lock itself -------------------------------------------------------------------------

def test_lock_records_its_holder_and_is_released_on_success_and_error(tmp_path):
    out = tmp_path / "model.zarr"
    with output_lock(out, run_id="abc-123", what="emflow-fit") as lock:
        info = read_lock(lock_path(out))
        assert lock.path == str(tmp_path / "model.zarr.lock")
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["run_id"] == "abc-123" and info["what"] == "emflow-fit"
        assert info["since"].endswith("Z") and info["out"] == str(out)
        assert isinstance(info["process_start"], int)  # Linux: /proc/<pid>/stat
    assert not os.path.exists(lock_path(out))
    with pytest.raises(RuntimeError, match="boom"):
        with output_lock(out):
            assert os.path.exists(lock_path(out))
            raise RuntimeError("boom")
    assert not os.path.exists(lock_path(out))


def test_lock_held_by_a_live_process_fails_fast_naming_it(tmp_path, holder):
    out = tmp_path / "model.zarr"
    proc = holder(out)
    t0 = time.monotonic()
    with pytest.raises(LockHeldError) as err:
        with output_lock(out):
            pass
    assert time.monotonic() - t0 < 2
    msg = str(err.value)
    assert f"pid {proc.pid} on host {socket.gethostname()!r} since 20" in msg
    assert "flow run run-of-the-holder" in msg and "Wait for that run to finish" in msg
    assert isinstance(err.value, emflow.EmflowError)
    assert read_lock(lock_path(out))["pid"] == proc.pid  # the holder's lock is untouched


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "model.zarr"
    dead = _dead_pid()
    _write_lock(out, pid=dead, run_id="old-run")
    with pytest.warns(StaleLockWarning, match=f"process {dead} is no longer running") as rec:
        with output_lock(out, run_id="new-run") as lock:
            assert read_lock(lock_path(out))["run_id"] == "new-run"
            assert "old-run" in lock.took_over
    assert "old-run" in str(rec[0].message)
    assert not os.path.exists(lock_path(out))
    assert [p for p in os.listdir(tmp_path) if "stale" in p] == []


def test_stale_lock_of_a_reused_pid_is_taken_over(tmp_path):
    """The recorded pid runs, but it is another process (started at another time)."""
    from emflow.storage.locking import _process_start

    out = tmp_path / "model.zarr"
    _write_lock(out, pid=os.getpid(), process_start=_process_start(os.getpid()) - 1)
    with pytest.warns(StaleLockWarning, match="now belongs to another process"):
        with output_lock(out):
            pass
    # the same pid with its true start time is a live holder
    _write_lock(out, pid=os.getpid(), process_start=_process_start(os.getpid()))
    with pytest.raises(LockHeldError):
        with output_lock(out):
            pass


def test_other_hosts_lock_expires_only_when_not_refreshed(tmp_path, monkeypatch):
    out = tmp_path / "model.zarr"
    path = _write_lock(out, host="another-host.example", pid=1)
    with pytest.raises(LockHeldError, match="'another-host.example'"):
        with output_lock(out):
            pass
    old = time.time() - 3600
    os.utime(path, (old, old))
    monkeypatch.setenv(EXPIRY_ENV, "0")  # never expires
    with pytest.raises(LockHeldError):
        with output_lock(out):
            pass
    monkeypatch.delenv(EXPIRY_ENV)  # default 600 s: an hour without a heartbeat is stale
    with pytest.warns(StaleLockWarning, match="has not refreshed it for 3600 s"):
        with output_lock(out):
            pass


def test_heartbeat_refreshes_the_lock(tmp_path):
    out = tmp_path / "model.zarr"
    with output_lock(out, heartbeat=0.05):
        old = time.time() - 100
        os.utime(lock_path(out), (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(lock_path(out)).st_mtime < 5


def test_unreadable_lock_is_held_while_young_and_stale_when_old(tmp_path):
    out = tmp_path / "model.zarr"
    path = lock_path(out)
    open(path, "w").close()  # a writer that died between create and write, or is writing now
    with pytest.raises(LockHeldError, match="unknown process"):
        with output_lock(out):
            pass
    old = time.time() - 60
    os.utime(path, (old, old))
    with pytest.warns(StaleLockWarning, match="unreadable"):
        with output_lock(out):
            pass


# --- the lock in the flows -----------------------------------------------------------------------

def test_second_fit_on_a_locked_output_fails_fast_and_writes_nothing(prefect_server, small_data, tmp_path, holder):
    from flows.fit import fit_flow

    out = str(tmp_path / "model.zarr")
    proc = holder(out)
    t0 = time.monotonic()
    state = fit_flow(small_data, out, n_components=3, covariance_type="diag", return_state=True)
    assert time.monotonic() - t0 < 30
    assert state.is_failed()
    with pytest.raises(LockHeldError, match=f"pid {proc.pid} on host .* flow run run-of-the-holder"):
        state.result()
    assert not os.path.exists(checkpoint_path(out)) and not os.path.exists(out)
    assert read_lock(lock_path(out))["pid"] == proc.pid


@pytest.mark.parametrize("module,flow_name", [("flows.fit_hmm", "hmm_fit_flow"), ("flows.fit_lgssm", "lgssm_fit_flow"),
                                              ("flows.fit_lda", "lda_fit_flow"), ("flows.model_selection", "select_flow")])
def test_every_family_fit_takes_the_lock_first(prefect_server, tmp_path, holder, module, flow_name):
    """The lock comes before anything else: even the (missing) data are not looked at."""
    import importlib

    flow = getattr(importlib.import_module(module), flow_name)
    out = str(tmp_path / "model.zarr")
    holder(out, run_id=f"holder-of-{flow_name}")
    state = flow(str(tmp_path / "missing.zarr"), out, return_state=True)
    with pytest.raises(LockHeldError, match=f"flow run holder-of-{flow_name}"):
        state.result()


def test_fit_holds_the_lock_while_it_runs_and_releases_it(prefect_server, small_data, tmp_path, monkeypatch):
    import flows.fit as F
    from emflow.storage.checkpoint import CheckpointWriter

    out = str(tmp_path / "model.zarr")
    seen = []
    real_call = CheckpointWriter.__call__

    def spy(self, event):
        real_call(self, event)
        seen.append(read_lock(lock_path(out)))

    monkeypatch.setattr(CheckpointWriter, "__call__", spy)
    state = F.fit_flow(small_data, out, n_components=3, covariance_type="diag", max_iter=5, return_state=True)
    assert state.is_completed()
    assert seen and all(s["pid"] == os.getpid() and s["what"] == "emflow-fit" for s in seen)
    assert seen[0]["run_id"] == str(state.state_details.flow_run_id)
    assert not os.path.exists(lock_path(out))

    # after a failure too
    state = F.fit_flow(str(tmp_path / "missing.zarr"), out, return_state=True)
    assert state.is_failed()
    assert not os.path.exists(lock_path(out))


def test_fit_takes_over_a_stale_lock_and_says_so_in_the_run_log(prefect_server, small_data, tmp_path):
    from flows.fit import fit_flow

    from test_flows import _logs

    out = str(tmp_path / "model.zarr")
    _write_lock(out, pid=_dead_pid(), run_id="crashed-run")
    with pytest.warns(StaleLockWarning, match="crashed-run"):
        state = fit_flow(small_data, out, n_components=3, covariance_type="diag", max_iter=5, return_state=True)
    assert state.is_completed()
    assert not os.path.exists(lock_path(out))
    logs = _logs(state.state_details.flow_run_id, "Taking over the stale lock")
    assert any("Taking over the stale lock" in m and "crashed-run" in m for m in logs)


# --- every input is opened in the first task ---------------------------------------------------

def test_fit_flow_checks_heldout_before_any_work(prefect_server, small_data, tmp_path):
    from flows.fit import fit_flow

    out = str(tmp_path / "model.zarr")
    missing = str(tmp_path / "no-heldout.zarr")
    state = fit_flow(small_data, out, n_components=3, heldout=missing, return_state=True)
    assert state.is_failed()
    with pytest.raises(emflow.DataNotFoundError, match="no-heldout.zarr"):
        state.result()
    # nothing was fitted, checkpointed or saved
    assert not os.path.exists(checkpoint_path(out)) and not os.path.exists(out)
    assert not os.path.exists(lock_path(out))

    # a held-out set with other features: a clear error, before any work as well
    other = write_gmm(tmp_path / "other.zarr", 300, 2, 4, "full", seed=1)
    state = fit_flow(small_data, out, n_components=3, heldout=other, return_state=True)
    with pytest.raises(emflow.FeatureMismatchError, match="4 features, the training data .* 2"):
        state.result()
    assert not os.path.exists(checkpoint_path(out))


def test_family_fit_checks_heldout_before_any_work(prefect_server, tmp_path):
    from emflow.storage.synthetic import write_hmm
    from flows.fit_hmm import hmm_fit_flow

    data = write_hmm(tmp_path / "hmm.zarr", 10, 2, 2, "gaussian", "diag", min_length=10, max_length=20, seed=4,
                     sequences_per_chunk=5)
    out = str(tmp_path / "hmm-model.zarr")
    state = hmm_fit_flow(data, out, n_components=2, n_iter=3, heldout=str(tmp_path / "no-seqs.zarr"),
                         return_state=True)
    with pytest.raises(emflow.DataNotFoundError, match="no-seqs.zarr"):
        state.result()
    assert not os.path.exists(checkpoint_path(out)) and not os.path.exists(out)


def test_select_and_score_check_their_inputs_first(prefect_server, small_data, tmp_path):
    from flows.score import score_flow
    from flows.model_selection import select_flow

    out = str(tmp_path / "best.zarr")
    state = select_flow(small_data, out, n_components=[1, 2], covariance_types=["diag"],
                        sample_weight=str(tmp_path / "no-weights.zarr"), return_state=True)
    with pytest.raises(emflow.DataNotFoundError, match="no-weights.zarr"):
        state.result()
    assert not os.path.exists(out)

    gm = emflow.GaussianMixture(2, covariance_type="diag", max_iter=3, random_state=0,
                                scheduler="threads").fit(small_data)
    model = gm.save(tmp_path / "m.zarr")
    with pytest.raises(emflow.DataNotFoundError, match="no-data.zarr"):
        score_flow(model, str(tmp_path / "no-data.zarr"), str(tmp_path / "scores"))
    with pytest.raises(emflow.DataNotFoundError, match="no-model.zarr"):
        score_flow(str(tmp_path / "no-model.zarr"), small_data, str(tmp_path / "scores"))
    wide = write_gmm(tmp_path / "wide.zarr", 300, 2, 5, "full", seed=1)
    with pytest.raises(emflow.FeatureMismatchError, match="5 features; the model was fitted on 2"):
        score_flow(model, wide, str(tmp_path / "scores"))
    assert not os.path.exists(tmp_path / "scores")


def test_deployment_defaults_name_no_path_but_data_and_out():
    """deploy/README's 'run one now' overrides data and out only: no other default path may be
    read (a held-out default that does not exist failed the run after the whole fit)."""
    import yaml

    from deploy.deployments import DEPLOYMENTS

    with open(os.path.join(ROOT, "deploy", "prefect.yaml")) as f:
        spec = yaml.safe_load(f)
    for params in [d["parameters"] for d in spec["deployments"]] + [d.parameters for d in DEPLOYMENTS]:
        for key in ("heldout", "sample_weight", "initial_model"):
            assert params.get(key) is None, (key, params)
    readme = open(os.path.join(ROOT, "deploy", "README.md")).read()
    assert "holds seven deployments" in readme and len(spec["deployments"]) == 7
    assert "registers the three" not in readme


# --- runnable modules and quiet Prefect ---------------------------------------------------------

def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=ROOT)
    return env


def test_flow_modules_without_parameters_print_usage_and_exit_2(tmp_path):
    """Each flow module run as a program (what ``python -m`` does, via runpy, in one
    subprocess): no parameters -> the usage on stderr, exit 2; an unknown one too."""
    code = textwrap.dedent("""
        import contextlib, io, json, runpy, sys
        out = {}
        for module, argv in [("flows.fit", []), ("flows.model_selection", []), ("flows.score", []), ("flows.fit_hmm", []),
                             ("flows.fit_lgssm", []), ("flows.fit_lda", []), ("flows.fit", ["nonsense=1", "data=x"])]:
            sys.argv = [module, *argv]
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code
            out[module + " " + " ".join(argv)] = [code, err.getvalue()]
        print(json.dumps(out))
    """)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=_clean_env(tmp_path), timeout=180)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key, (status, err) in res.items():
        module = key.split()[0]
        assert status == 2, key
        assert f"usage: python -m {module} [--param] KEY=VALUE" in err, key
        if key.strip() == module:
            assert "error: missing required parameter(s): " in err and "data" in err, key
    assert "'emflow-fit' has no parameter nonsense" in res["flows.fit nonsense=1 data=x"][1]


def test_parse_params():
    from flows._main import UsageError, parse_params

    assert parse_params(["--param", "data=/a b.zarr", "n_components=[2, 3]", "--param=heldout=null", "tol=1e-4",
                         "--params", '{"max_iter": 5, "data": "/c.zarr"}', "covariance-type=diag"]) == {
        "data": "/c.zarr", "n_components": [2, 3], "heldout": None, "tol": 1e-4, "max_iter": 5,
        "covariance_type": "diag"}
    with pytest.raises(UsageError, match="is not KEY=VALUE"):
        parse_params(["data"])
    with pytest.raises(UsageError, match="must be a JSON object"):
        parse_params(["--params", "[1]"])


def test_importing_flows_sets_quiet_prefect_defaults(tmp_path):
    code = "import os, flows; print(os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'], " \
           "os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS'])"
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=_clean_env(tmp_path), timeout=60)
    assert r.stdout.split() == ["false", "120"], r.stderr
    env = {**_clean_env(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "true"}  # the user's choice stands
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.split() == ["true", "120"]


@pytest.mark.slow  # 12-27 s: kept out of the default run (make test-slow)
def test_python_m_flows_fit_runs_the_flow_without_a_traceback(small_data, tmp_path):
    """With a clean environment (no PREFECT_* but a fresh PREFECT_HOME): the flow runs on a
    temporary server and prints its result; no telemetry error, no traceback."""
    out = str(tmp_path / "model.zarr")
    r = subprocess.run([PY, "-m", "flows.fit", "--param", f"data={small_data}", "--param", f"out={out}",
                        "--param", "n_components=3", "covariance_type=diag", "max_iter=5"],
                       capture_output=True, text=True, env=_clean_env(tmp_path), timeout=240)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert json.loads(r.stdout.strip().splitlines()[-1]) == out
    assert emflow.load(out).n_components == 3
    assert "Traceback" not in text and "telemetry" not in text.lower() and "database is locked" not in text


# --- the model-selection table is ranked by BIC --------------------------------------------------

def test_selection_ranking_is_by_bic_stable_with_nan_last():
    from emflow.estimators.selection import SelectionResult

    bics = [30.0, 10.0, math.nan, 10.0, 20.0]
    table = [{"n_components": k, "covariance_type": "full", "bic": b} for k, b in enumerate(bics, 1)]
    res = SelectionResult(models=[None] * 5, table=table, best=1, io={})
    assert res.ranking == [1, 3, 4, 0, 2]
    ranked = res.ranked_table()
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5]
    assert [r["grid_index"] for r in ranked] == [1, 3, 4, 0, 2]
    assert [r["chosen"] for r in ranked] == [True, False, False, False, False]
    assert res.table[0]["bic"] == 30.0  # the grid-order table is unchanged


def test_select_flow_table_artifact_is_ranked_by_bic(prefect_server, small_data, tmp_path):
    from flows.model_selection import select_flow

    from test_flows import _artifacts

    state = select_flow(small_data, str(tmp_path / "best.zarr"), n_components=[1, 2, 3],
                        covariance_types=["spherical", "full"], max_iter=20, return_state=True)
    res = state.result()
    rows = _artifacts(state.state_details.flow_run_id)["model-selection"][-1].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    bics = [r["bic"] for r in rows]
    assert bics == sorted(bics) and len(rows) == 6
    assert [r["rank"] for r in rows] == list(range(1, 7))
    assert rows[0]["chosen"] and not any(r["chosen"] for r in rows[1:])
    assert (rows[0]["n_components"], rows[0]["covariance_type"]) == (res["best"]["n_components"],
                                                                    res["best"]["covariance_type"])
    assert [r["bic"] for r in res["table"]] == bics


# --- the Dask artifacts say what lasts -----------------------------------------------------------

def test_dask_artifacts_say_the_link_is_live_only_while_the_cluster_runs(prefect_server, small_data, tmp_path,
                                                                        dask_client, monkeypatch):
    """The real performance report (bokeh is a dependency) is saved beside the model and the
    artifact says where; without bokeh the artifact says it was not saved and the fit goes on."""
    from flows.fit import fit_flow

    from test_flows import _artifacts

    addr = dask_client.scheduler.address
    out = str(tmp_path / "model.zarr")
    state = fit_flow(small_data, out, n_components=3, covariance_type="diag", max_iter=5, scheduler=addr,
                     return_state=True)
    assert state.is_completed()
    arts = _artifacts(state.state_details.flow_run_id)
    link = arts["dask-dashboard"][-1]
    assert "the link works while that cluster runs" in link.description
    assert "live only while the cluster runs" in str(link.data)
    md = arts["dask-performance-report"][-1].data
    assert "works only while its cluster runs" in md
    report = out + ".dask-report.html"
    assert f"Saved beside the model: `{report}`" in md and "this report is what stays" in md
    html = open(report).read()
    assert "<html" in html.lower() and "Task Stream" in html

    monkeypatch.setitem(sys.modules, "bokeh", None)  # import bokeh -> ImportError
    out2 = str(tmp_path / "model2.zarr")
    state = fit_flow(small_data, out2, n_components=3, covariance_type="diag", max_iter=5, scheduler=addr,
                     return_state=True)
    assert state.is_completed()
    assert not os.path.exists(out2 + ".dask-report.html")
    md = _artifacts(state.state_details.flow_run_id)["dask-performance-report"][-1].data
    assert "Not saved: bokeh is not installed" in md


# --- data that change between the validate task and the fit ---------------------------------------

def test_data_changed_after_validation_fails_and_keeps_no_checkpoint(prefect_server, small_data, tmp_path,
                                                                     monkeypatch):
    """The fit's own fingerprint must be the validated one: otherwise the run fails with a
    DataError, saves no model and removes the checkpoint it labelled with the old fingerprint
    (before, a warning was logged and the model saved)."""
    import flows._family as family
    import flows.fit as fit_mod
    from emflow.storage.synthetic import write_hmm
    from flows.fit_hmm import hmm_fit_flow

    def stale(real):
        def fingerprint(*args, **kwargs):
            return {**real(*args, **kwargs), "fingerprint": "0" * 32}  # what the data were at validation
        return fingerprint

    monkeypatch.setattr(fit_mod, "data_fingerprint", stale(fit_mod.data_fingerprint))
    out = str(tmp_path / "model.zarr")
    state = fit_mod.fit_flow(small_data, out, n_components=3, max_iter=5, return_state=True)
    assert state.is_failed()
    with pytest.raises(emflow.DataError, match="changed while the flow ran"):
        state.result()
    assert not os.path.exists(out) and not os.path.exists(checkpoint_path(out))

    seqs = write_hmm(tmp_path / "hmm.zarr", 30, 2, 1, min_length=10, max_length=30, seed=0)
    monkeypatch.setattr(family, "dataset_fingerprint", stale(family.dataset_fingerprint))
    out = str(tmp_path / "hmm-model.zarr")
    state = hmm_fit_flow(seqs, out, n_components=2, n_iter=5, return_state=True)
    assert state.is_failed()
    with pytest.raises(emflow.DataError, match="changed while the flow ran"):
        state.result()
    assert not os.path.exists(out) and not os.path.exists(checkpoint_path(out))


# --- what installing the distribution creates; flow files' names ------------------------------

def test_no_flow_module_shadows_the_standard_library():
    """Prefect loads a deployment's entrypoint with its folder (flows/) first on sys.path, so a
    flows/select.py would be what a later ``import select`` finds."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "flows")) if f.endswith(".py"))
    assert "fit" in names and "model_selection" in names
    assert [n for n in names if n in sys.stdlib_module_names] == []


def _pyproject() -> dict:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_distribution_packages_are_only_emflow():
    """setuptools' discovery with pyproject's settings finds emflow and its subpackages only:
    flows/, datasets/ and deploy/ (at the top of the repository) are never installed."""
    from setuptools import find_packages

    found = find_packages(where=ROOT, **_pyproject()["tool"]["setuptools"]["packages"]["find"])
    assert "emflow" in found and "emflow.models" in found
    assert {p.split(".")[0] for p in found} == {"emflow"}


def test_built_wheel_holds_only_emflow(tmp_path):
    """A wheel built from the project (a copy of its sources, so the build leaves nothing in the
    repository) has top-level names ``emflow`` and its dist-info only: no ``flows``, ``datasets``
    or ``deploy``. Offline with ``--no-build-isolation`` when the installed setuptools meets
    pyproject's build requirement; otherwise pip fetches it (skipped when it cannot)."""
    import shutil
    import zipfile

    import setuptools
    from packaging.requirements import Requirement
    from packaging.version import Version

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), src / name)
    for name in ("emflow", "flows", "datasets", "deploy"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    reqs = [Requirement(r) for r in _pyproject()["build-system"]["requires"]]
    offline = all(r.name != "setuptools" or r.specifier.contains(Version(setuptools.__version__)) for r in reqs)
    try:
        import wheel  # noqa: F401
    except ImportError:
        offline = False
    cmd = [PY, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", str(src), "-w", str(tmp_path / "dist")]
    r = subprocess.run(cmd + (["--no-build-isolation"] if offline else []), capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    if r.returncode != 0 and not offline and ("Could not find a version" in r.stderr or "network" in r.stderr.lower()):
        pytest.skip(f"setuptools {setuptools.__version__} here is older than the build needs and pip cannot fetch it")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [whl] = os.listdir(tmp_path / "dist")
    with zipfile.ZipFile(tmp_path / "dist" / whl) as z:
        top = {n.split("/")[0] for n in z.namelist()}
    assert top == {"emflow", whl.split("-py3")[0] + ".dist-info"}, top


# --- the demo lives with the flows ------------------------------------------------------------

@pytest.mark.parametrize("args, text", [
    (["--workers", "0"], "--workers must be an integer >= 1, got 0."),
    (["--samples", "0"], "--samples must be an integer >= 1, got 0."),
    (["--components", "-1"], "--components must be an integer >= 1, got -1."),
])
def test_demo_rejects_bad_options_before_any_work(args, text, tmp_path):
    from typer.testing import CliRunner

    from flows.demo import app

    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert [line for line in r.output.splitlines() if line.startswith("error:")] == [f"error: {text}"]
    assert not out.exists()


def test_emflow_demo_says_how_to_run_the_demo_and_the_library_never_imports_flows():
    """The library has no Prefect and no ``flows`` in it: ``emflow demo`` names what to run."""
    from typer.testing import CliRunner

    from emflow.cli import app

    r = CliRunner().invoke(app, ["demo", "--out", "x"])
    assert r.exit_code == 2
    assert "make demo" in r.output and "python -m flows.demo --out demo-output" in r.output
    code = ("import sys, emflow, emflow.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows')))")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert "$(BIN)/python -m flows.demo --out demo-output" in makefile
