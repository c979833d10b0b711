"""The bounds of `bge-index serve`: every limit the server keeps, with its default and the reason for it.

Nothing here acts: `Limits` is read by the connection guard (connections.py:
connections, read and write timeouts), the search service (queued queries,
batch size) and the HTTP routes (deadlines, answer bytes). One object, so
that the command line, the tests and the README name the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one server takes at most; every request beyond is refused with a 4xx/5xx JSON answer.

        >>> Limits().max_queue
        4096
    """

    # Open connections. One past it gets a 503 JSON answer (Retry-After) and is closed: a flood of clients never
    # exhausts the process' file handles, which the index's memory maps and leases need too.
    max_connections: int = 512
    # Seconds a client has to send a request's line and headers, from its first byte (or from the connection's
    # start): a client dribbling a byte now and then (slowloris) is answered 408 and closed.
    header_timeout: float = 10.0
    # Bytes of a request's line and headers; past it, 431 and the connection is closed.
    max_header_bytes: int = 64 << 10
    # Seconds a client has to send a request's body once its headers are in.
    body_timeout: float = 30.0
    # Seconds an idle keep-alive connection stays open between requests.
    keep_alive: float = 5.0
    # Seconds a client may go without reading any of its answer before the connection is dropped.
    write_timeout: float = 30.0
    # Queries waiting to be answered (of all requests together). A request that would go past it gets 503 with
    # Retry-After (unless nothing waits: a request alone is always taken).
    max_queue: int = 4096
    # Seconds from a request's arrival to its answer; past it the request gets 503 and its remaining work is dropped.
    request_timeout: float = 60.0
    # Bytes of one answer's JSON: a request whose hits could be larger (from the index's longest id and text)
    # gets 413 before any search, and an answer that turns out larger gets 413 instead of being sent.
    max_answer_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_header_bytes", "max_queue", "max_answer_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("header_timeout", "body_timeout", "keep_alive", "write_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
