"""Ingestion: exact round trips, chunking, bad rows, the report against numpy, atomicity, fuzz."""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import tempfile

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emflow.storage.data import open_rows
from emflow.errors import ConfigError, DataError
from emflow.storage.ingest import ColumnStats, ingest, read_report
from emflow.storage.sequences import open_sequences


def write_csv(path, X, names=None, fmt=repr):
    with open(path, "w") as f:
        if names is not None:
            f.write(",".join(names) + "\n")
        for row in X:
            f.write(",".join(fmt(float(v)) for v in row) + "\n")
    return path


def read_X(path):
    arr, _ = open_zarr(path)
    return arr[...]


def open_zarr(path):
    g = zarr.open_group(path, mode="r")
    return g[g.attrs["rows"]], g


@pytest.fixture
def X(rng):
    return rng.normal(size=(250, 4)) * [1.0, 10.0, 1e-3, 1e6]


# -- round trips -------------------------------------------------------------------------
def test_csv_round_trip_exact_with_chunking(tmp_path, X):
    src = write_csv(tmp_path / "a.csv", X, ["a", "b", "c", "d"])
    out = ingest(src, tmp_path / "a.zarr", chunk_rows=37)
    arr, g = open_zarr(out)
    assert arr.shape == (250, 4) and arr.chunks == (37, 4) and arr.dtype == np.float64
    np.testing.assert_array_equal(arr[...], X)
    assert g.attrs["columns"] == ["a", "b", "c", "d"] and g.attrs["kind"] == "rows"
    # emflow reads it, partitioned in whole chunks
    rows = open_rows(out, partition_bytes=37 * 4 * 8 * 2)
    assert rows.n_rows == 250 and [b - a for a, b in rows.bounds][:3] == [74, 74, 74]
    np.testing.assert_array_equal(np.concatenate([ld()[0] for ld in rows.loaders]), X)


def test_default_chunk_rows_from_chunk_bytes(tmp_path, X):
    src = write_csv(tmp_path / "a.csv", X, list("abcd"))
    out = ingest(src, tmp_path / "a.zarr", chunk_bytes=1000)  # 1000 // 32 = 31 rows
    assert open_zarr(out)[0].chunks == (31, 4)
    out = ingest(src, tmp_path / "b.zarr", chunk_bytes=1000, dtype="float32")  # 1000 // 16
    arr, _ = open_zarr(out)
    assert arr.chunks == (62, 4) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[...], X.astype(np.float32))
    npy = tmp_path / "a.npy"
    np.save(npy, X)
    assert open_zarr(ingest(npy, tmp_path / "c.zarr"))[0].chunks == (250, 4)  # capped at the row count


def test_columns_by_name_and_position_and_gzip_tsv(tmp_path, X):
    src = tmp_path / "a.tsv.gz"
    with gzip.open(src, "wt") as f:
        f.write("a\tb\tc\td\n")
        for row in X:
            f.write("\t".join(repr(float(v)) for v in row) + "\n")
    out = ingest(src, tmp_path / "a.zarr", columns=["d", "a"], compression="gzip")
    arr, g = open_zarr(out)
    np.testing.assert_array_equal(arr[...], X[:, [3, 0]])
    assert g.attrs["columns"] == ["d", "a"]
    out = ingest(src, tmp_path / "b.zarr", columns=[2, "1"], compression="none")
    np.testing.assert_array_equal(read_X(out), X[:, [2, 1]])
    with pytest.raises(ConfigError, match="No column named 'zz'.*a, b, c, d"):
        ingest(src, tmp_path / "c.zarr", columns=["zz"])


def test_headerless_csv_with_leading_lines(tmp_path, X):
    src = tmp_path / "a.csv"
    buf = io.StringIO()
    buf.write("250,4,meta,line\n")
    csv.writer(buf).writerows([[repr(float(v)) for v in r] + ["label"] for r in X])
    src.write_text(buf.getvalue())
    out = ingest(src, tmp_path / "a.zarr", header=False, skip_rows=1, columns=[0, 1, 2, 3])
    np.testing.assert_array_equal(read_X(out), X)


def test_npy_round_trip_memory_mapped(tmp_path, X):
    np.save(tmp_path / "a.npy", X)
    out = ingest(tmp_path / "a.npy", tmp_path / "a.zarr", chunk_rows=64)
    np.testing.assert_array_equal(read_X(out), X)
    np.save(tmp_path / "v.npy", X[:, 0])  # 1-D becomes one column
    np.testing.assert_array_equal(read_X(ingest(tmp_path / "v.npy", tmp_path / "v.zarr")), X[:, :1])
    np.save(tmp_path / "i.npy", np.arange(12, dtype=np.int16).reshape(4, 3))
    np.testing.assert_array_equal(read_X(ingest(tmp_path / "i.npy", tmp_path / "i.zarr", columns=[2, 0])),
                                  np.arange(12).reshape(4, 3)[:, [2, 0]])


def test_parquet_round_trip(tmp_path, X):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ints = pa.array([None if i % 7 == 0 else i for i in range(len(X))], type=pa.int64())
    table = pa.table({"a": X[:, 0], "n": ints, "b": X[:, 1], "s": [str(i) for i in range(len(X))]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=60)
    out = ingest(tmp_path / "a.parquet", tmp_path / "a.zarr", columns=["a", "n", "b"], chunk_rows=50)
    got = read_X(out)
    expect_n = np.array([np.nan if i % 7 == 0 else i for i in range(len(X))])
    np.testing.assert_array_equal(got, np.column_stack([X[:, 0], expect_n, X[:, 1]]))
    assert read_report(out)["nan"] == [0, 36, 0]
    with pytest.raises(DataError, match="Column 's'.*not numeric"):
        ingest(tmp_path / "a.parquet", tmp_path / "b.zarr")


def test_hdf5_round_trip(tmp_path, X):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("grp/X", data=X, chunks=(16, 4))
        f.create_dataset("other", data=X[:10])
    with pytest.raises(ConfigError, match="name the one to ingest"):
        ingest(tmp_path / "a.h5", tmp_path / "a.zarr")
    out = ingest(tmp_path / "a.h5", tmp_path / "a.zarr", key="grp/X", chunk_rows=100)
    np.testing.assert_array_equal(read_X(out), X)


# -- bad rows ----------------------------------------------------------------------------
BAD = "a,b\n1,2\n3,4\n5\n6,x7\n,8\n9,10\n\n11,12,13\n14,15\n"


def test_bad_rows_error_names_the_line(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text(BAD)
    with pytest.raises(DataError, match=r"line 4: 1 field\(s\), expected 2.*skip-bad-rows"):
        ingest(src, tmp_path / "o.zarr")
    src.write_text("a,b\n1,2\n3,4\n6,x7\n")
    with pytest.raises(DataError, match=r"line 4: column 'b' holds 'x7', which is not a number"):
        ingest(src, tmp_path / "o.zarr")
    assert not os.path.exists(tmp_path / "o.zarr")


def test_bad_rows_skipped_and_counted(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text(BAD)
    out = ingest(src, tmp_path / "o.zarr", on_bad_rows="skip", chunk_rows=2)
    np.testing.assert_array_equal(read_X(out), [[1, 2], [3, 4], [np.nan, 8], [9, 10], [14, 15]])
    rep = read_report(out)
    assert rep["skipped_rows"] == 3 and rep["rows"] == 5 and rep["nan"] == [1, 0]
    assert [e.split(":")[0] for e in rep["skipped_examples"]] == ["line 4", "line 5", "line 9"]


def test_no_good_rows_and_bad_options(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("a,b\nx,y\n")
    with pytest.raises(DataError, match="no data rows .*1 bad row"):
        ingest(src, tmp_path / "o.zarr", on_bad_rows="skip")
    with pytest.raises(ConfigError, match="dtype"):
        ingest(src, tmp_path / "o.zarr", dtype="int8")
    with pytest.raises(ConfigError, match="format"):
        ingest(src, tmp_path / "o.zarr", format="xls")
    (tmp_path / "f.dat").write_text("1\n")
    with pytest.raises(ConfigError, match="extension"):
        ingest(tmp_path / "f.dat", tmp_path / "o.zarr")


# -- the report --------------------------------------------------------------------------
def test_report_matches_numpy(tmp_path, rng):
    X = rng.normal(size=(500, 3)) * [1, 5, 0.1] + [0, -3, 7]
    X[[3, 77, 400], 0] = np.nan
    X[10, 1], X[11, 1], X[12, 2] = np.inf, -np.inf, np.inf
    np.save(tmp_path / "a.npy", X)
    out = ingest(tmp_path / "a.npy", tmp_path / "a.zarr", chunk_rows=33)
    rep = read_report(out)
    fin = np.where(np.isfinite(X), X, np.nan)
    assert rep["rows"] == 500 and rep["columns"] == ["0", "1", "2"]
    np.testing.assert_allclose(rep["mean"], np.nanmean(fin, axis=0), rtol=1e-13)
    np.testing.assert_allclose(rep["std"], np.nanstd(fin, axis=0), rtol=1e-12)
    np.testing.assert_array_equal(rep["min"], np.nanmin(fin, axis=0))
    np.testing.assert_array_equal(rep["max"], np.nanmax(fin, axis=0))
    assert rep["count"] == [497, 498, 499] and rep["nan"] == [3, 0, 0]
    assert rep["posinf"] == [0, 1, 1] and rep["neginf"] == [0, 1, 0]
    assert rep["source"]["format"] == "npy" and rep["source"]["size_bytes"] == os.path.getsize(tmp_path / "a.npy")
    g = zarr.open_group(out, mode="r")
    assert g.attrs["fingerprint"] == rep["fingerprint"]
    # the fingerprint is of the stored values, whatever the chunking or the source format
    write_csv(tmp_path / "a.csv", X, ["0", "1", "2"])
    out2 = ingest(tmp_path / "a.csv", tmp_path / "b.zarr", chunk_rows=128)
    assert read_report(out2)["fingerprint"] == rep["fingerprint"]
    X[0, 0] += 1e-9
    np.save(tmp_path / "c.npy", X)
    assert read_report(ingest(tmp_path / "c.npy", tmp_path / "c.zarr"))["fingerprint"] != rep["fingerprint"]


def test_streaming_std_is_stable_with_a_large_offset():
    x = 1e9 + np.random.default_rng(1).normal(size=(10_000, 1)) * 1e-3
    s = ColumnStats(1)
    for a in range(0, len(x), 997):
        s.update(x[a : a + 997])
    np.testing.assert_allclose(s.std, np.std(x - 1e9, axis=0), rtol=1e-6)
    np.testing.assert_allclose(s.mean, np.mean(x, axis=0), rtol=1e-15)
    empty = ColumnStats(2)
    empty.update(np.array([[np.nan, 1.0]]))
    assert empty.to_dict()["mean"] == [None, 1.0]


# -- atomicity ---------------------------------------------------------------------------
def test_interrupted_ingest_leaves_nothing(tmp_path, X):
    src = write_csv(tmp_path / "a.csv", X, list("abcd"))
    calls = []

    def boom(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        ingest(src, tmp_path / "a.zarr", chunk_rows=50, progress=boom)
    assert calls == [50, 50]
    assert sorted(os.listdir(tmp_path)) == ["a.csv"]  # no dataset, no temporary sibling
    # an existing dataset survives a failed overwrite untouched
    good = ingest(src, tmp_path / "a.zarr", chunk_rows=50)
    with pytest.raises(ConfigError, match="already holds an emflow rows dataset. Pass overwrite=True"):
        ingest(src, good)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        ingest(src, good, chunk_rows=50, progress=boom, overwrite=True)
    np.testing.assert_array_equal(read_X(good), X)
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "a.zarr"]


# -- sequences ---------------------------------------------------------------------------
def test_sequences_from_csv(tmp_path, rng):
    lengths = [3, 1, 7, 2, 5]
    ids = np.repeat(["s1", "b", "s3", "zz", "s1x"], lengths)
    V = rng.normal(size=(sum(lengths), 2))
    src = tmp_path / "seq.csv"
    with open(src, "w") as f:
        f.write("x,id,y\n")
        for i, (a, b) in zip(ids, V):
            f.write(f"{float(a)!r},{i},{float(b)!r}\n")
    out = ingest(src, tmp_path / "seq.zarr", sequence_column="id", chunk_rows=4)
    g = zarr.open_group(out, mode="r")
    assert g.attrs["kind"] == "sequences" and g.attrs["n_sequences"] == 5 and g.attrs["columns"] == ["x", "y"]
    np.testing.assert_array_equal(g["offsets"][...], np.concatenate([[0], np.cumsum(lengths)]))
    seq = open_sequences(out)
    assert seq.n_sequences == 5
    np.testing.assert_array_equal(g["values"][...], V)
    vals, off = seq.loaders[0]()
    np.testing.assert_array_equal(vals, V)
    np.testing.assert_array_equal(off, seq.offsets)
    # an id that comes back after another sequence is an error that says what to do
    with open(src, "a") as f:
        f.write("1.0,b,2.0\n")
    with pytest.raises(DataError, match="'b' .* appears again.*sort the file"):
        ingest(src, tmp_path / "seq2.zarr", sequence_column="id", chunk_rows=4)
    assert not os.path.exists(tmp_path / "seq2.zarr")


def test_sequences_from_npy_numeric_ids(tmp_path):
    A = np.array([[7, 0.5], [7, 1.5], [2, 2.5], [9, 3.5], [9, 4.5], [9, 5.5]])
    np.save(tmp_path / "s.npy", A)
    out = ingest(tmp_path / "s.npy", tmp_path / "s.zarr", sequence_column=0, chunk_rows=2)
    g = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(g["offsets"][...], [0, 2, 3, 6])
    np.testing.assert_array_equal(g["values"][...], A[:, 1:])


# -- the command -------------------------------------------------------------------------
def test_cli_command(tmp_path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from emflow.cli.ingest import ingest_command

    app = typer.Typer()
    app.command("ingest")(ingest_command)
    app.command("other")(lambda: None)  # two commands, so "ingest" is a subcommand as in emflow
    src = tmp_path / "bad.csv"
    src.write_text(BAD)
    out = tmp_path / "o.zarr"
    res = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out)])
    assert res.exit_code == 2 and "line 4" in res.output and not out.exists()
    res = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--skip-bad-rows",
                                   "--columns", "b", "--dtype", "float32", "--chunk-rows", "2"])
    assert res.exit_code == 0, res.output
    assert "Skipped 3 bad row(s)" in res.output and "5 rows x 1 columns" in res.output
    arr, _ = open_zarr(out)
    assert arr.dtype == np.float32 and arr.chunks == (2, 1)
    np.testing.assert_array_equal(arr[...], [[2], [4], [8], [10], [15]])


# -- fuzz --------------------------------------------------------------------------------
GOOD_TOKENS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["", " 1.5 ", "nan", "-inf", "1e5", "+3", ".5", "5."]),
)
BAD_TOKENS = st.sampled_from(["x", "1.2.3", "--1", "1e", "0x10", "nan!", "1a"])


def _ref_parse(tok: str) -> float:
    t = tok.strip()
    return math.nan if not t else float(t)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(st.one_of(GOOD_TOKENS, GOOD_TOKENS, BAD_TOKENS), min_size=1, max_size=4),
                     min_size=1, max_size=25),
       chunk_rows=st.integers(1, 7), skip=st.booleans())
def test_fuzz_rows_match_a_reference_parser(rows, chunk_rows, skip):
    lines = [",".join(r) for r in rows]
    n_fields, expect, bad_lines = None, [], []
    for lineno, (line, r) in enumerate(zip(lines, rows), start=1):
        if line == "":
            continue  # a blank line is not a row
        if n_fields is None:
            n_fields = len(r)
        try:
            vals = [_ref_parse(t) for t in r] if len(r) == n_fields else None
        except ValueError:
            vals = None
        if vals is None:
            bad_lines.append(lineno)
        else:
            expect.append(vals)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "f.csv")
        with open(src, "w", newline="") as f:
            f.write("\n".join(lines) + "\n")
        out = os.path.join(d, "o.zarr")
        kw = dict(header=False, chunk_rows=chunk_rows, on_bad_rows="skip" if skip else "error")
        if (bad_lines and not skip) or not expect:
            with pytest.raises(DataError) as info:
                ingest(src, out, **kw)
            if bad_lines and not skip:
                assert f"line {bad_lines[0]}:" in str(info.value)
            assert not os.path.exists(out)
            return
        ingest(src, out, **kw)
        np.testing.assert_array_equal(read_X(out), np.array(expect, dtype=np.float64))
        assert read_report(out)["skipped_rows"] == len(bad_lines)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=200),
                      st.text(alphabet=st.sampled_from(list('0123456789.,-+e"\n\r\t ;nainf\x00é')), max_size=200)),
       header=st.booleans(), skip=st.booleans())
def test_fuzz_garbage_raises_only_data_error(data, header, skip):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "f.csv")
        with open(src, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        out = os.path.join(d, "o.zarr")
        try:
            ingest(src, out, header=header, on_bad_rows="skip" if skip else "error", chunk_rows=3)
        except DataError:
            assert not os.path.exists(out)
        else:
            arr, _ = open_zarr(out)
            assert arr.ndim == 2 and arr.shape[0] == read_report(out)["rows"] >= 1


def test_memory_does_not_grow_with_the_file(tmp_path, rng):
    """Peak traced allocations (numpy reports its buffers to tracemalloc) stay flat as the file grows 16x."""
    import tracemalloc

    peaks = []
    for n in (4_000, 64_000):
        src = write_csv(tmp_path / f"{n}.csv", rng.normal(size=(n, 4)), list("abcd"))
        ingest(src, tmp_path / "warm.zarr", chunk_rows=500, overwrite=True)  # imports, caches
        tracemalloc.start()
        ingest(src, tmp_path / f"{n}.zarr", chunk_rows=500)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    data_bytes = 64_000 * 4 * 8  # a reader holding the file would grow by this much
    assert peaks[1] < peaks[0] + 0.25 * data_bytes, peaks
