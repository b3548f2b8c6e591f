"""The layers the package's folders are, and the directions their imports may take.

Lowest first: the root modules (errors, stats, checks) < models (pure NumPy math) < execution
and storage (siblings) < estimators < the package's public face (``emflow/__init__.py``) < cli.
A module imports only its own layer or lower ones; the math never imports Dask, Zarr or
Prefect; only execution imports ``distributed``; nothing in emflow imports Prefect or the
repository's ``flows``, ``datasets``, ``deploy`` (outside the allowances below).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "emflow"
MODULES = sorted(PACKAGE.rglob("*.py"))
MODELS = sorted((PACKAGE / "models").glob("*.py"))
FORBIDDEN = ("dask", "distributed", "zarr", "prefect", "prefect_dask")
# within emflow, model math may use only these modules (no engine, cluster, data or I/O)
ALLOWED_INTERNAL = {"errors", "models", "stats"}

ROOT_MODULES = {"errors", "stats", "checks"}
RANK = {"root": 0, "models": 1, "execution": 2, "storage": 2, "estimators": 3, "api": 4, "cli": 5, "testing": 5}
REPO_PACKAGES = ("flows", "datasets", "deploy", "benchmarks", "tests")
# (module, imported name): the only imports that break a rule, each with its reason
ALLOWED = {
    # the worker version probe imports the package on a worker to read its __version__
    ("emflow.execution.cluster", "emflow"),
    # TODO: `emflow demo` runs the Prefect fit flow; the demo is moving out of emflow
    ("emflow.cli.main", "flows.fit"),
    # `emflow flows run / serve` run the repository's flows: imported when that command runs
    ("emflow.cli.flows_cmd", "prefect"),
    ("emflow.cli.flows_cmd", "prefect.flows"),
    ("emflow.cli.flows_cmd", "flows._main"),
}


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """The layer of an emflow module name (``emflow.x.y``); fails for a module in none."""
    parts = module.split(".")
    if parts == ["emflow"]:
        return "api"
    if len(parts) == 2 and parts[1] in ROOT_MODULES:
        return "root"
    if parts[1] in RANK and parts[1] not in ("root", "api"):
        return parts[1]
    raise AssertionError(f"{module} is in no layer: put it in one of {sorted(set(RANK) - {'root', 'api'})} "
                         f"or make it a root module ({sorted(ROOT_MODULES)})")


def _resolved(here: str, source: str, is_package: bool = False):
    """Every import in ``source`` (module ``here``) as (absolute module name, the names it takes, text)."""
    package = here if is_package else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = tuple(a.name for a in node.names)
            yield module, names, f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}"


def _targets(module: str, names: tuple) -> list[str]:
    """The emflow modules an import reaches: ``from emflow import x`` reaches emflow.x when x is a
    module, the package root otherwise (``__version__`` is set before the root imports anything,
    so it counts as a root module)."""
    if module != "emflow" or not names:
        return [module]
    out = []
    for name in names:
        if name == "__version__":
            out.append("emflow.errors")  # any root-layer module: the rank is what matters
        elif (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists():
            out.append(f"emflow.{name}")
        else:
            out.append("emflow")
    return out


def test_every_module_is_in_a_layer():
    assert len(MODULES) > 30
    for path in MODULES:
        _layer(_module_name(path))


def _violations(here: str, source: str, is_package: bool = False) -> list[str]:
    """What breaks the layering in ``source``, the text of emflow module ``here``."""
    layer, found = _layer(here), []
    for module, names, text in _resolved(here, source, is_package):
        top = module.split(".")[0]
        if (here, module) in ALLOWED:
            continue
        if top in ("prefect", "prefect_dask"):
            found.append(f"{here} imports Prefect ({text!r})")
        if top in REPO_PACKAGES:
            found.append(f"{here} imports the repository's {top} ({text!r})")
        if top == "distributed" and layer != "execution":
            found.append(f"{here} imports distributed ({text!r}): only emflow.execution may")
        if layer in ("root", "models") and top in FORBIDDEN:
            found.append(f"{here} ({layer} layer) imports {module} ({text!r})")
        if top != "emflow":
            continue
        for target in _targets(module, names):
            there = _layer(target)
            if RANK[there] > RANK[layer]:
                found.append(f"{here} ({layer} layer) imports {target} ({there} layer, higher): {text!r}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    assert _violations(_module_name(path), path.read_text(), path.name == "__init__.py") == []


@pytest.mark.parametrize("here, source", [
    ("emflow.storage.checkpoint", "from ..estimators.em import IterationEvent"),
    ("emflow.execution.engine", "from emflow.estimators import mixture"),
    ("emflow.estimators.mixture", "from .. import load"),
    ("emflow.estimators.mixture", "from ..cli.main import app"),
    ("emflow.models.gmm", "from ..storage import data"),
    ("emflow.models.gmm", "import zarr"),
    ("emflow.checks", "from .models import gmm"),
    ("emflow.cli.main", "from distributed import Client"),
    ("emflow.storage.data", "def f():\n    import distributed"),
    ("emflow.estimators.lda", "import prefect"),
    ("emflow.estimators.lda", "from flows.fit import fit_flow"),
    ("emflow.storage.store", "from datasets import bundled"),
])
def test_an_offending_import_is_named(here, source):
    found = _violations(here, source)
    assert len(found) == 1 and here in found[0], found


@pytest.mark.parametrize("here, source", [
    ("emflow.estimators.mixture", "from .. import __version__\nfrom ..storage import store\nfrom ..checks import check_int"),
    ("emflow.execution.engine", "from ..storage import data"),  # siblings
    ("emflow.storage.checkpoint", "from ..execution.cluster import engine_for"),
    ("emflow.cli.main", "from .. import load\nfrom ..estimators.mixture import GaussianMixture"),
    ("emflow.models.hmm", "from . import gmm\nfrom ..errors import DataError\nimport scipy"),
])
def test_an_allowed_import_passes(here, source):
    assert _violations(here, source) == []


def test_every_rank_is_ordered():
    assert RANK["root"] < RANK["models"] < RANK["execution"] == RANK["storage"] < RANK["estimators"]
    assert RANK["estimators"] < RANK["api"] < RANK["cli"]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_model_math_imports_no_execution_or_storage_library(path):
    assert len(MODELS) >= 5
    for name, level in _imports(path):
        top = name.split(".")[0]
        if level == 0:
            assert top not in FORBIDDEN and top != "emflow", f"{path.name} imports {name}"
        elif level == 1:  # from .x import ... inside emflow/models
            assert top in ("",) or (path.parent / f"{top}.py").exists(), f"{path.name} imports .{name}"
        else:  # from ..x import ...: emflow's own modules
            assert top in ALLOWED_INTERNAL, f"{path.name} imports {'.' * level}{name}"
