"""What an index run decides, whichever engine encodes: one implementation for the local and the Ray engine.

An engine reads documents and encodes the ones this module says need it;
this module owns every decision around that:

- the setup: the previous manifest, the model's identity (no weights loaded),
  the precision, the manifest this run writes and its compatibility with the
  index's settings, and the map of the rows already indexed;
- what each occurrence of an id is: a skipped record (`--strict` stops the
  run), a duplicate (the last occurrence wins, with a warning naming both
  places), unchanged (same id, same content hash), or a document to encode;
- the outcome of each id (an `Outcome`) and the counts in the summary;
- removals: an indexed id that the inputs no longer hold is removed only by
  a run that completed and read every input whole (unless `--keep-missing`);
  an input that could not be read whole is named in the summary
  (`failed_inputs`), and a bad record whose id is known keeps that id's rows
  (`Outcome.KEPT`); a run that would remove more than `--max-remove` of the
  index's documents (default half: an unmounted share reads as an empty
  folder) removes nothing and says why (`removal_refused`);
- the commit: a run writes a new generation only when something changed (or
  the index is new, or a stopped run's index is now complete), then builds
  the search files; a no-change run writes nothing at all.

Nothing here imports torch: a dry run and a run that finds nothing to encode
never load it. Engines see the run through `IndexRun`; a typical engine does

    run = IndexRun(index_dir, options, events, device_type=lambda: "cpu")
    for item in documents:
        if isinstance(item, Skipped): run.skip(item); continue
        prior = run.arrive(item.id, item.source, item.line)
        ...  # drop the prior occurrence if it is still unwritten
        if run.decide(item.id, hash_, item.source, item.line, replacing=...) is Outcome.UNCHANGED: continue
        ...  # encode, write, then: run.retire(old rows); run.settle(item.id)
    summary = run.finish()
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from bge_index import __version__
from bge_index.input.documents import FieldNames, Skipped
from bge_index.input.types import DEFAULT_MAX_DOCUMENT_BYTES
from bge_index.errors import IndexMismatchError, InvalidOptionError, OutputFolderError, StrictModeError
from bge_index.store.manifest import Manifest, read_manifest
from bge_index.store.shard_reader import RowLocation
from bge_index.store.info import index_size_bytes
from bge_index.store.files import fault_point
from bge_index.store.names import LOCK_FILE, is_index, is_index_data_file
from bge_index.model.identity import (DEFAULT_MODEL, ModelIdentity, ModelInfo, check_chunk_overlap, choose_precision,
                                      identify_model)


def content_hash(text: str, metadata: dict[str, str] | None = None) -> str:
    """What incremental runs compare: 128 bits of BLAKE2b over the document text and its record's other fields.

    A file's own metadata (FILE_METADATA_KEYS: its size and mtime) is left out, so a `touch` re-encodes nothing;
    a document without other fields hashes as it always did.
    """
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
    fields = {k: v for k, v in (metadata or {}).items() if k not in FILE_METADATA_KEYS}
    if fields:
        digest.update(b"\0" + json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


FILE_METADATA_KEYS = frozenset({"path", "size", "mtime"})  # input.formats.file_metadata's


@dataclass(frozen=True)
class IndexOptions:
    """Everything an index run is asked to do, engine aside (see the README's `index` options)."""

    model: str | None = None  # None: the model an existing index records, else BAAI/bge-m3
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
    follow_links: bool = False  # read files in input folders whose symbolic links lead out of them
    id_from: str = "path"  # a whole-file document's id: its path ("path"), file name ("name") or stem ("stem")
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES  # a larger document is skipped, never the run
    dry_run: bool = False
    wait: bool = False
    max_remove: str = "50%"  # --max-remove: a share ("50%", "0.5") or a count ("100") of the index's documents

    def __post_init__(self) -> None:
        parse_max_remove(self.max_remove)  # InvalidOptionError (exit 2) before any work
        if self.batch_tokens < 1 or self.shard_rows < 1 or self.max_length < 2:
            raise InvalidOptionError("--batch-tokens and --shard-rows must be at least 1, --max-length at least 2")
        if self.chunk_tokens is not None and self.chunk_tokens < 3:
            raise InvalidOptionError("--chunk-tokens must be at least 3 (<s>, one token, </s>)")
        if self.max_document_bytes < 1:
            raise InvalidOptionError("--max-document-bytes must be at least 1")
        if self.chunk_overlap < 0:
            raise InvalidOptionError("--chunk-overlap must not be negative")
        if self.chunk_tokens is not None:
            # Checked again against the model's own limit when the run starts (index_manifest).
            check_chunk_overlap(self.chunk_tokens, self.chunk_overlap)


HELD_BACK_NAMED = 100  # ids named in the report (and the first few in the error line) when removals wait


class Outcome(str, Enum):
    """What became of a document id in this run."""

    UNCHANGED = "unchanged"  # in the index with the same content: not encoded again
    PENDING = "pending"  # to be encoded; its rows are not written yet
    ADDED = "added"  # written, new to the index
    UPDATED = "updated"  # written, replacing the rows of an earlier version
    NOT_REACHED = "not reached"  # a stop came first; an earlier version stays live
    KEPT = "kept"  # a bad record with this id was skipped: the index's rows of it stay (never removed)


_COUNTED = (Outcome.UNCHANGED, Outcome.ADDED, Outcome.UPDATED)


@dataclass
class IndexProgress:
    """A progress report: documents seen so far (unchanged ones included), encoded, tokens, seconds."""

    documents: int
    encoded: int
    tokens: int
    elapsed: float
    loading: float = 0.0  # of `elapsed`, seconds spent loading the model (rates leave them out)


@dataclass
class IndexSummary:
    """What a run did, for the CLI's summary and the `--report` JSON."""

    index_dir: Path
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    duplicates: int = 0
    rows: int = 0  # rows encoded (passages, when chunked)
    tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # stable skip codes -> count
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
    failed_inputs: list[dict] = field(default_factory=list)  # {"location", "reason"} of inputs not read whole
    removal_refused: str = ""  # why the removals were held back by --max-remove ("" if they were not)
    # Indexed ids absent from this run's inputs whose removal waits because some input was not read whole
    # (it may hold them): how many, and the first HELD_BACK_NAMED of them, sorted.
    held_back: int = 0
    held_back_ids: list[str] = field(default_factory=list)
    created: bool = False  # this run wrote the index's first generation

    @property
    def encoded(self) -> int:
        """Documents encoded and written: added + updated."""
        return self.added + self.updated

    @property
    def working_seconds(self) -> float:
        """The seconds the rates are measured over: encoding time when the engine measured it, else the run's
        time without the model load (never the load: a one-document run would read as 0.1 docs/s)."""
        return self.encode_seconds if self.encode_seconds > 0 else max(self.elapsed - self.load_seconds, 0.0)

    @property
    def documents_per_second(self) -> float:
        """Encoded documents per second of `working_seconds` (0.0 until it is known)."""
        return self.encoded / self.working_seconds if self.working_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens encoded per second of `working_seconds` (0.0 until it is known)."""
        return self.tokens / self.working_seconds if self.working_seconds > 0 else 0.0

    @property
    def changed(self) -> bool:
        """Whether the run changed the index's documents (or would, in a dry run)."""
        return bool(self.added or self.updated or self.removed)

    def to_json(self) -> dict:
        """The `--report` document."""
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
            "failed_inputs": list(self.failed_inputs),
            "removal_refused": self.removal_refused or None,
            "removals_held_back": {"count": self.held_back, "ids": list(self.held_back_ids)} if self.held_back else None,
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

    def stage(self, description: str) -> None:
        """The run enters a long step that encodes nothing yet (e.g. "loading model")."""


@dataclass(slots=True)  # one per indexed document: kept small
class Existing:
    """A document of the previous state: its content hash and live rows (empty once this run replaced them)."""

    hash: str
    rows: list[RowLocation]
    source: str | None = None  # the real path of the file it came from; None where the index does not record it


@dataclass(slots=True)  # one per document id of the run: kept small
class Seen:
    """A document id met in this run: where (file, and line in it), and what became of it.

    `slot` is engine bookkeeping (the local engine: window number and position of a pending document).
    """

    source: str  # shared by the documents of a file
    line: int | None
    outcome: Outcome
    slot: tuple[int, int] | None = None

    @property
    def where(self) -> str:
        """`file:line` of this occurrence, or the file alone."""
        return where(self.source, self.line)


def where(source: str, line: int | None) -> str:
    """`file:line`, or the file alone for whole-file documents."""
    return f"{source}:{line}" if line is not None else source


class IndexRun:
    """One index run's decisions and counts, from the previous manifest to the committed one.

    `device_type` says where encoding would run ("cpu", "cuda", ...); it is
    asked only when the precision depends on it (a new index with dtype auto),
    so a run over an existing index never needs torch to decide.
    """

    def __init__(self, index_dir: Path, options: IndexOptions, events: IndexEvents,
                 device_type: Callable[[], str]):
        self.index_dir = index_dir
        self.options = options
        self.events = events
        self.started = time.perf_counter()
        self.summary = IndexSummary(index_dir, dry_run=options.dry_run)
        self.previous = read_manifest(index_dir) if is_index(index_dir) else None
        known = ModelIdentity.from_json(self.previous.model) if self.previous else None
        # An existing index is extended with the model it records (as `search` does); a hub id comes from the
        # local cache at the recorded revision when it is there, so a dry run of an index needs no network.
        self.model_name = options.model or (recorded_model(known) if known else DEFAULT_MODEL)
        self.model: ModelInfo = identify_model(self.model_name, known=known, offline=options.dry_run)
        self.precision = self._precision(device_type)
        self.manifest = index_manifest(options, self.model, self.previous, self.precision)
        if self.previous is not None:
            check_compatible(index_dir, self.previous, self.manifest)
        self.existing = self._load_existing()
        self.seen: dict[str, Seen] = {}
        self.inputs_incomplete = False  # an input could not be read whole: absent ids are not removals
        self.incomplete_sources: set[str] = set()  # the real paths of the inputs (files, folders) not read whole
        self._real_sources: dict[str, str] = {}
        self.deleted_any = False
        self.writer = None  # a shard_writer.IndexWriter, once the engine opens one (never in a dry run)
        self.checkpoints = 0  # partial commits made as shards completed
        self.last_commit = time.monotonic()  # when this run last committed, or began writing
        self.summary.max_length = self.manifest.model["max_length"]
        self.summary.model = self.model.identity.describe()

    def _precision(self, device_type: Callable[[], str]) -> str:
        if self.options.dtype == "auto" and self.previous is not None:
            return self.previous.model["dtype"]  # an index is extended in its own precision
        if self.options.dtype != "auto":
            return choose_precision(self.options.dtype, "cpu")  # as asked: the device does not matter
        if self.options.dry_run:
            return "auto"  # a dry run over a new index writes no manifest: no need to ask the device
        return choose_precision(self.options.dtype, device_type())

    def _load_existing(self) -> dict[str, Existing]:
        from bge_index.store.shard_reader import iter_live_keys

        existing: dict[str, Existing] = {}
        if self.previous is not None:
            for doc_id, hash_, location, source in iter_live_keys(self.index_dir, self.previous, with_source=True):
                entry = existing.get(doc_id)
                if entry is None:
                    existing[doc_id] = Existing(hash_, [location], source)
                else:
                    entry.rows.append(location)
        return existing

    def real_source(self, source: str) -> str:
        """What a row records as its source: the file's real path (`<stdin>` as is), so runs from other
        folders or through other spellings of a path agree on it."""
        real = self._real_sources.get(source)
        if real is None:
            real = source if source.startswith("<") else os.path.realpath(source)
            self._real_sources[source] = real
        return real

    def open_writer(self):
        """The writer of this run's generation (None in a dry run)."""
        from bge_index.store.shard_writer import IndexWriter

        if not self.options.dry_run and self.writer is None:
            remove_staging(self.index_dir)  # a killed Ray run's staged files: never adopted now, only disk space
            self.writer = IndexWriter(self.index_dir, self.manifest, self.options.shard_rows, base=self.previous)
            self.last_commit = time.monotonic()
        return self.writer

    # -- occurrences ------------------------------------------------------------

    def skip(self, item: Skipped) -> None:
        """A record that cannot be indexed: counted and reported; under --strict the run stops here."""
        if self.options.strict:
            raise StrictModeError(item)
        self.summary.skipped[item.category] += 1
        if item.hides_documents:
            self.inputs_incomplete = True
            self.incomplete_sources.add(self.real_source(item.source))
            self.summary.failed_inputs.append({"location": item.location, "reason": item.reason})
        doc_id = getattr(item, "doc_id", None)
        if doc_id is not None and doc_id not in self.seen:
            # The id was read but its record is bad: the index's copy stays (a later good occurrence replaces it).
            self.seen[doc_id] = Seen(item.source, item.line, Outcome.KEPT)
        self.events.skipped(item)

    def arrive(self, doc_id: str, source: str, line: int | None) -> Seen | None:
        """Note an occurrence of `doc_id`; returns the earlier occurrence if this id was met before.

        The later occurrence wins: the earlier one's counted outcome is undone
        here, and the engine drops its rows once this one's are written.
        """
        prior = self.seen.get(doc_id)
        if prior is not None and prior.outcome is Outcome.KEPT:
            return None  # a skipped bad record is no occurrence to replace: this one is simply the document
        if prior is not None:
            self.events.warning(f"duplicate id {doc_id!r}: {where(source, line)} replaces "
                                f"the earlier occurrence at {prior.where}")
            self.summary.duplicates += 1
            self._count(prior.outcome, -1)
        return prior

    def unchanged(self, doc_id: str, hash_: str, replacing: bool = False) -> bool:
        """Whether the index already holds this document as is (and this run replaced none of its rows)."""
        old = self.existing.get(doc_id)
        return old is not None and bool(old.rows) and not replacing and old.hash == hash_

    def decide(self, doc_id: str, hash_: str, source: str, line: int | None, replacing: bool = False,
               slot: tuple[int, int] | None = None) -> Outcome:
        """Record this occurrence as unchanged or pending (to encode); returns which."""
        outcome = Outcome.UNCHANGED if self.unchanged(doc_id, hash_, replacing) else Outcome.PENDING
        self.seen[doc_id] = Seen(source, line, outcome, slot)
        self._count(outcome, +1)
        return outcome

    def old_rows(self, doc_id: str) -> list[RowLocation]:
        """The previous state's live rows of `doc_id` (empty if new, or already replaced in this run)."""
        old = self.existing.get(doc_id)
        return list(old.rows) if old is not None else []

    def was_indexed(self, doc_id: str) -> bool:
        """Whether the previous state held `doc_id` (even if this run has since replaced its rows)."""
        return doc_id in self.existing

    def settle(self, doc_id: str, written: bool = True) -> Outcome:
        """A pending document's rows are written: it is added, or updated if the index held it before.

        `written` False: a dry run's verdict (the rows it would replace stay the previous state's).
        """
        old = self.existing.get(doc_id)
        if old is not None and written:
            old.rows = []  # replaced: no longer the previous state's rows
        outcome = Outcome.UPDATED if old is not None else Outcome.ADDED
        self.seen[doc_id].outcome = outcome
        self._count(outcome, +1)
        return outcome

    def not_reached(self, doc_id: str) -> None:
        """A stop came before this pending document was written: the rows it would replace stay live."""
        self.seen[doc_id].outcome = Outcome.NOT_REACHED

    def checkpoint_if(self, shard_done: bool) -> bool:
        """Commit a checkpoint when the engine says a shard's worth of rows is written (`shard_done`) or the last
        commit is CHECKPOINT_SECONDS back: a killed run loses at most about a shard and that much writing (the next
        run finds the rest unchanged). Whether it committed. Call it between documents, never inside one."""
        if shard_done or time.monotonic() - self.last_commit >= CHECKPOINT_SECONDS:
            self.checkpoint()
            return True
        return False

    def checkpoint(self) -> None:
        """Commit what is written so far as a partial generation, and go on writing on top of it.

        Engines call it through `checkpoint_if`, each time a shard's worth is written: a run killed (SIGKILL,
        power loss) loses at most the shard in progress, and the next run finds the committed documents unchanged
        instead of encoding them again. Each checkpoint is a consistent state: a document's new rows and the retiring
        of its old ones are committed together; removals wait for the run's end. Readers see whole
        generations only (the manifest switch), with `state: partial` until the last commit.
        """
        if self.writer is None:
            return
        from bge_index.store.manifest import Manifest
        from bge_index.store.shard_writer import IndexWriter

        committed = self.writer.commit(state="partial", checkpoint=True)
        fault_point("checkpoint")
        self.last_commit = time.monotonic()
        self.summary.wrote = True
        self.checkpoints += 1
        following = Manifest.from_json(committed.to_json())  # the same settings, as a new generation
        following.shards, following.documents = [], 0
        following.generation = committed.generation + 1
        self.manifest = following
        self.writer = IndexWriter(self.index_dir, following, self.options.shard_rows, base=committed)

    def retire(self, locations: list[RowLocation]) -> None:
        """Rows no longer live once this run commits."""
        for location in locations:
            self.writer.delete(location)
            self.deleted_any = True

    def _count(self, outcome: Outcome, delta: int) -> None:
        if outcome in _COUNTED:
            setattr(self.summary, outcome.value, getattr(self.summary, outcome.value) + delta)

    # -- the end ----------------------------------------------------------------

    def removals(self) -> dict[str, list[RowLocation]]:
        """Indexed ids this run may remove: absent from inputs that were all read whole, in a complete run."""
        if self.summary.interrupted or self.options.keep_missing:
            return {}
        gone = {doc_id: old.rows for doc_id, old in self.existing.items() if doc_id not in self.seen}
        if self.inputs_incomplete:
            # An input not read whole may hold the ids it gave before: those are not removed, and they are named
            # (the CLI exits 1). Rows record their source file, so only that file's ids wait (rows of an index
            # written before sources were recorded: all of them). What held nothing back fails nothing.
            held = sorted(doc_id for doc_id in gone if self._may_hold(self.existing[doc_id].source))
            self.summary.held_back = len(held)
            self.summary.held_back_ids = held[:HELD_BACK_NAMED]
            for doc_id in held:
                del gone[doc_id]
        limit = removal_limit(self.options.max_remove, len(self.existing))
        if len(gone) > limit:
            share = len(gone) / len(self.existing)
            self.summary.removal_refused = (
                f"this run would remove {len(gone):,} of the index's {len(self.existing):,} documents "
                f"({share:.0%}), more than --max-remove {self.options.max_remove} allows; nothing was removed "
                "(is an input missing or unmounted? if the removals are meant, run again with --max-remove 100%)")
            self.events.warning(self.summary.removal_refused)
            return {}
        return gone

    def _may_hold(self, source: str | None) -> bool:
        """Whether an input not read whole in this run may hold a document that came from `source`."""
        if source is None or source in self.incomplete_sources:
            return True
        return any(source.startswith(folder.rstrip(os.sep) + os.sep) for folder in self.incomplete_sources)

    def finish(self) -> IndexSummary:
        """Apply removals, commit if anything changed (the writer builds the search files before it) and fill in
        the summary."""
        for doc_id, rows in self.removals().items():
            self.summary.removed += 1
            if self.writer is not None:
                self.retire(rows)
        complete = not self.summary.interrupted
        changed = self.summary.rows > 0 or self.deleted_any
        previous = self.previous
        final = previous
        if self.writer is not None:
            if previous is None or changed or (complete and previous.state != "complete"):
                final = self.writer.commit(state="complete" if complete else "partial")
                self.summary.wrote = True
                self.summary.created = previous is None
            else:
                self.writer.remove_leftovers()
        if final is not None:  # None only for a dry run over a folder that is not an index yet
            self.summary.generation = final.generation
            self.summary.shards = len(final.shards)
            self.summary.live_rows = final.documents
            self.summary.bytes = index_size_bytes(self.index_dir, final)
        self.summary.elapsed = time.perf_counter() - self.started
        return self.summary

    def abort(self) -> None:
        """The run failed: remove what its writer wrote (the previous state stays)."""
        if self.writer is not None:
            self.writer.abort()


# ---------------------------------------------------------------------------
# Settings


def recorded_model(identity: ModelIdentity) -> str:
    """What to load for an index's recorded model: its folder, or its hub id."""
    return identity.name


def parse_max_remove(text: str) -> tuple[str, float]:
    """`--max-remove`: ("share", 0.5) for "50%" or "0.5", ("count", 100) for "100"; else InvalidOptionError.

    Plain ASCII digits only: Python's int() and float() would also take "1_0", "１０" and "1e2".

        >>> parse_max_remove("50%"), parse_max_remove("0.25"), parse_max_remove("100")
        (('share', 0.5), ('share', 0.25), ('count', 100))
    """
    match = _MAX_REMOVE.fullmatch(str(text).strip())
    if match is not None:
        number, percent = match.groups()
        if percent or "." in number:
            share = float(number) / (100 if percent else 1)
            if 0 <= share <= 1:
                return "share", share
        else:
            return "count", int(number)
    raise InvalidOptionError(f"--max-remove {text}: expected a share (50%, 0.5) or a count of documents (100)")


_MAX_REMOVE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(%?)", re.ASCII)


def removal_limit(max_remove: str, indexed: int) -> float:
    """How many of an index's `indexed` documents one run may remove under `--max-remove`."""
    kind, value = parse_max_remove(max_remove)
    return value * indexed if kind == "share" else value



CHECKPOINT_SECONDS = 60.0  # at most this long between partial commits while an engine writes (checkpoint_if)

# Where an engine's workers write shards that the run then adopts (the Ray engine), inside INDEX_DIR so that the
# adoption is a rename. A folder apart: a checkpoint's commit removes the index folder's temporary files, and
# these may still be being written. Readers never look in it; the next run of either engine removes it.
STAGING_DIR = ".staging"


def remove_staging(index_dir: Path) -> None:
    """Remove INDEX_DIR/.staging and what is in it (a link there is removed, never followed); best effort."""
    path = index_dir / STAGING_DIR
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError:
        pass  # nothing reads it: a later run tries again


def refuse_foreign_folder(index_dir: Path) -> None:
    """--out must be an index, a new folder, or what a crashed first build left (shards, staged shards, a lock)."""
    try:
        if is_index(index_dir) or not index_dir.exists():
            return
        foreign = not index_dir.is_dir() or any(p.name not in (LOCK_FILE, STAGING_DIR)
                                                and not is_index_data_file(p.name) for p in index_dir.iterdir())
    except OSError as error:
        raise OutputFolderError(f"--out {index_dir}: cannot be read ({error.strerror or error})") from error
    if foreign:
        raise OutputFolderError(f"--out {index_dir}: exists and is not a bge-index index; "
                                "refusing to write into it (choose an empty or new folder)")


def index_manifest(options: IndexOptions, info: ModelInfo, previous: Manifest | None, precision: str) -> Manifest:
    """The manifest a run with these options writes (shards and counts still empty).

    `precision` is the encoding dtype's name, for the devices that encode (a Ray engine's workers', not the driver's).
    """
    max_length = info.effective_max_length(options.max_length)
    chunking = None
    if options.chunk_tokens is not None:
        tokens = info.effective_max_length(options.chunk_tokens)
        check_chunk_overlap(tokens, options.chunk_overlap)
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


def check_compatible(index_dir: Path, previous: Manifest, wanted: Manifest) -> None:
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
