"""Scoring and exact top-k over hand-made IndexVectors, and over a real multi-shard index opened the way
`bge-index search` opens it, checked against brute force written here."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import IndexVectors, index, ok, searcher_for, write_jsonl

from bge_index.search import dense_kernel
from bge_index.model.encoder import load_encoder
from bge_index.search.local_index import encode_queries
from bge_index.search.scoring import (
    RRF_DEPTH,
    RRF_K,
    Hit,
    NoColbertVectors,
    QueryVectors,
    ScoreWeights,
    Searcher,
    colbert_maxsim,
    top_k,
)
from bge_index.store.manifest import read_manifest
from bge_index.store import shard_writer
from bge_index.store.vector_store import OpenIndex, ShardVectors, invert, invert_streaming

TOL = 1e-5
VOCAB = 300
DIM = 48
N_DOCS = 2000


# ---------------------------------------------------------------------------
# building indexes and queries


def make_vectors(dense: np.ndarray, sparse_rows: list[dict[int, float]]) -> IndexVectors:
    """IndexVectors from dense rows (stored float16) and one {token: weight} dict per row (CSR, sorted ids)."""
    n = dense.shape[0]
    assert len(sparse_rows) == n
    indptr, indices, values = [0], [], []
    for row in sparse_rows:
        for token in sorted(row):
            indices.append(token)
            values.append(row[token])
        indptr.append(len(indices))
    return IndexVectors(
        ids=np.array([f"doc{i}" for i in range(n)], dtype=object),
        dense=np.asarray(dense, dtype=np.float32).astype(np.float16),
        sparse_indptr=np.array(indptr, dtype=np.int64),
        sparse_indices=np.array(indices, dtype=np.uint32),
        sparse_values=np.array(values, dtype=np.float32),
        row_shard=np.zeros(n, dtype=np.int32),
        row_local=np.arange(n, dtype=np.int64),
    )


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_sparse(rng: np.random.Generator, max_tokens: int, vocab: int = VOCAB) -> dict[int, float]:
    count = int(rng.integers(0, max_tokens + 1))
    tokens = rng.choice(vocab, size=count, replace=False)
    weights = rng.random(count).astype(np.float32) + np.float32(0.01)
    # Python floats holding exact float32 values, so the brute force sees the stored numbers.
    return {int(t): float(w) for t, w in zip(tokens, weights)}


def make_query(dense: np.ndarray, sparse: dict[int, float], colbert: np.ndarray | None = None) -> QueryVectors:
    tokens = sorted(sparse)
    return QueryVectors(
        dense=np.asarray(dense, dtype=np.float32),
        sparse_ids=np.array(tokens, dtype=np.uint32),
        sparse_weights=np.array([sparse[t] for t in tokens], dtype=np.float32),
        colbert=colbert,
    )


def basis(d: int, *components: tuple[int, float]) -> np.ndarray:
    v = np.zeros(d, dtype=np.float32)
    for i, x in components:
        v[i] = x
    return v


# ---------------------------------------------------------------------------
# brute force, written independently of the package


def brute_dense(index_dense: np.ndarray, q: np.ndarray) -> list[float]:
    q32 = q.astype(np.float32)
    return [float(np.dot(index_dense[i].astype(np.float32), q32)) for i in range(index_dense.shape[0])]


def brute_sparse(doc_rows: list[dict[int, float]], q: dict[int, float]) -> list[float]:
    scores = []
    for row in doc_rows:
        total = 0.0
        for token, weight in q.items():
            if token in row:
                total += weight * row[token]
        scores.append(total)
    return scores


def assert_top_k_matches(hits: list[Hit], expected: list[float], k: int) -> None:
    """Hits equal the brute-force top-k: scores within TOL; rows exact unless within TOL of a tie."""
    n = len(expected)
    order = sorted(range(n), key=lambda r: (-expected[r], r))
    assert len(hits) == min(k, n)
    for pos, hit in enumerate(hits):
        want = order[pos]
        assert hit.score == pytest.approx(expected[want], abs=TOL), (pos, hit, want)
        assert hit.score == pytest.approx(expected[hit.row], abs=TOL), (pos, hit)
        near_tie = any(abs(expected[order[p]] - expected[want]) <= TOL for p in (pos - 1, pos + 1) if 0 <= p < n)
        if not near_tie:
            assert hit.row == want, (pos, hit, want)
    assert len({h.row for h in hits}) == len(hits)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


# ---------------------------------------------------------------------------
# a random index shared by the exactness tests


class RandomIndex:
    def __init__(self, seed: int = 7):
        rng = np.random.default_rng(seed)
        self.dense = unit_rows(rng, N_DOCS, DIM)
        self.sparse = [random_sparse(rng, 40) for _ in range(N_DOCS)]
        self.vectors = make_vectors(self.dense, self.sparse)
        self.searcher = searcher_for(self.vectors, vocab_size=VOCAB)
        self.queries = []
        for _ in range(5):
            q_dense = unit_rows(rng, 1, DIM)[0]
            q_sparse = random_sparse(rng, 25)
            q_sparse[int(rng.integers(VOCAB))] = 0.5  # never an empty query here
            query = make_query(q_dense, q_sparse)
            self.queries.append(
                (query, brute_dense(self.vectors.dense, q_dense), brute_sparse(self.sparse, q_sparse))
            )


@pytest.fixture(scope="module")
def random_index() -> RandomIndex:
    return RandomIndex()


def test_random_index_is_well_formed(random_index):
    v = random_index.vectors
    assert len(random_index.searcher) == N_DOCS
    assert v.dense.dtype == np.float16 and v.dense.shape == (N_DOCS, DIM)
    for row in (0, 1, N_DOCS - 1):
        ids, weights = v.sparse_row(row)
        assert list(ids) == sorted(random_index.sparse[row])
        assert np.all(np.diff(ids.astype(np.int64)) > 0)


@pytest.mark.parametrize("k", [10, 1, 37])
def test_dense_mode_equals_brute_force(random_index, k):
    for query, dense, sparse in random_index.queries:
        hits = random_index.searcher.search(query, k=k, mode="dense")
        assert_top_k_matches(hits, dense, k)
        for hit in hits:
            assert hit.dense == pytest.approx(dense[hit.row], abs=TOL)
            assert hit.sparse == pytest.approx(sparse[hit.row], abs=TOL)
            assert hit.score == hit.dense
            assert hit.colbert is None


@pytest.mark.parametrize("k", [10, 1, 37])
def test_sparse_mode_equals_brute_force(random_index, k):
    for query, dense, sparse in random_index.queries:
        hits = random_index.searcher.search(query, k=k, mode="sparse")
        assert_top_k_matches(hits, sparse, k)
        assert hits[0].score > 0
        for hit in hits:
            assert hit.sparse == pytest.approx(sparse[hit.row], abs=TOL)
            assert hit.dense == pytest.approx(dense[hit.row], abs=TOL)
            assert hit.score == hit.sparse


@pytest.mark.parametrize("weights", [ScoreWeights(), ScoreWeights(dense=0.5, sparse=2.0), ScoreWeights(1.0, 0.0)])
def test_hybrid_mode_equals_brute_force(random_index, weights):
    for query, dense, sparse in random_index.queries:
        expected = [weights.dense * d + weights.sparse * s for d, s in zip(dense, sparse)]
        hits = random_index.searcher.search(query, k=10, mode="hybrid", weights=weights)
        assert_top_k_matches(hits, expected, 10)
        for hit in hits:
            assert hit.dense == pytest.approx(dense[hit.row], abs=TOL)
            assert hit.sparse == pytest.approx(sparse[hit.row], abs=TOL)
            assert hit.score == pytest.approx(weights.dense * hit.dense + weights.sparse * hit.sparse, abs=TOL)


def test_hybrid_is_the_default_mode(random_index):
    query = random_index.queries[0][0]
    assert random_index.searcher.search(query) == random_index.searcher.search(query, k=10, mode="hybrid")


def test_full_scans_equal_brute_force(random_index, monkeypatch):
    # A tiny chunk size makes the float16 -> float32 scan cross many chunk borders (including a ragged last one).
    monkeypatch.setattr(dense_kernel, "CHUNK_ROWS", 7)
    for query, dense, sparse in random_index.queries[:2]:
        got_dense = random_index.searcher.dense_scores(query)
        got_sparse = random_index.searcher.sparse_scores(query)
        assert got_dense.shape == got_sparse.shape == (N_DOCS,)
        np.testing.assert_allclose(got_dense, dense, atol=TOL, rtol=0)
        np.testing.assert_allclose(got_sparse, sparse, atol=TOL, rtol=0)


def test_per_hit_sparse_score_equals_full_scan_exactly(random_index):
    query = random_index.queries[1][0]
    full = random_index.searcher.sparse_scores(query)
    for row in range(0, N_DOCS, 97):
        assert random_index.searcher.sparse_score(query, row) == float(full[row])


# ---------------------------------------------------------------------------
# top_k and ties


def test_top_k_orders_by_score_then_row():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0], dtype=np.float32)
    assert top_k(scores, 1).tolist() == [1]
    assert top_k(scores, 2).tolist() == [1, 2]
    assert top_k(scores, 3).tolist() == [1, 2, 4]
    assert top_k(scores, 4).tolist() == [1, 2, 4, 3]
    assert top_k(scores, 5).tolist() == [1, 2, 4, 3, 0]


def test_top_k_tie_straddling_the_kth_position():
    # Rows 1..4 tie; k=3 cuts through the tie and must keep the earliest rows.
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.5, 0.9, 0.2], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [5, 1, 2]
    assert top_k(scores, 2).tolist() == [5, 1]
    # Same tie, rows given in reverse: the earlier row still wins.
    scores = np.array([0.5, 0.5, 0.5, 0.9], dtype=np.float32)
    assert top_k(scores, 2).tolist() == [3, 0]


def test_top_k_many_ties_equals_sorting():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=1000).astype(np.float32)
    expected = sorted(range(1000), key=lambda r: (-scores[r], r))
    for k in (1, 2, 5, 100, 167, 500, 999, 1000):
        assert top_k(scores, k).tolist() == expected[:k], k


def test_top_k_bounds():
    scores = np.array([0.2, 0.9, 0.5], dtype=np.float32)
    assert top_k(scores, 10).tolist() == [1, 2, 0]
    assert top_k(scores, 3).tolist() == [1, 2, 0]
    assert top_k(scores, 0).tolist() == []
    assert top_k(scores, -4).tolist() == []
    assert top_k(np.zeros(0, dtype=np.float32), 5).tolist() == []


def _tie_index() -> tuple[Searcher, QueryVectors]:
    """8 rows: rows 2, 5, 6 identical and best in dense and sparse; the rest identical and worse."""
    d = 8
    best, other = basis(d, (0, 1.0)), basis(d, (1, 1.0))
    best_rows = {2, 5, 6}
    dense = np.stack([best if r in best_rows else other for r in range(8)])
    sparse = [{3: 2.0, 9: 1.0} if r in best_rows else {3: 0.5} for r in range(8)]
    searcher = searcher_for(make_vectors(dense, sparse), vocab_size=20)
    return searcher, make_query(basis(d, (0, 1.0)), {3: 1.0, 9: 1.0})


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_search_ties_are_broken_by_row_order(mode):
    searcher, query = _tie_index()
    assert [h.row for h in searcher.search(query, k=2, mode=mode)] == [2, 5]  # tie straddles k
    assert [h.row for h in searcher.search(query, k=3, mode=mode)] == [2, 5, 6]
    assert [h.row for h in searcher.search(query, k=5, mode=mode)] == [2, 5, 6, 0, 1]  # second tie straddles k
    hits = searcher.search(query, k=8, mode=mode)
    assert [h.row for h in hits] == [2, 5, 6, 0, 1, 3, 4, 7]
    assert hits[0].score == hits[1].score == hits[2].score
    assert hits[3].score == hits[7].score < hits[2].score


def test_search_k_beyond_n_and_k_not_positive():
    searcher, query = _tie_index()
    for mode in ("dense", "sparse", "hybrid"):
        assert len(searcher.search(query, k=100, mode=mode)) == 8
        assert searcher.search(query, k=0, mode=mode) == []
        assert searcher.search(query, k=-1, mode=mode) == []


# ---------------------------------------------------------------------------
# empty sparse vectors


def test_query_with_empty_sparse_vector(random_index):
    rng = np.random.default_rng(11)
    q_dense = unit_rows(rng, 1, DIM)[0]
    query = make_query(q_dense, {})
    searcher = random_index.searcher
    dense = brute_dense(random_index.vectors.dense, q_dense)

    scores = searcher.sparse_scores(query)
    assert scores.shape == (N_DOCS,) and not scores.any()

    hits = searcher.search(query, k=6, mode="sparse")
    assert [h.row for h in hits] == [0, 1, 2, 3, 4, 5]  # all zero: row order
    assert all(h.score == 0 and h.sparse == 0 for h in hits)
    assert [h.dense for h in hits] == pytest.approx(dense[:6], abs=TOL)

    weights = ScoreWeights(dense=2.0, sparse=0.3)
    hybrid = searcher.search(query, k=10, mode="hybrid", weights=weights)
    dense_hits = searcher.search(query, k=10, mode="dense")
    assert [h.row for h in hybrid] == [h.row for h in dense_hits]
    for h, d in zip(hybrid, dense_hits):
        assert h.score == pytest.approx(2.0 * d.score, abs=TOL)
        assert h.sparse == 0
    assert_top_k_matches(hybrid, [2.0 * s for s in dense], 10)


def test_index_without_any_sparse_tokens():
    rng = np.random.default_rng(5)
    dense = unit_rows(rng, 30, 8)
    searcher = searcher_for(make_vectors(dense, [{} for _ in range(30)]), vocab_size=50)
    query = make_query(unit_rows(rng, 1, 8)[0], {1: 1.0, 7: 0.5})
    assert not searcher.sparse_scores(query).any()
    assert [h.row for h in searcher.search(query, k=4, mode="sparse")] == [0, 1, 2, 3]
    assert searcher.sparse_contributions(query, 3) == []


# ---------------------------------------------------------------------------
# weights


def test_score_weight_defaults():
    assert (ScoreWeights().dense, ScoreWeights().sparse, ScoreWeights().colbert) == (1.0, 0.3, 1.0)


def test_weights_change_the_order():
    d = 4
    # Row 0: perfect dense match, no shared tokens. Row 1: orthogonal, strong lexical match. Row 2: neither.
    dense = np.stack([basis(d, (0, 1.0)), basis(d, (1, 1.0)), basis(d, (2, 1.0))])
    sparse = [{}, {5: 2.0}, {6: 1.0}]
    searcher = searcher_for(make_vectors(dense, sparse), vocab_size=10)
    query = make_query(basis(d, (0, 1.0)), {5: 1.0})

    default = searcher.search(query, k=3, mode="hybrid")  # 1*1 + 0.3*0 = 1.0 vs 1*0 + 0.3*2 = 0.6
    assert [h.row for h in default] == [0, 1, 2]
    assert [h.score for h in default] == pytest.approx([1.0, 0.6, 0.0])

    lexical = searcher.search(query, k=3, mode="hybrid", weights=ScoreWeights(dense=1.0, sparse=1.0))  # 1.0 vs 2.0
    assert [h.row for h in lexical] == [1, 0, 2]
    assert [h.score for h in lexical] == pytest.approx([2.0, 1.0, 0.0])
    for h in lexical:
        assert (h.dense, h.sparse) == pytest.approx({0: (1.0, 0.0), 1: (0.0, 2.0), 2: (0.0, 0.0)}[h.row])

    dense_only = searcher.search(query, k=3, mode="hybrid", weights=ScoreWeights(dense=1.0, sparse=0.0))
    assert [h.row for h in dense_only] == [0, 1, 2]
    sparse_only = searcher.search(query, k=3, mode="hybrid", weights=ScoreWeights(dense=0.0, sparse=1.0))
    assert [h.row for h in sparse_only] == [1, 0, 2]


# ---------------------------------------------------------------------------
# sparse contributions


def _contribution_index(vocab_size: int = 20) -> Searcher:
    dense = np.stack([basis(4, (0, 1.0)), basis(4, (1, 1.0))])
    sparse = [{3: 4.0, 7: 0.25, 10: 3.0, 11: 1.0}, {2: 1.0}]
    return searcher_for(make_vectors(dense, sparse), vocab_size=vocab_size)


def test_sparse_contributions_shared_tokens_sorted_by_contribution():
    searcher = _contribution_index()
    query = make_query(basis(4, (0, 1.0)), {3: 0.5, 7: 2.0, 10: 1.0, 15: 1.0})
    contributions = searcher.sparse_contributions(query, 0)
    assert contributions == [(10, 3.0), (3, 2.0), (7, 0.5)]
    assert all(isinstance(t, int) and isinstance(c, float) for t, c in contributions)
    assert searcher.sparse_contributions(query, 1) == []
    assert searcher.sparse_score(query, 0) == pytest.approx(5.5)
    assert searcher.sparse_scores(query).tolist() == pytest.approx([5.5, 0.0])


def test_query_tokens_beyond_the_vocabulary_do_not_crash():
    searcher = _contribution_index(vocab_size=20)
    query = make_query(basis(4, (0, 1.0)), {3: 1.0, 25: 2.0, 1000: 3.0})
    assert searcher.sparse_scores(query).tolist() == pytest.approx([4.0, 0.0])
    assert searcher.sparse_contributions(query, 0) == [(3, 4.0)]
    hits = searcher.search(query, k=2, mode="sparse")
    assert [(h.row, h.score) for h in hits] == [(0, pytest.approx(4.0)), (1, 0.0)]
    hybrid = searcher.search(query, k=2, mode="hybrid")
    assert [h.row for h in hybrid] == [0, 1]


# ---------------------------------------------------------------------------
# ColBERT


def test_colbert_maxsim_is_mean_of_best_dots():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    d = rng.standard_normal((9, 8)).astype(np.float32)
    expected = sum(max(float(np.dot(qi, dj)) for dj in d) for qi in q) / len(q)
    assert colbert_maxsim(q, d) == pytest.approx(expected, abs=TOL)
    # float16 storage is accepted
    d16 = d.astype(np.float16)
    expected16 = sum(max(float(np.dot(qi, dj.astype(np.float32))) for dj in d16) for qi in q) / len(q)
    assert colbert_maxsim(q, d16) == pytest.approx(expected16, abs=TOL)
    # a hand-checked case: token 0 best matches doc token 1 (0.5), token 1 best matches doc token 0 (2.0)
    q_small = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    d_small = np.array([[-1.0, 2.0], [0.5, -3.0]], dtype=np.float32)
    assert colbert_maxsim(q_small, d_small) == pytest.approx((0.5 + 2.0) / 2)


def test_colbert_maxsim_empty():
    assert colbert_maxsim(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32)) == 0.0
    assert colbert_maxsim(np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32)) == 0.0


def test_colbert_mode_without_vectors_raises():
    searcher, query = _tie_index()
    with pytest.raises(NoColbertVectors):
        searcher.search(query, k=3, mode="colbert")
    with_colbert = make_query(query.dense, {3: 1.0}, colbert=np.ones((2, 4), np.float32))
    with pytest.raises(NoColbertVectors):
        searcher.search(with_colbert, k=3, mode="colbert")
    # and a query without ColBERT vectors cannot be re-ranked even with a fetch function
    with pytest.raises(NoColbertVectors):
        searcher.search(query, k=3, mode="colbert", fetch_colbert=lambda rows: [np.ones((1, 4))] * len(rows))


def _colbert_case():
    d = 4
    dense = np.stack([
        basis(d, (0, 1.0)),             # dense 1.0
        basis(d, (0, 0.8), (1, 0.6)),   # dense ~0.8
        basis(d, (0, 0.6), (1, 0.8)),   # dense ~0.6
        basis(d, (1, 1.0)),             # dense 0.0
    ])
    sparse = [{}, {4: 1.0}, {}, {}]
    searcher = searcher_for(make_vectors(dense, sparse), vocab_size=10)
    q_colbert = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    query = make_query(basis(d, (0, 1.0)), {4: 1.0}, colbert=q_colbert)
    doc_colbert = {
        0: np.array([[-1, 0, 0, 0], [0, -1, 0, 0]], dtype=np.float16),  # maxsim 0: every best dot is 0
        1: np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float16),   # maxsim 1
        2: np.array([[1, 0, 0, 0]], dtype=np.float16),                 # maxsim (1 + 0) / 2
        3: np.array([[0, 0, 1, 0]], dtype=np.float16),                 # maxsim 0
    }
    return searcher, query, doc_colbert


def test_colbert_rerank_changes_the_order():
    searcher, query, doc_colbert = _colbert_case()
    calls = []

    def fetch(rows):
        calls.append(list(rows))
        return [doc_colbert[r] for r in rows]

    hybrid = searcher.search(query, k=4, mode="hybrid")
    assert [h.row for h in hybrid] == [1, 0, 2, 3]  # ~0.8 + 0.3 * 1, 1.0, ~0.6, 0
    weights = ScoreWeights()
    hits = searcher.search(query, k=4, mode="colbert", weights=weights, fetch_colbert=fetch)
    assert calls == [[h.row for h in hybrid]]  # every row (fewer than the minimum candidates), in hybrid order

    dense = brute_dense(searcher.shards[0].dense, query.dense)
    sparse = [0.0, 1.0, 0.0, 0.0]
    expected = {}
    for row in range(4):
        maxsim = colbert_maxsim(query.colbert, doc_colbert[row])
        expected[row] = weights.dense * dense[row] + weights.sparse * sparse[row] + weights.colbert * maxsim
    for hit in hits:
        assert hit.colbert == pytest.approx(colbert_maxsim(query.colbert, doc_colbert[hit.row]))
        assert hit.dense == pytest.approx(dense[hit.row], abs=TOL)
        assert hit.sparse == pytest.approx(sparse[hit.row], abs=TOL)
        assert hit.score == pytest.approx(expected[hit.row], abs=TOL)
        assert hit.score == pytest.approx(
            weights.dense * hit.dense + weights.sparse * hit.sparse + weights.colbert * hit.colbert, abs=TOL)
    # maxsim: row0 0.0 (best dots are 0), row1 1.0, row2 0.5, row3 0.0
    # final: row1 ~1.1 + 1 = ~2.1, row2 ~0.6 + 0.5 = ~1.1, row0 1.0 + 0 = 1.0, row3 0
    assert [h.colbert for h in sorted(hits, key=lambda h: h.row)] == pytest.approx([0.0, 1.0, 0.5, 0.0])
    assert [h.row for h in hits] == [1, 2, 0, 3]
    assert [h.row for h in hits] != [h.row for h in hybrid]

    top2 = searcher.search(query, k=2, mode="colbert", weights=weights, fetch_colbert=fetch)
    assert [h.row for h in top2] == [1, 2]


def test_colbert_weight_zero_keeps_the_hybrid_order():
    searcher, query, doc_colbert = _colbert_case()
    fetch = lambda rows: [doc_colbert[r] for r in rows]  # noqa: E731
    weights = ScoreWeights(dense=1.0, sparse=0.3, colbert=0.0)
    hits = searcher.search(query, k=4, mode="colbert", weights=weights, fetch_colbert=fetch)
    hybrid = searcher.search(query, k=4, mode="hybrid", weights=weights)
    assert [h.row for h in hits] == [h.row for h in hybrid]
    assert [h.score for h in hits] == pytest.approx([h.score for h in hybrid], abs=TOL)


def test_colbert_ties_after_rerank_in_row_order():
    d = 4
    dense = np.stack([basis(d, (1, 1.0)), basis(d, (0, 1.0)), basis(d, (1, 1.0))])  # hybrid: row 1 first
    searcher = searcher_for(make_vectors(dense, [{}, {}, {}]), vocab_size=10)
    query = make_query(basis(d, (0, 1.0)), {}, colbert=np.array([[1, 0, 0, 0]], dtype=np.float32))
    doc = {0: np.array([[1, 0, 0, 0]], np.float32), 1: np.array([[0, 0, 0, 0]], np.float32),
           2: np.array([[1, 0, 0, 0]], np.float32)}
    # final scores: row0 0 + 1 = 1, row1 1 + 0 = 1, row2 0 + 1 = 1 -> all tied: row order
    hits = searcher.search(query, k=3, mode="colbert", fetch_colbert=lambda rows: [doc[r] for r in rows])
    assert [h.score for h in hits] == pytest.approx([1.0, 1.0, 1.0])
    assert [h.row for h in hits] == [0, 1, 2]


@pytest.mark.parametrize("k", [3, 20])
def test_colbert_candidates_are_the_hybrid_top(random_index, k):
    rng = np.random.default_rng(13)
    query, dense, sparse = random_index.queries[2]
    query = QueryVectors(query.dense, query.sparse_ids, query.sparse_weights,
                         colbert=rng.standard_normal((6, 8)).astype(np.float32))
    doc_colbert = {}
    requested = []

    def fetch(rows):
        requested.append(list(rows))
        for r in rows:
            doc_colbert.setdefault(r, np.random.default_rng(r).standard_normal((5, 8)).astype(np.float16))
        return [doc_colbert[r] for r in rows]

    weights = ScoreWeights()
    hits = random_index.searcher.search(query, k=k, mode="colbert", weights=weights, fetch_colbert=fetch)
    assert len(requested) == 1
    n_candidates = max(k * 10, 100)
    hybrid = [weights.dense * d + weights.sparse * s for d, s in zip(dense, sparse)]
    order = sorted(range(N_DOCS), key=lambda r: (-hybrid[r], r))
    assert len(requested[0]) == n_candidates
    # The candidates are the hybrid top, best first (rows exact unless within TOL of a tie).
    gap = hybrid[order[n_candidates - 1]] - hybrid[order[n_candidates]]
    if gap > TOL:
        assert set(requested[0]) == set(order[:n_candidates])
    assert [hybrid[r] for r in requested[0]] == pytest.approx([hybrid[r] for r in order[:n_candidates]], abs=TOL)

    assert len(hits) == k
    final = {r: hybrid[r] + weights.colbert * colbert_maxsim(query.colbert, doc_colbert[r]) for r in requested[0]}
    expected_rows = sorted(final, key=lambda r: (-final[r], r))[:k]
    assert [h.score for h in hits] == pytest.approx([final[r] for r in expected_rows], abs=TOL)
    assert [h.row for h in hits] == expected_rows
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


@pytest.mark.parametrize("mode", ["bm25", "", "Dense", "colbert "])
def test_unknown_mode_raises(mode):
    searcher, query = _tie_index()
    with pytest.raises(ValueError, match="unknown mode"):
        searcher.search(query, k=3, mode=mode)


# ---------------------------------------------------------------------------
# Fusion, deleted rows, many queries at once


def test_minmax_fusion_equals_brute_force(random_index):
    for query, dense, sparse in random_index.queries:
        def norm(values):
            low, high = min(values), max(values)
            return [(v - low) / (high - low) for v in values]

        dn, sn = norm(dense), norm(sparse)
        expected = [0.7 * d + 0.4 * s for d, s in zip(dn, sn)]
        hits = random_index.searcher.search(query, k=10, weights=ScoreWeights(0.7, 0.4), normalize="minmax")
        assert_top_k_matches(hits, expected, 10)


def test_rrf_fusion_equals_brute_force(random_index):
    for query, dense, sparse in random_index.queries:
        expected = [0.0] * len(dense)
        for scores in (dense, sparse):
            order = sorted(range(len(scores)), key=lambda r: (-scores[r], r))[:RRF_DEPTH]
            for rank, row in enumerate(order, start=1):
                expected[row] += 1.0 / (RRF_K + rank)
        hits = random_index.searcher.search(query, k=10, fusion="rrf")
        # Near-ties in either input ranking may swap ranks, so compare scores with a loose tolerance.
        for hit in hits:
            assert hit.score == pytest.approx(expected[hit.row], abs=2e-4)
        best = sorted(expected, reverse=True)[:10]
        np.testing.assert_allclose([h.score for h in hits], best, atol=2e-4)


def test_unknown_fusion_is_refused(random_index):
    with pytest.raises(ValueError, match="fusion"):
        random_index.searcher.search(random_index.queries[0][0], fusion="borda")


def test_search_many_equals_one_by_one(random_index):
    queries = [q for q, _, _ in random_index.queries]
    many = random_index.searcher.search_many(queries, k=7, mode="hybrid", batch=2)
    for query, hits in zip(queries, many):
        single = random_index.searcher.search(query, k=7, mode="hybrid")
        assert [h.row for h in hits] == [h.row for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-6)


def test_deleted_rows_are_never_returned():
    rng = np.random.default_rng(3)
    dense = unit_rows(rng, 50, DIM).astype(np.float16)
    sparse = [random_sparse(rng, 5) for _ in range(50)]
    vectors = make_vectors(dense.astype(np.float32), sparse)
    token_ids, token_ptr, rows, weights = invert(vectors.sparse_indptr, vectors.sparse_indices,
                                                 vectors.sparse_values, VOCAB)
    live = np.ones(50, dtype=bool)
    live[::2] = False  # every even row deleted
    searcher = Searcher([ShardVectors(0, dense, token_ids, token_ptr, rows, weights, live=live)], VOCAB)
    query = make_query(unit_rows(rng, 1, DIM)[0], random_sparse(rng, 30))
    for mode in ("dense", "sparse", "hybrid"):
        hits = searcher.search(query, k=100, mode=mode)
        assert len(hits) == 25 and all(h.row % 2 == 1 for h in hits)
    assert all(h.row % 2 == 1 for h in searcher.search(query, k=100, fusion="rrf"))


def test_tokens_in_most_documents_use_dense_columns_and_stay_exact():
    rng = np.random.default_rng(11)
    n = 300
    dense = unit_rows(rng, n, DIM)
    sparse = []
    for row in range(n):
        tokens = random_sparse(rng, 6)
        tokens[5] = float(rng.random() + 0.01)  # in every document: a dense column
        if row % 3:
            tokens[9] = float(rng.random() + 0.01)  # in two thirds: also a dense column
        sparse.append(tokens)
    vectors = make_vectors(dense, sparse)
    searcher = searcher_for(vectors, vocab_size=VOCAB)
    assert searcher.shards[0].heavy_ids.tolist() == [5, 9]
    q_sparse = {5: 0.4, 9: 0.7, 17: 0.2}
    query = make_query(unit_rows(rng, 1, DIM)[0], q_sparse)
    expected = brute_sparse(sparse, q_sparse)
    hits = searcher.search(query, k=20, mode="sparse")
    assert_top_k_matches(hits, expected, 20)
    for hit in hits:
        assert hit.sparse == pytest.approx(searcher.sparse_score(query, hit.row), abs=1e-6)


def test_streaming_inversion_equals_the_whole_shard_inversion():
    generator = np.random.default_rng(7)
    vocab, n_rows = 50, 300
    lengths = generator.integers(0, 12, n_rows)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([np.sort(generator.choice(vocab, k, replace=False)) for k in lengths]).astype(np.uint32)
    values = generator.random(len(indices)).astype(np.float32)
    bounds = [0, 1, 70, 71, 200, n_rows]  # uneven groups, one of a single row

    def groups():
        for a, b in zip(bounds[:-1], bounds[1:]):
            yield indptr[a:b + 1] - indptr[a], indices[indptr[a]:indptr[b]], values[indptr[a]:indptr[b]]

    for got, expected in zip(invert_streaming(groups, vocab), invert(indptr, indices, values, vocab)):
        np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------
# The production path: a real index of several shards, with deletion sets and a compacted shard, opened the
# way `bge-index search` opens it (memory-mapped search files), against brute force over the Parquet shards.


WORDS = ["moon", "tides", "bread", "train", "garden", "octopus", "Mond", "lune", "tren", "compost", "earth",
         "blue", "blood", "hearts", "sourdough", "starter", "alps", "steep"]
STORE_QUERIES = ["moon tides", "the octopus has three hearts and blue blood", "bread garden compost train",
                 "sourdough starter note 7", "zzqx"]


def store_records(n: int, seed: int, prefix: str = "d") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) + f" note {i}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def store_index(spread_model, tmp_path_factory):
    """Three runs with 8-row shards: a first build, then updates and removals (deletion sets, one shard more
    than half dead and so compacted), then more of them (a deletion set that grows, one in a newer shard)."""
    with pytest.MonkeyPatch.context() as patch:
        # Small-shard merging would fold the deletion sets this fixture is about into merged shards.
        patch.setattr(shard_writer, "MERGE_FACTOR", 1000)
        return _build_store_index(spread_model, tmp_path_factory)


def _build_store_index(spread_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    corpus, out = root / "c.jsonl", root / "ix"
    options = ("--shard-rows", 8, "--dtype", "fp32", "--device", "cpu")
    first = store_records(40, seed=1)
    write_jsonl(corpus, first)
    index(corpus, out, spread_model, *options)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [8] * 5
    fifth = manifest["shards"][4]["file"]  # d32..d39

    gone = {"d20", "d32", "d33", "d34", "d35", "d36"}
    second = [dict(r, text=r["text"] + " edited") if r["id"] in ("d1", "d2", "d9") else r
              for r in first if r["id"] not in gone] + store_records(5, seed=2, prefix="n")
    write_jsonl(corpus, second)
    index(corpus, out, spread_model, *options)
    manifest = json.loads((out / "manifest.json").read_text())
    assert fifth not in [s["file"] for s in manifest["shards"]]  # 5 of its 8 rows dead: compacted

    third = [dict(r, text=r["text"] + " again") if r["id"] in ("d3", "d10", "n1") else r
             for r in second if r["id"] not in ("d25", "n3")]
    write_jsonl(corpus, third)
    index(corpus, out, spread_model, *options)
    return out, {r["id"]: r["text"] for r in third}


@pytest.fixture(scope="module")
def store_queries(spread_model) -> list[QueryVectors]:
    """STORE_QUERIES encoded the way every search backend encodes queries, with the index's model."""
    return encode_queries(load_encoder(str(spread_model), device="cpu", dtype="fp32"), STORE_QUERIES)


def brute_force_rows(out) -> list[tuple[int, str, np.ndarray, dict[int, float]]]:
    """(index row, id, dense, {token: weight}) of every live row, read with pyarrow and numpy only. Rows are
    numbered over the manifest's shards in order, deleted rows included (the index's row order)."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows, start = [], 0
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"], columns=["id", "dense", "sparse"])
        assert table.num_rows == shard["rows"]
        deleted = set(np.load(out / shard["deleted_file"]).tolist()) if shard.get("deleted_file") else set()
        dense = table.column("dense").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        dense = dense.astype(np.float64).reshape(table.num_rows, -1)
        for local, (row_id, sparse) in enumerate(zip(table.column("id").to_pylist(),
                                                     table.column("sparse").to_pylist())):
            if local not in deleted:
                rows.append((start + local, row_id, dense[local], dict(zip(sparse["indices"], sparse["values"]))))
        start += shard["rows"]
    return rows


def brute_force_scores(rows, query: QueryVectors) -> tuple[dict[str, float], dict[str, float]]:
    q_dense = query.dense.astype(np.float64)
    q_sparse = dict(zip(query.sparse_ids.tolist(), query.sparse_weights.tolist()))
    dense = {row_id: float(vector @ q_dense) for _, row_id, vector, _ in rows}
    sparse = {row_id: sum(w * tokens.get(t, 0.0) for t, w in q_sparse.items()) for _, row_id, _, tokens in rows}
    return dense, sparse


def ranked(scores: dict[str, float], position: dict[str, int]) -> list[str]:
    """Ids best first, equal scores in index order."""
    return sorted(scores, key=lambda row_id: (-scores[row_id], position[row_id]))


def has_near_tie(scores: dict[str, float], tol: float) -> bool:
    values = sorted(scores.values())
    return any(0 < b - a <= tol for a, b in zip(values, values[1:]))


def assert_ranking_equals(got: list[tuple[str, float]], expected: dict[str, float], position: dict[str, int],
                           k: int, tol: float) -> None:
    """(id, score) hits are the brute-force top-k: same ids in the same order, scores within `tol`. Two ids may
    swap only when their brute-force scores differ (no exact tie) by at most `tol`: float32 may order those
    either way. Exact ties go in index order."""
    want = ranked(expected, position)[:k]
    ids = [row_id for row_id, _ in got]
    assert len(ids) == len(want) == min(k, len(expected))
    assert len(set(ids)) == len(ids)
    for rank, ((got_id, score), want_id) in enumerate(zip(got, want)):
        assert score == pytest.approx(expected[want_id], abs=tol), (rank, got_id, want_id)
        if got_id != want_id:
            assert 0 < abs(expected[got_id] - expected[want_id]) <= tol, (rank, ids, want)


def expected_scores(rows, position, query: QueryVectors, weights: ScoreWeights, mode: str, fusion: str):
    """{id: score} by brute force, or None for rrf over a ranking with a near-tie (float32 may order it
    differently, and then the ranks and so the fused scores differ)."""
    dense, sparse = brute_force_scores(rows, query)
    if fusion == "rrf":
        if has_near_tie(dense, TOL) or has_near_tie(sparse, TOL):
            return None
        fused = {row_id: 0.0 for row_id in dense}
        for scores in (dense, sparse):
            for rank, row_id in enumerate(ranked(scores, position)[:RRF_DEPTH], start=1):
                fused[row_id] += 1.0 / (RRF_K + rank)
        return fused
    if mode == "dense":
        return dense
    if mode == "sparse":
        return sparse
    return {row_id: weights.dense * dense[row_id] + weights.sparse * sparse[row_id] for row_id in dense}


STORE_CASES = [("dense", ScoreWeights(), "weighted"), ("sparse", ScoreWeights(), "weighted"),
               ("hybrid", ScoreWeights(), "weighted"), ("hybrid", ScoreWeights(0.4, 1.0), "weighted"),
               ("hybrid", ScoreWeights(), "rrf")]


def test_store_is_multi_shard_with_deletions_and_a_compaction(store_index):
    out, live = store_index
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    assert len(shards) >= 6 and all(s["rows"] <= 8 for s in shards)
    with_deletions = [s for s in shards if s.get("deleted_file")]
    assert len(with_deletions) >= 3
    assert any(np.load(out / s["deleted_file"]).size >= 3 for s in with_deletions)  # grew over two runs
    assert len({s["file"].split("-")[1] for s in shards}) >= 2  # shards of several generations
    assert sorted(row_id for _, row_id, _, _ in brute_force_rows(out)) == sorted(live)  # brute force sees the live rows


@pytest.mark.parametrize("k", [1, 13, 1000])
def test_memory_mapped_search_files_equal_brute_force(store_index, store_queries, k):
    """The searcher `bge-index search` builds: OpenIndex's memory-mapped shards (with their deletion masks)."""
    out, _ = store_index
    rows = brute_force_rows(out)
    position = {row_id: row for row, row_id, _, _ in rows}
    id_of = {row: row_id for row_id, row in position.items()}
    manifest = read_manifest(out)
    shards = OpenIndex.open(out, manifest).vectors
    assert sum(shard.live is not None for shard in shards) >= 3  # deletion sets are in play
    searcher = Searcher(shards, manifest.vocab_size)
    checked = 0
    for mode, weights, fusion in STORE_CASES:
        results = searcher.search_many(store_queries, k, mode, weights, fusion=fusion)
        for query, hits in zip(store_queries, results):
            expected = expected_scores(rows, position, query, weights, mode, fusion)
            if expected is None:
                continue
            assert all(hit.row in id_of for hit in hits)  # never a deleted row
            got = [(id_of[hit.row], hit.score) for hit in hits]
            assert_ranking_equals(got, expected, position, k, 1e-6 if fusion == "rrf" else TOL)
            if fusion == "weighted":
                dense, sparse = brute_force_scores(rows, query)
                for hit in hits:
                    assert hit.dense == pytest.approx(dense[id_of[hit.row]], abs=TOL)
                    assert hit.sparse == pytest.approx(sparse[id_of[hit.row]], abs=TOL)
            checked += 1
    assert checked >= len(STORE_CASES) * len(STORE_QUERIES) - len(STORE_QUERIES) + 3  # rrf: most queries too


def test_search_command_equals_brute_force(store_index, store_queries, tmp_path):
    """End to end: `bge-index search --format json` (ids come from the shards, scores rounded to 6 places), with a
    k above the number of live rows, so whole rankings are compared."""
    out, _ = store_index
    k = 1000
    rows = brute_force_rows(out)
    position = {row_id: row for row, row_id, _, _ in rows}
    queries_file = tmp_path / "queries.jsonl"
    write_jsonl(queries_file, [{"_id": str(i), "text": text} for i, text in enumerate(STORE_QUERIES)])
    checked = 0
    for mode, weights, fusion in STORE_CASES:
        result = ok("search", out, "--queries", queries_file, "-k", k, "--mode", mode, "--fusion", fusion,
                    "--dense-weight", weights.dense, "--sparse-weight", weights.sparse, "--format", "json")
        answers = json.loads(result.stdout)
        assert [a["query_id"] for a in answers] == [str(i) for i in range(len(STORE_QUERIES))]
        for answer, query in zip(answers, store_queries):
            expected = expected_scores(rows, position, query, weights, mode, fusion)
            if expected is None:
                continue
            got = [(hit["id"], hit["score"]) for hit in answer["hits"]]
            assert_ranking_equals(got, expected, position, k, 2e-6 if fusion == "rrf" else TOL)
            checked += 1
    assert checked >= len(STORE_CASES) * len(STORE_QUERIES) - len(STORE_QUERIES) + 3
