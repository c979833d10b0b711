"""Soak: index runs that edit, add and delete documents, some SIGKILLed at random moments, while searches run.

For BGE_INDEX_SOAK_SECONDS (default 60) seconds one thread runs `python -m bge_index index` again and again
over a changing corpus, killing about a third of the runs at a random moment, and after each run records the
committed generation's live rows (read with pyarrow, independently of the reader under test). Meanwhile a
thread searches in process (LocalIndex, reopened before each query, as a server would) and another runs
`bge-index search --format json` processes. At the end: no search failed, every in-process result equals brute
force over the generation it reports, every command-line result over some recorded generation, and `verify`
passes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import module_command, run_process, write_jsonl

from bge_index.search.local_index import LocalIndex
from bge_index.store.manifest import read_manifest
from bge_index.search.query import Mode, Query, SearchRequest
from bge_index.store.shard_reader import verify_index

SECONDS = float(os.environ.get("BGE_INDEX_SOAK_SECONDS", "60"))
MAX_RUNS = 60  # bounds the count whatever the duration
MIN_RUNS = 5  # on a loaded machine a run takes 20 s: the soak still sees a few commits and kills
QUERIES = ["moon tides", "stars number 7", "document about the sea"]
K = 5
TOL = 2e-4


def write_corpus(path, docs: dict[int, int]) -> None:
    write_jsonl(path, [{"id": f"d{i}", "text": f"document {i} about the moon, version {v}: "
                        f"{'tides and the sea' if (i + v) % 3 else 'stars'} number {i * 7 + v}"}
                       for i, v in sorted(docs.items())])


def committed_rows(out) -> tuple[int, dict[str, tuple[np.ndarray, dict[int, float]]]]:
    """(generation, {id: (dense float32 [D], sparse {token: weight})}) of the committed index, via pyarrow."""
    manifest = read_manifest(out)
    rows = {}
    for shard in manifest.shards:
        table = pq.read_table(out / shard.file, columns=["id", "dense", "sparse"])
        deleted = set(np.load(out / shard.deleted_file).tolist()) if shard.deleted_file else set()
        for row, (row_id, dense, sparse) in enumerate(zip(table.column("id").to_pylist(),
                                                          table.column("dense").to_pylist(),
                                                          table.column("sparse").to_pylist())):
            if row not in deleted:
                rows[row_id] = (np.asarray(dense, dtype=np.float16).astype(np.float32),
                                dict(zip(sparse["indices"], sparse["values"])))
    return manifest.generation, rows


def brute_force(rows, query, mode: str) -> dict[str, float]:
    """{id: score} of every live row, as search.py defines the scores (hybrid: 1 * dense + 0.3 * sparse)."""
    sparse_q = dict(zip(query.sparse_ids.tolist(), query.sparse_weights.tolist()))
    scores = {}
    for row_id, (dense, sparse) in rows.items():
        d = float(dense @ query.dense.astype(np.float32))
        s = float(sum(w * sparse.get(t, 0.0) for t, w in sparse_q.items()))
        scores[row_id] = {"dense": d, "sparse": s, "hybrid": d + 0.3 * s}[mode]
    return scores


def matches(hits: list[tuple[str, float]], scores: dict[str, float]) -> bool:
    """The hits are a top-k of `scores`: live ids, their own scores, and nothing better left out."""
    if len(hits) != min(K, len(scores)) or any(i not in scores or abs(scores[i] - s) > TOL for i, s in hits):
        return False
    kth = min(s for _, s in hits) if hits else float("inf")
    return all(score <= kth + TOL for row_id, score in scores.items() if row_id not in {i for i, _ in hits})


@pytest.mark.slow
def test_soak_searches_never_fail_while_runs_commit_and_crash(tiny_model, encoder, tmp_path):
    docs_path, out = tmp_path / "docs.jsonl", tmp_path / "ix"
    rng = random.Random(5)
    docs = {i: 0 for i in range(40)}
    write_corpus(docs_path, docs)
    command = module_command("index", docs_path, "--out", out, "--model", tiny_model, "--shard-rows", "8")
    started = time.monotonic()
    first = run_process(command)
    run_seconds = [time.monotonic() - started]
    assert first.returncode == 0, first.stderr
    generations = dict([committed_rows(out)])
    counts = {"runs": 0, "kills": 0, "searches": 0, "cli_searches": 0, "failures": 0}
    failures: list[str] = []
    in_process: list[tuple[int, str, str, list[tuple[str, float]]]] = []
    from_cli: list[tuple[str, str, list[tuple[str, float]]]] = []
    stop = threading.Event()

    def writer():
        deadline = time.monotonic() + SECONDS
        while (time.monotonic() < deadline or counts["runs"] < MIN_RUNS) and counts["runs"] < MAX_RUNS:
            for _ in range(rng.randint(1, 6)):  # edit, add, delete
                action, doc = rng.random(), rng.randrange(60)
                if action < 0.5:
                    docs[doc] = docs.get(doc, 0) + 1
                elif action < 0.8:
                    docs.pop(doc, None)
                else:
                    docs.setdefault(doc, 0)
            write_corpus(docs_path, docs)
            started = time.monotonic()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if counts["runs"] % 3 == 1:  # every third run is killed at a random moment of a run's length
                try:
                    process.wait(timeout=rng.uniform(0.05, 0.95) * run_seconds[-1])
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
                    counts["kills"] += 1
            _, stderr = process.communicate()
            if process.returncode == 0:
                run_seconds.append(time.monotonic() - started)
            if process.returncode not in (0, -signal.SIGKILL):
                failures.append(f"index run exited {process.returncode}: {stderr[-500:]}")
            counts["runs"] += 1
            generation, rows = committed_rows(out)  # whatever is committed now (killed runs may have committed)
            generations.setdefault(generation, rows)
        stop.set()

    def searcher():
        index = LocalIndex(out, encoder=encoder)
        while not stop.is_set():
            try:
                index = index.reopen()
                mode = rng.choice(["dense", "sparse", "hybrid"])
                text = rng.choice(QUERIES)
                [result] = index.search([Query("q", text)], SearchRequest(k=K, mode=Mode(mode)))
                in_process.append((index.manifest.generation, text, mode, [(h.id, h.hit.score) for h in result.hits]))
                counts["searches"] += 1
                time.sleep(0.1)  # leave the (shared) cores to the runs: the point is overlap, not load
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"in-process search: {type(error).__name__}: {error}")

    def cli_searcher():
        while not stop.is_set():
            time.sleep(0.5)
            text = rng.choice(QUERIES)
            result = run_process(module_command("search", out, text, "--format", "json", "-k", K, "--mode", "hybrid",
                                                "--model", tiny_model))
            counts["cli_searches"] += 1
            if result.returncode != 0:
                failures.append(f"search process exited {result.returncode}: {result.stderr[-500:]}")
                continue
            hits = json.loads(result.stdout)[0]["hits"]
            from_cli.append((text, "hybrid", [(h["id"], h["score"]) for h in hits]))

    threads = [threading.Thread(target=f) for f in (writer, searcher, cli_searcher)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    query_vectors = dict(zip(QUERIES, LocalIndex(out, encoder=encoder).encode_queries(QUERIES)))
    for generation, text, mode, hits in in_process:
        if generation not in generations:
            failures.append(f"a search reported generation {generation}, never committed")
        elif not matches(hits, brute_force(generations[generation], query_vectors[text], mode)):
            failures.append(f"generation {generation}, {mode} {text!r}: {hits} is not its top-{K}")
    for text, mode, hits in from_cli:
        # The command line prints scores to 6 places; its generation is one of the recorded ones.
        if not any(matches(hits, brute_force(rows, query_vectors[text], mode)) for rows in generations.values()):
            failures.append(f"search process, {mode} {text!r}: {hits} is no recorded generation's top-{K}")
    counts["failures"] = len(failures)
    print(f"soak: {counts['runs']} runs, {counts['kills']} kills, {counts['searches']} in-process searches, "
          f"{counts['cli_searches']} search processes, {len(generations)} generations, {len(failures)} failures")
    assert failures == [], "\n".join(failures[:10])
    assert verify_index(out) == []
    assert counts["runs"] >= MIN_RUNS and counts["searches"] >= 3
