"""`bge-index info`: describe an index from its manifest (model, vectors, rows, shards, size), as a table or JSON.

Reads the manifest and the files' sizes only: no shard is opened, no model loaded.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from bge_index.cli.display import human_bytes, shown, stdout
from bge_index.cli.options import IndexDir, ReportFormat
from bge_index.store.manifest import Manifest, read_manifest
from bge_index.store.info import index_info, index_size_bytes


def info(
    index_dir: IndexDir,
    output_format: Annotated[ReportFormat, typer.Option("--format", help="Output format.")] = ReportFormat.table,
) -> None:
    """Describe an index: model, dimensions, documents, shards, sizes, format version."""
    manifest = read_manifest(index_dir)
    if output_format is ReportFormat.json:
        sys.stdout.write(json.dumps(index_info(index_dir, manifest), ensure_ascii=False, indent=2) + "\n")
        return
    size = index_size_bytes(index_dir, manifest)
    table = Table(title=f"bge-index {escape(shown(index_dir))}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in describe(manifest, size):
        table.add_row(name, escape(shown(value)))  # the model's path may hold anything
    stdout.print(table)


def describe(manifest: Manifest, size: int) -> list[tuple[str, str]]:
    """The rows of the `info` table: (field, value) in reading order."""
    model = manifest.model
    identity = f"revision {model['revision']}" if model.get("revision") else f"sha256 {model.get('sha256')}"
    return [
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
        ("size", human_bytes(size)),
        ("created", manifest.created),
        ("updated", manifest.updated),
        ("written by", f"bge-index {manifest.tool_version}"),
    ]
