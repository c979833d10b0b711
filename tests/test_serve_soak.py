"""A minute of everything at once against one `bge-index serve` process on 127.0.0.1: 48 clients posting 64 queries
in a loop (overload), 100 slowloris sockets, clients hanging up on 256-query POSTs, and a commit every few seconds.
Every request must be answered, or refused with a 4xx/5xx JSON answer; the RSS stays bounded; a GET's latency is
measured throughout (p99 printed); after the last commit the next request answers from it; SIGTERM exits 0."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import index, module_command, run_process, serve_process, write_jsonl

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_serve import QUERIES  # noqa: E402

from bge_index.store.manifest import read_manifest  # noqa: E402

SOAK_SECONDS = 60
POSTERS, POSTED = 48, 64
SLOW_SOCKETS = 100


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def body_of(count: int, offset: int) -> str:
    return json.dumps({"queries": [{"id": f"q{n}", "text": f"{QUERIES[n % len(QUERIES)]} {n}"}
                                   for n in range(offset, offset + count)], "k": 5})


def corpus_records(round_number: int) -> list[dict]:
    return [{"id": f"d{n}", "text": f"note {n} round {round_number} about the moon, tides and bread"}
            for n in range(150)] + [{"id": f"r{round_number}-{n}", "text": f"round {round_number} tunnel {n}"}
                                    for n in range(10)]


@pytest.mark.slow
def test_a_minute_of_overload_slowloris_hang_ups_and_commits(tmp_path, tiny_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "docs.jsonl", corpus_records(0))
    out = tmp_path / "index"
    index(corpus, out, tiny_model)
    log_path = tmp_path / "serve.log"
    with serve_process(out, "--no-access-log", "--header-timeout", "2", "--request-timeout", "20", "--max-queue", "2048",
                       log_path=log_path) as (process, port):
        summary = soak(port, process.pid, corpus, out, tiny_model)
        assert process.poll() is None, "the server died"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    print(json.dumps(summary, indent=2))
    logged = log_path.read_text()
    assert len(logged) < 1 << 20, f"{len(logged):,} bytes of log in a minute"
    assert "Traceback" not in logged, logged[-3000:]
    assert summary["unexpected"] == [], summary["unexpected"][:20]
    assert summary["posts"].get("200", 0) > 0 and summary["gets"] > 0
    assert summary["slow sockets closed by the server"] >= SLOW_SOCKETS
    assert summary["rss peak MiB"] <= 2 * summary["rss idle MiB"], summary
    assert summary["after the last commit"] == "answered from it"
    assert not [line for line in summary["refused (metrics)"] if 'reason="unavailable"' in line]  # commits are no fault


def soak(port: int, pid: int, corpus: Path, out: Path, tiny_model: Path) -> dict:
    stop = threading.Event()
    lock = threading.Lock()
    unexpected: list[str] = []
    posts: dict[str, int] = {}
    gets: list[float] = []
    get_statuses: dict[str, int] = {}
    slow_closed = [0]
    rss = [0.0]
    commits = [0]

    def check(status: int, headers: dict, body: bytes, what: str) -> None:
        if status == 200:
            return
        try:
            assert headers.get("content-type", "").startswith("application/json")
            assert 400 <= status < 600 and "error" in json.loads(body)
        except (AssertionError, ValueError):
            with lock:
                unexpected.append(f"{what}: {status} {headers.get('content-type')} {body[:120]!r}")

    def request(connection, method: str, path: str, body: str | None = None):
        headers = {"Content-Type": "application/json"} if body else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def poster(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        offset = number * 1000
        while not stop.is_set():
            try:
                status, headers, body = request(connection, "POST", "/search", body_of(POSTED, offset))
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    unexpected.append(f"POST: {error!r}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            check(status, headers, body, "POST")
            with lock:
                posts[str(status)] = posts.get(str(status), 0) + 1
            offset += POSTED
            if status == 503:
                time.sleep(min(float(headers.get("retry-after", "1")), 1.0))
        connection.close()

    def prober() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        number = 0
        while not stop.is_set():
            number += 1
            started = time.perf_counter()
            try:
                status, headers, body = request(connection, "GET", f"/search?k=3&q=moon+{number}")
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    unexpected.append(f"GET: {error!r}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            check(status, headers, body, "GET")
            get_statuses[str(status)] = get_statuses.get(str(status), 0) + 1
            if status == 200:
                gets.append(time.perf_counter() - started)

    def slowloris() -> None:
        sockets: list[socket.socket | None] = [None] * SLOW_SOCKETS
        while not stop.is_set():
            for n in range(SLOW_SOCKETS):
                sock = sockets[n]
                if sock is None:
                    try:
                        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                        sock.sendall(b"GET /search?q=moon HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                        sock.setblocking(False)
                        sockets[n] = sock
                    except OSError:
                        continue
                    continue
                try:
                    if sock.recv(4096) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    try:
                        sock.send(b"X")
                        continue
                    except OSError:
                        pass
                except OSError:
                    pass
                sock.close()
                sockets[n] = None
                slow_closed[0] += 1
            stop.wait(1.0)
        for sock in sockets:
            if sock is not None:
                sock.close()

    def hang_ups() -> None:
        number = 0
        while not stop.is_set():
            data = body_of(256, 10_000 + number).encode()
            number += 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
            except OSError:
                pass
            stop.wait(0.3)

    def committer() -> None:
        while not stop.wait(4.0):
            commits[0] += 1
            write_jsonl(corpus / "docs.jsonl", corpus_records(commits[0]))
            done = run_process(module_command("index", corpus, "--out", out, "--model", tiny_model, "-q"))
            if done.returncode != 0:
                with lock:
                    unexpected.append(f"index run: {done.returncode} {done.stderr[-300:]}")

    def sampler() -> None:
        while not stop.is_set():
            rss[0] = max(rss[0], rss_mib(pid))
            stop.wait(0.25)

    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for n in range(8):
        assert request(warm, "GET", f"/search?k=3&q=warm+{n}")[0] == 200
    assert request(warm, "POST", "/search", body_of(POSTED, 0))[0] == 200
    time.sleep(0.5)
    idle = rss_mib(pid)
    threads = [threading.Thread(target=poster, args=(n,)) for n in range(POSTERS)]
    threads += [threading.Thread(target=f) for f in (prober, slowloris, hang_ups, committer, sampler)]
    for thread in threads:
        thread.start()
    time.sleep(SOAK_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    # After the last commit, the next request answers from it.
    warm.close()
    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    generation = read_manifest(out).generation
    status, headers, _ = request(warm, "GET", "/search?k=3&q=moon")
    fresh = "answered from it" if status == 200 and int(headers["x-bge-index-generation"]) == generation else \
        f"{status}, generation {headers.get('x-bge-index-generation')} (manifest {generation})"
    _, _, metrics_text = request(warm, "GET", "/metrics")
    warm.close()
    gets.sort()
    return {
        "seconds": SOAK_SECONDS, "posts": posts, "gets": len(gets), "get statuses": get_statuses,
        "get p50 ms": round(gets[len(gets) // 2] * 1e3) if gets else None,
        "get p99 ms": round(gets[min(len(gets) - 1, int(len(gets) * 0.99))] * 1e3) if gets else None,
        "slow sockets closed by the server": slow_closed[0], "commits": commits[0],
        "rss idle MiB": round(idle), "rss peak MiB": round(rss[0]), "after the last commit": fresh,
        "refused (metrics)": [line for line in metrics_text.decode().splitlines()
                              if line.startswith("bge_index_serve_refused_total")],
        "unexpected": unexpected,
    }
