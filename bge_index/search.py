"""Scoring and exact top-k over an index's vectors; never loads the model.

Scores (BGE-M3's):
- dense:   dot product of unit vectors (cosine);
- sparse:  sum over shared token ids of q_w * d_w (lexical matching score);
- hybrid:  dense_weight * dense + sparse_weight * sparse;
- colbert: the hybrid top candidates re-ranked by
           dense_weight * dense + sparse_weight * sparse + colbert_weight * MaxSim,
           MaxSim being the mean over query tokens of the best document-token dot
           (FlagEmbedding's colbert_score). Defaults 1 / 0.3 / 1 follow BGE-M3's training.

dense, sparse and hybrid are exact: every document is scored, and the top-k
equals brute-force scoring, ties broken by index order (earlier row first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bge_index.shards import IndexVectors

MODES = ("hybrid", "dense", "sparse", "colbert")
_DENSE_CHUNK_ROWS = 1 << 16  # bounds the float32 copy of float16 rows to 256 MiB at D=1024
COLBERT_CANDIDATES_PER_HIT = 10
COLBERT_MIN_CANDIDATES = 100


@dataclass(frozen=True)
class ScoreWeights:
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
    """One ranked document: its row in the index, final score and the component scores."""

    row: int
    score: float
    dense: float
    sparse: float
    colbert: float | None = None


class NoColbertVectors(Exception):
    """ColBERT mode on an index built without --colbert."""


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest scores, best first; equal scores in row order. [N] -> [min(k, N)]."""
    n = scores.shape[0]
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        # Keep every row tied with the k-th score, so the tie-break below sees them all.
        kth_score = scores[np.argpartition(-scores, k - 1)[k - 1]]
        candidates = np.flatnonzero(scores >= kth_score)
    else:
        candidates = np.arange(n)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


class Searcher:
    """Exact search over one loaded index."""

    def __init__(self, vectors: IndexVectors, vocab_size: int):
        self.vectors = vectors
        self.vocab_size = vocab_size
        counts = np.diff(vectors.sparse_indptr)
        # Row number of every stored (token, weight) pair: [nnz]; lets one bincount sum all rows.
        self._sparse_rows = np.repeat(np.arange(len(vectors), dtype=np.int64), counts)
        self._documents: _DocumentGroups | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    # -- full scans --------------------------------------------------------

    def dense_scores(self, query: QueryVectors) -> np.ndarray:
        """[N] float32 cosine scores, scanning the float16 matrix in bounded float32 chunks."""
        dense = self.vectors.dense
        q = query.dense.astype(np.float32)
        out = np.empty(dense.shape[0], dtype=np.float32)
        for start in range(0, dense.shape[0], _DENSE_CHUNK_ROWS):
            block = dense[start:start + _DENSE_CHUNK_ROWS].astype(np.float32)  # [c, D]
            out[start:start + block.shape[0]] = block @ q
        return out

    def sparse_scores(self, query: QueryVectors) -> np.ndarray:
        """[N] float32 lexical scores: sum of q_w * d_w over shared token ids."""
        n = len(self.vectors)
        if query.sparse_ids.size == 0 or self._sparse_rows.size == 0:
            return np.zeros(n, dtype=np.float32)
        lookup = np.zeros(max(self.vocab_size, int(query.sparse_ids.max()) + 1), dtype=np.float32)
        lookup[query.sparse_ids] = query.sparse_weights
        products = self.vectors.sparse_values * lookup[self.vectors.sparse_indices]  # [nnz]
        return np.bincount(self._sparse_rows, weights=products, minlength=n).astype(np.float32)

    # -- per-hit scores ----------------------------------------------------

    def dense_score(self, query: QueryVectors, row: int) -> float:
        return float(self.vectors.dense[row].astype(np.float32) @ query.dense.astype(np.float32))

    def sparse_score(self, query: QueryVectors, row: int) -> float:
        # Summed in float64 in token order, then rounded, exactly as the full scan does.
        contributions = sorted(self.sparse_contributions(query, row))
        return float(np.float32(sum(c for _, c in contributions)))

    def sparse_contributions(self, query: QueryVectors, row: int) -> list[tuple[int, float]]:
        """(token id, q_w * d_w) for every token shared by query and document, largest first."""
        doc_ids, doc_weights = self.vectors.sparse_row(row)
        shared, q_at, d_at = np.intersect1d(query.sparse_ids, doc_ids, assume_unique=True, return_indices=True)
        contributions = query.sparse_weights[q_at].astype(np.float32) * doc_weights[d_at]
        order = np.argsort(-contributions, kind="stable")
        return [(int(shared[i]), float(contributions[i])) for i in order]

    # -- ranking -----------------------------------------------------------

    def search(self, query: QueryVectors, k: int = 10, mode: str = "hybrid", weights: ScoreWeights = ScoreWeights(),
               fetch_colbert: Callable[[Sequence[int]], list[np.ndarray]] | None = None,
               group_by_doc: bool = False) -> list[Hit]:
        """The k best rows, or with `group_by_doc` the best row of each of the k best documents.

        A document's score is the score of its best passage (row); exact for dense, sparse and hybrid.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (use {', '.join(MODES)})")
        dense = self.dense_scores(query) if mode != "sparse" else None  # [N]
        sparse = self.sparse_scores(query) if mode != "dense" else None  # [N]
        if mode == "dense":
            ranking = dense
        elif mode == "sparse":
            ranking = sparse
        else:
            ranking = weights.dense * dense + weights.sparse * sparse
        groups = self._document_groups() if group_by_doc else None
        if mode == "colbert":
            hits = self._colbert_rerank(query, ranking, k, weights, fetch_colbert)
            return groups.best_hits(hits, k) if groups is not None else hits[:k]
        rows = groups.top_rows(ranking, k) if groups is not None else top_k(ranking, k)
        return [self._hit(query, int(row), float(ranking[row]), dense, sparse) for row in rows]

    def _document_groups(self) -> "_DocumentGroups":
        if self._documents is None:
            doc_ids = self.vectors.doc_ids if self.vectors.doc_ids is not None else self.vectors.ids
            self._documents = _DocumentGroups(doc_ids)
        return self._documents

    def _hit(self, query: QueryVectors, row: int, score: float,
             dense: np.ndarray | None, sparse: np.ndarray | None) -> Hit:
        """A hit with both component scores, taken from the full scans where they were made."""
        dense_score = float(dense[row]) if dense is not None else self.dense_score(query, row)
        sparse_score = float(sparse[row]) if sparse is not None else self.sparse_score(query, row)
        return Hit(row, score, dense_score, sparse_score)

    def _colbert_rerank(self, query: QueryVectors, hybrid: np.ndarray, k: int, weights: ScoreWeights,
                        fetch_colbert: Callable[[Sequence[int]], list[np.ndarray]] | None) -> list[Hit]:
        if fetch_colbert is None or query.colbert is None:
            raise NoColbertVectors("this index has no ColBERT vectors (build it with --colbert)")
        candidates = top_k(hybrid, max(k * COLBERT_CANDIDATES_PER_HIT, COLBERT_MIN_CANDIDATES))
        doc_vectors = fetch_colbert(candidates.tolist())
        hits = []
        for row, vectors in zip(candidates.tolist(), doc_vectors):
            dense, sparse = self.dense_score(query, row), self.sparse_score(query, row)
            colbert = colbert_maxsim(query.colbert, vectors)
            score = weights.dense * dense + weights.sparse * sparse + weights.colbert * colbert
            hits.append(Hit(row, float(score), dense, sparse, colbert))
        hits.sort(key=lambda h: (-h.score, h.row))
        return hits


class _DocumentGroups:
    """Rows grouped by document (passages of one document), groups numbered in order of first appearance."""

    def __init__(self, doc_ids: np.ndarray):
        _, first_row, group = np.unique(doc_ids, return_index=True, return_inverse=True)
        order_of_first = np.argsort(first_row, kind="stable")
        renumber = np.empty_like(order_of_first)
        renumber[order_of_first] = np.arange(len(order_of_first))
        self.group_of_row = renumber[group.reshape(-1)]  # [N]
        self.rows_by_group = np.argsort(self.group_of_row, kind="stable")  # [N], rows ascending within a group
        self.starts = np.searchsorted(self.group_of_row[self.rows_by_group], np.arange(len(order_of_first)))

    def top_rows(self, scores: np.ndarray, k: int) -> list[int]:
        """Best row of each of the k best groups; a group scores as its best row (ties: earlier group, row)."""
        if len(scores) == 0:
            return []
        best = np.maximum.reduceat(scores[self.rows_by_group], self.starts)  # [groups]
        ends = np.append(self.starts[1:], len(scores))
        rows = []
        for group in top_k(best, k).tolist():
            members = self.rows_by_group[self.starts[group]:ends[group]]
            rows.append(int(members[np.argmax(scores[members])]))
        return rows

    def best_hits(self, hits: list[Hit], k: int) -> list[Hit]:
        """Hits already ranked best first: keep the first of each group, k groups at most."""
        seen, kept = set(), []
        for hit in hits:
            group = int(self.group_of_row[hit.row])
            if group not in seen:
                seen.add(group)
                kept.append(hit)
        return kept[:k]


def colbert_maxsim(query_vectors: np.ndarray, doc_vectors: np.ndarray) -> float:
    """Mean over query tokens of the best dot product with any document token. [nq, Dc], [nd, Dc]."""
    if query_vectors.shape[0] == 0 or doc_vectors.shape[0] == 0:
        return 0.0
    similarities = query_vectors.astype(np.float32) @ doc_vectors.astype(np.float32).T  # [nq, nd]
    return float(similarities.max(axis=1).sum() / query_vectors.shape[0])
