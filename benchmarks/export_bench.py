"""Export an index to Milvus Lite and print a table: rows/s for a first export, a re-export (upserts), and HNSW.

    python benchmarks/export_bench.py [--index INDEX_DIR] [--rows 20000] [--dim 1024] [--sparse 60] [--batch 1000]

Without --index it writes a synthetic index with BGE-M3's shapes (1024-dim
dense vectors, about --sparse tokens per sparse vector, no text), so the
figure does not depend on having encoded a corpus first. The Milvus Lite
file lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bge_index.search.milvus import export_index
from bge_index.store.manifest import Manifest, read_manifest
from bge_index.store.shard_writer import IndexWriter, RowBatch

VOCAB = 250_002


def synthetic_index(folder: Path, rows: int, dim: int, sparse_tokens: int) -> None:
    manifest = Manifest(model={"name": "synthetic", "revision": None, "sha256": "0" * 64, "files": {},
                               "dtype": "fp32", "max_length": 512},
                        dense_dim=dim, colbert_dim=None, vocab_size=VOCAB, store_text=False, generation=1)
    writer = IndexWriter(folder, manifest, shard_rows=100_000)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 1000):
        n = min(1000, rows - start)
        dense = rng.standard_normal((n, dim)).astype(np.float32)
        dense /= np.linalg.norm(dense, axis=1, keepdims=True)
        sparse = []
        for _ in range(n):
            count = int(rng.integers(sparse_tokens // 2, sparse_tokens * 3 // 2))
            ids = np.sort(rng.choice(VOCAB, size=count, replace=False)).astype(np.uint32)
            sparse.append((ids, rng.random(count, dtype=np.float32) * 0.3))
        writer.write(RowBatch(ids=[f"doc{start + i}" for i in range(n)], content_hashes=["-"] * n, texts=None,
                              dense=dense, sparse=sparse))
    writer.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--sparse", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        index = args.index
        if index is None:
            index = Path(scratch) / "index"
            synthetic_index(index, args.rows, args.dim, args.sparse)
        manifest = read_manifest(index)
        uri = str(Path(scratch) / "milvus.db")
        runs = [("first export (insert), flat", dict(index_type="flat")),
                ("re-export (upsert + stale check)", dict(index_type="flat")),
                ("--drop-existing, hnsw", dict(index_type="hnsw", drop_existing=True))]
        print(f"index: {manifest.documents:,} rows, dense {manifest.dense_dim}, batch {args.batch}, Milvus Lite")
        print("| run | rows | seconds | rows/s |")
        print("|---|---|---|---|")
        for label, options in runs:
            summary = export_index(index, uri, "bench", batch=args.batch, **options)
            print(f"| {label} | {summary.rows:,} | {summary.seconds:.1f} | {summary.rows_per_second:,.0f} |")


if __name__ == "__main__":
    main()
