"""`bge-index serve`: keep an index's model loaded and answer searches over HTTP (JSON).

This module owns the command's flags (the server's bounds among them:
serve/limits.py), the refusal of a non-loopback address without
--allow-remote and of an empty token from any source, the file-handle limit
(raised to the hard limit; connections bounded below it), the server's log
lines on stderr (ISO 8601 times; the token is never among them), and what a
stop looks like: SIGTERM or Ctrl-C while serving stop taking connections,
refuse what is queued (503 JSON), finish the batch in hand, and exit 0;
while the model loads they stop it at once (143, 130). The routes and the
batching are the library's (http_api.py, search_service.py); the model loads
here, inside the command, as in `search`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Annotated, Optional

import typer

from bge_index.cli.display import stderr, warning
from bge_index.cli.options import Device, Dtype, IndexDir, QueryDtype, QueryModel
from bge_index.errors import InvalidOptionError
from bge_index.search.query import Query, SearchRequest

DEFAULT_PORT = 8765
TOKEN_ENV = "BGE_INDEX_SERVE_TOKEN"
HANDLES_RESERVE = 256  # file handles kept for the model, logs, and the index's files, besides connections


class _LogFormat(logging.Formatter):
    """`bge-index: 2026-11-30T12:00:00+00:00 MESSAGE`, the format of every log line bge-index prints."""

    def format(self, record: logging.LogRecord) -> str:
        from bge_index.cli.display import log_time

        return f"bge-index: {log_time()} {super().format(record)}"


def _log_to_stderr(access_log: bool) -> None:
    handler = logging.StreamHandler(stderr.file)
    handler.setFormatter(_LogFormat("%(message)s"))
    # uvicorn's own start/stop chatter (INFO) is left out: the "serving" and "stopped" lines say it.
    for name, level in (("bge_index", logging.INFO), ("uvicorn.error", logging.WARNING), ("uvicorn.access", logging.INFO)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = not access_log


def serve(
    index_dir: IndexDir,
    host: Annotated[str, typer.Option(envvar="BGE_INDEX_SERVE_HOST",
                                      help="Address to listen on; one other than loopback needs --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, envvar="BGE_INDEX_SERVE_PORT",
                                      help="Port to listen on (0: any free port, printed at start).")] = DEFAULT_PORT,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Listen on an address other machines can reach.")] = False,
    token: Annotated[Optional[str], typer.Option(envvar=TOKEN_ENV, show_default=False,
                                                 help=f"Bearer token every request but /healthz must carry. Prefer "
                                                      f"the {TOKEN_ENV} variable: an argument shows in `ps`.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=1024, help="Queries answered together at most; a bigger request "
                                                                  "is answered over several batches, sharing each "
                                                                  "with the requests waiting.")] = 64,
    max_queue: Annotated[int, typer.Option(min=1, help="Queries waiting at most; a request past it gets 503 "
                                                       "with Retry-After.")] = 4096,
    max_connections: Annotated[int, typer.Option(min=1, help="Open connections at most; one more gets 503 "
                                                             "and is closed.")] = 512,
    header_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a client has to send a request's "
                                                                "headers (slow ones get 408).")] = 10.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a client has to send a request's "
                                                              "body.")] = 30.0,
    request_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds from a request's arrival to its "
                                                                 "answer; past it, 503 and its work is "
                                                                 "dropped.")] = 60.0,
    max_answer_mb: Annotated[float, typer.Option(min=0.01, help="MiB of one answer at most, judged before the "
                                                                "search from the index's longest text "
                                                                "(413 beyond).")] = 32.0,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log each request (method, path, status).")] = True,
    pack_codes: Annotated[Optional[bool], typer.Option("--pack-codes/--no-pack-codes", show_default=False,
                                                       help="Keep a packed copy of the int8 codes for every query "
                                                            "(in place of the mapped codes in memory; faster lone "
                                                            "queries and batches). Default: when they fit in a "
                                                            "quarter of the memory.")] = None,
    model: QueryModel = None,
    device: Device = "auto",
    dtype: QueryDtype = Dtype("auto"),
) -> None:
    """Answer searches over HTTP with the model loaded once: GET /search?q=..., POST /search, POST /embed, GET /info,
    GET /healthz.

    Answers are what `search --format json`, `embed --index` (as a JSON list) and `info --format json` print. A run that commits a new
    generation is served from the next request on, without a restart.
    """
    from bge_index.serve import http_api  # needs the serve extra: a clear error before the model loads

    if not http_api.is_loopback(host) and not allow_remote:
        raise InvalidOptionError(f"--host {host} can be reached from other machines: add --allow-remote "
                                 f"(and set {TOKEN_ENV} so that only your clients can search)")
    if token is None and TOKEN_ENV in os.environ:
        token = os.environ[TOKEN_ENV]  # set but empty: click reads it as unset, and would serve everyone
    if token is not None:
        token = token.strip()  # a token read from a file or an EnvironmentFile often ends in a newline
        if not token:
            raise InvalidOptionError(f"the token ({TOKEN_ENV} or --token) is empty: set one, or unset "
                                     f"{TOKEN_ENV} to serve without one")
        try:
            http_api.check_token(token)
        except ValueError as problem:
            raise InvalidOptionError(f"the token ({TOKEN_ENV} or --token): {problem}") from None
    try:
        limits = http_api.Limits(max_connections=max_connections, header_timeout=header_timeout,
                                 body_timeout=body_timeout, max_queue=max_queue, request_timeout=request_timeout,
                                 max_answer_bytes=int(max_answer_mb * (1 << 20)))
    except ValueError as problem:
        raise InvalidOptionError(str(problem)) from None
    listener = http_api.bind(host, port)  # before the model loads: a port in use fails at once (exit 2)

    _log_to_stderr(access_log)
    log = logging.getLogger("bge_index.serve")
    stopped_by: list[int] = []
    loading = [True]

    def on_signal(number: int, frame) -> None:
        # While loading: stop at once (exit 130 for Ctrl-C, 143 for SIGTERM). While serving, uvicorn holds the
        # signals, stops gracefully, then re-raises them here: recorded, so the command exits 0.
        stopped_by.append(number)
        if loading[0]:
            interrupt = KeyboardInterrupt()
            interrupt.signal_number = number  # run_library_call exits 128 + this
            raise interrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _serve(index_dir, listener, host, token, max_batch, limits, access_log, model, device, dtype.value,
               stopped_by, loading, log, pack_codes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()


def _serve(index_dir, listener, host, token, max_batch, limits, access_log, model, device, dtype, stopped_by,
           loading, log, pack_codes: bool | None = None) -> None:
    """Load, warm up, serve until a signal; the part of `serve` that runs with its signal handler in place."""
    from bge_index.serve import http_api  # imported (and its extra checked) by `serve` already
    from bge_index.search.local_index import LocalIndex
    from bge_index.serve.file_watch import index_files
    from bge_index.serve.search_service import SearchService

    # The generation served is the one the manifest names when the service starts, not this one: a commit made
    # while the model loads is served (search_service.py looks again before the first answer).
    index = LocalIndex(index_dir, model=model, device=device, dtype=dtype)
    for message in index.notes:
        warning(message)
    # Queries, lone and batched, read packed int8 codes (BENCHMARKS.md): by default when they fit in a quarter of
    # the memory; --pack-codes whatever their size, --no-pack-codes never. Later generations do as this one.
    if pack_codes is not False:
        started = time.monotonic()
        packed = index.searcher.pack_codes(budget=None if pack_codes is None else sys.maxsize)
        if packed:
            log.info("packed %.1f MiB of int8 codes in %.1f s", packed / (1 << 20),
                     time.monotonic() - started)
    # One search before the first client: the first request should not pay for kernel selection.
    index.search([Query("warm-up", "warm up")], SearchRequest(k=1))
    limits = _within_file_handles(limits, len(index_files(index.index_dir, index.manifest)), log)
    manifest, model_name = index.manifest, index.encoder.identity.name
    service = SearchService(index, max_batch=max_batch, max_queue=limits.max_queue)  # `index` is its own now
    app = http_api.create_app(service, str(index_dir), token=token, limits=limits)
    server = http_api.make_server(app, access_log=access_log, limits=limits)

    if not http_api.is_loopback(host) and not token:
        warning(f"no token: anyone who can reach {host}:{listener.getsockname()[1]} can search this index")
    log.info("serving %s (generation %d, %s rows, model %s) at %s%s", index_dir, manifest.generation,
             f"{manifest.documents:,}", model_name, http_api.bound_address(listener),
             ", bearer token required" if token else "")
    loading[0] = False
    try:
        server.run(sockets=[listener])
    finally:
        # A batch still running after uvicorn's 30 s grace is not waited for (the worker is a daemon thread).
        service.close(timeout=5)
    if not server.started:
        raise typer.Exit(1)
    reason = signal.Signals(stopped_by[0]).name if stopped_by else "a stop request"
    log.info("stopped (%s)", reason)


def _within_file_handles(limits, index_files: int, log):
    """`limits` with max_connections below the file-handle limit (raised to its hard limit first): the index's
    files are each mapped and leased, twice over while a new generation opens, and must never go short."""
    import dataclasses
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return limits
    room = soft - HANDLES_RESERVE - 4 * index_files
    if limits.max_connections <= room:
        return limits
    fitted = max(16, room)
    log.warning("--max-connections %d lowered to %d: the process may open %d files (ulimit -n), and the index "
                "needs %d", limits.max_connections, fitted, soft, 4 * index_files)
    return dataclasses.replace(limits, max_connections=fitted)
