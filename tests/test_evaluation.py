"""Evaluation: qrels/run files, metric names, trec_eval's metric definitions and query selection.

Expected values are worked out by hand from the formulas (written next to
them); a last test compares everything with pytrec_eval (trec_eval itself)
on a large random case, and is skipped where pytrec_eval is not installed.
"""

from __future__ import annotations

import gzip
import io
import math
from math import log2

import numpy as np
import pytest

from bge_index.search.evaluation import (
    EvaluationInputError,
    Metric,
    evaluate,
    evaluate_per_query,
    parse_metrics,
    query_coverage,
    rank_documents,
    read_qrels,
    read_run,
    write_trec_run,
)

ALL_METRICS = ("ndcg@5,ndcg@10,ndcg@100,ndcg,recall@3,recall@5,recall@10,recall@100,precision@1,precision@5,"
               "precision@10,precision@100,mrr,mrr@1,mrr@2,mrr@10,map,map@3,map@10,map@100")


# ---------------------------------------------------------------------------
# Hand-computed cases

# q1: relevant d1, d3, d5, d7 (d7 never retrieved); d9 judged non-relevant.
# Ranking by score: d1 d2 d3 d4 d5 d9 -> relevant at ranks 1, 3, 5; 4 relevant in the qrels.
BINARY_QRELS = {"q1": {"d1": 1, "d3": 1, "d5": 1, "d7": 1, "d9": 0}}
BINARY_RUN = {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.6, "d5": 0.5, "d9": 0.4}}


def one(metric: str, run=BINARY_RUN, qrels=BINARY_QRELS) -> float:
    return evaluate(run, qrels, metric)[metric]


def test_precision_counts_k_even_past_the_end_of_the_ranking():
    assert one("precision@1") == pytest.approx(1.0)  # d1 relevant: 1/1
    assert one("precision@5") == pytest.approx(0.6)  # d1 d3 d5 in the top 5: 3/5
    assert one("precision@10") == pytest.approx(0.3)  # 3 relevant, only 6 retrieved, still / 10: 3/10


def test_recall_divides_by_all_relevant_in_the_qrels():
    assert one("recall@3") == pytest.approx(0.5)  # d1 d3 of {d1, d3, d5, d7}: 2/4
    assert one("recall@10") == pytest.approx(0.75)  # d7 never retrieved: 3/4


def test_map_divides_by_relevant_in_the_qrels_not_retrieved():
    # AP = (P@1 + P@3 + P@5) / num_rel = (1/1 + 2/3 + 3/5) / 4 = 0.566667
    assert one("map") == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert one("map") == pytest.approx(0.5666667, abs=1e-6)
    # map@3 (map_cut_3): only ranks 1 and 3 count, still / 4: (1 + 2/3) / 4 = 0.416667
    assert one("map@3") == pytest.approx((1 + 2 / 3) / 4)


def test_binary_ndcg():
    # DCG@5 = 1/log2(2) + 1/log2(4) + 1/log2(6) = 1 + 0.5 + 0.386853 = 1.886853
    # IDCG@5 = 4 relevant at ranks 1..4 = 1 + 1/log2(3) + 1/log2(4) + 1/log2(5) = 2.561606
    # nDCG@5 = 1.886853 / 2.561606 = 0.736590
    expected = (1 + 1 / log2(4) + 1 / log2(6)) / (1 + 1 / log2(3) + 1 / log2(4) + 1 / log2(5))
    assert one("ndcg@5") == pytest.approx(expected)
    assert one("ndcg@5") == pytest.approx(0.736590, abs=1e-6)


def test_mrr_is_reciprocal_rank_of_first_relevant_within_k():
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    qrels = {"q": {"c": 1, "a": 0}}  # first relevant (c) at rank 3
    assert one("mrr@10", run, qrels) == pytest.approx(1 / 3)
    assert one("mrr", run, qrels) == pytest.approx(1 / 3)
    assert one("mrr@3", run, qrels) == pytest.approx(1 / 3)
    assert one("mrr@2", run, qrels) == 0.0  # rank 3 is past the cutoff


def test_graded_ndcg_uses_the_label_as_gain_and_ignores_negative_labels():
    qrels = {"q": {"a": 3, "b": 2, "c": 1, "x": 0, "y": -1}}
    run = {"q": {"y": 1.0, "c": 0.9, "a": 0.8, "x": 0.7, "b": 0.6}}  # y (label -1) first
    # Ranking y c a x b; gains 0 1 3 0 2 (-1 is not a penalty in trec_eval).
    # DCG@3 = 0 + 1/log2(3) + 3/log2(4) = 0.630930 + 1.5 = 2.130930
    # IDCG@3 = 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.261860 + 0.5 = 4.761860
    # nDCG@3 = 0.447499
    expected = (1 / log2(3) + 3 / log2(4)) / (3 + 2 / log2(3) + 1 / log2(4))
    assert one("ndcg@3", run, qrels) == pytest.approx(expected)
    assert one("ndcg@3", run, qrels) == pytest.approx(0.447499, abs=1e-6)
    # Linear gains, not 2^rel - 1 (that would give (1/log2(3) + 7/2) / (7 + 3/log2(3) + 1/2) = 0.439798).
    exponential = (1 / log2(3) + 7 / log2(4)) / (7 + 3 / log2(3) + 1 / log2(4))
    assert one("ndcg@3", run, qrels) != pytest.approx(exponential, abs=1e-3)
    # Whole ranking: DCG = 1/log2(3) + 3/log2(4) + 2/log2(6); IDCG = 3 + 2/log2(3) + 1/log2(4)
    expected_all = (1 / log2(3) + 3 / log2(4) + 2 / log2(6)) / (3 + 2 / log2(3) + 1 / log2(4))
    assert one("ndcg", run, qrels) == pytest.approx(expected_all)
    # y is not relevant for binary metrics either: relevant a, b, c; top 2 = y c.
    assert one("precision@2", run, qrels) == pytest.approx(0.5)
    assert one("mrr@1", run, qrels) == 0.0


def test_perfect_and_empty_rankings():
    qrels = {"q": {"a": 2, "b": 1}}
    perfect = evaluate({"q": {"a": 2.0, "b": 1.0}}, qrels, ALL_METRICS)
    for name in ("ndcg@5", "ndcg", "recall@5", "mrr@1", "map", "map@3", "precision@1"):
        assert perfect[name] == pytest.approx(1.0), name
    assert perfect["precision@5"] == pytest.approx(2 / 5)
    empty = evaluate({"q": {}}, qrels, ALL_METRICS)  # present with no documents: scores 0, still counted
    assert set(empty.values()) == {0.0}


# ---------------------------------------------------------------------------
# Ties: score descending, then document id descending (strcmp), rank column ignored


def test_ties_break_by_document_id_descending():
    scores = {"d1": 1.0, "d10": 1.0, "d2": 1.0, "d3": 0.5, "e": -0.0, "f": 0.0}
    # Among score 1.0: "d2" > "d10" > "d1" as strings (not as numbers); then 0.5; then f > e (0.0 == -0.0).
    assert [doc for doc, _ in rank_documents(scores)] == ["d2", "d10", "d1", "d3", "f", "e"]
    # The caller's order does not matter.
    assert rank_documents(list(reversed(list(scores.items())))) == rank_documents(scores)


def test_tie_breaking_decides_metrics():
    run = {"q": {"d1": 1.0, "d10": 1.0, "d2": 1.0}}
    # Order d2 d10 d1: d1 is at rank 3.
    assert one("mrr@10", run, {"q": {"d1": 1}}) == pytest.approx(1 / 3)
    assert one("precision@1", run, {"q": {"d2": 1}}) == 1.0
    assert one("precision@1", run, {"q": {"d1": 1}}) == 0.0


def test_read_run_ignores_the_rank_column(tmp_path):
    path = tmp_path / "run.trec"
    # Ranks claim d1 first, but d2 has the higher score and wins; d3/d4 tie and d4 > d3.
    path.write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 0.9 t\nq1 Q0 d3 3 0.1 t\nq1 Q0 d4 4 0.1 t\n")
    run = read_run(path)
    assert run == {"q1": {"d1": 0.5, "d2": 0.9, "d3": 0.1, "d4": 0.1}}
    assert [doc for doc, _ in rank_documents(run["q1"])] == ["d2", "d1", "d4", "d3"]
    assert one("mrr@10", run, {"q1": {"d1": 1}}) == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------
# Which queries are averaged


def test_queries_without_relevant_judgments_are_left_out():
    qrels = {"good": {"a": 1}, "none": {"a": 0, "b": -1}}
    run = {"good": {"a": 1.0}, "none": {"a": 1.0}}
    assert evaluate(run, qrels, "map,ndcg@10") == {"map": 1.0, "ndcg@10": 1.0}  # not (1 + 0) / 2
    assert set(evaluate_per_query(run, qrels, "map")) == {"good"}
    coverage = query_coverage(run, qrels)
    assert coverage.evaluated == ("good",)
    assert coverage.without_relevant == ("none",)


def test_queries_missing_from_the_run_are_skipped_unless_missing_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0}, "extra": {"a": 1.0}}  # q2 missing; "extra" has no judgments
    assert evaluate(run, qrels, "map") == {"map": 1.0}  # pytrec_eval/BEIR/trec_eval default: q1 only
    assert evaluate(run, qrels, "map", missing_as_zero=True) == {"map": 0.5}  # trec_eval -c: (1 + 0) / 2
    assert evaluate_per_query(run, qrels, "map", missing_as_zero=True) == {"q1": {"map": 1.0}, "q2": {"map": 0.0}}
    coverage = query_coverage(run, qrels)
    assert coverage.evaluated == ("q1",)
    assert coverage.missing_from_run == ("q2",)
    assert coverage.not_in_qrels == ("extra",)
    assert query_coverage(run, qrels, missing_as_zero=True).evaluated == ("q1", "q2")


def test_no_evaluable_query_is_an_error():
    with pytest.raises(EvaluationInputError, match="no query to evaluate"):
        evaluate({"x": {"a": 1.0}}, {"q": {"a": 1}}, "map")


def test_run_as_ranked_lists_and_bad_rankings():
    qrels = {"q": {"b": 1}}
    assert evaluate({"q": [("a", 1.0), ("b", 2.0)]}, qrels, "mrr@10") == {"mrr@10": 1.0}  # re-sorted by score
    with pytest.raises(EvaluationInputError, match="more than once"):
        evaluate({"q": [("a", 1.0), ("a", 2.0)]}, qrels, "map")
    with pytest.raises(EvaluationInputError, match="NaN"):
        evaluate({"q": {"a": math.nan}}, qrels, "map")


# ---------------------------------------------------------------------------
# Metric names


def test_parse_metrics():
    metrics = parse_metrics(" ndcg@10, recall@100,mrr@10,map,precision@5,map@100,P@1,NDCG@10,")
    assert [m.name for m in metrics] == ["ndcg@10", "recall@100", "mrr@10", "map", "precision@5", "map@100",
                                         "precision@1"]
    assert metrics[0] == Metric("ndcg", 10)
    assert metrics[3] == Metric("map", None)


@pytest.mark.parametrize("text, message", [
    ("ndcg@10,bleu@4", "unknown metric 'bleu@4'"),
    ("ndcg_cut_10", "unknown metric"),
    ("recall", "needs a cutoff"),
    ("precision", "needs a cutoff"),
    ("ndcg@0", "positive integer"),
    ("ndcg@", "positive integer"),
    ("ndcg@-1", "positive integer"),
    ("ndcg@1.5", "positive integer"),
    ("ndcg@²", "positive integer"),
    (" , ", "no metrics"),
])
def test_bad_metric_names(text, message):
    with pytest.raises(EvaluationInputError, match=message):
        parse_metrics(text)


def test_evaluate_rejects_unknown_metric():
    with pytest.raises(EvaluationInputError, match="unknown metric 'rprec'"):
        evaluate(BINARY_RUN, BINARY_QRELS, ["map", "rprec"])


# ---------------------------------------------------------------------------
# Qrels files

BEIR_TEXT = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tdoc 2\t0\nq2\td3\t2\n"
TREC_TEXT = "q1 0 d1 1\nq1 0 doc2 0\n\nq2 Q0 d3 2\n"


def test_read_qrels_beir_and_trec(tmp_path):
    beir = tmp_path / "qrels.tsv"
    beir.write_text(BEIR_TEXT)
    assert read_qrels(beir) == {"q1": {"d1": 1, "doc 2": 0}, "q2": {"d3": 2}}  # BEIR ids may hold spaces
    trec = tmp_path / "qrels.txt"
    trec.write_text(TREC_TEXT)
    assert read_qrels(trec) == {"q1": {"d1": 1, "doc2": 0}, "q2": {"d3": 2}}


def test_read_qrels_variants(tmp_path):
    headerless = tmp_path / "a.tsv"
    headerless.write_text("q1\td1\t1\r\nq1\td2\t1.0\r\n")  # no header, CRLF, a float-written label
    assert read_qrels(headerless) == {"q1": {"d1": 1, "d2": 1}}
    bom = tmp_path / "b.tsv"
    bom.write_bytes(b"\xef\xbb\xbfquery-id\tcorpus-id\tscore\nq\td\t-1\nq\td\t-1\n")  # identical repeat is fine
    assert read_qrels(bom) == {"q": {"d": -1}}
    tabs = tmp_path / "c.qrels"
    tabs.write_text("q1\t0\td1\t1\n")  # TREC with tabs
    assert read_qrels(tabs) == {"q1": {"d1": 1}}


def test_read_qrels_gz(tmp_path):
    for name, text in (("qrels.tsv.gz", BEIR_TEXT), ("qrels.txt.gz", TREC_TEXT)):
        path = tmp_path / name
        with gzip.open(path, "wt") as stream:
            stream.write(text)
        assert read_qrels(path)["q2"] == {"d3": 2}


@pytest.mark.parametrize("text, line, reason", [
    (BEIR_TEXT + "q3\td4\n", 5, "expected 3 tab-separated fields"),
    (BEIR_TEXT + "q3\td4\thigh\n", 5, "relevance 'high' is not an integer"),
    (BEIR_TEXT + "q3\td4\t0.5\n", 5, "relevance '0.5' is not an integer"),
    (BEIR_TEXT + "q3 0 d4 1\n", 5, "expected 3 tab-separated fields"),
    ("q1 0 d1 1\n\nq1 0 d2\n", 3, "expected 4 whitespace-separated fields"),
    ("q1 0 d1 1\nq1 0 d2 yes\n", 2, "relevance 'yes' is not an integer"),
    ("q1 0 d1 1\nq1 0 d1 2\n", 2, "judged 2 here but 1 at line 1"),
    ("just some text\n", 1, "not a qrels line"),
])
def test_malformed_qrels_name_file_and_line(tmp_path, text, line, reason):
    path = tmp_path / "qrels.tsv"
    path.write_text(text)
    with pytest.raises(EvaluationInputError) as error:
        read_qrels(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert reason in str(error.value)


def test_unreadable_qrels(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("query-id\tcorpus-id\tscore\n\n")
    with pytest.raises(EvaluationInputError, match="no relevance judgments"):
        read_qrels(empty)
    with pytest.raises(EvaluationInputError, match="cannot read"):
        read_qrels(tmp_path / "missing.tsv")
    broken = tmp_path / "broken.tsv.gz"
    broken.write_bytes(gzip.compress(BEIR_TEXT.encode())[:-12])
    with pytest.raises(EvaluationInputError, match="corrupt or truncated gzip"):
        read_qrels(broken)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(b"q1\td1\t1\nq\xe9\td2\t1\n")
    with pytest.raises(EvaluationInputError, match=r"latin.tsv:2: invalid UTF-8"):
        read_qrels(latin)


# ---------------------------------------------------------------------------
# Run files


def test_write_then_read_run_round_trips(tmp_path):
    scores = {"q1": [("b", np.float32(0.1)), ("a", np.float32(0.7)), ("c", np.float32(0.7))], "q2": []}
    buffer = io.StringIO()
    write_trec_run(buffer, scores, "dense")
    lines = buffer.getvalue().splitlines()
    # trec_eval order with ranks 1..n: c before a (tie, id descending), repr'd float scores.
    assert [line.split()[:4] for line in lines] == [["q1", "Q0", "c", "1"], ["q1", "Q0", "a", "2"],
                                                    ["q1", "Q0", "b", "3"]]
    assert all(line.endswith(" dense") for line in lines)
    path = tmp_path / "run.trec.gz"
    with gzip.open(path, "wt") as stream:
        stream.write(buffer.getvalue())
    assert read_run(path) == {"q1": {"c": float(np.float32(0.7)), "a": float(np.float32(0.7)),
                                     "b": float(np.float32(0.1))}}


@pytest.mark.parametrize("run, tag", [
    ({"q1": [("doc 1", 1.0)]}, "t"),
    ({"q 1": [("d", 1.0)]}, "t"),
    ({"q1": [("d", 1.0)]}, "my run"),
    ({"q1": [("d", math.nan)]}, "t"),
])
def test_write_trec_run_rejects_what_cannot_be_read_back(run, tag):
    with pytest.raises(EvaluationInputError):
        write_trec_run(io.StringIO(), run, tag)


@pytest.mark.parametrize("text, line, reason", [
    ("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 0.4\n", 2, "expected 6 whitespace-separated fields"),
    ("q1 Q0 d1 1 high t\n", 1, "score 'high' is not a number"),
    ("q1 Q0 d1 1 nan t\n", 1, "NaN"),
    ("q1 Q0 d1 1 0.5 t\n\nq1 Q0 d1 2 0.4 t\n", 3, "document 'd1' listed twice for query 'q1'"),
])
def test_malformed_run_names_file_and_line(tmp_path, text, line, reason):
    path = tmp_path / "run.trec"
    path.write_text(text)
    with pytest.raises(EvaluationInputError) as error:
        read_run(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert reason in str(error.value)


# ---------------------------------------------------------------------------
# Agreement with trec_eval itself, through pytrec_eval


def random_case(seed: int = 7, n_queries: int = 400):
    """Graded labels (-1..3), heavy score ties, ids whose string order differs from numeric order."""
    rng = np.random.default_rng(seed)
    run, qrels = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        pool = [f"d{n}" for n in rng.choice(300, size=80, replace=False)] + ["é1", "z9", "Z9", "d"]
        if rng.random() < 0.9:  # some judged queries are missing from the run
            size = int(rng.integers(0, 60)) if rng.random() < 0.97 else 0  # a few empty rankings
            docs = rng.choice(pool, size=size, replace=False)
            run[qid] = {str(d): float(s) for d, s in zip(docs, rng.integers(0, 6, size=size) / 4)}  # few values
        if rng.random() < 0.95:  # some run queries have no judgments
            judged = rng.choice(pool, size=int(rng.integers(1, 30)), replace=False)
            labels = rng.choice([-1, 0, 0, 0, 1, 1, 2, 3], size=judged.size)
            if rng.random() < 0.05:
                labels = np.minimum(labels, 0)  # no relevant document at all
            qrels[qid] = {str(d): int(label) for d, label in zip(judged, labels)}
    return run, qrels


TREC_EVAL_NAMES = {"ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10", "ndcg@100": "ndcg_cut_100", "ndcg": "ndcg",
                   "recall@3": "recall_3", "recall@5": "recall_5", "recall@10": "recall_10",
                   "recall@100": "recall_100", "precision@1": "P_1", "precision@5": "P_5", "precision@10": "P_10",
                   "precision@100": "P_100", "map": "map", "map@3": "map_cut_3", "map@10": "map_cut_10",
                   "map@100": "map_cut_100", "mrr": "recip_rank"}
TREC_EVAL_MEASURES = {"ndcg_cut.5,10,100", "ndcg", "recall.3,5,10,100", "P.1,5,10,100", "map", "map_cut.3,10,100",
                      "recip_rank"}


def test_agrees_with_pytrec_eval(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run, qrels = random_case()
    ours = evaluate_per_query(run, qrels, ALL_METRICS)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, TREC_EVAL_MEASURES).evaluate(run)
    # Same queries, less those without a relevant judgment (our documented difference).
    with_relevant = {qid for qid in theirs if any(label > 0 for label in qrels[qid].values())}
    assert set(ours) == with_relevant
    assert len(theirs) > len(with_relevant) and len(with_relevant) > 300  # the case exercises both
    for qid, values in ours.items():
        for name, trec_name in TREC_EVAL_NAMES.items():
            assert values[name] == pytest.approx(theirs[qid][trec_name], abs=1e-9), (qid, name)
        # mrr@k is recip_rank counted only when the first relevant document is within the top k.
        first = round(1 / theirs[qid]["recip_rank"]) if theirs[qid]["recip_rank"] else math.inf
        for k in (1, 2, 10):
            assert values[f"mrr@{k}"] == pytest.approx(1 / first if first <= k else 0.0, abs=1e-12)
    means = evaluate(run, qrels, ALL_METRICS)
    for name, trec_name in TREC_EVAL_NAMES.items():
        assert means[name] == pytest.approx(np.mean([theirs[q][trec_name] for q in with_relevant]), abs=1e-9)

    # missing_as_zero equals trec_eval -c: pytrec_eval scores an empty ranking 0 for every measure.
    completed = {**{qid: {} for qid in qrels}, **run}
    theirs_complete = pytrec_eval.RelevanceEvaluator(qrels, TREC_EVAL_MEASURES).evaluate(completed)
    all_relevant = [q for q in qrels if any(label > 0 for label in qrels[q].values())]
    means_complete = evaluate(run, qrels, ALL_METRICS, missing_as_zero=True)
    for name, trec_name in TREC_EVAL_NAMES.items():
        expected = np.mean([theirs_complete[q][trec_name] for q in all_relevant])
        assert means_complete[name] == pytest.approx(expected, abs=1e-9)

    # And through files: a written run read back scores the same (a run file cannot hold an empty ranking).
    buffer = io.StringIO()
    write_trec_run(buffer, run, "random")
    (tmp_path / "run.trec").write_text(buffer.getvalue())
    non_empty = {qid: ranking for qid, ranking in run.items() if ranking}
    assert evaluate(read_run(tmp_path / "run.trec"), qrels, ALL_METRICS) == evaluate(non_empty, qrels, ALL_METRICS)
