"""Benchmark: emflow's batch LDA against scikit-learn's and gensim's, side by side in one run.

Writes a synthetic LDA corpus (emflow.storage.synthetic.lda.write_lda) and fits every system
for the same number of batch iterations from the same settings (K, priors, per-document
limits: at most ``max_doc_update_iter`` inner iterations, stop at a mean change below 1e-3).
The systems run in turn, ``--repeats`` times, the order rotating each round (interleaved
repeats); each figure is the median over the rounds, with the load average printed beside
it. Seconds per iteration = wall time of the whole ``fit`` / iterations (every system makes
one more E-step pass at the end of its fit for its bound or, for gensim, none); CPU seconds
are this process's (every thread; a LocalCluster's workers are not counted).

Rows:

- emflow (``compute_dtype`` float64 and float32, the compiled kernel when numba imports);
- scikit-learn ``LatentDirichletAllocation(learning_method="batch")``;
- gensim ``LdaModel`` in batch mode (``update_every=0``, ``chunksize`` = every document,
  ``decay=0`` so that each pass replaces the topics, as batch EM does; ``iterations`` and
  ``gamma_threshold`` as the others' limits; its default float32).

The bound of each at the end: every system's fitted topics scored by one evaluator
(emflow's float64 ``score`` whose E-step starts from ones), as bound per word and
perplexity. The work is counted first: distinct terms, inner iterations per document in
the first and the last E-step, and the multiply-adds they cost (``2 K`` per term per inner
iteration).

    python benchmarks/bench_lda.py --n-docs 20000 --n-terms 5000 --k 20 --iters 10 --repeats 3
    python benchmarks/bench_lda.py --scheduler local      # a LocalCluster, one worker per core

Keep it small on shared machines.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import numpy as np


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _work(X, params, alpha, max_doc_iter, seed):
    """(mean inner iterations per document, multiply-adds) of one E-step (the compiled kernel's count)."""
    from emflow.models import lda as M
    from emflow.models import lda_kernel as LK

    gamma = M.doc_topic_init(X.shape[0], params.components.shape[0], 0, seed)
    _, _, (inner, term_iters) = LK.e_step(X.indices, X.data, X.indptr, gamma, params.exp_elog_beta, params.elog_beta,
                                          alpha, max_doc_iter, 1e-3, True, np.float64)
    K = params.components.shape[0]
    return inner / X.shape[0], 2.0 * K * term_iters + 2.0 * K * X.nnz


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=2000)
    ap.add_argument("--n-terms", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; figures are their medians")
    ap.add_argument("--max-doc-update-iter", type=int, default=100)
    ap.add_argument("--no-gensim", action="store_true", help="skip gensim even if installed (it is slow)")
    ap.add_argument("--no-float32", action="store_true", help="skip emflow's compute_dtype='float32' row")
    ap.add_argument("--doc-length", type=float, default=80.0)
    ap.add_argument("--chunk-docs", type=int, default=256,
                    help="documents per Zarr chunk (partitions are whole chunks: small ones balance the threads)")
    ap.add_argument("--scheduler", default="threads", help="emflow scheduler: threads, local or an address")
    ap.add_argument("--partition-mb", type=float, default=None,
                    help="emflow partition size (default: the estimator's, at least two partitions per thread)")
    ap.add_argument("--out", default=None, help="where to write the corpus (default: a temp dir)")
    args = ap.parse_args(argv)

    from sklearn.decomposition import LatentDirichletAllocation as SkLDA

    from emflow.estimators.lda import LatentDirichletAllocation
    from emflow.models import lda as M
    from emflow.storage.corpus import open_corpus, read_corpus
    from emflow.storage.synthetic.lda import write_lda

    K, iters, mdi = args.k, args.iters, args.max_doc_update_iter
    root = args.out or tempfile.mkdtemp(prefix="bench-lda-")
    path = os.path.join(root, "corpus.zarr")
    t = time.perf_counter()
    write_lda(path, args.n_docs, args.n_terms, K, mean_length=args.doc_length, seed=0, chunk_docs=args.chunk_docs)
    t_write = time.perf_counter() - t
    X, _ = read_corpus(path)
    X = X.tocsr().astype(np.float64)
    corpus = path if args.partition_mb is None else open_corpus(path, partition_bytes=int(args.partition_mb * 2**20))
    kernel = M._kernel() is not None

    info: dict = {}

    def fit_emflow(dtype):
        m = LatentDirichletAllocation(K, max_iter=iters, random_state=0, scheduler=args.scheduler,
                                      max_doc_update_iter=mdi, compute_dtype=dtype)
        m.fit(corpus)
        info.update(m.fit_info_)
        return m.components_

    def fit_sklearn():
        return SkLDA(K, learning_method="batch", max_iter=iters, random_state=0, max_doc_update_iter=mdi).fit(X).components_

    fit_emflow("float64")  # compile the kernel (cached) and warm the imports outside the timings
    systems = {f"emflow float64 ({args.scheduler}, {info['partitions']} partitions, "
               f"{'numba kernel' if kernel else 'NumPy path'})": lambda: fit_emflow("float64")}
    if not args.no_float32:
        fit_emflow("float32")
        systems["emflow compute_dtype=float32"] = lambda: fit_emflow("float32")
    systems["scikit-learn batch (n_jobs=None)"] = fit_sklearn
    note = ""
    try:
        if args.no_gensim:
            raise ImportError
        from gensim.matutils import Sparse2Corpus
        from gensim.models import LdaModel
    except ImportError:
        note = "gensim skipped (--no-gensim)" if args.no_gensim else "gensim not installed: skipped"
    else:
        corpus_g = list(Sparse2Corpus(X, documents_columns=False))

        def fit_gensim():
            g = LdaModel(corpus_g, num_topics=K, passes=iters, update_every=0, chunksize=X.shape[0], decay=0.0,
                         iterations=mdi, gamma_threshold=1e-3, eval_every=None, random_state=0,
                         alpha=np.full(K, 1.0 / K), eta=1.0 / K)
            return g.state.get_lambda()

        systems["gensim LdaModel (batch, float32)"] = fit_gensim

    names = list(systems)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    loads = {n: [] for n in names}
    topics = {}
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            topics[n] = systems[n]()
            times[n].append((time.perf_counter() - t) / max(iters, 1))
            cpu[n].append((time.process_time() - c) / max(iters, 1))
            loads[n].append(_load())

    # one evaluator: emflow's float64 bound (ones start) of each system's topics
    ev = LatentDirichletAllocation(K, max_iter=1, random_state=0, scheduler=args.scheduler,
                                   max_doc_update_iter=mdi).fit(corpus)
    words = float(X.sum())

    def bound_of(components):
        e = copy.copy(ev)
        e.components_ = np.asarray(components, dtype=np.float64)
        return e.score(corpus) / words

    alpha = 1.0 / K
    p0 = M.make_params(M.init_components(K, X.shape[1], 0))
    it0, madds0 = _work(X, p0, alpha, mdi, (1, 0))
    it1, madds1 = _work(X, M.make_params(topics[names[0]]), alpha, mdi, (1, 1))
    base = statistics.median(times[names[0]])
    lines = [
        f"LDA, {X.shape[0]} docs x {X.shape[1]} terms, nnz {X.nnz} ({X.nnz / X.shape[0]:.1f} distinct terms "
        f"per document), K={K}, {iters} iterations, max_doc_update_iter={mdi}; corpus written in {t_write:.1f}s",
        f"work per E-step (compiled kernel's count): first {it0:.1f} inner iterations per document, "
        f"{madds0 / 1e9:.2f} G multiply-adds; after {iters} iterations {it1:.1f}, {madds1 / 1e9:.2f} G",
        f"{args.repeats} interleaved rounds; load average (1/5/15 min) after each run",
        "",
        "| implementation | s / iteration (median) | runs | emflow float64 speed-up | CPU s / iteration "
        "| bound per word | perplexity | load |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for n in names:
        med = statistics.median(times[n])
        b = bound_of(topics[n])
        lines.append(f"| {n} | {med:.3f} | {', '.join(f'{x:.3f}' for x in times[n])} | {med / base:.2f}x "
                     f"| {statistics.median(cpu[n]):.3f} | {b:.6f} | {np.exp(-b):.3f} | {'; '.join(loads[n])} |")
    if note:
        lines += ["", note]
    table = "\n".join(lines)
    print(table)
    if args.out is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return table


if __name__ == "__main__":
    main()
