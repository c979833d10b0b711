"""Token batches: the rows a window of documents becomes, and how they are cut into forward passes.

A document becomes one row (truncated to the max length, truncation counted)
or, when chunking, one row per passage. Rows are sorted by length and cut
into batches under a padded-token budget (rows x longest row), so a batch of
short texts holds many rows and a long text rides alone:

    >>> token_budget_batches([5, 100, 7, 6], batch_tokens=24)
    [[1], [2, 3, 0]]

Tokenisation is bounded in memory whatever a text's length: without chunking
a long text is tokenised from a prefix long enough to decide its truncation
(the same ids as the whole text, see `_tokenize_prefix`); with chunking a text
over `CHUNK_SLICE_CHARS` is tokenised a slice at a time, cut at whitespace.

Vectors come back per batch and are placed by row; `complete_documents`
gives them back in input order as a `RowBatch` ready to write. Both engines
encode through `encode_documents` or these pieces. numpy only: the encoder is
passed in (anything with `tokenize`, `passages`, `encode_ids`, `dense_dim`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from bge_index.store.shard_writer import RowBatch

MAX_BATCH_ROWS = 512

# Tokenising a whole text costs memory in proportion to its length (a 50 MB line took 9 GB), though a
# truncated text keeps only its first max_length tokens. So a text longer than max_length x this many
# characters is tokenised from a prefix of that length first: eight times the ~4 characters a token takes
# in prose, and more than the 1-2 of CJK text, so the first prefix nearly always decides; if not, it doubles.
PREFIX_CHARS_PER_TOKEN = 32
# A prefix is only trusted when it holds this many tokens past max_length: tokenisation differs from the
# whole text's only near the cut (a word cut in half), so the kept tokens, well before it, are the same.
PREFIX_MARGIN_TOKENS = 16
# With chunking every token is kept, in passages: a text longer than this is tokenised a slice at a time,
# each slice cut at whitespace (hard only where there is none), so the tokeniser's working memory stays at
# a slice's and not the whole text's (it takes a few hundred bytes a character: measured with the test
# tokenizer, ~70 MB for a slice of 256 Ki characters, ~480 MB for 1 Mi). Passages never span a slice
# boundary: a longer text gets one short passage per slice (+0.1% passages) and no overlap across the
# cut; texts up to this length are cut exactly as before.
CHUNK_SLICE_CHARS = 1 << 18
_WHITESPACE = re.compile(r"\s+")


class WindowRows:
    """The rows a window of documents becomes (one per document, or one per passage), and their vectors."""

    def __init__(self, encoder, ids: Sequence[str], texts: Sequence[str], hashes: Sequence[str], *,
                 colbert: bool, store_text: bool, max_length: int, chunking: dict | None,
                 sources: Sequence[str | None] | None = None, lines: Sequence[int | None] | None = None,
                 metadata: Sequence[dict | None] | None = None):
        self.ids, self.hashes = ids, hashes
        # per document: where it came from and its other fields (stored with each of its rows)
        self.sources, self.lines, self.metadata = sources, lines, metadata
        self.store_text, self.chunked = store_text, bool(chunking)
        self.owner: list[int] = []  # row -> position of its document in the window
        self.token_ids: list[list[int]] = []
        self.texts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.truncated = 0
        if chunking:
            for position, text in enumerate(texts):
                for token_ids, start, end in _passages_in_slices(encoder, text, chunking["tokens"],
                                                                 chunking["overlap"]):
                    self._add(position, token_ids, text[start:end], (start, end))
        else:
            tokenized = _tokenize_bounded(encoder, texts, max_length)
            self.truncated = sum(t.truncated for t in tokenized)
            for position, (text, tokens) in enumerate(zip(texts, tokenized)):
                self._add(position, tokens.ids, text, (0, len(text)))
        self.dense = np.empty((len(self.token_ids), encoder.dense_dim), dtype=np.float32)  # [rows, D]
        self.sparse: list = [None] * len(self.token_ids)
        self.colbert: list | None = [None] * len(self.token_ids) if colbert else None

    def _add(self, position: int, ids: list[int], text: str, span: tuple[int, int]) -> None:
        self.owner.append(position)
        self.token_ids.append(ids)
        self.texts.append(text)
        self.spans.append(span)

    @property
    def lengths(self) -> list[int]:
        """Tokens in each row (with <s> and </s>), in row order."""
        return [len(ids) for ids in self.token_ids]

    def place(self, batch: list[int], encoded) -> None:
        """Store one encoded batch's vectors at its rows (`batch`: row numbers, in the order they were encoded)."""
        self.dense[batch] = encoded.dense
        for slot, row in enumerate(batch):
            self.sparse[row] = encoded.sparse[slot]
            if self.colbert is not None:
                self.colbert[row] = encoded.colbert[slot]

    def complete_documents(self, finished: np.ndarray) -> tuple[RowBatch | None, list[int]]:
        """Rows of the documents all of whose rows are encoded, in input order, and those documents' positions."""
        unfinished = {self.owner[row] for row in np.flatnonzero(~finished).tolist()}
        rows = [r for r in range(len(self.owner)) if self.owner[r] not in unfinished]
        done = [position for position in range(len(self.ids)) if position not in unfinished]
        if not rows:
            return None, done
        owners = [self.owner[r] for r in rows]
        chunk_numbers = _chunk_numbers(owners) if self.chunked else None
        return RowBatch(
            ids=[f"{self.ids[o]}#{n}" for o, n in zip(owners, chunk_numbers)] if self.chunked
            else [self.ids[o] for o in owners],
            content_hashes=[self.hashes[o] for o in owners],
            texts=[self.texts[r] for r in rows] if self.store_text else None,
            dense=self.dense[rows],
            sparse=[self.sparse[r] for r in rows],
            colbert=[self.colbert[r] for r in rows] if self.colbert is not None else None,
            doc_ids=[self.ids[o] for o in owners] if self.chunked else None,
            chunks=chunk_numbers,
            spans=[self.spans[r] for r in rows] if self.chunked else None,
            sources=[self.sources[o] for o in owners] if self.sources is not None else None,
            source_lines=[self.lines[o] for o in owners] if self.lines is not None else None,
            metadata=[self.metadata[o] for o in owners] if self.metadata is not None else None,
        ), done


def encode_documents(encoder, ids: Sequence[str], texts: Sequence[str], hashes: Sequence[str], *,
                     colbert: bool, store_text: bool, max_length: int, chunking: dict | None,
                     batch_tokens: int, sources: Sequence[str | None] | None = None,
                     lines: Sequence[int | None] | None = None,
                     metadata: Sequence[dict | None] | None = None) -> tuple[RowBatch | None, int, int]:
    """Documents -> (their rows in input order, tokens encoded, documents truncated), in this thread.

    The local engine's steps without its overlap, for callers that bring their own parallelism (Ray actors).
    """
    rows = WindowRows(encoder, ids, texts, hashes, colbert=colbert, store_text=store_text, max_length=max_length,
                      chunking=chunking, sources=sources, lines=lines, metadata=metadata)
    lengths = rows.lengths
    for batch in token_budget_batches(lengths, batch_tokens):
        rows.place(batch, encoder.encode_ids([rows.token_ids[i] for i in batch], colbert=colbert))
    batch_rows, _ = rows.complete_documents(np.ones(len(lengths), dtype=bool))
    return batch_rows, sum(lengths), rows.truncated


def _tokenize_bounded(encoder, texts: Sequence[str], max_length: int) -> list:
    """`encoder.tokenize(texts, max_length)`, the same ids and truncation, without tokenising all of a long text.

    Texts up to the prefix length go to the tokeniser together, as before; each longer one goes through
    `_tokenize_prefix`.
    """
    limit = max_length * PREFIX_CHARS_PER_TOKEN
    short = [i for i, text in enumerate(texts) if len(text) <= limit]
    results: list = [None] * len(texts)
    for i, tokens in zip(short, encoder.tokenize([texts[i] for i in short], max_length) if short else []):
        results[i] = tokens
    for i, text in enumerate(texts):
        if results[i] is None:
            results[i] = _tokenize_prefix(encoder, text, max_length, limit)
    return results


def _tokenize_prefix(encoder, text: str, max_length: int, prefix_chars: int):
    """The tokens of `text` truncated to max_length, tokenising as little of it as decides them.

    A prefix with at least max_length + PREFIX_MARGIN_TOKENS tokens decides the truncation well inside
    itself: its kept tokens are the whole text's, and the text is truncated (it has more than max_length).
    A shorter prefix doubles until one does, or until it is the whole text (then exact by definition).
    """
    while prefix_chars < len(text):
        prefix = text[:prefix_chars]
        [tokens] = encoder.tokenize([prefix], max_length)
        if tokens.truncated and _token_count(encoder, prefix) >= max_length + PREFIX_MARGIN_TOKENS:
            return tokens
        prefix_chars *= 2
    return encoder.tokenize([text], max_length)[0]


def _token_count(encoder, text: str) -> int:
    """Tokens in `text` (with <s> and </s>), untruncated: `tokenize` reports only whether it truncated.

    Counted through `passages` (non-overlapping, so their bodies add up to the text's tokens); every tokenizer
    this project loads is a Rust one with character offsets (model/tokenizer.py), so passages always exist.
    """
    return 2 + sum(len(p.ids) - 2 for p in encoder.passages(text, encoder.effective_max_length(1 << 30), 0))


def _passages_in_slices(encoder, text: str, chunk_tokens: int, overlap: int):
    """(token ids, start, end) of each passage of `text`, as `encoder.passages` gives them, a slice at a time.

    Passage spans are in `text`'s characters, whatever slice they came from. The ids are kept as int32
    arrays, not lists: a list costs 8 bytes a token plus 28 for each int above 256 (a 50 MB text's
    passages held ~630 MB as lists, ~140 MB as arrays); the encoder takes either.
    """
    for slice_start, slice_end in _slices(text, CHUNK_SLICE_CHARS):
        part = text if (slice_start, slice_end) == (0, len(text)) else text[slice_start:slice_end]
        for passage in encoder.passages(part, chunk_tokens, overlap):
            yield np.asarray(passage.ids, dtype=np.int32), slice_start + passage.start, slice_start + passage.end


def _slices(text: str, size: int) -> list[tuple[int, int]]:
    """[start, end) spans covering `text`, each at most `size` characters, cut before a run of whitespace.

    Cut there, a slice ends on a word and the next begins with the whitespace before its first word, as
    both do inside the whole text, so the tokens either side of a cut are the whole text's. Where the
    second half of a slice has no whitespace (one long word, text without spaces) it is cut at `size`.
    """
    spans, start = [], 0
    while len(text) - start > size:
        window = text[start + size // 2:start + size + 1]
        # The last whitespace run of the window, found from its end (reversed, so the search stops there).
        last_run = _WHITESPACE.search(window[::-1])
        end = start + size // 2 + (len(window) - last_run.end()) if last_run else start + size
        spans.append((start, end))
        start = end
    spans.append((start, len(text)))
    return spans


def _chunk_numbers(owners: list[int]) -> list[int]:
    """0, 1, 2... within each run of rows that belong to the same document."""
    numbers, previous, count = [], None, 0
    for owner in owners:
        count = count + 1 if owner == previous else 0
        numbers.append(count)
        previous = owner
    return numbers


def token_budget_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Positions grouped into batches, longest first, each padded batch within `batch_tokens`.

    Padded size is rows x longest row; a text longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for position in order:
        # Sorted longest first, so the batch's first row sets its padded length.
        longest = lengths[current[0]] if current else lengths[position]
        if current and (longest * (len(current) + 1) > batch_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(position)
    if current:
        batches.append(current)
    return batches
