"""Storage layer: Zarr in and out (rows, sequences, corpora, ingest, synthetic data), models as
Zarr groups, checkpoints, outputs, output locks, atomic writes and dataset fingerprints."""
