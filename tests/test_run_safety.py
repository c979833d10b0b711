"""Nothing lost, nobody in: failed inputs named and kept, the --max-remove guard, the index never read as input."""

from __future__ import annotations

import gzip
import json

import pytest
from helpers import index, invoke, live_texts, write_jsonl

from bge_index.errors import InvalidOptionError
from bge_index.store.names import MANIFEST_FILE
from bge_index.store.manifest import read_manifest
from bge_index.run.index_run import IndexOptions, parse_max_remove, removal_limit


def records(ids, suffix=""):
    return [{"id": i, "text": f"document {i} about the moon{suffix}"} for i in ids]


# ---------------------------------------------------------------------------
# 1. A run removes only what it saw gone


def test_failed_input_is_named_exits_1_and_keeps_its_documents(tiny_model, tmp_path):
    folder, out, report = tmp_path / "in", tmp_path / "ix", tmp_path / "r.json"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records(["a1", "a2"]))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(b'{"id": "b1", "text": "train"}\n'))
    index(folder, out, tiny_model)
    (folder / "b.jsonl.gz").write_bytes(b"this is not gzip at all")
    write_jsonl(folder / "c.jsonl", records(["c1"]))  # good work in the same run
    result = invoke("index", folder, "--out", out, "--model", tiny_model, "--report", report)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("bge-index: error:")]
    assert len(errors) == 1 and "1 input could not be read whole; their documents were kept" in errors[0]
    assert "b.jsonl.gz" in errors[0] and "Traceback" not in result.output
    assert "b.jsonl.gz" in result.stdout  # named in the summary too
    assert set(live_texts(out)) == {"a1", "a2", "b1", "c1"}  # c1 committed, b1 kept
    failed = json.loads(report.read_text())["failed_inputs"]
    assert len(failed) == 1 and "b.jsonl.gz" in failed[0]["location"] and failed[0]["reason"]


def test_a_bad_record_with_a_known_id_keeps_that_ids_rows(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, records(["d0", "d1", "d2"]))
    index(corpus, out, tiny_model)
    # d1's record is now bad (empty text) but its id is read: the indexed d1 stays.
    write_jsonl(corpus, records(["d0"]) + [{"id": "d1", "text": ""}] + records(["d2"]))
    result = index(corpus, out, tiny_model)
    assert "0 removed" in result.stdout and "skipped: 1" in result.stdout
    assert set(live_texts(out)) == {"d0", "d1", "d2"}
    # A later good occurrence of the same id still replaces it, without a duplicate warning.
    write_jsonl(corpus, records(["d0"]) + [{"id": "d1", "text": ""}] + records(["d2"]) + records(["d1"], " edited"))
    result = index(corpus, out, tiny_model)
    assert "0 added, 1 updated, 2 unchanged, 0 removed" in result.stdout and "duplicate" not in result.stderr
    assert live_texts(out)["d1"].endswith(" edited")


# ---------------------------------------------------------------------------
# 2. --max-remove


@pytest.mark.parametrize("text, expected", [("50%", ("share", 0.5)), ("0.5", ("share", 0.5)),
                                            ("100%", ("share", 1.0)), ("100", ("count", 100)), ("0", ("count", 0))])
def test_max_remove_values(text, expected):
    assert parse_max_remove(text) == expected


@pytest.mark.parametrize("text", ["half", "150%", "-1", "1.5", ""])
def test_bad_max_remove_is_a_usage_error(text):
    with pytest.raises(InvalidOptionError, match="--max-remove"):
        IndexOptions(model="m", max_remove=text)


def test_removal_limit():
    assert removal_limit("50%", 10) == 5 and removal_limit("100%", 10) == 10 and removal_limit("3", 10) == 3


def test_an_empty_input_folder_removes_nothing_by_default(tiny_model, tmp_path):
    """An unmounted share looks like an empty folder: the default guard must catch it."""
    share, out, report = tmp_path / "share", tmp_path / "ix", tmp_path / "r.json"
    share.mkdir()
    write_jsonl(share / "a.jsonl", records(["a1", "a2", "a3"]))
    index(share, out, tiny_model)
    before = (out / MANIFEST_FILE).read_bytes()
    (share / "a.jsonl").unlink()  # the mount is gone: an empty folder
    result = invoke("index", share, "--out", out, "--model", tiny_model, "--report", report)
    assert result.exit_code == 1, result.output
    assert "--max-remove" in result.stderr and "100%" in result.stderr  # the warning names the share and the flag
    errors = [line for line in result.stderr.splitlines() if line.startswith("bge-index: error:")]
    assert len(errors) == 1 and "--max-remove" in errors[0]
    assert set(live_texts(out)) == {"a1", "a2", "a3"} and (out / MANIFEST_FILE).read_bytes() == before
    assert json.loads(report.read_text())["removal_refused"]
    # Told so, the run removes them.
    result = index(share, out, tiny_model, "--max-remove", "100%")
    assert "3 removed" in result.stdout and live_texts(out) == {}


def test_guard_keeps_additions_and_allows_small_removals(tiny_model, tmp_path):
    corpus, out = tmp_path / "c.jsonl", tmp_path / "ix"
    write_jsonl(corpus, records([f"d{i}" for i in range(10)]))
    index(corpus, out, tiny_model)
    # 6 of 10 gone, one added: the addition is committed, nothing removed, exit 1.
    write_jsonl(corpus, records([f"d{i}" for i in range(4)] + ["new"]))
    result = invoke("index", corpus, "--out", out, "--model", tiny_model)
    assert result.exit_code == 1 and "1 added" in result.stdout and "0 removed" in result.stdout
    assert len(live_texts(out)) == 11 and "new" in live_texts(out)
    # A count: at most 6 removals allowed by the environment variable.
    result = index(corpus, out, tiny_model, env={"BGE_INDEX_MAX_REMOVE": "6"})
    assert "6 removed" in result.stdout and set(live_texts(out)) == {"d0", "d1", "d2", "d3", "new"}
    # 2 of 5 (40%) is under the default half.
    write_jsonl(corpus, records(["d0", "d1", "new"]))
    assert "2 removed" in index(corpus, out, tiny_model).stdout


# ---------------------------------------------------------------------------
# 3. The index folder is never input


def test_out_inside_an_input_folder_is_not_read(tiny_model, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.txt").write_text(f"note {name} about tides")
    out = folder / "index"
    first = index(folder, out, tiny_model)
    assert "3 added" in first.stdout
    again = index(folder, out, tiny_model)
    assert "0 added, 0 updated, 3 unchanged, 0 removed" in again.stdout
    assert read_manifest(out).generation == 1
    (folder / "a.txt").write_text("note a edited")
    (folder / "b.txt").unlink()
    result = index(folder, out, tiny_model)
    assert "0 added, 1 updated, 1 unchanged, 1 removed" in result.stdout
    assert set(live_texts(out)) == {"a.txt", "c.txt"}


def test_bad_records_that_hold_nothing_back_exit_0_and_held_back_removals_are_named(tiny_model, tmp_path):
    folder, out, report = tmp_path / "in", tmp_path / "ix", tmp_path / "r.json"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records(["a1", "a2"]))
    write_jsonl(folder / "b.jsonl", records(["b1"]))
    index(folder, out, tiny_model)
    with (folder / "a.jsonl").open("a") as stream:
        stream.write("{not json\n")
    result = invoke("index", folder, "--out", out, "--model", tiny_model)
    assert result.exit_code == 0 and "bge-index: error:" not in result.stderr, result.output  # nothing gone
    # Issue 18: a malformed line in a.jsonl held back every removal, for ever. Rows record their source file:
    # b.jsonl deleted -> b1 is removed (a.jsonl could not hold it); a2 gone from a.jsonl -> it waits.
    (folder / "b.jsonl").unlink()
    write_jsonl(folder / "a.jsonl", records(["a1"]))
    with (folder / "a.jsonl").open("a") as stream:
        stream.write("{not json\n")
    result = invoke("index", folder, "--out", out, "--model", tiny_model, "--report", report,
                    "--max-remove", "100%")
    assert result.exit_code == 1, result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("bge-index: error:")]
    assert "a.jsonl:2" in line and "'a2'" in line and "removal of 1 indexed document" in line
    assert json.loads(report.read_text())["removals_held_back"] == {"count": 1, "ids": ["a2"]}
    assert set(live_texts(out)) == {"a1", "a2"}


def test_an_index_written_before_sources_were_recorded_still_works(tiny_model, tmp_path, monkeypatch):
    # Shard layout 1 has no source columns: it verifies, its rows are carried, compacted and merged into
    # layout 2 shards (sources null), and an input not read whole holds back all of its removals, as before.
    from bge_index.store import manifest as manifest_module
    from bge_index.store import shard_writer
    from bge_index.store.shard_reader import has_sources, verify_index

    real = manifest_module.manifest_schema
    monkeypatch.setattr(shard_writer, "manifest_schema", lambda m: manifest_module.legacy_schema(real(m)))
    folder, out = tmp_path / "in", tmp_path / "ix"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records(["a1", "a2"]))
    write_jsonl(folder / "b.jsonl", records(["b1", "b2"]))
    index(folder, out, tiny_model, "--shard-rows", "2")
    monkeypatch.undo()
    from bge_index.store.manifest import read_manifest
    assert not any(has_sources(out, s) for s in read_manifest(out).shards)
    assert verify_index(out) == []
    (folder / "b.jsonl").unlink()
    with (folder / "a.jsonl").open("a") as stream:
        stream.write("{not json\n")
    held = invoke("index", folder, "--out", out, "--model", tiny_model, "--max-remove", "100%")
    assert held.exit_code == 1 and "'b1'" in held.stderr, held.output  # unknown sources: held back
    write_jsonl(folder / "a.jsonl", records(["a1", "a2"]) + [{"id": "a3", "text": "new"}])
    ok_run = invoke("index", folder, "--out", out, "--model", tiny_model, "--max-remove", "100%", "--shard-rows", "2")
    assert ok_run.exit_code == 0, ok_run.output
    assert set(live_texts(out)) == {"a1", "a2", "a3"} and verify_index(out) == []
