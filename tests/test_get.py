"""`bge-index get INDEX ID...`: stored documents as JSON (issue 20, point 4)."""

from __future__ import annotations

import json

from helpers import index, invoke, write_jsonl


def test_get_prints_stored_documents_and_names_missing_ids(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "a", "text": "the moon"}, {"id": "b", "text": "tides"}, {"id": "c", "text": "sun"}])
    index(corpus, out, tiny_model)
    write_jsonl(corpus, [{"id": "a", "text": "the moon, edited", "lang": "en"}, {"id": "b", "text": "tides"}])
    index(corpus, out, tiny_model)  # a updated (its old row deleted), c removed
    result = invoke("get", out, "b", "a")
    assert result.exit_code == 0, result.output
    source = str(corpus.resolve())
    assert json.loads(result.stdout) == [
        {"id": "b", "text": "tides", "source": source, "source_line": 2, "metadata": None},
        {"id": "a", "text": "the moon, edited", "source": source, "source_line": 1, "metadata": {"lang": "en"}}]
    missing = invoke("get", out, "a", "c", "zz")
    assert missing.exit_code == 1 and "'c'" in missing.stderr and "'zz'" in missing.stderr
    assert [r["id"] for r in json.loads(missing.stdout)] == ["a"]


def test_get_on_a_chunked_index_gives_the_passages_in_order(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    text = " ".join(f"word{i}" for i in range(200))
    write_jsonl(corpus, [{"id": "long", "text": text}])
    index(corpus, out, tiny_model, "--chunk-tokens", "32")
    records = json.loads(invoke("get", out, "long").stdout)
    assert len(records) > 1 and [r["chunk"] for r in records] == list(range(len(records)))
    assert all(text[r["char_start"]:r["char_end"]] == r["text"] for r in records)
