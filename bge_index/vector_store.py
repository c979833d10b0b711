"""Search structures stored beside the shards, built once and memory-mapped.

For every shard `shard-G-N.parquet` (immutable) there are four `.npy` files:

    shard-G-N.dense.npy            [rows, D] float16   the dense vectors, raw, for scanning
    shard-G-N.token-ptr.npy        [vocab + 1] int64   postings of token t: [ptr[t], ptr[t + 1])
    shard-G-N.posting-rows.npy     [nnz] uint32        rows holding the token, ascending
    shard-G-N.posting-weights.npy  [nnz] float32       their weights for that token

that is, the sparse vectors turned into an inverted index, plus

    shard-G-N.heavy-ids.npy        [h] int64           tokens present in at least half the rows
    shard-G-N.heavy-columns.npy    [h, rows] float32   their weights as dense columns (0 where absent)

(for such tokens a dense column is smaller than the postings, and adding it
is a streaming vector add instead of a scatter), and `shard-G-N.stamp.npy`
([size, mtime_ns] of the shard when they were built).
Because shards never change, these files never go stale: a shard without them gets them at
its first search (or right after the index run that wrote it), and the index
writer deletes them with their shard. Opening an index memory-maps them, so
it costs milliseconds and the operating system shares the pages between
processes. Each file is written to a temporary name and renamed, so two
searches building the same file at once are harmless. A shard whose size or
mtime no longer matches its stamp has been touched: it is checked against the
manifest's SHA-256 before it is searched again, so a damaged shard is named,
not silently searched through stale files.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bge_index.errors import IndexFormatError
from bge_index.manifest import Manifest, ShardInfo, file_sha256
from bge_index.shard_reader import iter_shard_dense, iter_shard_sparse, live_mask

DERIVED_SUFFIXES = ("dense", "token-ptr", "posting-rows", "posting-weights", "heavy-ids", "heavy-columns")
HEAVY_DENSITY = 0.5  # a token in at least this fraction of a shard's rows also gets a dense column


@dataclass
class ShardVectors:
    """One shard's searchable vectors; rows are numbered from `start` in the whole index."""

    start: int
    dense: np.ndarray  # [rows, D] float16
    token_ptr: np.ndarray  # [vocab + 1] int64
    posting_rows: np.ndarray  # [nnz] uint32
    posting_weights: np.ndarray  # [nnz] float32
    heavy_ids: np.ndarray | None = None  # [h] int64, ascending
    heavy_columns: np.ndarray | None = None  # [h, rows] float32
    live: np.ndarray | None = None  # [rows] bool; None when no row is deleted

    def heavy_column(self, token: int) -> np.ndarray | None:
        """[rows] float32 weights of a token common enough to be stored densely, else None."""
        if self.heavy_ids is None or len(self.heavy_ids) == 0:
            return None
        at = int(np.searchsorted(self.heavy_ids, token))
        if at < len(self.heavy_ids) and self.heavy_ids[at] == token:
            return self.heavy_columns[at]
        return None

    @property
    def rows(self) -> int:
        """Rows in the shard, deleted ones included."""
        return self.dense.shape[0]

    def postings(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows ascending, weights) of one token; empty for tokens past the vocabulary."""
        if token + 1 >= len(self.token_ptr):
            return self.posting_rows[:0], self.posting_weights[:0]
        start, end = self.token_ptr[token], self.token_ptr[token + 1]
        return self.posting_rows[start:end], self.posting_weights[start:end]


def invert(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, vocab_size: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows (doc -> tokens) to postings (token -> docs): (token_ptr, rows, weights)."""
    rows_of_entries = np.repeat(np.arange(len(indptr) - 1, dtype=np.uint32), np.diff(indptr))  # [nnz]
    # A stable sort keeps rows ascending within each token.
    order = np.argsort(indices, kind="stable")
    counts = np.bincount(indices, minlength=vocab_size)[:vocab_size] if len(indices) else np.zeros(vocab_size, np.int64)
    token_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return token_ptr, rows_of_entries[order], values[order].astype(np.float32)


def heavy_columns(token_ptr: np.ndarray, rows: np.ndarray, weights: np.ndarray, n_rows: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens in at least HEAVY_DENSITY of the rows, and their weights as dense [h, rows] columns."""
    counts = np.diff(token_ptr)
    heavy = np.flatnonzero(counts >= max(1, HEAVY_DENSITY * n_rows)).astype(np.int64)
    columns = np.zeros((len(heavy), n_rows), dtype=np.float32)
    for slot, token in enumerate(heavy.tolist()):
        start, end = token_ptr[token], token_ptr[token + 1]
        columns[slot, rows[start:end]] = weights[start:end]
    return heavy, columns


def shard_vectors_from_csr(dense: np.ndarray, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                           vocab_size: int, start: int = 0, live: np.ndarray | None = None) -> ShardVectors:
    """A shard's searchable vectors built in memory from its rows (what the search files hold, without files).

    dense [rows, D] float16; sparse as CSR: indptr [rows + 1], indices [nnz] uint32 token ids, values [nnz] float32.
    """
    token_ptr, rows, weights = invert(indptr, indices, values, vocab_size)
    heavy, columns = heavy_columns(token_ptr, rows, weights, dense.shape[0])
    return ShardVectors(start, dense, token_ptr, rows, weights, heavy, columns, live=live)


def derived_path(index_dir: Path, shard_file: str, suffix: str) -> Path:
    """The search file `shard-G-N.<suffix>.npy` of a shard, beside it."""
    return index_dir / f"{shard_file.removesuffix('.parquet')}.{suffix}.npy"


def _save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            np.save(stream, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shard_stamp(index_dir: Path, shard: ShardInfo) -> np.ndarray:
    stat = (index_dir / shard.file).stat()
    return np.array([stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def build_shard_files(index_dir: Path, manifest: Manifest, shard: ShardInfo) -> None:
    """Write the search files of one shard from its Parquet columns, then its stamp.

    Memory stays near the size of the posting arrays (8 bytes per stored token): the dense matrix is
    copied a row group at a time, and the postings are filled a row group at a time (counting sort).
    """
    stamp = _shard_stamp(index_dir, shard)
    _save_rows(derived_path(index_dir, shard.file, "dense"), (shard.rows, manifest.dense_dim), np.float16,
               iter_shard_dense(index_dir, manifest, shard))
    token_ptr, rows, weights = invert_streaming(lambda: iter_shard_sparse(index_dir, shard), manifest.vocab_size)
    heavy, columns = heavy_columns(token_ptr, rows, weights, shard.rows)
    for suffix, array in zip(DERIVED_SUFFIXES[1:], (token_ptr, rows, weights, heavy, columns)):
        _save(derived_path(index_dir, shard.file, suffix), array)
    _save(derived_path(index_dir, shard.file, "stamp"), stamp)


def invert_streaming(groups, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Postings (token_ptr, rows, weights) from CSR row groups read twice: once to count, once to fill.

    `groups()` yields (indptr, ids, weights) per row group, in row order. Entries of a token land in
    row order (stable sort inside a group, groups in order), as `invert` gives them.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for _indptr, indices, _values in groups():
        counts += np.bincount(indices, minlength=vocab_size)[:vocab_size]
    token_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = np.empty(int(token_ptr[-1]), dtype=np.uint32)
    weights = np.empty(int(token_ptr[-1]), dtype=np.float32)
    cursor = token_ptr[:-1].copy()  # next free slot of each token
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
    return token_ptr, rows, weights


def _save_rows(path: Path, shape: tuple[int, int], dtype, blocks) -> None:
    """Write an .npy file of `shape` from consecutive row blocks, never holding more than one block."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            np.lib.format.write_array_header_1_0(
                stream, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                         "shape": shape})
            written = 0
            for block in blocks:
                stream.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
                written += len(block)
        if written != shape[0]:
            raise IndexFormatError(f"{path}: its shard gave {written} rows, the manifest says {shape[0]}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_untouched(index_dir: Path, shard: ShardInfo) -> None:
    """A shard changed since its search files were built is verified against the manifest's checksum."""
    path = index_dir / shard.file
    try:
        stamp = _shard_stamp(index_dir, shard)
    except OSError as error:
        raise IndexFormatError(f"{path}: damaged or missing shard ({error.strerror})") from error
    if stamp[0] != shard.bytes:
        raise IndexFormatError(f"{path}: damaged shard ({stamp[0]} bytes, manifest says {shard.bytes})")
    stamp_path = derived_path(index_dir, shard.file, "stamp")
    if np.array_equal(np.load(stamp_path), stamp):
        return
    if file_sha256(path) != shard.sha256:
        raise IndexFormatError(f"{path}: damaged shard (SHA-256 differs from the manifest's)")
    _save(stamp_path, stamp)  # only touched: the content is the manifest's


def ensure_search_files(index_dir: Path, manifest: Manifest) -> int:
    """Build the search files of shards that lack them; returns how many shards were built."""
    built = 0
    for shard in manifest.shards:
        if not all(derived_path(index_dir, shard.file, s).exists() for s in (*DERIVED_SUFFIXES, "stamp")):
            build_shard_files(index_dir, manifest, shard)
            built += 1
    return built


def open_store(index_dir: Path, manifest: Manifest) -> list[ShardVectors]:
    """Memory-map every shard's search files (building missing ones first)."""
    ensure_search_files(index_dir, manifest)
    shards, start = [], 0
    for shard in manifest.shards:
        _check_untouched(index_dir, shard)
        try:
            # mode "c" (copy-on-write) gives writable arrays without ever touching the files.
            arrays = [np.load(derived_path(index_dir, shard.file, s), mmap_mode="c") for s in DERIVED_SUFFIXES]
        except (OSError, ValueError) as error:
            raise IndexFormatError(f"search files of {index_dir / shard.file} are unreadable ({error}); "
                                   "delete them and they will be rebuilt") from error
        if arrays[0].shape != (shard.rows, manifest.dense_dim):
            raise IndexFormatError(f"{derived_path(index_dir, shard.file, 'dense')}: does not match its shard "
                                   f"(shape {arrays[0].shape}); delete it and it will be rebuilt")
        live = live_mask(index_dir, shard) if shard.deleted_rows else None
        shards.append(ShardVectors(start, *arrays, live=live))
        start += shard.rows
    return shards
