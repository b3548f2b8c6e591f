"""No silent wrong answers from damaged or changing data.

Every array a fit (or score, predict...) reads goes through one checked reader: a chunk
missing from storage (which Zarr would read as the fill value) or one that fails to decode
is a DataError naming the array, the chunk and its rows, whatever the layout (a plain
array, a dataset group, chunked along features, sequences, a corpus). A streamed fit
re-checks each partition's digest on every pass, so data overwritten during the fit stop
it with no model. Bad values are counted over the whole dataset, with no worker traceback
and no numpy warnings first.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

import emflow
from emflow import errors as E
from emflow.storage.checkpoint import data_fingerprint
from emflow.storage.corpus import open_corpus, write_corpus
from emflow.storage.sequences import write_sequences

BLOSC = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)
RNG = np.random.default_rng(7)
X4 = np.concatenate([RNG.normal(size=(200, 4)) - 3, RNG.normal(size=(200, 4)) + 3])
RNG.shuffle(X4)


def plain_array(path, X, chunks):
    """A plain Zarr array (not inside a dataset group), as a user writes one with zarr."""
    zarr.create_array(store=str(path), data=X, chunks=chunks, compressors=BLOSC, config={"write_empty_chunks": True},
                      overwrite=True)
    return str(path)


def gmm(**kw):
    return emflow.GaussianMixture(2, scheduler="threads", random_state=0, max_iter=20, **kw)


def chunk_file(root, *coords):
    return os.path.join(root, "c", *map(str, coords))


def truncate(path):
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])


# -- 1, 2: missing chunks, every layout ---------------------------------------------------
def test_missing_chunk_of_a_plain_array_is_named(tmp_path):
    path = plain_array(tmp_path / "x.zarr", X4, (50, 4))
    good = gmm().fit(path)
    os.remove(chunk_file(path, 3, 0))
    with pytest.raises(E.DataError, match=r"Chunk \(3, 0\) \(rows 150-200\) of the data at .*x\.zarr.* is missing"):
        gmm().fit(path)
    # score and predict read through the same check
    with pytest.raises(E.DataError, match=r"Chunk \(3, 0\) \(rows 150-200\).*missing"):
        good.score(path)
    with pytest.raises(E.DataError, match=r"Chunk \(3, 0\).*missing"):
        good.predict(path)


def test_missing_column_chunk_is_named(tmp_path):
    """An array chunked along features: every column chunk is checked, not only column-chunk 0."""
    path = plain_array(tmp_path / "cols.zarr", X4, (100, 2))
    os.remove(chunk_file(path, 2, 1))
    with pytest.raises(E.DataError, match=r"Chunk \(2, 1\) \(rows 200-300, columns 2-4\) of the data .* missing"):
        gmm().fit(path)


def test_missing_weights_chunk_is_named(tmp_path):
    g = zarr.open_group(tmp_path / "w.zarr", mode="w")
    g.create_array("X", data=X4, chunks=(100, 4), compressors=BLOSC)
    g.create_array("weights", data=np.ones(len(X4)), chunks=(100,), compressors=BLOSC)
    os.remove(tmp_path / "w.zarr" / "weights" / "c" / "1")
    with pytest.raises(E.DataError, match=r"Chunk \(1,\) \(rows 100-200\) of the weights .* missing"):
        gmm().fit(str(tmp_path / "w.zarr"), sample_weight="weights")


def test_opting_out_reads_missing_chunks_as_the_fill_value(tmp_path):
    """An array that legitimately leaves out chunks of fill values says so in its attributes."""
    X = X4.copy()
    X[100:200] = 0.0
    arr = zarr.create_array(store=str(tmp_path / "sparse.zarr"), data=X, chunks=(100, 4))  # zarr's default
    assert not os.path.exists(chunk_file(str(tmp_path / "sparse.zarr"), 1, 0))  # zarr skipped the zeros
    with pytest.raises(E.DataError, match=r"Chunk \(1, 0\).*all_chunks_written'\] = False"):
        gmm().fit(str(tmp_path / "sparse.zarr"))
    arr.attrs["all_chunks_written"] = False
    np.testing.assert_allclose(gmm().fit(str(tmp_path / "sparse.zarr")).means_, gmm().fit(X).means_, rtol=1e-8)


def _hmm(**kw):
    return emflow.GaussianHMM(2, scheduler="threads", random_state=0, n_iter=5, **kw)


def _sequences(path, chunk_steps=40):
    X = RNG.normal(size=(400, 2)) + np.repeat([[0.0, 0.0], [4.0, 4.0]], 200, axis=0)
    return write_sequences(path, X, np.arange(0, 401, 50), chunk_steps=chunk_steps)


def test_missing_chunk_of_sequences_is_named(tmp_path):
    p = _sequences(tmp_path / "s.zarr")
    os.remove(os.path.join(p, "values", "c", "3", "0"))
    with pytest.raises(E.DataError, match=r"Chunk \(3, 0\) \(steps 120-160\) of the sequence values at .*s\.zarr/values"):
        _hmm().fit(p)
    # the offsets too (a plain group written with zarr, offsets in small chunks)
    g = zarr.open_group(tmp_path / "o.zarr", mode="w")
    g.create_array("values", data=RNG.normal(size=(400, 2)), chunks=(100, 2))
    g.create_array("offsets", data=np.arange(0, 401, 50), chunks=(3,))
    os.remove(tmp_path / "o.zarr" / "offsets" / "c" / "1")
    with pytest.raises(E.DataError, match=r"Chunk \(1,\) \(entries 3-6\) of the sequence offsets .* missing"):
        _hmm().fit(str(tmp_path / "o.zarr"))


def _corpus(path):
    counts = RNG.poisson(2.0, size=(60, 12)).astype(np.int64)
    counts[:, 0] += 1
    p = write_corpus(path, sp.csr_matrix(counts), chunk_docs=10)
    # small chunks of entries, so that a partition spans several
    g = zarr.open_group(p, mode="r+")
    for name in ("indices", "counts"):
        data = g[name][...]
        del g[name]
        g.create_array(name, data=data, chunks=(64,), compressors=BLOSC, config={"write_empty_chunks": True})
    return p


def _lda(**kw):
    return emflow.LatentDirichletAllocation(2, **{"scheduler": "threads", "random_state": 0, "max_iter": 3, **kw})


def _small_partitions(corpus):
    return open_corpus(corpus, partition_bytes=1200)


@pytest.mark.parametrize("name,chunk,unit", [("indices", 2, "entries 128-192"), ("counts", 4, "entries 256-320"),
                                             ("indptr", 3, "documents 30-40")])
def test_missing_chunk_of_a_corpus_is_named(tmp_path, name, chunk, unit):
    p = _corpus(tmp_path / "c.zarr")
    os.remove(os.path.join(p, name, "c", str(chunk)))
    with pytest.raises(E.DataError, match=rf"Chunk \({chunk},\) \({unit}\) of the corpus {name} at .* missing"):
        _lda().fit(p)


# -- 4: truncated chunks ------------------------------------------------------------------
def test_truncated_chunk_of_rows_is_a_data_error(tmp_path, dask_client):
    path = plain_array(tmp_path / "t.zarr", X4, (100, 4))
    truncate(chunk_file(path, 2, 0))
    for sched in ("threads", dask_client):
        with pytest.raises(E.DataError, match=r"Chunk \(2, 0\) \(rows 200-300\) of the data at .*t\.zarr.* cannot be "
                                              r"read \(RuntimeError: error during blosc decompression.*corrupt"):
            emflow.GaussianMixture(2, scheduler=sched, random_state=0, max_iter=3).fit(path)


def test_truncated_chunk_of_sequences_and_corpus_is_a_data_error(tmp_path):
    p = _sequences(tmp_path / "s.zarr")
    g = zarr.open_group(p, mode="r+")
    data = g["values"][...]
    del g["values"]
    g.create_array("values", data=data, chunks=(40, 2), compressors=BLOSC, config={"write_empty_chunks": True})
    truncate(os.path.join(p, "values", "c", "5", "0"))
    with pytest.raises(E.DataError, match=r"Chunk \(5, 0\) \(steps 200-240\) of the sequence values .* cannot be read"):
        _hmm().fit(p)
    c = _corpus(tmp_path / "c.zarr")
    truncate(os.path.join(c, "indices", "c", "1"))
    with pytest.raises(E.DataError, match=r"Chunk \(1,\) \(entries 64-128\) of the corpus indices .* cannot be read"):
        _lda().fit(c)


# -- 3: data that change during a streamed fit -----------------------------------------------
def _overwrite_after_first_iteration(array_path, region, value):
    def cb(ev):
        if ev.iteration == 1:
            a = zarr.open_array(array_path, mode="r+")
            a[region] = value
    return cb


def test_rows_overwritten_during_a_streamed_fit(tmp_path, dask_client):
    path = plain_array(tmp_path / "x.zarr", X4, (50, 4))
    for sched in ("threads", dask_client):
        plain_array(tmp_path / "x.zarr", X4, (50, 4))
        est = emflow.GaussianMixture(2, scheduler=sched, random_state=0, max_iter=20, tol=0, persist=False,
                                     partition_bytes=3200)
        cb = _overwrite_after_first_iteration(path, slice(60, 70), 9.0)
        with pytest.raises(E.DataError, match=r"changed during the fit: partition 0 \(rows 0-100\) of .*x\.zarr"):
            est.fit(path, callbacks=[cb])
        assert not hasattr(est, "fit_info_") and not hasattr(est, "means_")  # no model, no fingerprint
    # the same rewrite of identical values is not a change
    plain_array(tmp_path / "x.zarr", X4, (50, 4))
    cb = _overwrite_after_first_iteration(path, slice(60, 70), X4[60:70])
    gmm(persist=False, partition_bytes=3200).fit(path, callbacks=[cb])


def test_resident_fit_is_unaffected_by_later_writes(tmp_path):
    """Resident partitions were read (and checked) once: the model is of the data read."""
    path = plain_array(tmp_path / "x.zarr", X4, (50, 4))
    cb = _overwrite_after_first_iteration(path, slice(60, 70), 9.0)
    est = gmm(persist=True).fit(path, callbacks=[cb])
    assert est.fit_info_["fingerprint"] == data_fingerprint(
        plain_array(tmp_path / "y.zarr", X4, (50, 4)), scheduler="threads")["fingerprint"]


def test_sequences_overwritten_during_a_streamed_fit(tmp_path):
    p = _sequences(tmp_path / "s.zarr")
    est = _hmm(persist=False, tol=0, partition_bytes=1600)
    cb = _overwrite_after_first_iteration(os.path.join(p, "values"), slice(300, 310), 7.0)
    with pytest.raises(E.DataError, match=r"changed during the fit: partition \d+ \(sequences \d+-\d+, steps"):
        est.fit(p, callbacks=[cb])
    assert not hasattr(est, "fit_info_") and not hasattr(est, "monitor_")  # not fitted: no model, no fingerprint


def test_corpus_overwritten_during_a_streamed_fit(tmp_path):
    p = _corpus(tmp_path / "c.zarr")
    est = _lda(persist=False, max_iter=10)
    cb = _overwrite_after_first_iteration(os.path.join(p, "counts"), slice(0, 5), 50)
    with pytest.raises(E.DataError, match=r"changed during the fit: partition 0 \(documents 0-\d+\) of .*c\.zarr"):
        est.fit(_small_partitions(p), callbacks=[cb])
    assert not hasattr(est, "fit_info_") and not hasattr(est, "components_")


# -- 5: bad values, counted over the dataset, quietly -----------------------------------------
def _compute_failed(client) -> int:
    return sum("Compute Failed" in msg for logs in client.get_worker_logs().values() for _, msg in logs)


def test_nan_counts_the_whole_dataset_without_a_worker_traceback(tmp_path, dask_client, capsys):
    X = X4.copy()
    X[[12, 130, 131, 390], [1, 0, 2, 3]] = np.nan  # in three different partitions
    path = plain_array(tmp_path / "nan.zarr", X, (50, 4))
    before = _compute_failed(dask_client)
    for persist in (False, True):
        with pytest.raises(E.NonFiniteDataError,
                           match=r"^The data \(.*nan\.zarr\) holds 4 NaN or infinite value\(s\); the first is at row "
                                 r"12, column 1 \(Zarr chunk 0, rows 0-50\)\. Remove or impute"):
            emflow.GaussianMixture(2, scheduler=dask_client, persist=persist, partition_bytes=3200).fit(path)
    with pytest.raises(E.NonFiniteDataError, match=r"holds 4 NaN"):
        gmm(partition_bytes=3200).fit(X)  # in memory, in-process
    assert _compute_failed(dask_client) == before  # no worker logged the expected error
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err


def test_missing_chunk_on_a_worker_is_not_logged(tmp_path, dask_client):
    path = plain_array(tmp_path / "x.zarr", X4, (50, 4))
    os.remove(chunk_file(path, 5, 0))
    before = _compute_failed(dask_client)
    for persist in (False, True):
        with pytest.raises(E.DataError, match=r"Chunk \(5, 0\) \(rows 250-300\).*missing"):
            emflow.GaussianMixture(2, scheduler=dask_client, persist=persist).fit(path)
    assert _compute_failed(dask_client) == before


def test_sequence_and_corpus_values_counted_over_the_dataset(tmp_path):
    X = RNG.normal(size=(400, 2))
    X[[10, 210, 390], 0] = np.inf
    p = write_sequences(tmp_path / "s.zarr", X, np.arange(0, 401, 50), chunk_steps=40)
    with pytest.raises(E.NonFiniteDataError, match=r"^The sequence dataset \(.*s\.zarr\) holds 3 NaN or infinite value\(s\); "
                                                   r"the first is at step 10, column 0 \(Zarr chunk 0, steps 0-40\)"):
        _hmm(partition_bytes=1600).fit(p)
    with pytest.raises(E.NonFiniteDataError, match=r"holds 3 infinite value\(s\); the first is at step 10"):
        emflow.LinearGaussianSSM(1, scheduler="threads", max_iter=2, partition_bytes=1600).fit(p)
    c = _corpus(tmp_path / "c.zarr")
    g = zarr.open_group(c, mode="r+")
    counts = g["counts"][...]
    counts[[3, 200, 400]] = -1
    g["counts"][...] = counts
    with pytest.raises(E.DataError, match=r"^The corpus \(.*c\.zarr\) holds 3 negative count\(s\); the first is -1 at "
                                          r"entry 3\. Topic models"):
        _lda().fit(_small_partitions(c))


def test_huge_values_give_the_clear_error_without_numpy_warnings(tmp_path):
    path = plain_array(tmp_path / "huge.zarr", X4 * 1e300, (50, 4))
    for data in (X4 * 1e300, path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(E.FitFailedError, match=r"holds 1600 value\(s\) too large to square in float64 .*the "
                                                       r"first is -?[0-9.]+e\+300 at row 0, column 0.*Scale the data"):
                gmm().fit(data)
        assert [str(w.message) for w in caught] == []
    gmm().fit(X4 * 1e150)  # squares still representable: fits


def test_huge_sequences_give_the_clear_error_without_numpy_warnings(tmp_path):
    p = write_sequences(tmp_path / "s.zarr", RNG.normal(size=(200, 2)) * 1e300, np.arange(0, 201, 50))
    for est in (_hmm(), emflow.LinearGaussianSSM(1, scheduler="threads", max_iter=2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(E.FitFailedError, match=r"^The sequence dataset .* holds 400 value\(s\) too large to "
                                                       r"square.*at step 0, column 0.*Scale the data"):
                est.fit(p)
        assert [str(w.message) for w in caught] == []


def _every_chunk_stored(path):
    node = zarr.open(str(path), mode="r")
    arrays = [node] if isinstance(node, zarr.Array) else [a for _, a in node.arrays()]
    assert arrays
    for a in arrays:
        assert a.nchunks_initialized == a.nchunks, (path, a.path)


def test_every_emflow_writer_stores_chunks_of_fill_values(tmp_path):
    """Outputs and generated datasets are read back as inputs, where a missing chunk is an
    error: every writer stores chunks that hold only zeros (Zarr's default leaves them out)."""
    from emflow.storage.synthetic import write_hmm, write_lda, write_lgssm

    X = np.random.default_rng(0).normal(size=(200, 2))
    gm = emflow.GaussianMixture(1, scheduler="threads", random_state=0).fit(X)
    gm.predict(X, out=str(tmp_path / "labels.zarr"))  # one component: every label is 0
    _every_chunk_stored(tmp_path / "labels.zarr")
    seqs = write_hmm(str(tmp_path / "hmm.zarr"), n_sequences=20, n_components=2, n_features=1, seed=0)
    _every_chunk_stored(seqs)
    hmm = emflow.GaussianHMM(1, n_iter=2, random_state=0, scheduler="threads").fit(seqs)
    hmm.predict(seqs, out=str(tmp_path / "states.zarr"))  # one state: every state is 0
    _every_chunk_stored(tmp_path / "states.zarr")
    _every_chunk_stored(write_lgssm(str(tmp_path / "ssm.zarr"), n_sequences=5, state_dim=1, n_features=1))
    _every_chunk_stored(write_lda(str(tmp_path / "corpus.zarr"), n_docs=50, n_terms=20, n_components=2, seed=0))


# -- the content hash: compiled and NumPy paths give the same bits ---------------------------

@pytest.mark.parametrize("a", [
    RNG.normal(size=(1000, 16)),                                   # float64 rows
    RNG.normal(size=(7, 3)).astype(np.float32),                    # an odd number of words per row
    RNG.integers(0, 255, size=(33, 5), dtype=np.uint8),           # rows padded to whole words
    RNG.integers(-9, 9, size=(100,)),                              # 1-D int64 (weights, offsets)
    np.zeros((0, 4)),
])
@pytest.mark.parametrize("row0", [0, 12345, 2 ** 40])
def test_compiled_hash_equals_numpy_hash_and_stays_additive(a, row0, monkeypatch):
    from emflow.storage import fingerprint as F

    pytest.importorskip("numba")
    seeds = [(0x9E3779B97F4A7C15, 0xD1B54A32D192ED03), (0x9E3779B97F4A7C15 + 1,)]
    for s in seeds:
        monkeypatch.setattr(F, "KERNEL", "numpy")
        ref = F.positional_hash(a, row0, seeds=s)
        monkeypatch.setattr(F, "KERNEL", "auto")
        assert F._hash_kernel() is not None
        assert F.positional_hash(a, row0, seeds=s) == ref
        if len(a) > 2:  # the hash of a split is the sum of its parts' hashes
            cut = len(a) // 3
            parts = [F.positional_hash(a[:cut], row0, seeds=s), F.positional_hash(a[cut:], row0 + cut, seeds=s)]
            assert tuple((x + y) % 2 ** 64 for x, y in zip(*parts)) == ref
