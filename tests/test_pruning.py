"""Rank-safe pruning (issue 17): the pruned top-k is the full scan's, rows, order and score bits, on adversarial
data; the bounds it rests on hold for every row; batches and lone queries agree; the pruning files are part of
the index format (built, checked, optional)."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from helpers import packing_works

from bge_index.search import dense_prune, rank_safe, scoring
from bge_index.search.dense_kernel import DenseKernel
from bge_index.search.dense_prune import ShardPruneInfo, int8_products, shard_bounds, shard_pass
from bge_index.search.query import QueryVectors, ScoreWeights
from bge_index.search.scoring import Searcher, top_k
from bge_index.search.sparse_prune import SparseShardQuery, token_max_of
from bge_index.store.manifest import Manifest, read_manifest
from bge_index.store.names import BASE_SEARCH_KINDS, PRUNE_SEARCH_KINDS, SEARCH_DIR
from bge_index.store.shard_reader import verify_index
from bge_index.store.shard_writer import IndexWriter, RowBatch
from bge_index.store.vector_store import (OpenIndex, ShardVectors, heavy_columns, invert, quantize_dense,
                                          release_pages, token_abs_max)

DIM = 64
VOCAB = 400


@pytest.fixture(autouse=True)
def sparse_pruning_on(monkeypatch):
    """Search scans in sparse mode (it measured faster); MaxScore stays tested: these tests turn it on."""
    monkeypatch.setattr(scoring, "SPARSE_PRUNING", True)


# ---------------------------------------------------------------------------
# building shards and queries


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def sparse_rows(rng, n: int, vocab: int = VOCAB, tokens: int = 12, zipf: float = 1.1) -> list[dict[int, float]]:
    """Zipf-drawn token ids (some in most rows: heavy columns), weights in (0.01, 0.31]."""
    cdf = np.cumsum(1 / np.arange(1, vocab + 1) ** zipf)
    cdf /= cdf[-1]
    rows = []
    for _ in range(n):
        ids = np.unique(np.searchsorted(cdf, rng.random(tokens)))
        rows.append({int(t): float(np.float32(rng.random() * 0.3 + 0.01)) for t in ids})
    return rows


def shard(dense: np.ndarray, sparse: list[dict[int, float]], start: int = 0, live: np.ndarray | None = None,
          prune: bool = True) -> ShardVectors:
    """A shard's search data built in memory, as build_search_files writes it (pruning data included)."""
    dense = np.asarray(dense, dtype=np.float32).astype(np.float16)
    indptr, indices, values = [0], [], []
    for row in sparse:
        for token in sorted(row):
            indices.append(token)
            values.append(row[token])
        indptr.append(len(indices))
    token_ids, token_ptr, rows, weights = invert(np.array(indptr), np.array(indices, dtype=np.uint32),
                                                 np.array(values, dtype=np.float32), VOCAB)
    heavy, columns = heavy_columns(token_ids, token_ptr, rows, weights, len(dense))
    extra = {}
    if prune:
        frame, codes, bounds = quantize_dense(dense)
        extra = dict(codes=codes, frame=frame, row_bounds=bounds, token_max=token_abs_max(token_ptr, weights))
    return ShardVectors(start, dense, token_ids, token_ptr, rows, weights, heavy, columns, live=live, **extra)


def searcher(parts: list[tuple[np.ndarray, list[dict[int, float]], np.ndarray | None]], prune: bool = True
             ) -> Searcher:
    shards, start = [], 0
    for dense, sparse, live in parts:
        shards.append(shard(dense, sparse, start, live, prune))
        start += len(dense)
    return Searcher(shards, VOCAB)


def query(dense: np.ndarray, sparse: dict[int, float]) -> QueryVectors:
    tokens = sorted(sparse)
    return QueryVectors(np.asarray(dense, dtype=np.float32), np.array(tokens, dtype=np.uint32),
                        np.array([sparse[t] for t in tokens], dtype=np.float32))


def hits_bits(hits) -> list[tuple]:
    """Rows and every score's float32 bits."""
    return [(h.row, np.float32(h.score).tobytes(), np.float32(h.dense).tobytes(), np.float32(h.sparse).tobytes())
            for h in hits]


def assert_same_as_scan(index: Searcher, queries: list[QueryVectors], k: int, modes=("dense", "sparse", "hybrid"),
                        weights: ScoreWeights = ScoreWeights()) -> None:
    """Pruned answers (each query alone, and all in one batch) equal the full scan's, bit for bit."""
    for mode in modes:
        index.prune = False
        scanned = [index.search(q, k, mode, weights) for q in queries]
        index.prune = True
        batch = index.search_many(queries, k, mode, weights)
        for q, expected, batched in zip(queries, scanned, batch):
            alone = index.search(q, k, mode, weights)
            assert hits_bits(alone) == hits_bits(expected), mode
            assert hits_bits(batched) == hits_bits(expected), mode


def random_parts(rng, sizes, deleted_share: float = 0.0, dim: int = DIM):
    parts = []
    for n in sizes:
        live = None
        if deleted_share:
            live = rng.random(n) >= deleted_share
        parts.append((unit(rng.standard_normal((n, dim))), sparse_rows(rng, n), live))
    return parts


def random_queries(rng, count: int, dim: int = DIM) -> list[QueryVectors]:
    return [query(unit(rng.standard_normal(dim)), sparse_rows(rng, 1, tokens=6)[0]) for _ in range(count)]


# ---------------------------------------------------------------------------
# the bounds themselves


def test_int8_products_are_exact_integers():
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (300, 96), dtype=np.int8)
    codes[0] = 127
    codes[1] = -127
    query_codes = rng.integers(-127, 128, (96, 5), dtype=np.int8)
    query_codes[:, 0] = 127
    expected = codes.astype(np.int64) @ query_codes.astype(np.int64)  # [rows, columns]
    assert np.array_equal(int8_products(codes, query_codes), expected)


def test_one_query_column_goes_through_simsimd_exactly(monkeypatch):
    rng = np.random.default_rng(20)
    codes = rng.integers(-127, 128, (5000, 1024), dtype=np.int8)
    codes[:3] = 127
    query_codes = rng.integers(-127, 128, (1024, 1), dtype=np.int8)
    query_codes[:512] = 127
    expected = codes.astype(np.int64) @ query_codes.astype(np.int64)  # [rows, columns]
    assert np.array_equal(int8_products(codes, query_codes), expected)
    monkeypatch.setattr(dense_prune, "_simsimd_checked", False)  # as if simsimd were not installed
    assert np.array_equal(int8_products(codes, query_codes), expected)


def test_int8_products_fall_back_to_exact_float64(monkeypatch):
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (50, 40), dtype=np.int8)
    query_codes = rng.integers(-127, 128, (40, 3), dtype=np.int8)
    monkeypatch.setattr(dense_prune, "_int_mm_checked", False)  # as if _int_mm were missing or inexact here
    monkeypatch.setattr(dense_prune, "_simsimd_checked", False)
    expected = codes.astype(np.int64) @ query_codes.astype(np.int64)  # [rows, columns]
    assert np.array_equal(int8_products(codes, query_codes), expected)
    assert np.array_equal(int8_products(codes, query_codes[:, :1]), expected[:, :1])


def _exact_scores(dense16: np.ndarray, q: np.ndarray) -> np.ndarray:
    kernel = DenseKernel()
    [block] = DenseKernel.query_blocks(q[None, :])
    return kernel.rows(dense16, np.arange(len(dense16)), block, 0)


@pytest.mark.parametrize("layout", ["isotropic", "cone", "outliers", "constant"])
def test_every_rows_exact_score_lies_within_its_bounds(layout):
    rng = np.random.default_rng(2)
    n = 3000
    if layout == "isotropic":
        x = unit(rng.standard_normal((n, DIM)))
    elif layout == "cone":  # real embeddings: one shared direction, small differences (a random-weight model's)
        x = unit(np.ones(DIM) + 0.01 * rng.standard_normal((n, DIM)))
    elif layout == "outliers":  # components far past the step's quantile: clipped codes, the largest errors
        x = rng.standard_normal((n, DIM))
        x[::7, 3] = 40.0
        x = unit(x)
    else:
        x = np.tile(unit(rng.standard_normal(DIM)), (n, 1))
    dense16 = x.astype(np.float16)
    frame, codes, row_bounds = quantize_dense(dense16)
    part = ShardVectors(0, dense16, np.zeros(0, np.uint32), np.zeros(1, np.int64), np.zeros(0, np.uint32),
                        np.zeros(0, np.float32), codes=codes, frame=frame, row_bounds=row_bounds,
                        token_max=np.zeros(0, np.float32))  # [n, D] rows, no sparse vectors
    info = ShardPruneInfo.of(part)
    queries = [unit(rng.standard_normal(DIM)), x[5], -x[7], unit(x[0] + 1e-3 * rng.standard_normal(DIM)),
               np.eye(DIM, dtype=np.float32)[3], 3 * x[9]]
    for digits in (1, 2):
        info.digits = digits
        for q, bound in zip(queries, shard_bounds(part, info, np.stack(queries))):
            exact = _exact_scores(dense16, q).astype(np.float64)
            rows = np.arange(n)
            assert np.all(bound.lower(rows) <= exact) and np.all(exact <= bound.upper(rows)), layout
            # and the integer pass keeps every row whose bound reaches a threshold
            for threshold in np.quantile(exact, [0.5, 0.99, 0.999]):
                expected = rows[bound.upper(rows) >= threshold]
                assert np.array_equal(bound.reaching(threshold), expected)


@pytest.mark.parametrize("slab_pairs", [3, 8192])
@pytest.mark.parametrize("layout", ["isotropic", "cone", "outliers", "constant"])
def test_the_hybrid_cut_keeps_every_row_whose_weighted_bound_reaches_the_threshold(monkeypatch, layout, slab_pairs):
    """ShardPass.reaching_with (the hybrid's int8 cut: a linear test on blocks, then rows (a few blocks at a
    time), then each row's own bound) returns exactly the rows where weight * upper + extra_weight * extra
    reaches each query's threshold; rows whose error is far past the others' (outliers) get their own bound."""
    monkeypatch.setattr(dense_prune, "_SLAB_PAIRS", slab_pairs)
    rng = np.random.default_rng(21)
    n = 3000
    base = {"isotropic": np.zeros(DIM), "cone": np.ones(DIM), "outliers": np.zeros(DIM), "constant": np.zeros(DIM)}
    x = base[layout] + (0.01 if layout == "cone" else 1.0) * rng.standard_normal((n, DIM))
    if layout == "outliers":
        x[::7, 3] = 40.0
    if layout == "constant":  # every row the same: each has the largest error, so bounds sit right at the cut
        x[:] = x[0]
    dense16 = unit(x).astype(np.float16)
    frame, codes, row_bounds = quantize_dense(dense16)
    if layout == "outliers":  # rows whose error bound is 10x the rest: outliers, which the linear test misses
        row_bounds[::97, 1] *= 10  # (a looser bound is still a bound)
    part = ShardVectors(0, dense16, np.zeros(0, np.uint32), np.zeros(1, np.int64), np.zeros(0, np.uint32),
                        np.zeros(0, np.float32), codes=codes, frame=frame, row_bounds=row_bounds,
                        token_max=np.zeros(0, np.float32))
    info = ShardPruneInfo.of(part)
    assert (len(info.outliers) > 0) == (layout == "outliers")
    queries = np.stack([unit(rng.standard_normal(DIM)), dense16[5].astype(np.float32), np.zeros(DIM, np.float32),
                        unit(dense16[0].astype(np.float32) + 1e-3 * rng.standard_normal(DIM))])
    extra = rng.random((len(queries), n)).astype(np.float32) * 0.6 - 0.1  # [Q, n]; its transpose is [n, Q]
    extra[:, ::11] = -np.inf  # deleted rows' sparse score
    rows = np.arange(n)
    for digits in (1, 2):
        info.digits = digits
        one_pass = shard_pass(part, info, queries)
        for weight, extra_weight in ((1.0, 0.3), (0.5, 0.0), (1.0, 3.0)):
            with np.errstate(invalid="ignore"):  # 0 * -inf: NaN, which reaches nothing
                upper = [weight * bound.upper(rows) + extra_weight * extra[i].astype(np.float64)
                         for i, bound in enumerate(one_pass.bounds)]
            for quantile in (0.5, 0.99, 0.9995, 1.0):
                thresholds = np.array([np.quantile(u[np.isfinite(u)], quantile) for u in upper])
                found = one_pass.reaching_with(thresholds, weight, extra.T, extra_weight)
                for i in range(len(queries)):
                    assert np.array_equal(found[i], rows[upper[i] >= thresholds[i]]), (layout, digits, quantile, i)


def test_the_hybrid_cut_holds_its_temporaries_to_a_few_blocks_at_a_time():
    """Where nothing is pruned (every row reaches), the cut's [pairs, 64] slabs for 32 queries over 131,072 rows
    would take about 200 MB at once; a few thousand blocks at a time keep them near 20 MB."""
    import tracemalloc

    rng = np.random.default_rng(22)
    n, count = 1 << 17, 32
    dense16 = unit(rng.standard_normal((n, DIM))).astype(np.float16)
    frame, codes, row_bounds = quantize_dense(dense16)
    part = ShardVectors(0, dense16, np.zeros(0, np.uint32), np.zeros(1, np.int64), np.zeros(0, np.uint32),
                        np.zeros(0, np.float32), codes=codes, frame=frame, row_bounds=row_bounds,
                        token_max=np.zeros(0, np.float32))
    one_pass = shard_pass(part, ShardPruneInfo.of(part), unit(rng.standard_normal((count, DIM))))
    extra = np.zeros((n, count), dtype=np.float32)
    tracemalloc.start()
    try:
        found = one_pass.reaching_with(np.full(count, -0.5), 1e-3, extra, 1.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(len(rows) == n for rows in found)
    result = sum(rows.nbytes for rows in found)  # what it returns: every row for every query
    assert peak - result < 64 << 20


def test_scores_that_could_overflow_float32_are_left_to_the_scans():
    """Query weights of 3e38 make some rows' sparse scores +inf in float32: the bounds, made for finite scores,
    would lose rows (0 * inf is NaN), so such queries are scanned and answer as the scan does."""
    rng = np.random.default_rng(23)
    dense, sparse, live = random_parts(rng, [2048])[0]
    for row in range(0, 2048, 64):
        sparse[row] = {396: 0.3, 397: 0.3, 398: 0.3, 399: 0.3}
    index = searcher([(dense, sparse, live)])
    huge = query(unit(rng.standard_normal(DIM)), {396: 3e38, 397: 3e38, 398: 3e38, 399: 3e38, 5: 0.2})
    assert np.isposinf(index.sparse_scores(huge)).sum() == 32
    loud = QueryVectors(np.full(DIM, 1e36, dtype=np.float32), huge.sparse_ids, np.full(5, 0.1, np.float32))
    for weights in (ScoreWeights(1.0, 0.0), ScoreWeights(1.0, 0.3), ScoreWeights(0.0, 1.0)):
        assert_same_as_scan(index, [huge, loud], 10, modes=("dense", "sparse", "hybrid"), weights=weights)
    index.prune = True
    assert not index._can_prune([huge], 10, "hybrid", ScoreWeights())
    assert not index._can_prune([loud], 10, "dense", ScoreWeights())


def test_a_dropped_searcher_is_freed_at_once_with_its_scratch_arrays():
    """No reference cycle keeps a Searcher (and each thread's [N] and [Q, N] scratch arrays) alive until
    Python's cycle collector runs: serve drops an old generation's Searcher when it swaps to a new one."""
    import gc
    import weakref

    rng = np.random.default_rng(24)
    index = searcher(random_parts(rng, [500, 500]))
    index.search_many(random_queries(rng, 3), 5, "hybrid")
    index.search(random_queries(rng, 1)[0], 5, "sparse")
    gone = weakref.ref(index)
    gc.disable()
    try:
        del index
        assert gone() is None
    finally:
        gc.enable()


def test_sparse_candidates_hold_every_row_that_reaches_the_threshold():
    rng = np.random.default_rng(3)
    n = 2000
    part = shard(unit(rng.standard_normal((n, DIM))), sparse_rows(rng, n), live=rng.random(n) > 0.1)
    q = query(unit(rng.standard_normal(DIM)), {0: 0.9, 1: 0.2, 5: 0.4, 50: 0.7, 300: 0.05, 399: 1.3, 7: -0.3})
    sq = SparseShardQuery(part, q.sparse_ids, q.sparse_weights, token_max_of(part, {}))
    exact = sq.exact(np.arange(n))
    assert sq.split(0.0) is None  # rows sharing no token score 0: only a scan ranks them
    short = sq.read_columns(sq.gather(sq.short_tokens(16)))
    assert np.all(sq.lower(short) <= exact[short.rows])
    for threshold in np.quantile(exact[exact > 0], [0.1, 0.5, 0.9, 0.99]):
        rows, scores = sq.reaching(float(threshold))
        wanted = np.flatnonzero((exact >= threshold) & part.live)
        assert np.all(np.isin(wanted, rows)) and np.all(part.live[rows])
        assert scores.tobytes() == exact[rows].tobytes()
        kept, left_out = sq.split(float(threshold))
        assert sum(t.bound for t in left_out) < threshold and len(rows) < n


# ---------------------------------------------------------------------------
# the pruned answer is the scan's


@pytest.mark.parametrize("k", [1, 10, 57])
def test_pruned_top_k_equals_the_full_scan_bit_for_bit(k):
    rng = np.random.default_rng(4)
    index = searcher(random_parts(rng, [900, 1400, 700], deleted_share=0.1))
    assert_same_as_scan(index, random_queries(rng, 20), k)


def test_pruning_rescores_few_rows():
    rng = np.random.default_rng(5)
    index = searcher(random_parts(rng, [20000], dim=256))
    queries = random_queries(rng, 8, dim=256)
    for mode in ("dense", "hybrid"):
        index.search_many(queries, 10, mode)
        assert max(index.last_rescored) < 20000 // 10, (mode, index.last_rescored)
    # sparse: a query whose top-10 needs rows sharing no token with it (score 0) is scanned, the others pruned
    index.search_many(queries, 10, "sparse")
    assert np.median(index.last_rescored) < 20000 // 10, index.last_rescored


def test_near_ties_and_duplicates_at_the_kth_score_keep_row_order():
    rng = np.random.default_rng(6)
    base = unit(rng.standard_normal((3000, DIM)))
    q = unit(rng.standard_normal(DIM))
    # 30 copies of one row that scores just inside the top 10, spread over three shards and deleted in places,
    # and rows one float16 step away from it: the k-th score is a many-way tie next to near-ties.
    best = unit(q + 0.4 * unit(rng.standard_normal(DIM)))
    copies = rng.choice(3000, 30, replace=False)
    base[copies] = best
    nudged = best.astype(np.float16)
    nudged[np.argmax(np.abs(q))] += np.float16(1e-3)
    base[rng.choice(np.setdiff1d(np.arange(3000), copies), 10, replace=False)] = nudged.astype(np.float32)
    sparse = sparse_rows(rng, 3000)
    for row in copies:
        sparse[row] = {1: 0.25, 7: 0.1}
    live = np.ones(3000, dtype=bool)
    live[copies[:5]] = False
    parts = [(base[:1000], sparse[:1000], live[:1000]), (base[1000:2000], sparse[1000:2000], live[1000:2000]),
             (base[2000:], sparse[2000:], live[2000:])]
    index = searcher(parts)
    queries = [query(q, {1: 0.5, 7: 0.3, 40: 0.2})]
    for k in (1, 10, 25, 40):
        assert_same_as_scan(index, queries, k)
    hits = index.search(queries[0], 40, "dense")
    copy_score = index.dense_score(queries[0], int(copies[-1]))
    tied = [h.row for h in hits if h.score == copy_score]
    assert tied == sorted(tied) and len(tied) == 25  # every live copy, in row order


def test_rows_with_the_largest_quantization_error_are_found():
    rng = np.random.default_rng(7)
    x = unit(rng.standard_normal((4000, DIM))).astype(np.float64)
    frame, _codes, _bounds = quantize_dense(x.astype(np.float16))
    center, step = frame[0].astype(np.float64), frame[1].astype(np.float64)
    worst = np.array([5, 1234, 3999])
    # Every component half a step from its code: the largest rounding error a row can have.
    x[worst] = center + (np.clip(np.floor((x[worst] - center) / step), -127, 126) + 0.5) * step
    index = searcher([(x, sparse_rows(rng, 4000), None)])  # one shard: the frame the rows were snapped in
    row_bounds = index.shards[0].row_bounds
    assert row_bounds[worst, 1].min() > 1.5 * np.median(row_bounds[:, 1])
    q = unit(x[worst].sum(axis=0))  # ... and these are the rows this query wants
    queries = [query(q, {2: 0.4}), query(unit(q + 0.1 * rng.standard_normal(DIM)), {2: 0.4})]
    for k in (1, 3, 10):
        assert_same_as_scan(index, queries, k)
    assert set(worst.tolist()) <= {h.row for h in index.search(queries[0], 10, "dense")}


def test_a_narrow_cone_of_vectors_like_a_random_weight_model():
    rng = np.random.default_rng(8)
    center = unit(rng.standard_normal(DIM))
    x = unit(center + 0.003 * rng.standard_normal((5000, DIM)))  # cosines about 0.9999: gaps of ~1e-6 at the top
    queries = [query(unit(center + 0.003 * rng.standard_normal(DIM)), sparse_rows(rng, 1, tokens=5)[0])
               for _ in range(6)]
    index = searcher([(x[:2500], sparse_rows(rng, 2500), None), (x[2500:], sparse_rows(rng, 2500), None)])
    assert_same_as_scan(index, queries, 10)
    index.search_many(queries, 10, "dense")
    assert max(index.last_rescored) < 5000  # the centered codes still prune


def test_deleted_rows_never_appear_and_k_past_the_live_rows():
    rng = np.random.default_rng(9)
    x = unit(rng.standard_normal((600, DIM)))
    q = unit(rng.standard_normal(DIM))
    scores = x @ q
    live = np.ones(600, dtype=bool)
    live[np.argsort(-scores)[:50]] = False  # the 50 best rows are deleted
    index = searcher([(x[:300], sparse_rows(rng, 300), live[:300]), (x[300:], sparse_rows(rng, 300), live[300:])])
    queries = [query(q, {0: 0.3, 3: 0.2})]
    for k in (10, 549, 550, 551, 1000):
        assert_same_as_scan(index, queries, k)
        for mode in ("dense", "sparse", "hybrid"):
            hits = index.search(queries[0], k, mode)
            assert len(hits) == min(k, 550) and all(live[h.row] for h in hits)


def test_empty_and_all_deleted_indexes():
    empty = Searcher([], VOCAB)
    q = query(np.ones(DIM, dtype=np.float32) / 8, {1: 0.5})
    for mode in ("dense", "sparse", "hybrid"):
        assert empty.search(q, 10, mode) == []
    rng = np.random.default_rng(10)
    gone = searcher([(unit(rng.standard_normal((40, DIM))), sparse_rows(rng, 40), np.zeros(40, dtype=bool))])
    for mode in ("dense", "sparse", "hybrid"):
        assert gone.search(q, 10, mode) == []


def test_sparse_queries_matching_few_rows_fill_with_zero_scores_in_row_order():
    rng = np.random.default_rng(11)
    index = searcher(random_parts(rng, [500, 500]))
    rare = query(unit(rng.standard_normal(DIM)), {399: 0.5})  # in a few rows at most
    assert_same_as_scan(index, [rare, query(rare.dense, {})], 20, modes=("sparse", "hybrid"))


@pytest.mark.parametrize("weights", [ScoreWeights(1.0, 0.3), ScoreWeights(0.0, 1.0), ScoreWeights(1.0, 0.0),
                                     ScoreWeights(0.2, 5.0), ScoreWeights(-1.0, 0.3)])
def test_hybrid_weights_including_zero_and_negative(weights):
    rng = np.random.default_rng(12)
    index = searcher(random_parts(rng, [1500, 800], deleted_share=0.05))
    assert_same_as_scan(index, random_queries(rng, 5), 10, modes=("hybrid",), weights=weights)


def test_negative_and_zero_query_weights_stay_exact():
    rng = np.random.default_rng(13)
    index = searcher(random_parts(rng, [1200]))
    queries = [query(unit(rng.standard_normal(DIM)), {0: -0.5, 2: 0.4, 9: 0.0, 30: 0.8})]
    assert_same_as_scan(index, queries, 10)


@pytest.mark.parametrize("packed", [False, True])
def test_queries_below_float32s_normal_range_stay_exact(packed):
    """Products and sums of a query of length 1e-40 underflow: they lose absolutely (or flush to zero), which
    the bounds' relative gamma term alone does not cover (the answers differed from the scan's)."""
    if packed and not packing_works():
        pytest.skip("oneDNN's int8 linear is not exact on this machine")
    rng = np.random.default_rng(59)
    index, _ = _cone_index(rng, 0.003, [1000, 500], 0)
    if packed:
        index.pack_codes(budget=1 << 30)
    center = index.shards[0].frame[0] / np.linalg.norm(index.shards[0].frame[0])
    queries = [query((scale * unit(sign * center + 0.003 * rng.standard_normal(DIM))).astype(np.float32),
                     sparse_rows(rng, 1, tokens=5)[0]) for scale in (1e-38, 1e-40, 1e-43) for sign in (1, -1)]
    queries += [query((1e-41 * unit(rng.standard_normal(DIM))).astype(np.float32), sparse_rows(rng, 1, tokens=5)[0])]
    for k in (1, 10):
        assert_same_as_scan(index, queries, k, modes=("dense", "hybrid"))


def test_shards_without_pruning_data_mix_with_shards_that_have_it():
    rng = np.random.default_rng(14)
    parts = random_parts(rng, [800, 800, 800], deleted_share=0.1)
    mixed = searcher(parts)
    mixed.shards[1] = shard(*parts[1][:2], start=800, live=parts[1][2], prune=False)  # a shard from before
    mixed._pruned.shards[1] = mixed.shards[1]
    assert_same_as_scan(mixed, random_queries(rng, 6), 10)


def test_a_batch_of_many_queries_answers_each_as_alone():
    rng = np.random.default_rng(15)
    index = searcher(random_parts(rng, [2000, 1000]))
    queries = random_queries(rng, 70)  # more than two int8 blocks, positions in every column
    for mode in ("dense", "hybrid", "sparse"):
        batch = index.search_many(queries, 10, mode)
        for position in (0, 1, 15, 16, 31, 32, 47, 69):
            assert hits_bits(batch[position]) == hits_bits(index.search(queries[position], 10, mode)), position


@pytest.mark.parametrize("prune", [False, True])
def test_threads_searching_one_index_at_once_each_get_their_own_answers(prune):
    """Scans write scores into arrays the Searcher keeps for the next search (fresh ones cost page faults):
    each thread has its own, so searches running at once in one process never mix their scores."""
    rng = np.random.default_rng(31)
    index = searcher(random_parts(rng, [3000, 3000], deleted_share=0.1))
    queries = random_queries(rng, 8)
    index.prune = prune
    modes = ("sparse", "hybrid", "dense")
    expected = {(i, mode): hits_bits(index.search(q, 10, mode)) for i, q in enumerate(queries) for mode in modes}
    wrong: list[tuple[int, str]] = []

    def search(offset: int) -> None:
        for turn in range(25):
            for i, q in enumerate(queries):
                mode = modes[(i + offset + turn) % len(modes)]
                if hits_bits(index.search(q, 10, mode)) != expected[(i, mode)]:
                    wrong.append((i, mode))

    workers = [threading.Thread(target=search, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not wrong


def test_a_rows_score_does_not_depend_on_its_place_in_the_kernels_block():
    rng = np.random.default_rng(16)
    dense16 = unit(rng.standard_normal((2500, DIM))).astype(np.float16)
    qs = unit(rng.standard_normal((20, DIM)))
    blocks = DenseKernel.query_blocks(qs)
    kernel = DenseKernel()
    scanned = np.empty((20, 2500), dtype=np.float32)
    kernel.scan(dense16, blocks, 20, scanned)
    picked = rng.permutation(2500)[:1500]
    for i in (0, 7, 15, 16, 19):
        got = kernel.rows(dense16, picked, blocks[i // 16], i % 16)
        assert got.tobytes() == scanned[i, picked].tobytes()


def test_pruning_is_off_when_float32_matmuls_are_not_float32():
    rng = np.random.default_rng(17)
    index = searcher(random_parts(rng, [3000]))
    q = random_queries(rng, 1)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        index.search_many(q, 10, "dense")
        assert index.last_rescored == [3000]
    finally:
        torch.set_float32_matmul_precision(previous)
    mkldnn = torch.backends.mkldnn.matmul
    if hasattr(mkldnn, "fp32_precision"):  # torch's newer, per-backend knob
        before = mkldnn.fp32_precision
        try:
            mkldnn.fp32_precision = "bf16"
            index.search_many(q, 10, "dense")
            assert index.last_rescored == [3000]
        finally:
            mkldnn.fp32_precision = before
    index.search_many(q, 10, "dense")
    assert index.last_rescored[0] < 3000


def test_colbert_candidates_come_from_the_pruned_hybrid_top():
    rng = np.random.default_rng(18)
    index = searcher(random_parts(rng, [3000]))
    q = random_queries(rng, 1)[0]
    q = QueryVectors(q.dense, q.sparse_ids, q.sparse_weights, colbert=unit(rng.standard_normal((3, 8))))
    vectors = {row: unit(rng.standard_normal((4, 8))) for row in range(3000)}

    def fetch(rows):
        return [vectors[r] for r in rows]

    index.prune = False
    scanned = index.search(q, 5, "colbert", fetch_colbert=fetch)
    index.prune = True
    pruned = index.search(q, 5, "colbert", fetch_colbert=fetch)
    assert pruned == scanned
    assert index.last_rescored[0] < 3000


# ---------------------------------------------------------------------------
# the pruning files in an index


def _write_index(path, rows: int = 3000, seed: int = 19, shard_rows: int = 1000):
    rng = np.random.default_rng(seed)
    manifest = Manifest(model={"name": "synthetic", "revision": "none", "sha256": None, "files": {},
                               "dtype": "fp32", "max_length": 512},
                        dense_dim=DIM, colbert_dim=None, vocab_size=VOCAB, store_text=False, generation=1)
    writer = IndexWriter(path, manifest, shard_rows=shard_rows)
    sparse = sparse_rows(rng, rows)
    writer.write(RowBatch([f"d{i}" for i in range(rows)], ["0" * 32] * rows, None,
                          unit(rng.standard_normal((rows, DIM))),
                          [(np.array(sorted(s), dtype=np.uint32), np.array([s[t] for t in sorted(s)], np.float32))
                           for s in sparse]))
    writer.commit()
    return rng


def test_an_index_run_writes_the_pruning_files_and_verify_checks_them(tmp_path):
    _write_index(tmp_path / "ix")
    manifest = read_manifest(tmp_path / "ix")
    for info in manifest.shards:
        assert {r["kind"] for r in info.search} == set(BASE_SEARCH_KINDS + PRUNE_SEARCH_KINDS)
    codes = np.load(tmp_path / "ix" / SEARCH_DIR / f"{manifest.shards[0].file[:-8]}.dense-codes.npy")
    dense = np.load(tmp_path / "ix" / SEARCH_DIR / f"{manifest.shards[0].file[:-8]}.dense.npy")
    assert codes.dtype == np.int8 and codes.nbytes * 2 == dense.nbytes  # half the float16 file
    assert verify_index(tmp_path / "ix") == []
    opened = OpenIndex.open(tmp_path / "ix")
    assert all(s.codes is not None and s.token_max is not None for s in opened.vectors)
    # a damaged pruning file is named, never searched
    path = tmp_path / "ix" / SEARCH_DIR / f"{manifest.shards[1].file[:-8]}.dense-bounds.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any("dense-bounds" in problem for problem in verify_index(tmp_path / "ix"))


def test_an_index_without_pruning_files_is_searched_by_scans_with_the_same_answers(tmp_path):
    rng = _write_index(tmp_path / "ix")
    pruned = Searcher(OpenIndex.open(tmp_path / "ix").vectors, VOCAB)
    # The same index as written before the pruning kinds existed: its manifest names the base kinds only.
    path = tmp_path / "ix" / "manifest.json"
    raw = json.loads(path.read_text())
    for info in raw["shards"]:
        info["search"] = [r for r in info["search"] if r["kind"] in BASE_SEARCH_KINDS]
    path.write_text(json.dumps(raw))
    assert verify_index(tmp_path / "ix") == []
    old = Searcher(OpenIndex.open(tmp_path / "ix").vectors, VOCAB)
    assert all(s.codes is None for s in old.shards)
    queries = random_queries(rng, 5)
    for mode in ("dense", "sparse", "hybrid"):
        for q in queries:
            assert hits_bits(old.search(q, 10, mode)) == hits_bits(pruned.search(q, 10, mode))
    old.search_many(queries, 10, "dense")
    assert old.last_rescored == [3000] * 5  # scanned
    pruned.search_many(queries, 10, "dense")
    assert max(pruned.last_rescored) < 3000
    # a manifest naming some pruning kinds but not all is damaged
    raw["shards"][0]["search"].append({"kind": "dense-codes", "file": "x", "bytes": 0, "crc32": 0})
    path.write_text(json.dumps(raw))
    with pytest.raises(Exception):
        OpenIndex.open(tmp_path / "ix")


def test_the_scan_and_the_pruned_search_agree_with_brute_force_over_the_files(tmp_path):
    rng = _write_index(tmp_path / "ix", rows=2500, shard_rows=800)
    opened = OpenIndex.open(tmp_path / "ix")
    index = Searcher(opened.vectors, VOCAB)
    dense = np.concatenate([s.dense for s in opened.vectors]).astype(np.float64)
    for q in random_queries(rng, 5):
        brute = dense @ q.dense.astype(np.float64)
        hits = index.search(q, 10, "dense")
        assert [h.row for h in hits] == top_k(brute.astype(np.float32), 10).tolist() or \
            np.allclose([h.score for h in hits], np.sort(brute)[::-1][:10], atol=1e-6)
        np.testing.assert_allclose([h.score for h in hits], brute[[h.row for h in hits]], atol=1e-6)


# ---------------------------------------------------------------------------
# the commands: errors that need only the index come before the model; eval encodes each query once


@pytest.fixture(scope="module")
def small_index(tiny_model, tmp_path_factory):
    from helpers import index, write_jsonl

    folder = tmp_path_factory.mktemp("pruning-cli")
    corpus = folder / "corpus.jsonl"
    write_jsonl(corpus, [{"id": f"d{i}", "text": f"note {i} about the moon, tides and bread number {i % 7}"}
                         for i in range(60)])
    index(corpus, folder / "ix", tiny_model)
    return folder / "ix"


def _no_model_loads(monkeypatch):
    """Make loading any model fail loudly: an error seen before it is an error found without a model."""
    from bge_index.search import local_index

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(local_index, "load_encoder", refuse)


def test_colbert_on_an_index_without_colbert_fails_before_the_model_loads(small_index, monkeypatch):
    from helpers import invoke

    _no_model_loads(monkeypatch)
    result = invoke("search", small_index, "moon", "--mode", "colbert")
    assert result.exit_code == 1 and "--colbert" in result.stderr, result.output
    qrels = small_index.parent / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    queries = small_index.parent / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "moon"}\n')
    result = invoke("eval", small_index, "--queries", queries, "--qrels", qrels, "--modes", "dense,colbert")
    assert result.exit_code == 1 and "--colbert" in result.stderr, result.output


def test_a_folder_that_is_not_an_index_or_a_damaged_one_fails_before_the_model_loads(small_index, tmp_path,
                                                                                       monkeypatch):
    import shutil

    from helpers import invoke

    _no_model_loads(monkeypatch)
    result = invoke("search", tmp_path, "moon")
    assert result.exit_code == 1 and "not a bge-index index" in result.stderr, result.output
    damaged = tmp_path / "damaged"
    shutil.copytree(small_index, damaged)
    [codes] = list((damaged / SEARCH_DIR).glob("*.dense-codes.npy"))
    data = bytearray(codes.read_bytes())
    data[-1] ^= 0x01
    codes.write_bytes(bytes(data))
    result = invoke("search", damaged, "moon", env={"BGE_INDEX_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 1 and "dense-codes" in result.stderr and "damaged" in result.stderr, result.output


def test_eval_encodes_each_query_once_for_all_modes(small_index, monkeypatch):
    from helpers import ok

    from bge_index.search import local_index

    encoded: list[str] = []
    original = local_index.LocalIndex.encode_queries

    def counting(self, texts, colbert=False):
        encoded.extend(texts)
        return original(self, texts, colbert)

    monkeypatch.setattr(local_index.LocalIndex, "encode_queries", counting)
    folder = small_index.parent
    (folder / "q.jsonl").write_text('{"_id": "q1", "text": "moon tides"}\n{"_id": "q2", "text": "bread 3"}\n')
    (folder / "r.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\n")
    ok("eval", small_index, "--queries", folder / "q.jsonl", "--qrels", folder / "r.tsv", "--modes",
       "dense,sparse,hybrid", "--runs", folder / "runs", "--depth", "20")
    assert sorted(encoded) == ["bread 3", "moon tides"]
    # and each mode's run is the one `search` gives each query alone
    for mode in ("dense", "sparse", "hybrid"):
        lines = (folder / "runs" / f"{mode}.trec").read_text().splitlines()
        alone = json.loads(ok("search", small_index, "moon tides", "--mode", mode, "-k", "20", "--format",
                              "json").stdout)[0]["hits"]
        run = {r[2]: float(r[4]) for r in (line.split() for line in lines) if r[0] == "q1"}
        assert run == pytest.approx({h["id"]: h["score"] for h in alone}, abs=1e-6)


def test_a_querys_dense_and_sparse_vectors_do_not_depend_on_asking_for_colbert(encoder):
    from bge_index.search.local_index import encode_queries

    texts = ["moon tides", "the octopus has three hearts", "zzqx"]
    plain, with_colbert = encode_queries(encoder, texts), encode_queries(encoder, texts, colbert=True)
    for a, b in zip(plain, with_colbert):
        assert a.dense.tobytes() == b.dense.tobytes()
        assert a.sparse_ids.tobytes() == b.sparse_ids.tobytes()
        assert a.sparse_weights.tobytes() == b.sparse_weights.tobytes()
        assert a.colbert is None and b.colbert is not None


def test_the_int8_pass_leaves_torchs_thread_count_alone(monkeypatch):
    """SimSIMD sets the OpenMP thread count it is given, and with torch loaded first that is torch's runtime: its
    exactness check once asked for 1 thread and left every later sgemm (scans, rescoring, the model) on one core."""
    pytest.importorskip("simsimd")
    monkeypatch.setattr(dense_prune, "_simsimd_checked", None)  # the check runs again, here
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(31)
        index = searcher(random_parts(rng, [3000]))
        index.search(random_queries(rng, 1)[0], 10, "dense")
        assert dense_prune._simsimd_checked  # the lone query went through SimSIMD
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# block maxima: the int8 pass's, chunk by chunk, and top_k's


def _reference_block_max(values: np.ndarray, block: int = dense_prune.BLOCK_ROWS) -> np.ndarray:
    """[ceil(rows / block), ...] maxima of consecutive blocks of rows, the last one shorter: numpy, one by one."""
    return np.stack([values[start:start + block].max(axis=0) for start in range(0, len(values), block)])


@pytest.mark.parametrize("chunk", [64, 128, 65536])
@pytest.mark.parametrize("deleted_share", [0.0, 0.3, 0.999])
def test_the_int8_pass_block_maxima_are_those_of_its_rows_chunk_by_chunk(monkeypatch, chunk, deleted_share):
    """The pass takes each chunk's block maxima as it makes it, after marking its deleted rows: the same maxima
    as the finished products', with a short last block and chunks of any multiple of the block."""
    monkeypatch.setattr(dense_prune, "_INT8_CHUNK_ROWS", chunk)
    rng = np.random.default_rng(40)
    n = 1000  # 15 full blocks of 64 and one of 40
    live = rng.random(n) >= deleted_share if deleted_share else None
    part = shard(unit(rng.standard_normal((n, DIM))), sparse_rows(rng, n), live=live)
    info = ShardPruneInfo.of(part)
    for count in (1, 3, 16, 20):
        queries = unit(rng.standard_normal((count, DIM)))
        shard_pass = dense_prune.shard_pass(part, info, queries)
        assert shard_pass.block_max.shape == (16, count)
        assert np.array_equal(shard_pass.block_max, _reference_block_max(shard_pass.high))
        if live is not None:
            assert np.all(shard_pass.high[~live] == np.iinfo(np.int32).min)  # deleted rows never rank


def test_the_best_blocks_seeds_are_each_blocks_best_live_row():
    rng = np.random.default_rng(41)
    values = rng.random(1000).astype(np.float32)
    values[64:128] = -np.inf  # a block of deleted rows only
    values[130] = 5.0  # the best row overall, in the third block
    maxima = dense_prune.value_block_maxima(values)
    assert np.array_equal(maxima, _reference_block_max(values))
    rows = dense_prune.best_of_blocks(values, maxima, 3)
    assert 130 in rows and np.all(np.diff(rows) > 0)
    assert all(values[row] == values[row // 64 * 64:row // 64 * 64 + 64].max() for row in rows)
    every = dense_prune.best_of_blocks(values, maxima, 100)  # more blocks asked for than there are
    assert len(every) == 15 and not np.any((every >= 64) & (every < 128))


def _reference_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The definition: finite rows by score, best first, equal scores in row order (NaN rows never)."""
    rows = np.flatnonzero(scores > -np.inf)
    return rows[np.lexsort((rows, -scores[rows]))][:k]


@pytest.mark.parametrize("k", [1, 10, 57, 400])
def test_top_k_over_many_scores_looks_at_the_best_blocks_and_gives_the_same_rows(monkeypatch, k):
    """top_k over at least 65,536 scores ranks only the blocks whose maximum reaches the k-th best block
    maximum (of those tied at it, the first k): the rows and order of the definition, ties across blocks
    included, and few rows ranked even when every score ties (a query sharing no token with any row)."""
    rng = np.random.default_rng(42)
    ranked = []
    real = scoring._plain_top_k
    monkeypatch.setattr(scoring, "_plain_top_k", lambda scores, k: ranked.append(len(scores)) or real(scores, k))
    for trial in range(12):
        n = int(rng.integers(max(1 << 16, k * 4 * 64), max(1 << 16, k * 4 * 64) + 150_000))
        scores = rng.integers(0, (3, 40, 10**6)[trial % 3], n).astype(np.float32)  # many ties, some, few
        if trial % 4 == 1:
            scores[rng.random(n) < 0.95] = -np.inf  # deleted rows
        if trial % 4 == 2:
            scores[: n - 5] = -np.inf  # fewer live rows than k, some of them in the short last block
        ranked.clear()
        got = scoring.top_k(scores, k)
        assert np.array_equal(got, _reference_top_k(scores, k)), trial
        assert np.array_equal(real(scores, k), _reference_top_k(scores, k)), trial
        assert np.all(np.isfinite(scores[got]))
        if trial % 4 != 2:  # (fewer live rows than k: the k-th block maximum is -inf, every row is ranked)
            assert ranked and ranked[0] <= 2 * k * dense_prune.BLOCK_ROWS  # only the best blocks' rows
    for flat in (np.zeros(max(1 << 16, k * 4 * 64), dtype=np.float32), np.zeros(1 << 20, dtype=np.float32)):
        ranked.clear()  # every block reaches the k-th maximum: its first k blocks are enough
        assert np.array_equal(scoring.top_k(flat, k), np.arange(k)) and ranked[0] <= k * dense_prune.BLOCK_ROWS
        assert np.array_equal(real(flat, k), np.arange(k))
    with_nan = rng.random(max(1 << 16, k * 4 * 64)).astype(np.float32)
    with_nan[77] = np.nan  # NaN: the plain path; NaN rows are never ranked
    ranked.clear()
    assert np.array_equal(scoring.top_k(with_nan, k), _reference_top_k(with_nan, k)) and ranked == [len(with_nan)]
    mostly_nan = np.full(len(with_nan), np.nan, dtype=np.float32)
    mostly_nan[[5, 9000]] = [0.5, 2.0]  # fewer scores than k that are not NaN: all of them
    assert np.array_equal(scoring.top_k(mostly_nan, k), _reference_top_k(mostly_nan, k))
    assert np.array_equal(scoring.top_k(np.array([1, np.nan, np.nan], np.float32), 2), [0])
    backwards = rng.random(max(1 << 16, k * 4 * 64)).astype(np.float32)[::-1]  # negative strides
    assert np.array_equal(scoring.top_k(backwards, k), _reference_top_k(backwards, k))


def test_the_sparse_bound_of_the_hybrid_covers_every_rows_score():
    rng = np.random.default_rng(43)
    index = searcher(random_parts(rng, [700, 900], deleted_share=0.2))
    for q in random_queries(rng, 10) + [query(unit(rng.standard_normal(DIM)), {0: -2.0, 3: 0.5, 399: -0.25})]:
        scores = index.sparse_scores(q)
        bound = index._pruned.sparse_abs_bound(q)
        assert np.abs(scores[np.isfinite(scores)]).max() <= bound


def test_a_few_rows_sparse_scores_are_the_scans_bits():
    """sparse_scores_of (hits, candidates) reads heavy columns and postings as the scan does: the same bits, for
    negative weights too."""
    rng = np.random.default_rng(44)
    index = searcher(random_parts(rng, [600, 800]))
    assert any(len(s.heavy_ids) for s in index.shards)
    rows = np.sort(rng.permutation(1400)[:300]).astype(np.int64)
    for q in random_queries(rng, 8) + [query(unit(rng.standard_normal(DIM)), {0: -1.5, 1: 0.7, 2: -0.1})]:
        assert index.sparse_scores_of(q, rows).tobytes() == index.sparse_scores(q)[rows].tobytes()


@pytest.mark.parametrize("chunk", [64, 192])
def test_answers_stay_the_scans_when_the_int8_pass_is_cut_in_small_chunks(monkeypatch, chunk):
    monkeypatch.setattr(dense_prune, "_INT8_CHUNK_ROWS", chunk)
    rng = np.random.default_rng(45)
    index = searcher(random_parts(rng, [900, 1300], deleted_share=0.15))
    assert_same_as_scan(index, random_queries(rng, 20), 10)


# ---------------------------------------------------------------------------
# packed codes (batches in long-lived processes)


needs_packing = pytest.mark.skipif(not packing_works(), reason="oneDNN's int8 linear is not exact on this machine")


@needs_packing
def test_batches_on_packed_codes_answer_as_the_scan_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(50)
    index = searcher(random_parts(rng, [2900, 4100, 1700], deleted_share=0.1))
    assert index.pack_codes(budget=1 << 30) == sum(s.codes.nbytes for s in index.shards)
    assert index.packs_codes and all(info.packed is not None for info in index._pruned._infos.values())
    calls = []
    real = dense_prune._qlinear
    monkeypatch.setattr(dense_prune, "_qlinear", lambda *a: calls.append(1) or real(*a))
    assert_same_as_scan(index, random_queries(rng, 40), 10)
    assert calls  # the batches read the packed codes
    # A filter's view (broad enough for the pruned path, not the gathered one) shares the packed codes.
    view = index.restricted(rng.random(index.rows) < 0.7)
    assert view.live_rows > max(scoring.GATHER_ROWS, view.rows // scoring.GATHER_FRACTION)
    for mode in ("dense", "hybrid"):
        view.prune = False  # (a view copies `prune` when made)
        expected = [view.search(q, 10, mode) for q in random_queries(np.random.default_rng(51), 20)]
        view.prune = True
        calls.clear()
        got = view.search_many(random_queries(np.random.default_rng(51), 20), 10, mode)
        assert calls and [hits_bits(h) for h in got] == [hits_bits(h) for h in expected], mode
    # The bounds' helpers take the packed (float32) products as they take _int_mm's.
    info = index._pruned._infos[0]
    for bound in dense_prune.shard_pass(index.shards[0], info, unit(rng.standard_normal((3, DIM)))).bounds:
        assert len(bound.best(10)) == 10 and len(bound.reaching(-1.0)) == index.shards[0].live.sum()


def _cone_index(rng, spread: float, sizes: list[int], count: int) -> tuple[Searcher, list[QueryVectors]]:
    """Shards of `sizes` rows crowded in a narrow cone (rows and queries within `spread` of one direction, as a
    random-weight model's), and `count` queries of 5 tokens."""
    center = unit(rng.standard_normal(DIM))
    x = unit(center + spread * rng.standard_normal((sum(sizes), DIM)))
    queries = [query(unit(center + spread * rng.standard_normal(DIM)), sparse_rows(rng, 1, tokens=5)[0])
               for _ in range(count)]
    starts = np.cumsum([0] + sizes)
    return searcher([(x[a:b], sparse_rows(rng, b - a), None) for a, b in zip(starts[:-1], starts[1:])]), queries


@needs_packing
def test_lone_queries_read_the_packed_codes_too_with_two_digits_in_a_cone(monkeypatch):
    """Once packed, the mapped codes are never read again (they may leave memory): a lone query's pass goes
    through the packed copy, taking both digits in a cone, and answers as the scan."""
    index, queries = _cone_index(np.random.default_rng(56), 0.004, [1500, 1100], 12)
    assert index.pack_codes(budget=1 << 30) > 0
    widths = []
    real = dense_prune._qlinear
    monkeypatch.setattr(dense_prune, "_qlinear", lambda p, rows, codes: widths.append(codes.shape[1]) or
                        real(p, rows, codes))

    def mapped_codes_read(*_args, **_kwargs):
        raise AssertionError("the mapped codes were read after packing")

    monkeypatch.setattr(dense_prune, "int8_products", mapped_codes_read)
    for mode in ("dense", "hybrid"):
        index.prune = False
        expected = [index.search(q, 10, mode) for q in queries]
        index.prune = True
        widths.clear()
        got = [index.search(q, 10, mode) for q in queries]
        assert [hits_bits(h) for h in got] == [hits_bits(h) for h in expected], mode
        assert widths and set(widths) == {2}, (mode, widths)  # one query, two digits, every shard


@needs_packing
def test_threads_asking_to_pack_at_once_pack_each_shard_once(monkeypatch):
    """Lone queries ask for packing too: threads arriving together pack (and release) a shard once, and a
    later attempt never undoes a pack."""
    rng = np.random.default_rng(57)
    index = searcher(random_parts(rng, [700, 900, 500]))
    packs = []
    real = rank_safe.pack_codes

    def slow_pack(codes, norms=None):
        packs.append(len(codes))
        time.sleep(0.05)  # every thread arrives while the first is still packing
        return real(codes, norms)

    monkeypatch.setattr(rank_safe, "pack_codes", slow_pack)
    index._pruned.pack = True
    barrier, errors = threading.Barrier(4), []
    queries = random_queries(rng, 4)

    def search(q):
        try:
            barrier.wait()
            index.search(q, 10, "dense")
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=search, args=(q,)) for q in queries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(packs) == [500, 700, 900]  # one pack per shard
    assert all(info.packed is not None and info.pack_tried for info in index._pruned._infos.values())
    assert_same_as_scan(index, queries, 10, modes=("dense", "hybrid"))


def _resident_codes_kib(folder) -> int:
    """This process's resident KiB of the int8 codes files mapped from `folder` (/proc/self/smaps)."""
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = len(head) >= 6 and head[-1].startswith(str(folder)) and head[-1].endswith(".dense-codes.npy")
        elif current and head[:1] == ["Rss:"]:
            total += int(head[1])
    return total


@needs_packing
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_packing_releases_the_mapped_codes_pages_and_answers_stay_the_scans(tmp_path):
    rng = _write_index(tmp_path / "ix", rows=6000, shard_rows=3000)
    index = Searcher(OpenIndex.open(tmp_path / "ix").vectors, VOCAB)
    queries = random_queries(rng, 8)
    index.search_many(queries, 10, "dense")  # the int8 passes read the mapped codes
    assert _resident_codes_kib(tmp_path) > 0
    assert index.pack_codes(budget=1 << 30) == sum(s.codes.nbytes for s in index.shards)
    assert _resident_codes_kib(tmp_path) == 0  # the packed copy replaces them, not doubles them
    assert_same_as_scan(index, queries, 10, modes=("dense", "hybrid"))
    assert _resident_codes_kib(tmp_path) == 0  # never read again
    # Released pages read back from the file: the codes are unchanged.
    codes = index.shards[0].codes
    before = codes.copy()
    assert release_pages(codes) >= codes.nbytes and np.array_equal(codes, before)
    assert release_pages(before) == 0  # not a mapped search file: nothing done


@pytest.mark.parametrize("rows,spread", [(65, 0.01), (700, 0.01), (300, 0.0)])
def test_the_two_digit_cuts_keep_exactly_the_rows_whose_bound_reaches(rows, spread):
    """ShardPass.reaching and reaching_with, two digits, one query and several, codes as mapped and packed:
    exactly the live rows whose upper bound reaches the threshold, at thresholds on rows' own bounds (those of
    the rows with the largest error sit right at the cut; with every row the same, all do); deleted rows (a
    whole block, the last row), a short last block, queries against the cone's direction."""
    rng = np.random.default_rng(60)
    center = unit(rng.standard_normal(DIM))
    x = unit(center + spread * rng.standard_normal((rows, DIM)))
    live = rng.random(rows) >= 0.3
    live[-1] = False
    if rows > 128:
        live[64:128] = False
    part = shard(x, sparse_rows(rng, rows), live=live)
    queries = np.stack([unit(center + 0.01 * rng.standard_normal(DIM)), -center, x[3],
                        unit(rng.standard_normal(DIM)), np.zeros(DIM, np.float32)])
    everything = np.arange(rows)
    for packed in (False, True) if packing_works() else (False,):
        info = ShardPruneInfo.of(part)
        assert info.digits == 2
        info.packed = dense_prune.pack_codes(part.codes) if packed else None
        for block in (queries[:1], queries):
            one = shard_pass(part, info, block)
            assert all((b._low is not None) == (packed or len(block) > 1) for b in one.bounds)  # (lone, mapped: one)
            uppers = [b.upper(everything) for b in one.bounds]
            ordinary = live.copy()
            ordinary[info.outliers] = False
            for i, upper in enumerate(uppers):
                # The bounds of the rows with the largest error sit right at the cut (it assumes that error).
                errors = one.bounds[i].error(everything)
                widest = everything[ordinary][np.argsort(-errors[ordinary])[:8]]
                for threshold in [*upper[widest], *np.unique(upper[live])[::7], -np.inf, np.inf, np.nan]:
                    thresholds = [threshold if j == i else 0.0 for j in range(len(block))]
                    with np.errstate(invalid="ignore"):
                        expected = everything[live & (upper >= threshold)]
                    assert np.array_equal(one.reaching(thresholds)[i], expected), (packed, len(block), i)
            extra = rng.random((rows, len(block))).astype(np.float32)
            extra[~live] = -np.inf
            for weight, extra_weight in ((1.0, 0.3), (1e-3, 1.0), (1.0, 0.0)):
                with np.errstate(invalid="ignore"):  # (0 * -inf on deleted rows: NaN, never reaching)
                    combined = [weight * u + extra_weight * extra[:, i].astype(np.float64)
                                for i, u in enumerate(uppers)]
                at_rows = [everything[ordinary][np.argsort(-one.bounds[i].error(everything)[ordinary])[:4]]
                           for i in range(len(block))]
                for choice in (0.0, 0.5, 0.97, 0, 1, 2, 3):  # quantiles, then the widest rows' own bounds
                    thresholds = np.array([np.quantile(c[live], choice) if isinstance(choice, float)
                                           else c[at_rows[i][choice]] for i, c in enumerate(combined)])
                    found = one.reaching_with(thresholds, weight, extra, extra_weight)
                    for i, c in enumerate(combined):
                        expected = everything[live & (c >= thresholds[i])]
                        assert np.array_equal(found[i], expected), (packed, len(block), weight, choice, i)


def test_the_two_digit_cut_uses_both_digits_so_few_rows_get_their_own_bound(monkeypatch):
    """In a cone a batch takes two digits: the cut compares blocks' and rows' full integer products (128 * hi +
    lo) with the threshold, not the high digit plus a Cauchy-Schwarz bound on the low one (which let about 37
    rows through per row rescored here), and the answers stay the scan's."""
    index, queries = _cone_index(np.random.default_rng(52), 0.003, [1700, 1300], 16)
    tested = []
    real = dense_prune.DenseShardBound.upper
    monkeypatch.setattr(dense_prune.DenseShardBound, "upper", lambda self, rows: tested.append(len(rows)) or
                        real(self, rows))
    index.search_many(queries, 10, "dense")
    assert all(info.digits == 2 for info in index._pruned._infos.values())
    assert sum(tested) <= 6 * sum(index.last_rescored), (sum(tested), sum(index.last_rescored))
    assert_same_as_scan(index, queries, 10, modes=("dense", "hybrid"))


@needs_packing
def test_packed_codes_in_a_cone_take_two_digits_and_stay_exact():
    index, queries = _cone_index(np.random.default_rng(52), 0.003, [1700, 1300], 20)
    index.pack_codes(budget=1 << 30)
    assert all(info.digits == 2 for info in index._pruned._infos.values())
    assert_same_as_scan(index, queries, 10, modes=("dense", "hybrid"))


def test_codes_are_not_packed_past_the_budget_nor_when_the_kernel_is_not_exact(monkeypatch):
    rng = np.random.default_rng(53)
    index = searcher(random_parts(rng, [800]))
    assert index.pack_codes(budget=1000) == 0 and not index.packs_codes  # 800 x 64 bytes of codes
    # A kernel that is off by one somewhere: never used, and the batch reads the mapped codes instead.
    real = dense_prune._qlinear

    def off_by_one(packed, rows, query_codes):
        out = real(packed, rows, query_codes)
        out[0, -1] += 1
        return out

    monkeypatch.setattr(dense_prune, "_qlinear", off_by_one)
    assert dense_prune.pack_codes(index.shards[0].codes) is None
    index.pack_codes(budget=1 << 30)
    assert all(info.packed is None for info in index._pruned._infos.values())
    assert_same_as_scan(index, random_queries(rng, 18), 10, modes=("dense",))
    too_large = np.full((10, 1024), dense_prune.CODE_LEVELS, dtype=np.int8)  # 255 * sum |k| past 2**24
    assert dense_prune.pack_codes(too_large) is None
    too_large[:, :] = 0
    too_large[3, :520] = -128  # a hostile file's -128 counts as 128
    assert dense_prune.pack_codes(too_large) is None

    def refused(packed, rows, query_codes):
        raise RuntimeError("onednn: could not create a primitive")

    monkeypatch.setattr(dense_prune, "_qlinear", refused)  # a shard oneDNN will not take: no crash, no copy
    assert dense_prune.pack_codes(index.shards[0].codes) is None


@needs_packing
@pytest.mark.parametrize("spread", [40, 127])
def test_packed_products_at_bge_m3s_dimension_are_exact_or_not_packed(monkeypatch, spread):
    """At 1,024 dimensions the packed kernel's float32 sum of (q + 128) * k can pass 2**24 (codes of full
    range): such codes are never packed; codes like BGE-M3's (sums of |k| far below the limit) are, and every
    row's products are then exact for every batch width, extreme query codes included."""
    rng = np.random.default_rng(54)
    codes = rng.integers(-spread, spread + 1, (3000, 1024), dtype=np.int8)
    norms = np.linalg.norm(codes.astype(np.float64), axis=1).astype(np.float32) * np.float32(1 + 2 ** -20)
    passes = []
    real = dense_prune._largest_l1
    monkeypatch.setattr(dense_prune, "_largest_l1", lambda c: passes.append(1) or real(c))
    packed = dense_prune.pack_codes(codes, norms)
    assert dense_prune.pack_codes(codes) is None if spread == 127 else dense_prune.pack_codes(codes) is not None
    if spread == 127:
        assert packed is None and passes  # sums of |k| about 65,000: some rows' shifted sums pass 2**24
        return
    assert packed is not None and len(passes) == 1  # sqrt(D) |k| below the limit: no pass without norms only
    for width in (2, 3, 5, 16, 31, 33, 64):
        query_codes = rng.integers(-127, 128, (1024, width), dtype=np.int8)
        query_codes[:, 0], query_codes[:, -1] = 127, -127
        got = dense_prune._qlinear(packed, len(codes), query_codes).numpy().astype(np.float64)
        assert np.array_equal(got, (codes.astype(np.int64) @ query_codes.astype(np.int64)).T), width
