"""Why sparse search runs the full accumulation: rank-safe MaxScore against it, on one index, in one process.

    python benchmarks/sparse_floor.py --index INDEX [--vectors QUERIES.pickle] [--count 64] [--rounds 3]

INDEX is any index with search files (search_bench.py builds the synthetic ones: --workdir/synthetic-1000000);
the queries are search_bench.py's synthetic ones, or pickled QueryVectors (search_bench.py writes them to its
--workdir as encoded-queries.pickle). Per round, per query, timed alternately (k = 10):

- the full accumulation (`Searcher.sparse_scores`, what sparse search runs);
- the same with dense columns for every token in at least 10% of a shard's rows (built in memory here; the
  index's own files give them only to tokens in half the rows, store.vector_store.HEAVY_DENSITY);
- MaxScore given the exact k-th score from the start (an oracle: the least its candidates can be), every shard's
  `SparseShardQuery.reaching`;
- MaxScore as it runs (`PrunedSearch.sparse`: seeds, then the shards with a rising threshold).

It prints each one's p50 and the postings MaxScore must read with the oracle threshold (the kept tokens': no row
outside them can reach it) against all the query's postings outside the dense columns. Then batches of 16: the
full accumulation query by query (what a batch runs) against shard by shard (a shard's columns and postings read
for all 16 queries while they are in the cache), alternately, in ms per query.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--vectors", type=Path, help="pickled QueryVectors (default: synthetic queries)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import bge_index.store.vector_store as vector_store
    from bge_index.search.scoring import Searcher
    from bge_index.store.manifest import read_manifest
    from search_bench import synthetic_queries

    manifest = read_manifest(args.index)
    queries = (pickle.loads(args.vectors.read_bytes())[:args.count] if args.vectors
               else synthetic_queries(args.count, manifest.dense_dim))
    shards = vector_store.OpenIndex.open(args.index, manifest).vectors
    searcher = Searcher(shards, manifest.vocab_size)
    wider = []
    saved, vector_store.HEAVY_DENSITY = vector_store.HEAVY_DENSITY, 0.1
    try:
        for shard in shards:
            heavy, columns = vector_store.heavy_columns(shard.token_ids, shard.token_ptr, shard.posting_rows,
                                                        shard.posting_weights, shard.rows)
            wider.append(dataclasses.replace(shard, heavy_ids=heavy, heavy_columns=columns))
    finally:
        vector_store.HEAVY_DENSITY = saved
    wide = Searcher(wider, manifest.vocab_size)
    pruned = searcher._pruned
    scores = np.empty(searcher.rows, dtype=np.float32)
    thresholds, kept, postings = [], [], []
    for query in queries:
        searcher.sparse_scores(query, out=scores)
        thresholds.append(float(np.partition(scores, len(scores) - 10)[len(scores) - 10]))
        parts = [pruned._sparse_query(n, query) for n in range(len(shards))]
        # (a shard where no token can be left out, split None: every posting of its tokens)
        splits = [(part.split(thresholds[-1]) or (part.tokens, []))[0] for part in parts]
        kept.append(sum(t.count for tokens in splits for t in tokens))
        postings.append(sum(t.count for part in parts for t in part.tokens if t.column is None))

    def oracle(query, threshold):
        for number in range(len(shards)):
            part = pruned._sparse_query(number, query)
            if part.split(threshold) is not None:
                part.reaching(threshold)

    variants = {
        "full accumulation (sparse search)": lambda q, t: searcher.sparse_scores(q, out=scores),
        "full accumulation, dense columns from 10%": lambda q, t: wide.sparse_scores(q, out=scores),
        "MaxScore, oracle threshold": oracle,
        "MaxScore with its seeds": lambda q, t: pruned.sparse(q, 10),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for i, (query, threshold) in enumerate(zip(queries, thresholds)):
            names = list(variants)
            shift = (i + round_) % len(names)  # each variant first in turn: none finds the others' pages cached
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                variants[name](query, threshold)
                seconds[name].append(time.perf_counter() - started)
    print(f"{args.index}: {searcher.rows:,} rows in {len(shards)} shards, {len(queries)} queries, "
          f"{args.rounds} rounds, variants alternated per query")
    print(f"postings MaxScore must read with the oracle threshold: median {np.median(kept):,.0f} of "
          f"{np.median(postings):,.0f} per query (outside the dense columns)")
    print(f"{'variant':<45} {'p50 ms':>8} {'p95 ms':>8}")
    for name, values in seconds.items():
        print(f"{name:<45} {np.percentile(values, 50) * 1e3:>8.2f} {np.percentile(values, 95) * 1e3:>8.2f}")
    batches(searcher, queries, args.rounds)


def batches(searcher, queries, rounds: int) -> None:
    """Batches of 16: the accumulation query by query against shard by shard (same bits, checked)."""
    import torch

    from bge_index.search.scoring import accumulate_sparse

    groups = [queries[i:i + 16] for i in range(0, len(queries) - 15, 16)]
    out = np.empty((16, searcher.rows), dtype=np.float32)

    def query_by_query(group):
        for query, row in zip(group, out):
            searcher.sparse_scores(query, out=row)

    def shard_by_shard(group):
        total = torch.from_numpy(out[:len(group)])
        total.zero_()
        weights = [[float(w) for w in np.asarray(q.sparse_weights, np.float32)] for q in group]
        for shard in searcher.shards:
            for i, query in enumerate(group):
                view = total[i, shard.start:shard.start + shard.rows]
                accumulate_sparse(shard, query.sparse_ids, weights[i], view)
                if shard.live is not None:
                    view[torch.from_numpy(~shard.live)] = -np.inf

    if not groups:
        return
    query_by_query(groups[0])
    expected = out.copy()
    shard_by_shard(groups[0])
    assert np.array_equal(expected.view(np.int32), out.view(np.int32))
    seconds: dict = {"query by query": [], "shard by shard": []}
    variants = {"query by query": query_by_query, "shard by shard": shard_by_shard}
    for round_ in range(rounds):
        for i, group in enumerate(groups):
            names = list(variants)[::1 if (i + round_) % 2 == 0 else -1]
            for name in names:
                started = time.perf_counter()
                variants[name](group)
                seconds[name].append((time.perf_counter() - started) / len(group))
    print(f"batches of 16 ({len(groups)} x {rounds} rounds), ms per query: " +
          ", ".join(f"{name} {np.median(v) * 1e3:.2f} (range {min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})"
                    for name, v in seconds.items()))


if __name__ == "__main__":
    main()
