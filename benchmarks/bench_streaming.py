"""Streaming from Zarr against what the disk and the decompressor can deliver (issue 18).

Target: on a dataset 4x the workers' memory, seconds per EM iteration (``persist=False``)
within 20% of the larger of (the time to read the compressed bytes at the measured disk
rate, the time to decompress them with the codec used), both measured here in the same run.
Run::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_streaming.py
    python benchmarks/bench_streaming.py --gib 2 --codecs blosc-zstd3 --chunk-mib 8 32 128
    python benchmarks/bench_streaming.py --gib 0.25 --codecs none blosc-lz4 --iters 3   # quick look

For every (codec, chunk size) of the grid, one Zarr array of ``--gib`` GiB of float64 rows
x ``--d`` is written once under ``--dir`` (cached; the values are the same for every codec
and chunk size: blocks of 8 MiB drawn from ``default_rng([seed, block])``, a mixture of
``--K`` separated Gaussian blobs), then in one run:

1. **read**: every chunk's stored (compressed) bytes, read with ``--workers`` threads as the
   workers would. Dropping the page cache needs root; instead each chunk file is fsynced and
   its cached pages are dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)``, which needs no
   root and works on clean pages: the ``cold`` read. A second read is ``warm`` (page cache).
   A dataset this size fits the page cache, so EM passes after the first are served from it:
   the bound below uses the warm rate, and both rates are printed.
2. **decode**: the same bytes decompressed with the codec (numcodecs, one thread, as in a
   worker thread, where Blosc runs single-threaded), summed, divided by ``--workers``.
3. **E-step**: one partition, in memory, fitted in-process on one thread (``scheduler=
   "sync"``), seconds per iteration x partitions / workers: what compute alone costs.
4. **stream**: ``emflow.GaussianMixture(K, covariance_type=--cov, persist=False)`` on a
   LocalCluster of ``--workers`` workers x 1 thread, ``--memory-limit`` each, ``tol=0``,
   ``--iters`` iterations from the same initial parameters; the median of the
   per-iteration seconds (the first dropped).
5. **profile** (one partition, in-process, x partitions / workers): the two parts of a
   streamed partition's read in emflow: the loader's read (open, existence checks, file
   read, decode, copy into the result) and the digest every streamed re-read is checked
   against (:class:`emflow.storage.fingerprint.Checked`: the data must not change during a
   fit), which is work beyond read + decode + E-step.

Printed per case: the bound ``max(read_warm, decode)``, ``stream / bound`` (the target is
<= 1.2), and ``stream / (decode + E-step)``, the honest bound when the cores are shared by
decoding and compute (2 workers on 2 cores: the CPU does both). The load average
(``os.getloadavg``) is printed beside every figure: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CODECS = ("none", "blosc-lz4", "blosc-zstd1", "blosc-zstd3", "zstd")
BLOCK_BYTES = 8 * 2**20  # data are drawn in blocks of this size, so every chunking holds the same values


def load() -> str:
    return "%.1f/%.1f/%.1f" % os.getloadavg()


def zarr_codec(name: str):
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    if name == "none":
        return None
    if name == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=3, shuffle=BloscShuffle.bitshuffle)
    if name.startswith("blosc-zstd"):
        return BloscCodec(cname="zstd", clevel=int(name[-1]), shuffle=BloscShuffle.bitshuffle)
    if name == "zstd":
        return ZstdCodec(level=3)
    raise SystemExit(f"--codecs: one of {CODECS}, got {name!r}")


def decoder(name: str):
    """bytes -> ndarray, as zarr's codec pipeline decodes one chunk (single thread)."""
    import numcodecs
    from numcodecs import blosc

    blosc.use_threads = False
    if name == "none":
        return lambda b: np.frombuffer(b, dtype="<f8").copy()
    if name.startswith("blosc"):
        return lambda b: np.frombuffer(blosc.decompress(b), dtype="<f8")
    z = numcodecs.Zstd()
    return lambda b: np.frombuffer(z.decode(b), dtype="<f8")


def truth(K: int, d: int, seed: int):
    rng = np.random.default_rng([seed, 10**9])
    return rng.normal(scale=4.0, size=(K, d))


def draw_block(i: int, rows: int, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, i])
    return centres[rng.integers(len(centres), size=rows)] + rng.normal(size=(rows, centres.shape[1]))


def dataset(root: str, codec: str, chunk_mib: int, gib: float, d: int, K: int, seed: int) -> str:
    """Write (once) and return the path of the Zarr group for this case."""
    import zarr

    block_rows = BLOCK_BYTES // (8 * d)
    n_blocks = max(1, int(round(gib * 2**30 / BLOCK_BYTES)))
    n = n_blocks * block_rows
    chunk_rows = max(1, chunk_mib * 2**20 // (8 * d))
    path = os.path.join(root, f"{codec}-{chunk_mib}MiB-{gib:g}GiB-d{d}-K{K}-s{seed}.zarr")
    if os.path.exists(os.path.join(path, "zarr.json")):
        g = zarr.open_group(path, mode="r")
        if g.attrs.get("complete"):
            return path
    t = time.perf_counter()
    g = zarr.open_group(path, mode="w")
    X = g.create_array("X", shape=(n, d), dtype="float64", chunks=(chunk_rows, d), compressors=zarr_codec(codec),
                       config={"write_empty_chunks": True}, attributes={"all_chunks_written": True})
    centres = truth(K, d, seed)
    buf, at, blk = [], 0, 0
    while at < n:  # one whole chunk at a time, from 8 MiB blocks
        stop = min(n, at + chunk_rows)
        while sum(len(b) for b in buf) < stop - at:
            buf.append(draw_block(blk, block_rows, centres, seed))
            blk += 1
        cat = np.concatenate(buf)
        X[at:stop] = cat[: stop - at]
        buf = [cat[stop - at:]] if len(cat) > stop - at else []
        at = stop
    g.attrs.update({"kind": "rows", "rows": "X", "complete": True})
    print(f"  wrote {path} ({n} x {d}) in {time.perf_counter() - t:.1f} s  load {load()}", flush=True)
    return path


def chunk_files(path: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(path, "X", "c")):
        out += [os.path.join(dirpath, f) for f in files]
    return sorted(out)


def drop_cached(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[str], workers: int) -> tuple[float, list[bytes]]:
    def one(f):
        with open(f, "rb") as fh:
            return fh.read()

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        blobs = list(ex.map(one, files))
    return time.perf_counter() - t, blobs


def time_decode(blobs: list[bytes], codec: str) -> float:
    dec = decoder(codec)
    t = time.perf_counter()
    for b in blobs:
        dec(b)
    return time.perf_counter() - t


def init_params(K: int, d: int, cov: str, seed: int) -> dict:
    c = truth(K, d, seed)
    prec = {"full": np.stack([np.eye(d)] * K), "diag": np.ones((K, d)), "spherical": np.ones(K),
            "tied": np.eye(d)}[cov]
    return dict(weights_init=np.full(K, 1.0 / K), means_init=c + 0.3, precisions_init=prec)


def fit_seconds(data, K: int, cov: str, iters: int, init: dict, scheduler, persist) -> list[float]:
    import emflow

    secs: list[float] = []
    gm = emflow.GaussianMixture(K, covariance_type=cov, max_iter=iters, tol=0.0, scheduler=scheduler,
                                persist=persist, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(data, callbacks=[lambda ev: secs.append(ev.seconds)])
    return secs


def profile_partition(path: str, workers: int) -> dict:
    """Where one partition's read goes in emflow's own read path (in-process, one thread)."""
    from emflow.storage.data import open_rows
    from emflow.storage.fingerprint import _check_digest

    rows = open_rows(path, min_partitions=2 * workers)
    ld = rows.loaders[len(rows.loaders) // 2]
    ld.read()  # warm the page cache and zarr's imports
    t0 = time.perf_counter()
    X, w = ld.read()
    t1 = time.perf_counter()
    _check_digest((X, w), ld.start)
    t2 = time.perf_counter()
    return {"rows": len(X), "read_s": t1 - t0, "digest_s": t2 - t1, "n_partitions": rows.n_partitions,
            "X": X, "dtype": str(X.dtype), "contiguous": bool(X.flags.c_contiguous)}


def run_case(args, codec: str, chunk_mib: int, client) -> dict:
    import zarr

    path = dataset(args.dir, codec, chunk_mib, args.gib, args.d, args.K, args.seed)
    arr = zarr.open_group(path, mode="r")["X"]
    raw = arr.nbytes
    files = chunk_files(path)
    stored = sum(os.path.getsize(f) for f in files)
    drop_cached(files)
    cold, _ = read_all(files, args.workers)
    warm, blobs = read_all(files, args.workers)
    decode = time_decode(blobs, codec) / args.workers
    del blobs
    prof = profile_partition(path, args.workers)
    X = prof.pop("X")
    init = init_params(args.K, args.d, args.cov, args.seed)
    estep_part = statistics.median(fit_seconds(X, args.K, args.cov, 3, init, "sync", True)[1:])
    del X
    P = prof["n_partitions"]
    estep = estep_part * P / args.workers
    secs = fit_seconds(path, args.K, args.cov, args.iters, init, client, False)
    stream = statistics.median(secs[1:] if len(secs) > 1 else secs)
    bound = max(warm, decode)
    r = {
        "codec": codec, "chunk_mib": chunk_mib, "gib": raw / 2**30, "ratio": raw / stored,
        "stored_mib": stored / 2**20, "cold_s": cold, "warm_s": warm,
        "cold_mib_s": stored / 2**20 / cold, "warm_mib_s": stored / 2**20 / warm,
        "decode_s": decode, "estep_s": estep, "stream_s": stream, "stream_all": secs,
        "bound_s": bound, "stream_over_bound": stream / bound,
        "stream_over_decode_estep": stream / (decode + estep),
        "profile_read_s": prof["read_s"] * P / args.workers, "profile_digest_s": prof["digest_s"] * P / args.workers,
        "partitions": P, "load": load(),
    }
    return r


HEAD = ("codec", "chunk", "stored", "ratio", "cold MiB/s", "warm MiB/s", "read s", "decode s", "E-step s",
        "emflow read s", "digest s", "stream s/it", "/bound", "/(dec+E)", "load")


def row(r: dict) -> list[str]:
    return [r["codec"], f"{r['chunk_mib']} MiB", f"{r['stored_mib']:.0f} MiB", f"{r['ratio']:.2f}",
            f"{r['cold_mib_s']:.0f}", f"{r['warm_mib_s']:.0f}", f"{r['warm_s']:.2f}", f"{r['decode_s']:.2f}",
            f"{r['estep_s']:.2f}", f"{r['profile_read_s']:.2f}", f"{r['profile_digest_s']:.2f}",
            f"{r['stream_s']:.2f}", f"{r['stream_over_bound']:.2f}", f"{r['stream_over_decode_estep']:.2f}", r["load"]]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def medians(results: list[dict]) -> list[dict]:
    """One row per (codec, chunk size): the median of each figure over the repeats (the
    load shown is the range seen)."""
    cases: dict = {}
    for r in results:
        cases.setdefault((r["codec"], r["chunk_mib"]), []).append(r)
    out = []
    for rs in cases.values():
        m = {k: (statistics.median(x[k] for x in rs) if isinstance(v, float) else v) for k, v in rs[0].items()}
        loads = [x["load"].split("/")[0] for x in rs]
        m["load"] = loads[0] if len(rs) == 1 else f"{min(loads, key=float)}-{max(loads, key=float)} (1-min)"
        out.append(m)
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/emflow-stream", help="where the datasets are cached")
    ap.add_argument("--gib", type=float, help="dataset size (float64 values); default: 4 x the workers' memory")
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--cov", default="diag", choices=("full", "diag", "tied", "spherical"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="512MiB", help="per worker")
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    ap.add_argument("--chunk-mib", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument("--iters", type=int, default=4, help="EM iterations per streamed fit (first dropped)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="passes over the grid, interleaved (the table shows each case's median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.gib is None:
        from dask.utils import parse_bytes

        args.gib = 4 * args.workers * parse_bytes(args.memory_limit) / 2**30
    os.makedirs(args.dir, exist_ok=True)

    import dask
    from dask.distributed import Client, LocalCluster

    dask.config.set({"emflow.worker-wait-timeout": 10})  # a case whose workers run out of memory fails fast

    print(f"# bench_streaming: {args.gib:g} GiB float64 x {args.d}, GMM K={args.K} {args.cov}, "
          f"{args.workers} workers x 1 thread x {args.memory_limit}; cpus {os.cpu_count()}; load {load()}", flush=True)
    results = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit,
                      processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        for rep in range(args.repeats):  # interleaved: machine load hits every case alike
            for chunk in args.chunk_mib:
                for codec in args.codecs:
                    try:
                        r = run_case(args, codec, chunk, client)
                    except Exception as exc:  # a case that fails (workers out of memory) is reported, not fatal
                        print(f"  {codec} {chunk} MiB failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        continue
                    results.append(r)
                    print("  " + " | ".join(row(r)), flush=True)
    print()
    print(table(medians(results)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
