"""The `bge-index` command: a thin Typer layer over the library.

The only module that prints. It turns flags (with BGE_INDEX_* environment
fallbacks) into library calls, shows progress on stderr, results on stdout,
and maps library errors to exit codes: 0 ok, 1 failure, 2 usage.
The optional engines and backends (Ray, Milvus) are imported only by the
commands that use them.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bge_index import __version__
from bge_index.documents import FieldNames, InputError, QueryFileError, Skipped, read_queries
from bge_index.encoder import DEFAULT_MODEL, ModelError
from bge_index.evaluation import (EvaluationInputError, evaluate, parse_metrics, query_coverage, read_qrels,
                                  write_trec_run)
from bge_index.extras import ExtraUnavailableError
from bge_index.lock import IndexLockedError
from bge_index.milvus import MilvusError
from bge_index.pipeline import (IndexEvents, IndexMismatchError, IndexOptions, IndexProgress, IndexSearch, IndexSummary,
                                InvalidOptionError, OutputFolderError, Query, QueryResult, StrictModeError, build_index)
from bge_index.search import NoColbertVectors, ScoreWeights
from bge_index.shards import IndexFormatError, index_size_bytes, read_manifest, verify_index

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_TEMPFAIL = 0, 1, 2, 75  # 75: EX_TEMPFAIL, index busy
SNIPPET_CHARS = 90

app = typer.Typer(
    name="bge-index",
    help="Index documents into BGE-M3 sparse + dense vectors (Parquet shards) and search them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class Mode(str, Enum):
    hybrid = "hybrid"
    dense = "dense"
    sparse = "sparse"
    colbert = "colbert"


class Dtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class SearchFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    tsv = "tsv"
    trec = "trec"


class Fusion(str, Enum):
    weighted = "weighted"
    rrf = "rrf"


class Normalize(str, Enum):
    none = "none"
    minmax = "minmax"


class InfoFormat(str, Enum):
    table = "table"
    json = "json"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Backend(str, Enum):
    local = "local"
    milvus = "milvus"


class MilvusIndexType(str, Enum):
    flat = "flat"
    hnsw = "hnsw"


class DenseType(str, Enum):
    auto = "auto"
    float = "float"
    float16 = "float16"


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r}: use auto, cpu, cuda, cuda:N or mps")
    return value


def _check_devices(value: Optional[str]) -> Optional[str]:
    if value is None or value.strip() == "all":
        return value
    for name in value.split(","):
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name.strip()):
            raise typer.BadParameter(f"{name.strip()!r}: list devices as cuda:0,cuda:1 (or cpu, mps), or use all")
    return value


def _fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    stderr.print(f"bge-index: error: {escape(message)}")
    return typer.Exit(code)


def _run(action):
    """Run a library call, turning its errors into one clear line and an exit code."""
    try:
        return action()
    except (InputError, InvalidOptionError) as error:
        raise _fail(str(error), EXIT_USAGE) from None
    except IndexLockedError as error:
        raise _fail(str(error), EXIT_TEMPFAIL) from None
    except (ModelError, IndexFormatError, OutputFolderError, StrictModeError, QueryFileError,
            NoColbertVectors, IndexMismatchError, EvaluationInputError, ExtraUnavailableError, MilvusError) as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        stderr.print("bge-index: interrupted")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        stdout.print(f"bge-index {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Index documents into BGE-M3 sparse + dense vectors (Parquet shards) and search them."""


# ---------------------------------------------------------------------------
# index


@app.command()
def index(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive), globs, or - for JSONL on stdin.",
                                               show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", envvar="BGE_INDEX_OUT", help="Index folder to create or update.")],
    model: Annotated[str, typer.Option(envvar="BGE_INDEX_MODEL", help="Hub id or local model folder.")] = DEFAULT_MODEL,
    device: Annotated[str, typer.Option(envvar="BGE_INDEX_DEVICE", callback=_check_device,
                                        help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    devices: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_DEVICES", callback=_check_devices,
                                                   help="cuda:0,cuda:1 or all: one encoder per device "
                                                        "(instead of --device).")] = None,
    dtype: Annotated[Dtype, typer.Option(envvar="BGE_INDEX_DTYPE",
                                         help="auto: the index's own; for a new index fp16 on CUDA, bf16 on CPUs "
                                              "with native bf16, fp32 elsewhere.")] = Dtype.auto,
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be added/updated/removed; write nothing.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="If another run holds the index, wait for it instead of exiting 75.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Any bad document fails the run (exit 1) before writing.")] = False,
    report: Annotated[Optional[Path], typer.Option(envvar="BGE_INDEX_REPORT", help="Write the run summary as JSON here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
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
    if chunk_tokens is not None and chunk_overlap >= chunk_tokens - 2:
        raise _fail(f"--chunk-overlap {chunk_overlap} must be smaller than --chunk-tokens minus 2", EXIT_USAGE)
    if engine is Engine.local and (ray_address is not None or workers != 1 or gpus_per_worker or cpus_per_worker):
        raise _fail("--ray-address, --workers, --gpus-per-worker and --cpus-per-worker need --engine ray", EXIT_USAGE)
    if engine is Engine.ray and devices is not None:
        raise _fail("--devices is for the local engine; with --engine ray use --workers and --gpus-per-worker",
                    EXIT_USAGE)
    options = IndexOptions(model=model, device=device, devices=devices, dtype=dtype.value, batch_tokens=batch_tokens,
                           max_length=max_length, shard_rows=shard_rows, colbert=colbert, store_text=store_text,
                           strict=strict, fields=FieldNames.from_options(id_field, text_field),
                           chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, keep_missing=keep_missing,
                           dry_run=dry_run, wait=wait)
    stop = _StopRequests()
    def run_index(display: _IndexDisplay) -> IndexSummary:
        if engine is Engine.local:
            return build_index(paths, out, options, events=display, should_stop=stop.requested)
        from bge_index.ray_engine import RayOptions, build_index_on_ray

        ray_options = RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                                 cpus_per_worker=cpus_per_worker)
        return build_index_on_ray(paths, out, options, ray_options, events=display, should_stop=stop.requested)

    with stop, _IndexDisplay(quiet, progress_every) as display:
        summary = _run(lambda: run_index(display))
    if report is not None:
        report.write_text(json.dumps(summary.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not quiet:
        _print_index_summary(summary)
    if summary.interrupted:
        raise typer.Exit(128 + (stop.signal_number or signal.SIGINT))


class _StopRequests:
    """SIGINT/SIGTERM ask the run to stop at the next batch boundary; a second one stops at once."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number: int, _frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signal_number
        stderr.print(f"bge-index: {signal.Signals(signal_number).name} received: finishing the current batch "
                     "and saving what is done (send it again to abort)")

    def __enter__(self) -> "_StopRequests":
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)


class _IndexDisplay(IndexEvents):
    """Progress on stderr: a live line on a terminal, else a plain line every `every` seconds (cron logs).

    Skipped records and warnings are printed as they come, unless quiet.
    """

    def __init__(self, quiet: bool, every: float) -> None:
        self.quiet = quiet
        self.every = every
        self.live = stderr.is_terminal and not quiet
        self.last_line = float("-inf")  # the first progress line comes at once, then one every `every` s
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=stderr, transient=True, disable=not self.live)
        self.task = self.bar.add_task("reading documents…", total=None)

    def __enter__(self) -> "_IndexDisplay":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def skipped(self, item: Skipped) -> None:
        if not self.quiet:
            self.bar.console.print(f"{escape(item.location)}: skipped: {escape(item.reason)}")

    def warning(self, message: str) -> None:
        if not self.quiet:
            self.bar.console.print(f"bge-index: warning: {escape(message)}")

    def progress_line(self, state: IndexProgress) -> str:
        rate = state.encoded / state.elapsed if state.elapsed else 0.0
        token_rate = state.tokens / state.elapsed if state.elapsed else 0.0
        return (f"{state.documents:,} documents read, {state.encoded:,} encoded · {rate:,.1f} docs/s · "
                f"{token_rate:,.0f} tokens/s")

    def progress(self, state: IndexProgress) -> None:
        if self.live:
            self.bar.update(self.task, description=self.progress_line(state))
        elif not self.quiet and time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            stderr.print(f"bge-index: {time.strftime('%H:%M:%S')} {self.progress_line(state)} "
                         f"({state.elapsed:,.0f} s)", markup=False)


def _print_index_summary(summary: IndexSummary) -> None:
    verb = "Would change" if summary.dry_run else "Interrupted; saved" if summary.interrupted else "Updated"
    stdout.print(
        f"{verb} {summary.index_dir}: {summary.added:,} added, {summary.updated:,} updated, "
        f"{summary.unchanged:,} unchanged, {summary.removed:,} removed", markup=False)
    if not summary.dry_run:
        stdout.print(f"  encoded {summary.rows:,} rows ({summary.tokens:,} tokens) in {summary.elapsed:.1f} s: "
                     f"{summary.documents_per_second:,.1f} docs/s, {summary.tokens_per_second:,.0f} tokens/s",
                     markup=False)
    skipped = sum(summary.skipped.values())
    reasons = ", ".join(f"{reason}: {count}" for reason, count in summary.skipped.most_common())
    stdout.print(f"  skipped: {skipped:,}" + (f" ({reasons})" if reasons else ""), markup=False)
    if summary.duplicates:
        stdout.print(f"  duplicate ids (last occurrence kept): {summary.duplicates:,}", markup=False)
    stdout.print(f"  truncated to {summary.max_length:,} tokens: {summary.truncated:,}", markup=False)
    if not summary.dry_run:
        state = "" if summary.wrote else ", nothing to write"
        stdout.print(f"  index: {summary.live_rows:,} rows in {summary.shards} shards ({_human_bytes(summary.bytes)})"
                     f"{state}; model: {summary.model}", markup=False)
    if summary.interrupted:
        stdout.print("  stopped early: run the same command again to finish", markup=False)


def _human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GB"


# ---------------------------------------------------------------------------
# search


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.", show_default=False)],
    query: Annotated[Optional[str], typer.Argument(help="Query text (or use --queries).", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, envvar="BGE_INDEX_K", help="Results per query.")] = 10,
    mode: Annotated[Mode, typer.Option(envvar="BGE_INDEX_MODE", help="Scoring mode.")] = Mode.hybrid,
    dense_weight: Annotated[float, typer.Option(help="Weight of the dense (cosine) score.")] = 1.0,
    sparse_weight: Annotated[float, typer.Option(help="Weight of the sparse (lexical) score.")] = 0.3,
    colbert_weight: Annotated[float, typer.Option(help="Weight of ColBERT MaxSim (colbert mode).")] = 1.0,
    queries: Annotated[Optional[str], typer.Option("--queries", help="JSONL (_id/id + text) or TSV (id<TAB>text); - for stdin.")] = None,
    output_format: Annotated[SearchFormat, typer.Option("--format", envvar="BGE_INDEX_FORMAT", help="Output format.")] = SearchFormat.table,
    explain: Annotated[bool, typer.Option("--explain", help="Show the query tokens that matched, with their contributions.")] = False,
    group_by_doc: Annotated[bool, typer.Option("--group-by-doc", help="Rank documents by their best passage (chunked indexes).")] = False,
    fusion: Annotated[Fusion, typer.Option(envvar="BGE_INDEX_FUSION", help="Hybrid: weighted sum, or reciprocal rank fusion (k=60).")] = Fusion.weighted,
    normalize: Annotated[Normalize, typer.Option(help="Weighted hybrid: min-max normalise dense and sparse scores first.")] = Normalize.none,
    model: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MODEL",
                                                 help="Model to encode queries (must be the index's own).")] = None,
    device: Annotated[str, typer.Option(envvar="BGE_INDEX_DEVICE", callback=_check_device)] = "auto",
    dtype: Annotated[Dtype, typer.Option(envvar="BGE_INDEX_DTYPE",
                                         help="Query encoding precision; auto: the index's own.")] = Dtype.auto,
    run_tag: Annotated[str, typer.Option(help="Run name in the last TREC column.")] = "bge-index",
    backend: Annotated[Backend, typer.Option(envvar="BGE_INDEX_BACKEND",
                                             help="local: this index's files; milvus: a collection exported from it.")] = Backend.local,
    uri: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_URI", help="--backend milvus: a Milvus Lite file or a server URL.")] = None,
    collection: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_COLLECTION", help="--backend milvus: collection name.")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_TOKEN", help="--backend milvus: server token (user:password).")] = None,
    route_limit: Annotated[Optional[int], typer.Option(min=1, help="--backend milvus, hybrid: rows each route (dense, sparse) returns before fusion; default max(5k, 100).")] = None,
) -> None:
    """Search an index with one query or a file of queries."""
    if (query is None) == (queries is None):
        raise _fail("give either a query or --queries FILE (not both)", EXIT_USAGE)
    query_list = [Query("1", query)] if query is not None else \
        [Query(d.id, d.text) for d in _run(lambda: read_queries(queries))]
    weights = ScoreWeights(dense_weight, sparse_weight, colbert_weight)
    if backend is Backend.milvus:
        if not uri or not collection:
            raise _fail("--backend milvus needs --uri and --collection", EXIT_USAGE)
        unsupported = [flag for flag, used in (("--mode colbert", mode is Mode.colbert), ("--explain", explain),
                                               ("--group-by-doc", group_by_doc),
                                               ("--normalize minmax", normalize is not Normalize.none)) if used]
        if unsupported:
            raise _fail(f"--backend milvus does not support {', '.join(unsupported)}", EXIT_USAGE)
    elif uri or collection or route_limit:
        raise _fail("--uri, --collection and --route-limit need --backend milvus", EXIT_USAGE)

    def run() -> list[QueryResult]:
        if backend is Backend.milvus:
            return _search_milvus(index_dir, query_list, uri, collection, token, k, mode.value, weights, fusion.value,
                                  route_limit, model, device, dtype.value,
                                  with_text=output_format is not SearchFormat.trec)
        opened = IndexSearch(index_dir, model=model, device=device, dtype=dtype.value)
        return opened.search(query_list, k=k, mode=mode.value, weights=weights, explain=explain,
                             with_text=output_format is not SearchFormat.trec, group_by_doc=group_by_doc,
                             fusion=fusion.value, normalize=None if normalize is Normalize.none else normalize.value)

    results = _run(run)
    printers = {SearchFormat.table: _print_table, SearchFormat.json: _print_json, SearchFormat.jsonl: _print_jsonl,
                SearchFormat.tsv: _print_tsv, SearchFormat.trec: lambda r, m: _print_trec(r, run_tag)}
    printers[output_format](results, mode.value)


def _search_milvus(index_dir: Path, queries: list[Query], uri: str, collection: str, token: str | None, k: int,
                   mode: str, weights: ScoreWeights, fusion: str, route_limit: int | None, model: str | None,
                   device: str, dtype: str, with_text: bool) -> list[QueryResult]:
    from bge_index.milvus import MilvusSearch
    from bge_index.pipeline import RankedDocument

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its errors reach the user through _run
    opened = MilvusSearch(index_dir, uri, collection, model=model, device=device, dtype=dtype, token=token)
    for note in opened.notes:
        stderr.print(f"bge-index: warning: {escape(note)}")
    found = opened.search([q.text for q in queries], k=k, mode=mode, weights=weights, fusion=fusion,
                          route_limit=route_limit, with_text=with_text)
    return [QueryResult(query, [RankedDocument(rank, h.id, h.hit, h.text) for rank, h in enumerate(hits, start=1)])
            for query, hits in zip(queries, found)]


def _snippet(text: str | None) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…"


def _hit_json(result: QueryResult, ranked) -> dict:
    record = {"query_id": result.query.id, "rank": ranked.rank, "id": ranked.id, "score": round(ranked.hit.score, 6),
              "dense": round(ranked.hit.dense, 6), "sparse": round(ranked.hit.sparse, 6)}
    if ranked.hit.colbert is not None:
        record["colbert"] = round(ranked.hit.colbert, 6)
    if ranked.passage_id is not None:
        record["passage"] = ranked.passage_id
    if ranked.text is not None:
        record["text"] = ranked.text
    if ranked.top_tokens:
        record["tokens"] = [{"token": t, "contribution": round(c, 6)} for t, c in ranked.top_tokens]
    return record


def _print_table(results: list[QueryResult], mode: str) -> None:
    for result in results:
        table = Table(title=f"{escape(result.query.text)}  [dim]({mode})[/dim]", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id", overflow="fold")
        table.add_column("snippet")
        explain = any(r.top_tokens for r in result.hits)
        if explain:
            table.add_column("matching tokens (q_w·d_w)")
        for ranked in result.hits:
            row = [str(ranked.rank), f"{ranked.hit.score:.4f}", escape(ranked.id), escape(_snippet(ranked.text))]
            if explain:
                row.append(escape(", ".join(f"{t} {c:.3f}" for t, c in ranked.top_tokens)))
            table.add_row(*row)
        stdout.print(table)


def _print_json(results: list[QueryResult], mode: str) -> None:
    payload = [{"query_id": r.query.id, "query": r.query.text, "mode": mode,
                "hits": [{k: v for k, v in _hit_json(r, h).items() if k != "query_id"} for h in r.hits]}
               for r in results]
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")


def _print_jsonl(results: list[QueryResult], mode: str) -> None:
    for result in results:
        for ranked in result.hits:
            sys.stdout.write(json.dumps(_hit_json(result, ranked), ensure_ascii=False) + "\n")


def _tsv_field(value: str) -> str:
    return value.replace("\t", " ").replace("\n", " ")


def _print_tsv(results: list[QueryResult], mode: str) -> None:
    sys.stdout.write("query_id\trank\tid\tscore\tdense\tsparse\n")
    for result in results:
        for r in result.hits:
            sys.stdout.write(f"{_tsv_field(result.query.id)}\t{r.rank}\t{_tsv_field(r.id)}\t{r.hit.score:.6f}\t"
                             f"{r.hit.dense:.6f}\t{r.hit.sparse:.6f}\n")


def _print_trec(results: list[QueryResult], run_tag: str) -> None:
    # TREC run format: qid Q0 docid rank score tag (whitespace-separated, so no spaces in ids).
    for result in results:
        for r in result.hits:
            sys.stdout.write(f"{_trec_token(result.query.id)} Q0 {_trec_token(r.id)} {r.rank} {r.hit.score:.6f} "
                             f"{_trec_token(run_tag)}\n")


def _trec_token(value: str) -> str:
    return re.sub(r"\s", "_", value)


# ---------------------------------------------------------------------------
# info


@app.command()
def info(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.", show_default=False)],
    output_format: Annotated[InfoFormat, typer.Option("--format", help="Output format.")] = InfoFormat.table,
) -> None:
    """Describe an index: model, dimensions, documents, shards, sizes, format version."""
    manifest = _run(lambda: read_manifest(index_dir))
    size = index_size_bytes(index_dir, manifest)
    data = manifest.to_json()
    data["index_dir"] = str(index_dir)
    data["bytes"] = size
    if output_format is InfoFormat.json:
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        return
    model = manifest.model
    table = Table(title=f"bge-index {escape(str(index_dir))}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    identity = f"revision {model['revision']}" if model.get("revision") else f"sha256 {model.get('sha256')}"
    rows = [
        ("format version", str(manifest.format_version)),
        ("model", f"{model['name']} ({identity})"),
        ("dtype / max length", f"{model.get('dtype')} / {model.get('max_length')}"),
        ("dense", f"{manifest.dense_dim} × float16, normalised"),
        ("sparse", f"vocabulary {manifest.vocab_size:,}, uint32 ids + float32 weights"),
        ("colbert", f"{manifest.colbert_dim} × float16 per token" if manifest.has_colbert else "not stored"),
        ("text", "stored" if manifest.store_text else "not stored"),
        ("chunking", f"{manifest.chunking['tokens']} tokens, overlap {manifest.chunking['overlap']}"
                     if manifest.chunking else "off (one row per document)"),
        ("rows", f"{manifest.documents:,} live ({sum(s.deleted_rows for s in manifest.shards):,} deleted, "
                 "awaiting compaction)"),
        ("shards", f"{len(manifest.shards)}"),
        ("state", f"{manifest.state}, generation {manifest.generation}"),
        ("size", _human_bytes(size)),
        ("created", manifest.created),
        ("updated", manifest.updated),
        ("written by", f"bge-index {manifest.tool_version}"),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    stdout.print(table)


@app.command("eval")
def evaluate_index(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.", show_default=False)],
    queries: Annotated[str, typer.Option("--queries", help="Queries: BEIR queries.jsonl (_id + text) or TSV.")],
    qrels: Annotated[Path, typer.Option("--qrels", help="Judgments: BEIR qrels.tsv (with header) or TREC qrels.")],
    modes: Annotated[str, typer.Option(help="Comma-separated modes to compare.")] = "dense,sparse,hybrid",
    metrics: Annotated[str, typer.Option(help="Comma-separated: ndcg@k, recall@k, precision@k, mrr@k, map, map@k.")]
    = "ndcg@10,recall@100,mrr@10,map",
    depth: Annotated[int, typer.Option(min=1, help="Documents retrieved per query (the run's length).")] = 1000,
    runs: Annotated[Optional[Path], typer.Option("--runs", help="Also write a TREC run per mode into this folder.")] = None,
    fusion: Annotated[Fusion, typer.Option(help="Hybrid fusion.")] = Fusion.weighted,
    normalize: Annotated[Normalize, typer.Option(help="Weighted hybrid: min-max normalise first.")] = Normalize.none,
    dense_weight: Annotated[float, typer.Option(help="Weight of the dense score.")] = 1.0,
    sparse_weight: Annotated[float, typer.Option(help="Weight of the sparse score.")] = 0.3,
    group_by_doc: Annotated[bool, typer.Option("--group-by-doc", help="Judge documents by their best passage.")] = False,
    output_format: Annotated[InfoFormat, typer.Option("--format", help="Output format.")] = InfoFormat.table,
    model: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MODEL", help="Must be the index's own model.")] = None,
    device: Annotated[str, typer.Option(envvar="BGE_INDEX_DEVICE", callback=_check_device)] = "auto",
    dtype: Annotated[Dtype, typer.Option(envvar="BGE_INDEX_DTYPE",
                                         help="Query encoding precision; auto: the index's own.")] = Dtype.auto,
) -> None:
    """Score retrieval quality per mode against relevance judgments (trec_eval's metric definitions)."""
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in mode_list if m not in {x.value for x in Mode}]
    if unknown or not mode_list:
        raise _fail(f"--modes: unknown mode(s) {', '.join(unknown) or '(none)'} (use dense, sparse, hybrid, colbert)",
                    EXIT_USAGE)
    try:
        metric_list = parse_metrics(metrics)
    except EvaluationInputError as error:
        raise _fail(f"--metrics: {error}", EXIT_USAGE) from None
    judgments = _run(lambda: read_qrels(qrels))
    query_list = [Query(d.id, d.text) for d in _run(lambda: read_queries(queries))]
    weights = ScoreWeights(dense_weight, sparse_weight)
    opened = _run(lambda: IndexSearch(index_dir, model=model, device=device, dtype=dtype.value))
    table_rows = {}
    for mode in mode_list:
        results = _run(lambda: opened.search(query_list, k=depth, mode=mode, weights=weights, with_text=False,
                                             group_by_doc=group_by_doc, fusion=fusion.value,
                                             normalize=None if normalize is Normalize.none else normalize.value))
        run = {r.query.id: [(h.id, h.hit.score) for h in r.hits] for r in results}
        if runs is not None:
            runs.mkdir(parents=True, exist_ok=True)
            with (runs / f"{mode}.trec").open("w", encoding="utf-8") as stream:
                write_trec_run(stream, run, f"bge-index-{mode}")
        table_rows[mode] = _run(lambda: evaluate(run, judgments, metric_list))
    coverage = query_coverage(run, judgments)
    if output_format is InfoFormat.json:
        sys.stdout.write(json.dumps({"index_dir": str(index_dir), "queries_evaluated": len(coverage.evaluated),
                                     "metrics": table_rows}, indent=2) + "\n")
        return
    table = Table(title=f"{escape(str(index_dir))}: {len(coverage.evaluated)} queries with judgments",
                  title_justify="left")
    table.add_column("mode")
    for metric in metric_list:
        table.add_column(metric.name, justify="right")
    for mode, values in table_rows.items():
        table.add_row(mode, *(f"{values[m.name]:.4f}" for m in metric_list))
    stdout.print(table)
    if coverage.missing_from_run or coverage.without_relevant:
        stderr.print(f"bge-index: note: {len(coverage.without_relevant)} judged queries have no relevant document "
                     "and are left out of the means", markup=False)


@app.command()
def verify(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.", show_default=False)],
) -> None:
    """Check every shard and deletion set against the manifest: sizes, checksums, schema, rows, duplicate ids."""
    problems = _run(lambda: verify_index(index_dir))
    for problem in problems:
        stderr.print(f"bge-index: damaged: {escape(problem)}")
    if problems:
        raise typer.Exit(EXIT_FAILURE)
    manifest = _run(lambda: read_manifest(index_dir))
    stdout.print(f"{index_dir}: OK ({manifest.documents:,} rows in {len(manifest.shards)} shards, "
                 f"generation {manifest.generation}, {manifest.state})", markup=False)


# ---------------------------------------------------------------------------
# export


export_app = typer.Typer(help="Copy an index into a search engine that serves it at scale.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("milvus")
def export_milvus(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.", show_default=False)],
    uri: Annotated[str, typer.Option(envvar="BGE_INDEX_MILVUS_URI", help="A Milvus Lite file (e.g. ./index.db) or a server URL (http://host:19530).")],
    collection: Annotated[str, typer.Option(envvar="BGE_INDEX_MILVUS_COLLECTION", help="Collection to create or update.")],
    batch: Annotated[int, typer.Option(min=1, help="Rows read and sent per request.")] = 1000,
    index_type: Annotated[MilvusIndexType, typer.Option("--index", help="Dense vector index: flat (exact) or hnsw.")] = MilvusIndexType.flat,
    with_text: Annotated[bool, typer.Option("--with-text", help="Also store the text (if the index has it).")] = False,
    drop_existing: Annotated[bool, typer.Option("--drop-existing", help="Drop the collection first instead of upserting into it.")] = False,
    dense_type: Annotated[DenseType, typer.Option(help="auto: float on Milvus Lite (it has no float16 vectors), float16 on a server.")] = DenseType.auto,
    token: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_TOKEN", help="Server token (user:password).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the export summary as JSON here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Export an index into a Milvus collection (bge-index[milvus]): ids, dense and sparse vectors, optional text."""
    from bge_index.milvus import export_index

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its errors reach the user through _run
    last = [time.monotonic()]

    def progress(rows: int) -> None:
        if not quiet and time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            stderr.print(f"bge-index: {rows:,} rows exported", markup=False)

    summary = _run(lambda: export_index(index_dir, uri, collection, batch=batch, index_type=index_type.value,
                                        with_text=with_text, drop_existing=drop_existing, dense_type=dense_type.value,
                                        token=token, progress=progress))
    if report is not None:
        report.write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    if not quiet:
        verb = "Created" if summary.created else "Updated"
        stdout.print(f"{verb} Milvus collection {summary.collection} at {summary.uri}: {summary.rows:,} rows in "
                     f"{summary.seconds:.1f} s ({summary.rows_per_second:,.0f} rows/s), dense {summary.dense_type}",
                     markup=False)
        stdout.print(f"  empty sparse vectors (stored with a placeholder token): {summary.empty_sparse:,}; "
                     f"stale rows removed: {summary.stale_removed:,}; texts cut to 65,535 bytes: {summary.texts_cut:,}",
                     markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
