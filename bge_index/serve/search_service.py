"""A long-lived searcher: one index's newest generation and one thread that answers queued searches in batches.

`bge-index serve` keeps the model loaded and the index memory-mapped; this
module owns what that needs beyond `LocalIndex`:

- **Batching.** Callers `submit(queries, request)` from any thread and get a
  `Future`. One worker thread takes what is waiting (whole submissions, until
  they reach `max_batch` queries; one submission is never split), groups it
  by `SearchRequest`, and answers each group with one
  `LocalIndex.search` call, so concurrent queries share the pass over the
  dense matrix (search.py scores queries in fixed blocks of 16). A query's answer
  does not depend on its company: each query is encoded alone and unpadded,
  and scored in a fixed-width block (see local_index.encode_queries), so
  the bits are those of `bge-index search` with that one query.
- **New generations.** Before each batch the worker compares the manifest's
  (inode, mtime, size) with the one it opened; when a run has committed, it
  opens the new generation (`LocalIndex.reopen`) and answers the whole batch
  from it. A batch is never answered from two generations, and a request
  that arrives after a commit sees that commit. If the new generation cannot
  be opened (damaged, half-written by hand), the old one keeps serving and
  the failure is logged; the next change is tried again.

    service = SearchService(LocalIndex(Path("notes-index")))
    future = service.submit([Query("1", "sourdough starter")], SearchRequest(k=5))
    [result] = future.result().results
    service.close()

No torch here: the model runs inside `LocalIndex`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from bge_index.errors import BgeIndexError
from bge_index.search.local_index import LocalIndex
from bge_index.store.names import MANIFEST_FILE
from bge_index.search.query import Query, QueryResult, SearchRequest

log = logging.getLogger("bge_index.serve")

MAX_BATCH = 64  # queries answered together at most; more waiting ones go in the next batch
_STOP = object()


class ServiceClosed(BgeIndexError):
    """The service is stopping and takes no more searches."""


@dataclass(frozen=True)
class Answer:
    """What a submitted search's future gives: one result per query, the generation that answered, and the
    seconds its search (encode + score + read hits, for the whole batch it was part of) took."""

    results: list[QueryResult]
    generation: int
    seconds: float = 0.0


@dataclass
class _Pending:
    """One submitted search: its queries, its request, and the future its caller waits on."""

    queries: list[Query]
    request: SearchRequest
    future: Future = field(default_factory=Future)


def _manifest_key(index_dir) -> tuple[int, int, int, int] | None:
    """What changes when a run commits (the manifest is replaced by a rename), or None if it cannot be stat'ed."""
    try:
        info = os.stat(index_dir / MANIFEST_FILE)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


class SearchService:
    """Answers searches on one worker thread, in batches, always from one committed generation."""

    def __init__(self, index: LocalIndex, max_batch: int = MAX_BATCH):
        self._index = index
        self._key = _manifest_key(index.index_dir)
        self._refresh_lock = threading.Lock()
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._submit_lock = threading.Lock()
        self._in_flight: list[_Pending] = []  # the batch being answered
        self.batches = 0  # batches answered so far (fewer than requests when requests wait together)
        self._worker = threading.Thread(target=self._work, name="bge-index-search", daemon=True)
        self._worker.start()

    # -- what callers use ------------------------------------------------------

    def submit(self, queries: Sequence[Query], request: SearchRequest) -> Future:
        """Queue a search; the future's result is an `Answer` (or the search's error)."""
        pending = _Pending(list(queries), request)
        with self._submit_lock:  # never queued after the worker's last look at the queue
            if self._closed:
                raise ServiceClosed("the server is stopping")
            self._queue.put(pending)
        return pending.future

    @property
    def index(self) -> LocalIndex:
        """The generation being served, as last opened (no look at the disk)."""
        return self._index

    def alive(self) -> bool:
        """Whether the worker is still answering."""
        return self._worker.is_alive() and not self._closed

    def current(self) -> LocalIndex:
        """The newest committed generation (opened now if a run has committed since the last look)."""
        with self._refresh_lock:
            key = _manifest_key(self._index.index_dir)
            if key is not None and key != self._key:
                try:
                    self._index = self._index.reopen()
                    self._key = key
                    log.info("serving generation %d (%d rows)", self._index.manifest.generation,
                             self._index.manifest.documents)
                except BgeIndexError as failure:
                    # Keep answering from the generation we have; try again when the manifest changes again.
                    self._key = key
                    log.error("cannot open the new generation, still serving generation %d: %s",
                              self._index.manifest.generation, failure)
            return self._index

    def close(self, timeout: float | None = None) -> None:
        """Answer what is queued, then stop the worker (idempotent); wait at most `timeout` seconds for it."""
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._worker.join(timeout)

    # -- the worker ------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._serve_queue()
        finally:
            # Whatever stopped the loop, nobody may wait for ever: the batch in hand and what is queued are refused.
            with self._submit_lock:
                self._closed = True
            for pending in self._in_flight:
                if not pending.future.done():
                    pending.future.set_exception(ServiceClosed("the server is stopping"))
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP and item.future.set_running_or_notify_cancel():
                    item.future.set_exception(ServiceClosed("the server is stopping"))

    def _serve_queue(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            size = len(item.queries)
            while size < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)  # after this batch
                    break
                batch.append(more)
                size += len(more.queries)
            self._in_flight = batch
            try:
                self._answer(batch)
            except Exception:  # noqa: BLE001 - a bug here must not stop the server answering
                log.exception("internal error while answering a batch")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RuntimeError("internal error"))

    def _answer(self, batch: list[_Pending]) -> None:
        """Answer a batch from one generation: one search per distinct request."""
        # A caller that gave up (client gone) cancelled its future: skip it; the rest can no longer be cancelled.
        batch = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.batches += 1
        try:
            index = self.current()
        except Exception as failure:  # noqa: BLE001 - every caller must hear back
            for pending in batch:
                pending.future.set_exception(failure)
            return
        groups: dict[SearchRequest, list[_Pending]] = {}
        for pending in batch:
            groups.setdefault(pending.request, []).append(pending)
        for request, members in groups.items():
            queries = [q for pending in members for q in pending.queries]
            started = time.perf_counter()
            try:
                results: list[QueryResult] = index.search(queries, request)
            except Exception as failure:  # noqa: BLE001 - handed to the callers, who report it
                for pending in members:
                    pending.future.set_exception(failure)
                continue
            seconds = time.perf_counter() - started
            start = 0
            for pending in members:
                pending.future.set_result(Answer(results[start:start + len(pending.queries)],
                                                 index.manifest.generation, seconds))
                start += len(pending.queries)
