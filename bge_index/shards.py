"""The on-disk index format: Parquet shards plus a versioned manifest.

The only module that imports pyarrow, so it also reads Parquet *input* files
for documents.py. An index folder holds

    manifest.json                      format version, model, dims, shard list
    shard-GGGGGG-NNNNN.parquet         at most `shard_rows` rows each

Shard columns: `id` string; `text` string (unless text is not stored);
`dense` fixed_size_list<float16>[D]; `sparse` struct{indices: list<uint32>,
values: list<float32>} with indices ascending (the layout Milvus bulk import
reads); optional `colbert` list<fixed_size_list<float16>[Dc]>.

Every file is written to a temporary name and renamed into place, and the
manifest is renamed last: a reader that starts from manifest.json only ever
sees a complete index, the old one or the new one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_NAME = "bge-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{6})-(\d{5})\.parquet$")
_ROW_GROUP_ROWS = 1024
_ROW_GROUP_BYTES = 64 << 20  # bounds memory when rows are large (ColBERT vectors of long documents)


class IndexFormatError(Exception):
    """A folder that is not an index, or an index this version cannot read, or a damaged shard."""


class UnreadableParquet(Exception):
    """An input Parquet file that cannot be read."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Everything a reader needs to know before opening a shard."""

    model: dict
    dense_dim: int
    colbert_dim: int | None
    vocab_size: int
    store_text: bool
    documents: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    generation: int = 0
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
            "tool_version": self.tool_version,
            "model": self.model,
            "vectors": {
                "dense": {"dim": self.dense_dim, "dtype": "float16", "normalized": True},
                "sparse": {"vocab_size": self.vocab_size, "indices": "uint32", "values": "float32"},
                "colbert": None if self.colbert_dim is None else {"dim": self.colbert_dim, "dtype": "float16"},
            },
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
            documents=int(data["documents"]),
            shards=[ShardInfo(**s) for s in data["shards"]],
            generation=int(data.get("generation", 0)),
            created=data.get("created", ""),
            updated=data.get("updated", ""),
            tool_version=data.get("tool_version", ""),
            format_version=int(data["format_version"]),
        )

    @property
    def has_colbert(self) -> bool:
        return self.colbert_dim is not None


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


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
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


# ---------------------------------------------------------------------------
# Writing


def shard_schema(dense_dim: int, colbert_dim: int | None, store_text: bool) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False)]
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


@dataclass
class RowBatch:
    """Rows ready to store. dense: [B, D] float; sparse: B (ids, weights); colbert: B [n, Dc] or None."""

    ids: list[str]
    texts: list[str] | None
    dense: np.ndarray
    sparse: list[tuple[np.ndarray, np.ndarray]]
    colbert: list[np.ndarray] | None = None

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
    columns: dict[str, pa.Array] = {"id": pa.array(rows.ids, type=pa.string())}
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


class IndexWriter:
    """Writes a new generation of shards into `index_dir`; `commit` publishes it.

    Until `commit` renames the new manifest into place, readers keep seeing
    the previous index (or no index). `abort` removes what this writer wrote.
    Memory stays bounded: rows are buffered only up to one row group.
    """

    def __init__(self, index_dir: Path, manifest: Manifest, shard_rows: int):
        if shard_rows < 1:
            raise ValueError("shard_rows must be at least 1")
        self.index_dir = index_dir
        self.manifest = manifest
        self.shard_rows = shard_rows
        self.schema = shard_schema(manifest.dense_dim, manifest.colbert_dim, manifest.store_text)
        self.shards: list[ShardInfo] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_path: Path | None = None
        self._shard_row_count = 0
        index_dir.mkdir(parents=True, exist_ok=True)

    def shard_name(self, number: int) -> str:
        return f"shard-{self.manifest.generation:06d}-{number:05d}.parquet"

    def write(self, rows: RowBatch) -> None:
        table = rows_to_table(rows, self.schema)
        start = 0
        while start < table.num_rows:
            room = self.shard_rows - self._shard_row_count - self._pending_rows
            piece = table.slice(start, room)
            self._pending.append(piece)
            self._pending_rows += piece.num_rows
            self._pending_bytes += piece.nbytes
            start += piece.num_rows
            if self._shard_row_count + self._pending_rows >= self.shard_rows:
                self._flush_row_group()
                self._close_shard()
            elif self._pending_rows >= _ROW_GROUP_ROWS or self._pending_bytes >= _ROW_GROUP_BYTES:
                self._flush_row_group()

    def _flush_row_group(self) -> None:
        if not self._pending_rows:
            return
        if self._writer is None:
            self._shard_path = self.index_dir / f".{self.shard_name(len(self.shards))}.tmp"
            self._writer = pq.ParquetWriter(
                self._shard_path, self.schema, compression="zstd",
                # Float vectors neither dictionary-encode nor have useful min/max statistics.
                use_dictionary=["id", "text"] if "text" in self.schema.names else ["id"],
                write_statistics=["id"],
            )
        group = pa.concat_tables(self._pending)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._shard_row_count += group.num_rows
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

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

    def commit(self) -> Manifest:
        """Finish the last shard, publish the manifest, then delete shards no manifest names."""
        self._flush_row_group()
        self._close_shard()
        now = utc_now()
        self.manifest.shards = list(self.shards)
        self.manifest.documents = sum(s.rows for s in self.shards)
        self.manifest.created = self.manifest.created or now
        self.manifest.updated = now
        _write_atomically(self.index_dir / MANIFEST_FILE,
                          (json.dumps(self.manifest.to_json(), indent=2, ensure_ascii=False) + "\n").encode())
        self._remove_unlisted_files()
        return self.manifest

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._shard_path is not None:
            self._shard_path.unlink(missing_ok=True)
        for shard in self.shards:
            (self.index_dir / shard.file).unlink(missing_ok=True)
        self._writer, self._shard_path, self.shards = None, None, []

    def _remove_unlisted_files(self) -> None:
        keep = {s.file for s in self.manifest.shards}
        for path in self.index_dir.iterdir():
            stale_shard = SHARD_PATTERN.match(path.name) and path.name not in keep
            stale_temp = path.name.startswith(".shard-") and path.name.endswith(".tmp")
            if stale_shard or stale_temp:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Reading an index


@dataclass
class IndexVectors:
    """All dense and sparse vectors of an index, row-aligned with `ids`.

    dense:          [N, D] float16
    sparse_indptr:  [N + 1] int64, CSR row pointers into the two arrays below
    sparse_indices: [nnz] uint32 token ids (ascending within a row)
    sparse_values:  [nnz] float32 weights
    shard_starts:   [n_shards + 1] global row number where each shard begins
    """

    ids: np.ndarray
    dense: np.ndarray
    sparse_indptr: np.ndarray
    sparse_indices: np.ndarray
    sparse_values: np.ndarray
    shard_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def sparse_row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.sparse_indptr[row], self.sparse_indptr[row + 1]
        return self.sparse_indices[start:end], self.sparse_values[start:end]


def _open_shard(index_dir: Path, shard: ShardInfo) -> pq.ParquetFile:
    path = index_dir / shard.file
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise IndexFormatError(f"{path}: damaged or missing shard ({error})") from error
    if parquet.metadata.num_rows != shard.rows:
        raise IndexFormatError(f"{path}: damaged shard ({parquet.metadata.num_rows} rows, manifest says {shard.rows})")
    return parquet


def load_vectors(index_dir: Path, manifest: Manifest) -> IndexVectors:
    """Read ids, dense and sparse columns of every shard into flat arrays."""
    ids, dense, indptr_parts, indices, values = [], [], [], [], []
    nnz = 0
    for shard in manifest.shards:
        try:
            table = _open_shard(index_dir, shard).read(columns=["id", "dense", "sparse"])
        except (OSError, pa.ArrowException) as error:
            raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error
        ids.append(np.asarray(table.column("id").to_pylist(), dtype=object))
        dense_list = table.column("dense").combine_chunks()
        dense.append(dense_list.flatten().to_numpy(zero_copy_only=False).reshape(-1, manifest.dense_dim))
        sparse = table.column("sparse").combine_chunks()
        for name, out in (("indices", indices), ("values", values)):
            out.append(sparse.field(name).flatten().to_numpy(zero_copy_only=False))
        offsets = sparse.field("indices").offsets.to_numpy().astype(np.int64)
        indptr_parts.append(offsets[1:] - offsets[0] + nnz)
        nnz += int(offsets[-1] - offsets[0])
    row_counts = [s.rows for s in manifest.shards]
    return IndexVectors(
        ids=np.concatenate(ids) if ids else np.zeros(0, dtype=object),
        dense=np.concatenate(dense) if dense else np.zeros((0, manifest.dense_dim), dtype=np.float16),
        sparse_indptr=np.concatenate([np.zeros(1, dtype=np.int64), *indptr_parts]),
        sparse_indices=np.concatenate(indices) if indices else np.zeros(0, dtype=np.uint32),
        sparse_values=np.concatenate(values) if values else np.zeros(0, dtype=np.float32),
        shard_starts=np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64),
    )


def read_rows(index_dir: Path, manifest: Manifest, rows: Sequence[int], column: str) -> list:
    """Values of one column for the given global row numbers, reading only the row groups that hold them."""
    starts = np.concatenate([[0], np.cumsum([s.rows for s in manifest.shards])])
    wanted: dict[int, object] = {}
    by_shard: dict[int, list[int]] = {}
    for row in rows:
        shard_number = int(np.searchsorted(starts, row, side="right") - 1)
        by_shard.setdefault(shard_number, []).append(int(row - starts[shard_number]))
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
                wanted[int(starts[shard_number]) + local] = _colbert_matrix(value) if column == "colbert" else value.as_py()
    return [wanted[int(r)] for r in rows]


def _colbert_matrix(value: pa.Scalar) -> np.ndarray:
    """One row's ColBERT vectors as [n_tokens - 1, Dc] float32."""
    tokens = value.values  # FixedSizeListArray
    dim = tokens.type.list_size
    return tokens.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def index_size_bytes(index_dir: Path, manifest: Manifest) -> int:
    return sum(s.bytes for s in manifest.shards) + (index_dir / MANIFEST_FILE).stat().st_size


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
