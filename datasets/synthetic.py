"""Synthetic Gaussian-mixture data of any size, with the true parameters stored beside it.

A thin command around :func:`emflow.storage.synthetic.write_gmm` (seeded, written chunk by chunk,
memory bounded by one chunk)::

    python -m datasets.synthetic data/gmm.zarr --size 8GiB --features 16 --components 5
    python -m datasets.synthetic data/small.zarr --rows 100000 --covariance-type diag --seed 3

The group holds ``X`` (rows x features), ``labels`` (the true component of each row) and
``attrs["truth"]`` (weights, means, covariances), so a fit can be checked against the truth.
"""

from __future__ import annotations

import argparse

import numpy as np

from emflow.storage.synthetic import write_gmm

from .larger_than_memory import parse_size

__all__ = ["make"]


def make(out, *, rows: int | None = None, size=None, features: int = 8, components: int = 4,
         covariance_type: str = "full", separation: float = 4.0, seed: int = 0, dtype: str = "float64",
         chunk_rows: int | None = None, weights: bool = False, progress=None) -> str:
    """Write ``rows`` rows (or as many as ``size`` bytes hold) of mixture data; returns the path."""
    if (rows is None) == (size is None):
        raise ValueError("Give exactly one of rows or size.")
    if rows is None:
        rows = max(components, parse_size(size) // (features * np.dtype(dtype).itemsize))
    return write_gmm(out, int(rows), components, features, covariance_type, separation=separation, seed=seed,
                     chunk_rows=chunk_rows, dtype=dtype, weights=weights, progress=progress)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="Write Gaussian-mixture data with known truth to Zarr.")
    p.add_argument("out")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rows", type=int)
    g.add_argument("--size", help="Data size instead of rows, e.g. 500MiB, 8GiB.")
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--covariance-type", default="full", choices=["full", "tied", "diag", "spherical"])
    p.add_argument("--separation", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--weights", action="store_true", help="Also write integer-valued row weights.")
    a = p.parse_args(argv)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        total = a.rows or max(a.components, parse_size(a.size) // (a.features * np.dtype(a.dtype).itemsize))
        task = bar.add_task("writing rows", total=total)
        path = make(a.out, rows=total, features=a.features, components=a.components,
                    covariance_type=a.covariance_type, separation=a.separation, seed=a.seed, dtype=a.dtype,
                    chunk_rows=a.chunk_rows, weights=a.weights, progress=lambda n: bar.advance(task, n))
    print(path)
    return path


if __name__ == "__main__":
    main()
