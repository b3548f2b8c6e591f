"""Model families as pure NumPy math (no Dask, Zarr or Prefect imports here)."""
