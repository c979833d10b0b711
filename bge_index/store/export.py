"""`export parquet`: an index's live rows as one plain Parquet table, for anyone who wants no manifest at all.

Columns: the shards' own (`id`, the chunk columns when chunked, `text` when stored, `source`, `source_line`),
and with `vectors` also `dense`, `sparse` (and `colbert`). Deleted rows are left out; rows of a shard written
before sources were recorded get null sources. Memory stays at one row group.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_index.errors import IndexFormatError, OutputError
from bge_index.store.manifest import VECTOR_COLUMNS, Manifest, manifest_schema
from bge_index.store.shard_reader import has_sources, live_mask, open_shard


def export_parquet(index_dir: Path, manifest: Manifest, out: Path, vectors: bool = False) -> int:
    """Write the live rows to `out` (replaced atomically); the number of rows written."""
    full = manifest_schema(manifest)
    names = [n for n in full.names if vectors or n not in VECTOR_COLUMNS]
    schema = pa.schema([full.field(n) for n in names])
    temporary = out.with_name(f".{out.name}.tmp")
    rows = 0
    try:
        temporary.unlink(missing_ok=True)
        with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
            for shard in manifest.shards:
                mask = live_mask(index_dir, shard)
                columns = [n for n in names if has_sources(index_dir, shard) or n not in ("source", "source_line")]
                start = 0
                try:
                    for batch in open_shard(index_dir, shard).iter_batches(columns=columns):
                        keep = mask[start:start + batch.num_rows]
                        start += batch.num_rows
                        if keep.any():
                            table = pa.Table.from_batches([batch]).filter(pa.array(keep))
                            for field in schema:
                                if field.name not in table.column_names:
                                    table = table.append_column(field, pa.nulls(table.num_rows, field.type))
                            writer.write_table(table.select(names).cast(schema))
                            rows += int(np.count_nonzero(keep))
                except pa.ArrowException as error:
                    raise IndexFormatError(f"{index_dir / shard.file}: damaged shard ({error})") from error
        os.replace(temporary, out)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write it ({error.strerror or error})") from error
    return rows
