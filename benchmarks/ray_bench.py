"""Local engine vs `--engine ray` on the same corpus, in one run, and print a table: seconds, documents/s, ratio.

    python benchmarks/ray_bench.py --model MODEL_DIR --corpus CORPUS... [--documents 1400] [--workers 1 2]
                                   [--max-length 512] [--dtype fp32]

Each row builds a fresh index from the same inputs, end to end (model load,
and for Ray: starting a local Ray instance on loopback and its actors,
included). The Ray rows use a local instance with this machine's CPUs and
the engine's default reservations: the actors share all CPUs but one, the
rest is kept for the read and write tasks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bge_index.run.local import build_index
from bge_index.run.index_run import IndexOptions
from bge_index.run.ray import RayOptions, build_index_on_ray


def write_corpus(inputs: list[str], documents: int, path: Path) -> int:
    """The first `documents` records with text of the given JSONL files, as one JSONL file."""
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for name in inputs:
            for line in open(name, encoding="utf-8"):
                record = json.loads(line)
                if written < documents and (record.get("text") or "").strip():
                    out.write(json.dumps({"id": record.get("_id", record.get("id")), "text": record["text"]}) + "\n")
                    written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", nargs="+", required=True, help="JSONL files (BEIR corpus.jsonl works)")
    parser.add_argument("--documents", type=int, default=1400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    options = IndexOptions(model=args.model, device="cpu", dtype=args.dtype, max_length=args.max_length)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.jsonl"
        count = write_corpus(args.corpus, args.documents, corpus)
        started = time.perf_counter()
        summary = build_index([str(corpus)], Path(scratch) / "local", options)
        rows.append(("local", "-", time.perf_counter() - started, summary))
        for workers in args.workers:
            started = time.perf_counter()
            summary = build_index_on_ray([str(corpus)], Path(scratch) / f"ray{workers}", options,
                                         RayOptions(workers=workers))
            rows.append(("ray (local instance)", str(workers), time.perf_counter() - started, summary))
    baseline = rows[0][2]
    print(f"{count} documents, model {args.model}, {args.dtype}, max length {args.max_length}")
    print("| engine | workers | seconds | docs/s | tokens/s | vs local |")
    print("|---|---|---|---|---|---|")
    for engine, workers, seconds, summary in rows:
        print(f"| {engine} | {workers} | {seconds:.1f} | {summary.encoded / seconds:.1f} | "
              f"{summary.tokens / seconds:,.0f} | {baseline / seconds:.2f} |")


if __name__ == "__main__":
    main()
