"""What a search is asked and what it answers, whatever answers it: the backend interface.

A search takes `Query`s and a `SearchRequest` (k, mode, weights, fusion,
normalisation, options) and returns one `QueryResult` per query, its hits
ranked best first. Two backends implement `SearchBackend`: the local index
(local_index.py: memory-mapped search files, exact) and a Milvus collection
exported from it (milvus.py). The CLI, `eval` and any server print and
compare `QueryResult`s and never look inside a backend:

    >>> request = SearchRequest(k=5, mode=Mode.SPARSE)
    >>> request.mode.value, request.weights.sparse
    ('sparse', 0.3)

No torch here: the types are plain data (numpy arrays for vectors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, Sequence

import numpy as np

from bge_index.errors import InvalidOptionError


class Mode(str, Enum):
    """How documents are scored (see search.py)."""

    HYBRID = "hybrid"
    DENSE = "dense"
    SPARSE = "sparse"
    COLBERT = "colbert"


RRF_K = 60  # reciprocal rank fusion: a document at rank r of a list gets 1 / (RRF_K + r)
RRF_DEPTH = 1000  # ... from each list's top RRF_DEPTH ranks


class Fusion(str, Enum):
    """How hybrid mode combines dense and sparse: a weighted sum, or reciprocal rank fusion (RRF_K, RRF_DEPTH)."""

    WEIGHTED = "weighted"
    RRF = "rrf"


class Normalize(str, Enum):
    """Weighted hybrid: use the raw scores, or min-max normalise each to [0, 1] first."""

    NONE = "none"
    MINMAX = "minmax"


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the component scores; BGE-M3's training mix is dense + 0.3 sparse (+ colbert)."""

    dense: float = 1.0
    sparse: float = 0.3
    colbert: float = 1.0


@dataclass(frozen=True)
class QueryVectors:
    """dense [D] float32 unit vector; sparse ids uint32 / weights float32; colbert [n, Dc] or None."""

    dense: np.ndarray
    sparse_ids: np.ndarray
    sparse_weights: np.ndarray
    colbert: np.ndarray | None = None


@dataclass(frozen=True)
class Hit:
    """One ranked row: its row in the index (a backend without rows: its rank), final and component scores."""

    row: int
    score: float
    dense: float
    sparse: float
    colbert: float | None = None


@dataclass(frozen=True)
class Query:
    """A query: its id (for runs and batches) and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class SearchRequest:
    """Everything a search is asked besides the queries; `search --help` documents each field's flag."""

    k: int = 10
    mode: Mode = Mode.HYBRID
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    fusion: Fusion = Fusion.WEIGHTED
    normalize: Normalize = Normalize.NONE
    explain: bool = False  # the query tokens each hit matched, with their contributions
    group_by_doc: bool = False  # chunked indexes: rank documents by their best passage
    with_text: bool = True  # return stored texts with the hits

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InvalidOptionError(f"k must be at least 1 (got {self.k})")
        # Plain strings are accepted (library callers); stored as the enums.
        for name, kind in (("mode", Mode), ("fusion", Fusion), ("normalize", Normalize)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                choices = ", ".join(m.value for m in kind)
                raise InvalidOptionError(f"unknown {name} {value!r} (use {choices})") from None


@dataclass(frozen=True)
class RankedDocument:
    """One hit as shown: rank, id, scores, and optionally its text and the query tokens it matched."""

    rank: int
    id: str
    hit: Hit
    text: str | None = None
    top_tokens: tuple[tuple[str, float], ...] = ()
    passage_id: str | None = None  # with group_by_doc: the best passage of the document


@dataclass(frozen=True)
class QueryResult:
    """A query and its hits, best first."""

    query: Query
    hits: list[RankedDocument]


def hit_record(result: QueryResult, ranked: RankedDocument) -> dict:
    """One hit as a JSON object (a `search --format jsonl` line): query id, rank, id, scores rounded to 6 places,
    and the passage, text and matching tokens when present."""
    record = {"query_id": result.query.id, "rank": ranked.rank, "id": ranked.id, "score": round(ranked.hit.score, 6),
              "dense": round(ranked.hit.dense, 6), "sparse": round(ranked.hit.sparse, 6)}
    if ranked.hit.colbert is not None:
        record["colbert"] = round(ranked.hit.colbert, 6)
    if ranked.passage_id is not None:
        record["passage"] = ranked.passage_id
    if ranked.text is not None:
        record["text"] = ranked.text
    if ranked.top_tokens:
        record["tokens"] = [{"token": t, "contribution": round(c, 6)} for t, c in ranked.top_tokens]
    return record


def results_json(results: Sequence[QueryResult], mode: Mode | str) -> str:
    """Results as `search --format json` prints them and `serve` returns them: one document, the same bytes.

        >>> hit = RankedDocument(1, "doc-7", Hit(row=6, score=0.5, dense=0.5, sparse=0.0))
        >>> print(results_json([QueryResult(Query("1", "q"), [hit])], Mode.DENSE))  # doctest: +ELLIPSIS
        [
          {
            "query_id": "1",
            "query": "q",
            "mode": "dense",
            "hits": [
              {
                "rank": 1,
                "id": "doc-7",
        ...
    """
    mode = Mode(mode).value
    payload = [{"query_id": r.query.id, "query": r.query.text, "mode": mode,
                "hits": [{k: v for k, v in hit_record(r, h).items() if k != "query_id"} for h in r.hits]}
               for r in results]
    return json.dumps(payload, ensure_ascii=False, indent=2) + "\n"


class SearchBackend(Protocol):
    """Something that answers searches over an index: `LocalIndex`, `MilvusBackend`."""

    notes: list[str]  # things the user should know about this backend's state (stale export, ...)

    def search(self, queries: Sequence[Query], request: SearchRequest) -> list[QueryResult]:
        """One result per query, in the queries' order."""
        ...

    def close(self) -> None:
        """Release what the backend holds (memory maps, connections, the model)."""
        ...
