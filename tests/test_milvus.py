"""Export to Milvus Lite and search there: the same top-10 as local search, idempotent and resumable exports,
empty sparse vectors, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import SAMPLE_CORPUS, SAMPLE_QUERIES, invoke, load_vectors, ok, write_jsonl

from bge_index.search.milvus import connect, export_index, iter_collection_ids, stored_identity
from bge_index.store.manifest import Manifest, read_manifest
from bge_index.store.shard_writer import IndexWriter, RowBatch

pytest.importorskip("milvus_lite", reason="the 'milvus' extra is not installed (pip install -e '.[test,ray,milvus]')")

pytestmark = pytest.mark.slow  # Milvus Lite starts a server process per database file

FP32 = ("--dtype", "fp32", "--device", "cpu")


def queries() -> list[str]:
    """The sample queries plus openings of sample documents (lexical overlap, so sparse scores matter)."""
    texts = [json.loads(line)["text"] for line in SAMPLE_QUERIES.read_text().splitlines() if line]
    texts += [json.loads(line)["text"][:60] for line in (SAMPLE_CORPUS / "articles.jsonl").read_text().splitlines()
              if line][:6]
    return texts


def sample_texts() -> list[str]:
    """15 different texts: the sample articles and FAQ entries."""
    lines = [json.loads(line) for name in ("articles.jsonl", "faq.ndjson")
             for line in (SAMPLE_CORPUS / name).read_text().splitlines() if line.strip()]
    return [record.get("text") or record["contents"] for record in lines]


@pytest.fixture(scope="module")
def exported(spread_model, tmp_path_factory):
    """The sample corpus indexed locally and exported to a Milvus Lite file (with text)."""
    root = tmp_path_factory.mktemp("milvus")
    out, uri = root / "ix", root / "milvus.db"
    ok("index", SAMPLE_CORPUS, "--out", out, "--model", spread_model, *FP32)
    queries_file = root / "queries.jsonl"
    write_jsonl(queries_file, [{"_id": f"q{i}", "text": t} for i, t in enumerate(queries())])
    result = ok("export", "milvus", out, "--uri", uri, "--collection", "sample", "--with-text", "--batch", 10,
                "--report", root / "export.json")
    assert "Created Milvus collection sample" in result.stdout
    return out, uri, queries_file, json.loads((root / "export.json").read_text())


def search(out, queries_file, *extra):
    result = ok("search", out, "--queries", queries_file, "--format", "json", *FP32, *extra)
    return json.loads(result.stdout)


def assert_same_top10(local, remote, sparse_only=False):
    """Same ids in the same order, scores within 1e-4. In sparse mode Milvus returns only rows sharing a token
    with the query, where local search fills the top-10 with 0-score rows in index order: those are left out."""
    assert len(local) == len(remote) and local
    for lq, mq in zip(local, remote):
        expected = [h for h in lq["hits"] if h["score"] > 0] if sparse_only else lq["hits"]
        assert [h["id"] for h in mq["hits"]] == [h["id"] for h in expected], lq["query"]
        assert len(lq["hits"]) == 10
        for lh, mh in zip(expected, mq["hits"]):
            assert mh["score"] == pytest.approx(lh["score"], abs=1e-4)
            assert mh["dense"] == pytest.approx(lh["dense"], abs=1e-4)
            assert mh["sparse"] == pytest.approx(lh["sparse"], abs=1e-4)


# ---------------------------------------------------------------------------


def test_export_copies_every_live_row(exported):
    out, uri, _, report = exported
    assert report["rows"] == 44 and report["created"] and report["dense_type"] == "float"
    client = connect(str(uri))
    assert sorted(iter_collection_ids(client, "sample")) == sorted(_live_ids(out))
    identity = stored_identity(client, "sample")
    assert identity["state"] == "complete" and identity["generation"] == read_manifest(out).generation
    row = client.get("sample", ids=["beir-3"], output_fields=["dense", "sparse", "text"])[0]
    assert row["text"].startswith("Solar eclipse")


@pytest.mark.parametrize("extra", [(), ("--mode", "dense"), ("--mode", "sparse"),
                                   ("--dense-weight", 0.4, "--sparse-weight", 1.0)])
def test_milvus_top10_equals_local_top10(exported, extra):
    out, uri, queries_file, _ = exported
    local = search(out, queries_file, "-k", 10, *extra)
    remote = search(out, queries_file, "-k", 10, *extra, "--backend", "milvus", "--uri", uri, "--collection", "sample")
    assert_same_top10(local, remote, sparse_only="sparse" in extra)
    assert sum(len(q["hits"]) for q in remote) >= 5 * len(remote)  # not vacuous
    assert remote[0]["hits"][0]["text"]  # stored with --with-text


def test_rrf_fusion_runs_on_milvus(exported):
    out, uri, queries_file, _ = exported
    remote = search(out, queries_file, "--fusion", "rrf", "--backend", "milvus", "--uri", uri, "--collection", "sample")
    assert all(len(q["hits"]) == 10 for q in remote)
    best = remote[0]["hits"][0]["score"]
    assert best <= 2 / 61 + 1e-6  # a sum over two lists of 1 / (60 + rank)


def test_reexport_is_idempotent_and_follows_the_index(spread_model, tmp_path):
    corpus, out, uri = tmp_path / "c.jsonl", tmp_path / "ix", tmp_path / "m.db"
    records = [{"id": f"d{i}", "text": text} for i, text in enumerate(sample_texts())]
    assert len(records) == 15
    write_jsonl(corpus, records)
    ok("index", corpus, "--out", out, "--model", spread_model, *FP32)
    first = export_index(out, str(uri), "c", batch=4)
    again = export_index(out, str(uri), "c", batch=4)
    assert (first.rows, first.created, again.rows, again.created, again.stale_removed) == (15, True, 15, False, 0)
    client = connect(str(uri))
    assert sorted(iter_collection_ids(client, "c")) == sorted(r["id"] for r in records)

    # The index loses two documents and changes one: a re-export upserts and deletes what is gone.
    write_jsonl(corpus, [dict(r, text="edited text") if r["id"] == "d1" else r for r in records[2:]] +
                [dict(records[1], text="edited text")])
    ok("index", corpus, "--out", out, "--model", spread_model, *FP32)
    update = export_index(out, str(uri), "c", batch=4)
    assert (update.rows, update.stale_removed) == (14, 1)
    assert sorted(iter_collection_ids(client, "c")) == sorted(_live_ids(out))
    queries_file = tmp_path / "q.tsv"
    queries_file.write_text("1\tthe moon\n2\tedited text about trains\n3\tWhy is octopus blood blue?\n")
    remote = search(out, queries_file, "--backend", "milvus", "--uri", uri, "--collection", "c")
    assert_same_top10(search(out, queries_file), remote)

    dropped = ok("export", "milvus", out, "--uri", uri, "--collection", "c", "--drop-existing")
    assert "Created Milvus collection c" in dropped.stdout and "14 rows" in dropped.stdout


def test_interrupted_export_is_finished_by_running_it_again(spread_model, tmp_path):
    corpus, out, uri = tmp_path / "c.jsonl", tmp_path / "ix", tmp_path / "m.db"
    write_jsonl(corpus, [{"id": f"d{i}", "text": f"bread and compost, note {i}"} for i in range(20)])
    ok("index", corpus, "--out", out, "--model", spread_model, *FP32)

    def stop_after_first_batch(rows):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_index(out, str(uri), "c", batch=5, progress=stop_after_first_batch)
    client = connect(str(uri))
    assert len(list(iter_collection_ids(client, "c"))) == 5
    assert stored_identity(client, "c")["state"] == "partial"
    warned = invoke("search", out, "moon", "--backend", "milvus", "--uri", uri, "--collection", "c", *FP32)
    assert warned.exit_code == 0 and "did not finish" in warned.output

    finished = export_index(out, str(uri), "c", batch=5)
    assert finished.rows == 20 and not finished.created
    assert sorted(iter_collection_ids(client, "c")) == sorted(_live_ids(out))
    assert stored_identity(client, "c")["state"] == "complete"


def test_empty_sparse_vectors_are_stored_with_a_placeholder_and_counted(tmp_path):
    out, uri, dim, vocab = tmp_path / "ix", tmp_path / "m.db", 8, 50
    manifest = Manifest(model={"name": "hand-made", "revision": None, "sha256": "0" * 64, "files": {},
                               "dtype": "fp32", "max_length": 16},
                        dense_dim=dim, colbert_dim=None, vocab_size=vocab, store_text=False, generation=1)
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((3, dim)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    sparse = [(np.array([1, 7], dtype=np.uint32), np.array([0.5, 0.25], dtype=np.float32)),
              (np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.float32)),  # empty: Milvus would refuse it
              (np.array([7], dtype=np.uint32), np.array([2.0], dtype=np.float32))]
    writer = IndexWriter(out, manifest, shard_rows=10)
    writer.write(RowBatch(ids=["a", "empty", "c"], content_hashes=["h"] * 3, texts=None, dense=dense, sparse=sparse))
    writer.commit()
    summary = export_index(out, str(uri), "hand")
    assert (summary.rows, summary.empty_sparse) == (3, 1)
    client = connect(str(uri))
    client.load_collection("hand")
    assert client.get("hand", ids=["empty"], output_fields=["sparse"])[0]["sparse"] == {vocab: 1.0}
    # Found by dense search, never by a sparse query (no query has the placeholder token).
    query = dense[1].astype(np.float16).astype(np.float32)
    assert client.search("hand", data=[query], anns_field="dense", limit=1,
                         search_params={"metric_type": "IP"})[0][0]["id"] == "empty"
    sparse_hits = client.search("hand", data=[{1: 1.0, 7: 1.0}], anns_field="sparse", limit=3,
                                search_params={"metric_type": "IP", "params": {"drop_ratio_search": 0.0}})[0]
    assert sorted(h["id"] for h in sparse_hits) == ["a", "c"]
    assert {h["id"]: h["distance"] for h in sparse_hits} == pytest.approx({"a": 0.75, "c": 2.0})


def test_milvus_errors(exported, tiny_model, tmp_path):
    out, uri, _, _ = exported
    no_uri = invoke("search", out, "moon", "--backend", "milvus", "--collection", "sample")
    assert no_uri.exit_code == 2 and "needs --uri and --collection" in no_uri.output
    colbert = invoke("search", out, "moon", "--backend", "milvus", "--uri", uri, "--collection", "sample",
                     "--mode", "colbert")
    assert colbert.exit_code == 2 and "does not support --mode colbert" in colbert.output
    missing = invoke("search", out, "moon", "--backend", "milvus", "--uri", uri, "--collection", "nope", *FP32)
    assert missing.exit_code == 1 and "no collection 'nope'" in missing.output
    stray = invoke("search", out, "moon", "--collection", "sample")
    assert stray.exit_code == 2 and "need --backend milvus" in stray.output
    # Another model's index cannot be exported into (or searched through) this collection.
    other_index = tmp_path / "other"
    ok("index", SAMPLE_QUERIES, "--out", other_index, "--model", tiny_model, *FP32)
    refused = invoke("export", "milvus", other_index, "--uri", uri, "--collection", "sample")
    assert refused.exit_code == 1 and "another model" in refused.output
    foreign = invoke("search", other_index, "moon", "--backend", "milvus", "--uri", uri, "--collection", "sample",
                     *FP32)
    assert foreign.exit_code == 1 and "was not exported from an index of" in foreign.output


def _live_ids(out: Path) -> list[str]:
    return list(load_vectors(out, read_manifest(out)).ids)


def test_milvus_hybrid_equals_local_by_default_past_the_old_route_limit(spread_model, tmp_path):
    """300 rows: more than the old default route limit (max(5k, 100) = 100 for k = 10), under Milvus's 16,384."""
    corpus, out, uri, queries_file = tmp_path / "c.jsonl", tmp_path / "ix", tmp_path / "m.db", tmp_path / "q.jsonl"
    # 300 different windows over the sample texts' words: no two rows alike, so no near-ties in the ranking.
    words = " ".join(sample_texts()).split()
    write_jsonl(corpus, [{"id": f"d{i:03d}", "text": " ".join(words[(i * 7) % (len(words) - 40):][:12 + i % 17])}
                         for i in range(300)])
    ok("index", corpus, "--out", out, "--model", spread_model, *FP32)
    ok("export", "milvus", out, "--uri", uri, "--collection", "big")
    write_jsonl(queries_file, [{"_id": f"q{i}", "text": t} for i, t in enumerate(queries())])
    local = search(out, queries_file)
    remote = search(out, queries_file, "--backend", "milvus", "--uri", uri, "--collection", "big")
    assert_same_top10(local, remote)


def test_default_route_limit_is_as_deep_as_milvus_allows():
    from bge_index.search.milvus import MAX_ROUTE_LIMIT, default_route_limit

    assert MAX_ROUTE_LIMIT == 16_384 and default_route_limit(10) == 16_384 and default_route_limit(1000) == 16_384


def test_credentials_are_masked_in_every_message(exported):
    out, _, _, _ = exported
    uri, token = "http://alice:s3cretpw@127.0.0.1:1", "bob:t0kenpass"
    for command in (("export", "milvus", out, "--uri", uri, "--collection", "c", "--token", token),
                    ("search", out, "moon", "--backend", "milvus", "--uri", uri, "--collection", "c",
                     "--token", token, *FP32)):
        result = invoke(*command)
        assert result.exit_code == 1 and "cannot connect to Milvus" in result.output
        assert "s3cretpw" not in result.output and "t0kenpass" not in result.output, result.output
        assert "alice:***@127.0.0.1" in result.output and "Traceback" not in result.output


def test_mask_secrets():
    from bge_index.search.milvus import mask_secrets, public_uri

    assert public_uri("http://u:p4ss@host:19530") == "http://u:***@host:19530"
    assert public_uri("./index.db") == "./index.db" and public_uri("http://host:19530") == "http://host:19530"
    assert mask_secrets("token root:Milvus, password Milvus", token="root:Milvus") == "token ***, password ***"
