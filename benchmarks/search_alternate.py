"""Two versions of the search code timed alternately on one index, in fresh processes: before and after a change
measured in one sitting, on a machine whose speed wanders.

    python benchmarks/search_alternate.py BEFORE_TREE AFTER_TREE --index INDEX [--vectors QUERIES.pickle] [--runs 2]

Each tree is a checkout of this repository (`git worktree add /tmp/before COMMIT`); each run starts one process per
tree, in turn, which opens INDEX with that tree's code and times, per mode (dense, sparse, hybrid; k = 10): the p50
of 48 lone queries, and three batches of 16, on the codes as mapped and then on packed codes (dense, hybrid: lone
queries read them too, and the packed batches are taken against those). The
queries are the benchmark's synthetic ones (search_bench.py), or pickled QueryVectors (search_bench.py writes
them to its --workdir as encoded-queries.pickle for --index with --queries). Prints a table: a row per tree and
mode, a column per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("dense", "sparse", "hybrid")
COUNT = 48


def measure(tree: Path, index: Path, vectors: Path | None) -> dict:
    """Runs in the child process, with `tree` first on sys.path."""
    import pickle

    import numpy as np

    import bge_index
    from bge_index.search.scoring import Searcher
    from bge_index.store.manifest import read_manifest
    from bge_index.store.vector_store import OpenIndex
    from search_bench import synthetic_queries

    if not Path(bge_index.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: imported {bge_index.__file__} instead")
    manifest = read_manifest(index)
    queries = (pickle.loads(vectors.read_bytes()) if vectors else synthetic_queries(COUNT, manifest.dense_dim))[:COUNT]
    searcher = Searcher(OpenIndex.open(index, manifest).vectors, manifest.vocab_size)
    searcher.prune = True
    batches = [queries[i:i + 16] for i in range(0, len(queries) - 15, 16)]

    def batch_ratio(mode: str, lone_mean: float) -> float:
        searcher.search_many(batches[0], 10, mode)  # warm
        started = time.perf_counter()
        for batch in batches:
            searcher.search_many(batch, 10, mode)
        return lone_mean / ((time.perf_counter() - started) / sum(len(b) for b in batches))

    def lone(mode: str) -> tuple[float, float]:
        """(p50, mean) seconds of the queries searched one at a time."""
        searcher.search(queries[0], 10, mode)
        seconds = []
        for query in queries:
            started = time.perf_counter()
            searcher.search(query, 10, mode)
            seconds.append(time.perf_counter() - started)
        return float(np.median(seconds)), float(np.mean(seconds))

    result = {}
    for mode in MODES:
        p50, mean = lone(mode)
        result[mode] = {"p50_ms": p50 * 1e3, "batch": batch_ratio(mode, mean)}
    searcher.pack_codes()  # then lone queries read the packed codes too: the packed batches are taken against them
    for mode in ("dense", "hybrid"):
        p50, mean = lone(mode)
        result[mode].update(packed_p50_ms=p50 * 1e3, packed=batch_ratio(mode, mean))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", type=Path, nargs=2, help="the code before and after (checkouts of this repository)")
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--vectors", type=Path, help="pickled query vectors (else synthetic)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: measure with this tree
    args = parser.parse_args()
    if args.child:  # that tree's package and benchmarks first on the path
        sys.path[:0] = [str(args.child.resolve()), str(args.child.resolve() / "benchmarks")]
        print(json.dumps(measure(args.child, args.index, args.vectors)))
        return
    measured: dict[Path, list[dict]] = {tree: [] for tree in args.trees}
    for _ in range(args.runs):
        for tree in args.trees:  # alternately
            command = [sys.executable, __file__, *map(str, args.trees), "--index", str(args.index),
                       "--child", str(tree)]
            if args.vectors:
                command += ["--vectors", str(args.vectors)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            measured[tree].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.index}: {COUNT} queries, k = 10; runs alternate between the trees")
    print(f"{'tree':<28} {'mode':<7} {'p50 ms':>16} {'batch / one':>16} {'packed p50 ms':>16} "
          f"{'packed batch / one':>18}")
    for tree, runs in measured.items():
        for mode in MODES:
            p50 = " / ".join(f"{r[mode]['p50_ms']:.1f}" for r in runs)
            batch = " / ".join(f"{r[mode]['batch']:.1f}x" for r in runs)
            has_packed = "packed" in runs[0][mode]
            packed_p50 = " / ".join(f"{r[mode]['packed_p50_ms']:.1f}" for r in runs) if has_packed else ""
            packed = " / ".join(f"{r[mode]['packed']:.1f}x" for r in runs) if has_packed else ""
            print(f"{str(tree)[-28:]:<28} {mode:<7} {p50:>16} {batch:>16} {packed_p50:>16} {packed:>18}")


if __name__ == "__main__":
    main()
