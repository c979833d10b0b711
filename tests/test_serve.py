"""`bge-index serve`: the same answers as the CLI over HTTP, batching that changes no answer, new generations
served without a restart (never a mix), bearer tokens, one-line JSON errors, and a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import REPO, SAMPLE_CORPUS, index, invoke, ok, packing_works, serve_process, write_jsonl

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from bge_index.serve.http_api import bind, create_app, make_server  # noqa: E402
from bge_index.search.local_index import LocalIndex  # noqa: E402
from bge_index.search.query import Query, SearchRequest  # noqa: E402
from bge_index.serve.search_service import SearchService  # noqa: E402

QUERIES = ["How fast is the Moon moving away from Earth?", "sourdough starter", "längster Tunnel der Welt",
           "pulpo sangre azul", "moon", "tides and the sun", "why is the sky blue", "copper heat",
           "railway tunnel", "octopus", "laser ranging", "bread", "Mond", "cielo", "silver", "tunnel"]


class Client:
    """A keep-alive HTTP client for one server on 127.0.0.1 (one per thread)."""

    def __init__(self, port: int, token: str | None = None):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.token = token

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            headers["Content-Type"] = "application/json"
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def close(self) -> None:
        self.connection.close()


@contextlib.contextmanager
def serving(index_dir: Path, token: str | None = None, max_batch: int = 64, limits=None, index=None):
    """An in-process server (uvicorn in a thread) on a free port; yields (port, service).

    `limits` (serve.limits.Limits) bounds the queue, connections, reads and answers; `index` replaces the
    LocalIndex opened here."""
    bounded = {} if limits is None else {"limits": limits}
    service = SearchService(index or LocalIndex(index_dir, dtype="fp32"), max_batch=max_batch,
                            **({} if limits is None else {"max_queue": limits.max_queue}))
    server = make_server(create_app(service, str(index_dir), token=token, **bounded), access_log=False, **bounded)
    listener = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield listener.getsockname()[1], service
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


def corpus_index(tmp_path: Path, tiny_model: Path, records: list[dict], *extra) -> tuple[Path, Path]:
    """A corpus folder holding docs.jsonl with `records`, indexed: (corpus folder, index folder)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "docs.jsonl", records)
    out = tmp_path / "index"
    index(corpus, out, tiny_model, *extra)
    return corpus, out


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("serve") / "index"
    index(SAMPLE_CORPUS, out, tiny_model)
    return out


@pytest.fixture(scope="module")
def server(sample_index):
    with serving(sample_index) as (port, service):
        yield port, service


@pytest.fixture
def client(server):
    connection = Client(server[0])
    yield connection
    connection.close()


# ---------------------------------------------------------------------------
# The CLI's answers, byte for byte


@pytest.mark.parametrize("options", [
    {},
    {"mode": "dense"},
    {"mode": "sparse", "k": "3"},
    {"mode": "hybrid", "fusion": "rrf", "top-k": "5"},
    {"normalize": "minmax", "dense-weight": "0.7", "sparse-weight": "0.5", "explain": "true"},
])
def test_get_search_answers_what_search_format_json_prints(sample_index, client, options):
    query = "How fast is the Moon moving away from Earth?"
    status, headers, body = client.request("GET", "/search?q=" + quote(query) + "".join(
        f"&{name}={value}" for name, value in options.items()))
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert re.fullmatch(r"search;dur=\d+\.\d{3}", headers["server-timing"])
    flags = []
    for name, value in options.items():
        flag = "-k" if name == "k" else f"--{name}"
        flags += [flag] if name == "explain" else [flag, value]
    printed = ok("search", sample_index, query, "--format", "json", *flags).stdout
    assert body.decode("utf-8") == printed


def test_post_search_answers_what_search_queries_format_json_prints(sample_index, client, tmp_path):
    records = [{"_id": f"q{n}", "text": text} for n, text in enumerate(QUERIES[:6])]
    queries = tmp_path / "queries.jsonl"
    write_jsonl(queries, records)
    for mode in ("hybrid", "dense", "sparse"):
        status, _, body = client.request("POST", "/search", {"queries": records, "k": 4, "mode": mode})
        assert status == 200, body
        printed = ok("search", sample_index, "--queries", queries, "-k", "4", "--mode", mode, "--format", "json").stdout
        assert body.decode("utf-8") == printed


def test_info_and_healthz(sample_index, client):
    status, _, body = client.request("GET", "/info")
    assert status == 200
    assert body.decode("utf-8") == ok("info", sample_index, "--format", "json").stdout
    status, _, body = client.request("GET", "/healthz")
    manifest = json.loads(ok("info", sample_index, "--format", "json").stdout)
    assert status == 200
    assert json.loads(body) == {"status": "ok", "generation": manifest["generation"], "rows": manifest["documents"],
                                "queued": 0, "index": manifest["created"]}


def test_sixteen_concurrent_clients_get_the_answers_each_query_gets_alone(server):
    port, service = server
    alone = {}
    single = Client(port)
    for text in QUERIES:
        status, _, alone[text] = single.request("GET", "/search?mode=dense&k=5&q=" + quote(text))
        assert status == 200
    single.close()
    batches_before = service.batches

    def ask(text: str) -> bytes:
        connection = Client(port)
        try:
            answers = []
            for _ in range(4):
                status, _, body = connection.request("GET", "/search?mode=dense&k=5&q=" + quote(text))
                assert status == 200
                answers.append(body)
            return answers
        finally:
            connection.close()

    with ThreadPoolExecutor(16) as pool:
        for text, answers in zip(QUERIES, pool.map(ask, QUERIES)):
            assert all(answer == alone[text] for answer in answers), text
    # 64 requests were answered; batching shows as fewer batches than requests
    assert service.batches - batches_before < 64


# ---------------------------------------------------------------------------
# Batching


class _BlockingIndex:
    """Stands in for a LocalIndex: the first search waits for `release`; every search's size is recorded."""

    def __init__(self, real: LocalIndex):
        self.real = real
        self.index_dir = real.index_dir
        self.manifest = real.manifest
        self.release = threading.Event()
        self.sizes: list[int] = []

    def reopen(self):
        return self

    def search(self, queries, request):
        self.sizes.append(len(queries))
        if len(self.sizes) == 1:
            assert self.release.wait(30)
        return self.real.search(queries, request)


def test_queries_waiting_together_are_answered_in_one_search_with_unchanged_answers(sample_index):
    real = LocalIndex(sample_index, dtype="fp32")
    blocking = _BlockingIndex(real)
    service = SearchService(blocking, max_batch=64)
    try:
        first = service.submit([Query("0", QUERIES[0])], SearchRequest(k=3))
        while not blocking.sizes:
            time.sleep(0.001)
        waiting = [service.submit([Query(str(n), text)], SearchRequest(k=3)) for n, text in enumerate(QUERIES[1:11])]
        other = service.submit([Query("x", "moon")], SearchRequest(k=3, mode="sparse"))
        blocking.release.set()
        first.result(30)
        answers = [future.result(30).results[0] for future in waiting]
        other.result(30)
    finally:
        service.close()
    # one search for the ten waiting hybrid queries, one for the sparse one
    assert sorted(blocking.sizes[1:]) == [1, 10]
    for n, answer in enumerate(answers):
        [alone] = real.search([Query(str(n), QUERIES[1 + n])], SearchRequest(k=3))
        assert answer == alone


def test_max_batch_bounds_a_batch(sample_index):
    real = LocalIndex(sample_index, dtype="fp32")
    blocking = _BlockingIndex(real)
    service = SearchService(blocking, max_batch=4)
    try:
        first = service.submit([Query("0", "moon")], SearchRequest(k=1))
        while not blocking.sizes:
            time.sleep(0.001)
        futures = [service.submit([Query(str(n), text)], SearchRequest(k=1)) for n, text in enumerate(QUERIES[:10])]
        blocking.release.set()
        first.result(30)
        [future.result(30) for future in futures]
    finally:
        service.close()
    assert blocking.sizes[1:] == [4, 4, 2]


# ---------------------------------------------------------------------------
# New generations


def test_a_commit_is_served_from_the_next_request_and_never_mixed(tmp_path, tiny_model):
    corpus, out = corpus_index(tmp_path, tiny_model,
                               [{"id": f"d{n}", "text": f"note {n} about the moon and tides"} for n in range(20)])
    with serving(out) as (port, _):
        collected: list[tuple[int, bytes]] = []
        expected: dict[int, bytes] = {}
        stop = threading.Event()

        failures: list[str] = []

        def hammer() -> None:
            connection = Client(port)
            while not stop.is_set():
                status, headers, body = connection.request("GET", "/search?k=50&q=moon")
                if status != 200:
                    failures.append(f"{status} {body[:200]!r}")
                    continue
                collected.append((int(headers["x-bge-index-generation"]), body))
            connection.close()

        def expect() -> int:
            generation = json.loads(ok("info", out, "--format", "json").stdout)["generation"]
            expected[generation] = ok("search", out, "moon", "-k", "50", "--format", "json").stdout.encode("utf-8")
            return generation

        first = expect()
        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            for round_number in range(3):
                write_jsonl(corpus / f"more{round_number}.jsonl",
                            [{"id": f"m{round_number}-{n}", "text": f"moon landing {n}"} for n in range(5)])
                (corpus / "docs.jsonl").write_text(
                    "".join(json.dumps({"id": f"d{n}", "text": f"edit {round_number} of note {n}"}) + "\n"
                            for n in range(0, 20, 2)), encoding="utf-8")
                index(corpus, out, tiny_model)
                generation = expect()
                # a request sent after the commit is answered from it
                status, headers, body = Client(port).request("GET", "/search?k=50&q=moon")
                assert int(headers["x-bge-index-generation"]) == generation
                assert body == expected[generation]
        finally:
            stop.set()
            thread.join(60)
    assert generation > first
    assert not failures
    assert collected
    for seen_generation, body in collected:
        assert body == expected[seen_generation]  # one generation's answer, never a mix


def test_a_damaged_new_generation_leaves_the_old_one_serving(tmp_path, tiny_model, caplog):
    _, out = corpus_index(tmp_path, tiny_model, [{"id": f"d{n}", "text": f"note {n}"} for n in range(5)])
    with serving(out) as (port, _):
        connection = Client(port)
        _, headers, before = connection.request("GET", "/search?q=note")
        manifest_path = out / "manifest.json"
        saved = manifest_path.read_text(encoding="utf-8")
        broken = tmp_path / "broken.json"
        broken.write_text("{not json", encoding="utf-8")
        os.replace(broken, manifest_path)  # as a commit would, but damaged
        status, headers_after, after = connection.request("GET", "/search?q=note")
        assert status == 200 and after == before
        assert headers_after["x-bge-index-generation"] == headers["x-bge-index-generation"]
        fixed = tmp_path / "fixed.json"
        fixed.write_text(saved, encoding="utf-8")
        os.replace(fixed, manifest_path)
        assert connection.request("GET", "/search?q=note")[0] == 200
        connection.close()


# ---------------------------------------------------------------------------
# Bad requests


@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/search", None, 400, "missing q"),
    ("GET", "/search?q=", None, 400, "the query is empty"),
    ("GET", "/search?q=%20%20", None, 400, "the query is empty"),
    ("GET", "/search?q=moon&k=0", None, 400, "k must be from 1"),
    ("GET", "/search?q=moon&k=ten", None, 400, "k must be an integer"),
    ("GET", "/search?q=moon&k=1&top-k=2", None, 400, "given twice"),
    ("GET", "/search?q=moon&q=sun", None, 400, "q: given twice"),
    ("GET", "/search?q=moon&mode=fuzzy", None, 400, "mode must be one of hybrid, dense, sparse, colbert"),
    ("GET", "/search?q=moon&mode=colbert", None, 400, "no ColBERT vectors"),
    ("GET", "/search?q=moon&dense-weight=nan", None, 400, "finite"),
    ("GET", "/search?q=moon&explain=maybe", None, 400, "explain must be true or false"),
    ("GET", "/search?q=moon&format=table", None, 400, "unknown option 'format'"),
    ("POST", "/search", b"{not json", 400, "the body is not JSON"),
    ("POST", "/search", b"\xff\xfe", 400, "the body is not JSON"),
    ("POST", "/search", [1, 2], 400, "the body must be a JSON object"),
    ("POST", "/search", {"queries": []}, 400, "non-empty list"),
    ("POST", "/search", {"queries": [{"text": "moon"}]}, 400, "no id field"),
    ("POST", "/search", {"queries": [{"id": "1", "text": " "}]}, 400, "the query is empty"),
    ("POST", "/search", {"queries": [{"id": "1", "text": 5}]}, 400, "not a string"),
    ("POST", "/search", {"queries": ["moon"]}, 400, "must be an object"),
    ("POST", "/search", '{"queries": [{"id": "\\ud800", "text": "moon"}]}', 400, "surrogate"),
    ("POST", "/search", {"queries": [{"id": "a\tb", "text": "moon"}]}, 400, "control character in id"),
    ("POST", "/search?k=3", {"queries": [{"id": "1", "text": "moon"}]}, 400, "in the JSON body"),
    ("POST", "/search", '{"queries": [{"id": "1", "text": "moon"}], "dense-weight": 1' + "0" * 400 + '}', 400,
     "dense-weight must be a number"),
    ("POST", "/search", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("GET", "/search?q=moon&k=5000&explain", None, 413, "with explain"),
    ("GET", "/search?q=moon&k=2000&mode=colbert", None, 413, "mode colbert"),
    ("POST", "/search", '{"queries": [{"id": "1", "text": "\\ud800"}]}', 400, "surrogate"),
    ("POST", "/search", {"queries": [{"id": "1", "text": "moon"}], "k": True}, 400, "k must be an integer"),
    ("POST", "/search", {"queries": [{"id": "1", "text": "moon"}], "colour": 1}, 400, "unknown option 'colour'"),
    ("POST", "/search", {"queries": [{"id": str(n), "text": "x"} for n in range(1025)]}, 413, "at most 1,024"),
    ("POST", "/search", b"[" + b" " * (1 << 20) + b"]", 413, "bytes"),
    ("POST", "/search", {"queries": [{"id": str(n), "text": "x"} for n in range(11)], "k": 10_000}, 413,
     "at most 100,000"),
    ("POST", "/search", '{"queries": [{"id": "1", "text": "moon"}], "k": 3, "k": 5}', 400, "duplicate key 'k'"),
    ("POST", "/search", '{"queries": [{"id": "1", "id": "2", "text": "moon"}]}', 400, "duplicate key 'id'"),
    ("GET", "/nowhere", None, 404, "Not Found"),
    ("DELETE", "/search", None, 405, "Method Not Allowed"),
    ("POST", "/info", None, 405, "Method Not Allowed"),
])
def test_a_bad_request_gets_a_4xx_and_one_line_of_json(client, method, path, body, status, message):
    got_status, headers, got = client.request(method, path, body)
    assert got_status == status, got
    assert headers["content-type"].startswith("application/json")
    text = got.decode("utf-8")
    assert text.count("\n") == 1 and text.endswith("\n")
    error = json.loads(text)["error"]
    assert message in error
    assert "Traceback" not in text


def test_the_server_still_answers_after_bad_requests(client):
    for path in ("/search?k=-1&q=x", "/search?q=moon&mode=colbert", "/nowhere"):
        client.request("GET", path)
    assert client.request("GET", "/search?q=moon")[0] == 200


# ---------------------------------------------------------------------------
# Tokens and addresses


def test_a_token_is_required_everywhere_but_healthz(sample_index):
    with serving(sample_index, token="s3cret-token") as (port, _):
        anonymous = Client(port)
        status, headers, body = anonymous.request("GET", "/search?q=moon")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert "bearer token" in json.loads(body)["error"]
        assert anonymous.request("GET", "/info")[0] == 401
        assert anonymous.request("POST", "/search", {"queries": [{"id": "1", "text": "moon"}]})[0] == 401
        assert anonymous.request("GET", "/search?q=moon", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert anonymous.request("GET", "/search?q=moon", headers={"Authorization": "Basic s3cret-token"})[0] == 401
        assert anonymous.request("GET", "/healthz")[0] == 200
        assert anonymous.request("GET", "/search?q=moon", headers={"Authorization": "bearer s3cret-token"})[0] == 200
        anonymous.close()
        holder = Client(port, token="s3cret-token")
        assert holder.request("GET", "/search?q=moon")[0] == 200
        holder.close()


def test_a_non_loopback_host_needs_allow_remote(sample_index):
    result = invoke("serve", sample_index, "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert "--allow-remote" in result.output
    result = invoke("serve", sample_index, "--host", "example.org")
    assert result.exit_code == 2


def test_a_port_in_use_is_a_usage_error_before_the_model_loads(sample_index):
    taken = bind("127.0.0.1", 0)
    try:
        result = invoke("serve", sample_index, "--port", taken.getsockname()[1])
    finally:
        taken.close()
    assert result.exit_code == 2
    assert "cannot listen there" in result.output


def test_an_empty_token_is_refused(sample_index):
    result = invoke("serve", sample_index, "--port", "0", env={"BGE_INDEX_SERVE_TOKEN": " "})
    assert result.exit_code == 2
    assert "token" in result.output


@pytest.mark.slow
def test_serve_process_answers_logs_no_token_and_stops_cleanly_on_sigterm(sample_index, tmp_path):
    token = "tok-" + "9" * 24
    env = dict(os.environ, BGE_INDEX_SERVE_TOKEN=token)
    log_path = tmp_path / "serve.log"
    with serve_process(sample_index, log_path=log_path, env=env) as (process, port):
        connection = Client(port, token=token)
        status, _, body = connection.request("GET", "/search?q=moon&mode=dense")
        assert status == 200
        assert body.decode("utf-8") == ok("search", sample_index, "moon", "--mode", "dense", "--format", "json").stdout
        connection.close()
        stranger = Client(port)
        assert stranger.request("GET", "/search?q=moon", headers={"Authorization": "Bearer nope"})[0] == 401
        stranger.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    logged = log_path.read_text()
    assert token not in logged
    assert re.search(r"^bge-index: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d serving ", logged, re.M)
    assert '"GET /search?q=moon&mode=dense HTTP/1.1" 200' in logged
    assert "stopped (SIGTERM)" in logged
    if packing_works():  # oneDNN's kernel exact here
        assert re.search(r"packed [\d.]+ MiB of int8 codes in", logged)  # a small index: packed


@pytest.mark.slow
def test_serve_can_be_told_not_to_pack_the_codes(sample_index, tmp_path):
    log_path = tmp_path / "serve.log"
    with serve_process(sample_index, "--no-pack-codes", log_path=log_path) as (process, port):
        records = [{"_id": f"q{n}", "text": text} for n, text in enumerate(QUERIES[:4])]
        queries = tmp_path / "queries.jsonl"
        write_jsonl(queries, records)
        connection = Client(port)
        status, _, body = connection.request("POST", "/search", {"queries": records, "mode": "dense"})
        assert status == 200, body
        assert body.decode("utf-8") == ok("search", sample_index, "--queries", queries, "--mode", "dense",
                                          "--format", "json").stdout
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    assert "packed" not in log_path.read_text()


def test_serve_without_the_extra_names_it(sample_index, tmp_path):
    # A copy of the package on a path where starlette cannot be imported: the error names the extra.
    shadow = tmp_path / "shadow"
    (shadow / "starlette").mkdir(parents=True)
    (shadow / "starlette" / "__init__.py").write_text("raise ImportError('no starlette here', name='starlette')\n")
    done = subprocess.run([sys.executable, "-c", "from bge_index.cli import main; main()", "serve", str(sample_index)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=f"{shadow}:{REPO}"),
                          cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert "pip install 'bge-index[serve]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_post_reads_query_records_as_a_query_file_does(sample_index, client, tmp_path):
    # null fields are passed over, a title goes in front of the text: as `search --queries` reads a line
    records = [{"_id": None, "id": "q1", "title": "Moon", "text": "orbit"}, {"qid": 7, "text": None, "query": "tunnel"}]
    queries = tmp_path / "queries.jsonl"
    write_jsonl(queries, records)
    status, _, body = client.request("POST", "/search", {"queries": records, "k": 3})
    assert status == 200, body
    assert body.decode("utf-8") == ok("search", sample_index, "--queries", queries, "-k", "3", "--format", "json").stdout
    assert [r["query"] for r in json.loads(body)] == ["Moon orbit", "tunnel"]


class _FailingIndex(_BlockingIndex):
    """Its second search kills the worker thread (a BaseException no handler catches)."""

    def search(self, queries, request):
        self.sizes.append(len(queries))
        if len(self.sizes) == 1:
            assert self.release.wait(30)
            raise SystemExit("worker dies")
        return self.real.search(queries, request)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_nobody_waits_for_ever_on_a_stopped_worker(sample_index):
    blocking = _FailingIndex(LocalIndex(sample_index, dtype="fp32"))
    service = SearchService(blocking)
    first = service.submit([Query("0", "moon")], SearchRequest(k=1))
    while not blocking.sizes:
        time.sleep(0.001)
    waiting = service.submit([Query("1", "tunnel")], SearchRequest(k=1))
    blocking.release.set()
    with pytest.raises(Exception, match="stopping"):
        first.result(10)
    with pytest.raises(Exception, match="stopping"):
        waiting.result(10)
    service.close(timeout=10)  # the thread's end (and its SystemExit report) within this test
    assert not service.alive()
    with pytest.raises(Exception, match="stopping"):
        service.submit([Query("2", "moon")], SearchRequest(k=1))


def test_close_answers_what_was_queued_then_refuses(sample_index):
    service = SearchService(LocalIndex(sample_index, dtype="fp32"))
    futures = [service.submit([Query(str(n), text)], SearchRequest(k=2)) for n, text in enumerate(QUERIES[:5])]
    service.close()
    assert all(len(future.result(30).results) == 1 for future in futures)
    with pytest.raises(Exception, match="stopping"):
        service.submit([Query("x", "moon")], SearchRequest(k=1))


@pytest.mark.slow  # a 2,500-row index
def test_http_answers_equal_the_cli_on_an_index_of_many_chunks_shards_and_deleted_rows(tmp_path, tiny_model):
    words = ["moon", "tide", "orbit", "tunnel", "bread", "octopus", "laser", "copper", "silver", "sky"]
    corpus, out = corpus_index(tmp_path, tiny_model, [{"id": f"d{n}", "text": f"{words[n % 10]} {words[n * 7 % 10]} "
                                                                            f"note {n}"} for n in range(2500)],
                               "--shard-rows", "1000")
    write_jsonl(corpus / "docs.jsonl", [{"id": f"d{n}", "text": f"{words[n % 10]} {'edited' if n % 3 else 'note'} {n}"}
                                        for n in range(2500) if n % 5])  # edits and deletions in every shard
    index(corpus, out, tiny_model, "--shard-rows", "1000")
    with serving(out) as (port, _):
        connection = Client(port)
        for mode in ("dense", "sparse", "hybrid"):
            for query in ("moon tide", "edited octopus"):
                status, _, body = connection.request("GET", f"/search?k=25&mode={mode}&q={quote(query)}")
                assert status == 200
                assert body.decode("utf-8") == ok("search", out, query, "-k", "25", "--mode", mode,
                                                  "--format", "json").stdout
        connection.close()
