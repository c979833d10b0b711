"""The HTTP face of `bge-index serve`: routes, request parsing, bearer tokens, JSON errors, and the server.

Built on Starlette (routing, requests) and run by uvicorn (HTTP/1.1): the
optional `serve` extra, `pip install 'bge-index[serve]'`. Every answer is
JSON, and the search answers are byte for byte what the CLI prints:

    GET  /search?q=TEXT&k=10&mode=hybrid   = bge-index search INDEX "TEXT" -k 10 --mode hybrid --format json
    POST /search {"queries": [{"id": "q1", "text": "..."}], "k": 10, "mode": "dense"}
                                           = bge-index search INDEX --queries FILE ... --format json
    GET  /info                             = bge-index info INDEX --format json
    GET  /healthz                          {"status": "ok", "generation": N, "rows": N}

Search options go by their flag names (`k` or `top-k`, `mode`,
`dense-weight`, `sparse-weight`, `colbert-weight`, `fusion`, `normalize`,
`explain`, `group-by-doc`: query.SEARCH_OPTIONS, whose declaration gives
each its parsing by type, range and default); an unknown one is an error,
never ignored.
A bad request gets a 4xx status and one line of JSON, `{"error": "..."}`;
a header `X-Bge-Index-Generation` names the generation that answered, and
`Server-Timing: search;dur=MS` what the search of the batch it was answered
in took (encode + score; alone, that is this request's own).
With a token, every route but /healthz wants `Authorization: Bearer TOKEN`
(compared in constant time; the token is never logged).

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
from enum import Enum
from typing import Any

from bge_index.errors import BgeIndexError, ExtraUnavailableError, InvalidOptionError, NoColbertVectors, UsageError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as missing:  # pragma: no cover - exercised only without the extra
    raise ExtraUnavailableError(f"bge-index serve needs the serve extra: pip install 'bge-index[serve]' "
                                f"({missing.name} is not installed)") from None

from bge_index.input.types import Skipped, SkipReason
from bge_index.input.formats import QUERY_FIELDS, record_to_document
from bge_index.store.info import index_info
from bge_index.search.options import SearchOption, describe_range
from bge_index.search.query import SEARCH_OPTIONS as DECLARED_OPTIONS
from bge_index.search.query import Mode, Query, SearchRequest, request_from_options, results_json
from bge_index.serve.search_service import SearchService, ServiceClosed

log = logging.getLogger("bge_index.serve")

MAX_BODY_BYTES = 1 << 20  # a POST /search body; 1 MiB holds thousands of queries
MAX_QUERIES = 1024  # queries in one POST
MAX_K = 10_000
MAX_HITS = 100_000  # queries x k in one request: each hit may carry its text, so this bounds a response's size
MAX_EXPLAINED_HITS = 1_000  # with explain, each hit costs a walk over its query's tokens
MAX_COLBERT_K = 1_000  # colbert re-ranks 10 x k candidates, reading each one's token vectors
JSON_TYPE = "application/json"
OPEN_PATHS = frozenset({"/healthz"})  # answered without the token: load balancers probe it


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
    return request_from_options(values, with_text=True)


def _query_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise RequestError(400, f"{where}: the text must be a string")
    if not text.strip():
        raise RequestError(400, f"{where}: the query is empty: give the text to search for")
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
    """The HTTP status of a failure: the client's (400), busy (503), or the server's (500)."""
    if isinstance(failure, RequestError):
        return failure.status
    if isinstance(failure, (UsageError, NoColbertVectors)):
        return 400
    if isinstance(failure, ServiceClosed):
        return 503
    return 500


def create_app(service: SearchService, index_label: str, token: str | None = None) -> Starlette:
    """The ASGI application answering searches through `service`; `index_label` is the index path as given
    (what `info` prints as index_dir); with `token`, requests must carry it as a bearer token."""

    async def answer(queries: list[Query], request: SearchRequest) -> Response:
        # A request the index cannot answer (colbert without ColBERT vectors) fails in LocalIndex.search, alone:
        # the worker searches each distinct request separately.
        answer = await asyncio.wrap_future(service.submit(queries, request))
        # Server-Timing: what the search itself took, so a client can tell it from the network and queueing.
        body = await run_in_threadpool(results_json, answer.results, request.mode)  # big answers: off the loop
        return Response(body, media_type=JSON_TYPE,
                        headers={"X-Bge-Index-Generation": str(answer.generation),
                                 "Server-Timing": f"search;dur={answer.seconds * 1000:.3f}"})

    async def search_get(request: Request) -> Response:
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
        return await answer([Query("1", text)], search)

    async def search_post(request: Request) -> Response:
        if request.query_params:
            raise RequestError(400, "POST /search takes its options in the JSON body, not the query string")
        body = await _read_body(request)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as error:
            raise RequestError(400, f"the body is not JSON ({error})") from None
        except RecursionError:
            raise RequestError(400, "the body is not JSON we take (nested too deeply)") from None
        queries, search = posted_queries(data)
        return await answer(queries, search)

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
        if not service.alive():
            return _json(503, {"status": "stopped", "error": "the search worker has stopped"})
        manifest = service.index.manifest
        return _json(200, {"status": "ok", "generation": manifest.generation, "rows": manifest.documents})

    def guarded(handler):
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestError, BgeIndexError) as failure:
                status = status_of(failure)
                if status >= 500:
                    log.error("%s %s: %s", request.method, request.url.path, failure)
                return _error(status, str(failure))

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
                Route("/info", guarded(info), methods=["GET"]),
                Route("/healthz", guarded(healthz), methods=["GET"])],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    if token:
        app.add_middleware(BearerToken, token=token)
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


def make_server(app: Starlette, access_log: bool = True) -> uvicorn.Server:
    """A uvicorn server for `app`; run it with `server.run(sockets=[bind(host, port)])`.

    Logging goes through the `logging` module (uvicorn's loggers): the caller decides where it is printed.
    On SIGINT/SIGTERM it stops taking connections and finishes the requests it has (at most 30 s).
    """
    config = uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="on", server_header=False,
                            timeout_graceful_shutdown=30, ws="none")
    return uvicorn.Server(config)


def bound_address(listener: socket.socket) -> str:
    """`http://HOST:PORT` of a bound socket (IPv6 hosts in brackets)."""
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

