"""Benchmark: emflow LatentDirichletAllocation against scikit-learn's batch LDA (and gensim if installed).

Writes a synthetic LDA corpus (emflow.storage.synthetic.lda.write_lda), fits each library for the
same number of batch iterations from the same settings, and prints a markdown table of
wall time, seconds per iteration and training perplexity (every system's topics scored by
one evaluator: emflow's ``perplexity``, whose E-step starts from ones). emflow starts from
scikit-learn's initial topics (same random_state); the E-step starts of the two differ
(random draws from different streams, or ones with ``--ones``), so the perplexities are
close, not identical (tests/test_lda.py checks the exact agreement).

    python benchmarks/bench_lda.py --n-docs 20000 --n-terms 5000 --k 20 --iters 10
    python benchmarks/bench_lda.py --scheduler local      # a LocalCluster, one worker per core

Keep it small on shared machines.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=2000)
    ap.add_argument("--n-terms", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-gensim", action="store_true", help="skip gensim even if installed (it is slow)")
    ap.add_argument("--doc-length", type=float, default=80.0)
    ap.add_argument("--scheduler", default="threads", help="emflow scheduler: threads, local or an address")
    ap.add_argument("--partition-mb", type=float, default=4.0)
    ap.add_argument("--ones", action="store_true", help="emflow E-step starts at ones (sklearn-exact comparison)")
    ap.add_argument("--out", default=None, help="where to write the corpus (default: a temp dir)")
    args = ap.parse_args(argv)

    from sklearn.decomposition import LatentDirichletAllocation as SkLDA

    from emflow.storage.corpus import open_corpus, read_corpus
    from emflow.estimators.lda import LatentDirichletAllocation
    from emflow.storage.synthetic.lda import write_lda

    root = args.out or tempfile.mkdtemp(prefix="bench-lda-")
    path = os.path.join(root, "corpus.zarr")
    t = time.perf_counter()
    write_lda(path, args.n_docs, args.n_terms, args.k, mean_length=args.doc_length, seed=0)
    t_write = time.perf_counter() - t
    X, vocab = read_corpus(path)
    X = X.astype(np.float64)
    rows = []

    corpus = open_corpus(path, partition_bytes=int(args.partition_mb * 2**20), min_partitions=2)
    m = LatentDirichletAllocation(args.k, max_iter=args.iters, random_state=0, scheduler=args.scheduler,
                                  doc_topic_init="ones" if args.ones else "random")
    t = time.perf_counter()
    m.fit(corpus)
    wall = time.perf_counter() - t

    def perplexity_of(components):
        """One evaluator for every system: emflow's perplexity (E-step from ones) of these topics."""
        import copy

        ev = copy.copy(m)
        ev.components_ = np.asarray(components, dtype=np.float64)
        return ev.perplexity(path)

    rows.append((f"emflow ({args.scheduler}, {corpus.n_partitions} partitions)", wall,
                 float(np.mean(m.fit_info_["seconds_per_iteration"])), perplexity_of(m.components_)))

    sk = SkLDA(args.k, learning_method="batch", max_iter=args.iters, random_state=0)
    t = time.perf_counter()
    sk.fit(X)
    wall = time.perf_counter() - t
    rows.append(("scikit-learn batch (n_jobs=None)", wall, wall / args.iters, perplexity_of(sk.components_)))

    try:
        if args.no_gensim:
            raise ImportError
        from gensim.matutils import Sparse2Corpus
        from gensim.models import LdaModel
    except ImportError:
        gensim_note = "gensim skipped (--no-gensim)" if args.no_gensim else "gensim not installed: skipped"
    else:
        gensim_note = ""
        corpus_g = Sparse2Corpus(X, documents_columns=False)
        t = time.perf_counter()
        g = LdaModel(corpus_g, num_topics=args.k, passes=args.iters, update_every=0, chunksize=args.n_docs,
                     random_state=0, alpha=1.0 / args.k, eta=1.0 / args.k)
        wall = time.perf_counter() - t
        rows.append(("gensim LdaModel (batch)", wall, wall / args.iters, perplexity_of(g.state.get_lambda())))

    lines = [
        f"LDA, {args.n_docs} docs x {args.n_terms} terms, nnz {X.nnz}, K={args.k}, {args.iters} iterations "
        f"(corpus written in {t_write:.1f}s)",
        "",
        "| implementation | wall s | s / iteration | training perplexity |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {w:.2f} | {s:.3f} | {p:.4f} |" for name, w, s, p in rows]
    if gensim_note:
        lines += ["", gensim_note]
    table = "\n".join(lines)
    print(table)
    if args.out is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return table


if __name__ == "__main__":
    main()
