"""`bge-index search`: one query or a file of queries against an index or its Milvus export.

This module owns the `search` flags (the search options' own come from their
declaration, query.SEARCH_OPTIONS), turns them into a `query.SearchRequest`,
opens the backend (`LocalIndex`, or `MilvusBackend` with --backend milvus),
prints its notes as warnings and its results in the chosen format. The
backends validate the request themselves (what Milvus cannot do included).
They load the model, so they are imported here, inside the command: the
rest of the CLI never imports torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bge_index.cli.display import print_results, warning
from bge_index.cli.options import (Backend, Device, Dtype, IndexDir, QueryDtype, QueryModel, ResultFormat,
                                   with_search_flags)
from bge_index.input.documents import read_queries
from bge_index.errors import EmptyQueryError, QueryFileError, UsageError
from bge_index.search.query import Query, SearchBackend, request_from_options


@with_search_flags(before="queries")  # -k, --mode, --dense-weight, ...: one flag per declared search option
def search(
    index_dir: IndexDir,
    query: Annotated[Optional[str], typer.Argument(help="Query text (or use --queries).", show_default=False)] = None,
    queries: Annotated[Optional[str], typer.Option("--queries", help="JSONL (_id/id + text) or TSV (id<TAB>text); - for stdin.")] = None,
    output_format: Annotated[ResultFormat, typer.Option("--format", envvar="BGE_INDEX_FORMAT", help="Output format.")] = ResultFormat.table,
    model: QueryModel = None,
    device: Device = "auto",
    dtype: QueryDtype = Dtype("auto"),
    run_tag: Annotated[str, typer.Option(help="Run name in the last TREC column.")] = "bge-index",
    backend: Annotated[Backend, typer.Option(envvar="BGE_INDEX_BACKEND",
                                             help="local: this index's files; milvus: a collection exported from it.")] = Backend.local,
    uri: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_URI", help="--backend milvus: a Milvus Lite file or a server URL.")] = None,
    collection: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_COLLECTION", help="--backend milvus: collection name.")] = None,
    token: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_TOKEN", help="--backend milvus: server token (user:password).")] = None,
    route_limit: Annotated[Optional[int], typer.Option(min=1, help="--backend milvus, hybrid: rows each route (dense, sparse) returns before fusion; default 16384, the most Milvus allows.")] = None,
    *,
    search_options: dict[str, Any],
) -> None:
    """Search an index with one query or a file of queries."""
    if (query is None) == (queries is None):
        raise UsageError("give either a query or --queries FILE (not both)")
    if backend is Backend.milvus and not (uri and collection):
        raise UsageError("--backend milvus needs --uri and --collection")
    if backend is Backend.local and (uri or collection or route_limit):
        raise UsageError("--uri, --collection and --route-limit need --backend milvus")
    request = request_from_options(search_options, with_text=output_format is not ResultFormat.trec)
    if backend is Backend.milvus:
        from bge_index.search.milvus import MilvusBackend

        MilvusBackend.check_request(request)  # before the model loads
    if query is not None and not query.strip():
        raise EmptyQueryError("the query is empty: give the text to search for")
    query_list = [Query("1", query)] if query is not None else read_query_file(queries)
    repeated = _repeated_ids(query_list)
    if repeated:
        warning(f"duplicate query ids (each occurrence is answered, in order): {', '.join(repeated)}")
    opened = open_backend(backend, index_dir, model, device, dtype.value,
                          uri=uri, collection=collection, token=token, route_limit=route_limit,
                          modes=[request.mode])
    try:
        for message in opened.notes:
            warning(message)
        results = opened.search(query_list, request)
    finally:
        opened.close()
    print_results(results, output_format, request.mode.value, run_tag)


def read_query_file(path: str) -> list[Query]:
    """The queries of --queries; a query with no text is a usage error (exit 2), like an empty query argument."""
    try:
        documents = read_queries(path)
    except QueryFileError as error:
        # The reader refuses a record without text on its own terms (exit 1); for the user it is an empty query.
        if str(error).endswith(("empty text", "with a non-empty id and text")):
            raise EmptyQueryError(f"{error} (an empty query)") from None
        raise
    return [Query(d.id, d.text) for d in documents]


def _repeated_ids(queries: list[Query]) -> list[str]:
    """Query ids that occur more than once, sorted."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for query in queries:
        (repeated if query.id in seen else seen).add(query.id)
    return sorted(repeated)


def open_backend(backend: Backend, index_dir: Path, model: str | None, device: str, dtype: str, *,
                 uri: str | None = None, collection: str | None = None, token: str | None = None,
                 route_limit: int | None = None, modes=()) -> SearchBackend:
    """The backend to search (it loads the model: torch is imported here, not before). For the local index,
    what needs only the index is checked first (a folder that is not an index, colbert among `modes` on an
    index without ColBERT vectors), before the model loads."""
    if backend is Backend.milvus:
        from bge_index.search.milvus import MilvusBackend

        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its errors reach the user as MilvusError
        return MilvusBackend(index_dir, uri, collection, model=model, device=device, dtype=dtype, token=token,
                             route_limit=route_limit)
    from bge_index.search.local_index import LocalIndex

    return LocalIndex(index_dir, model=model, device=device, dtype=dtype, modes=modes)
