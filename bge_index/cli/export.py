"""`bge-index export milvus` and `export parquet`: an index into a Milvus collection, or its live rows into one
plain Parquet file.

This module owns the export flags, the progress lines, the summary and the
`--report` file; the export itself is milvus.export_index, imported inside
the command (pymilvus is optional).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from bge_index.cli.display import shown, stderr, stdout, write_json
from bge_index.cli.options import DenseType, IndexDir, MilvusIndexType, Quiet, check_output_file
from bge_index.errors import InvalidOptionError

PROGRESS_SECONDS = 10


def export_milvus(
    index_dir: IndexDir,
    uri: Annotated[str, typer.Option(envvar="BGE_INDEX_MILVUS_URI", help="A Milvus Lite file (e.g. ./index.db) or a server URL (http://host:19530).")],
    collection: Annotated[str, typer.Option(envvar="BGE_INDEX_MILVUS_COLLECTION", help="Collection to create or update.")],
    batch: Annotated[int, typer.Option(min=1, help="Rows read and sent per request.")] = 1000,
    index_type: Annotated[MilvusIndexType, typer.Option("--index", help="Dense vector index: flat (exact) or hnsw.")] = MilvusIndexType.flat,
    with_text: Annotated[bool, typer.Option("--with-text", help="Also store the text (if the index has it).")] = False,
    drop_existing: Annotated[bool, typer.Option("--drop-existing", help="Drop the collection first instead of upserting into it.")] = False,
    dense_type: Annotated[DenseType, typer.Option(help="auto: float on Milvus Lite (it has no float16 vectors), float16 on a server.")] = DenseType.auto,
    token: Annotated[Optional[str], typer.Option(envvar="BGE_INDEX_MILVUS_TOKEN", help="Server token (user:password).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the export summary as JSON here.")] = None,
    quiet: Quiet = False,
) -> None:
    """Export an index into a Milvus collection (bge-index[milvus]): ids, dense and sparse vectors, optional text."""
    check_output_file(report, "--report")
    from bge_index.search.milvus import export_index

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its errors reach the user as MilvusError
    last = [time.monotonic()]

    def progress(rows: int) -> None:
        if not quiet and time.monotonic() - last[0] >= PROGRESS_SECONDS:
            last[0] = time.monotonic()
            stderr.print(f"bge-index: {rows:,} rows exported", markup=False)

    summary = export_index(index_dir, uri, collection, batch=batch, index_type=index_type.value, with_text=with_text,
                           drop_existing=drop_existing, dense_type=dense_type.value, token=token, progress=progress)
    if not quiet:
        verb = "Created" if summary.created else "Updated"
        stdout.print(f"{verb} Milvus collection {shown(summary.collection)} at {shown(summary.uri)}: {summary.rows:,} rows in "
                     f"{summary.seconds:.1f} s ({summary.rows_per_second:,.0f} rows/s), dense {summary.dense_type}",
                     markup=False)
        stdout.print(f"  empty sparse vectors (stored with a placeholder token): {summary.empty_sparse:,}; "
                     f"stale rows removed: {summary.stale_removed:,}; texts cut to 65,535 bytes: {summary.texts_cut:,}; "
                     f"rows whose metadata is over Milvus's 64 KiB JSON (not filterable there): {summary.fields_cut:,}",
                     markup=False)
    if report is not None:
        write_json(report, summary.to_json(), "--report")


def export_parquet(
    index_dir: IndexDir,
    out: Annotated[Path, typer.Argument(help="The Parquet file to write (replaced if it exists).", show_default=False)],
    vectors: Annotated[bool, typer.Option("--vectors", help="Also write the dense and sparse (and ColBERT) vectors.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write the live rows of an index as one plain Parquet table (no manifest, no deletion sets needed)."""
    from bge_index.store.export import export_parquet as write_live_rows
    from bge_index.store.manifest import read_manifest

    check_output_file(out, "OUT")
    if out.resolve().parent == index_dir.resolve() or index_dir.resolve() in out.resolve().parents:
        raise InvalidOptionError(f"OUT {out}: inside the index folder; write it elsewhere")
    rows = write_live_rows(index_dir, read_manifest(index_dir), out, vectors=vectors)
    if not quiet:
        stdout.print(f"{rows:,} live rows written to {shown(out)}", markup=False)
