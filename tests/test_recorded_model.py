"""`index` remembers an index's model, and a dry run never reaches for a hub (issue 20, point 6)."""

from __future__ import annotations

import pytest

from helpers import index, invoke, live_texts, write_jsonl


def test_index_without_model_uses_the_recorded_one(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("BGE_INDEX_MODEL", raising=False)
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "a", "text": "moon"}])
    index(corpus, out, tiny_model)
    write_jsonl(corpus, [{"id": "a", "text": "moon"}, {"id": "b", "text": "tides"}])
    result = invoke("index", corpus, "--out", out)
    assert result.exit_code == 0, result.output
    assert set(live_texts(out)) == {"a", "b"}
    dry = invoke("index", corpus, "--out", out, "--dry-run")
    assert dry.exit_code == 0, dry.output


def test_a_dry_run_never_asks_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("BGE_INDEX_MODEL", raising=False)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if not kwargs.get("local_files_only"):
            pytest.fail("a dry run asked the hub")
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"id": "a", "text": "moon"}])
    result = invoke("index", corpus, "--out", tmp_path / "new", "--dry-run")
    assert result.exit_code == 1 and "never asks the hub" in result.stderr, result.output
    assert calls and all(call.get("local_files_only") for call in calls)


def test_id_from_stem_and_name(tmp_path):
    from bge_index.input.documents import iter_documents
    from bge_index.input.types import Document

    docs = tmp_path / "notes"
    (docs / "sub").mkdir(parents=True)
    (docs / "1.txt").write_text("one")
    (docs / "sub" / "2.md").write_text("two")

    def ids(id_from):
        return sorted(d.id for d in iter_documents([str(docs)], id_from=id_from) if isinstance(d, Document))

    assert ids("path") == ["1.txt", "sub/2.md"]
    assert ids("name") == ["1.txt", "2.md"]
    assert ids("stem") == ["1", "2"]


def test_index_id_from_stem_matches_beir_qrels(tiny_model, tmp_path):
    docs = tmp_path / "notes"
    docs.mkdir()
    (docs / "1.txt").write_text("the moon recedes")
    (docs / "2.txt").write_text("tides follow the moon")
    index(docs, tmp_path / "ix", tiny_model, "--id-from", "stem")
    assert set(live_texts(tmp_path / "ix")) == {"1", "2"}
    bad = invoke("index", docs, "--out", tmp_path / "iy", "--model", tiny_model, "--id-from", "basename")
    assert bad.exit_code == 2 and "--id-from" in bad.stderr
