"""What a first-time user trips on: the command line's output and errors, ingest's storage
type, `info` on every dataset layout, scripts without a main guard, bad parameters."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import emflow
from emflow import errors as E
from emflow.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
X = np.random.default_rng(5).normal(size=(120, 2))


def _rows(path, data=X, attrs=None):
    g = zarr.open_group(path, mode="w")
    g.create_array("X", data=data, chunks=(50, data.shape[1]))
    g.attrs.update({"rows": "X", **(attrs or {})})
    return str(path)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.zarr"
    emflow.GaussianMixture(2, scheduler="threads", random_state=0).fit(X).save(path)
    return str(path)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- 1. text from files, paths and exceptions is printed as text, never as rich markup -------

def test_info_prints_attributes_that_look_like_markup(tmp_path):
    data = _rows(tmp_path / "d.zarr", attrs={"note": "[/data/run1]", "style": "[bold red]not bold[/]"})
    r = run("info", data)
    assert r.exit_code == 0, r.output
    assert '"[/data/run1]"' in r.output
    assert '"[bold red]not bold[/]"' in r.output


def test_error_messages_are_not_markup(tmp_path):
    missing = str(tmp_path / "[/b]x[red]y.zarr")
    r = run("fit", missing, "-k", "2", "-o", tmp_path / "m.zarr", "-s", "threads")
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert "[/b]x[red]y.zarr" in line and "Traceback" not in r.output


def test_ingest_prints_column_names_and_bad_rows_as_text(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("[/x],[bold]b\n1,2\n3,[/oops]\n5,6\n")
    r = run("ingest", src, "--out", tmp_path / "o.zarr", "--skip-bad-rows")
    assert r.exit_code == 0, r.output
    assert "[/x]" in r.output and "[bold]b" in r.output
    assert "'[/oops]'" in r.output  # the skipped row's reason quotes the file's text


# --- 2. expected failures are one line with exit status 2; a bug keeps its traceback ---------

def test_predict_onto_a_file_is_one_line(model, tmp_path):
    data = _rows(tmp_path / "d.zarr")
    target = tmp_path / "labels.zarr"
    target.write_text("keep me")
    r = run("predict", model, data, "-o", target, "-s", "threads")
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert str(target) in line and "Traceback" not in r.output
    assert target.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["d.zarr", "labels.zarr"]  # no temporary left behind


def test_predict_onto_a_full_disk_is_one_line(model, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    data = _rows(tmp_path / "d.zarr")
    real_set = LocalStore.set

    async def full(self, key, value, *args, **kw):
        if "p.zarr" in str(self.root):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *args, **kw)

    monkeypatch.setattr(LocalStore, "set", full)
    r = run("predict", model, data, "-o", tmp_path / "p.zarr", "-s", "threads")
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert "No space left on device" in line and "p.zarr" in line and "space" in line.lower()
    assert "Traceback" not in r.output
    assert sorted(os.listdir(tmp_path)) == ["d.zarr"]


def test_ctrl_c_is_one_line_with_status_130(model, tmp_path, monkeypatch):
    import emflow.estimators.outputs

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(emflow.estimators.outputs, "write_output", interrupted)
    r = run("predict", model, _rows(tmp_path / "d.zarr"), "-o", tmp_path / "p.zarr", "-s", "threads")
    assert r.exit_code == 130, r.output
    [line] = _error_lines(r.output)
    assert "interrupted" in line


def test_out_of_memory_is_one_line(model, tmp_path, monkeypatch):
    import emflow.estimators.outputs

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(emflow.estimators.outputs, "write_output", oom)
    r = run("predict", model, _rows(tmp_path / "d.zarr"), "-o", tmp_path / "p.zarr", "-s", "threads")
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert line.startswith("error: out of memory.") and "--partition-mib" in line


def test_a_bug_still_shows_its_traceback(model, tmp_path, monkeypatch):
    import emflow.estimators.outputs

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(emflow.estimators.outputs, "write_output", bug)
    r = run("predict", model, _rows(tmp_path / "d.zarr"), "-o", tmp_path / "p.zarr", "-s", "threads")
    assert r.exit_code == 1 and isinstance(r.exception, ZeroDivisionError)


def test_ingest_errors_exit_2(tmp_path):
    r = run("ingest", tmp_path / "none.csv", "--out", tmp_path / "o.zarr")
    assert r.exit_code == 2 and _error_lines(r.output) == [f"error: No file at '{tmp_path / 'none.csv'}'. Check the path."]


# --- 3. a CSV or .npy given to fit names `emflow ingest`; ingest keeps float32 ------------------

@pytest.mark.parametrize("name", ["data.csv", "data.npy"])
def test_fit_on_a_plain_file_names_emflow_ingest(name, tmp_path):
    src = tmp_path / name
    if name.endswith(".npy"):
        np.save(src, X)
    else:
        src.write_text("a,b\n1,2\n3,4\n")
    r = run("fit", src, "-k", "2", "-o", tmp_path / "m.zarr", "-s", "threads")
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert f"emflow ingest {src} --out" in line and "is a file, not a Zarr dataset" in line
    assert not (tmp_path / "m.zarr").exists()


def test_readme_command_line_section_lists_ingest():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Command line"):]
    section = section[: section.index("\n## ", 3)]
    assert re.search(r"^emflow ingest \S+\.csv --out \S+\.zarr", section, re.M), section


@pytest.mark.parametrize("source_dtype, option, stored", [
    ("float32", [], "float32"), ("float64", [], "float64"), ("int16", [], "float64"),
    ("float32", ["--dtype", "float64"], "float64"), ("float64", ["--dtype", "float32"], "float32"),
])
def test_ingest_keeps_the_source_dtype_unless_told(source_dtype, option, stored, tmp_path):
    src = tmp_path / "a.npy"
    values = (X * 100).astype(source_dtype)
    np.save(src, values)
    r = run("ingest", src, "--out", tmp_path / "o.zarr", *option)
    assert r.exit_code == 0, r.output
    arr = zarr.open_group(tmp_path / "o.zarr", mode="r")["X"]
    assert arr.dtype == np.dtype(stored)
    np.testing.assert_array_equal(arr[...], values.astype(stored))


def test_ingest_csv_stays_float64_and_parquet_float32_stays(tmp_path):
    from emflow.storage.ingest import ingest

    (tmp_path / "t.csv").write_text("a,b\n1.5,2\n3,4\n")
    assert zarr.open_group(ingest(tmp_path / "t.csv", tmp_path / "c.zarr"))["X"].dtype == np.float64
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": np.float32([1, 2]), "b": np.float32([3, 4])}), tmp_path / "t.parquet")
    assert zarr.open_group(ingest(tmp_path / "t.parquet", tmp_path / "p.zarr"))["X"].dtype == np.float32
    pq.write_table(pa.table({"a": np.float32([1, 2]), "b": np.float64([3, 4])}), tmp_path / "m.parquet")
    assert zarr.open_group(ingest(tmp_path / "m.parquet", tmp_path / "m.zarr"))["X"].dtype == np.float64


# --- 4. --version -----------------------------------------------------------------------------

def test_version():
    r = run("--version")
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"emflow {emflow.__version__}"


# --- 5. info on every dataset layout --------------------------------------------------------------

def _fields(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0]:
            out[cells[0]] = cells[1]
    return out


def test_info_rows_array_and_group(tmp_path):
    data = _rows(tmp_path / "d.zarr", attrs={"kind": "rows", "source": "here"})
    for path in (data, data + "/X"):
        r = run("info", path)
        assert r.exit_code == 0, r.output
        f = _fields(r.output)
        assert f["kind"] == "rows" and f["shape"] == "(120, 2)" and f["dtype"] == "float64", r.output
    assert _fields(run("info", data).output)["source"] == '"here"'


def test_info_sequences_group(tmp_path):
    from emflow.storage.synthetic import write_hmm

    path = write_hmm(tmp_path / "h.zarr", 7, 2, 3, min_length=5, max_length=9, seed=0)
    offsets = zarr.open_group(path, mode="r")["offsets"][...]
    r = run("info", path)
    assert r.exit_code == 0, r.output
    f = _fields(r.output)
    assert f["kind"] == "sequences" and f["sequences"] == "7" and f["features"] == "3"
    assert f["shape"] == f"({offsets[-1]}, 3) (steps, features)"


def test_info_corpus_group(tmp_path):
    from emflow.storage.synthetic import write_lda

    path = write_lda(tmp_path / "c.zarr", 40, 25, 3, seed=0)
    g = zarr.open_group(path, mode="r")
    r = run("info", path)
    assert r.exit_code == 0, r.output
    f = _fields(r.output)
    assert f["kind"] == "corpus" and f["shape"] == "(40, 25) (documents, terms)"
    assert f["nonzeros"] == f"{g['indices'].shape[0]:,}" and f["vocabulary"] == "stored"


def test_info_on_a_plain_file_names_ingest(tmp_path):
    (tmp_path / "t.csv").write_text("a\n1\n")
    r = run("info", tmp_path / "t.csv")
    assert r.exit_code == 2 and "emflow ingest" in _error_lines(r.output)[0]


# --- 6. a script without a main guard gets one line, not Dask's bootstrap errors ----------------

def _script(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)


@pytest.mark.parametrize("body, line", [
    ("""
    import numpy as np
    import emflow

    X = np.random.default_rng(0).normal(size=(100, 2))
    emflow.GaussianMixture(2, scheduler="local").fit(X)
    print("fitted")
    """, 6),
    ("""
    import emflow.execution.cluster

    def main():
        emflow.execution.cluster.local_cluster(1).close()

    main()
    if __name__ == "__main__":
        pass
    """, 7),
])
def test_script_without_main_guard_gets_one_line(body, line, tmp_path):
    import emflow.execution.cluster

    p = _script(tmp_path, body)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"emflow.errors.ClusterError: {emflow.execution.cluster.NO_MAIN_GUARD} (line {line} of {tmp_path / 'script.py'})."
    ], p.stderr
    assert "fitted" not in p.stdout


def test_script_with_main_guard_starts_its_cluster(tmp_path):
    p = _script(tmp_path, """
    import emflow.execution.cluster

    def main():
        cluster = emflow.execution.cluster.local_cluster(1, silence_logs=40)
        print("workers", len(cluster.workers))
        cluster.close()

    if __name__ == "__main__":
        main()
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "workers 1"


def test_spawned_child_importing_the_script_is_refused(monkeypatch):
    """The backstop: in a worker process importing an unguarded script (multiprocessing's
    bootstrapping phase), local_cluster raises the same one-line ClusterError."""
    import multiprocessing

    from emflow.execution.cluster import NO_MAIN_GUARD, local_cluster

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(E.ClusterError, match=re.escape(NO_MAIN_GUARD)):
        local_cluster(1)


def test_local_cluster_rejects_zero_workers():
    from emflow.execution.cluster import local_cluster

    with pytest.raises(E.ConfigError, match=r"n_workers must be an integer >= 1 or None .*got 0"):
        local_cluster(0)


# --- 7. every CLI option's bad value is one ConfigError line naming the option -------------------

@pytest.mark.parametrize("args, text", [
    (["fit", "{data}", "-k", "2", "--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1."),
    (["fit", "{data}", "-k", "2", "--workers", "0"], "--workers must be an integer >= 1, got 0."),
    (["fit", "{data}", "-k", "2", "--partition-mib", "-1"], "--partition-mib must be a finite number >= "),
    (["fit", "{data}", "-k", "2", "--partition-mib", "0.0001"], "(1 KiB), got 0.0001."),
    (["fit", "{data}", "-k", "2", "--max-iter", "-1"], "--max-iter: max_iter must be an integer >= 0, got -1."),
    (["predict", "{model}", "{data}", "--workers", "0"], "--workers must be an integer >= 1, got 0."),
    (["generate", "{out}", "--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1."),
    (["generate", "{out}", "--chunk-rows", "0"], "--chunk-rows must be an integer >= 1, got 0."),
    (["generate", "{out}", "--samples", "0"], "--samples must be an integer >= 1, got 0."),
    (["generate", "{out}", "--separation", "-1"], "--separation must be a finite number >= 0, got -1.0."),
])
def test_bad_cli_options(args, text, model, tmp_path):
    data = _rows(tmp_path / "d.zarr")
    subst = {"{data}": data, "{model}": model, "{out}": str(tmp_path / "out.zarr")}
    args = [subst.get(a, a) for a in args]
    if args[0] in ("fit", "predict"):
        args += ["-o", str(tmp_path / "out.zarr"), "-s", "threads"]
    r = run(*args)
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert text in line and "Traceback" not in r.output
    assert not (tmp_path / "out.zarr").exists()


# --- 6b. the README's Python examples run as scripts, as written ---------------------------------

def _readme_examples() -> list[str]:
    """The README's Python examples that run on this machine (the cluster recipes' examples,
    which need a SLURM or Kubernetes cluster, are run by their own tests)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [code for code in blocks if "from deploy." not in code]


def test_readme_examples_are_scripts():
    """Each example imports what it uses and keeps its work under the main guard, so that
    saved as a file it runs (a local cluster's workers import the script)."""
    examples = _readme_examples()
    assert len(examples) >= 2
    for code in examples:
        compile(code, "README example", "exec")
        assert re.search(r"^import emflow$", code, re.M), code
        guard = code.index('if __name__ == "__main__":')
        body = [line for line in code[:guard].splitlines() if line.strip() and not line.startswith("#")]
        assert all(line.startswith(("import ", "from ")) for line in body), body  # only imports above it


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_readme_example_runs_as_written(index, tmp_path):
    """The README's example, saved as a script and run: exit 0, no warning (-W error), nothing
    on stderr, twice. About 75 s and 40 s a run on a loaded 2-core machine."""
    code = _readme_examples()[index]
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for run in range(2):  # run again: the script replaces its own outputs (overwrite=True)
        p = subprocess.run([sys.executable, "-W", "error::UserWarning", "example.py"], capture_output=True,
                           text=True, timeout=900, cwd=tmp_path, env=env)
        assert p.returncode == 0, (run, p.stderr[-3000:])
        assert p.stderr == ""
        assert p.stdout.splitlines()[0].startswith("True")  # converged
