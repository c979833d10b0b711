"""`bge-index serve` bounded, fair and closed by default: a bounded queue (503 + Retry-After), a connection limit,
header/body timeouts against slow clients, per-request deadlines, big requests split so a short one waits at
most one batch, answers bounded in bytes before the work, hung-up clients' work dropped, duplicate JSON keys
and empty tokens refused, SIGTERM answering queued requests in JSON, /healthz reporting overload, /metrics.

Every test here targets 127.0.0.1 only, and bounds its sockets and its time."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import REPO, SAMPLE_CORPUS, index, module_command, ok, serve_process, write_jsonl

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from test_serve import QUERIES, Client, serving  # noqa: E402

from bge_index.serve.http_api import create_app  # noqa: E402
from bge_index.serve.limits import Limits  # noqa: E402


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("serve-limits") / "index"
    index(SAMPLE_CORPUS, out, tiny_model)
    return out


def posted(count: int, k: int = 3, offset: int = 0) -> dict:
    """A POST /search body of `count` distinct queries."""
    return {"queries": [{"id": f"q{n}", "text": f"{QUERIES[n % len(QUERIES)]} {n}"}
                        for n in range(offset, offset + count)], "k": k}


def timed(client: Client, method: str, path: str, body=None):
    started = time.perf_counter()
    status, headers, answer = client.request(method, path, body)
    return time.perf_counter() - started, status, headers, answer


def json_error(headers: dict, body: bytes) -> str:
    assert headers["content-type"].startswith("application/json"), (headers, body[:200])
    text = body.decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1
    return json.loads(text)["error"]


def raw_post(port: int, body: dict) -> socket.socket:
    """A connected socket that has sent a whole POST /search (the caller reads or hangs up)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends on `sock` until it closes it (or `timeout` passes)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(chunks)


# ---------------------------------------------------------------------------
# Bounded: the queue, answers in bytes, deadlines


def test_a_full_queue_answers_503_json_with_retry_after_and_healthz_says_overloaded(sample_index):
    with serving(sample_index, max_batch=8, limits=Limits(max_queue=64)) as (port, service):
        start = threading.Barrier(6)

        def ask(n: int):
            client = Client(port)
            start.wait()
            try:
                return client.request("POST", "/search", posted(64, offset=64 * n))
            finally:
                client.close()

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        statuses = sorted(status for status, _, _ in answers)
        assert 200 in statuses and 503 in statuses, statuses
        assert set(statuses) <= {200, 503}
        for status, headers, body in answers:
            if status == 503:
                assert "queue" in json_error(headers, body)
                assert int(headers["retry-after"]) >= 1
        # Refusals just happened: /healthz says the server is shedding load, and what it serves.
        status, headers, body = Client(port).request("GET", "/healthz")
        health = json.loads(body)
        assert status == 503 and health["status"] == "overloaded", health
        assert health["generation"] == service.index.manifest.generation


@pytest.fixture(scope="module")
def big_documents(tmp_path_factory, tiny_model) -> Path:
    """An index of 20 documents of ~200 KB each."""
    corpus = tmp_path_factory.mktemp("big-documents")
    words = ["moon", "tide", "orbit", "tunnel", "bread"]
    write_jsonl(corpus / "docs.jsonl", [{"id": f"d{n}", "text": f"{words[n % 5]} " + "lorem ipsum " * 17_000}
                                        for n in range(20)])
    out = corpus.parent / (corpus.name + "-index")
    index(corpus, out, tiny_model)
    return out


def test_answers_are_bounded_in_bytes_before_the_work(big_documents):
    out = big_documents
    with serving(out, limits=Limits(max_answer_bytes=1 << 20)) as (port, service):
        client = Client(port)
        batches = service.batches
        status, headers, body = client.request("POST", "/search", posted(20, k=20))
        assert status == 413, body[:200]
        assert "bytes" in json_error(headers, body)
        status, headers, body = client.request("GET", "/search?q=moon&k=10")
        assert status == 413 and "bytes" in json_error(headers, body)
        assert service.batches == batches  # refused before any search
        status, _, body = client.request("GET", "/search?q=moon&k=2")
        assert status == 200 and 300_000 < len(body) < 1 << 20
        assert body.decode("utf-8") == ok("search", out, "moon", "-k", "2", "--format", "json").stdout
        client.close()


def test_a_client_that_does_not_read_its_answer_is_dropped(big_documents):
    with serving(big_documents, limits=Limits(write_timeout=1.0, max_answer_bytes=64 << 20)) as (port, _):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answer stays with the server
        sock.connect(("127.0.0.1", port))
        data = json.dumps(posted(20, k=10)).encode()
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        time.sleep(8)  # the search, then more than write_timeout without reading a byte
        received, closed = 0, False
        sock.settimeout(5)
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    closed = True
                    break
                received += len(chunk)
        except ConnectionResetError:
            closed = True
        except socket.timeout:
            pass
        sock.close()
        assert closed and received < 30 << 20, received  # dropped, not sent whole (~40 MB)
        client = Client(port)
        assert client.request("GET", "/search?q=moon&k=1")[0] == 200
        client.close()


def test_a_request_past_its_deadline_gets_503_json_and_its_work_is_dropped(sample_index):
    with serving(sample_index, limits=Limits(request_timeout=0.5)) as (port, _):
        client = Client(port)
        seconds, status, headers, body = timed(client, "POST", "/search", posted(1024))
        assert status == 503, body[:200]
        assert "within" in json_error(headers, body)
        assert seconds < 3
        seconds, status, _, _ = timed(client, "GET", "/search?q=moon")
        assert status == 200 and seconds < 2  # the rest of the late request was not searched
        client.close()


# ---------------------------------------------------------------------------
# Fair: a short request behind a big one, hung-up clients


def test_a_short_request_waits_about_one_batch_behind_a_big_post(sample_index, tmp_path):
    with serving(sample_index, max_batch=32) as (port, _):
        alone = Client(port).request("GET", "/search?q=" + quote("tides and the sun"))[2]
        big: dict = {}

        def post() -> None:
            client = Client(port)
            big["seconds"], big["status"], _, big["body"] = timed(client, "POST", "/search", posted(512))
            client.close()

        thread = threading.Thread(target=post)
        thread.start()
        time.sleep(0.3)
        client = Client(port)
        seconds, status, _, body = timed(client, "GET", "/search?q=" + quote("tides and the sun"))
        thread.join(120)
        client.close()
    assert status == 200 and body == alone
    assert big["status"] == 200
    assert seconds < big["seconds"] / 3, (seconds, big["seconds"])
    # Split into batches, the big request still answers what the CLI prints for the same queries.
    queries = tmp_path / "queries.jsonl"
    write_jsonl(queries, [{"_id": q["id"], "text": q["text"]} for q in posted(512)["queries"]])
    printed = ok("search", sample_index, "--queries", queries, "-k", "3", "--format", "json").stdout
    assert big["body"].decode("utf-8") == printed


def test_the_work_of_clients_that_hung_up_is_dropped(sample_index):
    with serving(sample_index) as (port, _):
        client = Client(port)
        one_batch, status, _, _ = timed(client, "POST", "/search", posted(64))
        assert status == 200
        for n in range(6):  # 6 x 1,024 queries, each client gone within milliseconds
            raw_post(port, posted(1024, offset=n)).close()
        time.sleep(0.2)
        seconds, status, _, _ = timed(client, "GET", "/search?q=moon")
        client.close()
    assert status == 200
    assert seconds < 4 * one_batch + 1.0, (seconds, one_batch)


# ---------------------------------------------------------------------------
# Connections: a limit, slow clients


def test_connections_over_the_limit_are_refused_with_json(sample_index):
    with serving(sample_index, limits=Limits(max_connections=20)) as (port, _):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        time.sleep(0.2)
        refused = raw_post(port, posted(1))
        answer = read_response(refused, 5)
        refused.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"retry-after:" in head.lower() and b"application/json" in head.lower()
        assert "connections" in json.loads(body)["error"]
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        client = Client(port)
        assert client.request("GET", "/search?q=moon")[0] == 200
        client.close()


def test_slow_clients_cannot_hold_connections_and_are_logged_once(sample_index, caplog):
    limits = Limits(header_timeout=1.0, body_timeout=1.0, max_connections=300)
    with serving(sample_index, limits=limits) as (port, _), caplog.at_level(logging.INFO, "bge_index"):
        slow = []
        for n in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /search?q=moon HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
            sock.setblocking(False)
            slow.append(sock)
        closed_at: dict[int, float] = {}
        started = time.monotonic()
        probes = []
        while len(closed_at) < len(slow) and time.monotonic() - started < 8:
            for n, sock in enumerate(slow):
                if n in closed_at:
                    continue
                try:
                    if sock.recv(65536) == b"":
                        closed_at[n] = time.monotonic() - started
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed_at[n] = time.monotonic() - started
                    continue
                try:
                    sock.send(b"X")  # a header byte now and then
                except OSError:
                    closed_at[n] = time.monotonic() - started
            client = Client(port)
            probe_started = time.perf_counter()
            probes.append((client.request("GET", "/healthz")[0], time.perf_counter() - probe_started))
            client.close()
            time.sleep(0.3)
        for sock in slow:
            sock.close()
        assert len(closed_at) == len(slow), f"{len(slow) - len(closed_at)} slow connections still open"
        assert max(closed_at.values()) < 5
        assert all(status == 200 and seconds < 2 for status, seconds in probes), probes
        client = Client(port)
        assert client.request("GET", "/search?q=moon")[0] == 200
        client.close()
    slow_lines = [r for r in caplog.records if "slow" in r.getMessage()]
    assert 1 <= len(slow_lines) <= 3, [r.getMessage() for r in slow_lines]


def test_a_body_sent_too_slowly_is_answered_408_json(sample_index):
    with serving(sample_index, limits=Limits(header_timeout=1.0, body_timeout=1.0)) as (port, _):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"queries\": ")
        started = time.monotonic()
        answer = read_response(sock, 6)
        sock.close()
        assert time.monotonic() - started < 4
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert "body" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


# ---------------------------------------------------------------------------
# Fails closed: tokens, duplicate keys


@pytest.mark.parametrize("token", ["", " ", "\n"])
def test_an_empty_token_is_refused_by_the_library(sample_index, token):
    with serving(sample_index) as (_, service):
        with pytest.raises(ValueError, match="token"):
            create_app(service, str(sample_index), token=token)


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_variable_is_refused_at_start(sample_index, value):
    env = dict(os.environ, BGE_INDEX_SERVE_TOKEN=value)
    process = subprocess.Popen(module_command("serve", sample_index, "--port", "0", "--host", "0.0.0.0",
                                              "--allow-remote"), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("an empty token served everyone")
    assert process.returncode == 2
    assert "token" in stderr and "empty" in stderr


# ---------------------------------------------------------------------------
# Observable: /metrics


def test_metrics_are_in_prometheus_text_format(sample_index):
    from prometheus_client.parser import text_string_to_metric_families

    with serving(sample_index, token="metrics-token") as (port, service):
        client = Client(port, token="metrics-token")
        assert client.request("GET", "/search?q=moon")[0] == 200
        assert client.request("GET", "/search?q=moon&k=0")[0] == 400
        assert client.request("POST", "/search", posted(3))[0] == 200
        assert Client(port).request("GET", "/metrics")[0] == 401  # behind the token, as /search
        status, headers, body = client.request("GET", "/metrics")
        client.close()
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode("utf-8"))}
    requests = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
                for s in families["bge_index_serve_requests"].samples if s.name.endswith("_total")}
    assert requests[("/search", "GET", "200")] == 1 and requests[("/search", "GET", "400")] == 1
    assert requests[("/search", "POST", "200")] == 1 and requests[("/metrics", "GET", "401")] == 1
    assert any(s.name == "bge_index_serve_request_duration_seconds_bucket"
               for s in families["bge_index_serve_request_duration_seconds"].samples)
    assert any(s.name == "bge_index_serve_batch_queries_count" and s.value >= 2
               for s in families["bge_index_serve_batch_queries"].samples)
    assert "bge_index_serve_queued_queries" in families
    [generation] = families["bge_index_serve_generation"].samples
    assert generation.value == service.index.manifest.generation
    [identity] = families["bge_index_serve_index"].samples
    assert identity.labels["generation"] == str(service.index.manifest.generation)
    assert identity.labels["created"] == service.index.manifest.created


# ---------------------------------------------------------------------------
# SIGTERM with queued work


@pytest.mark.slow
def test_sigterm_answers_queued_requests_503_in_json_and_exits_0(sample_index, tmp_path):
    log_path = tmp_path / "serve.log"
    with serve_process(sample_index, "--max-batch", "16", "--max-queue", "8192", log_path=log_path) as (process, port):

        def ask(n: int):
            client = Client(port)
            try:
                return client.request("POST", "/search", posted(1024, offset=n))
            finally:
                client.close()

        with ThreadPoolExecutor(6) as pool:  # ~40 s of work on the tiny model: past uvicorn's 30 s grace
            futures = [pool.submit(ask, n) for n in range(6)]
            time.sleep(1.5)
            stopped = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answers = [future.result(60) for future in futures]
        assert process.wait(60) == 0
        assert time.monotonic() - stopped < 20
    statuses = [status for status, _, _ in answers]
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    for status, headers, body in answers:
        if status == 503:
            assert "stopping" in json_error(headers, body)
    assert "stopped (SIGTERM)" in log_path.read_text()
