"""First run vs no-change re-run vs small-change re-run of `bge-index index`, as real processes.

    python benchmarks/incremental_bench.py --model MODEL_DIR --corpus CORPUS.jsonl [CORPUS.jsonl ...]
                                           [--documents 10000] [--changed 100]

Builds a JSONL of `--documents` documents by cycling through the corpus texts
(ids made unique), then times, each as a fresh `python -m bge_index index`
process: the first run (everything encoded), a re-run with nothing changed
(hashing only: the model is not even loaded), and a re-run after `--changed`
documents were edited and as many removed. Prints a table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def read_texts(paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                texts.append(" ".join(filter(None, [record.get("title"), record.get("text")])))
    return texts


def write_corpus(path: Path, texts: list[str], documents: int, edited: set[int], dropped: set[int]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(documents):
            if i in dropped:
                continue
            text = texts[i % len(texts)] + ("" if i < len(texts) else f" ({i // len(texts)})")
            if i in edited:
                text += " Edited."
            out.write(json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False) + "\n")


def timed_run(args: list[str]) -> tuple[float, dict]:
    report = Path(tempfile.mktemp(suffix=".json"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bge_index", "index", *args, "--report", str(report), "--quiet"], check=True)
    elapsed = time.perf_counter() - started
    return elapsed, json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", nargs="+", required=True)
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    texts = read_texts(args.corpus)
    with tempfile.TemporaryDirectory() as scratch:
        corpus, out = Path(scratch) / "corpus.jsonl", Path(scratch) / "index"
        common = [str(corpus), "--out", str(out), "--model", args.model, "--max-length", str(args.max_length)]
        write_corpus(corpus, texts, args.documents, set(), set())
        first, first_report = timed_run(common)
        again, again_report = timed_run(common)
        edited = set(range(0, args.documents, args.documents // args.changed))
        dropped = {i + 1 for i in edited}
        write_corpus(corpus, texts, args.documents, edited, dropped)
        changed, changed_report = timed_run(common)
    print(f"{args.documents:,} documents, model {args.model}, max length {args.max_length}")
    print(f"{'run':<28} {'seconds':>8} {'vs first':>9} {'added':>7} {'updated':>8} {'unchanged':>10} {'removed':>8} "
          f"{'model load s':>12}")
    for label, seconds, report in (("first run", first, first_report), ("no-change re-run", again, again_report),
                                   (f"{args.changed} edited + {args.changed} removed", changed, changed_report)):
        docs = report["documents"]
        print(f"{label:<28} {seconds:>8.2f} {seconds / first:>9.3f} {docs['added']:>7} {docs['updated']:>8} "
              f"{docs['unchanged']:>10} {docs['removed']:>8} {report['timings']['model_load_seconds']:>12.2f}")


if __name__ == "__main__":
    main()
