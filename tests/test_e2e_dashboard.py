"""End to end: a real ``prefect server start`` on loopback, the fit flow run against it, and the
flow run page opened in headless Chromium (Debian's ``chromium``).

The browser is driven through the DevTools protocol (Prefect's own dependency ``websockets``
is the client), so the test waits for the single-page app to render what it checks instead of
guessing a time budget. What a user sees is checked in the rendered page text: the run's name
and state, the artifact keys on the run's Artifacts tab, and the summary artifact's verdict.
Screenshots are kept in ``tests/output/`` (git-ignored).

The Prefect server, the flow process and Chromium are started here and stopped here, by
process (group) id. The test process's own Prefect settings are never changed: the flow runs
in a subprocess whose environment points at the server.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "tests" / "output"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
PREFECT = Path(sys.executable).with_name("prefect")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's chromium is not installed: run `apt-get install chromium` (or `make e2e`, which installs it)",
    ),
]

ARTIFACT_KEYS = ("fit-progress", "fit-log-likelihood", "fit-summary")


# ---------------------------------------------------------------------------------------------
# processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True`` and its children, by its group id."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # children of the group (a browser's renderers) may outlive the leader
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(10)


def _get_json(url: str, body: dict | None = None, timeout: float = 10.0):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _healthy(api: str) -> bool:
    try:
        return _get_json(f"{api}/health", timeout=2) is True
    except (OSError, urllib.error.URLError, ValueError):
        return False


@pytest.fixture
def loopback_server(tmp_path):
    """``prefect server start`` on a free loopback port with its own PREFECT_HOME (SQLite)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    api = f"{url}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "server-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The UI's idea of where the API is; without it the pages call 127.0.0.1:4200.
        PREFECT_UI_API_URL=api,
    )
    log = open(tmp_path / "prefect-server.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = t0 + 180
        while not _healthy(api):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"prefect server did not start (rc {proc.poll()}):\n"
                            + (tmp_path / "prefect-server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield {"url": url, "api": api, "pid": proc.pid, "startup_s": time.monotonic() - t0}
    finally:
        _stop_group(proc)
        log.close()
    assert proc.poll() is not None


# ---------------------------------------------------------------------------------------------
# the browser


class Chromium:
    """Headless Chromium driven over the DevTools protocol; one page."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1500",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen([CHROMIUM, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._ids = itertools.count(1)
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (rc {self.proc.poll()}); see {self.log.name}")
                time.sleep(0.1)
            port = port_file.read_text().split()[0]
            pages = [t for t in _get_json(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=2**27, open_timeout=30)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params):
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:  # skip events; answers come in order of the single outstanding call
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for_text(self, *needles: str, timeout: float = 60.0) -> str:
        """The page's visible text once it contains every needle; fails with what it shows."""
        deadline = time.monotonic() + timeout
        while True:
            txt = self.text()
            if all(n in txt for n in needles):
                return txt
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in txt]
                raise AssertionError(f"page never showed {missing} within {timeout:.0f} s; it shows:\n{txt[:3000]}")
            time.sleep(0.25)

    def click_text(self, tag: str, label: str) -> None:
        js = (f"(() => {{ const e = [...document.querySelectorAll({tag!r})]"
              f".find(x => x.textContent.trim() === {label!r}); if (e) e.click(); return !!e; }})()")
        assert self.eval(js), f"no <{tag}> labelled {label!r} on the page"

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        _stop_group(self.proc, grace=5)
        self.log.close()


# ---------------------------------------------------------------------------------------------
# the test

FLOW_SCRIPT = textwrap.dedent("""
    import json, sys
    from emflow.storage.synthetic import write_gmm
    from flows.fit import fit_flow

    data = write_gmm(sys.argv[1], 2000, 3, 2, "full", seed=3, chunk_rows=500, separation=6.0)
    state = fit_flow(data, sys.argv[2], n_components=3, scheduler="threads", return_state=True)
    print("RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id),
                                  "state": state.type.value, "model": state.result()}))
""")


def _keep(path: Path) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return Path(shutil.copy2(path, OUTPUT / path.name))


def test_flow_run_page_shows_run_and_artifacts(loopback_server, tmp_path):
    timings = {"server_start_s": loopback_server["startup_s"]}
    api, url = loopback_server["api"], loopback_server["url"]

    # 1. the fit flow, in its own process, against the server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", FLOW_SCRIPT, str(tmp_path / "train.zarr"),
                             str(tmp_path / "model.zarr")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        _stop_group(proc, grace=2)
    timings["flow_s"] = time.monotonic() - t0
    out = out.decode(errors="replace")
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"the fit flow failed (rc {proc.returncode}):\n{out[-4000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["state"] == "COMPLETED"
    assert Path(result["model"]).is_dir()
    run_id = result["flow_run_id"]

    # the server holds the run and its artifacts (so a failure below is the page's, not the flow's)
    run = _get_json(f"{api}/flow_runs/{run_id}")
    assert run["state_type"] == "COMPLETED"
    name = run["name"]
    arts = _get_json(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    by_key = {a["key"]: a for a in arts}
    assert set(ARTIFACT_KEYS) <= set(by_key), sorted(by_key)

    # 2. the flow run page in headless Chromium
    t0 = time.monotonic()
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        timings["browser_start_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        browser.goto(f"{url}/runs/flow-run/{run_id}")
        page = browser.wait_for_text(name, "Completed", "emflow-fit", "Artifacts")
        timings["run_page_s"] = time.monotonic() - t1
        assert "Can't connect to Server API" not in page
        # the run's log lines (per EM iteration) reach the Logs tab, shown first
        browser.wait_for_text("iteration 1: mean log-likelihood", "converged")

        # the Artifacts tab: flow-run artifacts and the task's table artifact, by key and type
        browser.click_text("li", "Artifacts")
        page = browser.wait_for_text(*ARTIFACT_KEYS, "MARKDOWN", "PROGRESS", "TABLE")
        shot = _keep(browser.screenshot(tmp_path / "e2e-flow-run-artifacts.png"))

        # the summary artifact's own page: a user can tell the fit converged, with the plot
        t1 = time.monotonic()
        browser.goto(f"{url}/artifacts/artifact/{by_key['fit-summary']['id']}")
        page = browser.wait_for_text("Gaussian mixture: 3 components", "Converged", "BIC", "Convergence")
        n_img = browser.eval("[...document.querySelectorAll('img')]"
                             ".filter(i => i.src.startsWith('data:image/png') && i.naturalWidth > 0).length")
        timings["artifact_page_s"] = time.monotonic() - t1
        shot2 = _keep(browser.screenshot(tmp_path / "e2e-fit-summary.png"))
    finally:
        browser.close()
    assert browser.proc.poll() is not None
    assert n_img >= 1, "the convergence plot (a PNG data URI) did not render on the summary page"
    assert shot.stat().st_size > 10_000 and shot2.stat().st_size > 10_000
    print("e2e timings:", {k: round(v, 1) for k, v in timings.items()}, "screenshots:", shot, shot2)
