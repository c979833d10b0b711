"""The local engine: documents -> token batches -> vectors -> shards, in this process.

Documents are read a window at a time, tokenised (or cut into passages),
sorted into token-budget batches (batching.py) and handed to the encoding
workers (one or more devices, workers.py); while they compute, this thread
reads and tokenises the next window and writes the previous one. At most two
windows are in flight, so memory does not grow with the corpus.

What to encode, what to remove and when to commit is decided by run.py's
`IndexRun`, the same code the Ray engine calls. The model is loaded only
when something needs encoding, so a no-change re-run costs hashing alone (and
imports no torch). A stop request (SIGINT/SIGTERM, through `should_stop`) is
honoured at the next batch boundary: what is done is committed, removals are
left for a complete run.

    summary = build_index(["notes/"], Path("notes-index"), IndexOptions(model="/models/bge-m3"))
    summary = index_documents([Document("a", "text of a", "<mine>")], Path("idx"), options)
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bge_index.model.batching import WindowRows, token_budget_batches
from bge_index.input.documents import Document, Skipped, iter_documents
from bge_index.store.lock import run_lock
from bge_index.store.shard_reader import RowLocation
from bge_index.run.index_run import content_hash
from bge_index.run.index_run import IndexEvents, IndexOptions, IndexProgress, IndexRun, IndexSummary, Outcome, refuse_foreign_folder
from bge_index.store.shard_writer import RowBatch

WINDOW_DOCUMENTS = 2048


def _never() -> bool:
    return False


def build_index(inputs: Sequence[str], index_dir: Path, options: IndexOptions, events: IndexEvents = IndexEvents(),
                encoder=None, should_stop: Callable[[], bool] = _never) -> IndexSummary:
    """Bring the index in `index_dir` up to date with the files, folders and globs in `inputs` (creating it)."""
    refuse_foreign_folder(index_dir)
    # The index folder is never input: an --out inside an input folder must not index its own files.
    documents = iter_documents(inputs, options.fields, exclude=[index_dir], follow_links=options.follow_links,
                               max_document_bytes=options.max_document_bytes, id_from=options.id_from)  # raises InputError before any work
    return index_documents(documents, index_dir, options, events, encoder, should_stop)


def index_documents(documents: Iterable[Document | Skipped], index_dir: Path, options: IndexOptions,
                    events: IndexEvents = IndexEvents(), encoder=None,
                    should_stop: Callable[[], bool] = _never) -> IndexSummary:
    """Bring the index in `index_dir` up to date with `documents`, any iterable of `Document`s.

    The documents are the whole corpus: indexed ids that do not occur are
    removed (unless `options.keep_missing`). `Skipped` items may be mixed in
    (they are counted and reported, and one that hides documents keeps the
    index's copies of them). `encoder` (an encoder.Encoder) skips loading the model.
    """
    refuse_foreign_folder(index_dir)
    with run_lock(index_dir, options.dry_run, wait=options.wait, on_wait=events.warning, should_stop=should_stop):
        return LocalEngine(index_dir, options, events, encoder, should_stop).run(documents)


@dataclass
class _Pending:
    """A document waiting for its vectors, and the rows it retires once its own are written."""

    document: Document
    hash: str
    replaces: list[RowLocation]
    written_in_run: list[RowLocation] = field(default_factory=list)  # part of `replaces` this run wrote


@dataclass
class _WindowInFlight:
    """A window whose batches are with the encoders: its documents, rows, batches (row positions) and futures."""

    pending: list[_Pending]
    rows: WindowRows
    batches: list[list[int]]
    futures: list[Future]


class LocalEngine:
    """Encodes an index run's documents in this process, windows overlapping the encoders' work."""

    def __init__(self, index_dir: Path, options: IndexOptions, events: IndexEvents, encoder,
                 should_stop: Callable[[], bool]):
        self.options = options
        self.events = events
        self.encoder = encoder
        self.should_stop = should_stop
        self.run_state = IndexRun(index_dir, options, events, device_type=self._device_type)
        self.summary = self.run_state.summary
        self.window: list[_Pending | None] = []
        self.window_number = 0
        self.in_flight: deque[_WindowInFlight] = deque()  # windows handed to the encoders, oldest first
        self.workers = None  # workers.EncodingWorkers, loaded with the first window to encode
        self.new_rows: dict[str, list[RowLocation]] = {}  # rows this run wrote, per document id

    def _devices(self) -> list[str]:
        if self.options.devices:
            from bge_index.model.encoder import resolve_devices

            return resolve_devices(self.options.devices)
        return [self.options.device]

    def _device_type(self) -> str:
        if self.encoder is not None:
            return self.encoder.device.type
        from bge_index.model.encoder import resolve_device

        return resolve_device(self._devices()[0]).type

    def run(self, documents: Iterable[Document | Skipped]) -> IndexSummary:
        """Consume the documents, encode and write what changed, commit."""
        run = self.run_state
        run.open_writer()
        try:
            self._consume(documents)
            self._drain()
            return run.finish()
        except BaseException:
            run.abort()
            raise
        finally:
            self._release_workers()

    def _release_workers(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None  # encoders this run loaded go with it; one passed in stays the caller's
            gc.collect()  # model modules can sit in reference cycles; free their weights now

    # -- the stream -------------------------------------------------------------

    def _consume(self, documents: Iterable[Document | Skipped]) -> None:
        for item in documents:
            if self.should_stop():
                self._stop()
                return
            if isinstance(item, Skipped):
                self.run_state.skip(item)
                continue
            self._consider(item)
            if len(self.window) >= WINDOW_DOCUMENTS:
                self._flush_window()
                if self.summary.interrupted:
                    return
        self._flush_window()

    def _consider(self, document: Document) -> None:
        run = self.run_state
        hash_ = content_hash(document.text, document.metadata)
        prior = run.seen.get(document.id)
        if prior is not None and prior.outcome is Outcome.PENDING and prior.slot[0] != self.window_number:
            # The earlier occurrence is being encoded: let it land, then replace it like any written one.
            # Duplicates are rare, so waiting here costs nothing in practice.
            self._drain()
        prior = run.arrive(document.id, document.source, document.line)
        written_in_run = self._forget(document.id, prior) if prior is not None else []
        outcome = run.decide(document.id, hash_, document.source, document.line, replacing=bool(written_in_run),
                             slot=(self.window_number, len(self.window)))
        if outcome is Outcome.PENDING:
            replaces = run.old_rows(document.id) + written_in_run
            self.window.append(_Pending(document, hash_, replaces, written_in_run))

    def _forget(self, doc_id: str, prior) -> list[RowLocation]:
        """Undo an earlier occurrence that a later one replaces; returns the rows it wrote in this run.

        Those rows are retired only when the later occurrence's rows are written, so a stop in between
        never leaves the document without rows.
        """
        if prior.outcome is Outcome.PENDING:
            dropped = self.window[prior.slot[1]]
            self.window[prior.slot[1]] = None
            # Rows an even earlier occurrence wrote in this run are now this occurrence's to retire.
            return dropped.written_in_run + self.new_rows.pop(doc_id, [])
        return self.new_rows.pop(doc_id, [])

    def _flush_window(self) -> None:
        """Hand the window to the encoders and go on; windows before the previous one are written meanwhile."""
        pending = [p for p in self.window if p is not None]
        self.window = []
        self.window_number += 1
        if not pending:
            return
        if self.options.dry_run:
            for item in pending:
                self.run_state.settle(item.document.id, written=False)
            return
        if self.summary.interrupted:
            return  # stopping (seen while an earlier window landed): these documents are not reached
        self.in_flight.append(self._dispatch(pending))
        # Two windows in flight: the encoders work on the newer while the older is written.
        while len(self.in_flight) > 1 or (self.in_flight and self.summary.interrupted):
            self._land(self.in_flight.popleft())

    def _drain(self) -> None:
        while self.in_flight:
            self._land(self.in_flight.popleft())

    def _land(self, window: _WindowInFlight) -> None:
        """Wait for a window's vectors, write the documents that are complete, and record what became of them."""
        run = self.run_state
        rows, done_positions = self._collect(window)
        done = [window.pending[position] for position in done_positions]
        finished_ids = {item.document.id for item in done}
        for item in window.pending:
            if item.document.id not in finished_ids:
                run.not_reached(item.document.id)
        if rows is None:
            return
        shards_before = len(run.writer.shards)
        locations = run.writer.write(rows)
        self.summary.rows += len(rows)
        by_document: dict[str, list[RowLocation]] = {}
        for doc_id, location in zip(rows.doc_ids or rows.ids, locations):
            by_document.setdefault(doc_id, []).append(location)
        for item in done:
            doc_id = item.document.id
            run.retire(item.replaces)
            self.new_rows[doc_id] = by_document[doc_id]
            run.settle(doc_id)
        # A shard is complete (or the last commit is a while back): commit, so that a killed run loses at most the
        # shard in progress.
        run.checkpoint_if(len(run.writer.shards) > shards_before)

    # -- encoding ---------------------------------------------------------------

    def _load_workers(self):
        if self.workers is None:
            from bge_index.model.encoder import load_encoder
            from bge_index.model.workers import EncodingWorkers

            self.events.stage("loading model")
            started = time.perf_counter()
            encoders = [self.encoder] if self.encoder is not None else [
                load_encoder(self.run_state.model_name, device, self.run_state.precision) for device in self._devices()]
            self.workers = EncodingWorkers(encoders)
            self.summary.load_seconds = time.perf_counter() - started
        return self.workers

    def _dispatch(self, pending: list[_Pending]) -> _WindowInFlight:
        """Tokenise the window, sort it into token-budget batches and submit them all."""
        workers = self._load_workers()
        rows = WindowRows(workers.primary, [p.document.id for p in pending], [p.document.text for p in pending],
                          [p.hash for p in pending], colbert=self.options.colbert, store_text=self.options.store_text,
                          max_length=self.summary.max_length, chunking=self.run_state.manifest.chunking,
                          sources=[self.run_state.real_source(p.document.source) for p in pending],
                          lines=[p.document.line for p in pending], metadata=[p.document.metadata for p in pending])
        self.summary.truncated += rows.truncated
        batches = token_budget_batches(rows.lengths, self.options.batch_tokens)
        futures = [workers.submit([rows.token_ids[i] for i in batch], self.options.colbert) for batch in batches]
        return _WindowInFlight(pending, rows, batches, futures)

    def _stop(self, *landing: _WindowInFlight) -> None:
        """A stop request: drop every batch not started yet, in all windows at once.

        Cancelling one future at a time as its turn comes would be too late: a worker that finishes a
        batch starts the next before this thread wakes up. Running batches finish and are written.
        """
        self.summary.interrupted = True
        for window in (*landing, *self.in_flight):
            for future in window.futures:
                future.cancel()

    def _collect(self, window: _WindowInFlight) -> tuple[RowBatch | None, list[int]]:
        """The window's finished rows; after a stop request, only the documents whose batches were done."""
        rows = window.rows
        finished = np.zeros(len(rows.token_ids), dtype=bool)
        if self.summary.interrupted:
            self._stop(window)
        for batch, future in zip(window.batches, window.futures):
            if future.cancelled():
                continue  # stopping: batches not started are dropped
            result = future.result()
            self.summary.encode_seconds += result.seconds
            rows.place(batch, result.vectors)
            finished[batch] = True
            self.summary.tokens += sum(len(rows.token_ids[i]) for i in batch)
            self.summary.elapsed = time.perf_counter() - self.run_state.started
            self.events.progress(IndexProgress(len(self.run_state.seen), self.summary.encoded + int(finished.sum()),
                                               self.summary.tokens, self.summary.elapsed, self.summary.load_seconds))
            if not self.summary.interrupted and self.should_stop() and not finished.all():
                self._stop(window)
        return rows.complete_documents(finished)
