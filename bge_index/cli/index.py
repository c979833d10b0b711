"""`bge-index index`: create or update an index, with progress, a summary, and stop requests honoured.

This module owns the `index` flags (and which ones need which engine), the
SIGINT/SIGTERM handling that asks a run to stop at the next batch boundary
(130/143; a second signal aborts, same codes), the `--report` file, and the
exit status of a run that committed its good work but could not do all of it:
1, with one error line, when removals were held back: by inputs not read
whole (which may hold the missing ids; they are named) or by `--max-remove`.
Bad records that held nothing back are reported and exit 0. The work is the library's: `indexing.build_index`
(local engine) or `ray_engine.build_index_on_ray`, both torch-free at import:
the model, and torch with it, load only when something needs encoding.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from bge_index.cli.display import IndexDisplay, error, print_index_summary, stderr, write_json
from bge_index.cli.options import Device, Devices, Dtype, Engine, IdFrom, Quiet, check_output_file
from bge_index.input.documents import FieldNames
from bge_index.input.types import DEFAULT_MAX_DOCUMENT_BYTES
from bge_index.errors import EXIT_FAILURE, UsageError
from bge_index.model.identity import DEFAULT_MODEL
from bge_index.run.index_run import IndexOptions, IndexSummary


def index(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive), globs, or - for JSONL on stdin.",
                                               show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", envvar="BGE_INDEX_OUT", help="Index folder to create or update.")],
    model: Annotated[Optional[str], typer.Option(
        envvar="BGE_INDEX_MODEL", show_default=False,
        help=f"Hub id or local model folder. Default: the model an existing index records, else {DEFAULT_MODEL}.")] = None,
    device: Device = "auto",
    devices: Devices = None,
    dtype: Annotated[Dtype, typer.Option(envvar="BGE_INDEX_DTYPE",
                                         help="auto: the index's own; for a new index fp16 on CUDA, bf16 on CPUs "
                                              "with native bf16, fp32 elsewhere.")] = Dtype("auto"),
    batch_tokens: Annotated[int, typer.Option(min=1, envvar="BGE_INDEX_BATCH_TOKENS",
                                              help="Padded tokens per forward pass.")] = 16384,
    max_length: Annotated[int, typer.Option(min=2, envvar="BGE_INDEX_MAX_LENGTH",
                                            help="Longer documents are truncated (and counted).")] = 8192,
    shard_rows: Annotated[int, typer.Option(min=1, envvar="BGE_INDEX_SHARD_ROWS", help="Rows per shard file.")] = 100_000,
    chunk_tokens: Annotated[Optional[int], typer.Option(min=3, envvar="BGE_INDEX_CHUNK_TOKENS",
                                                        help="Split documents into passages of N tokens.")] = None,
    chunk_overlap: Annotated[int, typer.Option(min=0, envvar="BGE_INDEX_CHUNK_OVERLAP",
                                               help="Tokens shared by consecutive passages.")] = 0,
    colbert: Annotated[bool, typer.Option("--colbert", help="Also store ColBERT multi-vectors.")] = False,
    store_text: Annotated[bool, typer.Option("--store-text/--no-store-text", help="Keep document text in shards.")] = True,
    id_field: Annotated[Optional[str], typer.Option(help="Id field/column (default: id, _id or docid).")] = None,
    text_field: Annotated[Optional[str], typer.Option(help="Text field/column (default: text or contents).")] = None,
    keep_missing: Annotated[bool, typer.Option("--keep-missing", help="Keep indexed documents missing from the inputs.")] = False,
    max_document_bytes: Annotated[int, typer.Option(
        min=1, envvar="BGE_INDEX_MAX_DOCUMENT_BYTES",
        help="Skip (with a reason) any document larger than this many bytes: a file's text, a JSON line, "
             "a CSV/TSV field. Bounds the memory one document can take.")] = DEFAULT_MAX_DOCUMENT_BYTES,
    id_from: Annotated[IdFrom, typer.Option(
        "--id-from", envvar="BGE_INDEX_ID_FROM",
        help="The id of a whole-file document (.txt, .md): its path under the input folder (path), its file "
             "name (name), or its name without suffixes (stem: 1.txt -> 1, as BEIR qrels name documents).")
    ] = IdFrom.path,
    follow_links: Annotated[bool, typer.Option(
        "--follow-links", help="Read files in input folders whose symbolic links lead out of those folders "
                               "(skipped by default: a link to /etc/shadow is not a document).")] = False,
    max_remove: Annotated[str, typer.Option(envvar="BGE_INDEX_MAX_REMOVE",
                                            help="Remove nothing if a run would remove more than this share (50%, 0.5) "
                                                 "or count (100) of the index's documents; 100% allows all.")] = "50%",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be added/updated/removed; write nothing.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="If another run holds the index, wait for it instead of exiting 75.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Any bad document fails the run (exit 1) before writing.")] = False,
    report: Annotated[Optional[Path], typer.Option(envvar="BGE_INDEX_REPORT", help="Write the run summary as JSON here.")] = None,
    quiet: Quiet = False,
    progress_every: Annotated[float, typer.Option(min=0.1, envvar="BGE_INDEX_PROGRESS_SECONDS",
                                                  help="Seconds between progress lines when stderr is not a terminal.")] = 30.0,
    engine: Annotated[Engine, typer.Option(envvar="BGE_INDEX_ENGINE",
                                           help="local: this process; ray: read and encode on a Ray cluster (bge-index[ray]).")] = Engine.local,
    ray_address: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_RAY_ADDRESS",
                                                       help="--engine ray: cluster to join (auto, ray://HOST:PORT); default: a local Ray on loopback.")] = None,
    workers: Annotated[int, typer.Option(min=1, envvar="BGE_INDEX_WORKERS", help="--engine ray: encoding actors (each loads the model once).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, envvar="BGE_INDEX_GPUS_PER_WORKER", help="--engine ray: GPUs per actor (0: CPU).")] = 0.0,
    cpus_per_worker: Annotated[Optional[float], typer.Option(min=0.01, envvar="BGE_INDEX_CPUS_PER_WORKER",
                                                             help="--engine ray: CPUs each actor reserves (default: 1 on a cluster; locally all CPUs but one, shared).")] = None,
) -> None:
    """Create or update an index: encode new and changed documents, retire changed and missing ones."""
    if engine is Engine.local and (ray_address is not None or workers != 1 or gpus_per_worker or cpus_per_worker):
        raise UsageError("--ray-address, --workers, --gpus-per-worker and --cpus-per-worker need --engine ray")
    if engine is Engine.ray and devices is not None:
        raise UsageError("--devices is for the local engine; with --engine ray use --workers and --gpus-per-worker")
    check_output_file(report, "--report")
    options = IndexOptions(model=model, device=device, devices=devices, dtype=dtype.value, batch_tokens=batch_tokens,
                           max_length=max_length, shard_rows=shard_rows, colbert=colbert, store_text=store_text,
                           strict=strict, fields=FieldNames.from_options(id_field, text_field),
                           chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, keep_missing=keep_missing, follow_links=follow_links, id_from=id_from.value,
                           max_document_bytes=max_document_bytes,
                           dry_run=dry_run, wait=wait, max_remove=max_remove)

    def run_index(display: IndexDisplay, should_stop) -> IndexSummary:
        if engine is Engine.local:
            from bge_index.run.local import build_index

            return build_index(paths, out, options, events=display, should_stop=should_stop)
        from bge_index.run.ray import RayOptions, build_index_on_ray

        ray_options = RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                                 cpus_per_worker=cpus_per_worker)
        return build_index_on_ray(paths, out, options, ray_options, events=display, should_stop=should_stop)

    with StopRequests() as stop, IndexDisplay(quiet, progress_every) as display:
        try:
            summary = run_index(display, stop.requested)
        except KeyboardInterrupt as interrupt:
            # A stop asked for before any work (waiting on the lock, say): exit as that signal, 143 for SIGTERM
            if getattr(interrupt, "signal_number", None) is None and stop.signal_number is not None:
                raise StopNow(stop.signal_number) from None
            raise
    if not quiet:
        print_index_summary(summary)
    if report is not None:
        write_json(report, summary.to_json(), "--report")
    if summary.interrupted:
        raise typer.Exit(128 + (stop.signal_number or signal.SIGINT))
    # The good work is committed; what could not be done still fails the run, so cron and make notice.
    # Bad records that held nothing back are in the summary and fail nothing (--strict is for that).
    problems = []
    if summary.held_back:
        failed = len(summary.failed_inputs)
        named = ", ".join(repr(i) for i in summary.held_back_ids[:5])
        more = f" and {summary.held_back - 5:,} more" if summary.held_back > 5 else ""
        problems.append(f"{failed} input{'s' if failed != 1 else ''} could not be read whole; their documents "
                        "were kept: " + ", ".join(f["location"] for f in summary.failed_inputs)
                        + f"; the removal of {summary.held_back:,} indexed document{'s' if summary.held_back != 1 else ''}"
                        f" not in the inputs waits until they are ({named}{more})")
    if summary.removal_refused:
        problems.append(f"removals held back by --max-remove {max_remove} (see the warning above)")
    if problems:
        error("; ".join(problems))
        raise typer.Exit(EXIT_FAILURE)


class StopNow(KeyboardInterrupt):
    """A second stop request: abort at once (the previous state stays); the exit status is 128 + the signal."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


class StopRequests:
    """SIGINT/SIGTERM ask the run to stop at the next batch boundary; a second one stops at once.

    A context manager: the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        """Whether a stop was asked for (the engines poll this between batches)."""
        return self.signal_number is not None

    def _handle(self, signal_number: int, _frame) -> None:
        if self.signal_number is not None:
            raise StopNow(signal_number)
        self.signal_number = signal_number
        stderr.print(f"bge-index: {signal.Signals(signal_number).name} received: finishing the current batch "
                     "and saving what is done (send it again to abort)")

    def __enter__(self) -> "StopRequests":
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
