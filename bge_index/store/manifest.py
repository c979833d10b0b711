"""The on-disk format's definition: file names, the versioned manifest, the shard schema.

An index folder holds

    manifest.json                              format version, model, dims, shard list
    shard-GGGGGG-NNNNN.parquet                 at most `shard_rows` rows each, never modified
    shard-GGGGGG-NNNNN.deleted-HHHHHH.npy      rows of that shard no longer live (uint32)
    search/shard-GGGGGG-NNNNN.<kind>.npy       search files derived from that shard (vector_store.py),
                                               named in the manifest with their size and CRC-32
    .lock                                      the writer's lock (see lock.py)

Shard columns (`shard_schema`): `id` string; `content_hash` string (of the
document text, for incremental runs); with chunking `doc_id` string, `chunk`
int32, `char_start` and `char_end` int64; `text` string (unless text is not
stored); `dense` fixed_size_list<float16>[D]; `sparse` struct{indices:
list<uint32>, values: list<float32>} with indices ascending (the layout Milvus
bulk import reads); optional `colbert` list<fixed_size_list<float16>[Dc]>;
then (shard layout 2) `source` string and `source_line` int64: where the row came from, and `metadata`
map<string, string>: the record's other fields.

A reader starts from manifest.json: it names every live file with its size
and SHA-256, so the manifest alone says what the index is:

    >>> m = Manifest(model={"name": "BAAI/bge-m3"}, dense_dim=1024, colbert_dim=None, vocab_size=250002,
    ...              store_text=True, generation=1)
    >>> Manifest.from_json(m.to_json()) == m
    True

Writing is shard_writer.py's, reading and verifying shard_reader.py's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from bge_index.errors import IndexFormatError
from bge_index.store.names import (DELETED_PATTERN, DELETES_PATTERN, FORMAT_NAME, MANIFEST_FILE, SEARCH_FILE_PATTERN,
                                   SHARD_PATTERN)

FORMAT_VERSION = 2  # 2: search files in search/, listed per shard in the manifest (ShardInfo.search)
READABLE_FORMAT_VERSIONS = (1, 2)  # a version 1 index is read (search files built in memory), written as 2
SHARD_FORMAT_VERSION = 2  # the Parquet shards' own layout, in their schema metadata: 2 adds the source columns
CHUNK_COLUMNS = ("doc_id", "chunk", "char_start", "char_end")
# How every shard is written, by IndexWriter (shard_writer.py) and by the Ray engine's Parquet sink (ray_engine.py).
# Float vectors neither dictionary-encode nor have useful min/max statistics.
SHARD_WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": ["id", "text", "doc_id"],
                       "write_statistics": ["id"], "write_page_checksum": True}
SHARD_ROW_GROUP_ROWS = 1024  # rows per Parquet row group: what a reader decodes at a time


@dataclass(frozen=True)
class ShardInfo:
    """A shard as the manifest lists it: file, rows, bytes, SHA-256, and its deletion set (if any)."""

    file: str
    rows: int
    bytes: int
    sha256: str
    deleted_file: str | None = None
    deleted_rows: int = 0
    deleted_sha256: str | None = None
    # Search files (format version 2): one {"kind", "file" (a name in search/), "bytes", "crc32"} per kind;
    # None when the shard has none yet (a version 1 index): readers then build its vectors in memory.
    search: list | None = None
    # The shard's mtime when its search files were built: a reader finding another one (the file was touched,
    # or copied without its times) checks the shard's SHA-256 once per process before searching it.
    mtime_ns: int | None = None

    @property
    def live_rows(self) -> int:
        """Rows not deleted."""
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
    # The generation's deletes file for other tools: {"file", "rows", "bytes", "sha256"}; None before it existed
    deletes: dict | None = None

    def to_json(self) -> dict:
        """The manifest.json document: format name and version, model, vector types, chunking, counts and shard list."""
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
            "deletes": self.deletes,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        """The Manifest of a manifest.json document; KeyError, TypeError or ValueError when it is damaged."""
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
            deletes=data.get("deletes"),
        )

    @property
    def has_colbert(self) -> bool:
        """Whether the shards hold ColBERT vectors."""
        return self.colbert_dim is not None

    def files(self) -> set[str]:
        """Every file this manifest refers to."""
        names = {s.file for s in self.shards}
        names |= {s.deleted_file for s in self.shards if s.deleted_file}
        if self.deletes and isinstance(self.deletes.get("file"), str):
            names.add(self.deletes["file"])
        return names


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (2024-05-01T12:00:00+00:00)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Manifest I/O


def read_manifest(index_dir: Path) -> Manifest:
    """The manifest of the index in `index_dir`; IndexFormatError if missing, damaged or of another format version.

    Damaged includes a manifest.json that is a symlink and one that names any file but a plain name of its kind
    (see `_bad_file_name`): nothing outside the index folder is ever read or written because of a manifest.
    """
    path = index_dir / MANIFEST_FILE
    if not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir}: no such index folder")
    if not path.is_file():
        raise IndexFormatError(f"{index_dir}: not a bge-index index (no {MANIFEST_FILE})")
    try:
        # Not through a symlink: nothing outside the index folder is read.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            data = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise IndexFormatError(f"{path}: unreadable manifest ({error})") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path}: not a bge-index manifest")
    version = data.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise IndexFormatError(
            f"{path}: index format version {version}, this bge-index reads versions 1 to {FORMAT_VERSION}; "
            "rebuild the index with this version or use a matching bge-index")
    try:
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as error:
        raise IndexFormatError(f"{path}: damaged manifest (missing or bad {error})") from error
    if (bad := _bad_file_name(manifest)) is not None:
        raise IndexFormatError(f"{path}: damaged manifest (names the file {bad}, not a file of this index)")
    return manifest


def _bad_file_name(manifest: Manifest) -> str | None:
    """The first file name in `manifest` that is not a plain name of its kind (no `/`, no `..`), or None.

    The index folder is a boundary: a manifest naming `../x.parquet` or `/etc/passwd` must not make a reader
    (or a writer's clean-up) touch anything outside it. Search files are plain names in search/ (format 2).
    """
    if manifest.deletes is not None:
        name = manifest.deletes.get("file") if isinstance(manifest.deletes, dict) else manifest.deletes
        if not isinstance(name, str) or not DELETES_PATTERN.match(name):
            return repr(name)
    for shard in manifest.shards:
        if not isinstance(shard.file, str) or not SHARD_PATTERN.match(shard.file):
            return repr(shard.file)
        if shard.deleted_file is not None:
            deleted = DELETED_PATTERN.match(shard.deleted_file) if isinstance(shard.deleted_file, str) else None
            if deleted is None or f"shard-{deleted.group(1)}-{deleted.group(2)}.parquet" != shard.file:
                return repr(shard.deleted_file)
        search = getattr(shard, "search", None)
        if search is None:
            continue
        if not isinstance(search, list):
            return repr(search)
        for record in search:
            name = record.get("file") if isinstance(record, dict) else record
            if not isinstance(name, str) or not SEARCH_FILE_PATTERN.match(name):
                return repr(name)
    return None


def shard_schema(dense_dim: int, colbert_dim: int | None, store_text: bool, chunked: bool,
                 sourced: bool = True) -> pa.Schema:
    """The Arrow schema of a shard with these settings (see the module docstring; format version in metadata)."""
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
    if sourced:
        fields += SOURCE_FIELDS
    return pa.schema(fields, metadata={"bge_index_format_version": str(SHARD_FORMAT_VERSION if sourced else 1)})


# Shard layout 2 adds, last, where each row came from: the input file's real path (`<stdin>` for standard input)
# and its line (JSONL, CSV/TSV) or row (Parquet) number, null for a whole-file document. A run holds back the
# removal of an id only when its own source was not read whole. Layout 1 shards (without them) stay readable:
# their rows' sources are unknown, and any input not read whole holds their removal back, as before.
SOURCE_FIELDS = [pa.field("source", pa.string()), pa.field("source_line", pa.int64()),
                 # the record's other fields (a file's path, size, mtime) as strings: DuckDB `metadata['lang']`,
                 # Polars `pl.col("metadata")`
                 pa.field("metadata", pa.map_(pa.string(), pa.string()))]
SOURCE_COLUMNS = tuple(f.name for f in SOURCE_FIELDS)
VECTOR_COLUMNS = ("dense", "sparse", "colbert")


def legacy_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` as a layout 1 shard has it (no source columns)."""
    names = [n for n in schema.names if n not in SOURCE_COLUMNS]
    return pa.schema([schema.field(n) for n in names], metadata={"bge_index_format_version": "1"})


def manifest_schema(manifest: Manifest) -> pa.Schema:
    """The shard schema of an index with this manifest's settings."""
    return shard_schema(manifest.dense_dim, manifest.colbert_dim, manifest.store_text, manifest.chunking is not None)
