"""Peak memory against corpus size: `bge-index index` on 10,000 and 100,000 documents, side by side.

    python benchmarks/memory_bench.py --model DIR [--sizes 10000 100000] [--source FILE.jsonl ...]
                                      [--dtype auto] [--shard-rows 100000]

Each corpus is one JSONL file of synthetic documents of 1 to 6 sentences (8 to about 250 tokens), drawn
deterministically from the sentences of --source (default: sample_data's corpus). Each run is its own
process; the table gives its peak RSS (ru_maxrss of that process alone) and the ratio to the smallest
run. Streaming means the ratio stays near 1: windows of documents, bounded queues, shards written a
row group at a time, the model freed before the search files are built.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bge_index.input.documents import FieldNames, Skipped, iter_documents  # noqa: E402


def sentences_from(paths: list[str]) -> list[str]:
    sentences = []
    for document in iter_documents(paths, FieldNames()):
        if not isinstance(document, Skipped):
            sentences += [s.strip() for s in re.split(r"(?<=[.!?。])\s+", document.text) if len(s.strip()) > 20]
    return sentences


def write_corpus(path: Path, documents: int, sentences: list[str]) -> None:
    chooser = random.Random(documents)
    with path.open("w", encoding="utf-8") as stream:
        for number in range(documents):
            text = " ".join(chooser.choice(sentences) for _ in range(chooser.randint(1, 6)))
            stream.write(json.dumps({"id": f"doc-{number}", "text": text}, ensure_ascii=False) + "\n")


def peak_rss_of(command: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one child; a wrapper process isolates the child's own maximum."""
    wrapper = ("import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024);sys.exit(r.returncode)")
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGE_INDEX_")}
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--source", nargs="+", default=[str(REPO / "sample_data" / "corpus")])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--shard-rows", type=int, default=100_000)
    args = parser.parse_args()

    sentences = sentences_from(args.source)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            corpus = Path(scratch) / f"corpus-{size}.jsonl"
            write_corpus(corpus, size, sentences)
            out, report = Path(scratch) / f"index-{size}", Path(scratch) / f"report-{size}.json"
            seconds, peak = peak_rss_of([sys.executable, "-m", "bge_index", "index", str(corpus), "--out", str(out),
                                         "--model", args.model, "--dtype", args.dtype, "--quiet",
                                         "--shard-rows", str(args.shard_rows), "--report", str(report)])
            summary = json.loads(report.read_text())
            rows.append((size, summary["encoded"]["tokens"], seconds, peak, summary["index"]["shards"]))
    smallest = rows[0][3]
    print(f"model {args.model}, {len(sentences)} source sentences, shard rows {args.shard_rows}")
    print(f"{'documents':>10} {'tokens':>10} {'seconds':>8} {'docs/s':>8} {'shards':>6} {'peak RSS':>10} {'vs first':>9}")
    for size, tokens, seconds, peak, shards in rows:
        print(f"{size:>10} {tokens:>10} {seconds:>8.1f} {size / seconds:>8.0f} {shards:>6} "
              f"{peak / 2**20:>8.0f}MB {peak / smallest:>8.3f}x")


if __name__ == "__main__":
    main()
