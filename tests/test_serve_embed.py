"""POST /embed in `bge-index serve`: the records `bge-index embed --index` prints, byte for byte, and the vectors
the index stores; bad bodies refused in one line of JSON; the same bounds as POST /search (body, texts, answer
bytes, queue, deadline); embedding steps taking turns with search batches on the one worker."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import index, load_vectors, ok, read_shard_table, write_jsonl

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from test_serve import Client, _BlockingIndex, serving  # noqa: E402

from bge_index.search.local_index import LocalIndex  # noqa: E402
from bge_index.search.query import Query, SearchRequest  # noqa: E402
from bge_index.serve.embedding import EMBED_BATCH_DOCUMENTS, EmbedWork  # noqa: E402
from bge_index.serve.limits import Limits  # noqa: E402
from bge_index.serve.search_service import SearchService  # noqa: E402
from bge_index.store.manifest import read_manifest  # noqa: E402

RECORDS = [{"id": "a", "text": "the moon recedes from the earth by about four centimetres a year"},
           {"id": "b", "text": "tides"},
           {"id": "c", "title": "Bread", "text": "bread needs time and warmth"},
           {"id": "d", "text": "längster Tunnel der Welt \"quoted\" \u00e9t\u00e9 \U0001F319"}]


def build(tmp_path_factory, tiny_model, name: str, *extra) -> tuple[Path, Path]:
    """(the corpus file, its index built with `extra`)."""
    folder = tmp_path_factory.mktemp(name)
    corpus = folder / "docs.jsonl"
    write_jsonl(corpus, RECORDS)
    out = folder / "index"
    index(corpus, out, tiny_model, *extra)
    return corpus, out


@pytest.fixture(scope="module")
def colbert_index(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    return build(tmp_path_factory, tiny_model, "embed-colbert", "--colbert")


@pytest.fixture(scope="module")
def plain_index(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    return build(tmp_path_factory, tiny_model, "embed-plain")


@pytest.fixture(scope="module")
def server(colbert_index):
    with serving(colbert_index[1]) as (port, service):
        yield port, service


@pytest.fixture
def client(server):
    connection = Client(server[0])
    yield connection
    connection.close()


def as_answer(cli_stdout: str) -> str:
    """`bge-index embed`'s lines as POST /embed answers them: a JSON list, one line per record."""
    return "[\n" + ",\n".join(cli_stdout.splitlines()) + "\n]\n"


def json_error(headers: dict, body: bytes) -> str:
    assert headers["content-type"].startswith("application/json"), (headers, body[:200])
    text = body.decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1, text[:300]
    assert "Traceback" not in text
    return json.loads(text)["error"]


# ---------------------------------------------------------------------------
# The command's records, byte for byte, and the index's vectors


@pytest.mark.parametrize("colbert", [False, True])
def test_documents_answer_what_embed_index_prints(colbert_index, client, colbert):
    corpus, out = colbert_index
    body = {"documents": RECORDS, **({"colbert": True} if colbert else {})}
    status, headers, answer = client.request("POST", "/embed", body)
    assert status == 200, answer[:300]
    assert headers["content-type"].startswith("application/json")
    assert int(headers["x-bge-index-generation"]) == read_manifest(out).generation
    assert headers["server-timing"].startswith("embed;dur=")
    printed = ok("embed", corpus, "--index", out, *(["--colbert"] if colbert else [])).stdout
    assert answer.decode("utf-8") == as_answer(printed)
    records = json.loads(answer)
    assert [r["id"] for r in records] == ["a", "b", "c", "d"]
    assert all(("colbert" in r) == colbert for r in records)


def test_texts_answer_what_embed_prints_for_text_lines_over_several_groups(colbert_index, client, tmp_path):
    corpus, out = colbert_index
    # More texts than one group: the groups (and so the forward passes, and so the bits) must be the command's.
    texts = [f"note {n} about the {'moon' if n % 3 else 'tides and the sun'}" + " orbit" * (n % 7)
             for n in range(EMBED_BATCH_DOCUMENTS + 44)]
    (tmp_path / "lines.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    status, _, answer = client.request("POST", "/embed", {"texts": texts})
    assert status == 200, answer[:300]
    printed = ok("embed", tmp_path / "lines.txt", "--index", out).stdout
    assert answer.decode("utf-8") == as_answer(printed)
    assert [r["id"] for r in json.loads(answer)] == [str(n) for n in range(1, len(texts) + 1)]


def test_embed_gives_the_vectors_the_index_stores(colbert_index, client):
    _, out = colbert_index
    status, _, answer = client.request("POST", "/embed", {"documents": RECORDS, "colbert": True})
    assert status == 200, answer[:300]
    manifest = read_manifest(out)
    stored = load_vectors(out, manifest)
    colbert = {}
    for shard in manifest.shards:
        table = read_shard_table(out, shard, ["id", "colbert"])
        for doc_id, vectors in zip(table.column("id").to_pylist(), table.column("colbert").to_pylist()):
            colbert[doc_id] = np.asarray(vectors, dtype=np.float32).reshape(-1, manifest.colbert_dim)
    for record in json.loads(answer):
        row = list(stored.ids).index(record["id"])
        # the index encodes in its own batches (other padding): equal to float16 rounding, as `embed` is
        np.testing.assert_allclose(record["dense"], stored.dense[row].astype(np.float32), atol=2e-3)
        ids, weights = stored.sparse_row(row)
        assert [t for t, _ in record["sparse"]] == ids.tolist()
        np.testing.assert_allclose([w for _, w in record["sparse"]], weights, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(record["colbert"], colbert[record["id"]], atol=2e-3)


def test_colbert_of_an_index_without_it_is_refused(plain_index):
    _, out = plain_index
    with serving(out) as (port, service):
        client = Client(port)
        status, headers, body = client.request("POST", "/embed", {"texts": ["moon"], "colbert": True})
        assert status == 400
        assert "no ColBERT vectors" in json_error(headers, body)
        assert service.embed_steps == 0
        status, _, body = client.request("POST", "/embed", {"texts": ["moon"]})
        assert status == 200 and "colbert" not in json.loads(body)[0]
        status, _, body = client.request("GET", "/metrics")
        assert 'route="/embed"' in body.decode("utf-8")
        client.close()


# ---------------------------------------------------------------------------
# Bad requests: one line of JSON, a 4xx


@pytest.mark.parametrize("body, status, message", [
    ('["moon"]', 400, "must be a JSON object"),
    ({}, 400, 'give one of "texts"'),
    ({"texts": ["moon"], "documents": [{"id": "1", "text": "moon"}]}, 400, 'give one of "texts"'),
    ({"texts": "moon"}, 400, '"texts" must be a non-empty list'),
    ({"texts": []}, 400, '"texts" must be a non-empty list'),
    ({"documents": []}, 400, '"documents" must be a non-empty list'),
    ({"texts": ["moon", 7]}, 400, "texts[1]: must be a string"),
    ({"texts": ["moon", None]}, 400, "texts[1]: must be a string"),
    ({"texts": ["  \n"]}, 400, "texts[0]: the text is empty"),
    ('{"texts": ["\\ud800"]}', 400, "surrogate"),
    ({"documents": ["moon"]}, 400, "documents[0]: must be an object"),
    ({"documents": [{"text": "moon"}]}, 400, "documents[0]: no id field"),
    ({"documents": [{"id": "x", "text": 3}]}, 400, "not a string"),
    ({"documents": [{"id": "x", "text": " "}]}, 400, "empty text"),
    ({"texts": ["moon"], "colbert": "maybe"}, 400, "colbert must be true or false"),
    ({"texts": ["moon"], "k": 3}, 400, "unknown field 'k'"),
    ('{"texts": ["moon"], "texts": ["sun"]}', 400, "duplicate key 'texts'"),
    ("{not json", 400, "not JSON"),
    ({"texts": ["x"] * 1025}, 413, "at most 1,024"),
    (b'{"texts": ["' + b"x" * (1 << 20) + b'"]}', 413, "bytes"),
])
def test_a_bad_embed_request_gets_a_4xx_and_one_line_of_json(client, body, status, message):
    got_status, headers, got = client.request("POST", "/embed", body)
    assert got_status == status, got[:300]
    assert message in json_error(headers, got)


def test_query_string_and_other_methods_are_refused(client):
    status, headers, body = client.request("POST", "/embed?colbert=true", {"texts": ["moon"]})
    assert status == 400 and "JSON body" in json_error(headers, body)
    status, headers, body = client.request("GET", "/embed")
    assert status == 405 and json_error(headers, body)
    assert client.request("POST", "/embed", {"texts": ["moon"]})[0] == 200  # still answering


def test_an_answer_that_could_be_too_big_is_refused_before_the_work(colbert_index):
    _, out = colbert_index
    with serving(out, limits=Limits(max_answer_bytes=64 << 10)) as (port, service):
        client = Client(port)
        texts = ["the moon recedes from the earth " * 40] * 8
        status, headers, body = client.request("POST", "/embed", {"texts": texts, "colbert": True})
        assert status == 413 and "leave out colbert" in json_error(headers, body)
        assert service.embed_steps == 0  # refused before any encoding
        status, _, body = client.request("POST", "/embed", {"texts": texts[:2]})
        assert status == 200 and len(body) < 64 << 10
        client.close()


# ---------------------------------------------------------------------------
# The queue and the worker, shared with searches


class _BlockingWithModel(_BlockingIndex):
    """_BlockingIndex (its first search waits for `release`) with the real index's model, for /embed."""

    def __init__(self, real: LocalIndex):
        super().__init__(real)
        self.encoder = real.encoder


def test_a_full_queue_or_a_deadline_answers_503_json(colbert_index):
    _, out = colbert_index
    blocking = _BlockingWithModel(LocalIndex(out, dtype="fp32"))
    limits = Limits(max_queue=8, request_timeout=1.0)
    with serving(out, max_batch=4, limits=limits, index=blocking) as (port, service):
        held = threading.Thread(target=Client(port).request, args=("GET", "/search?q=moon"), daemon=True)
        held.start()  # its search holds the worker until `release`
        while not blocking.sizes:
            time.sleep(0.001)
        client = Client(port)
        # 1 query waits; 5 texts pass the room a big request has (8 - max_batch): refused at once
        status, headers, body = client.request("POST", "/embed", {"texts": [f"moon {n}" for n in range(5)]})
        assert status == 503 and "queue is full" in json_error(headers, body)
        assert int(headers["retry-after"]) >= 1
        # 2 texts are taken, and wait behind the held search past their deadline
        started = time.monotonic()
        status, headers, body = client.request("POST", "/embed", {"texts": ["moon", "tides"]})
        assert status == 503 and "within" in json_error(headers, body)
        assert time.monotonic() - started < 5
        blocking.release.set()
        held.join(30)
        deadline = time.monotonic() + 10
        while service.queued_queries() and time.monotonic() < deadline:  # the worker drops the late one
            time.sleep(0.01)
        assert service.embed_steps == 0  # the late embedding was dropped, never encoded
        status, _, body = client.request("POST", "/embed", {"texts": ["moon", "tides"]})
        assert status == 200 and len(json.loads(body)) == 2, body
        status, _, body = client.request("GET", "/metrics")
        assert 'bge_index_serve_refused_total{reason="queue full"}' in body.decode("utf-8")
        client.close()


def test_embedding_steps_take_turns_with_search_batches(colbert_index):
    _, out = colbert_index
    blocking = _BlockingWithModel(LocalIndex(out, dtype="fp32"))
    service = SearchService(blocking, max_batch=4)
    finished: list[str] = []
    try:
        first = service.submit([Query("0", "moon")], SearchRequest(k=1))
        while not blocking.sizes:
            time.sleep(0.001)
        texts = [f"note {n} about the moon" for n in range(2 * EMBED_BATCH_DOCUMENTS)]  # two groups: 4+ steps
        embedding = service.submit_embed(EmbedWork([str(n) for n in range(len(texts))], texts, colbert=False))
        embedding.add_done_callback(lambda _: finished.append("embed"))
        search = service.submit([Query("1", "tides")], SearchRequest(k=1))
        search.add_done_callback(lambda _: finished.append("search"))
        blocking.release.set()
        first.result(30)
        assert len(search.result(30).results) == 1
        answer = embedding.result(60)
    finally:
        service.close()
    assert finished == ["search", "embed"]  # the search did not wait for the whole embedding
    assert service.embed_steps >= 4
    assert [rows.ids[i] for rows, i in answer.results] == [str(n) for n in range(len(texts))]
