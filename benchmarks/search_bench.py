"""Search latency, throughput, open time and memory on synthetic indexes in the real on-disk format.

    python benchmarks/search_bench.py [--sizes 100000 1000000] [--workdir DIR] [--batch-queries 1000]

For each size it builds (once; reused from --workdir when present) an index
with BGE-M3-like statistics: 1024-dim unit float16 dense vectors, sparse
vectors of ~150 distinct token ids per document drawn from a Zipf
distribution over 250,002 ids, no text. Queries: unit dense vectors and ~12
Zipf-drawn sparse tokens. Then, in a fresh process per size, it measures:

- open time: the first open (builds the search files) and a second one (memory-maps them);
- p50 / p95 single-query latency per mode (dense, sparse, hybrid), k = 10;
- batch throughput: `--batch-queries` queries in one call (one pass over the matrix per 64 queries);
- resident memory after the searches, against the size of the vectors;
- side by side, the brute-force baselines (numpy: float16 rows widened to
  float32 in chunks and multiplied, the obvious numpy code; sparse: scipy CSR
  matrix-vector product over all documents), and the memory-bandwidth bound
  for a full scan of the float16 matrix (its bytes / measured copy bandwidth).
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
          vocab_size: int = VOCAB, shard_rows: int = 100_000) -> None:
    """A synthetic index of `size` rows recorded as made by `model` (a manifest's model record)."""
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
        writer.write(RowBatch([f"doc{start + i}" for i in range(count)], ["0" * 32] * count, None,
                              unit_rows(rng, count, dim), sparse))
    writer.commit()  # builds each shard's search files before publishing the manifest


def rss_bytes() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


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


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def measure(index_dir: Path, batch_queries: int, latency_queries: int) -> dict:
    from bge_index.store.manifest import read_manifest
    from bge_index.search.query import QueryVectors
    from bge_index.search.scoring import Searcher, top_k
    from bge_index.store.shard_reader import read_shard_vectors
    from bge_index.store.vector_store import OpenIndex

    manifest = read_manifest(index_dir)
    opened = time.perf_counter()
    shards = OpenIndex.open(index_dir, manifest).vectors  # what LocalIndex opens, without the model
    searcher = Searcher(shards, manifest.vocab_size)
    open_seconds = time.perf_counter() - opened
    rng, cdf = np.random.default_rng(1), zipf_cdf()
    dense_queries = unit_rows(rng, batch_queries)
    queries = [QueryVectors(dense_queries[i], t, (rng.random(len(t), dtype=np.float32) * 0.3 + 0.01))
               for i, t in enumerate(draw_tokens(rng, cdf, batch_queries, QUERY_TOKENS))]
    result: dict = {"documents": len(searcher), "open_seconds": open_seconds,
                    "query_tokens": float(np.mean([len(q.sparse_ids) for q in queries])),
                    "dense_bytes": int(sum(s.dense.nbytes for s in shards)),
                    "vector_bytes": int(sum(s.dense.nbytes + s.posting_rows.nbytes + s.posting_weights.nbytes
                                            + s.token_ptr.nbytes for s in shards)),
                    "modes": {}}
    for mode in ("dense", "sparse", "hybrid"):
        searcher.search(queries[0], 10, mode)  # warm the page cache
        latencies = [_seconds(lambda q=q: searcher.search(q, 10, mode)) for q in queries[:latency_queries]]
        batch = _seconds(lambda: searcher.search_many(queries, 10, mode))
        p50, p95 = percentiles(latencies)
        result["modes"][mode] = {"p50_ms": p50 * 1e3, "p95_ms": p95 * 1e3, "batch_qps": batch_queries / batch,
                                 "single_qps": 1 / p50}
    result["rss"], result["rss_peak"] = rss_bytes()

    # Baselines, side by side in the same process (after the RSS reading above).
    tops_equal = 0
    dense_times, sparse_times = [], []
    import scipy.sparse

    matrices, csr_parts = [], []
    for shard in manifest.shards:
        dense, indptr, indices, values = read_shard_vectors(index_dir, manifest, shard)
        matrices.append(dense)
        csr_parts.append(scipy.sparse.csr_matrix((values, indices, indptr), shape=(len(dense), VOCAB)))
    matrix = np.concatenate(matrices)
    csr = scipy.sparse.vstack(csr_parts).tocsr()
    for q in queries[:latency_queries]:
        def numpy_dense():
            return np.concatenate([matrix[s:s + 65536].astype(np.float32) @ q.dense for s in range(0, len(matrix), 65536)])

        def scipy_sparse():
            vector = np.zeros(VOCAB, dtype=np.float32)
            vector[q.sparse_ids] = q.sparse_weights
            return csr @ vector

        dense_times.append(_seconds(numpy_dense))
        sparse_times.append(_seconds(scipy_sparse))
        baseline = top_k(numpy_dense() + np.float32(0.3) * scipy_sparse().astype(np.float32), 10)
        tops_equal += [h.row for h in searcher.search(q, 10, "hybrid")] == baseline.tolist()
    result["baseline"] = {"dense_p50_ms": percentiles(dense_times)[0] * 1e3,
                          "sparse_p50_ms": percentiles(sparse_times)[0] * 1e3,
                          "hybrid_top10_equal": f"{tops_equal}/{latency_queries}"}
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_gbps"] = bandwidth / 1e9
    result["bandwidth_bound_ms"] = result["dense_bytes"] / bandwidth * 1e3
    return result


def open_twice(index_dir: Path) -> tuple[float, float]:
    """Seconds for a first open (builds search files when missing) and a second one, each in a new process."""
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
    parser.add_argument("--batch-queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=50)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one size, in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch_queries, args.latency_queries)))
        return
    for size in args.sizes:
        index_dir = args.workdir / f"synthetic-{size}"
        if not (index_dir / "manifest.json").exists():
            started = time.perf_counter()
            build(index_dir, size)
            print(f"built {index_dir} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for stale in index_dir.glob("*.npy"):
            if ".deleted-" not in stale.name:
                stale.unlink()  # so the first open really builds the search files
        first_open, second_open = open_twice(index_dir)
        # Let the freshly written search files reach the disk first: measuring while the kernel
        # writes back gigabytes of dirty pages made the 1M scans 3x slower.
        os.sync()
        time.sleep(2)
        measured = json.loads(subprocess.run(
            [sys.executable, __file__, "--measure", str(index_dir), "--batch-queries", str(args.batch_queries),
             "--latency-queries", str(args.latency_queries)], check=True, capture_output=True, text=True).stdout)
        report(size, measured, first_open, second_open)


def report(size: int, m: dict, first_open: float, second_open: float) -> None:
    gib = 1 << 30
    print(f"\n{size:,} documents: dense {m['dense_bytes'] / gib:.2f} GiB, vectors with postings "
          f"{m['vector_bytes'] / gib:.2f} GiB, {m['query_tokens']:.1f} tokens per query")
    print(f"open: first {first_open:.2f} s (builds search files), then {second_open:.2f} s; "
          f"in the measuring process {m['open_seconds']:.3f} s")
    print(f"{'mode':<8} {'p50 ms':>8} {'p95 ms':>8} {'batch q/s':>10} {'single q/s':>11} {'batch/single':>13} "
          f"{'baseline p50 ms':>16} {'speed-up':>9}")
    base = {"dense": m["baseline"]["dense_p50_ms"], "sparse": m["baseline"]["sparse_p50_ms"],
            "hybrid": m["baseline"]["dense_p50_ms"] + m["baseline"]["sparse_p50_ms"]}
    for mode, row in m["modes"].items():
        print(f"{mode:<8} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} {row['batch_qps']:>10.1f} "
              f"{row['single_qps']:>11.1f} {row['batch_qps'] / row['single_qps']:>13.1f} {base[mode]:>16.1f} "
              f"{base[mode] / row['p50_ms']:>9.1f}")
    print(f"memory-bandwidth bound for the dense scan: {m['bandwidth_bound_ms']:.1f} ms "
          f"({m['dense_bytes'] / gib:.2f} GiB at {m['copy_bandwidth_gbps']:.1f} GB/s copy bandwidth); "
          f"dense p50 / bound = {m['modes']['dense']['p50_ms'] / m['bandwidth_bound_ms']:.2f}, "
          f"hybrid p50 / bound = {m['modes']['hybrid']['p50_ms'] / m['bandwidth_bound_ms']:.2f}")
    print(f"resident memory after searching: {m['rss'] / gib:.2f} GiB = {m['rss'] / m['vector_bytes']:.2f} x the "
          f"vectors (peak {m['rss_peak'] / gib:.2f} GiB); hybrid top-10 equal to the baseline's: "
          f"{m['baseline']['hybrid_top10_equal']}")


if __name__ == "__main__":
    main()
