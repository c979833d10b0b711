"""`bge-index eval`: retrieval quality per mode against relevance judgments, as trec_eval defines it.

This module owns the `eval` flags (the search options' own come from their
declaration, query.SEARCH_OPTIONS, but for k and mode, which --depth and
--modes stand for), the order of the work (every input and
output path is checked before the model loads), the TREC run files of
--runs, the metric table, and the notes on which judged queries are left
out of the means and why. The metrics are evaluation.py's; the searching
is `LocalIndex`'s, imported inside the command (it loads torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from bge_index.cli.display import note, shown, stdout
from bge_index.cli.options import (Device, Dtype, IndexDir, QueryDtype, QueryModel, ReportFormat, check_output_folder,
                                   with_search_flags)
from bge_index.input.documents import read_queries
from bge_index.errors import EvaluationInputError, InvalidOptionError, OutputError
from bge_index.search.evaluation import (DocumentCoverage, QueryCoverage, document_coverage, evaluate,
                                        evaluate_per_query, parse_metrics, query_coverage, read_qrels, write_trec_run)
from bge_index.search.query import SEARCH_OPTIONS, Mode, Query, request_from_options

SHOWN_IDS = 5  # query ids named in a note before "…"
K = next(o for o in SEARCH_OPTIONS if o.field == "k")  # --depth is k by another name

# The search options eval has no flag for: --depth and --modes stand for k and mode; colbert and explain are
# not what a run is judged on. Every other declared option is an eval flag as well.
NOT_EVAL_FLAGS = ("k", "mode", "colbert-weight", "explain")
# eval's words for some of them (the rest: search's)
EVAL_HELP = {"fusion": "Hybrid fusion.", "normalize": "Weighted hybrid: min-max normalise first.",
             "dense-weight": "Weight of the dense score.", "sparse-weight": "Weight of the sparse score.",
             "group-by-doc": "Judge documents by their best passage."}


@with_search_flags(before="output_format", leave_out=NOT_EVAL_FLAGS, help=EVAL_HELP, environment=False)
def evaluate_index(
    index_dir: IndexDir,
    queries: Annotated[str, typer.Option("--queries", help="Queries: BEIR queries.jsonl (_id + text) or TSV.")],
    qrels: Annotated[Path, typer.Option("--qrels", help="Judgments: BEIR qrels.tsv (with header) or TREC qrels.")],
    modes: Annotated[str, typer.Option(help="Comma-separated modes to compare.")] = "dense,sparse,hybrid",
    metrics: Annotated[str, typer.Option(help="Comma-separated: ndcg@k, recall@k, precision@k, mrr@k, map, map@k.")]
    = "ndcg@10,recall@100,mrr@10,map",
    depth: Annotated[int, typer.Option(min=K.minimum, max=K.maximum,
                                       help="Documents retrieved per query (the run's length).")] = 1000,
    runs: Annotated[Optional[Path], typer.Option("--runs", help="Also write a TREC run per mode into this folder.")] = None,
    output_format: Annotated[ReportFormat, typer.Option("--format", help="Output format.")] = ReportFormat.table,
    per_query: Annotated[bool, typer.Option("--per-query", help="Also give each query's metrics (as trec_eval -q).")]
    = False,
    model: QueryModel = None,
    device: Device = "auto",
    dtype: QueryDtype = Dtype("auto"),
    *,
    search_options: dict[str, Any],
) -> None:
    """Score retrieval quality per mode against relevance judgments (trec_eval's metric definitions)."""
    mode_list = parse_modes(modes)
    try:
        metric_list = parse_metrics(metrics)
    except EvaluationInputError as error:
        raise InvalidOptionError(f"--metrics: {error}") from None
    check_output_folder(runs, "--runs")
    requests = {mode: request_from_options(search_options, k=depth, mode=mode, with_text=False) for mode in mode_list}
    judgments = read_qrels(qrels)
    query_list = [Query(d.id, d.text) for d in read_queries(queries)]
    coverage = query_coverage({q.id: () for q in query_list}, judgments)
    if not coverage.evaluated:
        raise EvaluationInputError(f"no query to evaluate: no query of --queries {queries} has a relevant judgment "
                                   f"in --qrels {qrels} (do the query ids match?)")

    documents = judged_documents_in_index(index_dir, judgments, qrels)  # before the model: a mismatch is quick

    from bge_index.search.local_index import LocalIndex  # loads torch and the model

    # What needs only the index (a folder that is not one, colbert without vectors) fails before the model
    # loads; each query is encoded once for every mode (remember_queries): its vectors are the same bits
    # whatever is encoded with them, so each mode's run is what the query gets alone.
    opened = LocalIndex(index_dir, model=model, device=device, dtype=dtype.value, modes=mode_list,
                        remember_queries=True)
    table_rows, query_rows = {}, {}
    try:
        for mode, request in requests.items():
            results = opened.search(query_list, request)
            run = {r.query.id: [(h.id, h.hit.score) for h in r.hits] for r in results}
            if runs is not None:
                write_run(runs / f"{mode.value}.trec", run, f"bge-index-{mode.value}")
            table_rows[mode.value] = evaluate(run, judgments, metric_list)
            if per_query:
                query_rows[mode.value] = evaluate_per_query(run, judgments, metric_list)
    finally:
        opened.close()
    if output_format is ReportFormat.json:
        report = {"index_dir": str(index_dir), "queries_evaluated": len(coverage.evaluated), "metrics": table_rows,
                  "relevant_documents": {"judged": documents.relevant, "in_index": documents.in_index}}
        if per_query:
            report["per_query"] = query_rows
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        if per_query:
            _print_per_query(query_rows, metric_list)
        table = Table(title=f"{escape(str(index_dir))}: {len(coverage.evaluated)} queries with judgments",
                      title_justify="left")
        table.add_column("mode")
        for metric in metric_list:
            table.add_column(metric.name, justify="right")
        for mode_name, values in table_rows.items():
            table.add_row(mode_name, *(f"{values[m.name]:.4f}" for m in metric_list))
        stdout.print(table)
    for message in coverage_notes(coverage):
        note(message)
    if documents.in_index < documents.relevant:
        note(f"{documents.relevant - documents.in_index:,} of the {documents.relevant:,} documents judged relevant "
             f"are not in the index (e.g. {', '.join(repr(i) for i in documents.missing_examples)}): no run can "
             "find them")


def judged_documents_in_index(index_dir: Path, judgments, qrels_path: Path) -> DocumentCoverage:
    """How many relevant documents of the judgments the index holds; an error when it holds none of them."""
    from bge_index.store.manifest import read_manifest
    from bge_index.store.shard_reader import iter_live_keys

    index_ids = {doc_id for doc_id, _, _ in iter_live_keys(index_dir, read_manifest(index_dir))}
    documents = document_coverage(judgments, index_ids)
    if documents.none_in_index:
        sample = next(iter(index_ids), None)
        hint = (f"; the index's ids look like {sample!r}" if sample is not None else "; the index is empty")
        files = " (an index of files: `bge-index index --id-from stem` names them as BEIR qrels do)" \
            if sample is not None and "." in sample.rsplit("/", 1)[-1] else ""
        raise EvaluationInputError(
            f"none of the {documents.relevant:,} documents judged relevant in --qrels {qrels_path} is in the index "
            f"(e.g. {', '.join(repr(i) for i in documents.missing_examples)}){hint}{files}: every metric would be 0")
    return documents


def _print_per_query(query_rows: dict[str, dict[str, dict[str, float]]], metric_list) -> None:
    """One row per mode and query, as trec_eval -q prints them."""
    table = Table(title="per query", title_justify="left")
    table.add_column("mode")
    table.add_column("query")
    for metric in metric_list:
        table.add_column(metric.name, justify="right")
    for mode_name, per_query in query_rows.items():
        for qid, values in per_query.items():
            table.add_row(mode_name, escape(shown(qid)), *(f"{values[m.name]:.4f}" for m in metric_list))
    stdout.print(table)


def parse_modes(text: str) -> list[Mode]:
    """`dense,sparse,hybrid` -> [Mode.DENSE, ...]; an unknown or missing mode is a usage error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {mode.value for mode in Mode}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise InvalidOptionError(f"--modes: unknown mode(s) {', '.join(unknown) or '(none)'} "
                                 f"(use {', '.join(mode.value for mode in Mode)})")
    return [Mode(name) for name in names]


def write_run(path: Path, run: dict, tag: str) -> None:
    """One mode's TREC run file; a folder or file that cannot be written is an OutputError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as stream:
            write_trec_run(stream, run, tag)
    except OSError as failure:
        raise OutputError(f"--runs: cannot write {path}: {failure.strerror or failure}") from None


def coverage_notes(coverage: QueryCoverage) -> list[str]:
    """Why judged queries are left out of the means, one note per cause, each naming its queries."""
    notes = []
    if coverage.missing_from_run:
        notes.append(f"{_count(coverage.missing_from_run)} with a relevant document "
                     f"{_are(coverage.missing_from_run)} not in the queries file ({_ids(coverage.missing_from_run)}) "
                     "and left out of the means")
    if coverage.without_relevant:
        notes.append(f"{_count(coverage.without_relevant)} {_have(coverage.without_relevant)} no relevant document "
                     f"({_ids(coverage.without_relevant)}) and {_are(coverage.without_relevant)} left out of the means")
    return notes


def _count(ids: tuple[str, ...]) -> str:
    return f"{len(ids)} judged {'query' if len(ids) == 1 else 'queries'}"


def _are(ids: tuple[str, ...]) -> str:
    return "is" if len(ids) == 1 else "are"


def _have(ids: tuple[str, ...]) -> str:
    return "has" if len(ids) == 1 else "have"


def _ids(ids: tuple[str, ...]) -> str:
    shown = ", ".join(ids[:SHOWN_IDS])
    return shown + (", …" if len(ids) > SHOWN_IDS else "")
