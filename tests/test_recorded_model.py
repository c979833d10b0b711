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
