"""A long-lived searcher: one index's newest generation and one thread that answers queued searches in batches.

`bge-index serve` keeps the model loaded and the index memory-mapped; this
module owns what that needs beyond `LocalIndex`:

- **Batching, fair.** Callers `submit(queries, request)` from any thread and
  get a `Future`. One worker thread answers batches of at most `max_batch`
  queries. A request bigger than that is answered over several batches, a
  share of each: the oldest request waiting gets at least a quarter of the
  batch (so every request finishes, oldest first), the rest goes to the
  requests with the fewest queries left (a one-query GET is in the next
  batch, whatever big POSTs wait). A short request therefore waits for at
  most the batch in progress. Each batch's queries are grouped by
  `SearchRequest` and each group is one `LocalIndex.search` call, so
  queries waiting together share the pass over the dense matrix. A query's
  answer does not depend on its company: each query is encoded alone and
  unpadded, and scored in a fixed-width block (see
  local_index.encode_queries), so the bits are those of `bge-index search`
  with that one query, in whatever batches a request is split.
- **Bounded.** At most `max_queue` queries wait (`QueueFull`, with a
  Retry-After estimated from the recent rate, past it; a request is always
  taken when nothing waits); the last `max_batch` places are kept for short
  requests, so that GETs still get in while big POSTs are refused. A
  request past its deadline fails with
  `DeadlineExceeded`, and one `cancel`led (its client hung up) is dropped:
  neither is searched any further.
- **Generations** (generations.py): each request is answered from the
  newest generation that could be opened when it arrived, prepared off this
  worker, and all of one request from one generation (a generation stays
  open while a request pinned to it runs). Before each batch, the files of
  the generations it uses are checked; one that changed is not searched
  (its requests get `Unavailable`).
- **Stopping.** `stop_taking()` (SIGTERM) refuses what waits with
  `ServiceClosed` and new requests too, and lets the batch in hand finish;
  `close()` answers what is queued, then stops.
- **Embedding** (POST /embed, embedding.py). `submit_embed(work)` queues
  texts to encode as documents with the same model, in the same queue (each
  text counts as a query against `max_queue`), under the same deadlines,
  cancellation, generations and stop. The worker does an embedding a step
  at a time (a group's tokenisation or one forward pass), taking turns with
  the search batches, oldest embedding first: a search waits for at most
  one step, and an embedding is never split other than `bge-index embed`
  splits it (its bits are the command's).

    service = SearchService(LocalIndex(Path("notes-index")))
    future = service.submit([Query("1", "sourdough starter")], SearchRequest(k=5))
    [result] = future.result().results
    service.close()

No torch here: the model runs inside `LocalIndex`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from bge_index.errors import BgeIndexError
from bge_index.search.local_index import LocalIndex
from bge_index.search.query import Query, QueryResult, SearchRequest
from bge_index.serve.answer_size import TextSizes
from bge_index.serve.embedding import EmbedWork
from bge_index.serve.generations import Generation, Generations, ManifestKey, Unavailable, manifest_key

log = logging.getLogger("bge_index.serve")

MAX_BATCH = 64  # queries answered together at most
OLDEST_SHARE = 4  # the oldest request waiting gets at least 1/OLDEST_SHARE of every batch
OVERLOADED_FOR = 5.0  # seconds health() says "overloaded" after a request was refused for a full queue
RATE_MEMORY = 0.2  # weight of the newest batch in the queries-per-second estimate behind Retry-After


class ServiceClosed(BgeIndexError):
    """The service is stopping and takes no more searches."""


class QueueFull(BgeIndexError):
    """Too many queries wait already; `retry_after` is the seconds after which to try again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(BgeIndexError):
    """A request not answered by its deadline; what was left of it is not searched."""


@dataclass(frozen=True)
class Answer:
    """What a submitted search's future gives: one result per query, the generation that answered, and the
    seconds its searches (encode + score + read hits, for the whole batches it was part of) took. For an
    embedding (`submit_embed`): one (rows, row number) per text, in input order (embedding.embedding_record
    makes its record), and the seconds its steps took."""

    results: list
    generation: int
    seconds: float = 0.0


@dataclass(eq=False)
class _Pending:
    """One submitted search: its queries, request and future, when it arrived and must be answered by, the
    manifest key it saw, and how far it has got. An embedding has `embed` (its work), its texts as `queries`
    (id, text) and no `request`."""

    queries: list[Query]
    request: SearchRequest | None
    arrived: float
    deadline: float | None
    seen_key: ManifestKey | None
    future: Future = field(default_factory=Future)
    results: list[QueryResult] = field(default_factory=list)
    taken: int = 0  # queries handed to batches so far (answered, or in the batch in hand)
    seconds: float = 0.0
    generation: Generation | None = None  # pinned by its first batch: all of it is answered from one generation
    cancelled: bool = False
    embed: EmbedWork | None = None

    @property
    def untaken(self) -> int:
        return len(self.queries) - self.taken


class SearchService:
    """Answers searches on one worker thread, in fair batches, each request from one committed generation."""

    def __init__(self, index: LocalIndex, max_batch: int = MAX_BATCH, max_queue: int | None = None):
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.index_dir = index.index_dir
        self._cond = threading.Condition()
        self._waiting: list[_Pending] = []  # arrival order: every request not yet answered or refused
        self._by_future: dict[Future, _Pending] = {}
        self._queued = 0  # queries of _waiting not yet answered
        self._in_flight: list[_Pending] = []  # the batch being answered
        self._closing = False  # close(): answer what waits, then stop
        self._refusing = False  # stop_taking(): refuse what waits
        self._refused_at = float("-inf")
        self._rate: float | None = None  # queries per second, recent batches
        self.batches = 0  # batches answered so far (fewer than requests when requests wait together)
        self.embed_steps = 0  # embedding steps done so far (a tokenisation or a forward pass each)
        self._embed_turn = False  # the next step goes to an embedding, if one is ready (they take turns)
        # The model every generation shares (Generations opens each with it): /embed sizes its answers by it.
        self.encoder = getattr(index, "encoder", None)
        self.on_batch: Callable[[int, float], None] | None = None  # (queries, seconds) after each batch
        self._generations = Generations(index, on_change=self._notify)
        self._worker = threading.Thread(target=self._work, name="bge-index-search", daemon=True)
        self._worker.start()

    # -- what callers use ------------------------------------------------------

    def submit(self, queries: Sequence[Query], request: SearchRequest, deadline: float | None = None) -> Future:
        """Queue a search; the future's result is an `Answer` (or the search's error). `deadline` is a
        time.monotonic() by which it must be answered. QueueFull when too many queries wait, ServiceClosed
        when stopping."""
        pending = _Pending(list(queries), request, time.monotonic(), deadline, manifest_key(self.index_dir))
        return self._enqueue(pending)

    def submit_embed(self, work: EmbedWork, deadline: float | None = None) -> Future:
        """Queue an embedding (texts encoded as documents, as `bge-index embed --index` does); the future's
        result is an `Answer` of (rows, row number) per text, or the error (NoColbertVectors when ColBERT
        vectors are asked of an index without them). Each text takes a place in the queue, as a query does:
        QueueFull and ServiceClosed as for `submit`."""
        pending = _Pending([Query(i, t) for i, t in zip(work.ids, work.texts)], None, time.monotonic(), deadline,
                           manifest_key(self.index_dir), embed=work)
        return self._enqueue(pending)

    def _enqueue(self, pending: _Pending) -> Future:
        size = len(pending.queries)
        with self._cond:
            if self._closing or self._refusing or not self._worker.is_alive():
                raise ServiceClosed("the server is stopping; try again")
            if self.max_queue is not None and self._waiting and self._queued + size > self._room(size):
                self._refused_at = time.monotonic()
                raise QueueFull(f"the queue is full ({self._queued:,} queries waiting, at most "
                                f"{self.max_queue:,}); try again", self._retry_after())
            self._waiting.append(pending)
            self._by_future[pending.future] = pending
            self._queued += len(pending.queries)
            self._cond.notify_all()
        return pending.future

    def cancel(self, future: Future) -> None:
        """Drop a submitted search (its caller gave up): what is left of it is not searched."""
        with self._cond:
            pending = self._by_future.get(future)
            if pending is not None:
                pending.cancelled = True
                self._cond.notify_all()

    @property
    def index(self) -> LocalIndex:
        """The generation being served, as last opened (no look at the disk)."""
        return self._generations.served.index

    def current(self) -> LocalIndex:
        """The newest committed generation, as a request arriving now would be answered from (waiting, a few
        seconds at most, for a new one being opened); Unavailable when none can be served."""
        seen, arrived = manifest_key(self.index_dir), time.monotonic()
        while True:
            generation = self._generations.generation_for(seen, arrived)
            if generation is not None:
                self._generations.unpin(generation)
                return generation.index
            if time.monotonic() - arrived > 10:
                raise Unavailable("the index's new generation is still being opened; try again")
            with self._cond:
                self._cond.wait(0.05)

    def text_sizes(self) -> TextSizes:
        """The served generation's longest id and text (answer_size.py)."""
        return self._generations.served.sizes

    def queued_queries(self) -> int:
        """Queries waiting or being answered."""
        return self._queued

    def queued_requests(self) -> int:
        """Requests waiting or being answered."""
        return len(self._waiting)

    def alive(self) -> bool:
        """Whether the worker is still answering."""
        return self._worker.is_alive() and not self._closing and not self._refusing

    def health(self) -> dict:
        """What /healthz says: status (ok, overloaded, unavailable, stopping, stopped), the generation served,
        its rows, the queries waiting, and the index's identity (when it was first built)."""
        served = self._generations.served
        with self._cond:
            queued, refused_at = self._queued, self._refused_at
        health = {"status": "ok", "generation": served.number, "rows": served.manifest.documents,
                  "queued": queued, "index": served.manifest.created}
        if not self._worker.is_alive():
            health.update(status="stopped", error="the search worker has stopped")
        elif self._closing or self._refusing:
            health.update(status="stopping", error="the server is stopping")
        elif served.broken is not None:
            health.update(status="unavailable", error=served.broken)
        elif self.max_queue is not None and (queued >= self.max_queue
                                             or time.monotonic() - refused_at < OVERLOADED_FOR):
            health.update(status="overloaded", error="the queue is full: requests are being refused")
        return health

    def served_identity(self, label: str) -> tuple[str, str, str, int] | None:
        """(index label, created, model name, generation) of what is served; None when nothing can be."""
        served = self._generations.served
        if served.broken is not None:
            return None
        model = served.manifest.model.get("name", "") if isinstance(served.manifest.model, dict) else ""
        return label, served.manifest.created, str(model), served.number

    def stop_taking(self) -> None:
        """Refuse new searches and those waiting (ServiceClosed), let the batch in hand finish (a stop begins)."""
        with self._cond:
            self._refusing = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Answer what is queued, then stop the worker (idempotent); wait at most `timeout` seconds for it."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if not self._worker.is_alive():
            self._generations.close()

    # -- the worker ------------------------------------------------------------

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _work(self) -> None:
        try:
            self._serve_queue()
        finally:
            # Whatever stopped the loop, nobody may wait for ever: the batch in hand and what is queued are refused.
            with self._cond:
                self._closing = True
                left, self._waiting = self._waiting, []
                self._queued = 0
            for pending in left:
                self._settle(pending, ServiceClosed("the server is stopping; try again"))

    def _serve_queue(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._drop_locked(time.monotonic())
                    if not self._waiting and (self._closing or self._refusing):
                        return
                    chunks, embedding = self._next_work_locked()
                    if chunks or embedding is not None:
                        break
                    self._cond.wait(self._next_deadline_locked())
                self._in_flight = [pending for pending, _, _ in chunks] if chunks else [embedding]
            try:
                if embedding is not None:
                    self._embed_step(embedding)
                else:
                    self._answer(chunks)
            except Exception:  # noqa: BLE001 - a bug here must not stop the server answering
                log.exception("internal error while answering a batch")
                with self._cond:
                    for pending in self._in_flight:
                        self._remove_locked(pending, RuntimeError("internal error"))
            finally:
                with self._cond:
                    self._in_flight = []

    def _drop_locked(self, now: float) -> None:
        """Remove requests cancelled, past their deadline, or (while stopping) not yet answered."""
        for pending in list(self._waiting):
            if pending.cancelled or pending.future.cancelled():
                self._remove_locked(pending, None)
            elif self._refusing:
                self._remove_locked(pending, ServiceClosed("the server is stopping; try again"))
            elif pending.deadline is not None and now > pending.deadline:
                self._remove_locked(pending, DeadlineExceeded(
                    f"not answered within {pending.deadline - pending.arrived:g} s ({self._queued:,} queries "
                    "waiting); try again"))

    def _next_deadline_locked(self) -> float:
        deadlines = [p.deadline for p in self._waiting if p.deadline is not None]
        return max(0.001, min([0.5, *(d - time.monotonic() for d in deadlines)]))

    def _next_work_locked(self) -> tuple[list[tuple[_Pending, int, int]], _Pending | None]:
        """What to do next: a search batch (chunks, None) or an embedding step ([], embedding), taking turns
        while both wait, so that neither holds the other up by more than one batch or step; ([], None): nothing."""
        if self._embed_turn:
            embedding = self._pick_embedding_locked()
            if embedding is not None:
                self._embed_turn = False
                return [], embedding
        chunks = self._pick_locked()
        if chunks:
            self._embed_turn = True
            return chunks, None
        embedding = self._pick_embedding_locked()
        self._embed_turn = False
        return [], embedding

    def _pinned_locked(self, pending: _Pending) -> bool:
        """Whether `pending` has its generation (pinned now if it had none); one that cannot be served is
        removed (Unavailable), one whose commit is being looked at waits."""
        if pending.generation is None:
            try:
                pending.generation = self._generations.generation_for(pending.seen_key, pending.arrived)
            except Unavailable as failure:
                self._remove_locked(pending, failure)
                return False
        return pending.generation is not None

    def _pick_embedding_locked(self) -> _Pending | None:
        """The oldest embedding that can go on now, its generation pinned."""
        for pending in list(self._waiting):
            if pending.embed is not None and self._pinned_locked(pending):
                return pending
        return None

    def _pick_locked(self) -> list[tuple[_Pending, int, int]]:
        """The next batch: (request, first query, end) chunks, at most max_batch queries (see the docstring)."""
        eligible = []
        for pending in list(self._waiting):
            if pending.embed is not None or pending.untaken == 0:
                continue  # embeddings go a step at a time, in their turn (_next_work_locked)
            if not self._pinned_locked(pending):
                continue  # a commit it saw is being looked at: it waits, the others go on
            eligible.append(pending)
        if not eligible:
            return []
        # Short requests present: the batch is cut to what they need, or half a batch, whichever is more, so
        # that theirs ends soon (a GET then waits for the batch in progress and half a batch at most).
        short = self._short()
        shorts = sum(p.untaken for p in eligible if p.untaken <= short)
        budget = self.max_batch if shorts == 0 else min(self.max_batch, max(shorts, self.max_batch // 2))
        share = {eligible[0]: min(eligible[0].untaken, max(1, budget // OLDEST_SHARE))}
        budget -= share[eligible[0]]
        for pending in sorted(eligible[1:], key=lambda p: (p.untaken, p.arrived)):
            if budget <= 0:
                break
            share[pending] = min(pending.untaken, budget)
            budget -= share[pending]
        oldest = eligible[0]
        share[oldest] += min(oldest.untaken - share[oldest], budget)
        chunks = []
        for pending in eligible:
            if share.get(pending):
                chunks.append((pending, pending.taken, pending.taken + share[pending]))
                pending.taken += share[pending]
        return chunks

    def _answer(self, chunks: list[tuple[_Pending, int, int]]) -> None:
        """Answer one batch: per generation, its files checked, one search per distinct request."""
        self.batches += 1
        batch_started = time.perf_counter()
        outcomes: list[tuple[_Pending, list | BaseException, float]] = []
        by_generation: dict[Generation, list[tuple[_Pending, int, int]]] = {}
        for chunk in chunks:
            by_generation.setdefault(chunk[0].generation, []).append(chunk)
        for generation, members in by_generation.items():
            with generation.lock:
                broken = generation.check()
                if broken is not None:
                    failure = Unavailable(f"{broken}; the index cannot be served now; try again")
                    outcomes += [(pending, failure, 0.0) for pending, _, _ in members]
                    continue
                groups: dict[SearchRequest, list[tuple[_Pending, int, int]]] = {}
                for chunk in members:
                    groups.setdefault(chunk[0].request, []).append(chunk)
                for request, group in groups.items():
                    queries = [q for pending, start, end in group for q in pending.queries[start:end]]
                    started = time.perf_counter()
                    try:
                        results: list[QueryResult] = generation.index.search(queries, request)
                    except Exception as failure:  # noqa: BLE001 - handed to the callers, who report it
                        outcomes += [(pending, failure, 0.0) for pending, _, _ in group]
                        continue
                    seconds = time.perf_counter() - started
                    at = 0
                    for pending, start, end in group:
                        outcomes.append((pending, results[at:at + end - start], seconds))
                        at += end - start
        seconds = time.perf_counter() - batch_started
        answered = sum(end - start for _, start, end in chunks)
        with self._cond:
            for pending, outcome, search_seconds in outcomes:
                if pending.future.done() or pending.future not in self._by_future:
                    continue
                if isinstance(outcome, BaseException):
                    self._remove_locked(pending, outcome)
                    continue
                pending.results += outcome
                pending.seconds += search_seconds
                self._queued -= len(outcome)
                if len(pending.results) == len(pending.queries):
                    self._remove_locked(pending, None, answered=True)
            if seconds > 0:
                rate = answered / seconds
                self._rate = rate if self._rate is None else (1 - RATE_MEMORY) * self._rate + RATE_MEMORY * rate
        if self.on_batch is not None:
            self.on_batch(answered, seconds)

    def _embed_step(self, pending: _Pending) -> None:
        """One step of an embedding with its generation's model (the served one, which searches use too); its
        texts finished by the step are its results, and it is answered when all are."""
        self.embed_steps += 1
        generation = pending.generation
        started = time.perf_counter()
        with generation.lock:  # as a search batch: the generation's files are not let go under it
            broken = generation.check()
            if broken is not None:
                outcome: list | BaseException = Unavailable(f"{broken}; the index cannot be served now; try again")
            else:
                try:
                    outcome = pending.embed.step(generation.index.encoder, generation.manifest, self.index_dir)
                except Exception as failure:  # noqa: BLE001 - handed to the caller, who reports it
                    outcome = failure
        seconds = time.perf_counter() - started
        with self._cond:
            if pending.future.done() or pending.future not in self._by_future:
                return  # dropped meanwhile (deadline, hang-up, stop)
            if isinstance(outcome, BaseException):
                self._remove_locked(pending, outcome)
                return
            pending.results += outcome
            pending.seconds += seconds
            self._queued -= len(outcome)
            if pending.embed.done:
                self._remove_locked(pending, None, answered=True)

    def _remove_locked(self, pending: _Pending, failure: BaseException | None, answered: bool = False) -> None:
        """Take a request out of the queue: answered, failed with `failure`, or dropped (both None)."""
        if pending in self._waiting:
            self._waiting.remove(pending)
            self._queued -= len(pending.queries) - len(pending.results)
        self._by_future.pop(pending.future, None)
        generation, pending.generation = pending.generation, None
        if answered:
            pending.future.set_result(Answer(pending.results, generation.number, pending.seconds))
        else:
            self._settle(pending, failure)
        if generation is not None:
            self._generations.unpin(generation)

    @staticmethod
    def _settle(pending: _Pending, failure: BaseException | None) -> None:
        if pending.future.done():
            return
        if failure is None:
            pending.future.cancel()
        else:
            pending.future.set_exception(failure)

    def _short(self) -> int:
        """Queries of a short request at most (max_batch / OLDEST_SHARE): a GET is one."""
        return max(1, self.max_batch // OLDEST_SHARE)

    def _room(self, size: int) -> int:
        """The queue's bound for a request of `size` queries: the last max_batch places are kept for short
        requests, so that a GET still gets in while big POSTs are being refused."""
        return self.max_queue if size <= self._short() else max(1, self.max_queue - self.max_batch)

    def _retry_after(self) -> int:
        """Seconds until the queue has room again, from the recent rate (at least 1, at most 60)."""
        if not self._rate:
            return 1
        return max(1, min(60, math.ceil(self._queued / self._rate)))
