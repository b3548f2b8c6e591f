"""The boundary DESIGN.md draws: model math is pure NumPy and never imports Dask, Zarr or Prefect."""

from __future__ import annotations

import ast
import pathlib

import pytest

MODELS = sorted((pathlib.Path(__file__).resolve().parents[1] / "emflow" / "models").glob("*.py"))
FORBIDDEN = ("dask", "distributed", "zarr", "prefect", "prefect_dask")
# within emflow, model math may use only these modules (no engine, cluster, data or I/O)
ALLOWED_INTERNAL = {"errors", "models", "stats"}


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


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
