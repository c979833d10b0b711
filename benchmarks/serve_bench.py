"""`bge-index serve` against in-process search: one client's latency, 16 clients' throughput, the CLI's answers.

    python benchmarks/serve_bench.py /tmp/bge-m3-full --rows 1000000      # full-size model, 1M-row index
    python benchmarks/serve_bench.py /tmp/m3-6x384 --rows 100000 --queries 32

The index is synthetic in the real on-disk format (benchmarks/search_bench.py's
generator: unit float16 dense vectors of the model's width, ~150 Zipf-drawn
sparse tokens per row), recorded as made by CHECKPOINT (a checkpoint from
../shared/tools/make_m3_checkpoint.py, with the real tokenizer), so the
model that encodes the queries is the real thing and the scan is the size
asked. Queries are Cranfield's (`--queries-file`). In one run, one after the
other (nothing else running), it measures:

1-2. each query in process (`LocalIndex.search([query])`: encode + score + ids/texts) and then from one HTTP
   client (keep-alive, `GET /search`), in turns, `--rounds` times: p50 of each and the median of the
   per-query differences (turns cancel the drift of a shared machine's speed); then one client's queries/s;
3. 16 HTTP clients at once, each asking every query: queries/s;
4. that every HTTP answer equals `bge-index search --queries FILE --format json` run as a process (its hits,
   per query; GET answers say query_id "1").

The load average is printed before and after: compare ratios, on a quiet machine.

With `--overload` it measures instead what issue 19 asks of a server in front of an application:

    python benchmarks/serve_bench.py /tmp/tiny-m3 --rows 20000 --overload --clients 48 --per-client 64

one batch's time (a POST of `--per-client` queries, alone), then `--clients` clients each posting
`--per-client` queries in a loop for `--seconds` while one client sends GETs one after the other: the GETs'
p50/p99 against one batch's time (goal: p99 at most 2x), the POSTs answered and refused (503), and the
server's RSS under load against its RSS idle (goal: at most 1.5x). `--server-root DIR` runs the server from
another checkout (e.g. `git archive HEAD`), for a before/after on the same machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))



def load() -> str:
    return repr(os.getloadavg())


def build_index(index_dir: Path, checkpoint: Path, rows: int) -> None:
    """A synthetic index of `rows` rows recorded as made by `checkpoint` (its identity from a one-row real run)."""
    import search_bench

    from bge_index.store.manifest import read_manifest

    seed_index = index_dir.with_name(index_dir.name + "-seed")
    if not (seed_index / "manifest.json").exists():
        corpus = index_dir.with_name(index_dir.name + "-seed.jsonl")
        corpus.write_text(json.dumps({"id": "seed", "text": "seed"}) + "\n", encoding="utf-8")
        subprocess.run([sys.executable, "-m", "bge_index", "index", str(corpus), "--out", str(seed_index),
                        "--model", str(checkpoint), "--dtype", "fp32", "-q"], check=True, cwd=REPO)
    seed = read_manifest(seed_index)
    search_bench.build(index_dir, rows, model=seed.model, dim=seed.dense_dim, vocab_size=seed.vocab_size,
                       shard_rows=250_000)


class Client:
    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def get(self, path: str) -> bytes:
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {body[:200]!r}")
        timing = re.search(r"search;dur=([0-9.]+)", response.getheader("Server-Timing") or "")
        self.server_seconds = float(timing.group(1)) / 1000 if timing else float("nan")
        return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--index", type=Path, help="default: CHECKPOINT-serve-ROWS (built if missing)")
    parser.add_argument("--queries-file", type=Path, default=SHARED / "eval" / "cranfield-beir" / "queries.jsonl")
    parser.add_argument("--queries", type=int, default=16, help="distinct queries (each client asks them all)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--mode", default="hybrid")
    parser.add_argument("--dtype", default="fp32", help="query precision (server, in-process and CLI alike)")
    parser.add_argument("--rounds", type=int, default=2, help="times each query is asked, in process and over HTTP")
    parser.add_argument("--build-only", action="store_true", help="build the index and stop")
    parser.add_argument("--overload", action="store_true", help="measure GET latency and RSS under overload")
    parser.add_argument("--per-client", type=int, default=64, help="--overload: queries in each client's POST")
    parser.add_argument("--seconds", type=float, default=30.0, help="--overload: how long the clients post")
    parser.add_argument("--server-root", type=Path, default=REPO, help="the checkout the server runs from")
    args = parser.parse_args()

    index_dir = args.index or args.checkpoint.with_name(f"{args.checkpoint.name}-serve-{args.rows}")
    if not (index_dir / "manifest.json").exists():
        print(f"building a {args.rows:,}-row index in {index_dir} ...", flush=True)
        started = time.perf_counter()
        build_index(index_dir, args.checkpoint, args.rows)
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    if args.build_only:
        return
    texts = []
    with open(args.queries_file, encoding="utf-8") as source:
        for line in source:
            texts.append(" ".join(json.loads(line)["text"].split()))
            if len(texts) == args.queries:
                break
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.overload:
        overload(args, index_dir)
        return
    print(f"index {index_dir} ({args.rows:,} rows), model {args.checkpoint}, {len(texts)} queries, "
          f"mode {args.mode}, dtype {args.dtype}")
    print(f"load before: {load()}", flush=True)

    # 1-2. in process and over HTTP, query by query in turns (so drift in the machine's speed hits both alike)
    from bge_index.search.local_index import LocalIndex
    from bge_index.search.query import Query, SearchRequest

    local = LocalIndex(index_dir, dtype=args.dtype)
    request = SearchRequest(k=10, mode=args.mode)
    local.search([Query("1", texts[0])], request)  # warm-up, as serve does at start
    server = subprocess.Popen([sys.executable, "-m", "bge_index", "serve", str(index_dir), "--port", "0",
                               "--dtype", args.dtype, "--no-access-log"], stderr=subprocess.PIPE, text=True,
                              cwd=REPO)
    port = None
    for line in server.stderr:
        found = re.search(r"at http://127\.0\.0\.1:(\d+)", line)
        if found:
            port = int(found.group(1))
            break
    if port is None:
        sys.exit("the server did not start")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # keep the pipe drained
    try:
        paths = [f"/search?k=10&mode={args.mode}&q={quote(text)}" for text in texts]
        one = Client(port)
        one.get(paths[0])
        in_process, latencies, differences, answers, overheads, in_server = [], [], [], {}, [], []
        for _ in range(args.rounds):
            for text, path in zip(texts, paths):
                started = time.perf_counter()
                local.search([Query("1", text)], request)
                local_seconds = time.perf_counter() - started
                started = time.perf_counter()
                answers[path] = one.get(path)
                http_seconds = time.perf_counter() - started
                overheads.append(http_seconds - one.server_seconds)
                in_server.append(one.server_seconds)
                in_process.append(local_seconds)
                latencies.append(http_seconds)
                differences.append(http_seconds - local_seconds)
        local.close()
        del local
        started_all = time.perf_counter()
        for path in paths:
            one.get(path)
        one_rate = len(paths) / (time.perf_counter() - started_all)

        # 3. many clients at once
        def client_run(offset: int) -> list[tuple[str, bytes]]:
            client = Client(port)
            order = paths[offset:] + paths[:offset]  # clients start at different queries
            return [(path, client.get(path)) for path in order]

        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(client_run, [n % len(paths) for n in range(args.clients)]))
        many_seconds = time.perf_counter() - started
        many_rate = sum(len(r) for r in results) / many_seconds
        concurrent_same = all(body == answers[path] for result in results for path, body in result)
    finally:
        server.terminate()
        server.wait(60)
    print(f"load after:  {load()}")

    # 4. the CLI's answers
    queries = index_dir.with_name(index_dir.name + "-queries.jsonl")
    queries.write_text("".join(json.dumps({"_id": str(n), "text": t}) + "\n" for n, t in enumerate(texts)),
                       encoding="utf-8")
    printed = subprocess.run([sys.executable, "-m", "bge_index", "search", str(index_dir), "--queries", str(queries),
                              "-k", "10", "--mode", args.mode, "--dtype", args.dtype, "--format", "json"],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
    cli = {r["query"]: r["hits"] for r in json.loads(printed)}
    same_as_cli = all(json.loads(answers[path])[0]["hits"] == cli[text] for path, text in zip(paths, texts))

    p50_local, p50_http = statistics.median(in_process), statistics.median(latencies)
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| in-process `LocalIndex.search`, one query: p50 / mean | {p50_local * 1e3:.1f} / "
          f"{statistics.mean(in_process) * 1e3:.1f} ms |")
    print(f"| HTTP, one client: p50 / mean | {p50_http * 1e3:.1f} / {statistics.mean(latencies) * 1e3:.1f} ms |")
    print(f"| the server's own encode + search (Server-Timing): p50 | {statistics.median(in_server) * 1e3:.1f} ms |")
    print(f"| HTTP latency minus the server's encode + search, per request: median (goal: at most 2 ms) | "
          f"{statistics.median(overheads) * 1e3:+.2f} ms |")
    print(f"| HTTP minus in-process (two processes), the same query in turn: median | "
          f"{statistics.median(differences) * 1e3:+.1f} ms |")
    print(f"| HTTP, one client | {one_rate:.2f} q/s |")
    print(f"| HTTP, {args.clients} clients at once | {many_rate:.2f} q/s |")
    print(f"| ratio {args.clients} clients / one (goal: at least 3) | {many_rate / one_rate:.2f} |")
    print(f"| answers under concurrency = answers alone | {'yes' if concurrent_same else 'NO'} |")
    print(f"| HTTP answers = `search --queries --format json` | {'yes' if same_as_cli else 'NO'} |")


def start_server(args, index_dir: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """`bge-index serve` as a process from args.server_root; (process, port) once it listens."""
    env = dict(os.environ, PYTHONPATH=str(args.server_root))
    server = subprocess.Popen([sys.executable, "-m", "bge_index", "serve", str(index_dir), "--port", "0",
                               "--dtype", args.dtype, "--no-access-log", *extra], stderr=subprocess.PIPE, text=True,
                              cwd=args.server_root, env=env)
    for line in server.stderr:
        found = re.search(r"at http://127\.0\.0\.1:(\d+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            return server, int(found.group(1))
    sys.exit("the server did not start")


def rss_mib(pid: int) -> float:
    """A process' resident set size in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def overload(args, index_dir: Path) -> None:
    """GET latency and RSS while `args.clients` clients post `args.per_client` queries each, in a loop."""
    texts = [" ".join(json.loads(line)["text"].split()) for line in open(args.queries_file, encoding="utf-8")]
    server, port = start_server(args, index_dir)
    print(f"index {index_dir} ({args.rows:,} rows), model {args.checkpoint}, server from {args.server_root}; "
          f"{args.clients} clients x {args.per_client} queries for {args.seconds:.0f} s; load {load()}", flush=True)

    def post(client: http.client.HTTPConnection, offset: int) -> int:
        body = json.dumps({"queries": [{"id": str(n), "text": texts[(offset + n) % len(texts)]}
                                       for n in range(args.per_client)], "k": 10, "mode": args.mode})
        client.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
        response = client.getresponse()
        response.read()
        return response.status

    try:
        probe = Client(port)
        for text in texts[:8]:
            probe.get(f"/search?k=10&mode={args.mode}&q={quote(text)}")
        time.sleep(1.0)
        idle = rss_mib(server.pid)
        alone = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        batch = []
        for round_number in range(3):
            started = time.perf_counter()
            assert post(alone, round_number * args.per_client) == 200
            batch.append(time.perf_counter() - started)
        one_batch = statistics.median(batch)

        stop = threading.Event()
        statuses: dict[int, int] = {}
        errors: list[str] = []
        peak = [idle]

        def client_loop(number: int) -> None:
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            offset = number * args.per_client
            while not stop.is_set():
                try:
                    status = post(client, offset)
                except (OSError, http.client.HTTPException) as error:
                    errors.append(repr(error))
                    client.close()
                    client = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                offset += args.per_client
                if status == 503:
                    time.sleep(0.05)
            client.close()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(server.pid))
                time.sleep(0.2)

        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(args.clients)]
        threads.append(threading.Thread(target=sample))
        for thread in threads:
            thread.start()
        time.sleep(min(2.0, args.seconds / 4))  # the queue fills first
        gets, gets_failed = [], 0
        ends = time.monotonic() + args.seconds
        number = 0
        while time.monotonic() < ends:
            path = f"/search?k=10&mode={args.mode}&q={quote(texts[number % len(texts)])}"
            number += 1
            started = time.perf_counter()
            try:
                probe.get(path)
                gets.append(time.perf_counter() - started)
            except (RuntimeError, OSError, http.client.HTTPException):
                gets_failed += 1
                probe = Client(port)
        stop.set()
        for thread in threads:
            thread.join(900)
    finally:
        server.terminate()
        server.wait(120)
    gets.sort()
    p99 = gets[min(len(gets) - 1, int(len(gets) * 0.99))] if gets else float("nan")
    posted_queries = statuses.get(200, 0) * args.per_client
    print(f"load after: {load()}")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| one batch alone (POST of {args.per_client} queries): median of 3 | {one_batch * 1e3:.0f} ms |")
    print(f"| GETs during overload: count, refused or failed | {len(gets)}, {gets_failed} |")
    print(f"| GET latency under overload: p50 / p99 / max | {statistics.median(gets) * 1e3:.0f} / "
          f"{p99 * 1e3:.0f} / {gets[-1] * 1e3:.0f} ms |" if gets else "| GET latency | no GET answered |")
    print(f"| GET p99 / one batch (goal: at most 2) | {p99 / one_batch:.2f} |")
    print(f"| POSTs answered 200 / refused 503 / other / errors | {statuses.get(200, 0)} / {statuses.get(503, 0)} / "
          f"{sum(v for k, v in statuses.items() if k not in (200, 503))} / {len(errors)} |")
    print(f"| queries answered by POSTs, per second | {posted_queries / args.seconds:.0f} |")
    print(f"| RSS idle / peak under load (goal: peak at most 1.5x idle) | {idle:.0f} / {peak[0]:.0f} MiB "
          f"({peak[0] / idle:.2f}x) |")


if __name__ == "__main__":
    main()
