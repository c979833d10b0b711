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

The search options are declared here, once: each is a field of
`SearchRequest` (the weights: of `ScoreWeights`) made with `options.option()`,
with its names, default, help and range. `SEARCH_OPTIONS` reads them back;
the CLI's `search` and `eval` flags, `serve`'s HTTP parameters, the request's
checks and what the Milvus backend refuses all come from it (options.py).

No torch here: the types are plain data (numpy arrays for vectors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from bge_index.search.filters import parse_where
from bge_index.search.options import SearchOption, build, check_options, declared_options, option


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
    """Weights of the component scores; BGE-M3's training mix is dense + 0.3 sparse (+ colbert). Search options."""

    dense: float = option(1.0, "dense-weight", help="Weight of the dense (cosine) score.")
    sparse: float = option(0.3, "sparse-weight", help="Weight of the sparse (lexical) score.")
    colbert: float = option(1.0, "colbert-weight", help="Weight of ColBERT MaxSim (colbert mode).")

    def __post_init__(self) -> None:
        check_options(self)


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
    """Everything a search is asked besides the queries. Each field made with `option()` is a search option,
    declared here only: `search`'s flag and `serve`'s parameter of that name, with this default, help and range."""

    k: int = option(10, "k", "top-k", minimum=1, envvar="BGE_INDEX_K", help="Results per query.")
    mode: Mode = option(Mode.HYBRID, envvar="BGE_INDEX_MODE", help="Scoring mode.")
    weights: ScoreWeights = field(default_factory=ScoreWeights)  # its fields are options: dense-weight, ...
    fusion: Fusion = option(Fusion.WEIGHTED, envvar="BGE_INDEX_FUSION",
                            help="Hybrid: weighted sum, or reciprocal rank fusion (k=60).")
    normalize: Normalize = option(Normalize.NONE, help="Weighted hybrid: min-max normalise dense and sparse scores first.")
    explain: bool = option(False, help="Show the query tokens that matched, with their contributions.")
    group_by_doc: bool = option(False, help="Rank documents by their best passage (chunked indexes).")
    where: str | None = option(None, metavar="EXPR", help='Only rows matching this filter, e.g. lang == "de" and year >= 2020, '
                                          'startswith(path, "reports/") (README: Filters). Exact.')
    with_text: bool = True  # return stored texts with the hits (not an option: the CLI's output format decides)

    def __post_init__(self) -> None:
        # Plain strings are accepted for the enums (library callers); stored as the enums. k at least 1.
        check_options(self)
        if self.where is not None:
            parse_where(self.where)  # a filter that does not parse fails here, before any search


SEARCH_OPTIONS: tuple[SearchOption, ...] = declared_options(SearchRequest)
"""Every search option, in declaration order: k, mode, dense-weight, sparse-weight, colbert-weight, fusion, ..."""


def request_from_options(values: Mapping[str, Any], **fields: Any) -> SearchRequest:
    """A SearchRequest from option values keyed by option name (`dense-weight`: 0.5), and `fields` given as
    they are (`with_text`, or `k` from a flag of another name); the rest keeps its default.

        >>> request_from_options({"k": 3, "sparse-weight": 1.0}, with_text=False).weights
        ScoreWeights(dense=1.0, sparse=1.0, colbert=1.0)
    """
    return build(SearchRequest, SEARCH_OPTIONS, values, **fields)


@dataclass(frozen=True)
class RankedDocument:
    """One hit as shown: rank, id, scores, and optionally its text and the query tokens it matched."""

    rank: int
    id: str
    hit: Hit
    text: str | None = None
    top_tokens: tuple[tuple[str, float], ...] = ()
    passage_id: str | None = None  # with group_by_doc: the best passage of the document
    source: str | None = None  # where the row came from: `file:line` (or the file), when the index records it


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
    if ranked.source is not None:
        record["source"] = ranked.source
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
