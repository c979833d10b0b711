"""Finding stored documents by id: which live rows of which shards hold them, and their stored columns.

    >>> rows = find_rows(index_dir, read_manifest(index_dir), ["a", "b"])   # doctest: +SKIP
    >>> rows["a"]                                                              # doctest: +SKIP
    [(0, 17)]                        # shard number 0, row 17 (passages of a chunked document: several)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from bge_index.store.manifest import CHUNK_COLUMNS, SOURCE_COLUMNS, Manifest, manifest_schema
from bge_index.store.shard_reader import has_sources, live_mask, read_rows, read_shard_column

# Columns a stored document is shown with (vectors are not: `export` is for them), in this order.
DOCUMENT_COLUMNS = ("id", *CHUNK_COLUMNS, "text", "source", "source_line", "metadata")


def find_rows(index_dir: Path, manifest: Manifest, ids: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
    """(shard number, row) of the live rows of each id asked for (a chunked index: its passages, in order).

    An id the index does not hold maps to an empty list. The id column of every shard is read (ids are not
    sorted in a shard), the rest only for the rows found.
    """
    wanted = {doc_id: [] for doc_id in ids}
    id_column = "doc_id" if manifest.chunking else "id"
    for number, shard in enumerate(manifest.shards):
        shard_ids = read_shard_column(index_dir, shard, id_column)
        mask = live_mask(index_dir, shard)
        for row in np.flatnonzero(mask).tolist():
            found = wanted.get(shard_ids[row])
            if found is not None:
                found.append((number, row))
    return wanted


def stored_documents(index_dir: Path, manifest: Manifest, ids: Iterable[str]) -> tuple[list[dict], list[str]]:
    """The stored rows of `ids` as dicts of their columns (DOCUMENT_COLUMNS the shards have), and the ids missing.

    Rows come in the order the ids were asked for; a chunked document's passages in chunk order.
    """
    located = find_rows(index_dir, manifest, ids)
    locations = [location for rows in located.values() for location in rows]
    schema_names = set(manifest_schema(manifest).names)
    if not all(has_sources(index_dir, manifest.shards[number]) for number in {n for n, _ in locations}):
        schema_names -= set(SOURCE_COLUMNS)  # a shard written before rows recorded their source and metadata
    columns = [c for c in DOCUMENT_COLUMNS if c in schema_names]
    values = {column: read_rows(index_dir, manifest, locations, column) for column in columns}
    records = [{column: values[column][i] for column in columns} for i in range(len(locations))]
    for record in records:  # Arrow gives a map as (key, value) pairs: JSON wants an object
        if isinstance(record.get("metadata"), list):
            record["metadata"] = dict(record["metadata"])
    if manifest.chunking:
        records.sort(key=lambda r: (list(located).index(r["doc_id"]), r["chunk"]))
    return records, [doc_id for doc_id, rows in located.items() if not rows]
