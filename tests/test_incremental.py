"""Incremental runs, settings mismatches, dry runs, locking, verify, chunking, reports and hostile input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SAMPLE_CORPUS, encode_texts, index, invoke, live_texts, load_vectors, write_jsonl

import bge_index.run.local as indexing
from bge_index.input.documents import Skipped
from bge_index.model.encoder import load_encoder
from bge_index.store.lock import LOCK_FILE, IndexLock
from bge_index.run.local import build_index
from bge_index.run.index_run import IndexEvents, IndexOptions
from bge_index.store.names import MANIFEST_FILE
from bge_index.store.manifest import read_manifest


def corpus_records(n=12, edit=(), drop=()):
    words = ["moon", "tides", "bread", "train", "garden", "octopus", "Mond", "lune", "tren", "compost"]
    return [{"id": f"d{i}", "text": f"{words[i % 10]} document {i} about {words[(i * 3) % 10]}"
             + (" edited" if i in edit else "")} for i in range(n) if i not in drop]


# ---------------------------------------------------------------------------
# Incremental runs


def test_no_change_rerun_encodes_nothing_and_writes_nothing(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    index(corpus, out, tiny_model)
    manifest_before = (out / MANIFEST_FILE).read_bytes()
    files_before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE}
    result = index(corpus, out, tiny_model, "--report", tmp_path / "r.json")
    assert "0 added, 0 updated, 12 unchanged, 0 removed" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["encoded"]["rows"] == 0 and report["timings"]["model_load_seconds"] == 0
    assert report["index"]["written"] is False
    assert (out / MANIFEST_FILE).read_bytes() == manifest_before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE} == files_before


def test_changed_documents_replace_their_rows_and_missing_ones_go(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    index(corpus, out, tiny_model)
    before = load_vectors(out, read_manifest(out))
    write_jsonl(corpus, corpus_records(edit={2, 5}, drop={7}) + [{"id": "new", "text": "a brand new moon"}])
    result = index(corpus, out, tiny_model)
    assert "1 added, 2 updated, 9 unchanged, 1 removed" in result.stdout
    texts = live_texts(out)
    assert len(texts) == 12 and "d7" not in texts and texts["new"] == "a brand new moon"
    assert texts["d2"].endswith(" edited") and texts["d5"].endswith(" edited")
    after = load_vectors(out, read_manifest(out))
    row_before = {d: r for r, d in enumerate(before.ids)}
    row_after = {d: r for r, d in enumerate(after.ids)}
    assert not np.array_equal(before.dense[row_before["d2"]], after.dense[row_after["d2"]])
    np.testing.assert_array_equal(before.dense[row_before["d3"]], after.dense[row_after["d3"]])
    assert invoke("verify", out).exit_code == 0


def test_keep_missing(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    index(corpus, out, tiny_model)
    write_jsonl(corpus, corpus_records(drop={0, 1}))
    result = index(corpus, out, tiny_model, "--keep-missing")
    assert "0 removed" in result.stdout and {"d0", "d1"} <= set(live_texts(out))


def test_dry_run_reports_and_writes_nothing(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, "--dry-run")
    assert result.exit_code == 0 and "Would change" in result.stdout and "12 added" in result.stdout
    assert not out.exists()
    index(corpus, out, tiny_model)
    manifest_before = (out / MANIFEST_FILE).read_bytes()
    write_jsonl(corpus, corpus_records(edit={1}, drop={2}) + [{"id": "x", "text": "new"}])
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, "--dry-run")
    assert "1 added, 1 updated, 10 unchanged, 1 removed" in result.stdout
    assert (out / MANIFEST_FILE).read_bytes() == manifest_before


@pytest.mark.parametrize("extra, named", [
    (["--max-length", "64"], "max length 512 (this run: 64)"),
    (["--colbert"], "ColBERT vectors off (this run: on)"),
    (["--no-store-text"], "text stored (this run: not stored)"),
    (["--chunk-tokens", "32"], "chunking off (this run: 32 tokens, overlap 0)"),
    (["--dtype", "bf16"], "dtype fp32 (this run: bf16)"),
])
def test_other_settings_never_extend_an_index(tiny_model, tmp_path, extra, named):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    index(corpus, out, tiny_model)
    before = (out / MANIFEST_FILE).read_bytes()
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, *extra)
    assert result.exit_code == 1
    assert named in result.stderr and "new --out" in result.stderr
    assert (out / MANIFEST_FILE).read_bytes() == before


def test_another_model_never_extends_an_index(tiny_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    torch.save({k: v * 3 for k, v in torch.load(other / "sparse_linear.pt").items()}, other / "sparse_linear.pt")
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    index(corpus, out, tiny_model)
    result = invoke("index", corpus, "--out", out, "--model", other)
    assert result.exit_code == 1
    assert str(tiny_model) in result.stderr and str(other) in result.stderr and "new --out" in result.stderr


def test_duplicate_ids_last_occurrence_wins_with_a_warning(tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "same", "text": "first version"}, {"id": "a", "text": "aaa"}])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": "b", "text": "bbb"}, {"id": "same", "text": "second version"}])
    out = tmp_path / "ix"
    result = index(tmp_path / "in", out, tiny_model)
    assert "duplicate id 'same'" in result.stderr
    assert "b.jsonl:2" in result.stderr and "a.jsonl:1" in result.stderr
    assert live_texts(out) == {"same": "second version", "a": "aaa", "b": "bbb"}
    assert "3 added" in result.stdout
    # A re-run meets the same duplicate and changes nothing.
    again = index(tmp_path / "in", out, tiny_model)
    assert "0 added, 0 updated, 3 unchanged, 0 removed" in again.stdout
    assert live_texts(out) == {"same": "second version", "a": "aaa", "b": "bbb"}


# ---------------------------------------------------------------------------
# Locking


def test_second_writer_exits_75_naming_the_first(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    with IndexLock(out):
        result = invoke("index", corpus, "--out", out, "--model", tiny_model)
    assert result.exit_code == 75
    assert f"pid {os.getpid()}" in result.stderr and "--wait" in result.stderr
    assert not (out / MANIFEST_FILE).exists()


@pytest.mark.slow
def test_wait_waits_for_the_lock(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    held = threading.Event()

    def hold():
        with IndexLock(out):
            held.set()
            time.sleep(1.5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    started = time.monotonic()
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, "--wait")
    thread.join()
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 1.0
    assert "waiting for" in result.stderr


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday", "command": "x"}))
    index(corpus, out, tiny_model)
    assert read_manifest(out).documents == 12


def test_readers_work_while_a_writer_holds_the_lock(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records())
    index(corpus, out, tiny_model)
    with IndexLock(out):
        assert invoke("search", out, "moon", "-k", "2").exit_code == 0
        assert invoke("info", out).exit_code == 0
        assert invoke("verify", out).exit_code == 0


# ---------------------------------------------------------------------------
# verify and damaged shards


def test_verify_and_search_name_a_damaged_shard(tiny_model, tmp_path):
    out = tmp_path / "ix"
    index(SAMPLE_CORPUS, out, tiny_model, "--shard-rows", "20")
    result = invoke("verify", out)
    assert result.exit_code == 0 and "OK" in result.stdout
    shard = out / read_manifest(out).shards[1].file
    metadata = pq.ParquetFile(shard).metadata
    dense = next(metadata.row_group(0).column(c) for c in range(metadata.num_columns)
                 if metadata.row_group(0).column(c).path_in_schema.startswith("dense"))
    data = bytearray(shard.read_bytes())
    data[dense.data_page_offset + dense.total_compressed_size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = invoke("verify", out)
    assert result.exit_code == 1 and shard.name in result.stderr and "damaged" in result.stderr
    result = invoke("search", out, "moon")
    assert result.exit_code == 1 and shard.name in result.stderr and "damaged" in result.stderr


# ---------------------------------------------------------------------------
# Long documents


LONG_TEXT = " ".join(f"The Moon orbits the Earth, sentence {i}. Der Zug fährt ab." for i in range(40))


def test_long_documents_are_truncated_and_counted_without_chunking(tiny_model, tmp_path):
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"id": "long", "text": LONG_TEXT}, {"id": "short", "text": "moon"}])
    result = index(corpus, tmp_path / "ix", tiny_model, "--max-length", "64")
    assert "truncated to 64 tokens: 1" in result.stdout


def test_chunking_splits_on_token_boundaries_with_spans(tiny_model, encoder, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "long", "text": LONG_TEXT}, {"id": "short", "text": "moon and tides"}])
    index(corpus, out, tiny_model, "--chunk-tokens", "32", "--chunk-overlap", "8")
    manifest = read_manifest(out)
    assert manifest.chunking == {"tokens": 32, "overlap": 8}
    table = pq.read_table(out / manifest.shards[0].file).to_pylist()
    long_rows = [r for r in table if r["doc_id"] == "long"]
    assert [r["chunk"] for r in long_rows] == list(range(len(long_rows))) and len(long_rows) > 5
    assert all(r["id"] == f"long#{r['chunk']}" for r in long_rows)
    for row in long_rows:
        assert LONG_TEXT[row["char_start"]:row["char_end"]] == row["text"]
        assert len(encoder.tokenizer.encode_batch([row["text"]])[0]) <= 32 + 2  # re-tokenising a span may merge pieces
    # Consecutive passages overlap and together cover the text.
    assert long_rows[0]["char_start"] == 0 and long_rows[-1]["char_end"] == len(LONG_TEXT)
    assert all(b["char_start"] < a["char_end"] for a, b in zip(long_rows, long_rows[1:]))
    expected = encoder.passages(LONG_TEXT, 32, 8)
    assert len(expected) == len(long_rows)
    assert [len(p.ids) for p in expected][:-1] == [32] * (len(expected) - 1)


def test_group_by_doc_ranks_documents_by_their_best_passage(tiny_model, encoder, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    records = [{"id": f"doc{i}", "text": LONG_TEXT[i * 97:] + f" extra {i} moon"} for i in range(6)]
    write_jsonl(corpus, records)
    index(corpus, out, tiny_model, "--chunk-tokens", "24", "--chunk-overlap", "4")
    result = invoke("search", out, "moon orbits", "--group-by-doc", "-k", "4", "--format", "json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)[0]["hits"]
    assert len({h["id"] for h in hits}) == 4 and all(h["passage"].startswith(h["id"] + "#") for h in hits)
    # Brute force: a document scores as its best passage.
    vectors = load_vectors(out, read_manifest(out))
    query = encode_texts(encoder, ["moon orbits"])
    q_sparse = dict(zip(query.sparse[0][0].tolist(), query.sparse[0][1].tolist()))
    best: dict[str, float] = {}
    for row, doc_id in enumerate(vectors.doc_ids):
        ids, weights = vectors.sparse_row(row)
        score = float(vectors.dense[row].astype(np.float32) @ query.dense[0]) + \
            0.3 * sum(q_sparse.get(t, 0.0) * w for t, w in zip(ids.tolist(), weights.tolist()))
        best[doc_id] = max(best.get(doc_id, -np.inf), score)
    expected = sorted(best, key=lambda d: -best[d])[:4]
    assert [h["id"] for h in hits] == expected
    for hit in hits:
        assert hit["score"] == pytest.approx(best[hit["id"]], abs=1e-4)
    ungrouped = json.loads(invoke("search", out, "moon orbits", "-k", "4", "--format", "json").stdout)[0]["hits"]
    assert all("#" in h["id"] for h in ungrouped)


def test_chunked_index_updates_whole_documents(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "long", "text": LONG_TEXT}, {"id": "short", "text": "moon"}])
    index(corpus, out, tiny_model, "--chunk-tokens", "32")
    rows_before = read_manifest(out).documents
    write_jsonl(corpus, [{"id": "long", "text": LONG_TEXT[:200]}, {"id": "short", "text": "moon"}])
    result = index(corpus, out, tiny_model, "--chunk-tokens", "32")
    assert "0 added, 1 updated, 1 unchanged, 0 removed" in result.stdout
    vectors = load_vectors(out, read_manifest(out))
    assert read_manifest(out).documents < rows_before
    assert len(vectors.ids) == len(set(vectors.ids))
    assert invoke("verify", out).exit_code == 0


# ---------------------------------------------------------------------------
# Machine-readable runs


def test_report_quiet_and_cron_progress_lines(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, corpus_records(40) + [{"id": "bad"}])
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, "--quiet", "--report", tmp_path / "r.json")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete"
    assert report["documents"]["added"] == 40 and report["documents"]["skipped"] == 1
    assert report["skipped_by_reason"] == {"no_text_field": 1}  # snake_case codes (issue 18)
    assert report["index"]["live_rows"] == 40 and report["model"]
    assert report["timings"]["total_seconds"] > 0
    write_jsonl(corpus, corpus_records(40, edit=set(range(40))))
    result = invoke("index", corpus, "--out", out, "--model", tiny_model, "--batch-tokens", "16",
                    "--progress-every", "0.1")
    assert result.exit_code == 0
    progress = [line for line in result.stderr.splitlines() if "encoded" in line]
    assert progress and all(line.startswith("bge-index: ") for line in progress)  # plain lines, no bar


# ---------------------------------------------------------------------------
# Hostile input at scale


class _Saboteur(IndexEvents):
    """When the first bad record is reported, make two files that were already listed vanish or unreadable."""

    def __init__(self, folder):
        self.folder = folder
        self.fired = False
        self.skips: list[Skipped] = []
        self.warnings: list[str] = []

    def skipped(self, item):
        self.skips.append(item)
        if not self.fired:
            self.fired = True
            (self.folder / "y_vanishes.txt").unlink()
            (self.folder / "z_unreadable.txt").unlink()
            (self.folder / "z_unreadable.txt").mkdir()  # a folder where a file was: reading fails

    def warning(self, message):
        self.warnings.append(message)


@pytest.mark.slow
def test_hostile_corpus(tiny_model, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    good = {}

    def add_good(doc_id, text):
        good[doc_id] = text

    (folder / "a_bad.jsonl").write_bytes(
        b'{"id": "g1", "text": "good one"}\n'
        b'\xff\xfe not utf8\n'
        b'[1, 2, 3]\n'
        b'"just a string"\n'
        b'{"id": ["list"], "text": "x"}\n'
        b'{"id": "t", "text": 42}\n'
        b'{"id": "nul", "text": "has \\u0000 a NUL"}\n'
        b'{"id": "g2", "text": "good two"}\n')
    add_good("g1", "good one")
    add_good("nul", "has \x00 a NUL")
    add_good("g2", "good two")
    payload = gzip.compress(b"".join(json.dumps({"id": f"gz{i}", "text": f"gz text {i}"}).encode() + b"\n"
                                     for i in range(400)))
    (folder / "b_truncated.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    (folder / "c_huge.jsonl").write_text(json.dumps({"id": "huge", "text": "moon " * 2_000_000}) + "\n")
    add_good("huge", None)
    (folder / "d_empty.txt").write_text("")
    (folder / "d_empty.jsonl").write_text("")
    (folder / "e_binary.md").write_bytes(b"\x00\x01\x02")
    (folder / "f_dup.jsonl").write_text('{"id": "g1", "text": "good one, later"}\n')
    good["g1"] = "good one, later"
    (folder / "loop").mkdir()
    os.symlink("..", folder / "loop" / "back")
    (folder / "loop" / "inside.txt").write_text("inside the loop folder")
    add_good("loop/inside.txt", "inside the loop folder")
    (folder / "y_vanishes.txt").write_text("gone before it is read")
    (folder / "z_unreadable.txt").write_text("unreadable before it is read")
    (folder / "zz_last.txt").write_text("the last good file")
    add_good("zz_last.txt", "the last good file")

    events = _Saboteur(folder)
    out = tmp_path / "ix"
    summary = build_index([str(folder)], out, IndexOptions(model=str(tiny_model), max_length=128), events=events)
    texts = live_texts(out)
    # Every good document is indexed (gzip lines before the damage too), and nothing else.
    gz_ids = {d for d in texts if d.startswith("gz")}
    assert gz_ids and gz_ids == {f"gz{i}" for i in range(len(gz_ids))}
    assert set(texts) - gz_ids == set(good)
    for doc_id, text in good.items():
        if text is not None:
            assert texts[doc_id] == text
    assert summary.truncated == 1  # the 10 MB line
    reasons = {(s.source.rsplit("/", 1)[-1], s.line): s.reason for s in events.skips}
    assert reasons[("a_bad.jsonl", 2)].startswith("invalid UTF-8")
    assert reasons[("a_bad.jsonl", 3)] == "JSON line is not an object (got list)"
    assert reasons[("a_bad.jsonl", 4)] == "JSON line is not an object (got str)"
    assert "not a string or integer" in reasons[("a_bad.jsonl", 5)]
    assert "not a string" in reasons[("a_bad.jsonl", 6)]
    assert "corrupt or truncated gzip" in reasons[("b_truncated.jsonl.gz", len(gz_ids) + 1)]
    assert reasons[("d_empty.txt", None)] == "empty text"
    assert reasons[("e_binary.md", None)].startswith("binary file")
    assert reasons[("y_vanishes.txt", None)].startswith("cannot read file")
    assert reasons[("z_unreadable.txt", None)].startswith("cannot read file")
    assert any("duplicate id 'g1'" in w and "f_dup.jsonl:1" in w and "a_bad.jsonl:1" in w for w in events.warnings)
    assert sum(summary.skipped.values()) == len(events.skips) == 10


# ---------------------------------------------------------------------------
# Edge cases found in review


def test_unreadable_input_file_does_not_remove_its_documents(tiny_model, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "ix"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": "a1", "text": "moon"}, {"id": "a2", "text": "tides"}])
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(b'{"id": "b1", "text": "train"}\n'))
    index(folder, out, tiny_model)
    (folder / "b.jsonl.gz").write_bytes(b"this is not gzip at all")
    result = invoke("index", folder, "--out", out, "--model", tiny_model)
    assert result.exit_code == 1  # the input is named and the run fails, its documents kept
    assert "0 removed" in result.stdout and "could not be read whole" in result.stderr
    assert set(live_texts(out)) == {"a1", "a2", "b1"}
    (folder / "b.jsonl.gz").unlink()
    assert "1 removed" in index(folder, out, tiny_model).stdout


@pytest.mark.slow
def test_stop_between_two_occurrences_of_an_id_keeps_the_document(tiny_model, tmp_path, monkeypatch):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "d", "text": "old text"}, {"id": "x", "text": "x"}])
    index(corpus, out, tiny_model)
    monkeypatch.setattr(indexing, "WINDOW_DOCUMENTS", 2)
    write_jsonl(corpus, [{"id": "d", "text": "first new text"}, {"id": "x", "text": "x"},
                         {"id": "y", "text": "y"}, {"id": "d", "text": "second new text"}, {"id": "z", "text": "z"}])
    seen = {"calls": 0}

    def stop_after_the_second_d():
        seen["calls"] += 1
        return seen["calls"] > 5  # items d, x (window flushed, d written), y, d again: then stop

    summary = build_index([str(corpus)], out, IndexOptions(model=str(tiny_model)), should_stop=stop_after_the_second_d)
    assert summary.interrupted
    assert live_texts(out)["d"] == "first new text"  # never without rows
    assert read_manifest(out).state == "partial"
    index(corpus, out, tiny_model)
    assert live_texts(out) == {"d": "second new text", "x": "x", "y": "y", "z": "z"}


def test_duplicate_across_windows_of_an_indexed_document_counts_as_updated(tiny_model, tmp_path, monkeypatch):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": "d", "text": "same text"}, {"id": "x", "text": "x"}])
    index(corpus, out, tiny_model)
    monkeypatch.setattr(indexing, "WINDOW_DOCUMENTS", 2)
    # d (changed) and e fill a window and are written; then d comes back with its indexed text.
    write_jsonl(corpus, [{"id": "d", "text": "changed"}, {"id": "e", "text": "e"}, {"id": "x", "text": "x"},
                         {"id": "d", "text": "same text"}])
    summary = build_index([str(corpus)], out, IndexOptions(model=str(tiny_model)))
    assert (summary.added, summary.updated, summary.unchanged, summary.duplicates) == (1, 1, 1, 1)
    assert live_texts(out) == {"d": "same text", "e": "e", "x": "x"}
    dry = build_index([str(corpus)], out, IndexOptions(model=str(tiny_model), dry_run=True))
    assert (dry.added, dry.updated, dry.unchanged) == (0, 0, 3)


def test_third_occurrence_of_an_id_in_one_window_retires_the_first_one_rows(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(indexing, "WINDOW_DOCUMENTS", 3)
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    # d's first version is written with the first window; its second and third versions share the next one.
    write_jsonl(corpus, [{"id": "d", "text": "v one"}, {"id": "a", "text": "a"}, {"id": "b", "text": "b"},
                         {"id": "d", "text": "v two"}, {"id": "d", "text": "v three"}, {"id": "c", "text": "c"}])
    summary = build_index([str(corpus)], out, IndexOptions(model=str(tiny_model)))
    assert summary.duplicates == 2 and summary.added == 4
    assert read_manifest(out).documents == 4  # one live row for d, not two
    assert live_texts(out) == {"a": "a", "b": "b", "c": "c", "d": "v three"}


def test_a_stop_request_drops_the_batches_not_started(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(indexing, "WINDOW_DOCUMENTS", 200)
    encoder = load_encoder(str(tiny_model), device="cpu", dtype="fp32")
    batches = []
    real_encode = encoder.encode_ids

    def slow_encode(batch, colbert=False):
        batches.append(len(batch))
        time.sleep(0.05)  # the worker must not race through the window before the stop is seen
        return real_encode(batch, colbert)

    encoder.encode_ids = slow_encode
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, [{"id": f"d{i}", "text": f"word{i} " * (1 + i % 7)} for i in range(400)])
    stop = {"now": False}

    class StopAfterFirstBatch(IndexEvents):
        def progress(self, state):
            stop["now"] = True

    summary = build_index([str(corpus)], out, IndexOptions(model=str(tiny_model), batch_tokens=64),
                          events=StopAfterFirstBatch(), encoder=encoder, should_stop=lambda: stop["now"])
    assert summary.interrupted
    assert len(batches) <= 3  # the batch that ran, and at most the one a worker had just started
    assert 0 < summary.added < 20 and read_manifest(out).documents == summary.added
