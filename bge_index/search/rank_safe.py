"""Rank-safe top-k: the exhaustive answer (rows, order, score bits), found by scoring exactly only the rows whose
upper bounds can reach it.

For each query, in every mode:

1. seeds: the k rows with the best estimates (int8 products for dense, the
   products of the rarest tokens for sparse, both for hybrid) are scored
   exactly; the k-th best of those exact scores (or of proven lower bounds),
   theta, is at most the k-th best exact score of the whole index (k rows do
   reach it); every exact score found later may raise it;
2. candidates: every live row whose upper bound reaches theta
   (dense_prune.py, sparse_prune.py; for the weighted sum, the dense weight
   times the dense bound plus the sparse weight times the exact sparse score
   from the scan, plus the bound of the sum's own float32 rounding); sparse
   candidates are completed token by token, dropping out early;
3. the top-k of the exactly scored rows, by score and then row number.

Proof of rank safety: a row of the exhaustive top-k has an exact score at
least the k-th best, so at least theta, so its upper bound reaches theta: it
is a candidate, scored exactly with the very kernel a full scan uses (same
bits). Rows tied with the k-th best score reach theta too, so the row-order
tie-break sees every one of them. Rows that are not candidates score below
theta and can neither enter the top-k nor tie with it. Deleted rows are never
seeds nor candidates.

Queries are handled in blocks of dense_prune.INT8_QUERY_BLOCK: one int8 pass
per shard serves the block; each query keeps its column of the exact
kernel's query blocks (dense_kernel.py), so its answer is the bits it gets
alone.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bge_index.search.buffers import ThreadBuffers
from bge_index.search.dense_kernel import QUERY_BLOCK, DenseKernel, summation_gamma
from bge_index.search.dense_prune import (ExactPass, ExactShardBound, ShardPruneInfo, best_of_blocks, pack_codes,
                                          shard_pass, value_block_maxima)
from bge_index.search.query import QueryVectors, ScoreWeights
from bge_index.search.sparse_prune import SparseShardQuery, token_max_of
from bge_index.store.vector_store import ShardVectors, release_pages

# Sparse seeds: the rows holding a token with at most rows / N postings in a shard (the rarest ones, which the
# best rows tend to hold) get lower bounds, and the k best are scored exactly for the first threshold; N = 256,
# or 16, or 1 (every token) when the rarer tokens hold fewer than k rows.
SPARSE_SEED_FRACTIONS = (256, 16, 1)
_SLACK = 2.0 ** -40


@dataclass
class Ranked:
    """One query's top-k: global rows best first, their ranking scores and the component scores computed on the
    way (None: not computed), and how many rows were scored exactly to find them."""

    rows: np.ndarray  # [n] int64
    ranking: np.ndarray  # [n] float32
    dense: np.ndarray | None  # [n] float32
    sparse: np.ndarray | None  # [n] float32
    rescored: int


def weighted_sum(dense: np.ndarray, sparse: np.ndarray, weights: ScoreWeights) -> np.ndarray:
    """float32 dense_weight * dense + sparse_weight * sparse, elementwise: the weighted hybrid score's one formula
    (two float32 products, one float32 sum; the same bits for a row in a scan and in a candidate set)."""
    with np.errstate(invalid="ignore"):  # a zero weight times a deleted row's -inf: NaN, never ranked
        return (np.float32(weights.dense) * dense + np.float32(weights.sparse) * sparse).astype(np.float32)


def best_of(rows: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best (score descending, then row ascending) among distinct rows: scoring.top_k's order."""
    return np.lexsort((rows, -scores))[:k]


class _Scored:
    """Rows of one query scored exactly so far (each once): global rows, ranking scores and components."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self.count = 0

    def add(self, rows: np.ndarray, ranking: np.ndarray, dense=None, sparse=None) -> None:
        """Rows not added before ([n] int64 global), their [n] float32 ranking scores and components."""
        self.parts.append((rows, ranking, dense, sparse))
        self.count += len(rows)

    def kth(self, k: int) -> float:
        """The k-th best ranking score scored so far (-inf with fewer): never above the index's k-th best."""
        return kth_best(np.concatenate([p[1] for p in self.parts]) if self.parts else np.zeros(0), k)

    def result(self, k: int, with_dense: bool, with_sparse: bool) -> Ranked:
        """The k best rows scored, in scoring.top_k's order, with the components asked for."""
        if not self.parts:
            empty = np.zeros(0, dtype=np.float32)
            return Ranked(np.zeros(0, dtype=np.int64), empty, empty if with_dense else None,
                          empty if with_sparse else None, 0)
        rows = np.concatenate([p[0] for p in self.parts])
        ranking = np.concatenate([p[1] for p in self.parts])
        keep = best_of(rows, ranking, k)
        dense = np.concatenate([p[2] for p in self.parts])[keep] if with_dense else None
        sparse = np.concatenate([p[3] for p in self.parts])[keep] if with_sparse else None
        return Ranked(rows[keep], ranking[keep], dense, sparse, self.count)


def lookup(rows: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[j] where rows[j] == wanted[i] (rows ascending), else 0: [len(wanted)] float64."""
    if len(rows) == 0:
        return np.zeros(len(wanted))
    at = np.minimum(np.searchsorted(rows, wanted), len(rows) - 1)
    return np.where(rows[at] == wanted, values[at], 0.0)


def in_sorted(values: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    """[len(values)] bool: whether each value is in `sorted_rows` (ascending, distinct), by binary search."""
    if len(sorted_rows) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_rows, values), len(sorted_rows) - 1)
    return sorted_rows[at] == values


def kth_best(values: np.ndarray, k: int) -> float:
    """The k-th largest value, or -inf when there are fewer than k."""
    if len(values) < k or k <= 0:
        return -np.inf
    return float(np.partition(values, len(values) - k)[len(values) - k])


class PrunedSearch:
    """Rank-safe dense, sparse and weighted hybrid top-k over shards that carry pruning data (others are scanned)."""

    def __init__(self, shards: Sequence[ShardVectors], kernel: DenseKernel, sparse_scan, buffers: ThreadBuffers,
                 shared: "PrunedSearch | None" = None):
        """`sparse_scan(query, out=[N] float32)`: writes every row's exact sparse score into `out`
        (scoring.Searcher.sparse_scores). `buffers`: the scratch arrays of the searching threads.
        `shared`: a PrunedSearch over the same shards with other live rows (a filter), whose per-shard data
        (which counts deleted rows too) this one reuses."""
        self.shards = list(shards)
        self.kernel = kernel
        self.sparse_scan = sparse_scan
        self.rows = sum(shard.rows for shard in self.shards)
        self.buffers = buffers
        self._infos: dict[int, ShardPruneInfo] = {} if shared is None else shared._infos
        # Each shard's info is made, and its codes packed (the mapped ones released), once, by the first thread.
        self._pack_lock = threading.Lock() if shared is None else shared._pack_lock
        self._token_max: dict[int, dict[int, float]] = {} if shared is None else shared._token_max
        # Passes read packed copies of the int8 codes (dense_prune.pack_codes: one copy in memory, made on a
        # shard's first pass; worth it in long-lived processes); False: the codes as mapped.
        self.pack = False if shared is None else shared.pack

    def pack_all(self) -> int:
        """Pack every shard's int8 codes now (dense_prune.pack_codes) and let every pass read them: the bytes of
        codes packed (a copy of each in memory; the mapped codes' pages leave it)."""
        self.pack = True
        return sum(shard.codes.nbytes for number, shard in enumerate(self.shards)
                   if shard.codes is not None and self._info(number, packed=True).packed is not None)

    def _info(self, number: int, packed: bool = False) -> ShardPruneInfo:
        """Shard `number`'s ShardPruneInfo (made once, shared with filtered views); with `packed`, its codes packed
        too (tried once). Packed codes serve every pass of the shard from then on, so the mapped codes' pages
        are released (the packed copy replaces them in memory rather than doubling them)."""
        info = self._infos.get(number)
        if info is not None and (info.pack_tried or not packed):
            return info
        with self._pack_lock:  # the first thread makes it (and packs); others wait, then find it made
            info = self._infos.get(number)
            if info is None:
                info = self._infos[number] = ShardPruneInfo.of(self.shards[number])
            if packed and not info.pack_tried:
                shard = self.shards[number]
                norms = None if shard.row_bounds is None else shard.row_bounds[:, 0]  # |k| rounded up
                info.packed = pack_codes(shard.codes, norms)
                info.pack_tried = True
                if info.packed is not None:
                    release_pages(shard.codes)
        return info

    # -- shared steps -----------------------------------------------------------------------------------------

    def _dense_passes(self, dense_queries: np.ndarray, blocks: list[torch.Tensor]) -> list:
        """Per shard: a ShardPass (one int8 pass for the block of queries), or an ExactPass from a full scan."""
        count = dense_queries.shape[0]
        passes = []
        for number, shard in enumerate(self.shards):
            if shard.codes is not None:
                passes.append(shard_pass(shard, self._info(number, packed=self.pack), dense_queries))
            else:
                scores = np.empty((count, shard.rows), dtype=np.float32)
                self.kernel.scan(shard.dense, blocks, count, scores)
                if shard.live is not None:
                    scores[:, ~shard.live] = -np.inf
                passes.append(ExactPass([ExactShardBound(shard, scores[i]) for i in range(count)]))
        return passes

    def _exact_dense(self, bounds: list[list], wants: list[list[np.ndarray]], blocks: list[torch.Tensor]
                     ) -> list[list[np.ndarray]]:
        """exact[query][shard]: float32 exact dense scores of the local rows wants[query][shard] (ascending).

        The queries of one kernel block share its sgemms: per shard, the union of their rows is scored once, and
        each query reads its column (query i: column i % 16 of block i // 16, as in a scan).
        """
        out = [[None] * len(self.shards) for _ in wants]
        for b, block in enumerate(blocks):
            members = range(b * QUERY_BLOCK, min((b + 1) * QUERY_BLOCK, len(wants)))
            pieces, unions = [], {}
            for number, shard in enumerate(self.shards):
                if isinstance(bounds[members[0]][number], ExactShardBound):
                    for i in members:
                        out[i][number] = bounds[i][number].exact(wants[i][number])
                    continue
                union = np.unique(np.concatenate([wants[i][number] for i in members]))
                if len(union):
                    unions[number] = (len(pieces), union)
                    pieces.append((shard.dense, union))
            scored = self.kernel.pieces(pieces, block) if pieces else []
            for number in range(len(self.shards)):
                for i in members:
                    if out[i][number] is not None:
                        continue
                    rows = wants[i][number]
                    if number not in unions or not len(rows):
                        out[i][number] = np.zeros(0, dtype=np.float32)
                        continue
                    piece, union = unions[number]
                    out[i][number] = scored[piece][np.searchsorted(union, rows), i % QUERY_BLOCK]
        return out

    def _sparse_query(self, number: int, query: QueryVectors) -> SparseShardQuery:
        shard = self.shards[number]
        cache = self._token_max.setdefault(number, {})
        return SparseShardQuery(shard, query.sparse_ids, query.sparse_weights, token_max_of(shard, cache))

    def sparse_abs_bound(self, query: QueryVectors) -> float:
        """At least |exact sparse score| of every row: the largest over shards of sum |q_w| * max |d_w| over the
        query's tokens, with the float32 sum's rounding (gamma_(n+1)) on top. Cheap: no pass over any row."""
        weights = np.abs(np.asarray(query.sparse_weights, dtype=np.float64))
        largest = 0.0
        for number, shard in enumerate(self.shards):
            token_max = token_max_of(shard, self._token_max.setdefault(number, {}))
            largest = max(largest, sum(w * token_max(slot) for w, slot in
                                       zip(weights.tolist(), shard.token_slots(query.sparse_ids).tolist())
                                       if slot >= 0))
        return largest * (1 + summation_gamma(len(weights) + 1)) * (1 + _SLACK)

    def _best_estimates(self, estimates: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[np.ndarray]:
        """Per shard, the local rows (ascending) among the k best of all shards' (rows, estimates); any rows would
        be valid seeds, these make the first threshold tight."""
        values = np.concatenate([e for _, e in estimates]) if estimates else np.zeros(0)
        if len(values) <= k:
            return [np.sort(rows) for rows, _ in estimates]
        cut = np.partition(values, len(values) - k)[len(values) - k]
        chosen, left = [], k
        for rows, estimate in estimates:
            picked = rows[estimate >= cut][:max(left, 0)]  # ties at the cut: k rows in all are enough
            left -= len(picked)
            chosen.append(np.sort(picked))
        return chosen

    # -- dense ----------------------------------------------------------------------------------------------

    def dense(self, queries: Sequence[QueryVectors], k: int) -> list[Ranked]:
        """Rank-safe dense top-k of each query (a block of at most INT8_QUERY_BLOCK, starting at a multiple of 16
        of the caller's batch: the exact kernel's columns are positions modulo 16)."""
        dense_queries = np.stack([q.dense for q in queries])
        blocks = DenseKernel.query_blocks(dense_queries)
        passes = self._dense_passes(dense_queries, blocks)
        bounds = [[shard_pass.bounds[i] for shard_pass in passes] for i in range(len(queries))]
        # 1. seeds: the k best estimates over all shards, scored exactly
        best = [shard_pass.best(k) for shard_pass in passes]  # [shard][query]
        seeds = [self._best_estimates([(best[s][i], bounds[i][s].approx(best[s][i])) for s in range(len(passes))], k)
                 for i in range(len(queries))]
        seed_scores = self._exact_dense(bounds, seeds, blocks)
        # 2. candidates: every other live row whose upper bound reaches the k-th best seed score
        thresholds = [kth_best(np.concatenate(scores), k) for scores in seed_scores]
        reached = [shard_pass.reaching(thresholds) for shard_pass in passes]  # [shard][query]
        wants = [[reached[s][i][~in_sorted(reached[s][i], seeds[i][s])] for s in range(len(passes))]
                 for i in range(len(queries))]
        candidate_scores = self._exact_dense(bounds, wants, blocks)
        results = []
        for i in range(len(queries)):
            scored = _Scored()
            for number, shard in enumerate(self.shards):
                for rows, scores in ((seeds[i][number], seed_scores[i][number]),
                                     (wants[i][number], candidate_scores[i][number])):
                    scored.add(rows + shard.start, scores, scores)
            results.append(scored.result(k, True, False))
        return results

    # -- sparse ---------------------------------------------------------------------------------------------

    def sparse(self, query: QueryVectors, k: int) -> Ranked | None:
        """Rank-safe sparse top-k of one query, or None when no bound can prune (the top-k needs rows with no
        shared token: the threshold is not above the rounding slack): the caller scans.

        1. Seeds: every shard's rows holding one of the rarest tokens (at most 1/256 of its rows each, or more
           common ones when those hold fewer than k rows) get
           lower bounds from those tokens' and the heavy columns' products (a gather each); the k best are
           scored exactly: the first threshold.
        2. Per shard, MaxScore (`split`): the longest postings are left out while their bounds stay below the
           threshold; the rows holding a kept token are completed token by token, dropping out as soon as
           their bound falls below the threshold, which rises with every exact score.
        """
        queries = [self._sparse_query(n, query) for n in range(len(self.shards))]
        for fraction in SPARSE_SEED_FRACTIONS:  # rarer tokens first; more common ones if they hold too few rows
            pools = [sq.read_columns(sq.gather(sq.short_tokens(fraction))) for sq in queries]
            if sum(len(pool.rows) for pool in pools) >= k:
                break
        lowers = [sq.lower(pool) for sq, pool in zip(queries, pools)]
        best = self._best_estimates([(pool.rows, lower) for pool, lower in zip(pools, lowers)], k)
        seed_scores = [sq.exact(rows) for sq, rows in zip(queries, best)]
        threshold = max(kth_best(np.concatenate(lowers) if lowers else np.zeros(0), k),
                        kth_best(np.concatenate(seed_scores) if seed_scores else np.zeros(0), k))
        if not all(threshold > sq.slack for sq in queries):
            return None  # rows holding no query token could reach the threshold: only a scan ranks them
        scored = _Scored()
        order = sorted(range(len(queries)), key=lambda n: -(lowers[n].max() if len(lowers[n]) else -np.inf))
        for number in order:  # shards with the best rows first: the threshold rises sooner
            rows, exact = queries[number].reaching(threshold)
            scored.add(rows + self.shards[number].start, exact, None, exact)
            threshold = max(threshold, scored.kth(k))
        return scored.result(k, False, True)

    # -- weighted hybrid ------------------------------------------------------------------------------------

    def hybrid(self, queries: Sequence[QueryVectors], k: int, weights: ScoreWeights) -> list[Ranked]:
        """Rank-safe top-k of dense_weight * dense + sparse_weight * sparse (both weights >= 0) for a block of
        queries (as `dense`).

        The sparse scores come from the full scan (`sparse_scan`: exact, every row, a few milliseconds at a
        million rows), so a row's bound is w_d * (its dense upper bound) + w_s * (its exact sparse score) +
        the float32 rounding of the weighted sum; the int8 cut is one linear test in the integer products
        (both digits) and the sparse score, on the blocks' maxima and then on their rows
        (dense_prune.ShardPass.reaching_with).
        """
        dense_queries = np.stack([q.dense for q in queries])
        blocks = DenseKernel.query_blocks(dense_queries)
        passes = self._dense_passes(dense_queries, blocks)
        bounds = [[shard_pass.bounds[i] for shard_pass in passes] for i in range(len(queries))]
        wd, ws = float(np.float32(weights.dense)), float(np.float32(weights.sparse))
        sparse = self.buffers.get("hybrid sparse", (len(queries), self.rows))  # [Q, N], deleted rows -inf
        for query, scores in zip(queries, sparse):
            self.sparse_scan(query, out=scores)
        parts = [[scores[shard.start:shard.start + shard.rows] for shard in self.shards] for scores in sparse]
        columns = [sparse[:, shard.start:shard.start + shard.rows].T for shard in self.shards]  # [shard]: [rows, Q]
        part_max = [value_block_maxima(column) for column in columns]  # [shard]: [blocks, Q] float32
        # The float32 sum w_d * d + w_s * s is within gamma_2 of its real value times |w_d d| + |w_s s|.
        slacks = []
        for query, per_shard in zip(queries, bounds):
            dense_abs = max((b.abs_max() for b in per_shard), default=0.0)
            sparse_abs = self.sparse_abs_bound(query)
            slacks.append(summation_gamma(2) * (wd * dense_abs + ws * sparse_abs) * (1 + _SLACK)
                          + _SLACK * (wd + ws + 1))
        # 1. seeds: per shard the best dense estimates and rows of the best sparse blocks; the k best of those by
        #    estimate, scored exactly
        best = [shard_pass.best(k) for shard_pass in passes]  # [shard][query]
        seeds = []
        for i in range(len(queries)):
            estimates = []
            for number, (bound, part) in enumerate(zip(bounds[i], parts[i])):
                top = best_of_blocks(part, part_max[number][:, i], k)
                rows = np.union1d(best[number][i], top).astype(np.int64)
                estimates.append((rows, wd * bound.approx(rows) + ws * part[rows].astype(np.float64)))
            seeds.append(self._best_estimates(estimates, k))
        seed_dense = self._exact_dense(bounds, seeds, blocks)
        # 2. candidates: every other live row whose bound reaches the k-th best seed score
        thresholds = np.array([kth_best(np.concatenate([weighted_sum(d, part[rows], weights) for d, part, rows
                                                        in zip(seed_dense[i], parts[i], seeds[i])]), k)
                               for i in range(len(queries))]) - np.array(slacks)
        wants = [[None] * len(self.shards) for _ in queries]  # [query][shard]
        for number, dense_pass in enumerate(passes):  # parts: deleted rows -inf, never reached
            if wd > 0:
                reached = dense_pass.reaching_with(thresholds, wd, columns[number], ws, part_max[number])
            else:
                with np.errstate(invalid="ignore"):
                    reached = [np.flatnonzero(ws * parts[i][number].astype(np.float64) >= thresholds[i])
                               for i in range(len(queries))]
            for i, rows in enumerate(reached):
                wants[i][number] = rows[~in_sorted(rows, seeds[i][number])]
        candidate_dense = self._exact_dense(bounds, wants, blocks)
        results = []
        for i in range(len(queries)):
            scored = _Scored()
            for number, shard in enumerate(self.shards):
                for rows, dense in ((seeds[i][number], seed_dense[i][number]),
                                    (wants[i][number], candidate_dense[i][number])):
                    part = parts[i][number][rows]
                    scored.add(rows + shard.start, weighted_sum(dense, part, weights), dense, part)
            results.append(scored.result(k, True, True))  # rescored: rows whose dense score was computed
        return results
