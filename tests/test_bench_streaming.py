"""The streaming benchmark measures what it says (no timing assertions): its decoder turns
each stored chunk back into the values Zarr reads, and every codec and chunk size holds the
same values."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_streaming",
                                                  os.path.join(ROOT, "benchmarks", "bench_streaming.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decoder_reads_back_what_zarr_stores_for_every_codec(tmp_path):
    import zarr

    b = _bench()
    first = None
    for codec in b.CODECS:
        for chunk_mib in ((1, 4) if codec in ("none", "blosc-zstd3") else (4,)):
            path = b.dataset(str(tmp_path), codec, chunk_mib, 0.0078125, 2, 3, 0)  # one 8 MiB block
            X = zarr.open_group(path, mode="r")["X"][:]
            files = b.chunk_files(path)
            assert len(files) == -(-len(X) // (chunk_mib * 2**20 // 16))
            _, blobs = b.read_all(files, 2)
            dec = b.decoder(codec)
            # chunk files sort as c/0/0, c/1/0, c/10/0...: put them in row order
            order = sorted(range(len(files)), key=lambda i: int(files[i].split(os.sep)[-2]))
            got = np.concatenate([dec(blobs[i]) for i in order]).reshape(-1, 2)
            np.testing.assert_array_equal(got, X)
            if first is None:
                first = X
            np.testing.assert_array_equal(X, first)  # same values whatever the codec and chunking
    assert first.shape == (2**19, 2)
    # cached: a second call finds the dataset and does not rewrite it
    mtime = os.path.getmtime(os.path.join(path, "zarr.json"))
    assert b.dataset(str(tmp_path), "zstd", 4, 0.0078125, 2, 3, 0) == path
    assert os.path.getmtime(os.path.join(path, "zarr.json")) == mtime


def test_medians_take_each_case_median():
    b = _bench()
    rs = [{"codec": "none", "chunk_mib": 8, "stream_s": s, "load": f"{l}/1/1"} for s, l in ((3.0, 2.0), (1.0, 5.0), (2.0, 4.0))]
    [m] = b.medians(rs)
    assert m["stream_s"] == 2.0 and m["load"].startswith("2.0-5.0")


@pytest.mark.slow  # starts a LocalCluster and fits: ~20-40 s on 2 shared cores
def test_benchmark_runs_end_to_end(tmp_path):
    b = _bench()
    res = b.main(["--dir", str(tmp_path), "--gib", "0.015625", "--d", "2", "--K", "2", "--codecs", "none",
                  "blosc-lz4", "--chunk-mib", "1", "--iters", "2", "--memory-limit", "1GiB"])
    assert [r["codec"] for r in res] == ["none", "blosc-lz4"]
    for r in res:
        assert r["stream_s"] > 0 and r["bound_s"] > 0 and r["partitions"] >= 4
        assert r["stored_mib"] <= 16.01
