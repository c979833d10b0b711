"""Where the stages meet: documents -> token batches -> vectors -> shards, and queries -> vectors -> hits.

Indexing streams: documents are read a window at a time, tokenised (or cut
into passages), sorted by length inside the window and cut into batches
under a padded-token budget (a batch of short texts holds many rows, a long
text rides alone), then written back in input order. A window's batches go
to the encoding workers (one or more devices) and the run goes on reading and
tokenising the next window, and writes the previous one, while they compute;
at most two windows are in flight, so memory does not grow with the corpus.

Runs are incremental: a document whose id and content hash are already in
the index is not encoded again; a changed one is re-encoded and its old rows
retired; one missing from the inputs is removed (unless kept). The encoder
is loaded only when something needs encoding, so a no-change re-run costs
hashing alone, and it writes nothing at all. A stop request (SIGINT/SIGTERM)
is honoured at the next batch boundary: what is done is committed, removals
are left for a complete run.

The CLI drives these functions and hears what happens through `IndexEvents`;
nothing here prints.
"""

from __future__ import annotations

import gc
import time
from collections import Counter, deque
from concurrent.futures import Future
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bge_index import __version__
from bge_index.documents import Document, FieldNames, Skipped, iter_documents
from bge_index.encoder import (QUERY_MAX_LENGTH, Encoder, ModelIdentity, ModelInfo, dtype_name, identify_model,
                               load_encoder, resolve_device, resolve_devices, resolve_dtype)
from bge_index.lock import LOCK_FILE, IndexLock
from bge_index.search import Hit, QueryVectors, ScoreWeights, Searcher
from bge_index.shards import (IndexFormatError, IndexWriter, Manifest, RowBatch, RowLocation, content_hash,
                              index_size_bytes, is_index, is_index_data_file, iter_live_keys, read_column,
                              read_manifest, read_rows)
from bge_index.vector_store import ensure_search_files, open_store
from bge_index.workers import EncodingWorkers

WINDOW_DOCUMENTS = 2048
MAX_BATCH_ROWS = 512


class StrictModeError(Exception):
    """--strict and a document had to be skipped; nothing was written."""

    def __init__(self, skipped: Skipped):
        super().__init__(f"{skipped.location}: {skipped.reason} (--strict: nothing written)")
        self.skipped = skipped


class OutputFolderError(Exception):
    """--out names a folder that holds something other than an index."""


class IndexMismatchError(Exception):
    """The index was built with other settings than this run asks for."""


class InvalidOptionError(Exception):
    """Options that cannot work together (a usage error)."""


@dataclass(frozen=True)
class IndexOptions:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    devices: str | None = None  # "cuda:0,cuda:1" or "all": one encoder per device (overrides `device`)
    batch_tokens: int = 16384
    max_length: int = 8192
    shard_rows: int = 100_000
    colbert: bool = False
    store_text: bool = True
    strict: bool = False
    fields: FieldNames = FieldNames()
    chunk_tokens: int | None = None
    chunk_overlap: int = 0
    keep_missing: bool = False
    dry_run: bool = False
    wait: bool = False


@dataclass
class IndexProgress:
    documents: int  # seen so far, unchanged ones included
    encoded: int
    tokens: int
    elapsed: float


@dataclass
class IndexSummary:
    index_dir: Path
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    duplicates: int = 0
    rows: int = 0  # rows encoded (passages, when chunked)
    tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: int = 0
    live_rows: int = 0
    bytes: int = 0
    generation: int = 0
    elapsed: float = 0.0
    load_seconds: float = 0.0
    encode_seconds: float = 0.0
    max_length: int = 0
    model: str = ""
    interrupted: bool = False
    dry_run: bool = False
    wrote: bool = False

    @property
    def encoded(self) -> int:
        return self.added + self.updated

    @property
    def documents_per_second(self) -> float:
        return self.encoded / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "index_dir": str(self.index_dir),
            "status": "interrupted" if self.interrupted else "dry-run" if self.dry_run else "complete",
            "documents": {"added": self.added, "updated": self.updated, "unchanged": self.unchanged,
                          "removed": self.removed, "duplicates": self.duplicates,
                          "skipped": sum(self.skipped.values()), "truncated": self.truncated},
            "skipped_by_reason": dict(self.skipped),
            "encoded": {"rows": self.rows, "tokens": self.tokens},
            "timings": {"total_seconds": round(self.elapsed, 3), "model_load_seconds": round(self.load_seconds, 3),
                        "encode_seconds": round(self.encode_seconds, 3),
                        "documents_per_second": round(self.documents_per_second, 3),
                        "tokens_per_second": round(self.tokens_per_second, 1)},
            "model": self.model,
            "max_length": self.max_length,
            "index": {"generation": self.generation, "live_rows": self.live_rows, "shards": self.shards,
                      "bytes": self.bytes, "written": self.wrote},
        }


class IndexEvents:
    """What an index run reports as it goes; the CLI overrides these to print."""

    def skipped(self, item: Skipped) -> None:
        """A record that could not be indexed."""

    def warning(self, message: str) -> None:
        """Something the user should know that does not stop the run."""

    def progress(self, state: IndexProgress) -> None:
        """Called after every encoded batch."""


def _never() -> bool:
    return False


# ---------------------------------------------------------------------------
# Indexing


def build_index(inputs: Sequence[str], index_dir: Path, options: IndexOptions, events: IndexEvents = IndexEvents(),
                encoder: Encoder | None = None, should_stop: Callable[[], bool] = _never) -> IndexSummary:
    """Bring the index in `index_dir` up to date with `inputs` (creating it if needed)."""
    _refuse_foreign_folder(index_dir)
    documents = iter_documents(inputs, options.fields)  # raises InputError before any work
    if options.dry_run:
        return _IndexRun(index_dir, options, events, encoder, should_stop).run(documents)
    with IndexLock(index_dir, wait=options.wait, on_wait=events.warning, should_stop=should_stop):
        return _IndexRun(index_dir, options, events, encoder, should_stop).run(documents)


def _refuse_foreign_folder(index_dir: Path) -> None:
    if is_index(index_dir) or not index_dir.exists():
        return
    # A crashed first build leaves shards and a lock but no manifest: that folder is ours to finish.
    if not index_dir.is_dir() or any(p.name != LOCK_FILE and not is_index_data_file(p.name)
                                     for p in index_dir.iterdir()):
        raise OutputFolderError(f"--out {index_dir}: exists and is not a bge-index index; "
                                "refusing to write into it (choose an empty or new folder)")


@dataclass(slots=True)  # one per indexed document: kept small
class _Existing:
    """A document in the previous state: its content hash and live rows (empty once this run replaced them)."""

    hash: str
    rows: list[RowLocation]


@dataclass(slots=True)  # one per document of the run: kept small
class _Seen:
    """A document id met in this run: where (file, and line in it), and what became of it."""

    source: str  # shared by the documents of a file
    line: int | None
    outcome: str  # "unchanged", "pending" (in a window not written yet), "added" or "updated" (written)
    window_slot: int | None = None
    window_number: int | None = None

    @property
    def where(self) -> str:
        return _where(self.source, self.line)


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


@dataclass
class _Pending:
    document: Document
    hash: str
    replaces: list[RowLocation]  # rows to retire once this document's rows are written
    was_indexed: bool = False
    written_in_run: list[RowLocation] = field(default_factory=list)  # part of `replaces` this run wrote


class _IndexRun:
    """State of one index run; `run` drives it from documents to a committed manifest."""

    def __init__(self, index_dir: Path, options: IndexOptions, events: IndexEvents, encoder: Encoder | None,
                 should_stop: Callable[[], bool]):
        self.index_dir = index_dir
        self.options = options
        self.events = events
        self.encoder = encoder
        self.should_stop = should_stop
        self.summary = IndexSummary(index_dir, dry_run=options.dry_run)
        self.window: list[_Pending | None] = []
        self.window_number = 0
        self.in_flight: deque[_WindowInFlight] = deque()  # windows handed to the encoders, oldest first
        self.workers: EncodingWorkers | None = None
        self.seen: dict[str, _Seen] = {}
        self.new_rows: dict[str, list[RowLocation]] = {}
        self.existing: dict[str, _Existing] = {}
        self.writer: IndexWriter | None = None
        self.started = time.perf_counter()
        self.deleted_any = False
        self.inputs_incomplete = False  # a file could not be read whole: absent ids are not removals

    # -- setup ----------------------------------------------------------------

    def run(self, documents: Iterable[Document | Skipped]) -> IndexSummary:
        previous = read_manifest(self.index_dir) if is_index(self.index_dir) else None
        info = identify_model(self.options.model, known=ModelIdentity.from_json(previous.model) if previous else None)
        manifest = self._wanted_manifest(info, previous)
        if previous is not None:
            _check_compatible(self.index_dir, previous, manifest)
            self.existing = self._load_existing(previous)
        self.summary.max_length = manifest.model["max_length"]
        self.summary.model = info.identity.describe()
        self.manifest = manifest
        if not self.options.dry_run:
            self.writer = IndexWriter(self.index_dir, manifest, self.options.shard_rows, base=previous)
        try:
            self._consume(documents)
            self._drain()
            self._finish(previous)
        except BaseException:
            if self.writer is not None:
                self.writer.abort()
            raise
        finally:
            self._release_workers()
        return self.summary

    def _release_workers(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None  # encoders this run loaded go with it; one passed in stays the caller's
            gc.collect()  # model modules can sit in reference cycles; free their weights now

    def _wanted_manifest(self, info: ModelInfo, previous: Manifest | None) -> Manifest:
        return index_manifest(self.options, info, previous, self._precision(previous))

    def _precision(self, previous: Manifest | None) -> str:
        return run_precision(self.options.dtype, previous, resolve_device(self._devices()[0]).type)

    def _load_existing(self, previous: Manifest) -> dict[str, _Existing]:
        existing: dict[str, _Existing] = {}
        for doc_id, hash_, location in iter_live_keys(self.index_dir, previous):
            entry = existing.get(doc_id)
            if entry is None:
                existing[doc_id] = _Existing(hash_, [location])
            else:
                entry.rows.append(location)
        return existing

    # -- the stream -------------------------------------------------------------

    def _consume(self, documents: Iterable[Document | Skipped]) -> None:
        for item in documents:
            if self.should_stop():
                self._stop()
                return
            if isinstance(item, Skipped):
                if self.options.strict:
                    raise StrictModeError(item)
                self.summary.skipped[item.category] += 1
                self.inputs_incomplete |= item.hides_documents
                self.events.skipped(item)
                continue
            self._consider(item)
            if len(self.window) >= WINDOW_DOCUMENTS:
                self._flush_window()
                if self.summary.interrupted:
                    return
        self._flush_window()

    def _consider(self, document: Document) -> None:
        hash_ = content_hash(document.text)
        prior = self.seen.get(document.id)
        if prior is not None and prior.outcome == "pending" and prior.window_number != self.window_number:
            # The earlier occurrence is being encoded: let it land, then replace it like any written one.
            # Duplicates are rare, so waiting here costs nothing in practice.
            self._drain()
            prior = self.seen[document.id]
        replaces = written_in_run = self._forget(document, prior) if prior is not None else []
        old = self.existing.get(document.id)
        if old is not None and old.rows and not replaces and old.hash == hash_:
            self.seen[document.id] = _Seen(document.source, document.line, "unchanged")
            self.summary.unchanged += 1
            return
        if old is not None:
            replaces = old.rows + replaces
        self.seen[document.id] = _Seen(document.source, document.line, "pending", len(self.window),
                                       self.window_number)
        self.window.append(_Pending(document, hash_, replaces, was_indexed=old is not None,
                                    written_in_run=written_in_run))

    def _forget(self, document: Document, prior: _Seen) -> list[RowLocation]:
        """A later occurrence of an id wins: undo the earlier one's outcome; returns the rows it wrote.

        Those rows are retired only when the later occurrence's rows are written, so a stop in between
        never leaves the document without rows.
        """
        doc_id = document.id
        self.events.warning(f"duplicate id {doc_id!r}: {_where(document.source, document.line)} replaces "
                            f"the earlier occurrence at {prior.where}")
        self.summary.duplicates += 1
        if prior.outcome == "pending":
            dropped = self.window[prior.window_slot]
            self.window[prior.window_slot] = None
            # Rows an even earlier occurrence wrote in this run are now this occurrence's to retire.
            return dropped.written_in_run + self.new_rows.pop(doc_id, [])
        elif prior.outcome in ("added", "updated", "unchanged"):
            setattr(self.summary, prior.outcome, getattr(self.summary, prior.outcome) - 1)
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
                outcome = "updated" if item.was_indexed else "added"
                self.seen[item.document.id].outcome = outcome
                setattr(self.summary, outcome, getattr(self.summary, outcome) + 1)
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

    def _land(self, window: "_WindowInFlight") -> None:
        """Wait for a window's vectors, write the documents that are complete, and record what became of them."""
        rows, done_positions = self._collect(window)
        pending = window.pending
        done = [pending[position] for position in done_positions]
        self._mark_not_reached(pending, done)
        if rows is None:
            return
        locations = self.writer.write(rows)
        self.summary.rows += len(rows)
        by_document: dict[str, list[RowLocation]] = {}
        for doc_id, location in zip(rows.doc_ids or rows.ids, locations):
            by_document.setdefault(doc_id, []).append(location)
        for item in done:
            doc_id = item.document.id
            for location in item.replaces:
                self._delete(location)
            if doc_id in self.existing:
                self.existing[doc_id].rows = []  # replaced: no longer the previous state's rows
            self.new_rows[doc_id] = by_document[doc_id]
            outcome = "updated" if item.was_indexed else "added"
            self.seen[doc_id].outcome = outcome
            setattr(self.summary, outcome, getattr(self.summary, outcome) + 1)

    def _mark_not_reached(self, pending: list[_Pending], done: list[_Pending]) -> None:
        finished_ids = {item.document.id for item in done}
        for item in pending:
            if item.document.id not in finished_ids:
                # Not reached before the stop: the rows it would replace stay live.
                self.seen[item.document.id].outcome = "not reached"

    def _delete(self, location: RowLocation) -> None:
        self.writer.delete(location)
        self.deleted_any = True

    # -- encoding ---------------------------------------------------------------

    def _load_workers(self) -> EncodingWorkers:
        if self.workers is None:
            started = time.perf_counter()
            encoders = [self.encoder] if self.encoder is not None else [
                load_encoder(self.options.model, device, self.manifest.model["dtype"])
                for device in self._devices()]
            self.workers = EncodingWorkers(encoders)
            self.summary.load_seconds = time.perf_counter() - started
        return self.workers

    def _devices(self) -> list[str]:
        return resolve_devices(self.options.devices) if self.options.devices else [self.options.device]

    def _dispatch(self, pending: list[_Pending]) -> "_WindowInFlight":
        """Tokenise the window, sort it into token-budget batches and submit them all."""
        workers = self._load_workers()
        rows = WindowRows(workers.primary, [p.document.id for p in pending], [p.document.text for p in pending],
                          [p.hash for p in pending], colbert=self.options.colbert, store_text=self.options.store_text,
                          max_length=self.summary.max_length, chunking=self.manifest.chunking)
        self.summary.truncated += rows.truncated
        batches = token_budget_batches(rows.lengths, self.options.batch_tokens)
        futures = [workers.submit([rows.token_ids[i] for i in batch], self.options.colbert) for batch in batches]
        return _WindowInFlight(pending, rows, batches, futures)

    def _stop(self, *landing: "_WindowInFlight") -> None:
        """A stop request: drop every batch not started yet, in all windows at once.

        Cancelling one future at a time as its turn comes would be too late: a worker that finishes a
        batch starts the next before this thread wakes up. Running batches finish and are written.
        """
        self.summary.interrupted = True
        for window in (*landing, *self.in_flight):
            for future in window.futures:
                future.cancel()

    def _collect(self, window: "_WindowInFlight") -> tuple[RowBatch | None, list[int]]:
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
            self.summary.elapsed = time.perf_counter() - self.started
            self.events.progress(IndexProgress(len(self.seen), self.summary.encoded + int(finished.sum()),
                                               self.summary.tokens, self.summary.elapsed))
            if not self.summary.interrupted and self.should_stop() and not finished.all():
                self._stop(window)
        return rows.complete_documents(finished)

    # -- the end ---------------------------------------------------------------

    def _finish(self, previous: Manifest | None) -> None:
        complete = not self.summary.interrupted
        if complete and not self.options.keep_missing and self.inputs_incomplete:
            self.events.warning("some input files could not be read whole, so documents missing from this run "
                                "are kept; the next run that reads every file will remove them")
        elif complete and not self.options.keep_missing:
            for doc_id, old in list(self.existing.items()):
                if doc_id not in self.seen:
                    self.summary.removed += 1
                    if self.writer is not None:
                        for location in old.rows:
                            self._delete(location)
        changed = self.summary.rows > 0 or self.deleted_any
        needs_commit = previous is None or changed or (complete and previous.state != "complete")
        if self.writer is not None and needs_commit:
            final = self.writer.commit(state="complete" if complete else "partial")
            self.summary.wrote = True
            # The model is done with: free it first, so building a shard's search files does not add to its
            # memory and the run's peak stays what encoding needs, whatever the corpus size.
            self._release_workers()
            ensure_search_files(self.index_dir, final)  # so the first search need not build them
        else:
            if self.writer is not None:
                self.writer.remove_leftovers()
            final = previous
        if final is not None:  # None only for a dry run over a folder that is not an index yet
            self.summary.generation = final.generation
            self.summary.shards = len(final.shards)
            self.summary.live_rows = final.documents
            self.summary.bytes = index_size_bytes(self.index_dir, final)
        self.summary.elapsed = time.perf_counter() - self.started


def run_precision(dtype: str, previous: Manifest | None, device_type: str) -> str:
    """The dtype a run encodes in: the one asked for, or with `auto` the index's own, else the best for the device."""
    if dtype == "auto" and previous is not None:
        return previous.model["dtype"]
    return dtype_name(resolve_dtype(dtype, device_type))


def index_manifest(options: IndexOptions, info: ModelInfo, previous: Manifest | None, precision: str) -> Manifest:
    """The manifest a run with these options writes (shards and counts still empty).

    `precision` comes from `run_precision`, for the devices that encode (a Ray engine's workers', not the driver's).
    """
    max_length = info.effective_max_length(options.max_length)
    chunking = None
    if options.chunk_tokens is not None:
        tokens = info.effective_max_length(options.chunk_tokens)
        if not 0 <= options.chunk_overlap < tokens - 2:
            raise InvalidOptionError(f"--chunk-overlap must be between 0 and {tokens - 3} "
                                     f"for {tokens}-token chunks")
        chunking = {"tokens": tokens, "overlap": options.chunk_overlap}
    return Manifest(
        model={**info.identity.to_json(), "dtype": precision, "max_length": max_length},
        dense_dim=info.dense_dim,
        colbert_dim=info.colbert_dim if options.colbert else None,
        vocab_size=info.vocab_size,
        store_text=options.store_text,
        chunking=chunking,
        generation=(previous.generation + 1) if previous else 1,
        tool_version=__version__,
    )


def _check_compatible(index_dir: Path, previous: Manifest, wanted: Manifest) -> None:
    """An index is only ever extended with the settings that built it."""
    recorded = ModelIdentity.from_json(previous.model)
    asked = ModelIdentity.from_json(wanted.model)
    differences = []
    if not recorded.same_model(asked):
        differences.append(f"model {recorded.describe()} (this run: {asked.describe()})")
    for key, label in (("dtype", "dtype"), ("max_length", "max length")):
        if previous.model.get(key) != wanted.model.get(key):
            differences.append(f"{label} {previous.model.get(key)} (this run: {wanted.model.get(key)})")
    if previous.chunking != wanted.chunking:
        differences.append(f"chunking {_describe_chunking(previous.chunking)} "
                           f"(this run: {_describe_chunking(wanted.chunking)})")
    if previous.colbert_dim != wanted.colbert_dim:
        differences.append(f"ColBERT vectors {'on' if previous.has_colbert else 'off'} "
                           f"(this run: {'on' if wanted.has_colbert else 'off'})")
    if previous.store_text != wanted.store_text:
        differences.append(f"text {'stored' if previous.store_text else 'not stored'} "
                           f"(this run: {'stored' if wanted.store_text else 'not stored'})")
    if differences:
        raise IndexMismatchError(
            f"{index_dir} was built with " + "; ".join(differences)
            + ". An index is never extended with other settings: use a new --out for these, "
              "or repeat the index's own settings (bge-index info shows them).")


def _describe_chunking(chunking: dict | None) -> str:
    return "off" if not chunking else f"{chunking['tokens']} tokens, overlap {chunking['overlap']}"


@dataclass
class _WindowInFlight:
    """A window whose batches are with the encoders: its documents, rows, batches (row positions) and futures."""

    pending: list[_Pending]
    rows: WindowRows
    batches: list[list[int]]
    futures: list[Future]


class WindowRows:
    """The rows a window of documents becomes (one per document, or one per passage), and their vectors."""

    def __init__(self, encoder: Encoder, ids: Sequence[str], texts: Sequence[str], hashes: Sequence[str], *,
                 colbert: bool, store_text: bool, max_length: int, chunking: dict | None):
        self.ids, self.hashes = ids, hashes
        self.store_text, self.chunked = store_text, bool(chunking)
        self.owner: list[int] = []  # row -> position of its document in the window
        self.token_ids: list[list[int]] = []
        self.texts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.truncated = 0
        if chunking:
            for position, text in enumerate(texts):
                for passage in encoder.passages(text, chunking["tokens"], chunking["overlap"]):
                    self._add(position, passage.ids, text[passage.start:passage.end], (passage.start, passage.end))
        else:
            tokenized = encoder.tokenize(list(texts), max_length)
            self.truncated = sum(t.truncated for t in tokenized)
            for position, (text, tokens) in enumerate(zip(texts, tokenized)):
                self._add(position, tokens.ids, text, (0, len(text)))
        self.dense = np.empty((len(self.token_ids), encoder.dense_dim), dtype=np.float32)  # [rows, D]
        self.sparse: list = [None] * len(self.token_ids)
        self.colbert: list | None = [None] * len(self.token_ids) if colbert else None

    def _add(self, position: int, ids: list[int], text: str, span: tuple[int, int]) -> None:
        self.owner.append(position)
        self.token_ids.append(ids)
        self.texts.append(text)
        self.spans.append(span)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    def place(self, batch: list[int], encoded) -> None:
        self.dense[batch] = encoded.dense
        for slot, row in enumerate(batch):
            self.sparse[row] = encoded.sparse[slot]
            if self.colbert is not None:
                self.colbert[row] = encoded.colbert[slot]

    def complete_documents(self, finished: np.ndarray) -> tuple[RowBatch | None, list[int]]:
        """Rows of the documents all of whose rows are encoded, in input order, and those documents' positions."""
        unfinished = {self.owner[row] for row in np.flatnonzero(~finished).tolist()}
        rows = [r for r in range(len(self.owner)) if self.owner[r] not in unfinished]
        done = [position for position in range(len(self.ids)) if position not in unfinished]
        if not rows:
            return None, done
        owners = [self.owner[r] for r in rows]
        chunk_numbers = _chunk_numbers(owners) if self.chunked else None
        return RowBatch(
            ids=[f"{self.ids[o]}#{n}" for o, n in zip(owners, chunk_numbers)] if self.chunked
            else [self.ids[o] for o in owners],
            content_hashes=[self.hashes[o] for o in owners],
            texts=[self.texts[r] for r in rows] if self.store_text else None,
            dense=self.dense[rows],
            sparse=[self.sparse[r] for r in rows],
            colbert=[self.colbert[r] for r in rows] if self.colbert is not None else None,
            doc_ids=[self.ids[o] for o in owners] if self.chunked else None,
            chunks=chunk_numbers,
            spans=[self.spans[r] for r in rows] if self.chunked else None,
        ), done


def encode_documents(encoder: Encoder, ids: Sequence[str], texts: Sequence[str], hashes: Sequence[str], *,
                     colbert: bool, store_text: bool, max_length: int, chunking: dict | None,
                     batch_tokens: int) -> tuple[RowBatch | None, int, int]:
    """Documents -> (their rows in input order, tokens encoded, documents truncated), in this thread.

    The local engine's steps without its overlap, for callers that bring their own parallelism (Ray actors).
    """
    rows = WindowRows(encoder, ids, texts, hashes, colbert=colbert, store_text=store_text, max_length=max_length,
                      chunking=chunking)
    lengths = rows.lengths
    for batch in token_budget_batches(lengths, batch_tokens):
        rows.place(batch, encoder.encode_ids([rows.token_ids[i] for i in batch], colbert=colbert))
    batch_rows, _ = rows.complete_documents(np.ones(len(lengths), dtype=bool))
    return batch_rows, sum(lengths), rows.truncated


def _chunk_numbers(owners: list[int]) -> list[int]:
    """0, 1, 2... within each run of rows that belong to the same document."""
    numbers, previous, count = [], None, 0
    for owner in owners:
        count = count + 1 if owner == previous else 0
        numbers.append(count)
        previous = owner
    return numbers


def token_budget_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Positions grouped into batches, longest first, each padded batch within `batch_tokens`.

    Padded size is rows x longest row; a text longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for position in order:
        # Sorted longest first, so the batch's first row sets its padded length.
        longest = lengths[current[0]] if current else lengths[position]
        if current and (longest * (len(current) + 1) > batch_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(position)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------
# Searching


@dataclass(frozen=True)
class Query:
    id: str
    text: str


@dataclass(frozen=True)
class RankedDocument:
    rank: int
    id: str
    hit: Hit
    text: str | None = None
    top_tokens: tuple[tuple[str, float], ...] = ()
    passage_id: str | None = None  # with --group-by-doc: the best passage of the document


@dataclass(frozen=True)
class QueryResult:
    query: Query
    hits: list[RankedDocument]


def encode_queries(encoder: Encoder, texts: Sequence[str], colbert: bool = False) -> list[QueryVectors]:
    """Queries -> vectors, the one way every search backend encodes them (at most QUERY_MAX_LENGTH tokens)."""
    vectors: list[QueryVectors] = []
    for start in range(0, len(texts), 32):
        encoded = encoder.encode_texts(texts[start:start + 32], QUERY_MAX_LENGTH, colbert=colbert)
        for row in range(len(encoded.dense)):
            ids, weights = encoded.sparse[row]
            vectors.append(QueryVectors(encoded.dense[row], ids, weights,
                                        encoded.colbert[row] if encoded.colbert is not None else None))
    return vectors


class IndexSearch:
    """An opened index with the encoder that made it, ready for queries."""

    def __init__(self, index_dir: Path, model: str | None = None, device: str = "auto", dtype: str = "auto"):
        self.index_dir = index_dir
        self.manifest = read_manifest(index_dir)
        recorded = ModelIdentity.from_json(self.manifest.model)
        # auto: queries in the precision the documents were encoded in.
        dtype = self.manifest.model.get("dtype", "auto") if dtype == "auto" else dtype
        self.encoder = load_encoder(model or recorded.name, device, dtype, expected=recorded)
        shards = open_store(index_dir, self.manifest)
        self.shard_starts = np.array([s.start for s in shards] + [sum(s.rows for s in shards)], dtype=np.int64)
        self.searcher = Searcher(shards, self.manifest.vocab_size, doc_ids=self._doc_ids)

    def encode_queries(self, texts: Sequence[str], colbert: bool = False) -> list[QueryVectors]:
        return encode_queries(self.encoder, texts, colbert)

    def search(self, queries: Sequence[Query], k: int = 10, mode: str = "hybrid",
               weights: ScoreWeights = ScoreWeights(), explain: bool = False, with_text: bool = True,
               group_by_doc: bool = False, fusion: str = "weighted", normalize: str | None = None
               ) -> list[QueryResult]:
        if mode == "colbert" and not self.manifest.has_colbert:
            raise IndexFormatError(f"{self.index_dir} has no ColBERT vectors: rebuild it with --colbert, "
                                   "or search with --mode hybrid|dense|sparse")
        query_vectors = self.encode_queries([q.text for q in queries], colbert=(mode == "colbert"))
        all_hits = self.searcher.search_many(query_vectors, k, mode, weights, fetch_colbert=self._fetch_colbert,
                                             group_by_doc=group_by_doc, fusion=fusion, normalize=normalize)
        return [QueryResult(query, self._describe(vectors, hits, explain, with_text, group_by_doc))
                for query, vectors, hits in zip(queries, query_vectors, all_hits)]

    def _locations(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        shard_numbers = np.searchsorted(self.shard_starts, rows, side="right") - 1
        return [(int(s), int(r - self.shard_starts[s])) for s, r in zip(shard_numbers, rows)]

    def _doc_ids(self) -> np.ndarray:
        column = "doc_id" if self.manifest.chunking else "id"
        return read_column(self.index_dir, self.manifest, column)

    def _fetch_colbert(self, rows: Sequence[int]) -> list[np.ndarray]:
        return read_rows(self.index_dir, self.manifest, self._locations(rows), "colbert")

    def _describe(self, query: QueryVectors, hits: list[Hit], explain: bool, with_text: bool,
                  grouped: bool) -> list[RankedDocument]:
        locations = self._locations([h.row for h in hits])
        ids = read_rows(self.index_dir, self.manifest, locations, "id") if hits else []
        texts = read_rows(self.index_dir, self.manifest, locations, "text") \
            if with_text and self.manifest.store_text and hits else [None] * len(hits)
        doc_ids = read_rows(self.index_dir, self.manifest, locations, "doc_id") \
            if grouped and self.manifest.chunking and hits else ids
        ranked = []
        for rank, (hit, row_id, doc_id, text) in enumerate(zip(hits, ids, doc_ids, texts), start=1):
            tokens: tuple[tuple[str, float], ...] = ()
            if explain:
                tokens = tuple((self.encoder.decode_token(token), weight)
                               for token, weight in self.searcher.sparse_contributions(query, hit.row)[:8])
            if grouped:
                ranked.append(RankedDocument(rank, doc_id, hit, text, tokens, row_id))
            else:
                ranked.append(RankedDocument(rank, row_id, hit, text, tokens))
        return ranked
