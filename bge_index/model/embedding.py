"""Embedding texts for output: the records `bge-index embed` prints and POST /embed answers, and how they are made.

The command (cli/embed.py) and the server (serve/embedding.py) both encode
through this module, so the same texts give the same bits, not merely close
ones: a forward pass's padded shape can move a vector's last bits (kernel
choice), so the grouping must be the same. Texts are taken
EMBED_BATCH_DOCUMENTS at a time (`document_groups`); a group becomes an
`EmbeddingGroup`: one row a text, truncated to the max length, no chunking,
encoded in `token_budget_batches` of the token budget, one forward pass a
`step` (the server takes turns with its searches between steps; the command
runs them all with `encode`).

`embedding_record` is one row's record: its id, the dense vector, the sparse
vector as [token id, weight] pairs (ids ascending) and, when asked, the
ColBERT vectors, dense and ColBERT through float16 as shards store them;
`embedding_json` is that record as one line of JSON:

    >>> import numpy as np
    >>> from bge_index.store.shard_writer import RowBatch
    >>> rows = RowBatch(ids=["d1"], content_hashes=[""], texts=None, dense=np.array([[0.6, 0.8]]),
    ...                 sparse=[(np.array([6, 4865], dtype=np.uint32), np.array([0.25, 0.5], dtype=np.float32))])
    >>> embedding_json(rows, 0, colbert=False)
    '{"id": "d1", "dense": [0.60009765625, 0.7998046875], "sparse": [[6, 0.25], [4865, 0.5]]}'
    >>> [len(group) for group in document_groups(iter(range(600)))]
    [256, 256, 88]

numpy only: the encoder is passed in (as model.batching takes it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

import numpy as np

from bge_index.errors import NoColbertVectors
from bge_index.model.batching import WindowRows, token_budget_batches
from bge_index.store.manifest import Manifest
from bge_index.store.shard_writer import RowBatch

# The defaults of `bge-index embed` (EMBED_BATCH_DOCUMENTS, --batch-tokens, --max-length), and what POST /embed
# always uses: the same groups and forward passes, hence the same bits.
EMBED_BATCH_DOCUMENTS = 256  # texts encoded (and held) at a time
EMBED_BATCH_TOKENS = 16384  # padded tokens per forward pass
EMBED_MAX_LENGTH = 8192  # tokens per text

T = TypeVar("T")


def document_groups(items: Iterable[T], size: int = EMBED_BATCH_DOCUMENTS) -> Iterator[list[T]]:
    """`items` in groups of `size` (the last may be shorter), read as they are needed."""
    items = iter(items)
    while group := list(islice(items, size)):
        yield group


def index_max_length(manifest: Manifest, requested: int = EMBED_MAX_LENGTH) -> int:
    """Tokens per text for an index's vectors: its max length, at most `requested`."""
    return min(requested, int(manifest.model.get("max_length", requested)))


def check_colbert(manifest: Manifest, index_dir, hint: str) -> None:
    """NoColbertVectors when ColBERT vectors are asked of an index that stores none (its vectors are what come
    out, and it has none to match). `hint` says how to ask instead ("leave out --colbert")."""
    if not manifest.has_colbert:
        raise NoColbertVectors(f"{index_dir} has no ColBERT vectors (it was built without --colbert): {hint}, "
                               "or rebuild the index with --colbert")


class EmbeddingGroup:
    """One group of texts, tokenised (one row a text, no chunking) and encoded a forward pass at a time."""

    def __init__(self, encoder, ids: Sequence[str], texts: Sequence[str], *, colbert: bool, max_length: int,
                 batch_tokens: int = EMBED_BATCH_TOKENS):
        self.colbert = colbert
        self.rows = WindowRows(encoder, list(ids), list(texts), [""] * len(ids), colbert=colbert, store_text=False,
                               max_length=max_length, chunking=None)
        self.passes = token_budget_batches(self.rows.lengths, batch_tokens)  # forward passes not yet made

    @property
    def done(self) -> bool:
        """Whether every forward pass is made."""
        return not self.passes

    def step(self, encoder) -> None:
        """Make the next forward pass."""
        batch = self.passes.pop(0)
        self.rows.place(batch, encoder.encode_ids([self.rows.token_ids[i] for i in batch], colbert=self.colbert))

    def encode(self, encoder) -> RowBatch | None:
        """Make the passes left; the group's rows, in input order (None for an empty group)."""
        while not self.done:
            self.step(encoder)
        return self.finished()

    def finished(self) -> RowBatch | None:
        """The rows, in input order, once `done` (None for an empty group)."""
        rows, _ = self.rows.complete_documents(np.ones(len(self.rows.token_ids), dtype=bool))
        return rows


def embedding_record(rows: RowBatch, i: int, colbert: bool) -> dict:
    """Row `i`'s record: id, dense and (with `colbert`, when encoded) ColBERT through float16 (as shards store
    them), sparse as [token id, weight] pairs, ids ascending."""
    ids, weights = rows.sparse[i]
    record = {"id": rows.ids[i],
              "dense": rows.dense[i].astype(np.float16).astype(np.float32).tolist(),
              "sparse": [[int(t), float(w)] for t, w in zip(ids.tolist(), weights.tolist())]}
    if colbert and rows.colbert is not None:
        record["colbert"] = rows.colbert[i].astype(np.float16).astype(np.float32).tolist()
    return record


def embedding_json(rows: RowBatch, i: int, colbert: bool) -> str:
    """Row `i`'s record as one line of JSON (no newline), characters unescaped: `embed`'s line, /embed's item."""
    return json.dumps(embedding_record(rows, i, colbert), ensure_ascii=False)
