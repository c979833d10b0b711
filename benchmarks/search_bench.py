"""Search latency and throughput, pruned against exhaustive, with memory and exactness, in one run.

    python benchmarks/search_bench.py [--sizes 100000 1000000] [--workdir DIR]        # synthetic indexes
    python benchmarks/search_bench.py --index PATH --queries queries.jsonl            # an index from real text
    python benchmarks/search_bench.py --index PATH --queries q.jsonl --add-pruning-files   # upgrade it first

Synthetic indexes (built once, reused from --workdir) have BGE-M3-like
statistics: 1024-dim unit float16 dense vectors, sparse vectors of ~150
distinct token ids per document drawn from a Zipf distribution over 250,002
ids, no text; queries are unit dense vectors with ~12 Zipf-drawn tokens. An
index given with --index (built by `bge-index index` from real text, with
any BGE-M3-shaped checkpoint) is searched with its own model's encodings of
--queries (JSONL `_id`/`text` or TSV), encoded once, before timing.

In a fresh process per index it measures, side by side:

- p50 / p95 latency per mode (dense, sparse, hybrid; k = 10), one query at a
  time, pruned (the default) and exhaustive (every row scored: the same
  answers, `Searcher.prune = False`);
- rows scored exactly per query by the pruned search (median, 95th pct, max);
- queries/s of batches of 16 (one int8 pass for the batch) against one at a time,
  on the int8 codes as mapped (the CLI's `--queries`, eval) and on packed codes
  (`Searcher.pack_codes`, what `serve` does; lone queries then read them too,
  and their p50 is measured again), the packed answers (batches and lone)
  checked against each query searched alone on the mapped codes, and the
  packing time;
- the copy-bandwidth bound: the float16 dense matrix's bytes / measured
  memcpy bandwidth, and each mode's p50 against it;
- resident memory after the pruned searches (the packed copy included)
  against the index's search files, in all and above the runtime's own
  (Python, numpy, torch: measured before opening the index), and the int8
  codes' size against the float16 dense file's;
- exactness: the share of top-10s whose rows and score bits equal the
  exhaustive search's, and the share equal to an independent brute force
  (numpy float64 dense products, scipy CSR sparse products: rows identical,
  scores within 1e-6);
- open time (in a fresh process, search files mapped and checked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB, DIM, DOC_TOKENS, QUERY_TOKENS = 250_002, 1024, 150, 12
WRITE_BATCH = 10_000
MODES = ("dense", "sparse", "hybrid")


def zipf_cdf(s: float = 1.0, vocab_size: int = VOCAB) -> np.ndarray:
    weights = 1.0 / np.arange(1, vocab_size + 1) ** s
    return np.cumsum(weights) / weights.sum()


def draw_tokens(rng: np.random.Generator, cdf: np.ndarray, rows: int, draws: int) -> list[np.ndarray]:
    samples = np.searchsorted(cdf, rng.random((rows, draws))).astype(np.uint32)
    samples.sort(axis=1)
    keep = np.ones_like(samples, dtype=bool)
    keep[:, 1:] = samples[:, 1:] != samples[:, :-1]
    return [row[mask] for row, mask in zip(samples, keep)]


def unit_rows(rng: np.random.Generator, rows: int, dim: int = DIM) -> np.ndarray:
    matrix = rng.standard_normal((rows, dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


SYNTHETIC_MODEL = {"name": "synthetic", "revision": "none", "sha256": None, "files": {}, "dtype": "fp16",
                   "max_length": 8192}


def build(index_dir: Path, size: int, seed: int = 0, model: dict = SYNTHETIC_MODEL, dim: int = DIM,
          vocab_size: int = VOCAB, shard_rows: int = 100_000, fields=None) -> None:
    """A synthetic index of `size` rows recorded as made by `model` (a manifest's model record); `fields(start,
    count)` may give rows' (sources, source lines, metadata) as RowBatch takes them (the vectors stay the same)."""
    from bge_index.store.manifest import Manifest
    from bge_index.store.shard_writer import IndexWriter, RowBatch

    rng, cdf = np.random.default_rng(seed), zipf_cdf(vocab_size=vocab_size)
    manifest = Manifest(model=model, dense_dim=dim, colbert_dim=None, vocab_size=vocab_size, store_text=False,
                        generation=1)
    writer = IndexWriter(index_dir, manifest, shard_rows=shard_rows)
    for start in range(0, size, WRITE_BATCH):
        count = min(WRITE_BATCH, size - start)
        ids = draw_tokens(rng, cdf, count, 200)  # ~150 distinct of 200 draws
        sparse = [(t, (rng.random(len(t), dtype=np.float32) * 0.3 + 0.01)) for t in ids]
        sources, lines, metadata = fields(start, count) if fields else (None, None, None)
        writer.write(RowBatch([f"doc{start + i}" for i in range(count)], ["0" * 32] * count, None,
                              unit_rows(rng, count, dim), sparse, sources=sources, source_lines=lines,
                              metadata=metadata))
    writer.commit()  # builds each shard's search files (pruning files included) before publishing the manifest


def add_pruning_files(index_dir: Path) -> None:
    """Rewrite the search files of every shard (the pruning kinds included) and publish the manifest: an index
    built before they existed gets them. Nothing else changes (the next index run would keep them)."""
    from bge_index.store.manifest import read_manifest
    from bge_index.store.shard_writer import publish_manifest
    from bge_index.store.vector_store import build_search_files

    manifest = read_manifest(index_dir)
    manifest.shards = [build_search_files(index_dir, manifest, shard) for shard in manifest.shards]
    publish_manifest(index_dir, manifest)


def _has_pruning_files(index_dir: Path) -> bool:
    from bge_index.store.manifest import read_manifest

    return all(any(r["kind"] == "dense-codes" for r in shard.search or []) for shard in read_manifest(index_dir).shards)


def rss_bytes(field: str = "VmRSS") -> tuple[int, int]:
    """(resident bytes: all, or one of /proc's RssAnon / RssFile; the peak of all)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields[field].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def copy_bandwidth() -> float:
    """Bytes read per second by a large memcpy (np.copyto), the best of five."""
    source = np.ones(1 << 27, dtype=np.float64)  # 1 GiB, touched so the pages are real
    target = np.zeros_like(source)
    best = min(_seconds(lambda: np.copyto(target, source)) for _ in range(5))
    return source.nbytes / best


def _seconds(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def synthetic_queries(count: int, dim: int):
    from bge_index.search.query import QueryVectors

    rng, cdf = np.random.default_rng(1), zipf_cdf()
    dense = unit_rows(rng, count, dim)
    return [QueryVectors(dense[i], t, (rng.random(len(t), dtype=np.float32) * 0.3 + 0.01))
            for i, t in enumerate(draw_tokens(rng, cdf, count, QUERY_TOKENS))]


def encoded_queries(index_dir: Path, path: Path, count: int, dtype: str):
    """The first `count` queries of a query file, encoded by the index's own model (as `bge-index search`)."""
    from bge_index.input.documents import read_queries
    from bge_index.search.local_index import LocalIndex

    texts = [d.text for d in read_queries(str(path))][:count]
    index = LocalIndex(index_dir, dtype=dtype)
    try:
        return index.encode_queries(texts)
    finally:
        index.close()


def search_file_bytes(manifest) -> dict[str, int]:
    totals: dict[str, int] = {}
    for shard in manifest.shards:
        for record in shard.search or []:
            totals[record["kind"]] = totals.get(record["kind"], 0) + int(record["bytes"])
    return totals


def measure(index_dir: Path, vectors_file: Path | None, count: int) -> dict:
    import pickle

    from bge_index.search.scoring import Searcher
    from bge_index.store.manifest import read_manifest
    from bge_index.store.vector_store import OpenIndex

    manifest = read_manifest(index_dir)
    # Queries encoded by the parent process (so the model is not in this one's memory), or synthetic.
    queries = pickle.loads(vectors_file.read_bytes()) if vectors_file else synthetic_queries(count, manifest.dense_dim)
    runtime_rss = rss_bytes()[0]  # Python, numpy, torch and the queries, before any of the index
    opened = time.perf_counter()
    shards = OpenIndex.open(index_dir, manifest).vectors  # what LocalIndex opens, without the model
    searcher = Searcher(shards, manifest.vocab_size)
    open_seconds = time.perf_counter() - opened
    files = search_file_bytes(manifest)
    result: dict = {"documents": len(searcher), "shards": len(shards), "queries": len(queries),
                    "open_seconds": open_seconds,
                    "query_tokens": float(np.mean([len(q.sparse_ids) for q in queries])),
                    "dense_bytes": files.get("dense", 0), "codes_bytes": files.get("dense-codes", 0),
                    "search_file_bytes": sum(files.values()), "pruning_files": "dense-codes" in files,
                    "runtime_rss": runtime_rss,
                    "modes": {}}
    # 1. pruned, one query at a time, then in batches of 16 (the RSS is read after these)
    batches = [queries[i:i + 16] for i in range(0, len(queries) - 15, 16)] or [queries]
    searcher.prune = True
    pruned_hits = {}
    for mode in MODES:
        searcher.search(queries[0], 10, mode)  # warm the page cache
        latencies, rescored, hits = [], [], []
        for q in queries:
            latencies.append(_seconds(lambda q=q: hits.append(searcher.search(q, 10, mode))))
            rescored.append(searcher.last_rescored[0])
        pruned_hits[mode] = hits
        batch_seconds = [_seconds(lambda b=b: searcher.search_many(b, 10, mode)) for b in batches]
        row = result["modes"][mode] = {
            "p50_ms": percentile(latencies, 50) * 1e3, "p95_ms": percentile(latencies, 95) * 1e3,
            "rescored_median": percentile(rescored, 50), "rescored_p95": percentile(rescored, 95),
            "rescored_max": float(max(rescored)),
            "single_qps": len(latencies) / sum(latencies),
            "batch16_qps": sum(len(b) for b in batches) / sum(batch_seconds)}
        row["batch_over_single"] = row["batch16_qps"] / row["single_qps"]
    # 1b. batches again on packed int8 codes (what `serve` does when they fit), each answer checked against the
    #     query searched alone; the RSS is read after, so it counts the packed copy
    started = time.perf_counter()
    result["packed_bytes"] = searcher.pack_codes()
    result["pack_seconds"] = time.perf_counter() - started
    for mode in MODES:
        searcher.search_many(batches[0], 10, mode)  # warm
        answers: list = []
        batch_seconds = [_seconds(lambda b=b: answers.extend(searcher.search_many(b, 10, mode))) for b in batches]
        # lone queries read the packed codes too: the batches' gain is measured against them
        lone: list = []
        latencies = [_seconds(lambda q=q: lone.append(searcher.search(q, 10, mode))) for q in queries]
        row = result["modes"][mode]
        row["packed_p50_ms"] = percentile(latencies, 50) * 1e3
        row["packed_single_qps"] = len(latencies) / sum(latencies)
        row["packed_batch16_qps"] = sum(len(b) for b in batches) / sum(batch_seconds)
        row["packed_batch_over_single"] = row["packed_batch16_qps"] / row["packed_single_qps"]
        def key(hits):
            return [(h.row, np.float32(h.score).tobytes()) for h in hits]

        # each query's packed answers (alone, and in its batch when it was in a full one) against its answer
        # alone on the mapped codes
        batched = answers + [None] * (len(queries) - len(answers))
        row["packed_equal_to_alone"] = sum((got is None or key(got) == key(want)) and key(one) == key(want)
                                           for got, one, want in zip(batched, lone, pruned_hits[mode]))
    result["rss"], result["rss_peak"] = rss_bytes()
    result["rss_anon"], result["rss_file"] = rss_bytes("RssAnon")[0], rss_bytes("RssFile")[0]
    # 2. exhaustive: every row scored, the same answers
    searcher.prune = False
    for mode in MODES:
        searcher.search(queries[0], 10, mode)
        latencies, same = [], 0
        for q, pruned in zip(queries, pruned_hits[mode]):
            hits: list = []
            latencies.append(_seconds(lambda q=q: hits.append(searcher.search(q, 10, mode))))
            same += [(h.row, np.float32(h.score).tobytes()) for h in hits[0]] == \
                [(h.row, np.float32(h.score).tobytes()) for h in pruned]
        result["modes"][mode].update(exhaustive_p50_ms=percentile(latencies, 50) * 1e3,
                                     exhaustive_p95_ms=percentile(latencies, 95) * 1e3,
                                     equal_to_exhaustive=f"{same}/{len(queries)}")
    # 3. an independent brute force: float64 dense products, scipy CSR sparse products
    result["brute_force"] = brute_force(index_dir, manifest, queries, pruned_hits)
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_gbps"] = bandwidth / 1e9
    result["bandwidth_bound_ms"] = result["dense_bytes"] / bandwidth * 1e3
    return result


def brute_force(index_dir: Path, manifest, queries, pruned_hits) -> dict:
    import scipy.sparse

    from bge_index.store.shard_reader import live_mask, read_shard_vectors

    matrices, csr_parts, masks = [], [], []
    for shard in manifest.shards:
        dense, indptr, indices, values = read_shard_vectors(index_dir, manifest, shard)
        matrices.append(dense)
        csr_parts.append(scipy.sparse.csr_matrix((values, indices, indptr), shape=(len(dense), manifest.vocab_size)))
        masks.append(live_mask(index_dir, shard))
    matrix, live = np.concatenate(matrices), np.concatenate(masks)
    csr = scipy.sparse.vstack(csr_parts).tocsr()
    out, times = {}, {"dense": [], "sparse": []}
    equal = {mode: 0 for mode in MODES}
    near = {mode: 0 for mode in MODES}  # equal but for the order of rows whose scores are within 1e-6
    for i, q in enumerate(queries):
        started = time.perf_counter()
        dense = np.concatenate([matrix[s:s + 65536].astype(np.float64) @ q.dense.astype(np.float64)
                                for s in range(0, len(matrix), 65536)])
        times["dense"].append(time.perf_counter() - started)
        started = time.perf_counter()
        vector = np.zeros(manifest.vocab_size, dtype=np.float32)
        vector[q.sparse_ids] = q.sparse_weights
        sparse = np.asarray(csr @ vector, dtype=np.float64)  # ~12 float32 terms a row: within 1e-7
        times["sparse"].append(time.perf_counter() - started)
        for mode, scores in (("dense", dense), ("sparse", sparse), ("hybrid", dense + 0.3 * sparse)):
            scores = np.where(live, scores, -np.inf)
            order = np.lexsort((np.arange(len(scores)), -scores))[:10]
            hits = pruned_hits[mode][i]
            close = bool(np.all(np.abs(np.array([h.score for h in hits]) - scores[order]) <= 1e-6))
            equal[mode] += [h.row for h in hits] == order.tolist() and close
            # float32 scores cannot order rows whose float64 scores differ by less than their rounding: each
            # hit's own brute-force score within 1e-6 of the brute force's score at its rank
            near[mode] += close and len(hits) == len(order) and bool(
                np.all(np.abs(scores[[h.row for h in hits]] - scores[order]) <= 1e-6))
    out["dense_p50_ms"] = percentile(times["dense"], 50) * 1e3
    out["sparse_p50_ms"] = percentile(times["sparse"], 50) * 1e3
    out["top10_equal"] = {mode: f"{equal[mode]}/{len(queries)}" for mode in MODES}
    out["top10_equal_but_near_ties"] = {mode: f"{near[mode]}/{len(queries)}" for mode in MODES}
    return out


def open_twice(index_dir: Path) -> tuple[float, float]:
    """Seconds for a first open and a second one, each in a new process (the second finds the checks done)."""
    code = ("import sys,time;from pathlib import Path;from bge_index.store.manifest import read_manifest;"
            "from bge_index.store.vector_store import OpenIndex;t=time.perf_counter();d=Path(sys.argv[1]);"
            "OpenIndex.open(d, read_manifest(d));print(time.perf_counter()-t)")
    times = [float(subprocess.run([sys.executable, "-c", code, str(index_dir)], check=True, capture_output=True,
                                  text=True).stdout) for _ in range(2)]
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bge-index-search-bench")
    parser.add_argument("--index", type=Path, help="measure this index (built by `bge-index index`) instead")
    parser.add_argument("--queries", type=Path, help="with --index: queries to encode with the index's model")
    parser.add_argument("--add-pruning-files", action="store_true",
                        help="with --index: first write the search files again, pruning files included")
    parser.add_argument("--count", type=int, default=64, help="queries measured (synthetic, or the first of --queries)")
    parser.add_argument("--dtype", default="auto", help="with --queries: the query encoder's precision")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one index, in a fresh process
    parser.add_argument("--vectors", type=Path, help=argparse.SUPPRESS)  # internal: encoded queries (pickle)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.vectors, args.count)))
        return
    targets = []
    if args.index:
        if args.add_pruning_files:
            add_pruning_files(args.index)
        targets.append((str(args.index), args.index))
    else:
        for size in args.sizes:
            index_dir = args.workdir / f"synthetic-{size}"
            if not (index_dir / "manifest.json").exists():
                started = time.perf_counter()
                build(index_dir, size)
                print(f"built {index_dir} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            elif not _has_pruning_files(index_dir):  # built by an earlier version of this script
                add_pruning_files(index_dir)
            targets.append((f"{size:,} synthetic documents", index_dir))
    for label, index_dir in targets:
        first_open, second_open = open_twice(index_dir)
        # Let freshly written files reach the disk first: measuring while the kernel writes back gigabytes of
        # dirty pages made the 1M scans 3x slower.
        os.sync()
        time.sleep(2)
        command = [sys.executable, __file__, "--measure", str(index_dir), "--count", str(args.count)]
        if args.queries:
            import pickle

            vectors = args.workdir / "encoded-queries.pickle"
            vectors.parent.mkdir(parents=True, exist_ok=True)
            vectors.write_bytes(pickle.dumps(encoded_queries(index_dir, args.queries, args.count, args.dtype)))
            command += ["--vectors", str(vectors)]
        measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        report(label, measured, first_open, second_open)


def report(label: str, m: dict, first_open: float, second_open: float) -> None:
    gib = 1 << 30
    print(f"\n{label}: {m['documents']:,} rows in {m['shards']} shards, {m['queries']} queries "
          f"({m['query_tokens']:.1f} tokens each); dense file {m['dense_bytes'] / gib:.2f} GiB, int8 codes "
          f"{m['codes_bytes'] / gib:.2f} GiB ({m['codes_bytes'] / max(m['dense_bytes'], 1):.2f} x the dense file), "
          f"all search files {m['search_file_bytes'] / gib:.2f} GiB; pruning files: {m['pruning_files']}")
    print(f"open: {first_open:.2f} s in a new process, {second_open:.2f} s the next time; "
          f"in the measuring process {m['open_seconds']:.3f} s")
    bound = m["bandwidth_bound_ms"]
    print(f"copy-bandwidth bound of the float16 dense matrix: {bound:.1f} ms "
          f"({m['dense_bytes'] / gib:.2f} GiB at {m['copy_bandwidth_gbps']:.1f} GB/s)")
    header = (f"{'mode':<7} {'p50 ms':>8} {'p95 ms':>8} {'p50/bound':>9} {'exhaustive p50':>15} {'speed-up':>8} "
              f"{'rescored med/p95/max':>22} {'single q/s':>10} {'batch16 q/s':>11} {'batch/single':>12} "
              f"{'packed p50':>10} {'packed q/s':>10} {'packed batch/single':>19} {'= alone':>7} {'= exhaustive':>12} "
              f"{'= brute force':>13}")
    print(header)
    for mode, row in m["modes"].items():
        rescored = f"{row['rescored_median']:.0f}/{row['rescored_p95']:.0f}/{row['rescored_max']:.0f}"
        print(f"{mode:<7} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} {row['p50_ms'] / bound:>9.2f} "
              f"{row['exhaustive_p50_ms']:>15.1f} {row['exhaustive_p50_ms'] / row['p50_ms']:>8.1f} {rescored:>22} "
              f"{row['single_qps']:>10.1f} {row['batch16_qps']:>11.1f} {row['batch_over_single']:>12.1f} "
              f"{row['packed_p50_ms']:>10.2f} {row['packed_batch16_qps']:>10.1f} {row['packed_batch_over_single']:>19.1f} "
              f"{row['packed_equal_to_alone']:>7} {row['equal_to_exhaustive']:>12} "
              f"{m['brute_force']['top10_equal'][mode]:>13}")
    print(f"packed int8 codes (serve's passes, lone queries' and batches'; packed p50 and packed batch/single: "
          f"both on them): {m['packed_bytes'] / gib:.2f} GiB packed in {m['pack_seconds']:.1f} s"
          if m["packed_bytes"] else "packed int8 codes: not packed (over a quarter of the memory, or no exact kernel)")
    print(f"brute force (numpy float64 dense, scipy CSR sparse), p50: dense {m['brute_force']['dense_p50_ms']:.1f} ms, "
          f"sparse {m['brute_force']['sparse_p50_ms']:.1f} ms; top-10s equal to it but for the order of rows whose "
          "scores are within 1e-6 (float32 cannot order those): "
          + ", ".join(f"{mode} {v}" for mode, v in m['brute_force']['top10_equal_but_near_ties'].items()))
    print(f"resident memory after the pruned searches: {m['rss'] / gib:.2f} GiB = "
          f"{m['rss'] / max(m['search_file_bytes'], 1):.2f} x the search files (peak {m['rss_peak'] / gib:.2f} GiB, "
          "the exhaustive and brute-force runs included); above the runtime's own "
          f"{m['runtime_rss'] / gib:.2f} GiB (Python, numpy, torch, measured before opening the index): "
          f"{(m['rss'] - m['runtime_rss']) / max(m['search_file_bytes'], 1):.2f} x; of it "
          f"{m['rss_file'] / gib:.2f} GiB mapped from files (the search files' pages this process touched, and "
          f"libraries), {m['rss_anon'] / gib:.2f} GiB its own (the runtime's, the packed codes, scratch arrays)")


if __name__ == "__main__":
    main()
