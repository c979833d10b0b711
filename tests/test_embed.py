"""`bge-index embed`: the vectors the index stores, as JSON Lines (issue 20, point 8)."""

from __future__ import annotations

import doctest
import json

import numpy as np

from helpers import index, invoke, load_vectors, write_jsonl
import bge_index.model.embedding as embedding_module
from bge_index.errors import EXIT_FAILURE
from bge_index.store.manifest import read_manifest


def test_embed_gives_the_vectors_the_index_stores(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    records = [{"id": "a", "text": "the moon recedes from the earth"}, {"id": "b", "text": "tides"},
               {"id": "c", "text": "bread needs time and warmth"}]
    write_jsonl(corpus, records)
    index(corpus, out, tiny_model)
    result = invoke("embed", corpus, "--index", out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b", "c"]
    stored = load_vectors(out, read_manifest(out))
    for line in lines:
        row = list(stored.ids).index(line["id"])
        np.testing.assert_allclose(line["dense"], stored.dense[row].astype(np.float32), atol=2e-3)
        start, end = stored.sparse_indptr[row], stored.sparse_indptr[row + 1]
        assert [t for t, _ in line["sparse"]] == stored.sparse_indices[start:end].tolist()
        np.testing.assert_allclose([w for _, w in line["sparse"]], stored.sparse_values[start:end], rtol=1e-3,
                                   atol=1e-4)


def test_embed_text_lines_and_colbert(tiny_model, tmp_path):
    (tmp_path / "lines.txt").write_text("first line\n\nthird line\n")
    result = invoke("embed", tmp_path / "lines.txt", "--model", tiny_model, "--colbert")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["1", "3"]
    assert all(len(line["dense"]) == 32 and line["colbert"] and len(line["colbert"][0]) == 32 for line in lines)
    assert abs(np.linalg.norm(lines[0]["dense"]) - 1) < 1e-2


def test_embed_reads_stdin_and_skips_bad_lines(tiny_model, tmp_path):
    stdin = '{"id": "x", "text": "moon"}\n{bad json\n'
    result = invoke("embed", "-", "--model", tiny_model, stdin=stdin)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["x"]
    assert "skipped: malformed JSON" in result.stderr


def test_embed_colbert_of_an_index_without_it_is_refused_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "a", "text": "tides"}])
    index(corpus, out, tiny_model)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    import bge_index.search.local_index as local_index
    monkeypatch.setattr(local_index, "load_index_encoder", no_model)
    result = invoke("embed", corpus, "--index", out, "--colbert")
    # as `search --mode colbert` on such an index: NoColbertVectors, an IndexFormatError (exit 1)
    assert result.exit_code == EXIT_FAILURE, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("bge-index: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "no ColBERT vectors" in result.stderr and "--colbert" in result.stderr


def test_embedding_module_examples_hold():
    assert doctest.testmod(embedding_module).failed == 0
