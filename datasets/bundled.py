"""Real data that ship inside an installed package: scikit-learn's bundled CSV files.

scikit-learn keeps a few classic datasets as plain CSV files in ``sklearn/datasets/data``.
This recipe finds that folder in the installed package (no download, and no scikit-learn
code is imported) and streams the chosen file through :func:`emflow.storage.ingest.ingest`::

    python -m datasets.bundled wine data/wine.zarr

The files start with one line of metadata (``178,13,class_0,class_1,class_2``) and end
each row with the class label; the recipe keeps only the feature columns. scikit-learn
must be installed for the files to be there (it is in emflow's ``test`` extra); nothing
else from it is needed at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass

from emflow.errors import DataNotFoundError
from emflow.storage.ingest import ingest

__all__ = ["BUNDLED", "bundled_path", "ingest_bundled"]


@dataclass(frozen=True)
class Bundled:
    file: str
    n_samples: int
    n_features: int
    skip_rows: int  # metadata lines before the first data row
    description: str


BUNDLED = {
    "iris": Bundled("iris.csv", 150, 4, 1, "Fisher's iris: 3 species, 4 measurements"),
    "wine": Bundled("wine_data.csv", 178, 13, 1, "UCI wine: 3 cultivars, 13 chemical measurements"),
    "breast_cancer": Bundled("breast_cancer.csv", 569, 30, 1, "Wisconsin diagnostic breast cancer, 30 features"),
    "digits": Bundled("digits.csv.gz", 1797, 64, 0, "8x8 handwritten digits, 64 pixel intensities 0-16"),
}


def bundled_path(name: str) -> str:
    """Path of a bundled CSV inside the installed scikit-learn (found without importing it)."""
    if name not in BUNDLED:
        raise KeyError(f"Unknown bundled dataset {name!r}; choose one of {sorted(BUNDLED)}.")
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "scikit-learn is not installed, so its bundled datasets are not on this machine. "
            "pip install scikit-learn (or emflow[test])."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", BUNDLED[name].file)
    if not os.path.exists(path):
        raise DataNotFoundError(f"{path!r} is missing from this scikit-learn installation.")
    return path


def ingest_bundled(name: str, out, *, dtype: str = "float64", chunk_rows: int | None = None,
                   overwrite: bool = False) -> str:
    """Ingest one bundled dataset's feature columns into a Zarr rows dataset; returns its path."""
    b = BUNDLED[name]
    return ingest(bundled_path(name), out, format="csv", header=False, skip_rows=b.skip_rows,
                  columns=list(range(b.n_features)), dtype=dtype, chunk_rows=chunk_rows, overwrite=overwrite)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(BUNDLED))
    p.add_argument("out")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    path = ingest_bundled(a.name, a.out, dtype=a.dtype, chunk_rows=a.chunk_rows, overwrite=a.overwrite)
    print(path)


if __name__ == "__main__":
    main()
