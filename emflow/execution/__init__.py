"""Execution layer: the engine that maps over partitions and tree-reduces statistics, and the
Dask clusters it runs on. The only part of emflow that imports ``distributed``."""
