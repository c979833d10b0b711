"""POST /embed's work: texts in, the vectors `bge-index embed --index INDEX` prints out, encoded on the search worker.

The encoding is `bge-index embed`'s, through the same code (model/embedding.py):
the texts are taken EMBED_BATCH_DOCUMENTS at a time, each group an
`EmbeddingGroup` (one row a text, truncated to the index's max length, no
chunking) encoded in forward passes of EMBED_BATCH_TOKENS, the command's
defaults. So a text's vectors are the command's bits for the same input, not
just close (tests/test_serve_embed.py compares the two byte for byte).

It is done one step at a time (`EmbedWork.step`: a group's tokenisation, or
one forward pass) so that the search worker, which runs these steps between
its search batches with the same model instance, never holds a GET for more
than one pass. Each record is model.embedding's `embedding_json`, the line
the command prints; `embed_answer_bound` bounds an answer's bytes before any
work, as answer_size.py does for searches.
"""

from __future__ import annotations

from collections.abc import Sequence

from bge_index.model.embedding import (EMBED_BATCH_DOCUMENTS, EMBED_BATCH_TOKENS, EMBED_MAX_LENGTH, EmbeddingGroup,
                                       embedding_json, index_max_length)
from bge_index.model.embedding import check_colbert as check_index_colbert
from bge_index.store.manifest import Manifest
from bge_index.store.shard_writer import RowBatch

# Bytes of JSON, at most, besides escaped characters (the serialized answer is checked against the limit too):
FLOAT_BYTES = 25  # a float16 value as Python prints it (`-1.2345678901234567e-05`: 23) and ", "
PAIR_BYTES = 40  # a sparse [token id, float32 weight] pair and ", "
RECORD_BYTES = 64  # a record's braces, field names, brackets and the ",\n" between records


def embed_max_length(manifest: Manifest) -> int:
    """Tokens per text: the index's max length, as `embed --index` takes it (at most its --max-length default)."""
    return index_max_length(manifest, EMBED_MAX_LENGTH)


def check_colbert(manifest: Manifest, index_dir) -> None:
    """Refuse ColBERT vectors from an index that stores none (NoColbertVectors, a 400): its vectors are what
    /embed gives, and it has no ColBERT vectors to match."""
    check_index_colbert(manifest, index_dir, "ask without colbert")


def embeddings_json(encoded: Sequence[tuple[RowBatch, int]], colbert: bool) -> str:
    """The answer to POST /embed: a JSON list of the records, in input order, each serialized as the command
    prints its line (so the lines between the brackets are the command's, a comma after each but the last)."""
    lines = [embedding_json(rows, i, colbert) for rows, i in encoded]
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
        self._group: EmbeddingGroup | None = None  # the group being encoded
        self._max_length: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def done(self) -> bool:
        """Whether every text is encoded."""
        return self._group is None and self._next_group >= len(self.ids)

    def step(self, encoder, manifest: Manifest, index_dir=None) -> list[tuple[RowBatch, int]]:
        """Do the next step with `encoder` (the served model) for the generation `manifest` describes: start a
        group (tokenise it), or make one forward pass. Gives the (rows, row number) of the texts a step
        finished, in input order: a group's, after its last pass; else none. NoColbertVectors (before any
        work) when ColBERT vectors are asked of an index without them."""
        if self._max_length is None:  # the first step: all of a request is encoded for one generation
            if self.colbert:
                check_colbert(manifest, index_dir)
            self._max_length = embed_max_length(manifest)
        if self._group is None:
            start, end = self._next_group, self._next_group + EMBED_BATCH_DOCUMENTS
            self._next_group = end
            self._group = EmbeddingGroup(encoder, self.ids[start:end], self.texts[start:end], colbert=self.colbert,
                                         max_length=self._max_length, batch_tokens=EMBED_BATCH_TOKENS)
            return []
        group = self._group
        group.step(encoder)
        if not group.done:
            return []
        self._group = None
        finished = group.finished()
        return [(finished, i) for i in range(len(finished))]
