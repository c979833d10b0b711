"""`bge-index verify`: check an index's files against its manifest; exit 1 and one line per problem if damaged.

The checks are shard_reader.check_index's (sizes, checksums, schema, rows,
deletion sets, duplicate live ids, search files); no model is loaded.
`--repair` rebuilds the search files that are missing or damaged from their
shards and commits a manifest naming them (store/repair.py), under the
index's writer lock: a run writing the index makes it exit 75 (or wait, with
--wait). Damaged shards and deletion sets are reported, never rewritten:
exit 1.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bge_index.cli.display import shown, stderr, stdout, warning
from bge_index.cli.options import IndexDir
from bge_index.errors import EXIT_FAILURE, UsageError
from bge_index.store.manifest import Manifest, read_manifest


def verify(
    index_dir: IndexDir,
    repair: Annotated[bool, typer.Option(
        "--repair", help="Rebuild missing or damaged search files from their shards and commit a manifest naming "
                         "them (shards are never rewritten: a damaged shard still fails).")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="With --repair: if a run is writing the index, wait for it instead of exiting 75.")] = False,
) -> None:
    """Check every shard, deletion set and search file against the manifest: sizes, checksums, schema, rows,
    duplicate ids. With --repair, rebuild the search files that fail."""
    if wait and not repair:
        raise UsageError("--wait is for --repair (a check alone takes no lock)")
    if repair:
        _repair(index_dir, wait)
        return
    from bge_index.store.shard_reader import verify_index  # pyarrow.parquet: only for this command

    problems = verify_index(index_dir)
    for problem in problems:
        stderr.print(f"bge-index: damaged: {shown(problem)}", markup=False)
    if problems:
        raise typer.Exit(EXIT_FAILURE)
    _print_ok(index_dir, read_manifest(index_dir))


def _repair(index_dir, wait: bool) -> None:
    from bge_index.store.repair import repair_index  # pyarrow: only for this command

    report = repair_index(index_dir, wait=wait, on_wait=warning)
    for shard, problems in report.rebuilt.items():
        for problem in problems:
            stderr.print(f"bge-index: repaired: {shown(problem)}", markup=False)
        stderr.print(f"bge-index: repaired: the search files of {shown(shard)} rebuilt from it", markup=False)
    for problem in report.not_repairable:
        stderr.print(f"bge-index: damaged: {shown(problem)}", markup=False)
    if report.not_repairable:
        raise typer.Exit(EXIT_FAILURE)
    _print_ok(index_dir, report.manifest)


def _print_ok(index_dir, manifest: Manifest) -> None:
    stdout.print(f"{shown(index_dir)}: OK ({manifest.documents:,} rows in {len(manifest.shards)} shards, "
                 f"generation {manifest.generation}, {manifest.state})", markup=False)
