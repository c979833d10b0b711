"""The on-disk index format: Parquet shards, deletion sets and a versioned manifest.

The only module that imports pyarrow, so it also reads Parquet *input* files
for documents.py. An index folder holds

    manifest.json                              format version, model, dims, shard list
    shard-GGGGGG-NNNNN.parquet                 at most `shard_rows` rows each, never modified
    shard-GGGGGG-NNNNN.deleted-HHHHHH.npy      rows of that shard no longer live (uint32)
    .lock                                      the writer's lock (see lock.py)

Shard columns: `id` string; `content_hash` string (of the document text, for
incremental runs); with chunking `doc_id` string, `chunk` int32, `char_start`
and `char_end` int64; `text` string (unless text is not stored); `dense`
fixed_size_list<float16>[D]; `sparse` struct{indices: list<uint32>,
values: list<float32>} with indices ascending (the layout Milvus bulk import
reads); optional `colbert` list<fixed_size_list<float16>[Dc]>.

Shards are immutable: an updated or removed document is masked out by its
shard's deletion set, and a shard more than half dead is compacted into a
new one. Every file is written to a temporary name, fsynced and renamed into
place, and the manifest is renamed last: a reader that starts from
manifest.json sees the previous state or the new one, never a mix. Files of
the previous state are kept until the next write, so a reader that has just
read the old manifest can still open its shards.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_NAME = "bge-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})-(\d{5,})\.parquet$")
DELETED_PATTERN = re.compile(r"^shard-(\d{6,})-(\d{5,})\.deleted-(\d{6,})\.npy$")
# Search files derived from a shard (vector_store.py): kept exactly as long as their shard.
DERIVED_PATTERN = re.compile(r"^(shard-\d{6,}-\d{5,})\.(dense|token-ptr|posting-rows|posting-weights|heavy-ids|heavy-columns|stamp)\.npy$")
COMPACT_WHEN_DEAD = 0.5  # a shard with more than this fraction of deleted rows is rewritten
_ROW_GROUP_ROWS = 1024
_ROW_GROUP_BYTES = 64 << 20  # bounds memory when rows are large (ColBERT vectors of long documents)
CHUNK_COLUMNS = ("doc_id", "chunk", "char_start", "char_end")
# How every shard is written, by IndexWriter here and by the Ray engine's Parquet sink (ray_engine.py).
# Float vectors neither dictionary-encode nor have useful min/max statistics.
SHARD_WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": ["id", "text", "doc_id"],
                       "write_statistics": ["id"], "write_page_checksum": True}
SHARD_ROW_GROUP_ROWS = _ROW_GROUP_ROWS


class IndexFormatError(Exception):
    """A folder that is not an index, or an index this version cannot read, or a damaged file."""


class UnreadableParquet(Exception):
    """An input Parquet file that cannot be read."""


def fault_point(name: str) -> None:
    """Crash-test hook: die by SIGKILL here when BGE_INDEX_FAULT_AT names this point.

    The crash-safety tests use it to kill a real run at exact places (mid
    shard, after a shard, before and after the manifest switch).
    """
    if os.environ.get("BGE_INDEX_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    bytes: int
    sha256: str
    deleted_file: str | None = None
    deleted_rows: int = 0
    deleted_sha256: str | None = None

    @property
    def live_rows(self) -> int:
        return self.rows - self.deleted_rows


@dataclass
class Manifest:
    """Everything a reader needs to know before opening a shard."""

    model: dict
    dense_dim: int
    colbert_dim: int | None
    vocab_size: int
    store_text: bool
    chunking: dict | None = None  # {"tokens": N, "overlap": M} when documents are split into passages
    documents: int = 0  # live rows (passages, when chunked)
    shards: list[ShardInfo] = field(default_factory=list)
    generation: int = 0
    state: str = "complete"  # "partial" after an interrupted run: rerun to finish
    created: str = ""
    updated: str = ""
    tool_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "created": self.created,
            "updated": self.updated,
            "generation": self.generation,
            "state": self.state,
            "tool_version": self.tool_version,
            "model": self.model,
            "vectors": {
                "dense": {"dim": self.dense_dim, "dtype": "float16", "normalized": True},
                "sparse": {"vocab_size": self.vocab_size, "indices": "uint32", "values": "float32"},
                "colbert": None if self.colbert_dim is None else {"dim": self.colbert_dim, "dtype": "float16"},
            },
            "chunking": self.chunking,
            "store_text": self.store_text,
            "documents": self.documents,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        vectors = data["vectors"]
        colbert = vectors.get("colbert")
        return cls(
            model=data["model"],
            dense_dim=int(vectors["dense"]["dim"]),
            colbert_dim=None if colbert is None else int(colbert["dim"]),
            vocab_size=int(vectors["sparse"]["vocab_size"]),
            store_text=bool(data["store_text"]),
            chunking=data.get("chunking"),
            documents=int(data["documents"]),
            shards=[ShardInfo(**s) for s in data["shards"]],
            generation=int(data.get("generation", 0)),
            state=data.get("state", "complete"),
            created=data.get("created", ""),
            updated=data.get("updated", ""),
            tool_version=data.get("tool_version", ""),
            format_version=int(data["format_version"]),
        )

    @property
    def has_colbert(self) -> bool:
        return self.colbert_dim is not None

    def files(self) -> set[str]:
        """Every file this manifest refers to."""
        names = {s.file for s in self.shards}
        return names | {s.deleted_file for s in self.shards if s.deleted_file}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Manifest I/O


def is_index(index_dir: Path) -> bool:
    return (index_dir / MANIFEST_FILE).is_file()


def read_manifest(index_dir: Path) -> Manifest:
    path = index_dir / MANIFEST_FILE
    if not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir}: no such index folder")
    if not path.is_file():
        raise IndexFormatError(f"{index_dir}: not a bge-index index (no {MANIFEST_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise IndexFormatError(f"{path}: unreadable manifest ({error})") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path}: not a bge-index manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: index format version {version}, this bge-index reads version {FORMAT_VERSION}; "
            "rebuild the index with this version or use a matching bge-index")
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as error:
        raise IndexFormatError(f"{path}: damaged manifest (missing or bad {error})") from error


def _write_atomically(path: Path, write) -> None:
    """Write through `write(stream)` to a temporary file, fsync it, rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(text: str) -> str:
    """What incremental runs compare: 128 bits of BLAKE2b over the document text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------
# Writing


def shard_file_name(generation: int, number: int) -> str:
    return f"shard-{generation:06d}-{number:05d}.parquet"


def shard_schema(dense_dim: int, colbert_dim: int | None, store_text: bool, chunked: bool) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("content_hash", pa.string(), nullable=False)]
    if chunked:
        fields += [pa.field("doc_id", pa.string(), nullable=False), pa.field("chunk", pa.int32(), nullable=False),
                   pa.field("char_start", pa.int64(), nullable=False), pa.field("char_end", pa.int64(), nullable=False)]
    if store_text:
        fields.append(pa.field("text", pa.string()))
    fields.append(pa.field("dense", pa.list_(pa.float16(), dense_dim), nullable=False))
    fields.append(pa.field("sparse", pa.struct([
        pa.field("indices", pa.list_(pa.uint32()), nullable=False),
        pa.field("values", pa.list_(pa.float32()), nullable=False),
    ]), nullable=False))
    if colbert_dim is not None:
        fields.append(pa.field("colbert", pa.list_(pa.list_(pa.float16(), colbert_dim))))
    return pa.schema(fields, metadata={"bge_index_format_version": str(FORMAT_VERSION)})


def manifest_schema(manifest: Manifest) -> pa.Schema:
    return shard_schema(manifest.dense_dim, manifest.colbert_dim, manifest.store_text, manifest.chunking is not None)


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
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


@dataclass(frozen=True, slots=True)  # one per row written in a run: kept small
class RowLocation:
    """Where a row lives: shard file name and row number inside it."""

    file: str
    row: int


class IndexWriter:
    """Builds the next generation of an index on top of `base` (the current manifest, if any).

    New rows go to new shards; rows of existing or new shards are retired
    with `delete`; `commit` writes deletion sets, compacts mostly-dead
    shards, publishes the manifest and then removes files that neither the
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
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_path: Path | None = None
        self._shard_row_count = 0
        self._publishing = False
        index_dir.mkdir(parents=True, exist_ok=True)

    def shard_name(self, number: int) -> str:
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
            elif self._pending_rows >= _ROW_GROUP_ROWS or self._pending_bytes >= _ROW_GROUP_BYTES:
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
        with open(staged, "rb+") as stream:
            os.fsync(stream.fileno())
        final = self.index_dir / self.shard_name(len(self.shards))
        os.replace(staged, final)
        _fsync_dir(self.index_dir)
        info = ShardInfo(final.name, rows, final.stat().st_size, file_sha256(final))
        self.shards.append(info)
        fault_point("shard-written")
        return info

    def delete(self, location: RowLocation) -> None:
        """Retire a row of an existing shard or of one written by this writer."""
        self._deletions.setdefault(location.file, set()).add(location.row)

    def _flush_row_group(self) -> None:
        if not self._pending_rows:
            return
        if self._writer is None:
            self._shard_path = self.index_dir / f".{self.shard_name(len(self.shards))}.tmp"
            self._writer = pq.ParquetWriter(self._shard_path, self.schema, **SHARD_WRITE_OPTIONS)
        group = pa.concat_tables(self._pending)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._shard_row_count += group.num_rows
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        fault_point("row-group-written")

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._shard_path is not None
        with open(self._shard_path, "rb+") as stream:
            os.fsync(stream.fileno())
        final = self.index_dir / self.shard_name(len(self.shards))
        os.replace(self._shard_path, final)
        self.shards.append(ShardInfo(final.name, self._shard_row_count, final.stat().st_size, file_sha256(final)))
        self._writer, self._shard_path, self._shard_row_count = None, None, 0
        fault_point("shard-written")

    # -- publishing ---------------------------------------------------------

    def commit(self, state: str = "complete") -> Manifest:
        """Finish shards, apply deletions, publish the manifest, remove files nobody refers to."""
        self._flush_row_group()
        self._close_shard()
        kept = self._apply_deletions(self.carried) + self._apply_deletions(list(self.shards))
        # Compaction above may have opened new shards; they are complete and live.
        self._flush_row_group()
        self._close_shard()
        written = {s.file for s in kept}
        kept += [s for s in self.shards if s.file not in written and s.file not in self._deletions]
        now = utc_now()
        self.manifest.shards = kept
        self.manifest.documents = sum(s.live_rows for s in kept)
        self.manifest.state = state
        self.manifest.created = (self.base.created if self.base else "") or now
        self.manifest.updated = now
        fault_point("before-manifest")
        payload = (json.dumps(self.manifest.to_json(), indent=2, ensure_ascii=False) + "\n").encode()
        self._publishing = True  # from here on, abort() first checks whether the switch happened
        _write_atomically(self.index_dir / MANIFEST_FILE, lambda stream: stream.write(payload))
        fault_point("after-manifest")
        self._remove_unreferenced_files()
        return self.manifest

    def _apply_deletions(self, shards: list[ShardInfo]) -> list[ShardInfo]:
        """Shards with their deletion sets brought up to date; dead shards dropped, mostly-dead ones compacted."""
        kept = []
        for shard in shards:
            new = self._deletions.get(shard.file)
            if not new:
                kept.append(shard)
                continue
            deleted = new | set(read_deleted_rows(self.index_dir, shard).tolist())
            if len(deleted) >= shard.rows:
                continue
            if len(deleted) > COMPACT_WHEN_DEAD * shard.rows:
                self._compact(shard, deleted)
                continue
            kept.append(self._write_deletion_set(shard, deleted))
        return kept

    def _compact(self, shard: ShardInfo, deleted: set[int]) -> None:
        """Copy a shard's live rows into new shards, one row group at a time (bounded memory)."""
        mask = np.ones(shard.rows, dtype=bool)
        mask[np.fromiter(deleted, dtype=np.int64)] = False
        parquet = _open_shard(self.index_dir, shard)
        start = 0
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            keep = mask[start:start + table.num_rows]
            start += table.num_rows
            if keep.any():
                self._write_table(table.filter(pa.array(keep)).cast(self.schema))

    def _write_deletion_set(self, shard: ShardInfo, deleted: set[int]) -> ShardInfo:
        stem = shard.file.removesuffix(".parquet")
        path = self.index_dir / f"{stem}.deleted-{self.manifest.generation:06d}.npy"
        rows = np.array(sorted(deleted), dtype=np.uint32)
        _write_atomically(path, lambda stream: np.save(stream, rows, allow_pickle=False))
        return replace(shard, deleted_file=path.name, deleted_rows=len(rows), deleted_sha256=file_sha256(path))

    def abort(self) -> None:
        """Remove what this writer wrote, unless its manifest is already the published one."""
        if self._publishing and self._published_generation() == self.manifest.generation:
            return
        if self._writer is not None:
            self._writer.close()
        if self._shard_path is not None:
            self._shard_path.unlink(missing_ok=True)
        for shard in self.shards:
            (self.index_dir / shard.file).unlink(missing_ok=True)
        self._writer, self._shard_path, self.shards = None, None, []

    def _published_generation(self) -> int | None:
        try:
            return int(json.loads((self.index_dir / MANIFEST_FILE).read_text(encoding="utf-8"))["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove_leftovers(self) -> None:
        """Without a commit: delete files of crashed runs (and of states before `base`)."""
        self._remove_files_outside(self.base.files() if self.base else set())

    def _remove_unreferenced_files(self) -> None:
        self._remove_files_outside(self.manifest.files() | (self.base.files() if self.base else set()))

    def _remove_files_outside(self, keep: set[str]) -> None:
        for path in self.index_dir.iterdir():
            derived = DERIVED_PATTERN.match(path.name)
            kept = f"{derived.group(1)}.parquet" in keep if derived else path.name in keep
            if is_index_data_file(path.name) and not kept:
                path.unlink(missing_ok=True)


def is_index_data_file(name: str) -> bool:
    """Shards, deletion sets, their search files and temporary files: what writers and readers leave here."""
    return bool(SHARD_PATTERN.match(name) or DELETED_PATTERN.match(name) or DERIVED_PATTERN.match(name)
                or (name.startswith(".") and name.endswith(".tmp")))


# ---------------------------------------------------------------------------
# Reading an index


def read_deleted_rows(index_dir: Path, shard: ShardInfo) -> np.ndarray:
    """The sorted deleted row numbers of a shard (empty when none)."""
    if not shard.deleted_file:
        return np.zeros(0, dtype=np.uint32)
    path = index_dir / shard.deleted_file
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise IndexFormatError(f"{path}: damaged or missing deletion set ({error})") from error
    if rows.ndim != 1 or len(rows) != shard.deleted_rows or (len(rows) and int(rows.max()) >= shard.rows):
        raise IndexFormatError(f"{path}: damaged deletion set (rows do not match the manifest's)")
    return rows


def live_mask(index_dir: Path, shard: ShardInfo) -> np.ndarray:
    """[rows] bool: True for rows that are not deleted."""
    mask = np.ones(shard.rows, dtype=bool)
    mask[read_deleted_rows(index_dir, shard)] = False
    return mask


def _open_shard(index_dir: Path, shard: ShardInfo) -> pq.ParquetFile:
    path = index_dir / shard.file
    try:
        size = path.stat().st_size
    except OSError as error:
        raise IndexFormatError(f"{path}: damaged or missing shard ({error.strerror})") from error
    if size != shard.bytes:
        raise IndexFormatError(f"{path}: damaged shard ({size} bytes, manifest says {shard.bytes})")
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as error:
        raise IndexFormatError(f"{path}: damaged or missing shard ({error})") from error
    if parquet.metadata.num_rows != shard.rows:
        raise IndexFormatError(f"{path}: damaged shard ({parquet.metadata.num_rows} rows, manifest says {shard.rows})")
    return parquet


def _read_columns(index_dir: Path, shard: ShardInfo, columns: list[str]) -> pa.Table:
    try:
        return _open_shard(index_dir, shard).read(columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error


def iter_live_keys(index_dir: Path, manifest: Manifest) -> Iterator[tuple[str, str, RowLocation]]:
    """(document id, content hash, location) of every live row, shard by shard."""
    id_column = "doc_id" if manifest.chunking else "id"
    for shard in manifest.shards:
        table = _read_columns(index_dir, shard, [id_column, "content_hash"])
        mask = live_mask(index_dir, shard)
        ids = table.column(id_column).to_pylist()
        hashes = table.column("content_hash").to_pylist()
        for row in np.flatnonzero(mask).tolist():
            yield ids[row], hashes[row], RowLocation(shard.file, row)


@dataclass
class IndexVectors:
    """All live dense and sparse vectors of an index, row-aligned with `ids`.

    dense:          [N, D] float16
    sparse_indptr:  [N + 1] int64, CSR row pointers into the two arrays below
    sparse_indices: [nnz] uint32 token ids (ascending within a row)
    sparse_values:  [nnz] float32 weights
    row_shard:      [N] int32 shard number (in manifest order) of each row
    row_local:      [N] int64 row number inside that shard
    doc_ids:        [N] document id of each row when the index is chunked, else None
    """

    ids: np.ndarray
    dense: np.ndarray
    sparse_indptr: np.ndarray
    sparse_indices: np.ndarray
    sparse_values: np.ndarray
    row_shard: np.ndarray
    row_local: np.ndarray
    doc_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def sparse_row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.sparse_indptr[row], self.sparse_indptr[row + 1]
        return self.sparse_indices[start:end], self.sparse_values[start:end]


def load_vectors(index_dir: Path, manifest: Manifest) -> IndexVectors:
    """Read ids, dense and sparse columns of every live row into flat arrays."""
    chunked = manifest.chunking is not None
    columns = ["id", "dense", "sparse"] + (["doc_id"] if chunked else [])
    ids, doc_ids, dense, indptr_parts, indices, values, row_shard, row_local = [], [], [], [], [], [], [], []
    nnz = 0
    for number, shard in enumerate(manifest.shards):
        table = _read_columns(index_dir, shard, columns)
        mask = live_mask(index_dir, shard)
        if not mask.all():
            table = table.filter(pa.array(mask))
        ids.append(np.asarray(table.column("id").to_pylist(), dtype=object))
        if chunked:
            doc_ids.append(np.asarray(table.column("doc_id").to_pylist(), dtype=object))
        dense.append(table.column("dense").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                     .reshape(-1, manifest.dense_dim))
        sparse = table.column("sparse").combine_chunks()
        for name, out in (("indices", indices), ("values", values)):
            out.append(sparse.field(name).flatten().to_numpy(zero_copy_only=False))
        offsets = sparse.field("indices").offsets.to_numpy().astype(np.int64)
        indptr_parts.append(offsets[1:] - offsets[0] + nnz)
        nnz += int(offsets[-1] - offsets[0])
        row_shard.append(np.full(table.num_rows, number, dtype=np.int32))
        row_local.append(np.flatnonzero(mask).astype(np.int64))

    def joined(parts, empty):
        return np.concatenate(parts) if parts else empty

    return IndexVectors(
        ids=joined(ids, np.zeros(0, dtype=object)),
        dense=joined(dense, np.zeros((0, manifest.dense_dim), dtype=np.float16)),
        sparse_indptr=np.concatenate([np.zeros(1, dtype=np.int64), *indptr_parts]),
        sparse_indices=joined(indices, np.zeros(0, dtype=np.uint32)),
        sparse_values=joined(values, np.zeros(0, dtype=np.float32)),
        row_shard=joined(row_shard, np.zeros(0, dtype=np.int32)),
        row_local=joined(row_local, np.zeros(0, dtype=np.int64)),
        doc_ids=joined(doc_ids, np.zeros(0, dtype=object)) if chunked else None,
    )


def read_shard_column(index_dir: Path, shard: ShardInfo, column: str) -> list:
    """One column of one shard (deleted rows included), in row order."""
    return _read_columns(index_dir, shard, [column]).column(column).to_pylist()


@dataclass
class LiveRows:
    """A batch of live rows of one shard, for export.

    dense:          [B, D] float16, as stored
    sparse_indptr:  [B + 1] int64 CSR row pointers into sparse_indices / sparse_values
    sparse_indices: [nnz] uint32 token ids, ascending within a row
    sparse_values:  [nnz] float32 weights
    texts:          B texts, or None when not asked for (or not stored)
    """

    ids: list[str]
    dense: np.ndarray
    sparse_indptr: np.ndarray
    sparse_indices: np.ndarray
    sparse_values: np.ndarray
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def iter_live_rows(index_dir: Path, manifest: Manifest, batch_rows: int = 1000,
                   with_text: bool = False) -> Iterator[LiveRows]:
    """Every live row, shard by shard, `batch_rows` at a time: memory stays at one batch, whatever the index size."""
    columns = ["id", "dense", "sparse"] + (["text"] if with_text and manifest.store_text else [])
    for shard in manifest.shards:
        mask = live_mask(index_dir, shard)
        start = 0
        try:
            for batch in _open_shard(index_dir, shard).iter_batches(batch_size=batch_rows, columns=columns):
                keep = mask[start:start + batch.num_rows]
                start += batch.num_rows
                if not keep.any():
                    continue
                if not keep.all():
                    batch = batch.filter(pa.array(keep))
                # flatten() (not field()) honours the offset of a sliced struct array.
                indices, values = batch.column("sparse").flatten()
                offsets = indices.offsets.to_numpy().astype(np.int64)
                yield LiveRows(
                    ids=batch.column("id").to_pylist(),
                    dense=batch.column("dense").flatten().to_numpy(zero_copy_only=False)
                    .reshape(-1, manifest.dense_dim).astype(np.float16, copy=False),
                    sparse_indptr=offsets - offsets[0],
                    sparse_indices=indices.flatten().to_numpy(zero_copy_only=False).astype(np.uint32, copy=False),
                    sparse_values=values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False),
                    texts=batch.column("text").to_pylist() if "text" in columns else None,
                )
        except (OSError, pa.ArrowException) as error:
            raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error


def read_column(index_dir: Path, manifest: Manifest, column: str) -> np.ndarray:
    """One column of every row (deleted rows included), in row order, as an object array."""
    parts = [np.asarray(_read_columns(index_dir, shard, [column]).column(column).to_pylist(), dtype=object)
             for shard in manifest.shards]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=object)


def read_shard_vectors(index_dir: Path, manifest: Manifest, shard: ShardInfo
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All rows of one shard, deleted ones included: dense [rows, D] float16 and sparse CSR (indptr, ids, weights)."""
    table = _read_columns(index_dir, shard, ["dense", "sparse"])
    return (_dense_rows(table.column("dense").combine_chunks(), manifest.dense_dim),
            *_sparse_csr(table.column("sparse").combine_chunks()))


def iter_shard_dense(index_dir: Path, manifest: Manifest, shard: ShardInfo) -> Iterator[np.ndarray]:
    """[group rows, D] float16 dense vectors of one shard, a row group at a time (deleted rows included)."""
    for group in _iter_row_groups(index_dir, shard, "dense"):
        yield _dense_rows(group.column("dense").combine_chunks(), manifest.dense_dim)


def iter_shard_sparse(index_dir: Path, shard: ShardInfo) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sparse vectors of one shard a row group at a time, as CSR (indptr from 0, ids uint32, weights float32)."""
    for group in _iter_row_groups(index_dir, shard, "sparse"):
        yield _sparse_csr(group.column("sparse").combine_chunks())


def _iter_row_groups(index_dir: Path, shard: ShardInfo, column: str) -> Iterator[pa.Table]:
    parquet = _open_shard(index_dir, shard)
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=[column])
        except (OSError, pa.ArrowException) as error:
            raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error
        yield table


def _dense_rows(dense: pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list float16 column as a [rows, dim] array."""
    return dense.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float16, copy=False)


def _sparse_csr(sparse: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse column (struct of index and value lists) as CSR: indptr from 0, ids uint32, weights float32."""
    offsets = sparse.field("indices").offsets.to_numpy().astype(np.int64)
    indices = sparse.field("indices").flatten().to_numpy(zero_copy_only=False)
    values = sparse.field("values").flatten().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], indices.astype(np.uint32, copy=False), values.astype(np.float32, copy=False)


def read_rows(index_dir: Path, manifest: Manifest, locations: Sequence[tuple[int, int]], column: str) -> list:
    """Values of one column at (shard number, row in shard) locations, reading only the row groups that hold them."""
    wanted: dict[tuple[int, int], object] = {}
    by_shard: dict[int, list[int]] = {}
    for shard_number, local in locations:
        by_shard.setdefault(int(shard_number), []).append(int(local))
    for shard_number, local_rows in by_shard.items():
        shard = manifest.shards[shard_number]
        parquet = _open_shard(index_dir, shard)
        group_sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        group_starts = np.concatenate([[0], np.cumsum(group_sizes)])
        by_group: dict[int, list[int]] = {}
        for local in local_rows:
            by_group.setdefault(int(np.searchsorted(group_starts, local, side="right") - 1), []).append(local)
        for group, group_rows in by_group.items():
            try:
                values = parquet.read_row_group(group, columns=[column]).column(column)
            except (OSError, pa.ArrowException) as error:
                raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error
            for local in group_rows:
                value = values[local - int(group_starts[group])]
                wanted[(shard_number, local)] = _colbert_matrix(value) if column == "colbert" else value.as_py()
    return [wanted[(int(s), int(r))] for s, r in locations]


def _colbert_matrix(value: pa.Scalar) -> np.ndarray:
    """One row's ColBERT vectors as [n_tokens - 1, Dc] float32."""
    tokens = value.values  # FixedSizeListArray
    dim = tokens.type.list_size
    return tokens.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def index_size_bytes(index_dir: Path, manifest: Manifest) -> int:
    deletion_sets = sum((index_dir / s.deleted_file).stat().st_size for s in manifest.shards if s.deleted_file)
    return sum(s.bytes for s in manifest.shards) + deletion_sets + (index_dir / MANIFEST_FILE).stat().st_size


# ---------------------------------------------------------------------------
# Verification


def verify_index(index_dir: Path) -> list[str]:
    """Check every file against the manifest; returns one line per problem (empty: all good).

    Checks: each shard's size and SHA-256, that Parquet can read every page
    (page checksums included), row counts, the schema, each deletion set's
    checksum and range, the manifest's live-row total, and duplicate live ids.
    """
    manifest = read_manifest(index_dir)
    problems: list[str] = []
    expected_schema = manifest_schema(manifest)
    seen_ids: dict[str, str] = {}
    live_total = 0
    for shard in manifest.shards:
        path = index_dir / shard.file
        problem = _verify_file(path, shard.bytes, shard.sha256, "shard")
        if problem:
            problems.append(problem)
            continue
        try:
            table = _read_columns(index_dir, shard, expected_schema.names)
        except IndexFormatError as error:
            problems.append(str(error))
            continue
        if not table.schema.equals(expected_schema, check_metadata=False):
            problems.append(f"{path}: damaged shard (schema differs from the manifest's)")
            continue
        if shard.deleted_file:
            problem = _verify_file(index_dir / shard.deleted_file, None, shard.deleted_sha256, "deletion set")
            if problem:
                problems.append(problem)
                continue
        try:
            mask = live_mask(index_dir, shard)
        except IndexFormatError as error:
            problems.append(str(error))
            continue
        live_total += int(mask.sum())
        ids = table.column("id").to_pylist()
        for row in np.flatnonzero(mask).tolist():
            if ids[row] in seen_ids:
                problems.append(f"{path}: duplicate id {ids[row]!r} (also live in {seen_ids[ids[row]]})")
            seen_ids[ids[row]] = shard.file
    if live_total != manifest.documents and not problems:
        problems.append(f"{index_dir / MANIFEST_FILE}: says {manifest.documents} live rows, shards hold {live_total}")
    return problems


def _verify_file(path: Path, size: int | None, sha256: str | None, kind: str) -> str | None:
    if not path.is_file():
        return f"{path}: missing {kind}"
    if size is not None and path.stat().st_size != size:
        return f"{path}: damaged {kind} ({path.stat().st_size} bytes, manifest says {size})"
    if sha256 is not None and file_sha256(path) != sha256:
        return f"{path}: damaged {kind} (SHA-256 differs from the manifest's)"
    return None


# ---------------------------------------------------------------------------
# Parquet inputs (for documents.py)


def _open_input_parquet(path: Path) -> pq.ParquetFile:
    """Parquet needs random access, so a `.parquet.gz` is first unpacked to a temporary file."""
    if path.suffix.lower() != ".gz":
        return pq.ParquetFile(path)
    unpacked = tempfile.TemporaryFile()
    with gzip.open(path, "rb") as packed:
        shutil.copyfileobj(packed, unpacked)
    unpacked.seek(0)
    return pq.ParquetFile(unpacked)


def parquet_column_names(path: Path) -> list[str]:
    try:
        return list(_open_input_parquet(path).schema_arrow.names)
    except (OSError, EOFError, zlib.error, pa.ArrowException) as error:
        raise UnreadableParquet(f"not a readable Parquet file ({error})") from error


def iter_parquet_records(path: Path, columns: list[str], batch_rows: int = 1024) -> Iterator[dict]:
    """Rows of a Parquet file as dicts, one record batch in memory at a time."""
    try:
        parquet = _open_input_parquet(path)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            yield from batch.to_pylist()
    except (OSError, EOFError, zlib.error, pa.ArrowException) as error:
        raise UnreadableParquet(f"not a readable Parquet file ({error})") from error


def write_parquet_records(path: Path, records: list[dict]) -> None:
    """Write plain records as a Parquet file (used to make sample and test inputs)."""
    pq.write_table(pa.Table.from_pylist(records), path)
