"""What the files of an index folder are called: cheap constants and name tests, no pyarrow.

Everything that must recognise an index folder or its files imports these
(the lock, the input side that never reads an index as input, the writer and
the readers), so a name is defined once:

    >>> shard_file_name(3, 7)
    'shard-000003-00007.parquet'
    >>> is_index_data_file("shard-000003-00007.deleted-000004.npy")
    True
"""

from __future__ import annotations

import re
from pathlib import Path

FORMAT_NAME = "bge-index"  # the manifest's "format", written as its first key
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
SEARCH_DIR = "search"
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})-(\d{5,})\.parquet$")
DELETED_PATTERN = re.compile(r"^shard-(\d{6,})-(\d{5,})\.deleted-(\d{6,})\.npy$")
# The live-row view for other tools: every deleted (shard file name, row position) of a generation, as Parquet
# (Iceberg's position deletes, by file name). One per generation, named in its manifest.
DELETES_PATTERN = re.compile(r"^deletes-(\d{6,})\.parquet$")
# Files of the previous generation that the current one no longer names (merged-away shards, superseded deletion
# sets) wait here for one generation, out of the documented globs, for readers that opened the previous one.
RETIRED_DIR = "retired"
# A search file as the manifest names it, relative to INDEX_DIR/search/ (vector_store.py): kept exactly as long
# as its shard.
SEARCH_FILE_PATTERN = re.compile(r"^shard-\d{6,}-\d{5,}\.[a-z-]+\.npy$")
# Every shard's search files: the base kinds (any format 2 index has them) and the pruning kinds (a quantized copy of
# the dense matrix with per-row error bounds, per-token maximum weights) that rank-safe pruning reads. A shard
# written before the pruning kinds existed has the base kinds only and is searched by full scans.
BASE_SEARCH_KINDS = ("dense", "token-ids", "token-ptr", "posting-rows", "posting-weights", "heavy-ids",
                     "heavy-columns")
PRUNE_SEARCH_KINDS = ("dense-codes", "dense-frame", "dense-bounds", "token-max")
SEARCH_KINDS = BASE_SEARCH_KINDS + PRUNE_SEARCH_KINDS
# Format version 1 kept search files beside the shards, with a stamp file; a version 2 reader ignores those.
DERIVED_PATTERN = re.compile(r"^(shard-\d{6,}-\d{5,})\.(dense|token-ptr|posting-rows|posting-weights|heavy-ids|heavy-columns|stamp)\.npy$")


def shard_file_name(generation: int, number: int) -> str:
    """`shard-GGGGGG-NNNNN.parquet`: shard `number` of generation `generation`."""
    return f"shard-{generation:06d}-{number:05d}.parquet"


def deletes_file_name(generation: int) -> str:
    """`deletes-GGGGGG.parquet`: the deleted rows of generation `generation`, for other tools."""
    return f"deletes-{generation:06d}.parquet"


def is_index_data_file(name: str) -> bool:
    """Shards, deletion sets, their search files (the search/ folder; format 1's beside the shards), the deletes
    files, the retired/ folder and temporary files: what writers and readers leave here."""
    return bool(SHARD_PATTERN.match(name) or DELETED_PATTERN.match(name) or DERIVED_PATTERN.match(name)
                or DELETES_PATTERN.match(name) or name in (SEARCH_DIR, RETIRED_DIR)
                or (name.startswith(".") and name.endswith(".tmp")))


def is_index(index_dir: Path) -> bool:
    """Whether `index_dir` holds a manifest.json (its content is not checked)."""
    return (index_dir / MANIFEST_FILE).is_file()
