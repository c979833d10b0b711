"""Reading an index's shards (live rows, columns, vectors, deletion sets) and verifying every file.

Every reader goes through `open_shard`, which checks the shard's size and row
count against the manifest and has Parquet verify page checksums, so a
damaged file is an IndexFormatError naming it, never wrong data.
"""

from __future__ import annotations

import errno
import mmap
import os
import shlex
import stat

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_index.errors import IndexFormatError
from bge_index.store.names import MANIFEST_FILE, SEARCH_DIR, SEARCH_KINDS
from bge_index.store.manifest import Manifest, ShardInfo, legacy_schema, manifest_schema, read_manifest
from bge_index.store.files import file_crc32, file_sha256




@dataclass(frozen=True, slots=True)  # one per row written in a run: kept small
class RowLocation:
    """Where a row lives: shard file name and row number inside it."""

    file: str
    row: int


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


def open_index_file(path: Path, kind: str, expected_bytes: object, advice: str = "",
                    missing_ok: bool = False) -> tuple[int, os.stat_result] | None:
    """A file a manifest names, opened read-only and never through a symbolic link, and checked to be a regular
    file of `expected_bytes`: (fd, its fstat); the caller closes fd.

    Anything else is an IndexFormatError, `PATH: damaged KIND (why)` then `; ADVICE`. With `missing_ok`, a
    file that does not exist is None (an optional file); without, its error says "damaged or missing".
    """
    tail = f"; {advice}" if advice else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as error:
        if missing_ok:
            return None
        raise IndexFormatError(f"{path}: damaged or missing {kind} ({error.strerror}){tail}") from error
    except OSError as error:
        why = "a symbolic link" if error.errno == errno.ELOOP else error.strerror
        state = "damaged" if missing_ok else "damaged or missing"
        raise IndexFormatError(f"{path}: {state} {kind} ({why}){tail}") from error
    try:
        info = os.fstat(fd)
        problem = _regular_file_problem(info, expected_bytes)
        if problem:
            raise IndexFormatError(f"{path}: damaged {kind} ({problem}){tail}")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _regular_file_problem(info: os.stat_result, expected_bytes: object) -> str | None:
    """Why a file (its stat) is not a regular file of `expected_bytes` bytes, or None when it is.

    `expected_bytes` is the manifest's value taken as is: a missing (None) or non-integer one never matches.
    """
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size != expected_bytes:
        return f"{info.st_size} bytes, manifest says {expected_bytes}"
    return None


def open_shard(index_dir: Path, shard: ShardInfo) -> pq.ParquetFile:
    """The shard's ParquetFile, page checksums verified on read; IndexFormatError when it is missing, unreadable,
    or its size or row count differs from the manifest's."""
    path = index_dir / shard.file
    fd, info = open_index_file(path, "shard", shard.bytes)
    try:
        # The mapping keeps the file readable after a writer unlinks it.
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if info.st_size else b""
    finally:
        os.close(fd)
    try:
        parquet = pq.ParquetFile(pa.BufferReader(pa.py_buffer(mapped)), page_checksum_verification=True)
    except (OSError, pa.ArrowException) as error:
        raise IndexFormatError(f"{path}: damaged or missing shard ({error})") from error
    if parquet.metadata.num_rows != shard.rows:
        raise IndexFormatError(f"{path}: damaged shard ({parquet.metadata.num_rows} rows, manifest says {shard.rows})")
    return parquet


def _read_columns(index_dir: Path, shard: ShardInfo, columns: list[str]) -> pa.Table:
    try:
        return open_shard(index_dir, shard).read(columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error


def iter_live_keys(index_dir: Path, manifest: Manifest, with_source: bool = False) -> Iterator[tuple]:
    """(document id, content hash, location) of every live row, shard by shard; `with_source`: and the row's
    source file (None where its shard does not record it)."""
    id_column = "doc_id" if manifest.chunking else "id"
    for shard in manifest.shards:
        sourced = with_source and has_sources(index_dir, shard)
        table = _read_columns(index_dir, shard, [id_column, "content_hash", *(["source"] if sourced else [])])
        mask = live_mask(index_dir, shard)
        ids = table.column(id_column).to_pylist()
        hashes = table.column("content_hash").to_pylist()
        sources = table.column("source").to_pylist() if sourced else [None] * len(ids)
        for row in np.flatnonzero(mask).tolist():
            if with_source:
                yield ids[row], hashes[row], RowLocation(shard.file, row), sources[row]
            else:
                yield ids[row], hashes[row], RowLocation(shard.file, row)


def has_sources(index_dir: Path, shard: ShardInfo) -> bool:
    """Whether a shard records its rows' sources (shard layout 2)."""
    return "source" in open_shard(index_dir, shard).schema_arrow.names


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
    sources, source_lines, metadata: B each (None values where a row has none), or None when not asked for
    """

    ids: list[str]
    dense: np.ndarray
    sparse_indptr: np.ndarray
    sparse_indices: np.ndarray
    sparse_values: np.ndarray
    texts: list[str] | None = None
    sources: list[str | None] | None = None
    source_lines: list[int | None] | None = None
    metadata: list[dict[str, str] | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)


ROW_FIELDS = ("source", "source_line", "metadata")  # shard layout 2: where each row came from, its other fields


def _row_fields(batch: pa.RecordBatch, present: bool) -> dict:
    """LiveRows' sources, source_lines and metadata of a batch (all None for a shard without them)."""
    if not present:
        return {"sources": [None] * batch.num_rows, "source_lines": [None] * batch.num_rows,
                "metadata": [None] * batch.num_rows}
    return {"sources": batch.column("source").to_pylist(), "source_lines": batch.column("source_line").to_pylist(),
            "metadata": [None if m is None else dict(m) for m in batch.column("metadata").to_pylist()]}


def iter_live_rows(index_dir: Path, manifest: Manifest, batch_rows: int = 1000,
                   with_text: bool = False, with_fields: bool = False) -> Iterator[LiveRows]:
    """Every live row, shard by shard, `batch_rows` at a time: memory stays at one batch, whatever the index size.
    `with_fields`: each row's source, source line and metadata too (None for a shard written before them)."""
    columns = ["id", "dense", "sparse"] + (["text"] if with_text and manifest.store_text else [])
    for shard in manifest.shards:
        mask = live_mask(index_dir, shard)
        start = 0
        try:
            parquet = open_shard(index_dir, shard)
            fields = with_fields and "source" in parquet.schema_arrow.names
            for batch in parquet.iter_batches(batch_size=batch_rows,
                                              columns=columns + (list(ROW_FIELDS) if fields else [])):
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
                    **(_row_fields(batch, fields) if with_fields else {}),
                )
        except (OSError, pa.ArrowException) as error:
            raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error


def read_shard_vectors(index_dir: Path, manifest: Manifest, shard: ShardInfo
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All rows of one shard, deleted ones included: dense [rows, D] float16 and sparse CSR (indptr, ids, weights)."""
    table = _read_columns(index_dir, shard, ["dense", "sparse"])
    return (_dense_rows(table.column("dense").combine_chunks(), manifest.dense_dim),
            *_sparse_csr(table.column("sparse").combine_chunks()))


def iter_dense_groups(parquet: pq.ParquetFile, path: Path, dense_dim: int) -> Iterator[np.ndarray]:
    """[group rows, dense_dim] float16 dense vectors of an opened shard (`path` for messages), a row group at a
    time, deleted rows included."""
    for column in _iter_row_groups(parquet, path, "dense"):
        yield _dense_rows(column, dense_dim)


def iter_sparse_groups(parquet: pq.ParquetFile, path: Path) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sparse vectors of an opened shard (`path` for messages), a row group at a time, deleted rows included, as
    CSR: indptr from 0 [group rows + 1] int64, ids [nnz] uint32, weights [nnz] float32."""
    for column in _iter_row_groups(parquet, path, "sparse"):
        yield _sparse_csr(column)


def _iter_row_groups(parquet: pq.ParquetFile, path: Path, column: str) -> Iterator[pa.Array]:
    """One column of a shard, one Arrow array per row group: a row group is the most a reader holds at once."""
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=[column])
        except (OSError, pa.ArrowException) as error:
            raise IndexFormatError(f"{path}: damaged shard ({error})") from error
        yield table.column(column).combine_chunks()


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
    shards = manifest.shards
    return read_rows_through(lambda number: (open_shard(index_dir, shards[number]), index_dir / shards[number].file),
                             locations, column)


def read_rows_through(open_parquet: Callable[[int], tuple[pq.ParquetFile, Path]],
                      locations: Sequence[tuple[int, int]], column: str) -> list:
    """`read_rows` with the shards given as `open_parquet(shard number) -> (ParquetFile, path for messages)`.

    Only the row groups holding the wanted rows are decoded; ColBERT values come back as [n, Dc] float32 arrays.
    """
    wanted: dict[tuple[int, int], object] = {}
    by_shard: dict[int, list[int]] = {}
    for shard_number, local in locations:
        by_shard.setdefault(int(shard_number), []).append(int(local))
    for shard_number, local_rows in by_shard.items():
        parquet, path = open_parquet(shard_number)
        group_sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        group_starts = np.concatenate([[0], np.cumsum(group_sizes)])
        by_group: dict[int, list[int]] = {}
        for local in local_rows:
            by_group.setdefault(int(np.searchsorted(group_starts, local, side="right") - 1), []).append(local)
        for group, group_rows in by_group.items():
            try:
                values = parquet.read_row_group(group, columns=[column]).column(column)
            except (OSError, pa.ArrowException) as error:
                raise IndexFormatError(f"{path}: damaged shard ({error})") from error
            for local in group_rows:
                value = values[local - int(group_starts[group])]
                wanted[(shard_number, local)] = _colbert_matrix(value) if column == "colbert" else value.as_py()
    return [wanted[(int(s), int(r))] for s, r in locations]


def _colbert_matrix(value: pa.Scalar) -> np.ndarray:
    """One row's ColBERT vectors as [n_tokens - 1, Dc] float32."""
    tokens = value.values  # FixedSizeListArray
    dim = tokens.type.list_size
    return tokens.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


# ---------------------------------------------------------------------------
# Verification


def repair_advice(index_dir: Path | str = "INDEX_DIR") -> str:
    """What to run when search files are missing or damaged: they derive from the shards, `verify --repair`
    rebuilds them (store/repair.py). The advice every message about a search file ends with."""
    return f"run `bge-index verify --repair {shlex.quote(str(index_dir))}` to rebuild it from its shard"


@dataclass
class IndexCheck:
    """What `check_index` found in `index_dir`: `search` maps a shard file to the problems of its search files
    (rebuildable from the shard: `verify --repair`); `other` lists every other problem (a damaged shard or
    deletion set, a wrong total, duplicate ids: the data itself, which nothing can rebuild)."""

    index_dir: Path
    manifest: Manifest
    search: dict[str, list[str]]
    other: list[str]

    @property
    def problems(self) -> list[str]:
        """One line per problem, each search file's ending with the advice that fixes it."""
        advice = repair_advice(self.index_dir)
        return self.other + [f"{problem}; {advice}" for problems in self.search.values() for problem in problems]


def verify_index(index_dir: Path) -> list[str]:
    """Check every file against the manifest; returns one line per problem (empty: all good).

    Checks: each shard's size and SHA-256, that Parquet can read every page
    (page checksums included), row counts, the schema, each deletion set's
    checksum and range, the manifest's live-row total, duplicate live ids, and each search file's size and
    CRC-32 (a shard without search files, from a version 1 index, is fine: readers build them in memory).
    """
    return check_index(index_dir).problems


def check_index(index_dir: Path, manifest: Manifest | None = None) -> IndexCheck:
    """`verify_index`'s checks, with the search files' problems kept apart per shard (see IndexCheck).

    A shard that is itself damaged has its search files left unchecked: they could not be rebuilt from it.
    """
    manifest = manifest or read_manifest(index_dir)
    check = IndexCheck(index_dir, manifest, {}, [])
    problems = check.other
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
            # A layout 1 shard (written before rows recorded their source) is checked against that layout.
            expected = expected_schema if has_sources(index_dir, shard) else legacy_schema(expected_schema)
            table = _read_columns(index_dir, shard, expected.names)
        except IndexFormatError as error:
            problems.append(str(error))
            continue
        if not table.schema.equals(expected, check_metadata=False):
            problems.append(f"{path}: damaged shard (schema differs from the manifest's)")
            continue
        search_problems = _search_file_problems(index_dir, shard)
        if search_problems:
            check.search[shard.file] = search_problems
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
    if manifest.deletes and not problems:
        from bge_index.store.deletes import deletes_problem  # it reads deletion sets through this module

        problem = deletes_problem(index_dir, manifest)
        if problem:
            problems.append(problem)
    return check


def _search_file_problems(index_dir: Path, shard: ShardInfo) -> list[str]:
    """Problems of a shard's search files: the manifest's records (one per kind, each file named as the writer
    names it) and each file's presence, size and CRC-32. None for a shard without search files (format version 1).
    Which kinds a shard must have is the readers' to say (vector_store.py)."""
    if shard.search is None:
        return []
    stem = shard.file.removesuffix(".parquet")
    records = shard.search if isinstance(shard.search, list) else [None]
    kinds = [r.get("kind") if isinstance(r, dict) else None for r in records]
    if len(set(kinds)) != len(kinds) or any(kind not in SEARCH_KINDS or r.get("file") != f"{stem}.{kind}.npy"
                                            for kind, r in zip(kinds, records)):
        return [f"{index_dir / MANIFEST_FILE}: damaged manifest (the search file records of {shard.file})"]
    problems = []
    for record in records:
        problem = _verify_file(index_dir / SEARCH_DIR / record["file"], record.get("bytes"), None, "search file",
                               crc32=record.get("crc32"))
        if problem:
            problems.append(problem)
    return problems


def _verify_file(path: Path, size: int | None, sha256: str | None, kind: str, crc32: int | None = None
                 ) -> str | None:
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return f"{path}: missing {kind}"
    if stat.S_ISLNK(info.st_mode):
        return f"{path}: damaged {kind} (a symbolic link)"
    # No recorded size (deletion sets): any size passes here, and the SHA-256 below covers the bytes.
    problem = _regular_file_problem(info, info.st_size if size is None else size)
    if problem:
        return f"{path}: damaged {kind} ({problem})"
    if sha256 is not None and file_sha256(path) != sha256:
        return f"{path}: damaged {kind} (SHA-256 differs from the manifest's)"
    if crc32 is not None and file_crc32(path) != crc32:
        return f"{path}: damaged {kind} (CRC-32 differs from the manifest's)"
    return None

