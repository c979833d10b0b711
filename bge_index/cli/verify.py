"""`bge-index verify`: check an index's files against its manifest; exit 1 and one line per problem if damaged.

The checks are shard_reader.verify_index's (sizes, checksums, schema, rows,
deletion sets, duplicate live ids); no model is loaded.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from bge_index.cli.display import stderr, stdout
from bge_index.cli.options import IndexDir
from bge_index.errors import EXIT_FAILURE
from bge_index.store.manifest import read_manifest


def verify(index_dir: IndexDir) -> None:
    """Check every shard and deletion set against the manifest: sizes, checksums, schema, rows, duplicate ids."""
    from bge_index.store.shard_reader import verify_index  # pyarrow.parquet: only for this command

    problems = verify_index(index_dir)
    for problem in problems:
        stderr.print(f"bge-index: damaged: {escape(problem)}")
    if problems:
        raise typer.Exit(EXIT_FAILURE)
    manifest = read_manifest(index_dir)
    stdout.print(f"{index_dir}: OK ({manifest.documents:,} rows in {len(manifest.shards)} shards, "
                 f"generation {manifest.generation}, {manifest.state})", markup=False)
