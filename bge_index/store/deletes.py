"""The deletes file: every deleted row of a generation as plain Parquet, so other tools see the live rows.

Our own readers use each shard's deletion set (`shard-G-N.deleted-H.npy`, memory-mapped with its search
files). SQL engines and dataframes read Parquet: each commit also writes `deletes-GGGGGG.parquet`, one row per
deleted (shard file name, row position), the layout of Iceberg's position deletes with the file named by its
name. With the live shards matched by `INDEX/shard-*.parquet` (retired ones wait in INDEX/retired/), the live
rows are one anti-join away:

    SELECT * EXCLUDE (filename, file_row_number)
    FROM read_parquet('INDEX/shard-*.parquet', filename = true, file_row_number = true) AS s
    ANTI JOIN read_parquet('INDEX/deletes-*.parquet') AS d
      ON parse_filename(s.filename) = d.shard AND s.file_row_number = d.pos
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_index.store.files import file_sha256, fsync_dir
from bge_index.store.manifest import Manifest
from bge_index.store.names import deletes_file_name
from bge_index.store.shard_reader import read_deleted_rows

DELETES_SCHEMA = pa.schema([pa.field("shard", pa.string(), nullable=False),
                            pa.field("pos", pa.int64(), nullable=False)],
                           metadata={"bge_index_deletes_version": "1"})


def write_deletes_file(index_dir: Path, manifest: Manifest) -> dict:
    """Write the deletes file of `manifest`'s generation (before its manifest names it); its manifest record.

    Written to a temporary name, fsynced, renamed: a crash leaves no half file under the real name. Always
    written, empty when nothing is deleted, so the documented glob never matches nothing.
    """
    name = deletes_file_name(manifest.generation)
    final = index_dir / name
    temporary = index_dir / f".{name}.tmp"
    rows = 0
    temporary.unlink(missing_ok=True)  # a crashed run's leftover (or a planted link: unlinked, not followed)
    with pq.ParquetWriter(temporary, DELETES_SCHEMA, compression="zstd", use_dictionary=["shard"]) as writer:
        for shard in manifest.shards:
            deleted = read_deleted_rows(index_dir, shard)
            if len(deleted):
                writer.write_table(pa.table({"shard": pa.array([shard.file] * len(deleted), pa.string()),
                                             "pos": pa.array(deleted.astype(np.int64))}, schema=DELETES_SCHEMA))
                rows += len(deleted)
    with open(temporary, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(temporary, final)
    fsync_dir(index_dir)
    return {"file": name, "rows": rows, "bytes": final.stat().st_size, "sha256": file_sha256(final)}


def read_deletes_file(index_dir: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """{shard file name: sorted deleted positions} from the generation's deletes file (verify compares it)."""
    if not manifest.deletes:
        return {}
    table = pq.read_table(index_dir / manifest.deletes["file"])
    result: dict[str, list[int]] = {}
    for shard, pos in zip(table.column("shard").to_pylist(), table.column("pos").to_pylist()):
        result.setdefault(shard, []).append(pos)
    return {shard: np.sort(np.asarray(rows, dtype=np.int64)) for shard, rows in result.items()}


def deletes_problem(index_dir: Path, manifest: Manifest) -> str | None:
    """Why the generation's deletes file is not the one its manifest names, or does not list exactly the
    deletion sets' rows; None when it is sound."""
    record = manifest.deletes or {}
    path = index_dir / str(record.get("file"))
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return f"{path}: damaged deletes file (not a regular file)"
        if info.st_size != record.get("bytes") or file_sha256(path) != record.get("sha256"):
            return f"{path}: damaged deletes file (size or SHA-256 differs from the manifest's)"
        listed = read_deletes_file(index_dir, manifest)
    except (OSError, pa.ArrowException) as error:
        return f"{path}: damaged or missing deletes file ({error})"
    for shard in manifest.shards:
        deleted = read_deleted_rows(index_dir, shard).astype(np.int64)
        if not np.array_equal(listed.pop(shard.file, np.zeros(0, dtype=np.int64)), deleted):
            return f"{path}: damaged deletes file (the rows of {shard.file} differ from its deletion set)"
    if listed:
        return f"{path}: damaged deletes file (names {sorted(listed)[0]}, not a shard of this generation)"
    return None
