"""A cold `bge-index search` against its floor: a plain script that loads the same model and runs one forward pass.

Builds (or reuses) a BGE-M3-shaped checkpoint with ../shared/tools/make_m3_checkpoint.py (default full size:
24 layers, hidden 1024, ~2.3 GB; `--layers 6 --hidden 384` for a quick run) and the real XLM-R tokenizer,
indexes a small corpus (the first 200 Cranfield documents), then times, best of `--repeats` each, in ONE run:

- plain:     python -c "import torch, transformers; AutoTokenizer; AutoModel.from_pretrained(dtype); one forward"
- search:    `bge-index search INDEX "q"` end to end, as a new process
- breakdown: the search's stages from BGE_INDEX_TIMINGS=1 (tokenizer, weights, heads, query encoding), its
             imports (`import bge_index.cli, bge_index.search.local_index` alone), and the rest (manifest, search
             files, scoring, printing) as end-to-end minus those.

    python benchmarks/cold_search_bench.py /tmp/bge-m3-full                 # full size (build: minutes)
    python benchmarks/cold_search_bench.py /tmp/m3-6x384 --layers 6 --hidden 384
    python benchmarks/cold_search_bench.py /tmp/m3-6x384 --query-encoding   # the table below instead

`--query-encoding` measures, in one process, what one-query-one-answer costs: queries/s for 64 short
Cranfield-like queries (document titles) encoded in padded batches of 32 (the old way: a query's vectors
depended on its neighbours), each alone unpadded (the way chosen), and in exact-length groups, per dtype.

The load (`uptime`) is printed before and after: on a shared machine, compare the ratio search / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

PLAIN = """
import sys, torch, transformers
from transformers import AutoModel, AutoTokenizer
folder, dtype = sys.argv[1], {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[2]]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModel.from_pretrained(folder, dtype=dtype).eval()
with torch.inference_mode():
    model(**tokenizer([sys.argv[3]], return_tensors="pt"))
"""

IMPORTS = "import bge_index.cli, bge_index.cli.search, bge_index.search.local_index"


def load() -> str:
    """The 1-minute load average, for the record."""
    return os.getloadavg().__repr__() if hasattr(os, "getloadavg") else "?"


def best_of(repeats: int, command: list[str], env: dict | None = None) -> tuple[float, str]:
    """Best wall time of `command` over `repeats` runs, and the stderr of the best run."""
    best, best_err = float("inf"), ""
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr}")
        if elapsed < best:
            best, best_err = elapsed, done.stderr
    return best, best_err


def query_encoding_table(checkpoint: Path, corpus: Path, repeats: int) -> None:
    """Queries/s of each way to encode 64 queries, fp32 and bf16, best of `repeats`, in this process."""
    from collections import defaultdict

    from bge_index.model.encoder import EncodedBatch, load_encoder

    texts = []
    with open(corpus, encoding="utf-8") as source:
        for line in source:
            record = json.loads(line)
            title = (record.get("title") or record["text"][:80]).strip()
            if title:
                texts.append(title)
            if len(texts) == 64:
                break
    print(f"load: {load()}; 64 queries, {sum(len(t.split()) for t in texts) / 64:.1f} words on average")
    print("| dtype | padded batches of 32 | each alone, unpadded (chosen) | exact-length groups |")
    print("|---|---|---|---|")
    for dtype in ("fp32", "bf16"):
        encoder = load_encoder(str(checkpoint), "cpu", dtype)
        ids = [t.ids for t in encoder.tokenize(texts, 512)]

        def padded():
            return EncodedBatch.concatenate([encoder.encode_ids(ids[i:i + 32]) for i in range(0, len(ids), 32)])

        def alone():
            return encoder.encode_queries(texts)

        def groups():
            by_length = defaultdict(list)
            for row in ids:
                by_length[len(row)].append(row)
            return [encoder.encode_ids(rows) for rows in by_length.values()]

        rates = []
        for way in (padded, alone, groups):
            way()  # warm-up: oneDNN kernels for these shapes
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                way()
                best = min(best, time.perf_counter() - started)
            rates.append(len(texts) / best)
        print(f"| {dtype} | " + " | ".join(f"{rate:.1f} q/s" for rate in rates) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (built here if missing)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "xlmr-tokenizer")
    parser.add_argument("--corpus", type=Path, default=SHARED / "eval" / "cranfield-beir" / "corpus.jsonl")
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--index", type=Path, help="index folder (default: CHECKPOINT-index, built if missing)")
    parser.add_argument("--dtype", default="auto", help="index precision (the search uses the index's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--query", default="what similarity laws must be obeyed when constructing aeroelastic models")
    parser.add_argument("--query-encoding", action="store_true", help="print the query-encoding table only")
    args = parser.parse_args()
    if args.query_encoding:
        query_encoding_table(args.checkpoint, args.corpus, args.repeats)
        return

    if not (args.checkpoint / "config.json").exists():
        print(f"building {args.layers}x{args.hidden} checkpoint in {args.checkpoint} ...", flush=True)
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_m3_checkpoint.py"), str(args.checkpoint),
                        "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.hidden // 64),
                        "--intermediate", str(4 * args.hidden), "--tokenizer", str(args.tokenizer)], check=True)
    index = args.index or args.checkpoint.with_name(args.checkpoint.name + "-index")
    if not (index / "manifest.json").exists() and not index.exists():
        corpus = index.with_name(index.name + "-corpus.jsonl")
        with open(args.corpus, encoding="utf-8") as source:
            corpus.write_text("".join(line for _, line in zip(range(args.docs), source)), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "bge_index", "index", str(corpus), "--out", str(index), "--model",
                        str(args.checkpoint), "--dtype", args.dtype, "-q"], check=True, cwd=REPO)
    info = json.loads(subprocess.run([sys.executable, "-m", "bge_index", "info", str(index), "--format", "json"],
                                     capture_output=True, text=True, check=True, cwd=REPO).stdout)
    dtype = info["model"].get("dtype") or "fp32"

    print(f"checkpoint {args.checkpoint} ({args.layers}x{args.hidden} asked), index {index}, dtype {dtype}")
    print(f"load before: {load()}")
    env = dict(os.environ, BGE_INDEX_TIMINGS="1", HF_HUB_OFFLINE="1")
    env.pop("BGE_INDEX_DTYPE", None)
    plain, _ = best_of(args.repeats, [sys.executable, "-c", PLAIN, str(args.checkpoint), dtype, args.query])
    search, stages_err = best_of(args.repeats, [sys.executable, "-m", "bge_index", "search", str(index), args.query,
                                                "-k", "10", "--format", "tsv"], env=env)
    imports, _ = best_of(args.repeats, [sys.executable, "-c", IMPORTS])
    startup, _ = best_of(args.repeats, [sys.executable, "-c", "pass"])
    print(f"load after:  {load()}")

    stages = {}
    for name, seconds in re.findall(r"bge-index: timing: (.+?) ([0-9.]+)$", stages_err, flags=re.M):
        stages[name] = stages.get(name, 0.0) + float(seconds)
    print()
    print("| measure (best of %d) | seconds |" % args.repeats)
    print("|---|---|")
    print(f"| plain script: imports, tokenizer, from_pretrained, one forward | {plain:.2f} |")
    print(f"| `bge-index search INDEX \"q\"` end to end | {search:.2f} |")
    print(f"| ratio search / plain | {search / plain:.2f} |")
    print(f"| - python start-up | {startup:.2f} |")
    print(f"| - bge_index imports (CLI, local index) alone | {imports - startup:.2f} |")
    for name, seconds in stages.items():
        print(f"| - {name} (BGE_INDEX_TIMINGS) | {seconds:.2f} |")
    rest = search - imports - sum(stages.values())
    print(f"| - rest: manifest, search files, scoring, printing | {rest:.2f} |")


if __name__ == "__main__":
    main()
