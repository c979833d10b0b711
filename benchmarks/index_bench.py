"""Index a corpus end to end (files in, Parquet out) and print a table: documents/s, tokens/s, index size.

    python benchmarks/index_bench.py --model MODEL_DIR [--corpus sample_data/corpus] [--repeat 3]
                                     [--device auto] [--dtype auto] [--batch-tokens 16384]

MODEL_DIR is any BGE-M3-layout folder, e.g. a random-weight one with BGE-M3's
exact shapes from ../shared/tools/make_m3_checkpoint.py. The first run warms
up (model load, allocator); the table reports every run and the median.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bge_index.model.encoder import load_encoder
from bge_index.run.local import build_index
from bge_index.run.index_run import IndexOptions

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", nargs="+", default=[str(REPO / "sample_data" / "corpus")])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--max-length", type=int, default=8192)
    args = parser.parse_args()

    load_started = time.perf_counter()
    encoder = load_encoder(args.model, args.device, args.dtype)
    load_seconds = time.perf_counter() - load_started
    options = IndexOptions(model=args.model, device=args.device, dtype=args.dtype,
                           batch_tokens=args.batch_tokens, max_length=args.max_length)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.repeat + 1):
            summary = build_index(args.corpus, Path(scratch) / f"run{run}", options, encoder=encoder)
            rows.append(summary)
    print(f"model {encoder.identity.describe()}, device {encoder.device}, dtype {encoder.dtype}, "
          f"load {load_seconds:.1f} s")
    print(f"{'run':>6} {'docs':>7} {'tokens':>8} {'seconds':>8} {'docs/s':>8} {'tokens/s':>9} {'index bytes':>12} {'bytes/doc':>9}")
    for run, s in enumerate(rows):
        label = "warmup" if run == 0 else str(run)
        print(f"{label:>6} {s.documents:>7} {s.tokens:>8} {s.elapsed:>8.2f} {s.documents_per_second:>8.1f} "
              f"{s.tokens_per_second:>9.0f} {s.bytes:>12} {s.bytes / max(s.documents, 1):>9.0f}")
    timed = rows[1:]
    median = statistics.median(s.elapsed for s in timed)
    print(f"median of {len(timed)}: {median:.2f} s, {timed[0].documents / median:.1f} docs/s, "
          f"{timed[0].tokens / median:.0f} tokens/s")


if __name__ == "__main__":
    main()
