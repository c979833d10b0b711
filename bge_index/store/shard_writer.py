"""Writing an index: new shards, deletion sets, compaction and the manifest switch.

Shards are immutable: an updated or removed document is masked out by its
shard's deletion set, and a shard more than half dead is compacted into a
new one. Small shards (runs that change a few documents each add one) are
merged tier by tier, so that the index neither grows nor slows down with
the number of runs. Every file is written to a temporary name, fsynced and renamed into
place, and the manifest is renamed last: a reader that starts from
manifest.json sees the previous state or the new one, never a mix. Files of
the previous state are kept until the next write, so a reader that has just
read the old manifest can still open its shards.

The index folder is a boundary: no file is written through a symlink.
Temporary shards are created with O_CREAT|O_EXCL|O_NOFOLLOW (a leftover of a
crashed run, link or not, is unlinked first: that removes the link, never
its target) and Parquet is written through that open file; renames replace
a name without following it. Files follow the user's umask.

A write that fails (disk full, I/O error, read-only file system, no
permission: any OSError, wherever it comes from) is a WriteError naming the
file and the OS error, raised before the manifest switch: one line and exit 1
in the CLI, and the previous generation stays what readers see (`abort`
removes what was written). Every rename is followed by an fsync of its
folder before the manifest that names the file is written (`sync_folders`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_index.errors import IndexFormatError, WriteError
from bge_index.store.deletes import write_deletes_file
from bge_index.store.names import (DERIVED_PATTERN, MANIFEST_FILE, RETIRED_DIR, SEARCH_DIR, deletes_file_name, is_index_data_file,
                                   shard_file_name)
from bge_index.store.manifest import Manifest, SHARD_ROW_GROUP_ROWS, SHARD_WRITE_OPTIONS, ShardInfo, manifest_schema, utc_now
from bge_index.store.files import fault_point, file_sha256, fsync_dir, write_atomically
from bge_index.store.shard_reader import RowLocation, open_shard, read_deleted_rows
from bge_index.store.vector_store import build_search_files, remove_unreferenced_search_files

COMPACT_WHEN_DEAD = 0.5  # a shard with more than this fraction of deleted rows is rewritten
MERGE_FACTOR = 4  # this many small shards of one size tier are merged into one (see IndexWriter._merge_small_shards)
_ROW_GROUP_BYTES = 64 << 20  # bounds memory when rows are large (ColBERT vectors of long documents)


@dataclass
class RowBatch:
    """Rows ready to store. dense: [B, D] float; sparse: B (ids, weights); colbert: B [n, Dc] or None.

    With chunking, `doc_ids`, `chunks` and `spans` (char start, end) say which passage of which document a row is.
    """

    ids: list[str]
    content_hashes: list[str]
    texts: list[str] | None
    dense: np.ndarray
    sparse: list[tuple[np.ndarray, np.ndarray]]
    colbert: list[np.ndarray] | None = None
    doc_ids: list[str] | None = None
    chunks: list[int] | None = None
    spans: list[tuple[int, int]] | None = None
    # Where each row came from (a file's real path; `<stdin>`) and its line or row number (None: a whole file)
    sources: list[str | None] | None = None
    source_lines: list[int | None] | None = None
    metadata: list[dict[str, str] | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _list_array(parts: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _fixed_list_array(matrix: np.ndarray, dim: int) -> pa.Array:
    """[N, dim] -> fixed_size_list<float16>[dim], one row per list."""
    flat = np.ascontiguousarray(matrix, dtype=np.float16).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), dim)


def rows_to_table(rows: RowBatch, schema: pa.Schema) -> pa.Table:
    """A RowBatch as an Arrow table of a shard `schema`: dense and ColBERT vectors as float16, sparse as uint32 ids
    and float32 weights."""
    dense_dim = schema.field("dense").type.list_size
    columns: dict[str, pa.Array] = {"id": pa.array(rows.ids, type=pa.string()),
                                    "content_hash": pa.array(rows.content_hashes, type=pa.string())}
    if "doc_id" in schema.names:
        assert rows.doc_ids is not None and rows.chunks is not None and rows.spans is not None
        columns["doc_id"] = pa.array(rows.doc_ids, type=pa.string())
        columns["chunk"] = pa.array(rows.chunks, type=pa.int32())
        columns["char_start"] = pa.array([s[0] for s in rows.spans], type=pa.int64())
        columns["char_end"] = pa.array([s[1] for s in rows.spans], type=pa.int64())
    if "text" in schema.names:
        columns["text"] = pa.array(rows.texts, type=pa.string())
    columns["dense"] = _fixed_list_array(rows.dense, dense_dim)
    columns["sparse"] = pa.StructArray.from_arrays(
        [_list_array([s[0] for s in rows.sparse], pa.uint32()), _list_array([s[1] for s in rows.sparse], pa.float32())],
        fields=list(schema.field("sparse").type),
    )
    if "colbert" in schema.names:
        colbert_dim = schema.field("colbert").type.value_type.list_size
        assert rows.colbert is not None
        token_counts = np.fromiter((len(c) for c in rows.colbert), dtype=np.int64, count=len(rows.colbert))
        offsets = np.concatenate([[0], np.cumsum(token_counts)]).astype(np.int32)
        stacked = np.concatenate(rows.colbert) if rows.colbert else np.zeros((0, colbert_dim))
        columns["colbert"] = pa.ListArray.from_arrays(pa.array(offsets), _fixed_list_array(stacked, colbert_dim))
    if "source" in schema.names:
        count = len(rows.ids)
        columns["source"] = pa.array(rows.sources if rows.sources is not None else [None] * count, type=pa.string())
        columns["source_line"] = pa.array(rows.source_lines if rows.source_lines is not None else [None] * count,
                                          type=pa.int64())
        columns["metadata"] = pa.array([None if m is None else list(m.items()) for m in rows.metadata]
                                       if rows.metadata is not None else [None] * count,
                                       type=schema.field("metadata").type)
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows of an older shard in `schema`: columns it lacks (a layout 1 shard's sources) come as nulls."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, type=field.type))
    return table.select(schema.names).cast(schema)


def create_exclusive(path: Path):
    """A new file at `path` opened for writing (binary, buffered), never through a symlink.

    A leftover at that name (a crashed run's temporary file, or a link someone planted) is unlinked first:
    unlinking a link removes the link, not its target. O_EXCL|O_NOFOLLOW then guarantees the file is ours.
    The mode is 0o666 less the umask, like any tool's.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Any OSError inside as a WriteError naming `path` (the file being written) and the OS error."""
    try:
        yield
    except OSError as error:
        raise WriteError.from_os_error(path, error) from error


def sync_folders(index_dir: Path) -> None:
    """fsync INDEX/search/ and INDEX/ (strictly: an I/O error is a WriteError): the barrier between renaming
    files into place and publishing a manifest that names them. Before a first manifest the folder holding
    INDEX/ too (best effort: it may not be ours), so a new index does not vanish with its parent's entry."""
    for folder in (index_dir / SEARCH_DIR, index_dir):
        if folder.is_dir():
            with writing(folder):
                fsync_dir(folder, strict=True)
    if not (index_dir / MANIFEST_FILE).exists():
        fsync_dir(index_dir.absolute().parent)


def publish_manifest(index_dir: Path, manifest: Manifest) -> None:
    """The switch to `manifest`'s generation: its files synced (`sync_folders`), then manifest.json written to
    a temporary file, fsynced and renamed over the old one. A failure before the rename is a WriteError and
    leaves the previous manifest in place."""
    sync_folders(index_dir)
    payload = (json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n").encode()
    with writing(index_dir / MANIFEST_FILE):
        write_atomically(index_dir / MANIFEST_FILE, lambda stream: stream.write(payload))


def merge_tier(live_rows: int) -> int:
    """The merge tier of a shard with `live_rows` (>= 1) live rows: floor(log_MERGE_FACTOR(live_rows))."""
    tier = 0
    while live_rows >= MERGE_FACTOR ** (tier + 1):
        tier += 1
    return tier


def merge_group(shards: list[ShardInfo], shard_rows: int) -> list[ShardInfo]:
    """The small shards (fewer than `shard_rows` live rows) to merge now: those of the lowest tier that holds
    MERGE_FACTOR of them or more; empty when no tier does."""
    tiers: dict[int, list[ShardInfo]] = {}
    for shard in shards:
        if 0 < shard.live_rows < shard_rows:
            tiers.setdefault(merge_tier(shard.live_rows), []).append(shard)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= MERGE_FACTOR:
            return tiers[tier]
    return []


class IndexWriter:
    """Builds the next generation of an index on top of `base` (the current manifest, if any).

    New rows go to new shards; rows of existing or new shards are retired
    with `delete`; `commit` writes deletion sets, compacts mostly-dead
    shards, merges small ones (`_merge_small_shards`), publishes the manifest and then removes files that neither the
    new nor the previous manifest names (leftovers of crashed runs included).
    Until `commit` renames the manifest, readers see `base`. `abort` removes
    what this writer wrote. Memory stays bounded: rows are buffered only up
    to one row group.
    """

    def __init__(self, index_dir: Path, manifest: Manifest, shard_rows: int, base: Manifest | None = None):
        if shard_rows < 1:
            raise ValueError("shard_rows must be at least 1")
        self.index_dir = index_dir
        self.manifest = manifest
        self.base = base
        self.shard_rows = shard_rows
        self.schema = manifest_schema(manifest)
        self.carried: list[ShardInfo] = list(base.shards) if base else []
        self.shards: list[ShardInfo] = []  # written by this writer
        self._deletions: dict[str, set[int]] = {}
        self._deletion_files: list[Path] = []  # deletion sets written by this writer (abort removes them)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_stream = None  # the open temporary shard file the ParquetWriter writes through
        self._shard_path: Path | None = None
        self._shard_row_count = 0
        self._publishing = False
        with writing(index_dir):
            index_dir.mkdir(parents=True, exist_ok=True)

    def shard_name(self, number: int) -> str:
        """File name of this writer's shard `number`, in its generation."""
        return shard_file_name(self.manifest.generation, number)

    # -- rows in ------------------------------------------------------------

    def write(self, rows: RowBatch) -> list[RowLocation]:
        """Append rows; returns where each one will live once committed."""
        return self._write_table(rows_to_table(rows, self.schema))

    def _write_table(self, table: pa.Table) -> list[RowLocation]:
        locations = []
        start = 0
        while start < table.num_rows:
            room = self.shard_rows - self._shard_row_count - self._pending_rows
            piece = table.slice(start, room)
            first_row = self._shard_row_count + self._pending_rows
            name = self.shard_name(len(self.shards))
            locations += [RowLocation(name, first_row + i) for i in range(piece.num_rows)]
            self._pending.append(piece)
            self._pending_rows += piece.num_rows
            self._pending_bytes += piece.nbytes
            start += piece.num_rows
            if self._shard_row_count + self._pending_rows >= self.shard_rows:
                self._flush_row_group()
                self._close_shard()
            elif self._pending_rows >= SHARD_ROW_GROUP_ROWS or self._pending_bytes >= _ROW_GROUP_BYTES:
                self._flush_row_group()
        return locations

    def adopt(self, staged: Path) -> ShardInfo | None:
        """Take in a complete shard written by someone else into a temporary name in this folder.

        The Ray engine's write tasks write shards as `.NAME.parquet.tmp` files
        (see ray_engine.py); this checks the file's schema against this
        index's, fsyncs it and renames it to this writer's next shard name,
        the same protocol as a shard written here. An empty file is removed.
        Call it between shards (not while rows are buffered).
        """
        if self._writer is not None or self._pending_rows:
            raise RuntimeError("adopt() between shards only: this writer has a shard open")
        try:
            is_file = stat.S_ISREG(os.lstat(staged).st_mode)
        except OSError as error:
            raise IndexFormatError(f"{staged}: not a readable shard ({error.strerror})") from None
        if not is_file:  # a symlink (or anything else) is never adopted: it would point outside the index
            raise IndexFormatError(f"{staged}: not a regular file (a symbolic link?); not adopted")
        try:
            parquet = pq.ParquetFile(staged)
            schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
        except (OSError, pa.ArrowException) as error:
            raise IndexFormatError(f"{staged}: not a readable shard ({error})") from error
        # As verify_index compares (list item names aside: Parquet calls them "element"), plus the format version.
        if not schema.equals(self.schema) or schema.metadata != self.schema.metadata:
            raise IndexFormatError(f"{staged}: schema differs from this index's:\n{schema}\nexpected:\n{self.schema}")
        if rows == 0:
            staged.unlink()
            return None
        final = self.index_dir / self.shard_name(len(self.shards))
        with writing(final):
            fd = os.open(staged, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(staged, final)
            self._shard_path = final  # abort() removes it until it is one of self.shards
            fsync_dir(self.index_dir)
            info = ShardInfo(final.name, rows, final.stat().st_size, file_sha256(final))
            self.shards.append(info)  # before its search files, so abort() removes the shard if they fail
            self._shard_path = None
            self.shards[-1] = info = build_search_files(self.index_dir, self.manifest, info)  # covered by the commit
        fault_point("shard-written")
        return info

    def delete(self, location: RowLocation) -> None:
        """Retire a row of an existing shard or of one written by this writer."""
        self._deletions.setdefault(location.file, set()).add(location.row)

    def _flush_row_group(self) -> None:
        if not self._pending_rows:
            return
        with writing(self.index_dir / self.shard_name(len(self.shards))):
            if self._writer is None:
                self._shard_path = self.index_dir / f".{self.shard_name(len(self.shards))}.tmp"
                self._shard_stream = create_exclusive(self._shard_path)
                self._writer = pq.ParquetWriter(self._shard_stream, self.schema, **SHARD_WRITE_OPTIONS)
            group = pa.concat_tables(self._pending)
            self._writer.write_table(group, row_group_size=group.num_rows)
        self._shard_row_count += group.num_rows
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        fault_point("row-group-written")

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        final = self.index_dir / self.shard_name(len(self.shards))
        with writing(final):
            self._writer.close()
            assert self._shard_path is not None and self._shard_stream is not None
            self._shard_stream.flush()
            os.fsync(self._shard_stream.fileno())
            self._shard_stream.close()
            self._shard_stream = None
            os.replace(self._shard_path, final)
            self._shard_path = final  # abort() removes it until it is one of self.shards
            fsync_dir(self.index_dir)  # the rename survives a crash (sync_folders checks it before the manifest)
            info = ShardInfo(final.name, self._shard_row_count, final.stat().st_size, file_sha256(final))
            self.shards.append(info)  # before its search files, so abort() removes the shard if they fail
            self._writer, self._shard_path, self._shard_row_count = None, None, 0
            self.shards[-1] = build_search_files(self.index_dir, self.manifest, info)
        fault_point("shard-written")

    # -- publishing ---------------------------------------------------------

    def commit(self, state: str = "complete", checkpoint: bool = False) -> Manifest:
        """Finish shards, apply deletions, publish the manifest, remove files nobody refers to.

        `checkpoint`: a commit in the middle of a run, which goes on writing on top of it. Every row keeps its
        place (no compaction, no merging of small shards), so the locations the run holds stay valid; the
        run's last commit compacts and merges.
        """
        self._flush_row_group()
        self._close_shard()
        kept = (self._apply_deletions(self.carried, compact=not checkpoint)
                + self._apply_deletions(list(self.shards), compact=not checkpoint))
        # Compaction above may have opened new shards; they are complete and live.
        self._flush_row_group()
        self._close_shard()
        written = {s.file for s in kept}
        kept += [s for s in self.shards if s.file not in written and s.file not in self._deletions]
        if not checkpoint:
            kept = self._merge_small_shards(kept)
        # Shards of a format version 1 index get their search files now, before the manifest names them.
        kept = [s if s.search is not None else build_search_files(self.index_dir, self.manifest, s) for s in kept]
        now = utc_now()
        self.manifest.shards = kept
        self.manifest.documents = sum(s.live_rows for s in kept)
        # The live-row view for other tools (deletes.py), named in the manifest it belongs to.
        deletes_path = self.index_dir / deletes_file_name(self.manifest.generation)
        self._deletion_files.append(deletes_path)  # abort() removes it until the manifest names it
        with writing(deletes_path):
            self.manifest.deletes = write_deletes_file(self.index_dir, self.manifest)
        self.manifest.state = state
        self.manifest.created = (self.base.created if self.base else "") or now
        self.manifest.updated = now
        fault_point("before-manifest")
        self._publishing = True  # from here on, abort() first checks whether the switch happened
        publish_manifest(self.index_dir, self.manifest)
        fault_point("after-manifest")
        try:
            self._remove_unreferenced_files()
        except OSError:
            pass  # committed already: what is left is removed by the next write
        return self.manifest

    def _apply_deletions(self, shards: list[ShardInfo], compact: bool = True) -> list[ShardInfo]:
        """Shards with their deletion sets brought up to date; dead shards dropped, mostly-dead ones compacted
        (unless `compact` is False)."""
        kept = []
        for shard in shards:
            new = self._deletions.get(shard.file)
            if not new:
                kept.append(shard)
                continue
            deleted = new | set(read_deleted_rows(self.index_dir, shard).tolist())
            if len(deleted) >= shard.rows:
                continue
            if compact and len(deleted) > COMPACT_WHEN_DEAD * shard.rows:
                self._compact(shard, deleted)
                continue
            kept.append(self._write_deletion_set(shard, deleted))
        return kept

    def _merge_small_shards(self, kept: list[ShardInfo]) -> list[ShardInfo]:
        """`kept` with small shards merged, tier by tier, so that runs that each add a few rows do not leave the
        index a pile of tiny shards (each with its own Parquet footer and search files, each a step for search).

        Shards below `shard_rows` live rows fall in tiers of MERGE_FACTOR: tier k holds F**k to F**(k+1)-1 live
        rows. When a tier holds F shards or more, they are copied, live rows only, into new shards (the "close a
        new shard" path, search files included) and leave the manifest; the merged shard lands in a higher tier,
        which may merge in turn. Each row is so rewritten about log_F(shard_rows) times over its life, and the
        index holds at most F-1 small shards per tier.
        """
        while group := merge_group(kept, self.shard_rows):
            first_new = len(self.shards)
            for shard in group:
                self._compact(shard, set(read_deleted_rows(self.index_dir, shard).tolist()))
            self._flush_row_group()
            self._close_shard()
            names = {s.file for s in group}
            kept = [s for s in kept if s.file not in names] + self.shards[first_new:]
        return kept

    def _compact(self, shard: ShardInfo, deleted: set[int]) -> None:
        """Copy a shard's live rows into new shards, one row group at a time (bounded memory)."""
        mask = np.ones(shard.rows, dtype=bool)
        mask[np.fromiter(deleted, dtype=np.int64, count=len(deleted))] = False
        parquet = open_shard(self.index_dir, shard)
        start = 0
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            keep = mask[start:start + table.num_rows]
            start += table.num_rows
            if keep.any():
                self._write_table(conform(table.filter(pa.array(keep)), self.schema))

    def _write_deletion_set(self, shard: ShardInfo, deleted: set[int]) -> ShardInfo:
        stem = shard.file.removesuffix(".parquet")
        path = self.index_dir / f"{stem}.deleted-{self.manifest.generation:06d}.npy"
        rows = np.array(sorted(deleted), dtype=np.uint32)
        with writing(path):
            self._deletion_files.append(path)  # a name of this generation: no manifest names it yet
            write_atomically(path, lambda stream: np.save(stream, rows, allow_pickle=False))
            return replace(shard, deleted_file=path.name, deleted_rows=len(rows), deleted_sha256=file_sha256(path))

    def abort(self) -> None:
        """Remove what this writer wrote, unless its manifest is already the published one.

        Best effort: a file that cannot be removed (the disk that failed the run may fail this too) stays, to
        be removed by the next write; the error that failed the run is the one reported.
        """
        if self._publishing and self._published_generation() == self.manifest.generation:
            return
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, pa.ArrowException):
                pass  # e.g. disk full: the file is removed below anyway
        if self._shard_stream is not None:
            try:
                self._shard_stream.close()
            except OSError:
                pass
        leftovers = [self._shard_path] if self._shard_path is not None else []
        for path in leftovers + [self.index_dir / shard.file for shard in self.shards] + self._deletion_files:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        try:
            remove_unreferenced_search_files(self.index_dir, self.base.files() if self.base else set())
        except OSError:
            pass
        self._writer, self._shard_stream, self._shard_path, self.shards = None, None, None, []
        self._deletion_files = []

    def _published_generation(self) -> int | None:
        try:
            return int(json.loads((self.index_dir / MANIFEST_FILE).read_text(encoding="utf-8"))["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove_leftovers(self) -> None:
        """Without a commit: delete files of crashed runs (and of states before `base`); best effort."""
        try:
            base_files = self.base.files() if self.base else set()
            self._remove_files_outside(base_files)
            self._clear_retired(keep=set())
        except OSError:
            pass  # nothing depends on it: the next write tries again

    def _remove_unreferenced_files(self) -> None:
        """After a commit: the previous generation's files that this one dropped move to retired/ (out of the
        documented globs, still there for readers that opened the previous generation); the rest goes."""
        current = self.manifest.files()
        previous_only = (self.base.files() if self.base else set()) - current
        retired = self.index_dir / RETIRED_DIR
        if previous_only:
            retired.mkdir(exist_ok=True)
        self._clear_retired(keep=set())  # the generation before the previous one: no reader may still open it
        for name in sorted(previous_only):
            try:
                os.replace(self.index_dir / name, retired / name)
            except FileNotFoundError:
                pass
        self._remove_files_outside(current, search_keep=current | previous_only)

    def _clear_retired(self, keep: set[str]) -> None:
        retired = self.index_dir / RETIRED_DIR
        if not retired.is_dir() or retired.is_symlink():
            return
        for path in retired.iterdir():
            if path.name not in keep and is_index_data_file(path.name):
                path.unlink(missing_ok=True)

    def _remove_files_outside(self, keep: set[str], search_keep: set[str] | None = None) -> None:
        for path in self.index_dir.iterdir():
            derived = DERIVED_PATTERN.match(path.name)
            kept = f"{derived.group(1)}.parquet" in keep if derived else path.name in keep
            if is_index_data_file(path.name) and not kept and path.name not in (SEARCH_DIR, RETIRED_DIR):
                path.unlink(missing_ok=True)
        search_keep = keep if search_keep is None else search_keep
        remove_unreferenced_search_files(self.index_dir, {name for name in search_keep if name.endswith(".parquet")})

