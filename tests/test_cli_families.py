"""The command line for every registered family (issue 20, item 1): `emflow fit --model NAME`
with options generated from the registry, `select`, `score`, `predict` for every declared
output, `flows run` / `flows serve`, and every `--help` at 80 columns.

Every family is driven from its own declarations (``_contract_example``, ``outputs``,
``data_kind``), so a family registered later is tested here with no edit.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import emflow
from emflow.cli import app

# `emflow flows` imports Prefect; imported first under CliRunner, its log handlers would keep
# the runner's temporary stderr (closed after the command) and break every later flow's logging
import prefect.main  # noqa: E402,F401  isort: skip (sets up its logging: here, not under CliRunner)
from emflow.cli import options as O
from emflow.estimators import REGISTRY
from emflow.estimators.base import _cli_name

FAMILIES = O.families()
ITER = 4  # EM iterations per fit here: enough to compare with the Python fit, and fast


@pytest.fixture(autouse=True)
def _one_blas_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def run(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=80, **kw)


def _write(cls, path, fit_args):
    """The family's contract example written to Zarr in its layout."""
    if cls.data_kind == "rows":
        zarr.save_array(str(path), np.asarray(fit_args[0], dtype=np.float64))
    elif cls.data_kind == "sequences":
        from emflow.storage.sequences import write_sequences

        X, lengths = fit_args
        write_sequences(path, np.asarray(X, dtype=np.float64).reshape(len(X), -1),
                        np.concatenate([[0], np.cumsum(lengths)]))
    else:
        from emflow.storage.corpus import write_corpus

        write_corpus(path, fit_args[0])
    return str(path)


def _option_args(cls, kwargs: dict) -> list[str]:
    """Constructor keywords as the command's options (found through the generated labels)."""
    _, labels, _ = O.family_options(cls, _own_names())
    args = []
    for k, v in kwargs.items():
        if k == "random_state":
            args += ["--seed", str(v)]
        elif isinstance(v, bool):
            flag = labels[k].split(" ")[0]
            args.append(flag if v else "--no-" + flag[2:])
        else:
            args += [labels[k].split(" ")[0], json.dumps(v) if not isinstance(v, str) else v]
    return args


def _own_names():
    from typer.main import get_command

    cmd = get_command(app).commands["fit"]
    return cmd._own_names()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Per family: (data path, fit args, constructor keywords, CLI result, model path)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, cls in FAMILIES.items():
        fit_args, kwargs = cls._contract_example(np.random.default_rng(0))
        kwargs = {**kwargs, cls.iter_param: ITER}
        data = _write(cls, root / f"{name}-data.zarr", fit_args)
        model = root / f"{name}-model.zarr"
        r = run("fit", data, "--model", name, *_option_args(cls, kwargs), "-o", model, "-s", "threads")
        out[name] = (data, fit_args, kwargs, r, model)
    return out


# -- fit ---------------------------------------------------------------------------------------

def test_every_family_has_a_model_name():
    assert {"gmm", "gaussian-hmm", "categorical-hmm", "poisson-hmm", "gmm-hmm", "lgssm", "lda"} <= set(FAMILIES)
    assert set(FAMILIES) == {c.cli_name for c in REGISTRY.values()}
    assert _cli_name("bayesian_gaussian_mixture") == "bayesian-gmm"  # the family another helper adds


@pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fit_every_family_equals_the_python_fit(name, fitted):
    data, fit_args, kwargs, r, model = fitted[name]
    assert r.exit_code == 0, r.output
    # the same progress bar and per-iteration line for every family
    lines = re.findall(r"^iter +(\d+)  log-likelihood (\S+)  change", r.output, re.M)
    assert [int(i) for i, _ in lines] == list(range(1, ITER + 1))
    est = emflow.load(model)
    assert type(est) is FAMILIES[name] and est.n_iter_ == ITER
    ref = FAMILIES[name](**kwargs, scheduler="threads").fit(data)
    assert est.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-10)
    assert [float(v) for _, v in lines] == pytest.approx(ref.history_, rel=1e-9)
    for attr in est.fitted.values():
        np.testing.assert_allclose(getattr(est, attr), getattr(ref, attr), rtol=1e-8, atol=1e-12)


def _other_value(param, default, ptype_choices, rule):
    """A value other than the default, typed as the option reads it, and what the estimator gets."""
    from emflow.checks import Int, Real

    if default is None and isinstance(rule, Int):
        return ["2"], 2
    if default is None and isinstance(rule, Real):
        return ["0.5"], 0.5
    if ptype_choices is not None:
        shown = [k for k in ptype_choices if ptype_choices[k] != default][0]
        return [shown], ptype_choices[shown]
    if param.is_flag:
        return [param.opts[0] if not default else param.secondary_opts[0]], not default
    if isinstance(default, bool):
        return None, None
    if isinstance(default, int):
        return [str(default + 1)], default + 1
    if isinstance(default, float):
        return [repr(default + 0.25)], default + 0.25
    if isinstance(default, str):
        return [default + "x"], default + "x"
    return ["[1.5, 2.5]"], [1.5, 2.5]


class _Seen(emflow.EmflowError):
    pass


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_generated_option_reaches_the_estimator(name, monkeypatch, tmp_path, fitted):
    """Each family option, set to another value than its default, is the estimator's parameter;
    values are checked by the estimator (so its rules are skipped here), then fit stops."""
    cls = FAMILIES[name]
    data = fitted[name][0]
    params, labels, choices = O.family_options(cls, _own_names())
    defaults = cls().get_params(deep=False)
    seen = {}

    def fake_fit(self, *a, **k):
        seen.update(self.get_params(deep=False))
        raise _Seen("stopped")

    monkeypatch.setattr(cls, "_validate_params", lambda self: None)
    monkeypatch.setattr(cls, "fit", fake_fit)
    assert params and set(labels) == {p.name[len(O.PREFIX):] for p in params}
    for p in params:
        key = p.name[len(O.PREFIX):]
        args, expected = _other_value(p, defaults[key], choices.get(p.name), cls._rules().get(key))
        if args is None:
            continue
        if not p.is_flag:
            args = [labels[key].split(" ")[0], *args]
        seen.clear()
        r = run("fit", data, "--model", name, *args, "-o", tmp_path / "m.zarr", "-s", "threads")
        assert r.exit_code == 2 and "stopped" in r.output, (key, r.output)
        assert seen[key] == expected, (key, args)
        assert {k: v for k, v in seen.items() if k != key and k not in O.EXECUTION} == \
            {k: v for k, v in defaults.items() if k != key and k not in O.EXECUTION}


def test_common_options_reach_the_estimator(monkeypatch, tmp_path, fitted):
    cls = FAMILIES["gmm"]
    seen = {}

    def fake_fit(self, data, y=None, sample_weight=None, **k):
        seen.update(self.get_params(deep=False), sample_weight=sample_weight)
        raise _Seen("stopped")

    monkeypatch.setattr(cls, "fit", fake_fit)
    data = fitted["gmm"][0]
    w = tmp_path / "w.zarr"
    zarr.save_array(str(w), np.ones(400))
    r = run("fit", data, "-k", "2", "--seed", "7", "--persist", "stream", "--partition-mib", "0.5",
            "--weights", w, "-o", tmp_path / "m.zarr", "-s", "threads")
    assert r.exit_code == 2 and "stopped" in r.output, r.output
    assert (seen["random_state"], seen["persist"], seen["partition_bytes"]) == (7, False, 2**19)
    assert seen["sample_weight"] == str(w)


def test_fit_bad_values_name_the_generated_option(fitted, tmp_path):
    cases = [("gaussian-hmm", ["--n-iter", "-1"], "--n-iter: n_iter must be an integer >= 0, got -1."),
             ("lgssm", ["--state-dim", "0"], "--state-dim: state_dim must be an integer >= 1, got 0."),
             ("gmm-hmm", ["-k", "0"], "--components (-k): n_components must be an integer >= 1, got 0."),
             ("lda", ["--weights", "w.zarr"], "--weights: a LatentDirichletAllocation (lda) takes no row weights."),
             ("gaussian-hmm", ["-c", "banana"], "'banana' is not one of")]
    for name, extra, text in cases:
        r = run("fit", fitted[name][0], "--model", name, *extra, "-o", tmp_path / "m.zarr", "-s", "threads")
        assert r.exit_code == 2 and text in " ".join(r.output.split()), (name, r.output)
        assert not (tmp_path / "m.zarr").exists()


def test_unknown_model_lists_the_registered_ones(tmp_path):
    r = run("fit", tmp_path / "d.zarr", "--model", "banana", "-o", tmp_path / "m.zarr")
    assert r.exit_code == 2
    line = " ".join(r.output.split())
    assert "--model: no registered family 'banana'; choose one of:" in line
    for name in FAMILIES:
        assert name in line


def test_wrong_layout_is_refused_before_a_cluster(fitted, tmp_path):
    r = run("fit", fitted["gmm"][0], "--model", "gaussian-hmm", "-o", tmp_path / "m.zarr", "-s", "tcp://127.0.0.1:1")
    assert r.exit_code == 2 and "sequence" in r.output.lower() and "Dask dashboard" not in r.output


def test_a_family_registered_later_is_on_the_command_line(fitted, tmp_path):
    """A new family, and a new parameter (e.g. `accelerate`), appear with no CLI edit."""
    from emflow.checks import Choice
    from emflow.estimators.mixture import GaussianMixture

    class ToyGaussianMixture(GaussianMixture):
        """A mixture with one more parameter.

        Parameters
        ----------
        accelerate : {"em", "squarem"}, default "em"
            How EM steps are accelerated.
        """

        family = "toy_gaussian_mixture"
        _param_rules = {"accelerate": Choice("em", "squarem")}

        def __init__(self, n_components=1, *, accelerate="em", **kw):
            super().__init__(n_components, **kw)
            self.accelerate = accelerate

    ToyGaussianMixture._get_param_names = classmethod(
        lambda cls: sorted({*GaussianMixture._get_param_names(), "accelerate"}))
    try:
        assert ToyGaussianMixture.cli_name == "toy-gmm"
        r = run("fit", "--model", "toy-gmm", "--help")
        assert r.exit_code == 0 and "--accelerate" in r.output and "How EM steps are accelerated." in r.output
        assert "<em|squarem>" in r.output
        r = run("fit", fitted["gmm"][0], "--model", "toy-gmm", "-k", "2", "--accelerate", "squarem",
                "--max-iter", "2", "-o", tmp_path / "toy.zarr", "-s", "threads", "--seed", "0")
        assert r.exit_code == 0, r.output
        est = emflow.load(tmp_path / "toy.zarr")
        assert type(est) is ToyGaussianMixture and est.accelerate == "squarem" and est.n_components == 2
        assert "toy-gmm" in run("fit", "--help").output
    finally:
        del REGISTRY["toy_gaussian_mixture"]


# -- predict and score, every declared output ----------------------------------------------------

def _outputs():
    return [(n, k) for n, c in FAMILIES.items() for k in c.outputs]


@pytest.mark.parametrize("name, kind", _outputs())
def test_predict_writes_every_declared_output(name, kind, fitted, tmp_path):
    data, fit_args, _, r, model = fitted[name]
    assert r.exit_code == 0, r.output
    out = tmp_path / f"{kind}.zarr"
    r = run("predict", model, data, "--what", kind, "-o", out, "-s", "threads")
    assert r.exit_code == 0, r.output
    est = emflow.load(model)
    method = getattr(est, type(est).outputs[kind].method)
    node = zarr.open(str(out), mode="r")
    got = np.asarray(node["values"] if isinstance(node, zarr.Group) else node)
    # the same output computed in memory from the same data
    ref = method(*fit_args)
    ref = np.asarray(ref[0] if isinstance(ref, tuple) else ref)
    np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-8, atol=1e-10)
    assert f"wrote {kind}" in r.output


@pytest.mark.parametrize("name", list(FAMILIES))
def test_score_prints_the_model_scores_and_writes_every_output(name, fitted, tmp_path):
    data, fit_args, _, r, model = fitted[name]
    r = run("score", model, data, "-o", tmp_path / "scores", "--what", "all", "-s", "threads")
    assert r.exit_code == 0, r.output
    est = emflow.load(model)
    values = dict(re.findall(r"│ (score|BIC|AIC) +│ +(\S+) │", r.output))
    assert float(values["score"]) == pytest.approx(est.score(data), rel=1e-9)
    try:
        bic, aic = est.bic(data), est.aic(data)
    except NotImplementedError:  # a family without BIC (LDA): not shown
        assert "BIC" not in values and "AIC" not in values
    else:
        assert float(values["BIC"]) == pytest.approx(bic, rel=1e-9)
        assert float(values["AIC"]) == pytest.approx(aic, rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == sorted(f"{k}.zarr" for k in est.outputs)


def test_score_without_out_dir_writes_nothing_and_checks_what(fitted, tmp_path):
    data, _, _, _, model = fitted["lda"]
    r = run("score", model, data, "--what", "labels", "-s", "threads")
    assert r.exit_code == 2 and "which writes topics; it has no labels" in " ".join(r.output.split())
    r = run("score", model, data, "-s", "threads")
    assert r.exit_code == 0 and "score" in r.output


# -- select ----------------------------------------------------------------------------------------

def test_select_prints_the_ranked_table_and_saves_the_best(fitted, tmp_path):
    from emflow.estimators.selection import select_gaussian_mixture

    data = fitted["gmm"][0]
    r = run("select", data, "-k", "1,2,3", "-c", "full,diag", "--max-iter", "20", "--n-init", "1", "--tol", "1e-3",
            "--reg-covar", "1e-6", "--seed", "0", "--persist", "memory", "-o", tmp_path / "best.zarr", "-s", "threads")
    assert r.exit_code == 0, r.output
    ref = select_gaussian_mixture(data, [1, 2, 3], ["full", "diag"], max_iter=20, random_state=0, scheduler="threads")
    rows = re.findall(r"^ *(\d+)( \*)? +(\d+) +(\w+) +(\d+) +(\S+) +(\S+) +(\S+) +(True|False) +(\d+) *$",
                      r.output, re.M)
    assert len(rows) == 6
    for got, want in zip(rows, ref.ranked_table()):
        assert (int(got[0]), int(got[2]), got[3]) == (want["rank"], want["n_components"], want["covariance_type"])
        assert float(got[6]) == pytest.approx(want["bic"], abs=0.006)
        assert bool(got[1]) == want["chosen"]
    best = emflow.load(tmp_path / "best.zarr")
    assert best.lower_bound_ == pytest.approx(ref.best_model.lower_bound_, rel=1e-12)
    table = r.output[r.output.index("candidates ranked"):r.output.index("passes over the data")]
    assert all(len(line) <= 80 for line in table.splitlines())


def test_select_weights_overwrite_workers(fitted, tmp_path):
    from emflow.estimators.selection import select_gaussian_mixture

    data = fitted["gmm"][0]
    w = tmp_path / "w.zarr"
    zarr.save_array(str(w), np.arange(400) % 3 + 1.0)
    best = tmp_path / "best.zarr"
    args = ["select", data, "-k", "2,3", "--weights", w, "--max-iter", "10", "-o", best, "-s", "threads"]
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 2 and "--overwrite" in r.output  # an existing model is replaced only when asked
    r = run(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    ref = select_gaussian_mixture(data, [2, 3], sample_weight=str(w), max_iter=10, random_state=0, scheduler="threads")
    assert emflow.load(best).lower_bound_ == pytest.approx(ref.best_model.lower_bound_, rel=1e-12)
    assert emflow.load(best).fit_info_["weighted"] is True
    r = run("select", data, "--workers", "0")
    assert r.exit_code == 2 and "--workers must be an integer >= 1, got 0." in r.output


def test_score_overwrite_and_workers(fitted, tmp_path):
    data, _, _, _, model = fitted["gmm"]
    args = ["score", model, data, "-o", tmp_path / "s", "--what", "labels", "-s", "threads"]
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert run(*args, "--overwrite").exit_code == 0
    r = run("score", model, data, "--workers", "0")
    assert r.exit_code == 2 and "--workers must be an integer >= 1, got 0." in r.output


def test_select_bad_grid(fitted, tmp_path):
    r = run("select", fitted["gmm"][0], "-k", "2,x", "-s", "threads")
    assert r.exit_code == 2 and "--components (-k) must be comma-separated integers" in r.output
    r = run("select", fitted["gmm"][0], "-k", "2", "-c", "banana", "-s", "threads")
    assert r.exit_code == 2 and "--covariance (-c): covariance_type must be one of" in " ".join(r.output.split())


# -- flows -------------------------------------------------------------------------------------------

def test_flows_list_and_run_dispatch(monkeypatch):
    import flows._main

    r = run("flows", "list")
    assert r.exit_code == 0 and re.search(r"^fit_model +emflow-fit-model$", r.output, re.M), r.output
    calls = []
    monkeypatch.setattr(flows._main, "main", lambda flow, argv, module: calls.append((flow.name, argv, module)) or 0)
    r = run("flows", "run", "emflow-fit-model", "--param", "data=d.zarr", "-p", "params={\"n_components\": 2}",
            "--params", '{"out": "m.zarr"}')
    assert r.exit_code == 0, r.output
    assert calls == [("emflow-fit-model", ["--param", "data=d.zarr", "--param", 'params={"n_components": 2}',
                                           "--params", '{"out": "m.zarr"}'], "flows.fit_model")]
    r = run("flows", "run", "nope")
    assert r.exit_code == 2 and "no flow 'nope' in flows/; choose one of:" in r.output and "fit_model" in r.output


def test_flows_run_bad_parameter_is_the_flow_usage():
    r = run("flows", "run", "score", "--param", "banana=1")
    assert r.exit_code == 2
    assert "'emflow-score' has no parameter banana" in r.output and "usage: python -m flows.score" in r.output


def test_flows_serve_serves_the_deployments(monkeypatch):
    import prefect

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *deps: served.extend(deps))
    r = run("flows", "serve", "--only", "nightly-fit", "--only", "hourly-score")
    assert r.exit_code == 0, r.output
    assert sorted(d.name for d in served) == ["hourly-score", "nightly-fit"]
    r = run("flows", "serve", "--only", "banana")
    assert r.exit_code == 2 and "no deployment banana" in r.output


def test_flows_say_when_the_repository_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "flows", None)
    r = run("flows", "list")
    assert r.exit_code == 2 and "`flows/` is not importable" in " ".join(r.output.split())


@pytest.mark.slow
def test_flows_run_fits_a_model(tmp_path, fitted, prefect_server):
    data = fitted["poisson-hmm"][0]
    out = tmp_path / "m.zarr"
    r = run("flows", "run", "fit_model", "--param", f"data={data}", "--param", f"out={out}",
            "--param", "family=poisson_hmm", "--param", 'params={"n_components": 2, "n_iter": 3}',
            "--param", "scheduler=threads")
    assert r.exit_code == 0, r.output
    assert emflow.load(out).n_iter_ == 3


# -- help at 80 columns ------------------------------------------------------------------------------

COMMANDS = [["fit"], ["select"], ["score"], ["predict"], ["info"], ["generate"], ["ingest"], ["flows"],
            ["flows", "run"], ["flows", "serve"], ["flows", "list"], []]


@pytest.mark.parametrize("args", COMMANDS + [["fit", "--model", n] for n in FAMILIES], ids=" ".join)
def test_help_is_readable_at_80_columns(args, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = run(*args, "--help")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in r.output
    if len(args) == 3:  # a family's options are all there, in full
        params, labels, _ = O.family_options(FAMILIES[args[2]], _own_names())
        for label in labels.values():
            assert label.split(" ")[0] in r.output


# -- the README's command-line examples run as written -------------------------------------------

def _readme_commands() -> list[list[str]]:
    import pathlib
    import shlex

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Command line"):]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_command_line_examples_run(tmp_path, monkeypatch):
    """Every `emflow` line of the README's Command line section, in a folder holding the data the
    second block names (a sequences group, counts, tracks, a corpus, a CSV); Dask runs in
    threads here (the README's lines start a local cluster, or use the one they name)."""
    import contextlib

    from emflow.cli import apply, fit as fit_module, main
    from emflow.storage.corpus import write_corpus
    from emflow.storage.sequences import write_sequences

    @contextlib.contextmanager
    def threads(address, workers):
        yield "threads"

    for module in (main, fit_module, apply):
        monkeypatch.setattr(module, "_scheduler", threads)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "data.csv").write_text("a,b\n" + "\n".join(f"{x:.4f},{y:.4f}" for x, y in rng.normal(size=(50, 2))))
    for name in ("gaussian-hmm", "poisson-hmm", "lgssm"):
        cls = FAMILIES[name]
        X, lengths = cls._contract_example(rng)[0]
        write_sequences(tmp_path / {"gaussian-hmm": "steps.zarr", "poisson-hmm": "counts.zarr",
                                    "lgssm": "tracks.zarr"}[name],
                        np.asarray(X, dtype=np.float64).reshape(len(X), -1), np.concatenate([[0], np.cumsum(lengths)]))
    write_corpus(tmp_path / "corpus.zarr", FAMILIES["lda"]._contract_example(rng)[0][0])
    commands = _readme_commands()
    assert len(commands) >= 12 and all(c[0] == "emflow" for c in commands)
    for cmd in commands:
        r = run(*cmd[1:])
        assert r.exit_code == 0, (cmd, r.output)
    assert type(emflow.load(tmp_path / "hmm.zarr")).__name__ == "GaussianHMM"
    assert emflow.load(tmp_path / "lda.zarr").n_components == 10
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["labels.zarr", "log_likelihood.zarr",
                                                                       "proba.zarr"]
