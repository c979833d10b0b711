"""Scoring and exact top-k over an index's vectors; never loads the model.

Scores (BGE-M3's):
- dense:   dot product of unit vectors (cosine);
- sparse:  sum over shared token ids of q_w * d_w (lexical matching score);
- hybrid:  dense_weight * dense + sparse_weight * sparse (or reciprocal rank
           fusion, or a weighted sum of min-max normalised scores);
- colbert: the hybrid top candidates re-ranked by
           dense_weight * dense + sparse_weight * sparse + colbert_weight * MaxSim,
           MaxSim being the mean over query tokens of the best document-token dot
           (FlagEmbedding's colbert_score). Defaults 1 / 0.3 / 1 follow BGE-M3's training.

dense, sparse and hybrid are exact: the top-k equals brute-force scoring of
every document, ties broken by index order (earlier row first). Where the
index has pruning data, the weighted modes find that top-k by scoring exactly
only the rows whose upper bounds can reach it (rank_safe.py: the same rows,
order and score bits as the full scans here); RRF, min-max normalisation and
--group-by-doc scan.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bge_index.errors import NoColbertVectors
from bge_index.search.buffers import ThreadBuffers
from bge_index.search.dense_kernel import QUERY_BLOCK, DenseKernel, exact_kernel_usable
from bge_index.search.dense_prune import BLOCK_ROWS, INT8_QUERY_BLOCK, block_rows, value_block_maxima
from bge_index.search.query import RRF_DEPTH, RRF_K, Hit, QueryVectors, ScoreWeights
from bge_index.search.rank_safe import PrunedSearch, Ranked, weighted_sum
from bge_index.store.vector_store import ShardVectors

MODES = ("hybrid", "dense", "sparse", "colbert")
FUSIONS = ("weighted", "rrf")
_DENSE_QUERY_BLOCK = QUERY_BLOCK  # queries per sgemm of the exact dense kernel (dense_kernel.py)
SPARSE_PRUNING = False  # sparse mode: MaxScore (True) or the full accumulation (False; faster, measured)
COLBERT_CANDIDATES_PER_HIT = 10
COLBERT_MIN_CANDIDATES = 100
# A filtered search scores its matching rows one by one (gathers) when they are at most this many, or at most
# 1/GATHER_FRACTION of the index: below that, gathering them costs less than a pass over the int8 codes.
GATHER_ROWS = 4096
GATHER_FRACTION = 16
_BLOCK_TOP_K_ROWS = 1 << 16  # top_k over at least this many scores looks at the best blocks' rows only
# Pruning wants finite float32 scores (3.4e38 at most): queries whose scores could come near that are scanned.
_FAR_FROM_OVERFLOW = 2.0 ** 100


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest scores, best first; equal scores in row order; -inf rows (deleted) never.

    [N] -> [at most k]
    """
    n = scores.shape[0]
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if n >= _BLOCK_TOP_K_ROWS and k * BLOCK_ROWS * 4 <= n and scores.dtype == np.float32:
        # The k-th highest block maximum is at most the k-th highest score (k blocks each hold a row reaching
        # it), so every row reaching the k-th score, ties included, lies in a block whose maximum reaches it:
        # those blocks' rows are ranked alone (a NaN anywhere: the plain path, which orders NaN its own way).
        # Of the blocks tied at the k-th maximum only the first k count: each holds a row scoring it, and a later
        # one's rows come after k such rows (a query sharing no token with any row: every score 0).
        maxima = value_block_maxima(scores)  # [blocks]
        if not np.isnan(maxima).any():
            kth_block = float(torch.topk(torch.from_numpy(maxima), k, sorted=False).values.min())
            if kth_block > -np.inf:
                blocks = np.union1d(np.flatnonzero(maxima > kth_block), np.flatnonzero(maxima == kth_block)[:k])
                rows = np.unique(block_rows(blocks, n))  # (the last block's repeat)
                return rows[_plain_top_k(scores[rows], k)]
    return _plain_top_k(scores, k)


def _plain_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """top_k by a partition of every score."""
    n = scores.shape[0]
    if k < n:
        # Fewer than k rows score above the k-th score; of the rows tied with it, the first ones in row order fill
        # the rest (all of them would be sorted for nothing: a query sharing no token with any row ties them all).
        kth_score = scores[np.argpartition(-scores, k - 1)[k - 1]]
        if np.isnan(kth_score):  # fewer than k scores that are not NaN (NaN sorts last): all of them
            candidates = np.flatnonzero(~np.isnan(scores))
        else:
            above = np.flatnonzero(scores > kth_score)
            candidates = np.union1d(above, np.flatnonzero(scores == kth_score)[:k - len(above)])
    else:
        candidates = np.arange(n)
    candidates = candidates[scores[candidates] > -np.inf]
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


class Searcher:
    """Exact search over an index's shards (memory-mapped search files, or vectors built in memory). Several
    threads may search one Searcher at once: its scratch arrays are per thread."""

    def __init__(self, shards: Sequence[ShardVectors], vocab_size: int,
                 doc_ids: Callable[[], np.ndarray] | None = None, _shared: "Searcher | None" = None):
        self.shards = list(shards)
        self.vocab_size = vocab_size
        self.rows = sum(shard.rows for shard in self.shards)
        self._doc_ids = doc_ids
        self._documents: _DocumentGroups | None = None
        self._parent = _shared
        self._kernel = DenseKernel() if _shared is None else _shared._kernel
        self._buffers = ThreadBuffers() if _shared is None else _shared._buffers  # scratch arrays, per thread
        # A weak reference: a bound method would make a cycle that kept a dropped Searcher (and its threads'
        # scratch arrays) alive until Python's cycle collector ran.
        scan = weakref.WeakMethod(self.sparse_scores)
        self._pruned = PrunedSearch(self.shards, self._kernel, lambda query, out: scan()(query, out=out),
                                    self._buffers, shared=None if _shared is None else _shared._pruned)
        self.live_rows = sum(shard.rows if shard.live is None else int(shard.live.sum()) for shard in self.shards)
        # Rank-safe pruning where it applies (False: always full scans; the answers are the same).
        self.prune = True if _shared is None else _shared.prune
        self.last_rescored: list[int] = []  # rows scored exactly for each query of the last search (full scan: all)
        self.pack_request: int | None | bool = False  # pack_codes' budget when asked (None: its default)

    def pack_codes(self, budget: int | None = None) -> int:
        """Give every int8 pass packed copies of the codes (oneDNN's layout, read without re-packing: a batch of 16
        queries costs less than on the mapped codes, and so does a lone query, BENCHMARKS.md; the packed copy
        replaces the mapped codes in memory), when all of them fit in `budget` bytes (default: a quarter
        of the memory this process may use: the machine's, its control group's limit less its use, or what is
        available now, the least); made now, once. Long-lived processes (serve) gain; a short search does not
        repay the packing (about 2.5 s per million rows here). Returns the bytes packed (0: none); the request
        is remembered (`pack_request`), so that a later generation of the index can be packed alike."""
        self.pack_request = budget
        total = sum(shard.codes.nbytes for shard in self.shards if shard.codes is not None)
        if budget is None:
            budget = _memory_bytes() // 4
        if not total or total > budget:
            return 0
        return self._pruned.pack_all()

    @property
    def packs_codes(self) -> bool:
        """Whether int8 passes read packed codes (pack_codes was asked for and its budget allowed it; a shard the
        kernel could not take exactly keeps its mapped codes)."""
        return self._pruned.pack

    @property
    def filtered(self) -> bool:
        """Whether this is a restricted() view, in which only some rows take part."""
        return self._parent is not None

    def restricted(self, allowed: np.ndarray) -> "Searcher":
        """A Searcher over the same vectors in which only the rows with `allowed[row]` ([N] bool) take part, as if
        every other row were deleted: its answers are the exact top-k of those rows (a filter).

        It shares this one's files, kernel and pruning data; a row outside `allowed` is never a hit.
        """
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (self.rows,):
            raise ValueError(f"restricted: {allowed.shape[0]} flags for {self.rows} rows")
        shards = []
        for shard in self.shards:
            part = allowed[shard.start:shard.start + shard.rows]
            live = part.copy() if shard.live is None else (shard.live & part)
            shards.append(dataclasses.replace(shard, live=live))
        return Searcher(shards, self.vocab_size, doc_ids=self._doc_ids, _shared=self)

    def live_row_numbers(self) -> np.ndarray:
        """[live rows] int64: the rows that take part (not deleted, and allowed), ascending."""
        parts = [shard.start + (np.arange(shard.rows) if shard.live is None else np.flatnonzero(shard.live))
                 for shard in self.shards]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.rows

    # -- full scans ------------------------------------------------------------

    def dense_scores(self, query: QueryVectors) -> np.ndarray:
        """[N] float32 cosine scores; deleted rows score -inf."""
        return self.dense_scores_many(query.dense[None, :])[0]

    def dense_scores_many(self, queries: np.ndarray) -> np.ndarray:
        """[Q, N] float32 dot products of every query ([Q, D] float32) with every row; deleted rows -inf.

        The exact dense kernel (dense_kernel.py): chunks of rows widened to float32 (float16 products would lose
        ~1e-2) and multiplied with zero-padded blocks of 16 queries, one pass over the matrix for all of them.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)  # [Q, D]
        blocks = DenseKernel.query_blocks(q)
        out = np.empty((q.shape[0], self.rows), dtype=np.float32)
        for shard in self.shards:
            self._kernel.scan(shard.dense, blocks, q.shape[0], out, shard.start)
            if shard.live is not None:
                out[:, shard.start:shard.start + shard.rows][:, ~shard.live] = -np.inf
        return out

    def sparse_scores(self, query: QueryVectors, out: np.ndarray | None = None) -> np.ndarray:
        """[N] float32 lexical scores from the inverted index: only the query tokens' postings are read; deleted
        rows -inf. `out`: an [N] float32 array to write them into (else a new one).

        torch's index_add_ with int32 row numbers measured twice as fast as
        np.bincount here; a row appears once per token, so each addition is a
        plain float32 sum of the q_w * d_w products, in query-token order.
        """
        scores = np.empty(self.rows, dtype=np.float32) if out is None else out
        total = torch.from_numpy(scores)  # [N], written in place
        total.zero_()
        weights = [float(w) for w in np.asarray(query.sparse_weights, np.float32)]
        for shard in self.shards:
            view = total[shard.start:shard.start + shard.rows]
            accumulate_sparse(shard, query.sparse_ids, weights, view)
            if shard.live is not None:
                view[torch.from_numpy(~shard.live)] = -np.inf
        return scores

    # -- per-hit scores ----------------------------------------------------------

    def _locate(self, row: int) -> tuple[ShardVectors, int]:
        for shard in self.shards:
            if row < shard.start + shard.rows:
                return shard, row - shard.start
        raise IndexError(row)

    def dense_score(self, query: QueryVectors, row: int) -> float:
        """Dense score of one row (numbered in the whole index), by the exact kernel: the bits a scan gives it."""
        return float(self.dense_scores_of(query, np.array([row], dtype=np.int64))[0])

    def dense_scores_of(self, query: QueryVectors, rows: np.ndarray) -> np.ndarray:
        """[len(rows)] float32 dense scores of a few rows (numbered in the whole index), by the exact kernel with
        the query alone in its block."""
        [block] = DenseKernel.query_blocks(query.dense[None, :])
        pieces, places = [], []
        for shard in self.shards:
            inside = np.flatnonzero((rows >= shard.start) & (rows < shard.start + shard.rows))
            if len(inside):
                pieces.append((shard.dense, rows[inside] - shard.start))
                places.append(inside)
        out = np.zeros(len(rows), dtype=np.float32)
        for inside, scores in zip(places, self._kernel.pieces(pieces, block)):  # one sgemm for up to 1,024 rows
            out[inside] = scores[:, 0]
        return out

    def sparse_score(self, query: QueryVectors, row: int) -> float:
        """Sparse (lexical) score of one row (numbered in the whole index), as `sparse_scores_of` computes it."""
        return float(self.sparse_scores_of(query, np.array([row], dtype=np.int64))[0])

    def sparse_contributions(self, query: QueryVectors, row: int) -> list[tuple[int, float]]:
        """(token id, q_w * d_w) for every token shared by query and document, largest first."""
        return sorted(self._shared_tokens(query, row), key=lambda pair: -pair[1])

    def _shared_tokens(self, query: QueryVectors, row: int) -> list[tuple[int, float]]:
        shard, local = self._locate(row)
        shared = []
        for token, weight in zip(query.sparse_ids.tolist(), query.sparse_weights.tolist()):
            rows, weights = shard.postings(token)
            at = int(np.searchsorted(rows, np.uint32(local)))  # uint32: no widening of the postings
            if at < len(rows) and rows[at] == local:
                shared.append((token, float(np.float32(weights[at]) * np.float32(weight))))
        return shared

    # -- ranking -----------------------------------------------------------------

    def search(self, query: QueryVectors, k: int = 10, mode: str = "hybrid", weights: ScoreWeights = ScoreWeights(),
               fetch_colbert: Callable[[Sequence[int]], list[np.ndarray]] | None = None,
               group_by_doc: bool = False, fusion: str = "weighted", normalize: str | None = None,
               dense_scores: np.ndarray | None = None) -> list[Hit]:
        """The k best rows, or with `group_by_doc` the best row of each of the k best documents.

        A document's score is the score of its best passage (row); exact for dense, sparse and hybrid.
        `dense_scores` may pass this query's [N] dense scores, already computed (then the scan path is used).
        """
        if dense_scores is None:
            return self.search_many([query], k, mode, weights, fetch_colbert=fetch_colbert, group_by_doc=group_by_doc,
                                    fusion=fusion, normalize=normalize)[0]
        _check_mode(mode, fusion)
        self.last_rescored = [self.rows]
        return self._scan_search(query, k, mode, weights, fetch_colbert, group_by_doc, fusion, normalize, dense_scores)

    def _scan_search(self, query: QueryVectors, k: int, mode: str, weights: ScoreWeights,
                     fetch_colbert, group_by_doc: bool, fusion: str, normalize: str | None,
                     dense_scores: np.ndarray | None, sparse_scores: np.ndarray | None = None) -> list[Hit]:
        """Every row scored (full scans): the definition the pruned path must equal."""
        dense = dense_scores
        if mode != "sparse" and dense is None:
            dense = self.dense_scores(query)  # [N]
        sparse = sparse_scores
        if mode != "dense" and sparse is None:
            # [N], in this thread's buffer: only this search reads it (the hits copy their scores)
            sparse = self.sparse_scores(query, out=self._buffers.get("scan", self.rows))
        if mode == "dense":
            ranking = dense
        elif mode == "sparse":
            ranking = sparse
        else:
            ranking = fuse(dense, sparse, weights, fusion, normalize)
        groups = self._document_groups() if group_by_doc else None
        if mode == "colbert":
            candidates = top_k(ranking, max(k * COLBERT_CANDIDATES_PER_HIT, COLBERT_MIN_CANDIDATES))
            hits = self._colbert_rerank(query, candidates, weights, fetch_colbert)
            return groups.best_hits(hits, k) if groups is not None else hits[:k]
        rows = np.asarray(groups.top_rows(ranking, k) if groups is not None else top_k(ranking, k), dtype=np.int64)
        return self._hits(query, rows, ranking, dense, sparse)

    def search_many(self, queries: Sequence[QueryVectors], k: int = 10, mode: str = "hybrid",
                    weights: ScoreWeights = ScoreWeights(), batch: int = 128, **options) -> list[list[Hit]]:
        """Many queries, sharing each pass over the dense matrix (int8 codes when pruning, else float16) among
        a block of them. Each query's hits are the bits it gets searched alone."""
        _check_mode(mode, options.get("fusion", "weighted"))
        if self.filtered and queries and self.live_rows <= max(GATHER_ROWS, self.rows // GATHER_FRACTION):
            return self._gathered_search(queries, k, mode, weights, **options)
        if self._can_prune(queries, k, mode, weights, **options):
            return self._pruned_search(queries, k, mode, weights, options.get("fetch_colbert"))
        results: list[list[Hit]] = []
        for start in range(0, len(queries), batch):
            group = queries[start:start + batch]
            dense = self.dense_scores_many(np.stack([q.dense for q in group])) if mode != "sparse" else None
            for column, query in enumerate(group):
                results.append(self._scan_search(query, k, mode, weights, options.get("fetch_colbert"),
                                                 options.get("group_by_doc", False), options.get("fusion", "weighted"),
                                                 options.get("normalize"),
                                                 dense_scores=None if dense is None else dense[column]))
        self.last_rescored = [self.rows] * len(queries)
        return results

    # -- few rows: gathered ----------------------------------------------------

    def _gathered_search(self, queries: Sequence[QueryVectors], k: int, mode: str, weights: ScoreWeights,
                         fetch_colbert=None, group_by_doc: bool = False, fusion: str = "weighted",
                         normalize: str | None = None) -> list[list[Hit]]:
        """A filter's few rows scored one by one, by the kernels a scan uses (the same bits), never a pass over
        the whole matrix. Weighted scores rank those rows directly; the other fusions, grouping and ColBERT get
        [N] score arrays holding -inf elsewhere, what a scan of this view makes, and rank them as a scan does."""
        rows = self.live_row_numbers()
        results = []
        for query in queries:
            dense = self.dense_scores_of(query, rows) if mode != "sparse" else None  # [m]
            sparse = self.sparse_scores_of(query, rows) if mode != "dense" else None  # [m]
            if mode != "colbert" and fusion == "weighted" and not normalize and not group_by_doc:
                ranking = dense if mode == "dense" else sparse if mode == "sparse" else \
                    weighted_sum(dense, sparse, weights)
                best = top_k(ranking, k)  # ties in position order: row order, the rows being ascending
                found = Ranked(rows[best], ranking[best], None if dense is None else dense[best],
                               None if sparse is None else sparse[best], len(rows))
                results.append(self._ranked_hits(query, found))
                continue
            results.append(self._scan_search(query, k, mode, weights, fetch_colbert, group_by_doc, fusion,
                                             normalize, self._spread(rows, dense), self._spread(rows, sparse)))
        self.last_rescored = [len(rows)] * len(queries)
        return results

    def _spread(self, rows: np.ndarray, scores: np.ndarray | None) -> np.ndarray | None:
        """[N] float32: `scores` at `rows`, -inf elsewhere (None stays None)."""
        if scores is None:
            return None
        out = np.full(self.rows, -np.inf, dtype=np.float32)
        out[rows] = scores
        return out

    # -- rank-safe pruning -----------------------------------------------------

    def _can_prune(self, queries: Sequence[QueryVectors], k: int, mode: str, weights: ScoreWeights,
                   group_by_doc: bool = False, fusion: str = "weighted", normalize: str | None = None,
                   **_options) -> bool:
        """Whether rank_safe.py applies: weighted scores (no RRF, no min-max, no grouping), k below the live rows,
        float32 matmuls really float32, finite queries and non-negative weights; for dense scores, quantized
        shards to read. Otherwise the full scans give the same answer."""
        if not self.prune or group_by_doc or fusion != "weighted" or normalize or not queries or k <= 0:
            return False
        depth = max(k * COLBERT_CANDIDATES_PER_HIT, COLBERT_MIN_CANDIDATES) if mode == "colbert" else k
        if depth >= self.live_rows or not exact_kernel_usable():
            return False
        # The bounds assume finite float32 scores: a score that could overflow to inf is left to the scans.
        pair = np.array([weights.dense, weights.sparse], dtype=np.float64)
        if mode != "dense" and not all(np.all(np.isfinite(q.sparse_weights)) for q in queries):
            return False
        if mode == "sparse":
            # Measured on 1M rows (BENCHMARKS.md): MaxScore 15.5 ms p50 against 7.9 ms for the full accumulation
            # over the same postings (its per-shard Python work outweighs the rows it skips), so sparse scans.
            # SPARSE_PRUNING turns it on again (the tests keep it exact).
            return SPARSE_PRUNING and all(self._pruned.sparse_abs_bound(q) < _FAR_FROM_OVERFLOW for q in queries)
        if not any(shard.codes is not None for shard in self.shards):
            return False
        # |dense score| <= |q| |x|, and a float16 row has |x| <= 65504 sqrt(D).
        row_norm = 65504.0 * np.sqrt(self.shards[0].dense.shape[1])
        dense_magnitude = max(float(np.linalg.norm(q.dense.astype(np.float64))) * row_norm for q in queries)
        if not dense_magnitude < _FAR_FROM_OVERFLOW:  # (NaN or inf components: not below)
            return False
        if mode == "dense":
            return True
        return bool(np.all(np.isfinite(pair)) and np.all(pair >= 0)
                    and pair[0] * dense_magnitude < _FAR_FROM_OVERFLOW
                    and all(max(pair[1], 1.0) * self._pruned.sparse_abs_bound(q) < _FAR_FROM_OVERFLOW
                            for q in queries))

    def _pruned_search(self, queries: Sequence[QueryVectors], k: int, mode: str, weights: ScoreWeights,
                       fetch_colbert) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        rescored: list[int] = []
        depth = max(k * COLBERT_CANDIDATES_PER_HIT, COLBERT_MIN_CANDIDATES) if mode == "colbert" else k
        # Blocks of INT8_QUERY_BLOCK queries (a multiple of 16: a query keeps its column of the exact kernel).
        for start in range(0, len(queries), INT8_QUERY_BLOCK):
            group = list(queries[start:start + INT8_QUERY_BLOCK])
            if mode == "dense":
                ranked = self._pruned.dense(group, k)
            elif mode == "sparse":
                ranked = [self._pruned.sparse(query, k) or self._scanned_sparse(query, k) for query in group]
            else:
                ranked = self._pruned.hybrid(group, depth, weights)
            for query, found in zip(group, ranked):
                rescored.append(found.rescored)
                if mode == "colbert":
                    results.append(self._colbert_rerank(query, found.rows, weights, fetch_colbert)[:k])
                else:
                    results.append(self._ranked_hits(query, found))
        self.last_rescored = rescored
        return results

    def _scanned_sparse(self, query: QueryVectors, k: int) -> Ranked:
        """A sparse top-k by the full scan (when no bound prunes), as rank_safe.Ranked."""
        scores = self.sparse_scores(query, out=self._buffers.get("scan", self.rows))
        rows = top_k(scores, k)
        return Ranked(rows, scores[rows], None, scores[rows], self.rows)  # (copies: the buffer is reused)

    def _ranked_hits(self, query: QueryVectors, found: Ranked) -> list[Hit]:
        dense = found.dense if found.dense is not None else self.dense_scores_of(query, found.rows)
        sparse = found.sparse if found.sparse is not None else self.sparse_scores_of(query, found.rows)
        return [Hit(int(row), float(score), float(d), float(s))
                for row, score, d, s in zip(found.rows, found.ranking, dense, sparse)]

    def _document_groups(self) -> "_DocumentGroups":
        if self._parent is not None:  # a restricted view: the whole index's groups, built once for all views
            return self._parent._document_groups()
        if self._documents is None:
            if self._doc_ids is None:
                raise ValueError("grouping by document needs the index's document ids")
            self._documents = _DocumentGroups(self._doc_ids())
        return self._documents

    def _hits(self, query: QueryVectors, rows: np.ndarray, ranking: np.ndarray,
              dense: np.ndarray | None, sparse: np.ndarray | None) -> list[Hit]:
        """Hits with both component scores: from the full scans where they were made, else for these rows only."""
        dense_scores = dense[rows] if dense is not None else self.dense_scores_of(query, rows)
        sparse_scores = sparse[rows] if sparse is not None else self.sparse_scores_of(query, rows)
        return [Hit(int(row), float(ranking[row]), float(d), float(s))
                for row, d, s in zip(rows, dense_scores, sparse_scores)]

    def sparse_scores_of(self, query: QueryVectors, rows: np.ndarray) -> np.ndarray:
        """[len(rows)] float32 lexical scores of a few rows, by binary search in the query tokens' postings (a
        gather from the heavy columns): the bits the scan gives them."""
        totals = np.zeros(len(rows), dtype=np.float32)
        weights = np.asarray(query.sparse_weights, dtype=np.float32)
        for shard in self.shards:
            inside = (rows >= shard.start) & (rows < shard.start + shard.rows)
            if not inside.any():
                continue
            local = (rows[inside] - shard.start).astype(np.uint32)
            partial = np.zeros(len(local), dtype=np.float32)
            slots = shard.token_slots(query.sparse_ids)  # [tokens]: one search for all of them
            heavy = shard.heavy_slots(query.sparse_ids)
            for slot, at, weight in zip(slots.tolist(), heavy.tolist(), weights):  # query order, as the scan adds
                if at >= 0:  # a heavy column: the scan adds its products to every row, zeros included
                    partial += shard.heavy_columns[at][local] * weight
                    continue
                if slot < 0:
                    continue
                token_rows = shard.posting_rows[shard.token_ptr[slot]:shard.token_ptr[slot + 1]]
                token_weights = shard.posting_weights[shard.token_ptr[slot]:shard.token_ptr[slot + 1]]
                at = np.minimum(np.searchsorted(token_rows, local), len(token_rows) - 1)
                found = token_rows[at] == local
                partial[found] += token_weights[at[found]] * weight
            totals[inside] = partial
        return totals

    def _colbert_rerank(self, query: QueryVectors, candidates: np.ndarray, weights: ScoreWeights,
                        fetch_colbert: Callable[[Sequence[int]], list[np.ndarray]] | None) -> list[Hit]:
        """The hybrid top candidates (rows) re-ranked by dense + sparse + colbert, best first."""
        if fetch_colbert is None or query.colbert is None:
            raise NoColbertVectors("this index has no ColBERT vectors (build it with --colbert)")
        doc_vectors = fetch_colbert(candidates.tolist())
        hits = []
        for row, vectors in zip(candidates.tolist(), doc_vectors):
            dense, sparse = self.dense_score(query, row), self.sparse_score(query, row)
            colbert = colbert_maxsim(query.colbert, vectors)
            score = weights.dense * dense + weights.sparse * sparse + weights.colbert * colbert
            hits.append(Hit(row, float(score), dense, sparse, colbert))
        hits.sort(key=lambda h: (-h.score, h.row))
        return hits


def _memory_bytes() -> int:
    """The memory this process may use, in bytes, the least of: the machine's; for its control group and every
    group above it, the limit less what the group uses (cgroup v2 memory.max / memory.current, v1
    memory.limit_in_bytes / memory.usage_in_bytes); what /proc/meminfo calls available. 0 when none can be told."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    sizes.extend(_cgroup_room())
    try:
        with open("/proc/meminfo") as info:
            sizes.extend(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError):
        pass
    return max(0, min(sizes)) if sizes else 0


def _cgroup_room() -> list[int]:
    """limit - usage of this process's memory control group and of each group above it (where readable)."""
    try:
        with open("/proc/self/cgroup") as groups:
            lines = groups.read().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and controllers == "":  # v2
            base, files = "/sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            base, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):  # this group, then each one above it
            folder = os.path.join(base, *parts[:depth])
            try:
                with open(os.path.join(folder, files[0])) as limit, open(os.path.join(folder, files[1])) as used:
                    rooms.append(int(limit.read().strip()) - int(used.read().strip()))  # "max": ValueError
            except (OSError, ValueError):
                continue
    return rooms


def _check_mode(mode: str, fusion: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (use {', '.join(MODES)})")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r} (use {', '.join(FUSIONS)})")


def accumulate_sparse(shard: ShardVectors, ids: np.ndarray, weights: list[float], view: torch.Tensor) -> None:
    """Add one query's products q_w * d_w to a shard's [rows] float32 scores (`view`, zeros to start with), token
    by token in query order: `ids` the query's token ids, `weights` their float32 weights as Python floats. Only
    those tokens' postings (or dense columns) are read; deleted rows are the caller's to mark."""
    slots, heavy = shard.token_slots(ids).tolist(), shard.heavy_slots(ids).tolist()
    for slot, at, weight in zip(slots, heavy, weights):
        # Products first, then plain adds (never alpha=, which may fuse them): the bits of
        # sparse_prune.SparseShardQuery.exact, which pruning scores candidates with.
        if at >= 0:
            # A token in most rows: one streaming add of its dense column (zeros where absent).
            view.add_(torch.from_numpy(shard.heavy_columns[at]) * weight)
        elif slot >= 0:
            start, end = shard.token_ptr[slot], shard.token_ptr[slot + 1]
            # Rows are uint32 below 2**31, so their bits read as int32 are the same numbers.
            view.index_add_(0, torch.from_numpy(shard.posting_rows[start:end].view(np.int32)),
                            torch.from_numpy(shard.posting_weights[start:end]) * weight)


def fuse(dense: np.ndarray, sparse: np.ndarray, weights: ScoreWeights, fusion: str = "weighted",
         normalize: str | None = None) -> np.ndarray:
    """[N] hybrid scores from dense and sparse [N] scores.

    weighted: dense_weight * dense + sparse_weight * sparse, optionally each min-max
              normalised to [0, 1] over all live documents first (Pyserini's --normalize);
    rrf:      reciprocal rank fusion, sum over the two rankings of 1 / (60 + rank),
              ranks 1.. over each list's top RRF_DEPTH documents (others get nothing from
              that list), as in Cormack et al. and Pyserini's fusion.
    """
    if fusion == "rrf":
        fused = np.zeros_like(dense)
        for scores in (dense, sparse):
            top = top_k(scores, RRF_DEPTH)
            top = top[np.isfinite(scores[top])]
            fused[top] += 1.0 / (RRF_K + np.arange(1, len(top) + 1, dtype=np.float32))
        fused[~np.isfinite(dense)] = -np.inf  # deleted rows stay out
        return fused
    # A row that does not take part (deleted, or outside a filter) scores -inf in both parts; a negative weight
    # would turn that into +inf, a zero weight into NaN: it stays out, whatever the weights.
    left_out = np.isneginf(dense) | np.isneginf(sparse)
    if normalize == "minmax":
        dense, sparse = _minmax(dense), _minmax(sparse)
    fused = weighted_sum(dense, sparse, weights)
    fused[left_out] = -np.inf
    return fused


def _minmax(scores: np.ndarray) -> np.ndarray:
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return scores
    low, high = finite.min(), finite.max()
    span = high - low
    return (scores - low) / span if span > 0 else np.where(np.isfinite(scores), 0.0, scores).astype(np.float32)


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
        best = np.fmax.reduceat(scores[self.rows_by_group], self.starts)  # [groups]; a NaN row never wins
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
