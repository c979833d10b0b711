"""`bge-index serve` never stale and never wrong: a commit made while the model loads is served, an index rebuilt
at the same path is another index, a failed reopen is retried, a new generation is prepared off the worker, and a
file changed under the server (a row overwritten in place, a file truncated) stops it serving that generation
with a logged error: never a wrong score, never a SIGBUS."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import index, ok, packing_works, serve_process, write_jsonl

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_serve import Client, serving  # noqa: E402

from bge_index.errors import IndexFormatError  # noqa: E402
from bge_index.search.local_index import LocalIndex  # noqa: E402
from bge_index.search.query import Query, SearchRequest  # noqa: E402
from bge_index.serve.search_service import SearchService  # noqa: E402
from bge_index.store.manifest import read_manifest  # noqa: E402
from bge_index.store.vector_store import OpenIndex  # noqa: E402


def notes(tmp_path: Path, tiny_model: Path, count: int = 12, word: str = "moon") -> tuple[Path, Path]:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    write_jsonl(corpus / "docs.jsonl", [{"id": f"{word}-{n}", "text": f"note {n} about the {word} and tides"}
                                        for n in range(count)])
    out = tmp_path / "index"
    index(corpus, out, tiny_model)
    return corpus, out


def commit(corpus: Path, out: Path, tiny_model: Path, name: str) -> int:
    write_jsonl(corpus / f"{name}.jsonl", [{"id": f"{name}-{n}", "text": f"moon landing {name} {n}"} for n in range(4)])
    index(corpus, out, tiny_model)
    return read_manifest(out).generation


def generation_of(headers: dict) -> int:
    return int(headers["x-bge-index-generation"])


def eventually(check, seconds: float = 15.0, every: float = 0.1):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def test_a_commit_made_while_the_model_loads_is_served(tmp_path, tiny_model):
    corpus, out = notes(tmp_path, tiny_model)
    loaded = LocalIndex(out, dtype="fp32")  # as `serve` does: open, load the model (slow), then serve
    newer = commit(corpus, out, tiny_model, "during-load")
    service = SearchService(loaded)
    try:
        answer = service.submit([Query("1", "moon landing")], SearchRequest(k=3)).result(30)
    finally:
        service.close()
    assert answer.generation == newer > loaded.manifest.generation


def test_an_index_rebuilt_at_the_same_path_is_another_index(tmp_path, tiny_model):
    corpus, out = notes(tmp_path, tiny_model, word="moon")
    with serving(out) as (port, _):
        client = Client(port)
        status, _, before = client.request("GET", "/search?q=note&k=3")
        assert status == 200 and b"moon-" in before
        shutil.rmtree(out)
        shutil.rmtree(corpus)
        notes(tmp_path, tiny_model, word="tunnel")  # generation 1 again, other documents
        status, headers, after = client.request("GET", "/search?q=note&k=3")
        client.close()
    assert status == 200
    assert generation_of(headers) == read_manifest(out).generation
    assert after.decode("utf-8") == ok("search", out, "note", "-k", "3", "--format", "json").stdout
    assert b"moon-" not in after


def test_a_failed_reopen_is_retried(tmp_path, tiny_model, monkeypatch):
    corpus, out = notes(tmp_path, tiny_model)
    real_open = OpenIndex.open.__func__
    failures = []

    def failing_open(cls, index_dir, manifest=None, attempts=5):
        if len(failures) < 2:  # the first two tries fail, as a file briefly out of reach would
            failures.append(time.monotonic())
            raise IndexFormatError(f"{index_dir}: damaged or missing shard (made up by the test)")
        return real_open(cls, index_dir, manifest, attempts)

    with serving(out) as (port, _):
        client = Client(port)
        assert client.request("GET", "/search?q=moon")[0] == 200
        monkeypatch.setattr(OpenIndex, "open", classmethod(failing_open))
        newer = commit(corpus, out, tiny_model, "retried")
        status, _, _ = client.request("GET", "/search?q=moon")
        assert status == 200  # the old generation answers while the new one cannot be opened
        served = eventually(lambda: generation_of(client.request("GET", "/search?q=moon")[1]) == newer)
        client.close()
    assert served, "the new generation was never opened again"
    assert len(failures) == 2


def test_a_new_generation_is_prepared_off_the_worker(tmp_path, tiny_model, monkeypatch):
    corpus, out = notes(tmp_path, tiny_model)
    real_open = OpenIndex.open.__func__

    def slow_open(cls, index_dir, manifest=None, attempts=5):
        time.sleep(2.0)
        return real_open(cls, index_dir, manifest, attempts)

    with serving(out) as (port, _):
        client = Client(port)
        assert client.request("GET", "/search?q=moon")[0] == 200
        monkeypatch.setattr(OpenIndex, "open", classmethod(slow_open))
        newer = commit(corpus, out, tiny_model, "prepared")
        time.sleep(3.5)  # longer than the open takes: it should be done, not waiting for a request
        started = time.perf_counter()
        status, headers, _ = client.request("GET", "/search?q=moon")
        seconds = time.perf_counter() - started
        client.close()
    assert status == 200 and generation_of(headers) == newer
    assert seconds < 1.0, seconds


def dense_file(out: Path) -> Path:
    manifest = read_manifest(out)
    [record] = [r for r in manifest.shards[0].search if r["kind"] == "dense"]
    return out / "search" / record["file"]


def test_a_row_overwritten_in_place_is_never_served_with_a_wrong_score(tmp_path, tiny_model, caplog):
    _, out = notes(tmp_path, tiny_model)
    path = dense_file(out)
    expected = ok("search", out, "moon tides", "--mode", "dense", "-k", "3", "--format", "json").stdout
    with serving(out) as (port, _):
        client = Client(port)
        status, _, body = client.request("GET", "/search?q=moon+tides&mode=dense&k=3")
        assert status == 200 and body.decode("utf-8") == expected
        mapped = np.load(path, mmap_mode="r")
        offset = mapped.offset
        del mapped
        saved = path.read_bytes()
        with open(path, "r+b") as file:  # in place: same inode, same size; every row's vector zeroed
            file.seek(offset)
            file.write(b"\x00" * (len(saved) - offset))
        status, headers, body = client.request("GET", "/search?q=moon+tides&mode=dense&k=3")
        assert status == 503, body[:300]
        assert headers["content-type"].startswith("application/json")
        assert "changed" in json.loads(body)["error"]
        with open(path, "r+b") as file:  # put back: the generation is good again, and is served again
            file.write(saved)
        status, _, body = eventually(lambda: (lambda r: r if r[0] == 200 else None)(
            client.request("GET", "/search?q=moon+tides&mode=dense&k=3")))
        client.close()
    assert status == 200 and body.decode("utf-8") == expected
    changed = [r.getMessage() for r in caplog.records if "changed" in r.getMessage() and r.levelname == "ERROR"]
    assert changed and path.name in changed[0]


@pytest.mark.slow
def test_a_file_truncated_under_the_server_is_refused_never_a_sigbus(tmp_path, tiny_model):
    _, out = notes(tmp_path, tiny_model, count=300)
    path = dense_file(out)
    log_path = tmp_path / "serve.log"
    with serve_process(out, log_path=log_path) as (process, port):
        client = Client(port)
        assert client.request("GET", "/search?q=moon&mode=dense")[0] == 200
        os.truncate(path, 128)  # the header and nothing else
        status, headers, body = client.request("GET", "/search?q=moon&mode=dense")
        assert status == 503, body[:300]
        assert "changed" in json.loads(body)["error"]
        status, _, body = client.request("GET", "/healthz")
        assert status == 503 and json.loads(body)["status"] == "unavailable"
        client.close()
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    logged = log_path.read_text()
    errors = [line for line in logged.splitlines() if path.name in line and "changed" in line]
    assert len(errors) == 1, logged
    assert re.match(r"bge-index: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", errors[0])


def test_a_new_generation_packs_its_codes_as_the_first_one_did(tmp_path, tiny_model, monkeypatch):
    """`serve` packs the int8 codes of the index it opens (when they fit in memory, or always with
    --pack-codes); the generations it opens later do as they were asked to, so a commit never makes queries
    slower."""
    from bge_index.search import scoring

    monkeypatch.setattr(scoring, "_memory_bytes", lambda: 0)  # the default budget: nothing fits
    corpus, out = notes(tmp_path, tiny_model)
    for budget in (1 << 30, 1):  # --pack-codes (any size) and a budget the codes do not fit: carried over as asked
        loaded = LocalIndex(out, dtype="fp32")
        loaded.searcher.pack_codes(budget=budget)
        first_packs = loaded.searcher.packs_codes
        newer = commit(corpus, out, tiny_model, f"after-start-{budget}")
        service = SearchService(loaded)
        try:
            answer = service.submit([Query("1", "moon"), Query("2", "tides")], SearchRequest(k=3)).result(30)
            assert answer.generation == newer
            served = service._generations.served.index.searcher
            assert served.pack_request == budget
            assert served.packs_codes == first_packs == (budget > 1 and packing_works())
        finally:
            service.close()
