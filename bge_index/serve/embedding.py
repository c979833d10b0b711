"""POST /embed's work: texts in, the vectors `bge-index embed --index INDEX` prints out, encoded on the search worker.

The encoding is `bge-index embed`'s, piece by piece: the texts are taken
EMBED_BATCH_DOCUMENTS at a time, each group becomes `WindowRows` (one row a
document, truncated to the index's max length, no chunking) and is encoded in
`token_budget_batches` of EMBED_BATCH_TOKENS, exactly the forward passes
`model.batching.encode_documents` makes for the command with its defaults. So
a text's vectors are the command's bits for the same input, not just close:
a forward pass's padded shape can move a vector's last bits (kernel choice),
so the grouping must be the same, not merely similar.

It is done one step at a time (`EmbedWork.step`: a group's tokenisation, or
one forward pass) so that the search worker, which runs these steps between
its search batches with the same model instance, never holds a GET for more
than one pass. `embedding_record` is the record the command prints
(cli/embed.py's `_record_line`, kept identical: tests/test_serve_embed.py
compares the two byte for byte); `embed_answer_bound` bounds an answer's
bytes before any work, as answer_size.py does for searches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from bge_index.errors import NoColbertVectors
from bge_index.model.batching import WindowRows, token_budget_batches
from bge_index.store.manifest import Manifest
from bge_index.store.shard_writer import RowBatch

# `bge-index embed`'s defaults (cli/embed.py: EMBED_BATCH_DOCUMENTS, --batch-tokens, --max-length): the same
# groups and forward passes, hence the same bits. Change them together or the test comparing the two fails.
EMBED_BATCH_DOCUMENTS = 256
EMBED_BATCH_TOKENS = 16384
EMBED_MAX_LENGTH = 8192

# Bytes of JSON, at most, besides escaped characters (the serialized answer is checked against the limit too):
FLOAT_BYTES = 25  # a float16 value as Python prints it (`-1.2345678901234567e-05`: 23) and ", "
PAIR_BYTES = 40  # a sparse [token id, float32 weight] pair and ", "
RECORD_BYTES = 64  # a record's braces, field names, brackets and the ",\n" between records


def embed_max_length(manifest: Manifest) -> int:
    """Tokens per text: the index's max length, as `embed --index` takes it (at most its --max-length default)."""
    return min(EMBED_MAX_LENGTH, int(manifest.model.get("max_length", EMBED_MAX_LENGTH)))


def check_colbert(manifest: Manifest, index_dir) -> None:
    """Refuse ColBERT vectors from an index that stores none (NoColbertVectors, a 400): its vectors are what
    /embed gives, and it has no ColBERT vectors to match."""
    if not manifest.has_colbert:
        raise NoColbertVectors(f"{index_dir} has no ColBERT vectors (it was built without --colbert): ask "
                               "without colbert, or rebuild the index with --colbert")


def embedding_record(rows: RowBatch, i: int, colbert: bool) -> dict:
    """Row `i`'s record as `bge-index embed` prints it: id, dense and ColBERT through float16 (as shards store
    them), sparse as [token id, weight] pairs, ids ascending."""
    ids, weights = rows.sparse[i]
    record = {"id": rows.ids[i],
              "dense": rows.dense[i].astype(np.float16).astype(np.float32).tolist(),
              "sparse": [[int(t), float(w)] for t, w in zip(ids.tolist(), weights.tolist())]}
    if colbert and rows.colbert is not None:
        record["colbert"] = rows.colbert[i].astype(np.float16).astype(np.float32).tolist()
    return record


def embeddings_json(encoded: Sequence[tuple[RowBatch, int]], colbert: bool) -> str:
    """The answer to POST /embed: a JSON list of the records, in input order, each serialized as the command
    prints its line (so the lines between the brackets are the command's, a comma after each but the last)."""
    lines = [json.dumps(embedding_record(rows, i, colbert), ensure_ascii=False) for rows, i in encoded]
    return "[\n" + ",\n".join(lines) + "\n]\n"


def embed_answer_bound(ids: Sequence[str], texts: Sequence[str], colbert: bool, dense_dim: int, colbert_dim: int,
                       max_length: int) -> int:
    """The most bytes the answer to embedding `texts` can take, but for escaped characters in the ids.

    A text's tokens are bounded by its max length and by twice its UTF-8 bytes (a character is at most a
    word-start piece and itself); a text has at most that many sparse pairs and one ColBERT vector fewer."""
    total = 0
    for doc_id, text in zip(ids, texts):
        tokens = min(max_length, 2 * len(text.encode("utf-8", "surrogatepass")) + 2)
        total += RECORD_BYTES + len(doc_id.encode("utf-8", "surrogatepass")) + dense_dim * FLOAT_BYTES
        total += tokens * PAIR_BYTES
        if colbert:
            total += (tokens - 1) * (4 + colbert_dim * FLOAT_BYTES)
    return total


class EmbedWork:
    """One POST /embed's encoding, done a step at a time on the search worker (see the module docstring)."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], colbert: bool):
        self.ids, self.texts, self.colbert = list(ids), list(texts), colbert
        self._next_group = 0  # position of the first text of the next group
        self._rows: WindowRows | None = None  # the group being encoded
        self._passes: list[list[int]] = []  # its forward passes not yet made (row numbers)
        self._max_length: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def done(self) -> bool:
        """Whether every text is encoded."""
        return self._rows is None and self._next_group >= len(self.ids)

    def step(self, encoder, manifest: Manifest, index_dir=None) -> list[tuple[RowBatch, int]]:
        """Do the next step with `encoder` (the served model) for the generation `manifest` describes: start a
        group (tokenise it), or make one forward pass. Gives the (rows, row number) of the texts a step
        finished, in input order: a group's, after its last pass; else none. NoColbertVectors (before any
        work) when ColBERT vectors are asked of an index without them."""
        if self._max_length is None:  # the first step: all of a request is encoded for one generation
            if self.colbert:
                check_colbert(manifest, index_dir)
            self._max_length = embed_max_length(manifest)
        if self._rows is None:
            start, end = self._next_group, self._next_group + EMBED_BATCH_DOCUMENTS
            self._next_group = end
            self._rows = WindowRows(encoder, self.ids[start:end], self.texts[start:end], [""] * len(self.ids[start:end]),
                                    colbert=self.colbert, store_text=False, max_length=self._max_length,
                                    chunking=None)
            self._passes = token_budget_batches(self._rows.lengths, EMBED_BATCH_TOKENS)
            return []
        rows = self._rows
        batch = self._passes.pop(0)
        rows.place(batch, encoder.encode_ids([rows.token_ids[i] for i in batch], colbert=self.colbert))
        if self._passes:
            return []
        self._rows = None
        finished, _ = rows.complete_documents(np.ones(len(rows.lengths), dtype=bool))
        return [(finished, i) for i in range(len(finished))]
