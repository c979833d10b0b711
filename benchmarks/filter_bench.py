"""What a --where filter costs against the unfiltered search, on a synthetic index with metadata, in one run.

    python benchmarks/filter_bench.py [--size 1000000] [--workdir DIR] [--count 32]

The index is search_bench.py's synthetic one (the same vectors, seed 0) with
each row's metadata: `year` uniform over 1975-2024, `lang` one of 20 codes
(Zipf), a whole file's `path` in one of 1,000 folders, and a source file and
line. Two filters: a selective one (`startswith(path, "folder-007/")`: 0.1%
of the rows) and a broad one (`year >= 2000`: 50%). In a fresh process,
per mode (dense, sparse, hybrid; k = 10), one query at a time:

- p50 of the unfiltered search (pruned, as `bge-index search`), and of each
  filtered search once its rows are known (a LocalIndex keeps the 16 latest);
- the first use of each filter: reading the columns it needs and evaluating
  it over every row (what a new filter costs once);
- rows scored exactly per query (median);
- exactness: each filtered top-10 (rows and score bits) against the full
  scans with the rows outside the filter at -inf (the definition).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_bench import build, percentile, synthetic_queries  # noqa: E402

FILTERS = {"selective": 'startswith(path, "folder-007/")', "broad": "year >= 2000"}
LANGS = [f"l{i:02d}" for i in range(20)]
MODES = ("dense", "sparse", "hybrid")


def row_fields(start: int, count: int):
    """Sources, lines and metadata of rows start..start+count (deterministic: a row's number decides them)."""
    rng = np.random.default_rng(start + 7)
    weights = 1 / np.arange(1, len(LANGS) + 1)
    langs = rng.choice(len(LANGS), count, p=weights / weights.sum())
    years = rng.integers(1975, 2025, count)
    sources, lines, metadata = [], [], []
    for i in range(count):
        row = start + i
        sources.append(f"/corpus/part-{row // 100_000:03d}.jsonl")
        lines.append(row % 100_000 + 1)
        metadata.append({"lang": LANGS[langs[i]], "year": str(years[i]),
                         "path": f"folder-{row % 1000:03d}/doc-{row}.md"})
    return sources, lines, metadata


def _seconds(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(index_dir: Path, count: int) -> dict:
    from bge_index.search.filters import RowColumns, parse_where
    from bge_index.search.scoring import Searcher, fuse, top_k
    from bge_index.search.query import ScoreWeights
    from bge_index.store.manifest import read_manifest
    from bge_index.store.vector_store import OpenIndex

    manifest = read_manifest(index_dir)
    opened = OpenIndex.open(index_dir, manifest)
    searcher = Searcher(opened.vectors, manifest.vocab_size)
    queries = synthetic_queries(count, manifest.dense_dim)
    result: dict = {"rows": searcher.rows, "queries": count, "filters": {}, "unfiltered": {}}
    for mode in MODES:
        searcher.search(queries[0], 10, mode)
        latencies = [_seconds(lambda q=q: searcher.search(q, 10, mode)) for q in queries]
        result["unfiltered"][mode] = {"p50_ms": percentile(latencies, 50) * 1e3,
                                      "rescored": percentile([searcher.search(q, 10, mode) and
                                                              searcher.last_rescored[0] for q in queries[:8]], 50)}
    columns = RowColumns(searcher.rows, opened.read_arrow)
    for name, text in FILTERS.items():
        restricted = []
        first = _seconds(lambda: restricted.append(searcher.restricted(columns.matching(parse_where(text)))))
        view = restricted[0]
        row = result["filters"][name] = {"where": text, "matching": view.live_rows, "first_use_ms": first * 1e3,
                                         "modes": {}}
        allowed = np.zeros(searcher.rows, dtype=bool)
        allowed[view.live_row_numbers()] = True
        checked = queries[:16]
        dense_all = searcher.dense_scores_many(np.stack([q.dense for q in checked]))
        for mode in MODES:
            view.search(queries[0], 10, mode)
            latencies, rescored = [], []
            for q in queries:
                latencies.append(_seconds(lambda q=q: view.search(q, 10, mode)))
                rescored.append(view.last_rescored[0])
            same = 0
            for q, dense in zip(checked, dense_all):
                dense, sparse = dense.copy(), searcher.sparse_scores(q).copy()
                dense[~allowed], sparse[~allowed] = -np.inf, -np.inf
                ranking = dense if mode == "dense" else sparse if mode == "sparse" else \
                    fuse(dense, sparse, ScoreWeights())
                expected = [(int(r), np.float32(ranking[r]).tobytes()) for r in top_k(ranking, 10)]
                got = [(h.row, np.float32(h.score).tobytes()) for h in view.search(q, 10, mode)]
                same += got == expected
            row["modes"][mode] = {"p50_ms": percentile(latencies, 50) * 1e3, "rescored": percentile(rescored, 50),
                                  "exact": f"{same}/{len(checked)}"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bge-index-search-bench")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.count)))
        return
    index_dir = args.workdir / f"synthetic-metadata-{args.size}"
    if not (index_dir / "manifest.json").exists():
        started = time.perf_counter()
        build(index_dir, args.size, fields=row_fields)
        print(f"built {index_dir} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    command = [sys.executable, __file__, "--measure", str(index_dir), "--count", str(args.count)]
    m = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print(f"{m['rows']:,} synthetic rows with metadata, {m['queries']} queries, k 10, one query at a time")
    print(f"{'mode':<7} {'filter':<10} {'matching':>9} {'first use ms':>12} {'p50 ms':>8} {'x unfiltered':>12} "
          f"{'rescored med':>12} {'exact':>6}")
    for mode in MODES:
        base = m["unfiltered"][mode]
        print(f"{mode:<7} {'none':<10} {m['rows']:>9,} {'':>12} {base['p50_ms']:>8.2f} {1.0:>12.2f} "
              f"{base['rescored']:>12.0f} {'':>6}")
        for name, f in m["filters"].items():
            row = f["modes"][mode]
            print(f"{mode:<7} {name:<10} {f['matching']:>9,} {f['first_use_ms']:>12.0f} {row['p50_ms']:>8.2f} "
                  f"{row['p50_ms'] / base['p50_ms']:>12.2f} {row['rescored']:>12.0f} {row['exact']:>6}")
    print("filters: " + "; ".join(f"{name}: {f['where']}" for name, f in m["filters"].items()))


if __name__ == "__main__":
    main()
