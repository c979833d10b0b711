"""The Ray engine (`bge-index index --engine ray`): the same index run, its encoding spread over a Ray cluster.

Ray Data does the distribution; this module says what runs where. A run has three steps:

1. plan: Ray read tasks parse the input files with the input readers
   (formats.py, through documents.py; one task per file) and send back each record's id and content hash, not
   its text. The driver hands them to run.py's IndexRun, the code that
   decides for the local engine too: the last occurrence of an id wins, a
   document whose id and hash are in the index is unchanged, an indexed id
   absent from inputs read whole is removed;
2. encode and stage: read tasks read the chosen records again, a pool of
   actors (the model loaded once per actor, with encoder.py's Encoder: the
   local engine's code, not a copy) tokenises them, encodes them in
   token-budget batches, builds Arrow tables with shard_writer.rows_to_table
   (the shard schema, manifest.py) and writes each call's rows as staged
   shards (at most --shard-rows rows a file, the index's write options and
   row groups) in INDEX_DIR/.staging/; a call returns only the names of its
   files, once they are complete. A call's files hold whole documents: every
   row of a document (its passages, when chunked) comes from one call;
3. adopt and commit (driver), as the calls complete: IndexWriter.adopt checks,
   fsyncs and renames each file of a call to the next
   `shard-GGGGGG-NNNNN.parquet`, and IndexRun retires the rows its documents
   replace and settles them. Each time a shard's worth of rows (--shard-rows)
   has been adopted, or CHECKPOINT_SECONDS have passed, `IndexRun.checkpoint_if`
   commits a partial generation, exactly as the local engine does when a
   shard is complete; the run's end (`IndexRun.finish`) applies removals and
   commits the last generation. From then on it is an index like any other:
   the local engine extends it and vice versa.

A SIGKILL of the driver therefore loses at most the work since the last
checkpoint (about a shard, or a minute of writing): the manifest names whole
generations only (state `partial`), a staged file is never named by one, and
a shard renamed but not committed is a file no manifest names, removed by the
next commit; the next run (either engine) finds the committed documents
unchanged. Commits happen between calls only, so a generation never holds
part of a document.

Staged files are named `<run>-<call>-N.parquet.tmp` (a uuid per call, so a
retried call never collides with its first attempt). They are written in a
folder apart because a checkpoint's commit removes the index folder's
temporary files while the actors are still writing theirs; readers never look
in .staging, and it is removed at the run's end (or by the next run, of either
engine, after a crash). On a cluster the index folder must therefore be on a
file system every worker can write (NFS, a shared volume), and the inputs
readable under the same paths.

This module necessarily touches Arrow tables (map_batches hands batches over
as `pyarrow` tables, and the actors write tables), but the schema, the names
and the write options stay defined in manifest.py.

Ray itself is imported lazily (it is the optional extra `bge-index[ray]`),
and only after RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set when a local
instance is started, which makes Ray bind to the loopback address only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from bge_index.model.batching import encode_documents
from bge_index.input.documents import (STDIN_NAME, Document, FieldNames, InputFile, SkipReason, Skipped, read_input_file,
                                 resolve_inputs)
from bge_index.errors import ExtraUnavailableError, InvalidOptionError
from bge_index.extras import require
from bge_index.store.lock import run_lock
from bge_index.store.manifest import SHARD_ROW_GROUP_ROWS, SHARD_WRITE_OPTIONS, shard_schema
from bge_index.run.index_run import content_hash
from bge_index.run.index_run import (STAGING_DIR, IndexEvents, IndexOptions, IndexProgress, IndexRun, IndexSummary,
                                     Outcome, refuse_foreign_folder, remove_staging)
from bge_index.store.shard_reader import read_shard_column
from bge_index.store.shard_writer import create_exclusive, rows_to_table, writing

DOCUMENTS_PER_CALL = 256  # documents per block and per actor call (sorted by length inside the call)
_LOOPBACK = "127.0.0.1"


def import_ray(local: bool):
    """Ray, imported lazily; for a local instance, first make it bind to loopback only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: with it
    off, the node takes 127.0.0.1 as its address instead of the machine's
    outward one, so nothing listens on other interfaces. Not set when joining
    a cluster (the driver must then be reachable from the other nodes).
    """
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
            # Ray was imported before this process set the variable: it has already read it, so tell it
            # directly (a private constant, read when the node picks its address) or it binds everywhere.
            constants.ENABLE_RAY_CLUSTER = False
    ray = require("ray", "ray", "--engine ray")
    require("ray.data", "ray", "--engine ray")
    # Ray Data's own progress lines would interleave with ours (the CLI reports progress from RunCounters).
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` None starts a local instance (loopback only) for this run."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: 1 on a cluster; locally, a share that leaves room for I/O tasks


@dataclass(frozen=True)
class Reservations:
    """What each Ray task and actor asks the scheduler for, and how many threads an actor's torch uses.

    Locally the actors together reserve all CPUs but `io_cpus`, which stay for
    the read tasks (the actors write their shards themselves): two 1-CPU actors on a 2-CPU node starve the read
    task and the run hangs. An actor's reservation may be fractional; its
    torch still uses `threads` threads (the CPU is shared with light I/O).
    """

    actor_cpus: float
    actor_gpus: float
    io_cpus: float
    threads: int | None  # None: leave torch's default (GPU workers)


def plan_reservations(options: RayOptions, cluster_cpus: float, local: bool) -> Reservations:
    """What to reserve: GPU and cluster actors take --cpus-per-worker (default 1); locally, CPU actors share
    all CPUs but the I/O tasks' (each at most --cpus-per-worker) and torch gets CPUs // workers threads."""
    if options.gpus_per_worker > 0:
        return Reservations(options.cpus_per_worker or 1.0, options.gpus_per_worker, 1.0, None)
    if not local:
        cpus = options.cpus_per_worker or 1.0
        return Reservations(cpus, 0.0, 1.0, max(1, int(cpus)))
    io_cpus = 1.0 if cluster_cpus >= 2 else cluster_cpus / 2
    share = (cluster_cpus - io_cpus) / options.workers
    actor_cpus = min(options.cpus_per_worker or share, share)
    return Reservations(actor_cpus, 0.0, io_cpus, max(1, int(cluster_cpus // options.workers)))


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[tuple[object, bool]]:
    """(ray, local) with Ray initialised: an instance already running in this process is used as is
    (and left running); otherwise `options.address` is joined, or a local one started and stopped after."""
    local = options.address is None
    ray = import_ray(local)
    if ray.is_initialized():
        yield ray, _is_local_instance(ray)
        return
    handlers = _stop_handlers()
    if local:
        start_local_ray(ray)
    else:
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ExtraUnavailableError(f"--ray-address {options.address}: cannot join the Ray cluster ({error})") \
                from error
    _restore_stop_handlers(handlers)
    try:
        yield ray, local
    except BaseException:
        # Aborting (a second stop request, a failure): the write thread may still be inside Ray Data, which
        # logs tracebacks once Ray is shut down under it. The run's own error is what the user must see.
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        raise
    finally:
        ray.shutdown()


def _stop_handlers() -> dict[int, object]:
    """This process's SIGINT/SIGTERM handlers (the CLI's stop requests), to put back after `ray.init`."""
    return {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}


def _restore_stop_handlers(handlers: dict[int, object]) -> None:
    """Undo what `ray.init` does to signals: it sets a Python SIGTERM handler that exits at once (status 15) and
    its core worker installs a native crash handler for SIGTERM that dumps a stack and kills the process (status
    15 or 134). Either way a stop request would lose the run's work; re-setting the handlers from Python also
    re-installs them in the kernel, over the native one. Only the main thread may set handlers."""
    if threading.current_thread() is threading.main_thread():
        for number, handler in handlers.items():
            if handler is not None:
                signal.signal(number, handler)


def start_local_ray(ray=None, num_cpus: int | None = None) -> None:
    """A Ray instance on this machine only: loopback addresses, no dashboard, quiet workers."""
    ray = ray or import_ray(local=True)
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _node_ip_address=_LOOPBACK,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


def _is_local_instance(ray) -> bool:
    return all(node.get("NodeManagerAddress") == _LOOPBACK for node in ray.nodes() if node.get("Alive"))


# ---------------------------------------------------------------------------
# Step 1: the plan


def _plan_rows_of_file(item: dict, fields: FieldNames, max_bytes: int) -> list[dict]:
    """Ray read task: one input file -> one small row per record (id and hash, or why it was skipped)."""
    input_file = InputFile(Path(item["path"]), item["doc_id"], root=item["root"])
    rows = []
    for ordinal, record in enumerate(read_input_file(input_file, fields, max_bytes)):
        if isinstance(record, Document):
            rows.append({"file": item["file"], "ordinal": ordinal, "id": record.id, "hash": content_hash(record.text, record.metadata),
                         "line": record.line, "reason": None, "hides": False, "code": None})
        else:
            # "id": a bad record's id when it was read (its indexed rows are kept), else None.
            rows.append({"file": item["file"], "ordinal": ordinal, "id": getattr(record, "doc_id", None),
                         "hash": None, "line": record.line, "reason": record.reason,
                         "hides": record.hides_documents, "code": record.code.value})
    return rows


def _documents_of_file(item: dict, fields: FieldNames, max_bytes: int) -> list[dict]:
    """Ray read task: the chosen records of one input file, with their text (a record whose text
    changed since the plan is left out: it is not what the plan decided to encode)."""
    input_file = InputFile(Path(item["path"]), item["doc_id"], root=item["root"])
    wanted = dict(zip(item["ordinals"], item["hashes"]))
    rows = []
    for ordinal, record in enumerate(read_input_file(input_file, fields, max_bytes)):
        if ordinal in wanted and isinstance(record, Document):
            hash_ = content_hash(record.text, record.metadata)
            if hash_ == wanted[ordinal]:
                # The path is the file's real path already (_file_items): what rows record as their source.
                # metadata as JSON text: Ray Data would infer one struct type for maps of differing keys
                rows.append({"id": record.id, "text": record.text, "content_hash": hash_, "source": record.source,
                             "source_line": record.line,
                             "metadata": json.dumps(record.metadata) if record.metadata else None})
    return rows


def _file_items(files: Sequence[InputFile]) -> list[dict]:
    # Absolute paths: Ray workers do not share the driver's working directory.
    return [{"file": number, "path": str(f.path.resolve()), "doc_id": f.doc_id, "root": f.root}
            for number, f in enumerate(files)]


# ---------------------------------------------------------------------------
# Step 2: encoding on actors


@dataclass(frozen=True)
class EncodeSettings:
    """What an encoding actor needs to know, all of it picklable."""

    model: str
    device: str
    dtype: str
    threads: int | None
    batch_tokens: int
    max_length: int
    colbert: bool
    store_text: bool
    chunking: dict | None
    dense_dim: int
    colbert_dim: int | None
    staging: str  # the folder the actors write staged shards to (INDEX_DIR/.staging), absolute
    run: str  # this run's id: the first part of its staged files' names
    shard_rows: int


class RunCounters:
    """A Ray actor (num_cpus=0) that adds up what the encoding actors did, for the summary and progress."""

    def __init__(self) -> None:
        self.documents = self.rows = self.tokens = self.truncated = 0
        self.stop_requested = False

    def request_stop(self) -> None:
        """The driver got a stop request: encoding actors encode nothing more (see `stopping`)."""
        self.stop_requested = True

    def stopping(self) -> bool:
        """Whether the encoding actors should pass their remaining batches by (a stop request)."""
        return self.stop_requested

    def add(self, documents: int, rows: int, tokens: int, truncated: int) -> None:
        """Count one actor call: documents, rows, tokens and truncated documents."""
        self.documents += documents
        self.rows += rows
        self.tokens += tokens
        self.truncated += truncated

    def totals(self) -> tuple[int, int, int, int]:
        """(documents, rows, tokens, truncated) counted so far."""
        return self.documents, self.rows, self.tokens, self.truncated


class ShardEncoder:
    """The map_batches actor: loads the model once, then turns Arrow batches of documents into staged shards.

    A call encodes its documents, writes their rows as staged shards (`stage_shards`) and returns one row
    naming the files, so the driver learns of each file once it is complete (zero rows: nothing written).
    """

    def __init__(self, settings: EncodeSettings, counters) -> None:
        from bge_index.model.encoder import load_encoder  # torch: only in the actors

        if settings.threads is not None:
            import torch  # the encoder's own import; only the thread count is set here

            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.counters = counters
        self.encoder = load_encoder(settings.model, settings.device, settings.dtype)
        self.schema = shard_schema(settings.dense_dim, settings.colbert_dim, settings.store_text,
                                   settings.chunking is not None)

    def __call__(self, batch):  # pyarrow.Table of documents -> pyarrow.Table of staged file names
        import ray

        if ray.get(self.counters.stopping.remote()):
            # A stop request: this call is a batch boundary. Nothing more is encoded, so the run ends soon and
            # what was adopted is committed; these documents are simply not reached.
            return staged_names_table([])
        ids = batch.column("id").to_pylist()
        settings = self.settings
        rows, tokens, truncated = encode_documents(
            self.encoder, ids, batch.column("text").to_pylist(), batch.column("content_hash").to_pylist(),
            colbert=settings.colbert, store_text=settings.store_text, max_length=settings.max_length,
            chunking=settings.chunking, batch_tokens=settings.batch_tokens,
            sources=batch.column("source").to_pylist(), lines=batch.column("source_line").to_pylist(),
            metadata=[json.loads(m) if m else None for m in batch.column("metadata").to_pylist()])
        # A uuid per call: a call Ray retries (its actor died) writes new files, never over its first attempt's.
        names = stage_shards(rows_to_table(rows, self.schema), Path(settings.staging),
                             f"{settings.run}-{uuid.uuid4().hex[:12]}", settings.shard_rows)
        # Waited for, so the totals are complete once the write has finished.
        ray.get(self.counters.add.remote(len(ids), len(rows), tokens, truncated))
        return staged_names_table(names)


def stage_shards(table, folder: Path, prefix: str, shard_rows: int) -> list[str]:
    """Write `table` (shard schema) as staged shards `PREFIX-N.parquet.tmp` in `folder`; returns their names.

    At most `shard_rows` rows a file, in row groups of SHARD_ROW_GROUP_ROWS, with the index's write options:
    the files IndexWriter would write. They are not synced here: IndexWriter.adopt fsyncs each before its rename.
    """
    import pyarrow.parquet as pq

    names = []
    for number, start in enumerate(range(0, table.num_rows, shard_rows)):
        path = folder / f"{prefix}-{number}.parquet.tmp"
        with writing(path), create_exclusive(path) as stream:
            with pq.ParquetWriter(stream, table.schema, **SHARD_WRITE_OPTIONS) as parquet:
                parquet.write_table(table.slice(start, shard_rows), row_group_size=SHARD_ROW_GROUP_ROWS)
        names.append(path.name)
    return names


def staged_names_table(names: list[str]):
    """What a ShardEncoder call returns: one row listing its staged files, or no row when it wrote none."""
    import pyarrow as pa

    return pa.table({"files": pa.array([names] if names else [], type=pa.list_(pa.string()))})


# ---------------------------------------------------------------------------
# The run


def build_index_on_ray(inputs: Sequence[str], index_dir: Path, options: IndexOptions,
                       ray_options: RayOptions = RayOptions(), events: IndexEvents = IndexEvents(),
                       should_stop: Callable[[], bool] = lambda: False) -> IndexSummary:
    """`indexing.build_index` with the reading and encoding on Ray; same options, same decisions, same index."""
    if ray_options.workers < 1:
        raise InvalidOptionError("--workers must be at least 1")
    if options.device.startswith("cuda") and ray_options.gpus_per_worker <= 0:
        raise InvalidOptionError("--engine ray with --device cuda needs --gpus-per-worker (GPUs per actor)")
    refuse_foreign_folder(index_dir)
    files = list(resolve_inputs(inputs, exclude=[index_dir], follow_links=options.follow_links, id_from=options.id_from))  # InputError before any work; --out is never input
    if any(f.path is None for f in files):
        raise InvalidOptionError(f"--engine ray reads files; {STDIN_NAME} (-) needs the local engine")
    with run_lock(index_dir, options.dry_run, wait=options.wait, on_wait=events.warning, should_stop=should_stop):
        return _RayRun(index_dir, options, ray_options, events, should_stop).run(files)


@dataclass
class Plan:
    """The records to encode: file number -> {ordinal in the file: content hash}."""

    chosen: dict[int, dict[int, str]] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        """Records chosen for encoding, over all files."""
        return sum(len(records) for records in self.chosen.values())


class _RayRun:
    """One Ray index run: the plan, adoption and commits here (through run.IndexRun), reading, encoding and
    staging shards on Ray."""

    def __init__(self, index_dir: Path, options: IndexOptions, ray_options: RayOptions, events: IndexEvents,
                 should_stop: Callable[[], bool]):
        self.index_dir = index_dir
        self.options = options
        self.ray_options = ray_options
        self.events = events
        self.should_stop = should_stop
        gpus = ray_options.gpus_per_worker > 0
        # The workers' device decides the precision, not the driver's (which may have no GPU).
        self.device = ("cuda" if gpus else "cpu") if options.device == "auto" else options.device
        self.run_state = IndexRun(index_dir, options, events, device_type=lambda: "cuda" if gpus else "cpu")
        self.summary = self.run_state.summary
        self.written_ids: set[str] = set()  # documents whose rows this run adopted (settled)

    def run(self, files: list[InputFile]) -> IndexSummary:
        """Plan, then (unless a dry run) encode, stage, adopt and commit; on failure, remove what was written or
        staged since the last checkpoint (the checkpoints stay committed, as in the local engine)."""
        run = self.run_state
        staging = False
        try:
            with ray_session(self.ray_options) as (ray, local):
                plan = self._plan(ray, files)
                if self.options.dry_run:
                    for doc_id, seen in run.seen.items():
                        if seen.outcome is Outcome.PENDING:
                            run.settle(doc_id, written=False)
                    return run.finish()
                run.open_writer()  # removes what a killed run left in the staging folder
                staging = True
                try:
                    self._write(ray, files, plan)
                    return run.finish()
                except BaseException:
                    run.abort()
                    raise
        finally:
            if staging:
                # Once this run's own Ray instance is stopped, so no actor writes there any more: what is left
                # are files of calls not adopted (a stop, a failure, a retried call's first attempt).
                remove_staging(self.index_dir)

    def _plan(self, ray, files: list[InputFile]) -> Plan:
        """Step 1: every record's id and hash, read by Ray tasks, in input order; decided by the IndexRun."""
        run = self.run_state
        hashes: dict[str, str] = {}
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # "last occurrence wins" needs input order
        try:
            dataset = ray.data.from_items(_file_items(files), override_num_blocks=max(1, len(files)))
            records = dataset.flat_map(_plan_rows_of_file, fn_kwargs={"fields": self.options.fields, "max_bytes": self.options.max_document_bytes},
                                       num_cpus=self._reservations(ray).io_cpus)
            for row in records.iter_rows():
                source = files[row["file"]].display
                if row["reason"] is not None:
                    run.skip(Skipped(source, row["line"], row["reason"], bool(row["hides"]), SkipReason(row["code"]),
                                     doc_id=row["id"]))
                    continue
                run.arrive(row["id"], source, row["line"])
                run.decide(row["id"], row["hash"], source, row["line"], slot=(row["file"], row["ordinal"]))
                hashes[row["id"]] = row["hash"]
        finally:
            context.execution_options.preserve_order = False
        plan = Plan()
        for doc_id, seen in run.seen.items():
            if seen.outcome is Outcome.PENDING:
                file_number, ordinal = seen.slot
                plan.chosen.setdefault(file_number, {})[ordinal] = hashes[doc_id]
        return plan

    def _reservations(self, ray) -> Reservations:
        local = self.ray_options.address is None or _is_local_instance(ray)
        return plan_reservations(self.ray_options, float(ray.cluster_resources().get("CPU", 1.0)), local)

    def _write(self, ray, files: list[InputFile], plan: Plan) -> None:
        """Steps 2 and 3: encode and stage the chosen documents on Ray; adopt, settle and commit them as calls
        complete."""
        if plan.chosen and not self.should_stop():
            self._encode_and_write(ray, files, plan)
        elif plan.chosen:
            self.summary.interrupted = True
        missed = plan.documents - len(self.written_ids)
        if missed and not self.summary.interrupted:
            self.events.warning(f"{missed} documents changed while this run read them and were not encoded; "
                                "run again to index them")

    def _encode_and_write(self, ray, files: list[InputFile], plan: Plan) -> None:
        """Run the Ray pipeline (read, encode, stage) and adopt each call's files on this thread as it completes,
        committing a checkpoint each shard's worth of rows; then fill in the summary's encoding counts."""
        run = self.run_state
        manifest = run.manifest
        staging = self.index_dir / STAGING_DIR
        with writing(staging):
            staging.mkdir(exist_ok=True)
        reservations = self._reservations(ray)
        settings = EncodeSettings(
            model=run.model_name, device=self.device, dtype=run.precision, threads=reservations.threads,
            batch_tokens=self.options.batch_tokens, max_length=self.summary.max_length, colbert=self.options.colbert,
            store_text=self.options.store_text, chunking=manifest.chunking, dense_dim=manifest.dense_dim,
            colbert_dim=manifest.colbert_dim, staging=str(staging.resolve()), run=uuid.uuid4().hex[:12],
            shard_rows=self.options.shard_rows)
        items = []
        for item in _file_items(files):
            chosen = plan.chosen.get(item["file"])
            if chosen:
                ordinals = sorted(chosen)
                items.append({**item, "ordinals": ordinals, "hashes": [chosen[o] for o in ordinals]})
        counters = ray.remote(num_cpus=0)(RunCounters).remote()
        started = time.perf_counter()
        # A file is read as one block, and a block goes to one actor: cut blocks to a call's size so that
        # every actor gets work even from a single big file (a streaming repartition, no shuffle).
        documents = ray.data.from_items(items, override_num_blocks=len(items)) \
            .flat_map(_documents_of_file, fn_kwargs={"fields": self.options.fields, "max_bytes": self.options.max_document_bytes}, num_cpus=reservations.io_cpus) \
            .repartition(target_num_rows_per_block=DOCUMENTS_PER_CALL)
        staged = documents.map_batches(
            ShardEncoder, fn_constructor_kwargs={"settings": settings, "counters": counters},
            batch_size=DOCUMENTS_PER_CALL, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.ray_options.workers),
            num_cpus=reservations.actor_cpus, num_gpus=reservations.actor_gpus or None)
        calls: queue.SimpleQueue = queue.SimpleQueue()
        done = object()  # the end of the stream
        outcome: list[BaseException] = []

        def stream() -> None:
            """Ray's executor, run on a thread: each call's staged file names go to `calls` as the call completes;
            an exception goes to `outcome` for the main thread to raise."""
            try:
                for block in staged.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for names in block.column("files").to_pylist():
                        calls.put(names)
            except BaseException as error:  # handed to the main thread
                outcome.append(error)
            finally:
                calls.put(done)

        # This thread adopts and commits (IndexRun is only ever touched here) and reports progress as the actors
        # count it. A stop request tells the actors to encode no more (RunCounters.stop_requested): the stream
        # then ends after the calls under way, and what was adopted is committed.
        streaming = threading.Thread(target=stream, name="ray-write", daemon=True)
        streaming.start()
        next_report = time.monotonic()
        uncommitted = 0  # rows adopted since the last commit
        while True:
            try:
                names = calls.get(timeout=1.0)
            except queue.Empty:
                names = None
            if names is done:
                break
            if names:
                uncommitted += self._adopt(staging, names)
                # A shard's worth of rows, or the last commit is a while back: commit, as the local engine does
                # when a shard is complete, so that a killed run loses at most that (the next run finds the rest
                # unchanged). Between calls only: a call's files hold whole documents.
                if uncommitted and run.checkpoint_if(uncommitted >= self.options.shard_rows):
                    uncommitted = 0
            if self.should_stop() and not self.summary.interrupted:
                self.summary.interrupted = True
                ray.get(counters.request_stop.remote())
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + 1.0
                documents_done, _, tokens, _ = ray.get(counters.totals.remote())
                self.events.progress(IndexProgress(len(run.seen), documents_done, tokens,
                                                   time.perf_counter() - run.started))
        streaming.join()
        if outcome:
            raise outcome[0]
        _, rows, tokens, truncated = ray.get(counters.totals.remote())
        self.summary.encode_seconds = time.perf_counter() - started
        self.summary.rows, self.summary.tokens, self.summary.truncated = rows, tokens, truncated

    def _adopt(self, staging: Path, names: list[str]) -> int:
        """Step 3 for one call: adopt its staged files as shards, retire the rows its documents replace and settle
        them; returns the rows adopted (IndexRun commits them with the next checkpoint or at the end)."""
        run = self.run_state
        id_column = "doc_id" if run.manifest.chunking else "id"
        ids: list[str] = []
        rows = 0
        for name in names:
            shard = run.writer.adopt(staging / name)
            if shard is not None:
                ids += read_shard_column(self.index_dir, shard, id_column)
                rows += shard.rows
        for doc_id in dict.fromkeys(ids):  # a document's passages: one settle
            if doc_id not in self.written_ids:
                self.written_ids.add(doc_id)
                run.retire(run.old_rows(doc_id))
                run.settle(doc_id)
        return rows
