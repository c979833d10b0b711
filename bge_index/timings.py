"""Stage timings for measuring a command from outside: `BGE_INDEX_TIMINGS=1` prints how long each stage took.

    with stage_timer("open index"):
        opened = OpenIndex.open(index_dir)

prints `bge-index: timing: open index 0.0123` to stderr when the stage ends
(benchmarks/cold_search_bench.py reads these lines). Off, a stage costs one
environment lookup. No torch here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    """With BGE_INDEX_TIMINGS=1, print `bge-index: timing: STAGE SECONDS` to stderr when the stage ends."""
    if os.environ.get("BGE_INDEX_TIMINGS") != "1":
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        print(f"bge-index: timing: {stage} {time.perf_counter() - started:.4f}", file=sys.stderr, flush=True)
