"""The server's connections: how many may be open, how long a client may take to send or read, and how that is logged.

uvicorn bounds neither the connections it accepts nor the time a client
takes to send its headers (it has no header timeout for httptools, and its
`limit_concurrency` answers plain text, and only once a request is parsed).
`guarded_protocol` is its httptools protocol with those bounds added
(Limits):

- a connection past `max_connections` is answered at once with a 503 JSON
  answer (Retry-After) and closed, so a flood of sockets never exhausts the
  file handles that the index's memory maps need;
- a request's line and headers must arrive within `header_timeout` of its
  first byte (or of the connection's start), in at most `max_header_bytes`;
  its body within `body_timeout`; otherwise 408 (431) JSON and the
  connection is closed: a client sending a header byte now and then
  (slowloris) holds a handle for seconds, not for ever;
- an answer the client does not read for `write_timeout` seconds is dropped.

`EventReport` logs these as one line per minute at most, with counts (the
first at once), never one line per socket; `GuardedServer` flushes it, turns
asyncio's "accept out of file handles" tracebacks into counts too, and calls
`on_stop` when a stop begins (before uvicorn waits for the requests in hand).
Measured choice (README): uvicorn with httptools stays, guarded. hypercorn's
read_timeout is per read (a client sending a byte every half second was
never closed), it has no connection limit, and it answered a tiny route at
about half the rate. The guard relies on uvicorn's protocol internals
(cycle, pipeline, server_state): tests/test_serve_limits.py holds it to its
behaviour with real sockets on 127.0.0.1, so an upgrade that breaks it fails
there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bge_index.serve.limits import Limits

log = logging.getLogger("bge_index.serve")

REPORT_INTERVAL = 60.0  # seconds between two report lines at most
REFUSED_LINGER = 2.0  # seconds a refused connection stays open for its client to read the 503


class EventReport:
    """Counts of connection events (slow clients, refusals), logged as one line per interval: the first event at
    once, later ones summed into the next line. Thread-safe; `flush_if_due` is called about every 0.1 s."""

    def __init__(self, logger: logging.Logger = log, interval: float = REPORT_INTERVAL,
                 on_event: Callable[[str], None] | None = None):
        self._logger = logger
        self._interval = interval
        self._counts: Counter = Counter()
        self._last: float | None = None
        self._since = time.time()
        self._lock = threading.Lock()
        self.on_event = on_event  # e.g. a metrics counter, called once per event

    def count(self, kind: str) -> None:
        """Record one event of `kind` (a phrase: "slow headers", "over the connection limit")."""
        if self.on_event is not None:
            self.on_event(kind)
        with self._lock:
            self._counts[kind] += 1
            if self._last is None or time.monotonic() - self._last >= self._interval:
                self._log_locked()

    def flush_if_due(self) -> None:
        """Log what was counted since the last line, when the interval has passed."""
        with self._lock:
            if self._counts and self._last is not None and time.monotonic() - self._last >= self._interval:
                self._log_locked()

    def _log_locked(self) -> None:
        since = time.strftime("%H:%M:%S", time.localtime(self._since))
        parts = ", ".join(f"{count:,} {kind}" for kind, count in sorted(self._counts.items()))
        self._logger.warning("connections closed or refused since %s: %s (slow clients are closed; at most "
                             "one such line a minute)", since, parts)
        self._counts.clear()
        self._last = time.monotonic()
        self._since = time.time()


def raw_json_response(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 answer with a one-line JSON error and `Connection: close`, for the protocol to write."""
    body = (json.dumps({"error": message}, ensure_ascii=False) + "\n").encode("utf-8")
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class ConnectionGuard:
    """What the guarded protocols of one server share: the limits, the report, and the connections refused
    (each held open a moment so its client can read the 503)."""

    def __init__(self, limits: Limits, report: EventReport | None = None):
        self.limits = limits
        self.report = report or EventReport()
        self.refused: set = set()

    def protocol_class(self) -> type:
        """uvicorn's httptools protocol bound to this guard (pass it as `uvicorn.Config(http=...)`)."""
        return guarded_protocol(self)


def guarded_protocol(guard: ConnectionGuard) -> type:
    """A subclass of uvicorn's HttpToolsProtocol that keeps `guard.limits` (see the module docstring)."""
    limits, report = guard.limits, guard.report

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._timer: asyncio.TimerHandle | None = None
            self._refused = False
            self._header_bytes = 0  # bytes of the request being read, until its headers are complete
            self._reading_headers = False
            self._write_watch: asyncio.TimerHandle | None = None
            self._write_left = 0

        # -- connections past the limit ------------------------------------------------------------------

        def connection_made(self, transport) -> None:
            if len(self.server_state.connections) >= limits.max_connections:
                self._refuse(transport)
                return
            super().connection_made(transport)
            self._expect_headers()

        def _refuse(self, transport) -> None:
            self._refused = True
            self.transport = transport
            report.count("over the connection limit")
            if len(guard.refused) >= limits.max_connections:  # a flood: no handle is kept even for a moment
                transport.abort()
                return
            guard.refused.add(self)
            transport.write(raw_json_response(503, "Service Unavailable", f"too many connections (at most "
                                              f"{limits.max_connections:,}); try again", retry_after=1))
            if transport.can_write_eof():
                transport.write_eof()
            self._timer = self.loop.call_later(REFUSED_LINGER, transport.close)

        def eof_received(self):
            if self._refused:
                self.transport.close()
            return super().eof_received()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._write_watch is not None:
                self._write_watch.cancel()
                self._write_watch = None
            if self._refused:
                guard.refused.discard(self)
                return
            super().connection_lost(exc)

        # -- reading: headers and body in bounded time and size ------------------------------------------

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # read and dropped, so that closing sends no reset before the 503 is read
            if self._timer is None and not self._reading_headers and (self.cycle is None
                                                                      or self.cycle.response_complete):
                self._expect_headers()  # bytes between requests (even a lone CRLF) start the header clock
            if self._reading_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._reading_headers and self._header_bytes > limits.max_header_bytes \
                    and not self.transport.is_closing():
                self._answer_and_close(431, "Request Header Fields Too Large",
                                       f"the request's headers are over {limits.max_header_bytes:,} bytes",
                                       "headers too large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._reading_headers:
                self._reading_headers = True
                self._header_bytes = 0
            if self._timer is None:
                self._timer = self.loop.call_later(limits.header_timeout, self._headers_late)

        def on_headers_complete(self) -> None:
            self._reading_headers = False
            self._disarm()
            if self.transport.is_closing():
                return
            super().on_headers_complete()
            self._timer = self.loop.call_later(limits.body_timeout, self._body_late)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _expect_headers(self) -> None:
            self._reading_headers = True
            self._header_bytes = 0
            self._disarm()
            self._timer = self.loop.call_later(limits.header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _headers_late(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._header_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
                report.count("idle before a request")  # nothing asked: closed without an answer
                self.transport.close()
                return
            self._answer_and_close(408, "Request Timeout", f"the request's headers did not arrive within "
                                   f"{limits.header_timeout:g} s", "slow headers")

        def _body_late(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self.pipeline:  # a pipelined request waits for the one before it: its body is not being read
                self._timer = self.loop.call_later(limits.body_timeout, self._body_late)
                return
            self._answer_and_close(408, "Request Timeout", f"the request's body did not arrive within "
                                   f"{limits.body_timeout:g} s", "slow body")

        def _answer_and_close(self, status: int, reason: str, message: str, kind: str) -> None:
            report.count(kind)
            self._disarm()
            cycle = self.cycle
            if cycle is None or not cycle.response_started:
                self.transport.write(raw_json_response(status, reason, message))
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the application hears http.disconnect; what it sends is dropped
                cycle.message_event.set()
            self.transport.close()

        # -- writing: an answer the client does not read is dropped ---------------------------------------

        def pause_writing(self) -> None:
            if self._refused:
                return
            super().pause_writing()
            if self._write_watch is None:
                self._write_left = self.transport.get_write_buffer_size()
                self._write_watch = self.loop.call_later(limits.write_timeout, self._write_check)

        def resume_writing(self) -> None:
            if self._refused:
                return
            super().resume_writing()
            if self._write_watch is not None:
                self._write_watch.cancel()
                self._write_watch = None

        def _write_check(self) -> None:
            self._write_watch = None
            left = self.transport.get_write_buffer_size()
            if self.transport.is_closing() or left == 0:
                return
            if left >= self._write_left:  # nothing read for write_timeout seconds
                report.count("slow readers")
                self.transport.abort()
                return
            self._write_left = left
            self._write_watch = self.loop.call_later(limits.write_timeout, self._write_check)

    return GuardedHttpToolsProtocol


class GuardedServer(uvicorn.Server):
    """uvicorn's server with the guard's report flushed on its tick, accept failures counted instead of logged
    each time, and `on_stop` called as a stop begins."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard, on_stop: Callable[[], None] | None = None):
        super().__init__(config)
        self.guard = guard
        self.on_stop = on_stop

    async def startup(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop, context) -> None:
            if "accept" in str(context.get("message", "")) and isinstance(context.get("exception"), OSError):
                self.guard.report.count("accept failures (out of file handles)")
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        await super().startup(sockets=sockets)

    async def on_tick(self, counter: int) -> bool:
        self.guard.report.flush_if_due()
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        if self.on_stop is not None:
            self.on_stop()  # e.g. refuse what is queued (503 JSON) before uvicorn waits for the requests in hand
        await super().shutdown(sockets=sockets)
