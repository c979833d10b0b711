"""How big an answer can get, known before any search: a generation's longest id and text, and the bound they give.

A hit carries its document's text, so k alone does not bound an answer: 20
queries of k 20 over 1 MB documents are a 400 MB answer. `TextSizes.of`
reads the longest id, text and document id of a generation's shards (the
byte lengths of those columns, a few rows at a time; remembered per shard
file and checksum, since shards never change, so a new generation reads only
its new shards), and `answer_bound` turns them into what an answer to a
request can weigh at most: per query its text and id, per hit (at most k,
at most the index's rows) the longest id and text plus the JSON around
them. The HTTP side refuses (413) a request whose bound is past
Limits.max_answer_bytes before queueing it, and checks the JSON it built
against the same limit (escaped characters can make it longer than the
bound).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bge_index.errors import IndexFormatError
from bge_index.search.query import Query, SearchRequest
from bge_index.store.manifest import Manifest

# Bytes of one hit's JSON besides its id, text and tokens (indentation, rank, scores, field names), rounded up.
HIT_OVERHEAD = 320
QUERY_OVERHEAD = 160  # one query's object around its hits: query_id, query, mode, brackets
EXPLAINED_TOKENS = 8  # tokens listed per hit with explain
TOKEN_BYTES = 128  # one listed token's JSON: the token (a vocabulary entry) and its contribution
_READ_ROWS = 256  # rows decoded at a time while measuring

_known: dict[tuple[str, str], tuple[int, int, int]] = {}  # (shard file, sha256) -> longest id, text, doc_id
_known_lock = threading.Lock()


@dataclass(frozen=True)
class TextSizes:
    """A generation's longest values in bytes (UTF-8), and how many rows it has live."""

    longest_id: int = 0
    longest_text: int = 0
    longest_doc_id: int = 0
    rows: int = 0

    @classmethod
    def of(cls, index_dir: Path, manifest: Manifest) -> "TextSizes":
        """Measure the generation `manifest` describes (an IndexFormatError when a shard cannot be read)."""
        longest = [0, 0, 0]
        for shard in manifest.shards:
            key = (shard.file, shard.sha256)
            with _known_lock:
                sizes = _known.get(key)
            if sizes is None:
                sizes = _measure(index_dir / shard.file, manifest)
                with _known_lock:
                    _known[key] = sizes
            longest = [max(a, b) for a, b in zip(longest, sizes)]
        return cls(*longest, rows=manifest.documents)


def _measure(path: Path, manifest: Manifest) -> tuple[int, int, int]:
    columns = ["id"] + (["text"] if manifest.store_text else []) + (["doc_id"] if manifest.chunking else [])
    longest = dict.fromkeys(columns, 0)
    try:
        parquet = pq.ParquetFile(path)  # read with pread: a file cut short is an error here, never a SIGBUS
        for batch in parquet.iter_batches(batch_size=_READ_ROWS, columns=columns):
            for name in columns:
                most = pc.max(pc.binary_length(batch.column(name))).as_py()
                longest[name] = max(longest[name], most or 0)
    except (OSError, pa.ArrowException) as error:
        raise IndexFormatError(f"{path}: damaged shard ({error})") from error
    return longest["id"], longest.get("text", 0), longest.get("doc_id", 0)


def answer_bound(queries: Sequence[Query], request: SearchRequest, sizes: TextSizes) -> int:
    """The most bytes the JSON answer to `queries` under `request` can take, but for escaped characters."""
    hits = min(request.k, sizes.rows)
    per_hit = HIT_OVERHEAD + 2 * max(sizes.longest_id, sizes.longest_doc_id)  # id, and the passage when grouped
    if request.with_text:
        per_hit += sizes.longest_text
    if request.explain:
        per_hit += EXPLAINED_TOKENS * TOKEN_BYTES
    asked = sum(len(q.text.encode("utf-8", "surrogatepass")) + len(q.id.encode("utf-8", "surrogatepass"))
                for q in queries)
    return len(queries) * (QUERY_OVERHEAD + hits * per_hit) + asked
