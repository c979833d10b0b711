"""Search structures derived from each shard, built before the commit and memory-mapped by readers.

For every shard `shard-G-N.parquet` (immutable) the folder `INDEX/search/` holds seven `.npy` files:

    shard-G-N.dense.npy            [rows, D] float16   the dense vectors, raw, for scanning
    shard-G-N.token-ids.npy        [t] uint32          the distinct token ids present in the shard, ascending
    shard-G-N.token-ptr.npy        [t + 1] int64       postings of token_ids[i]: [ptr[i], ptr[i + 1])
    shard-G-N.posting-rows.npy     [nnz] uint32        rows holding the token, ascending
    shard-G-N.posting-weights.npy  [nnz] float32       their weights for that token
    shard-G-N.heavy-ids.npy        [h] int64           tokens present in at least half the rows
    shard-G-N.heavy-columns.npy    [h, rows] float32   their weights as dense columns (0 where absent)

that is, the sparse vectors turned into an inverted index whose size follows
the shard's rows (a token is found by binary search in `token-ids`), plus dense
columns for common tokens (smaller than their postings, and a streaming add
instead of a scatter). Four more files let a search skip rows it can prove
cannot reach the top-k (rank-safe pruning, search/dense_prune.py and
search/sparse_prune.py):

    shard-G-N.dense-codes.npy      [rows, D] int8      the dense rows quantized: x = center + step * code + error
    shard-G-N.dense-frame.npy      [3, D] float32      center (the shard's mean row), step (per dimension),
                                                       direction (the center's, unit length; zeros if none)
    shard-G-N.dense-bounds.npy     [rows, 4] float32   per row, each rounded up: |code|, |error|, |x| (L2 norms)
                                                       and |error . direction|
    shard-G-N.token-max.npy        [t] float32         the largest |weight| of each token of token-ids

A shard written before these existed has the first seven only; it is
searched by full scans (and the index stays valid: `verify` and readers
accept both sets).

The index writer builds them right after a shard is closed, before the
manifest is published, and the manifest names each one with its size and
CRC-32 (`ShardInfo.search`): a run that cannot build them (disk full) fails
before its commit, and the previous generation stays searchable. Readers
never write into the index: a shard whose search files are missing (a
version 1 index, or files deleted by hand) gets its vectors built in memory
for that process. Every file is bounds-checked when opened and its CRC-32 is
checked once per state of the file (about 2.5 GB/s; remembered for this user
across processes by checked_files.py, so a cold search does not re-read 3 GB
of a million-row index that no one has touched); a damaged file is an
IndexFormatError naming it, never a wrong score (a file changed through the
file system moves its ctime and is checked again; bytes that rot under
unchanged metadata are caught within checked_files.MAX_AGE_DAYS, and
`verify` always reads everything).

`OpenIndex` is one generation opened whole: the manifest, every shard's
Parquet handle, deletion set and search files, all opened before the first
query. Unlinked files stay readable through open handles, so a search that
started on a generation finishes on it, whatever writers commit meanwhile.
"""

from __future__ import annotations

import io
import mmap
import os
import stat
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_index.store.checked_files import CheckedFiles, file_key
from bge_index.errors import IndexFormatError, OutputError
from bge_index.store.names import (BASE_SEARCH_KINDS, PRUNE_SEARCH_KINDS, SEARCH_DIR, SEARCH_FILE_PATTERN,
                                   SEARCH_KINDS)
from bge_index.store.manifest import Manifest, ShardInfo, read_manifest
from bge_index.store.files import file_sha256, fsync_dir
from bge_index.store.shard_reader import (repair_advice, iter_dense_groups, iter_sparse_groups, open_index_file, open_shard,
                                          read_deleted_rows, read_rows_through)

HEAVY_DENSITY = 0.5  # a token in at least this fraction of a shard's rows also gets a dense column
_DTYPES = {"dense": np.float16, "token-ids": np.uint32, "token-ptr": np.int64, "posting-rows": np.uint32,
           "posting-weights": np.float32, "heavy-ids": np.int64, "heavy-columns": np.float32,
           "dense-codes": np.int8, "dense-frame": np.float32, "dense-bounds": np.float32, "token-max": np.float32}
CODE_LEVELS = 127  # codes in [-127, 127]: int8 products never overflow int32 below 133,000 dimensions
_QUANTIZE_CHUNK = 4096  # rows quantized at a time (float64 working copies of 32 MiB at 1024 dimensions)
_SLACK = 2.0 ** -30  # relative slack on every stored norm: far above float64's rounding of the computation
_UINT32_MAX = 2 ** 32 - 1
OPEN_ATTEMPTS = 5  # generations an open may see go by (files removed under it) before it gives up


@dataclass
class ShardVectors:
    """One shard's searchable vectors; rows are numbered from `start` in the whole index."""

    start: int
    dense: np.ndarray  # [rows, D] float16
    token_ids: np.ndarray  # [t] uint32, ascending
    token_ptr: np.ndarray  # [t + 1] int64
    posting_rows: np.ndarray  # [nnz] uint32
    posting_weights: np.ndarray  # [nnz] float32
    heavy_ids: np.ndarray | None = None  # [h] int64, ascending
    heavy_columns: np.ndarray | None = None  # [h, rows] float32
    live: np.ndarray | None = None  # [rows] bool; None when no row is deleted
    # Pruning data (None: a shard without it is searched by full scans): see quantize_rows and token_abs_max.
    codes: np.ndarray | None = None  # [rows, D] int8
    frame: np.ndarray | None = None  # [3, D] float32: center, step, direction
    row_bounds: np.ndarray | None = None  # [rows, 4] float32: |code|, |error|, |x|, |error . direction|, rounded up
    token_max: np.ndarray | None = None  # [t] float32: max |weight| per token of token_ids

    def heavy_column(self, token: int) -> np.ndarray | None:
        """[rows] float32 weights of a token common enough to be stored densely, else None."""
        if self.heavy_ids is None or len(self.heavy_ids) == 0:
            return None
        at = int(np.searchsorted(self.heavy_ids, np.int64(token)))
        if at < len(self.heavy_ids) and self.heavy_ids[at] == token:
            return self.heavy_columns[at]
        return None

    @property
    def rows(self) -> int:
        """Rows in the shard, deleted ones included."""
        return self.dense.shape[0]

    def token_slot(self, token: int) -> int:
        """The position of `token` in token_ids, or -1 when the shard does not hold it."""
        if not 0 <= token <= _UINT32_MAX:
            return -1
        # A uint32 key: a Python int would make numpy widen the whole [t] array to int64 first (~100 us a lookup).
        at = int(np.searchsorted(self.token_ids, np.uint32(token)))
        return at if at < len(self.token_ids) and int(self.token_ids[at]) == token else -1

    def token_slots(self, tokens: np.ndarray) -> np.ndarray:
        """[n] int64: the position in token_ids of each of `tokens` ([n] integers), -1 where the shard lacks it;
        one binary search for all of them."""
        tokens = np.asarray(tokens, dtype=np.int64)
        valid = (tokens >= 0) & (tokens <= _UINT32_MAX)
        if not len(self.token_ids) or not len(tokens):
            return np.full(len(tokens), -1, dtype=np.int64)
        keys = np.where(valid, tokens, 0).astype(np.uint32)
        at = np.minimum(np.searchsorted(self.token_ids, keys), len(self.token_ids) - 1)
        return np.where(valid & (self.token_ids[at] == keys), at, -1).astype(np.int64)

    def heavy_slots(self, tokens: np.ndarray) -> np.ndarray:
        """[n] int64: the row of heavy_columns holding each of `tokens`, -1 where it has none (heavy_column's
        lookup, one binary search for all of them)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.heavy_ids is None or not len(self.heavy_ids) or not len(tokens):
            return np.full(len(tokens), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.heavy_ids, tokens), len(self.heavy_ids) - 1)
        return np.where(self.heavy_ids[at] == tokens, at, -1).astype(np.int64)

    def postings(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows ascending, weights) of one token; empty for a token absent from the shard."""
        at = self.token_slot(token)
        if at < 0:
            return self.posting_rows[:0], self.posting_weights[:0]
        start, end = self.token_ptr[at], self.token_ptr[at + 1]
        return self.posting_rows[start:end], self.posting_weights[start:end]


def invert(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, vocab_size: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows (doc -> tokens) to postings (token -> docs): (token_ids [t], token_ptr [t + 1], rows, weights)."""
    rows_of_entries = np.repeat(np.arange(len(indptr) - 1, dtype=np.uint32), np.diff(indptr))  # [nnz]
    # A stable sort keeps rows ascending within each token.
    order = np.argsort(indices, kind="stable")
    token_ids, counts = np.unique(np.asarray(indices)[order], return_counts=True)
    token_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (token_ids.astype(np.uint32), token_ptr, rows_of_entries[order],
            np.asarray(values)[order].astype(np.float32))


def heavy_columns(token_ids: np.ndarray, token_ptr: np.ndarray, rows: np.ndarray, weights: np.ndarray,
                  n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens in at least HEAVY_DENSITY of the rows, and their weights as dense [h, rows] columns."""
    counts = np.diff(token_ptr)
    slots = np.flatnonzero(counts >= max(1, HEAVY_DENSITY * n_rows))
    columns = np.zeros((len(slots), n_rows), dtype=np.float32)
    for at, slot in enumerate(slots.tolist()):
        start, end = token_ptr[slot], token_ptr[slot + 1]
        columns[at, rows[start:end]] = weights[start:end]
    return token_ids[slots].astype(np.int64), columns


def token_abs_max(token_ptr: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[t] float32: the largest |weight| in each token's postings (the bound sparse pruning starts from)."""
    if len(token_ptr) <= 1:
        return np.zeros(0, dtype=np.float32)
    return np.maximum.reduceat(np.abs(weights), token_ptr[:-1]).astype(np.float32)


def _round_up32(values: np.ndarray) -> np.ndarray:
    """float64 -> the smallest float32 not below each value."""
    rounded = values.astype(np.float32)
    return np.where(rounded.astype(np.float64) < values, np.nextafter(rounded, np.float32(np.inf)), rounded)


def dense_frame(dense: np.ndarray) -> np.ndarray:
    """[3, D] float32 of a shard's [rows, D] float16 matrix: its mean row (the center), per-dimension steps, and
    the center's direction (unit length; zeros for a zero center).

    Subtracting the center matters for real embeddings, which crowd into a narrow cone: the codes then spend
    their 255 levels on how rows differ, not on what they share; and the direction lets a search bound a
    row's error where the query points (dense_prune.py). The step of dimension i is max |x_i - center_i| over
    the rows / CODE_LEVELS (1 where they are all equal): no code is clipped, so every row's error is about the
    same and the largest, which the search's first cut uses for all rows, is close to the typical one
    (measured: clipping the 0.05% largest components made typical errors 10% smaller and the largest 4x the
    typical, the cut four times as loose; BENCHMARKS.md, issue 17).
    """
    rows, dim = dense.shape
    total = np.zeros(dim, dtype=np.float64)
    for start in range(0, rows, _QUANTIZE_CHUNK):
        total += dense[start:start + _QUANTIZE_CHUNK].astype(np.float64).sum(axis=0)
    center = (total / max(rows, 1)).astype(np.float32)
    spread = np.zeros(dim, dtype=np.float64)
    for start in range(0, rows, _QUANTIZE_CHUNK):
        chunk = np.abs(dense[start:start + _QUANTIZE_CHUNK].astype(np.float64) - center).max(axis=0)
        np.maximum(spread, chunk, out=spread)
    step = (spread / CODE_LEVELS).astype(np.float32)
    step[~(step > 0) | ~np.isfinite(step)] = 1.0
    length = float(np.linalg.norm(center.astype(np.float64)))
    direction = (center.astype(np.float64) / length).astype(np.float32) if length > 0 else np.zeros(dim, np.float32)
    return np.stack([center, step, direction])


def quantize_rows(block: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, D] int8 codes, [n, 4] float32 bounds) of [n, D] float16 rows in a shard's frame (dense_frame).

    code = round((x - center) / step) clipped to [-CODE_LEVELS, CODE_LEVELS], so that
    x = center + step * code + error exactly (error defined as what is left). The bounds, each rounded up
    to float32 above its float64 computation with slack to spare: |code|, |error|, |x| (L2 norms) and
    |error . direction|. Search bounds a row's score with them (dense_prune.py); codes may be anything, the
    bounds stay true.
    """
    center, step, direction = (frame[i].astype(np.float64) for i in range(3))
    rows = block.astype(np.float64)  # fp16 -> float64: exact
    residual = rows - center  # [n, D]
    codes = np.clip(np.rint(residual / step), -CODE_LEVELS, CODE_LEVELS)
    error = residual - codes * step  # codes * step is exact in float64 (8 x 24 significant bits)
    # float64 rounding of `residual` and `error` is at most 2**-52 of |residual| + |error| per component.
    residual_norm = np.sqrt(np.einsum("ij,ij->i", residual, residual))
    rounding = _SLACK * residual_norm
    error_norm = np.sqrt(np.einsum("ij,ij->i", error, error)) * (1 + _SLACK) + rounding
    along = np.abs(error @ direction) * (1 + _SLACK) + rounding  # |direction| <= 1 (1 + 2**-23)
    code_norm = np.sqrt(np.einsum("ij,ij->i", codes, codes)) * (1 + _SLACK)
    row_norm = np.sqrt(np.einsum("ij,ij->i", rows, rows)) * (1 + _SLACK)
    bounds = _round_up32(np.stack([code_norm, error_norm, row_norm, along], axis=1))
    return codes.astype(np.int8), bounds


def quantize_dense(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame [3, D] float32, codes [rows, D] int8, bounds [rows, 4] float32) of a whole [rows, D] float16 matrix."""
    frame = dense_frame(dense)
    codes = np.empty(dense.shape, dtype=np.int8)
    bounds = np.empty((dense.shape[0], 4), dtype=np.float32)
    for start in range(0, dense.shape[0], _QUANTIZE_CHUNK):
        codes[start:start + _QUANTIZE_CHUNK], bounds[start:start + _QUANTIZE_CHUNK] = \
            quantize_rows(dense[start:start + _QUANTIZE_CHUNK], frame)
    return frame, codes, bounds


def invert_streaming(groups, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Postings (token_ids, token_ptr, rows, weights) from CSR row groups read twice: once to count, once to fill.

    `groups()` yields (indptr, ids, weights) per row group, in row order. Entries of a token land in
    row order (stable sort inside a group, groups in order), as `invert` gives them. The [vocab] counts
    are transient; what is returned is proportional to the shard's entries.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for _indptr, indices, _values in groups():
        counts += np.bincount(indices, minlength=vocab_size)[:vocab_size]
    full_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [vocab + 1]
    rows = np.empty(int(full_ptr[-1]), dtype=np.uint32)
    weights = np.empty(int(full_ptr[-1]), dtype=np.float32)
    cursor = full_ptr[:-1].copy()  # next free slot of each token
    first_row = 0
    for indptr, indices, values in groups():
        entry_rows = np.repeat(np.arange(first_row, first_row + len(indptr) - 1, dtype=np.uint32), np.diff(indptr))
        order = np.argsort(indices, kind="stable")
        tokens = indices[order]  # [n] grouped by token, rows ascending inside each
        run_starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
        rank = np.arange(len(tokens)) - np.repeat(run_starts, np.diff(np.r_[run_starts, len(tokens)]))
        slots = cursor[tokens] + rank
        rows[slots] = entry_rows[order]
        weights[slots] = values[order]
        cursor += np.bincount(indices, minlength=vocab_size)[:vocab_size]
        first_row += len(indptr) - 1
    token_ids = np.flatnonzero(counts)
    token_ptr = np.concatenate([full_ptr[token_ids], [full_ptr[-1]]]).astype(np.int64)
    return token_ids.astype(np.uint32), token_ptr, rows, weights


# ---------------------------------------------------------------------------
# Writing (the index writer, before its commit)


def search_file_name(shard_file: str, kind: str) -> str:
    """`shard-G-N.<kind>.npy`: a search file's name, relative to INDEX/search/."""
    return f"{shard_file.removesuffix('.parquet')}.{kind}.npy"


def _write_npy(path: Path, dtype, shape: tuple, blocks) -> dict:
    """Write an .npy file from consecutive blocks (temp name, fsync, rename); returns its {bytes, crc32}.

    The temporary file is created O_EXCL|O_NOFOLLOW (a leftover or a planted link is removed first, never
    followed), with mode 0666 & ~umask like any tool's output.
    """
    tmp = path.parent / f".{path.name}.tmp"
    crc, size = 0, 0
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as stream:
            header = _npy_header(dtype, shape)
            for piece in (header, *(_block_bytes(b, dtype) for b in blocks)):
                crc = zlib.crc32(piece, crc)
                size += len(piece)
                stream.write(piece)
            stream.flush()
            os.fsync(stream.fileno())
        if size != len(header) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise IndexFormatError(f"{path}: its shard gave other rows than the manifest says ({shape})")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write this search file ({error.strerror or error}); nothing was "
                          "committed, the index's previous state is intact") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"bytes": size, "crc32": crc}


def _npy_header(dtype, shape: tuple) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buffer.getvalue()


def _block_bytes(block: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(block, dtype=dtype).tobytes()


def build_search_files(index_dir: Path, manifest: Manifest, shard: ShardInfo) -> ShardInfo:
    """Write a closed shard's search files into INDEX/search/ and return the shard with them recorded.

    Memory stays near the size of the posting arrays (8 bytes per stored token): the dense matrix is
    copied a row group at a time, and the postings are filled a row group at a time (counting sort).
    Any failure (disk full) propagates: the caller's run fails before its commit.
    """
    folder = index_dir / SEARCH_DIR
    try:
        folder.mkdir(exist_ok=True)
        is_folder = stat.S_ISDIR(os.lstat(folder).st_mode)
    except OSError as error:
        raise OutputError(f"{folder}: cannot create the search files' folder ({error.strerror or error})") from error
    if not is_folder:  # a planted link would send the search files outside the index
        raise IndexFormatError(f"{folder}: not a folder (a symbolic link?); remove it and run again")
    parquet, path = open_shard(index_dir, shard), index_dir / shard.file
    dense = iter_dense_groups(parquet, path, manifest.dense_dim)
    records = [{"kind": "dense", "file": search_file_name(shard.file, "dense"),
                **_write_npy(folder / search_file_name(shard.file, "dense"), np.float16,
                             (shard.rows, manifest.dense_dim), dense)}]
    token_ids, token_ptr, rows, weights = invert_streaming(lambda: iter_sparse_groups(parquet, path),
                                                           manifest.vocab_size)
    heavy, columns = heavy_columns(token_ids, token_ptr, rows, weights, shard.rows)
    for kind, array in zip(BASE_SEARCH_KINDS[1:], (token_ids, token_ptr, rows, weights, heavy, columns)):
        name = search_file_name(shard.file, kind)
        records.append({"kind": kind, "file": name,
                        **_write_npy(folder / name, _DTYPES[kind], array.shape, [array.reshape(-1)])})
    records += _write_prune_files(folder, shard, manifest.dense_dim, token_ptr, weights)
    fsync_dir(folder)
    return replace(shard, search=records, mtime_ns=path.stat().st_mtime_ns)


def _write_prune_files(folder: Path, shard: ShardInfo, dim: int, token_ptr: np.ndarray, weights: np.ndarray
                       ) -> list[dict]:
    """The pruning kinds of a shard whose dense file is written: quantized from that file, memory-mapped, a chunk
    at a time (memory: one chunk's float64 copies and the [rows, 4] bounds)."""
    dense = np.load(folder / search_file_name(shard.file, "dense"), mmap_mode="r")  # [rows, D] float16
    frame = dense_frame(dense)
    bounds = np.empty((shard.rows, 4), dtype=np.float32)

    def code_blocks():
        for start in range(0, shard.rows, _QUANTIZE_CHUNK):
            codes, bounds[start:start + _QUANTIZE_CHUNK] = quantize_rows(dense[start:start + _QUANTIZE_CHUNK], frame)
            yield codes

    records = []
    for kind, shape, blocks in (("dense-codes", (shard.rows, dim), code_blocks()),
                                ("dense-frame", frame.shape, [frame]),
                                ("dense-bounds", bounds.shape, [bounds]),  # filled by code_blocks, written after it
                                ("token-max", (len(token_ptr) - 1,), [token_abs_max(token_ptr, weights)])):
        name = search_file_name(shard.file, kind)
        records.append({"kind": kind, "file": name, **_write_npy(folder / name, _DTYPES[kind], shape, blocks)})
    return records


def remove_unreferenced_search_files(index_dir: Path, keep_shards: set[str]) -> None:
    """Delete files in INDEX/search/ of shards not in `keep_shards` (file names), and temporary leftovers.

    Readers that opened a removed file keep reading it through their handle.
    """
    folder = index_dir / SEARCH_DIR
    keep = {search_file_name(shard, kind) for shard in keep_shards for kind in SEARCH_KINDS}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        return
    for entry in entries:
        ours = SEARCH_FILE_PATTERN.match(entry.name) or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
        if ours and entry.name not in keep:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------
# Reading


def _map_search_file(index_dir: Path, record: dict) -> np.ndarray | None:
    """One search file, memory-mapped copy-on-write and checksum-checked; None when it does not exist."""
    name = record.get("file") if isinstance(record, dict) else None
    kind = record.get("kind") if isinstance(record, dict) else None
    if not isinstance(name, str) or not SEARCH_FILE_PATTERN.match(name) or kind not in _DTYPES:
        raise IndexFormatError(f"{index_dir}: damaged manifest (search file record {record!r})")
    path = index_dir / SEARCH_DIR / name
    opened = open_index_file(path, "search file", record.get("bytes"), repair_advice(index_dir), missing_ok=True)
    if opened is None:
        return None
    fd, info = opened
    try:
        # ACCESS_COPY: writable arrays (torch.from_numpy wants them) that never write to the file.
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if info.st_size else b""
    finally:
        os.close(fd)
    # Checked once per state of the file, by any process of this user (checked_files.py): not on every search.
    checked, key = CheckedFiles.default(outside=index_dir), file_key(info, f"crc32={record.get('crc32')}")
    if not checked.known(key):
        if zlib.crc32(mapped) != record.get("crc32"):
            raise IndexFormatError(f"{path}: damaged search file (CRC-32 differs from the manifest's); "
                                   f"{repair_advice(index_dir)}")
        checked.remember(key)
    try:
        header = io.BytesIO(mapped[:4096])
        version = np.lib.format.read_magic(header)
        if version != (1, 0):
            raise ValueError(f"npy version {version}")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
        if fortran or dtype != np.dtype(_DTYPES[kind]):
            raise ValueError(f"dtype {dtype}, fortran order {fortran}")
        count = int(np.prod(shape, dtype=np.int64))
        offset = header.tell()
        if offset + count * dtype.itemsize != len(mapped):
            raise ValueError("size does not match the shape")
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
    except ValueError as error:
        raise IndexFormatError(f"{path}: damaged search file ({error}); {repair_advice(index_dir)}") from error


def release_pages(array: np.ndarray) -> int:
    """Drop this process's resident pages of the search file that `array` (or the array it is a view of) maps
    (`_map_search_file`): they leave the process's memory at once, and are read again from the file (or the
    page cache) only if something reads them again. For a search file the process has stopped reading, e.g.
    int8 codes once a packed copy serves every pass. Returns the bytes of the mapping released (0: not a mapped
    search file, or the system cannot: no madvise, no MADV_DONTNEED).

    Safe only because nothing writes through these maps: a copy-on-write page written to would be lost.
    """
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    if not isinstance(base, mmap.mmap) or base.closed:
        return 0
    try:
        base.madvise(mmap.MADV_DONTNEED)
    except (AttributeError, OSError, ValueError):
        return 0
    return len(base)


def _check_bounds(index_dir: Path, manifest: Manifest, shard: ShardInfo, arrays: dict) -> None:
    """Every invariant Searcher relies on, so a bad file is an error here and never a wrong score or a crash."""
    rows = shard.rows

    def bad(kind: str, why: str) -> IndexFormatError:
        return IndexFormatError(f"{index_dir / SEARCH_DIR / search_file_name(shard.file, kind)}: damaged search "
                                f"file ({why}); {repair_advice(index_dir)}")

    if arrays["dense"].shape != (rows, manifest.dense_dim):
        raise bad("dense", f"shape {arrays['dense'].shape}, expected {(rows, manifest.dense_dim)}")
    ids, ptr = arrays["token-ids"], arrays["token-ptr"]
    posting_rows, posting_weights = arrays["posting-rows"], arrays["posting-weights"]
    if ids.ndim != 1 or (len(ids) and (np.any(ids[1:] <= ids[:-1]) or int(ids[-1]) >= manifest.vocab_size)):
        raise bad("token-ids", "token ids not strictly ascending or past the vocabulary")
    if posting_rows.ndim != 1 or posting_weights.shape != posting_rows.shape:
        raise bad("posting-weights", "postings of different lengths")
    if (ptr.shape != (len(ids) + 1,) or ptr[0] != 0 or np.any(np.diff(ptr) <= 0)
            or int(ptr[-1]) != len(posting_rows)):
        raise bad("token-ptr", "pointers not increasing from 0 to the postings' length")
    if len(posting_rows) and int(posting_rows.max()) >= rows:
        raise bad("posting-rows", f"a row number past the shard's {rows} rows")
    heavy, columns = arrays["heavy-ids"], arrays["heavy-columns"]
    if heavy.ndim != 1 or columns.shape != (len(heavy), rows):
        raise bad("heavy-columns", f"shape {columns.shape}, expected {(len(heavy), rows)}")
    if len(heavy) and (np.any(heavy[1:] <= heavy[:-1]) or heavy[0] < 0 or int(heavy[-1]) >= manifest.vocab_size):
        raise bad("heavy-ids", "token ids not strictly ascending or past the vocabulary")
    if "dense-codes" not in arrays:
        return
    dim = manifest.dense_dim
    if arrays["dense-codes"].shape != (rows, dim):
        raise bad("dense-codes", f"shape {arrays['dense-codes'].shape}, expected {(rows, dim)}")
    # (Codes are not read here: any int8 code keeps the bounds true, and int32 sums cannot overflow.)
    frame = arrays["dense-frame"]
    if (frame.shape != (3, dim) or not np.all(np.isfinite(frame)) or not np.all(frame[1] > 0)
            or float(np.linalg.norm(frame[2].astype(np.float64))) > 1 + 2.0 ** -20):
        raise bad("dense-frame", f"shape {frame.shape} (expected {(3, dim)}), a step not finite and positive, "
                                 "or a direction longer than 1")
    row_bounds = arrays["dense-bounds"]
    if row_bounds.shape != (rows, 4) or not np.all(np.isfinite(row_bounds)) or np.any(row_bounds < 0):
        raise bad("dense-bounds", f"shape {row_bounds.shape} (expected {(rows, 4)}), or a norm not finite and >= 0")
    token_max = arrays["token-max"]
    if token_max.shape != ids.shape or not np.all(np.isfinite(token_max)) or np.any(token_max < 0):
        raise bad("token-max", f"shape {token_max.shape} (expected {ids.shape}), or a weight not finite and >= 0")


@dataclass
class OpenShard:
    """One shard of an opened generation: its Parquet handle, live rows and searchable vectors."""

    info: ShardInfo
    parquet: pq.ParquetFile
    vectors: ShardVectors
    built_in_memory: bool = False


class OpenIndex:
    """One committed generation, every file it needs already open: searches on it never see a writer.

    Use `OpenIndex.open(index_dir)`; `reopen()` gives the newest generation as a new object.
    """

    def __init__(self, index_dir: Path, manifest: Manifest, shards: list[OpenShard]):
        self.index_dir = index_dir
        self.manifest = manifest
        self.shards = shards
        self.starts = np.array([s.vectors.start for s in shards] + [sum(s.info.rows for s in shards)],
                               dtype=np.int64)  # [shards + 1]

    @classmethod
    def open(cls, index_dir: Path, manifest: Manifest | None = None, attempts: int = OPEN_ATTEMPTS) -> "OpenIndex":
        """Open the current generation; if a file it names vanishes meanwhile, open the newer generation."""
        manifest = manifest or read_manifest(index_dir)
        for attempt in range(attempts):
            try:
                return cls(index_dir, manifest, _open_shards(index_dir, manifest))
            except IndexFormatError:
                newer = read_manifest(index_dir)
                # The same generation: the damage is real. Another one: a writer moved on under us.
                if newer.generation == manifest.generation or attempt == attempts - 1:
                    raise
                manifest = newer
        raise AssertionError("unreachable")

    def reopen(self) -> "OpenIndex":
        """The newest committed generation (self when it has not changed); this object is left untouched."""
        newer = read_manifest(self.index_dir)
        if newer.generation == self.manifest.generation:
            return self
        return OpenIndex.open(self.index_dir, newer)

    @property
    def vectors(self) -> list[ShardVectors]:
        """Every shard's vectors, rows numbered through the whole index."""
        return [s.vectors for s in self.shards]

    def locations(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        """(shard number, row in shard) of rows numbered through the whole index."""
        shard_numbers = np.searchsorted(self.starts, rows, side="right") - 1
        return [(int(s), int(r - self.starts[s])) for s, r in zip(shard_numbers, rows)]

    def read_rows(self, rows: Sequence[int], column: str) -> list:
        """Values of one column at rows numbered through the index, through the open handles."""
        def handle(number: int) -> tuple[pq.ParquetFile, Path]:
            return self.shards[number].parquet, self.index_dir / self.shards[number].info.file

        return read_rows_through(handle, self.locations(rows), column)

    def read_arrow(self, column: str) -> pa.ChunkedArray | None:
        """One column of every row (deleted rows included), in row order, as Arrow: one chunk per shard, nulls
        for a shard written before the column existed; None when no shard has it."""
        kinds = [s.parquet.schema_arrow.field(column).type for s in self.shards
                 if column in s.parquet.schema_arrow.names]
        if not kinds:
            return None
        chunks = []
        for shard in self.shards:
            if column not in shard.parquet.schema_arrow.names:
                chunks.append(pa.nulls(shard.info.rows, kinds[0]))
                continue
            chunks.extend(self._shard_column(shard, column, kinds[0]).chunks)
        return pa.chunked_array(chunks, type=kinds[0])

    def read_column(self, column: str) -> np.ndarray:
        """One column of every row (deleted rows included), in row order, as an object array."""
        parts = [np.asarray(self._shard_column(shard, column).to_pylist(), dtype=object) for shard in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=object)

    def _shard_column(self, shard: OpenShard, column: str, kind: pa.DataType | None = None) -> pa.ChunkedArray:
        """One column of one shard through its open handle (cast to `kind`); a read or cast that fails is a damaged
        shard."""
        try:
            values = shard.parquet.read(columns=[column]).column(column)
            return values if kind is None else values.cast(kind)
        except (OSError, pa.ArrowException) as error:
            raise IndexFormatError(f"{self.index_dir / shard.info.file}: damaged shard ({error})") from error


def _check_untouched(index_dir: Path, shard: ShardInfo) -> None:
    """A shard whose mtime is not the one its search files were built with is checked against its SHA-256
    (once per state of the file, checked_files.py): search reads only a few columns of a few rows, so damage
    elsewhere would go unseen."""
    path = index_dir / shard.file
    try:
        info = os.lstat(path)
    except OSError as error:
        raise IndexFormatError(f"{path}: damaged or missing shard ({error.strerror})") from error
    checked, key = CheckedFiles.default(outside=index_dir), file_key(info, f"sha256={shard.sha256}")
    if info.st_mtime_ns == shard.mtime_ns or checked.known(key):
        return
    if file_sha256(path) != shard.sha256:
        raise IndexFormatError(f"{path}: damaged shard (SHA-256 differs from the manifest's)")
    checked.remember(key)


def _open_shards(index_dir: Path, manifest: Manifest) -> list[OpenShard]:
    opened, start = [], 0
    for shard in manifest.shards:
        parquet = open_shard(index_dir, shard)  # holds its file open: readable after a writer unlinks it
        _check_untouched(index_dir, shard)
        deleted = read_deleted_rows(index_dir, shard)
        live = None
        if shard.deleted_rows:
            live = np.ones(shard.rows, dtype=bool)
            live[deleted] = False
        vectors, in_memory = _open_vectors(index_dir, manifest, shard, parquet, start, live)
        opened.append(OpenShard(shard, parquet, vectors, in_memory))
        start += shard.rows
    return opened


def _open_vectors(index_dir: Path, manifest: Manifest, shard: ShardInfo, parquet: pq.ParquetFile, start: int,
                  live: np.ndarray | None) -> tuple[ShardVectors, bool]:
    """The shard's search files mapped and checked, or (files missing) its vectors built in memory."""
    records = {r.get("kind"): r for r in shard.search or [] if isinstance(r, dict)}
    # The base kinds, with or without all the pruning kinds (a shard written before they existed).
    if shard.search is not None and set(records) not in (set(BASE_SEARCH_KINDS), set(SEARCH_KINDS)):
        raise IndexFormatError(f"{index_dir}: damaged manifest (search files of {shard.file})")
    arrays = {}
    for kind in [k for k in SEARCH_KINDS if k in records] if shard.search is not None else ():
        array = _map_search_file(index_dir, records[kind])
        if array is None:
            if read_manifest(index_dir).generation != manifest.generation:
                # Removed by a writer's clean-up: OpenIndex.open retries on the newer generation.
                raise IndexFormatError(f"{index_dir / SEARCH_DIR / records[kind]['file']}: removed by a newer run")
            break
        arrays[kind] = array
    else:
        if shard.search is not None:
            _check_bounds(index_dir, manifest, shard, arrays)
            prune = {}
            if PRUNE_SEARCH_KINDS[0] in arrays:
                prune = dict(codes=arrays["dense-codes"], frame=arrays["dense-frame"],
                             row_bounds=arrays["dense-bounds"], token_max=arrays["token-max"])
            return ShardVectors(start, *(arrays[k] for k in BASE_SEARCH_KINDS), live=live, **prune), False
    # No search files (format version 1, or deleted by hand): built here, for this process only.
    path = index_dir / shard.file
    dense = np.concatenate([*iter_dense_groups(parquet, path, manifest.dense_dim)] or
                           [np.zeros((0, manifest.dense_dim), np.float16)])
    token_ids, token_ptr, rows, weights = invert_streaming(lambda: iter_sparse_groups(parquet, path),
                                                           manifest.vocab_size)
    heavy, columns = heavy_columns(token_ids, token_ptr, rows, weights, shard.rows)
    if dense.shape != (shard.rows, manifest.dense_dim):
        raise IndexFormatError(f"{path}: damaged shard (dense vectors of shape {dense.shape})")
    frame, codes, row_bounds = quantize_dense(dense)
    return ShardVectors(start, dense, token_ids, token_ptr, rows, weights, heavy, columns, live=live, codes=codes,
                        frame=frame, row_bounds=row_bounds, token_max=token_abs_max(token_ptr, weights)), True
