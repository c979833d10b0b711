"""`bge-index verify --repair`: rebuild an index's missing or damaged search files from its shards.

The search files in INDEX/search/ derive from the shards alone
(vector_store.build_search_files), so any of them that is missing, cut short,
changed, or named wrongly in the manifest can be built again. A repair does
what an index run's commit does, and nothing else:

1. take the index's writer lock (IndexLock: a run writing the index makes the
   repair a BusyError, exit 75, unless it waits);
2. check every file against the manifest (shard_reader.check_index);
3. rebuild all the search files of each shard that has a bad one (or lacks the
   pruning files, written before they existed: an upgrade to pruned search), each
   written to a temporary file, fsynced and renamed into place;
4. fsync the folders and publish a manifest naming them (the next generation,
   shard_writer.publish_manifest), so readers that opened the previous one
   retry on the new one.

Shards and deletion sets are the data: they are never rewritten. A damaged
one is reported as not repairable (the search files of the other shards are
still repaired). A file that cannot be written is a WriteError and nothing is
committed: the files rebuilt so far hold what the shard derives, the same
bytes a sound file held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bge_index import __version__
from bge_index.store.lock import IndexLock
from bge_index.store.manifest import Manifest, read_manifest, utc_now
from bge_index.store.names import PRUNE_SEARCH_KINDS, SEARCH_DIR
from bge_index.store.shard_reader import check_index
from bge_index.store.shard_writer import publish_manifest, writing
from bge_index.store.vector_store import build_search_files

NOT_REPAIRABLE = ("not repairable: shards and deletion sets are the index's data, nothing rebuilds them; restore "
                  "the file from a backup, or index the documents again into a new folder")


@dataclass
class RepairReport:
    """What a repair did: `rebuilt` maps each shard file to the problems its rebuilt search files had;
    `not_repairable` lists problems of the data itself (each ending with why); `manifest` is the index's
    manifest afterwards (a new generation when anything was rebuilt)."""

    manifest: Manifest
    rebuilt: dict[str, list[str]] = field(default_factory=dict)
    not_repairable: list[str] = field(default_factory=list)


def repair_index(index_dir: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None
                 ) -> RepairReport:
    """Rebuild every missing or damaged search file of `index_dir` and commit a manifest naming them.

    Raises IndexFormatError when `index_dir` is not an index (or its manifest cannot be read), IndexLockedError
    (exit 75) when a run holds the index and `wait` is false, WriteError or OutputError when a file cannot be
    written (nothing committed then).
    """
    read_manifest(index_dir)  # not an index: that error, before the lock could make a folder
    with IndexLock(index_dir, wait=wait, on_wait=on_wait, label=""):
        manifest = read_manifest(index_dir)  # under the lock: the generation no writer can move now
        check = check_index(index_dir, manifest)
        report = RepairReport(manifest, dict(check.search), [f"{problem} ({NOT_REPAIRABLE})" for problem in check.other])
        # Shards written before the pruning files existed are searched by full scans: give them the files too.
        damaged = {problem.split(":")[0] for problem in check.other}
        for shard in manifest.shards:
            kinds = {record.get("kind") for record in shard.search or [] if isinstance(record, dict)}
            if (shard.search is not None and not set(PRUNE_SEARCH_KINDS) <= kinds and shard.file not in report.rebuilt
                    and str(index_dir / shard.file) not in damaged):
                report.rebuilt[shard.file] = [f"{index_dir / SEARCH_DIR}: no pruning files for {shard.file} "
                                              "(written before they existed): added"]
        if not report.rebuilt:
            return report
        shards = []
        for shard in manifest.shards:
            if shard.file in report.rebuilt:
                with writing(index_dir / SEARCH_DIR):
                    shard = build_search_files(index_dir, manifest, shard)
            shards.append(shard)
        repaired = replace(manifest, shards=shards, generation=manifest.generation + 1, updated=utc_now(),
                           tool_version=__version__)
        publish_manifest(index_dir, repaired)
        report.manifest = repaired
        return report
