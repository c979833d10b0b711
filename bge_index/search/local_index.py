"""The local search backend: an index folder's memory-mapped search files and the model that made it.

`LocalIndex` opens the manifest, loads the index's own model (a different
one is refused) in the index's precision, opens every file of that
generation at once (vector_store.OpenIndex: Parquet handles, deletion sets,
memory-mapped search files, so later commits never disturb it) and answers `SearchRequest`s exactly (search.py).
Hits come back as `QueryResult`s with ids, texts and, on request, the query
tokens each hit matched:

    index = LocalIndex(Path("notes-index"))
    [result] = index.search([Query("1", "sourdough starter")], SearchRequest(k=5))
    result.hits[0].id, result.hits[0].hit.score
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bge_index.model.encoder import Encoder, load_encoder
from bge_index.errors import ModelMismatchError, NoColbertVectors
from bge_index.store.manifest import read_manifest
from bge_index.model.identity import QUERY_MAX_LENGTH, ModelIdentity
from bge_index.search.filters import RowColumns, parse_where
from bge_index.search.query import Hit, Mode, Normalize, Query, QueryResult, QueryVectors, RankedDocument, SearchRequest
from bge_index.search.scoring import Searcher
from bge_index.timings import stage_timer
from bge_index.store.vector_store import OpenIndex

FILTER_CACHE = 16  # filters whose matching rows a LocalIndex keeps (each: one flag per row)


def encode_queries(encoder: Encoder, texts: Sequence[str], colbert: bool = False) -> list[QueryVectors]:
    """Queries -> vectors, the one way every search backend encodes them (at most QUERY_MAX_LENGTH tokens).

    Each query is encoded alone and unpadded (Encoder.encode_queries), so its
    vectors, and so its hits and scores, are the same bits whether it is
    searched alone, in a --queries batch, in eval or over HTTP.
    """
    if not texts:
        return []
    encoded = encoder.encode_queries(texts, QUERY_MAX_LENGTH, colbert=colbert)
    vectors: list[QueryVectors] = []
    for row in range(len(encoded.dense)):
        ids, weights = encoded.sparse[row]
        vectors.append(QueryVectors(encoded.dense[row], ids, weights,
                                    encoded.colbert[row] if encoded.colbert is not None else None))
    return vectors


def load_index_encoder(manifest, model: str | None = None, device: str = "auto", dtype: str = "auto") -> Encoder:
    """The model an index records, in the index's precision unless told otherwise (a different model is refused)."""
    recorded = ModelIdentity.from_json(manifest.model)
    dtype = manifest.model.get("dtype", "auto") if dtype == "auto" else dtype
    return load_encoder(model or recorded.name, device, dtype, expected=recorded)


class LocalIndex:
    """An opened index with the encoder that made it, ready for queries (the local `SearchBackend`)."""

    def __init__(self, index_dir: Path, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 encoder: Encoder | None = None, opened: OpenIndex | None = None, modes: Sequence[Mode | str] = (),
                 remember_queries: bool = False):
        """Open `index_dir`'s current generation with its model (or `encoder`, if it is the index's model).

        Whatever needs only the index fails before the model loads: a folder that is not an index, a damaged
        file, and a mode of `modes` the index cannot answer (colbert without ColBERT vectors). With
        `remember_queries`, each query text is encoded once for the life of this object (eval: one encoding for
        all its modes; its vectors are the same bits every time, so its answers are too).
        """
        self.index_dir = index_dir
        self.notes: list[str] = []
        manifest = opened.manifest if opened is not None else read_manifest(index_dir)
        self._colbert_queries = any(Mode(m) is Mode.COLBERT for m in modes)
        if self._colbert_queries and not manifest.has_colbert:
            raise NoColbertVectors(f"{index_dir} has no ColBERT vectors: rebuild it with --colbert, "
                                   "or search with --mode hybrid|dense|sparse")
        self._remembered: dict[str, QueryVectors] | None = {} if remember_queries else None
        # Every file of one generation opened now, before the model: a damaged index fails in milliseconds, and
        # later commits never disturb this object's searches.
        if opened is None:
            with stage_timer("open index"):
                opened = OpenIndex.open(index_dir, manifest)
        manifest = opened.manifest
        if encoder is None:
            encoder = load_index_encoder(manifest, model, device, dtype)
        else:
            recorded = ModelIdentity.from_json(manifest.model)
            if not encoder.identity.same_model(recorded):
                raise ModelMismatchError(f"the index was built with {recorded.describe()}, but the loaded model is "
                                         f"{encoder.identity.describe()}")
        self.encoder = encoder
        self.opened = opened
        self.manifest = self.opened.manifest
        self.shard_starts = self.opened.starts
        self.searcher = Searcher(self.opened.vectors, self.manifest.vocab_size, doc_ids=self._doc_ids)
        self._row_columns: RowColumns | None = None  # what filters read, loaded at the first --where
        self._filtered: OrderedDict = OrderedDict()  # parsed filter -> Searcher restricted to its rows (LRU)
        self._filter_lock = threading.Lock()

    def reopen(self) -> "LocalIndex":
        """A LocalIndex on the newest committed generation sharing this encoder; self if it has not changed."""
        opened = self.opened.reopen()
        if opened is self.opened:
            return self
        return LocalIndex(self.index_dir, encoder=self.encoder, opened=opened)

    def close(self) -> None:
        """Drop the model and the opened generation; its memory maps and Parquet handles close once nothing
        else (a LocalIndex sharing it, a search still running) holds them. Search no more after this."""
        self.encoder = None
        self.searcher = None
        self.opened = None

    def encode_queries(self, texts: Sequence[str], colbert: bool = False) -> list[QueryVectors]:
        """Query texts -> vectors with this index's model."""
        return encode_queries(self.encoder, texts, colbert)

    def search(self, queries: Sequence[Query], request: SearchRequest = SearchRequest()) -> list[QueryResult]:
        """One result per query: exact top-k (dense, sparse, hybrid), or a ColBERT re-rank of hybrid candidates."""
        colbert = request.mode is Mode.COLBERT
        if colbert and not self.manifest.has_colbert:
            raise NoColbertVectors(f"{self.index_dir} has no ColBERT vectors: rebuild it with --colbert, "
                                   "or search with --mode hybrid|dense|sparse")
        searcher = self.searcher_for(request.where)
        query_vectors = self._encode([q.text for q in queries], colbert)
        normalize = None if request.normalize is Normalize.NONE else request.normalize.value
        with stage_timer("score"):
            all_hits = searcher.search_many(query_vectors, request.k, request.mode.value, request.weights,
                                                 fetch_colbert=self._fetch_colbert, group_by_doc=request.group_by_doc,
                                                 fusion=request.fusion.value, normalize=normalize)
        with stage_timer("read hits"):
            return [QueryResult(query, self._describe(vectors, hits, request))
                    for query, vectors, hits in zip(queries, query_vectors, all_hits)]

    def searcher_for(self, where: str | None):
        """The Searcher a request with this filter uses: the whole index, or the index restricted to the rows
        the filter matches (evaluated once over every row, kept for the FILTER_CACHE latest filters)."""
        if where is None:
            return self.searcher
        expression = parse_where(where)
        with self._filter_lock:
            if expression in self._filtered:
                self._filtered.move_to_end(expression)
                return self._filtered[expression]
            if self._row_columns is None:
                self._row_columns = RowColumns(self.searcher.rows, self.opened.read_arrow)
            with stage_timer("filter"):
                restricted = self.searcher.restricted(self._row_columns.matching(expression))
            self._filtered[expression] = restricted
            while len(self._filtered) > FILTER_CACHE:
                self._filtered.popitem(last=False)
            return restricted

    def _encode(self, texts: list[str], colbert: bool) -> list[QueryVectors]:
        """The texts' vectors, from memory for texts already encoded when this object remembers queries (with
        ColBERT vectors when a mode of the `modes` it was opened for needs them: a query's dense and sparse
        vectors are the same bits with or without them)."""
        if self._remembered is None:
            return self.encode_queries(texts, colbert=colbert)
        colbert = colbert or self._colbert_queries
        missing = [t for t in dict.fromkeys(texts)
                   if t not in self._remembered or (colbert and self._remembered[t].colbert is None)]
        for text, vectors in zip(missing, self.encode_queries(missing, colbert=colbert)):
            self._remembered[text] = vectors
        return [self._remembered[t] for t in texts]

    def _doc_ids(self) -> np.ndarray:
        return self.opened.read_column("doc_id" if self.manifest.chunking else "id")

    def _fetch_colbert(self, rows: Sequence[int]) -> list[np.ndarray]:
        return self.opened.read_rows(rows, "colbert")

    def _describe(self, query: QueryVectors, hits: list[Hit], request: SearchRequest) -> list[RankedDocument]:
        grouped = request.group_by_doc
        rows = [h.row for h in hits]
        ids = self.opened.read_rows(rows, "id") if hits else []
        texts = self.opened.read_rows(rows, "text") \
            if request.with_text and self.manifest.store_text and hits else [None] * len(hits)
        doc_ids = self.opened.read_rows(rows, "doc_id") \
            if grouped and self.manifest.chunking and hits else ids
        sources = self._sources(rows) if request.with_text and hits else [None] * len(hits)
        ranked = []
        for rank, (hit, row_id, doc_id, text, source) in enumerate(zip(hits, ids, doc_ids, texts, sources), start=1):
            tokens: tuple[tuple[str, float], ...] = ()
            if request.explain:
                tokens = tuple((self.encoder.decode_token(token), weight)
                               for token, weight in self.searcher.sparse_contributions(query, hit.row)[:8])
            if grouped:
                ranked.append(RankedDocument(rank, doc_id, hit, text, tokens, row_id, source))
            else:
                ranked.append(RankedDocument(rank, row_id, hit, text, tokens, source=source))
        return ranked

    def _sources(self, rows: list[int]) -> list[str | None]:
        """`file:line` (the file alone for a whole-file document) of each row; None where its shard was written
        before rows recorded their source."""
        if not all("source" in shard.parquet.schema_arrow.names for shard in self.opened.shards):
            return [None] * len(rows)
        files = self.opened.read_rows(rows, "source")
        lines = self.opened.read_rows(rows, "source_line")
        return [None if f is None else f if line is None else f"{f}:{line}" for f, line in zip(files, lines)]
