"""The HTTP face of `bge-index serve`: routes, request parsing, bearer tokens, JSON errors, and the server.

Built on Starlette (routing, requests) and run by uvicorn (HTTP/1.1) behind
a connection guard (connections.py): the optional `serve` extra,
`pip install 'bge-index[serve]'`. Every answer is JSON (/metrics: Prometheus'
text), and the search answers are byte for byte what the CLI prints:

    GET  /search?q=TEXT&k=10&mode=hybrid   = bge-index search INDEX "TEXT" -k 10 --mode hybrid --format json
    POST /search {"queries": [{"id": "q1", "text": "..."}], "k": 10, "mode": "dense"}
                                           = bge-index search INDEX --queries FILE ... --format json
    POST /embed {"texts": ["...", ...]} or {"documents": [{"id": "d1", "text": "..."}]}, "colbert": false
                                           = bge-index embed FILE --index INDEX [--colbert], as a JSON list
    GET  /info                             = bge-index info INDEX --format json
    GET  /healthz                          {"status": "ok", "generation": N, "rows": N, "queued": N, ...}
    GET  /metrics                          Prometheus text format (metrics.py)

Search options go by their flag names (`k` or `top-k`, `mode`,
`dense-weight`, `sparse-weight`, `colbert-weight`, `fusion`, `normalize`,
`explain`, `group-by-doc`: query.SEARCH_OPTIONS, whose declaration gives
each its parsing by type, range and default); an unknown one is an error,
never ignored, and so is a JSON key given twice.
A request that cannot be answered gets a 4xx/5xx status and one line of
JSON, `{"error": "..."}`: 413 when its answer could pass Limits.max_answer_bytes
(from the index's longest text, before any search), 503 with Retry-After
when the queue is full, 503 past its deadline or while the server stops.
A client that hangs up has its request's remaining work dropped.
POST /embed goes through the same body limit, queue (each text a place),
deadline, hang-up handling and answer bound (embedding.embed_answer_bound),
and is encoded on the search worker with the served model (embedding.py).
A header `X-Bge-Index-Generation` names the generation that answered, and
`Server-Timing: search;dur=MS` what the searches of the batches it was
answered in took (encode + score; alone, that is this request's own).
With a token, every route but /healthz wants `Authorization: Bearer TOKEN`
(compared in constant time; the token is never logged; an empty one is refused).

The searching itself is search_service.SearchService's; nothing here
imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import time
from enum import Enum
from typing import Any

from bge_index.errors import BgeIndexError, ExtraUnavailableError, InvalidOptionError, NoColbertVectors, UsageError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route

    from bge_index.serve.connections import ConnectionGuard, EventReport, GuardedServer
    from bge_index.serve.metrics import ServeMetrics
except ImportError as missing:  # pragma: no cover - exercised only without the extra
    raise ExtraUnavailableError(f"bge-index serve needs the serve extra: pip install 'bge-index[serve]' "
                                f"({missing.name} is not installed)") from None

from bge_index.input.types import FieldNames, Skipped, SkipReason
from bge_index.input.formats import QUERY_FIELDS, record_to_document
from bge_index.store.info import index_info
from bge_index.search.options import SearchOption, describe_range
from bge_index.search.query import SEARCH_OPTIONS as DECLARED_OPTIONS
from bge_index.search.query import Mode, Query, SearchRequest, request_from_options, results_json
from bge_index.serve.answer_size import answer_bound
from bge_index.serve.embedding import EmbedWork, check_colbert, embed_answer_bound, embed_max_length, embeddings_json
from bge_index.serve.generations import Unavailable
from bge_index.serve.limits import Limits
from bge_index.serve.search_service import DeadlineExceeded, QueueFull, SearchService, ServiceClosed

log = logging.getLogger("bge_index.serve")

MAX_BODY_BYTES = 1 << 20  # a POST /search body; 1 MiB holds thousands of queries
MAX_QUERIES = 1024  # queries in one POST
MAX_TEXTS = MAX_QUERIES  # texts in one POST /embed: each takes a place in the queue, as a query does
EMBED_KEYS = ("texts", "documents", "colbert")  # what a POST /embed body may hold
DOCUMENT_FIELDS = FieldNames()  # a POST /embed document's fields: `embed`'s (and `index`'s) id/_id/docid, text
MAX_K = 10_000
MAX_HITS = 100_000  # queries x k in one request: each hit may carry its text, so this bounds a response's size
MAX_EXPLAINED_HITS = 1_000  # with explain, each hit costs a walk over its query's tokens
MAX_COLBERT_K = 1_000  # colbert re-ranks 10 x k candidates, reading each one's token vectors
JSON_TYPE = "application/json"
OPEN_PATHS = frozenset({"/healthz"})  # answered without the token: load balancers probe it
CLIENT_GONE = 499  # the status recorded (never sent) for a request whose client hung up before its answer


class RequestError(Exception):
    """A request that cannot be answered as asked: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Parsing the search options (query string values are text; JSON values may be typed)


def _in_range(name: str, number: float, low: float | None, high: float | None) -> None:
    if (low is not None and number < low) or (high is not None and number > high):
        raise RequestError(400, f"{name} must be {describe_range(low, high)} (got {number})")


def _integer(name: str, value: Any, low: float | None, high: float | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(400, f"{name} must be an integer (got {value!r})")
    try:
        number = int(value)
    except ValueError:
        raise RequestError(400, f"{name} must be an integer (got {value!r})") from None
    _in_range(name, number, low, high)
    return number


def _number(name: str, value: Any, low: float | None, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(400, f"{name} must be a number (got {value!r})")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise RequestError(400, f"{name} must be a number (got {str(value)[:40]!r})") from None
    if not math.isfinite(number):
        raise RequestError(400, f"{name} must be a finite number (got {value!r})")
    _in_range(name, number, low, high)
    return number


_TRUE, _FALSE = {"", "1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE  # `?explain` alone means true, as the flag does
    raise RequestError(400, f"{name} must be true or false (got {value!r})")


def _choice(kind: type[Enum], name: str, value: Any) -> Enum:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise RequestError(400, f"{name} must be one of {choices} (got {value!r})") from None


# Every name of every declared search option (`k` and `top-k` both name k), in declaration order.
SEARCH_OPTIONS: dict[str, SearchOption] = {name: option for option in DECLARED_OPTIONS for name in option.names}
# What the server takes at most, below the declared range: each hit may carry its text, so k bounds an answer.
SERVER_MAXIMUM = {"k": MAX_K}


def parse_option(option: SearchOption, name: str, value: Any) -> Any:
    """An option's value from a query string (text) or a JSON body (typed), parsed by its declared type and
    checked against its declared range (and SERVER_MAXIMUM); `name` is the one the request used."""
    if option.type is bool:
        return _flag(name, value)
    if isinstance(option.type, type) and issubclass(option.type, Enum):
        return _choice(option.type, name, value)
    high = min((m for m in (option.maximum, SERVER_MAXIMUM.get(option.name)) if m is not None), default=None)
    if option.type is int:
        return _integer(name, value, option.minimum, high)
    if option.type is float:
        return _number(name, value, option.minimum, high)
    if option.type is str:
        if not isinstance(value, str):
            raise RequestError(400, f"{name} must be a string (got {str(value)[:40]!r})")
        return value
    raise TypeError(f"search option {option.name}: no HTTP parsing for {option.type!r}")  # a new type: add one


def search_request(options: dict[str, Any]) -> SearchRequest:
    """A SearchRequest from options named as the CLI's flags; the defaults are the CLI's (the declaration's).

        >>> search_request({"k": "3", "mode": "dense", "explain": ""}).k
        3
    """
    values: dict[str, Any] = {}
    for name, value in options.items():
        if name not in SEARCH_OPTIONS:
            known = ", ".join(SEARCH_OPTIONS)
            raise RequestError(400, f"unknown option {name!r} (search options: {known})")
        option = SEARCH_OPTIONS[name]
        if option.name in values:
            raise RequestError(400, f"{name}: given twice")
        values[option.name] = parse_option(option, name, value)
    try:
        return request_from_options(values, with_text=True)
    except InvalidOptionError as error:  # what the request's own checks refuse (a --where that does not parse)
        raise RequestError(400, str(error)) from None


def _query_text(text: Any, where: str) -> str:
    return _checked_text(text, where, "the text must be a string", "the query is empty: give the text to search for")


def _checked_text(text: Any, where: str, not_text: str, empty: str) -> str:
    """A request's text, refused (400, `where: ...`) when not a string, blank, or not valid Unicode."""
    if not isinstance(text, str):
        raise RequestError(400, f"{where}: {not_text}")
    if not text.strip():
        raise RequestError(400, f"{where}: {empty}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{where}: the text is not valid Unicode (a lone surrogate)") from None
    return text


def posted_queries(body: Any) -> tuple[list[Query], SearchRequest]:
    """The queries and options of a POST /search body (the fields of a query file's lines, and flag names)."""
    if not isinstance(body, dict):
        raise RequestError(400, 'the body must be a JSON object: {"queries": [{"id": ..., "text": ...}], ...}')
    options = dict(body)
    records = options.pop("queries", None)
    if not isinstance(records, list) or not records:
        raise RequestError(400, '"queries" must be a non-empty list of {"id": ..., "text": ...}')
    if len(records) > MAX_QUERIES:
        raise RequestError(413, f"{len(records):,} queries in one request; at most {MAX_QUERIES:,}")
    queries = []
    for number, record in enumerate(records):
        where = f"queries[{number}]"
        if not isinstance(record, dict):
            raise RequestError(400, f"{where}: must be an object with an id and a text")
        # The same reading as a --queries line: id and text fields, title prepended, ids checked.
        read = record_to_document(record, where, number, QUERY_FIELDS)
        if isinstance(read, Skipped):
            empty = read.code is SkipReason.EMPTY_TEXT
            raise RequestError(400, f"{where}: {'the query is empty: give the text to search for' if empty else read.reason}")
        queries.append(Query(read.id, read.text))
    request = search_request(options)
    check_size(len(queries), request)
    return queries, request


def posted_documents(body: Any) -> tuple[list[str], list[str], bool]:
    """The ids, texts and colbert flag of a POST /embed body: `texts` (strings, their ids "1", "2", ... as the
    lines of a text file get theirs) or `documents` (objects read as `bge-index embed` reads a JSONL line: id,
    text, title prepended), one of the two; a text that the command would skip is refused here (400)."""
    if not isinstance(body, dict):
        raise RequestError(400, 'the body must be a JSON object: {"texts": ["...", ...]} or '
                                '{"documents": [{"id": ..., "text": ...}]}')
    unknown = [key for key in body if key not in EMBED_KEYS]
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r} (POST /embed takes {', '.join(EMBED_KEYS)})")
    if ("texts" in body) == ("documents" in body):
        raise RequestError(400, 'give one of "texts" (a list of strings) or "documents" (a list of '
                                '{"id": ..., "text": ...})')
    colbert = _flag("colbert", body.get("colbert", False))
    key = "texts" if "texts" in body else "documents"
    items = body[key]
    if not isinstance(items, list) or not items:
        what = "strings" if key == "texts" else '{"id": ..., "text": ...}'
        raise RequestError(400, f'"{key}" must be a non-empty list of {what}')
    if len(items) > MAX_TEXTS:
        raise RequestError(413, f"{len(items):,} {key} in one request; at most {MAX_TEXTS:,}")
    ids, texts = [], []
    for number, item in enumerate(items):
        where = f"{key}[{number}]"
        if key == "texts":
            ids.append(str(number + 1))
            texts.append(_embed_text(item, where))
            continue
        if not isinstance(item, dict):
            raise RequestError(400, f"{where}: must be an object with an id and a text")
        read = record_to_document(item, where, number + 1, DOCUMENT_FIELDS)
        if isinstance(read, Skipped):
            raise RequestError(400, f"{where}: {read.reason}")
        ids.append(read.id)
        texts.append(read.text)
    return ids, texts, colbert


def _embed_text(text: Any, where: str) -> str:
    return _checked_text(text, where, f"must be a string (got {type(text).__name__})", "the text is empty")


def check_size(count: int, request: SearchRequest) -> None:
    """Refuse (413) a request whose answer would be too big to build: queries x k hits, explained or re-ranked."""
    hits = count * request.k
    limit = MAX_EXPLAINED_HITS if request.explain else MAX_HITS
    if hits > limit:
        raise RequestError(413, f"{count:,} queries x k {request.k:,} = {hits:,} hits; at most {limit:,} in one "
                                f"request{' with explain' if request.explain else ''} (send fewer queries, or a smaller k)")
    if request.mode is Mode.COLBERT and request.k > MAX_COLBERT_K:
        raise RequestError(413, f"k {request.k:,} with mode colbert; at most {MAX_COLBERT_K:,}")


# ---------------------------------------------------------------------------
# The application


def _json(status: int, data: Any, headers: dict | None = None) -> Response:
    return Response(json.dumps(data, ensure_ascii=False) + "\n", status_code=status, media_type=JSON_TYPE,
                    headers=headers)


def _error(status: int, message: str, headers: dict | None = None) -> Response:
    return _json(status, {"error": " ".join(message.split())}, headers)  # one line, whatever the message


def status_of(failure: Exception) -> int:
    """The HTTP status of a failure: the client's (400), busy or stopping (503), or the server's (500)."""
    if isinstance(failure, RequestError):
        return failure.status
    if isinstance(failure, (UsageError, NoColbertVectors)):
        return 400
    if isinstance(failure, (ServiceClosed, QueueFull, DeadlineExceeded, Unavailable)):
        return 503
    return 500


def check_token(token: str) -> str:
    """A bearer token as given, refused (ValueError) when empty, all whitespace, or not sendable in a header."""
    if not token.strip():
        raise ValueError("the token is empty: give a non-empty token, or none")
    if token != token.strip() or not all(33 <= ord(c) < 127 for c in token):
        raise ValueError("the token must be printable ASCII without spaces (what an Authorization header carries)")
    return token


def strict_json(body: bytes) -> Any:
    """A request body parsed as JSON, a key given twice in one object refused (400), as a repeated option is."""

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        data = {}
        for key, value in pairs:
            if key in data:
                raise RequestError(400, f"duplicate key {key!r} in the JSON body (each is taken once)")
            data[key] = value
        return data

    try:
        return json.loads(body, object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError) as error:
        raise RequestError(400, f"the body is not JSON ({error})") from None
    except RecursionError:
        raise RequestError(400, "the body is not JSON we take (nested too deeply)") from None


class _ClientGone(Exception):
    """The client hung up before its answer: nothing is sent, its remaining work is dropped."""


async def _client_gone(receive) -> None:
    """Returns when the client disconnects (the request's body, if any, already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _serialized(results, mode: Mode, limit: int) -> bytes:
    body = results_json(results, mode).encode("utf-8")
    if len(body) > limit:  # past the estimate: escaped characters (control characters, quotes) in the texts
        raise RequestError(413, f"the answer is {len(body):,} bytes; at most {limit:,} (ask for fewer queries "
                                "or a smaller k)")
    return body


def _serialized_embeddings(encoded, colbert: bool, limit: int) -> bytes:
    body = embeddings_json(encoded, colbert).encode("utf-8")
    if len(body) > limit:  # past the estimate: escaped characters in the ids
        raise RequestError(413, f"the answer is {len(body):,} bytes; at most {limit:,} (send fewer texts)")
    return body


def create_app(service: SearchService, index_label: str, token: str | None = None, limits: Limits | None = None,
               metrics: ServeMetrics | None = None) -> Starlette:
    """The ASGI application answering searches through `service`; `index_label` is the index path as given
    (what `info` prints as index_dir); with `token`, requests must carry it as a bearer token (an empty or
    blank one is a ValueError: never served to everyone by mistake). `limits` bounds answers and deadlines."""
    if token is not None:
        check_token(token)
    limits = limits or Limits()
    metrics = metrics or ServeMetrics()
    metrics.watch(service.queued_queries, service.queued_requests, lambda: service.served_identity(index_label))
    service.on_batch = metrics.observe_batch

    async def answer(http_request: Request, queries: list[Query], request: SearchRequest, arrived: float
                     ) -> Response:
        bound = answer_bound(queries, request, service.text_sizes())
        if bound > limits.max_answer_bytes:
            raise RequestError(413, f"the answer could be {bound:,} bytes (the index's longest text is "
                                    f"{service.text_sizes().longest_text:,} bytes); at most "
                                    f"{limits.max_answer_bytes:,} (ask for fewer queries or a smaller k)")
        deadline = arrived + limits.request_timeout
        try:
            future = service.submit(queries, request, deadline=deadline)
        except QueueFull as full:
            metrics.count_refused("queue full")
            return _error(503, str(full), {"Retry-After": str(full.retry_after)})
        # A request the index cannot answer (colbert without ColBERT vectors) fails in LocalIndex.search, alone:
        # the worker searches each distinct request separately.
        result = await _wait(http_request, future, deadline)
        body = await run_in_threadpool(_serialized, result.results, request.mode, limits.max_answer_bytes)
        # Server-Timing: what the search itself took, so a client can tell it from the network and queueing.
        return Response(body, media_type=JSON_TYPE,
                        headers={"X-Bge-Index-Generation": str(result.generation),
                                 "Server-Timing": f"search;dur={result.seconds * 1000:.3f}"})

    async def _wait(http_request: Request, future, deadline: float):
        waiting = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_client_gone(http_request.receive))
        try:
            done, _ = await asyncio.wait({waiting, gone}, timeout=max(0.0, deadline - time.monotonic()) + 1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting in done:
            return waiting.result()  # the answer, or the search's error
        waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it now
        service.cancel(future)
        if gone in done:
            metrics.count_refused("client gone")
            raise _ClientGone()
        raise DeadlineExceeded(f"not answered within {limits.request_timeout:g} s (the server is busy); try again")

    async def search_get(request: Request) -> Response:
        arrived = time.monotonic()
        params = request.query_params
        repeated = sorted({name for name in params.keys() if len(params.getlist(name)) > 1})
        if repeated:
            raise RequestError(400, f"{repeated[0]}: given twice")
        options = dict(params)
        if "q" not in options:
            raise RequestError(400, "missing q, the query text: /search?q=TEXT")
        text = _query_text(options.pop("q"), "q")
        search = search_request(options)
        check_size(1, search)
        return await answer(request, [Query("1", text)], search, arrived)

    async def search_post(request: Request) -> Response:
        arrived = time.monotonic()
        if request.query_params:
            raise RequestError(400, "POST /search takes its options in the JSON body, not the query string")
        queries, search = posted_queries(strict_json(await _read_body(request)))
        return await answer(request, queries, search, arrived)

    async def embed(request: Request) -> Response:
        arrived = time.monotonic()
        if request.query_params:
            raise RequestError(400, "POST /embed takes its fields in the JSON body, not the query string")
        ids, texts, colbert = posted_documents(strict_json(await _read_body(request)))
        # Refused before queueing, from the generation a request arriving now is answered from: ColBERT of an
        # index without it, and an answer that could pass the limit. The worker checks ColBERT again against
        # the generation it pins (a commit may come between).
        index = await run_in_threadpool(service.current)
        if colbert:
            check_colbert(index.manifest, index_label)
        encoder = service.encoder
        bound = embed_answer_bound(ids, texts, colbert, encoder.dense_dim, encoder.colbert_dim,
                                   embed_max_length(index.manifest))
        if bound > limits.max_answer_bytes:
            raise RequestError(413, f"the answer could be {bound:,} bytes; at most {limits.max_answer_bytes:,} "
                                    f"(send fewer or shorter texts{', or leave out colbert' if colbert else ''})")
        deadline = arrived + limits.request_timeout
        try:
            future = service.submit_embed(EmbedWork(ids, texts, colbert), deadline=deadline)
        except QueueFull as full:
            metrics.count_refused("queue full")
            return _error(503, str(full), {"Retry-After": str(full.retry_after)})
        result = await _wait(http_request=request, future=future, deadline=deadline)
        body = await run_in_threadpool(_serialized_embeddings, result.results, colbert, limits.max_answer_bytes)
        return Response(body, media_type=JSON_TYPE,
                        headers={"X-Bge-Index-Generation": str(result.generation),
                                 "Server-Timing": f"embed;dur={result.seconds * 1000:.3f}"})

    async def info(request: Request) -> Response:
        index = await run_in_threadpool(service.current)
        try:
            data = await run_in_threadpool(index_info, index.index_dir, index.manifest)
        except OSError as error:  # a run removed a file between the manifest and its size: ask again
            raise RequestError(503, f"the index is changing ({error.strerror}); try again") from None
        data["index_dir"] = index_label
        return Response(json.dumps(data, ensure_ascii=False, indent=2) + "\n", media_type=JSON_TYPE,
                        headers={"X-Bge-Index-Generation": str(index.manifest.generation)})

    async def healthz(request: Request) -> Response:
        # No look at the disk: a probe must answer at once, even while a new generation is being opened.
        health = service.health()
        return _json(200 if health["status"] == "ok" else 503, health)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def guarded(handler):
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (_ClientGone, ClientDisconnect):
                return Response(b"", status_code=CLIENT_GONE)  # never sent: the connection is gone
            except (RequestError, BgeIndexError) as failure:
                status = status_of(failure)
                for kind, reason in ((DeadlineExceeded, "deadline"), (ServiceClosed, "stopping"),
                                     (Unavailable, "unavailable")):
                    if isinstance(failure, kind):
                        metrics.count_refused(reason)
                # Refusals by design are counted in /metrics; Unavailable was logged once when it began.
                if status >= 500 and not isinstance(failure, (QueueFull, DeadlineExceeded, ServiceClosed,
                                                              Unavailable)):
                    log.error("%s %s: %s", request.method, request.url.path, failure)
                headers = {"Retry-After": "1"} if status == 503 else None
                return _error(status, str(failure), headers)

        return route

    async def http_error(request: Request, failure: HTTPException) -> Response:
        headers = dict(failure.headers or {})
        return _error(failure.status_code, str(failure.detail), headers)

    async def internal_error(request: Request, failure: Exception) -> Response:
        # Starlette's ServerErrorMiddleware logs the traceback (uvicorn.error) after this answer.
        return _error(500, "internal error (the server log has the details)")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(service.close)  # answer what is queued, then stop the worker

    app = Starlette(
        routes=[Route("/search", guarded(search_get), methods=["GET"]),
                Route("/search", guarded(search_post), methods=["POST"]),
                Route("/embed", guarded(embed), methods=["POST"]),
                Route("/info", guarded(info), methods=["GET"]),
                Route("/healthz", guarded(healthz), methods=["GET"]),
                Route("/metrics", guarded(metrics_text), methods=["GET"])],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    if token:
        app.add_middleware(BearerToken, token=token)
    app.add_middleware(Observed, metrics=metrics)  # outermost: refusals by the token count too
    app.state.service = service
    app.state.metrics = metrics
    return app


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) past MAX_BODY_BYTES without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"the body is {int(declared):,} bytes; at most {MAX_BODY_BYTES:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is over {MAX_BODY_BYTES:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Observed:
    """ASGI middleware: every HTTP answer counted in `metrics` by route, method and status, with its latency."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe_request(scope["path"], scope["method"], status[0], time.perf_counter() - started)


class BearerToken:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer TOKEN` (401 otherwise)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._allowed(scope):
            response = _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                              {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, credentials = given.partition(b" ")
        # compare_digest takes the same time whatever the first differing byte (no timing oracle).
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)


# ---------------------------------------------------------------------------
# Running it


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: localhost, 127.0.0.0/8, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); an address that cannot be used is a UsageError."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, protocol)
    except (OSError, UnicodeError) as error:
        raise InvalidOptionError(f"--host {host}: cannot listen there ({getattr(error, 'strerror', None) or error})") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError as error:
        listener.close()
        raise InvalidOptionError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None
    return listener


def make_server(app: Starlette, access_log: bool = True, limits: Limits | None = None) -> uvicorn.Server:
    """A uvicorn server for `app`, its connections guarded (connections.py); run it with
    `server.run(sockets=[bind(host, port)])`.

    Logging goes through the `logging` module (uvicorn's loggers and bge_index.serve): the caller decides where
    it is printed. On SIGINT/SIGTERM it stops taking connections, refuses what is queued (503 JSON), finishes
    the batch in hand, and stops (at most 30 s).
    """
    limits = limits or Limits()
    metrics = getattr(app.state, "metrics", None)
    service = getattr(app.state, "service", None)
    guard = ConnectionGuard(limits, EventReport(on_event=metrics.count_refused if metrics else None))
    config = uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="on", server_header=False,
                            timeout_graceful_shutdown=30, ws="none", http=guard.protocol_class(),
                            timeout_keep_alive=limits.keep_alive)
    return GuardedServer(config, guard, on_stop=service.stop_taking if service is not None else None)


def bound_address(listener: socket.socket) -> str:
    """`http://HOST:PORT` of a bound socket (IPv6 hosts in brackets)."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

