"""eval against the qrels people have: per-query metrics, and judged ids the index does not hold (issue 20)."""

from __future__ import annotations

import json

from helpers import index, invoke, write_jsonl


def _notes(tmp_path):
    docs = tmp_path / "notes"
    docs.mkdir()
    for i, text in enumerate(["the moon recedes", "tides follow the moon", "bread needs time"], start=1):
        (docs / f"{i}.md").write_text(text)
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "moon"}, {"_id": "q2", "text": "bread"}])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t1\t1\nq1\t2\t1\nq2\t3\t1\n")
    return docs


def test_eval_fails_loudly_when_no_judged_id_is_in_the_index(tiny_model, tmp_path):
    docs = _notes(tmp_path)
    index(docs, tmp_path / "ix", tiny_model)  # ids are paths: 1.md, 2.md, 3.md
    result = invoke("eval", tmp_path / "ix", "--queries", tmp_path / "queries.jsonl", "--qrels", tmp_path / "qrels.tsv")
    assert result.exit_code == 1, result.output
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("bge-index: error: none of the 3 documents judged relevant") and "--id-from stem" in line
    # with ids from the stems, the same qrels match
    index(docs, tmp_path / "iy", tiny_model, "--id-from", "stem")
    ok = invoke("eval", tmp_path / "iy", "--queries", tmp_path / "queries.jsonl", "--qrels", tmp_path / "qrels.tsv",
                "--format", "json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["relevant_documents"] == {"judged": 3, "in_index": 3}


def test_eval_warns_with_a_count_when_some_judged_ids_are_missing(tiny_model, tmp_path):
    docs = _notes(tmp_path)
    (docs / "3.md").unlink()
    index(docs, tmp_path / "ix", tiny_model, "--id-from", "stem")
    result = invoke("eval", tmp_path / "ix", "--queries", tmp_path / "queries.jsonl", "--qrels", tmp_path / "qrels.tsv")
    assert result.exit_code == 0, result.output
    assert "1 of the 3 documents judged relevant are not in the index (e.g. '3')" in result.stderr


def test_eval_per_query_in_table_and_json(tiny_model, tmp_path):
    docs = _notes(tmp_path)
    index(docs, tmp_path / "ix", tiny_model, "--id-from", "stem")
    args = ["eval", tmp_path / "ix", "--queries", tmp_path / "queries.jsonl", "--qrels", tmp_path / "qrels.tsv",
            "--modes", "dense,sparse", "--metrics", "ndcg@10,recall@100"]
    data = json.loads(invoke(*args, "--per-query", "--format", "json").stdout)
    assert set(data["per_query"]) == {"dense", "sparse"} and set(data["per_query"]["dense"]) == {"q1", "q2"}
    for mode, queries in data["per_query"].items():  # the means are the means of the per-query values
        mean = sum(q["ndcg@10"] for q in queries.values()) / len(queries)
        assert abs(mean - data["metrics"][mode]["ndcg@10"]) < 1e-9
    table = invoke(*args, "--per-query").stdout
    assert "per query" in table and "q1" in table and "q2" in table
    assert "per_query" not in json.loads(invoke(*args, "--format", "json").stdout)
