"""Where the stages meet: documents -> token batches -> vectors -> shards, and queries -> vectors -> hits.

Indexing streams: documents are read a window at a time, tokenised, sorted
by length inside the window and cut into batches under a padded-token budget
(so a batch of short texts holds many rows and a long text rides alone), then
written back in input order. Nothing grows with the corpus but counters.

The CLI drives these functions and is told what happens through callbacks;
nothing here prints.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bge_index import __version__
from bge_index.documents import Document, FieldNames, Skipped, iter_documents
from bge_index.encoder import QUERY_MAX_LENGTH, Encoder, ModelIdentity, dtype_name, load_encoder
from bge_index.search import Hit, QueryVectors, ScoreWeights, Searcher
from bge_index.shards import (IndexFormatError, IndexWriter, Manifest, RowBatch, index_size_bytes, is_index,
                              load_vectors, read_manifest, read_rows)

WINDOW_DOCUMENTS = 2048
MAX_BATCH_ROWS = 512


class StrictModeError(Exception):
    """--strict and a document had to be skipped; nothing was written."""

    def __init__(self, skipped: Skipped):
        super().__init__(f"{skipped.location}: {skipped.reason} (--strict: nothing written)")
        self.skipped = skipped


class OutputFolderError(Exception):
    """--out names a folder that holds something other than an index."""


@dataclass(frozen=True)
class IndexOptions:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int = 16384
    max_length: int = 8192
    shard_rows: int = 100_000
    colbert: bool = False
    store_text: bool = True
    strict: bool = False
    fields: FieldNames = FieldNames()


@dataclass
class IndexProgress:
    documents: int
    tokens: int
    elapsed: float


@dataclass
class IndexSummary:
    index_dir: Path
    documents: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    max_length: int = 0
    model: str = ""

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


def _no_op(*_args) -> None:
    return None


# ---------------------------------------------------------------------------
# Indexing


def build_index(inputs: Sequence[str], index_dir: Path, options: IndexOptions,
                on_skip: Callable[[Skipped], None] = _no_op,
                on_progress: Callable[[IndexProgress], None] = _no_op,
                encoder: Encoder | None = None) -> IndexSummary:
    """Index `inputs` into `index_dir`, replacing any index there in one atomic step."""
    previous = _previous_manifest(index_dir)
    documents = iter_documents(inputs, options.fields)  # raises InputError before any work
    encoder = encoder or load_encoder(options.model, options.device, options.dtype)
    max_length = encoder.effective_max_length(options.max_length)
    manifest = Manifest(
        model={**encoder.identity.to_json(), "dtype": dtype_name(encoder.dtype), "max_length": max_length},
        dense_dim=encoder.dense_dim,
        colbert_dim=encoder.colbert_dim if options.colbert else None,
        vocab_size=encoder.vocab_size,
        store_text=options.store_text,
        generation=(previous.generation + 1) if previous else 1,
        tool_version=__version__,
    )
    summary = IndexSummary(index_dir, max_length=max_length, model=encoder.identity.describe())
    writer = IndexWriter(index_dir, manifest, options.shard_rows)
    started = time.perf_counter()
    try:
        for window in _windows(documents, summary, options.strict, on_skip):
            writer.write(_encode_window(encoder, window, max_length, options, summary))
            summary.elapsed = time.perf_counter() - started
            on_progress(IndexProgress(summary.documents, summary.tokens, summary.elapsed))
        manifest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    summary.elapsed = time.perf_counter() - started
    summary.shards = len(manifest.shards)
    summary.bytes = index_size_bytes(index_dir, manifest)
    return summary


def _previous_manifest(index_dir: Path) -> Manifest | None:
    if is_index(index_dir):
        return read_manifest(index_dir)
    if index_dir.exists() and (not index_dir.is_dir() or any(index_dir.iterdir())):
        raise OutputFolderError(f"--out {index_dir}: exists and is not a bge-index index; "
                                "refusing to write into it (choose an empty or new folder)")
    return None


def _windows(items: Iterable[Document | Skipped], summary: IndexSummary, strict: bool,
             on_skip: Callable[[Skipped], None]) -> Iterator[list[Document]]:
    """Documents in windows of WINDOW_DOCUMENTS; skipped records reported and counted on the way."""
    window: list[Document] = []
    for item in items:
        if isinstance(item, Skipped):
            if strict:
                raise StrictModeError(item)
            summary.skipped[item.category] += 1
            on_skip(item)
            continue
        window.append(item)
        if len(window) >= WINDOW_DOCUMENTS:
            yield window
            window = []
    if window:
        yield window


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


def _encode_window(encoder: Encoder, window: list[Document], max_length: int, options: IndexOptions,
                   summary: IndexSummary) -> RowBatch:
    tokenized = encoder.tokenize([d.text for d in window], max_length)
    lengths = [len(t.ids) for t in tokenized]
    dense = np.empty((len(window), encoder.dense_dim), dtype=np.float32)
    sparse: list = [None] * len(window)
    colbert: list | None = [None] * len(window) if options.colbert else None
    for batch in token_budget_batches(lengths, options.batch_tokens):
        encoded = encoder.encode_ids([tokenized[i].ids for i in batch], colbert=options.colbert)
        dense[batch] = encoded.dense
        for slot, position in enumerate(batch):
            sparse[position] = encoded.sparse[slot]
            if colbert is not None and encoded.colbert is not None:
                colbert[position] = encoded.colbert[slot]
    summary.documents += len(window)
    summary.tokens += sum(lengths)
    summary.truncated += sum(t.truncated for t in tokenized)
    texts = [d.text for d in window] if options.store_text else None
    return RowBatch([d.id for d in window], texts, dense, sparse, colbert)


# ---------------------------------------------------------------------------
# Searching


@dataclass(frozen=True)
class Query:
    id: str
    text: str


@dataclass(frozen=True)
class RankedDocument:
    rank: int
    id: str
    hit: Hit
    text: str | None = None
    top_tokens: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class QueryResult:
    query: Query
    hits: list[RankedDocument]


class IndexSearch:
    """An opened index with the encoder that made it, ready for queries."""

    def __init__(self, index_dir: Path, model: str | None = None, device: str = "auto", dtype: str = "auto"):
        self.index_dir = index_dir
        self.manifest = read_manifest(index_dir)
        recorded = ModelIdentity.from_json(self.manifest.model)
        self.encoder = load_encoder(model or recorded.name, device, dtype, expected=recorded)
        self.searcher = Searcher(load_vectors(index_dir, self.manifest), self.manifest.vocab_size)

    def encode_queries(self, texts: Sequence[str], colbert: bool = False) -> list[QueryVectors]:
        vectors: list[QueryVectors] = []
        for start in range(0, len(texts), 32):
            encoded = self.encoder.encode_texts(texts[start:start + 32], QUERY_MAX_LENGTH, colbert=colbert)
            for row in range(len(encoded.dense)):
                ids, weights = encoded.sparse[row]
                vectors.append(QueryVectors(encoded.dense[row], ids, weights,
                                            encoded.colbert[row] if encoded.colbert is not None else None))
        return vectors

    def search(self, queries: Sequence[Query], k: int = 10, mode: str = "hybrid",
               weights: ScoreWeights = ScoreWeights(), explain: bool = False,
               with_text: bool = True) -> list[QueryResult]:
        if mode == "colbert" and not self.manifest.has_colbert:
            raise IndexFormatError(f"{self.index_dir} has no ColBERT vectors: rebuild it with --colbert, "
                                   "or search with --mode hybrid|dense|sparse")
        query_vectors = self.encode_queries([q.text for q in queries], colbert=(mode == "colbert"))
        results = []
        for query, vectors in zip(queries, query_vectors):
            hits = self.searcher.search(vectors, k, mode, weights, fetch_colbert=self._fetch_colbert)
            results.append(QueryResult(query, self._describe(vectors, hits, explain, with_text)))
        return results

    def _fetch_colbert(self, rows: Sequence[int]) -> list[np.ndarray]:
        return read_rows(self.index_dir, self.manifest, rows, "colbert")

    def _describe(self, query: QueryVectors, hits: list[Hit], explain: bool, with_text: bool) -> list[RankedDocument]:
        rows = [h.row for h in hits]
        texts = read_rows(self.index_dir, self.manifest, rows, "text") \
            if with_text and self.manifest.store_text and rows else [None] * len(rows)
        ranked = []
        for rank, (hit, text) in enumerate(zip(hits, texts), start=1):
            tokens: tuple[tuple[str, float], ...] = ()
            if explain:
                tokens = tuple((self.encoder.decode_token(token), weight)
                               for token, weight in self.searcher.sparse_contributions(query, hit.row)[:8])
            ranked.append(RankedDocument(rank, str(self.searcher.vectors.ids[hit.row]), hit, text, tokens))
        return ranked
